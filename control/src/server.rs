//! The operator control socket: a Unix socket (created 0600), newline-delimited JSON.
//!
//! One thread serves every client from a `poll(2)` loop, up to `max_clients` at once
//! (more are told so and closed). A client must be root or the daemon's own user
//! (`SO_PEERCRED`). Each request line is capped at [`MAX_REQUEST_BYTES`]; a client that
//! sends no request for [`CLIENT_TIMEOUT`], or does not read its answer for as long, is
//! closed. None of this touches the control thread until a well-formed request arrives,
//! the socket hands it one request at a time, and the control thread answers from its
//! own state without waiting on anyone: a slow, silent, flooding or churning client
//! costs a descriptor and a buffer, not a thread, and cannot crowd out the migrations'
//! reports.

use crate::call::{Call, ServerCounters, call};
use crossbeam::channel::Sender;
use dwcp_api::{MAX_REQUEST_BYTES, Request, Response};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A client silent this long is closed.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The running socket server.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listen on `path`. Its directory must exist, except the default one
    /// ([`dwcp_api::DEFAULT_SOCKET`]'s, created 0700): a typo in a path given by hand
    /// must not create directories. A stale socket file left by a dead daemon is
    /// replaced, a live one is refused.
    pub fn start(
        path: &Path,
        max_clients: usize,
        calls: Sender<Call>,
        counters: Arc<ServerCounters>,
    ) -> Result<Server, String> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            if Path::new(dwcp_api::DEFAULT_SOCKET).parent() != Some(dir) {
                return Err(format!(
                    "control socket {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                ));
            }
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
            .spawn(move || serve(listener, max_clients, calls, counters, &accept_stop))
            .map_err(|e| e.to_string())?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            accept: Some(accept),
        })
    }

    /// Stop serving (connected clients are closed) and remove the socket file.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connected operator.
struct Client {
    stream: UnixStream,
    /// Bytes received and not yet taken as a request.
    input: Vec<u8>,
    /// The response being written, and how much of it is out.
    output: Vec<u8>,
    written: usize,
    /// Since when the client owes us a request (or we wait to write to it).
    since: Instant,
    /// Close once the output is written.
    closing: bool,
}

impl Client {
    fn new(stream: UnixStream) -> Self {
        Client {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            since: Instant::now(),
            closing: false,
        }
    }

    fn respond(&mut self, response: &Response) {
        self.output = serde_json::to_vec(response).unwrap_or_else(|_| b"{}".to_vec());
        self.output.push(b'\n');
        self.written = 0;
        self.since = Instant::now();
    }

    fn answering(&self) -> bool {
        self.written < self.output.len()
    }

    /// Take the next complete request line, if one is in, answering it (through the
    /// control thread when well formed). A line past the cap, or one that can no longer
    /// end within it, is refused and the client closed.
    fn serve_one(&mut self, calls: &Sender<Call>, counters: &ServerCounters) {
        let Some(end) = self.input.iter().position(|&b| b == b'\n') else {
            if self.input.len() > MAX_REQUEST_BYTES {
                counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                self.respond(&Response::error(format!(
                    "request too long (limit {MAX_REQUEST_BYTES} bytes)"
                )));
                self.closing = true;
            }
            return;
        };
        let line: Vec<u8> = self.input.drain(..=end).collect();
        let response = if line.len() > MAX_REQUEST_BYTES + 1 {
            counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            self.closing = true;
            Response::error(format!(
                "request too long (limit {MAX_REQUEST_BYTES} bytes)"
            ))
        } else {
            match parse(&line) {
                Ok(request) => call(calls, request, CALL_TIMEOUT),
                Err(why) => {
                    counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                    Response::error(why)
                }
            }
        };
        self.respond(&response);
    }

