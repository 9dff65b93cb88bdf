//! Raft messages between appliances: one TCP connection per peer and direction,
//! mutually authenticated TLS 1.3 with the appliance's `[security]` identity (plain
//! only under `--insecure`), frames of `length (u32 LE) · protobuf message`.
//!
//! Threads, not the control thread, do the I/O: a listener that hands each accepted
//! connection to a reader thread, and a sender thread per peer that connects when it
//! has something to send. The control thread sees two channels: messages in, and the
//! fate of each snapshot it sent (raft-rs waits for that report before it sends the
//! member anything else). Sends never block the control thread: a peer that cannot
//! keep up loses messages, which raft retransmits.
//!
//! A message is taken only from a connection whose peer authenticated and only when it
//! names a member as its sender and this appliance as its receiver.
//!
//! The same port takes an appliance's request to join (`dwcpctl cluster join ADDR` on
//! that appliance): a connection whose first frame is empty carries one request frame
//! (JSON: its id and raft address) and gets one answer frame (the control socket's
//! `Response`: the members' addresses once it was added, or where the leader is). It
//! must authenticate like a member (the site's CA), but need not be one yet.

use super::node::{decode_message, encode_message};
use crossbeam::channel::{Receiver, Sender, TrySendError, bounded, unbounded};
use dwcp_api::Response;
use dwcp_dataplane::security::{Identity, TlsChannel};
use raft::prelude::{Message, MessageType};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest frame taken (a snapshot of the state is a few KiB; entries are batched up
/// to 1 MiB per message).
const MAX_FRAME: usize = 16 << 20;
/// Messages queued for one peer before new ones are dropped.
const QUEUE: usize = 1024;
/// How long a connection attempt or a handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The least time between two connection attempts to one peer.
const RECONNECT_EVERY: Duration = Duration::from_millis(300);
/// How long a join request waits for its answer: the member's write wait, and a margin.
const JOIN_WAIT: Duration = Duration::from_secs(6);
/// Largest join request or answer (a few addresses).
const MAX_JOIN_FRAME: usize = 64 << 10;

/// An appliance asking, over the raft port, to be added to the cluster.
pub struct JoinRequest {
    /// Its id.
    pub id: u64,
    /// Where its raft messages go.
    pub address: String,
    /// The connection it came from (for the log).
    pub from: SocketAddr,
    /// The answer: a [`JoinAnswer`], or why not.
    pub reply: Sender<Response>,
}

/// What a member answers a join request with: the members (added), the leader (ask
/// there), or neither (this member knows no leader now: ask again shortly).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JoinAnswer {
    /// Added: every member's raft address, the new one's too.
    pub members: BTreeMap<u64, String>,
    /// Not added here: the leader's raft address (ask there).
    pub leader: Option<String>,
}

/// How long a join keeps asking a member that knows no leader (one that joined a moment
/// ago, or a cluster electing one).
const NO_LEADER_PATIENCE: Duration = Duration::from_secs(5);

/// A join request on the wire.
#[derive(Serialize, Deserialize)]
struct JoinFrame {
    id: u64,
    address: String,
}

/// Counters for `cluster status` and metrics.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Messages handed to the sockets.
    pub sent: AtomicU64,
    /// Messages dropped (no connection, a full queue, a write error).
    pub dropped: AtomicU64,
    /// Messages received and taken.
    pub received: AtomicU64,
    /// Connections refused (failed authentication, a non-member, bad frames).
    pub refused: AtomicU64,
}

/// The raft network of one appliance.
pub struct PeerNet {
    /// Messages from the other members.
    pub inbound: Receiver<Message>,
    /// `(member, delivered)` for each snapshot message sent.
    pub snapshot_reports: Receiver<(u64, bool)>,
    /// Appliances asking to join.
    pub join_requests: Receiver<JoinRequest>,
    senders: BTreeMap<u64, Sender<Message>>,
    snapshot_tx: Sender<(u64, bool)>,
    /// What went through.
    pub counters: Arc<PeerCounters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The address the listener is bound to.
    pub local: SocketAddr,
    id: u64,
    identity: Option<Arc<Identity>>,
    /// Who may send: the members (membership changes update it).
    members: Arc<RwLock<BTreeSet<u64>>>,
}

