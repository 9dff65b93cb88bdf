//! Helpers for the end-to-end tests in `tests/tests/`: a source and a destination
//! appliance in one process, joined over loopback; the reference guest images
//! ([`images`]); migrations across the WAN emulator ([`wan`]).

pub mod images;
pub mod wan;

use dwcp_dataplane::dirty::{DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{
    self, DestConfig, DestMemory, DestReport, MigrationError, MigrationReport, SourceConfig,
};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::GuestMemory;
use dwcp_hugepages::PagePreference;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A lab CA and two appliance certificates (appliance-a, appliance-b on loopback),
/// made once per test process.
pub fn lab() -> &'static dwcp_control::certs::Written {
    static LAB: std::sync::OnceLock<dwcp_control::certs::Written> = std::sync::OnceLock::new();
    LAB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dwcp-test-certs-{}", std::process::id()));
        dwcp_control::certs::init(&dir, &[]).expect("lab certificates")
    })
}

/// Configure `config` with lab appliance `which`'s identity (0: a, 1: b).
pub fn secure(config: &mut dwcp_control::config::Config, which: usize) {
    let lab = lab();
    let (_, cert, key) = &lab.appliances[which];
    config.security.cert = Some(cert.clone());
    config.security.key = Some(key.clone());
    config.security.ca = Some(lab.ca.clone());
}

/// Lab appliance `which`'s identity (0: a, 1: b), as the engine takes it.
pub fn lab_identity(which: usize) -> Arc<dwcp_dataplane::security::Identity> {
    lab().identity(which).expect("a lab identity")
}

/// Make `s`'s last close a reset (SO_LINGER 0), as a failing path's would be.
pub fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct of the size passed, read by the call only.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A relay on loopback in front of `dest`: each connection it accepts is handed, with a
/// connection of its own to `dest`, to `relay` on a thread of its own (tests that cut,
/// hold or tamper with one stream). Returns the relay's address.
pub fn relay_to(
    dest: SocketAddr,
    relay: impl Fn(TcpStream, TcpStream) + Clone + Send + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("relay listener");
    let addr = listener.local_addr().expect("relay address");
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(dest) else {
                return;
            };
            let relay = relay.clone();
            std::thread::spawn(move || relay(client, server));
        }
    });
    addr
}

/// The data stream a relayed connection opens, as `(stream id, generation)`, read from
/// its hello without taking it off the socket (the layout of
/// [`dwcp_dataplane::wire::StreamHello::encode`]); `None` for any other connection.
pub fn peek_stream_hello(client: &TcpStream) -> Option<(u16, u16)> {
    let mut hello = [0u8; dwcp_dataplane::wire::STREAM_HELLO_LEN];
    let whole = client.peek(&mut hello).ok() == Some(hello.len());
    (whole && hello[..4] == dwcp_dataplane::wire::STREAM_MAGIC).then(|| {
        (
            u16::from_le_bytes([hello[6], hello[7]]),
            u16::from_le_bytes([hello[26], hello[27]]),
        )
    })
}

/// A relay's way back: copy `server` to `client` on a thread of its own.
pub fn pipe_back(client: &TcpStream, server: &TcpStream) {
    let (from, to) = (
        server.try_clone().expect("relay socket"),
        client.try_clone().expect("relay socket"),
    );
    std::thread::spawn(move || pipe(from, to));
}

/// Copy `from` to `to` until `from` ends, then end `to`'s writing side.
pub fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Say why a test did not run, past the harness's output capture.
pub fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {reason}");
}

/// A simulated guest of `bytes` (transparent huge pages), filled like a real guest's
/// memory from `seed` and running `workload`, with the uffd-wp dirty log tracking it.
pub fn running_guest(
    bytes: usize,
    workload: &GuestWorkload,
    seed: u64,
) -> (
    Arc<GuestMemory>,
    SimulatedGuest,
    Box<dyn dwcp_dataplane::dirty::DirtyLog>,
) {
    let memory = Arc::new(
        GuestMemory::anonymous(bytes, PagePreference::TransparentHuge).expect("guest memory"),
    );
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, seed);
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).expect("dirty log");
    let guest = SimulatedGuest::start(memory.clone(), workload, opened.marker.clone());
    (memory, guest, opened.log)
}

/// A destination appliance on a thread of its own, listening on a loopback port:
/// its address, and the thread that returns its report.
pub fn spawn_destination(
    dest: &DestConfig,
) -> (SocketAddr, JoinHandle<Result<DestReport, MigrationError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = listener.local_addr().expect("address");
    let dest_config = dest.clone();
    let receiver = std::thread::spawn(move || {
        engine::receive(
            &listener,
            DestMemory::Allocate(PagePreference::TransparentHuge),
            &dest_config,
        )
    });
    (addr, receiver)
}

