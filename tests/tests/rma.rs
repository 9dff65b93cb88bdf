//! Migrations whose pages go by RMA write (libfabric's `tcp` provider on loopback: real
//! RMA semantics over sockets), each checked byte for byte, and the ways RMA can go
//! wrong: a window smaller than memory, writes outside the window, writes that land
//! wrong.
//!
//! Tests that need a test switch (read once per process) run themselves again in a
//! child process with the switch set.

use dwcp_dataplane::codec::CodecSettings;
use dwcp_dataplane::codec::policy::{CodecConfig, CodecMode};
use dwcp_dataplane::dirty::DirtyLogKind;
use dwcp_dataplane::engine::{
    DestConfig, LiveControl, LiveReport, LiveSettings, MigrationError, SourceConfig,
};
use dwcp_dataplane::guest::{AccessPattern, ContentMix, GuestWorkload};
use dwcp_dataplane::transport::{TransportChoice, TransportConfig, TransportKind};
use dwcp_tests::{Outcome, migrate_driven, migrate_live, skip};
use std::time::{Duration, Instant};

const MIB_64: usize = 64 << 20;
/// Set in the child process a test runs itself in.
const CHILD: &str = "DWCP_TEST_RMA_CHILD";

/// Whether this machine has libfabric's tcp provider (else the reason is printed).
fn rma_here() -> bool {
    match dwcp_dataplane::transport::fabric::providers() {
        Ok(list) if list.iter().any(|p| p.provider == "tcp") => true,
        Ok(list) => {
            skip(&format!(
                "no libfabric tcp provider with RMA here ({list:?})"
            ));
            false
        }
        Err(e) => {
            skip(&format!("no RMA: {e}"));
            false
        }
    }
}

fn busy_guest() -> GuestWorkload {
    GuestWorkload {
        dirty_rate: 100e6,
        working_set: 0.25,
        pattern: AccessPattern::HotCold {
            hot_fraction: 0.2,
            hot_share: 0.9,
        },
        writes: ContentMix::WRITES,
        vcpus: 1,
        seed: 11,
    }
}

fn configs(streams: u16, codec: CodecMode) -> (SourceConfig, DestConfig) {
    let transport = TransportConfig {
        choice: TransportChoice::Rma,
        ..TransportConfig::default()
    };
    (
        SourceConfig {
            streams,
            transport: transport.clone(),
            codec: CodecConfig {
                mode: codec,
                ..CodecConfig::default()
            },
            downtime_limit: Duration::from_millis(300),
            ..SourceConfig::default()
        },
        DestConfig {
            transport,
            ..DestConfig::default()
        },
    )
}

/// Whether test `name`'s body runs in this process: in the child it is. In the test
/// process it runs the test again in a child with `env` set, asserts that it passed,
/// and says no.
fn in_child(name: &str, env: &[(&str, &str)]) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .envs(env.iter().copied())
        .status()
        .unwrap();
    assert!(status.success(), "{name} failed in its child process");
    false
}

/// A migration that must fail with the source's guest still running and the
/// destination ending the session too: the source's error.
fn failed_migration() -> MigrationError {
    let (source, dest) = configs(2, CodecMode::Off);
    let out = migrate_live(MIB_64, &busy_guest(), DirtyLogKind::Uffd, &source, &dest);
    // The guest ran on untouched: the source's memory is its own throughout.
    assert!(!out.guest.is_paused(), "the source guest still runs");
    out.guest.stop();
    assert!(out.dest.is_err(), "the destination ends the session too");
    match out.source {
        Err(e) => e,
        Ok(_) => panic!("the migration succeeded"),
    }
}

