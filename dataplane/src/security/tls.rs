//! The control stream's TLS 1.3 session: mutual authentication against the site's CA,
//! optional pinned peer names, the handshake under a deadline that a cancel interrupts,
//! and the channel both sides use afterwards (reads on one thread, writes on another).

use super::records::SessionKeys;
use super::{SecurityError, counters};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where an appliance's identity is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityFiles {
    /// This appliance's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The site's CA certificate(s) (PEM): peers must be signed by one.
    pub ca: PathBuf,
    /// When not empty, a peer's certificate must also be valid for one of these names.
    pub peers: Vec<String>,
}

/// An appliance's loaded identity: its certificate and key, the CA it trusts, and the
/// peer names it accepts. Loaded anew for each session by whoever wants certificates
/// rotated without a restart (new sessions use the new files).
pub struct Identity {
    client: Arc<ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    peers: Vec<String>,
    files: SecurityFiles,
}

/// Identities are the same when they come from the same files.
impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("files", &self.files)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // Both ends are ours: one suite, the one the data streams' records use too.
    provider.cipher_suites =
        vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384];
    Arc::new(provider)
}

fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| SecurityError::File {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SecurityError::File {
            what,
            path: path.to_owned(),
            reason: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

impl Identity {
    /// Load and check `files`.
    pub fn load(files: &SecurityFiles) -> Result<Arc<Identity>, SecurityError> {
        let chain = read_certs(&files.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| SecurityError::File {
            what: "private key",
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca, "CA certificate")? {
            roots.add(ca).map_err(|e| SecurityError::File {
                what: "CA certificate",
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let config_error = |e: rustls::Error| SecurityError::Config(e.to_string());
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| SecurityError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| SecurityError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
                reason: e.to_string(),
            })?;
        // One session per connection: nothing to resume.
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| SecurityError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
                reason: e.to_string(),
            })?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(Identity {
            client: Arc::new(client),
            server: Arc::new(server),
            peers: files.peers.clone(),
            files: files.clone(),
        }))
    }

    /// The TLS configurations sessions use (for tools and baselines that run TLS
    /// themselves).
    pub fn tls_configs(&self) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        (self.client.clone(), self.server.clone())
    }

    /// Check the authenticated peer's certificate against the pinned names; returns the
    /// names it is valid for (its DNS names when nothing is pinned), for logs.
    fn check_pins(&self, conn: &Connection) -> Result<String, SecurityError> {
        let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
            return Err(SecurityError::Handshake(
                "the peer presented no certificate".into(),
            ));
        };
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| SecurityError::Handshake(format!("the peer's certificate: {e}")))?;
        if self.peers.is_empty() {
            let names: Vec<&str> = ee.valid_dns_names().collect();
            return Ok(if names.is_empty() {
                "a certificate of the site's CA".into()
            } else {
                names.join(", ")
            });
        }
        let matched: Vec<&str> = self
            .peers
            .iter()
            .filter(|name| {
                ServerName::try_from(name.as_str())
                    .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
            })
            .map(String::as_str)
            .collect();
        if matched.is_empty() {
            let names: Vec<&str> = ee.valid_dns_names().collect();
            return Err(SecurityError::NotPinned {
                presented: names.join(", "),
                pinned: self.peers.join(", "),
            });
        }
        Ok(matched.join(", "))
    }
}

/// Whether bytes a connection opened with are a TLS handshake record (RFC 8446 §5.1:
/// content type 22, legacy version 3.x).
pub fn is_tls_hello(first: &[u8]) -> bool {
    first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03
}

/// A TLS alert record a destination without certificates answers a TLS hello with
/// (`insufficient_security`), so the source's error can say why.
pub const NO_TLS_HERE_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 71];

