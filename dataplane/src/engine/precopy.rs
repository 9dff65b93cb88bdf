//! The pre-copy planner: after each round, continue (perhaps throttling the guest),
//! switch over, or give up — and what the switchover would cost.
//!
//! Sans-IO: a plain function of the measurements the engine feeds it (a round's pages,
//! bytes and seconds, the pages dirtied meanwhile, what collecting them cost, how long
//! the destination took to acknowledge rounds) and of the elapsed time it is told. No
//! sockets, clocks or threads, so every policy below is tested on synthetic round
//! sequences.
//!
//! # The downtime estimate
//! Everything that happens while the guest is paused, each part from its own
//! measurement:
//! - **collect**: the final dirty-log collection, which has almost nothing to report
//!   (it follows the decision's own collection at once): the quickest walk the dirty
//!   log timed the way the paused one runs ([`Planner::paused_walk_timed`]: a walk that
//!   protects nothing again, with the guest's writes not contending, took 0.07-0.14 ms
//!   for 1 GiB in the downtime bench, where the live collections' line put it at
//!   0.14-0.84 ms), no more than the quickest live collection; where the dirty log
//!   times no such walk, the fixed part of a collection's cost, from a line through
//!   recent collections' pages and times;
//! - **send**: the final round handed to the kernel, `overhead + bytes / rate`, with the
//!   rate fitted to the recent rounds' bytes and send times (round 0 left out: it ran
//!   at its own pace, through zero pages and a destination still faulting its memory
//!   in), the per-round overhead the least any of them showed beyond its bytes at that
//!   rate, and the bytes from the last round's bytes per page with content (the pages
//!   a guest dirties are seldom zero, even where memory is). See `fit_send_model`
//!   for when the fit is a line and when the rounds taken together. When the control
//!   thread forecasts the path's rate ([`Planner::set_path_rate`]), the send is never
//!   less than the final round's bytes at that rate: late rounds are small enough to
//!   sit in the socket buffers, so their send times say how fast the kernel takes
//!   bytes, not how fast a long, slow path delivers them;
//! - **confirm**: from the last byte in the kernel to the destination's verdict, a
//!   round trip: the quickest acknowledgement of a round or ping on the control stream
//!   seen in the session. For a guest the destination resumes itself (a QEMU VM, whose
//!   device state travels with the final round) only the way there, half of it: the
//!   downtime ends when the destination runs the guest, and its word of that comes
//!   back after ([`Planner::set_resumes_at_destination`]);
//! - **verify**: checking all of memory, only when the configuration asks for it
//!   (`verify = "full"`); zero otherwise, since the table digest costs nothing there.
//!
//! The parts that do not scale with the dirty set (collect, confirm, the per-round
//! overhead) take the quickest figures seen: they are what the machine and the path can
//! do, and a sample the scheduler delayed says little about the switchover, which runs
//! with the guest paused and nothing else of the migration in flight.
//!
//! The engine asks once more as the guest pauses ([`Planner::estimate_at_pause`]),
//! after the last pre-copy round is acknowledged: the pages are those dirty at the
//! decision plus what the guest wrote, at its recent rate, while that round settled,
//! and the confirm part is the round trip just measured with nothing in flight when
//! that is far above the quickest (the path is slower now: cross traffic, losses).
//! That second estimate is the one reported against the measured downtime. When it is
//! over the limit the engine does not pause: it sends another round and asks again (at
//! most three times, then the switchover goes ahead), and the report says so.
//!
//! The planner never switches over right after round 0, even when the estimate fits:
//! that round moves all of memory (zero pages, cold caches, a destination still
//! faulting its memory in) and says little about a round of the guest's dirty pages,
//! which is what the final round is. One more round measures one; it costs a few
//! milliseconds of migration time and none of downtime.
//!
//! Nor does it switch over the moment the estimate fits while rounds still halve the
//! dirty set and its pages are a fair share (a tenth or more) of the estimate: one more
//! round takes them out of the paused window for a few milliseconds of migration time,
//! so the downtime is what the guest's steady writing leaves, not what a long previous
//! round (a large guest's round 1, say) happened to leave.
//!
//! # Convergence
//! Auto-converge follows QEMU's (`cpu-throttle-initial` 20, `cpu-throttle-increment`
//! 10, at most 99%): two rounds in a row that shrink the dirty set by less than 10% step
//! the throttle up — unless the fixed parts alone exceed the limit, which no throttle
//! can change (the abort then says so). A round cut short (for a live change of streams
//! or transport) says nothing about convergence and is left out of the send-rate fit.

use std::collections::VecDeque;
use std::time::Duration;

/// Rounds the send-rate fit looks back over: few, so that a change of the link shows
/// within a round or two.
const FIT_WINDOW: usize = 4;
/// Dirty-log collections the collect estimate looks back over.
const COLLECT_WINDOW: usize = 4;
/// The bytes per page of a final round never go below this share of a raw page (a round
/// of zero pages costs little, the next may not).
const MIN_PAGE_SHARE: f64 = 0.1;

/// How far a round trip must exceed twice the quickest to say the path is slower,
/// not the machine busier ([`Planner::estimate_at_pause`]).
const SLOWER_PATH_MARGIN: f64 = 0.005;

/// The guest's recent dirty rate, from the dirty log's collections: the pages each
/// reported over the time since the one before, summed back from the newest over at
/// least [`DirtyRate::WINDOW_SECONDS`]. One collection alone can span a millisecond
/// (a small round handed to the kernel at once on a long path) and report no page of
/// a guest writing a thousand a second.
#[derive(Debug, Clone, Default)]
pub struct DirtyRate {
    samples: VecDeque<(f64, f64)>,
}

impl DirtyRate {
    /// How far back the rate looks, seconds.
    pub const WINDOW_SECONDS: f64 = 1.0;
    /// Collections kept at most.
    const MAX_SAMPLES: usize = 64;

    /// A collection reported `pages` written over the `seconds` since the last one.
    pub fn push(&mut self, pages: u64, seconds: f64) {
        if seconds.is_finite() && seconds > 0.0 {
            push_bounded(
                &mut self.samples,
                (pages as f64, seconds),
                Self::MAX_SAMPLES,
            );
        }
    }