impl PeerNet {
    /// Listens at `listen` and prepares senders to every other member.
    pub fn start(
        id: u64,
        listen: SocketAddr,
        members: &BTreeMap<u64, SocketAddr>,
        identity: Option<Arc<Identity>>,
    ) -> Result<PeerNet, String> {
        let listener = TcpListener::bind(listen)
            .map_err(|e| format!("cluster: cannot listen at {listen}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(PeerCounters::default());
        let (inbound_tx, inbound) = unbounded();
        let (snapshot_tx, snapshot_reports) = unbounded();
        let (join_tx, join_requests) = bounded(16);
        let mut threads = Vec::new();
        let known = Arc::new(RwLock::new(
            members.keys().copied().collect::<BTreeSet<u64>>(),
        ));
        {
            let known = known.clone();
            let (stop, counters, identity) = (stop.clone(), counters.clone(), identity.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("dwcp-raft-listen".into())
                    .spawn(move || {
                        let to_control = ToControl {
                            messages: inbound_tx,
                            joins: join_tx,
                        };
                        accept_loop(id, listener, known, identity, to_control, counters, stop)
                    })
                    .map_err(|e| e.to_string())?,
            );
        }
        let mut net = PeerNet {
            inbound,
            snapshot_reports,
            join_requests,
            senders: BTreeMap::new(),
            snapshot_tx,
            counters,
            stop,
            threads,
            local,
            id,
            identity,
            members: known,
        };
        for (&member, &address) in members {
            net.add_peer(member, address)?;
        }
        Ok(net)
    }

    /// Starts sending to `member` at `address`, and takes its messages (a member that
    /// joined). Nothing for this appliance itself or a member already known.
    pub fn add_peer(&mut self, member: u64, address: SocketAddr) -> Result<(), String> {
        self.members
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member);
        if member == self.id || self.senders.contains_key(&member) {
            return Ok(());
        }
        let (tx, rx) = bounded(QUEUE);
        let (stop, counters, identity, reports) = (
            self.stop.clone(),
            self.counters.clone(),
            self.identity.clone(),
            self.snapshot_tx.clone(),
        );
        self.threads.push(
            std::thread::Builder::new()
                .name(format!("dwcp-raft-to-{member}"))
                .spawn(move || send_loop(address, rx, identity, reports, counters, stop))
                .map_err(|e| e.to_string())?,
        );
        self.senders.insert(member, tx);
        Ok(())
    }

    /// Stops sending to `member` and taking its messages (a member that left).
    pub fn remove_peer(&mut self, member: u64) {
        self.members
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&member);
        // Its sender thread ends when its queue is dropped.
        self.senders.remove(&member);
    }

    /// Queues `message` for its receiver; never blocks.
    pub fn send(&self, message: Message) {
        let to = message.to;
        let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        let queued = match self.senders.get(&to) {
            Some(tx) => match tx.try_send(message) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !queued {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            if snapshot {
                let _ = self.snapshot_tx.send((to, false));
            }
        }
    }

    /// Stops every thread (connections close).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.senders.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A connection either way: TLS when the appliance has an identity.
enum Conn {
    Plain(TcpStream),
    Tls(TlsChannel),
}

impl Conn {
    fn write_frame(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let frame = framed(bytes);
        match self {
            Conn::Plain(s) => s.write_all(&frame),
            Conn::Tls(t) => t.write_all(&frame),
        }
    }

    fn reader(&self) -> std::io::Result<Box<dyn Read>> {
        Ok(match self {
            Conn::Plain(s) => Box::new(s.try_clone()?),
            Conn::Tls(t) => Box::new(t.reader()?),
        })
    }

    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.socket(),
        }
    }
}

/// `bytes` behind their length.
fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(bytes.len() + 4);
    frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    frame.extend_from_slice(bytes);
    frame
}

/// Where the readers hand what they receive.
#[derive(Clone)]
struct ToControl {
    messages: Sender<Message>,
    joins: Sender<JoinRequest>,
}

