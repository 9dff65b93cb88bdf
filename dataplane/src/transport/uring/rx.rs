//! The receive side: a multishot `RECV` per stream into the stream's own provided
//! buffer ring, each completion parsed at once and its buffer given back; for a sealed
//! stream, one `RECV` at a time into its record buffer.

use super::buffers::ProvidedBuffers;
use super::{new_ring, shutdown, start_worker, wait_cqe};
use crate::ring::{self, Producer};
use crate::transport::{
    Inbound, OsError, RxError, RxEvent, RxSetup, RxWorker, Starting, StreamFence, TransportConfig,
    WORKER_RING, push_event,
};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct RxStream {
    id: u16,
    socket: TcpStream,
    inbound: Inbound,
    /// The stream's provided-buffer ring; `None` for a sealed stream, whose records
    /// are read straight into its record buffer (one single-shot receive at a time).
    buffers: Option<ProvidedBuffers>,
    armed: bool,
    eof: bool,
    /// Lost: its socket failed or closed early, or the coordinator asked for it to
    /// stop. Nothing that arrives on it is placed any more.
    stopped: bool,
    reported_bytes: u64,
}

impl RxStream {
    /// Stop the stream (see [`RxEvent::StreamLost`]): its armed receive completes once
    /// the socket is shut, and whatever it brings is dropped.
    fn stop(&mut self, why: String, events: &mut Producer<RxEvent>) {
        self.stopped = true;
        shutdown(&self.socket);
        push_event(
            events,
            RxEvent::StreamLost {
                stream: self.id,
                error: why,
                rounds_ended: self.inbound.rounds_ended(),
            },
        );
    }
}

/// Start a destination worker on io_uring for `streams`. As on the send side, the ring
/// and its buffer rings are set up on the worker's thread, while the caller goes on.
pub fn start_rx(
    worker: usize,
    streams: Vec<(u16, TcpStream)>,
    rx_setup: RxSetup,
    config: &TransportConfig,
    cpu: Option<usize>,
) -> std::io::Result<Starting<RxWorker>> {
    let (evt_tx, evt_rx) = ring::channel(WORKER_RING);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let fence = rx_setup.fence.clone();
    let config = config.clone();
    let setup_config = config.clone();
    let setup = move || -> std::io::Result<(IoUring, Vec<RxStream>)> {
        let ring = new_ring()?;
        let mut rx = Vec::with_capacity(streams.len());
        for (local, (id, socket)) in streams.into_iter().enumerate() {
            let mut inbound = rx_setup.inbound(id);
            let buffers = if inbound.window().is_some() {
                None
            } else {
                let mut buffers = ProvidedBuffers::new(
                    &ring,
                    local as u16,
                    setup_config.recv_buffers_per_stream.next_power_of_two(),
                    setup_config.recv_buffer,
                )?;
                buffers.provide_all();
                Some(buffers)
            };
            rx.push(RxStream {
                id,
                socket,
                inbound,
                buffers,
                armed: false,
                eof: false,
                stopped: false,
                reported_bytes: 0,
            });
        }
        Ok((ring, rx))
    };
    let (thread, ready) =
        start_worker(format!("dwcp-rx{worker}"), cpu, setup, move |(ring, rx)| {
            rx_main(ring, rx, evt_tx, &stop_flag, &fence, &config)
        })?;
    Ok(Starting::setting_up(
        RxWorker {
            events: evt_rx,
            thread,
            stop,
        },
        ready,
    ))
}

