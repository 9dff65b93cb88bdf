//! The workers of one side of a session: which streams each owns, their rings, and
//! what they report.
//!
//! Both sides group streams into workers the same way ([`assign`]): io_uring workers
//! take groups of streams (`workers` of them, by default one per CPU, never more than
//! streams), plain-socket workers one stream each (a blocking send must not stall
//! another stream). The source's [`TxFleet`] also keeps the workers' telemetry, the
//! backlog bound of live sessions, the per-round totals and the zero-copy counters,
//! and can retire its workers for ones of another transport on the same open sockets.

use super::MigrationError;
use super::handshake::io;
use super::report::WorkerStatus;
use super::steer::Steering;
use crate::transport::{
    RxEvent, RxSetup, RxWorker, Starting, StreamTelemetry, TransportConfig, TransportKind,
    TxCommand, TxControl, TxEvent, TxSetup, TxWorker, WorkerTelemetry, plain, uring,
};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// CPUs to pin workers to, in order: the configured set, or every CPU (none when
/// pinning is off).
pub(super) fn worker_cpus(config: &TransportConfig) -> Vec<usize> {
    if !config.pin_workers {
        return Vec::new();
    }
    if !config.cpus.is_empty() {
        return config.cpus.clone();
    }
    dwcp_hugepages::numa::topology()
        .map(|t| t.nodes.into_iter().flat_map(|n| n.cpus).collect())
        .unwrap_or_default()
}

/// Split this machine's CPUs between a source and a destination running side by side
/// (the demo, tests, benchmarks): the first half for one, the rest for the other.
pub fn split_cpus() -> (Vec<usize>, Vec<usize>) {
    let all: Vec<usize> = dwcp_hugepages::numa::topology()
        .map(|t| t.nodes.into_iter().flat_map(|n| n.cpus).collect())
        .unwrap_or_default();
    if all.len() < 2 {
        return (all.clone(), all);
    }
    let (a, b) = all.split_at(all.len() / 2);
    (a.to_vec(), b.to_vec())
}

/// Which worker owns each stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Assignment {
    /// Per worker, the ids of its streams.
    pub groups: Vec<Vec<u16>>,
    /// Per stream id, its worker.
    pub worker_of: Vec<usize>,
}

/// Group `streams` streams into workers of `kind`: `wanted` io_uring workers (0: one
/// per CPU of `cpus`), each taking every `n`-th stream, at most one per stream; plain
/// workers one stream each.
pub(super) fn assign(kind: TransportKind, streams: u16, wanted: usize, cpus: usize) -> Assignment {
    let count = match kind {
        TransportKind::IoUring | TransportKind::Rma => match wanted {
            0 => cpus.max(1),
            n => n,
        }
        .min(usize::from(streams))
        .max(1),
        TransportKind::Plain => usize::from(streams).max(1),
    };
    let mut groups = vec![Vec::new(); count];
    let mut worker_of = vec![0; usize::from(streams)];
    for id in 0..streams {
        let w = usize::from(id) % count;
        groups[w].push(id);
        worker_of[usize::from(id)] = w;
    }
    Assignment { groups, worker_of }
}

/// The CPU worker `w` is pinned to, if pinning.
fn cpu_for(cpus: &[usize], w: usize) -> Option<usize> {
    (!cpus.is_empty()).then(|| cpus[w % cpus.len()])
}

/// Group `streams` into workers of `kind` ([`assign`]) and start each with `spawn`
/// (worker index, its streams, its CPU), all before waiting for any to be set up.
/// Returns the workers and, per stream id, its worker.
fn spawn_groups<W>(
    kind: TransportKind,
    streams: Vec<(u16, TcpStream)>,
    wanted: usize,
    cpus: &[usize],
    mut spawn: impl FnMut(
        usize,
        Vec<(u16, TcpStream)>,
        Option<usize>,
    ) -> Result<Starting<W>, MigrationError>,
) -> Result<(Vec<W>, Vec<usize>), MigrationError> {
    let assignment = assign(kind, streams.len() as u16, wanted, cpus.len());
    let mut sockets: Vec<Option<TcpStream>> = (0..streams.len()).map(|_| None).collect();
    for (id, s) in streams {
        sockets[usize::from(id)] = Some(s);
    }
    let mut starting = Vec::with_capacity(assignment.groups.len());
    for (w, group) in assignment.groups.iter().enumerate() {
        let group = group
            .iter()
            .filter_map(|&id| sockets[usize::from(id)].take().map(|s| (id, s)))
            .collect();
        starting.push(spawn(w, group, cpu_for(cpus, w))?);
    }
    let workers = starting
        .into_iter()
        .map(|s| s.ready().map_err(io("setting up a worker")))
        .collect::<Result<Vec<W>, _>>()?;
    Ok((workers, assignment.worker_of))
}

