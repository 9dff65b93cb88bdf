//! One migration of the configured guest, the same way for every caller: `dwcpd
//! source`, the demo (both appliances in one process) and the daemon's migration
//! threads. A simulated guest's memory is created and filled like a real guest's and
//! its vCPUs started; a QEMU VM's RAM file is mapped (found through QMP, never written
//! here) and its writes tracked by CRC rescans, the only tracker that sees another
//! process's writes on this kernel. The migration runs with the codec policy when
//! asked; the dirty log's note and the VM's own figures go into the report, the codec
//! policy's decisions into the configured decision log.

use crate::config::Config;
use crate::qemu::QemuSource;
use dwcp_dataplane::dirty::{DirtyLogKind, OpenedDirtyLog, open_dirty_log, open_process_dirty_log};
use dwcp_dataplane::engine::{self, LiveControl, MigrationReport, Progress, SourceConfig};
use dwcp_dataplane::guest::{ContentMix, GuestControl, SimulatedGuest, fill_memory_until};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

/// The simulated guest's memory as configured: a file (a new one, or one the operator
/// allowed it to overwrite), or anonymous memory with transparent huge pages.
pub fn guest_memory(config: &Config) -> Result<Arc<GuestMemory>, String> {
    let bytes = config.guest.memory.0 as usize;
    if let Some(path) = &config.guest.memory_file {
        crate::config::check_simulated_memory_file(path, config.guest.overwrite_memory_file)
            .map_err(|e| format!("guest memory file {}: {e}", path.display()))?;
    }
    let memory = match &config.guest.memory_file {
        Some(path) => GuestMemory::file(path, bytes),
        None => GuestMemory::anonymous(bytes, PagePreference::TransparentHuge),
    }
    .map_err(|e| format!("guest memory: {e}"))?;
    Ok(Arc::new(memory))
}

/// The guest a source migrates.
pub enum Guest {
    /// Threads writing memory of this process.
    Simulated(SimulatedGuest),
    /// A QEMU VM whose RAM is a shared file.
    Qemu(Box<QemuSource>),
}

impl Guest {
    /// The engine's view of it.
    pub fn control(&self) -> &dyn GuestControl {
        match self {
            Guest::Simulated(g) => g,
            Guest::Qemu(vm) => vm.as_ref(),
        }
    }
}

/// The configured guest, running: its memory, the guest itself and the dirty log
/// tracking it (handed to the migration).
pub struct RunningGuest {
    /// The guest's memory.
    pub memory: Arc<GuestMemory>,
    /// The guest.
    pub guest: Guest,
    dirty: Option<OpenedDirtyLog>,
}

impl RunningGuest {
    /// What [`RunningGuest::start`] is about to do, for operators waiting on it (it
    /// takes seconds for a guest of a few GiB).
    pub fn describe_start(config: &Config) -> String {
        match &config.guest.qmp {
            Some(qmp) => format!(
                "opening the QEMU VM behind {}, mapping its RAM file, starting its dirty log",
                qmp.display()
            ),
            None => format!(
                "creating and filling the simulated guest's {} of memory, starting its vCPUs \
                 and its dirty log ({})",
                config.guest.memory,
                config.dirty_log()
            ),
        }
    }

    /// Create, fill and start the simulated guest the configuration describes, or open
    /// the QEMU VM it names.
    pub fn start(config: &Config) -> Result<Self, String> {
        Self::start_until(config, &|| false)
    }

    /// [`RunningGuest::start`], giving up while it fills a simulated guest's memory
    /// once `cancelled` says so.
    pub fn start_until(config: &Config, cancelled: &dyn Fn() -> bool) -> Result<Self, String> {
        if let Some(qmp) = &config.guest.qmp {
            let vm = QemuSource::open(qmp).map_err(|e| e.to_string())?;
            return Self::qemu(config, vm);
        }
        let memory = guest_memory(config)?;
        if !fill_memory_until(
            &memory,
            &ContentMix::MEMORY_IMAGE,
            config.guest.seed,
            cancelled,
        ) {
            return Err(format!(
                "cancelled while filling the simulated guest's {} of memory",
                config.guest.memory
            ));
        }
        Self::simulated(config, memory)
    }

    /// The simulated guest's vCPUs started on `memory`, with a new dirty log.
    fn simulated(config: &Config, memory: Arc<GuestMemory>) -> Result<Self, String> {
        let dirty = open_dirty_log(&memory, config.dirty_log()).map_err(|e| e.to_string())?;
        let guest = SimulatedGuest::start(memory.clone(), &config.workload(), dirty.marker.clone());
        Ok(RunningGuest {
            memory,
            guest: Guest::Simulated(guest),
            dirty: Some(dirty),
        })
    }

