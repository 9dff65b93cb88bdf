//! Pages by RMA write: page contents go from the source's guest memory straight into
//! the destination's (libfabric `fi_write`: no staging copy on either side), beside the
//! session's data streams.
//!
//! Each data stream has one libfabric connection of its own ([`RmaLink`] at the
//! source, [`RmaTargets`] at the destination). A source worker stages a run as it
//! always does, except that a non-zero page's bytes are not copied into the send
//! buffer: the run's non-zero pages are written by RMA, and once the provider reports
//! them delivered into the destination's memory (`FI_DELIVERY_COMPLETE`), an
//! [`crate::wire::FrameKind::RmaPages`] frame with their CRCs follows on the data
//! stream, in order with everything else the stream carries. Zero pages, codec
//! batches, markers and device state stay frames on the stream, which keeps them
//! sealed in an authenticated session and lets a switch between RMA and sends happen
//! anywhere: each page names how it came.
//!
//! The destination does not trust what landed: its parser checks each page against
//! its frame's CRC and asks for the ones that differ again
//! ([`crate::wire::ControlMessage::ResendPages`]). The source writes a page again only
//! once the destination acknowledged the round that carried it, so no write lands on a
//! page whose check is still to come.
//!
//! The `tcp` provider progresses manually: remote writes land only while the target
//! calls into it. Each destination connection has a thread that waits in the
//! provider ([`dwcp_fabric::Connection::wait_completions`]) for as long as the stream
//! lives.

use super::fabric::{self, Connection, FabricError, MemoryRegion, RemoteRegion, RmaWrite};
use crate::crc_table::Recorder;
use crate::memory::{GuestMemory, PAGE_SIZE, zero_page_crc};
use crate::wire::{FRAME_HEADER_LEN, FrameHeader, PAGE_CRC_LEN};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a source worker waits for its writes' delivery before giving the stream
/// up as broken.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(30);

/// Space [`stage_rma_run`] may need for a run of `count` pages: every page in a frame
/// of its own, a CRC each.
pub const fn rma_stage_space(count: u32) -> usize {
    count as usize * (FRAME_HEADER_LEN + PAGE_CRC_LEN)
}

/// One data stream's RMA connection at the source: the source's guest memory
/// registered with it, and the destination's window.
pub struct RmaLink {
    stream: u16,
    connection: Connection,
    local: MemoryRegion,
    remote: RemoteRegion,
    next_context: u64,
    completed: Vec<u64>,
}

impl RmaLink {
    /// Stream `stream`'s connection, writing from `local` into `remote`.
    pub fn new(
        stream: u16,
        connection: Connection,
        local: MemoryRegion,
        remote: RemoteRegion,
    ) -> Self {
        RmaLink {
            stream,
            connection,
            local,
            remote,
            next_context: 1,
            completed: Vec::new(),
        }
    }

    /// The data stream it belongs to.
    pub fn stream(&self) -> u16 {
        self.stream
    }

    /// Write pages `first..first + count` from `from_page..` of local memory into
    /// the same pages of the destination (`from_page` differs only under a test
    /// switch). Returns the write's context.
    fn write(&mut self, first: u64, count: u32, from_page: u64) -> Result<u64, FabricError> {
        let context = self.next_context;
        self.next_context += 1;
        self.connection.write(
            &self.local,
            &self.remote,
            RmaWrite {
                offset: from_page * PAGE_SIZE as u64,
                len: u64::from(count) * PAGE_SIZE as u64,
                remote_offset: first * PAGE_SIZE as u64,
                context,
            },
            &mut self.completed,
        )?;
        Ok(context)
    }

    /// Wait until every write issued so far has completed (delivered, where the
    /// provider can tell).
    fn wait_all(&mut self) -> Result<(), FabricError> {
        let outstanding = self.next_context - 1;
        let deadline = Instant::now() + DELIVERY_PATIENCE;
        let mut spins = 0u32;
        loop {
            self.connection.completions(&mut self.completed)?;
            // Contexts complete in any order; all are in once as many came back as
            // were issued since the last wait.
            if self.completed.len() as u64 >= outstanding {
                self.completed.clear();
                self.next_context = 1;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(FabricError::TimedOut(
                    "waiting for RMA writes to be delivered",
                    DELIVERY_PATIENCE,
                ));
            }
            spins += 1;
            if spins > 64 {
                std::thread::yield_now();
            }
        }
    }
}