/// Whether a handshake may go on waiting: an error once `cancel` is set or `deadline`
/// has passed.
fn still_waiting(deadline: Instant, cancel: &AtomicBool) -> Result<(), SecurityError> {
    // Acquire: pairs with the Release store of whoever cancels.
    if cancel.load(Ordering::Acquire) {
        return Err(SecurityError::Cancelled);
    }
    if Instant::now() >= deadline {
        counters::handshake("timeout");
        return Err(SecurityError::Handshake(
            "timed out: the peer did not finish it in time".into(),
        ));
    }
    Ok(())
}

/// Run the handshake on `conn` over `socket` until it completes, `deadline` passes or
/// `cancel` is set.
fn handshake(
    conn: &mut Connection,
    socket: &mut TcpStream,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<(), SecurityError> {
    // Short reads, so that a cancel or the deadline is noticed at once.
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| SecurityError::Handshake(e.to_string()))?;
    while conn.is_handshaking() {
        still_waiting(deadline, cancel)?;
        match conn.complete_io(socket) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // A TLS error is the io error's inner rustls::Error; tell the peer too.
                let _ = conn.write_tls(socket);
                counters::handshake(outcome(&e));
                return Err(SecurityError::Handshake(describe(&e)));
            }
        }
    }
    let _ = socket.set_read_timeout(None);
    Ok(())
}

/// A handshake failure's label in `dwcp_tls_handshakes_total{result}`.
fn outcome(e: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(E::NoCertificatesPresented | E::AlertReceived(A::CertificateRequired)) => {
            "no_certificate"
        }
        Some(E::InvalidCertificate(C::UnknownIssuer) | E::AlertReceived(A::UnknownCA)) => {
            "unknown_ca"
        }
        Some(
            E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })
            | E::AlertReceived(A::CertificateExpired),
        ) => "expired",
        Some(E::InvalidMessage(_) | E::AlertReceived(A::InsufficientSecurity)) => "not_tls",
        _ => "other",
    }
}

/// A TLS failure inside an I/O error, in words, or `None` when it is not one.
pub fn describe_tls(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(|_| describe(e))
}

/// A handshake failure in words an operator can act on.
fn describe(e: &std::io::Error) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "the peer closed the connection during the TLS handshake".into()
            }
            _ => e.to_string(),
        };
    };
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match tls {
        E::AlertReceived(A::InsufficientSecurity) => {
            "the destination runs without certificates (--insecure): it does not take TLS \
             sessions"
                .into()
        }
        E::AlertReceived(A::CertificateRequired) => {
            "the peer requires a client certificate and got none".into()
        }
        E::AlertReceived(A::UnknownCA) => {
            "the peer does not trust our certificate (signed by another CA)".into()
        }
        E::AlertReceived(A::CertificateExpired) => {
            "the peer refused our certificate: it has expired".into()
        }
        E::AlertReceived(a) => format!("the peer ended the TLS handshake: {a:?}"),
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the peer's certificate is not signed by this site's CA".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the peer's certificate is not valid for the address it was reached at".into()
        }
        E::InvalidCertificate(c) => format!("the peer's certificate is invalid: {c:?}"),
        E::InvalidMessage(_) => {
            "the peer does not speak TLS (a source or destination running --insecure?)".into()
        }
        other => other.to_string(),
    }
}

