//! Opening a session (source) and accepting one (destination): the control stream's
//! TLS session when the appliance has an identity, the hello and welcome, the
//! capabilities both sides grant, the destination's memory, and the data streams, each
//! identified (and, in an authenticated session, bound to it) by its stream hello.
//! Also the control stream as both sides use it afterwards ([`ControlLink`]).

use super::gate::{Opening, Port};
use super::report::SecurityReport;
use super::{DestConfig, DestMemory, MigrationError, SourceConfig};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::security::{self, SecurityError, SessionKeys, TlsChannel};
use crate::transport::socket;
use crate::wire::{
    self, CONTROL_MAGIC, ControlMessage, ControlReadError, Handshake, StreamHello, WireError, caps,
    write_control,
};
use crossbeam::channel::{Receiver, RecvTimeoutError, TryRecvError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The control stream: plain TCP, or a TLS session. Reads and writes go through
/// separate halves so that one thread can read while another writes.
pub(super) struct ControlChannel {
    socket: TcpStream,
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    tls: Option<TlsChannel>,
}

impl ControlChannel {
    pub(super) fn plain(socket: TcpStream) -> Result<Self, MigrationError> {
        let reader = socket
            .try_clone()
            .map_err(io("cloning the control stream"))?;
        let writer = socket
            .try_clone()
            .map_err(io("cloning the control stream"))?;
        Ok(ControlChannel {
            socket,
            reader: Box::new(reader),
            writer: Box::new(writer),
            tls: None,
        })
    }

    fn tls(channel: TlsChannel) -> Result<Self, MigrationError> {
        let socket = channel
            .socket()
            .try_clone()
            .map_err(io("cloning the control stream"))?;
        let reader = channel.reader().map_err(io("cloning the control stream"))?;
        Ok(ControlChannel {
            socket,
            reader: Box::new(reader),
            writer: Box::new(channel.clone()),
            tls: Some(channel),
        })
    }

    pub(super) fn send(&mut self, msg: &ControlMessage) -> std::io::Result<()> {
        write_control(&mut self.writer, msg)
    }

    pub(super) fn recv(&mut self) -> Result<ControlMessage, ControlReadError> {
        wire::read_control(&mut self.reader)
    }

    /// Wait until the peer has sent something, `deadline` passes (`Ok(false)`), or
    /// `cancel` is set; a message is then read whole with the usual timeout (a read
    /// cut short by a timeout mid-message would lose its bytes).
    pub(super) fn wait_readable(
        &self,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<bool, MigrationError> {
        loop {
            // Acquire: pairs with the Release store of whoever cancels.
            if cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Aborted {
                    reason: "cancelled while opening the session".into(),
                    rounds: 0,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut fds = [libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.socket),
                events: libc::POLLIN,
                revents: 0,
            }];
            let wait = left.min(Duration::from_millis(50)).as_millis().max(1) as libc::c_int;
            // SAFETY: `fds` is a valid array of one pollfd for the call's duration.
            if unsafe { libc::poll(fds.as_mut_ptr(), 1, wait) } > 0 {
                return Ok(true);
            }
        }
    }

    /// The address this end of the control stream has.
    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub(super) fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), MigrationError> {
        // A socket option: it applies to the reader's clone of the socket too.
        self.socket
            .set_read_timeout(timeout)
            .map_err(io("control stream timeout"))
    }

    /// What secures the session, if anything.
    pub fn security(&self) -> Option<SecurityReport> {
        self.tls.as_ref().map(|t| SecurityReport {
            peer: t.authorized().unwrap_or_default().to_string(),
            tls: t.cipher_suite(),
            records:
                "AES-256-GCM records of up to one send buffer, keys from the TLS exporter per \
                      stream and direction"
                    .into(),
        })
    }

    fn session_keys(&self, streams: u16) -> Result<Option<Arc<SessionKeys>>, MigrationError> {
        match &self.tls {
            Some(t) => Ok(Some(Arc::new(t.session_keys(streams)?))),
            None => Ok(None),
        }
    }
}

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
    let what = what.into();
    move |source| match source.kind() {
        // A read or write timeout ends a blocking call with EAGAIN, whose text
        // ("Resource temporarily unavailable") says nothing of the wait that ran out.
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            MigrationError::Transport(format!("{what}: timed out"))
        }
        _ => MigrationError::Io { what, source },
    }
}

/// What a source has once the destination welcomed it.
pub(super) struct Opened {
    /// The session's id (data stream hellos carry it).
    pub session_id: u128,
    /// The control stream.
    pub control: ControlChannel,
    /// The data streams' keys, in an authenticated session.
    pub keys: Option<Arc<SessionKeys>>,
    /// The data streams, by id.
    pub streams: Vec<(u16, TcpStream)>,
    /// Capabilities the destination granted.
    pub accepted: u64,
    /// What configuring the sockets could not do.
    pub notes: Vec<String>,
}

