//! A data stream of an authenticated session: sealed records, opened, then parsed.
//! Half the inputs are raw bytes to the record layer (reassembly, lengths, numbers:
//! nothing may panic or reach the parser unauthenticated); the other half are frames
//! sealed with the stream's key into records of fuzzed sizes, one byte optionally
//! flipped on the way, so the fuzzer also reaches the frame parser behind the opener.
#![no_main]

use dwcp_dataplane::security::SessionKeys;
use dwcp_dataplane::security::records::{RECORD_HEADER, RECORD_TAG};
use dwcp_dataplane::transport::Inbound;
use dwcp_dataplane::transport::frames::FrameParser;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

#[path = "common.rs"]
mod common;
use common::memory;

fn keys() -> Arc<SessionKeys> {
    static KEYS: OnceLock<Arc<SessionKeys>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let keys = SessionKeys::derive(2, |_, context, out| {
            for (i, b) in out.iter_mut().enumerate() {
                *b = i as u8 ^ context[0];
            }
            Ok::<(), ()>(())
        })
        .expect("keys");
        Arc::new(keys)
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, bytes)) = data.split_first() else { return };
    let keys = keys();
    let parser = FrameParser::new(memory(), 0, 1, shape & 0x40 != 0);
    let mut inbound = Inbound::new(Some(keys.opener(0)), parser);
    let piece = usize::from(shape & 0x0f) * 61 + 1;
    let wire: Vec<u8> = if shape & 0x80 == 0 {
        bytes.to_vec()
    } else {
        // Seal the bytes as frames, in records of a size the input picks.
        let record = usize::from(shape >> 4 & 3) * 4096 + 512;
        let mut sealer = keys.sealer(0);
        let mut wire = Vec::new();
        for plain in bytes.chunks(record) {
            let mut buf = vec![0u8; RECORD_HEADER + plain.len() + RECORD_TAG];
            buf[RECORD_HEADER..RECORD_HEADER + plain.len()].copy_from_slice(plain);
            let n = sealer.seal(&mut buf, RECORD_HEADER + plain.len());
            wire.extend_from_slice(&buf[..n]);
        }
        if shape & 0x20 != 0 && !wire.is_empty() {
            let at = usize::from(bytes.first().copied().unwrap_or(0)) * 131 % wire.len();
            wire[at] ^= 1;
        }
        wire
    };
    for part in wire.chunks(piece) {
        if inbound.feed(part, &mut |_| {}).is_err() {
            return;
        }
    }
    let _ = inbound.at_eof();
});
