//! The destination side: accept a session, place pages (each recorded in the
//! destination's CRC table), acknowledge rounds, answer the switchover.

use super::fleet::RxFleet;
use super::gate::{Acceptor, Port};
use super::handshake::{self, ControlLink};
use super::lanes::Lane;
use super::record::SessionRecord;
use super::report::SecurityReport;
use super::resume;
use super::{MigrationError, differing_pages, page_crcs, test_skip_final_round};
use crate::crc_table::CrcTable;
use crate::guest::DeviceStateSink;
use crate::memory::GuestMemory;
use crate::security::{self, Identity, SessionKeys};
use crate::transport::{
    self, RxError, RxEvent, RxSetup, StreamFence, TransportConfig, TransportKind, socket,
};
use crate::wire::{
    AbortReason, ControlMessage, MAX_DEVICE_STATE, STREAM_HELLO_LEN, StreamHello, WireError, caps,
};
use dwcp_hugepages::PagePreference;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the destination runs a session.
#[derive(Debug, Clone, PartialEq)]
pub struct DestConfig {
    /// Transport settings.
    pub transport: TransportConfig,
    /// io_uring worker threads (0: one per CPU, at most one per stream).
    pub workers: usize,
    /// Longest wait for the source to connect and finish the handshake, and the
    /// longest silence tolerated mid-session.
    pub timeout: Duration,
    /// How long a new connection has to say what it is (a session's hello or a data
    /// stream's), and a session to open its data streams after the welcome. Anyone
    /// can connect to the port: one who says nothing is closed after this, without
    /// holding up anyone else.
    pub handshake_timeout: Duration,
    /// Largest guest memory this destination allocates for a source (`None`: what
    /// the host has available).
    pub max_memory: Option<u64>,
    /// Capabilities this destination grants ([`caps`]; those the source lacks are
    /// dropped too). Leaving out the codec ones keeps codec frames off this host.
    pub capabilities: u64,
    /// This appliance's identity: only authenticated sessions (TLS 1.3, mutual) are
    /// taken, and their data streams must be bound and sealed. `None`: only plain
    /// sessions (`--insecure`).
    pub security: Option<Arc<Identity>>,
    /// When every connection of a session is lost before its switchover, keep its
    /// memory and table this long for the source to resume it; then give it up and
    /// release the memory (zero: give it up at once).
    pub resume_grace: Duration,
    /// Where to keep the record of a session received into a memory file
    /// ([`DestMemory::File`], or [`DestMemory::Provided`] memory that is a file), for
    /// resuming it after a restart: written once the session is welcomed, removed when
    /// it ends.
    pub session_record: Option<std::path::PathBuf>,
    /// What the memory belongs to, kept in the session's record for the appliance
    /// ([`SessionRecord::guest`]).
    pub record_guest: Option<String>,
    /// Which sessions may write pages by RMA into this destination's memory.
    pub rma: super::RmaAdmission,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig {
            transport: TransportConfig::default(),
            workers: 0,
            timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            max_memory: None,
            capabilities: caps::ALL,
            security: None,
            resume_grace: Duration::from_secs(60),
            session_record: None,
            record_guest: None,
            rma: super::RmaAdmission::default(),
        }
    }
}

/// Where received pages go.
pub enum DestMemory {
    /// This memory; the handshake must announce exactly its size. Memory in a file
    /// (an incoming VM's RAM) is recorded for a resume after a restart, as for
    /// [`DestMemory::File`].
    Provided(Arc<GuestMemory>),
    /// Allocate memory of the announced size (refused if it exceeds available RAM).
    Allocate(PagePreference),
    /// A file (on /dev/shm or hugetlbfs) created at the announced size. With
    /// [`DestConfig::session_record`], a destination that restarts can resume the
    /// session from it ([`DestMemory::Resume`]).
    File(std::path::PathBuf),
    /// Resume the session `record` describes, after this appliance restarted: its
    /// memory file is read back into a CRC table (a full read), then the session waits
    /// up to `resume_grace` for its source to resume it.
    Resume(SessionRecord),
}

/// The destination's account of a session.
#[derive(Debug)]
pub struct DestReport {
    /// The memory now holding the migrated guest.
    pub memory: Arc<GuestMemory>,
    /// Pages verified: covered by the table digest, or compared one by one (`full`).
    pub verified_pages: u64,
    /// The digest both sides agree on (hex): of the CRC tables, or of all of memory.
    pub digest: String,
    /// What this side holds, page by page (the CRC of every page placed).
    pub table: Arc<CrcTable>,
    /// Rounds received, the final one included.
    pub rounds: u64,
    /// Bytes received on data streams.
    pub bytes: u64,
    /// Device state loaded after the verdict (0 for guests without).
    pub device_state_bytes: u64,
    /// Transport used.
    pub transport: TransportKind,
    /// How the session was secured (`None`: plain).
    pub security: Option<SecurityReport>,
    /// Data streams lost on the way, with why (the session carried on without them).
    pub streams_lost: Vec<(u16, String)>,
    /// Times every connection was lost and the source resumed the session.
    pub resumes: u32,
    /// After a restart: reading the memory file back into a CRC table, seconds.
    pub table_rebuild_seconds: Option<f64>,
    /// The libfabric provider pages were written through, in a session that wrote
    /// them by RMA.
    pub rma_provider: Option<String>,
    /// Pages whose RMA write arrived wrong, asked for again.
    pub rma_pages_resent: u64,
}

/// What an incoming session has done so far, for whoever watches it (a daemon's
/// `migrations`). Only the session's coordinator writes it, at most every
/// [`PROGRESS_INTERVAL`] and at each change of phase; workers never touch it.
#[derive(Debug, Default)]
pub struct ReceiveProgress {
    state: Mutex<IncomingProgress>,
}

/// How often the coordinator refreshes [`ReceiveProgress`] while pages move.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// A snapshot of [`ReceiveProgress`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IncomingProgress {
    /// Who connected (the source appliance, once the phase is past `handshake`).
    pub peer: Option<SocketAddr>,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Data streams.
    pub streams: u16,
    /// `handshake`, `precopy`, `switchover` (the source paused its guest), `verify`,
    /// `device-state` (loading it into the VM), then `done`.
    pub phase: &'static str,
    /// The round being received (the rounds every stream finished so far).
    pub round: u64,
    /// Pages received, however they came (content, zero marker, delta, reference).
    pub pages: u64,
    /// Bytes received on data streams.
    pub bytes: u64,
    /// How the session is secured (`None` while it opens, or when it is plain).
    pub security: Option<SecurityReport>,
    /// Whether the session is open (its security, if any, is known).
    pub opened: bool,
}

