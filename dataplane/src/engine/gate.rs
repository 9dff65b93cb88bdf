//! The migration port: accepts connections and sorts them by their first bytes before
//! any session takes one.
//!
//! Anyone who can reach the port can connect, so no connection may hold up another: all
//! pending connections are watched at once (`poll(2)`), each must say what it is — a
//! session's control hello, or a data stream's hello — within the handshake timeout or
//! is closed, and one that closes without a word (a port scanner) is dropped quietly.
//! An authenticated session's TLS handshake runs here too, for every connection at
//! once and under the same deadline, so a peer that stalls in the middle of one holds
//! up no other; nothing is allocated for a peer before it has authenticated.
//! A control connection that arrives while a session is still collecting its data
//! streams waits its turn here instead of being taken for one of them. An [`Acceptor`]
//! kept across sessions (the daemon's) keeps what it has sorted for the next session.
//!
//! A session takes its connections through a [`Port`]: the gate itself when one session
//! at a time owns it, or a lane of the dispatcher that runs several at once
//! (`lanes.rs`).

use super::MigrationError;
use super::handshake::OpenedControl;
use crate::security::tls::{ServerHandshake, is_tls_hello};
use crate::security::{Identity, SecurityError, TlsChannel, counters};
use crate::wire::{
    self, ControlMessage, ControlReadError, MAX_CONTROL_MESSAGE, STREAM_HELLO_LEN, STREAM_MAGIC,
    WireError,
};
use std::collections::VecDeque;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How a control connection opened, as handed to a session.
pub(super) enum Opening {
    /// With a plain control message (valid or not).
    Plain(TcpStream, Result<ControlMessage, ControlReadError>),
    /// With a TLS handshake that completed: the session (its peer's pinned names still
    /// to be checked, [`TlsChannel::authorized`]).
    Tls(TlsChannel),
    /// With a TLS handshake that failed (the peer was told why).
    TlsFailed(SecurityError),
    /// With a TLS hello, but this destination has no identity (`--insecure`).
    TlsUnwanted(TcpStream),
    /// Opened already, its first message read, by the session it first reached: a
    /// source's resume of another session, passed on to that one.
    Opened(Box<OpenedControl>),
}

/// Where a session takes its connections from (see the module docs).
pub(super) trait Port {
    /// The identity TLS handshakes present from now on.
    fn set_identity(&mut self, identity: Option<Arc<Identity>>);
    /// The next control connection by `deadline` (each connection has `handshake` to
    /// say what it is); gives up at once when `cancel` is set.
    fn next_control(
        &mut self,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(SocketAddr, Opening), MigrationError>;
    /// The next data stream of this session and its hello's bytes, by `deadline`.
    fn next_stream(
        &mut self,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(TcpStream, [u8; STREAM_HELLO_LEN]), MigrationError>;
    /// While a session runs, without waiting: data streams that arrived for it, and
    /// new sessions turned away with `reason` unless `hold_controls` (see
    /// [`Acceptor::turn_away`]).
    fn turn_away(
        &mut self,
        handshake: Duration,
        reason: &str,
        hold_controls: bool,
    ) -> Vec<(TcpStream, [u8; STREAM_HELLO_LEN])>;
    /// Whether a control connection waits that may be this session's source back.
    fn control_waiting(&mut self) -> bool;
    /// Connections closed so far for silence.
    fn dropped(&self) -> u64;
    /// Connections open now that have not said what they are.
    fn silent(&self) -> usize;
    /// A data stream was closed for presenting no valid binding.
    fn count_unbound(&mut self);
    /// The session this port serves is `session_id` (from its hello): its data streams
    /// and its source's resumes come here from now on. Refused when another session
    /// here has that id.
    fn expect_session(&mut self, session_id: u128) -> Result<(), MigrationError>;
    /// Pass a source's resume of `session_id` to that session, if it is another one
    /// served here; otherwise it comes back.
    fn forward_resume(
        &mut self,
        session_id: u128,
        peer: SocketAddr,
        opened: Box<OpenedControl>,
    ) -> Result<(), Box<OpenedControl>>;
    /// Admit a session needing `bytes` of guest memory among the others served at
    /// once (`max_memory` bounds their sum), or say why not.
    fn admit(&mut self, bytes: u64, max_memory: Option<u64>) -> Result<(), MigrationError>;
}

/// How a control connection opened, as sorted.
enum ControlFirst {
    Plain(Result<ControlMessage, ControlReadError>),
    /// Boxed: a rustls connection is a kilobyte, the other variants a few words.
    Tls(Box<ServerHandshake>),
    TlsFailed(SecurityError),
    TlsUnwanted,
}

/// A connection that has said what it is.
enum First {
    /// A control connection and how it opened.
    Control(ControlFirst),
    /// A data stream and its hello's bytes (not yet checked against a session).
    Stream([u8; STREAM_HELLO_LEN]),
}

/// A connection sorted by its first bytes.
struct Sorted {
    /// The connection, blocking again.
    stream: TcpStream,
    /// Its address.
    peer: SocketAddr,
    /// What it said.
    first: First,
}

/// What the caller waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A control connection: a new session.
    Control,
    /// A data stream (control connections that come meanwhile wait for the next
    /// session).
    Stream,
    /// Either (the dispatcher of concurrent sessions).
    Any,
}

/// A connection that said what it is, as handed to the dispatcher of concurrent
/// sessions.
pub(super) enum Arrival {
    /// A control connection: a new session, or a source back to resume one.
    Control(SocketAddr, Opening),
    /// A data stream and its hello's bytes.
    Stream(TcpStream, [u8; STREAM_HELLO_LEN]),
}

/// A connection that has not said what it is yet.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    since: Instant,
    bytes: Vec<u8>,
    /// Its TLS handshake, once its first bytes showed one.
    tls: Option<Box<ServerHandshake>>,
}

