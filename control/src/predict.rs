//! Link-rate prediction for the control thread: the learned predictor (an ONNX model
//! run with tract) and the rules it has to beat (the last value, an EWMA).
//!
//! The model reads the last [`ModelCard::history_rows`] rows of the
//! [`LinkRecorder`](crate::linkrec::LinkRecorder) and predicts the acknowledged rate
//! 1 s and 5 s ahead, as log ratios to the mean of the last few rows (so one model
//! serves paths of any speed). It is trained by `models/link/train.py`, which writes
//! the model and its card; [`LinkModel::load`] checks the model against the card before
//! anything uses it: the file's SHA-256, the input and output shapes, and the card's
//! test vectors (raw rows and the predictions the trainer computed for them), which
//! also prove that [`link_features`] here computes what the trainer's `features` did.
//! A model that is missing or fails any check is an error naming the file and the
//! check; the caller then runs the EWMA ([`LinkForecaster::rule`]).
//!
//! Nothing here is linked by the fast path: it runs on the control thread only.

use crate::linkrec::LinkRecord;
use dwcp_dataplane::engine::Progress;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_onnx::prelude::*;

/// The model's file name in its directory.
pub const MODEL_FILE: &str = "link-rate.onnx";
/// The card's file name in the model's directory.
pub const CARD_FILE: &str = "link-rate.card.json";
/// The model card version this code reads.
pub const CARD_VERSION: u32 = 1;
/// Per-row features, in the order the model reads them.
pub const PER_ROW: [&str; 6] = [
    "acked/ref",
    "delivery/ref",
    "send/ref",
    "rtt/min_rtt",
    "loss",
    "backlog_s",
];
/// How close the model must come to each of the card's test predictions (relative).
const TEST_TOLERANCE: f64 = 1e-3;

/// Why a model was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a model card this version reads: {why}")]
    Card { path: PathBuf, why: String },
    #[error(
        "{path}: its SHA-256 is {found}, the card says {expected}: the model is not the one the card describes"
    )]
    Checksum {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: not a model tract can run: {why}")]
    Onnx { path: PathBuf, why: String },
    #[error("{path}: test vector {index} predicts {got:?} Mbit/s where the card says {want:?}")]
    TestVector {
        path: PathBuf,
        index: usize,
        got: Vec<f64>,
        want: Vec<f64>,
    },
}

