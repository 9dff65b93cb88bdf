//! The operator control socket: a Unix socket (created 0600), newline-delimited JSON.
//!
//! One thread accepts; each client gets a thread of its own, up to `max_clients` at
//! once (more are told so and closed). A client must be root or the daemon's own user
//! (`SO_PEERCRED`). Each request line is capped at [`MAX_REQUEST_BYTES`]; a client that
//! sends nothing for [`CLIENT_TIMEOUT`] is closed. None of this touches the control
//! thread until a well-formed request arrives, and the control thread answers from its
//! own state without waiting on anyone, so a slow or hostile client costs only its own
//! thread.

use crate::daemon::{Call, ServerCounters, call};
use crossbeam::channel::Sender;
use dwcp_api::{MAX_REQUEST_BYTES, Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// A client silent this long is closed.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The running socket server.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listen on `path` (its directory is created 0700 if missing; a stale socket file
    /// left by a dead daemon is replaced, a live one is refused).
    pub fn start(
        path: &Path,
        max_clients: usize,
        calls: Sender<Call>,
        counters: Arc<ServerCounters>,
    ) -> Result<Server, String> {
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{}: another daemon is listening there",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        // Created under a tight umask, then set 0600 explicitly: no moment where
        // others could connect.
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept_stop = stop.clone();
        let accept = std::thread::Builder::new()
            .name("dwcp-socket".into())
            .spawn(move || accept_loop(listener, max_clients, calls, counters, &accept_stop))
            .map_err(|e| e.to_string())?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            accept: Some(accept),
        })
    }

    /// Stop accepting and remove the socket file (clients in progress finish on their
    /// own threads).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    max_clients: usize,
    calls: Sender<Call>,
    counters: Arc<ServerCounters>,
    stop: &AtomicBool,
) {
    let active = Arc::new(AtomicUsize::new(0));
    // SAFETY: getuid cannot fail.
    let own_uid = unsafe { libc::getuid() };
    while !stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        if let Err(why) = check_peer(&stream, own_uid) {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(stream, &why);
            continue;
        }
        if active.load(Ordering::Acquire) >= max_clients {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(
                stream,
                &format!("busy: {max_clients} clients connected; try again"),
            );
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let calls = calls.clone();
        let counters = counters.clone();
        let active_here = active.clone();
        let spawned = std::thread::Builder::new()
            .name("dwcp-client".into())
            .stack_size(128 << 10)
            .spawn(move || {
                serve_client(stream, &calls, &counters);
                active_here.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn refuse(mut stream: UnixStream, why: &str) {
    let _ = write_response(&mut stream, &Response::error(why));
}

/// Root or the daemon's own user; anyone else is refused, by uid.
fn check_peer(stream: &UnixStream, own_uid: u32) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is writable for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err("cannot identify the peer (SO_PEERCRED failed)".into());
    }
    if cred.uid == 0 || cred.uid == own_uid {
        Ok(())
    } else {
        Err(format!(
            "permission denied: uid {} may not control this daemon (root or uid {own_uid} only)",
            cred.uid
        ))
    }
}

fn write_response(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    stream.write_all(&line)
}

/// Requests until the client hangs up, sends garbage past the cap, or goes silent.
fn serve_client(stream: UnixStream, calls: &Sender<Call>, counters: &ServerCounters) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        // At most the cap plus one byte: a longer line is refused without reading it
        // all.
        let read = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                let _ = write_response(
                    &mut writer,
                    &Response::error(format!(
                        "timeout: no request within {} s",
                        CLIENT_TIMEOUT.as_secs()
                    )),
                );
                return;
            }
            Err(_) => return,
        }
        if line.last() != Some(&b'\n') {
            counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            let why = if line.len() > MAX_REQUEST_BYTES {
                format!("request too long (limit {MAX_REQUEST_BYTES} bytes)")
            } else {
                "request not terminated by a newline".into()
            };
            let _ = write_response(&mut writer, &Response::error(why));
            return;
        }
        let response = match parse(&line) {
            Ok(request) => call(calls, request, Duration::from_secs(10)),
            Err(why) => {
                counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                Response::error(why)
            }
        };
        if write_response(&mut writer, &response).is_err() {
            return;
        }
    }
}

/// A request line, or why it is not one.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err("a request is a JSON object".into());
    };
    match object.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(dwcp_api::PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} not supported (this daemon speaks {})",
                dwcp_api::PROTOCOL_VERSION
            ));
        }
        None => return Err("missing protocol version \"v\"".into()),
    }
    let Some(cmd) = object.get("cmd").and_then(|c| c.as_str()) else {
        return Err("missing command \"cmd\"".into());
    };
    serde_json::from_value(value.clone()).map_err(|e| {
        if e.to_string().contains("unknown variant") {
            format!("unknown command {cmd:?} (status, migrate, migrations, cancel, set-mode, set, flags, flag-set, flags-reload, metrics, config, shutdown)")
        } else {
            format!("bad {cmd:?} request: {e}")
        }
    })
}
