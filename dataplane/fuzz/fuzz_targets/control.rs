//! Arbitrary bytes as a control message: validation must refuse garbage without
//! panicking, and an accepted handshake must validate cleanly or with an error.
#![no_main]

use dwcp_dataplane::wire::{self, ControlMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    if let Ok(ControlMessage::Hello(h)) = wire::read_control(&mut input) {
        let _ = h.validate(None);
    }
});
