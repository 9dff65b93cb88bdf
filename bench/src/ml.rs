//! The `ml` suite: the learned link models against the rules they would replace, and
//! the recordings they learn from.
//!
//! `dwcp-bench ml --record DIR` (root: it runs `wanem`) migrates a 4 GiB guest of
//! incompressible pages across a path that plays one generated trace per run and
//! writes what the control thread saw, a row per ~0.3 s of reports, with the path's own
//! state at that time beside it (`DIR/FAMILY-SEED.csv`). The guest is large enough that
//! round 0 outlasted every recorded trace, so the streams never ran out of pages to
//! send (the run is cancelled when its trace ends).
//!
//! `dwcp-bench ml --json` judges the models in `models/` on the held-out recordings
//! (see `models/README.md` for which those are), with the same code the control thread
//! runs them with:
//! - `ml/link-mape-vs-ewma`, `ml/link-mape-vs-last`: the link-rate predictor's mean
//!   absolute percentage error 1 s ahead against an EWMA's and the last value's (the
//!   5 s horizon's figures are in the lines);
//! - `ml/inference-p99-us`: the predictor's 99th percentile inference time on the
//!   control thread while a migration runs on this machine, against its 1000 µs budget;
//! - `ml/anomaly-f1-vs-zscore`: the learned path anomaly detector's F1 against the
//!   rolling z-score's, episode by episode, on held-out recordings of a fault family
//!   neither was tuned on (precision, recall, false positives per hour and the median
//!   delay of both are in the line).
//! - `ml/codec-regret-vs-analytic`: the learned compression choice against the codec
//!   policy's analytic one ([`crate::codec_choice`]).
//! - `ml/downtime-misses-vs-ewma` (root: it runs `wanem`): migrations across the
//!   held-out traces, the planner's downtime estimate fed the model's forecast of the
//!   path against the same fed the EWMA's (and against no forecast): how often the
//!   downtime went over its limit or off its estimate.
//! - `ml/codec-time-vs-ewma` (root): the same migrations of a guest that compresses,
//!   the codec policy taking its link share from the model's forecast against the
//!   EWMA's (and its own measurement): migration time.

use crate::measure::Samples;
use crate::report::{Better, Comparison, Reporter};
use dwcp_control::anomaly::{self, AnomalyModel};
use dwcp_control::codec_policy::{ModelPolicy, PolicyConfig};
use dwcp_control::linkrec::{LinkRecord, LinkRecorder};
use dwcp_control::predict::{self, LinkForecaster, LinkModel, PathRateForecast};
use dwcp_dataplane::codec::policy::CodecPolicy;
use dwcp_dataplane::engine::{
    LiveControl, LiveReport, LiveSettings, MigrationError, MigrationReport, SourceConfig,
};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wanem::scenario::Scenario;
use wanem::trace::Trace;
use wanem::{Emulator, EmulatorConfig};

/// The recorded guest: round 0 at the fastest generated path (2× a 400 Mbit/s mean)
/// lasts over 40 s, and most paths are far slower.
const RECORD_GUEST: usize = 4 << 30;

/// Every trace the models learn from or are judged on: (family, seed). Training and
/// held-out sets differ in seeds and in families; `models/README.md` says which is
/// which.
pub const RECORDED: &[(&str, u64)] = &[
    ("diurnal", 1),
    ("diurnal", 2),
    ("diurnal", 3),
    ("steps", 1),
    ("steps", 2),
    ("steps", 3),
    ("bursts", 101),
    ("bursts", 102),
    ("loss-episodes", 101),
    ("loss-episodes", 102),
];

/// Header of a recording: the recorder's columns, then the path's.
pub fn recording_header() -> String {
    format!(
        "{},path_rate_mbit,path_delay_ms,path_loss_percent,label",
        LinkRecord::CSV_HEADER
    )
}

