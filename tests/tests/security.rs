//! Authenticated sessions end to end, and the attacks on them: certificates that must
//! not pass (none, another CA's, expired, a valid appliance pinned out), a peer that
//! completes TLS and then sends garbage, and a man in the middle on the data streams
//! (a flipped bit in a record, a record replayed on another stream, a stream cut
//! inside a record). Each attack gets a clear error on both sides; the destination
//! keeps serving on the same port, and a good migration succeeds right after.

use dwcp_control::certs::{LabCa, Validity};
use dwcp_dataplane::dirty::{DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{
    self, Acceptor, DestConfig, DestMemory, DestReport, MigrationError, MigrationReport,
    ReceiveProgress, SourceConfig,
};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_dataplane::security::{Identity, SecurityFiles};
use dwcp_dataplane::transport::{TransportChoice, TransportConfig};
use dwcp_hugepages::PagePreference;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const GUEST: usize = 32 << 20;

/// A site: its CA, and the directory its files go in.
struct Site {
    ca: LabCa,
    dir: PathBuf,
}

impl Site {
    fn new(name: &str) -> Site {
        let dir = std::env::temp_dir().join(format!("dwcp-sec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = LabCa::new(&format!("{name} CA")).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        Site { ca, dir }
    }

    /// Appliance `name` of this site, trusting `trusts`' CA, accepting `pinned` peers.
    fn appliance(
        &self,
        name: &str,
        validity: Validity,
        trusts: &Site,
        pinned: &[&str],
    ) -> Arc<Identity> {
        let (cert, key) = self
            .ca
            .issue(name, &["127.0.0.1".into()], validity)
            .unwrap();
        let cert_path = self.dir.join(format!("{name}.pem"));
        let key_path = self.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        Identity::load(&SecurityFiles {
            cert: cert_path,
            key: key_path,
            ca: trusts.dir.join("ca.pem"),
            peers: pinned.iter().map(|p| p.to_string()).collect(),
        })
        .unwrap()
    }
}

fn valid() -> Validity {
    Validity::years_from_now(1)
}

/// A destination serving session after session on one port, as the daemon does.
/// How a destination takes sessions: one at a time through its gate (into a memory
/// file or a VM), or several at once through the dispatcher (into its own memory, the
/// daemon's default). Every attack is tried on both.
#[derive(Clone, Copy, Debug)]
enum Receiving {
    OneAtATime,
    AtOnce,
}

const BOTH: [Receiving; 2] = [Receiving::OneAtATime, Receiving::AtOnce];

struct Destination {
    addr: SocketAddr,
    results: Receiver<Result<DestReport, MigrationError>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Destination {
    fn start(config: DestConfig) -> Destination {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, results) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut gate = Acceptor::new(&listener);
            while !stopping.load(Ordering::Acquire) {
                let progress = ReceiveProgress::default();
                let result = engine::receive_through(
                    &mut gate,
                    DestMemory::Allocate(PagePreference::TransparentHuge),
                    &config,
                    &stopping,
                    None,
                    &progress,
                );
                if progress.snapshot().peer.is_none() && result.is_err() {
                    continue; // nobody came
                }
                if tx.send(result).is_err() {
                    return;
                }
            }
        });
        Destination {
            addr,
            results,
            stop,
            thread: Some(thread),
        }
    }

    /// A destination taking sessions as `receiving` says (at once: up to four).
    fn start_as(receiving: Receiving, config: DestConfig) -> Destination {
        match receiving {
            Receiving::OneAtATime => Destination::start(config),
            Receiving::AtOnce => Destination::start_at_once(config, 4),
        }
    }

    /// A destination that takes up to `max_sessions` sessions at once (the daemon's
    /// dispatcher).
    fn start_at_once(config: DestConfig, max_sessions: usize) -> Destination {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, results, thread) =
            dwcp_tests::spawn_destination_at_once(&config, max_sessions, stop.clone());
        Destination {
            addr,
            results,
            stop,
            thread: Some(thread),
        }
    }

    /// Stop serving (the stop is the sessions' cancel), wait for it, and hand back what
    /// sessions ended meanwhile.
    fn stop(mut self) -> Vec<Result<DestReport, String>> {
        self.halt();
        self.results
            .try_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The next session's outcome.
    fn next(&self) -> Result<DestReport, String> {
        self.results
            .recv_timeout(Duration::from_secs(60))
            .expect("the destination ended a session")
            .map_err(|e| e.to_string())
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.halt();
    }
}

fn dest_config(identity: &Arc<Identity>) -> DestConfig {
    DestConfig {
        security: Some(identity.clone()),
        timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(3),
        ..DestConfig::default()
    }
}

fn source_config(identity: Option<&Arc<Identity>>, choice: TransportChoice) -> SourceConfig {
    SourceConfig {
        streams: 4,
        security: identity.cloned(),
        transport: TransportConfig {
            choice,
            ..TransportConfig::default()
        },
        connect_timeout: Duration::from_secs(5),
        reply_timeout: Duration::from_secs(10),
        ..SourceConfig::default()
    }
}

/// A live migration of a small simulated guest to `peer`; the source's memory with
/// the result.
fn migrate(
    peer: SocketAddr,
    config: &SourceConfig,
) -> (Result<MigrationReport, String>, Arc<GuestMemory>) {
    let memory = Arc::new(GuestMemory::anonymous(GUEST, PagePreference::TransparentHuge).unwrap());
    let workload = GuestWorkload {
        dirty_rate: 5e6,
        ..GuestWorkload::default()
    };
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, 7);
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).unwrap();
    let guest = SimulatedGuest::start(memory.clone(), &workload, opened.marker.clone());
    let result = engine::migrate(
        peer,
        memory.clone(),
        &guest,
        opened.log,
        config,
        &mut |_| {},
    );
    guest.stop();
    (result.map_err(|e| e.to_string()), memory)
}

