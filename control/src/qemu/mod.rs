//! QEMU guests: the appliance moves a VM's RAM with its own engine while QEMU moves only
//! the device state.
//!
//! The VM's RAM must be one shared file backend
//! (`-object memory-backend-file,id=ram0,size=...,mem-path=FILE,share=on -machine
//! memory-backend=ram0`), so that the appliance can map the very pages the guest uses.
//! Both QEMUs get the migration capability `x-ignore-shared` (QEMU then leaves shared
//! RAM to us); the source also gets `pause-before-switchover`, which makes QEMU stop
//! the vCPUs and wait in state `pre-switchover` before it writes the device state:
//! the engine's final round runs there, on the stopped guest.
//!
//! - [`QemuSource`]: the source VM, as the engine's [`GuestControl`]: pausing is
//!   `migrate` toward a socket of ours until `pre-switchover`; the hand-over is
//!   `migrate-continue` and relaying what QEMU writes; resuming (the migration did not
//!   happen) is `migrate_cancel` and `cont`.
//! - [`QemuIncoming`]: the destination VM (started with `-incoming defer` and its own
//!   file backend of the same size), as the engine's [`DeviceStateSink`].
//!
//! [`GuestControl`]: dwcp_dataplane::guest::GuestControl
//! [`DeviceStateSink`]: dwcp_dataplane::guest::DeviceStateSink

mod incoming;
mod qmp;
mod source;

pub use incoming::QemuIncoming;
pub use qmp::{QemuVersion, Qmp, QmpError};
pub use source::QemuSource;

use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a QMP reply may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a VM cannot be migrated by the appliance, or what failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// Talking to QEMU failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The VM is not set up the way the appliance needs (nothing was changed).
    #[error("{qmp}: {why}")]
    Unsuitable {
        /// The QMP socket.
        qmp: PathBuf,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// Mapping the VM's memory file failed.
    #[error("mapping {path}: {why}")]
    Memory {
        /// The file.
        path: PathBuf,
        /// The error.
        why: String,
    },
}

/// What the appliance knows of a VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmInfo {
    /// The VM's name (`-name`), or the QMP socket's file name when it has none.
    pub name: String,
    /// QEMU's version.
    pub qemu_version: String,
    /// The QMP socket.
    pub qmp: PathBuf,
    /// The file holding the VM's RAM.
    pub memory_file: PathBuf,
    /// Bytes of RAM.
    pub memory_bytes: u64,
    /// The run state when the appliance looked.
    pub state: String,
    /// QEMU's process, from the QMP socket's peer credentials.
    pub pid: Option<u32>,
}

