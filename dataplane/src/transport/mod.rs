//! Moving pages between appliances.
//!
//! The engine talks to *workers*, each owning a group of data streams, through SPSC
//! rings: [`TxCommand`]s in, [`TxEvent`]s back (source side); [`RxEvent`]s back
//! (destination side). How a worker moves bytes is its transport:
//! - [`uring`]: io_uring, one ring per worker: sends from registered hugepage buffers
//!   (`SEND_ZC` above a size threshold, buffers reused only after the notification),
//!   receives with multishot `RECV` into a provided-buffer ring per stream, batched
//!   submissions;
//! - [`plain`]: blocking sockets, one thread per stream; the fallback when io_uring or
//!   an opcode is missing, and a baseline.
//!
//! The shape leaves room for RDMA: a source worker turns page runs into whatever its
//! transport needs (frames in buffers for TCP; one-sided writes into the destination's
//! registered memory plus a small completion message for RDMA), and a destination
//! worker reports the same round and stream events whichever way pages arrived.
//!
//! Also here: [`frames`] (pages to frames and back) and [`socket`] (TCP options,
//! `TCP_INFO`).

/// RMA through libfabric (providers, connected endpoints, registered memory, writes).
pub use dwcp_fabric as fabric;
pub mod frames;
mod inbound;
pub mod plain;
pub mod rma;
pub mod socket;
mod stage;
pub mod uring;

use crate::codec::zstd::Dictionary;
use crate::codec::{CodecCounters, CodecSettings, CodecSetup};
use crate::crc_table::CrcTable;
use crate::memory::GuestMemory;
use crate::ring::{Consumer, Producer};
use crate::security::SessionKeys;
pub use inbound::Inbound;
use socket::{SocketOptions, TcpInfoSample};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Which transport a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// io_uring.
    IoUring,
    /// Blocking sockets.
    Plain,
    /// Page contents by RMA write into the destination's memory, beside the data
    /// streams of io_uring (or plain) workers: a session's setting, not a kind of
    /// worker (workers are told apart by [`TransportKind::IoUring`] and
    /// [`TransportKind::Plain`]; spawned as `Rma`, a worker is an io_uring one).
    Rma,
}

impl TransportKind {
    /// The name in configuration and reports.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::IoUring => "io_uring",
            TransportKind::Plain => "plain",
            TransportKind::Rma => "rma",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportChoice {
    /// io_uring when the kernel has what it needs, else plain sockets.
    Auto,
    /// io_uring (still falls back, with a note, when unavailable).
    IoUring,
    /// Plain sockets.
    Plain,
    /// Page contents by RMA write through libfabric where the destination grants it
    /// ([`crate::wire::caps::RMA`]), beside data streams chosen as for `Auto`.
    Rma,
}

impl FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TransportChoice::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(TransportChoice::IoUring),
            "plain" => Ok(TransportChoice::Plain),
            "rma" => Ok(TransportChoice::Rma),
            other => Err(format!(
                "unknown transport {other:?} (expected auto, io_uring, plain or rma)"
            )),
        }
    }
}

/// How an idle worker waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleStrategy {
    /// Empty polls before sleeping.
    pub spin: u32,
    /// Longest sleep before polling again (a new command also wakes the worker).
    pub park: Duration,
}

impl Default for IdleStrategy {
    fn default() -> Self {
        // A short spin: source, destination and tests share two cores here, and a
        // worker that spins long starves the others.
        IdleStrategy {
            spin: 64,
            park: Duration::from_millis(1),
        }
    }
}

