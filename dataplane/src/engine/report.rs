//! What a migration did, for the operator and for scripts (serialises to JSON).

use serde::Serialize;
use std::fmt;

/// One pre-copy round.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundStats {
    /// Round number (0 sends all memory; the last one runs with the guest paused).
    pub round: u64,
    /// Pages sent.
    pub pages: u64,
    /// Of which zero pages (sent as a marker, no payload).
    pub zero_pages: u64,
    /// Bytes of frames sent.
    pub bytes: u64,
    /// Time to hand the round to the kernel, seconds.
    pub seconds: f64,
    /// `bytes / seconds`, bytes per second.
    pub throughput: f64,
    /// Pages the guest dirtied during the round.
    pub dirtied_pages: u64,
    /// Rate the guest dirtied memory during the round, bytes per second.
    pub dirty_rate: f64,
    /// Estimated downtime if the migration stopped after this round, seconds.
    pub estimated_downtime: f64,
    /// Throttle applied to the guest during the round, percent.
    pub throttle: u32,
}

/// How the bytes moved.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TransportReport {
    /// `io_uring` or `plain`.
    pub kind: String,
    /// Whether `SEND_ZC` was used.
    pub zero_copy: bool,
    /// Zero-copy sends the kernel turned into copies (loopback always does).
    pub zero_copy_copied: u64,
    /// Zero-copy sends issued.
    pub zero_copy_sends: u64,
    /// Data streams.
    pub streams: u16,
    /// Worker threads.
    pub workers: usize,
    /// Congestion control.
    pub congestion: String,
    /// io_uring operations found by the probe.
    pub uring_ops: Vec<String>,
    /// Fallbacks and anything that did not apply as configured.
    pub notes: Vec<String>,
}

/// The source's account of a migration.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MigrationReport {
    /// Bytes of guest memory.
    pub memory_bytes: u64,
    /// Pages of guest memory.
    pub pages: u64,
    /// Every round, the final one last.
    pub rounds: Vec<RoundStats>,
    /// Pages sent as zero markers, all rounds.
    pub zero_pages_skipped: u64,
    /// Bytes of frames sent, all rounds.
    pub bytes_sent: u64,
    /// Connecting, the handshake and the destination preparing its memory, seconds
    /// (before round 0; not part of `total_seconds`).
    pub setup_seconds: f64,
    /// Wall time from the first page of round 0 to the verified switchover, seconds.
    pub total_seconds: f64,
    /// Mean throughput over the whole migration, bytes per second.
    pub throughput: f64,
    /// Downtime the engine predicted when it decided to switch over, seconds.
    pub estimated_downtime: f64,
    /// Downtime measured from pausing the guest to the destination's verdict, seconds.
    pub measured_downtime: f64,
    /// Of which: sending the final round.
    pub final_round_seconds: f64,
    /// Of which: computing and exchanging the page CRCs and the verdict.
    pub verify_seconds: f64,
    /// The downtime limit.
    pub downtime_limit: f64,
    /// Pages the destination verified identical.
    pub verified_pages: u64,
    /// Whole-memory CRC32C (both sides agree on it).
    pub digest: String,
    /// Dirty tracker used.
    pub dirty_log: String,
    /// How the bytes moved.
    pub transport: TransportReport,
    /// The highest throttle auto-converge applied, percent.
    pub max_throttle: u32,
    /// SIMD level of the page kernels.
    pub simd: String,
    /// Notes (fallbacks) from setup.
    pub notes: Vec<String>,
    /// What the codec pipeline did, when the session could use it.
    pub codec: Option<super::CodecReport>,
}

