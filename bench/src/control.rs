//! The `control` suite: what the operator's side of a daemon costs its fast path.
//!
//! A daemon migrates its simulated guest (1 GiB, a light writer) to itself over
//! loopback, the way the control tests run it, while clients use its control socket;
//! the figure is the migration's own elapsed time (as `migrations` reports it, frozen
//! at the end), against the same migration with no client connected, runs alternating.
//!
//! - `control/migration-beside-watchers`: 256 clients connected throughout, each asking
//!   once a second in turn for `status`, `migrations` and `metrics` — a fleet's worth of
//!   `dwcpctl watch` and scrapers — against the same client threads and connections
//!   waking on the same schedule without asking. On two cores any thread that wakes
//!   lengthens a loopback migration whose source and destination share them; this
//!   baseline leaves that in on both sides, so the ratio is the daemon's own cost of
//!   answering. The line also carries the time with no clients at all.
//! - `control/migration-beside-flood`: 4 clients sending as fast as they are answered
//!   (garbage, unknown commands and valid requests alike) and one connecting and
//!   hanging up in a loop, against no clients. The flooding clients take a core
//!   themselves; the line carries the requests answered per second and the CPU seconds
//!   of the daemon's socket and control threads, so a reader can tell their cost from
//!   the clients'.
//!
//! On this kind of machine a 1 GiB loopback migration takes either about 1.4 s or
//! about 2.4 s, with the same bytes, rounds and downtime, whether or not any client is
//! connected, and the slow runs cluster by their place in the sequence of daemons.
//! Conditions therefore rotate through the order, and a ratio should be read with its
//! `min`/`max`; `control_cpu_s` (the daemon's socket and control threads) is the
//! steadier measure of what answering costs.