/// Transport settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportConfig {
    /// Which transport.
    pub choice: TransportChoice,
    /// Use `SEND_ZC` when the kernel has it.
    pub zero_copy: bool,
    /// Use `SEND_ZC` even to a loopback peer, where the kernel always copies
    /// (Documentation/networking/msg_zerocopy.rst); for measuring that cost.
    pub zero_copy_on_loopback: bool,
    /// Sends smaller than this use plain `SEND` (zero-copy costs a notification).
    pub zero_copy_threshold: usize,
    /// Bytes per send buffer.
    pub send_buffer: usize,
    /// Send buffers per stream.
    pub send_buffers_per_stream: u32,
    /// Bytes per receive buffer.
    pub recv_buffer: usize,
    /// Receive buffers per stream (a power of two).
    pub recv_buffers_per_stream: u16,
    /// Socket options for data streams.
    pub socket: SocketOptions,
    /// Pin workers to CPUs.
    pub pin_workers: bool,
    /// CPUs this appliance's workers may use (empty: all). Two appliances sharing a
    /// machine, as in the demo, each get their own.
    pub cpus: Vec<usize>,
    /// How idle workers wait.
    pub idle: IdleStrategy,
    /// How often workers sample `TCP_INFO` and report counters.
    pub telemetry_interval: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            choice: TransportChoice::Auto,
            zero_copy: true,
            zero_copy_on_loopback: false,
            zero_copy_threshold: 64 << 10,
            // 256 KiB sends measured best on loopback (34 Gbit/s on four streams
            // against 27 with 1 MiB): the kernel copies pages still in cache and each
            // send completes sooner.
            send_buffer: 256 << 10,
            send_buffers_per_stream: 4,
            recv_buffer: 64 << 10,
            recv_buffers_per_stream: 64,
            socket: SocketOptions::default(),
            pin_workers: true,
            cpus: Vec::new(),
            idle: IdleStrategy::default(),
            telemetry_interval: Duration::from_millis(25),
        }
    }
}

/// What the kernel offers and what the session will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportProbe {
    /// The transport chosen.
    pub kind: TransportKind,
    /// Whether sends will use `SEND_ZC`.
    pub zero_copy: bool,
    /// io_uring operations found (names), empty when io_uring is unavailable.
    pub uring_ops: Vec<&'static str>,
    /// Why the choice differs from the request, or what is missing.
    pub notes: Vec<String>,
}

/// Decide the transport for `config` on this kernel. Never fails: whatever is missing
/// degrades to plain sockets or to copying sends, and the notes say so.
pub fn probe(config: &TransportConfig) -> TransportProbe {
    decide(config, uring::probe())
}

/// The decision, given what probing io_uring found.
pub fn decide(config: &TransportConfig, uring: Result<uring::UringCaps, String>) -> TransportProbe {
    let mut notes = Vec::new();
    let (kind, zero_copy) = match (config.choice, &uring) {
        (TransportChoice::Plain, _) => (TransportKind::Plain, false),
        (_, Ok(caps)) => {
            let zc = config.zero_copy && caps.send_zc;
            if config.zero_copy && !caps.send_zc {
                notes.push("SEND_ZC not supported by this kernel: sending with copies".into());
            }
            (TransportKind::IoUring, zc)
        }
        (choice, Err(why)) => {
            if choice == TransportChoice::IoUring {
                notes.push(format!(
                    "io_uring requested but unavailable ({why}): using plain sockets"
                ));
            } else {
                notes.push(format!("io_uring unavailable ({why}): using plain sockets"));
            }
            (TransportKind::Plain, false)
        }
    };
    TransportProbe {
        kind,
        zero_copy,
        uring_ops: uring.map(|c| c.ops).unwrap_or_default(),
        notes,
    }
}

/// An operating-system error, small and copyable: its kind and, when it has one, its
/// errno (shown as the OS describes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsError {
    kind: std::io::ErrorKind,
    errno: Option<i32>,
}

impl OsError {
    /// The error of a failed io_uring operation (its negative result).
    pub fn from_errno(errno: i32) -> Self {
        std::io::Error::from_raw_os_error(errno).into()
    }
}

impl From<std::io::Error> for OsError {
    fn from(e: std::io::Error) -> Self {
        OsError {
            kind: e.kind(),
            errno: e.raw_os_error(),
        }
    }
}

impl fmt::Display for OsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(errno) => std::io::Error::from_raw_os_error(errno).fmt(f),
            None => std::io::Error::from(self.kind).fmt(f),
        }
    }
}

