//! Page frames in and out of byte buffers, independent of how the bytes move.
//!
//! [`stage_run`] turns a run of guest pages into frames in a send buffer: each page is
//! copied once, from guest memory to where it will be sent, and the zero test and the
//! CRC32C run on that copy (so the CRC always matches the bytes sent, even when a vCPU
//! writes the page meanwhile). [`FrameParser`] does the reverse on the destination for
//! bytes arriving in arbitrary pieces: it validates every header before acting on it,
//! copies page bytes straight into guest memory, and checks each page's CRC as its
//! last byte lands.

use crate::codec::zstd::Decompressor;
use crate::crc_table::{CrcTable, Recorder};
use crate::dirty::DirtyBitmap;
use crate::memory::{GuestMemory, PAGE_SIZE, zero_page_crc};
use crate::transport::StreamFence;
use crate::wire::{
    CHUNK_PAGES, FRAME_HEADER_LEN, FrameHeader, FrameKind, FrameLimits, MAX_BATCH, PAGE_CRC_LEN,
    Routes, StreamSet, WireError,
};
use std::sync::Arc;

/// Bytes one raw page takes in a frame.
const RAW_PAGE_BYTES: usize = PAGE_CRC_LEN + PAGE_SIZE;

/// Space [`stage_run`] may need for a run of `count` pages: the worst case is every page
/// in a frame of its own.
pub const fn stage_space(count: u32) -> usize {
    count as usize * (FRAME_HEADER_LEN + RAW_PAGE_BYTES) + FRAME_HEADER_LEN
}

/// What [`stage_run`] put in the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Staged {
    /// Bytes written.
    pub bytes: usize,
    /// Pages sent as zero markers.
    pub zero_pages: u32,
    /// Pages sent with their content.
    pub raw_pages: u32,
}

#[derive(Clone, Copy)]
enum Open {
    None,
    Zero { at: usize, first: u64, count: u32 },
    Raw { at: usize, first: u64, count: u32 },
}

/// Stage pages `first..first + count` of `memory` as frames at the start of `buf`.
///
/// Each page is copied to the slot it would take if the current raw frame continued;
/// a zero page ends the raw frame there (its speculative copy is simply not sent), and
/// a non-zero page after zeros lands exactly where a new raw frame starts. So every
/// page is copied exactly once.
///
/// When `table` is given, the CRC of every staged page is recorded there (the source's
/// CRC table).
///
/// # Panics
/// If `buf` is shorter than [`stage_space`]`(count)`.
pub fn stage_run(
    memory: &GuestMemory,
    first: u64,
    count: u32,
    buf: &mut [u8],
    table: Option<Recorder<'_>>,
) -> Staged {
    assert!(buf.len() >= stage_space(count), "stage buffer too small");
    let kernels = dwcp_simd::Kernels::active();
    let mut pos = 0usize;
    let mut open = Open::None;
    let mut staged = Staged::default();
    let close = |open: Open, buf: &mut [u8], pos: &mut usize| {
        let (at, header, end) = match open {
            Open::None => return,
            Open::Zero { at, first, count } => (
                at,
                FrameHeader::zero_run(first, count),
                at + FRAME_HEADER_LEN,
            ),
            Open::Raw { at, first, count } => (
                at,
                FrameHeader::raw_pages(first, count, PAGE_SIZE as u32),
                at + FRAME_HEADER_LEN + count as usize * RAW_PAGE_BYTES,
            ),
        };
        let mut bytes = [0u8; FRAME_HEADER_LEN];
        header.encode(&mut bytes);
        buf[at..at + FRAME_HEADER_LEN].copy_from_slice(&bytes);
        *pos = end;
    };
    for page in first..first + u64::from(count) {
        let slot = match open {
            Open::Raw { at, count, .. } => {
                at + FRAME_HEADER_LEN + count as usize * RAW_PAGE_BYTES + PAGE_CRC_LEN
            }
            Open::Zero { at, .. } => at + 2 * FRAME_HEADER_LEN + PAGE_CRC_LEN,
            Open::None => pos + FRAME_HEADER_LEN + PAGE_CRC_LEN,
        };
        let content = &mut buf[slot..slot + PAGE_SIZE];
        memory.read_page(page, content);
        let zero = kernels.is_zero(content);
        let crc = if zero { 0 } else { kernels.crc32c(content) };
        if let Some(table) = table {
            table.record(page, if zero { zero_page_crc() } else { crc });
        }
        open = match (open, zero) {
            (Open::Zero { at, first, count }, true) => Open::Zero {
                at,
                first,
                count: count + 1,
            },
            (Open::Raw { at, first, count }, false) => Open::Raw {
                at,
                first,
                count: count + 1,
            },
            (previous, true) => {
                close(previous, buf, &mut pos);
                Open::Zero {
                    at: pos,
                    first: page,
                    count: 1,
                }
            }
            (previous, false) => {
                close(previous, buf, &mut pos);
                Open::Raw {
                    at: pos,
                    first: page,
                    count: 1,
                }
            }
        };
        if zero {
            staged.zero_pages += 1;
        } else {
            buf[slot - PAGE_CRC_LEN..slot].copy_from_slice(&crc.to_le_bytes());
            staged.raw_pages += 1;
        }
    }
    close(open, buf, &mut pos);
    staged.bytes = pos;
    staged
}

