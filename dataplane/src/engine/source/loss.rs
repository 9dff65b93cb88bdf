//! Losing a data stream without losing the migration.
//!
//! A stream is lost when its send fails, when it makes no progress for the stall limit
//! (`stream_stall`, by default 3 × its smoothed RTT + 1 s), or when the destination
//! finds it broken. No progress is judged end to end: bytes handed to the stream that
//! the destination does not report arriving ([`ControlMessage::StreamBytes`]) — a path
//! that holds the connection open and forwards nothing, even one that acknowledges
//! what it holds — or, locally, bytes outstanding in its socket that nothing
//! acknowledges. A stream that merely waits behind another on a shared worker has
//! handed over nothing undelivered, and is left alone. And a stream is at fault only
//! while the path is up: when nothing is acknowledged on any stream and no report
//! comes from the destination for [`PATH_OUT_AFTER`], the path is out and every stream
//! waits for it (TCP carries each on where it stopped); once it is back, each stream
//! gets twice as long as the outage lasted (its retransmission timer backed off)
//! before the stall limit counts. Every stream stalled at once is the path too, even
//! while the control stream works: none is given up. Then:
//!
//! 1. its worker drops it (shuts the socket, drops what it had staged and queued) and
//!    reports so; the source tells the destination ([`ControlMessage::StreamLost`]);
//! 2. the destination stops placing anything of it and answers
//!    ([`ControlMessage::StreamFenced`]) with the rounds whose end it delivered;
//! 3. with both, no copy of the stream's pages can land any more, so its pages may
//!    change streams without two writers: the routes deal its chunks to the streams
//!    left ([`Routes`]), and every page it carried in a round the destination has not
//!    confirmed on it is queued again at once (or, when its round is already closed,
//!    with the next round).
//!
//! Nothing waits on the dead stream: the other streams carry on throughout, and only
//! the re-queued pages wait for the destination's answer (a round trip). A stream lost
//! inside the paused window ends the migration with the guest resumed here; that
//! window is milliseconds long and a stall takes a second to notice.
//!
//! Meanwhile a replacement connects in the background (with backoff and jitter, for up
//! to [`RECONNECT_FOR`]), bound to the session at the stream's next generation (its own
//! binding and keys). At the next round boundary once every round sent is
//! acknowledged — nothing of any page in flight, as for a change of stream count — the
//! source says [`ControlMessage::StreamRestored`], codecs forget what they sent, and
//! the stream's chunks come back to it from the next round on.

use super::Session;
use crate::dirty::DirtyBitmap;
use crate::engine::MigrationError;
use crate::engine::report::StreamLoss;
use crate::security::SessionKeys;
use crate::transport::{TransportKind, TxControl, socket};
use crate::wire::{CHUNK_PAGES, ControlMessage, Routes, StreamHello, StreamSet};
use crossbeam::channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a replacement for a lost stream keeps trying to connect.
pub(super) const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// A connection that replaces a lost stream, ready to carry it.
pub(super) struct Replacement {
    stream: u16,
    generation: u16,
    socket: TcpStream,
    keys: Option<Arc<SessionKeys>>,
}

/// How often the source looks at its streams' progress.
const STALL_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// The path counts as out once nothing is acknowledged on any stream and no report
/// comes from the destination (it sends one every 250 ms) for this long.
const PATH_OUT_AFTER: Duration = Duration::from_millis(750);
/// Reports older than this say nothing about what arrives now.
const REPORTS_STALE_AFTER: Duration = Duration::from_millis(600);

/// The pages a round queued, kept until the destination confirms the round, so that a
/// lost stream's share of them can be queued again.
pub(super) struct SentSet {
    round: u64,
    pub pages: DirtyBitmap,
    /// Pages of `pages` from here on were not queued (yet).
    pub queued_below: u64,
}

/// A stream being given up: waiting for its worker to drop it and for the
/// destination to fence it.
struct Losing {
    stream: u16,
    round: u64,
    reason: String,
    detect_seconds: f64,
    noticed: Instant,
    worker_dropped: bool,
    fenced: Option<u64>,
}

