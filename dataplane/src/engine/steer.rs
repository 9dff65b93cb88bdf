//! Codec steering on the source: the engine's side of the codec policy.
//!
//! Every decision interval it turns what the workers and sockets reported into an
//! [`Observation`], asks the policy, and returns the commands that carry its decision
//! to the workers. Calibrations and dictionary training run on threads of their own
//! (they take milliseconds to a second; the engine must keep feeding workers), and their
//! results join the next observation. In a fixed mode there is no policy; steering then
//! only trains the dictionary the settings ask for.

use crate::codec::calibrate::{self, Calibration};
use crate::codec::policy::{
    CodecConfig, CodecMode, CodecPolicy, Decision, LinkObservation, Observation, WorkerObservation,
};
use crate::codec::zstd::Dictionary;
use crate::codec::{CodecCounters, CodecSettings};
use crate::memory::GuestMemory;
use crate::transport::{StreamTelemetry, TxControl, WorkerTelemetry};
use crossbeam::channel::{Receiver, TryRecvError};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Shortest time between decisions.
const MIN_DECISION_GAP: std::time::Duration = std::time::Duration::from_millis(20);

/// The id of the session's dictionary (one per session).
const DICTIONARY_ID: u32 = 1;

/// A dictionary training's result and the seconds it took.
type Trained = (Result<Vec<u8>, String>, f64);

/// A change of settings, for the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SettingsChange {
    /// Seconds since round 0 started.
    pub at: f64,
    /// Worker.
    pub worker: usize,
    /// The new settings.
    pub settings: CodecSettings,
}

/// What the codecs did in a migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CodecReport {
    /// `off`, `fixed` or `auto`.
    pub mode: String,
    /// Counters summed over the workers.
    pub counters: CodecCounters,
    /// Every change of settings.
    pub changes: Vec<SettingsChange>,
    /// The policy's decision log: one JSON object per decision.
    pub decisions: Vec<String>,
    /// The latest calibration.
    pub calibration: Option<Calibration>,
    /// Size of the trained dictionary, bytes.
    pub dictionary_bytes: Option<usize>,
    /// Seconds the dictionary took to train.
    pub dictionary_seconds: Option<f64>,
    /// Why training failed, if it did.
    pub dictionary_error: Option<String>,
}

/// The engine's codec steering for one session.
pub struct Steering<'p> {
    config: CodecConfig,
    /// Who decides now (live control may change it).
    mode: CodecMode,
    /// The policy, kept even while the mode is fixed, for a switch back to automatic.
    policy: Option<&'p mut dyn CodecPolicy>,
    memory: Arc<GuestMemory>,
    /// Streams per worker.
    streams_of: Vec<u16>,
    started: Instant,
    next_decision: Instant,
    last_decision: Instant,
    /// Latest cumulative telemetry per worker, and as of the previous decision.
    latest: Vec<WorkerTelemetry>,
    previous: Vec<WorkerTelemetry>,
    /// Counters of workers replaced by a transport switch.
    retired: CodecCounters,
    /// Per stream as of the previous decision: bytes acknowledged, retransmits, and
    /// the microseconds busy and receiver-window limited (`TCP_INFO`).
    marks: Vec<StreamMarks>,
    /// The slow path's forecast of the path's rate, bytes per second.
    path_rate: Option<f64>,
    settings: Vec<CodecSettings>,
    calibration: Option<Calibration>,
    /// Results of the calibration running, level by level.
    calibrating: Option<Receiver<Calibration>>,
    /// A calibration to run when the current one ends.
    recalibrate: Option<f64>,
    /// The bound the last calibration started was asked for (levels slower than this
    /// per core were left out).
    calibrated_down_to: Option<f64>,
    training: Option<Receiver<Trained>>,
    dictionary: Option<Arc<Dictionary>>,
    report: CodecReport,
}

