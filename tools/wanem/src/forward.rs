//! The forwarder: one thread per direction reads IP packets from the ingress TUN,
//! lets the direction's [`Impairer`] decide their fate, holds them until their
//! delivery time and writes them to the egress TUN.
//!
//! A thread polls its ingress with a timeout that ends at the next delivery, so it
//! sleeps when the path is idle. Writes to a TUN inject the packet into the receiving
//! namespace's stack synchronously, so the writer never needs to wait for room.
//! Link changes arrive through [`LinkControl`] (a generation counter and a lock taken
//! only when it moves) and are picked up between batches.

use crate::impair::{Fate, Impairer};
use crate::scenario::LinkSpec;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Which way a packet travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Source side to destination side.
    Forward = 0,
    /// Destination side back to source side.
    Reverse = 1,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Forward, Direction::Reverse];

    pub fn name(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }
}

/// Counters of one direction, readable while it runs.
#[derive(Debug, Default)]
pub struct DirectionCounters {
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub lost: AtomicU64,
    pub queue_drops: AtomicU64,
    pub duplicated: AtomicU64,
    pub corrupted: AtomicU64,
    pub reordered: AtomicU64,
    /// Writes the receiving stack refused (not an impairment: a sign of trouble).
    pub write_errors: AtomicU64,
    /// Packets held for later delivery right now.
    pub in_flight: AtomicU64,
}

/// A plain copy of [`DirectionCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectionStats {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub lost: u64,
    pub queue_drops: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    pub reordered: u64,
    pub write_errors: u64,
    pub in_flight: u64,
}

impl DirectionCounters {
    pub fn snapshot(&self) -> DirectionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            packets_in: get(&self.packets_in),
            bytes_in: get(&self.bytes_in),
            packets_out: get(&self.packets_out),
            bytes_out: get(&self.bytes_out),
            lost: get(&self.lost),
            queue_drops: get(&self.queue_drops),
            duplicated: get(&self.duplicated),
            corrupted: get(&self.corrupted),
            reordered: get(&self.reordered),
            write_errors: get(&self.write_errors),
            in_flight: get(&self.in_flight),
        }
    }
}

/// The live link settings, shared by the control side and the forwarding threads.
pub struct LinkControl {
    /// Bumped (Release) after `specs` changes; threads load it (Acquire) every batch
    /// and take the lock only when it moved.
    generation: AtomicU64,
    specs: Mutex<[LinkSpec; 2]>,
    pub counters: [DirectionCounters; 2],
    stop: AtomicBool,
}

impl LinkControl {
    pub fn new(forward: LinkSpec, reverse: LinkSpec) -> Arc<LinkControl> {
        Arc::new(LinkControl {
            generation: AtomicU64::new(0),
            specs: Mutex::new([forward, reverse]),
            counters: Default::default(),
            stop: AtomicBool::new(false),
        })
    }

    pub fn spec(&self, direction: Direction) -> LinkSpec {
        self.specs.lock().unwrap_or_else(|e| e.into_inner())[direction as usize].clone()
    }

