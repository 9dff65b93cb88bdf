//! Plain blocking sockets: the fallback when io_uring or an opcode it needs is missing.
//! One thread per stream (a blocking write on one stream must not stall another);
//! the same frames, parser and events as the io_uring transport.

use super::frames::{FrameParser, stage_marker, stage_run, stage_space};
use super::{
    CONTROL_RING, IdleStrategy, RxEvent, RxSetup, RxWorker, StreamTelemetry, TransportConfig,
    TxCommand, TxControl, TxEvent, TxSetup, TxWorker, WORKER_RING, WorkerTelemetry, pin,
    push_event,
};
use crate::codec::{CodecSetup, StreamCodec, WorkerCodec};
use crate::crc_table::CrcTable;
use crate::memory::GuestMemory;
use crate::ring::{self, Consumer, Producer};
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
    let handle = std::thread::Builder::new()
        .name(format!("dwcp-ptx{worker}"))
        .spawn(move || {
            pin(cpu);
            PlainTx::new(worker, stream, setup, &config).run(cmd_rx, ctl_rx, evt_tx, &config);
        })?;
    Ok(TxWorker {
        commands: cmd_tx,
        control: ctl_tx,
        events: evt_rx,
        thread: handle.thread().clone(),
        handle: Some(handle),
    })
}

/// A source worker's state: one stream, one buffer written with blocking sends.
struct PlainTx {
    worker: usize,
    id: u16,
    socket: TcpStream,
    memory: Arc<GuestMemory>,
    table: Arc<CrcTable>,
    buf: Vec<u8>,
    /// Bytes waiting in `buf`.
    len: usize,
    /// Send once this much is buffered.
    send_size: usize,
    codec: Option<(WorkerCodec, StreamCodec, CodecSetup)>,
    round_zero: u64,
    round_content: u64,
    round_bytes: u64,
    round_pages: u32,
    bytes: u64,
    pages: u64,
    staged_bytes: u64,
    stage_nanos: u64,
    /// Time spent in blocking sends.
    send_nanos: u64,
    /// How the worker waits when idle (the engine may change it).
    idle: IdleStrategy,
}

impl PlainTx {
    fn new(
        worker: usize,
        (id, socket): (u16, TcpStream),
        setup: TxSetup,
        config: &TransportConfig,
    ) -> Self {
        let TxSetup {
            memory,
            table,
            codec,
        } = setup;
        let send_size = config
            .send_buffer
            .max(stage_space(crate::wire::MAX_RUN_PAGES) * 2);
        let capacity =
            send_size + codec.as_ref().map_or(0, |c| c.max_flush_len()) + FRAME_HEADER_LEN;
        PlainTx {
            worker,
            id,
            socket,
            memory,
            table,
            buf: vec![0u8; capacity],
            len: 0,
            send_size,
            codec: codec.map(|setup| {
                let mut worker_codec = WorkerCodec::new();
                worker_codec.set_settings(setup.permit(setup.initial), std::iter::empty());
                (worker_codec, StreamCodec::for_setup(&setup), setup)
            }),
            round_zero: 0,
            round_content: 0,
            round_bytes: 0,
            round_pages: 0,
            bytes: 0,
            pages: 0,
            staged_bytes: 0,
            stage_nanos: 0,
            send_nanos: 0,
            idle: config.idle,
        }
    }

    /// Send what is buffered.
    fn send(&mut self) -> Result<(), String> {
        if self.len == 0 {
            return Ok(());
        }
        let started = Instant::now();
        self.socket
            .write_all(&self.buf[..self.len])
            .map_err(|e| format!("stream {}: send failed: {e}", self.id))?;
        self.send_nanos += started.elapsed().as_nanos() as u64;
        self.bytes += self.len as u64;
        self.len = 0;
        Ok(())
    }

