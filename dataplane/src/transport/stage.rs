//! Staging, shared by both send transports: the commands a source worker takes (runs
//! of pages, markers, codec changes) turned into frames in send buffers, with the
//! counters every worker reports.
//!
//! Sans-IO: where the bytes go is the transport's business, behind [`SendBuffers`]
//! (the plain transport's one buffer, sent with a blocking write when full; the
//! io_uring transport's registered pool buffers, which may all be in flight — then
//! staging says so and the worker retries the same command later). Runs go either
//! straight into a buffer ([`frames::stage_run`]: one copy per page, the zero test and
//! the CRC on that copy) or through the codec pipeline into the stream's batch, which
//! is flushed into a buffer when full, before a marker, or when the worker would idle.
//! Every page staged is recorded in the source's CRC table.

use super::frames::{self, stage_marker, stage_space};
use super::rma::{LentLink, RmaPool, rma_stage_space, stage_rma_run};
use super::{TxControl, TxError, WorkerTelemetry};
use crate::codec::{CodecSetup, StreamCodec, WorkerCodec};
use crate::crc_table::CrcTable;
use crate::memory::{GuestMemory, zero_page_crc};
use crate::wire::{FRAME_HEADER_LEN, FrameHeader};
use std::sync::Arc;
use std::time::Instant;

/// Where staged bytes go. Streams are known by their index among the worker's
/// streams (the order of the [`StreamStage`] slice staging is given).
pub(crate) trait SendBuffers {
    /// A writable region of at least `need` bytes at the end of stream `stream`'s
    /// current buffer, or `None` when no buffer has room now.
    fn room(&mut self, stream: usize, need: usize) -> Result<Option<&mut [u8]>, TxError>;

    /// `n` bytes were written at the start of the region [`SendBuffers::room`] gave.
    fn filled(&mut self, stream: usize, n: usize);
}

/// One stream's staging state.
pub(crate) struct StreamStage {
    /// Global stream id.
    pub id: u16,
    /// Codec state, when the session may use codecs.
    codec: Option<StreamCodec>,
    /// Pages staged in the current round.
    pub round_pages: u32,
    /// Pages staged so far.
    pub pages: u64,
    /// Its RMA connection, in a session that writes pages by RMA (none once the
    /// stream was lost).
    rma: Option<LentLink>,
}

impl StreamStage {
    /// Before a send buffer of the stream goes out: every RMA write staged so far must
    /// have been delivered, since the buffer's frames may name its pages.
    pub fn deliver_rma(&mut self) -> Result<(), TxError> {
        match self.rma.as_mut() {
            Some(link) => link
                .deliver()
                .map_err(|e| TxError::from_fabric(self.id, &e)),
            None => Ok(()),
        }
    }

    /// The stream was lost: close its RMA connection for good, so that nothing more of
    /// it lands at the destination.
    pub fn close_rma(&mut self) {
        if let Some(link) = self.rma.take() {
            link.close();
        }
    }

    /// Whether a codec batch is waiting to be flushed.
    pub fn batch_pending(&self) -> bool {
        self.codec.as_ref().is_some_and(|c| c.pending() > 0)
    }
}

/// What a round staged, over a worker's streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RoundCounts {
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Pages sent with content (raw, delta or reference).
    pub content_pages: u64,
    /// Bytes of frames.
    pub bytes: u64,
}

/// A worker's staging state.
pub(crate) struct Stager {
    memory: Arc<GuestMemory>,
    table: Arc<CrcTable>,
    codec: Option<WorkerCodec>,
    codec_setup: Option<CodecSetup>,
    round: RoundCounts,
    /// Bytes staged without codecs, and the time it took.
    staged_bytes: u64,
    stage_nanos: u64,
    /// The session's RMA connections, when it writes pages by RMA.
    rma: Option<Arc<RmaPool>>,
    /// One page, for the zero test and CRC ahead of an RMA write.
    scratch: Box<[u8]>,
    /// The transport waits for RMA delivery itself, before each send buffer goes out
    /// ([`StreamStage::deliver_rma`]); else staging waits after each run.
    deferred_delivery: bool,
}