    /// Pages per second over the newest collections covering the window (all there
    /// are if they cover less); 0 before any.
    pub fn pages_per_second(&self) -> f64 {
        let (mut pages, mut seconds) = (0.0, 0.0);
        for &(p, s) in self.samples.iter().rev() {
            pages += p;
            seconds += s;
            if seconds >= Self::WINDOW_SECONDS {
                break;
            }
        }
        if seconds > 0.0 { pages / seconds } else { 0.0 }
    }
}

/// What the planner works towards.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    /// Switch over when the estimated downtime is at most this.
    pub downtime_limit: Duration,
    /// Give up after this many rounds without converging.
    pub max_rounds: u32,
    /// Give up after this long without converging.
    pub max_duration: Duration,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: bool,
    /// Bytes a raw page takes on the wire (its frame share included).
    pub raw_page_bytes: f64,
    /// Seconds to check all of memory at the switchover (`verify = "full"`), else 0.
    pub verify_seconds: f64,
}

/// One round, as the engine measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundMeasurement {
    /// The round (0 sends all of memory).
    pub round: u64,
    /// Pages sent.
    pub pages: u64,
    /// Of which zero pages (sent as a count, nearly free).
    pub zero_pages: u64,
    /// Bytes of frames sent.
    pub bytes: u64,
    /// From the first page queued to the last byte in the kernel, seconds.
    pub send_seconds: f64,
    /// Pages due in the next round (dirtied meanwhile, plus any left unsent).
    pub dirtied_pages: u64,
    /// What collecting the dirty pages cost, seconds.
    pub collect_seconds: f64,
    /// The round was cut short for a live change.
    pub ended_early: bool,
    /// Time since round 0 began, seconds.
    pub elapsed: f64,
}

/// What a switchover would cost now, part by part, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct DowntimeEstimate {
    /// Pages the final round would carry.
    pub pages: u64,
    /// The final dirty-log collection.
    pub collect: f64,
    /// Handing the final round to the kernel, or, when slower, carrying it at the
    /// forecast path rate.
    pub send: f64,
    /// The forecast path rate the send was priced at too, bytes per second (0: none).
    pub path_rate: f64,
    /// The destination receiving the rest, checking the table digest and answering.
    pub confirm: f64,
    /// Checking all of memory (full verification only).
    pub verify: f64,
    /// The sum.
    pub total: f64,
}

/// The planner's decision after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send another round; `throttle` is the new guest throttle when it changes.
    Continue {
        /// The throttle to apply, percent, if it changed.
        throttle: Option<u32>,
    },
    /// Pause the guest and send the final round.
    SwitchOver,
    /// Give up; the source stays intact.
    Abort {
        /// Why, for the operator.
        reason: String,
    },
}

/// A decision with its estimate and the reason, for reports and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// What to do.
    pub decision: Decision,
    /// What switching over after this round would cost.
    pub estimate: DowntimeEstimate,
    /// One line on why.
    pub why: String,
}

/// The pre-copy policy's state across rounds.
#[derive(Debug, Clone)]
pub struct Planner {
    config: PlannerConfig,
    /// Recent full rounds after round 0: (bytes, send seconds).
    sends: VecDeque<(f64, f64)>,
    /// The quickest acknowledgement of a round, seconds.
    quickest_ack: Option<f64>,
    rtt: Option<f64>,
    bytes_per_page: f64,
    /// Recent collections: (pages reported, seconds).
    collects: VecDeque<(f64, f64)>,
    /// Each collection reads all of memory (CRC rescans): its cost does not shrink
    /// with the dirty set.
    collect_reads_memory: bool,
    /// The quickest walk timed as the paused collection runs, seconds, and how many.
    paused_walk: Option<f64>,
    paused_walks: u32,
    /// The destination resumes the guest itself: the downtime holds the way there of
    /// the confirmation, not the way back.
    resumes_at_destination: bool,
    /// The guest's vCPUs cannot be slowed: auto-converge is off, and says why.
    unthrottleable: bool,
    /// The control thread's forecast of the path's rate, bytes per second.
    path_rate: Option<f64>,
    previous_dirty: u64,
    stuck: u32,
    throttle: u32,
}

impl Planner {
    /// A planner for one migration.
    pub fn new(config: PlannerConfig) -> Self {
        Planner {
            bytes_per_page: config.raw_page_bytes,
            config,
            sends: VecDeque::new(),
            quickest_ack: None,
            rtt: None,
            collects: VecDeque::new(),
            collect_reads_memory: false,
            paused_walk: None,
            paused_walks: 0,
            resumes_at_destination: false,
            unthrottleable: false,
            path_rate: None,
            previous_dirty: u64::MAX,
            stuck: 0,
            throttle: 0,
        }
    }

    /// The downtime limit changed (a live setting).
    pub fn set_downtime_limit(&mut self, limit: Duration) {
        self.config.downtime_limit = limit;
    }

    /// The dirty log reads all of memory at each collection (CRC rescans): the final
    /// collection costs what the quickest recent one did, not a line's intercept.
    pub fn set_collect_reads_memory(&mut self, reads_memory: bool) {
        self.collect_reads_memory = reads_memory;
    }

    /// The dirty log walked its memory as the paused collection will, in `seconds`
    /// (with the guest running).
    pub fn paused_walk_timed(&mut self, seconds: f64) {
        if keep_quickest(&mut self.paused_walk, seconds) {
            self.paused_walks += 1;
        }
    }

    /// How many walks [`Planner::paused_walk_timed`] was given.
    pub fn paused_walks(&self) -> u32 {
        self.paused_walks
    }

    /// The destination resumes the guest as soon as it holds the final round and has
    /// checked the digest (a QEMU VM: its device state comes with the final round), so
    /// the downtime ends half a round trip before the source hears of it.
    pub fn set_resumes_at_destination(&mut self, resumes: bool) {
        self.resumes_at_destination = resumes;
    }

    /// The guest's vCPUs cannot be slowed (a QEMU VM: QEMU throttles them only inside
    /// its own migrations). Auto-converge is off, so no throttle is reported that the
    /// guest never felt, and a migration that does not converge says why.
    pub fn set_guest_unthrottleable(&mut self) {
        self.config.auto_converge = false;
        self.unthrottleable = true;
    }

