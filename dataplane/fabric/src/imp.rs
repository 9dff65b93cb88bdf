//! The calls into libfabric (see `fi_getinfo(3)`, `fi_cm(3)`, `fi_endpoint(3)`,
//! `fi_mr(3)`, `fi_rma(3)`, `fi_cq(3)`, `fi_eq(3)`).
//!
//! Ownership follows libfabric's: a fabric outlives its event queues and domains, a
//! domain its endpoints, completion queues and memory regions. Each handle here keeps
//! an `Arc` of what it was opened from, so they close in that order whatever the
//! caller drops first.

use super::{FabricError, MAX_CM_DATA, ProviderInfo, RemoteRegion, RmaWrite};
use crate::sys;
use std::ffi::{CStr, CString, c_void};
use std::net::SocketAddr;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// `FI_EAGAIN` and `FI_EAVAIL` (macros over errno values).
const EAGAIN: i64 = libc::EAGAIN as i64;
const FI_EAVAIL: i64 = 259;

fn strerror(code: i64) -> String {
    // SAFETY: fi_strerror returns a static string for any value.
    unsafe { CStr::from_ptr(sys::fi_strerror(code.unsigned_abs() as i32)) }
        .to_string_lossy()
        .into_owned()
}

fn check(call: &'static str, ret: i64) -> Result<i64, FabricError> {
    if ret < 0 {
        Err(FabricError::Call {
            call,
            code: ret,
            message: strerror(ret),
        })
    } else {
        Ok(ret)
    }
}

fn text(p: *const libc::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libfabric's strings in its info structures are NUL-terminated and live
    // as long as the structure, which the caller holds.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A list from `fi_getinfo`, freed on drop.
struct InfoList(*mut sys::fi_info);

impl Drop for InfoList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the list came from fi_getinfo and is freed once.
            unsafe { sys::fi_freeinfo(self.0) };
        }
    }
}

impl InfoList {
    fn iter(&self) -> impl Iterator<Item = &sys::fi_info> {
        let mut next = self.0;
        std::iter::from_fn(move || {
            // SAFETY: `next` is null or an entry of the list this borrows.
            let info = unsafe { next.as_ref()? };
            next = info.next;
            Some(info)
        })
    }
}

/// Hints for connected message endpoints with RMA (on `provider`, if named).
struct Hints(*mut sys::fi_info);

impl Hints {
    fn new(provider: Option<&str>) -> Result<Hints, FabricError> {
        loaded()?;
        // SAFETY: fi_allocinfo returns a zeroed fi_info with its attribute structures
        // allocated, or null.
        let hints = unsafe { sys::fi_allocinfo() };
        if hints.is_null() {
            return Err(FabricError::Protocol("fi_allocinfo: out of memory".into()));
        }
        let owned = Hints(hints);
        // SAFETY: `hints` and its attribute structures were just allocated by
        // fi_allocinfo and are ours; strings given to it are freed by fi_freeinfo, so
        // they are allocated with strdup.
        unsafe {
            let h = &mut *hints;
            h.caps = (sys::FI_MSG | sys::FI_RMA) as u64;
            (*h.ep_attr).type_ = sys::fi_ep_type_FI_EP_MSG;
            // What this layer copes with: registered local buffers, virtual addresses
            // or offsets, keys the provider picks, memory that is allocated.
            (*h.domain_attr).mr_mode = (sys::FI_MR_LOCAL
                | sys::FI_MR_VIRT_ADDR
                | sys::FI_MR_ALLOCATED
                | sys::FI_MR_PROV_KEY) as i32;
            if let Some(name) = provider {
                let name =
                    CString::new(name).map_err(|_| FabricError::NoProvider(format!("{name:?}")))?;
                (*h.fabric_attr).prov_name = libc::strdup(name.as_ptr());
            }
        }
        Ok(owned)
    }

