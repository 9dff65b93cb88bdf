//! Live reconfiguration of running migrations: each test changes one setting while
//! pages move (stream count, congestion control, pacing cap, codec policy, transport),
//! watches it
//! take effect on the live connections, and checks that the destination ends up
//! byte-identical. The latency of each change (publication to effect) is printed.

use crossbeam::channel::Receiver;
use dwcp_dataplane::codec::CodecSettings;
use dwcp_dataplane::codec::policy::CodecMode;
use dwcp_dataplane::engine::{
    DestConfig, LiveControl, LiveReport, LiveSettings, MigrationError, SourceConfig,
};
use dwcp_dataplane::guest::GuestWorkload;
use dwcp_dataplane::transport::socket::Congestion;
use dwcp_dataplane::transport::{TransportConfig, TransportKind};
use dwcp_tests::{Outcome, migrate_driven};
use std::io::Write;
use std::time::{Duration, Instant};

const MEMORY: usize = 192 << 20;
const STREAMS: u16 = 4;
/// A pacing cap that keeps round 0 going for a few seconds (192 MiB at 48 MB/s).
const SLOW: u64 = 48_000_000;
/// Longest wait for a change to show; the measured latency is printed.
const PATIENCE: Duration = Duration::from_secs(20);

fn configs() -> (SourceConfig, DestConfig) {
    let transport = TransportConfig::default();
    (
        SourceConfig {
            streams: STREAMS,
            transport: transport.clone(),
            // Rounds must not converge while a test watches them: the limit starts
            // out of reach, and [`finish`] sets a reachable one.
            downtime_limit: Duration::from_micros(1),
            max_rounds: 10_000,
            auto_converge: false,
            ..SourceConfig::default()
        },
        DestConfig {
            transport,
            ..DestConfig::default()
        },
    )
}

fn settings(source: &SourceConfig) -> LiveSettings {
    LiveSettings {
        pacing_rate: Some(SLOW),
        codec: CodecMode::Off,
        ..LiveSettings::from_config(source)
    }
}

fn workload() -> GuestWorkload {
    GuestWorkload {
        dirty_rate: 10e6,
        ..GuestWorkload::default()
    }
}

fn say(line: String) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Wait for a report satisfying `done` (printing how long it took); returns it.
fn wait_for(
    reports: &Receiver<LiveReport>,
    what: &str,
    done: impl Fn(&LiveReport) -> bool,
) -> LiveReport {
    let start = Instant::now();
    let mut last = None;
    loop {
        let left = PATIENCE.saturating_sub(start.elapsed());
        match reports.recv_timeout(left) {
            Ok(r) if done(&r) => {
                let took = start.elapsed();
                say(format!(
                    "{what}: took effect in {:.0} ms",
                    took.as_secs_f64() * 1e3
                ));
                return r;
            }
            Ok(r) => last = Some(r),
            Err(_) => panic!(
                "{what}: no effect within {PATIENCE:?}; last report: {:?}",
                last.map(|r| r.progress)
            ),
        }
    }
}

/// Wait until pages are moving (round 0 well under way).
fn wait_for_pages(reports: &Receiver<LiveReport>) {
    wait_for(reports, "round 0 under way", |r| {
        r.progress.pages_sent > 0 || r.progress.round_pages_queued > 4096
    });
}

fn publish(live: &LiveControl, change: impl FnOnce(&mut LiveSettings), why: &str) {
    let mut s = live.latest().settings.clone();
    change(&mut s);
    live.publish(s, why);
}

/// Let the migration converge: no cap, a reachable downtime limit.
fn finish(live: &LiveControl) {
    publish(
        live,
        |s| {
            s.pacing_rate = None;
            s.downtime_limit = Duration::from_millis(300);
        },
        "test: converge",
    );
}

fn assert_identical(out: Outcome) {
    let report = out.source.expect("source side");
    let received = out.dest.expect("destination side");
    assert_eq!(report.verified_pages, (MEMORY / 4096) as u64);
    assert_eq!(received.verified_pages, report.verified_pages);
    assert_eq!(received.digest, report.digest);
    assert_eq!(
        out.memory.first_difference(&received.memory),
        None,
        "destination differs from the source"
    );
    assert!(report.notes.is_empty(), "{:?}", report.notes);
}

#[test]
fn stream_count_changes_mid_migration_lose_nothing() {
    let (source, dest) = configs();
    let out = migrate_driven(
        MEMORY,
        &workload(),
        &source,
        &dest,
        settings(&source),
        |live, reports| {
            wait_for_pages(reports);
            publish(live, |s| s.active_streams = Some(2), "test: 2 streams");
            let at_switch = wait_for(reports, "4 -> 2 streams", |r| {
                r.progress.active_streams == 2
            });
            // Streams 2 and 3 carry nothing more.
            let pages_of = |r: &LiveReport, i: usize| r.progress.streams[i].pages;
            std::thread::sleep(Duration::from_millis(500));
            let later = reports.recv_timeout(PATIENCE).expect("a report");
            let later = reports.try_iter().last().unwrap_or(later);
            assert_eq!(pages_of(&later, 2), pages_of(&at_switch, 2));
            assert_eq!(pages_of(&later, 3), pages_of(&at_switch, 3));
            assert!(
                pages_of(&later, 0) > pages_of(&at_switch, 0),
                "stream 0 idle after the switch"
            );
            publish(live, |s| s.active_streams = Some(3), "test: 3 streams");
            let at_three = wait_for(reports, "2 -> 3 streams", |r| {
                r.progress.active_streams == 3
            });
            wait_for(reports, "stream 2 carries pages again", |r| {
                pages_of(r, 2) > pages_of(&at_three, 2)
            });
            finish(live);
        },
    );
    assert_identical(out);
}

