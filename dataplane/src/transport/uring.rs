//! io_uring transport: one ring per worker, owning its streams and buffers.
//!
//! Send side (`spawn_tx`): pages are staged into 1 MiB buffers of a hugepage pool
//! registered with the ring (`IORING_REGISTER_BUFFERS`). Each stream has at most one
//! send in flight: io_uring does not order two sends on one socket, and one large send
//! (`MSG_WAITALL`, retried by the kernel on short writes) keeps the socket busy. Sends at
//! or above the zero-copy threshold use `SEND_ZC` with the fixed buffer: its first
//! completion means the bytes are queued, its *notification* completion that the kernel
//! no longer reads the buffer; only then does the buffer go back to the pool (bugs in
//! several runtimes came from reusing it at the first completion). Submissions are
//! batched: every SQE a loop pass produces goes in with one `io_uring_enter`.
//!
//! Receive side (`spawn_rx`): each stream has its own provided-buffer ring
//! (`IORING_REGISTER_PBUF_RING`) and one multishot `RECV`; the kernel picks a buffer per
//! completion, the frame parser consumes it at once (copying page bytes straight into
//! guest memory) and the buffer goes back on the ring. One ring per stream means a slow
//! stream can never starve another of buffers.
//!
//! Teardown: before any buffer is freed, every request is completed or cancelled
//! (sockets are shut down, then completions are drained), so the kernel never touches
//! freed memory.

use super::frames::{stage_marker, stage_run, stage_space};
use super::{
    CONTROL_RING, IdleStrategy, RxEvent, RxSetup, RxWorker, StreamTelemetry, TransportConfig,
    TxCommand, TxControl, TxEvent, TxSetup, TxWorker, WORKER_RING, WorkerTelemetry, pin,
    push_event,
};
use crate::codec::{CodecSetup, StreamCodec, WorkerCodec};
use crate::crc_table::CrcTable;
use crate::memory::GuestMemory;
use crate::ring::{self, Consumer, Producer};
use crate::transport::frames::FrameParser;
use crate::transport::socket;
use crate::wire::{FRAME_HEADER_LEN, FrameHeader};
use dwcp_hugepages::{Arena, ArenaOptions, BufToken, BufferPool, PagePreference};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Full buffers a stream may stage beyond the one being sent.
/// Most a worker's send pool may hold when sized for zero-copy cover.
const ZERO_COPY_POOL_BUDGET: usize = 64 << 20;

const STAGED_AHEAD: usize = 1;

/// Zero-copy notifications to see before deciding whether the kernel really avoids
/// the copy on this path.
const ZC_PROBE_SENDS: u64 = 8;

/// include/uapi/linux/io_uring.h
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// What this kernel's io_uring offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringCaps {
    /// Operations found by `IORING_REGISTER_PROBE` and by trying them.
    pub ops: Vec<&'static str>,
    /// `SEND_ZC` is available.
    pub send_zc: bool,
}

/// Probe io_uring: a ring, the opcodes, and a real multishot receive into a provided
/// buffer ring over a socket pair (what the receive path needs, tested end to end).
pub fn probe() -> Result<UringCaps, String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    let mut ops = Vec::new();
    for (code, name) in [
        (opcode::Send::CODE, "SEND"),
        (opcode::SendZc::CODE, "SEND_ZC"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if probe.is_supported(code) {
            ops.push(name);
        }
    }
    for needed in ["SEND", "RECV"] {
        if !ops.contains(&needed) {
            return Err(format!("opcode {needed} not supported"));
        }
    }
    let send_zc = ops.contains(&"SEND_ZC");
    drop(ring);
    probe_multishot_recv()?;
    ops.push("RECV_MULTISHOT");
    ops.push("PBUF_RING");
    Ok(UringCaps { ops, send_zc })
}

fn probe_multishot_recv() -> Result<(), String> {
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let mut ring = IoUring::new(8).map_err(|e| e.to_string())?;
    let mut bufs =
        ProvidedBuffers::new(&ring, 0, 2, 256).map_err(|e| format!("provided buffer ring: {e}"))?;
    bufs.provide_all();
    let recv = opcode::RecvMulti::new(types::Fd(b.as_raw_fd()), 0)
        .build()
        .user_data(1);
    // SAFETY: the buffers the kernel will pick belong to `bufs`, which lives until the
    // request has completed (drained below) and the ring is gone.
    unsafe { ring.submission().push(&recv) }.map_err(|_| "submission queue full".to_string())?;
    ring.submit().map_err(|e| e.to_string())?;
    use std::io::Write;
    (&a).write_all(b"x").map_err(|e| e.to_string())?;
    ring.submit_and_wait(1).map_err(|e| e.to_string())?;
    let cqe = ring.completion().next().ok_or("no completion")?;
    let ok = cqe.result() == 1 && cqueue::buffer_select(cqe.flags()).is_some();
    // Cancel the still-armed multishot and wait for its final completion.
    drop(a);
    let _ = ring.submit_and_wait(1);
    while ring.completion().next().is_some() {}
    drop(ring);
    drop(bufs);
    if ok {
        Ok(())
    } else {
        Err(format!("multishot RECV returned {}", cqe.result()))
    }
}

