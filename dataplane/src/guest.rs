//! A simulated guest: threads that write guest memory the way vCPUs do.
//!
//! Configurable dirty rate, working set, access pattern and page contents; seeded, so a
//! run is reproducible. [`SimulatedGuest::pause`] stops every vCPU (the switchover) and
//! returns only when none is mid-write; [`SimulatedGuest::set_throttle`] slows them by a
//! percentage (auto-converge, as QEMU's CPU throttling does). Implements
//! [`GuestControl`], the engine's only view of a guest.

use crate::dirty::DirtyMarker;
use crate::memory::{GuestMemory, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A guest that could not do what the engine asked (a hypervisor's error, said so).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GuestError(pub String);

/// What the engine may ask of a running guest.
pub trait GuestControl: Send + Sync {
    /// Stop every vCPU; returns once none is writing, with the moment they stopped when
    /// the guest knows it better than the return does (a hypervisor that runs the
    /// guest a little longer while it prepares). On an error the guest may be
    /// half-way: the engine calls [`GuestControl::resume`] to put it back.
    fn pause(&self) -> Result<Option<std::time::Instant>, GuestError>;
    /// Let the vCPUs run again (the migration did not happen). Best effort: a guest
    /// that cannot say why in a return value keeps the reason for its owner's report.
    fn resume(&self);
    /// Slow the vCPUs by `percent` (0 = full speed, 99 = nearly stopped).
    fn set_throttle(&self, percent: u32);
    /// Whether [`GuestControl::set_throttle`] slows the vCPUs at all; the pre-copy
    /// planner does not count on a throttle a guest cannot apply.
    fn can_throttle(&self) -> bool {
        true
    }
    /// The device state that must follow the memory (a hypervisor's CPUs and devices),
    /// for guests that have one.
    fn device_state(&self) -> Option<&dyn DeviceStateSource> {
        None
    }
}

/// A paused guest's device state, sent along with the final round; the destination
/// loads it once it has verified the memory.
pub trait DeviceStateSource: Send + Sync {
    /// The guest is paused: let the hypervisor start saving its device state in the
    /// background while the final round runs. The guest stays stopped; from here on
    /// [`GuestControl::resume`] is how the source takes it back.
    fn release(&self) -> Result<(), GuestError> {
        Ok(())
    }

    /// Pass every chunk of the device state to `sink` as it comes, and return the
    /// bytes handed over once the hypervisor is done.
    fn hand_over(
        &self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), GuestError>,
    ) -> Result<u64, GuestError>;
}

/// Where a destination puts the device state that arrives after the memory.
pub trait DeviceStateSink: Send {
    /// The next chunk, in order.
    fn write(&mut self, chunk: &[u8]) -> Result<(), GuestError>;
    /// Every chunk is in: returns once the guest runs here.
    fn finish(&mut self) -> Result<(), GuestError>;
}

/// Where in the working set vCPUs write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AccessPattern {
    /// Every page of the working set equally likely.
    Uniform,
    /// `hot_share` of the writes go to the first `hot_fraction` of the working set.
    HotCold {
        /// Fraction of the working set that is hot.
        hot_fraction: f64,
        /// Fraction of writes that hit the hot part.
        hot_share: f64,
    },
    /// Pages in order, wrapping around the working set.
    Sequential,
}

/// Relative weights of page contents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContentMix {
    /// All-zero pages.
    pub zero: u32,
    /// ASCII text (words, spaces, newlines).
    pub text: u32,
    /// Records of small integers and pointer-like values.
    pub structured: u32,
    /// Incompressible bytes.
    pub random: u32,
    /// A few bytes changed in place (only meaningful for writes to existing pages).
    pub edit: u32,
    /// Copies of a few common pages (shared libraries, page-cache copies): the same
    /// content at many addresses, what dedup finds.
    pub duplicate: u32,
}

impl ContentMix {
    /// Resembles the memory of a running Linux guest: the reference images in
    /// `../shared/data` have 34% zero pages and compress 3.9× with zstd -1 in 1 MiB
    /// blocks; this mix gives about the same (`dwcp-bench codec --filter mix` compares
    /// them).
    pub const MEMORY_IMAGE: ContentMix = ContentMix {
        zero: 34,
        text: 25,
        structured: 28,
        random: 8,
        edit: 0,
        duplicate: 5,
    };

