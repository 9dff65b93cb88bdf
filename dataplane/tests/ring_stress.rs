//! Two threads through the SPSC ring: millions of items, every mix of single and batch
//! operations, checked for order, loss and duplication.

use dwcp_dataplane::ring::{Full, channel};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

/// A small xorshift so both sides pick their operation mix reproducibly.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run_sequence(capacity: usize, total: u64, seed: u64) {
    let (mut tx, mut rx) = channel::<u64>(capacity);
    let producer = thread::spawn(move || {
        let mut mix = Mix(seed);
        let mut next = 0u64;
        let mut scratch = [0u64; 64];
        while next < total {
            let pushed = match mix.next() % 3 {
                0 => match tx.push(next) {
                    Ok(()) => 1,
                    Err(Full(v)) => {
                        assert_eq!(v, next, "Full hands back the same value");
                        0
                    }
                },
                1 => {
                    let n = ((mix.next() % 64) as usize + 1).min((total - next) as usize);
                    for (i, slot) in scratch[..n].iter_mut().enumerate() {
                        *slot = next + i as u64;
                    }
                    tx.push_slice(&scratch[..n])
                }
                _ => {
                    let n = (mix.next() % 64) + 1;
                    let mut items = next..(next + n).min(total);
                    tx.push_batch(&mut items)
                }
            };
            next += pushed as u64;
            if pushed == 0 {
                thread::yield_now();
            }
        }
    });
    let mut mix = Mix(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut expected = 0u64;
    let mut out = [0u64; 64];
    while expected < total {
        let got = match mix.next() % 3 {
            0 => match rx.pop() {
                Some(v) => {
                    assert_eq!(v, expected);
                    1
                }
                None => 0,
            },
            1 => {
                let want = (mix.next() % 64) as usize + 1;
                let n = rx.pop_slice(&mut out[..want]);
                for (i, v) in out[..n].iter().enumerate() {
                    assert_eq!(*v, expected + i as u64);
                }
                n
            }
            _ => {
                let mut seen = expected;
                rx.pop_batch((mix.next() % 64) as usize + 1, |v| {
                    assert_eq!(v, seen);
                    seen += 1;
                })
            }
        };
        expected += got as u64;
        if got == 0 {
            thread::yield_now();
        }
    }
    producer.join().unwrap();
    assert_eq!(rx.pop(), None, "nothing beyond the last item");
}

#[test]
fn five_million_items_in_order_through_a_1024_slot_ring() {
    run_sequence(1024, 5_000_000, 0x1234_5678);
}

#[test]
fn one_million_items_in_order_through_a_4_slot_ring() {
    run_sequence(4, 1_000_000, 0xDEAD_BEEF);
}

/// Counts live items so leaks and double drops show.
struct Tracked(u64, Arc<AtomicUsize>);
impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

#[test]
fn owned_items_are_neither_leaked_nor_dropped_twice() {
    let live = Arc::new(AtomicUsize::new(0));
    let total = 300_000u64;
    let (mut tx, mut rx) = channel::<Tracked>(256);
    let live_p = live.clone();
    let producer = thread::spawn(move || {
        let mut next = 0;
        while next < total {
            live_p.fetch_add(1, Ordering::Relaxed);
            let mut item = Tracked(next, live_p.clone());
            loop {
                match tx.push(item) {
                    Ok(()) => break,
                    Err(Full(back)) => {
                        item = back;
                        if tx.is_abandoned() {
                            return; // consumer gone: `item` drops here
                        }
                        thread::yield_now();
                    }
                }
            }
            next += 1;
        }
    });
    // Consume two thirds, then walk away with items still in flight.
    let mut expected = 0;
    while expected < total * 2 / 3 {
        rx.pop_batch(32, |t| {
            assert_eq!(t.0, expected);
            expected += 1;
        });
    }
    drop(rx);
    producer.join().unwrap();
    assert_eq!(
        live.load(Ordering::Relaxed),
        0,
        "every item dropped exactly once"
    );
}
