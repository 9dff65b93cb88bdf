//! Link descriptions: what one direction of the emulated path does to packets
//! ([`LinkSpec`]), partial changes to it ([`LinkChanges`], shared by scenario files,
//! flags and the live control command), and named scenarios ([`Scenario`]) with the
//! set shipped in `scenarios/`.
//!
//! Validation reports every bad field at once, by name, with its allowed range.

use crate::units::{BitsPerSecond, Bytes, Nanos, Probability};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// Shape of the jitter added to the fixed delay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JitterDistribution {
    /// Gaussian with `jitter` as its standard deviation.
    #[default]
    Normal,
    /// Uniform within ± `jitter`.
    Uniform,
    /// Pareto (heavy tail, only adds delay), scaled so its mean is `jitter`.
    Pareto,
}

impl std::str::FromStr for JitterDistribution {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "normal" => Ok(Self::Normal),
            "uniform" => Ok(Self::Uniform),
            "pareto" => Ok(Self::Pareto),
            _ => Err(format!("`{text}`: one of normal, uniform, pareto")),
        }
    }
}

/// Two-state Markov loss (Gilbert–Elliott): the chain moves good→bad with probability
/// `p` and bad→good with `r` per packet; a packet is lost with `loss_good` or `loss_bad`
/// according to the state it meets. Stationary loss is
/// `(r·loss_good + p·loss_bad) / (p + r)`; mean time in the bad state is `1/r` packets.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GilbertElliott {
    pub p: Probability,
    pub r: Probability,
    #[serde(default)]
    pub loss_good: Probability,
    #[serde(default = "certain")]
    pub loss_bad: Probability,
}

fn certain() -> Probability {
    Probability(1.0)
}

impl GilbertElliott {
    /// The chain that loses `rate` of the packets in bursts of `mean_burst` packets on
    /// average (Gilbert's simple model: nothing lost in the good state, all in the bad).
    pub fn from_rate_and_burst(rate: f64, mean_burst: f64) -> GilbertElliott {
        let r = 1.0 / mean_burst.max(1.0);
        let p = if rate >= 1.0 {
            1.0
        } else {
            rate * r / (1.0 - rate)
        };
        GilbertElliott {
            p: Probability(p.min(1.0)),
            r: Probability(r),
            loss_good: Probability::NEVER,
            loss_bad: Probability(1.0),
        }
    }

    pub fn stationary_loss(&self) -> f64 {
        let (p, r) = (self.p.0, self.r.0);
        if p + r == 0.0 {
            return self.loss_good.0;
        }
        (r * self.loss_good.0 + p * self.loss_bad.0) / (p + r)
    }
}

/// Everything one direction of the path does, resolved (no unset fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkSpec {
    /// One-way propagation delay.
    pub delay: Nanos,
    pub jitter: Nanos,
    pub jitter_distribution: JitterDistribution,
    /// Independent random loss.
    pub loss: Probability,
    /// Bursty loss; when set it replaces `loss`.
    pub gilbert_elliott: Option<GilbertElliott>,
    /// Bottleneck rate (token bucket); unlimited when zero.
    pub rate: BitsPerSecond,
    /// Token bucket depth: how many bytes may leave back to back at line speed.
    pub burst: Bytes,
    /// Bottleneck queue bound; packets that would exceed it are dropped (tail drop).
    pub queue: Bytes,
    /// Fraction of packets sent without the delay, overtaking those queued before them.
    pub reorder: Probability,
    pub duplicate: Probability,
    /// Fraction of packets with one random bit flipped.
    pub corrupt: Probability,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            delay: Nanos::ZERO,
            jitter: Nanos::ZERO,
            jitter_distribution: JitterDistribution::Normal,
            loss: Probability::NEVER,
            gilbert_elliott: None,
            rate: BitsPerSecond::UNLIMITED,
            burst: Bytes(0),
            queue: Bytes(0),
            reorder: Probability::NEVER,
            duplicate: Probability::NEVER,
            corrupt: Probability::NEVER,
        }
    }
}

