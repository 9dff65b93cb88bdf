//! CRC32C (Castagnoli, iSCSI): polynomial 0x1EDC6F41, reflected, init and final XOR
//! `0xFFFF_FFFF`; check value `crc32c(b"123456789") == 0xE306_9283` (RFC 3720, B.4).
//!
//! Paths:
//! - scalar: slicing-by-8 tables;
//! - SSE4.2: the `crc32` instruction over three interleaved streams, whose partial CRCs
//!   are recombined with one carry-less multiply each (Intel, "Fast CRC Computation for
//!   iSCSI Polynomial Using CRC32 Instruction", 2011);
//! - AVX2: PCLMULQDQ folding of 128-bit lanes, eight accumulators (Intel, "Fast CRC
//!   Computation for Generic Polynomials Using PCLMULQDQ Instruction", 2009);
//! - AVX-512: the same folding on 512-bit registers with VPCLMULQDQ.
//!
//! The folding paths end with the `crc32` instruction applied to the last 128-bit
//! remainder, which reduces it modulo P without Barrett constants.
//!
//! Internally everything works on the *raw register* (`!crc`); the public functions take
//! and return finished CRC values so that `crc32c_update(crc32c(a), b) == crc32c(a ‖ b)`.

use crate::SimdLevel;

/// The generator polynomial without its x^32 term, bit d = coefficient of x^d.
const POLY: u32 = 0x1EDC_6F41;

/// `a·b mod P` for polynomials in normal bit order (bit d = coefficient of x^d).
const fn mul_mod(a: u32, b: u32) -> u32 {
    let mut acc = 0u32;
    let mut bit = 32;
    // Horner over b's bits, highest first: acc = acc·x + b_i·a.
    while bit > 0 {
        bit -= 1;
        let carry = acc >> 31;
        acc <<= 1;
        if carry == 1 {
            acc ^= POLY;
        }
        if (b >> bit) & 1 == 1 {
            acc ^= a;
        }
    }
    acc
}

/// `x^n mod P`, normal bit order.
const fn x_pow_mod(n: u64) -> u32 {
    let mut result = 1u32; // x^0
    let mut base = 2u32; // x^1
    let mut n = n;
    while n > 0 {
        if n & 1 == 1 {
            result = mul_mod(result, base);
        }
        base = mul_mod(base, base);
        n >>= 1;
    }
    result
}

/// Multiply a reflected 32-bit polynomial by `x^n` modulo P (advance a register over
/// `n` zero bits).
fn shift_reflected(reg: u32, n_bits: u64) -> u32 {
    mul_mod(reg.reverse_bits(), x_pow_mod(n_bits)).reverse_bits()
}

/// CRC of `A ‖ B` from `crc32c(A)`, `crc32c(B)` and `B.len()`.
///
/// With init and final XOR both `!0`, the register of `A ‖ B` is
/// `reg(A)·x^(8|B|) + reg(B) + !0·x^(8|B|)`, which in finished values is
/// `crc(A)·x^(8|B|) + crc(B)`.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    shift_reflected(crc_a, len_b.saturating_mul(8)) ^ crc_b
}

/// Many combines with the same second length (one page, say): the shift by
/// `x^(8·len)` is computed once instead of per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc32cCombiner {
    /// `x^(8·len_b) mod P`, normal bit order.
    shift: u32,
}

impl Crc32cCombiner {
    /// A combiner for second parts of `len_b` bytes.
    pub fn new(len_b: u64) -> Self {
        Crc32cCombiner {
            shift: x_pow_mod(len_b.saturating_mul(8)),
        }
    }

    /// CRC of `A ‖ B` from `crc32c(A)` and `crc32c(B)`, where B has the length given
    /// to [`Crc32cCombiner::new`].
    #[inline]
    pub fn combine(&self, crc_a: u32, crc_b: u32) -> u32 {
        mul_mod(crc_a.reverse_bits(), self.shift).reverse_bits() ^ crc_b
    }
}

/// Bit-by-bit CRC32C, the definition itself; used to test the table and SIMD paths.
pub fn crc32c_reference(data: &[u8]) -> u32 {
    let reflected_poly = POLY.reverse_bits();
    let mut reg = !0u32;
    for &byte in data {
        reg ^= u32::from(byte);
        for _ in 0..8 {
            reg = if reg & 1 == 1 {
                (reg >> 1) ^ reflected_poly
            } else {
                reg >> 1
            };
        }
    }
    !reg
}

