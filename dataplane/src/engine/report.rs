//! What a migration did, for the operator and for scripts (serialises to JSON), and
//! what it is doing while it runs ([`Progress`]).

use super::precopy::DowntimeEstimate;
use crate::crc_table::AuditReport;
use crate::transport::{StreamTelemetry, TransportKind, WorkerTelemetry};
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// A snapshot of a running migration, for live progress displays.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Current round.
    pub round: u64,
    /// `setup`, `precopy`, `settle` (the last pre-copy round awaits its
    /// acknowledgement before the guest pauses), `switchover`, `verify` or `audit`.
    pub phase: &'static str,
    /// Bytes of frames sent so far.
    pub bytes_sent: u64,
    /// Pages sent so far (all rounds).
    pub pages_sent: u64,
    /// Pages of guest memory.
    pub memory_pages: u64,
    /// Rounds completely sent (and their dirty pages collected).
    pub rounds_done: u64,
    /// Pages in the current round's dirty set.
    pub round_pages: u64,
    /// Pages of the current round already handed to workers.
    pub round_pages_queued: u64,
    /// Pages of the current round the workers have staged for the wire (at most
    /// `round_pages_queued`; the workers may hold much of a round queued).
    pub round_pages_sent: u64,
    /// Last measured dirty rate, bytes per second.
    pub dirty_rate: f64,
    /// Measured bandwidth, bytes per second (0 until a round has been sent).
    pub bandwidth: f64,
    /// Current throttle, percent.
    pub throttle: u32,
    /// Time since the start.
    pub elapsed: Duration,
    /// Latest counters per stream.
    pub streams: Vec<StreamTelemetry>,
    /// Latest counters per worker, with the commands queued to it.
    pub workers: Vec<WorkerStatus>,
    /// Streams the session opened.
    pub connected_streams: u16,
    /// Streams carrying pages now.
    pub active_streams: u16,
    /// The live-settings epoch in force (0 without live control).
    pub epoch: u64,
    /// The workers' transport now (live control may switch it).
    pub transport: TransportKind,
    /// Latest round trip of a ping on the control stream.
    pub ping_rtt: Option<Duration>,
    /// The downtime switching over now would cost, as last estimated.
    pub estimated_downtime: Option<Duration>,
}

impl Progress {
    /// Bytes the streams have handed to the kernel so far: their counters run ahead
    /// of the per-round totals while a round is in flight.
    pub fn stream_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes).sum()
    }
}

/// What the downtime estimate of a guest with device state (a QEMU VM) leaves out:
/// the planner prices the pages, the collection and the verdict, but has no figure for
/// the guest's own part until one of its switchovers has been measured.
const UNPRICED_DEVICE_STATE: &str =
    " (without the guest's own stop, device state and load, which are not priced)";

/// A worker's latest counters and the fill of its command ring.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerStatus {
    /// The worker's own counters (codec, staging, CPU time).
    pub telemetry: WorkerTelemetry,
    /// Commands queued to it and not yet taken.
    pub queued_commands: usize,
}

/// The paused window as it happened, part by part, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DowntimeMeasured {
    /// Pausing the guest.
    pub pause: f64,
    /// The final dirty-log collection.
    pub collect: f64,
    /// Handing the final round to the kernel.
    pub send: f64,
    /// From there to the destination's verdict reaching this appliance (the table
    /// digest exchange), less `way_back`.
    pub confirm: f64,
    /// For a guest the destination resumes itself: the way back of its word that the
    /// guest runs (half the round trip measured at the pause), which came after the
    /// downtime ended and is left out of `confirm` and `total`.
    pub way_back: f64,
    /// From the destination's last word (its verdict, or that its guest runs) reaching
    /// this appliance (its control reader) to the session acting on it, after the
    /// downtime ended and not in `total`: this host's scheduling (a session thread that
    /// yielded its CPU to a busy thread waits for that one, however idle the others).
    pub answer_lag: f64,
    /// Checking all of memory (full verification only; within `confirm` for the
    /// destination's share).
    pub verify: f64,
    /// From the verdict to the destination's guest running: the device state handed
    /// over and loaded (guests with device state only).
    pub device_state: f64,
    /// Pause to the verdict reaching this appliance, or to the destination's guest
    /// running for guests with device state (the source hears of it `way_back` later).
    pub total: f64,
    /// Page faults this process took from the final collection to the verdict (the
    /// destination's too when both run in one process, as in the demo): memory touched
    /// for the first time in the paused window, each a fault that can cost a host's
    /// fault on a VM that hands free memory back.
    pub page_faults: u64,
}