impl LinkSpec {
    /// Average loss rate the spec produces (random or bursty).
    pub fn mean_loss(&self) -> f64 {
        match &self.gilbert_elliott {
            Some(model) => model.stationary_loss(),
            None => self.loss.0,
        }
    }

    /// The burst used by the token bucket: the configured one, or by default 1 ms at the
    /// link rate (and at least two 64 KiB packets, so a jumbo MTU always fits).
    pub fn effective_burst(&self, mtu: u32) -> u64 {
        if self.burst.0 > 0 {
            return self.burst.0;
        }
        let one_ms = (self.rate.bytes_per_second() / 1000.0) as u64;
        one_ms.max(2 * mtu as u64)
    }

    /// The queue bound used: the configured one, or by default one bandwidth-delay
    /// product of the round trip (taken as twice this direction's delay, at least
    /// 10 ms), like a router buffer sized to the path, and at least 64 KiB.
    pub fn effective_queue(&self) -> u64 {
        if self.queue.0 > 0 {
            return self.queue.0;
        }
        let rtt = (2.0 * self.delay.as_secs_f64()).max(0.010);
        ((self.rate.bytes_per_second() * rtt) as u64).max(64 * 1024)
    }

    /// Every problem with the spec, as `"<prefix>.<field>: <why>"`.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let max_delay = Nanos(60_000_000_000);
        if self.delay > max_delay {
            problems.push(format!(
                "{prefix}.delay: {} is above the limit of 60s",
                self.delay
            ));
        }
        if self.jitter > max_delay {
            problems.push(format!(
                "{prefix}.jitter: {} is above the limit of 60s",
                self.jitter
            ));
        }
        if let Some(model) = &self.gilbert_elliott {
            if model.p.0 + model.r.0 == 0.0 {
                problems.push(format!(
                    "{prefix}.gilbert_elliott: p and r cannot both be 0 (the chain would never move)"
                ));
            }
            if !self.loss.is_never() {
                problems.push(format!(
                    "{prefix}.loss: give either loss (with loss_burst) or gilbert_elliott, not both"
                ));
            }
        }
        if !self.rate.is_unlimited() && self.rate.0 < 8_000 {
            problems.push(format!(
                "{prefix}.rate: {} is below the minimum of 8kbit (or `unlimited`)",
                self.rate
            ));
        }
        if self.queue.0 > 0 && self.queue.0 < 2048 {
            problems.push(format!(
                "{prefix}.queue: {} is below the minimum of 2KiB (one packet must fit)",
                self.queue
            ));
        }
        if self.queue.0 > 1 << 30 {
            problems.push(format!(
                "{prefix}.queue: {} is above the limit of 1GiB",
                self.queue
            ));
        }
        problems
    }
}

/// A partial [`LinkSpec`]: the fields given replace the current ones. Scenario files
/// (`[link]`, `[forward]`, `[reverse]`), `wanem` flags and `wanem set` all use it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Nanos>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Nanos>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_distribution: Option<JitterDistribution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Probability>,
    /// Mean loss burst in packets; with `loss`, turns it into Gilbert–Elliott bursts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_burst: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gilbert_elliott: Option<GilbertElliott>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<BitsPerSecond>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<Probability>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<Probability>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<Probability>,
}

impl LinkChanges {
    pub fn is_empty(&self) -> bool {
        *self == LinkChanges::default()
    }

    /// Fields of `later` win over ours.
    pub fn then(&self, later: &LinkChanges) -> LinkChanges {
        LinkChanges {
            delay: later.delay.or(self.delay),
            jitter: later.jitter.or(self.jitter),
            jitter_distribution: later.jitter_distribution.or(self.jitter_distribution),
            loss: later.loss.or(self.loss),
            loss_burst: later.loss_burst.or(self.loss_burst),
            gilbert_elliott: later.gilbert_elliott.or(self.gilbert_elliott),
            rate: later.rate.or(self.rate),
            burst: later.burst.or(self.burst),
            queue: later.queue.or(self.queue),
            reorder: later.reorder.or(self.reorder),
            duplicate: later.duplicate.or(self.duplicate),
            corrupt: later.corrupt.or(self.corrupt),
        }
    }