/// What reading a pending connection's first bytes gave.
enum Read1 {
    /// More bytes needed.
    Waiting,
    /// It closed or failed before saying anything useful: drop it.
    Gone,
    /// It said what it is.
    Sorted(First),
}

/// The migration port's gate (see the module docs).
pub struct Acceptor<'l> {
    listener: &'l TcpListener,
    pending: Vec<Pending>,
    /// Control connections sorted while a session collected its data streams.
    waiting: VecDeque<Sorted>,
    /// Connections closed for silence, or for closing without a word.
    dropped: u64,
    /// Data streams closed for presenting no valid binding to an authenticated session.
    unbound: u64,
    /// The identity TLS handshakes present (`None`: TLS hellos are refused).
    identity: Option<Arc<Identity>>,
}

impl<'l> Acceptor<'l> {
    /// A gate on `listener`.
    pub fn new(listener: &'l TcpListener) -> Self {
        Acceptor {
            listener,
            pending: Vec::new(),
            waiting: VecDeque::new(),
            dropped: 0,
            unbound: 0,
            identity: None,
        }
    }

    /// The identity TLS handshakes from now on present (the session's: reloaded for
    /// each session by whoever rotates certificates).
    pub fn set_identity(&mut self, identity: Option<Arc<Identity>>) {
        self.identity = identity;
    }

    /// Data streams closed so far for presenting no valid binding to their session.
    pub fn unbound(&self) -> u64 {
        self.unbound
    }