    pub fn set(&self, direction: Direction, spec: LinkSpec) {
        self.specs.lock().unwrap_or_else(|e| e.into_inner())[direction as usize] = spec;
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn stats(&self, direction: Direction) -> DirectionStats {
        self.counters[direction as usize].snapshot()
    }
}

/// Packets read per pass before deliveries get a turn.
const READ_BATCH: usize = 64;
/// Longest sleep when nothing is due, so a stop request is seen promptly.
const IDLE_POLL_NS: u64 = 20_000_000;
/// A delivery due sooner than this is waited for by polling rather than by a timer:
/// waking from a timer costs tens of microseconds here, as much as a datacenter
/// path's whole delay.
const SPIN_BELOW_NS: u64 = 100_000;

/// The two forwarding threads.
pub struct Forwarder {
    control: Arc<LinkControl>,
    threads: Vec<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts forwarding `source` → `destination` (forward) and back (reverse).
    /// The fds must stay open until the forwarder is dropped.
    pub fn start(
        source_tun: RawFd,
        destination_tun: RawFd,
        mtu: u32,
        seed: u64,
        control: Arc<LinkControl>,
    ) -> io::Result<Forwarder> {
        let epoch = Instant::now();
        let mut threads = Vec::new();
        for direction in Direction::BOTH {
            let (ingress, egress) = match direction {
                Direction::Forward => (source_tun, destination_tun),
                Direction::Reverse => (destination_tun, source_tun),
            };
            let control = control.clone();
            let thread = std::thread::Builder::new()
                .name(format!("wanem-{}", direction.name()))
                .spawn(move || {
                    DirectionLoop::new(direction, ingress, egress, mtu, seed, control, epoch).run()
                })?;
            threads.push(thread);
        }
        Ok(Forwarder { control, threads })
    }

