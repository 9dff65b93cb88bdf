//! The `downtime` suite: the demo's migration (a 1 GiB simulated guest writing about
//! 50 MB/s, both appliances in this process over loopback, 4 streams), run the way
//! `dwcpd demo` runs it, again and again.
//!
//! - `downtime/limit-20ms`, `downtime/limit-50ms`: ten migrations at each limit; ours
//!   is the median measured downtime, theirs the limit (ratio = limit / measured, so at
//!   least 1.0 means within it). The line also says how many runs stayed within the
//!   limit and how far the estimate was from the measurement (median and worst, and
//!   how many runs were within 10% of the limit or 2 ms, whichever is larger).
//! - `downtime/vs-full-verify`: measured downtime with the table digest against the
//!   full in-downtime check of all memory, alternating, at a limit both can meet.
//! - `downtime/4g-vs-1g`: a 4 GiB guest against a 1 GiB one, alternating, the same
//!   writer (50 MB/s over the same 256 MiB) at the same limit: only the memory size
//!   differs, and the downtime must not grow with it (ratio = 1 GiB's / 4 GiB's).
//! - `downtime/4g-vs-1g-4x-written`: the same with the demo's writer, which covers a
//!   quarter of memory: the 4 GiB guest has also written four times the pages. The
//!   paused collection walks the page tables of every page ever written at 4 KiB
//!   (`PAGEMAP_SCAN`, under 2 ns a page here), so this line shows what a larger written
//!   set adds to the window: 0.3-0.45 ms per GiB written on this machine.

use crate::measure::Samples;
use crate::report::{Better, Comparison, Reporter};
use dwcp_control::appliance::run_demo;
use dwcp_control::config::{Config, Size};
use dwcp_dataplane::engine::MigrationReport;

/// How the suite runs: migrations per limit, per side of each comparison.
#[derive(Debug, Clone, Copy)]
pub struct DowntimePlan {
    /// Migrations at each limit (10 by default).
    pub runs: usize,
    /// Migrations per side of the verification comparison (five by default: a
    /// downtime of 1-2 ms moves by a millisecond when the scheduler stalls one
    /// migration's window, and a median of three lets two such runs decide).
    pub pair_runs: usize,
    /// Migrations per side of the memory-size comparisons (nine by default: their
    /// downtimes are well under a millisecond, where one stalled window in a run of
    /// five moves the median by a fifth).
    pub size_runs: usize,
}

impl DowntimePlan {
    /// `DWCP_BENCH_QUICK=1` runs fewer migrations.
    pub fn from_env() -> Self {
        if std::env::var_os("DWCP_BENCH_QUICK").is_some() {
            DowntimePlan {
                runs: 2,
                pair_runs: 1,
                size_runs: 1,
            }
        } else {
            DowntimePlan {
                runs: 10,
                pair_runs: 5,
                size_runs: 9,
            }
        }
    }
}

/// One migration of the demo's guest, as configured, with `change` applied.
fn demo(change: impl FnOnce(&mut Config)) -> Result<MigrationReport, String> {
    let mut config = Config::default();
    change(&mut config);
    config.validate().map_err(|e| e.to_string())?;
    let report = run_demo(&config, true)?;
    if !report.byte_identical {
        return Err("source and destination memory differ".into());
    }
    Ok(report.source)
}

/// The paused window part by part, estimated / measured, for a run worth a look.
fn parts(r: &MigrationReport) -> String {
    let (e, m) = (&r.downtime.estimated, &r.downtime.measured);
    format!(
        "collect {:.2}/{:.2}, send {} pages {:.2}/{:.2}, confirm {:.2}/{:.2}, pause -/{:.2} ms, then the answer waited {:.2} ms here; {} page faults in the window; rounds (pages, zero, KiB, ms) {:?}",
        e.collect * 1e3,
        m.collect * 1e3,
        e.pages,
        e.send * 1e3,
        m.send * 1e3,
        e.confirm * 1e3,
        m.confirm * 1e3,
        m.pause * 1e3,
        m.answer_lag * 1e3,
        m.page_faults,
        r.rounds
            .iter()
            .map(|x| (
                x.pages,
                x.zero_pages,
                x.bytes / 1024,
                (x.seconds * 1e4).round() / 10.0
            ))
            .collect::<Vec<_>>()
    )
}

fn ms(seconds: f64) -> f64 {
    (seconds * 1e5).round() / 100.0
}

