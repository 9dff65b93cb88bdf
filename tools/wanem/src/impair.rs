//! The impairment model of one direction, sans IO: given a packet's length and its
//! arrival time, [`Impairer::admit`] decides its fate (dropped, and why; or delivered,
//! when, possibly twice, possibly with a bit flipped). The forwarder applies the fate;
//! tests drive the model with synthetic clocks.
//!
//! Stages, in the order a packet meets them:
//! 1. loss — independent (Bernoulli) or bursty (Gilbert–Elliott chain);
//! 2. the bottleneck — a token bucket (rate, burst) fed by a queue bounded in bytes,
//!    tail drop when full (what `tc tbf` does);
//! 3. propagation — fixed delay plus jitter; packets keep their order (a packet never
//!    leaves before the one ahead of it) unless `reorder` sends it without the delay.
//!    Under load that makes a packet wait for its predecessor, so the delay a bulk
//!    flow sees leans toward the upper tail of the jitter distribution (as on a real
//!    path, where jitter comes from order-keeping queues); sparse packets such as
//!    pings see the distribution itself;
//! 4. duplication and corruption of what is delivered.
//!
//! All randomness comes from one ChaCha stream per direction seeded from the scenario's
//! seed, so a seed and a packet sequence give the same decisions on every run and
//! machine (the rate stage depends on arrival times, which are the input).

use crate::scenario::{JitterDistribution, LinkSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Pareto};
use std::collections::VecDeque;

/// Why a packet was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Loss,
    QueueFull,
}

/// What happens to one packet. Times are nanoseconds on the caller's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Dropped(DropReason),
    Delivered {
        at: u64,
        /// A second copy, delivered right after the first.
        duplicate: bool,
        /// Bit to flip (index from the packet's first bit).
        corrupt_bit: Option<usize>,
        /// Sent without the delay, overtaking earlier packets.
        reordered: bool,
    },
}

/// Counters of one direction's decisions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    pub admitted: u64,
    pub lost: u64,
    pub queue_drops: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    pub reordered: u64,
}

/// The bottleneck: a token bucket draining a byte-bounded FIFO, in virtual time.
#[derive(Debug)]
struct Bottleneck {
    /// Tokens (bytes) held at `tokens_at`.
    tokens: f64,
    tokens_at: u64,
    /// When the last queued packet leaves the bucket.
    last_departure: u64,
    /// Packets still waiting in the queue: (departure time, bytes).
    queued: VecDeque<(u64, u64)>,
    queued_bytes: u64,
}

impl Default for Bottleneck {
    fn default() -> Self {
        // The bucket starts full (clamped to the burst at first use).
        Bottleneck {
            tokens: f64::INFINITY,
            tokens_at: 0,
            last_departure: 0,
            queued: VecDeque::new(),
            queued_bytes: 0,
        }
    }
}

impl Bottleneck {
    /// Departure time of a `len`-byte packet arriving at `now`, or `None` when the queue
    /// bound would be exceeded.
    fn depart(
        &mut self,
        now: u64,
        len: u64,
        rate_bytes_per_ns: f64,
        burst: u64,
        limit: u64,
    ) -> Option<u64> {
        while let Some(&(departure, bytes)) = self.queued.front() {
            if departure > now {
                break;
            }
            self.queued.pop_front();
            self.queued_bytes -= bytes;
        }
        if self.queued_bytes + len > limit {
            return None;
        }
        let start = now.max(self.last_departure);
        let refill = start.saturating_sub(self.tokens_at) as f64 * rate_bytes_per_ns;
        let available = (self.tokens + refill).min(burst as f64);
        let departure = if available >= len as f64 {
            self.tokens = available - len as f64;
            start
        } else {
            self.tokens = 0.0;
            start + ((len as f64 - available) / rate_bytes_per_ns).ceil() as u64
        };
        self.tokens_at = departure;
        self.last_departure = departure;
        if departure > now {
            self.queued.push_back((departure, len));
            self.queued_bytes += len;
        }
        Some(departure)
    }
}

/// One direction's model. Changing its spec keeps the queue and ordering state, so a
/// live change never reorders or loses what is already in flight.
pub struct Impairer {
    spec: LinkSpec,
    mtu: u32,
    rng: ChaCha8Rng,
    in_bad_state: bool,
    bottleneck: Bottleneck,
    /// Latest delivery time handed out to an in-order packet.
    last_delivery: u64,
    pub decisions: Decisions,
}