impl Stager {
    /// Staging from `memory`, recording in `table`, with codecs as `codec` allows.
    pub fn new(memory: Arc<GuestMemory>, table: Arc<CrcTable>, codec: Option<CodecSetup>) -> Self {
        Stager {
            memory,
            table,
            codec: codec.as_ref().map(|setup| {
                let mut c = WorkerCodec::new();
                c.set_settings(setup.permit(setup.initial), std::iter::empty());
                c
            }),
            codec_setup: codec,
            round: RoundCounts::default(),
            staged_bytes: 0,
            stage_nanos: 0,
            rma: None,
            scratch: vec![0u8; crate::memory::PAGE_SIZE].into_boxed_slice(),
            deferred_delivery: false,
        }
    }

    /// The transport calls [`StreamStage::deliver_rma`] before each send buffer goes
    /// out, so runs need not wait for their RMA writes' delivery when staged.
    pub fn defer_rma_delivery(mut self) -> Self {
        self.deferred_delivery = true;
        self
    }

    /// Write runs by RMA through `pool`'s connections where streams have one.
    pub fn with_rma(mut self, pool: Option<Arc<RmaPool>>) -> Self {
        self.rma = pool;
        self
    }

    /// The staging state of stream `id` (with its RMA connection, borrowed from the
    /// session's pool until the stage is dropped).
    pub fn stream(&self, id: u16) -> StreamStage {
        StreamStage {
            id,
            codec: self.codec_setup.as_ref().map(StreamCodec::for_setup),
            round_pages: 0,
            pages: 0,
            rma: self.rma.as_ref().and_then(|pool| pool.take(id)),
        }
    }

    /// Space a send buffer needs beyond the send size: a whole codec batch when the
    /// session may use codecs.
    pub fn max_flush_len(&self) -> usize {
        self.codec_setup.as_ref().map_or(0, |c| c.max_flush_len())
    }

    /// Whether runs go through the codec pipeline now.
    pub fn coding(&self) -> bool {
        self.codec.as_ref().is_some_and(|c| !c.settings().is_off())
    }

    /// Stage pages `first..first + count` on stream `i`; `false` when no buffer has
    /// room (nothing was staged; try the same run again later). When `known_zero`,
    /// the engine knows the pages read as zeros: they are sent as such unread.
    pub fn stage(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
        (first, count): (u64, u32),
        known_zero: bool,
    ) -> Result<bool, TxError> {
        let staged = if known_zero {
            self.stage_known_zero(buffers, streams, i, first, count)?
        } else if self.coding() {
            self.stage_coded(buffers, streams, i, first, count)?
        } else if streams[i].rma.as_ref().is_some_and(LentLink::enabled) {
            self.stage_rma(buffers, streams, i, first, count)?
        } else {
            self.stage_raw(buffers, i, streams[i].id, first, count)?
        };
        if staged {
            streams[i].round_pages += count;
            streams[i].pages += u64::from(count);
        }
        Ok(staged)
    }

    /// Stage a run as it is on stream `i` (global id `id`).
    fn stage_raw(
        &mut self,
        buffers: &mut impl SendBuffers,
        i: usize,
        id: u16,
        first: u64,
        count: u32,
    ) -> Result<bool, TxError> {
        let Some(out) = buffers.room(i, stage_space(count))? else {
            return Ok(false);
        };
        let started = Instant::now();
        let staged = frames::stage_run(
            &self.memory,
            first,
            count,
            out,
            Some(self.table.recorder(id)),
        );
        buffers.filled(i, staged.bytes);
        self.round.zero_pages += u64::from(staged.zero_pages);
        self.round.content_pages += u64::from(staged.raw_pages);
        self.round.bytes += staged.bytes as u64;
        self.staged_bytes += staged.bytes as u64;
        self.stage_nanos += started.elapsed().as_nanos() as u64;
        Ok(true)
    }

