//! Page kernels for dwcp: CRC32C, zero-page test, XOR and XBZRLE encode/decode.
//!
//! Each kernel has a portable scalar path and, on x86-64, SSE4.2, AVX2 and AVX-512 paths
//! where they pay. The CPU is probed once ([`level::selection`]); the chosen level's
//! kernels are a table of function pointers ([`Kernels`]), so a call costs one indirect
//! jump. `DWCP_SIMD=scalar|sse42|avx2|avx512` lowers the level for a whole process, and
//! [`Kernels::for_level`] hands out any supported level directly, which is how the tests
//! run every path against the scalar reference on one machine.

pub mod crc32c;
pub mod level;
pub mod xbzrle;
mod xor;
mod zero;

pub use crc32c::{Crc32cCombiner, crc32c_combine, crc32c_reference};
pub use level::{Selection, SimdLevel, selection};
pub use xbzrle::{XbzrleDecodeError, XbzrleOverflow, xbzrle_decode, xbzrle_encode_reference};

use std::sync::OnceLock;

/// The page size every kernel is tuned for; all of them also take other lengths.
pub const PAGE_SIZE: usize = 4096;

/// An XBZRLE encoder: old page, new page, output buffer.
type XbzrleEncodeFn = fn(&[u8], &[u8], &mut [u8]) -> Result<usize, XbzrleOverflow>;

/// One level's kernels. Obtain with [`Kernels::active`] or [`Kernels::for_level`].
#[derive(Debug)]
pub struct Kernels {
    level: SimdLevel,
    crc32c_raw: fn(u32, &[u8]) -> u32,
    is_zero: fn(&[u8]) -> bool,
    xor_into: fn(&mut [u8], &[u8]),
    xor_to: fn(&mut [u8], &[u8], &[u8]),
    xbzrle_encode: XbzrleEncodeFn,
}

static SCALAR: Kernels = Kernels {
    level: SimdLevel::Scalar,
    crc32c_raw: crc32c::raw_update_scalar,
    is_zero: zero::is_zero_scalar,
    xor_into: xor::xor_into_scalar,
    xor_to: xor::xor_to_scalar,
    xbzrle_encode: xbzrle::encode_scalar,
};

#[cfg(target_arch = "x86_64")]
mod x86_tables {
    //! The SIMD levels' tables. Each entry is a safe wrapper around a `#[target_feature]`
    //! function; the wrappers are private and reachable only through a table that
    //! [`super::Kernels::for_level`] hands out after checking the CPU supports its level.

    use super::*;

    macro_rules! wrap {
        ($name:ident, $target:path, ($($arg:ident: $ty:ty),*) -> $ret:ty, $level:literal) => {
            fn $name($($arg: $ty),*) -> $ret {
                // SAFETY: only stored in the table of the level named here, which is
                // handed out only when the CPU supports that level's features.
                unsafe { $target($($arg),*) }
            }
        };
    }

    wrap!(crc_sse42, crc32c::x86::raw_update_sse42, (r: u32, d: &[u8]) -> u32, "sse42");
    wrap!(crc_avx2, crc32c::x86::raw_update_avx2, (r: u32, d: &[u8]) -> u32, "avx2");
    wrap!(crc_avx512, crc32c::x86::raw_update_avx512, (r: u32, d: &[u8]) -> u32, "avx512");
    wrap!(zero_sse42, zero::x86::is_zero_sse42, (d: &[u8]) -> bool, "sse42");
    wrap!(zero_avx2, zero::x86::is_zero_avx2, (d: &[u8]) -> bool, "avx2");
    wrap!(zero_avx512, zero::x86::is_zero_avx512, (d: &[u8]) -> bool, "avx512");
    wrap!(xor_into_sse42, xor::x86::xor_into_sse42, (d: &mut [u8], s: &[u8]) -> (), "sse42");
    wrap!(xor_into_avx2, xor::x86::xor_into_avx2, (d: &mut [u8], s: &[u8]) -> (), "avx2");
    wrap!(xor_into_avx512, xor::x86::xor_into_avx512, (d: &mut [u8], s: &[u8]) -> (), "avx512");
    wrap!(xor_to_sse42, xor::x86::xor_to_sse42, (o: &mut [u8], a: &[u8], b: &[u8]) -> (), "sse42");
    wrap!(xor_to_avx2, xor::x86::xor_to_avx2, (o: &mut [u8], a: &[u8], b: &[u8]) -> (), "avx2");
    wrap!(xor_to_avx512, xor::x86::xor_to_avx512, (o: &mut [u8], a: &[u8], b: &[u8]) -> (), "avx512");
    wrap!(xbz_sse42, xbzrle::x86::encode_sse42,
        (o: &[u8], n: &[u8], out: &mut [u8]) -> Result<usize, XbzrleOverflow>, "sse42");
    wrap!(xbz_avx2, xbzrle::x86::encode_avx2,
        (o: &[u8], n: &[u8], out: &mut [u8]) -> Result<usize, XbzrleOverflow>, "avx2");
    wrap!(xbz_avx512, xbzrle::x86::encode_avx512,
        (o: &[u8], n: &[u8], out: &mut [u8]) -> Result<usize, XbzrleOverflow>, "avx512");