/// Why a source worker stopped. Each names the stream it concerns, if any; the worker
/// has given every buffer back (or leaked those the kernel still holds) by the time
/// the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// A send failed.
    #[error("stream {stream}: send failed: {error}")]
    Send {
        /// The stream.
        stream: u16,
        /// What the kernel said.
        error: OsError,
    },
    /// A send completed with nothing sent: the peer stopped reading.
    #[error("stream {stream}: peer stopped reading")]
    PeerStoppedReading {
        /// The stream.
        stream: u16,
    },
    /// A send completion for a stream with no send in flight.
    #[error("stream {stream}: completion without a send")]
    CompletionWithoutSend {
        /// The stream.
        stream: u16,
    },
    /// A command named a stream this worker does not own.
    #[error("stream {stream} is not on this worker")]
    UnknownStream {
        /// The stream.
        stream: u16,
    },
    /// io_uring itself failed.
    #[error("{op}: {error}")]
    Ring {
        /// The call (`io_uring_enter`, ...).
        op: &'static str,
        /// What the kernel said.
        error: OsError,
    },
    /// The submission queue had no room for a request.
    #[error("io_uring submission queue full")]
    SubmissionQueueFull,
    /// The engine dropped its end of the worker's rings.
    #[error("the engine went away")]
    EngineGone,
    /// An RMA write failed, or its delivery never came (the worker printed the
    /// provider's account).
    #[error("stream {stream}: RMA write failed: {}", fabric_code(*code))]
    Rma {
        /// The stream.
        stream: u16,
        /// libfabric's error code (negative errno or `FI_E*`).
        code: i64,
    },
}

/// A libfabric error code in words: an errno as the OS says it, else the number.
fn fabric_code(code: i64) -> String {
    match i32::try_from(code.unsigned_abs()) {
        Ok(errno) if errno < 256 => std::io::Error::from_raw_os_error(errno).to_string(),
        _ => format!("libfabric error {code}"),
    }
}

impl TxError {
    /// The error of RMA on stream `stream`, after printing what the provider said.
    pub fn from_fabric(stream: u16, error: &fabric::FabricError) -> Self {
        eprintln!("dwcp: stream {stream}: {error}");
        let code = match error {
            fabric::FabricError::Call { code, .. } => *code,
            fabric::FabricError::TimedOut(..) => -i64::from(libc::ETIMEDOUT),
            _ => -i64::from(libc::EPROTO),
        };
        TxError::Rma { stream, code }
    }
}

/// Why a destination worker stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    /// What arrived is malformed (the error names what and where).
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    /// A receive failed.
    #[error("receive failed: {0}")]
    Receive(OsError),
    /// io_uring itself failed.
    #[error("{op}: {error}")]
    Ring {
        /// The call.
        op: &'static str,
        /// What the kernel said.
        error: OsError,
    },
    /// A receive completion that named no buffer.
    #[error("receive completion without a buffer")]
    NoBuffer,
    /// The submission queue had no room for a request.
    #[error("io_uring submission queue full")]
    SubmissionQueueFull,
}

/// Engine → source worker: the work, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxCommand {
    /// Send pages `first..first + count` (within one chunk) on global stream `stream`.
    Pages {
        /// Global stream id.
        stream: u16,
        /// First page.
        first: u64,
        /// Pages (at most a chunk).
        count: u32,
        /// The engine knows these pages read as zeros (they lay in the memory file's
        /// holes when the round began): staged as a zero run without reading them.
        known_zero: bool,
    },
    /// Every stream of the worker closes round `round` and reports when it is sent.
    EndRound {
        /// The round.
        round: u64,
    },
    /// From here on pages go over the first `active` streams of the session: every
    /// stream of the worker sends a [`crate::wire::FrameKind::StreamMap`] marker. Only
    /// between rounds.
    StreamMap {
        /// Streams that carry pages.
        active: u16,
    },
    /// Send `bytes` of the device state, at `offset` of its stream, on global stream
    /// `stream` (after the final round's pages, before the stream ends).
    DeviceState {
        /// Global stream id.
        stream: u16,
        /// Where in the device-state stream.
        offset: u64,
        /// At most [`crate::wire::MAX_DEVICE_STATE_FRAME`] bytes.
        bytes: std::sync::Arc<[u8]>,
    },
    /// End every stream, wait for the last sends, exit.
    Finish,
    /// Send everything taken so far, wait until the kernel is done with every buffer,
    /// and exit (reporting [`TxEvent::Finished`]) leaving the streams open and without
    /// an end marker: other workers, perhaps of another transport, carry them on from
    /// the next byte. Only between rounds.
    Release,
}