    /// What a busy guest's writes look like: mostly small edits, some whole pages.
    pub const WRITES: ContentMix = ContentMix {
        zero: 5,
        text: 15,
        structured: 20,
        random: 10,
        edit: 50,
        duplicate: 0,
    };

    /// Only incompressible pages (transport benchmarks).
    pub const RANDOM: ContentMix = ContentMix {
        zero: 0,
        text: 0,
        structured: 0,
        random: 1,
        edit: 0,
        duplicate: 0,
    };

    fn total(&self) -> u32 {
        self.zero + self.text + self.structured + self.random + self.edit + self.duplicate
    }
}

/// How the guest writes.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestWorkload {
    /// Pages dirtied per second, in bytes (pages × 4096). Infinite means as fast as
    /// the vCPUs can write. A throttle of p% scales a finite rate by (100 - p)% and
    /// makes unlimited writers sleep p% of the time.
    pub dirty_rate: f64,
    /// Fraction of memory the vCPUs write to, from its start.
    pub working_set: f64,
    /// Where writes land.
    pub pattern: AccessPattern,
    /// What writes put there.
    pub writes: ContentMix,
    /// Writer threads.
    pub vcpus: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for GuestWorkload {
    fn default() -> Self {
        GuestWorkload {
            dirty_rate: 50e6,
            working_set: 0.25,
            pattern: AccessPattern::HotCold {
                hot_fraction: 0.1,
                hot_share: 0.8,
            },
            writes: ContentMix::WRITES,
            vcpus: 2,
            seed: 0x5EED_D1C9,
        }
    }
}

/// xorshift64*: small, fast, reproducible.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    #[inline]
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "page",
    "memory",
    "migration",
    "of",
    "and",
    "to",
    "a",
    "in",
    "process",
    "thread",
    "buffer",
    "network",
    "socket",
    "file",
    "data",
    "value",
    "return",
    "error",
    "struct",
    "int",
    "void",
    "static",
    "const",
    "for",
    "while",
    "if",
    "else",
    "user",
    "root",
    "system",
    "config",
    "device",
    "driver",
    "/usr/lib",
    "/var/log",
    "0x0000",
    "INFO",
    "WARN",
];

/// Fills page buffers with each kind of content.
struct PageWriter {
    rng: Rng,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Zero,
    Text,
    Structured,
    Random,
    Edit,
    Duplicate,
}

/// How many distinct pages [`Content::Duplicate`] copies.
const COMMON_PAGES: u64 = 64;

impl PageWriter {
    fn pick(&mut self, mix: &ContentMix) -> Content {
        let mut r = self.rng.below(u64::from(mix.total().max(1))) as u32;
        for (weight, kind) in [
            (mix.zero, Content::Zero),
            (mix.text, Content::Text),
            (mix.structured, Content::Structured),
            (mix.random, Content::Random),
            (mix.edit, Content::Edit),
            (mix.duplicate, Content::Duplicate),
        ] {
            if r < weight {
                return kind;
            }
            r -= weight;
        }
        Content::Random
    }

    fn fill(&mut self, kind: Content, page_index: u64, page: &mut [u8; PAGE_SIZE]) {
        match kind {
            Content::Zero | Content::Edit => page.fill(0),
            Content::Text => {
                let mut i = 0;
                while i < PAGE_SIZE {
                    let word = WORDS[self.rng.below(WORDS.len() as u64) as usize].as_bytes();
                    let sep = if self.rng.below(12) == 0 { b'\n' } else { b' ' };
                    for &b in word.iter().chain(std::iter::once(&sep)) {
                        if i == PAGE_SIZE {
                            break;
                        }
                        page[i] = b;
                        i += 1;
                    }
                }
            }
            Content::Structured => {
                let base = self.rng.next() & 0x0000_7fff_ffff_f000;
                for (i, record) in page.chunks_exact_mut(32).enumerate() {
                    record[..8].copy_from_slice(&(page_index * 128 + i as u64).to_le_bytes());
                    record[8..12].copy_from_slice(&(self.rng.below(16) as u32).to_le_bytes());
                    record[12..16].copy_from_slice(&(self.rng.below(4096) as u32).to_le_bytes());
                    let ptr = base + self.rng.below(1 << 12) * 16;
                    record[16..24].copy_from_slice(&ptr.to_le_bytes());
                    record[24..32].fill(0);
                }
            }
            Content::Random => {
                for chunk in page.chunks_exact_mut(8) {
                    chunk.copy_from_slice(&self.rng.next().to_le_bytes());
                }
            }
            Content::Duplicate => {
                // One of a few common pages, each always generated from its own seed.
                let common = self.rng.below(COMMON_PAGES);
                let mut writer = PageWriter {
                    rng: Rng::new(0xC0FF_EE00 + common),
                };
                let kind = if common.is_multiple_of(2) {
                    Content::Text
                } else {
                    Content::Structured
                };
                writer.fill(kind, common, page);
            }
        }
    }

