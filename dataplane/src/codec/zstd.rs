//! zstd through `zstd-sys`: compression and decompression contexts that live as long
//! as their worker (no allocation per batch), dictionaries, and dictionary training.
//!
//! Every call checks zstd's return codes; decompression is bounded by the caller's
//! output buffer, so a malformed frame is an error and never a write past the buffer.

use std::collections::HashMap;
use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;
use zstd_sys as sys;

/// A zstd failure, with zstd's own description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("zstd {what}: {reason}")]
pub struct ZstdError {
    /// What was being done.
    pub what: &'static str,
    /// zstd's error name.
    pub reason: String,
}

fn check(what: &'static str, code: usize) -> Result<usize, ZstdError> {
    // SAFETY: ZSTD_isError is a pure function of its argument.
    if unsafe { sys::ZSTD_isError(code) } != 0 {
        // SAFETY: ZSTD_getErrorName returns a static NUL-terminated string.
        let name = unsafe { CStr::from_ptr(sys::ZSTD_getErrorName(code)) };
        return Err(ZstdError {
            what,
            reason: name.to_string_lossy().into_owned(),
        });
    }
    Ok(code)
}

/// Largest compressed size of `len` input bytes.
pub fn compress_bound(len: usize) -> usize {
    // SAFETY: a pure function of its argument.
    unsafe { sys::ZSTD_compressBound(len) }
}

/// The fastest and strongest levels this zstd accepts.
pub fn level_range() -> (i32, i32) {
    // SAFETY: pure functions.
    unsafe { (sys::ZSTD_minCLevel(), sys::ZSTD_maxCLevel()) }
}

/// A trained dictionary, shared by everything that compresses or decompresses with it.
#[derive(Debug)]
pub struct Dictionary {
    id: u32,
    bytes: Box<[u8]>,
}