const fn slicing_tables() -> [[u32; 256]; 8] {
    let reflected_poly = POLY.reverse_bits();
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut reg = i as u32;
        let mut k = 0;
        while k < 8 {
            reg = if reg & 1 == 1 {
                (reg >> 1) ^ reflected_poly
            } else {
                reg >> 1
            };
            k += 1;
        }
        tables[0][i] = reg;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[t - 1][i];
            tables[t][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
}

static TABLES: [[u32; 256]; 8] = slicing_tables();

/// Raw-register update, slicing-by-8.
pub(crate) fn raw_update_scalar(mut reg: u32, data: &[u8]) -> u32 {
    let (words, tail) = data.as_chunks::<8>();
    for w in words {
        let lo = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ reg;
        let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        reg = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][(hi & 0xff) as usize]
            ^ TABLES[2][((hi >> 8) & 0xff) as usize]
            ^ TABLES[1][((hi >> 16) & 0xff) as usize]
            ^ TABLES[0][(hi >> 24) as usize];
    }
    for &b in tail {
        reg = (reg >> 8) ^ TABLES[0][((reg ^ u32::from(b)) & 0xff) as usize];
    }
    reg
}

/// Continue a CRC over more data at the given level.
///
/// # Panics
/// If `level` is not supported by this CPU (see [`SimdLevel::is_supported`]).
pub fn crc32c_update_at(level: SimdLevel, crc: u32, data: &[u8]) -> u32 {
    !(crate::Kernels::for_level(level)
        .unwrap_or_else(|| panic!("SIMD level {level} is not supported by this CPU"))
        .crc32c_raw)(!crc, data)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The x86-64 paths. Constants are computed at compile time from [`super::x_pow_mod`],
    //! so each one is the documented power of x and nothing is copied from a table.

    use super::x_pow_mod;
    use std::arch::x86_64::*;

    /// Carry-less multiply constant for the 3-way recombination: shifting a register
    /// forward by `n` bits is `clmul(reg, x^(n-33))` followed by `crc32(0, ·)`, because
    /// the 32×32 product of reflected operands carries one spare factor x and the
    /// instruction multiplies by x^32.
    const fn shift_constant(n_bits: u64) -> u64 {
        x_pow_mod(n_bits - 33).reverse_bits() as u64
    }

    /// Fold constants for moving a 128-bit lane `distance_bits` forward: the low
    /// quadword (the lane's high-order half) needs x^(64+D), the high one x^D, each
    /// divided by the spare x of a reflected 64×64 product.
    const fn fold_constants(distance_bits: u64) -> (i64, i64) {
        (
            (x_pow_mod(63 + distance_bits) as u64).reverse_bits() as i64,
            (x_pow_mod(distance_bits - 1) as u64).reverse_bits() as i64,
        )
    }

    #[inline]
    fn load128(chunk: &[u8; 16]) -> __m128i {
        // SAFETY: `chunk` is 16 readable bytes; the load is unaligned.
        unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) }
    }

    /// Single-stream `crc32` instruction over any length.
    #[target_feature(enable = "sse4.2")]
    fn crc32_instr(mut reg: u32, data: &[u8]) -> u32 {
        let (words, tail) = data.as_chunks::<8>();
        let mut reg64 = u64::from(reg);
        for w in words {
            reg64 = _mm_crc32_u64(reg64, u64::from_le_bytes(*w));
        }
        reg = reg64 as u32;
        for &b in tail {
            reg = _mm_crc32_u8(reg, b);
        }
        reg
    }

    /// Three interleaved `crc32` streams over `3 * BLOCK` bytes, recombined.
    #[target_feature(enable = "sse4.2,pclmulqdq")]
    fn three_way<const BLOCK: usize>(reg: u32, chunk: &[u8], k_a: u64, k_b: u64) -> u32 {
        debug_assert_eq!(chunk.len(), 3 * BLOCK);
        let (a, rest) = chunk.split_at(BLOCK);
        let (b, c) = rest.split_at(BLOCK);
        let (a, _) = a.as_chunks::<8>();
        let (b, _) = b.as_chunks::<8>();
        let (c, _) = c.as_chunks::<8>();
        let (mut ra, mut rb, mut rc) = (u64::from(reg), 0u64, 0u64);
        for i in 0..BLOCK / 8 {
            ra = _mm_crc32_u64(ra, u64::from_le_bytes(a[i]));
            rb = _mm_crc32_u64(rb, u64::from_le_bytes(b[i]));
            rc = _mm_crc32_u64(rc, u64::from_le_bytes(c[i]));
        }
        // reg(A‖B‖C) = ra·x^(16·BLOCK) + rb·x^(8·BLOCK) + rc
        let prod_a = _mm_clmulepi64_si128(
            _mm_cvtsi64_si128(ra as i64),
            _mm_cvtsi64_si128(k_a as i64),
            0x00,
        );
        let prod_b = _mm_clmulepi64_si128(
            _mm_cvtsi64_si128(rb as i64),
            _mm_cvtsi64_si128(k_b as i64),
            0x00,
        );
        let folded = _mm_cvtsi128_si64(_mm_xor_si128(prod_a, prod_b)) as u64;
        (_mm_crc32_u64(0, folded) ^ rc) as u32
    }

    const LONG_BLOCK: usize = 1024;
    const SHORT_BLOCK: usize = 128;
    const LONG_K: (u64, u64) = (
        shift_constant(16 * LONG_BLOCK as u64),
        shift_constant(8 * LONG_BLOCK as u64),
    );
    const SHORT_K: (u64, u64) = (
        shift_constant(16 * SHORT_BLOCK as u64),
        shift_constant(8 * SHORT_BLOCK as u64),
    );

    /// SSE4.2 level: three `crc32` streams in parallel.
    #[target_feature(enable = "sse4.2,pclmulqdq")]
    pub(crate) fn raw_update_sse42(mut reg: u32, mut data: &[u8]) -> u32 {
        while data.len() >= 3 * LONG_BLOCK {
            let (chunk, rest) = data.split_at(3 * LONG_BLOCK);
            reg = three_way::<LONG_BLOCK>(reg, chunk, LONG_K.0, LONG_K.1);
            data = rest;
        }
        while data.len() >= 3 * SHORT_BLOCK {
            let (chunk, rest) = data.split_at(3 * SHORT_BLOCK);
            reg = three_way::<SHORT_BLOCK>(reg, chunk, SHORT_K.0, SHORT_K.1);
            data = rest;
        }
        crc32_instr(reg, data)
    }

    /// Fold `acc` forward over `distance` (given as its constants) and add `next`.
    #[target_feature(enable = "sse4.2,pclmulqdq")]
    #[inline]
    fn fold128(acc: __m128i, k: __m128i, next: __m128i) -> __m128i {
        let lo = _mm_clmulepi64_si128(acc, k, 0x00);
        let hi = _mm_clmulepi64_si128(acc, k, 0x11);
        _mm_xor_si128(_mm_xor_si128(lo, hi), next)
    }

    /// Reduce a 128-bit remainder `X` to `X·x^32 mod P` with two `crc32` instructions.
    #[target_feature(enable = "sse4.2")]
    #[inline]
    fn reduce128(x: __m128i) -> u32 {
        let lo = _mm_cvtsi128_si64(x) as u64;
        let hi = _mm_extract_epi64::<1>(x) as u64;
        _mm_crc32_u64(_mm_crc32_u64(0, lo), hi) as u32
    }

    const fn fold_vector128(distance_bits: u64) -> [i64; 2] {
        let (lo, hi) = fold_constants(distance_bits);
        [lo, hi]
    }

    const K128: [i64; 2] = fold_vector128(128);
    const K256: [i64; 2] = fold_vector128(256);
    const K384: [i64; 2] = fold_vector128(384);
    const K512: [i64; 2] = fold_vector128(512);
    const K640: [i64; 2] = fold_vector128(640);
    const K768: [i64; 2] = fold_vector128(768);
    const K896: [i64; 2] = fold_vector128(896);
    const K1024: [i64; 2] = fold_vector128(1024);
    const K1536: [i64; 2] = fold_vector128(1536);
    const K2048: [i64; 2] = fold_vector128(2048);

    #[target_feature(enable = "sse2")]
    #[inline]
    fn k128(pair: [i64; 2]) -> __m128i {
        _mm_set_epi64x(pair[1], pair[0])
    }

    /// Fold 16-byte chunks one at a time into `acc`, then reduce and finish the tail.
    #[target_feature(enable = "sse4.2,pclmulqdq")]
    fn finish128(mut acc: __m128i, data: &[u8]) -> u32 {
        let (chunks, tail) = data.as_chunks::<16>();
        let k = k128(K128);
        for c in chunks {
            acc = fold128(acc, k, load128(c));
        }
        crc32_instr(reduce128(acc), tail)
    }

    /// AVX2 level: PCLMULQDQ folding with eight 128-bit accumulators (128 bytes a step).
    #[target_feature(enable = "sse4.2,pclmulqdq,avx2")]
    pub(crate) fn raw_update_avx2(reg: u32, data: &[u8]) -> u32 {
        if data.len() < 256 {
            return raw_update_sse42(reg, data);
        }
        let (blocks, rest) = data.as_chunks::<128>();
        let lanes = |b: &[u8; 128]| -> [__m128i; 8] {
            let (c, _) = b.as_chunks::<16>();
            [
                load128(&c[0]),
                load128(&c[1]),
                load128(&c[2]),
                load128(&c[3]),
                load128(&c[4]),
                load128(&c[5]),
                load128(&c[6]),
                load128(&c[7]),
            ]
        };
        let mut acc = lanes(&blocks[0]);
        acc[0] = _mm_xor_si128(acc[0], _mm_cvtsi32_si128(reg as i32));
        let k = k128(K1024);
        for b in &blocks[1..] {
            let next = lanes(b);
            for i in 0..8 {
                acc[i] = fold128(acc[i], k, next[i]);
            }
        }
        // Fold the eight lanes into the last one, each by its distance from it.
        let mut x = acc[7];
        for (lane, kd) in acc[..7]
            .iter()
            .zip([K896, K768, K640, K512, K384, K256, K128])
        {
            x = fold128(*lane, k128(kd), x);
        }
        finish128(x, rest)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load512(chunk: &[u8; 64]) -> __m512i {
        // SAFETY: `chunk` is 64 readable bytes; the load is unaligned.
        unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f,vpclmulqdq")]
    #[inline]
    fn fold512(acc: __m512i, k: __m512i, next: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128(acc, k, 0x00);
        let hi = _mm512_clmulepi64_epi128(acc, k, 0x11);
        // 0x96: three-way XOR.
        _mm512_ternarylogic_epi64(lo, hi, next, 0x96)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn k512(pair: [i64; 2]) -> __m512i {
        _mm512_broadcast_i32x4(_mm_set_epi64x(pair[1], pair[0]))
    }

    /// Load one 256-byte step as four 512-bit lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load_step(block: &[u8; 256]) -> [__m512i; 4] {
        let (c, _) = block.as_chunks::<64>();
        [
            load512(&c[0]),
            load512(&c[1]),
            load512(&c[2]),
            load512(&c[3]),
        ]
    }

    /// Fold four 512-bit accumulators (64 bytes apart) down to one 128-bit remainder.
    /// Every fold depends only on the accumulators, so the reduction is two levels deep
    /// rather than a chain of six.
    #[target_feature(enable = "sse4.2,pclmulqdq,avx2,avx512f,avx512bw,avx512vl,vpclmulqdq")]
    #[inline]
    fn reduce_accumulators(acc: [__m512i; 4]) -> __m128i {
        let x = fold512(acc[0], k512(K1536), acc[3]);
        let y = fold512(acc[1], k512(K1024), x);
        let z = fold512(acc[2], k512(K512), y);
        // Four 128-bit lanes 16 bytes apart inside `z`: fold lanes 0..2 onto lane 3 with
        // one constant per lane (lane 3's constant is zero; it is added back unfolded).
        let k_lanes = _mm512_set_epi64(0, 0, K128[1], K128[0], K256[1], K256[0], K384[1], K384[0]);
        let lo = _mm512_clmulepi64_epi128(z, k_lanes, 0x00);
        let hi = _mm512_clmulepi64_epi128(z, k_lanes, 0x11);
        let last_lane = _mm512_maskz_mov_epi64(0xC0, z);
        let t = _mm512_ternarylogic_epi64(lo, hi, last_lane, 0x96);
        let t = _mm256_xor_si256(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64::<1>(t));
        _mm_xor_si128(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t))
    }

    /// AVX-512 level: VPCLMULQDQ folding with four 512-bit accumulators (256 bytes a
    /// step), then down to one 128-bit lane.
    #[target_feature(enable = "sse4.2,pclmulqdq,avx2,avx512f,avx512bw,avx512vl,vpclmulqdq")]
    pub(crate) fn raw_update_avx512(mut reg: u32, mut data: &[u8]) -> u32 {
        let misalignment = data.as_ptr().align_offset(64);
        if misalignment == 0
            && let Ok(page) = <&[u8; crate::PAGE_SIZE]>::try_from(data)
        {
            return page_fused(reg, page);
        }
        if data.len() < 512 {
            return raw_update_avx2(reg, data);
        }
        // A 512-bit load that straddles two cache lines costs nearly two loads: bring
        // the input to a 64-byte boundary with the `crc32` instruction first.
        if misalignment != 0 {
            let (head, rest) = data.split_at(misalignment);
            reg = crc32_instr(reg, head);
            data = rest;
        }
        let (blocks, rest) = data.as_chunks::<256>();
        let mut acc = load_step(&blocks[0]);
        acc[0] = _mm512_xor_si512(
            acc[0],
            _mm512_zextsi128_si512(_mm_cvtsi32_si128(reg as i32)),
        );
        let k = k512(K2048);
        for b in &blocks[1..] {
            let next = load_step(b);
            for i in 0..4 {
                acc[i] = fold512(acc[i], k, next[i]);
            }
        }
        finish128(reduce_accumulators(acc), rest)
    }

    /// Bytes of a page folded with VPCLMULQDQ; the rest goes to three `crc32` streams.
    const PAGE_FOLDED: usize = 13 * 256;
    /// Length of each of the three `crc32` streams.
    const PAGE_STREAM: usize = (crate::PAGE_SIZE - PAGE_FOLDED) / 3;
    const PAGE_K: [u64; 3] = [
        shift_constant(8 * 3 * PAGE_STREAM as u64),
        shift_constant(8 * 2 * PAGE_STREAM as u64),
        shift_constant(8 * PAGE_STREAM as u64),
    ];

    /// One 4 KiB page, the dominant input. VPCLMULQDQ saturates one execution port, the
    /// `crc32` instruction runs on another: the first 3328 bytes are folded while three
    /// `crc32` streams take the last 768, interleaved in the same loop so the two run
    /// side by side, then the four partial CRCs are recombined with carry-less
    /// multiplies (as in [`three_way`]).
    #[target_feature(enable = "sse4.2,pclmulqdq,avx2,avx512f,avx512bw,avx512vl,vpclmulqdq")]
    fn page_fused(reg: u32, page: &[u8; crate::PAGE_SIZE]) -> u32 {
        const { assert!(PAGE_FOLDED + 3 * PAGE_STREAM == crate::PAGE_SIZE) };
        const QWORDS: usize = PAGE_STREAM / 8;
        let (folded, streams) = page.split_at(PAGE_FOLDED);
        let (blocks, _) = folded.as_chunks::<256>();
        let (qwords, _) = streams.as_chunks::<8>();
        let (qa, rest) = qwords.split_at(QWORDS);
        let (qb, qc) = rest.split_at(QWORDS);
        let q = |words: &[[u8; 8]], i: usize| u64::from_le_bytes(words[i]);

        let mut acc = load_step(&blocks[0]);
        acc[0] = _mm512_xor_si512(
            acc[0],
            _mm512_zextsi128_si512(_mm_cvtsi32_si128(reg as i32)),
        );
        let k = k512(K2048);
        let (mut ra, mut rb, mut rc) = (0u64, 0u64, 0u64);
        // Two `crc32` steps per stream per fold step keeps both ports busy.
        for (step, b) in blocks[1..].iter().enumerate() {
            let next = load_step(b);
            for i in 0..4 {
                acc[i] = fold512(acc[i], k, next[i]);
            }
            for i in [2 * step, 2 * step + 1] {
                ra = _mm_crc32_u64(ra, q(qa, i));
                rb = _mm_crc32_u64(rb, q(qb, i));
                rc = _mm_crc32_u64(rc, q(qc, i));
            }
        }
        for i in 2 * (blocks.len() - 1)..QWORDS {
            ra = _mm_crc32_u64(ra, q(qa, i));
            rb = _mm_crc32_u64(rb, q(qb, i));
            rc = _mm_crc32_u64(rc, q(qc, i));
        }
        let head = reduce128(reduce_accumulators(acc));
        let clmul = |reg: u64, k: u64| {
            _mm_clmulepi64_si128(
                _mm_cvtsi64_si128(reg as i64),
                _mm_cvtsi64_si128(k as i64),
                0x00,
            )
        };
        let products = _mm_xor_si128(
            _mm_xor_si128(clmul(u64::from(head), PAGE_K[0]), clmul(ra, PAGE_K[1])),
            clmul(rb, PAGE_K[2]),
        );
        (_mm_crc32_u64(0, _mm_cvtsi128_si64(products) as u64) ^ rc) as u32
    }
}
