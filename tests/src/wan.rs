//! Migrations across an emulated wide-area path (`wanem`): the source runs inside the
//! emulator's source namespace, the destination inside its destination namespace, so
//! every byte crosses the emulated link. Also the baseline the WAN benchmark compares
//! against: one plain TCP stream copying the same memory.

use crate::Outcome;
use dwcp_dataplane::codec::policy::CodecPolicy;
use dwcp_dataplane::dirty::{DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{self, DestConfig, DestMemory, SourceConfig};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_dataplane::transport::TransportConfig;
use dwcp_dataplane::transport::socket::{Congestion, SocketOptions};
use dwcp_hugepages::PagePreference;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wanem::probe::Iperf3;
use wanem::scenario::{LinkChanges, Scenario};
use wanem::units::Probability;
use wanem::{Emulator, EmulatorConfig, netns};

/// A guest of `bytes` filled like a real guest's memory, and a one-vCPU workload
/// writing `dirty_rate` bytes per second over `working_set` of it: the guest of the
/// WAN tests and benches.
pub fn filled_guest(
    bytes: usize,
    dirty_rate: f64,
    working_set: f64,
) -> (Arc<GuestMemory>, GuestWorkload) {
    let memory =
        Arc::new(GuestMemory::anonymous(bytes, PagePreference::TransparentHuge).expect("memory"));
    let workload = GuestWorkload {
        dirty_rate,
        working_set,
        vcpus: 1,
        ..GuestWorkload::default()
    };
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
    (memory, workload)
}

/// The emulator for a shipped scenario, its namespaces named after `tag`; `None` (said
/// why) without root.
pub fn emulate(scenario_name: &str, tag: &str) -> Option<Emulator> {
    let scenario = Scenario::built_in(scenario_name).expect("shipped scenario");
    let name = format!("dw{}-{tag}", std::process::id() % 100_000);
    match Emulator::start(EmulatorConfig::new(&name, scenario)) {
        Ok(emulator) => Some(emulator),
        Err(wanem::Error::NotRoot) => {
            crate::skip("the WAN emulator needs root (network namespaces, TUN devices)");
            None
        }
        Err(e) => panic!("emulator: {e}"),
    }
}

/// Live settings for a driven migration across the emulator: the source's, codecs off
/// (the runs compare the link and the engine, not the codec policy).
pub fn live_settings(source: &SourceConfig) -> engine::LiveSettings {
    engine::LiveSettings {
        codec: dwcp_dataplane::codec::policy::CodecMode::Off,
        ..engine::LiveSettings::from_config(source)
    }
}

/// Take the emulated path out for `outage` (every packet dropped both ways), then
/// restore the scenario's link.
pub fn path_out_for(emulator: &Emulator, outage: Duration) {
    let changes = LinkChanges {
        loss: Some(Probability(1.0)),
        ..LinkChanges::default()
    };
    emulator
        .change(None, &changes)
        .unwrap_or_else(|e| panic!("the emulator refused a change: {e:?}"));
    std::thread::sleep(outage);
    // Back to the scenario's own link, its loss included.
    emulator.switch_to(&emulator.config().scenario);
}

/// Settings for a long or lossy path (what internet mode means): many streams so one
/// loss stalls a small share of the data, BBR so random loss is not read as congestion,
/// and the codec policy free to compress.
pub fn internet_profile() -> (SourceConfig, DestConfig) {
    let transport = TransportConfig {
        socket: SocketOptions {
            congestion: Congestion::Bbr,
            ..SocketOptions::default()
        },
        ..TransportConfig::default()
    };
    let source = SourceConfig {
        streams: 16,
        transport: transport.clone(),
        // Every round trip of the final exchange is part of the downtime; on a
        // 600 ms path the default limit could never be met.
        downtime_limit: Duration::from_secs(2),
        ..SourceConfig::default()
    };
    let dest = DestConfig {
        transport,
        ..DestConfig::default()
    };
    (source, dest)
}

/// Runs `serve` on a thread inside the emulator's destination namespace, on a listener
/// bound there; returns the listener's address and the thread.
fn serve_in_destination<T: Send + 'static>(
    emulator: &Emulator,
    serve: impl FnOnce(TcpListener) -> T + Send + 'static,
) -> (SocketAddr, std::thread::JoinHandle<T>) {
    let namespace = emulator.destination_namespace();
    let address = emulator.destination_address();
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        netns::enter(&namespace).expect("enter the destination namespace");
        let listener = TcpListener::bind(SocketAddr::from((address, 0))).expect("listener");
        address_tx
            .send(listener.local_addr().expect("address"))
            .expect("hand over the address");
        serve(listener)
    });
    (address_rx.recv().expect("destination address"), thread)
}

