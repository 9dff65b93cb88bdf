//! The source side of a migration: open the session, run pre-copy rounds as the
//! planner decides, switch over.
//!
//! - this module: the session's state, the event pump, queuing a round's pages to the
//!   workers, the round loop;
//! - `adopt`: live settings (epochs from the slow path), stream-count and transport
//!   changes at round boundaries, pings and reports;
//! - `switchover`: the paused window (final collection, final round, the table digest
//!   or full verification, the verdict) and the audit after it.

mod adopt;
mod loss;
mod reconnect;
mod switchover;

use super::MigrationError;
use super::VerifyMode;
use super::fleet::TxFleet;
use super::handshake::{self, ControlLink};
use super::live::{LiveControl, LiveSettings};
use super::precopy::{Decision, DirtyRate, Planner, PlannerConfig, RoundMeasurement};
use super::report::{MigrationReport, Progress, RoundStats, SecurityReport, TransportReport};
use super::steer::Steering;
use crate::codec::policy::{CodecConfig, CodecMode, CodecPolicy};
use crate::codec::{CodecSettings, CodecSetup};
use crate::crc_table::CrcTable;
use crate::dirty::{DirtyBitmap, DirtyLog};
use crate::guest::GuestControl;
use crate::memory::{GuestMemory, HoleCursor, PAGE_SIZE};
use crate::security::Identity;
use crate::transport::{self, TransportConfig, TransportKind, TxCommand, TxControl, TxSetup};
use crate::wire::{self, CHUNK_PAGES, ControlMessage, caps};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
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
    /// How the switchover is verified.
    pub verify: VerifyMode,
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
    /// This appliance's identity: the session is TLS 1.3 with mutual authentication and
    /// its data streams carry sealed records. `None`: plain (an `--insecure` session).
    pub security: Option<Arc<Identity>>,
    /// A data stream with bytes outstanding and no progress for this long is given up
    /// and its pages go to the others. `None`: 3 × its smoothed RTT + 1 s.
    pub stream_stall: Option<Duration>,
    /// When every connection to the destination is lost, keep reconnecting for this
    /// long and resume the session (zero: fail at once, as without resume).
    pub resume_grace: Duration,
    /// Keep the record of the session here (its id, the destination, the round
    /// reached), for resuming it after this appliance restarts; removed when the
    /// session ends. For guests whose memory is a file.
    pub session_record: Option<std::path::PathBuf>,
    /// Kept in the record for the caller: how it finds the guest again (a QEMU VM's
    /// QMP socket).
    pub record_guest: Option<String>,
    /// Kept in the record for the caller: its number for the migration.
    pub record_migration_id: Option<u64>,
    /// Resume this session, left by a crash of this appliance, instead of opening a
    /// new one: the table is read back from the guest's memory, compared with the
    /// destination's, and the recorded round goes on with what the destination lacks.
    pub resume: Option<super::OutgoingRecord>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            streams: 4,
            workers: 0,
            transport: TransportConfig::default(),
            codec: CodecConfig::default(),
            // QEMU's default is 300 ms; the paused window here holds only the last
            // dirty pages and one round trip.
            downtime_limit: Duration::from_millis(50),
            verify: VerifyMode::Table,
            max_rounds: 30,
            max_duration: Duration::from_secs(600),
            auto_converge: true,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
            security: None,
            stream_stall: None,
            resume_grace: Duration::from_secs(60),
            session_record: None,
            record_guest: None,
            record_migration_id: None,
            resume: None,
        }
    }
}

/// How often the pump runs while a worker's ring or backlog is full.
const WORKER_FULL_POLL: Duration = Duration::from_millis(1);
/// Longest wait, after an abort, for the destination to close its control stream.
const ABORT_LINGER: Duration = Duration::from_millis(500);

/// How many times a decided switchover may be put off because the estimate, made
/// again as the guest was to pause, rose over the limit (each costs one more round);
/// past that the switchover goes ahead.
const MAX_POSTPONED_SWITCHOVERS: u32 = 3;

/// How often the source pings the destination on the control stream.
const PING_INTERVAL: Duration = Duration::from_millis(250);
/// Walks timed as the paused collection runs, for the downtime estimate: the quickest
/// of a few (each costs what the paused collection will, 0.1-0.4 ms for 1-4 GiB here).
const PAUSED_WALKS_TIMED: u32 = 3;
/// Pages per command batch before waking a worker.
const WAKE_EVERY: u32 = 64;
/// Pages queued between two progress reports within a round.
const PROGRESS_EVERY: u64 = 4096;
/// How often progress is reported while a round's queued pages drain.
const PROGRESS_WAITING: Duration = Duration::from_millis(50);
/// Bytes of frames per page sent raw.
const RAW_PAGE_WIRE: f64 = (PAGE_SIZE + wire::PAGE_CRC_LEN) as f64;

/// Running totals of a migration.
#[derive(Default)]
struct Totals {
    bytes: u64,
    pages: u64,
    send_seconds: f64,
    dirty_rate: f64,
    throttle: u32,
    max_throttle: u32,
    round_pages: u64,
    round_queued: u64,
    /// `round_queued` is already in `pages` (the round was added, the next has not
    /// started).
    round_counted: bool,
    rounds_done: u64,
}

impl Totals {
    fn add_round(&mut self, pages: u64, bytes: u64, seconds: f64) {
        self.rounds_done += 1;
        self.pages += pages;
        self.round_counted = true;
        self.bytes += bytes;
        self.send_seconds += seconds;
    }

    /// Pages handed to workers so far, the round in progress included.
    fn pages_sent(&self) -> u64 {
        if self.round_counted {
            self.pages
        } else {
            self.pages + self.round_queued
        }
    }

    /// A new round starts: nothing of it queued yet.
    fn start_round(&mut self) {
        self.round_queued = 0;
        self.round_counted = false;
    }

    /// Bytes per second over all rounds so far (time spent sending only); 0 before the
    /// first round is sent.
    fn bandwidth(&self) -> f64 {
        if self.send_seconds > 0.0 {
            self.bytes as f64 / self.send_seconds
        } else {
            0.0
        }
    }
}

/// What the session found out about its link and peer at setup.
struct Setup {
    /// The transport the session opened with.
    opened_transport: TransportKind,
    /// io_uring workers may run here.
    uring_available: bool,
    /// io_uring workers may send zero-copy here.
    uring_zero_copy: bool,
    /// The destination understands stream map markers.
    stream_map_ok: bool,
    /// The probe's findings, for the report.
    probe: transport::TransportProbe,
}

