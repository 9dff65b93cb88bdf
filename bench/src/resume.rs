//! The `resume` suite: what a failure mid-migration costs, through `wanem`'s
//! cross-region path (needs root for the emulator's namespaces, else skipped with the
//! reason). A live migration of 256 MiB each run, alternating:
//!
//! - `resume/outage-overhead`: with the whole path out for 5 s once round 0 has moved
//!   half of memory, against the same migration without the outage plus 5 s (target ≥
//!   0.9: the outage costs little beyond itself). Today the streams wait the outage out
//!   on their TCP connections (see `dataplane/src/engine/source/loss.rs`); what TCP's
//!   backed-off retransmission timers add after the path is back is the overhead.
//! - `resume/vs-restart`: the same outage, against starting over once the path is back
//!   (the time to the outage, the outage, then the whole migration again, with no
//!   setup counted twice).
//!
//! The report lines carry the pages queued again (streams given up after the outage)
//! as a fraction of memory: `resume/resent-fraction`.

use crate::measure::{Plan, Samples};
use crate::report::{Better, Comparison, Reporter};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wanem::scenario::Scenario;
use wanem::{Emulator, EmulatorConfig};

const GUEST: usize = 256 << 20;
const OUTAGE: Duration = Duration::from_secs(5);

/// One migration across `emulator`, with the path out for [`OUTAGE`] once round 0 has
/// moved half of memory when `outage`: its seconds, when the outage began (seconds
/// into the migration), and the pages queued again.
fn migrate(
    emulator: &Emulator,
    memory: &Arc<GuestMemory>,
    workload: &GuestWorkload,
    outage: bool,
) -> Result<(f64, Option<f64>, u64), String> {
    let (mut source, dest) = dwcp_tests::wan::internet_profile();
    source.streams = 8;
    let settings = dwcp_tests::wan::live_settings(&source);
    let mut began = None;
    let started = Instant::now();
    let (out, seconds) = dwcp_tests::wan::migrate_across_driven(
        emulator,
        memory.clone(),
        workload,
        &source,
        &dest,
        settings,
        |_live, reports| {
            while let Ok(r) = reports.recv_timeout(Duration::from_secs(3)) {
                let p = &r.progress;
                if outage && began.is_none() && p.round == 0 && p.pages_sent * 2 >= p.memory_pages {
                    began = Some(started.elapsed().as_secs_f64());
                    dwcp_tests::wan::path_out_for(emulator, OUTAGE);
                }
            }
        },
    );
    out.guest.stop();
    let report = out.source.map_err(|e| e.to_string())?;
    out.dest.map_err(|e| e.to_string())?;
    if outage && began.is_none() {
        return Err("the migration ended before the outage was due".into());
    }
    let requeued = report
        .transport
        .streams_lost
        .iter()
        .map(|l| l.pages_requeued)
        .sum();
    Ok((seconds, began, requeued))
}

/// Run the suite.
pub fn run(plan: Plan, out: &mut Reporter) {
    if !out.wants("resume/outage-overhead") && !out.wants("resume/vs-restart") {
        return;
    }
    let scenario = Scenario::built_in("cross-region").expect("a shipped scenario");
    let emulator = match Emulator::start(EmulatorConfig::new("dwcpres", scenario)) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("resume: SKIP: {e}");
            return;
        }
    };
    let memory =
        Arc::new(GuestMemory::anonymous(GUEST, PagePreference::TransparentHuge).expect("memory"));
    let workload = GuestWorkload {
        dirty_rate: 4e6,
        working_set: 0.1,
        vcpus: 1,
        ..GuestWorkload::default()
    };
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
    let runs = plan.runs.clamp(1, 5);
    let (mut with_outage, mut plus_outage, mut restart) =
        (Samples::default(), Samples::default(), Samples::default());
    let (mut clean, mut resent) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternate which goes first: the machine's state drifts over a run.
        for outage in [i % 2 == 0, i % 2 != 0] {
            match migrate(&emulator, &memory, &workload, outage) {
                Ok((seconds, Some(began), requeued)) => {
                    with_outage.push(seconds);
                    resent.push(requeued as f64 / (GUEST / 4096) as f64);
                    eprintln!(
                        "resume: with a {OUTAGE:?} outage from {began:.2} s: {seconds:.2} s, {requeued} pages queued again"
                    );
                    if let Some(&t0) = clean.last() {
                        restart.push(began + OUTAGE.as_secs_f64() + t0);
                    }
                }
                Ok((seconds, None, _)) => {
                    eprintln!("resume: without an outage: {seconds:.2} s");
                    clean.push(seconds);
                    plus_outage.push(seconds + OUTAGE.as_secs_f64());
                }
                Err(e) => eprintln!("resume: a run failed: {e}"),
            }
        }
    }
    let resent_median = {
        let mut r = resent.clone();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(0.0)
    };
    let note = format!(
        "resume/resent-fraction {:.4} (pages queued again over memory, median of {})",
        resent_median,
        resent.len()
    );
    out.emit(
        Comparison::new(
            "resume/outage-overhead",
            "s",
            Better::Lower,
            &with_outage,
            "the same migration without the outage, plus the outage's 5 s",
            &plus_outage,
        )
        .with_target(0.9)
        .with_field("resent_fraction", resent_median)
        .with_note(note.clone()),
    );
    out.emit(
        Comparison::new(
            "resume/vs-restart",
            "s",
            Better::Lower,
            &with_outage,
            "starting over once the path is back: time to the outage + 5 s + a whole migration",
            &restart,
        )
        .with_target(2.0)
        .with_field("resent_fraction", resent_median)
        .with_note(note),
    );
}
