//! The appliance cluster's storage: what making one raft entry durable costs in our log
//! (append the entry, record the commit, fdatasync) against the floor any durable log
//! pays on this disk (write the same bytes to a file, fdatasync).
//!
//! The log keeps its file beside the bench's other scratch data (`target/`), on the
//! disk an appliance's state directory would be on; `/tmp` may be memory.

use crate::measure::Plan;
use crate::report::{Better, Reporter, Spec};
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
    dir
}

/// `cluster/log-commit-vs-fdatasync`.
pub fn run(plan: Plan, out: &mut Reporter) {
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
