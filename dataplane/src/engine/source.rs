//! The source side: connect, run pre-copy rounds, switch over, verify.

use super::live::{LiveControl, LiveSettings, REPORT_INTERVAL};
use super::report::{MigrationReport, RoundStats, TransportReport};
use super::steer::Steering;
use super::{MigrationError, page_crcs, worker_cpus};
use crate::codec::policy::{CodecConfig, CodecMode, CodecPolicy};
use crate::codec::{CodecSettings, CodecSetup};
use crate::dirty::{DirtyBitmap, DirtyLog};
use crate::guest::GuestControl;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::transport::{
    self, StreamTelemetry, TransportConfig, TransportKind, TxCommand, TxControl, TxEvent, TxSetup,
    TxWorker, WorkerTelemetry, plain, socket, uring,
};
use crate::wire::{
    self, AbortReason, CHUNK_PAGES, ControlMessage, Handshake, StreamHello, caps, stream_of,
    write_control,
};
use crossbeam::channel::{Receiver, RecvTimeoutError, TryRecvError};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the source runs a migration.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// Data streams.
    pub streams: u16,
    /// io_uring worker threads (0: one per CPU, at most one per stream). Plain sockets
    /// always use one thread per stream.
    pub workers: usize,
    /// Transport settings.
    pub transport: TransportConfig,
    /// Codec pipeline settings.
    pub codec: CodecConfig,
    /// Switch over when the estimated downtime is below this.
    pub downtime_limit: Duration,
    /// Abort after this many rounds without converging.
    pub max_rounds: u32,
    /// Abort after this long without converging.
    pub max_duration: Duration,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: bool,
    /// Connecting to the destination.
    pub connect_timeout: Duration,
    /// Waiting for any reply or progress from the destination.
    pub reply_timeout: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            streams: 4,
            workers: 0,
            transport: TransportConfig::default(),
            codec: CodecConfig::default(),
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            max_duration: Duration::from_secs(600),
            auto_converge: true,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
        }
    }
}

/// A snapshot of a running migration, for live progress displays.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Current round.
    pub round: u64,
    /// `precopy`, `switchover` or `verify`.
    pub phase: &'static str,
    /// Bytes of frames sent so far.
    pub bytes_sent: u64,
    /// Pages sent so far (all rounds).
    pub pages_sent: u64,
    /// Rounds completely sent (and their dirty pages collected).
    pub rounds_done: u64,
    /// Pages in the current round's dirty set.
    pub round_pages: u64,
    /// Pages of the current round already handed to workers.
    pub round_pages_queued: u64,
    /// Last measured dirty rate, bytes per second.
    pub dirty_rate: f64,
    /// Measured bandwidth, bytes per second.
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
}

/// A worker's latest counters and the fill of its command ring.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerStatus {
    /// The worker's own counters (codec, staging, CPU time).
    pub telemetry: WorkerTelemetry,
    /// Commands queued to it and not yet taken.
    pub queued_commands: usize,
}

/// How often the source pings the destination on the control stream.
const PING_INTERVAL: Duration = Duration::from_millis(250);

struct Session<'a> {
    config: &'a SourceConfig,
    /// Codec steering, when the session may use codecs.
    steering: Option<Steering<'a>>,
    /// Configuration changes that found a worker's control ring full.
    deferred_control: Vec<(usize, TxControl)>,
    /// The round being sent and its pages left, for steering.
    current_round: u64,
    round_left: u64,
    memory: Arc<GuestMemory>,
    workers: Vec<TxWorker>,
    /// For each stream, the worker that owns it.
    worker_of: Vec<usize>,
    /// Clones of the data sockets, to unblock everything on abort.
    data_sockets: Vec<TcpStream>,
    control: TcpStream,
    control_rx: Receiver<Result<ControlMessage, String>>,
    telemetry: Vec<StreamTelemetry>,
    /// Per stream: bytes and pages sent by workers a transport switch retired.
    carried: Vec<(u64, u64)>,
    round_sent: Vec<Option<(u64, u64, u64, u64)>>,
    finished: usize,
    zc_copied: u64,
    zc_sends: u64,
    zc_fell_back: bool,
    applied_round: Option<u64>,
    last_activity: Instant,
    /// What setup found and how the transport changed since, for the report.
    transport_notes: Vec<String>,
    /// Latest counters of each worker.
    worker_telemetry: Vec<WorkerTelemetry>,
    /// Live reconfiguration, when the slow path drives this migration.
    live: Option<&'a LiveControl>,
    /// The settings of the epoch adopted last.
    live_settings: Option<LiveSettings>,
    adopted_epoch: u64,
    /// Streams carrying pages now, and a change waiting for the round boundary.
    active_streams: u16,
    pending_streams: Option<u16>,
    /// Whether the destination understands stream map markers.
    stream_map_ok: bool,
    /// The workers' transport now, the one the session opened with, what io_uring
    /// workers may use here, and a change waiting for the round boundary.
    transport: TransportKind,
    opened_transport: TransportKind,
    uring_available: bool,
    uring_zero_copy: bool,
    pending_transport: Option<TransportKind>,
    /// What new workers send from, and the CPUs they may be pinned to.
    tx_setup: TxSetup,
    cpus: Vec<usize>,
    /// The switchover condition (live settings may change it).
    downtime_limit: Duration,
    /// Pings on the control stream: when the session opened (ping payloads are
    /// nanoseconds since then), when the next is due, the latest round trip.
    opened: Instant,
    next_ping: Instant,
    pinging: bool,
    ping_rtt: Option<Duration>,
    /// The latest progress snapshot and when it was last offered to the slow path.
    latest_progress: Option<Progress>,
    last_report: Instant,
    /// What live changes could not do as asked, for the report.
    live_notes: Vec<String>,
    /// Pages queued to each worker and not yet taken (bounded in live sessions).
    backlog: Vec<Backlog>,
}

/// How much work a live session queues to a worker ahead of it: about this long at the
/// rate the worker takes pages. Queued runs cannot be taken back, and a new stream
/// count waits for them to go out; a short queue makes it take effect promptly on a
/// slow link, and costs nothing on a fast one (the bound scales with the rate).
const BACKLOG_SECONDS: f64 = 0.25;
/// The bound never goes below this (4 MiB of pages).
const MIN_BACKLOG_PAGES: f64 = 1024.0;

/// The pages queued to one worker and the rate it takes them at.
struct Backlog {
    pushed: u64,
    taken: u64,
    /// Pages per second, rising at once with a faster measurement and decaying slowly
    /// (a measurement across an idle pause between rounds understates the worker).
    rate: f64,
    mark: Instant,
    mark_taken: u64,
}