/// A connection to `peer` within `timeout`; a cancel ends the attempt at once.
fn connect(
    peer: SocketAddr,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<TcpStream, MigrationError> {
    socket::connect_cancellable(peer, timeout, cancel).map_err(|source| {
        if source.kind() == std::io::ErrorKind::Interrupted {
            MigrationError::Aborted {
                reason: "cancelled while connecting".into(),
                rounds: 0,
            }
        } else {
            MigrationError::Connect {
                peer: peer.to_string(),
                source,
            }
        }
    })
}

/// Open a session to `peer` for `memory_bytes` of guest memory: hello, welcome, then
/// every data stream. `device_state`: the guest's device state follows its memory, so
/// the destination must have a guest to load it into.
pub(super) fn open(
    peer: SocketAddr,
    memory_bytes: u64,
    device_state: bool,
    config: &SourceConfig,
    cancel: &AtomicBool,
) -> Result<Opened, MigrationError> {
    open_session(peer, memory_bytes, device_state, config, cancel, None)
}

/// [`open`] for a session whose connections were lost: the hello is a
/// [`ControlMessage::Resume`] of `session_id`, and the rest is as for a new session.
pub(super) fn reopen(
    peer: SocketAddr,
    memory_bytes: u64,
    device_state: bool,
    config: &SourceConfig,
    cancel: &AtomicBool,
    session_id: u128,
) -> Result<Opened, MigrationError> {
    open_session(
        peer,
        memory_bytes,
        device_state,
        config,
        cancel,
        Some(session_id),
    )
}

fn open_session(
    peer: SocketAddr,
    memory_bytes: u64,
    device_state: bool,
    config: &SourceConfig,
    cancel: &AtomicBool,
    resume: Option<u128>,
) -> Result<Opened, MigrationError> {
    let socket = connect(peer, config.connect_timeout, cancel)?;
    let _ = socket.set_nodelay(true);
    // The data streams connect now, all at once (one after another would cost a round
    // trip each): their TCP handshakes overlap the TLS handshake and the welcome, a
    // round trip saved across a long path. Their hellos wait for the welcome: they
    // carry the session's bindings, and a destination takes data streams only for a
    // session it has welcomed. Until then they are silent, which the destination's
    // gate allows for its handshake timeout (5 s by default): one it closed meanwhile,
    // or any when the welcome took longer than [`EARLY_STREAM_SILENCE`], is connected
    // again.
    std::thread::scope(|scope| {
        let connected_early = Instant::now();
        let early: Vec<_> = (0..config.streams)
            .map(|_| scope.spawn(move || connect(peer, config.connect_timeout, cancel)))
            .collect();
        let (control, session_id, accepted) = open_control(
            socket,
            peer,
            memory_bytes,
            device_state,
            config,
            cancel,
            resume,
        )?;
        let keys = control.session_keys(config.streams)?;
        let in_time = connected_early.elapsed() < EARLY_STREAM_SILENCE;
        let opened: Vec<Result<(TcpStream, Vec<String>), MigrationError>> = early
            .into_iter()
            .zip(0..config.streams)
            .map(|(early, id)| {
                let binding = keys.as_ref().map(|k| k.binding(id));
                scope.spawn(move || {
                    let mut s = match early.join() {
                        Ok(Ok(s)) if in_time && still_open(&s) => s,
                        _ => connect(peer, config.connect_timeout, cancel)?,
                    };
                    let notes = socket::configure(&s, &config.transport.socket);
                    s.write_all(
                        &StreamHello {
                            session_id,
                            stream_id: id,
                            binding,
                            generation: 0,
                        }
                        .encode(),
                    )
                    .map_err(io(format!("opening data stream {id}")))?;
                    Ok((s, notes))
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(io("opening a data stream")(std::io::Error::other(
                        "connecting thread panicked",
                    )))
                })
            })
            .collect();
        let mut streams = Vec::with_capacity(usize::from(config.streams));
        let mut notes = Vec::new();
        for (id, result) in (0..config.streams).zip(opened) {
            let (s, stream_notes) = result?;
            notes.extend(stream_notes);
            streams.push((id, s));
        }
        Ok(Opened {
            session_id,
            control,
            keys,
            streams,
            accepted,
            notes,
        })
    })
}

/// The longest a data stream connected ahead of the welcome is kept silent and then
/// used: well inside the destination gate's default handshake timeout (5 s), so that
/// the gate cannot close it between the source's last look and its hello.
const EARLY_STREAM_SILENCE: Duration = Duration::from_secs(2);

/// Whether a connection that has not been used yet is still open: nothing to read
/// (the destination sends nothing before a stream's hello), no end, no reset.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local; the descriptor is open for the call.
    let n = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

/// The control stream's part of opening a session on `socket`: TLS when the source
/// has an identity, the hello (or a resume of `resume`), the welcome. Returns the
/// channel, the session's id and the capabilities granted.
fn open_control(
    socket: TcpStream,
    peer: SocketAddr,
    memory_bytes: u64,
    device_state: bool,
    config: &SourceConfig,
    cancel: &AtomicBool,
    resume: Option<u128>,
) -> Result<(ControlChannel, u128, u64), MigrationError> {
    let mut control = match &config.security {
        Some(identity) => {
            let deadline = Instant::now() + config.connect_timeout;
            let channel = security::tls::connect(identity, socket, peer.ip(), deadline, cancel)
                .map_err(|e| match e {
                    SecurityError::Cancelled => MigrationError::Aborted {
                        reason: "cancelled while opening the session".into(),
                        rounds: 0,
                    },
                    other => other.into(),
                })?;
            let mut control = ControlChannel::tls(channel)?;
            if let Some(Err(e)) = control.tls.as_ref().map(|t| t.authorized().map(|_| ())) {
                let _ = control.send(&ControlMessage::Refused {
                    reason: format!("the source refused this destination: {e}"),
                });
                return Err(e.into());
            }
            control
        }
        None => ControlChannel::plain(socket)?,
    };
    control.set_read_timeout(Some(config.reply_timeout))?;
    let session_id = resume.unwrap_or_else(random_session_id);
    let hello = Handshake {
        magic: CONTROL_MAGIC,
        version: wire::VERSION,
        session_id,
        memory_bytes,
        page_size: PAGE_SIZE as u32,
        streams: config.streams,
        capabilities: caps::ALL
            | if device_state { caps::DEVICE_STATE } else { 0 }
            // A resumed session sends pages as frames (see `reconnect`).
            | if config.transport.choice == crate::transport::TransportChoice::Rma
                && resume.is_none()
            {
                caps::RMA
            } else {
                0
            },
    };
    let opening = match resume {
        Some(_) => ControlMessage::Resume(hello),
        None => ControlMessage::Hello(hello),
    };
    control
        .send(&opening)
        .map_err(io("sending the handshake"))?;
    // The destination may take a while to answer (it sets up memory): wait for it in a
    // way a cancel interrupts.
    if !control.wait_readable(Instant::now() + config.reply_timeout, cancel)? {
        return Err(MigrationError::Transport(
            "waiting for the destination's welcome: timed out".into(),
        ));
    }
    let accepted = match control.recv() {
        Ok(ControlMessage::Welcome { capabilities }) => capabilities,
        Ok(ControlMessage::Refused { reason }) => return Err(MigrationError::Refused(reason)),
        Ok(other) => {
            return Err(WireError::Unexpected(format!("{other:?} instead of a welcome")).into());
        }
        Err(e) => return Err(control_error(e, "waiting for the destination's welcome")),
    };
    Ok((control, session_id, accepted))
}

/// A control connection opened and its first message read: what a session that took
/// a resume of another one passes on to it.
pub(super) struct OpenedControl {
    /// The control stream.
    pub control: ControlChannel,
    /// Its first message.
    pub first: Result<ControlMessage, ControlReadError>,
}

/// A destination's session whose connections were lost, waiting for its source to
/// resume it ([`caps::RESUME`]).
pub(super) struct Resumable {
    /// The session's id: the resume must name it.
    pub session_id: u128,
    /// Its memory (the resume must announce the same size).
    pub memory: Arc<GuestMemory>,
    /// Its data streams (the resume opens as many).
    pub streams: u16,
    /// Capabilities granted when it opened (granted again as they were).
    pub granted: u64,
    /// The authenticated source, in a TLS session: a resume must come from it.
    pub peer: Option<String>,
}

/// What a destination has once it welcomed a source and every data stream arrived.
pub(super) struct Accepted {
    /// The session's id (data stream hellos carry it).
    pub session_id: u128,
    /// The control stream.
    pub control: ControlChannel,
    /// The data streams' keys, in an authenticated session.
    pub keys: Option<Arc<SessionKeys>>,
    /// Data streams, by id.
    pub streams: Vec<(u16, TcpStream)>,
    /// Capabilities granted.
    pub granted: u64,
    /// Where pages go.
    pub memory: Arc<GuestMemory>,
    /// The memory is known to be all zeros.
    pub fresh: bool,
    /// The memory is a file whose holes (these pages) read as zeros.
    pub holes: Option<Arc<crate::dirty::DirtyBitmap>>,
}

/// A control stream read error, with context.
pub(super) fn control_error(e: ControlReadError, what: &str) -> MigrationError {
    if let ControlReadError::Io(io) = &e
        && let Some(tls) = security::tls::describe_tls(io)
    {
        // In TLS 1.3 the server judges the client's certificate after the client has
        // finished its handshake: a refusal arrives as the first read's alert.
        return MigrationError::Security(SecurityError::Handshake(tls));
    }
    match e {
        ControlReadError::Wire(w) => MigrationError::Protocol(w),
        ControlReadError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            MigrationError::Protocol(WireError::UnexpectedEof("control stream"))
        }
        ControlReadError::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            MigrationError::Transport(format!("{what}: timed out"))
        }
        ControlReadError::Io(e) => io(what)(e),
    }
}

