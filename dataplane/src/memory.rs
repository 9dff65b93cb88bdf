//! Guest memory: the bytes a migration moves.
//!
//! Guest memory is shared with agents outside Rust's aliasing rules: vCPUs (threads of
//! a simulated guest, or a hypervisor's) write it while the engine reads it, and on the
//! destination several receivers write disjoint pages of it at once. So, like a
//! hypervisor's guest-memory layer, this type never hands out references to bytes that
//! may be shared: every access is a raw-pointer copy of whole pages or byte ranges
//! ([`GuestMemory::read_page`], [`GuestMemory::write_page`], ...). A reader racing a
//! writer may see a torn page; the migration handles that by design (the writer's dirty
//! bit sends the page again, and the final round runs with the vCPUs paused). Slices
//! are available only through `unsafe` calls whose callers promise quiescence.

use dwcp_hugepages::{DataExtents, FileMemory, PagePreference};
use std::fmt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The page size migrations work in.
pub const PAGE_SIZE: usize = 4096;

/// CRC32C of an all-zero page.
pub fn zero_page_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| dwcp_simd::crc32c(&[0u8; PAGE_SIZE]))
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    /// The size is not a positive multiple of the page size.
    #[error("guest memory size {bytes} is not a positive multiple of {PAGE_SIZE}")]
    BadSize {
        /// The size asked for.
        bytes: usize,
    },
    /// The memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] dwcp_hugepages::MemoryError),
}

/// Size of the inaccessible regions around anonymous guest memory: a stray access just
/// past either end faults instead of touching another allocation. 2 MiB, so the memory
/// itself can start on a huge-page boundary.
const GUARD: usize = 2 << 20;

/// An anonymous mapping with `PROT_NONE` guards on both sides.
struct GuardedMapping {
    base: NonNull<u8>,
    total: usize,
    thp: bool,
}

impl GuardedMapping {
    fn new(bytes: usize, thp: bool) -> Result<Self, GuestMemoryError> {
        let total = bytes + 2 * GUARD;
        let os = |what: &'static str| dwcp_hugepages::MemoryError::Map {
            len: bytes,
            source: std::io::Error::other(format!("{what}: {}", std::io::Error::last_os_error())),
        };
        // SAFETY: a fresh private anonymous reservation; nothing else is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(os("mmap").into());
        }
        let mapping = GuardedMapping {
            base: NonNull::new(base.cast()).ok_or_else(|| os("mmap returned null"))?,
            total,
            thp,
        };
        let inner = mapping.inner();
        // SAFETY: `inner..inner+bytes` lies within the reservation (GUARD from its
        // start, GUARD before its end).
        if unsafe { libc::mprotect(inner.cast(), bytes, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
            return Err(os("mprotect").into());
        }
        if thp {
            // Advice only: THP may be disabled, which costs speed, not correctness.
            // SAFETY: advising a range of our own mapping.
            unsafe { libc::madvise(inner.cast(), bytes, libc::MADV_HUGEPAGE) };
        }
        Ok(mapping)
    }

    fn inner(&self) -> *mut u8 {
        // SAFETY: GUARD < total, so the result stays inside the reservation.
        unsafe { self.base.as_ptr().add(GUARD) }
    }
}

impl Drop for GuardedMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the reservation this value created and alone owns.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.total) };
    }
}

enum Backing {
    Anonymous(GuardedMapping),
    File(FileMemory),
}

/// Page-aligned memory the engine migrates.
pub struct GuestMemory {
    backing: Backing,
    ptr: *mut u8,
    len: usize,
    /// Taken around writes through the file: the kernel serialises them on the
    /// file's inode lock anyway, and a waiter there spins on a CPU for as long as the
    /// holder copies (up to a megabyte); one here sleeps.
    file_writes: std::sync::Mutex<()>,
}

