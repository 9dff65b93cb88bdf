//! XBZRLE (XOR-based zero run-length encoding), byte-compatible with QEMU
//! (`docs/xbzrle.txt`, `migration/xbzrle.c`).
//!
//! An encoded page is a sequence of pairs: the ULEB128 length of a run where old and new
//! are equal ("zero run", old XOR new is zero), then the ULEB128 length of a run where
//! they differ followed by that many bytes of the *new* page. Runs are maximal; the
//! trailing zero run is omitted, so an unchanged page encodes to zero bytes.
//!
//! Every encoder level computes a 64-bit "differs" mask per 64-byte block (one bit per
//! byte) and extracts run boundaries from it with trailing-zero counts, so a block with no
//! change costs one compare and a sparse edit costs one boundary per run. The decoder is
//! shared by all levels: decoding is a sequence of small copies with nothing to vectorise.

/// The encoded page would not fit in the caller's output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("XBZRLE encoding exceeds the {limit}-byte limit")]
pub struct XbzrleOverflow {
    /// The limit that was exceeded (the output buffer's length).
    pub limit: usize,
}

/// Malformed XBZRLE input. Offsets are positions in the encoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XbzrleDecodeError {
    /// The input ends inside a length, before a non-zero run's length, or inside its bytes.
    #[error("XBZRLE input truncated at byte {offset}: {what}")]
    Truncated {
        /// Where the missing part should start.
        offset: usize,
        /// What was expected there.
        what: &'static str,
    },
    /// A ULEB128 length is longer than needed or longer than any run in the page.
    #[error("XBZRLE overlong ULEB128 length at byte {offset}")]
    OverlongVarint {
        /// Where the length starts.
        offset: usize,
    },
    /// A zero run of length 0 anywhere but first.
    #[error("XBZRLE zero run of length 0 at byte {offset} (only the first run may be empty)")]
    EmptyZeroRun {
        /// Where the length starts.
        offset: usize,
    },
    /// A non-zero run of length 0.
    #[error("XBZRLE non-zero run of length 0 at byte {offset}")]
    EmptyNonZeroRun {
        /// Where the length starts.
        offset: usize,
    },
    /// A run that reaches past the end of the page.
    #[error("XBZRLE run at byte {offset} ends at page byte {end}, past the page's {page_len}")]
    RunPastEnd {
        /// Where the run's length starts.
        offset: usize,
        /// Where the run would end in the page.
        end: usize,
        /// The page length.
        page_len: usize,
    },
}

/// Copy `src` into `dst` (equal lengths) without a `memcpy` call for the short runs
/// sparse edits produce: two overlapping fixed-size moves cover any length from 4 to 16
/// exactly, so nothing outside `dst` is written.
#[inline(always)]
fn copy_small(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    debug_assert_eq!(dst.len(), n);
    if (8..=16).contains(&n) {
        dst[..8].copy_from_slice(&src[..8]);
        dst[n - 8..].copy_from_slice(&src[n - 8..]);
    } else if (4..8).contains(&n) {
        dst[..4].copy_from_slice(&src[..4]);
        dst[n - 4..].copy_from_slice(&src[n - 4..]);
    } else if n > 0 && n < 4 {
        // Bytes 0, n/2 and n-1 cover every length from 1 to 3 (a loop here is turned
        // back into a `memcpy` call).
        dst[0] = src[0];
        dst[n / 2] = src[n / 2];
        dst[n - 1] = src[n - 1];
    } else if n > 16 {
        dst.copy_from_slice(src);
    }
}

/// Write a ULEB128 length at `pos`; returns the position after it. Lengths below 2^14
/// (every run in pages up to 16 KiB) take a branch-free path that writes two bytes and
/// advances by one or two, so `out` past the returned length holds scratch.
#[inline(always)]
fn put_len(out: &mut [u8], pos: usize, value: usize) -> Result<usize, XbzrleOverflow> {
    if value < 0x4000
        && let Some(dst) = out.get_mut(pos..pos + 2)
    {
        let two = usize::from(value >= 0x80);
        dst[0] = (value as u8 & 0x7f) | ((two as u8) << 7);
        dst[1] = (value >> 7) as u8;
        return Ok(pos + 1 + two);
    }
    put_len_exact(out, pos, value)
}