/// A read error on an open session's control stream: a failed or closed connection is
/// [`MigrationError::Disconnected`] (the session may resume), anything else as before.
fn link_error(e: ControlReadError) -> MigrationError {
    match e {
        ControlReadError::Io(io) if security::tls::describe_tls(&io).is_none() => {
            if io.kind() == std::io::ErrorKind::UnexpectedEof {
                link_closed()
            } else {
                MigrationError::Disconnected(format!("reading the control stream: {io}"))
            }
        }
        other => control_error(other, "reading the control stream"),
    }
}

fn link_closed() -> MigrationError {
    MigrationError::Disconnected("the peer closed the control stream".into())
}

fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Accept one session through `gate`: the hello (refused with a reason when invalid),
/// the memory it needs, the welcome, then every data stream. A refusal tells the
/// source why before returning the error. Connections that say nothing in time, and
/// data streams of other sessions, are closed without failing the session; a second
/// source's control connection waits in the gate for the next session.
pub(super) fn accept(
    gate: &mut dyn Port,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
    connected: &mut dyn FnMut(std::net::SocketAddr),
) -> Result<Accepted, MigrationError> {
    let deadline = Instant::now() + config.timeout;
    accept_session(gate, memory, config, cancel, connected, None, deadline)
}

/// Accept the resume of `session` through `gate` by `deadline`: as [`accept`], but the
/// opening must be a [`ControlMessage::Resume`] of that session from the same source;
/// a new session's hello meanwhile is refused as busy.
pub(super) fn accept_resume(
    gate: &mut dyn Port,
    session: &Resumable,
    config: &DestConfig,
    cancel: &AtomicBool,
    connected: &mut dyn FnMut(std::net::SocketAddr),
    deadline: Instant,
) -> Result<Accepted, MigrationError> {
    accept_session(
        gate,
        DestMemory::Provided(session.memory.clone()),
        config,
        cancel,
        connected,
        Some(session),
        deadline,
    )
}

