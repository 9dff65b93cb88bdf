//! The source VM as the engine's guest.

use super::{QMP_TIMEOUT, QemuError, Qmp, VmInfo, describe, map_memory, relay_dir};
use crossbeam::channel::{Receiver, RecvTimeoutError, bounded};
use dwcp_dataplane::guest::{DeviceStateSource, GuestControl, GuestError};
use dwcp_dataplane::memory::GuestMemory;
use serde_json::{Value, json};
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for QEMU to reach a migration state it was asked for.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's bandwidth for its part of the stream: 1 TB/s, unpaced in effect.
const UNPACED: u64 = 1 << 40;
/// How often QEMU's migration state is polled while the guest is stopped.
const POLL: Duration = Duration::from_micros(500);

/// What the relay thread passes on.
enum Relayed {
    Bytes(Vec<u8>),
    End(Result<(), String>),
}

/// What QEMU reported of its side of the migration (`query-migrate` once completed).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QemuMigrationStats {
    /// QEMU's own downtime figure, ms (from its stop to the end of its stream).
    pub downtime_ms: u64,
    /// QEMU's total time, ms.
    pub total_ms: u64,
    /// Bytes QEMU wrote (device state and any RAM that is not shared).
    pub transferred: u64,
}

/// A running QEMU VM that the appliance migrates: its RAM through the engine, its
/// device state through QEMU.
pub struct QemuSource {
    qmp: Mutex<Qmp>,
    info: VmInfo,
    dir: PathBuf,
    relay: Mutex<Option<Receiver<Relayed>>>,
    notes: Mutex<Vec<String>>,
    stats: Mutex<Option<QemuMigrationStats>>,
}

impl QemuSource {
    /// Connect to the VM's QMP socket and check it can be migrated this way: QEMU, a
    /// running VM whose RAM is one shared file, no migration under way. Turns on the
    /// capabilities the appliance needs. Nothing is changed when it refuses.
    pub fn open(qmp_path: &Path) -> Result<QemuSource, QemuError> {
        let mut qmp = Qmp::connect(qmp_path, QMP_TIMEOUT)?;
        let info = describe(&mut qmp)?;
        let unsuitable = |why: String| QemuError::Unsuitable {
            qmp: qmp_path.to_owned(),
            why,
        };
        if info.state != "running" {
            return Err(unsuitable(format!(
                "the VM is {}, not running: only a running VM is migrated live",
                info.state
            )));
        }
        let (status, _) = qmp.migration()?;
        if !matches!(
            status.as_str(),
            "none" | "completed" | "failed" | "cancelled"
        ) {
            return Err(unsuitable(format!("a migration is already {status}")));
        }
        qmp.enable_capabilities(&["x-ignore-shared", "pause-before-switchover"])
            .map_err(|e| {
                unsuitable(format!(
                    "this QEMU cannot leave shared RAM to the appliance ({e}); QEMU ≥ 9 is needed"
                ))
            })?;
        // QEMU paces its own stream (128 MiB/s by default): its device state and ROMs
        // go to a socket of ours on this host, inside the downtime, so no pacing.
        qmp.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": UNPACED, "avail-switchover-bandwidth": UNPACED }),
        )?;
        let dir = relay_dir("qemu-source").map_err(unsuitable)?;
        Ok(QemuSource {
            qmp: Mutex::new(qmp),
            info,
            dir,
            relay: Mutex::new(None),
            notes: Mutex::new(Vec::new()),
            stats: Mutex::new(None),
        })
    }

    /// The VM.
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// The VM's RAM, mapped from its file.
    pub fn memory(&self) -> Result<Arc<GuestMemory>, QemuError> {
        map_memory(&self.info)
    }

    /// What happened to the VM that the engine's report cannot say (a failed `cont`).
    pub fn take_notes(&self) -> Vec<String> {
        self.notes
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or_default()
    }

    /// QEMU's figures, once its side completed.
    pub fn stats(&self) -> Option<QemuMigrationStats> {
        self.stats.lock().ok().and_then(|s| s.clone())
    }

    /// The VM's run state now.
    pub fn run_state(&self) -> Result<String, QemuError> {
        let mut qmp = self.lock().map_err(|e| QemuError::Unsuitable {
            qmp: self.info.qmp.clone(),
            why: e.to_string(),
        })?;
        Ok(qmp.run_state()?)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Qmp>, GuestError> {
        self.qmp
            .lock()
            .map_err(|_| GuestError("the QMP connection was poisoned".into()))
    }

    fn note(&self, text: String) {
        if let Ok(mut n) = self.notes.lock() {
            n.push(text);
        }
    }

    /// Poll QEMU's migration state until it is `wanted`; fails on `failed` or
    /// `cancelled` with QEMU's reason.
    fn wait_for(qmp: &mut Qmp, wanted: &str) -> Result<Value, GuestError> {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let (status, info) = qmp.migration().map_err(|e| GuestError(e.to_string()))?;
            if status == wanted {
                return Ok(info);
            }
            if matches!(status.as_str(), "failed" | "cancelled") {
                let why = info["error-desc"].as_str().unwrap_or("no reason given");
                return Err(GuestError(format!("QEMU's migration {status}: {why}")));
            }
            if Instant::now() > deadline {
                return Err(GuestError(format!(
                    "QEMU's migration still {status} after {STATE_TIMEOUT:?} (waiting for {wanted})"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Accept QEMU's connection on `listener` and pass on everything it writes.
    fn relay(listener: UnixListener, out: crossbeam::channel::Sender<Relayed>) {
        let result = (|| -> Result<(), String> {
            let deadline = Instant::now() + STATE_TIMEOUT;
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("device-state socket: {e}"))?;
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err("QEMU never connected to the device-state socket".into());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(format!("device-state socket: {e}")),
                }
            };
            stream
                .set_nonblocking(false)
                .map_err(|e| format!("device-state stream: {e}"))?;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        if out.send(Relayed::Bytes(buf[..n].to_vec())).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading QEMU's device state: {e}")),
                }
            }
        })();
        let _ = out.send(Relayed::End(result));
    }
}

