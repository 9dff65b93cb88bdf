//! Plain blocking sockets: the fallback when io_uring or an opcode it needs is missing.
//! One thread per stream (a blocking write on one stream must not stall another);
//! the same frames, parser and events as the io_uring transport.

use super::frames::stage_space;
use super::stage::{SendBuffers, Stager, StreamStage};
use super::{
    CONTROL_RING, IdleStrategy, Inbound, OsError, RxError, RxEvent, RxSetup, RxWorker, StreamFence,
    StreamTelemetry, TransportConfig, TxCommand, TxControl, TxError, TxEvent, TxSetup, TxWorker,
    WORKER_RING, WorkerThread, pin, push_event,
};
use crate::ring::{self, Consumer, Producer};
use crate::security::records::{RECORD_HEADER, RECORD_TAG, RecordSealer};
use crate::transport::socket;
use crate::wire::{FRAME_HEADER_LEN, FrameHeader};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Start a source worker for one stream.
pub fn spawn_tx(
    worker: usize,
    stream: (u16, TcpStream),
    setup: TxSetup,
    config: &TransportConfig,
    cpu: Option<usize>,
) -> std::io::Result<TxWorker> {
    let (cmd_tx, cmd_rx) = ring::channel(WORKER_RING);
    let (ctl_tx, ctl_rx) = ring::channel(CONTROL_RING);
    let (evt_tx, evt_rx) = ring::channel(WORKER_RING);
    let config = config.clone();
    let thread = WorkerThread::spawn(format!("dwcp-ptx{worker}"), move || {
        pin(cpu);
        PlainTx::new(worker, stream, setup, &config).run(cmd_rx, ctl_rx, evt_tx, &config)
    })?;
    Ok(TxWorker {
        commands: cmd_tx,
        control: ctl_tx,
        events: evt_rx,
        thread,
    })
}

/// One stream's send buffer, written to the socket with blocking sends when full. In an
/// authenticated session each send is one sealed record: staging starts after the
/// record header's room and leaves room for the tag.
struct SocketBuffer {
    id: u16,
    socket: TcpStream,
    buf: Vec<u8>,
    /// Seals each send, in an authenticated session.
    sealer: Option<RecordSealer>,
    /// Where staged bytes start (after a record header's room, when sealing).
    start: usize,
    /// Room kept at the end for a record's tag.
    tail: usize,
    /// End of the bytes waiting in `buf` (from `start`).
    len: usize,
    /// Send once this much is buffered.
    send_size: usize,
    /// Bytes handed to the kernel.
    bytes: u64,
    /// Time spent in blocking sends.
    send_nanos: u64,
}

impl SocketBuffer {
    /// Send what is buffered.
    fn send(&mut self) -> Result<(), TxError> {
        if self.len == self.start {
            return Ok(());
        }
        let started = Instant::now();
        let end = match &mut self.sealer {
            Some(sealer) => sealer.seal(&mut self.buf, self.len),
            None => self.len,
        };
        self.socket
            .write_all(&self.buf[..end])
            .map_err(|e| TxError::Send {
                stream: self.id,
                error: e.into(),
            })?;
        self.send_nanos += started.elapsed().as_nanos() as u64;
        self.bytes += end as u64;
        self.len = self.start;
        Ok(())
    }
}

impl SendBuffers for SocketBuffer {
    fn room(&mut self, _stream: usize, need: usize) -> Result<Option<&mut [u8]>, TxError> {
        let room_end = self.buf.len() - self.tail;
        if self.len > self.start
            && (self.len + need > room_end || self.len - self.start + need > self.send_size)
        {
            self.send()?;
        }
        Ok(Some(&mut self.buf[self.len..room_end]))
    }

    fn filled(&mut self, _stream: usize, n: usize) {
        self.len += n;
    }
}