/// Engine → source worker: new configuration, on a ring of its own so that it
/// overtakes the runs already queued (on a slow link, seconds of them). A worker takes
/// it before its next run.
#[derive(Debug, Clone)]
pub enum TxControl {
    /// Use these codec settings from the next run on (ignored by a worker started
    /// without codecs).
    SetCodec(CodecSettings),
    /// Compress with this dictionary from now on, when the settings ask for one.
    SetDictionary(Arc<Dictionary>),
    /// Wait for work this way from now on.
    SetIdle(IdleStrategy),
    /// Zero-copy sends on or off. Off always takes; on only for a worker started with
    /// zero-copy (its buffers were sized and registered for it).
    SetZeroCopy(bool),
    /// Flush every batch, then forget every page a stream's codec remembers: the engine
    /// is about to move pages to other streams, and a stream's cache may only hold what
    /// the destination last received for pages that stream carries.
    ForgetSentPages,
    /// Give stream `stream` up (it stalled, or the destination found it broken): as
    /// after a failed send, see [`TxEvent::StreamLost`].
    DropStream(u16),
}

/// Counters of one source worker, reported periodically. Cumulative since the worker
/// started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerTelemetry {
    /// Worker index.
    pub worker: usize,
    /// The codec pipeline's counters.
    pub codec: CodecCounters,
    /// The codec settings in force.
    pub settings: CodecSettings,
    /// Bytes staged without codecs.
    pub staged_bytes: u64,
    /// Time spent staging them, nanoseconds.
    pub stage_nanos: u64,
    /// Time the worker had runs to stage but every buffer was waiting on the network,
    /// nanoseconds: a worker that stalls is link-bound.
    pub stalled_nanos: u64,
    /// CPU time of the worker's thread (user + system), nanoseconds.
    pub cpu_nanos: u64,
}

impl WorkerTelemetry {
    /// Worker `worker`'s counters, with its codec's when it has one.
    pub fn new(
        worker: usize,
        codec: Option<&crate::codec::WorkerCodec>,
        staged_bytes: u64,
        stage_nanos: u64,
        stalled_nanos: u64,
    ) -> Self {
        WorkerTelemetry {
            worker,
            codec: codec.map(|c| c.counters()).unwrap_or_default(),
            settings: codec.map(|c| c.settings()).unwrap_or_default(),
            staged_bytes,
            stage_nanos,
            stalled_nanos,
            cpu_nanos: thread_cpu_nanos(),
        }
    }
}

/// CPU time the calling thread has used, to the nanosecond
/// (`CLOCK_THREAD_CPUTIME_ID`); zero if the kernel refuses.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system) of the calling thread, from `getrusage(RUSAGE_THREAD)`;
/// 0 if the kernel refuses.
pub fn thread_cpu_nanos() -> u64 {
    // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0;
    }
    let nanos = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    nanos(usage.ru_utime) + nanos(usage.ru_stime)
}

/// Counters of one stream, reported periodically.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamTelemetry {
    /// Global stream id.
    pub stream: u16,
    /// Bytes handed to the kernel so far.
    pub bytes: u64,
    /// Pages sent so far (zero and raw).
    pub pages: u64,
    /// Latest `TCP_INFO`, if readable.
    pub tcp: Option<TcpInfoSample>,
}

/// Source worker → engine.
#[derive(Debug, Clone, PartialEq)]
pub enum TxEvent {
    /// All of round `round`'s frames on this worker's streams are in the kernel.
    RoundSent {
        /// Worker index.
        worker: usize,
        /// The round.
        round: u64,
        /// Pages sent as zero markers.
        zero_pages: u64,
        /// Pages sent with content.
        raw_pages: u64,
        /// Bytes of frames.
        bytes: u64,
    },
    /// Periodic counters of a stream.
    Telemetry(StreamTelemetry),
    /// Periodic counters of the worker.
    Worker(WorkerTelemetry),
    /// Every stream ended and every buffer is back.
    Finished {
        /// Worker index.
        worker: usize,
        /// Sends whose zero-copy fell back to a kernel copy (loopback does).
        zc_copied: u64,
        /// Sends that went zero-copy.
        zc_sends: u64,
        /// The kernel copied every zero-copy send it was probed with, so the worker
        /// switched to copying sends.
        zc_fell_back: bool,
    },
    /// The worker stopped on an error.
    Failed {
        /// Worker index.
        worker: usize,
        /// What happened.
        error: TxError,
    },
    /// Stream `stream` failed or was dropped ([`TxControl::DropStream`]): its socket
    /// is shut, its queued runs are gone, and the worker stages nothing more for it
    /// (runs for it that come later are dropped). The worker carries on with its other
    /// streams.
    StreamLost {
        /// Global stream id.
        stream: u16,
        /// Why.
        error: String,
    },
}

