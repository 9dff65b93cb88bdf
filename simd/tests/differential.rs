//! Every SIMD level against the scalar reference, on random data, sparse and clustered
//! edits, all-zero and all-equal pages, unaligned buffers and odd lengths.

use dwcp_simd::{
    Kernels, SimdLevel, XbzrleOverflow, crc32c_reference, xbzrle_decode, xbzrle_encode_reference,
};
use proptest::prelude::*;
use std::io::Write;

fn levels() -> Vec<&'static Kernels> {
    let levels: Vec<_> = SimdLevel::supported()
        .into_iter()
        .filter_map(Kernels::for_level)
        .collect();
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        for missing in SimdLevel::ALL.iter().filter(|l| !l.is_supported()) {
            // Past the harness's capture, so the skip is seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: SIMD level {missing} not supported by this CPU; its paths are untested here"
            );
        }
    });
    levels
}

/// A buffer of `len` bytes starting `offset` bytes into its allocation, so that SIMD
/// loads see every alignment.
fn unaligned(bytes: &[u8], offset: usize) -> (Vec<u8>, std::ops::Range<usize>) {
    let mut backing = vec![0xA5u8; bytes.len() + offset + 64];
    backing[offset..offset + bytes.len()].copy_from_slice(bytes);
    (backing, offset..offset + bytes.len())
}

#[derive(Debug, Clone)]
enum Edit {
    Sparse(Vec<(usize, u8)>),
    Clustered(Vec<(usize, usize, u8)>),
    Random,
    None,
}

/// Page pairs of the kinds a migration sees.
fn page_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let len = prop_oneof![Just(4096usize), 1usize..300, 4000usize..4200];
    len.prop_flat_map(|len| {
        let old = prop_oneof![
            prop::collection::vec(any::<u8>(), len),
            Just(vec![0u8; len]),
            any::<u8>().prop_map(move |b| vec![b; len]),
        ];
        let edit = prop_oneof![
            prop::collection::vec((0..len, any::<u8>()), 0..len / 20 + 2).prop_map(Edit::Sparse),
            prop::collection::vec((0..len, 1..200usize, any::<u8>()), 0..6)
                .prop_map(Edit::Clustered),
            Just(Edit::Random),
            Just(Edit::None),
        ];
        (old, edit, any::<u64>())
    })
    .prop_map(|(old, edit, seed)| {
        let mut new = old.clone();
        match edit {
            Edit::Sparse(points) => {
                for (i, v) in points {
                    new[i] = v;
                }
            }
            Edit::Clustered(runs) => {
                for (start, len, v) in runs {
                    for (k, byte) in new.iter_mut().skip(start).take(len).enumerate() {
                        *byte = v.wrapping_add(k as u8);
                    }
                }
            }
            Edit::Random => {
                let mut x = seed | 1;
                for byte in new.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *byte = x as u8;
                }
            }
            Edit::None => {}
        }
        (old, new)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn crc32c_matches_reference(data in prop::collection::vec(any::<u8>(), 0..10_000), offset in 0usize..64, split in any::<prop::sample::Index>()) {
        let (buf, range) = unaligned(&data, offset);
        let want = crc32c_reference(&data);
        let cut = split.index(data.len() + 1);
        for k in levels() {
            prop_assert_eq!(k.crc32c(&buf[range.clone()]), want, "level {}", k.level());
            let first = k.crc32c(&data[..cut]);
            prop_assert_eq!(k.crc32c_update(first, &data[cut..]), want, "update, level {}", k.level());
        }
    }

    #[test]
    fn zero_test_matches_scalar(len in 0usize..9000, offset in 0usize..64, poke in prop::option::of((any::<prop::sample::Index>(), 1u8..=255))) {
        let mut data = vec![0u8; len];
        if let (Some((at, v)), false) = (poke, data.is_empty()) {
            data[at.index(len)] = v;
        }
        let (buf, range) = unaligned(&data, offset);
        let want = data.iter().all(|&b| b == 0);
        for k in levels() {
            prop_assert_eq!(k.is_zero(&buf[range.clone()]), want, "level {}", k.level());
        }
    }

    #[test]
    fn xor_matches_scalar(a in prop::collection::vec(any::<u8>(), 0..5000), seed in any::<u8>(), offset in 0usize..64) {
        let b: Vec<u8> = a.iter().enumerate().map(|(i, x)| x.rotate_left(3) ^ seed ^ i as u8).collect();
        let want: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x ^ y).collect();
        for k in levels() {
            let (mut dst, range) = unaligned(&a, offset);
            k.xor_into(&mut dst[range.clone()], &b);
            prop_assert_eq!(&dst[range.clone()], &want[..], "xor_into, level {}", k.level());
            let mut out = vec![0u8; a.len() + offset];
            k.xor_to(&mut out[offset..], &a, &b);
            prop_assert_eq!(&out[offset..], &want[..], "xor_to, level {}", k.level());
        }
    }

    #[test]
    fn xbzrle_encode_matches_reference_and_round_trips((old, new) in page_pair(), offset in 0usize..64, limit_cut in 0usize..64) {
        let mut want = vec![0u8; 2 * old.len() + 16];
        let want_len = xbzrle_encode_reference(&old, &new, &mut want).unwrap();
        let (old_buf, old_range) = unaligned(&old, offset);
        let (new_buf, new_range) = unaligned(&new, (offset * 7) % 64);
        for k in levels() {
            let mut out = vec![0u8; 2 * old.len() + 16];
            let n = k.xbzrle_encode(&old_buf[old_range.clone()], &new_buf[new_range.clone()], &mut out).unwrap();
            prop_assert_eq!(&out[..n], &want[..want_len], "level {}", k.level());
            let mut page = old.clone();
            xbzrle_decode(&out[..n], &mut page).unwrap();
            prop_assert_eq!(&page, &new);

            // A limit one short of the encoding overflows; the exact limit fits.
            if want_len > 0 {
                let limit = want_len.saturating_sub(1 + limit_cut);
                let mut small = vec![0u8; limit];
                prop_assert_eq!(k.xbzrle_encode(&old, &new, &mut small), Err(XbzrleOverflow { limit }));
                let mut exact = vec![0u8; want_len];
                prop_assert_eq!(k.xbzrle_encode(&old, &new, &mut exact), Ok(want_len));
            }
        }
    }

    #[test]
    fn xbzrle_decoder_never_writes_outside_the_page(input in prop::collection::vec(any::<u8>(), 0..64), page_len in 1usize..5000) {
        // Guard bytes on both sides of the page must survive any input.
        let mut backing = vec![0x5Au8; page_len + 128];
        let _ = xbzrle_decode(&input, &mut backing[64..64 + page_len]);
        prop_assert!(backing[..64].iter().all(|&b| b == 0x5A));
        prop_assert!(backing[64 + page_len..].iter().all(|&b| b == 0x5A));
    }
}