/// Start source worker `w` of `kind` for `group` (one stream for a plain worker).
fn spawn_tx_worker(
    kind: TransportKind,
    w: usize,
    group: Vec<(u16, TcpStream)>,
    setup: &TxSetup,
    transport: &TransportConfig,
    zero_copy: bool,
    cpu: Option<usize>,
) -> Result<Starting<TxWorker>, MigrationError> {
    match kind {
        TransportKind::IoUring | TransportKind::Rma => {
            uring::start_tx(w, group, setup.clone(), transport, zero_copy, cpu)
                .map_err(io("starting an io_uring worker"))
        }
        TransportKind::Plain => plain::spawn_tx(w, single(group)?, setup.clone(), transport, cpu)
            .map(Starting::started)
            .map_err(io("starting a worker")),
    }
}

/// Start destination worker `w` of `kind` for `group` (one stream for a plain worker).
fn spawn_rx_worker(
    kind: TransportKind,
    w: usize,
    group: Vec<(u16, TcpStream)>,
    setup: &RxSetup,
    transport: &TransportConfig,
    cpu: Option<usize>,
) -> Result<Starting<RxWorker>, MigrationError> {
    match kind {
        TransportKind::IoUring | TransportKind::Rma => {
            uring::start_rx(w, group, setup.clone(), transport, cpu)
                .map_err(io("starting an io_uring receiver"))
        }
        TransportKind::Plain => plain::spawn_rx(single(group)?, setup.clone(), transport, cpu)
            .map(Starting::started)
            .map_err(io("starting a receiver")),
    }
}

/// The one stream of a plain-socket worker's group.
fn single(group: Vec<(u16, TcpStream)>) -> Result<(u16, TcpStream), MigrationError> {
    group
        .into_iter()
        .next()
        .ok_or_else(|| MigrationError::Config("a worker without a stream".into()))
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

/// What the workers reported for one round, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RoundTotals {
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Bytes of frames.
    pub bytes: u64,
}

/// Zero-copy sends, over every worker that has finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ZeroCopyCounts {
    /// Sends the kernel turned into copies.
    pub copied: u64,
    /// Zero-copy sends issued.
    pub sends: u64,
    /// Some worker found every probed send copied and fell back.
    pub fell_back: bool,
}

/// The source's workers.
pub(super) struct TxFleet {
    kind: TransportKind,
    workers: Vec<TxWorker>,
    worker_of: Vec<usize>,
    /// Clones of the data sockets: socket options, unblocking everything on abort,
    /// and handing the streams to new workers.
    sockets: Vec<TcpStream>,
    setup: TxSetup,
    transport: TransportConfig,
    /// io_uring workers wanted (0: one per CPU).
    wanted: usize,
    cpus: Vec<usize>,
    /// Latest counters per stream (carried across transport switches).
    telemetry: Vec<StreamTelemetry>,
    /// Per stream: bytes and pages sent by workers a transport switch retired.
    carried: Vec<(u64, u64)>,
    worker_telemetry: Vec<WorkerTelemetry>,
    round_sent: Vec<Option<(u64, RoundTotals)>>,
    finished: usize,
    zero_copy: ZeroCopyCounts,
    backlog: Vec<Backlog>,
    /// Streams the workers gave up since the engine last looked, with why.
    lost: Vec<(u16, String)>,
}

impl TxFleet {
    /// Start workers of `kind` for `streams`.
    pub fn spawn(
        kind: TransportKind,
        zero_copy: bool,
        streams: Vec<(u16, TcpStream)>,
        setup: TxSetup,
        transport: &TransportConfig,
        wanted: usize,
    ) -> Result<Self, MigrationError> {
        let sockets = streams
            .iter()
            .map(|(_, s)| s.try_clone().map_err(io("cloning a data socket")))
            .collect::<Result<Vec<_>, _>>()?;
        let n = streams.len() as u16;
        let mut fleet = TxFleet {
            kind,
            workers: Vec::new(),
            worker_of: Vec::new(),
            sockets,
            setup,
            transport: transport.clone(),
            wanted,
            cpus: worker_cpus(transport),
            telemetry: (0..n)
                .map(|stream| StreamTelemetry {
                    stream,
                    ..StreamTelemetry::default()
                })
                .collect(),
            carried: vec![(0, 0); usize::from(n)],
            worker_telemetry: Vec::new(),
            round_sent: Vec::new(),
            finished: 0,
            zero_copy: ZeroCopyCounts::default(),
            backlog: Vec::new(),
            lost: Vec::new(),
        };
        fleet.start(kind, zero_copy, streams)?;
        Ok(fleet)
    }