fn accept_loop(
    id: u64,
    listener: TcpListener,
    members: Arc<RwLock<BTreeSet<u64>>>,
    identity: Option<Arc<Identity>>,
    to_control: ToControl,
    counters: Arc<PeerCounters>,
    stop: Arc<AtomicBool>,
) {
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((socket, _)) => {
                let (members, identity, to_control, counters, stop) = (
                    members.clone(),
                    identity.clone(),
                    to_control.clone(),
                    counters.clone(),
                    stop.clone(),
                );
                if let Ok(t) = std::thread::Builder::new()
                    .name("dwcp-raft-from".into())
                    .spawn(move || {
                        if let Err(why) = read_peer(
                            id,
                            socket,
                            &members,
                            identity,
                            &to_control,
                            &counters,
                            &stop,
                        ) {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                            eprintln!("dwcpd: cluster: {why}");
                        }
                    })
                {
                    readers.push(t);
                }
                readers.retain(|t| !t.is_finished());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    for t in readers {
        let _ = t.join();
    }
}

/// Reads one peer's connection until it ends; an error says why it was refused.
fn read_peer(
    id: u64,
    socket: TcpStream,
    members: &RwLock<BTreeSet<u64>>,
    identity: Option<Arc<Identity>>,
    to_control: &ToControl,
    counters: &PeerCounters,
    stop: &AtomicBool,
) -> Result<(), String> {
    let peer = socket.peer_addr().map_err(|e| e.to_string())?;
    socket.set_nonblocking(false).map_err(|e| e.to_string())?;
    // A blocked read wakes now and then to see whether the daemon stops.
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let conn = match &identity {
        Some(identity) => {
            // The first bytes say whether the peer speaks TLS at all.
            let mut first = [0u8; 2];
            let mut sniff = &socket;
            socket
                .set_read_timeout(Some(CONNECT_TIMEOUT))
                .map_err(|e| e.to_string())?;
            sniff.read_exact(&mut first).map_err(|e| {
                format!("a raft connection from {peer} sent nothing to begin TLS with: {e}")
            })?;
            if !dwcp_dataplane::security::tls::is_tls_hello(&first) {
                return Err(format!(
                    "a raft connection from {peer} does not speak TLS (a member running --insecure?)"
                ));
            }
            let never = AtomicBool::new(false);
            let channel = dwcp_dataplane::security::tls::accept(
                identity,
                socket,
                &first,
                Instant::now() + CONNECT_TIMEOUT,
                &never,
            )
            .map_err(|e| format!("a raft connection from {peer} failed its handshake: {e}"))?;
            channel.authorized().map_err(|e| {
                format!("a raft connection from {peer} is not from this site's appliances: {e}")
            })?;
            channel
                .socket()
                .set_nonblocking(false)
                .map_err(|e| e.to_string())?;
            channel
                .socket()
                .set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| e.to_string())?;
            Conn::Tls(channel)
        }
        None => Conn::Plain(socket),
    };
    let mut reader = conn.reader().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    loop {
        let mut header = [0u8; 4];
        if !read_full(&mut reader, &mut header, stop)? {
            return Ok(());
        }
        let len = u32::from_le_bytes(header) as usize;
        if len == 0 {
            return answer_join(peer, conn, &mut reader, &to_control.joins, stop);
        }
        if len > MAX_FRAME {
            return Err(format!(
                "{peer} sent a raft frame of {len} bytes (at most {MAX_FRAME})"
            ));
        }
        buf.resize(len, 0);
        if !read_full(&mut reader, &mut buf, stop)? {
            return Err(format!(
                "{peer} closed the connection in the middle of a frame"
            ));
        }
        let message = decode_message(&buf).map_err(|e| format!("{peer}: {e}"))?;
        let member = members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&message.from);
        if message.to != id || !member || message.from == id {
            return Err(format!(
                "{peer} sent a raft message from {} to {}: not from a member to this appliance ({id})",
                message.from, message.to
            ));
        }
        counters.received.fetch_add(1, Ordering::Relaxed);
        if to_control.messages.send(message).is_err() {
            return Ok(());
        }
    }
}

/// Reads the join request after an empty frame, hands it to the control thread, and
/// writes its answer back.
fn answer_join(
    peer: SocketAddr,
    mut conn: Conn,
    reader: &mut dyn Read,
    joins: &Sender<JoinRequest>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let request: JoinFrame = serde_json::from_slice(&read_join_frame(reader, stop)?)
        .map_err(|e| format!("{peer} sent a join request that is not one: {e}"))?;
    let (reply, answer) = bounded(1);
    let request = JoinRequest {
        id: request.id,
        address: request.address,
        from: peer,
        reply,
    };
    let response = match joins.try_send(request) {
        Ok(()) => answer.recv_timeout(JOIN_WAIT).unwrap_or_else(|_| {
            Response::error("the member asked did not answer in time: ask again")
        }),
        Err(_) => Response::error("the member asked is busy with other join requests"),
    };
    let bytes = serde_json::to_vec(&response).map_err(|e| e.to_string())?;
    conn.write_frame(&bytes)
        .map_err(|e| format!("answering {peer}'s join request: {e}"))
}