/// The worker's life; returns its streams (with their buffers) and its ring, to be
/// freed in that order once the worker is let go.
fn rx_main(
    mut ring: IoUring,
    mut streams: Vec<RxStream>,
    mut events: Producer<RxEvent>,
    stop: &AtomicBool,
    fence: &StreamFence,
    config: &TransportConfig,
) -> (Vec<RxStream>, IoUring) {
    let mut in_flight = 0usize;
    let failure = rx_loop(
        &mut ring,
        &mut streams,
        &mut events,
        stop,
        fence,
        config,
        &mut in_flight,
    )
    .err();
    if let Some((stream, error)) = failure {
        push_event(&mut events, RxEvent::Failed { stream, error });
    }
    // Teardown: shut the sockets so every armed receive completes, drain, then
    // unregister the buffer rings before their memory goes.
    for st in &streams {
        shutdown(&st.socket);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight > 0 && Instant::now() < deadline {
        let _ = wait_cqe(&ring, Duration::from_millis(10));
        let cqes: Vec<u32> = ring.completion().map(|c| c.flags()).collect();
        for flags in cqes {
            if !cqueue::more(flags) {
                in_flight -= 1;
            }
        }
    }
    if in_flight > 0 {
        eprintln!("dwcp-rx: {in_flight} receives did not complete; leaking their buffers");
        for st in streams.drain(..) {
            std::mem::forget(st);
        }
    }
    for st in &mut streams {
        if let Some(buffers) = &mut st.buffers {
            buffers.unregister(&ring);
        }
    }
    (streams, ring)
}

fn rx_loop(
    ring: &mut IoUring,
    streams: &mut [RxStream],
    events: &mut Producer<RxEvent>,
    stop: &AtomicBool,
    fence: &StreamFence,
    config: &TransportConfig,
    in_flight: &mut usize,
) -> Result<(), (u16, RxError)> {
    let mut idle = 0u32;
    let mut next_telemetry = Instant::now() + config.telemetry_interval;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        for st in streams.iter_mut() {
            if !st.stopped && !st.inbound.is_ended() && fence.requested(st.id) {
                st.stop("given up by the source".into(), events);
            }
        }
        // Arm a receive on every stream that needs one (multishot into provided
        // buffers, or single-shot into a sealed stream's record window).
        let mut armed_any = false;
        for (i, st) in streams.iter_mut().enumerate() {
            if st.armed || st.eof || st.stopped {
                continue;
            }
            let fd = types::Fd(st.socket.as_raw_fd());
            let recv = match st.inbound.window() {
                Some(window) => opcode::Recv::new(fd, window.as_mut_ptr(), window.len() as u32)
                    .build()
                    .user_data(i as u64),
                None => opcode::RecvMulti::new(fd, i as u16)
                    .build()
                    .user_data(i as u64)
                    .flags(squeue::Flags::empty()),
            };
            // SAFETY: the kernel fills buffers of `st.buffers`, or the window of the
            // stream's record buffer, which is neither moved nor freed until this
            // request's final completion: only completions change it, and teardown
            // drains every request before the streams go (see rx_main).
            unsafe { ring.submission().push(&recv) }
                .map_err(|_| (st.id, RxError::SubmissionQueueFull))?;
            st.armed = true;
            *in_flight += 1;
            armed_any = true;
        }
        if armed_any {
            ring.submit().map_err(|e| {
                (
                    0,
                    RxError::Ring {
                        op: "io_uring_enter",
                        error: e.into(),
                    },
                )
            })?;
        }
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        let progress = !cqes.is_empty();
        // Account for every completion first: teardown waits for exactly the receives
        // still armed, whatever the loop below decides.
        for &(user_data, _, flags) in &cqes {
            if !cqueue::more(flags) {
                streams[user_data as usize].armed = false;
                *in_flight -= 1;
            }
        }
        for (user_data, result, flags) in cqes {
            let st = &mut streams[user_data as usize];
            if result == -libc::ENOBUFS {
                // Every buffer of this stream was in use at that instant; they are
                // given back as they are parsed, so re-arming is enough.
                continue;
            }
            if st.stopped {
                // Whatever a stopped stream still brings is dropped.
                if result > 0
                    && let (Some(buffers), Some(bid)) =
                        (&mut st.buffers, cqueue::buffer_select(flags))
                {
                    buffers.give_back(bid);
                }
                continue;
            }
            if result < 0 {
                let error = RxError::Receive(OsError::from_errno(-result));
                st.stop(error.to_string(), events);
                continue;
            }
            if result == 0 {
                st.eof = true;
                st.armed = false;
                // A stream that closes before its end marker is lost, not corrupt:
                // nothing of an unfinished record or frame was placed.
                if let Err(e) = st.inbound.at_eof() {
                    st.stop(e.to_string(), events);
                }
                continue;
            }
            let id = st.id;
            let mut announced = Vec::new();
            match &mut st.buffers {
                None => st
                    .inbound
                    .filled(result as usize, &mut |e| announced.push(e))
                    .map_err(|e| (id, e.into()))?,
                Some(buffers) => {
                    let Some(bid) = cqueue::buffer_select(flags) else {
                        return Err((id, RxError::NoBuffer));
                    };
                    let data = buffers.buffer(bid, result as usize);
                    let parsed = st.inbound.feed(data, &mut |e| announced.push(e));
                    buffers.give_back(bid);
                    parsed.map_err(|e| (id, e.into()))?;
                }
            }
            for e in announced {
                push_event(
                    events,
                    RxEvent::from_stream(id, e, st.inbound.counters().bytes),
                );
            }
        }
        if streams.iter().all(|st| st.inbound.is_ended() || st.stopped) {
            return Ok(());
        }
        if Instant::now() >= next_telemetry {
            next_telemetry = Instant::now() + config.telemetry_interval;
            for st in streams.iter_mut().filter(|st| !st.stopped) {
                let wire_bytes = st.inbound.wire_bytes();
                if wire_bytes != st.reported_bytes {
                    st.reported_bytes = wire_bytes;
                    push_event(
                        events,
                        RxEvent::Telemetry {
                            stream: st.id,
                            wire_bytes,
                            bytes: st.inbound.counters().bytes,
                            pages: st.inbound.counters().pages(),
                        },
                    );
                }
            }
        }
        if progress {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < config.idle.spin {
            std::hint::spin_loop();
        } else {
            wait_cqe(ring, config.idle.park.max(Duration::from_millis(1))).map_err(|e| {
                (
                    0,
                    RxError::Ring {
                        op: "io_uring wait",
                        error: e.into(),
                    },
                )
            })?;
        }
    }
}
