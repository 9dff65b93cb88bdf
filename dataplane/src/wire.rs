//! Wire protocol v3 (the full description, with diagrams, is `docs/protocol.md`).
//!
//! A session is one *control stream* and N *data streams*, all TCP.
//! - Control stream: length-prefixed rkyv messages ([`ControlMessage`]): the handshake
//!   (magic, version, session id, memory size, page size, stream count, capabilities),
//!   per-round acknowledgements, the switchover with the digest of the source's CRC
//!   table (or, for a full verification, the per-page CRCs of its memory), the verdict,
//!   pings and aborts. v2 replaced v1's whole-memory check in the switchover with the
//!   table digest. Every message is validated
//!   (`bytecheck`) before use and capped at [`MAX_CONTROL_MESSAGE`] bytes.
//! - Data streams: a fixed [`StreamHello`], then page frames, each a fixed 24-byte
//!   little-endian [`FrameHeader`] decoded without allocation and checked against the
//!   session's limits before a byte of payload is touched. v3: in an authenticated
//!   session the control stream is TLS 1.3, a data stream's hello carries its binding
//!   to the session, and its frames travel in sealed records
//!   ([`crate::security::records`]).
//!
//! Every page travels with the CRC32C of its content; zero pages travel as a count.

use rkyv::{Archive, Deserialize, Serialize};
use std::io::{Read, Write};

/// Protocol version this build speaks.
pub const VERSION: u16 = 3;
/// First bytes of the handshake.
pub const CONTROL_MAGIC: [u8; 4] = *b"DWCP";
/// First bytes of every data stream.
pub const STREAM_MAGIC: [u8; 4] = *b"DWCS";
/// Bytes of a page-frame header.
pub const FRAME_HEADER_LEN: usize = 24;
/// Bytes of a data stream's hello.
pub const STREAM_HELLO_LEN: usize = 48;
/// Pages per chunk: the unit in which pages are dealt to streams.
pub const CHUNK_PAGES: u64 = 16;
/// Most pages one frame may carry (a frame never leaves its chunk).
pub const MAX_RUN_PAGES: u32 = CHUNK_PAGES as u32;
/// Largest control message accepted.
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;
/// Most data streams a session may have.
pub const MAX_STREAMS: u16 = 256;
/// Bytes in front of each page in a raw-pages payload (its CRC32C).
pub const PAGE_CRC_LEN: usize = 4;

/// The data stream that carries `page` in a session of `streams` streams.
///
/// Chunks of [`CHUNK_PAGES`] consecutive pages are dealt round-robin to the streams.
/// Any region larger than `streams` chunks (64 KiB each) spreads over every stream, so
/// all of them stay busy whether the guest dirties memory uniformly or in a hot spot;
/// and because a page always travels on the same stream, its successive versions
/// arrive in order with no coordination between streams, and each destination page
/// has exactly one writer.
#[inline]
pub fn stream_of(page: u64, streams: u16) -> u16 {
    ((page / CHUNK_PAGES) % u64::from(streams.max(1))) as u16
}

/// A set of a session's data streams (ids below [`MAX_STREAMS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSet([u64; 4]);

impl StreamSet {
    /// Whether `stream` is in the set.
    #[inline]
    pub fn contains(&self, stream: u16) -> bool {
        let s = usize::from(stream);
        s < 256 && self.0[s / 64] & (1 << (s % 64)) != 0
    }

    /// Add `stream` (ids at or past [`MAX_STREAMS`] are ignored).
    pub fn insert(&mut self, stream: u16) {
        let s = usize::from(stream);
        if s < 256 {
            self.0[s / 64] |= 1 << (s % 64);
        }
    }

    /// Take `stream` out.
    pub fn remove(&mut self, stream: u16) {
        let s = usize::from(stream);
        if s < 256 {
            self.0[s / 64] &= !(1 << (s % 64));
        }
    }

    /// Streams in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The set of four words.
    pub fn from_words(words: [u64; 4]) -> Self {
        StreamSet(words)
    }
}

/// Which stream carries each page once streams have been lost: a page's home stream
/// ([`stream_of`]) while it lives; a lost stream's chunks each go to the active stream
/// left that ranks highest for that chunk (rendezvous hashing: Thaler and Ravishankar,
/// "Using name-based mappings to increase hit rates", IEEE/ACM ToN 1998). Another loss
/// then moves only the chunks on the stream just lost, whatever order the losses came
/// in: a page that moved stays on its new stream while that lives, so every page has
/// one writer at a time and a stream only refers to pages it carried itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    streams: u16,
    lost: StreamSet,
    /// The active streams not lost, ascending.
    alive: Vec<u16>,
}

impl Routes {
    /// `streams` active streams, `lost` among them gone.
    pub fn new(streams: u16, lost: StreamSet) -> Self {
        let streams = streams.max(1);
        Routes {
            streams,
            lost,
            alive: (0..streams).filter(|&s| !lost.contains(s)).collect(),
        }
    }

    /// The stream that carries `page`; `None` when every active stream is lost.
    #[inline]
    pub fn route(&self, page: u64) -> Option<u16> {
        let home = stream_of(page, self.streams);
        if !self.lost.contains(home) {
            return Some(home);
        }
        let chunk = page / CHUNK_PAGES;
        self.alive
            .iter()
            .copied()
            .max_by_key(|&s| rendezvous(chunk, s))
    }

    /// The lost streams.
    pub fn lost(&self) -> StreamSet {
        self.lost
    }
}