/// A source worker's state: one stream, one buffer written with blocking sends.
struct PlainTx {
    worker: usize,
    out: SocketBuffer,
    stager: Stager,
    /// The one stream's staging state.
    stage: [StreamStage; 1],
    /// How the worker waits when idle (the engine may change it).
    idle: IdleStrategy,
    /// The stream was lost ([`TxEvent::StreamLost`]).
    lost: bool,
}

impl PlainTx {
    fn new(
        worker: usize,
        (id, socket): (u16, TcpStream),
        setup: TxSetup,
        config: &TransportConfig,
    ) -> Self {
        let stager = Stager::new(setup.memory, setup.table, setup.codec).with_rma(setup.rma);
        let send_size = config
            .send_buffer
            .max(stage_space(crate::wire::MAX_RUN_PAGES) * 2);
        let sealer = setup.records.as_ref().map(|keys| keys.sealer(id));
        let (start, tail) = if sealer.is_some() {
            (RECORD_HEADER, RECORD_TAG)
        } else {
            (0, 0)
        };
        let capacity = start + send_size + stager.max_flush_len() + FRAME_HEADER_LEN + tail;
        PlainTx {
            worker,
            out: SocketBuffer {
                id,
                socket,
                buf: vec![0u8; capacity],
                sealer,
                start,
                tail,
                len: start,
                send_size,
                bytes: 0,
                send_nanos: 0,
            },
            stage: [stager.stream(id)],
            stager,
            idle: config.idle,
            lost: false,
        }
    }

    /// Write a marker (after the batch) and send everything buffered.
    fn marker(&mut self, header: FrameHeader) -> Result<(), TxError> {
        // A socket buffer always has room: it sends to make it.
        self.stager
            .marker(&mut self.out, &mut self.stage, 0, header)?;
        self.out.send()
    }

    /// Flush the batch and send what is buffered.
    fn flush(&mut self) -> Result<(), TxError> {
        self.stager.flush_all(&mut self.out, &mut self.stage)?;
        self.out.send()
    }

    /// The stream's counters, as an event.
    fn stream_telemetry(&self) -> TxEvent {
        TxEvent::Telemetry(StreamTelemetry {
            stream: self.out.id,
            bytes: self.out.bytes,
            pages: self.stage[0].pages,
            tcp: socket::tcp_info(&self.out.socket),
        })
    }

    fn apply(&mut self, change: TxControl) -> Result<(), TxError> {
        match change {
            TxControl::SetIdle(idle) => self.idle = idle,
            // Plain sockets always copy.
            TxControl::SetZeroCopy(_) => {}
            // A socket buffer always has room, so codec changes always apply.
            other => {
                self.stager.apply(&other, &mut self.out, &mut self.stage)?;
            }
        }
        Ok(())
    }

    /// Give the stream up (see [`TxEvent::StreamLost`]); from here on the worker only
    /// answers round ends and the end of the session.
    fn lose(&mut self, why: String, events: &mut Producer<TxEvent>) {
        if self.lost {
            return;
        }
        self.lost = true;
        let _ = self.out.socket.shutdown(std::net::Shutdown::Both);
        self.out.len = self.out.start;
        let pages = self.stage[0].pages;
        self.stage[0].close_rma();
        self.stage[0] = self.stager.stream(self.out.id);
        self.stage[0].pages = pages;
        push_event(
            events,
            TxEvent::StreamLost {
                stream: self.out.id,
                error: why,
            },
        );
    }

    /// A failed send loses the stream; any other error ends the worker.
    fn on_error(&mut self, error: TxError, events: &mut Producer<TxEvent>) -> Result<(), TxError> {
        match error {
            TxError::Send { .. } | TxError::PeerStoppedReading { .. } => {
                self.lose(error.to_string(), events);
                Ok(())
            }
            other => Err(other),
        }
    }