/// Write a frame with no payload (round end, stream end) at the start of `buf`.
pub fn stage_marker(header: FrameHeader, buf: &mut [u8]) -> usize {
    let mut bytes = [0u8; FRAME_HEADER_LEN];
    header.encode(&mut bytes);
    buf[..FRAME_HEADER_LEN].copy_from_slice(&bytes);
    FRAME_HEADER_LEN
}

/// Something a data stream announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Round `round` is complete on this stream, which carried `pages` pages in it.
    RoundEnd {
        /// The round.
        round: u64,
        /// Pages in it on this stream.
        pages: u32,
    },
    /// The stream is finished.
    StreamEnd,
    /// A piece of the device state: `bytes` at `offset` of its stream.
    DeviceState {
        /// Where in the device-state stream.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Pages written by RMA whose content did not match their frame's CRCs: the source
    /// must send them again. Their table entries hold the CRC of what landed.
    Resend {
        /// The pages.
        pages: Vec<u64>,
    },
}

/// Counters of one received stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxCounters {
    /// Bytes fed to the parser.
    pub bytes: u64,
    /// Pages received with content.
    pub raw_pages: u64,
    /// Pages received as zero markers.
    pub zero_pages: u64,
    /// Pages received as deltas.
    pub delta_pages: u64,
    /// Pages received as references to another page.
    pub ref_pages: u64,
    /// Compressed batches received.
    pub batches: u64,
    /// Pages whose content came by RMA write, checked against their frame's CRC.
    pub rma_pages: u64,
    /// Of those, pages whose content did not match (sent again).
    pub rma_mismatched: u64,
}

impl RxCounters {
    /// Pages received, however they came.
    pub fn pages(&self) -> u64 {
        self.raw_pages + self.zero_pages + self.delta_pages + self.ref_pages + self.rma_pages
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Crc {
        page: u64,
        left: u32,
    },
    Body {
        page: u64,
        left: u32,
        expected: u32,
        offset: usize,
        crc: u32,
    },
    /// Collecting the whole payload of a frame handled at once.
    Payload {
        header: FrameHeader,
    },
    Ended,
}

/// The destination side of one data stream.
pub struct FrameParser {
    memory: Arc<GuestMemory>,
    limits: FrameLimits,
    stream: u16,
    streams: u16,
    /// Streams that carry pages now (all of them unless a stream map said otherwise).
    active_streams: u16,
    state: State,
    header: [u8; FRAME_HEADER_LEN],
    header_fill: usize,
    crc: [u8; PAGE_CRC_LEN],
    crc_fill: usize,
    /// The payload of a frame handled whole (delta, reference, batch, dictionary).
    payload: Vec<u8>,
    /// A decompressed batch.
    inner: Vec<u8>,
    /// One page, for deltas and references.
    scratch: Box<[u8; PAGE_SIZE]>,
    decompressor: Option<Decompressor>,
    /// Pages known to hold zeros and not written since (memory created zeroed, or a
    /// file's holes): a zero marker for them needs no write. `None` when the memory
    /// may hold old content.
    untouched: Option<DirtyBitmap>,
    /// Whole raw pages bound for a file's holes, gathered from the bytes being fed
    /// and written together with one `pwritev` (see `gathers`): the first page,
    /// and the address of each page's bytes (kept as integers, so the parser stays
    /// `Send`). Written before `feed` returns, before any event and before any other
    /// write: the addresses are never used after the call.
    gathered: (u64, Vec<usize>),
    /// Whether a zero marker for an untouched page faults the page in (this process's
    /// own fresh memory, which its guest uses next) or leaves it alone (a file's hole,
    /// which stays a hole: reading it gives zeros, and it takes no memory).
    populate_untouched: bool,
    /// The frame kinds the session negotiated ([`crate::wire::caps`]).
    capabilities: u64,
    round_pages: u32,
    next_round: u64,
    counters: RxCounters,
    /// The destination's CRC table: every page placed is recorded with its CRC.
    table: Option<Arc<CrcTable>>,
    /// Which stream carries each page, given the streams lost so far.
    routes: Routes,
    /// The session's fence, whose lost set this parser follows, and the generation of
    /// it the routes were built from.
    fence: Option<Arc<StreamFence>>,
    fence_seen: u64,
}

impl FrameParser {
    /// A parser for stream `stream` of `streams`, writing into `memory`. Set
    /// `memory_is_fresh` when the memory is known to be all zeros.
    pub fn new(memory: Arc<GuestMemory>, stream: u16, streams: u16, memory_is_fresh: bool) -> Self {
        let pages = memory.pages();
        FrameParser {
            limits: FrameLimits {
                pages,
                page_size: PAGE_SIZE as u32,
            },
            memory,
            stream,
            streams,
            active_streams: streams,
            state: State::Header,
            header: [0; FRAME_HEADER_LEN],
            header_fill: 0,
            crc: [0; PAGE_CRC_LEN],
            crc_fill: 0,
            payload: Vec::new(),
            inner: Vec::new(),
            scratch: Box::new([0; PAGE_SIZE]),
            decompressor: None,
            untouched: memory_is_fresh.then(|| DirtyBitmap::full(pages)),
            populate_untouched: true,
            gathered: (0, Vec::new()),
            capabilities: crate::wire::caps::ALL,
            round_pages: 0,
            next_round: 0,
            counters: RxCounters::default(),
            table: None,
            routes: Routes::new(streams, StreamSet::default()),
            fence: None,
            fence_seen: 0,
        }
    }