impl Impairer {
    /// `stream` tells directions apart so both do not draw the same numbers.
    pub fn new(spec: LinkSpec, mtu: u32, seed: u64, stream: u64) -> Impairer {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Impairer {
            spec,
            mtu,
            rng,
            in_bad_state: false,
            bottleneck: Bottleneck::default(),
            last_delivery: 0,
            decisions: Decisions::default(),
        }
    }

    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    pub fn set_spec(&mut self, spec: LinkSpec) {
        if spec.gilbert_elliott.is_none() {
            self.in_bad_state = false;
        }
        self.spec = spec;
    }

    /// True when nothing but forwarding happens (the forwarder's fast path).
    pub fn is_transparent(&self) -> bool {
        let s = &self.spec;
        s.delay.0 == 0
            && s.jitter.0 == 0
            && s.rate.is_unlimited()
            && s.mean_loss() == 0.0
            && s.reorder.is_never()
            && s.duplicate.is_never()
            && s.corrupt.is_never()
    }

    fn chance(&mut self, probability: f64) -> bool {
        probability > 0.0 && self.rng.random::<f64>() < probability
    }

    fn lost(&mut self) -> bool {
        match self.spec.gilbert_elliott {
            None => {
                let p = self.spec.loss.0;
                self.chance(p)
            }
            Some(model) => {
                // Move the chain, then lose the packet with the new state's rate.
                let flip = if self.in_bad_state {
                    model.r.0
                } else {
                    model.p.0
                };
                if self.chance(flip) {
                    self.in_bad_state = !self.in_bad_state;
                }
                let p = if self.in_bad_state {
                    model.loss_bad.0
                } else {
                    model.loss_good.0
                };
                self.chance(p)
            }
        }
    }

    /// Signed jitter in nanoseconds.
    fn jitter(&mut self) -> i64 {
        let jitter = self.spec.jitter.0 as f64;
        if jitter == 0.0 {
            return 0;
        }
        let sample = match self.spec.jitter_distribution {
            JitterDistribution::Normal => Normal::new(0.0, jitter)
                .map(|d| d.sample(&mut self.rng))
                .unwrap_or(0.0),
            JitterDistribution::Uniform => self.rng.random_range(-jitter..=jitter),
            // Shape 3 (finite variance), shifted to start at zero: the mean of
            // `X − scale` is `scale / (shape − 1)`, so a scale of 2·jitter adds
            // `jitter` on average.
            JitterDistribution::Pareto => Pareto::new(2.0 * jitter, 3.0)
                .map(|d| d.sample(&mut self.rng) - 2.0 * jitter)
                .unwrap_or(0.0),
        };
        sample as i64
    }

