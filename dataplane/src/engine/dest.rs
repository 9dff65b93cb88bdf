//! The destination side: accept a session, place pages, acknowledge rounds, verify.

use super::{MigrationError, page_crcs, worker_cpus};
use crate::memory::GuestMemory;
use crate::transport::{
    self, RxEvent, RxSetup, RxWorker, TransportConfig, TransportKind, plain, socket, uring,
};
use crate::wire::{
    self, AbortReason, ControlMessage, ControlReadError, STREAM_HELLO_LEN, StreamHello, WireError,
    caps, write_control,
};
use dwcp_hugepages::PagePreference;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How the destination runs a session.
#[derive(Debug, Clone, PartialEq)]
pub struct DestConfig {
    /// Transport settings.
    pub transport: TransportConfig,
    /// io_uring worker threads (0: one per CPU, at most one per stream).
    pub workers: usize,
    /// Longest wait for the source to connect and finish the handshake, and the
    /// longest silence tolerated mid-session.
    pub timeout: Duration,
    /// Capabilities this destination grants ([`caps`]; those the source lacks are
    /// dropped too). Leaving out the codec ones keeps codec frames off this host.
    pub capabilities: u64,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig {
            transport: TransportConfig::default(),
            workers: 0,
            timeout: Duration::from_secs(60),
            capabilities: caps::ALL,
        }
    }
}

/// Where received pages go.
pub enum DestMemory {
    /// This memory; the handshake must announce exactly its size.
    Provided(Arc<GuestMemory>),
    /// Allocate memory of the announced size (refused if it exceeds available RAM).
    Allocate(PagePreference),
}

/// The destination's account of a session.
#[derive(Debug)]
pub struct DestReport {
    /// The memory now holding the migrated guest.
    pub memory: Arc<GuestMemory>,
    /// Pages verified identical to the source.
    pub verified_pages: u64,
    /// Whole-memory CRC32C.
    pub digest: u32,
    /// Rounds received, the final one included.
    pub rounds: u64,
    /// Bytes received on data streams.
    pub bytes: u64,
    /// Transport used.
    pub transport: TransportKind,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io {
        what: what.into(),
        source,
    }
}

/// Accept one connection within `deadline`.
fn accept_by(listener: &TcpListener, deadline: Instant) -> Result<TcpStream, MigrationError> {
    listener.set_nonblocking(true).map_err(io("listener"))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(io("accepted socket"))?;
                listener.set_nonblocking(false).map_err(io("listener"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let _ = listener.set_nonblocking(false);
                    return Err(MigrationError::Transport(
                        "timed out waiting for the source to connect".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io("accepting a connection")(e)),
        }
    }
}

fn read_control_msg(stream: &mut TcpStream) -> Result<ControlMessage, MigrationError> {
    wire::read_control(stream).map_err(|e| match e {
        ControlReadError::Wire(w) => MigrationError::Protocol(w),
        ControlReadError::Io(e) => MigrationError::Io {
            what: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the control stream closed by the peer before the session ended".into()
            } else {
                "reading the control stream".into()
            },
            source: e,
        },
    })
}

fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Receive one migration on `listener`.
pub fn receive(
    listener: &TcpListener,
    memory: DestMemory,
    config: &DestConfig,
) -> Result<DestReport, MigrationError> {
    receive_cancellable(listener, memory, config, &AtomicBool::new(false))
}

