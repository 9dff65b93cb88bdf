//! The paused window and what follows it.
//!
//! Pause the guest; collect the last dirty pages; send them as the final round; when
//! the final round is in the kernel every page the source sent is in its CRC table,
//! so send the table's digest (or, for `verify = "full"`, the CRC of every page of the
//! paused memory) and wait for the destination's verdict. The destination resumes the
//! guest on a good verdict, so the downtime ends there (for a guest with device state,
//! when the destination runs it: half a round trip before the source hears so). With
//! `verify = "audit"` the still-paused source then checks its memory against its
//! table: a page the dirty log missed differs from what was sent, and is named in the
//! report.
//!
//! Anything that fails before the verdict resumes the guest here: the source is
//! intact until the destination has verified everything.

use super::Session;
use crate::crc_table::{AuditReport, scan_threads};
use crate::dirty::{DirtyBitmap, DirtyLog};
use crate::engine::report::{DowntimeMeasured, Progress, RoundStats};
use crate::engine::{
    MigrationError, TEST_SKIP_FINAL_ROUND_WRITE_WINDOW, VerifyMode, differing_pages, page_crcs,
    test_skip_final_round,
};
use crate::guest::{DeviceStateSource, GuestControl};
use crate::transport::{TxCommand, socket};
use crate::wire::{self, ControlMessage};
use std::time::{Duration, Instant};

/// CRCs per [`ControlMessage::PageCrcs`] message.
const CRCS_PER_MESSAGE: usize = 1 << 16;
/// Longest wait for the round trip measured before pausing.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// What the switchover produced.
pub(super) struct Outcome {
    /// The final round, for the report.
    pub round: RoundStats,
    /// The paused window, part by part.
    pub measured: DowntimeMeasured,
    /// When the verdict arrived.
    pub verdict_at: Instant,
    /// Pages the verdict covers.
    pub verified_pages: u64,
    /// The digest both sides agree on.
    pub digest: String,
    /// The audit, with `verify = "audit"`.
    pub audit: Option<AuditReport>,
    /// Device state handed over after the verdict, bytes.
    pub device_state_bytes: u64,
}

/// What the source expects the destination to confirm.
enum Expect {
    /// Its table digest equals ours.
    Table { digest: u64 },
    /// Its memory matches our page CRCs.
    Full { digest: u32 },
}

