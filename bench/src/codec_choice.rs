//! The learned compression choice against the analytic one, on measured cases.
//!
//! `dwcp-bench ml --codec-data DIR` measures cases into `DIR/cases.csv`: batches of 1024
//! pages from several content families (synthetic mixes, and the real guest RAM of
//! `../shared/data` when present), each at several link shares. For a case it keeps
//! what a worker would know (a 64-page sample's zero share and zstd calibration, the
//! staging rate) and what each candidate really costs on the whole batch (zstd at each
//! level timed on all its pages), with the selector's features computed by the code
//! the control thread would run.
//!
//! `ml/codec-regret-vs-analytic` (in `dwcp-bench ml`) judges the committed selector on
//! the held-out families: for each case, the true time of the candidate chosen over
//! the true time of the best one (1 is a perfect choice), the selector's mean against
//! the analytic model's.

use crate::measure::Samples;
use crate::report::{Better, Comparison, Reporter};
use dwcp_control::codec_model::{
    ChoiceInputs, CodecChoiceModel, LEVELS, argmin, candidates, choice_features, feature_names,
};
use dwcp_control::codec_policy::{Candidate, seconds_per_byte};
use dwcp_dataplane::codec::calibrate::{Calibration, LevelMeasurement, calibrate, sample_pages};
use dwcp_dataplane::codec::policy::CodecConfig;
use dwcp_dataplane::guest::{ContentMix, fill_memory};
use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_hugepages::PagePreference;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Pages in a batch.
const BATCH_PAGES: usize = 1024;
/// Pages the worker's sample holds.
const SAMPLE_PAGES: usize = 64;
/// Batches per family, and link shares per batch.
const BATCHES: usize = 12;
const LINKS: usize = 6;
/// Link shares span 8 Mbit/s to 10 Gbit/s, bytes per second.
const SHARE_RANGE: (f64, f64) = (1e6, 1.25e9);

/// The synthetic families: (name, mix, training set or held out). The real guest's RAM
/// (`guest-ram`) is held out too.
const FAMILIES: &[(&str, ContentMix, bool)] = &[
    ("image", ContentMix::MEMORY_IMAGE, true),
    (
        "text",
        ContentMix {
            zero: 10,
            text: 75,
            structured: 10,
            random: 5,
            edit: 0,
            duplicate: 0,
        },
        true,
    ),
    (
        "structured",
        ContentMix {
            zero: 10,
            text: 5,
            structured: 75,
            random: 10,
            edit: 0,
            duplicate: 0,
        },
        true,
    ),
    (
        "random-heavy",
        ContentMix {
            zero: 10,
            text: 15,
            structured: 15,
            random: 60,
            edit: 0,
            duplicate: 0,
        },
        true,
    ),
    ("writes", ContentMix::WRITES, false),
];

/// The committed cases.
pub fn cases_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/codec/data/cases.csv")
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// zstd at every level on `memory`'s pages (about `pages` of them).
fn calibration_of(memory: &GuestMemory, pages: usize, seed: u64) -> Calibration {
    let config = CodecConfig::default();
    let sample = sample_pages(memory, pages, seed);
    calibrate(&sample, &LEVELS, &|l| config.batch_for(l), None, 0.0)
}

/// Staging with codecs off: copying the batch and a CRC per page, bytes per second.
fn raw_rate(memory: &GuestMemory) -> f64 {
    let kernels = dwcp_simd::Kernels::active();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut out = vec![0u8; memory.len()];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        for p in 0..memory.pages() {
            memory.read_page(p, &mut page);
            std::hint::black_box(kernels.crc32c(&page));
            let at = p as usize * PAGE_SIZE;
            out[at..at + PAGE_SIZE].copy_from_slice(&page);
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&out);
    memory.len() as f64 / best
}

fn header() -> String {
    let mut h = String::from("family,set,batch,share,raw_rate,zero_fraction");
    for prefix in ["s", "t"] {
        for l in LEVELS {
            let _ = write!(h, ",{prefix}_ratio_{l},{prefix}_speed_{l}");
        }
    }
    for f in feature_names() {
        let _ = write!(h, ",{f}");
    }
    for c in candidates() {
        let _ = write!(h, ",true_s_per_mb_{}", c.name());
    }
    h.push_str(",analytic_choice");
    h
}

