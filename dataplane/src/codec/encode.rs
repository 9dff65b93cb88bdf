//! Turning runs of pages into codec frames, per stream.
//!
//! For each page: zero → dedup → delta → raw, then whole batches of frames → zstd.
//! - zero: a `ZeroRun` marker;
//! - dedup: a `PageRef` to a page this stream already sent with the same bytes
//!   (matched by CRC32C in the [`PageCache`], confirmed byte for byte);
//! - delta: a `DeltaPage`, XBZRLE against the copy of the page last sent, when it is
//!   at most `delta_limit` bytes (else counted as an overflow and sent raw);
//! - raw: the page itself in a `RawPages` frame.
//!
//! Frames collect in the stream's batch; a full batch (or a round end) is compressed
//! into one `Compressed` frame with the worker's context (and the session dictionary,
//! announced once per stream before first use), or sent as is when compression is off
//! or would not shrink it. Every page carries the CRC32C of its original content.

use super::cache::PageCache;
use super::zstd::{Compressor, Dictionary, compress_bound};
use crate::crc_table::Recorder;
use crate::memory::{GuestMemory, PAGE_SIZE, zero_page_crc};
use crate::wire::{FRAME_HEADER_LEN, FrameHeader, MAX_BATCH, PAGE_CRC_LEN};
use std::sync::Arc;
use std::time::Instant;

/// What the codec pipeline does; decided by the codec policy, applied per worker.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CodecSettings {
    /// Send duplicates of pages already sent as references.
    pub dedup: bool,
    /// Send re-dirtied pages as XBZRLE deltas.
    pub delta: bool,
    /// zstd level for batches (negative levels are the fast ones); `None` sends
    /// batches uncompressed.
    pub level: Option<i32>,
    /// Compress with the session's trained dictionary once there is one.
    pub dictionary: bool,
    /// Bytes of frames per batch (64 KiB to 1 MiB).
    pub batch_bytes: usize,
    /// Largest delta worth sending instead of the page, bytes.
    pub delta_limit: usize,
}

impl CodecSettings {
    /// Everything off: pages go out as staged (zero pages are still markers).
    pub const OFF: CodecSettings = CodecSettings {
        dedup: false,
        delta: false,
        level: None,
        dictionary: false,
        batch_bytes: 256 << 10,
        delta_limit: PAGE_SIZE / 2,
    };

    /// Everything on at `level`.
    pub fn full(level: i32) -> CodecSettings {
        CodecSettings {
            dedup: true,
            delta: true,
            level: Some(level),
            dictionary: true,
            ..CodecSettings::OFF
        }
    }

    /// Whether any codec runs (else the staging fast path is used).
    pub fn is_off(&self) -> bool {
        !self.dedup && !self.delta && self.level.is_none()
    }

    /// Whether pages must be kept in the cache.
    pub fn uses_cache(&self) -> bool {
        self.dedup || self.delta
    }

    /// Bring out-of-range fields into range.
    pub fn clamped(mut self) -> Self {
        self.batch_bytes = self.batch_bytes.clamp(64 << 10, MAX_BATCH);
        self.delta_limit = self.delta_limit.min(PAGE_SIZE);
        self
    }
}

impl Default for CodecSettings {
    fn default() -> Self {
        Self::OFF
    }
}

