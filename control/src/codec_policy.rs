//! The codec policy: which codecs each worker runs, from a model of where the time goes.
//!
//! # The model
//!
//! A worker turns input bytes (pages with content; zero pages cost nothing either way)
//! into wire bytes on one core, and its streams share the link. For a candidate `k` with
//! CPU throughput `c_k` (input bytes per second on the worker's core) and ratio `r_k`
//! (input bytes per wire byte), the time per input byte is
//!
//! ```text
//!     T_k = max( m / c_k ,  1 / (r_k · B_w) )        B_w = B · streams_w / streams
//! ```
//!
//! the slower of the CPU and the worker's share of the link bandwidth `B`: the pipeline
//! overlaps them, so the slower one sets the pace. `m` (1.5 by default) counts CPU time
//! with a margin: the worker's core is shared and batches vary, so a setting that needs
//! the whole core to keep up with the link falls behind in practice. The candidates are
//!
//! - **off**: `c` = the measured staging rate, `r` = 1;
//! - **zstd L** (with dedup and delta): `1/c = 1/c_enc + 1/(r_cache · c_L)` and
//!   `r = r_cache · r_L`, where `c_enc` and `r_cache` are the cache stage's measured
//!   speed and gain (dedup references and XBZRLE deltas), and `c_L`, `r_L` the level's
//!   speed and ratio from calibration on sampled guest pages, corrected by what the
//!   worker measures at the level it runs;
//! - **delta only** (dedup and delta, no zstd), once the cache gain has been measured.
//!
//! `r_cache` is kept per batch kind: round 0 carries pages sent for the first time
//! (dedup can hit, deltas cannot), later rounds carry re-dirtied pages (deltas hit).
//!
//! The worker switches to the candidate with the least `T` only if it beats the current
//! one's by the hysteresis margin (default 10%) and the current one has run for a
//! minimum number of decisions, so noise in the measurements does not flap the setting.
//!
//! # Measuring the link
//!
//! `B` is the rate the peer acknowledges bytes at, measured while the link sets the
//! pace: a worker had pages to stage but every buffer was waiting on the socket for a
//! good part of the interval, or the streams hold bytes written and not yet sent (their
//! windows are full). Otherwise the acknowledged rate is only a lower bound and `B` is
//! raised to it if higher; while compression is the bottleneck and the round still has
//! pages to hand out, `B` is probed upwards. In TCP start-up (the first
//! `STARTUP_ROUND_TRIPS` round trips) no rate is taken for `B`: the windows set it,
//! and the workers run zstd 1 until the link is measured; nor while the streams recover
//! from a burst of losses. Until `B` is known, codecs stay
//! off: the first decision comes after a short interval of raw sending. When the
//! control thread forecasts the path (`[control] forecast_path_rate`: the link model's
//! forecast or the EWMA's, made from the spans where the migration had pages waiting),
//! a link-bound interval takes `B` from that forecast of the next second instead of
//! smoothing the interval's own rate.
//!
//! When the receiver's window holds the streams back for a good part of their busy time
//! while the network delivers several times faster than the peer acknowledges, the
//! destination, not the link, sets the pace: codecs stay off (fewer bytes would not
//! arrive sooner, and the destination would decompress them too), whatever `B` says.
//! So too when, over an interval spanning many round trips, the network delivers many
//! times faster than the peer acknowledges with the window open: the appliances' CPUs
//! set the pace.
//!
//! Calibration (compressing sampled pages at each level, on a thread of its own) is
//! asked for only when a worker's link share is below what the fastest level could
//! process: on a fast link compression cannot win and is never measured. Levels slower
//! than the link share are not measured either (they cannot beat sending raw).
//!
//! Every decision is logged as one JSON object with its inputs, the predicted time of
//! every candidate and the choice: training data for a learned selector.

use dwcp_dataplane::codec::CodecSettings;
use dwcp_dataplane::codec::calibrate::Calibration;
use dwcp_dataplane::codec::policy::{
    CodecConfig, CodecPolicy, Decision, Observation, WorkerObservation,
};
use serde::Serialize;

/// Tunables of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// zstd levels to consider, fastest first.
    pub levels: Vec<i32>,
    /// Switch only to a candidate predicted faster by this fraction.
    pub hysteresis: f64,
    /// Decisions a setting runs for before it may change.
    pub min_dwell: u32,
    /// A worker spending this fraction of an interval waiting on its sockets is
    /// link-bound.
    pub link_bound_stall: f64,
    /// Ask for calibration only when a worker's link share is below this many bytes
    /// per second (a generous bound on the fastest level's speed).
    pub calibrate_below: f64,
    /// Use the dictionary when it improves the ratio by at least this fraction.
    pub dictionary_min_gain: f64,
    /// Batch size (of the fast levels), delta limit and whether a dictionary may be
    /// used.
    pub base: CodecSettings,
    /// Batch size from level `large_batch_level` up (see
    /// [`dwcp_dataplane::codec::policy::CodecConfig::large_batch_bytes`]).
    pub large_batch_bytes: usize,
    /// The first level that uses `large_batch_bytes`.
    pub large_batch_level: i32,
    /// Train a dictionary when compressing.
    pub dictionary: bool,
    /// Smoothing of measured rates and ratios (weight of the newest sample).
    pub smoothing: f64,
    /// CPU time is counted this many times over: a worker's core is shared and its
    /// speed varies from batch to batch, so a setting that needs all of it to keep up
    /// with the link falls behind in practice.
    pub cpu_margin: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            levels: CodecConfig::default().levels,
            hysteresis: 0.10,
            min_dwell: 2,
            link_bound_stall: 0.3,
            calibrate_below: 1.5e9,
            dictionary_min_gain: 0.03,
            base: CodecSettings::full(1),
            large_batch_bytes: CodecConfig::default().large_batch_bytes,
            large_batch_level: CodecConfig::default().large_batch_level,
            dictionary: true,
            smoothing: 0.25,
            cpu_margin: 1.5,
        }
    }
}

/// What a worker may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Candidate {
    /// No codecs.
    Off,
    /// Dedup and delta, no compression.
    DeltaOnly,
    /// Dedup, delta and zstd at a level.
    Zstd(i32),
}

impl Candidate {
    /// `off`, `delta`, `zstd3`, ...
    pub fn name(self) -> String {
        match self {
            Candidate::Off => "off".into(),
            Candidate::DeltaOnly => "delta".into(),
            Candidate::Zstd(l) => format!("zstd{l}"),
        }
    }
}

