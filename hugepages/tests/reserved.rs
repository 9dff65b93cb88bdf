//! Arenas, pools and guest memory files on reserved hugetlb pages. Needs root to grow the
//! system pool; skips with the reason otherwise. The previous pool size is restored.

use dwcp_hugepages::{
    Arena, ArenaOptions, BufferPool, FileBacking, FileMemory, HugepageReservation, MemoryError,
    PageBacking, PagePreference, hugepage_sizes,
};
use std::io::Write;
use std::process::Command;

const MIB2: usize = 2 << 20;

/// Say why a test (or part of one) did not run. Written straight to stderr, past the
/// test harness's capture, so a skip is never silent.
fn skip(reason: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "SKIP: {reason}");
}

fn reserve(page_size: usize, count: u64) -> Option<HugepageReservation> {
    match HugepageReservation::reserve(page_size, count) {
        Ok(r) if r.granted() >= count => Some(r),
        Ok(r) => {
            skip(format_args!(
                "kernel granted {} of {count} {}-KiB hugepages (memory fragmented)",
                r.granted(),
                page_size / 1024
            ));
            None
        }
        Err(MemoryError::NotRoot { path }) => {
            skip(format_args!(
                "reserving hugepages needs root (would write {})",
                path.display()
            ));
            None
        }
        Err(e) => {
            skip(format_args!("cannot reserve hugepages: {e}"));
            None
        }
    }
}

fn pool_total(page_size: usize) -> u64 {
    hugepage_sizes()
        .into_iter()
        .find(|s| s.page_size == page_size)
        .map(|s| s.total)
        .unwrap_or(0)
}

#[test]
fn two_mib_pages_back_arenas_pools_and_files_then_are_returned() {
    if !hugepage_sizes().iter().any(|s| s.page_size == MIB2) {
        skip(format_args!("this kernel offers no 2 MiB hugetlb pages"));
        return;
    }
    let Some(reservation) = reserve(MIB2, 6) else {
        return;
    };
    let before = pool_total(MIB2) - reservation.granted();

    let opts = ArenaOptions {
        prefer: PagePreference::Huge2M,
        ..ArenaOptions::default()
    };
    let mut arena = Arena::new(3 << 20, &opts).unwrap();
    assert_eq!(
        arena.backing(),
        PageBacking::Hugetlb2M,
        "{}",
        arena.reason()
    );
    assert_eq!(arena.as_ptr() as usize % MIB2, 0);
    arena.as_mut_slice().fill(0x5A);
    assert!(arena.as_slice().iter().all(|&b| b == 0x5A));

    let mut pool = BufferPool::new(16, 128 * 1024, &opts).unwrap();
    assert_eq!(pool.arena().backing(), PageBacking::Hugetlb2M);
    let t = pool.acquire().unwrap();
    pool.buf_mut(&t).fill(1);
    let (base, len) = pool.region();
    assert_eq!(len, 16 * 128 * 1024);
    let iov = pool.iovecs();
    assert_eq!(iov[0].iov_base.cast::<u8>(), base);
    pool.release(t);

    // A guest memory file on a hugetlbfs mount of our own.
    let dir = std::env::temp_dir().join(format!("dwcp-hugetlbfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if mounted {
        {
            let mut mem = FileMemory::create(dir.join("guest"), 2 * MIB2).unwrap();
            assert_eq!(mem.backing(), FileBacking::Hugetlbfs { page_size: MIB2 });
            mem.as_mut_slice()[MIB2 + 17] = 42;
            assert_eq!(
                FileMemory::open(dir.join("guest")).unwrap().as_slice()[MIB2 + 17],
                42
            );
            let err = FileMemory::create(dir.join("odd"), MIB2 + 4096).unwrap_err();
            assert!(matches!(err, MemoryError::InvalidLength { .. }));
            let _ = std::fs::remove_file(dir.join("guest"));
        }
        let _ = Command::new("umount").arg(&dir).status();
    } else {
        skip(format_args!(
            "(part) cannot mount hugetlbfs at {}",
            dir.display()
        ));
    }
    let _ = std::fs::remove_dir(&dir);

    drop(arena);
    drop(pool);
    drop(reservation);
    assert_eq!(pool_total(MIB2), before, "the pool size is restored");
}

#[test]
fn one_gib_page_when_the_system_offers_one() {
    const GIB: usize = 1 << 30;
    if !hugepage_sizes().iter().any(|s| s.page_size == GIB) {
        skip(format_args!("this kernel offers no 1 GiB hugetlb pages"));
        return;
    }
    let Some(reservation) = reserve(GIB, 1) else {
        return;
    };
    let mut arena = Arena::new(GIB, &ArenaOptions::default()).unwrap();
    assert_eq!(
        arena.backing(),
        PageBacking::Hugetlb1G,
        "{}",
        arena.reason()
    );
    arena.as_mut_slice()[GIB - 1] = 9;
    drop(arena);
    drop(reservation);
}
