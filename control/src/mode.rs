//! Mode detection (datacenter / internet / hybrid) and what each mode means for a
//! migration.
//!
//! The detector is sans-IO: a pure function of link samples and their times, so every
//! boundary, flapping input and switching delay is tested without sockets or clocks.
//! The control thread feeds it one [`LinkSample`] per migration report (TCP_INFO over
//! the data streams, the control stream's ping, acknowledged bytes) and publishes the
//! mode's [`ModePolicy`] as a settings epoch when the mode changes.
//!
//! Rules (design targets): **datacenter** when RTT < 10 ms and bandwidth > 1 Gbit/s and
//! loss < 0.1%; **internet** when RTT > 50 ms or bandwidth < 1 Gbit/s or loss > 0.1%;
//! **hybrid** otherwise. The inputs are window statistics over the last
//! [`DetectorConfig::window`] samples (medians of RTT, bandwidth and retransmitted over
//! sent segments), so one outlier moves nothing; a mode, the first one included, must
//! then be what the window says for [`DetectorConfig::hold`] before the detector
//! takes it (the first window spans TCP's start, whose queueing inflates the RTT).

use dwcp_dataplane::engine::Progress;
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Where the appliances are relative to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Same datacenter: short, fast, clean.
    Datacenter,
    /// Across the internet: long, or slow, or lossy.
    Internet,
    /// In between (a metro link, say).
    Hybrid,
}

impl Mode {
    /// The name in commands and reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Datacenter => "datacenter",
            Mode::Internet => "internet",
            Mode::Hybrid => "hybrid",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "datacenter" => Ok(Mode::Datacenter),
            "internet" => Ok(Mode::Internet),
            "hybrid" => Ok(Mode::Hybrid),
            other => Err(format!(
                "unknown mode {other:?} (auto, datacenter, internet or hybrid)"
            )),
        }
    }
}

/// One measurement of the live connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSample {
    /// When it was taken (any fixed origin).
    pub at: Duration,
    /// Round-trip time.
    pub rtt: Duration,
    /// Achieved bandwidth, bits per second.
    pub bandwidth: f64,
    /// Segments sent since the previous sample.
    pub segments: u64,
    /// Segments retransmitted since the previous sample.
    pub retransmits: u64,
}

/// Turns one migration's progress reports into [`LinkSample`]s: per-stream counters
/// are cumulative, so the meter keeps the previous report's to take differences.
#[derive(Debug, Clone, Default)]
pub struct LinkMeter {
    /// Per stream: segments sent, retransmitted, and retransmitted spuriously, as of
    /// the previous report.
    tcp_mark: Vec<(u32, u32, u32)>,
    /// Bytes sent and when, as of the previous rate measurement.
    rate_mark: Option<(Instant, u64)>,
    /// Recent send rate, bytes per second.
    rate: f64,
}

impl LinkMeter {
    /// Shortest span a send rate is measured over.
    const RATE_SPAN: Duration = Duration::from_millis(200);