/// Open a TLS session to `peer` over `socket` (the source's side). The peer's pinned
/// names are checked after the handshake: see [`TlsChannel::authorized`].
pub fn connect(
    identity: &Arc<Identity>,
    mut socket: TcpStream,
    peer: IpAddr,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<TlsChannel, SecurityError> {
    let name = ServerName::IpAddress(peer.into());
    let client = ClientConnection::new(identity.client.clone(), name)
        .map_err(|e| SecurityError::Config(e.to_string()))?;
    let mut conn = Connection::Client(client);
    handshake(&mut conn, &mut socket, deadline, cancel)?;
    let pins = identity.check_pins(&conn);
    counters::handshake(if pins.is_ok() { "ok" } else { "not_pinned" });
    Ok(TlsChannel::new(conn, socket, pins))
}

/// A destination's side of a handshake, driven by the caller's poll loop over a
/// non-blocking socket, so that many can run at once and a peer that stalls holds up
/// no one (the migration port's gate drives these).
pub struct ServerHandshake {
    conn: Connection,
}

impl ServerHandshake {
    /// Start one on a connection whose first bytes, `prefix`, were already read.
    pub fn new(identity: &Arc<Identity>, prefix: &[u8]) -> Result<Self, SecurityError> {
        let server = rustls::ServerConnection::new(identity.server.clone())
            .map_err(|e| SecurityError::Config(e.to_string()))?;
        let mut conn = Connection::Server(server);
        // rustls takes a read of nothing for the peer's end of the stream: an empty
        // prefix is not fed, or the session would end as soon as it began.
        if !prefix.is_empty() {
            conn.read_tls(&mut &prefix[..])
                .map_err(|e| SecurityError::Handshake(e.to_string()))?;
        }
        Ok(ServerHandshake { conn })
    }

    /// Move the handshake on with what `socket` (non-blocking) has; `true` once it is
    /// complete.
    pub fn advance(&mut self, socket: &mut TcpStream) -> Result<bool, SecurityError> {
        let failed = |conn: &mut Connection, socket: &mut TcpStream, e: std::io::Error| {
            // Tell the peer why (an alert), then give up.
            let _ = flush(conn, socket);
            counters::handshake(outcome(&e));
            SecurityError::Handshake(describe(&e))
        };
        let mut input_closed = false;
        loop {
            if let Err(e) = self.conn.process_new_packets() {
                let e = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
                return Err(failed(&mut self.conn, socket, e));
            }
            flush(&mut self.conn, socket).map_err(|e| SecurityError::Handshake(e.to_string()))?;
            if !self.conn.is_handshaking() {
                return Ok(true);
            }
            if input_closed {
                let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                return Err(failed(&mut self.conn, socket, e));
            }
            match self.conn.read_tls(socket) {
                Ok(0) => input_closed = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(&mut self.conn, socket, e)),
            }
        }
    }

    /// The established session on `socket` (blocking again), its peer's pinned names
    /// checked: see [`TlsChannel::authorized`].
    pub fn finish(self, identity: &Arc<Identity>, socket: TcpStream) -> TlsChannel {
        let _ = socket.set_nonblocking(false);
        // Control messages are small and answered at once.
        let _ = socket.set_nodelay(true);
        let pins = identity.check_pins(&self.conn);
        counters::handshake(if pins.is_ok() { "ok" } else { "not_pinned" });
        TlsChannel::new(self.conn, socket, pins)
    }
}

/// Accept a TLS session on `socket` whose first bytes, `prefix`, were already read,
/// waiting for it (until `deadline`, or `cancel`): for a caller with one connection to
/// serve. The peer's pinned names are checked after the handshake, so that a refusal
/// can be said inside the session: see [`TlsChannel::authorized`].
pub fn accept(
    identity: &Arc<Identity>,
    mut socket: TcpStream,
    prefix: &[u8],
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<TlsChannel, SecurityError> {
    let mut handshake = ServerHandshake::new(identity, prefix)?;
    socket
        .set_nonblocking(true)
        .map_err(|e| SecurityError::Handshake(e.to_string()))?;
    while !handshake.advance(&mut socket)? {
        still_waiting(deadline, cancel)?;
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&socket),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the call's duration.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 20) };
    }
    Ok(handshake.finish(identity, socket))
}