    /// `base` with these changes applied, or every problem with them.
    pub fn apply_to(&self, base: &LinkSpec, prefix: &str) -> Result<LinkSpec, Vec<String>> {
        let mut problems = Vec::new();
        let mut spec = base.clone();
        if let Some(v) = self.delay {
            spec.delay = v;
        }
        if let Some(v) = self.jitter {
            spec.jitter = v;
        }
        if let Some(v) = self.jitter_distribution {
            spec.jitter_distribution = v;
        }
        if let Some(v) = self.rate {
            spec.rate = v;
        }
        if let Some(v) = self.burst {
            spec.burst = v;
        }
        if let Some(v) = self.queue {
            spec.queue = v;
        }
        if let Some(v) = self.reorder {
            spec.reorder = v;
        }
        if let Some(v) = self.duplicate {
            spec.duplicate = v;
        }
        if let Some(v) = self.corrupt {
            spec.corrupt = v;
        }
        if let Some(burst) = self.loss_burst
            && !(1.0..=10_000.0).contains(&burst)
        {
            problems.push(format!(
                "{prefix}.loss_burst: {burst} is outside 1–10000 packets"
            ));
        }
        match (self.loss, self.loss_burst, self.gilbert_elliott) {
            (_, _, Some(model)) => {
                if self.loss.is_some() || self.loss_burst.is_some() {
                    problems.push(format!(
                        "{prefix}.gilbert_elliott: give either it or loss/loss_burst, not both"
                    ));
                }
                spec.gilbert_elliott = Some(model);
                spec.loss = Probability::NEVER;
            }
            (Some(loss), Some(burst), None) => {
                if loss.0 >= 1.0 {
                    problems.push(format!("{prefix}.loss: bursty loss must be below 100%"));
                }
                spec.gilbert_elliott = Some(GilbertElliott::from_rate_and_burst(loss.0, burst));
                spec.loss = Probability::NEVER;
            }
            (Some(loss), None, None) => {
                spec.loss = loss;
                spec.gilbert_elliott = None;
            }
            (None, Some(burst), None) => {
                // Re-shape the current loss rate into bursts of the new length.
                let rate = spec.mean_loss();
                spec.gilbert_elliott = (rate > 0.0 && rate < 1.0)
                    .then(|| GilbertElliott::from_rate_and_burst(rate, burst));
                spec.loss = if spec.gilbert_elliott.is_some() {
                    Probability::NEVER
                } else {
                    Probability(rate)
                };
            }
            (None, None, None) => {}
        }
        problems.extend(spec.problems(prefix));
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(problems)
        }
    }
}

/// Applies each direction's changes to its base; every problem of both at once.
pub fn apply_both(
    forward: (&LinkChanges, &LinkSpec),
    reverse: (&LinkChanges, &LinkSpec),
) -> Result<(LinkSpec, LinkSpec), Vec<String>> {
    match (
        forward.0.apply_to(forward.1, "forward"),
        reverse.0.apply_to(reverse.1, "reverse"),
    ) {
        (Ok(f), Ok(r)) => Ok((f, r)),
        (f, r) => {
            let mut problems = f.err().unwrap_or_default();
            problems.extend(r.err().unwrap_or_default());
            Err(problems)
        }
    }
}

/// The on-disk form of a scenario (`scenarios/*.toml`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: String,
    #[serde(default)]
    description: String,
    mtu: Option<u32>,
    seed: Option<u64>,
    #[serde(default)]
    link: LinkChanges,
    #[serde(default)]
    forward: LinkChanges,
    #[serde(default)]
    reverse: LinkChanges,
}

/// A named path: its MTU and what each direction does. `forward` carries packets from
/// the source side to the destination side, `reverse` the way back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub mtu: u32,
    /// Seed of the impairments' random streams: equal seeds, equal decisions.
    pub seed: u64,
    pub forward: LinkSpec,
    pub reverse: LinkSpec,
}

pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_SEED: u64 = 1;

