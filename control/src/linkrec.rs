//! The link recorder: what the control thread sees of a migration's path, one row per
//! span of reports of at least a quarter second (about 0.3 s with reports every
//! 100 ms), for the learned link models to be trained and judged on.
//!
//! It reads the same progress reports the control thread gets (TCP_INFO of every data
//! stream, the bytes handed to the kernel, the control stream's ping) and keeps, per
//! row: the **acknowledged rate** (bytes the peer acknowledged over the row's span, all
//! streams: what the path delivered), the streams' summed delivery-rate estimates, the
//! send rate, the lowest smoothed RTT and its variance, the lowest minimum RTT, the
//! retransmitted and sent segments over the span (spurious retransmissions left out,
//! as [`LinkMeter`] does), the summed congestion windows and the bytes waiting
//! unsent. Rows are plain numbers, written as CSV with [`LinkRecord::CSV_HEADER`].

use crate::mode::LinkMeter;
use dwcp_dataplane::engine::Progress;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// The span of one row.
pub const ROW_SPAN: Duration = Duration::from_millis(250);

/// One row: the path over `ROW_SPAN` (or a little more) ending at `t`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkRecord {
    /// Seconds since the recorder's origin.
    pub t: f64,
    /// Acknowledged rate, Mbit/s.
    pub acked_mbit: f64,
    /// Summed TCP delivery-rate estimates, Mbit/s.
    pub delivery_mbit: f64,
    /// Bytes handed to the kernel, Mbit/s.
    pub send_mbit: f64,
    /// Lowest smoothed RTT among the streams, ms.
    pub rtt_ms: f64,
    /// Largest RTT variance among the streams, ms.
    pub rttvar_ms: f64,
    /// Lowest minimum RTT seen, ms.
    pub min_rtt_ms: f64,
    /// Segments retransmitted over the span (spurious ones left out).
    pub retrans: u64,
    /// Segments sent over the span.
    pub segments: u64,
    /// Summed congestion windows, segments.
    pub cwnd: u64,
    /// Bytes written and not yet sent, KiB.
    pub notsent_kib: f64,
    /// Streams with TCP_INFO.
    pub streams: u32,
}

impl LinkRecord {
    /// Header of the CSV form.
    pub const CSV_HEADER: &'static str = "t,acked_mbit,delivery_mbit,send_mbit,rtt_ms,rttvar_ms,min_rtt_ms,retrans,segments,cwnd,notsent_kib,streams";

    /// One CSV line, without its newline.
    pub fn csv_line(&self) -> String {
        format!(
            "{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{:.1},{}",
            self.t,
            self.acked_mbit,
            self.delivery_mbit,
            self.send_mbit,
            self.rtt_ms,
            self.rttvar_ms,
            self.min_rtt_ms,
            self.retrans,
            self.segments,
            self.cwnd,
            self.notsent_kib,
            self.streams
        )
    }
}

/// One stream over the same span as a [`LinkRecord`] (kept rows only).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StreamRecord {
    /// Seconds since the recorder's origin.
    pub t: f64,
    /// The data stream's id.
    pub stream: u16,
    /// Acknowledged rate, Mbit/s.
    pub acked_mbit: f64,
    /// TCP's delivery-rate estimate, Mbit/s.
    pub delivery_mbit: f64,
    /// Smoothed RTT and its variance, ms.
    pub rtt_ms: f64,
    pub rttvar_ms: f64,
    /// Segments retransmitted over the span (spurious ones left out), and sent.
    pub retrans: u64,
    pub segments: u64,
    /// Congestion window, segments.
    pub cwnd: u32,
    /// Bytes written and not yet sent, KiB.
    pub notsent_kib: f64,
}

impl StreamRecord {
    /// Header of the CSV form.
    pub const CSV_HEADER: &'static str =
        "t,stream,acked_mbit,delivery_mbit,rtt_ms,rttvar_ms,retrans,segments,cwnd,notsent_kib";

    /// One CSV line, without its newline.
    pub fn csv_line(&self) -> String {
        format!(
            "{:.3},{},{:.3},{:.3},{:.3},{:.3},{},{},{},{:.1}",
            self.t,
            self.stream,
            self.acked_mbit,
            self.delivery_mbit,
            self.rtt_ms,
            self.rttvar_ms,
            self.retrans,
            self.segments,
            self.cwnd,
            self.notsent_kib
        )
    }
}

/// Turns progress reports into [`LinkRecord`]s (and, when it keeps them,
/// [`StreamRecord`]s).
#[derive(Debug)]
pub struct LinkRecorder {
    origin: Instant,
    meter: LinkMeter,
    /// When the current row began, its bytes acknowledged and handed to the kernel.
    mark: Option<(Instant, u64, u64)>,
    /// Segments sent and retransmitted since the row began (from the meter's samples).
    segments: u64,
    retrans: u64,
    rows: Vec<LinkRecord>,
    /// Per stream, as of the current row's start: bytes acknowledged, segments
    /// retransmitted, D-SACKed and sent.
    stream_marks: std::collections::HashMap<u16, (u64, u32, u32, u32)>,
    stream_rows: Vec<StreamRecord>,
    /// Each stream's part of the last row handed out (kept or not).
    last_streams: Vec<StreamRecord>,
    /// Whether rows are kept (for [`LinkRecorder::to_csv`]) or only handed out.
    keep: bool,
}