/// Records every trace of [`RECORDED`] (or those whose name contains `filter`) into
/// `dir`, `seconds` each.
pub fn record(dir: &Path, seconds: f64, filter: Option<&str>) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (memory, workload) = filled_guest(RECORD_GUEST, &ContentMix::RANDOM, 1e6, 0.05)?;
    for &(family, seed) in RECORDED {
        let name = format!("{family}-{seed}");
        if filter.is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let trace = Trace::generate(family, seed, seconds)?;
        let started = Instant::now();
        let csv = record_one(&memory, &workload, &trace)?;
        let path = dir.join(format!("{name}.csv"));
        std::fs::write(&path, &csv).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!(
            "ml: {} rows in {} ({:.0} s)",
            csv.lines().count() - 1,
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A guest of `bytes` filled with `mix`, and a writer of `dirty_rate` bytes per second
/// over `working_set` of them on one vCPU.
fn filled_guest(
    bytes: usize,
    mix: &ContentMix,
    dirty_rate: f64,
    working_set: f64,
) -> Result<(Arc<GuestMemory>, GuestWorkload), String> {
    let memory = Arc::new(
        GuestMemory::anonymous(bytes, PagePreference::TransparentHuge)
            .map_err(|e| format!("guest memory: {e}"))?,
    );
    let workload = GuestWorkload {
        dirty_rate,
        working_set,
        vcpus: 1,
        ..GuestWorkload::default()
    };
    eprintln!("ml: filling a {} MiB guest", bytes >> 20);
    fill_memory(&memory, mix, workload.seed);
    Ok((memory, workload))
}

/// One migration of `memory` from `source` (the internet profile's destination; codecs
/// off, so that the streams are limited by the path, unless `policy` chooses them)
/// across a clean path of MTU 1500 that plays `trace` from the first report on (setup
/// is not the path);
/// `on_report` sees every report with the time since that first one. The source's
/// result, or why the path could not be emulated.
fn migrate_across_trace(
    tag: &str,
    memory: &Arc<GuestMemory>,
    workload: &GuestWorkload,
    trace: &Trace,
    source: &SourceConfig,
    policy: Option<&mut dyn CodecPolicy>,
    mut on_report: impl FnMut(&LiveControl, &LiveReport, Duration) + Send,
) -> Result<Result<MigrationReport, MigrationError>, String> {
    let emulator = Emulator::start(EmulatorConfig::new(tag, Scenario::clean(&trace.name)))
        .map_err(|e| e.to_string())?;
    let (_, dest) = dwcp_tests::wan::internet_profile();
    let mut playback = None;
    // Codecs off unless a policy chooses them.
    let settings = match policy {
        Some(_) => LiveSettings::from_config(source),
        None => dwcp_tests::wan::live_settings(source),
    };
    let (outcome, _) = dwcp_tests::wan::migrate_across_driven(
        &emulator,
        memory.clone(),
        workload,
        source,
        &dest,
        settings,
        policy,
        |live, reports| {
            let mut origin = None;
            while let Ok(r) = reports.recv_timeout(Duration::from_secs(10)) {
                let origin = *origin.get_or_insert_with(|| {
                    playback = Some(emulator.play(trace.clone()));
                    r.at
                });
                on_report(live, &r, r.at.duration_since(origin));
            }
        },
    );
    drop(playback);
    outcome.guest.stop();
    Ok(outcome.source)
}

/// One migration across `trace`; the recording as CSV.
fn record_one(
    memory: &Arc<GuestMemory>,
    workload: &GuestWorkload,
    trace: &Trace,
) -> Result<String, String> {
    let (mut source, _) = dwcp_tests::wan::internet_profile();
    // The recording covers the trace: the migration is cancelled at its end.
    source.auto_converge = false;
    let mut rows: Vec<(LinkRecord, f64)> = Vec::new();
    let mut recorder = None;
    let source_result = migrate_across_trace(
        "dwcpml",
        memory,
        workload,
        trace,
        &source,
        None,
        |live, r, since| {
            if since >= trace.duration() {
                live.cancel("the recorded trace ended");
                return;
            }
            let rec = recorder.get_or_insert_with(|| LinkRecorder::new(r.at));
            if let Some(row) = rec.observe(&r.progress, r.at) {
                rows.push((row, since.as_secs_f64()));
            }
        },
    )?;
    let mut csv = recording_header();
    csv.push('\n');
    for (row, t) in &rows {
        // The path as it was over the row's span (its middle).
        let mid = Duration::from_secs_f64((t - 0.125).max(0.0));
        let Some(p) = trace.at(mid) else { continue };
        let _ = writeln!(
            csv,
            "{},{:.3},{:.3},{:.4},{}",
            row.csv_line(),
            p.rate_mbit,
            p.delay_ms,
            p.loss_percent,
            p.label
        );
    }
    if rows.len() < 8 {
        return Err(format!(
            "{}: only {} rows recorded (source: {:?})",
            trace.name,
            rows.len(),
            source_result.err()
        ));
    }
    Ok(csv)
}

/// The models' directory in this checkout (or `DWCP_MODELS`).
pub fn models_dir() -> PathBuf {
    std::env::var_os("DWCP_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// A recording's rows, read back.
pub fn read_recording(path: &Path) -> Result<Vec<LinkRecord>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{}: empty", path.display()))?
        .split(',')
        .collect();
    lines
        .enumerate()
        .map(|(i, line)| {
            let fields: Vec<&str> = line.split(',').collect();
            LinkRecord::from_fields(|name| {
                let at = header.iter().position(|h| *h == name)?;
                fields.get(at)?.parse().ok()
            })
            .map_err(|e| format!("{} line {}: {e}", path.display(), i + 2))
        })
        .collect()
}

/// The mean acknowledged rate over the second ending `horizon` s after row `i` (what
/// the trainer's `future` computes).
fn future(rows: &[LinkRecord], i: usize, horizon: f64) -> Option<f64> {
    let t = rows[i].t;
    let span: Vec<f64> = rows[i + 1..]
        .iter()
        .filter(|r| r.t - t > horizon - 1.0 && r.t - t <= horizon)
        .map(|r| r.acked_mbit)
        .collect();
    (!span.is_empty()).then(|| span.iter().sum::<f64>() / span.len() as f64)
}

/// Absolute percentage errors of one predictor, per horizon.
#[derive(Default)]
struct Errors {
    per_horizon: Vec<Vec<f64>>,
}

impl Errors {
    fn push(&mut self, horizon: usize, predicted: f64, actual: f64) {
        if self.per_horizon.len() <= horizon {
            self.per_horizon.resize_with(horizon + 1, Vec::new);
        }
        self.per_horizon[horizon].push((predicted - actual).abs() / actual);
    }

    fn mape(&self, horizon: usize) -> f64 {
        let e = &self.per_horizon[horizon];
        e.iter().sum::<f64>() / e.len() as f64
    }
}

fn one(x: f64) -> Samples {
    let mut s = Samples::default();
    s.push(x);
    s
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The suite (see the module docs).
pub fn run(out: &mut Reporter) {
    let dir = models_dir().join("link");
    let model = match LinkModel::load(&dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ml: no link-rate model to judge: {e}");
            return;
        }
    };
    if out.wants("ml/link-mape") {
        link_accuracy(&model, &dir, out);
    }
    if out.wants("ml/inference-p99-us") {
        inference_time(&model, out);
    }
    if out.wants("ml/anomaly-f1-vs-zscore") {
        anomaly_accuracy(out);
    }
    if out.wants("ml/downtime-misses-vs-ewma")
        && let Err(e) = downtime_misses(&model, out)
    {
        eprintln!("ml: ml/downtime-misses-vs-ewma not measured: {e}");
    }
    if out.wants("ml/codec-time-vs-ewma")
        && let Err(e) = codec_with_forecast(&model, out)
    {
        eprintln!("ml: ml/codec-time-vs-ewma not measured: {e}");
    }
}

/// The paths the downtime check plays: the link model's held-out families, its two
/// held-out seeds of each and one more (103, recorded for nothing).
const DOWNTIME_TRACES: &[(&str, u64)] = &[
    ("bursts", 101),
    ("bursts", 102),
    ("bursts", 103),
    ("loss-episodes", 101),
    ("loss-episodes", 102),
    ("loss-episodes", 103),
];
/// The downtime check's guest: round 0 across the slowest of those paths lasts about
/// half a minute, long enough for the model's 16 rows of history.
const DOWNTIME_GUEST: usize = 256 << 20;
/// The limit the downtime check plans against (QEMU's default).
const DOWNTIME_LIMIT: Duration = Duration::from_millis(300);

/// What prices the final round's send in the planner's estimate.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pricing {
    /// The rounds' own send times alone (no forecast).
    Rounds,
    /// Also the EWMA of the path's acknowledged rate.
    Ewma,
    /// Also the link model's forecast.
    Model,
}

impl Pricing {
    fn name(self) -> &'static str {
        match self {
            Pricing::Rounds => "rounds",
            Pricing::Ewma => "ewma",
            Pricing::Model => "model",
        }
    }
}

/// One migration's downtime: (limit, estimated, measured), seconds.
type Downtime = (f64, f64, f64);

/// The paused window part by part, estimated / measured, for the log.
fn paused_window(d: &dwcp_dataplane::engine::DowntimeReport) -> String {
    let (e, m) = (&d.estimated, &d.measured);
    format!(
        "{} pages; collect {:.1} / {:.1}, send {:.1} / {:.1}, confirm {:.1} / {:.1} ms; path forecast {:.0} Mbit/s",
        e.pages,
        e.collect * 1e3,
        m.collect * 1e3,
        e.send * 1e3,
        m.send * 1e3,
        e.confirm * 1e3,
        m.confirm * 1e3,
        e.path_rate * 8e-6
    )
}

/// `ml/downtime-misses-vs-ewma`: the same migration across each held-out trace three
/// times, its final round priced by the rounds alone, by the EWMA's forecast of the
/// path and by the model's (the daemon's `[control] forecast_path_rate`, fed the same
/// way: [`PathRateForecast`](dwcp_control::predict::PathRateForecast)); how many went
/// over the limit and how far the estimate was from the downtime measured.
fn downtime_misses(model: &LinkModel, out: &mut Reporter) -> Result<(), String> {
    let (memory, workload) = filled_guest(DOWNTIME_GUEST, &ContentMix::RANDOM, 4e6, 0.1)?;
    let results = across_held_out_traces(|trace, pricing| {
        let started = Instant::now();
        let report = migrate_priced(&memory, &workload, trace, pricing, model, false)?;
        let d = &report.downtime;
        let last = report
            .rounds
            .last()
            .expect("a completed migration's report ends with its final round");
        eprintln!(
            "ml: {} priced by {}: downtime {:.1} ms, estimated {:.1} ms (limit {:.0} ms; {}; {:.0} s)\n    final round {} pages, {} bytes; {}",
            trace.name,
            pricing.name(),
            d.measured.total * 1e3,
            d.estimated.total * 1e3,
            d.limit * 1e3,
            paused_window(d),
            started.elapsed().as_secs_f64(),
            last.pages,
            last.bytes,
            report.switchover_reason
        );
        Ok((d.limit, d.estimated.total, d.measured.total))
    })?;
    let of = |p: Pricing| -> Vec<Downtime> {
        results.iter().filter(|r| r.0 == p).map(|r| r.1).collect()
    };
    let over = |runs: &[Downtime]| runs.iter().filter(|(limit, _, m)| m > limit).count();
    // Issue 12's tolerance: 10% of the limit or 2 ms, whichever is larger.
    let off = |runs: &[Downtime]| {
        runs.iter()
            .filter(|(limit, e, m)| (e - m).abs() > (0.1 * limit).max(0.002))
            .count()
    };
    let mean_error_ms = |runs: &[Downtime]| {
        runs.iter().map(|(_, e, m)| (e - m).abs()).sum::<f64>() * 1e3 / runs.len() as f64
    };
    let (ours, theirs, rounds) = (of(Pricing::Model), of(Pricing::Ewma), of(Pricing::Rounds));
    let fields = |c: Comparison, side: &str, runs: &[Downtime]| {
        c.with_field(&format!("{side}_over_limit"), over(runs))
            .with_field(&format!("{side}_off_estimate"), off(runs))
            .with_field(
                &format!("{side}_mean_error_ms"),
                round4(mean_error_ms(runs)),
            )
            .with_field(
                &format!("{side}_downtimes_ms"),
                runs.iter()
                    .map(|r| (r.2 * 1e4).round() / 10.0)
                    .collect::<Vec<f64>>(),
            )
    };
    // Misses, each arm's runs over the limit or off their estimate; one miss added to
    // both sides so that none against none reads 1.
    let misses = |runs: &[Downtime]| (over(runs) + off(runs)) as f64;
    let c = Comparison::new(
        "ml/downtime-misses-vs-ewma",
        "misses + 1",
        Better::Lower,
        &one(misses(&ours) + 1.0),
        "the planner's estimate with the EWMA's forecast of the path",
        &one(misses(&theirs) + 1.0),
    )
    .with_target(1.0)
    .with_note(format!(
        "a {} MiB guest across held-out traces {:?} at a {} ms limit, its final round priced at the path forecast (model / EWMA) when slower than the rounds' own rate; a miss is a downtime over the limit, or off its estimate by more than 10% of the limit; `rounds` is the planner without a forecast",
        DOWNTIME_GUEST >> 20,
        DOWNTIME_TRACES
            .iter()
            .map(|(f, s)| format!("{f}-{s}"))
            .collect::<Vec<_>>(),
        DOWNTIME_LIMIT.as_millis()
    ));
    let mut c = fields(fields(c, "ours", &ours), "theirs", &theirs);
    // Runs per side (the figures are counts over them, not medians).
    c.runs = ours.len();
    out.emit(fields(c, "rounds", &rounds));
    Ok(())
}

/// `ml/codec-time-vs-ewma`: the codec policy choosing with its link share taken from
/// the model's forecast of the path, against the same from the EWMA's (and against
/// the policy's own measurement, no forecast): a guest whose memory compresses like a
/// real one, across the same held-out traces; migration time, from the first byte to
/// the verdict.
fn codec_with_forecast(model: &LinkModel, out: &mut Reporter) -> Result<(), String> {
    let (memory, workload) = filled_guest(DOWNTIME_GUEST, &ContentMix::MEMORY_IMAGE, 4e6, 0.1)?;
    let results = across_held_out_traces(|trace, pricing| {
        let report = migrate_priced(&memory, &workload, trace, pricing, model, true)?;
        eprintln!(
            "ml: {} with codecs, forecast by {}: {:.2} s, {:.1} MB on the wire",
            trace.name,
            pricing.name(),
            report.total_seconds,
            report.bytes_sent as f64 / 1e6
        );
        Ok((report.total_seconds, report.bytes_sent))
    })?;
    let runs = |p: Pricing| results.iter().filter(move |r| r.0 == p).map(|r| r.1);
    let of = |p: Pricing| -> Samples {
        let mut s = Samples::default();
        for (seconds, _) in runs(p) {
            s.push(seconds);
        }
        s
    };
    let mb = |p: Pricing| -> f64 {
        let megabytes: Vec<f64> = runs(p).map(|(_, bytes)| bytes as f64 / 1e6).collect();
        round4(megabytes.iter().sum::<f64>() / megabytes.len() as f64)
    };
    let none = of(Pricing::Rounds);
    let c = Comparison::new(
        "ml/codec-time-vs-ewma",
        "s",
        Better::Lower,
        &of(Pricing::Model),
        "the codec policy's link share from the EWMA's forecast of the path",
        &of(Pricing::Ewma),
    )
    .with_target(1.0)
    .with_field("no_forecast_median_s", round4(none.median()))
    .with_field("ours_mean_mb", mb(Pricing::Model))
    .with_field("theirs_mean_mb", mb(Pricing::Ewma))
    .with_field("no_forecast_mean_mb", mb(Pricing::Rounds))
    .with_note(format!(
        "median migration time of a {} MiB guest of a memory image's content across held-out traces {:?}, the codec policy choosing; `no_forecast`: the policy's own measurement of the link",
        DOWNTIME_GUEST >> 20,
        DOWNTIME_TRACES
            .iter()
            .map(|(f, s)| format!("{f}-{s}"))
            .collect::<Vec<_>>()
    ));
    out.emit(c);
    Ok(())
}

/// The held-out traces of [`DOWNTIME_TRACES`], each migrated across once per arm
/// (model, EWMA, no forecast) by `one`; the arms take turns going first, so no arm
/// always meets a warmer machine. Results in the order run, with their arm.
fn across_held_out_traces<T>(
    mut one: impl FnMut(&Trace, Pricing) -> Result<T, String>,
) -> Result<Vec<(Pricing, T)>, String> {
    let arms = [Pricing::Model, Pricing::Ewma, Pricing::Rounds];
    let mut results = Vec::new();
    for (i, &(family, seed)) in DOWNTIME_TRACES.iter().enumerate() {
        let trace = Trace::generate(family, seed, 120.0)?;
        for k in 0..arms.len() {
            let pricing = arms[(i + k) % arms.len()];
            results.push((pricing, one(&trace, pricing)?));
        }
    }
    Ok(results)
}

/// One migration across `trace` at [`DOWNTIME_LIMIT`], the path forecast by `pricing`
/// told to the engine (its planner and, with `codecs`, the codec policy, which then
/// chooses the codecs).
fn migrate_priced(
    memory: &Arc<GuestMemory>,
    workload: &GuestWorkload,
    trace: &Trace,
    pricing: Pricing,
    model: &LinkModel,
    codecs: bool,
) -> Result<MigrationReport, String> {
    let (mut source, _) = dwcp_tests::wan::internet_profile();
    source.downtime_limit = DOWNTIME_LIMIT;
    let forecaster = match pricing {
        Pricing::Model => LinkForecaster::with_model(model.clone()),
        _ => LinkForecaster::rule(model.card().baseline.ewma_weight),
    };
    let mut path = PathRateForecast::new(forecaster);
    let mut recorder = None;
    let mut policy = codecs.then(|| {
        ModelPolicy::new(PolicyConfig {
            levels: source.codec.levels.clone(),
            ..PolicyConfig::default()
        })
    });
    let outcome = migrate_across_trace(
        "dwcpdt",
        memory,
        workload,
        trace,
        &source,
        policy.as_mut().map(|p| p as &mut dyn CodecPolicy),
        |live, r, _| {
            let rec = recorder.get_or_insert_with(|| LinkRecorder::passing(r.at));
            path.report(&r.progress);
            if let Some(row) = rec.observe(&r.progress, r.at) {
                path.row(row);
            }
            if pricing != Pricing::Rounds {
                live.set_path_rate(path.bytes_per_second());
            }
        },
    )?;
    outcome.map_err(|e| format!("{} priced by {}: {e}", trace.name, pricing.name()))
}

/// A recording's fault labels, row by row (true where the trace injected one).
pub fn read_labels(path: &Path) -> Result<Vec<bool>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let at = header
        .split(',')
        .position(|h| h == "label")
        .ok_or_else(|| format!("{}: no label column", path.display()))?;
    Ok(lines
        .map(|l| l.split(',').nth(at).is_some_and(|v| !v.trim().is_empty()))
        .collect())
}