    /// Stage a run known to read as zeros on stream `i`, unread (a RAM file's holes:
    /// reading one through the shared mapping would fill it with a new page): one zero
    /// run, in the codec batch while codecs are on (keeping the batch whole), else as a
    /// frame in the buffer. The table records the zero page's CRC for each page.
    fn stage_known_zero(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
        first: u64,
        count: u32,
    ) -> Result<bool, TxError> {
        let coding = self.coding();
        if coding && !self.batch_room(buffers, streams, i, 0)? {
            return Ok(false);
        }
        match (&mut self.codec, &mut streams[i].codec) {
            (Some(codec), Some(batch)) if coding => {
                codec.encode_known_zero(batch, first, count);
            }
            _ => {
                let Some(out) = buffers.room(i, FRAME_HEADER_LEN)? else {
                    return Ok(false);
                };
                let n = stage_marker(FrameHeader::zero_run(first, count), out);
                buffers.filled(i, n);
                self.round.bytes += n as u64;
            }
        }
        let table = self.table.recorder(streams[i].id);
        for page in first..first + u64::from(count) {
            table.record(page, zero_page_crc());
        }
        self.round.zero_pages += u64::from(count);
        Ok(true)
    }

    /// Stage a run on stream `i` through its RMA connection: the pages' bytes are
    /// written into the destination's memory, their frames (CRCs) go in the buffer.
    fn stage_rma(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
        first: u64,
        count: u32,
    ) -> Result<bool, TxError> {
        let id = streams[i].id;
        let Some(link) = streams[i].rma.as_mut() else {
            return self.stage_raw(buffers, i, id, first, count);
        };
        let Some(out) = buffers.room(i, rma_stage_space(count))? else {
            return Ok(false);
        };
        let started = Instant::now();
        let staged = stage_rma_run(
            &self.memory,
            link,
            first,
            count,
            out,
            Some(self.table.recorder(id)),
            &mut self.scratch,
        )
        .map_err(|e| TxError::from_fabric(id, &e))?;
        buffers.filled(i, staged.bytes);
        if !self.deferred_delivery {
            streams[i].deliver_rma()?;
        }
        self.round.zero_pages += u64::from(staged.zero_pages);
        self.round.content_pages += u64::from(staged.rma_pages);
        // What crossed the network for the round: the frames, and the pages' bytes
        // beside them.
        self.round.bytes +=
            staged.bytes as u64 + u64::from(staged.rma_pages) * crate::memory::PAGE_SIZE as u64;
        self.staged_bytes += staged.bytes as u64;
        self.stage_nanos += started.elapsed().as_nanos() as u64;
        Ok(true)
    }

    fn stage_coded(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
        first: u64,
        count: u32,
    ) -> Result<bool, TxError> {
        if !self.batch_room(buffers, streams, i, count)? {
            return Ok(false);
        }
        let id = streams[i].id;
        let (Some(codec), Some(batch)) = (&mut self.codec, &mut streams[i].codec) else {
            return self.stage_raw(buffers, i, id, first, count);
        };
        let run = codec.encode_run(
            batch,
            &self.memory,
            first,
            count,
            Some(self.table.recorder(id)),
        );
        self.round.zero_pages += u64::from(run.zero_pages);
        self.round.content_pages += u64::from(run.content_pages);
        Ok(true)
    }

    /// Make room in stream `i`'s codec batch for a run of `count` pages, flushing the
    /// batch if it would overfill; `false` when it had to be flushed and no buffer had
    /// room for it yet.
    fn batch_room(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
        count: u32,
    ) -> Result<bool, TxError> {
        let full = match (&self.codec, &streams[i].codec) {
            (Some(codec), Some(batch)) => codec.batch_full(batch, count),
            _ => false,
        };
        Ok(!full || self.flush_batch(buffers, streams, i)?)
    }

    /// Move stream `i`'s codec batch into its send buffer; `false` when no buffer has
    /// room for it yet.
    pub fn flush_batch(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
    ) -> Result<bool, TxError> {
        let (Some(codec), Some(batch)) = (&mut self.codec, &mut streams[i].codec) else {
            return Ok(true);
        };
        if batch.pending() == 0 {
            return Ok(true);
        }
        let Some(out) = buffers.room(i, codec.flush_bound(batch))? else {
            return Ok(false);
        };
        let n = codec.flush(batch, out);
        buffers.filled(i, n);
        self.round.bytes += n as u64;
        Ok(true)
    }