impl ReceiveProgress {
    /// The latest state.
    pub fn snapshot(&self) -> IncomingProgress {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, change: impl FnOnce(&mut IncomingProgress)) {
        if let Ok(mut s) = self.state.lock() {
            change(&mut s);
        }
    }
}

/// Receive one migration on `listener`.
pub fn receive(
    listener: &TcpListener,
    memory: DestMemory,
    config: &DestConfig,
) -> Result<DestReport, MigrationError> {
    receive_cancellable(listener, memory, config, &AtomicBool::new(false))
}

/// [`receive`], giving up once `cancel` is set: the source is told (it resumes its
/// guest, intact) and the call returns [`MigrationError::Aborted`]. Checked between
/// batches of events while pages move, so it takes effect within milliseconds.
pub fn receive_cancellable(
    listener: &TcpListener,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
) -> Result<DestReport, MigrationError> {
    receive_guest(listener, memory, config, cancel, None)
}

/// [`receive_cancellable`] for a guest with device state when `device` is given: the
/// session must come from a source whose guest has one (else it is refused, and a
/// source with device state is refused without `device`); after the verdict the device
/// state goes into `device`, and the source hears that the guest runs once
/// [`DeviceStateSink::finish`] returns.
pub fn receive_guest(
    listener: &TcpListener,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
    device: Option<&mut dyn DeviceStateSink>,
) -> Result<DestReport, MigrationError> {
    receive_watched(
        listener,
        memory,
        config,
        cancel,
        device,
        &ReceiveProgress::default(),
    )
}

/// [`receive_guest`], keeping `progress` current for an observer.
pub fn receive_watched(
    listener: &TcpListener,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
    device: Option<&mut dyn DeviceStateSink>,
    progress: &ReceiveProgress,
) -> Result<DestReport, MigrationError> {
    receive_through(
        &mut Acceptor::new(listener),
        memory,
        config,
        cancel,
        device,
        progress,
    )
}

/// [`receive_watched`] through a gate kept across sessions (a daemon's): connections
/// it sorted while this session ran wait there for the next one.
pub fn receive_through(
    gate: &mut Acceptor<'_>,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
    device: Option<&mut dyn DeviceStateSink>,
    progress: &ReceiveProgress,
) -> Result<DestReport, MigrationError> {
    receive_via(gate, memory, config, cancel, device, progress)
}

/// [`receive_watched`] on a lane of a dispatcher that receives several sessions at
/// once ([`super::SessionPorts`]): the session the lane's connection opens, or, when
/// that connection is a source's resume of another session here, nothing
/// ([`MigrationError::PassedOn`]).
pub fn receive_lane(
    lane: &mut Lane,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
    progress: &ReceiveProgress,
) -> Result<DestReport, MigrationError> {
    receive_via(lane, memory, config, cancel, None, progress)
}

fn receive_via(
    gate: &mut dyn Port,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
    device: Option<&mut dyn DeviceStateSink>,
    progress: &ReceiveProgress,
) -> Result<DestReport, MigrationError> {
    progress.update(|p| p.phase = "handshake");
    let mut config = config.clone();
    if device.is_some() {
        config.capabilities |= caps::DEVICE_STATE;
    } else {
        config.capabilities &= !caps::DEVICE_STATE;
    }
    let config = &config;
    // Memory that outlives this process (a file created for the session, or one
    // provided: an incoming VM's RAM) can be resumed after a restart.
    let record_file = match &memory {
        DestMemory::File(path) => Some(path.clone()),
        DestMemory::Provided(memory) => memory.file_path().map(Path::to_path_buf),
        _ => None,
    };
    let (accepted, first_round, table, table_rebuild_seconds) = match memory {
        DestMemory::Resume(record) => resume_after_restart(gate, record, config, cancel, progress)?,
        memory => {
            let accepted = handshake::accept(gate, memory, config, cancel, &mut |peer| {
                progress.update(|p| p.peer = Some(peer))
            })?;
            let table = Arc::new(CrcTable::new(accepted.memory.pages()));
            (accepted, 0, table, None)
        }
    };
    // The record of a session in a memory file, for resuming it after a restart.
    let record_path = match (&config.session_record, record_file) {
        (Some(path), Some(memory_file)) => {
            let record = SessionRecord {
                session_id: accepted.session_id,
                memory_file,
                memory_bytes: accepted.memory.len() as u64,
                streams: accepted.streams.len() as u16,
                granted: accepted.granted,
                peer: accepted.control.security().map(|s| s.peer),
                guest: config.record_guest.clone(),
            };
            if let Err(e) = record.write(path) {
                eprintln!("dwcp: {e}; this session cannot be resumed after a restart");
            }
            Some(path.clone())
        }
        // A session resumed after a restart: its record stays until the session ends.
        (Some(path), None) if table_rebuild_seconds.is_some() => Some(path.clone()),
        _ => None,
    };
    let result = receive_session(
        gate,
        accepted,
        first_round,
        table,
        config,
        cancel,
        device,
        progress,
    );
    if let Some(path) = record_path {
        super::record::remove(&path);
    }
    result.map(|mut report| {
        report.table_rebuild_seconds = table_rebuild_seconds;
        report
    })
}

/// A restarted destination's session: rebuild the table from the memory file, wait for
/// the source's resume, answer the table comparison.
fn resume_after_restart(
    gate: &mut dyn Port,
    record: SessionRecord,
    config: &DestConfig,
    cancel: &AtomicBool,
    progress: &ReceiveProgress,
) -> Result<(handshake::Accepted, u64, Arc<CrcTable>, Option<f64>), MigrationError> {
    // Its source's resume and data streams come to it from now on.
    gate.expect_session(record.session_id)?;
    let memory = GuestMemory::open_file(&record.memory_file).map_err(|e| {
        MigrationError::Config(format!(
            "resuming session {:032x}: memory file: {e}",
            record.session_id
        ))
    })?;
    if memory.len() as u64 != record.memory_bytes {
        return Err(MigrationError::Config(format!(
            "resuming session {:032x}: {} holds {} bytes, the session {}",
            record.session_id,
            record.memory_file.display(),
            memory.len(),
            record.memory_bytes
        )));
    }
    let memory = Arc::new(memory);
    progress.update(|p| {
        p.phase = "rebuilding";
        p.memory_bytes = memory.len() as u64;
    });
    let started = Instant::now();
    let table = Arc::new(CrcTable::from_memory(
        &memory,
        crate::crc_table::scan_threads(),
    ));
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "dwcp: session {:032x}: CRC table rebuilt from {} in {seconds:.2} s ({:.2} GB/s); \
         waiting up to {} s for the source to resume it",
        record.session_id,
        record.memory_file.display(),
        memory.len() as f64 / seconds.max(1e-9) / 1e9,
        config.resume_grace.as_secs()
    );
    progress.update(|p| p.phase = "interrupted");
    let session = handshake::Resumable {
        session_id: record.session_id,
        memory,
        streams: record.streams,
        granted: record.granted,
        peer: record.peer.clone(),
    };
    let waiting = Waiting {
        session: &session,
        table: &table,
        deadline: Instant::now() + config.resume_grace,
        rounds_done: 0,
    };
    let (accepted, round, differing) = waiting.wait(gate, config, cancel, progress, || {
        MigrationError::Transport(format!(
            "the source did not resume session {:032x} within resume_grace ({} s) of this \
             destination's restart",
            record.session_id,
            config.resume_grace.as_secs()
        ))
    })?;
    eprintln!(
        "dwcp: session resumed from round {round} after a restart ({differing} table chunks \
         differed)"
    );
    Ok((accepted, round, table, Some(seconds)))
}

