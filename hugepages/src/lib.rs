//! Memory for dwcp: where pages live while they move.
//!
//! - [`Arena`]: one anonymous mapping backed by hugetlb pages (1 GiB or 2 MiB) when the
//!   system has them reserved, else transparent huge pages, else 4 KiB pages; it says
//!   which it got and why.
//! - [`BufferPool`]: fixed-size buffers carved from an arena, with stable addresses for
//!   io_uring registered buffers and RDMA memory regions, handed out without allocating.
//! - [`FileMemory`]: a file in /dev/shm or on hugetlbfs mapped as guest memory.
//! - [`numa`]: topology (nodes, their CPUs, a NIC's node), binding an arena to a node,
//!   pinning a thread.
//! - [`HugepageReservation`]: reserve hugetlb pages for the life of a guard and restore
//!   the previous count after (root only).

mod arena;
mod file;
pub mod numa;
mod pool;
mod reserve;

pub use arena::{Arena, ArenaOptions, PageBacking, PagePreference};
pub use file::{DataExtents, FileBacking, FileMemory};
pub use pool::{BufToken, BufferPool};
pub use reserve::{HugepageReservation, HugepageSize, hugepage_sizes};

use std::path::PathBuf;

/// Small pages, the unit every size here is a multiple of.
pub const SMALL_PAGE: usize = 4096;

/// Errors from this crate, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `mmap` refused even 4 KiB pages.
    #[error("cannot map {len} bytes: {source}")]
    Map {
        /// Bytes requested.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// A length of zero or one that overflows when rounded to the page size.
    #[error("invalid length {len}: {why}")]
    InvalidLength {
        /// The length given.
        len: usize,
        /// Why it is invalid.
        why: &'static str,
    },
    /// Reading or writing a sysfs/procfs file failed.
    #[error("{path}: {source}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A guest memory file could not be created, sized or mapped.
    #[error("guest memory file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// hwloc could not load the topology or bind memory.
    #[error("NUMA: {0}")]
    Numa(String),
    /// Pinning a thread failed.
    #[error("cannot pin thread to CPU {cpu}: {why}")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// Why.
        why: String,
    },
    /// Reserving hugetlb pages needs root.
    #[error("reserving hugepages needs root (writes {path})")]
    NotRoot {
        /// The sysfs file that would be written.
        path: PathBuf,
    },
}