    /// Flush every stream's batch; `false` when some could not be flushed yet (every
    /// stream is tried, even after one found no room).
    pub fn flush_all(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
    ) -> Result<bool, TxError> {
        let mut all = true;
        for i in 0..streams.len() {
            all &= self.flush_batch(buffers, streams, i)?;
        }
        Ok(all)
    }

    /// Write `header` (a frame with no payload) on stream `i`, after its batch;
    /// `false` when no buffer has room yet. A round marker carries the pages the stream
    /// staged in the round, and starts the next round's count.
    pub fn marker(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
        header: FrameHeader,
    ) -> Result<bool, TxError> {
        if !self.flush_batch(buffers, streams, i)? {
            return Ok(false);
        }
        let Some(out) = buffers.room(i, FRAME_HEADER_LEN)? else {
            return Ok(false);
        };
        let n = stage_marker(header, out);
        buffers.filled(i, n);
        self.round.bytes += n as u64;
        Ok(true)
    }

    /// Write `header` and its `payload` on stream `i`, after its batch; `false` when no
    /// buffer has room yet.
    pub fn payload_frame(
        &mut self,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
        i: usize,
        header: FrameHeader,
        payload: &[u8],
    ) -> Result<bool, TxError> {
        if !self.flush_batch(buffers, streams, i)? {
            return Ok(false);
        }
        let Some(out) = buffers.room(i, FRAME_HEADER_LEN + payload.len())? else {
            return Ok(false);
        };
        let n = stage_marker(header, out);
        out[n..n + payload.len()].copy_from_slice(payload);
        buffers.filled(i, n + payload.len());
        self.round.bytes += (n + payload.len()) as u64;
        Ok(true)
    }

    /// The end-of-round marker of stream `i` for `round`, with the pages it carried.
    pub fn round_end(round: u64, stream: &StreamStage) -> FrameHeader {
        FrameHeader::round_end(round, stream.round_pages)
    }

    /// Apply the codec part of a configuration change: new settings or dictionary, or
    /// forgetting every page sent (the rest is the transport's). Settings and
    /// forgetting need every batch flushed first: `false` when one could not be
    /// (nothing changed; apply it again later).
    pub fn apply(
        &mut self,
        change: &TxControl,
        buffers: &mut impl SendBuffers,
        streams: &mut [StreamStage],
    ) -> Result<bool, TxError> {
        match change {
            TxControl::SetCodec(settings) => {
                // Batches made under the old settings go out first.
                if !self.flush_all(buffers, streams)? {
                    return Ok(false);
                }
                if let (Some(codec), Some(setup)) = (&mut self.codec, &self.codec_setup) {
                    let batches = streams.iter_mut().filter_map(|s| s.codec.as_mut());
                    codec.set_settings(setup.permit(*settings), batches);
                }
            }
            TxControl::SetDictionary(dictionary) => {
                if let Some(codec) = &mut self.codec {
                    codec.set_dictionary(Some(dictionary.clone()));
                }
            }
            TxControl::ForgetSentPages => {
                // Batches encoded against the caches go out first.
                if !self.flush_all(buffers, streams)? {
                    return Ok(false);
                }
                for s in streams.iter_mut() {
                    if let Some(codec) = &mut s.codec {
                        codec.forget();
                    }
                }
            }
            TxControl::SetIdle(_) | TxControl::SetZeroCopy(_) | TxControl::DropStream(_) => {}
        }
        Ok(true)
    }

    /// What the round staged so far, and start the next round's counts.
    pub fn take_round(&mut self) -> RoundCounts {
        std::mem::take(&mut self.round)
    }

