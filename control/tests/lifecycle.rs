//! `dwcpd serve` as operators run it: the real binary, driven over its control socket,
//! stopped with SIGTERM while it migrates (to itself, over loopback). A migration that
//! finishes within the drain time completes and is verified; one that would outlast it
//! is cancelled with the source intact; either way the daemon exits cleanly.

mod common;

use dwcp_api::{Command, MigrateOptions, MigrationInfo, Response, SetOptions};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// Longest wait for anything here; the daemon is expected well within it.
const PATIENCE: Duration = Duration::from_secs(60);

struct Served {
    child: Child,
    socket: PathBuf,
    listen: String,
    /// The daemon's stderr, line by line.
    log: Receiver<String>,
    seen: Vec<String>,
}

impl Served {
    /// Start `dwcpd serve` with a drain of `drain_seconds` and a 128 MiB guest.
    fn start(name: &str, drain_seconds: u64) -> Served {
        let dir = std::env::temp_dir().join(format!("dwcp-life-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("dwcpd.sock");
        let config = dir.join("dwcpd.toml");
        std::fs::write(
            &config,
            format!(
                "[dest]\nlisten = \"127.0.0.1:0\"\n\n[control]\nsocket = {socket:?}\ndrain_seconds = {drain_seconds}\n\n{}",
                common::security_section(0)
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dwcpd"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--memory", "128M", "--dirty-rate", "10"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("dwcpd starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  | {line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut served = Served {
            child,
            socket,
            listen: String::new(),
            log,
            seen: Vec::new(),
        };
        let serving = served.wait_for_line("dwcpd: serving");
        served.listen = serving
            .split("migrations on ")
            .nth(1)
            .and_then(|rest| rest.split([',', ' ']).next())
            .expect("the listen address in the serving line")
            .to_string();
        served
    }

    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no {needle:?} from dwcpd; it said: {:#?}", self.seen),
            }
        }
    }

    fn call(&self, command: Command) -> Response {
        common::call(&self.socket, command)
    }

    fn migrations(&self) -> Vec<MigrationInfo> {
        self.call(Command::Migrations).into_result().unwrap()
    }

    /// Start a migration to itself and wait until pages move.
    fn migrate_to_self(&self) {
        self.migrate_to(&self.listen);
    }

    /// Start a migration to `peer` and wait until pages move.
    fn migrate_to(&self, peer: &str) {
        let r = self.call(Command::Migrate(MigrateOptions {
            peer: peer.to_string(),
            ..MigrateOptions::default()
        }));
        assert!(r.ok, "{r:?}");
        let deadline = Instant::now() + PATIENCE;
        while !self
            .migrations()
            .first()
            .is_some_and(|m| m.phase == "precopy" && m.bytes_sent > 0)
        {
            assert!(Instant::now() < deadline, "{:?}", self.migrations());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM; waits for the daemon to exit, checks it exited 0, and returns how long
    /// it took (for the log: the drain bounds it, a hang would be a failure of its own).
    fn terminate(&mut self) -> Duration {
        let t = Instant::now();
        // SAFETY: kill(2) with a valid signal; the pid is our own child's, not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "dwcpd exited with {status}");
        t.elapsed()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_lets_a_migration_finish_within_the_drain() {
    let mut d = Served::start("finish", 60);
    // A cap that makes it last a few seconds, so that SIGTERM lands mid-migration.
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(40_000_000),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    d.migrate_to_self();
    let took = d.terminate();
    eprintln!(
        "SIGTERM mid-migration, drain 60 s: exited after {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    let done = d.wait_for_line("dwcpd: migration 1 to");
    assert!(
        done.contains("completed: ") && done.contains("32768 pages verified"),
        "{done}"
    );
    let received = d.wait_for_line("dwcpd: received a migration");
    assert!(received.contains("32768 pages verified"), "{received}");
    // Both ends name the same last round, the number `migrations` shows.
    let final_round = |line: &str| {
        line.split("final round ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .map(str::to_string)
    };
    assert!(final_round(&done).is_some(), "{done}");
    assert_eq!(
        final_round(&done),
        final_round(&received),
        "{done} / {received}"
    );
    d.wait_for_line("dwcpd: stopped");
    assert!(!d.socket.exists(), "the control socket outlived the daemon");
}

#[test]
fn sigterm_cancels_a_migration_that_outlasts_the_drain() {
    let mut d = Served::start("cancel", 1);
    // 128 MiB at 4 MB/s would take half a minute.
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(4_000_000),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    d.migrate_to_self();
    let took = d.terminate();
    eprintln!(
        "SIGTERM mid-migration, drain 1 s: exited after {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    let done = d.wait_for_line("dwcpd: migration 1 to");
    assert!(
        done.contains("cancelled: ") && done.contains("the daemon is shutting down"),
        "{done}"
    );
    // The daemon's simulated guest goes with the migration thread; nothing runs on.
    assert!(
        done.contains("simulated guest it moved is discarded") && !done.contains("runs on"),
        "{done}"
    );
    let incoming = d.wait_for_line("dwcpd: incoming migration from 127.0.0.1:");
    assert!(incoming.contains("source aborted"), "{incoming}");
    d.wait_for_line("dwcpd: stopped");
    // New work was refused while draining: the socket was closed first.
    assert!(!d.socket.exists(), "the control socket outlived the daemon");
}

#[test]
fn sigterm_on_the_destination_aborts_an_incoming_migration_and_the_source_carries_on() {
    let source = Served::start("src", 60);
    let mut dest = Served::start("dst", 1);
    let r = source.call(Command::Set(SetOptions {
        pacing_rate: Some(4_000_000),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    source.migrate_to(&dest.listen);
    let took = dest.terminate();
    eprintln!(
        "SIGTERM on the destination, drain 1 s: exited after {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    let incoming = dest.wait_for_line("dwcpd: incoming migration from 127.0.0.1:");
    assert!(
        incoming.contains("cancelled at the destination"),
        "{incoming}"
    );
    // The source learns why, keeps its guest, and keeps serving.
    let deadline = Instant::now() + PATIENCE;
    let failed = loop {
        let m = source.migrations().remove(0);
        if m.state != "running" {
            break m;
        }
        assert!(Instant::now() < deadline, "{m:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(failed.state, "failed", "{failed:?}");
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("destination aborted: ") && error.contains("cancelled at the destination"),
        "{error}"
    );
    assert!(source.call(Command::Status).ok);
}

/// `dwcpd serve` with these arguments, expected to refuse to start: its stderr.
fn refused_start(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dwcpd"))
        .arg("serve")
        .args(common::cert_args(0))
        .args(args)
        .output()
        .expect("dwcpd runs");
    assert!(!out.status.success(), "dwcpd started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_failed_start_leaves_no_socket_file_and_creates_no_directory() {
    let dir = std::env::temp_dir().join(format!("dwcp-life-fail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A socket in a directory that does not exist: refused, the directory not made.
    let missing = dir.join("no/such/dir");
    let socket = missing.join("x.sock");
    let err = refused_start(&[
        "--listen",
        "127.0.0.1:0",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!dir.join("no").exists(), "directories were created");
    // The metrics port is taken: the start fails after the socket was made, and the
    // socket file goes with it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socket = dir.join("dwcpd.sock");
    let err = refused_start(&[
        "--listen",
        "127.0.0.1:0",
        "--socket",
        socket.to_str().unwrap(),
        "--metrics-addr",
        &taken.local_addr().unwrap().to_string(),
    ]);
    assert!(err.contains("Address already in use"), "{err}");
    assert!(!socket.exists(), "the socket file outlived a failed start");
    let _ = std::fs::remove_dir_all(&dir);
}
