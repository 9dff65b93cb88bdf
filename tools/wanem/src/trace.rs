//! Trace playback: a path whose rate, delay, jitter and loss follow a time series.
//!
//! A [`Trace`] is a list of points, each holding from its time until the next one; the
//! emulator applies them live to both directions (the reverse direction carries only
//! acknowledgements, so its rate is left alone). Traces come from a CSV file or from a
//! seeded generator of one of four families, each a kind of path a migration meets:
//!
//! - `diurnal`: the rate swings around its mean like a day's load (compressed to a
//!   period of a minute or two), the delay rising a little as the rate falls;
//! - `steps`: the rate holds, then jumps to another level (rerouting, a new tenant);
//! - `bursts`: cross traffic arrives in bursts of a few seconds that take part of the
//!   rate and fill the bottleneck's queue (the delay rises with them);
//! - `loss-episodes`: a steady path with episodes of a few seconds of loss and a longer
//!   delay (a flapping link or a failing optic).
//!
//! Each point carries a label: empty on a healthy path, the fault's name while one is
//! injected (`burst`, `loss-episode`, `step`), so traces are the labels of the data
//! that anomaly detection is judged on.
//!
//! The CSV form (`wanem trace` prints it) has a header and one point per line:
//! `seconds,rate_mbit,delay_ms,jitter_ms,loss_percent,label`; times strictly rise from
//! 0, and every bad line is reported with its number.

use crate::scenario::LinkChanges;
use crate::units::{BitsPerSecond, Nanos, Probability};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;
use std::time::Duration;

/// Header of the CSV form.
pub const CSV_HEADER: &str = "seconds,rate_mbit,delay_ms,jitter_ms,loss_percent,label";
/// Time between generated points.
pub const STEP: Duration = Duration::from_millis(250);

/// One point of a trace: the path from `at` until the next point.
#[derive(Clone, Debug, PartialEq)]
pub struct TracePoint {
    /// From the start of playback.
    pub at: Duration,
    /// Bottleneck rate, Mbit/s.
    pub rate_mbit: f64,
    /// One-way delay, ms.
    pub delay_ms: f64,
    /// Jitter, ms.
    pub jitter_ms: f64,
    /// Random loss, percent.
    pub loss_percent: f64,
    /// The fault injected here, empty when none.
    pub label: String,
}

impl TracePoint {
    /// The changes that put the forward direction into this point's state.
    pub fn forward_changes(&self) -> LinkChanges {
        LinkChanges {
            rate: Some(BitsPerSecond((self.rate_mbit * 1e6).round() as u64)),
            delay: Some(Nanos::from_millis_f64(self.delay_ms)),
            jitter: Some(Nanos::from_millis_f64(self.jitter_ms)),
            loss: Some(Probability(self.loss_percent / 100.0)),
            ..LinkChanges::default()
        }
    }

    /// The changes for the reverse direction: the same delay, jitter and loss, the
    /// rate left as it is (acknowledgements need little of it).
    pub fn reverse_changes(&self) -> LinkChanges {
        LinkChanges {
            rate: None,
            ..self.forward_changes()
        }
    }

    fn problems(&self, line: usize) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |ok: bool, what: &str| {
            if !ok {
                p.push(format!("line {line}: {what}"));
            }
        };
        check(
            self.rate_mbit.is_finite() && self.rate_mbit > 0.0 && self.rate_mbit <= 100_000.0,
            "rate_mbit must be above 0 and at most 100000",
        );
        check(
            self.delay_ms.is_finite() && (0.0..=10_000.0).contains(&self.delay_ms),
            "delay_ms must be 0..=10000",
        );
        check(
            self.jitter_ms.is_finite() && (0.0..=10_000.0).contains(&self.jitter_ms),
            "jitter_ms must be 0..=10000",
        );
        check(
            self.loss_percent.is_finite() && (0.0..=100.0).contains(&self.loss_percent),
            "loss_percent must be 0..=100",
        );
        check(
            self.label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "label must be letters, digits and dashes",
        );
        p
    }
}

/// A time series of path states.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Where it came from: a file name, or `family:seed`.
    pub name: String,
    pub points: Vec<TracePoint>,
}

/// The generator families.
pub const FAMILIES: &[&str] = &["diurnal", "steps", "bursts", "loss-episodes"];

