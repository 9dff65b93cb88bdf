//! One migration of the configured simulated guest, the same way for every caller:
//! `dwcpd source`, the demo (both appliances in one process) and the daemon's migration
//! threads. The guest memory is created and filled like a real guest's, the dirty log
//! opened (falling back with a note), the vCPUs started; the migration runs with the
//! codec policy when asked; the dirty log's note goes into the report and the codec
//! policy's decisions into the configured decision log.

use crate::config::Config;
use dwcp_dataplane::dirty::{OpenedDirtyLog, open_dirty_log};
use dwcp_dataplane::engine::{self, LiveControl, MigrationReport, Progress, SourceConfig};
use dwcp_dataplane::guest::{ContentMix, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

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

/// The configured simulated guest, running: its memory, its vCPUs and the dirty log
/// tracking them (handed to the migration).
pub struct RunningGuest {
    /// The guest's memory.
    pub memory: Arc<GuestMemory>,
    /// Its vCPUs.
    pub guest: SimulatedGuest,
    dirty: Option<OpenedDirtyLog>,
}

impl RunningGuest {
    /// Create, fill and start the guest the configuration describes.
    pub fn start(config: &Config) -> Result<Self, String> {
        let memory = guest_memory(config)?;
        fill_memory(&memory, &ContentMix::MEMORY_IMAGE, config.guest.seed);
        let dirty = open_dirty_log(&memory, config.dirty_log()).map_err(|e| e.to_string())?;
        let guest = SimulatedGuest::start(memory.clone(), &config.workload(), dirty.marker.clone());
        Ok(RunningGuest {
            memory,
            guest,
            dirty: Some(dirty),
        })
    }

    /// Stop the vCPUs.
    pub fn stop(self) {
        self.guest.stop();
    }
}

/// How a migration is driven.
pub struct Run<'a> {
    /// The daemon's configuration (codec policy, decision log).
    pub config: &'a Config,
    /// The source settings (the configuration's, perhaps narrowed by flags).
    pub source: &'a SourceConfig,
    /// Live control, when the slow path drives the migration.
    pub live: Option<&'a LiveControl>,
    /// Let the codec policy choose codecs in automatic mode.
    pub codec_policy: bool,
}

/// Migrate `guest` to `peer` (once: the dirty log goes with the migration).
pub fn migrate(
    run: &Run<'_>,
    peer: SocketAddr,
    guest: &mut RunningGuest,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, String> {
    let opened = guest
        .dirty
        .take()
        .ok_or("this guest has been migrated already")?;
    let mut policy = run.config.codec_policy();
    let policy: Option<&mut dyn dwcp_dataplane::codec::policy::CodecPolicy> = if run.codec_policy {
        Some(&mut policy)
    } else {
        None
    };
    let result = engine::migrate_live(
        peer,
        guest.memory.clone(),
        &guest.guest,
        opened.log,
        run.source,
        policy,
        run.live,
        progress,
    );
    let mut report = result.map_err(|e| e.to_string())?;
    if let Some(note) = opened.note {
        report.notes.push(format!("dirty log: {note}"));
    }
    write_decision_log(run.config, &mut report);
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