/// What the paused window was predicted to cost and what it cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DowntimeReport {
    /// The limit the switchover was planned against, seconds.
    pub limit: f64,
    /// The planner's estimate when it decided to switch over.
    pub estimated: DowntimeEstimate,
    /// What was measured.
    pub measured: DowntimeMeasured,
}

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
    /// How the session was secured: `None` for a plain (`--insecure`) session.
    pub security: Option<SecurityReport>,
    /// Data streams lost on the way; their pages went to the others.
    pub streams_lost: Vec<StreamLoss>,
    /// Pages written by RMA, in a session that did ([`crate::wire::caps::RMA`]).
    pub rma: Option<RmaReport>,
}

/// What went by RMA write in a session.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RmaReport {
    /// The libfabric provider (`verbs`, `tcp`, ...).
    pub provider: String,
    /// Its fabric and domain.
    pub fabric: String,
    /// Its domain (a NIC, or an interface for `tcp`).
    pub domain: String,
    /// Whether the provider moves bytes over sockets (`tcp`): RMA semantics without
    /// RDMA hardware.
    pub socket_based: bool,
    /// Pages written by RMA.
    pub pages: u64,
    /// RMA writes issued (one per run of non-zero pages).
    pub writes: u64,
    /// Time the workers waited for writes to be delivered, seconds (all workers).
    pub delivery_wait_seconds: f64,
    /// Pages whose content arrived wrong (or changed under the write) and were sent
    /// again.
    pub pages_resent: u64,
}

/// A data stream the session lost, and what it cost.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamLoss {
    /// The stream.
    pub stream: u16,
    /// The round it was lost in.
    pub round: u64,
    /// What happened (a failed send, no progress, what the destination saw).
    pub reason: String,
    /// From the last progress the stream made to its loss being noticed, seconds (a
    /// stall's wait; about 0 for a failed send).
    pub detect_seconds: f64,
    /// From then until its pages were queued on the other streams (the destination
    /// fencing it), seconds.
    pub fence_seconds: f64,
    /// Pages queued again on the other streams.
    pub pages_requeued: u64,
    /// The round from which a replacement connection carried the stream again, if one
    /// did.
    pub restored_from_round: Option<u64>,
}

/// A session whose connections were all lost and that was resumed (see `resume`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionResume {
    /// The round that was interrupted (and sent on after the comparison).
    pub round: u64,
    /// What ended the connections.
    pub cause: String,
    /// From the loss to a new session welcomed, seconds.
    pub outage_seconds: f64,
    /// Connection attempts it took.
    pub attempts: u32,
    /// Comparing the CRC tables (the source's reads of the interrupted round's pages
    /// included), seconds.
    pub compare_seconds: f64,
    /// Chunks compared.
    pub chunks: u64,
    /// Chunks whose digests differed.
    pub differing_chunks: u64,
    /// Digest and entry bytes the comparison exchanged, both ways.
    pub bytes_exchanged: u64,
    /// Pages the comparison found missing or stale at the destination (sent next).
    pub pages_to_send: u64,
    /// Of those, pages that had gone out before the loss as they are now, and were
    /// lost in flight: sent twice.
    pub pages_resent: u64,
    /// After this appliance restarted: reading the guest's memory back into the CRC
    /// table (part of `compare_seconds`), seconds.
    pub table_rebuild_seconds: Option<f64>,
}