    /// Take a report made at `at`; `origin` is the fixed point sample times count
    /// from. Returns a sample once the streams have sent something since the previous
    /// report and some round trip is known. RTT: the lowest smoothed RTT among the data
    /// streams (the one least inflated by their own queues), else the control stream's
    /// ping. Bandwidth: what the streams' delivery-rate estimates add up to, or the
    /// measured send rate if higher. Loss: segments retransmitted, less those the peer
    /// reported as duplicates, over segments sent.
    pub fn sample(
        &mut self,
        progress: &Progress,
        at: Instant,
        origin: Instant,
    ) -> Option<LinkSample> {
        let bytes = progress.stream_bytes();
        match self.rate_mark {
            Some((mark, before)) => {
                let dt = at.saturating_duration_since(mark);
                if dt >= Self::RATE_SPAN {
                    self.rate = bytes.saturating_sub(before) as f64 / dt.as_secs_f64();
                    self.rate_mark = Some((at, bytes));
                }
            }
            None => self.rate_mark = Some((at, bytes)),
        }
        if self.tcp_mark.len() != progress.streams.len() {
            self.tcp_mark = vec![(0, 0, 0); progress.streams.len()];
        }
        let mut lowest_rtt: Option<u32> = None;
        let mut delivery = 0u64;
        let mut segments = 0u64;
        let mut retransmits = 0u64;
        for (s, mark) in progress.streams.iter().zip(self.tcp_mark.iter_mut()) {
            let Some(t) = s.tcp else { continue };
            if t.rtt_us > 0 {
                lowest_rtt = Some(lowest_rtt.map_or(t.rtt_us, |r| r.min(t.rtt_us)));
            }
            delivery += t.delivery_rate;
            segments += u64::from(t.segs_out.saturating_sub(mark.0));
            // Spurious retransmissions (D-SACKed) lost nothing: on loopback and fast
            // LANs a receiver starved of CPU draws tail-loss probes that are all
            // spurious, and counting them made loopback look lossy.
            let retransmitted = t.total_retrans.saturating_sub(mark.1);
            let spurious = t.dsack_dups.saturating_sub(mark.2);
            retransmits += u64::from(retransmitted.saturating_sub(spurious));
            *mark = (t.segs_out, t.total_retrans, t.dsack_dups);
        }
        let rtt = lowest_rtt
            .map(|us| Duration::from_micros(u64::from(us)))
            .or(progress.ping_rtt)?;
        (segments > 0).then(|| LinkSample {
            at: at.saturating_duration_since(origin),
            rtt,
            bandwidth: (delivery as f64 * 8.0).max(self.rate * 8.0),
            segments,
            retransmits,
        })
    }

    /// The recent send rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// The rules' thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Datacenter below this RTT.
    pub datacenter_rtt: Duration,
    /// Internet above this RTT.
    pub internet_rtt: Duration,
    /// Datacenter above, internet below this bandwidth, bits per second.
    pub bandwidth: f64,
    /// Datacenter below, internet above this loss (fraction of segments).
    pub loss: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            datacenter_rtt: Duration::from_millis(10),
            internet_rtt: Duration::from_millis(50),
            bandwidth: 1e9,
            loss: 0.001,
        }
    }
}

/// How the detector smooths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    /// Samples in the rolling window (at least 10); no mode before it is full.
    pub window: usize,
    /// How long the window must keep saying the same new mode before a switch.
    pub hold: Duration,
    /// The rules.
    pub thresholds: Thresholds,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            window: 10,
            hold: Duration::from_millis(800),
            thresholds: Thresholds::default(),
        }
    }
}

/// Window statistics: what a classification rests on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSummary {
    /// Median RTT.
    pub rtt: Duration,
    /// RTT spread: the difference between the window's largest and smallest.
    pub rtt_spread: Duration,
    /// Median bandwidth, bits per second.
    pub bandwidth: f64,
    /// Median of the samples' retransmitted over sent segments.
    pub loss: f64,
}

impl fmt::Display for LinkSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rtt {:.2} ms (spread {:.2}), bandwidth {:.2} Gbit/s, loss {:.3}%",
            self.rtt.as_secs_f64() * 1e3,
            self.rtt_spread.as_secs_f64() * 1e3,
            self.bandwidth / 1e9,
            self.loss * 100.0
        )
    }
}

/// The rules, applied to window statistics.
pub fn classify(s: &LinkSummary, t: &Thresholds) -> Mode {
    if s.rtt < t.datacenter_rtt && s.bandwidth > t.bandwidth && s.loss < t.loss {
        Mode::Datacenter
    } else if s.rtt > t.internet_rtt || s.bandwidth < t.bandwidth || s.loss > t.loss {
        Mode::Internet
    } else {
        Mode::Hybrid
    }
}

/// The detector.
#[derive(Debug, Clone)]
pub struct ModeDetector {
    config: DetectorConfig,
    samples: VecDeque<LinkSample>,
    detected: Option<Mode>,
    /// A different mode the window has said since this time.
    candidate: Option<(Mode, Duration)>,
    fixed: Option<Mode>,
    summary: Option<LinkSummary>,
}