impl LinkRecorder {
    /// A recorder whose rows count time from `origin`, keeping every row.
    pub fn new(origin: Instant) -> Self {
        LinkRecorder {
            origin,
            meter: LinkMeter::default(),
            mark: None,
            segments: 0,
            retrans: 0,
            rows: Vec::new(),
            stream_marks: std::collections::HashMap::new(),
            stream_rows: Vec::new(),
            last_streams: Vec::new(),
            keep: true,
        }
    }

    /// A recorder that only hands its rows out (a daemon's migrations, unless their
    /// rows are to be kept: a long-lived daemon would otherwise hold every row of
    /// every migration it ever ran).
    pub fn passing(origin: Instant) -> Self {
        LinkRecorder {
            keep: false,
            ..LinkRecorder::new(origin)
        }
    }

    /// Let go of the rows kept so far.
    pub fn forget(&mut self) {
        self.rows = Vec::new();
        self.stream_rows = Vec::new();
    }

    /// Each stream's part of the row that ends at `t` (`span` long), and the marks for
    /// the next.
    fn measure_streams(&mut self, progress: &Progress, t: f64, span: Duration) {
        self.last_streams.clear();
        for s in &progress.streams {
            let Some(tcp) = s.tcp else { continue };
            let now = (
                tcp.bytes_acked,
                tcp.total_retrans,
                tcp.dsack_dups,
                tcp.segs_out,
            );
            let before = self
                .stream_marks
                .insert(s.stream, now)
                .unwrap_or((0, 0, 0, 0));
            if self.mark.is_none() {
                continue;
            }
            let lost = now
                .1
                .saturating_sub(before.1)
                .saturating_sub(now.2.saturating_sub(before.2));
            self.last_streams.push(StreamRecord {
                t,
                stream: s.stream,
                acked_mbit: now.0.saturating_sub(before.0) as f64 * 8.0 / span.as_secs_f64() / 1e6,
                delivery_mbit: tcp.delivery_rate as f64 * 8.0 / 1e6,
                rtt_ms: f64::from(tcp.rtt_us) / 1e3,
                rttvar_ms: f64::from(tcp.rttvar_us) / 1e3,
                retrans: u64::from(lost),
                segments: u64::from(now.3.saturating_sub(before.3)),
                cwnd: tcp.snd_cwnd,
                notsent_kib: f64::from(tcp.notsent_bytes) / 1024.0,
            });
        }
        if self.keep {
            self.stream_rows.extend_from_slice(&self.last_streams);
        }
    }

    /// Each stream's part of the last row [`LinkRecorder::observe`] handed out.
    pub fn last_streams(&self) -> &[StreamRecord] {
        &self.last_streams
    }

    /// Every stream's rows so far as CSV, header first (kept rows only).
    pub fn streams_csv(&self) -> String {
        let mut out = String::from(StreamRecord::CSV_HEADER);
        out.push('\n');
        for r in &self.stream_rows {
            let _ = writeln!(out, "{}", r.csv_line());
        }
        out
    }

    /// Take a report made at `at`; returns the row it completed, if any.
    pub fn observe(&mut self, progress: &Progress, at: Instant) -> Option<LinkRecord> {
        if let Some(sample) = self.meter.sample(progress, at, self.origin) {
            self.segments += sample.segments;
            self.retrans += sample.retransmits;
        }
        let tcp = || progress.streams.iter().filter_map(|s| s.tcp);
        let acked: u64 = tcp().map(|t| t.bytes_acked).sum();
        let sent = progress.stream_bytes();
        let Some((since, acked_before, sent_before)) = self.mark else {
            self.measure_streams(progress, 0.0, Duration::ZERO);
            self.mark = Some((at, acked, sent));
            return None;
        };
        let span = at.saturating_duration_since(since);
        if span < ROW_SPAN {
            return None;
        }
        let mbit = |bytes: u64| bytes as f64 * 8.0 / span.as_secs_f64() / 1e6;
        let ms = |us: u32| f64::from(us) / 1e3;
        let row = LinkRecord {
            t: at.saturating_duration_since(self.origin).as_secs_f64(),
            // A stream replaced mid-span starts its count again: never negative.
            acked_mbit: mbit(acked.saturating_sub(acked_before)),
            delivery_mbit: tcp().map(|t| t.delivery_rate).sum::<u64>() as f64 * 8.0 / 1e6,
            send_mbit: mbit(sent.saturating_sub(sent_before)),
            rtt_ms: tcp()
                .map(|t| t.rtt_us)
                .filter(|&r| r > 0)
                .min()
                .map_or(0.0, ms),
            rttvar_ms: tcp().map(|t| t.rttvar_us).max().map_or(0.0, ms),
            min_rtt_ms: tcp()
                .map(|t| t.min_rtt_us)
                .filter(|&r| r > 0 && r != u32::MAX)
                .min()
                .map_or(0.0, ms),
            retrans: std::mem::take(&mut self.retrans),
            segments: std::mem::take(&mut self.segments),
            cwnd: tcp().map(|t| u64::from(t.snd_cwnd)).sum(),
            notsent_kib: tcp().map(|t| u64::from(t.notsent_bytes)).sum::<u64>() as f64 / 1024.0,
            streams: tcp().count() as u32,
        };
        if self.keep {
            self.rows.push(row);
        }
        self.measure_streams(progress, row.t, span);
        self.mark = Some((at, acked, sent));
        Some(row)
    }