/// Migrates `memory` (already filled) while `workload` writes to it, from the source
/// side of `emulator` to its destination side. Returns the outcome and the time from
/// the start of the migration to its end.
pub fn migrate_across<'a>(
    emulator: &Emulator,
    memory: Arc<GuestMemory>,
    workload: &GuestWorkload,
    dirty: DirtyLogKind,
    source: &'a SourceConfig,
    dest: &DestConfig,
    policy: Option<&'a mut dyn CodecPolicy>,
) -> (Outcome, f64) {
    migrate_across_live(
        emulator, memory, workload, dirty, source, dest, policy, None,
    )
}

/// [`migrate_across`] driven live: `drive` runs on a thread of its own while the
/// migration runs, with the migration's live control (epoch 1 is `settings`) and its
/// reports; `policy`, when given, chooses the codecs (when the settings' codec mode
/// lets it).
#[allow(clippy::too_many_arguments)]
pub fn migrate_across_driven(
    emulator: &Emulator,
    memory: Arc<GuestMemory>,
    workload: &GuestWorkload,
    source: &SourceConfig,
    dest: &DestConfig,
    settings: engine::LiveSettings,
    policy: Option<&mut dyn CodecPolicy>,
    drive: impl FnOnce(&engine::LiveControl, &crossbeam::channel::Receiver<engine::LiveReport>) + Send,
) -> (Outcome, f64) {
    let (reports_tx, reports) = engine::LiveControl::report_channel(1024);
    let live = engine::LiveControl::new(1, settings, Some(reports_tx));
    std::thread::scope(|scope| {
        let driver = scope.spawn(|| drive(&live, &reports));
        let result = migrate_across_live(
            emulator,
            memory,
            workload,
            DirtyLogKind::Uffd,
            source,
            dest,
            // Re-typed to the scope's lifetime, which the migration's borrows share.
            policy.map(|p| p as &mut dyn CodecPolicy),
            Some(&live),
        );
        if let Err(panic) = driver.join() {
            std::panic::resume_unwind(panic);
        }
        result
    })
}

#[allow(clippy::too_many_arguments)]
fn migrate_across_live<'a>(
    emulator: &Emulator,
    memory: Arc<GuestMemory>,
    workload: &GuestWorkload,
    dirty: DirtyLogKind,
    source: &'a SourceConfig,
    dest: &DestConfig,
    policy: Option<&'a mut dyn CodecPolicy>,
    live: Option<&'a engine::LiveControl>,
) -> (Outcome, f64) {
    let opened = open_dirty_log(&memory, dirty).expect("dirty log");
    let guest = SimulatedGuest::start(memory.clone(), workload, opened.marker.clone());
    let dest_config = dest.clone();
    let (address, receiver) = serve_in_destination(emulator, move |listener| {
        engine::receive(
            &listener,
            DestMemory::Allocate(PagePreference::TransparentHuge),
            &dest_config,
        )
    });
    let source_namespace = emulator.source_namespace();
    let started = Instant::now();
    let source_result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                netns::enter(&source_namespace).expect("enter the source namespace");
                engine::migrate_live(
                    address,
                    memory.clone(),
                    &guest,
                    opened.log,
                    source,
                    policy,
                    live,
                    &mut |_| {},
                )
            })
            .join()
            .expect("source thread")
    });
    let seconds = started.elapsed().as_secs_f64();
    let dest_result = receiver.join().expect("destination thread");
    (
        Outcome {
            source: source_result,
            dest: dest_result,
            memory,
            guest,
        },
        seconds,
    )
}

/// What one plain TCP stream managed.
#[derive(Clone, Copy, Debug)]
pub struct PlainCopy {
    /// Bytes the receiver got.
    pub bytes: u64,
    /// From connecting to the receiver's last byte (or to the time limit).
    pub seconds: f64,
    /// All of the memory arrived before the time limit.
    pub complete: bool,
}

