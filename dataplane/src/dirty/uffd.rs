//! userfaultfd write-protect in asynchronous mode, read with `PAGEMAP_SCAN`.
//!
//! Setup (Documentation/admin-guide/mm/userfaultfd.rst, "Write Protect Notifications"
//! and "Asynchronous WP"; ioctl_pagemap_scan(2)):
//! 1. `userfaultfd(UFFD_USER_MODE_ONLY)` and `UFFDIO_API` with `UFFD_FEATURE_WP_ASYNC`
//!    (plus `WP_UNPOPULATED`, so never-touched pages are protected too, and
//!    `WP_HUGETLBFS_SHMEM` for file-backed memory).
//! 2. `UFFDIO_REGISTER` the guest memory in `MODE_WP`, then `UFFDIO_WRITEPROTECT` it.
//! 3. A write to a protected page is resolved by the kernel without waking anyone: it
//!    unprotects the page, which is what "written" means below.
//! 4. `PAGEMAP_SCAN` on `/proc/self/pagemap` with `PM_SCAN_WP_MATCHING` returns the
//!    ranges whose `PAGE_IS_WRITTEN` is set and write-protects them again in the same
//!    walk, so no write between "report" and "re-protect" is lost.

use super::{DirtyBitmap, DirtyLog, DirtyLogError, DirtyLogKind};
use crate::memory::{GuestMemory, PAGE_SIZE};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