/// How an authenticated session was secured.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SecurityReport {
    /// Who the peer's certificate says it is (pinned names it matched, or its DNS
    /// names).
    pub peer: String,
    /// The control stream's TLS cipher suite.
    pub tls: String,
    /// How the data streams' records are sealed.
    pub records: String,
}

impl SecurityReport {
    /// One line for reports and logs.
    pub fn describe(security: Option<&SecurityReport>) -> String {
        match security {
            Some(s) => format!(
                "TLS 1.3 ({}) with {}, data streams sealed ({})",
                s.tls, s.peer, s.records
            ),
            None => "plain: not authenticated, not encrypted (--insecure)".into(),
        }
    }
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
    /// Of which: the final round (collecting the last dirty pages and sending them).
    pub final_round_seconds: f64,
    /// Of which: from the final round in the kernel to the destination's verdict.
    pub verify_seconds: f64,
    /// The downtime limit.
    pub downtime_limit: f64,
    /// The paused window part by part, estimated and measured.
    pub downtime: DowntimeReport,
    /// Why the planner switched over when it did.
    pub switchover_reason: String,
    /// How the switchover was verified: `table`, `audit` or `full`.
    pub verify: String,
    /// Pages the destination verified: covered by the table digest (`table`,
    /// `audit`), or compared one by one (`full`).
    pub verified_pages: u64,
    /// The digest both sides agree on: of the CRC tables, or of all of memory
    /// (`full`).
    pub digest: String,
    /// The post-switchover audit of the source's memory against its table
    /// (`verify = "audit"`): pages a dirty log missed would show here.
    pub audit: Option<AuditReport>,
    /// Dirty tracker used.
    pub dirty_log: String,
    /// How fast the tracker's memory scans went (trackers that scan memory: rescan).
    pub dirty_scan: Option<crate::dirty::ScanStats>,
    /// How the bytes moved.
    pub transport: TransportReport,
    /// Bytes of device state handed over after the verdict (0 for guests without).
    pub device_state_bytes: u64,
    /// The highest throttle auto-converge applied, percent.
    pub max_throttle: u32,
    /// SIMD level of the page kernels.
    pub simd: String,
    /// Notes (fallbacks) from setup.
    pub notes: Vec<String>,
    /// What the codec pipeline did, when the session could use it.
    pub codec: Option<super::CodecReport>,
    /// Every time the session's connections were all lost and it was resumed.
    pub resumes: Vec<SessionResume>,
}

impl TransportReport {
    /// Pages queued again on other streams after streams were lost, all losses.
    pub fn pages_requeued(&self) -> u64 {
        self.streams_lost.iter().map(|l| l.pages_requeued).sum()
    }
}