/// The learned anomaly detector against the rolling z-score on the held-out
/// recordings, episode by episode (as the trainer judges them).
fn anomaly_accuracy(out: &mut Reporter) {
    let dir = models_dir().join("anomaly");
    let model = match AnomalyModel::load(&dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ml: no anomaly model to judge: {e}");
            return;
        }
    };
    let card = model.card();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for name in &card.held_out.recordings {
        let path = models_dir()
            .join("link")
            .join("data")
            .join(format!("{name}.csv"));
        let (rows, labels) = match read_recording(&path).and_then(|r| Ok((r, read_labels(&path)?)))
        {
            Ok(x) => x,
            Err(e) => {
                eprintln!("ml: {e}");
                return;
            }
        };
        let (mut ts, mut truth, mut by_model, mut by_rule) = (vec![], vec![], vec![], vec![]);
        for i in anomaly::HISTORY - 1..rows.len() {
            let window = &rows[i + 1 - anomaly::HISTORY..=i];
            ts.push(rows[i].t);
            truth.push(labels[i]);
            by_model.push(
                model
                    .probability(window)
                    .is_ok_and(|p| p > card.output.threshold),
            );
            by_rule.push(anomaly::zscore(window).0 > card.baseline.zscore_threshold);
        }
        ours.push((ts.clone(), truth.clone(), by_model));
        theirs.push((ts, truth, by_rule));
    }
    let (o, t) = (
        anomaly::judge(&ours, card.baseline.grace_s),
        anomaly::judge(&theirs, card.baseline.grace_s),
    );
    let fields = |c: Comparison, side: &str, j: &anomaly::Judgement| {
        c.with_field(&format!("{side}_precision"), round4(j.precision))
            .with_field(&format!("{side}_recall"), round4(j.recall))
            .with_field(
                &format!("{side}_false_positives_per_hour"),
                j.false_positives_per_hour.round(),
            )
            .with_field(
                &format!("{side}_median_delay_s"),
                j.median_delay_s.map(round4),
            )
    };
    let c = Comparison::new(
        "ml/anomaly-f1-vs-zscore",
        "F1",
        Better::Higher,
        &one(round4(o.f1)),
        format!(
            "rolling z-score of the acknowledged rate and the RTT (threshold {} sd, tuned on the training set)",
            card.baseline.zscore_threshold
        ),
        &one(round4(t.f1)),
    )
    .with_target(1.0)
    .with_field("episodes", o.episodes)
    .with_note(format!(
        "held-out recordings {:?}, a fault family neither saw; trained on {:?}; an episode counts as detected by a flag within it or {} s after",
        card.held_out.recordings, card.training.recordings, card.baseline.grace_s
    ));
    out.emit(fields(fields(c, "ours", &o), "theirs", &t));
}

