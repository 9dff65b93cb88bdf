//! End-to-end live migrations over loopback while the simulated guest writes; each
//! ends with a byte-for-byte comparison of source and destination memory.

use dwcp_dataplane::dirty::DirtyLogKind;
use dwcp_dataplane::engine::{
    self, DestConfig, MigrationError, Progress, SourceConfig, VerifyMode,
};
use dwcp_dataplane::guest::{AccessPattern, ContentMix, GuestControl, GuestWorkload};
use dwcp_dataplane::transport::{TransportChoice, TransportConfig};
use dwcp_tests::{migrate_live, running_guest, skip, spawn_destination};
use std::io::Write;
use std::time::Duration;

const MIB_256: usize = 256 << 20;

fn configs(streams: u16, choice: TransportChoice) -> (SourceConfig, DestConfig) {
    let transport = TransportConfig {
        choice,
        ..TransportConfig::default()
    };
    (
        SourceConfig {
            streams,
            transport: transport.clone(),
            ..SourceConfig::default()
        },
        DestConfig {
            transport,
            ..DestConfig::default()
        },
    )
}

fn migrate_and_compare(streams: u16, choice: TransportChoice) {
    if choice == TransportChoice::IoUring
        && let Err(why) = dwcp_dataplane::transport::uring::probe()
    {
        skip(&format!(
            "io_uring unavailable ({why}); this run would test plain sockets twice"
        ));
        return;
    }
    let (source, dest) = configs(streams, choice);
    let out = migrate_live(
        MIB_256,
        &GuestWorkload::default(),
        DirtyLogKind::Uffd,
        &source,
        &dest,
    );
    let report = out.source.expect("source side");
    let received = out.dest.expect("destination side");
    assert_eq!(report.transport.streams, streams);
    let expected_kind = match choice {
        TransportChoice::Plain => "plain",
        _ => "io_uring",
    };
    assert_eq!(report.transport.kind, expected_kind);
    assert_eq!(report.verified_pages, (MIB_256 / 4096) as u64);
    assert_eq!(received.verified_pages, report.verified_pages);
    assert_eq!(received.digest, report.digest);
    assert_eq!(
        out.memory.first_difference(&received.memory),
        None,
        "source and destination differ"
    );
    assert!(
        report.rounds.len() >= 2,
        "round 0 and the final round at least"
    );
    out.guest.stop();
}

#[test]
fn one_stream_io_uring() {
    migrate_and_compare(1, TransportChoice::IoUring);
}

#[test]
fn two_streams_io_uring() {
    migrate_and_compare(2, TransportChoice::IoUring);
}

#[test]
fn four_streams_io_uring() {
    migrate_and_compare(4, TransportChoice::IoUring);
}

#[test]
fn one_stream_plain() {
    migrate_and_compare(1, TransportChoice::Plain);
}

#[test]
fn two_streams_plain() {
    migrate_and_compare(2, TransportChoice::Plain);
}

#[test]
fn four_streams_plain() {
    migrate_and_compare(4, TransportChoice::Plain);
}

/// Guest memory in a file on /dev/shm (as a hypervisor sharing it would have it),
/// tracked by userfaultfd on shared memory.
#[test]
fn file_backed_guest_memory_on_shm() {
    let dir = std::path::Path::new("/dev/shm");
    if !dir.is_dir() {
        skip("no /dev/shm");
        return;
    }
    let path = dir.join(format!("dwcp-guest-{}", std::process::id()));
    let memory =
        std::sync::Arc::new(dwcp_dataplane::memory::GuestMemory::file(&path, 64 << 20).unwrap());
    let _ = std::fs::remove_file(&path);
    let (source, dest) = configs(2, TransportChoice::Auto);
    let out = dwcp_tests::migrate_memory(
        memory,
        &GuestWorkload::default(),
        DirtyLogKind::Uffd,
        &source,
        &dest,
    );
    let report = out.source.expect("source side");
    let received = out.dest.expect("destination side");
    assert_eq!(out.memory.first_difference(&received.memory), None);
    let _ = writeln!(
        std::io::stderr(),
        "shm guest: dirty log {}",
        report.dirty_log
    );
    out.guest.stop();
}