/// What one stream's progress looked like at the last check.
#[derive(Clone, Copy)]
struct Watch {
    bytes_acked: u64,
    since: Instant,
    /// Bytes the destination reported arriving on the stream's connection.
    delivered: u64,
    /// The stream's sent count when its connection opened (a replacement's start).
    sent_base: u64,
    /// Since when bytes handed to it have not all arrived, with no arrival since.
    undelivered_since: Option<Instant>,
}

impl Watch {
    fn new(now: Instant, sent_base: u64) -> Self {
        Watch {
            bytes_acked: 0,
            since: now,
            delivered: 0,
            sent_base,
            undelivered_since: None,
        }
    }
}

/// The source's side of lost streams.
pub(super) struct Losses {
    /// The destination takes part ([`crate::wire::caps::STREAM_LOSS`]); else a lost
    /// stream ends the migration, as it always did.
    allowed: bool,
    /// Which stream carries each page.
    pub routes: Routes,
    /// Bumped at every change of `routes`.
    pub generation: u64,
    losing: Vec<Losing>,
    pub sent: VecDeque<SentSet>,
    /// Pages to queue again as soon as the round loop can.
    pub requeue: Option<DirtyBitmap>,
    /// Pages to send with the next round (their round was closed already).
    pub carry: Option<DirtyBitmap>,
    /// The round loop is queuing pages (the round's end is not queued yet).
    pub pushing: bool,
    /// The paused window: a loss now fails the migration.
    pub paused: bool,
    pub report: Vec<StreamLoss>,
    stall_limit: Option<Duration>,
    watch: Vec<Watch>,
    next_check: Instant,
    /// Where replacements connect, and the session they join.
    peer: SocketAddr,
    session_id: u128,
    /// Per stream, the generation of the connection carrying it (or connecting).
    generations: Vec<u16>,
    arrivals: (Sender<Replacement>, Receiver<Replacement>),
    ready: Vec<Replacement>,
    /// Set when the session ends: replacements still connecting give up.
    pub closing: Arc<AtomicBool>,
    /// When the destination's last delivered-bytes report arrived.
    last_report: Option<Instant>,
    /// When the last sign of life came: a report, or bytes acknowledged on a stream.
    last_life: Instant,
    /// Since when the path is out (no sign of life for [`PATH_OUT_AFTER`]).
    outage: Option<Instant>,
    /// After an outage, no stream counts as stalled before this.
    grace_until: Instant,
    /// The log says every stream stalled at once (once per episode).
    all_stalled_noted: bool,
}

impl Losses {
    pub fn new(
        allowed: bool,
        streams: u16,
        stall_limit: Option<Duration>,
        peer: SocketAddr,
        session_id: u128,
    ) -> Self {
        let now = Instant::now();
        Losses {
            allowed,
            routes: Routes::new(streams, StreamSet::default()),
            generation: 0,
            losing: Vec::new(),
            sent: VecDeque::new(),
            requeue: None,
            carry: None,
            pushing: false,
            paused: false,
            report: Vec::new(),
            stall_limit,
            watch: vec![Watch::new(now, 0); usize::from(streams)],
            next_check: now + STALL_CHECK_INTERVAL,
            peer,
            session_id,
            generations: vec![0; usize::from(streams)],
            arrivals: crossbeam::channel::unbounded(),
            ready: Vec::new(),
            closing: Arc::new(AtomicBool::new(false)),
            last_report: None,
            last_life: now,
            outage: None,
            grace_until: now,
            all_stalled_noted: false,
        }
    }

    /// Take in the replacements that have connected.
    pub fn collect_arrivals(&mut self) {
        while let Ok(r) = self.arrivals.1.try_recv() {
            self.ready.push(r);
        }
    }

    /// Whether a replacement waits for a round boundary and nothing else is settling.
    pub fn restorable(&self) -> bool {
        !self.ready.is_empty() && self.losing.is_empty()
    }

