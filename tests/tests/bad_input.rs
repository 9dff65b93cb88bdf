//! Peers that misbehave. The destination must end the session with an error naming
//! what was wrong and never write outside its memory (its memory has inaccessible
//! guard regions on both sides, so a stray write would crash this test); the source
//! must report the failure and keep its guest running. Anyone can reach the migration
//! port: a silent connection, a half-finished session or an outsized hello must not
//! hold up a real source.

use dwcp_dataplane::dirty::{DirtyLog, DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{
    self, Acceptor, DestConfig, DestMemory, DestReport, MigrationError, MigrationReport,
    ReceiveProgress, SourceConfig,
};
use dwcp_dataplane::guest::{ContentMix, GuestWorkload, SimulatedGuest, fill_memory};
use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_dataplane::wire::{
    self, CONTROL_MAGIC, ControlMessage, FRAME_HEADER_LEN, FrameHeader, Handshake, StreamHello,
    VERSION, caps,
};
use dwcp_hugepages::PagePreference;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

const PAGES: u64 = 256;

struct Dest {
    addr: SocketAddr,
    memory: Arc<GuestMemory>,
    handle: JoinHandle<Result<DestReport, MigrationError>>,
}

fn destination() -> Dest {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let memory = Arc::new(
        GuestMemory::anonymous(PAGES as usize * PAGE_SIZE, PagePreference::Small).unwrap(),
    );
    let provided = memory.clone();
    let handle = std::thread::spawn(move || {
        let config = DestConfig {
            timeout: Duration::from_secs(5),
            // A source that goes silently may come back; these tests wait only a moment.
            resume_grace: Duration::from_millis(500),
            ..DestConfig::default()
        };
        engine::receive(&listener, DestMemory::Provided(provided), &config)
    });
    Dest {
        addr,
        memory,
        handle,
    }
}

impl Dest {
    fn error(self) -> (String, Arc<GuestMemory>) {
        let err = self
            .handle
            .join()
            .unwrap()
            .expect_err("the session must fail");
        (err.to_string(), self.memory)
    }
}

fn hello(version: u16, session_id: u128) -> ControlMessage {
    ControlMessage::Hello(Handshake {
        magic: CONTROL_MAGIC,
        version,
        session_id,
        memory_bytes: PAGES * PAGE_SIZE as u64,
        page_size: PAGE_SIZE as u32,
        streams: 1,
        capabilities: caps::ALL,
    })
}

/// A fake source through the handshake, with its one data stream open.
fn open_session(dest: &Dest) -> (TcpStream, TcpStream) {
    let mut control = TcpStream::connect(dest.addr).unwrap();
    wire::write_control(&mut control, &hello(VERSION, 42)).unwrap();
    assert!(matches!(
        wire::read_control(&mut control).unwrap(),
        ControlMessage::Welcome { .. }
    ));
    let mut data = TcpStream::connect(dest.addr).unwrap();
    data.write_all(
        &StreamHello {
            session_id: 42,
            stream_id: 0,
            binding: None,
            generation: 0,
        }
        .encode(),
    )
    .unwrap();
    (control, data)
}

fn header(h: FrameHeader) -> [u8; FRAME_HEADER_LEN] {
    let mut b = [0u8; FRAME_HEADER_LEN];
    h.encode(&mut b);
    b
}

fn all_zero(memory: &GuestMemory) -> bool {
    memory.to_vec().iter().all(|&b| b == 0)
}

#[test]
fn garbage_on_the_control_stream() {
    let dest = destination();
    let mut s = TcpStream::connect(dest.addr).unwrap();
    let mut garbage = 200u32.to_le_bytes().to_vec();
    garbage.extend((0..200u32).map(|i| (i * 97 % 251) as u8));
    s.write_all(&garbage).unwrap();
    let (err, memory) = dest.error();
    assert!(err.contains("malformed control message"), "{err}");
    // The validator's developer-facing account stays out of what operators read.
    assert!(!err.contains("pointer") && !err.contains("range"), "{err}");
    assert!(all_zero(&memory));
}

#[test]
fn a_silent_data_stream_times_out_in_words() {
    let dest = destination();
    let mut control = TcpStream::connect(dest.addr).unwrap();
    wire::write_control(&mut control, &hello(VERSION, 42)).unwrap();
    // A data stream that connects and never says which it is.
    let _silent = TcpStream::connect(dest.addr).unwrap();
    let (err, memory) = dest.error();
    assert!(
        err.contains("0 of 1 data streams arrived") && err.contains("1 connections said nothing"),
        "{err}"
    );
    assert!(!err.contains("os error 11"), "{err}");
    assert!(all_zero(&memory));
}

#[test]
fn another_protocol_on_the_migration_port_is_named() {
    let dest = destination();
    let mut s = TcpStream::connect(dest.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: appliance\r\n\r\n")
        .unwrap();
    let (err, memory) = dest.error();
    assert!(
        err.contains("does not speak dwcp") && err.contains("\"GET \""),
        "{err}"
    );
    assert!(all_zero(&memory));
}

#[test]
fn wrong_protocol_version_is_refused_with_a_reason() {
    let dest = destination();
    let mut control = TcpStream::connect(dest.addr).unwrap();
    wire::write_control(&mut control, &hello(99, 1)).unwrap();
    match wire::read_control(&mut control).unwrap() {
        ControlMessage::Refused { reason } => assert!(reason.contains("version 99"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (err, memory) = dest.error();
    assert!(err.contains("protocol version 99 not supported"), "{err}");
    assert!(all_zero(&memory));
}

#[test]
fn page_index_past_the_end() {
    let dest = destination();
    let (_control, mut data) = open_session(&dest);
    data.write_all(&header(FrameHeader::zero_run(PAGES, 1)))
        .unwrap();
    let (err, memory) = dest.error();
    assert!(err.contains("outside guest memory"), "{err}");
    assert!(all_zero(&memory));
}

#[test]
fn truncated_frame_then_close() {
    let dest = destination();
    let (control, mut data) = open_session(&dest);
    data.write_all(&header(FrameHeader::raw_pages(0, 1, PAGE_SIZE as u32)))
        .unwrap();
    data.write_all(&[0xAB; 100]).unwrap();
    drop(data);
    let (err, memory) = dest.error();
    assert!(
        err.contains("closed by the peer before the session ended"),
        "{err}"
    );
    drop(control);
    // Only page 0, the one being received, may hold part of the truncated payload.
    let bytes = memory.to_vec();
    assert!(bytes[PAGE_SIZE..].iter().all(|&b| b == 0));
}

#[test]
fn corrupt_page_names_the_page() {
    let dest = destination();
    let (_control, mut data) = open_session(&dest);
    let page = vec![7u8; PAGE_SIZE];
    data.write_all(&header(FrameHeader::raw_pages(3, 1, PAGE_SIZE as u32)))
        .unwrap();
    let wrong_crc = dwcp_simd::crc32c(&page) ^ 1;
    data.write_all(&wrong_crc.to_le_bytes()).unwrap();
    data.write_all(&page).unwrap();
    let (err, _) = dest.error();
    assert!(err.contains("page 3 failed its CRC32C check"), "{err}");
}

#[test]
fn data_stream_of_another_session() {
    let dest = destination();
    let mut control = TcpStream::connect(dest.addr).unwrap();
    wire::write_control(&mut control, &hello(VERSION, 42)).unwrap();
    let _ = wire::read_control(&mut control).unwrap();
    let mut data = TcpStream::connect(dest.addr).unwrap();
    data.write_all(
        &StreamHello {
            session_id: 43,
            stream_id: 0,
            binding: None,
            generation: 0,
        }
        .encode(),
    )
    .unwrap();
    // Closed without failing the session, which then waits for its own stream.
    let (err, _) = dest.error();
    assert!(err.contains("1 belonged to another session"), "{err}");
}

#[test]
fn source_closes_mid_round() {
    let dest = destination();
    let (control, mut data) = open_session(&dest);
    // A valid run of pages 0..16, then both streams close in the middle of round 0.
    let memory = GuestMemory::anonymous(PAGES as usize * PAGE_SIZE, PagePreference::Small).unwrap();
    for p in 0..16 {
        memory.write_page(p, &vec![p as u8 + 1; PAGE_SIZE]);
    }
    let mut buf = vec![0u8; dwcp_dataplane::transport::frames::stage_space(16)];
    let staged = dwcp_dataplane::transport::frames::stage_run(&memory, 0, 16, &mut buf, None);
    data.write_all(&buf[..staged.bytes]).unwrap();
    drop(data);
    // The control stream closes a moment later, as a source's would after its data
    // streams: closed at once, its end could overtake the pages still in the
    // destination's socket, and the destination rightly stops at the first end it sees.
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(control);
    let (err, received) = dest.error();
    assert!(err.contains("closed"), "{err}");
    // What arrived is in place; nothing else was written.
    let got = received.to_vec();
    assert_eq!(got[..16 * PAGE_SIZE], memory.to_vec()[..16 * PAGE_SIZE]);
    assert!(got[16 * PAGE_SIZE..].iter().all(|&b| b == 0));
}

/// A destination that welcomes the source, takes part of round 0, then hangs up.
#[test]
fn source_reports_a_vanished_destination_and_keeps_its_guest_running() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut control, _) = listener.accept().unwrap();
        let ControlMessage::Hello(h) = wire::read_control(&mut control).unwrap() else {
            panic!("expected a handshake");
        };
        wire::write_control(
            &mut control,
            &ControlMessage::Welcome {
                capabilities: h.capabilities,
            },
        )
        .unwrap();
        let mut streams: Vec<TcpStream> = (0..h.streams)
            .map(|_| listener.accept().unwrap().0)
            .collect();
        // Every stream's hello first: the source connects its streams before the
        // welcome and sends their hellos after it, and one it finds closed before its
        // hello is connected again (which would meet no listener here).
        for s in &mut streams {
            let mut hello = [0u8; wire::STREAM_HELLO_LEN];
            s.read_exact(&mut hello).unwrap();
        }
        let mut buf = vec![0u8; 1 << 20];
        let _ = streams[0].read(&mut buf);
        drop(streams);
        drop(control);
    });
    let (memory, guest, log) = running_guest(64 << 20, DirtyLogKind::Uffd);
    let config = SourceConfig {
        streams: 2,
        reply_timeout: Duration::from_secs(5),
        // It tries to resume the session for this long (the fake is gone for good).
        resume_grace: Duration::from_millis(500),
        ..SourceConfig::default()
    };
    let err =
        engine::migrate(addr, memory, &guest, log, &config, &mut |_| {}).expect_err("must fail");
    fake.join().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("send failed") || text.contains("control stream") || text.contains("closed"),
        "{text}"
    );
    assert!(!guest.is_paused());
    let before = guest.pages_written();
    while guest.pages_written() == before {
        std::thread::yield_now();
    }
    guest.stop();
}