    /// Expect round `round`'s end marker first (a stream that joins between rounds).
    pub fn with_first_round(mut self, round: u64) -> Self {
        self.next_round = round;
        self
    }

    /// Follow the lost streams of `fence`: pages of a lost stream may then arrive here.
    pub fn with_fence(mut self, fence: Arc<StreamFence>) -> Self {
        self.fence = Some(fence);
        self.sync_routes();
        self
    }

    /// Take in streams lost since the last look. The destination adds a stream to the
    /// lost set before it tells the source the stream is fenced, and the source moves
    /// pages only after hearing so: bytes that carry a moved page always find the new
    /// routes here.
    fn sync_routes(&mut self) {
        let Some(fence) = &self.fence else {
            return;
        };
        let generation = fence.generation();
        if generation == self.fence_seen {
            return;
        }
        self.fence_seen = generation;
        self.routes = Routes::new(self.active_streams, fence.lost());
        // Pages another stream wrote may arrive here now.
        self.untouched = None;
    }

    /// The memory is a file whose `holes` (pages) read as zeros: a zero marker for one
    /// leaves it a hole, as the destination QEMU's own migration does. Replaces what
    /// `memory_is_fresh` said.
    pub fn with_holes(mut self, holes: &DirtyBitmap) -> Self {
        self.untouched = Some(holes.clone());
        self.populate_untouched = false;
        self
    }

    /// Record every page placed, with its CRC, in `table` (the destination's table).
    pub fn with_table(mut self, table: Arc<CrcTable>) -> Self {
        self.table = Some(table);
        self
    }

    /// Page `page` now holds content of CRC `crc` (checked).
    #[inline]
    fn placed(&self, page: u64, crc: u32) {
        if let Some(table) = &self.table {
            table.record(page, crc, self.stream);
        }
    }

    /// Accept only the codec frames of `capabilities` (what the session negotiated).
    pub fn with_capabilities(mut self, capabilities: u64) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Refuse a frame kind the session did not negotiate.
    fn check_negotiated(&self, kind: FrameKind) -> Result<(), WireError> {
        use crate::wire::caps;
        let needed = match kind {
            FrameKind::DeltaPage => caps::DELTA,
            FrameKind::PageRef => caps::DEDUP,
            FrameKind::Compressed | FrameKind::Dictionary => caps::ZSTD,
            FrameKind::StreamMap => caps::STREAM_MAP,
            FrameKind::DeviceState => caps::DEVICE_STATE,
            FrameKind::RmaPages => caps::RMA,
            _ => return Ok(()),
        };
        if self.capabilities & needed == 0 {
            return Err(WireError::BadEncoding {
                what: "frame",
                page: 0,
                reason: format!("{kind:?} frames were not negotiated for this session"),
            });
        }
        Ok(())
    }

    /// Counters so far.
    pub fn counters(&self) -> RxCounters {
        self.counters
    }

    /// Rounds whose end marker arrived.
    pub fn rounds_ended(&self) -> u64 {
        self.next_round
    }

    /// Whether the stream has ended.
    pub fn is_ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    fn check_owner(&self, first: u64, count: u32) -> Result<(), WireError> {
        let end = first + u64::from(count);
        let owner = self.routes.route(first).unwrap_or(u16::MAX);
        if owner != self.stream || (end - 1) / CHUNK_PAGES != first / CHUNK_PAGES {
            return Err(WireError::WrongStream {
                first,
                end,
                stream: self.stream,
                owner,
            });
        }
        Ok(())
    }

    /// A page now holds content sent for it (not the zeros it started with).
    fn written(&mut self, page: u64) {
        if let Some(u) = &mut self.untouched
            && u.get(page)
        {
            u.clear_page(page);
        }
    }

    /// Whether raw page `page`, arriving whole, goes into a file's hole: gathered
    /// for one `pwritev` with the pages around it. Writing a tmpfs hole through the
    /// mapping faults it in and zeroes it first: 256 MiB took 172-234 ms here that
    /// way, 108-122 ms as 64 KiB `pwrite`s.
    fn gathers(&self, page: u64) -> bool {
        !self.populate_untouched && self.untouched.as_ref().is_some_and(|u| u.get(page))
    }

    /// Add `body` (page `page`, checked) to the gathered run, writing the run first if
    /// the page does not continue it.
    fn gather(&mut self, page: u64, body: &[u8]) {
        const MOST: usize = 256;
        let (first, pages) = &self.gathered;
        if !pages.is_empty() && (*first + pages.len() as u64 != page || pages.len() >= MOST) {
            self.write_gathered();
        }
        if self.gathered.1.is_empty() {
            self.gathered.0 = page;
        }
        self.gathered.1.push(body.as_ptr() as usize);
    }

