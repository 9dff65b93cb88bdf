//! An appliance killed mid-migration (SIGKILL) and started again resumes the session.
//! A destination reads its memory file back into a CRC table, the source (which kept
//! reconnecting, its guest running) resumes, the tables are compared, and only what the
//! destination lacks — or what changed in its file while it was down — is sent again.
//! A source started again finds its record, reads its guest's memory file back, and
//! resumes the session the destination kept.

mod common;

use dwcp_api::{Command as DaemonCommand, MigrateOptions, MigrationInfo};
use dwcp_dataplane::dirty::{DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{self, SourceConfig};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_dataplane::security::Identity;
use dwcp_hugepages::PagePreference;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUEST: usize = 128 << 20;
/// A page the test overwrites in the destination's file while the appliance is down.
const TAMPERED_PAGE: u64 = 3;

/// `dwcpd dest` into a memory file, with a state directory if given, its stderr in
/// `log`.
fn start_dest(port: u16, memory_file: &Path, state: Option<&Path>, log: &Path) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dwcpd"));
    command
        .arg("dest")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--memory-file")
        .arg(memory_file);
    if let Some(state) = state {
        command.arg("--state-dir").arg(state);
    }
    let mut child = command
        .args(common::cert_args(1))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_for_log(&mut child, log, "receiving on");
    child
}

/// Wait until `child`'s log (`log`) says `needle`.
fn wait_for_log(child: &mut Child, log: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log).is_ok_and(|l| l.contains(needle)) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "dwcpd exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "dwcpd did not say {needle:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The bytes of two memory files, page by page: the first page that differs.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.chunks(PAGE_SIZE)
        .zip(b.chunks(PAGE_SIZE))
        .position(|(x, y)| x != y)
}

