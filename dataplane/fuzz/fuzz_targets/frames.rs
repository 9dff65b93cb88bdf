//! Arbitrary bytes as a data stream: the frame decoder and parser must reject what is
//! malformed without panicking, and never write outside guest memory (which sits
//! between inaccessible guard regions, so a stray write crashes the fuzzer).
#![no_main]

use dwcp_dataplane::transport::frames::FrameParser;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::memory;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the stream layout and how the bytes are split into pieces.
    let Some((&shape, bytes)) = data.split_first() else { return };
    let streams = u16::from(shape & 3) + 1;
    let stream = u16::from(shape >> 2 & 3) % streams;
    let piece = usize::from(shape >> 4) * 97 + 1;
    let mut parser = FrameParser::new(memory(), stream, streams, shape & 0x80 != 0);
    for part in bytes.chunks(piece) {
        if parser.feed(part, &mut |_| {}).is_err() {
            return;
        }
    }
});
