//! Codec frames built from arbitrary bytes: deltas, page references, compressed batches
//! and dictionaries with valid headers (so the fuzzer reaches the decoders behind the
//! header checksum) and arbitrary payloads, announced sizes and checksums. The parser
//! must refuse what is malformed without panicking and never write outside guest
//! memory (guarded on both sides, so a stray write crashes the fuzzer).
#![no_main]

use dwcp_dataplane::codec::zstd::{Compressor, compress_bound};
use dwcp_dataplane::memory::PAGE_SIZE;
use dwcp_dataplane::transport::frames::FrameParser;
use dwcp_dataplane::wire::{FRAME_HEADER_LEN, FrameHeader};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::{PAGES, memory};

/// Reads the fuzz input as a little program of frames.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn push(out: &mut Vec<u8>, header: FrameHeader, payload: &[u8]) {
    let mut h = [0u8; FRAME_HEADER_LEN];
    header.encode(&mut h);
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
}

/// A CRC for a page frame: right for `content` or whatever the input says.
fn crc(input: &mut Input, content: Option<&[u8]>) -> [u8; 4] {
    match (input.byte(), content) {
        (Some(b), Some(c)) if b & 1 == 0 => dwcp_simd::crc32c(c).to_le_bytes(),
        (b, _) => [b.unwrap_or(0), 0, 0, 0],
    }
}

/// Frames until the input ends or (inside a batch) an end-of-batch op.
fn frames(input: &mut Input, out: &mut Vec<u8>, depth: u32, compressor: &mut Compressor) {
    let memory = memory();
    while let Some(op) = input.byte() {
        let page = u64::from(input.byte().unwrap_or(0)) % (PAGES + 2);
        match op % 8 {
            0 => push(out, FrameHeader::zero_run(page, u32::from(op >> 3) + 1), &[]),
            1 => {
                let content = input.bytes(PAGE_SIZE).to_vec();
                let mut payload = crc(input, Some(&content)).to_vec();
                payload.extend_from_slice(&content);
                payload.resize(4 + PAGE_SIZE, 0);
                push(out, FrameHeader::raw_pages(page, 1, PAGE_SIZE as u32), &payload);
            }
            2 => {
                let len = usize::from(input.byte().unwrap_or(0)) * 17;
                let delta = input.bytes(len).to_vec();
                // The right CRC is that of the page after decoding, when it decodes.
                let mut result = vec![0u8; PAGE_SIZE];
                if page < PAGES {
                    memory.read_page(page, &mut result);
                }
                let decoded = dwcp_simd::xbzrle_decode(&delta, &mut result).is_ok();
                let mut payload = crc(input, decoded.then_some(&result[..])).to_vec();
                payload.extend_from_slice(&delta);
                push(out, FrameHeader::delta_page(page, delta.len()), &payload);
            }
            3 => {
                let source = u64::from(input.byte().unwrap_or(0));
                let mut content = vec![0u8; PAGE_SIZE];
                if source < PAGES {
                    memory.read_page(source, &mut content);
                }
                let mut payload = source.to_le_bytes().to_vec();
                payload.extend_from_slice(&crc(input, Some(&content)));
                push(out, FrameHeader::page_ref(page), &payload);
            }
            4 if depth < 2 => {
                let mut inner = Vec::new();
                frames(input, &mut inner, depth + 1, compressor);
                // Levels up to 8: the optimal parser of higher levels trips a
                // stack-use-after-scope report inside zstd's compressor under this
                // instrumentation (a local table of function pointers read while in
                // scope); the compressor is only the harness's tool here.
                let level = i32::from(op >> 4) % 13 - 4;
                let mut packed = vec![0u8; compress_bound(inner.len())];
                let Ok(n) = compressor.compress(level, None, &inner, &mut packed) else { continue };
                let announced = match input.byte() {
                    Some(b) if b < 8 => inner.len() as u32 ^ u32::from(b),
                    _ => inner.len() as u32,
                };
                let mut payload = announced.to_le_bytes().to_vec();
                payload.extend_from_slice(&u32::from(op >> 7).to_le_bytes());
                payload.extend_from_slice(&packed[..n]);
                push(out, FrameHeader::compressed(n), &payload);
            }
            5 => {
                let len = usize::from(input.byte().unwrap_or(0)) * 8 + 8;
                let dictionary = input.bytes(len).to_vec();
                push(out, FrameHeader::dictionary(u32::from(op >> 3) + 1, dictionary.len()), &dictionary);
            }
            6 => {
                let len = page as usize;
                out.extend_from_slice(input.bytes(len));
            }
            _ if depth > 0 => return,
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, program)) = data.split_first() else { return };
    let streams = u16::from(shape & 3) + 1;
    let stream = u16::from(shape >> 2 & 3) % streams;
    let mut compressor = Compressor::new();
    let mut wire = Vec::new();
    frames(&mut Input(program), &mut wire, 0, &mut compressor);
    let piece = usize::from(shape >> 4) * 509 + 1;
    let mut parser = FrameParser::new(memory(), stream, streams, false);
    for part in wire.chunks(piece) {
        if parser.feed(part, &mut |_| {}).is_err() {
            return;
        }
    }
});
