//! A build without libfabric: the same API, every way in answering
//! [`FabricError::Unavailable`] (the types cannot be made, so their methods never run).

use super::{FabricError, RemoteRegion, RmaWrite};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

/// Waits for connections (never made in this build).
pub struct Listener(Infallible);

impl Listener {
    /// Always [`FabricError::Unavailable`] in this build.
    pub fn bind(_provider: &str, _addr: SocketAddr) -> Result<Listener, FabricError> {
        Err(FabricError::Unavailable)
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        match self.0 {}
    }

    /// The provider.
    pub fn provider(&self) -> &str {
        match self.0 {}
    }

    /// Take the next connection request.
    pub fn accept(&self, _timeout: Duration) -> Result<Connection, FabricError> {
        match self.0 {}
    }

    /// Wait for the next connection request.
    pub fn request(&self, _timeout: Duration) -> Result<Request<'_>, FabricError> {
        match self.0 {}
    }
}

/// A connection request (never made in this build).
pub struct Request<'a>(Infallible, std::marker::PhantomData<&'a ()>);

impl Request<'_> {
    /// What the peer sent with its request.
    pub fn data(&self) -> &[u8] {
        match self.0 {}
    }

    /// Accept it.
    pub fn accept(self, _timeout: Duration) -> Result<Connection, FabricError> {
        match self.0 {}
    }

    /// Refuse it.
    pub fn reject(self) {
        match self.0 {}
    }
}

/// A connected endpoint (never made in this build).
pub struct Connection(Infallible);

impl Connection {
    /// Always [`FabricError::Unavailable`] in this build.
    pub fn connect(
        _provider: &str,
        _addr: SocketAddr,
        _timeout: Duration,
    ) -> Result<Connection, FabricError> {
        Err(FabricError::Unavailable)
    }

    /// Always [`FabricError::Unavailable`] in this build.
    pub fn connect_with(
        _provider: &str,
        _addr: SocketAddr,
        _data: &[u8],
        _timeout: Duration,
    ) -> Result<Connection, FabricError> {
        Err(FabricError::Unavailable)
    }

    /// The provider.
    pub fn provider(&self) -> &str {
        match self.0 {}
    }

    /// Whether a write's completion means delivery.
    pub fn delivers_complete(&self) -> bool {
        match self.0 {}
    }

    /// Completions, waiting for the first.
    pub fn wait_completions(
        &self,
        _out: &mut Vec<u64>,
        _timeout: Duration,
    ) -> Result<usize, FabricError> {
        match self.0 {}
    }

    /// Register memory.
    ///
    /// # Safety
    /// As in a build with libfabric: the memory must stay mapped and in place for the
    /// region's life.
    pub unsafe fn register(&self, _ptr: *mut u8, _len: usize) -> Result<MemoryRegion, FabricError> {
        match self.0 {}
    }

    /// An RMA write.
    pub fn write(
        &self,
        _local: &MemoryRegion,
        _remote: &RemoteRegion,
        _write: RmaWrite,
        _completed: &mut Vec<u64>,
    ) -> Result<(), FabricError> {
        match self.0 {}
    }

    /// Completions ready now.
    pub fn completions(&self, _out: &mut Vec<u64>) -> Result<usize, FabricError> {
        match self.0 {}
    }
}

/// Registered memory (never made in this build).
pub struct MemoryRegion(Infallible);

impl MemoryRegion {
    /// What the peer needs to write into this region.
    pub fn remote(&self) -> RemoteRegion {
        match self.0 {}
    }

    /// Bytes registered.
    pub fn len(&self) -> u64 {
        match self.0 {}
    }

    /// Whether no byte is registered.
    pub fn is_empty(&self) -> bool {
        match self.0 {}
    }
}
