//! The device-state phase of the protocol, engine to engine: a guest with device state
//! hands it over after the verdict, in order and complete, and the downtime ends when
//! the destination says its guest runs; either side without the other's counterpart is
//! refused before anything moves; a destination that cannot load the state gives the
//! guest back to the source. (The real thing, QEMU on both sides, is in
//! `control/tests/qemu_guest.rs`.)

use dwcp_dataplane::dirty::{DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{self, DestConfig, DestMemory, MigrationError, SourceConfig};
use dwcp_dataplane::guest::{
    ContentMix, DeviceStateSink, DeviceStateSource, GuestControl, GuestError, GuestWorkload,
    SimulatedGuest, fill_memory,
};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

const MEMORY: usize = 64 << 20;

/// The device state: 1 MiB + 3 bytes (several chunks, one partial), each byte its
/// offset's hash so that a reordered or dropped chunk shows.
fn device_bytes() -> Vec<u8> {
    (0..(1usize << 20) + 3)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The simulated guest with a device state, handed over in uneven pieces; it counts
/// the resumes the engine asks for.
struct GuestWithDevice {
    vcpus: SimulatedGuest,
    resumes: AtomicU32,
}

impl GuestControl for GuestWithDevice {
    fn pause(&self) -> Result<Option<std::time::Instant>, GuestError> {
        self.vcpus.pause()
    }
    fn resume(&self) {
        self.resumes.fetch_add(1, Ordering::Relaxed);
        self.vcpus.resume();
    }
    fn set_throttle(&self, percent: u32) {
        self.vcpus.set_throttle(percent);
    }
    fn device_state(&self) -> Option<&dyn DeviceStateSource> {
        Some(self)
    }
}

impl DeviceStateSource for GuestWithDevice {
    fn hand_over(
        &self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), GuestError>,
    ) -> Result<u64, GuestError> {
        let bytes = device_bytes();
        for piece in bytes.chunks(300_001) {
            sink(piece)?;
        }
        Ok(bytes.len() as u64)
    }
}

/// A destination device that keeps what it was given; it refuses to start when told.
#[derive(Default)]
struct Collected {
    bytes: Vec<u8>,
    finished: bool,
    refuse_to_start: bool,
}

impl DeviceStateSink for Collected {
    fn write(&mut self, chunk: &[u8]) -> Result<(), GuestError> {
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }
    fn finish(&mut self) -> Result<(), GuestError> {
        if self.refuse_to_start {
            return Err(GuestError(
                "the device state names a CPU model this host lacks".into(),
            ));
        }
        self.finished = true;
        Ok(())
    }
}

struct Run {
    source: Result<engine::MigrationReport, MigrationError>,
    dest: Result<engine::DestReport, MigrationError>,
    collected: Option<Collected>,
    resumes: u32,
}

fn run(source_has_device: bool, dest_sink: Option<Collected>) -> Run {
    let memory = Arc::new(GuestMemory::anonymous(MEMORY, PagePreference::TransparentHuge).unwrap());
    let workload = GuestWorkload::default();
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).unwrap();
    let guest = GuestWithDevice {
        vcpus: SimulatedGuest::start(memory.clone(), &workload, opened.marker.clone()),
        resumes: AtomicU32::new(0),
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Arc::new(Mutex::new(dest_sink));
    let dest_sink = sink.clone();
    let receiver = std::thread::spawn(move || {
        let mut slot = dest_sink.lock().unwrap();
        engine::receive_guest(
            &listener,
            DestMemory::Allocate(PagePreference::TransparentHuge),
            &DestConfig::default(),
            &AtomicBool::new(false),
            slot.as_mut().map(|s| s as &mut dyn DeviceStateSink),
        )
    });
    let config = SourceConfig::default();
    let source = if source_has_device {
        engine::migrate(addr, memory, &guest, opened.log, &config, &mut |_| {})
    } else {
        engine::migrate(addr, memory, &guest.vcpus, opened.log, &config, &mut |_| {})
    };
    let dest = receiver.join().unwrap();
    guest.vcpus.stop();
    let collected = sink.lock().unwrap().take();
    Run {
        source,
        dest,
        collected,
        resumes: guest.resumes.load(Ordering::Relaxed),
    }
}

#[test]
fn the_device_state_arrives_whole_and_in_order_after_the_verdict() {
    let out = run(true, Some(Collected::default()));
    let report = out.source.expect("the migration completes");
    let dest = out.dest.expect("the destination completes");
    let collected = out.collected.unwrap();
    assert!(collected.finished, "the destination started its guest");
    assert_eq!(collected.bytes, device_bytes());
    assert_eq!(report.device_state_bytes, device_bytes().len() as u64);
    assert_eq!(dest.device_state_bytes, report.device_state_bytes);
    let measured = report.downtime.measured;
    assert!(measured.device_state > 0.0 && measured.device_state < measured.total);
    // The downtime ends as the guest's word that it runs reaches the source; the
    // thread hop after that is timed beside it (zero: no arrival recorded).
    assert!(measured.answer_lag > 0.0 && measured.answer_lag < 1.0);
    assert_eq!(out.resumes, 0);
}

#[test]
fn a_guest_with_device_state_and_a_destination_without_a_vm_do_not_meet() {
    let out = run(true, None);
    let Err(MigrationError::Refused(why)) = out.source else {
        panic!("refused, not {:?}", out.source.map(|_| ()));
    };
    assert!(why.contains("no VM to load it into"), "{why}");
    assert!(out.dest.is_err());

    let out = run(false, Some(Collected::default()));
    let Err(MigrationError::Refused(why)) = out.source else {
        panic!("refused, not {:?}", out.source.map(|_| ()));
    };
    assert!(why.contains("guest without one"), "{why}");
    assert!(out.collected.unwrap().bytes.is_empty());
}

#[test]
fn a_destination_that_cannot_start_the_guest_gives_it_back_to_the_source() {
    let out = run(
        true,
        Some(Collected {
            refuse_to_start: true,
            ..Collected::default()
        }),
    );
    let Err(MigrationError::Guest(why)) = out.source else {
        panic!("a guest error, not {:?}", out.source.map(|_| ()));
    };
    assert!(why.contains("CPU model"), "{why}");
    assert!(matches!(out.dest, Err(MigrationError::Guest(_))));
    assert_eq!(out.resumes, 1, "the source took its guest back");
}