/// How much stream `stream` wants chunk `chunk` ([`Routes`]): a 64-bit mix of the pair
/// (splitmix64's finalizer).
#[inline]
fn rendezvous(chunk: u64, stream: u16) -> u64 {
    let mut x = chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(stream);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Capability bits exchanged in the handshake.
pub mod caps {
    /// Zero pages sent as a count, without payload.
    pub const ZERO_PAGES: u64 = 1 << 0;
    /// Frames may carry runs of consecutive pages.
    pub const PAGE_RUNS: u64 = 1 << 1;
    /// XBZRLE deltas against the copy last sent ([`super::FrameKind::DeltaPage`]).
    pub const DELTA: u64 = 1 << 2;
    /// References to a page already at the destination ([`super::FrameKind::PageRef`]).
    pub const DEDUP: u64 = 1 << 3;
    /// zstd batches and dictionaries ([`super::FrameKind::Compressed`],
    /// [`super::FrameKind::Dictionary`]).
    pub const ZSTD: u64 = 1 << 4;
    /// The source may change how many streams carry pages, at a round boundary
    /// ([`super::FrameKind::StreamMap`]).
    pub const STREAM_MAP: u64 = 1 << 5;
    /// Everything this build understands and grants by default.
    pub const ALL: u64 =
        ZERO_PAGES | PAGE_RUNS | DELTA | DEDUP | ZSTD | STREAM_MAP | STREAM_LOSS | RESUME;
    /// The guest has device state that follows its memory
    /// ([`super::ControlMessage::DeviceState`]): asked for by a source whose guest has
    /// one (a QEMU guest), granted by a destination that has a guest to load it into.
    /// Not in [`ALL`]: both sides must agree, and a mismatch refuses the session.
    pub const DEVICE_STATE: u64 = 1 << 6;
    /// A data stream may be lost without ending the session: the destination fences
    /// it on request ([`super::ControlMessage::StreamLost`], answered by
    /// [`super::ControlMessage::StreamFenced`]) and its pages move to the streams left
    /// ([`super::Routes`]).
    pub const STREAM_LOSS: u64 = 1 << 7;
    /// A session whose connections all died may be continued within the grace period:
    /// the destination keeps its memory and table, the source reconnects with
    /// [`super::ControlMessage::Resume`], and the two compare their CRC tables chunk by
    /// chunk ([`super::ControlMessage::ResumeTable`]) so that only what the destination
    /// lacks is sent again.
    pub const RESUME: u64 = 1 << 8;
    /// Page contents may arrive by RMA write straight into the destination's memory
    /// ([`super::FrameKind::RmaPages`]), over libfabric connections set up after the
    /// data streams ([`super::ControlMessage::RmaOffer`]). Not in [`ALL`]: a source
    /// asks for it only when told to (`transport = "rma"`), and a destination grants it
    /// only where it may (RMA bytes travel outside the session's sealed records).
    pub const RMA: u64 = 1 << 9;
}

/// Pages per chunk when two sides compare their CRC tables on resuming a session
/// (4 MiB of memory: a digest of 8 bytes each, 2 KiB per GiB).
pub const RESUME_CHUNK_PAGES: u64 = 1024;
/// Most chunk digests in one [`ControlMessage::ResumeTable`] (512 KiB of digests, well
/// under [`MAX_CONTROL_MESSAGE`]).
pub const RESUME_DIGESTS_PER_MESSAGE: usize = 64 << 10;

/// Largest batch of frames a [`FrameKind::Compressed`] frame may expand to.
pub const MAX_BATCH: usize = 1 << 20;
/// Largest [`FrameKind::Compressed`] payload: zstd's worst case for [`MAX_BATCH`]
/// (`ZSTD_COMPRESSBOUND`) plus the 8-byte prefix, rounded up.
pub const MAX_COMPRESSED_PAYLOAD: usize = MAX_BATCH + MAX_BATCH / 256 + 64 + 8;
/// Largest dictionary a [`FrameKind::Dictionary`] frame may carry.
pub const MAX_DICTIONARY: usize = 1 << 20;
/// Bytes of a [`FrameKind::PageRef`] payload: the source page (u64) and the CRC32C.
pub const PAGE_REF_PAYLOAD: usize = 12;

/// A peer's bytes for a message: as text when printable (`"GET "`, an HTTP client),
/// else in hex (`bytes 16 03 01 02`, a TLS client).
pub fn bytes_text(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

/// Malformed or unexpected input from the peer. Each variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A sealed record on a data stream was refused.
    #[error(transparent)]
    Record(#[from] crate::security::RecordError),
    /// A stream did not start with the expected magic bytes.
    #[error(
        "bad magic {} (expected {}): not a dwcp stream",
        bytes_text(found),
        bytes_text(expected)
    )]
    BadMagic {
        /// Bytes received.
        found: [u8; 4],
        /// Bytes expected.
        expected: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("protocol version {found} not supported (this appliance speaks {VERSION})")]
    Version {
        /// The peer's version.
        found: u16,
    },
    /// A header's CRC does not match its bytes.
    #[error("{what} checksum mismatch (corrupt or misaligned stream)")]
    HeaderChecksum {
        /// Which header.
        what: &'static str,
    },
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownFrameKind(u8),
    /// Reserved bits were set.
    #[error("frame has reserved bits set (flags {flags:#x}, reserved {reserved:#x})")]
    ReservedBits {
        /// The flags byte.
        flags: u8,
        /// The reserved field.
        reserved: u16,
    },
    /// A run of pages that is empty or longer than allowed.
    #[error("frame page count {count} outside 1..={max}")]
    BadCount {
        /// The count received.
        count: u32,
        /// The largest allowed.
        max: u32,
    },
    /// Pages outside guest memory.
    #[error("pages {first}..{end} are outside guest memory of {pages} pages")]
    PageOutOfRange {
        /// First page of the run.
        first: u64,
        /// One past the last page.
        end: u64,
        /// Pages in memory.
        pages: u64,
    },
    /// A payload length that does not match the frame.
    #[error("frame payload length {found} (expected {expected})")]
    BadPayloadLength {
        /// Length received.
        found: u32,
        /// Length the header implies.
        expected: u64,
    },
    /// A stream id that is out of range or used twice.
    #[error("data stream id {id} invalid ({reason})")]
    BadStreamId {
        /// The id received.
        id: u16,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A data stream for another session.
    #[error("data stream belongs to session {found:032x}, not {expected:032x}")]
    WrongSession {
        /// Session id received.
        found: u128,
        /// This session's id.
        expected: u128,
    },
    /// A control message larger than allowed.
    #[error("control message of {0} bytes exceeds the {MAX_CONTROL_MESSAGE}-byte limit")]
    ControlTooLarge(usize),
    /// A control message that failed validation (the validator's own account, meant
    /// for a developer, is left out of what operators read).
    #[error("malformed control message ({0} bytes): not a message this version knows")]
    MalformedControl(usize),
    /// The peer's first bytes are no dwcp handshake: another program connected.
    #[error(
        "the peer does not speak dwcp (it began with {0}): another program connected to the migration port"
    )]
    NotDwcp(String),
    /// A control message that makes no sense at this point.
    #[error("unexpected control message: {0}")]
    Unexpected(String),
    /// A handshake field out of range.
    #[error("handshake field {field} invalid: {reason}")]
    BadHandshake {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A page whose content does not match its CRC.
    #[error("page {page} failed its CRC32C check (sent {expected:#010x}, received {found:#010x})")]
    PageChecksum {
        /// The page index.
        page: u64,
        /// CRC the sender computed.
        expected: u32,
        /// CRC of what arrived.
        found: u32,
    },
    /// Pages sent on a stream that does not carry them.
    #[error("pages {first}..{end} arrived on stream {stream}; they belong to stream {owner}")]
    WrongStream {
        /// First page of the frame.
        first: u64,
        /// One past the last.
        end: u64,
        /// The stream they arrived on.
        stream: u16,
        /// The stream that carries them.
        owner: u16,
    },
    /// A frame that is not allowed after what came before it.
    #[error("frame out of order on stream {stream}: {what}")]
    OutOfOrder {
        /// The stream.
        stream: u16,
        /// What was wrong.
        what: &'static str,
    },
    /// A round marker whose page count disagrees with what the stream carried.
    #[error("round {round} on stream {stream}: marker says {marked} pages, {received} arrived")]
    RoundMismatch {
        /// The round.
        round: u64,
        /// The stream.
        stream: u16,
        /// Pages the marker announces.
        marked: u32,
        /// Pages that arrived.
        received: u32,
    },
    /// A delta, reference or compressed batch that does not decode.
    #[error("{what} for page {page} is malformed: {reason}")]
    BadEncoding {
        /// Which kind of frame.
        what: &'static str,
        /// The page it was for (0 for batches).
        page: u64,
        /// What was wrong.
        reason: String,
    },
    /// The peer closed a stream before it was finished.
    #[error("{0} closed by the peer before the session ended")]
    UnexpectedEof(&'static str),
}

/// What a data frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// `count` zero pages from `page`; no payload.
    ZeroRun = 1,
    /// `count` pages from `page`, each as its CRC32C (LE u32) then its bytes.
    RawPages = 2,
    /// End of round `page` on this stream, which carried `count` pages in it.
    RoundEnd = 3,
    /// The sender will send nothing more on this stream.
    StreamEnd = 4,
    /// Page `page` as an XBZRLE delta against the copy last sent for it: the CRC32C of
    /// the resulting page (LE u32), then the delta (empty when nothing changed).
    DeltaPage = 5,
    /// Page `page` is a copy of another page the same stream carries: that page's index
    /// (LE u64), then the CRC32C of the content.
    PageRef = 6,
    /// zstd-compressed frames: the length they expand to (LE u32), the dictionary id
    /// (LE u32, 0 for none), then one zstd frame. Inside may only be zero runs, raw
    /// pages, deltas and references.
    Compressed = 7,
    /// Dictionary `page` (a non-zero id) for later [`FrameKind::Compressed`] frames on
    /// this stream: its bytes.
    Dictionary = 8,
    /// From here on, pages are spread over the first `page` streams of the session
    /// (1..=the session's streams) instead of all of them. Sent on every stream, right
    /// after a round marker, so each stream switches at the same point of its own
    /// sequence; no payload.
    StreamMap = 9,
    /// Bytes `page..page + payload` of the hypervisor's device-state stream
    /// ([`caps::DEVICE_STATE`]): sent with the final round, on whichever streams, each
    /// piece naming its offset; the destination puts them in order.
    DeviceState = 10,
    /// `count` pages from `page` were written by RMA into the destination's memory
    /// before this frame was sent ([`caps::RMA`]): the CRC32C (LE u32) of each, which
    /// the destination checks against what landed.
    RmaPages = 11,
}