/// Predictions smoothed from a worker's telemetry.
#[derive(Debug, Clone, Default)]
struct WorkerState {
    current: Option<Candidate>,
    dwell: u32,
    /// Staging throughput with codecs off, bytes per second.
    raw_rate: Option<f64>,
    /// Cache stage throughput, input bytes per second.
    encode_rate: Option<f64>,
    /// Cache stage gain for round 0 and for later rounds.
    cache_gain: [Option<f64>; 2],
    /// Measured over calibrated zstd speed and ratio, at the level running.
    zstd_speed_correction: Option<f64>,
    zstd_ratio_correction: Option<f64>,
}

/// What the model knows of one worker when it predicts a candidate's time.
#[derive(Debug, Clone, Copy)]
pub struct CostInputs<'a> {
    /// The worker's share of the link, bytes per second.
    pub share: f64,
    /// Staging throughput with codecs off, bytes per second.
    pub raw_rate: f64,
    /// Cache stage (dedup, delta) throughput, input bytes per second.
    pub encode_rate: f64,
    /// The cache stage's gain, once measured.
    pub cache_gain: Option<f64>,
    /// zstd speed and ratio per level, from sampled pages.
    pub calibration: Option<&'a Calibration>,
    /// Whether the session's dictionary is used.
    pub dictionary: bool,
    /// Measured over calibrated zstd speed, at the level running (1: none).
    pub speed_correction: f64,
    /// Measured over calibrated zstd ratio (1: none).
    pub ratio_correction: f64,
    /// CPU time counted this many times over.
    pub cpu_margin: f64,
}

/// The model: seconds per input byte of `candidate` (see the module docs), `None`
/// when what it needs has not been measured.
pub fn seconds_per_byte(candidate: Candidate, i: &CostInputs<'_>) -> Option<f64> {
    let link = |ratio: f64| 1.0 / (ratio * i.share);
    match candidate {
        Candidate::Off => Some((1.0 / i.raw_rate).max(link(1.0))),
        Candidate::DeltaOnly => {
            let gain = i.cache_gain?;
            Some((i.cpu_margin / i.encode_rate).max(link(gain)))
        }
        Candidate::Zstd(level) => {
            let m = i.calibration?.level(level)?;
            let gain = i.cache_gain.unwrap_or(1.0);
            let ratio = if i.dictionary {
                m.ratio_with_dictionary.unwrap_or(m.ratio)
            } else {
                m.ratio
            } * i.ratio_correction;
            let speed = m.bytes_per_second * i.speed_correction;
            let cpu = 1.0 / i.encode_rate + 1.0 / (gain * speed);
            Some((i.cpu_margin * cpu).max(link(gain * ratio)))
        }
    }
}