    /// The worker's counters, with `stalled_nanos` from the transport.
    pub fn telemetry(&self, worker: usize, stalled_nanos: u64) -> WorkerTelemetry {
        WorkerTelemetry::new(
            worker,
            self.codec.as_ref(),
            self.staged_bytes,
            self.stage_nanos,
            stalled_nanos,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CodecSettings;
    use crate::transport::frames::{FrameParser, StreamEvent};
    use crate::wire::caps;
    use dwcp_hugepages::PagePreference;

    /// Buffers in memory: one growing byte vector per stream, or none at all.
    struct Collect {
        streams: Vec<Vec<u8>>,
        scratch: Vec<u8>,
        full: bool,
    }

    impl Collect {
        fn new(streams: usize) -> Self {
            Collect {
                streams: vec![Vec::new(); streams],
                scratch: Vec::new(),
                full: false,
            }
        }
    }

    impl SendBuffers for Collect {
        fn room(&mut self, _stream: usize, need: usize) -> Result<Option<&mut [u8]>, TxError> {
            if self.full {
                return Ok(None);
            }
            self.scratch.resize(need.max(2 << 20), 0);
            Ok(Some(&mut self.scratch[..]))
        }

        fn filled(&mut self, stream: usize, n: usize) {
            let bytes = self.scratch[..n].to_vec();
            self.streams[stream].extend_from_slice(&bytes);
        }
    }

    fn memory(pages: u64) -> Arc<GuestMemory> {
        let m = GuestMemory::anonymous(pages as usize * 4096, PagePreference::Small).unwrap();
        for p in 0..pages {
            if p % 4 != 0 {
                m.write_at(p, (p as usize * 13) % 4096, &[p as u8 | 1, 7, 7]);
            }
        }
        Arc::new(m)
    }

    /// Codecs starting at `initial`, with room for everything a test stages.
    fn codecs(initial: CodecSettings) -> CodecSetup {
        CodecSetup {
            cache_bytes_per_stream: 1 << 20,
            max_batch_bytes: 1 << 20,
            max_dictionary_bytes: 0,
            initial,
            capabilities: caps::ALL,
        }
    }

    /// Feed what stream `i` got to a parser writing into fresh memory.
    fn parse(
        bytes: &[u8],
        stream: u16,
        streams: u16,
        pages: u64,
    ) -> (Arc<GuestMemory>, Vec<StreamEvent>) {
        let dest =
            Arc::new(GuestMemory::anonymous(pages as usize * 4096, PagePreference::Small).unwrap());
        let mut parser = FrameParser::new(dest.clone(), stream, streams, true);
        let mut events = Vec::new();
        parser.feed(bytes, &mut |e| events.push(e)).unwrap();
        (dest, events)
    }

    #[test]
    fn runs_and_markers_become_frames_counted_and_recorded() {
        let source = memory(64);
        let table = Arc::new(CrcTable::new(64));
        let mut stager = Stager::new(source.clone(), table.clone(), None);
        let mut stages = vec![stager.stream(0), stager.stream(1)];
        let mut out = Collect::new(2);
        // Chunks 0 and 2 go to stream 0, chunks 1 and 3 to stream 1.
        for chunk in 0..4u64 {
            let i = (chunk % 2) as usize;
            assert!(
                stager
                    .stage(&mut out, &mut stages, i, (chunk * 16, 16), false)
                    .unwrap()
            );
        }
        for i in 0..2 {
            let header = Stager::round_end(0, &stages[i]);
            assert!(stager.marker(&mut out, &mut stages, i, header).unwrap());
        }
        let counts = stager.take_round();
        assert_eq!(counts.zero_pages + counts.content_pages, 64);
        assert_eq!(counts.zero_pages, 16, "every fourth page is zero");
        assert_eq!(
            counts.bytes,
            (out.streams[0].len() + out.streams[1].len()) as u64
        );
        assert_eq!(stages[0].pages, 32);
        assert_eq!(stager.take_round(), RoundCounts::default());
        for (i, bytes) in out.streams.iter().enumerate() {
            let (dest, events) = parse(bytes, i as u16, 2, 64);
            assert_eq!(
                events,
                [StreamEvent::RoundEnd {
                    round: 0,
                    pages: 32
                }]
            );
            let mut a = vec![0u8; 4096];
            let mut b = vec![0u8; 4096];
            for p in (0..64u64).filter(|p| (p / 16) % 2 == i as u64) {
                source.read_page(p, &mut a);
                dest.read_page(p, &mut b);
                assert_eq!(a, b, "page {p}");
                assert_eq!(table.get(p), dwcp_simd::crc32c(&a), "page {p} recorded");
            }
        }
    }

    #[test]
    fn without_room_nothing_is_staged_counted_or_recorded() {
        let source = memory(16);
        let table = Arc::new(CrcTable::new(16));
        let mut stager = Stager::new(source, table.clone(), None);
        let mut stages = vec![stager.stream(0)];
        let mut out = Collect::new(1);
        out.full = true;
        assert!(
            !stager
                .stage(&mut out, &mut stages, 0, (0, 16), false)
                .unwrap()
        );
        assert!(
            !stager
                .marker(&mut out, &mut stages, 0, FrameHeader::stream_end())
                .unwrap()
        );
        assert_eq!(stages[0].pages, 0);
        assert_eq!(stager.take_round(), RoundCounts::default());
        assert_eq!(table.digest(), 0);
    }

    #[test]
    fn coded_runs_wait_in_the_batch_until_a_marker_flushes_it() {
        let source = memory(32);
        let table = Arc::new(CrcTable::new(32));
        let mut stager = Stager::new(source.clone(), table, Some(codecs(CodecSettings::full(1))));
        assert!(stager.coding());
        let mut stages = vec![stager.stream(0)];
        let mut out = Collect::new(1);
        assert!(
            stager
                .stage(&mut out, &mut stages, 0, (0, 16), false)
                .unwrap()
        );
        assert!(
            stager
                .stage(&mut out, &mut stages, 0, (16, 16), false)
                .unwrap()
        );
        assert!(out.streams[0].is_empty(), "still in the batch");
        assert!(stages[0].batch_pending());
        let header = Stager::round_end(0, &stages[0]);
        assert!(stager.marker(&mut out, &mut stages, 0, header).unwrap());
        assert!(!stages[0].batch_pending());
        let (dest, events) = parse(&out.streams[0], 0, 1, 32);
        assert_eq!(
            events,
            [StreamEvent::RoundEnd {
                round: 0,
                pages: 32
            }]
        );
        assert_eq!(dest.first_difference(&source), None);
        // Off: runs go straight into the buffer again.
        let off = TxControl::SetCodec(CodecSettings::OFF);
        assert!(stager.apply(&off, &mut out, &mut stages).unwrap());
        assert!(!stager.coding());
    }

    #[test]
    fn runs_known_to_be_zero_go_as_zeros_unread_with_and_without_codecs() {
        // The source's pages hold content: what arrives as zeros was not read.
        let source = memory(16);
        for codec in [None, Some(CodecSettings::full(1))] {
            let table = Arc::new(CrcTable::new(16));
            let mut stager = Stager::new(source.clone(), table.clone(), codec.map(codecs));
            let mut stages = vec![stager.stream(0)];
            let mut out = Collect::new(1);
            for (run, known_zero) in [((0, 4), false), ((4, 8), true), ((12, 4), false)] {
                assert!(
                    stager
                        .stage(&mut out, &mut stages, 0, run, known_zero)
                        .unwrap()
                );
            }
            let header = Stager::round_end(0, &stages[0]);
            assert!(stager.marker(&mut out, &mut stages, 0, header).unwrap());
            let counts = stager.take_round();
            assert_eq!(counts.zero_pages + counts.content_pages, 16, "{codec:?}");
            let (dest, events) = parse(&out.streams[0], 0, 1, 16);
            assert_eq!(
                events,
                [StreamEvent::RoundEnd {
                    round: 0,
                    pages: 16
                }]
            );
            let page = |memory: &GuestMemory, p| {
                let mut bytes = vec![0u8; 4096];
                memory.read_page(p, &mut bytes);
                bytes
            };
            for p in 0..16u64 {
                let (held, arrived) = (page(&source, p), page(&dest, p));
                if (4..12).contains(&p) {
                    assert!(arrived.iter().all(|&x| x == 0), "page {p} {codec:?}");
                    assert_eq!(table.get(p), crate::memory::zero_page_crc(), "page {p}");
                } else {
                    assert_eq!(held, arrived, "page {p} {codec:?}");
                    assert_eq!(table.get(p), dwcp_simd::crc32c(&held), "page {p}");
                }
            }
        }
    }
}
