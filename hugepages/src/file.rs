//! Guest memory backed by a file: /dev/shm (tmpfs, 4 KiB pages) or hugetlbfs (2 MiB or
//! 1 GiB pages), mapped shared so another process (a hypervisor) can use the same memory.

use crate::{MemoryError, SMALL_PAGE};
use memmap2::{MmapMut, MmapOptions};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

/// `f_type` of a hugetlbfs mount (linux/magic.h).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The file system under a guest memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileBacking {
    /// tmpfs or another file system with 4 KiB pages.
    Regular,
    /// hugetlbfs with this page size.
    Hugetlbfs {
        /// Bytes per page.
        page_size: usize,
    },
}

impl FileBacking {
    /// The page size the file's length must be a multiple of.
    pub fn page_size(self) -> usize {
        match self {
            FileBacking::Regular => SMALL_PAGE,
            FileBacking::Hugetlbfs { page_size } => page_size,
        }
    }
}

/// A shared mapping of a guest memory file.
#[derive(Debug)]
pub struct FileMemory {
    map: MmapMut,
    /// The file mapped (kept open: its holes are asked of this file, not of whatever
    /// the path names later).
    file: std::fs::File,
    path: PathBuf,
    backing: FileBacking,
}

fn file_err(path: &Path, source: std::io::Error) -> MemoryError {
    MemoryError::File {
        path: path.to_owned(),
        source,
    }
}

/// What file system `dir` is on.
fn backing_of(dir: &Path) -> Result<FileBacking, MemoryError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| file_err(dir, std::io::Error::other("path contains a NUL byte")))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c_path` is NUL-terminated and `st` is a writable statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(file_err(dir, std::io::Error::last_os_error()));
    }
    // SAFETY: statfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs
    if st.f_type as i64 == HUGETLBFS_MAGIC {
        Ok(FileBacking::Hugetlbfs {
            page_size: st.f_bsize as usize,
        })
    } else {
        Ok(FileBacking::Regular)
    }
}

/// The directory holding `path` and what file system it is on.
fn backing_of_file(path: &Path) -> Result<FileBacking, MemoryError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    backing_of(dir)
}

fn check_len(len: usize, backing: FileBacking) -> Result<(), MemoryError> {
    if len == 0 || !len.is_multiple_of(backing.page_size()) {
        return Err(MemoryError::InvalidLength {
            len,
            why: "guest memory must be a non-zero multiple of the file system's page size",
        });
    }
    Ok(())
}

impl FileMemory {
    /// Create (or truncate) `path` to `len` bytes and map it. `len` must be a non-zero
    /// multiple of the file system's page size.
    pub fn create(path: impl AsRef<Path>, len: usize) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        let backing = backing_of_file(path)?;
        check_len(len, backing)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| file_err(path, e))?;
        file.set_len(len as u64).map_err(|e| file_err(path, e))?;
        Self::map(file, path, len, backing)
    }

    /// Map an existing file at its current length.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| file_err(path, e))?;
        let len = file.metadata().map_err(|e| file_err(path, e))?.len();
        let len = usize::try_from(len).map_err(|_| MemoryError::InvalidLength {
            len: usize::MAX,
            why: "file larger than the address space",
        })?;
        let backing = backing_of_file(path)?;
        check_len(len, backing)?;
        Self::map(file, path, len, backing)
    }

    fn map(
        file: std::fs::File,
        path: &Path,
        len: usize,
        backing: FileBacking,
    ) -> Result<Self, MemoryError> {
        // SAFETY: the mapping is shared with whoever else maps the file; that is the
        // point of file-backed guest memory. Concurrent writers are expected (a guest),
        // and readers of this memory treat it as bytes that may change under them.
        let map =
            unsafe { MmapOptions::new().len(len).map_mut(&file) }.map_err(|e| file_err(path, e))?;
        Ok(FileMemory {
            map,
            file,
            path: path.to_owned(),
            backing,
        })
    }

    /// Write `bufs` one after another at `offset` of the file with `pwritev(2)`;
    /// returns the bytes written (fewer than asked if the call stopped short).
    /// Through the file, a page that is a hole is filled without being zeroed first
    /// or mapped here, which writing it through the mapping costs.
    pub fn write_vectored_at(
        &self,
        offset: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: IoSlice is ABI-compatible with struct iovec (std guarantees it), the
        // slices are valid for reads for the call, and the count fits a c_int (callers
        // pass at most IOV_MAX).
        let n = unsafe {
            libc::pwritev(
                self.file.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                bufs.len().min(libc::c_int::MAX as usize) as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The byte ranges of the file that hold data, in order (`lseek(2)` with
    /// `SEEK_DATA`/`SEEK_HOLE`): the rest are holes, which read as zeros and take no
    /// memory. A file system that does not tell holes reports the whole file as data.
    /// See [`FileMemory::data_extents`] for the cost, and to walk them one at a time.
    pub fn data_ranges(&self) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        let mut extents = self.data_extents()?;
        let mut ranges = Vec::new();
        while let Some(range) = extents.next_extent(self)? {
            ranges.push(range);
        }
        Ok(ranges)
    }

    /// A walk of the file's data ranges, one `next_extent` at a time: a caller that
    /// needs them in order can take each as it gets there, not all of them up front.
    ///
    /// On tmpfs the walk looks at every page that holds data (about 0.05 µs each here:
    /// 5.6 ms for a 512 MiB VM's RAM file with 107k pages of data), so the file's
    /// allocated size is asked first: a file with blocks for all of it needs no walk,
    /// nor one with no block that has no data from its start either (one `SEEK_DATA`:
    /// a file system that keeps no block count must not have its data taken for
    /// holes, which a source would then send as zeros).
    pub fn data_extents(&self) -> std::io::Result<DataExtents> {
        use std::os::unix::fs::MetadataExt;
        let len = self.map.len() as u64;
        let allocated = self.file.metadata()?.blocks().saturating_mul(512);
        let walk = if allocated == 0 && self.seek(0, libc::SEEK_DATA)?.is_none() {
            ExtentWalk::Done
        } else if allocated >= len {
            ExtentWalk::AllData
        } else {
            ExtentWalk::From(0)
        };
        Ok(DataExtents { walk, len })
    }

    /// `lseek(fd, offset, whence)`: the new offset, or `None` for `ENXIO` (no data, or
    /// no hole, past `offset`).
    fn seek(&self, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor we own; it moves only the file offset, which
        // nothing here reads through (the file is used by its mapping).
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What file system backs it.
    pub fn backing(&self) -> FileBacking {
        self.backing
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: empty files are refused.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the mapping; stable while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }

    /// The memory.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// The memory, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

/// Where a walk of a file's data ranges stands (see [`FileMemory::data_extents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtentWalk {
    /// The whole file is data, not yet reported.
    AllData,
    /// Look for data from this offset.
    From(u64),
    /// No data remains.
    Done,
}