    /// Write one page's worth of `kind` into guest memory.
    fn write(
        &mut self,
        memory: &GuestMemory,
        page_index: u64,
        kind: Content,
        scratch: &mut [u8; PAGE_SIZE],
    ) {
        if kind == Content::Edit {
            // A handful of bytes changed in place, like a counter or a list link.
            for _ in 0..1 + self.rng.below(16) {
                let at = self.rng.below(PAGE_SIZE as u64) as usize;
                let len = (1 + self.rng.below(8) as usize).min(PAGE_SIZE - at);
                let bytes = self.rng.next().to_le_bytes();
                memory.write_at(page_index, at, &bytes[..len]);
            }
        } else {
            self.fill(kind, page_index, scratch);
            memory.write_page(page_index, &scratch[..]);
        }
    }
}

/// Fill all of `memory` with content of `mix` (edits count as zero pages), seeded.
pub fn fill_memory(memory: &GuestMemory, mix: &ContentMix, seed: u64) {
    fill_memory_until(memory, mix, seed, &|| false);
}

/// [`fill_memory`], giving up when `stop` says so (asked every 4096 pages: filling a
/// guest of a few GiB takes seconds, and an operator may cancel meanwhile). Returns
/// whether all of memory was filled.
pub fn fill_memory_until(
    memory: &GuestMemory,
    mix: &ContentMix,
    seed: u64,
    stop: &dyn Fn() -> bool,
) -> bool {
    let mut writer = PageWriter {
        rng: Rng::new(seed),
    };
    let mut scratch = Box::new([0u8; PAGE_SIZE]);
    for page in 0..memory.pages() {
        if page % 4096 == 0 && stop() {
            return false;
        }
        let kind = writer.pick(mix);
        if kind == Content::Zero || kind == Content::Edit {
            memory.zero_page(page);
        } else {
            writer.write(memory, page, kind, &mut scratch);
        }
    }
    true
}

/// Pause/throttle state shared by the vCPUs and their controller.
struct Control {
    state: Mutex<PauseState>,
    changed: Condvar,
    /// Fast-path flag mirroring `state.paused || state.stopping` (Release on set,
    /// Acquire on the vCPU's check; the mutex then orders everything else).
    attention: AtomicBool,
    throttle_percent: AtomicU32,
    pages_written: AtomicU64,
}

struct PauseState {
    paused: bool,
    stopping: bool,
    parked: usize,
    running: usize,
}

/// A running simulated guest.
pub struct SimulatedGuest {
    control: Arc<Control>,
    vcpus: Vec<JoinHandle<()>>,
}

