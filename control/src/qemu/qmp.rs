//! A QMP client: the QEMU Machine Protocol over a Unix socket, one command at a time.
//!
//! Protocol per QEMU's `docs/interop/qmp-spec.rst`: the server greets with
//! `{"QMP": {"version": ..., "capabilities": [...]}}`; the client leaves negotiation
//! mode with `qmp_capabilities`; each command `{"execute", "arguments", "id"}` gets one
//! `{"return"}` or `{"error": {"class", "desc"}}` carrying the same id; asynchronous
//! `{"event"}` lines may come in between (kept, the last few, for error messages).
//! Slow-path code: the migration engine never waits on it except at the switchover.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Events kept for diagnostics.
const EVENTS_KEPT: usize = 16;

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Whatever answered is not QEMU's QMP.
    #[error("{path} is not a QEMU QMP socket: {what}")]
    NotQemu {
        /// The socket.
        path: PathBuf,
        /// What it said instead.
        what: String,
    },
    /// The connection failed or closed (QEMU exited?).
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU answered something that is not QMP.
    #[error("QMP socket {path}: unexpected reply to {command}: {reply}")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// The command.
        command: String,
        /// The reply, shortened.
        reply: String,
    },
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One QMP connection.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    version: QemuVersion,
    events: Vec<Value>,
}