    /// Every row so far.
    pub fn rows(&self) -> &[LinkRecord] {
        &self.rows
    }

    /// Every row as CSV, header first.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(LinkRecord::CSV_HEADER);
        out.push('\n');
        for r in &self.rows {
            let _ = writeln!(out, "{}", r.csv_line());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_dataplane::transport::StreamTelemetry;
    use dwcp_dataplane::transport::socket::TcpInfoSample;

    fn progress(streams: &[(u64, u64, u32, u32)]) -> Progress {
        Progress {
            streams: streams
                .iter()
                .enumerate()
                .map(|(i, &(sent, acked, segs, retrans))| StreamTelemetry {
                    stream: i as u16,
                    bytes: sent,
                    pages: 0,
                    tcp: Some(TcpInfoSample {
                        rtt_us: 40_000 + i as u32 * 1000,
                        rttvar_us: 2_000,
                        min_rtt_us: 39_000,
                        bytes_acked: acked,
                        segs_out: segs,
                        total_retrans: retrans,
                        delivery_rate: 6_250_000,
                        snd_cwnd: 100,
                        ..TcpInfoSample::default()
                    }),
                })
                .collect(),
            ..crate::mode::tests::progress_with(&[])
        }
    }

    #[test]
    fn rows_hold_the_acknowledged_rate_of_their_span_and_the_streams_state() {
        let origin = Instant::now();
        let mut rec = LinkRecorder::new(origin);
        let at = |ms: u64| origin + Duration::from_millis(ms);
        assert!(
            rec.observe(&progress(&[(0, 0, 0, 0), (0, 0, 0, 0)]), at(0))
                .is_none()
        );
        assert!(
            rec.observe(&progress(&[(1 << 20, 0, 10, 0), (0, 0, 10, 0)]), at(100))
                .is_none(),
            "a row spans a quarter second"
        );
        // 250 ms: 2.5 MB acknowledged over both streams = 80 Mbit/s.
        let row = rec
            .observe(
                &progress(&[(3 << 20, 1_250_000, 900, 3), (1 << 20, 1_250_000, 100, 0)]),
                at(250),
            )
            .expect("a row");
        assert!((row.acked_mbit - 80.0).abs() < 1e-9, "{row:?}");
        assert!((row.delivery_mbit - 100.0).abs() < 1e-9);
        assert_eq!((row.rtt_ms, row.min_rtt_ms, row.streams), (40.0, 39.0, 2));
        assert_eq!((row.segments, row.retrans, row.cwnd), (1000, 3, 200));
        assert!((row.t - 0.25).abs() < 1e-9);
        let streams = rec.streams_csv();
        let lines: Vec<&str> = streams.lines().collect();
        assert_eq!(lines[0], StreamRecord::CSV_HEADER);
        assert_eq!(lines.len(), 3, "one line per stream per row: {streams}");
        assert!(
            lines[1].starts_with("0.250,0,40.000,50.000,40.000,2.000,3,900,100,"),
            "{streams}"
        );
        let csv = rec.to_csv();
        assert!(csv.starts_with(LinkRecord::CSV_HEADER));
        assert_eq!(csv.lines().count(), 2);
        assert_eq!(
            csv.lines().nth(1).unwrap().split(',').count(),
            LinkRecord::CSV_HEADER.split(',').count()
        );
        // A replaced stream counts from zero again: the row says 0, never wraps.
        let mut passing = LinkRecorder::passing(origin);
        passing.observe(&progress(&[(0, 0, 0, 0)]), at(0));
        assert!(
            passing
                .observe(&progress(&[(1, 1_000_000, 1, 0)]), at(300))
                .is_some()
        );
        assert!(passing.rows().is_empty(), "handed out, not kept");
        let row = rec
            .observe(
                &progress(&[(0, 0, 0, 0), (1 << 20, 1_250_000, 100, 0)]),
                at(500),
            )
            .expect("a row");
        assert_eq!(row.acked_mbit, 0.0);
    }
}