// SAFETY: the memory is owned by `backing` for the life of `self`; all access is by
// raw-pointer copies, whose concurrent use is the shared-memory contract described in
// the module docs.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Anonymous memory of `bytes` (a multiple of 4 KiB), zero-filled, with
    /// inaccessible guard regions on both sides. `prefer` at least
    /// [`PagePreference::TransparentHuge`] asks for transparent huge pages; hugetlb pages
    /// come through a hugetlbfs file ([`GuestMemory::file`]).
    pub fn anonymous(bytes: usize, prefer: PagePreference) -> Result<Self, GuestMemoryError> {
        check_size(bytes)?;
        let mapping = GuardedMapping::new(bytes, prefer >= PagePreference::TransparentHuge)?;
        Ok(Self::from_backing(Backing::Anonymous(mapping), bytes))
    }

    /// Memory in a file (on /dev/shm or hugetlbfs), created or truncated to `bytes`.
    pub fn file(path: impl AsRef<Path>, bytes: usize) -> Result<Self, GuestMemoryError> {
        check_size(bytes)?;
        let file = FileMemory::create(path, bytes)?;
        Ok(Self::from_backing(Backing::File(file), bytes))
    }

    /// An existing guest memory file, at its current size.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self, GuestMemoryError> {
        let file = FileMemory::open(path)?;
        let bytes = file.len();
        check_size(bytes)?;
        Ok(Self::from_backing(Backing::File(file), bytes))
    }

    fn from_backing(backing: Backing, len: usize) -> Self {
        let ptr = match &backing {
            Backing::Anonymous(m) => m.inner(),
            Backing::File(f) => f.as_ptr(),
        };
        GuestMemory {
            backing,
            ptr,
            len,
            file_writes: std::sync::Mutex::new(()),
        }
    }

    /// Bytes of memory.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty memory is refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Start address (for dirty tracking and registration with transports).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// What backs the memory, for reports.
    pub fn describe(&self) -> String {
        match &self.backing {
            Backing::Anonymous(m) => format!("anonymous{}", if m.thp { ", THP" } else { ", 4k" }),
            Backing::File(f) => format!("file {} ({:?})", f.path().display(), f.backing()),
        }
    }

    /// The file holding the memory, if it is one (it outlives this process).
    pub fn file_path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Anonymous(_) => None,
            Backing::File(f) => Some(f.path()),
        }
    }

    /// The pages of file-backed memory that lie in the file's holes: they read as
    /// zeros and take no memory until written. `None` for anonymous memory, or when
    /// the file system cannot say.
    pub fn hole_pages(&self) -> Option<crate::dirty::DirtyBitmap> {
        let Backing::File(file) = &self.backing else {
            return None;
        };
        let data = file.data_ranges().ok()?;
        let pages = self.pages();
        let page = PAGE_SIZE as u64;
        let mut holes = crate::dirty::DirtyBitmap::new(pages);
        // Pages before `next` hold data, or lie between extents already seen; a page
        // that data touches at all is data.
        let mut next = 0u64;
        for range in data {
            holes.set_range(next, range.start / page);
            next = next.max(range.end.div_ceil(page));
        }
        holes.set_range(next, pages);
        Some(holes)
    }

    /// A cursor over file-backed memory's holes that walks the file's extents only as
    /// far as it is asked (see [`HoleCursor`]). `None` for anonymous memory, or when
    /// the file system cannot say.
    pub fn hole_cursor(self: &Arc<Self>) -> Option<HoleCursor> {
        let Backing::File(file) = &self.backing else {
            return None;
        };
        let started = Instant::now();
        let extents = file.data_extents().ok()?;
        let mut cursor = HoleCursor {
            memory: self.clone(),
            extents,
            hole_from: 0,
            data: None,
            holes: 0,
            walk_time: Duration::ZERO,
            failed: false,
        };
        cursor.advance();
        cursor.walk_time += started.elapsed();
        Some(cursor)
    }

    /// Whether the memory is a private anonymous mapping (userfaultfd write-protect
    /// tracks those without extra features).
    pub fn is_anonymous(&self) -> bool {
        matches!(self.backing, Backing::Anonymous(_))
    }

    /// Whether huge pages back it (THP or hugetlb).
    pub fn is_huge(&self) -> bool {
        match &self.backing {
            Backing::Anonymous(m) => m.thp,
            Backing::File(f) => f.backing().page_size() > PAGE_SIZE,
        }
    }

    #[inline]
    fn page_offset(&self, page: u64) -> usize {
        let offset = page as usize * PAGE_SIZE;
        assert!(
            page < self.pages(),
            "page {page} outside guest memory of {} pages",
            self.pages()
        );
        offset
    }

    /// Fault every page in now (`MADV_POPULATE_WRITE`, or touching each page where the
    /// kernel lacks it), so that receiving pages later does not pay for page faults.
    /// The content stays as it is (zero for fresh memory).
    pub fn populate(&self) {
        // In pieces of one huge page: a call holds the process's mmap lock while it
        // allocates (and, for huge pages, may compact memory), and every thread that
        // maps memory meanwhile (io_uring rings, buffers, a thread's stack) waits
        // behind it.
        const PIECE: u64 = (2 << 20) / PAGE_SIZE as u64;
        let mut page = 0;
        while page < self.pages() {
            let count = PIECE.min(self.pages() - page);
            self.populate_pages(page, count);
            page += count;
        }
    }

    /// Fault pages `first..first + count` in for writing, keeping their content.
    ///
    /// # Panics
    /// If the pages are not all inside guest memory.
    pub fn populate_pages(&self, first: u64, count: u64) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        if count == 0 {
            return;
        }
        let offset = self.page_offset(first);
        let end = self.page_offset(first + count - 1) + PAGE_SIZE;
        // SAFETY: advising a range inside our own mapping; populating writes nothing
        // visible.
        let rc = unsafe {
            libc::madvise(
                self.ptr.add(offset).cast(),
                end - offset,
                MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            for page in first..first + count {
                // SAFETY: the page is inside the mapping (checked by `offset`). An
                // atomic add of zero faults it in for writing without changing it,
                // even if another thread writes it too.
                unsafe {
                    let word = &*self
                        .ptr
                        .add(self.page_offset(page))
                        .cast::<std::sync::atomic::AtomicU64>();
                    word.fetch_add(0, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Copy page `page` into `out` (4 KiB).
    ///
    /// # Panics
    /// If `page` is out of range or `out` is not one page long (callers validate
    /// network input before it reaches here).
    #[inline]
    pub fn read_page(&self, page: u64, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE);
        let offset = self.page_offset(page);
        // SAFETY: offset + PAGE_SIZE <= len (checked), `out` is PAGE_SIZE bytes and does
        // not overlap guest memory (it is a Rust slice we hold exclusively).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), PAGE_SIZE) };
    }

    /// Copy `data` (4 KiB) into page `page`.
    #[inline]
    pub fn write_page(&self, page: u64, data: &[u8]) {
        self.write_at(page, 0, data);
    }

    /// Copy `data` into page `page` at byte `offset` within it.
    ///
    /// # Panics
    /// If the write would leave the page.
    #[inline]
    pub fn write_at(&self, page: u64, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= PAGE_SIZE, "write leaves the page");
        let base = self.page_offset(page);
        // SAFETY: the range lies inside page `page` (checked above and in page_offset);
        // `data` is a Rust slice that cannot overlap guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(base + offset), data.len())
        };
    }

    /// Write whole pages `first..first + pages.len()` (each `pages[i]` exactly one
    /// page): through the file with one `pwritev` where the memory is a file, which
    /// fills a hole without zeroing it first or faulting it in here (see
    /// `FileMemory::write_vectored_at`); through the mapping otherwise, or for what the
    /// call did not write.
    pub fn write_pages(&self, first: u64, pages: &[std::io::IoSlice<'_>]) {
        let mut done = 0usize;
        if let Backing::File(file) = &self.backing {
            let _one_writer = self.file_writes.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(n) = file.write_vectored_at(self.page_offset(first) as u64, pages) {
                done = n / PAGE_SIZE;
            }
        }
        for (i, page) in pages.iter().enumerate().skip(done) {
            self.write_page(first + i as u64, page);
        }
    }

    /// Fill page `page` with zeros.
    #[inline]
    pub fn zero_page(&self, page: u64) {
        let base = self.page_offset(page);
        // SAFETY: the page lies inside the mapping (checked in page_offset).
        unsafe { std::ptr::write_bytes(self.ptr.add(base), 0, PAGE_SIZE) };
    }

    /// The whole memory as a slice.
    ///
    /// # Safety
    /// Nothing may write to the memory while the slice lives (the guest is paused, or
    /// the destination's receivers have finished).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes for the life of `self`; the caller rules
        // out concurrent writers.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Whether two memories hold the same bytes, compared page by page without
    /// allocating. The first differing page, if any.
    pub fn first_difference(&self, other: &GuestMemory) -> Option<u64> {
        if self.len != other.len {
            return Some(0);
        }
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        (0..self.pages()).find(|&p| {
            self.read_page(p, &mut a);
            other.read_page(p, &mut b);
            a != b
        })
    }

    /// Copy the whole memory out (tests compare source and destination with this).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: `out` is `len` bytes; copying from shared memory as everywhere here.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), self.len) };
        out
    }
}

fn check_size(bytes: usize) -> Result<(), GuestMemoryError> {
    if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(GuestMemoryError::BadSize { bytes });
    }
    Ok(())
}

