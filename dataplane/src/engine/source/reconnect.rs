//! Resuming the session when every connection to the destination is lost (reset,
//! closed, or given up by the kernel after `resume_grace`), before the switchover.
//!
//! The guest keeps running here throughout. The source stops the session's workers,
//! then reconnects with backoff and jitter for up to `resume_grace`, opening the new
//! control stream with [`ControlMessage::Resume`] of the same session (in an
//! authenticated session, a new TLS session with the same identities; the data streams
//! are bound to it as for a new session). The destination has kept the session's
//! memory and table meanwhile.
//!
//! Before comparing, the source records the current CRC of every page of the round that
//! was interrupted: some were sent, some not (their entries are a previous round's),
//! and some changed since; what the destination must end up holding is their current
//! content. The tables are then compared chunk by chunk (see `engine::resume`), and the
//! round goes on with the pages that differ: the interrupted round's that did not
//! arrive or changed, and any of an unacknowledged earlier round that was lost on the
//! way. Pages the dirty log records from now on follow in the next rounds as usual.
//!
//! Resuming starts new workers and codecs on both sides (codec caches start empty, the
//! dictionary and settings in force are handed to the new workers) and every stream is
//! carrying pages again. A failure inside the paused window is not resumed: the
//! migration ends with the guest running here, as before.

use super::loss::Losses;
use super::{Session, SourceConfig};
use crate::crc_table::{CrcTable, OUT_OF_BAND_SLOT};
use crate::dirty::DirtyBitmap;
use crate::engine::OutgoingRecord;
use crate::engine::fleet::TxFleet;
use crate::engine::handshake::{self, ControlLink, Opened};
use crate::engine::live::LiveControl;
use crate::engine::report::SessionResume;
use crate::engine::{MigrationError, resume};
use crate::memory::GuestMemory;
use crate::memory::PAGE_SIZE;
use crate::transport::{TransportKind, TxSetup};
use crate::wire::caps;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// First wait between connection attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait for one reconnection's TCP handshake.
const RECONNECT_CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