    /// The fate of a `len`-byte packet arriving at `now`.
    pub fn admit(&mut self, now: u64, len: usize) -> Fate {
        self.decisions.admitted += 1;
        if self.lost() {
            self.decisions.lost += 1;
            return Fate::Dropped(DropReason::Loss);
        }
        let departure = if self.spec.rate.is_unlimited() {
            now
        } else {
            let rate = self.spec.rate.bytes_per_second() / 1e9;
            let burst = self.spec.effective_burst(self.mtu);
            let limit = self.spec.effective_queue();
            match self.bottleneck.depart(now, len as u64, rate, burst, limit) {
                Some(departure) => departure,
                None => {
                    self.decisions.queue_drops += 1;
                    return Fate::Dropped(DropReason::QueueFull);
                }
            }
        };
        let reordered = self.chance(self.spec.reorder.0);
        let at = if reordered {
            self.decisions.reordered += 1;
            departure
        } else {
            let delayed = (departure + self.spec.delay.0).saturating_add_signed(self.jitter());
            let at = delayed.max(departure).max(self.last_delivery);
            self.last_delivery = at;
            at
        };
        let duplicate = self.chance(self.spec.duplicate.0);
        if duplicate {
            self.decisions.duplicated += 1;
        }
        let corrupt_bit = if self.chance(self.spec.corrupt.0) && len > 0 {
            self.decisions.corrupted += 1;
            Some(self.rng.random_range(0..len * 8))
        } else {
            None
        };
        Fate::Delivered {
            at,
            duplicate,
            corrupt_bit,
            reordered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{GilbertElliott, LinkChanges};
    use crate::units::{BitsPerSecond, Bytes, Nanos, Probability};

    fn spec(changes: LinkChanges) -> LinkSpec {
        changes.apply_to(&LinkSpec::default(), "test").unwrap()
    }

    fn delivered_at(fate: Fate) -> Option<u64> {
        match fate {
            Fate::Delivered { at, .. } => Some(at),
            Fate::Dropped(_) => None,
        }
    }

    #[test]
    fn a_clean_link_delivers_everything_at_once() {
        let mut link = Impairer::new(LinkSpec::default(), 1500, 1, 0);
        assert!(link.is_transparent());
        for i in 0..1000 {
            assert_eq!(delivered_at(link.admit(i * 10, 1500)), Some(i * 10));
        }
    }

    #[test]
    fn delay_and_jitter_keep_order_and_their_mean() {
        let link_spec = spec(LinkChanges {
            delay: Some(Nanos(40_000_000)),
            jitter: Some(Nanos(2_000_000)),
            ..Default::default()
        });
        let mut link = Impairer::new(link_spec, 1500, 7, 0);
        let mut last = 0;
        let mut total_delay = 0u128;
        let n = 20_000u64;
        for i in 0..n {
            // Packets 10 ms apart: jitter rarely has to be clamped for order.
            let now = i * 10_000_000;
            let at = delivered_at(link.admit(now, 100)).unwrap();
            assert!(at >= last, "packet {i} overtook its predecessor");
            last = at;
            total_delay += (at - now) as u128;
        }
        let mean_ms = total_delay as f64 / n as f64 / 1e6;
        assert!((mean_ms - 40.0).abs() < 0.2, "mean delay {mean_ms} ms");
    }

    #[test]
    fn every_jitter_distribution_has_a_mean_near_its_promise() {
        for (distribution, expected_extra_ms) in [
            (JitterDistribution::Normal, 0.0),
            (JitterDistribution::Uniform, 0.0),
            (JitterDistribution::Pareto, 1.0),
        ] {
            let link_spec = spec(LinkChanges {
                delay: Some(Nanos(10_000_000)),
                jitter: Some(Nanos(1_000_000)),
                jitter_distribution: Some(distribution),
                ..Default::default()
            });
            let mut link = Impairer::new(link_spec, 1500, 3, 0);
            let n = 20_000u64;
            let mut total = 0u128;
            for i in 0..n {
                let now = i * 100_000_000;
                total += (delivered_at(link.admit(now, 100)).unwrap() - now) as u128;
            }
            let mean_ms = total as f64 / n as f64 / 1e6;
            assert!(
                (mean_ms - 10.0 - expected_extra_ms).abs() < 0.1,
                "{distribution:?}: mean {mean_ms} ms"
            );
        }
    }

    #[test]
    fn random_loss_matches_its_rate() {
        let mut link = Impairer::new(
            spec(LinkChanges {
                loss: Some(Probability(0.01)),
                ..Default::default()
            }),
            1500,
            11,
            0,
        );
        let n = 200_000;
        let lost = (0..n)
            .filter(|i| delivered_at(link.admit(*i, 100)).is_none())
            .count();
        // Binomial: mean 2000, standard deviation ≈ 44.5; allow four of them.
        assert!((lost as f64 - 2000.0).abs() < 4.0 * 44.5, "lost {lost}");
        assert_eq!(link.decisions.lost, lost as u64);
    }

    #[test]
    fn bursty_loss_has_its_rate_and_burst_length() {
        let model = GilbertElliott::from_rate_and_burst(0.05, 4.0);
        let mut link = Impairer::new(
            spec(LinkChanges {
                gilbert_elliott: Some(model),
                ..Default::default()
            }),
            1500,
            5,
            0,
        );
        let n = 400_000u64;
        let (mut lost, mut bursts, mut in_burst) = (0u64, 0u64, false);
        for i in 0..n {
            let is_lost = delivered_at(link.admit(i, 100)).is_none();
            lost += is_lost as u64;
            if is_lost && !in_burst {
                bursts += 1;
            }
            in_burst = is_lost;
        }
        let rate = lost as f64 / n as f64;
        let mean_burst = lost as f64 / bursts as f64;
        assert!((rate - 0.05).abs() < 0.005, "loss {rate}");
        assert!((mean_burst - 4.0).abs() < 0.3, "burst {mean_burst}");
    }

    #[test]
    fn the_bottleneck_holds_its_rate_and_drops_at_the_tail() {
        // 100 Mbit/s = 12.5 bytes/µs; offer 1500-byte packets at twice that.
        let link_spec = spec(LinkChanges {
            rate: Some(BitsPerSecond(100_000_000)),
            queue: Some(Bytes(150_000)),
            ..Default::default()
        });
        let mut link = Impairer::new(link_spec, 1500, 1, 0);
        let gap = 60_000; // ns between packets: 25 MB/s offered
        let n = 100_000u64;
        let mut last_at = 0;
        let mut delivered = 0u64;
        for i in 0..n {
            if let Some(at) = delivered_at(link.admit(i * gap, 1500)) {
                delivered += 1;
                last_at = at;
            }
        }
        let rate = delivered as f64 * 1500.0 * 8.0 / (last_at as f64 / 1e9);
        assert!((rate / 100e6 - 1.0).abs() < 0.01, "rate {rate}");
        // Half of the offered load cannot fit.
        assert!(link.decisions.queue_drops > n / 3, "{:?}", link.decisions);
        // The queue never holds more than its bound: worst wait = 150 kB at 12.5 B/µs.
        let at = delivered_at(link.admit(n * gap, 1500));
        assert!(at.is_none_or(|at| at - n * gap <= 12_000_000 + 120_000));
    }

    #[test]
    fn below_the_rate_nothing_waits_beyond_serialisation() {
        let link_spec = spec(LinkChanges {
            rate: Some(BitsPerSecond(1_000_000_000)),
            ..Default::default()
        });
        let mut link = Impairer::new(link_spec, 1500, 1, 0);
        for i in 0..10_000u64 {
            let now = i * 100_000; // 120 Mbit/s offered
            assert_eq!(delivered_at(link.admit(now, 1500)), Some(now));
        }
    }

    #[test]
    fn reordering_duplication_and_corruption_happen_at_their_rates() {
        let link_spec = spec(LinkChanges {
            delay: Some(Nanos(10_000_000)),
            reorder: Some(Probability(0.02)),
            duplicate: Some(Probability(0.01)),
            corrupt: Some(Probability(0.005)),
            ..Default::default()
        });
        let mut link = Impairer::new(link_spec, 1500, 9, 0);
        let n = 100_000u64;
        let mut overtakes = 0;
        let mut last = 0;
        for i in 0..n {
            match link.admit(i * 1000, 1000) {
                Fate::Delivered {
                    at, corrupt_bit, ..
                } => {
                    if at < last {
                        overtakes += 1;
                    }
                    last = last.max(at);
                    assert!(corrupt_bit.is_none_or(|bit| bit < 8000));
                }
                Fate::Dropped(_) => panic!("nothing is lost here"),
            }
        }
        let d = link.decisions;
        assert!((d.reordered as f64 - 2000.0).abs() < 4.0 * 44.3, "{d:?}");
        assert!((d.duplicated as f64 - 1000.0).abs() < 4.0 * 31.5, "{d:?}");
        assert!((d.corrupted as f64 - 500.0).abs() < 4.0 * 22.3, "{d:?}");
        assert_eq!(overtakes, d.reordered);
    }

    #[test]
    fn equal_seeds_decide_equally_and_directions_differ() {
        let link_spec = spec(LinkChanges {
            loss: Some(Probability(0.1)),
            jitter: Some(Nanos(1_000_000)),
            delay: Some(Nanos(5_000_000)),
            ..Default::default()
        });
        let run = |seed, stream| {
            let mut link = Impairer::new(link_spec.clone(), 1500, seed, stream);
            (0..5000u64)
                .map(|i| link.admit(i * 10_000_000, 500))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42, 0), run(42, 0));
        assert_ne!(run(42, 0), run(42, 1));
        assert_ne!(run(42, 0), run(43, 0));
    }

    #[test]
    fn a_live_change_keeps_packets_in_flight_in_order() {
        let slow = spec(LinkChanges {
            delay: Some(Nanos(50_000_000)),
            ..Default::default()
        });
        let mut link = Impairer::new(slow, 1500, 1, 0);
        let before = delivered_at(link.admit(0, 100)).unwrap();
        link.set_spec(LinkSpec::default());
        let after = delivered_at(link.admit(1_000, 100)).unwrap();
        assert!(
            after >= before,
            "a packet sent after the change overtook one sent before"
        );
        let later = delivered_at(link.admit(before + 1, 100)).unwrap();
        assert_eq!(later, before + 1);
    }
}