impl MigrationReport {
    /// Bytes sent again after resumes (pages that had gone out before a loss) over
    /// the memory's size.
    pub fn resent_fraction(&self) -> f64 {
        let pages: u64 = self.resumes.iter().map(|r| r.pages_resent).sum();
        pages as f64 / self.pages.max(1) as f64
    }
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
        if let Some(rma) = &t.rma {
            writeln!(
                f,
                "rma: {} pages in {} writes through libfabric's {} provider ({}{}), {:.3} s waiting \
                 for delivery, {} pages sent again",
                rma.pages,
                rma.writes,
                rma.provider,
                rma.domain,
                if rma.socket_based {
                    ": RMA over sockets, no RDMA hardware"
                } else {
                    ""
                },
                rma.delivery_wait_seconds,
                rma.pages_resent
            )?;
        }
        writeln!(
            f,
            "session: {}",
            SecurityReport::describe(t.security.as_ref())
        )?;
        for n in t.notes.iter().chain(&self.notes) {
            writeln!(f, "  note: {n}")?;
        }
        for l in &t.streams_lost {
            writeln!(
                f,
                "  stream {} lost in round {}: {}; noticed after {:.2} s, its {} pages on the other streams {:.3} s later; {}",
                l.stream,
                l.round,
                l.reason,
                l.detect_seconds,
                l.pages_requeued,
                l.fence_seconds,
                match l.restored_from_round {
                    Some(r) => format!("replaced from round {r}"),
                    None => "not replaced".into(),
                }
            )?;
        }
        for r in &self.resumes {
            writeln!(
                f,
                "  connections lost in round {} ({}); resumed after {:.2} s and {} attempt{}: \
                 tables compared in {:.3} s ({} of {} chunks differed, {} bytes exchanged), \
                 {} pages to send, {} of them sent before",
                r.round,
                r.cause,
                r.outage_seconds,
                r.attempts,
                if r.attempts == 1 { "" } else { "s" },
                r.compare_seconds,
                r.differing_chunks,
                r.chunks,
                r.bytes_exchanged,
                r.pages_to_send,
                r.pages_resent
            )?;
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
        let d = &self.downtime;
        writeln!(
            f,
            "downtime: estimated {:.1} ms{}, measured {:.1} ms (limit {:.0} ms; {})",
            self.estimated_downtime * 1e3,
            if self.device_state_bytes > 0 {
                UNPRICED_DEVICE_STATE
            } else {
                ""
            },
            self.measured_downtime * 1e3,
            self.downtime_limit * 1e3,
            self.switchover_reason
        )?;
        writeln!(
            f,
            "  paused window, estimated / measured ms: collect {:.1} / {:.1}, send {} pages {:.1}{} / {:.1}, confirm {:.1} / {:.1}{}; pause {:.2}; {} page faults; the answer then waited {:.2} here",
            d.estimated.collect * 1e3,
            d.measured.collect * 1e3,
            d.estimated.pages,
            d.estimated.send * 1e3,
            if d.estimated.path_rate > 0.0 {
                format!(
                    " (path forecast {:.0} Mbit/s)",
                    d.estimated.path_rate * 8e-6
                )
            } else {
                String::new()
            },
            d.measured.send * 1e3,
            d.estimated.confirm * 1e3,
            d.measured.confirm * 1e3,
            if self.verify == "full" {
                format!(
                    ", verify {:.1} / {:.1}",
                    d.estimated.verify * 1e3,
                    d.measured.verify * 1e3
                )
            } else {
                String::new()
            },
            d.measured.pause * 1e3,
            d.measured.page_faults,
            d.measured.answer_lag * 1e3,
        )?;
        if let Some(scan) = &self.dirty_scan {
            writeln!(
                f,
                "  dirty log scans: {}, the last {:.1} ms ({:.1} GB/s on {} threads)",
                scan.scans,
                scan.last_seconds * 1e3,
                scan.last_bytes_per_second / 1e9,
                scan.threads
            )?;
        }
        if self.device_state_bytes > 0 {
            writeln!(
                f,
                "  device state: {:.1} KiB handed over; the guest ran at the destination {:.1} ms after the verdict",
                self.device_state_bytes as f64 / 1024.0,
                d.measured.device_state * 1e3
            )?;
        }
        let how = match self.verify.as_str() {
            "full" => "compared page by page",
            _ => "CRC tables agree",
        };
        write!(
            f,
            "destination verified: {} pages, {how} (digest {}; verify = {})",
            self.verified_pages, self.digest, self.verify
        )?;
        if let Some(a) = &self.audit {
            write!(
                f,
                "\naudit after the switchover: {} pages checked in {:.0} ms ({:.1} GB/s on {} threads): ",
                a.pages_checked,
                a.seconds * 1e3,
                a.bytes_per_second / 1e9,
                a.threads
            )?;
            if a.mismatched == 0 {
                write!(f, "every page matches what was sent")?;
            } else {
                write!(
                    f,
                    "{} PAGES DIFFER from what was sent (the dirty log missed writes; the destination holds stale copies): {:?}{}",
                    a.mismatched,
                    &a.pages[..a.pages.len().min(32)],
                    if a.pages.len() > 32 { " ..." } else { "" }
                )?;
            }
        }
        Ok(())
    }
}