impl Drop for QemuSource {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl GuestControl for QemuSource {
    /// Start QEMU's side of the migration toward our socket; it stops the vCPUs and
    /// waits in `pre-switchover`. The vCPUs stopped when QEMU's `STOP` event says, a
    /// few milliseconds after the call (QEMU sets up and sends its ROMs first).
    fn pause(&self) -> Result<Option<Instant>, GuestError> {
        let path = self.dir.join("device-state.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| GuestError(format!("binding {}: {e}", path.display())))?;
        // Unbounded in effect: QEMU must never block on us (a few hundred KiB of ROMs
        // and devices; chunks of at most 256 KiB).
        let (tx, rx) = bounded(4096);
        std::thread::Builder::new()
            .name("dwcp-qemu-relay".into())
            .spawn(move || Self::relay(listener, tx))
            .map_err(|e| GuestError(format!("starting the relay: {e}")))?;
        *self
            .relay
            .lock()
            .map_err(|_| GuestError("relay state poisoned".into()))? = Some(rx);
        let mut qmp = self.lock()?;
        qmp.take_events();
        qmp.execute(
            "migrate",
            json!({ "uri": format!("unix:{}", path.display()) }),
        )
        .map_err(|e| GuestError(e.to_string()))?;
        Self::wait_for(&mut qmp, "pre-switchover")?;
        Ok(qmp
            .take_events()
            .iter()
            .rev()
            .find(|e| e["event"] == "STOP")
            .and_then(|e| event_instant(&e["timestamp"])))
    }

    /// Cancel QEMU's side and let the VM run again: after `migrate_cancel` QEMU
    /// restarts a VM it stopped; a VM already handed over (`postmigrate`) needs `cont`.
    fn resume(&self) {
        let Ok(mut qmp) = self.lock() else {
            return;
        };
        let result = (|| -> Result<(), String> {
            let (status, _) = qmp.migration().map_err(|e| e.to_string())?;
            if !matches!(
                status.as_str(),
                "none" | "completed" | "failed" | "cancelled"
            ) {
                qmp.execute("migrate_cancel", json!({}))
                    .map_err(|e| e.to_string())?;
                let deadline = Instant::now() + STATE_TIMEOUT;
                loop {
                    let (status, _) = qmp.migration().map_err(|e| e.to_string())?;
                    if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(format!("QEMU's migration still {status} after cancelling"));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let state = qmp.run_state().map_err(|e| e.to_string())?;
            if state != "running" {
                qmp.execute("cont", json!({})).map_err(|e| e.to_string())?;
                self.note(format!(
                    "QEMU: the source VM was {state}; resumed it with cont"
                ));
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.note(format!(
                "QEMU: could not resume the source VM ({e}); it needs the operator"
            ));
        }
        if let Ok(mut relay) = self.relay.lock() {
            relay.take();
        }
    }

    /// QEMU throttles vCPUs only inside its own migrations' auto-converge: nothing
    /// here slows them, and the planner, told so, never asks.
    fn set_throttle(&self, _percent: u32) {}

    fn can_throttle(&self) -> bool {
        false
    }

    fn device_state(&self) -> Option<&dyn DeviceStateSource> {
        Some(self)
    }
}

impl DeviceStateSource for QemuSource {
    /// `migrate-continue`: QEMU saves the device state into the relay while the final
    /// round runs; the VM stays stopped (`postmigrate` once QEMU is done).
    fn release(&self) -> Result<(), GuestError> {
        let mut qmp = self.lock()?;
        qmp.execute("migrate-continue", json!({ "state": "pre-switchover" }))
            .map_err(|e| GuestError(e.to_string()))?;
        Ok(())
    }

    fn hand_over(
        &self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), GuestError>,
    ) -> Result<u64, GuestError> {
        let relay = self
            .relay
            .lock()
            .map_err(|_| GuestError("relay state poisoned".into()))?
            .take()
            .ok_or_else(|| GuestError("the VM was not paused for a migration".into()))?;
        let mut bytes = 0u64;
        loop {
            match relay.recv_timeout(STATE_TIMEOUT) {
                Ok(Relayed::Bytes(chunk)) => {
                    bytes += chunk.len() as u64;
                    sink(&chunk)?;
                }
                Ok(Relayed::End(Ok(()))) => break,
                Ok(Relayed::End(Err(e))) => return Err(GuestError(e)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(GuestError(format!(
                        "QEMU wrote no device state for {STATE_TIMEOUT:?}"
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(GuestError("the relay thread ended".into()));
                }
            }
        }
        let mut qmp = self.lock()?;
        let info = Self::wait_for(&mut qmp, "completed")?;
        if let Ok(mut stats) = self.stats.lock() {
            *stats = Some(QemuMigrationStats {
                downtime_ms: info["downtime"].as_u64().unwrap_or(0),
                total_ms: info["total-time"].as_u64().unwrap_or(0),
                transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
            });
        }
        Ok(bytes)
    }
}

/// The moment a QMP event's wall-clock timestamp names, on this process's monotonic
/// clock.
fn event_instant(timestamp: &Value) -> Option<Instant> {
    let seconds = timestamp["seconds"].as_u64()?;
    let micros = timestamp["microseconds"].as_u64()?;
    let wall = std::time::UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_micros(micros);
    let ago = std::time::SystemTime::now().duration_since(wall).ok()?;
    Instant::now().checked_sub(ago)
}
