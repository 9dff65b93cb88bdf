//! Baselines we write ourselves, each as its own reference would.

/// XBZRLE encode in the shape of QEMU's C loop (`migration/xbzrle.c`,
/// `xbzrle_encode_buffer`): a byte loop to word alignment, then words of 8 bytes
/// compared whole, then bytes again; the "has a zero byte" trick to find where a changed
/// run ends; two-byte-max ULEB128 lengths. Returns `None` on overflow, like QEMU's -1.
/// Page lengths must be multiples of 8 (QEMU asserts the same).
pub fn qemu_shaped_encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    const WORD: usize = 8;
    let slen = old.len();
    assert!(slen.is_multiple_of(WORD) && new.len() == slen);
    let dlen = dst.len();
    let word = |buf: &[u8], i: usize| -> u64 {
        debug_assert!(i + WORD <= buf.len());
        // SAFETY: callers only read whole words below `slen`, which is a multiple of 8.
        unsafe { buf.as_ptr().add(i).cast::<u64>().read_unaligned() }
    };
    let (mut zrun_len, mut nzrun_len) = (0usize, 0usize);
    let (mut d, mut i) = (0usize, 0usize);
    while i < slen {
        if d + 2 > dlen {
            return None;
        }
        let mut res = (slen - i) % WORD;
        while res > 0 && old[i] == new[i] {
            zrun_len += 1;
            i += 1;
            res -= 1;
        }
        if res == 0 {
            while i < slen && word(old, i) == word(new, i) {
                i += WORD;
                zrun_len += WORD;
            }
            while i < slen && old[i] == new[i] {
                zrun_len += 1;
                i += 1;
            }
        }
        if zrun_len == slen {
            return Some(0);
        }
        if i == slen {
            return Some(d);
        }
        d += uleb128_encode_small(&mut dst[d..], zrun_len);
        zrun_len = 0;
        let nzrun_start = i;
        if d + 2 > dlen {
            return None;
        }
        res = (slen - i) % WORD;
        while res > 0 && old[i] != new[i] {
            i += 1;
            nzrun_len += 1;
            res -= 1;
        }
        if res == 0 {
            let mask = 0x0101_0101_0101_0101u64;
            while i < slen {
                let xor = word(old, i) ^ word(new, i);
                if (xor.wrapping_sub(mask) & !xor & (mask << 7)) != 0 {
                    while old[i] != new[i] {
                        nzrun_len += 1;
                        i += 1;
                    }
                    break;
                }
                i += WORD;
                nzrun_len += WORD;
            }
        }
        d += uleb128_encode_small(&mut dst[d..], nzrun_len);
        if d + nzrun_len > dlen {
            return None;
        }
        dst[d..d + nzrun_len].copy_from_slice(&new[nzrun_start..nzrun_start + nzrun_len]);
        d += nzrun_len;
        nzrun_len = 0;
    }
    Some(d)
}

fn uleb128_encode_small(out: &mut [u8], n: usize) -> usize {
    assert!(n <= 0x3fff);
    if n < 0x80 {
        out[0] = n as u8;
        1
    } else {
        out[0] = (n as u8 & 0x7f) | 0x80;
        out[1] = (n >> 7) as u8;
        2
    }
}

fn uleb128_decode_small(input: &[u8]) -> Option<(usize, usize)> {
    let b0 = *input.first()?;
    if b0 & 0x80 == 0 {
        return Some((usize::from(b0), 1));
    }
    let b1 = *input.get(1)?;
    if b1 & 0x80 != 0 {
        return None;
    }
    Some((usize::from(b0 & 0x7f) | usize::from(b1) << 7, 2))
}

/// XBZRLE decode in the shape of QEMU's `xbzrle_decode_buffer`.
pub fn qemu_shaped_decode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let (slen, dlen) = (src.len(), dst.len());
    let (mut i, mut d) = (0usize, 0usize);
    while i < slen {
        if slen - i < 2 {
            return None;
        }
        let (count, n) = uleb128_decode_small(&src[i..])?;
        if i != 0 && count == 0 {
            return None;
        }
        i += n;
        d += count;
        if d > dlen || slen - i < 2 {
            return None;
        }
        let (count, n) = uleb128_decode_small(&src[i..])?;
        if count == 0 {
            return None;
        }
        i += n;
        if d + count > dlen || i + count > slen {
            return None;
        }
        dst[d..d + count].copy_from_slice(&src[i..i + count]);
        d += count;
        i += count;
    }
    Some(d)
}

/// Read every byte of `buf` as fast as this CPU can, doing nothing with it but an OR
/// (so the loads cannot be elided): the memory read bandwidth ceiling for kernels that
/// must read every byte once.
pub fn read_sweep(buf: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked above).
            return unsafe { x86::read_sweep_avx512(buf) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { x86::read_sweep_avx2(buf) };
        }
    }
    let (words, tail) = buf.as_chunks::<8>();
    words.iter().fold(0u64, |a, w| a | u64::from_ne_bytes(*w))
        | tail.iter().fold(0, |a, &b| a | u64::from(b))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn read_sweep_avx512(buf: &[u8]) -> u64 {
        let (blocks, _) = buf.as_chunks::<512>();
        let mut acc = [_mm512_setzero_si512(); 8];
        for b in blocks {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: 64 bytes at offset 64k of a 512-byte block.
                let v = unsafe { _mm512_loadu_si512(b.as_ptr().add(64 * k).cast()) };
                *a = _mm512_or_si512(*a, v);
            }
        }
        let all = acc
            .iter()
            .fold(_mm512_setzero_si512(), |x, y| _mm512_or_si512(x, *y));
        _mm512_reduce_or_epi64(all) as u64
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn read_sweep_avx2(buf: &[u8]) -> u64 {
        let (blocks, _) = buf.as_chunks::<256>();
        let mut acc = [_mm256_setzero_si256(); 8];
        for b in blocks {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: 32 bytes at offset 32k of a 256-byte block.
                let v = unsafe { _mm256_loadu_si256(b.as_ptr().add(32 * k).cast()) };
                *a = _mm256_or_si256(*a, v);
            }
        }
        let all = acc
            .iter()
            .fold(_mm256_setzero_si256(), |x, y| _mm256_or_si256(x, *y));
        let folded = _mm_or_si128(
            _mm256_castsi256_si128(all),
            _mm256_extracti128_si256::<1>(all),
        );
        (_mm_cvtsi128_si64(folded) | _mm_extract_epi64::<1>(folded)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_shaped_reference_agrees_with_dwcp_on_edited_pages() {
        let mut old = vec![0u8; 4096];
        for (i, b) in old.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut new = old.clone();
        for i in (3..4096).step_by(97) {
            new[i] ^= 0x40;
        }
        new[1000..1100].fill(7);
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let na = qemu_shaped_encode(&old, &new, &mut a).unwrap();
        let nb = dwcp_simd::xbzrle_encode(&old, &new, &mut b).unwrap();
        assert_eq!(&a[..na], &b[..nb]);
        let mut page = old.clone();
        assert!(qemu_shaped_decode(&a[..na], &mut page).is_some());
        assert_eq!(page, new);
    }

    #[test]
    fn read_sweep_sees_every_byte() {
        let mut buf = vec![0u8; 1 << 16];
        assert_eq!(read_sweep(&buf), 0);
        buf[12345] = 1;
        assert_ne!(read_sweep(&buf), 0);
    }
}