    /// The control thread's forecast of what the path will carry over the next second,
    /// bytes per second (`None`: no forecast, the send is priced by the rounds alone).
    pub fn set_path_rate(&mut self, bytes_per_second: Option<f64>) {
        self.path_rate = bytes_per_second.filter(|r| r.is_finite() && *r > 0.0);
    }

    /// The limit in force.
    pub fn downtime_limit(&self) -> Duration {
        self.config.downtime_limit
    }

    /// The throttle in force, percent.
    pub fn throttle(&self) -> u32 {
        self.throttle
    }

    /// The destination acknowledged a round `lag` seconds after its last byte was in
    /// the kernel.
    pub fn round_acknowledged(&mut self, lag: f64) {
        keep_quickest(&mut self.quickest_ack, lag);
    }

    /// A round trip of the control stream took `rtt` seconds.
    pub fn round_trip(&mut self, rtt: f64) {
        // The quickest seen: a ping delayed by a busy machine says little about the
        // path.
        keep_quickest(&mut self.rtt, rtt);
    }

    /// Bytes per second and per-round overhead of sending, fitted to recent rounds.
    pub fn send_model(&self) -> (f64, f64) {
        fit_send_model(&self.sends)
    }

    /// What switching over with `pages` dirty pages would cost now.
    pub fn estimate(&self, pages: u64) -> DowntimeEstimate {
        let (rate, overhead) = self.send_model();
        let bytes = pages as f64 * self.bytes_per_page;
        let send = if pages == 0 {
            0.0
        } else {
            let by_path = self.path_rate.map_or(0.0, |path| bytes / path);
            (overhead + bytes / rate).max(by_path)
        };
        // A round trip: the quickest acknowledgement of a round or ping seen. (An
        // acknowledgement of a large round also holds the time its bytes took to drain
        // from the socket buffers; for the final round that time is in `send`, whose rate
        // large rounds measured at the pace of the link.)
        let confirm = self.inside_downtime(self.confirm_round_trip());
        let collect = if self.collect_reads_memory {
            let quickest = quickest_collect(&self.collects);
            if quickest.is_finite() { quickest } else { 0.0 }
        } else {
            match self.paused_walk {
                // What the paused walk costs, measured; no more than a live collection,
                // which walks the same and protects again besides. (Not capped by the
                // line's intercept: that extrapolates, and came out at 0 in a third of
                // the 4 GiB runs, whose walk takes 0.1-0.4 ms.)
                Some(walk) => walk.min(quickest_collect(&self.collects)),
                None => collect_base(&self.collects),
            }
        };
        let verify = self.config.verify_seconds;
        DowntimeEstimate {
            pages,
            collect,
            send,
            path_rate: self.path_rate.unwrap_or(0.0),
            confirm,
            verify,
            total: collect + send + confirm + verify,
        }
    }

    /// What the switchover costs as the guest pauses, with `pages` dirty and a round
    /// trip of `quiet_rtt` seconds measured just before with nothing in flight.
    ///
    /// The confirm part is the quickest round trip seen, as in [`Planner::estimate`],
    /// unless the quiet one is over twice that plus 5 ms: more than the scheduler's
    /// delays on a busy machine (1-5 ms here), so the path itself is slower now
    /// (queues behind cross traffic, losses), and the switchover will see it.
    pub fn estimate_at_pause(&self, pages: u64, quiet_rtt: f64) -> DowntimeEstimate {
        let mut e = self.estimate(pages);
        if quiet_rtt.is_finite() && quiet_rtt > 2.0 * self.confirm_round_trip() + SLOWER_PATH_MARGIN
        {
            let confirm = self.inside_downtime(quiet_rtt);
            e.total += confirm - e.confirm;
            e.confirm = confirm;
        }
        e
    }

    /// The confirmation's round trip: the quickest acknowledgement of a round or ping
    /// seen.
    fn confirm_round_trip(&self) -> f64 {
        match (self.quickest_ack, self.rtt) {
            (Some(ack), Some(rtt)) => ack.min(rtt),
            (ack, rtt) => ack.or(rtt).unwrap_or(0.0),
        }
    }

    /// The part of a confirmation taking `round_trip` that the guest spends paused.
    fn inside_downtime(&self, round_trip: f64) -> f64 {
        if self.resumes_at_destination {
            round_trip / 2.0
        } else {
            round_trip
        }
    }