/// Codec settings in a few words.
pub fn describe_settings(s: &crate::codec::CodecSettings) -> String {
    if s.is_off() {
        return "codecs off".into();
    }
    let mut parts = Vec::new();
    if s.dedup {
        parts.push("dedup".to_string());
    }
    if s.delta {
        parts.push("delta".to_string());
    }
    if let Some(level) = s.level {
        parts.push(format!(
            "zstd {level}{} on {} KiB batches",
            if s.dictionary { " + dictionary" } else { "" },
            s.batch_bytes >> 10
        ));
    }
    parts.join(", ")
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "live migration of {} MiB ({} pages), dirty log {}, SIMD {}",
            self.memory_bytes >> 20,
            self.pages,
            self.dirty_log,
            self.simd
        )?;
        let t = &self.transport;
        writeln!(
            f,
            "transport: {} with {} streams on {} workers, {}, zero-copy {}{}",
            t.kind,
            t.streams,
            t.workers,
            t.congestion,
            if t.zero_copy { "on" } else { "off" },
            if t.zero_copy && t.zero_copy_copied > 0 {
                format!(
                    " ({} of {} zero-copy sends copied by the kernel)",
                    t.zero_copy_copied, t.zero_copy_sends
                )
            } else {
                String::new()
            }
        )?;
        for n in t.notes.iter().chain(&self.notes) {
            writeln!(f, "  note: {n}")?;
        }
        writeln!(
            f,
            "{:>5} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>9} {:>8}",
            "round",
            "pages",
            "zero",
            "MB sent",
            "seconds",
            "MB/s",
            "dirty MB/s",
            "est. ms",
            "throttle"
        )?;
        for r in &self.rounds {
            writeln!(
                f,
                "{:>5} {:>9} {:>9} {:>10.1} {:>9.3} {:>10.1} {:>10.1} {:>9.1} {:>7}%",
                r.round,
                r.pages,
                r.zero_pages,
                mb(r.bytes as f64),
                r.seconds,
                mb(r.throughput),
                mb(r.dirty_rate),
                r.estimated_downtime * 1e3,
                r.throttle
            )?;
        }
        writeln!(
            f,
            "zero pages skipped: {} ({:.1} MiB not sent)",
            self.zero_pages_skipped,
            (self.zero_pages_skipped * 4096) as f64 / (1 << 20) as f64
        )?;
        writeln!(
            f,
            "total: {:.1} MB in {:.2} s, {:.1} MB/s ({:.2} Gbit/s); guest memory moved at {:.1} MB/s (setup before round 0: {:.2} s)",
            mb(self.bytes_sent as f64),
            self.total_seconds,
            mb(self.throughput),
            self.throughput * 8.0 / 1e9,
            mb(self.memory_bytes as f64 / self.total_seconds),
            self.setup_seconds
        )?;
        if let Some(c) = &self.codec {
            let n = &c.counters;
            writeln!(
                f,
                "codecs ({}): {} raw, {} delta, {} dedup pages; {} batches compressed {:.1} -> {:.1} MB ({} stored), {} setting changes{}",
                c.mode,
                n.raw_pages,
                n.delta_pages,
                n.dedup_pages,
                n.batches,
                mb(n.compress_in as f64),
                mb(n.compress_out as f64),
                n.batches_stored,
                c.changes.len(),
                match c.dictionary_bytes {
                    Some(b) => format!(", dictionary {b} bytes"),
                    None => String::new(),
                }
            )?;
            for change in &c.changes {
                let s = &change.settings;
                writeln!(
                    f,
                    "  at {:.2} s worker {}: {}",
                    change.at,
                    change.worker,
                    describe_settings(s)
                )?;
            }
        }
        writeln!(
            f,
            "downtime: estimated {:.1} ms, measured {:.1} ms (final round {:.1} ms, verification {:.1} ms; limit {:.0} ms)",
            self.estimated_downtime * 1e3,
            self.measured_downtime * 1e3,
            self.final_round_seconds * 1e3,
            self.verify_seconds * 1e3,
            self.downtime_limit * 1e3
        )?;
        write!(
            f,
            "destination verified: {} pages identical (digest {})",
            self.verified_pages, self.digest
        )
    }
}