/// Largest [`FrameKind::DeviceState`] payload (with its header, it fits the smallest
/// send buffer).
pub const MAX_DEVICE_STATE_FRAME: usize = 32 << 10;
/// Largest device-state stream a destination accepts.
pub const MAX_DEVICE_STATE: u64 = 1 << 30;

/// A decoded, validated page-frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Pages (or, for `RoundEnd`, pages in the round).
    pub count: u32,
    /// First page (or, for `RoundEnd`, the round number).
    pub page: u64,
    /// Bytes following the header.
    pub payload_len: u32,
}

/// The session's limits every header is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Pages in guest memory.
    pub pages: u64,
    /// Bytes per page.
    pub page_size: u32,
}

impl FrameHeader {
    /// A zero-page run.
    pub fn zero_run(page: u64, count: u32) -> Self {
        FrameHeader {
            kind: FrameKind::ZeroRun,
            count,
            page,
            payload_len: 0,
        }
    }

    /// A run of raw pages.
    pub fn raw_pages(page: u64, count: u32, page_size: u32) -> Self {
        FrameHeader {
            kind: FrameKind::RawPages,
            count,
            page,
            payload_len: count * (PAGE_CRC_LEN as u32 + page_size),
        }
    }

    /// `count` pages from `page` written by RMA, with their CRCs as payload.
    pub fn rma_pages(page: u64, count: u32) -> Self {
        FrameHeader {
            kind: FrameKind::RmaPages,
            count,
            page,
            payload_len: count * PAGE_CRC_LEN as u32,
        }
    }

    /// End of `round` on a stream that carried `pages` pages in it.
    pub fn round_end(round: u64, pages: u32) -> Self {
        FrameHeader {
            kind: FrameKind::RoundEnd,
            count: pages,
            page: round,
            payload_len: 0,
        }
    }

    /// Pages go over the first `active` streams from here on.
    pub fn stream_map(active: u16) -> Self {
        FrameHeader {
            kind: FrameKind::StreamMap,
            count: 0,
            page: u64::from(active),
            payload_len: 0,
        }
    }

    /// A delta for `page` of `delta_len` bytes.
    pub fn delta_page(page: u64, delta_len: usize) -> Self {
        FrameHeader {
            kind: FrameKind::DeltaPage,
            count: 1,
            page,
            payload_len: (PAGE_CRC_LEN + delta_len) as u32,
        }
    }

    /// `page` as a copy of another page.
    pub fn page_ref(page: u64) -> Self {
        FrameHeader {
            kind: FrameKind::PageRef,
            count: 1,
            page,
            payload_len: PAGE_REF_PAYLOAD as u32,
        }
    }

    /// A compressed batch of `compressed_len` zstd bytes.
    pub fn compressed(compressed_len: usize) -> Self {
        FrameHeader {
            kind: FrameKind::Compressed,
            count: 0,
            page: 0,
            payload_len: (8 + compressed_len) as u32,
        }
    }

    /// Dictionary `id` of `len` bytes.
    pub fn dictionary(id: u32, len: usize) -> Self {
        FrameHeader {
            kind: FrameKind::Dictionary,
            count: 0,
            page: u64::from(id),
            payload_len: len as u32,
        }
    }

