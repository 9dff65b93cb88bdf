//! The pre-copy migration engine.
//!
//! Source ([`migrate`]): round 0 sends every page; each later round sends the pages
//! dirtied meanwhile. Both sides keep a per-page CRC table as pages move (the source
//! of what it sent, the destination of what it placed; see [`crate::crc_table`]).
//! After each round the [`precopy`] planner estimates what switching over now would
//! cost — the final collection, the final round, the destination's answer — and
//! decides: continue (throttling the guest if rounds stop shrinking, as QEMU's
//! auto-converge), switch over, or give up with the source intact. At the switchover
//! the guest is paused, the last dirty pages go out, and the two sides compare the
//! digests of their tables: nothing in the paused window grows with memory size.
//! With `verify = "audit"` the source then checks its memory against its table (a page
//! a dirty log missed shows there); `verify = "full"` checksums all of memory on both
//! sides inside the paused window instead, as labs may want.
//!
//! Destination ([`receive`]): accepts a session, places pages as they arrive (each
//! checked against its CRC on arrival and recorded in its table), acknowledges
//! rounds, and answers the switchover.
//!
//! The parts, by responsibility:
//! - `handshake`: opening and accepting a session (control stream, data streams,
//!   capabilities, the destination's memory);
//! - `fleet`: the workers of one side, their rings, backlog and telemetry;
//! - [`precopy`]: the planner (sans-IO);
//! - `source`: the source's session: rounds, live changes, the switchover;
//! - `dest`: the destination's session;
//! - [`live`]: settings epochs and reports shared with the slow path;
//! - `steer`: codec steering; `report`: progress and reports;
//! - `resume`: comparing the two sides' CRC tables when a session whose connections
//!   were lost is resumed; `record`: what a destination keeps on disk to resume a
//!   session after it restarts.
//!
//! Guests with device state (a QEMU VM): the hypervisor saves it while the final round
//! is collected, it goes with the final round on the data streams, the destination
//! loads it after a good verdict, and the downtime ends when the destination reports
//! its guest running.
//!
//! One switch exists for tests only: `DWCP_TEST_SKIP_FINAL_ROUND=1` in both appliances'
//! environment makes the source record the final round in its table without sending it
//! (pages lost on the way) and both sides switch over despite the digests then
//! differing, naming the pages in the report. It proves that a guest's own check and
//! the table digest do catch a missing final round. The guest runs on for a second
//! before the pause then, so that the final round holds pages its workload wrote.

mod dest;
mod fleet;
mod gate;
mod handshake;
mod lanes;
pub mod live;
pub mod precopy;
mod record;
mod report;
mod resume;
mod rma;
mod source;
mod steer;

pub use crate::crc_table::AuditReport;
pub use dest::{
    DestConfig, DestMemory, DestReport, IncomingProgress, PROGRESS_INTERVAL, ReceiveProgress,
    receive, receive_cancellable, receive_guest, receive_lane, receive_through, receive_watched,
};
pub use fleet::split_cpus;
pub use gate::Acceptor;
pub use lanes::{Lane, OPENING_LANES, SessionPorts};
pub use live::{Epoch, LiveControl, LiveReport, LiveSettings};
pub use precopy::DowntimeEstimate;
pub use record::{OutgoingRecord, RecordError, SessionRecord};
pub use report::{
    DowntimeMeasured, DowntimeReport, MigrationReport, Progress, RmaReport, RoundStats,
    SecurityReport, SessionResume, StreamLoss, TransportReport, WorkerStatus,
};
pub use rma::RmaAdmission;
pub use source::{SourceConfig, migrate, migrate_live, migrate_with_policy};
pub use steer::{CodecReport, SettingsChange};

use crate::dirty::DirtyLogError;
use crate::wire::WireError;
use std::fmt;
use std::str::FromStr;

/// How the switchover proves the destination holds what the source sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VerifyMode {
    /// Compare the digests of the two CRC tables: O(1) in the paused window.
    #[default]
    Table,
    /// The table digest, then, after the destination was told to resume, the source's
    /// memory against its table (reports pages a dirty log missed).
    Audit,
    /// Checksum all of memory on both sides in the paused window (labs).
    Full,
}

impl VerifyMode {
    /// The name in configuration and reports.
    pub fn name(self) -> &'static str {
        match self {
            VerifyMode::Table => "table",
            VerifyMode::Audit => "audit",
            VerifyMode::Full => "full",
        }
    }
}

impl fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for VerifyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(VerifyMode::Table),
            "audit" => Ok(VerifyMode::Audit),
            "full" => Ok(VerifyMode::Full),
            other => Err(format!(
                "unknown verify mode {other:?} (expected table, audit or full)"
            )),
        }
    }
}

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
    /// This destination refused the source's session (the source was told why).
    #[error("refused the source's session: {0}")]
    RefusedSource(String),
    /// The session could not be authenticated or secured.
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
    /// The peer sent something malformed.
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    /// A stream or worker failed.
    #[error("transport: {0}")]
    Transport(String),
    /// (Destination.) The connection was a source's resume of another session
    /// received here at the same time, and was passed on to that session: no session
    /// of its own, and no failure.
    #[error("a resume of session {0:032x}, passed on to that session")]
    PassedOn(u128),
    /// Every connection to the peer was lost (reset, closed, or timed out by the
    /// kernel); with [`crate::wire::caps::RESUME`] the session may be resumed.
    #[error("connection to the peer lost: {0}")]
    Disconnected(String),
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
    #[error("verification failed: {mismatches} pages differ{}", listed(pages))]
    Verification {
        /// Pages that differ.
        mismatches: u64,
        /// Which (ascending; at most 1024), when known.
        pages: Vec<u64>,
    },
    /// The CRC table digests differ, and the pages could not be named.
    #[error(
        "verification failed: the CRC table digests differ (source {source_digest:016x}, destination {dest_digest:016x})"
    )]
    DigestMismatch {
        /// The source's table digest.
        source_digest: u64,
        /// The destination's.
        dest_digest: u64,
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
    /// The guest (its hypervisor) failed to pause, hand over or load its state.
    #[error("guest: {0}")]
    Guest(String),
}

