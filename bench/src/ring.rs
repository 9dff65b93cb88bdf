//! The SPSC ring against rtrb and crossbeam's `ArrayQueue`: u64 items from one pinned
//! thread to another, single items and batches of 32.

use crate::measure::Plan;
use crate::report::{Better, Reporter, Spec};
use std::hint::spin_loop;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

const CAPACITY: usize = 1024;

/// Which CPUs the two sides run on: different ones when the machine has two.
fn cpus() -> (Option<usize>, Option<usize>) {
    let ids = core_ids();
    match ids.as_slice() {
        [] => (None, None),
        [only] => (Some(*only), Some(*only)),
        [a, b, ..] => (Some(*a), Some(*b)),
    }
}

fn core_ids() -> Vec<usize> {
    dwcp_hugepages::numa::topology()
        .map(|t| t.nodes.into_iter().flat_map(|n| n.cpus).collect())
        .unwrap_or_default()
}

fn pin(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let _ = dwcp_hugepages::numa::pin_current_thread(cpu);
    }
}

/// Time `items` u64s through a producer closure and a consumer closure on two threads;
/// returns million items per second. The consumer checks order.
fn transfer<P, C>(items: u64, produce: P, consume: C) -> f64
where
    P: FnOnce(u64) + Send + 'static,
    C: FnOnce(u64) + Send + 'static,
{
    let (cpu_p, cpu_c) = cpus();
    let start = Arc::new(std::sync::Barrier::new(3));
    let sp = start.clone();
    let producer = thread::spawn(move || {
        pin(cpu_p);
        sp.wait();
        produce(items);
    });
    let sc = start.clone();
    let consumer = thread::spawn(move || {
        pin(cpu_c);
        sc.wait();
        consume(items);
    });
    start.wait();
    let t = Instant::now();
    producer.join().expect("producer");
    consumer.join().expect("consumer");
    items as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn ours_single(items: u64) -> f64 {
    let (mut tx, mut rx) = dwcp_dataplane::ring::channel::<u64>(CAPACITY);
    transfer(
        items,
        move |n| {
            for i in 0..n {
                let mut v = i;
                while let Err(full) = tx.push(v) {
                    v = full.0;
                    spin_loop();
                }
            }
        },
        move |n| {
            let mut expected = 0;
            while expected < n {
                match rx.pop() {
                    Some(v) => {
                        assert_eq!(v, expected);
                        expected += 1;
                    }
                    None => spin_loop(),
                }
            }
        },
    )
}

fn ours_batch32(items: u64) -> f64 {
    let (mut tx, mut rx) = dwcp_dataplane::ring::channel::<u64>(CAPACITY);
    transfer(
        items,
        move |n| {
            let mut next = 0;
            let mut batch = [0u64; 32];
            while next < n {
                let len = 32.min((n - next) as usize);
                for (k, slot) in batch[..len].iter_mut().enumerate() {
                    *slot = next + k as u64;
                }
                let mut sent = 0;
                while sent < len {
                    let pushed = tx.push_slice(&batch[sent..len]);
                    if pushed == 0 {
                        spin_loop();
                    }
                    sent += pushed;
                }
                next += len as u64;
            }
        },
        move |n| {
            let mut expected = 0;
            let mut out = [0u64; 32];
            while expected < n {
                let got = rx.pop_slice(&mut out);
                if got == 0 {
                    spin_loop();
                }
                for v in &out[..got] {
                    assert_eq!(*v, expected);
                    expected += 1;
                }
            }
        },
    )
}

fn rtrb_single(items: u64) -> f64 {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u64>::new(CAPACITY);
    transfer(
        items,
        move |n| {
            for i in 0..n {
                while tx.push(i).is_err() {
                    spin_loop();
                }
            }
        },
        move |n| {
            let mut expected = 0;
            while expected < n {
                match rx.pop() {
                    Ok(v) => {
                        assert_eq!(v, expected);
                        expected += 1;
                    }
                    Err(_) => spin_loop(),
                }
            }
        },
    )
}

fn array_queue_single(items: u64) -> f64 {
    let q = Arc::new(crossbeam::queue::ArrayQueue::<u64>::new(CAPACITY));
    let qc = q.clone();
    transfer(
        items,
        move |n| {
            for i in 0..n {
                let mut v = i;
                while let Err(back) = q.push(v) {
                    v = back;
                    spin_loop();
                }
            }
        },
        move |n| {
            let mut expected = 0;
            while expected < n {
                match qc.pop() {
                    Some(v) => {
                        assert_eq!(v, expected);
                        expected += 1;
                    }
                    None => spin_loop(),
                }
            }
        },
    )
}

/// Run the ring comparisons.
pub fn run(plan: Plan, out: &mut Reporter) {
    // Enough items that a run lasts about the plan's run time at ~100 M items/s.
    let items = (plan.run_time.as_secs_f64() * 100e6) as u64;
    if cpus().0 == cpus().1 {
        eprintln!("ring: one CPU available, both sides share it");
    }
    let spec = |bench, baseline, target| Spec {
        bench,
        unit: "Mitems/s",
        better: Better::Higher,
        baseline,
        target,
    };
    out.compare(
        plan,
        spec("ring/single-vs-rtrb", "rtrb", Some(1.0)),
        || ours_single(items),
        || rtrb_single(items),
    );
    out.compare(
        plan,
        spec("ring/single-vs-arrayqueue", "crossbeam ArrayQueue", None),
        || ours_single(items),
        || array_queue_single(items),
    );
    out.compare(
        plan,
        spec(
            "ring/batch32-vs-single",
            "dwcp ring, single items",
            Some(3.0),
        ),
        || ours_batch32(items),
        || ours_single(items),
    );
}
