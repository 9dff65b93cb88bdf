//! The interface between the migration engine and a codec policy.
//!
//! The engine owns the mechanics: it gathers what the workers and sockets report into an
//! [`Observation`] every decision interval, runs the calibrations and dictionary training
//! a policy asks for (on threads of their own), and sends the settings it returns to
//! the workers. The policy owns the judgement: a plain function of observations, with
//! no clock, socket or thread of its own, so it can be tested on made-up inputs and
//! replaced (the control crate holds the model; a learned selector can take its place).

use super::calibrate::Calibration;
use super::encode::{CodecCounters, CodecSettings};
use std::time::Duration;

/// How the source chooses codec settings.
#[derive(Debug, Clone, PartialEq)]
pub enum CodecMode {
    /// No codecs: pages go out as they are (zero pages are still markers).
    Off,
    /// These settings throughout (an operator's override).
    Fixed(CodecSettings),
    /// The policy decides, live.
    Auto,
}

/// Codec settings of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecConfig {
    /// Who decides.
    pub mode: CodecMode,
    /// Page cache for deltas and dedup, bytes, shared out over the streams (QEMU's
    /// `xbzrle-cache-size` defaults to 64 MiB).
    pub cache_bytes: usize,
    /// Bytes of frames per compressed batch (64 KiB to 1 MiB) at the fast levels.
    pub batch_bytes: usize,
    /// Batch size from level `large_batch_level` up. The slow levels run on slow links,
    /// where a batch's latency does not matter, and zstd does better on 1 MiB than on
    /// 256 KiB there: on the reference images level 12 packs 1% tighter and runs 2.5×
    /// faster (its parameters for inputs over 256 KiB are another table).
    pub large_batch_bytes: usize,
    /// The first level that uses `large_batch_bytes`.
    pub large_batch_level: i32,
    /// Largest XBZRLE delta sent instead of a page, bytes.
    pub delta_limit: usize,
    /// Train a dictionary on a sample of guest memory when compression is chosen.
    pub dictionary: bool,
    /// Largest dictionary, bytes.
    pub dictionary_bytes: usize,
    /// Pages sampled to train it.
    pub dictionary_sample_pages: usize,
    /// Pages sampled to calibrate the levels.
    pub calibration_pages: usize,
    /// zstd levels the policy may choose from, fastest first.
    pub levels: Vec<i32>,
    /// Time between decisions.
    pub decision_interval: Duration,
    /// Time before the first decision (the link is measured raw until then).
    pub first_decision: Duration,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            mode: CodecMode::Auto,
            cache_bytes: 64 << 20,
            batch_bytes: 256 << 10,
            large_batch_bytes: 1 << 20,
            large_batch_level: 9,
            delta_limit: crate::memory::PAGE_SIZE / 2,
            dictionary: true,
            dictionary_bytes: 64 << 10,
            dictionary_sample_pages: 2048,
            calibration_pages: 256,
            levels: vec![-5, -1, 1, 3, 6, 9, 12, 16, 19],
            decision_interval: Duration::from_millis(200),
            // A few telemetry intervals of raw sending measure the link.
            first_decision: Duration::from_millis(40),
        }
    }
}

impl CodecConfig {
    /// The batch size for `level`.
    pub fn batch_for(&self, level: i32) -> usize {
        if level >= self.large_batch_level {
            self.large_batch_bytes
        } else {
            self.batch_bytes
        }
    }

    /// The largest batch any level uses.
    pub fn max_batch_bytes(&self) -> usize {
        self.batch_bytes.max(self.large_batch_bytes)
    }

    /// Codecs entirely off.
    pub fn off() -> Self {
        CodecConfig {
            mode: CodecMode::Off,
            ..CodecConfig::default()
        }
    }

    /// Whether workers need codec state at all.
    pub fn enabled(&self) -> bool {
        match &self.mode {
            CodecMode::Off => false,
            CodecMode::Fixed(s) => !s.is_off(),
            CodecMode::Auto => true,
        }
    }
}

/// What one worker did over the last interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct WorkerObservation {
    /// Worker index.
    pub worker: usize,
    /// Streams it owns.
    pub streams: u16,
    /// Settings it ran with.
    pub settings: CodecSettings,
    /// Codec counters over the interval.
    pub codec: CodecCounters,
    /// Bytes staged without codecs over the interval, and the time it took.
    pub staged_bytes: u64,
    /// Nanoseconds.
    pub stage_nanos: u64,
    /// Fraction of the interval it could not stage for lack of socket space.
    pub stalled: f64,
}

/// What the network did over the last interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LinkObservation {
    /// Bytes the peer acknowledged, all streams, per second.
    pub acked_bytes_per_second: f64,
    /// Sum of the streams' `TCP_INFO` delivery-rate estimates, bytes per second.
    pub delivery_rate: f64,
    /// Smallest smoothed RTT of the streams, microseconds.
    pub rtt_us: u32,
    /// Retransmitted segments over the interval.
    pub retransmits: u32,
    /// Of the time the streams had bytes outstanding over the interval, the fraction
    /// the receiver's window held them back (`TCP_INFO` `rwnd_limited` / `busy_time`):
    /// near 1 when the destination, not the network, sets the pace.
    pub receiver_limited: f64,
    /// Bytes written to the streams and not yet sent, all streams, at the decision.
    pub unsent_bytes: u64,
    /// The sum of the streams' send-rate caps (`SO_MAX_PACING_RATE`: `[transport]
    /// pacing_rate`, or the cluster's share of the site's WAN budget), bytes per
    /// second; `None` unless every stream is capped.
    pub pacing_cap: Option<f64>,
    /// The slow path's forecast of what the path will carry over the next second,
    /// bytes per second ([`LiveControl::set_path_rate`](crate::engine::LiveControl::set_path_rate)).
    pub forecast_bytes_per_second: Option<f64>,
}

/// Everything a policy sees at a decision.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Observation {
    /// Time since the migration started.
    pub elapsed: f64,
    /// Length of the interval the figures cover, seconds.
    pub interval: f64,
    /// The pre-copy round going on.
    pub round: u64,
    /// Pages left to send in the round.
    pub round_pages_left: u64,
    /// The network.
    pub link: LinkObservation,
    /// The workers.
    pub workers: Vec<WorkerObservation>,
    /// The latest calibration, if any was run.
    pub calibration: Option<Calibration>,
    /// The dictionary's size in bytes, once trained.
    pub dictionary_bytes: Option<usize>,
}

/// What a policy asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Settings per worker (index = worker); missing entries keep theirs.
    pub settings: Vec<CodecSettings>,
    /// Run a calibration (levels up to the first slower than this many bytes per
    /// second per core); ignored while one is running.
    pub calibrate: Option<f64>,
    /// Train a dictionary; ignored once one exists or while training.
    pub train_dictionary: bool,
    /// One JSON object describing the inputs and the choice, for the decision log.
    pub log: Option<String>,
}

/// A codec policy: settings from observations.
pub trait CodecPolicy: Send {
    /// Decide on the latest observation.
    fn decide(&mut self, observation: &Observation) -> Decision;
}