impl<'p> Steering<'p> {
    /// Steering for workers owning `streams_of[w]` streams each, starting with
    /// `initial` on every worker.
    pub fn new(
        config: &CodecConfig,
        policy: Option<&'p mut dyn CodecPolicy>,
        memory: Arc<GuestMemory>,
        streams_of: Vec<u16>,
        total_streams: u16,
        initial: CodecSettings,
    ) -> Self {
        let now = Instant::now();
        let workers = streams_of.len();
        // A session without a policy never gets here in automatic mode (its codecs
        // stay off), so the mode names who decides.
        let mode = match &config.mode {
            CodecMode::Off => "off",
            CodecMode::Fixed(_) => "fixed",
            CodecMode::Auto => "auto",
        };
        Steering {
            config: config.clone(),
            mode: config.mode.clone(),
            policy,
            memory,
            streams_of,
            started: now,
            next_decision: now + config.first_decision,
            last_decision: now,
            latest: (0..workers)
                .map(|worker| WorkerTelemetry {
                    worker,
                    ..WorkerTelemetry::default()
                })
                .collect(),
            previous: vec![WorkerTelemetry::default(); workers],
            retired: CodecCounters::default(),
            marks: vec![StreamMarks::default(); usize::from(total_streams)],
            path_rate: None,
            settings: vec![initial; workers],
            calibration: None,
            calibrating: None,
            recalibrate: None,
            calibrated_down_to: None,
            training: None,
            dictionary: None,
            report: CodecReport {
                mode: mode.into(),
                ..CodecReport::default()
            },
        }
    }

    /// Restart the clocks (round 0 starts now).
    pub fn start(&mut self) {
        let now = Instant::now();
        self.started = now;
        self.last_decision = now;
        self.next_decision = now + self.config.first_decision;
        if self.mode != CodecMode::Auto && self.settings.iter().any(|s| s.dictionary) {
            self.train_dictionary();
        }
    }

    /// Change who decides: codecs off, fixed settings on every worker, or the policy.
    /// Returns the commands for the workers, or why the change cannot be made.
    pub fn set_mode(&mut self, mode: CodecMode) -> Result<Vec<(usize, TxControl)>, String> {
        let now = Instant::now();
        let mut commands = Vec::new();
        let fixed = match mode {
            CodecMode::Auto => {
                if self.policy.is_none() {
                    return Err("codecs auto: no policy in this session; unchanged".into());
                }
                // Decide soon, from fresh counters.
                self.next_decision = now + MIN_DECISION_GAP;
                None
            }
            CodecMode::Off => Some(CodecSettings {
                batch_bytes: self.config.batch_bytes,
                delta_limit: self.config.delta_limit,
                ..CodecSettings::OFF
            }),
            CodecMode::Fixed(settings) => Some(settings),
        };
        self.mode = mode;
        self.report.mode = match &self.mode {
            CodecMode::Off => "off",
            CodecMode::Fixed(_) => "fixed",
            CodecMode::Auto => "auto",
        }
        .into();
        if let Some(settings) = fixed {
            let decision = Decision {
                settings: vec![settings; self.settings.len()],
                ..Decision::default()
            };
            self.apply(decision, now, &mut commands);
            if settings.dictionary {
                self.train_dictionary();
            }
        }
        Ok(commands)
    }

    /// The workers were replaced (a transport switch): `streams_of[w]` streams each
    /// now. The old workers' counters stay in the totals; every new worker gets the
    /// settings in force (the first old worker's, where they differed) and the
    /// dictionary. Returns the commands for the new workers.
    pub fn set_workers(&mut self, streams_of: Vec<u16>) -> Vec<(usize, TxControl)> {
        for t in &self.latest {
            self.retired.add(&t.codec);
        }
        let workers = streams_of.len();
        let settings = self.settings.first().copied().unwrap_or_default();
        self.streams_of = streams_of;
        self.latest = (0..workers)
            .map(|worker| WorkerTelemetry {
                worker,
                ..WorkerTelemetry::default()
            })
            .collect();
        self.previous = vec![WorkerTelemetry::default(); workers];
        self.settings = vec![settings; workers];
        let mut commands = Vec::new();
        for w in 0..workers {
            if let Some(d) = &self.dictionary {
                commands.push((w, TxControl::SetDictionary(d.clone())));
            }
            commands.push((w, TxControl::SetCodec(settings)));
        }
        commands
    }

