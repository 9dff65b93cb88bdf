//! The destination VM as the engine's device-state sink.

use super::{QMP_TIMEOUT, QemuError, Qmp, VmInfo, describe, map_memory, relay_dir};
use dwcp_dataplane::guest::{DeviceStateSink, GuestError};
use dwcp_dataplane::memory::GuestMemory;
use serde_json::json;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for the VM to run once its device state is in.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A QEMU VM waiting for an incoming migration (`-incoming defer`), whose RAM file the
/// appliance fills and whose device state it feeds to QEMU.
pub struct QemuIncoming {
    qmp: Qmp,
    info: VmInfo,
    socket: PathBuf,
    /// The private directory holding `socket`, removed with it (`None`: the socket is
    /// kept where the caller chose).
    dir: Option<PathBuf>,
    /// QEMU was already listening on `socket` when opened: an earlier run of this
    /// appliance had it listen there.
    taken_over: bool,
    stream: Option<UnixStream>,
}

impl QemuIncoming {
    /// Connect to the incoming VM's QMP socket, check it waits for a migration with
    /// its RAM in one shared file, and have QEMU listen for the device state: on
    /// `kept_socket` if given (a path that outlives this process, so that an appliance
    /// restarted mid-migration finds QEMU listening there still and takes it over),
    /// else in a private directory of this process.
    pub fn open(qmp_path: &Path, kept_socket: Option<&Path>) -> Result<QemuIncoming, QemuError> {
        let mut qmp = Qmp::connect(qmp_path, QMP_TIMEOUT)?;
        let info = describe(&mut qmp)?;
        let unsuitable = |why: String| QemuError::Unsuitable {
            qmp: qmp_path.to_owned(),
            why,
        };
        if info.state != "inmigrate" {
            return Err(unsuitable(format!(
                "the VM is {}, not waiting for a migration: start it with -incoming defer",
                info.state
            )));
        }
        let (status, migration) = qmp.migration()?;
        let listening = listening_socket(&migration);
        let (socket, dir) = match kept_socket {
            Some(socket) => (socket.to_owned(), None),
            None => {
                let dir = relay_dir("qemu-incoming").map_err(unsuitable)?;
                (dir.join("device-state.sock"), Some(dir))
            }
        };
        let taken_over =
            status == "setup" && listening.as_deref() == Some(socket.as_path()) && socket.exists();
        if !taken_over && status != "none" {
            return Err(unsuitable(format!(
                "QEMU's incoming migration is already {status}{}: restart the VM with \
                 -incoming defer",
                listening
                    .map(|l| format!(" (listening on {})", l.display()))
                    .unwrap_or_default()
            )));
        }
        // Allowed while QEMU listens, too: nothing has arrived yet.
        qmp.enable_capabilities(&["x-ignore-shared"]).map_err(|e| {
            unsuitable(format!(
                "this QEMU cannot leave shared RAM to the appliance ({e}); QEMU ≥ 9 is needed"
            ))
        })?;
        if !taken_over {
            if let Some(parent) = socket.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| unsuitable(format!("creating {}: {e}", parent.display())))?;
            }
            // QEMU replaces whatever a dead run left at the path.
            qmp.execute(
                "migrate-incoming",
                json!({ "uri": format!("unix:{}", socket.display()) }),
            )?;
        }
        Ok(QemuIncoming {
            qmp,
            info,
            socket,
            dir,
            taken_over,
            stream: None,
        })
    }

    /// Whether QEMU was found listening for this appliance's device state already (an
    /// earlier run of the appliance had it listen, then stopped).
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }

    /// The VM.
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// The VM's RAM, mapped from its file (written by the migration, never truncated).
    pub fn memory(&self) -> Result<Arc<GuestMemory>, QemuError> {
        map_memory(&self.info)
    }

    /// The VM's run state now.
    pub fn run_state(&mut self) -> Result<String, QemuError> {
        Ok(self.qmp.run_state()?)
    }

    /// Why QEMU's incoming side failed, if it says.
    fn failure(&mut self) -> Option<String> {
        let (status, info) = self.qmp.migration().ok()?;
        (status == "failed").then(|| {
            info["error-desc"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string()
        })
    }
}

impl Drop for QemuIncoming {
    fn drop(&mut self) {
        // A kept socket stays: QEMU may listen on it still, for a later session.
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The unix socket an incoming QEMU listens on (`query-migrate`'s `socket-address`).
fn listening_socket(migration: &serde_json::Value) -> Option<PathBuf> {
    migration["socket-address"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == "unix")
        .and_then(|a| a["path"].as_str())
        .map(PathBuf::from)
}

impl DeviceStateSink for QemuIncoming {
    fn write(&mut self, chunk: &[u8]) -> Result<(), GuestError> {
        if self.stream.is_none() {
            let stream = UnixStream::connect(&self.socket)
                .map_err(|e| GuestError(format!("connecting to QEMU's incoming socket: {e}")))?;
            self.stream = Some(stream);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(GuestError("no stream to QEMU".into()));
        };
        if let Err(e) = stream.write_all(chunk) {
            let why = self.failure().unwrap_or_else(|| e.to_string());
            return Err(GuestError(format!(
                "QEMU did not take the device state: {why} (the destination VM is left to \
                 the management layer)"
            )));
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), GuestError> {
        // The end of the stream tells QEMU the state is complete.
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let state = self
                .qmp
                .run_state()
                .map_err(|e| GuestError(format!("the destination VM: {e}")))?;
            if state == "running" {
                return Ok(());
            }
            if let Some(why) = self.failure() {
                return Err(GuestError(format!(
                    "QEMU could not load the device state: {why} (the destination VM is left \
                     to the management layer)"
                )));
            }
            if Instant::now() > deadline {
                return Err(GuestError(format!(
                    "the destination VM is still {state} {START_TIMEOUT:?} after its device \
                     state (left to the management layer)"
                )));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}