/// A destination receiving up to `max_sessions` sessions at once (the daemon's
/// dispatcher of concurrent sessions, [`engine::SessionPorts`]), until `stop` is set:
/// each session's outcome goes to the returned channel, but a connection that only
/// passed a resume on to its session ([`MigrationError::PassedOn`]) and one on which
/// nobody came.
pub fn spawn_destination_at_once(
    dest: &DestConfig,
    max_sessions: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    SocketAddr,
    std::sync::mpsc::Receiver<Result<DestReport, MigrationError>>,
    JoinHandle<()>,
) {
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = listener.local_addr().expect("address");
    let config = dest.clone();
    let (results, outcomes) = std::sync::mpsc::channel();
    let dispatcher = std::thread::spawn(move || {
        let mut ports = engine::SessionPorts::new(&listener, max_sessions);
        ports.set_identity(config.security.clone());
        std::thread::scope(|scope| {
            // Acquire: pairs with the caller's Release store.
            while !stop.load(Ordering::Acquire) {
                let Some(mut lane) = ports.dispatch(
                    std::time::Duration::from_millis(50),
                    config.handshake_timeout,
                    &stop,
                ) else {
                    continue;
                };
                let (config, results, stop) = (&config, results.clone(), &stop);
                scope.spawn(move || {
                    let progress = engine::ReceiveProgress::default();
                    let result = engine::receive_lane(
                        &mut lane,
                        DestMemory::Allocate(PagePreference::TransparentHuge),
                        config,
                        stop,
                        &progress,
                    );
                    drop(lane);
                    let nobody = progress.snapshot().peer.is_none() && result.is_err();
                    if !nobody && !matches!(result, Err(MigrationError::PassedOn(_))) {
                        let _ = results.send(result);
                    }
                });
            }
        });
    });
    (addr, outcomes, dispatcher)
}

/// Everything a finished migration left behind.
pub struct Outcome {
    /// The source's result.
    pub source: Result<MigrationReport, MigrationError>,
    /// The destination's result.
    pub dest: Result<DestReport, MigrationError>,
    /// The source's memory.
    pub memory: Arc<GuestMemory>,
    /// The guest (paused after a successful migration, running otherwise).
    pub guest: SimulatedGuest,
}

/// Migrate `bytes` of anonymous guest memory, filled like a real guest and written by
/// `workload` throughout, from a source to a destination in this process.
pub fn migrate_live(
    bytes: usize,
    workload: &GuestWorkload,
    dirty: DirtyLogKind,
    source: &SourceConfig,
    dest: &DestConfig,
) -> Outcome {
    let memory = Arc::new(
        GuestMemory::anonymous(bytes, PagePreference::TransparentHuge).expect("guest memory"),
    );
    migrate_memory(memory, workload, dirty, source, dest)
}

/// [`migrate_live`] for guest memory the caller made (file-backed, say).
pub fn migrate_memory(
    memory: Arc<GuestMemory>,
    workload: &GuestWorkload,
    dirty: DirtyLogKind,
    source: &SourceConfig,
    dest: &DestConfig,
) -> Outcome {
    migrate_memory_with_policy(memory, workload, dirty, source, dest, None)
}

/// [`migrate_memory`] with a codec policy choosing codecs live.
pub fn migrate_memory_with_policy<'a>(
    memory: Arc<GuestMemory>,
    workload: &GuestWorkload,
    dirty: DirtyLogKind,
    source: &'a SourceConfig,
    dest: &DestConfig,
    policy: Option<&'a mut dyn dwcp_dataplane::codec::policy::CodecPolicy>,
) -> Outcome {
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
    migrate_memory_as_it_is(memory, workload, dirty, source, dest, policy)
}

/// [`migrate_memory_with_policy`] for memory the caller filled (or left with holes).
pub fn migrate_memory_as_it_is<'a>(
    memory: Arc<GuestMemory>,
    workload: &GuestWorkload,
    dirty: DirtyLogKind,
    source: &'a SourceConfig,
    dest: &DestConfig,
    policy: Option<&'a mut dyn dwcp_dataplane::codec::policy::CodecPolicy>,
) -> Outcome {
    let opened = open_dirty_log(&memory, dirty).expect("dirty log");
    let guest = SimulatedGuest::start(memory.clone(), workload, opened.marker.clone());
    let (addr, receiver) = spawn_destination(dest);
    let source = engine::migrate_with_policy(
        addr,
        memory.clone(),
        &guest,
        opened.log,
        source,
        policy,
        &mut |_| {},
    );
    let dest = receiver.join().expect("destination thread");
    Outcome {
        source,
        dest,
        memory,
        guest,
    }
}

/// A migration driven live: `drive` runs on this thread while the migration runs on
/// another, with the migration's live control (epoch 1 is `settings`) and its reports;
/// when `drive` returns, the migration is waited for.
pub fn migrate_driven(
    bytes: usize,
    workload: &GuestWorkload,
    source: &SourceConfig,
    dest: &DestConfig,
    settings: engine::LiveSettings,
    drive: impl FnOnce(&engine::LiveControl, &crossbeam::channel::Receiver<engine::LiveReport>),
) -> Outcome {
    let memory = Arc::new(
        GuestMemory::anonymous(bytes, PagePreference::TransparentHuge).expect("guest memory"),
    );
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, workload.seed);
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).expect("dirty log");
    let guest = SimulatedGuest::start(memory.clone(), workload, opened.marker.clone());
    let (addr, receiver) = spawn_destination(dest);
    let (reports_tx, reports) = engine::LiveControl::report_channel(1024);
    let live = engine::LiveControl::new(1, settings, Some(reports_tx));
    let source = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            engine::migrate_live(
                addr,
                memory.clone(),
                &guest,
                opened.log,
                source,
                None,
                Some(&live),
                &mut |_| {},
            )
        });
        drive(&live, &reports);
        running.join().expect("migration thread")
    });
    let dest = receiver.join().expect("destination thread");
    Outcome {
        source,
        dest,
        memory,
        guest,
    }
}
