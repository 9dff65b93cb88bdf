//! Several incoming sessions at once on one migration port.
//!
//! A dispatcher ([`SessionPorts`]) owns the port's gate and waits on it; every control
//! connection the gate sorts becomes a [`Lane`], on which one session runs in a thread
//! of its own (the caller's). The dispatcher keeps sorting while sessions run: a data
//! stream goes to the lane of the session its hello names (its binding is then checked
//! there, as on a gate of its own), and a stream naming no session here is closed. A
//! source coming back to resume a session first reaches a new lane like any session; once
//! that lane has read its resume, it passes the connection on to the session named
//! ([`Port::forward_resume`]).
//!
//! Admission is the lanes' shared book: at most `max_sessions` sessions hold memory at
//! once, and their guests' memory together stays within `[dest] max_memory`. A session
//! beyond either is refused with a `busy:` reason (a resuming source tries again) once
//! its hello is read; nothing is allocated for it. Lanes still reading a first message
//! are bounded too (they hold a thread each): past [`OPENING_LANES`] more, a new control
//! connection is told `busy` at once.

use super::gate::{Acceptor, Arrival, Opening, Port, within_max_memory};
use super::handshake::OpenedControl;
use super::{BUSY, MigrationError};
use crate::security::Identity;
use crate::wire::{self, ControlMessage, STREAM_HELLO_LEN};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lanes that may be reading their first message beyond `max_sessions`.
pub const OPENING_LANES: usize = 16;

/// A data stream as routed to its session.
type RoutedStream = (TcpStream, [u8; STREAM_HELLO_LEN]);
/// A resume as passed on to its session.
type RoutedResume = (SocketAddr, Box<OpenedControl>);

/// Where a session's connections go.
struct Route {
    lane: u64,
    streams: Sender<RoutedStream>,
    resumes: Sender<RoutedResume>,
}

/// What the dispatcher and its lanes share.
struct Book {
    /// Sessions by id, for routing.
    routes: HashMap<u128, Route>,
    /// Guest memory admitted, by lane.
    admitted: BTreeMap<u64, u64>,
    /// Lanes alive.
    lanes: usize,
}

struct Shared {
    book: Mutex<Book>,
    max_sessions: usize,
    /// The gate's counts, as of its last wait.
    dropped: AtomicU64,
    silent: AtomicU64,
    /// Data streams that named no session here.
    strays: AtomicU64,
    unbound: AtomicU64,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The dispatcher of concurrent sessions (see the module docs).
pub struct SessionPorts<'l> {
    gate: Acceptor<'l>,
    shared: Arc<Shared>,
    next_lane: u64,
}

impl<'l> SessionPorts<'l> {
    /// A dispatcher on `listener` running up to `max_sessions` sessions at once.
    pub fn new(listener: &'l TcpListener, max_sessions: usize) -> Self {
        SessionPorts {
            gate: Acceptor::new(listener),
            shared: Arc::new(Shared {
                book: Mutex::new(Book {
                    routes: HashMap::new(),
                    admitted: BTreeMap::new(),
                    lanes: 0,
                }),
                max_sessions: max_sessions.max(1),
                dropped: AtomicU64::new(0),
                silent: AtomicU64::new(0),
                strays: AtomicU64::new(0),
                unbound: AtomicU64::new(0),
            }),
            next_lane: 1,
        }
    }

    /// The identity TLS handshakes present from now on.
    pub fn set_identity(&mut self, identity: Option<Arc<Identity>>) {
        self.gate.set_identity(identity);
    }

    /// Whether connections wait to be sorted.
    pub fn has_pending(&self) -> bool {
        self.gate.has_pending()
    }

    /// Sessions holding admitted memory now.
    pub fn sessions(&self) -> usize {
        self.shared.book().admitted.len()
    }

    /// Lanes alive: sessions, and connections still opening one.
    pub fn lanes(&self) -> usize {
        self.shared.book().lanes
    }

    /// Data streams closed for naming no session here, and for presenting no valid
    /// binding to theirs.
    pub fn strays_and_unbound(&self) -> (u64, u64) {
        (
            self.shared.strays.load(Ordering::Relaxed),
            self.shared.unbound.load(Ordering::Relaxed),
        )
    }

