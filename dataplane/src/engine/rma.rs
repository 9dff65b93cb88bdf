//! Setting up a session's RMA connections ([`caps::RMA`]), once its data streams are
//! open: the destination listens through its best libfabric provider and offers the
//! address with a token ([`ControlMessage::RmaOffer`]); the source connects one
//! connection per data stream, presenting the token and the stream's id; for each,
//! the destination registers guest memory and answers with the window
//! ([`ControlMessage::RmaWindow`]), which the source checks against its memory before
//! it writes anything. See `transport::rma` for how pages then move.
//!
//! A source that cannot connect says so ([`ControlMessage::RmaDeclined`], which the
//! destination answers in kind) and the session goes on with pages as frames; a window
//! that does not cover the guest's memory fails the session before a byte is written.

use super::MigrationError;
use super::handshake::{ControlChannel, control_error, io, random_session_id};
use crate::memory::GuestMemory;
use crate::transport::fabric::{self, Connection, Listener, RemoteRegion};
use crate::transport::rma::{RmaLink, RmaPool, RmaTargets, best_provider};
use crate::wire::{ControlMessage, WireError, caps};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Which sessions may write pages by RMA into this destination's memory. RMA bytes
/// travel outside the session's sealed records (no provider encrypts them), so an
/// authenticated session gets RMA only where the operator says the fabric is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RmaAdmission {
    /// None.
    Never,
    /// Plain sessions (`--insecure`), whose bytes are in the clear anyway.
    #[default]
    PlainSessions,
    /// Authenticated sessions too: the fabric between the appliances is trusted.
    Always,
}

/// The connection data a source presents: the session's token, then its stream id.
fn connection_data(token: &[u8; 16], stream: u16) -> [u8; 18] {
    let mut data = [0u8; 18];
    data[..16].copy_from_slice(token);
    data[16..].copy_from_slice(&stream.to_le_bytes());
    data
}

/// Whether the destination grants RMA to a session: asked for, admitted, and a
/// provider here. The reason when it does not, for its log.
pub(super) fn admit(
    asked: u64,
    authenticated: bool,
    admission: RmaAdmission,
) -> Result<(), String> {
    if asked & caps::RMA == 0 {
        return Err("not asked for".into());
    }
    match admission {
        RmaAdmission::Never => return Err("RMA is off on this destination".into()),
        RmaAdmission::PlainSessions if authenticated => {
            return Err(
                "RMA bytes would travel unencrypted in an authenticated session \
                 ([security] rma_in_clear = true allows it on a trusted fabric)"
                    .into(),
            );
        }
        _ => {}
    }
    best_provider().map(|_| ()).map_err(|e| e.to_string())
}