    /// Write the gathered pages.
    fn write_gathered(&mut self) {
        let (first, addresses) = &mut self.gathered;
        if addresses.is_empty() {
            return;
        }
        let pages: Vec<std::io::IoSlice<'_>> = addresses
            .iter()
            .map(|&a| {
                // SAFETY: each address is the start of a page's bytes within the slice
                // `feed` was given; `feed` writes the gathered pages before it returns,
                // so the slice is still borrowed and unchanged.
                let page = unsafe { std::slice::from_raw_parts(a as *const u8, PAGE_SIZE) };
                std::io::IoSlice::new(page)
            })
            .collect();
        self.memory.write_pages(*first, &pages);
        addresses.clear();
    }

    /// Consume the next bytes of the stream. Events are reported through `on_event` as
    /// their frames complete.
    pub fn feed(
        &mut self,
        data: &[u8],
        on_event: &mut impl FnMut(StreamEvent),
    ) -> Result<(), WireError> {
        let result = self.feed_pieces(data, on_event);
        // On an error too: the gathered addresses point into `data`.
        self.write_gathered();
        result
    }

    fn feed_pieces(
        &mut self,
        mut data: &[u8],
        on_event: &mut impl FnMut(StreamEvent),
    ) -> Result<(), WireError> {
        self.counters.bytes += data.len() as u64;
        self.sync_routes();
        while !data.is_empty() {
            match self.state {
                State::Ended => {
                    return Err(WireError::OutOfOrder {
                        stream: self.stream,
                        what: "bytes after the end of the stream",
                    });
                }
                State::Header => {
                    let take = (FRAME_HEADER_LEN - self.header_fill).min(data.len());
                    self.header[self.header_fill..self.header_fill + take]
                        .copy_from_slice(&data[..take]);
                    self.header_fill += take;
                    data = &data[take..];
                    if self.header_fill == FRAME_HEADER_LEN {
                        self.header_fill = 0;
                        let header = FrameHeader::decode(&self.header, &self.limits)?;
                        self.start_frame(header, on_event)?;
                    }
                }
                State::Crc { page, left } => {
                    let take = (PAGE_CRC_LEN - self.crc_fill).min(data.len());
                    self.crc[self.crc_fill..self.crc_fill + take].copy_from_slice(&data[..take]);
                    self.crc_fill += take;
                    data = &data[take..];
                    if self.crc_fill == PAGE_CRC_LEN {
                        self.crc_fill = 0;
                        self.state = State::Body {
                            page,
                            left,
                            expected: u32::from_le_bytes(self.crc),
                            offset: 0,
                            crc: 0,
                        };
                    }
                }
                State::Body {
                    page,
                    left,
                    expected,
                    offset,
                    crc,
                } => {
                    let (crc, offset) =
                        if offset == 0 && data.len() >= PAGE_SIZE && self.gathers(page) {
                            let body = &data[..PAGE_SIZE];
                            let crc = dwcp_simd::crc32c(body);
                            if crc == expected {
                                self.gather(page, body);
                            }
                            data = &data[PAGE_SIZE..];
                            (crc, PAGE_SIZE)
                        } else {
                            self.write_gathered();
                            let take = (PAGE_SIZE - offset).min(data.len());
                            let chunk = &data[..take];
                            self.memory.write_at(page, offset, chunk);
                            data = &data[take..];
                            (dwcp_simd::crc32c_update(crc, chunk), offset + take)
                        };
                    if offset < PAGE_SIZE {
                        self.state = State::Body {
                            page,
                            left,
                            expected,
                            offset,
                            crc,
                        };
                        continue;
                    }
                    if crc != expected {
                        return Err(WireError::PageChecksum {
                            page,
                            expected,
                            found: crc,
                        });
                    }
                    self.written(page);
                    self.placed(page, crc);
                    self.counters.raw_pages += 1;
                    self.round_pages += 1;
                    self.state = if left > 1 {
                        State::Crc {
                            page: page + 1,
                            left: left - 1,
                        }
                    } else {
                        State::Header
                    };
                }
                State::Payload { header } => {
                    let want = header.payload_len as usize - self.payload.len();
                    let take = want.min(data.len());
                    self.payload.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.payload.len() == header.payload_len as usize {
                        // What the frame writes or reports comes after the pages
                        // before it.
                        self.write_gathered();
                        self.state = State::Header;
                        let payload = std::mem::take(&mut self.payload);
                        let result = match header.kind {
                            FrameKind::DeviceState => {
                                // Not for this side's memory: up to the session.
                                on_event(StreamEvent::DeviceState {
                                    offset: header.page,
                                    bytes: payload.clone(),
                                });
                                Ok(())
                            }
                            FrameKind::RmaPages => {
                                let wrong = self.rma_pages(header, &payload);
                                if !wrong.is_empty() {
                                    on_event(StreamEvent::Resend { pages: wrong });
                                }
                                Ok(())
                            }
                            _ => self.whole_frame(header, &payload),
                        };
                        self.payload = payload;
                        self.payload.clear();
                        result?;
                    }
                }
            }
        }
        Ok(())
    }

