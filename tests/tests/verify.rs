//! What each switchover verification proves, shown with faults injected on purpose: a
//! dirty log that drops one write, and a source CRC table that disagrees with what was
//! sent. (A page corrupted on the wire is refused by the per-page CRC check on arrival:
//! `bad_input.rs`.)

use dwcp_dataplane::crc_table::{CrcTable, OUT_OF_BAND_SLOT};
use dwcp_dataplane::dirty::{DirtyBitmap, DirtyLog, DirtyLogError, DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{
    self, DestConfig, MigrationError, MigrationReport, SourceConfig, VerifyMode,
};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_hugepages::PagePreference;
use dwcp_tests::spawn_destination;
use std::sync::Arc;

const MEMORY: usize = 64 << 20;
/// A page past the simulated guest's working set (its first quarter): nothing but the
/// injected fault ever writes it.
const VICTIM: u64 = (MEMORY / PAGE_SIZE) as u64 - 5;

/// What the wrapped dirty log does wrong, at its second collection (the first after
/// round 0).
#[derive(Clone, Copy)]
enum Fault {
    /// Write the victim page and never report it.
    DropWrite,
    /// Record a wrong CRC for the victim page in the source's table.
    CorruptTable,
}

/// A real dirty log with one fault injected (test-only).
struct Faulty {
    inner: Box<dyn DirtyLog>,
    memory: Arc<GuestMemory>,
    table: Arc<CrcTable>,
    fault: Fault,
    collects: u32,
    injected: bool,
}

impl DirtyLog for Faulty {
    fn kind(&self) -> DirtyLogKind {
        self.inner.kind()
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        self.collects += 1;
        if self.collects == 2 {
            self.injected = true;
            match self.fault {
                Fault::DropWrite => {
                    let mut page = vec![0u8; PAGE_SIZE];
                    self.memory.read_page(VICTIM, &mut page);
                    for b in &mut page[100..116] {
                        *b ^= 0x5A;
                    }
                    self.memory.write_page(VICTIM, &page);
                }
                Fault::CorruptTable => {
                    let wrong = self.table.get(VICTIM) ^ 0xDEAD;
                    self.table.record(VICTIM, wrong, OUT_OF_BAND_SLOT);
                }
            }
        }
        let mut seen = DirtyBitmap::new(out.pages());
        self.inner.collect(&mut seen)?;
        if self.injected {
            seen.clear_page(VICTIM);
        }
        out.union_with(&seen);
        Ok(())
    }

    fn crc_table(&self) -> Option<Arc<CrcTable>> {
        Some(self.table.clone())
    }
}

struct Run {
    source: Result<MigrationReport, MigrationError>,
    dest: Result<engine::DestReport, MigrationError>,
    memory: Arc<GuestMemory>,
    guest: SimulatedGuest,
}

fn migrate(fault: Fault, verify: VerifyMode) -> Run {
    let memory = Arc::new(GuestMemory::anonymous(MEMORY, PagePreference::TransparentHuge).unwrap());
    let workload = GuestWorkload::default();
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).unwrap();
    let table = opened
        .log
        .crc_table()
        .unwrap_or_else(|| Arc::new(CrcTable::new(memory.pages())));
    let log = Faulty {
        inner: opened.log,
        memory: memory.clone(),
        table,
        fault,
        collects: 0,
        injected: false,
    };
    let guest = SimulatedGuest::start(memory.clone(), &workload, opened.marker.clone());
    let (addr, receiver) = spawn_destination(&DestConfig::default());
    let config = SourceConfig {
        streams: 2,
        verify,
        // Not a test of downtime: a limit a loaded test machine meets at once.
        downtime_limit: std::time::Duration::from_millis(300),
        ..SourceConfig::default()
    };
    let source = engine::migrate(
        addr,
        memory.clone(),
        &guest,
        Box::new(log),
        &config,
        &mut |_| {},
    );
    let dest = receiver.join().unwrap();
    Run {
        source,
        dest,
        memory,
        guest,
    }
}

/// The source's result is a verification failure that names the victim page, alone.
fn assert_refused_naming_the_victim(source: &Result<MigrationReport, MigrationError>) {
    match source {
        Err(MigrationError::Verification { mismatches, pages }) => {
            assert_eq!(*mismatches, 1);
            assert_eq!(pages, &vec![VICTIM]);
        }
        other => panic!("expected a verification failure, got {other:?}"),
    }
}

#[test]
fn the_audit_names_the_page_a_dirty_log_missed() {
    let run = migrate(Fault::DropWrite, VerifyMode::Audit);
    let report = run.source.expect("the switchover itself succeeds");
    let received = run.dest.expect("destination");
    let audit = report.audit.as_ref().expect("an audit in the report");
    assert_eq!(audit.mismatched, 1, "{audit:?}");
    assert_eq!(audit.pages, vec![VICTIM]);
    assert_eq!(audit.pages_checked, (MEMORY / PAGE_SIZE) as u64);
    let text = report.to_string();
    assert!(text.contains("PAGES DIFFER"), "{text}");
    assert!(text.contains(&VICTIM.to_string()), "{text}");
    // It is exactly the page the destination holds a stale copy of.
    assert_eq!(run.memory.first_difference(&received.memory), Some(VICTIM));
    run.guest.stop();
}

#[test]
fn a_full_verification_refuses_the_page_a_dirty_log_missed_and_the_guest_runs_on() {
    let run = migrate(Fault::DropWrite, VerifyMode::Full);
    assert_refused_naming_the_victim(&run.source);
    assert!(run.dest.is_err());
    // The source is intact: its guest was resumed and writes again.
    assert!(!run.guest.is_paused());
    let before = run.guest.pages_written();
    while run.guest.pages_written() == before {
        std::thread::yield_now();
    }
    run.guest.stop();
}

/// The default proves what the destination holds matches what the source sent, not
/// that the dirty log saw every write: that is what `audit` and `full` add.
#[test]
fn the_table_digest_alone_does_not_see_a_missed_write() {
    let run = migrate(Fault::DropWrite, VerifyMode::Table);
    let report = run.source.expect("source");
    let received = run.dest.expect("destination");
    assert!(report.audit.is_none());
    assert_eq!(received.digest, report.digest);
    assert_eq!(run.memory.first_difference(&received.memory), Some(VICTIM));
    run.guest.stop();
}

#[test]
fn tables_that_disagree_fail_the_switchover_naming_the_page() {
    let run = migrate(Fault::CorruptTable, VerifyMode::Table);
    assert_refused_naming_the_victim(&run.source);
    let dest_error = run
        .dest
        .expect_err("the destination refuses too")
        .to_string();
    assert!(dest_error.contains("digests differ"), "{dest_error}");
    assert!(!run.guest.is_paused());
    run.guest.stop();
}
