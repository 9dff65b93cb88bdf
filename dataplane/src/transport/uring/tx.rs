//! The send side: commands staged into pool buffers (see `transport::stage`; the pool
//! is registered with the ring where zero-copy sends may use it), each stream's
//! buffers sent one at a time, zero-copy above a threshold with buffers returned only
//! on the notification.

use super::buffers::PoolBuffers;
use super::{new_ring, shutdown, start_worker, wait_cqe};
use crate::ring::{self, Consumer, Producer};
use crate::security::records::{RECORD_HEADER, RECORD_TAG, RecordSealer};
use crate::transport::stage::{RoundCounts, Stager, StreamStage};
use crate::transport::{
    CONTROL_RING, IdleStrategy, OsError, Starting, StreamTelemetry, TransportConfig, TxCommand,
    TxControl, TxError, TxEvent, TxSetup, TxWorker, WORKER_RING, WorkerTelemetry, push_event,
    socket,
};
use crate::wire::{FRAME_HEADER_LEN, FrameHeader};
use dwcp_hugepages::{ArenaOptions, BufToken, BufferPool, PagePreference};
use io_uring::{IoUring, cqueue, opcode, types};
use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Most a worker's send pool may hold when sized for zero-copy cover.
const ZERO_COPY_POOL_BUDGET: usize = 64 << 20;

/// Zero-copy notifications to see before deciding whether the kernel really avoids
/// the copy on this path.
const ZC_PROBE_SENDS: u64 = 8;

/// include/uapi/linux/io_uring.h
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

struct InFlight {
    token: BufToken,
    len: usize,
    sent: usize,
    marker: Marker,
}

/// What a queued buffer ends with, for the accounting once it is sent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Marker {
    None,
    RoundEnd,
    StreamEnd,
}

/// A stream's sending state: the buffer being filled, those queued, the one in flight.
pub(super) struct TxStream {
    pub id: u16,
    socket: TcpStream,
    pub filling: Option<(BufToken, usize)>,
    pub queue: VecDeque<(BufToken, usize, Marker)>,
    inflight: Option<InFlight>,
    needs_round_marker: bool,
    /// A stream map marker to send (after the round marker, if one is due).
    needs_stream_map: Option<u16>,
    needs_stream_end: bool,
    ended: bool,
    /// Given up ([`TxEvent::StreamLost`]): its socket is shut and nothing more is
    /// staged for it.
    lost: bool,
    /// Bytes handed to the kernel.
    bytes: u64,
    /// Seals each buffer before it is queued, in an authenticated session.
    sealer: Option<RecordSealer>,
}

impl TxStream {
    /// Where staged bytes start in a buffer: after room for a record's header when
    /// sealing.
    pub fn start(&self) -> usize {
        if self.sealer.is_some() {
            RECORD_HEADER
        } else {
            0
        }
    }

    /// Room kept at a buffer's end for a record's tag.
    pub fn tail(&self) -> usize {
        if self.sealer.is_some() { RECORD_TAG } else { 0 }
    }

    /// Queue the buffer being filled for sending, ending with `marker`: sealed in
    /// place first in an authenticated session (the registered buffer, and with it
    /// zero-copy, stays). An empty one goes back to the pool.
    pub fn queue_filling(&mut self, pool: &mut BufferPool, marker: Marker) {
        let Some((token, len)) = self.filling.take() else {
            return;
        };
        if len <= self.start() {
            pool.release(token);
            return;
        }
        let len = match &mut self.sealer {
            Some(sealer) => sealer.seal(pool.buf_mut(&token), len),
            None => len,
        };
        self.queue.push_back((token, len, marker));
    }
}