/// A simulated guest of `bytes`, filled and running, with its dirty log.
fn running_guest(
    bytes: usize,
    kind: DirtyLogKind,
) -> (Arc<GuestMemory>, SimulatedGuest, Box<dyn DirtyLog>) {
    let memory = Arc::new(GuestMemory::anonymous(bytes, PagePreference::Small).unwrap());
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, 3);
    let opened = open_dirty_log(&memory, kind).unwrap();
    let guest = SimulatedGuest::start(
        memory.clone(),
        &GuestWorkload::default(),
        opened.marker.clone(),
    );
    (memory, guest, opened.log)
}

/// A real source migrating a simulated guest of the test's size to `addr`.
fn real_source(addr: SocketAddr) -> Result<MigrationReport, MigrationError> {
    let (memory, guest, log) = running_guest(PAGES as usize * PAGE_SIZE, DirtyLogKind::Explicit);
    let config = SourceConfig {
        streams: 2,
        ..SourceConfig::default()
    };
    let result = engine::migrate(addr, memory, &guest, log, &config, &mut |_| {});
    guest.stop();
    result
}

#[test]
fn a_silent_connection_holds_up_no_migration() {
    let dest = destination();
    // Connected first, saying nothing, open throughout.
    let _silent = TcpStream::connect(dest.addr).unwrap();
    real_source(dest.addr).expect("a real source beside a silent connection");
    let received = dest.handle.join().unwrap().expect("received");
    assert_eq!(received.verified_pages, PAGES);
}

