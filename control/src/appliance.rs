//! Running `dwcpd` as a source, a destination, or both at once (the demo).

use crate::certs;
use crate::config::{Config, SessionSecurityConfig};
use crate::progress::ProgressDisplay;
use crate::qemu::QemuIncoming;
use crate::runner::{self, Run, RunningGuest};
use dwcp_dataplane::engine::{self, DestMemory, DestReport, MigrationReport};
use dwcp_hugepages::PagePreference;
use serde::Serialize;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Migrate the configured guest to `peer`, showing progress every `every` unless
/// `quiet`.
fn migrate_shown(
    config: &Config,
    peer: SocketAddr,
    guest: &mut RunningGuest,
    quiet: bool,
    every: Duration,
    resume: Option<engine::OutgoingRecord>,
) -> Result<MigrationReport, String> {
    let mut display = ProgressDisplay::new(quiet, every);
    let mut source = config.source_config();
    source.security = config.identity()?;
    source.resume = resume;
    let run = Run {
        config,
        source: &source,
        live: None,
        codec_policy: true,
    };
    let result = runner::migrate(&run, peer, guest, &mut |p| display.show(p));
    display.finish();
    result
}

/// Migrate the configured simulated guest to `peer`.
pub fn run_source(
    config: &Config,
    peer: SocketAddr,
    quiet: bool,
) -> Result<MigrationReport, String> {
    // A session this appliance was sending when it stopped is resumed.
    let recorded = match config.outgoing_session_record() {
        Some(path) if path.exists() => {
            Some(engine::OutgoingRecord::read(&path).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    let mut guest = match &recorded {
        Some(record) => {
            eprintln!(
                "dwcpd: resuming session {:032x} to {} from round {} (left by the last run)",
                record.session_id, record.peer, record.round
            );
            // A QEMU VM ran on without us: it is opened as for a new migration.
            match config.guest.qmp {
                Some(_) => RunningGuest::start(config)?,
                None => RunningGuest::resume(config)?,
            }
        }
        None => {
            if !quiet {
                eprintln!("setting up: {}", RunningGuest::describe_start(config));
            }
            RunningGuest::start(config)?
        }
    };
    let result = migrate_shown(
        config,
        peer,
        &mut guest,
        quiet,
        Duration::from_millis(200),
        recorded,
    );
    guest.stop();
    result
}

/// Receive one migration on the configured address: into memory of this process, or
/// into the incoming QEMU VM `[dest] qmp` names (its RAM file, then its device state).
/// `listening` hears the bound address (and the VM's name) once sources may connect.
pub fn run_dest(
    config: &Config,
    listening: impl FnOnce(SocketAddr, Option<&str>),
) -> Result<DestReport, String> {
    // The VM is checked before the port opens: a source never starts toward a
    // destination that cannot take its guest.
    let mut vm = match &config.dest.qmp {
        Some(qmp) => Some(incoming_vm(config, qmp)?),
        None => None,
    };
    let mut dest_config = config.dest_config();
    dest_config.security = config.identity()?;
    let listener = TcpListener::bind(&config.dest.listen)
        .map_err(|e| format!("listening on {}: {e}", config.dest.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    listening(addr, vm.as_ref().map(|(vm, _)| vm.info().name.as_str()));
    let cancel = AtomicBool::new(false);
    match vm.take() {
        Some((mut vm, memory)) => {
            let name = vm.info().name.clone();
            engine::receive_guest(&listener, memory, &dest_config, &cancel, Some(&mut vm))
                .map_err(|e| format!("receiving VM {name:?}: {e}"))
        }
        None => {
            engine::receive_cancellable(&listener, incoming_memory(config)?, &dest_config, &cancel)
                .map_err(|e| e.to_string())
        }
    }
}

/// The incoming VM at `qmp` (`[dest] qmp`), opened for a session, and where the
/// session's memory goes: the session a restarted appliance left in the VM's RAM file
/// (its record in `[control] state_dir`), else the VM's RAM file for a new one.
pub fn incoming_vm(config: &Config, qmp: &Path) -> Result<(QemuIncoming, DestMemory), String> {
    let vm = QemuIncoming::open(qmp, config.incoming_device_socket().as_deref())
        .map_err(|e| e.to_string())?;
    if let Some(record) = recorded_incoming(config)? {
        let file = &vm.info().memory_file;
        if record.memory_file != *file {
            return Err(format!(
                "the session the last run left went into {}, not into the RAM file of VM {:?} \
                 ({}); remove {} to receive a new migration",
                record.memory_file.display(),
                vm.info().name,
                file.display(),
                config
                    .incoming_session_record()
                    .map_or(String::new(), |p| p.display().to_string())
            ));
        }
        eprintln!(
            "dwcpd: VM {:?}: {}",
            vm.info().name,
            if vm.taken_over() {
                "QEMU still listens for the device state where the last run had it listen"
            } else {
                "QEMU was started again; it now listens for the device state"
            }
        );
        return Ok((vm, DestMemory::Resume(record)));
    }
    let memory = vm.memory().map_err(|e| e.to_string())?;
    Ok((vm, DestMemory::Provided(memory)))
}

/// The session the last run of this appliance left unfinished as destination, if any
/// (announced on stderr).
fn recorded_incoming(config: &Config) -> Result<Option<engine::SessionRecord>, String> {
    let Some(path) = config.incoming_session_record().filter(|p| p.exists()) else {
        return Ok(None);
    };
    let record = engine::SessionRecord::read(&path).map_err(|e| e.to_string())?;
    eprintln!(
        "dwcpd: resuming session {:032x} left by the last run (memory file {})",
        record.session_id,
        record.memory_file.display()
    );
    Ok(Some(record))
}

/// Where a guest without a VM is received: the session a restarted appliance left
/// (its record in `[control] state_dir`), `[dest] memory_file`, or this process's
/// memory.
pub fn incoming_memory(config: &Config) -> Result<DestMemory, String> {
    if let Some(record) = recorded_incoming(config)? {
        return Ok(DestMemory::Resume(record));
    }
    Ok(match &config.dest.memory_file {
        Some(path) => DestMemory::File(path.clone()),
        None => DestMemory::Allocate(PagePreference::TransparentHuge),
    })
}

/// A directory of certificates removed when dropped.
struct ThrowawayCertificates {
    path: std::path::PathBuf,
}

impl Drop for ThrowawayCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A lab set in a private temporary directory, configured into `config` (both ends of
/// the demo use the first appliance's identity).
fn throwaway_certificates(config: &mut Config) -> Result<ThrowawayCertificates, String> {
    let path = std::env::temp_dir().join(format!("dwcp-demo-certs-{}", std::process::id()));
    let dir = ThrowawayCertificates { path };
    let written = certs::init(&dir.path, &[]).map_err(|e| e.to_string())?;
    let (_, cert, key) = &written.appliances[0];
    config.security.cert = Some(cert.clone());
    config.security.key = Some(key.clone());
    config.security.ca = Some(written.ca.clone());
    Ok(dir)
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
    // Both ends are this process on loopback: without certificates configured, the
    // demo makes throwaway ones (and its report says so) rather than run plain.
    let mut config = config.clone();
    let throwaway = match config.session_security() {
        SessionSecurityConfig::Missing => Some(throwaway_certificates(&mut config)?),
        _ => None,
    };
    let config = &config;
    if !quiet {
        eprintln!("setting up: {}", RunningGuest::describe_start(config));
        if let Some(dir) = &throwaway {
            eprintln!(
                "session: TLS 1.3 with throwaway certificates generated for this demo in {}",
                dir.path.display()
            );
        }
    }
    let mut guest = RunningGuest::start(config)?;
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("loopback listener: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Both appliances share this machine. Splitting its CPUs between them measured
    // slower here (2.1-2.6 GB/s against 2.9-3.3) than letting both use all of them:
    // the source side also runs the guest's vCPUs and the engine.
    let mut dest_config = config.dest_config();
    dest_config.security = config.identity()?;
    if config.transport.kind == "rma" && config.dest.rma {
        // Asked for by name, between two ends of this process: loopback is the fabric,
        // trusted by construction (RMA bytes are not sealed; the report says RMA).
        dest_config.rma = engine::RmaAdmission::Always;
    }
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
    let result = migrate_shown(
        config,
        addr,
        &mut guest,
        quiet,
        Duration::from_millis(100),
        None,
    );
    let dest = receiver
        .join()
        .map_err(|_| "destination thread panicked".to_string())?;
    let source = result?;
    let dest = dest.map_err(|e| e.to_string())?;
    // The guest is paused (migrated away): its memory is final.
    let byte_identical = guest.memory.first_difference(&dest.memory).is_none();
    guest.stop();
    let mut source = source;
    if throwaway.is_some() {
        source.notes.push(
            "session certificates: throwaway ones generated for this demo (configure [security] \
             for real ones)"
                .into(),
        );
    }
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