    /// Workers were added (replacements of lost streams) and streams moved to them:
    /// `streams_of[w]` streams each now. The workers that stay keep their counters; a
    /// new one gets the settings in force (the first worker's) and the dictionary.
    /// Returns the commands for the new workers.
    pub fn add_workers(&mut self, streams_of: Vec<u16>) -> Vec<(usize, TxControl)> {
        let before = self.latest.len();
        let settings = self.settings.first().copied().unwrap_or_default();
        self.streams_of = streams_of;
        let mut commands = Vec::new();
        for worker in before..self.streams_of.len() {
            self.latest.push(WorkerTelemetry {
                worker,
                ..WorkerTelemetry::default()
            });
            self.previous.push(WorkerTelemetry::default());
            self.settings.push(settings);
            if let Some(d) = &self.dictionary {
                commands.push((worker, TxControl::SetDictionary(d.clone())));
            }
            commands.push((worker, TxControl::SetCodec(settings)));
        }
        commands
    }

    /// A worker's periodic counters.
    pub fn worker_telemetry(&mut self, t: WorkerTelemetry) {
        if let Some(slot) = self.latest.get_mut(t.worker) {
            *slot = t;
        }
    }

    /// Anything due: finished background work and, when the interval is up, a
    /// decision. Returns commands for the workers (worker index, command).
    /// The slow path's forecast of what the path will carry over the next second,
    /// for the policy's link share.
    pub fn set_path_rate(&mut self, bytes_per_second: Option<f64>) {
        self.path_rate = bytes_per_second;
    }

    pub fn tick(
        &mut self,
        streams: &[StreamTelemetry],
        round: u64,
        round_pages_left: u64,
    ) -> Vec<(usize, TxControl)> {
        let mut commands = Vec::new();
        let news = self.collect_background(&mut commands);
        let now = Instant::now();
        // New calibration results are worth acting on at once (the first ones end the
        // raw sending a slow link starts with), once the figures cover a little time.
        let early = news && now.duration_since(self.last_decision) >= MIN_DECISION_GAP;
        if self.mode != CodecMode::Auto
            || self.policy.is_none()
            || (now < self.next_decision && !early)
        {
            return commands;
        }
        let observation = self.observe(streams, round, round_pages_left, now);
        self.last_decision = now;
        self.next_decision = now + self.config.decision_interval;
        let decision = match self.policy.as_mut() {
            Some(policy) => policy.decide(&observation),
            None => Decision::default(),
        };
        self.apply(decision, now, &mut commands);
        commands
    }

    /// The report, with the workers' final counters (and whatever background work
    /// finished meanwhile).
    pub fn finish(mut self) -> CodecReport {
        self.collect_background(&mut Vec::new());
        let mut total = self.retired;
        for t in &self.latest {
            total.add(&t.codec);
        }
        self.report.counters = total;
        self.report.calibration = self.calibration.take();
        self.report
    }

    fn observe(
        &mut self,
        streams: &[StreamTelemetry],
        round: u64,
        round_pages_left: u64,
        now: Instant,
    ) -> Observation {
        let interval = now
            .duration_since(self.last_decision)
            .as_secs_f64()
            .max(1e-6);
        let mut link = LinkObservation::default();
        let mut acked = 0u64;
        let mut rtt = u32::MAX;
        let (mut busy_us, mut rwnd_limited_us) = (0u64, 0u64);
        for t in streams {
            let Some(tcp) = t.tcp else { continue };
            link.unsent_bytes += u64::from(tcp.notsent_bytes);
            let slot = &mut self.marks[usize::from(t.stream)];
            acked += tcp.bytes_acked.saturating_sub(slot.bytes_acked);
            link.retransmits += tcp.total_retrans.saturating_sub(slot.retransmits);
            busy_us += tcp.busy_us.saturating_sub(slot.busy_us);
            rwnd_limited_us += tcp.rwnd_limited_us.saturating_sub(slot.rwnd_limited_us);
            *slot = StreamMarks {
                bytes_acked: tcp.bytes_acked,
                retransmits: tcp.total_retrans,
                busy_us: tcp.busy_us,
                rwnd_limited_us: tcp.rwnd_limited_us,
            };
            link.delivery_rate += tcp.delivery_rate as f64;
            rtt = rtt.min(tcp.rtt_us);
        }
        link.pacing_cap = total_pacing_cap(
            streams
                .iter()
                .filter_map(|t| t.tcp)
                .map(|t| t.max_pacing_rate),
        );
        if busy_us > 0 {
            link.receiver_limited = (rwnd_limited_us as f64 / busy_us as f64).min(1.0);
        }
        link.acked_bytes_per_second = acked as f64 / interval;
        link.rtt_us = if rtt == u32::MAX { 0 } else { rtt };
        link.forecast_bytes_per_second = self.path_rate;
        let workers = self
            .latest
            .iter()
            .zip(&self.previous)
            .enumerate()
            .map(|(w, (now_t, before))| WorkerObservation {
                worker: w,
                streams: self.streams_of[w],
                // What the worker ran with (a change it has not applied yet does
                // not count for these counters).
                settings: now_t.settings,
                codec: now_t.codec.since(&before.codec),
                staged_bytes: now_t.staged_bytes - before.staged_bytes,
                stage_nanos: now_t.stage_nanos - before.stage_nanos,
                stalled: ((now_t.stalled_nanos - before.stalled_nanos) as f64 / 1e9 / interval)
                    .min(1.0),
            })
            .collect();
        self.previous.clone_from(&self.latest);
        Observation {
            elapsed: now.duration_since(self.started).as_secs_f64(),
            interval,
            round,
            round_pages_left,
            link,
            workers,
            calibration: self.calibration.clone(),
            dictionary_bytes: self.dictionary.as_ref().map(|d| d.bytes().len()),
        }
    }