/// One join frame (request or answer) after its length.
fn read_join_frame(reader: &mut dyn Read, stop: &AtomicBool) -> Result<Vec<u8>, String> {
    let mut header = [0u8; 4];
    if !read_full(reader, &mut header, stop)? {
        return Err("the connection ended before the join frame".into());
    }
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 || len > MAX_JOIN_FRAME {
        return Err(format!(
            "a join frame of {len} bytes (at most {MAX_JOIN_FRAME})"
        ));
    }
    let mut buf = vec![0u8; len];
    if !read_full(reader, &mut buf, stop)? {
        return Err("the connection ended in the middle of the join frame".into());
    }
    Ok(buf)
}

/// Asks the member at `target` to add this appliance (`id`, its raft messages to
/// `address`), following the answer to the leader when `target` does not lead.
/// Returns the members' addresses once added.
pub fn request_join(
    target: SocketAddr,
    id: u64,
    address: SocketAddr,
    identity: Option<&Arc<Identity>>,
) -> Result<BTreeMap<u64, String>, String> {
    let mut target = target;
    let mut hops = 0;
    let started = Instant::now();
    loop {
        let answer = ask_to_join(target, id, address, identity)?;
        if !answer.members.is_empty() {
            return Ok(answer.members);
        }
        match answer.leader {
            // A member that just lost its leader may name an old one: a few hops at most.
            Some(leader) => {
                hops += 1;
                if hops > 4 {
                    return Err(format!(
                        "the members asked kept naming other leaders (last {leader}): the cluster may be electing one; ask again"
                    ));
                }
                target = leader.parse().map_err(|_| {
                    format!("{target} named the leader at {leader:?}, not an address")
                })?;
            }
            None if started.elapsed() < NO_LEADER_PATIENCE => {
                std::thread::sleep(Duration::from_millis(300));
            }
            None => {
                return Err(format!(
                    "the member at {target} has known no leader for {} s: the cluster may be electing one, or that member cannot reach a majority",
                    NO_LEADER_PATIENCE.as_secs()
                ));
            }
        }
    }
}

fn ask_to_join(
    target: SocketAddr,
    id: u64,
    address: SocketAddr,
    identity: Option<&Arc<Identity>>,
) -> Result<JoinAnswer, String> {
    let mut conn = try_connect(target, identity)?;
    let request = serde_json::to_vec(&JoinFrame {
        id,
        address: address.to_string(),
    })
    .map_err(|e| e.to_string())?;
    let sent = conn
        .write_frame(&[])
        .and_then(|()| conn.write_frame(&request));
    sent.map_err(|e| format!("asking {target} to join: {e}"))?;
    conn.socket()
        .set_read_timeout(Some(JOIN_WAIT + Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut reader = conn.reader().map_err(|e| e.to_string())?;
    let never = AtomicBool::new(false);
    let bytes = read_join_frame(&mut reader, &never)
        .map_err(|e| format!("{target} did not answer the join request: {e}"))?;
    let response: Response = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{target} answered the join request with something else: {e}"))?;
    response.into_result().map_err(|e| format!("{target}: {e}"))
}

/// Fills `buf`; `false` when the connection ended cleanly before its first byte (or
/// the daemon stops).
fn read_full(reader: &mut dyn Read, buf: &mut [u8], stop: &AtomicBool) -> Result<bool, String> {
    let mut filled = 0;
    while filled < buf.len() {
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            // A member that stops or restarts ends its TLS session without a
            // close_notify: between frames, that is the end of the connection.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && filled == 0 => {
                return Ok(false);
            }
            Ok(0) => return Err("the connection ended in the middle of a frame".into()),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(true)
}

fn send_loop(
    address: SocketAddr,
    queue: Receiver<Message>,
    identity: Option<Arc<Identity>>,
    snapshot_reports: Sender<(u64, bool)>,
    counters: Arc<PeerCounters>,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<Conn> = None;
    let mut last_attempt: Option<Instant> = None;
    loop {
        let message = match queue.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => m,
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => return,
        };
        if stop.load(Ordering::Acquire) {
            return;
        }
        let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        if conn.is_none() && last_attempt.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY) {
            last_attempt = Some(Instant::now());
            conn = connect(address, identity.as_ref());
        }
        let delivered = match conn.as_mut() {
            Some(c) => match c.write_frame(&encode_message(&message)) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("dwcpd: cluster: raft connection to {address}: {e}");
                    conn = None;
                    false
                }
            },
            None => false,
        };
        if delivered {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if snapshot {
            let _ = snapshot_reports.send((message.to, delivered));
        }
    }
}

