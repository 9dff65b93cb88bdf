//! The `codec` suite, on the reference guest RAM images (`../shared/data/guest-ram`).
//!
//! - `codec/zstd-4k-vs-cli`: our zstd path compressing every 4 KiB page of t0 on one
//!   core against the `zstd` command's own benchmark (`zstd -b1 -B4K`) on the same file.
//! - `codec/wire-vs-zero-xbzrle`, `codec/wire-vs-zstd1`: bytes on the wire for sending
//!   t0 and then the pages that changed in t1, through the same frame encoders the
//!   workers use, on as many streams as a migration uses: (a) zero-page elision only,
//!   (b) zero + XBZRLE (QEMU's combination), (c) zstd -1 of every page, (d) our full
//!   pipeline at the level the policy chose on the 100 Mbit/s link.
//! - `codec/time-100m`, `codec/time-1g`, `codec/time-unlimited`: the same migration
//!   end to end through a token bucket (`tc tbf` on the loopback device of a private
//!   network namespace), with the codec policy against codecs off.
//! - `codec/mix-*`: the simulated guest's zero-page fraction and zstd ratio beside the
//!   real image's.

use crate::measure::{Plan, Samples};
use crate::report::{Better, Comparison, Reporter};
use dwcp_control::codec_policy::{ModelPolicy, PolicyConfig};
use dwcp_dataplane::codec::policy::{CodecConfig, CodecMode};
use dwcp_dataplane::codec::zstd::{Compressor, Dictionary, compress_bound};
use dwcp_dataplane::codec::{CodecSettings, StreamCodec, WorkerCodec, calibrate};
use dwcp_dataplane::engine::{DestConfig, SourceConfig};
use dwcp_dataplane::guest::{ContentMix, fill_memory};
use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_dataplane::transport::frames::{stage_run, stage_space};
use dwcp_dataplane::wire::{CHUNK_PAGES, stream_of};
use dwcp_hugepages::PagePreference;
use dwcp_tests::images::{GuestImages, guest_images, migrate_images};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// Streams the wire-bytes comparison encodes for (the default of a migration).
const STREAMS: u16 = 4;

/// Run the suite.
pub fn run(plan: Plan, out: &mut Reporter) {
    let images = match guest_images() {
        Ok(i) => i,
        Err(why) => {
            eprintln!("codec suite skipped: {why}");
            return;
        }
    };
    eprintln!(
        "guest images: {} pages each, {:.1}% zero in t0, {} pages changed in t1",
        images.pages(),
        images.zero_fraction() * 100.0,
        images.changed_pages().len()
    );
    if out.wants("codec/zstd-4k-vs-cli") {
        zstd_vs_cli(plan, out, &images);
    }
    if out.wants("codec/mix-zero-fraction") || out.wants("codec/mix-zstd1-ratio") {
        content_mix(out, &images);
    }
    let mut chosen_level = None;
    if ["codec/time-100m", "codec/time-1g", "codec/time-unlimited"]
        .iter()
        .any(|n| out.wants(n))
    {
        chosen_level = migration_times(plan, out, &images);
    }
    if [
        "codec/wire-vs-zero-only",
        "codec/wire-vs-zero-xbzrle",
        "codec/wire-vs-zstd1",
        "codec/wire-vs-zstd1-strongest",
        "codec/dictionary-gain",
    ]
    .iter()
    .any(|n| out.wants(n))
    {
        wire_bytes(out, &images, chosen_level);
    }
}

// ---------------------------------------------------------------------------------
// zstd on 4 KiB pages against the zstd command
// ---------------------------------------------------------------------------------

/// Compress every page of `data` on its own at level 1; (MB/s, ratio).
fn our_zstd_4k(data: &[u8]) -> (f64, f64) {
    let mut c = Compressor::new();
    let mut out = vec![0u8; compress_bound(PAGE_SIZE)];
    let started = Instant::now();
    let mut packed = 0usize;
    for page in data.chunks(PAGE_SIZE) {
        packed += c.compress(1, None, page, &mut out).expect("compress");
    }
    let seconds = started.elapsed().as_secs_f64();
    (
        data.len() as f64 / 1e6 / seconds,
        data.len() as f64 / packed as f64,
    )
}

