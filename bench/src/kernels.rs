//! The `kernels` suite: page kernels and the SPSC ring against their baselines.

use crate::measure::{Plan, rate};
use crate::reference;
use crate::report::{Better, Reporter, Spec};
use dwcp_hugepages::{Arena, ArenaOptions, PagePreference};
use dwcp_simd::PAGE_SIZE;
use std::hint::black_box;

/// A deterministic generator for test data.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Page-aligned, pre-faulted memory, as guest pages and pool buffers are.
fn arena(len: usize) -> Arena {
    Arena::new(
        len,
        &ArenaOptions {
            prefer: PagePreference::TransparentHuge,
            numa_node: None,
            populate: true,
        },
    )
    .expect("benchmark memory")
}

const GB: f64 = 1e9;

fn crc32c_and_zero(plan: Plan, out: &mut Reporter) {
    let gbps = |bench, baseline, target| Spec {
        bench,
        unit: "GB/s",
        better: Better::Higher,
        baseline,
        target,
    };
    let pages = |buf: &[u8], f: &dyn Fn(&[u8]) -> u32| {
        let mut acc = 0u32;
        for p in buf.chunks_exact(PAGE_SIZE) {
            acc ^= f(black_box(p));
        }
        black_box(acc);
    };

    // Cache-hot: 16 pages (64 KiB) checksummed over and over.
    let mut hot = arena(64 << 10);
    XorShift(0xC0FFEE).fill(hot.as_mut_slice());
    let hot_gb = hot.len() as f64 / GB;
    let ours = || {
        rate(plan.run_time, hot_gb, || {
            pages(hot.as_slice(), &dwcp_simd::crc32c)
        })
    };
    out.compare(
        plan,
        gbps("crc32c/4k-hot-vs-crc-fast", "crc-fast", Some(1.0)),
        ours,
        || {
            rate(plan.run_time, hot_gb, || {
                pages(hot.as_slice(), &|p| {
                    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, p) as u32
                })
            })
        },
    );
    out.compare(
        plan,
        gbps("crc32c/4k-hot-vs-crc32c", "crc32c crate", None),
        ours,
        || {
            rate(plan.run_time, hot_gb, || {
                pages(hot.as_slice(), &crc32c::crc32c)
            })
        },
    );

    // Streaming: 256 MiB, every page once per pass, against reading it with nothing done.
    let streaming = ["crc32c/4k-stream-vs-readbw", "zero/256m-vs-readbw"];
    if !streaming.iter().any(|b| out.wants(b)) {
        return;
    }
    let mut big = arena(256 << 20);
    XorShift(0xBADC0DE).fill(big.as_mut_slice());
    let stream_plan = Plan {
        runs: plan.runs,
        run_time: plan.run_time * 2,
    };
    let big_gb = big.len() as f64 / GB;
    let read_bandwidth = |buf: &[u8]| {
        rate(stream_plan.run_time, big_gb, || {
            black_box(reference::read_sweep(buf));
        })
    };
    out.compare(
        stream_plan,
        gbps(streaming[0], "read bandwidth", Some(0.9)),
        || {
            rate(stream_plan.run_time, big_gb, || {
                pages(big.as_slice(), &dwcp_simd::crc32c)
            })
        },
        || read_bandwidth(big.as_slice()),
    );

    // Zero-page test over 256 MiB of zero pages (written, so not the shared zero page).
    big.as_mut_slice().fill(0);
    out.compare(
        stream_plan,
        gbps(streaming[1], "read bandwidth", Some(0.9)),
        || {
            rate(stream_plan.run_time, big_gb, || {
                let zero = big
                    .as_slice()
                    .chunks_exact(PAGE_SIZE)
                    .filter(|p| dwcp_simd::is_zero(black_box(p)))
                    .count();
                black_box(zero);
            })
        },
        || read_bandwidth(big.as_slice()),
    );
}

/// How a new page differs from its old copy.
#[derive(Debug, Clone, Copy)]
pub enum EditPattern {
    /// This fraction of bytes changed, at random positions.
    Sparse(f64),
    /// This fraction of bytes changed, in runs of 16 to 256 bytes.
    Clustered(f64),
}