/// A provided-buffer ring: the ring of descriptors the kernel reads and the buffers
/// they describe, both in memory this value owns.
struct ProvidedBuffers {
    ring_mem: Arena,
    buffers: Arena,
    entries: u16,
    buf_size: usize,
    tail: u16,
    bgid: u16,
    registered: bool,
}

impl ProvidedBuffers {
    fn new(ring: &IoUring, bgid: u16, entries: u16, buf_size: usize) -> std::io::Result<Self> {
        assert!(entries.is_power_of_two());
        let opts = ArenaOptions {
            prefer: PagePreference::Small,
            numa_node: None,
            populate: true,
        };
        let io = |e: dwcp_hugepages::MemoryError| std::io::Error::other(e.to_string());
        let ring_mem = Arena::new(
            usize::from(entries) * std::mem::size_of::<types::BufRingEntry>(),
            &opts,
        )
        .map_err(io)?;
        let buffers = Arena::new(
            usize::from(entries) * buf_size,
            &ArenaOptions {
                prefer: PagePreference::TransparentHuge,
                ..opts
            },
        )
        .map_err(io)?;
        let mut pb = ProvidedBuffers {
            ring_mem,
            buffers,
            entries,
            buf_size,
            tail: 0,
            bgid,
            registered: false,
        };
        // SAFETY: the descriptor ring is page-aligned memory we own, `entries` long, and
        // outlives the registration (unregistered in `unregister` or with the ring).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pb.ring_mem.as_ptr() as u64,
                entries,
                bgid,
                0,
            )?;
        }
        pb.registered = true;
        Ok(pb)
    }

    fn base(&self) -> *mut types::BufRingEntry {
        self.ring_mem.as_ptr().cast()
    }

    /// Put buffer `bid` at the ring's tail (not yet visible to the kernel).
    fn stage(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.entries - 1));
        // SAFETY: slot < entries, inside the descriptor ring we own; the kernel only
        // reads slots below the published tail, and this one is past it.
        let entry = unsafe { &mut *self.base().add(slot) };
        // SAFETY: bid < entries, so the buffer lies inside `buffers`.
        entry.set_addr(
            unsafe { self.buffers.as_ptr().add(usize::from(bid) * self.buf_size) } as u64,
        );
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make staged buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail lives in the first descriptor's reserved field (the kernel's
        // layout), which is a properly aligned u16 inside memory we own.
        let tail = unsafe { &*types::BufRingEntry::tail(self.base()).cast::<AtomicU16>() };
        // Release: the descriptors written before must be visible before the kernel
        // sees the new tail (it reads the tail with acquire semantics).
        tail.store(self.tail, Ordering::Release);
    }

    fn provide_all(&mut self) {
        for bid in 0..self.entries {
            self.stage(bid);
        }
        self.publish();
    }

    fn give_back(&mut self, bid: u16) {
        self.stage(bid);
        self.publish();
    }

    fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.buf_size;
        &self.buffers.as_slice()[start..start + len.min(self.buf_size)]
    }

    fn unregister(&mut self, ring: &IoUring) {
        if self.registered {
            let _ = ring.submitter().unregister_buf_ring(self.bgid);
            self.registered = false;
        }
    }
}

fn shutdown(socket: &TcpStream) {
    let _ = socket.shutdown(std::net::Shutdown::Both);
}

