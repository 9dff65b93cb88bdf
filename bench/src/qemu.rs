//! The `qemu` suite: the same QEMU guest migrated by QEMU's own migration and by dwcp,
//! on the same machine, in the same run.
//!
//! The guest: the test guest's recipe with a mixed workload close to a real Linux
//! guest (512 MiB by default): 64 MiB of self-describing pages whose first 16 MiB are
//! rewritten continuously (20 MB/s), and 320 MiB written once like a memory image
//! (text, records, random bytes, 34% zero pages); the rest is what the guest's kernel
//! holds or never touched. Each run boots a fresh VM pair (the source, and the
//! destination waiting with `-incoming defer`), lets the workload warm up, then
//! migrates. Configurations alternate run by run:
//! - QEMU `precopy`, `multifd4` (4 channels), `multifd4-zstd`, over TCP, at the same
//!   downtime limit, `max-bandwidth` unlimited; and `multifd4-tls`, multifd over TLS
//!   with mutual x509 authentication, as dwcp's sessions always are;
//! - dwcp: `dwcpd dest --qmp` and `dwcpd source --qmp` (its own policy; the VM's RAM
//!   moves through the appliances, QEMU moves only the device state).
//!
//! Every figure is measured the same way for both:
//! - time: from the migrate command (QMP `migrate`, or starting `dwcpd source`) to the
//!   destination VM running (its `RESUME` event, waited for rather than polled);
//! - downtime: from the source QEMU's `STOP` event to the destination QEMU's `RESUME`
//!   event (QEMU's own timestamps; both QEMUs run on this host). QEMU's own `downtime`
//!   figure (its stop to the end of its stream) is carried beside it;
//! - source CPU: CPU seconds of the migration on the source host: QEMU's migration
//!   threads (its process's CPU less that of the threads it had before: the vCPU, the
//!   main loop), plus, for dwcp, the whole `dwcpd source` process;
//! - destination CPU: the destination QEMU's CPU from the migrate command to its guest
//!   running (its vCPUs wait meanwhile: this is the incoming migration's work, all of
//!   it for QEMU, the device state's load for dwcp), plus, for dwcp, the whole
//!   `dwcpd dest` process. Both sides share this host's cores with the source guest's
//!   vCPU, so their sum (`qemu/loopback-cpu-vs-multifd4`) is what sets the pace;
//! - bytes on the wire: QEMU's `transferred`; dwcp's frames and device state.
//!
//! `qemu/loopback-*-vs-multifd4` compare dwcp with QEMU's multifd (4 channels) on
//! loopback; `qemu/loopback-time-vs-multifd4-tls` with the same encrypted and
//! authenticated, like dwcp's sessions (the loopback time is CPU-bound on two cores,
//! and encryption is a large part of either side's CPU). `qemu/<scenario>-time-vs-best`
//! run both through a `wanem` scenario (QEMU's sockets and the appliances in the
//! emulator's namespaces) against QEMU's quickest configuration there; on those paths
//! both use a 300 ms downtime limit (QEMU's default), since every round trip of a 20 ms
//! limit's switchover is longer than it.

use crate::measure::Samples;
use crate::report::{Better, Comparison, Reporter};
use dwcp_control::qemu::Qmp;
use dwcp_qemu_guest::host::{GuestImage, RamBacking, Vm, VmSpec};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wanem::scenario::Scenario;
use wanem::{Emulator, EmulatorConfig};

/// What the suite runs.
#[derive(Debug, Clone)]
pub struct QemuPlan {
    /// Guest RAM, MiB.
    pub guest_mib: u64,
    /// The downtime limit on loopback, ms.
    pub downtime_ms: u64,
    /// Runs of each configuration.
    pub runs: usize,
    /// Where the VMs' RAM files go (a tmpfs or hugetlbfs directory).
    pub ram_dir: PathBuf,
    /// QEMU's configurations to run (all of [`QEMU_CONFIGS`] when empty).
    pub qemu_configs: Vec<String>,
}

/// QEMU's configurations, by name.
pub const QEMU_CONFIGS: &[&str] = &["precopy", "multifd4", "multifd4-zstd", "multifd4-tls"];
/// The downtime limit on emulated WAN paths, ms (QEMU's default).
const WAN_DOWNTIME_MS: u64 = 300;
/// Longest any one migration may take before it counts as failed.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(600);