#[test]
fn congestion_control_changes_mid_migration_lose_nothing() {
    let (source, dest) = configs();
    let start = source.transport.socket.congestion;
    let other = match start {
        Congestion::Cubic => Congestion::Bbr,
        Congestion::Bbr => Congestion::Cubic,
    };
    let out = migrate_driven(
        MEMORY,
        &workload(),
        &source,
        &dest,
        settings(&source),
        |live, reports| {
            wait_for_pages(reports);
            let all = |r: &LiveReport, c: Congestion| {
                r.progress
                    .streams
                    .iter()
                    .all(|s| s.tcp.is_some_and(|t| t.congestion == Some(c)))
            };
            wait_for(reports, "streams report their congestion control", |r| {
                all(r, start)
            });
            publish(
                live,
                |s| s.congestion = other,
                "test: switch congestion control",
            );
            wait_for(reports, &format!("{start} -> {other}"), |r| all(r, other));
            publish(live, |s| s.congestion = start, "test: switch back");
            wait_for(reports, &format!("{other} -> {start}"), |r| all(r, start));
            finish(live);
        },
    );
    assert_identical(out);
}

#[test]
fn pacing_cap_changes_mid_migration_lose_nothing() {
    let (source, dest) = configs();
    let out = migrate_driven(
        MEMORY,
        &workload(),
        &source,
        &dest,
        settings(&source),
        |live, reports| {
            wait_for_pages(reports);
            let capped = |r: &LiveReport, per_stream: u64| {
                r.progress
                    .streams
                    .iter()
                    .all(|s| s.tcp.is_some_and(|t| t.max_pacing_rate == per_stream))
            };
            wait_for(reports, "initial cap", |r| {
                capped(r, SLOW / u64::from(STREAMS))
            });
            let tighter = 20_000_000;
            publish(live, |s| s.pacing_rate = Some(tighter), "test: tighter cap");
            let at = wait_for(reports, "cap 48 -> 20 MB/s", |r| {
                capped(r, tighter / u64::from(STREAMS))
            });
            // The cap holds: bytes over the next second stay near it.
            std::thread::sleep(Duration::from_secs(1));
            let later = reports.try_iter().last().expect("reports keep coming");
            let bytes = |r: &LiveReport| r.progress.streams.iter().map(|s| s.bytes).sum::<u64>();
            let rate =
                (bytes(&later) - bytes(&at)) as f64 / later.at.duration_since(at.at).as_secs_f64();
            say(format!("rate under a {tighter} B/s cap: {rate:.0} B/s"));
            // The socket buffers still drain at the old rate for a moment; well below the
            // old cap all the same.
            assert!(
                rate < SLOW as f64 * 0.8,
                "rate {rate:.0} B/s under a cap of {tighter}"
            );
            finish(live);
            wait_for(reports, "cap removed", |r| capped(r, u64::MAX));
        },
    );
    assert_identical(out);
}

#[test]
fn codec_policy_changes_mid_migration_lose_nothing() {
    let (source, dest) = configs();
    let out = migrate_driven(
        MEMORY,
        &workload(),
        &source,
        &dest,
        settings(&source),
        |live, reports| {
            wait_for_pages(reports);
            let zstd = CodecSettings {
                dictionary: false,
                ..CodecSettings::full(3)
            };
            publish(live, |s| s.codec = CodecMode::Fixed(zstd), "test: zstd:3");
            let on = wait_for(reports, "codecs off -> zstd:3", |r| {
                r.progress
                    .workers
                    .iter()
                    .all(|w| w.telemetry.settings.level == Some(3))
            });
            let coded = |r: &LiveReport| {
                r.progress
                    .workers
                    .iter()
                    .map(|w| w.telemetry.codec.batches)
                    .sum::<u64>()
            };
            wait_for(reports, "pages go through the codecs", |r| {
                coded(r) > coded(&on)
            });
            publish(live, |s| s.codec = CodecMode::Off, "test: codecs off");
            wait_for(reports, "zstd:3 -> off", |r| {
                r.progress
                    .workers
                    .iter()
                    .all(|w| w.telemetry.settings.is_off())
            });
            finish(live);
        },
    );
    assert_identical(out);
}

