//! The `wan` suite: live migration across each shipped `wanem` scenario.
//!
//! `wan/<scenario>`: dwcp migrating a simulated guest (1 GiB by default, content like
//! a real memory image, a light writer running throughout) against one plain TCP
//! stream copying the same memory with the kernel's default settings, both through
//! the same emulated path; effective throughput is guest bytes over the time from
//! connecting to the last byte (for dwcp: to the destination's verification). The
//! line also carries `iperf3` with one stream, the path's own figure for a single
//! connection.
//!
//! dwcp runs with the settings its mode would choose for the path: the defaults on
//! `datacenter` and `metro`, the internet profile (16 streams, BBR, codecs) beyond.
//! A plain stream that cannot finish within the time limit is measured over that time
//! and its total time projected from its rate (the line says so).
//!
//! `wan/forwarder-clean-1500`: the emulator's own cost — iperf3 (one stream) through a
//! path with no impairment at MTU 1500, against the same through a plain veth pair
//! (the kernel forwarding). The emulator must carry at least 2 Gbit/s.
//!
//! `wan/<scenario>-cap`, for each scenario capped at 1 Gbit/s or less: how fully the
//! emulator's bottleneck is filled — iperf3 (eight cubic streams, loss switched off)
//! through the emulated path, against the same through a veth pair shaped by the
//! kernel's `tc tbf` at the same rate, bucket and queue. The kernel's shaper has no
//! delay in front of it (this machine has no `netem`), so the baseline is the cap
//! without the path's start-up; the line also carries both against the cap's TCP
//! payload rate, and ping's median RTT against the configured one.

use crate::measure::Samples;
use crate::report::{Better, Comparison, Reporter};
use dwcp_control::codec_policy::{ModelPolicy, PolicyConfig};
use dwcp_dataplane::dirty::DirtyLogKind;
use dwcp_dataplane::engine::{DestConfig, SourceConfig};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use dwcp_tests::wan::{VethPair, internet_profile, iperf3_one_stream, migrate_across, plain_copy};
use std::sync::Arc;
use std::time::Duration;
use wanem::probe::{self, Iperf3};
use wanem::scenario::{BUILT_IN, Scenario};
use wanem::{Emulator, EmulatorConfig};

/// What the suite moves and how long the baseline may take.
#[derive(Clone, Copy, Debug)]
pub struct WanPlan {
    pub guest_bytes: usize,
    pub baseline_limit: Duration,
}

/// Scenarios where the target applies: dwcp ≥ 3× one plain stream.
const TARGETS: &[(&str, f64)] = &[("cross-region", 3.0), ("intercontinental", 3.0)];

/// A light writer: a mostly idle guest, the same on every path.
fn workload() -> GuestWorkload {
    GuestWorkload {
        dirty_rate: 4e6,
        working_set: 0.1,
        vcpus: 1,
        ..GuestWorkload::default()
    }
}

/// The settings dwcp's mode policy gives the path.
fn profile(scenario: &str) -> (&'static str, SourceConfig, DestConfig) {
    match scenario {
        "datacenter" | "metro" => ("datacenter", SourceConfig::default(), DestConfig::default()),
        _ => {
            let (source, dest) = internet_profile();
            ("internet", source, dest)
        }
    }
}

pub fn run(plan: WanPlan, out: &mut Reporter) {
    forwarder_cost(out);
    bottleneck_fill(out);
    let wanted: Vec<&str> = BUILT_IN
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| out.wants(&format!("wan/{name}")))
        .collect();
    if wanted.is_empty() {
        return;
    }
    eprintln!(
        "wan: filling a {} MiB guest like a memory image",
        plan.guest_bytes >> 20
    );
    let memory = Arc::new(
        GuestMemory::anonymous(plan.guest_bytes, PagePreference::TransparentHuge)
            .expect("guest memory"),
    );
    let workload = workload();
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
    for name in wanted {
        let scenario = Scenario::built_in(name).expect("shipped scenario");
        let emulator = match Emulator::start(EmulatorConfig::new("dwcpbench", scenario.clone())) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("wan/{name} skipped: {e}");
                continue;
            }
        };
        eprintln!("wan/{name}: {}", scenario.description);
        let iperf3 = iperf3_one_stream(&emulator, 10);
        let plain = plain_copy(&emulator, &memory, plan.baseline_limit);
        let (mode, source, dest) = profile(name);
        let mut policy = ModelPolicy::new(PolicyConfig {
            levels: source.codec.levels.clone(),
            ..PolicyConfig::default()
        });
        let (outcome, seconds) = migrate_across(
            &emulator,
            memory.clone(),
            &workload,
            DirtyLogKind::Uffd,
            &source,
            &dest,
            Some(&mut policy),
        );
        outcome.guest.stop();
        let report = match outcome.source {
            Ok(report) => report,
            Err(e) => {
                eprintln!("wan/{name}: dwcp's migration failed: {e}");
                continue;
            }
        };
        let identical = outcome
            .dest
            .as_ref()
            .is_ok_and(|d| outcome.memory.first_difference(&d.memory).is_none());
        assert!(identical, "wan/{name}: destination differs from the source");
        if std::env::var_os("DWCP_BENCH_VERBOSE").is_some() {
            eprintln!("{report}");
        }
        let guest_mb = plan.guest_bytes as f64 / 1e6;
        let ours = guest_mb / seconds;
        let theirs = plain.bytes_per_second() / 1e6;
        let their_seconds = if plain.complete {
            plain.seconds
        } else {
            guest_mb / theirs
        };
        let mut line = Comparison::new(
            format!("wan/{name}"),
            "MB/s",
            Better::Higher,
            &Samples::from(vec![ours]),
            "tcp-1-stream",
            &Samples::from(vec![theirs]),
        )
        .with_field("ours_seconds", round2(seconds))
        .with_field("theirs_seconds", round2(their_seconds))
        .with_field("theirs_projected", !plain.complete)
        .with_field("wire_mb", round2(report.bytes_sent as f64 / 1e6))
        .with_field("mode", mode)
        .with_field("streams", source.streams)
        .with_field(
            "iperf3_1_stream_mbit",
            iperf3.map_or(serde_json::Value::Null, |b| round2(b / 1e6).into()),
        );
        if let Some(cap) = scenario.forward_cap() {
            line = line.with_field("cap_mbit", cap.0 as f64 / 1e6);
        }
        if let Some((_, target)) = TARGETS.iter().find(|(n, _)| *n == name) {
            line = line.with_target(*target);
        }
        if !plain.complete {
            line = line.with_note(format!(
                "the plain stream moved {:.0} MB in the {} s limit; its time is projected from that rate",
                plain.bytes as f64 / 1e6,
                plan.baseline_limit.as_secs()
            ));
        }
        out.emit(line);
        drop(emulator);
    }
}