    /// Make room for `need` more bytes, sending first if the buffer is full enough.
    fn room(&mut self, need: usize) -> Result<(), String> {
        if self.len > 0 && (self.len + need > self.buf.len() || self.len + need > self.send_size) {
            self.send()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), String> {
        let need = match &self.codec {
            Some((codec, batch, _)) if batch.pending() > 0 => codec.flush_bound(batch),
            _ => return Ok(()),
        };
        self.room(need)?;
        let (codec, batch, _) = self.codec.as_mut().expect("checked above");
        let n = codec.flush(batch, &mut self.buf[self.len..]);
        self.len += n;
        self.round_bytes += n as u64;
        Ok(())
    }

    fn coding(&self) -> bool {
        self.codec
            .as_ref()
            .is_some_and(|(c, _, _)| !c.settings().is_off())
    }

    fn pages(&mut self, first: u64, count: u32) -> Result<(), String> {
        if self.coding() {
            let full = self
                .codec
                .as_ref()
                .is_some_and(|(codec, batch, _)| codec.batch_full(batch, count));
            if full {
                self.flush_batch()?;
            }
            let (codec, batch, _) = self.codec.as_mut().expect("coding");
            let recorder = Some(self.table.recorder(self.id));
            let run = codec.encode_run(batch, &self.memory, first, count, recorder);
            self.round_zero += u64::from(run.zero_pages);
            self.round_content += u64::from(run.content_pages);
        } else {
            self.room(stage_space(count))?;
            let started = Instant::now();
            let staged = stage_run(
                &self.memory,
                first,
                count,
                &mut self.buf[self.len..],
                Some(self.table.recorder(self.id)),
            );
            self.len += staged.bytes;
            self.round_zero += u64::from(staged.zero_pages);
            self.round_content += u64::from(staged.raw_pages);
            self.round_bytes += staged.bytes as u64;
            self.staged_bytes += staged.bytes as u64;
            self.stage_nanos += started.elapsed().as_nanos() as u64;
        }
        self.round_pages += count;
        self.pages += u64::from(count);
        Ok(())
    }

    fn marker(&mut self, header: FrameHeader) -> Result<(), String> {
        self.flush_batch()?;
        self.room(FRAME_HEADER_LEN)?;
        self.len += stage_marker(header, &mut self.buf[self.len..]);
        self.round_bytes += FRAME_HEADER_LEN as u64;
        self.send()
    }

    /// The stream's counters, as an event.
    fn stream_telemetry(&self) -> TxEvent {
        TxEvent::Telemetry(StreamTelemetry {
            stream: self.id,
            bytes: self.bytes,
            pages: self.pages,
            tcp: socket::tcp_info(&self.socket),
        })
    }

    fn telemetry(&self) -> WorkerTelemetry {
        WorkerTelemetry::new(
            self.worker,
            self.codec.as_ref().map(|(c, _, _)| c),
            self.staged_bytes,
            self.stage_nanos,
            self.send_nanos,
        )
    }

    fn apply(&mut self, change: TxControl) -> Result<(), String> {
        match change {
            TxControl::SetCodec(settings) => {
                // Batches made under the old settings go out first.
                self.flush_batch()?;
                if let Some((codec, batch, setup)) = &mut self.codec {
                    codec.set_settings(setup.permit(settings), std::iter::once(batch));
                }
            }
            TxControl::SetDictionary(dictionary) => {
                if let Some((codec, _, _)) = &mut self.codec {
                    codec.set_dictionary(Some(dictionary));
                }
            }
            TxControl::SetIdle(idle) => self.idle = idle,
            // Plain sockets always copy.
            TxControl::SetZeroCopy(_) => {}
            TxControl::ForgetSentPages => {
                self.flush_batch()?;
                if let Some((_, batch, _)) = &mut self.codec {
                    batch.forget();
                }
            }
        }
        Ok(())
    }

    fn run(
        mut self,
        mut commands: Consumer<TxCommand>,
        mut control: Consumer<TxControl>,
        mut events: Producer<TxEvent>,
        config: &TransportConfig,
    ) {
        let mut idle = 0u32;
        let mut next_telemetry = Instant::now() + config.telemetry_interval;
        let result: Result<(), String> = (|| loop {
            if Instant::now() >= next_telemetry {
                next_telemetry = Instant::now() + config.telemetry_interval;
                push_event(&mut events, TxEvent::Worker(self.telemetry()));
                push_event(&mut events, self.stream_telemetry());
            }
            while let Some(change) = control.pop() {
                self.apply(change)?;
            }
            let Some(cmd) = commands.pop() else {
                // Nothing more to add right now: send what there is.
                self.flush_batch()?;
                self.send()?;
                if commands.is_abandoned() {
                    return Err("engine went away".into());
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
            match cmd {
                TxCommand::Pages { first, count, .. } => self.pages(first, count)?,
                TxCommand::EndRound { round } => {
                    self.marker(FrameHeader::round_end(round, self.round_pages))?;
                    self.round_pages = 0;
                    push_event(
                        &mut events,
                        TxEvent::RoundSent {
                            worker: self.worker,
                            round,
                            zero_pages: std::mem::take(&mut self.round_zero),
                            raw_pages: std::mem::take(&mut self.round_content),
                            bytes: std::mem::take(&mut self.round_bytes),
                        },
                    );
                }
                TxCommand::StreamMap { active } => {
                    self.marker(FrameHeader::stream_map(active))?;
                }
                TxCommand::Finish => {
                    self.marker(FrameHeader::stream_end())?;
                    let _ = self.socket.shutdown(std::net::Shutdown::Write);
                    return Ok(());
                }
                TxCommand::Release => {
                    // Blocking sends: once written, the kernel owns the bytes.
                    self.flush_batch()?;
                    self.send()?;
                    return Ok(());
                }
            }
        })();
        // Final counters, so that whoever carries the stream on counts from them.
        push_event(&mut events, self.stream_telemetry());
        push_event(&mut events, TxEvent::Worker(self.telemetry()));
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
                let _ = self.socket.shutdown(std::net::Shutdown::Both);
                push_event(
                    &mut events,
                    TxEvent::Failed {
                        worker: self.worker,
                        error,
                    },
                );
            }
        }
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
    let parser = setup.parser(id);
    let handle = std::thread::Builder::new()
        .name(format!("dwcp-prx{id}"))
        .spawn(move || {
            pin(cpu);
            rx_main(id, socket, parser, evt_tx, &stop_flag, &config);
        })?;
    Ok(RxWorker {
        events: evt_rx,
        handle: Some(handle),
        stop,
    })
}

fn rx_main(
    id: u16,
    mut socket: TcpStream,
    mut parser: FrameParser,
    mut events: Producer<RxEvent>,
    stop: &AtomicBool,
    config: &TransportConfig,
) {
    let mut buf = vec![0u8; 256 << 10];
    let mut next_telemetry = Instant::now() + config.telemetry_interval;
    let result: Result<(), String> = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let n = match socket.read(&mut buf) {
            Ok(0) if parser.is_ended() => break Ok(()),
            Ok(0) => break Err(crate::wire::WireError::UnexpectedEof("data stream").to_string()),
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
            Err(e) => break Err(format!("receive failed: {e}")),
        };
        let mut announced = Vec::new();
        if let Err(e) = parser.feed(&buf[..n], &mut |e| announced.push(e)) {
            break Err(e.to_string());
        }
        for e in announced {
            push_event(
                &mut events,
                RxEvent::from_stream(id, e, parser.counters().bytes),
            );
        }
        if Instant::now() >= next_telemetry {
            next_telemetry = Instant::now() + config.telemetry_interval;
            push_event(
                &mut events,
                RxEvent::Telemetry {
                    stream: id,
                    bytes: parser.counters().bytes,
                },
            );
        }
    };
    if let Err(error) = result {
        let _ = socket.shutdown(std::net::Shutdown::Both);
        push_event(&mut events, RxEvent::Failed { stream: id, error });
    }
}