/// The true seconds per MB of each candidate: the model's formula with what the whole
/// batch measured.
fn true_costs(case: &ChoiceInputs, truth: &Calibration) -> Vec<f64> {
    let truth_case = ChoiceInputs {
        calibration: truth.clone(),
        ..case.clone()
    };
    let inputs = truth_case.cost_inputs();
    candidates()
        .into_iter()
        .map(|c| seconds_per_byte(c, &inputs).map_or(f64::INFINITY, |s| s * 1e6))
        .collect()
}

/// Measure every family's cases into `dir/cases.csv`.
pub fn record(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut text = header();
    text.push('\n');
    let batch_bytes = BATCH_PAGES * PAGE_SIZE;
    let region = BATCHES * batch_bytes;
    let mut families: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for (index, (name, mix, train)) in FAMILIES.iter().enumerate() {
        let memory = GuestMemory::anonymous(region, PagePreference::Small)
            .map_err(|e| format!("memory: {e}"))?;
        fill_memory(&memory, mix, 1000 + index as u64);
        families.push((name.to_string(), memory.to_vec(), *train));
    }
    match dwcp_tests::images::guest_images() {
        // Batches spread over the 64 MiB sample (every 8th page of a 512 MiB guest).
        Ok(images) => {
            let stride = images.t0.len() / BATCHES / batch_bytes * batch_bytes;
            let bytes: Vec<u8> = (0..BATCHES)
                .flat_map(|b| images.t0[b * stride..b * stride + batch_bytes].to_vec())
                .collect();
            families.push(("guest-ram".into(), bytes, false));
        }
        Err(why) => {
            eprintln!("ml --codec-data: no real guest RAM ({why}); synthetic families only")
        }
    }
    let mut rng = Rng(0x5EED_C0DE);
    let mut rows = 0;
    let mut skipped = 0;
    for (family, bytes, train) in &families {
        for batch in 0..BATCHES {
            let memory = GuestMemory::anonymous(batch_bytes, PagePreference::Small)
                .map_err(|e| format!("memory: {e}"))?;
            let at = batch * batch_bytes;
            for p in 0..BATCH_PAGES {
                let page = &bytes[at + p * PAGE_SIZE..at + (p + 1) * PAGE_SIZE];
                memory.write_page(p as u64, page);
            }
            let sample = calibration_of(&memory, SAMPLE_PAGES, batch as u64);
            let truth = calibration_of(&memory, BATCH_PAGES, 0);
            // A sample of zero pages only prices no level: the worker would have
            // nothing to compress to choose by. Left out, and counted.
            if sample.levels.len() < LEVELS.len() || truth.levels.len() < LEVELS.len() {
                skipped += 1;
                continue;
            }
            let raw = raw_rate(&memory);
            for _ in 0..LINKS {
                let (lo, hi) = SHARE_RANGE;
                let share = lo * (hi / lo).powf(rng.unit());
                let case = ChoiceInputs {
                    share,
                    raw_rate: raw,
                    calibration: sample.clone(),
                };
                let _ = write!(
                    text,
                    "{family},{},{batch},{share:.0},{raw:.0},{:.4}",
                    if *train { "train" } else { "held-out" },
                    sample.zero_fraction
                );
                for cal in [&sample, &truth] {
                    for l in LEVELS {
                        let m = cal.level(l).ok_or(format!("level {l} not measured"))?;
                        let _ = write!(text, ",{:.4},{:.0}", m.ratio, m.bytes_per_second);
                    }
                }
                for f in choice_features(&case) {
                    let _ = write!(text, ",{f}");
                }
                for t in true_costs(&case, &truth) {
                    let _ = write!(text, ",{t:.6}");
                }
                let _ = writeln!(text, ",{}", case.analytic_choice().name());
                rows += 1;
            }
        }
        eprintln!("ml --codec-data: {family} measured");
    }
    let path = dir.join("cases.csv");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!(
        "ml --codec-data: {rows} cases in {} ({skipped} batches left out: their sample held only zero pages)",
        path.display()
    );
    Ok(())
}

/// A case read back: what the worker knew, and the true costs.
struct Case {
    family: String,
    held_out: bool,
    inputs: ChoiceInputs,
    truth: Vec<f64>,
}