    /// `fi_getinfo` with these hints for `node`/`service` (`flags`: `FI_SOURCE` for a
    /// listener).
    fn get(
        &self,
        node: Option<&str>,
        service: Option<&str>,
        flags: u64,
    ) -> Result<InfoList, FabricError> {
        let node = node
            .map(CString::new)
            .transpose()
            .map_err(|_| FabricError::Protocol("an address with a NUL byte".into()))?;
        let service = service
            .map(CString::new)
            .transpose()
            .map_err(|_| FabricError::Protocol("a port with a NUL byte".into()))?;
        let mut list = ptr::null_mut();
        // SAFETY: the strings and hints are valid for the call; `list` receives a list
        // we free (InfoList).
        let ret = unsafe {
            sys::fi_getinfo(
                sys::DWCP_FI_VERSION,
                node.as_ref().map_or(ptr::null(), |n| n.as_ptr()),
                service.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
                flags,
                self.0,
                &mut list,
            )
        };
        if ret == -(sys::FI_ENODATA as i32) {
            return Ok(InfoList(ptr::null_mut()));
        }
        check("fi_getinfo", ret.into())?;
        Ok(InfoList(list))
    }
}

impl Drop for Hints {
    fn drop(&mut self) {
        // SAFETY: allocated by fi_allocinfo, freed once.
        unsafe { sys::fi_freeinfo(self.0) };
    }
}

pub(crate) fn providers() -> Result<Vec<ProviderInfo>, FabricError> {
    let list = Hints::new(None)?.get(None, None, 0)?;
    let mut out: Vec<ProviderInfo> = Vec::new();
    for info in list.iter() {
        // SAFETY: fi_getinfo fills the attribute pointers of each entry (the nic may be
        // null).
        let (fabric, domain, link_speed) = unsafe {
            let fabric = &*info.fabric_attr;
            let domain = &*info.domain_attr;
            let speed = info
                .nic
                .as_ref()
                .and_then(|nic| nic.link_attr.as_ref())
                .map(|link| link.speed as u64)
                .filter(|&s| s > 0);
            (fabric, domain, speed)
        };
        let entry = ProviderInfo {
            provider: text(fabric.prov_name),
            fabric: text(fabric.name),
            domain: text(domain.name),
            link_speed,
        };
        if !out.contains(&entry) {
            out.push(entry);
        }
    }
    Ok(out)
}

/// Load libfabric on first use (every way in passes through [`Hints::new`]).
fn loaded() -> Result<(), FabricError> {
    // SAFETY: takes no arguments; loads at most once (pthread_once) and returns null
    // or a static string.
    let why = unsafe { sys::dwcp_fabric_load() };
    if why.is_null() {
        Ok(())
    } else {
        Err(FabricError::NotLoaded(text(why)))
    }
}

pub(crate) fn library_version() -> Option<String> {
    loaded().ok()?;
    // SAFETY: fi_version takes no arguments.
    let v = unsafe { sys::fi_version() };
    Some(format!("{}.{}", v >> 16, v & 0xffff))
}

/// A fabric and the event queue its connections are managed through.
struct FabricHandle {
    fabric: *mut sys::fid_fabric,
    eq: *mut sys::fid_eq,
}

// SAFETY: libfabric objects may be used from any thread; ours are used by one at a time
// (each handle is owned by one connection or listener, which is not Sync).
unsafe impl Send for FabricHandle {}
// SAFETY: only closing (in Drop, once) touches the handle after it is opened.
unsafe impl Sync for FabricHandle {}