impl Session<'_> {
    /// Round `round` (its pages `round_pages`) failed with `cause`. If every connection
    /// was lost and the destination takes part, resume the session and return the
    /// pages to send to finish the round; else return `cause`.
    pub(super) fn resume_session(
        &mut self,
        round: u64,
        round_pages: &DirtyBitmap,
        cause: MigrationError,
    ) -> Result<DirtyBitmap, MigrationError> {
        if !resume::may_resume(&cause, self.granted) || self.config.resume_grace.is_zero() {
            return Err(cause);
        }
        if let Some(theirs) = self.destination_abort(Duration::from_millis(100)) {
            return Err(MigrationError::Transport(format!(
                "destination aborted: {theirs} (here: {cause})"
            )));
        }
        let lost_at = Instant::now();
        eprintln!(
            "dwcp: {cause} in round {round}; reconnecting for up to {} s to resume the session",
            self.config.resume_grace.as_secs()
        );
        self.stop_connections();
        // The RMA connections went with the rest: the resumed session sends frames.
        if let Some(pool) = &self.rma
            && pool.enabled()
        {
            pool.set_enabled(false);
            self.transport_notes.push(
                "rma: off after the session's connections were lost (resumed with frames)".into(),
            );
        }
        if let Some(live) = self.live {
            live.set_activity(format!(
                "connections lost in round {round} ({cause}); reconnecting to resume"
            ));
        }
        // What the destination must end up holding of this round: its pages now. A
        // page whose entry already says so went out in this round as it is now (the
        // workers record what they send); if it is missing at the destination it was
        // lost in flight, and sending it again is the only waste a resume costs. Read
        // while the path is out; writes from now on are the dirty log's.
        let read_start = Instant::now();
        let kernels = dwcp_simd::Kernels::active();
        let mut page = vec![0u8; PAGE_SIZE];
        let mut sent_as_now = DirtyBitmap::new(round_pages.pages());
        for p in round_pages.iter() {
            self.memory.read_page(p, &mut page);
            let crc = kernels.crc32c(&page);
            if self.table.get(p) == crc {
                sent_as_now.set(p);
            } else {
                self.table.record(p, crc, OUT_OF_BAND_SLOT);
            }
        }
        let read_seconds = read_start.elapsed().as_secs_f64();
        let mut attempts = 0;
        let (opened, comparison, outage_seconds, compare_start) = loop {
            let (mut opened, tried) = self.reopen(lost_at, &cause)?;
            attempts += tried;
            let outage_seconds = lost_at.elapsed().as_secs_f64();
            let compare_start = Instant::now();
            match resume::compare_as_source(&mut opened.control, &self.table, round) {
                Ok(c) => break (opened, c, outage_seconds, compare_start),
                // Lost again while comparing: connect again, within the same grace.
                Err(e) if resume::may_resume(&e, self.granted) => {
                    eprintln!("dwcp: the resume failed while comparing tables: {e}");
                }
                Err(e) => return Err(e),
            }
        };
        let compare_seconds = read_seconds + compare_start.elapsed().as_secs_f64();
        let to_send = comparison.differing_pages;
        // Sent before: as they are now in this round, or in an earlier one.
        let pages_resent = to_send
            .iter()
            .filter(|&p| sent_as_now.get(p) || !round_pages.get(p))
            .count() as u64;
        self.start_connections(opened, round)?;
        let report = SessionResume {
            round,
            cause: cause.to_string(),
            outage_seconds,
            attempts,
            compare_seconds,
            chunks: comparison.chunks,
            differing_chunks: comparison.differing_chunks,
            bytes_exchanged: comparison.bytes_exchanged,
            pages_to_send: to_send.count(),
            pages_resent,
            table_rebuild_seconds: None,
        };
        eprintln!(
            "dwcp: session resumed after {outage_seconds:.2} s ({attempts} attempts): {} of {} \
             chunks differed ({} bytes exchanged); {} pages to send, {} of them sent before",
            report.differing_chunks,
            report.chunks,
            report.bytes_exchanged,
            report.pages_to_send,
            report.pages_resent
        );
        crate::engine::counters::resumed(pages_resent);
        self.resumes.push(report);
        Ok(to_send)
    }

    /// Stop the dead session's workers, replacements and control stream.
    fn stop_connections(&mut self) {
        // Release: pairs with the Acquire of replacements still connecting.
        self.losses.closing.store(true, Ordering::Release);
        self.fleet.shutdown_sockets();
        self.fleet.close();
        self.control.shutdown();
        self.deferred_control.clear();
    }

    /// Connect again until the destination welcomes the resume, for up to
    /// `resume_grace` after `lost_at`.
    fn reopen(
        &mut self,
        lost_at: Instant,
        cause: &MigrationError,
    ) -> Result<(Opened, u32), MigrationError> {
        reopen_session(
            &Peer {
                addr: self.peer,
                session_id: self.session_id,
                memory_bytes: self.memory.len() as u64,
                device_state: self.device_state,
            },
            self.config,
            self.live,
            lost_at + self.config.resume_grace,
            &cause.to_string(),
            self.current_round,
        )
    }

    /// Carry the session on over `opened`, from round `round`: new workers and control
    /// stream, every stream carrying pages again.
    fn start_connections(&mut self, opened: Opened, round: u64) -> Result<(), MigrationError> {
        let kind = self.fleet.kind();
        let zero_copy = kind == TransportKind::IoUring && self.setup.uring_zero_copy;
        let setup = TxSetup {
            memory: self.memory.clone(),
            table: self.table.clone(),
            codec: self.codec.clone(),
            records: opened.keys.clone(),
            // A resumed session sends pages as frames: its RMA connections died with
            // the rest, and are not set up again.
            rma: None,
        };
        self.fleet = TxFleet::spawn(
            kind,
            zero_copy,
            opened.streams,
            setup,
            &self.config.transport,
            self.config.workers,
        )?;
        self.control = ControlLink::new(opened.control, &self.config.transport.socket)?;
        let report = std::mem::take(&mut self.losses.report);
        self.losses = Losses::new(
            opened.accepted & caps::STREAM_LOSS != 0,
            self.config.streams,
            self.config.stream_stall,
            self.peer,
            self.session_id,
        );
        self.losses.report = report;
        self.active_streams = self.config.streams;
        self.pending_streams = None;
        if let Some(live) = self.live {
            live.set_active_streams(self.active_streams);
        }
        // Every round before this one is settled by the comparison.
        self.unacknowledged.clear();
        self.applied_round = round.checked_sub(1);
        self.settings_to_new_workers()?;
        let pacing = self.settings.pacing_rate;
        if pacing.is_some() {
            self.apply_pacing(pacing);
        }
        self.last_activity = Instant::now();
        Ok(())
    }
}

