//! Shared by the daemon's binary tests: a lab CA and two appliance certificates, made
//! once per test process, so that sessions run authenticated and encrypted as they do
//! in production.

use dwcp_api::{Command, Request, Response};
use dwcp_control::certs::{self, Written};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// The lab set (appliance-a, appliance-b on loopback).
pub fn lab() -> &'static Written {
    static LAB: OnceLock<Written> = OnceLock::new();
    LAB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dwcp-test-certs-{}", std::process::id()));
        certs::init(&dir, &[]).expect("lab certificates")
    })
}

/// `dwcpd` flags for appliance `which` (0: a, 1: b).
#[allow(dead_code)] // the cluster test configures its members by file
pub fn cert_args(which: usize) -> Vec<String> {
    lab().dwcpd_flags(which)
}

/// `[security]` of a configuration file for appliance `which`.
#[allow(dead_code)]
pub fn security_section(which: usize) -> String {
    let lab = lab();
    let (_, cert, key) = &lab.appliances[which];
    format!(
        "[security]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        lab.ca.display().to_string()
    )
}

/// Send `command` to the daemon behind `socket` and read its answer.
#[allow(dead_code)]
pub fn call(socket: &Path, command: Command) -> Response {
    let mut s = UnixStream::connect(socket).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut line = serde_json::to_vec(&Request::new(command)).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// Wait up to `patience` for the session record at `path` to appear (`who` names the
/// appliance that writes it, for the failure).
#[allow(dead_code)] // not every test binary kills an appliance
pub fn wait_for_record(path: &Path, who: &str, patience: Duration) {
    let deadline = std::time::Instant::now() + patience;
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the {who} never recorded its session"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