use crate::measure::Samples;
use crate::report::{Better, Comparison, Reporter};
use dwcp_api::{Command, MigrateOptions, MigrationInfo};
use dwcp_control::config::{Config, Size};
use dwcp_control::daemon::{Daemon, DaemonOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Runs of each condition, alternating, after one warm-up migration (a process's first
/// migration runs on memory nothing has touched and takes several times as long).
const RUNS: usize = 7;
const GUEST_BYTES: u64 = 1 << 30;
const WATCHERS: usize = 256;
/// Threads that carry the watchers' connections between them.
const WATCHER_THREADS: usize = 8;
const FLOODERS: usize = 4;

/// Who uses the control socket while the migration runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clients {
    None,
    /// The watchers' threads and connections on the same schedule, never asking: the
    /// machine's share of their wake-ups without the daemon's share of answering.
    IdleWatchers,
    Watchers,
    Flood,
}

/// One migration's figures.
#[derive(Clone, Copy, Debug)]
struct Run {
    seconds: f64,
    answered: u64,
    /// CPU seconds of the daemon's socket and control threads over the run.
    control_cpu: f64,
}

/// Runs of one condition.
#[derive(Default)]
struct Runs {
    seconds: Samples,
    control_cpu: Samples,
    answered: u64,
    total_seconds: f64,
}

impl Runs {
    fn push(&mut self, run: Run) {
        self.seconds.push(run.seconds);
        self.control_cpu.push(run.control_cpu);
        self.answered += run.answered;
        self.total_seconds += run.seconds;
    }

    fn requests_per_second(&self) -> f64 {
        (self.answered as f64 / self.total_seconds).round()
    }
}

pub fn run(out: &mut Reporter) {
    const WATCHERS_LINE: &str = "control/migration-beside-watchers";
    const FLOOD_LINE: &str = "control/migration-beside-flood";
    let mut conditions = vec![Clients::None];
    if out.wants(WATCHERS_LINE) {
        conditions.extend([Clients::IdleWatchers, Clients::Watchers]);
    }
    if out.wants(FLOOD_LINE) {
        conditions.push(Clients::Flood);
    }
    if conditions.len() == 1 {
        return;
    }
    if let Err(e) = migrate(Clients::None) {
        eprintln!("control skipped: {e}");
        return;
    }
    let mut runs: Vec<Runs> = conditions.iter().map(|_| Runs::default()).collect();
    for iteration in 0..RUNS {
        // Each condition takes each place in the order in turn: a run's place among
        // its neighbours moves its time (see the module's notes).
        for offset in 0..conditions.len() {
            let index = (iteration + offset) % conditions.len();
            let (clients, runs) = (&conditions[index], &mut runs[index]);
            match migrate(*clients) {
                Ok(run) => {
                    eprintln!(
                        "control: {clients:?}: {:.3} s, {} answers, {:.3} CPU s on the socket and control threads",
                        run.seconds, run.answered, run.control_cpu
                    );
                    runs.push(run);
                }
                Err(e) => {
                    eprintln!("control skipped: {clients:?}: {e}");
                    return;
                }
            }
        }
    }
    let of = |wanted: Clients| {
        let index = conditions.iter().position(|c| *c == wanted)?;
        Some(&runs[index])
    };
    let alone = of(Clients::None).expect("always measured");
    if let (Some(idle), Some(asking)) = (of(Clients::IdleWatchers), of(Clients::Watchers)) {
        let line = Comparison::new(
            WATCHERS_LINE,
            "s",
            Better::Lower,
            &asking.seconds,
            "same-clients-not-asking",
            &idle.seconds,
        )
        .with_field("no_clients_s", round3(alone.seconds.median()))
        .with_field("requests_per_s", asking.requests_per_second())
        .with_field("control_cpu_s", round3(asking.control_cpu.median()))
        .with_note(format!(
            "1 GiB guest migrated over loopback to the same daemon; {WATCHERS} clients on {WATCHER_THREADS} threads each asking once a second in turn for status, migrations and metrics, against the same threads and connections waking on the same schedule without asking"
        ));
        out.emit(line);
    }
    if let Some(flood) = of(Clients::Flood) {
        let line = Comparison::new(
            FLOOD_LINE,
            "s",
            Better::Lower,
            &flood.seconds,
            "no-clients",
            &alone.seconds,
        )
        .with_field("requests_per_s", flood.requests_per_second())
        .with_field("control_cpu_s", round3(flood.control_cpu.median()))
        .with_note(format!(
            "1 GiB guest migrated over loopback to the same daemon; {FLOODERS} clients asking as fast as answered and one reconnecting, all on the same two cores"
        ));
        out.emit(line);
    }
}

/// Starts a daemon, migrates its guest to itself with `clients` on the socket, and
/// returns the migration's figures.
fn migrate(clients: Clients) -> Result<Run, String> {
    let dir = std::env::temp_dir().join(format!("dwcp-bench-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut config = Config::default();
    config.dest.listen = "127.0.0.1:0".into();
    config.control.socket = dir.join("dwcpd.sock");
    config.guest.memory = Size(GUEST_BYTES);
    config.guest.dirty_rate_mbps = 10.0;
    dwcp_tests::secure(&mut config, 0);
    config
        .validate()
        .map_err(|problems| format!("bench configuration: {problems}"))?;
    let daemon = Daemon::start(DaemonOptions { config })?;
    let stop = AtomicBool::new(false);
    let answered = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        match clients {
            Clients::None => {}
            Clients::IdleWatchers | Clients::Watchers => {
                let asking = clients == Clients::Watchers;
                for _ in 0..WATCHER_THREADS {
                    let (daemon, stop, answered) = (&daemon, &stop, &answered);
                    scope.spawn(move || watch(&daemon.socket, asking, stop, answered));
                }
            }
            Clients::Flood => {
                for _ in 0..FLOODERS {
                    scope.spawn(|| flood(&daemon.socket, &stop, &answered));
                }
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        drop(UnixStream::connect(&daemon.socket));
                    }
                });
            }
        }
        // Clients settle on the socket before the migration starts (every condition
        // waits alike).
        std::thread::sleep(Duration::from_millis(500));
        let cpu_before = control_threads_cpu();
        let result = migrate_to_self(&daemon);
        let cpu = control_threads_cpu() - cpu_before;
        stop.store(true, Ordering::Relaxed);
        result.map(|seconds| (seconds, cpu))
    });
    daemon.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let (seconds, control_cpu) = result?;
    Ok(Run {
        seconds,
        answered: answered.load(Ordering::Relaxed),
        control_cpu,
    })
}