    fn start_frame(
        &mut self,
        header: FrameHeader,
        on_event: &mut impl FnMut(StreamEvent),
    ) -> Result<(), WireError> {
        // What the frame writes or reports comes after the pages before it; a raw
        // run continuing the gathered one keeps gathering.
        if header.kind != FrameKind::RawPages {
            self.write_gathered();
        }
        match header.kind {
            FrameKind::ZeroRun => {
                self.check_owner(header.page, header.count)?;
                self.zero_run(header.page, header.count);
            }
            FrameKind::RawPages => {
                self.check_owner(header.page, header.count)?;
                self.state = State::Crc {
                    page: header.page,
                    left: header.count,
                };
            }
            FrameKind::DeltaPage
            | FrameKind::PageRef
            | FrameKind::Compressed
            | FrameKind::Dictionary
            | FrameKind::DeviceState
            | FrameKind::RmaPages => {
                self.check_negotiated(header.kind)?;
                match header.kind {
                    FrameKind::DeltaPage | FrameKind::PageRef => {
                        self.check_owner(header.page, 1)?
                    }
                    FrameKind::RmaPages => self.check_owner(header.page, header.count)?,
                    _ => {}
                }
                self.payload.reserve(header.payload_len as usize);
                self.state = State::Payload { header };
            }
            FrameKind::StreamMap => {
                self.check_negotiated(header.kind)?;
                let active = header.page;
                if self.round_pages != 0 {
                    return Err(WireError::OutOfOrder {
                        stream: self.stream,
                        what: "stream map inside a round",
                    });
                }
                if active > u64::from(self.streams) {
                    return Err(WireError::BadHandshake {
                        field: "stream map",
                        reason: format!("{active} streams, but the session has {}", self.streams),
                    });
                }
                self.active_streams = active as u16;
                self.routes = Routes::new(self.active_streams, self.routes.lost());
                // Pages now arrive on streams that did not carry them before; this
                // stream no longer knows which pages it never wrote.
                self.untouched = None;
            }
            FrameKind::RoundEnd => {
                let round = header.page;
                if round != self.next_round {
                    return Err(WireError::OutOfOrder {
                        stream: self.stream,
                        what: "round markers not in sequence",
                    });
                }
                if header.count != self.round_pages {
                    return Err(WireError::RoundMismatch {
                        round,
                        stream: self.stream,
                        marked: header.count,
                        received: self.round_pages,
                    });
                }
                self.next_round += 1;
                self.round_pages = 0;
                on_event(StreamEvent::RoundEnd {
                    round,
                    pages: header.count,
                });
            }
            FrameKind::StreamEnd => {
                if self.round_pages != 0 {
                    return Err(WireError::OutOfOrder {
                        stream: self.stream,
                        what: "stream ended inside a round",
                    });
                }
                self.state = State::Ended;
                on_event(StreamEvent::StreamEnd);
            }
        }
        Ok(())
    }

    fn zero_run(&mut self, first: u64, count: u32) {
        // Runs of fresh pages, faulted in a call each.
        let mut fresh_from: Option<u64> = None;
        for page in first..first + u64::from(count) {
            let fresh = self.untouched.as_ref().is_some_and(|u| u.get(page));
            if fresh {
                if self.populate_untouched {
                    fresh_from.get_or_insert(page);
                }
            } else {
                if let Some(from) = fresh_from.take() {
                    self.memory.populate_pages(from, page - from);
                }
                self.memory.zero_page(page);
            }
            self.placed(page, zero_page_crc());
        }
        // Fresh memory holds zeros already, but its pages are faulted in now, with the
        // run: a guest that writes one later would otherwise make its first write at
        // the destination fault, perhaps in the paused window. (Fresh memory is not
        // populated ahead of the stream: that raced the receivers for the mmap lock and
        // huge pages, and held a 1 GiB session's setup for 2-3 s.)
        if let Some(from) = fresh_from {
            self.memory
                .populate_pages(from, first + u64::from(count) - from);
        }
        self.counters.zero_pages += u64::from(count);
        self.round_pages += count;
    }

    /// Pages `header.page..` landed by RMA before their frame was sent: check each
    /// against its CRC in `payload`, record what landed, and return the pages that
    /// differ (the source sends them again; their table entries, holding the CRC of
    /// what landed, keep the two tables apart until it has). The source writes a page
    /// again only after the destination acknowledged the round that carried it, so
    /// nothing writes these pages while they are checked.
    fn rma_pages(&mut self, header: FrameHeader, payload: &[u8]) -> Vec<u64> {
        let kernels = dwcp_simd::Kernels::active();
        let mut wrong = Vec::new();
        for (i, expected) in payload.chunks_exact(PAGE_CRC_LEN).enumerate() {
            let page = header.page + i as u64;
            let expected = u32::from_le_bytes([expected[0], expected[1], expected[2], expected[3]]);
            self.memory.read_page(page, &mut self.scratch[..]);
            let found = kernels.crc32c(&self.scratch[..]);
            self.written(page);
            self.placed(page, found);
            if found != expected {
                wrong.push(page);
            }
        }
        self.counters.rma_pages += u64::from(header.count);
        self.counters.rma_mismatched += wrong.len() as u64;
        self.round_pages += header.count;
        wrong
    }

    /// Check a page assembled in `scratch` against `expected` and store it.
    fn store_scratch(&mut self, page: u64, expected: u32) -> Result<(), WireError> {
        let found = dwcp_simd::crc32c(&self.scratch[..]);
        if found != expected {
            return Err(WireError::PageChecksum {
                page,
                expected,
                found,
            });
        }
        self.memory.write_page(page, &self.scratch[..]);
        self.written(page);
        self.placed(page, found);
        self.round_pages += 1;
        Ok(())
    }