impl Dictionary {
    /// Wrap dictionary bytes under `id` (the id both sides use to name it).
    pub fn new(id: u32, bytes: Vec<u8>) -> Self {
        Dictionary {
            id,
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// The id frames name it by.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The dictionary's bytes (what is sent to the destination).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Train a dictionary of at most `capacity` bytes from `samples` (e.g. pages).
pub fn train_dictionary(samples: &[&[u8]], capacity: usize) -> Result<Vec<u8>, ZstdError> {
    let mut joined = Vec::with_capacity(samples.iter().map(|s| s.len()).sum());
    let mut sizes = Vec::with_capacity(samples.len());
    for s in samples {
        joined.extend_from_slice(s);
        sizes.push(s.len());
    }
    let mut dict = vec![0u8; capacity];
    // SAFETY: `dict` is writable for `capacity` bytes; `joined` holds the samples whose
    // sizes `sizes` lists, `sizes.len()` of them.
    let len = unsafe {
        sys::ZDICT_trainFromBuffer(
            dict.as_mut_ptr().cast(),
            capacity,
            joined.as_ptr().cast(),
            sizes.as_ptr(),
            sizes.len() as u32,
        )
    };
    // SAFETY: a pure function of its argument.
    if unsafe { sys::ZDICT_isError(len) } != 0 {
        // SAFETY: a static NUL-terminated string.
        let name = unsafe { CStr::from_ptr(sys::ZDICT_getErrorName(len)) };
        return Err(ZstdError {
            what: "dictionary training",
            reason: name.to_string_lossy().into_owned(),
        });
    }
    dict.truncate(len);
    Ok(dict)
}

/// One compression context plus prepared dictionaries, per worker.
pub struct Compressor {
    cctx: NonNull<sys::ZSTD_CCtx>,
    /// Prepared dictionaries by (dictionary id, level): preparing one costs more than
    /// compressing a batch, so it is done once.
    cdicts: HashMap<(u32, i32), NonNull<sys::ZSTD_CDict>>,
}

// SAFETY: the context is used by one thread at a time (the owner's); zstd contexts may
// move between threads.
unsafe impl Send for Compressor {}

impl Compressor {
    /// A new context.
    pub fn new() -> Self {
        // SAFETY: allocates a context; checked for null below.
        let cctx = NonNull::new(unsafe { sys::ZSTD_createCCtx() })
            .expect("ZSTD_createCCtx: out of memory");
        Compressor {
            cctx,
            cdicts: HashMap::new(),
        }
    }

    /// Compress `src` into `dst` at `level`, with `dictionary` if given. Returns the
    /// compressed length; fails when `dst` is too small (give it
    /// [`compress_bound`]`(src.len())`).
    pub fn compress(
        &mut self,
        level: i32,
        dictionary: Option<&Dictionary>,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<usize, ZstdError> {
        let code = match dictionary {
            None => {
                // SAFETY: `cctx` is ours; src/dst are valid for their lengths.
                unsafe {
                    sys::ZSTD_compressCCtx(
                        self.cctx.as_ptr(),
                        dst.as_mut_ptr().cast(),
                        dst.len(),
                        src.as_ptr().cast(),
                        src.len(),
                        level,
                    )
                }
            }
            Some(dict) => {
                let cdict = match self.cdicts.get(&(dict.id, level)) {
                    Some(c) => *c,
                    None => {
                        // SAFETY: the dictionary bytes are valid; zstd copies them into
                        // the CDict (ZSTD_createCDict does not reference the buffer).
                        let c = unsafe {
                            sys::ZSTD_createCDict(
                                dict.bytes.as_ptr().cast(),
                                dict.bytes.len(),
                                level,
                            )
                        };
                        let c = NonNull::new(c).ok_or(ZstdError {
                            what: "preparing a dictionary",
                            reason: "out of memory or invalid dictionary".into(),
                        })?;
                        self.cdicts.insert((dict.id, level), c);
                        c
                    }
                };
                // SAFETY: `cctx` and `cdict` are ours; src/dst are valid.
                unsafe {
                    sys::ZSTD_compress_usingCDict(
                        self.cctx.as_ptr(),
                        dst.as_mut_ptr().cast(),
                        dst.len(),
                        src.as_ptr().cast(),
                        src.len(),
                        cdict.as_ptr(),
                    )
                }
            }
        };
        check("compression", code)
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        for c in self.cdicts.values() {
            // SAFETY: created by ZSTD_createCDict and not freed before.
            unsafe { sys::ZSTD_freeCDict(c.as_ptr()) };
        }
        // SAFETY: created by ZSTD_createCCtx and not freed before.
        unsafe { sys::ZSTD_freeCCtx(self.cctx.as_ptr()) };
    }
}

/// One decompression context plus the dictionaries a stream announced.
pub struct Decompressor {
    dctx: NonNull<sys::ZSTD_DCtx>,
    ddicts: HashMap<u32, NonNull<sys::ZSTD_DDict>>,
}

// SAFETY: as for Compressor.
unsafe impl Send for Decompressor {}

impl Decompressor {
    /// A new context.
    pub fn new() -> Self {
        // SAFETY: allocates a context; checked for null below.
        let dctx = NonNull::new(unsafe { sys::ZSTD_createDCtx() })
            .expect("ZSTD_createDCtx: out of memory");
        Decompressor {
            dctx,
            ddicts: HashMap::new(),
        }
    }

    /// Register dictionary `id` from its bytes (as received).
    pub fn add_dictionary(&mut self, id: u32, bytes: &[u8]) -> Result<(), ZstdError> {
        // SAFETY: zstd copies the bytes into the DDict.
        let d = unsafe { sys::ZSTD_createDDict(bytes.as_ptr().cast(), bytes.len()) };
        let d = NonNull::new(d).ok_or(ZstdError {
            what: "loading a dictionary",
            reason: "out of memory or invalid dictionary".into(),
        })?;
        if let Some(old) = self.ddicts.insert(id, d) {
            // SAFETY: created by ZSTD_createDDict, replaced now.
            unsafe { sys::ZSTD_freeDDict(old.as_ptr()) };
        }
        Ok(())
    }

    /// Whether dictionary `id` is known.
    pub fn has_dictionary(&self, id: u32) -> bool {
        self.ddicts.contains_key(&id)
    }

    /// Decompress `src` into `dst` (dictionary `dict_id`, 0 for none); returns the
    /// decompressed length. Output that would not fit in `dst` is an error.
    pub fn decompress(
        &mut self,
        dict_id: u32,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<usize, ZstdError> {
        let code = if dict_id == 0 {
            // SAFETY: `dctx` is ours; zstd writes at most `dst.len()` bytes.
            unsafe {
                sys::ZSTD_decompressDCtx(
                    self.dctx.as_ptr(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    src.as_ptr().cast(),
                    src.len(),
                )
            }
        } else {
            let d = *self.ddicts.get(&dict_id).ok_or(ZstdError {
                what: "decompression",
                reason: format!("unknown dictionary {dict_id}"),
            })?;
            // SAFETY: as above, with a DDict we own.
            unsafe {
                sys::ZSTD_decompress_usingDDict(
                    self.dctx.as_ptr(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    src.as_ptr().cast(),
                    src.len(),
                    d.as_ptr(),
                )
            }
        };
        check("decompression", code)
    }
}

impl Default for Decompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        for d in self.ddicts.values() {
            // SAFETY: created by ZSTD_createDDict and not freed before.
            unsafe { sys::ZSTD_freeDDict(d.as_ptr()) };
        }
        // SAFETY: created by ZSTD_createDCtx and not freed before.
        unsafe { sys::ZSTD_freeDCtx(self.dctx.as_ptr()) };
    }
}

/// Shared dictionaries are handed around as `Arc<Dictionary>`.
pub type SharedDictionary = Arc<Dictionary>;

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize, seed: u64) -> Vec<u8> {
        let words = ["page", "memory", "kernel", "migration", "stream", "round "];
        let mut out = Vec::with_capacity(n);
        let mut x = seed | 1;
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(words[(x % 6) as usize].as_bytes());
            out.push(b' ');
        }
        out.truncate(n);
        out
    }

    #[test]
    fn round_trips_with_and_without_a_dictionary() {
        let samples: Vec<Vec<u8>> = (0..64).map(|i| text(4096, i)).collect();
        let refs: Vec<&[u8]> = samples.iter().map(|s| &s[..]).collect();
        let dict = Dictionary::new(7, train_dictionary(&refs, 16 << 10).unwrap());
        let input = text(64 << 10, 999);
        let mut c = Compressor::new();
        let mut d = Decompressor::new();
        d.add_dictionary(7, dict.bytes()).unwrap();
        for (dict, id) in [(None, 0), (Some(&dict), 7)] {
            for level in [-5, 1, 3] {
                let mut packed = vec![0u8; compress_bound(input.len())];
                let n = c.compress(level, dict, &input, &mut packed).unwrap();
                assert!(n < input.len() / 2, "text compresses");
                let mut out = vec![0u8; input.len()];
                assert_eq!(
                    d.decompress(id, &packed[..n], &mut out).unwrap(),
                    input.len()
                );
                assert_eq!(out, input);
            }
        }
    }

    #[test]
    fn malformed_or_oversized_frames_are_errors() {
        let mut c = Compressor::new();
        let mut d = Decompressor::new();
        let input = text(10_000, 1);
        let mut packed = vec![0u8; compress_bound(input.len())];
        let n = c.compress(1, None, &input, &mut packed).unwrap();
        let mut small = vec![0u8; 100];
        assert!(
            d.decompress(0, &packed[..n], &mut small).is_err(),
            "output larger than the buffer"
        );
        let mut out = vec![0u8; 20_000];
        assert!(
            d.decompress(0, &packed[..n / 2], &mut out).is_err(),
            "truncated"
        );
        assert!(d.decompress(0, b"definitely not zstd", &mut out).is_err());
        assert!(
            d.decompress(5, &packed[..n], &mut out).is_err(),
            "unknown dictionary"
        );
    }
}
