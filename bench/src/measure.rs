//! Timing on a shared, noisy machine: each figure is a median of several runs, and our
//! runs alternate with the baseline's so that drift affects both sides alike.

use std::time::{Duration, Instant};

/// Repeated measurements of one figure.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<f64>);

impl From<Vec<f64>> for Samples {
    fn from(values: Vec<f64>) -> Self {
        Samples(values)
    }
}

impl Samples {
    pub fn push(&mut self, x: f64) {
        self.0.push(x);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// How long each run lasts and how many runs each side gets.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub runs: usize,
    pub run_time: Duration,
}

impl Plan {
    /// `DWCP_BENCH_QUICK=1` shortens everything (for smoke tests of the runner).
    pub fn from_env() -> Plan {
        if std::env::var_os("DWCP_BENCH_QUICK").is_some() {
            Plan {
                runs: 3,
                run_time: Duration::from_millis(20),
            }
        } else {
            Plan {
                runs: 9,
                run_time: Duration::from_millis(150),
            }
        }
    }
}

/// Run `work` (which processes `units` of something per call) repeatedly for about
/// `run_time`; returns units per second.
pub fn rate(run_time: Duration, units: f64, mut work: impl FnMut()) -> f64 {
    // Calibrate: how many calls fill a tenth of the run.
    let mut calls = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..calls {
            work();
        }
        if t.elapsed() >= run_time / 10 || calls >= 1 << 30 {
            break;
        }
        calls *= 2;
    }
    let t = Instant::now();
    let mut done = 0u64;
    while t.elapsed() < run_time {
        for _ in 0..calls {
            work();
        }
        done += calls;
    }
    done as f64 * units / t.elapsed().as_secs_f64()
}

/// Alternate our run and theirs `plan.runs` times; each closure returns one figure.
pub fn interleave(
    plan: Plan,
    mut ours: impl FnMut() -> f64,
    mut theirs: impl FnMut() -> f64,
) -> (Samples, Samples) {
    let (mut o, mut t) = (Samples::default(), Samples::default());
    for i in 0..plan.runs {
        // Alternate who goes first too, so neither always runs on a warmer cache.
        if i % 2 == 0 {
            o.push(ours());
            t.push(theirs());
        } else {
            t.push(theirs());
            o.push(ours());
        }
    }
    (o, t)
}