impl Trace {
    /// Reads the CSV form; every problem, each with its line number, at once.
    pub fn from_csv(text: &str, name: &str) -> Result<Trace, String> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        match lines.next() {
            Some((_, header)) if header.trim() == CSV_HEADER => {}
            _ => return Err(format!("{name}: the first line must be `{CSV_HEADER}`")),
        }
        let mut points: Vec<TracePoint> = Vec::new();
        let mut problems = Vec::new();
        for (index, line) in lines {
            let number = index + 1;
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != 6 {
                problems.push(format!(
                    "line {number}: {} fields, want 6 ({CSV_HEADER})",
                    fields.len()
                ));
                continue;
            }
            let mut number_at = |i: usize, what: &str| match fields[i].parse::<f64>() {
                Ok(v) => v,
                Err(_) => {
                    problems.push(format!(
                        "line {number}: {what} `{}` is not a number",
                        fields[i]
                    ));
                    f64::NAN
                }
            };
            let seconds = number_at(0, "seconds");
            let point = TracePoint {
                at: Duration::ZERO,
                rate_mbit: number_at(1, "rate_mbit"),
                delay_ms: number_at(2, "delay_ms"),
                jitter_ms: number_at(3, "jitter_ms"),
                loss_percent: number_at(4, "loss_percent"),
                label: fields[5].to_string(),
            };
            if !seconds.is_finite() || !(0.0..=86_400.0 * 7.0).contains(&seconds) {
                if !seconds.is_nan() {
                    problems.push(format!("line {number}: seconds must be 0..=604800"));
                }
                continue;
            }
            let at = Duration::from_secs_f64(seconds);
            match points.last() {
                None if at != Duration::ZERO => {
                    problems.push(format!("line {number}: the first point must be at 0 s"))
                }
                Some(last) if at <= last.at => problems.push(format!(
                    "line {number}: {seconds} s is not after the previous point"
                )),
                _ => {}
            }
            if [
                point.rate_mbit,
                point.delay_ms,
                point.jitter_ms,
                point.loss_percent,
            ]
            .iter()
            .any(|v| v.is_nan())
            {
                continue; // reported as not a number
            }
            let bad = point.problems(number);
            if bad.is_empty() {
                points.push(TracePoint { at, ..point });
            } else {
                problems.extend(bad);
            }
        }
        if points.is_empty() && problems.is_empty() {
            problems.push("no points".into());
        }
        if problems.is_empty() {
            Ok(Trace {
                name: name.to_string(),
                points,
            })
        } else {
            Err(format!("{name}: {}", problems.join("; ")))
        }
    }

    /// The CSV form.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(CSV_HEADER);
        out.push('\n');
        for p in &self.points {
            let _ = writeln!(
                out,
                "{:.3},{:.3},{:.3},{:.3},{:.4},{}",
                p.at.as_secs_f64(),
                p.rate_mbit,
                p.delay_ms,
                p.jitter_ms,
                p.loss_percent,
                p.label
            );
        }
        out
    }

    /// How long it lasts (its last point holds for one [`STEP`]).
    pub fn duration(&self) -> Duration {
        self.points.last().map_or(Duration::ZERO, |p| p.at + STEP)
    }

    /// The point in force at `t`.
    pub fn at(&self, t: Duration) -> Option<&TracePoint> {
        let i = self.points.partition_point(|p| p.at <= t);
        i.checked_sub(1).map(|i| &self.points[i])
    }

    /// A trace of `family` (see [`FAMILIES`]), `seconds` long, the same for a seed on
    /// every machine.
    pub fn generate(family: &str, seed: u64, seconds: f64) -> Result<Trace, String> {
        if !(1.0..=86_400.0).contains(&seconds) {
            return Err(format!("trace length {seconds} s: 1..=86400"));
        }
        // One stream per (family, seed): families with one seed differ.
        let family_salt = FAMILIES.iter().position(|f| *f == family).ok_or_else(|| {
            format!(
                "unknown trace family `{family}` (one of {})",
                FAMILIES.join(", ")
            )
        })? as u64;
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ family_salt);
        let n = (seconds / STEP.as_secs_f64()).ceil() as usize;
        // Each path has its own scale: 50-400 Mbit/s, 10-50 ms one way.
        let mean_rate: f64 = rng.random_range(50.0..400.0);
        let base_delay: f64 = rng.random_range(10.0..50.0);
        let mut points = Vec::with_capacity(n);
        let mut family_state = Generator::new(family, mean_rate, base_delay, &mut rng);
        for i in 0..n {
            let t = i as f64 * STEP.as_secs_f64();
            let (rate, delay, loss, label) = family_state.next(t, &mut rng);
            // Measurement-scale noise on every family: a real path is never flat.
            let rate = (rate * (1.0 + rng.random_range(-0.03..0.03))).clamp(5.0, 2_000.0);
            points.push(TracePoint {
                at: STEP * i as u32,
                rate_mbit: round3(rate),
                delay_ms: round3(delay),
                jitter_ms: round3(delay * 0.02),
                loss_percent: round3(loss),
                label,
            });
        }
        Ok(Trace {
            name: format!("{family}:{seed}"),
            points,
        })
    }

    /// A trace named `family:seed[:seconds]` (generated) or a CSV file's path.
    pub fn load(spec: &str) -> Result<Trace, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        if FAMILIES.contains(&parts[0]) && (2..=3).contains(&parts.len()) {
            let seed = parts[1]
                .parse()
                .map_err(|_| format!("trace `{spec}`: seed `{}` is not a number", parts[1]))?;
            let seconds = match parts.get(2) {
                Some(s) => s
                    .parse()
                    .map_err(|_| format!("trace `{spec}`: length `{s}` is not a number"))?,
                None => 120.0,
            };
            return Trace::generate(parts[0], seed, seconds);
        }
        let text = std::fs::read_to_string(spec).map_err(|e| {
            format!(
                "trace `{spec}`: {e} (a CSV file, or FAMILY:SEED[:SECONDS] with a family of {})",
                FAMILIES.join(", ")
            )
        })?;
        Trace::from_csv(&text, spec)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The state of one family's generator.