impl ModeDetector {
    /// A detector with `config` (a window below 10 samples is raised to 10).
    pub fn new(mut config: DetectorConfig) -> Self {
        config.window = config.window.max(10);
        ModeDetector {
            config,
            samples: VecDeque::with_capacity(config.window),
            detected: None,
            candidate: None,
            fixed: None,
            summary: None,
        }
    }

    /// Fix the mode (`Some`) or return to detection (`None`).
    pub fn set_override(&mut self, mode: Option<Mode>) {
        self.fixed = mode;
    }

    /// The fixed mode, if one is set.
    pub fn fixed(&self) -> Option<Mode> {
        self.fixed
    }

    /// The mode in force: the fixed one, else the detected one (none before the
    /// window first fills).
    pub fn mode(&self) -> Option<Mode> {
        self.fixed.or(self.detected)
    }

    /// The latest window statistics.
    pub fn summary(&self) -> Option<LinkSummary> {
        self.summary
    }

    /// Why the mode is what it is.
    pub fn why(&self) -> String {
        let measured = match &self.summary {
            Some(s) => format!("{s} over the last {} samples", self.samples.len()),
            None => format!(
                "{} of {} samples so far",
                self.samples.len(),
                self.config.window
            ),
        };
        match (self.fixed, self.detected) {
            (Some(m), _) => format!("fixed by the operator to {m}; measured: {measured}"),
            (None, Some(m)) => format!("detected {m}: {measured}"),
            (None, None) => format!("not yet detected: {measured}"),
        }
    }

