//! Running `dwcpd` as a source, a destination, or both at once (the demo).

use crate::config::Config;
use dwcp_dataplane::dirty::{OpenedDirtyLog, open_dirty_log};
use dwcp_dataplane::engine::{self, DestMemory, DestReport, MigrationReport, Progress};
use dwcp_dataplane::guest::{ContentMix, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use serde::Serialize;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Instant;

/// Guest memory as configured: a file, or anonymous memory with transparent huge pages.
pub fn guest_memory(config: &Config) -> Result<Arc<GuestMemory>, String> {
    let bytes = config.guest.memory.0 as usize;
    let memory = match &config.guest.memory_file {
        Some(path) => GuestMemory::file(path, bytes),
        None => GuestMemory::anonymous(bytes, PagePreference::TransparentHuge),
    }
    .map_err(|e| format!("guest memory: {e}"))?;
    Ok(Arc::new(memory))
}

/// One progress line, rewritten in place on a terminal.
pub fn progress_line(p: &Progress) -> String {
    let round_done = if p.round_pages > 0 {
        100.0 * p.round_pages_queued.min(p.round_pages) as f64 / p.round_pages as f64
    } else {
        100.0
    };
    format!(
        "round {:>2} {:<10} {:>5.1}% of {:>7} pages | sent {:>8.1} MB at {:>7.1} MB/s | dirty {:>6.1} MB/s | throttle {:>2}% | {:>5.1} s",
        p.round,
        p.phase,
        round_done,
        p.round_pages,
        p.bytes_sent as f64 / 1e6,
        p.bandwidth / 1e6,
        p.dirty_rate / 1e6,
        p.throttle,
        p.elapsed.as_secs_f64()
    )
}

/// A progress callback that rewrites one line on stderr at most every `every`.
fn progress_printer(quiet: bool, every: std::time::Duration) -> impl FnMut(&Progress) {
    let mut last = Instant::now();
    move |p| {
        if !quiet && last.elapsed() >= every {
            last = Instant::now();
            eprint!("\r{}", progress_line(p));
            let _ = std::io::stderr().flush();
        }
    }
}

/// Migrate the configured simulated guest to `peer`.
pub fn run_source(
    config: &Config,
    peer: SocketAddr,
    quiet: bool,
) -> Result<MigrationReport, String> {
    let memory = guest_memory(config)?;
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, config.guest.seed);
    let opened = open_dirty_log(&memory, config.dirty_log()).map_err(|e| e.to_string())?;
    if let Some(note) = &opened.note {
        eprintln!("dwcpd: dirty log: {note}");
    }
    let guest = SimulatedGuest::start(memory.clone(), &config.workload(), opened.marker.clone());
    let result = migrate_guest(config, peer, memory, &guest, opened, quiet, 200);
    guest.stop();
    result
}

/// Migrate `memory` (written by `guest`, tracked by `opened`) to `peer` as configured,
/// with the codec policy, a progress line every `progress_ms` unless `quiet`, and the
/// dirty log's note and the decision log attached to the report.
fn migrate_guest(
    config: &Config,
    peer: SocketAddr,
    memory: Arc<GuestMemory>,
    guest: &SimulatedGuest,
    opened: OpenedDirtyLog,
    quiet: bool,
    progress_ms: u64,
) -> Result<MigrationReport, String> {
    let mut printer = progress_printer(quiet, std::time::Duration::from_millis(progress_ms));
    let source_config = config.source_config();
    let mut policy = config.codec_policy();
    let result = engine::migrate_with_policy(
        peer,
        memory,
        guest,
        opened.log,
        &source_config,
        Some(&mut policy),
        &mut printer,
    );
    if !quiet {
        eprintln!();
    }
    let mut report = result.map_err(|e| e.to_string())?;
    if let Some(note) = opened.note {
        report.notes.push(format!("dirty log: {note}"));
    }
    write_decision_log(config, &mut report);
    Ok(report)
}

/// Append the codec policy's decisions to the configured log file (a failure to write
/// it is a note on the report, not a failed migration).
fn write_decision_log(config: &Config, report: &mut MigrationReport) {
    let (Some(path), Some(codec)) = (&config.codec.decision_log, &report.codec) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| {
            for line in &codec.decisions {
                writeln!(f, "{line}")?;
            }
            Ok(())
        });
    if let Err(e) = written {
        report
            .notes
            .push(format!("codec decision log {}: {e}", path.display()));
    }
}

/// Receive one migration on the configured address.
pub fn run_dest(config: &Config) -> Result<DestReport, String> {
    let listener = TcpListener::bind(&config.dest.listen)
        .map_err(|e| format!("listening on {}: {e}", config.dest.listen))?;
    engine::receive(
        &listener,
        DestMemory::Allocate(PagePreference::TransparentHuge),
        &config.dest_config(),
    )
    .map_err(|e| e.to_string())
}

/// What the demo prints with `--json`.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// The source's report.
    #[serde(flatten)]
    pub source: MigrationReport,
    /// What the destination says.
    pub destination: DestSummary,
    /// Source and destination memory compared byte for byte after the switchover.
    pub byte_identical: bool,
    /// Seconds spent creating and filling the 1 GiB guest before migrating.
    pub setup_seconds: f64,
}

/// The destination's side of the demo.
#[derive(Debug, Serialize)]
pub struct DestSummary {
    /// Pages verified.
    pub verified_pages: u64,
    /// The digest both sides agree on.
    pub digest: String,
    /// Rounds received.
    pub rounds: u64,
    /// Bytes received on data streams.
    pub bytes: u64,
    /// Transport used.
    pub transport: String,
}

/// Both appliances in one process over loopback: a live migration of the configured
/// simulated guest, verified.
pub fn run_demo(config: &Config, quiet: bool) -> Result<DemoReport, String> {
    let setup = Instant::now();
    let memory = guest_memory(config)?;
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, config.guest.seed);
    let opened = open_dirty_log(&memory, config.dirty_log()).map_err(|e| e.to_string())?;
    let guest = SimulatedGuest::start(memory.clone(), &config.workload(), opened.marker.clone());
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("loopback listener: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Both appliances share this machine. Splitting its CPUs between them measured
    // slower here (2.1-2.6 GB/s against 2.9-3.3) than letting both use all of them:
    // the source side also runs the guest's vCPUs and the engine.
    let dest_config = config.dest_config();
    let receiver = std::thread::Builder::new()
        .name("dwcp-dest".into())
        .spawn(move || {
            engine::receive(
                &listener,
                DestMemory::Allocate(PagePreference::TransparentHuge),
                &dest_config,
            )
        })
        .map_err(|e| e.to_string())?;
    let setup_seconds = setup.elapsed().as_secs_f64();
    let result = migrate_guest(config, addr, memory.clone(), &guest, opened, quiet, 100);
    let dest = receiver
        .join()
        .map_err(|_| "destination thread panicked".to_string())?;
    let source = result?;
    let dest = dest.map_err(|e| e.to_string())?;
    // The guest is paused (migrated away): its memory is final.
    let byte_identical = memory.first_difference(&dest.memory).is_none();
    guest.stop();
    Ok(DemoReport {
        source,
        destination: DestSummary {
            verified_pages: dest.verified_pages,
            digest: dest.digest,
            rounds: dest.rounds,
            bytes: dest.bytes,
            transport: dest.transport.to_string(),
        },
        byte_identical,
        setup_seconds,
    })
}