    /// `len` bytes of device state at `offset` of its stream.
    pub fn device_state(offset: u64, len: usize) -> Self {
        FrameHeader {
            kind: FrameKind::DeviceState,
            count: 0,
            page: offset,
            payload_len: len as u32,
        }
    }

    /// End of the stream.
    pub fn stream_end() -> Self {
        FrameHeader {
            kind: FrameKind::StreamEnd,
            count: 0,
            page: 0,
            payload_len: 0,
        }
    }

    /// Write the 24 bytes: kind, flags, reserved, count, page, payload length, then the
    /// CRC32C of those 20 bytes.
    pub fn encode(&self, out: &mut [u8; FRAME_HEADER_LEN]) {
        out[0] = self.kind as u8;
        out[1] = 0;
        out[2..4].copy_from_slice(&0u16.to_le_bytes());
        out[4..8].copy_from_slice(&self.count.to_le_bytes());
        out[8..16].copy_from_slice(&self.page.to_le_bytes());
        out[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = dwcp_simd::crc32c(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode and validate 24 bytes against `limits`.
    pub fn decode(bytes: &[u8; FRAME_HEADER_LEN], limits: &FrameLimits) -> Result<Self, WireError> {
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        if dwcp_simd::crc32c(&bytes[..20]) != u32_at(20) {
            return Err(WireError::HeaderChecksum {
                what: "frame header",
            });
        }
        let kind = match bytes[0] {
            1 => FrameKind::ZeroRun,
            2 => FrameKind::RawPages,
            3 => FrameKind::RoundEnd,
            4 => FrameKind::StreamEnd,
            5 => FrameKind::DeltaPage,
            6 => FrameKind::PageRef,
            7 => FrameKind::Compressed,
            8 => FrameKind::Dictionary,
            9 => FrameKind::StreamMap,
            10 => FrameKind::DeviceState,
            11 => FrameKind::RmaPages,
            other => return Err(WireError::UnknownFrameKind(other)),
        };
        let flags = bytes[1];
        let reserved = u16::from_le_bytes([bytes[2], bytes[3]]);
        if flags != 0 || reserved != 0 {
            return Err(WireError::ReservedBits { flags, reserved });
        }
        let count = u32_at(4);
        let mut page_bytes = [0u8; 8];
        page_bytes.copy_from_slice(&bytes[8..16]);
        let page = u64::from_le_bytes(page_bytes);
        let payload_len = u32_at(16);
        let expected_payload = match kind {
            FrameKind::ZeroRun | FrameKind::RawPages | FrameKind::RmaPages => {
                if count == 0 || count > MAX_RUN_PAGES {
                    return Err(WireError::BadCount {
                        count,
                        max: MAX_RUN_PAGES,
                    });
                }
                let end = page.saturating_add(u64::from(count));
                if end > limits.pages {
                    return Err(WireError::PageOutOfRange {
                        first: page,
                        end,
                        pages: limits.pages,
                    });
                }
                match kind {
                    FrameKind::RawPages => {
                        u64::from(count) * (PAGE_CRC_LEN as u64 + u64::from(limits.page_size))
                    }
                    FrameKind::RmaPages => u64::from(count) * PAGE_CRC_LEN as u64,
                    _ => 0,
                }
            }
            FrameKind::RoundEnd | FrameKind::StreamEnd => 0,
            FrameKind::StreamMap => {
                if count != 0 {
                    return Err(WireError::BadCount { count, max: 0 });
                }
                if page == 0 || page > u64::from(MAX_STREAMS) {
                    return Err(WireError::BadHandshake {
                        field: "stream map",
                        reason: format!("{page} streams (allowed 1..={MAX_STREAMS})"),
                    });
                }
                0
            }
            FrameKind::DeltaPage | FrameKind::PageRef => {
                if count != 1 {
                    return Err(WireError::BadCount { count, max: 1 });
                }
                if page >= limits.pages {
                    return Err(WireError::PageOutOfRange {
                        first: page,
                        end: page.saturating_add(1),
                        pages: limits.pages,
                    });
                }
                let range = if kind == FrameKind::PageRef {
                    PAGE_REF_PAYLOAD..=PAGE_REF_PAYLOAD
                } else {
                    PAGE_CRC_LEN..=PAGE_CRC_LEN + limits.page_size as usize
                };
                check_payload(payload_len, range)?;
                u64::from(payload_len)
            }
            FrameKind::DeviceState => {
                if count != 0 {
                    return Err(WireError::BadCount { count, max: 0 });
                }
                if page.saturating_add(u64::from(payload_len)) > MAX_DEVICE_STATE {
                    return Err(WireError::BadHandshake {
                        field: "device state offset",
                        reason: format!("{page} + {payload_len} is past {MAX_DEVICE_STATE}"),
                    });
                }
                check_payload(payload_len, 1..=MAX_DEVICE_STATE_FRAME)?;
                u64::from(payload_len)
            }
            FrameKind::Compressed | FrameKind::Dictionary => {
                if count != 0 {
                    return Err(WireError::BadCount { count, max: 0 });
                }
                let (range, id_ok) = if kind == FrameKind::Compressed {
                    (9..=MAX_COMPRESSED_PAYLOAD, page == 0)
                } else {
                    (8..=MAX_DICTIONARY, page != 0 && page <= u64::from(u32::MAX))
                };
                if !id_ok {
                    return Err(WireError::BadHandshake {
                        field: "frame page field",
                        reason: format!("{page} is not valid for a {kind:?} frame"),
                    });
                }
                check_payload(payload_len, range)?;
                u64::from(payload_len)
            }
        };
        if u64::from(payload_len) != expected_payload {
            return Err(WireError::BadPayloadLength {
                found: payload_len,
                expected: expected_payload,
            });
        }
        Ok(FrameHeader {
            kind,
            count,
            page,
            payload_len,
        })
    }
}

fn check_payload(len: u32, allowed: std::ops::RangeInclusive<usize>) -> Result<(), WireError> {
    if allowed.contains(&(len as usize)) {
        Ok(())
    } else {
        Err(WireError::BadPayloadLength {
            found: len,
            expected: *allowed.end() as u64,
        })
    }
}

/// The first 32 bytes of a data stream: which session and which stream it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHello {
    /// The session (from the handshake).
    pub session_id: u128,
    /// This stream's index, below the session's stream count.
    pub stream_id: u16,
    /// In an authenticated session, the stream's binding to it
    /// ([`crate::security::SessionKeys::binding`]); its records are sealed.
    pub binding: Option<[u8; 16]>,
    /// 0 for the streams that open the session; a stream that replaces a lost one
    /// carries the next number for its id ([`ControlMessage::StreamRestored`]), and in
    /// an authenticated session that generation's binding and keys.
    pub generation: u16,
}

/// [`StreamHello`] flag: the stream is bound to an authenticated session.
const HELLO_SEALED: u32 = 1;

impl StreamHello {
    /// magic(4) version(2) stream_id(2) session_id(16) flags(4) binding(16) crc32c(4).
    pub fn encode(&self) -> [u8; STREAM_HELLO_LEN] {
        let mut out = [0u8; STREAM_HELLO_LEN];
        out[..4].copy_from_slice(&STREAM_MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.stream_id.to_le_bytes());
        out[8..24].copy_from_slice(&self.session_id.to_le_bytes());
        let mut flags = u32::from(self.generation) << 16;
        if let Some(binding) = &self.binding {
            flags |= HELLO_SEALED;
            out[28..44].copy_from_slice(binding);
        }
        out[24..28].copy_from_slice(&flags.to_le_bytes());
        let crc = dwcp_simd::crc32c(&out[..44]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// The session a hello names, unchecked (for routing it to that session, which
    /// then decodes and checks it whole).
    pub fn session_of(bytes: &[u8; STREAM_HELLO_LEN]) -> u128 {
        let mut sid = [0u8; 16];
        sid.copy_from_slice(&bytes[8..24]);
        u128::from_le_bytes(sid)
    }

    /// Decode and validate against the session (the binding, if any, is the caller's
    /// to check).
    pub fn decode(
        bytes: &[u8; STREAM_HELLO_LEN],
        session_id: u128,
        streams: u16,
    ) -> Result<Self, WireError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&bytes[..4]);
        if magic != STREAM_MAGIC {
            return Err(WireError::BadMagic {
                found: magic,
                expected: STREAM_MAGIC,
            });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(WireError::Version { found: version });
        }
        let crc = u32::from_le_bytes([bytes[44], bytes[45], bytes[46], bytes[47]]);
        if dwcp_simd::crc32c(&bytes[..44]) != crc {
            return Err(WireError::HeaderChecksum {
                what: "stream hello",
            });
        }
        let stream_id = u16::from_le_bytes([bytes[6], bytes[7]]);
        let mut sid = [0u8; 16];
        sid.copy_from_slice(&bytes[8..24]);
        let found = u128::from_le_bytes(sid);
        if found != session_id {
            return Err(WireError::WrongSession {
                found,
                expected: session_id,
            });
        }
        if stream_id >= streams {
            return Err(WireError::BadStreamId {
                id: stream_id,
                reason: "not below the session's stream count",
            });
        }
        let flags = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
        let binding = (flags & HELLO_SEALED != 0).then(|| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes[28..44]);
            b
        });
        Ok(StreamHello {
            session_id: found,
            stream_id,
            binding,
            generation: (flags >> 16) as u16,
        })
    }
}