fn link_accuracy(model: &LinkModel, dir: &Path, out: &mut Reporter) {
    let card = model.card();
    let horizons = card.output.horizons_s.clone();
    let history = card.history_rows();
    let (mut ours, mut ewma_errors, mut last_errors) =
        (Errors::default(), Errors::default(), Errors::default());
    let mut samples = 0usize;
    for name in &card.held_out.recordings {
        let path = dir.join("data").join(format!("{name}.csv"));
        let rows = match read_recording(&path) {
            Ok(rows) => rows,
            Err(e) => {
                eprintln!("ml: {e}");
                return;
            }
        };
        let mut ewma = predict::Ewma::new(card.baseline.ewma_weight);
        for i in 0..rows.len() {
            ewma.push(rows[i].acked_mbit);
            if i + 1 < history {
                continue;
            }
            let actual: Option<Vec<f64>> = horizons
                .iter()
                .map(|&h| future(&rows, i, h).filter(|&v| v >= 1.0))
                .collect();
            let Some(actual) = actual else { continue };
            let predicted = match model.predict(&rows[i + 1 - history..=i]) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("ml: {name} row {i}: {e}");
                    return;
                }
            };
            samples += 1;
            for (k, &a) in actual.iter().enumerate() {
                ours.push(k, predicted[k], a);
                ewma_errors.push(k, ewma.value().unwrap_or(0.0), a);
                last_errors.push(k, rows[i].acked_mbit, a);
            }
        }
    }
    if samples == 0 {
        eprintln!("ml: no held-out samples");
        return;
    }
    let note = format!(
        "held-out recordings {:?} ({samples} predictions); trained on {:?}; horizon {} s",
        card.held_out.recordings, card.training.recordings, horizons[0]
    );
    for (bench, baseline, errors) in [
        (
            "ml/link-mape-vs-ewma",
            format!(
                "EWMA (weight {}, tuned on the training set)",
                card.baseline.ewma_weight
            ),
            &ewma_errors,
        ),
        (
            "ml/link-mape-vs-last",
            "the last value".to_string(),
            &last_errors,
        ),
    ] {
        if !out.wants(bench) {
            continue;
        }
        let mut c = Comparison::new(
            bench,
            "MAPE",
            Better::Lower,
            &one(round4(ours.mape(0))),
            baseline,
            &one(round4(errors.mape(0))),
        )
        .with_target(1.0)
        .with_note(note.clone())
        .with_field("samples", samples);
        for (k, h) in horizons.iter().enumerate().skip(1) {
            c = c
                .with_field(&format!("ours_{h}s"), round4(ours.mape(k)))
                .with_field(&format!("theirs_{h}s"), round4(errors.mape(k)));
        }
        out.emit(c);
    }
}

