//! The `resume` suite: what a failure mid-migration costs, through `wanem`'s
//! cross-region path (needs root for the emulator's namespaces, else skipped with the
//! reason). A live migration of 1 GiB each run, the kinds alternating:
//!
//! - `resume/outage-overhead`: the whole path out for 5 s once round 0 has moved half
//!   of memory, the connections surviving it (they wait the outage out), against the
//!   same migration without the outage plus 5 s (target ≥ 0.9: the outage costs little
//!   beyond itself).
//! - `resume/reconnect-overhead`: the same outage, with the connections' patience
//!   (`TCP_USER_TIMEOUT`) at 2 s so that they die in it: the source reconnects once the
//!   path is back and the session resumes by comparing CRC tables. Against the same
//!   baseline.
//! - `resume/vs-restart`: the connections die in a 5 s outage late in round 0 (once it
//!   has moved 90% of memory); after the path is back, the time to the verified end
//!   when the session resumes, against starting over (a whole migration without an
//!   outage): what resuming saves when a restart would throw most of the work away
//!   (target ≥ 2).
//! - `resume/vs-restart-mid-round-0`: the same for the outage at half of round 0 (the
//!   reconnect runs). Here half of memory is still to send either way, so the ratio is
//!   bounded by a whole migration over half of round 0 plus the later rounds: below 2
//!   whatever resuming costs.
//! - `resume/vs-restart-total`: the outage at half of round 0, from the migration's
//!   start (time to the outage and the outage counted on both sides).
//!
//! The lines carry `resent_fraction`: of the reconnect runs, the pages sent again after
//! the resume that had been sent before (lost in flight), over memory; of the outage
//! runs, the pages queued again after streams were given up.

use crate::measure::{Plan, Samples};
use crate::report::{Better, Comparison, Reporter};
use dwcp_dataplane::guest::GuestWorkload;
use dwcp_dataplane::memory::GuestMemory;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wanem::scenario::Scenario;
use wanem::{Emulator, EmulatorConfig};

const GUEST: usize = 1 << 30;
const OUTAGE: Duration = Duration::from_secs(5);
/// The connections' patience in the reconnect runs: shorter than the outage.
const SHORT_PATIENCE: Duration = Duration::from_secs(2);

/// What one run does to the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Out for [`OUTAGE`]; the connections wait.
    Outage,
    /// Out for [`OUTAGE`]; the connections die in it and the session resumes.
    Reconnect,
    /// As `Reconnect`, the outage once round 0 has moved 90% of memory.
    ReconnectLate,
}

impl Fault {
    /// Whether the path goes out in round `round` once `sent` of `memory` pages of it
    /// have gone.
    fn due(self, round: u64, sent: u64, memory: u64) -> bool {
        match self {
            Fault::None => false,
            Fault::Outage | Fault::Reconnect => round == 0 && sent * 2 >= memory,
            Fault::ReconnectLate => round == 0 && sent * 10 >= memory * 9,
        }
    }
}

/// One run's figures.
struct RunFigures {
    seconds: f64,
    /// When the outage began, seconds into the migration.
    began: Option<f64>,
    /// Pages sent again over memory (see the module docs).
    resent_fraction: f64,
    resumes: usize,
    /// Of the first resume: from the loss to the new session, comparing the tables
    /// (seconds), and the pages it found to send.
    resume: Option<(f64, f64, u64)>,
}