/// A session kept for its source to resume (after its connections died, or after this
/// appliance restarted).
struct Waiting<'a> {
    session: &'a handshake::Resumable,
    /// What this side holds, for the comparison.
    table: &'a CrcTable,
    deadline: Instant,
    /// Rounds acknowledged so far (for the error if cancelled).
    rounds_done: u64,
}

impl Waiting<'_> {
    /// Wait in `gate` until the deadline for the source's resume, and answer its table
    /// comparison. Other connections, and resumes that fail half-way, are logged and
    /// waited past; `expired` is the error once the deadline has passed. Returns the
    /// resumed session, the round it sends first and the chunks that differed.
    fn wait(
        &self,
        gate: &mut dyn Port,
        config: &DestConfig,
        cancel: &AtomicBool,
        progress: &ReceiveProgress,
        expired: impl Fn() -> MigrationError,
    ) -> Result<(handshake::Accepted, u64, u64), MigrationError> {
        loop {
            // Acquire: pairs with the Release store of whoever cancels.
            if cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Aborted {
                    reason: "cancelled at the destination".into(),
                    rounds: self.rounds_done,
                });
            }
            if Instant::now() >= self.deadline {
                return Err(expired());
            }
            let mut accepted = match handshake::accept_resume(
                gate,
                self.session,
                config,
                cancel,
                &mut |peer| progress.update(|p| p.peer = Some(peer)),
                self.deadline,
            ) {
                Ok(a) => a,
                Err(e @ MigrationError::Aborted { .. }) => return Err(e),
                Err(e) => {
                    // Someone else, or a resume that failed half-way: keep waiting.
                    if Instant::now() < self.deadline {
                        eprintln!("dwcp: while waiting for the resume: {e}");
                    }
                    continue;
                }
            };
            match resume::answer_as_destination(&mut accepted.control, self.table) {
                Ok((round, differing)) => return Ok((accepted, round, differing)),
                Err(e) if resume::may_resume(&e, self.session.granted) => {
                    eprintln!("dwcp: the resume failed while comparing tables: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Receive the session `accepted` opened (or resumed, from round `first_round`, with
/// `table` as rebuilt).
#[allow(clippy::too_many_arguments)]
fn receive_session(
    gate: &mut dyn Port,
    accepted: handshake::Accepted,
    first_round: u64,
    table: Arc<CrcTable>,
    config: &DestConfig,
    cancel: &AtomicBool,
    mut device: Option<&mut dyn DeviceStateSink>,
    progress: &ReceiveProgress,
) -> Result<DestReport, MigrationError> {
    let mut accepted = accepted;
    let streams = accepted.streams.len() as u16;
    let rma = if accepted.granted & caps::RMA != 0 {
        super::rma::offer(
            &mut accepted.control,
            &accepted.memory,
            streams,
            config.timeout,
            cancel,
        )?
    } else {
        None
    };
    let memory = accepted.memory;
    progress.update(|p| {
        p.memory_bytes = memory.len() as u64;
        p.streams = streams;
        p.phase = "precopy";
    });
    let probe = transport::probe(&config.transport);
    let fence = Arc::new(StreamFence::default());
    let setup = RxSetup {
        fence: fence.clone(),
        first_round,
        total_streams: streams,
        memory: memory.clone(),
        memory_is_fresh: accepted.fresh,
        holes: accepted.holes.clone(),
        capabilities: accepted.granted,
        table: table.clone(),
        records: accepted.keys.clone(),
    };
    let security = accepted.control.security();
    progress.update(|p| {
        p.security = security.clone();
        p.opened = true;
    });
    let mut fleet = RxFleet::spawn(
        probe.kind,
        accepted.streams,
        &setup,
        &config.transport,
        config.workers,
    )?;
    let control = match ControlLink::new(accepted.control, &config.transport.socket) {
        Ok(c) => c,
        Err(e) => {
            fleet.stop();
            return Err(e);
        }
    };
    // One session at a time: whoever comes meanwhile hears so at once, instead of
    // waiting in the listen queue for this session to end.
    let busy = format!(
        "{} this destination is receiving a migration (from {}) and takes one at a time; \
         try again once it has finished",
        super::BUSY,
        progress
            .snapshot()
            .peer
            .map_or("another source".into(), |p| p.to_string())
    );
    let replacements = Replacements {
        session_id: accepted.session_id,
        keys: accepted.keys.clone(),
        setup: setup.clone(),
        kind: probe.kind,
        transport: config.transport.clone(),
        generations: vec![0; usize::from(streams)],
        spare: Vec::new(),
        restoring: Vec::new(),
    };
    let mut coordinator = Coordinator {
        streams,
        control,
        memory,
        table,
        round_pages: Vec::new(),
        rounds_applied: first_round,
        stream_rounds: vec![first_round; usize::from(streams)],
        stream_state: vec![StreamState::Open; usize::from(streams)],
        fence,
        loss_allowed: accepted.granted & caps::STREAM_LOSS != 0,
        streams_lost: Vec::new(),
        replacements,
        wire_received: vec![0; usize::from(streams)],
        bytes_reported_at: Instant::now(),
        final_round: None,
        source_crcs: Vec::new(),
        expect: None,
        ours: None,
        timeout: config.timeout,
        last_activity: Instant::now(),
        device_state: accepted.granted & caps::DEVICE_STATE != 0,
        device_chunks: std::collections::BTreeMap::new(),
        device_bytes: 0,
        device_end: None,
        received: vec![(0, 0); usize::from(streams)],
        progress,
        progress_at: Instant::now(),
        gate,
        busy,
        handshake_timeout: config.handshake_timeout,
        granted: accepted.granted,
        peer_identity: security.as_ref().map(|s| s.peer.clone()),
        bytes_before_resume: 0,
        resumes: 0,
        rma_provider: rma.as_ref().map(|t| t.provider.provider.clone()),
        rma,
        rma_pages_resent: 0,
    };
    let mut result = loop {
        match coordinator.run(&mut fleet, cancel) {
            Err(e)
                if coordinator.final_round.is_none()
                    && resume::may_resume(&e, accepted.granted)
                    && !config.resume_grace.is_zero() =>
            {
                // A source that aborted closes everything right after saying why; a
                // failed read or write here may come before its message is handled.
                if let Some(message) = coordinator.source_abort() {
                    break Err(coordinator.aborted(format!("source aborted: {message}")));
                }
                if let Err(e) = coordinator.await_resume(&mut fleet, e, config, cancel) {
                    break Err(e);
                }
            }
            done => break done,
        }
    };
    // Nothing may write into guest memory once the session is decided.
    coordinator.rma = None;
    if let Err(MigrationError::Io { .. } | MigrationError::Transport(_)) = &result
        && let Some(message) = coordinator.source_abort()
    {
        // Our write failed because the source had gone: its reason is the real one.
        result = Err(coordinator.aborted(format!("source aborted: {message}")));
    }
    let mut device_state_bytes = 0;
    if let (Ok(_), Some(sink)) = (&result, device.as_mut()) {
        progress.update(|p| p.phase = "device-state");
        match coordinator.load_device_state(&mut **sink, cancel) {
            Ok(bytes) => device_state_bytes = bytes,
            Err(e) => result = Err(e),
        }
    }
    if let Err(e) = &result {
        let reason = match e {
            MigrationError::Protocol(_) => AbortReason::ProtocolError,
            MigrationError::Verification { .. } | MigrationError::DigestMismatch { .. } => {
                AbortReason::VerificationFailed
            }
            _ => AbortReason::LocalError,
        };
        coordinator
            .control
            .send_best_effort(&ControlMessage::Abort {
                reason,
                message: e.to_string(),
            });
    }
    fleet.stop();
    coordinator.control.shutdown();
    coordinator.publish_progress();
    progress.update(|p| p.phase = "done");
    let (verified_pages, digest, rounds) = result?;
    Ok(DestReport {
        memory: coordinator.memory.clone(),
        verified_pages,
        digest,
        table: coordinator.table.clone(),
        rounds,
        bytes: coordinator.received_bytes(),
        device_state_bytes,
        transport: probe.kind,
        security,
        streams_lost: coordinator.streams_lost.clone(),
        resumes: coordinator.resumes,
        table_rebuild_seconds: None,
        rma_provider: coordinator.rma_provider.clone(),
        rma_pages_resent: coordinator.rma_pages_resent,
    })
}

/// What a destination needs to take a replacement for a lost stream.
struct Replacements {
    session_id: u128,
    /// The session's keys (a replacement's generation keys are added to them).
    keys: Option<Arc<SessionKeys>>,
    setup: RxSetup,
    kind: TransportKind,
    transport: TransportConfig,
    /// Per stream, the generation of the connection carrying it.
    generations: Vec<u16>,
    /// Replacement connections that arrived, bound, before the source restored them.
    spare: Vec<(u16, u16, TcpStream, Option<Arc<SessionKeys>>)>,
    /// Streams the source restored, waiting for their connections.
    restoring: Vec<Restoring>,
}

/// A stream the source restored, waiting for its connection.
#[derive(Clone, Copy)]
struct Restoring {
    stream: u16,
    generation: u16,
    /// The round whose end marker it sends first.
    first_round: u64,
    since: Instant,
}

/// Nothing from the source this long (it pings every 250 ms), with a new control
/// connection at the gate, is taken for a source that lost its connections.
const SOURCE_SILENT_AFTER: Duration = Duration::from_secs(3);

/// How often the destination reports each stream's delivered bytes.
const STREAM_BYTES_INTERVAL: Duration = Duration::from_millis(250);

/// Where a data stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// Carrying pages.
    Open,
    /// Its end marker arrived.
    Ended,
    /// Stopped early; its pages go to the others.
    Lost,
}

/// What the source asked the destination to confirm.
enum Expect {
    /// That its table digest equals this.
    Table { pages: u64, digest: u64 },
    /// That its memory matches the page CRCs received, whose combination is this.
    Full { pages: u64, digest: u32 },
}

struct Coordinator<'p> {
    streams: u16,
    control: ControlLink,
    memory: Arc<GuestMemory>,
    table: Arc<CrcTable>,
    /// Pages each round carried, all streams together, by round.
    round_pages: Vec<u64>,
    /// Rounds every stream still open has delivered (acknowledged to the source).
    rounds_applied: u64,
    /// Per stream, the rounds whose end marker it delivered.
    stream_rounds: Vec<u64>,
    stream_state: Vec<StreamState>,
    /// Stops streams the source gives up; its lost set routes their pages elsewhere.
    fence: Arc<StreamFence>,
    /// The source may lose streams and carry on ([`caps::STREAM_LOSS`]).
    loss_allowed: bool,
    /// Streams lost, with why.
    streams_lost: Vec<(u16, String)>,
    /// Connections that replace lost streams.
    replacements: Replacements,
    /// Per stream, bytes read off its current connection (what the source counts as
    /// sent), and when they were last reported to the source.
    wire_received: Vec<u64>,
    bytes_reported_at: Instant,
    final_round: Option<u64>,
    /// The source's page CRCs (`verify = "full"`).
    source_crcs: Vec<u32>,
    expect: Option<Expect>,
    /// Our page CRCs and whole-memory digest (`full`), once every page has arrived.
    ours: Option<(Vec<u32>, u32)>,
    timeout: Duration,
    last_activity: Instant,
    /// The session carries device state ([`caps::DEVICE_STATE`]).
    device_state: bool,
    /// Device state that arrived before the verdict, by offset in its stream, held
    /// until memory is verified (pieces come on any data stream, in any order).
    device_chunks: std::collections::BTreeMap<u64, Vec<u8>>,
    device_bytes: u64,
    /// The source's `DeviceStateEnd`, once it came.
    device_end: Option<u64>,
    /// Bytes and pages each stream has received, from its workers' telemetry (the
    /// bytes final once the stream ended).
    received: Vec<(u64, u64)>,
    progress: &'p ReceiveProgress,
    progress_at: Instant,
    /// Where connections arrive: replacements and resumes come in; on a gate of its
    /// own, new sessions are turned away (busy) while this one runs (a lane leaves them
    /// to its dispatcher).
    gate: &'p mut dyn Port,
    /// What a new session hears meanwhile (on a gate of its own).
    busy: String,
    handshake_timeout: Duration,
    /// Capabilities granted.
    granted: u64,
    /// The authenticated source, in a TLS session (a resume must come from it).
    peer_identity: Option<String>,
    /// Bytes received over connections of the session before its last resume.
    bytes_before_resume: u64,
    /// Times the session was resumed.
    resumes: u32,
    /// The session's RMA connections, while it writes pages by RMA.
    rma: Option<crate::transport::rma::RmaTargets>,
    rma_provider: Option<String>,
    /// Pages whose RMA write arrived wrong, asked for again.
    rma_pages_resent: u64,
}

impl Coordinator<'_> {
    /// Refresh what an observer sees.
    /// Bytes received on data streams.
    fn received_bytes(&self) -> u64 {
        self.bytes_before_resume + self.received.iter().map(|r| r.0).sum::<u64>()
    }

    fn publish_progress(&mut self) {
        self.progress_at = Instant::now();
        let (bytes, pages) = self
            .received
            .iter()
            .fold((0, 0), |(b, p), (sb, sp)| (b + sb, p + sp));
        let round = self.rounds_applied;
        let phase = match (self.final_round, &self.expect) {
            (None, _) => "precopy",
            (Some(_), None) => "switchover",
            (Some(_), Some(_)) => "verify",
        };
        self.progress.update(|p| {
            p.bytes = p.bytes.max(bytes);
            p.pages = p.pages.max(pages);
            p.round = round;
            if p.phase != "device-state" {
                p.phase = phase;
            }
        });
    }

    fn aborted(&self, reason: String) -> MigrationError {
        MigrationError::Aborted {
            reason,
            rounds: self.rounds_applied,
        }
    }

    /// A worker's event.
    fn on_event(&mut self, event: RxEvent) -> Result<(), MigrationError> {
        match event {
            RxEvent::RoundEnd {
                stream,
                round,
                pages,
            } => {
                let r = round as usize;
                if self.round_pages.len() <= r {
                    self.round_pages.resize(r + 1, 0);
                }
                self.round_pages[r] += u64::from(pages);
                if let Some(n) = self.stream_rounds.get_mut(usize::from(stream)) {
                    *n = round + 1;
                }
                self.acknowledge_rounds()?;
            }
            RxEvent::StreamEnd { stream, bytes } => {
                if let Some(state) = self.stream_state.get_mut(usize::from(stream)) {
                    *state = StreamState::Ended;
                }
                if let Some(r) = self.received.get_mut(usize::from(stream)) {
                    r.0 = r.0.max(bytes);
                }
            }
            RxEvent::StreamLost {
                stream,
                error,
                rounds_ended,
            } => self.stream_lost(stream, error, rounds_ended)?,
            RxEvent::Telemetry {
                stream,
                wire_bytes,
                bytes,
                pages,
            } => {
                if let Some(r) = self.received.get_mut(usize::from(stream)) {
                    *r = (bytes, pages);
                }
                if let Some(w) = self.wire_received.get_mut(usize::from(stream)) {
                    *w = wire_bytes;
                }
            }
            RxEvent::DeviceState { offset, bytes, .. } => self.device_piece(offset, bytes)?,
            // Pages a vCPU wrote while their RMA write was in flight land torn like
            // this too (the dirty log has them as well): counted, not logged.
            RxEvent::Resend { pages, .. } => {
                self.rma_pages_resent += pages.len() as u64;
                self.control.send(&ControlMessage::ResendPages { pages })?;
            }
            RxEvent::Failed { stream, error } => {
                // What this side found wrong in the stream's bytes is the reason; a
                // failed receive may just mean the source went away first.
                if !matches!(error, RxError::Wire(_))
                    && let Some(message) = self.source_abort()
                {
                    return Err(self.aborted(format!("source aborted: {message}")));
                }
                return Err(MigrationError::Transport(format!(
                    "data stream {stream}: {error}"
                )));
            }
        }
        Ok(())
    }

    /// Keep the data streams that arrived during the session and replace a lost stream
    /// at its next generation, bound to the session; close every other.
    fn replacement_arrived(
        &mut self,
        arrived: Vec<(TcpStream, [u8; STREAM_HELLO_LEN])>,
    ) -> Result<(), MigrationError> {
        for (socket, bytes) in arrived {
            let Ok(hello) = StreamHello::decode(&bytes, self.replacements.session_id, self.streams)
            else {
                continue;
            };
            let s = usize::from(hello.stream_id);
            // The generation the source restored the stream at, or the next one of a
            // stream still lost.
            let next = match self
                .replacements
                .restoring
                .iter()
                .find(|r| r.stream == hello.stream_id)
            {
                Some(r) => Some(r.generation),
                None => (self.stream_state[s] == StreamState::Lost)
                    .then(|| self.replacements.generations[s].wrapping_add(1)),
            };
            let Some(next) = next.filter(|&g| self.loss_allowed && hello.generation == g) else {
                security::counters::record_rejected("binding");
                continue;
            };
            let keys = match &self.replacements.keys {
                Some(_) => self.control.generation_keys(self.streams, next)?,
                None => None,
            };
            let bound = match (&keys, &hello.binding) {
                (Some(k), Some(b)) => k.binding_matches(hello.stream_id, b),
                (None, None) => true,
                _ => false,
            };
            if !bound {
                security::counters::record_rejected("binding");
                continue;
            }
            socket::configure(&socket, &self.replacements.transport.socket);
            let _ = socket.set_read_timeout(Some(self.timeout));
            self.replacements
                .spare
                .push((hello.stream_id, next, socket, keys));
        }
        Ok(())
    }

    /// Start receiving every restored stream whose connection is here: nothing of any
    /// page is in flight (the source restores a stream only once every round it sent is
    /// acknowledged), so its chunks come back to it from the next round on.
    fn restore_streams(&mut self, fleet: &mut RxFleet) -> Result<(), MigrationError> {
        let mut i = 0;
        while i < self.replacements.restoring.len() {
            let Restoring {
                stream,
                generation,
                first_round,
                since,
            } = self.replacements.restoring[i];
            let Some(found) = self
                .replacements
                .spare
                .iter()
                .position(|(s, g, _, _)| *s == stream && *g == generation)
            else {
                if since.elapsed() > self.timeout {
                    return Err(MigrationError::Transport(format!(
                        "the connection replacing data stream {stream} did not arrive within {:?}",
                        self.timeout
                    )));
                }
                i += 1;
                continue;
            };
            self.replacements.restoring.remove(i);
            let (_, _, socket, keys) = self.replacements.spare.remove(found);
            if let (Some(session), Some(keys)) = (&self.replacements.keys, keys) {
                session.replace_stream(stream, keys);
            }
            let setup = RxSetup {
                first_round,
                ..self.replacements.setup.clone()
            };
            // The new connection counts its bytes from 0, as the source does for it.
            self.wire_received[usize::from(stream)] = 0;
            fleet.adopt(
                self.replacements.kind,
                (stream, socket),
                &setup,
                &self.replacements.transport,
            )?;
            eprintln!(
                "dwcp: data stream {stream} restored (generation {generation}) from round {first_round}"
            );
        }
        Ok(())
    }

    /// Tell the source what each stream has delivered, a few times a second while
    /// pages move: it alone knows what it handed each stream, so it alone can tell a
    /// stream whose path takes bytes and forwards none.
    fn report_stream_bytes(&mut self) -> Result<(), MigrationError> {
        if !self.loss_allowed
            || self.final_round.is_some()
            || self.bytes_reported_at.elapsed() < STREAM_BYTES_INTERVAL
        {
            return Ok(());
        }
        self.bytes_reported_at = Instant::now();
        self.control.send(&ControlMessage::StreamBytes {
            received: self.wire_received.clone(),
        })
    }

    /// Acknowledge every round that each stream still open has delivered.
    fn acknowledge_rounds(&mut self) -> Result<(), MigrationError> {
        loop {
            let round = self.rounds_applied;
            let mut open = self
                .stream_rounds
                .iter()
                .zip(&self.stream_state)
                .filter(|(_, s)| **s != StreamState::Lost);
            if open.clone().next().is_none() || !open.all(|(n, _)| *n > round) {
                return Ok(());
            }
            self.control.send(&ControlMessage::RoundApplied {
                round,
                pages: self.round_pages.get(round as usize).copied().unwrap_or(0),
            })?;
            self.rounds_applied += 1;
        }
    }

    /// Stream `stream` stopped (its socket failed or closed early, or the source gave
    /// it up): nothing more of it is placed. Its pages go to other streams from now on,
    /// once the source hears so.
    fn stream_lost(
        &mut self,
        stream: u16,
        error: String,
        rounds_ended: u64,
    ) -> Result<(), MigrationError> {
        let s = usize::from(stream);
        if self.stream_state.get(s) != Some(&StreamState::Open) {
            return Ok(());
        }
        if !self.loss_allowed {
            // A source that cannot carry on without a stream: as any failed stream.
            if let Some(message) = self.source_abort() {
                return Err(self.aborted(format!("source aborted: {message}")));
            }
            return Err(MigrationError::Transport(format!(
                "data stream {stream}: {error}"
            )));
        }
        self.stream_state[s] = StreamState::Lost;
        self.stream_rounds[s] = rounds_ended;
        // Its RMA connection goes too: nothing of the stream may land from now on.
        if let Some(rma) = &self.rma {
            rma.close(stream);
        }
        super::counters::lost(false, 0);
        self.fence.mark_lost(stream);
        self.streams_lost.push((stream, error.clone()));
        if self.stream_state.iter().all(|st| *st == StreamState::Lost) {
            // Every stream closing at once is most likely the source ending the
            // session: its reason, if it gave one.
            if let Some(message) = self.source_abort() {
                return Err(self.aborted(format!("source aborted: {message}")));
            }
            return Err(MigrationError::Disconnected(format!(
                "every data stream was lost (the last, stream {stream}: {error})"
            )));
        }
        eprintln!("dwcp: data stream {stream} lost: {error}; the others carry its pages");
        self.control.send(&ControlMessage::StreamFenced {
            stream,
            rounds_ended,
            reason: error,
        })?;
        self.acknowledge_rounds()
    }

    /// A message from the source.
    fn on_control(&mut self, msg: ControlMessage) -> Result<(), MigrationError> {
        match msg {
            ControlMessage::Switchover { final_round } => self.final_round = Some(final_round),
            ControlMessage::TableDigest { pages, digest } => {
                self.expect = Some(Expect::Table { pages, digest })
            }
            ControlMessage::PageCrcs { first_page, crcs } => {
                if first_page != self.source_crcs.len() as u64
                    || self.source_crcs.len() + crcs.len() > self.memory.pages() as usize
                {
                    return Err(WireError::Unexpected(format!(
                        "page CRCs from {first_page} ({} already received, {} pages)",
                        self.source_crcs.len(),
                        self.memory.pages()
                    ))
                    .into());
                }
                self.source_crcs.extend_from_slice(&crcs);
            }
            ControlMessage::Digest { pages, digest } => {
                self.expect = Some(Expect::Full { pages, digest })
            }
            ControlMessage::Ping { nanos } => {
                self.control.send(&ControlMessage::Pong { nanos })?;
            }
            ControlMessage::Abort { message, .. } => {
                return Err(self.aborted(format!("source aborted: {message}")));
            }
            ControlMessage::DeviceState { bytes } if self.device_state => {
                // The control-stream form: pieces in order.
                let offset = self.device_bytes;
                self.device_piece(offset, bytes)?;
            }
            ControlMessage::DeviceStateEnd { bytes } if self.device_state => {
                self.device_end = Some(bytes);
            }
            ControlMessage::StreamRestored { stream, generation } if self.loss_allowed => {
                let s = usize::from(stream);
                if self.stream_state.get(s) != Some(&StreamState::Lost)
                    || generation != self.replacements.generations[s].wrapping_add(1)
                {
                    return Err(WireError::Unexpected(format!(
                        "the source restored stream {stream} (generation {generation}), \
                         which is not lost here or not at that generation"
                    ))
                    .into());
                }
                // From here on the stream counts in every round again, from the first
                // one not yet acknowledged (its pages come only on it), whenever its
                // connection is taken up.
                self.fence.restore(stream);
                self.stream_state[s] = StreamState::Open;
                self.stream_rounds[s] = self.rounds_applied;
                self.replacements.generations[s] = generation;
                self.replacements.restoring.push(Restoring {
                    stream,
                    generation,
                    first_round: self.rounds_applied,
                    since: Instant::now(),
                });
            }
            ControlMessage::StreamLost { stream, reason } if self.loss_allowed => {
                match self.stream_state.get(usize::from(stream)) {
                    None => {
                        return Err(WireError::Unexpected(format!(
                            "the source gave up stream {stream} of {}",
                            self.streams
                        ))
                        .into());
                    }
                    // Already stopped: say so again (the source may have asked before
                    // our word reached it).
                    Some(StreamState::Lost) | Some(StreamState::Ended) => {
                        self.control.send(&ControlMessage::StreamFenced {
                            stream,
                            rounds_ended: self.stream_rounds[usize::from(stream)],
                            reason: format!("given up by the source: {reason}"),
                        })?;
                    }
                    Some(StreamState::Open) => {
                        eprintln!("dwcp: the source gave up data stream {stream}: {reason}");
                        self.fence.request(stream);
                    }
                }
            }
            other => {
                return Err(WireError::Unexpected(format!("{other:?} from the source")).into());
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        fleet: &mut RxFleet,
        cancel: &AtomicBool,
    ) -> Result<(u64, String, u64), MigrationError> {
        loop {
            // Set by whoever owns this appliance (a daemon shutting down); the Acquire
            // pairs with their Release store.
            if cancel.load(Ordering::Acquire) {
                return Err(self.aborted("cancelled at the destination".into()));
            }
            let mut progress = fleet.poll(|event| self.on_event(event))?;
            while let Some(msg) = self.control.try_recv()? {
                progress = true;
                self.on_control(msg)?;
            }
            if !self.replacements.restoring.is_empty() {
                self.restore_streams(fleet)?;
            }
            self.report_stream_bytes()?;
            if self.progress_at.elapsed() >= PROGRESS_INTERVAL {
                self.publish_progress();
                // The source pings every 250 ms: nothing from it this long, with a new
                // control connection at the gate, is a source that lost its
                // connections (a middlebox forgot them, say) and comes back to resume;
                // this side may never see its old ones fail.
                let silent = self.last_activity.elapsed() >= SOURCE_SILENT_AFTER;
                let hold = silent && self.granted & caps::RESUME != 0;
                let arrived = self
                    .gate
                    .turn_away(self.handshake_timeout, &self.busy, hold);
                self.replacement_arrived(arrived)?;
                if hold && self.gate.control_waiting() {
                    return Err(MigrationError::Disconnected(format!(
                        "nothing from the source for {:.1} s, and a new control connection \
                         came",
                        self.last_activity.elapsed().as_secs_f64()
                    )));
                }
            }
            if let Some(final_round) = self.final_round
                && self.stream_state.iter().all(|s| *s != StreamState::Open)
                && self.rounds_applied > final_round
            {
                // Every page is in (each stream reported its end after its last page
                // was placed and recorded).
                match self.expect {
                    Some(Expect::Table { pages, digest }) => {
                        return self.verify_table(pages, digest, final_round);
                    }
                    Some(Expect::Full { pages, digest }) => {
                        if self.ours.is_none() {
                            // Checksum our memory now, while the source sends its CRCs.
                            // SAFETY: every stream has ended and its receiver reported
                            // the end, so nothing writes the memory any more.
                            self.ours = Some(unsafe { page_crcs(&self.memory) });
                        }
                        if self.source_crcs.len() as u64 == pages {
                            return self.verify_full(pages, digest, final_round);
                        }
                    }
                    None => {}
                }
            }
            if progress {
                self.last_activity = Instant::now();
            } else {
                if self.last_activity.elapsed() > self.timeout {
                    let silence =
                        format!("no data or messages from the source for {:?}", self.timeout);
                    // Connections that say nothing this long are as good as lost.
                    return Err(if self.granted & caps::RESUME != 0 {
                        MigrationError::Disconnected(silence)
                    } else {
                        MigrationError::Transport(silence)
                    });
                }
                // A control message ends the wait at once (a sleep would add its length
                // to every step of the switchover); workers' events are polled. Once
                // the guest is paused at the source, the wait does not sleep at all.
                let msg = if self.final_round.is_some() {
                    self.control.recv_yielding(Duration::from_micros(50))?
                } else {
                    self.control.recv_timeout(Duration::from_micros(500))?
                };
                if let Some(msg) = msg {
                    self.last_activity = Instant::now();
                    self.on_control(msg)?;
                }
            }
        }
    }

    /// Every connection of the session was lost (`cause`) before its switchover: keep
    /// its memory and table for `resume_grace`, take the source's resume through the
    /// gate, answer the table comparison (see `resume`), and carry on with new
    /// receivers. Past the grace period the session fails, and its memory goes with it.
    fn await_resume(
        &mut self,
        fleet: &mut RxFleet,
        cause: MigrationError,
        config: &DestConfig,
        cancel: &AtomicBool,
    ) -> Result<(), MigrationError> {
        fleet.stop();
        self.control.shutdown();
        // A resumed session sends pages as frames; its RMA connections close now.
        self.rma = None;
        self.bytes_before_resume = self.received_bytes();
        self.received.iter_mut().for_each(|r| *r = (0, 0));
        let grace = config.resume_grace;
        eprintln!(
            "dwcp: {cause}; keeping the session for {} s for the source to resume it",
            grace.as_secs()
        );
        self.progress.update(|p| p.phase = "interrupted");
        let session = handshake::Resumable {
            session_id: self.replacements.session_id,
            memory: self.memory.clone(),
            streams: self.streams,
            granted: self.granted,
            peer: self.peer_identity.clone(),
        };
        let table = self.table.clone();
        let waiting = Waiting {
            session: &session,
            table: &table,
            deadline: Instant::now() + grace,
            rounds_done: self.rounds_applied,
        };
        let (accepted, round, differing) =
            waiting.wait(self.gate, config, cancel, self.progress, || {
                MigrationError::Transport(format!(
                    "{cause}; the source did not resume the session within resume_grace ({} \
                     s): given up, its memory released",
                    grace.as_secs()
                ))
            })?;
        self.resumed(fleet, accepted, round, differing, config)
    }

    /// Carry the session on from round `round` over the resumed connections.
    fn resumed(
        &mut self,
        fleet: &mut RxFleet,
        accepted: handshake::Accepted,
        round: u64,
        differing_chunks: u64,
        config: &DestConfig,
    ) -> Result<(), MigrationError> {
        let handshake::Accepted {
            control,
            streams,
            keys,
            ..
        } = accepted;
        let n = usize::from(self.streams);
        self.fence = Arc::new(StreamFence::default());
        let setup = RxSetup {
            fence: self.fence.clone(),
            first_round: round,
            total_streams: self.streams,
            memory: self.memory.clone(),
            memory_is_fresh: false,
            holes: None,
            capabilities: self.granted,
            table: self.table.clone(),
            records: keys.clone(),
        };
        *fleet = RxFleet::spawn(
            self.replacements.kind,
            streams,
            &setup,
            &config.transport,
            config.workers,
        )?;
        self.control = ControlLink::new(control, &config.transport.socket)?;
        self.replacements = Replacements {
            session_id: self.replacements.session_id,
            keys,
            setup,
            kind: self.replacements.kind,
            transport: config.transport.clone(),
            generations: vec![0; n],
            spare: Vec::new(),
            restoring: Vec::new(),
        };
        // Every round before `round` is settled by the comparison; `round` starts over.
        self.rounds_applied = round;
        self.round_pages.truncate(round as usize);
        self.stream_rounds = vec![round; n];
        self.stream_state = vec![StreamState::Open; n];
        self.wire_received = vec![0; n];
        self.bytes_reported_at = Instant::now();
        self.last_activity = Instant::now();
        self.resumes += 1;
        self.progress.update(|p| p.phase = "precopy");
        eprintln!(
            "dwcp: session resumed from round {round} ({differing_chunks} table chunks differed)"
        );
        Ok(())
    }

    /// The source's reason, when it aborted: a source that aborts closes its streams
    /// and the control stream right after saying why, so a failed read or write here
    /// may come first. Waits briefly for it, past any ping or other message queued
    /// ahead of it.
    fn source_abort(&self) -> Option<String> {
        let deadline = Instant::now() + Duration::from_millis(200);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.control.recv_timeout(left) {
                Ok(Some(ControlMessage::Abort { message, .. })) => return Some(message),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        None
    }

    /// Keep a piece of the device state until the verdict.
    fn device_piece(&mut self, offset: u64, bytes: Vec<u8>) -> Result<(), MigrationError> {
        let end = offset.saturating_add(bytes.len() as u64);
        let overlaps = self
            .device_chunks
            .range(..end)
            .next_back()
            .is_some_and(|(at, b)| at + b.len() as u64 > offset);
        if overlaps || end > MAX_DEVICE_STATE {
            return Err(WireError::Unexpected(format!(
                "device state bytes {offset}..{end} overlap others or pass {MAX_DEVICE_STATE}"
            ))
            .into());
        }
        self.device_bytes += bytes.len() as u64;
        self.device_chunks.insert(offset, bytes);
        Ok(())
    }

    /// After the verdict: feed the device state into `sink` (what arrived already, then
    /// the rest until the source says it is complete), then report the guest running.
    /// Returns the bytes loaded.
    fn load_device_state(
        &mut self,
        sink: &mut dyn DeviceStateSink,
        cancel: &AtomicBool,
    ) -> Result<u64, MigrationError> {
        let loading = |e: crate::guest::GuestError| {
            MigrationError::Guest(format!("loading the device state: {e}"))
        };
        self.last_activity = Instant::now();
        while self.device_end.is_none() {
            // Acquire: pairs with the owner's Release store, as in `run`.
            if cancel.load(Ordering::Acquire) {
                return Err(self.aborted("cancelled at the destination".into()));
            }
            let Some(msg) = self.control.recv_timeout(Duration::from_millis(1))? else {
                if self.last_activity.elapsed() > self.timeout {
                    return Err(MigrationError::Transport(format!(
                        "no device state from the source for {:?}",
                        self.timeout
                    )));
                }
                continue;
            };
            self.last_activity = Instant::now();
            self.on_control(msg)?;
        }
        let announced = self.device_end.unwrap_or_default();
        if announced != self.device_bytes {
            return Err(WireError::Unexpected(format!(
                "device state of {announced} bytes announced, {} received",
                self.device_bytes
            ))
            .into());
        }
        // Whole and without overlaps (checked as pieces came): the pieces tile it.
        let mut next = 0u64;
        for (offset, chunk) in std::mem::take(&mut self.device_chunks) {
            if offset != next {
                return Err(WireError::Unexpected(format!(
                    "device state has a gap at byte {next}"
                ))
                .into());
            }
            next += chunk.len() as u64;
            sink.write(&chunk).map_err(loading)?;
        }
        sink.finish()
            .map_err(|e| MigrationError::Guest(format!("starting the guest: {e}")))?;
        self.control.send(&ControlMessage::GuestRunning)?;
        Ok(self.device_bytes)
    }

    /// Compare our table's digest with the source's. On a mismatch, send our table so
    /// that the source can name the pages.
    fn verify_table(
        &mut self,
        pages: u64,
        digest: u64,
        final_round: u64,
    ) -> Result<(u64, String, u64), MigrationError> {
        let ours = self.table.digest();
        let memory_pages = self.memory.pages();
        if pages == memory_pages && ours == digest {
            self.control.send(&ControlMessage::Verified {
                pages,
                mismatches: 0,
                mismatched_pages: Vec::new(),
                digest: ours,
            })?;
            return Ok((pages, format!("{ours:016x}"), final_round + 1));
        }
        const PER_MESSAGE: usize = 1 << 16;
        let mut first = 0u64;
        while first < memory_pages {
            let crcs = self.table.entries(first, PER_MESSAGE);
            let n = crcs.len() as u64;
            self.control.send(&ControlMessage::PageCrcs {
                first_page: first,
                crcs,
            })?;
            first += n;
        }
        self.control.send(&ControlMessage::Verified {
            pages: memory_pages,
            mismatches: 1,
            mismatched_pages: Vec::new(),
            digest: ours,
        })?;
        if test_skip_final_round() {
            // Test-only (see the engine docs): go on to run the guest regardless.
            return Ok((pages, format!("{ours:016x} (differs)"), final_round + 1));
        }
        Err(MigrationError::DigestMismatch {
            source_digest: digest,
            dest_digest: ours,
        })
    }

    /// Compare our memory's page CRCs with the source's.
    fn verify_full(
        &mut self,
        pages: u64,
        digest: u32,
        final_round: u64,
    ) -> Result<(u64, String, u64), MigrationError> {
        if pages != self.memory.pages() {
            return Err(WireError::Unexpected(format!(
                "digest covers {pages} pages; memory has {}",
                self.memory.pages()
            ))
            .into());
        }
        let (ours, our_digest) = self.ours.take().expect("computed before verifying");
        let (mismatches, listed) = differing_pages(&ours, &self.source_crcs);
        self.control.send(&ControlMessage::Verified {
            pages,
            mismatches,
            mismatched_pages: listed.clone(),
            digest: u64::from(our_digest),
        })?;
        if mismatches > 0 || our_digest != digest {
            return Err(MigrationError::Verification {
                mismatches: mismatches.max(1),
                pages: listed,
            });
        }
        Ok((pages, format!("{our_digest:08x}"), final_round + 1))
    }
}
