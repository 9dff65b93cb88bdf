//! Anonymous memory arenas with the largest page size the system will give.

use crate::{MemoryError, SMALL_PAGE, numa};
use std::fmt;
use std::ptr::NonNull;

/// What backs an arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageBacking {
    /// 4 KiB pages.
    Small,
    /// Transparent huge pages requested with `madvise(MADV_HUGEPAGE)`; the kernel may
    /// still back parts with 4 KiB pages.
    TransparentHuge,
    /// hugetlb 2 MiB pages (reserved, never split).
    Hugetlb2M,
    /// hugetlb 1 GiB pages.
    Hugetlb1G,
}

impl PageBacking {
    /// The page size the mapping is aligned and rounded to.
    pub fn page_size(self) -> usize {
        match self {
            PageBacking::Small => SMALL_PAGE,
            PageBacking::TransparentHuge | PageBacking::Hugetlb2M => 2 << 20,
            PageBacking::Hugetlb1G => 1 << 30,
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            PageBacking::Small => "4k",
            PageBacking::TransparentHuge => "thp",
            PageBacking::Hugetlb2M => "hugetlb-2m",
            PageBacking::Hugetlb1G => "hugetlb-1g",
        }
    }
}

impl fmt::Display for PageBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The largest page kind to try; smaller ones are tried after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PagePreference {
    /// 4 KiB only.
    Small,
    /// THP, then 4 KiB.
    TransparentHuge,
    /// hugetlb 2 MiB, then THP, then 4 KiB.
    Huge2M,
    /// hugetlb 1 GiB (when the length is at least 1 GiB), then 2 MiB, THP, 4 KiB.
    Huge1G,
}

/// How to build an arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaOptions {
    /// The largest page kind to try.
    pub prefer: PagePreference,
    /// Bind the arena's memory to this NUMA node (by OS index) before touching it.
    pub numa_node: Option<usize>,
    /// Fault every page in now (needed before registering with io_uring or RDMA, and
    /// keeps page faults off the fast path).
    pub populate: bool,
}

impl Default for ArenaOptions {
    fn default() -> Self {
        ArenaOptions {
            prefer: PagePreference::Huge1G,
            numa_node: None,
            populate: true,
        }
    }
}

/// One anonymous mapping, unmapped on drop. The memory starts zeroed.
pub struct Arena {
    ptr: NonNull<u8>,
    /// Bytes usable (what was asked for).
    len: usize,
    /// Bytes mapped (rounded up to the page size; with THP, also the alignment slack).
    mapped: usize,
    /// Start of the mapping (differs from `ptr` only for the THP alignment slack).
    map_start: NonNull<u8>,
    backing: PageBacking,
    reason: String,
    numa_node: Option<usize>,
}

// SAFETY: the arena exclusively owns its mapping; moving it to another thread moves that
// ownership. Shared references only give `&[u8]`.
unsafe impl Send for Arena {}
// SAFETY: `&Arena` only allows reads (`as_slice`) or raw pointers whose use is the
// caller's responsibility; mutation needs `&mut Arena`.
unsafe impl Sync for Arena {}

fn round_up(len: usize, to: usize) -> Option<usize> {
    len.checked_add(to - 1).map(|l| l / to * to)
}

/// `mmap` anonymous private memory with extra flags.
fn map_anonymous(len: usize, extra_flags: libc::c_int) -> std::io::Result<NonNull<u8>> {
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address; no existing memory
    // is affected. The result is checked for MAP_FAILED.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: `ptr..ptr+len` is a mapping this module created and no longer uses.
    unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
}

/// `log2(page size) << MAP_HUGE_SHIFT`, the size selector for MAP_HUGETLB.
fn huge_size_flag(page_size: usize) -> libc::c_int {
    (page_size.trailing_zeros() as libc::c_int) << libc::MAP_HUGE_SHIFT
}