/// Destination worker → engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxEvent {
    /// Stream `stream` delivered all of round `round` (`pages` pages).
    RoundEnd {
        /// Global stream id.
        stream: u16,
        /// The round.
        round: u64,
        /// Pages it carried.
        pages: u32,
    },
    /// Stream `stream` ended cleanly.
    StreamEnd {
        /// Global stream id.
        stream: u16,
        /// Bytes received on it.
        bytes: u64,
    },
    /// What a stream has received so far.
    Telemetry {
        /// Global stream id.
        stream: u16,
        /// Bytes read off the socket (what the source counts as sent).
        wire_bytes: u64,
        /// Bytes of frames.
        bytes: u64,
        /// Pages, however they came (content, zero marker, delta or reference).
        pages: u64,
    },
    /// A piece of the device state arrived on stream `stream`.
    DeviceState {
        /// Global stream id.
        stream: u16,
        /// Where in the device-state stream.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Stream `stream` stopped: its socket failed or closed, or the coordinator asked
    /// for it ([`StreamFence::request`]). Nothing more of it is placed.
    StreamLost {
        /// Global stream id.
        stream: u16,
        /// Why.
        error: String,
        /// Rounds whose end marker arrived on it.
        rounds_ended: u64,
    },
    /// Pages of stream `stream` written by RMA arrived wrong: the source must send
    /// them again.
    Resend {
        /// Global stream id.
        stream: u16,
        /// The pages.
        pages: Vec<u64>,
    },
    /// A stream failed; the session must end.
    Failed {
        /// Global stream id.
        stream: u16,
        /// What happened.
        error: RxError,
    },
}

impl RxEvent {
    /// What a parser announced on stream `stream`, which has received `bytes` so far.
    pub fn from_stream(stream: u16, event: frames::StreamEvent, bytes: u64) -> Self {
        match event {
            frames::StreamEvent::RoundEnd { round, pages } => RxEvent::RoundEnd {
                stream,
                round,
                pages,
            },
            frames::StreamEvent::StreamEnd => RxEvent::StreamEnd { stream, bytes },
            frames::StreamEvent::DeviceState { offset, bytes } => RxEvent::DeviceState {
                stream,
                offset,
                bytes,
            },
            frames::StreamEvent::Resend { pages } => RxEvent::Resend { stream, pages },
        }
    }
}

/// What a source worker sends from, beside its sockets.
#[derive(Clone)]
pub struct TxSetup {
    /// Guest memory.
    pub memory: Arc<GuestMemory>,
    /// The source's CRC table: the CRC of every page sent is recorded there.
    pub table: Arc<CrcTable>,
    /// Codec limits, when the session may use codecs.
    pub codec: Option<CodecSetup>,
    /// In an authenticated session, the data streams' keys: every send buffer goes out
    /// as a sealed record.
    pub records: Option<Arc<SessionKeys>>,
    /// In a session that writes pages by RMA, the streams' connections.
    pub rma: Option<Arc<rma::RmaPool>>,
}

/// Where a destination worker puts what arrives, beside its sockets.
#[derive(Clone)]
pub struct RxSetup {
    /// Streams in the session.
    pub total_streams: u16,
    /// Guest memory.
    pub memory: Arc<GuestMemory>,
    /// The memory is known to be all zeros.
    pub memory_is_fresh: bool,
    /// The memory is a file whose holes (these pages) read as zeros.
    pub holes: Option<Arc<crate::dirty::DirtyBitmap>>,
    /// Frame kinds the session negotiated ([`crate::wire::caps`]).
    pub capabilities: u64,
    /// The destination's CRC table: every page placed is recorded there.
    pub table: Arc<CrcTable>,
    /// In an authenticated session, the data streams' keys: records are opened before
    /// their frames are parsed.
    pub records: Option<Arc<SessionKeys>>,
    /// Streams the coordinator asked to stop, and those lost.
    pub fence: Arc<StreamFence>,
    /// The round whose end marker each stream sends first: 0, except for a stream that
    /// replaces a lost one between rounds.
    pub first_round: u64,
}