impl FabricHandle {
    fn open(info: &sys::fi_info) -> Result<Arc<FabricHandle>, FabricError> {
        let mut fabric = ptr::null_mut();
        // SAFETY: the fabric attributes come from fi_getinfo; `fabric` receives the
        // object, closed in Drop.
        let ret = unsafe { sys::fi_fabric(info.fabric_attr, &mut fabric, ptr::null_mut()) };
        check("fi_fabric", ret.into())?;
        let mut handle = FabricHandle {
            fabric,
            eq: ptr::null_mut(),
        };
        let mut attr = sys::fi_eq_attr {
            size: 64,
            wait_obj: sys::fi_wait_obj_FI_WAIT_UNSPEC,
            ..Default::default()
        };
        // SAFETY: `fabric` is open; `eq` receives the queue, closed in Drop before the
        // fabric.
        let ret = unsafe { sys::fi_eq_open(fabric, &mut attr, &mut handle.eq, ptr::null_mut()) };
        check("fi_eq_open", ret.into())?;
        Ok(Arc::new(handle))
    }

    /// Wait up to `timeout` for a connection-management event: its kind, entry, and
    /// the private data the peer sent with it (a connection request's, see
    /// [`Connection::connect_with`]).
    fn next_event(
        &self,
        timeout: Duration,
    ) -> Result<(u32, sys::fi_eq_cm_entry, Vec<u8>), FabricError> {
        let mut event = 0u32;
        let entry_len = std::mem::size_of::<sys::fi_eq_cm_entry>();
        // The entry, then its private data (a flexible array member in C). u64 words
        // keep the entry's alignment.
        let mut buffer = [0u64; (std::mem::size_of::<sys::fi_eq_cm_entry>() + MAX_CM_DATA) / 8 + 1];
        let deadline = std::time::Instant::now() + timeout;
        let ret = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `buffer` is writable for the length passed and aligned for an
            // entry.
            let ret = unsafe {
                sys::fi_eq_sread(
                    self.eq,
                    &mut event,
                    buffer.as_mut_ptr().cast(),
                    std::mem::size_of_val(&buffer),
                    ms,
                    0,
                )
            } as i64;
            // A signal to the process (another thread's child, a timer) cuts the wait
            // short: wait on for what is left.
            if ret != -(libc::EINTR as i64) || left.is_zero() {
                break ret;
            }
        };
        if ret == -EAGAIN {
            return Err(FabricError::TimedOut(
                "waiting for a connection event",
                timeout,
            ));
        }
        if ret == -FI_EAVAIL {
            let mut err = sys::fi_eq_err_entry::default();
            // SAFETY: `err` is a writable error entry.
            unsafe { sys::fi_eq_readerr(self.eq, &mut err, 0) };
            return Err(FabricError::Call {
                call: "fi_eq_sread",
                code: -(err.err as i64),
                message: strerror(err.err as i64),
            });
        }
        let read = check("fi_eq_sread", ret)? as usize;
        // SAFETY: the queue wrote an entry at the start of the buffer (aligned, and
        // `read` covers it for a connection event).
        let entry = unsafe { std::ptr::read(buffer.as_ptr().cast::<sys::fi_eq_cm_entry>()) };
        let data = if read > entry_len {
            // SAFETY: `read` bytes of the buffer were written, within its length.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    buffer.as_ptr().cast::<u8>(),
                    read.min(size_of_val(&buffer)),
                )
            };
            bytes[entry_len..].to_vec()
        } else {
            Vec::new()
        };
        Ok((event, entry, data))
    }
}

impl Drop for FabricHandle {
    fn drop(&mut self) {
        // SAFETY: each object was opened here and is closed once, the queue before the
        // fabric it belongs to.
        unsafe {
            if !self.eq.is_null() {
                sys::fi_close(&mut (*self.eq).fid);
            }
            if !self.fabric.is_null() {
                sys::fi_close(&mut (*self.fabric).fid);
            }
        }
    }
}

/// A domain (a NIC's resources), opened from a fabric.
struct DomainHandle {
    domain: *mut sys::fid_domain,
    /// Whether RMA addresses are virtual addresses (`FI_MR_VIRT_ADDR`) or offsets.
    virtual_addresses: bool,
    /// Whether local buffers need their registration's descriptor (`FI_MR_LOCAL`).
    local_descriptors: bool,
    _fabric: Arc<FabricHandle>,
}