/// The source's opening message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// [`CONTROL_MAGIC`].
    pub magic: [u8; 4],
    /// [`VERSION`].
    pub version: u16,
    /// Random id tying the data streams to this session.
    pub session_id: u128,
    /// Bytes of guest memory.
    pub memory_bytes: u64,
    /// Bytes per page (4096 in v1).
    pub page_size: u32,
    /// Data streams that will follow.
    pub streams: u16,
    /// [`caps`] bits the source wants.
    pub capabilities: u64,
}

/// Why a session ended early.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// The migration did not converge within its limits.
    NotConverging,
    /// An operator cancelled it.
    Cancelled,
    /// Input from the peer was malformed.
    ProtocolError,
    /// A local failure (I/O, memory).
    LocalError,
    /// Verification found differences.
    VerificationFailed,
}

/// Messages on the control stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Source → destination: open a session.
    Hello(Handshake),
    /// Destination → source: the session is accepted with these capabilities.
    Welcome {
        /// Capabilities both sides have.
        capabilities: u64,
    },
    /// Destination → source: the session is refused.
    Refused {
        /// Why, for the operator.
        reason: String,
    },
    /// Destination → source: every stream delivered round `round`'s pages.
    RoundApplied {
        /// The round.
        round: u64,
        /// Pages the round carried, all streams together.
        pages: u64,
    },
    /// Source → destination: the guest is paused; round `final_round` is the last.
    Switchover {
        /// The last round.
        final_round: u64,
    },
    /// Source → destination (verify `table` or `audit`): the digest of the source's
    /// CRC table once the final round is staged; the destination compares its own.
    TableDigest {
        /// Pages the table covers.
        pages: u64,
        /// The table digest (see `crc_table`).
        digest: u64,
    },
    /// CRC32C of pages `first_page..`: from the source, of its paused memory (verify
    /// `full`); from the destination, its CRC table after a digest mismatch, so that
    /// the source can name the pages that differ.
    PageCrcs {
        /// First page described.
        first_page: u64,
        /// One CRC per page.
        crcs: Vec<u32>,
    },
    /// Source → destination (verify `full`): all page CRCs sent; this is the
    /// whole-memory digest.
    Digest {
        /// Pages covered.
        pages: u64,
        /// CRC32C of the whole memory (the page CRCs combined in order).
        digest: u32,
    },
    /// Destination → source: the verdict.
    Verified {
        /// Pages covered.
        pages: u64,
        /// Pages whose content differs (verify `full`); with a table digest, 0 when
        /// the digests match and 1 when they do not (the destination's table, sent
        /// just before, tells the source which pages).
        mismatches: u64,
        /// The differing pages the destination knows of, ascending (at most 1024).
        mismatched_pages: Vec<u64>,
        /// The destination's digest: of its table, or of its whole memory (`full`).
        digest: u64,
    },
    /// Either side: the session is over.
    Abort {
        /// Category.
        reason: AbortReason,
        /// For the operator.
        message: String,
    },
    /// Either side: measure the control stream's round trip.
    Ping {
        /// Sender's clock, echoed back.
        nanos: u64,
    },
    /// Reply to [`ControlMessage::Ping`].
    Pong {
        /// The ping's value.
        nanos: u64,
    },
    /// Source → destination, after a good verdict ([`caps::DEVICE_STATE`]): the next
    /// bytes of the hypervisor's device-state stream, in order.
    DeviceState {
        /// At most [`DEVICE_STATE_CHUNK`] bytes.
        bytes: Vec<u8>,
    },
    /// Source → destination: the device-state stream is complete.
    DeviceStateEnd {
        /// Bytes in all, checked against what arrived.
        bytes: u64,
    },
    /// Destination → source: the guest runs at the destination (its device state
    /// loaded); the downtime ends here.
    GuestRunning,
    /// Source → destination ([`caps::STREAM_LOSS`]): the source gave data stream
    /// `stream` up (it failed or stalled); the destination stops reading it and
    /// answers [`ControlMessage::StreamFenced`].
    StreamLost {
        /// The stream.
        stream: u16,
        /// Why, for the operator.
        reason: String,
    },
    /// Destination → source ([`caps::STREAM_LOSS`]), a few times a second while pages
    /// move: the bytes each data stream's connection has delivered here. A stream the
    /// source has handed bytes to that stop arriving is stalled end to end, even when
    /// something on the path acknowledges them.
    StreamBytes {
        /// Per stream id, bytes read off its current connection.
        received: Vec<u64>,
    },
    /// Source → destination ([`caps::STREAM_LOSS`]), between rounds, once every round
    /// sent is acknowledged: lost stream `stream` is back, as the connection whose hello
    /// carries `generation`; pages route to it again from the next round on.
    StreamRestored {
        /// The stream.
        stream: u16,
        /// Its hello's generation.
        generation: u16,
    },
    /// Destination → source: nothing more of stream `stream` will be placed (asked
    /// for, or the destination found it broken first). It had delivered the end of
    /// every round below `rounds_ended`; what it carried after may be missing.
    StreamFenced {
        /// The stream.
        stream: u16,
        /// Rounds whose end marker arrived on it.
        rounds_ended: u64,
        /// Why it ended, as the destination saw it.
        reason: String,
    },
    /// Source → destination ([`caps::RESUME`]), the first message on a new control
    /// connection instead of a hello: continue session `session_id`, whose connections
    /// were lost. The other fields must match the session's.
    Resume(Handshake),
    /// Source → destination ([`caps::RESUME`]), after a resume's welcome and data
    /// streams: the digests of the source's CRC table, [`RESUME_CHUNK_PAGES`] pages
    /// each, from chunk `first_chunk`; round `round` follows the comparison. The
    /// destination answers each chunk whose digest differs from its own with
    /// [`ControlMessage::ChunkEntries`], and the last message with
    /// [`ControlMessage::TableCompared`].
    ResumeTable {
        /// The round the resumed session sends first.
        round: u64,
        /// Index of the first chunk described.
        first_chunk: u64,
        /// One digest per chunk (see `crc_table`).
        digests: Vec<u64>,
        /// This message describes the table's last chunk.
        last: bool,
    },
    /// Destination → source ([`caps::RESUME`]): its CRC table entries of chunk `chunk`,
    /// whose digest differs from the source's. Empty: every entry is 0 (nothing placed
    /// in that chunk yet).
    ChunkEntries {
        /// The chunk.
        chunk: u64,
        /// Its entries, one per page, or none.
        crcs: Vec<u32>,
    },
    /// Destination → source ([`caps::RESUME`]): every differing chunk was answered.
    TableCompared {
        /// Chunks whose digests differed.
        differing: u64,
    },
    /// Destination → source ([`caps::RMA`]), once every data stream is open: connect
    /// one libfabric connection per data stream to `port` (at the address the control
    /// stream reached) through `provider`, each presenting `token` and its stream id as
    /// its connection data.
    RmaOffer {
        /// The libfabric provider (`verbs`, `tcp`, ...).
        provider: String,
        /// Where the destination listens.
        port: u16,
        /// What each connection must present (random per session).
        token: [u8; 16],
    },
    /// Destination → source ([`caps::RMA`]): stream `stream`'s connection is up, and RMA
    /// writes through it go into guest memory registered at `base` (the address writes
    /// name for its first byte), `len` bytes, key `key`.
    RmaWindow {
        /// The data stream the connection belongs to.
        stream: u16,
        /// Address of guest memory's first byte, as writes name it.
        base: u64,
        /// Bytes writable.
        len: u64,
        /// The registration's remote key.
        key: u64,
    },
    /// Source → destination ([`caps::RMA`]): the source will not write by RMA in this
    /// session (it could not connect, or the provider cannot report delivery); pages
    /// come as frames. The destination answers with the same message once it stopped
    /// taking connections.
    RmaDeclined {
        /// Why, for the destination's log.
        reason: String,
    },
    /// Destination → source ([`caps::RMA`]): pages whose RMA-written content did not
    /// match the CRC their frame carried; the source sends them again with a later
    /// round.
    ResendPages {
        /// The pages.
        pages: Vec<u64>,
    },
}

