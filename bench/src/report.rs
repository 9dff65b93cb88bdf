//! One comparison per JSON line on stdout; a table for people on stderr.

use serde::Serialize;
use std::io::Write;

/// Whether a bigger figure is better (throughput) or worse (time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Rates: ratio = ours / theirs.
    Higher,
    /// Times and costs: ratio = theirs / ours.
    Lower,
}

/// One side-by-side result. Figures are medians over `runs`; `min`/`max` are ours.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub bench: String,
    pub unit: String,
    pub ours: f64,
    pub baseline: String,
    pub theirs: f64,
    /// Above 1.0 means we are ahead, whichever way the unit points.
    pub ratio: f64,
    pub runs: usize,
    pub min: f64,
    pub max: f64,
    /// The target ratio the issue sets, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// Anything else a reader needs to judge the figures (a ratio both sides reached,
    /// the setting measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Further figures of this comparison, as extra JSON fields.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Comparison {
    /// Build from our and their samples.
    pub fn new(
        bench: impl Into<String>,
        unit: impl Into<String>,
        better: Better,
        ours: &crate::measure::Samples,
        baseline: impl Into<String>,
        theirs: &crate::measure::Samples,
    ) -> Self {
        let (o, t) = (ours.median(), theirs.median());
        let ratio = match better {
            Better::Higher => o / t,
            Better::Lower => t / o,
        };
        Comparison {
            bench: bench.into(),
            unit: unit.into(),
            ours: round(o),
            baseline: baseline.into(),
            theirs: round(t),
            ratio: (ratio * 1000.0).round() / 1000.0,
            runs: ours.len(),
            min: round(ours.min()),
            max: round(ours.max()),
            target: None,
            note: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Attach a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// Record the ratio the issue asks for.
    /// Adds a figure as an extra JSON field.
    pub fn with_field(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn with_target(mut self, target: f64) -> Self {
        self.target = Some(target);
        self
    }
}

/// What one comparison measures and how it is judged.
pub struct Spec<'a> {
    pub bench: &'a str,
    pub unit: &'a str,
    pub better: Better,
    pub baseline: &'a str,
    pub target: Option<f64>,
}

impl Reporter {
    /// Measure ours against theirs, interleaved, and emit the comparison; skipped when
    /// the filter excludes it.
    pub fn compare(
        &mut self,
        plan: crate::measure::Plan,
        spec: Spec<'_>,
        ours: impl FnMut() -> f64,
        theirs: impl FnMut() -> f64,
    ) {
        if !self.wants(spec.bench) {
            return;
        }
        let (o, t) = crate::measure::interleave(plan, ours, theirs);
        let mut c = Comparison::new(spec.bench, spec.unit, spec.better, &o, spec.baseline, &t);
        c.target = spec.target;
        self.emit(c);
    }
}

/// Four significant digits are all a noisy machine supports.
fn round(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let digits = 4 - x.abs().log10().ceil() as i32;
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// Where results go: JSON lines on stdout (with `--json`) and the table on stderr, or
/// the table alone on stdout.
pub struct Reporter {
    json: bool,
    filter: Option<String>,
    rows: Vec<Comparison>,
}

impl Reporter {
    pub fn new(json: bool) -> Self {
        Reporter {
            json,
            filter: None,
            rows: Vec::new(),
        }
    }

    /// Only comparisons whose name contains `filter` are measured.
    pub fn with_filter(mut self, filter: Option<String>) -> Self {
        self.filter = filter;
        self
    }

    /// Whether the comparison called `bench` should be measured at all.
    pub fn wants(&self, bench: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| bench.contains(f))
    }

    /// Emit one comparison as soon as it is measured.
    pub fn emit(&mut self, c: Comparison) {
        if self.json {
            let line = serde_json::to_string(&c).expect("comparison serialises");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        eprintln!(
            "  {:<34} {:>10.3} vs {:>10.3} {:<8} ratio {:>6.3}{}",
            c.bench,
            c.ours,
            c.theirs,
            c.unit,
            c.ratio,
            c.target
                .map(|t| format!("  (target ≥ {t})"))
                .unwrap_or_default()
        );
        self.rows.push(c);
    }

    /// Print the summary table.
    pub fn finish(self) {
        let mut table = String::new();
        table.push_str(&format!(
            "\n{:<34} {:>12} {:>12} {:<10} {:<24} {:>7} {:>8}\n",
            "bench", "ours", "theirs", "unit", "baseline", "ratio", "target"
        ));
        for c in &self.rows {
            let verdict = match c.target {
                Some(t) if c.ratio >= t => format!("≥{t} ok"),
                Some(t) => format!("≥{t} MISS"),
                None => String::new(),
            };
            table.push_str(&format!(
                "{:<34} {:>12.3} {:>12.3} {:<10} {:<24} {:>7.3} {:>8}\n",
                c.bench, c.ours, c.theirs, c.unit, c.baseline, c.ratio, verdict
            ));
        }
        if self.json {
            eprint!("{table}");
        } else {
            print!("{table}");
        }
    }
}