/// One migration's figures.
#[derive(Debug, Clone, Default)]
struct Run {
    seconds: f64,
    downtime_ms: f64,
    /// QEMU's own figure (dwcp: QEMU's part only).
    qemu_downtime_ms: f64,
    src_cpu_seconds: f64,
    dst_cpu_seconds: f64,
    wire_bytes: f64,
    /// For dwcp: the report's own downtime parts.
    detail: Option<String>,
}

fn workload(guest_mib: u64) -> String {
    let ballast = (guest_mib * 5 / 8).saturating_sub(64).max(16);
    format!("dwcp.mib=64 dwcp.hot=4096 dwcp.rate=5000 dwcp.check_s=5 dwcp.ballast_mib={ballast}")
}

/// Where a VM pair's sockets go.
fn run_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dwcp-bench-qemu-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("run directory");
    dir
}

/// A source VM with its workload warm, and a destination VM waiting.
fn boot_pair(
    image: &GuestImage,
    plan: &QemuPlan,
    netns: Option<(&str, &str)>,
) -> Result<(Vm, Vm), String> {
    let dir = run_dir("pair");
    let spec = |name: &str, incoming: bool, ns: Option<&str>| VmSpec {
        name: name.into(),
        memory_mib: plan.guest_mib,
        workload: workload(plan.guest_mib),
        incoming,
        ram: RamBacking::SharedFile,
        stopped: false,
        dir: dir.clone(),
        netns: ns.map(str::to_string),
        ram_dir: Some(plan.ram_dir.clone()),
    };
    let src = Vm::boot(image, &spec("src", false, netns.map(|n| n.0)))?;
    let dst = Vm::boot(image, &spec("dst", true, netns.map(|n| n.1)))?;
    // Warm: the ballast written, the hot set rewritten for a few seconds.
    let ready = Instant::now();
    while !src.console().contains("dwcp-guest: ready") {
        if ready.elapsed() > Duration::from_secs(300) {
            return Err("the guest never finished filling its memory".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = src.wait_for_heartbeat(Duration::from_secs(60), |_| true)?;
    src.wait_for_heartbeat(Duration::from_secs(60), |b| b.seq >= first.seq + 3)?;
    Ok((src, dst))
}

/// The bench's own QMP connection (the observer socket: the appliances use the other).
fn qmp(vm: &Vm) -> Result<Qmp, String> {
    Qmp::connect(&vm.observer_qmp, Duration::from_secs(10)).map_err(|e| e.to_string())
}

/// CPU seconds of a process (all its threads, the finished ones included) and of each
/// live thread.
fn cpu_seconds(pid: u32) -> (f64, BTreeMap<u32, f64>) {
    let ticks = 100.0; // USER_HZ on Linux.
    let parse = |path: PathBuf| -> Option<f64> {
        let stat = std::fs::read_to_string(path).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / ticks)
    };
    let total = parse(PathBuf::from(format!("/proc/{pid}/stat"))).unwrap_or(0.0);
    let mut threads = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            if let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>()
                && let Some(s) = parse(entry.path().join("stat"))
            {
                threads.insert(tid, s);
            }
        }
    }
    (total, threads)
}

/// CPU a QEMU process spent since `before` in threads it did not have then (its
/// migration threads, finished or not).
fn new_threads_cpu(pid: u32, before: &(f64, BTreeMap<u32, f64>)) -> f64 {
    let (total, threads) = cpu_seconds(pid);
    let old_threads: f64 = before
        .1
        .iter()
        .filter_map(|(tid, then)| threads.get(tid).map(|now| now - then))
        .sum();
    (total - before.0 - old_threads).max(0.0)
}

/// The moment a QMP event happened, wall clock seconds.
fn event_time(events: &[Value], name: &str) -> Option<f64> {
    events
        .iter()
        .rev()
        .find(|e| e["event"] == name)
        .and_then(|e| {
            let t = &e["timestamp"];
            Some(t["seconds"].as_f64()? + t["microseconds"].as_f64()? / 1e6)
        })
}

