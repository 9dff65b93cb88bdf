//! The `security` suite: what authenticated, encrypted sessions cost.
//!
//! - `security/goodput-4s-vs-plain`, `security/cpu-per-gb-vs-plain`: our page stream
//!   (see [`crate::transport`]) with every send buffer sealed as a record, against the
//!   same stream plain, 1 GiB of incompressible pages over four loopback streams,
//!   alternating runs. The keys come from a real TLS 1.3 session between two lab
//!   appliances.
//! - `security/vs-rustls-stream`: our sealed streams against four plain rustls TLS 1.3
//!   streams (the same cipher suite) copying the same bytes from source memory into
//!   destination memory.
//! - `security/setup-16s-vs-plain`: a session's setup with 16 data streams (connect,
//!   TLS handshake, hello, stream bindings) against the same setup plain, from a
//!   migration's report.
//! - `security/cross-region-vs-plain`: a live migration of 256 MiB through `wanem`'s
//!   cross-region path, sealed against plain (the link, not the CPU, should bound both;
//!   needs root for the emulator's namespaces, else skipped with the reason).

use crate::measure::{Plan, Samples};
use crate::report::{Better, Comparison, Reporter};
use crate::transport::{StreamSetup, Transfer, cpu_seconds, page_stream};
use dwcp_dataplane::engine::{DestConfig, SourceConfig};
use dwcp_dataplane::guest::GuestWorkload;
use dwcp_dataplane::security::{Identity, SessionKeys, tls};
use dwcp_dataplane::transport::TransportConfig;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// The first two appliances of a lab set, loaded.
fn load_pair(lab: &dwcp_control::certs::Written) -> Result<(Arc<Identity>, Arc<Identity>), String> {
    let load = |i: usize| lab.identity(i).map_err(|e| e.to_string());
    Ok((load(0)?, load(1)?))
}

/// The two lab appliances' identities.
fn identities() -> Result<(Arc<Identity>, Arc<Identity>), String> {
    load_pair(dwcp_tests::lab())
}