/// [`receive`], giving up once `cancel` is set: the source is told (it resumes its
/// guest, intact) and the call returns [`MigrationError::Aborted`]. Checked between
/// batches of events while pages move, so it takes effect within milliseconds.
pub fn receive_cancellable(
    listener: &TcpListener,
    memory: DestMemory,
    config: &DestConfig,
    cancel: &AtomicBool,
) -> Result<DestReport, MigrationError> {
    let deadline = Instant::now() + config.timeout;
    let mut control = accept_by(listener, deadline)?;
    control
        .set_read_timeout(Some(config.timeout))
        .map_err(io("control stream timeout"))?;
    let _ = control.set_nodelay(true);
    let hello = match read_control_msg(&mut control)? {
        ControlMessage::Hello(h) => h,
        other => {
            let err = WireError::Unexpected(format!("{other:?} instead of a handshake"));
            let _ = write_control(
                &mut control,
                &ControlMessage::Refused {
                    reason: err.to_string(),
                },
            );
            return Err(err.into());
        }
    };
    let refuse = |control: &mut TcpStream, err: MigrationError| -> MigrationError {
        let _ = write_control(
            control,
            &ControlMessage::Refused {
                reason: err.to_string(),
            },
        );
        err
    };
    let provided_len = match &memory {
        DestMemory::Provided(m) => Some(m.len() as u64),
        DestMemory::Allocate(_) => None,
    };
    if let Err(e) = hello.validate(provided_len) {
        return Err(refuse(&mut control, e.into()));
    }
    let (memory, fresh) = match memory {
        DestMemory::Provided(m) => (m, false),
        DestMemory::Allocate(prefer) => {
            if let Some(avail) = available_memory()
                && hello.memory_bytes > avail
            {
                let e = MigrationError::Refused(format!(
                    "guest memory of {} bytes does not fit ({avail} bytes available)",
                    hello.memory_bytes
                ));
                return Err(refuse(&mut control, e));
            }
            match GuestMemory::anonymous(hello.memory_bytes as usize, prefer) {
                Ok(m) => {
                    // Fault it in ahead of the page stream (zeroing fresh memory on first
                    // touch would otherwise run inside it), on a thread of its own so the
                    // seconds a large guest takes overlap the session's setup rather than
                    // delay it. Populating never changes content, so pages that arrive
                    // first are safe.
                    let m = Arc::new(m);
                    let populating = m.clone();
                    let _ = std::thread::Builder::new()
                        .name("dwcp-populate".into())
                        .spawn(move || populating.populate());
                    (m, true)
                }
                Err(e) => return Err(refuse(&mut control, MigrationError::Refused(e.to_string()))),
            }
        }
    };
    let granted = hello.capabilities & caps::ALL & config.capabilities;
    write_control(
        &mut control,
        &ControlMessage::Welcome {
            capabilities: granted,
        },
    )
    .map_err(io("sending the welcome"))?;

    // The data streams, in any order, each identified by its hello.
    let streams = hello.streams;
    let mut data: Vec<Option<TcpStream>> = (0..streams).map(|_| None).collect();
    for _ in 0..streams {
        let mut s = accept_by(listener, deadline)?;
        s.set_read_timeout(Some(config.timeout))
            .map_err(io("data stream timeout"))?;
        let mut bytes = [0u8; STREAM_HELLO_LEN];
        s.read_exact(&mut bytes)
            .map_err(io("reading a data stream's hello"))?;
        let hello = StreamHello::decode(&bytes, hello.session_id, streams)
            .map_err(|e| refuse(&mut control, e.into()))?;
        let slot = &mut data[usize::from(hello.stream_id)];
        if slot.is_some() {
            let e = WireError::BadStreamId {
                id: hello.stream_id,
                reason: "opened twice",
            };
            return Err(refuse(&mut control, e.into()));
        }
        socket::configure(&s, &config.transport.socket);
        *slot = Some(s);
    }
    let data: Vec<(u16, TcpStream)> = data
        .into_iter()
        .enumerate()
        .map(|(i, s)| (i as u16, s.expect("every stream id seen once")))
        .collect();

    let probe = transport::probe(&config.transport);
    let cpus = if config.transport.pin_workers {
        worker_cpus(&config.transport)
    } else {
        Vec::new()
    };
    let cpu = |w: usize| (!cpus.is_empty()).then(|| cpus[w % cpus.len()]);
    let mut workers: Vec<RxWorker> = Vec::new();
    let rx_setup = RxSetup {
        total_streams: streams,
        memory: memory.clone(),
        memory_is_fresh: fresh,
        capabilities: granted,
    };
    match probe.kind {
        TransportKind::IoUring => {
            let count = match config.workers {
                0 => cpus.len().max(1),
                n => n,
            }
            .min(usize::from(streams));
            let mut groups: Vec<Vec<(u16, TcpStream)>> = (0..count).map(|_| Vec::new()).collect();
            for (id, s) in data {
                groups[usize::from(id) % count].push((id, s));
            }
            for (w, group) in groups.into_iter().enumerate() {
                workers.push(
                    uring::spawn_rx(w, group, rx_setup.clone(), &config.transport, cpu(w))
                        .map_err(io("starting an io_uring receiver"))?,
                );
            }
        }
        TransportKind::Plain => {
            for (w, s) in data.into_iter().enumerate() {
                workers.push(
                    plain::spawn_rx(s, rx_setup.clone(), &config.transport, cpu(w))
                        .map_err(io("starting a receiver"))?,
                );
            }
        }
    }
    let mut coordinator = Coordinator {
        streams,
        workers,
        control,
        memory,
        round_counts: Vec::new(),
        round_pages: Vec::new(),
        ended: 0,
        bytes: 0,
        final_round: None,
        crcs: Vec::new(),
        digest: None,
        ours: None,
        timeout: config.timeout,
        last_activity: Instant::now(),
    };
    let result = coordinator.run(cancel);
    if let Err(e) = &result {
        let reason = match e {
            MigrationError::Protocol(_) => AbortReason::ProtocolError,
            MigrationError::Verification { .. } => AbortReason::VerificationFailed,
            _ => AbortReason::LocalError,
        };
        let _ = write_control(
            &mut coordinator.control,
            &ControlMessage::Abort {
                reason,
                message: e.to_string(),
            },
        );
    }
    coordinator.stop();
    let (verified_pages, digest, rounds) = result?;
    Ok(DestReport {
        memory: coordinator.memory.clone(),
        verified_pages,
        digest,
        rounds,
        bytes: coordinator.bytes,
        transport: probe.kind,
    })
}

