//! Shared by the daemon's binary tests: a lab CA and two appliance certificates, made
//! once per test process, so that sessions run authenticated and encrypted as they do
//! in production.

use dwcp_control::certs::{self, Written};
use std::sync::OnceLock;

/// The lab set (appliance-a, appliance-b on loopback).
pub fn lab() -> &'static Written {
    static LAB: OnceLock<Written> = OnceLock::new();
    LAB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dwcp-test-certs-{}", std::process::id()));
        certs::init(&dir, &[]).expect("lab certificates")
    })
}

/// `dwcpd` flags for appliance `which` (0: a, 1: b).
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