/// Write what the session has to send. Handshake flights are a few KiB, far below a
/// socket's buffer; should the socket still be full, wait for it briefly.
fn flush(conn: &mut Connection, socket: &mut TcpStream) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while conn.wants_write() {
        match conn.write_tls(socket) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Shared {
    conn: Mutex<Connection>,
    /// Writers take this before the connection and keep it while the bytes go out, so
    /// records reach the socket in the order they were sealed; the reader never waits
    /// on a socket write while holding `conn`.
    writing: Mutex<()>,
    socket: TcpStream,
    /// The peer's names, or why its certificate is not one this appliance accepts.
    peer: Result<String, SecurityError>,
}

/// An established TLS session on the control stream. Clones share it: one reads
/// ([`TlsChannel::reader`]), others write.
#[derive(Clone)]
pub struct TlsChannel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsChannel({:?})", self.shared.peer)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it leaves the TLS state as it was: still usable or failed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsChannel {
    fn new(conn: Connection, socket: TcpStream, peer: Result<String, SecurityError>) -> Self {
        TlsChannel {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                writing: Mutex::new(()),
                socket,
                peer,
            }),
        }
    }

    /// Who the peer's certificate says it is (the pinned names it matched, or its DNS
    /// names), or why it is not a peer this appliance accepts (pinned out).
    pub fn authorized(&self) -> Result<&str, SecurityError> {
        self.shared.peer.as_deref().map_err(Clone::clone)
    }

    /// The negotiated cipher suite, for reports.
    pub fn cipher_suite(&self) -> String {
        lock(&self.shared.conn)
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default()
    }

    /// Keys for `streams` data streams of this session (from the TLS exporter).
    pub fn session_keys(&self, streams: u16) -> Result<SessionKeys, SecurityError> {
        self.session_keys_generation(streams, 0)
    }

    /// Keys for the data streams of generation `generation` (replacements of lost
    /// streams; see [`SessionKeys::derive_generation`]).
    pub fn session_keys_generation(
        &self,
        streams: u16,
        generation: u16,
    ) -> Result<SessionKeys, SecurityError> {
        let conn = lock(&self.shared.conn);
        SessionKeys::derive_generation(streams, generation, |label, context, out| {
            conn.export_keying_material(out, label, Some(context))
                .map(|_| ())
        })
        .map_err(|e| SecurityError::Config(format!("deriving the data streams' keys: {e}")))
    }

    /// The TCP socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> &TcpStream {
        &self.shared.socket
    }

    /// A reader of the session's plaintext (one at a time).
    pub fn reader(&self) -> std::io::Result<TlsReader> {
        Ok(TlsReader {
            shared: self.shared.clone(),
            socket: self.shared.socket.try_clone()?,
            raw: Vec::new(),
            consumed: 0,
        })
    }

    /// Write all of `buf` into the session.
    pub fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        let _writing = lock(&self.shared.writing);
        let mut out = Vec::with_capacity(buf.len() + 64);
        {
            let mut conn = lock(&self.shared.conn);
            // The session buffers a limited amount: seal in pieces, draining each.
            let mut rest = buf;
            while !rest.is_empty() {
                let n = conn.writer().write(rest)?;
                rest = &rest[n..];
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
                if n == 0 && !conn.wants_write() {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
            }
        }
        (&self.shared.socket).write_all(&out)
    }

    /// Shut the socket down both ways (a blocked reader returns).
    pub fn shutdown(&self) {
        let _ = self.shared.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl Write for TlsChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        TlsChannel::write_all(self, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads a [`TlsChannel`]'s plaintext: socket reads happen without the session's lock,
/// so writers are never held up by a reader waiting for bytes.
pub struct TlsReader {
    shared: Arc<Shared>,
    socket: TcpStream,
    raw: Vec<u8>,
    consumed: usize,
}

impl TlsReader {
    /// Feed bytes read from the socket to the session until it has plaintext to hand
    /// out or they are all taken; answer what the session needs answered.
    fn feed(&mut self) -> std::io::Result<()> {
        let mut conn = lock(&self.shared.conn);
        while self.consumed < self.raw.len() {
            let mut rest = &self.raw[self.consumed..];
            let n = conn.read_tls(&mut rest)?;
            self.consumed += n;
            conn.process_new_packets()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if n == 0 || !conn.wants_read() {
                break;
            }
        }
        let reply = conn.wants_write();
        drop(conn);
        if reply {
            // Rare (a key update): answered under the writers' lock, in order.
            let _writing = lock(&self.shared.writing);
            let mut bytes = Vec::new();
            {
                let mut conn = lock(&self.shared.conn);
                while conn.wants_write() {
                    conn.write_tls(&mut bytes)?;
                }
            }
            (&self.shared.socket).write_all(&bytes)?;
        }
        Ok(())
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match lock(&self.shared.conn).reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.consumed < self.raw.len() {
                self.feed()?;
                continue;
            }
            // Nothing buffered: wait for the socket, without holding the session.
            self.raw.resize(64 << 10, 0);
            self.consumed = 0;
            let n = match self.socket.read(&mut self.raw) {
                Ok(n) => n,
                Err(e) => {
                    self.raw.clear();
                    return Err(e);
                }
            };
            self.raw.truncate(n);
            if n == 0 {
                // The peer closed: rustls says whether that was clean (close_notify).
                let mut conn = lock(&self.shared.conn);
                conn.read_tls(&mut &[][..])?;
                conn.process_new_packets()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                return match conn.reader().read(out) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                    Err(e) => Err(e),
                };
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A lab CA and appliance identities, written under a temporary directory.
    pub(crate) struct Lab {
        pub dir: PathBuf,
        ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Lab {
        pub(crate) fn new(name: &str) -> Lab {
            let dir = std::env::temp_dir().join(format!("dwcp-tls-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "test CA");
            let ca =
                rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                    .unwrap();
            std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
            Lab { dir, ca }
        }

        pub(crate) fn identity(&self, name: &str, peers: &[&str]) -> Arc<Identity> {
            let mut params =
                rcgen::CertificateParams::new(vec![name.to_string(), "127.0.0.1".into()]).unwrap();
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let cert_path = self.dir.join(format!("{name}.pem"));
            let key_path = self.dir.join(format!("{name}-key.pem"));
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            Identity::load(&SecurityFiles {
                cert: cert_path,
                key: key_path,
                ca: self.dir.join("ca.pem"),
                peers: peers.iter().map(|p| p.to_string()).collect(),
            })
            .unwrap()
        }
    }

    #[test]
    fn both_ends_authenticate_exchange_both_ways_and_derive_the_same_keys() {
        let lab = Lab::new("exchange");
        let a = lab.identity("appliance-a", &["appliance-b"]);
        let b = lab.identity("appliance-b", &[]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let never = AtomicBool::new(false);
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut prefix = [0u8; 4];
            socket.read_exact(&mut prefix).unwrap();
            assert!(is_tls_hello(&prefix));
            let never = AtomicBool::new(false);
            let deadline = Instant::now() + Duration::from_secs(5);
            let channel = accept(&b, socket, &prefix, deadline, &never).unwrap();
            assert_eq!(channel.authorized().unwrap(), "appliance-a");
            let mut reader = channel.reader().unwrap();
            let mut got = [0u8; 5];
            reader.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello");
            channel.write_all(&vec![7u8; 100_000]).unwrap();
            channel.session_keys(2).unwrap().binding(1)
        });
        let socket = TcpStream::connect(addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let channel = connect(&a, socket, addr.ip(), deadline, &never).unwrap();
        assert_eq!(channel.authorized().unwrap(), "appliance-b");
        channel.write_all(b"hello").unwrap();
        let mut reader = channel.reader().unwrap();
        let mut big = vec![0u8; 100_000];
        reader.read_exact(&mut big).unwrap();
        assert!(big.iter().all(|&b| b == 7));
        let ours = channel.session_keys(2).unwrap().binding(1);
        assert_eq!(server.join().unwrap(), ours);
        let _ = std::fs::remove_dir_all(&lab.dir);
    }
}