    /// Take a sample; returns the new mode in force when it changed.
    pub fn push(&mut self, sample: LinkSample) -> Option<Mode> {
        let before = self.mode();
        if self.samples.len() == self.config.window {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        if self.samples.len() < self.config.window {
            return None;
        }
        let summary = self.summarize();
        self.summary = Some(summary);
        let said = classify(&summary, &self.config.thresholds);
        // The first mode, too, must hold: the first window of a migration spans TCP's
        // start, whose queueing inflates the RTT (a 5 ms metro path read as hybrid
        // for its first second).
        match self.detected {
            Some(current) if current == said => self.candidate = None,
            _ => match self.candidate {
                Some((m, since)) if m == said => {
                    if sample.at.saturating_sub(since) >= self.config.hold {
                        self.detected = Some(said);
                        self.candidate = None;
                    }
                }
                _ => self.candidate = Some((said, sample.at)),
            },
        }
        let after = self.mode();
        (after != before).then_some(after).flatten()
    }

    fn summarize(&self) -> LinkSummary {
        let mut rtts: Vec<f64> = self.samples.iter().map(|s| s.rtt.as_secs_f64()).collect();
        rtts.sort_by(f64::total_cmp);
        let mut bandwidths: Vec<f64> = self.samples.iter().map(|s| s.bandwidth).collect();
        bandwidths.sort_by(f64::total_cmp);
        let mut losses: Vec<f64> = self
            .samples
            .iter()
            .map(|s| {
                if s.segments > 0 {
                    s.retransmits as f64 / s.segments as f64
                } else {
                    0.0
                }
            })
            .collect();
        losses.sort_by(f64::total_cmp);
        LinkSummary {
            rtt: Duration::from_secs_f64(median(&rtts)),
            rtt_spread: Duration::from_secs_f64(rtts[rtts.len() - 1] - rtts[0]),
            bandwidth: median(&bandwidths),
            loss: median(&losses),
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// What a mode means for a migration: the one place the mapping is written down (and
/// `docs/control.md` quotes it).
///
/// | mode | transport | streams | congestion | codecs |
/// |---|---|---|---|---|
/// | datacenter | RMA (pages written into the destination's memory) when a libfabric provider on RDMA hardware is here, else TCP | 4 | cubic | off (the link outruns zstd) |
/// | hybrid | TCP | 8 | bbr | the codec policy decides |
/// | internet | TCP | 16 | bbr | dedup + delta + zstd, level chosen by the codec policy (`auto`) |
///
/// Stream counts are capped at the streams the migration opened (a live change cannot
/// open more connections).
#[derive(Debug, Clone, PartialEq)]
pub struct ModePolicy {
    /// `rma` or `tcp`.
    pub transport: &'static str,
    /// Streams carrying pages.
    pub streams: u16,
    /// Congestion control.
    pub congestion: dwcp_dataplane::transport::socket::Congestion,
    /// Codecs.
    pub codec: dwcp_dataplane::codec::policy::CodecMode,
    /// Why the transport is what it is.
    pub note: Option<String>,
}

/// The policy of `mode` on a host whose RMA providers on RDMA hardware are
/// `rma_hardware` (socket-based ones, such as `tcp`, do not count: RMA over sockets is
/// no faster than the data streams).
pub fn policy_for(mode: Mode, rma_hardware: &[String]) -> ModePolicy {
    use dwcp_dataplane::codec::policy::CodecMode;
    use dwcp_dataplane::transport::socket::Congestion;
    match mode {
        Mode::Datacenter => {
            let note = (!rma_hardware.is_empty())
                .then(|| format!("pages by RMA write through {}", rma_hardware.join(", ")));
            ModePolicy {
                transport: if rma_hardware.is_empty() {
                    "tcp"
                } else {
                    "rma"
                },
                streams: 4,
                congestion: Congestion::Cubic,
                codec: CodecMode::Off,
                note,
            }
        }
        Mode::Hybrid => ModePolicy {
            transport: "tcp",
            streams: 8,
            congestion: Congestion::Bbr,
            codec: CodecMode::Auto,
            note: None,
        },
        Mode::Internet => ModePolicy {
            transport: "tcp",
            streams: 16,
            congestion: Congestion::Bbr,
            codec: CodecMode::Auto,
            note: None,
        },
    }
}

impl fmt::Display for ModePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codec = match &self.codec {
            dwcp_dataplane::codec::policy::CodecMode::Off => "codecs off".to_string(),
            dwcp_dataplane::codec::policy::CodecMode::Auto => "codecs by policy".to_string(),
            dwcp_dataplane::codec::policy::CodecMode::Fixed(s) => format!("codecs {s:?}"),
        };
        write!(
            f,
            "{}, {} streams, {}, {codec}",
            self.transport, self.streams, self.congestion
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A report of streams with these (segments sent, retransmitted, D-SACKed).
    pub(crate) fn progress_with(tcp: &[(u32, u32, u32)]) -> Progress {
        use dwcp_dataplane::transport::StreamTelemetry;
        use dwcp_dataplane::transport::socket::TcpInfoSample;
        Progress {
            round: 0,
            phase: "precopy",
            bytes_sent: 0,
            pages_sent: 0,
            memory_pages: 1,
            rounds_done: 0,
            round_pages: 1,
            round_pages_queued: 0,
            round_pages_sent: 0,
            dirty_rate: 0.0,
            bandwidth: 0.0,
            throttle: 0,
            elapsed: Duration::ZERO,
            streams: tcp
                .iter()
                .enumerate()
                .map(
                    |(i, &(segs_out, total_retrans, dsack_dups))| StreamTelemetry {
                        stream: i as u16,
                        bytes: u64::from(segs_out) * 65536,
                        pages: 0,
                        tcp: Some(TcpInfoSample {
                            rtt_us: 20,
                            segs_out,
                            total_retrans,
                            dsack_dups,
                            ..TcpInfoSample::default()
                        }),
                    },
                )
                .collect(),
            workers: Vec::new(),
            connected_streams: tcp.len() as u16,
            active_streams: tcp.len() as u16,
            epoch: 0,
            transport: dwcp_dataplane::transport::TransportKind::IoUring,
            ping_rtt: None,
            estimated_downtime: None,
        }
    }

    #[test]
    fn spurious_retransmissions_are_no_loss() {
        // Loopback under CPU starvation: tail-loss probes, every one D-SACKed.
        let origin = Instant::now();
        let mut meter = LinkMeter::default();
        meter.sample(&progress_with(&[(0, 0, 0), (0, 0, 0)]), origin, origin);
        let s = meter
            .sample(
                &progress_with(&[(5000, 10, 10), (5000, 3, 1)]),
                origin + Duration::from_millis(100),
                origin,
            )
            .expect("a sample");
        assert_eq!(s.segments, 10_000);
        assert_eq!(s.retransmits, 2, "only the two the peer did not see twice");
    }

    fn sample(at_ms: u64, rtt_ms: f64, gbit: f64, loss: f64) -> LinkSample {
        LinkSample {
            at: MS * at_ms as u32,
            rtt: Duration::from_secs_f64(rtt_ms / 1e3),
            bandwidth: gbit * 1e9,
            segments: 100_000,
            retransmits: (loss * 100_000.0).round() as u64,
        }
    }

    fn summary(rtt_ms: f64, gbit: f64, loss: f64) -> LinkSummary {
        LinkSummary {
            rtt: Duration::from_secs_f64(rtt_ms / 1e3),
            rtt_spread: Duration::ZERO,
            bandwidth: gbit * 1e9,
            loss,
        }
    }

    #[test]
    fn each_boundary() {
        let t = Thresholds::default();
        let c = |rtt, gbit, loss| classify(&summary(rtt, gbit, loss), &t);
        assert_eq!(c(0.2, 10.0, 0.0), Mode::Datacenter);
        assert_eq!(c(9.99, 1.01, 0.00099), Mode::Datacenter);
        // RTT: 10 ms is no longer datacenter; above 50 is internet.
        assert_eq!(c(10.0, 10.0, 0.0), Mode::Hybrid);
        assert_eq!(c(50.0, 10.0, 0.0), Mode::Hybrid);
        assert_eq!(c(50.01, 10.0, 0.0), Mode::Internet);
        // Bandwidth: exactly 1 Gbit/s is neither above nor below.
        assert_eq!(c(1.0, 1.0, 0.0), Mode::Hybrid);
        assert_eq!(c(1.0, 0.999, 0.0), Mode::Internet);
        // Loss: 0.1% exactly is neither; above is internet.
        assert_eq!(c(1.0, 10.0, 0.001), Mode::Hybrid);
        assert_eq!(c(1.0, 10.0, 0.0011), Mode::Internet);
        // Metro (5 ms, 10 Gbit/s) is datacenter; cross-region (80 ms) internet.
        assert_eq!(c(5.0, 4.0, 0.0), Mode::Datacenter);
        assert_eq!(c(80.0, 0.9, 0.0001), Mode::Internet);
        assert_eq!(c(20.0, 5.0, 0.0), Mode::Hybrid);
    }

    #[test]
    fn nothing_before_the_window_fills_and_the_first_mode_has_held() {
        let mut d = ModeDetector::new(DetectorConfig::default());
        for i in 0..9 {
            assert_eq!(d.push(sample(i * 100, 0.2, 10.0, 0.0)), None);
            assert_eq!(d.mode(), None);
        }
        assert!(d.why().contains("9 of 10"), "{}", d.why());
        // The window is full at 900 ms; what it says must hold 800 ms.
        for t in (900..1700).step_by(100) {
            assert_eq!(d.push(sample(t, 0.2, 10.0, 0.0)), None, "at {t} ms");
        }
        assert_eq!(d.push(sample(1700, 0.2, 10.0, 0.0)), Some(Mode::Datacenter));
        assert!(d.why().starts_with("detected datacenter"), "{}", d.why());
    }

    /// A metro path (5 ms) whose first window still holds TCP's start-up queueing
    /// (RTTs of 12 ms): the first mode declared is the path's, not the start-up's.
    #[test]
    fn the_start_up_does_not_decide_the_first_mode() {
        let mut d = ModeDetector::new(DetectorConfig::default());
        let mut declared = Vec::new();
        for i in 0..40u64 {
            let rtt = if i < 12 { 12.0 } else { 5.0 };
            if let Some(m) = d.push(sample(i * 100, rtt, 6.0, 0.0)) {
                declared.push(m);
            }
        }
        assert_eq!(declared, vec![Mode::Datacenter]);
    }

    #[test]
    fn outliers_do_not_flap_the_mode() {
        let mut d = ModeDetector::new(DetectorConfig::default());
        for i in 0..18 {
            d.push(sample(i * 100, 0.3, 8.0, 0.0));
        }
        assert_eq!(d.mode(), Some(Mode::Datacenter));
        // Every third sample a wild one (a 200 ms RTT, a stalled interval, a loss
        // burst): the medians do not move, nothing changes, for a minute.
        for i in 18..618u64 {
            let s = match i % 3 {
                0 => sample(i * 100, 200.0, 0.01, 0.05),
                _ => sample(i * 100, 0.3, 8.0, 0.0),
            };
            assert_eq!(d.push(s), None, "sample {i}");
        }
        assert_eq!(d.mode(), Some(Mode::Datacenter));
    }

    #[test]
    fn alternating_modes_never_settle_long_enough_to_switch() {
        let mut d = ModeDetector::new(DetectorConfig::default());
        for i in 0..18 {
            d.push(sample(i * 100, 80.0, 0.5, 0.0));
        }
        assert_eq!(d.mode(), Some(Mode::Internet));
        // Bursts of 6 datacenter samples then 6 internet ones: the window tips to
        // datacenter for less than the hold time, each time.
        for i in 18..408u64 {
            let s = if (i / 6) % 2 == 0 {
                sample(i * 100, 0.3, 8.0, 0.0)
            } else {
                sample(i * 100, 80.0, 0.5, 0.0)
            };
            assert_eq!(d.push(s), None, "sample {i}");
        }
    }

    #[test]
    fn a_sustained_change_switches_within_two_seconds() {
        for (from, to, expect) in [
            ((0.3, 8.0, 0.0), (80.0, 0.9, 0.0), Mode::Internet),
            ((80.0, 0.9, 0.0), (0.3, 8.0, 0.0), Mode::Datacenter),
            ((0.3, 8.0, 0.0), (20.0, 5.0, 0.0), Mode::Hybrid),
            ((0.3, 8.0, 0.0), (0.3, 8.0, 0.02), Mode::Internet),
        ] {
            let mut d = ModeDetector::new(DetectorConfig::default());
            let mut t = 0;
            for _ in 0..20 {
                d.push(sample(t, from.0, from.1, from.2));
                t += 100;
            }
            let changed_at = t;
            let mut switched = None;
            while t < changed_at + 5_000 {
                if let Some(m) = d.push(sample(t, to.0, to.1, to.2)) {
                    switched = Some((m, t - changed_at));
                    break;
                }
                t += 100;
            }
            let (m, after) = switched.expect("switched");
            assert_eq!(m, expect);
            assert!(after <= 2_000, "{from:?} -> {to:?} after {after} ms");
        }
    }

    #[test]
    fn manual_override_wins_and_auto_returns_to_detection() {
        let mut d = ModeDetector::new(DetectorConfig::default());
        for i in 0..10 {
            d.push(sample(i * 100, 0.3, 8.0, 0.0));
        }
        d.set_override(Some(Mode::Internet));
        assert_eq!(d.mode(), Some(Mode::Internet));
        assert!(d.why().starts_with("fixed by the operator to internet"));
        for i in 10..40 {
            assert_eq!(d.push(sample(i * 100, 0.3, 8.0, 0.0)), None);
        }
        d.set_override(None);
        assert_eq!(d.mode(), Some(Mode::Datacenter));
        assert_eq!("hybrid".parse::<Mode>(), Ok(Mode::Hybrid));
        assert!("fast".parse::<Mode>().is_err());
    }

    #[test]
    fn policies_follow_the_design() {
        use dwcp_dataplane::codec::policy::CodecMode;
        use dwcp_dataplane::transport::socket::Congestion;
        let dc = policy_for(Mode::Datacenter, &[]);
        assert_eq!(
            (dc.streams, dc.congestion, dc.codec),
            (4, Congestion::Cubic, CodecMode::Off)
        );
        assert!(dc.note.is_none());
        let dc = policy_for(Mode::Datacenter, &["mlx5_0".into()]);
        assert!(dc.note.is_some_and(|n| n.contains("mlx5_0")));
        let inet = policy_for(Mode::Internet, &[]);
        assert_eq!(
            (inet.streams, inet.congestion, inet.codec),
            (16, Congestion::Bbr, CodecMode::Auto)
        );
        let hybrid = policy_for(Mode::Hybrid, &[]);
        assert!(hybrid.streams > dc.streams && hybrid.streams < inet.streams);
    }
}