    /// Round `m` is done: decide.
    pub fn round_done(&mut self, m: RoundMeasurement) -> Plan {
        if m.round > 0 && !m.ended_early && m.bytes > 0 && m.send_seconds > 0.0 {
            push_bounded(
                &mut self.sends,
                (m.bytes as f64, m.send_seconds),
                FIT_WINDOW,
            );
        }
        // Per page with content: the pages a guest dirties are seldom zero, even when
        // much of memory (and so of round 0) is.
        let content = m.pages.saturating_sub(m.zero_pages);
        if content > 0 {
            self.bytes_per_page =
                (m.bytes as f64 / content as f64).max(self.config.raw_page_bytes * MIN_PAGE_SHARE);
        }
        if m.collect_seconds.is_finite() && m.collect_seconds >= 0.0 {
            push_bounded(
                &mut self.collects,
                (m.dirtied_pages as f64, m.collect_seconds),
                COLLECT_WINDOW,
            );
        }
        let estimate = self.estimate(m.dirtied_pages);
        let limit = self.config.downtime_limit.as_secs_f64();
        let ms = |s: f64| s * 1e3;
        let fits = estimate.total <= limit;
        if fits && m.round == 0 {
            return Plan {
                decision: Decision::Continue { throttle: None },
                why: format!(
                    "{} pages left: estimated downtime {:.1} ms within the {:.0} ms limit, but round 0 (all of memory, its zero pages, a destination still faulting its memory in) says little about the rounds after it: one more round first",
                    m.dirtied_pages,
                    ms(estimate.total),
                    ms(limit)
                ),
                estimate,
            };
        }
        // Fitting is enough, but while a round still halves the dirty set and its pages
        // are a fair share of the downtime, one more round takes them out of it at the
        // cost of a few milliseconds of migration time.
        let halving = m.dirtied_pages.saturating_mul(2) <= m.pages && !m.ended_early;
        let pages_part = (estimate.send - self.send_model().1).max(0.0);
        let pages_matter = pages_part >= 0.1 * estimate.total;
        if fits && halving && pages_matter && m.round + 2 < u64::from(self.config.max_rounds) {
            return Plan {
                decision: Decision::Continue { throttle: None },
                why: format!(
                    "{} pages left: estimated downtime {:.1} ms within the {:.0} ms limit, and the last round halved the dirty set ({} pages before): one more round for less downtime",
                    m.dirtied_pages,
                    ms(estimate.total),
                    ms(limit),
                    m.pages
                ),
                estimate,
            };
        }
        if fits {
            return Plan {
                decision: Decision::SwitchOver,
                why: format!(
                    "{} pages left: estimated downtime {:.1} ms within the {:.0} ms limit",
                    m.dirtied_pages,
                    ms(estimate.total),
                    ms(limit)
                ),
                estimate,
            };
        }
        // What a switchover costs with nothing to send: no throttle changes that.
        let fixed = self.estimate(0).total + self.send_model().1;
        let fixed_too_slow = fixed > limit;
        if m.round + 1 >= u64::from(self.config.max_rounds)
            || m.elapsed >= self.config.max_duration.as_secs_f64()
        {
            let throttle = if self.unthrottleable {
                " (this guest's vCPUs cannot be throttled)".to_string()
            } else if self.config.auto_converge {
                format!(" (throttle at {}%)", self.throttle)
            } else {
                " (auto-converge off)".to_string()
            };
            let reason = if fixed_too_slow {
                format!(
                    "not converging: a switchover costs {:.1} ms before any page (collect {:.1}, confirm {:.1}, per-round overhead {:.1}{}), over the {:.0} ms limit whatever the guest does{throttle}",
                    ms(fixed),
                    ms(estimate.collect),
                    ms(estimate.confirm),
                    ms(self.send_model().1),
                    if estimate.verify > 0.0 {
                        format!(", checking all memory {:.1}", ms(estimate.verify))
                    } else {
                        String::new()
                    },
                    ms(limit)
                )
            } else {
                format!(
                    "not converging: {} pages dirtied in the last round, estimated downtime {:.0} ms over the {:.0} ms limit{throttle}",
                    m.dirtied_pages,
                    ms(estimate.total),
                    ms(limit),
                )
            };
            return Plan {
                decision: Decision::Abort {
                    reason: reason.clone(),
                },
                why: reason,
                estimate,
            };
        }
        // Auto-converge: two rounds in a row that shrink by less than 10% step the
        // throttle up.
        if m.ended_early || fixed_too_slow {
            // Not a measure of convergence: the round was cut short, or the guest's
            // writes are not what keeps the estimate over the limit.
        } else if m.dirtied_pages.saturating_mul(10) >= self.previous_dirty.saturating_mul(9) {
            self.stuck += 1;
        } else {
            self.stuck = 0;
        }
        self.previous_dirty = m.dirtied_pages;
        let mut throttle = None;
        if self.config.auto_converge && self.stuck >= 2 {
            self.throttle = if self.throttle == 0 {
                20
            } else {
                (self.throttle + 10).min(99)
            };
            throttle = Some(self.throttle);
            self.stuck = 0;
        }
        Plan {
            decision: Decision::Continue { throttle },
            why: format!(
                "{} pages left: estimated downtime {:.1} ms over the {:.0} ms limit{}",
                m.dirtied_pages,
                ms(estimate.total),
                ms(limit),
                match throttle {
                    Some(t) => format!("; throttle to {t}%"),
                    None => String::new(),
                }
            ),
            estimate,
        }
    }
}

/// Keep in `quickest` the least of the durations seen, `seconds` among them when it is
/// one (finite, not negative); returns whether it was.
fn keep_quickest(quickest: &mut Option<f64>, seconds: f64) -> bool {
    if !(seconds.is_finite() && seconds >= 0.0) {
        return false;
    }
    *quickest = Some(quickest.map_or(seconds, |q| q.min(seconds)));
    true
}

/// The quickest collection among `samples` (pages, seconds); infinite with none.
fn quickest_collect(samples: &VecDeque<(f64, f64)>) -> f64 {
    samples.iter().map(|s| s.1).fold(f64::INFINITY, f64::min)
}

/// What a collection costs with (almost) nothing to report, as the final one is: the
/// least-squares intercept of `seconds = base + pages × per_page` over recent
/// collections, kept between zero and the quickest; with no such line (one sample, one
/// size), the quickest collection.
fn collect_base(samples: &VecDeque<(f64, f64)>) -> f64 {
    let quickest = quickest_collect(samples);
    if samples.is_empty() {
        return 0.0;
    }
    match Line::fit(samples) {
        Some(line) if line.slope > 0.0 => line.intercept.clamp(0.0, quickest),
        _ => quickest,
    }
}

/// The least-squares line `y = intercept + slope × x` through samples `(x, y)`.
struct Line {
    slope: f64,
    intercept: f64,
    /// How much of the spread of `y` the line explains (r², 0..=1).
    r2: f64,
}