/// Inference on this thread while a migration (the demo's, 256 MiB) runs on the
/// others: one prediction per millisecond, each timed.
fn inference_time(model: &LinkModel, out: &mut Reporter) {
    let card = model.card();
    let rows: Vec<LinkRecord> = card.test_vectors[0]
        .rows
        .iter()
        .filter_map(|r| LinkRecord::from_fields(|n| r.get(n).copied()).ok())
        .collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut times = Vec::new();
    let migration = std::thread::scope(|scope| {
        let migration = scope.spawn(|| {
            let mut config = dwcp_control::config::Config::default();
            config.guest.memory = dwcp_control::config::Size(256 << 20);
            let result = dwcp_control::appliance::run_demo(&config, true);
            done.store(true, std::sync::atomic::Ordering::Release);
            result.map(|_| ())
        });
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            let t = Instant::now();
            let _ = std::hint::black_box(model.predict(&rows));
            times.push(t.elapsed().as_secs_f64() * 1e6);
            std::thread::sleep(Duration::from_millis(1));
        }
        migration.join()
    });
    if !matches!(migration, Ok(Ok(()))) {
        eprintln!("ml: the migration beside the inferences failed: {migration:?}");
        return;
    }
    times.sort_by(f64::total_cmp);
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    let median = times[times.len() / 2];
    out.emit(
        Comparison::new(
            "ml/inference-p99-us",
            "us",
            Better::Lower,
            &one((p99 * 10.0).round() / 10.0),
            "the control thread's budget",
            &one(1000.0),
        )
        .with_target(1.0)
        .with_field("inferences", times.len())
        .with_field("median_us", (median * 10.0).round() / 10.0)
        .with_field("max_us", (times[times.len() - 1] * 10.0).round() / 10.0)
        .with_note(
            "one prediction per millisecond on this thread while a 256 MiB demo migration runs",
        ),
    );
}
