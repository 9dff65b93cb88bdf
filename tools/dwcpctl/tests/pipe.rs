//! `dwcpctl` against daemons that misbehave: writing into a pipe whose reader went
//! away (`dwcpctl metrics | head -1`) ends quietly with success, as Unix tools do,
//! instead of panicking; a daemon that never answers is reported as a timeout.

use dwcp_api::{MetricsText, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A fresh directory named after `name` with a socket bound in it, standing in for
/// a daemon's: the directory, the socket's path, its listener.
fn fake_daemon(name: &str) -> (PathBuf, PathBuf, UnixListener) {
    let dir = std::env::temp_dir().join(format!("dwcpctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("dwcpd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    (dir, socket, listener)
}

#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    let (dir, socket, listener) = fake_daemon("pipe");
    // A daemon that answers one request with a long metrics text.
    let daemon = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(&stream).read_line(&mut request).unwrap();
        let text = "dwcp_uptime_seconds 1\n".repeat(100_000);
        let mut answer = serde_json::to_vec(&Response::ok(MetricsText { text })).unwrap();
        answer.push(b'\n');
        let _ = (&stream).write_all(&answer);
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_dwcpctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("metrics")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before anything is read.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    daemon.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_that_never_answers_is_a_timeout_in_words() {
    let (dir, socket, listener) = fake_daemon("silent");
    // Accepts, reads the request, says nothing until the client gives up.
    let daemon = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut request = String::new();
        let mut reader = BufReader::new(&stream);
        reader.read_line(&mut request).unwrap();
        let _ = reader.read_line(&mut request);
    });
    let out = Command::new(env!("CARGO_BIN_EXE_dwcpctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["--timeout", "1", "status"])
        .output()
        .unwrap();
    daemon.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no answer from the daemon within 1 s"),
        "{stderr}"
    );
    assert!(!stderr.contains("os error"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