/// The destination's fence over its data streams, shared by the coordinator and the
/// receivers. The coordinator asks for a stream to stop ([`StreamFence::request`]);
/// its receiver stops placing its pages and reports [`RxEvent::StreamLost`] (as it
/// does for a stream whose socket failed); only then does the coordinator add it to
/// the lost set ([`StreamFence::mark_lost`]), which every parser routes pages by from
/// then on (see [`crate::wire::Routes`]). A lost stream's pages thus have no second
/// writer while any of its bytes may still be placed.
#[derive(Debug, Default)]
pub struct StreamFence {
    requested: [AtomicU64; 4],
    lost: [AtomicU64; 4],
    generation: AtomicU64,
}

impl StreamFence {
    /// Ask the receiver of `stream` to stop it.
    pub fn request(&self, stream: u16) {
        let s = usize::from(stream);
        if s < 256 {
            // Release: pairs with the Acquire in `requested`, run by the receiver.
            self.requested[s / 64].fetch_or(1 << (s % 64), Ordering::Release);
        }
    }

    /// Whether `stream` should stop.
    pub fn requested(&self, stream: u16) -> bool {
        let s = usize::from(stream);
        // Acquire: pairs with the Release in `request`.
        s < 256 && self.requested[s / 64].load(Ordering::Acquire) & (1 << (s % 64)) != 0
    }

