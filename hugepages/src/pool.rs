//! Fixed-size buffers carved from one arena.
//!
//! A pool belongs to one thread (a worker): taking and returning a buffer is a push or
//! pop on a preallocated free list, no allocation and no atomics. Buffer addresses never
//! move, so the whole pool can be registered once with io_uring ([`BufferPool::iovecs`])
//! or as one RDMA memory region ([`BufferPool::region`]).

use crate::{Arena, ArenaOptions, MemoryError};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_POOL_ID: AtomicU32 = AtomicU32::new(1);

/// Ownership of one buffer of one pool. Not `Clone`: whoever holds it owns the buffer
/// until it is given back with [`BufferPool::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct BufToken {
    pool: u32,
    index: u32,
}

impl BufToken {
    /// The buffer's index in its pool: the io_uring registered-buffer index.
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// Fixed-size buffers with stable addresses.
#[derive(Debug)]
pub struct BufferPool {
    arena: Arena,
    id: u32,
    buf_size: usize,
    count: u32,
    free: Vec<u32>,
}

impl BufferPool {
    /// `count` buffers of `buf_size` bytes each (rounded up to 64 bytes so buffers do not
    /// share cache lines), in one arena built with `options`.
    pub fn new(count: u32, buf_size: usize, options: &ArenaOptions) -> Result<Self, MemoryError> {
        if count == 0 || buf_size == 0 {
            return Err(MemoryError::InvalidLength {
                len: buf_size,
                why: "a pool needs at least one non-empty buffer",
            });
        }
        let buf_size = buf_size.div_ceil(64) * 64;
        let total = buf_size
            .checked_mul(count as usize)
            .ok_or(MemoryError::InvalidLength {
                len: buf_size,
                why: "pool size overflows",
            })?;
        let arena = Arena::new(total, options)?;
        Ok(BufferPool {
            arena,
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            buf_size,
            count,
            // Reversed so buffers are handed out lowest address first.
            free: (0..count).rev().collect(),
        })
    }

    /// Fault in the first `bytes` of every buffer (for a pool made without populating,
    /// whose buffers are mostly used only that far).
    pub fn populate_prefix(&mut self, bytes: usize) {
        for i in 0..self.count as usize {
            self.arena
                .populate_range(i * self.buf_size, bytes.min(self.buf_size));
        }
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Number of buffers.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Buffers not handed out.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// The arena behind the pool (backing, NUMA node).
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// Take a free buffer, if any.
    #[inline]
    pub fn acquire(&mut self) -> Option<BufToken> {
        self.free.pop().map(|index| BufToken {
            pool: self.id,
            index,
        })
    }

    /// Give a buffer back.
    ///
    /// # Panics
    /// If the token belongs to another pool (a bug in the caller, not an input error).
    #[inline]
    pub fn release(&mut self, token: BufToken) {
        assert_eq!(token.pool, self.id, "buffer released into a foreign pool");
        // Cannot allocate: at most `count` tokens exist and the vector has that capacity.
        self.free.push(token.index);
    }

    #[inline]
    fn offset(&self, token: &BufToken) -> usize {
        assert_eq!(token.pool, self.id, "buffer token from a foreign pool");
        token.index as usize * self.buf_size
    }

    /// The buffer's bytes.
    #[inline]
    pub fn buf(&self, token: &BufToken) -> &[u8] {
        let offset = self.offset(token);
        &self.arena.as_slice()[offset..offset + self.buf_size]
    }

    /// The buffer's bytes, mutably.
    #[inline]
    pub fn buf_mut(&mut self, token: &BufToken) -> &mut [u8] {
        let offset = self.offset(token);
        let size = self.buf_size;
        &mut self.arena.as_mut_slice()[offset..offset + size]
    }

    /// The buffer's address, for handing to the kernel. Valid while the pool lives.
    #[inline]
    pub fn buf_ptr(&self, token: &BufToken) -> *mut u8 {
        let offset = self.offset(token);
        // SAFETY: offset + buf_size <= arena length by construction.
        unsafe { self.arena.as_ptr().add(offset) }
    }

    /// One iovec per buffer, in index order, for `io_uring_register_buffers`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count as usize)
            .map(|i| libc::iovec {
                // SAFETY: i * buf_size is inside the arena.
                iov_base: unsafe { self.arena.as_ptr().add(i * self.buf_size) }.cast(),
                iov_len: self.buf_size,
            })
            .collect()
    }

    /// The whole pool as one region (address, length), for an RDMA memory region.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.arena.as_ptr(), self.buf_size * self.count as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PagePreference;

    fn small() -> ArenaOptions {
        ArenaOptions {
            prefer: PagePreference::Small,
            ..ArenaOptions::default()
        }
    }

    #[test]
    fn buffers_are_disjoint_stable_and_recycled() {
        let mut pool = BufferPool::new(4, 1000, &small()).unwrap();
        assert_eq!(pool.buf_size(), 1024);
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        let a_ptr = pool.buf_ptr(&a);
        pool.buf_mut(&a).fill(1);
        pool.buf_mut(&b).fill(2);
        assert!(pool.buf(&a).iter().all(|&x| x == 1));
        assert_eq!(pool.buf_ptr(&b) as usize - a_ptr as usize, 1024);
        let iov = pool.iovecs();
        assert_eq!(iov.len(), 4);
        assert_eq!(iov[a.index() as usize].iov_base.cast::<u8>(), a_ptr);
        pool.release(a);
        let c = pool.acquire().unwrap();
        assert_eq!(pool.buf_ptr(&c), a_ptr, "a released buffer is reused");
        let _d = pool.acquire().unwrap();
        let _e = pool.acquire().unwrap();
        assert!(pool.acquire().is_none());
        assert_eq!(pool.available(), 0);
        pool.release(b);
        assert_eq!(pool.available(), 1);
    }

    #[test]
    #[should_panic(expected = "foreign pool")]
    fn foreign_tokens_are_refused() {
        let mut p1 = BufferPool::new(1, 64, &small()).unwrap();
        let mut p2 = BufferPool::new(1, 64, &small()).unwrap();
        let t = p1.acquire().unwrap();
        p2.release(t);
    }
}