/// A migration that must succeed: memory equal byte for byte, RMA used.
fn check_migrated(out: Outcome) -> (dwcp_dataplane::engine::MigrationReport, u64) {
    let report = out.source.expect("source side");
    let received = out.dest.expect("destination side");
    assert_eq!(received.digest, report.digest);
    assert_eq!(
        out.memory.first_difference(&received.memory),
        None,
        "source and destination differ"
    );
    out.guest.stop();
    let rma = report
        .transport
        .rma
        .clone()
        .expect("the session wrote by RMA");
    assert_eq!(rma.provider, "tcp");
    assert!(
        rma.socket_based,
        "the report says there is no RDMA hardware"
    );
    assert_eq!(received.rma_provider.as_deref(), Some("tcp"));
    assert_eq!(received.rma_pages_resent, rma.pages_resent);
    (report, received.rma_pages_resent)
}

#[test]
fn pages_written_by_rma_while_the_guest_writes_arrive_intact() {
    if !rma_here() {
        return;
    }
    let started = Instant::now();
    let (source, dest) = configs(2, CodecMode::Off);
    let out = migrate_live(MIB_64, &busy_guest(), DirtyLogKind::Uffd, &source, &dest);
    let (report, _) = check_migrated(out);
    let rma = report.transport.rma.as_ref().unwrap();
    assert!(
        rma.pages > 0 && rma.writes > 0,
        "pages went by RMA: {rma:?}"
    );
    assert!(
        report.rounds.len() >= 2,
        "pre-copy rounds and the final one"
    );
    eprintln!("{report}");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn codec_frames_and_rma_share_a_session() {
    if !rma_here() {
        return;
    }
    let (source, dest) = configs(2, CodecMode::Fixed(CodecSettings::full(1)));
    let out = migrate_live(MIB_64, &busy_guest(), DirtyLogKind::Uffd, &source, &dest);
    let (report, _) = check_migrated(out);
    assert!(report.codec.is_some(), "codecs ran");
    eprintln!("{report}");
}

#[test]
fn pages_that_land_wrong_are_sent_again_and_counted() {
    const NAME: &str = "pages_that_land_wrong_are_sent_again_and_counted";
    if !rma_here() {
        return;
    }
    if !in_child(NAME, &[("DWCP_TEST_RMA_CORRUPT_WRITES", "5")]) {
        return;
    }
    let (source, dest) = configs(2, CodecMode::Off);
    let out = migrate_live(MIB_64, &busy_guest(), DirtyLogKind::Uffd, &source, &dest);
    let (report, resent) = check_migrated(out);
    // Five writes landed their first page with the neighbour's bytes; a page whose
    // neighbour holds the same bytes cannot be told apart, so at least one.
    assert!(resent >= 1, "pages sent again: {resent}");
    eprintln!("{report}");
}

#[test]
fn a_window_smaller_than_memory_is_refused_before_any_write() {
    const NAME: &str = "a_window_smaller_than_memory_is_refused_before_any_write";
    if !rma_here() {
        return;
    }
    if !in_child(
        NAME,
        &[("DWCP_TEST_RMA_WINDOW_BYTES", &(32u64 << 20).to_string())],
    ) {
        return;
    }
    match failed_migration() {
        MigrationError::Refused(why) => {
            assert!(why.contains("smaller than the guest's memory"), "{why}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn writes_outside_the_window_fail_the_migration_cleanly() {
    const NAME: &str = "writes_outside_the_window_fail_the_migration_cleanly";
    if !rma_here() {
        return;
    }
    if !in_child(
        NAME,
        &[("DWCP_TEST_RMA_REMOTE_SHIFT", &(16u64 << 20).to_string())],
    ) {
        return;
    }
    let text = failed_migration().to_string();
    assert!(text.contains("RMA write failed"), "{text}");
}

#[test]
fn a_source_that_cannot_connect_declines_and_sends_frames() {
    const NAME: &str = "a_source_that_cannot_connect_declines_and_sends_frames";
    if !rma_here() {
        return;
    }
    if !in_child(NAME, &[("DWCP_TEST_RMA_OFFER_PORT", "1")]) {
        return;
    }
    let (source, dest) = configs(2, CodecMode::Off);
    let out = migrate_live(MIB_64, &busy_guest(), DirtyLogKind::Uffd, &source, &dest);
    let report = out.source.expect("source side");
    let received = out.dest.expect("destination side");
    assert_eq!(out.memory.first_difference(&received.memory), None);
    out.guest.stop();
    assert!(report.transport.rma.is_none(), "nothing went by RMA");
    assert!(received.rma_provider.is_none());
    assert!(
        report
            .transport
            .notes
            .iter()
            .any(|n| n.contains("could not be set up") && n.contains("pages go as frames")),
        "{:?}",
        report.transport.notes
    );
}

/// Wait for a live report satisfying `done` (at most 20 s); returns it.
fn wait_for(
    reports: &crossbeam::channel::Receiver<LiveReport>,
    what: &str,
    done: impl Fn(&LiveReport) -> bool,
) -> LiveReport {
    let patience = Duration::from_secs(20);
    let start = Instant::now();
    let mut last = None;
    loop {
        match reports.recv_timeout(patience.saturating_sub(start.elapsed())) {
            Ok(r) if done(&r) => {
                eprintln!("{what}: after {:?}", start.elapsed());
                return r;
            }
            Ok(r) => last = Some(r),
            Err(_) => panic!(
                "{what}: not within {patience:?}; last report: {:?}",
                last.map(|r| (r.progress.transport, r.progress.round, r.progress.streams))
            ),
        }
    }
}

fn publish(live: &LiveControl, change: impl FnOnce(&mut LiveSettings), why: &str) {
    let mut s = live.latest().settings.clone();
    change(&mut s);
    live.publish(s, why);
}

#[test]
fn a_live_switch_between_rma_and_io_uring_loses_nothing() {
    if !rma_here() {
        return;
    }
    let (mut source, dest) = configs(2, CodecMode::Off);
    if dwcp_dataplane::transport::probe(&source.transport).kind != TransportKind::IoUring {
        skip("io_uring unavailable: the switch would be to plain sockets, tested elsewhere");
        return;
    }
    // Rounds go on until the test lets them converge.
    source.downtime_limit = Duration::from_micros(1);
    source.max_rounds = 10_000;
    source.auto_converge = false;
    let start = LiveSettings::from_config(&source);
    assert_eq!(start.transport, Some(TransportKind::Rma));
    let out = migrate_driven(
        MIB_64,
        &busy_guest(),
        &source,
        &dest,
        start,
        |live, reports| {
            let pages = |r: &LiveReport| r.progress.streams.iter().map(|s| s.pages).sum::<u64>();
            let on_rma = wait_for(reports, "pages go by RMA", |r| {
                r.progress.transport == TransportKind::Rma && pages(r) > 0
            });
            publish(
                live,
                |s| s.transport = Some(TransportKind::IoUring),
                "test: frames on io_uring",
            );
            let on_uring = wait_for(reports, "rma -> io_uring", |r| {
                r.progress.transport == TransportKind::IoUring && pages(r) > pages(&on_rma)
            });
            wait_for(reports, "pages move as frames", |r| {
                pages(r) > pages(&on_uring) + 4096
            });
            publish(live, |s| s.transport = None, "test: back to RMA, as opened");
            let back = wait_for(reports, "io_uring -> rma", |r| {
                r.progress.transport == TransportKind::Rma
            });
            wait_for(reports, "pages go by RMA again", |r| {
                pages(r) > pages(&back) + 4096
            });
            publish(
                live,
                |s| s.downtime_limit = Duration::from_millis(300),
                "test: converge",
            );
        },
    );
    let (report, _) = check_migrated(out);
    for change in ["rma → io_uring", "io_uring → rma"] {
        assert!(
            report.transport.notes.iter().any(|n| n.contains(change)),
            "no note of {change}: {:?}",
            report.transport.notes
        );
    }
}