impl Backlog {
    fn new() -> Self {
        Backlog {
            pushed: 0,
            taken: 0,
            rate: 0.0,
            mark: Instant::now(),
            mark_taken: 0,
        }
    }

    fn pushed(&mut self, pages: u32) {
        self.pushed += u64::from(pages);
    }

    fn taken(&mut self, pages: u64) {
        self.taken += pages;
        let elapsed = self.mark.elapsed().as_secs_f64();
        if elapsed >= 0.1 {
            let measured = (self.taken - self.mark_taken) as f64 / elapsed;
            self.rate = measured.max(self.rate * 0.7);
            self.mark = Instant::now();
            self.mark_taken = self.taken;
        }
    }

    fn is_full(&self) -> bool {
        let queued = self.pushed.saturating_sub(self.taken) as f64;
        // Until a first measurement, a bound that starts a fast link at full speed.
        let bound = if self.rate == 0.0 {
            4.0 * MIN_BACKLOG_PAGES
        } else {
            (self.rate * BACKLOG_SECONDS).max(MIN_BACKLOG_PAGES)
        };
        queued >= bound
    }
}

fn connect(peer: SocketAddr, timeout: Duration) -> Result<TcpStream, MigrationError> {
    TcpStream::connect_timeout(&peer, timeout).map_err(|source| MigrationError::Connect {
        peer: peer.to_string(),
        source,
    })
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Io { what, source }
}

/// Bytes of frames per page sent raw.
const RAW_PAGE_WIRE: f64 = (PAGE_SIZE + wire::PAGE_CRC_LEN) as f64;

/// Migrate `memory` to the destination at `peer` while `guest` runs, tracking writes
/// with `dirty_log` (created before the call, so tracking covers round 0). With codecs
/// in [`CodecMode::Auto`] and no policy, codecs stay off (a note says so); see
/// [`migrate_with_policy`].
pub fn migrate(
    peer: SocketAddr,
    memory: Arc<GuestMemory>,
    guest: &dyn GuestControl,
    dirty_log: Box<dyn DirtyLog>,
    config: &SourceConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    migrate_with_policy(peer, memory, guest, dirty_log, config, None, progress)
}

/// [`migrate`], with `policy` choosing codec settings live when the codec mode is
/// [`CodecMode::Auto`].
pub fn migrate_with_policy<'a>(
    peer: SocketAddr,
    memory: Arc<GuestMemory>,
    guest: &dyn GuestControl,
    dirty_log: Box<dyn DirtyLog>,
    config: &'a SourceConfig,
    policy: Option<&'a mut dyn CodecPolicy>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    migrate_live(
        peer, memory, guest, dirty_log, config, policy, None, progress,
    )
}

/// [`migrate_with_policy`], reconfigured live through `live` when given: the session
/// adopts every epoch published there (see [`super::live`]), reports its progress
/// there, and stops when it is cancelled there. With live control the session sets up
/// codecs whenever the destination accepts them, even if they start off, so that a
/// later epoch can turn them on.
#[allow(clippy::too_many_arguments)]
pub fn migrate_live<'a>(
    peer: SocketAddr,
    memory: Arc<GuestMemory>,
    guest: &dyn GuestControl,
    mut dirty_log: Box<dyn DirtyLog>,
    config: &'a SourceConfig,
    policy: Option<&'a mut dyn CodecPolicy>,
    live: Option<&'a LiveControl>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    if config.streams == 0 || config.streams > wire::MAX_STREAMS {
        return Err(MigrationError::Config(format!(
            "streams = {} (allowed 1..={})",
            config.streams,
            wire::MAX_STREAMS
        )));
    }
    let start = Instant::now();
    let mut probe = transport::probe(&config.transport);
    if probe.zero_copy && peer.ip().is_loopback() && !config.transport.zero_copy_on_loopback {
        probe.zero_copy = false;
        probe.notes.push(
            "zero-copy off: the peer is on loopback, where the kernel copies every zero-copy send"
                .into(),
        );
    }
    let mut session = Session::open(
        peer,
        &memory,
        dirty_log.sent_crcs(),
        config,
        policy,
        live,
        &probe,
    )?;
    let result = session.run(guest, dirty_log.as_mut(), start, &probe, progress);
    if let Err(e) = &result {
        session.abort(e);
        // The guest stays here and runs at full speed again (it is resumed already
        // if the switchover had paused it).
        guest.set_throttle(0);
    }
    session.close();
    result
}