fn accept_session(
    gate: &mut dyn Port,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
    connected: &mut dyn FnMut(std::net::SocketAddr),
    resuming: Option<&Resumable>,
    deadline: Instant,
) -> Result<Accepted, MigrationError> {
    // TLS handshakes run in the gate, all at once, with this session's identity.
    gate.set_identity(config.security.clone());
    let (peer, opening) = gate.next_control(deadline, config.handshake_timeout, cancel)?;
    connected(peer);
    let refuse = |control: &mut ControlChannel, err: MigrationError| -> MigrationError {
        let reason = match &err {
            // The source says "peer refused the session" itself.
            MigrationError::RefusedSource(why) => why.clone(),
            other => other.to_string(),
        };
        let _ = control.send(&ControlMessage::Refused { reason });
        err
    };
    let (mut control, first) = match opening {
        Opening::Tls(channel) => {
            let mut control = ControlChannel::tls(channel)?;
            if let Some(Err(e)) = control.tls.as_ref().map(|t| t.authorized().map(|_| ())) {
                return Err(refuse(&mut control, e.into()));
            }
            // Authenticated, but still held to the handshake's deadline for its hello.
            control.set_read_timeout(Some(config.handshake_timeout))?;
            let first = control.recv();
            (control, first)
        }
        Opening::TlsFailed(e) => return Err(MigrationError::Security(e)),
        Opening::TlsUnwanted(socket) => {
            // Say it in TLS, so that the source's error can tell why.
            let _ = (&socket).write_all(&security::tls::NO_TLS_HERE_ALERT);
            return Err(MigrationError::RefusedSource(
                "a source opened a TLS session, but this destination runs without \
                 certificates (--insecure)"
                    .into(),
            ));
        }
        // Opened by the session it first reached, which passed it on.
        Opening::Opened(opened) => (opened.control, opened.first),
        Opening::Plain(socket, first) => {
            let _ = socket.set_nodelay(true);
            let mut control = ControlChannel::plain(socket)?;
            if config.security.is_some()
                && let Ok(ControlMessage::Hello(_)) = first
            {
                let e = MigrationError::RefusedSource(
                    "this destination takes only authenticated sessions (TLS 1.3 with the \
                     site's certificates); the source runs without certificates (--insecure)"
                        .into(),
                );
                return Err(refuse(&mut control, e));
            }
            (control, first)
        }
    };
    // A source back to resume another session served here (several run at once):
    // that session takes the connection on.
    let first = match (first, resuming) {
        (Ok(ControlMessage::Resume(h)), None) => {
            let session_id = h.session_id;
            let opened = Box::new(OpenedControl {
                control,
                first: Ok(ControlMessage::Resume(h)),
            });
            match gate.forward_resume(session_id, peer, opened) {
                Ok(()) => return Err(MigrationError::PassedOn(session_id)),
                Err(opened) => {
                    control = opened.control;
                    opened.first
                }
            }
        }
        (first, _) => first,
    };
    control.set_read_timeout(Some(config.timeout))?;
    let hello = match (first, resuming) {
        (Ok(ControlMessage::Hello(h)), None) => h,
        (Ok(ControlMessage::Resume(h)), Some(session)) => {
            if h.session_id != session.session_id {
                let e = MigrationError::RefusedSource(format!(
                    "no session {:032x} to resume here (this destination waits for another \
                     session's source to come back)",
                    h.session_id
                ));
                return Err(refuse(&mut control, e));
            }
            let peer = control.security().map(|s| s.peer);
            if peer != session.peer {
                let e = MigrationError::RefusedSource(format!(
                    "session {:032x} was opened by {}, not by {}",
                    h.session_id,
                    session
                        .peer
                        .as_deref()
                        .unwrap_or("an unauthenticated source"),
                    peer.as_deref().unwrap_or("an unauthenticated source"),
                ));
                return Err(refuse(&mut control, e));
            }
            if h.streams != session.streams {
                let e = MigrationError::RefusedSource(format!(
                    "session {:032x} had {} data streams; its resume announced {}",
                    h.session_id, session.streams, h.streams
                ));
                return Err(refuse(&mut control, e));
            }
            h
        }
        (Ok(ControlMessage::Hello(_)), Some(session)) => {
            let e = MigrationError::RefusedSource(format!(
                "{} this destination keeps session {:032x} for its source to resume \
                 (its connections were lost); try again once it has finished",
                super::BUSY,
                session.session_id
            ));
            return Err(refuse(&mut control, e));
        }
        (Ok(ControlMessage::Resume(h)), None) => {
            let e = MigrationError::RefusedSource(format!(
                "no session {:032x} to resume here: it ended, or its grace period ran out",
                h.session_id
            ));
            return Err(refuse(&mut control, e));
        }
        (first, _) => match first {
            Ok(ControlMessage::Refused { reason }) => {
                return Err(MigrationError::Refused(reason));
            }
            Ok(other) => {
                let err = WireError::Unexpected(format!("{other:?} instead of a handshake"));
                return Err(refuse(&mut control, err.into()));
            }
            Err(ControlReadError::Wire(WireError::ControlTooLarge(len))) => {
                // A handshake is small: a huge length is another protocol's first bytes.
                let first = (len as u32).to_le_bytes();
                return Err(refuse(
                    &mut control,
                    WireError::NotDwcp(wire::bytes_text(&first)).into(),
                ));
            }
            Err(e) => {
                let err = control_error(e, "reading the handshake");
                if let MigrationError::Protocol(_) = &err {
                    return Err(refuse(&mut control, err));
                }
                return Err(err);
            }
        },
    };
    let provided_len = match &memory {
        DestMemory::Provided(m) => Some(m.len() as u64),
        DestMemory::Resume(r) => Some(r.memory_bytes),
        DestMemory::Allocate(_) | DestMemory::File(_) => None,
    };
    if let Err(e) = hello.validate(provided_len) {
        return Err(refuse(&mut control, e.into()));
    }
    if resuming.is_none()
        && let Err(e) = gate.expect_session(hello.session_id)
    {
        return Err(refuse(&mut control, e));
    }
    let sends_device_state = hello.capabilities & caps::DEVICE_STATE != 0;
    let loads_device_state = config.capabilities & caps::DEVICE_STATE != 0;
    if sends_device_state != loads_device_state {
        let why = if sends_device_state {
            "the source migrates a VM with device state (a QEMU guest), but this destination \
             has no VM to load it into (give it the incoming VM's QMP socket)"
        } else {
            "this destination waits for a VM with device state (a QEMU guest), but the \
             source migrates a guest without one"
        };
        return Err(refuse(
            &mut control,
            MigrationError::RefusedSource(why.into()),
        ));
    }
    let (memory, fresh) = match memory {
        DestMemory::Provided(m) => (m, false),
        DestMemory::Resume(_) => {
            return Err(refuse(
                &mut control,
                MigrationError::Config("a resumed session goes through accept_resume".into()),
            ));
        }
        DestMemory::File(path) => {
            if let Err(e) = gate.admit(hello.memory_bytes, config.max_memory) {
                return Err(refuse(&mut control, e));
            }
            match GuestMemory::file(&path, hello.memory_bytes as usize) {
                // A new (truncated) file reads as zeros.
                Ok(m) => (Arc::new(m), true),
                Err(e) => {
                    return Err(refuse(
                        &mut control,
                        MigrationError::RefusedSource(format!(
                            "memory file {}: {e}",
                            path.display()
                        )),
                    ));
                }
            }
        }
        DestMemory::Allocate(prefer) => {
            if let Err(e) = gate.admit(hello.memory_bytes, config.max_memory) {
                return Err(refuse(&mut control, e));
            }
            if let Some(avail) = available_memory()
                && hello.memory_bytes > avail
            {
                let e = MigrationError::RefusedSource(format!(
                    "guest memory of {} bytes does not fit ({avail} bytes available)",
                    hello.memory_bytes
                ));
                return Err(refuse(&mut control, e));
            }
            match GuestMemory::anonymous(hello.memory_bytes as usize, prefer) {
                // Only reserved for now: it is faulted in once every data stream is
                // here (a hello alone costs no more than address space).
                Ok(m) => (Arc::new(m), true),
                Err(e) => {
                    return Err(refuse(
                        &mut control,
                        MigrationError::RefusedSource(e.to_string()),
                    ));
                }
            }
        }
    };
    // Memory that may hold old content (an incoming VM's RAM file): its holes read
    // as zeros, and a zero page sent for one can stay a hole.
    let holes = if fresh {
        None
    } else {
        memory.hole_pages().map(Arc::new)
    };
    let granted = match resuming {
        // Pages come as frames once resumed: its RMA connections are not set up again.
        Some(session) => session.granted & !caps::RMA,
        None => {
            let mut granted =
                hello.capabilities & (caps::ALL | caps::DEVICE_STATE) & config.capabilities;
            match super::rma::admit(hello.capabilities, control.tls.is_some(), config.rma) {
                Ok(()) => granted |= caps::RMA,
                Err(why) if hello.capabilities & caps::RMA != 0 => {
                    eprintln!("dwcp: RMA not granted: {why}");
                }
                Err(_) => {}
            }
            granted
        }
    };
    let keys = control.session_keys(hello.streams)?;
    control
        .send(&ControlMessage::Welcome {
            capabilities: granted,
        })
        .map_err(io("sending the welcome"))?;

    // The data streams, in any order, each identified by its hello. They come right
    // after the welcome: a session that does not open them in time is given up.
    let streams = hello.streams;
    // The session's own timeout, not the per-connection one: across a lossy path a
    // stream's connect alone can take seconds of SYN retransmissions.
    let stream_deadline = Instant::now() + config.timeout;
    let mut data: Vec<Option<TcpStream>> = (0..streams).map(|_| None).collect();
    let mut strays = 0u64;
    let mut unbound = 0u64;
    let mut arrived = 0u16;
    let dropped_before = gate.dropped();
    while arrived < streams {
        let (s, bytes) = gate
            .next_stream(stream_deadline, config.handshake_timeout, cancel)
            .map_err(|e| match e {
                MigrationError::Transport(_) => MigrationError::Transport(format!(
                    "{arrived} of {streams} data streams arrived within {} s of the welcome \
                     ({} connections said nothing, {strays} belonged to another session, \
                     {unbound} presented no valid binding)",
                    config.timeout.as_secs_f64(),
                    // Open and silent now, or closed for silence meanwhile.
                    gate.silent() as u64 + gate.dropped() - dropped_before
                )),
                other => other,
            })
            .map_err(|e| refuse(&mut control, e))?;
        let stream_hello = match StreamHello::decode(&bytes, hello.session_id, streams) {
            Ok(h) => h,
            Err(WireError::WrongSession { .. }) => {
                // Left over from another session (or forged): not ours to fail on.
                strays += 1;
                continue;
            }
            Err(e) => return Err(refuse(&mut control, e.into())),
        };
        // In an authenticated session a stream must prove it belongs to it; one that
        // cannot (forged, replayed from another session, or a plain stream) is closed
        // before anything is read from it, and the session goes on waiting.
        let bound = stream_hello.generation == 0
            && match (&keys, &stream_hello.binding) {
                (Some(k), Some(b)) => k.binding_matches(stream_hello.stream_id, b),
                (None, None) => true,
                _ => false,
            };
        if !bound {
            unbound += 1;
            gate.count_unbound();
            security::counters::record_rejected("binding");
            continue;
        }
        let slot = &mut data[usize::from(stream_hello.stream_id)];
        if slot.is_some() && keys.is_some() {
            // A copy of a valid hello (a replay): the first stream keeps the slot; if
            // the copy took it, its records fail to open and name the stream.
            unbound += 1;
            gate.count_unbound();
            security::counters::record_rejected("binding");
            continue;
        }
        if slot.is_some() {
            let e = WireError::BadStreamId {
                id: stream_hello.stream_id,
                reason: "opened twice",
            };
            return Err(refuse(&mut control, e.into()));
        }
        s.set_read_timeout(Some(config.timeout))
            .map_err(io("data stream timeout"))?;
        socket::configure(&s, &config.transport.socket);
        *slot = Some(s);
        arrived += 1;
    }
    let streams = data
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i as u16, s)))
        .collect();
    Ok(Accepted {
        session_id: hello.session_id,
        control,
        keys,
        streams,
        granted,
        memory,
        fresh,
        holes,
    })
}