/// The source's side: connect one RMA connection per stream and check each window.
/// `Ok(None)`: the source could not connect (it told the destination; pages go as
/// frames), with the reason in `notes`.
pub(super) fn connect(
    control: &mut ControlChannel,
    peer: SocketAddr,
    memory: &Arc<GuestMemory>,
    streams: u16,
    timeout: Duration,
    notes: &mut Vec<String>,
) -> Result<Option<Arc<RmaPool>>, MigrationError> {
    let (provider, port, token) = match control.recv() {
        Ok(ControlMessage::RmaOffer {
            provider,
            port,
            token,
        }) => (provider, port, token),
        Ok(ControlMessage::Refused { reason })
        | Ok(ControlMessage::Abort {
            message: reason, ..
        }) => {
            return Err(MigrationError::Refused(reason));
        }
        Ok(other) => {
            return Err(
                WireError::Unexpected(format!("{other:?} where an RMA offer was due")).into(),
            );
        }
        Err(e) => return Err(control_error(e, "waiting for the destination's RMA offer")),
    };
    let at = SocketAddr::new(peer.ip(), port);
    let mut links = Vec::with_capacity(usize::from(streams));
    for stream in 0..streams {
        let data = connection_data(&token, stream);
        let connected = Connection::connect_with(&provider, at, &data, timeout).and_then(|c| {
            // A frame may follow its writes only once they are in place: a provider
            // that cannot say so is not used (pages go as frames).
            if !c.delivers_complete() {
                return Err(fabric::FabricError::Protocol(format!(
                    "the {provider} provider cannot report delivery (FI_DELIVERY_COMPLETE)"
                )));
            }
            // SAFETY: the guest memory stays mapped while the pool lives (the session
            // holds both, and drops the pool with its workers); it is only read through
            // this registration, by writes from it.
            let local = unsafe { c.register(memory.as_ptr(), memory.len()) }?;
            Ok((c, local))
        });
        let (connection, local) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                let reason = format!(
                    "RMA through {provider} to {at}: stream {stream} could not be set up: {e}"
                );
                decline(control, &reason)?;
                notes.push(format!("{reason}; pages go as frames"));
                return Ok(None);
            }
        };
        let window = match control.recv() {
            Ok(ControlMessage::RmaWindow {
                stream: s,
                base,
                len,
                key,
            }) if s == stream => RemoteRegion { base, len, key },
            Ok(ControlMessage::Abort { message, .. }) => {
                return Err(MigrationError::Refused(message));
            }
            Ok(other) => {
                return Err(WireError::Unexpected(format!(
                    "{other:?} where stream {stream}'s RMA window was due"
                ))
                .into());
            }
            Err(e) => return Err(control_error(e, "waiting for an RMA window")),
        };
        if window.len < memory.len() as u64 {
            let reason = format!(
                "the destination's RMA window for stream {stream} is {} bytes, smaller than \
                 the guest's memory ({} bytes): refused before writing",
                window.len,
                memory.len()
            );
            let _ = control.send(&ControlMessage::Abort {
                reason: crate::wire::AbortReason::ProtocolError,
                message: reason.clone(),
            });
            return Err(MigrationError::Refused(reason));
        }
        links.push(RmaLink::new(stream, connection, local, shifted(window)));
    }
    let info = fabric::providers()
        .ok()
        .and_then(|list| list.into_iter().find(|p| p.provider == provider))
        .unwrap_or(fabric::ProviderInfo {
            provider: provider.clone(),
            fabric: String::new(),
            domain: String::new(),
            link_speed: None,
        });
    Ok(Some(RmaPool::new(links, info)))
}

/// Tell the destination the source will not write by RMA, and wait for its answer: a
/// window it sent meanwhile (for a connection it took before ours gave up) is passed
/// over, so that the session's messages start cleanly after the exchange.
fn decline(control: &mut ControlChannel, reason: &str) -> Result<(), MigrationError> {
    control
        .send(&ControlMessage::RmaDeclined {
            reason: reason.to_string(),
        })
        .map_err(io("declining RMA"))?;
    loop {
        match control.recv() {
            Ok(ControlMessage::RmaDeclined { .. }) => return Ok(()),
            Ok(ControlMessage::RmaWindow { .. }) => {}
            Ok(ControlMessage::Abort { message, .. }) => {
                return Err(MigrationError::Refused(message));
            }
            Ok(other) => {
                return Err(WireError::Unexpected(format!(
                    "{other:?} where the answer to declining RMA was due"
                ))
                .into());
            }
            Err(e) => return Err(control_error(e, "declining RMA")),
        }
    }
}

/// Test-only (`DWCP_TEST_RMA_REMOTE_SHIFT=BYTES`): the window as if it started that
/// many bytes later, so that writes near its end fall outside what the destination
/// registered and its provider refuses them.
fn shifted(window: RemoteRegion) -> RemoteRegion {
    match std::env::var("DWCP_TEST_RMA_REMOTE_SHIFT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(shift) => RemoteRegion {
            base: window.base + shift,
            ..window
        },
        None => window,
    }
}