/// A good migration through `dest` succeeds, sealed, memory identical.
fn good_migration(dest: &Destination, source: &Arc<Identity>) {
    let (report, memory) = migrate(
        dest.addr,
        &source_config(Some(source), TransportChoice::Auto),
    );
    let report = report.expect("a good migration after the attack");
    let received = dest
        .next()
        .expect("the destination's side of the good migration");
    let security = report
        .transport
        .security
        .as_ref()
        .expect("an authenticated session");
    assert!(security.tls.contains("AES_256_GCM"), "{security:?}");
    assert!(received.security.is_some());
    assert_eq!(memory.first_difference(&received.memory), None);
}

fn contains_all(text: &str, parts: &[&str]) -> bool {
    parts.iter().all(|p| text.contains(p))
}

#[test]
fn sealed_sessions_migrate_over_both_transports() {
    let started = Instant::now();
    let site = Site::new("ok");
    let a = site.appliance("appliance-a", valid(), &site, &["appliance-b"]);
    let b = site.appliance("appliance-b", valid(), &site, &["appliance-a"]);
    let dest = Destination::start(dest_config(&b));
    for choice in [TransportChoice::IoUring, TransportChoice::Plain] {
        let (report, memory) = migrate(dest.addr, &source_config(Some(&a), choice));
        let report = report.unwrap_or_else(|e| panic!("{choice:?}: {e}"));
        let received = dest.next().expect("destination");
        assert_eq!(
            report.transport.security.as_ref().unwrap().peer,
            "appliance-b"
        );
        assert_eq!(received.security.as_ref().unwrap().peer, "appliance-a");
        assert_eq!(
            memory.first_difference(&received.memory),
            None,
            "{choice:?}"
        );
    }
    eprintln!(
        "sealed migrations took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn certificates_that_must_not_pass_are_refused_on_both_sides() {
    let started = Instant::now();
    let site = Site::new("site");
    let other = Site::new("other");
    let b = site.appliance("appliance-b", valid(), &site, &["appliance-a"]);
    let a = site.appliance("appliance-a", valid(), &site, &[]);
    for receiving in BOTH {
        eprintln!("--- destination taking sessions {receiving:?}");
        let dest = Destination::start_as(receiving, dest_config(&b));
        let expired = Validity {
            from_year: 2020,
            until_year: 2021,
        };
        // What the source presents, and what each side must say.
        type Case<'a> = (&'a str, Arc<Identity>, &'a [&'a str], &'a [&'a str]);
        let cases: Vec<Case> = vec![
            (
                "another CA's certificate",
                other.appliance("appliance-a", valid(), &site, &[]),
                &["does not trust our certificate"],
                &["not signed by this site's CA"],
            ),
            (
                "an expired certificate",
                site.appliance("appliance-old", expired, &site, &[]),
                &["expired"],
                &["expired"],
            ),
            (
                "a valid appliance pinned out",
                site.appliance("appliance-c", valid(), &site, &[]),
                &[
                    "refused",
                    "appliance-c",
                    "none of the pinned appliance names (appliance-a)",
                ],
                &[
                    "appliance-c",
                    "none of the pinned appliance names (appliance-a)",
                ],
            ),
        ];
        for (what, identity, source_says, dest_says) in cases {
            let (report, _) = migrate(
                dest.addr,
                &source_config(Some(&identity), TransportChoice::Auto),
            );
            let source_error = report.expect_err(what);
            let dest_error = dest.next().expect_err(what);
            eprintln!("{what}:\n  source: {source_error}\n  destination: {dest_error}");
            assert!(
                contains_all(&source_error, source_says),
                "{what}: source said {source_error}"
            );
            assert!(
                contains_all(&dest_error, dest_says),
                "{what}: destination said {dest_error}"
            );
        }
        // A source without certificates (--insecure) against this destination.
        let (report, _) = migrate(dest.addr, &source_config(None, TransportChoice::Auto));
        let source_error = report.expect_err("plain source");
        let dest_error = dest.next().expect_err("plain source");
        eprintln!("a plain source:\n  source: {source_error}\n  destination: {dest_error}");
        assert!(
            source_error.contains("takes only authenticated sessions"),
            "{source_error}"
        );
        assert!(dest_error.contains("--insecure"), "{dest_error}");
        good_migration(&dest, &a);
        // And a source with certificates against a destination without (--insecure).
        let plain_dest = Destination::start_as(receiving, DestConfig::default());
        let (report, _) = migrate(
            plain_dest.addr,
            &source_config(Some(&a), TransportChoice::Auto),
        );
        let source_error = report.expect_err("plain destination");
        let dest_error = plain_dest.next().expect_err("plain destination");
        eprintln!("a plain destination:\n  source: {source_error}\n  destination: {dest_error}");
        assert!(
            source_error.contains("runs without certificates"),
            "{source_error}"
        );
        assert!(
            dest_error.contains("runs without certificates"),
            "{dest_error}"
        );
    }
    eprintln!(
        "certificate refusals took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A TLS client with `files`' certificate (or none), for what a dwcp source never does.
fn raw_tls(
    peer: SocketAddr,
    site: &Site,
    cert: Option<(&str, &str)>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(site.dir.join("ca.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(site.dir.join(cert)).unwrap()],
                PrivateKeyDer::from_pem_file(site.dir.join(key)).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::IpAddress(peer.ip().into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let socket = TcpStream::connect(peer).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    rustls::StreamOwned::new(conn, socket)
}

#[test]
fn clients_without_a_certificate_or_speaking_garbage_inside_tls_are_refused() {
    let started = Instant::now();
    let site = Site::new("raw");
    let b = site.appliance("appliance-b", valid(), &site, &[]);
    let a = site.appliance("appliance-a", valid(), &site, &[]);
    for receiving in BOTH {
        eprintln!("--- destination taking sessions {receiving:?}");
        let dest = Destination::start_as(receiving, dest_config(&b));
        // No client certificate: the handshake fails; the client hears why.
        let mut tls = raw_tls(dest.addr, &site, None);
        let mut buf = [0u8; 16];
        let client_error = tls
            .write_all(b"x")
            .and_then(|_| tls.flush())
            .and_then(|_| tls.read(&mut buf).map(|_| ()))
            .expect_err("no certificate");
        let dest_error = dest.next().expect_err("no certificate");
        eprintln!("no client certificate:\n  client: {client_error}\n  destination: {dest_error}");
        assert!(
            client_error.to_string().contains("CertificateRequired"),
            "{client_error}"
        );
        assert!(
            dest_error.contains("presented no certificate"),
            "{dest_error}"
        );
        // A valid appliance that completes TLS, then sends garbage.
        let mut tls = raw_tls(
            dest.addr,
            &site,
            Some(("appliance-a.pem", "appliance-a-key.pem")),
        );
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        tls.flush().unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        let dest_error = dest.next().expect_err("garbage");
        eprintln!(
            "garbage inside TLS:\n  destination: {dest_error}\n  client got {} bytes back",
            answer.len()
        );
        assert!(dest_error.contains("does not speak dwcp"), "{dest_error}");
        assert!(
            !answer.is_empty(),
            "the destination says why, inside the session"
        );
        good_migration(&dest, &a);
    }
    eprintln!(
        "raw TLS clients took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// What the man in the middle does to the data streams.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Flip one bit this far into stream 1's records.
    FlipBit(usize),
    /// Put stream 0's first record in front of stream 1's.
    ReplayOnOtherStream,
    /// Cut stream 1's first connection this far into its records (inside a record).
    /// Only the first: cut again after each restore, one cut fell into the paused
    /// window under load, where a lost stream ends the migration by design.
    Truncate(usize),
}

/// A man in the middle: forwards connections to `dest`, control streams untouched,
/// data streams (known by their hello) tampered with as told.
fn man_in_the_middle(dest: SocketAddr, tamper: Tamper) -> SocketAddr {
    let first_record: Arc<(Mutex<Option<Vec<u8>>>, Condvar)> = Arc::default();
    let cut = Arc::new(AtomicBool::new(false));
    dwcp_tests::relay_to(dest, move |client, server| {
        relay(client, server, tamper, &first_record, &cut)
    })
}

fn relay(
    mut client: TcpStream,
    server: TcpStream,
    tamper: Tamper,
    first_record: &(Mutex<Option<Vec<u8>>>, Condvar),
    cut: &AtomicBool,
) {
    let back = (server.try_clone().unwrap(), client.try_clone().unwrap());
    std::thread::spawn(move || dwcp_tests::pipe(back.0, back.1));
    let mut hello = [0u8; 48];
    let mut server = server;
    if client.read_exact(&mut hello[..4]).is_err() {
        return;
    }
    if &hello[..4] != b"DWCS" {
        let _ = server.write_all(&hello[..4]);
        return dwcp_tests::pipe(client, server);
    }
    if client.read_exact(&mut hello[4..]).is_err() {
        return;
    }
    let stream = u16::from_le_bytes([hello[6], hello[7]]);
    let _ = server.write_all(&hello);
    match (tamper, stream) {
        (Tamper::ReplayOnOtherStream, 0) => {
            // Pass stream 0 on, keeping a copy of its first record.
            let mut header = [0u8; 8];
            if client.read_exact(&mut header).is_err() {
                return;
            }
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let mut record = header.to_vec();
            record.resize(8 + len, 0);
            if client.read_exact(&mut record[8..]).is_err() {
                return;
            }
            let _ = server.write_all(&record);
            *first_record.0.lock().unwrap() = Some(record);
            first_record.1.notify_all();
            dwcp_tests::pipe(client, server);
        }
        (Tamper::ReplayOnOtherStream, 1) => {
            let (lock, ready) = first_record;
            let guard = lock.lock().unwrap();
            let (guard, _) = ready
                .wait_timeout_while(guard, Duration::from_secs(10), |r| r.is_none())
                .unwrap();
            if let Some(record) = guard.clone() {
                let _ = server.write_all(&record);
            }
            drop(guard);
            dwcp_tests::pipe(client, server);
        }
        (Tamper::FlipBit(at), 1) => {
            let mut buf = vec![0u8; at + 1];
            if client.read_exact(&mut buf).is_err() {
                return;
            }
            buf[at] ^= 0x04;
            let _ = server.write_all(&buf);
            dwcp_tests::pipe(client, server);
        }
        (Tamper::Truncate(at), 1) if !cut.swap(true, Ordering::SeqCst) => {
            let mut buf = vec![0u8; at];
            if client.read_exact(&mut buf).is_ok() {
                let _ = server.write_all(&buf);
            }
            let _ = server.shutdown(std::net::Shutdown::Both);
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        _ => dwcp_tests::pipe(client, server),
    }
}

#[test]
fn tampered_and_replayed_records_end_the_session_and_a_truncated_stream_is_lost() {
    let started = Instant::now();
    let site = Site::new("mitm");
    let a = site.appliance("appliance-a", valid(), &site, &[]);
    let b = site.appliance("appliance-b", valid(), &site, &[]);
    for receiving in BOTH {
        eprintln!("--- destination taking sessions {receiving:?}");
        let dest = Destination::start_as(receiving, dest_config(&b));
        let cases = [
            (Tamper::FlipBit(100_000), "failed authentication"),
            (Tamper::ReplayOnOtherStream, "sealed for another stream"),
        ];
        for (tamper, says) in cases {
            let proxy = man_in_the_middle(dest.addr, tamper);
            let (report, _) = migrate(proxy, &source_config(Some(&a), TransportChoice::Auto));
            let source_error = report.expect_err("tampered");
            let dest_error = dest.next().expect_err("tampered");
            eprintln!("{tamper:?}:\n  source: {source_error}\n  destination: {dest_error}");
            // The destination names stream 1 and what was wrong; the source hears it.
            assert!(dest_error.contains("stream 1"), "{tamper:?}: {dest_error}");
            assert!(dest_error.contains(says), "{tamper:?}: {dest_error}");
            assert!(
                source_error.contains(says) || source_error.contains("stream 1"),
                "{tamper:?}: the source said {source_error}"
            );
        }
        // A stream cut short is a lost stream, not a corrupt one: nothing of its
        // unfinished record was placed, and its pages go to the other streams.
        let proxy = man_in_the_middle(dest.addr, Tamper::Truncate(100_000));
        let (report, memory) = migrate(proxy, &source_config(Some(&a), TransportChoice::Auto));
        let report = report.expect("a session that loses a stream carries on");
        let received = dest.next().expect("the destination carries on");
        eprintln!(
            "truncated: source lost {:?}; destination lost {:?}",
            report.transport.streams_lost, received.streams_lost
        );
        assert!(
            report.transport.streams_lost.iter().any(|l| l.stream == 1),
            "{:?}",
            report.transport.streams_lost
        );
        assert!(
            received.streams_lost.iter().any(|(s, _)| *s == 1),
            "{:?}",
            received.streams_lost
        );
        assert_eq!(memory.first_difference(&received.memory), None);
        good_migration(&dest, &a);
    }
    eprintln!("tampering took {:.1} s", started.elapsed().as_secs_f64());
}

/// The first bytes of a TLS ClientHello to `addr`, then nothing.
fn stalled_handshake(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x80, 0x01]).unwrap();
    s
}

/// Whether the destination still holds `s` open (nothing to read, no end).
fn still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let open =
        matches!((&*s).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

#[test]
fn stalled_tls_handshakes_hold_up_no_one_end_at_their_deadline_and_stop_at_a_cancel() {
    let started = Instant::now();
    let site = Site::new("stall");
    let a = site.appliance("appliance-a", valid(), &site, &[]);
    let b = site.appliance("appliance-b", valid(), &site, &[]);
    // Deadlines no test waits out: were handshakes served one after another, the good
    // migration below would wait for every stalled one in turn; and only a cancel can
    // end the wait on them.
    for receiving in BOTH {
        eprintln!("--- destination taking sessions {receiving:?}");
        let dest = Destination::start_as(
            receiving,
            DestConfig {
                handshake_timeout: Duration::from_secs(3600),
                timeout: Duration::from_secs(3600),
                ..dest_config(&b)
            },
        );
        let stalled: Vec<TcpStream> = (0..8).map(|_| stalled_handshake(dest.addr)).collect();
        // Should the stop below not end the wait, the stalled peers give up after 30 s: their
        // handshakes then fail, and that failure is a session the destination reports.
        let closers: Vec<TcpStream> = stalled.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            for c in closers {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        good_migration(&dest, &a);
        // It went through while every stalled handshake was still pending.
        assert!(
            stalled.iter().all(still_open),
            "a stalled handshake was closed early"
        );
        // Told to stop with handshakes pending, the destination stops without waiting for
        // any of them to end: no session ended meanwhile.
        let stopping = Instant::now();
        let ended = dest.stop();
        eprintln!(
            "stopped with 8 handshakes stalled in {:?}",
            stopping.elapsed()
        );
        assert!(
            ended.is_empty(),
            "the stop waited for the stalled handshakes: {ended:?}"
        );
        drop(stalled);
        // A stalled handshake is closed at its deadline.
        let dest = Destination::start_as(
            receiving,
            DestConfig {
                handshake_timeout: Duration::from_secs(1),
                ..dest_config(&b)
            },
        );
        let mut stalled = stalled_handshake(dest.addr);
        stalled
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let closed = match stalled.read(&mut [0u8; 64]) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        assert!(closed, "the stalled handshake was not closed");
        good_migration(&dest, &a);
    }
    eprintln!(
        "stalled handshakes took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_second_source_is_told_the_destination_is_busy_and_the_first_migration_completes() {
    let started = Instant::now();
    let site = Site::new("busy");
    let a = site.appliance("appliance-a", valid(), &site, &[]);
    let b = site.appliance("appliance-b", valid(), &site, &[]);
    let dest = Destination::start(dest_config(&b));
    // A first migration held to 2 MB/s per stream: it runs for seconds.
    let mut slow = source_config(Some(&a), TransportChoice::Auto);
    slow.transport.socket.pacing_rate = Some(2_000_000);
    let addr = dest.addr;
    let first = std::thread::spawn(move || migrate(addr, &slow));
    std::thread::sleep(Duration::from_millis(500));
    // A second one meanwhile, authenticated, and one without certificates.
    let (second, _) = migrate(dest.addr, &source_config(Some(&a), TransportChoice::Auto));
    let second = second.expect_err("a second session");
    eprintln!("second source: {second}");
    assert!(second.contains("busy"), "{second}");
    let (first, memory) = first.join().unwrap();
    first.expect("the first migration");
    let received = dest.next().expect("the first session");
    assert_eq!(memory.first_difference(&received.memory), None);
    // Once it has finished, the next one is served.
    good_migration(&dest, &a);
    eprintln!(
        "busy destination took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn sessions_run_at_once_up_to_max_sessions_and_the_next_hears_busy() {
    let started = Instant::now();
    let site = Site::new("at-once");
    let a = site.appliance("appliance-a", valid(), &site, &[]);
    let b = site.appliance("appliance-b", valid(), &site, &[]);
    let dest = Destination::start_at_once(dest_config(&b), 2);
    let addr = dest.addr;
    // Migrations held to 1 MB/s per stream: each runs for seconds.
    let slow = |a: &Arc<Identity>| {
        let mut slow = source_config(Some(a), TransportChoice::Auto);
        slow.transport.socket.pacing_rate = Some(1_000_000);
        slow
    };
    let first_config = slow(&a);
    let first = std::thread::spawn(move || migrate(addr, &first_config));
    std::thread::sleep(Duration::from_millis(500));
    // A second one, unpaced, goes through while the first still runs: one at a time,
    // it would have waited for the first to end.
    let (second, memory) = migrate(addr, &source_config(Some(&a), TransportChoice::Auto));
    second.expect("the second migration");
    assert!(
        !first.is_finished(),
        "the first (paced) migration ended before the second: the test proves nothing"
    );
    let received = dest.next().expect("the second session");
    assert_eq!(memory.first_difference(&received.memory), None);
    // With two running, a third is told the destination is busy, and why.
    let third_config = slow(&a);
    let third = std::thread::spawn(move || migrate(addr, &third_config));
    std::thread::sleep(Duration::from_millis(500));
    let (fourth, _) = migrate(addr, &source_config(Some(&a), TransportChoice::Auto));
    let fourth = fourth.expect_err("a session beyond max_sessions");
    eprintln!("fourth source: {fourth}");
    assert!(
        contains_all(&fourth, &["busy", "max_sessions = 2"]),
        "{fourth}"
    );
    assert!(
        !first.is_finished() && !third.is_finished(),
        "a paced migration ended before the refusal: the test proves nothing"
    );
    let refused = dest.next().expect_err("the refused session");
    assert!(refused.contains("max_sessions"), "{refused}");
    for (name, migration) in [("first", first), ("third", third)] {
        let (result, memory) = migration.join().unwrap();
        result.unwrap_or_else(|e| panic!("the {name} migration: {e}"));
        let received = dest.next().expect("a paced session");
        assert!(received.verified_pages > 0);
        let _ = memory;
    }
    // A refused session holds nothing: the next one is served.
    good_migration(&dest, &a);
    eprintln!(
        "sessions at once took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A destination that accepts connections and never answers: a cancel ends the
/// source's wait (for the TLS handshake, or for a plain session's welcome) at once.
#[test]
fn a_cancel_ends_a_source_waiting_on_a_silent_destination_at_once() {
    let site = Site::new("silent");
    let a = site.appliance("appliance-a", valid(), &site, &[]);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        // Accept and hold, saying nothing.
        let mut held = Vec::new();
        for c in silent.incoming().take(2) {
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(15));
    });
    for secure in [true, false] {
        let config = SourceConfig {
            reply_timeout: Duration::from_secs(60),
            ..source_config(secure.then_some(&a), TransportChoice::Auto)
        };
        let (error, took) = migrate_cancelled_after_500ms(addr, &config);
        eprintln!("secure {secure}: {error} ({took:?} after the cancel)");
        // Had the cancel not ended the wait, the handshake's 5 s deadline or the silent
        // peer's leaving after 15 s would have: neither says "cancelled".
        assert!(error.contains("cancelled: operator: test"), "{error}");
    }
    drop(held);
}

/// A destination that takes no more connections (its accept queue full, so the kernel
/// drops the SYNs): the source's TCP connect hangs, and a cancel ends it at once rather
/// than at the connect timeout.
#[test]
fn a_cancel_ends_a_source_whose_connect_hangs_at_once() {
    use std::os::fd::AsRawFd;
    let full = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on our own socket, shrinking its backlog to the least.
    assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
    let addr = full.local_addr().unwrap();
    // Fill the accept queue: connections that complete and are never accepted, until
    // one does not complete within 300 ms.
    let mut queued = Vec::new();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => break,
        }
        assert!(queued.len() < 16, "the accept queue never filled");
    }
    let config = SourceConfig {
        connect_timeout: Duration::from_secs(30),
        ..source_config(None, TransportChoice::Auto)
    };
    let (error, took) = migrate_cancelled_after_500ms(addr, &config);
    eprintln!("{error} ({took:?} after the cancel)");
    // Had the cancel not ended the connect, its 30 s timeout would have, saying
    // "connection timed out", not "cancelled".
    assert!(error.contains("cancelled: operator: test"), "{error}");
    drop(queued);
}

/// A migration of a small guest to `addr` with `config`, cancelled by its operator 0.5 s
/// after it starts: its error, and how long after the cancel it came.
fn migrate_cancelled_after_500ms(addr: SocketAddr, config: &SourceConfig) -> (String, Duration) {
    let memory = Arc::new(GuestMemory::anonymous(4 << 20, PagePreference::Small).unwrap());
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).unwrap();
    let guest = SimulatedGuest::start(
        memory.clone(),
        &GuestWorkload::default(),
        opened.marker.clone(),
    );
    let live = engine::LiveControl::new(
        1,
        engine::LiveSettings::from_config(&SourceConfig::default()),
        None,
    );
    let (result, took) = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            engine::migrate_live(
                addr,
                memory.clone(),
                &guest,
                opened.log,
                config,
                None,
                Some(&live),
                &mut |_| {},
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let cancelled = Instant::now();
        live.cancel("operator: test");
        (running.join().unwrap(), cancelled.elapsed())
    });
    guest.stop();
    (result.expect_err("cancelled").to_string(), took)
}