/// Pings on the control stream: payloads are nanoseconds since the session opened.
struct Pings {
    opened: Instant,
    next: Instant,
    on: bool,
    rtt: Option<Duration>,
    /// The latest ping answered (its `nanos`).
    answered: u64,
}

/// A source session, from the welcome to the verdict.
struct Session<'a> {
    config: &'a SourceConfig,
    /// The settings in force: epoch 0 from the configuration, then every epoch the
    /// slow path publishes.
    settings: LiveSettings,
    live: Option<&'a LiveControl>,
    adopted_epoch: u64,
    memory: Arc<GuestMemory>,
    /// What the destination holds, page by page, as far as this side sent it.
    table: Arc<CrcTable>,
    control: ControlLink,
    fleet: TxFleet,
    steering: Option<Steering<'a>>,
    /// Configuration changes that found a worker's control ring full.
    deferred_control: Vec<(usize, TxControl)>,
    planner: Planner,
    setup: Setup,
    /// The memory file's holes, looked up as round 0 reaches them, after its
    /// dirty-log interval began. A page in a hole then reads as zeros, and any write
    /// since is in the log, so round 0 sends it as part of a zero run without reading
    /// it: a read through the shared mapping would fill each hole with a new page of
    /// the source host's memory, and cost a page fault. `None` once round 0 is sent,
    /// for anonymous memory, and in a resumed session.
    known_zero: Option<HoleCursor>,
    /// The round being sent and its pages left, for steering.
    current_round: u64,
    round_left: u64,
    /// Rounds in the kernel and not yet acknowledged, with when they got there.
    unacknowledged: VecDeque<(u64, Instant)>,
    applied_round: Option<u64>,
    /// Streams carrying pages now, and changes waiting for the round boundary.
    active_streams: u16,
    pending_streams: Option<u16>,
    pending_transport: Option<TransportKind>,
    pings: Pings,
    last_activity: Instant,
    totals: Totals,
    /// When round 0 began.
    copy_start: Instant,
    /// The latest progress snapshot and when it was last offered to the slow path.
    latest_progress: Option<Progress>,
    last_report: Instant,
    estimated_downtime: Option<Duration>,
    /// Switchovers decided, then postponed as the guest was to pause (the estimate
    /// had risen over the limit), and the last one's reason.
    postponed_switchovers: u32,
    postponed: Option<String>,
    /// What setup found and how the transport changed since, for the report.
    transport_notes: Vec<String>,
    /// How the session is secured (`None`: plain).
    security: Option<SecurityReport>,
    /// What live changes could not do as asked, for the report.
    live_notes: Vec<String>,
    /// Lost streams: the routes around them, the pages to queue again.
    losses: loss::Losses,
    /// Where the destination is, and the session there (for replacements and resumes).
    peer: SocketAddr,
    session_id: u128,
    /// Capabilities the destination granted.
    granted: u64,
    /// The guest's device state follows its memory.
    device_state: bool,
    /// The workers' codec setup, for workers started after a resume.
    codec: Option<CodecSetup>,
    /// Every resume of the session so far.
    resumes: Vec<super::report::SessionResume>,
    /// Where the first round starts when the session resumed after a restart: its
    /// number and pages (else round 0, every page).
    start: Option<(u64, DirtyBitmap)>,
    /// The RMA connections, in a session that writes pages by RMA.
    rma: Option<Arc<transport::rma::RmaPool>>,
    /// Pages the destination asked for again (their RMA write arrived wrong), for the
    /// next round; and how many it asked for over the session.
    resend: Option<DirtyBitmap>,
    pages_resent: u64,
}

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
            "zero-copy off: the peer is on loopback, where the kernel copies every zero-copy \
             send; across a real network it is on by default (`[transport] zero_copy = true`; \
             `zero_copy_on_loopback = true` forces it here to measure its cost)"
                .into(),
        );
    }
    // Trackers that compare memory with what was sent keep the table; else the engine
    // keeps its own.
    let table = dirty_log
        .crc_table()
        .unwrap_or_else(|| Arc::new(CrcTable::new(memory.pages())));
    let device_state = guest.device_state().is_some();
    if let Some(live) = live {
        live.set_activity(format!(
            "connecting to {peer}; the destination sets up {} MiB of memory",
            memory.len() >> 20
        ));
    }
    let mut session = Session::open(
        peer,
        memory,
        table,
        config,
        policy,
        live,
        probe,
        device_state,
    )?;
    let mut result = session.run(guest, dirty_log.as_mut(), start, progress);
    if let Err(MigrationError::Transport(local)) = &result
        && !local.starts_with("destination aborted")
        && let Some(theirs) = session.destination_abort(Duration::from_millis(300))
    {
        // A data stream broke because the destination closed it: its reason (a record
        // that failed to open, say) is the real one.
        result = Err(MigrationError::Transport(format!(
            "destination aborted: {theirs} (here: {local})"
        )));
    }
    if let Err(e) = &result {
        session.abort(e);
        // The guest stays here and runs at full speed again (it is resumed already
        // if the switchover had paused it).
        guest.set_throttle(0);
    }
    session.close();
    if let Some(path) = &config.session_record {
        super::record::remove(path);
    }
    result
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