struct TxWorkerState {
    // Field order matters: the ring (and its registration of the pool) goes first.
    ring: IoUring,
    pool: BufferPool,
    /// Buffers whose zero-copy notification is still due, by buffer index.
    awaiting_notif: Vec<(u32, Option<BufToken>)>,
    streams: Vec<TxStream>,
    /// Staging state of each stream, in the same order.
    stages: Vec<StreamStage>,
    stager: Stager,
    worker: usize,
    zero_copy: bool,
    /// Whether the worker started with zero-copy (only then may it be turned back on).
    zero_copy_capable: bool,
    zc_threshold: usize,
    registered: bool,
    /// How the worker waits when idle (the engine may change it).
    idle: IdleStrategy,
    pending: Option<TxCommand>,
    round: Option<u64>,
    round_markers_unsent: usize,
    /// What the round staged, taken when its last marker was placed (pages staged
    /// after it belong to the next round) and reported once the markers are sent.
    closed_round: RoundCounts,
    finishing: bool,
    /// Told to hand its streams over: exit once everything taken has been sent.
    releasing: bool,
    zc_copied: u64,
    zc_sends: u64,
    zc_notifications: u64,
    zc_fell_back: bool,
    ops_in_flight: usize,
    /// A buffer stops taking runs once it holds this much (the send size); it is
    /// larger only to take a whole codec batch.
    fill_limit: usize,
    /// Configuration changes from the engine, and one waiting to be applied.
    control: Consumer<TxControl>,
    pending_control: Option<TxControl>,
    /// Time spent unable to stage because every buffer was waiting on the socket.
    stalled_nanos: u64,
    stalled_since: Option<Instant>,
}

/// Start a source worker on io_uring for `streams`. The ring is created on the
/// worker's own thread (it is set up single-issuer, which binds it to its creator),
/// and so is its buffer pool, while the caller goes on; setup errors come back
/// through [`Starting::ready`].
pub fn start_tx(
    worker: usize,
    streams: Vec<(u16, TcpStream)>,
    setup: TxSetup,
    config: &TransportConfig,
    zero_copy: bool,
    cpu: Option<usize>,
) -> std::io::Result<Starting<TxWorker>> {
    let (cmd_tx, cmd_rx) = ring::channel(WORKER_RING);
    let (ctl_tx, ctl_rx) = ring::channel(CONTROL_RING);
    let (evt_tx, evt_rx) = ring::channel(WORKER_RING);
    let config = config.clone();
    let setup_config = config.clone();
    let (thread, ready) = start_worker(
        format!("dwcp-tx{worker}"),
        cpu,
        move || TxWorkerState::new(worker, streams, setup, &setup_config, zero_copy, ctl_rx),
        move |state| tx_main(state, cmd_rx, evt_tx, &config),
    )?;
    Ok(Starting::setting_up(
        TxWorker {
            commands: cmd_tx,
            control: ctl_tx,
            events: evt_rx,
            thread,
        },
        ready,
    ))
}