/// The downtime as QEMU saw it: from the source's `STOP` event to the destination's
/// `RESUME` (`dst_events`), ms.
fn stop_to_resume_ms(src: &mut Qmp, dst_events: &[Value]) -> Result<f64, String> {
    // Events are read with replies: one more command brings in those still queued.
    src.run_state().map_err(|e| e.to_string())?;
    let src_events = src.take_events();
    match (
        event_time(&src_events, "STOP"),
        event_time(dst_events, "RESUME"),
    ) {
        (Some(stop), Some(resume)) => Ok((resume - stop) * 1e3),
        _ => Err("the STOP or RESUME event is missing".into()),
    }
}

/// How long [`until_running`] waits for an event before it looks at the rest.
const EVENT_WAIT: Duration = Duration::from_millis(2);
/// How often [`until_running`] asks for the run state besides (in case the event was
/// missed, say before the connection was made).
const STATE_ASKED_EVERY: Duration = Duration::from_millis(100);

/// Wait until the destination runs (or `gave_up` says it never will); returns when,
/// and the events seen meanwhile.
///
/// It waits on QEMU's `RESUME` event. Asking for the run state every millisecond, as
/// it did, took the bench and the destination QEMU about 3% of the host's two cores
/// while a migration ran (perf, 0.5 s loopback migration): CPU that either migration
/// being timed could have used.
fn until_running(
    dst: &mut Qmp,
    deadline: Instant,
    mut gave_up: impl FnMut() -> bool,
) -> Result<(Instant, Vec<Value>), String> {
    let mut events = Vec::new();
    let mut given_up_at: Option<Instant> = None;
    let mut asked_at: Option<Instant> = None;
    let mut state = String::new();
    loop {
        if asked_at.is_none_or(|t| t.elapsed() >= STATE_ASKED_EVERY) {
            state = dst.run_state().map_err(|e| e.to_string())?;
            asked_at = Some(Instant::now());
            if state == "running" {
                events.extend(dst.take_events());
                return Ok((Instant::now(), events));
            }
        }
        let event = dst.wait_event(EVENT_WAIT).map_err(|e| e.to_string())?;
        let resumed_at = Instant::now();
        events.extend(dst.take_events());
        if event.is_some_and(|e| e["event"] == "RESUME") {
            return Ok((resumed_at, events));
        }
        if given_up_at.is_none() && gave_up() {
            given_up_at = Some(Instant::now());
        }
        // A migration that ended lets the destination a moment to report running.
        let waited_out = given_up_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2));
        if waited_out || Instant::now() > deadline {
            return Err(format!("the destination VM is still {state}"));
        }
    }
}

/// QEMU's own migration of the pair under `config`.
fn qemu_run(src: &Vm, dst: &Vm, config: &str, downtime_ms: u64, uri: &str) -> Result<Run, String> {
    let mut qs = qmp(src)?;
    let mut qd = qmp(dst)?;
    let err = |e: dwcp_control::qemu::QmpError| e.to_string();
    let multifd = config.starts_with("multifd");
    for q in [&mut qs, &mut qd] {
        if multifd {
            q.enable_capabilities(&["multifd"]).map_err(err)?;
            let mut params = json!({ "multifd-channels": 4 });
            if config.ends_with("zstd") {
                params["multifd-compression"] = json!("zstd");
            }
            q.execute("migrate-set-parameters", params).map_err(err)?;
        }
    }
    if config.ends_with("tls") {
        let dir = tls_credentials()?;
        for (q, endpoint) in [(&mut qs, "client"), (&mut qd, "server")] {
            q.execute(
                "object-add",
                json!({ "qom-type": "tls-creds-x509", "id": "tls0", "dir": dir,
                        "endpoint": endpoint, "verify-peer": true }),
            )
            .map_err(err)?;
        }
        qs.execute(
            "migrate-set-parameters",
            json!({ "tls-creds": "tls0", "tls-hostname": TLS_SERVER_NAME }),
        )
        .map_err(err)?;
        qd.execute("migrate-set-parameters", json!({ "tls-creds": "tls0" }))
            .map_err(err)?;
    }
    qs.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": downtime_ms, "max-bandwidth": 1u64 << 40 }),
    )
    .map_err(err)?;
    qd.execute("migrate-incoming", json!({ "uri": uri }))
        .map_err(err)?;
    let before = cpu_seconds(src.pid());
    let dst_before = cpu_seconds(dst.pid()).0;
    qs.take_events();
    let started = Instant::now();
    qs.execute("migrate", json!({ "uri": uri })).map_err(err)?;
    let (running_at, dst_events) = until_running(
        &mut qd,
        started + MIGRATION_PATIENCE,
        || matches!(qs.migration(), Ok((status, _)) if status == "failed" || status == "cancelled"),
    )?;
    let dst_cpu_seconds = cpu_seconds(dst.pid()).0 - dst_before;
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let (status, info) = qs.migration().map_err(err)?;
        if status == "completed" {
            break info;
        }
        if status == "failed" || Instant::now() > deadline {
            return Err(format!("QEMU's migration {status}: {}", info["error-desc"]));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let downtime_ms = stop_to_resume_ms(&mut qs, &dst_events)?;
    Ok(Run {
        seconds: running_at.duration_since(started).as_secs_f64(),
        downtime_ms,
        qemu_downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        src_cpu_seconds: new_threads_cpu(src.pid(), &before),
        dst_cpu_seconds,
        wire_bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
        detail: None,
    })
}