/// Open a session at `addr` (a hello, its welcome) and open none of its data streams;
/// its control connection, to hold open.
fn half_open_session(addr: SocketAddr) -> TcpStream {
    let mut control = TcpStream::connect(addr).unwrap();
    wire::write_control(&mut control, &hello(VERSION, 42)).unwrap();
    assert!(matches!(
        wire::read_control(&mut control).unwrap(),
        ControlMessage::Welcome { .. }
    ));
    control
}

#[test]
fn a_half_finished_session_gives_way_to_the_next_source() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let config = DestConfig {
            handshake_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            ..DestConfig::default()
        };
        // One gate for both sessions, as the daemon keeps it.
        let mut gate = Acceptor::new(&listener);
        let mut next = || {
            let memory = GuestMemory::anonymous(PAGES as usize * PAGE_SIZE, PagePreference::Small);
            engine::receive_through(
                &mut gate,
                DestMemory::Provided(Arc::new(memory.unwrap())),
                &config,
                &AtomicBool::new(false),
                None,
                &ReceiveProgress::default(),
            )
            .map_err(|e| e.to_string())
        };
        (
            next().map(|r| r.verified_pages),
            next().map(|r| r.verified_pages),
        )
    });
    // Someone's session: a hello, the welcome, then no data streams.
    let _control = half_open_session(addr);
    // A real source meanwhile: its control connection is not taken for a data stream
    // of the first session; it waits its turn.
    real_source(addr).expect("the next source is served");
    let (first, second) = dest.join().unwrap();
    let first = first.unwrap_err();
    assert!(first.contains("0 of 1 data streams arrived"), "{first}");
    assert_eq!(second, Ok(PAGES));
}