impl PlainCopy {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

/// Copies `memory` over one TCP stream with the kernel's default settings (its default
/// congestion control and buffer autotuning), source side to destination side, for at
/// most `time_limit`: memory to memory, as a plain copy would — the receiver reads
/// straight into fresh guest-sized memory, faulting it in as the bytes arrive.
pub fn plain_copy(emulator: &Emulator, memory: &GuestMemory, time_limit: Duration) -> PlainCopy {
    let total = memory.len() as u64;
    let (address, receiver) = serve_in_destination(emulator, move |listener| {
        let destination = GuestMemory::anonymous(total as usize, PagePreference::TransparentHuge)
            .expect("destination memory");
        // SAFETY: this thread is the only user of `destination`, which outlives the
        // slice; the mapping is `total` bytes long.
        let target =
            unsafe { std::slice::from_raw_parts_mut(destination.as_ptr(), total as usize) };
        let (mut stream, _) = listener.accept().expect("accept");
        let started = Instant::now();
        let mut received = 0usize;
        while received < target.len() {
            let end = (received + (1 << 20)).min(target.len());
            match stream.read(&mut target[received..end]) {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
        (received as u64, started.elapsed().as_secs_f64())
    });
    netns::run_in(&emulator.source_namespace(), || {
        let mut stream = TcpStream::connect(address)?;
        let started = Instant::now();
        let mut chunk = vec![0u8; 1 << 20];
        let pages_per_chunk = chunk.len() as u64 / 4096;
        let mut page = 0;
        while page < memory.pages() && started.elapsed() < time_limit {
            let count = pages_per_chunk.min(memory.pages() - page);
            for i in 0..count {
                let at = (i as usize) * 4096;
                memory.read_page(page + i, &mut chunk[at..at + 4096]);
            }
            stream.write_all(&chunk[..count as usize * 4096])?;
            page += count;
        }
        // Cut short: stop now rather than drain what the socket still holds.
        stream.shutdown(std::net::Shutdown::Both)
    })
    .expect("plain copy");
    let (bytes, seconds) = receiver.join().expect("receiver");
    PlainCopy {
        bytes,
        seconds,
        complete: bytes == total,
    }
}

/// `iperf3` with one stream from the source side for `seconds`: the path's own figure
/// for a single TCP connection, in bits per second (`None` when iperf3 did not run).
pub fn iperf3_one_stream(emulator: &Emulator, seconds: u32) -> Option<f64> {
    Iperf3::one_stream(seconds)
        .run(
            &emulator.source_namespace(),
            &emulator.destination_namespace(),
            emulator.destination_address(),
        )
        .ok()?
        .received_bits_per_second()
}

/// Two namespaces joined by a plain veth pair (the kernel forwarding, nothing in
/// userspace) at `mtu`: the baseline for the emulator's own cost. Removed on drop.
pub struct VethPair {
    pub names: [String; 2],
    pub addresses: [std::net::Ipv4Addr; 2],
}

impl VethPair {
    pub fn create(prefix: &str, mtu: u32) -> Result<VethPair, String> {
        let names = [format!("{prefix}-a"), format!("{prefix}-b")];
        let addresses = [
            std::net::Ipv4Addr::new(10, 78, 0, 1),
            std::net::Ipv4Addr::new(10, 78, 0, 2),
        ];
        for name in &names {
            if netns::exists(name) {
                return Err(format!("namespace {name} already exists"));
            }
        }
        let pair = VethPair { names, addresses };
        let [a, b] = &pair.names;
        netns::create(a)?;
        netns::create(b)?;
        netns::ip(&[
            "-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", b,
        ])?;
        let mtu = mtu.to_string();
        for (name, device, address) in [
            (a, "veth0", pair.addresses[0]),
            (b, "veth1", pair.addresses[1]),
        ] {
            netns::ip(&["-n", name, "link", "set", "lo", "up"])?;
            netns::ip(&["-n", name, "link", "set", device, "mtu", &mtu, "up"])?;
            netns::ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                device,
            ])?;
        }
        Ok(pair)
    }
}

impl VethPair {
    /// Caps the first side's sending with the kernel's token bucket (`tc tbf`) at
    /// `rate_bits` per second, with a bucket of `burst_bytes` and at most
    /// `queue_bytes` waiting: the kernel's own shaper, as a baseline for the
    /// emulator's bottleneck.
    pub fn shape(&self, rate_bits: u64, burst_bytes: u64, queue_bytes: u64) -> Result<(), String> {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &self.names[0]])
            .args(["tc", "qdisc", "replace", "dev", "veth0", "root", "tbf"])
            .args(["rate", &format!("{rate_bits}bit")])
            .args(["burst", &format!("{burst_bytes}b")])
            .args(["limit", &format!("{queue_bytes}b")])
            .output()
            .map_err(|e| format!("tc did not run: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tc tbf on {}: {}",
                self.names[0],
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for name in &self.names {
            netns::delete(name);
        }
    }
}
