//! Buffers the kernel reads from and writes to: the receive side's provided-buffer
//! rings, and the send side's pool seen as [`SendBuffers`] for staging.

use super::tx::{Marker, TxStream};
use crate::transport::TxError;
use crate::transport::stage::SendBuffers;
use dwcp_hugepages::{Arena, ArenaOptions, BufferPool, PagePreference};
use io_uring::{IoUring, types};
use std::sync::atomic::{AtomicU16, Ordering};

/// Full buffers a stream may stage beyond the one being sent: staged pages are still
/// in cache when the kernel copies them into the socket, which measured faster than
/// staging further ahead (the pool may hold more buffers, for zero-copy sends awaiting
/// their notifications).
const STAGED_AHEAD: usize = 1;

/// A worker's send pool and its streams, as staging sees them: each stream fills one
/// buffer at a time, and queues it for sending when it is full.
pub(super) struct PoolBuffers<'a> {
    pub pool: &'a mut BufferPool,
    pub streams: &'a mut [TxStream],
    /// A buffer stops taking runs once it holds this much (the send size); it is
    /// larger only to take a whole codec batch.
    pub fill_limit: usize,
}

impl<'a> PoolBuffers<'a> {
    pub fn new(pool: &'a mut BufferPool, streams: &'a mut [TxStream], fill_limit: usize) -> Self {
        PoolBuffers {
            pool,
            streams,
            fill_limit,
        }
    }
}

impl SendBuffers for PoolBuffers<'_> {
    fn room(&mut self, i: usize, need: usize) -> Result<Option<&mut [u8]>, TxError> {
        let st = &mut self.streams[i];
        let (start, room_end) = (st.start(), self.pool.buf_size() - st.tail());
        let fits = st.filling.as_ref().is_some_and(|&(_, len)| {
            len + need <= room_end && (len == start || len - start + need <= self.fill_limit)
        });
        if !fits {
            if st.queue.len() >= STAGED_AHEAD {
                return Ok(None);
            }
            st.queue_filling(self.pool, Marker::None);
            match self.pool.acquire() {
                Some(token) => st.filling = Some((token, start)),
                None => return Ok(None),
            }
        }
        let (token, len) = st.filling.as_ref().expect("a buffer is filling");
        Ok(Some(&mut self.pool.buf_mut(token)[*len..room_end]))
    }

    fn filled(&mut self, i: usize, n: usize) {
        if let Some((_, len)) = &mut self.streams[i].filling {
            *len += n;
        }
    }
}

/// A provided-buffer ring: the ring of descriptors the kernel reads and the buffers
/// they describe, both in memory this value owns.
pub(super) struct ProvidedBuffers {
    ring_mem: Arena,
    buffers: Arena,
    entries: u16,
    buf_size: usize,
    tail: u16,
    bgid: u16,
    registered: bool,
}

impl ProvidedBuffers {
    pub(super) fn new(
        ring: &IoUring,
        bgid: u16,
        entries: u16,
        buf_size: usize,
    ) -> std::io::Result<Self> {
        assert!(entries.is_power_of_two());
        let opts = ArenaOptions {
            prefer: PagePreference::Small,
            numa_node: None,
            populate: true,
        };
        let io = |e: dwcp_hugepages::MemoryError| std::io::Error::other(e.to_string());
        let ring_mem = Arena::new(
            usize::from(entries) * std::mem::size_of::<types::BufRingEntry>(),
            &opts,
        )
        .map_err(io)?;
        let buffers = Arena::new(
            usize::from(entries) * buf_size,
            &ArenaOptions {
                prefer: PagePreference::TransparentHuge,
                ..opts
            },
        )
        .map_err(io)?;
        let mut pb = ProvidedBuffers {
            ring_mem,
            buffers,
            entries,
            buf_size,
            tail: 0,
            bgid,
            registered: false,
        };
        // SAFETY: the descriptor ring is page-aligned memory we own, `entries` long, and
        // outlives the registration (unregistered in `unregister` or with the ring).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pb.ring_mem.as_ptr() as u64,
                entries,
                bgid,
                0,
            )?;
        }
        pb.registered = true;
        Ok(pb)
    }

    fn base(&self) -> *mut types::BufRingEntry {
        self.ring_mem.as_ptr().cast()
    }

    /// Put buffer `bid` at the ring's tail (not yet visible to the kernel).
    fn stage(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.entries - 1));
        // SAFETY: slot < entries, inside the descriptor ring we own; the kernel only
        // reads slots below the published tail, and this one is past it.
        let entry = unsafe { &mut *self.base().add(slot) };
        // SAFETY: bid < entries, so the buffer lies inside `buffers`.
        entry.set_addr(
            unsafe { self.buffers.as_ptr().add(usize::from(bid) * self.buf_size) } as u64,
        );
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make staged buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail lives in the first descriptor's reserved field (the kernel's
        // layout), which is a properly aligned u16 inside memory we own.
        let tail = unsafe { &*types::BufRingEntry::tail(self.base()).cast::<AtomicU16>() };
        // Release: the descriptors written before must be visible before the kernel
        // sees the new tail (it reads the tail with acquire semantics).
        tail.store(self.tail, Ordering::Release);
    }

    pub(super) fn provide_all(&mut self) {
        for bid in 0..self.entries {
            self.stage(bid);
        }
        self.publish();
    }

    pub(super) fn give_back(&mut self, bid: u16) {
        self.stage(bid);
        self.publish();
    }

    pub(super) fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.buf_size;
        &self.buffers.as_slice()[start..start + len.min(self.buf_size)]
    }

    pub(super) fn unregister(&mut self, ring: &IoUring) {
        if self.registered {
            let _ = ring.submitter().unregister_buf_ring(self.bgid);
            self.registered = false;
        }
    }
}