/// `zstd -b1 -B4K -i1` on `path`; (compression MB/s, ratio) from its report.
fn cli_zstd_4k(path: &std::path::Path) -> Result<(f64, f64), String> {
    let out = Command::new("zstd")
        .args(["-b1", "-B4K", "-i1"])
        .arg(path)
        .output()
        .map_err(|e| format!("zstd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stderr).replace('\r', "\n")
        + &String::from_utf8_lossy(&out.stdout);
    // The last progress line holds the final figures: "... (x3.688),  310.2 MB/s, ...".
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("(x") && l.contains("MB/s"))
        .ok_or_else(|| format!("no figures in zstd's output: {text}"))?;
    let ratio: f64 = line
        .split("(x")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|r| r.trim().parse().ok())
        .ok_or_else(|| format!("no ratio in {line:?}"))?;
    let speed: f64 = line
        .split("),")
        .nth(1)
        .and_then(|r| r.split("MB/s").next())
        .and_then(|r| r.trim().parse().ok())
        .ok_or_else(|| format!("no speed in {line:?}"))?;
    Ok((speed, ratio))
}

fn zstd_vs_cli(plan: Plan, out: &mut Reporter, images: &GuestImages) {
    if let Err(why) = cli_zstd_4k(&images.t0_path) {
        eprintln!("codec/zstd-4k-vs-cli skipped: {why}");
        return;
    }
    let (mut ours, mut theirs) = (Samples::default(), Samples::default());
    let (mut our_ratio, mut their_ratio) = (0.0, 0.0);
    for _ in 0..plan.runs.min(5) {
        let (s, r) = our_zstd_4k(&images.t0);
        ours.push(s);
        our_ratio = r;
        let (s, r) = cli_zstd_4k(&images.t0_path).expect("zstd ran before");
        theirs.push(s);
        their_ratio = r;
    }
    out.emit(
        Comparison::new(
            "codec/zstd-4k-vs-cli",
            "MB/s",
            Better::Higher,
            &ours,
            "zstd -b1 -B4K",
            &theirs,
        )
        .with_target(0.9)
        .with_note(format!(
            "compression ratio ours {our_ratio:.3}, zstd command {their_ratio:.3}"
        )),
    );
}

// ---------------------------------------------------------------------------------
// The simulated guest against the real one
// ---------------------------------------------------------------------------------

/// Zero fraction and zstd -1 ratio (1 MiB blocks) of `data`.
fn zero_and_ratio(data: &[u8]) -> (f64, f64) {
    let zero = data
        .chunks(PAGE_SIZE)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count() as f64
        / (data.len() / PAGE_SIZE) as f64;
    let mut c = Compressor::new();
    let mut out = vec![0u8; compress_bound(1 << 20)];
    let packed: usize = data
        .chunks(1 << 20)
        .map(|b| c.compress(1, None, b, &mut out).expect("compress"))
        .sum();
    (zero, data.len() as f64 / packed as f64)
}

fn content_mix(out: &mut Reporter, images: &GuestImages) {
    let memory = GuestMemory::anonymous(images.t0.len(), PagePreference::Small).expect("memory");
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, 1);
    let (sim_zero, sim_ratio) = zero_and_ratio(&memory.to_vec());
    let (real_zero, real_ratio) = zero_and_ratio(&images.t0);
    let one = |x: f64| {
        let mut s = Samples::default();
        s.push(x);
        s
    };
    // Ratio here is closeness: simulated over real, 1.0 = the same.
    out.emit(Comparison::new(
        "codec/mix-zero-fraction",
        "fraction",
        Better::Higher,
        &one(sim_zero),
        "real image t0",
        &one(real_zero),
    ));
    out.emit(Comparison::new(
        "codec/mix-zstd1-ratio",
        "ratio",
        Better::Higher,
        &one(sim_ratio),
        "real image t0",
        &one(real_ratio),
    ));
}

// ---------------------------------------------------------------------------------
// Bytes on the wire
// ---------------------------------------------------------------------------------

/// Runs of dirty pages as the engine cuts them: consecutive pages within one chunk.
fn runs(pages: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, count))
                if *first + u64::from(*count) == p && p / CHUNK_PAGES == *first / CHUNK_PAGES =>
            {
                *count += 1
            }
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Guest memory holding t0, and the runs of round 0 and of the changed pages.
struct Replay {
    memory: GuestMemory,
    round0: Vec<(u64, u32)>,
    changed: Vec<(u64, u32)>,
}

