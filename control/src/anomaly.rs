//! Path anomaly detection for the control thread: is a migration's path going bad?
//!
//! Two detectors read the last [`HISTORY`] link rows ([`crate::linkrec`]) and judge the
//! last [`RECENT`] of them against the ones before:
//! - the rule, a rolling z-score: the acknowledged rate's fall or the RTT's rise, in
//!   standard deviations of the rows before, above a threshold;
//! - a learned detector (`models/anomaly`, logistic regression run with tract), checked
//!   against its model card as the link model is ([`crate::predict`]).
//!
//! The rule is the default: the learned detector does not beat it on held-out paths
//! (`models/README.md`). Both are sans-IO functions of rows; [`PathWatch`] keeps one
//! migration's flag, its reason and how many episodes it has seen.
//!
//! [`StreamWatch`] judges each data stream on its own: a stream is going bad when its
//! own rows show it (the same z-score, at [`STREAM_ZSCORE_THRESHOLD`]) *and* it is worse
//! than its siblings now (RTT [`PEER_RTT_RATIO`] times theirs, or an acknowledged rate
//! [`PEER_RATE_RATIO`] of theirs). The sibling test keeps a path-wide change (every
//! stream slowing together: the path's flag) from flagging every stream, and a stream's
//! own swings (pages are dealt in chunks) from flagging it alone; an RTT must also be
//! [`PEER_RTT_MIN_GAP_MS`] above theirs. No labelled
//! per-stream recordings exist yet, so its thresholds are set, not learned.

use crate::linkrec::{LinkRecord, StreamRecord};
use crate::predict::{
    CardChecks, CardData, CardModel, ModelError, check_test_vectors, checked_plan, read_card,
    run_plan,
};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::TypedRunnableModel;

/// Rows a detector reads.
pub const HISTORY: usize = 16;
/// Of which the recent ones it judges.
pub const RECENT: usize = 3;
/// The z-score threshold tuned on the training recordings (`models/anomaly/train.py`).
pub const DEFAULT_ZSCORE_THRESHOLD: f64 = 2.0;
/// The model's file name in its directory.
pub const MODEL_FILE: &str = "path-anomaly.onnx";
/// The card's file name in the model's directory.
pub const CARD_FILE: &str = "path-anomaly.card.json";
/// The features, in the order the model reads them.
pub const FEATURES: [&str; 7] = [
    "acked_recent/before",
    "delivery_recent/before",
    "rtt_recent/before",
    "rtt_recent/min_rtt",
    "loss_recent",
    "loss_before",
    "acked_cv",
];

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

fn loss_percent(rows: &[LinkRecord]) -> f64 {
    let sent: u64 = rows.iter().map(|r| r.segments).sum();
    let retrans: u64 = rows.iter().map(|r| r.retrans).sum();
    if sent > 0 {
        retrans as f64 / sent as f64 * 100.0
    } else {
        0.0
    }
}

/// The learned detector's input for a window (oldest row first, at least `RECENT + 1`
/// rows). Must compute what `features` in `models/anomaly/train.py` does.
pub fn anomaly_features(window: &[LinkRecord]) -> Vec<f32> {
    let (before, recent) = window.split_at(window.len() - RECENT);
    let acked_before = mean(before.iter().map(|r| r.acked_mbit)).max(1.0);
    let delivery_before = mean(before.iter().map(|r| r.delivery_mbit)).max(1.0);
    let min_rtt = window
        .iter()
        .map(|r| r.rtt_ms)
        .filter(|&r| r > 0.0)
        .fold(f64::INFINITY, f64::min);
    let min_rtt = if min_rtt.is_finite() { min_rtt } else { 1.0 };
    let rtt_before = mean(before.iter().map(|r| r.rtt_ms)).max(1e-3);
    let acked_mean = mean(window.iter().map(|r| r.acked_mbit)).max(1.0);
    let cv = mean(window.iter().map(|r| (r.acked_mbit - acked_mean).powi(2))).sqrt() / acked_mean;
    let rtt_recent = mean(recent.iter().map(|r| r.rtt_ms));
    [
        mean(recent.iter().map(|r| r.acked_mbit)) / acked_before,
        mean(recent.iter().map(|r| r.delivery_mbit)) / delivery_before,
        rtt_recent / rtt_before,
        rtt_recent / min_rtt,
        loss_percent(recent),
        loss_percent(before),
        cv,
    ]
    .iter()
    .map(|&x| x.clamp(-50.0, 50.0) as f32)
    .collect()
}