fn tls_dir() -> PathBuf {
    std::env::temp_dir().join(format!("dwcp-bench-qemu-tls-{}", std::process::id()))
}

/// The name in the destination QEMU's TLS certificate, which the source checks.
const TLS_SERVER_NAME: &str = "dwcp-bench-destination";

/// A directory of x509 credentials as QEMU's `tls-creds-x509` reads them (a CA, a
/// server and a client certificate with their keys), made once per process.
fn tls_credentials() -> Result<String, String> {
    static MADE: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        use dwcp_control::certs::{LabCa, Validity};
        let dir = tls_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ca = LabCa::new("dwcp-bench QEMU CA").map_err(|e| e.to_string())?;
        let validity = Validity::years_from_now(1);
        let (server_cert, server_key) = ca
            .issue_for_qemu(TLS_SERVER_NAME, validity)
            .map_err(|e| e.to_string())?;
        let (client_cert, client_key) = ca
            .issue_for_qemu("dwcp-bench-source", validity)
            .map_err(|e| e.to_string())?;
        for (name, pem) in [
            ("ca-cert.pem", ca.cert_pem()),
            ("server-cert.pem", server_cert),
            ("server-key.pem", server_key),
            ("client-cert.pem", client_cert),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.join(name), pem).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(dir.display().to_string())
    })
    .clone()
}

fn dwcpd() -> PathBuf {
    // Beside this benchmark's own binary (both are built by `cargo build --release`;
    // `cargo build --release -p dwcp-bench` leaves an older one in place).
    let me = std::env::current_exe().expect("own path");
    let dwcpd = me.with_file_name("dwcpd");
    let built = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(ours), Some(theirs)) = (built(&me), built(&dwcpd))
        && theirs < ours
    {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            eprintln!(
                "warning: {} is older than this benchmark: build it too (cargo build --release -p dwcp-control --bin dwcpd)",
                dwcpd.display()
            )
        });
    }
    dwcpd
}

fn in_netns(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Reap a child (waiting for it when `block`) and take its resource usage (CPU of all
/// its threads): `None` while it runs; else how it failed (`None` when it succeeded),
/// and its CPU seconds.
fn reap(pid: u32, block: bool) -> Option<Result<(Option<String>, f64), String>> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for the kernel to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: `pid` is our child, not yet reaped; both pointers are to live locals.
    let got = unsafe { libc::wait4(pid as i32, &mut status, flags, &mut usage) };
    if got == 0 {
        return None;
    }
    if got != pid as i32 {
        return Some(Err(format!("wait4: {}", std::io::Error::last_os_error())));
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let failure = if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status) != 0).then(|| format!("exit {}", libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(format!("killed by signal {}", libc::WTERMSIG(status)))
    } else {
        Some(format!("wait status {status:#x}"))
    };
    Some(Ok((failure, secs(usage.ru_utime) + secs(usage.ru_stime))))
}

/// Where dwcp runs: the namespaces (or none for loopback), the address the
/// destination appliance listens on, and the settings file for the source.
struct DwcpSetup<'a> {
    src_ns: Option<&'a str>,
    dst_ns: Option<&'a str>,
    listen: String,
    config: Option<PathBuf>,
    downtime_ms: u64,
}

