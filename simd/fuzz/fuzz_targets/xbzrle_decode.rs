//! Arbitrary bytes into the XBZRLE decoder: it must never panic, never touch memory
//! outside the page, and whatever it accepts must re-encode to a valid delta.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First two bytes pick the page length (1..=8192), the rest is the encoded input.
    let (len_bytes, encoded) = data.split_at(data.len().min(2));
    let page_len = match len_bytes {
        [a, b] => (usize::from(*a) << 8 | usize::from(*b)) % 8192 + 1,
        _ => 4096,
    };
    const GUARD: usize = 64;
    let mut backing = vec![0xA5u8; page_len + 2 * GUARD];
    let old = backing[GUARD..GUARD + page_len].to_vec();
    let result = dwcp_simd::xbzrle_decode(encoded, &mut backing[GUARD..GUARD + page_len]);
    assert!(backing[..GUARD].iter().all(|&b| b == 0xA5), "wrote before the page");
    assert!(backing[GUARD + page_len..].iter().all(|&b| b == 0xA5), "wrote after the page");
    if result.is_ok() {
        // An accepted input describes the change from `old` to the decoded page; our
        // encoder must produce something that decodes to the same page.
        let new = &backing[GUARD..GUARD + page_len];
        let mut out = vec![0u8; 2 * page_len + 16];
        let n = dwcp_simd::xbzrle_encode(&old, new, &mut out).expect("fits in twice the page");
        let mut again = old.clone();
        dwcp_simd::xbzrle_decode(&out[..n], &mut again).expect("our own encoding decodes");
        assert_eq!(&again[..], new);
    }
});
