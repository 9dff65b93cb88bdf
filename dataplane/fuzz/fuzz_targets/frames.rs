//! Arbitrary bytes as a data stream: the frame decoder and parser must reject what is
//! malformed without panicking, and never write outside guest memory (which sits
//! between inaccessible guard regions, so a stray write crashes the fuzzer).
#![no_main]

use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_dataplane::transport::frames::FrameParser;
use dwcp_hugepages::PagePreference;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const PAGES: u64 = 64;

fn memory() -> Arc<GuestMemory> {
    static MEMORY: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    MEMORY
        .get_or_init(|| {
            Arc::new(GuestMemory::anonymous(PAGES as usize * PAGE_SIZE, PagePreference::Small).expect("memory"))
        })
        .clone()
}

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