/// Defines [`CodecCounters`]: cumulative `u64` counters (subtracted and added field
/// by field) plus the level of the last batch.
macro_rules! codec_counters {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// What a worker's codecs did; reported periodically as telemetry.
        #[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
        pub struct CodecCounters {
            $($(#[$doc])* pub $field: u64,)*
            /// Level of the last compressed batch.
            pub level: i32,
        }

        impl CodecCounters {
            /// Counters accumulated since `earlier`.
            pub fn since(&self, earlier: &CodecCounters) -> CodecCounters {
                CodecCounters {
                    $($field: self.$field - earlier.$field,)*
                    level: self.level,
                }
            }

            /// Add `other` to these counters.
            pub fn add(&mut self, other: &CodecCounters) {
                $(self.$field += other.$field;)*
                self.level = other.level;
            }
        }
    };
}

codec_counters! {
    /// Pages sent with their content.
    raw_pages,
    /// Pages sent as zero markers.
    zero_pages,
    /// Pages sent as references to another page.
    dedup_pages,
    /// Pages sent as deltas.
    delta_pages,
    /// Dirty pages that were not in the cache.
    delta_misses,
    /// Deltas larger than the limit, sent raw instead.
    delta_overflows,
    /// CRC matches whose bytes differed.
    dedup_collisions,
    /// Batches compressed.
    batches,
    /// Batches sent uncompressed because compression did not shrink them.
    batches_stored,
    /// Batches compressed with the session dictionary.
    dictionary_batches,
    /// Bytes that entered the compressor.
    compress_in,
    /// Bytes that left it.
    compress_out,
    /// Time spent compressing, nanoseconds.
    compress_nanos,
    /// Bytes of pages with content that entered the pipeline (not zero pages).
    input_bytes,
    /// Bytes of frames the pipeline put out (what goes on the wire).
    output_bytes,
    /// Time spent in the pipeline before compression (zero test, CRC, cache, deltas),
    /// nanoseconds.
    encode_nanos,
}

/// What [`WorkerCodec::encode_run`] did with a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodedRun {
    /// Pages sent as zero markers.
    pub zero_pages: u32,
    /// Pages sent with content (raw, delta or reference).
    pub content_pages: u32,
}

/// One stream's codec state.
pub struct StreamCodec {
    cache: PageCache,
    batch: Vec<u8>,
    dictionary_sent: u32,
}

impl StreamCodec {
    /// A stream keeping up to `cache_bytes` of pages last sent, batching up to
    /// `batch_capacity` bytes (allocated now, so batching never allocates).
    pub fn new(cache_bytes: usize, batch_capacity: usize) -> Self {
        StreamCodec {
            cache: PageCache::new(cache_bytes),
            batch: Vec::with_capacity(batch_capacity),
            dictionary_sent: 0,
        }
    }

    /// A stream as `setup` asks.
    pub fn for_setup(setup: &CodecSetup) -> Self {
        Self::new(setup.cache_bytes_per_stream, setup.max_batch_len())
    }

    /// Bytes of frames waiting in the batch.
    pub fn pending(&self) -> usize {
        self.batch.len()
    }

    /// Pages in the cache.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Forget every page sent (the batch must have been flushed): from now on this
    /// stream neither deltas against nor refers to anything it sent before.
    pub fn forget(&mut self) {
        debug_assert!(self.batch.is_empty(), "forget() with a batch pending");
        self.cache.clear();
    }
}

/// A worker's codec context, shared by its streams.
pub struct WorkerCodec {
    compressor: Compressor,
    page: Box<[u8; PAGE_SIZE]>,
    delta: Vec<u8>,
    settings: CodecSettings,
    dictionary: Option<Arc<Dictionary>>,
    counters: CodecCounters,
}

#[derive(Clone, Copy)]
enum Open {
    None,
    Zero { first: u64, count: u32 },
    Raw { at: usize, first: u64, count: u32 },
}