/// Ten migrations at `limit_ms`: the comparison against the limit, with the estimate
/// error.
fn at_limit(out: &mut Reporter, plan: DowntimePlan, limit_ms: u64) {
    let bench = format!("downtime/limit-{limit_ms}ms");
    if !out.wants(&bench) {
        return;
    }
    let limit = limit_ms as f64 / 1e3;
    let tolerance = (limit * 0.1).max(0.002);
    let (mut measured, mut limits, mut errors) =
        (Samples::default(), Samples::default(), Samples::default());
    let (mut within_limit, mut honest, mut failed) = (0, 0, Vec::new());
    for run in 0..plan.runs {
        match demo(|c| c.migration.downtime_limit_ms = limit_ms) {
            Ok(r) => {
                let error = (r.estimated_downtime - r.measured_downtime).abs();
                eprintln!(
                    "{bench} run {run}: measured {:.2} ms, estimated {:.2} ms ({} rounds)",
                    r.measured_downtime * 1e3,
                    r.estimated_downtime * 1e3,
                    r.rounds.len()
                );
                eprintln!("  {}", parts(&r));
                measured.push(r.measured_downtime * 1e3);
                limits.push(limit_ms as f64);
                errors.push(error * 1e3);
                within_limit += usize::from(r.measured_downtime <= limit);
                honest += usize::from(error <= tolerance);
            }
            Err(e) => {
                eprintln!("{bench} run {run}: {e}");
                failed.push(e);
            }
        }
    }
    if measured.is_empty() {
        eprintln!("{bench}: no migration completed");
        return;
    }
    let mut c = Comparison::new(
        bench,
        "ms",
        Better::Lower,
        &measured,
        "the downtime limit",
        &limits,
    )
    .with_target(1.0)
    .with_field("within_limit", format!("{within_limit}/{}", measured.len()))
    .with_field("estimate_error_ms_median", ms(errors.median() / 1e3))
    .with_field("estimate_error_ms_max", ms(errors.max() / 1e3))
    .with_field("estimate_tolerance_ms", ms(tolerance))
    .with_field(
        "estimate_within_tolerance",
        format!("{honest}/{}", measured.len()),
    );
    if !failed.is_empty() {
        c = c.with_note(format!("{} runs failed: {}", failed.len(), failed[0]));
    }
    out.emit(c);
}

/// Alternate `ours` and `theirs` migrations `runs` times each; the measured downtimes
/// in ms. A failed run is reported and left out.
fn pair(
    name: &str,
    runs: usize,
    ours: impl Fn(&mut Config),
    theirs: impl Fn(&mut Config),
) -> (Samples, Samples) {
    let (mut o, mut t) = (Samples::default(), Samples::default());
    for i in 0..runs {
        for ours_now in [i % 2 == 0, i % 2 != 0] {
            let result = if ours_now { demo(&ours) } else { demo(&theirs) };
            match result {
                Ok(r) => {
                    eprintln!(
                        "{name} run {i} ({}): measured {:.2} ms, estimated {:.2} ms",
                        if ours_now { "ours" } else { "baseline" },
                        r.measured_downtime * 1e3,
                        r.estimated_downtime * 1e3
                    );
                    eprintln!("  {}", parts(&r));
                    let d = r.measured_downtime * 1e3;
                    if ours_now { o.push(d) } else { t.push(d) }
                }
                Err(e) => eprintln!("{name} run {i}: {e}"),
            }
        }
    }
    (o, t)
}

/// Run the suite.
pub fn run(plan: DowntimePlan, out: &mut Reporter) {
    at_limit(out, plan, 20);
    at_limit(out, plan, 50);
    if out.wants("downtime/vs-full-verify") {
        // A limit the full check can meet on 1 GiB (QEMU's default).
        let (o, t) = pair(
            "downtime/vs-full-verify",
            plan.pair_runs,
            |c| {
                c.migration.downtime_limit_ms = 300;
                c.migration.verify = "table".into();
            },
            |c| {
                c.migration.downtime_limit_ms = 300;
                c.migration.verify = "full".into();
            },
        );
        if !o.is_empty() && !t.is_empty() {
            out.emit(
                Comparison::new(
                    "downtime/vs-full-verify",
                    "ms",
                    Better::Lower,
                    &o,
                    "verify = full (all memory checked in the downtime)",
                    &t,
                )
                .with_target(5.0)
                .with_note("1 GiB, both at a 300 ms limit"),
            );
        }
    }
    // The demo's writer covers a quarter of memory: the first line keeps the writes
    // (rate and pages written) and changes only the memory size; the second lets the
    // written set grow with it.
    let demo_written = Config::default().guest.working_set;
    four_gib_against_one(
        out,
        plan,
        "downtime/4g-vs-1g",
        |c| c.guest.working_set = demo_written / 4.0,
        "4 GiB against 1 GiB, the same 50 MB/s of writes over the same 256 MiB, 50 ms limit",
    );
    four_gib_against_one(
        out,
        plan,
        "downtime/4g-vs-1g-4x-written",
        |_| {},
        "4 GiB against 1 GiB, 50 MB/s of writes over a quarter of memory (1 GiB against 256 MiB), 50 ms limit",
    );
}

/// Line `bench`: the demo's migration of a 4 GiB guest (with `change`) against the same
/// migration of a 1 GiB one, alternating.
fn four_gib_against_one(
    out: &mut Reporter,
    plan: DowntimePlan,
    bench: &str,
    change: impl Fn(&mut Config),
    note: &str,
) {
    if !out.wants(bench) {
        return;
    }
    let (o, t) = pair(
        bench,
        plan.size_runs,
        |c| {
            c.guest.memory = Size(4 << 30);
            change(c);
        },
        |c| c.guest.memory = Size(1 << 30),
    );
    if !o.is_empty() && !t.is_empty() {
        out.emit(
            Comparison::new(
                bench,
                "ms",
                Better::Lower,
                &o,
                "the same migration of 1 GiB",
                &t,
            )
            .with_target(0.8)
            .with_note(note),
        );
    }
}