#[inline(never)]
fn put_len_exact(
    out: &mut [u8],
    mut pos: usize,
    mut value: usize,
) -> Result<usize, XbzrleOverflow> {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let limit = out.len();
        let slot = out.get_mut(pos).ok_or(XbzrleOverflow { limit })?;
        pos += 1;
        if value == 0 {
            *slot = byte;
            return Ok(pos);
        }
        *slot = byte | 0x80;
    }
}

/// Copy `src[start..end]` to `pos`; returns the position after it. Runs of up to 16
/// bytes with 16 bytes of room on both sides move as one fixed 16-byte copy (the extra
/// bytes land in `out` past the returned length, as scratch).
#[inline(always)]
fn put_run(
    out: &mut [u8],
    pos: usize,
    src: &[u8],
    start: usize,
    end: usize,
) -> Result<usize, XbzrleOverflow> {
    let n = end - start;
    if n <= 16
        && let (Some(dst), Some(from)) = (out.get_mut(pos..pos + 16), src.get(start..start + 16))
    {
        dst.copy_from_slice(from);
        return Ok(pos + n);
    }
    let limit = out.len();
    let dst = out.get_mut(pos..pos + n).ok_or(XbzrleOverflow { limit })?;
    copy_small(dst, &src[start..end]);
    Ok(pos + n)
}

/// "Differs" bits of up to 64 bytes, one byte at a time (tails and the scalar level).
#[inline]
fn differs_bytewise(old: &[u8], new: &[u8]) -> u64 {
    old.iter()
        .zip(new)
        .enumerate()
        .fold(0u64, |m, (i, (a, b))| m | (u64::from(a != b) << i))
}

/// Where the encoder is between 4 KiB chunks.
struct RunState {
    /// Bytes written to the output so far.
    pos: usize,
    /// Where the current zero run (or the one before the open changed run) started.
    zero_start: usize,
    /// The start of a changed run that has not ended yet.
    open_changed: Option<usize>,
}

/// Emit one changed run `[start, end)` preceded by its zero run `[zero_start, start)`.
#[inline(always)]
fn put_changed_run(
    out: &mut [u8],
    pos: usize,
    new: &[u8],
    zero_start: usize,
    start: usize,
    end: usize,
) -> Result<usize, XbzrleOverflow> {
    let zero_len = start - zero_start;
    let len = end - start;
    // The common case, short runs with room to spare: one bounds check for the output,
    // one for the input, then fixed-size writes (scratch past the end is allowed).
    if zero_len < 0x4000
        && len <= 16
        && let (Some(dst), Some(src)) = (out.get_mut(pos..pos + 20), new.get(start..start + 16))
    {
        let two = usize::from(zero_len >= 0x80);
        dst[0] = (zero_len as u8 & 0x7f) | ((two as u8) << 7);
        dst[1] = (zero_len >> 7) as u8;
        dst[1 + two] = len as u8;
        dst[2 + two..18 + two].copy_from_slice(src);
        return Ok(pos + 2 + two + len);
    }
    let pos = put_len(out, pos, zero_len)?;
    let pos = put_len(out, pos, len)?;
    put_run(out, pos, new, start, end)
}

/// Emit the changed runs whose start and end are consecutive entries of `positions`;
/// returns how many entries were used (an odd last one starts a run not yet ended).
#[inline(always)]
fn emit_pairs(
    positions: &[u32],
    zero_start: &mut usize,
    pos: &mut usize,
    new: &[u8],
    out: &mut [u8],
) -> Result<usize, XbzrleOverflow> {
    let (pairs, _) = positions.as_chunks::<2>();
    for &[start, end] in pairs {
        *pos = put_changed_run(out, *pos, new, *zero_start, start as usize, end as usize)?;
        *zero_start = end as usize;
    }
    Ok(2 * pairs.len())
}