    fn apply(&mut self, decision: Decision, now: Instant, commands: &mut Vec<(usize, TxControl)>) {
        if let Some(line) = decision.log {
            self.report.decisions.push(line);
        }
        for (w, settings) in decision.settings.into_iter().enumerate() {
            if w < self.settings.len() && self.settings[w] != settings {
                self.settings[w] = settings;
                self.report.changes.push(SettingsChange {
                    at: now.duration_since(self.started).as_secs_f64(),
                    worker: w,
                    settings,
                });
                commands.push((w, TxControl::SetCodec(settings)));
            }
        }
        if let Some(useful) = decision.calibrate {
            self.calibrate(useful);
        }
        if decision.train_dictionary && self.config.dictionary {
            self.train_dictionary();
        }
    }

    fn calibrate(&mut self, useful_bytes_per_second: f64) {
        if self.calibrating.is_some() {
            return;
        }
        self.calibrated_down_to = Some(useful_bytes_per_second);
        let (tx, rx) = crossbeam::channel::unbounded();
        let memory = self.memory.clone();
        let pages = self.config.calibration_pages;
        let levels = self.config.levels.clone();
        let config = self.config.clone();
        let dictionary = self.dictionary.clone();
        // The same pages every time: measurements taken at different moments (with and
        // without the dictionary) then compare like with like.
        let seed = 0xCA11;
        let spawned = std::thread::Builder::new()
            .name("dwcp-calibrate".into())
            .spawn(move || {
                yield_to_the_fast_path();
                let sample = calibrate::sample_pages(&memory, pages, seed);
                calibrate::calibrate_with_progress(
                    &sample,
                    &levels,
                    &|level| config.batch_for(level),
                    dictionary.as_deref(),
                    useful_bytes_per_second,
                    &mut |so_far| {
                        let _ = tx.send(so_far.clone());
                    },
                );
            });
        if spawned.is_ok() {
            self.calibrating = Some(rx);
        }
    }

    fn train_dictionary(&mut self) {
        if self.training.is_some() || self.dictionary.is_some() {
            return;
        }
        let (tx, rx) = crossbeam::channel::bounded(1);
        let memory = self.memory.clone();
        let pages = self.config.dictionary_sample_pages;
        let capacity = self.config.dictionary_bytes;
        let spawned = std::thread::Builder::new()
            .name("dwcp-dictionary".into())
            .spawn(move || {
                yield_to_the_fast_path();
                let t = Instant::now();
                let sample = calibrate::sample_pages(&memory, pages, 0x0D1C7);
                let trained = calibrate::train(&sample, capacity).map_err(|e| e.to_string());
                let _ = tx.send((trained, t.elapsed().as_secs_f64()));
            });
        if spawned.is_ok() {
            self.training = Some(rx);
        }
    }