    /// Wait up to `wait` for a new control connection, routing data streams to their
    /// sessions meanwhile; `handshake` is each connection's time to say what it is.
    /// A new connection comes as the lane to run its session on; `None` when nothing
    /// new came (streams may have been routed meanwhile).
    pub fn dispatch(
        &mut self,
        wait: Duration,
        handshake: Duration,
        cancel: &AtomicBool,
    ) -> Option<Lane> {
        let arrival = self.gate.next_any(Instant::now() + wait, handshake, cancel);
        self.shared
            .dropped
            .store(self.gate.dropped(), Ordering::Relaxed);
        self.shared
            .silent
            .store(self.gate.silent() as u64, Ordering::Relaxed);
        match arrival {
            Ok(Arrival::Stream(stream, hello)) => {
                self.route(stream, hello);
                None
            }
            Ok(Arrival::Control(peer, opening)) => {
                let mut book = self.shared.book();
                if book.lanes >= self.shared.max_sessions + OPENING_LANES {
                    drop(book);
                    refuse_opening(
                        opening,
                        &format!(
                            "{BUSY} this destination has {} connections opening sessions; try \
                             again shortly",
                            OPENING_LANES
                        ),
                    );
                    return None;
                }
                book.lanes += 1;
                drop(book);
                let number = self.next_lane;
                self.next_lane += 1;
                let (streams_in, streams) = unbounded();
                let (resumes_in, resumes) = unbounded();
                Some(Lane {
                    number,
                    shared: self.shared.clone(),
                    first: Some((peer, opening)),
                    streams_in,
                    streams,
                    resumes_in,
                    resumes,
                    held: VecDeque::new(),
                })
            }
            // Nothing came in time (or the wait was cancelled).
            Err(_) => None,
        }
    }

