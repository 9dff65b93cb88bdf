//! A path that loses every connection of a session — control and data streams, reset
//! as a failing middlebox would — and refuses new ones for a while: the source
//! reconnects, the two sides compare their CRC tables chunk by chunk, and the migration
//! goes on from where it was, verified, sending again only what was lost in flight.
//! And when the path does not come back within the grace period, both sides give up
//! cleanly and the guest runs on at the source.
//!
//! Every connection goes through a relay on loopback that cuts them all once it has
//! forwarded a given number of bytes toward the destination.

use dwcp_dataplane::engine::{self, DestConfig, MigrationError, Progress, SourceConfig};
use dwcp_dataplane::guest::{GuestWorkload, SimulatedGuest};
use dwcp_dataplane::memory::GuestMemory;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST: usize = 256 << 20;
const STREAMS: u16 = 8;
/// Socket buffers at both ends and in the relay (the kernel doubles what is asked):
/// small, so that what can be in flight when the path is cut is known.
const SOCKET_BUFFER: usize = 256 << 10;
/// Most bytes in flight per stream: the source's send buffer, the relay's receive and
/// send buffers and its copy buffer, the destination's receive buffer.
const IN_FLIGHT_PER_STREAM: u64 = (4 * 2 * SOCKET_BUFFER + (64 << 10)) as u64;

/// How the destination takes sessions: one at a time through its gate, or several at
/// once through the dispatcher (where a returning source's resume reaches a new session
/// first, which passes it on).
#[derive(Clone, Copy, PartialEq)]
enum Receiving {
    OneAtATime,
    AtOnce,
}

/// Cut once this many bytes went through, for that long (`None`: for good).
type CutAt = (u64, Option<Duration>);

/// The relay's path: every connection it carries, whether it takes new ones, the bytes
/// it forwarded toward the destination, and when it is to be cut next.
#[derive(Clone, Default)]
struct Path {
    /// Each relayed connection: the source's side, the destination's side.
    open: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    /// Cuts reset the source's side only, and hold the destination's side open and
    /// silent (a middlebox that forgot the connections: the destination sees nothing).
    source_side_only: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    down_until: Arc<Mutex<Option<Instant>>>,
    forwarded: Arc<AtomicU64>,
    cut_at: Arc<Mutex<Option<CutAt>>>,
}

impl Path {
    /// Cut the path once `more` bytes beyond those forwarded so far went through.
    fn cut_after(&self, more: u64, outage: Option<Duration>) {
        let at = self.forwarded.load(Ordering::Relaxed) + more;
        *self.cut_at.lock().unwrap() = Some((at, outage));
    }

    /// Copy toward the destination, counting, and cut when due.
    fn forward(&self, mut from: TcpStream, mut to: TcpStream) {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            let total = self.forwarded.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            let due = {
                let mut cut_at = self.cut_at.lock().unwrap();
                match *cut_at {
                    Some((at, outage)) if total >= at => {
                        *cut_at = None;
                        Some(outage)
                    }
                    _ => None,
                }
            };
            if let Some(outage) = due {
                eprintln!("relay: every connection cut after {total} bytes");
                self.cut(outage);
            }
        }
        if self.source_side_only.load(Ordering::Relaxed) {
            self.held.lock().unwrap().push(to);
        } else {
            let _ = to.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Reset every connection and refuse new ones for `outage` (`None`: for good).
    fn cut(&self, outage: Option<Duration>) {
        *self.down_until.lock().unwrap() =
            Some(Instant::now() + outage.unwrap_or(Duration::from_secs(3600)));
        let source_side_only = self.source_side_only.load(Ordering::Relaxed);
        for (client, server) in self.open.lock().unwrap().drain(..) {
            reset(&client);
            if source_side_only {
                self.held.lock().unwrap().push(server);
            } else {
                reset(&server);
            }
        }
    }

    fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
    }

    fn relay(&self, client: TcpStream, server: TcpStream) {
        if self.is_down() {
            reset(&client);
            reset(&server);
            return;
        }
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        for s in [&client, &server] {
            for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
                set_int_option(s, option, SOCKET_BUFFER as libc::c_int);
            }
        }
        {
            let mut open = self.open.lock().unwrap();
            open.push((client.try_clone().unwrap(), server.try_clone().unwrap()));
        }
        let back = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || dwcp_tests::pipe(back.0, back.1));
        self.forward(client, server);
    }
}