    fn start(
        &mut self,
        kind: TransportKind,
        zero_copy: bool,
        streams: Vec<(u16, TcpStream)>,
    ) -> Result<(), MigrationError> {
        let (setup, transport) = (&self.setup, &self.transport);
        let (workers, worker_of) =
            spawn_groups(kind, streams, self.wanted, &self.cpus, |w, group, cpu| {
                spawn_tx_worker(kind, w, group, setup, transport, zero_copy, cpu)
            })?;
        let n = workers.len();
        self.kind = kind;
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
        Ok(())
    }

    /// The workers' transport.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// Workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// The worker that owns stream `stream`.
    pub fn worker_of(&self, stream: u16) -> usize {
        self.worker_of[usize::from(stream)]
    }

    /// How many streams each worker owns.
    pub fn streams_per_worker(&self) -> Vec<u16> {
        let mut streams_of = vec![0u16; self.workers.len()];
        for &w in &self.worker_of {
            streams_of[w] += 1;
        }
        streams_of
    }

    /// The data sockets (clones), by stream id.
    pub fn sockets(&self) -> &[TcpStream] {
        &self.sockets
    }

    /// Latest counters per stream.
    pub fn telemetry(&self) -> &[StreamTelemetry] {
        &self.telemetry
    }

    /// Zero-copy counters of the workers that finished.
    pub fn zero_copy(&self) -> ZeroCopyCounts {
        self.zero_copy
    }

    /// Every worker has reported [`TxEvent::Finished`].
    pub fn all_finished(&self) -> bool {
        self.finished >= self.workers.len()
    }

    /// Take in everything the workers reported; worker telemetry also goes to
    /// `steering`. Returns whether anything arrived, or the first worker failure.
    pub fn poll(
        &mut self,
        mut steering: Option<&mut Steering<'_>>,
    ) -> Result<bool, MigrationError> {
        let mut any = false;
        for (w, worker) in self.workers.iter_mut().enumerate() {
            while let Some(event) = worker.events.pop() {
                any = true;
                match event {
                    TxEvent::RoundSent {
                        round,
                        zero_pages,
                        bytes,
                        ..
                    } => self.round_sent[w] = Some((round, RoundTotals { zero_pages, bytes })),
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
                        if let Some(steering) = steering.as_deref_mut() {
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
                        self.zero_copy.copied += zc_copied;
                        self.zero_copy.sends += zc_sends;
                        self.zero_copy.fell_back |= zc_fell_back;
                    }
                    TxEvent::Failed { error, .. } => {
                        return Err(MigrationError::Transport(error.to_string()));
                    }
                    TxEvent::StreamLost { stream, error } => self.lost.push((stream, error)),
                }
            }
        }
        Ok(any)
    }

    /// The session's record keys, in an authenticated session.
    pub fn records(&self) -> Option<&std::sync::Arc<crate::security::SessionKeys>> {
        self.setup.records.as_ref()
    }

    /// Start a worker of the fleet's transport for `socket`, a replacement connection
    /// that carries stream `stream` from now on (its old worker dropped it).
    pub fn adopt(
        &mut self,
        stream: u16,
        socket: TcpStream,
        zero_copy: bool,
    ) -> Result<(), MigrationError> {
        let s = usize::from(stream);
        let clone = socket.try_clone().map_err(io("cloning a data socket"))?;
        let w = self.workers.len();
        let cpu = cpu_for(&self.cpus, w);
        let worker = spawn_tx_worker(
            self.kind,
            w,
            vec![(stream, socket)],
            &self.setup,
            &self.transport,
            zero_copy,
            cpu,
        )?
        .ready()
        .map_err(io("setting up a worker"))?;
        self.workers.push(worker);
        self.worker_of[s] = w;
        self.sockets[s] = clone;
        // The new worker counts from 0; the stream's counters go on from here.
        self.carried[s] = (self.telemetry[s].bytes, self.telemetry[s].pages);
        self.round_sent.push(None);
        self.backlog.push(Backlog::new());
        self.worker_telemetry.push(WorkerTelemetry {
            worker: w,
            ..WorkerTelemetry::default()
        });
        Ok(())
    }