fn identity(which: usize) -> Arc<Identity> {
    common::lab().identity(which).expect("a lab identity")
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[test]
fn a_destination_killed_mid_migration_resumes_after_its_restart() {
    let started = Instant::now();
    let tag = format!("dwcp-restart-{}", std::process::id());
    let memory_file = PathBuf::from("/dev/shm").join(format!("{tag}.mem"));
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(vec![memory_file.clone(), dir.clone()]);
    let state = dir.join("state");
    let port = free_port();
    let mut dest = start_dest(port, &memory_file, Some(&state), &dir.join("dest-1.log"));

    let memory = Arc::new(GuestMemory::anonymous(GUEST, PagePreference::TransparentHuge).unwrap());
    let workload = GuestWorkload {
        dirty_rate: 5e6,
        ..GuestWorkload::default()
    };
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, 17);
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).unwrap();
    let guest = SimulatedGuest::start(memory.clone(), &workload, opened.marker.clone());
    let mut config = SourceConfig {
        streams: 4,
        security: Some(identity(0)),
        resume_grace: Duration::from_secs(30),
        ..SourceConfig::default()
    };
    // 40 MB/s in all: round 0 takes a few seconds, and the kill lands inside it.
    config.transport.socket.pacing_rate = Some(10_000_000);
    let peer = format!("127.0.0.1:{port}").parse().unwrap();
    let source = std::thread::scope(|scope| {
        let migrating = scope.spawn(|| {
            engine::migrate(
                peer,
                memory.clone(),
                &guest,
                opened.log,
                &config,
                &mut |_| {},
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        dest.kill().unwrap();
        let _ = dest.wait();
        assert!(
            state.join("incoming.session").exists(),
            "the killed destination left its session's record"
        );
        // Its file changed while it was down: the comparison must not trust it.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&memory_file)
            .unwrap();
        file.seek(SeekFrom::Start(TAMPERED_PAGE * PAGE_SIZE as u64))
            .unwrap();
        file.write_all(&[0xEE; PAGE_SIZE]).unwrap();
        drop(file);
        dest = start_dest(port, &memory_file, Some(&state), &dir.join("dest-2.log"));
        migrating.join().unwrap()
    });
    let out = dest.wait_with_output().unwrap();
    let dest_log = std::fs::read_to_string(dir.join("dest-2.log")).unwrap_or_default();
    let report =
        source.unwrap_or_else(|e| panic!("the source failed: {e}; destination: {dest_log}"));
    assert!(out.status.success(), "the destination failed: {dest_log}");
    eprintln!("{report}");
    eprintln!("destination after its restart: {}", dest_log.trim());
    assert!(dest_log.contains("CRC table rebuilt"), "{dest_log}");
    assert_eq!(report.resumes.len(), 1, "{:?}", report.resumes);
    let resume = &report.resumes[0];
    assert_eq!(resume.round, 0);
    // What the destination had kept was not sent again.
    assert!(resume.pages_to_send < report.pages, "{resume:?}");
    // The destination's file holds the guest, the tampered page included.
    let received = std::fs::read(&memory_file).unwrap();
    assert_eq!(first_difference(&received, &memory.to_vec()), None);
    assert!(
        !state.join("incoming.session").exists(),
        "the record outlived its session"
    );
    guest.stop();
    eprintln!(
        "resumed after {:.2} s, {} of {} pages sent again after the restart ({} lost in flight); \
         test took {:.1} s",
        resume.outage_seconds,
        resume.pages_to_send,
        report.pages,
        resume.pages_resent,
        started.elapsed().as_secs_f64()
    );
}

/// `dwcpd source` of a simulated guest in `memory_file`, configured by `config`, its
/// stderr in `log`.
fn start_source(port: u16, config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dwcpd"))
        .arg("source")
        .arg("--peer")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(config)
        .arg("--json")
        .args(common::cert_args(0))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn a_source_killed_mid_migration_resumes_after_its_restart() {
    let started = Instant::now();
    let tag = format!("dwcp-restart-src-{}", std::process::id());
    let guest_file = PathBuf::from("/dev/shm").join(format!("{tag}-guest.mem"));
    let received_file = PathBuf::from("/dev/shm").join(format!("{tag}-received.mem"));
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(vec![guest_file.clone(), received_file.clone(), dir.clone()]);
    let state = dir.join("state");
    let config = dir.join("source.toml");
    std::fs::write(
        &config,
        format!(
            "[guest]\nmemory = \"128M\"\nmemory_file = {:?}\noverwrite_memory_file = true\n\
             dirty_rate_mbps = 5.0\n[control]\nstate_dir = {:?}\n[migration]\nstreams = 4\n\
             resume_grace_s = 30\n[transport]\npacing_rate = \"4M\"\n",
            guest_file.display().to_string(),
            state.display().to_string()
        ),
    )
    .unwrap();
    let port = free_port();
    let dest = start_dest(port, &received_file, None, &dir.join("dest.log"));
    let mut source = start_source(port, &config, &dir.join("source-1.log"));
    // Round 0 runs at 16 MB/s (about 37 MB of it: 2.3 s); the kill lands in it.
    let record = state.join("outgoing.session");
    common::wait_for_record(&record, "source", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(800));
    source.kill().unwrap();
    let _ = source.wait();
    assert!(
        record.exists(),
        "the killed source left no record of its session: {}",
        std::fs::read_to_string(dir.join("source-1.log")).unwrap_or_default()
    );
    let source = start_source(port, &config, &dir.join("source-2.log"));
    let out = source.wait_with_output().unwrap();
    let log = std::fs::read_to_string(dir.join("source-2.log")).unwrap_or_default();
    assert!(out.status.success(), "the resumed source failed: {log}");
    eprintln!("source after its restart: {}", log.trim());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let resume = &report["resumes"][0];
    assert_eq!(resume["cause"], "this appliance restarted", "{report}");
    let to_send = resume["pages_to_send"].as_u64().unwrap();
    let pages = report["pages"].as_u64().unwrap();
    // What the destination had kept was not sent again.
    assert!(to_send < pages, "{resume}");
    let dest_out = dest.wait_with_output().unwrap();
    let dest_log = std::fs::read_to_string(dir.join("dest.log")).unwrap_or_default();
    assert!(
        dest_out.status.success(),
        "the destination failed: {dest_log}"
    );
    assert!(!record.exists(), "the record outlived its session");
    // Both files hold the same guest (the source's paused at the switchover).
    let sent = std::fs::read(&guest_file).unwrap();
    let received = std::fs::read(&received_file).unwrap();
    assert_eq!(first_difference(&sent, &received), None);
    eprintln!(
        "resumed from round {} with {to_send} of {pages} pages to send (table read back in \
         {:.3} s); test took {:.1} s",
        resume["round"],
        resume["table_rebuild_seconds"].as_f64().unwrap_or(0.0),
        started.elapsed().as_secs_f64()
    );
}

/// `dwcpd serve` with `config`, its stderr in `log`; returns once it serves.
fn start_daemon(config: &Path, log: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dwcpd"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_for_log(&mut child, log, "dwcpd: serving");
    child
}

#[test]
fn a_daemon_killed_mid_migration_lists_it_interrupted_and_resumes_it_on_request() {
    let started = Instant::now();
    let tag = format!("dwcp-restart-daemon-{}", std::process::id());
    let guest_file = PathBuf::from("/dev/shm").join(format!("{tag}-guest.mem"));
    let received_file = PathBuf::from("/dev/shm").join(format!("{tag}-received.mem"));
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(vec![guest_file.clone(), received_file.clone(), dir.clone()]);
    let socket = dir.join("dwcpd.sock");
    let state = dir.join("state");
    let config = dir.join("dwcpd.toml");
    std::fs::write(
        &config,
        format!(
            "[dest]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = {:?}\nstate_dir = {:?}\n\
             [guest]\nmemory = \"128M\"\nmemory_file = {:?}\noverwrite_memory_file = true\n\
             dirty_rate_mbps = 5.0\n[migration]\nstreams = 4\nresume_grace_s = 30\n\
             [transport]\npacing_rate = \"4M\"\n{}",
            socket.display().to_string(),
            state.display().to_string(),
            guest_file.display().to_string(),
            common::security_section(0)
        ),
    )
    .unwrap();
    let port = free_port();
    let dest = start_dest(port, &received_file, None, &dir.join("dest.log"));
    let mut daemon = start_daemon(&config, &dir.join("daemon-1.log"));
    let peer = format!("127.0.0.1:{port}");
    let started_migration = common::call(
        &socket,
        DaemonCommand::Migrate(MigrateOptions {
            peer: peer.clone(),
            ..MigrateOptions::default()
        }),
    );
    assert!(started_migration.ok, "{started_migration:?}");
    let record = state.join("outgoing.session");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !record.exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon never recorded the session"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(800));
    daemon.kill().unwrap();
    let _ = daemon.wait();
    assert!(
        record.exists(),
        "the killed daemon left no record of its migration"
    );

    let mut daemon = start_daemon(&config, &dir.join("daemon-2.log"));
    let migrations = |socket: &Path| -> Vec<MigrationInfo> {
        common::call(socket, DaemonCommand::Migrations)
            .into_result()
            .unwrap()
    };
    let listed = migrations(&socket);
    let interrupted = listed
        .iter()
        .find(|m| m.state == "interrupted")
        .unwrap_or_else(|| panic!("no interrupted migration listed: {listed:?}"));
    assert_eq!(interrupted.peer, peer);
    assert_eq!(interrupted.phase, "interrupted");
    let id = interrupted.id;
    let resumed = common::call(&socket, DaemonCommand::Resume { id });
    assert!(resumed.ok, "{resumed:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let m = migrations(&socket)
            .into_iter()
            .find(|m| m.id == id)
            .expect("the resumed migration is listed");
        if m.state != "running" {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed migration never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(dir.join("daemon-2.log")).unwrap_or_default();
    assert_eq!(done.state, "completed", "{done:?}: {log}");
    let dest_out = dest.wait_with_output().unwrap();
    assert!(dest_out.status.success());
    assert!(!record.exists(), "the record outlived its migration");
    let sent = std::fs::read(&guest_file).unwrap();
    let received = std::fs::read(&received_file).unwrap();
    assert_eq!(first_difference(&sent, &received), None);
    let _ = common::call(&socket, DaemonCommand::Shutdown);
    let _ = daemon.wait();
    eprintln!(
        "migration {id} resumed by the restarted daemon and verified ({} pages); test took {:.1} s",
        done.verified_pages.unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
}
