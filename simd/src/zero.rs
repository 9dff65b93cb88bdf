//! Zero-page test with early exit: a page whose bytes are all zero is sent as a marker
//! with no payload, so this runs on every page of every round.
//!
//! Every path ORs a block of registers together and tests the result once per block,
//! so a non-zero page is rejected within its first block and a zero page is read at
//! memory speed.

pub(crate) fn is_zero_scalar(data: &[u8]) -> bool {
    let (blocks, tail) = data.as_chunks::<64>();
    for block in blocks {
        let (words, _) = block.as_chunks::<8>();
        let acc = words
            .iter()
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(*w));
        if acc != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    #[inline]
    fn load128(chunk: &[u8; 16]) -> __m128i {
        // SAFETY: `chunk` is 16 readable bytes; the load is unaligned.
        unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) }
    }

    #[target_feature(enable = "sse4.2")]
    pub(crate) fn is_zero_sse42(data: &[u8]) -> bool {
        let (blocks, tail) = data.as_chunks::<64>();
        for block in blocks {
            let (c, _) = block.as_chunks::<16>();
            let acc = _mm_or_si128(
                _mm_or_si128(load128(&c[0]), load128(&c[1])),
                _mm_or_si128(load128(&c[2]), load128(&c[3])),
            );
            if _mm_testz_si128(acc, acc) == 0 {
                return false;
            }
        }
        super::is_zero_scalar(tail)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn load256(chunk: &[u8; 32]) -> __m256i {
        // SAFETY: `chunk` is 32 readable bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }
    }

    #[target_feature(enable = "sse4.2,avx2")]
    pub(crate) fn is_zero_avx2(data: &[u8]) -> bool {
        let (blocks, tail) = data.as_chunks::<256>();
        for block in blocks {
            let (c, _) = block.as_chunks::<32>();
            let a = _mm256_or_si256(
                _mm256_or_si256(load256(&c[0]), load256(&c[1])),
                _mm256_or_si256(load256(&c[2]), load256(&c[3])),
            );
            let b = _mm256_or_si256(
                _mm256_or_si256(load256(&c[4]), load256(&c[5])),
                _mm256_or_si256(load256(&c[6]), load256(&c[7])),
            );
            let acc = _mm256_or_si256(a, b);
            if _mm256_testz_si256(acc, acc) == 0 {
                return false;
            }
        }
        is_zero_sse42(tail)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load512(chunk: &[u8; 64]) -> __m512i {
        // SAFETY: `chunk` is 64 readable bytes; the load is unaligned.
        unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) }
    }

    #[target_feature(enable = "sse4.2,avx2,avx512f,avx512bw")]
    pub(crate) fn is_zero_avx512(data: &[u8]) -> bool {
        let (blocks, tail) = data.as_chunks::<256>();
        for block in blocks {
            let (c, _) = block.as_chunks::<64>();
            // 0xFE: a | b | c.
            let acc =
                _mm512_ternarylogic_epi64(load512(&c[0]), load512(&c[1]), load512(&c[2]), 0xFE);
            let acc = _mm512_or_si512(acc, load512(&c[3]));
            if _mm512_test_epi64_mask(acc, acc) != 0 {
                return false;
            }
        }
        is_zero_avx2(tail)
    }
}