pub(super) fn random_session_id() -> u128 {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    u128::from_le_bytes(bytes)
}

/// The control stream once the session is open: writes from the session's thread,
/// reads on a thread of its own (blocking reads), handed over through a channel with
/// the moment each message arrived. A ping's round trip is timed to that moment: the
/// session's thread may be busy for milliseconds (a rescan of all memory) before it
/// looks, and the switchover's confirmation, which it waits on, sees no such delay.
pub(super) struct ControlLink {
    socket: TcpStream,
    writer: Box<dyn Write + Send>,
    incoming: Receiver<(Instant, Result<ControlMessage, ControlReadError>)>,
    /// When the message last returned arrived.
    arrived: std::cell::Cell<Option<Instant>>,
    /// The TLS session, in an authenticated session: keys for replacement streams.
    tls: Option<TlsChannel>,
}

impl ControlLink {
    /// Start reading `channel` on a thread of its own; its socket rides out outages as
    /// `options` say (see [`socket::ride_out_outages`]).
    pub fn new(
        channel: ControlChannel,
        options: &socket::SocketOptions,
    ) -> Result<Self, MigrationError> {
        let ControlChannel {
            socket,
            mut reader,
            writer,
            tls,
        } = channel;
        let _ = socket::ride_out_outages(&socket, options);
        let _ = socket.set_read_timeout(None);
        let (tx, incoming) = crossbeam::channel::bounded(1024);
        std::thread::Builder::new()
            .name("dwcp-ctl-rx".into())
            .spawn(move || {
                loop {
                    let msg = wire::read_control(&mut reader);
                    let stop = msg.is_err();
                    if tx.send((Instant::now(), msg)).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(io("starting the control reader"))?;
        Ok(ControlLink {
            socket,
            writer,
            incoming,
            arrived: std::cell::Cell::new(None),
            tls,
        })
    }

    /// Keys of the data streams of generation `generation` (replacements of lost
    /// streams), in an authenticated session.
    pub fn generation_keys(
        &self,
        streams: u16,
        generation: u16,
    ) -> Result<Option<Arc<SessionKeys>>, MigrationError> {
        match &self.tls {
            Some(t) => Ok(Some(Arc::new(
                t.session_keys_generation(streams, generation)?,
            ))),
            None => Ok(None),
        }
    }

    /// Send one message.
    pub fn send(&mut self, msg: &ControlMessage) -> Result<(), MigrationError> {
        write_control(&mut self.writer, msg)
            .map_err(|e| MigrationError::Disconnected(format!("writing the control stream: {e}")))
    }

    /// Send one message, ignoring failure (the session is over anyway).
    pub fn send_best_effort(&mut self, msg: &ControlMessage) {
        let _ = write_control(&mut self.writer, msg);
    }

    /// When the message last returned by [`ControlLink::try_recv`] or
    /// [`ControlLink::recv_timeout`] arrived.
    pub fn arrived(&self) -> Option<Instant> {
        self.arrived.get()
    }

    /// The next message if one has arrived.
    pub fn try_recv(&self) -> Result<Option<ControlMessage>, MigrationError> {
        match self.incoming.try_recv() {
            Ok((at, Ok(msg))) => {
                self.arrived.set(Some(at));
                Ok(Some(msg))
            }
            Ok((_, Err(e))) => Err(link_error(e)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(link_closed()),
        }
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Option<ControlMessage>, MigrationError> {
        match self.incoming.recv_timeout(timeout) {
            Ok((at, Ok(msg))) => {
                self.arrived.set(Some(at));
                Ok(Some(msg))
            }
            Ok((_, Err(e))) => Err(link_error(e)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(link_closed()),
        }
    }

    /// The next message, waiting at most `timeout` without sleeping: between looks
    /// the thread only yields its CPU to whatever else is runnable there.
    ///
    /// For waits inside the paused window, where the message is due within
    /// microseconds. A sleeping thread is woken when the message arrives, but on a
    /// virtual machine whose CPU went idle meanwhile that wake-up took 0.1-0.25 ms
    /// (measured here), longer than the step it waited for.
    pub fn recv_yielding(
        &self,
        timeout: Duration,
    ) -> Result<Option<ControlMessage>, MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(msg) = self.try_recv()? {
                return Ok(Some(msg));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::yield_now();
        }
    }

    /// End the writing direction: the peer reads what was sent, then the end.
    pub fn finish_writing(&mut self) {
        let _ = self.writer.flush();
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
    }

    /// Close both directions (the reader thread then ends).
    pub fn shutdown(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Acceptor;
    use crate::security::tls::tests::Lab;
    use std::net::TcpListener;

    /// A data stream connected ahead of the welcome is used only while the destination
    /// keeps it open; one it closed is connected again.
    #[test]
    fn a_connection_the_peer_closed_is_not_still_open() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let kept = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_kept_peer, _) = listener.accept().unwrap();
        let closed = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop(listener.accept().unwrap());
        assert!(still_open(&kept));
        // The peer's end reaches this side at once on loopback; wait for it all the same.
        let deadline = Instant::now() + Duration::from_secs(5);
        while still_open(&closed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!still_open(&closed));
        assert!(still_open(&kept), "peeking takes nothing");
    }

    /// A data stream that names the session but cannot prove it belongs to it (a
    /// forged binding) is closed without failing the session; the real streams are
    /// taken.
    #[test]
    fn streams_without_a_valid_binding_are_closed_and_the_session_goes_on() {
        let lab = Lab::new("binding");
        let a = lab.identity("appliance-a", &[]);
        let b = lab.identity("appliance-b", &[]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let source = std::thread::spawn(move || {
            let never = AtomicBool::new(false);
            let socket = TcpStream::connect(addr).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let channel = security::tls::connect(&a, socket, addr.ip(), deadline, &never).unwrap();
            let mut control = ControlChannel::tls(channel).unwrap();
            let session_id = 77;
            let hello = Handshake {
                magic: CONTROL_MAGIC,
                version: wire::VERSION,
                session_id,
                memory_bytes: 1 << 20,
                page_size: PAGE_SIZE as u32,
                streams: 2,
                capabilities: caps::ALL,
            };
            control.send(&ControlMessage::Hello(hello)).unwrap();
            assert!(matches!(control.recv(), Ok(ControlMessage::Welcome { .. })));
            let keys = control.session_keys(2).unwrap().unwrap();
            let open = |stream_id: u16, binding: [u8; 16]| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(
                    &StreamHello {
                        session_id,
                        stream_id,
                        binding: Some(binding),
                        generation: 0,
                    }
                    .encode(),
                )
                .unwrap();
                s
            };
            // The forged stream first, well before the real ones.
            let forged = open(0, [0xAB; 16]);
            std::thread::sleep(Duration::from_millis(300));
            let real0 = open(0, keys.binding(0));
            let real1 = open(1, keys.binding(1));
            // Held open until the destination decided.
            std::thread::sleep(Duration::from_millis(500));
            drop((forged, real0, real1, control));
        });
        let mut gate = Acceptor::new(&listener);
        let config = DestConfig {
            security: Some(b),
            ..DestConfig::default()
        };
        let accepted = accept(
            &mut gate,
            DestMemory::Allocate(dwcp_hugepages::PagePreference::Small),
            &config,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(accepted.streams.len(), 2);
        assert!(accepted.keys.is_some());
        assert_eq!(gate.unbound(), 1);
        source.join().unwrap();
        let _ = std::fs::remove_dir_all(&lab.dir);
    }

    /// What operators read names each thing once: no doubled prefixes, no EAGAIN.
    #[test]
    fn control_stream_errors_read_as_one_sentence() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let text =
            control_error(ControlReadError::Io(reset), "reading the control stream").to_string();
        assert_eq!(text.matches("control stream").count(), 1, "{text}");
        let eagain = std::io::Error::from_raw_os_error(libc::EAGAIN);
        let text =
            control_error(ControlReadError::Io(eagain), "reading the control stream").to_string();
        assert!(
            text.ends_with("reading the control stream: timed out"),
            "{text}"
        );
        let eagain = std::io::Error::from_raw_os_error(libc::EAGAIN);
        let text = io("reading a data stream's hello")(eagain).to_string();
        assert!(!text.contains("os error"), "{text}");
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let text = control_error(ControlReadError::Io(eof), "reading").to_string();
        assert_eq!(text.matches("control stream").count(), 1, "{text}");
    }

    /// A message the session reads late (it was busy scanning) keeps the moment it
    /// arrived, which is what a ping's round trip is timed to.
    #[test]
    fn a_message_read_late_keeps_the_moment_it_arrived() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let link = ControlLink::new(
            ControlChannel::plain(ours).unwrap(),
            &socket::SocketOptions::default(),
        )
        .unwrap();
        let mut peer = ControlChannel::plain(peer).unwrap();
        let sent = Instant::now();
        peer.send(&ControlMessage::Pong { nanos: 7 }).unwrap();
        // The reader has it; the session is busy a little longer before it looks.
        while link.incoming.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(2));
        let read_at = Instant::now();
        assert!(matches!(
            link.try_recv(),
            Ok(Some(ControlMessage::Pong { nanos: 7 }))
        ));
        let arrived = link.arrived().expect("a message was read");
        assert!(
            arrived >= sent && arrived < read_at,
            "{arrived:?} vs {sent:?}..{read_at:?}"
        );
        peer.send(&ControlMessage::Pong { nanos: 8 }).unwrap();
        let waited = link.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(waited, Some(ControlMessage::Pong { nanos: 8 })));
        assert!(link.arrived().unwrap() >= read_at);
    }
}
