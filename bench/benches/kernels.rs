//! Per-kernel detail at every SIMD level this CPU supports (`cargo bench -p dwcp-bench`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dwcp_bench::kernels::{EditPattern, XorShift, page_pairs};
use dwcp_simd::{Kernels, PAGE_SIZE, SimdLevel};
use std::hint::black_box;

fn levels() -> Vec<&'static Kernels> {
    SimdLevel::supported()
        .into_iter()
        .filter_map(Kernels::for_level)
        .collect()
}

fn crc32c(c: &mut Criterion) {
    let mut page = vec![0u8; PAGE_SIZE];
    XorShift(1).fill(&mut page);
    let mut g = c.benchmark_group("crc32c-4k");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for k in levels() {
        g.bench_function(k.level().name(), |b| b.iter(|| k.crc32c(black_box(&page))));
    }
    g.finish();
}

fn zero(c: &mut Criterion) {
    let page = vec![0u8; PAGE_SIZE];
    let mut g = c.benchmark_group("zero-4k");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for k in levels() {
        g.bench_function(k.level().name(), |b| b.iter(|| k.is_zero(black_box(&page))));
    }
    g.finish();
}

fn xor(c: &mut Criterion) {
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b_page = vec![0u8; PAGE_SIZE];
    XorShift(2).fill(&mut a);
    XorShift(3).fill(&mut b_page);
    let mut g = c.benchmark_group("xor-into-4k");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for k in levels() {
        g.bench_function(k.level().name(), |b| {
            b.iter(|| k.xor_into(black_box(&mut a), &b_page))
        });
    }
    g.finish();
}

fn xbzrle(c: &mut Criterion) {
    for (name, pattern) in [
        ("1pct-sparse", EditPattern::Sparse(0.01)),
        ("10pct-sparse", EditPattern::Sparse(0.10)),
        ("50pct-clustered", EditPattern::Clustered(0.50)),
    ] {
        let (old, new) = page_pairs(1, pattern, 7);
        let mut out = vec![0u8; 2 * PAGE_SIZE];
        let mut g = c.benchmark_group(format!("xbzrle-encode-{name}"));
        g.throughput(Throughput::Elements(1));
        for k in levels() {
            g.bench_function(k.level().name(), |b| {
                b.iter(|| k.xbzrle_encode(black_box(&old), black_box(&new), &mut out))
            });
        }
        g.finish();
        let n = dwcp_simd::xbzrle_encode(&old, &new, &mut out).unwrap();
        let encoded = out[..n].to_vec();
        let mut page = old.clone();
        c.bench_function(&format!("xbzrle-decode-{name}"), |b| {
            b.iter(|| dwcp_simd::xbzrle_decode(black_box(&encoded), &mut page))
        });
    }
}

criterion_group!(benches, crc32c, zero, xor, xbzrle);
criterion_main!(benches);
