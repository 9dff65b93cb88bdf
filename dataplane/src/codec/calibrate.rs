//! Measuring what compression would do on this CPU and this memory, off the fast path.
//!
//! The codec policy needs, for each zstd level, the ratio on the guest's pages and the
//! speed per core. [`sample_pages`] copies runs of pages spread over guest memory (the
//! same 16-page runs the workers batch), and [`calibrate`] compresses them in batches of
//! the session's size at each level, timing it. It runs on a thread of its own while the
//! migration goes on, so it measures under the same contention the workers see.

use super::zstd::{Compressor, Dictionary, compress_bound, train_dictionary};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::transport::thread_cpu_time;
use crate::wire::CHUNK_PAGES;
use std::time::{Duration, Instant};

/// Time each level may spend on the sample (at least one batch).
const LEVEL_TIME: Duration = Duration::from_millis(40);

/// Bytes a level compresses first, to find out whether it is slower than the bound
/// asked for. A batch cannot be cut short, and the slow levels' batches are large: on
/// the cross-region path zstd 16 took about 200 ms of CPU for its 1 MiB batch at
/// 5-7 MB/s, then as much again for its dictionary pass after training, on a source
/// whose CPU set the pace, for a level far below the 20 MB/s asked for.
const PROBE_BYTES: usize = 64 << 10;

/// Pages copied out of guest memory for calibration or dictionary training.
#[derive(Debug, Clone, Default)]
pub struct PageSample {
    /// The non-zero pages, back to back, in runs of up to a chunk.
    pub bytes: Vec<u8>,
    /// Pages examined.
    pub examined: usize,
    /// Of those, zero pages (left out of `bytes`).
    pub zero: usize,
}

impl PageSample {
    /// Non-zero pages held.
    pub fn pages(&self) -> usize {
        self.bytes.len() / PAGE_SIZE
    }

    /// The pages as slices (dictionary training wants one sample per page).
    pub fn page_slices(&self) -> Vec<&[u8]> {
        self.bytes.chunks_exact(PAGE_SIZE).collect()
    }
}

/// Copy about `pages` pages of `memory`: whole chunks at evenly spread positions
/// (offset by `seed`, so repeated samples see different chunks), zero pages skipped.
pub fn sample_pages(memory: &GuestMemory, pages: usize, seed: u64) -> PageSample {
    let chunks = memory.pages().div_ceil(CHUNK_PAGES);
    let wanted = pages
        .div_ceil(CHUNK_PAGES as usize)
        .clamp(1, chunks as usize) as u64;
    let stride = (chunks / wanted).max(1);
    let kernels = dwcp_simd::Kernels::active();
    let mut sample = PageSample::default();
    let mut page = vec![0u8; PAGE_SIZE];
    for k in 0..wanted {
        let chunk = (k * stride + seed.wrapping_mul(0x9E37_79B9) % stride) % chunks;
        let first = chunk * CHUNK_PAGES;
        for p in first..(first + CHUNK_PAGES).min(memory.pages()) {
            memory.read_page(p, &mut page);
            sample.examined += 1;
            if kernels.is_zero(&page) {
                sample.zero += 1;
            } else {
                sample.bytes.extend_from_slice(&page);
            }
        }
    }
    sample
}

/// What one zstd level did on a sample.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LevelMeasurement {
    /// The level.
    pub level: i32,
    /// Input bytes over output bytes.
    pub ratio: f64,
    /// Input bytes per second on one core.
    pub bytes_per_second: f64,
    /// The ratio with the session's dictionary, when one was measured.
    pub ratio_with_dictionary: Option<f64>,
}

/// Calibration results.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Calibration {
    /// Non-zero pages compressed.
    pub pages: usize,
    /// Fraction of the examined pages that were zero.
    pub zero_fraction: f64,
    /// One entry per level measured, in the order asked.
    pub levels: Vec<LevelMeasurement>,
    /// Wall time spent.
    pub seconds: f64,
}

impl Calibration {
    /// The measurement of `level`, if taken.
    pub fn level(&self, level: i32) -> Option<&LevelMeasurement> {
        self.levels.iter().find(|l| l.level == level)
    }
}

/// Compress `sample` in batches of `batch_bytes(level)` at each of `levels` (fastest
/// first), with `dictionary` too when given. Levels stop being measured once one is slower than
/// `useful_bytes_per_second`: slower levels only get slower, so none of them could keep
/// up with the link. Each level first compresses [`PROBE_BYTES`]; one that is slower
/// than the bound there is taken at the probe's speed, with the faster level's ratio
/// (a lower bound), and without the dictionary's, since it will not be chosen.
pub fn calibrate(
    sample: &PageSample,
    levels: &[i32],
    batch_bytes: &dyn Fn(i32) -> usize,
    dictionary: Option<&Dictionary>,
    useful_bytes_per_second: f64,
) -> Calibration {
    calibrate_with_progress(
        sample,
        levels,
        batch_bytes,
        dictionary,
        useful_bytes_per_second,
        &mut |_| {},
    )
}