    /// The simulated guest of a migration this appliance was sending when it stopped:
    /// its memory file as it is (not filled again), its vCPUs started again, a new
    /// dirty log.
    pub fn resume(config: &Config) -> Result<Self, String> {
        let path = config
            .guest
            .memory_file
            .as_ref()
            .ok_or("resuming needs the guest's memory file")?;
        let memory = GuestMemory::open_file(path)
            .map_err(|e| format!("guest memory file {}: {e}", path.display()))?;
        if memory.len() as u64 != config.guest.memory.0 {
            return Err(format!(
                "guest memory file {} holds {} bytes; guest.memory is {}",
                path.display(),
                memory.len(),
                config.guest.memory
            ));
        }
        Self::simulated(config, Arc::new(memory))
    }

    /// A QEMU VM opened (and so checked) already: its RAM mapped, its dirty log open.
    ///
    /// QEMU writes the guest's RAM from its own process. The dirty log is that
    /// process's page tables, through a userfaultfd borrowed from it, unless rescans
    /// are asked for or borrowing fails (then CRC rescans, with a note saying why).
    pub fn qemu(config: &Config, vm: QemuSource) -> Result<Self, String> {
        let memory = vm.memory().map_err(|e| e.to_string())?;
        let dirty = match config.dirty_log() {
            DirtyLogKind::Rescan => rescans(&memory, None)?,
            wanted => {
                let info = vm.info();
                let borrowed = match info.pid {
                    Some(pid) => open_process_dirty_log(pid, &info.memory_file, info.memory_bytes)
                        .map_err(|e| e.to_string()),
                    None => Err("the QMP socket does not say which process QEMU is".to_string()),
                };
                match borrowed {
                    Ok(log) => OpenedDirtyLog {
                        log: Box::new(log),
                        marker: None,
                        // Nothing of ours writes a QEMU guest's memory to mark pages.
                        note: (wanted == DirtyLogKind::Explicit).then(|| {
                            "explicit asked for; QEMU writes the guest's memory itself: \
                             its page tables (uffd-wp) instead"
                                .to_string()
                        }),
                    },
                    Err(why) => rescans(
                        &memory,
                        Some(format!(
                            "{wanted} asked for; QEMU's writes cannot be tracked in its page \
                             tables ({why}): CRC rescans instead"
                        )),
                    )?,
                }
            }
        };
        Ok(RunningGuest {
            memory,
            guest: Guest::Qemu(Box::new(vm)),
            dirty: Some(dirty),
        })
    }

    /// Stop a simulated guest's vCPUs (a QEMU VM is its owner's to stop).
    pub fn stop(self) {
        if let Guest::Simulated(g) = self.guest {
            g.stop();
        }
    }
}

/// CRC rescans of `memory`, with `note` saying why.
fn rescans(memory: &Arc<GuestMemory>, note: Option<String>) -> Result<OpenedDirtyLog, String> {
    let mut opened = open_dirty_log(memory, DirtyLogKind::Rescan).map_err(|e| e.to_string())?;
    opened.note = note;
    Ok(opened)
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
        guest.guest.control(),
        opened.log,
        run.source,
        policy,
        run.live,
        progress,
    );
    let mut report = match result {
        Ok(report) => report,
        Err(e) => {
            let notes = match &guest.guest {
                Guest::Qemu(vm) => vm.take_notes(),
                Guest::Simulated(_) => Vec::new(),
            };
            return Err(if notes.is_empty() {
                e.to_string()
            } else {
                format!("{e} ({})", notes.join("; "))
            });
        }
    };
    if let Some(note) = opened.note {
        report.notes.push(format!("dirty log: {note}"));
    }
    if let Guest::Qemu(vm) = &guest.guest {
        report.notes.extend(vm.take_notes());
        let info = vm.info();
        let figures = vm.stats().map_or(String::new(), |s| {
            format!(
                "; QEMU's own figures: downtime {} ms, total {} ms, {} bytes written",
                s.downtime_ms, s.total_ms, s.transferred
            )
        });
        report.notes.push(format!(
            "QEMU {} VM {:?}: RAM {} ({} MiB){figures}",
            info.qemu_version,
            info.name,
            info.memory_file.display(),
            info.memory_bytes >> 20
        ));
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