    /// Whether a stream is being given up and its pages are not yet moved.
    pub fn unsettled(&self) -> bool {
        !self.losing.is_empty()
    }

    /// Whether `stream` is lost or being given up.
    fn gone(&self, stream: u16) -> bool {
        self.routes.lost().contains(stream) || self.losing.iter().any(|l| l.stream == stream)
    }

    /// Whether the pages each round queues are kept, to queue a lost stream's pages
    /// again. Only a session that carries on after a loss needs them: in the paused
    /// window a loss fails the migration, and so does any loss in a session without
    /// [`crate::wire::caps::STREAM_LOSS`]. Keeping a round copies its bitmap (a byte
    /// per 32 KiB of memory), which in the paused window is downtime that grows with
    /// memory size.
    fn keeps_rounds(&self) -> bool {
        self.allowed && !self.paused
    }

    /// A new round starts queuing `pages`.
    pub fn round_started(&mut self, round: u64, pages: &DirtyBitmap) {
        if self.keeps_rounds() {
            self.sent.push_back(SentSet {
                round,
                pages: pages.clone(),
                queued_below: 0,
            });
        }
        self.pushing = true;
    }

    /// Every page of the round being queued below `page` has been queued.
    pub fn queued_below(&mut self, page: u64) {
        if !self.keeps_rounds() {
            // The last set kept is an earlier round's.
            return;
        }
        if let Some(set) = self.sent.back_mut() {
            set.queued_below = page;
        }
    }

    /// Forget the pages of rounds up to `applied`, unless a loss still needs them.
    pub fn prune(&mut self, applied: Option<u64>) {
        let Some(applied) = applied else { return };
        if !self.losing.is_empty() {
            return;
        }
        while self.sent.front().is_some_and(|s| s.round <= applied) {
            self.sent.pop_front();
        }
    }

    /// Pages to queue again, now or with the next round.
    pub fn queue_again(&mut self, pages: DirtyBitmap) {
        let slot = if self.pushing {
            &mut self.requeue
        } else {
            &mut self.carry
        };
        match slot {
            Some(set) => set.union_with(&pages),
            None => *slot = Some(pages),
        }
    }
}