// SAFETY: as for FabricHandle.
unsafe impl Send for DomainHandle {}
// SAFETY: as for FabricHandle.
unsafe impl Sync for DomainHandle {}

impl DomainHandle {
    fn open(fabric: &Arc<FabricHandle>, info: &sys::fi_info) -> Result<Arc<Self>, FabricError> {
        let mut domain = ptr::null_mut();
        // SAFETY: the fabric is open and `info` comes from fi_getinfo or a connection
        // request; `domain` receives the object, closed in Drop.
        let ret = unsafe {
            sys::fi_domain(
                fabric.fabric,
                info as *const _ as *mut _,
                &mut domain,
                ptr::null_mut(),
            )
        };
        check("fi_domain", ret.into())?;
        // SAFETY: fi_getinfo filled the domain attributes.
        let mr_mode = unsafe { (*info.domain_attr).mr_mode } as u32;
        Ok(Arc::new(DomainHandle {
            domain,
            virtual_addresses: mr_mode & sys::FI_MR_VIRT_ADDR != 0,
            local_descriptors: mr_mode & sys::FI_MR_LOCAL != 0,
            _fabric: fabric.clone(),
        }))
    }
}

impl Drop for DomainHandle {
    fn drop(&mut self) {
        // SAFETY: opened here, closed once, after everything opened from it (they
        // hold this handle).
        unsafe { sys::fi_close(&mut (*self.domain).fid) };
    }
}

/// Waits for connections to a bound address.
pub struct Listener {
    fabric: Arc<FabricHandle>,
    pep: *mut sys::fid_pep,
    provider: String,
    addr: SocketAddr,
}

// SAFETY: the passive endpoint is used by its owner only.
unsafe impl Send for Listener {}

impl Listener {
    /// Listen on `addr` (port 0: any) through `provider` (e.g. `tcp`, `verbs`).
    pub fn bind(provider: &str, addr: SocketAddr) -> Result<Listener, FabricError> {
        let hints = Hints::new(Some(provider))?;
        let list = hints.get(
            Some(&addr.ip().to_string()),
            Some(&addr.port().to_string()),
            sys::FI_SOURCE,
        )?;
        let info = list
            .iter()
            .next()
            .ok_or_else(|| FabricError::NoProvider(format!("{provider} for {addr}")))?;
        let fabric = FabricHandle::open(info)?;
        let mut pep = ptr::null_mut();
        // SAFETY: the fabric is open, `info` is the entry it was opened from; `pep` is
        // closed in Drop before the fabric (held by `fabric`).
        let ret = unsafe {
            sys::fi_passive_ep(
                fabric.fabric,
                info as *const _ as *mut _,
                &mut pep,
                ptr::null_mut(),
            )
        };
        check("fi_passive_ep", ret.into())?;
        let mut listener = Listener {
            fabric,
            pep,
            provider: provider.to_string(),
            addr,
        };
        // SAFETY: both objects are open; the queue outlives the endpoint (Drop order).
        unsafe {
            check(
                "fi_pep_bind",
                sys::fi_pep_bind(pep, &mut (*listener.fabric.eq).fid, 0).into(),
            )?;
            check("fi_listen", sys::fi_listen(pep).into())?;
        }
        listener.addr = name_of(pep)?;
        Ok(listener)
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The provider.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Take the next connection request, within `timeout`, and accept it.
    pub fn accept(&self, timeout: Duration) -> Result<Connection, FabricError> {
        self.request(timeout)?.accept(timeout)
    }

    /// Wait up to `timeout` for the next connection request, to be accepted or
    /// rejected after a look at its private data.
    pub fn request(&self, timeout: Duration) -> Result<Request<'_>, FabricError> {
        let (event, entry, data) = self.fabric.next_event(timeout)?;
        let info = InfoList(entry.info);
        if event != sys::FI_CONNREQ {
            return Err(FabricError::Protocol(format!(
                "connection event {event} where a request was due"
            )));
        }
        if info.0.is_null() {
            return Err(FabricError::Protocol(
                "a connection request without info".into(),
            ));
        }
        Ok(Request {
            listener: self,
            info,
            data,
        })
    }
}