struct Coordinator {
    streams: u16,
    workers: Vec<RxWorker>,
    control: TcpStream,
    memory: Arc<GuestMemory>,
    /// Streams that finished each round, by round.
    round_counts: Vec<u16>,
    round_pages: Vec<u64>,
    ended: u16,
    bytes: u64,
    final_round: Option<u64>,
    crcs: Vec<u32>,
    digest: Option<(u64, u32)>,
    /// Our page CRCs and digest, once every page has arrived.
    ours: Option<(Vec<u32>, u32)>,
    timeout: Duration,
    last_activity: Instant,
}

impl Coordinator {
    fn run(&mut self, cancel: &AtomicBool) -> Result<(u64, u32, u64), MigrationError> {
        let control_rx = {
            let mut reader = self
                .control
                .try_clone()
                .map_err(io("cloning the control stream"))?;
            let _ = reader.set_read_timeout(None);
            let (tx, rx) = crossbeam::channel::bounded(1024);
            std::thread::Builder::new()
                .name("dwcp-ctl-rx".into())
                .spawn(move || {
                    loop {
                        let msg = read_control_msg(&mut reader);
                        let stop = msg.is_err();
                        if tx.send(msg).is_err() || stop {
                            return;
                        }
                    }
                })
                .map_err(io("starting the control reader"))?;
            rx
        };
        loop {
            // Set by whoever owns this appliance (a daemon shutting down); the Acquire
            // pairs with their Release store.
            if cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Aborted {
                    reason: "cancelled at the destination".into(),
                    rounds: self.round_counts.len() as u64,
                });
            }
            let mut progress = false;
            for w in &mut self.workers {
                while let Some(event) = w.events.pop() {
                    progress = true;
                    match event {
                        RxEvent::RoundEnd { round, pages, .. } => {
                            let r = round as usize;
                            if self.round_counts.len() <= r {
                                self.round_counts.resize(r + 1, 0);
                                self.round_pages.resize(r + 1, 0);
                            }
                            self.round_counts[r] += 1;
                            self.round_pages[r] += u64::from(pages);
                            if self.round_counts[r] == self.streams {
                                write_control(
                                    &mut self.control,
                                    &ControlMessage::RoundApplied {
                                        round,
                                        pages: self.round_pages[r],
                                    },
                                )
                                .map_err(io("acknowledging a round"))?;
                            }
                        }
                        RxEvent::StreamEnd { bytes, .. } => {
                            self.ended += 1;
                            self.bytes += bytes;
                        }
                        RxEvent::Telemetry { .. } => {}
                        RxEvent::Failed { stream, error } => {
                            // A source that aborts closes its streams right after saying
                            // why: prefer its reason when it arrives promptly.
                            if let Ok(Ok(ControlMessage::Abort { message, .. })) =
                                control_rx.recv_timeout(Duration::from_millis(200))
                            {
                                return Err(MigrationError::Aborted {
                                    reason: format!("source aborted: {message}"),
                                    rounds: self.round_counts.len() as u64,
                                });
                            }
                            return Err(MigrationError::Transport(format!(
                                "data stream {stream}: {error}"
                            )));
                        }
                    }
                }
            }
            while let Ok(msg) = control_rx.try_recv() {
                progress = true;
                match msg? {
                    ControlMessage::Switchover { final_round } => {
                        self.final_round = Some(final_round)
                    }
                    ControlMessage::PageCrcs { first_page, crcs } => {
                        if first_page != self.crcs.len() as u64
                            || self.crcs.len() + crcs.len() > self.memory.pages() as usize
                        {
                            return Err(WireError::Unexpected(format!(
                                "page CRCs from {first_page} ({} already received, {} pages)",
                                self.crcs.len(),
                                self.memory.pages()
                            ))
                            .into());
                        }
                        self.crcs.extend_from_slice(&crcs);
                    }
                    ControlMessage::Digest { pages, digest } => self.digest = Some((pages, digest)),
                    ControlMessage::Ping { nanos } => {
                        write_control(&mut self.control, &ControlMessage::Pong { nanos })
                            .map_err(io("answering a ping"))?;
                    }
                    ControlMessage::Abort { message, .. } => {
                        return Err(MigrationError::Aborted {
                            reason: format!("source aborted: {message}"),
                            rounds: self.round_counts.len() as u64,
                        });
                    }
                    other => {
                        return Err(
                            WireError::Unexpected(format!("{other:?} from the source")).into()
                        );
                    }
                }
            }
            if let Some(final_round) = self.final_round
                && self.ended == self.streams
                && self.round_counts.get(final_round as usize) == Some(&self.streams)
            {
                // Every page is in: checksum our memory now, while the source computes
                // and sends its table, rather than after.
                if self.ours.is_none() {
                    // SAFETY: every stream has ended and its receiver reported the end,
                    // so nothing writes the memory any more.
                    self.ours = Some(unsafe { page_crcs(&self.memory) });
                }
                if let Some((pages, digest)) = self.digest {
                    return self.verify(pages, digest, final_round);
                }
            }
            if progress {
                self.last_activity = Instant::now();
            } else {
                if self.last_activity.elapsed() > self.timeout {
                    return Err(MigrationError::Transport(format!(
                        "no data or messages from the source for {:?}",
                        self.timeout
                    )));
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }

    fn verify(
        &mut self,
        pages: u64,
        digest: u32,
        final_round: u64,
    ) -> Result<(u64, u32, u64), MigrationError> {
        if pages != self.memory.pages() || self.crcs.len() as u64 != pages {
            return Err(WireError::Unexpected(format!(
                "digest covers {pages} pages with {} CRCs; memory has {}",
                self.crcs.len(),
                self.memory.pages()
            ))
            .into());
        }
        let (ours, our_digest) = self.ours.take().expect("computed before verifying");
        let mut mismatches = 0u64;
        let mut first = None;
        for (page, (a, b)) in ours.iter().zip(&self.crcs).enumerate() {
            if a != b {
                mismatches += 1;
                first.get_or_insert(page as u64);
            }
        }
        write_control(
            &mut self.control,
            &ControlMessage::Verified {
                pages,
                mismatches,
                first_mismatch: first,
                digest: our_digest,
            },
        )
        .map_err(io("sending the verdict"))?;
        if mismatches > 0 || our_digest != digest {
            return Err(MigrationError::Verification {
                mismatches: mismatches.max(1),
                first,
            });
        }
        Ok((pages, our_digest, final_round + 1))
    }

    fn stop(&mut self) {
        for w in &self.workers {
            w.stop.store(true, Ordering::Relaxed);
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
        let _ = self.control.shutdown(std::net::Shutdown::Both);
    }
}