    /// Connections closed so far because they said nothing in time, or closed before
    /// saying what they are.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether a connection is waiting to be sorted or taken.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.waiting.is_empty()
    }

    /// The next control connection (a new session), by `deadline`: the connection,
    /// its address and its first message. Each connection gets `handshake` to say
    /// what it is. Gives up at once when `cancel` is set.
    pub(super) fn next_control(
        &mut self,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(SocketAddr, Opening), MigrationError> {
        let sorted = self.next(Want::Control, deadline, handshake, cancel)?;
        let First::Control(first) = sorted.first else {
            unreachable!("`next` hands out what was asked for")
        };
        Ok((sorted.peer, self.opening(sorted.stream, first)))
    }

    /// The next connection of either kind, by `deadline` (the dispatcher's wait).
    pub(super) fn next_any(
        &mut self,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<Arrival, MigrationError> {
        let sorted = self.next(Want::Any, deadline, handshake, cancel)?;
        Ok(match sorted.first {
            First::Control(first) => {
                Arrival::Control(sorted.peer, self.opening(sorted.stream, first))
            }
            First::Stream(hello) => Arrival::Stream(sorted.stream, hello),
        })
    }

    /// A sorted control connection as a session takes it.
    fn opening(&self, stream: TcpStream, first: ControlFirst) -> Opening {
        match first {
            ControlFirst::Plain(first) => Opening::Plain(stream, first),
            ControlFirst::Tls(done) => match &self.identity {
                Some(identity) => Opening::Tls(done.finish(identity, stream)),
                // The identity went away since (the files no longer load): refuse.
                None => Opening::TlsUnwanted(stream),
            },
            ControlFirst::TlsFailed(e) => Opening::TlsFailed(e),
            ControlFirst::TlsUnwanted => Opening::TlsUnwanted(stream),
        }
    }

    /// The next data stream and its hello's bytes, by `deadline`, as
    /// [`Acceptor::next_control`]; control connections that come meanwhile wait for
    /// the next session.
    pub(super) fn next_stream(
        &mut self,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(TcpStream, [u8; STREAM_HELLO_LEN]), MigrationError> {
        let sorted = self.next(Want::Stream, deadline, handshake, cancel)?;
        match sorted.first {
            First::Stream(hello) => Ok((sorted.stream, hello)),
            First::Control(_) => unreachable!("`next` keeps control connections back"),
        }
    }

    /// The next connection of kind `want`.
    fn next(
        &mut self,
        want: Want,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<Sorted, MigrationError> {
        if want != Want::Stream
            && let Some(s) = self.waiting.pop_front()
        {
            return Ok(s);
        }
        self.listener
            .set_nonblocking(true)
            .map_err(super::handshake::io("listener"))?;
        let found = self.poll_until(want, deadline, handshake, cancel);
        let _ = self.listener.set_nonblocking(false);
        found
    }

    fn poll_until(
        &mut self,
        want: Want,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<Sorted, MigrationError> {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            // Acquire: pairs with the Release store of whoever cancels.
            if cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Aborted {
                    reason: "cancelled at the destination".into(),
                    rounds: 0,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MigrationError::Transport(match want {
                    Want::Control | Want::Any => {
                        "timed out waiting for the source to connect".into()
                    }
                    Want::Stream => format!(
                        "timed out waiting for the session's data streams ({} connections \
                         closed for saying nothing in time)",
                        self.dropped
                    ),
                }));
            }
            self.close_overdue(now, handshake);
            fds.clear();
            fds.push(pollfd(self.listener.as_raw_fd()));
            fds.extend(self.pending.iter().map(|p| pollfd(p.stream.as_raw_fd())));
            let wait = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(20));
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
            let ready = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    wait.as_millis().max(1) as libc::c_int,
                )
            };
            if ready <= 0 {
                continue;
            }
            // Sort what spoke, newest last so indices stay valid while removing.
            for i in (0..self.pending.len()).rev() {
                if fds[i + 1].revents == 0 {
                    continue;
                }
                match read_first(&mut self.pending[i], self.identity.as_ref()) {
                    Read1::Waiting => {}
                    Read1::Gone => {
                        self.pending.swap_remove(i);
                        self.dropped += 1;
                    }
                    Read1::Sorted(first) => {
                        let p = self.pending.swap_remove(i);
                        let _ = p.stream.set_nonblocking(false);
                        let sorted = Sorted {
                            stream: p.stream,
                            peer: p.peer,
                            first,
                        };
                        match (&sorted.first, want) {
                            (First::Control(_), Want::Stream) => self.waiting.push_back(sorted),
                            // A data stream of no session here (one that outlived its
                            // session, say a late replacement): closed.
                            (First::Stream(_), Want::Control) => self.dropped += 1,
                            _ => return Ok(sorted),
                        }
                    }
                }
            }
            if fds[0].revents != 0 {
                self.accept_pending();
            }
        }
    }

    /// While a session runs: sort what has arrived without waiting, and turn every new
    /// session away with `reason` (a plain refusal, or one inside its TLS session once
    /// authenticated) — unless `hold_controls`, when new control connections wait
    /// instead (the session's own connections have gone silent: one of them may be its
    /// source coming back to resume it). Data streams are handed back with their
    /// hellos' bytes (the session judges whether one replaces a stream it lost).
    /// Connections still saying what they are stay pending, under their handshake
    /// deadline.
    pub(super) fn turn_away(
        &mut self,
        handshake: Duration,
        reason: &str,
        hold_controls: bool,
    ) -> Vec<(TcpStream, [u8; STREAM_HELLO_LEN])> {
        let mut streams = Vec::new();
        if self.listener.set_nonblocking(true).is_err() {
            return streams;
        }
        self.accept_pending();
        let _ = self.listener.set_nonblocking(false);
        self.close_overdue(Instant::now(), handshake);
        let mut fds: Vec<libc::pollfd> = self
            .pending
            .iter()
            .map(|p| pollfd(p.stream.as_raw_fd()))
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        let refusal = ControlMessage::Refused {
            reason: reason.to_string(),
        };
        // Sessions that were waiting for this one to start are turned away too.
        while !hold_controls && let Some(sorted) = self.waiting.pop_front() {
            refuse_busy(
                self.identity.as_ref(),
                &sorted.stream,
                sorted.first,
                &refusal,
            );
        }
        for i in (0..self.pending.len()).rev() {
            if fds[i].revents == 0 {
                continue;
            }
            match read_first(&mut self.pending[i], self.identity.as_ref()) {
                Read1::Waiting => continue,
                Read1::Gone => self.dropped += 1,
                Read1::Sorted(First::Stream(hello)) => {
                    let p = self.pending.swap_remove(i);
                    let _ = p.stream.set_nonblocking(false);
                    streams.push((p.stream, hello));
                    continue;
                }
                Read1::Sorted(first) if hold_controls => {
                    let p = self.pending.swap_remove(i);
                    let _ = p.stream.set_nonblocking(false);
                    self.waiting.push_back(Sorted {
                        stream: p.stream,
                        peer: p.peer,
                        first,
                    });
                    continue;
                }
                Read1::Sorted(first) => {
                    refuse_busy(
                        self.identity.as_ref(),
                        &self.pending[i].stream,
                        first,
                        &refusal,
                    );
                }
            }
            self.pending.swap_remove(i);
        }
        streams
    }

    /// Close the pending connections that have had `handshake` to say what they are
    /// (or to finish their TLS handshake) and have not.
    fn close_overdue(&mut self, now: Instant, handshake: Duration) {
        let before = self.pending.len();
        self.pending.retain(|p| {
            let in_time = now.duration_since(p.since) < handshake;
            if !in_time && p.tls.is_some() {
                counters::handshake("timeout");
            }
            in_time
        });
        self.dropped += (before - self.pending.len()) as u64;
    }

    /// Take every connection waiting in the listen queue.
    fn accept_pending(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.pending.push(Pending {
                            stream,
                            peer,
                            since: Instant::now(),
                            bytes: Vec::new(),
                            tls: None,
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl Port for Acceptor<'_> {
    fn set_identity(&mut self, identity: Option<Arc<Identity>>) {
        Acceptor::set_identity(self, identity);
    }

    fn next_control(
        &mut self,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(SocketAddr, Opening), MigrationError> {
        Acceptor::next_control(self, deadline, handshake, cancel)
    }

    fn next_stream(
        &mut self,
        deadline: Instant,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(TcpStream, [u8; STREAM_HELLO_LEN]), MigrationError> {
        Acceptor::next_stream(self, deadline, handshake, cancel)
    }

    fn turn_away(
        &mut self,
        handshake: Duration,
        reason: &str,
        hold_controls: bool,
    ) -> Vec<(TcpStream, [u8; STREAM_HELLO_LEN])> {
        Acceptor::turn_away(self, handshake, reason, hold_controls)
    }

    fn control_waiting(&mut self) -> bool {
        !self.waiting.is_empty()
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }

    fn silent(&self) -> usize {
        self.pending.len()
    }

    fn count_unbound(&mut self) {
        self.unbound += 1;
    }

    /// One session at a time: everything that comes is for it, or turned away.
    fn expect_session(&mut self, _session_id: u128) -> Result<(), MigrationError> {
        Ok(())
    }

    fn forward_resume(
        &mut self,
        _session_id: u128,
        _peer: SocketAddr,
        opened: Box<OpenedControl>,
    ) -> Result<(), Box<OpenedControl>> {
        Err(opened)
    }

    fn admit(&mut self, bytes: u64, max_memory: Option<u64>) -> Result<(), MigrationError> {
        within_max_memory(bytes, max_memory)
    }
}

/// Refused when a guest of `bytes` is more than `max_memory` on its own (whatever else
/// is received meanwhile).
pub(super) fn within_max_memory(bytes: u64, max_memory: Option<u64>) -> Result<(), MigrationError> {
    match max_memory {
        Some(max) if bytes > max => Err(MigrationError::RefusedSource(format!(
            "guest memory of {bytes} bytes is more than this destination admits ({max} \
             bytes, [dest] max_memory)"
        ))),
        _ => Ok(()),
    }
}

/// Tell a sorted connection that this destination is busy: a plain session in plain
/// words, an authenticated one inside its TLS session; anything else is just closed
/// (when `stream` goes).
fn refuse_busy(
    identity: Option<&Arc<Identity>>,
    stream: &TcpStream,
    first: First,
    refusal: &ControlMessage,
) {
    let Ok(mut socket) = stream.try_clone() else {
        return;
    };
    let _ = socket.set_nonblocking(false);
    // A peer that does not read cannot hold this up for long.
    let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
    match first {
        First::Control(ControlFirst::Plain(Ok(_))) => {
            let _ = wire::write_control(&mut socket, refusal);
        }
        First::Control(ControlFirst::Tls(done)) => {
            if let Some(identity) = identity {
                let mut channel = done.finish(identity, socket);
                if channel.authorized().is_ok() {
                    let _ = wire::write_control(&mut channel, refusal);
                }
            }
        }
        _ => {}
    }
}

fn pollfd(fd: std::os::fd::RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Read what a pending connection has sent, and sort it once it is enough: a data
/// stream's hello starts with [`STREAM_MAGIC`]; anything else is taken as a control
/// message (its length, then its body), whose checks then say what is wrong with it.
fn read_first(p: &mut Pending, identity: Option<&Arc<Identity>>) -> Read1 {
    if let Some(handshake) = &mut p.tls {
        return match handshake.advance(&mut p.stream) {
            Ok(false) => Read1::Waiting,
            Ok(true) => {
                let done = p.tls.take().expect("a handshake in progress");
                Read1::Sorted(First::Control(ControlFirst::Tls(done)))
            }
            Err(e) => Read1::Sorted(First::Control(ControlFirst::TlsFailed(e))),
        };
    }
    let needed = |bytes: &[u8]| -> usize {
        if bytes.len() < 4 {
            return 4;
        }
        if bytes[..4] == STREAM_MAGIC {
            return STREAM_HELLO_LEN;
        }
        if is_tls_hello(bytes) {
            return 4;
        }
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        // Too long to wait for: the control checks refuse it from its length alone.
        if len > MAX_CONTROL_MESSAGE {
            4
        } else {
            4 + len
        }
    };
    loop {
        let want = needed(&p.bytes);
        if p.bytes.len() >= want {
            break;
        }
        let have = p.bytes.len();
        p.bytes.resize(want, 0);
        let read = p.stream.read(&mut p.bytes[have..]);
        p.bytes.truncate(have + read.as_ref().map_or(0, |n| *n));
        match read {
            Ok(0) => {
                // Closed. Partial bytes of something are still worth a word.
                return if p.bytes.is_empty() {
                    Read1::Gone
                } else {
                    Read1::Sorted(First::Control(ControlFirst::Plain(Err(
                        ControlReadError::Io(std::io::Error::from(
                            std::io::ErrorKind::UnexpectedEof,
                        )),
                    ))))
                };
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Read1::Waiting,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Read1::Gone,
        }
    }
    if p.bytes[..4] == STREAM_MAGIC {
        let mut hello = [0u8; STREAM_HELLO_LEN];
        hello.copy_from_slice(&p.bytes[..STREAM_HELLO_LEN]);
        return Read1::Sorted(First::Stream(hello));
    }
    if is_tls_hello(&p.bytes) {
        let Some(identity) = identity else {
            return Read1::Sorted(First::Control(ControlFirst::TlsUnwanted));
        };
        return match ServerHandshake::new(identity, &p.bytes) {
            Ok(handshake) => {
                p.tls = Some(Box::new(handshake));
                read_first(p, Some(identity))
            }
            Err(e) => Read1::Sorted(First::Control(ControlFirst::TlsFailed(e))),
        };
    }
    let len = u32::from_le_bytes([p.bytes[0], p.bytes[1], p.bytes[2], p.bytes[3]]) as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Read1::Sorted(First::Control(ControlFirst::Plain(Err(
            ControlReadError::Wire(WireError::ControlTooLarge(len)),
        ))));
    }
    Read1::Sorted(First::Control(ControlFirst::Plain(wire::decode_control(
        len,
        &mut &p.bytes[4..4 + len],
    ))))
}