/// A connection to a member for raft messages; a failed handshake is logged (a peer
/// that is down is not: raft retries).
fn connect(address: SocketAddr, identity: Option<&Arc<Identity>>) -> Option<Conn> {
    let socket = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).ok()?;
    authenticate(socket, address, identity)
        .map_err(|e| eprintln!("dwcpd: cluster: {e}"))
        .ok()
}

/// A connection to `address`, or why not.
fn try_connect(address: SocketAddr, identity: Option<&Arc<Identity>>) -> Result<Conn, String> {
    let socket = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
        .map_err(|e| format!("no cluster member answers at {address}: {e}"))?;
    authenticate(socket, address, identity)
}

/// TLS on `socket` when the appliance has an identity: the peer must show a
/// certificate of the site.
fn authenticate(
    socket: TcpStream,
    address: SocketAddr,
    identity: Option<&Arc<Identity>>,
) -> Result<Conn, String> {
    let _ = socket.set_nodelay(true);
    let _ = socket.set_write_timeout(Some(Duration::from_secs(2)));
    let Some(identity) = identity else {
        return Ok(Conn::Plain(socket));
    };
    let never = AtomicBool::new(false);
    let channel = dwcp_dataplane::security::tls::connect(
        identity,
        socket,
        address.ip(),
        Instant::now() + CONNECT_TIMEOUT,
        &never,
    )
    .map_err(|e| format!("raft connection to {address}: {e}"))?;
    channel
        .authorized()
        .map_err(|e| format!("raft connection to {address}: {e}"))?;
    Ok(Conn::Tls(channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_dataplane::security::SecurityFiles;

    fn identity(which: usize) -> Arc<Identity> {
        static LAB: std::sync::OnceLock<crate::certs::Written> = std::sync::OnceLock::new();
        let written = LAB.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("dwcp-peers-certs-{}", std::process::id()));
            crate::certs::init(&dir, &[]).unwrap()
        });
        let (_, cert, key) = &written.appliances[which];
        Identity::load(&SecurityFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: written.ca.clone(),
            peers: vec![],
        })
        .unwrap()
    }

    #[test]
    fn messages_cross_authenticated_connections_both_ways() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let members: BTreeMap<u64, SocketAddr> = [(1, ports[0]), (2, ports[1])]
            .into_iter()
            .map(|(id, port)| (id, SocketAddr::from(([127, 0, 0, 1], port))))
            .collect();
        let a = PeerNet::start(1, members[&1], &members, Some(identity(0))).unwrap();
        let b = PeerNet::start(2, members[&2], &members, Some(identity(1))).unwrap();
        for round in 0..3u64 {
            let m = Message {
                from: 1,
                to: 2,
                term: round,
                ..Default::default()
            };
            a.send(m);
            let got = b
                .inbound
                .recv_timeout(Duration::from_secs(5))
                .expect("b receives");
            assert_eq!((got.from, got.term), (1, round));
            let m = Message {
                from: 2,
                to: 1,
                term: round,
                ..Default::default()
            };
            b.send(m);
            let got = a
                .inbound
                .recv_timeout(Duration::from_secs(5))
                .expect("a receives");
            assert_eq!((got.from, got.term), (2, round));
        }
        // A connection that does not speak TLS is refused; the members carry on.
        let mut intruder = TcpStream::connect(members[&1]).unwrap();
        intruder.write_all(&[0x10, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.counters.refused.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the intruder was not refused");
            std::thread::sleep(Duration::from_millis(10));
        }
        let m = Message {
            from: 2,
            to: 1,
            ..Default::default()
        };
        b.send(m);
        assert!(a.inbound.recv_timeout(Duration::from_secs(5)).is_ok());
        a.stop();
        b.stop();
    }
}
