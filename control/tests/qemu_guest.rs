//! Real QEMU guests migrated through two real `dwcpd` on loopback: the source appliance
//! moves the VM's RAM (a shared file) while QEMU moves only its device state, relayed
//! over the session. The guest checks itself: every page it owns describes itself, and
//! it verifies all of them every two seconds, printing heartbeats and any mismatch on
//! its console (see `dwcp-qemu-guest`).
//!
//! QEMU runs under TCG (a vCPU takes most of a core here), so the VMs are small and
//! the tests run one at a time. They skip with a printed reason where QEMU ≥ 9 or the
//! guest kernel is not installed (`make deps` installs both), except under CI, where a
//! missing QEMU is a failed install and fails the test.

mod common;

use dwcp_control::qemu::Qmp;
use dwcp_qemu_guest::Heartbeat;
use dwcp_qemu_guest::host::{GuestImage, RamBacking, Vm, VmSpec};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// One test at a time: each boots up to two TCG VMs on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Long enough for anything here on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// The guest: 128 MiB of RAM, 48 MiB of self-describing pages of which the first 4096
/// are rewritten at 2000 pages/s (8 MB/s), checked every 2 s.
const WORKLOAD: &str = "dwcp.mib=48 dwcp.hot=4096 dwcp.rate=2000 dwcp.check_s=2";
const MEMORY_MIB: u64 = 128;
/// A guest that beats every second and has not beaten for this long is dead.
const SILENT_FOR: Duration = Duration::from_secs(15);
/// [`WORKLOAD`] with a lap of the hot set slower than its checks.
const SLOW_LAP_WORKLOAD: &str = "dwcp.mib=48 dwcp.hot=4096 dwcp.rate=1000 dwcp.check_s=1";

