//! The `transport` suite: our page stream against iperf3 on loopback, and a live
//! migration of 1 GiB beside iperf3's goodput.
//!
//! The page stream is the transport with nothing else: source workers stage
//! incompressible pages (copy, zero test, CRC32C, framing) and send them; destination
//! workers parse, place them in pre-faulted guest memory and check every CRC. iperf3
//! moves the same number of bytes with the same number of streams. CPU time is
//! getrusage: our process for ours (the suite runs nothing else meanwhile), the two
//! iperf3 processes (RUSAGE_CHILDREN) for theirs.
//!
//! `migrate/two-at-once-vs-in-turn`: two live migrations of 1 GiB into one
//! destination that takes sessions at once (the daemon's dispatcher), against the same
//! two one after the other through the same destination: wall time until both are
//! verified. On loopback both share the two cores, so what it shows is what running
//! them at once costs or saves in total.
//!
//! `transport/rma-tcp-provider-vs-iperf3-1s` measures RMA writes through libfabric's
//! `tcp` provider (registered memory into registered memory, one connection) against
//! iperf3 on one stream: the ceiling the RMA transport has on this machine.
//! `transport/rma-tcp-vs-uring` runs whole migrations with pages by RMA against the
//! same migrations with pages as frames on io_uring streams.

use crate::measure::{Plan, Samples};
use crate::report::{Better, Comparison, Reporter};
use dwcp_dataplane::crc_table::CrcTable;
use dwcp_dataplane::dirty::DirtyLogKind;
use dwcp_dataplane::engine::{DestConfig, SourceConfig};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_dataplane::ring::Consumer;
use dwcp_dataplane::security::SessionKeys;
use dwcp_dataplane::transport::{
    self, RxEvent, RxSetup, Starting, TransportConfig, TransportKind, TxCommand, TxSetup, TxWorker,
    plain, socket, uring,
};
use dwcp_dataplane::wire::{CHUNK_PAGES, caps, stream_of};
use dwcp_hugepages::PagePreference;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Two migrations into one destination at once, against one after the other (see the
/// module docs): seconds until both are verified.
fn two_at_once(runs: usize, out: &mut Reporter) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const GUEST: usize = 1 << 30;
    let workload = GuestWorkload {
        dirty_rate: 4e6,
        ..GuestWorkload::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, outcomes, dispatcher) =
        dwcp_tests::spawn_destination_at_once(&DestConfig::default(), 2, stop.clone());
    let guests: Vec<_> = (0..2)
        .map(|seed| dwcp_tests::running_guest(GUEST, &workload, 11 + seed))
        .collect();
    let mut guests: Vec<_> = guests.into_iter().map(Some).collect();
    // One migration of guest `i` (its dirty log taken for it, a new one opened after).
    let migrate = |guest: &mut Option<(_, _, _)>| -> Result<(), String> {
        let (memory, running, log): (
            Arc<GuestMemory>,
            dwcp_dataplane::guest::SimulatedGuest,
            Box<dyn dwcp_dataplane::dirty::DirtyLog>,
        ) = guest.take().expect("a guest");
        let result = dwcp_dataplane::engine::migrate(
            addr,
            memory.clone(),
            &running,
            log,
            &SourceConfig::default(),
            &mut |_| {},
        );
        running.stop();
        // The next run migrates the same memory again, running again.
        let opened = dwcp_dataplane::dirty::open_dirty_log(&memory, DirtyLogKind::Uffd)
            .map_err(|e| e.to_string())?;
        let again = dwcp_dataplane::guest::SimulatedGuest::start(
            memory.clone(),
            &workload,
            opened.marker.clone(),
        );
        *guest = Some((memory, again, opened.log));
        result.map(|_| ()).map_err(|e| e.to_string())
    };
    let (mut at_once, mut in_turn) = (Samples::default(), Samples::default());
    for i in 0..runs {
        for together in [i % 2 == 0, i % 2 != 0] {
            let started = Instant::now();
            let results: Vec<Result<(), String>> = if together {
                let (first, second) = guests.split_at_mut(1);
                std::thread::scope(|s| {
                    let a = s.spawn(|| migrate(&mut first[0]));
                    let b = migrate(&mut second[0]);
                    vec![a.join().expect("a migration thread"), b]
                })
            } else {
                guests.iter_mut().map(migrate).collect()
            };
            let seconds = started.elapsed().as_secs_f64();
            let received: Vec<_> = (0..2)
                .map(|_| outcomes.recv_timeout(Duration::from_secs(60)))
                .collect();
            let verified = received.iter().all(|r| matches!(r, Ok(Ok(_))));
            match results.iter().find_map(|r| r.as_ref().err()) {
                None if verified => {
                    let samples = if together { &mut at_once } else { &mut in_turn };
                    samples.push(seconds);
                }
                failed => eprintln!(
                    "migrate/two-at-once-vs-in-turn: a run failed: {failed:?}, destination \
                     verified both: {verified}"
                ),
            }
        }
    }
    for (_, running, _) in guests.into_iter().flatten() {
        running.stop();
    }
    // Release: pairs with the dispatcher's Acquire.
    stop.store(true, Ordering::Release);
    let _ = dispatcher.join();
    out.emit(Comparison::new(
        "migrate/two-at-once-vs-in-turn",
        "s",
        Better::Lower,
        &at_once,
        "the same two migrations one after the other, same destination",
        &in_turn,
    ));
}