    /// `stream` is stopped: its pages go to other streams from now on.
    pub fn mark_lost(&self, stream: u16) {
        let s = usize::from(stream);
        if s >= 256 {
            return;
        }
        self.lost[s / 64].fetch_or(1 << (s % 64), Ordering::Relaxed);
        // Release: publishes the lost bit above to a parser's Acquire in `generation`.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// `stream` is back (a replacement connection carries it): it no longer counts as
    /// lost or asked to stop. Only between rounds, with nothing of any page in flight.
    pub fn restore(&self, stream: u16) {
        let s = usize::from(stream);
        if s >= 256 {
            return;
        }
        self.requested[s / 64].fetch_and(!(1 << (s % 64)), Ordering::Release);
        self.lost[s / 64].fetch_and(!(1 << (s % 64)), Ordering::Relaxed);
        // Release: as in `mark_lost`.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Changes to the lost set so far.
    pub fn generation(&self) -> u64 {
        // Acquire: pairs with the Release in `mark_lost`.
        self.generation.load(Ordering::Acquire)
    }

    /// The streams lost so far.
    pub fn lost(&self) -> crate::wire::StreamSet {
        crate::wire::StreamSet::from_words(std::array::from_fn(|i| {
            // Relaxed: read after `generation`'s Acquire.
            self.lost[i].load(Ordering::Relaxed)
        }))
    }
}

impl RxSetup {
    /// The inbound path of stream `stream`: its record opener, if sealed, then its
    /// frame parser.
    pub fn inbound(&self, stream: u16) -> Inbound {
        let first_round = self.first_round;
        let mut parser = frames::FrameParser::new(
            self.memory.clone(),
            stream,
            self.total_streams,
            self.memory_is_fresh,
        );
        if let Some(holes) = &self.holes {
            parser = parser.with_holes(holes);
        }
        let parser = parser
            .with_capabilities(self.capabilities)
            .with_table(self.table.clone())
            .with_fence(self.fence.clone())
            .with_first_round(first_round);
        Inbound::new(self.records.as_ref().map(|k| k.opener(stream)), parser)
    }
}

/// The engine's handle on a source worker.
pub struct TxWorker {
    /// Commands to the worker.
    pub commands: Producer<TxCommand>,
    /// Configuration changes for the worker.
    pub control: Producer<TxControl>,
    /// Events from it.
    pub events: Consumer<TxEvent>,
    /// The worker's thread: woken after pushing commands, finished on shutdown.
    pub thread: WorkerThread,
}

/// A worker whose thread may still be setting itself up (its ring, its buffers):
/// [`Starting::ready`] waits until it has. Starting every worker of a fleet before
/// waiting on any lets their setups run at once: set up one after another, two source
/// workers took 11-13 ms before a QEMU guest's round 0 could start.
pub struct Starting<W> {
    worker: W,
    ready: Option<std::sync::mpsc::Receiver<std::io::Result<()>>>,
}

impl<W> Starting<W> {
    /// A worker with nothing left to set up.
    pub fn started(worker: W) -> Self {
        Starting {
            worker,
            ready: None,
        }
    }

    /// A worker whose thread says on `ready` how its setup went.
    pub(crate) fn setting_up(
        worker: W,
        ready: std::sync::mpsc::Receiver<std::io::Result<()>>,
    ) -> Self {
        Starting {
            worker,
            ready: Some(ready),
        }
    }

    /// Wait until the worker is set up; its setup's error if it failed.
    pub fn ready(self) -> std::io::Result<W> {
        if let Some(ready) = self.ready {
            ready
                .recv()
                .map_err(|_| std::io::Error::other("worker died during setup"))??;
        }
        Ok(self.worker)
    }
}

/// The engine's handle on a destination worker.
pub struct RxWorker {
    /// Events from the worker.
    pub events: Consumer<RxEvent>,
    /// The worker's thread, finished on shutdown.
    pub thread: WorkerThread,
    /// Set to make the worker stop early.
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A worker's thread. A worker whose work is over keeps what it owns (its ring and
/// registered buffers, its buffer pool, its parsers' page bitmaps) until its owner lets
/// it go, and frees it [`FREE_AFTER`] later. Freeing takes a core for 0.1-0.5 ms (more
/// with more memory: the bitmaps are a bit per page), and unmapping interrupts every
/// other core the process runs on to flush its TLB. A worker's work ends with the final
/// round, inside the paused window: freed there, they took cores from the threads that
/// end the window. Freed just after the verdict, they would take them from the other
/// side's last steps where both appliances share a host (the verdict reaching the
/// source; the destination loading the device state), so the guest stayed paused
/// longer either way.
///
/// Freeing is at normal priority: a thread at idle priority preempted inside `munmap`
/// would hold the process's `mmap_lock` for as long as busy threads keep it off its
/// core, and the `mmap` calls and page faults of every other thread could queue
/// behind it.
pub struct WorkerThread {
    /// Taken by [`WorkerThread::join`]; dropped unjoined, it lets the thread run on.
    handle: Option<JoinHandle<()>>,
    /// What the owner said: [`HOLD`], [`FREE_SOON`] or [`FREE_NOW`].
    release: Arc<AtomicU8>,
    /// Closed when the worker's body has returned (or panicked).
    body_done: std::sync::mpsc::Receiver<()>,
}

/// How long after being let go a worker frees what it kept.
pub const FREE_AFTER: Duration = Duration::from_millis(50);

/// [`WorkerThread`] releases: keep everything; free it [`FREE_AFTER`] from now; free
/// it at once (someone waits for it).
const HOLD: u8 = 0;
const FREE_SOON: u8 = 1;
const FREE_NOW: u8 = 2;

impl WorkerThread {
    /// Run `body` on a new thread called `name`; what it returns is kept until the
    /// worker is let go.
    pub(crate) fn spawn<K: Send + 'static>(
        name: String,
        body: impl FnOnce() -> K + Send + 'static,
    ) -> std::io::Result<Self> {
        let release = Arc::new(AtomicU8::new(HOLD));
        let said = release.clone();
        let (done, body_done) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let kept = body();
            drop(done);
            // Acquire: pairs with the owner's store (nothing else is published by it).
            let mut free_at = None;
            loop {
                match said.load(Ordering::Acquire) {
                    HOLD => std::thread::park(),
                    FREE_SOON => {
                        let at = *free_at.get_or_insert_with(|| Instant::now() + FREE_AFTER);
                        let now = Instant::now();
                        if now >= at {
                            break;
                        }
                        std::thread::park_timeout(at - now);
                    }
                    _ => break,
                }
            }
            drop(kept);
        })?;
        Ok(WorkerThread {
            handle: Some(handle),
            release,
            body_done,
        })
    }

    /// Wake the worker (it may be parked waiting for commands).
    pub fn wake(&self) {
        if let Some(handle) = &self.handle {
            handle.thread().unpark();
        }
    }

    fn let_go(&self, how: u8) {
        self.release.store(how, Ordering::Release);
        self.wake();
    }

    /// Wait until the worker's work is over (its body returned: it touches no memory
    /// or socket any more), then let it go: it frees what it kept [`FREE_AFTER`] later,
    /// on its own.
    pub fn finish(&mut self) {
        // Err: the body ended by panicking, which is over too.
        let _ = self.body_done.recv();
        self.let_go(FREE_SOON);
    }

