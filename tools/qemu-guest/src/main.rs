//! The test guest's workload: owns `dwcp.mib` MiB of self-describing pages, rewrites
//! the first `dwcp.hot` of them at `dwcp.rate` pages per second, checks every page each
//! `dwcp.check_s` seconds, and prints a heartbeat each second and every fault it finds
//! on the console. The mixed profile adds `dwcp.ballast_mib` MiB written once with the
//! contents of a Linux guest's memory (text, records, random bytes, zero pages).
//!
//! The write count is also kept outside RAM, in CMOS NVRAM, which a migration carries
//! as device state, exact at the moment the vCPUs stopped. RAM that lags behind the
//! device state (a final round left out) then shows as a count that disagrees, even
//! when every stale page agrees with a stale count in RAM.

use dwcp_qemu_guest::{
    Heartbeat, PREFIX, PageFault, Settings, WORDS, check_page, expected_generation, fill_page,
};
use std::time::{Duration, Instant};

/// Faults printed per check, so a broken guest does not flood the console.
const FAULTS_SHOWN: u64 = 8;

fn main() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (settings, complaints) = Settings::from_cmdline(&cmdline);
    for complaint in complaints {
        println!("{PREFIX} ignoring {complaint}");
    }
    let pages = settings.pages();
    println!(
        "{PREFIX} start pages={pages} hot={} rate={} check_s={} ballast_mib={}",
        settings.hot_pages, settings.rate, settings.check_every_s, settings.ballast_mib
    );
    let mut memory = vec![0u64; pages as usize * WORDS];
    for (index, page) in memory.chunks_exact_mut(WORDS).enumerate() {
        fill_page(page, index as u64, 0);
    }
    let ballast = ballast(settings.ballast_mib);
    println!("{PREFIX} ready ballast_pages={}", ballast.len() / WORDS);

    let started = Instant::now();
    let mut writes = 0u64;
    let mut beat = Heartbeat {
        seq: 0,
        writes: 0,
        checks: 0,
        mismatches: 0,
    };
    let cmos = Cmos::open();
    if cmos.is_none() {
        println!("{PREFIX} no CMOS access: the write count is checked in RAM only");
    }
    let mut next_beat = started + Duration::from_secs(1);
    let mut next_check = started + Duration::from_secs(settings.check_every_s);
    loop {
        let now = Instant::now();
        // The count in RAM against the one kept in the device state, before any write:
        // the last pass stored it, so they differ only when one of the two came back
        // older than the other (a migration that lost the final pages, the workload's
        // own stack among them). Going on from a stale count in RAM would rewrite the
        // very pages left behind and hide them from the check.
        if let Some(cmos) = &cmos {
            let kept = cmos.load();
            if kept != writes {
                println!(
                    "{PREFIX} MISMATCH write count: {writes} in RAM, {kept} in the device state"
                );
                beat.mismatches += 1;
                // Go on from the device's count: the pages tell the rest.
                writes = kept;
            }
        }
        // Writes due by now, at the configured rate.
        let due = (now.duration_since(started).as_secs_f64() * settings.rate as f64) as u64;
        while writes < due && settings.hot_pages > 0 {
            let index = writes % settings.hot_pages;
            let generation = writes / settings.hot_pages + 1;
            let start = index as usize * WORDS;
            fill_page(&mut memory[start..start + WORDS], index, generation);
            writes += 1;
        }
        if let Some(cmos) = &cmos {
            cmos.store(writes);
        }
        if now >= next_check {
            beat.mismatches += check_all(&memory, settings.hot_pages, writes);
            beat.checks += 1;
            next_check = Instant::now() + Duration::from_secs(settings.check_every_s);
        }
        if now >= next_beat {
            beat.writes = writes;
            println!("{}", beat.line());
            beat.seq += 1;
            next_beat += Duration::from_secs(1);
            if next_beat < now {
                // The guest was stopped (a migration's downtime): no burst of beats.
                next_beat = now + Duration::from_secs(1);
            }
        }
        // Short ticks: writes keep coming however briefly the guest runs.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The write count in CMOS NVRAM bytes 0x40..0x48 (free for the OS; QEMU's RTC keeps
/// all 128 bytes and migrates them).
struct Cmos;

unsafe extern "C" {
    /// glibc's `ioperm(2)`.
    fn ioperm(
        from: std::ffi::c_ulong,
        num: std::ffi::c_ulong,
        turn_on: std::ffi::c_int,
    ) -> std::ffi::c_int;
}

impl Cmos {
    const INDEX: u16 = 0x70;
    const DATA: u16 = 0x71;
    const FIRST: u8 = 0x40;

    /// Access to the CMOS ports (root, which the guest's only program is).
    fn open() -> Option<Cmos> {
        // SAFETY: asks the kernel for access to two I/O ports; no memory is involved.
        (unsafe { ioperm(Self::INDEX.into(), 2, 1) } == 0).then_some(Cmos)
    }

    fn write(&self, register: u8, value: u8) {
        // SAFETY: `open` obtained the ports; writing the CMOS index then data register
        // touches only NVRAM byte `register`, which nothing else in this guest uses.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") Self::INDEX, in("al") register);
            std::arch::asm!("out dx, al", in("dx") Self::DATA, in("al") value);
        }
    }

    fn read(&self, register: u8) -> u8 {
        let value: u8;
        // SAFETY: as in `write`; reading NVRAM has no side effect.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") Self::INDEX, in("al") register);
            std::arch::asm!("in al, dx", in("dx") Self::DATA, out("al") value);
        }
        value
    }

    fn store(&self, count: u64) {
        for (i, byte) in count.to_le_bytes().into_iter().enumerate() {
            self.write(Self::FIRST + i as u8, byte);
        }
    }

    fn load(&self) -> u64 {
        let mut bytes = [0u8; 8];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = self.read(Self::FIRST + i as u8);
        }
        u64::from_le_bytes(bytes)
    }
}