/// Scenario files shipped with the tool, built into the binary.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("datacenter", include_str!("../scenarios/datacenter.toml")),
    ("metro", include_str!("../scenarios/metro.toml")),
    (
        "cross-region",
        include_str!("../scenarios/cross-region.toml"),
    ),
    (
        "intercontinental",
        include_str!("../scenarios/intercontinental.toml"),
    ),
    ("satellite", include_str!("../scenarios/satellite.toml")),
    ("lossy", include_str!("../scenarios/lossy.toml")),
    ("constrained", include_str!("../scenarios/constrained.toml")),
];

/// A scenario's problems, each naming its field.
#[derive(Debug, thiserror::Error)]
pub struct ScenarioError {
    pub source_name: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.source_name)?;
        if self.problems.len() == 1 {
            write!(f, "{}", self.problems[0])
        } else {
            write!(f, "{} problems:", self.problems.len())?;
            for problem in &self.problems {
                write!(f, "\n  {problem}")?;
            }
            Ok(())
        }
    }
}

impl Scenario {
    /// A plain path: no impairment at all, MTU 1500.
    pub fn clean(name: &str) -> Scenario {
        Scenario {
            name: name.to_string(),
            description: String::new(),
            mtu: DEFAULT_MTU,
            seed: DEFAULT_SEED,
            forward: LinkSpec::default(),
            reverse: LinkSpec::default(),
        }
    }