/// A walk of a file's data ranges, in order.
#[derive(Debug, Clone)]
pub struct DataExtents {
    walk: ExtentWalk,
    len: u64,
}

impl DataExtents {
    /// The next byte range of `file` that holds data, or `None` when no data remains.
    /// `file` is the one the walk was made for.
    pub fn next_extent(
        &mut self,
        file: &FileMemory,
    ) -> std::io::Result<Option<std::ops::Range<u64>>> {
        let at = match self.walk {
            ExtentWalk::Done => return Ok(None),
            ExtentWalk::AllData => {
                self.walk = ExtentWalk::Done;
                return Ok(Some(0..self.len));
            }
            ExtentWalk::From(at) => at,
        };
        let data = match file.seek(at, libc::SEEK_DATA)? {
            Some(data) if data < self.len => data,
            _ => {
                self.walk = ExtentWalk::Done;
                return Ok(None);
            }
        };
        // A file always ends in a hole (its end), so SEEK_HOLE past data finds one.
        let end = file
            .seek(data, libc::SEEK_HOLE)?
            .unwrap_or(self.len)
            .min(self.len);
        self.walk = if end >= self.len {
            ExtentWalk::Done
        } else {
            ExtentWalk::From(end)
        };
        Ok(Some(data..end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_file_round_trips_through_two_mappings() {
        let path = std::env::temp_dir().join(format!("dwcp-filemem-{}", std::process::id()));
        let shm = Path::new("/dev/shm").join(path.file_name().unwrap());
        let target = if Path::new("/dev/shm").is_dir() {
            shm
        } else {
            path
        };
        let mut a = FileMemory::create(&target, 64 * 1024).unwrap();
        assert_eq!(a.backing(), FileBacking::Regular);
        a.as_mut_slice()[4096..4100].copy_from_slice(b"dwcp");
        let b = FileMemory::open(&target).unwrap();
        assert_eq!(&b.as_slice()[4096..4100], b"dwcp");
        assert_eq!(b.len(), 64 * 1024);
        std::fs::remove_file(&target).unwrap();
    }

    #[test]
    fn a_tmpfs_files_data_ranges_are_what_was_written() {
        let shm = Path::new("/dev/shm").join(format!("dwcp-filemem-holes-{}", std::process::id()));
        let Ok(mut m) = FileMemory::create(&shm, 64 * 4096) else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let _ = std::fs::remove_file(&shm);
        assert_eq!(m.data_ranges().unwrap(), vec![], "a new file is one hole");
        m.as_mut_slice()[3 * 4096] = 1;
        m.as_mut_slice()[4 * 4096 + 7] = 1;
        m.as_mut_slice()[40 * 4096] = 1;
        assert_eq!(
            m.data_ranges().unwrap(),
            vec![3 * 4096..5 * 4096, 40 * 4096..41 * 4096]
        );
        m.as_mut_slice().fill(2);
        assert_eq!(m.data_ranges().unwrap(), vec![0..64 * 4096], "all data");
    }

    #[test]
    fn lengths_that_are_not_page_multiples_are_refused() {
        let target = std::env::temp_dir().join(format!("dwcp-filemem-bad-{}", std::process::id()));
        let err = FileMemory::create(&target, 5000).unwrap_err();
        assert!(
            matches!(err, MemoryError::InvalidLength { len: 5000, .. }),
            "{err}"
        );
        let _ = std::fs::remove_file(&target);
    }
}
