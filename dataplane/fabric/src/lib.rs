//! RMA through libfabric: the one safe layer over the system library (all FFI to it is
//! in this crate; `sys` holds the generated bindings).
//!
//! libfabric gives one RMA code path over its providers: `verbs` (RC queue pairs on
//! InfiniBand/RoCE NICs), `efa`, `shm`, and `tcp`, whose `fi_write` is a real RMA
//! implementation over sockets. What this crate offers is what the RMA transport
//! needs, on connected message endpoints (`FI_EP_MSG`):
//!
//! - [`providers`]: the providers that offer RMA on message endpoints here.
//! - [`Listener`] / [`Connection::connect`]: a connected endpoint, with its own event
//!   queue (connection management) and completion queue.
//! - [`Connection::register`]: memory registered for local reads and remote writes,
//!   its [`RemoteRegion`] (address, key, length) for the peer.
//! - [`Connection::write`]: an RMA write from registered memory here straight into
//!   the peer's registered memory (no staging copy on either side), completed when the
//!   data is delivered into the target's memory (`FI_DELIVERY_COMPLETE`) where the
//!   provider offers it.
//!
//! Built without libfabric (no `libfabric-dev`), the same API answers
//! [`FabricError::Unavailable`] to every way in: nothing that uses it fails to build.
//! `DWCP_NO_LIBFABRIC=1` makes that build on a machine that has libfabric (`cargo
//! check` with it keeps the stub's API in step with the real one).

#[cfg(dwcp_libfabric)]
mod sys;

#[cfg(dwcp_libfabric)]
mod imp;

#[cfg(dwcp_libfabric)]
pub use imp::{Connection, Listener, MemoryRegion, Request};

#[cfg(not(dwcp_libfabric))]
mod stub;

#[cfg(not(dwcp_libfabric))]
pub use stub::{Connection, Listener, MemoryRegion, Request};

use std::time::Duration;

/// Most private data a connection request carries here ([`Connection::connect_with`]):
/// the `tcp` provider allows 256 bytes, verbs through the RDMA CM 56 on a connect.
pub const MAX_CM_DATA: usize = 56;

/// What went wrong, with the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// This build has no libfabric.
    #[error("built without libfabric (install libfabric-dev and rebuild)")]
    Unavailable,
    /// The system's libfabric could not be loaded (it is loaded on first use).
    #[error("libfabric could not be loaded: {0}")]
    NotLoaded(String),
    /// A libfabric call failed.
    #[error("{call}: {message} ({code})")]
    Call {
        /// The call.
        call: &'static str,
        /// libfabric's error code (negative errno or `FI_E*`).
        code: i64,
        /// `fi_strerror`'s text, and the provider's detail where there is one.
        message: String,
    },
    /// No provider matched what was asked.
    #[error("no libfabric provider {0}")]
    NoProvider(String),
    /// Nothing happened in time.
    #[error("{0}: timed out after {1:?}")]
    TimedOut(&'static str, Duration),
    /// The peer or the provider did something this layer does not expect.
    #[error("{0}")]
    Protocol(String),
}

/// A provider that offers RMA on connected message endpoints.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProviderInfo {
    /// The provider (`verbs`, `tcp`, `efa`, ...).
    pub provider: String,
    /// Its fabric (a subnet, an IP network, an RDMA fabric).
    pub fabric: String,
    /// Its domain (a NIC, or an interface for `tcp`).
    pub domain: String,
    /// The NIC's link speed in bits per second, where the provider says.
    pub link_speed: Option<u64>,
}

impl ProviderInfo {
    /// Whether the provider moves data over sockets (`tcp`, `sockets`): RMA semantics,
    /// no RDMA hardware.
    pub fn is_socket_based(&self) -> bool {
        socket_based(&self.provider)
    }
}

/// Whether `provider` moves data over sockets rather than RDMA hardware.
fn socket_based(provider: &str) -> bool {
    // "tcp;ofi_rxm" and the like: a layered provider runs over its core one. `net` is
    // the socket provider libfabric 1.17 grew beside `tcp`.
    provider
        .split(';')
        .any(|p| matches!(p, "tcp" | "sockets" | "udp" | "net"))
}

/// Where a peer's registered memory is, for RMA writes into it: sent in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// The address RMA writes name for the region's first byte: its virtual address
    /// where the provider wants those (`FI_MR_VIRT_ADDR`), else 0.
    pub base: u64,
    /// The region's length.
    pub len: u64,
    /// The region's remote key.
    pub key: u64,
}

/// One RMA write: `len` bytes at `offset` of a local region into a remote one at
/// `remote_offset`; `context` identifies its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmaWrite {
    /// Where in the local region the bytes are.
    pub offset: u64,
    /// How many.
    pub len: u64,
    /// Where in the remote region they go.
    pub remote_offset: u64,
    /// What the completion carries.
    pub context: u64,
}

/// The providers that offer RMA on connected message endpoints here (an empty list when
/// none does; [`FabricError::Unavailable`] in a build without libfabric).
pub fn providers() -> Result<Vec<ProviderInfo>, FabricError> {
    #[cfg(dwcp_libfabric)]
    {
        imp::providers()
    }
    #[cfg(not(dwcp_libfabric))]
    {
        Err(FabricError::Unavailable)
    }
}

/// The libfabric version this process runs with (`major.minor`), if it is there (this
/// loads it, as every call into it does the first time).
pub fn library_version() -> Option<String> {
    #[cfg(dwcp_libfabric)]
    {
        imp::library_version()
    }
    #[cfg(not(dwcp_libfabric))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handler of `signal` now.
    fn handler(signal: libc::c_int) -> libc::sighandler_t {
        // SAFETY: a query only (no new action); `old` is writable.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(signal, std::ptr::null(), &mut old);
            old.sa_sigaction
        }
    }

    /// Debian's libfabric links libinfinipath, whose constructor takes SIGINT, SIGTERM
    /// and the crash signals and exits 1 on them: a daemon draining on SIGTERM would
    /// die at once. Loading the library must leave the handlers as they were.
    #[test]
    fn loading_libfabric_leaves_the_signal_handlers_alone() {
        // SAFETY: SIG_IGN is a valid disposition for SIGTERM and SIGINT; nothing else
        // in this test binary handles them.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            libc::signal(libc::SIGINT, libc::SIG_IGN);
        }
        let before = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGABRT].map(handler);
        if library_version().is_none() {
            eprintln!("skipped: libfabric is not here");
            return;
        }
        assert_eq!(handler(libc::SIGTERM), libc::SIG_IGN);
        assert_eq!(handler(libc::SIGINT), libc::SIG_IGN);
        let after = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGABRT].map(handler);
        assert_eq!(before, after);
    }

    #[test]
    fn socket_providers_are_told_from_rdma_ones() {
        assert!(socket_based("tcp"));
        assert!(socket_based("tcp;ofi_rxm"));
        assert!(socket_based("sockets"));
        assert!(socket_based("net"));
        assert!(!socket_based("verbs"));
        assert!(!socket_based("verbs;ofi_rxm"));
        assert!(!socket_based("efa"));
    }
}