/// Resume the session `record` describes after this appliance restarted: connect
/// until `peer` welcomes the resume, read the guest's memory back into `table` (a full
/// read), compare it with the destination's. Returns the session, the resume's report,
/// and the pages the destination lacks (round `record.round` sends them).
pub(super) fn resume_after_restart(
    record: &OutgoingRecord,
    peer: std::net::SocketAddr,
    memory: &GuestMemory,
    table: &CrcTable,
    device_state: bool,
    config: &SourceConfig,
    live: Option<&LiveControl>,
) -> Result<(Opened, SessionResume, DirtyBitmap), MigrationError> {
    if record.peer != peer
        || record.memory_bytes != memory.len() as u64
        || record.streams != config.streams
    {
        return Err(MigrationError::Config(format!(
            "the recorded session {:032x} went to {} with {} bytes over {} streams; this \
             migration goes to {peer} with {} bytes over {}",
            record.session_id,
            record.peer,
            record.memory_bytes,
            record.streams,
            memory.len(),
            config.streams
        )));
    }
    let started = Instant::now();
    let target = Peer {
        addr: peer,
        session_id: record.session_id,
        memory_bytes: record.memory_bytes,
        device_state,
    };
    let (mut opened, attempts) = reopen_session(
        &target,
        config,
        live,
        started + config.resume_grace,
        "resuming after this appliance restarted",
        record.round,
    )?;
    let outage_seconds = started.elapsed().as_secs_f64();
    let compare_start = Instant::now();
    // What the destination must end up holding: the guest's memory as it is now.
    table.record_memory(memory, crate::crc_table::scan_threads());
    let rebuild_seconds = compare_start.elapsed().as_secs_f64();
    let comparison = resume::compare_as_source(&mut opened.control, table, record.round)?;
    let to_send = comparison.differing_pages;
    let report = SessionResume {
        round: record.round,
        cause: "this appliance restarted".into(),
        outage_seconds,
        attempts,
        compare_seconds: compare_start.elapsed().as_secs_f64(),
        chunks: comparison.chunks,
        differing_chunks: comparison.differing_chunks,
        bytes_exchanged: comparison.bytes_exchanged,
        pages_to_send: to_send.count(),
        // What was in flight when it crashed cannot be told apart from what was never
        // sent; nothing the destination holds is sent again.
        pages_resent: 0,
        table_rebuild_seconds: Some(rebuild_seconds),
    };
    eprintln!(
        "dwcp: session {:032x} resumed after a restart: table read back in {rebuild_seconds:.2} \
         s, {} of {} chunks differed; round {} goes on with {} pages",
        record.session_id,
        report.differing_chunks,
        report.chunks,
        record.round,
        report.pages_to_send
    );
    crate::engine::counters::resumed(0);
    Ok((opened, report, to_send))
}

/// The session a source resumes, and where.
pub(super) struct Peer {
    pub addr: std::net::SocketAddr,
    pub session_id: u128,
    pub memory_bytes: u64,
    pub device_state: bool,
}

/// Connect to `peer` until it welcomes the resume of its session, backing off with
/// jitter, until `deadline`. Returns the session and the attempts it took. `cause`
/// says why in the errors.
pub(super) fn reopen_session(
    peer: &Peer,
    config: &SourceConfig,
    live: Option<&LiveControl>,
    deadline: Instant,
    cause: &str,
    round: u64,
) -> Result<(Opened, u32), MigrationError> {
    let never = AtomicBool::new(false);
    let cancel = live.map_or(&never, |l| l.cancel_flag());
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        if let Some(reason) = live.and_then(|l| l.cancelled()) {
            return Err(MigrationError::Aborted {
                reason: format!("cancelled while reconnecting: {reason}"),
                rounds: round,
            });
        }
        attempts += 1;
        let mut attempt = config.clone();
        // An attempt must not outlast the grace period; and a connect whose SYN was
        // lost (the path still out) is retried by a new attempt within a second or
        // two, not by the kernel's SYN back-off (1, 2, 4 s...) after the path is back.
        let left = deadline.saturating_duration_since(Instant::now());
        attempt.connect_timeout = attempt
            .connect_timeout
            .min(RECONNECT_CONNECT_TIMEOUT)
            .min(left.max(FIRST_BACKOFF));
        attempt.reply_timeout = attempt.reply_timeout.min(left.max(FIRST_BACKOFF));
        let error = match handshake::reopen(
            peer.addr,
            peer.memory_bytes,
            peer.device_state,
            &attempt,
            cancel,
            peer.session_id,
        ) {
            Ok(opened) if opened.accepted & caps::RESUME != 0 => return Ok((opened, attempts)),
            Ok(_) => {
                return Err(MigrationError::Transport(
                    "the destination welcomed the resume without granting it".into(),
                ));
            }
            // Busy: it has not noticed yet that the session's old connections are
            // dead (a destination only receiving may learn it from its next report's
            // reset, after the path is back). Tried again.
            Err(MigrationError::Refused(reason)) if reason.starts_with(crate::engine::BUSY) => {
                MigrationError::Refused(reason)
            }
            // The destination answered: it no longer has the session, or will not
            // give it to this source. Trying again cannot help. (A TLS handshake that
            // fails is tried again: a path that resets connections cuts handshakes
            // too; the identities have not changed.)
            Err(e @ MigrationError::Refused(_)) => {
                return Err(MigrationError::Transport(format!(
                    "{cause}; the session could not be resumed: {e}"
                )));
            }
            Err(e @ MigrationError::Aborted { .. }) => return Err(e),
            Err(e) => e,
        };
        let jitter = backoff.mul_f64(0.5 * jitter_fraction());
        let wait = backoff.mul_f64(0.75) + jitter;
        if Instant::now() + wait >= deadline {
            return Err(MigrationError::Transport(format!(
                "{cause}; no new connection within resume_grace ({} s, {attempts} attempts, \
                 the last: {error}); the guest runs here as before",
                config.resume_grace.as_secs()
            )));
        }
        std::thread::sleep(wait);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A number in [0, 1) that differs between calls and appliances (for backoff jitter).
pub(super) fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let mixed =
        u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id());
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}