    /// Hand a data stream to the session its hello names, or close it.
    fn route(&self, stream: TcpStream, hello: [u8; STREAM_HELLO_LEN]) {
        let session_id = wire::StreamHello::session_of(&hello);
        let book = self.shared.book();
        let delivered = match book.routes.get(&session_id) {
            Some(route) => route.streams.send((stream, hello)).is_ok(),
            None => false,
        };
        if !delivered {
            // Closed as it drops: left over from a session that ended, or forged.
            self.shared.strays.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection that opens a session, and what comes for that session later (see the
/// module docs). Sent to the thread that runs the session; dropping it ends the
/// session's routes and releases its admitted memory.
pub struct Lane {
    number: u64,
    shared: Arc<Shared>,
    /// The connection that opened the lane, until the session takes it.
    first: Option<(SocketAddr, Opening)>,
    streams_in: Sender<RoutedStream>,
    streams: Receiver<RoutedStream>,
    resumes_in: Sender<RoutedResume>,
    resumes: Receiver<RoutedResume>,
    /// Resumes taken off the channel and not yet handed to the session.
    held: VecDeque<RoutedResume>,
}

impl Lane {
    /// This lane's number (unique for the dispatcher's life).
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Turn the connection that opened this lane away with `reason`, running no session
    /// on it (a destination shutting down).
    pub fn refuse(mut self, reason: &str) {
        if let Some((_, opening)) = self.first.take() {
            refuse_opening(opening, reason);
        }
    }

    /// Take what was passed on without waiting.
    fn take_resumes(&mut self) {
        while let Ok(r) = self.resumes.try_recv() {
            self.held.push_back(r);
        }
    }

    /// Wait until `deadline` or `cancel` for what `recv` gives.
    fn wait_for<T>(
        deadline: Instant,
        cancel: &AtomicBool,
        what: impl Fn() -> String,
        mut recv: impl FnMut(Duration) -> Result<T, RecvTimeoutError>,
    ) -> Result<T, MigrationError> {
        loop {
            // Acquire: pairs with the Release store of whoever cancels.
            if cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Aborted {
                    reason: "cancelled at the destination".into(),
                    rounds: 0,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match recv(left.min(Duration::from_millis(20))) {
                Ok(v) => return Ok(v),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => return Err(MigrationError::Transport(what())),
                // The lane holds a sender of its own: never disconnected.
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::Transport(what()));
                }
            }
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut book = self.shared.book();
        let number = self.number;
        book.routes.retain(|_, r| r.lane != number);
        book.admitted.remove(&number);
        book.lanes = book.lanes.saturating_sub(1);
    }
}

impl Port for Lane {
    /// The dispatcher's gate runs the TLS handshakes, with the identity it is given.
    fn set_identity(&mut self, _identity: Option<Arc<Identity>>) {}

    fn next_control(
        &mut self,
        deadline: Instant,
        _handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(SocketAddr, Opening), MigrationError> {
        if let Some(first) = self.first.take() {
            return Ok(first);
        }
        self.take_resumes();
        let (peer, opened) = match self.held.pop_front() {
            Some(held) => held,
            None => Self::wait_for(
                deadline,
                cancel,
                || "timed out waiting for the source to connect".into(),
                |wait| self.resumes.recv_timeout(wait),
            )?,
        };
        Ok((peer, Opening::Opened(opened)))
    }

    fn next_stream(
        &mut self,
        deadline: Instant,
        _handshake: Duration,
        cancel: &AtomicBool,
    ) -> Result<(TcpStream, [u8; STREAM_HELLO_LEN]), MigrationError> {
        Self::wait_for(
            deadline,
            cancel,
            || "timed out waiting for the session's data streams".into(),
            |wait| self.streams.recv_timeout(wait),
        )
    }

    /// New sessions are the dispatcher's to admit, not this session's to turn away: what
    /// a lane turns away is only its own source's early resume, with its own reason.
    fn turn_away(
        &mut self,
        _handshake: Duration,
        _reason: &str,
        hold_controls: bool,
    ) -> Vec<(TcpStream, [u8; STREAM_HELLO_LEN])> {
        self.take_resumes();
        if !hold_controls {
            // The session still hears from its source: a resume of it is early (the
            // source gave up on connections this side still has). Told `busy`, the
            // source tries again.
            let refusal = ControlMessage::Refused {
                reason: format!(
                    "{BUSY} this destination still hears from the session's source on its \
                     old connections; try again shortly"
                ),
            };
            for (_, mut opened) in self.held.drain(..) {
                let _ = opened.control.send(&refusal);
            }
        }
        self.streams.try_iter().collect()
    }

    fn control_waiting(&mut self) -> bool {
        self.take_resumes();
        !self.held.is_empty()
    }

    fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn silent(&self) -> usize {
        self.shared.silent.load(Ordering::Relaxed) as usize
    }

    fn count_unbound(&mut self) {
        self.shared.unbound.fetch_add(1, Ordering::Relaxed);
    }

    fn expect_session(&mut self, session_id: u128) -> Result<(), MigrationError> {
        let mut book = self.shared.book();
        match book.routes.get(&session_id) {
            Some(route) if route.lane == self.number => Ok(()),
            Some(_) => Err(MigrationError::RefusedSource(format!(
                "session {session_id:032x} is already being received here"
            ))),
            None => {
                book.routes.insert(
                    session_id,
                    Route {
                        lane: self.number,
                        streams: self.streams_in.clone(),
                        resumes: self.resumes_in.clone(),
                    },
                );
                Ok(())
            }
        }
    }

    fn forward_resume(
        &mut self,
        session_id: u128,
        peer: SocketAddr,
        opened: Box<OpenedControl>,
    ) -> Result<(), Box<OpenedControl>> {
        let book = self.shared.book();
        match book.routes.get(&session_id) {
            Some(route) if route.lane != self.number => route
                .resumes
                .send((peer, opened))
                .map_err(|e| e.into_inner().1),
            _ => Err(opened),
        }
    }

    fn admit(&mut self, bytes: u64, max_memory: Option<u64>) -> Result<(), MigrationError> {
        let mut book = self.shared.book();
        // The other sessions' count and memory (this lane's own, if admitted before, is
        // replaced).
        let (sessions, others) = book
            .admitted
            .iter()
            .filter(|(lane, _)| **lane != self.number)
            .fold((0, 0u64), |(n, sum), (_, b)| (n + 1, sum + b));
        if sessions >= self.shared.max_sessions {
            return Err(MigrationError::RefusedSource(format!(
                "{BUSY} this destination is receiving {sessions} migrations, as many as it \
                 takes at once ([dest] max_sessions = {}); try again once one has finished",
                self.shared.max_sessions
            )));
        }
        within_max_memory(bytes, max_memory)?;
        if let Some(max) = max_memory
            && bytes.saturating_add(others) > max
        {
            return Err(MigrationError::RefusedSource(format!(
                "{BUSY} guest memory of {bytes} bytes, with the {others} bytes admitted to \
                 the migrations it is receiving ({sessions}), is more than this destination \
                 admits ({max} bytes, [dest] max_memory); try again once one has finished"
            )));
        }
        book.admitted.insert(self.number, bytes);
        Ok(())
    }
}

/// Tell a control connection this destination cannot take it: a plain session in plain
/// words, an authenticated one inside its TLS session; anything else is just closed.
fn refuse_opening(opening: Opening, reason: &str) {
    let refusal = ControlMessage::Refused {
        reason: reason.to_string(),
    };
    match opening {
        Opening::Plain(mut socket, Ok(_)) => {
            let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = wire::write_control(&mut socket, &refusal);
        }
        Opening::Tls(mut channel) if channel.authorized().is_ok() => {
            let _ = channel
                .socket()
                .set_write_timeout(Some(Duration::from_secs(1)));
            let _ = wire::write_control(&mut channel, &refusal);
        }
        Opening::Opened(mut opened) => {
            let _ = opened.control.send(&refusal);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::StreamHello;
    use std::io::{Read, Write};

    /// A lane opened by a plain connection that says something (what does not matter
    /// here), and that connection.
    fn open_lane(ports: &mut SessionPorts<'_>, addr: SocketAddr) -> (Lane, TcpStream) {
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(&[4, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let never = AtomicBool::new(false);
        for _ in 0..100 {
            if let Some(lane) =
                ports.dispatch(Duration::from_millis(50), Duration::from_secs(5), &never)
            {
                return (lane, client);
            }
        }
        panic!("no lane for a connection that spoke");
    }

    fn refusal(r: Result<(), MigrationError>) -> String {
        r.expect_err("a refusal").to_string()
    }

    #[test]
    fn admission_bounds_sessions_and_their_memory_together_and_a_lane_gone_frees_its_share() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut ports = SessionPorts::new(&listener, 2);
        let (mut a, _ca) = open_lane(&mut ports, addr);
        let (mut b, _cb) = open_lane(&mut ports, addr);
        let (mut c, _cc) = open_lane(&mut ports, addr);
        assert_eq!(ports.lanes(), 3, "lanes still opening count too");
        let max = Some(10 << 30);
        a.admit(6 << 30, max).unwrap();
        let why = refusal(b.admit(6 << 30, max));
        assert!(
            why.contains("busy:")
                && why.contains("6442450944 bytes admitted to the migrations it is receiving (1)"),
            "{why}"
        );
        // Alone, the same guest is too large whatever runs: not `busy`.
        let why = refusal(b.admit(11 << 30, max));
        assert!(
            !why.contains("busy:") && why.contains("max_memory"),
            "{why}"
        );
        b.admit(4 << 30, max).unwrap();
        assert_eq!(ports.sessions(), 2);
        let why = refusal(c.admit(1, None));
        assert!(
            why.contains("busy:") && why.contains("max_sessions = 2"),
            "{why}"
        );
        drop(a);
        assert_eq!((ports.sessions(), ports.lanes()), (1, 2));
        c.admit(6 << 30, max).unwrap();
    }

    #[test]
    fn a_stream_goes_to_the_session_it_names_and_an_id_is_taken_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut ports = SessionPorts::new(&listener, 4);
        let (mut a, _ca) = open_lane(&mut ports, addr);
        let (mut b, _cb) = open_lane(&mut ports, addr);
        a.expect_session(7).unwrap();
        let why = refusal(b.expect_session(7));
        assert!(why.contains("already being received"), "{why}");
        let hello = |session_id| {
            StreamHello {
                session_id,
                stream_id: 0,
                binding: None,
                generation: 0,
            }
            .encode()
        };
        let never = AtomicBool::new(false);
        let mut ours = TcpStream::connect(addr).unwrap();
        ours.write_all(&hello(7)).unwrap();
        let mut stray = TcpStream::connect(addr).unwrap();
        stray.write_all(&hello(8)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ports.strays_and_unbound().0 == 0 || a.streams.is_empty() {
            assert!(Instant::now() < deadline, "the streams were not routed");
            ports.dispatch(Duration::from_millis(20), Duration::from_secs(5), &never);
        }
        let (_, bytes) = a
            .next_stream(Instant::now(), Duration::from_secs(1), &never)
            .expect("session 7's stream");
        assert_eq!(StreamHello::session_of(&bytes), 7);
        // The stray is closed: it reads the end.
        stray
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(stray.read(&mut [0u8; 1]).unwrap(), 0);
        // Once its lane is gone, the session's id is free again.
        drop(a);
        b.expect_session(7).unwrap();
    }
}
