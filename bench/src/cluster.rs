//! The appliance cluster's storage: what making one raft entry durable costs in our log
//! (append the entry, record the commit, fdatasync) against the floor any durable log
//! pays on this disk (write the same bytes to a file, fdatasync).
//!
//! The log keeps its file beside the bench's other scratch data (`target/`), on the
//! disk an appliance's state directory would be on; `/tmp` may be memory.

use crate::measure::Plan;
use crate::report::{Better, Reporter, Spec};
use crate::transport::free_port;
use dwcp_control::cluster::{Durability, DurableLog};
use raft::prelude::{Entry, HardState};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Commits per sample: enough that one slow sync does not make the sample.
const COMMITS: u64 = 40;
/// The size of an entry's command (a flag change or a migration record is 100-300
/// bytes of JSON).
const ENTRY_BYTES: usize = 200;

fn scratch(tag: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = base.join(format!("bench-cluster-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the bench's scratch directory");
    // Absolute: a daemon's control socket must be.
    std::fs::canonicalize(&dir).expect("the bench's scratch directory")
}

/// `cluster/log-commit-vs-fdatasync`.
pub fn run(plan: Plan, out: &mut Reporter) {
    if !out.wants("cluster/log-commit-vs-fdatasync") {
        return;
    }
    let ours_dir = scratch("log");
    let floor_dir = scratch("floor");
    let mut log = DurableLog::open(&ours_dir, Durability::Fsync).expect("the raft log opens");
    let mut floor = std::fs::File::create(floor_dir.join("floor.bin")).expect("the floor file");
    let mut index = 0u64;
    let record = vec![7u8; ENTRY_BYTES + 30];
    let runs = plan.runs.max(5);
    out.compare(
        Plan { runs, ..plan },
        Spec {
            bench: "cluster/log-commit-vs-fdatasync",
            unit: "us",
            better: Better::Lower,
            baseline: "write + fdatasync of the same bytes",
            target: Some(0.8),
        },
        || {
            let start = Instant::now();
            for _ in 0..COMMITS {
                index += 1;
                let entry = Entry {
                    index,
                    term: 1,
                    data: vec![1u8; ENTRY_BYTES].into(),
                    ..Default::default()
                };
                log.append(&[entry]).expect("append");
                log.set_hard_state(&HardState {
                    term: 1,
                    vote: 1,
                    commit: index,
                    ..Default::default()
                })
                .expect("hard state");
                log.sync().expect("sync");
            }
            start.elapsed().as_secs_f64() * 1e6 / COMMITS as f64
        },
        || {
            let start = Instant::now();
            for _ in 0..COMMITS {
                floor.write_all(&record).expect("write");
                floor.sync_data().expect("fdatasync");
            }
            start.elapsed().as_secs_f64() * 1e6 / COMMITS as f64
        },
    );
    eprintln!(
        "cluster: {} syncs of the raft log, {:.3} ms each on average; its file {} bytes",
        log.syncs,
        log.sync_seconds * 1e3 / log.syncs.max(1) as f64,
        log.file_bytes()
    );
    drop(log);
    let _ = std::fs::remove_dir_all(&ours_dir);
    let _ = std::fs::remove_dir_all(&floor_dir);
}

/// Where the budget bench's appliances run: the site's cluster (a, b and an idle third
/// member e) on the source side, the destinations (c, d) on the other; through
/// `wanem`'s cross-region path when the bench may run it (root), else all on loopback.
struct Placement {
    /// The emulator, whose namespaces hold the two sides.
    emulator: Option<wanem::Emulator>,
    /// The address the destinations listen at.
    destination: std::net::IpAddr,
}

impl Placement {
    fn new() -> Placement {
        use wanem::scenario::Scenario;
        use wanem::{Emulator, EmulatorConfig};
        let scenario = Scenario::built_in("cross-region").expect("a shipped scenario");
        let name = format!("dwb{}", std::process::id() % 100_000);
        match Emulator::start(EmulatorConfig::new(&name, scenario)) {
            Ok(emulator) => Placement {
                destination: emulator.destination_address().into(),
                emulator: Some(emulator),
            },
            Err(e) => {
                eprintln!("cluster/budget-held: on loopback, not through wanem ({e})");
                Placement {
                    emulator: None,
                    destination: std::net::Ipv4Addr::LOCALHOST.into(),
                }
            }
        }
    }

    /// A daemon of `config` on the source side (`source`) or the destination side: its
    /// threads, started from a thread inside that side's namespace, live there too.
    fn start(
        &self,
        source: bool,
        config: dwcp_control::config::Config,
    ) -> Result<dwcp_control::daemon::Daemon, String> {
        use dwcp_control::daemon::{Daemon, DaemonOptions};
        let Some(emulator) = &self.emulator else {
            return Daemon::start(DaemonOptions { config });
        };
        let namespace = if source {
            emulator.source_namespace()
        } else {
            emulator.destination_namespace()
        };
        wanem::netns::run_in(&namespace, || {
            Daemon::start(DaemonOptions { config }).map_err(std::io::Error::other)
        })
        .map_err(|e| e.to_string())
    }
}

/// `cluster/budget-held`: a three-appliance cluster, two of whose members migrate at
/// once (a → c, b → d) through one cross-region path under an 800 Mbit/s site budget.
/// Their summed send rate, in sliding 1 s windows while both run, against the budget;
/// and how long after the first one ends the other's share (its pacing cap) rises.
///
/// Twice: at the 800 Mbit/s, which two migrations through the emulator on two
/// cores may not reach (then the path holds the sum, not the budget); and at 400 Mbit/s,
/// which they do reach, so the budget is what holds them.
pub fn budget(out: &mut Reporter) {
    let runs = [
        ("cluster/budget-held", 800_000_000),
        ("cluster/budget-held-400mbit", 400_000_000),
    ];
    if !runs.iter().any(|(bench, _)| out.wants(bench)) {
        return;
    }
    let placement = Placement::new();
    for (bench, budget) in runs {
        if !out.wants(bench) {
            continue;
        }
        match budget_run(&placement, bench, budget) {
            Ok(c) => out.emit(c),
            Err(e) => eprintln!("{bench}: {e}"),
        }
    }
}

fn budget_run(
    placement: &Placement,
    bench: &'static str,
    budget: u64,
) -> Result<crate::report::Comparison, String> {
    use dwcp_api::{ClusterInfo, Command, MigrateOptions, MigrationInfo};
    use dwcp_control::config::Config;
    use dwcp_control::daemon::Daemon;
    use std::time::Duration;

    let base = scratch("budget");
    // Ports: on loopback free ones; in the emulator's namespaces every port is free.
    let raft: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let dest: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let members: String = raft
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{} = \"127.0.0.1:{p}\"\n", i + 1))
        .collect();
    // Many streams and BBR, as internet mode runs a long path.
    let transport = "[transport]\ncongestion = \"bbr\"\n[migration]\nstreams = 8\n";
    let config = |text: String| -> Result<Config, String> {
        let config = Config::parse(&text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    };
    // a, b, e: the site's cluster.
    let mut daemons = Vec::new();
    for (i, name) in ["a", "b", "e"].iter().enumerate() {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let text = format!(
            "[control]\nsocket = {:?}\nstate_dir = {:?}\n[dest]\nlisten = \"127.0.0.1:{}\"\n\
             [security]\ninsecure = true\n{transport}[cluster]\nid = {}\n\
             listen = \"127.0.0.1:{}\"\n[cluster.members]\n{members}",
            dir.join("ctl.sock").display().to_string(),
            dir.join("state").display().to_string(),
            free_port(),
            i + 1,
            raft[i]
        );
        daemons.push(placement.start(true, config(text)?)?);
    }
    // c, d: the destinations, across the path.
    let mut destinations = Vec::new();
    for (i, name) in ["c", "d"].iter().enumerate() {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let text = format!(
            "[control]\nsocket = {:?}\n[dest]\nlisten = \"{}:{}\"\n[security]\ninsecure = true\n\
             {transport}",
            dir.join("ctl.sock").display().to_string(),
            placement.destination,
            dest[i],
        );
        destinations.push(placement.start(false, config(text)?)?);
    }
    let status = |d: &Daemon| -> Result<ClusterInfo, String> {
        d.call(Command::ClusterStatus).into_result()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemons
        .iter()
        .all(|d| status(d).is_ok_and(|s| s.leader != 0))
    {
        if Instant::now() > deadline {
            return Err("the cluster elected no leader in 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = daemons[0].call(Command::ClusterBudget {
        bits_per_second: Some(budget),
    });
    if !answer.ok {
        return Err(format!("setting the budget: {:?}", answer.error));
    }
    // a → c, 256 MiB due within A_DEADLINE; b → d, 2 GiB, no deadline. Shares follow
    // bytes left, which alone would hold a back to a fifth of what is left after the
    // floors: its deadline gets it what it needs first. When a completes, b should
    // have the whole budget. b starts first, and a once b sends (a 2 GiB guest takes
    // seconds to fill), so that the two overlap.
    const A_DEADLINE: u64 = 15;
    let mut ids = [0u64; 2];
    for (from, to, memory, deadline) in [(1, 1, "2G", None), (0, 0, "256M", Some(A_DEADLINE))] {
        let done: dwcp_api::Done = daemons[from]
            .call(Command::Migrate(MigrateOptions {
                peer: format!("{}:{}", placement.destination, dest[to]),
                memory: Some(memory.into()),
                dirty_rate_mbps: Some(2.0),
                // The link's share is the subject, not the codec's.
                codec: Some("off".into()),
                // Every round trip of the final exchange is downtime: 80 ms each.
                downtime_ms: Some(2000),
                deadline_s: deadline,
                ..MigrateOptions::default()
            }))
            .into_result()?;
        ids[from] = done.id.ok_or("no migration id")?;
        if from == 1 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !daemons[1]
                .call(Command::Migrations)
                .into_result::<Vec<MigrationInfo>>()
                .is_ok_and(|all| all.iter().any(|m| m.bytes_sent > 0))
            {
                if Instant::now() > deadline {
                    return Err("b sent nothing in 30 s".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let info = |i: usize| -> Option<MigrationInfo> {
        let all: Vec<MigrationInfo> = daemons[i].call(Command::Migrations).into_result().ok()?;
        all.into_iter()
            .find(|m| m.id == ids[i] && m.direction == "outgoing")
    };
    let cap = |m: &MigrationInfo| {
        m.settings
            .iter()
            .find(|s| s.name == "pacing-rate")
            .map(|s| (s.value.clone(), s.source.clone()))
    };
    // Polled every 100 ms; rates over the last ten polls (a sliding 1 s window), and over
    // the last five (0.5 s: progress reports come in steps, so shorter windows show
    // their timing more than the rate).
    let poll = Duration::from_millis(100);
    let mut history: Vec<(Instant, [u64; 2])> = Vec::new();
    let mut sums = Vec::new();
    let mut half_second_max: f64 = 0.0;
    let mut a_ended: Option<Instant> = None;
    let mut both_sending: Option<Instant> = None;
    let mut a_last: Option<MigrationInfo> = None;
    let mut b_alone = Vec::new();
    let mut b_cap_before = None;
    let mut rise = None;
    let start = Instant::now();
    let mut printed = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(poll);
        let (Some(a), Some(b)) = (info(0), info(1)) else {
            return Err("a migration went missing".into());
        };
        let now = Instant::now();
        history.push((now, [a.bytes_sent, b.bytes_sent]));
        let over = |polls: usize| {
            (history.len() > polls).then(|| {
                let (then, before) = history[history.len() - 1 - polls];
                let seconds = now.duration_since(then).as_secs_f64();
                [
                    (a.bytes_sent - before[0]) as f64 * 8.0 / seconds,
                    (b.bytes_sent - before[1]) as f64 * 8.0 / seconds,
                ]
            })
        };
        if let Some(half) = over(5)
            && a.state == "running"
            && b.state == "running"
            && half[0] > 0.0
            && half[1] > 0.0
        {
            half_second_max = half_second_max.max(half[0] + half[1]);
        }
        let rates = over(10);
        if let Some(rates) = rates {
            if printed.elapsed() >= Duration::from_millis(500) {
                printed = Instant::now();
                eprintln!(
                    "  {:>5.1} s  a {:<9} {:>6.1} Mbit/s  b {:<9} {:>6.1} Mbit/s  (b paced at {})",
                    start.elapsed().as_secs_f64(),
                    a.state,
                    rates[0] / 1e6,
                    b.state,
                    rates[1] / 1e6,
                    cap(&b).map_or("-".into(), |c| format!("{} from {}", c.0, c.1))
                );
            }
            // b alone, a full window after a ended.
            if b.state == "running"
                && a_ended.is_some_and(|t| now.duration_since(t) > Duration::from_millis(1100))
            {
                b_alone.push(rates[1]);
            }
            // Both running and sending (a guest fills its memory before it sends).
            if a.state == "running" && b.state == "running" && rates[0] > 0.0 && rates[1] > 0.0 {
                sums.push(rates[0] + rates[1]);
                both_sending.get_or_insert(now);
            }
        }
        if a.state == "running" {
            b_cap_before = cap(&b);
        } else if a_ended.is_none() {
            a_ended = Some(now);
        }
        a_last = Some(a);
        if let Some(ended) = a_ended
            && rise.is_none()
            && b.state == "running"
            && cap(&b) != b_cap_before
        {
            rise = Some(now.duration_since(ended).as_secs_f64() + poll.as_secs_f64());
        }
        if b.state != "running" {
            break;
        }
    }
    for d in daemons.into_iter().chain(destinations) {
        d.stop();
    }
    let _ = std::fs::remove_dir_all(&base);
    if sums.len() < 3 {
        return Err(format!(
            "only {} windows with both migrations running",
            sums.len()
        ));
    }
    sums.sort_by(f64::total_cmp);
    let max = sums[sums.len() - 1];
    let median = sums[sums.len() / 2];
    let mbit = |x: f64| (x / 1e5).round() / 10.0;
    // Held means no window over the budget: ours is the busiest window.
    let mut ours = crate::measure::Samples::default();
    ours.push(mbit(max));
    let mut theirs = crate::measure::Samples::default();
    theirs.push(budget as f64 / 1e6);
    Ok(crate::report::Comparison::new(
        bench,
        "Mbit/s",
        Better::Lower,
        &ours,
        "the site's WAN budget",
        &theirs,
    )
    .with_target(1.0 / 1.05)
    .with_field("windows_both_sending", sums.len())
    .with_field("median_sum_mbit", mbit(median))
    .with_field("max_sum_half_second_mbit", mbit(half_second_max))
    // From the poll that saw a end to the one that saw b's cap rise: within a poll
    // (100 ms) of the truth, late rather than early.
    .with_field("share_rise_seconds", rise.map(|r| (r * 100.0).round() / 100.0))
    .with_field("b_cap_before", b_cap_before.map(|c| c.0))
    .with_field("a_state", a_last.as_ref().map(|a| a.state.clone()))
    .with_field(
        "a_seconds",
        a_last
            .as_ref()
            .map(|a| (a.elapsed_seconds * 10.0).round() / 10.0),
    )
    .with_field("a_deadline_seconds", A_DEADLINE)
    .with_field("b_alone_median_mbit", {
        b_alone.sort_by(f64::total_cmp);
        b_alone.get(b_alone.len() / 2).map(|r| mbit(*r))
    })
    .with_field(
        "path",
        if placement.emulator.is_some() {
            "wanem cross-region (80 ms RTT, 1 Gbit/s, 0.01% loss)"
        } else {
            "loopback (wanem needs root)"
        },
    )
    .with_note(
        "a cluster of 3 appliances (a, b, e) on one side, destinations c and d on the other; a→c (256 MiB, due in 15 s) and b→d (2 GiB, started first) at once, 8 streams, BBR, codec off, 2 s downtime limit; share_rise_seconds: from a's completion to b's cap rising; ours: the busiest 1 s window of both (sliding, polled every 100 ms)",
    ))
}