    /// Read what is there; false when the client hung up or failed.
    fn read_some(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    // Never hold more than one over-long line's worth.
                    if self.input.len() > MAX_REQUEST_BYTES + 1 {
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Write what the socket takes; false when the client is gone.
    fn write_some(&mut self) -> bool {
        while self.answering() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return false,
                Ok(n) => {
                    self.written += n;
                    self.since = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// Longest wait for the control thread's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's one thread: accept, read, answer, time out, all from one `poll(2)`
/// loop. A client costs a descriptor and its buffers, never a thread, so connecting
/// and hanging up in a loop costs the daemon a few system calls each; and the control
/// thread sees at most one request from the socket at a time, so no number of clients
/// can queue work ahead of the migrations' reports.
fn serve(
    listener: UnixListener,
    max_clients: usize,
    calls: Sender<Call>,
    counters: Arc<ServerCounters>,
    stop: &AtomicBool,
) {
    // SAFETY: getuid cannot fail.
    let own_uid = unsafe { libc::getuid() };
    let mut clients: Vec<Client> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        fds.clear();
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &clients {
            // One request at a time per client: while its answer is going out, its
            // further requests wait in the socket (and, when it never reads, its own
            // writes block, not ours).
            let events = if c.answering() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready < 0 {
            continue;
        }
        let now = Instant::now();
        let mut gone = vec![false; clients.len()];
        for (i, c) in clients.iter_mut().enumerate() {
            let revents = fds[i + 1].revents;
            let alive = if revents & libc::POLLOUT != 0 {
                c.write_some()
            } else if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                c.read_some()
            } else {
                true
            };
            if !alive {
                gone[i] = true;
                continue;
            }
            if !c.answering() {
                if c.closing {
                    gone[i] = true;
                    continue;
                }
                c.serve_one(&calls, &counters);
                if c.answering() {
                    // Most answers fit the socket buffer at once.
                    if !c.write_some() {
                        gone[i] = true;
                    }
                } else if now.duration_since(c.since) >= CLIENT_TIMEOUT {
                    counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    c.respond(&Response::error(format!(
                        "timeout: no request within {} s",
                        CLIENT_TIMEOUT.as_secs()
                    )));
                    c.closing = true;
                    let _ = c.write_some();
                }
            } else if now.duration_since(c.since) >= CLIENT_TIMEOUT {
                // It does not read its answer.
                gone[i] = true;
            }
        }
        let mut i = 0;
        clients.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
        if fds[0].revents & libc::POLLIN != 0 {
            accept_some(&listener, &mut clients, max_clients, own_uid, &counters);
        }
    }
}

/// Connections taken per turn of the loop: a client connecting and hanging up
/// without pause must not keep the loop accepting while others wait for answers.
const ACCEPTS_PER_TURN: usize = 32;

/// Take pending connections (up to [`ACCEPTS_PER_TURN`]): checked, refused when over
/// the cap, else served.
fn accept_some(
    listener: &UnixListener,
    clients: &mut Vec<Client>,
    max_clients: usize,
    own_uid: u32,
    counters: &ServerCounters,
) {
    for _ in 0..ACCEPTS_PER_TURN {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        if let Err(why) = check_peer(&stream, own_uid) {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(stream, &why);
            continue;
        }
        if clients.len() >= max_clients {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(
                stream,
                &format!("busy: {max_clients} clients connected; try again"),
            );
            continue;
        }
        clients.push(Client::new(stream));
    }
}

/// Tell a client why it is turned away (best effort: it is not waited for).
fn refuse(mut stream: UnixStream, why: &str) {
    let mut line = serde_json::to_vec(&Response::error(why)).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    let _ = stream.write(&line);
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
            stream.as_raw_fd(),
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
    let request: Request = serde_json::from_value(value.clone()).map_err(|e| {
        if e.to_string().contains("unknown variant") {
            format!("unknown command {cmd:?} (status, migrate, migrations, cancel, set-mode, set, flags, flag-set, flags-reload, metrics, config, shutdown, cluster-status, cluster-migrations, cluster-budget)")
        } else {
            format!("bad {cmd:?} request: {e}")
        }
    })?;
    // Commands without fields: serde's internally tagged form lets extra keys through,
    // so they are checked here, like every other command's (and the config file's).
    let takes_no_fields = matches!(
        request.command,
        dwcp_api::Command::Status
            | dwcp_api::Command::Migrations
            | dwcp_api::Command::Flags
            | dwcp_api::Command::FlagsReload
            | dwcp_api::Command::Metrics
            | dwcp_api::Command::Config
            | dwcp_api::Command::Shutdown
            | dwcp_api::Command::ClusterStatus
            | dwcp_api::Command::ClusterMigrations
    );
    if takes_no_fields
        && let Some(extra) = object.keys().find(|k| !matches!(k.as_str(), "v" | "cmd"))
    {
        return Err(format!(
            "bad {cmd:?} request: unknown field `{extra}` ({cmd:?} takes none)"
        ));
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn unknown_fields_are_refused_for_every_command() {
        for line in [
            r#"{"v":1,"cmd":"status","bogus":1}"#,
            r#"{"v":1,"cmd":"shutdown","now":true}"#,
            r#"{"v":1,"cmd":"cancel","id":5,"x":2}"#,
            r#"{"v":1,"cmd":"set","streams":2,"extra":1}"#,
        ] {
            let e = parse(line.as_bytes()).unwrap_err();
            assert!(e.contains("unknown field"), "{line}: {e}");
        }
        parse(br#"{"v":1,"cmd":"status"}"#).unwrap();
        parse(br#"{"v":1,"cmd":"set","streams":2}"#).unwrap();
    }
}