/// A shared memory file with holes, as a hypervisor leaves untouched guest RAM. Nothing
/// the source does reads a hole (a read through the shared mapping would fill it with a
/// page of the source host's memory): round 0 sends holes as zeros unread, rescans and
/// the audit and full verification count them as zero pages. Pages the guest writes
/// into holes meanwhile still arrive. Each dirty log and verification in turn.
#[test]
fn holes_in_a_memory_file_stay_holes_and_writes_into_them_arrive() {
    let dir = std::path::Path::new("/dev/shm");
    if !dir.is_dir() {
        skip("no /dev/shm");
        return;
    }
    for (dirty, verify) in [
        (DirtyLogKind::Uffd, VerifyMode::Table),
        (DirtyLogKind::Rescan, VerifyMode::Audit),
        (DirtyLogKind::Rescan, VerifyMode::Full),
    ] {
        let path = dir.join(format!("dwcp-holes-{}", std::process::id()));
        let memory = std::sync::Arc::new(
            dwcp_dataplane::memory::GuestMemory::file(&path, 64 << 20).unwrap(),
        );
        let _ = std::fs::remove_file(&path);
        let pages = memory.pages();
        // Data in the first quarter, but for every eighth page; holes after it.
        let mut page = [0u8; 4096];
        for p in (0..pages / 4).filter(|p| p % 8 != 3) {
            page.fill((p % 251) as u8 | 1);
            page[..8].copy_from_slice(&p.to_le_bytes());
            memory.write_page(p, &page);
        }
        let Some(before) = memory.hole_pages().filter(|h| h.count() > 0) else {
            skip("this file system does not report holes");
            return;
        };
        assert!(before.get(3) && !before.get(4) && before.get(pages - 1));
        // The guest writes across the first half: into data and into holes.
        let workload = GuestWorkload {
            working_set: 0.5,
            pattern: AccessPattern::Uniform,
            ..GuestWorkload::default()
        };
        let (mut source, dest) = configs(2, TransportChoice::Auto);
        source.verify = verify;
        let out =
            dwcp_tests::migrate_memory_as_it_is(memory, &workload, dirty, &source, &dest, None);
        out.guest.stop();
        let how = format!("{dirty}, verify {verify:?}");
        let report = out.source.unwrap_or_else(|e| panic!("{how}: {e}"));
        let received = out.dest.unwrap_or_else(|e| panic!("{how}: {e}"));
        // Before the comparison below, which reads every page.
        let after = out.memory.hole_pages().expect("a file");
        let kept = (pages / 2..pages).filter(|&p| after.get(p)).count() as u64;
        assert_eq!(
            kept,
            pages / 2,
            "{how}: the second half, which the guest never writes, stays holes on the source"
        );
        assert!(
            report.rounds[0].zero_pages >= before.count() - pages / 2,
            "{how}: round 0 sent the holes as zeros ({} zero pages)",
            report.rounds[0].zero_pages
        );
        if let Some(audit) = &report.audit {
            assert_eq!(audit.mismatched, 0, "{how}: {audit:?}");
        }
        assert_eq!(verify == VerifyMode::Audit, report.audit.is_some(), "{how}");
        assert_eq!(out.memory.first_difference(&received.memory), None, "{how}");
    }
}

/// All of memory written as fast as the vCPUs can: several rounds, auto-converge
/// throttling the guest, and still an identical destination. Each dirty tracker in turn.
#[test]
fn heavy_writer_converges_with_every_dirty_log() {
    for dirty in [
        DirtyLogKind::Uffd,
        DirtyLogKind::Rescan,
        DirtyLogKind::Explicit,
    ] {
        let workload = GuestWorkload {
            dirty_rate: f64::INFINITY,
            working_set: 1.0,
            pattern: AccessPattern::Uniform,
            writes: ContentMix::WRITES,
            vcpus: 2,
            seed: 99,
        };
        let (mut source, dest) = configs(2, TransportChoice::Auto);
        source.downtime_limit = Duration::from_millis(40);
        let out = migrate_live(64 << 20, &workload, dirty, &source, &dest);
        let report = out.source.unwrap_or_else(|e| panic!("{dirty}: {e}"));
        let received = out.dest.unwrap_or_else(|e| panic!("{dirty}: {e}"));
        assert_eq!(report.dirty_log, dirty.to_string());
        assert_eq!(
            out.memory.first_difference(&received.memory),
            None,
            "{dirty}"
        );
        // The downtime ends as the verdict reaches the source; the thread hop after
        // that is timed beside it (zero would mean no arrival was recorded).
        let measured = report.downtime.measured;
        assert!(
            measured.answer_lag > 0.0 && measured.answer_lag < 1.0,
            "{dirty}: {measured:?}"
        );
        // Visible in the test log: how hard the run was.
        let _ = writeln!(
            std::io::stderr(),
            "{dirty}: {} rounds, throttle up to {}%, downtime {:.1} ms",
            report.rounds.len(),
            report.max_throttle,
            report.measured_downtime * 1e3
        );
        out.guest.stop();
    }
}