// include/uapi/linux/userfaultfd.h (features up to Linux 6.7).
const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: handle faults from user mode only (allowed without
/// `vm.unprivileged_userfaultfd`; asynchronous write-protect never delivers faults).
pub(super) const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
// _IOWR(0xAA, nr, size)
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;

// include/uapi/linux/fs.h (Linux 6.7).
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610; // _IOWR('f', 16, struct pm_scan_arg)
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

fn os_err(what: &'static str) -> DirtyLogError {
    DirtyLogError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// `ioctl` with a pointer argument.
///
/// # Safety
/// `arg` must point to a value of the type the request expects, valid for reads and
/// writes for the duration of the call.
unsafe fn ioctl_ptr<T>(fd: libc::c_int, request: libc::c_ulong, arg: *mut T) -> libc::c_int {
    // SAFETY: forwarded from the caller.
    unsafe { libc::ioctl(fd, request, arg) }
}

/// Open a userfaultfd for this process and enable `features`; the kernel refuses
/// features it lacks.
fn open_uffd(features: u64) -> Result<OwnedFd, DirtyLogError> {
    // SAFETY: a plain syscall with integer flags; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return Err(DirtyLogError::UffdUnavailable(format!(
            "userfaultfd(): {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    enable_features(&fd, features)?;
    Ok(fd)
}

/// `UFFDIO_API` handshake on a fresh userfaultfd, asking for `features`.
fn enable_features(uffd: &OwnedFd, features: u64) -> Result<(), DirtyLogError> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a struct uffdio_api, which `api` is.
    if unsafe { ioctl_ptr(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(DirtyLogError::UffdUnavailable(format!(
            "UFFDIO_API with WP_ASYNC: {} (needs Linux 6.7+)",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Whether asynchronous userfaultfd write-protect works here; `Err` says why not.
pub fn probe_uffd_wp_async() -> Result<(), String> {
    open_uffd(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
        .map(drop)
        .map_err(|e| e.to_string())?;
    File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    Ok(())
}

/// Kernel-tracked dirty pages of one guest memory.
pub struct UffdDirtyLog {
    uffd: OwnedFd,
    /// `/proc/PID/pagemap` of the address space the userfaultfd belongs to.
    pagemap: File,
    /// Where the memory starts in that address space, and its length.
    base: u64,
    len: u64,
    regions: Vec<PageRegion>,
    /// This process's mapping, kept while it is registered (`None` when the memory is
    /// another process's mapping).
    _memory: Option<Arc<GuestMemory>>,
}

impl UffdDirtyLog {
    /// Register `memory` and write-protect all of it: tracking starts now.
    pub fn new(memory: Arc<GuestMemory>) -> Result<Self, DirtyLogError> {
        let uffd = open_uffd(features_for(!memory.is_anonymous()))?;
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| DirtyLogError::Os {
            what: "opening /proc/self/pagemap",
            source,
        })?;
        let (base, len) = (memory.as_ptr() as u64, memory.len() as u64);
        Self::track(uffd, pagemap, base, len, Some(memory))
    }

    /// Track `[base, base + len)` of the address space `uffd` was created in, a
    /// descriptor not yet through `UFFDIO_API`. `pagemap` is that address space's
    /// `/proc/PID/pagemap`; the range is a shared file mapping there.
    pub(super) fn for_address_space(
        uffd: OwnedFd,
        pagemap: File,
        base: u64,
        len: u64,
    ) -> Result<Self, DirtyLogError> {
        enable_features(&uffd, features_for(true))?;
        Self::track(uffd, pagemap, base, len, None)
    }

    /// Register the range for write-protect tracking and protect all of it.
    fn track(
        uffd: OwnedFd,
        pagemap: File,
        base: u64,
        len: u64,
        memory: Option<Arc<GuestMemory>>,
    ) -> Result<Self, DirtyLogError> {
        let range = || UffdioRange { start: base, len };
        let mut register = UffdioRegister {
            range: range(),
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register. The range is a
        // mapping of the userfaultfd's address space: ours, kept alive by `memory`, or
        // another process's, which the kernel checks and pins for the call.
        if unsafe { ioctl_ptr(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut register) } != 0 {
            let what = match &memory {
                Some(memory) => memory.describe(),
                None => format!("{len} bytes at {base:#x}"),
            };
            return Err(DirtyLogError::UffdUnavailable(format!(
                "UFFDIO_REGISTER (write-protect) of {what}: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut protect = UffdioWriteprotect {
            range: range(),
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a struct uffdio_writeprotect over the
        // registered range.
        if unsafe { ioctl_ptr(uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut protect) } != 0 {
            return Err(os_err("UFFDIO_WRITEPROTECT"));
        }
        Ok(UffdDirtyLog {
            uffd,
            pagemap,
            base,
            len,
            regions: vec![PageRegion::default(); 4096],
            _memory: memory,
        })
    }
}

/// The features asked for: asynchronous write-protect, never-touched pages protected
/// too, and file-backed (shmem, hugetlbfs) memory.
fn features_for(file_backed: bool) -> u64 {
    let mut features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    if file_backed {
        features |= UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    }
    features
}

impl DirtyLog for UffdDirtyLog {
    fn kind(&self) -> DirtyLogKind {
        DirtyLogKind::Uffd
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        self.walk(out, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC)
    }

    /// The paused walk reports what was written and leaves it unprotected: the guest
    /// writes nothing more before the switchover ends, and were the migration to go on
    /// after it, the next collection would report those pages again (a superset, which
    /// is safe). Protecting them again costs downtime: in the `downtime` bench the
    /// paused collection took 0.17-0.19 ms re-protecting and 0.11-0.12 ms without at
    /// 1 GiB, 0.34-0.36 and 0.25-0.33 ms at 4 GiB (medians of five).
    unsafe fn collect_paused(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        self.walk(out, PM_SCAN_CHECK_WPASYNC)
    }

    /// The paused walk's flags (nothing protected again), its findings dropped.
    fn time_paused_walk(&mut self) -> Option<f64> {
        let start = std::time::Instant::now();
        self.walk_with(PM_SCAN_CHECK_WPASYNC, &mut |_, _| {})
            .ok()
            .map(|()| start.elapsed().as_secs_f64())
    }
}

impl UffdDirtyLog {
    /// One `PAGEMAP_SCAN` walk of the whole memory with `flags`, marking in `out` the
    /// pages written since they were last protected.
    fn walk(&mut self, out: &mut DirtyBitmap, flags: u64) -> Result<(), DirtyLogError> {
        self.walk_with(flags, &mut |first, last| out.set_range(first, last))
    }

    /// One `PAGEMAP_SCAN` walk of the whole memory with `flags`, handing `written` each
    /// run of written pages, `first..last`.
    fn walk_with(
        &mut self,
        flags: u64,
        written: &mut dyn FnMut(u64, u64),
    ) -> Result<(), DirtyLogError> {
        let base = self.base;
        let end = base + self.len;
        let mut start = base;
        // One call returns at most `regions.len()` ranges; continue from where the
        // kernel stopped until the whole memory is walked.
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start,
                end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg; `vec` points at
            // `vec_len` writable page_region entries that outlive the call.
            let n = unsafe { ioctl_ptr(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(os_err("PAGEMAP_SCAN"));
            }
            for region in &self.regions[..n as usize] {
                let first = (region.start.max(base) - base) / PAGE_SIZE as u64;
                let last = (region.end.min(end) - base).div_ceil(PAGE_SIZE as u64);
                written(first, last);
            }
            if arg.walk_end <= start {
                return Err(DirtyLogError::Os {
                    what: "PAGEMAP_SCAN made no progress",
                    source: std::io::Error::other(format!("walk_end {:#x}", arg.walk_end)),
                });
            }
            start = arg.walk_end;
        }
        Ok(())
    }
}

impl Drop for UffdDirtyLog {
    fn drop(&mut self) {
        let mut range = UffdioRange {
            start: self.base,
            len: self.len,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a struct uffdio_range; unregistering drops the
        // write protection so the memory behaves normally after tracking ends. (Closing
        // the descriptor would do it too; this says so where it happens. It fails
        // harmlessly when another process's mapping is gone.)
        unsafe { ioctl_ptr(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_hugepages::PagePreference;

    #[test]
    fn a_timed_walk_changes_nothing_the_next_collection_reports() {
        if let Err(why) = probe_uffd_wp_async() {
            eprintln!("skipped: asynchronous userfaultfd write-protect: {why}");
            return;
        }
        let memory =
            Arc::new(GuestMemory::anonymous(256 * PAGE_SIZE, PagePreference::Small).unwrap());
        let mut log = UffdDirtyLog::new(memory.clone()).unwrap();
        let written = [3u64, 64, 65, 255];
        for page in written {
            memory.write_page(page, &[7u8; PAGE_SIZE]);
        }
        assert!(log.time_paused_walk().is_some_and(|s| s >= 0.0));
        let mut out = DirtyBitmap::new(256);
        log.collect(&mut out).unwrap();
        assert_eq!(out.iter().collect::<Vec<_>>(), written);
        // That collection protected them again: nothing more until the next write.
        let mut again = DirtyBitmap::new(256);
        log.collect(&mut again).unwrap();
        assert_eq!(again.count(), 0);
    }
}
