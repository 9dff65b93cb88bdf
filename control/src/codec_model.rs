//! The learned compression choice: which codec a worker should run for a batch of pages
//! on a link, chosen by a model trained on measured cases, against the analytic model
//! of [`crate::codec_policy`] it would replace.
//!
//! A case is what a worker knows when it chooses (its link share, its staging rate,
//! the zero share and the zstd calibration of a small page sample) and what each
//! candidate then really costs on the whole batch (measured: `dwcp-bench ml
//! --codec-data`). The learned selector reads the analytic model's own prediction for
//! every candidate (from the sample) with the link share and the zero share, and scores
//! the candidates: it can learn where the sample misleads the formula, and it falls
//! back on the formula's ranking where it has nothing to add. It is judged on content
//! families it was not trained on (`models/README.md`); it is not wired into the
//! policy, which keeps the analytic choice unless the selector beats it there.

use crate::codec_policy::{
    Candidate, CostInputs, ENCODE_RATE_PRIOR, PolicyConfig, seconds_per_byte,
};
use crate::predict::{CardChecks, ModelError, checked_plan, read_card, run_plan};
use dwcp_dataplane::codec::calibrate::Calibration;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::TypedRunnableModel;

/// The zstd levels a case measures (the policy's fast and middle levels).
pub const LEVELS: [i32; 5] = [-5, -1, 1, 3, 6];
/// The model's file in its directory.
pub const MODEL_FILE: &str = "codec-choice.onnx";
/// Its card.
pub const CARD_FILE: &str = "codec-choice.card.json";
/// A candidate the formula cannot price (a level not measured) counts as this slow,
/// seconds per MB, in the features.
const UNPRICED_SECONDS_PER_MB: f64 = 1000.0;

/// The candidates, in the order of the model's scores.
pub fn candidates() -> Vec<Candidate> {
    std::iter::once(Candidate::Off)
        .chain(LEVELS.iter().map(|&l| Candidate::Zstd(l)))
        .collect()
}

/// What a worker knows when it chooses.
#[derive(Debug, Clone)]
pub struct ChoiceInputs {
    /// Its share of the link, bytes per second.
    pub share: f64,
    /// Staging throughput with codecs off, bytes per second.
    pub raw_rate: f64,
    /// zstd at each level on a page sample (its zero share too).
    pub calibration: Calibration,
}

impl ChoiceInputs {
    /// The analytic model's cost inputs for this case (round 0: no cache gain yet).
    pub fn cost_inputs(&self) -> CostInputs<'_> {
        CostInputs {
            share: self.share,
            raw_rate: self.raw_rate,
            encode_rate: ENCODE_RATE_PRIOR,
            cache_gain: None,
            calibration: Some(&self.calibration),
            dictionary: false,
            speed_correction: 1.0,
            ratio_correction: 1.0,
            cpu_margin: PolicyConfig::default().cpu_margin,
        }
    }

    /// The analytic model's seconds per MB for each of [`candidates`].
    pub fn analytic_seconds_per_mb(&self) -> Vec<f64> {
        let inputs = self.cost_inputs();
        candidates()
            .into_iter()
            .map(|c| seconds_per_byte(c, &inputs).map_or(UNPRICED_SECONDS_PER_MB, |s| s * 1e6))
            .collect()
    }

    /// The analytic choice: the candidate it predicts fastest.
    pub fn analytic_choice(&self) -> Candidate {
        argmin(&self.analytic_seconds_per_mb())
    }
}

/// The names of the model's inputs, in order.
pub fn feature_names() -> Vec<String> {
    candidates()
        .into_iter()
        .map(|c| format!("log10_analytic_s_per_mb_{}", c.name()))
        .chain(["log10_share_mbyte_s".into(), "zero_fraction".into()])
        .collect()
}

/// The model's inputs for a case. Must match what `models/codec/train.py` reads (the
/// generator writes these columns with this function).
pub fn choice_features(case: &ChoiceInputs) -> Vec<f32> {
    case.analytic_seconds_per_mb()
        .into_iter()
        .map(|s| s.log10() as f32)
        .chain([
            (case.share / 1e6).log10() as f32,
            case.calibration.zero_fraction as f32,
        ])
        .collect()
}

/// The candidate with the least of `costs` (one per [`candidates`]).
pub fn argmin(costs: &[f64]) -> Candidate {
    let all = candidates();
    costs
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map_or(Candidate::Off, |(i, _)| all[i])
}

/// What `models/codec/train.py` writes beside the model.
#[derive(Debug, Clone, Deserialize)]
pub struct ChoiceCard {
    pub name: String,
    pub version: u32,
    pub features: Vec<String>,
    pub candidates: Vec<String>,
    pub model: crate::predict::CardModel,
    /// Whether it beat the analytic choice on the held-out cases when trained.
    pub beats_baseline: bool,
    pub test_vectors: Vec<ChoiceVector>,
}