/// The rule's statistic for a window: the larger of the acknowledged rate's fall and
/// the RTT's rise over the recent rows, in standard deviations of the rows before;
/// and which of the two it was. Must compute what `zscore` in the trainer does.
pub fn zscore(window: &[LinkRecord]) -> (f64, &'static str) {
    let (before, recent) = window.split_at(window.len() - RECENT);
    let mut worst = (0.0, "");
    for (value, sign, name) in [
        (
            (|r: &LinkRecord| r.acked_mbit) as fn(&LinkRecord) -> f64,
            -1.0,
            "acknowledged rate fell",
        ),
        (|r: &LinkRecord| r.rtt_ms, 1.0, "RTT rose"),
    ] {
        let m = mean(before.iter().map(value));
        let sd = mean(before.iter().map(|r| (value(r) - m).powi(2)))
            .sqrt()
            .max(1e-6 * m.abs().max(1.0));
        let z = sign * (mean(recent.iter().map(value)) - m) / sd;
        if z > worst.0 {
            worst = (z, name);
        }
    }
    worst
}

/// What `models/anomaly/train.py` writes beside the model (the fields this code uses).
#[derive(Debug, Clone, Deserialize)]
pub struct AnomalyCard {
    pub name: String,
    pub version: u32,
    pub input: AnomalyInput,
    pub output: AnomalyOutput,
    pub model: CardModel,
    /// The recordings (the held-out figures are the detector's and the z-score's,
    /// not read here).
    pub training: CardData,
    pub held_out: CardData,
    pub baseline: AnomalyBaseline,
    pub beats_baseline: bool,
    pub test_vectors: Vec<AnomalyVector>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnomalyInput {
    pub shape: Vec<usize>,
    pub history_rows: usize,
    pub recent_rows: usize,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnomalyOutput {
    pub shape: Vec<usize>,
    pub threshold: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnomalyBaseline {
    pub zscore_threshold: f64,
    /// After an episode ends, flags still count as detecting it for this long (s).
    pub grace_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnomalyVector {
    pub rows: Vec<HashMap<String, f64>>,
    pub probability: f64,
}

impl CardChecks for AnomalyCard {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name != "path-anomaly" || self.version != 1 {
            p.push(format!(
                "{} v{}, this code reads path-anomaly v1",
                self.name, self.version
            ));
        }
        if self.input.features != FEATURES || self.input.shape != [1, FEATURES.len()] {
            p.push(format!(
                "features {:?} of shape {:?}, this code computes {FEATURES:?}",
                self.input.features, self.input.shape
            ));
        }
        if self.input.history_rows != HISTORY || self.input.recent_rows != RECENT {
            p.push(format!(
                "{} rows of which {} recent, this code reads {HISTORY} and {RECENT}",
                self.input.history_rows, self.input.recent_rows
            ));
        }
        if self.output.shape != [1, 1] || !(0.0..1.0).contains(&self.output.threshold) {
            p.push(format!(
                "output {:?} with threshold {}",
                self.output.shape, self.output.threshold
            ));
        }
        if self.test_vectors.is_empty() {
            p.push("no test vectors".into());
        }
        p
    }
}

/// A checked anomaly model, ready to run (clones share the plan).
#[derive(Clone)]
pub struct AnomalyModel {
    card: AnomalyCard,
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for AnomalyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnomalyModel({} v{})", self.card.name, self.card.version)
    }
}

impl AnomalyModel {
    /// Load `dir/path-anomaly.onnx` and check it against its card.
    pub fn load(dir: &Path) -> Result<AnomalyModel, ModelError> {
        let (card, card_path) = read_card::<AnomalyCard>(&dir.join(CARD_FILE))?;
        let model_path = dir.join(MODEL_FILE);
        let plan = checked_plan(&model_path, &card.model.onnx_sha256, FEATURES.len())?;
        let model = AnomalyModel { card, plan };
        let vectors: Vec<_> = model
            .card
            .test_vectors
            .iter()
            .map(|v| (&v.rows[..], vec![v.probability]))
            .collect();
        check_test_vectors(&card_path, &model_path, &vectors, |rows| {
            model.probability(rows).map(|p| vec![p])
        })?;
        Ok(model)
    }

    pub fn card(&self) -> &AnomalyCard {
        &self.card
    }

    /// The probability that the path is going bad at the window's last row.
    pub fn probability(&self, window: &[LinkRecord]) -> Result<f64, String> {
        if window.len() < HISTORY {
            return Err(format!("{} rows, the model reads {HISTORY}", window.len()));
        }
        let out = run_plan(
            &self.plan,
            &anomaly_features(&window[window.len() - HISTORY..]),
        )?;
        out.first()
            .map(|&p| f64::from(p))
            .ok_or_else(|| "no output".into())
    }
}

/// The detector in force.
#[derive(Debug, Clone)]
pub enum Detector {
    /// The rolling z-score, flagging above this many standard deviations.
    ZScore(f64),
    /// The learned detector, flagging above its card's threshold.
    Model(Box<AnomalyModel>),
}

impl Detector {
    /// Whether the window's last rows are an anomaly, and why.
    pub fn judge(&self, window: &[LinkRecord]) -> Result<Option<String>, String> {
        match self {
            Detector::ZScore(threshold) => {
                let (z, what) = zscore(window);
                Ok((z > *threshold).then(|| format!("{what} {z:.1} sd (z-score)")))
            }
            Detector::Model(m) => {
                let p = m.probability(window)?;
                Ok((p > m.card.output.threshold).then(|| {
                    format!(
                        "probability {p:.2} (model {} v{})",
                        m.card.name, m.card.version
                    )
                }))
            }
        }
    }
}

/// One migration's path, watched: the flag, why, and the episodes seen.
#[derive(Debug, Clone)]
pub struct PathWatch {
    detector: Detector,
    rows: VecDeque<LinkRecord>,
    /// Since when (row time) the path is flagged, and why.
    flagged: Option<(f64, String)>,
    episodes: u64,
}

impl PathWatch {
    pub fn new(detector: Detector) -> Self {
        PathWatch {
            detector,
            rows: VecDeque::with_capacity(HISTORY),
            flagged: None,
            episodes: 0,
        }
    }

    /// Take a row; returns true when it began a new episode.
    pub fn push(&mut self, row: LinkRecord) -> bool {
        if self.rows.len() == HISTORY {
            self.rows.pop_front();
        }
        self.rows.push_back(row);
        if self.rows.len() < HISTORY {
            return false;
        }
        match self.detector.judge(self.rows.make_contiguous()) {
            Ok(Some(why)) => {
                // An episode keeps its start; its reason is the latest row's.
                let began = self.flagged.is_none();
                let since = self.flagged.as_ref().map_or(row.t, |f| f.0);
                if began {
                    self.episodes += 1;
                }
                self.flagged = Some((since, why));
                began
            }
            Ok(None) | Err(_) => {
                self.flagged = None;
                false
            }
        }
    }

    /// The flag: since when (seconds on the recorder's clock) and why.
    pub fn flagged(&self) -> Option<&(f64, String)> {
        self.flagged.as_ref()
    }

    /// Episodes flagged so far.
    pub fn episodes(&self) -> u64 {
        self.episodes
    }
}

/// A stream's own z-score above which it may be flagged (its rows swing more than the
/// path's sum).
pub const STREAM_ZSCORE_THRESHOLD: f64 = 3.0;
/// A stream flagged for RTT has at least this many times its siblings' median RTT...
pub const PEER_RTT_RATIO: f64 = 1.5;
/// ...and at least this much more (ms): on loopback or in a rack, RTTs of a tenth of a
/// millisecond double with scheduling noise alone.
pub const PEER_RTT_MIN_GAP_MS: f64 = 0.5;
/// A stream flagged for its rate acknowledges at most this share of its siblings'
/// median rate.
pub const PEER_RATE_RATIO: f64 = 0.5;
/// Below this median acknowledged rate (Mbit/s) the siblings are idle (between rounds,
/// say), and no stream is judged by its rate.
const PEER_IDLE_MBIT: f64 = 1.0;

/// A stream's figures over its last [`RECENT`] rows.
struct Recent {
    stream: u16,
    rtt_ms: f64,
    acked_mbit: f64,
}

/// Whether `stream` (its last [`HISTORY`] rows in `window`) is going bad, on its own and
/// against its siblings' `recents`, and why.
fn judge_stream(stream: u16, window: &[LinkRecord], recents: &[Recent]) -> Option<String> {
    let own = recents.iter().find(|r| r.stream == stream)?;
    let others: Vec<&Recent> = recents.iter().filter(|r| r.stream != stream).collect();
    if others.len() < 2 {
        return None;
    }
    let (z, what) = zscore(window);
    if z <= STREAM_ZSCORE_THRESHOLD {
        return None;
    }
    let (rtt, rate) = (own.rtt_ms, own.acked_mbit);
    let peer_rtt = median(
        others
            .iter()
            .map(|o| o.rtt_ms)
            .filter(|&r| r > 0.0)
            .collect(),
    )?;
    let peer_rate = median(others.iter().map(|o| o.acked_mbit).collect())?;
    if rtt > PEER_RTT_RATIO * peer_rtt && rtt - peer_rtt > PEER_RTT_MIN_GAP_MS {
        Some(format!(
            "{what} {z:.1} sd; RTT {rtt:.1} ms against {peer_rtt:.1} ms on the other streams"
        ))
    } else if peer_rate > PEER_IDLE_MBIT && rate < PEER_RATE_RATIO * peer_rate {
        Some(format!(
            "{what} {z:.1} sd; {rate:.1} Mbit/s acknowledged against {peer_rate:.1} on the \
             other streams"
        ))
    } else {
        None
    }
}

/// A migration's data streams, each watched against its own history and its siblings
/// (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct StreamWatch {
    rows: BTreeMap<u16, VecDeque<LinkRecord>>,
    /// Flagged streams: since when (row time) and why.
    flagged: BTreeMap<u16, (f64, String)>,
    episodes: u64,
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    Some(xs[xs.len() / 2])
}

impl StreamWatch {
    /// Take each stream's part of a row; returns the streams a new episode began on,
    /// with why.
    pub fn push(&mut self, rows: &[StreamRecord]) -> Vec<(u16, String)> {
        for r in rows {
            let window = self.rows.entry(r.stream).or_default();
            if window.len() == HISTORY {
                window.pop_front();
            }
            // The path detector's statistic, on this stream's figures.
            window.push_back(LinkRecord {
                t: r.t,
                acked_mbit: r.acked_mbit,
                delivery_mbit: r.delivery_mbit,
                rtt_ms: r.rtt_ms,
                rttvar_ms: r.rttvar_ms,
                retrans: r.retrans,
                segments: r.segments,
                ..LinkRecord::default()
            });
        }
        // A stream gone from the report (lost, or the count lowered) is no longer watched.
        let present: Vec<u16> = rows.iter().map(|r| r.stream).collect();
        self.rows.retain(|s, _| present.contains(s));
        self.flagged.retain(|s, _| present.contains(s));
        let recent = |w: &VecDeque<LinkRecord>, f: fn(&LinkRecord) -> f64| {
            mean(w.iter().rev().take(RECENT).map(f))
        };
        let recents: Vec<Recent> = self
            .rows
            .iter()
            .filter(|(_, w)| w.len() >= RECENT)
            .map(|(s, w)| Recent {
                stream: *s,
                rtt_ms: recent(w, |r| r.rtt_ms),
                acked_mbit: recent(w, |r| r.acked_mbit),
            })
            .collect();
        let mut began = Vec::new();
        for (stream, window) in &mut self.rows {
            let verdict = if window.len() == HISTORY {
                judge_stream(*stream, window.make_contiguous(), &recents)
            } else {
                None
            };
            match verdict {
                Some(why) => {
                    let t = window.back().map_or(0.0, |r| r.t);
                    let since = match self.flagged.get(stream) {
                        Some((since, _)) => *since,
                        None => {
                            self.episodes += 1;
                            began.push((*stream, why.clone()));
                            t
                        }
                    };
                    self.flagged.insert(*stream, (since, why));
                }
                None => {
                    self.flagged.remove(stream);
                }
            }
        }
        began
    }

