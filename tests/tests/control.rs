//! The daemon end to end: its control socket under bad and many clients, metrics
//! scraped and parsed, safe mode switched on mid-migration without losing a byte,
//! and what it tells operators: overrides and their sources, the destination's view,
//! progress. The daemon migrates to itself over loopback (it is source and
//! destination).

use dwcp_api::{Command, Done, MigrationInfo, Request, Response, SetOptions, StatusInfo};
use dwcp_control::config::{Config, Size};
use dwcp_control::daemon::{Daemon, DaemonOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn start(name: &str) -> Daemon {
    start_with(name, |_| {})
}

/// [`start`], with `change` applied to the test configuration.
fn start_with(name: &str, change: impl FnOnce(&mut Config)) -> Daemon {
    let dir = std::env::temp_dir().join(format!("dwcp-control-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = Config::default();
    config.dest.listen = "127.0.0.1:0".into();
    config.control.socket = dir.join("dwcpd.sock");
    config.control.metrics_addr = Some("127.0.0.1:0".into());
    config.control.flags_file = Some(dir.join("flags.toml"));
    config.guest.memory = Size(128 << 20);
    config.guest.dirty_rate_mbps = 10.0;
    // Tests hold migrations open until they let go: a pacing cap below the guest's
    // dirty rate with a 1 ms downtime limit never converges (until auto-converge has
    // throttled the guest for many rounds).
    config.migration.max_rounds = 10_000;
    // Sessions authenticated and encrypted, as in production.
    dwcp_tests::secure(&mut config, 0);
    change(&mut config);
    config.validate().expect("valid test configuration");
    Daemon::start(DaemonOptions { config }).expect("daemon starts")
}

fn ask(stream: &mut UnixStream, line: &[u8]) -> Response {
    stream.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut answer)
        .unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn bad_clients_get_clear_errors_and_change_nothing() {
    let d = start("bad");
    let mode = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let mut s = connect(&d);
    for (line, expect) in [
        (&b"{not json\n"[..], "malformed JSON"),
        (b"[1,2]\n", "JSON object"),
        (b"{\"cmd\":\"status\"}\n", "missing protocol version"),
        (b"{\"v\":99,\"cmd\":\"status\"}\n", "protocol version 99"),
        (b"{\"v\":1}\n", "missing command"),
        (
            b"{\"v\":1,\"cmd\":\"explode\"}\n",
            "unknown command \"explode\"",
        ),
        (b"{\"v\":1,\"cmd\":\"cancel\"}\n", "bad \"cancel\" request"),
        (
            b"{\"v\":1,\"cmd\":\"cancel\",\"id\":42}\n",
            "no migration 42",
        ),
        (b"{\"v\":1,\"cmd\":\"set\",\"streams\":0}\n", "streams 0"),
        (
            b"{\"v\":1,\"cmd\":\"set-mode\",\"mode\":\"warp\"}\n",
            "unknown mode",
        ),
        (
            b"{\"v\":1,\"cmd\":\"flag-set\",\"name\":\"warp\",\"value\":\"on\"}\n",
            "unknown flag",
        ),
        (
            b"{\"v\":1,\"cmd\":\"migrate\",\"peer\":\"nowhere\"}\n",
            "not host:port",
        ),
        // More memory than the host has is refused up front, before anything is set up.
        (
            b"{\"v\":1,\"cmd\":\"migrate\",\"peer\":\"127.0.0.1:9\",\"memory\":\"1T\"}\n",
            "more than this host's memory",
        ),
    ] {
        let r = ask(&mut s, line);
        assert!(!r.ok, "{line:?} accepted");
        let e = r.error.unwrap_or_default();
        assert!(e.contains(expect), "{line:?}: {e}");
    }
    // The connection still works after all that, and nothing changed.
    let status: StatusInfo = ask(&mut s, b"{\"v\":1,\"cmd\":\"status\"}\n")
        .into_result()
        .unwrap();
    assert_eq!(status.mode.setting, "auto");
    assert!(!status.safe_mode);
    // An oversized request is refused without being read whole.
    let mut big = connect(&d);
    let mut line = b"{\"v\":1,\"cmd\":\"status\",\"pad\":\"".to_vec();
    line.resize(200_000, b'x');
    let _ = big.write_all(&line);
    let mut answer = String::new();
    BufReader::new(big).read_line(&mut answer).unwrap();
    assert!(answer.contains("request too long"), "{answer}");
    // A silent client is closed with a timeout; meanwhile others are served: another
    // client's answer arrives while the silent one is still waiting for its own.
    let mut silent = connect(&d);
    let mut s2 = connect(&d);
    assert!(ask(&mut s2, b"{\"v\":1,\"cmd\":\"status\"}\n").ok);
    silent.set_nonblocking(true).unwrap();
    let still_open = silent.read(&mut [0u8; 1]);
    assert!(
        still_open.is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the silent client was dealt with before the other was served"
    );
    silent.set_nonblocking(false).unwrap();
    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("timeout"), "{answer}");
    d.stop();
}

#[test]
fn hundreds_of_concurrent_clients_are_all_answered() {
    let d = start("many");
    let clients: Vec<UnixStream> = (0..300).map(|_| connect(&d)).collect();
    let answers: Vec<Response> = std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .into_iter()
            .map(|mut c| scope.spawn(move || ask(&mut c, b"{\"v\":1,\"cmd\":\"status\"}\n")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|r| r.ok),
        "{:?}",
        answers.iter().find(|r| !r.ok)
    );
    d.stop();
}

fn migrations(d: &Daemon) -> Vec<MigrationInfo> {
    d.call(Command::Migrations).into_result().unwrap()
}

/// Let migration `id` finish (no cap, a reachable limit) and check that the destination
/// verified every page.
fn finish_verified(d: &Daemon, id: u64) {
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(0),
        downtime_ms: Some(300),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    let migration = |d: &Daemon| migrations(d).into_iter().find(|m| m.id == id).unwrap();
    // Unpaced with a reachable limit, a 128 MiB guest writing 10 MB/s converges in a
    // few rounds; bounded by rounds, not by time.
    let last_round = migration(d).round + ROUNDS_TO_CONVERGE;
    loop {
        let m = migration(d);
        if m.state != "running" {
            assert_eq!(m.state, "completed", "{m:?}");
            assert_eq!(m.verified_pages, Some((128u64 << 20) / 4096));
            break;
        }
        assert!(m.round <= last_round, "no convergence: {m:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pacing cap (bytes/s) below the test guest's 10 MB/s of writes: with a 1 ms
/// downtime limit the migration stays in pre-copy until [`finish_verified`].
const HOLDING_CAP: u64 = 4_000_000;

/// Rounds a migration let go by [`finish_verified`] may take to finish.
const ROUNDS_TO_CONVERGE: u64 = 30;

#[test]
fn metrics_scrape_parses_and_safe_mode_mid_migration_loses_nothing() {
    let d = start("safe");
    let peer = d.listen_addr.to_string();
    // A cap below the guest's dirty rate keeps the migration going while safe mode is
    // switched on.
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(HOLDING_CAP),
        codec: Some("zstd:1,nodict".into()),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    let done: Done = d
        .call(Command::Migrate(dwcp_api::MigrateOptions {
            peer,
            downtime_ms: Some(1),
            ..Default::default()
        }))
        .into_result()
        .unwrap();
    let id = done.id.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while migrations(&d)[0].phase != "precopy" {
        assert!(Instant::now() < deadline, "{:?}", migrations(&d));
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = migrations(&d)[0].epoch;
    let opened_on = migrations(&d)[0].transport.clone();
    let flags = d.call(Command::FlagSet {
        name: "safe-mode".into(),
        value: "on".into(),
    });
    assert!(flags.ok, "{flags:?}");
    // Bounded by the migration's own progress, not by time: the epoch is adopted at
    // the engine's next loop boundary, and the streams move to plain sockets at the
    // next round boundary (the round in progress is cut short for it).
    let t = Instant::now();
    let set_in_round = migrations(&d)[0].round;
    let adopted = loop {
        let m = migrations(&d).remove(0);
        if m.epoch > before || m.state != "running" || m.round > set_in_round + 1 {
            break m;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        adopted.epoch > before && adopted.state == "running",
        "safe mode not adopted within the round: {adopted:?}"
    );
    eprintln!(
        "safe mode adopted in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(adopted.components, vec!["safe-mode"]);
    let switched = loop {
        let m = migrations(&d).remove(0);
        if m.transport == "plain" || m.state != "running" || m.round > set_in_round + 2 {
            break m;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        switched.transport == "plain" && switched.state == "running",
        "not on plain sockets by the next round boundary: {switched:?}"
    );
    eprintln!(
        "safe mode: {opened_on} -> plain sockets in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    // Scrape while it runs.
    let addr = d.metrics_addr.unwrap();
    let mut http = std::net::TcpStream::connect(addr).unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let mut names = std::collections::HashSet::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value of {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.starts_with("dwcp_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{name}"
        );
        if let Some(labels) = series.split_once('{').map(|(_, l)| l) {
            assert!(labels.ends_with('}'), "{series}");
            for pair in labels.trim_end_matches('}').split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                assert!(
                    !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                    "{series}"
                );
            }
        }
        names.insert(name.to_string());
    }
    for wanted in [
        "dwcp_migration_sent_bytes_total",
        "dwcp_stream_sent_bytes_total",
        "dwcp_stream_rtt_seconds",
        "dwcp_worker_cpu_seconds_total",
        "dwcp_safe_mode",
    ] {
        assert!(names.contains(wanted), "{wanted} missing");
    }
    assert!(body.contains("dwcp_safe_mode 1"));
    finish_verified(&d, id);
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert!(status.safe_mode && status.received == 1);
    // libfabric is probed: its tcp provider offers RMA here (RMA semantics over TCP).
    let rma = &status.capabilities;
    assert!(rma.rma_note.is_some(), "{rma:?}");
    if dwcp_dataplane::transport::fabric::library_version().is_some() {
        assert!(
            rma.rma_providers.iter().any(|p| p.starts_with("tcp")),
            "{rma:?}"
        );
    }
    let _ = Request::new(Command::Status);
    d.stop();
}

/// Wait (bounded by rounds) until migration `id` has ended; its last account.
fn ended(d: &Daemon, id: u64) -> MigrationInfo {
    let first = migrations(d).into_iter().find(|m| m.id == id).unwrap();
    loop {
        let m = migrations(d).into_iter().find(|m| m.id == id).unwrap();
        if m.state != "running" {
            return m;
        }
        assert!(
            m.round <= first.round + ROUNDS_TO_CONVERGE,
            "no convergence: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_daemon_set_for_rma_writes_pages_by_rma_until_safe_mode_says_plain() {
    if !dwcp_dataplane::transport::fabric::providers()
        .is_ok_and(|list| list.iter().any(|p| p.provider == "tcp"))
    {
        dwcp_tests::skip("no libfabric tcp provider with RMA here");
        return;
    }
    // Authenticated sessions, with the fabric (loopback) declared trusted for RMA.
    let d = start_with("rma", |c| {
        c.transport.kind = "rma".into();
        c.security.rma_in_clear = true;
    });
    let migrate = |d: &Daemon| migrate_to_itself(d, 300);
    let m = ended(&d, migrate(&d));
    assert_eq!(m.state, "completed", "{m:?}");
    assert_eq!(m.verified_pages, Some((128u64 << 20) / 4096));
    assert_eq!(m.transport, "rma", "{m:?}");
    let flags = d.call(Command::FlagSet {
        name: "safe-mode".into(),
        value: "on".into(),
    });
    assert!(flags.ok, "{flags:?}");
    let m = ended(&d, migrate(&d));
    assert_eq!(m.state, "completed", "{m:?}");
    assert_eq!(
        m.transport, "plain",
        "safe mode keeps sessions off RMA: {m:?}"
    );
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert!(
        status.transport.kind.contains("plain"),
        "{:?}",
        status.transport
    );
    d.stop();
}

#[test]
fn flooding_and_silent_clients_stall_neither_the_migration_nor_the_control_thread() {
    let d = start("flood");
    let (id, _) = held_migration(&d);
    let sent = |d: &Daemon| migrations(d)[0].bytes_sent;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let served = std::sync::atomic::AtomicU64::new(0);
    /// Stops the flooding clients however the scope ends: a failed assertion must not
    /// leave the scope waiting for them forever.
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|scope| {
        let _stop_clients = StopOnDrop(&stop);
        // Clients that connect and say nothing, holding their connections.
        let silent: Vec<UnixStream> = (0..32).map(|_| connect(&d)).collect();
        // Clients that send as fast as they are answered: garbage, unknown commands,
        // and valid requests, each reading every answer.
        for _ in 0..4 {
            scope.spawn(|| {
                let mut s = connect(&d);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for line in [
                        &b"{garbage\n"[..],
                        b"{\"v\":1,\"cmd\":\"explode\"}\n",
                        b"{\"v\":1,\"cmd\":\"status\"}\n",
                        b"{\"v\":1,\"cmd\":\"metrics\"}\n",
                    ] {
                        ask(&mut s, line);
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        // A client that connects and hangs up, over and over.
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                drop(connect(&d));
            }
        });
        // Meanwhile the control thread keeps taking the migration's reports (what it
        // shows moves on) and answers an operator promptly enough to show it.
        let flood_start = Instant::now();
        let before = sent(&d);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent(&d) == before {
            assert!(Instant::now() < deadline, "progress froze under the flood");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert!(sent(&d) > before);
        let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
        // The daemon migrates to itself: one migration out, the same one in.
        assert_eq!((status.running, status.receiving), (2, 1), "{status:?}");
        assert!(
            status.security.starts_with("TLS 1.3"),
            "{}",
            status.security
        );
        // Both ends of the migration say how its session is secured, and with whom.
        let list = migrations(&d);
        for m in &list {
            assert!(m.session.starts_with("TLS 1.3"), "{m:?}");
        }
        assert!(
            list.iter()
                .any(|m| m.direction == "incoming" && m.session.contains("appliance-a")),
            "{list:?}"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rate = served.load(std::sync::atomic::Ordering::Relaxed) as f64
            / flood_start.elapsed().as_secs_f64();
        eprintln!("flood: {rate:.0} requests/s answered beside the migration, 32 silent clients");
        drop(silent);
    });
    assert!(served.load(std::sync::atomic::Ordering::Relaxed) > 0);
    finish_verified(&d, id);
    // Nothing the control thread was sent went unread.
    let metrics: dwcp_api::MetricsText = d.call(Command::Metrics).into_result().unwrap();
    let dropped = metrics
        .text
        .lines()
        .find(|l| l.starts_with("dwcp_migration_dropped_reports_total"))
        .expect("the dropped-reports series");
    assert!(dropped.ends_with(" 0"), "{dropped}");
    // Its session was authenticated on both ends (source and destination are this
    // process: the counters are process-wide).
    let handshakes = metrics
        .text
        .lines()
        .find(|l| l.starts_with("dwcp_tls_handshakes_total{result=\"ok\"}"))
        .expect("the handshakes series");
    let ok: f64 = handshakes.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(ok >= 2.0, "{handshakes}");
    assert!(
        metrics
            .text
            .contains("dwcp_records_rejected_total{reason=\"authentication\"}")
    );
    assert!(
        metrics
            .text
            .contains("dwcp_data_streams_lost_total{side=\"source\"}")
    );
    d.stop();
}

#[test]
fn an_audited_migration_reports_its_audit_to_operators_and_in_metrics() {
    let d = start_with("audit", |c| c.migration.verify = "audit".into());
    let done: Done = d
        .call(Command::Migrate(dwcp_api::MigrateOptions {
            peer: d.listen_addr.to_string(),
            ..Default::default()
        }))
        .into_result()
        .unwrap();
    let id = done.id.unwrap();
    finish_verified(&d, id);
    let m = migrations(&d).into_iter().find(|m| m.id == id).unwrap();
    // Every page the simulated guest wrote was in its dirty log: nothing differs.
    assert_eq!(m.audit_mismatched, Some(0), "{m:?}");
    assert!(m.audit_pages.is_empty());
    let metrics: dwcp_api::MetricsText = d.call(Command::Metrics).into_result().unwrap();
    let line = format!("dwcp_migration_audit_mismatched_pages{{migration=\"{id}\"}} 0");
    assert!(metrics.text.contains(&line), "{}", metrics.text);
    d.stop();
}

/// Start a migration from the daemon to itself with downtime limit `downtime_ms`; its id.
fn migrate_to_itself(d: &Daemon, downtime_ms: u64) -> u64 {
    let done: Done = d
        .call(Command::Migrate(dwcp_api::MigrateOptions {
            peer: d.listen_addr.to_string(),
            downtime_ms: Some(downtime_ms),
            ..Default::default()
        }))
        .into_result()
        .unwrap();
    done.id.unwrap()
}

/// Start a migration to the daemon itself held in pre-copy by [`HOLDING_CAP`]; its id
/// once it is sending, and the id of the same migration as the daemon receives it.
fn held_migration(d: &Daemon) -> (u64, u64) {
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(HOLDING_CAP),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    let id = migrate_to_itself(d, 1);
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = migrations(d);
        let out = list.iter().find(|m| m.id == id).unwrap();
        // While it sets up (filling the guest, the handshake) it says what it does.
        if out.phase == "setup" && started.elapsed() > Duration::from_millis(100) {
            assert!(out.activity.is_some(), "a silent setup: {out:?}");
        }
        let incoming = list.iter().find(|m| m.direction == "incoming");
        if let Some(incoming) = incoming
            && out.bytes_sent > 0
            && out.phase == "precopy"
        {
            return (id, incoming.id);
        }
        assert!(Instant::now() < deadline, "{list:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn setting<'a>(settings: &'a [dwcp_api::SettingInfo], name: &str) -> (&'a str, &'a str) {
    let s = settings
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} missing from {settings:?}"));
    (&s.value, &s.source)
}

#[test]
fn overrides_outlive_mode_changes_show_their_source_and_refusals_say_so() {
    let d = start("overrides");
    let (id, incoming) = held_migration(&d);
    let r = d.call(Command::Set(SetOptions {
        streams: Some(2),
        congestion: Some("bbr".into()),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    // A mode change applies the mode's policy under the overrides: they stay.
    let r = d.call(Command::SetMode {
        mode: "datacenter".into(),
    });
    assert!(r.ok, "{r:?}");
    let m = migrations(&d).into_iter().find(|m| m.id == id).unwrap();
    assert_eq!(
        setting(&m.settings, "streams"),
        ("2 of 4 opened", "override")
    );
    assert_eq!(setting(&m.settings, "congestion"), ("bbr", "override"));
    assert_eq!(setting(&m.settings, "codec"), ("off", "mode datacenter"));
    assert_eq!(
        setting(&m.settings, "pacing-rate").1,
        "override",
        "{:?}",
        m.settings
    );
    // The engine takes the streams at its next round boundary.
    let deadline = Instant::now() + Duration::from_secs(30);
    while migrations(&d)[0].active_streams != 2 {
        assert!(Instant::now() < deadline, "{:?}", migrations(&d)[0]);
        std::thread::sleep(Duration::from_millis(20));
    }
    // `status` and `config` show what a new migration would get, with sources.
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert_eq!(setting(&status.settings, "congestion"), ("bbr", "override"));
    let config: serde_json::Value = d.call(Command::Config).into_result().unwrap();
    let effective = config["effective"].as_array().expect("effective settings");
    assert!(
        effective
            .iter()
            .any(|s| s["name"] == "streams" && s["source"] == "override"),
        "{effective:?}"
    );
    // More streams than the session opened: refused, and nothing changes.
    let r = d.call(Command::Set(SetOptions {
        streams: Some(8),
        ..SetOptions::default()
    }));
    let error = r.error.clone().unwrap_or_default();
    assert!(
        !r.ok && error.contains("refused") && error.contains("opened 4"),
        "{r:?}"
    );
    let m = migrations(&d).into_iter().find(|m| m.id == id).unwrap();
    assert_eq!(setting(&m.settings, "streams").0, "2 of 4 opened");
    // An incoming migration's settings are its source's.
    let r = d.call(Command::Set(SetOptions {
        id: Some(incoming),
        streams: Some(1),
        ..SetOptions::default()
    }));
    assert!(!r.ok && r.error.unwrap().contains("incoming"));
    finish_verified(&d, id);
    // A finished migration keeps the mode it ran in.
    assert!(
        d.call(Command::SetMode {
            mode: "internet".into()
        })
        .ok
    );
    let list = migrations(&d);
    for m in &list {
        assert_eq!(m.mode, "datacenter", "{m:?}");
    }
    d.stop();
}

#[test]
fn the_destination_lists_follows_counts_and_cancels_incoming_migrations() {
    let d = start("incoming");
    // Someone connected to the migration port first and says nothing: it holds up no
    // migration and is no migration itself.
    let _silent = std::net::TcpStream::connect(d.listen_addr).unwrap();
    let (id, incoming) = held_migration(&d);
    assert_eq!(
        migrations(&d).len(),
        2,
        "the silent connection is listed: {:?}",
        migrations(&d)
    );
    let list = migrations(&d);
    let out = list.iter().find(|m| m.id == id).unwrap();
    // Pages are counted while the first round is still going out.
    assert!(out.round == 0 && out.pages_sent > 0, "{out:?}");
    let m = list.iter().find(|m| m.id == incoming).unwrap();
    assert_eq!(
        (m.direction.as_str(), m.state.as_str()),
        ("incoming", "running")
    );
    assert!(m.peer.starts_with("127.0.0.1:"), "{m:?}");
    assert_eq!(m.memory_bytes, 128 << 20);
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert_eq!((status.running, status.receiving), (2, 1), "{status:?}");
    let metrics: dwcp_api::MetricsText = d.call(Command::Metrics).into_result().unwrap();
    for line in [
        "dwcp_migrations_running{direction=\"incoming\"} 1",
        "dwcp_migrations_running{direction=\"outgoing\"} 1",
    ] {
        assert!(metrics.text.contains(line), "{line} missing");
    }
    let pages_sent = metrics
        .text
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "dwcp_migration_pages_sent_total{{migration=\"{id}\"}}"
            ))
        })
        .expect("pages sent");
    assert!(!pages_sent.ends_with(" 0"), "{pages_sent}");
    // Received bytes move on at the destination as they do at the source.
    let received = |d: &Daemon| {
        migrations(d)
            .into_iter()
            .find(|m| m.id == incoming)
            .unwrap()
            .bytes_sent
    };
    let before = received(&d);
    let deadline = Instant::now() + Duration::from_secs(30);
    while received(&d) == before {
        assert!(
            Instant::now() < deadline,
            "the incoming migration shows no progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Cancelled at the destination: the source hears why and keeps its guest.
    let r = d.call(Command::Cancel { id: incoming });
    assert!(r.ok, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (out, inc) = loop {
        let list = migrations(&d);
        let out = list.iter().find(|m| m.id == id).unwrap().clone();
        let inc = list.iter().find(|m| m.id == incoming).unwrap().clone();
        if out.state != "running" && inc.state != "running" {
            break (out, inc);
        }
        assert!(Instant::now() < deadline, "{list:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(inc.state, "cancelled", "{inc:?}");
    assert_eq!(out.state, "failed", "{out:?}");
    assert!(
        out.error
            .unwrap_or_default()
            .contains("cancelled at the destination"),
        "the source names the reason"
    );
    let metrics: dwcp_api::MetricsText = d.call(Command::Metrics).into_result().unwrap();
    assert!(
        metrics
            .text
            .contains("dwcp_migrations_total{direction=\"incoming\",outcome=\"cancelled\"} 1"),
        "{}",
        metrics.text
    );
    d.stop();
}

#[test]
fn cancel_stops_a_migration_while_its_guest_is_still_being_filled() {
    let d = start("fill");
    // Filling 4 GiB takes seconds: the cancel arrives while it runs.
    let done: Done = d
        .call(Command::Migrate(dwcp_api::MigrateOptions {
            peer: d.listen_addr.to_string(),
            memory: Some("4G".into()),
            ..Default::default()
        }))
        .into_result()
        .unwrap();
    let id = done.id.unwrap();
    let r = d.call(Command::Cancel { id });
    assert!(r.ok, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = migrations(&d).into_iter().find(|m| m.id == id).unwrap();
        if m.state != "running" {
            break m;
        }
        assert!(Instant::now() < deadline, "still running: {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(m.state, "cancelled", "{m:?}");
    assert!(
        m.error
            .as_deref()
            .is_some_and(|e| e.contains("cancelled while filling")),
        "{m:?}"
    );
    d.stop();
}

/// The learned link model in a daemon: checked at start, shown in `status`, and
/// forecasting a running migration once it has its history; one that fails its card's
/// checks is refused with the reason and the EWMA forecasts.
#[test]
fn a_configured_link_model_forecasts_migrations_and_a_refused_one_leaves_the_ewma() {
    let begun = Instant::now();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/link");
    let forecast_by = |d: &Daemon, want: &str| {
        let (id, _) = held_migration(d);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let m = migrations(d).into_iter().find(|m| m.id == id).unwrap();
            if let Some(f) = m.link_forecast.as_ref().filter(|f| f.by == want) {
                assert!(f.mbit.iter().all(|v| v.is_finite() && *v > 0.0), "{f:?}");
                assert!(f.now_mbit >= 0.0);
                let r = d.call(Command::Cancel { id });
                assert!(r.ok, "{r:?}");
                return f.clone();
            }
            assert!(Instant::now() < deadline, "no forecast by {want}: {m:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let d = start_with("linkmodel", |c| {
        c.control.link_model = Some(shipped.clone())
    });
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert!(
        status.link_forecast.starts_with("model link-rate v1")
            && status.link_forecast.contains("held out"),
        "{}",
        status.link_forecast
    );
    let f = forecast_by(&d, "model");
    assert_eq!(f.horizons_s, [1.0, 5.0]);
    assert_eq!(f.mbit.len(), 2);
    drop(d);

    // The same model with one byte changed.
    let broken = std::env::temp_dir().join(format!("dwcp-linkmodel-{}", std::process::id()));
    std::fs::create_dir_all(&broken).unwrap();
    for file in ["link-rate.onnx", "link-rate.card.json"] {
        std::fs::copy(shipped.join(file), broken.join(file)).unwrap();
    }
    let mut bytes = std::fs::read(broken.join("link-rate.onnx")).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(broken.join("link-rate.onnx"), bytes).unwrap();
    let d = start_with("linkmodel-bad", |c| {
        c.control.link_model = Some(broken.clone())
    });
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert!(
        status.link_forecast.contains("refused") && status.link_forecast.contains("SHA-256"),
        "{}",
        status.link_forecast
    );
    let f = forecast_by(&d, "ewma");
    assert_eq!(f.mbit.len(), 1);
    drop(d);
    let _ = std::fs::remove_dir_all(&broken);
    eprintln!("link model test: {:.1} s", begun.elapsed().as_secs_f64());
}

/// With `[control] forecast_path_rate`, the planner's downtime estimate is told the
/// path's rate: here a pacing cap, which the EWMA of the spans with pages waiting finds,
/// and the completed migration shows what the final round was priced at.
#[test]
fn the_planner_prices_the_final_round_at_the_forecast_path_rate_when_asked() {
    let begun = Instant::now();
    let d = start_with("pathrate", |c| c.control.forecast_path_rate = true);
    let (id, _) = held_migration(&d);
    // 40 MB/s (320 Mbit/s), above the guest's 10 MB/s of writes: the migration
    // converges at the cap's pace.
    const CAP: u64 = 40_000_000;
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(CAP),
        downtime_ms: Some(300),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    let m = ended(&d, id);
    assert_eq!(m.state, "completed", "{m:?}");
    let cap_mbit = CAP as f64 * 8e-6;
    let path = m.estimate_path_mbit.expect("the estimate had a path rate");
    assert!(
        path > 0.5 * cap_mbit && path < 1.5 * cap_mbit,
        "path forecast {path} Mbit/s against a {cap_mbit} Mbit/s cap: {m:?}"
    );
    assert!(m.estimated_downtime_ms.is_some() && m.switchover.is_some());
    d.stop();
    eprintln!("path rate test: {:.1} s", begun.elapsed().as_secs_f64());
}

/// A migration whose path slows down mid-way (its pacing cap cut to a quarter) is
/// flagged by the anomaly detector (the rolling z-score by default), in `migrations`
/// and in the metrics.
#[test]
fn a_path_that_slows_down_is_flagged_in_migrations_and_metrics() {
    let begun = Instant::now();
    let recordings = std::env::temp_dir().join(format!("dwcp-links-{}", std::process::id()));
    std::fs::create_dir_all(&recordings).unwrap();
    let d = start_with("anomaly", |c| {
        c.control.record_links = Some(recordings.clone())
    });
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert!(
        status.anomaly_detection.starts_with("rolling z-score"),
        "{}",
        status.anomaly_detection
    );
    let (id, _) = held_migration(&d);
    // The detector needs 16 rows of about 0.3 s at the steady rate first.
    let deadline = Instant::now() + Duration::from_secs(40);
    let steady_since = Instant::now();
    while steady_since.elapsed() < Duration::from_secs(7) {
        let m = migrations(&d).into_iter().find(|m| m.id == id).unwrap();
        assert_eq!(m.state, "running", "{m:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(HOLDING_CAP / 4),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    let flagged = loop {
        let m = migrations(&d).into_iter().find(|m| m.id == id).unwrap();
        // (An RTT swing may be flagged before: the reason follows the latest row.)
        if let Some(flag) = m
            .path_flag
            .as_ref()
            .filter(|f| f.contains("acknowledged rate fell"))
        {
            break (flag.clone(), m.path_anomalies);
        }
        assert!(Instant::now() < deadline, "never flagged: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(flagged.1 >= 1, "{flagged:?}");
    let metrics: dwcp_api::MetricsText = d.call(Command::Metrics).into_result().unwrap();
    assert!(
        metrics.text.contains(&format!(
            "dwcp_migration_path_anomalies_total{{migration=\"{id}\"}}"
        )),
        "{}",
        metrics.text
    );
    let r = d.call(Command::Cancel { id });
    assert!(r.ok, "{r:?}");
    // What the control thread saw is kept once the migration has ended.
    let kept = recordings.join(format!("migration-{id}.csv"));
    while !kept.exists() {
        assert!(
            Instant::now() < deadline,
            "no recording in {}",
            kept.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(text.starts_with("t,acked_mbit,"), "{text}");
    assert!(text.lines().count() > 16, "{text}");
    let streams =
        std::fs::read_to_string(recordings.join(format!("migration-{id}-streams.csv"))).unwrap();
    assert!(streams.starts_with("t,stream,acked_mbit,"), "{streams}");
    assert!(
        streams.lines().count() > text.lines().count(),
        "a line per stream per row: {streams}"
    );
    let _ = std::fs::remove_dir_all(&recordings);
    eprintln!("path anomaly test: {:.1} s", begun.elapsed().as_secs_f64());
}

#[test]
fn the_destination_receives_migrations_at_once_and_one_beyond_max_sessions_hears_busy() {
    let started = Instant::now();
    let d = start_with("at-once", |c| c.dest.max_sessions = 2);
    let (first, _) = held_migration(&d);
    // A second, held like the first: both are received at once.
    let second = migrate_to_itself(&d, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
        if status.receiving == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", migrations(&d));
        std::thread::sleep(Duration::from_millis(20));
    }
    // A third is refused while both run, and the source says why.
    let third = migrate_to_itself(&d, 1);
    let third = ended(&d, third);
    assert_eq!(third.state, "failed", "{third:?}");
    let error = third.error.unwrap_or_default();
    assert!(
        error.contains("busy:") && error.contains("max_sessions = 2"),
        "{error}"
    );
    let status: StatusInfo = d.call(Command::Status).into_result().unwrap();
    assert_eq!(status.receiving, 2, "the refusal disturbed no session");
    finish_verified(&d, first);
    finish_verified(&d, second);
    let completed = migrations(&d)
        .into_iter()
        .filter(|m| m.direction == "incoming" && m.state == "completed")
        .count();
    assert_eq!(completed, 2, "{:?}", migrations(&d));
    d.stop();
    eprintln!(
        "two at once and one refused: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_data_stream_going_bad_is_flagged_and_carried_on_a_new_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let begun = Instant::now();
    let d = start_with("stream-flag", |c| c.control.replace_flagged_streams = true);
    // A relay in front of the daemon's migration port that, once told, slows the first
    // connection of data stream 1 to a trickle (its replacement goes through untouched).
    let slow = Arc::new(AtomicBool::new(false));
    let slowing = slow.clone();
    let relay = dwcp_tests::relay_to(d.listen_addr, move |client, server| {
        let victim = dwcp_tests::peek_stream_hello(&client) == Some((1, 0));
        dwcp_tests::pipe_back(&client, &server);
        if !victim {
            dwcp_tests::pipe(client, server);
            return;
        }
        let (mut from, mut to) = (client, server);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // Acquire: pairs with the test's Release store.
            let trickle = slowing.load(Ordering::Acquire);
            let want = if trickle { 4 << 10 } else { buf.len() };
            match from.read(&mut buf[..want]) {
                Ok(n) if n > 0 && to.write_all(&buf[..n]).is_ok() => {}
                _ => break,
            }
            if trickle {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let r = d.call(Command::Set(SetOptions {
        pacing_rate: Some(HOLDING_CAP),
        ..SetOptions::default()
    }));
    assert!(r.ok, "{r:?}");
    let done: Done = d
        .call(Command::Migrate(dwcp_api::MigrateOptions {
            peer: relay.to_string(),
            downtime_ms: Some(1),
            ..Default::default()
        }))
        .into_result()
        .unwrap();
    let id = done.id.unwrap();
    let migration = |d: &Daemon| migrations(d).into_iter().find(|m| m.id == id).unwrap();
    // Long enough for every stream's history (16 rows of about 0.3 s), then the trickle.
    let deadline = Instant::now() + Duration::from_secs(30);
    while migration(&d).elapsed_seconds < 6.0 {
        assert!(Instant::now() < deadline, "{:?}", migration(&d));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Printed, not asserted: a loaded machine may slow any stream for a moment.
    eprintln!(
        "stream anomalies before the trickle: {}",
        migration(&d).stream_anomalies
    );
    // Release: pairs with the relay's Acquire.
    slow.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = migration(&d);
        if m.notes
            .iter()
            .any(|n| n.starts_with("data stream 1 given up as asked"))
        {
            break m;
        }
        assert!(Instant::now() < deadline, "never flagged: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("flagged and replaced: {:?}", m.notes);
    assert!(m.stream_anomalies >= 1, "{m:?}");
    let note = m
        .notes
        .iter()
        .find(|n| n.starts_with("data stream 1 given up as asked"))
        .unwrap();
    assert!(note.contains("on the other streams"), "{note}");
    let metrics: dwcp_api::MetricsText = d.call(Command::Metrics).into_result().unwrap();
    assert!(
        metrics.text.lines().any(|l| l.starts_with(&format!(
            "dwcp_migration_stream_anomalies_total{{migration=\"{id}\"}}"
        )) && !l.ends_with(" 0")),
        "{}",
        metrics.text
    );
    finish_verified(&d, id);
    d.stop();
    eprintln!("stream flag test: {:.1} s", begun.elapsed().as_secs_f64());
}