/// Largest [`ControlMessage::DeviceState`] chunk.
pub const DEVICE_STATE_CHUNK: usize = 256 << 10;

/// Write one control message: its length (LE u32) then its rkyv bytes.
pub fn write_control(out: &mut impl Write, message: &ControlMessage) -> std::io::Result<()> {
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(message).map_err(std::io::Error::other)?;
    if bytes.len() > MAX_CONTROL_MESSAGE {
        return Err(std::io::Error::other(WireError::ControlTooLarge(
            bytes.len(),
        )));
    }
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    frame.extend_from_slice(&bytes);
    out.write_all(&frame)?;
    out.flush()
}

/// Errors reading a control message.
#[derive(Debug, thiserror::Error)]
pub enum ControlReadError {
    /// The stream failed or closed.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid message.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Read and validate one control message.
pub fn read_control(input: &mut impl Read) -> Result<ControlMessage, ControlReadError> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    decode_control(len, input)
}

/// Read a `len`-byte control message body from `input` and validate it.
pub fn decode_control(
    len: usize,
    input: &mut impl Read,
) -> Result<ControlMessage, ControlReadError> {
    if len > MAX_CONTROL_MESSAGE {
        return Err(WireError::ControlTooLarge(len).into());
    }
    // rkyv validates in place and needs the archive aligned.
    let mut body = rkyv::util::AlignedVec::<16>::with_capacity(len);
    body.resize(len, 0);
    input.read_exact(&mut body)?;
    rkyv::from_bytes::<ControlMessage, rkyv::rancor::Error>(&body)
        .map_err(|_| WireError::MalformedControl(len).into())
}