/// [`calibrate`], handing over the results so far after each level (the fast levels
/// are useful long before the slow ones are measured).
pub fn calibrate_with_progress(
    sample: &PageSample,
    levels: &[i32],
    batch_bytes: &dyn Fn(i32) -> usize,
    dictionary: Option<&Dictionary>,
    useful_bytes_per_second: f64,
    progress: &mut dyn FnMut(&Calibration),
) -> Calibration {
    let started = Instant::now();
    let mut out = Calibration {
        pages: sample.pages(),
        zero_fraction: sample.zero as f64 / sample.examined.max(1) as f64,
        ..Calibration::default()
    };
    if sample.bytes.is_empty() {
        return out;
    }
    let mut compressor = Compressor::new();
    let mut packed = Vec::new();
    // Each level compresses batches until the sample is done or its time is up, so
    // the slow levels cost about as much as the fast ones.
    // (ratio, input bytes per second) of `level` on batches of `batch` bytes, for at
    // most `most` bytes.
    let mut run =
        |level: i32, batch: usize, most: usize, dict: Option<&Dictionary>| -> Option<(f64, f64)> {
            packed.resize(compress_bound(batch), 0);
            // CPU time, not wall time: the speed wanted is a core's, and this thread may
            // share its core (it runs at a lower priority than the workers).
            let t = thread_cpu_time();
            let (mut taken, mut packed_total) = (0usize, 0usize);
            for input in sample.bytes.chunks(batch) {
                packed_total += compressor.compress(level, dict, input, &mut packed).ok()?;
                taken += input.len();
                if taken >= most || thread_cpu_time().saturating_sub(t) >= LEVEL_TIME {
                    break;
                }
            }
            let cpu = thread_cpu_time().saturating_sub(t);
            let speed = taken as f64 / cpu.as_secs_f64().max(1e-9);
            Some((taken as f64 / packed_total.max(1) as f64, speed))
        };
    for &level in levels {
        let batch = batch_bytes(level).max(PAGE_SIZE);
        // Where a batch is longer than the probe, the probe first: a level slower than
        // the bound there is taken at the probe's figures.
        let probed = if batch > PROBE_BYTES && sample.bytes.len() > PROBE_BYTES {
            match run(level, PROBE_BYTES, PROBE_BYTES, None) {
                Some((ratio, speed)) if speed < useful_bytes_per_second => Some((ratio, speed)),
                Some(_) => None,
                None => continue,
            }
        } else {
            None
        };
        let (ratio, bytes_per_second) = match probed {
            // 64 KiB say little of the ratio (zstd 12 showed 12.5 on one probe of
            // the cross-region guest, 3.2 on the whole sample): the faster level's
            // stands in, a lower bound, as slower levels compress no worse.
            Some((probe_ratio, speed)) => (
                out.levels.last().map_or(probe_ratio, |faster| faster.ratio),
                speed,
            ),
            None => match run(level, batch, usize::MAX, None) {
                Some(measured) => measured,
                None => continue,
            },
        };
        let too_slow = bytes_per_second < useful_bytes_per_second;
        // Only the ratio is taken with the dictionary, and a first pass (which also
        // prepares the dictionary for the level) gives it as well as a second. A level
        // too slow to be chosen goes without.
        let ratio_with_dictionary = dictionary
            .filter(|_| !too_slow)
            .and_then(|d| run(level, batch, usize::MAX, Some(d)).map(|(r, _)| r));
        out.levels.push(LevelMeasurement {
            level,
            ratio,
            bytes_per_second,
            ratio_with_dictionary,
        });
        out.seconds = started.elapsed().as_secs_f64();
        progress(&out);
        if too_slow {
            break;
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    out
}

/// Train a dictionary of up to `capacity` bytes on the pages of `sample`.
pub fn train(sample: &PageSample, capacity: usize) -> Result<Vec<u8>, super::zstd::ZstdError> {
    train_dictionary(&sample.page_slices(), capacity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{ContentMix, fill_memory};
    use dwcp_hugepages::PagePreference;

    #[test]
    fn samples_skip_zero_pages_and_levels_are_measured_fastest_first() {
        let memory = GuestMemory::anonymous(16 << 20, PagePreference::Small).unwrap();
        fill_memory(&memory, &ContentMix::MEMORY_IMAGE, 7);
        let sample = sample_pages(&memory, 512, 1);
        assert_eq!(sample.examined, 512);
        assert!(sample.zero > 0 && sample.pages() > 0);
        assert_eq!(sample.pages() + sample.zero, sample.examined);
        let batch = |_| 256 << 10;
        let cal = calibrate(&sample, &[-5, 1, 3], &batch, None, 0.0);
        assert_eq!(cal.levels.len(), 3);
        assert!(
            cal.levels
                .iter()
                .all(|l| l.ratio > 1.0 && l.bytes_per_second > 0.0)
        );
        // Asking for more speed than any level has stops after the first.
        let fast_only = calibrate(&sample, &[-5, 1, 3], &batch, None, f64::MAX);
        assert_eq!(fast_only.levels.len(), 1);
        let dict = Dictionary::new(1, train(&sample, 16 << 10).unwrap());
        let with = calibrate(&sample, &[1], &|_| 64 << 10, Some(&dict), 0.0);
        assert!(with.levels[0].ratio_with_dictionary.unwrap() > 1.0);
        // A level too slow for the bound (found on the probe, its batch being longer)
        // is taken without the dictionary's pass, and ends the calibration.
        let too_slow = calibrate(&sample, &[1, 3], &batch, Some(&dict), f64::MAX);
        assert_eq!(too_slow.levels.len(), 1);
        let first = too_slow.levels[0];
        assert!(
            first.ratio > 1.0 && first.bytes_per_second > 0.0,
            "{first:?}"
        );
        assert_eq!(first.ratio_with_dictionary, None);
        let fast_enough = calibrate(&sample, &[1], &batch, Some(&dict), 0.0);
        assert!(fast_enough.levels[0].ratio_with_dictionary.is_some());
    }
}