fn shorten(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

impl Qmp {
    /// Connect to the QMP socket at `path`, check that QEMU answers, and leave
    /// negotiation mode. `timeout` bounds every read (QEMU answers in milliseconds;
    /// silence means it is hung or is not QEMU).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let io = |source| QmpError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            version: QemuVersion {
                major: 0,
                minor: 0,
                micro: 0,
            },
            events: Vec::new(),
        };
        let not_qemu = |what: String| QmpError::NotQemu {
            path: path.to_owned(),
            what,
        };
        let greeting = match qmp.read_line() {
            Ok(line) => line,
            Err(QmpError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(not_qemu(format!("no greeting within {timeout:?}")));
            }
            Err(e) => return Err(e),
        };
        let value: Value = serde_json::from_str(&greeting)
            .map_err(|_| not_qemu(format!("it greeted with {:?}", shorten(greeting.trim()))))?;
        let version = &value["QMP"]["version"]["qemu"];
        let number = |key: &str| version[key].as_u64();
        qmp.version = match (number("major"), number("minor"), number("micro")) {
            (Some(major), Some(minor), Some(micro)) => QemuVersion {
                major,
                minor,
                micro,
            },
            _ => {
                return Err(not_qemu(format!(
                    "its greeting names no QEMU version: {}",
                    shorten(greeting.trim())
                )));
            }
        };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The process at the other end of the socket (`SO_PEERCRED`): QEMU's, once the
    /// greeting has shown it is QEMU. `None` where the kernel does not say.
    pub fn peer_pid(&self) -> Option<u32> {
        let mut credentials = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED fills a struct ucred of `len` bytes, which `credentials`
        // is; the descriptor is our connected socket.
        let got = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.writer),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut credentials as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (got == 0 && credentials.pid > 0).then_some(credentials.pid as u32)
    }

    /// QEMU's version.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Events received so far (the last few), taken.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Wait up to `timeout` for QEMU to say something unasked: an event, returned (and
    /// kept with the others), or `None` when nothing came. For one that waits on an
    /// event (a state change) without asking QEMU over and over, which on a small host
    /// takes CPU from the very work being waited on.
    pub fn wait_event(&mut self, timeout: Duration) -> Result<Option<Value>, QmpError> {
        if self.reader.buffer().is_empty() {
            let mut ready = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(self.reader.get_ref()),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one pollfd, alive for the call.
            let n = unsafe { libc::poll(&mut ready, 1, millis) };
            if n <= 0 {
                // Nothing yet, or a signal: the caller asks again.
                return Ok(None);
            }
        }
        // QEMU writes each message whole, so a readable socket holds a whole line (the
        // read timeout still bounds a QEMU that stopped halfway).
        let line = self.read_line()?;
        let malformed = || QmpError::Malformed {
            path: self.path.clone(),
            command: "(waiting for an event)".into(),
            reply: shorten(line.trim()),
        };
        let value: Value = serde_json::from_str(&line).map_err(|_| malformed())?;
        if value.get("event").is_none() {
            return Err(malformed());
        }
        self.keep_event(value.clone());
        Ok(Some(value))
    }

    /// Keep `event` with the last few.
    fn keep_event(&mut self, event: Value) {
        if self.events.len() == EVENTS_KEPT {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    fn read_line(&mut self) -> Result<String, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QEMU closed the connection",
                ),
            });
        }
        Ok(line)
    }

    /// Run `command` with `arguments`; returns QEMU's `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let reply = self.read_line()?;
            let malformed = || QmpError::Malformed {
                path: self.path.clone(),
                command: command.to_string(),
                reply: shorten(reply.trim()),
            };
            let value: Value = serde_json::from_str(&reply).map_err(|_| malformed())?;
            if value.get("event").is_some() {
                self.keep_event(value);
                continue;
            }
            if value.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(malformed());
            }
            if let Some(error) = value.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: error["class"].as_str().unwrap_or("?").to_string(),
                    desc: error["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return value.get("return").cloned().ok_or_else(malformed);
        }
    }

    /// `qom-get` of `property` on `path`.
    pub fn qom_get(&mut self, path: &str, property: &str) -> Result<Value, QmpError> {
        self.execute("qom-get", json!({ "path": path, "property": property }))
    }

    /// The VM's run state (`query-status`): `running`, `paused`, `inmigrate`,
    /// `postmigrate`, `finish-migrate`, ...
    pub fn run_state(&mut self) -> Result<String, QmpError> {
        let status = self.execute("query-status", json!({}))?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// The migration's state (`query-migrate`): its status (`none` before any) and the
    /// whole reply.
    pub fn migration(&mut self) -> Result<(String, Value), QmpError> {
        let info = self.execute("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("none").to_string();
        Ok((status, info))
    }

    /// Turn migration capabilities on.
    pub fn enable_capabilities(&mut self, names: &[&str]) -> Result<(), QmpError> {
        let list: Vec<Value> = names
            .iter()
            .map(|n| json!({ "capability": n, "state": true }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    /// A QMP peer that greets, answers `qmp_capabilities`, then writes `lines` after
    /// `delay` each and holds the connection until the client goes.
    fn scripted_peer(
        name: &str,
        lines: Vec<&'static str>,
        delay: Duration,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path =
            std::env::temp_dir().join(format!("dwcp-qmp-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .write_all(
                    b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \
                      \"micro\": 0}}, \"capabilities\": []}}\n",
                )
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            stream.write_all(b"{\"return\": {}, \"id\": 1}\n").unwrap();
            for line in lines {
                std::thread::sleep(delay);
                stream.write_all(line.as_bytes()).unwrap();
            }
            // Until the client hangs up.
            let _ = reader.read_line(&mut request);
        });
        (path, peer)
    }

    #[test]
    fn an_event_is_waited_for_without_asking_and_kept() {
        let (path, peer) = scripted_peer(
            "events",
            vec![
                "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\n",
                "{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 2, \"microseconds\": 0}}\n",
            ],
            Duration::from_millis(50),
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        // Nothing within 1 ms: no event, no error.
        assert!(qmp.wait_event(Duration::from_millis(1)).unwrap().is_none());
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 2 && Instant::now() < deadline {
            if let Some(event) = qmp.wait_event(Duration::from_millis(20)).unwrap() {
                seen.push(event["event"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(seen, ["STOP", "RESUME"]);
        let kept = qmp.take_events();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[1]["timestamp"]["seconds"], 2);
        drop(qmp);
        peer.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_reply_nobody_asked_for_is_refused() {
        let (path, peer) = scripted_peer(
            "unasked",
            vec!["{\"return\": {}, \"id\": 7}\n"],
            Duration::ZERO,
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let outcome = loop {
            match qmp.wait_event(Duration::from_millis(20)) {
                Ok(None) if Instant::now() < deadline => continue,
                other => break other,
            }
        };
        assert!(
            matches!(outcome, Err(QmpError::Malformed { .. })),
            "{outcome:?}"
        );
        drop(qmp);
        peer.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