impl Handshake {
    /// Check a received handshake against what this destination can do.
    pub fn validate(&self, memory_bytes: Option<u64>) -> Result<(), WireError> {
        if self.magic != CONTROL_MAGIC {
            return Err(WireError::BadMagic {
                found: self.magic,
                expected: CONTROL_MAGIC,
            });
        }
        if self.version != VERSION {
            return Err(WireError::Version {
                found: self.version,
            });
        }
        if self.page_size != crate::memory::PAGE_SIZE as u32 {
            return Err(WireError::BadHandshake {
                field: "page_size",
                reason: format!(
                    "{} (v1 pages are {} bytes)",
                    self.page_size,
                    crate::memory::PAGE_SIZE
                ),
            });
        }
        if self.memory_bytes == 0 || !self.memory_bytes.is_multiple_of(u64::from(self.page_size)) {
            return Err(WireError::BadHandshake {
                field: "memory_bytes",
                reason: format!(
                    "{} is not a positive multiple of the page size",
                    self.memory_bytes
                ),
            });
        }
        if let Some(local) = memory_bytes
            && local != self.memory_bytes
        {
            return Err(WireError::BadHandshake {
                field: "memory_bytes",
                reason: format!("{} but this destination has {local}", self.memory_bytes),
            });
        }
        if self.streams == 0 || self.streams > MAX_STREAMS {
            return Err(WireError::BadHandshake {
                field: "streams",
                reason: format!("{} outside 1..={MAX_STREAMS}", self.streams),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_streams_chunks_spread_over_the_others_and_no_other_page_moves() {
        let all = Routes::new(4, StreamSet::default());
        for p in (0..4096).step_by(7) {
            assert_eq!(all.route(p), Some(stream_of(p, 4)));
        }
        let mut lost = StreamSet::default();
        lost.insert(1);
        let routes = Routes::new(4, lost);
        let mut took = [0u32; 4];
        for chunk in 0..256u64 {
            let page = chunk * CHUNK_PAGES;
            let to = routes.route(page).unwrap();
            // Every page of a chunk goes the same way.
            assert_eq!(routes.route(page + CHUNK_PAGES - 1), Some(to));
            if stream_of(page, 4) == 1 {
                assert_ne!(to, 1);
                took[usize::from(to)] += 1;
            } else {
                assert_eq!(to, stream_of(page, 4));
            }
        }
        // Stream 1's 64 chunks, spread over the three left.
        assert_eq!(took.iter().sum::<u32>(), 64);
        assert!(took[0] > 10 && took[2] > 10 && took[3] > 10, "{took:?}");
        // A second loss moves only what the stream just lost carried, in either order.
        let mut more = lost;
        more.insert(2);
        let after = Routes::new(4, more);
        let mut only_2 = StreamSet::default();
        only_2.insert(2);
        let first_2 = Routes::new(4, only_2);
        for p in (0..CHUNK_PAGES * 256).step_by(5) {
            if routes.route(p) != Some(2) {
                assert_eq!(after.route(p), routes.route(p), "page {p}");
            }
            if first_2.route(p) != Some(1) {
                assert_eq!(after.route(p), first_2.route(p), "page {p}");
            }
            assert!(!more.contains(after.route(p).unwrap()));
        }
        let mut every = StreamSet::default();
        (0..4).for_each(|s| every.insert(s));
        assert_eq!(Routes::new(4, every).route(0), None);
        assert_eq!(every.len(), 4);
        assert!(!every.contains(4));
    }

    const LIMITS: FrameLimits = FrameLimits {
        pages: 1000,
        page_size: 4096,
    };

    fn encoded(h: FrameHeader) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        h.encode(&mut b);
        b
    }

    #[test]
    fn headers_round_trip() {
        for h in [
            FrameHeader::zero_run(5, 16),
            FrameHeader::raw_pages(984, 16, 4096),
            FrameHeader::round_end(17, 123_456),
            FrameHeader::stream_end(),
        ] {
            assert_eq!(FrameHeader::decode(&encoded(h), &LIMITS), Ok(h));
        }
    }

    /// Re-checksum a header after tampering, so validation past the CRC is exercised.
    fn resealed(mut b: [u8; FRAME_HEADER_LEN]) -> [u8; FRAME_HEADER_LEN] {
        let crc = dwcp_simd::crc32c(&b[..20]);
        b[20..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn every_bad_field_is_named() {
        let good = encoded(FrameHeader::raw_pages(10, 2, 4096));
        let mut flipped = good;
        flipped[9] ^= 1;
        assert_eq!(
            FrameHeader::decode(&flipped, &LIMITS),
            Err(WireError::HeaderChecksum {
                what: "frame header"
            })
        );
        let mut b = good;
        b[0] = 12;
        assert_eq!(
            FrameHeader::decode(&resealed(b), &LIMITS),
            Err(WireError::UnknownFrameKind(12))
        );
        // RMA pages: a CRC per page, no bytes of content, within memory.
        let rma = FrameHeader::rma_pages(10, 3);
        assert_eq!(FrameHeader::decode(&encoded(rma), &LIMITS), Ok(rma));
        let mut b = encoded(rma);
        b[16..20].copy_from_slice(&(3u32 * 4100).to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&resealed(b), &LIMITS),
            Err(WireError::BadPayloadLength { .. })
        ));
        assert!(matches!(
            FrameHeader::decode(
                &encoded(FrameHeader::rma_pages(LIMITS.pages - 1, 2)),
                &LIMITS
            ),
            Err(WireError::PageOutOfRange { .. })
        ));
        // Device state: a piece of 1..=MAX_DEVICE_STATE_FRAME bytes below the cap.
        let piece = FrameHeader::device_state(1 << 20, 4000);
        assert_eq!(FrameHeader::decode(&encoded(piece), &LIMITS), Ok(piece));
        for bad in [
            FrameHeader::device_state(0, 0),
            FrameHeader::device_state(0, MAX_DEVICE_STATE_FRAME + 1),
            FrameHeader::device_state(MAX_DEVICE_STATE - 10, 11),
        ] {
            assert!(
                FrameHeader::decode(&encoded(bad), &LIMITS).is_err(),
                "{bad:?}"
            );
        }
        // A stream map names 1..=MAX_STREAMS streams and carries nothing.
        let map = encoded(FrameHeader::stream_map(3));
        assert_eq!(
            FrameHeader::decode(&map, &LIMITS),
            Ok(FrameHeader::stream_map(3))
        );
        let zero = encoded(FrameHeader::stream_map(0));
        assert!(FrameHeader::decode(&zero, &LIMITS).is_err());
        let too_many = encoded(FrameHeader::stream_map(MAX_STREAMS + 1));
        assert!(FrameHeader::decode(&too_many, &LIMITS).is_err());
        let mut b = good;
        b[1] = 1;
        assert!(matches!(
            FrameHeader::decode(&resealed(b), &LIMITS),
            Err(WireError::ReservedBits { flags: 1, .. })
        ));
        assert!(matches!(
            FrameHeader::decode(&encoded(FrameHeader::raw_pages(999, 2, 4096)), &LIMITS),
            Err(WireError::PageOutOfRange {
                first: 999,
                end: 1001,
                pages: 1000
            })
        ));
        assert!(matches!(
            FrameHeader::decode(&encoded(FrameHeader::zero_run(u64::MAX, 1)), &LIMITS),
            Err(WireError::PageOutOfRange { .. })
        ));
        assert!(matches!(
            FrameHeader::decode(&encoded(FrameHeader::zero_run(0, 0)), &LIMITS),
            Err(WireError::BadCount { count: 0, .. })
        ));
        assert!(matches!(
            FrameHeader::decode(&encoded(FrameHeader::zero_run(0, 17)), &LIMITS),
            Err(WireError::BadCount { count: 17, .. })
        ));
        let mut wrong_len = FrameHeader::raw_pages(10, 2, 4096);
        wrong_len.payload_len -= 1;
        assert!(matches!(
            FrameHeader::decode(&encoded(wrong_len), &LIMITS),
            Err(WireError::BadPayloadLength { .. })
        ));
    }

    #[test]
    fn chunks_are_dealt_round_robin() {
        assert_eq!(stream_of(0, 4), 0);
        assert_eq!(stream_of(15, 4), 0);
        assert_eq!(stream_of(16, 4), 1);
        assert_eq!(stream_of(64, 4), 0);
        assert_eq!(stream_of(1000, 1), 0);
        // A 1 MiB hot spot (256 pages) touches every one of 4 streams equally.
        let mut per = [0; 4];
        for p in 5000..5256 {
            per[stream_of(p, 4) as usize] += 1;
        }
        assert!(per.iter().all(|&n| n == 64), "{per:?}");
    }

    #[test]
    fn stream_hello_checks_session_and_id() {
        let hello = StreamHello {
            session_id: 42,
            stream_id: 3,
            binding: None,
            generation: 0,
        }
        .encode();
        assert_eq!(StreamHello::decode(&hello, 42, 4).unwrap().binding, None);
        let bound = StreamHello {
            session_id: 42,
            stream_id: 3,
            binding: Some([9; 16]),
            generation: 2,
        }
        .encode();
        let decoded = StreamHello::decode(&bound, 42, 4).unwrap();
        assert_eq!(decoded.binding, Some([9; 16]));
        assert_eq!(decoded.generation, 2);
        assert_eq!(StreamHello::decode(&hello, 42, 4).unwrap().generation, 0);
        assert!(matches!(
            StreamHello::decode(&hello, 43, 4),
            Err(WireError::WrongSession { .. })
        ));
        assert!(matches!(
            StreamHello::decode(&hello, 42, 3),
            Err(WireError::BadStreamId { id: 3, .. })
        ));
        let mut bad = hello;
        bad[..4].copy_from_slice(b"GET ");
        let err = StreamHello::decode(&bad, 42, 4).unwrap_err();
        assert!(matches!(err, WireError::BadMagic { .. }));
        // Named as text an operator recognises, not a list of numbers.
        let text = err.to_string();
        assert!(
            text.starts_with("bad magic \"GET \" (expected \""),
            "{text}"
        );
        bad[..4].copy_from_slice(&[0x16, 0x03, 0x01, 0x00]);
        let text = StreamHello::decode(&bad, 42, 4).unwrap_err().to_string();
        assert!(text.contains("bytes 16 03 01 00"), "{text}");
    }

    #[test]
    fn control_messages_round_trip_and_garbage_is_refused() {
        let msgs = [
            ControlMessage::Hello(Handshake {
                magic: CONTROL_MAGIC,
                version: VERSION,
                session_id: 7,
                memory_bytes: 1 << 30,
                page_size: 4096,
                streams: 4,
                capabilities: caps::ALL,
            }),
            ControlMessage::PageCrcs {
                first_page: 10,
                crcs: vec![1, 2, 3],
            },
            ControlMessage::TableDigest {
                pages: 1 << 18,
                digest: u64::MAX - 5,
            },
            ControlMessage::Verified {
                pages: 1 << 18,
                mismatches: 2,
                mismatched_pages: vec![7, 1 << 17],
                digest: 0x0123_4567_89ab_cdef,
            },
            ControlMessage::Abort {
                reason: AbortReason::Cancelled,
                message: "operator".into(),
            },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_control(&mut buf, m).unwrap();
        }
        let mut r = &buf[..];
        for m in &msgs {
            assert_eq!(&read_control(&mut r).unwrap(), m);
        }
        // Garbage of a plausible length: validation refuses it.
        let mut garbage = vec![64, 0, 0, 0];
        garbage.extend((0..64).map(|i| (i * 37) as u8));
        assert!(matches!(
            read_control(&mut &garbage[..]),
            Err(ControlReadError::Wire(WireError::MalformedControl(_)))
        ));
        let huge = ((MAX_CONTROL_MESSAGE + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_control(&mut &huge[..]),
            Err(ControlReadError::Wire(WireError::ControlTooLarge(_)))
        ));
    }

    #[test]
    fn handshake_validation_names_the_field() {
        let good = Handshake {
            magic: CONTROL_MAGIC,
            version: VERSION,
            session_id: 1,
            memory_bytes: 1 << 20,
            page_size: 4096,
            streams: 2,
            capabilities: caps::ALL,
        };
        assert!(good.validate(Some(1 << 20)).is_ok());
        assert!(matches!(
            Handshake {
                version: 1,
                ..good.clone()
            }
            .validate(None),
            Err(WireError::Version { found: 1 })
        ));
        assert!(matches!(
            good.validate(Some(2 << 20)),
            Err(WireError::BadHandshake {
                field: "memory_bytes",
                ..
            })
        ));
        assert!(matches!(
            Handshake {
                streams: 0,
                ..good.clone()
            }
            .validate(None),
            Err(WireError::BadHandshake {
                field: "streams",
                ..
            })
        ));
        assert!(matches!(
            Handshake {
                page_size: 8192,
                ..good
            }
            .validate(None),
            Err(WireError::BadHandshake {
                field: "page_size",
                ..
            })
        ));
    }
}