/// Which pages of file-backed memory lie in the file's holes, found as a caller moving
/// forward through the memory gets there: each data extent is looked up
/// (`SEEK_DATA`/`SEEK_HOLE`) when the caller reaches it, so the walk, whose cost
/// grows with the file's data (5.6 ms for a 512 MiB RAM file with 107k pages of data,
/// so seconds for a large full one), delays nothing up front. A page lies in a hole at
/// the moment its extent was looked up. Pages asked about behind the walk, or after the
/// file system failed to answer, count as data: reading them is always correct.
pub struct HoleCursor {
    memory: Arc<GuestMemory>,
    extents: DataExtents,
    /// Pages from here to `data`'s start lie in a hole; pages before it are behind.
    hole_from: u64,
    /// The next data extent, in pages: `None` when no data remains from `hole_from`.
    data: Option<std::ops::Range<u64>>,
    holes: u64,
    walk_time: Duration,
    failed: bool,
}

impl HoleCursor {
    /// The longest run from `first` (up to `end`) whose pages all lie in holes, or all
    /// do not: its length, and whether they lie in holes.
    pub fn part(&mut self, first: u64, end: u64) -> (u64, bool) {
        if self.failed || first < self.hole_from {
            return (end - first, false);
        }
        let started = Instant::now();
        while self.data.as_ref().is_some_and(|d| d.end <= first) && !self.failed {
            self.hole_from = self.data.as_ref().map_or(self.hole_from, |d| d.end);
            self.advance();
        }
        self.walk_time += started.elapsed();
        match &self.data {
            _ if self.failed => (end - first, false),
            None => (end - first, true),
            Some(d) if first < d.start => (end.min(d.start) - first, true),
            Some(d) => (end.min(d.end) - first, false),
        }
    }