impl Session<'_> {
    /// Pages on `stream` that the destination may lack: those it carried in every round
    /// from `rounds_ended` on (as queued so far), by the routes before its loss.
    fn pages_of(&self, stream: u16, rounds_ended: u64) -> DirtyBitmap {
        let routes = &self.losses.routes;
        let mut lost = DirtyBitmap::new(self.memory.pages());
        for set in self.losses.sent.iter().filter(|s| s.round >= rounds_ended) {
            let mut chunk = u64::MAX;
            let mut ours = false;
            for page in set.pages.iter() {
                if page >= set.queued_below {
                    break;
                }
                if page / CHUNK_PAGES != chunk {
                    chunk = page / CHUNK_PAGES;
                    ours = routes.route(page) == Some(stream);
                }
                if ours {
                    lost.set(page);
                }
            }
        }
        lost
    }

    /// The slow path asked for stream `stream` to be replaced ([`LiveControl::replace_stream`]):
    /// given up as a lost one, when a stream may be lost now, is not the last, and is
    /// not gone already; otherwise said in the notes.
    ///
    /// [`LiveControl::replace_stream`]: crate::engine::LiveControl::replace_stream
    pub(super) fn replace_on_request(
        &mut self,
        stream: u16,
        why: String,
    ) -> Result<(), MigrationError> {
        let streams = self.losses.watch.len();
        let alive = (0..streams)
            .filter(|&s| !self.losses.gone(s as u16))
            .count();
        let refused = if usize::from(stream) >= streams {
            Some(format!("the session has {streams} data streams"))
        } else if !self.losses.allowed {
            Some("the destination does not take a stream's loss in this session".into())
        } else if self.losses.paused {
            Some("the guest is paused for the switchover".into())
        } else if self.losses.gone(stream) {
            Some("it is being replaced already".into())
        } else if alive < 2 {
            Some("it is the last stream carrying pages".into())
        } else {
            None
        };
        match refused {
            Some(why_not) => {
                self.live_note(format!(
                    "data stream {stream} not replaced as asked ({why}): {why_not}"
                ));
                Ok(())
            }
            None => {
                self.live_note(format!(
                    "data stream {stream} given up as asked ({why}): a new connection carries \
                     it from a round boundary on"
                ));
                self.stream_failed(stream, format!("replaced as asked: {why}"), 0.0, false)
            }
        }
    }

    /// Stream `stream` failed or stalled here (`worker_dropped`: its worker already
    /// dropped it).
    pub(super) fn stream_failed(
        &mut self,
        stream: u16,
        reason: String,
        detect_seconds: f64,
        worker_dropped: bool,
    ) -> Result<(), MigrationError> {
        if !self.losses.allowed || self.losses.paused {
            let when = if self.losses.paused {
                " during the switchover"
            } else {
                ""
            };
            return Err(MigrationError::Transport(format!(
                "data stream {stream} lost{when}: {reason}"
            )));
        }
        if self.losses.routes.lost().contains(stream) {
            return Ok(());
        }
        if let Some(l) = self.losses.losing.iter_mut().find(|l| l.stream == stream) {
            l.worker_dropped |= worker_dropped;
        } else {
            eprintln!(
                "dwcp: data stream {stream} lost in round {}: {reason}; its pages go to the other streams",
                self.current_round
            );
            self.control.send(&ControlMessage::StreamLost {
                stream,
                reason: reason.clone(),
            })?;
            self.losses.losing.push(Losing {
                stream,
                round: self.current_round,
                reason,
                detect_seconds,
                noticed: Instant::now(),
                worker_dropped,
                fenced: None,
            });
            if !worker_dropped {
                self.drop_stream(stream);
            }
        }
        self.settle_losses()
    }

    /// The destination stopped `stream` (asked to, or it found it broken first).
    pub(super) fn stream_fenced(
        &mut self,
        stream: u16,
        rounds_ended: u64,
        reason: String,
    ) -> Result<(), MigrationError> {
        if usize::from(stream) >= self.losses.watch.len() {
            return Err(crate::wire::WireError::Unexpected(format!(
                "the destination fenced stream {stream} of {}",
                self.losses.watch.len()
            ))
            .into());
        }
        if self.losses.routes.lost().contains(stream) {
            return Ok(());
        }
        if !self.losses.losing.iter().any(|l| l.stream == stream) {
            self.stream_failed(stream, format!("at the destination: {reason}"), 0.0, false)?;
        }
        if let Some(l) = self.losses.losing.iter_mut().find(|l| l.stream == stream) {
            l.fenced = Some(rounds_ended);
        }
        self.settle_losses()
    }

    /// Have the worker of `stream` drop it; shutting its socket ends a send that
    /// waits on a stalled path.
    fn drop_stream(&mut self, stream: u16) {
        if let Some(socket) = self.fleet.sockets().get(usize::from(stream)) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        let w = self.fleet.worker_of(stream);
        self.deferred_control
            .push((w, TxControl::DropStream(stream)));
        self.fleet.wake(w);
    }

    /// Move the pages of every stream both dropped and fenced to the streams left.
    fn settle_losses(&mut self) -> Result<(), MigrationError> {
        while let Some(i) = self
            .losses
            .losing
            .iter()
            .position(|l| l.worker_dropped && l.fenced.is_some())
        {
            let l = self.losses.losing.remove(i);
            let pages = self.pages_of(l.stream, l.fenced.unwrap_or(0));
            let mut lost = self.losses.routes.lost();
            lost.insert(l.stream);
            if lost.len() >= usize::from(self.config.streams) {
                return Err(MigrationError::Disconnected(format!(
                    "every data stream was lost (the last, stream {}: {})",
                    l.stream, l.reason
                )));
            }
            self.losses.routes = Routes::new(self.active_streams, lost);
            self.losses.generation += 1;
            self.fleet.stream_gone(l.stream);
            let count = pages.count();
            crate::engine::counters::lost(true, count);
            // Queued again in this round: a later loss may need them too.
            self.losses.sent.push_back(SentSet {
                round: self.current_round,
                pages: pages.clone(),
                queued_below: u64::MAX,
            });
            self.losses.queue_again(pages);
            let fence_seconds = l.noticed.elapsed().as_secs_f64();
            self.losses.report.push(StreamLoss {
                stream: l.stream,
                round: l.round,
                reason: l.reason.clone(),
                detect_seconds: l.detect_seconds,
                fence_seconds,
                pages_requeued: count,
                restored_from_round: None,
            });
            self.reconnect(l.stream)?;
            self.live_note(format!(
                "data stream {} lost in round {}: {}; {} pages queued on the other streams",
                l.stream, l.round, l.reason, count
            ));
        }
        self.losses.prune(self.applied_round);
        Ok(())
    }

    /// Connect a replacement for lost stream `stream` on a thread of its own.
    fn reconnect(&mut self, stream: u16) -> Result<(), MigrationError> {
        let s = usize::from(stream);
        let generation = self.losses.generations[s].wrapping_add(1);
        self.losses.generations[s] = generation;
        let keys = self
            .control
            .generation_keys(self.config.streams, generation)?;
        let hello = StreamHello {
            session_id: self.losses.session_id,
            stream_id: stream,
            binding: keys.as_ref().map(|k| k.binding(stream)),
            generation,
        }
        .encode();
        let peer = self.losses.peer;
        let timeout = self.config.connect_timeout;
        let options = self.config.transport.socket.clone();
        let arrivals = self.losses.arrivals.0.clone();
        let closing = self.losses.closing.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("dwcp-reconnect{stream}"))
            .spawn(move || {
                let started = Instant::now();
                let mut backoff = Duration::from_millis(100);
                // Acquire: pairs with the Release store in `Session::close`.
                while !closing.load(Ordering::Acquire) && started.elapsed() < RECONNECT_FOR {
                    // The session's close ends an attempt that hangs, not only the loop.
                    if let Ok(mut socket) = socket::connect_cancellable(peer, timeout, &closing) {
                        let _ = socket::configure(&socket, &options);
                        if socket.write_all(&hello).is_ok() {
                            let _ = arrivals.send(Replacement {
                                stream,
                                generation,
                                socket,
                                keys,
                            });
                            return;
                        }
                    }
                    // Jittered: replacements of streams lost together spread out
                    // instead of knocking at once.
                    let jitter = backoff.mul_f64(0.5 * super::reconnect::jitter_fraction());
                    std::thread::sleep(backoff + jitter);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            });
        if spawned.is_err() {
            self.live_note(format!(
                "data stream {stream}: no thread to connect its replacement; the others carry it"
            ));
        }
        Ok(())
    }

    /// At a round boundary (round `round` sent): put the replacements that connected
    /// back to work once the destination has acknowledged every round sent.
    pub(super) fn restore_streams(&mut self, round: u64) -> Result<(), MigrationError> {
        self.last_activity = Instant::now();
        while self.applied_round.is_none_or(|r| r < round) {
            self.pump()?;
            self.steer();
            std::thread::sleep(Duration::from_micros(200));
        }
        if !self.losses.restorable() {
            // A loss began meanwhile: the next boundary, once it has settled.
            return Ok(());
        }
        let before = self.fleet.len();
        for r in std::mem::take(&mut self.losses.ready) {
            let s = usize::from(r.stream);
            if !self.losses.routes.lost().contains(r.stream)
                || self.losses.generations[s] != r.generation
            {
                continue;
            }
            self.control.send(&ControlMessage::StreamRestored {
                stream: r.stream,
                generation: r.generation,
            })?;
            if let (Some(session), Some(keys)) = (self.fleet.records(), r.keys) {
                session.replace_stream(r.stream, keys);
            }
            let zero_copy =
                self.fleet.kind() == TransportKind::IoUring && self.setup.uring_zero_copy;
            self.fleet.adopt(r.stream, r.socket, zero_copy)?;
            let mut lost = self.losses.routes.lost();
            lost.remove(r.stream);
            self.losses.routes = Routes::new(self.active_streams, lost);
            self.losses.generation += 1;
            // The new connection's bytes count from here, at both ends.
            self.losses.watch[s] = Watch::new(Instant::now(), self.fleet.telemetry()[s].bytes);
            crate::engine::counters::replaced();
            if let Some(loss) = self
                .losses
                .report
                .iter_mut()
                .rev()
                .find(|l| l.stream == r.stream)
            {
                loss.restored_from_round = Some(round + 1);
            }
            eprintln!(
                "dwcp: data stream {} restored (generation {}) from round {}",
                r.stream,
                r.generation,
                round + 1
            );
        }
        if self.fleet.len() == before {
            return Ok(());
        }
        // Chunks change streams: no codec may refer to what another stream now carries.
        let mut changes = Vec::new();
        for w in 0..self.fleet.len() {
            changes.push((w, TxControl::ForgetSentPages));
        }
        if let Some(steering) = &mut self.steering {
            changes.extend(steering.add_workers(self.fleet.streams_per_worker()));
        }
        for w in before..self.fleet.len() {
            changes.push((w, TxControl::SetIdle(self.settings.idle)));
            changes.push((w, TxControl::SetZeroCopy(self.settings.zero_copy)));
        }
        for (w, change) in changes {
            self.push_control(w, change)?;
        }
        self.fleet.wake_all();
        Ok(())
    }

    /// Give up streams that have had bytes outstanding and no progress for the stall
    /// limit.
    pub(super) fn watch_stalls(&mut self) -> Result<(), MigrationError> {
        let now = Instant::now();
        if now < self.losses.next_check || !self.losses.allowed || self.losses.paused {
            return Ok(());
        }
        self.losses.next_check = now + STALL_CHECK_INTERVAL;
        // Anything acknowledged since the last look is a sign of life, as is a report
        // from the destination.
        let mut infos = Vec::with_capacity(self.losses.watch.len());
        let mut life = self
            .losses
            .last_report
            .is_some_and(|at| at > self.losses.last_life);
        for (stream, sock) in self.fleet.sockets().iter().enumerate() {
            let info = (!self.losses.gone(stream as u16))
                .then(|| socket::tcp_info(sock))
                .flatten();
            if let Some(info) = &info
                && info.bytes_acked != self.losses.watch[stream].bytes_acked
            {
                life = true;
            }
            infos.push(info);
        }
        if life {
            self.losses.last_life = now;
            if let Some(out_since) = self.losses.outage.take() {
                // The path is back. TCP's retransmission timers backed off while it was
                // out (each wait doubles the last), so a stream's next retransmission may
                // come up to twice the outage later: every stream gets that long, plus
                // the usual limit, before it counts as stalled.
                let out_for = now.duration_since(out_since);
                self.losses.grace_until = now + 2 * out_for;
                self.live_note(format!(
                    "the path was out for {:.1} s (no stream moved, no word from the destination); every stream waited for it",
                    out_for.as_secs_f64()
                ));
            }
        } else if self.losses.outage.is_none()
            && now.duration_since(self.losses.last_life) > PATH_OUT_AFTER
        {
            self.losses.outage = Some(self.losses.last_life);
            eprintln!(
                "dwcp: nothing moved and no word from the destination for {:.1} s: the path is out; waiting for it",
                now.duration_since(self.losses.last_life).as_secs_f64()
            );
        }
        if self.losses.outage.is_some() {
            // Every stream stopped at once: the path, not a stream.
            return Ok(());
        }
        // The destination's word on what arrived is only as good as its last report: a
        // control stream still recovering from an outage says nothing new for a while.
        let reports_fresh = self
            .losses
            .last_report
            .is_some_and(|at| now.duration_since(at) < REPORTS_STALE_AFTER);
        let mut stalled = Vec::new();
        for (s, info) in infos.into_iter().enumerate() {
            let Some(info) = info else { continue };
            let stream = s as u16;
            let limit = self.losses.stall_limit.unwrap_or_else(|| {
                Duration::from_micros(3 * u64::from(info.rtt_us)) + Duration::from_secs(1)
            });
            let sent = self.fleet.telemetry()[s].bytes;
            let watch = &mut self.losses.watch[s];
            // End to end: handed over, and not arriving.
            let handed = sent.saturating_sub(watch.sent_base);
            if !reports_fresh {
                watch.undelivered_since = watch.undelivered_since.map(|_| now);
            } else if handed > watch.delivered {
                let since =
                    (*watch.undelivered_since.get_or_insert(now)).max(self.losses.grace_until);
                let waited = now.saturating_duration_since(since);
                if waited > limit {
                    stalled.push((
                        stream,
                        waited,
                        format!(
                            "no progress for {:.1} s: {} of the {} bytes sent on it arrived",
                            waited.as_secs_f64(),
                            watch.delivered,
                            handed
                        ),
                    ));
                    continue;
                }
            } else {
                watch.undelivered_since = None;
            }
            // Locally: outstanding in the socket, and nothing acknowledged.
            if info.bytes_acked != watch.bytes_acked || !info.outstanding() {
                watch.bytes_acked = info.bytes_acked;
                watch.since = now;
                continue;
            }
            let waited = now.saturating_duration_since(watch.since.max(self.losses.grace_until));
            if waited > limit {
                stalled.push((
                    stream,
                    waited,
                    format!(
                        "no progress for {:.1} s with {} bytes unsent and {} segments unacknowledged",
                        waited.as_secs_f64(),
                        info.notsent_bytes,
                        info.unacked
                    ),
                ));
            }
        }
        // Every stream stalled at once is the path again, even with the control stream
        // up: none is at fault, and giving them all up would end the session.
        let alive = (0..self.losses.watch.len())
            .filter(|&s| !self.losses.gone(s as u16))
            .count();
        if stalled.len() >= alive {
            if !stalled.is_empty() && !self.losses.all_stalled_noted {
                self.losses.all_stalled_noted = true;
                eprintln!(
                    "dwcp: every data stream stalled at once: the path, not a stream; waiting for it"
                );
            }
            return Ok(());
        }
        self.losses.all_stalled_noted = false;
        for (stream, waited, why) in stalled {
            self.stream_failed(stream, why, waited.as_secs_f64(), false)?;
        }
        Ok(())
    }

    /// The destination's count of the bytes each stream's connection delivered.
    pub(super) fn stream_bytes(&mut self, received: Vec<u64>) -> Result<(), MigrationError> {
        if received.len() != self.losses.watch.len() {
            return Err(crate::wire::WireError::Unexpected(format!(
                "delivered bytes of {} streams, in a session of {}",
                received.len(),
                self.losses.watch.len()
            ))
            .into());
        }
        self.losses.last_report = Some(Instant::now());
        for (watch, delivered) in self.losses.watch.iter_mut().zip(received) {
            if delivered != watch.delivered {
                watch.delivered = delivered;
                watch.undelivered_since = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn losses(allowed: bool) -> Losses {
        Losses::new(allowed, 2, None, "127.0.0.1:9".parse().unwrap(), 1)
    }

    #[test]
    fn rounds_are_kept_only_where_a_loss_can_be_carried_through() {
        let mut pages = DirtyBitmap::new(1024);
        pages.set_range(10, 20);
        let mut carries_on = losses(true);
        carries_on.round_started(3, &pages);
        assert_eq!(carries_on.sent.len(), 1);
        assert_eq!(carries_on.sent[0].pages.count(), 10);
        // The paused window: a loss fails the migration, nothing is requeued.
        carries_on.paused = true;
        carries_on.round_started(4, &pages);
        assert_eq!(carries_on.sent.len(), 1, "the final round is not copied");
        assert!(carries_on.pushing);
        // A session without stream loss never requeues.
        let mut fails = losses(false);
        fails.round_started(0, &pages);
        assert!(fails.sent.is_empty() && fails.pushing);
    }
}
