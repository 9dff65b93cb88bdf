//! Peers that misbehave. The destination must end the session with an error naming
//! what was wrong and never write outside its memory (its memory has inaccessible
//! guard regions on both sides, so a stray write would crash this test); the source
//! must report the failure and keep its guest running.

use dwcp_dataplane::dirty::{DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{
    self, DestConfig, DestMemory, DestReport, MigrationError, SourceConfig,
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
    assert!(err.contains("data stream's hello: timed out"), "{err}");
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
        }
        .encode(),
    )
    .unwrap();
    let (err, _) = dest.error();
    assert!(err.contains("belongs to session"), "{err}");
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
        let mut buf = vec![0u8; 1 << 20];
        let _ = streams[0].read(&mut buf);
        drop(streams);
        drop(control);
    });
    let memory = Arc::new(GuestMemory::anonymous(64 << 20, PagePreference::Small).unwrap());
    fill_memory(&memory, &ContentMix::MEMORY_IMAGE, 3);
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd).unwrap();
    let guest = SimulatedGuest::start(
        memory.clone(),
        &GuestWorkload::default(),
        opened.marker.clone(),
    );
    let config = SourceConfig {
        streams: 2,
        reply_timeout: Duration::from_secs(5),
        ..SourceConfig::default()
    };
    let err = engine::migrate(addr, memory, &guest, opened.log, &config, &mut |_| {})
        .expect_err("must fail");
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