/// iperf3 through a clean emulated path against a veth pair, median of three each,
/// alternating.
fn forwarder_cost(out: &mut Reporter) {
    const NAME: &str = "wan/forwarder-clean-1500";
    if !out.wants(NAME) {
        return;
    }
    let (mut ours, mut theirs) = (Samples::default(), Samples::default());
    for _ in 0..3 {
        let emulator =
            match Emulator::start(EmulatorConfig::new("dwcpbench", Scenario::clean("clean"))) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("{NAME} skipped: {e}");
                    return;
                }
            };
        let Some(through_emulator) = iperf3_one_stream(&emulator, 5) else {
            eprintln!("{NAME} skipped: iperf3 did not run");
            return;
        };
        drop(emulator);
        let veth = match VethPair::create("dwcpveth", 1500) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{NAME} skipped: {e}");
                return;
            }
        };
        let Some(through_veth) = Iperf3::one_stream(5)
            .run(&veth.names[0], &veth.names[1], veth.addresses[1])
            .ok()
            .and_then(|report| report.received_bits_per_second())
        else {
            eprintln!("{NAME} skipped: iperf3 did not run");
            return;
        };
        ours.push(through_emulator / 1e9);
        theirs.push(through_veth / 1e9);
    }
    let line = Comparison::new(NAME, "Gbit/s", Better::Higher, &ours, "veth-pair", &theirs)
        .with_field("required_gbit", 2.0)
        .with_note("iperf3, one stream, MTU 1500; the emulator forwards every packet in userspace");
    out.emit(line);
}

/// Runs per figure of `wan/<scenario>-cap`, alternating the emulator and the kernel.
const CAP_RUNS: usize = 3;

/// Goodput through each capped scenario's bottleneck against the kernel's shaper.
fn bottleneck_fill(out: &mut Reporter) {
    for (name, _) in BUILT_IN {
        let bench = format!("wan/{name}-cap");
        let scenario = Scenario::built_in(name).expect("shipped scenario");
        let Some(cap) = scenario.forward_cap().filter(|cap| cap.0 <= 1_000_000_000) else {
            continue;
        };
        if !out.wants(&bench) {
            continue;
        }
        let link = &scenario.forward;
        let payload_cap = probe::tcp_payload_rate(cap.0 as f64, scenario.mtu);
        let (mut ours, mut theirs, mut rtts) = (Samples::default(), Samples::default(), vec![]);
        for _ in 0..CAP_RUNS {
            let emulator = match Emulator::start(EmulatorConfig::new("dwcpbench", scenario.clone()))
            {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("{bench} skipped: {e}");
                    return;
                }
            };
            if let Ok(more) = probe::ping_rtts_ms(
                &emulator.source_namespace(),
                emulator.destination_address(),
                5,
            ) {
                rtts.extend(more);
            }
            let fill = match probe::fill_bottleneck(&emulator) {
                Ok(Some(fill)) => fill,
                Ok(None) => unreachable!("the scenario is capped"),
                Err(e) => {
                    eprintln!("{bench} skipped: {e}");
                    return;
                }
            };
            drop(emulator);
            let shaped = VethPair::create("dwcpveth", scenario.mtu).and_then(|veth| {
                veth.shape(
                    cap.0,
                    link.effective_burst(scenario.mtu),
                    link.effective_queue(),
                )?;
                Iperf3::filling(&scenario)
                    .run(&veth.names[0], &veth.names[1], veth.addresses[1])?
                    .median_interval_bits_per_second()
                    .ok_or_else(|| "too few receiver intervals in the iperf3 report".to_string())
            });
            let shaped = match shaped {
                Ok(goodput) => goodput,
                Err(e) => {
                    eprintln!("{bench} skipped: {e}");
                    return;
                }
            };
            ours.push(fill.goodput / 1e6);
            theirs.push(shaped / 1e6);
        }
        let line = Comparison::new(
            bench,
            "Mbit/s",
            Better::Higher,
            &ours,
            "tc-tbf-veth",
            &theirs,
        )
        .with_field("cap_mbit", cap.0 as f64 / 1e6)
        .with_field("ours_of_payload_cap", round3(ours.median() * 1e6 / payload_cap))
        .with_field(
            "theirs_of_payload_cap",
            round3(theirs.median() * 1e6 / payload_cap),
        )
        .with_field("ping_median_ms", round2(probe::median(&rtts)))
        .with_field("configured_rtt_ms", scenario.base_rtt().as_millis_f64())
        .with_note(
            "iperf3, 8 cubic streams, start-up omitted, median receiver second; tbf has no delay in front of it",
        );
        out.emit(line);
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
