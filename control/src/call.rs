//! How the threads around the control thread reach it: a request with the channel its
//! answer goes to ([`Call`], [`call`]), and the counters the socket server keeps for
//! the control thread's metrics ([`ServerCounters`]). The daemon, the socket server and
//! the metrics listener all depend on this; it depends on none of them.

use crossbeam::channel::{Sender, bounded};
use dwcp_api::{Request, Response};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// A request and where its response goes.
pub type Call = (Request, Sender<Response>);

/// Send a call to the control thread and wait for the answer, at most `timeout` for
/// each of the two.
pub fn call(calls: &Sender<Call>, request: Request, timeout: Duration) -> Response {
    let (tx, rx) = bounded(1);
    if calls.send_timeout((request, tx), timeout).is_err() {
        return Response::error("the control thread is not answering");
    }
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| Response::error("the control thread did not answer in time"))
}

/// Counted by the socket server, read by the control thread for metrics.
#[derive(Default)]
pub struct ServerCounters {
    /// Connections turned away (too many clients, wrong peer).
    pub refused: AtomicU64,
    /// Requests answered with an error before reaching the control thread.
    pub bad_requests: AtomicU64,
    /// Clients that sent nothing before the timeout.
    pub timeouts: AtomicU64,
}