impl Session<'_> {
    /// Pause the guest and finish the migration (round `round` is the final one).
    pub(super) fn switchover(
        &mut self,
        guest: &dyn GuestControl,
        dirty_log: &mut dyn DirtyLog,
        final_set: DirtyBitmap,
        round: u64,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Outcome, MigrationError> {
        // The last pre-copy round is settled (see `run`).
        if test_skip_final_round() {
            // Test-only: the guest runs on a moment, so that the final round left out
            // holds a second of its writes, not only the few pages written while the
            // last round settled.
            std::thread::sleep(TEST_SKIP_FINAL_ROUND_WRITE_WINDOW);
        }
        self.losses.paused = true;
        let paused_at = Instant::now();
        let stopped_at = match guest.pause() {
            Ok(stopped) => stopped.unwrap_or(paused_at),
            Err(e) => {
                guest.resume();
                return Err(MigrationError::Guest(format!("pausing the guest: {e}")));
            }
        };
        let pause = Instant::now().duration_since(paused_at).as_secs_f64();
        let device = guest.device_state();
        if let Some(device) = device
            && let Err(e) = device.release()
        {
            guest.resume();
            return Err(MigrationError::Guest(format!(
                "letting the hypervisor save the device state: {e}"
            )));
        }
        let mut outcome = match self.paused_window(dirty_log, final_set, round, device, progress) {
            Ok(outcome) => outcome,
            Err(e) => {
                // The hypervisor may have let go of the guest already: taking it back
                // is the guest's to do (QEMU: `cont` after a completed migration).
                guest.resume();
                return Err(e);
            }
        };
        outcome.measured.pause = pause;
        outcome.measured.total = outcome
            .verdict_at
            .saturating_duration_since(stopped_at)
            .as_secs_f64();
        // The destination ran the guest before its word of that came back: the way
        // back (half the round trip measured as the guest paused) is not downtime.
        if device.is_some()
            && let Some(rtt) = self.pings.rtt
        {
            let measured = &mut outcome.measured;
            let way_back = (rtt.as_secs_f64() / 2.0)
                .min(measured.confirm / 2.0)
                .max(0.0);
            measured.way_back = way_back;
            measured.confirm -= way_back;
            measured.total -= way_back;
        }
        guest.set_throttle(0);
        if self.config.verify == VerifyMode::Audit {
            self.current_round = round;
            self.report_progress("audit", progress);
            outcome.audit = Some(self.table.audit(&self.memory, scan_threads()));
        }
        Ok(outcome)
    }

    /// The guest is paused: send the last dirty pages, prove the destination holds
    /// what was sent, and wait for its verdict.
    fn paused_window(
        &mut self,
        dirty_log: &mut dyn DirtyLog,
        mut final_set: DirtyBitmap,
        round: u64,
        device: Option<&dyn DeviceStateSource>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Outcome, MigrationError> {
        let t0 = Instant::now();
        let faults_before = process_page_faults();
        // SAFETY: the guest is paused (the caller paused it and waits for us), so
        // nothing writes its memory while the dirty log reads it.
        unsafe { dirty_log.collect_paused(&mut final_set)? };
        let collect = t0.elapsed().as_secs_f64();
        self.current_round = round;
        self.totals.round_pages = final_set.count();
        self.totals.start_round();
        self.report_progress("switchover", progress);
        // Nothing may overtake the verdict now.
        self.pings.on = false;
        let t1 = Instant::now();
        let (sent, _) = if test_skip_final_round() {
            // Test-only (see the engine docs): the pages "leave" but never arrive.
            let mut page = vec![0u8; crate::memory::PAGE_SIZE];
            for p in final_set.iter() {
                self.memory.read_page(p, &mut page);
                self.table.record(
                    p,
                    dwcp_simd::crc32c(&page),
                    crate::crc_table::OUT_OF_BAND_SLOT,
                );
            }
            self.live_notes.push(format!(
                "TEST SWITCH DWCP_TEST_SKIP_FINAL_ROUND: the final round's {} pages were not sent",
                final_set.count()
            ));
            (0, None)
        } else {
            self.push_pages(&final_set, false, &mut |_| {})?
        };
        // The device state goes with the final round, on the data streams (their
        // congestion windows are open; the control stream's never grew), before the
        // streams end. The destination loads it after its verdict.
        let device_state_bytes = match device {
            Some(device) => self.stream_device_state(device)?,
            None => 0,
        };
        let totals = self.close_round(round, true, &mut |_| {})?;
        let send = t1.elapsed().as_secs_f64();
        self.totals.add_round(sent, totals.bytes, send);
        self.control
            .send(&ControlMessage::Switchover { final_round: round })?;
        // Every worker reported the final round sent, so every page it staged is in
        // the table (recorded before the report, which the event ring orders).
        let t2 = Instant::now();
        let pages = self.memory.pages();
        let expect = match self.config.verify {
            VerifyMode::Table | VerifyMode::Audit => {
                let digest = self.table.digest();
                self.control
                    .send(&ControlMessage::TableDigest { pages, digest })?;
                Expect::Table { digest }
            }
            VerifyMode::Full => {
                // SAFETY: the guest is paused (the caller paused it and waits for us),
                // so nothing writes the memory while it is checksummed.
                let (crcs, digest) = unsafe { page_crcs(&self.memory) };
                for (i, chunk) in crcs.chunks(CRCS_PER_MESSAGE).enumerate() {
                    self.control.send(&ControlMessage::PageCrcs {
                        first_page: (i * CRCS_PER_MESSAGE) as u64,
                        crcs: chunk.to_vec(),
                    })?;
                }
                self.control
                    .send(&ControlMessage::Digest { pages, digest })?;
                Expect::Full { digest }
            }
        };
        let verify = match self.config.verify {
            VerifyMode::Full => t2.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        if device.is_some() {
            self.control.send(&ControlMessage::DeviceStateEnd {
                bytes: device_state_bytes,
            })?;
        }
        self.report_progress("verify", progress);
        let (verified_pages, digest) = self.await_verdict(&expect)?;
        // The downtime ends when the destination's last word reaches this appliance
        // (its control reader), not when this thread gets round to it: nothing waits
        // on that, and the planner's estimate, priced by round trips timed to arrival,
        // leaves it out too. The difference is reported as `answer_lag`.
        let (mut verdict_at, mut answer_lag) = self.last_word_arrival();
        let mut device_state = 0.0;
        if device.is_some() {
            self.report_progress("device state", progress);
            self.await_guest_running()?;
            let (running_at, lag) = self.last_word_arrival();
            device_state = running_at
                .saturating_duration_since(verdict_at)
                .as_secs_f64();
            (verdict_at, answer_lag) = (running_at, lag);
        }
        let confirm = verdict_at.saturating_duration_since(t2).as_secs_f64() - verify;
        let page_faults = process_page_faults().saturating_sub(faults_before);
        // The destination runs the guest now. The workers' last counters (codec and
        // zero-copy figures for the report) come with their end, just after.
        self.last_activity = Instant::now();
        while !self.fleet.all_finished() {
            self.pump_workers()?;
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(Outcome {
            round: RoundStats {
                round,
                pages: sent,
                zero_pages: totals.zero_pages,
                bytes: totals.bytes,
                seconds: send,
                throughput: totals.bytes as f64 / send.max(1e-9),
                dirtied_pages: 0,
                dirty_rate: 0.0,
                estimated_downtime: 0.0,
                throttle: self.totals.throttle,
            },
            measured: DowntimeMeasured {
                pause: 0.0,
                collect,
                send,
                confirm,
                way_back: 0.0,
                answer_lag,
                verify,
                device_state,
                total: 0.0,
                page_faults,
            },
            verdict_at,
            verified_pages,
            digest,
            audit: None,
            device_state_bytes,
        })
    }

    /// When the message just taken from the control stream reached this appliance,
    /// and how long it then waited for this thread, in seconds.
    fn last_word_arrival(&self) -> (Instant, f64) {
        let seen = Instant::now();
        let arrived = self.control.arrived().unwrap_or(seen);
        (
            arrived,
            seen.saturating_duration_since(arrived).as_secs_f64(),
        )
    }

    /// Queue the paused guest's device state on the data streams, in pieces that go
    /// round the streams carrying pages (the destination holds them until its verdict).
    /// Returns the bytes queued.
    fn stream_device_state(
        &mut self,
        device: &dyn DeviceStateSource,
    ) -> Result<u64, MigrationError> {
        let mut pieces: Vec<(u16, u64, std::sync::Arc<[u8]>)> = Vec::new();
        let lost = self.losses.routes.lost();
        let streams: Vec<u16> = (0..self.active_streams.max(1))
            .filter(|&s| !lost.contains(s))
            .collect();
        let mut offset = 0u64;
        let bytes = device
            .hand_over(&mut |chunk| {
                for piece in chunk.chunks(wire::MAX_DEVICE_STATE_FRAME) {
                    let stream = streams[pieces.len() % streams.len()];
                    pieces.push((stream, offset, piece.into()));
                    offset += piece.len() as u64;
                }
                Ok(())
            })
            .map_err(|e| MigrationError::Guest(format!("handing over the device state: {e}")))?;
        for (stream, offset, bytes) in pieces {
            let worker = self.fleet.worker_of(stream);
            self.push(
                worker,
                TxCommand::DeviceState {
                    stream,
                    offset,
                    bytes,
                },
            )?;
        }
        self.fleet.wake_all();
        Ok(bytes)
    }

    /// Before the guest is paused: wait until the destination has acknowledged the
    /// last pre-copy round (`last_round`) and every stream being given up has settled
    /// (its pages join the final round). A stream that stopped moving is caught here,
    /// with the guest running, not inside the paused window; and the final round's
    /// confirmation waits for nothing of an earlier round.
    ///
    /// Returns the round trip of a ping sent once the round settled (the wait, when
    /// no answer came within it): the path as the switchover would find it.
    pub(super) fn settle_before_pause(
        &mut self,
        final_set: &mut DirtyBitmap,
        last_round: u64,
    ) -> Result<f64, MigrationError> {
        self.last_activity = Instant::now();
        while self.losses.unsettled() || self.applied_round.is_none_or(|r| r < last_round) {
            self.pump()?;
            self.steer();
            std::thread::sleep(Duration::from_micros(200));
        }
        // One round trip with the last round settled and nothing in flight: what the
        // switchover's confirmation will see. Pings answered while rounds kept both
        // sides busy measure the rounds (on this 2-core machine 1-5 ms where the
        // paused window's confirmation took 0.1-0.8). A destination slow to answer
        // costs at most the wait below and leaves the estimate as it was.
        let sent = Instant::now();
        let probe = self.ping(sent)?;
        let deadline = sent + PROBE_WAIT;
        while self.pings.answered < probe && Instant::now() < deadline {
            self.pump()?;
            std::thread::sleep(Duration::from_micros(50));
        }
        let quiet_rtt = match self.pings.rtt {
            Some(rtt) if self.pings.answered >= probe => rtt.as_secs_f64(),
            _ => sent.elapsed().as_secs_f64(),
        };
        if let Some(carried) = self.losses.carry.take() {
            final_set.union_with(&carried);
        }
        if let Some(resend) = self.resend.take() {
            final_set.union_with(&resend);
        }
        self.restart_starved_streams();
        Ok(quiet_rtt)
    }

    /// The final round waits for its slowest stream: a stream whose BBR model has
    /// starved (see [`socket::starved_bbr_streams`]) starts its BBR afresh now, in
    /// start-up from its current window, instead of crawling through the paused
    /// window at a few Mbit/s. Said in the report.
    fn restart_starved_streams(&mut self) {
        let active = usize::from(self.active_streams).min(self.fleet.sockets().len());
        let sockets = &self.fleet.sockets()[..active];
        let samples: Vec<socket::TcpInfoSample> = sockets
            .iter()
            .map(|s| socket::tcp_info(s).unwrap_or_default())
            .collect();
        let Some(starved) = socket::starved_bbr_streams(&samples) else {
            return;
        };
        let mut restarted = Vec::new();
        for &i in &starved.streams {
            match socket::restart_congestion(&sockets[i], socket::Congestion::Bbr) {
                Ok(()) => restarted.push(format!(
                    "{i} ({:.1} Mbit/s)",
                    samples[i].pacing_rate as f64 * 8.0 / 1e6
                )),
                Err(e) => self
                    .live_notes
                    .push(format!("stream {i}: restarting BBR: {e}")),
            }
        }
        if !restarted.is_empty() {
            self.live_notes.push(format!(
                "BBR started afresh before the final round on streams paced far below the others' median of {:.1} Mbit/s: {}",
                starved.median_pacing_rate as f64 * 8.0 / 1e6,
                restarted.join(", ")
            ));
        }
    }

    /// After a good verdict: wait until the destination's guest runs.
    fn await_guest_running(&mut self) -> Result<(), MigrationError> {
        self.last_activity = Instant::now();
        loop {
            self.pump_workers()?;
            let Some(msg) = self.control.recv_timeout(Duration::from_millis(1))? else {
                continue;
            };
            match msg {
                ControlMessage::GuestRunning => return Ok(()),
                ControlMessage::Abort { message, .. } => {
                    return Err(MigrationError::Guest(format!(
                        "the destination could not start the guest: {message}"
                    )));
                }
                ControlMessage::RoundApplied { .. }
                | ControlMessage::Pong { .. }
                | ControlMessage::StreamFenced { .. }
                | ControlMessage::StreamBytes { .. } => {}
                other => {
                    return Err(wire::WireError::Unexpected(format!(
                        "{other:?} while waiting for the guest to run at the destination"
                    ))
                    .into());
                }
            }
        }
    }

    /// Take in what the workers reported (not the control stream, which the caller
    /// reads), failing on a worker error or a silence past the reply timeout.
    fn pump_workers(&mut self) -> Result<(), MigrationError> {
        if self.fleet.poll(self.steering.as_mut())? {
            self.last_activity = Instant::now();
        }
        for (stream, why) in self.fleet.take_lost() {
            self.stream_failed(stream, why, 0.0, true)?;
        }
        if self.last_activity.elapsed() > self.config.reply_timeout {
            return Err(MigrationError::Transport(format!(
                "no progress from the workers or the destination for {:?}",
                self.config.reply_timeout
            )));
        }
        Ok(())
    }

    /// Wait for the destination's verdict, watching the workers finish meanwhile.
    /// Returns the pages verified and the agreed digest.
    fn await_verdict(&mut self, expect: &Expect) -> Result<(u64, String), MigrationError> {
        let pages = self.memory.pages();
        // The destination's table, sent when its digest differs from ours.
        let mut theirs: Vec<u32> = Vec::new();
        self.last_activity = Instant::now();
        // The verdict takes at least a round trip: block until most of one has passed,
        // then spin (a thread woken from sleep here takes 0.1-0.25 ms to run, all of it
        // downtime). Spinning through a whole round trip across a WAN took 0.1-0.27 s
        // of a core that the destination's side may need.
        let spin_from = self.last_activity + self.pings.rtt.unwrap_or_default().mul_f64(0.75);
        loop {
            self.pump_workers()?;
            let now = Instant::now();
            let msg = if now < spin_from {
                self.control
                    .recv_timeout((spin_from - now).min(Duration::from_millis(1)))?
            } else {
                self.control.recv_yielding(Duration::from_millis(1))?
            };
            let Some(msg) = msg else {
                continue;
            };
            self.last_activity = Instant::now();
            match msg {
                ControlMessage::Verified {
                    pages: covered,
                    mismatches,
                    mismatched_pages,
                    digest,
                } => {
                    return match *expect {
                        Expect::Table { digest: ours } => {
                            let ours_digest = ours;
                            if digest == ours && mismatches == 0 && covered == pages {
                                return Ok((pages, format!("{ours:016x}")));
                            }
                            if theirs.len() as u64 == pages {
                                let ours = self.table.entries(0, pages as usize);
                                let (count, listed) = differing_pages(&ours, &theirs);
                                if test_skip_final_round() {
                                    self.live_notes.push(format!(
                                        "TEST SWITCH: switched over although {count} pages differ: {listed:?}"
                                    ));
                                    return Ok((pages, format!("{ours_digest:016x} (differs)")));
                                }
                                if count > 0 {
                                    return Err(MigrationError::Verification {
                                        mismatches: count,
                                        pages: listed,
                                    });
                                }
                            }
                            Err(MigrationError::DigestMismatch {
                                source_digest: ours,
                                dest_digest: digest,
                            })
                        }
                        Expect::Full { digest: ours } => {
                            if mismatches > 0 || digest != u64::from(ours) || covered != pages {
                                Err(MigrationError::Verification {
                                    mismatches: mismatches.max(1),
                                    pages: mismatched_pages,
                                })
                            } else {
                                Ok((pages, format!("{ours:08x}")))
                            }
                        }
                    };
                }
                ControlMessage::PageCrcs { first_page, crcs } => {
                    if first_page != theirs.len() as u64
                        || theirs.len() + crcs.len() > pages as usize
                    {
                        return Err(wire::WireError::Unexpected(format!(
                            "table entries from page {first_page} ({} already received, {pages} pages)",
                            theirs.len()
                        ))
                        .into());
                    }
                    theirs.extend_from_slice(&crcs);
                }
                ControlMessage::RoundApplied { round, .. } => self.round_applied(round),
                // Final-round pages whose RMA write arrived wrong: too late to send
                // again; the digests differ and the verdict names them.
                ControlMessage::ResendPages { pages } => {
                    self.pages_resent += pages.len() as u64;
                    self.live_notes.push(format!(
                        "{} final-round pages arrived wrong by RMA: {:?}",
                        pages.len(),
                        &pages[..pages.len().min(8)]
                    ));
                }
                // A reply to a ping sent before the switchover; delivered bytes
                // reported before the destination heard of it.
                ControlMessage::Pong { .. } | ControlMessage::StreamBytes { .. } => {}
                // The destination saying again that a stream lost before is stopped.
                ControlMessage::StreamFenced { stream, .. }
                    if self.losses.routes.lost().contains(stream) => {}
                ControlMessage::StreamFenced { stream, reason, .. } => {
                    return Err(MigrationError::Transport(format!(
                        "data stream {stream} lost during the switchover: {reason}"
                    )));
                }
                ControlMessage::Abort { message, .. } => {
                    return Err(MigrationError::Transport(format!(
                        "destination aborted: {message}"
                    )));
                }
                other => {
                    return Err(wire::WireError::Unexpected(format!(
                        "{other:?} while waiting for the verdict"
                    ))
                    .into());
                }
            }
        }
    }
}

/// Page faults (minor and major) this process has taken so far.
fn process_page_faults() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a writable rusage the call fills.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so it filled `usage`.
    let usage = unsafe { usage.assume_init() };
    (usage.ru_minflt + usage.ru_majflt) as u64
}
