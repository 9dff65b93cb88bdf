//! What this kernel's io_uring offers, found by asking it and by trying what the
//! receive path needs.

use super::buffers::ProvidedBuffers;
use io_uring::{IoUring, cqueue, opcode, types};
use std::os::fd::AsRawFd;

/// What this kernel's io_uring offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringCaps {
    /// Operations found by `IORING_REGISTER_PROBE` and by trying them.
    pub ops: Vec<&'static str>,
    /// `SEND_ZC` is available.
    pub send_zc: bool,
}

/// Probe io_uring: a ring, the opcodes, and a real multishot receive into a provided
/// buffer ring over a socket pair (what the receive path needs, tested end to end).
pub fn probe() -> Result<UringCaps, String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    let mut ops = Vec::new();
    for (code, name) in [
        (opcode::Send::CODE, "SEND"),
        (opcode::SendZc::CODE, "SEND_ZC"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if probe.is_supported(code) {
            ops.push(name);
        }
    }
    for needed in ["SEND", "RECV"] {
        if !ops.contains(&needed) {
            return Err(format!("opcode {needed} not supported"));
        }
    }
    let send_zc = ops.contains(&"SEND_ZC");
    drop(ring);
    probe_multishot_recv()?;
    ops.push("RECV_MULTISHOT");
    ops.push("PBUF_RING");
    Ok(UringCaps { ops, send_zc })
}

fn probe_multishot_recv() -> Result<(), String> {
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let mut ring = IoUring::new(8).map_err(|e| e.to_string())?;
    let mut bufs =
        ProvidedBuffers::new(&ring, 0, 2, 256).map_err(|e| format!("provided buffer ring: {e}"))?;
    bufs.provide_all();
    let recv = opcode::RecvMulti::new(types::Fd(b.as_raw_fd()), 0)
        .build()
        .user_data(1);
    // SAFETY: the buffers the kernel will pick belong to `bufs`, which lives until the
    // request has completed (drained below) and the ring is gone.
    unsafe { ring.submission().push(&recv) }.map_err(|_| "submission queue full".to_string())?;
    ring.submit().map_err(|e| e.to_string())?;
    use std::io::Write;
    (&a).write_all(b"x").map_err(|e| e.to_string())?;
    ring.submit_and_wait(1).map_err(|e| e.to_string())?;
    let cqe = ring.completion().next().ok_or("no completion")?;
    let ok = cqe.result() == 1 && cqueue::buffer_select(cqe.flags()).is_some();
    // Cancel the still-armed multishot and wait for its final completion.
    drop(a);
    let _ = ring.submit_and_wait(1);
    while ring.completion().next().is_some() {}
    drop(ring);
    drop(bufs);
    if ok {
        Ok(())
    } else {
        Err(format!("multishot RECV returned {}", cqe.result()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_finds_what_the_receive_path_needs_or_says_why_not() {
        match super::probe() {
            Ok(caps) => {
                assert!(caps.ops.contains(&"RECV_MULTISHOT"));
                assert!(caps.ops.contains(&"SEND"));
            }
            Err(why) => assert!(!why.is_empty()),
        }
    }
}