/// What was written by RMA, over a session (all streams).
#[derive(Debug, Default)]
pub struct RmaCounters {
    /// Pages written.
    pub pages: AtomicU64,
    /// RMA writes issued (one per run of non-zero pages).
    pub writes: AtomicU64,
    /// Time workers waited for delivery, nanoseconds.
    pub wait_nanos: AtomicU64,
}

/// The source's RMA connections, one per data stream, lent to whichever worker carries
/// the stream (and given back when a worker is retired for one of another transport).
pub struct RmaPool {
    links: Mutex<Vec<Option<RmaLink>>>,
    /// Whether workers write by RMA now; off, runs go as frames (a live switch).
    enabled: AtomicBool,
    /// The provider and its fabric and domain, for the report.
    pub provider: fabric::ProviderInfo,
    /// What went by RMA.
    pub counters: RmaCounters,
    /// Connections not closed (lent or not).
    open: std::sync::atomic::AtomicUsize,
}

impl RmaPool {
    /// A pool of `links` (one per stream, by stream id), through `provider`.
    pub fn new(links: Vec<RmaLink>, provider: fabric::ProviderInfo) -> Arc<Self> {
        let mut slots: Vec<Option<RmaLink>> = Vec::new();
        for link in links {
            let s = usize::from(link.stream);
            if slots.len() <= s {
                slots.resize_with(s + 1, || None);
            }
            slots[s] = Some(link);
        }
        let open = slots.iter().filter(|l| l.is_some()).count();
        Arc::new(RmaPool {
            open: std::sync::atomic::AtomicUsize::new(open),
            links: Mutex::new(slots),
            enabled: AtomicBool::new(true),
            provider,
            counters: RmaCounters::default(),
        })
    }

    /// Take stream `stream`'s link, if it has one (a stream that was lost has none).
    pub fn take(self: &Arc<Self>, stream: u16) -> Option<LentLink> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let link = links.get_mut(usize::from(stream))?.take()?;
        Some(LentLink {
            link: Some(link),
            pool: self.clone(),
        })
    }

    /// Write by RMA from the next run on (`true`), or send runs as frames.
    pub fn set_enabled(&self, on: bool) {
        // Relaxed: workers read it per run; a run staged either way is correct.
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether workers write by RMA now.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Streams whose connection is open (lent to a worker or not): those not lost.
    pub fn links(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn give_back(&self, link: RmaLink) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let s = usize::from(link.stream);
        if let Some(slot) = links.get_mut(s) {
            *slot = Some(link);
        }
    }
}

/// A link a worker holds; back to its pool when the worker lets go of it, unless
/// [`LentLink::close`]d.
pub struct LentLink {
    link: Option<RmaLink>,
    pool: Arc<RmaPool>,
}

impl LentLink {
    /// Close the connection for good (its stream was lost: nothing of it may land any
    /// more, and its replacement carries pages as frames).
    pub fn close(mut self) {
        if self.link.take().is_some() {
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether runs go by RMA now.
    pub fn enabled(&self) -> bool {
        self.pool.enabled()
    }

    /// Wait until every write issued through the link has been delivered: the frames
    /// naming their pages may go out then. Called before each send buffer of the
    /// stream goes to the socket, so that writes of many runs are in flight while the
    /// buffer fills.
    pub fn deliver(&mut self) -> Result<(), FabricError> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        if link.next_context == 1 {
            return Ok(());
        }
        let waited = Instant::now();
        link.wait_all()?;

        self.pool
            .counters
            .wait_nanos
            .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for LentLink {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            self.pool.give_back(link);
        }
    }
}

/// What [`stage_rma_run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RmaStaged {
    /// Bytes of frames written into the buffer.
    pub bytes: usize,
    /// Pages sent as zero markers.
    pub zero_pages: u32,
    /// Pages written by RMA.
    pub rma_pages: u32,
}

