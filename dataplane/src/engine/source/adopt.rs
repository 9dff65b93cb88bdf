//! The source session's side of live control: at every loop boundary, cancellation,
//! a newer settings epoch, a ping due, a report due; and the two changes that wait for
//! a round boundary (the stream count and the transport).

use super::Session;
use crate::codec::policy::CodecMode;
use crate::engine::MigrationError;
use crate::engine::live::{LiveSettings, REPORT_INTERVAL};
use crate::transport::{TransportKind, TxCommand, TxControl, socket};
use crate::wire::ControlMessage;
use std::time::{Duration, Instant};

impl Session<'_> {
    /// The slow path's side, at a loop boundary: cancellation, a newer epoch, a ping
    /// due, a report due.
    pub(super) fn tick(&mut self) -> Result<(), MigrationError> {
        let now = Instant::now();
        if self.pings.on && now >= self.pings.next {
            self.ping(now)?;
        }
        let Some(live) = self.live else {
            return Ok(());
        };
        if let Some(reason) = live.cancelled() {
            return Err(MigrationError::Aborted {
                reason: format!("cancelled: {reason}"),
                rounds: self.current_round,
            });
        }
        let path_rate = live.path_rate();
        self.planner.set_path_rate(path_rate);
        if let Some(steering) = &mut self.steering {
            steering.set_path_rate(path_rate);
        }
        if let Some(epoch) = live.newer_than(self.adopted_epoch) {
            self.adopt(&epoch.settings);
            self.adopted_epoch = epoch.number;
            live.mark_adopted(epoch.number);
        }
        if now.duration_since(self.last_report) >= REPORT_INTERVAL
            && let Some(mut p) = self.latest_progress.clone()
        {
            self.last_report = now;
            self.refresh(&mut p);
            live.offer(p);
        }
        Ok(())
    }

    /// Ping the destination now; the next periodic ping follows an interval later.
    /// Returns the ping's `nanos`, which its pong echoes.
    pub(super) fn ping(&mut self, now: Instant) -> Result<u64, MigrationError> {
        self.pings.next = now + super::PING_INTERVAL;
        let nanos = now.duration_since(self.pings.opened).as_nanos() as u64;
        self.control.send(&ControlMessage::Ping { nanos })?;
        Ok(nanos)
    }

    /// Bring a progress snapshot's live parts up to date.
    fn refresh(&mut self, p: &mut crate::engine::Progress) {
        p.streams.clear();
        p.streams.extend_from_slice(self.fleet.telemetry());
        p.workers = self.fleet.status();
        p.active_streams = self.active_streams;
        p.epoch = self.adopted_epoch;
        p.transport = self.transport_now();
        p.ping_rtt = self.pings.rtt;
        p.elapsed = p.elapsed.max(self.copy_start.elapsed());
    }

    /// Adopt live settings: socket options at once, worker settings through their
    /// control rings, the codec mode through steering, a stream count or transport at
    /// the next round boundary.
    fn adopt(&mut self, new: &LiveSettings) {
        let old = self.settings.clone();
        let connected = self.config.streams;
        if old.active_streams != new.active_streams {
            let wanted = new.active_streams.unwrap_or(connected);
            if wanted == 0 || wanted > connected {
                self.live_note(format!(
                    "streams {wanted}: this session opened {connected} (allowed 1..={connected}); unchanged"
                ));
            } else if wanted != self.active_streams && !self.setup.stream_map_ok {
                self.live_note(format!(
                    "streams {wanted}: the destination cannot change streams mid-session; unchanged"
                ));
            } else if wanted != self.active_streams || self.pending_streams.is_some() {
                self.pending_streams = Some(wanted);
            }
        }
        if old.transport != new.transport {
            let wanted = new.transport.unwrap_or(self.setup.opened_transport);
            if wanted == TransportKind::IoUring && !self.setup.uring_available {
                self.live_note("transport io_uring: unavailable on this kernel; unchanged".into());
            } else if wanted == TransportKind::Rma && !self.rma_usable() {
                self.live_note(
                    "transport rma: this session has no RMA connections (they open with the \
                     session, where the destination grants them); unchanged"
                        .into(),
                );
            } else if wanted != self.transport_now() || self.pending_transport.is_some() {
                self.pending_transport = Some(wanted);
            }
        }
        if old.congestion != new.congestion {
            let mut failed = None;
            for s in self.fleet.sockets() {
                if let Err(e) = socket::set_congestion(s, new.congestion) {
                    failed = Some(e);
                }
            }
            if let Some(e) = failed {
                self.live_note(e);
            }
        }
        if old.pacing_rate != new.pacing_rate {
            self.apply_pacing(new.pacing_rate);
        }
        if old.codec != new.codec {
            match &mut self.steering {
                Some(steering) => match steering.set_mode(new.codec.clone()) {
                    Ok(commands) => self.deferred_control.extend(commands),
                    Err(e) => self.live_note(e),
                },
                None if new.codec != CodecMode::Off => self.live_note(
                    "codecs: this session runs without them (the destination refused them); unchanged"
                        .into(),
                ),
                None => {}
            }
        }
        if old.zero_copy != new.zero_copy {
            for w in 0..self.fleet.len() {
                self.deferred_control
                    .push((w, TxControl::SetZeroCopy(new.zero_copy)));
            }
        }
        if old.idle != new.idle {
            for w in 0..self.fleet.len() {
                self.deferred_control
                    .push((w, TxControl::SetIdle(new.idle)));
            }
        }
        self.planner.set_downtime_limit(new.downtime_limit);
        self.settings = new.clone();
    }

    /// Cap every stream at its share of `total` (bytes per second) over the streams
    /// carrying pages.
    pub(super) fn apply_pacing(&mut self, total: Option<u64>) {
        let per_stream = total.map(|t| (t / u64::from(self.active_streams.max(1))).max(1));
        let mut failed = None;
        for s in self.fleet.sockets() {
            if let Err(e) = socket::set_pacing_rate(s, per_stream) {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            self.live_note(e);
        }
    }

    pub(super) fn live_note(&mut self, note: String) {
        if let Some(live) = self.live {
            live.note(note.clone());
        }
        self.live_notes.push(note);
    }

    /// Spread pages over `active` streams from the next round on. Round `round` has
    /// been sent; once the destination has applied it, no copy of any page is in
    /// flight on any stream, so pages may change streams: every codec forgets what it
    /// sent (a stream may only refer to what it carried itself), and every stream
    /// carries a stream map marker before its next pages.
    pub(super) fn switch_streams(&mut self, active: u16, round: u64) -> Result<(), MigrationError> {
        self.last_activity = Instant::now();
        while self.applied_round.is_none_or(|r| r < round) {
            self.pump()?;
            self.steer();
            std::thread::sleep(Duration::from_micros(200));
        }
        for w in 0..self.fleet.len() {
            // Straight onto the ring, ahead of the next runs: a change deferred past
            // them would let a codec use a stale cache.
            self.push_control(w, TxControl::ForgetSentPages)?;
            self.push(w, TxCommand::StreamMap { active })?;
        }
        self.fleet.wake_all();
        self.active_streams = active;
        self.losses.routes = crate::wire::Routes::new(active, self.losses.routes.lost());
        self.losses.generation += 1;
        if let Some(live) = self.live {
            live.set_active_streams(active);
        }
        let pacing = self.settings.pacing_rate;
        if pacing.is_some() {
            self.apply_pacing(pacing);
        }
        Ok(())
    }

    /// The fleet's workers are all new (a transport switch, a resumed session): hand
    /// them the codec settings and dictionary in force, the idle strategy and the
    /// zero-copy setting, ahead of any run.
    pub(super) fn settings_to_new_workers(&mut self) -> Result<(), MigrationError> {
        let mut changes = Vec::new();
        if let Some(steering) = &mut self.steering {
            changes.extend(steering.set_workers(self.fleet.streams_per_worker()));
        }
        for w in 0..self.fleet.len() {
            changes.push((w, TxControl::SetIdle(self.settings.idle)));
            changes.push((w, TxControl::SetZeroCopy(self.settings.zero_copy)));
        }
        for (w, change) in changes {
            self.push_control(w, change)?;
        }
        Ok(())
    }

    /// Move the open streams to workers of `kind`. Round `round` has been sent: each
    /// worker sends whatever else it holds, waits until the kernel has given back every
    /// buffer, and exits leaving its streams open; new workers then carry the same
    /// sockets on from the next byte, so the destination sees one unbroken frame
    /// sequence per stream. Codec settings and the dictionary carry over through
    /// steering; codec caches start empty (the new workers then send whole pages where
    /// the old ones would have sent deltas, which is always correct).
    ///
    /// To and from [`TransportKind::Rma`] the workers stay (RMA is a way their runs go,
    /// beside the same streams): off, runs go as frames from the next one on (every RMA
    /// write of the round was delivered before its frame); on, once the destination
    /// acknowledged round `round`, so that no write lands on a page whose frame it has
    /// still to place.
    pub(super) fn switch_transport(
        &mut self,
        kind: TransportKind,
        round: u64,
    ) -> Result<(), MigrationError> {
        let from = self.transport_now();
        if kind != TransportKind::Rma
            && let Some(pool) = &self.rma
        {
            pool.set_enabled(false);
        }
        let workers = match kind {
            TransportKind::Rma => self.fleet.kind(),
            other => other,
        };
        if workers != self.fleet.kind() {
            self.replace_workers(workers)?;
        }
        if kind == TransportKind::Rma {
            self.await_applied(round)?;
            if let Some(pool) = &self.rma {
                pool.set_enabled(true);
            }
        }
        self.transport_notes.push(format!(
            "transport: {from} → {kind} after round {round} (live)"
        ));
        Ok(())
    }

    /// Retire every worker for ones of `kind` on the same open streams.
    fn replace_workers(&mut self, kind: TransportKind) -> Result<(), MigrationError> {
        for w in 0..self.fleet.len() {
            self.push(w, TxCommand::Release)?;
        }
        self.fleet.wake_all();
        self.last_activity = Instant::now();
        while !self.fleet.all_finished() {
            self.pump()?;
            std::thread::sleep(Duration::from_micros(200));
        }
        // Started able to send zero-copy when the kernel can; the live setting then
        // says whether they do.
        let zero_copy = kind == TransportKind::IoUring && self.setup.uring_zero_copy;
        self.fleet.replace(kind, zero_copy)?;
        // Everything queued for the old workers is void; the new ones get the whole
        // state, ahead of any run.
        self.deferred_control.clear();
        self.settings_to_new_workers()
    }
}
