//! A data stream that dies or stops moving mid-round: its pages go to the other
//! streams, a replacement connects and takes its share back between rounds, and the
//! migration completes, verified.
//!
//! Every connection goes through a relay on loopback that can cut (reset) or freeze
//! (hold open, forward nothing) one data stream once it has carried a given number of
//! bytes.

use dwcp_dataplane::engine::{self, DestConfig, MigrationReport, SourceConfig};
use dwcp_dataplane::guest::GuestWorkload;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST: usize = 256 << 20;
/// The stream the relay breaks, and after how many of its bytes (mid round 0: each of
/// 8 streams carries about 32 MiB of it).
const VICTIM: u16 = 3;
const AFTER: usize = 8 << 20;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Reset both connections of the stream.
    Cut,
    /// Keep both connections open and forward nothing more.
    Freeze,
}

/// Connections a frozen stream keeps open until the test ends.
type Held = Arc<Mutex<Vec<TcpStream>>>;

/// Close with a reset, as a failing path would.
fn reset(s: TcpStream) {
    dwcp_tests::reset_on_close(&s);
    drop(s);
}

fn relay(mut client: TcpStream, mut server: TcpStream, fault: Fault, held: &Held) {
    // Small control messages must not wait for delayed acknowledgements.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let backwards = |client: &TcpStream, server: &TcpStream| {
        let back = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || dwcp_tests::pipe(back.0, back.1));
    };
    let mut hello = [0u8; 48];
    if client.read_exact(&mut hello[..4]).is_err() {
        return;
    }
    if &hello[..4] != b"DWCS" {
        backwards(&client, &server);
        let _ = server.write_all(&hello[..4]);
        return dwcp_tests::pipe(client, server);
    }
    if client.read_exact(&mut hello[4..]).is_err() {
        return;
    }
    let stream = u16::from_le_bytes([hello[6], hello[7]]);
    let generation = u16::from_le_bytes([hello[26], hello[27]]);
    let _ = server.write_all(&hello);
    // The stream's replacement (a later generation) goes through untouched.
    if stream != VICTIM || generation != 0 {
        backwards(&client, &server);
        return dwcp_tests::pipe(client, server);
    }
    // Nothing flows back on a data stream; without a second handle on its sockets, a
    // reset below really resets them.
    let mut left = AFTER;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let want = left.min(buf.len());
        match client.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if server.write_all(&buf[..n]).is_err() {
                    return;
                }
                left -= n;
            }
        }
    }
    eprintln!("relay: {fault:?} data stream {stream} after {AFTER} bytes");
    match fault {
        Fault::Cut => {
            reset(client);
            reset(server);
        }
        Fault::Freeze => {
            let mut held = held.lock().unwrap();
            held.push(client);
            held.push(server);
        }
    }
}

/// Migrate a small running guest through a relay that breaks one of 8 streams, in an
/// authenticated session when `sealed`.
fn migrate_through(fault: Fault, sealed: bool) -> (MigrationReport, engine::DestReport, Duration) {
    let started = Instant::now();
    let workload = GuestWorkload {
        dirty_rate: 5e6,
        ..GuestWorkload::default()
    };
    let (memory, guest, dirty_log) = dwcp_tests::running_guest(GUEST, &workload, 11);
    let (dest_addr, receiver) = dwcp_tests::spawn_destination(&DestConfig {
        timeout: Duration::from_secs(30),
        security: sealed.then(|| dwcp_tests::lab_identity(1)),
        ..DestConfig::default()
    });
    let held: Held = Arc::default();
    let relayed = held.clone();
    let peer = dwcp_tests::relay_to(dest_addr, move |client, server| {
        relay(client, server, fault, &relayed)
    });
    let config = SourceConfig {
        streams: 8,
        reply_timeout: Duration::from_secs(30),
        security: sealed.then(|| dwcp_tests::lab_identity(0)),
        ..SourceConfig::default()
    };
    let report = engine::migrate(
        peer,
        memory.clone(),
        &guest,
        dirty_log,
        &config,
        &mut |_| {},
    );
    guest.stop();
    let dest = receiver.join().unwrap();
    let report = report.unwrap_or_else(|e| panic!("{fault:?}: the source failed: {e}"));
    let dest = dest.unwrap_or_else(|e| panic!("{fault:?}: the destination failed: {e}"));
    // Verified by the table digest, and byte for byte here.
    assert_eq!(memory.first_difference(&dest.memory), None, "{fault:?}");
    drop(held);
    (report, dest, started.elapsed())
}

#[test]
fn a_stream_cut_mid_round_leaves_its_pages_to_the_others_until_a_replacement_takes_them_back() {
    // Sealed: the replacement carries its own generation's binding and keys.
    let (report, dest, took) = migrate_through(Fault::Cut, true);
    assert!(report.transport.security.is_some());
    eprintln!("{report}");
    let lost = &report.transport.streams_lost;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].stream, VICTIM);
    assert_eq!(lost[0].round, 0, "{lost:?}");
    assert!(lost[0].pages_requeued > 0, "{lost:?}");
    assert_eq!(dest.streams_lost.len(), 1, "{:?}", dest.streams_lost);
    assert_eq!(dest.streams_lost[0].0, VICTIM);
    // A replacement connected meanwhile and carried the stream again.
    assert!(lost[0].restored_from_round.is_some(), "{lost:?}");
    // And the metrics count it (process-wide counters: at least this migration's).
    let counted = dwcp_dataplane::engine::counters::stream_losses();
    assert!(counted.lost_at_source >= 1 && counted.lost_at_destination >= 1);
    assert!(counted.replaced >= 1 && counted.pages_requeued >= lost[0].pages_requeued);
    eprintln!("cut: {took:?}");
}

#[test]
fn a_stream_that_stops_moving_is_given_up_and_its_pages_go_to_the_others() {
    let (report, dest, took) = migrate_through(Fault::Freeze, false);
    eprintln!("{report}");
    let lost = &report.transport.streams_lost;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].stream, VICTIM);
    // Noticed here (the relay stopped taking bytes) or at the destination (the relay
    // took them and forwarded nothing), whichever came first.
    assert!(lost[0].reason.contains("no progress"), "{lost:?}");
    assert!(lost[0].pages_requeued > 0, "{lost:?}");
    assert_eq!(dest.streams_lost.len(), 1, "{:?}", dest.streams_lost);
    eprintln!("freeze: {took:?}");
}