enum Generator {
    Diurnal {
        mean: f64,
        depth: f64,
        period: f64,
        phase: f64,
        delay: f64,
    },
    Steps {
        level: f64,
        mean: f64,
        next_step: f64,
        delay: f64,
        marked_until: f64,
    },
    Bursts {
        mean: f64,
        delay: f64,
        burst_until: f64,
        share: f64,
        next_burst: f64,
    },
    LossEpisodes {
        mean: f64,
        delay: f64,
        episode_until: f64,
        loss: f64,
        next_episode: f64,
    },
}

impl Generator {
    fn new(family: &str, mean: f64, delay: f64, rng: &mut ChaCha8Rng) -> Generator {
        match family {
            "diurnal" => Generator::Diurnal {
                mean,
                depth: rng.random_range(0.3..0.7),
                period: rng.random_range(40.0..120.0),
                phase: rng.random_range(0.0..std::f64::consts::TAU),
                delay,
            },
            "steps" => Generator::Steps {
                level: mean,
                mean,
                next_step: rng.random_range(5.0..15.0),
                delay,
                marked_until: -1.0,
            },
            "bursts" => Generator::Bursts {
                mean,
                delay,
                burst_until: -1.0,
                share: 0.0,
                next_burst: rng.random_range(3.0..10.0),
            },
            _ => Generator::LossEpisodes {
                mean,
                delay,
                episode_until: -1.0,
                loss: 0.0,
                next_episode: rng.random_range(5.0..15.0),
            },
        }
    }