/// Certificate flags for the source (`[0]`) and the destination (`[1]`) appliances:
/// a lab set whose destination certificate names the address it listens on. dwcp's
/// sessions run authenticated and encrypted; QEMU's migrations here run without TLS.
fn appliance_cert_args(listen: &str) -> Result<[Vec<String>; 2], String> {
    let host = listen
        .rsplit_once(':')
        .map_or(listen, |(h, _)| h)
        .to_string();
    let dir = std::env::temp_dir().join(format!("dwcp-bench-certs-{}-{host}", std::process::id()));
    let mut addresses = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    if !addresses.contains(&host) {
        addresses.push(host);
    }
    let specs = ["bench-source", "bench-dest"].map(|name| dwcp_control::certs::ApplianceSpec {
        name: name.into(),
        addresses: addresses.clone(),
    });
    let lab = dwcp_control::certs::init(&dir, &specs).map_err(|e| e.to_string())?;
    Ok([0, 1].map(|i| lab.dwcpd_flags(i)))
}

/// dwcp's migration of the pair: `dwcpd dest --qmp` and `dwcpd source --qmp`.
fn dwcp_run(src: &Vm, dst: &Vm, setup: &DwcpSetup<'_>) -> Result<Run, String> {
    let mut qs = qmp(src)?;
    let mut qd = qmp(dst)?;
    let [src_certs, dst_certs] = appliance_cert_args(&setup.listen)?;
    let mut dest = in_netns(setup.dst_ns, &dwcpd())
        .args(["dest", "--listen", &setup.listen, "--qmp"])
        .arg(&dst.qmp)
        .args(&dst_certs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting dwcpd dest: {e}"))?;
    let mut lines = BufReader::new(dest.stderr.take().expect("piped")).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix("dwcpd: receiving on ") {
                    break rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                }
                eprintln!("  dwcpd dest: {line}");
            }
            _ => return Err("dwcpd dest ended before listening".into()),
        }
    };
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("  dwcpd dest: {line}");
        }
    });
    let before = cpu_seconds(src.pid());
    let dst_before = cpu_seconds(dst.pid()).0;
    qs.take_events();
    let started = Instant::now();
    let mut source = in_netns(setup.src_ns, &dwcpd());
    source
        .args(["source", "--json", "--peer", &addr, "--qmp"])
        .arg(&src.qmp)
        .args(&src_certs)
        .args(["--downtime-ms", &setup.downtime_ms.to_string()]);
    if let Some(config) = &setup.config {
        source.arg("--config").arg(config);
    }
    let mut source = source
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting dwcpd source: {e}"))?;
    let pid = source.id();
    let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let reader = read_all(Box::new(source.stdout.take().expect("piped")));
    // Its error, should it fail (the report on stdout is then empty).
    let errors = read_all(Box::new(source.stderr.take().expect("piped")));
    let mut exited: Option<Result<(Option<String>, f64), String>> = None;
    let running = until_running(&mut qd, started + MIGRATION_PATIENCE, || {
        if exited.is_none() {
            exited = reap(pid, false);
        }
        exited.is_some()
    });
    let dst_qemu_cpu = cpu_seconds(dst.pid()).0 - dst_before;
    let (failure, dwcp_cpu) = match exited {
        Some(done) => done,
        None => reap(pid, true).unwrap_or_else(|| Err("dwcpd source vanished".into())),
    }?;
    let text = reader.join().unwrap_or_default();
    let error_text = errors.join().unwrap_or_default();
    // `dwcpd dest` ends with the migration; its CPU comes with its exit status.
    let dest_cpu = match reap(dest.id(), true) {
        Some(Ok((_, cpu))) => cpu,
        _ => f64::NAN,
    };
    // The source's own word first: a destination left waiting is its consequence.
    if let Some(how) = failure {
        let said: Vec<&str> = error_text.lines().collect();
        return Err(format!(
            "dwcpd source failed ({how}): {} {}",
            text.trim(),
            said[said.len().saturating_sub(3)..].join(" / ")
        ));
    }
    let (running_at, dst_events) = running?;
    let report: Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("dwcpd's report: {e}"))?;
    let downtime_ms = stop_to_resume_ms(&mut qs, &dst_events)?;
    let measured = &report["downtime"]["measured"];
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN) * 1e3;
    // Where the time went: setup (connect, handshake, mapping), each round, the rest.
    let round_seconds: Vec<String> = report["rounds"]
        .as_array()
        .map(|rounds| {
            rounds
                .iter()
                .map(|r| format!("{:.3}", r["seconds"].as_f64().unwrap_or(f64::NAN)))
                .collect()
        })
        .unwrap_or_default();
    let detail = format!(
        "setup {:.3} s, rounds [{}] s, dwcpd total {:.3} s; {} rounds; dwcp's downtime {:.1} ms: collect {:.1}, send {:.1}, confirm {:.1}, device state {:.1}; dirty log {}{}",
        report["setup_seconds"].as_f64().unwrap_or(f64::NAN),
        round_seconds.join(", "),
        report["total_seconds"].as_f64().unwrap_or(f64::NAN),
        report["rounds"].as_array().map_or(0, Vec::len),
        ms(&report["measured_downtime"]),
        ms(&measured["collect"]),
        ms(&measured["send"]),
        ms(&measured["confirm"]),
        ms(&measured["device_state"]),
        report["dirty_log"].as_str().unwrap_or("?"),
        report["dirty_scan"]["last_bytes_per_second"]
            .as_f64()
            .map_or(String::new(), |rate| format!(
                " (scans at {:.1} GB/s)",
                rate / 1e9
            ))
    );
    let qemu_figures = report["notes"]
        .as_array()
        .and_then(|n| {
            n.iter()
                .filter_map(Value::as_str)
                .find(|n| n.contains("QEMU's own figures"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let qemu_downtime_ms = qemu_figures
        .split("downtime ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(Run {
        seconds: running_at.duration_since(started).as_secs_f64(),
        downtime_ms,
        qemu_downtime_ms,
        src_cpu_seconds: dwcp_cpu + new_threads_cpu(src.pid(), &before),
        dst_cpu_seconds: dest_cpu + dst_qemu_cpu,
        wire_bytes: report["bytes_sent"].as_f64().unwrap_or(0.0)
            + report["device_state_bytes"].as_f64().unwrap_or(0.0),
        detail: Some(detail),
    })
}

/// Samples of every figure, per configuration.
#[derive(Default)]
struct Figures {
    time: Samples,
    downtime: Samples,
    qemu_downtime: Samples,
    cpu: Samples,
    dst_cpu: Samples,
    /// Source and destination CPU, run by run.
    total_cpu: Samples,
    wire: Samples,
    failures: Vec<String>,
}

impl Figures {
    fn add(&mut self, run: Result<Run, String>, name: &str) {
        match run {
            Ok(r) => {
                eprintln!(
                    "  {name}: {:.2} s, downtime {:.1} ms (QEMU's figure {:.1}), CPU {:.2} s at the source and {:.2} s at the destination, {:.1} MB on the wire{}",
                    r.seconds,
                    r.downtime_ms,
                    r.qemu_downtime_ms,
                    r.src_cpu_seconds,
                    r.dst_cpu_seconds,
                    r.wire_bytes / 1e6,
                    r.detail.map(|d| format!("; {d}")).unwrap_or_default()
                );
                self.time.push(r.seconds);
                self.downtime.push(r.downtime_ms);
                self.qemu_downtime.push(r.qemu_downtime_ms);
                self.cpu.push(r.src_cpu_seconds);
                self.dst_cpu.push(r.dst_cpu_seconds);
                self.total_cpu.push(r.src_cpu_seconds + r.dst_cpu_seconds);
                self.wire.push(r.wire_bytes);
            }
            Err(e) => {
                eprintln!("  {name}: FAILED: {e}");
                self.failures.push(e);
            }
        }
    }
}

/// Every configuration on one path: runs alternate configuration by configuration.
fn measure_path(
    image: &GuestImage,
    plan: &QemuPlan,
    netns: Option<(&str, &str)>,
    dst_addr: &str,
    dwcp: &DwcpSetup<'_>,
    downtime_ms: u64,
) -> BTreeMap<String, Figures> {
    let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
    let configs: Vec<&str> = QEMU_CONFIGS
        .iter()
        .copied()
        .filter(|c| plan.qemu_configs.is_empty() || plan.qemu_configs.iter().any(|w| w == c))
        .chain(["dwcp"])
        .collect();
    for run in 0..plan.runs {
        // Rotate the order run by run, so that no configuration always goes first.
        for i in 0..configs.len() {
            let name = configs[(i + run) % configs.len()];
            let pair = boot_pair(image, plan, netns);
            let result = pair.and_then(|(src, dst)| {
                if name == "dwcp" {
                    dwcp_run(&src, &dst, dwcp)
                } else {
                    let port = 7600 + (run * configs.len() + i) as u16;
                    qemu_run(
                        &src,
                        &dst,
                        name,
                        downtime_ms,
                        &format!("tcp:{dst_addr}:{port}"),
                    )
                }
            });
            figures
                .entry(name.to_string())
                .or_default()
                .add(result, name);
        }
    }
    figures
}

/// A comparison of two sets of samples, or `None` (said on stderr) when a side has
/// none.
fn comparison(
    bench: &str,
    unit: &str,
    ours: &Samples,
    baseline: &str,
    theirs: &Samples,
    target: Option<f64>,
) -> Option<Comparison> {
    if ours.is_empty() || theirs.is_empty() {
        eprintln!("{bench}: no figure (a side failed every run)");
        return None;
    }
    let c = Comparison::new(bench, unit, Better::Lower, ours, baseline, theirs);
    Some(match target {
        Some(t) => c.with_target(t),
        None => c,
    })
}

pub fn run(plan: QemuPlan, out: &mut Reporter) {
    let image = match GuestImage::prepare() {
        Ok(image) => image,
        Err(why) => {
            eprintln!("qemu: skipped: {why}");
            return;
        }
    };
    if out.wants("qemu/loopback") {
        eprintln!(
            "qemu/loopback: {} MiB guest, downtime limit {} ms, {} runs of each",
            plan.guest_mib, plan.downtime_ms, plan.runs
        );
        let dwcp = DwcpSetup {
            src_ns: None,
            dst_ns: None,
            listen: "127.0.0.1:0".into(),
            config: None,
            downtime_ms: plan.downtime_ms,
        };
        let figures = measure_path(&image, &plan, None, "127.0.0.1", &dwcp, plan.downtime_ms);
        loopback_lines(out, &figures);
    }
    for (scenario, bench) in [
        ("cross-region", "qemu/cross-region-time-vs-best"),
        ("intercontinental", "qemu/intercontinental-time-vs-best"),
    ] {
        if !out.wants(bench) {
            continue;
        }
        let Some(built_in) = Scenario::built_in(scenario) else {
            continue;
        };
        let emulator = match Emulator::start(EmulatorConfig::new("dwcpqemu", built_in.clone())) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("{bench} skipped: {e}");
                continue;
            }
        };
        eprintln!("{bench}: {}", built_in.description);
        let (src_ns, dst_ns) = (
            emulator.source_namespace(),
            emulator.destination_namespace(),
        );
        let dst_addr = emulator.destination_address().to_string();
        let config =
            std::env::temp_dir().join(format!("dwcp-bench-qemu-{}.toml", std::process::id()));
        // The internet profile: many streams, BBR, codecs by the policy.
        let _ = std::fs::write(
            &config,
            "[migration]\nstreams = 16\n[transport]\ncongestion = \"bbr\"\n",
        );
        let dwcp = DwcpSetup {
            src_ns: Some(&src_ns),
            dst_ns: Some(&dst_ns),
            listen: format!("{dst_addr}:0"),
            config: Some(config.clone()),
            downtime_ms: WAN_DOWNTIME_MS,
        };
        let figures = measure_path(
            &image,
            &plan,
            Some((&src_ns, &dst_ns)),
            &dst_addr,
            &dwcp,
            WAN_DOWNTIME_MS,
        );
        wan_line(out, bench, &figures);
        drop(emulator);
        let _ = std::fs::remove_file(&config);
    }
    let _ = std::fs::remove_dir_all(tls_dir());
}

