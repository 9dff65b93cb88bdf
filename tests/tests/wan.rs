//! Live migrations across emulated wide-area paths (`wanem` scenarios): each must
//! finish with the destination byte-identical to the source. Needs root for the
//! emulator's namespaces; skips with the reason otherwise.

use dwcp_control::codec_policy::{ModelPolicy, PolicyConfig};
use dwcp_dataplane::dirty::DirtyLogKind;
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use dwcp_tests::skip;
use dwcp_tests::wan::{internet_profile, migrate_across};
use std::sync::{Arc, Mutex};
use wanem::scenario::Scenario;
use wanem::{Emulator, EmulatorConfig};

/// One emulator at a time: both tests want the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn migrate_through(scenario_name: &str, bytes: usize) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = Scenario::built_in(scenario_name).expect("shipped scenario");
    let name = format!("dw{}-{}", std::process::id() % 100_000, &scenario_name[..3]);
    let emulator = match Emulator::start(EmulatorConfig::new(&name, scenario)) {
        Ok(emulator) => emulator,
        Err(wanem::Error::NotRoot) => {
            skip("the WAN emulator needs root (network namespaces, TUN devices)");
            return;
        }
        Err(e) => panic!("emulator: {e}"),
    };
    let memory =
        Arc::new(GuestMemory::anonymous(bytes, PagePreference::TransparentHuge).expect("memory"));
    let workload = GuestWorkload {
        dirty_rate: 4e6,
        working_set: 0.1,
        vcpus: 1,
        ..GuestWorkload::default()
    };
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
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
    assert_eq!(format!("{:08x}", received.digest), report.digest);
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
