//! Measuring a path from outside, as an operator would: `ping` for the round trip and
//! `iperf3` for TCP throughput, each run inside the namespaces at either end. The
//! emulator's validation tests and the benchmarks that compare paths share these, so a
//! figure means the same wherever it is printed. Needs root and both tools.

use crate::Emulator;
use crate::forward::Direction;
use crate::scenario::{LinkChanges, LinkSpec, Scenario};
use crate::units::Probability;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The round trip of each of `count` pings from `namespace` to `address`, in
/// milliseconds, in the order they came back (lost pings are missing).
pub fn ping_rtts_ms(namespace: &str, address: Ipv4Addr, count: u32) -> Result<Vec<f64>, String> {
    let output = Command::new("ip")
        .args(["netns", "exec", namespace])
        .args(["ping", "-n", "-i", "0.2", "-W", "5"])
        .args(["-c", &count.to_string(), &address.to_string()])
        .output()
        .map_err(|e| format!("ping did not run: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|line| line.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    if rtts.is_empty() {
        return Err(format!("no ping came back:\n{text}"));
    }
    Ok(rtts)
}

/// The middle value (the upper one of the two for an even count); `NaN` when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One `iperf3` transfer from a client namespace to a server in another.
#[derive(Clone, Debug)]
pub struct Iperf3 {
    pub seconds: u32,
    /// Seconds of start-up left out of the figures (`-O`).
    pub omit: u32,
    pub streams: u32,
    /// The congestion control (`-C`); the system's default when `None`.
    pub congestion: Option<String>,
}

impl Iperf3 {
    /// One stream for `seconds`, nothing omitted, the default congestion control.
    pub fn one_stream(seconds: u32) -> Iperf3 {
        Iperf3 {
            seconds,
            omit: 0,
            streams: 1,
            congestion: None,
        }
    }

    /// Settings that fill the bottleneck of `scenario`'s path: eight cubic streams
    /// (cubic fills a cap exactly; BBR v1 flows overrun a BDP-sized queue and leave a
    /// tenth of the link idle), start-up left out (some twenty round trips for eight
    /// streams to settle on their shares, 3–8 s), measured over fifteen round trips
    /// and at least 6 s (long paths deliver in bursts a round trip long).
    pub fn filling(scenario: &Scenario) -> Iperf3 {
        let rtt = scenario.base_rtt().as_secs_f64();
        Iperf3 {
            seconds: (rtt * 15.0).ceil().max(6.0) as u32,
            omit: (rtt * 20.0).ceil().clamp(3.0, 8.0) as u32,
            streams: 8,
            congestion: Some("cubic".into()),
        }
    }

    /// Runs the transfer and returns iperf3's report.
    pub fn run(
        &self,
        client: &str,
        server: &str,
        address: Ipv4Addr,
    ) -> Result<Iperf3Report, String> {
        let address = address.to_string();
        let mut server = Command::new("ip")
            .args(["netns", "exec", server])
            .args(["iperf3", "-s", "-1", "-J", "-B", &address])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("iperf3 server did not start: {e}"))?;
        // The server has to be listening before the client connects.
        std::thread::sleep(Duration::from_millis(300));
        let mut client_command = Command::new("ip");
        client_command
            .args(["netns", "exec", client])
            .args(["iperf3", "-J", "--get-server-output", "-c", &address])
            .args(["-t", &self.seconds.to_string()])
            .args(["-O", &self.omit.to_string()])
            .args(["-P", &self.streams.to_string()]);
        if let Some(congestion) = &self.congestion {
            client_command.args(["-C", congestion]);
        }
        let output = client_command.output();
        let _ = server.kill();
        let _ = server.wait();
        let output = output.map_err(|e| format!("iperf3 client did not run: {e}"))?;
        let report = serde_json::from_slice(&output.stdout).map_err(|e| {
            format!(
                "iperf3 printed no report ({e}): {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        Ok(Iperf3Report { report })
    }
}

/// What `iperf3 -J --get-server-output` printed.
pub struct Iperf3Report {
    report: serde_json::Value,
}

impl Iperf3Report {
    /// The receiver's total over the whole transfer, in bit/s.
    pub fn received_bits_per_second(&self) -> Option<f64> {
        self.report["end"]["sum_received"]["bits_per_second"].as_f64()
    }

    /// Goodput as the receiver saw it, in bit/s: the median of its one-second intervals
    /// after the omitted start-up, leaving out the last one (the transfer ends inside
    /// it). `None` with fewer than three such intervals.
    ///
    /// Both ends' totals mislead on long paths: the sender counts what entered its
    /// socket buffers, the receiver's total includes the closing round trips. The
    /// median is not tilted by a receiver that reads a backlog in one interval (its
    /// socket buffers hold up to a round trip of data).
    pub fn median_interval_bits_per_second(&self) -> Option<f64> {
        let intervals = self.report["server_output_json"]["intervals"].as_array()?;
        let counted: Vec<f64> = intervals
            .iter()
            .map(|interval| &interval["sum"])
            .filter(|sum| sum["omitted"] != serde_json::Value::Bool(true))
            .filter_map(|sum| Some((sum["bytes"].as_f64()?, sum["seconds"].as_f64()?)))
            .filter(|(_, seconds)| *seconds > 0.9)
            .map(|(bytes, seconds)| bytes * 8.0 / seconds)
            .collect();
        let counted = &counted[..counted.len().saturating_sub(1)];
        (counted.len() >= 3).then(|| median(counted))
    }
}

/// The most TCP payload a cap of `cap_bits_per_second` carries at `mtu`: the cap
/// counts IP packets, and TCP's payload is the packet less 52 bytes (IP and TCP headers
/// with timestamps).
pub fn tcp_payload_rate(cap_bits_per_second: f64, mtu: u32) -> f64 {
    cap_bits_per_second * (mtu - 52) as f64 / mtu as f64
}

/// A bulk transfer through a path's forward bottleneck.
#[derive(Clone, Copy, Debug)]
pub struct BottleneckFill {
    /// Goodput as the receiver saw it (the median interval), bit/s.
    pub goodput: f64,
    /// The most TCP payload the cap carries, bit/s.
    pub payload_cap: f64,
}

impl BottleneckFill {
    pub fn ratio(&self) -> f64 {
        self.goodput / self.payload_cap
    }
}

/// Fills the emulator's forward bottleneck with [`Iperf3::filling`]; `None` when the
/// path has no cap. Where the path also loses packets, TCP's response to loss would be
/// the limit, not the cap: the loss is switched off live for the transfer and put back
/// after it.
pub fn fill_bottleneck(emulator: &Emulator) -> Result<Option<BottleneckFill>, String> {
    fill_bottleneck_with(emulator, Iperf3::filling(&emulator.config().scenario))
}

/// [`fill_bottleneck`] with other transfer settings (a check that the cap is never
/// exceeded needs the streams past slow start, not settled on their shares).
pub fn fill_bottleneck_with(
    emulator: &Emulator,
    transfer: Iperf3,
) -> Result<Option<BottleneckFill>, String> {
    let scenario = &emulator.config().scenario;
    let Some(cap) = scenario.forward_cap() else {
        return Ok(None);
    };
    let lossy = scenario.forward.mean_loss() > 0.0 || scenario.reverse.mean_loss() > 0.0;
    let no_loss = LinkChanges {
        loss: Some(Probability::NEVER),
        ..Default::default()
    };
    if lossy {
        emulator
            .change(None, &no_loss)
            .map_err(|e| format!("switching the loss off: {}", e.join("; ")))?;
    }
    let report = transfer.run(
        &emulator.source_namespace(),
        &emulator.destination_namespace(),
        emulator.destination_address(),
    );
    if lossy {
        for (direction, spec) in [
            (Direction::Forward, &scenario.forward),
            (Direction::Reverse, &scenario.reverse),
        ] {
            emulator
                .change(Some(direction), &loss_of(spec))
                .map_err(|e| format!("putting the loss back: {}", e.join("; ")))?;
        }
    }
    let goodput = report?
        .median_interval_bits_per_second()
        .ok_or("too few receiver intervals in the iperf3 report")?;
    Ok(Some(BottleneckFill {
        goodput,
        payload_cap: tcp_payload_rate(cap.0 as f64, scenario.mtu),
    }))
}

/// The change that gives a link `spec`'s loss back.
fn loss_of(spec: &LinkSpec) -> LinkChanges {
    match spec.gilbert_elliott {
        Some(model) => LinkChanges {
            gilbert_elliott: Some(model),
            ..Default::default()
        },
        None => LinkChanges {
            loss: Some(spec.loss),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn goodput_is_the_median_counted_receiver_interval() {
        let interval = |bytes: f64, seconds: f64, omitted: bool| serde_json::json!({"sum": {"bytes": bytes, "seconds": seconds, "omitted": omitted}});
        let report = Iperf3Report {
            report: serde_json::json!({"server_output_json": {"intervals": [
                interval(9e9, 1.0, true),
                interval(1e6, 1.0, false),
                interval(5e6, 1.0, false),
                interval(2e6, 1.0, false),
                interval(1e6, 0.2, false),
                interval(7e6, 1.0, false),
            ]}}),
        };
        // Counted: 1, 5, 2 MB (the omitted one, the short one and the last are not).
        assert_eq!(report.median_interval_bits_per_second(), Some(16e6));
        let too_short = Iperf3Report {
            report: serde_json::json!({"server_output_json": {"intervals": [
                interval(1e6, 1.0, false),
                interval(1e6, 1.0, false),
            ]}}),
        };
        assert_eq!(too_short.median_interval_bits_per_second(), None);
    }
}