/// CPU seconds (user + system) of this process or of its waited-for children.
pub(crate) fn cpu_seconds(who: libc::c_int) -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a writable rusage.
    unsafe { libc::getrusage(who, usage.as_mut_ptr()) };
    // SAFETY: getrusage filled it (or left it zeroed).
    let u = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// One measured transfer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transfer {
    pub bits_per_second: f64,
    pub cpu_per_gb: f64,
}

/// Memory for one direction of the page stream, made once and reused.
pub(crate) struct StreamSetup {
    pub source: Arc<GuestMemory>,
    pub dest: Arc<GuestMemory>,
}

impl StreamSetup {
    pub(crate) fn new(bytes: usize) -> Self {
        let source = Arc::new(
            GuestMemory::anonymous(bytes, PagePreference::TransparentHuge).expect("source memory"),
        );
        fill_memory(&source, &ContentMix::RANDOM, 1);
        let dest = Arc::new(
            GuestMemory::anonymous(bytes, PagePreference::TransparentHuge)
                .expect("destination memory"),
        );
        dest.populate();
        StreamSetup { source, dest }
    }
}

fn loopback_pairs(streams: u16, options: &socket::SocketOptions) -> Vec<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = listener.local_addr().expect("address");
    (0..streams)
        .map(|_| {
            let client = TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            socket::configure(&client, options);
            socket::configure(&server, options);
            (client, server)
        })
        .collect()
}

