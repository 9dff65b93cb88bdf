//! A running migration on the operator's screen: a progress bar on a terminal
//! (indicatif), one plain line per report otherwise, so that captured output (a CI log,
//! a pipe) reads as lines rather than carriage returns.

use dwcp_dataplane::engine::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// What the bar or the line says besides the round's own progress.
fn summary(p: &Progress) -> String {
    let sent = p.stream_bytes().max(p.bytes_sent) as f64;
    let seconds = p.elapsed.as_secs_f64();
    let rate = if seconds > 0.0 && sent > 0.0 {
        format!("{:.1} MB/s", sent / seconds / 1e6)
    } else {
        "-".into()
    };
    let estimate = p
        .estimated_downtime
        .map(|d| format!(" | downtime est. {:.1} ms", d.as_secs_f64() * 1e3))
        .unwrap_or_default();
    format!(
        "sent {:.1} MB at {rate} | dirty {:.1} MB/s | throttle {}%{estimate}",
        sent / 1e6,
        p.dirty_rate / 1e6,
        p.throttle,
    )
}

/// One line for a progress report.
pub fn progress_line(p: &Progress) -> String {
    let round_done = if p.round_pages > 0 {
        100.0 * p.round_pages_sent.min(p.round_pages) as f64 / p.round_pages as f64
    } else {
        100.0
    };
    format!(
        "round {:>2} {:<10} {:>5.1}% of {:>7} pages | {} | {:>5.1} s",
        p.round,
        p.phase,
        round_done,
        p.round_pages,
        summary(p),
        p.elapsed.as_secs_f64()
    )
}

/// Shows progress reports on stderr at most every `every`: a bar on a terminal, lines
/// otherwise, nothing when quiet.
pub struct ProgressDisplay {
    bar: Option<ProgressBar>,
    lines: bool,
    every: Duration,
    last: Option<Instant>,
    round: Option<u64>,
}

impl ProgressDisplay {
    /// A display for one migration.
    pub fn new(quiet: bool, every: Duration) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "round {prefix:>2} [{bar:30}] {pos:>7}/{len:7} pages  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        ProgressDisplay {
            bar,
            lines: !quiet && !terminal,
            every,
            last: None,
            round: None,
        }
    }

    /// Show `p` (a report that comes sooner than `every` after the last shown one is
    /// skipped, except the first of a new round).
    pub fn show(&mut self, p: &Progress) {
        let new_round = self.round != Some(p.round);
        if !new_round && self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last = Some(Instant::now());
        self.round = Some(p.round);
        if let Some(bar) = &self.bar {
            if new_round {
                bar.set_length(p.round_pages);
            }
            bar.set_prefix(p.round.to_string());
            bar.set_position(p.round_pages_sent.min(p.round_pages));
            bar.set_message(format!("{} | {}", p.phase, summary(p)));
        } else if self.lines {
            eprintln!("{}", progress_line(p));
        }
    }

    /// The migration is over: clear the bar (the report follows).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_dataplane::transport::TransportKind;

    #[test]
    fn a_line_shows_the_round_sent_and_no_made_up_rate_before_any_measurement() {
        let p = Progress {
            round: 0,
            phase: "precopy",
            bytes_sent: 0,
            pages_sent: 0,
            memory_pages: 256,
            rounds_done: 0,
            round_pages: 256,
            round_pages_queued: 64,
            round_pages_sent: 32,
            dirty_rate: 0.0,
            bandwidth: 0.0,
            throttle: 0,
            elapsed: Duration::ZERO,
            streams: Vec::new(),
            workers: Vec::new(),
            connected_streams: 1,
            active_streams: 1,
            epoch: 0,
            transport: TransportKind::Plain,
            ping_rtt: None,
            estimated_downtime: None,
        };
        let line = progress_line(&p);
        // The round's part sent, not the part queued to the workers.
        assert!(line.contains("12.5% of"), "{line}");
        assert!(line.contains("sent 0.0 MB at - |"), "{line}");
        assert!(!line.contains('\r'));
    }
}
