//! Live migrations across emulated wide-area paths (`wanem` scenarios): each must
//! finish with the destination byte-identical to the source, and the mode detector
//! must classify every shipped scenario as expected from the live connections. Needs
//! root for the emulator's namespaces; skips with the reason otherwise.

use dwcp_control::codec_policy::{ModelPolicy, PolicyConfig};
use dwcp_control::mode::{DetectorConfig, LinkMeter, Mode, ModeDetector};
use dwcp_dataplane::dirty::DirtyLogKind;
use dwcp_tests::wan::{internet_profile, live_settings, migrate_across, migrate_across_driven};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use wanem::Emulator;

/// One emulator at a time: both tests want the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// The emulator for a shipped scenario, or `None` (said why) without root.
fn emulate(scenario_name: &str) -> Option<Emulator> {
    dwcp_tests::wan::emulate(scenario_name, &scenario_name[..3])
}

fn migrate_through(scenario_name: &str, bytes: usize) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(emulator) = emulate(scenario_name) else {
        return;
    };
    let (memory, workload) = dwcp_tests::wan::filled_guest(bytes, 4e6, 0.1);
    let (source, dest) = internet_profile();
    let mut policy = ModelPolicy::new(PolicyConfig {
        levels: source.codec.levels.clone(),
        ..PolicyConfig::default()
    });
    let (out, seconds) = migrate_across(
        &emulator,
        memory,
        &workload,
        DirtyLogKind::Uffd,
        &source,
        &dest,
        Some(&mut policy),
    );
    let report = out
        .source
        .unwrap_or_else(|e| panic!("{scenario_name}: source side: {e}"));
    let received = out
        .dest
        .unwrap_or_else(|e| panic!("{scenario_name}: destination side: {e}"));
    eprintln!(
        "{scenario_name}: {} MiB in {seconds:.2} s\n{report}",
        bytes >> 20
    );
    assert_eq!(report.verified_pages, (bytes / 4096) as u64);
    assert_eq!(received.digest, report.digest);
    assert_eq!(
        out.memory.first_difference(&received.memory),
        None,
        "{scenario_name}: memory differs"
    );
    let forward = emulator.stats().forward;
    assert!(forward.bytes_out > 0, "nothing crossed the emulated link");
    if scenario_name == "lossy" {
        assert!(forward.lost > 0, "the lossy path lost nothing: {forward:?}");
    }
    out.guest.stop();
}

#[test]
fn live_migration_across_cross_region_is_byte_identical() {
    migrate_through("cross-region", 128 << 20);
}

#[test]
fn live_migration_across_a_lossy_path_is_byte_identical() {
    migrate_through("lossy", 64 << 20);
}

/// Reports (one per 100 ms of the engine's clock) within which the detector must
/// settle: 5 s of them.
const CLASSIFY_WITHIN_REPORTS: usize = 50;

/// Run a migration across `scenario_name`, feed its reports to the daemon's link meter
/// and mode detector, and return the mode it settled on, the reports it took, the time
/// from the first report, and every mode it reported on the way.
fn classify_scenario(scenario_name: &str) -> Option<(Option<Mode>, usize, Duration, Vec<Mode>)> {
    let emulator = emulate(scenario_name)?;
    let bytes = 256 << 20;
    let (memory, workload) = dwcp_tests::wan::filled_guest(bytes, 8e6, 0.1);
    // Rounds never converge: the migration runs until the detector has spoken.
    let (mut source, dest) = internet_profile();
    source.streams = 8;
    source.downtime_limit = Duration::from_micros(1);
    source.max_rounds = 10_000;
    source.auto_converge = false;
    let settings = live_settings(&source);
    let mut outcome = None;
    let (out, _) = migrate_across_driven(
        &emulator,
        memory,
        &workload,
        &source,
        &dest,
        settings,
        None,
        |live, reports| {
            let mut meter = LinkMeter::default();
            let mut detector = ModeDetector::new(DetectorConfig::default());
            let origin = Instant::now();
            let mut first: Option<Instant> = None;
            let mut seen = Vec::new();
            let mut settled = None;
            let mut count = 0usize;
            // Past the settling point, another second of reports for any flapping.
            let mut until = None;
            while let Ok(r) = reports.recv_timeout(Duration::from_secs(30)) {
                let at = *first.get_or_insert(r.at);
                count += 1;
                if let Some(sample) = meter.sample(&r.progress, r.at, origin)
                    && let Some(mode) = detector.push(sample)
                {
                    seen.push(mode);
                    if settled.is_none() {
                        settled = Some((count, r.at.duration_since(at)));
                        until = Some(count + 10);
                    }
                }
                if until.is_some_and(|u| count >= u) || count >= CLASSIFY_WITHIN_REPORTS + 10 {
                    break;
                }
            }
            eprintln!("{scenario_name}: {}", detector.why());
            live.cancel("test: classified");
            let (reports_taken, after) = settled.unwrap_or((count, Duration::ZERO));
            outcome = Some((detector.mode(), reports_taken, after, seen));
        },
    );
    out.guest.stop();
    outcome
}

#[test]
fn every_scenario_is_classified_as_expected_within_5_s() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (scenario_name, expected) in [
        ("datacenter", Mode::Datacenter),
        ("metro", Mode::Datacenter),
        ("cross-region", Mode::Internet),
        ("intercontinental", Mode::Internet),
        ("satellite", Mode::Internet),
        ("lossy", Mode::Internet),
        ("constrained", Mode::Internet),
    ] {
        let Some((mode, reports, after, seen)) = classify_scenario(scenario_name) else {
            return;
        };
        eprintln!(
            "{scenario_name}: {mode:?} after {reports} reports ({:.1} s from the first), modes on the way {seen:?}",
            after.as_secs_f64()
        );
        assert_eq!(mode, Some(expected), "{scenario_name}: modes {seen:?}");
        assert!(
            reports <= CLASSIFY_WITHIN_REPORTS,
            "{scenario_name}: settled only after {reports} reports"
        );
        assert_eq!(seen, vec![expected], "{scenario_name}: the mode flapped");
    }
}