fn loopback_lines(out: &mut Reporter, figures: &BTreeMap<String, Figures>) {
    let empty = Figures::default();
    let ours = figures.get("dwcp").unwrap_or(&empty);
    let theirs = figures.get("multifd4").unwrap_or(&empty);
    let others = |pick: &dyn Fn(&Figures) -> f64| -> Value {
        let mut m = serde_json::Map::new();
        for (name, f) in figures {
            m.insert(name.clone(), json!(pick(f)));
        }
        Value::Object(m)
    };
    let lines = [
        (
            "qemu/loopback-time-vs-multifd4",
            "s",
            &ours.time,
            &theirs.time,
            Some(1.0),
        ),
        (
            "qemu/loopback-downtime-vs-multifd4",
            "ms",
            &ours.downtime,
            &theirs.downtime,
            None,
        ),
        (
            "qemu/loopback-srccpu-vs-multifd4",
            "CPU s",
            &ours.cpu,
            &theirs.cpu,
            None,
        ),
        (
            "qemu/loopback-cpu-vs-multifd4",
            "CPU s",
            &ours.total_cpu,
            &theirs.total_cpu,
            None,
        ),
    ];
    for (bench, unit, o, t, target) in lines {
        if let Some(mut c) = comparison(bench, unit, o, "qemu-multifd4", t, target) {
            c = c
                .with_field("time_s", others(&|f| round3(f.time.median())))
                .with_field("downtime_ms", others(&|f| round3(f.downtime.median())))
                .with_field(
                    "qemu_downtime_ms",
                    others(&|f| round3(f.qemu_downtime.median())),
                )
                .with_field("src_cpu_s", others(&|f| round3(f.cpu.median())))
                .with_field("dst_cpu_s", others(&|f| round3(f.dst_cpu.median())))
                .with_field("wire_mb", others(&|f| round3(f.wire.median() / 1e6)))
                .with_field("failures", others(&|f| f.failures.len() as f64));
            out.emit(c);
        }
    }
    // Like for like: QEMU's stream encrypted and authenticated too.
    if let Some(tls) = figures.get("multifd4-tls")
        && let Some(c) = comparison(
            "qemu/loopback-time-vs-multifd4-tls",
            "s",
            &ours.time,
            "qemu-multifd4-tls",
            &tls.time,
            None,
        )
    {
        out.emit(
            c.with_field("downtime_ms", others(&|f| round3(f.downtime.median())))
                .with_field("src_cpu_s", others(&|f| round3(f.cpu.median())))
                .with_field("failures", others(&|f| f.failures.len() as f64)),
        );
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn wan_line(out: &mut Reporter, bench: &str, figures: &BTreeMap<String, Figures>) {
    let empty = Figures::default();
    let ours = figures.get("dwcp").unwrap_or(&empty);
    let best = QEMU_CONFIGS
        .iter()
        .filter_map(|name| figures.get(*name).map(|f| (*name, f)))
        .filter(|(_, f)| !f.time.is_empty())
        .min_by(|a, b| a.1.time.median().total_cmp(&b.1.time.median()));
    let Some((best_name, best)) = best else {
        eprintln!("{bench}: QEMU failed every configuration");
        return;
    };
    let mut wire = serde_json::Map::new();
    let mut times = serde_json::Map::new();
    for (name, f) in figures {
        wire.insert(name.clone(), json!(round3(f.wire.median() / 1e6)));
        times.insert(name.clone(), json!(round3(f.time.median())));
    }
    if let Some(c) = comparison(
        bench,
        "s",
        &ours.time,
        &format!("qemu-{best_name}"),
        &best.time,
        Some(2.0),
    ) {
        out.emit(
            c.with_field("wire_mb", Value::Object(wire))
                .with_field("time_s", Value::Object(times))
                .with_field("downtime_ms", json!(round3(ours.downtime.median())))
                .with_field("best_downtime_ms", json!(round3(best.downtime.median()))),
        );
    }
}
