//! Plain blocking sockets: the fallback when io_uring or an opcode it needs is missing.
//! One thread per stream (a blocking write on one stream must not stall another);
//! the same frames, parser and events as the io_uring transport.

use super::frames::{FrameParser, stage_marker, stage_run, stage_space};
use super::{
    RxEvent, RxWorker, StreamTelemetry, TransportConfig, TxCommand, TxEvent, TxWorker, WORKER_RING,
    pin, push_event,
};
use crate::dirty::SentCrcs;
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
    memory: Arc<GuestMemory>,
    sent: Option<Arc<SentCrcs>>,
    config: &TransportConfig,
    cpu: Option<usize>,
) -> std::io::Result<TxWorker> {
    let (cmd_tx, cmd_rx) = ring::channel(WORKER_RING);
    let (evt_tx, evt_rx) = ring::channel(WORKER_RING);
    let config = config.clone();
    let handle = std::thread::Builder::new()
        .name(format!("dwcp-ptx{worker}"))
        .spawn(move || {
            pin(cpu);
            tx_main(worker, stream, &memory, sent, cmd_rx, evt_tx, &config);
        })?;
    Ok(TxWorker {
        commands: cmd_tx,
        events: evt_rx,
        thread: handle.thread().clone(),
        handle: Some(handle),
    })
}

fn tx_main(
    worker: usize,
    (id, mut socket): (u16, TcpStream),
    memory: &GuestMemory,
    sent: Option<Arc<SentCrcs>>,
    mut commands: Consumer<TxCommand>,
    mut events: Producer<TxEvent>,
    config: &TransportConfig,
) {
    let mut buf = vec![
        0u8;
        config
            .send_buffer
            .max(stage_space(crate::wire::MAX_RUN_PAGES) * 2)
    ];
    let mut len = 0usize;
    let (mut zero, mut raw, mut bytes_in_round) = (0u64, 0u64, 0u64);
    let (mut bytes, mut pages, mut round_pages) = (0u64, 0u64, 0u32);
    let mut idle = 0u32;
    let mut next_telemetry = Instant::now() + config.telemetry_interval;
    let flush = |socket: &mut TcpStream, buf: &[u8], bytes: &mut u64| -> Result<(), String> {
        socket
            .write_all(buf)
            .map_err(|e| format!("stream {id}: send failed: {e}"))?;
        *bytes += buf.len() as u64;
        Ok(())
    };
    let result: Result<(), String> = (|| loop {
        let Some(cmd) = commands.pop() else {
            if len > 0 {
                flush(&mut socket, &buf[..len], &mut bytes)?;
                len = 0;
            }
            if commands.is_abandoned() {
                return Err("engine went away".into());
            }
            idle += 1;
            if idle < config.idle.spin {
                std::hint::spin_loop();
            } else {
                std::thread::park_timeout(config.idle.park);
            }
            if Instant::now() >= next_telemetry {
                next_telemetry = Instant::now() + config.telemetry_interval;
                push_event(
                    &mut events,
                    TxEvent::Telemetry(StreamTelemetry {
                        stream: id,
                        bytes,
                        pages,
                        tcp: socket::tcp_info(&socket),
                    }),
                );
            }
            continue;
        };
        idle = 0;
        match cmd {
            TxCommand::Pages { first, count, .. } => {
                if buf.len() - len < stage_space(count) {
                    flush(&mut socket, &buf[..len], &mut bytes)?;
                    len = 0;
                }
                let staged = stage_run(memory, first, count, &mut buf[len..], sent.as_deref());
                len += staged.bytes;
                zero += u64::from(staged.zero_pages);
                raw += u64::from(staged.raw_pages);
                bytes_in_round += staged.bytes as u64;
                round_pages += count;
                pages += u64::from(count);
            }
            TxCommand::EndRound { round } => {
                if buf.len() - len < FRAME_HEADER_LEN {
                    flush(&mut socket, &buf[..len], &mut bytes)?;
                    len = 0;
                }
                len += stage_marker(FrameHeader::round_end(round, round_pages), &mut buf[len..]);
                round_pages = 0;
                flush(&mut socket, &buf[..len], &mut bytes)?;
                len = 0;
                push_event(
                    &mut events,
                    TxEvent::RoundSent {
                        worker,
                        round,
                        zero_pages: std::mem::take(&mut zero),
                        raw_pages: std::mem::take(&mut raw),
                        bytes: std::mem::take(&mut bytes_in_round) + FRAME_HEADER_LEN as u64,
                    },
                );
            }
            TxCommand::Finish => {
                if buf.len() - len < FRAME_HEADER_LEN {
                    flush(&mut socket, &buf[..len], &mut bytes)?;
                    len = 0;
                }
                len += stage_marker(FrameHeader::stream_end(), &mut buf[len..]);
                flush(&mut socket, &buf[..len], &mut bytes)?;
                let _ = socket.shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
        }
    })();
    match result {
        Ok(()) => push_event(
            &mut events,
            TxEvent::Finished {
                worker,
                zc_copied: 0,
                zc_sends: 0,
                zc_fell_back: false,
            },
        ),
        Err(error) => {
            let _ = socket.shutdown(std::net::Shutdown::Both);
            push_event(&mut events, TxEvent::Failed { worker, error });
        }
    }
}

/// Start a destination worker for one stream.
pub fn spawn_rx(
    stream: (u16, TcpStream),
    total_streams: u16,
    memory: Arc<GuestMemory>,
    memory_is_fresh: bool,
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
    let parser = FrameParser::new(memory, id, total_streams, memory_is_fresh);
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