impl Replay {
    fn new(images: &GuestImages) -> Self {
        let memory =
            GuestMemory::anonymous(images.t0.len(), PagePreference::Small).expect("memory");
        for (i, p) in images.t0.chunks_exact(PAGE_SIZE).enumerate() {
            memory.write_page(i as u64, p);
        }
        let all: Vec<u64> = (0..images.pages()).collect();
        Replay {
            memory,
            round0: runs(&all),
            changed: runs(&images.changed_pages()),
        }
    }

    fn to_t1(&self, images: &GuestImages) {
        for (first, count) in &self.changed {
            for p in *first..*first + u64::from(*count) {
                let at = p as usize * PAGE_SIZE;
                self.memory.write_page(p, &images.t1[at..at + PAGE_SIZE]);
            }
        }
    }
}

/// (a): frames as staged with zero-page elision only.
fn bytes_zero_only(images: &GuestImages) -> u64 {
    let replay = Replay::new(images);
    let mut buf = vec![0u8; stage_space(CHUNK_PAGES as u32)];
    let mut total = 0u64;
    for (first, count) in &replay.round0 {
        total += stage_run(&replay.memory, *first, *count, &mut buf, None).bytes as u64;
    }
    replay.to_t1(images);
    for (first, count) in &replay.changed {
        total += stage_run(&replay.memory, *first, *count, &mut buf, None).bytes as u64;
    }
    total
}

/// (b) and (d): our pipeline with `settings`, one stream state per stream as in a
/// migration. Returns wire bytes.
fn bytes_pipeline(
    images: &GuestImages,
    settings: CodecSettings,
    dictionary: Option<Arc<Dictionary>>,
) -> u64 {
    let replay = Replay::new(images);
    let mut codec = WorkerCodec::new();
    codec.set_settings(settings, std::iter::empty());
    codec.set_dictionary(dictionary);
    let cache_per_stream = CodecConfig::default().cache_bytes / usize::from(STREAMS);
    let mut streams: Vec<StreamCodec> = (0..STREAMS)
        .map(|_| StreamCodec::new(cache_per_stream, 2 << 20))
        .collect();
    let mut out = vec![0u8; 4 << 20];
    let mut total = 0u64;
    let mut send = |runs: &[(u64, u32)],
                    codec: &mut WorkerCodec,
                    streams: &mut [StreamCodec],
                    total: &mut u64| {
        for &(first, count) in runs {
            let s = &mut streams[usize::from(stream_of(first, STREAMS))];
            if codec.batch_full(s, count) {
                *total += codec.flush(s, &mut out) as u64;
            }
            codec.encode_run(s, &replay.memory, first, count, None);
        }
        for s in streams.iter_mut() {
            *total += codec.flush(s, &mut out) as u64;
        }
    };
    send(&replay.round0, &mut codec, &mut streams, &mut total);
    replay.to_t1(images);
    send(&replay.changed, &mut codec, &mut streams, &mut total);
    total
}

/// (c): every page compressed on its own with zstd -1, each with an 8-byte header
/// (page and length, as QEMU's per-page headers); zero pages are headers alone.
fn bytes_zstd1_per_page(images: &GuestImages) -> u64 {
    const HEADER: u64 = 8;
    let mut c = Compressor::new();
    let mut out = vec![0u8; compress_bound(PAGE_SIZE)];
    let mut one = |page: &[u8]| -> u64 {
        if page.iter().all(|&b| b == 0) {
            HEADER
        } else {
            HEADER + c.compress(1, None, page, &mut out).expect("compress") as u64
        }
    };
    let mut total: u64 = images.t0.chunks_exact(PAGE_SIZE).map(&mut one).sum();
    for p in images.changed_pages() {
        let at = p as usize * PAGE_SIZE;
        total += one(&images.t1[at..at + PAGE_SIZE]);
    }
    total
}

/// The session dictionary as the engine would train it.
fn dictionary(images: &GuestImages) -> Option<Arc<Dictionary>> {
    let config = CodecConfig::default();
    let replay = Replay::new(images);
    let sample = calibrate::sample_pages(&replay.memory, config.dictionary_sample_pages, 0x0D1C7);
    let bytes = calibrate::train(&sample, config.dictionary_bytes).ok()?;
    Some(Arc::new(Dictionary::new(1, bytes)))
}

