//! The SPSC ring's single-thread cost per operation (`cargo bench -p dwcp-bench`); the
//! cross-thread comparison against rtrb and crossbeam is in `dwcp-bench kernels`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dwcp_dataplane::ring::channel;
use std::hint::black_box;

fn ring(c: &mut Criterion) {
    let (mut tx, mut rx) = channel::<u64>(1024);
    let mut g = c.benchmark_group("ring-same-thread");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push-pop", |b| {
        b.iter(|| {
            tx.push(black_box(1)).unwrap();
            black_box(rx.pop())
        })
    });
    g.throughput(Throughput::Elements(32));
    let batch = [7u64; 32];
    let mut out = [0u64; 32];
    g.bench_function("push-pop-32", |b| {
        b.iter(|| {
            tx.push_slice(black_box(&batch));
            black_box(rx.pop_slice(&mut out))
        })
    });
    g.finish();
}

criterion_group!(benches, ring);
criterion_main!(benches);