/// Keys for `streams` streams from a real TLS session between the two appliances.
fn session_keys(streams: u16) -> Result<Arc<SessionKeys>, String> {
    let (a, b) = identities()?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = std::thread::spawn(move || -> Result<(), String> {
        let (mut socket, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut prefix = [0u8; 4];
        socket.read_exact(&mut prefix).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let channel = tls::accept(&b, socket, &prefix, deadline, &AtomicBool::new(false))
            .map_err(|e| e.to_string())?;
        // Hold the session until the client has its keys.
        let mut done = [0u8; 1];
        channel
            .reader()
            .and_then(|mut r| r.read_exact(&mut done))
            .map_err(|e| e.to_string())
    });
    let socket = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let channel = tls::connect(&a, socket, addr.ip(), deadline, &AtomicBool::new(false))
        .map_err(|e| e.to_string())?;
    let keys = channel.session_keys(streams).map_err(|e| e.to_string())?;
    channel.write_all(b"k").map_err(|e| e.to_string())?;
    server
        .join()
        .map_err(|_| "TLS server thread panicked".to_string())??;
    Ok(Arc::new(keys))
}

/// Four (or `streams`) rustls TLS 1.3 streams on loopback copying `setup.source` into
/// `setup.dest`, a slice each.
fn rustls_streams(setup: &StreamSetup, streams: usize) -> Result<Transfer, String> {
    let (a, b) = identities()?;
    let (client_config, _) = a.tls_configs();
    let (_, server_config) = b.tls_configs();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let len = setup.source.len();
    let slice = len / streams;
    // SAFETY: nothing else writes either memory while the streams run; each server
    // thread writes its own disjoint slice of the destination.
    let (source, dest) = unsafe { (setup.source.as_slice(), setup.dest.as_ptr() as usize) };
    let cpu_before = cpu_seconds(libc::RUSAGE_SELF);
    let started = Instant::now();
    let received = std::thread::scope(|scope| -> Result<u64, String> {
        let mut servers = Vec::new();
        for i in 0..streams {
            let (socket, _) = {
                let connecting = scope.spawn(move || TcpStream::connect(addr));
                let accepted = listener.accept().map_err(|e| e.to_string())?;
                let client = connecting
                    .join()
                    .map_err(|_| "connect panicked".to_string())?
                    .map_err(|e| e.to_string())?;
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let conn = rustls::ClientConnection::new(client_config.clone(), name)
                    .map_err(|e| e.to_string())?;
                let chunk = &source[i * slice..(i + 1) * slice];
                scope.spawn(move || -> Result<(), String> {
                    let mut tls = rustls::StreamOwned::new(conn, client);
                    for piece in chunk.chunks(256 << 10) {
                        tls.write_all(piece).map_err(|e| e.to_string())?;
                    }
                    tls.conn.send_close_notify();
                    tls.flush().map_err(|e| e.to_string())
                });
                accepted
            };
            let conn =
                rustls::ServerConnection::new(server_config.clone()).map_err(|e| e.to_string())?;
            servers.push(scope.spawn(move || -> Result<u64, String> {
                let mut tls = rustls::StreamOwned::new(conn, socket);
                // SAFETY: this thread's slice of the destination, written by it alone.
                let out = unsafe {
                    std::slice::from_raw_parts_mut((dest as *mut u8).add(i * slice), slice)
                };
                tls.read_exact(out).map_err(|e| e.to_string())?;
                Ok(slice as u64)
            }));
        }
        let mut total = 0;
        for s in servers {
            total += s.join().map_err(|_| "server panicked".to_string())??;
        }
        Ok(total)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu_before;
    if setup.source.first_difference(&setup.dest).is_some() {
        return Err("the rustls streams did not copy memory exactly".into());
    }
    Ok(Transfer {
        bits_per_second: received as f64 * 8.0 / seconds,
        cpu_per_gb: cpu / (received as f64 / 1e9),
    })
}

/// A migration's setup time (connect to round 0) with 16 streams, secured or plain.
fn setup_seconds(secure: bool) -> Result<f64, String> {
    let (a, b) = identities()?;
    let source = SourceConfig {
        streams: 16,
        security: secure.then_some(a),
        ..SourceConfig::default()
    };
    let dest = DestConfig {
        security: secure.then_some(b),
        ..DestConfig::default()
    };
    let out = dwcp_tests::migrate_live(
        16 << 20,
        &GuestWorkload::default(),
        dwcp_dataplane::dirty::DirtyLogKind::Uffd,
        &source,
        &dest,
    );
    out.guest.stop();
    let report = out.source.map_err(|e| e.to_string())?;
    out.dest.map_err(|e| e.to_string())?;
    Ok(report.setup_seconds)
}

/// Sealed against plain migrations through the cross-region path: migration seconds.
fn cross_region(runs: usize, out: &mut Reporter) {
    use dwcp_control::certs::{self, ApplianceSpec};
    use wanem::scenario::Scenario;
    use wanem::{Emulator, EmulatorConfig};
    let scenario = Scenario::built_in("cross-region").expect("a shipped scenario");
    let emulator = match Emulator::start(EmulatorConfig::new("dwcpsec", scenario)) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("security/cross-region-vs-plain: SKIP: {e}");
            return;
        }
    };
    // The destination's certificate names the address the source dials.
    let dir = std::env::temp_dir().join(format!("dwcp-bench-wan-certs-{}", std::process::id()));
    let specs = [
        ApplianceSpec {
            name: "wan-source".into(),
            addresses: vec!["127.0.0.1".into()],
        },
        ApplianceSpec {
            name: "wan-dest".into(),
            addresses: vec![emulator.destination_address().to_string()],
        },
    ];
    let identities = certs::init(&dir, &specs)
        .map_err(|e| e.to_string())
        .and_then(|lab| load_pair(&lab));
    let (a, b) = match identities {
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("security/cross-region-vs-plain: SKIP: certificates: {e}");
            return;
        }
    };
    let (memory, workload) = dwcp_tests::wan::filled_guest(256 << 20, 4e6, 0.1);
    let (mut sealed, mut plain) = (Samples::default(), Samples::default());
    for i in 0..runs {
        for secure in [i % 2 == 0, i % 2 != 0] {
            let (mut source, mut dest) = dwcp_tests::wan::internet_profile();
            source.security = secure.then(|| a.clone());
            dest.security = secure.then(|| b.clone());
            let (outcome, seconds) = dwcp_tests::wan::migrate_across(
                &emulator,
                memory.clone(),
                &workload,
                dwcp_dataplane::dirty::DirtyLogKind::Uffd,
                &source,
                &dest,
                None,
            );
            outcome.guest.stop();
            match (outcome.source, outcome.dest) {
                (Ok(_), Ok(_)) if secure => sealed.push(seconds),
                (Ok(_), Ok(_)) => plain.push(seconds),
                (s, d) => eprintln!(
                    "security/cross-region-vs-plain: a run failed: {:?} / {:?}",
                    s.err().map(|e| e.to_string()),
                    d.err().map(|e| e.to_string())
                ),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out.emit(
        Comparison::new(
            "security/cross-region-vs-plain",
            "s",
            Better::Lower,
            &sealed,
            "the same migration plain (--insecure), same path",
            &plain,
        )
        .with_target(0.95),
    );
}

/// Run the suite.
pub fn run(plan: Plan, out: &mut Reporter) {
    const BYTES: usize = 1 << 30;
    const STREAMS: u16 = 4;
    let runs = plan.runs.min(5);
    // Every sealed run is a session of its own (its records numbered from 0): keys
    // from a fresh TLS session each time.
    if let Err(e) = session_keys(STREAMS) {
        eprintln!("security: SKIP: no TLS session between the lab appliances: {e}");
        return;
    }
    let keys = || session_keys(STREAMS).expect("a TLS session between the lab appliances");
    let setup = StreamSetup::new(BYTES);
    let config = TransportConfig::default();
    eprintln!(
        "security: {} MiB of incompressible pages per run, {STREAMS} loopback streams",
        BYTES >> 20
    );
    if out.wants("security/goodput-4s-vs-plain") || out.wants("security/cpu-per-gb-vs-plain") {
        let (mut sealed_bps, mut sealed_cpu, mut plain_bps, mut plain_cpu) = (
            Samples::default(),
            Samples::default(),
            Samples::default(),
            Samples::default(),
        );
        for i in 0..runs {
            let mut one = |sealed: bool| {
                let t = page_stream(&setup, STREAMS, &config, sealed.then(keys));
                let (bps, cpu) = if sealed {
                    (&mut sealed_bps, &mut sealed_cpu)
                } else {
                    (&mut plain_bps, &mut plain_cpu)
                };
                bps.push(t.bits_per_second / 1e9);
                cpu.push(t.cpu_per_gb);
            };
            // Alternate who goes first.
            one(i % 2 == 0);
            one(i % 2 != 0);
        }
        out.emit(
            Comparison::new(
                "security/goodput-4s-vs-plain",
                "Gbit/s",
                Better::Higher,
                &sealed_bps,
                "dwcp plain (--insecure), same run",
                &plain_bps,
            )
            .with_target(0.8),
        );
        out.emit(Comparison::new(
            "security/cpu-per-gb-vs-plain",
            "CPU s/GB",
            Better::Lower,
            &sealed_cpu,
            "dwcp plain (--insecure), same run",
            &plain_cpu,
        ));
    }
    if out.wants("security/vs-rustls-stream") {
        let (mut ours, mut theirs) = (Samples::default(), Samples::default());
        for i in 0..runs {
            let mut one = |sealed: bool| {
                if sealed {
                    let t = page_stream(&setup, STREAMS, &config, Some(keys()));
                    ours.push(t.bits_per_second / 1e9);
                } else {
                    match rustls_streams(&setup, usize::from(STREAMS)) {
                        Ok(t) => theirs.push(t.bits_per_second / 1e9),
                        Err(e) => eprintln!("security: rustls streams: {e}"),
                    }
                }
            };
            one(i % 2 == 0);
            one(i % 2 != 0);
        }
        out.emit(
            Comparison::new(
                "security/vs-rustls-stream",
                "Gbit/s",
                Better::Higher,
                &ours,
                "rustls TLS 1.3 streams (AES-256-GCM) copying the same bytes",
                &theirs,
            )
            .with_target(1.2),
        );
    }
    if out.wants("security/cross-region-vs-plain") {
        // As many pairs as the other lines: a 2.6 s migration across a lossy 80 ms
        // path varies by a second from run to run, and three pairs let one outlier
        // decide the median.
        cross_region(runs, out);
    }
    if out.wants("security/setup-16s-vs-plain") {
        let (mut ours, mut theirs) = (Samples::default(), Samples::default());
        for i in 0..runs {
            for secure in [i % 2 == 0, i % 2 != 0] {
                match setup_seconds(secure) {
                    Ok(s) if secure => ours.push(s * 1e3),
                    Ok(s) => theirs.push(s * 1e3),
                    Err(e) => eprintln!("security: setup run: {e}"),
                }
            }
        }
        out.emit(Comparison::new(
            "security/setup-16s-vs-plain",
            "ms",
            Better::Lower,
            &ours,
            "the same session setup plain (--insecure)",
            &theirs,
        ));
    }
}