/// End `s` both ways now, its last close a reset: the relay's threads then return
/// and close it, and the peer sees a reset.
fn reset(s: &TcpStream) {
    dwcp_tests::reset_on_close(s);
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn set_int_option(s: &TcpStream, option: libc::c_int, value: libc::c_int) {
    // SAFETY: `value` is a valid c_int of the size passed, read by the call only.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Arms the path's cuts from the source's progress reports.
type CutRule = Box<dyn FnMut(&Progress, &Path) + Send>;

struct Run {
    source: Result<engine::MigrationReport, MigrationError>,
    dest: Result<engine::DestReport, MigrationError>,
    memory: Arc<GuestMemory>,
    guest: SimulatedGuest,
    took: Duration,
}

impl Run {
    /// Both sides' reports of a migration that must have completed, the destination's
    /// memory equal to the source's.
    fn verified(&self) -> (&engine::MigrationReport, &engine::DestReport) {
        let report = self
            .source
            .as_ref()
            .unwrap_or_else(|e| panic!("the source failed: {e}"));
        let dest = self
            .dest
            .as_ref()
            .unwrap_or_else(|e| panic!("the destination failed: {e}"));
        assert_eq!(self.memory.first_difference(&dest.memory), None);
        (report, dest)
    }
}

/// Migrate a running 256 MiB guest over 8 streams, in an authenticated session,
/// through a relay cut after `first_cut` bytes, and as `rule` says after that (on the
/// source's side only when `source_side_only`).
fn migrate_cut(
    receiving: Receiving,
    grace: Duration,
    first_cut: CutAt,
    source_side_only: bool,
    mut rule: CutRule,
) -> Run {
    let started = Instant::now();
    let workload = GuestWorkload {
        dirty_rate: 40e6,
        ..GuestWorkload::default()
    };
    let (memory, guest, dirty_log) = dwcp_tests::running_guest(GUEST, &workload, 5);
    let mut dest = DestConfig {
        timeout: Duration::from_secs(30),
        security: Some(dwcp_tests::lab_identity(1)),
        resume_grace: grace,
        ..DestConfig::default()
    };
    dest.transport.socket.buffer_bytes = SOCKET_BUFFER;
    let stop = Arc::new(AtomicBool::new(false));
    let (dest_addr, receiver) = match receiving {
        Receiving::OneAtATime => {
            let (addr, receiver) = dwcp_tests::spawn_destination(&dest);
            (
                addr,
                Box::new(move || receiver.join().unwrap()) as Box<dyn FnOnce() -> _>,
            )
        }
        Receiving::AtOnce => {
            let (addr, outcomes, dispatcher) =
                dwcp_tests::spawn_destination_at_once(&dest, 4, stop.clone());
            let stopping = stop.clone();
            (
                addr,
                Box::new(move || {
                    let outcome = outcomes
                        .recv_timeout(Duration::from_secs(120))
                        .expect("the session's outcome");
                    // Release: pairs with the dispatcher's Acquire.
                    stopping.store(true, Ordering::Release);
                    dispatcher.join().unwrap();
                    outcome
                }) as Box<dyn FnOnce() -> _>,
            )
        }
    };
    let path = Path::default();
    path.source_side_only
        .store(source_side_only, Ordering::Relaxed);
    path.cut_after(first_cut.0, first_cut.1);
    let relayed = path.clone();
    let peer = dwcp_tests::relay_to(dest_addr, move |client, server| {
        relayed.relay(client, server)
    });
    let mut config = SourceConfig {
        streams: STREAMS,
        reply_timeout: Duration::from_secs(30),
        security: Some(dwcp_tests::lab_identity(0)),
        resume_grace: grace,
        ..SourceConfig::default()
    };
    config.transport.socket.buffer_bytes = SOCKET_BUFFER;
    let source = engine::migrate(peer, memory.clone(), &guest, dirty_log, &config, &mut |p| {
        rule(p, &path)
    });
    let dest = receiver();
    Run {
        source,
        dest,
        memory,
        guest,
        took: started.elapsed(),
    }
}

#[test]
fn every_connection_lost_mid_round_0_and_again_mid_round_1_is_resumed_and_verified() {
    let outage = Some(Duration::from_secs(2));
    let mut armed = false;
    let run = migrate_cut(
        Receiving::OneAtATime,
        Duration::from_secs(20),
        // A quarter of memory into round 0 (which sends about 190 MB here).
        (64 << 20, outage),
        false,
        // Once round 1 is queued, when 2 MiB more of it went through.
        Box::new(move |p, path| {
            if !armed && p.round >= 1 {
                armed = true;
                path.cut_after(2 << 20, outage);
            }
        }),
    );
    let (report, dest) = run.verified();
    eprintln!("{report}");
    assert_eq!(report.resumes.len(), 2, "{:?}", report.resumes);
    assert_eq!(dest.resumes, 2);
    let pages = report.pages;
    let in_flight = u64::from(STREAMS) * IN_FLIGHT_PER_STREAM;
    let (first, second) = (&report.resumes[0], &report.resumes[1]);
    assert_eq!(first.round, 0);
    assert!(second.round >= 1, "{second:?}");
    for r in &report.resumes {
        // The path was down for 2 s; reconnecting took a few attempts.
        assert!(r.outage_seconds >= 1.5, "{r:?}");
        assert!(r.attempts >= 2, "{r:?}");
        assert_eq!(r.chunks, pages / 1024);
        // Only the chunks that differ carried entries: never the whole table.
        assert!(r.differing_chunks <= r.chunks, "{r:?}");
        assert!(
            r.bytes_exchanged <= r.chunks * 8 + r.differing_chunks * (8 + 4096) + 8,
            "{r:?}"
        );
        // Sent twice: only what was in flight when the path went.
        assert!(r.pages_resent <= r.pages_to_send, "{r:?}");
        assert!(
            r.pages_resent * 4096 <= in_flight + pages * 4096 / 50,
            "{} pages sent again; at most {in_flight} bytes were in flight",
            r.pages_resent
        );
    }
    // What had arrived in round 0 was not sent again: the round went on from where
    // it was, it did not start over.
    assert!(
        first.pages_to_send * 4096 < pages * 4096 * 3 / 4 + in_flight,
        "round 0 resumed with {} of {pages} pages to send",
        first.pages_to_send
    );
    let counted = engine::counters::stream_losses();
    assert!(counted.sessions_resumed >= 2);
    eprintln!(
        "resumed twice: resent fraction {:.4} ({} and {} pages lost in flight; at most \
         {:.4} of memory could be at each), {:?}",
        report.resent_fraction(),
        first.pages_resent,
        second.pages_resent,
        in_flight as f64 / (pages * 4096) as f64,
        run.took
    );
}

#[test]
fn every_connection_lost_while_the_last_round_awaits_its_acknowledgement_is_resumed() {
    // The planner has decided to switch over; the guest still runs while the source
    // waits for the destination to acknowledge the last pre-copy round. The path goes
    // then, before anything of the switchover.
    let mut cut_in_round = None;
    let run = migrate_cut(
        Receiving::OneAtATime,
        Duration::from_secs(20),
        (u64::MAX / 2, None),
        false,
        Box::new(move |p, path| {
            if cut_in_round.is_none() && p.phase == "settle" {
                cut_in_round = Some(p.round);
                path.cut(Some(Duration::from_secs(1)));
            }
        }),
    );
    let (report, dest) = run.verified();
    eprintln!("{report}");
    assert_eq!(report.resumes.len(), 1, "{:?}", report.resumes);
    assert_eq!(dest.resumes, 1);
    let resume = &report.resumes[0];
    // Resumed in the round that had been sent, not in a paused window: the final
    // round came after it.
    let final_round = report.rounds.last().unwrap().round;
    assert!(
        resume.round < final_round,
        "{resume:?}, final round {final_round}"
    );
    eprintln!(
        "resumed round {} after {:.2} s: {} pages to send, {} sent twice; {:?}",
        resume.round, resume.outage_seconds, resume.pages_to_send, resume.pages_resent, run.took
    );
}

#[test]
fn a_path_that_stays_down_past_the_grace_period_fails_cleanly_with_the_guest_running_here() {
    let run = migrate_cut(
        Receiving::OneAtATime,
        Duration::from_secs(3),
        (64 << 20, None),
        false,
        Box::new(|_, _| {}),
    );
    let source = run
        .source
        .expect_err("the source cannot finish without a path");
    let text = source.to_string();
    assert!(text.contains("resume_grace"), "{text}");
    let dest = run.dest.expect_err("the destination gives the session up");
    let dest_text = dest.to_string();
    assert!(dest_text.contains("did not resume"), "{dest_text}");
    // The guest was never paused: it still runs, writing its memory.
    assert!(!run.guest.is_paused());
    let before = run.guest.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        run.guest.pages_written() > before,
        "the guest stopped running"
    );
    run.guest.stop();
    eprintln!(
        "given up: source: {text}; destination: {dest_text}; {:?}",
        run.took
    );
}

#[test]
fn connections_forgotten_on_the_source_side_only_are_given_up_by_the_silent_destination() {
    // The destination's ends stay open and silent: it learns nothing from them, and
    // takes the source's new control connection, after 3 s of silence, for what it is.
    let run = migrate_cut(
        Receiving::OneAtATime,
        Duration::from_secs(20),
        (64 << 20, Some(Duration::from_millis(500))),
        true,
        Box::new(|_, _| {}),
    );
    let (report, dest) = run.verified();
    assert_eq!(report.resumes.len(), 1, "{:?}", report.resumes);
    assert_eq!(dest.resumes, 1);
    let r = &report.resumes[0];
    eprintln!(
        "resumed after {:.2} s and {} attempts (the destination busy until its silence \
         rule); {:?}",
        r.outage_seconds, r.attempts, run.took
    );
}

#[test]
fn a_destination_taking_sessions_at_once_passes_a_returning_source_to_its_session() {
    // As above, and as when every connection is lost: each time, the source's resume
    // reaches a new session first, which hands it to the one it names.
    for source_side_only in [true, false] {
        let run = migrate_cut(
            Receiving::AtOnce,
            Duration::from_secs(20),
            (64 << 20, Some(Duration::from_millis(500))),
            source_side_only,
            Box::new(|_, _| {}),
        );
        let (report, dest) = run.verified();
        assert_eq!(report.resumes.len(), 1, "{:?}", report.resumes);
        assert_eq!(dest.resumes, 1);
        eprintln!(
            "source side only {source_side_only}: resumed after {:.2} s and {} attempts; {:?}",
            report.resumes[0].outage_seconds, report.resumes[0].attempts, run.took
        );
    }
}