#[test]
fn a_half_finished_session_holds_up_no_source_at_a_destination_taking_sessions_at_once() {
    let stop = Arc::new(AtomicBool::new(false));
    let config = DestConfig {
        handshake_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
        ..DestConfig::default()
    };
    let (addr, outcomes, dispatcher) =
        dwcp_tests::spawn_destination_at_once(&config, 4, stop.clone());
    // Someone's session: a hello, the welcome, then no data streams.
    let _control = half_open_session(addr);
    // A real source meanwhile is served beside it, without waiting for it to give up.
    real_source(addr).expect("the next source is served");
    let next = || outcomes.recv_timeout(Duration::from_secs(30)).unwrap();
    let served = next().expect("the real source's session, ended first");
    assert_eq!(served.verified_pages, PAGES);
    let first = next().expect_err("the half-finished session").to_string();
    assert!(first.contains("0 of 1 data streams arrived"), "{first}");
    // Release: pairs with the dispatcher's Acquire.
    stop.store(true, Ordering::Release);
    dispatcher.join().unwrap();
}

#[test]
fn a_hello_asking_for_more_than_admitted_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let config = DestConfig {
            max_memory: Some(64 << 20),
            ..DestConfig::default()
        };
        engine::receive(
            &listener,
            DestMemory::Allocate(PagePreference::Small),
            &config,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    });
    let mut control = TcpStream::connect(addr).unwrap();
    let ControlMessage::Hello(mut big) = hello(VERSION, 42) else {
        unreachable!()
    };
    big.memory_bytes = 8 << 30;
    wire::write_control(&mut control, &ControlMessage::Hello(big)).unwrap();
    let ControlMessage::Refused { reason } = wire::read_control(&mut control).unwrap() else {
        panic!("an 8 GiB hello must be refused");
    };
    assert!(reason.contains("max_memory"), "{reason}");
    assert!(dest.join().unwrap().unwrap_err().contains("max_memory"));
}

/// A destination receiving one session until its flag is set: its address, the flag
/// and its outcome.
fn cancellable_destination() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<Result<(), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let cancelled = cancel.clone();
    let dest = std::thread::spawn(move || {
        engine::receive_cancellable(
            &listener,
            DestMemory::Allocate(PagePreference::Small),
            &DestConfig::default(),
            &cancelled,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    });
    (addr, cancel, dest)
}

#[test]
fn cancel_interrupts_a_wait_for_the_source() {
    let (addr, cancel, dest) = cancellable_destination();
    // Someone connects and says nothing; nobody else comes.
    let _silent = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    cancel.store(true, Ordering::Release);
    let err = dest.join().unwrap().unwrap_err();
    assert!(err.contains("cancelled at the destination"), "{err}");
}

#[test]
fn a_destination_cancelled_while_streams_connect_tells_the_source_why() {
    let (dest_addr, cancel, dest) = cancellable_destination();
    // Stream 1's hello is held back: the destination waits for it when cancelled.
    let relay = dwcp_tests::relay_to(dest_addr, |client, server| {
        if dwcp_tests::peek_stream_hello(&client).is_some_and(|(stream, _)| stream == 1) {
            std::thread::sleep(Duration::from_secs(3));
        }
        dwcp_tests::pipe_back(&client, &server);
        dwcp_tests::pipe(client, server);
    });
    let source = std::thread::spawn(move || real_source(relay).map_err(|e| e.to_string()));
    std::thread::sleep(Duration::from_millis(500));
    cancel.store(true, Ordering::Release);
    let dest = dest.join().unwrap().expect_err("cancelled");
    let source = source.join().unwrap().expect_err("the destination gave up");
    eprintln!("destination: {dest}\nsource: {source}");
    assert!(dest.contains("cancelled at the destination"), "{dest}");
    // Not "unexpected control message": the source names the destination's reason.
    assert!(
        source.contains("destination aborted: ") && source.contains("cancelled at the destination"),
        "{source}"
    );
}