    /// Pages found in holes so far.
    pub fn holes_found(&self) -> u64 {
        self.holes
    }

    /// Time spent looking up extents so far.
    pub fn walk_time(&self) -> Duration {
        self.walk_time
    }

    /// Look up the data extent after `hole_from`, counting the hole before it.
    fn advance(&mut self) {
        let Backing::File(file) = &self.memory.backing else {
            self.failed = true;
            return;
        };
        let page = PAGE_SIZE as u64;
        let pages = self.memory.pages();
        match self.extents.next_extent(file) {
            Ok(Some(bytes)) => {
                // A page that data touches at all is data.
                let data = (bytes.start / page).max(self.hole_from)..bytes.end.div_ceil(page);
                self.holes += data.start - self.hole_from;
                self.data = Some(data);
            }
            Ok(None) => {
                self.holes += pages.saturating_sub(self.hole_from);
                self.data = None;
            }
            Err(_) => self.failed = true,
        }
    }
}

impl fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestMemory")
            .field("bytes", &self.len)
            .field("backing", &self.describe())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_regions_surround_anonymous_memory() {
        let mem = GuestMemory::anonymous(4 * PAGE_SIZE, PagePreference::TransparentHuge).unwrap();
        let Backing::Anonymous(m) = &mem.backing else {
            panic!("anonymous")
        };
        assert_eq!(mem.as_ptr() as usize - m.base.as_ptr() as usize, GUARD);
        // mincore-free check: the byte before the memory is PROT_NONE, so /proc/self/maps
        // shows a ---p region ending exactly where the memory starts.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", mem.as_ptr() as usize);
        let guard_end = format!("-{:x} ---p", mem.as_ptr() as usize);
        assert!(maps.contains(&start) && maps.contains(&guard_end), "{maps}");
    }

    #[test]
    fn pages_round_trip_and_bounds_are_enforced() {
        let mem = GuestMemory::anonymous(16 * PAGE_SIZE, PagePreference::Small).unwrap();
        assert_eq!(mem.pages(), 16);
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        mem.write_page(3, &page);
        let mut out = vec![0u8; PAGE_SIZE];
        mem.read_page(3, &mut out);
        assert_eq!(out, page);
        mem.zero_page(3);
        mem.read_page(3, &mut out);
        assert!(out.iter().all(|&b| b == 0));
        assert!(std::panic::catch_unwind(|| mem.zero_page(16)).is_err());
        assert!(matches!(
            GuestMemory::anonymous(5000, PagePreference::Small),
            Err(GuestMemoryError::BadSize { bytes: 5000 })
        ));
    }

    #[test]
    fn a_hole_cursor_finds_holes_as_it_goes_and_takes_what_is_behind_it_for_data() {
        let path = Path::new("/dev/shm").join(format!("dwcp-memory-holes-{}", std::process::id()));
        let Ok(mem) = GuestMemory::file(&path, 64 * PAGE_SIZE) else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let _ = std::fs::remove_file(&path);
        let mem = Arc::new(mem);
        assert!(
            Arc::new(GuestMemory::anonymous(4 * PAGE_SIZE, PagePreference::Small).unwrap())
                .hole_cursor()
                .is_none()
        );
        // Data in pages 3..5 and 40; holes elsewhere.
        for page in [3, 4, 40] {
            mem.write_at(page, 9, &[1]);
        }
        let mut holes = mem.hole_cursor().unwrap();
        assert_eq!(holes.part(0, 16), (3, true));
        assert_eq!(holes.part(3, 16), (2, false));
        assert_eq!(holes.part(5, 16), (11, true));
        // A page written after the walk passed it stays as the walk found it; one
        // written ahead of the walk is found as data.
        mem.write_at(20, 0, &[1]);
        mem.write_at(50, 0, &[1]);
        assert_eq!(holes.part(16, 64), (24, true));
        assert_eq!(holes.part(40, 64), (1, false));
        assert_eq!(holes.part(41, 64), (9, true));
        assert_eq!(holes.part(50, 64), (1, false));
        // Behind the walk: data.
        assert_eq!(holes.part(0, 8), (8, false));
        assert_eq!(holes.part(51, 64), (13, true));
        assert_eq!(holes.holes_found(), 64 - 4);
    }
}