#[test]
fn transport_switches_mid_migration_lose_nothing() {
    let (source, dest) = configs();
    if dwcp_dataplane::transport::probe(&source.transport).kind != TransportKind::IoUring {
        eprintln!("skipped: io_uring is unavailable here, so there is nothing to switch from");
        return;
    }
    // With codecs on, so that the switch also carries codec settings over and the new
    // workers start with empty caches while the destination keeps its memory.
    let zstd = CodecSettings {
        dictionary: false,
        ..CodecSettings::full(3)
    };
    let mut start = settings(&source);
    start.codec = CodecMode::Fixed(zstd);
    let out = migrate_driven(
        MEMORY,
        &workload(),
        &source,
        &dest,
        start,
        |live, reports| {
            wait_for_pages(reports);
            let pages = |r: &LiveReport| r.progress.streams.iter().map(|s| s.pages).sum::<u64>();
            let sent = |r: &LiveReport| r.progress.streams.iter().map(|s| s.bytes).sum::<u64>();
            let coded = |r: &LiveReport| {
                r.progress.workers.len() == usize::from(STREAMS)
                    && r.progress
                        .workers
                        .iter()
                        .all(|w| w.telemetry.settings.level == Some(3))
            };
            publish(
                live,
                |s| s.transport = Some(TransportKind::Plain),
                "test: plain sockets",
            );
            // Plain sockets run one worker per stream.
            let plain = wait_for(reports, "io_uring -> plain", |r| {
                r.progress.transport == TransportKind::Plain && coded(r)
            });
            wait_for(reports, "pages move on plain sockets", |r| {
                pages(r) > pages(&plain)
            });
            publish(live, |s| s.transport = None, "test: back to io_uring");
            let uring = wait_for(reports, "plain -> io_uring", |r| {
                r.progress.transport == TransportKind::IoUring
            });
            // Well past what a worker may have queued before the engine has measured
            // it (counters that restarted with the new workers once stalled it there).
            let queued_bound = 4 * 1024 * u64::from(STREAMS);
            let bytes_before = std::cell::Cell::new(sent(&uring));
            wait_for(reports, "pages keep moving on io_uring", |r| {
                // Per-stream counters carry on across the switch: they never go back.
                assert!(sent(r) >= bytes_before.get(), "stream bytes went back");
                bytes_before.set(sent(r));
                pages(r) > pages(&uring) + queued_bound
            });
            finish(live);
        },
    );
    let notes = &out.source.as_ref().expect("source side").transport.notes;
    for change in ["io_uring → plain", "plain → io_uring"] {
        assert!(
            notes.iter().any(|n| n.contains(change)),
            "no note of {change}: {notes:?}"
        );
    }
    assert_identical(out);
}

#[test]
fn cancelled_migration_leaves_the_source_running() {
    let (source, dest) = configs();
    let out = migrate_driven(
        MEMORY,
        &workload(),
        &source,
        &dest,
        settings(&source),
        |live, reports| {
            wait_for_pages(reports);
            live.cancel("test: operator cancelled");
        },
    );
    match &out.source {
        Err(MigrationError::Aborted { reason, .. }) => {
            assert!(reason.contains("test: operator cancelled"), "{reason}")
        }
        other => panic!("source: {other:?}"),
    }
    match &out.dest {
        Err(e) => assert!(e.to_string().contains("source aborted"), "{e}"),
        Ok(_) => panic!("the destination completed a cancelled migration"),
    }
    // The guest was never paused and still runs, unthrottled, on the source.
    assert!(!out.guest.is_paused());
    assert_eq!(out.guest.throttle(), 0);
    let written = out.guest.pages_written();
    let deadline = Instant::now() + PATIENCE;
    while out.guest.pages_written() == written {
        assert!(Instant::now() < deadline, "the guest stopped writing");
        std::thread::sleep(Duration::from_millis(10));
    }
    out.guest.stop();
}

#[test]
fn a_stream_replaced_on_request_hands_its_pages_over_and_comes_back() {
    let (source, dest) = configs();
    let out = migrate_driven(
        MEMORY,
        &workload(),
        &source,
        &dest,
        settings(&source),
        |live, reports| {
            wait_for_pages(reports);
            live.replace_stream(1, "test: going bad");
            live.replace_stream(9, "test: no such stream");
            // The replacement carries it again from a round boundary on.
            wait_for(reports, "two rounds after the request", |r| {
                r.progress.round >= 2
            });
            finish(live);
        },
    );
    let report = out.source.as_ref().expect("source side");
    let received = out.dest.as_ref().expect("destination side");
    assert_eq!(received.verified_pages, (MEMORY / 4096) as u64);
    assert_eq!(out.memory.first_difference(&received.memory), None);
    let lost = &report.transport.streams_lost;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].stream, 1);
    assert!(
        lost[0]
            .reason
            .contains("replaced as asked: test: going bad"),
        "{lost:?}"
    );
    assert!(lost[0].restored_from_round.is_some(), "{lost:?}");
    // A stream the session does not have is refused in the notes, not by failing.
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("data stream 9 not replaced") && n.contains("4 data streams")),
        "{:?}",
        report.notes
    );
}