    /// Parses a scenario file's text; `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Scenario, ScenarioError> {
        let error = |problems| ScenarioError {
            source_name: source_name.to_string(),
            problems,
        };
        let file: ScenarioFile = toml::from_str(text).map_err(|e| error(vec![e.to_string()]))?;
        let mut problems = Vec::new();
        let mtu = file.mtu.unwrap_or(DEFAULT_MTU);
        if !(576..=65_535).contains(&mtu) {
            problems.push(format!("mtu: {mtu} is outside 576–65535"));
        }
        let clean = LinkSpec::default();
        let (forward_changes, reverse_changes) =
            (file.link.then(&file.forward), file.link.then(&file.reverse));
        let (forward, reverse) =
            match apply_both((&forward_changes, &clean), (&reverse_changes, &clean)) {
                Ok(links) => links,
                Err(link_problems) => {
                    problems.extend(link_problems);
                    return Err(error(problems));
                }
            };
        if !problems.is_empty() {
            return Err(error(problems));
        }
        Ok(Scenario {
            name: file.name,
            description: file.description,
            mtu,
            seed: file.seed.unwrap_or(DEFAULT_SEED),
            forward,
            reverse,
        })
    }

    /// A shipped scenario by name.
    pub fn built_in(name: &str) -> Option<Scenario> {
        BUILT_IN.iter().find(|(n, _)| *n == name).map(|(n, text)| {
            Scenario::from_toml(text, n).expect("shipped scenarios are validated by tests")
        })
    }

    /// A shipped scenario's name, or a path to a scenario file.
    pub fn load(name_or_path: &str) -> Result<Scenario, ScenarioError> {
        if let Some(scenario) = Scenario::built_in(name_or_path) {
            return Ok(scenario);
        }
        let path = Path::new(name_or_path);
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            source_name: name_or_path.to_string(),
            problems: vec![format!(
                "not a shipped scenario ({}) and not a readable file: {e}",
                BUILT_IN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        })?;
        Scenario::from_toml(&text, name_or_path)
    }

    /// Round-trip time of an idle path (twice the mean one-way delays).
    pub fn base_rtt(&self) -> Nanos {
        Nanos(self.forward.delay.0 + self.reverse.delay.0)
    }

    /// The bottleneck of the forward direction, if any.
    pub fn forward_cap(&self) -> Option<BitsPerSecond> {
        (!self.forward.rate.is_unlimited()).then_some(self.forward.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses_and_matches_its_name() {
        for (name, text) in BUILT_IN {
            let scenario = Scenario::from_toml(text, name).unwrap();
            assert_eq!(scenario.name, *name);
            assert!(
                !scenario.description.is_empty(),
                "{name} has no description"
            );
        }
    }

    #[test]
    fn shipped_scenarios_have_the_promised_paths() {
        let rtt = |name: &str| Scenario::built_in(name).unwrap().base_rtt().as_millis_f64();
        let cap = |name: &str| Scenario::built_in(name).unwrap().forward_cap().map(|r| r.0);
        assert!(rtt("datacenter") < 0.5);
        assert_eq!(cap("datacenter"), None);
        assert_eq!(rtt("metro"), 5.0);
        assert_eq!(cap("metro"), Some(10_000_000_000));
        assert_eq!(rtt("cross-region"), 80.0);
        assert_eq!(cap("cross-region"), Some(1_000_000_000));
        assert_eq!(rtt("intercontinental"), 200.0);
        assert_eq!(cap("intercontinental"), Some(500_000_000));
        assert_eq!(rtt("satellite"), 600.0);
        assert_eq!(cap("satellite"), Some(50_000_000));
        assert_eq!(rtt("lossy"), 40.0);
        assert_eq!(rtt("constrained"), 30.0);
        assert_eq!(cap("constrained"), Some(100_000_000));
        let loss = |name: &str| Scenario::built_in(name).unwrap().forward.mean_loss();
        assert!((loss("cross-region") - 1e-4).abs() < 1e-12);
        assert!((loss("satellite") - 5e-3).abs() < 1e-12);
        assert!((loss("lossy") - 0.05).abs() < 1e-9);
        assert!(
            Scenario::built_in("lossy")
                .unwrap()
                .forward
                .gilbert_elliott
                .is_some()
        );
    }

    #[test]
    fn direction_sections_override_the_shared_link() {
        let text = r#"
            name = "asym"
            description = "x"
            [link]
            delay = "10ms"
            rate = "100mbit"
            [reverse]
            rate = "10mbit"
        "#;
        let scenario = Scenario::from_toml(text, "asym").unwrap();
        assert_eq!(scenario.forward.rate.0, 100_000_000);
        assert_eq!(scenario.reverse.rate.0, 10_000_000);
        assert_eq!(scenario.reverse.delay, Nanos(10_000_000));
    }

    #[test]
    fn every_bad_field_is_reported_by_name_at_once() {
        let text = r#"
            name = "bad"
            mtu = 100
            [link]
            loss = "2%"
            loss_burst = 0.5
            rate = "1kbit"
            [forward]
            queue = "100B"
        "#;
        let error = Scenario::from_toml(text, "bad.toml").unwrap_err();
        let all = error.to_string();
        for needle in [
            "mtu: 100",
            "forward.loss_burst",
            "forward.rate",
            "forward.queue",
            "reverse.rate",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
        let unknown = Scenario::from_toml("name = \"x\"\n[link]\ndelya = \"1ms\"\n", "typo.toml");
        assert!(unknown.unwrap_err().to_string().contains("delya"));
        let bad_unit = Scenario::from_toml("name = \"x\"\n[link]\ndelay = \"5 parsecs\"\n", "u");
        assert!(bad_unit.unwrap_err().to_string().contains("unit"));
    }

    #[test]
    fn bursty_loss_has_the_requested_mean_and_burst() {
        let model = GilbertElliott::from_rate_and_burst(0.05, 4.0);
        assert!((model.stationary_loss() - 0.05).abs() < 1e-12);
        assert!((1.0 / model.r.0 - 4.0).abs() < 1e-12);
    }

    #[test]
    fn changes_reshape_loss_and_validate() {
        let base = Scenario::built_in("cross-region").unwrap().forward;
        let bursty = LinkChanges {
            loss_burst: Some(8.0),
            ..Default::default()
        }
        .apply_to(&base, "forward")
        .unwrap();
        assert!((bursty.mean_loss() - 1e-4).abs() < 1e-12);
        let clean = LinkChanges {
            loss: Some(Probability::NEVER),
            ..Default::default()
        }
        .apply_to(&bursty, "forward")
        .unwrap();
        assert_eq!(clean.mean_loss(), 0.0);
        assert!(clean.gilbert_elliott.is_none());
        let bad = LinkChanges {
            rate: Some(BitsPerSecond(10)),
            ..Default::default()
        }
        .apply_to(&base, "both");
        assert!(bad.unwrap_err()[0].starts_with("both.rate"));
    }
}