    /// Take in finished background work; true when calibration results arrived.
    fn collect_background(&mut self, commands: &mut Vec<(usize, TxControl)>) -> bool {
        let mut news = false;
        // Calibration results arrive level by level; the thread hangs up when done.
        while let Some(rx) = &self.calibrating {
            match rx.try_recv() {
                Ok(fresh) => {
                    news = true;
                    self.merge_calibration(fresh);
                }
                Err(TryRecvError::Disconnected) => {
                    self.calibrating = None;
                    if let Some(useful) = self.recalibrate.take() {
                        self.calibrate(useful);
                    }
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if let Some(rx) = &self.training {
            match rx.try_recv() {
                Ok((trained, seconds)) => {
                    self.training = None;
                    self.report.dictionary_seconds = Some(seconds);
                    match trained {
                        Ok(bytes) if !bytes.is_empty() => {
                            let d = Arc::new(Dictionary::new(DICTIONARY_ID, bytes));
                            self.report.dictionary_bytes = Some(d.bytes().len());
                            for w in 0..self.settings.len() {
                                commands.push((w, TxControl::SetDictionary(d.clone())));
                            }
                            self.dictionary = Some(d);
                            // Measure what it gains at the levels the last calibration
                            // was asked to cover (after it, if it is still running), or
                            // at every level when none was. Down to its slowest measured
                            // level instead, a calibration still running had measured
                            // none yet and this one took in every level, the slowest
                            // with 1 MiB batches: 1.4 s of CPU.
                            if self.policy.is_some() {
                                let bound = self.calibrated_down_to.unwrap_or(0.0);
                                if self.calibrating.is_some() {
                                    self.recalibrate = Some(bound);
                                } else {
                                    self.calibrate(bound);
                                }
                            }
                        }
                        Ok(_) => self.report.dictionary_error = Some("empty dictionary".into()),
                        Err(e) => self.report.dictionary_error = Some(e),
                    }
                }
                Err(TryRecvError::Disconnected) => self.training = None,
                Err(TryRecvError::Empty) => {}
            }
        }
        news
    }

    /// A new measurement of a level replaces the old one; other levels stay.
    fn merge_calibration(&mut self, fresh: Calibration) {
        match &mut self.calibration {
            Some(known) => {
                for m in &fresh.levels {
                    match known.levels.iter_mut().find(|k| k.level == m.level) {
                        Some(k) => *k = *m,
                        None => known.levels.push(*m),
                    }
                }
                known.pages = fresh.pages;
                known.zero_fraction = fresh.zero_fraction;
                known.seconds = fresh.seconds;
            }
            None => self.calibration = Some(fresh),
        }
    }
}

/// A stream's cumulative `TCP_INFO` counters as of the previous decision.
#[derive(Debug, Clone, Copy, Default)]
struct StreamMarks {
    bytes_acked: u64,
    retransmits: u32,
    busy_us: u64,
    rwnd_limited_us: u64,
}

/// Lower the calling thread's priority (nice 10): calibration and dictionary training
/// are background work, and on a host whose cores are all busy moving pages they take
/// what the workers leave rather than a share of a core each. (Calibration times
/// itself in CPU time, so its measurements hold.)
fn yield_to_the_fast_path() {
    // SAFETY: gettid has no preconditions; setpriority with PRIO_PROCESS and a thread
    // id changes that thread's nice value only. Failing leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// The streams' send-rate caps (`SO_MAX_PACING_RATE` as `TCP_INFO` reports it, `u64::MAX`
/// for none) taken together, bytes per second: their sum, or `None` unless every
/// stream is capped (one uncapped stream leaves the total unbounded).
fn total_pacing_cap(caps: impl IntoIterator<Item = u64>) -> Option<f64> {
    let mut total = None;
    for cap in caps {
        if cap == u64::MAX {
            return None;
        }
        total = Some(total.unwrap_or(0.0) + cap as f64);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_together_only_when_each_is() {
        assert_eq!(total_pacing_cap([]), None);
        assert_eq!(
            total_pacing_cap([2 << 20, 2 << 20]),
            Some(f64::from(4 << 20))
        );
        assert_eq!(total_pacing_cap([2 << 20, u64::MAX]), None);
        assert_eq!(total_pacing_cap([u64::MAX; 4]), None);
    }
}