impl<'a> Session<'a> {
    fn open(
        peer: SocketAddr,
        memory: &Arc<GuestMemory>,
        sent: Option<Arc<crate::dirty::SentCrcs>>,
        config: &'a SourceConfig,
        policy: Option<&'a mut dyn CodecPolicy>,
        live: Option<&'a LiveControl>,
        probe: &transport::TransportProbe,
    ) -> Result<Self, MigrationError> {
        let mut control = connect(peer, config.connect_timeout)?;
        control
            .set_read_timeout(Some(config.reply_timeout))
            .map_err(io("control stream timeout"))?;
        let _ = control.set_nodelay(true);
        let session_id = random_session_id();
        let hello = Handshake {
            magic: wire::CONTROL_MAGIC,
            version: wire::VERSION,
            session_id,
            memory_bytes: memory.len() as u64,
            page_size: PAGE_SIZE as u32,
            streams: config.streams,
            capabilities: caps::ALL,
        };
        write_control(&mut control, &ControlMessage::Hello(hello))
            .map_err(io("sending the handshake"))?;
        let accepted = match wire::read_control(&mut control) {
            Ok(ControlMessage::Welcome { capabilities }) => capabilities,
            Ok(ControlMessage::Refused { reason }) => return Err(MigrationError::Refused(reason)),
            Ok(other) => {
                return Err(
                    wire::WireError::Unexpected(format!("{other:?} instead of a welcome")).into(),
                );
            }
            Err(wire::ControlReadError::Wire(e)) => return Err(e.into()),
            Err(wire::ControlReadError::Io(e)) => {
                return Err(io("waiting for the destination's welcome")(e));
            }
        };
        let mut notes = Vec::new();
        let codec = codec_setup(
            config,
            policy.is_some(),
            live.is_some(),
            accepted,
            &mut notes,
        );
        // Data streams connect concurrently: one after another would cost a round trip
        // each, seconds of setup across a long path with many streams.
        let opened: Vec<Result<(TcpStream, Vec<String>), MigrationError>> =
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..config.streams)
                    .map(|id| {
                        scope.spawn(move || {
                            let mut s = connect(peer, config.connect_timeout)?;
                            let notes = socket::configure(&s, &config.transport.socket);
                            s.write_all(
                                &StreamHello {
                                    session_id,
                                    stream_id: id,
                                }
                                .encode(),
                            )
                            .map_err(io(format!("opening data stream {id}")))?;
                            Ok((s, notes))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(io("opening a data stream")(std::io::Error::other(
                                "connecting thread panicked",
                            )))
                        })
                    })
                    .collect()
            });
        let mut streams = Vec::with_capacity(usize::from(config.streams));
        let mut data_sockets = Vec::new();
        for (id, result) in (0..config.streams).zip(opened) {
            let (s, stream_notes) = result?;
            notes.extend(stream_notes);
            data_sockets.push(s.try_clone().map_err(io("cloning a data socket"))?);
            streams.push((id, s));
        }
        let cpus = if config.transport.pin_workers {
            worker_cpus(&config.transport)
        } else {
            Vec::new()
        };
        let tx_setup = TxSetup {
            memory: memory.clone(),
            sent,
            codec: codec.clone(),
        };
        let (workers, worker_of) = spawn_workers(
            probe.kind,
            probe.zero_copy,
            streams,
            &tx_setup,
            config,
            &cpus,
        )?;
        let reader = control
            .try_clone()
            .map_err(io("cloning the control stream"))?;
        let control_rx = spawn_control_reader(reader);
        let n = workers.len();
        let steering = codec.as_ref().map(|setup| {
            Steering::new(
                &config.codec,
                policy,
                memory.clone(),
                streams_per_worker(&worker_of, n),
                config.streams,
                setup.initial,
            )
        });
        let now = Instant::now();
        if let Some(live) = live {
            live.set_active_streams(config.streams);
        }
        Ok(Session {
            worker_telemetry: (0..workers.len())
                .map(|worker| WorkerTelemetry {
                    worker,
                    ..WorkerTelemetry::default()
                })
                .collect(),
            live,
            // What the session opened with: the first epoch changes only what differs.
            live_settings: live.map(|_| LiveSettings {
                active_streams: None,
                transport: None,
                congestion: config.transport.socket.congestion,
                pacing_rate: config
                    .transport
                    .socket
                    .pacing_rate
                    .map(|r| r.saturating_mul(u64::from(config.streams))),
                codec: config.codec.mode.clone(),
                zero_copy: config.transport.zero_copy,
                idle: config.transport.idle,
                downtime_limit: config.downtime_limit,
            }),
            adopted_epoch: 0,
            active_streams: config.streams,
            pending_streams: None,
            transport: probe.kind,
            opened_transport: probe.kind,
            uring_available: !probe.uring_ops.is_empty(),
            uring_zero_copy: probe.zero_copy,
            pending_transport: None,
            tx_setup,
            cpus,
            stream_map_ok: accepted & caps::STREAM_MAP != 0,
            downtime_limit: config.downtime_limit,
            opened: now,
            next_ping: now,
            pinging: live.is_some(),
            ping_rtt: None,
            latest_progress: None,
            last_report: now,
            live_notes: Vec::new(),
            backlog: (0..workers.len()).map(|_| Backlog::new()).collect(),
            config,
            steering,
            deferred_control: Vec::new(),
            current_round: 0,
            round_left: 0,
            memory: memory.clone(),
            workers,
            worker_of,
            data_sockets,
            control,
            control_rx,
            telemetry: (0..config.streams)
                .map(|stream| StreamTelemetry {
                    stream,
                    ..StreamTelemetry::default()
                })
                .collect(),
            carried: vec![(0, 0); usize::from(config.streams)],
            round_sent: vec![None; n],
            finished: 0,
            zc_copied: 0,
            zc_sends: 0,
            zc_fell_back: false,
            applied_round: None,
            last_activity: Instant::now(),
            transport_notes: notes,
        })
    }
}

/// Start the source workers of `kind` for `streams`; returns them and, for each
/// stream, the index of the worker that owns it. io_uring workers take groups of
/// streams (`config.workers`, by default one per CPU); plain workers one stream each.
fn spawn_workers(
    kind: TransportKind,
    zero_copy: bool,
    streams: Vec<(u16, TcpStream)>,
    tx_setup: &TxSetup,
    config: &SourceConfig,
    cpus: &[usize],
) -> Result<(Vec<TxWorker>, Vec<usize>), MigrationError> {
    let cpu = |w: usize| (!cpus.is_empty()).then(|| cpus[w % cpus.len()]);
    let mut workers = Vec::new();
    let mut worker_of = vec![0usize; streams.len()];
    match kind {
        TransportKind::IoUring => {
            let count = match config.workers {
                0 => cpus.len().max(1),
                n => n,
            }
            .min(streams.len());
            let mut groups: Vec<Vec<(u16, TcpStream)>> = (0..count).map(|_| Vec::new()).collect();
            for (id, s) in streams {
                let w = usize::from(id) % count;
                worker_of[usize::from(id)] = w;
                groups[w].push((id, s));
            }
            for (w, group) in groups.into_iter().enumerate() {
                workers.push(
                    uring::spawn_tx(
                        w,
                        group,
                        tx_setup.clone(),
                        &config.transport,
                        zero_copy,
                        cpu(w),
                    )
                    .map_err(io("starting an io_uring worker"))?,
                );
            }
        }
        TransportKind::Plain => {
            for (w, s) in streams.into_iter().enumerate() {
                worker_of[usize::from(s.0)] = w;
                workers.push(
                    plain::spawn_tx(w, s, tx_setup.clone(), &config.transport, cpu(w))
                        .map_err(io("starting a worker"))?,
                );
            }
        }
    }
    Ok((workers, worker_of))
}

/// How many streams each of `workers` workers owns.
fn streams_per_worker(worker_of: &[usize], workers: usize) -> Vec<u16> {
    let mut streams_of = vec![0u16; workers];
    for &w in worker_of {
        streams_of[w] += 1;
    }
    streams_of
}

/// What the workers need for codecs, or `None` when the session runs without them
/// (the reason, if it is not the configuration's, goes to `notes`).
fn codec_setup(
    config: &SourceConfig,
    have_policy: bool,
    live: bool,
    accepted: u64,
    notes: &mut Vec<String>,
) -> Option<CodecSetup> {
    let codec = &config.codec;
    if !codec.enabled() && !live {
        return None;
    }
    if codec.mode == CodecMode::Auto && !have_policy && !live {
        notes.push("codecs: automatic mode without a policy; codecs off".into());
        return None;
    }
    let wanted = caps::DELTA | caps::DEDUP | caps::ZSTD;
    if accepted & wanted == 0 {
        notes.push("codecs: the destination accepts none; codecs off".into());
        return None;
    }
    if accepted & wanted != wanted {
        notes.push(format!(
            "codecs: the destination lacks some (capabilities {accepted:#x}); those stay off"
        ));
    }
    let initial = match codec.mode {
        CodecMode::Fixed(settings) => settings,
        // The policy measures the link with codecs off first.
        _ => CodecSettings {
            batch_bytes: codec.batch_bytes,
            delta_limit: codec.delta_limit,
            ..CodecSettings::OFF
        },
    };
    Some(CodecSetup {
        cache_bytes_per_stream: codec.cache_bytes / usize::from(config.streams),
        max_batch_bytes: codec.max_batch_bytes(),
        max_dictionary_bytes: codec.dictionary_bytes,
        initial,
        capabilities: accepted,
    })
}

