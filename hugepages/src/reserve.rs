//! The system's hugetlb pools: which sizes exist, how many are free, and reserving more
//! for the life of a guard.

use crate::MemoryError;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const SYSFS_HUGEPAGES: &str = "/sys/kernel/mm/hugepages";

/// One hugetlb page size the kernel offers, with its pool's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugepageSize {
    /// Page size in bytes.
    pub page_size: usize,
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages not in use (`free_hugepages`).
    pub free: u64,
}

fn pool_dir(page_size: usize) -> PathBuf {
    Path::new(SYSFS_HUGEPAGES).join(format!("hugepages-{}kB", page_size / 1024))
}

fn read_counter(path: &Path) -> Result<u64, MemoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| MemoryError::Sysfs {
        path: path.to_owned(),
        source,
    })?;
    text.trim().parse().map_err(|_| MemoryError::Sysfs {
        path: path.to_owned(),
        source: std::io::Error::other(format!("not a number: {:?}", text.trim())),
    })
}

/// The hugetlb page sizes this kernel offers, smallest first.
pub fn hugepage_sizes() -> Vec<HugepageSize> {
    let Ok(entries) = std::fs::read_dir(SYSFS_HUGEPAGES) else {
        return Vec::new();
    };
    let mut sizes: Vec<HugepageSize> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kb: usize = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let page_size = kb * 1024;
            let dir = pool_dir(page_size);
            Some(HugepageSize {
                page_size,
                total: read_counter(&dir.join("nr_hugepages")).ok()?,
                free: read_counter(&dir.join("free_hugepages")).ok()?,
            })
        })
        .collect();
    sizes.sort_by_key(|s| s.page_size);
    sizes
}

/// Free pages of one size, or `None` when the kernel does not offer that size.
pub(crate) fn free_hugepages(page_size: usize) -> Option<usize> {
    read_counter(&pool_dir(page_size).join("free_hugepages"))
        .ok()
        .map(|n| n as usize)
}

/// Extra hugetlb pages reserved in the system pool for the life of the guard; the
/// previous pool size is restored on drop.
///
/// Writers of `nr_hugepages` in this project serialise on an advisory lock
/// (`/run/lock/dwcp-hugepages.lock`), so parallel tests restore each other's counts
/// correctly.
#[derive(Debug)]
pub struct HugepageReservation {
    nr_path: PathBuf,
    previous: u64,
    granted: u64,
    _lock: File,
}

impl HugepageReservation {
    /// Grow the pool of `page_size` pages by `count`. The kernel may grant fewer when
    /// memory is fragmented: see [`HugepageReservation::granted`].
    pub fn reserve(page_size: usize, count: u64) -> Result<Self, MemoryError> {
        let nr_path = pool_dir(page_size).join("nr_hugepages");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(MemoryError::NotRoot { path: nr_path });
        }
        let lock_path = Path::new("/run/lock/dwcp-hugepages.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path)
            .map_err(|source| MemoryError::Sysfs {
                path: lock_path.to_owned(),
                source,
            })?;
        // SAFETY: flock on a descriptor we own; blocks until other reservers finish.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(MemoryError::Sysfs {
                path: lock_path.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        let previous = read_counter(&nr_path)?;
        write_counter(&nr_path, previous + count)?;
        let now = read_counter(&nr_path)?;
        Ok(HugepageReservation {
            nr_path,
            previous,
            granted: now.saturating_sub(previous),
            _lock: lock,
        })
    }

    /// Pages the kernel actually added.
    pub fn granted(&self) -> u64 {
        self.granted
    }
}

fn write_counter(path: &Path, value: u64) -> Result<(), MemoryError> {
    std::fs::write(path, value.to_string()).map_err(|source| MemoryError::Sysfs {
        path: path.to_owned(),
        source,
    })
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        // Pages still mapped are kept by the kernel as surplus until unmapped, so
        // restoring the count is safe even if a mapping outlives the guard.
        if let Err(e) = write_counter(&self.nr_path, self.previous) {
            eprintln!(
                "dwcp-hugepages: could not restore {}: {e}",
                self.nr_path.display()
            );
        }
    }
}