/// The walk over one chunk's run edges (see [`encode_with`]): edge positions are
/// gathered into a small buffer, then consumed two at a time, start and end of a changed
/// run. Kept out of line: it is scalar, and inlined into the SIMD pass it made the
/// compiler reload vector constants on every run.
#[inline(never)]
fn emit_runs(
    state: &mut RunState,
    edges: &[u64; 64],
    mut summary: u64,
    chunk_base: usize,
    new: &[u8],
    out: &mut [u8],
) -> Result<(), XbzrleOverflow> {
    // At most 64 edges per block, so flushing past 64 always leaves room for the next.
    let mut positions = [0u32; 128];
    let mut count = 0usize;
    let mut pos = state.pos;
    let mut zero_start = state.zero_start;
    if let Some(start) = state.open_changed {
        positions[0] = start as u32;
        count = 1;
    }
    while summary != 0 {
        let k = summary.trailing_zeros() as usize;
        summary &= summary - 1;
        let mut e = edges[k];
        let block_base = (chunk_base + 64 * k) as u32;
        while e != 0 {
            positions[count] = block_base + e.trailing_zeros();
            count += 1;
            e &= e - 1;
        }
        if count > 64 {
            let used = emit_pairs(&positions[..count], &mut zero_start, &mut pos, new, out)?;
            positions.copy_within(used..count, 0);
            count -= used;
        }
    }
    let used = emit_pairs(&positions[..count], &mut zero_start, &mut pos, new, out)?;
    *state = RunState {
        pos,
        zero_start,
        open_changed: (count > used).then(|| positions[used] as usize),
    };
    Ok(())
}

/// Turn a full chunk's "differs" masks into edge masks in place (bit i set where byte i
/// differs in kind from byte i-1; `carry` is whether the byte before the chunk
/// differed) and return the summary: bit k set when block k has an edge.
#[inline(always)]
fn edges_scalar(masks: &mut [u64; 64], mut carry: u64) -> u64 {
    let mut summary = 0u64;
    for (k, word) in masks.iter_mut().enumerate() {
        let d = *word;
        let e = d ^ ((d << 1) | carry);
        carry = d >> 63;
        *word = e;
        summary |= u64::from(e != 0) << k;
    }
    summary
}

/// Encode with `differs` giving, per 64-byte block, one bit per byte that changed, and
/// `edges` turning a full chunk of those masks into edges (see [`edges_scalar`]).
///
/// Two passes per 4 KiB chunk: first, with no data-dependent branches, the *edges* of
/// every block and a summary word with a bit per block that has any edge; then a walk
/// over only those edges ([`emit_runs`]). Runs alternate between equal and changed, so
/// the walk's one real branch alternates too and predicts well; a block with no edge
/// costs nothing in the walk.
#[inline(always)]
fn encode_with(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    mut differs: impl FnMut(&[u8; 64], &[u8; 64]) -> u64,
    mut edges: impl FnMut(&mut [u64; 64], u64) -> u64,
) -> Result<usize, XbzrleOverflow> {
    assert_eq!(old.len(), new.len(), "XBZRLE pages must have equal lengths");
    assert!(
        u32::try_from(old.len()).is_ok(),
        "XBZRLE pages are limited to 4 GiB"
    );
    let mut state = RunState {
        pos: 0,
        zero_start: 0,
        open_changed: None,
    };
    // Whether the byte before the current chunk differed (the state at the start is
    // "equal", since the encoding opens with a zero run).
    let mut carry = 0u64;
    for (chunk_index, (old_chunk, new_chunk)) in
        old.chunks(64 * 64).zip(new.chunks(64 * 64)).enumerate()
    {
        let mut masks = [0u64; 64];
        let (old_blocks, old_tail) = old_chunk.as_chunks::<64>();
        let (new_blocks, new_tail) = new_chunk.as_chunks::<64>();
        for (mask, (o, n)) in masks.iter_mut().zip(old_blocks.iter().zip(new_blocks)) {
            *mask = differs(o, n);
        }
        let summary = if old_blocks.len() == 64 {
            let next_carry = masks[63] >> 63;
            let summary = edges(&mut masks, carry);
            carry = next_carry;
            summary
        } else {
            // The final, partial chunk: its blocks and tail one at a time. Bytes past the
            // end read as equal, which puts an edge at the very end when the data ends
            // inside a changed run: exactly where that run must end.
            let blocks = old_blocks.len();
            masks[blocks] = differs_bytewise(old_tail, new_tail);
            edges_scalar(&mut masks, carry)
        };
        emit_runs(&mut state, &masks, summary, chunk_index * 64 * 64, new, out)?;
    }
    // The trailing zero run is never written: a zero run is only emitted together with
    // the changed run that ends it.
    match state.open_changed {
        Some(start) => put_changed_run(out, state.pos, new, state.zero_start, start, new.len()),
        None => Ok(state.pos),
    }
}