/// The destination's side: listen, offer, take one connection per stream (each with
/// the token), register `memory` on each and send its window. `Ok(None)`: the source
/// declined (pages come as frames).
pub(super) fn offer(
    control: &mut ControlChannel,
    memory: &Arc<GuestMemory>,
    streams: u16,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Option<RmaTargets>, MigrationError> {
    let failed = |e: fabric::FabricError| MigrationError::Transport(format!("RMA: {e}"));
    let provider = best_provider().map_err(failed)?;
    // Guest memory is faulted in before the source may write into it, as registering
    // it on RDMA hardware does anyway (verbs pins every page). Left to first touch, the
    // `tcp` provider faults pages in inside its receive, the socket backs up, and
    // loopback drops segments: runs stalled for a second of retransmissions (measured:
    // 1.0-1.4 s of delivery wait in two of five 256 MiB migrations, none once
    // populated). Content is kept (a VM's RAM file, a resumed session's memory).
    memory.populate();
    let local = control
        .local_addr()
        .map_err(io("the control stream's address"))?;
    let listener =
        Listener::bind(&provider.provider, SocketAddr::new(local.ip(), 0)).map_err(failed)?;
    let token = random_session_id().to_le_bytes();
    // Test-only (`DWCP_TEST_RMA_OFFER_PORT`): offer a port nobody listens on.
    let port = std::env::var("DWCP_TEST_RMA_OFFER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(listener.local_addr().port());
    control
        .send(&ControlMessage::RmaOffer {
            provider: provider.provider.clone(),
            port,
            token,
        })
        .map_err(io("sending the RMA offer"))?;
    let mut targets = RmaTargets::new(provider, streams);
    let deadline = Instant::now() + timeout;
    let mut next = 0u16;
    let mut refused = 0u32;
    while next < streams {
        if Instant::now() > deadline {
            return Err(MigrationError::Transport(format!(
                "{next} of {streams} RMA connections arrived within {timeout:?} \
                 ({refused} presented no valid token)"
            )));
        }
        // A source that could not connect says so on the control stream.
        if control.wait_readable(Instant::now() + Duration::from_millis(1), cancel)? {
            return match control.recv() {
                Ok(ControlMessage::RmaDeclined { reason }) => {
                    eprintln!("dwcp: the source declined RMA: {reason}");
                    control
                        .send(&ControlMessage::RmaDeclined {
                            reason: "pages as frames, then".into(),
                        })
                        .map_err(io("answering the RMA decline"))?;
                    Ok(None)
                }
                Ok(ControlMessage::Abort { message, .. }) => Err(MigrationError::Aborted {
                    reason: format!("source aborted: {message}"),
                    rounds: 0,
                }),
                Ok(other) => Err(WireError::Unexpected(format!(
                    "{other:?} while RMA connections were due"
                ))
                .into()),
                Err(e) => Err(control_error(e, "setting up RMA")),
            };
        }
        let request = match listener.request(Duration::from_millis(50)) {
            Ok(r) => r,
            Err(fabric::FabricError::TimedOut(..)) => continue,
            Err(e) => return Err(failed(e)),
        };
        if request.data() != connection_data(&token, next) {
            refused += 1;
            request.reject();
            continue;
        }
        let connection = request.accept(timeout).map_err(failed)?;
        // SAFETY: the session keeps `memory` (an Arc) beyond the targets, which it
        // closes before it ends; the source writes a page only as the protocol says
        // (see `transport::rma`), and the parser checks each against its frame.
        let mut window = unsafe { targets.add(next, connection, memory) }.map_err(failed)?;
        if let Some(len) = std::env::var("DWCP_TEST_RMA_WINDOW_BYTES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Test-only: advertise a window smaller than memory.
            window.len = window.len.min(len);
        }
        control
            .send(&ControlMessage::RmaWindow {
                stream: next,
                base: window.base,
                len: window.len,
                key: window.key,
            })
            .map_err(io("sending an RMA window"))?;
        next += 1;
    }
    Ok(Some(targets))
}