    /// Stream `stream` carries nothing more: the runs its worker dropped for it no
    /// longer count as queued there.
    pub fn stream_gone(&mut self, stream: u16) {
        let w = self.worker_of(stream);
        if let Some(b) = self.backlog.get_mut(w) {
            b.pushed = b.taken;
        }
    }

    /// Streams the workers gave up since the last call, with why.
    pub fn take_lost(&mut self) -> Vec<(u16, String)> {
        std::mem::take(&mut self.lost)
    }

    /// Queue `cmd` to worker `w`; gives it back when the ring is full.
    pub fn try_push(&mut self, w: usize, cmd: TxCommand) -> Result<(), TxCommand> {
        self.workers[w].commands.push(cmd).map_err(|full| full.0)
    }

    /// Queue a configuration change to worker `w` (it overtakes queued runs); gives it
    /// back when the ring is full.
    pub fn try_push_control(&mut self, w: usize, change: TxControl) -> Result<(), TxControl> {
        self.workers[w].control.push(change).map_err(|full| full.0)
    }

    /// Wake worker `w` (it may be parked).
    pub fn wake(&self, w: usize) {
        self.workers[w].thread.wake();
    }

    /// Wake every worker.
    pub fn wake_all(&self) {
        for w in &self.workers {
            w.thread.wake();
        }
    }

    /// Whether worker `w` has as much queued as a live session allows.
    pub fn backlog_full(&self, w: usize) -> bool {
        self.backlog[w].is_full()
    }

    /// `pages` more pages were queued to worker `w`.
    pub fn pushed(&mut self, w: usize, pages: u32) {
        self.backlog[w].pushed += u64::from(pages);
    }

    /// Round `round`'s totals once every worker has reported it sent (then forgotten).
    pub fn take_round(&mut self, round: u64) -> Option<RoundTotals> {
        if !self
            .round_sent
            .iter()
            .all(|r| r.is_some_and(|(sent, _)| sent == round))
        {
            return None;
        }
        let mut sum = RoundTotals::default();
        for r in &mut self.round_sent {
            if let Some((_, t)) = r.take() {
                sum.zero_pages += t.zero_pages;
                sum.bytes += t.bytes;
            }
        }
        Some(sum)
    }

    /// Each worker's latest counters and the fill of its command ring.
    pub fn status(&mut self) -> Vec<WorkerStatus> {
        self.workers
            .iter_mut()
            .zip(&self.worker_telemetry)
            .map(|(w, t)| WorkerStatus {
                telemetry: *t,
                queued_commands: w.commands.capacity() - w.commands.slots(),
            })
            .collect()
    }