fn image() -> Option<GuestImage> {
    match GuestImage::prepare() {
        Ok(image) => Some(image),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("CI installs QEMU and the guest kernel (make deps), yet: {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

fn dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dwcp-qemu-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn spec(dir: &Path, name: &str, incoming: bool) -> VmSpec {
    spec_with(dir, name, incoming, WORKLOAD)
}

fn spec_with(dir: &Path, name: &str, incoming: bool, workload: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib: MEMORY_MIB,
        workload: workload.into(),
        incoming,
        ram: RamBacking::SharedFile,
        stopped: false,
        dir: dir.to_owned(),
        netns: None,
        ram_dir: None,
    }
}

/// A source VM whose workload runs, and an incoming VM of the same shape.
fn boot_pair(image: &GuestImage, dir: &Path) -> (Vm, Vm) {
    boot_pair_with(image, dir, WORKLOAD)
}

fn boot_pair_with(image: &GuestImage, dir: &Path, workload: &str) -> (Vm, Vm) {
    let src = Vm::boot(image, &spec_with(dir, "src", false, workload)).unwrap();
    let dst = Vm::boot(image, &spec_with(dir, "dst", true, workload)).unwrap();
    src.wait_for_heartbeat(PATIENCE, |b| b.checks >= 1)
        .expect("the source guest boots and checks its pages once");
    (src, dst)
}

/// `dwcpd dest --qmp` for `vm`, running, with the address it listens on.
struct Dest {
    child: Child,
    addr: String,
    /// What it said before it listened.
    early: Vec<String>,
    stderr: Receiver<String>,
}

impl Dest {
    fn start(vm: &Vm, env: &[(&str, &str)]) -> Dest {
        Dest::start_with(vm, "127.0.0.1:0", &[], env)
    }

    /// `dwcpd dest --qmp` for `vm` on `listen`, with `extra` arguments.
    fn start_with(vm: &Vm, listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Dest {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dwcpd"))
            .args(["dest", "--listen", listen, "--qmp"])
            .arg(&vm.qmp)
            .args(extra)
            .args(common::cert_args(1))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stderr) = channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("  dest: {line}");
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + PATIENCE;
        let mut early = Vec::new();
        let addr = loop {
            let line = stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("dwcpd dest says where it listens");
            if let Some(rest) = line.strip_prefix("dwcpd: receiving on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
            early.push(line);
        };
        Dest {
            child,
            addr,
            early,
            stderr,
        }
    }

    /// Wait for it to exit: (success, stdout, stderr lines).
    fn finish(mut self) -> (bool, String, Vec<String>) {
        let status = self.child.wait().unwrap();
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            std::io::Read::read_to_string(&mut o, &mut out).unwrap();
        }
        let mut lines = std::mem::take(&mut self.early);
        lines.extend(self.stderr.try_iter());
        (status.success(), out, lines)
    }
}

/// The source appliance for `vm_qmp`. The downtime limit is generous: these tests are
/// about what arrives, not how fast (a debug build on a loaded 2-core machine scans
/// memory at a fraction of a release build's speed); the bench measures downtime.
fn source_command(vm_qmp: &Path, peer: &str, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dwcpd"));
    c.args([
        "source",
        "--peer",
        peer,
        "--downtime-ms",
        "200",
        "--json",
        "--qmp",
    ])
    .arg(vm_qmp)
    .args(common::cert_args(0))
    .envs(env.iter().copied());
    c
}

fn run_source(vm: &Vm, peer: &str, env: &[(&str, &str)]) -> Output {
    source_command(&vm.qmp, peer, env).output().unwrap()
}

fn qmp(vm: &Vm) -> Qmp {
    Qmp::connect(&vm.observer_qmp, Duration::from_secs(10)).unwrap()
}

fn report_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dwcpd source failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("dwcpd source --json prints its report")
}

fn notes(report: &Value) -> Vec<String> {
    report["notes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The destination guest, once it has checked all its pages twice after the migration.
fn checked_twice_after_migration(dst: &Vm) -> Heartbeat {
    // The destination's console holds only what the guest printed after it ran there.
    let first = dst
        .wait_for_heartbeat(PATIENCE, |_| true)
        .expect("the guest runs at the destination");
    dst.wait_for_heartbeat(PATIENCE, |b| b.checks >= first.checks + 2)
        .expect("the guest keeps checking its pages at the destination")
}

#[test]
fn a_qemu_guest_moves_through_two_appliances_and_finds_every_page_intact() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Without CAP_SYS_PTRACE the source falls back to rescans (the next test).
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: borrowing QEMU's page tables for the dirty log needs root"
        );
        return;
    }
    migrates_intact("migrate", "uffd-wp");
}

#[test]
fn a_qemu_guest_moves_intact_with_crc_rescans_for_its_dirty_log() {
    migrates_intact("migrate-rescan", "rescan");
}