/// One migration across `emulator`, the path out for [`OUTAGE`] when `fault` says.
fn migrate(
    emulator: &Emulator,
    memory: &Arc<GuestMemory>,
    workload: &GuestWorkload,
    fault: Fault,
) -> Result<RunFigures, String> {
    let (mut source, mut dest) = dwcp_tests::wan::internet_profile();
    source.streams = 8;
    if matches!(fault, Fault::Reconnect | Fault::ReconnectLate) {
        source.transport.socket.user_timeout = Some(SHORT_PATIENCE);
        dest.transport.socket.user_timeout = Some(SHORT_PATIENCE);
    }
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
        None,
        |_live, reports| {
            while let Ok(r) = reports.recv_timeout(Duration::from_secs(10)) {
                let p = &r.progress;
                if began.is_none() && fault.due(p.round, p.pages_sent, p.memory_pages) {
                    began = Some(started.elapsed().as_secs_f64());
                    dwcp_tests::wan::path_out_for(emulator, OUTAGE);
                }
            }
        },
    );
    out.guest.stop();
    let report = out.source.map_err(|e| e.to_string())?;
    out.dest.map_err(|e| e.to_string())?;
    if fault != Fault::None && began.is_none() {
        return Err("the migration ended before the outage was due".into());
    }
    let requeued = report.transport.pages_requeued();
    // After a resume, what the comparison sent again supersedes what lost streams had
    // queued again before it.
    let resent_fraction = if report.resumes.is_empty() {
        requeued as f64 / report.pages as f64
    } else {
        report.resent_fraction()
    };
    Ok(RunFigures {
        seconds,
        began,
        resent_fraction,
        resumes: report.resumes.len(),
        resume: report
            .resumes
            .first()
            .map(|r| (r.outage_seconds, r.compare_seconds, r.pages_to_send)),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Run the suite.
pub fn run(plan: Plan, out: &mut Reporter) {
    let names = [
        "resume/outage-overhead",
        "resume/reconnect-overhead",
        "resume/vs-restart",
        "resume/vs-restart-mid-round-0",
        "resume/vs-restart-total",
    ];
    if !names.iter().any(|n| out.wants(n)) {
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
    let (memory, workload) = dwcp_tests::wan::filled_guest(GUEST, 4e6, 0.1);
    let runs = plan.runs.clamp(1, 5);
    let mut clean = Vec::new();
    let (mut outage, mut outage_resent) = (Samples::default(), Vec::new());
    let (mut reconnect, mut reconnect_resent) = (Samples::default(), Vec::new());
    // After the path is back (reconnect runs), and when each outage began.
    let mut after_return = Vec::new();
    let mut began_at = Vec::new();
    let (mut late_after_return, mut late_resent) = (Vec::new(), Vec::new());
    let kinds = [
        Fault::None,
        Fault::Outage,
        Fault::Reconnect,
        Fault::ReconnectLate,
    ];
    for i in 0..runs {
        // Rotate which goes first: the machine's state drifts over a run.
        for k in 0..kinds.len() {
            let fault = kinds[(i + k) % kinds.len()];
            match migrate(&emulator, &memory, &workload, fault) {
                Ok(f) => {
                    eprintln!(
                        "resume: {fault:?}: {:.2} s{}, resent fraction {:.4}, {} resumes{}",
                        f.seconds,
                        f.began
                            .map_or(String::new(), |b| format!(" (outage from {b:.2} s)")),
                        f.resent_fraction,
                        f.resumes,
                        f.resume
                            .map_or(String::new(), |(lost, compare, pages)| format!(
                                " (the first: new session {lost:.2} s after the loss, tables \
                             compared in {compare:.2} s, {pages} pages to send)"
                            ))
                    );
                    match fault {
                        Fault::None => clean.push(f.seconds),
                        Fault::Outage => {
                            outage.push(f.seconds);
                            outage_resent.push(f.resent_fraction);
                        }
                        Fault::Reconnect => {
                            reconnect.push(f.seconds);
                            reconnect_resent.push(f.resent_fraction);
                            if let Some(b) = f.began {
                                after_return.push(f.seconds - b - OUTAGE.as_secs_f64());
                                began_at.push(b);
                            }
                        }
                        Fault::ReconnectLate => {
                            if let Some(b) = f.began {
                                late_after_return.push(f.seconds - b - OUTAGE.as_secs_f64());
                                late_resent.push(f.resent_fraction);
                            }
                        }
                    }
                }
                Err(e) => eprintln!("resume: a {fault:?} run failed: {e}"),
            }
        }
    }
    let plus_outage: Vec<f64> = clean.iter().map(|t| t + OUTAGE.as_secs_f64()).collect();
    let baseline = "the same migration without the outage, plus the outage's 5 s";
    let outage_note = format!(
        "connections wait the outage out; pages queued again over memory {:.4}",
        median(outage_resent.clone())
    );
    out.emit(
        Comparison::new(
            "resume/outage-overhead",
            "s",
            Better::Lower,
            &outage,
            baseline,
            &plus_outage.clone().into(),
        )
        .with_target(0.9)
        .with_field("resent_fraction", median(outage_resent))
        .with_note(outage_note),
    );
    let reconnect_resent = median(reconnect_resent);
    let reconnect_note = format!(
        "connections die in the outage (TCP_USER_TIMEOUT {} s); the session resumes by \
         comparing CRC tables; pages sent twice (lost in flight) over memory {reconnect_resent:.4}",
        SHORT_PATIENCE.as_secs()
    );
    out.emit(
        Comparison::new(
            "resume/reconnect-overhead",
            "s",
            Better::Lower,
            &reconnect,
            baseline,
            &plus_outage.into(),
        )
        .with_target(0.9)
        .with_field("resent_fraction", reconnect_resent)
        .with_note(reconnect_note.clone()),
    );
    let late_resent = median(late_resent);
    out.emit(
        Comparison::new(
            "resume/vs-restart",
            "s",
            Better::Lower,
            &late_after_return.into(),
            "starting over once the path is back: a whole migration",
            &clean.clone().into(),
        )
        .with_target(2.0)
        .with_field("resent_fraction", late_resent)
        .with_note(format!(
            "from the path's return to the verified end; the connections died in the outage \
             once round 0 had moved 90% of memory; pages sent twice over memory {late_resent:.4}"
        )),
    );
    out.emit(
        Comparison::new(
            "resume/vs-restart-mid-round-0",
            "s",
            Better::Lower,
            &after_return.into(),
            "starting over once the path is back: a whole migration",
            &clean.clone().into(),
        )
        .with_field("resent_fraction", reconnect_resent)
        .with_note(format!(
            "from the path's return to the verified end; the outage began at {:.2} s \
             (median), half of round 0: half of memory is still to send either way, so the \
             ratio stays below 2",
            median(began_at.clone())
        )),
    );
    let t0 = median(clean);
    let restart_total: Vec<f64> = began_at
        .iter()
        .map(|b| b + OUTAGE.as_secs_f64() + t0)
        .collect();
    out.emit(
        Comparison::new(
            "resume/vs-restart-total",
            "s",
            Better::Lower,
            &reconnect,
            "starting over once the path is back, from the start: time to the outage + 5 s + a whole migration",
            &restart_total.into(),
        )
        .with_field("resent_fraction", reconnect_resent),
    );
}