    /// Carry out one command; `true` when the worker is done.
    fn command(&mut self, cmd: TxCommand, events: &mut Producer<TxEvent>) -> Result<bool, TxError> {
        match cmd {
            TxCommand::Pages { .. }
            | TxCommand::DeviceState { .. }
            | TxCommand::StreamMap { .. }
                if self.lost => {}
            TxCommand::Pages {
                first,
                count,
                known_zero,
                ..
            } => {
                self.stager.stage(
                    &mut self.out,
                    &mut self.stage,
                    0,
                    (first, count),
                    known_zero,
                )?;
            }
            TxCommand::EndRound { round } => {
                let marked = if self.lost {
                    Ok(())
                } else {
                    self.marker(Stager::round_end(round, &self.stage[0]))
                };
                self.stage[0].round_pages = 0;
                let counts = self.stager.take_round();
                // Reported even when the marker failed: the round is over here.
                push_event(
                    events,
                    TxEvent::RoundSent {
                        worker: self.worker,
                        round,
                        zero_pages: counts.zero_pages,
                        raw_pages: counts.content_pages,
                        bytes: counts.bytes,
                    },
                );
                marked?;
            }
            TxCommand::StreamMap { active } => {
                self.marker(FrameHeader::stream_map(active))?;
            }
            TxCommand::DeviceState { offset, bytes, .. } => {
                // A socket buffer always has room: it sends to make it.
                let header = FrameHeader::device_state(offset, bytes.len());
                self.stager
                    .payload_frame(&mut self.out, &mut self.stage, 0, header, &bytes)?;
                self.out.send()?;
            }
            TxCommand::Finish => {
                if !self.lost {
                    let ended = self.marker(FrameHeader::stream_end());
                    let _ = self.out.socket.shutdown(std::net::Shutdown::Write);
                    ended?;
                }
                return Ok(true);
            }
            TxCommand::Release => {
                // Blocking sends: once written, the kernel owns the bytes.
                if !self.lost {
                    self.flush()?;
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The worker's life; returns itself, to be freed once the worker is let go.
    fn run(
        mut self,
        mut commands: Consumer<TxCommand>,
        mut control: Consumer<TxControl>,
        mut events: Producer<TxEvent>,
        config: &TransportConfig,
    ) -> Self {
        let mut idle = 0u32;
        let mut next_telemetry = Instant::now() + config.telemetry_interval;
        let result: Result<(), TxError> = (|| loop {
            if Instant::now() >= next_telemetry {
                next_telemetry = Instant::now() + config.telemetry_interval;
                let telemetry = self.stager.telemetry(self.worker, self.out.send_nanos);
                push_event(&mut events, TxEvent::Worker(telemetry));
                if !self.lost {
                    push_event(&mut events, self.stream_telemetry());
                }
            }
            while let Some(change) = control.pop() {
                match change {
                    TxControl::DropStream(_) => {
                        self.lose("given up by the engine".into(), &mut events);
                    }
                    TxControl::SetIdle(idle) => self.idle = idle,
                    _ if self.lost => {}
                    change => {
                        if let Err(e) = self.apply(change) {
                            self.on_error(e, &mut events)?;
                        }
                    }
                }
            }
            let Some(cmd) = commands.pop() else {
                // Nothing more to add right now: send what there is.
                if !self.lost
                    && let Err(e) = self.flush()
                {
                    self.on_error(e, &mut events)?;
                }
                if commands.is_abandoned() {
                    return Err(TxError::EngineGone);
                }
                idle += 1;
                if idle < self.idle.spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::park_timeout(self.idle.park);
                }
                continue;
            };
            idle = 0;
            match self.command(cmd, &mut events) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => self.on_error(e, &mut events)?,
            }
        })();
        // Final counters, so that whoever carries the stream on counts from them (a
        // lost stream's stopped when it was lost).
        if !self.lost {
            push_event(&mut events, self.stream_telemetry());
        }
        let telemetry = self.stager.telemetry(self.worker, self.out.send_nanos);
        push_event(&mut events, TxEvent::Worker(telemetry));
        match result {
            Ok(()) => push_event(
                &mut events,
                TxEvent::Finished {
                    worker: self.worker,
                    zc_copied: 0,
                    zc_sends: 0,
                    zc_fell_back: false,
                },
            ),
            Err(error) => {
                let _ = self.out.socket.shutdown(std::net::Shutdown::Both);
                push_event(
                    &mut events,
                    TxEvent::Failed {
                        worker: self.worker,
                        error,
                    },
                );
            }
        }
        self
    }
}

/// Start a destination worker for one stream.
pub fn spawn_rx(
    stream: (u16, TcpStream),
    setup: RxSetup,
    config: &TransportConfig,
    cpu: Option<usize>,
) -> std::io::Result<RxWorker> {
    let (evt_tx, evt_rx) = ring::channel(WORKER_RING);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let config = config.clone();
    let (id, socket) = stream;
    // Wake up now and then to notice a stop request.
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut inbound = setup.inbound(id);
    let fence = setup.fence.clone();
    let thread = WorkerThread::spawn(format!("dwcp-prx{id}"), move || {
        pin(cpu);
        rx_main(
            id,
            socket,
            &mut inbound,
            evt_tx,
            &stop_flag,
            &fence,
            &config,
        );
        // Its parser (a bit per page of memory) is freed once the worker is let go.
        inbound
    })?;
    Ok(RxWorker {
        events: evt_rx,
        thread,
        stop,
    })
}

fn rx_main(
    id: u16,
    socket: TcpStream,
    inbound: &mut Inbound,
    mut events: Producer<RxEvent>,
    stop: &AtomicBool,
    fence: &StreamFence,
    config: &TransportConfig,
) {
    let mut buf = vec![0u8; 256 << 10];
    let mut next_telemetry = Instant::now() + config.telemetry_interval;
    let lost = |why: String, inbound: &Inbound, events: &mut Producer<RxEvent>| {
        let _ = socket.shutdown(std::net::Shutdown::Both);
        push_event(
            events,
            RxEvent::StreamLost {
                stream: id,
                error: why,
                rounds_ended: inbound.rounds_ended(),
            },
        );
    };
    let result: Result<(), RxError> = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        if fence.requested(id) {
            lost("given up by the source".into(), inbound, &mut events);
            return;
        }
        // A sealed stream is read straight into its record buffer.
        let window = inbound.window();
        let sealed = window.is_some();
        let n = match (&socket).read(window.unwrap_or(&mut buf)) {
            // A stream that closes before its end marker is lost, not corrupt: nothing
            // of an unfinished record or frame was placed.
            Ok(0) => match inbound.at_eof() {
                Ok(()) => break Ok(()),
                Err(e) => {
                    lost(e.to_string(), inbound, &mut events);
                    return;
                }
            },
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                lost(
                    RxError::Receive(OsError::from(e)).to_string(),
                    inbound,
                    &mut events,
                );
                return;
            }
        };
        let mut announced = Vec::new();
        let taken = if sealed {
            inbound.filled(n, &mut |e| announced.push(e))
        } else {
            inbound.feed(&buf[..n], &mut |e| announced.push(e))
        };
        if let Err(e) = taken {
            break Err(e.into());
        }
        for e in announced {
            push_event(
                &mut events,
                RxEvent::from_stream(id, e, inbound.counters().bytes),
            );
        }
        if Instant::now() >= next_telemetry {
            next_telemetry = Instant::now() + config.telemetry_interval;
            push_event(
                &mut events,
                RxEvent::Telemetry {
                    stream: id,
                    wire_bytes: inbound.wire_bytes(),
                    bytes: inbound.counters().bytes,
                    pages: inbound.counters().pages(),
                },
            );
        }
    };
    if let Err(error) = result {
        let _ = socket.shutdown(std::net::Shutdown::Both);
        push_event(&mut events, RxEvent::Failed { stream: id, error });
    }
}
