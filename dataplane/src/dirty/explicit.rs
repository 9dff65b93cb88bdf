//! A dirty log fed by the writer: whoever writes guest memory (a hypervisor relaying
//! KVM's dirty log, or the simulated guest) marks pages through a [`DirtyMarker`].

use super::{DirtyBitmap, DirtyLog, DirtyLogError, DirtyLogKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shared bitmap of pages written.
struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

/// The writer's handle: marks pages as written. Cheap to clone.
#[derive(Clone)]
pub struct DirtyMarker(Arc<AtomicBitmap>);

impl DirtyMarker {
    /// Record that `page` was written. Pages past the end are ignored.
    #[inline]
    pub fn mark(&self, page: u64) {
        if page < self.0.pages {
            // Relaxed: the collector's swap (AcqRel) is what orders the interval; a
            // write racing the swap lands in this interval or the next, never neither.
            self.0.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Replace-or-merge a whole bitmap at once, as KVM_GET_DIRTY_LOG returns it: word
    /// `i` covers pages `64·i ..`.
    pub fn mark_words(&self, words: &[u64]) {
        for (slot, &bits) in self.0.words.iter().zip(words) {
            if bits != 0 {
                slot.fetch_or(bits, Ordering::Relaxed);
            }
        }
    }
}

/// The collector's side.
pub struct ExplicitDirtyLog(Arc<AtomicBitmap>);

impl ExplicitDirtyLog {
    /// A log over `pages` pages and the marker that feeds it.
    pub fn new(pages: u64) -> (Self, DirtyMarker) {
        let bitmap = Arc::new(AtomicBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        });
        (ExplicitDirtyLog(bitmap.clone()), DirtyMarker(bitmap))
    }
}

impl DirtyLog for ExplicitDirtyLog {
    fn kind(&self) -> DirtyLogKind {
        DirtyLogKind::Explicit
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        for (i, word) in self.0.words.iter().enumerate() {
            // AcqRel: takes the marks made so far and starts the next interval empty.
            let bits = word.swap(0, Ordering::AcqRel);
            if bits != 0 {
                out.or_word(i, bits);
            }
        }
        Ok(())
    }
}