/// Runs one migration to the daemon's own listener to completion; its elapsed seconds.
fn migrate_to_self(daemon: &Daemon) -> Result<f64, String> {
    daemon
        .call(Command::Migrate(MigrateOptions {
            peer: daemon.listen_addr.to_string(),
            ..MigrateOptions::default()
        }))
        .into_result::<dwcp_api::Done>()
        .map_err(|e| format!("migrate: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let migrations: Vec<MigrationInfo> = daemon
            .call(Command::Migrations)
            .into_result()
            .map_err(|e| format!("migrations: {e}"))?;
        let migration = migrations.last().ok_or("no migration listed")?;
        match migration.state.as_str() {
            "running" => {}
            "completed" if migration.verified_pages == Some(GUEST_BYTES / 4096) => {
                return Ok(migration.elapsed_seconds);
            }
            _ => return Err(format!("the migration ended {migration:?}")),
        }
        if Instant::now() > deadline {
            return Err("the migration took over 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `request` and reads its answer line.
fn ask(connection: &mut BufReader<UnixStream>, request: &[u8]) -> std::io::Result<()> {
    connection.get_mut().write_all(request)?;
    let mut answer = String::new();
    connection.read_line(&mut answer)?;
    Ok(())
}

/// This thread's share of the watchers: each of its connections asks once a second
/// (or, not `asking`, the thread wakes as if it did).
fn watch(socket: &Path, asking: bool, stop: &AtomicBool, answered: &AtomicU64) {
    let requests: [&[u8]; 3] = [
        b"{\"v\":1,\"cmd\":\"status\"}\n",
        b"{\"v\":1,\"cmd\":\"migrations\"}\n",
        b"{\"v\":1,\"cmd\":\"metrics\"}\n",
    ];
    let mut connections: Vec<BufReader<UnixStream>> = (0..WATCHERS / WATCHER_THREADS)
        .filter_map(|_| UnixStream::connect(socket).ok().map(BufReader::new))
        .collect();
    let pause = Duration::from_secs(1) / connections.len().max(1) as u32;
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        for connection in &mut connections {
            if asking && ask(connection, requests[turn % requests.len()]).is_ok() {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(pause);
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
        turn += 1;
    }
}

/// One client asking as fast as it is answered.
fn flood(socket: &Path, stop: &AtomicBool, answered: &AtomicU64) {
    let Ok(stream) = UnixStream::connect(socket) else {
        return;
    };
    let mut connection = BufReader::new(stream);
    let requests: [&[u8]; 4] = [
        b"{garbage\n",
        b"{\"v\":1,\"cmd\":\"explode\"}\n",
        b"{\"v\":1,\"cmd\":\"status\"}\n",
        b"{\"v\":1,\"cmd\":\"metrics\"}\n",
    ];
    while !stop.load(Ordering::Relaxed) {
        for request in requests {
            if ask(&mut connection, request).is_err() {
                return;
            }
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// CPU seconds (user and system) this process's `dwcp-socket` and `dwcp-control`
/// threads have used so far.
fn control_threads_cpu() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !matches!(name.trim(), "dwcp-socket" | "dwcp-control") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is the 3rd, utime the 14th and
        // stime the 15th of the whole line.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        for index in [11, 12] {
            ticks += fields.get(index).and_then(|f| f.parse().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / ticks_per_second
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