/// Process-wide counts of lost data streams and what they cost, for metrics.
pub mod counters {
    use std::sync::atomic::{AtomicU64, Ordering};

    static LOST_AT_SOURCE: AtomicU64 = AtomicU64::new(0);
    static LOST_AT_DESTINATION: AtomicU64 = AtomicU64::new(0);
    static REPLACED: AtomicU64 = AtomicU64::new(0);
    static PAGES_REQUEUED: AtomicU64 = AtomicU64::new(0);
    static SESSIONS_RESUMED: AtomicU64 = AtomicU64::new(0);
    static PAGES_RESENT_AFTER_RESUME: AtomicU64 = AtomicU64::new(0);

    /// The counts so far.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct StreamLosses {
        /// Streams given up as source.
        pub lost_at_source: u64,
        /// Streams fenced as destination.
        pub lost_at_destination: u64,
        /// Lost streams a replacement connection carried again (as source).
        pub replaced: u64,
        /// Pages queued again on other streams (as source).
        pub pages_requeued: u64,
        /// Sessions resumed after every connection was lost (as source).
        pub sessions_resumed: u64,
        /// Pages sent again after those resumes, having gone out before (as source).
        pub pages_resent_after_resume: u64,
    }

    // Relaxed throughout: independent counters, read only for reports.
    pub(crate) fn lost(at_source: bool, pages_requeued: u64) {
        let counter = if at_source {
            &LOST_AT_SOURCE
        } else {
            &LOST_AT_DESTINATION
        };
        counter.fetch_add(1, Ordering::Relaxed);
        PAGES_REQUEUED.fetch_add(pages_requeued, Ordering::Relaxed);
    }

    pub(crate) fn replaced() {
        REPLACED.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn resumed(pages_resent: u64) {
        SESSIONS_RESUMED.fetch_add(1, Ordering::Relaxed);
        PAGES_RESENT_AFTER_RESUME.fetch_add(pages_resent, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn stream_losses() -> StreamLosses {
        StreamLosses {
            lost_at_source: LOST_AT_SOURCE.load(Ordering::Relaxed),
            lost_at_destination: LOST_AT_DESTINATION.load(Ordering::Relaxed),
            replaced: REPLACED.load(Ordering::Relaxed),
            pages_requeued: PAGES_REQUEUED.load(Ordering::Relaxed),
            sessions_resumed: SESSIONS_RESUMED.load(Ordering::Relaxed),
            pages_resent_after_resume: PAGES_RESENT_AFTER_RESUME.load(Ordering::Relaxed),
        }
    }
}

/// How a destination's refusal starts when it is busy with another session (or still
/// with the old connections of the session being resumed): a source resuming a
/// session tries again; any other refusal is final.
pub(crate) const BUSY: &str = "busy:";

/// Whether the test-only switch described in the module docs is set.
fn test_skip_final_round() -> bool {
    std::env::var_os("DWCP_TEST_SKIP_FINAL_ROUND").is_some_and(|v| v == "1")
}

/// Under the test-only switch, how long the guest runs on after the last pre-copy
/// round before it is paused.
const TEST_SKIP_FINAL_ROUND_WRITE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// `" (pages 3, 17, ...)"` for an error message.
fn listed(pages: &[u64]) -> String {
    if pages.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = pages.iter().take(8).map(u64::to_string).collect();
    format!(
        " (page{} {}{})",
        if pages.len() == 1 { "" } else { "s" },
        shown.join(", "),
        if pages.len() > 8 { ", ..." } else { "" }
    )
}

/// Most page numbers a verdict lists.
pub(crate) const LISTED_PAGES: usize = 1024;

/// CRC32C of every page of `memory`, and the whole-memory digest (the page CRCs
/// combined in order, equal to the CRC32C of all the bytes). For `verify = "full"`.
///
/// # Safety
/// Nothing may write to `memory` during the call (the guest is paused, or the
/// receivers have finished).
pub(crate) unsafe fn page_crcs(memory: &crate::memory::GuestMemory) -> (Vec<u32>, u32) {
    // SAFETY: forwarded from the caller.
    let bytes = unsafe { memory.as_slice() };
    let kernels = dwcp_simd::Kernels::active();
    let combiner = dwcp_simd::Crc32cCombiner::new(crate::memory::PAGE_SIZE as u64);
    // A memory file's holes are zero pages, and reading one through the shared mapping
    // would fill it with a new page: they are not read.
    let holes = memory.hole_pages();
    let mut digest = 0u32;
    let crcs = bytes
        .chunks_exact(crate::memory::PAGE_SIZE)
        .enumerate()
        .map(|(p, page)| {
            let crc = match &holes {
                Some(h) if h.get(p as u64) => crate::memory::zero_page_crc(),
                _ => kernels.crc32c(page),
            };
            digest = combiner.combine(digest, crc);
            crc
        })
        .collect();
    (crcs, digest)
}

/// The pages where two CRC lists differ (ascending, at most [`LISTED_PAGES`]) and how
/// many there are.
pub(crate) fn differing_pages(ours: &[u32], theirs: &[u32]) -> (u64, Vec<u64>) {
    let mut count = 0u64;
    let mut pages = Vec::new();
    for (page, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if a != b {
            count += 1;
            if pages.len() < LISTED_PAGES {
                pages.push(page as u64);
            }
        }
    }
    (count, pages)
}
