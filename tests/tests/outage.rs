//! The whole path goes away for 5 s, in round 0 and again in a later round, across an
//! emulated cross-region link (`wanem`): every stream stops at once, the source sees
//! that the path is out (not a stream) and waits, and the migration completes,
//! verified, once the path is back. Needs root for the emulator; skips with the reason
//! otherwise.

use dwcp_tests::wan::{internet_profile, migrate_across_driven};
use std::time::{Duration, Instant};
use wanem::Emulator;

const GUEST: usize = 256 << 20;
const OUTAGE: Duration = Duration::from_secs(5);

/// Take the path out for [`OUTAGE`].
fn outage(emulator: &Emulator, what: &str) {
    eprintln!("outage ({what}): the path is out for {OUTAGE:?}");
    dwcp_tests::wan::path_out_for(emulator, OUTAGE);
    eprintln!("outage ({what}): the path is back");
}

#[test]
fn outages_of_5_s_in_round_0_and_in_a_later_round_are_waited_out() {
    let started = Instant::now();
    let Some(emulator) = dwcp_tests::wan::emulate("cross-region", "out") else {
        return;
    };
    // Busy enough that round 1 takes about half a second, long enough to be caught
    // by the reports (every 100 ms) and cut by the second outage.
    let (memory, workload) = dwcp_tests::wan::filled_guest(GUEST, 20e6, 0.5);
    let (mut source, dest) = internet_profile();
    source.streams = 8;
    // Tight enough that the pages dirtied during the first outage take a round of
    // their own, so that there is a later round for the second.
    source.downtime_limit = Duration::from_millis(150);
    let settings = dwcp_tests::wan::live_settings(&source);
    let mut outages = Vec::new();
    let (out, seconds) = migrate_across_driven(
        &emulator,
        memory,
        &workload,
        &source,
        &dest,
        settings,
        None,
        |_live, reports| {
            let mut next = 0;
            // Reports stop when the migration ends.
            while let Ok(r) = reports.recv_timeout(Duration::from_secs(3)) {
                let p = &r.progress;
                let due = match next {
                    // A fifth of memory into round 0.
                    0 => p.round == 0 && p.pages_sent * 5 >= p.memory_pages,
                    // Once a later round is under way.
                    1 => p.round >= 1 && p.phase == "precopy",
                    _ => false,
                };
                if due {
                    let what = format!("round {}, {} pages sent", p.round, p.pages_sent);
                    outage(&emulator, &what);
                    outages.push(what);
                    next += 1;
                }
            }
        },
    );
    let report = out.source.unwrap_or_else(|e| panic!("source side: {e}"));
    let received = out.dest.unwrap_or_else(|e| panic!("destination side: {e}"));
    eprintln!("{} MiB in {seconds:.2} s\n{report}", GUEST >> 20);
    assert_eq!(outages.len(), 2, "outages: {outages:?}");
    assert_eq!(received.digest, report.digest);
    assert_eq!(out.memory.first_difference(&received.memory), None);
    // Both outages were recognised as the path's: every stream waited for it. A stream
    // whose TCP retransmissions stay backed off well after the path is back may still be
    // given up and replaced; its pages are what the report counts as queued again.
    let waited = report
        .notes
        .iter()
        .filter(|n| n.contains("the path was out"))
        .count();
    assert!(waited >= 2, "{:?}", report.notes);
    let requeued = report.transport.pages_requeued();
    eprintln!(
        "outages: {outages:?}; streams given up afterwards: {}; pages queued again: {requeued} ({:.1}% of memory)",
        report.transport.streams_lost.len(),
        requeued as f64 * 100.0 / report.pages as f64
    );
    out.guest.stop();
    eprintln!("outage test took {:.1} s", started.elapsed().as_secs_f64());
}