fn random_session_id() -> u128 {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    u128::from_le_bytes(bytes)
}

/// Read control messages on a thread of their own (blocking reads), handing them over.
fn spawn_control_reader(mut stream: TcpStream) -> Receiver<Result<ControlMessage, String>> {
    let (tx, rx) = crossbeam::channel::bounded(1024);
    let _ = stream.set_read_timeout(None);
    std::thread::Builder::new()
        .name("dwcp-ctl-rx".into())
        .spawn(move || {
            loop {
                let msg = wire::read_control(&mut stream).map_err(|e| e.to_string());
                let stop = msg.is_err();
                if tx.send(msg).is_err() || stop {
                    return;
                }
            }
        })
        .expect("spawning the control reader");
    rx
}

/// Pages per command-batch before waking a worker.
const WAKE_EVERY: u32 = 64;

impl Session<'_> {
    fn send_control(&mut self, msg: &ControlMessage) -> Result<(), MigrationError> {
        write_control(&mut self.control, msg).map_err(io("writing to the control stream"))
    }

    /// Handle whatever workers and the destination have reported.
    fn pump(&mut self) -> Result<(), MigrationError> {
        for (w, worker) in self.workers.iter_mut().enumerate() {
            while let Some(event) = worker.events.pop() {
                self.last_activity = Instant::now();
                match event {
                    TxEvent::RoundSent {
                        round,
                        zero_pages,
                        raw_pages,
                        bytes,
                        ..
                    } => self.round_sent[w] = Some((round, zero_pages, raw_pages, bytes)),
                    TxEvent::Telemetry(mut t) => {
                        // Workers count from their start; a stream outlives the workers
                        // a transport switch retired.
                        if let Some(&(bytes, pages)) = self.carried.get(usize::from(t.stream)) {
                            t.bytes += bytes;
                            t.pages += pages;
                        }
                        if let Some(slot) = self.telemetry.get_mut(usize::from(t.stream)) {
                            let taken = t.pages.saturating_sub(slot.pages);
                            if let Some(b) = self.backlog.get_mut(w) {
                                b.taken(taken);
                            }
                            *slot = t;
                        }
                    }
                    TxEvent::Worker(t) => {
                        if let Some(slot) = self.worker_telemetry.get_mut(t.worker) {
                            *slot = t;
                        }
                        if let Some(steering) = &mut self.steering {
                            steering.worker_telemetry(t);
                        }
                    }
                    TxEvent::Finished {
                        zc_copied,
                        zc_sends,
                        zc_fell_back,
                        ..
                    } => {
                        self.finished += 1;
                        self.zc_copied += zc_copied;
                        self.zc_sends += zc_sends;
                        self.zc_fell_back |= zc_fell_back;
                    }
                    TxEvent::Failed { error, .. } => return Err(MigrationError::Transport(error)),
                }
            }
        }
        loop {
            match self.control_rx.try_recv() {
                Ok(Ok(msg)) => {
                    self.last_activity = Instant::now();
                    match msg {
                        ControlMessage::RoundApplied { round, .. } => {
                            self.applied_round = Some(round)
                        }
                        ControlMessage::Abort { message, .. } => {
                            return Err(MigrationError::Transport(format!(
                                "destination aborted: {message}"
                            )));
                        }
                        ControlMessage::Ping { nanos } => {
                            self.send_control(&ControlMessage::Pong { nanos })?
                        }
                        ControlMessage::Pong { nanos } => self.pong(nanos),
                        other => {
                            return Err(wire::WireError::Unexpected(format!(
                                "{other:?} from the destination"
                            ))
                            .into());
                        }
                    }
                }
                Ok(Err(e)) => {
                    return Err(MigrationError::Transport(format!("control stream: {e}")));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    return Err(MigrationError::Transport("control stream closed".into()));
                }
            }
        }
        if self.last_activity.elapsed() > self.config.reply_timeout {
            return Err(MigrationError::Transport(format!(
                "no progress from workers or destination for {:?}",
                self.config.reply_timeout
            )));
        }
        if self.live.is_some() {
            self.live_tick()?;
        }
        Ok(())
    }

    /// The slow path's side, at a loop boundary: cancellation, a newer epoch, a ping
    /// due, a report due.
    fn live_tick(&mut self) -> Result<(), MigrationError> {
        let Some(live) = self.live else {
            return Ok(());
        };
        if let Some(reason) = live.cancelled() {
            return Err(MigrationError::Aborted {
                reason: format!("cancelled: {reason}"),
                rounds: self.current_round,
            });
        }
        if let Some(epoch) = live.newer_than(self.adopted_epoch) {
            self.adopt(&epoch.settings);
            self.adopted_epoch = epoch.number;
            live.mark_adopted(epoch.number);
        }
        let now = Instant::now();
        if self.pinging && now >= self.next_ping {
            self.next_ping = now + PING_INTERVAL;
            let nanos = now.duration_since(self.opened).as_nanos() as u64;
            self.send_control(&ControlMessage::Ping { nanos })?;
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

    fn pong(&mut self, nanos: u64) {
        let now = Instant::now().duration_since(self.opened).as_nanos() as u64;
        if let Some(rtt) = now.checked_sub(nanos) {
            self.ping_rtt = Some(Duration::from_nanos(rtt));
        }
    }

    /// Adopt live settings: socket options at once, worker settings through their
    /// control rings, the codec mode through steering, a stream count at the next round
    /// boundary.
    fn adopt(&mut self, new: &LiveSettings) {
        let old = self.live_settings.clone();
        let changed = |f: &dyn Fn(&LiveSettings) -> bool| old.as_ref().is_none_or(f);
        let connected = self.config.streams;
        if changed(&|o| o.active_streams != new.active_streams) {
            let wanted = new.active_streams.unwrap_or(connected);
            if wanted == 0 || wanted > connected {
                self.live_note(format!(
                    "streams {wanted}: this session opened {connected} (allowed 1..={connected}); unchanged"
                ));
            } else if wanted != self.active_streams && !self.stream_map_ok {
                self.live_note(format!(
                    "streams {wanted}: the destination cannot change streams mid-session; unchanged"
                ));
            } else if wanted != self.active_streams || self.pending_streams.is_some() {
                self.pending_streams = Some(wanted);
            }
        }
        if changed(&|o| o.transport != new.transport) {
            let wanted = new.transport.unwrap_or(self.opened_transport);
            if wanted == TransportKind::IoUring && !self.uring_available {
                self.live_note("transport io_uring: unavailable on this kernel; unchanged".into());
            } else if wanted != self.transport || self.pending_transport.is_some() {
                self.pending_transport = Some(wanted);
            }
        }
        if changed(&|o| o.congestion != new.congestion) {
            let mut failed = None;
            for s in &self.data_sockets {
                if let Err(e) = socket::set_congestion(s, new.congestion) {
                    failed = Some(e);
                }
            }
            if let Some(e) = failed {
                self.live_note(e);
            }
        }
        if changed(&|o| o.pacing_rate != new.pacing_rate) {
            self.apply_pacing(new.pacing_rate);
        }
        if changed(&|o| o.codec != new.codec) {
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
        if changed(&|o| o.zero_copy != new.zero_copy) {
            for w in 0..self.workers.len() {
                self.deferred_control
                    .push((w, TxControl::SetZeroCopy(new.zero_copy)));
            }
        }
        if changed(&|o| o.idle != new.idle) {
            for w in 0..self.workers.len() {
                self.deferred_control
                    .push((w, TxControl::SetIdle(new.idle)));
            }
        }
        self.downtime_limit = new.downtime_limit;
        self.live_settings = Some(new.clone());
    }

    /// Cap every stream at its share of `total` (bytes per second) over the streams
    /// carrying pages.
    fn apply_pacing(&mut self, total: Option<u64>) {
        let per_stream = total.map(|t| (t / u64::from(self.active_streams.max(1))).max(1));
        let mut failed = None;
        for s in &self.data_sockets {
            if let Err(e) = socket::set_pacing_rate(s, per_stream) {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            self.live_note(e);
        }
    }

    fn live_note(&mut self, note: String) {
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
    fn switch_streams(&mut self, active: u16, round: u64) -> Result<(), MigrationError> {
        self.last_activity = Instant::now();
        while self.applied_round.is_none_or(|r| r < round) {
            self.pump()?;
            self.steer();
            std::thread::sleep(Duration::from_micros(200));
        }
        for w in 0..self.workers.len() {
            // Straight onto the ring, ahead of the next runs: a change deferred past
            // them would let a codec use a stale cache.
            self.push_control(w, TxControl::ForgetSentPages)?;
            self.push(w, TxCommand::StreamMap { active })?;
        }
        self.wake_all();
        self.active_streams = active;
        if let Some(live) = self.live {
            live.set_active_streams(active);
        }
        let pacing = self.live_settings.as_ref().and_then(|s| s.pacing_rate);
        if pacing.is_some() {
            self.apply_pacing(pacing);
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
    fn switch_transport(&mut self, kind: TransportKind, round: u64) -> Result<(), MigrationError> {
        let from = self.transport;
        for w in 0..self.workers.len() {
            self.push(w, TxCommand::Release)?;
        }
        self.wake_all();
        self.last_activity = Instant::now();
        while self.finished < self.workers.len() {
            self.pump()?;
            std::thread::sleep(Duration::from_micros(200));
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
        // The retired workers' final counters (taken in by the last pump) carry over.
        for (carried, t) in self.carried.iter_mut().zip(&self.telemetry) {
            *carried = (t.bytes, t.pages);
        }
        let streams = self
            .data_sockets
            .iter()
            .enumerate()
            .map(|(id, s)| {
                s.try_clone()
                    .map(|s| (id as u16, s))
                    .map_err(io("cloning a data socket"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let settings = self.live_settings.clone();
        // Started able to send zero-copy when the kernel can; the live setting then
        // says whether they do.
        let zero_copy = kind == TransportKind::IoUring && self.uring_zero_copy;
        let (workers, worker_of) = spawn_workers(
            kind,
            zero_copy,
            streams,
            &self.tx_setup,
            self.config,
            &self.cpus,
        )?;
        let n = workers.len();
        self.workers = workers;
        self.worker_of = worker_of;
        self.finished = 0;
        self.round_sent = vec![None; n];
        self.backlog = (0..n).map(|_| Backlog::new()).collect();
        self.worker_telemetry = (0..n)
            .map(|worker| WorkerTelemetry {
                worker,
                ..WorkerTelemetry::default()
            })
            .collect();
        // Everything queued for the old workers is void; the new ones get the whole
        // state, ahead of any run.
        self.deferred_control.clear();
        let mut changes = Vec::new();
        if let Some(steering) = &mut self.steering {
            changes.extend(steering.set_workers(streams_per_worker(&self.worker_of, n)));
        }
        if let Some(settings) = &settings {
            for w in 0..n {
                changes.push((w, TxControl::SetIdle(settings.idle)));
                changes.push((w, TxControl::SetZeroCopy(settings.zero_copy)));
            }
        }
        for (w, change) in changes {
            self.push_control(w, change)?;
        }
        self.transport = kind;
        self.transport_notes.push(format!(
            "transport: {from} → {kind} after round {round} (live)"
        ));
        Ok(())
    }

    /// Put a configuration change straight onto worker `w`'s control ring, waiting
    /// while it is full.
    fn push_control(&mut self, w: usize, mut change: TxControl) -> Result<(), MigrationError> {
        loop {
            match self.workers[w].control.push(change) {
                Ok(()) => return Ok(()),
                Err(full) => {
                    change = full.0;
                    self.workers[w].thread.unpark();
                    self.pump()?;
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Bring a progress snapshot's live parts up to date.
    fn refresh(&mut self, p: &mut Progress) {
        p.streams.clone_from(&self.telemetry);
        p.workers = self.worker_status();
        p.active_streams = self.active_streams;
        p.epoch = self.adopted_epoch;
        p.transport = self.transport;
        p.ping_rtt = self.ping_rtt;
        if let Some(elapsed) = self.latest_progress.as_ref().map(|l| l.elapsed) {
            p.elapsed = elapsed.max(p.elapsed);
        }
    }

    fn worker_status(&mut self) -> Vec<WorkerStatus> {
        self.workers
            .iter_mut()
            .zip(&self.worker_telemetry)
            .map(|(w, t)| WorkerStatus {
                telemetry: *t,
                queued_commands: w.commands.capacity() - w.commands.slots(),
            })
            .collect()
    }

    fn push(&mut self, worker: usize, mut cmd: TxCommand) -> Result<(), MigrationError> {
        loop {
            match self.workers[worker].commands.push(cmd) {
                Ok(()) => return Ok(()),
                Err(full) => {
                    cmd = full.0;
                    self.workers[worker].thread.unpark();
                    self.pump()?;
                    self.steer();
                    std::thread::yield_now();
                }
            }
        }
    }

    fn wake_all(&self) {
        for w in &self.workers {
            w.thread.unpark();
        }
    }

    /// Let codec steering act, and pass its changes to the workers. Never blocks: a
    /// change that finds a control ring full waits for the next call.
    fn steer(&mut self) {
        let mut changes = std::mem::take(&mut self.deferred_control);
        if let Some(steering) = &mut self.steering {
            changes.extend(steering.tick(&self.telemetry, self.current_round, self.round_left));
        }
        for (w, change) in changes {
            // A change for a worker that a transport switch has since retired.
            if w >= self.workers.len() {
                continue;
            }
            match self.workers[w].control.push(change) {
                Ok(()) => self.workers[w].thread.unpark(),
                Err(full) => self.deferred_control.push((w, full.0)),
            }
        }
    }

    /// Whether a change waits for the round boundary (and the round should end early).
    fn change_pending(&self) -> bool {
        self.pending_streams.is_some() || self.pending_transport.is_some()
    }

    /// Queue every page of `pages` as runs within chunks; returns how many, and, when
    /// `may_stop` and a change of streams or transport came in meanwhile, the pages left unqueued
    /// (the round then ends early, so that the change can take effect).
    fn push_pages(
        &mut self,
        pages: &DirtyBitmap,
        may_stop: bool,
        on_batch: &mut dyn FnMut(&mut Self, u64),
    ) -> Result<(u64, Option<DirtyBitmap>), MigrationError> {
        let streams = self.active_streams;
        self.round_left = pages.count();
        let mut queued = 0u64;
        let mut run: Option<(u64, u32)> = None;
        let mut since_wake = 0u32;
        let flush =
            |s: &mut Self, run: (u64, u32), since_wake: &mut u32| -> Result<(), MigrationError> {
                let stream = stream_of(run.0, streams);
                let worker = s.worker_of[usize::from(stream)];
                if s.live.is_some() {
                    while s.backlog[worker].is_full() {
                        s.workers[worker].thread.unpark();
                        s.pump()?;
                        s.steer();
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    s.backlog[worker].pushed(run.1);
                }
                s.push(
                    worker,
                    TxCommand::Pages {
                        stream,
                        first: run.0,
                        count: run.1,
                    },
                )?;
                *since_wake += 1;
                s.round_left = s.round_left.saturating_sub(u64::from(run.1));
                if *since_wake >= WAKE_EVERY {
                    *since_wake = 0;
                    s.wake_all();
                    s.pump()?;
                    s.steer();
                }
                Ok(())
            };
        let mut reported = 0u64;
        let mut pages_left = pages.iter();
        for page in pages_left.by_ref() {
            if may_stop && self.change_pending() && run.is_none() {
                self.wake_all();
                return Ok((queued, Some(unqueued(pages.pages(), page, pages_left))));
            }
            queued += 1;
            run = match run {
                Some((first, count))
                    if first + u64::from(count) == page
                        && page / CHUNK_PAGES == first / CHUNK_PAGES =>
                {
                    Some((first, count + 1))
                }
                Some(done) => {
                    flush(self, done, &mut since_wake)?;
                    if queued - reported >= 4096 {
                        reported = queued;
                        on_batch(self, queued);
                    }
                    if may_stop && self.change_pending() {
                        // Stop here: this page is the first left for the next round.
                        self.wake_all();
                        return Ok((queued - 1, Some(unqueued(pages.pages(), page, pages_left))));
                    }
                    Some((page, 1))
                }
                None => Some((page, 1)),
            };
        }
        if let Some(done) = run {
            flush(self, done, &mut since_wake)?;
        }
        self.wake_all();
        Ok((queued, None))
    }

    /// Close round `round` on every worker and wait until all of it is in the kernel.
    /// Returns (zero pages, raw pages, bytes).
    fn end_round(&mut self, round: u64) -> Result<(u64, u64, u64), MigrationError> {
        for w in 0..self.workers.len() {
            self.push(w, TxCommand::EndRound { round })?;
        }
        self.wake_all();
        self.last_activity = Instant::now();
        loop {
            self.pump()?;
            self.steer();
            if self
                .round_sent
                .iter()
                .all(|r| r.is_some_and(|r| r.0 == round))
            {
                let mut totals = (0, 0, 0);
                for r in self.round_sent.iter_mut() {
                    let (_, z, raw, b) = r.take().expect("checked above");
                    totals.0 += z;
                    totals.1 += raw;
                    totals.2 += b;
                }
                return Ok(totals);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn progress_snapshot(
        &mut self,
        round: u64,
        phase: &'static str,
        totals: &Totals,
        start: Instant,
    ) -> Progress {
        let p = Progress {
            round,
            phase,
            bytes_sent: totals.bytes,
            pages_sent: totals.pages,
            rounds_done: totals.rounds_done,
            round_pages: totals.round_pages,
            round_pages_queued: totals.round_queued,
            dirty_rate: totals.dirty_rate,
            bandwidth: totals.bandwidth(),
            throttle: totals.throttle,
            elapsed: start.elapsed(),
            streams: self.telemetry.clone(),
            workers: self.worker_status(),
            connected_streams: self.config.streams,
            active_streams: self.active_streams,
            epoch: self.adopted_epoch,
            transport: self.transport,
            ping_rtt: self.ping_rtt,
        };
        if self.live.is_some() {
            self.latest_progress = Some(p.clone());
        }
        p
    }

    fn run(
        &mut self,
        guest: &dyn GuestControl,
        dirty_log: &mut dyn DirtyLog,
        start: Instant,
        probe: &transport::TransportProbe,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationReport, MigrationError> {
        let pages = self.memory.pages();
        let mut verify_estimate = estimate_verify_seconds(&self.memory);
        let mut rounds: Vec<RoundStats> = Vec::new();
        let mut totals = Totals::default();
        let mut dirty = DirtyBitmap::full(pages);
        // Round 0 sends everything: writes made before it (during setup) are covered,
        // so start the first interval now.
        dirty_log.collect(&mut DirtyBitmap::new(pages))?;
        let copy_start = Instant::now();
        if let Some(steering) = &mut self.steering {
            steering.start();
        }
        let setup_seconds = start.elapsed().as_secs_f64();
        let start = copy_start;
        let mut last_collect = Instant::now();
        let mut stuck = 0u32;
        let mut previous_dirty = u64::MAX;
        let mut round = 0u64;
        let (estimated, final_set) = loop {
            let round_start = Instant::now();
            self.current_round = round;
            totals.round_pages = dirty.count();
            totals.round_queued = 0;
            let snapshot_round = round;
            let (sent, unsent) = self.push_pages(&dirty, true, &mut |s, queued| {
                totals.round_queued = queued;
                progress(&s.progress_snapshot(snapshot_round, "precopy", &totals, start));
            })?;
            totals.round_queued = sent;
            let (zero, raw, bytes) = self.end_round(round)?;
            let seconds = round_start.elapsed().as_secs_f64();
            totals.add_round(sent, bytes, seconds);
            if let Some(kind) = self.pending_transport.take() {
                self.switch_transport(kind, round)?;
            }
            if let Some(active) = self.pending_streams.take() {
                self.switch_streams(active, round)?;
            }
            // What the guest wrote while this round went out, and what a round ended
            // early for a change of streams left unsent.
            let mut next = DirtyBitmap::new(pages);
            dirty_log.collect(&mut next)?;
            let interval = last_collect.elapsed().as_secs_f64();
            last_collect = Instant::now();
            totals.dirty_rate = next.count() as f64 * PAGE_SIZE as f64 / interval.max(1e-6);
            let ended_early = unsent.is_some();
            if let Some(unsent) = unsent {
                next.union_with(&unsent);
            }
            // Pages due in the next round.
            let dirtied = next.count();
            let bytes_per_page = if sent > 0 {
                (bytes as f64 / sent as f64).max(RAW_PAGE_WIRE * 0.1)
            } else {
                RAW_PAGE_WIRE
            };
            // The checksum rate measured at the start may have met a busy machine (the
            // destination faulting its memory in, say); keep the best rate seen, so one
            // bad sample cannot hold the estimate over the limit for good.
            verify_estimate = verify_estimate.min(estimate_verify_seconds(&self.memory));
            let estimated = dirtied as f64 * bytes_per_page / totals.bandwidth() + verify_estimate;
            rounds.push(RoundStats {
                round,
                pages: sent,
                zero_pages: zero,
                bytes,
                seconds,
                throughput: bytes as f64 / seconds.max(1e-9),
                dirtied_pages: dirtied,
                dirty_rate: totals.dirty_rate,
                estimated_downtime: estimated,
                throttle: totals.throttle,
            });
            totals.zero += zero;
            let _ = raw;
            progress(&self.progress_snapshot(round, "precopy", &totals, start));
            if estimated <= self.downtime_limit.as_secs_f64() {
                break (estimated, next);
            }
            if round + 1 >= u64::from(self.config.max_rounds)
                || start.elapsed() >= self.config.max_duration
            {
                return Err(MigrationError::Aborted {
                    reason: format!(
                        "not converging: {dirtied} pages dirtied in the last round, estimated downtime {:.0} ms over the {:.0} ms limit{}",
                        estimated * 1e3,
                        self.downtime_limit.as_secs_f64() * 1e3,
                        if self.config.auto_converge {
                            format!(" (throttle at {}%)", totals.throttle)
                        } else {
                            " (auto-converge off)".to_string()
                        }
                    ),
                    rounds: round + 1,
                });
            }
            // Auto-converge: two rounds in a row that shrink by less than 10% step the
            // throttle up (QEMU's cpu-throttle-initial 20, increment 10, tailslow off).
            if ended_early {
                // Not a measure of convergence: the round was cut short.
            } else if dirtied.saturating_mul(10) >= previous_dirty.saturating_mul(9) {
                stuck += 1;
            } else {
                stuck = 0;
            }
            previous_dirty = dirtied;
            if self.config.auto_converge && stuck >= 2 {
                totals.throttle = if totals.throttle == 0 {
                    20
                } else {
                    (totals.throttle + 10).min(99)
                };
                guest.set_throttle(totals.throttle);
                totals.max_throttle = totals.max_throttle.max(totals.throttle);
                stuck = 0;
            }
            dirty = next;
            round += 1;
        };

        // Switchover: pause, send what is left, verify.
        let paused_at = Instant::now();
        guest.pause();
        let outcome = self.switchover(
            dirty_log,
            final_set,
            round + 1,
            &mut totals,
            &mut rounds,
            start,
            progress,
        );
        let (verified_pages, digest, final_round_seconds) = match outcome {
            Ok(v) => v,
            Err(e) => {
                guest.resume();
                return Err(e);
            }
        };
        let measured = paused_at.elapsed().as_secs_f64();
        guest.set_throttle(0);
        let total_seconds = start.elapsed().as_secs_f64();
        Ok(MigrationReport {
            memory_bytes: self.memory.len() as u64,
            pages,
            zero_pages_skipped: rounds.iter().map(|r| r.zero_pages).sum(),
            bytes_sent: totals.bytes,
            total_seconds,
            throughput: totals.bytes as f64 / total_seconds,
            estimated_downtime: estimated,
            measured_downtime: measured,
            final_round_seconds,
            verify_seconds: measured - final_round_seconds,
            downtime_limit: self.downtime_limit.as_secs_f64(),
            verified_pages,
            digest: format!("{digest:08x}"),
            dirty_log: dirty_log.kind().to_string(),
            transport: TransportReport {
                kind: probe.kind.to_string(),
                zero_copy: probe.zero_copy,
                zero_copy_copied: self.zc_copied,
                zero_copy_sends: self.zc_sends,
                streams: self.config.streams,
                workers: self.workers.len(),
                congestion: self.config.transport.socket.congestion.to_string(),
                uring_ops: probe.uring_ops.iter().map(|s| s.to_string()).collect(),
                notes: probe
                    .notes
                    .iter()
                    .chain(&self.transport_notes)
                    .cloned()
                    .chain(self.zc_fell_back.then(|| {
                        "zero-copy: the kernel copied every probed send (loopback or veth), so sends fell back to copies"
                            .to_string()
                    }))
                    .collect(),
            },
            max_throttle: totals.max_throttle,
            setup_seconds,
            simd: dwcp_simd::Kernels::active().level().to_string(),
            notes: std::mem::take(&mut self.live_notes),
            codec: self.steering.take().map(Steering::finish),
            rounds,
        })
    }

    /// The guest is paused: send the last dirty pages, end the streams, exchange the
    /// page CRCs and wait for the destination's verdict.
    #[allow(clippy::too_many_arguments)]
    fn switchover(
        &mut self,
        dirty_log: &mut dyn DirtyLog,
        mut final_set: DirtyBitmap,
        round: u64,
        totals: &mut Totals,
        rounds: &mut Vec<RoundStats>,
        start: Instant,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(u64, u32, f64), MigrationError> {
        let t0 = Instant::now();
        dirty_log.collect(&mut final_set)?;
        totals.round_pages = final_set.count();
        progress(&self.progress_snapshot(round, "switchover", totals, start));
        self.pinging = false;
        let (sent, _) = self.push_pages(&final_set, false, &mut |_, _| {})?;
        let (zero, _raw, bytes) = self.end_round(round)?;
        self.send_control(&ControlMessage::Switchover { final_round: round })?;
        for w in 0..self.workers.len() {
            self.push(w, TxCommand::Finish)?;
        }
        self.wake_all();
        while self.finished < self.workers.len() {
            self.pump()?;
            self.steer();
            std::thread::sleep(Duration::from_micros(200));
        }
        let final_seconds = t0.elapsed().as_secs_f64();
        totals.add_round(sent, bytes, final_seconds);
        totals.zero += zero;
        rounds.push(RoundStats {
            round,
            pages: sent,
            zero_pages: zero,
            bytes,
            seconds: final_seconds,
            throughput: bytes as f64 / final_seconds.max(1e-9),
            dirtied_pages: 0,
            dirty_rate: 0.0,
            estimated_downtime: 0.0,
            throttle: totals.throttle,
        });
        progress(&self.progress_snapshot(round, "verify", totals, start));
        // SAFETY: the guest is paused (the caller paused it and waits for us), so
        // nothing writes the memory while it is checksummed.
        let (crcs, digest) = unsafe { page_crcs(&self.memory) };
        for (i, chunk) in crcs.chunks(1 << 16).enumerate() {
            self.send_control(&ControlMessage::PageCrcs {
                first_page: (i << 16) as u64,
                crcs: chunk.to_vec(),
            })?;
        }
        self.send_control(&ControlMessage::Digest {
            pages: crcs.len() as u64,
            digest,
        })?;
        self.last_activity = Instant::now();
        loop {
            match self.control_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(ControlMessage::Verified {
                    pages,
                    mismatches,
                    first_mismatch,
                    digest: theirs,
                })) => {
                    if mismatches > 0 || theirs != digest || pages != crcs.len() as u64 {
                        return Err(MigrationError::Verification {
                            mismatches: mismatches.max(1),
                            first: first_mismatch,
                        });
                    }
                    return Ok((pages, digest, final_seconds));
                }
                Ok(Ok(ControlMessage::RoundApplied { round, .. })) => {
                    self.applied_round = Some(round)
                }
                // A reply to a ping sent before the switchover.
                Ok(Ok(ControlMessage::Pong { .. })) => {}
                Ok(Ok(ControlMessage::Abort { message, .. })) => {
                    return Err(MigrationError::Transport(format!(
                        "destination aborted: {message}"
                    )));
                }
                Ok(Ok(other)) => {
                    return Err(wire::WireError::Unexpected(format!(
                        "{other:?} while waiting for the verdict"
                    ))
                    .into());
                }
                Ok(Err(e)) => {
                    return Err(MigrationError::Transport(format!("control stream: {e}")));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.last_activity.elapsed() > self.config.reply_timeout {
                        return Err(MigrationError::Transport(
                            "no verdict from the destination".into(),
                        ));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::Transport(
                        "control stream closed before the verdict".into(),
                    ));
                }
            }
        }
    }

    /// Tell the destination and stop every stream (best effort: the session is over).
    fn abort(&mut self, error: &MigrationError) {
        let reason = match error {
            MigrationError::Aborted { .. } => AbortReason::NotConverging,
            MigrationError::Protocol(_) => AbortReason::ProtocolError,
            MigrationError::Verification { .. } => AbortReason::VerificationFailed,
            _ => AbortReason::LocalError,
        };
        let _ = write_control(
            &mut self.control,
            &ControlMessage::Abort {
                reason,
                message: error.to_string(),
            },
        );
        for s in &self.data_sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn close(&mut self) {
        for w in &mut self.workers {
            let _ = w.commands.push(TxCommand::Finish);
            w.thread.unpark();
        }
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// The pages a round leaves unqueued: `first` and the rest of the round's iterator.
fn unqueued(pages: u64, first: u64, rest: impl Iterator<Item = u64>) -> DirtyBitmap {
    let mut left = DirtyBitmap::new(pages);
    left.set(first);
    for p in rest {
        left.set(p);
    }
    left
}

/// Running totals of a migration.
#[derive(Default)]
struct Totals {
    bytes: u64,
    pages: u64,
    zero: u64,
    send_seconds: f64,
    dirty_rate: f64,
    throttle: u32,
    max_throttle: u32,
    round_pages: u64,
    round_queued: u64,
    rounds_done: u64,
}

impl Totals {
    fn add_round(&mut self, pages: u64, bytes: u64, seconds: f64) {
        self.rounds_done += 1;
        self.pages += pages;
        self.bytes += bytes;
        self.send_seconds += seconds;
    }

    /// Bytes per second over all rounds so far (time spent sending only).
    fn bandwidth(&self) -> f64 {
        if self.send_seconds > 0.0 && self.bytes > 0 {
            self.bytes as f64 / self.send_seconds
        } else {
            1e9
        }
    }
}

/// Time to checksum all memory at the switchover, from the fastest of 16 passes over
/// 1 MiB of the guest's own pages each, spread over its memory (copied out page by
/// page, as the guest runs). The fastest pass is what the machine can do; a pass the
/// scheduler interrupted says nothing about it.
fn estimate_verify_seconds(memory: &GuestMemory) -> f64 {
    const PASSES: u64 = 16;
    const PASS_PAGES: u64 = 256;
    let pages = memory.pages();
    let stride = (pages / (PASSES * PASS_PAGES)).max(1);
    let mut page = vec![0u8; PAGE_SIZE];
    let kernels = dwcp_simd::Kernels::active();
    let mut best = f64::MAX;
    let mut acc = 0u32;
    for pass in 0..PASSES {
        let t = Instant::now();
        for i in 0..PASS_PAGES {
            let p = ((pass * PASS_PAGES + i) * stride).min(pages - 1);
            memory.read_page(p, &mut page);
            acc ^= kernels.crc32c(&page);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(acc);
    let rate = (PASS_PAGES as usize * PAGE_SIZE) as f64 / best.max(1e-9);
    // Both sides checksum their memory, overlapping; the copy each page takes here
    // (verification reads memory in place) stands in for the margin.
    memory.len() as f64 / rate
}