    /// The streams flagged now: since when (seconds on the recorder's clock) and why.
    pub fn flagged(&self) -> &BTreeMap<u16, (f64, String)> {
        &self.flagged
    }

    /// Episodes flagged so far, over all streams.
    pub fn episodes(&self) -> u64 {
        self.episodes
    }
}

/// How a detector did on labelled rows, episode by episode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judgement {
    /// Flags within an episode (or its grace after) over all flags.
    pub precision: f64,
    /// Episodes with a flag within them (or their grace) over all episodes.
    pub recall: f64,
    pub f1: f64,
    /// Flags outside every episode per hour of healthy path.
    pub false_positives_per_hour: f64,
    /// From an episode's start to its first flag, median over detected ones (s).
    pub median_delay_s: Option<f64>,
    pub episodes: usize,
    pub flags: usize,
}

/// Judge flags against labels, per recording: `(times, labels, flags)`. Must agree
/// with `judge` in the trainer.
pub fn judge(recordings: &[(Vec<f64>, Vec<bool>, Vec<bool>)], grace_s: f64) -> Judgement {
    let (mut detected, mut total, mut true_flags, mut all_flags) = (0usize, 0usize, 0usize, 0usize);
    let (mut false_flags, mut healthy_s, mut delays) = (0usize, 0.0, Vec::new());
    for (ts, labels, flags) in recordings {
        let mut runs = Vec::new();
        let mut start = None;
        for (t, &l) in ts.iter().zip(labels) {
            match (l, start) {
                (true, None) => start = Some(*t),
                (false, Some(s)) => {
                    runs.push((s, *t));
                    start = None;
                }
                _ => {}
            }
        }
        if let (Some(s), Some(&last)) = (start, ts.last()) {
            runs.push((s, last));
        }
        total += runs.len();
        let inside = |t: f64| runs.iter().any(|&(s, e)| s <= t && t <= e + grace_s);
        for &(s, e) in &runs {
            if let Some(first) = ts
                .iter()
                .zip(flags)
                .find(|&(&t, &f)| f && s <= t && t <= e + grace_s)
            {
                detected += 1;
                delays.push(first.0 - s);
            }
        }
        for (&t, &f) in ts.iter().zip(flags) {
            if f {
                all_flags += 1;
                if inside(t) {
                    true_flags += 1;
                } else {
                    false_flags += 1;
                }
            }
        }
        if let (Some(first), Some(last)) = (ts.first(), ts.last()) {
            healthy_s += (last - first)
                - runs
                    .iter()
                    .map(|&(s, e)| (e + grace_s).min(*last) - s)
                    .sum::<f64>();
        }
    }
    let precision = if all_flags > 0 {
        true_flags as f64 / all_flags as f64
    } else {
        0.0
    };
    let recall = if total > 0 {
        detected as f64 / total as f64
    } else {
        0.0
    };
    delays.sort_by(f64::total_cmp);
    Judgement {
        precision,
        recall,
        f1: if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        },
        false_positives_per_hour: false_flags as f64 / healthy_s.max(1e-9) * 3600.0,
        median_delay_s: (!delays.is_empty()).then(|| {
            let n = delays.len();
            if n % 2 == 1 {
                delays[n / 2]
            } else {
                (delays[n / 2 - 1] + delays[n / 2]) / 2.0
            }
        }),
        episodes: total,
        flags: all_flags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows for four streams at `t`: each at `rate` Mbit/s and `rtt` ms, with a little
    /// noise, then `change` applied to each (stream id, rate, rtt).
    fn streams_at(t: usize, change: impl Fn(u16, f64, f64) -> (f64, f64)) -> Vec<StreamRecord> {
        (0..4u16)
            .map(|s| {
                let wobble = ((t * 7 + usize::from(s) * 3) % 5) as f64 / 5.0;
                let (rate, rtt) = change(s, 100.0 + 4.0 * wobble, 10.0 + 0.4 * wobble);
                StreamRecord {
                    t: t as f64 * 0.3,
                    stream: s,
                    acked_mbit: rate,
                    rtt_ms: rtt,
                    ..StreamRecord::default()
                }
            })
            .collect()
    }

    /// A watch fed `HISTORY - RECENT` steady rows, then `RECENT` rows changed by
    /// `change`; the streams flagged at the end.
    fn watch_through(change: impl Fn(u16, f64, f64) -> (f64, f64)) -> (StreamWatch, Vec<u16>) {
        let mut watch = StreamWatch::default();
        for t in 0..HISTORY - RECENT {
            assert!(watch.push(&streams_at(t, |_, r, d| (r, d))).is_empty());
        }
        for t in HISTORY - RECENT..HISTORY {
            watch.push(&streams_at(t, &change));
        }
        let flagged = watch.flagged().keys().copied().collect();
        (watch, flagged)
    }

    #[test]
    fn one_stream_going_bad_is_flagged_and_the_path_going_bad_flags_none() {
        // One stream's RTT quadruples: that stream, for its RTT.
        let (watch, flagged) = watch_through(|s, r, d| if s == 2 { (r, 4.0 * d) } else { (r, d) });
        assert_eq!(flagged, [2]);
        let why = &watch.flagged()[&2].1;
        assert!(
            why.contains("RTT rose") && why.contains("other streams"),
            "{why}"
        );
        assert_eq!(watch.episodes(), 1);
        // One stream's rate falls to a tenth: that stream, for its rate.
        let (watch, flagged) = watch_through(|s, r, d| if s == 1 { (r / 10.0, d) } else { (r, d) });
        assert_eq!(flagged, [1]);
        assert!(watch.flagged()[&1].1.contains("acknowledged rate fell"));
        // Every stream's RTT quadruples at once: the path's matter, no stream's.
        let (_, flagged) = watch_through(|_, r, d| (r, 4.0 * d));
        assert!(flagged.is_empty(), "{flagged:?}");
        // Every stream idle (between rounds): nothing.
        let (_, flagged) = watch_through(|_, _, d| (0.0, d));
        assert!(flagged.is_empty(), "{flagged:?}");
    }

    #[test]
    fn a_flag_keeps_its_start_and_a_stream_gone_from_the_report_is_forgotten() {
        let bad = |s: u16, r: f64, d: f64| if s == 3 { (r, 5.0 * d) } else { (r, d) };
        let (mut watch, flagged) = watch_through(bad);
        assert_eq!(flagged, [3]);
        let since = watch.flagged()[&3].0;
        // Still bad a row later: the same episode, from the same start.
        assert!(watch.push(&streams_at(HISTORY, bad)).is_empty());
        assert_eq!((watch.flagged()[&3].0, watch.episodes()), (since, 1));
        // Stream 3 lost: no longer reported, no longer flagged.
        let mut rows = streams_at(HISTORY + 1, bad);
        rows.retain(|r| r.stream != 3);
        watch.push(&rows);
        assert!(watch.flagged().is_empty());
    }

    /// The model shipped in `models/anomaly`.
    fn shipped_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/anomaly")
    }

    fn row(t: f64, acked: f64, rtt: f64) -> LinkRecord {
        LinkRecord {
            t,
            acked_mbit: acked,
            delivery_mbit: acked,
            rtt_ms: rtt,
            segments: 100,
            ..LinkRecord::default()
        }
    }

    #[test]
    fn the_z_score_flags_a_fall_of_the_rate_or_a_rise_of_the_rtt_and_the_watch_counts_episodes() {
        let steady: Vec<LinkRecord> = (0..HISTORY)
            .map(|i| {
                row(
                    i as f64 * 0.3,
                    100.0 + (i % 2) as f64,
                    40.0 + (i % 3) as f64 * 0.1,
                )
            })
            .collect();
        assert!(zscore(&steady).0 < 2.0);
        let mut fell = steady.clone();
        for r in fell.iter_mut().rev().take(RECENT) {
            r.acked_mbit = 60.0;
        }
        let (z, what) = zscore(&fell);
        assert!(z > 10.0 && what == "acknowledged rate fell", "{z} {what}");
        let mut queued = steady.clone();
        for r in queued.iter_mut().rev().take(RECENT) {
            r.rtt_ms = 60.0;
        }
        assert_eq!(zscore(&queued).1, "RTT rose");
        let mut watch = PathWatch::new(Detector::ZScore(DEFAULT_ZSCORE_THRESHOLD));
        for r in &steady {
            assert!(!watch.push(*r));
        }
        assert!(watch.flagged().is_none());
        let mut t = 10.0;
        let mut push = |w: &mut PathWatch, acked: f64| {
            t += 0.3;
            w.push(row(t, acked, 40.0))
        };
        assert!(!push(&mut watch, 100.0));
        assert!(push(&mut watch, 30.0), "a new episode");
        assert!(!push(&mut watch, 30.0), "the same one");
        assert!(
            watch
                .flagged()
                .unwrap()
                .1
                .contains("acknowledged rate fell")
        );
        for _ in 0..HISTORY {
            push(&mut watch, 30.0);
        }
        assert!(watch.flagged().is_none(), "the new rate is the path's now");
        assert_eq!(watch.episodes(), 1);
    }

    #[test]
    fn judging_counts_episodes_flags_outside_them_and_delays() {
        let ts: Vec<f64> = (0..20).map(|i| i as f64).collect();
        let labels: Vec<bool> = (0..20)
            .map(|i| (5..8).contains(&i) || (14..16).contains(&i))
            .collect();
        // The first episode flagged a second late, the second missed, one flag at 11 s.
        let flags: Vec<bool> = (0..20).map(|i| i == 6 || i == 11).collect();
        let j = judge(&[(ts, labels, flags)], 1.0);
        assert_eq!((j.episodes, j.flags), (2, 2));
        assert_eq!((j.precision, j.recall), (0.5, 0.5));
        assert_eq!(j.median_delay_s, Some(1.0));
        // 19 s, of which 4 + 3 in episodes and their grace: one false flag in 12 s.
        assert!((j.false_positives_per_hour - 300.0).abs() < 1e-9, "{j:?}");
    }

    #[test]
    fn the_shipped_model_passes_its_cards_checks_and_a_changed_one_does_not() {
        let m = AnomalyModel::load(&shipped_dir()).expect("the shipped detector loads");
        assert!(m.card().output.threshold > 0.0);
        let dir = std::env::temp_dir().join(format!("dwcp-anomaly-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [MODEL_FILE, CARD_FILE] {
            std::fs::copy(shipped_dir().join(f), dir.join(f)).unwrap();
        }
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CARD_FILE)).unwrap()).unwrap();
        card["test_vectors"][0]["probability"] = 0.123456.into();
        std::fs::write(dir.join(CARD_FILE), card.to_string()).unwrap();
        let e = AnomalyModel::load(&dir).unwrap_err();
        assert!(matches!(e, ModelError::TestVector { index: 0, .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