/// Stage pages `first..first + count` (within one chunk) of `memory` through `link`:
/// zero pages as zero markers, the rest written by RMA, with their
/// [`crate::wire::FrameKind::RmaPages`] frames; the frames at the start of `out`, which
/// must not be sent before [`LentLink::deliver`] returned. The
/// CRC of each page is taken from a copy made just before its write, and recorded in
/// the source's table; a page the guest changes meanwhile arrives with a CRC that does
/// not match, and is sent again (the dirty log has it too).
///
/// # Panics
/// If `out` is shorter than [`rma_stage_space`]`(count)`.
pub fn stage_rma_run(
    memory: &GuestMemory,
    lent: &mut LentLink,
    first: u64,
    count: u32,
    out: &mut [u8],
    table: Option<Recorder<'_>>,
    scratch: &mut [u8],
) -> Result<RmaStaged, FabricError> {
    assert!(
        out.len() >= rma_stage_space(count),
        "stage buffer too small"
    );
    let kernels = dwcp_simd::Kernels::active();
    let LentLink { link, pool } = lent;
    let link = link
        .as_mut()
        .ok_or_else(|| FabricError::Protocol("a closed RMA link".into()))?;
    let mut staged = RmaStaged::default();
    let mut writes = 0u64;
    // Frames go straight into `out`: a run's header slot is reserved when it opens, its
    // CRCs follow as its pages come, and the header is written when it closes.
    let mut pos = 0usize;
    // The open run: (first page, zero?, where its header goes).
    let mut open: Option<(u64, bool, usize)> = None;
    let mut close =
        |(start, zero, at): (u64, bool, usize), end: u64, out: &mut [u8], link: &mut RmaLink| {
            let n = (end - start) as u32;
            let header = if zero {
                FrameHeader::zero_run(start, n)
            } else {
                if corrupt_next_write(memory.pages()) {
                    // Test-only: the run's first page lands with its neighbour's bytes.
                    link.write(start, 1, start ^ 1)?;
                    writes += 1;
                    if n > 1 {
                        link.write(start + 1, n - 1, start + 1)?;
                        writes += 1;
                    }
                } else {
                    link.write(start, n, start)?;
                    writes += 1;
                }
                FrameHeader::rma_pages(start, n)
            };
            let mut bytes = [0u8; FRAME_HEADER_LEN];
            header.encode(&mut bytes);
            out[at..at + FRAME_HEADER_LEN].copy_from_slice(&bytes);
            Ok::<(), FabricError>(())
        };
    for page in first..first + u64::from(count) {
        memory.read_page(page, scratch);
        let zero = kernels.is_zero(scratch);
        let crc = if zero {
            zero_page_crc()
        } else {
            kernels.crc32c(scratch)
        };
        if let Some(table) = table {
            table.record(page, crc);
        }
        match open {
            Some((_, z, _)) if z == zero => {}
            previous => {
                if let Some(previous) = previous {
                    close(previous, page, out, link)?;
                }
                open = Some((page, zero, pos));
                pos += FRAME_HEADER_LEN;
            }
        }
        if zero {
            staged.zero_pages += 1;
        } else {
            out[pos..pos + PAGE_CRC_LEN].copy_from_slice(&crc.to_le_bytes());
            pos += PAGE_CRC_LEN;
            staged.rma_pages += 1;
        }
    }
    if let Some(previous) = open {
        close(previous, first + u64::from(count), out, link)?;
    }
    // The tcp provider progresses manually at the source too: its writes move only
    // while the writer calls into it.
    link.connection.completions(&mut link.completed)?;
    pool.counters
        .pages
        .fetch_add(u64::from(staged.rma_pages), Ordering::Relaxed);
    pool.counters.writes.fetch_add(writes, Ordering::Relaxed);
    staged.bytes = pos;
    Ok(staged)
}