/// Find the VM's RAM file through QMP and check that the appliance can move it: one
/// `memory-backend-file` with `share=on` holding all of the VM's RAM, in a named file.
fn describe(qmp: &mut Qmp) -> Result<VmInfo, QemuError> {
    let unsuitable = |qmp: &Qmp, why: String| QemuError::Unsuitable {
        qmp: qmp.path().to_owned(),
        why,
    };
    const HOW: &str = "start QEMU with -object memory-backend-file,id=ram0,size=SIZE,\
                       mem-path=/dev/shm/NAME,share=on -machine memory-backend=ram0";
    let name = qmp
        .execute("query-name", json!({}))?
        .get("name")
        .and_then(|n| n.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            qmp.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let backend = qmp.qom_get("/machine", "memory-backend")?;
    let backend = match backend.as_str() {
        Some(b) if !b.is_empty() => b.to_string(),
        _ => {
            return Err(unsuitable(
                qmp,
                format!("the VM's RAM is not a memory backend object the appliance can map: {HOW}"),
            ));
        }
    };
    let kind = qmp.qom_get(&backend, "type")?;
    let kind = kind.as_str().unwrap_or("?");
    if kind != "memory-backend-file" {
        return Err(unsuitable(
            qmp,
            format!(
                "the VM's RAM ({backend}) is a {kind}, not a file the appliance can map: {HOW}"
            ),
        ));
    }
    if qmp.qom_get(&backend, "share")?.as_bool() != Some(true) {
        return Err(unsuitable(
            qmp,
            format!(
                "the VM's RAM ({backend}) is a private mapping (share=off): the guest's writes \
                 never reach the file; {HOW}"
            ),
        ));
    }
    let path = PathBuf::from(qmp.qom_get(&backend, "mem-path")?.as_str().unwrap_or(""));
    let bytes = qmp.qom_get(&backend, "size")?.as_u64().unwrap_or(0);
    let summary = qmp.execute("query-memory-size-summary", json!({}))?;
    let base = summary["base-memory"].as_u64().unwrap_or(0);
    let plugged = summary["plugged-memory"].as_u64().unwrap_or(0);
    if base != bytes || plugged != 0 {
        return Err(unsuitable(
            qmp,
            format!(
                "the VM has RAM outside its one backend ({base} bytes of base memory, \
                 {plugged} plugged, {bytes} in {backend}): only a VM whose RAM is one file \
                 can be moved"
            ),
        ));
    }
    check_memory_file(&path, bytes).map_err(|why| unsuitable(qmp, why))?;
    let state = qmp.run_state()?;
    Ok(VmInfo {
        name,
        qemu_version: qmp.version().to_string(),
        qmp: qmp.path().to_owned(),
        memory_file: path,
        memory_bytes: bytes,
        state,
        pid: qmp.peer_pid(),
    })
}

/// The RAM file must be one this process can open: a directory as `mem-path` makes
/// QEMU create an unnamed file inside it.
fn check_memory_file(path: &Path, bytes: u64) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("the VM's RAM file {}: {e}", path.display()))?;
    if meta.is_dir() {
        return Err(format!(
            "mem-path {} is a directory: QEMU keeps the RAM in an unnamed file there that no \
             other process can open; give mem-path a file name",
            path.display()
        ));
    }
    if !meta.is_file() || meta.len() < bytes {
        return Err(format!(
            "the VM's RAM file {} is not a regular file of {bytes} bytes",
            path.display()
        ));
    }
    Ok(())
}

/// Map a VM's RAM file (never created or truncated here).
fn map_memory(
    info: &VmInfo,
) -> Result<std::sync::Arc<dwcp_dataplane::memory::GuestMemory>, QemuError> {
    let memory =
        dwcp_dataplane::memory::GuestMemory::open_file(&info.memory_file).map_err(|e| {
            QemuError::Memory {
                path: info.memory_file.clone(),
                why: e.to_string(),
            }
        })?;
    if memory.len() as u64 != info.memory_bytes {
        return Err(QemuError::Memory {
            path: info.memory_file.clone(),
            why: format!(
                "{} bytes, but the VM's backend has {}",
                memory.len(),
                info.memory_bytes
            ),
        });
    }
    Ok(std::sync::Arc::new(memory))
}

/// A private directory for the sockets QEMU's device state passes through.
///
/// Named by the process and a counter. An appliance killed before it removed its
/// directory leaves it behind, and a later process may get the same pid (a daemon
/// killed mid-migration, then another started, did so in CI): a name taken is passed
/// over, never reused, since a directory this process did not create may not be ours.
fn relay_dir(tag: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    const ATTEMPTS: u32 = 64;
    for _ in 0..ATTEMPTS {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = relay_dir_name(tag, n);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("creating {}: {e}", dir.display())),
        }
    }
    Err(format!(
        "creating {}: {ATTEMPTS} names in a row were taken",
        relay_dir_name(tag, NEXT.load(std::sync::atomic::Ordering::Relaxed)).display()
    ))
}

fn relay_dir_name(tag: &str, n: u64) -> PathBuf {
    std::env::temp_dir().join(format!("dwcp-{tag}-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_directories_left_by_a_dead_process_with_the_same_pid_are_passed_over() {
        let first = relay_dir("left-behind").unwrap();
        let n: u64 = first
            .to_string_lossy()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // The next names, as a killed process with this pid would have left them.
        let left: Vec<PathBuf> = (n + 1..n + 4)
            .map(|k| relay_dir_name("left-behind", k))
            .collect();
        for dir in &left {
            std::fs::create_dir(dir).unwrap();
        }
        let next = relay_dir("left-behind").unwrap();
        assert!(next.is_dir());
        assert!(!left.contains(&next) && next != first, "{}", next.display());
        for dir in left.iter().chain([&first, &next]) {
            std::fs::remove_dir(dir).unwrap();
        }
    }
}
