//! Dirty-page tracking: which pages the guest wrote since the last look.
//!
//! Three trackers behind one trait:
//! - [`UffdDirtyLog`]: userfaultfd write-protect in asynchronous mode plus the
//!   `PAGEMAP_SCAN` ioctl (Linux ≥ 6.7). The kernel records writes in the page tables
//!   itself; one ioctl reports the written pages and write-protects them again,
//!   atomically. The production tracker for memory written inside this process, and,
//!   through a userfaultfd borrowed from the writer ([`open_process_dirty_log`]), for a
//!   file another process (QEMU) writes through its own mapping.
//! - [`RescanDirtyLog`]: a CRC32C per page compared with that of the content last sent,
//!   for memory nothing reports writes for (a file another process writes, when its
//!   page tables cannot be borrowed).
//! - [`ExplicitDirtyLog`]: a bitmap set through [`DirtyMarker`] by whoever writes, the
//!   way a hypervisor hands over its KVM dirty log.
//!
//! [`open_dirty_log`] picks one, probing userfaultfd and falling back with a reason.

mod explicit;
mod process;
mod rescan;
mod uffd;

pub use explicit::{DirtyMarker, ExplicitDirtyLog};
pub use process::open_process_dirty_log;
pub use rescan::{RescanDirtyLog, ScanStats};
pub use uffd::{UffdDirtyLog, probe_uffd_wp_async};

use crate::memory::GuestMemory;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Errors from dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// userfaultfd write-protect tracking is unavailable here.
    #[error("userfaultfd dirty tracking unavailable: {0}")]
    UffdUnavailable(String),
    /// A tracking syscall failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Which tracker to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DirtyLogKind {
    /// userfaultfd write-protect + PAGEMAP_SCAN.
    Uffd,
    /// Per-page CRC rescans.
    Rescan,
    /// A bitmap fed by the writer.
    Explicit,
}

impl DirtyLogKind {
    /// The name used in configuration and reports.
    pub fn name(self) -> &'static str {
        match self {
            DirtyLogKind::Uffd => "uffd-wp",
            DirtyLogKind::Rescan => "rescan",
            DirtyLogKind::Explicit => "explicit",
        }
    }
}

impl fmt::Display for DirtyLogKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DirtyLogKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uffd-wp" | "uffd" => Ok(DirtyLogKind::Uffd),
            "rescan" => Ok(DirtyLogKind::Rescan),
            "explicit" => Ok(DirtyLogKind::Explicit),
            other => Err(format!(
                "unknown dirty log {other:?} (expected uffd-wp, rescan or explicit)"
            )),
        }
    }
}

/// A set of pages, one bit each.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Every page.
    pub fn full(pages: u64) -> Self {
        let mut b = Self::new(pages);
        b.set_range(0, pages);
        b
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Add `page`.
    #[inline]
    pub fn set(&mut self, page: u64) {
        debug_assert!(page < self.pages);
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Remove `page`.
    #[inline]
    pub fn clear_page(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    /// Add pages `[start, end)`.
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.pages);
        let mut p = start;
        while p < end {
            if p.is_multiple_of(64) && end - p >= 64 {
                self.words[(p / 64) as usize] = !0;
                p += 64;
            } else {
                self.set(p);
                p += 1;
            }
        }
    }

    /// Whether `page` is in the set.
    #[inline]
    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Empty the set.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Add every page of `other`.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// The raw words (bit i of word w is page 64·w + i).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// OR a word into the set (bits past `pages` are dropped).
    pub fn or_word(&mut self, index: usize, bits: u64) {
        let mut bits = bits;
        let first_page = index as u64 * 64;
        if first_page + 64 > self.pages {
            let valid = self.pages.saturating_sub(first_page);
            bits &= if valid >= 64 { !0 } else { (1u64 << valid) - 1 };
        }
        if let Some(w) = self.words.get_mut(index) {
            *w |= bits;
        }
    }

    /// The pages in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                Some(w as u64 * 64 + u64::from(i))
            })
        })
    }
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirtyBitmap({} of {} pages)", self.count(), self.pages)
    }
}