impl WorkerCodec {
    /// A context with codecs off.
    pub fn new() -> Self {
        WorkerCodec {
            compressor: Compressor::new(),
            page: Box::new([0; PAGE_SIZE]),
            delta: vec![0; PAGE_SIZE],
            settings: CodecSettings::OFF,
            dictionary: None,
            counters: CodecCounters::default(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> CodecSettings {
        self.settings
    }

    /// Counters so far.
    pub fn counters(&self) -> CodecCounters {
        self.counters
    }

    /// Switch settings. Batches must have been flushed. A cache that stops being kept
    /// up to date is emptied, so it never serves a stale base for a delta.
    pub fn set_settings<'a>(
        &mut self,
        settings: CodecSettings,
        streams: impl IntoIterator<Item = &'a mut StreamCodec>,
    ) {
        let settings = settings.clamped();
        for s in streams {
            if self.settings.uses_cache() && !settings.uses_cache() {
                s.cache.clear();
            }
            if settings.uses_cache() {
                s.cache.allocate();
            }
        }
        self.settings = settings;
    }

    /// Use `dictionary` for batches from now on (when the settings ask for one).
    pub fn set_dictionary(&mut self, dictionary: Option<Arc<Dictionary>>) {
        self.dictionary = dictionary;
    }

    /// Whether the batch should be flushed before adding a run of `count` pages.
    pub fn batch_full(&self, stream: &StreamCodec, count: u32) -> bool {
        !stream.batch.is_empty()
            && stream.batch.len() + crate::transport::frames::stage_space(count)
                > self.settings.batch_bytes
    }

    /// Encode pages `first..first + count` into the stream's batch.
    pub fn encode_run(
        &mut self,
        stream: &mut StreamCodec,
        memory: &GuestMemory,
        first: u64,
        count: u32,
        table: Option<Recorder<'_>>,
    ) -> EncodedRun {
        let started = Instant::now();
        let zero_before = self.counters.zero_pages;
        let kernels = dwcp_simd::Kernels::active();
        let mut open = Open::None;
        for page in first..first + u64::from(count) {
            memory.read_page(page, &mut self.page[..]);
            let content = &self.page[..];
            if kernels.is_zero(content) {
                if let Some(t) = table {
                    t.record(page, zero_page_crc());
                }
                stream.cache.remove(page);
                open = match open {
                    Open::Zero { first, count } => Open::Zero {
                        first,
                        count: count + 1,
                    },
                    other => {
                        close(other, &mut stream.batch);
                        Open::Zero {
                            first: page,
                            count: 1,
                        }
                    }
                };
                self.counters.zero_pages += 1;
                continue;
            }
            let crc = kernels.crc32c(content);
            if let Some(t) = table {
                t.record(page, crc);
            }
            if self.settings.dedup {
                let (duplicate, collision) = stream.cache.find_duplicate(page, crc, content);
                self.counters.dedup_collisions += u64::from(collision);
                if let Some(source) = duplicate {
                    close(std::mem::replace(&mut open, Open::None), &mut stream.batch);
                    push_header(&mut stream.batch, FrameHeader::page_ref(page));
                    stream.batch.extend_from_slice(&source.to_le_bytes());
                    stream.batch.extend_from_slice(&crc.to_le_bytes());
                    stream.cache.put(page, content, crc);
                    self.counters.dedup_pages += 1;
                    continue;
                }
            }
            if self.settings.delta {
                if let Some(old) = stream.cache.get(page) {
                    let limit = self.settings.delta_limit;
                    match kernels.xbzrle_encode(old, content, &mut self.delta[..limit]) {
                        Ok(n) => {
                            close(std::mem::replace(&mut open, Open::None), &mut stream.batch);
                            push_header(&mut stream.batch, FrameHeader::delta_page(page, n));
                            stream.batch.extend_from_slice(&crc.to_le_bytes());
                            stream.batch.extend_from_slice(&self.delta[..n]);
                            stream.cache.put(page, content, crc);
                            self.counters.delta_pages += 1;
                            continue;
                        }
                        Err(_) => self.counters.delta_overflows += 1,
                    }
                } else {
                    self.counters.delta_misses += 1;
                }
            }
            open = match open {
                Open::Raw { at, first, count } => Open::Raw {
                    at,
                    first,
                    count: count + 1,
                },
                other => {
                    close(other, &mut stream.batch);
                    let at = stream.batch.len();
                    stream.batch.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
                    Open::Raw {
                        at,
                        first: page,
                        count: 1,
                    }
                }
            };
            stream.batch.extend_from_slice(&crc.to_le_bytes());
            stream.batch.extend_from_slice(content);
            if self.settings.uses_cache() {
                stream.cache.put(page, content, crc);
            }
            self.counters.raw_pages += 1;
        }
        close(open, &mut stream.batch);
        let zero_pages = (self.counters.zero_pages - zero_before) as u32;
        self.counters.input_bytes += u64::from(count - zero_pages) * PAGE_SIZE as u64;
        self.counters.encode_nanos += started.elapsed().as_nanos() as u64;
        EncodedRun {
            zero_pages,
            content_pages: count - zero_pages,
        }
    }

    /// Add pages `first..first + count`, known to read as zeros without looking at
    /// them (a RAM file's holes: see the source engine's `known_zero`), to the stream's
    /// batch as one zero run. The stream's cache forgets them, as it does any zero page.
    pub fn encode_known_zero(&mut self, stream: &mut StreamCodec, first: u64, count: u32) {
        for page in first..first + u64::from(count) {
            stream.cache.remove(page);
        }
        push_header(&mut stream.batch, FrameHeader::zero_run(first, count));
        self.counters.zero_pages += u64::from(count);
    }

    /// The dictionary batches are compressed with now, if any.
    fn active_dictionary(&self) -> Option<&Dictionary> {
        self.dictionary
            .as_deref()
            .filter(|_| self.settings.dictionary && self.settings.level.is_some())
    }

    /// Space [`WorkerCodec::flush`] may need for the stream's batch.
    pub fn flush_bound(&self, stream: &StreamCodec) -> usize {
        let announcement = self
            .active_dictionary()
            .filter(|d| stream.dictionary_sent != d.id())
            .map_or(0, |d| FRAME_HEADER_LEN + d.bytes().len());
        announcement
            + FRAME_HEADER_LEN
            + 8
            + compress_bound(stream.batch.len()).max(stream.batch.len())
    }

    /// Move the stream's batch into `out` (at least [`WorkerCodec::flush_bound`]
    /// bytes): a dictionary frame first if this stream has not announced it, then one
    /// compressed frame, or the frames themselves when compression is off or does not
    /// shrink them. Compression writes straight into `out`. Returns the bytes written.
    pub fn flush(&mut self, stream: &mut StreamCodec, out: &mut [u8]) -> usize {
        if stream.batch.is_empty() {
            return 0;
        }
        let mut written = 0;
        if let Some(level) = self.settings.level {
            let dictionary = self
                .dictionary
                .as_deref()
                .filter(|_| self.settings.dictionary);
            if let Some(d) = dictionary
                && stream.dictionary_sent != d.id()
            {
                let mut header = [0u8; FRAME_HEADER_LEN];
                FrameHeader::dictionary(d.id(), d.bytes().len()).encode(&mut header);
                out[..FRAME_HEADER_LEN].copy_from_slice(&header);
                out[FRAME_HEADER_LEN..FRAME_HEADER_LEN + d.bytes().len()]
                    .copy_from_slice(d.bytes());
                written += FRAME_HEADER_LEN + d.bytes().len();
                stream.dictionary_sent = d.id();
            }
            let frame = &mut out[written..];
            let bound = FRAME_HEADER_LEN + 8 + compress_bound(stream.batch.len());
            let started = Instant::now();
            let packed = self.compressor.compress(
                level,
                dictionary,
                &stream.batch,
                &mut frame[FRAME_HEADER_LEN + 8..bound],
            );
            self.counters.compress_nanos += started.elapsed().as_nanos() as u64;
            self.counters.compress_in += stream.batch.len() as u64;
            self.counters.level = level;
            if let Ok(n) = packed
                && n + 8 < stream.batch.len()
            {
                self.counters.compress_out += n as u64;
                self.counters.batches += 1;
                self.counters.dictionary_batches += u64::from(dictionary.is_some());
                let mut header = [0u8; FRAME_HEADER_LEN];
                FrameHeader::compressed(n).encode(&mut header);
                frame[..FRAME_HEADER_LEN].copy_from_slice(&header);
                frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4]
                    .copy_from_slice(&(stream.batch.len() as u32).to_le_bytes());
                let dict_id = dictionary.map_or(0, |d| d.id());
                frame[FRAME_HEADER_LEN + 4..FRAME_HEADER_LEN + 8]
                    .copy_from_slice(&dict_id.to_le_bytes());
                written += FRAME_HEADER_LEN + 8 + n;
                stream.batch.clear();
                self.counters.output_bytes += written as u64;
                return written;
            }
            // Stored instead: the frames overwrite what the compressor left.
            self.counters.compress_out += stream.batch.len() as u64;
            self.counters.batches_stored += 1;
        }
        let n = stream.batch.len();
        out[written..written + n].copy_from_slice(&stream.batch);
        stream.batch.clear();
        self.counters.output_bytes += (written + n) as u64;
        written + n
    }
}

impl Default for WorkerCodec {
    fn default() -> Self {
        Self::new()
    }
}

fn push_header(batch: &mut Vec<u8>, header: FrameHeader) {
    let mut bytes = [0u8; FRAME_HEADER_LEN];
    header.encode(&mut bytes);
    batch.extend_from_slice(&bytes);
}

fn close(open: Open, batch: &mut Vec<u8>) {
    match open {
        Open::None => {}
        Open::Zero { first, count } => push_header(batch, FrameHeader::zero_run(first, count)),
        Open::Raw { at, first, count } => {
            let mut bytes = [0u8; FRAME_HEADER_LEN];
            FrameHeader::raw_pages(first, count, PAGE_SIZE as u32).encode(&mut bytes);
            batch[at..at + FRAME_HEADER_LEN].copy_from_slice(&bytes);
        }
    }
}

/// Bytes of frames one raw page takes (for estimates).
pub const RAW_PAGE_FRAME: usize = PAGE_CRC_LEN + PAGE_SIZE;

/// What a session's workers need to run codecs; fixed for the session (it sizes
/// buffers and caches), while [`CodecSettings`] may change at any time.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecSetup {
    /// Page cache per stream, bytes.
    pub cache_bytes_per_stream: usize,
    /// Largest batch the settings may ask for, bytes.
    pub max_batch_bytes: usize,
    /// Largest dictionary that may be announced, bytes.
    pub max_dictionary_bytes: usize,
    /// Settings at the start.
    pub initial: CodecSettings,
    /// Wire capabilities the destination accepted ([`crate::wire::caps`]).
    pub capabilities: u64,
}