/// The candidate the model predicts fastest among `candidates`, with its time.
pub fn fastest(candidates: &[Candidate], inputs: &CostInputs<'_>) -> Option<(Candidate, f64)> {
    candidates
        .iter()
        .filter_map(|&c| Some((c, seconds_per_byte(c, inputs)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// The model policy.
pub struct ModelPolicy {
    config: PolicyConfig,
    bandwidth: Option<f64>,
    workers: Vec<WorkerState>,
    /// The bound the last calibration asked for stops at (levels slower than this per
    /// core were not measured); `None` before any.
    calibration_floor: Option<f64>,
    dictionary_asked: bool,
}

/// How much the bandwidth estimate grows per decision while compression, not the
/// link, limits the transfer.
const PROBE_GROWTH: f64 = 1.5;

/// Round trips of TCP start-up: until the streams have had this many, their congestion
/// windows, not the link, set what is acknowledged (BBR's start-up doubles the rate
/// each round trip; from 16 streams' initial windows to 1 Gbit/s at 80 ms takes about
/// six). A rate measured then is no measure of the link.
const STARTUP_ROUND_TRIPS: f64 = 8.0;

/// The per-core speed down to which levels are calibrated in TCP start-up, before the
/// link is known, bytes per second: slower levels suit only a link share below it,
/// which asks for a calibration of its own once measured.
const STARTUP_CALIBRATION_FLOOR: f64 = 20e6;

/// Whether the streams are still in TCP start-up at `o` (never when no RTT is known).
fn starting_up(o: &Observation) -> bool {
    o.link.rtt_us > 0 && o.elapsed < STARTUP_ROUND_TRIPS * f64::from(o.link.rtt_us) / 1e6
}

/// Bytes per stream written and not yet sent, on average, from which the network, not
/// the sender, sets the pace. Each stream holds up to `TCP_NOTSENT_LOWAT` (64 KiB by
/// default) unsent while its window is full, and next to nothing while the sender
/// cannot keep up.
const UNSENT_LINK_BOUND_PER_STREAM: u64 = 16 << 10;

/// Whether the streams hold bytes they cannot send yet: the link (or the window) sets
/// the pace, although the workers, whose sockets take what they stage, seldom wait on
/// them. Across the cross-region path (16 streams) the streams held 0.5-1.7 MB unsent
/// through round 0 while the workers waited on their sockets for only 10-25% of an
/// interval; taken for compression-bound, the estimate was probed up to 3-5 times the
/// link, and the workers were switched to sending pages uncompressed.
fn streams_hold_unsent_bytes(o: &Observation) -> bool {
    let streams: u64 = o.workers.iter().map(|w| u64::from(w.streams)).sum();
    streams > 0 && o.link.unsent_bytes >= streams * UNSENT_LINK_BOUND_PER_STREAM
}

/// Retransmitted segments in one interval from which the streams are recovering from
/// a loss episode (a queue overflowed), not losing the odd packet: 0.01% random loss
/// at 1 Gbit/s is about 2 segments in a 0.2 s interval.
const LOSS_EPISODE_RETRANSMITS: u32 = 100;

/// Whether the streams spent the interval recovering from a burst of losses.
fn recovering_from_losses(o: &Observation) -> bool {
    o.link.retransmits >= LOSS_EPISODE_RETRANSMITS
}

/// Of the streams' busy time, the fraction held back by the receiver's window from
/// which the destination may be what sets the pace.
const RECEIVER_BOUND: f64 = 0.25;

/// How many times faster than the destination acknowledges the network must deliver
/// for the destination, not the network, to be taken as what sets the pace.
const DELIVERY_OVER_ACKED: f64 = 8.0;

/// Whether the destination sets the pace at `o`: the receiver's window held the streams
/// back for a good part of the time they had bytes outstanding, while the network
/// delivered what was sent several times faster than the destination took it.
///
/// The workers then stall on their sockets as on a slow link, but fewer bytes would not
/// arrive sooner: the destination does the same work per page either way, plus the
/// decompression. On loopback, where both appliances share two cores, the model picked
/// zstd in about one run in four and the migration took up to twice as long (0.52 and
/// 0.76 s against 0.33 s, 512 MiB). At the model's first decision (0.24 s) of nine such
/// runs, the window had held the streams back for 0.15-0.58 of their busy time (the
/// rest presumably counted as send-buffer limited, which the kernel ranks above it) and
/// the network had delivered 2-56 times faster than acknowledged, 17 or more in most.
///
/// Across `wanem`'s cross-region path the ratio reached 11 in one 0.2 s interval (the
/// acknowledged rate swings over short intervals; the window fraction was 0.13 then)
/// and the window fraction 0.23 in another (ratio 2): neither bound alone would do. The
/// ratio also keeps compression on a long path whose receive buffers are smaller than
/// its bandwidth-delay product: the window limits there too, but the network delivers
/// at the rate acknowledged.
fn receiver_bound(o: &Observation) -> bool {
    o.link.receiver_limited >= RECEIVER_BOUND
        && o.link.acked_bytes_per_second > 0.0
        && o.link.delivery_rate >= DELIVERY_OVER_ACKED * o.link.acked_bytes_per_second
}

/// Round trips an interval must span for its acknowledged rate to be a steady measure:
/// over one or two, acknowledgements arrive in clumps.
const STEADY_ROUND_TRIPS: f64 = 20.0;

/// How many times faster than the peer acknowledges the network must deliver, over a
/// steady interval, for the appliances and not the network to set the pace. On
/// loopback the ratio falls to 17-21 once the peer acknowledges about 1 GB/s; a link
/// that sets the pace delivers at about the acknowledged rate.
const SPARE_NETWORK: f64 = 8.0;

/// Whether, on a path short enough for the interval to span many round trips, the
/// network delivered what was sent many times faster than the peer acknowledged it,
/// with no pacing cap holding the streams: the network has room to spare, and the
/// pace is set by the appliances' CPUs (the destination's, or the source's own,
/// descheduled while its sends wait).
///
/// The workers then look link-bound (they wait on their sockets), but fewer bytes
/// cannot arrive sooner, and compressing costs CPU at both ends. On loopback, with a
/// busy host (2 cores, the guest's vCPU and a CPU hog beside both appliances), the
/// model picked zstd in 2 runs of 4 (1.02 and 1.08 s against 0.63 s, 512 MiB): at
/// those decisions the workers waited on their sockets for 0.3-0.6 of the interval,
/// the network delivered 18-1,800 times faster than acknowledged over intervals of 25
/// round trips or more (the round trip grows to 1.6 ms under load), the receiver's
/// window held the streams back for at most 0.2 of their busy time,
/// so [`receiver_bound`] did not apply. A link that sets the pace delivers at about
/// the acknowledged rate; across `wanem`'s paths the interval spans one or two round
/// trips, and the ratio's bursts there (11 in one interval) are left to
/// [`receiver_bound`].
///
/// Bytes waiting unsent do not say otherwise here: every stream's congestion window
/// fills while the peer is slow to acknowledge, and each then holds its
/// `TCP_NOTSENT_LOWAT` unsent. In the QEMU bench on loopback (4 streams, the guest's
/// vCPU and both appliances on two cores) the first decision of most runs saw 256 KiB
/// unsent with the network delivering 180-500 times faster than acknowledged; taken
/// for link-bound, it asked for a calibration (30 ms of CPU in a 0.3 s round).
///
/// A stream capped below the link ([`held_by_pacing_cap`]) is another matter.
fn network_has_room(o: &Observation) -> bool {
    let rtt = f64::from(o.link.rtt_us) / 1e6;
    rtt > 0.0
        && o.interval >= STEADY_ROUND_TRIPS * rtt
        && o.link.acked_bytes_per_second > 0.0
        && o.link.delivery_rate >= SPARE_NETWORK * o.link.acked_bytes_per_second
        && !held_by_pacing_cap(o)
}

/// How far above the acknowledged rate the streams' pacing caps may be for the caps
/// to be what holds them.
const PACING_CAP_HOLDS: f64 = 1.5;

/// Whether pacing caps (`[transport] pacing_rate`, or the cluster's share of the WAN
/// budget) hold the streams to about what the peer acknowledges. A capped stream
/// delays its segments before they leave, which its delivery-rate estimate does not
/// see (157 GB/s on loopback capped at 2 MB/s a stream): the cap sets the pace as a
/// link would, and compression sends more pages through it.
fn held_by_pacing_cap(o: &Observation) -> bool {
    o.link
        .pacing_cap
        .is_some_and(|cap| cap <= PACING_CAP_HOLDS * o.link.acked_bytes_per_second)
}

/// The interval's acknowledged rate as a measure of the link, or 0 when it is none.
/// - Over less than a round trip, acknowledgements arrive in clumps (a loss recovered,
///   a stretch of delayed ACKs): the rate swings between 0 and twice the link.
/// - It is capped by the streams' own delivery-rate estimates (`TCP_INFO`), which time
///   each sample over the longer of its send and its acknowledgement, so that
///   acknowledgements arriving together do not read as a faster link. (1 Gbit/s at
///   80 ms: after a loss episode 251 MB/s acknowledged in 48 ms, taken for the link,
///   turned compression off for a second; the streams' estimate was 145 MB/s.)
fn link_rate_sample(o: &Observation) -> f64 {
    let rtt = f64::from(o.link.rtt_us) / 1e6;
    if rtt > 0.0 && o.interval < rtt {
        return 0.0;
    }
    let acked = o.link.acked_bytes_per_second;
    if o.link.delivery_rate > 0.0 {
        acked.min(o.link.delivery_rate)
    } else {
        acked
    }
}

/// Priors used until measured (bytes per second): staging and the cache stage are
/// memory copies plus a CRC, well above a core's zstd speed.
pub const RAW_RATE_PRIOR: f64 = 3e9;
pub const ENCODE_RATE_PRIOR: f64 = 1.5e9;

#[derive(Serialize)]
struct CandidateLog {
    candidate: String,
    /// Predicted seconds per MB of input.
    seconds_per_mb: f64,
}

#[derive(Serialize)]
struct WorkerLog<'a> {
    worker: usize,
    input: &'a WorkerObservation,
    link_share: f64,
    raw_rate: Option<f64>,
    encode_rate: Option<f64>,
    cache_gain: Option<f64>,
    candidates: Vec<CandidateLog>,
    choice: String,
    changed: bool,
    reason: &'static str,
}

impl<'a> WorkerLog<'a> {
    /// A worker's decision taken without the model: before the link was measured, or
    /// while the destination sets the pace.
    fn unmeasured(
        input: &'a WorkerObservation,
        choice: Candidate,
        changed: bool,
        reason: &'static str,
    ) -> Self {
        WorkerLog {
            worker: input.worker,
            input,
            link_share: 0.0,
            raw_rate: None,
            encode_rate: None,
            cache_gain: None,
            candidates: Vec::new(),
            choice: choice.name(),
            changed,
            reason,
        }
    }
}

#[derive(Serialize)]
struct DecisionLog<'a> {
    t: f64,
    round: u64,
    kind: &'static str,
    link: &'a dwcp_dataplane::codec::policy::LinkObservation,
    link_bound: bool,
    bandwidth: Option<f64>,
    calibration: Option<&'a Calibration>,
    dictionary_bytes: Option<usize>,
    workers: Vec<WorkerLog<'a>>,
}

impl ModelPolicy {
    /// A policy with these tunables.
    pub fn new(config: PolicyConfig) -> Self {
        ModelPolicy {
            config,
            bandwidth: None,
            workers: Vec::new(),
            calibration_floor: None,
            dictionary_asked: false,
        }
    }

    /// The link bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth
    }

    fn smooth(old: Option<f64>, sample: f64, weight: f64) -> Option<f64> {
        if !sample.is_finite() || sample <= 0.0 {
            return old;
        }
        Some(match old {
            Some(o) => o + weight * (sample - o),
            None => sample,
        })
    }

    fn update_bandwidth(&mut self, o: &Observation) -> bool {
        let link_bound = o
            .workers
            .iter()
            .any(|w| w.stalled >= self.config.link_bound_stall)
            || streams_hold_unsent_bytes(o);
        let compressing = o.workers.iter().any(|w| w.settings.level.is_some());
        let rate = link_rate_sample(o);
        let forecast = o
            .link
            .forecast_bytes_per_second
            .filter(|r| r.is_finite() && *r > 0.0);
        if link_bound && let Some(ahead) = forecast {
            self.bandwidth = Some(ahead);
        } else if recovering_from_losses(o) {
            // The streams are retransmitting a burst: what they acknowledge meanwhile
            // is the recovery's pace, not the link's (cross-region: 40 MB/s in the
            // interval with 5,839 retransmissions, after 118 MB/s; taken as the link,
            // it held the estimate at half the link for a second).
        } else if starting_up(o) {
            // The windows are still opening: workers wait on their sockets at a rate
            // the link will soon exceed many times over. Taken as the link, it made
            // the first decision pick the slowest level, and the CPU-bound workers
            // took seconds to come back down (1 Gbit/s at 80 ms: zstd 9 chosen after
            // 74 ms, level 1 only after a second).
        } else if rate > 0.0 {
            self.bandwidth = if link_bound {
                Self::smooth(self.bandwidth, rate, self.config.smoothing)
            } else if compressing && o.round_pages_left > 0 {
                // Compression is the bottleneck, so the link may be much faster than
                // what it carries now: probe upwards (a faster setting follows, and if
                // the link turns out slower, the streams back up and it is measured).
                // Not once the round's pages are all handed out: idle workers say
                // nothing of the link (across the cross-region path the estimate
                // doubled twice over the small last rounds, to 600 MB/s).
                Some(self.bandwidth.map_or(rate, |b| b.max(rate)) * PROBE_GROWTH)
            } else {
                Some(self.bandwidth.map_or(rate, |b| b.max(rate)))
            };
        }
        link_bound
    }

    fn learn(
        &mut self,
        w: &WorkerObservation,
        kind: usize,
        calibration: Option<&Calibration>,
        dictionary: bool,
    ) {
        let a = self.config.smoothing;
        let state = &mut self.workers[w.worker];
        let c = &w.codec;
        if w.staged_bytes > (1 << 20) && w.stage_nanos > 0 {
            state.raw_rate = Self::smooth(
                state.raw_rate,
                w.staged_bytes as f64 * 1e9 / w.stage_nanos as f64,
                a,
            );
        }
        if c.input_bytes > (1 << 20) && c.encode_nanos > 0 {
            state.encode_rate = Self::smooth(
                state.encode_rate,
                c.input_bytes as f64 * 1e9 / c.encode_nanos as f64,
                a,
            );
            let cached_output = if w.settings.level.is_some() {
                c.compress_in
            } else {
                c.output_bytes
            };
            if w.settings.uses_cache() && cached_output > 0 {
                state.cache_gain[kind] = Self::smooth(
                    state.cache_gain[kind],
                    c.input_bytes as f64 / cached_output as f64,
                    a,
                );
            }
        }
        if let (Some(level), Some(cal)) = (w.settings.level, calibration)
            && c.compress_in > (1 << 20)
            && c.compress_nanos > 0
            && c.compress_out > 0
            && let Some(m) = cal.level(level)
        {
            let speed = c.compress_in as f64 * 1e9 / c.compress_nanos as f64;
            let ratio = c.compress_in as f64 / c.compress_out as f64;
            let calibrated_ratio = if dictionary {
                m.ratio_with_dictionary.unwrap_or(m.ratio)
            } else {
                m.ratio
            };
            state.zstd_speed_correction = Self::smooth(
                state.zstd_speed_correction,
                (speed / m.bytes_per_second).clamp(0.1, 10.0),
                a,
            );
            state.zstd_ratio_correction = Self::smooth(
                state.zstd_ratio_correction,
                (ratio / calibrated_ratio).clamp(0.2, 5.0),
                a,
            );
        }
    }

    /// Predicted seconds per input byte of `candidate` on worker `w` with link share
    /// `share` (bytes per second).
    fn predict(
        &self,
        w: usize,
        kind: usize,
        candidate: Candidate,
        share: f64,
        cal: Option<&Calibration>,
        dictionary: bool,
    ) -> Option<f64> {
        let s = &self.workers[w];
        seconds_per_byte(
            candidate,
            &CostInputs {
                share,
                raw_rate: s.raw_rate.unwrap_or(RAW_RATE_PRIOR),
                encode_rate: s.encode_rate.unwrap_or(ENCODE_RATE_PRIOR),
                cache_gain: s.cache_gain[kind],
                calibration: cal,
                dictionary,
                speed_correction: s.zstd_speed_correction.unwrap_or(1.0),
                ratio_correction: s.zstd_ratio_correction.unwrap_or(1.0),
                cpu_margin: self.config.cpu_margin,
            },
        )
    }

    fn settings_for(&self, candidate: Candidate, dictionary: bool) -> CodecSettings {
        let base = self.config.base;
        match candidate {
            Candidate::Off => CodecSettings {
                batch_bytes: base.batch_bytes,
                delta_limit: base.delta_limit,
                ..CodecSettings::OFF
            },
            Candidate::DeltaOnly => CodecSettings {
                dedup: true,
                delta: true,
                level: None,
                dictionary: false,
                ..base
            },
            Candidate::Zstd(level) => CodecSettings {
                dedup: true,
                delta: true,
                level: Some(level),
                dictionary,
                batch_bytes: if level >= self.config.large_batch_level {
                    self.config.large_batch_bytes
                } else {
                    base.batch_bytes
                },
                ..base
            },
        }
    }
}

impl CodecPolicy for ModelPolicy {
    fn decide(&mut self, o: &Observation) -> Decision {
        if self.workers.len() < o.workers.len() {
            // A first change need not wait: nothing was chosen to dwell on.
            let fresh = WorkerState {
                dwell: self.config.min_dwell,
                ..WorkerState::default()
            };
            self.workers.resize(o.workers.len(), fresh);
        }
        let kind = usize::from(o.round > 0);
        let link_bound = self.update_bandwidth(o);
        let cal = o.calibration.as_ref();
        // The dictionary is worth using where calibration shows it gains enough.
        let dictionary_gain = |level: i32| {
            cal.and_then(|c| c.level(level))
                .and_then(|m| m.ratio_with_dictionary.map(|d| d / m.ratio - 1.0))
        };
        for w in &o.workers {
            let dictionary = w.settings.dictionary;
            self.learn(w, kind, cal, dictionary);
        }
        let total_streams: u32 = o
            .workers
            .iter()
            .map(|w| u32::from(w.streams))
            .sum::<u32>()
            .max(1);
        let mut decision = Decision::default();
        let mut logs = Vec::with_capacity(o.workers.len());
        let mut want_calibration = None::<f64>;
        let mut any_zstd = false;
        // Where the appliances, not the network, set the pace, codecs stay off.
        let appliances_bound = if receiver_bound(o) {
            Some("the destination sets the pace: fewer bytes would not arrive sooner")
        } else if network_has_room(o) {
            Some("the network delivers far faster than acknowledged: CPUs set the pace")
        } else {
            None
        };
        for w in &o.workers {
            let state_current = self.workers[w.worker].current.unwrap_or(Candidate::Off);
            let Some(bandwidth) = self.bandwidth else {
                if starting_up(o) && w.settings.is_off() {
                    // Start-up is window-bound: every page compressed is one more
                    // page per window, and the rate is low, so a fast level costs the
                    // CPU little: level 1 (QEMU's multifd default too), or the
                    // nearest configured. The model decides once the link is
                    // measured.
                    let levels = &self.config.levels;
                    let startup_level = levels
                        .iter()
                        .copied()
                        .find(|&l| l >= 1)
                        .or(levels.last().copied());
                    if let Some(level) = startup_level {
                        // The windows leave the CPU mostly idle meanwhile: calibrate
                        // and train the dictionary now, not once the link is full and
                        // every core busy (cross-region, on two cores shared with the
                        // guest: 0.4-0.7 s of CPU there, a third of the source's).
                        if self.calibration_floor.is_none() {
                            want_calibration = Some(STARTUP_CALIBRATION_FLOOR);
                        }
                        any_zstd = true;
                        let choice = Candidate::Zstd(level);
                        let state = &mut self.workers[w.worker];
                        state.current = Some(choice);
                        state.dwell = 0;
                        decision.settings.push(self.settings_for(choice, false));
                        logs.push(WorkerLog::unmeasured(
                            w,
                            choice,
                            true,
                            "TCP start-up: a fast level until the link is measured",
                        ));
                        continue;
                    }
                }
                decision.settings.push(w.settings);
                logs.push(WorkerLog::unmeasured(
                    w,
                    state_current,
                    false,
                    "link not measured yet",
                ));
                continue;
            };
            if let Some(reason) = appliances_bound {
                let state = &mut self.workers[w.worker];
                let changed = state_current != Candidate::Off;
                state.dwell = if changed { 0 } else { state.dwell + 1 };
                state.current = Some(Candidate::Off);
                decision
                    .settings
                    .push(self.settings_for(Candidate::Off, false));
                logs.push(WorkerLog::unmeasured(w, Candidate::Off, changed, reason));
                continue;
            }
            let share = bandwidth * f64::from(w.streams) / f64::from(total_streams);
            // Calibrate again only for a share below the last one asked for, and only
            // if a level it left out could keep up with it: it stops after the first
            // level slower than its bound, so one slower than the share says the rest
            // are no use. (Each calibration costs the CPU 0.3-1 s.)
            let left_out_may_keep_up = cal.is_none_or(|c| {
                c.levels.len() < self.config.levels.len()
                    && c.levels.last().is_some_and(|l| l.bytes_per_second > share)
            });
            if share < self.config.calibrate_below
                && self.calibration_floor.is_none_or(|floor| share < floor)
                && left_out_may_keep_up
            {
                want_calibration = Some(want_calibration.map_or(share, |s: f64| s.min(share)));
            }
            let mut candidates = vec![Candidate::Off, Candidate::DeltaOnly];
            candidates.extend(self.config.levels.iter().map(|&l| Candidate::Zstd(l)));
            let use_dictionary = |c: Candidate| match c {
                Candidate::Zstd(l) => {
                    dictionary_gain(l).is_some_and(|g| g >= self.config.dictionary_min_gain)
                }
                _ => false,
            };
            let mut predicted: Vec<(Candidate, f64)> = candidates
                .iter()
                .filter_map(|&c| {
                    Some((
                        c,
                        self.predict(w.worker, kind, c, share, cal, use_dictionary(c))?,
                    ))
                })
                .collect();
            predicted.sort_by(|a, b| a.1.total_cmp(&b.1));
            let current_time = predicted
                .iter()
                .find(|(c, _)| *c == state_current)
                .map(|p| p.1);
            let (best, best_time) = predicted[0];
            let state = &mut self.workers[w.worker];
            state.dwell += 1;
            let (choice, reason) = if best == state_current {
                (state_current, "current is best")
            } else if state.dwell < self.config.min_dwell {
                (state_current, "dwell time not reached")
            } else if current_time.is_none_or(|t| best_time < t * (1.0 - self.config.hysteresis)) {
                (best, "predicted faster beyond hysteresis")
            } else {
                (state_current, "within hysteresis")
            };
            let changed = choice != state_current;
            if changed {
                state.dwell = 0;
            }
            state.current = Some(choice);
            any_zstd |= matches!(choice, Candidate::Zstd(_));
            decision
                .settings
                .push(self.settings_for(choice, use_dictionary(choice)));
            let s = &self.workers[w.worker];
            logs.push(WorkerLog {
                worker: w.worker,
                input: w,
                link_share: share,
                raw_rate: s.raw_rate,
                encode_rate: s.encode_rate,
                cache_gain: s.cache_gain[kind],
                candidates: predicted
                    .iter()
                    .map(|&(c, t)| CandidateLog {
                        candidate: c.name(),
                        seconds_per_mb: t * 1e6,
                    })
                    .collect(),
                choice: choice.name(),
                changed,
                reason,
            });
        }
        if let Some(share) = want_calibration {
            self.calibration_floor = Some(share);
            decision.calibrate = Some(share);
        }
        if any_zstd && self.config.dictionary && !self.dictionary_asked {
            self.dictionary_asked = true;
            decision.train_dictionary = true;
        }
        decision.log = serde_json::to_string(&DecisionLog {
            t: o.elapsed,
            round: o.round,
            kind: if kind == 0 { "fresh" } else { "dirty" },
            link: &o.link,
            link_bound,
            bandwidth: self.bandwidth,
            calibration: cal,
            dictionary_bytes: o.dictionary_bytes,
            workers: logs,
        })
        .ok();
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_dataplane::codec::CodecCounters;
    use dwcp_dataplane::codec::calibrate::LevelMeasurement;
    use dwcp_dataplane::codec::policy::LinkObservation;

    /// Calibration shaped like the reference guest images on one core of this class
    /// of machine: speed falls and ratio rises with the level.
    fn calibration() -> Calibration {
        let levels = [
            (-5, 1.9, 900e6),
            (-1, 2.2, 700e6),
            (1, 2.55, 480e6),
            (3, 2.65, 300e6),
            (9, 2.8, 80e6),
            (16, 2.83, 18e6),
        ];
        Calibration {
            pages: 256,
            zero_fraction: 0.34,
            levels: levels
                .iter()
                .map(|&(level, ratio, speed)| LevelMeasurement {
                    level,
                    ratio,
                    bytes_per_second: speed,
                    ratio_with_dictionary: None,
                })
                .collect(),
            seconds: 0.05,
        }
    }

    fn observation(
        acked: f64,
        stalled: f64,
        settings: CodecSettings,
        cal: Option<Calibration>,
    ) -> Observation {
        Observation {
            elapsed: 1.0,
            interval: 0.2,
            round: 0,
            round_pages_left: 100_000,
            link: LinkObservation {
                acked_bytes_per_second: acked,
                ..LinkObservation::default()
            },
            workers: (0..2)
                .map(|worker| WorkerObservation {
                    worker,
                    streams: 2,
                    settings,
                    codec: CodecCounters::default(),
                    staged_bytes: 0,
                    stage_nanos: 0,
                    stalled,
                })
                .collect(),
            calibration: cal,
            dictionary_bytes: None,
        }
    }

    fn policy() -> ModelPolicy {
        ModelPolicy::new(PolicyConfig::default())
    }

    #[test]
    fn a_fast_link_keeps_codecs_off_and_is_never_calibrated() {
        let mut p = policy();
        for _ in 0..5 {
            let d = p.decide(&observation(3e9, 0.8, CodecSettings::OFF, None));
            assert!(d.settings.iter().all(|s| s.is_off()));
            assert_eq!(d.calibrate, None);
            assert!(!d.train_dictionary);
        }
        // Even with a calibration at hand, 1.5 GB/s per worker beats every level.
        let d = p.decide(&observation(
            3e9,
            0.8,
            CodecSettings::OFF,
            Some(calibration()),
        ));
        assert!(d.settings.iter().all(|s| s.is_off()));
    }

    #[test]
    fn a_slow_link_asks_for_calibration_then_compresses_hard() {
        let mut p = policy();
        // 100 Mbit/s, workers waiting on the sockets.
        let d = p.decide(&observation(12.5e6, 0.9, CodecSettings::OFF, None));
        assert!(
            d.settings.iter().all(|s| s.is_off()),
            "nothing to go on yet"
        );
        let share = d.calibrate.expect("calibration requested");
        assert!((share - 6.25e6).abs() < 1.0);
        let d = p.decide(&observation(
            12.5e6,
            0.9,
            CodecSettings::OFF,
            Some(calibration()),
        ));
        // 6.25 MB/s per worker: the best ratio whose speed (with the CPU margin) still
        // covers ratio × link; level 16 would need 18 MB/s of a core that has 12.
        assert_eq!(d.settings[0].level, Some(9), "{:?}", d.log);
        assert!(d.settings[0].delta && d.settings[0].dedup);
        assert!(d.train_dictionary);
        let log: serde_json::Value = serde_json::from_str(d.log.as_deref().unwrap()).unwrap();
        assert_eq!(log["workers"][0]["choice"], "zstd9");
        assert!(log["workers"][0]["candidates"].as_array().unwrap().len() >= 7);
    }

    #[test]
    fn a_gigabit_link_picks_a_fast_level() {
        let mut p = policy();
        let d = p.decide(&observation(
            125e6,
            0.9,
            CodecSettings::OFF,
            Some(calibration()),
        ));
        // 62.5 MB/s per worker: level 9 (80 MB/s) would be CPU-bound below 3 and 1
        // move 62.5 × 2.65 and 2.55 of input; level 3 keeps up and gains most.
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
    }

    /// The gigabit observation of `a_gigabit_link_picks_a_fast_level`, with the
    /// receiver's window holding the streams back for `receiver_limited` of their busy
    /// time while the network delivered at `delivery_rate`.
    fn window_limited(
        receiver_limited: f64,
        delivery_rate: f64,
        settings: CodecSettings,
    ) -> Observation {
        let mut o = observation(125e6, 0.9, settings, Some(calibration()));
        o.link.receiver_limited = receiver_limited;
        o.link.delivery_rate = delivery_rate;
        o
    }

    /// Codecs off on every worker, no calibration asked for (a choice it cannot
    /// change), and the decision log giving `reason`.
    fn assert_off_without_calibration(d: &Decision, reason: &str) {
        assert!(d.settings.iter().all(|s| s.is_off()), "{:?}", d.log);
        assert_eq!(d.calibrate, None, "{:?}", d.log);
        let log: serde_json::Value = serde_json::from_str(d.log.as_deref().unwrap()).unwrap();
        assert!(
            log["workers"][0]["reason"]
                .as_str()
                .unwrap()
                .contains(reason),
            "{log}"
        );
    }

    #[test]
    fn a_destination_that_sets_the_pace_keeps_codecs_off() {
        let mut p = policy();
        // Loopback with both appliances on two cores: the network delivers at tens of
        // GB/s, the destination takes 125 MB/s.
        let d = p.decide(&window_limited(0.9, 30e9, CodecSettings::OFF));
        assert_off_without_calibration(&d, "destination sets the pace");
        // Workers already compressing (level 3 on the plain gigabit link) stop at once,
        // dwell time or not.
        let mut p = policy();
        let d = p.decide(&window_limited(0.0, 0.0, CodecSettings::OFF));
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
        let d = p.decide(&window_limited(0.9, 30e9, d.settings[0]));
        assert!(d.settings.iter().all(|s| s.is_off()), "{:?}", d.log);
    }

    #[test]
    fn a_window_limited_path_that_delivers_at_the_acknowledged_rate_still_compresses() {
        // A long path whose receive buffers are below its bandwidth-delay product: the
        // receiver's window limits, but the network carries what is acknowledged.
        let mut p = policy();
        let d = p.decide(&window_limited(0.9, 130e6, CodecSettings::OFF));
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
        // The window held the streams back only now and then: the link sets the pace.
        let mut p = policy();
        let d = p.decide(&window_limited(0.1, 30e9, CodecSettings::OFF));
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
    }

    /// The gigabit observation of `a_gigabit_link_picks_a_fast_level`, the receiver's
    /// window never limiting, over a path of `rtt_us` round trip, in an interval of
    /// `interval` seconds, with the network delivering at `delivery_rate`.
    fn on_a_path(
        rtt_us: u32,
        interval: f64,
        delivery_rate: f64,
        settings: CodecSettings,
    ) -> Observation {
        let mut o = window_limited(0.0, delivery_rate, settings);
        o.interval = interval;
        o.link.rtt_us = rtt_us;
        o
    }

    #[test]
    fn a_short_path_with_network_to_spare_keeps_codecs_off() {
        // Loopback on a busy host: the workers wait on their sockets, the peer
        // acknowledges 125 MB/s, the network delivers 30 GB/s; 13 us round trips in a
        // 27 ms interval, the receiver's window never limiting.
        let mut p = policy();
        let d = p.decide(&on_a_path(13, 0.027, 30e9, CodecSettings::OFF));
        assert_off_without_calibration(&d, "CPUs set the pace");
        // Workers already compressing stop at once.
        let mut p = policy();
        let d = p.decide(&on_a_path(13, 0.027, 0.0, CodecSettings::OFF));
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
        let d = p.decide(&on_a_path(1_300, 0.116, 2e9, d.settings[0]));
        assert!(d.settings.iter().all(|s| s.is_off()), "{:?}", d.log);
    }

    #[test]
    fn a_link_that_sets_the_pace_still_compresses_on_any_path() {
        // Cross-region (80 ms): a burst of delivery 11 times the acknowledged rate in a
        // 0.2 s interval, which spans under three round trips.
        let d = policy().decide(&on_a_path(80_000, 0.2, 11.0 * 125e6, CodecSettings::OFF));
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
        // A gigabit LAN (200 us) that delivers about what is acknowledged.
        let d = policy().decide(&on_a_path(200, 0.2, 130e6, CodecSettings::OFF));
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
        // A short path delivering below the bound's multiple of the acknowledged rate.
        let d = policy().decide(&on_a_path(200, 0.2, 4.0 * 125e6, CodecSettings::OFF));
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
        // Loopback capped below the link: the delivery-rate estimates do not see the
        // cap, which holds the streams to what is acknowledged.
        let mut paced = on_a_path(22, 0.2, 157e9, CodecSettings::OFF);
        paced.link.unsent_bytes = 512 << 10;
        paced.link.pacing_cap = Some(130e6);
        let d = policy().decide(&paced);
        assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
    }

    #[test]
    fn full_windows_and_caps_far_above_the_rate_leave_the_pace_to_the_cpus() {
        // Loopback, the peer slow to acknowledge: every stream's window is full and
        // holds its 64 KiB unsent, the network delivering hundreds of times faster.
        let mut full = on_a_path(21, 0.04, 40e9, CodecSettings::OFF);
        full.link.unsent_bytes = 4 * (64 << 10);
        assert_off_without_calibration(&policy().decide(&full), "CPUs set the pace");
        // A cap far above what the peer acknowledges does not hold the streams.
        full.link.pacing_cap = Some(2e9);
        assert_off_without_calibration(&policy().decide(&full), "CPUs set the pace");
    }

    #[test]
    fn hysteresis_and_dwell_hold_a_setting_against_small_changes() {
        let mut p = policy();
        let zstd3 = p.settings_for(Candidate::Zstd(3), false);
        p.decide(&observation(
            125e6,
            0.9,
            CodecSettings::OFF,
            Some(calibration()),
        ));
        // The link got a bit faster: level 1 is predicted only slightly better.
        for _ in 0..4 {
            let d = p.decide(&observation(140e6, 0.9, zstd3, Some(calibration())));
            assert_eq!(d.settings[0].level, Some(3), "{:?}", d.log);
        }
        // Much faster: it moves, after the dwell time.
        let d = p.decide(&observation(600e6, 0.9, zstd3, Some(calibration())));
        assert_ne!(d.settings[0].level, Some(3), "{:?}", d.log);
    }

    #[test]
    fn a_link_measured_while_cpu_bound_only_raises_the_estimate() {
        let mut p = policy();
        p.decide(&observation(12.5e6, 0.9, CodecSettings::OFF, None));
        assert_eq!(p.bandwidth(), Some(12.5e6));
        // Not waiting on the link, fewer bytes acknowledged: not a slower link.
        p.decide(&observation(5e6, 0.0, CodecSettings::OFF, None));
        assert_eq!(p.bandwidth(), Some(12.5e6));
        p.decide(&observation(40e6, 0.0, CodecSettings::OFF, None));
        assert_eq!(p.bandwidth(), Some(40e6));
        // Compressing and not waiting on the link: the estimate is probed upwards.
        p.decide(&observation(5e6, 0.0, CodecSettings::full(15), None));
        assert_eq!(p.bandwidth(), Some(60e6));
    }

    #[test]
    fn streams_holding_unsent_bytes_are_link_bound_and_idle_workers_probe_nothing() {
        let zstd1 = CodecSettings::full(1);
        let mut p = policy();
        p.decide(&observation(100e6, 0.9, zstd1, None));
        assert_eq!(p.bandwidth(), Some(100e6));
        // Compressing, the workers hardly waiting, but 4 streams hold 512 KiB unsent:
        // the link sets the pace, and what it carried is measured, not probed past.
        let mut o = observation(120e6, 0.1, zstd1, None);
        o.link.unsent_bytes = 512 << 10;
        p.decide(&o);
        assert_eq!(p.bandwidth(), Some(105e6), "smoothed towards 120 MB/s");
        // Next to nothing unsent: compression-bound, probed upwards.
        o.link.unsent_bytes = 4 << 10;
        p.decide(&o);
        assert_eq!(p.bandwidth(), Some(120e6 * PROBE_GROWTH));
        // Every page of the round handed out: idle workers, no probe.
        let before = p.bandwidth();
        o.round_pages_left = 0;
        o.link.acked_bytes_per_second = 30e6;
        p.decide(&o);
        assert_eq!(p.bandwidth(), before);
    }

    #[test]
    fn a_rate_measured_while_recovering_from_a_loss_burst_is_not_taken_for_the_link() {
        let mut p = policy();
        p.decide(&observation(118e6, 0.9, CodecSettings::full(1), None));
        assert_eq!(p.bandwidth(), Some(118e6));
        let mut o = observation(40e6, 0.9, CodecSettings::full(1), None);
        o.link.retransmits = 5839;
        p.decide(&o);
        assert_eq!(p.bandwidth(), Some(118e6));
        // The odd random loss is no episode: the rate counts.
        o.link.retransmits = 3;
        p.decide(&o);
        assert!(p.bandwidth().is_some_and(|b| b < 118e6));
    }

    #[test]
    fn a_forecast_of_the_path_sets_the_link_while_the_workers_wait_on_it() {
        let forecast = |acked: f64, stalled: f64, ahead: f64| {
            let mut o = observation(acked, stalled, CodecSettings::OFF, None);
            o.link.forecast_bytes_per_second = Some(ahead);
            o
        };
        let mut p = policy();
        p.decide(&observation(12.5e6, 0.9, CodecSettings::OFF, None));
        assert_eq!(p.bandwidth(), Some(12.5e6));
        // Link-bound: the forecast of the next second, not the interval's rate.
        p.decide(&forecast(12.5e6, 0.9, 5e6));
        assert_eq!(p.bandwidth(), Some(5e6));
        // Not link-bound: the interval's rate is only a lower bound, as without one.
        p.decide(&forecast(20e6, 0.0, 5e6));
        assert_eq!(p.bandwidth(), Some(20e6));
        // A forecast that is no rate is none: the interval's rate is smoothed in.
        p.decide(&forecast(12.5e6, 0.9, f64::NAN));
        assert!(p.bandwidth().is_some_and(|b| b > 12.5e6 && b < 20e6));
    }

    #[test]
    fn acknowledgements_arriving_in_a_clump_are_not_taken_for_a_faster_link() {
        let mut p = policy();
        let gigabit = |acked: f64, stalled: f64, interval: f64| {
            let zstd1 = p.settings_for(Candidate::Zstd(1), false);
            let mut o = observation(acked, stalled, zstd1, None);
            o.link.rtt_us = 80_000;
            o.link.delivery_rate = 145e6;
            o.interval = interval;
            o
        };
        let waiting = gigabit(110e6, 0.9, 0.2);
        let clump_in_48_ms = gigabit(251e6, 0.0, 0.048);
        let clump_in_200_ms = gigabit(251e6, 0.0, 0.2);
        p.decide(&waiting);
        assert_eq!(p.bandwidth(), Some(110e6));
        // Less than a round trip: no measure of the link at all.
        p.decide(&clump_in_48_ms);
        assert_eq!(p.bandwidth(), Some(110e6));
        // Over a round trip, still capped by what the streams say they deliver
        // (and, compressing and not waiting, probed upwards from there).
        p.decide(&clump_in_200_ms);
        assert_eq!(p.bandwidth(), Some(145e6 * PROBE_GROWTH));
        // Without the streams' estimate, the clump is all there is.
        let mut unaware = policy();
        let mut o = clump_in_200_ms.clone();
        o.link.delivery_rate = 0.0;
        unaware.decide(&o);
        assert_eq!(unaware.bandwidth(), Some(251e6 * PROBE_GROWTH));
    }

    #[test]
    fn a_rate_measured_in_tcp_start_up_is_not_taken_for_the_link() {
        let mut p = policy();
        // 80 ms round trips, 0.3 s in: the windows are still opening, the workers wait
        // on them at 12.5 MB/s. Not a 100 Mbit/s link: no slow level, and calibration
        // (with the dictionary's training) only down to the start-up floor, while the
        // CPU has time for it.
        let mut o = observation(12.5e6, 0.9, CodecSettings::OFF, None);
        o.link.rtt_us = 80_000;
        o.elapsed = 0.3;
        let d = p.decide(&o);
        assert_eq!(p.bandwidth(), None);
        assert_eq!(d.calibrate, Some(STARTUP_CALIBRATION_FLOOR));
        assert!(d.train_dictionary);
        // Asked once.
        let again = p.decide(&o);
        assert_eq!(again.calibrate, None);
        assert!(
            d.settings.iter().all(|s| s.level == Some(1)),
            "a fast level meanwhile: {:?}",
            d.log
        );
        // Eight round trips in, a gigabit link measured: the model's choice.
        let zstd1 = p.settings_for(Candidate::Zstd(1), false);
        o = observation(125e6, 0.9, zstd1, Some(calibration()));
        o.link.rtt_us = 80_000;
        o.elapsed = 0.7;
        let d = p.decide(&o);
        assert_eq!(p.bandwidth(), Some(125e6));
        assert_eq!(d.calibrate, None, "62.5 MB/s a worker: above the floor");
        // A link whose share is below the floor is calibrated again, down to it.
        let mut slow = policy();
        let mut s = observation(1e6, 0.9, CodecSettings::OFF, None);
        s.link.rtt_us = 80_000;
        s.elapsed = 0.3;
        slow.decide(&s);
        s.elapsed = 0.7;
        let d = slow.decide(&s);
        assert_eq!(d.calibrate, Some(0.5e6));
        // Not when the start-up calibration reached a level slower than the share (16
        // at 18 MB/s, for 19 MB/s a worker): what it left out is slower still.
        let mut p = policy();
        let mut o = observation(38e6, 0.9, CodecSettings::OFF, None);
        o.link.rtt_us = 80_000;
        o.elapsed = 0.3;
        p.decide(&o);
        o.calibration = Some(calibration());
        o.elapsed = 0.7;
        let d = p.decide(&o);
        assert_eq!(d.calibrate, None, "{:?}", d.log);
        // Without the start-up rule the first interval would have picked level 9.
        let mut unaware = policy();
        unaware.decide(&observation(12.5e6, 0.9, CodecSettings::OFF, None));
        let d = unaware.decide(&observation(
            12.5e6,
            0.9,
            CodecSettings::OFF,
            Some(calibration()),
        ));
        assert_eq!(d.settings[0].level, Some(9));
    }

    #[test]
    fn measured_codec_speed_corrects_the_calibration() {
        let mut p = policy();
        let cal = calibration();
        p.decide(&observation(
            125e6,
            0.9,
            CodecSettings::OFF,
            Some(cal.clone()),
        ));
        // Level 3 runs at a third of its calibrated speed on this worker (contention).
        let mut o = observation(
            125e6,
            0.9,
            p.settings_for(Candidate::Zstd(3), false),
            Some(cal),
        );
        for w in &mut o.workers {
            w.codec = CodecCounters {
                compress_in: 100 << 20,
                compress_out: (100 << 20) * 10 / 26,
                compress_nanos: ((100u64 << 20) as f64 / 100e6 * 1e9) as u64,
                input_bytes: 100 << 20,
                encode_nanos: ((100u64 << 20) as f64 / 1.5e9 * 1e9) as u64,
                ..CodecCounters::default()
            };
        }
        let mut d = p.decide(&o);
        for _ in 0..3 {
            d = p.decide(&o);
        }
        let level = d.settings[0].level.unwrap();
        assert!(
            level < 3,
            "a slower core moves to a faster level: {:?}",
            d.log
        );
    }
}