    fn delta(&mut self, page: u64, payload: &[u8]) -> Result<(), WireError> {
        let (crc, delta) = payload.split_at(PAGE_CRC_LEN);
        let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        // Decode on a copy: a malformed delta then leaves the page as it was.
        self.memory.read_page(page, &mut self.scratch[..]);
        dwcp_simd::xbzrle_decode(delta, &mut self.scratch[..]).map_err(|e| {
            WireError::BadEncoding {
                what: "XBZRLE delta",
                page,
                reason: e.to_string(),
            }
        })?;
        self.store_scratch(page, expected)?;
        self.counters.delta_pages += 1;
        Ok(())
    }

    fn reference(&mut self, page: u64, payload: &[u8]) -> Result<(), WireError> {
        let mut source = [0u8; 8];
        source.copy_from_slice(&payload[..8]);
        let source = u64::from_le_bytes(source);
        let expected = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
        if source >= self.limits.pages {
            return Err(WireError::BadEncoding {
                what: "page reference",
                page,
                reason: format!("source page {source} is outside guest memory"),
            });
        }
        // Only pages this stream carries are in a known state, in stream order.
        if self.routes.route(source) != Some(self.stream) {
            return Err(WireError::BadEncoding {
                what: "page reference",
                page,
                reason: format!("source page {source} belongs to another stream"),
            });
        }
        self.memory.read_page(source, &mut self.scratch[..]);
        self.store_scratch(page, expected)?;
        self.counters.ref_pages += 1;
        Ok(())
    }