/// `count` (old, new) page pairs laid out back to back.
pub fn page_pairs(count: usize, pattern: EditPattern, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = XorShift(seed);
    let mut old = vec![0u8; count * PAGE_SIZE];
    rng.fill(&mut old);
    let mut new = old.clone();
    for page in new.chunks_exact_mut(PAGE_SIZE) {
        match pattern {
            EditPattern::Sparse(fraction) => {
                let edits = (PAGE_SIZE as f64 * fraction) as usize;
                for _ in 0..edits {
                    let i = rng.below(PAGE_SIZE);
                    page[i] ^= (rng.below(255) + 1) as u8;
                }
            }
            EditPattern::Clustered(fraction) => {
                let mut changed = 0;
                let target = (PAGE_SIZE as f64 * fraction) as usize;
                while changed < target {
                    let len = 16 + rng.below(241);
                    let start = rng.below(PAGE_SIZE - len);
                    for b in &mut page[start..start + len] {
                        *b ^= 0xA5;
                    }
                    changed += len;
                }
            }
        }
    }
    (old, new)
}

fn xbzrle(plan: Plan, out: &mut Reporter) {
    // Cache-hot (16 pairs, 128 KiB) measures the kernels; the last case streams 64 MiB
    // of pairs from memory, where every encoder waits on loads, for information.
    for (name, pattern, pair_count, target) in [
        ("1pct-sparse", EditPattern::Sparse(0.01), 16, Some(2.0)),
        ("10pct-sparse", EditPattern::Sparse(0.10), 16, None),
        ("50pct-clustered", EditPattern::Clustered(0.50), 16, None),
        ("1pct-sparse-64m", EditPattern::Sparse(0.01), 8192, None),
    ] {
        let encode_name = format!("xbzrle-encode/{name}");
        let decode_name = format!("xbzrle-decode/{name}");
        if !out.wants(&encode_name) && !out.wants(&decode_name) {
            continue;
        }
        let (old, new) = page_pairs(pair_count, pattern, 0x5EED ^ name.len() as u64);
        let units = pair_count as f64;
        let pairs = || old.chunks_exact(PAGE_SIZE).zip(new.chunks_exact(PAGE_SIZE));
        let pages_per_s = |bench, target| Spec {
            bench,
            unit: "pages/s",
            better: Better::Higher,
            baseline: "QEMU-shaped scalar",
            target,
        };
        let mut scratch = vec![0u8; PAGE_SIZE];
        let mut scratch2 = vec![0u8; PAGE_SIZE];
        out.compare(
            plan,
            pages_per_s(&encode_name, target),
            || {
                rate(plan.run_time, units, || {
                    for (o, n) in pairs() {
                        black_box(
                            dwcp_simd::xbzrle_encode(black_box(o), black_box(n), &mut scratch).ok(),
                        );
                    }
                })
            },
            || {
                rate(plan.run_time, units, || {
                    for (o, n) in pairs() {
                        black_box(reference::qemu_shaped_encode(
                            black_box(o),
                            black_box(n),
                            &mut scratch2,
                        ));
                    }
                })
            },
        );

        // Decode the same deltas, in place over the old pages (applying a delta twice
        // gives the same page, so every call does the same work).
        let encoded: Vec<Vec<u8>> = pairs()
            .map(|(o, n)| {
                let mut buf = vec![0u8; 2 * PAGE_SIZE];
                let len = dwcp_simd::xbzrle_encode(o, n, &mut buf).expect("fits in two pages");
                buf.truncate(len);
                buf
            })
            .collect();
        let mut ours_pages = old.clone();
        let mut theirs_pages = old.clone();
        out.compare(
            plan,
            pages_per_s(&decode_name, None),
            || {
                rate(plan.run_time, units, || {
                    for (e, p) in encoded.iter().zip(ours_pages.chunks_exact_mut(PAGE_SIZE)) {
                        black_box(dwcp_simd::xbzrle_decode(black_box(e), p).is_ok());
                    }
                })
            },
            || {
                rate(plan.run_time, units, || {
                    for (e, p) in encoded.iter().zip(theirs_pages.chunks_exact_mut(PAGE_SIZE)) {
                        black_box(reference::qemu_shaped_decode(black_box(e), p));
                    }
                })
            },
        );
        if out.wants(&decode_name) {
            assert_eq!(ours_pages, new, "decoded pages match");
        }
    }
}

/// Run the suite.
pub fn run(plan: Plan, out: &mut Reporter) {
    let sel = dwcp_simd::selection();
    eprintln!(
        "kernels: SIMD level {} (best on this CPU: {}){}",
        sel.level,
        sel.best,
        sel.note
            .as_deref()
            .map(|n| format!("; {n}"))
            .unwrap_or_default()
    );
    crc32c_and_zero(plan, out);
    xbzrle(plan, out);
    crate::ring::run(plan, out);
}