impl TxWorkerState {
    fn new(
        worker: usize,
        streams: Vec<(u16, TcpStream)>,
        setup: TxSetup,
        config: &TransportConfig,
        zero_copy: bool,
        control: Consumer<TxControl>,
    ) -> std::io::Result<Self> {
        let records = setup.records.clone();
        let stager = Stager::new(setup.memory, setup.table, setup.codec)
            .with_rma(setup.rma)
            .defer_rma_delivery();
        // With codecs, a buffer must take a whole flushed batch; a sealed record needs
        // room for its header and tag besides.
        let record_room = if records.is_some() {
            RECORD_HEADER + RECORD_TAG
        } else {
            0
        };
        let buf_size = config
            .send_buffer
            .max(stager.max_flush_len() + FRAME_HEADER_LEN)
            + record_room;
        // A zero-copy buffer is pinned until the receiver has consumed its bytes, a
        // socket buffer's worth later: keep enough buffers to cover that, or the sender
        // stalls waiting for notifications.
        let per_stream = if zero_copy {
            let covering = config.socket.buffer_bytes.div_ceil(config.send_buffer) as u32 * 2 + 4;
            // Registration pins (faults in) the whole pool: with many streams and
            // buffers sized for codec batches, full cover would pin hundreds of MiB and
            // take seconds to set up. Past the budget a stream waits for notifications
            // a little more often instead.
            let affordable = (ZERO_COPY_POOL_BUDGET / (streams.len().max(1) * buf_size)) as u32;
            config.send_buffers_per_stream.max(covering.min(affordable))
        } else {
            config.send_buffers_per_stream
        };
        let buffers = (streams.len() as u32 * per_stream).max(2);
        let ring = new_ring()?;
        // 4 KiB pages, not huge ones: the pool is set up while the migration waits, and
        // a transparent huge page's first touch zeroes 2 MiB at once, from blocks the
        // kernel may have to compact or the host to back first. Measured on a QEMU
        // guest's migration: setup 12-55 ms with THP (one worker's 11 MiB pool took
        // 21 ms, the other's 2 ms), 10-13 ms with 4 KiB pages; the transport bench's
        // goodput and CPU per GB did not change beyond their run-to-run spread.
        let mut pool = BufferPool::new(
            buffers,
            buf_size,
            &ArenaOptions {
                prefer: PagePreference::Small,
                numa_node: None,
                populate: false,
            },
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Fault in what uncoded sends use now. The rest of a buffer sized for codec
        // batches faults in only if a batch ever needs it, unless registration pins it.
        pool.populate_prefix(config.send_buffer);
        // Only zero-copy sends name a registered buffer (a plain send copies from any
        // address), and a worker started without zero-copy never turns it on. Pinning
        // faults in the whole pool (8.5 MiB per worker of four streams sized for codec
        // batches): 3.5-10 ms per worker while the migration waited to start.
        let registered = zero_copy && {
            // SAFETY: the iovecs describe the pool's buffers, which outlive the
            // registration: `ring` is declared before `pool` in TxWorkerState, so it is
            // dropped (and the registration released) first.
            unsafe { ring.submitter().register_buffers(&pool.iovecs()) }.is_ok()
        };
        let stages = streams.iter().map(|(id, _)| stager.stream(*id)).collect();
        Ok(TxWorkerState {
            ring,
            awaiting_notif: (0..pool.count()).map(|_| (0, None)).collect(),
            pool,
            streams: streams
                .into_iter()
                .map(|(id, socket)| TxStream {
                    id,
                    socket,
                    filling: None,
                    queue: VecDeque::with_capacity(buffers as usize),
                    inflight: None,
                    needs_round_marker: false,
                    needs_stream_map: None,
                    needs_stream_end: false,
                    ended: false,
                    lost: false,
                    bytes: 0,
                    sealer: records.as_ref().map(|keys| keys.sealer(id)),
                })
                .collect(),
            stages,
            stager,
            worker,
            zero_copy,
            zero_copy_capable: zero_copy,
            zc_threshold: config.zero_copy_threshold,
            registered,
            idle: config.idle,
            pending: None,
            round: None,
            round_markers_unsent: 0,
            closed_round: RoundCounts::default(),
            finishing: false,
            releasing: false,
            zc_copied: 0,
            zc_sends: 0,
            zc_notifications: 0,
            zc_fell_back: false,
            ops_in_flight: 0,
            fill_limit: config.send_buffer,
            control,
            pending_control: None,
            stalled_nanos: 0,
            stalled_since: None,
        })
    }

    /// Whether everything taken has been sent and the kernel has given back every
    /// buffer (zero-copy notifications included).
    fn all_sent(&self) -> bool {
        self.pending.is_none()
            && self.pending_control.is_none()
            && self.ops_in_flight == 0
            && self.stages.iter().all(|s| !s.batch_pending())
            && self.streams.iter().all(|st| {
                st.filling
                    .as_ref()
                    .is_none_or(|(_, len)| *len <= st.start())
                    && st.queue.is_empty()
                    && st.inflight.is_none()
                    && !st.needs_round_marker
                    && st.needs_stream_map.is_none()
            })
    }

    /// Stream `i`'s counters, as an event.
    fn stream_telemetry(&self, i: usize) -> TxEvent {
        let st = &self.streams[i];
        TxEvent::Telemetry(StreamTelemetry {
            stream: st.id,
            bytes: st.bytes,
            pages: self.stages[i].pages,
            tcp: socket::tcp_info(&st.socket),
        })
    }

    fn telemetry(&self) -> WorkerTelemetry {
        let stalling = self
            .stalled_since
            .map_or(0, |t| t.elapsed().as_nanos() as u64);
        self.stager
            .telemetry(self.worker, self.stalled_nanos + stalling)
    }

    /// Note whether the worker is now waiting for buffers.
    fn set_stalled(&mut self, stalled: bool) {
        match (stalled, self.stalled_since) {
            (true, None) => self.stalled_since = Some(Instant::now()),
            (false, Some(t)) => {
                self.stalled_nanos += t.elapsed().as_nanos() as u64;
                self.stalled_since = None;
            }
            _ => {}
        }
    }
}

/// The worker's life; returns its state, to be freed once the worker is let go.
fn tx_main(
    mut s: TxWorkerState,
    mut commands: Consumer<TxCommand>,
    mut events: Producer<TxEvent>,
    config: &TransportConfig,
) -> TxWorkerState {
    let result = s.run(&mut commands, &mut events, config);
    if let Err(error) = result {
        push_event(
            &mut events,
            TxEvent::Failed {
                worker: s.worker,
                error,
            },
        );
    }
    s.drain();
    // Final counters, so that whoever carries the streams on counts from them.
    for i in (0..s.streams.len()).filter(|&i| !s.streams[i].lost) {
        push_event(&mut events, s.stream_telemetry(i));
    }
    push_event(&mut events, TxEvent::Worker(s.telemetry()));
    if result.is_ok() {
        push_event(
            &mut events,
            TxEvent::Finished {
                worker: s.worker,
                zc_copied: s.zc_copied,
                zc_sends: s.zc_sends,
                zc_fell_back: s.zc_fell_back,
            },
        );
    }
    s
}

fn ring_error(op: &'static str) -> impl FnOnce(std::io::Error) -> TxError {
    move |e| TxError::Ring {
        op,
        error: e.into(),
    }
}

impl TxWorkerState {
    fn run(
        &mut self,
        commands: &mut Consumer<TxCommand>,
        events: &mut Producer<TxEvent>,
        config: &TransportConfig,
    ) -> Result<(), TxError> {
        let mut idle = 0u32;
        let mut next_telemetry = Instant::now() + config.telemetry_interval;
        loop {
            let mut progress = self.reap(events)?;
            progress |= self.take_commands(commands, events)?;
            progress |= self.place_markers()?;
            if self.pending.is_none() && commands.is_empty() {
                // Nothing more to add right now: a stream whose socket would go idle
                // sends its partial batch (else it keeps filling, compressing better).
                for i in 0..self.streams.len() {
                    let st = &self.streams[i];
                    if self.stages[i].batch_pending()
                        && st.inflight.is_none()
                        && st.queue.is_empty()
                    {
                        let mut buffers =
                            PoolBuffers::new(&mut self.pool, &mut self.streams, self.fill_limit);
                        progress |= self.stager.flush_batch(&mut buffers, &mut self.stages, i)?;
                    }
                }
                // Send partial buffers instead of waiting for them to fill.
                for st in &mut self.streams {
                    st.queue_filling(&mut self.pool, Marker::None);
                }
            }
            progress |= self.submit_sends()?;
            if Instant::now() >= next_telemetry {
                next_telemetry = Instant::now() + config.telemetry_interval;
                push_event(events, TxEvent::Worker(self.telemetry()));
                // A lost stream's counters stop here (a replacement counts on).
                for i in (0..self.streams.len()).filter(|&i| !self.streams[i].lost) {
                    push_event(events, self.stream_telemetry(i));
                }
            }
            if self.finishing && self.streams.iter().all(|st| st.ended) && self.ops_in_flight == 0 {
                return Ok(());
            }
            if self.releasing && self.all_sent() {
                return Ok(());
            }
            if progress {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < self.idle.spin {
                std::hint::spin_loop();
            } else if self.ops_in_flight > 0 {
                wait_cqe(&self.ring, self.idle.park).map_err(ring_error("io_uring wait"))?;
            } else {
                std::thread::park_timeout(self.idle.park);
            }
        }
    }

    fn local(&self, stream: u16) -> Result<usize, TxError> {
        self.streams
            .iter()
            .position(|st| st.id == stream)
            .ok_or(TxError::UnknownStream { stream })
    }

    fn take_commands(
        &mut self,
        commands: &mut Consumer<TxCommand>,
        events: &mut Producer<TxEvent>,
    ) -> Result<bool, TxError> {
        let mut progress = false;
        loop {
            // A round or stream end waits until every stream has its marker queued.
            if self.streams.iter().any(|st| {
                st.needs_round_marker || st.needs_stream_map.is_some() || st.needs_stream_end
            }) {
                return Ok(progress);
            }
            if !self.apply_control(events)? {
                return Ok(progress);
            }
            let Some(cmd) = self.pending.take().or_else(|| commands.pop()) else {
                self.set_stalled(false);
                return Ok(progress);
            };
            match cmd {
                TxCommand::Pages { stream, .. } | TxCommand::DeviceState { stream, .. }
                    if self.streams[self.local(stream)?].lost => {}
                TxCommand::Pages {
                    stream,
                    first,
                    count,
                    known_zero,
                } => {
                    let i = self.local(stream)?;
                    let mut buffers =
                        PoolBuffers::new(&mut self.pool, &mut self.streams, self.fill_limit);
                    if !self.stager.stage(
                        &mut buffers,
                        &mut self.stages,
                        i,
                        (first, count),
                        known_zero,
                    )? {
                        self.pending = Some(cmd);
                        self.set_stalled(true);
                        return Ok(progress);
                    }
                    self.set_stalled(false);
                }
                TxCommand::DeviceState {
                    stream,
                    offset,
                    ref bytes,
                } => {
                    let i = self.local(stream)?;
                    let mut buffers =
                        PoolBuffers::new(&mut self.pool, &mut self.streams, self.fill_limit);
                    let header = FrameHeader::device_state(offset, bytes.len());
                    if !self.stager.payload_frame(
                        &mut buffers,
                        &mut self.stages,
                        i,
                        header,
                        bytes,
                    )? {
                        self.pending = Some(cmd);
                        self.set_stalled(true);
                        return Ok(progress);
                    }
                    self.set_stalled(false);
                }
                TxCommand::EndRound { round } => {
                    self.round = Some(round);
                    self.round_markers_unsent = 0;
                    for st in self.streams.iter_mut().filter(|st| !st.lost) {
                        st.needs_round_marker = true;
                        self.round_markers_unsent += 1;
                    }
                    if self.round_markers_unsent == 0 {
                        // Every stream of this worker is lost: the round is over here.
                        self.closed_round = self.stager.take_round();
                        self.round_sent(events);
                    }
                }
                TxCommand::StreamMap { active } => {
                    for st in self.streams.iter_mut().filter(|st| !st.lost) {
                        st.needs_stream_map = Some(active);
                    }
                }
                TxCommand::Finish => {
                    self.finishing = true;
                    for st in self.streams.iter_mut().filter(|st| !st.lost) {
                        st.needs_stream_end = true;
                    }
                }
                TxCommand::Release => self.releasing = true,
            }
            progress = true;
        }
    }

    /// Apply configuration changes; false while one waits for its batches to be
    /// flushed (nothing may be staged until then).
    fn apply_control(&mut self, events: &mut Producer<TxEvent>) -> Result<bool, TxError> {
        loop {
            let Some(change) = self.pending_control.take().or_else(|| self.control.pop()) else {
                return Ok(true);
            };
            match change {
                TxControl::SetIdle(idle) => self.idle = idle,
                TxControl::DropStream(stream) => {
                    let i = self.local(stream)?;
                    self.lose(i, "given up by the engine".into(), events);
                }
                TxControl::SetZeroCopy(on) => {
                    self.zero_copy = on && self.zero_copy_capable && !self.zc_fell_back;
                }
                _ => {
                    let mut buffers =
                        PoolBuffers::new(&mut self.pool, &mut self.streams, self.fill_limit);
                    if !self.stager.apply(&change, &mut buffers, &mut self.stages)? {
                        self.pending_control = Some(change);
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Append pending round/stream-end markers and queue those buffers.
    fn place_markers(&mut self) -> Result<bool, TxError> {
        let mut progress = false;
        for i in 0..self.streams.len() {
            let st = &self.streams[i];
            let (header, marker) = if st.needs_round_marker {
                (
                    Stager::round_end(self.round.unwrap_or(0), &self.stages[i]),
                    Marker::RoundEnd,
                )
            } else if let Some(active) = st.needs_stream_map {
                (FrameHeader::stream_map(active), Marker::None)
            } else if st.needs_stream_end {
                (FrameHeader::stream_end(), Marker::StreamEnd)
            } else {
                continue;
            };
            let mut buffers = PoolBuffers::new(&mut self.pool, &mut self.streams, self.fill_limit);
            if !self
                .stager
                .marker(&mut buffers, &mut self.stages, i, header)?
            {
                continue;
            }
            let st = &mut self.streams[i];
            debug_assert!(st.filling.is_some(), "the marker went into a buffer");
            st.queue_filling(&mut self.pool, marker);
            match marker {
                Marker::RoundEnd => {
                    st.needs_round_marker = false;
                    self.stages[i].round_pages = 0;
                }
                Marker::None => st.needs_stream_map = None,
                Marker::StreamEnd => st.needs_stream_end = false,
            }
            progress = true;
            if marker == Marker::RoundEnd && self.streams.iter().all(|st| !st.needs_round_marker) {
                self.closed_round = self.stager.take_round();
            }
        }
        Ok(progress)
    }

    fn push_send(&mut self, i: usize) -> Result<(), TxError> {
        let st = &self.streams[i];
        let inflight = st.inflight.as_ref().expect("a send to submit");
        let index = inflight.token.index();
        // SAFETY: offset `sent` < `len` <= buffer size, inside the pool's buffer.
        let ptr = unsafe { self.pool.buf_ptr(&inflight.token).add(inflight.sent) };
        let len = (inflight.len - inflight.sent) as u32;
        let fd = types::Fd(st.socket.as_raw_fd());
        let user_data = (i as u64) << 32 | u64::from(index);
        let zc = self.zero_copy && inflight.len >= self.zc_threshold;
        let sqe = if zc {
            let mut op = opcode::SendZc::new(fd, ptr, len)
                .flags(libc::MSG_WAITALL)
                .zc_flags(IORING_SEND_ZC_REPORT_USAGE);
            if self.registered {
                op = op.buf_index(Some(index as u16));
            }
            op.build()
        } else {
            opcode::Send::new(fd, ptr, len)
                .flags(libc::MSG_WAITALL)
                .build()
        };
        let sqe = sqe.user_data(user_data);
        // SAFETY: the buffer stays owned by `inflight` (not released to the pool) until
        // the send completes and, for SEND_ZC, until its notification; the socket stays
        // open until the worker has drained every completion.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| TxError::SubmissionQueueFull)?;
        self.ops_in_flight += 1;
        if zc {
            self.zc_sends += 1;
        }
        Ok(())
    }

    fn submit_sends(&mut self) -> Result<bool, TxError> {
        let mut pushed = false;
        for i in 0..self.streams.len() {
            if self.streams[i].inflight.is_some() || self.streams[i].queue.is_empty() {
                continue;
            }
            // The buffer's frames may name pages written by RMA: delivered first.
            self.stages[i].deliver_rma()?;
            let st = &mut self.streams[i];
            let Some((token, len, marker)) = st.queue.pop_front() else {
                continue;
            };
            st.inflight = Some(InFlight {
                token,
                len,
                sent: 0,
                marker,
            });
            self.push_send(i)?;
            pushed = true;
        }
        if pushed {
            self.ring.submit().map_err(ring_error("io_uring_enter"))?;
        }
        Ok(pushed)
    }

    fn reap(&mut self, events: &mut Producer<TxEvent>) -> Result<bool, TxError> {
        let mut progress = false;
        let mut resubmit = Vec::new();
        let mut failure = None;
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        // Every completion taken off the ring is accounted for, even after a failure:
        // teardown waits for exactly the operations still in the kernel.
        for (user_data, result, flags) in cqes {
            progress = true;
            let i = (user_data >> 32) as usize;
            let index = (user_data & 0xFFFF_FFFF) as usize;
            if cqueue::notif(flags) {
                self.zc_notifications += 1;
                if result as u32 & IORING_NOTIF_USAGE_ZC_COPIED != 0 {
                    self.zc_copied += 1;
                }
                // The kernel says it copied anyway (loopback, veth across namespaces):
                // zero-copy then only adds cost, so fall back to copying sends, as
                // Documentation/networking/msg_zerocopy.rst suggests.
                if self.zero_copy
                    && self.zc_notifications >= ZC_PROBE_SENDS
                    && self.zc_copied == self.zc_notifications
                {
                    self.zero_copy = false;
                    self.zc_fell_back = true;
                }
                let slot = &mut self.awaiting_notif[index];
                slot.0 -= 1;
                if slot.0 == 0
                    && let Some(token) = slot.1.take()
                {
                    self.pool.release(token);
                }
                self.ops_in_flight -= 1;
                continue;
            }
            if cqueue::more(flags) {
                // A notification will follow for this buffer.
                self.awaiting_notif[index].0 += 1;
            } else {
                self.ops_in_flight -= 1;
            }
            if failure.is_some() {
                continue;
            }
            if let Err(e) = self.complete_send(i, result, events, &mut resubmit) {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        for i in resubmit {
            self.push_send(i)?;
        }
        if progress {
            self.ring.submit().map_err(ring_error("io_uring_enter"))?;
        }
        Ok(progress)
    }

    /// A send on stream `i` completed with `result` bytes (or an error).
    fn complete_send(
        &mut self,
        i: usize,
        result: i32,
        events: &mut Producer<TxEvent>,
        resubmit: &mut Vec<usize>,
    ) -> Result<(), TxError> {
        let st = &mut self.streams[i];
        let stream = st.id;
        if st.lost {
            // The send of a stream given up meanwhile: only its buffer matters now.
            if let Some(done) = st.inflight.take() {
                self.return_buffer(done.token);
            }
            return Ok(());
        }
        if result < 0 {
            let error = TxError::Send {
                stream,
                error: OsError::from_errno(-result),
            };
            self.send_failed(i, error, events);
            return Ok(());
        }
        let Some(inflight) = st.inflight.as_mut() else {
            return Err(TxError::CompletionWithoutSend { stream });
        };
        inflight.sent += result as usize;
        st.bytes += result as u64;
        if inflight.sent < inflight.len {
            if result == 0 {
                self.send_failed(i, TxError::PeerStoppedReading { stream }, events);
                return Ok(());
            }
            resubmit.push(i);
            return Ok(());
        }
        let done = st.inflight.take().expect("checked above");
        match done.marker {
            Marker::RoundEnd => {
                self.round_markers_unsent -= 1;
                if self.round_markers_unsent == 0 {
                    self.round_sent(events);
                }
            }
            Marker::StreamEnd => st.ended = true,
            Marker::None => {}
        }
        self.return_buffer(done.token);
        Ok(())
    }

    /// Stream `i`'s send failed with `error`: its buffer goes back, the stream is lost.
    fn send_failed(&mut self, i: usize, error: TxError, events: &mut Producer<TxEvent>) {
        if let Some(done) = self.streams[i].inflight.take() {
            self.return_buffer(done.token);
        }
        self.lose(i, error.to_string(), events);
    }

    /// Report the closed round sent (every stream's marker is in the kernel).
    fn round_sent(&mut self, events: &mut Producer<TxEvent>) {
        let counts = std::mem::take(&mut self.closed_round);
        push_event(
            events,
            TxEvent::RoundSent {
                worker: self.worker,
                round: self.round.unwrap_or(0),
                zero_pages: counts.zero_pages,
                raw_pages: counts.content_pages,
                bytes: counts.bytes,
            },
        );
    }

    /// A sent buffer goes back to the pool, or waits for its zero-copy notification.
    fn return_buffer(&mut self, token: BufToken) {
        let slot = &mut self.awaiting_notif[token.index() as usize];
        if slot.0 > 0 {
            slot.1 = Some(token);
        } else {
            self.pool.release(token);
        }
    }

    /// Give stream `i` up (see [`TxEvent::StreamLost`]): shut its socket (a send in
    /// flight then completes), drop what it had staged and queued, and stop counting
    /// it in round and stream ends.
    fn lose(&mut self, i: usize, why: String, events: &mut Producer<TxEvent>) {
        let st = &mut self.streams[i];
        if st.lost {
            return;
        }
        st.lost = true;
        st.ended = true;
        shutdown(&st.socket);
        let marker_placed = st.queue.iter().any(|q| q.2 == Marker::RoundEnd)
            || st
                .inflight
                .as_ref()
                .is_some_and(|f| f.marker == Marker::RoundEnd);
        let marker_unplaced = st.needs_round_marker;
        if let Some(inflight) = &mut st.inflight {
            // Its completion no longer ends anything.
            inflight.marker = Marker::None;
        }
        st.needs_round_marker = false;
        st.needs_stream_map = None;
        st.needs_stream_end = false;
        let stream = st.id;
        let mut dropped: Vec<BufToken> = st.queue.drain(..).map(|q| q.0).collect();
        dropped.extend(st.filling.take().map(|f| f.0));
        for token in dropped {
            self.pool.release(token);
        }
        let pages = self.stages[i].pages;
        self.stages[i].close_rma();
        self.stages[i] = self.stager.stream(stream);
        self.stages[i].pages = pages;
        if marker_unplaced && self.streams.iter().all(|st| !st.needs_round_marker) {
            // It was the last stream whose marker was still to be placed.
            self.closed_round = self.stager.take_round();
        }
        if marker_placed || marker_unplaced {
            self.round_markers_unsent -= 1;
            if self.round_markers_unsent == 0 {
                self.round_sent(events);
            }
        }
        push_event(events, TxEvent::StreamLost { stream, error: why });
    }

    /// Complete or cancel everything the kernel still holds, so no buffer is freed
    /// under it. On error paths the sockets are shut down first, which completes
    /// pending sends.
    fn drain(&mut self) {
        if self.ops_in_flight > 0 && !(self.finishing && self.streams.iter().all(|s| s.ended)) {
            for st in &self.streams {
                shutdown(&st.socket);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ops_in_flight > 0 && Instant::now() < deadline {
            let _ = wait_cqe(&self.ring, Duration::from_millis(10));
            let cqes: Vec<(u64, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.flags()))
                .collect();
            for (_, flags) in cqes {
                if cqueue::notif(flags) || !cqueue::more(flags) {
                    self.ops_in_flight -= 1;
                }
            }
        }
        if self.ops_in_flight > 0 {
            // The kernel still holds buffers: leaking them is the only safe choice.
            eprintln!(
                "dwcp-tx{}: {} io_uring operations did not complete; leaking their buffers",
                self.worker, self.ops_in_flight
            );
            let pool = std::mem::replace(
                &mut self.pool,
                BufferPool::new(
                    1,
                    64,
                    &ArenaOptions {
                        prefer: PagePreference::Small,
                        numa_node: None,
                        populate: false,
                    },
                )
                .expect("a 64-byte pool"),
            );
            std::mem::forget(pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crc_table::CrcTable;
    use crate::memory::GuestMemory;
    use std::sync::Arc;

    /// A worker's state for one connected stream, built on this thread.
    fn worker_state(zero_copy: bool) -> TxWorkerState {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let memory = Arc::new(GuestMemory::anonymous(1 << 20, PagePreference::Small).unwrap());
        let setup = TxSetup {
            table: Arc::new(CrcTable::new(memory.pages())),
            memory,
            codec: None,
            records: None,
            rma: None,
        };
        let (_control, control_rx) = ring::channel(CONTROL_RING);
        TxWorkerState::new(
            0,
            vec![(0, socket)],
            setup,
            &TransportConfig::default(),
            zero_copy,
            control_rx,
        )
        .expect("a worker's ring and pool")
    }

    #[test]
    fn the_pool_is_registered_only_for_zero_copy_sends() {
        if let Err(why) = super::super::probe() {
            eprintln!("skipped: io_uring unavailable: {why}");
            return;
        }
        // Plain sends copy from any address: pinning the pool would only cost setup.
        assert!(!worker_state(false).registered);
        // Zero-copy sends name their registered buffer. Pinning counts against
        // RLIMIT_MEMLOCK unless the process may lock memory (root here), and a worker
        // refused it goes on unregistered.
        let zero_copy = worker_state(true);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(zero_copy.registered);
        } else if !zero_copy.registered {
            eprintln!("note: not root, and the pool's registration was refused (RLIMIT_MEMLOCK)");
        }
    }
}