/// Migrate a VM through two appliances with `dirty_log` and check what arrived: QEMU's
/// page tables (borrowed from its process) by default, CRC rescans where they cannot be.
fn migrates_intact(test: &str, dirty_log: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir(test);
    let (src, dst) = boot_pair(&image, &dir);
    let before = src.wait_for_heartbeat(PATIENCE, |_| true).unwrap();

    let dest = Dest::start(&dst, &[]);
    let out = source_command(&src.qmp, &dest.addr, &[])
        .args(["--dirty-log", dirty_log])
        .output()
        .unwrap();
    let report = report_of(&out);
    let (dest_ok, dest_out, _) = dest.finish();
    assert!(dest_ok, "dwcpd dest failed: {dest_out}");
    assert!(dest_out.contains("device state loaded"), "{dest_out}");

    let rounds = report["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "pre-copy rounds, then the final one");
    assert!(report["device_state_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report["dirty_log"], dirty_log, "{:?}", notes(&report));
    if dirty_log == "rescan" {
        assert!(
            report["dirty_scan"]["last_bytes_per_second"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
    let downtime_ms = report["measured_downtime"].as_f64().unwrap() * 1e3;
    let device_ms = report["downtime"]["measured"]["device_state"]
        .as_f64()
        .unwrap()
        * 1e3;
    assert!(device_ms > 0.0 && device_ms < downtime_ms);
    let qemu_note = notes(&report)
        .into_iter()
        .find(|n| n.contains("QEMU's own figures"))
        .expect("the report carries QEMU's own figures");

    // QEMU's view: the source handed the VM over, the destination runs it.
    assert_eq!(qmp(&src).run_state().unwrap(), "postmigrate");
    assert_eq!(qmp(&dst).run_state().unwrap(), "running");
    let after = checked_twice_after_migration(&dst);
    assert!(
        after.writes > before.writes,
        "the workload went on where it was"
    );
    assert_eq!(after.mismatches, 0, "{}", dst.console());
    assert!(!dst.console().contains("MISMATCH"), "{}", dst.console());
    eprintln!(
        "migrated with {dirty_log} in {} rounds, downtime {downtime_ms:.1} ms (device state {device_ms:.1} ms); \
         {qemu_note}; destination guest: {} checks since, no mismatch; test took {:.1} s",
        rounds.len(),
        after.checks,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_final_round_left_out_is_caught_by_the_guest_and_the_table_digest() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir("skip-final");
    // The pages the final round leaves out are those written just before the pause,
    // right behind the workload's cursor: it comes back to them only after a whole lap
    // of the hot set (4 s at this rate), and the guest checks every page each second,
    // so a check always meets them stale first.
    let (src, dst) = boot_pair_with(&image, &dir, SLOW_LAP_WORKLOAD);
    let switch = [("DWCP_TEST_SKIP_FINAL_ROUND", "1")];
    let dest = Dest::start(&dst, &switch);
    let report = report_of(&run_source(&src, &dest.addr, &switch));
    let (dest_ok, dest_out, _) = dest.finish();
    assert!(dest_ok, "{dest_out}");
    let notes = notes(&report);
    let skipped = notes
        .iter()
        .find(|n| n.contains("final round's"))
        .expect("the switch says what it left out");
    assert!(
        !skipped.contains("final round's 0 pages"),
        "the guest wrote during the final round: {skipped}"
    );
    assert!(
        notes.iter().any(|n| n.contains("switched over although")),
        "the table digests differ: {notes:?}"
    );
    assert!(report["digest"].as_str().unwrap().contains("differs"));
    // Stale pages of the workload show in its check; stale pages of the guest's kernel
    // (its stacks are rewritten all the time) may kill the guest first, loudly or
    // silently: either way the guest at the destination is not the guest that was
    // paused, which beat every second.
    let resumed = Instant::now();
    let deadline = resumed + PATIENCE;
    let (mut beats_seen, mut last_beat) = (0, resumed);
    let verdict = loop {
        let console = dst.console();
        let beats = dst.heartbeats().len();
        if beats > beats_seen {
            (beats_seen, last_beat) = (beats, Instant::now());
        }
        if last_beat.elapsed() > SILENT_FOR && qmp(&dst).run_state().is_ok_and(|s| s == "running") {
            break format!(
                "the guest runs but its workload has not beaten in {SILENT_FOR:?} (it or its kernel hung)"
            );
        }
        if let Some(beat) = dst.heartbeats().into_iter().find(|b| b.mismatches > 0) {
            break format!("the guest's check found {} bad pages", beat.mismatches);
        }
        // A panic, or an oops the kernel may limp on from.
        if let Some(line) = console
            .lines()
            .find(|l| l.contains("Kernel panic") || l.contains("Oops") || l.contains("BUG: "))
        {
            break format!("the guest's kernel died: {}", line.trim());
        }
        assert!(
            Instant::now() < deadline,
            "the destination guest runs on as if nothing were missing: {console}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "{skipped}; {verdict}; test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_destination_lost_mid_precopy_leaves_the_source_guest_running() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir("dest-lost");
    let (src, dst) = boot_pair(&image, &dir);
    // Paced to 2 MB/s per stream: round 0 of 128 MiB takes many seconds.
    let config = dir.join("slow.toml");
    // The source reconnects for resume_grace_s before it gives up: briefly here.
    std::fs::write(
        &config,
        "[transport]\npacing_rate = \"2M\"\n[migration]\nresume_grace_s = 2\n",
    )
    .unwrap();
    let dest = Dest::start(&dst, &[]);
    let source = source_command(&src.qmp, &dest.addr, &[])
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut dest_child = dest.child;
    dest_child.kill().unwrap();
    let _ = dest_child.wait();
    let out = wait_with_deadline(source, PATIENCE);
    assert!(!out.status.success(), "the migration cannot complete");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("source: {}", stderr.trim());

    let mut q = qmp(&src);
    assert_eq!(q.run_state().unwrap(), "running");
    let (status, _) = q.migration().unwrap();
    assert_ne!(status, "pre-switchover");
    assert_ne!(status, "active");
    let last = src.heartbeats().last().copied().unwrap();
    let later = src
        .wait_for_heartbeat(PATIENCE, |b| {
            b.seq >= last.seq + 2 && b.checks > last.checks
        })
        .expect("the source guest runs on");
    assert_eq!(later.mismatches, 0);
    // The incoming VM never ran.
    assert!(dst.heartbeats().is_empty());
    eprintln!(
        "source VM running, QEMU migration status {status:?}; test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_source_appliance_killed_mid_precopy_resumes_the_vm_after_its_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir("source-restart");
    let (src, dst) = boot_pair(&image, &dir);
    let state = dir.join("state");
    let config = dir.join("restart.toml");
    // Paced to 2 MB/s per stream, so that the kill lands in round 0.
    std::fs::write(
        &config,
        format!(
            "[transport]\npacing_rate = \"2M\"\n[control]\nstate_dir = {:?}\n",
            state.display().to_string()
        ),
    )
    .unwrap();
    let dest = Dest::start(&dst, &[]);
    let mut first = source_command(&src.qmp, &dest.addr, &[])
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let record = state.join("outgoing.session");
    common::wait_for_record(&record, "source", PATIENCE);
    std::thread::sleep(Duration::from_secs(1));
    first.kill().unwrap();
    let _ = first.wait();
    // The VM never noticed: it runs on at the source.
    assert_eq!(qmp(&src).run_state().unwrap(), "running");
    assert!(
        record.exists(),
        "the killed source left its session's record"
    );
    // Started again unpaced (at 8 MB/s the guest's writes would outrun the rounds).
    std::fs::write(
        &config,
        format!("[control]\nstate_dir = {:?}\n", state.display().to_string()),
    )
    .unwrap();
    let out = source_command(&src.qmp, &dest.addr, &[])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let report = report_of(&out);
    let resume = &report["resumes"][0];
    assert_eq!(resume["cause"], "this appliance restarted", "{report}");
    let (dest_ok, dest_out, _) = dest.finish();
    assert!(dest_ok, "dwcpd dest failed: {dest_out}");
    assert!(dest_out.contains("device state loaded"), "{dest_out}");
    assert!(!record.exists(), "the record outlived its session");
    assert_eq!(qmp(&dst).run_state().unwrap(), "running");
    let after = checked_twice_after_migration(&dst);
    assert_eq!(after.mismatches, 0, "{}", dst.console());
    eprintln!(
        "resumed from round {} with {} of {} pages to send (table read back in {:.2} s); \
         destination guest: {} checks, no mismatch; test took {:.1} s",
        resume["round"],
        resume["pages_to_send"],
        report["pages"],
        resume["table_rebuild_seconds"].as_f64().unwrap_or(0.0),
        after.checks,
        started.elapsed().as_secs_f64()
    );
}

/// What a destination-restart test runs with: the destination's state directory and
/// configuration, the source's (paced to 4 MB/s per stream, so that the kill lands in
/// round 0 and the rounds still outrun the guest's writes), and a fixed address for
/// the destination to listen on again after its restart.
struct DestRestart {
    state: PathBuf,
    dest_config: PathBuf,
    source_config: PathBuf,
    listen: String,
}

impl DestRestart {
    fn new(dir: &Path) -> DestRestart {
        let state = dir.join("state");
        let dest_config = dir.join("dest.toml");
        std::fs::write(
            &dest_config,
            format!("[control]\nstate_dir = {:?}\n", state.display().to_string()),
        )
        .unwrap();
        let source_config = dir.join("source.toml");
        std::fs::write(&source_config, "[transport]\npacing_rate = \"4M\"\n").unwrap();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = probe.local_addr().unwrap().to_string();
        DestRestart {
            state,
            dest_config,
            source_config,
            listen,
        }
    }
}

#[test]
fn a_destination_appliance_killed_mid_precopy_resumes_into_the_vm_after_its_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir("dest-restart");
    let (src, dst) = boot_pair(&image, &dir);
    let DestRestart {
        state,
        dest_config,
        source_config,
        listen,
    } = DestRestart::new(&dir);
    let dest_args = ["--config", dest_config.to_str().unwrap()];
    let mut first = Dest::start_with(&dst, &listen, &dest_args, &[]);
    let source = source_command(&src.qmp, &listen, &[])
        .arg("--config")
        .arg(&source_config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let record = state.join("incoming.session");
    common::wait_for_record(&record, "destination", PATIENCE);
    std::thread::sleep(Duration::from_secs(1));
    first.child.kill().unwrap();
    let _ = first.child.wait();
    assert!(
        record.exists(),
        "the killed destination left its session's record"
    );
    // Neither VM noticed: the source runs on, the incoming one still waits.
    assert_eq!(qmp(&src).run_state().unwrap(), "running");
    assert_eq!(qmp(&dst).run_state().unwrap(), "inmigrate");
    let dest = Dest::start_with(&dst, &listen, &dest_args, &[]);
    // Drained while it runs (its stderr may outgrow a pipe's buffer).
    let (tx, done) = channel();
    std::thread::spawn(move || tx.send(source.wait_with_output().unwrap()));
    let out = done
        .recv_timeout(2 * PATIENCE)
        .expect("the source resumes and finishes");
    let report = report_of(&out);
    let (dest_ok, dest_out, dest_log) = dest.finish();
    assert!(dest_ok, "dwcpd dest failed: {dest_out}\n{dest_log:?}");
    assert!(dest_out.contains("device state loaded"), "{dest_out}");
    assert!(
        dest_log.iter().any(|l| l.contains("QEMU still listens")),
        "the restarted destination took over QEMU's listening socket: {dest_log:?}"
    );
    let resume = &report["resumes"][0];
    assert_eq!(resume["round"], 0, "{report}");
    assert!(
        resume["pages_to_send"].as_u64().unwrap() < report["pages"].as_u64().unwrap(),
        "what the destination kept is not sent again: {resume}"
    );
    assert!(!record.exists(), "the record outlived its session");
    assert_eq!(qmp(&dst).run_state().unwrap(), "running");
    let after = checked_twice_after_migration(&dst);
    assert_eq!(after.mismatches, 0, "{}", dst.console());
    eprintln!(
        "resumed after {:.2} s from round {} with {} of {} pages to send ({}); destination \
         guest: {} checks, no mismatch; test took {:.1} s",
        resume["outage_seconds"].as_f64().unwrap_or(0.0),
        resume["round"],
        resume["pages_to_send"],
        report["pages"],
        resume["cause"],
        after.checks,
        started.elapsed().as_secs_f64()
    );
}

fn wait_with_deadline(mut child: Child, patience: Duration) -> Output {
    let deadline = Instant::now() + patience;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dwcpd source still running after {patience:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn vms_the_appliance_cannot_move_are_refused_before_anything_moves() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir("refusals");
    let refused = |qmp: &Path, expect: &str| {
        let out = source_command(qmp, "127.0.0.1:9", &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
        eprintln!("refused: {}", stderr.trim());
    };

    // Something that is not QEMU behind the socket.
    let fake = dir.join("not-qemu.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let _ = conn.write_all(b"220 mail.example.org ESMTP\r\n");
        }
    });
    refused(&fake, "is not a QEMU QMP socket");

    // RAM QEMU keeps private, and RAM that is no file at all.
    for (ram, expect) in [
        (RamBacking::PrivateFile, "share=off"),
        (
            RamBacking::Anonymous,
            "memory-backend-ram, not a file the appliance can map",
        ),
    ] {
        let vm = Vm::boot(
            &image,
            &VmSpec {
                ram,
                stopped: true,
                ..spec(&dir, "unshared", false)
            },
        )
        .unwrap();
        refused(&vm.qmp, expect);
        let (status, _) = qmp(&vm).migration().unwrap();
        assert_eq!(status, "none", "nothing was started");
    }

    // A destination VM that is not waiting for a migration.
    let running = Vm::boot(
        &image,
        &VmSpec {
            stopped: true,
            ..spec(&dir, "busy", false)
        },
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dwcpd"))
        .args(["dest", "--listen", "127.0.0.1:0", "--qmp"])
        .arg(&running.qmp)
        .args(common::cert_args(1))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not waiting for a migration"), "{stderr}");
    eprintln!(
        "refused: {}; test took {:.1} s",
        stderr.trim(),
        started.elapsed().as_secs_f64()
    );
}

/// `dwcpd serve` as operators run it, on both appliances: the source daemon asked over
/// its control socket to migrate a VM by its QMP socket, the destination daemon
/// receiving into the incoming VM it was given.
struct Daemon {
    child: Child,
    socket: PathBuf,
    listen: String,
}

impl Daemon {
    fn start(dir: &Path, name: &str, extra: &[&str]) -> Daemon {
        Daemon::start_on(dir, name, "127.0.0.1:0", extra)
    }

    /// `dwcpd serve` named `name`, taking migrations on `listen`.
    fn start_on(dir: &Path, name: &str, listen: &str, extra: &[&str]) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(env!("CARGO_BIN_EXE_dwcpd"))
            .args(["serve", "--listen", listen, "--socket"])
            .arg(&socket)
            .args(common::cert_args(usize::from(name != "source")))
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let pipe = child.stderr.take().unwrap();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("  {tag}: {line}");
                let _ = tx.send(line);
            }
        });
        let serving = loop {
            let line = lines.recv_timeout(PATIENCE).expect("dwcpd serve starts");
            if line.contains("dwcpd: serving") {
                break line;
            }
        };
        let listen = serving
            .split("migrations on ")
            .nth(1)
            .and_then(|rest| rest.split([',', ' ']).next())
            .unwrap()
            .to_string();
        Daemon {
            child,
            socket,
            listen,
        }
    }

    /// Wait up to `patience` for this daemon's first migration to end; what it says of it.
    fn first_migration_ended(&self, patience: Duration) -> dwcp_api::MigrationInfo {
        let deadline = Instant::now() + patience;
        loop {
            let list: Vec<dwcp_api::MigrationInfo> = self
                .call(dwcp_api::Command::Migrations)
                .into_result()
                .unwrap();
            let m = list.into_iter().next().expect("the migration is listed");
            if m.state != "running" {
                return m;
            }
            assert!(Instant::now() < deadline, "still running: {m:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn call(&self, command: dwcp_api::Command) -> dwcp_api::Response {
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut line = serde_json::to_vec(&dwcp_api::Request::new(command)).unwrap();
        line.push(b'\n');
        s.write_all(&line).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn operators_migrate_a_vm_by_its_qmp_socket_through_the_daemons() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir("daemons");
    let (src, dst) = boot_pair(&image, &dir);
    let incoming = dst.qmp.display().to_string();
    let dest = Daemon::start(&dir, "dest", &["--incoming-qmp", &incoming]);
    let source = Daemon::start(&dir, "source", &[]);
    let status: dwcp_api::StatusInfo = dest.call(dwcp_api::Command::Status).into_result().unwrap();
    assert_eq!(status.incoming_vm.as_deref(), Some(incoming.as_str()));
    let migrate = |qmp: &Path| {
        source.call(dwcp_api::Command::Migrate(dwcp_api::MigrateOptions {
            peer: dest.listen.clone(),
            qmp: Some(qmp.display().to_string()),
            downtime_ms: Some(200),
            ..Default::default()
        }))
    };

    // A socket that is not QEMU is refused at once, and nothing starts.
    let fake = dir.join("not-qemu.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let _ = conn.write_all(b"hello\n");
        }
    });
    let refused = migrate(&fake);
    assert!(!refused.ok);
    assert!(
        format!("{refused:?}").contains("not a QEMU QMP socket"),
        "{refused:?}"
    );

    let r = migrate(&src.qmp);
    assert!(r.ok, "{r:?}");
    let info = source.first_migration_ended(PATIENCE);
    assert_eq!(info.state, "completed", "{info:?}");
    let vm = info.vm.clone().expect("the VM is named");
    assert_eq!(vm.name, "src");
    assert_eq!(vm.state, "postmigrate");
    assert_eq!(info.memory_bytes, MEMORY_MIB << 20);
    assert_eq!(qmp(&src).run_state().unwrap(), "postmigrate");
    let after = checked_twice_after_migration(&dst);
    assert_eq!(after.mismatches, 0, "{}", dst.console());
    eprintln!(
        "daemon migration: downtime {:.1} ms, VM {:?} (QEMU {}) now {}; test took {:.1} s",
        info.downtime_ms.unwrap_or(f64::NAN),
        vm.name,
        vm.qemu_version,
        vm.state,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_destination_daemon_killed_mid_precopy_resumes_into_its_incoming_vm_after_its_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image() else { return };
    let started = Instant::now();
    let dir = dir("daemon-dest-restart");
    let (src, dst) = boot_pair(&image, &dir);
    let DestRestart {
        state,
        dest_config,
        source_config,
        listen,
    } = DestRestart::new(&dir);
    let incoming = dst.qmp.display().to_string();
    let dest_args = [
        "--incoming-qmp",
        &incoming,
        "--config",
        dest_config.to_str().unwrap(),
    ];
    let mut dest = Daemon::start_on(&dir, "dest", &listen, &dest_args);
    let source = Daemon::start(
        &dir,
        "source",
        &["--config", source_config.to_str().unwrap()],
    );
    let r = source.call(dwcp_api::Command::Migrate(dwcp_api::MigrateOptions {
        peer: listen.clone(),
        qmp: Some(src.qmp.display().to_string()),
        downtime_ms: Some(200),
        ..Default::default()
    }));
    assert!(r.ok, "{r:?}");
    let record = state.join("incoming.session");
    common::wait_for_record(&record, "destination daemon", PATIENCE);
    std::thread::sleep(Duration::from_secs(1));
    dest.child.kill().unwrap();
    let _ = dest.child.wait();
    assert_eq!(qmp(&dst).run_state().unwrap(), "inmigrate");
    let _dest = Daemon::start_on(&dir, "dest", &listen, &dest_args);
    let info = source.first_migration_ended(2 * PATIENCE);
    assert_eq!(info.state, "completed", "{info:?}");
    assert!(!record.exists(), "the record outlived its session");
    assert_eq!(qmp(&dst).run_state().unwrap(), "running");
    let after = checked_twice_after_migration(&dst);
    assert_eq!(after.mismatches, 0, "{}", dst.console());
    eprintln!(
        "the destination daemon was killed and started again; the migration completed \
         ({} pages sent in all), the guest checked its pages {} times since, no mismatch; \
         test took {:.1} s",
        info.pages_sent,
        after.checks,
        started.elapsed().as_secs_f64()
    );
}