/// Scalar level: eight bytes at a time, a byte's "differs" bit found without branches.
pub(crate) fn encode_scalar(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
) -> Result<usize, XbzrleOverflow> {
    encode_with(
        old,
        new,
        out,
        |o, n| {
            let (ow, _) = o.as_chunks::<8>();
            let (nw, _) = n.as_chunks::<8>();
            let mut mask = 0u64;
            for (i, (a, b)) in ow.iter().zip(nw).enumerate() {
                let x = u64::from_le_bytes(*a) ^ u64::from_le_bytes(*b);
                // High bit of each byte set iff that byte of x is non-zero.
                let nonzero = (((x & 0x7f7f_7f7f_7f7f_7f7f) + 0x7f7f_7f7f_7f7f_7f7f) | x)
                    & 0x8080_8080_8080_8080;
                // Gather the eight high bits into one byte (bit 8k lands on bit 56 + k).
                let byte_mask = (nonzero >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56;
                mask |= byte_mask << (8 * i);
            }
            mask
        },
        edges_scalar,
    )
}

/// The definition, one byte at a time; the reference the other paths are tested against.
pub fn xbzrle_encode_reference(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
) -> Result<usize, XbzrleOverflow> {
    assert_eq!(old.len(), new.len(), "XBZRLE pages must have equal lengths");
    let mut pos = 0;
    let mut i = 0;
    while i < old.len() {
        let zero_start = i;
        while i < old.len() && old[i] == new[i] {
            i += 1;
        }
        if i == old.len() {
            break; // trailing zero run omitted
        }
        pos = put_len_exact(out, pos, i - zero_start)?;
        let changed_start = i;
        while i < old.len() && old[i] != new[i] {
            i += 1;
        }
        pos = put_len_exact(out, pos, i - changed_start)?;
        let limit = out.len();
        let end = pos + (i - changed_start);
        out.get_mut(pos..end)
            .ok_or(XbzrleOverflow { limit })?
            .copy_from_slice(&new[changed_start..i]);
        pos = end;
    }
    Ok(pos)
}

/// Read one ULEB128 length at `start`, accepting only minimal encodings no longer than
/// a length up to the page size needs (`max_bytes`); returns it and the next position.
///
/// One- and two-byte lengths (every run of a 4 KiB page) are read inline. The branch on
/// which it is stays a branch: predicted, it lets the CPU start on the next length
/// before this one is known, which a branch-free form measured slower for.
#[inline(always)]
fn read_len(
    src: &[u8],
    start: usize,
    max_bytes: usize,
    what: &'static str,
) -> Result<(usize, usize), XbzrleDecodeError> {
    if let Some(&b0) = src.get(start) {
        if b0 < 0x80 {
            return Ok((usize::from(b0), start + 1));
        }
        // A second byte must end the number, be non-zero (else it is overlong) and be
        // allowed for this page size.
        if let Some(&b1) = src.get(start + 1)
            && b1 != 0
            && b1 < 0x80
            && max_bytes >= 2
        {
            return Ok((usize::from(b0 & 0x7f) | usize::from(b1) << 7, start + 2));
        }
    }
    read_len_multi(src, start, max_bytes, what)
}

/// Every length the fast path declines: longer numbers, the last byte of the input, and
/// all malformed ones.
#[inline(never)]
fn read_len_multi(
    src: &[u8],
    start: usize,
    max_bytes: usize,
    what: &'static str,
) -> Result<(usize, usize), XbzrleDecodeError> {
    let Some(&first) = src.get(start) else {
        return Err(XbzrleDecodeError::Truncated {
            offset: start,
            what,
        });
    };
    if first < 0x80 {
        return Ok((usize::from(first), start + 1));
    }
    let mut value = usize::from(first & 0x7f);
    let mut shift = 7;
    let mut i = start + 1;
    loop {
        if i - start >= max_bytes {
            return Err(XbzrleDecodeError::OverlongVarint { offset: start });
        }
        let Some(&byte) = src.get(i) else {
            return Err(XbzrleDecodeError::Truncated { offset: i, what });
        };
        value |= usize::from(byte & 0x7f) << shift;
        i += 1;
        if byte < 0x80 {
            if byte == 0 {
                // A final group of zero means a shorter encoding existed.
                return Err(XbzrleDecodeError::OverlongVarint { offset: start });
            }
            return Ok((value, i));
        }
        shift += 7;
    }
}

/// Bytes a ULEB128 encoding of `value` takes.
const fn uleb128_len(value: usize) -> usize {
    let bits = usize::BITS - value.leading_zeros();
    if bits == 0 {
        1
    } else {
        bits.div_ceil(7) as usize
    }
}

/// Apply an encoded page to `page`, which holds the old content on entry.
///
/// Validates everything it reads: a malformed input returns an error and never writes
/// outside `page`. On error `page` may hold part of the update; callers treat the page
/// as lost (a migration fails the session).
pub fn xbzrle_decode(encoded: &[u8], page: &mut [u8]) -> Result<(), XbzrleDecodeError> {
    let page_len = page.len();
    let max_bytes = uleb128_len(page_len);
    let mut i = 0;
    let mut d = 0;
    while i < encoded.len() {
        let zero_at = i;
        let (zero_run, next) = read_len(encoded, i, max_bytes, "zero-run length")?;
        i = next;
        if zero_run == 0 && zero_at != 0 {
            return Err(XbzrleDecodeError::EmptyZeroRun { offset: zero_at });
        }
        d += zero_run;
        if d > page_len {
            return Err(XbzrleDecodeError::RunPastEnd {
                offset: zero_at,
                end: d,
                page_len,
            });
        }
        let changed_at = i;
        let (changed, next) = read_len(encoded, i, max_bytes, "non-zero-run length")?;
        i = next;
        if changed == 0 {
            return Err(XbzrleDecodeError::EmptyNonZeroRun { offset: changed_at });
        }
        let end = d + changed;
        if end > page_len {
            return Err(XbzrleDecodeError::RunPastEnd {
                offset: changed_at,
                end,
                page_len,
            });
        }
        let Some(bytes) = encoded.get(i..i + changed) else {
            return Err(XbzrleDecodeError::Truncated {
                offset: encoded.len(),
                what: "non-zero-run bytes",
            });
        };
        copy_small(&mut page[d..end], bytes);
        d = end;
        i += changed;
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{XbzrleOverflow, edges_scalar, encode_with};
    use std::arch::x86_64::*;

    #[inline]
    fn load128(chunk: &[u8]) -> __m128i {
        assert!(chunk.len() >= 16);
        // SAFETY: at least 16 readable bytes (checked above); the load is unaligned.
        unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) }
    }

    #[target_feature(enable = "sse4.2")]
    pub(crate) fn encode_sse42(
        old: &[u8],
        new: &[u8],
        out: &mut [u8],
    ) -> Result<usize, XbzrleOverflow> {
        encode_with(
            old,
            new,
            out,
            |o, n| {
                let mut equal = 0u64;
                for k in 0..4 {
                    let eq = _mm_cmpeq_epi8(load128(&o[16 * k..]), load128(&n[16 * k..]));
                    equal |= u64::from(_mm_movemask_epi8(eq) as u16) << (16 * k);
                }
                !equal
            },
            edges_scalar,
        )
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn load256(chunk: &[u8]) -> __m256i {
        assert!(chunk.len() >= 32);
        // SAFETY: at least 32 readable bytes (checked above); the load is unaligned.
        unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }
    }

    #[target_feature(enable = "sse4.2,avx2,bmi1")]
    pub(crate) fn encode_avx2(
        old: &[u8],
        new: &[u8],
        out: &mut [u8],
    ) -> Result<usize, XbzrleOverflow> {
        encode_with(
            old,
            new,
            out,
            |o, n| {
                let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(load256(&o[..]), load256(&n[..])));
                let hi =
                    _mm256_movemask_epi8(_mm256_cmpeq_epi8(load256(&o[32..]), load256(&n[32..])));
                !((u64::from(hi as u32) << 32) | u64::from(lo as u32))
            },
            edges_scalar,
        )
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load512(chunk: &[u8; 64]) -> __m512i {
        // SAFETY: `chunk` is 64 readable bytes; the load is unaligned.
        unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) }
    }

    /// [`edges_scalar`] eight blocks at a time: each block's previous word comes from
    /// shifting the vector by one lane (`valignq`), carrying the last lane of the
    /// previous vector in.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn edges_avx512(masks: &mut [u64; 64], carry: u64) -> u64 {
        let mut summary = 0u64;
        let mut previous = _mm512_set1_epi64((carry << 63) as i64);
        let (vectors, _) = masks.as_chunks_mut::<8>();
        for (j, words) in vectors.iter_mut().enumerate() {
            // SAFETY: `words` is 8 u64s, 64 bytes; unaligned load and store.
            let d = unsafe { _mm512_loadu_si512(words.as_ptr().cast()) };
            // Lanes [previous[7], d[0], .., d[6]]: each word's predecessor.
            let before = _mm512_alignr_epi64::<7>(d, previous);
            let e = _mm512_xor_si512(
                d,
                _mm512_or_si512(_mm512_slli_epi64::<1>(d), _mm512_srli_epi64::<63>(before)),
            );
            // SAFETY: as above.
            unsafe { _mm512_storeu_si512(words.as_mut_ptr().cast(), e) };
            summary |= u64::from(_mm512_test_epi64_mask(e, e)) << (8 * j);
            previous = d;
        }
        summary
    }

    #[target_feature(enable = "sse4.2,avx2,bmi1,avx512f,avx512bw")]
    pub(crate) fn encode_avx512(
        old: &[u8],
        new: &[u8],
        out: &mut [u8],
    ) -> Result<usize, XbzrleOverflow> {
        encode_with(
            old,
            new,
            out,
            |o, n| _mm512_cmpneq_epi8_mask(load512(o), load512(n)),
            |masks, carry| edges_avx512(masks, carry),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's documented example (docs/xbzrle.txt; ../shared/data/xbzrle-vectors.md).
    fn qemu_example() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut old = vec![0u8; 4096];
        let mut new = vec![0u8; 4096];
        old[1001..1022].copy_from_slice(&[
            0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12,
            0x13, 0x68, 0x00, 0x00, 0x6b, 0x00, 0x6d,
        ]);
        new[1001..1022].copy_from_slice(&[
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e,
            0x0f, 0x68, 0x00, 0x00, 0x67, 0x00, 0x69,
        ]);
        let encoded = vec![
            0xe9, 0x07, 0x0f, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b,
            0x0c, 0x0d, 0x0e, 0x0f, 0x03, 0x01, 0x67, 0x01, 0x01, 0x69,
        ];
        (old, new, encoded)
    }

    #[test]
    fn reproduces_qemu_documented_example() {
        let (old, new, expected) = qemu_example();
        let mut out = [0u8; 64];
        let n = xbzrle_encode_reference(&old, &new, &mut out).unwrap();
        assert_eq!(&out[..n], &expected[..]);
        let n = encode_scalar(&old, &new, &mut out).unwrap();
        assert_eq!(&out[..n], &expected[..]);
        let mut page = old.clone();
        xbzrle_decode(&expected, &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn runs_crossing_4k_chunks_and_the_end_match_the_reference() {
        let len = 2 * 4096 + 100;
        let old: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        for range in [4090..4200, 8100..8192, 8192..8193, 8195..len] {
            for b in &mut new[range] {
                *b ^= 0x5A;
            }
        }
        let mut want = vec![0u8; 2 * len];
        let mut got = vec![0u8; 2 * len];
        let n = xbzrle_encode_reference(&old, &new, &mut want).unwrap();
        assert_eq!(encode_scalar(&old, &new, &mut got), Ok(n));
        assert_eq!(got[..n], want[..n]);
        let mut page = old.clone();
        xbzrle_decode(&got[..n], &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn unchanged_page_encodes_to_nothing() {
        let page = vec![7u8; 4096];
        let mut out = [0u8; 8];
        assert_eq!(encode_scalar(&page, &page, &mut out), Ok(0));
    }

    #[test]
    fn overflow_is_exact() {
        let (old, new, expected) = qemu_example();
        let mut out = vec![0u8; expected.len()];
        assert_eq!(encode_scalar(&old, &new, &mut out), Ok(expected.len()));
        let mut short = vec![0u8; expected.len() - 1];
        assert_eq!(
            encode_scalar(&old, &new, &mut short),
            Err(XbzrleOverflow {
                limit: expected.len() - 1
            })
        );
    }

    #[test]
    fn decoder_rejects_each_malformation_without_panicking() {
        let mut page = vec![0u8; 4096];
        type Check = fn(XbzrleDecodeError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (&[0x80], |e| {
                matches!(e, XbzrleDecodeError::Truncated { .. })
            }),
            (&[0x05], |e| {
                matches!(e, XbzrleDecodeError::Truncated { .. })
            }),
            (&[0x05, 0x03, 1, 2], |e| {
                matches!(e, XbzrleDecodeError::Truncated { .. })
            }),
            (&[0x00, 0x00], |e| {
                matches!(e, XbzrleDecodeError::EmptyNonZeroRun { offset: 1 })
            }),
            (&[0x00, 0x01, 9, 0x00, 0x01, 9], |e| {
                matches!(e, XbzrleDecodeError::EmptyZeroRun { offset: 3 })
            }),
            // 4095 equal, then 2 changed: one past the end.
            (&[0xff, 0x1f, 0x02, 1, 2], |e| {
                matches!(e, XbzrleDecodeError::RunPastEnd { end: 4097, .. })
            }),
            (&[0x81, 0x80, 0x00, 0x01, 1], |e| {
                matches!(e, XbzrleDecodeError::OverlongVarint { offset: 0 })
            }),
            // Non-minimal: 0x85 0x00 is 5 in two bytes.
            (&[0x85, 0x00, 0x01, 1], |e| {
                matches!(e, XbzrleDecodeError::OverlongVarint { offset: 0 })
            }),
        ];
        for (input, is_expected) in cases {
            let err = xbzrle_decode(input, &mut page).unwrap_err();
            assert!(is_expected(err), "{input:02x?} gave {err:?}");
        }
    }

    #[test]
    fn length_writers_agree_and_match_uleb128_len() {
        for v in [0usize, 1, 127, 128, 4095, 4096, 16383, 16384, usize::MAX] {
            let mut fast = [0u8; 16];
            let mut exact = [0u8; 16];
            let n = put_len(&mut fast, 0, v).unwrap();
            assert_eq!(put_len_exact(&mut exact, 0, v).unwrap(), n);
            assert_eq!(fast[..n], exact[..n], "{v}");
            assert_eq!(n, uleb128_len(v), "{v}");
        }
        // One byte of room: the fast path steps aside and the exact one decides.
        let mut one = [0u8; 1];
        assert_eq!(put_len(&mut one, 0, 5), Ok(1));
        assert_eq!(put_len(&mut one, 0, 500), Err(XbzrleOverflow { limit: 1 }));
    }
}
