//! XOR of one buffer into another (`dst ^= src`) or of two into a third
//! (`out = a ^ b`): the building block of delta encodings.

pub(crate) fn xor_into_scalar(dst: &mut [u8], src: &[u8]) {
    let (d_words, d_tail) = dst.as_chunks_mut::<8>();
    let (s_words, s_tail) = src.as_chunks::<8>();
    for (d, s) in d_words.iter_mut().zip(s_words) {
        *d = (u64::from_ne_bytes(*d) ^ u64::from_ne_bytes(*s)).to_ne_bytes();
    }
    for (d, s) in d_tail.iter_mut().zip(s_tail) {
        *d ^= s;
    }
}

pub(crate) fn xor_to_scalar(out: &mut [u8], a: &[u8], b: &[u8]) {
    let (o_words, o_tail) = out.as_chunks_mut::<8>();
    let (a_words, a_tail) = a.as_chunks::<8>();
    let (b_words, b_tail) = b.as_chunks::<8>();
    for ((o, a), b) in o_words.iter_mut().zip(a_words).zip(b_words) {
        *o = (u64::from_ne_bytes(*a) ^ u64::from_ne_bytes(*b)).to_ne_bytes();
    }
    for ((o, a), b) in o_tail.iter_mut().zip(a_tail).zip(b_tail) {
        *o = a ^ b;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Generates the pair of XOR kernels for one register width.
    macro_rules! xor_kernels {
        ($into:ident, $to:ident, $features:literal, $width:literal,
         $load:ident, $store:ident, $xor:ident, $lower_into:path, $lower_to:path) => {
            #[target_feature(enable = $features)]
            pub(crate) fn $into(dst: &mut [u8], src: &[u8]) {
                let (d_blocks, d_tail) = dst.as_chunks_mut::<$width>();
                let (s_blocks, s_tail) = src.as_chunks::<$width>();
                for (d, s) in d_blocks.iter_mut().zip(s_blocks) {
                    // SAFETY: `d` and `s` are arrays of exactly one register's width;
                    // the accesses are unaligned.
                    unsafe {
                        let v = $xor($load(d.as_ptr().cast()), $load(s.as_ptr().cast()));
                        $store(d.as_mut_ptr().cast(), v);
                    }
                }
                $lower_into(d_tail, s_tail);
            }

            #[target_feature(enable = $features)]
            pub(crate) fn $to(out: &mut [u8], a: &[u8], b: &[u8]) {
                let (o_blocks, o_tail) = out.as_chunks_mut::<$width>();
                let (a_blocks, a_tail) = a.as_chunks::<$width>();
                let (b_blocks, b_tail) = b.as_chunks::<$width>();
                for ((o, a), b) in o_blocks.iter_mut().zip(a_blocks).zip(b_blocks) {
                    // SAFETY: `o`, `a` and `b` are arrays of exactly one register's
                    // width; the accesses are unaligned.
                    unsafe {
                        let v = $xor($load(a.as_ptr().cast()), $load(b.as_ptr().cast()));
                        $store(o.as_mut_ptr().cast(), v);
                    }
                }
                $lower_to(o_tail, a_tail, b_tail);
            }
        };
    }

    // The tails of each width go to the next narrower one.
    xor_kernels!(
        xor_into_sse42,
        xor_to_sse42,
        "sse4.2",
        16,
        _mm_loadu_si128,
        _mm_storeu_si128,
        _mm_xor_si128,
        super::xor_into_scalar,
        super::xor_to_scalar
    );
    xor_kernels!(
        xor_into_avx2,
        xor_to_avx2,
        "sse4.2,avx2",
        32,
        _mm256_loadu_si256,
        _mm256_storeu_si256,
        _mm256_xor_si256,
        xor_into_sse42,
        xor_to_sse42
    );
    xor_kernels!(
        xor_into_avx512,
        xor_to_avx512,
        "sse4.2,avx2,avx512f",
        64,
        _mm512_loadu_si512,
        _mm512_storeu_si512,
        _mm512_xor_si512,
        xor_into_avx2,
        xor_to_avx2
    );
}