    /// (rate Mbit/s, one-way delay ms, loss %, label) at `t` seconds.
    fn next(&mut self, t: f64, rng: &mut ChaCha8Rng) -> (f64, f64, f64, String) {
        match self {
            Generator::Diurnal {
                mean,
                depth,
                period,
                phase,
                delay,
            } => {
                let swing = (std::f64::consts::TAU * t / *period + *phase).sin();
                let rate = *mean * (1.0 + *depth * swing);
                // Busy hours: less rate, more queueing.
                (rate, *delay * (1.0 - 0.2 * swing), 0.0, String::new())
            }
            Generator::Steps {
                level,
                mean,
                next_step,
                delay,
                marked_until,
            } => {
                if t >= *next_step {
                    *level = (*mean * rng.random_range(0.3_f64..2.0)).max(10.0);
                    *next_step = t + rng.random_range(5.0..20.0);
                    *marked_until = t + 1.0;
                    if rng.random_bool(0.3) {
                        *delay *= rng.random_range(0.7..1.4);
                    }
                }
                let label = if t < *marked_until { "step" } else { "" };
                (*level, *delay, 0.0, label.to_string())
            }
            Generator::Bursts {
                mean,
                delay,
                burst_until,
                share,
                next_burst,
            } => {
                if t >= *next_burst {
                    *share = rng.random_range(0.3..0.8);
                    *burst_until = t + rng.random_range(1.0..6.0);
                    *next_burst = *burst_until + rng.random_range(2.0..12.0);
                }
                if t < *burst_until {
                    // The cross traffic takes its share and queues behind the bottleneck.
                    (
                        *mean * (1.0 - *share),
                        *delay * (1.0 + *share),
                        0.0,
                        "burst".into(),
                    )
                } else {
                    (*mean, *delay, 0.0, String::new())
                }
            }
            Generator::LossEpisodes {
                mean,
                delay,
                episode_until,
                loss,
                next_episode,
            } => {
                if t >= *next_episode {
                    *loss = rng.random_range(1.0..5.0);
                    *episode_until = t + rng.random_range(2.0..8.0);
                    *next_episode = *episode_until + rng.random_range(5.0..20.0);
                }
                if t < *episode_until {
                    (*mean, *delay * 1.5, *loss, "loss-episode".into())
                } else {
                    (*mean, *delay, 0.0, String::new())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_trace_and_families_differ() {
        for family in FAMILIES {
            let a = Trace::generate(family, 7, 60.0).unwrap();
            assert_eq!(a, Trace::generate(family, 7, 60.0).unwrap());
            assert_ne!(a.points, Trace::generate(family, 8, 60.0).unwrap().points);
            assert_eq!(a.points.len(), 240);
            assert_eq!(a.duration(), Duration::from_secs(60));
        }
        let d = Trace::generate("diurnal", 7, 60.0).unwrap();
        let s = Trace::generate("steps", 7, 60.0).unwrap();
        assert_ne!(d.points, s.points);
    }

    #[test]
    fn each_family_has_its_shape_and_labels() {
        let labels = |t: &Trace, l: &str| t.points.iter().filter(|p| p.label == l).count();
        let rates = |t: &Trace| t.points.iter().map(|p| p.rate_mbit).collect::<Vec<_>>();
        let d = Trace::generate("diurnal", 1, 240.0).unwrap();
        let r = rates(&d);
        let (lo, hi) = r
            .iter()
            .fold((f64::MAX, 0.0_f64), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi / lo > 1.6, "a day swings: {lo}..{hi}");
        assert_eq!(
            labels(&d, ""),
            d.points.len(),
            "no faults in a diurnal trace"
        );
        let b = Trace::generate("bursts", 1, 240.0).unwrap();
        assert!(labels(&b, "burst") > 8, "bursts happen");
        for p in b.points.iter().filter(|p| p.label == "burst") {
            assert!(p.delay_ms > b.points[0].delay_ms * 0.9);
        }
        let l = Trace::generate("loss-episodes", 1, 240.0).unwrap();
        assert!(
            l.points
                .iter()
                .all(|p| (p.loss_percent > 0.0) == (p.label == "loss-episode"))
        );
        assert!(labels(&l, "loss-episode") > 8);
        let s = Trace::generate("steps", 1, 240.0).unwrap();
        assert!(labels(&s, "step") >= 4, "steps are marked");
    }

    #[test]
    fn the_csv_form_reads_back_and_bad_lines_are_named() {
        let t = Trace::generate("bursts", 3, 20.0).unwrap();
        let back = Trace::from_csv(&t.to_csv(), "bursts:3").unwrap();
        assert_eq!(back.points.len(), t.points.len());
        for (a, b) in back.points.iter().zip(&t.points) {
            assert_eq!(a.label, b.label);
            assert!((a.rate_mbit - b.rate_mbit).abs() < 1e-3);
            assert!((a.at.as_secs_f64() - b.at.as_secs_f64()).abs() < 1e-3);
        }
        let bad = format!(
            "{CSV_HEADER}\n0,100,10,0,0,\n0.5,-3,10,0,0,\n0,100,10,0,0,\n1,100,ten,0,0,\n2,100,10,0,0\n3,100,10,0,101,x y\n"
        );
        let e = Trace::from_csv(&bad, "f.csv").unwrap_err();
        for want in [
            "line 3: rate_mbit",
            "line 4: 0 s is not after",
            "line 5: delay_ms `ten` is not a number",
            "line 6: 5 fields",
            "line 7: loss_percent",
            "line 7: label",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        assert!(
            Trace::from_csv("a,b\n", "x")
                .unwrap_err()
                .contains("first line")
        );
        assert!(
            Trace::from_csv(&format!("{CSV_HEADER}\n1,100,10,0,0,\n"), "x")
                .unwrap_err()
                .contains("at 0 s")
        );
    }

    #[test]
    fn a_spec_names_a_family_and_seed_or_a_file() {
        assert_eq!(Trace::load("steps:4:30").unwrap().points.len(), 120);
        assert!(Trace::load("steps:x").unwrap_err().contains("seed"));
        assert!(
            Trace::load("/nonexistent.csv")
                .unwrap_err()
                .contains("FAMILY:SEED")
        );
        assert!(
            Trace::generate("weekly", 1, 10.0)
                .unwrap_err()
                .contains("unknown trace family")
        );
        let t = Trace::generate("steps", 4, 30.0).unwrap();
        assert_eq!(t.at(Duration::from_millis(600)), Some(&t.points[2]));
        assert_eq!(t.at(Duration::from_secs(100)), t.points.last());
        let c = t.points[0].forward_changes();
        assert!(c.rate.is_some() && c.delay.is_some() && c.loss.is_some());
        assert!(t.points[0].reverse_changes().rate.is_none());
    }
}