fn read_cases(path: &Path) -> Result<Vec<Case>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let names: Vec<&str> = lines.next().ok_or("empty")?.split(',').collect();
    let mut cases = Vec::new();
    for (n, line) in lines.enumerate() {
        let fields: HashMap<&str, &str> = names.iter().copied().zip(line.split(',')).collect();
        let num = |k: &str| -> Result<f64, String> {
            fields
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("line {}: no number in {k}", n + 2))
        };
        let mut levels = Vec::new();
        for l in LEVELS {
            levels.push(LevelMeasurement {
                level: l,
                ratio: num(&format!("s_ratio_{l}"))?,
                bytes_per_second: num(&format!("s_speed_{l}"))?,
                ratio_with_dictionary: None,
            });
        }
        let truth = candidates()
            .into_iter()
            .map(|c| num(&format!("true_s_per_mb_{}", c.name())))
            .collect::<Result<Vec<f64>, String>>()?;
        cases.push(Case {
            family: fields.get("family").unwrap_or(&"").to_string(),
            held_out: fields.get("set") == Some(&"held-out"),
            inputs: ChoiceInputs {
                share: num("share")?,
                raw_rate: num("raw_rate")?,
                calibration: Calibration {
                    pages: SAMPLE_PAGES,
                    zero_fraction: num("zero_fraction")?,
                    levels,
                    seconds: 0.0,
                },
            },
            truth,
        });
    }
    Ok(cases)
}

/// The true time of `choice` over the best candidate's.
fn regret(case: &Case, choice: Candidate) -> f64 {
    let all = candidates();
    let i = all.iter().position(|c| *c == choice).unwrap_or(0);
    let best = case.truth.iter().copied().fold(f64::INFINITY, f64::min);
    case.truth[i] / best
}

/// `ml/codec-regret-vs-analytic`.
pub fn judge(out: &mut Reporter) {
    const BENCH: &str = "ml/codec-regret-vs-analytic";
    if !out.wants(BENCH) {
        return;
    }
    let cases = match read_cases(&cases_path()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{BENCH}: SKIP: the cases: {e}");
            return;
        }
    };
    let dir = cases_path()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let model = match dir.as_deref().map(CodecChoiceModel::load) {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            eprintln!("{BENCH}: SKIP: the model: {e}");
            return;
        }
        None => return,
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut ours_best, mut theirs_best, mut n) = (0, 0, 0);
    let mut families: Vec<String> = Vec::new();
    for case in cases.iter().filter(|c| c.held_out) {
        let learned = match model.choose(&case.inputs) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{BENCH}: the model failed: {e}");
                return;
            }
        };
        let analytic = case.inputs.analytic_choice();
        let best = argmin(&case.truth);
        ours.push(regret(case, learned));
        theirs.push(regret(case, analytic));
        ours_best += usize::from(learned == best);
        theirs_best += usize::from(analytic == best);
        n += 1;
        if !families.contains(&case.family) {
            families.push(case.family.clone());
        }
    }
    if n == 0 {
        eprintln!("{BENCH}: SKIP: no held-out cases");
        return;
    }
    let worst = |v: &[f64]| (v.iter().copied().fold(1.0, f64::max) * 1000.0).round() / 1000.0;
    let mean = |v: &[f64]| Samples::from(vec![v.iter().sum::<f64>() / v.len() as f64]);
    out.emit(
        Comparison::new(
            BENCH,
            "x best",
            Better::Lower,
            &mean(&ours),
            "the analytic model (codec_policy.rs) on the same sample",
            &mean(&theirs),
        )
        .with_target(1.0)
        .with_field("cases", n)
        .with_field("held_out_families", families.join(" "))
        .with_field("ours_best_choices", format!("{ours_best}/{n}"))
        .with_field("theirs_best_choices", format!("{theirs_best}/{n}"))
        .with_field("ours_worst", worst(&ours))
        .with_field("theirs_worst", worst(&theirs))
        .with_field("beats_baseline_when_trained", model.card().beats_baseline)
        .with_note(
            "mean over held-out cases of the chosen candidate's true time over the best one's (1 = always the best)",
        ),
    );
}