    pub(super) static SSE42: Kernels = Kernels {
        level: SimdLevel::Sse42,
        crc32c_raw: crc_sse42,
        is_zero: zero_sse42,
        xor_into: xor_into_sse42,
        xor_to: xor_to_sse42,
        xbzrle_encode: xbz_sse42,
    };
    pub(super) static AVX2: Kernels = Kernels {
        level: SimdLevel::Avx2,
        crc32c_raw: crc_avx2,
        is_zero: zero_avx2,
        xor_into: xor_into_avx2,
        xor_to: xor_to_avx2,
        xbzrle_encode: xbz_avx2,
    };
    pub(super) static AVX512: Kernels = Kernels {
        level: SimdLevel::Avx512,
        crc32c_raw: crc_avx512,
        is_zero: zero_avx512,
        xor_into: xor_into_avx512,
        xor_to: xor_to_avx512,
        xbzrle_encode: xbz_avx512,
    };
}

static ACTIVE: OnceLock<&'static Kernels> = OnceLock::new();

impl Kernels {
    /// The kernels of `level`, or `None` when this CPU does not support it.
    pub fn for_level(level: SimdLevel) -> Option<&'static Kernels> {
        if !level.is_supported() {
            return None;
        }
        match level {
            SimdLevel::Scalar => Some(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Sse42 => Some(&x86_tables::SSE42),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => Some(&x86_tables::AVX2),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => Some(&x86_tables::AVX512),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        }
    }

    /// The process-wide kernels (see [`selection`]).
    #[inline]
    pub fn active() -> &'static Kernels {
        ACTIVE.get_or_init(|| Kernels::for_level(selection().level).unwrap_or(&SCALAR))
    }

    /// The level these kernels belong to.
    pub fn level(&self) -> SimdLevel {
        self.level
    }

    /// CRC32C of `data`.
    #[inline]
    pub fn crc32c(&self, data: &[u8]) -> u32 {
        !(self.crc32c_raw)(!0, data)
    }

    /// Continue `crc` (a finished CRC32C of earlier data, or 0 for none) over `data`.
    #[inline]
    pub fn crc32c_update(&self, crc: u32, data: &[u8]) -> u32 {
        !(self.crc32c_raw)(!crc, data)
    }

    /// Whether every byte of `data` is zero; stops at the first non-zero block.
    #[inline]
    pub fn is_zero(&self, data: &[u8]) -> bool {
        (self.is_zero)(data)
    }

    /// `dst ^= src`.
    ///
    /// # Panics
    /// If the lengths differ.
    #[inline]
    pub fn xor_into(&self, dst: &mut [u8], src: &[u8]) {
        assert_eq!(dst.len(), src.len(), "xor_into: lengths differ");
        (self.xor_into)(dst, src)
    }

    /// `out = a ^ b`.
    ///
    /// # Panics
    /// If the lengths differ.
    #[inline]
    pub fn xor_to(&self, out: &mut [u8], a: &[u8], b: &[u8]) {
        assert!(
            out.len() == a.len() && a.len() == b.len(),
            "xor_to: lengths differ"
        );
        (self.xor_to)(out, a, b)
    }

    /// XBZRLE-encode `new` against `old` into `out`; returns the encoded length (0 for an
    /// unchanged page) or [`XbzrleOverflow`] when it would exceed `out.len()`.
    ///
    /// # Panics
    /// If `old` and `new` differ in length.
    #[inline]
    pub fn xbzrle_encode(
        &self,
        old: &[u8],
        new: &[u8],
        out: &mut [u8],
    ) -> Result<usize, XbzrleOverflow> {
        (self.xbzrle_encode)(old, new, out)
    }
}

/// CRC32C of `data` (Castagnoli; `crc32c(b"123456789") == 0xE306_9283`).
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    Kernels::active().crc32c(data)
}

/// Continue a finished CRC32C over more data: `crc32c_update(crc32c(a), b) == crc32c(a ‖ b)`.
#[inline]
pub fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    Kernels::active().crc32c_update(crc, data)
}

/// Whether every byte of `data` is zero.
#[inline]
pub fn is_zero(data: &[u8]) -> bool {
    Kernels::active().is_zero(data)
}

/// `dst ^= src` (equal lengths).
#[inline]
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    Kernels::active().xor_into(dst, src)
}

/// `out = a ^ b` (equal lengths).
#[inline]
pub fn xor_to(out: &mut [u8], a: &[u8], b: &[u8]) {
    Kernels::active().xor_to(out, a, b)
}

/// XBZRLE-encode `new` against `old` (see [`Kernels::xbzrle_encode`]).
#[inline]
pub fn xbzrle_encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, XbzrleOverflow> {
    Kernels::active().xbzrle_encode(old, new, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value_at_every_level() {
        assert_eq!(crc32c_reference(b"123456789"), 0xE306_9283);
        for level in SimdLevel::supported() {
            let k = Kernels::for_level(level).unwrap();
            assert_eq!(k.crc32c(b"123456789"), 0xE306_9283, "{level}");
        }
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn combine_matches_concatenation() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for split in [0, 1, 7, 100, 4096, 9999, 10_000] {
            let (a, b) = data.split_at(split);
            assert_eq!(
                crc32c_combine(crc32c(a), crc32c(b), b.len() as u64),
                crc32c(&data),
                "split at {split}"
            );
            assert_eq!(
                Crc32cCombiner::new(b.len() as u64).combine(crc32c(a), crc32c(b)),
                crc32c(&data)
            );
        }
    }
}