/// What `models/link/train.py` writes beside the model (the fields this code uses).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelCard {
    pub name: String,
    pub version: u32,
    pub input: CardInput,
    pub output: CardOutput,
    pub model: CardModel,
    pub training: CardData,
    pub held_out: CardData,
    pub baseline: CardBaseline,
    /// Whether it beat both baselines on the held-out recordings when trained.
    pub beats_baselines: bool,
    pub test_vectors: Vec<TestVector>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CardInput {
    pub name: String,
    pub shape: Vec<usize>,
    pub history_rows: usize,
    pub reference_rows: usize,
    pub per_row: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CardOutput {
    pub name: String,
    pub shape: Vec<usize>,
    pub horizons_s: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CardModel {
    pub kind: String,
    pub onnx_sha256: String,
}

/// The recordings a model was trained or judged on (either card).
#[derive(Debug, Clone, Deserialize)]
pub struct CardData {
    pub recordings: Vec<String>,
    pub data_sha256: String,
    pub samples: usize,
    /// Held out, in the link model's card: per horizon (`1s`, `5s`), the model's, the
    /// EWMA's and the last value's figures.
    #[serde(default)]
    pub metrics: std::collections::BTreeMap<String, HashMap<String, f64>>,
}

impl CardData {
    /// The held-out MAPE of the model against the EWMA's, per horizon, for people.
    pub fn metrics_line(&self) -> Option<String> {
        let parts: Vec<String> = self
            .metrics
            .iter()
            .filter_map(|(h, m)| {
                Some(format!(
                    "{h} MAPE {:.3} (EWMA {:.3})",
                    m.get("model_mape")?,
                    m.get("ewma_mape")?
                ))
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CardBaseline {
    /// The EWMA's weight, tuned on the training recordings.
    pub ewma_weight: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TestVector {
    pub rows: Vec<HashMap<String, f64>>,
    pub predicted_mbit: Vec<f64>,
}

impl ModelCard {
    /// Rows the model reads.
    pub fn history_rows(&self) -> usize {
        self.input.history_rows
    }
}

impl CardChecks for ModelCard {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name != "link-rate" {
            p.push(format!("name {:?}, want \"link-rate\"", self.name));
        }
        if self.version != CARD_VERSION {
            p.push(format!(
                "version {}, this code reads {CARD_VERSION}",
                self.version
            ));
        }
        if self.input.per_row != PER_ROW {
            p.push(format!(
                "features {:?}, this code computes {PER_ROW:?}",
                self.input.per_row
            ));
        }
        let width = self.input.history_rows * PER_ROW.len();
        if self.input.shape != [1, width] {
            p.push(format!(
                "input shape {:?}, want [1, {width}]",
                self.input.shape
            ));
        }
        if !(1..=self.input.history_rows).contains(&self.input.reference_rows) {
            p.push(format!("reference_rows {}", self.input.reference_rows));
        }
        if self.output.shape != [1, self.output.horizons_s.len()]
            || self.output.horizons_s.is_empty()
        {
            p.push(format!(
                "output shape {:?} for horizons {:?}",
                self.output.shape, self.output.horizons_s
            ));
        }
        if !(0.0..=1.0).contains(&self.baseline.ewma_weight) || self.baseline.ewma_weight == 0.0 {
            p.push(format!("EWMA weight {}", self.baseline.ewma_weight));
        }
        if self.test_vectors.is_empty() {
            p.push("no test vectors".into());
        }
        p
    }
}

impl LinkRecord {
    /// A row from named values (a CSV line's or a card's), missing names an error.
    pub fn from_fields(get: impl Fn(&str) -> Option<f64>) -> Result<LinkRecord, String> {
        let v = |name: &str| get(name).ok_or_else(|| format!("no `{name}`"));
        Ok(LinkRecord {
            t: v("t")?,
            acked_mbit: v("acked_mbit")?,
            delivery_mbit: v("delivery_mbit")?,
            send_mbit: v("send_mbit")?,
            rtt_ms: v("rtt_ms")?,
            rttvar_ms: v("rttvar_ms")?,
            min_rtt_ms: v("min_rtt_ms")?,
            retrans: v("retrans")? as u64,
            segments: v("segments")? as u64,
            cwnd: v("cwnd")? as u64,
            notsent_kib: v("notsent_kib")?,
            streams: v("streams")? as u32,
        })
    }
}

/// The model's input for `window` (oldest row first) and the reference rate it is
/// relative to (Mbit/s): per row, the acknowledged, delivery and send rates over the
/// reference, the RTT over the window's lowest, the loss (retransmitted over sent
/// segments) and the backlog in seconds at the reference rate; each clamped to ±50.
/// Must compute what `features` in `models/link/train.py` does.
pub fn link_features(window: &[LinkRecord], reference_rows: usize) -> (Vec<f32>, f64) {
    let tail = &window[window.len().saturating_sub(reference_rows)..];
    let reference =
        (tail.iter().map(|r| r.acked_mbit).sum::<f64>() / tail.len().max(1) as f64).max(1.0);
    let min_rtt = window
        .iter()
        .map(|r| r.rtt_ms)
        .filter(|&r| r > 0.0)
        .fold(f64::INFINITY, f64::min);
    let min_rtt = if min_rtt.is_finite() { min_rtt } else { 1.0 };
    let mut out = Vec::with_capacity(window.len() * PER_ROW.len());
    for r in window {
        let row = [
            r.acked_mbit / reference,
            r.delivery_mbit / reference,
            r.send_mbit / reference,
            if r.rtt_ms > 0.0 {
                r.rtt_ms / min_rtt
            } else {
                1.0
            },
            if r.segments > 0 {
                r.retrans as f64 / r.segments as f64
            } else {
                0.0
            },
            r.notsent_kib * 1024.0 * 8.0 / (reference * 1e6),
        ];
        out.extend(row.iter().map(|&x| x.clamp(-50.0, 50.0) as f32));
    }
    (out, reference)
}

/// A checked model, ready to run (clones share the plan).
#[derive(Clone)]
pub struct LinkModel {
    card: ModelCard,
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for LinkModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkModel")
            .field("card", &self.card.name)
            .field("version", &self.card.version)
            .finish()
    }
}

/// A model card's own checks: what this code cannot run it with.
pub(crate) trait CardChecks {
    fn problems(&self) -> Vec<String>;
}

/// A model card read from `path` and checked.
pub(crate) fn read_card<C: serde::de::DeserializeOwned + CardChecks>(
    path: &Path,
) -> Result<(C, PathBuf), ModelError> {
    let bytes = std::fs::read(path).map_err(|error| ModelError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let card: C = serde_json::from_slice(&bytes).map_err(|e| ModelError::Card {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let problems = card.problems();
    if !problems.is_empty() {
        return Err(ModelError::Card {
            path: path.to_path_buf(),
            why: problems.join("; "),
        });
    }
    Ok((card, path.to_path_buf()))
}

/// A card's test vector: raw rows by column name, and the outputs the trainer computed
/// for them.
pub(crate) type VectorRows<'a> = (&'a [HashMap<String, f64>], Vec<f64>);

/// Run each of a card's test vectors through `run`; the first that disagrees (relatively, or absolutely below
/// 1) is an error.
pub(crate) fn check_test_vectors(
    card_path: &Path,
    model_path: &Path,
    vectors: &[VectorRows<'_>],
    run: impl Fn(&[LinkRecord]) -> Result<Vec<f64>, String>,
) -> Result<(), ModelError> {
    for (index, (rows, want)) in vectors.iter().enumerate() {
        let rows = rows
            .iter()
            .map(|r| LinkRecord::from_fields(|name| r.get(name).copied()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|why| ModelError::Card {
                path: card_path.to_path_buf(),
                why: format!("test vector {index}: {why}"),
            })?;
        let got = run(&rows).map_err(|why| ModelError::Onnx {
            path: model_path.to_path_buf(),
            why,
        })?;
        let close = got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= TEST_TOLERANCE * w.abs().max(1.0));
        if !close {
            return Err(ModelError::TestVector {
                path: model_path.to_path_buf(),
                index,
                got,
                want: want.clone(),
            });
        }
    }
    Ok(())
}

/// The ONNX model at `path`, if its SHA-256 is `sha256` (as its card says), optimized
/// for one input of `[1, width]` floats and ready to run.
pub(crate) fn checked_plan(
    path: &Path,
    sha256: &str,
    width: usize,
) -> Result<Arc<TypedRunnableModel>, ModelError> {
    let bytes = std::fs::read(path).map_err(|error| ModelError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let found = sha256_hex(&bytes);
    if found != sha256 {
        return Err(ModelError::Checksum {
            path: path.to_path_buf(),
            found,
            expected: sha256.to_string(),
        });
    }
    tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.with_input_fact(0, f32::fact([1, width]).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| ModelError::Onnx {
            path: path.to_path_buf(),
            why: format!("{e:#}"),
        })
}

/// Run `plan` on one row of `features`: its first output's values.
pub(crate) fn run_plan(
    plan: &Arc<TypedRunnableModel>,
    features: &[f32],
) -> Result<Vec<f32>, String> {
    let input = Tensor::from_shape(&[1, features.len()], features).map_err(|e| e.to_string())?;
    let out = plan
        .run(tvec!(input.into()))
        .map_err(|e| format!("{e:#}"))?;
    let view = out[0]
        .to_plain_array_view::<f32>()
        .map_err(|e| e.to_string())?;
    Ok(view.iter().copied().collect())
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl LinkModel {
    /// Load `dir/link-rate.onnx` and check it against `dir/link-rate.card.json`.
    pub fn load(dir: &Path) -> Result<LinkModel, ModelError> {
        let (card, card_path) = read_card::<ModelCard>(&dir.join(CARD_FILE))?;
        let model_path = dir.join(MODEL_FILE);
        let plan = checked_plan(&model_path, &card.model.onnx_sha256, card.input.shape[1])?;
        let model = LinkModel { card, plan };
        let vectors: Vec<_> = model
            .card
            .test_vectors
            .iter()
            .map(|v| (&v.rows[..], v.predicted_mbit.clone()))
            .collect();
        check_test_vectors(&card_path, &model_path, &vectors, |rows| {
            model.predict(rows)
        })?;
        Ok(model)
    }

    /// The card it was checked against.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// The acknowledged rate at each of the card's horizons, Mbit/s, from the last
    /// `history_rows` rows of `rows` (fewer: an error).
    pub fn predict(&self, rows: &[LinkRecord]) -> Result<Vec<f64>, String> {
        let n = self.card.history_rows();
        if rows.len() < n {
            return Err(format!("{} rows, the model reads {n}", rows.len()));
        }
        let (features, reference) =
            link_features(&rows[rows.len() - n..], self.card.input.reference_rows);
        Ok(run_plan(&self.plan, &features)?
            .into_iter()
            .map(|log_ratio| reference * f64::from(log_ratio).exp())
            .collect())
    }
}

/// An exponentially weighted moving average of the acknowledged rate.
#[derive(Debug, Clone, Copy)]
pub struct Ewma {
    weight: f64,
    value: Option<f64>,
}

impl Ewma {
    pub fn new(weight: f64) -> Self {
        Ewma {
            weight,
            value: None,
        }
    }

    pub fn push(&mut self, x: f64) {
        self.value = Some(match self.value {
            Some(v) => self.weight * x + (1.0 - self.weight) * v,
            None => x,
        });
    }

    pub fn value(&self) -> Option<f64> {
        self.value
    }
}

/// The EWMA weight used when no card says otherwise.
pub const DEFAULT_EWMA_WEIGHT: f64 = 0.3;

/// What the control thread asks: the link's rate ahead, from the model when one is
/// loaded, else from the EWMA.
#[derive(Debug)]
pub struct LinkForecaster {
    model: Option<LinkModel>,
    ewma: Ewma,
    rows: VecDeque<LinkRecord>,
}

/// A forecast and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// Mbit/s at each horizon (the EWMA gives one value for all).
    pub mbit: Vec<f64>,
    pub horizons_s: Vec<f64>,
    /// `model` or `ewma`.
    pub by: &'static str,
}

impl LinkForecaster {
    /// With a checked model (its card's EWMA weight for the fallback).
    pub fn with_model(model: LinkModel) -> Self {
        LinkForecaster {
            ewma: Ewma::new(model.card.baseline.ewma_weight),
            rows: VecDeque::with_capacity(model.card.history_rows()),
            model: Some(model),
        }
    }

    /// The rule alone.
    pub fn rule(weight: f64) -> Self {
        LinkForecaster {
            model: None,
            ewma: Ewma::new(weight),
            rows: VecDeque::new(),
        }
    }

    /// Take a recorder row.
    pub fn push(&mut self, row: LinkRecord) {
        self.ewma.push(row.acked_mbit);
        if let Some(m) = &self.model {
            if self.rows.len() == m.card.history_rows() {
                self.rows.pop_front();
            }
            self.rows.push_back(row);
        }
    }

    /// The forecast now: the model's once it has its history (and runs), else the
    /// EWMA's; `None` before any row.
    pub fn forecast(&mut self) -> Option<Forecast> {
        if let Some(m) = &self.model
            && self.rows.len() == m.card.history_rows()
            && let Ok(mbit) = m.predict(self.rows.make_contiguous())
        {
            return Some(Forecast {
                mbit,
                horizons_s: m.card.output.horizons_s.clone(),
                by: "model",
            });
        }
        self.ewma.value().map(|v| Forecast {
            mbit: vec![v],
            horizons_s: Vec::new(),
            by: "ewma",
        })
    }
}

/// Whether a report shows the migration with pages of its round not yet sent (not yet
/// handed to the workers, or queued to them): it was sending as fast as the path (or
/// the machine) let it.
pub fn pages_waiting(progress: &Progress) -> bool {
    progress.phase == "precopy" && progress.round_pages_sent < progress.round_pages
}

/// The path's rate ahead, for the pre-copy planner's downtime estimate
/// ([`LiveControl::set_path_rate`](dwcp_dataplane::engine::LiveControl::set_path_rate)).
///
/// A [`LinkForecaster`] fed only the rows over which every report had pages waiting
/// ([`pages_waiting`]): there the acknowledged rate is what the path carried. A row of
/// a migration waiting on its dirty log (late, small rounds) says what the migration
/// had to send, not what the path could carry, and would drag the forecast down; the
/// forecast then stays the one made from the last row that measured the path, for at
/// most [`PATH_FORECAST_LIFETIME_S`].
#[derive(Debug)]
pub struct PathRateForecast {
    forecaster: LinkForecaster,
    /// Every report since the last row had pages waiting.
    waiting_throughout: bool,
    /// The forecast and the time of the row it was made from.
    latest: Option<(Forecast, f64)>,
}

/// How long a path forecast holds without a row that measured the path: the model's
/// longest horizon. Past it the planner prices by the rounds alone again.
pub const PATH_FORECAST_LIFETIME_S: f64 = 5.0;

impl PathRateForecast {
    pub fn new(forecaster: LinkForecaster) -> Self {
        PathRateForecast {
            forecaster,
            waiting_throughout: true,
            latest: None,
        }
    }

    /// Take a report, before the recorder turns it (and those before it) into a row.
    pub fn report(&mut self, progress: &Progress) {
        self.waiting_throughout &= pages_waiting(progress);
    }

    /// The recorder made `row` of the reports since the last one.
    pub fn row(&mut self, row: LinkRecord) {
        if std::mem::replace(&mut self.waiting_throughout, true) {
            self.forecaster.push(row);
            self.latest = self.forecaster.forecast().map(|f| (f, row.t));
        } else if self
            .latest
            .as_ref()
            .is_some_and(|(_, t)| row.t - t > PATH_FORECAST_LIFETIME_S)
        {
            self.latest = None;
        }
    }

    /// What the path will carry over the next second, bytes per second: the
    /// forecast's first horizon (the EWMA's one value).
    pub fn bytes_per_second(&self) -> Option<f64> {
        self.latest
            .as_ref()
            .and_then(|(f, _)| f.mbit.first())
            .map(|mbit| mbit * 1e6 / 8.0)
            .filter(|r| r.is_finite() && *r > 0.0)
    }

    /// Where the forecast comes from (`model` or `ewma`), once there is one.
    pub fn by(&self) -> Option<&'static str> {
        self.latest.as_ref().map(|(f, _)| f.by)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model shipped in `models/link`.
    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/link")
    }

    fn copy_shipped(to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for f in [MODEL_FILE, CARD_FILE] {
            std::fs::copy(shipped().join(f), to.join(f)).unwrap();
        }
    }

    fn temp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dwcp-predict-{}-{tag}", std::process::id()))
    }

    #[test]
    fn the_shipped_model_passes_its_cards_checks_and_forecasts() {
        let model = LinkModel::load(&shipped()).expect("the shipped model loads");
        let card = model.card().clone();
        assert_eq!(card.output.horizons_s, [1.0, 5.0]);
        let rows: Vec<LinkRecord> = card.test_vectors[0]
            .rows
            .iter()
            .map(|r| LinkRecord::from_fields(|n| r.get(n).copied()).unwrap())
            .collect();
        let mut f = LinkForecaster::with_model(model);
        assert_eq!(f.forecast(), None);
        f.push(rows[0]);
        assert_eq!(
            f.forecast().unwrap().by,
            "ewma",
            "too little history for the model"
        );
        for r in &rows[1..] {
            f.push(*r);
        }
        let forecast = f.forecast().unwrap();
        assert_eq!(forecast.by, "model");
        for (got, want) in forecast
            .mbit
            .iter()
            .zip(&card.test_vectors[0].predicted_mbit)
        {
            assert!((got - want).abs() < 1e-3 * want, "{got} vs {want}");
        }
    }

    #[test]
    fn a_missing_tampered_or_mismatched_model_is_refused_with_its_reason() {
        let missing = LinkModel::load(Path::new("/nonexistent")).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("/nonexistent/link-rate.card.json"),
            "{missing}"
        );

        let dir = temp("tampered");
        copy_shipped(&dir);
        let mut bytes = std::fs::read(dir.join(MODEL_FILE)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(dir.join(MODEL_FILE), &bytes).unwrap();
        let e = LinkModel::load(&dir).unwrap_err();
        assert!(matches!(e, ModelError::Checksum { .. }), "{e}");

        let dir = temp("garbage");
        copy_shipped(&dir);
        std::fs::write(dir.join(MODEL_FILE), b"not a model").unwrap();
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CARD_FILE)).unwrap()).unwrap();
        card["model"]["onnx_sha256"] = sha256_hex(b"not a model").into();
        std::fs::write(dir.join(CARD_FILE), card.to_string()).unwrap();
        let e = LinkModel::load(&dir).unwrap_err();
        assert!(matches!(e, ModelError::Onnx { .. }), "{e}");

        let dir = temp("card");
        copy_shipped(&dir);
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CARD_FILE)).unwrap()).unwrap();
        card["input"]["per_row"][0] = "acked".into();
        card["version"] = 9.into();
        std::fs::write(dir.join(CARD_FILE), card.to_string()).unwrap();
        let e = LinkModel::load(&dir).unwrap_err().to_string();
        assert!(e.contains("version 9") && e.contains("features"), "{e}");

        let dir = temp("vector");
        copy_shipped(&dir);
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CARD_FILE)).unwrap()).unwrap();
        let want = card["test_vectors"][1]["predicted_mbit"][0]
            .as_f64()
            .unwrap();
        card["test_vectors"][1]["predicted_mbit"][0] = (want * 1.1).into();
        std::fs::write(dir.join(CARD_FILE), card.to_string()).unwrap();
        let e = LinkModel::load(&dir).unwrap_err();
        assert!(matches!(e, ModelError::TestVector { index: 1, .. }), "{e}");
        for tag in ["tampered", "garbage", "card", "vector"] {
            let _ = std::fs::remove_dir_all(temp(tag));
        }
    }

    #[test]
    fn the_planner_s_path_forecast_learns_only_from_rows_that_measured_the_path() {
        let mut t = 0.0;
        let mut row = |acked: f64| {
            t += 0.3;
            LinkRecord {
                t,
                acked_mbit: acked,
                ..LinkRecord::default()
            }
        };
        let sending = crate::mode::tests::progress_with(&[]);
        let waiting_on_the_dirty_log = Progress {
            round_pages_queued: 1,
            round_pages_sent: 1,
            ..sending.clone()
        };
        let mut f = PathRateForecast::new(LinkForecaster::rule(0.5));
        assert_eq!(f.bytes_per_second(), None);
        f.report(&sending);
        f.report(&sending);
        f.row(row(80.0));
        assert_eq!(f.bytes_per_second(), Some(10e6), "80 Mbit/s");
        assert_eq!(f.by(), Some("ewma"));
        // One report of the span without pages waiting: the row is left out, and the
        // forecast stays what the path last showed.
        f.report(&sending);
        f.report(&waiting_on_the_dirty_log);
        f.row(row(8.0));
        assert_eq!(f.bytes_per_second(), Some(10e6));
        // The next span starts afresh.
        f.report(&sending);
        f.row(row(40.0));
        assert_eq!(
            f.bytes_per_second(),
            Some(7.5e6),
            "EWMA of 80 and 40 Mbit/s"
        );
        // Nor does a settling round or the paused window measure the path.
        f.report(&Progress {
            phase: "settle",
            ..sending
        });
        f.row(row(1.0));
        assert_eq!(f.bytes_per_second(), Some(7.5e6));
        // A forecast no row has measured for longer than its lifetime is dropped.
        let idle = (PATH_FORECAST_LIFETIME_S / 0.3) as usize;
        for _ in 1..idle {
            f.report(&waiting_on_the_dirty_log);
            f.row(row(1.0));
        }
        assert_eq!(f.bytes_per_second(), Some(7.5e6));
        f.report(&waiting_on_the_dirty_log);
        f.row(row(1.0));
        assert_eq!(f.bytes_per_second(), None);
    }

    #[test]
    fn features_are_relative_to_the_recent_rate_and_the_window_s_lowest_rtt() {
        let row = |acked: f64, rtt: f64| LinkRecord {
            acked_mbit: acked,
            delivery_mbit: 2.0 * acked,
            send_mbit: acked,
            rtt_ms: rtt,
            retrans: 5,
            segments: 100,
            notsent_kib: 1000.0 / 8.192,
            ..LinkRecord::default()
        };
        let (f, reference) =
            link_features(&[row(50.0, 20.0), row(100.0, 40.0), row(100.0, 30.0)], 2);
        assert_eq!(reference, 100.0);
        assert_eq!(f.len(), 18);
        assert_eq!(&f[..6], &[0.5, 1.0, 0.5, 1.0, 0.05, 0.01]);
        assert_eq!(f[9], 2.0, "40 ms over the window's lowest 20");
        let mut e = Ewma::new(0.5);
        e.push(10.0);
        e.push(20.0);
        assert_eq!(e.value(), Some(15.0));
        let mut rule = LinkForecaster::rule(0.5);
        rule.push(row(10.0, 1.0));
        assert_eq!(
            rule.forecast().unwrap(),
            Forecast {
                mbit: vec![10.0],
                horizons_s: vec![],
                by: "ewma"
            }
        );
    }
}
