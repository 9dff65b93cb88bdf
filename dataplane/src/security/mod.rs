//! Authenticated, encrypted sessions between appliances.
//!
//! - [`tls`]: the control stream runs TLS 1.3 with mutual authentication (rustls,
//!   aws-lc-rs): both appliances present certificates of the site's CA, optionally
//!   pinned to names; the handshake has a deadline and stops at a cancel.
//! - [`records`]: every data stream is bound to its session (its hello carries a value
//!   only the two ends of the TLS session can compute) and carries sealed records
//!   (AES-256-GCM, keys from the TLS exporter, one key and nonce sequence per stream and
//!   direction), sealed in place in the send buffers after compression and opened in
//!   place before parsing.
//!
//! docs/security.md has the threat model and the key schedule.

pub mod records;
pub mod tls;

pub use records::{RecordError, SessionKeys};
pub use tls::{Identity, SecurityFiles, TlsChannel};

use std::path::PathBuf;

/// Why a session could not be secured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityError {
    /// A certificate or key file could not be used.
    #[error("{what} {}: {reason}", path.display())]
    File {
        /// Which file.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate and key do not go together (or the key is unusable).
    #[error("certificate {} and key {}: {reason}", cert.display(), key.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The handshake failed.
    #[error("TLS handshake: {0}")]
    Handshake(String),
    /// The peer authenticated but is not one of the pinned appliances.
    #[error(
        "the peer's certificate (for {presented}) is valid for none of the pinned appliance \
         names ({pinned})"
    )]
    NotPinned {
        /// Names the peer's certificate carries.
        presented: String,
        /// Names this appliance accepts.
        pinned: String,
    },
    /// Cancelled while handshaking.
    #[error("cancelled during the TLS handshake")]
    Cancelled,
}

/// Outcomes counted for metrics, process-wide (every session of this appliance adds
/// to them; the daemon's metrics endpoint reads them).
pub mod counters {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// TLS handshake outcomes, by label.
    pub const HANDSHAKE_RESULTS: [&str; 8] = [
        "ok",
        "no_certificate",
        "unknown_ca",
        "expired",
        "not_pinned",
        "timeout",
        "not_tls",
        "other",
    ];
    /// Why records (or data streams' bindings) were rejected, by label.
    pub const RECORD_REASONS: [&str; 5] = [
        "authentication",
        "out_of_order",
        "truncated",
        "bad_length",
        "binding",
    ];

    static HANDSHAKES: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    static RECORDS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

    fn bump(counters: &[AtomicU64], labels: &[&str], label: &str) {
        let i = labels
            .iter()
            .position(|l| *l == label)
            .unwrap_or(labels.len() - 1);
        // Relaxed: independent counters, read only for reports.
        counters[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Count a handshake outcome (one of [`HANDSHAKE_RESULTS`]).
    pub fn handshake(result: &str) {
        bump(&HANDSHAKES, &HANDSHAKE_RESULTS, result);
    }

    /// Count a rejected record or binding (one of [`RECORD_REASONS`]).
    pub fn record_rejected(reason: &str) {
        bump(&RECORDS, &RECORD_REASONS, reason);
    }

    /// Handshakes so far, by outcome.
    pub fn handshakes() -> Vec<(&'static str, u64)> {
        HANDSHAKE_RESULTS
            .iter()
            .zip(&HANDSHAKES)
            .map(|(l, c)| (*l, c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Rejections so far, by reason.
    pub fn records_rejected() -> Vec<(&'static str, u64)> {
        RECORD_REASONS
            .iter()
            .zip(&RECORDS)
            .map(|(l, c)| (*l, c.load(Ordering::Relaxed)))
            .collect()
    }
}
