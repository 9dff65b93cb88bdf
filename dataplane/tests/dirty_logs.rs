//! Each dirty log reports exactly the pages written, interval by interval.

use dwcp_dataplane::dirty::{
    DirtyBitmap, DirtyLog, ExplicitDirtyLog, RescanDirtyLog, UffdDirtyLog, probe_uffd_wp_async,
};
use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_hugepages::PagePreference;
use std::io::Write;
use std::sync::Arc;

fn skip(reason: &str) {
    // Past the harness's capture, so the skip is seen.
    let _ = writeln!(std::io::stderr(), "SKIP: {reason}");
}

fn memory(pages: usize, prefer: PagePreference) -> Arc<GuestMemory> {
    Arc::new(GuestMemory::anonymous(pages * PAGE_SIZE, prefer).unwrap())
}

fn touch(mem: &GuestMemory, pages: &[u64], byte: u8) {
    for &p in pages {
        mem.write_at(p, (p as usize * 7) % PAGE_SIZE, &[byte]);
    }
}

/// Collect, then "send" the reported pages as the engine does: trackers that compare
/// memory with what was sent get the CRC of each page sent.
fn collect_and_send(log: &mut dyn DirtyLog, mem: &GuestMemory) -> Vec<u64> {
    let mut b = DirtyBitmap::new(mem.pages());
    log.collect(&mut b).unwrap();
    let reported: Vec<u64> = b.iter().collect();
    if let Some(table) = log.crc_table() {
        let mut page = vec![0u8; PAGE_SIZE];
        for &p in &reported {
            mem.read_page(p, &mut page);
            table.record(p, dwcp_simd::crc32c(&page), 0);
        }
    }
    reported
}

/// Three intervals: some pages written, none, an overlapping set.
fn exercise(log: &mut dyn DirtyLog, mem: &GuestMemory, pages: u64) {
    assert_eq!(
        collect_and_send(log, mem),
        Vec::<u64>::new(),
        "nothing written yet"
    );
    touch(mem, &[3, 77, 200, pages - 1], 1);
    assert_eq!(collect_and_send(log, mem), vec![3, 77, 200, pages - 1]);
    assert_eq!(
        collect_and_send(log, mem),
        Vec::<u64>::new(),
        "the interval restarted"
    );
    touch(mem, &[77, 100], 2);
    touch(mem, &[77], 3);
    assert_eq!(collect_and_send(log, mem), vec![77, 100]);
}

/// `pages` of memory, the first `populated` of them written before tracking starts,
/// tracked by userfaultfd; `None` (with the reason printed) where the kernel cannot.
fn uffd_tracked(
    pages: usize,
    prefer: PagePreference,
    populated: u64,
) -> Option<(Arc<GuestMemory>, UffdDirtyLog)> {
    if let Err(why) = probe_uffd_wp_async() {
        skip(&format!(
            "userfaultfd write-protect tracking unavailable: {why}"
        ));
        return None;
    }
    let mem = memory(pages, prefer);
    touch(&mem, &(0..populated).collect::<Vec<_>>(), 9);
    let log = UffdDirtyLog::new(mem.clone()).unwrap();
    Some((mem, log))
}

#[test]
fn uffd_reports_exactly_the_written_pages() {
    // Half the memory populated before tracking, half never touched (WP_UNPOPULATED).
    let Some((mem, mut log)) = uffd_tracked(256, PagePreference::Small, 128) else {
        return;
    };
    exercise(&mut log, &mem, 256);
}

#[test]
fn uffd_tracks_transparent_huge_pages_at_4k() {
    let Some((mem, mut log)) = uffd_tracked(2048, PagePreference::TransparentHuge, 2048) else {
        return;
    };
    exercise(&mut log, &mem, 2048);
}

/// The paused collection reports what was written since the last one, and leaves it
/// unprotected: a later collection reports those pages again (never fewer), and new
/// writes with them.
#[test]
fn uffd_paused_collection_reports_writes_and_leaves_them_reported() {
    let Some((mem, mut log)) = uffd_tracked(2048, PagePreference::TransparentHuge, 2048) else {
        return;
    };
    touch(&mem, &[5, 600], 1);
    assert_eq!(collect_and_send(&mut log, &mem), vec![5, 600]);
    touch(&mem, &[7, 1500, 2047], 2);
    let mut paused = DirtyBitmap::new(mem.pages());
    // SAFETY: nothing else writes `mem` in this test.
    unsafe { log.collect_paused(&mut paused).unwrap() };
    assert_eq!(paused.iter().collect::<Vec<_>>(), vec![7, 1500, 2047]);
    touch(&mem, &[9], 3);
    assert_eq!(collect_and_send(&mut log, &mem), vec![7, 9, 1500, 2047]);
    assert_eq!(collect_and_send(&mut log, &mem), Vec::<u64>::new());
}

#[test]
fn rescan_reports_exactly_the_changed_pages() {
    let mem = memory(256, PagePreference::Small);
    let mut log = RescanDirtyLog::with_baseline(mem.clone());
    exercise(&mut log, &mem, 256);
}

/// A page sent with content C and then written back to what an earlier scan saw must
/// still be reported: the destination holds C.
#[test]
fn rescan_reports_a_page_reverted_after_it_was_sent() {
    let mem = memory(16, PagePreference::Small);
    let mut log = RescanDirtyLog::with_baseline(mem.clone());
    mem.write_at(5, 0, &[1]); // content A, seen by the scan below
    assert_eq!(collect_and_send(&mut log, &mem), vec![5]);
    mem.write_at(5, 0, &[2]); // content C ...
    let mut page = vec![0u8; PAGE_SIZE];
    mem.read_page(5, &mut page);
    log.crc_table()
        .unwrap()
        .record(5, dwcp_simd::crc32c(&page), 0); // ... is what gets sent
    mem.write_at(5, 0, &[1]); // then the guest writes A back
    assert_eq!(collect_and_send(&mut log, &mem), vec![5]);
}

#[test]
fn explicit_bitmap_reports_exactly_the_marked_pages() {
    let mem = memory(256, PagePreference::Small);
    let (mut log, marker) = ExplicitDirtyLog::new(256);
    assert_eq!(collect_and_send(&mut log, &mem), Vec::<u64>::new());
    for p in [3, 77, 200, 255] {
        marker.mark(p);
    }
    marker.mark(10_000); // past the end: ignored
    assert_eq!(collect_and_send(&mut log, &mem), vec![3, 77, 200, 255]);
    assert_eq!(collect_and_send(&mut log, &mem), Vec::<u64>::new());
    marker.mark_words(&[1 << 5, 0, 1]);
    assert_eq!(collect_and_send(&mut log, &mem), vec![5, 128]);
}

#[test]
fn uffd_tracks_shared_memory_files() {
    if let Err(why) = probe_uffd_wp_async() {
        skip(&format!(
            "userfaultfd write-protect tracking unavailable: {why}"
        ));
        return;
    }
    let dir = std::path::Path::new("/dev/shm");
    if !dir.is_dir() {
        skip("no /dev/shm");
        return;
    }
    let path = dir.join(format!("dwcp-uffd-shm-{}", std::process::id()));
    let mem = Arc::new(GuestMemory::file(&path, 256 * PAGE_SIZE).unwrap());
    let _ = std::fs::remove_file(&path);
    match UffdDirtyLog::new(mem.clone()) {
        Ok(mut log) => exercise(&mut log, &mem, 256),
        Err(e) => skip(&format!("uffd on shmem unavailable here: {e}")),
    }
}