impl SimulatedGuest {
    /// Start `workload.vcpus` writer threads on `memory`. When `marker` is set, every
    /// written page is also marked there (as a hypervisor's dirty log would be).
    pub fn start(
        memory: Arc<GuestMemory>,
        workload: &GuestWorkload,
        marker: Option<DirtyMarker>,
    ) -> Self {
        let vcpus = workload.vcpus.max(1);
        let control = Arc::new(Control {
            state: Mutex::new(PauseState {
                paused: false,
                stopping: false,
                parked: 0,
                running: vcpus,
            }),
            changed: Condvar::new(),
            attention: AtomicBool::new(false),
            throttle_percent: AtomicU32::new(0),
            pages_written: AtomicU64::new(0),
        });
        let handles = (0..vcpus)
            .map(|id| {
                let memory = memory.clone();
                let control = control.clone();
                let marker = marker.clone();
                let workload = workload.clone();
                std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || {
                        vcpu_loop(id, vcpus, &memory, &workload, &control, marker.as_ref())
                    })
                    .expect("spawning a vCPU thread")
            })
            .collect();
        SimulatedGuest {
            control,
            vcpus: handles,
        }
    }

    /// Pages written since start.
    pub fn pages_written(&self) -> u64 {
        self.control.pages_written.load(Ordering::Relaxed)
    }

    /// The current throttle.
    pub fn throttle(&self) -> u32 {
        self.control.throttle_percent.load(Ordering::Relaxed)
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.control.state.lock().map(|s| s.paused).unwrap_or(true)
    }

    /// Stop the vCPUs and wait for them to exit.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Ok(mut s) = self.control.state.lock() {
            s.stopping = true;
        }
        self.control.attention.store(true, Ordering::Release);
        self.control.changed.notify_all();
        for h in self.vcpus.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for SimulatedGuest {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl GuestControl for SimulatedGuest {
    fn pause(&self) -> Result<Option<Instant>, GuestError> {
        let poisoned = || GuestError("a vCPU thread panicked".into());
        let mut s = self.control.state.lock().map_err(|_| poisoned())?;
        s.paused = true;
        self.control.attention.store(true, Ordering::Release);
        // vCPUs idling until their write credit grows wait on `changed`: wake them,
        // so the guest stops within a wake-up rather than within an idle period.
        self.control.changed.notify_all();
        // Wait until every running vCPU has parked: after this no write is in flight,
        // and the mutex orders all of their writes before our return.
        while s.parked < s.running {
            s = self.control.changed.wait(s).map_err(|_| poisoned())?;
        }
        Ok(None)
    }

    fn resume(&self) {
        let Ok(mut s) = self.control.state.lock() else {
            return;
        };
        s.paused = false;
        if !s.stopping {
            self.control.attention.store(false, Ordering::Release);
        }
        drop(s);
        self.control.changed.notify_all();
    }

    fn set_throttle(&self, percent: u32) {
        self.control
            .throttle_percent
            .store(percent.min(99), Ordering::Relaxed);
    }
}

/// Returns false when the vCPU must exit.
fn park_if_asked(control: &Control) -> bool {
    // Acquire: pairs with the Release store in pause()/shutdown().
    if !control.attention.load(Ordering::Acquire) {
        return true;
    }
    let Ok(mut s) = control.state.lock() else {
        return false;
    };
    if s.stopping {
        s.running -= 1;
        control.changed.notify_all();
        return false;
    }
    if s.paused {
        s.parked += 1;
        control.changed.notify_all();
        while s.paused && !s.stopping {
            s = match control.changed.wait(s) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
        s.parked -= 1;
        if s.stopping {
            s.running -= 1;
            control.changed.notify_all();
            return false;
        }
    }
    true
}

/// How long a vCPU with no write credit idles before it looks again.
const VCPU_IDLE: Duration = Duration::from_micros(500);

/// Idle for `period`, or until a pause or shutdown is asked for (a pause is a step of
/// the downtime: a vCPU asleep would hold it up by as much as `period`).
fn idle(control: &Control, period: Duration) {
    let Ok(s) = control.state.lock() else {
        return;
    };
    if s.paused || s.stopping {
        return;
    }
    let _ = control.changed.wait_timeout(s, period);
}

fn vcpu_loop(
    id: usize,
    vcpus: usize,
    memory: &GuestMemory,
    workload: &GuestWorkload,
    control: &Control,
    marker: Option<&DirtyMarker>,
) {
    let ws_pages = ((memory.pages() as f64 * workload.working_set.clamp(0.0, 1.0)) as u64)
        .clamp(1, memory.pages());
    let mut rng = Rng::new(workload.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut writer = PageWriter {
        rng: Rng::new(rng.next()),
    };
    let mut scratch = Box::new([0u8; PAGE_SIZE]);
    let pages_per_second = workload.dirty_rate / PAGE_SIZE as f64 / vcpus as f64;
    let mut sequential = ws_pages * id as u64 / vcpus as u64;
    let mut last = Instant::now();
    let mut credit = 0.0f64;
    loop {
        if !park_if_asked(control) {
            return;
        }
        let throttle = f64::from(control.throttle_percent.load(Ordering::Relaxed));
        let now = Instant::now();
        let rate = pages_per_second * (100.0 - throttle) / 100.0;
        // At most 10 ms of credit, so a pause or a slow scheduler does not turn into a
        // burst afterwards.
        credit = (credit + now.duration_since(last).as_secs_f64() * rate).min(rate * 0.01 + 64.0);
        last = now;
        let mut budget = if rate.is_finite() { credit as u64 } else { 256 };
        if budget == 0 {
            idle(control, VCPU_IDLE);
            continue;
        }
        budget = budget.min(256);
        let work_started = Instant::now();
        for _ in 0..budget {
            let page = match workload.pattern {
                AccessPattern::Uniform => rng.below(ws_pages),
                AccessPattern::HotCold {
                    hot_fraction,
                    hot_share,
                } => {
                    let hot = ((ws_pages as f64 * hot_fraction) as u64).clamp(1, ws_pages);
                    if rng.chance(hot_share) || hot == ws_pages {
                        rng.below(hot)
                    } else {
                        hot + rng.below(ws_pages - hot)
                    }
                }
                AccessPattern::Sequential => {
                    sequential = (sequential + 1) % ws_pages;
                    sequential
                }
            };
            let kind = writer.pick(&workload.writes);
            writer.write(memory, page, kind, &mut scratch);
            if let Some(m) = marker {
                m.mark(page);
            }
        }
        control.pages_written.fetch_add(budget, Ordering::Relaxed);
        if rate.is_finite() {
            credit -= budget as f64;
        } else if throttle > 0.0 {
            // Unlimited writers are throttled as QEMU throttles vCPUs: sleep so that
            // work is only (100 - throttle)% of the time.
            std::thread::sleep(
                work_started
                    .elapsed()
                    .mul_f64(throttle / (100.0 - throttle)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_hugepages::PagePreference;

    fn memory(pages: usize) -> Arc<GuestMemory> {
        Arc::new(GuestMemory::anonymous(pages * PAGE_SIZE, PagePreference::Small).unwrap())
    }

    #[test]
    fn filling_is_reproducible_and_has_the_mix() {
        let a = memory(2048);
        let b = memory(2048);
        fill_memory(&a, &ContentMix::MEMORY_IMAGE, 7);
        fill_memory(&b, &ContentMix::MEMORY_IMAGE, 7);
        let (va, vb) = (a.to_vec(), b.to_vec());
        assert_eq!(va, vb);
        let zero = va
            .chunks(PAGE_SIZE)
            .filter(|p| dwcp_simd::is_zero(p))
            .count();
        let fraction = zero as f64 / 2048.0;
        assert!((0.28..0.40).contains(&fraction), "zero fraction {fraction}");
    }

    #[test]
    fn writes_stay_in_the_working_set_and_pause_stops_them() {
        let mem = memory(1024);
        let (mut log, marker) = crate::dirty::ExplicitDirtyLog::new(mem.pages());
        let workload = GuestWorkload {
            dirty_rate: f64::INFINITY,
            working_set: 0.25,
            pattern: AccessPattern::Uniform,
            ..GuestWorkload::default()
        };
        let guest = SimulatedGuest::start(mem.clone(), &workload, Some(marker));
        while guest.pages_written() < 10_000 {
            std::thread::yield_now();
        }
        guest.pause().unwrap();
        let frozen = mem.to_vec();
        let written = guest.pages_written();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(mem.to_vec(), frozen, "no write while paused");
        assert_eq!(guest.pages_written(), written);
        let mut dirty = crate::dirty::DirtyBitmap::new(mem.pages());
        crate::dirty::DirtyLog::collect(&mut log, &mut dirty).unwrap();
        assert!(dirty.count() > 0);
        assert!(
            dirty.iter().all(|p| p < 256),
            "writes outside the working set"
        );
        guest.resume();
        while guest.pages_written() == written {
            std::thread::yield_now();
        }
        guest.stop();
    }
}