/// A connection request a [`Listener`] holds: accept it or reject it.
pub struct Request<'a> {
    listener: &'a Listener,
    info: InfoList,
    data: Vec<u8>,
}

impl Request<'_> {
    /// What the peer sent with its request ([`Connection::connect_with`]).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Accept: the connected endpoint, within `timeout`.
    pub fn accept(self, timeout: Duration) -> Result<Connection, FabricError> {
        // SAFETY: checked non-null in `Listener::request`; the list lives in `self`.
        let info = unsafe { &*self.info.0 };
        // The connection gets a fabric and event queue of its own: its events must not
        // mix with the listener's next requests.
        let fabric = FabricHandle::open(info)?;
        let connection = Connection::open(fabric, info, &self.listener.provider)?;
        // SAFETY: the endpoint is enabled and bound to its queues.
        let ret = unsafe { sys::fi_accept(connection.ep, ptr::null(), 0) };
        check("fi_accept", ret.into())?;
        connection.await_connected(timeout)?;
        Ok(connection)
    }

    /// Refuse the connection (the peer's connect fails).
    pub fn reject(self) {
        // SAFETY: the passive endpoint is open (the listener is borrowed) and the
        // handle comes from its own connection request.
        unsafe { sys::fi_reject(self.listener.pep, (*self.info.0).handle, ptr::null(), 0) };
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: opened in bind, closed once, before the fabric (held by `fabric`).
        unsafe { sys::fi_close(&mut (*self.pep).fid) };
    }
}