/// Test-only (`DWCP_TEST_RMA_CORRUPT_WRITES=N`): the first page of each of the
/// process's first N RMA writes takes its bytes from the neighbouring page, as a write
/// that lands wrong would.
fn corrupt_next_write(pages: u64) -> bool {
    static LEFT: OnceLock<AtomicU64> = OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicU64::new(
            std::env::var("DWCP_TEST_RMA_CORRUPT_WRITES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    pages >= 2
        && left.load(Ordering::Relaxed) > 0
        && left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
}

/// One stream's connection at the destination, with guest memory registered on it.
struct Target {
    connection: Connection,
    _region: MemoryRegion,
}

/// The destination's RMA connections, one per data stream, each kept progressing by
/// a thread of its own until the stream ends or is fenced ([`RmaTargets::close`]).
pub struct RmaTargets {
    slots: Vec<Arc<Mutex<Option<Target>>>>,
    threads: Vec<JoinHandle<()>>,
    /// The provider, for the report.
    pub provider: fabric::ProviderInfo,
}

impl RmaTargets {
    /// Empty: connections are added with [`RmaTargets::add`] as they arrive.
    pub fn new(provider: fabric::ProviderInfo, streams: u16) -> Self {
        RmaTargets {
            slots: (0..streams).map(|_| Arc::new(Mutex::new(None))).collect(),
            threads: Vec::new(),
            provider,
        }
    }

    /// Register `memory` on `connection` (stream `stream`'s) and keep it progressing.
    /// Returns the window the source writes into.
    ///
    /// # Safety
    /// The source may write into `memory` whenever this connection lives: nothing may
    /// rely on its content, except where the session's protocol says (a page checked
    /// against its frame's CRC, which the source does not write again before the round
    /// is acknowledged). `memory` must outlive the targets (the caller keeps its
    /// `Arc` in the session, which closes the targets first).
    pub unsafe fn add(
        &mut self,
        stream: u16,
        connection: Connection,
        memory: &GuestMemory,
    ) -> Result<RemoteRegion, FabricError> {
        let slot = self
            .slots
            .get(usize::from(stream))
            .ok_or_else(|| FabricError::Protocol(format!("no stream {stream}")))?
            .clone();
        // SAFETY: the caller keeps the mapping for as long as the targets live, and
        // accepts that the peer writes into it.
        let region = unsafe { connection.register(memory.as_ptr(), memory.len()) }?;
        let window = region.remote();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Target {
            connection,
            _region: region,
        });
        let thread = std::thread::Builder::new()
            .name(format!("dwcp-rma-{stream}"))
            .spawn(move || progress(&slot))
            .map_err(|e| FabricError::Protocol(format!("starting a progress thread: {e}")))?;
        self.threads.push(thread);
        Ok(window)
    }

    /// Close stream `stream`'s connection: once this returns, nothing more of it lands
    /// in guest memory (its endpoint and registration are gone).
    pub fn close(&self, stream: u16) {
        if let Some(slot) = self.slots.get(usize::from(stream)) {
            slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Close every connection and wait for their threads.
    pub fn close_all(&mut self) {
        for s in 0..self.slots.len() {
            self.close(s as u16);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RmaTargets {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Keep one connection progressing until it is closed.
fn progress(slot: &Mutex<Option<Target>>) {
    let mut seen = Vec::new();
    loop {
        let guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(target) = guard.as_ref() else {
            return;
        };
        // Blocks in the provider (which progresses meanwhile) for at most a few
        // milliseconds, so that a close waits no longer.
        match target
            .connection
            .wait_completions(&mut seen, Duration::from_millis(2))
        {
            Ok(_) => seen.clear(),
            Err(e) => {
                // A broken connection: its stream's frames will say what is missing.
                eprintln!("dwcp: an RMA connection stopped: {e}");
                drop(guard);
                slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                return;
            }
        }
        drop(guard);
    }
}

/// Pick the provider to use: one on RDMA hardware where there is one, else a
/// socket-based one (`tcp`), else none.
pub fn best_provider() -> Result<fabric::ProviderInfo, FabricError> {
    let list = fabric::providers()?;
    list.iter()
        .find(|p| !p.is_socket_based())
        .or_else(|| list.iter().find(|p| p.provider == "tcp"))
        .or_else(|| list.first())
        .cloned()
        .ok_or_else(|| FabricError::NoProvider("with RMA on message endpoints".into()))
}
