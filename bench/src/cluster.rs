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

/// `cluster/budget-held`: four appliances in one cluster on loopback, two migrations
/// (a → c, b → d) under an 800 Mbit/s site budget. Their summed send rate, in half-second
/// windows while both run, against the budget; and how long after the first one ends
/// the other's share (its pacing cap) rises.
pub fn budget(out: &mut Reporter) {
    const BENCH: &str = "cluster/budget-held";
    if !out.wants(BENCH) {
        return;
    }
    match budget_run() {
        Ok(c) => out.emit(c),
        Err(e) => eprintln!("{BENCH}: {e}"),
    }
}

fn budget_run() -> Result<crate::report::Comparison, String> {
    use dwcp_api::{ClusterInfo, Command, MigrateOptions, MigrationInfo};
    use dwcp_control::config::Config;
    use dwcp_control::daemon::{Daemon, DaemonOptions};
    use std::time::Duration;

    const BUDGET: u64 = 800_000_000;
    let base = scratch("budget");
    let raft: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let dest: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let members: String = raft
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{} = \"127.0.0.1:{p}\"\n", i + 1))
        .collect();
    let mut daemons = Vec::new();
    for i in 0..4 {
        let dir = base.join(format!("appliance-{}", i + 1));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let text = format!(
            "[control]\nsocket = {:?}\nstate_dir = {:?}\n[dest]\nlisten = \"127.0.0.1:{}\"\n\
             [security]\ninsecure = true\n[cluster]\nid = {}\nlisten = \"127.0.0.1:{}\"\n\
             [cluster.members]\n{members}",
            dir.join("ctl.sock").display().to_string(),
            dir.join("state").display().to_string(),
            dest[i],
            i + 1,
            raft[i]
        );
        let config = Config::parse(&text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        daemons.push(Daemon::start(DaemonOptions { config })?);
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
        bits_per_second: Some(BUDGET),
    });
    if !answer.ok {
        return Err(format!("setting the budget: {:?}", answer.error));
    }
    // a → c and b → d, 1 GiB each. Shares follow the bytes left, so two alike would end
    // together: a is cancelled 2 s after both send, and b should get the whole budget.
    let mut ids = Vec::new();
    for (from, to, memory) in [(0, 2, "1G"), (1, 3, "1G")] {
        let done: dwcp_api::Done = daemons[from]
            .call(Command::Migrate(MigrateOptions {
                peer: format!("127.0.0.1:{}", dest[to]),
                memory: Some(memory.into()),
                dirty_rate_mbps: Some(2.0),
                ..MigrateOptions::default()
            }))
            .into_result()?;
        ids.push(done.id.ok_or("no migration id")?);
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
    let mut a_cancelled = false;
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
        if !a_cancelled && both_sending.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
            a_cancelled = true;
            let _ = daemons[0].call(Command::Cancel { id: ids[0] });
        }
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
    for d in daemons {
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
    theirs.push(BUDGET as f64 / 1e6);
    Ok(crate::report::Comparison::new(
        "cluster/budget-held",
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
    .with_field("b_alone_median_mbit", {
        b_alone.sort_by(f64::total_cmp);
        b_alone.get(b_alone.len() / 2).map(|r| mbit(*r))
    })
    .with_note(
        "4 appliances on loopback, a→c and b→d at once, 1 GiB each, a cancelled 2 s into both sending; ours: the busiest 1 s window of both (sliding, polled every 100 ms)",
    ))
}