/// The socket address a listening endpoint is bound to (`fi_getname`); `pep` must be
/// open.
fn name_of(pep: *mut sys::fid_pep) -> Result<SocketAddr, FabricError> {
    let mut storage: libc::sockaddr_storage =
        // SAFETY: an all-zero sockaddr_storage is valid.
        unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>();
    // SAFETY: `pep` is open (its caller's); `storage` is writable for `len` bytes.
    let ret = unsafe {
        sys::fi_getname(
            &mut (*pep).fid,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    check("fi_getname", ret.into())?;
    sockaddr_to_std(&storage)
        .ok_or_else(|| FabricError::Protocol("fi_getname: not an IP address".into()))
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in, which fits in the storage.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6, which fits in the storage.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
}

/// A connected endpoint with its completion queue.
pub struct Connection {
    ep: *mut sys::fid_ep,
    cq: *mut sys::fid_cq,
    domain: Arc<DomainHandle>,
    fabric: Arc<FabricHandle>,
    provider: String,
    /// Whether writes may ask for delivery completion (`FI_DELIVERY_COMPLETE`).
    delivery_complete: bool,
}

// SAFETY: the endpoint and its queue are used by the connection's owner only.
unsafe impl Send for Connection {}

impl Connection {
    /// Connect to a [`Listener`] at `addr` through `provider`, within `timeout`.
    pub fn connect(
        provider: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Connection, FabricError> {
        Self::connect_with(provider, addr, &[], timeout)
    }

    /// [`Connection::connect`], sending `data` (at most [`MAX_CM_DATA`] bytes) with the
    /// request for the listener to judge it by ([`Request::data`]).
    pub fn connect_with(
        provider: &str,
        addr: SocketAddr,
        data: &[u8],
        timeout: Duration,
    ) -> Result<Connection, FabricError> {
        if data.len() > MAX_CM_DATA {
            return Err(FabricError::Protocol(format!(
                "{} bytes of connection data (at most {MAX_CM_DATA})",
                data.len()
            )));
        }
        let hints = Hints::new(Some(provider))?;
        let list = hints.get(
            Some(&addr.ip().to_string()),
            Some(&addr.port().to_string()),
            0,
        )?;
        let info = list
            .iter()
            .next()
            .ok_or_else(|| FabricError::NoProvider(format!("{provider} to {addr}")))?;
        let fabric = FabricHandle::open(info)?;
        let connection = Connection::open(fabric, info, provider)?;
        // SAFETY: the endpoint is enabled; the destination address comes with `info`.
        let ret = unsafe {
            sys::fi_connect(
                connection.ep,
                info.dest_addr,
                if data.is_empty() {
                    ptr::null()
                } else {
                    data.as_ptr().cast()
                },
                data.len(),
            )
        };
        check("fi_connect", ret.into())?;
        connection.await_connected(timeout)?;
        Ok(connection)
    }

    /// An endpoint for `info`, bound to `fabric`'s event queue and a completion queue
    /// of its own, enabled.
    fn open(
        fabric: Arc<FabricHandle>,
        info: &sys::fi_info,
        provider: &str,
    ) -> Result<Connection, FabricError> {
        let domain = DomainHandle::open(&fabric, info)?;
        let mut cq_attr = sys::fi_cq_attr {
            size: 1024,
            format: sys::fi_cq_format_FI_CQ_FORMAT_CONTEXT,
            // A wait object, so that a target of RMA writes can block in
            // `wait_completions` while the provider progresses (see there).
            wait_obj: sys::fi_wait_obj_FI_WAIT_UNSPEC,
            ..Default::default()
        };
        let mut cq = ptr::null_mut();
        // SAFETY: the domain is open; `cq` is closed in Drop after the endpoint.
        let ret = unsafe { sys::fi_cq_open(domain.domain, &mut cq_attr, &mut cq, ptr::null_mut()) };
        check("fi_cq_open", ret.into())?;
        let mut ep = ptr::null_mut();
        // SAFETY: the domain is open and `info` describes the endpoint; on failure the
        // queue opened above is closed by the partial connection's Drop below.
        let opened = check(
            "fi_endpoint",
            unsafe {
                sys::fi_endpoint(
                    domain.domain,
                    info as *const _ as *mut _,
                    &mut ep,
                    ptr::null_mut(),
                )
            }
            .into(),
        );
        // SAFETY: fi_getinfo filled the transmit attributes.
        let op_flags = unsafe { info.tx_attr.as_ref() }.map_or(0, |tx| tx.op_flags);
        let connection = Connection {
            ep,
            cq,
            domain,
            fabric,
            provider: provider.to_string(),
            delivery_complete: op_flags & sys::FI_DELIVERY_COMPLETE as u64 != 0
                || provider_delivers_complete(provider),
        };
        opened?;
        // SAFETY: endpoint and queues are open; they are bound before enabling, as
        // fi_endpoint(3) requires.
        unsafe {
            check(
                "fi_ep_bind(eq)",
                sys::fi_ep_bind(ep, &mut (*connection.fabric.eq).fid, 0).into(),
            )?;
            check(
                "fi_ep_bind(cq)",
                sys::fi_ep_bind(ep, &mut (*cq).fid, (sys::FI_TRANSMIT | sys::FI_RECV) as u64)
                    .into(),
            )?;
            check("fi_enable", sys::fi_enable(ep).into())?;
        }
        Ok(connection)
    }

    fn await_connected(&self, timeout: Duration) -> Result<(), FabricError> {
        let (event, entry, _) = self.fabric.next_event(timeout)?;
        if !entry.info.is_null() {
            drop(InfoList(entry.info));
        }
        if event != sys::FI_CONNECTED {
            return Err(FabricError::Protocol(format!(
                "connection event {event} where the connection was due"
            )));
        }
        Ok(())
    }

    /// The provider.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Whether a write's completion means its bytes are in the peer's memory
    /// (`FI_DELIVERY_COMPLETE`), not only that they left.
    pub fn delivers_complete(&self) -> bool {
        self.delivery_complete
    }

    /// Register `len` bytes at `ptr` for RMA writes from them (local reads) and into
    /// them (remote writes).
    ///
    /// # Safety
    /// The memory must stay mapped and not move for as long as the region lives, and
    /// nothing else may rely on its content while the peer may write into it.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<MemoryRegion, FabricError> {
        let mut mr = ptr::null_mut();
        let access =
            (sys::FI_READ | sys::FI_WRITE | sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE) as u64;
        // SAFETY: the caller keeps the memory mapped for the region's life; the domain
        // is open (the region holds it).
        let ret = unsafe {
            sys::fi_mr_reg(
                self.domain.domain,
                ptr.cast::<c_void>(),
                len,
                access,
                0,
                0,
                0,
                &mut mr,
                ptr::null_mut(),
            )
        };
        check("fi_mr_reg", ret.into())?;
        // SAFETY: `mr` was just registered.
        let (key, desc) = unsafe { (sys::fi_mr_key(mr), sys::fi_mr_desc(mr)) };
        Ok(MemoryRegion {
            mr,
            key,
            desc,
            base: ptr as u64,
            len: len as u64,
            virtual_addresses: self.domain.virtual_addresses,
            _domain: self.domain.clone(),
        })
    }

    /// Write `write.len` bytes at `write.offset` of `local` into `remote` at
    /// `write.remote_offset`, `write.context` coming back from
    /// [`Connection::completions`] once the data is in the peer's memory (delivery) or,
    /// where the provider cannot say that, sent. Completions taken while waiting go
    /// into `completed`.
    ///
    /// Waits (progressing the queue) while the provider's transmit queue is full.
    pub fn write(
        &self,
        local: &MemoryRegion,
        remote: &RemoteRegion,
        write: RmaWrite,
        completed: &mut Vec<u64>,
    ) -> Result<(), FabricError> {
        let RmaWrite {
            offset,
            len,
            remote_offset,
            context,
        } = write;
        if offset.checked_add(len).is_none_or(|end| end > local.len)
            || remote_offset
                .checked_add(len)
                .is_none_or(|end| end > remote.len)
        {
            return Err(FabricError::Protocol(format!(
                "an RMA write of {len} bytes at {offset} into {remote_offset} is outside the \
                 regions ({} here, {} there)",
                local.len, remote.len
            )));
        }
        let mut iov = libc::iovec {
            iov_base: (local.base + offset) as *mut c_void,
            iov_len: len as usize,
        };
        let mut desc = if self.domain.local_descriptors {
            local.desc
        } else {
            ptr::null_mut()
        };
        let mut rma_iov = sys::fi_rma_iov {
            addr: remote.base + remote_offset,
            len: len as usize,
            key: remote.key,
        };
        let msg = sys::fi_msg_rma {
            msg_iov: (&mut iov as *mut libc::iovec).cast(),
            desc: &mut desc,
            iov_count: 1,
            addr: sys::FI_ADDR_UNSPEC_VALUE,
            rma_iov: &mut rma_iov,
            rma_iov_count: 1,
            context: context as *mut c_void,
            data: 0,
        };
        let mut flags = sys::FI_COMPLETION as u64;
        if self.delivery_complete {
            flags |= sys::FI_DELIVERY_COMPLETE as u64;
        }
        loop {
            // SAFETY: the local range lies in a registered region the caller holds; the
            // message's pointers live for the call (the provider copies the iovecs).
            let ret = unsafe { sys::fi_writemsg(self.ep, &msg, flags) } as i64;
            if ret == -EAGAIN {
                self.completions(completed)?;
                continue;
            }
            check("fi_writemsg", ret)?;
            return Ok(());
        }
    }

    /// Take the completions ready now (each write's context) into `out`; returns how
    /// many. Also drives the provider's progress, which a target of RMA writes must
    /// call regularly where the provider progresses manually (`tcp`).
    pub fn completions(&self, out: &mut Vec<u64>) -> Result<usize, FabricError> {
        let mut entries = [sys::fi_cq_entry::default(); 64];
        let mut taken = 0;
        loop {
            // SAFETY: `entries` is writable for its length in the queue's format
            // (FI_CQ_FORMAT_CONTEXT).
            let ret =
                unsafe { sys::fi_cq_read(self.cq, entries.as_mut_ptr().cast(), entries.len()) }
                    as i64;
            if ret == -EAGAIN {
                return Ok(taken);
            }
            if ret == -FI_EAVAIL {
                let mut err = sys::fi_cq_err_entry::default();
                // SAFETY: `err` is a writable error entry.
                unsafe { sys::fi_cq_readerr(self.cq, &mut err, 0) };
                return Err(FabricError::Call {
                    call: "an RMA write",
                    code: -(err.err as i64),
                    message: format!(
                        "{} (provider error {}; write {})",
                        strerror(err.err as i64),
                        err.prov_errno,
                        err.op_context as u64
                    ),
                });
            }
            let n = check("fi_cq_read", ret)? as usize;
            out.extend(entries[..n].iter().map(|e| e.op_context as u64));
            taken += n;
        }
    }
}

impl Connection {
    /// [`Connection::completions`], waiting up to `timeout` for the first one. While it
    /// waits the provider progresses this endpoint, so remote writes into it land: a
    /// target that has nothing else to do calls this in a loop, instead of polling.
    pub fn wait_completions(
        &self,
        out: &mut Vec<u64>,
        timeout: Duration,
    ) -> Result<usize, FabricError> {
        let mut entry = sys::fi_cq_entry::default();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // An interrupted wait (EINTR) reads as nothing completed: callers wait in loops.
        // SAFETY: `entry` is writable for one entry of the queue's format; no condition
        // is passed.
        let ret = unsafe {
            sys::fi_cq_sread(
                self.cq,
                (&mut entry as *mut sys::fi_cq_entry).cast(),
                1,
                ptr::null(),
                ms,
            )
        } as i64;
        if ret == -EAGAIN || ret == -(libc::EINTR as i64) {
            return Ok(0);
        }
        if ret == 1 {
            out.push(entry.op_context as u64);
            return Ok(1 + self.completions(out)?);
        }
        if ret == -FI_EAVAIL {
            // The error entry: `completions` reads and reports it.
            return self.completions(out);
        }
        check("fi_cq_sread", ret)?;
        self.completions(out)
    }
}

/// Providers known to complete writes at delivery when asked, though their transmit
/// attributes do not announce it by default.
fn provider_delivers_complete(provider: &str) -> bool {
    provider
        .split(';')
        .any(|p| matches!(p, "tcp" | "verbs" | "shm"))
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once: the endpoint before its queue, both
        // before the domain and fabric (held by this connection).
        unsafe {
            if !self.ep.is_null() {
                sys::fi_shutdown(self.ep, 0);
                sys::fi_close(&mut (*self.ep).fid);
            }
            if !self.cq.is_null() {
                sys::fi_close(&mut (*self.cq).fid);
            }
        }
    }
}

/// Memory registered with a connection's domain.
pub struct MemoryRegion {
    mr: *mut sys::fid_mr,
    key: u64,
    desc: *mut c_void,
    base: u64,
    len: u64,
    virtual_addresses: bool,
    _domain: Arc<DomainHandle>,
}

// SAFETY: the registration is immutable once made; it is closed once, in Drop.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// What the peer needs to write into this region.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            base: if self.virtual_addresses { self.base } else { 0 },
            len: self.len,
            key: self.key,
        }
    }

    /// Bytes registered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte is registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, closed once, before the domain (held).
        unsafe { sys::fi_close(&mut (*self.mr).fid) };
    }
}