    pub fn control(&self) -> &Arc<LinkControl> {
        &self.control
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A packet waiting for its delivery time; ordered by (time, arrival sequence).
struct Held {
    at: u64,
    sequence: u64,
    /// Always `buffer_size` long; the packet is its first `len` bytes.
    buffer: Vec<u8>,
    len: usize,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.sequence).cmp(&(other.at, other.sequence))
    }
}

/// Counts kept locally and published once per pass.
#[derive(Default)]
struct PassCounts {
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
    write_errors: u64,
}

struct DirectionLoop {
    direction: Direction,
    ingress: RawFd,
    egress: RawFd,
    buffer_size: usize,
    control: Arc<LinkControl>,
    generation: u64,
    impairer: Impairer,
    held: BinaryHeap<Reverse<Held>>,
    sequence: u64,
    spare: Vec<Vec<u8>>,
    epoch: Instant,
    pass: PassCounts,
}

impl DirectionLoop {
    fn new(
        direction: Direction,
        ingress: RawFd,
        egress: RawFd,
        mtu: u32,
        seed: u64,
        control: Arc<LinkControl>,
        epoch: Instant,
    ) -> DirectionLoop {
        let generation = control.generation.load(Ordering::Acquire);
        let impairer = Impairer::new(control.spec(direction), mtu, seed, direction as u64);
        DirectionLoop {
            direction,
            ingress,
            egress,
            // Room for the largest packet the device may hand us, plus slack so a
            // packet that is somehow longer shows as truncated rather than split.
            buffer_size: mtu as usize + 256,
            control,
            generation,
            impairer,
            held: BinaryHeap::new(),
            sequence: 0,
            spare: Vec::new(),
            epoch,
            pass: PassCounts::default(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn run(mut self) {
        // Delivery times are sub-millisecond: ask for timers without the default 50 µs
        // of slack.
        // SAFETY: prctl with an integer argument changes only this thread's slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
        while !self.control.stop.load(Ordering::Relaxed) {
            let generation = self.control.generation.load(Ordering::Acquire);
            if generation != self.generation {
                self.generation = generation;
                self.impairer.set_spec(self.control.spec(self.direction));
            }
            let read = self.read_batch();
            self.deliver_due();
            self.publish();
            if read < READ_BATCH {
                self.wait();
            }
        }
    }

    /// A full-size buffer: recycled ones keep their length, so no byte is cleared
    /// per packet.
    fn spare_buffer(&mut self) -> Vec<u8> {
        self.spare
            .pop()
            .unwrap_or_else(|| vec![0; self.buffer_size])
    }

    /// Reads up to a batch of packets and decides each one's fate.
    fn read_batch(&mut self) -> usize {
        let mut read = 0;
        while read < READ_BATCH {
            let mut buffer = self.spare_buffer();
            // SAFETY: reading into a buffer of `buffer.len()` writable bytes.
            let n = unsafe { libc::read(self.ingress, buffer.as_mut_ptr().cast(), buffer.len()) };
            if n <= 0 {
                self.spare.push(buffer);
                break;
            }
            read += 1;
            let len = n as usize;
            self.pass.packets_in += 1;
            self.pass.bytes_in += len as u64;
            // Nothing held and nothing to do: straight through.
            if self.held.is_empty() && self.impairer.is_transparent() {
                self.write(&buffer[..len]);
                self.spare.push(buffer);
                continue;
            }
            let now = self.now();
            match self.impairer.admit(now, len) {
                Fate::Dropped(_) => self.spare.push(buffer),
                Fate::Delivered {
                    at,
                    duplicate,
                    corrupt_bit,
                    ..
                } => {
                    if let Some(bit) = corrupt_bit {
                        buffer[bit / 8] ^= 1 << (bit % 8);
                    }
                    if duplicate {
                        let mut copy = self.spare_buffer();
                        copy[..len].copy_from_slice(&buffer[..len]);
                        self.hold(at, copy, len);
                    }
                    self.hold(at, buffer, len);
                }
            }
        }
        read
    }

    fn hold(&mut self, at: u64, buffer: Vec<u8>, len: usize) {
        self.sequence += 1;
        self.held.push(Reverse(Held {
            at,
            sequence: self.sequence,
            buffer,
            len,
        }));
    }

    fn deliver_due(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = self.now();
        while let Some(Reverse(next)) = self.held.peek() {
            if next.at > now {
                break;
            }
            let Some(Reverse(packet)) = self.held.pop() else {
                break;
            };
            self.write(&packet.buffer[..packet.len]);
            self.spare.push(packet.buffer);
        }
    }

    fn write(&mut self, packet: &[u8]) {
        // SAFETY: writing `packet.len()` initialised bytes.
        let n = unsafe { libc::write(self.egress, packet.as_ptr().cast(), packet.len()) };
        if n == packet.len() as isize {
            self.pass.packets_out += 1;
            self.pass.bytes_out += packet.len() as u64;
        } else {
            self.pass.write_errors += 1;
        }
    }

    fn publish(&mut self) {
        let counters = &self.control.counters[self.direction as usize];
        let pass = std::mem::take(&mut self.pass);
        for (counter, value) in [
            (&counters.packets_in, pass.packets_in),
            (&counters.bytes_in, pass.bytes_in),
            (&counters.packets_out, pass.packets_out),
            (&counters.bytes_out, pass.bytes_out),
            (&counters.write_errors, pass.write_errors),
        ] {
            if value > 0 {
                counter.fetch_add(value, Ordering::Relaxed);
            }
        }
        let d = self.impairer.decisions;
        counters.lost.store(d.lost, Ordering::Relaxed);
        counters.queue_drops.store(d.queue_drops, Ordering::Relaxed);
        counters.duplicated.store(d.duplicated, Ordering::Relaxed);
        counters.corrupted.store(d.corrupted, Ordering::Relaxed);
        counters.reordered.store(d.reordered, Ordering::Relaxed);
        counters
            .in_flight
            .store(self.held.len() as u64, Ordering::Relaxed);
    }

    /// Sleeps until the ingress has a packet or the next delivery is due.
    fn wait(&mut self) {
        let timeout_ns = match self.held.peek() {
            Some(Reverse(next)) => next.at.saturating_sub(self.now()).min(IDLE_POLL_NS),
            None => IDLE_POLL_NS,
        };
        if timeout_ns == 0 {
            return;
        }
        if timeout_ns < SPIN_BELOW_NS {
            // Let the other thread on this core run, then read and deliver again.
            std::thread::yield_now();
            return;
        }
        let mut poll = libc::pollfd {
            fd: self.ingress,
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = libc::timespec {
            tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: one valid pollfd and a timespec that outlive the call.
        unsafe { libc::ppoll(&mut poll, 1, &timeout, std::ptr::null()) };
    }
}