impl Arena {
    /// Map `len` bytes (rounded up to 4 KiB) with the best backing available.
    pub fn new(len: usize, options: &ArenaOptions) -> Result<Arena, MemoryError> {
        if len == 0 {
            return Err(MemoryError::InvalidLength {
                len,
                why: "an arena cannot be empty",
            });
        }
        let mut tried = Vec::new();
        let mut arena = None;
        for (backing, wanted) in [
            (PageBacking::Hugetlb1G, PagePreference::Huge1G),
            (PageBacking::Hugetlb2M, PagePreference::Huge2M),
        ] {
            if options.prefer < wanted {
                continue;
            }
            let page = backing.page_size();
            if backing == PageBacking::Hugetlb1G && len < page {
                tried.push(format!("{backing}: smaller than one page"));
                continue;
            }
            let Some(mapped) = round_up(len, page) else {
                continue;
            };
            match crate::reserve::free_hugepages(page) {
                Some(free) if free * page >= mapped => {}
                Some(free) => {
                    tried.push(format!(
                        "{backing}: {free} free pages, {} needed",
                        mapped / page
                    ));
                    continue;
                }
                None => {
                    tried.push(format!("{backing}: not offered by this kernel"));
                    continue;
                }
            }
            match map_anonymous(mapped, libc::MAP_HUGETLB | huge_size_flag(page)) {
                Ok(ptr) => {
                    arena = Some((ptr, ptr, mapped, backing));
                    break;
                }
                Err(e) => tried.push(format!("{backing}: {e}")),
            }
        }
        let small_len = round_up(len, SMALL_PAGE).ok_or(MemoryError::InvalidLength {
            len,
            why: "too large",
        })?;
        if arena.is_none() && options.prefer >= PagePreference::TransparentHuge {
            if thp_available() {
                // Over-map by one huge page so the usable part starts 2 MiB-aligned,
                // which THP needs, then give the slack back.
                let huge = PageBacking::TransparentHuge.page_size();
                let mapped = small_len + huge;
                match map_anonymous(mapped, 0) {
                    Ok(start) => {
                        let offset = start.as_ptr().align_offset(huge);
                        // SAFETY: offset < huge, so the aligned pointer stays inside the
                        // mapping of `small_len + huge` bytes.
                        let aligned = unsafe { NonNull::new_unchecked(start.as_ptr().add(offset)) };
                        // SAFETY: advising a range inside our own mapping.
                        let rc = unsafe {
                            libc::madvise(aligned.as_ptr().cast(), small_len, libc::MADV_HUGEPAGE)
                        };
                        if rc == 0 {
                            arena = Some((start, aligned, mapped, PageBacking::TransparentHuge));
                        } else {
                            tried
                                .push(format!("thp: madvise: {}", std::io::Error::last_os_error()));
                            unmap(start, mapped);
                        }
                    }
                    Err(e) => tried.push(format!("thp: {e}")),
                }
            } else {
                tried.push("thp: disabled in /sys/kernel/mm/transparent_hugepage/enabled".into());
            }
        }
        let (map_start, ptr, mapped, backing) = match arena {
            Some(a) => a,
            None => {
                let ptr = map_anonymous(small_len, 0)
                    .map_err(|source| MemoryError::Map { len, source })?;
                (ptr, ptr, small_len, PageBacking::Small)
            }
        };
        let reason = if tried.is_empty() {
            format!("{backing} as preferred")
        } else {
            format!("{backing} ({})", tried.join("; "))
        };
        let mut arena = Arena {
            ptr,
            len,
            mapped,
            map_start,
            backing,
            reason,
            numa_node: None,
        };
        if let Some(node) = options.numa_node {
            numa::bind_to_node(arena.as_slice(), node)?;
            arena.numa_node = Some(node);
        }
        if options.populate {
            arena.populate();
        }
        Ok(arena)
    }

    /// Fault every page in by writing a zero into each (the memory is zero, so the
    /// content does not change).
    fn populate(&mut self) {
        self.populate_range(0, self.len);
    }

    /// Fault in the pages of `offset..offset + len` (clipped to the arena) by writing
    /// a zero into each; only call before the range holds data. hugetlb pages fault
    /// whole; THP may fall back to 4 KiB pages, so those are touched every 4 KiB.
    pub fn populate_range(&mut self, offset: usize, len: usize) {
        let step = match self.backing {
            PageBacking::Hugetlb1G | PageBacking::Hugetlb2M => self.backing.page_size(),
            PageBacking::TransparentHuge | PageBacking::Small => SMALL_PAGE,
        };
        let end = offset.saturating_add(len).min(self.len);
        let start = offset - offset % step;
        for at in (start..end).step_by(step) {
            // SAFETY: at < end <= len; volatile so the write is not elided.
            unsafe { self.ptr.as_ptr().add(at).write_volatile(0) };
        }
    }

    /// Usable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an arena is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// What backs the memory.
    pub fn backing(&self) -> PageBacking {
        self.backing
    }

    /// Why this backing: what was tried and what refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The NUMA node the memory is bound to, if any.
    pub fn numa_node(&self) -> Option<usize> {
        self.numa_node
    }

    /// Start of the usable memory; stable for the arena's life.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The memory.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is mapped readable for the arena's life; `&self` rules
        // out a concurrent `&mut` from this arena.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The memory, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        unmap(self.map_start, self.mapped);
    }
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("len", &self.len)
            .field("backing", &self.backing)
            .field("reason", &self.reason)
            .field("numa_node", &self.numa_node)
            .finish()
    }
}

fn thp_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| !s.contains("[never]"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_arena_is_usable_and_zeroed() {
        let opts = ArenaOptions {
            prefer: PagePreference::Small,
            ..ArenaOptions::default()
        };
        let mut a = Arena::new(10_000, &opts).unwrap();
        assert_eq!(a.backing(), PageBacking::Small);
        assert_eq!(a.len(), 10_000);
        assert!(a.as_slice().iter().all(|&b| b == 0));
        a.as_mut_slice()[9_999] = 7;
        assert_eq!(a.as_slice()[9_999], 7);
    }

    #[test]
    fn falls_back_and_says_why() {
        // Without reserved hugetlb pages the arena degrades and the reason names what
        // refused; with them it is hugetlb. Either way it is usable.
        let mut a = Arena::new(4 << 20, &ArenaOptions::default()).unwrap();
        eprintln!("arena: {}", a.reason());
        assert!(!a.reason().is_empty());
        if a.backing() < PageBacking::Hugetlb2M {
            assert!(a.reason().contains("hugetlb-2m"), "{}", a.reason());
        }
        a.as_mut_slice().fill(0xAB);
        if a.backing() == PageBacking::TransparentHuge {
            assert_eq!(
                a.as_ptr() as usize % (2 << 20),
                0,
                "THP arenas are 2 MiB aligned"
            );
        }
    }

    #[test]
    fn empty_arena_is_refused() {
        assert!(matches!(
            Arena::new(0, &ArenaOptions::default()),
            Err(MemoryError::InvalidLength { .. })
        ));
    }
}