/// Whether `page` extends the run `(first, count)`: the next page, in the same chunk
/// (a run never crosses a chunk, so it stays on one stream).
fn continues((first, count): (u64, u32), page: u64) -> bool {
    first + u64::from(count) == page && page / CHUNK_PAGES == first / CHUNK_PAGES
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

/// Time to checksum all memory at the switchover (`verify = "full"`), from the fastest
/// of 16 passes over up to 1 MiB of the guest's own pages each, spread over its memory
/// (copied out page by page, as the guest runs). The fastest pass is what the machine
/// can do; a pass the scheduler interrupted says nothing about it. A memory file's
/// holes are neither read here (a read would fill one) nor by the verification, so
/// only the pages with data count.
fn estimate_full_verify_seconds(memory: &GuestMemory) -> f64 {
    const PASSES: u64 = 16;
    const PASS_PAGES: u64 = 256;
    let pages = memory.pages();
    let holes = memory.hole_pages();
    let is_hole = |p: u64| holes.as_ref().is_some_and(|h| h.get(p));
    let data_pages = pages - holes.as_ref().map_or(0, |h| h.count());
    let stride = (pages / (PASSES * PASS_PAGES)).max(1);
    let mut page = vec![0u8; PAGE_SIZE];
    let kernels = dwcp_simd::Kernels::active();
    let mut rate = 0f64;
    let mut acc = 0u32;
    for pass in 0..PASSES {
        let t = Instant::now();
        let mut read = 0u64;
        for i in 0..PASS_PAGES {
            let p = ((pass * PASS_PAGES + i) * stride).min(pages - 1);
            if is_hole(p) {
                continue;
            }
            memory.read_page(p, &mut page);
            acc ^= kernels.crc32c(&page);
            read += 1;
        }
        if read > 0 {
            rate =
                rate.max((read as usize * PAGE_SIZE) as f64 / t.elapsed().as_secs_f64().max(1e-9));
        }
    }
    if rate == 0.0 {
        // Every page sampled was a hole: the kernel's speed on a page of our own.
        let t = Instant::now();
        for _ in 0..PASS_PAGES {
            acc ^= kernels.crc32c(std::hint::black_box(&page));
        }
        rate = (PASS_PAGES as usize * PAGE_SIZE) as f64 / t.elapsed().as_secs_f64().max(1e-9);
    }
    std::hint::black_box(acc);
    // Both sides checksum their memory, overlapping; the copy each page takes here
    // (verification reads memory in place) stands in for the margin.
    (data_pages as usize * PAGE_SIZE) as f64 / rate
}

impl<'a> Session<'a> {
    #[allow(clippy::too_many_arguments)]
    fn open(
        peer: SocketAddr,
        memory: Arc<GuestMemory>,
        table: Arc<CrcTable>,
        config: &'a SourceConfig,
        policy: Option<&'a mut dyn CodecPolicy>,
        live: Option<&'a LiveControl>,
        probe: transport::TransportProbe,
        device_state: bool,
    ) -> Result<Self, MigrationError> {
        let never = AtomicBool::new(false);
        let cancel = live.map_or(&never, |l| l.cancel_flag());
        let (opened, restarted) = match &config.resume {
            Some(record) => {
                let (opened, report, pages) = reconnect::resume_after_restart(
                    record,
                    peer,
                    &memory,
                    &table,
                    device_state,
                    config,
                    live,
                )?;
                (opened, Some((record.round, report, pages)))
            }
            None => (
                handshake::open(peer, memory.len() as u64, device_state, config, cancel).map_err(
                    |e| match (live.and_then(LiveControl::cancelled), e) {
                        // The operator's reason, as a cancel later on reports it.
                        (Some(reason), MigrationError::Aborted { .. }) => MigrationError::Aborted {
                            reason: format!("cancelled: {reason}"),
                            rounds: 0,
                        },
                        (_, e) => e,
                    },
                )?,
                None,
            ),
        };
        let (start, resumes) = match restarted {
            Some((round, report, pages)) => (Some((round, pages)), vec![report]),
            None => (None, Vec::new()),
        };
        let mut opened = opened;
        let mut notes = std::mem::take(&mut opened.notes);
        let rma = if opened.accepted & caps::RMA != 0 {
            super::rma::connect(
                &mut opened.control,
                peer,
                &memory,
                config.streams,
                config.connect_timeout,
                &mut notes,
            )?
        } else {
            if config.transport.choice == transport::TransportChoice::Rma {
                notes.push(
                    "RMA was asked for but not granted (the destination's log says why): \
                     pages go as frames"
                        .into(),
                );
            }
            None
        };
        let codec = codec_setup(
            config,
            policy.is_some(),
            live.is_some(),
            opened.accepted,
            &mut notes,
        );
        let tx_setup = TxSetup {
            memory: memory.clone(),
            table: table.clone(),
            codec: codec.clone(),
            records: opened.keys.clone(),
            rma: rma.clone(),
        };
        let codec_for_resume = codec.clone();
        let security = opened.control.security();
        let fleet = TxFleet::spawn(
            probe.kind,
            probe.zero_copy,
            opened.streams,
            tx_setup,
            &config.transport,
            config.workers,
        )?;
        let control = ControlLink::new(opened.control, &config.transport.socket)?;
        // Pages written by RMA skip the codecs, and a policy would judge the link by
        // the frames alone: in automatic mode codecs stay off while pages go by RMA (as
        // datacenter mode has them); fixed settings are the operator's to keep.
        let codec_config = if rma.is_some() && config.codec.mode == CodecMode::Auto {
            notes.push("codecs: off while pages go by RMA (automatic mode)".into());
            CodecConfig {
                mode: CodecMode::Off,
                ..config.codec.clone()
            }
        } else {
            config.codec.clone()
        };
        let steering = codec.as_ref().map(|setup| {
            Steering::new(
                &codec_config,
                policy,
                memory.clone(),
                fleet.streams_per_worker(),
                config.streams,
                setup.initial,
            )
        });
        if let Some(live) = live {
            live.set_active_streams(config.streams);
        }
        let settings = LiveSettings::from_config(config);
        let verify_seconds = if config.verify == VerifyMode::Full {
            estimate_full_verify_seconds(&memory)
        } else {
            0.0
        };
        let planner = Planner::new(PlannerConfig {
            downtime_limit: settings.downtime_limit,
            max_rounds: config.max_rounds,
            max_duration: config.max_duration,
            auto_converge: config.auto_converge,
            raw_page_bytes: RAW_PAGE_WIRE,
            verify_seconds,
        });
        let now = Instant::now();
        Ok(Session {
            config,
            settings,
            live,
            adopted_epoch: 0,
            memory,
            table,
            control,
            fleet,
            steering,
            deferred_control: Vec::new(),
            planner,
            setup: Setup {
                opened_transport: if rma.is_some() {
                    TransportKind::Rma
                } else {
                    probe.kind
                },
                uring_available: !probe.uring_ops.is_empty(),
                uring_zero_copy: probe.zero_copy,
                stream_map_ok: opened.accepted & caps::STREAM_MAP != 0,
                probe,
            },
            known_zero: None,
            current_round: 0,
            round_left: 0,
            unacknowledged: VecDeque::new(),
            applied_round: None,
            active_streams: config.streams,
            pending_streams: None,
            pending_transport: None,
            pings: Pings {
                opened: now,
                // Not at once: a ping that meets the destination still setting up its
                // workers measures that, not the path; nor soon after, while round 0
                // keeps both sides busy (measured: pings at 100 ms made the confirm
                // estimate 3-7 ms where the switchover took under 1).
                next: now + PING_INTERVAL,
                on: true,
                rtt: None,
                answered: 0,
            },
            last_activity: now,
            totals: Totals::default(),
            copy_start: now,
            latest_progress: None,
            last_report: now,
            estimated_downtime: None,
            postponed_switchovers: 0,
            postponed: None,
            transport_notes: notes,
            security,
            live_notes: Vec::new(),
            losses: loss::Losses::new(
                opened.accepted & caps::STREAM_LOSS != 0,
                config.streams,
                config.stream_stall,
                peer,
                opened.session_id,
            ),
            peer,
            session_id: opened.session_id,
            granted: opened.accepted,
            device_state,
            codec: codec_for_resume,
            resumes,
            start,
            rma,
            resend: None,
            pages_resent: 0,
        })
    }

    /// Handle whatever workers and the destination have reported, then what the slow
    /// path asked for.
    fn pump(&mut self) -> Result<(), MigrationError> {
        if self.fleet.poll(self.steering.as_mut())? {
            self.last_activity = Instant::now();
        }
        for (stream, why) in self.fleet.take_lost() {
            self.stream_failed(stream, why, 0.0, true)?;
        }
        self.losses.collect_arrivals();
        while let Some(msg) = self.control.try_recv()? {
            self.last_activity = Instant::now();
            self.on_control(msg)?;
        }
        self.watch_stalls()?;
        if let Some(live) = self.live {
            for (stream, why) in live.take_replacements() {
                self.replace_on_request(stream, why)?;
            }
        }
        if self.last_activity.elapsed() > self.config.reply_timeout {
            return Err(MigrationError::Transport(format!(
                "no progress from workers or destination for {:?}",
                self.config.reply_timeout
            )));
        }
        self.tick()
    }

    /// A message from the destination while pages move.
    fn on_control(&mut self, msg: ControlMessage) -> Result<(), MigrationError> {
        match msg {
            ControlMessage::RoundApplied { round, .. } => self.round_applied(round),
            // A destination that gives the session up before it runs (cancelled while
            // its data streams were still connecting, say) refuses it instead: the same
            // end, with its reason.
            ControlMessage::Abort { message, .. } | ControlMessage::Refused { reason: message } => {
                return Err(MigrationError::Transport(format!(
                    "destination aborted: {message}"
                )));
            }
            ControlMessage::Ping { nanos } => self.control.send(&ControlMessage::Pong { nanos })?,
            ControlMessage::Pong { nanos } => self.pong(nanos),
            ControlMessage::StreamFenced {
                stream,
                rounds_ended,
                reason,
            } => self.stream_fenced(stream, rounds_ended, reason)?,
            ControlMessage::StreamBytes { received } => self.stream_bytes(received)?,
            ControlMessage::ResendPages { pages } => self.resend_pages(&pages)?,
            other => {
                return Err(
                    wire::WireError::Unexpected(format!("{other:?} from the destination")).into(),
                );
            }
        }
        Ok(())
    }

    /// The destination found these pages' RMA writes wrong: they go with the next
    /// round.
    fn resend_pages(&mut self, pages: &[u64]) -> Result<(), MigrationError> {
        let total = self.memory.pages();
        if self.rma.is_none() {
            return Err(wire::WireError::Unexpected(
                "pages to send again in a session without RMA".into(),
            )
            .into());
        }
        let set = self.resend.get_or_insert_with(|| DirtyBitmap::new(total));
        for &page in pages {
            if page >= total {
                return Err(wire::WireError::Unexpected(format!(
                    "page {page} to send again, of {total}"
                ))
                .into());
            }
            set.set(page);
        }
        self.pages_resent += pages.len() as u64;
        Ok(())
    }

    /// In a session that writes pages by RMA, wait until the destination acknowledged
    /// round `round` before the next round writes any page: its pages' frames are all
    /// checked then, so no write lands on a page whose check is still to come.
    fn rma_barrier(&mut self, round: u64) -> Result<(), MigrationError> {
        if !self.rma.as_ref().is_some_and(|pool| pool.enabled()) {
            return Ok(());
        }
        self.await_applied(round)
    }

    /// Wait until the destination acknowledged round `round`.
    fn await_applied(&mut self, round: u64) -> Result<(), MigrationError> {
        self.last_activity = Instant::now();
        while self.applied_round.is_none_or(|r| r < round) {
            self.pump()?;
            self.steer();
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    /// Whether pages can go by RMA in this session (its connections are up).
    fn rma_usable(&self) -> bool {
        self.rma.as_ref().is_some_and(|pool| pool.links() > 0)
    }

    /// The transport in force: RMA while runs go by RMA, else the workers' kind.
    fn transport_now(&self) -> TransportKind {
        if self.rma.as_ref().is_some_and(|pool| pool.enabled()) {
            TransportKind::Rma
        } else {
            self.fleet.kind()
        }
    }

    /// What went by RMA, for the report.
    fn rma_report(&self) -> Option<super::report::RmaReport> {
        let pool = self.rma.as_ref()?;
        Some(super::report::RmaReport {
            provider: pool.provider.provider.clone(),
            fabric: pool.provider.fabric.clone(),
            domain: pool.provider.domain.clone(),
            socket_based: pool.provider.is_socket_based(),
            pages: pool
                .counters
                .pages
                .load(std::sync::atomic::Ordering::Relaxed),
            writes: pool
                .counters
                .writes
                .load(std::sync::atomic::Ordering::Relaxed),
            delivery_wait_seconds: pool
                .counters
                .wait_nanos
                .load(std::sync::atomic::Ordering::Relaxed)
                as f64
                / 1e9,
            pages_resent: self.pages_resent,
        })
    }

    /// The destination has every page of round `round`: how long after the round was
    /// in the kernel is what the switchover's confirmation will take.
    fn round_applied(&mut self, round: u64) {
        self.applied_round = Some(round);
        self.losses.prune(self.applied_round);
        while let Some(&(r, sent_at)) = self.unacknowledged.front() {
            if r > round {
                break;
            }
            self.unacknowledged.pop_front();
            if r == round {
                self.planner
                    .round_acknowledged(sent_at.elapsed().as_secs_f64());
            }
        }
    }

    fn pong(&mut self, nanos: u64) {
        // Timed to its arrival, not to when this thread got to it after a scan. (A
        // round's acknowledgement keeps the time it is read: it may arrive before this
        // thread has seen the round's last byte leave, and then says nothing.)
        let at = self.control.arrived().unwrap_or_else(Instant::now);
        let now = at.duration_since(self.pings.opened).as_nanos() as u64;
        self.pings.answered = self.pings.answered.max(nanos);
        if let Some(rtt) = now.checked_sub(nanos) {
            let rtt = Duration::from_nanos(rtt);
            self.pings.rtt = Some(rtt);
            self.planner.round_trip(rtt.as_secs_f64());
        }
    }

    /// Queue `cmd` to worker `w`, pumping while its ring is full.
    fn push(&mut self, w: usize, mut cmd: TxCommand) -> Result<(), MigrationError> {
        loop {
            match self.fleet.try_push(w, cmd) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    cmd = back;
                    self.fleet.wake(w);
                    self.pump()?;
                    self.steer();
                    self.wait_for_worker();
                }
            }
        }
    }

    /// Wait a moment for a worker whose ring or backlog is full. Either holds far more
    /// than a millisecond of its work (a full ring 4096 runs, a full backlog a quarter
    /// of a second), so it is topped up in good time at that pace. Spinning instead cost
    /// this thread 0.3-0.46 s of CPU in a 2.5 s migration across the WAN emulator's
    /// cross-region path, on a host whose two cores the guest, both appliances and the
    /// emulator share. With the guest paused every microsecond is downtime: it spins.
    fn wait_for_worker(&self) {
        if self.losses.paused {
            std::thread::yield_now();
        } else {
            std::thread::sleep(WORKER_FULL_POLL);
        }
    }

    /// Put a configuration change straight onto worker `w`'s control ring, waiting
    /// while it is full.
    fn push_control(&mut self, w: usize, mut change: TxControl) -> Result<(), MigrationError> {
        loop {
            match self.fleet.try_push_control(w, change) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    change = back;
                    self.fleet.wake(w);
                    self.pump()?;
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Let codec steering act, and pass its changes to the workers. Never blocks: a
    /// change that finds a control ring full waits for the next call.
    fn steer(&mut self) {
        let mut changes = std::mem::take(&mut self.deferred_control);
        if let Some(steering) = &mut self.steering {
            changes.extend(steering.tick(
                self.fleet.telemetry(),
                self.current_round,
                self.round_left,
            ));
        }
        for (w, change) in changes {
            // A change for a worker that a transport switch has since retired.
            if w >= self.fleet.len() {
                continue;
            }
            match self.fleet.try_push_control(w, change) {
                Ok(()) => self.fleet.wake(w),
                Err(back) => self.deferred_control.push((w, back)),
            }
        }
    }

    /// Whether a change waits for the round boundary (and the round should end early).
    fn change_pending(&self) -> bool {
        self.pending_streams.is_some() || self.pending_transport.is_some()
    }

    /// Queue one run to the worker of its stream (bounded in live sessions).
    fn queue_run(
        &mut self,
        (first, count): (u64, u32),
        since_wake: &mut u32,
    ) -> Result<(), MigrationError> {
        let mut stream = self.route(first)?;
        let mut worker = self.fleet.worker_of(stream);
        if self.live.is_some() {
            while self.fleet.backlog_full(worker) {
                self.fleet.wake(worker);
                self.pump()?;
                self.steer();
                self.wait_for_worker();
                // A stream lost meanwhile no longer carries these pages.
                stream = self.route(first)?;
                worker = self.fleet.worker_of(stream);
            }
            self.fleet.pushed(worker, count);
        }
        let routes = self.losses.generation;
        let end = first + u64::from(count);
        let mut at = first;
        while at < end {
            let (part, known_zero) = self.known_zero_part(at, end);
            self.push(
                worker,
                TxCommand::Pages {
                    stream,
                    first: at,
                    count: part,
                    known_zero,
                },
            )?;
            at += u64::from(part);
        }
        if self.losses.generation != routes && self.losses.routes.lost().contains(stream) {
            // Its stream was lost while the ring was full: the worker drops the run, and
            // it was not among the pages queued when the loss settled.
            let mut again = DirtyBitmap::new(self.memory.pages());
            again.set_range(first, first + u64::from(count));
            self.losses.queue_again(again);
        }
        *since_wake += 1;
        self.round_left = self.round_left.saturating_sub(u64::from(count));
        if *since_wake >= WAKE_EVERY {
            *since_wake = 0;
            self.fleet.wake_all();
            self.pump()?;
            self.steer();
        }
        Ok(())
    }

    /// The longest run from `first` (up to `end`) whose pages all lie, or all do not,
    /// in [`Session::known_zero`]'s holes: its length, and which.
    fn known_zero_part(&mut self, first: u64, end: u64) -> (u32, bool) {
        let Some(holes) = &mut self.known_zero else {
            return ((end - first) as u32, false);
        };
        let (count, zero) = holes.part(first, end);
        (count as u32, zero)
    }

    /// The stream that carries `page` now.
    fn route(&self, page: u64) -> Result<u16, MigrationError> {
        self.losses
            .routes
            .route(page)
            .ok_or_else(|| MigrationError::Disconnected("every data stream was lost".into()))
    }

    /// Queue the pages a lost stream left (see `loss`), as runs within chunks.
    fn push_requeued(&mut self, since_wake: &mut u32) -> Result<(), MigrationError> {
        while let Some(pages) = self.losses.requeue.take() {
            let mut run: Option<(u64, u32)> = None;
            for page in pages.iter() {
                run = match run {
                    Some((first, count)) if continues((first, count), page) => {
                        Some((first, count + 1))
                    }
                    Some(done) => {
                        self.queue_run(done, since_wake)?;
                        Some((page, 1))
                    }
                    None => Some((page, 1)),
                };
            }
            if let Some(done) = run {
                self.queue_run(done, since_wake)?;
            }
        }
        Ok(())
    }

    /// Queue every page of `pages` as runs within chunks; returns how many, and, when
    /// `may_stop` and a change of streams or transport came in meanwhile, the pages
    /// left unqueued (the round then ends early, so that the change can take effect).
    fn push_pages(
        &mut self,
        pages: &DirtyBitmap,
        may_stop: bool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(u64, Option<DirtyBitmap>), MigrationError> {
        self.round_left = pages.count();
        self.losses.round_started(self.current_round, pages);
        let mut queued = 0u64;
        let mut run: Option<(u64, u32)> = None;
        let mut since_wake = 0u32;
        let mut reported = 0u64;
        let mut pages_left = pages.iter();
        for page in pages_left.by_ref() {
            if may_stop && self.change_pending() && run.is_none() {
                self.fleet.wake_all();
                return Ok((queued, Some(unqueued(pages.pages(), page, pages_left))));
            }
            queued += 1;
            run = match run {
                Some((first, count)) if continues((first, count), page) => Some((first, count + 1)),
                Some(done) => {
                    self.queue_run(done, &mut since_wake)?;
                    self.losses.queued_below(page);
                    self.push_requeued(&mut since_wake)?;
                    if queued - reported >= PROGRESS_EVERY {
                        reported = queued;
                        self.totals.round_queued = queued;
                        self.report_progress("precopy", progress);
                    }
                    if may_stop && self.change_pending() {
                        // Stop here: this page is the first left for the next round.
                        self.fleet.wake_all();
                        return Ok((queued - 1, Some(unqueued(pages.pages(), page, pages_left))));
                    }
                    Some((page, 1))
                }
                None => Some((page, 1)),
            };
        }
        if let Some(done) = run {
            self.queue_run(done, &mut since_wake)?;
        }
        self.losses.queued_below(u64::MAX);
        self.push_requeued(&mut since_wake)?;
        self.fleet.wake_all();
        Ok((queued, None))
    }

    /// Close round `round` on every worker and wait until all of it is in the kernel,
    /// reporting progress meanwhile: the workers may hold much of the round still
    /// unsent when the last of it is queued (round 0 of the demo: about half).
    fn end_round(
        &mut self,
        round: u64,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<super::fleet::RoundTotals, MigrationError> {
        self.close_round(round, false, progress)
    }

    /// Close round `round` on every worker, ending every stream after it when it is the
    /// `last` (the end markers then follow the round's own without another wake-up of
    /// the workers, inside the downtime), and wait until all of the round is in the
    /// kernel, reporting progress every [`PROGRESS_WAITING`] unless it is the `last`.
    /// Returns its totals.
    fn close_round(
        &mut self,
        round: u64,
        last: bool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<super::fleet::RoundTotals, MigrationError> {
        // Pages a lost stream left go with this round if they can; once its end is
        // queued, with the next.
        let mut since_wake = 0;
        self.push_requeued(&mut since_wake)?;
        self.losses.pushing = false;
        for w in 0..self.fleet.len() {
            self.push(w, TxCommand::EndRound { round })?;
            if last {
                self.push(w, TxCommand::Finish)?;
            }
        }
        self.fleet.wake_all();
        self.last_activity = Instant::now();
        let mut reported = Instant::now();
        loop {
            self.pump()?;
            self.steer();
            if let Some(totals) = self.fleet.take_round(round) {
                self.unacknowledged.push_back((round, Instant::now()));
                return Ok(totals);
            }
            if last {
                // The guest is paused: every microsecond here is downtime.
                std::thread::yield_now();
            } else {
                if reported.elapsed() >= PROGRESS_WAITING {
                    reported = Instant::now();
                    self.report_progress("precopy", progress);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn progress_snapshot(&mut self, phase: &'static str) -> Progress {
        let p = Progress {
            round: self.current_round,
            phase,
            bytes_sent: self.totals.bytes,
            pages_sent: self.totals.pages_sent(),
            memory_pages: self.memory.pages(),
            rounds_done: self.totals.rounds_done,
            round_pages: self.totals.round_pages,
            round_pages_queued: self.totals.round_queued,
            round_pages_sent: self.round_pages_staged(),
            dirty_rate: self.totals.dirty_rate,
            bandwidth: self.totals.bandwidth(),
            throttle: self.totals.throttle,
            elapsed: self.copy_start.elapsed(),
            streams: self.fleet.telemetry().to_vec(),
            workers: self.fleet.status(),
            connected_streams: self.config.streams,
            active_streams: self.active_streams,
            epoch: self.adopted_epoch,
            transport: self.transport_now(),
            ping_rtt: self.pings.rtt,
            estimated_downtime: self.estimated_downtime,
        };
        if self.live.is_some() {
            self.latest_progress = Some(p.clone());
        }
        p
    }

    /// Pages of the round in progress the workers have staged for the wire, from
    /// their streams' latest counters (which count every round, and lag by at most one
    /// telemetry interval) less the rounds already added up. Pages a lost stream left
    /// and another sent again count twice there: hence the cap at what was queued.
    fn round_pages_staged(&self) -> u64 {
        if self.totals.round_counted {
            return self.totals.round_queued;
        }
        let staged: u64 = self.fleet.telemetry().iter().map(|s| s.pages).sum();
        staged
            .saturating_sub(self.totals.pages)
            .min(self.totals.round_queued)
    }

    fn report_progress(&mut self, phase: &'static str, progress: &mut dyn FnMut(&Progress)) {
        let p = self.progress_snapshot(phase);
        progress(&p);
    }

    /// Keep the session's record current: round `round` is being sent.
    fn record_round(&self, round: u64) {
        let Some(path) = &self.config.session_record else {
            return;
        };
        let record = super::OutgoingRecord {
            session_id: self.session_id,
            peer: self.peer,
            memory_bytes: self.memory.len() as u64,
            streams: self.config.streams,
            round,
            guest: self.config.record_guest.clone(),
            migration_id: self.config.record_migration_id,
        };
        if let Err(e) = record.write(path) {
            eprintln!("dwcp: {e}; this session cannot be resumed after a restart");
        }
    }

    /// Send round `round` (`pages`) and close it; then the changes that wait for a
    /// round boundary. Returns the pages queued, those a change left for the next
    /// round, and the round's totals.
    fn send_round(
        &mut self,
        round: u64,
        pages: &DirtyBitmap,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(u64, Option<DirtyBitmap>, super::fleet::RoundTotals), MigrationError> {
        let (sent, unsent) = self.push_pages(pages, true, progress)?;
        self.totals.round_queued = sent;
        let round_totals = self.end_round(round, progress)?;
        self.rma_barrier(round)?;
        // A round trip measured as the next round starts, when little is in flight,
        // is what the switchover's confirmation will see; its answer arrives during
        // that round, in time for the decision after it.
        self.ping(Instant::now())?;
        if let Some(kind) = self.pending_transport.take() {
            self.switch_transport(kind, round)?;
        }
        if let Some(active) = self.pending_streams.take() {
            self.switch_streams(active, round)?;
        }
        if self.losses.restorable() {
            self.restore_streams(round)?;
        }
        Ok((sent, unsent, round_totals))
    }

    fn run(
        &mut self,
        guest: &dyn GuestControl,
        dirty_log: &mut dyn DirtyLog,
        start: Instant,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationReport, MigrationError> {
        let pages = self.memory.pages();
        self.planner
            .set_collect_reads_memory(dirty_log.scan_stats().is_some());
        self.planner
            .set_resumes_at_destination(guest.device_state().is_some());
        if !guest.can_throttle() {
            self.planner.set_guest_unthrottleable();
        }
        let mut rounds: Vec<RoundStats> = Vec::new();
        let (mut round, mut dirty) = match self.start.take() {
            // Resumed after a restart: the dirty log has tracked writes since before
            // the table was read back, so it goes on as it is.
            Some(start) => start,
            None => {
                // Round 0 sends everything: writes made before it (during setup) are
                // covered, so start the first interval now.
                dirty_log.restart(pages)?;
                // After the restart: a hole looked up from now on reads as zeros from
                // then on, or the write that fills it is in the log.
                self.known_zero = self.memory.hole_cursor();
                (0, DirtyBitmap::full(pages))
            }
        };
        self.copy_start = Instant::now();
        if let Some(steering) = &mut self.steering {
            steering.start();
        }
        let setup_seconds = start.elapsed().as_secs_f64();
        let mut last_collect = Instant::now();
        let mut recent_dirty = DirtyRate::default();
        let (final_set, plan) = loop {
            let mut round_start = Instant::now();
            self.current_round = round;
            self.record_round(round);
            self.totals.round_pages = dirty.count();
            let (sent, unsent, round_totals) = loop {
                self.totals.start_round();
                match self.send_round(round, &dirty, progress) {
                    Ok(done) => break done,
                    Err(e) => {
                        // Every connection lost: resume the session, and send what
                        // the destination lacks of this round and before.
                        dirty = self.resume_session(round, &dirty, e)?;
                        self.totals.round_pages = dirty.count();
                        round_start = Instant::now();
                    }
                }
            };
            // Holes found in round 0 say nothing of the pages later rounds send.
            if let Some(holes) = self.known_zero.take()
                && holes.holes_found() > 0
            {
                self.live_notes.push(format!(
                    "round 0: {} of {pages} pages lay in the memory file's holes and went \
                     as zeros unread (its extents looked up in {:.1} ms along the way)",
                    holes.holes_found(),
                    holes.walk_time().as_secs_f64() * 1e3
                ));
            }
            let seconds = round_start.elapsed().as_secs_f64();
            self.totals.add_round(sent, round_totals.bytes, seconds);
            // What the guest wrote while this round went out, and what a round ended
            // early for a change of streams left unsent.
            let mut next = DirtyBitmap::new(pages);
            // A few walks timed as the paused collection runs (it protects nothing
            // again), once the rounds are the guest's dirty pages. Before this round's
            // collection, as the paused one comes after a round: one walked right
            // after another measured half of what the paused walk then took.
            if round > 0
                && self.planner.paused_walks() < PAUSED_WALKS_TIMED
                && let Some(walk) = dirty_log.time_paused_walk()
            {
                self.planner.paused_walk_timed(walk);
            }
            let collect_start = Instant::now();
            dirty_log.collect(&mut next)?;
            // A scan of all memory costs at the switchover what its busiest thread
            // spent on the CPU now (the guest takes no CPU from it then).
            let collect_seconds = match dirty_log.scan_stats() {
                Some(scan) => scan.last_busy_seconds,
                None => collect_start.elapsed().as_secs_f64(),
            };
            let interval = last_collect.elapsed().as_secs_f64();
            last_collect = Instant::now();
            self.totals.dirty_rate = next.count() as f64 * PAGE_SIZE as f64 / interval.max(1e-6);
            // Not round 0's: it spans all of memory's transfer, and counts each page of
            // a small working set once however often it was written.
            if round > 0 {
                recent_dirty.push(next.count(), interval);
            }
            let ended_early = unsent.is_some();
            if let Some(unsent) = unsent {
                next.union_with(&unsent);
            }
            if let Some(carried) = self.losses.carry.take() {
                next.union_with(&carried);
            }
            if let Some(resend) = self.resend.take() {
                next.union_with(&resend);
            }
            let dirtied = next.count();
            let plan = self.planner.round_done(RoundMeasurement {
                round,
                pages: sent,
                zero_pages: round_totals.zero_pages,
                bytes: round_totals.bytes,
                send_seconds: seconds,
                dirtied_pages: dirtied,
                collect_seconds,
                ended_early,
                elapsed: self.copy_start.elapsed().as_secs_f64(),
            });
            self.estimated_downtime = Some(Duration::from_secs_f64(plan.estimate.total));
            rounds.push(RoundStats {
                round,
                pages: sent,
                zero_pages: round_totals.zero_pages,
                bytes: round_totals.bytes,
                seconds,
                throughput: round_totals.bytes as f64 / seconds.max(1e-9),
                dirtied_pages: dirtied,
                dirty_rate: self.totals.dirty_rate,
                estimated_downtime: plan.estimate.total,
                throttle: self.totals.throttle,
            });
            self.report_progress("precopy", progress);
            match &plan.decision {
                Decision::SwitchOver => {
                    // The guest pauses only once this round is acknowledged. Every
                    // connection lost while waiting is still pre-copy: the session is
                    // resumed, and the round goes on with what the destination lacks
                    // and what the guest wrote meanwhile.
                    self.report_progress("settle", progress);
                    let settle_start = Instant::now();
                    match self.settle_before_pause(&mut next, round) {
                        Ok(quiet_rtt) => {
                            // Estimated again as the guest pauses: the confirm part
                            // from the quiet round trip just measured, and the final
                            // round also holding what the guest wrote, at its recent
                            // rate, while the last round settled.
                            let settled = settle_start.elapsed().as_secs_f64();
                            let written = recent_dirty.pages_per_second() * settled;
                            let mut plan = plan;
                            plan.estimate = self.planner.estimate_at_pause(
                                plan.estimate.pages + written.round() as u64,
                                quiet_rtt,
                            );
                            self.estimated_downtime =
                                Some(Duration::from_secs_f64(plan.estimate.total));
                            let limit = self.planner.downtime_limit();
                            if plan.estimate.total <= limit.as_secs_f64()
                                || self.postponed_switchovers >= MAX_POSTPONED_SWITCHOVERS
                            {
                                if let Some(postponed) = &self.postponed {
                                    plan.why.push_str(&format!("; {postponed}"));
                                }
                                break (next, plan);
                            }
                            // The path slowed, or the guest wrote much while the round
                            // settled: pausing now would overrun the limit. Another
                            // round instead, and the planner decides again (a few
                            // times: on a path that stays slow the decision stands).
                            let count = self.postponed_switchovers + 1;
                            self.postponed_switchovers = count;
                            self.postponed = Some(format!(
                                "switchover postponed {count}× (the last: round {round} settled in {:.0} ms with a round trip of {:.1} ms; the estimate rose to {:.1} ms, over the {:.0} ms limit)",
                                settled * 1e3,
                                quiet_rtt * 1e3,
                                plan.estimate.total * 1e3,
                                limit.as_secs_f64() * 1e3
                            ));
                        }
                        Err(e) => {
                            let missing = self.resume_session(round, &dirty, e)?;
                            next.union_with(&missing);
                            dirty = next;
                            continue;
                        }
                    }
                }
                Decision::Abort { reason } => {
                    return Err(MigrationError::Aborted {
                        reason: reason.clone(),
                        rounds: round + 1,
                    });
                }
                Decision::Continue { throttle } => {
                    if let Some(t) = *throttle {
                        self.totals.throttle = t;
                        self.totals.max_throttle = self.totals.max_throttle.max(t);
                        guest.set_throttle(t);
                    }
                }
            }
            dirty = next;
            round += 1;
        };
        let outcome = self.switchover(guest, dirty_log, final_set, round + 1, progress)?;
        let total_seconds = outcome
            .verdict_at
            .duration_since(self.copy_start)
            .as_secs_f64();
        rounds.push(outcome.round.clone());
        let zc = self.fleet.zero_copy();
        let measured = outcome.measured;
        Ok(MigrationReport {
            memory_bytes: self.memory.len() as u64,
            pages,
            zero_pages_skipped: rounds.iter().map(|r| r.zero_pages).sum(),
            bytes_sent: self.totals.bytes,
            total_seconds,
            throughput: self.totals.bytes as f64 / total_seconds,
            estimated_downtime: plan.estimate.total,
            measured_downtime: measured.total,
            final_round_seconds: measured.collect + measured.send,
            verify_seconds: measured.confirm + measured.verify,
            downtime_limit: self.planner.downtime_limit().as_secs_f64(),
            downtime: super::report::DowntimeReport {
                limit: self.planner.downtime_limit().as_secs_f64(),
                estimated: plan.estimate,
                measured,
            },
            switchover_reason: plan.why,
            verify: self.config.verify.to_string(),
            verified_pages: outcome.verified_pages,
            digest: outcome.digest,
            audit: outcome.audit,
            dirty_log: dirty_log.kind().to_string(),
            dirty_scan: dirty_log.scan_stats(),
            transport: TransportReport {
                kind: self.setup.probe.kind.to_string(),
                zero_copy: self.setup.probe.zero_copy,
                zero_copy_copied: zc.copied,
                zero_copy_sends: zc.sends,
                streams: self.config.streams,
                workers: self.fleet.len(),
                congestion: self.config.transport.socket.congestion.to_string(),
                uring_ops: self
                    .setup
                    .probe
                    .uring_ops
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                notes: self
                    .setup
                    .probe
                    .notes
                    .iter()
                    .chain(&self.transport_notes)
                    .cloned()
                    .chain(zc.fell_back.then(|| {
                        "zero-copy: the kernel copied every probed send (loopback or veth), so sends fell back to copies"
                            .to_string()
                    }))
                    .collect(),
                security: self.security.clone(),
                streams_lost: std::mem::take(&mut self.losses.report),
                rma: self.rma_report(),
            },
            device_state_bytes: outcome.device_state_bytes,
            max_throttle: self.totals.max_throttle,
            setup_seconds,
            simd: dwcp_simd::Kernels::active().level().to_string(),
            notes: std::mem::take(&mut self.live_notes),
            codec: self.steering.take().map(Steering::finish),
            resumes: std::mem::take(&mut self.resumes),
            rounds,
        })
    }

    /// The destination's abort message, if one arrives within `wait`.
    fn destination_abort(&mut self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.control.recv_timeout(left) {
                Ok(Some(ControlMessage::Abort { message, .. })) => return Some(message),
                Ok(Some(_)) if !left.is_zero() => {}
                _ => return None,
            }
        }
    }

    /// Tell the destination and stop every stream (best effort: the session is over).
    fn abort(&mut self, error: &MigrationError) {
        let reason = match error {
            MigrationError::Aborted { .. } => wire::AbortReason::NotConverging,
            MigrationError::Protocol(_) => wire::AbortReason::ProtocolError,
            MigrationError::Verification { .. } | MigrationError::DigestMismatch { .. } => {
                wire::AbortReason::VerificationFailed
            }
            _ => wire::AbortReason::LocalError,
        };
        self.control.send_best_effort(&ControlMessage::Abort {
            reason,
            message: error.to_string(),
        });
        // Closed at once, the control stream could reset before the destination read
        // why (its reports left unread here), and a destination that does not hear it
        // keeps the session for a resume. End the writing side and give it a moment to
        // read and close its own.
        self.control.finish_writing();
        let deadline = Instant::now() + ABORT_LINGER;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if self.control.recv_timeout(left).is_err() {
                break;
            }
        }
        self.fleet.shutdown_sockets();
    }

    fn close(&mut self) {
        // Release: pairs with the Acquire of replacements still connecting.
        self.losses
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.fleet.close();
        self.control.shutdown();
    }
}