/// Check every page against the write count; returns the pages found wrong.
fn check_all(memory: &[u64], hot: u64, writes: u64) -> u64 {
    let mut faults = 0;
    for (index, page) in memory.chunks_exact(WORDS).enumerate() {
        let index = index as u64;
        let want = expected_generation(index, hot, writes);
        if let Some(fault) = check_page(page, index, want) {
            faults += 1;
            if faults <= FAULTS_SHOWN {
                let what = match fault {
                    PageFault::Index { found } => format!("holds page {found}"),
                    PageFault::Generation { found } => format!("generation {found}"),
                    PageFault::Pattern { word } => format!("pattern broken at word {word}"),
                };
                println!("{PREFIX} MISMATCH page={index} want generation {want}: {what}");
            }
        }
    }
    if faults > 0 {
        println!("{PREFIX} check found {faults} bad pages after {writes} writes");
    }
    faults
}

/// Memory written once with a Linux guest's mix: 34% zero pages, 25% text, 28% records,
/// 8% random bytes, 5% copies of one page.
fn ballast(mib: u64) -> Vec<u64> {
    let pages = (mib * (1 << 20) / 4096) as usize;
    let mut memory = vec![0u64; pages * WORDS];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    const WORDS_OF_TEXT: [&[u8; 8]; 8] = [
        b"the page",
        b" cache o",
        b"f a syst",
        b"em holds",
        b" librari",
        b"es, logs",
        b" and con",
        b"figs.\n  ",
    ];
    for (n, page) in memory.chunks_exact_mut(WORDS).enumerate() {
        match n % 100 {
            // Zero pages: touched, so the guest really holds them.
            0..34 => page[0] = 0,
            34..59 => {
                for word in page.iter_mut() {
                    *word = u64::from_le_bytes(*WORDS_OF_TEXT[(next() % 8) as usize]);
                }
            }
            59..87 => {
                for (k, word) in page.iter_mut().enumerate() {
                    *word = match k % 4 {
                        0 => n as u64 * 64 + k as u64,
                        1 => 0xffff_8880_0000_0000 | (next() & 0xffff_f000),
                        2 => next() % 1000,
                        _ => 0,
                    };
                }
            }
            87..95 => page.iter_mut().for_each(|w| *w = next()),
            _ => page
                .iter_mut()
                .enumerate()
                .for_each(|(k, w)| *w = k as u64 * 0x0101),
        }
    }
    memory
}