/// Our page stream: every page of `setup.source` once, over `streams` streams; sealed
/// records with `records` (an authenticated session's keys).
pub(crate) fn page_stream(
    setup: &StreamSetup,
    streams: u16,
    config: &TransportConfig,
    records: Option<Arc<SessionKeys>>,
) -> Transfer {
    let probe = transport::probe(config);
    let pairs = loopback_pairs(streams, &config.socket);
    let cpus = dwcp_hugepages::numa::topology()
        .map(|t| t.nodes.into_iter().flat_map(|n| n.cpus).collect::<Vec<_>>())
        .unwrap_or_default();
    let (senders, receivers): (Vec<_>, Vec<_>) = pairs
        .into_iter()
        .enumerate()
        .map(|(i, (c, s))| ((i as u16, c), (i as u16, s)))
        .unzip();
    // Source and destination share this machine: each side gets half the CPUs.
    let half = (cpus.len() / 2).max(1);
    let workers_n = match probe.kind {
        TransportKind::IoUring | TransportKind::Rma => half.min(usize::from(streams)),
        TransportKind::Plain => usize::from(streams),
    };
    let tx_cpu = |w: usize| (!cpus.is_empty()).then(|| cpus[w % half]);
    let rx_cpu = |w: usize| (!cpus.is_empty()).then(|| cpus[(half + w % half) % cpus.len()]);
    let mut tx: Vec<TxWorker> = Vec::new();
    let mut rx: Vec<Consumer<RxEvent>> = Vec::new();
    let mut rx_handles = Vec::new();
    let mut tx_groups: Vec<Vec<(u16, TcpStream)>> = (0..workers_n).map(|_| Vec::new()).collect();
    let mut rx_groups: Vec<Vec<(u16, TcpStream)>> = (0..workers_n).map(|_| Vec::new()).collect();
    for s in senders {
        tx_groups[usize::from(s.0) % workers_n].push(s);
    }
    for s in receivers {
        rx_groups[usize::from(s.0) % workers_n].push(s);
    }
    // Both sides keep their CRC tables, as in a migration.
    let rx_setup = RxSetup {
        total_streams: streams,
        memory: setup.dest.clone(),
        memory_is_fresh: true,
        holes: None,
        capabilities: caps::ALL,
        table: Arc::new(CrcTable::new(setup.dest.pages())),
        records: records.clone(),
        fence: Default::default(),
        first_round: 0,
    };
    let tx_setup = TxSetup {
        memory: setup.source.clone(),
        table: Arc::new(CrcTable::new(setup.source.pages())),
        codec: None,
        records,
        rma: None,
    };
    for (w, (tg, rg)) in tx_groups.into_iter().zip(rx_groups).enumerate() {
        match probe.kind {
            TransportKind::IoUring | TransportKind::Rma => {
                let worker = uring::start_rx(w, rg, rx_setup.clone(), config, rx_cpu(w))
                    .and_then(Starting::ready)
                    .expect("rx");
                rx.push(worker.events);
                rx_handles.push(worker.thread);
                tx.push(
                    uring::start_tx(w, tg, tx_setup.clone(), config, probe.zero_copy, tx_cpu(w))
                        .and_then(Starting::ready)
                        .expect("tx"),
                );
            }
            TransportKind::Plain => {
                for (s, r) in tg.into_iter().zip(rg) {
                    let worker =
                        plain::spawn_rx(r, rx_setup.clone(), config, rx_cpu(w)).expect("rx");
                    rx.push(worker.events);
                    rx_handles.push(worker.thread);
                    tx.push(
                        plain::spawn_tx(tx.len(), s, tx_setup.clone(), config, tx_cpu(w))
                            .expect("tx"),
                    );
                }
            }
        }
    }
    let worker_of = |stream: u16| -> usize {
        match probe.kind {
            TransportKind::IoUring | TransportKind::Rma => usize::from(stream) % workers_n,
            TransportKind::Plain => usize::from(stream),
        }
    };
    let pages = setup.source.pages();
    let cpu_before = cpu_seconds(libc::RUSAGE_SELF);
    let started = Instant::now();
    let push = |tx: &mut Vec<TxWorker>, w: usize, mut cmd: TxCommand| loop {
        match tx[w].commands.push(cmd) {
            Ok(()) => return,
            Err(full) => {
                cmd = full.0;
                // A worker that failed takes no more: say why instead of waiting.
                while let Some(event) = tx[w].events.pop() {
                    if let dwcp_dataplane::transport::TxEvent::Failed { error, .. } = event {
                        panic!("source worker {w}: {error}");
                    }
                }
                tx[w].thread.wake();
                std::thread::yield_now();
            }
        }
    };
    let mut first = 0;
    while first < pages {
        let stream = stream_of(first, streams);
        push(
            &mut tx,
            worker_of(stream),
            TxCommand::Pages {
                stream,
                first,
                count: CHUNK_PAGES as u32,
                known_zero: false,
            },
        );
        first += CHUNK_PAGES;
        if first % (64 * CHUNK_PAGES) == 0 {
            tx.iter().for_each(|w| w.thread.wake());
        }
    }
    for w in 0..tx.len() {
        push(&mut tx, w, TxCommand::EndRound { round: 0 });
        push(&mut tx, w, TxCommand::Finish);
        tx[w].thread.wake();
    }
    let mut ended = 0;
    let mut bytes = 0u64;
    while ended < streams {
        for events in &mut rx {
            while let Some(e) = events.pop() {
                match e {
                    RxEvent::StreamEnd { bytes: b, .. } => {
                        ended += 1;
                        bytes += b;
                    }
                    RxEvent::Failed { stream, error } => panic!("stream {stream}: {error}"),
                    _ => {}
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    // The workers free their buffers when joined: that is part of the transfer's CPU.
    for mut w in tx {
        w.thread.join();
    }
    for mut thread in rx_handles {
        thread.join();
    }
    let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu_before;
    Transfer {
        bits_per_second: bytes as f64 * 8.0 / seconds,
        cpu_per_gb: cpu / (bytes as f64 / 1e9),
    }
}

/// A loopback port free when asked (the benches' daemons and iperf3 listen on them).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(5299)
}

/// iperf3 moving `bytes` over `streams` streams on loopback, or why it could not.
fn iperf3(bytes: u64, streams: u16) -> Result<Transfer, String> {
    let port = free_port().to_string();
    let before = cpu_seconds(libc::RUSAGE_CHILDREN);
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the iperf3 server: {e}"))?;
    // The server takes a moment to listen; a probing connect would count as its one
    // client, so retry the real client instead.
    let mut result = Err(String::from("the iperf3 client never ran"));
    for _ in 0..250 {
        let o = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &port,
                "-J",
                "-P",
                &streams.to_string(),
                "-n",
                &bytes.to_string(),
            ])
            .output()
            .map_err(|e| format!("running the iperf3 client: {e}"))?;
        let json: Result<serde_json::Value, _> = serde_json::from_slice(&o.stdout);
        result = match json {
            Ok(json) if o.status.success() => {
                let received = &json["end"]["sum_received"];
                match (received["bytes"].as_f64(), received["seconds"].as_f64()) {
                    (Some(got), Some(seconds)) if got > 0.0 && seconds > 0.0 => Ok((got, seconds)),
                    _ => Err(format!("iperf3 reported no transfer: {}", json["error"])),
                }
            }
            Ok(json) => Err(format!("iperf3 client: {}", json["error"])),
            Err(_) => Err(format!(
                "iperf3 client: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
        };
        if result.is_ok() {
            break;
        }
        if let Ok(Some(status)) = server.try_wait() {
            let mut why = String::new();
            if let Some(mut e) = server.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut why);
            }
            return Err(format!(
                "the iperf3 server exited ({status}): {}",
                why.trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server exits after its one client; never wait on it forever.
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = server.kill();
            let _ = server.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (got, seconds) = result?;
    let cpu = cpu_seconds(libc::RUSAGE_CHILDREN) - before;
    Ok(Transfer {
        bits_per_second: got * 8.0 / seconds,
        cpu_per_gb: cpu / (got / 1e9),
    })
}

/// Run the suite.
pub fn run(plan: Plan, out: &mut Reporter) {
    const BYTES: usize = 1 << 30;
    let runs = Plan {
        runs: plan.runs.min(5),
        ..plan
    };
    if let Err(why) = iperf3(64 << 20, 1) {
        eprintln!("transport: SKIP: iperf3 does not work here ({why}); make deps installs it");
        return;
    }
    // A live migration of memory-like data, measured first (before the page streams
    // have churned through memory), interleaved with iperf3 on four streams.
    if out.wants("migrate/1g-effective") {
        let (mut ours, mut theirs) = (Samples::default(), Samples::default());
        for _ in 0..runs.runs.min(3) {
            let out = dwcp_tests::migrate_live(
                BYTES,
                &GuestWorkload::default(),
                DirtyLogKind::Uffd,
                &SourceConfig::default(),
                &DestConfig::default(),
            );
            let report = out.source.expect("migration");
            out.dest.expect("destination");
            // Guest bytes over the wall time from round 0 to the verified switchover.
            ours.push(report.memory_bytes as f64 * 8.0 / report.total_seconds / 1e9);
            if let Ok(t) = iperf3(BYTES as u64, 4) {
                theirs.push(t.bits_per_second / 1e9);
            }
        }
        out.emit(Comparison::new(
            "migrate/1g-effective",
            "Gbit/s",
            Better::Higher,
            &ours,
            "iperf3 -P 4 raw goodput",
            &theirs,
        ));
    }
    if out.wants("migrate/two-at-once-vs-in-turn") {
        two_at_once(runs.runs, out);
    }
    let setup = StreamSetup::new(BYTES);
    let config = TransportConfig::default();
    let probe = transport::probe(&config);
    eprintln!(
        "transport: {} ({}), {} MiB of incompressible pages per run",
        probe.kind,
        if probe.uring_ops.is_empty() {
            "no io_uring".to_string()
        } else {
            probe.uring_ops.join(" ")
        },
        BYTES >> 20
    );
    for streams in [1u16, 4] {
        let name = |what: &str| format!("transport/{what}-{streams}s");
        if !out.wants(&name("goodput")) && !out.wants(&name("cpu-per-gb")) {
            continue;
        }
        let Paired {
            ours_bps,
            ours_cpu,
            their_bps,
            their_cpu,
        } = alternate(
            runs.runs,
            || Some(page_stream(&setup, streams, &config, None)),
            || iperf3(BYTES as u64 + (BYTES as u64 >> 10), streams).ok(),
        );
        out.emit(
            Comparison::new(
                name("goodput"),
                "Gbit/s",
                Better::Higher,
                &ours_bps,
                format!("iperf3 -P {streams}"),
                &their_bps,
            )
            .with_target(0.8),
        );
        out.emit(
            Comparison::new(
                name("cpu-per-gb"),
                "CPU s/GB",
                Better::Lower,
                &ours_cpu,
                format!("iperf3 -P {streams}"),
                &their_cpu,
            )
            // ours ≤ 1.5× theirs ⇔ theirs/ours ≥ 1/1.5
            .with_target(1.0 / 1.5),
        );
    }
    if out.wants("transport/rma-tcp-provider-vs-iperf3-1s") {
        rma_against_iperf3(runs, BYTES, out);
    }
    if out.wants("transport/rma-tcp-vs-uring") || out.wants("transport/rma-tcp-cpu-per-gb-vs-uring")
    {
        rma_migrations_against_uring(runs, out);
    }
    // Zero-copy forced onto loopback, against copying sends: what zero-copy would cost
    // here (the engine turns it off for loopback peers).
    if out.wants("transport/zc-forced-vs-copy-4s") && probe.zero_copy {
        let forced = TransportConfig {
            zero_copy_on_loopback: true,
            ..config.clone()
        };
        let copy = TransportConfig {
            zero_copy: false,
            ..config.clone()
        };
        let (mut zc, mut cp) = (Samples::default(), Samples::default());
        for _ in 0..runs.runs {
            zc.push(page_stream(&setup, 4, &forced, None).bits_per_second / 1e9);
            cp.push(page_stream(&setup, 4, &copy, None).bits_per_second / 1e9);
        }
        out.emit(Comparison::new(
            "transport/zc-forced-vs-copy-4s",
            "Gbit/s",
            Better::Higher,
            &zc,
            "copying sends",
            &cp,
        ));
    }
    drop(setup);
}

/// Goodputs (Gbit/s) and CPU per GB of two sides run alternately.
struct Paired {
    ours_bps: Samples,
    ours_cpu: Samples,
    their_bps: Samples,
    their_cpu: Samples,
}

impl Paired {
    /// Emit the goodput line and the CPU-per-GB line, named `(goodput, cpu)`, against
    /// `baseline`, each with `note`.
    fn emit(&self, out: &mut Reporter, (goodput, cpu): (&str, &str), baseline: &str, note: &str) {
        out.emit(
            Comparison::new(
                goodput,
                "Gbit/s",
                Better::Higher,
                &self.ours_bps,
                baseline,
                &self.their_bps,
            )
            .with_note(note),
        );
        out.emit(
            Comparison::new(
                cpu,
                "CPU s/GB",
                Better::Lower,
                &self.ours_cpu,
                baseline,
                &self.their_cpu,
            )
            .with_note(note),
        );
    }
}

/// Run `ours` and `theirs` `runs` times each, alternating who goes first; a run that
/// yields nothing is left out.
fn alternate(
    runs: usize,
    mut ours: impl FnMut() -> Option<Transfer>,
    mut theirs: impl FnMut() -> Option<Transfer>,
) -> Paired {
    let mut paired = Paired {
        ours_bps: Samples::default(),
        ours_cpu: Samples::default(),
        their_bps: Samples::default(),
        their_cpu: Samples::default(),
    };
    for i in 0..runs {
        for ours_now in [i % 2 == 0, i % 2 != 0] {
            let (transfer, bps, cpu) = if ours_now {
                (ours(), &mut paired.ours_bps, &mut paired.ours_cpu)
            } else {
                (theirs(), &mut paired.their_bps, &mut paired.their_cpu)
            };
            if let Some(t) = transfer {
                bps.push(t.bits_per_second / 1e9);
                cpu.push(t.cpu_per_gb);
            }
        }
    }
    paired
}

/// RMA writes through libfabric's `tcp` provider on loopback (one connection, runs of
/// 16 pages from registered memory straight into the peer's registered memory, each
/// completed at delivery) against iperf3 with one stream moving the same bytes: what
/// the provider's RMA path costs over a plain TCP stream: the ceiling of the `rma`
/// transport on this machine.
fn rma_against_iperf3(plan: Plan, bytes: usize, out: &mut Reporter) {
    if tcp_provider("rma").is_none() {
        return;
    }
    let note = "libfabric tcp provider, 1 connection, fi_writemsg of 64 KiB runs with \
                FI_DELIVERY_COMPLETE from registered memory into registered memory";
    alternate(
        plan.runs,
        || {
            rma_writes(bytes)
                .map_err(|e| eprintln!("transport: rma run failed: {e}"))
                .ok()
        },
        || iperf3(bytes as u64, 1).ok(),
    )
    .emit(
        out,
        (
            "transport/rma-tcp-provider-vs-iperf3-1s",
            "transport/rma-tcp-provider-cpu-per-gb",
        ),
        "iperf3 -P 1",
        note,
    );
}

/// The RMA providers here when libfabric's `tcp` provider is among them; else `None`,
/// with the reason `what` is skipped.
fn tcp_provider(what: &str) -> Option<Vec<dwcp_dataplane::transport::fabric::ProviderInfo>> {
    match dwcp_dataplane::transport::fabric::providers() {
        Ok(list) if list.iter().any(|p| p.provider == "tcp") => Some(list),
        Ok(list) => {
            eprintln!("transport: {what}: SKIP: no tcp provider with RMA ({list:?})");
            None
        }
        Err(e) => {
            eprintln!("transport: {what}: SKIP: {e}");
            None
        }
    }
}

/// Migrations whose pages go by RMA (the `tcp` provider) against the same migrations
/// with pages as frames on io_uring streams, alternating: 256 MiB of memory-like data,
/// a guest writing 10 MB/s, 4 streams, codecs off. Goodput is guest memory over the
/// time from round 0 to the verified switchover; CPU is this process's (source and
/// destination both run in it) per GB of guest memory.
///
/// On RDMA hardware the comparison that matters is against `ib_write_bw` (perftest)
/// on the same NIC; without a provider on RDMA hardware that line is skipped here.
fn rma_migrations_against_uring(plan: Plan, out: &mut Reporter) {
    use dwcp_dataplane::transport::TransportChoice;
    const MEMORY: usize = 256 << 20;
    let Some(listed) = tcp_provider("rma migrations") else {
        return;
    };
    if listed.iter().all(|p| p.is_socket_based()) {
        eprintln!(
            "transport: rma against ib_write_bw: SKIP: no RDMA hardware here (socket-based \
             providers only: {})",
            listed
                .iter()
                .map(|p| p.provider.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let workload = GuestWorkload {
        dirty_rate: 10e6,
        ..GuestWorkload::default()
    };
    let migrate = |choice: TransportChoice| -> Option<Transfer> {
        let transport = TransportConfig {
            choice,
            ..TransportConfig::default()
        };
        let source = SourceConfig {
            streams: 4,
            transport: transport.clone(),
            ..SourceConfig::default()
        };
        let dest = DestConfig {
            transport,
            ..DestConfig::default()
        };
        let cpu = cpu_seconds(libc::RUSAGE_SELF);
        let outcome =
            dwcp_tests::migrate_live(MEMORY, &workload, DirtyLogKind::Uffd, &source, &dest);
        let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu;
        outcome.guest.stop();
        let (report, received) = match (outcome.source, outcome.dest) {
            (Ok(r), Ok(d)) => (r, d),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("transport: rma migration ({choice:?}) failed: {e}");
                return None;
            }
        };
        if choice == TransportChoice::Rma && report.transport.rma.is_none() {
            eprintln!(
                "transport: the rma migration wrote nothing by RMA: {:?}",
                report.transport.notes
            );
            return None;
        }
        if let Some(rma) = &report.transport.rma {
            eprintln!(
                "transport: rma: {} pages in {} writes, {:.3} s waiting for delivery, {} sent again",
                rma.pages, rma.writes, rma.delivery_wait_seconds, rma.pages_resent
            );
        }
        drop(received);
        let gb = report.memory_bytes as f64 / 1e9;
        Some(Transfer {
            bits_per_second: report.memory_bytes as f64 * 8.0 / report.total_seconds,
            cpu_per_gb: cpu / gb,
        })
    };
    let note = "256 MiB guest writing 10 MB/s, 4 streams, codecs off; pages by fi_write \
                through libfabric's tcp provider (RMA over sockets, no RDMA hardware) \
                against pages as frames on io_uring streams";
    alternate(
        plan.runs,
        || migrate(TransportChoice::Rma),
        || migrate(TransportChoice::IoUring),
    )
    .emit(
        out,
        (
            "transport/rma-tcp-vs-uring",
            "transport/rma-tcp-cpu-per-gb-vs-uring",
        ),
        "io_uring frames",
        note,
    );
}

/// Write `bytes` by RMA through the `tcp` provider on loopback, cycling over a 256 MiB
/// registered region into the peer's.
fn rma_writes(bytes: usize) -> Result<Transfer, String> {
    use dwcp_dataplane::transport::fabric::{Connection, Listener, RmaWrite};
    use std::sync::atomic::{AtomicBool, Ordering};
    const REGION: usize = 256 << 20;
    const RUN: usize = 16 * 4096;
    /// Writes in flight at most (the provider's queue takes more; this keeps
    /// completions flowing).
    const WINDOW: u64 = 256;
    let patience = Duration::from_secs(20);
    let e = |e: dwcp_dataplane::transport::fabric::FabricError| e.to_string();
    let listener = Listener::bind("tcp", "127.0.0.1:0".parse().expect("an address")).map_err(e)?;
    let addr = listener.local_addr();
    let accepting = std::thread::spawn(move || listener.accept(patience));
    let writer = Connection::connect("tcp", addr, patience).map_err(e)?;
    let target = accepting
        .join()
        .map_err(|_| "the accepting thread panicked".to_string())?
        .map_err(e)?;
    let mut source = vec![0x5au8; REGION];
    let mut dest = vec![0u8; REGION];
    // SAFETY: both buffers outlive their regions (dropped after them, below) and are
    // not touched while writes run.
    let local = unsafe { writer.register(source.as_mut_ptr(), REGION) }.map_err(e)?;
    // SAFETY: as above.
    let region = unsafe { target.register(dest.as_mut_ptr(), REGION) }.map_err(e)?;
    let remote = region.remote();
    let done = Arc::new(AtomicBool::new(false));
    let progressing = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            // Acquire: pairs with the Release below, once every write completed.
            while !done.load(Ordering::Acquire) {
                if target.completions(&mut seen).is_err() {
                    break;
                }
                seen.clear();
            }
            target
        })
    };
    let cpu_before = cpu_seconds(libc::RUSAGE_SELF);
    let started = Instant::now();
    let runs = (bytes / RUN) as u64;
    let mut completed = Vec::new();
    let mut done_count = 0u64;
    let mut result = Ok(());
    for n in 0..runs {
        while n - done_count >= WINDOW {
            if let Err(err) = writer.completions(&mut completed) {
                result = Err(e(err));
                break;
            }
            done_count += completed.len() as u64;
            completed.clear();
        }
        if result.is_err() {
            break;
        }
        let offset = (n as usize * RUN % REGION) as u64;
        let write = RmaWrite {
            offset,
            len: RUN as u64,
            remote_offset: offset,
            context: n,
        };
        if let Err(err) = writer.write(&local, &remote, write, &mut completed) {
            result = Err(e(err));
            break;
        }
    }
    let deadline = Instant::now() + patience;
    while result.is_ok() && done_count + (completed.len() as u64) < runs {
        if let Err(err) = writer.completions(&mut completed) {
            result = Err(e(err));
        }
        if Instant::now() > deadline {
            result = Err("writes did not complete".into());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu_before;
    // Release: pairs with the progress thread's Acquire.
    done.store(true, Ordering::Release);
    let _target = progressing.join();
    drop(region);
    drop(local);
    result?;
    if dest[..RUN] != source[..RUN] {
        return Err("the first run did not land".into());
    }
    let moved = (runs as usize * RUN) as f64;
    Ok(Transfer {
        bits_per_second: moved * 8.0 / seconds,
        cpu_per_gb: cpu / (moved / 1e9),
    })
}