/// A workload that cannot converge, with auto-converge off: the migration aborts after
/// its round limit, the destination is told, and the guest keeps running untouched.
#[test]
fn unconvergeable_workload_aborts_and_the_guest_keeps_running() {
    let workload = GuestWorkload {
        dirty_rate: f64::INFINITY,
        working_set: 1.0,
        pattern: AccessPattern::Uniform,
        writes: ContentMix::WRITES,
        vcpus: 2,
        seed: 7,
    };
    let (mut source, dest) = configs(2, TransportChoice::Auto);
    // Below what verification alone takes: no round can ever qualify.
    source.downtime_limit = Duration::from_micros(10);
    source.max_rounds = 4;
    source.auto_converge = false;
    let out = migrate_live(64 << 20, &workload, DirtyLogKind::Uffd, &source, &dest);
    match out.source {
        Err(MigrationError::Aborted { rounds, reason }) => {
            assert_eq!(rounds, 4);
            assert!(reason.contains("auto-converge off"), "{reason}");
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    let dest_err = out.dest.expect_err("the destination learns of the abort");
    assert!(
        dest_err.to_string().contains("source aborted"),
        "{dest_err}"
    );
    assert!(!out.guest.is_paused(), "the source guest must keep running");
    assert_eq!(out.guest.throttle(), 0, "and unthrottled");
    let before = out.guest.pages_written();
    while out.guest.pages_written() == before {
        std::thread::yield_now();
    }
    // And it can still be paused and resumed normally.
    out.guest.pause().unwrap();
    out.guest.resume();
    out.guest.stop();
}

/// The progress a migration reports follows the pages its workers have sent, not those
/// queued to them: on a slow path all of round 0 is queued long before it is sent, and
/// the reports go on while the workers drain it.
#[test]
fn progress_follows_the_pages_sent_and_goes_on_while_the_workers_drain_the_round() {
    let (mut source, dest) = configs(2, TransportChoice::Auto);
    // 2 × 8 MB/s: round 0's 22 MB of page content (32 MiB filled like a memory image)
    // takes more than a second to send, and is queued at once.
    source.transport.socket.pacing_rate = Some(8_000_000);
    let workload = GuestWorkload {
        dirty_rate: 1e6,
        ..GuestWorkload::default()
    };
    let (memory, guest, dirty_log) = running_guest(32 << 20, &workload, 11);
    let (addr, receiver) = spawn_destination(&dest);
    let mut reports: Vec<Progress> = Vec::new();
    let report = engine::migrate(addr, memory.clone(), &guest, dirty_log, &source, &mut |p| {
        reports.push(p.clone())
    })
    .expect("source side");
    let received = receiver
        .join()
        .expect("destination thread")
        .expect("destination");
    assert_eq!(received.digest, report.digest);
    guest.stop();
    for p in &reports {
        assert!(p.round_pages_sent <= p.round_pages_queued, "{p:?}");
    }
    let round_0: Vec<&Progress> = reports
        .iter()
        .filter(|p| p.round == 0 && p.phase == "precopy")
        .collect();
    assert!(
        round_0
            .windows(2)
            .all(|w| w[0].round_pages_sent <= w[1].round_pages_sent),
        "round 0's pages sent never go back"
    );
    let draining: Vec<u64> = round_0
        .iter()
        .filter(|p| p.round_pages_queued == p.round_pages && p.round_pages_sent < p.round_pages)
        .map(|p| p.round_pages_sent)
        .collect();
    assert!(
        draining.len() >= 2 && draining[0] < draining[draining.len() - 1],
        "reports while round 0, all queued, was being sent: {draining:?} (of {} pages)",
        round_0[0].round_pages
    );
}