    /// After every worker reported [`TxEvent::Finished`] on a `Release`: finish them, and
    /// start workers of `kind` on the same open sockets, counting on from the retired
    /// workers' final counters.
    pub fn replace(&mut self, kind: TransportKind, zero_copy: bool) -> Result<(), MigrationError> {
        for w in &mut self.workers {
            w.thread.finish();
        }
        for (carried, t) in self.carried.iter_mut().zip(&self.telemetry) {
            *carried = (t.bytes, t.pages);
        }
        let streams = self
            .sockets
            .iter()
            .enumerate()
            .map(|(id, s)| {
                s.try_clone()
                    .map(|s| (id as u16, s))
                    .map_err(io("cloning a data socket"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.start(kind, zero_copy, streams)
    }

    /// Shut every data socket down: workers blocked on them return at once.
    pub fn shutdown_sockets(&self) {
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Tell every worker to finish and wait until their work is over (what they own is
    /// freed later: see [`crate::transport::WorkerThread`]).
    pub fn close(&mut self) {
        for w in &mut self.workers {
            let _ = w.commands.push(TxCommand::Finish);
            w.thread.wake();
        }
        for w in &mut self.workers {
            w.thread.finish();
        }
    }
}

/// The destination's workers.
pub(super) struct RxFleet {
    workers: Vec<RxWorker>,
}

impl RxFleet {
    /// Start receivers of `kind` for `streams`.
    pub fn spawn(
        kind: TransportKind,
        streams: Vec<(u16, TcpStream)>,
        setup: &RxSetup,
        transport: &TransportConfig,
        wanted: usize,
    ) -> Result<Self, MigrationError> {
        let cpus = worker_cpus(transport);
        let (workers, _) = spawn_groups(kind, streams, wanted, &cpus, |w, group, cpu| {
            spawn_rx_worker(kind, w, group, setup, transport, cpu)
        })?;
        Ok(RxFleet { workers })
    }

    /// Start a receiver of `kind` for one more stream (a replacement for a lost one).
    pub fn adopt(
        &mut self,
        kind: TransportKind,
        stream: (u16, TcpStream),
        setup: &RxSetup,
        transport: &TransportConfig,
    ) -> Result<(), MigrationError> {
        let w = self.workers.len();
        let cpus = worker_cpus(transport);
        let cpu = cpu_for(&cpus, w);
        let worker = spawn_rx_worker(kind, w, vec![stream], setup, transport, cpu)?
            .ready()
            .map_err(io("setting up a receiver"))?;
        self.workers.push(worker);
        Ok(())
    }

    /// Hand every event the workers reported to `on_event`; returns whether any
    /// arrived, or the first error `on_event` returned.
    pub fn poll<E>(
        &mut self,
        mut on_event: impl FnMut(RxEvent) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut any = false;
        for w in &mut self.workers {
            while let Some(event) = w.events.pop() {
                any = true;
                on_event(event)?;
            }
        }
        Ok(any)
    }

    /// Stop every receiver and wait until their work is over (what they own is freed
    /// later: see [`crate::transport::WorkerThread`]).
    pub fn stop(&mut self) {
        for w in &self.workers {
            // Relaxed: the flag only asks the worker to leave its loop; the finish below
            // orders everything after.
            w.stop.store(true, Ordering::Relaxed);
        }
        for w in &mut self.workers {
            w.thread.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// `n` streams connected to a listener on loopback (kept, so they stay open).
    fn connected_streams(n: u16) -> (std::net::TcpListener, Vec<(u16, TcpStream)>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let streams = (0..n)
            .map(|id| (id, TcpStream::connect(addr).unwrap()))
            .collect();
        (listener, streams)
    }

    #[test]
    fn every_worker_starts_before_the_fleet_waits_for_any() {
        // Each worker's setup finishes only once all of them have started: a fleet
        // that waited for one before starting the next would see the first one fail.
        let (_listener, streams) = connected_streams(4);
        let started = Arc::new(AtomicUsize::new(0));
        let (workers, worker_of) = spawn_groups(
            TransportKind::IoUring,
            streams,
            0,
            &[0, 1],
            |w, group, _| {
                started.fetch_add(1, Ordering::SeqCst);
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let started = started.clone();
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while started.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let result = if started.load(Ordering::SeqCst) == 2 {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("the other worker never started"))
                    };
                    let _ = ready_tx.send(result);
                });
                Ok(Starting::setting_up((w, group.len()), ready_rx))
            },
        )
        .expect("both workers set up");
        assert_eq!(workers, vec![(0, 2), (1, 2)]);
        assert_eq!(worker_of, vec![0, 1, 0, 1]);
    }

    #[test]
    fn a_worker_s_failed_setup_is_the_fleet_s_error() {
        let (_listener, streams) = connected_streams(2);
        let result = spawn_groups(TransportKind::IoUring, streams, 0, &[0, 1], |w, _, _| {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let _ = ready_tx.send(if w == 1 {
                Err(std::io::Error::other("no ring for worker 1"))
            } else {
                Ok(())
            });
            Ok(Starting::setting_up(w, ready_rx))
        });
        let err = result.expect_err("worker 1 failed").to_string();
        assert!(err.contains("no ring for worker 1"), "{err}");
    }

    #[test]
    fn streams_are_dealt_to_workers_round_robin() {
        let a = assign(TransportKind::IoUring, 8, 0, 2);
        assert_eq!(a.groups, vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        assert_eq!(a.worker_of, vec![0, 1, 0, 1, 0, 1, 0, 1]);
        // Never more workers than streams.
        assert_eq!(
            assign(TransportKind::IoUring, 1, 4, 8).groups,
            vec![vec![0]]
        );
        // Plain sockets: a worker per stream, whatever was asked.
        let p = assign(TransportKind::Plain, 3, 1, 2);
        assert_eq!(p.groups, vec![vec![0], vec![1], vec![2]]);
        assert_eq!(p.worker_of, vec![0, 1, 2]);
    }
}
