//! The pre-copy migration engine.
//!
//! Source ([`migrate`]): round 0 sends every page; each later round sends the pages
//! dirtied meanwhile. After each round it measures throughput and dirty rate and
//! estimates the downtime of stopping now (remaining dirty bytes over measured
//! bandwidth, plus verification). When the estimate is under the limit it pauses the
//! guest, sends the final dirty set, and exchanges per-page CRCs of the whole memory;
//! the destination checks every page and answers. Downtime is measured from the pause
//! to that answer. If rounds stop shrinking it throttles the guest step by step (20%,
//! then +10% a step, at most 99%, as QEMU's auto-converge); after its round or time
//! limit it aborts and the source keeps running, untouched.
//!
//! Destination ([`receive`]): accepts a session, places pages as they arrive (each
//! checked against its CRC on arrival), acknowledges rounds, and verifies.

mod dest;
pub mod live;
mod report;
mod source;
mod steer;

pub use dest::{DestConfig, DestMemory, DestReport, receive, receive_cancellable};
pub use live::{Epoch, LiveControl, LiveReport, LiveSettings};
pub use report::{MigrationReport, RoundStats, TransportReport};
pub use source::{
    Progress, SourceConfig, WorkerStatus, migrate, migrate_live, migrate_with_policy,
};
pub use steer::{CodecReport, SettingsChange};

use crate::dirty::DirtyLogError;
use crate::wire::WireError;

/// Why a migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Could not reach the peer.
    #[error("connecting to {peer}: {source}")]
    Connect {
        /// The peer's address.
        peer: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer refused the session.
    #[error("peer refused the session: {0}")]
    Refused(String),
    /// The peer sent something malformed.
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    /// A stream or worker failed.
    #[error("transport: {0}")]
    Transport(String),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] DirtyLogError),
    /// The migration stopped before switching over; the source is intact.
    #[error("aborted after {rounds} rounds: {reason}")]
    Aborted {
        /// Why.
        reason: String,
        /// Rounds completed.
        rounds: u64,
    },
    /// The destination's memory differs from the source's.
    #[error("verification failed: {mismatches} pages differ (first: page {first:?})")]
    Verification {
        /// Pages that differ.
        mismatches: u64,
        /// The first of them.
        first: Option<u64>,
    },
    /// A local I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A setting that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// CRC32C of every page of `memory`, and the whole-memory digest (the page CRCs
/// combined in order, equal to the CRC32C of all the bytes).
///
/// # Safety
/// Nothing may write to `memory` during the call (the guest is paused, or the
/// receivers have finished).
pub(crate) unsafe fn page_crcs(memory: &crate::memory::GuestMemory) -> (Vec<u32>, u32) {
    // SAFETY: forwarded from the caller.
    let bytes = unsafe { memory.as_slice() };
    let kernels = dwcp_simd::Kernels::active();
    let combiner = dwcp_simd::Crc32cCombiner::new(crate::memory::PAGE_SIZE as u64);
    let mut digest = 0u32;
    let crcs = bytes
        .chunks_exact(crate::memory::PAGE_SIZE)
        .map(|page| {
            let crc = kernels.crc32c(page);
            digest = combiner.combine(digest, crc);
            crc
        })
        .collect();
    (crcs, digest)
}

/// CPUs to pin workers to, in order: the configured set, or every CPU.
pub(crate) fn worker_cpus(config: &crate::transport::TransportConfig) -> Vec<usize> {
    if !config.cpus.is_empty() {
        return config.cpus.clone();
    }
    dwcp_hugepages::numa::topology()
        .map(|t| t.nodes.into_iter().flat_map(|n| n.cpus).collect())
        .unwrap_or_default()
}

/// Split this machine's CPUs between a source and a destination running side by side
/// (the demo, tests, benchmarks): the first half for one, the rest for the other.
pub fn split_cpus() -> (Vec<usize>, Vec<usize>) {
    let all: Vec<usize> = dwcp_hugepages::numa::topology()
        .map(|t| t.nodes.into_iter().flat_map(|n| n.cpus).collect())
        .unwrap_or_default();
    if all.len() < 2 {
        return (all.clone(), all);
    }
    let (a, b) = all.split_at(all.len() / 2);
    (a.to_vec(), b.to_vec())
}