/// A dirty-page tracker over one guest memory.
pub trait DirtyLog: Send {
    /// Which tracker this is.
    fn kind(&self) -> DirtyLogKind;

    /// Add to `out` the pages written since the previous call (or since the tracker
    /// was created), and start a new interval.
    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError>;

    /// The source's CRC table, for trackers that compare memory with what was sent
    /// (the engine then records into this one instead of a table of its own).
    fn crc_table(&self) -> Option<Arc<crate::crc_table::CrcTable>> {
        None
    }

    /// Start a new interval, dropping what was written so far (round 0 is about to
    /// send every page).
    fn restart(&mut self, pages: u64) -> Result<(), DirtyLogError> {
        self.collect(&mut DirtyBitmap::new(pages))
    }

    /// How fast full scans go, for trackers that scan memory.
    fn scan_stats(&self) -> Option<ScanStats> {
        None
    }

    /// Seconds one walk like [`DirtyLog::collect_paused`]'s takes now, reporting and
    /// changing nothing; `None` for trackers whose paused collection is no such walk.
    /// For the downtime estimate: a live collection also protects again what it
    /// reports, while the guest writes, and costs several times the paused one.
    fn time_paused_walk(&mut self) -> Option<f64> {
        None
    }

    /// [`DirtyLog::collect`] with the guest paused: trackers that read memory may read
    /// it in place rather than copy each page out first, and trackers that protect
    /// pages need not protect them again. A later `collect` may therefore report these
    /// pages again: never fewer than were written, perhaps more.
    ///
    /// # Safety
    /// Nothing may write the guest's memory during the call.
    unsafe fn collect_paused(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        self.collect(out)
    }
}

/// A dirty log chosen for a memory, and why.
pub struct OpenedDirtyLog {
    /// The tracker.
    pub log: Box<dyn DirtyLog>,
    /// Set when the explicit tracker was chosen: hand it to whoever writes.
    pub marker: Option<DirtyMarker>,
    /// What was asked for, what was used, and why they differ.
    pub note: Option<String>,
}

/// Open the tracker `wanted` for `memory`, falling back from userfaultfd to rescans
/// (with a note) when the kernel cannot do it.
pub fn open_dirty_log(
    memory: &Arc<GuestMemory>,
    wanted: DirtyLogKind,
) -> Result<OpenedDirtyLog, DirtyLogError> {
    match wanted {
        DirtyLogKind::Uffd => match UffdDirtyLog::new(memory.clone()) {
            Ok(log) => Ok(OpenedDirtyLog {
                log: Box::new(log),
                marker: None,
                note: None,
            }),
            Err(e) => Ok(OpenedDirtyLog {
                log: Box::new(RescanDirtyLog::new(memory.clone())),
                marker: None,
                note: Some(format!("{e}; falling back to CRC rescans")),
            }),
        },
        DirtyLogKind::Rescan => Ok(OpenedDirtyLog {
            log: Box::new(RescanDirtyLog::new(memory.clone())),
            marker: None,
            note: None,
        }),
        DirtyLogKind::Explicit => {
            let (log, marker) = ExplicitDirtyLog::new(memory.pages());
            Ok(OpenedDirtyLog {
                log: Box::new(log),
                marker: Some(marker),
                note: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_counts_and_iterates() {
        let mut b = DirtyBitmap::new(200);
        b.set(0);
        b.set(63);
        b.set_range(64, 130);
        b.set(199);
        assert_eq!(b.count(), 2 + 66 + 1);
        let pages: Vec<u64> = b.iter().collect();
        assert_eq!(pages[..3], [0, 63, 64]);
        assert_eq!(*pages.last().unwrap(), 199);
        assert!(b.get(129) && !b.get(130) && !b.get(500));
        let mut c = DirtyBitmap::new(200);
        c.or_word(3, !0);
        assert_eq!(c.count(), 200 - 192, "bits past the end are dropped");
        c.union_with(&b);
        assert!(c.get(0) && c.get(199));
        assert_eq!(DirtyBitmap::full(70).count(), 70);
    }
}