impl CodecSetup {
    /// `settings` restricted to what the destination accepts and the setup allows.
    pub fn permit(&self, settings: CodecSettings) -> CodecSettings {
        use crate::wire::caps;
        let mut s = settings.clamped();
        s.batch_bytes = s
            .batch_bytes
            .min(self.max_batch_bytes.clamp(64 << 10, MAX_BATCH));
        s.dedup &= self.capabilities & caps::DEDUP != 0 && self.cache_bytes_per_stream >= PAGE_SIZE;
        s.delta &= self.capabilities & caps::DELTA != 0 && self.cache_bytes_per_stream >= PAGE_SIZE;
        if self.capabilities & caps::ZSTD == 0 {
            s.level = None;
        }
        s.dictionary &= s.level.is_some();
        s
    }

    /// Largest batch a stream may hold: a batch is flushed before a run that would
    /// overflow it, so one run past an empty batch is the other bound.
    pub fn max_batch_len(&self) -> usize {
        self.max_batch_bytes
            .clamp(64 << 10, MAX_BATCH)
            .max(crate::transport::frames::stage_space(
                crate::wire::MAX_RUN_PAGES,
            ))
    }

    /// Largest output of one [`WorkerCodec::flush`]: a dictionary announcement plus
    /// one batch, compressed (at worst slightly larger) or stored.
    pub fn max_flush_len(&self) -> usize {
        let batch = self.max_batch_len();
        2 * FRAME_HEADER_LEN + 8 + self.max_dictionary_bytes + compress_bound(batch).max(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::zstd::{Dictionary, train_dictionary};
    use crate::transport::frames::{FrameParser, StreamEvent};
    use crate::wire::{CHUNK_PAGES, WireError, stream_of};
    use dwcp_hugepages::PagePreference;

    const PAGES: u64 = 256;

    fn memory() -> Arc<GuestMemory> {
        Arc::new(GuestMemory::anonymous(PAGES as usize * PAGE_SIZE, PagePreference::Small).unwrap())
    }

    fn text_page(seed: u64) -> Vec<u8> {
        let words = [
            "kernel ",
            "page ",
            "struct ",
            "inode ",
            "0x7fff ",
            "migration ",
        ];
        let mut out = Vec::with_capacity(PAGE_SIZE);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        while out.len() < PAGE_SIZE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(words[(x % 6) as usize].as_bytes());
        }
        out.truncate(PAGE_SIZE);
        out
    }

    /// Zero pages, text pages, and duplicates of earlier pages of the same stream.
    fn fill(m: &GuestMemory) {
        for p in 0..PAGES {
            match p % 5 {
                0 => {}
                // A copy of a page 64 pages back: same stream when streams divide 4.
                3 if p >= 64 => m.write_page(p, &text_page(p - 64)),
                _ => m.write_page(p, &text_page(p)),
            }
        }
        // Keep the duplicates exact: the page 64 back must hold text_page(p - 64).
        for p in (64..PAGES).filter(|p| p % 5 == 3) {
            let mut base = vec![0u8; PAGE_SIZE];
            m.read_page(p - 64, &mut base);
            m.write_page(p, &base);
        }
    }

    /// Encode every page of `stream` (of `streams`) as one round, like a worker.
    fn encode_round(
        codec: &mut WorkerCodec,
        state: &mut StreamCodec,
        m: &GuestMemory,
        stream: u16,
        streams: u16,
        round: u64,
        wire: &mut Vec<u8>,
    ) {
        let mut out = vec![0u8; 4 << 20];
        let mut pages = 0u32;
        for first in (0..PAGES).step_by(CHUNK_PAGES as usize) {
            if stream_of(first, streams) != stream {
                continue;
            }
            if codec.batch_full(state, CHUNK_PAGES as u32) {
                let n = codec.flush(state, &mut out);
                wire.extend_from_slice(&out[..n]);
            }
            codec.encode_run(state, m, first, CHUNK_PAGES as u32, None);
            pages += CHUNK_PAGES as u32;
        }
        let n = codec.flush(state, &mut out);
        wire.extend_from_slice(&out[..n]);
        let mut header = [0u8; FRAME_HEADER_LEN];
        FrameHeader::round_end(round, pages).encode(&mut header);
        wire.extend_from_slice(&header);
    }

    fn parse(
        parser: &mut FrameParser,
        wire: &[u8],
        piece: usize,
    ) -> Result<Vec<StreamEvent>, WireError> {
        let mut events = Vec::new();
        for part in wire.chunks(piece) {
            parser.feed(part, &mut |e| events.push(e))?;
        }
        Ok(events)
    }

    #[test]
    fn every_codec_round_trips_in_any_piece_sizes() {
        for settings in [
            CodecSettings::full(1),
            CodecSettings::full(-5),
            CodecSettings {
                level: None,
                ..CodecSettings::full(1)
            },
            CodecSettings {
                dedup: false,
                delta: false,
                ..CodecSettings::full(3)
            },
        ] {
            let src = memory();
            fill(&src);
            let mut codec = WorkerCodec::new();
            codec.set_settings(settings, std::iter::empty());
            let mut state = StreamCodec::new(8 << 20, MAX_BATCH + (1 << 17));
            let mut wire = Vec::new();
            encode_round(&mut codec, &mut state, &src, 0, 1, 0, &mut wire);
            // Round 1: small edits to some pages (deltas), one page rewritten whole.
            for p in (1..PAGES).step_by(7) {
                src.write_at(p, 100, b"edited");
            }
            src.write_page(2, &text_page(9999));
            encode_round(&mut codec, &mut state, &src, 0, 1, 1, &mut wire);
            let c = codec.counters();
            if settings.dedup {
                assert!(c.dedup_pages > 0, "{settings:?}: {c:?}");
            }
            if settings.delta {
                assert!(c.delta_pages > 0, "{settings:?}: {c:?}");
            }
            if settings.level.is_some() {
                assert!(c.batches > 0 && c.compress_out < c.compress_in, "{c:?}");
            }
            assert!(
                (wire.len() as u64) < c.input_bytes * 3 / 4,
                "{settings:?} sent {} for {}",
                wire.len(),
                c.input_bytes
            );
            for piece in [1usize, 333, 65536, usize::MAX] {
                let dst = memory();
                let mut parser = FrameParser::new(dst.clone(), 0, 1, true);
                let events = parse(&mut parser, &wire, piece.min(wire.len())).unwrap();
                assert_eq!(events.len(), 2);
                assert_eq!(
                    dst.first_difference(&src),
                    None,
                    "{settings:?}, pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn dictionaries_are_announced_once_per_stream_and_used() {
        let src = memory();
        fill(&src);
        let samples: Vec<Vec<u8>> = (0..128).map(text_page).collect();
        let refs: Vec<&[u8]> = samples.iter().map(|s| &s[..]).collect();
        let dict = Arc::new(Dictionary::new(
            3,
            train_dictionary(&refs, 8 << 10).unwrap(),
        ));
        let mut codec = WorkerCodec::new();
        codec.set_settings(
            CodecSettings {
                batch_bytes: 64 << 10,
                ..CodecSettings::full(1)
            },
            std::iter::empty(),
        );
        codec.set_dictionary(Some(dict.clone()));
        let streams = 2;
        for stream in 0..streams {
            let mut state = StreamCodec::new(1 << 20, MAX_BATCH);
            let mut wire = Vec::new();
            encode_round(&mut codec, &mut state, &src, stream, streams, 0, &mut wire);
            let announcements = wire
                .windows(dict.bytes().len())
                .filter(|w| *w == dict.bytes())
                .count();
            assert_eq!(announcements, 1, "stream {stream}");
            let dst = memory();
            let mut parser = FrameParser::new(dst.clone(), stream, streams, true);
            parse(&mut parser, &wire, 4096).unwrap();
            for p in (0..PAGES).filter(|&p| stream_of(p, streams) == stream) {
                let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
                src.read_page(p, &mut a);
                dst.read_page(p, &mut b);
                assert_eq!(a, b, "page {p}");
            }
        }
    }

    #[test]
    fn incompressible_batches_are_sent_stored() {
        let src = memory();
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..PAGES {
            for b in page.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            src.write_page(p, &page);
        }
        let mut codec = WorkerCodec::new();
        codec.set_settings(CodecSettings::full(1), std::iter::empty());
        let mut state = StreamCodec::new(0, MAX_BATCH);
        let mut wire = Vec::new();
        encode_round(&mut codec, &mut state, &src, 0, 1, 0, &mut wire);
        assert!(codec.counters().batches_stored > 0);
        assert_eq!(codec.counters().batches, 0);
        let dst = memory();
        parse(
            &mut FrameParser::new(dst.clone(), 0, 1, true),
            &wire,
            10_000,
        )
        .unwrap();
        assert_eq!(dst.first_difference(&src), None);
    }

    fn frame(header: FrameHeader, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; FRAME_HEADER_LEN];
        let mut h = [0u8; FRAME_HEADER_LEN];
        header.encode(&mut h);
        out.copy_from_slice(&h);
        out.extend_from_slice(payload);
        out
    }

    fn compressed(inner: &[u8], announced: Option<u32>) -> Vec<u8> {
        let mut c = crate::codec::zstd::Compressor::new();
        let mut packed = vec![0u8; compress_bound(inner.len())];
        let n = c.compress(1, None, inner, &mut packed).unwrap();
        let mut payload = announced
            .unwrap_or(inner.len() as u32)
            .to_le_bytes()
            .to_vec();
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&packed[..n]);
        frame(FrameHeader::compressed(n), &payload)
    }

    /// Destination memory with page 5 (stream 0 of 2) holding known text.
    fn destination() -> (Arc<GuestMemory>, Vec<u8>) {
        let m = memory();
        let page = text_page(5);
        m.write_page(5, &page);
        (m, page)
    }

    fn expect_bad(wire: &[u8], what: &str) {
        let (dst, before) = destination();
        let mut parser = FrameParser::new(dst.clone(), 0, 2, false);
        let err = parse(&mut parser, wire, 7).expect_err(what);
        assert!(
            matches!(
                err,
                WireError::BadEncoding { .. } | WireError::PageChecksum { .. }
            ),
            "{what}: {err}"
        );
        let mut after = vec![0u8; PAGE_SIZE];
        dst.read_page(5, &mut after);
        assert_eq!(after, before, "{what}: a refused frame changed the page");
    }

    #[test]
    fn malformed_deltas_references_and_batches_are_refused_without_writes() {
        let crc = dwcp_simd::crc32c(&text_page(5)).to_le_bytes();
        // A delta whose run runs past the page.
        let mut delta = crc.to_vec();
        delta.extend_from_slice(&[0x80, 0x40, 0x01, 0xAA]);
        expect_bad(
            &frame(FrameHeader::delta_page(5, 4), &delta),
            "delta past the page",
        );
        // A valid delta with a CRC that does not match the result.
        let mut wrong_crc = 0u32.to_le_bytes().to_vec();
        wrong_crc.extend_from_slice(&[0x00, 0x01, 0xAA]);
        expect_bad(
            &frame(FrameHeader::delta_page(5, 3), &wrong_crc),
            "delta with wrong CRC",
        );
        // References: outside memory, to another stream's page, wrong CRC.
        for (source, what) in [
            (PAGES + 3, "outside memory"),
            (16, "another stream's page"),
            (6, "wrong CRC"),
        ] {
            let mut payload = source.to_le_bytes().to_vec();
            payload.extend_from_slice(&crc);
            expect_bad(&frame(FrameHeader::page_ref(5), &payload), what);
        }
        // Batches: not zstd, announcing a wrong size, expanding too far, nesting.
        let mut junk = 100u32.to_le_bytes().to_vec();
        junk.extend_from_slice(&0u32.to_le_bytes());
        junk.extend_from_slice(b"this is not a zstd frame");
        expect_bad(&frame(FrameHeader::compressed(24), &junk), "not zstd");
        let inner = frame(FrameHeader::zero_run(0, 1), &[]);
        expect_bad(
            &compressed(&inner, Some(inner.len() as u32 + 1)),
            "announced size differs",
        );
        expect_bad(
            &compressed(&inner, Some(MAX_BATCH as u32 + 1)),
            "expands past the limit",
        );
        let nested = compressed(&inner, None);
        expect_bad(&compressed(&nested, None), "a batch inside a batch");
        let truncated = &frame(FrameHeader::zero_run(0, 1), &[])[..10];
        expect_bad(&compressed(truncated, None), "a frame cut short");
        // A dictionary that is not one, and a batch naming an unknown dictionary.
        let mut unknown = 10u32.to_le_bytes().to_vec();
        unknown.extend_from_slice(&9u32.to_le_bytes());
        unknown.extend_from_slice(&[0u8; 16]);
        expect_bad(
            &frame(FrameHeader::compressed(16), &unknown),
            "unknown dictionary",
        );
    }
}