/// Wait for one completion or `timeout`.
fn wait_cqe(ring: &IoUring, timeout: Duration) -> std::io::Result<()> {
    let ts = types::Timespec::new()
        .sec(timeout.as_secs())
        .nsec(timeout.subsec_nanos());
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------
// Send side
// ---------------------------------------------------------------------------------

struct InFlight {
    token: BufToken,
    len: usize,
    sent: usize,
    marker: Marker,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Marker {
    None,
    RoundEnd,
    StreamEnd,
}

struct TxStream {
    id: u16,
    socket: TcpStream,
    filling: Option<(BufToken, usize)>,
    queue: VecDeque<(BufToken, usize, Marker)>,
    inflight: Option<InFlight>,
    round_pages: u32,
    needs_round_marker: bool,
    /// A stream map marker to send (after the round marker, if one is due).
    needs_stream_map: Option<u16>,
    needs_stream_end: bool,
    ended: bool,
    bytes: u64,
    pages: u64,
    /// Codec state, when the session may use codecs.
    codec: Option<StreamCodec>,
}

impl TxStream {
    /// The stream's counters, as an event.
    fn telemetry(&self) -> TxEvent {
        TxEvent::Telemetry(StreamTelemetry {
            stream: self.id,
            bytes: self.bytes,
            pages: self.pages,
            tcp: socket::tcp_info(&self.socket),
        })
    }
}

struct TxWorkerState {
    // Field order matters: the ring (and its registration of the pool) goes first.
    ring: IoUring,
    pool: BufferPool,
    /// Buffers whose zero-copy notification is still due, by buffer index.
    awaiting_notif: Vec<(u32, Option<BufToken>)>,
    streams: Vec<TxStream>,
    memory: Arc<GuestMemory>,
    /// The source's CRC table: the CRC of every page sent is recorded there.
    table: Arc<CrcTable>,
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
    round_zero: u64,
    round_raw: u64,
    round_bytes: u64,
    round_markers_unsent: usize,
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
    /// The codec pipeline, when the session may use codecs.
    codec: Option<WorkerCodec>,
    codec_setup: Option<CodecSetup>,
    /// Configuration changes from the engine, and one waiting to be applied.
    control: Consumer<TxControl>,
    pending_control: Option<TxControl>,
    /// Counters of the uncoded staging path.
    staged_bytes: u64,
    stage_nanos: u64,
    /// Time spent unable to stage because every buffer was waiting on the socket.
    stalled_nanos: u64,
    stalled_since: Option<Instant>,
}

/// Start a source worker on io_uring for `streams`. The ring is created on the
/// worker's own thread (it is set up single-issuer, which binds it to its creator);
/// setup errors come back here.
pub fn spawn_tx(
    worker: usize,
    streams: Vec<(u16, TcpStream)>,
    setup: TxSetup,
    config: &TransportConfig,
    zero_copy: bool,
    cpu: Option<usize>,
) -> std::io::Result<TxWorker> {
    let (cmd_tx, cmd_rx) = ring::channel(WORKER_RING);
    let (ctl_tx, ctl_rx) = ring::channel(CONTROL_RING);
    let (evt_tx, evt_rx) = ring::channel(WORKER_RING);
    let config = config.clone();
    let setup_config = config.clone();
    let handle = spawn_worker(
        format!("dwcp-tx{worker}"),
        cpu,
        move || TxWorkerState::new(worker, streams, setup, &setup_config, zero_copy, ctl_rx),
        move |state| tx_main(state, cmd_rx, evt_tx, &config),
    )?;
    Ok(TxWorker {
        commands: cmd_tx,
        control: ctl_tx,
        events: evt_rx,
        thread: handle.thread().clone(),
        handle: Some(handle),
    })
}

/// A ring for one worker thread. Single issuer: only its thread submits. Cooperative
/// task running: the kernel runs completion work when the worker next enters the ring
/// (it does so constantly while busy) instead of interrupting it; measured 12% more
/// throughput and 12% less CPU per GB on four loopback streams.
/// Start a worker thread whose state is built on the thread itself (a single-issuer
/// ring belongs to the thread that creates it); setup errors come back to the caller.
fn spawn_worker<S>(
    name: String,
    cpu: Option<usize>,
    setup: impl FnOnce() -> std::io::Result<S> + Send + 'static,
    run: impl FnOnce(S) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        pin(cpu);
        match setup() {
            Ok(state) => {
                let _ = ready_tx.send(Ok(()));
                run(state);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("io_uring worker died during setup"))??;
    Ok(handle)
}

fn new_ring() -> std::io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(256)
        .or_else(|_| IoUring::new(256))
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
        let TxSetup {
            memory,
            table,
            codec,
        } = setup;
        // A zero-copy buffer is pinned until the receiver has consumed its bytes, a
        // socket buffer's worth later: keep enough buffers to cover that, or the sender
        // stalls waiting for notifications.
        // With codecs, a buffer must take a whole flushed batch.
        let buf_size = match &codec {
            Some(setup) => config
                .send_buffer
                .max(setup.max_flush_len() + FRAME_HEADER_LEN),
            None => config.send_buffer,
        };
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
        let mut pool = BufferPool::new(
            buffers,
            buf_size,
            &ArenaOptions {
                prefer: PagePreference::Huge2M,
                numa_node: None,
                populate: false,
            },
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Fault in what uncoded sends use now; the rest of a buffer sized for codec
        // batches faults in only if a batch ever needs it.
        pool.populate_prefix(config.send_buffer);
        // SAFETY: the iovecs describe the pool's buffers, which outlive the
        // registration: `ring` is declared before `pool` in TxWorkerState, so it is
        // dropped (and the registration released) first.
        let registered = unsafe { ring.submitter().register_buffers(&pool.iovecs()) }.is_ok();
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
                    round_pages: 0,
                    needs_round_marker: false,
                    needs_stream_map: None,
                    needs_stream_end: false,
                    ended: false,
                    bytes: 0,
                    pages: 0,
                    codec: codec.as_ref().map(StreamCodec::for_setup),
                })
                .collect(),
            memory,
            table,
            worker,
            zero_copy,
            zero_copy_capable: zero_copy,
            zc_threshold: config.zero_copy_threshold,
            registered,
            idle: config.idle,
            pending: None,
            round: None,
            round_zero: 0,
            round_raw: 0,
            round_bytes: 0,
            round_markers_unsent: 0,
            finishing: false,
            releasing: false,
            zc_copied: 0,
            zc_sends: 0,
            zc_notifications: 0,
            zc_fell_back: false,
            ops_in_flight: 0,
            fill_limit: config.send_buffer,
            codec: codec.as_ref().map(|setup| {
                let mut c = WorkerCodec::new();
                c.set_settings(setup.permit(setup.initial), std::iter::empty());
                c
            }),
            codec_setup: codec,
            control,
            pending_control: None,
            staged_bytes: 0,
            stage_nanos: 0,
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
            && self.streams.iter().all(|st| {
                st.filling.as_ref().is_none_or(|(_, len)| *len == 0)
                    && st.queue.is_empty()
                    && st.inflight.is_none()
                    && !st.needs_round_marker
                    && st.needs_stream_map.is_none()
                    && st.codec.as_ref().is_none_or(|c| c.pending() == 0)
            })
    }

    /// Whether runs go through the codec pipeline now.
    fn coding(&self) -> bool {
        self.codec.as_ref().is_some_and(|c| !c.settings().is_off())
    }

    /// Move stream `i`'s codec batch into its send buffer; false when no buffer has
    /// room for it yet.
    fn flush_batch(&mut self, i: usize) -> bool {
        let need = match (&self.codec, &self.streams[i].codec) {
            (Some(codec), Some(batch)) if batch.pending() > 0 => codec.flush_bound(batch),
            _ => return true,
        };
        if !self.room(i, need) {
            return false;
        }
        let st = &mut self.streams[i];
        let (token, len) = st.filling.as_mut().expect("room() provided a buffer");
        let buf = self.pool.buf_mut(token);
        let codec = self.codec.as_mut().expect("checked above");
        let n = codec.flush(st.codec.as_mut().expect("checked above"), &mut buf[*len..]);
        *len += n;
        self.round_bytes += n as u64;
        true
    }

    /// Flush every batch; false when some could not be flushed yet.
    fn flush_all_batches(&mut self) -> bool {
        // Every stream is tried, even after one found no room.
        let mut all = true;
        for i in 0..self.streams.len() {
            all &= self.flush_batch(i);
        }
        all
    }

    fn telemetry(&self) -> WorkerTelemetry {
        let stalling = self
            .stalled_since
            .map_or(0, |t| t.elapsed().as_nanos() as u64);
        WorkerTelemetry::new(
            self.worker,
            self.codec.as_ref(),
            self.staged_bytes,
            self.stage_nanos,
            self.stalled_nanos + stalling,
        )
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

fn tx_main(
    mut s: TxWorkerState,
    mut commands: Consumer<TxCommand>,
    mut events: Producer<TxEvent>,
    config: &TransportConfig,
) {
    let result = s.run(&mut commands, &mut events, config);
    if let Err(error) = &result {
        push_event(
            &mut events,
            TxEvent::Failed {
                worker: s.worker,
                error: error.clone(),
            },
        );
    }
    s.drain();
    // Final counters, so that whoever carries the streams on counts from them.
    for st in &s.streams {
        push_event(&mut events, st.telemetry());
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
}

impl TxWorkerState {
    fn run(
        &mut self,
        commands: &mut Consumer<TxCommand>,
        events: &mut Producer<TxEvent>,
        config: &TransportConfig,
    ) -> Result<(), String> {
        let mut idle = 0u32;
        let mut next_telemetry = Instant::now() + config.telemetry_interval;
        loop {
            let mut progress = self.reap(events)?;
            progress |= self.take_commands(commands)?;
            progress |= self.place_markers();
            if self.pending.is_none() && commands.is_empty() {
                // Nothing more to add right now: a stream whose socket would go idle
                // sends its partial batch (else it keeps filling, compressing better).
                for i in 0..self.streams.len() {
                    let st = &self.streams[i];
                    let pending = st.codec.as_ref().is_some_and(|c| c.pending() > 0);
                    if pending && st.inflight.is_none() && st.queue.is_empty() {
                        progress |= self.flush_batch(i);
                    }
                }
                // Send partial buffers instead of waiting for them to fill.
                for st in &mut self.streams {
                    if let Some((token, len)) = st.filling.take() {
                        if len > 0 {
                            st.queue.push_back((token, len, Marker::None));
                        } else {
                            self.pool.release(token);
                        }
                    }
                }
            }
            progress |= self.submit_sends()?;
            if Instant::now() >= next_telemetry {
                next_telemetry = Instant::now() + config.telemetry_interval;
                push_event(events, TxEvent::Worker(self.telemetry()));
                for st in &self.streams {
                    push_event(events, st.telemetry());
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
                wait_cqe(&self.ring, self.idle.park).map_err(|e| format!("io_uring wait: {e}"))?;
            } else {
                std::thread::park_timeout(self.idle.park);
            }
        }
    }

    fn local(&self, stream: u16) -> Result<usize, String> {
        self.streams
            .iter()
            .position(|st| st.id == stream)
            .ok_or_else(|| format!("stream {stream} is not on this worker"))
    }

    /// Make sure stream `i` has a buffer with `need` bytes free; false when none is.
    ///
    /// A stream stages at most [`STAGED_AHEAD`] full buffers beyond the one in flight:
    /// staged pages are still in cache when the kernel copies them into the socket, which
    /// measured faster than staging further ahead (the pool may hold more buffers, for
    /// zero-copy sends awaiting their notifications).
    fn room(&mut self, i: usize, need: usize) -> bool {
        let st = &mut self.streams[i];
        if let Some((_, len)) = st.filling
            && len + need <= self.pool.buf_size()
            && (len == 0 || len + need <= self.fill_limit)
        {
            return true;
        }
        if st.queue.len() >= STAGED_AHEAD {
            return false;
        }
        if let Some((token, len)) = st.filling.take() {
            st.queue.push_back((token, len, Marker::None));
        }
        match self.pool.acquire() {
            Some(token) => {
                st.filling = Some((token, 0));
                true
            }
            None => false,
        }
    }

    fn take_commands(&mut self, commands: &mut Consumer<TxCommand>) -> Result<bool, String> {
        let mut progress = false;
        loop {
            // A round or stream end waits until every stream has its marker queued.
            if self.streams.iter().any(|st| {
                st.needs_round_marker || st.needs_stream_map.is_some() || st.needs_stream_end
            }) {
                return Ok(progress);
            }
            if !self.apply_control() {
                return Ok(progress);
            }
            let Some(cmd) = self.pending.take().or_else(|| commands.pop()) else {
                self.set_stalled(false);
                return Ok(progress);
            };
            match cmd {
                TxCommand::Pages {
                    stream,
                    first,
                    count,
                } => {
                    let i = self.local(stream)?;
                    if self.coding() {
                        if !self.stage_coded(i, first, count) {
                            self.pending = Some(cmd);
                            self.set_stalled(true);
                            return Ok(progress);
                        }
                    } else if !self.stage_raw(i, first, count) {
                        self.pending = Some(cmd);
                        self.set_stalled(true);
                        return Ok(progress);
                    }
                    self.set_stalled(false);
                    let st = &mut self.streams[i];
                    st.round_pages += count;
                    st.pages += u64::from(count);
                }
                TxCommand::EndRound { round } => {
                    self.round = Some(round);
                    self.round_markers_unsent = self.streams.len();
                    for st in &mut self.streams {
                        st.needs_round_marker = true;
                    }
                }
                TxCommand::StreamMap { active } => {
                    for st in &mut self.streams {
                        st.needs_stream_map = Some(active);
                    }
                }
                TxCommand::Finish => {
                    self.finishing = true;
                    for st in &mut self.streams {
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
    fn apply_control(&mut self) -> bool {
        loop {
            let Some(change) = self.pending_control.take().or_else(|| self.control.pop()) else {
                return true;
            };
            match change {
                TxControl::SetCodec(settings) => {
                    // Batches made under the old settings go out first.
                    if !self.flush_all_batches() {
                        self.pending_control = Some(TxControl::SetCodec(settings));
                        return false;
                    }
                    if let (Some(codec), Some(setup)) = (&mut self.codec, &self.codec_setup) {
                        let streams = self.streams.iter_mut().filter_map(|st| st.codec.as_mut());
                        codec.set_settings(setup.permit(settings), streams);
                    }
                }
                TxControl::SetDictionary(dictionary) => {
                    if let Some(codec) = &mut self.codec {
                        codec.set_dictionary(Some(dictionary));
                    }
                }
                TxControl::SetIdle(idle) => self.idle = idle,
                TxControl::SetZeroCopy(on) => {
                    self.zero_copy = on && self.zero_copy_capable && !self.zc_fell_back;
                }
                TxControl::ForgetSentPages => {
                    // Batches encoded against the caches go out first.
                    if !self.flush_all_batches() {
                        self.pending_control = Some(TxControl::ForgetSentPages);
                        return false;
                    }
                    for st in &mut self.streams {
                        if let Some(codec) = &mut st.codec {
                            codec.forget();
                        }
                    }
                }
            }
        }
    }

    /// Stage a run on stream `i` as it is; false when no buffer has room.
    fn stage_raw(&mut self, i: usize, first: u64, count: u32) -> bool {
        if !self.room(i, stage_space(count)) {
            return false;
        }
        let started = Instant::now();
        let st = &mut self.streams[i];
        let (token, len) = st.filling.as_mut().expect("room() provided a buffer");
        let buf = self.pool.buf_mut(token);
        let staged = stage_run(
            &self.memory,
            first,
            count,
            &mut buf[*len..],
            Some(self.table.recorder(st.id)),
        );
        *len += staged.bytes;
        self.round_zero += u64::from(staged.zero_pages);
        self.round_raw += u64::from(staged.raw_pages);
        self.round_bytes += staged.bytes as u64;
        self.staged_bytes += staged.bytes as u64;
        self.stage_nanos += started.elapsed().as_nanos() as u64;
        true
    }

    /// Encode a run on stream `i` into its batch, flushing a full batch first; false
    /// when that flush found no room.
    fn stage_coded(&mut self, i: usize, first: u64, count: u32) -> bool {
        let full = match (&self.codec, &self.streams[i].codec) {
            (Some(codec), Some(batch)) => codec.batch_full(batch, count),
            _ => false,
        };
        if full && !self.flush_batch(i) {
            return false;
        }
        let id = self.streams[i].id;
        let (Some(codec), Some(batch)) = (&mut self.codec, &mut self.streams[i].codec) else {
            return self.stage_raw(i, first, count);
        };
        let recorder = Some(self.table.recorder(id));
        let run = codec.encode_run(batch, &self.memory, first, count, recorder);
        self.round_zero += u64::from(run.zero_pages);
        self.round_raw += u64::from(run.content_pages);
        true
    }

    /// Append pending round/stream-end markers and queue those buffers.
    fn place_markers(&mut self) -> bool {
        let mut progress = false;
        for i in 0..self.streams.len() {
            let st = &self.streams[i];
            let header = if st.needs_round_marker {
                FrameHeader::round_end(self.round.unwrap_or(0), st.round_pages)
            } else if let Some(active) = st.needs_stream_map {
                FrameHeader::stream_map(active)
            } else if st.needs_stream_end {
                FrameHeader::stream_end()
            } else {
                continue;
            };
            if !self.flush_batch(i) || !self.room(i, FRAME_HEADER_LEN) {
                continue;
            }
            let st = &mut self.streams[i];
            let (token, mut len) = st.filling.take().expect("room() provided a buffer");
            len += stage_marker(header, &mut self.pool.buf_mut(&token)[len..]);
            self.round_bytes += FRAME_HEADER_LEN as u64;
            let marker = if st.needs_round_marker {
                st.needs_round_marker = false;
                st.round_pages = 0;
                Marker::RoundEnd
            } else if st.needs_stream_map.take().is_some() {
                Marker::None
            } else {
                st.needs_stream_end = false;
                Marker::StreamEnd
            };
            st.queue.push_back((token, len, marker));
            progress = true;
        }
        progress
    }

    fn push_send(&mut self, i: usize) -> Result<(), String> {
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
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| "submission queue full".to_string())?;
        self.ops_in_flight += 1;
        if zc {
            self.zc_sends += 1;
        }
        Ok(())
    }

    fn submit_sends(&mut self) -> Result<bool, String> {
        let mut pushed = false;
        for i in 0..self.streams.len() {
            let st = &mut self.streams[i];
            if st.inflight.is_some() {
                continue;
            }
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
            self.ring
                .submit()
                .map_err(|e| format!("io_uring_enter: {e}"))?;
        }
        Ok(pushed)
    }

    fn reap(&mut self, events: &mut Producer<TxEvent>) -> Result<bool, String> {
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
            self.ring
                .submit()
                .map_err(|e| format!("io_uring_enter: {e}"))?;
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
    ) -> Result<(), String> {
        let st = &mut self.streams[i];
        if result < 0 {
            return Err(format!(
                "stream {}: send failed: {}",
                st.id,
                std::io::Error::from_raw_os_error(-result)
            ));
        }
        let Some(inflight) = st.inflight.as_mut() else {
            return Err(format!("stream {}: completion without a send", st.id));
        };
        inflight.sent += result as usize;
        st.bytes += result as u64;
        if inflight.sent < inflight.len {
            if result == 0 {
                return Err(format!("stream {}: peer stopped reading", st.id));
            }
            resubmit.push(i);
            return Ok(());
        }
        let done = st.inflight.take().expect("checked above");
        match done.marker {
            Marker::RoundEnd => {
                self.round_markers_unsent -= 1;
                if self.round_markers_unsent == 0 {
                    push_event(
                        events,
                        TxEvent::RoundSent {
                            worker: self.worker,
                            round: self.round.unwrap_or(0),
                            zero_pages: std::mem::take(&mut self.round_zero),
                            raw_pages: std::mem::take(&mut self.round_raw),
                            bytes: std::mem::take(&mut self.round_bytes),
                        },
                    );
                }
            }
            Marker::StreamEnd => st.ended = true,
            Marker::None => {}
        }
        let slot = &mut self.awaiting_notif[done.token.index() as usize];
        if slot.0 > 0 {
            slot.1 = Some(done.token);
        } else {
            self.pool.release(done.token);
        }
        Ok(())
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

// ---------------------------------------------------------------------------------
// Receive side
// ---------------------------------------------------------------------------------

struct RxStream {
    id: u16,
    socket: TcpStream,
    parser: FrameParser,
    buffers: ProvidedBuffers,
    armed: bool,
    eof: bool,
    reported_bytes: u64,
}

/// Start a destination worker on io_uring for `streams`. As on
/// the send side, the ring and its buffer rings are set up on the worker's thread.
pub fn spawn_rx(
    worker: usize,
    streams: Vec<(u16, TcpStream)>,
    rx_setup: RxSetup,
    config: &TransportConfig,
    cpu: Option<usize>,
) -> std::io::Result<RxWorker> {
    let (evt_tx, evt_rx) = ring::channel(WORKER_RING);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let config = config.clone();
    let setup_config = config.clone();
    let setup = move || -> std::io::Result<(IoUring, Vec<RxStream>)> {
        let ring = new_ring()?;
        let mut rx = Vec::with_capacity(streams.len());
        for (local, (id, socket)) in streams.into_iter().enumerate() {
            let mut buffers = ProvidedBuffers::new(
                &ring,
                local as u16,
                setup_config.recv_buffers_per_stream.next_power_of_two(),
                setup_config.recv_buffer,
            )?;
            buffers.provide_all();
            rx.push(RxStream {
                id,
                socket,
                parser: rx_setup.parser(id),
                buffers,
                armed: false,
                eof: false,
                reported_bytes: 0,
            });
        }
        Ok((ring, rx))
    };
    let handle = spawn_worker(format!("dwcp-rx{worker}"), cpu, setup, move |(ring, rx)| {
        rx_main(ring, rx, evt_tx, &stop_flag, &config)
    })?;
    Ok(RxWorker {
        events: evt_rx,
        handle: Some(handle),
        stop,
    })
}

fn rx_main(
    mut ring: IoUring,
    mut streams: Vec<RxStream>,
    mut events: Producer<RxEvent>,
    stop: &AtomicBool,
    config: &TransportConfig,
) {
    let mut in_flight = 0usize;
    let failure = rx_loop(
        &mut ring,
        &mut streams,
        &mut events,
        stop,
        config,
        &mut in_flight,
    )
    .err();
    if let Some((stream, error)) = failure {
        push_event(&mut events, RxEvent::Failed { stream, error });
    }
    // Teardown: shut the sockets so every armed receive completes, drain, then
    // unregister the buffer rings before their memory goes.
    for st in &streams {
        shutdown(&st.socket);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight > 0 && Instant::now() < deadline {
        let _ = wait_cqe(&ring, Duration::from_millis(10));
        let cqes: Vec<u32> = ring.completion().map(|c| c.flags()).collect();
        for flags in cqes {
            if !cqueue::more(flags) {
                in_flight -= 1;
            }
        }
    }
    if in_flight > 0 {
        eprintln!("dwcp-rx: {in_flight} receives did not complete; leaking their buffers");
        for st in streams.drain(..) {
            std::mem::forget(st.buffers);
        }
    }
    for st in &mut streams {
        st.buffers.unregister(&ring);
    }
}

fn rx_loop(
    ring: &mut IoUring,
    streams: &mut [RxStream],
    events: &mut Producer<RxEvent>,
    stop: &AtomicBool,
    config: &TransportConfig,
    in_flight: &mut usize,
) -> Result<(), (u16, String)> {
    let mut idle = 0u32;
    let mut next_telemetry = Instant::now() + config.telemetry_interval;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Arm a multishot receive on every stream that needs one.
        let mut armed_any = false;
        for (i, st) in streams.iter_mut().enumerate() {
            if st.armed || st.eof {
                continue;
            }
            let recv = opcode::RecvMulti::new(types::Fd(st.socket.as_raw_fd()), i as u16)
                .build()
                .user_data(i as u64)
                .flags(squeue::Flags::empty());
            // SAFETY: the kernel fills buffers of `st.buffers`, which are unregistered
            // and freed only after this request's final completion (see rx_main).
            unsafe { ring.submission().push(&recv) }
                .map_err(|_| (st.id, "submission queue full".to_string()))?;
            st.armed = true;
            *in_flight += 1;
            armed_any = true;
        }
        if armed_any {
            ring.submit()
                .map_err(|e| (0, format!("io_uring_enter: {e}")))?;
        }
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        let progress = !cqes.is_empty();
        // Account for every completion first: teardown waits for exactly the receives
        // still armed, whatever the loop below decides.
        for &(user_data, _, flags) in &cqes {
            if !cqueue::more(flags) {
                streams[user_data as usize].armed = false;
                *in_flight -= 1;
            }
        }
        for (user_data, result, flags) in cqes {
            let st = &mut streams[user_data as usize];
            if result == -libc::ENOBUFS {
                // Every buffer of this stream was in use at that instant; they are
                // given back as they are parsed, so re-arming is enough.
                continue;
            }
            if result < 0 {
                return Err((
                    st.id,
                    format!(
                        "receive failed: {}",
                        std::io::Error::from_raw_os_error(-result)
                    ),
                ));
            }
            if result == 0 {
                st.eof = true;
                st.armed = false;
                if !st.parser.is_ended() {
                    return Err((
                        st.id,
                        crate::wire::WireError::UnexpectedEof("data stream").to_string(),
                    ));
                }
                continue;
            }
            let Some(bid) = cqueue::buffer_select(flags) else {
                return Err((st.id, "receive completion without a buffer".into()));
            };
            let id = st.id;
            let data = st.buffers.buffer(bid, result as usize);
            let mut announced = Vec::new();
            let parsed = st.parser.feed(data, &mut |e| announced.push(e));
            st.buffers.give_back(bid);
            parsed.map_err(|e| (id, e.to_string()))?;
            for e in announced {
                push_event(
                    events,
                    RxEvent::from_stream(id, e, st.parser.counters().bytes),
                );
            }
        }
        if streams.iter().all(|st| st.parser.is_ended()) {
            return Ok(());
        }
        if Instant::now() >= next_telemetry {
            next_telemetry = Instant::now() + config.telemetry_interval;
            for st in streams.iter_mut() {
                let bytes = st.parser.counters().bytes;
                if bytes != st.reported_bytes {
                    st.reported_bytes = bytes;
                    push_event(
                        events,
                        RxEvent::Telemetry {
                            stream: st.id,
                            bytes,
                        },
                    );
                }
            }
        }
        if progress {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < config.idle.spin {
            std::hint::spin_loop();
        } else {
            wait_cqe(ring, config.idle.park.max(Duration::from_millis(1)))
                .map_err(|e| (0, format!("io_uring wait: {e}")))?;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_finds_what_the_receive_path_needs_or_says_why_not() {
        match super::probe() {
            Ok(caps) => {
                assert!(caps.ops.contains(&"RECV_MULTISHOT"));
                assert!(caps.ops.contains(&"SEND"));
            }
            Err(why) => assert!(!why.is_empty()),
        }
    }
}