    /// Let the worker free what it kept now, and wait for its thread to end.
    pub fn join(&mut self) {
        self.let_go(FREE_NOW);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        // A handle dropped unjoined lets its thread end on its own, when it is done.
        if self.release.load(Ordering::Relaxed) == HOLD {
            self.let_go(FREE_SOON);
        }
    }
}

/// Ring capacity between the engine and a worker.
pub(crate) const WORKER_RING: usize = 4096;
/// Ring capacity for configuration changes.
pub(crate) const CONTROL_RING: usize = 64;

/// Pin the calling worker thread to `cpu` if asked; a failure is only a lost
/// optimisation.
pub(crate) fn pin(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let _ = dwcp_hugepages::numa::pin_current_thread(cpu);
    }
}

/// Push an event, waiting while the engine catches up (events are few and small).
pub(crate) fn push_event<T>(events: &mut Producer<T>, mut event: T) {
    loop {
        match events.push(event) {
            Ok(()) => return,
            Err(full) => {
                if events.is_abandoned() {
                    return;
                }
                event = full.0;
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Sets its flag when dropped: what a worker keeps, in the tests below.
    struct Kept(Arc<AtomicBool>);

    impl Drop for Kept {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn wait_for(flag: &AtomicBool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !flag.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// A worker whose body works for `work`, then says so and returns a [`Kept`]: the
    /// worker, and the flags "the body is over" and "what it kept is freed".
    fn kept_worker(work: Duration) -> (WorkerThread, Arc<AtomicBool>, Arc<AtomicBool>) {
        let (body_over, freed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (over, kept) = (body_over.clone(), freed.clone());
        let worker = WorkerThread::spawn("kept".into(), move || {
            std::thread::sleep(work);
            over.store(true, Ordering::SeqCst);
            Kept(kept)
        })
        .unwrap();
        (worker, body_over, freed)
    }

    #[test]
    fn a_finished_worker_keeps_what_it_owns_until_it_is_let_go() {
        let (mut worker, body_over, freed) = kept_worker(Duration::ZERO);
        assert!(wait_for(&body_over));
        // Wakes (as the engine gives them) do not let it go.
        for _ in 0..20 {
            worker.wake();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(!freed.load(Ordering::SeqCst), "freed before it was let go");
        worker.join();
        assert!(
            freed.load(Ordering::SeqCst),
            "join returned before the worker freed"
        );
    }

    #[test]
    fn finish_waits_for_the_work_and_lets_the_worker_free_on_its_own() {
        let (mut worker, body_over, freed) = kept_worker(Duration::from_millis(30));
        worker.finish();
        assert!(
            body_over.load(Ordering::SeqCst),
            "finish returned while the body ran"
        );
        assert!(
            wait_for(&freed),
            "a finished worker never freed what it kept"
        );
    }

    #[test]
    fn a_dropped_handle_lets_its_worker_free_and_end() {
        let freed = Arc::new(AtomicBool::new(false));
        let kept = freed.clone();
        let worker = WorkerThread::spawn("dropped".into(), move || Kept(kept)).unwrap();
        drop(worker);
        assert!(wait_for(&freed));
    }

    #[test]
    fn a_worker_that_panics_is_finished_too() {
        let mut worker = WorkerThread::spawn("panics".into(), || -> Kept {
            panic!("worker failed (expected by this test)")
        })
        .unwrap();
        worker.finish();
    }

    #[test]
    fn missing_io_uring_or_zero_copy_degrades_with_a_note() {
        let config = TransportConfig::default();
        let gone = decide(
            &config,
            Err("io_uring_setup: Operation not permitted".into()),
        );
        assert_eq!(gone.kind, TransportKind::Plain);
        assert!(!gone.zero_copy);
        assert!(
            gone.notes[0].contains("using plain sockets"),
            "{:?}",
            gone.notes
        );

        let no_zc = decide(
            &config,
            Ok(uring::UringCaps {
                ops: vec!["SEND", "RECV"],
                send_zc: false,
            }),
        );
        assert_eq!(no_zc.kind, TransportKind::IoUring);
        assert!(!no_zc.zero_copy);
        assert!(no_zc.notes[0].contains("SEND_ZC"));

        let plain = decide(
            &TransportConfig {
                choice: TransportChoice::Plain,
                ..config
            },
            Ok(uring::UringCaps {
                ops: vec![],
                send_zc: true,
            }),
        );
        assert_eq!(plain.kind, TransportKind::Plain);
        assert!(plain.notes.is_empty());
    }
}