/// Features and the scores the trainer computed for them.
#[derive(Debug, Clone, Deserialize)]
pub struct ChoiceVector {
    pub features: Vec<f32>,
    pub scores: Vec<f64>,
}

impl CardChecks for ChoiceCard {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name != "codec-choice" || self.version != 1 {
            p.push(format!(
                "card for {} version {}, this code runs codec-choice version 1",
                self.name, self.version
            ));
        }
        if self.features != feature_names() {
            p.push(format!(
                "features {:?}, this code computes {:?}",
                self.features,
                feature_names()
            ));
        }
        let names: Vec<String> = candidates().into_iter().map(Candidate::name).collect();
        if self.candidates != names {
            p.push(format!(
                "candidates {:?}, this code chooses among {names:?}",
                self.candidates
            ));
        }
        if self.test_vectors.is_empty() {
            p.push("no test vectors".into());
        }
        p
    }
}

/// The learned selector, checked against its card.
pub struct CodecChoiceModel {
    card: ChoiceCard,
    plan: Arc<TypedRunnableModel>,
}

impl CodecChoiceModel {
    /// Load `dir/codec-choice.onnx` and check it against `dir/codec-choice.card.json`:
    /// its SHA-256, its inputs and candidates, and every test vector.
    pub fn load(dir: &Path) -> Result<CodecChoiceModel, ModelError> {
        let (card, card_path) = read_card::<ChoiceCard>(&dir.join(CARD_FILE))?;
        let model_path = dir.join(MODEL_FILE);
        let plan = checked_plan(&model_path, &card.model.onnx_sha256, card.features.len())?;
        let model = CodecChoiceModel { card, plan };
        for (index, v) in model.card.test_vectors.iter().enumerate() {
            let got = model.scores(&v.features).map_err(|why| ModelError::Onnx {
                path: model_path.clone(),
                why,
            })?;
            let close = got.len() == v.scores.len()
                && got
                    .iter()
                    .zip(&v.scores)
                    .all(|(g, w)| (g - w).abs() <= 1e-3 * w.abs().max(1.0));
            if !close {
                return Err(ModelError::Card {
                    path: card_path,
                    why: format!(
                        "test vector {index}: the model scores {got:?}, the card {:?}",
                        v.scores
                    ),
                });
            }
        }
        Ok(model)
    }

    /// The card it was checked against.
    pub fn card(&self) -> &ChoiceCard {
        &self.card
    }

    /// One score per candidate (higher: more likely fastest).
    pub fn scores(&self, features: &[f32]) -> Result<Vec<f64>, String> {
        Ok(run_plan(&self.plan, features)?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// The candidate it scores highest for `case`.
    pub fn choose(&self, case: &ChoiceInputs) -> Result<Candidate, String> {
        let scores = self.scores(&choice_features(case))?;
        let negated: Vec<f64> = scores.iter().map(|s| -s).collect();
        Ok(argmin(&negated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_dataplane::codec::calibrate::LevelMeasurement;

    fn case(share: f64) -> ChoiceInputs {
        ChoiceInputs {
            share,
            raw_rate: 3e9,
            calibration: Calibration {
                pages: 64,
                zero_fraction: 0.3,
                levels: LEVELS
                    .iter()
                    .map(|&level| LevelMeasurement {
                        level,
                        ratio: 2.0 + f64::from(level) * 0.1,
                        bytes_per_second: 1e9 / (1.0 + f64::from(level.max(0))),
                        ratio_with_dictionary: None,
                    })
                    .collect(),
                seconds: 0.0,
            },
        }
    }

    #[test]
    fn the_analytic_choice_is_off_on_a_fast_link_and_a_level_on_a_slow_one() {
        assert_eq!(case(5e9).analytic_choice(), Candidate::Off);
        assert!(matches!(case(5e6).analytic_choice(), Candidate::Zstd(_)));
        let f = choice_features(&case(5e6));
        assert_eq!(f.len(), feature_names().len());
        assert!((f[candidates().len()] - 5f32.log10()).abs() < 1e-6);
    }

    #[test]
    fn the_committed_model_loads_and_a_tampered_card_is_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/codec");
        let model = CodecChoiceModel::load(&dir).expect("the committed model loads");
        assert!(model.choose(&case(5e6)).is_ok());
        let copy = std::env::temp_dir().join(format!("dwcp-codec-model-{}", std::process::id()));
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::copy(dir.join(MODEL_FILE), copy.join(MODEL_FILE)).unwrap();
        let card = std::fs::read_to_string(dir.join(CARD_FILE)).unwrap();
        std::fs::write(
            copy.join(CARD_FILE),
            card.replace("\"zero_fraction\"", "\"zeros\""),
        )
        .unwrap();
        let err = CodecChoiceModel::load(&copy)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("features"), "{err}");
        let _ = std::fs::remove_dir_all(&copy);
    }
}