    fn whole_frame(&mut self, header: FrameHeader, payload: &[u8]) -> Result<(), WireError> {
        match header.kind {
            FrameKind::DeltaPage => self.delta(header.page, payload),
            FrameKind::PageRef => self.reference(header.page, payload),
            FrameKind::Dictionary => self
                .decompressor
                .get_or_insert_with(Decompressor::new)
                .add_dictionary(header.page as u32, payload)
                .map_err(|e| WireError::BadEncoding {
                    what: "dictionary",
                    page: 0,
                    reason: e.to_string(),
                }),
            FrameKind::Compressed => {
                let bad = |reason: String| WireError::BadEncoding {
                    what: "compressed batch",
                    page: 0,
                    reason,
                };
                let expanded =
                    u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
                let dict = u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]]);
                if expanded == 0 || expanded > MAX_BATCH {
                    return Err(bad(format!(
                        "expands to {expanded} bytes (allowed 1..={MAX_BATCH})"
                    )));
                }
                // The buffer only grows (zero-filled once), so a batch is not
                // zero-filled before every decompression.
                let mut inner = std::mem::take(&mut self.inner);
                if inner.len() < expanded {
                    inner.resize(expanded, 0);
                }
                let result = self
                    .decompressor
                    .get_or_insert_with(Decompressor::new)
                    .decompress(dict, &payload[8..], &mut inner[..expanded])
                    .map_err(|e| bad(e.to_string()))
                    .and_then(|n| {
                        if n == expanded {
                            Ok(())
                        } else {
                            Err(bad(format!("expanded to {n} bytes, announced {expanded}")))
                        }
                    })
                    .and_then(|()| self.inner_frames(&inner[..expanded]));
                self.inner = inner;
                self.counters.batches += 1;
                result
            }
            _ => unreachable!("only whole-payload kinds are collected"),
        }
    }

    /// The frames of a decompressed batch: complete frames, of the page-carrying kinds
    /// only.
    fn inner_frames(&mut self, mut data: &[u8]) -> Result<(), WireError> {
        let bad = |reason: String| WireError::BadEncoding {
            what: "compressed batch",
            page: 0,
            reason,
        };
        while !data.is_empty() {
            let Some(bytes) = data.get(..FRAME_HEADER_LEN) else {
                return Err(bad("ends inside a frame header".into()));
            };
            let mut raw = [0u8; FRAME_HEADER_LEN];
            raw.copy_from_slice(bytes);
            let header = FrameHeader::decode(&raw, &self.limits)?;
            let Some(payload) =
                data.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + header.payload_len as usize)
            else {
                return Err(bad("ends inside a frame".into()));
            };
            data = &data[FRAME_HEADER_LEN + header.payload_len as usize..];
            self.check_negotiated(header.kind)?;
            match header.kind {
                FrameKind::ZeroRun => {
                    self.check_owner(header.page, header.count)?;
                    self.zero_run(header.page, header.count);
                }
                FrameKind::RawPages => {
                    self.check_owner(header.page, header.count)?;
                    for (i, page) in payload.chunks_exact(PAGE_CRC_LEN + PAGE_SIZE).enumerate() {
                        let expected = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
                        self.scratch.copy_from_slice(&page[PAGE_CRC_LEN..]);
                        self.store_scratch(header.page + i as u64, expected)?;
                        self.counters.raw_pages += 1;
                    }
                }
                FrameKind::DeltaPage => {
                    self.check_owner(header.page, 1)?;
                    self.delta(header.page, payload)?;
                }
                FrameKind::PageRef => {
                    self.check_owner(header.page, 1)?;
                    self.reference(header.page, payload)?;
                }
                other => return Err(bad(format!("{other:?} frame inside a batch"))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_hugepages::PagePreference;

    fn memory(pages: usize) -> Arc<GuestMemory> {
        Arc::new(GuestMemory::anonymous(pages * PAGE_SIZE, PagePreference::Small).unwrap())
    }

    /// Source memory with a mix of zero and non-zero pages.
    fn source(pages: usize) -> Arc<GuestMemory> {
        let m = memory(pages);
        for p in 0..pages as u64 {
            if p % 3 != 0 {
                let fill: Vec<u8> = (0..PAGE_SIZE)
                    .map(|i| (i as u64 * 31 + p) as u8 | 1)
                    .collect();
                m.write_page(p, &fill);
            }
        }
        m
    }

    /// An `RmaPages` frame for `first..first + crcs.len()`.
    fn rma_frame(first: u64, crcs: &[u32]) -> Vec<u8> {
        let mut out = vec![0u8; FRAME_HEADER_LEN];
        stage_marker(FrameHeader::rma_pages(first, crcs.len() as u32), &mut out);
        for crc in crcs {
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    #[test]
    fn pages_written_by_rma_are_checked_recorded_and_the_wrong_ones_asked_for() {
        let src = source(16);
        let dst = memory(16);
        // What the RMA writes put there: every page right, but page 5.
        for p in 0..16u64 {
            let mut page = vec![0u8; PAGE_SIZE];
            src.read_page(p, &mut page);
            if p == 5 {
                page[100] ^= 0xff;
            }
            dst.write_page(p, &page);
        }
        let crcs: Vec<u32> = (4..8u64)
            .map(|p| {
                let mut page = vec![0u8; PAGE_SIZE];
                src.read_page(p, &mut page);
                dwcp_simd::crc32c(&page)
            })
            .collect();
        let table = Arc::new(CrcTable::new(16));
        let mut parser = FrameParser::new(dst.clone(), 0, 1, false)
            .with_capabilities(crate::wire::caps::ALL | crate::wire::caps::RMA)
            .with_table(table.clone());
        let mut events = Vec::new();
        let mut wire = rma_frame(4, &crcs);
        let mut marker = [0u8; FRAME_HEADER_LEN];
        stage_marker(FrameHeader::round_end(0, 4), &mut marker);
        wire.extend_from_slice(&marker);
        for part in wire.chunks(5) {
            parser.feed(part, &mut |e| events.push(e)).unwrap();
        }
        assert_eq!(
            events,
            [
                StreamEvent::Resend { pages: vec![5] },
                StreamEvent::RoundEnd { round: 0, pages: 4 }
            ]
        );
        assert_eq!(parser.counters().rma_pages, 4);
        assert_eq!(parser.counters().rma_mismatched, 1);
        assert_eq!(table.get(4), crcs[0], "a right page is recorded");
        let mut landed = vec![0u8; PAGE_SIZE];
        dst.read_page(5, &mut landed);
        assert_eq!(
            table.get(5),
            dwcp_simd::crc32c(&landed),
            "a wrong page is recorded as what landed, so the tables differ until it is sent again"
        );
        assert_ne!(table.get(5), crcs[1]);

        // Not negotiated, or on another stream's pages: refused.
        let mut plain = FrameParser::new(dst.clone(), 0, 1, false);
        assert!(matches!(
            plain.feed(&rma_frame(4, &crcs), &mut |_| {}),
            Err(WireError::BadEncoding { .. })
        ));
        let mut other = FrameParser::new(dst, 1, 2, false)
            .with_capabilities(crate::wire::caps::ALL | crate::wire::caps::RMA);
        assert!(matches!(
            other.feed(&rma_frame(4, &crcs), &mut |_| {}),
            Err(WireError::WrongStream { .. })
        ));
    }

    #[test]
    fn staged_runs_parse_back_in_any_piece_sizes() {
        let src = source(64);
        let mut wire = Vec::new();
        let mut buf = vec![0u8; stage_space(16)];
        for chunk in 0..4u64 {
            let staged = stage_run(&src, chunk * 16, 16, &mut buf, None);
            assert_eq!(staged.zero_pages + staged.raw_pages, 16);
            wire.extend_from_slice(&buf[..staged.bytes]);
        }
        let mut marker = [0u8; FRAME_HEADER_LEN];
        stage_marker(FrameHeader::round_end(0, 64), &mut marker);
        wire.extend_from_slice(&marker);
        stage_marker(FrameHeader::stream_end(), &mut marker);
        wire.extend_from_slice(&marker);
        for piece in [1usize, 7, 4096, 100_000] {
            let dst = memory(64);
            let mut parser = FrameParser::new(dst.clone(), 0, 1, true);
            let mut events = Vec::new();
            for part in wire.chunks(piece) {
                parser.feed(part, &mut |e| events.push(e)).unwrap();
            }
            assert_eq!(
                events,
                [
                    StreamEvent::RoundEnd {
                        round: 0,
                        pages: 64
                    },
                    StreamEvent::StreamEnd
                ]
            );
            assert_eq!(dst.to_vec(), src.to_vec(), "piece size {piece}");
            assert!(parser.is_ended());
        }
    }

    /// An incoming VM's RAM file, old content in its first 8 pages, holes after.
    fn incoming_file(name: &str) -> Option<(Arc<GuestMemory>, DirtyBitmap)> {
        let path = std::path::Path::new("/dev/shm")
            .join(format!("dwcp-frames-{name}-{}", std::process::id()));
        let dst = match GuestMemory::file(&path, 64 * PAGE_SIZE) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                eprintln!("skipped: no tmpfs file at {}: {e}", path.display());
                return None;
            }
        };
        let _ = std::fs::remove_file(&path); // the mapping keeps it
        for p in 0..8 {
            dst.write_page(p, &[0xAA; PAGE_SIZE]);
        }
        let holes = dst.hole_pages().expect("a file");
        if holes.count() == 0 {
            eprintln!("skipped: this file system does not report holes");
            return None;
        }
        assert!((0..64).all(|p| holes.get(p) == (p >= 8)));
        Some((dst, holes))
    }

    /// `src` staged in runs of 16 pages.
    fn staged_wire(src: &GuestMemory) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut buf = vec![0u8; stage_space(16)];
        for chunk in 0..4u64 {
            let staged = stage_run(src, chunk * 16, 16, &mut buf, None);
            wire.extend_from_slice(&buf[..staged.bytes]);
        }
        let mut marker = [0u8; FRAME_HEADER_LEN];
        stage_marker(FrameHeader::round_end(0, 64), &mut marker);
        wire.extend_from_slice(&marker);
        wire
    }

    #[test]
    fn pages_sent_into_a_files_holes_land_and_zero_pages_leave_them_holes() {
        let src = source(64); // every third page zero
        let wire = staged_wire(&src);
        // Whole pages into holes go by pwritev, gathered; pieces of pages through the
        // mapping: any piece size lands the same bytes.
        for piece in [1usize, 7, 4100, 20_000, wire.len()] {
            let Some((dst, holes)) = incoming_file(&format!("holes-{piece}")) else {
                return;
            };
            let mut parser = FrameParser::new(dst.clone(), 0, 1, false).with_holes(&holes);
            let mut events = Vec::new();
            for part in wire.chunks(piece) {
                parser.feed(part, &mut |e| events.push(e)).unwrap();
            }
            assert_eq!(
                events,
                [StreamEvent::RoundEnd {
                    round: 0,
                    pages: 64
                }]
            );
            // Asked before reading the memory back: a read through the mapping fills a
            // hole.
            let after = dst.hole_pages().expect("a file");
            for p in 0..64 {
                let stays_hole = p >= 8 && p % 3 == 0;
                assert_eq!(after.get(p), stays_hole, "page {p}, pieces of {piece}");
            }
            assert_eq!(dst.to_vec(), src.to_vec(), "pieces of {piece}");
        }
    }

    #[test]
    fn a_corrupt_page_bound_for_a_hole_is_refused() {
        let src = source(64);
        let mut wire = staged_wire(&src);
        let Some((dst, holes)) = incoming_file("corrupt") else {
            return;
        };
        // Page 10's last byte (a raw page of the first run, a hole at the destination).
        let mut buf = vec![0u8; stage_space(16)];
        let staged = stage_run(&src, 0, 11, &mut buf, None);
        wire[staged.bytes - 1] ^= 0xFF;
        let mut parser = FrameParser::new(dst, 0, 1, false).with_holes(&holes);
        assert!(matches!(
            parser.feed(&wire, &mut |_| {}),
            Err(WireError::PageChecksum { page: 10, .. })
        ));
    }

    #[test]
    fn corrupt_pages_and_misrouted_frames_are_refused() {
        let src = source(32);
        let mut buf = vec![0u8; stage_space(16)];
        let staged = stage_run(&src, 16, 16, &mut buf, None);
        // Stream 1 of 2 owns chunk 1; stream 0 must refuse it.
        let dst = memory(32);
        let mut wrong = FrameParser::new(dst.clone(), 0, 2, true);
        assert!(matches!(
            wrong.feed(&buf[..staged.bytes], &mut |_| {}),
            Err(WireError::WrongStream {
                stream: 0,
                owner: 1,
                ..
            })
        ));
        // Flip one payload byte of a raw page: the CRC check names the page.
        let mut right = FrameParser::new(dst, 1, 2, true);
        let last = staged.bytes - 1;
        buf[last] ^= 0xFF;
        assert!(matches!(
            right.feed(&buf[..staged.bytes], &mut |_| {}),
            Err(WireError::PageChecksum { page: 31, .. })
        ));
    }

    #[test]
    fn round_markers_are_checked() {
        let dst = memory(16);
        let mut parser = FrameParser::new(dst, 0, 1, true);
        let mut marker = [0u8; FRAME_HEADER_LEN];
        stage_marker(FrameHeader::round_end(0, 5), &mut marker);
        assert!(matches!(
            parser.feed(&marker, &mut |_| {}),
            Err(WireError::RoundMismatch {
                marked: 5,
                received: 0,
                ..
            })
        ));
        let mut parser = FrameParser::new(memory(16), 0, 1, true);
        stage_marker(FrameHeader::round_end(1, 0), &mut marker);
        assert!(matches!(
            parser.feed(&marker, &mut |_| {}),
            Err(WireError::OutOfOrder { .. })
        ));
    }
}