impl Line {
    /// `None` with fewer than two samples or samples of (nearly) one `x`.
    fn fit(samples: &VecDeque<(f64, f64)>) -> Option<Line> {
        if samples.len() < 2 {
            return None;
        }
        let n = samples.len() as f64;
        let mean_x = samples.iter().map(|s| s.0).sum::<f64>() / n;
        let mean_y = samples.iter().map(|s| s.1).sum::<f64>() / n;
        let sxx: f64 = samples.iter().map(|s| (s.0 - mean_x).powi(2)).sum();
        let syy: f64 = samples.iter().map(|s| (s.1 - mean_y).powi(2)).sum();
        let sxy: f64 = samples
            .iter()
            .map(|s| (s.0 - mean_x) * (s.1 - mean_y))
            .sum();
        if sxx <= (mean_x * 1e-3).powi(2) * n {
            return None;
        }
        let slope = sxy / sxx;
        Some(Line {
            slope,
            intercept: mean_y - slope * mean_x,
            r2: sxy * sxy / (sxx * syy).max(f64::MIN_POSITIVE),
        })
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, x: T, bound: usize) {
    if q.len() == bound {
        q.pop_front();
    }
    q.push_back(x);
}

/// `(rate, overhead)` of `seconds = overhead + bytes / rate` over recent rounds'
/// `(bytes, seconds)`.
///
/// With three rounds or more that a line fits well (r² ≥ 0.9), the least-squares line:
/// its rate, and as overhead the least any round showed beyond its bytes at that rate
/// (the lower envelope, not the intercept: one small round the scheduler held back
/// raises the intercept by its delay, and the final round runs with the guest paused
/// and nothing else of the migration in flight). Two rounds always fit a line, and a
/// held-back one then puts its delay in the overhead; rounds whose rate wandered fit
/// none. Then the rate is the rounds' taken together (all bytes over all seconds, which
/// the largest round dominates), with the least overhead any round shows at that rate.
/// With no samples, 1 GB/s.
fn fit_send_model(samples: &VecDeque<(f64, f64)>) -> (f64, f64) {
    if samples.is_empty() {
        return (1e9, 0.0);
    }
    let least_overhead = |per_byte: f64| {
        samples
            .iter()
            .map(|&(bytes, seconds)| seconds - bytes * per_byte)
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    };
    let line = Line::fit(samples).filter(|l| samples.len() >= 3 && l.slope > 0.0 && l.r2 >= 0.9);
    if let Some(line) = line {
        return (1.0 / line.slope, least_overhead(line.slope));
    }
    let bytes: f64 = samples.iter().map(|s| s.0).sum();
    let seconds: f64 = samples.iter().map(|s| s.1).sum();
    let per_byte = seconds / bytes.max(1.0);
    (1.0 / per_byte.max(1e-15), least_overhead(per_byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: f64 = 4100.0;

    fn config(limit_ms: u64) -> PlannerConfig {
        PlannerConfig {
            downtime_limit: Duration::from_millis(limit_ms),
            max_rounds: 30,
            max_duration: Duration::from_secs(600),
            auto_converge: true,
            raw_page_bytes: PAGE,
            verify_seconds: 0.0,
        }
    }

    /// A link of `rate` bytes per second with `overhead` seconds per round, and a guest
    /// dirtying `dirty_rate` pages per second: the measurement of round `round` that
    /// sends `pages` pages.
    fn round(
        round: u64,
        pages: u64,
        rate: f64,
        overhead: f64,
        dirty_rate: f64,
    ) -> RoundMeasurement {
        let bytes = pages as f64 * PAGE;
        let seconds = overhead + bytes / rate;
        RoundMeasurement {
            round,
            pages,
            zero_pages: 0,
            bytes: bytes as u64,
            send_seconds: seconds,
            dirtied_pages: (dirty_rate * seconds) as u64,
            collect_seconds: 0.001,
            ended_early: false,
            elapsed: 0.0,
        }
    }

    /// Run rounds until the planner stops continuing; returns its plans.
    fn simulate(
        planner: &mut Planner,
        memory_pages: u64,
        mut link: impl FnMut(u64) -> (f64, f64),
        mut dirty_rate: impl FnMut(u64, u32) -> f64,
    ) -> Vec<Plan> {
        let mut plans = Vec::new();
        let mut pages = memory_pages;
        let mut elapsed = 0.0;
        for r in 0..100 {
            let (rate, overhead) = link(r);
            let mut m = round(r, pages, rate, overhead, dirty_rate(r, planner.throttle()));
            // A guest cannot dirty more than its memory.
            m.dirtied_pages = m.dirtied_pages.min(memory_pages);
            elapsed += m.send_seconds;
            m.elapsed = elapsed;
            planner.round_acknowledged(overhead);
            let plan = planner.round_done(m);
            pages = m.dirtied_pages;
            let stop = !matches!(plan.decision, Decision::Continue { .. });
            plans.push(plan);
            if stop {
                break;
            }
        }
        plans
    }

    #[test]
    fn a_converging_guest_switches_over_when_the_estimate_fits() {
        let mut p = Planner::new(config(20));
        // 1 GiB at 2.5 GB/s, 2 ms per round; 60 000 pages/s dirtied (~250 MB/s).
        let plans = simulate(&mut p, 262_144, |_| (2.5e9, 0.002), |_, _| 60_000.0);
        let last = plans.last().unwrap();
        assert_eq!(last.decision, Decision::SwitchOver, "{plans:#?}");
        assert!(last.estimate.total <= 0.020);
        // Round 0, then rounds that shrink the dirty set geometrically until it stops
        // halving (about 150 pages: what 60 000 pages/s leave in a 2 ms round).
        assert!((3..=6).contains(&plans.len()), "{} rounds", plans.len());
        assert!(last.estimate.pages < 200, "{:?}", last.estimate);
        // The fit separates the per-round overhead from the rate.
        let (rate, overhead) = p.send_model();
        assert!((rate / 2.5e9 - 1.0).abs() < 0.01, "rate {rate}");
        assert!((overhead - 0.002).abs() < 1e-4, "overhead {overhead}");
        // The estimate has every part: collect + send + confirm.
        let e = last.estimate;
        assert!((e.total - (e.collect + e.send + e.confirm + e.verify)).abs() < 1e-12);
        assert!(e.confirm >= 0.002 && e.collect == 0.001);
    }

    /// The last plan gives up, for a reason that says each of `words`.
    fn assert_gave_up(plans: &[Plan], words: &[&str]) {
        match &plans.last().expect("a plan").decision {
            Decision::Abort { reason } => {
                for word in words {
                    assert!(reason.contains(word), "{reason}");
                }
            }
            other => panic!("expected an abort, got {other:?}"),
        }
    }

    #[test]
    fn a_guest_writing_faster_than_the_link_is_throttled_then_given_up_on() {
        let mut p = Planner::new(PlannerConfig {
            max_rounds: 12,
            ..config(50)
        });
        // Dirtying 100 000 pages/s over a 100 MB/s link; the throttle only scales it.
        let plans = simulate(
            &mut p,
            262_144,
            |_| (1e8, 0.002),
            |_, throttle| 100_000.0 * (100.0 - f64::from(throttle)) / 100.0 + 30_000.0,
        );
        let throttles: Vec<u32> = plans
            .iter()
            .filter_map(|p| match p.decision {
                Decision::Continue { throttle } => throttle,
                _ => None,
            })
            .collect();
        assert_eq!(throttles[..3], [20, 30, 40], "{plans:#?}");
        assert_gave_up(&plans, &["not converging", "throttle at"]);
        assert_eq!(plans.len(), 12);
    }

    #[test]
    fn a_guest_that_cannot_be_throttled_is_given_up_on_without_a_throttle() {
        let mut p = Planner::new(PlannerConfig {
            max_rounds: 12,
            ..config(50)
        });
        p.set_guest_unthrottleable();
        let plans = simulate(
            &mut p,
            262_144,
            |_| (1e8, 0.002),
            |_, throttle| 100_000.0 * (100.0 - f64::from(throttle)) / 100.0 + 30_000.0,
        );
        assert!(
            plans
                .iter()
                .all(|p| !matches!(p.decision, Decision::Continue { throttle: Some(_) })),
            "{plans:#?}"
        );
        assert_eq!(p.throttle(), 0);
        assert_gave_up(&plans, &["not converging", "cannot be throttled"]);
        assert_eq!(plans.len(), 12);
    }

    #[test]
    fn a_small_round_the_scheduler_held_back_does_not_raise_the_overhead() {
        let mut p = Planner::new(config(20));
        // 2.5 GB/s with 0.2 ms per round; round 4 (150 pages) took 4 ms instead of
        // 0.45: the line through rounds 1-4 (round 0 is not fitted) puts about 1 ms in
        // its intercept.
        for (r, pages, extra) in [
            (0, 100_000, 0.0),
            (1, 20_000, 0.0),
            (2, 4_000, 0.0),
            (3, 800, 0.0),
            (4, 150, 0.0036),
        ] {
            let mut m = round(r, pages, 2.5e9, 0.0002, 0.0);
            m.send_seconds += extra;
            m.dirtied_pages = 50;
            p.round_done(m);
        }
        let (rate, overhead) = p.send_model();
        // The held-back round tilts the line a little.
        assert!((rate - 2.5e9).abs() / 2.5e9 < 0.1, "{rate}");
        // What the quickest round showed (the rate's error aside), not the intercept.
        assert!(overhead < 0.0004, "{overhead}");
        let e = p.estimate(50);
        assert!(e.send < 0.0005, "{e:?}");
    }

    #[test]
    fn two_rounds_put_no_delay_of_one_of_them_in_the_overhead() {
        let mut p = Planner::new(config(20));
        // Round 2 (168 pages) was held back 3.5 ms. Two rounds always fit a line, whose
        // intercept would be that delay; taken together they give the rate, and the
        // overhead is what neither of them exceeds.
        for (r, pages, extra) in [(0, 262_144, 0.0), (1, 4_300, 0.0), (2, 168, 0.0035)] {
            let mut m = round(r, pages, 2.0e9, 0.0001, 0.0);
            m.send_seconds += extra;
            m.dirtied_pages = 150;
            p.round_done(m);
        }
        let (rate, overhead) = p.send_model();
        assert!(rate > 1.2e9 && rate < 2.0e9, "{rate}");
        assert_eq!(overhead, 0.0);
        let e = p.estimate(150);
        assert!(e.send < 0.0006, "{e:?}");
    }

    #[test]
    fn round_0_does_not_set_the_rate_of_the_rounds_after_it() {
        let mut p = Planner::new(config(20));
        // Round 0 ran at 1.6 GB/s (zero pages, nothing else in flight), round 1 at
        // 1.2 GB/s. A line through the two would put 3.4 ms of round 1 in a per-round
        // overhead; the final round is priced at round 1's rate.
        p.round_done(RoundMeasurement {
            round: 0,
            pages: 262_144,
            zero_pages: 88_000,
            bytes: 714_000_000,
            send_seconds: 0.446,
            dirtied_pages: 4_200,
            collect_seconds: 0.0003,
            ended_early: false,
            elapsed: 0.45,
        });
        p.round_done(RoundMeasurement {
            round: 1,
            pages: 4_200,
            zero_pages: 240,
            bytes: 16_300_000,
            send_seconds: 0.0133,
            dirtied_pages: 260,
            collect_seconds: 0.0003,
            ended_early: false,
            elapsed: 0.47,
        });
        let (rate, overhead) = p.send_model();
        assert!((rate / 1.2255e9 - 1.0).abs() < 0.01, "{rate}");
        assert_eq!(overhead, 0.0);
        let e = p.estimate(260);
        assert!(e.send < 0.0012, "{e:?}");
    }

    #[test]
    fn a_bandwidth_drop_raises_the_estimate_and_delays_the_switchover() {
        let mut steady = Planner::new(config(20));
        let steady_plans = simulate(&mut steady, 262_144, |_| (2.5e9, 0.002), |_, _| 60_000.0);
        let mut dropping = Planner::new(config(20));
        // From round 1 on the link carries a tenth of what it did.
        let dropping_plans = simulate(
            &mut dropping,
            262_144,
            |r| {
                if r == 0 {
                    (2.5e9, 0.002)
                } else {
                    (2.5e8, 0.002)
                }
            },
            |_, throttle| 60_000.0 * f64::from(100 - throttle) / 100.0,
        );
        assert_eq!(
            dropping_plans.last().unwrap().decision,
            Decision::SwitchOver
        );
        assert!(dropping_plans.len() > steady_plans.len());
        // The guest writes about as fast as the slower link carries: only throttling
        // brings it in.
        assert!(dropping.throttle() > 0);
        // After the drop the fitted rate follows the recent rounds.
        let (rate, _) = dropping.send_model();
        assert!(rate < 1e9, "rate {rate}");
    }

    #[test]
    fn a_path_forecast_prices_a_round_the_socket_buffers_would_hide() {
        // Small rounds go into the socket buffers at 2 GB/s; the path behind them
        // carries 25 MB/s (200 Mbit/s).
        let mut p = Planner::new(config(300));
        for r in 1..=3 {
            p.round_done(round(r, 500, 2e9, 0.0005, 1.0));
        }
        let blind = p.estimate(2_000);
        assert!(blind.send < 0.01 && blind.path_rate == 0.0, "{blind:?}");
        p.set_path_rate(Some(25e6));
        let priced = p.estimate(2_000);
        let at_path = 2_000.0 * PAGE / 25e6;
        assert!((priced.send - at_path).abs() < 1e-9, "{priced:?}");
        assert_eq!(priced.path_rate, 25e6);
        // It only ever adds: a fast path leaves the rounds' own figure.
        p.set_path_rate(Some(1e12));
        assert_eq!(p.estimate(2_000).send, blind.send);
        // Nothing to send costs nothing, and a forecast that is no rate is none.
        assert_eq!(p.estimate(0).send, 0.0);
        p.set_path_rate(Some(f64::NAN));
        assert_eq!(p.estimate(2_000), blind);
        // The decision follows: 2 000 pages fit 300 ms by the rounds alone, not at
        // the path's pace (328 ms).
        let m = round(4, 500, 2e9, 0.0005, 1.0);
        let m = RoundMeasurement {
            dirtied_pages: 2_000,
            ..m
        };
        let mut priced_planner = p.clone();
        priced_planner.set_path_rate(Some(25e6));
        assert!(matches!(
            p.clone().round_done(m).decision,
            Decision::SwitchOver
        ));
        assert!(matches!(
            priced_planner.round_done(m).decision,
            Decision::Continue { .. }
        ));
    }

    #[test]
    fn a_round_trip_far_above_the_quickest_at_the_pause_is_the_confirm() {
        let mut p = Planner::new(config(300));
        p.round_trip(0.040);
        p.round_trip(0.055);
        p.round_done(round(1, 500, 1e8, 0.0, 1.0));
        let usual = p.estimate(100);
        assert_eq!(usual.confirm, 0.040);
        // A busy machine's delay, or a path a little slower: the quickest stands.
        assert_eq!(p.estimate_at_pause(100, 0.084), usual);
        // Over twice the quickest and 5 ms: the path is slower now.
        let slow = p.estimate_at_pause(100, 0.600);
        assert_eq!(slow.confirm, 0.600);
        assert!(
            (slow.total - (usual.total + 0.560)).abs() < 1e-12,
            "{slow:?}"
        );
        // On loopback, 0.2 ms against 0.1 is the scheduler, not the path.
        let mut lo = Planner::new(config(20));
        lo.round_trip(0.0001);
        assert_eq!(lo.estimate_at_pause(10, 0.004), lo.estimate(10));
    }

    #[test]
    fn the_dirty_rate_looks_back_a_second_not_one_collection() {
        let mut rate = DirtyRate::default();
        assert_eq!(rate.pages_per_second(), 0.0);
        // Long rounds at 1 000 pages/s, then collections a millisecond apart that
        // caught nothing.
        for _ in 0..4 {
            rate.push(500, 0.5);
        }
        rate.push(0, 0.001);
        rate.push(1, 0.001);
        let r = rate.pages_per_second();
        assert!((r - 1_001.0 / 1.002).abs() < 1e-9, "{r}");
        // Older collections past the window no longer count.
        rate.push(4_000, 1.0);
        assert_eq!(rate.pages_per_second(), 4_000.0);
        // A zero interval is no sample.
        rate.push(7, 0.0);
        assert_eq!(rate.pages_per_second(), 4_000.0);
    }

    #[test]
    fn a_write_burst_postpones_the_switchover_without_throttling() {
        let mut p = Planner::new(config(20));
        // A burst during round 0 only: 100 000 pages/s, then 8 000.
        let plans = simulate(
            &mut p,
            262_144,
            |_| (2.5e9, 0.002),
            |r, _| if r == 0 { 100_000.0 } else { 8_000.0 },
        );
        // Round 0 with the burst, round 1 taking it, round 2 with what 8 000 pages/s
        // leave; never a throttle.
        assert_eq!(plans.len(), 3, "{plans:#?}");
        for plan in &plans[..2] {
            assert_eq!(plan.decision, Decision::Continue { throttle: None });
        }
        assert_eq!(plans[2].decision, Decision::SwitchOver);
        assert_eq!(p.throttle(), 0);
    }

    #[test]
    fn full_verification_counts_in_the_estimate_and_the_limit_can_change() {
        let mut p = Planner::new(PlannerConfig {
            verify_seconds: 0.120,
            ..config(50)
        });
        let m = round(3, 100, 2.5e9, 0.001, 1000.0);
        let plan = p.round_done(m);
        assert!(matches!(plan.decision, Decision::Continue { .. }));
        assert!(plan.estimate.verify == 0.120 && plan.estimate.total > 0.120);
        p.set_downtime_limit(Duration::from_millis(300));
        assert_eq!(p.round_done(m).decision, Decision::SwitchOver);
    }

    #[test]
    fn rounds_cut_short_neither_count_as_stuck_nor_skew_the_rate() {
        let mut p = Planner::new(PlannerConfig {
            auto_converge: true,
            ..config(1)
        });
        let full = round(0, 10_000, 1e9, 0.0, 1e6);
        p.round_done(full);
        for r in 1..6 {
            let early = RoundMeasurement {
                round: r,
                send_seconds: 5.0,
                ended_early: true,
                ..full
            };
            assert_eq!(
                p.round_done(early).decision,
                Decision::Continue { throttle: None }
            );
        }
        let (rate, _) = p.send_model();
        assert!((rate / 1e9 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_switchover_slower_than_the_limit_before_any_page_is_never_throttled() {
        // The destination takes 20 ms to acknowledge anything: nothing the guest does
        // brings the switchover under 5 ms, and ten pages that never shrink are not
        // the guest's fault.
        let mut p = Planner::new(PlannerConfig {
            max_rounds: 8,
            ..config(5)
        });
        let mut last = None;
        for r in 0..8 {
            p.round_acknowledged(0.020);
            let mut m = round(r, 10, 2.5e9, 0.001, 0.0);
            m.dirtied_pages = 10;
            last = Some(p.round_done(m));
        }
        assert_eq!(p.throttle(), 0, "throttling cannot help");
        match last.unwrap().decision {
            Decision::Abort { reason } => {
                assert!(reason.contains("before any page"), "{reason}")
            }
            other => panic!("expected an abort, got {other:?}"),
        }
    }

    #[test]
    fn round_0_is_never_the_last_before_the_switchover() {
        let mut p = Planner::new(config(50));
        let m = round(0, 262_144, 2.5e9, 0.001, 100.0);
        let plan = p.round_done(m);
        assert!(plan.estimate.total < 0.050);
        assert_eq!(plan.decision, Decision::Continue { throttle: None });
        let plan = p.round_done(round(1, m.dirtied_pages, 2.5e9, 0.001, 100.0));
        assert_eq!(plan.decision, Decision::SwitchOver);
    }

    #[test]
    fn while_rounds_halve_the_dirty_set_one_more_round_beats_switching_at_once() {
        let mut p = Planner::new(config(50));
        p.round_done(round(0, 262_144, 2.5e9, 0.0005, 8_000.0));
        // Round 1 of 40 000 pages leaves 1 000 (fits, but a fair share of the estimate).
        let mut m = round(1, 40_000, 2.5e9, 0.0005, 0.0);
        m.dirtied_pages = 1_000;
        let plan = p.round_done(m);
        assert!(plan.estimate.total < 0.050);
        assert_eq!(
            plan.decision,
            Decision::Continue { throttle: None },
            "{plan:?}"
        );
        // Round 2 of 1 000 leaves 20: their pages no longer matter; switch.
        let mut m = round(2, 1_000, 2.5e9, 0.0005, 0.0);
        m.dirtied_pages = 20;
        assert_eq!(p.round_done(m).decision, Decision::SwitchOver);
    }

    #[test]
    fn a_collection_that_reads_all_memory_costs_the_same_at_the_end() {
        let mut p = Planner::new(config(50));
        p.set_collect_reads_memory(true);
        let mut m = round(0, 100_000, 1e9, 0.0, 0.0);
        for (pages, seconds) in [(4_000, 0.012), (1_000, 0.010), (200, 0.011)] {
            m.dirtied_pages = pages;
            m.collect_seconds = seconds;
            p.round_done(m);
        }
        assert!((p.estimate(0).collect - 0.010).abs() < 1e-12);
    }

    #[test]
    fn the_final_collect_costs_the_fixed_part_of_a_collection() {
        let mut p = Planner::new(config(50));
        let mut m = round(0, 262_144, 2.5e9, 0.001, 10_000.0);
        // 0.2 ms plus 1 µs per page reported.
        m.dirtied_pages = 4_000;
        m.collect_seconds = 0.0002 + 4_000.0 * 1e-6;
        p.round_done(m);
        assert!(
            (p.estimate(0).collect - m.collect_seconds).abs() < 1e-12,
            "one sample"
        );
        m.dirtied_pages = 1_000;
        m.collect_seconds = 0.0002 + 1_000.0 * 1e-6;
        p.round_done(m);
        assert!((p.estimate(0).collect - 0.0002).abs() < 1e-9);
    }

    #[test]
    fn a_timed_paused_walk_caps_the_final_collect() {
        let mut p = Planner::new(config(50));
        let mut m = round(0, 262_144, 2.5e9, 0.001, 10_000.0);
        // Live collections that also protect again: 0.6 ms and up.
        for pages in [4_000, 1_000] {
            m.dirtied_pages = pages;
            m.collect_seconds = 0.0006 + pages as f64 * 1e-6;
            p.round_done(m);
        }
        assert!((p.estimate(0).collect - 0.0006).abs() < 1e-9);
        // Walks as the paused one runs: the quickest counts, and only below the line.
        p.paused_walk_timed(0.00015);
        p.paused_walk_timed(0.0001);
        p.paused_walk_timed(f64::NAN);
        assert_eq!(p.paused_walks(), 2);
        assert!((p.estimate(0).collect - 0.0001).abs() < 1e-12);
        p.paused_walk_timed(0.01);
        assert!((p.estimate(0).collect - 0.0001).abs() < 1e-12);
        let mut slow = Planner::new(config(50));
        slow.round_done(m);
        slow.paused_walk_timed(0.01);
        assert!((slow.estimate(0).collect - m.collect_seconds).abs() < 1e-12);
        // Live collections whose line meets zero pages below zero: the walk, measured,
        // is the estimate, not the line's clamped intercept.
        let mut steep = Planner::new(config(50));
        for (pages, seconds) in [(1_000, 0.0003), (4_000, 0.0015)] {
            m.dirtied_pages = pages;
            m.collect_seconds = seconds;
            steep.round_done(m);
        }
        assert_eq!(steep.estimate(0).collect, 0.0);
        steep.paused_walk_timed(0.00025);
        assert!((steep.estimate(0).collect - 0.00025).abs() < 1e-12);
    }

    #[test]
    fn zero_pages_do_not_make_the_final_round_look_cheap() {
        let mut p = Planner::new(config(50));
        // Round 0: a third of memory zero, sent as counts.
        let mut m = round(0, 300, 1e9, 0.0, 0.0);
        m.zero_pages = 100;
        m.bytes = 200 * PAGE as u64;
        p.round_done(m);
        let e = p.estimate(1_000);
        assert!(
            (e.send - 1_000.0 * PAGE / p.send_model().0).abs() < 1e-9,
            "{e:?}"
        );
    }

    #[test]
    fn a_guest_the_destination_resumes_pays_only_the_way_there_of_the_confirmation() {
        let mut p = Planner::new(config(50));
        p.round_trip(0.200);
        assert_eq!(p.estimate(0).confirm, 0.200);
        p.set_resumes_at_destination(true);
        let e = p.estimate(0);
        assert_eq!(e.confirm, 0.100);
        assert!((e.total - (e.collect + e.send + e.confirm + e.verify)).abs() < 1e-12);
        // A path slower at the pause: half of the quiet round trip.
        let slow = p.estimate_at_pause(0, 0.600);
        assert_eq!(slow.confirm, 0.300);
        assert_eq!(
            p.estimate_at_pause(0, 0.250).confirm,
            0.100,
            "within the margin"
        );
    }

    #[test]
    fn the_confirm_part_is_the_quickest_round_trip_of_an_acknowledgement_or_a_ping() {
        let mut p = Planner::new(config(50));
        assert_eq!(p.estimate(0).confirm, 0.0);
        p.round_trip(0.004);
        p.round_trip(0.009);
        assert_eq!(p.estimate(0).confirm, 0.004);
        p.round_acknowledged(0.030);
        p.round_acknowledged(0.010);
        assert_eq!(p.estimate(0).confirm, 0.004, "a ping was quicker");
        p.round_acknowledged(0.001);
        assert_eq!(p.estimate(0).confirm, 0.001);
        assert_eq!(
            p.estimate(0).send,
            0.0,
            "nothing to send, nothing to wait for"
        );
    }
}