fn wire_bytes(out: &mut Reporter, images: &GuestImages, chosen_level: Option<i32>) {
    let level = chosen_level.unwrap_or(12);
    // Each level with the batch size a migration uses for it.
    let config = CodecConfig::default();
    let full = |level: i32, dictionary: bool| CodecSettings {
        dictionary,
        batch_bytes: config.batch_for(level),
        ..CodecSettings::full(level)
    };
    let zero_only = bytes_zero_only(images);
    let zero_xbzrle = bytes_pipeline(
        images,
        CodecSettings {
            dedup: false,
            delta: true,
            level: None,
            dictionary: false,
            delta_limit: PAGE_SIZE,
            ..CodecSettings::OFF
        },
        None,
    );
    let zstd1 = bytes_zstd1_per_page(images);
    let dict = dictionary(images);
    eprintln!("  bytes on the wire, t0 then the pages changed in t1 ({STREAMS} streams):");
    eprintln!("    (a) zero-page elision only      {:>11}", zero_only);
    eprintln!("    (b) zero + XBZRLE               {:>11}", zero_xbzrle);
    eprintln!("    (c) zstd -1 of every page       {:>11}", zstd1);
    let mut table = Vec::new();
    for l in [1, 3, 6, 9, 12, 16, 19] {
        let plain = bytes_pipeline(images, full(l, false), None);
        let with = bytes_pipeline(images, full(l, true), dict.clone());
        eprintln!(
            "    (d) pipeline, zstd {l:>3} ({:>4} KiB) {plain:>11}   with dictionary {with:>11} ({:+.2}%)",
            config.batch_for(l) >> 10,
            (with as f64 / plain as f64 - 1.0) * 100.0
        );
        table.push((l, plain, with));
    }
    let (_, ours, ours_dict) = table
        .iter()
        .copied()
        .find(|(l, _, _)| *l == level)
        .unwrap_or_else(|| {
            let plain = bytes_pipeline(images, full(level, false), None);
            let with = bytes_pipeline(images, full(level, true), dict.clone());
            (level, plain, with)
        });
    let best = ours.min(ours_dict);
    let one = |x: u64| {
        let mut s = Samples::default();
        s.push(x as f64);
        s
    };
    out.emit(Comparison::new(
        "codec/wire-vs-zero-only",
        "bytes",
        Better::Lower,
        &one(best),
        format!("zero-page elision only (ours: zstd {level})"),
        &one(zero_only),
    ));
    out.emit(
        Comparison::new(
            "codec/wire-vs-zero-xbzrle",
            "bytes",
            Better::Lower,
            &one(best),
            format!("zero+XBZRLE (ours: zstd {level})"),
            &one(zero_xbzrle),
        )
        .with_target(1.0 / 0.6),
    );
    out.emit(
        Comparison::new(
            "codec/wire-vs-zstd1",
            "bytes",
            Better::Lower,
            &one(best),
            format!("zstd -1 per page (ours: zstd {level})"),
            &one(zstd1),
        )
        .with_target(1.0 / 0.8),
    );
    let (_, strongest, strongest_dict) = table[table.len() - 1];
    out.emit(
        Comparison::new(
            "codec/wire-vs-zstd1-strongest",
            "bytes",
            Better::Lower,
            &one(strongest.min(strongest_dict)),
            "zstd -1 per page (ours: zstd 19)",
            &one(zstd1),
        )
        .with_target(1.0 / 0.8),
    );
    out.emit(Comparison::new(
        "codec/dictionary-gain",
        "bytes",
        Better::Lower,
        &one(ours_dict),
        format!("same pipeline without dictionary (zstd {level})"),
        &one(ours),
    ));
}

// ---------------------------------------------------------------------------------
// Migration time through a token bucket
// ---------------------------------------------------------------------------------

/// A link the migrations go through.
#[derive(Debug, Clone, Copy)]
struct Link {
    name: &'static str,
    /// `tc tbf` rate in bits per second; `None` is plain loopback.
    rate: Option<u64>,
    runs: usize,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Move this process (the calling thread and every thread it starts from now on) into
/// a network namespace of its own with loopback up, so `tc` changes nothing outside.
fn private_network() -> Result<(), String> {
    // SAFETY: unshare only changes the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (needs root)",
            std::io::Error::last_os_error()
        ));
    }
    sh(&["ip", "link", "set", "lo", "up"])
}

/// Shape loopback to `link`: a token bucket at its rate on a 1500-byte MTU, or
/// nothing at all.
fn shape(link: Link) -> Result<(), String> {
    let _ = sh(&["tc", "qdisc", "del", "dev", "lo", "root"]);
    match link.rate {
        None => sh(&["ip", "link", "set", "lo", "mtu", "65536"]),
        Some(rate) => {
            sh(&["ip", "link", "set", "lo", "mtu", "1500"])?;
            // Bucket of 4 ms at the rate (at least 64 KiB); 50 ms of queue.
            let burst = (rate / 8 / 250).max(64 << 10);
            sh(&[
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                &format!("{rate}bit"),
                "burst",
                &format!("{burst}b"),
                "latency",
                "50ms",
            ])
        }
    }
}

fn source_config(mode: CodecMode) -> SourceConfig {
    SourceConfig {
        codec: CodecConfig {
            mode,
            ..CodecConfig::default()
        },
        ..SourceConfig::default()
    }
}

/// One migration of the images; (seconds, wire bytes, level the policy settled on).
fn one_migration(images: &GuestImages, auto: bool) -> (f64, u64, Option<i32>) {
    let mode = if auto {
        CodecMode::Auto
    } else {
        CodecMode::Off
    };
    let source = source_config(mode);
    let mut policy = ModelPolicy::new(PolicyConfig {
        levels: source.codec.levels.clone(),
        ..PolicyConfig::default()
    });
    let done = migrate_images(
        images,
        &source,
        &DestConfig::default(),
        auto.then_some(&mut policy as &mut dyn dwcp_dataplane::codec::policy::CodecPolicy),
    )
    .unwrap_or_else(|e| panic!("migration of the guest images: {e}"));
    assert!(done.identical, "destination differs from t1");
    let codec = done.report.codec.as_ref();
    let level = codec.and_then(|c| c.changes.last().and_then(|ch| ch.settings.level));
    if std::env::var_os("DWCP_BENCH_VERBOSE").is_some() {
        eprintln!("{}", done.report);
        if let Some(c) = codec {
            for d in &c.decisions {
                eprintln!("{d}");
            }
        }
    }
    (done.seconds, done.report.bytes_sent, level)
}

/// Times each link; returns the level the policy chose on the slowest.
fn migration_times(plan: Plan, out: &mut Reporter, images: &GuestImages) -> Option<i32> {
    if let Err(why) = private_network() {
        eprintln!("codec/time-* skipped: {why}");
        return None;
    }
    let quick = plan.runs < 5;
    let links = [
        Link {
            name: "codec/time-100m",
            rate: Some(100_000_000),
            runs: if quick { 1 } else { 3 },
        },
        Link {
            name: "codec/time-1g",
            rate: Some(1_000_000_000),
            runs: if quick { 1 } else { 5 },
        },
        Link {
            name: "codec/time-unlimited",
            rate: None,
            runs: if quick { 2 } else { 21 },
        },
    ];
    let mut slow_level = None;
    for link in links {
        if !out.wants(link.name) {
            continue;
        }
        if let Err(why) = shape(link) {
            eprintln!("{} skipped: {why}", link.name);
            continue;
        }
        let (mut ours, mut theirs) = (Samples::default(), Samples::default());
        let (mut our_bytes, mut their_bytes) = (Samples::default(), Samples::default());
        let mut levels = Vec::new();
        for _ in 0..link.runs {
            let (s, b, level) = one_migration(images, true);
            ours.push(s);
            our_bytes.push(b as f64);
            levels.push(level);
            let (s, b, _) = one_migration(images, false);
            theirs.push(s);
            their_bytes.push(b as f64);
        }
        eprintln!(
            "  {}: MB on the wire ours {:.1}, codecs off {:.1}; levels chosen {:?}",
            link.name,
            our_bytes.median() / 1e6,
            their_bytes.median() / 1e6,
            levels
        );
        if link.rate == Some(100_000_000) {
            // The level most runs settled on (the median of the runs' last levels).
            let mut settled: Vec<i32> = levels.iter().flatten().copied().collect();
            settled.sort_unstable();
            slow_level = settled.get(settled.len() / 2).copied();
        }
        let target = match link.rate {
            Some(100_000_000) => Some(3.0),
            None => Some(0.95),
            _ => None,
        };
        let mut c = Comparison::new(link.name, "s", Better::Lower, &ours, "codecs off", &theirs);
        c.target = target;
        out.emit(c);
    }
    let _ = shape(Link {
        name: "",
        rate: None,
        runs: 0,
    });
    slow_level
}
