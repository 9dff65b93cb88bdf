//! Prometheus text exposition (format 0.0.4) of the daemon's state, and an optional
//! HTTP listener serving it at `/metrics`.
//!
//! Names follow the Prometheus conventions: a `dwcp_` prefix, base units (`_bytes`,
//! `_seconds`), `_total` on counters; per-migration series carry `migration`, per-stream
//! ones also `stream`, per-worker ones `worker`.

use crate::call::{Call, call};
use crate::mode::Mode;
use crossbeam::channel::Sender;
use dwcp_api::{Command, MetricsText, MigrationInfo, Request};
use dwcp_dataplane::engine::Progress;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// One migration's figures.
pub struct MigrationMetrics {
    /// What `migrations` shows.
    pub info: MigrationInfo,
    /// The latest engine report.
    pub progress: Option<Progress>,
    /// Reports the engine dropped because the control thread lagged.
    pub dropped_reports: u64,
}

/// Everything rendered.
pub struct Snapshot {
    /// Seconds since start.
    pub uptime: f64,
    /// Mode in force.
    pub mode: Option<Mode>,
    /// Mode switches.
    pub mode_changes: u64,
    /// Kill switch.
    pub safe_mode: bool,
    /// Control requests answered.
    pub requests_ok: u64,
    /// Control requests refused by the control thread.
    pub requests_failed: u64,
    /// Connections refused (peer, too many clients).
    pub clients_refused: u64,
    /// Malformed, oversized or unknown requests.
    pub bad_requests: u64,
    /// Clients closed for silence.
    pub client_timeouts: u64,
    /// Migrations by outcome.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Migrations received as destination, by outcome.
    pub received: crate::incoming::IncomingCounts,
    /// Incoming migrations (as destination).
    pub incoming: Vec<MigrationInfo>,
    /// TLS handshakes of sessions (either side), by outcome.
    pub tls_handshakes: Vec<(&'static str, u64)>,
    /// Data-stream records and bindings rejected, by reason.
    pub records_rejected: Vec<(&'static str, u64)>,
    /// Data streams lost, replaced, and the pages they left to others.
    pub stream_losses: dwcp_dataplane::engine::counters::StreamLosses,
    /// Per outgoing migration.
    pub migrations: Vec<MigrationMetrics>,
    /// This appliance's membership of its cluster, if it has one.
    pub cluster: Option<dwcp_api::ClusterInfo>,
}

/// The exposition text.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let none = String::new;
    family(
        "dwcp_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        &[(none(), s.uptime)],
    );
    let modes: Vec<(String, f64)> = [Mode::Datacenter, Mode::Hybrid, Mode::Internet]
        .iter()
        .map(|m| {
            (
                format!("{{mode=\"{m}\"}}"),
                f64::from(u8::from(s.mode == Some(*m))),
            )
        })
        .collect();
    family("dwcp_mode", "gauge", "1 for the mode in force.", &modes);
    family(
        "dwcp_mode_changes_total",
        "counter",
        "Mode switches.",
        &[(none(), s.mode_changes as f64)],
    );
    family(
        "dwcp_safe_mode",
        "gauge",
        "1 while the kill switch is on.",
        &[(none(), f64::from(u8::from(s.safe_mode)))],
    );
    family(
        "dwcp_control_requests_total",
        "counter",
        "Control socket requests, by result.",
        &[
            ("{result=\"ok\"}".into(), s.requests_ok as f64),
            ("{result=\"error\"}".into(), s.requests_failed as f64),
            ("{result=\"bad_request\"}".into(), s.bad_requests as f64),
            ("{result=\"timeout\"}".into(), s.client_timeouts as f64),
            ("{result=\"refused\"}".into(), s.clients_refused as f64),
        ],
    );
    let outcome = |direction: &str, outcome: &str, n: u64| {
        (
            format!("{{direction=\"{direction}\",outcome=\"{outcome}\"}}"),
            n as f64,
        )
    };
    family(
        "dwcp_migrations_total",
        "counter",
        "Migrations finished, by direction (outgoing: as source, incoming: as destination) and outcome.",
        &[
            outcome("outgoing", "completed", s.completed),
            outcome("outgoing", "failed", s.failed),
            outcome("outgoing", "cancelled", s.cancelled),
            outcome("incoming", "completed", s.received.completed),
            outcome("incoming", "failed", s.received.failed),
            outcome("incoming", "cancelled", s.received.cancelled),
        ],
    );
    let labelled = |label: &str, counts: &[(&'static str, u64)]| -> Vec<(String, f64)> {
        counts
            .iter()
            .map(|(l, n)| (format!("{{{label}=\"{l}\"}}"), *n as f64))
            .collect()
    };
    family(
        "dwcp_tls_handshakes_total",
        "counter",
        "TLS handshakes of sessions between appliances (as source or destination), by result.",
        &labelled("result", &s.tls_handshakes),
    );
    family(
        "dwcp_records_rejected_total",
        "counter",
        "Sealed data-stream records (and data streams' session bindings) rejected, by reason.",
        &labelled("reason", &s.records_rejected),
    );
    let l = &s.stream_losses;
    family(
        "dwcp_data_streams_lost_total",
        "counter",
        "Data streams lost mid-migration (failed, stalled or broken), by the side that counted them; their pages went to the other streams.",
        &[
            ("{side=\"source\"}".to_string(), l.lost_at_source as f64),
            (
                "{side=\"destination\"}".to_string(),
                l.lost_at_destination as f64,
            ),
        ],
    );
    family(
        "dwcp_data_streams_replaced_total",
        "counter",
        "Lost data streams a replacement connection carried again (as source).",
        &[(none(), l.replaced as f64)],
    );
    family(
        "dwcp_pages_requeued_total",
        "counter",
        "Pages queued again on other streams after their stream was lost (as source).",
        &[(none(), l.pages_requeued as f64)],
    );
    family(
        "dwcp_sessions_resumed_total",
        "counter",
        "Sessions resumed after every connection to the destination was lost (as source).",
        &[(none(), l.sessions_resumed as f64)],
    );
    family(
        "dwcp_pages_resent_after_resume_total",
        "counter",
        "Pages sent again after a resume, having gone out before the connections were lost (as source).",
        &[(none(), l.pages_resent_after_resume as f64)],
    );
    family(
        "dwcp_migrations_received_total",
        "counter",
        "Migrations received and verified as destination.",
        &[(none(), s.received.completed as f64)],
    );
    if let Some(c) = &s.cluster {
        family(
            "dwcp_cluster_leader",
            "gauge",
            "1 while this appliance leads its cluster.",
            &[(none(), f64::from(u8::from(c.role == "leader")))],
        );
        family(
            "dwcp_cluster_has_leader",
            "gauge",
            "1 while this appliance knows a leader (0: it cannot reach a majority and takes no writes).",
            &[(none(), f64::from(u8::from(c.leader != 0)))],
        );
        family(
            "dwcp_cluster_term",
            "gauge",
            "The raft term.",
            &[(none(), c.term as f64)],
        );
        family(
            "dwcp_cluster_index",
            "gauge",
            "Raft log indexes: the last in this appliance's log, the highest known committed, the highest applied.",
            &[
                ("{index=\"last\"}".into(), c.last_index as f64),
                ("{index=\"commit\"}".into(), c.commit as f64),
                ("{index=\"applied\"}".into(), c.applied as f64),
            ],
        );
        let lags: Vec<(String, f64)> = c
            .members
            .iter()
            .filter_map(|m| Some((format!("{{member=\"{}\"}}", m.id), m.lag? as f64)))
            .collect();
        family(
            "dwcp_cluster_member_lag_entries",
            "gauge",
            "As leader: entries each member lacks of the leader's log.",
            &lags,
        );
        family(
            "dwcp_cluster_members",
            "gauge",
            "Voting members of the cluster.",
            &[(none(), c.members.len() as f64)],
        );
        family(
            "dwcp_cluster_log_bytes",
            "gauge",
            "The raft log file's size.",
            &[(none(), c.log_bytes as f64)],
        );
        family(
            "dwcp_cluster_log_syncs_total",
            "counter",
            "fdatasync calls on the raft log.",
            &[(none(), c.log_syncs as f64)],
        );
        family(
            "dwcp_cluster_log_sync_seconds_total",
            "counter",
            "Seconds spent in fdatasync on the raft log.",
            &[(none(), c.log_sync_ms_mean * c.log_syncs as f64 / 1e3)],
        );
        family(
            "dwcp_cluster_messages_total",
            "counter",
            "Raft messages, by outcome.",
            &[
                ("{outcome=\"sent\"}".into(), c.messages_sent as f64),
                ("{outcome=\"received\"}".into(), c.messages_received as f64),
                ("{outcome=\"dropped\"}".into(), c.messages_dropped as f64),
            ],
        );
        family(
            "dwcp_cluster_connections_refused_total",
            "counter",
            "Raft connections refused (no TLS, failed authentication, not a member, bad frames).",
            &[(none(), c.connections_refused as f64)],
        );
        family(
            "dwcp_cluster_budget_bits_per_second",
            "gauge",
            "The site's WAN budget (absent: none).",
            &c.budget_bits_per_second
                .map(|b| vec![(none(), b as f64)])
                .unwrap_or_default(),
        );
    }
    let running = |info: &&MigrationInfo| info.state == "running";
    family(
        "dwcp_migrations_running",
        "gauge",
        "Migrations running, by direction.",
        &[
            (
                "{direction=\"outgoing\"}".into(),
                s.migrations.iter().map(|m| &m.info).filter(running).count() as f64,
            ),
            (
                "{direction=\"incoming\"}".into(),
                s.incoming.iter().filter(running).count() as f64,
            ),
        ],
    );
    let per_incoming = |f: &dyn Fn(&MigrationInfo) -> f64| -> Vec<(String, f64)> {
        s.incoming
            .iter()
            .map(|m| (format!("{{migration=\"{}\"}}", m.id), f(m)))
            .collect()
    };
    family(
        "dwcp_migration_received_bytes_total",
        "counter",
        "Bytes received on data streams (incoming migrations).",
        &per_incoming(&|m| m.bytes_sent as f64),
    );
    family(
        "dwcp_migration_pages_received_total",
        "counter",
        "Pages received, all rounds (incoming migrations).",
        &per_incoming(&|m| m.pages_sent as f64),
    );
    family(
        "dwcp_migration_receive_rate_bytes_per_second",
        "gauge",
        "Recent receive rate (incoming migrations).",
        &per_incoming(&|m| m.rate),
    );
    let per = |f: &dyn Fn(&MigrationMetrics) -> f64| -> Vec<(String, f64)> {
        s.migrations
            .iter()
            .map(|m| (format!("{{migration=\"{}\"}}", m.info.id), f(m)))
            .collect()
    };
    family(
        "dwcp_migration_path_anomalies_total",
        "counter",
        "Episodes the anomaly detector flagged on the migration's path.",
        &per(&|m| m.info.path_anomalies as f64),
    );
    family(
        "dwcp_migration_path_flagged",
        "gauge",
        "1 while the anomaly detector flags the migration's path as going bad.",
        &per(&|m| f64::from(u8::from(m.info.path_flag.is_some()))),
    );
    family(
        "dwcp_migration_stream_anomalies_total",
        "counter",
        "Episodes flagged on single data streams of the migration.",
        &per(&|m| m.info.stream_anomalies as f64),
    );
    let flagged_streams: Vec<(String, f64)> = s
        .migrations
        .iter()
        .flat_map(|m| {
            m.info.stream_flags.iter().map(move |f| {
                (
                    format!("{{migration=\"{}\",stream=\"{}\"}}", m.info.id, f.stream),
                    1.0,
                )
            })
        })
        .collect();
    family(
        "dwcp_migration_stream_flagged",
        "gauge",
        "1 for each data stream the anomaly detector flags as going bad (on its own and \
         against the migration's other streams); absent otherwise.",
        &flagged_streams,
    );
    family(
        "dwcp_migration_sent_bytes_total",
        "counter",
        "Bytes handed to the kernel on data streams.",
        &per(&|m| m.info.bytes_sent as f64),
    );
    family(
        "dwcp_migration_pages_sent_total",
        "counter",
        "Pages sent, all rounds.",
        &per(&|m| m.info.pages_sent as f64),
    );
    family(
        "dwcp_migration_memory_bytes",
        "gauge",
        "Guest memory being migrated.",
        &per(&|m| m.info.memory_bytes as f64),
    );
    family(
        "dwcp_migration_round",
        "gauge",
        "Current pre-copy round.",
        &per(&|m| m.info.round as f64),
    );
    family(
        "dwcp_migration_send_rate_bytes_per_second",
        "gauge",
        "Recent send rate.",
        &per(&|m| m.info.rate),
    );
    family(
        "dwcp_migration_dirty_rate_bytes_per_second",
        "gauge",
        "Guest dirty rate measured last round.",
        &per(&|m| m.info.dirty_rate),
    );
    family(
        "dwcp_migration_elapsed_seconds",
        "gauge",
        "Seconds since the migration started.",
        &per(&|m| m.info.elapsed_seconds),
    );
    family(
        "dwcp_migration_active_streams",
        "gauge",
        "Streams carrying pages.",
        &per(&|m| f64::from(m.info.active_streams)),
    );
    family(
        "dwcp_migration_epoch",
        "gauge",
        "Settings epoch adopted by the engine.",
        &per(&|m| m.info.epoch as f64),
    );
    family(
        "dwcp_migration_downtime_seconds",
        "gauge",
        "Measured downtime of a completed migration.",
        &per(&|m| m.info.downtime_ms.unwrap_or(0.0) / 1e3),
    );
    family(
        "dwcp_migration_audit_mismatched_pages",
        "gauge",
        "Pages the post-switchover audit found different from what was sent (verify = audit): writes the dirty log missed.",
        &s.migrations
            .iter()
            .filter_map(|m| {
                m.info
                    .audit_mismatched
                    .map(|n| (format!("{{migration=\"{}\"}}", m.info.id), n as f64))
            })
            .collect::<Vec<_>>(),
    );
    family(
        "dwcp_migration_dropped_reports_total",
        "counter",
        "Engine reports dropped because the control thread lagged.",
        &per(&|m| m.dropped_reports as f64),
    );
    let per_stream = |f: &dyn Fn(&dwcp_dataplane::transport::StreamTelemetry) -> Option<f64>| -> Vec<(String, f64)> {
        let mut v = Vec::new();
        for m in &s.migrations {
            for st in m.progress.iter().flat_map(|p| &p.streams) {
                if let Some(x) = f(st) {
                    v.push((format!("{{migration=\"{}\",stream=\"{}\"}}", m.info.id, st.stream), x));
                }
            }
        }
        v
    };
    family(
        "dwcp_stream_sent_bytes_total",
        "counter",
        "Bytes handed to the kernel, per stream.",
        &per_stream(&|t| Some(t.bytes as f64)),
    );
    family(
        "dwcp_stream_pages_sent_total",
        "counter",
        "Pages sent, per stream.",
        &per_stream(&|t| Some(t.pages as f64)),
    );
    family(
        "dwcp_stream_rtt_seconds",
        "gauge",
        "Smoothed RTT (TCP_INFO).",
        &per_stream(&|t| t.tcp.map(|i| f64::from(i.rtt_us) / 1e6)),
    );
    family(
        "dwcp_stream_rtt_variance_seconds",
        "gauge",
        "RTT variance (TCP_INFO).",
        &per_stream(&|t| t.tcp.map(|i| f64::from(i.rttvar_us) / 1e6)),
    );
    family(
        "dwcp_stream_retransmits_total",
        "counter",
        "Segments retransmitted (TCP_INFO).",
        &per_stream(&|t| t.tcp.map(|i| f64::from(i.total_retrans))),
    );
    family(
        "dwcp_stream_segments_sent_total",
        "counter",
        "Segments sent (TCP_INFO).",
        &per_stream(&|t| t.tcp.map(|i| f64::from(i.segs_out))),
    );
    family(
        "dwcp_stream_delivery_rate_bytes_per_second",
        "gauge",
        "Delivery rate estimate (TCP_INFO).",
        &per_stream(&|t| t.tcp.map(|i| i.delivery_rate as f64)),
    );
    let per_worker =
        |f: &dyn Fn(&dwcp_dataplane::engine::WorkerStatus) -> f64| -> Vec<(String, f64)> {
            let mut v = Vec::new();
            for m in &s.migrations {
                for w in m.progress.iter().flat_map(|p| &p.workers) {
                    v.push((
                        format!(
                            "{{migration=\"{}\",worker=\"{}\"}}",
                            m.info.id, w.telemetry.worker
                        ),
                        f(w),
                    ));
                }
            }
            v
        };
    family(
        "dwcp_worker_cpu_seconds_total",
        "counter",
        "CPU time of the worker thread (getrusage RUSAGE_THREAD).",
        &per_worker(&|w| w.telemetry.cpu_nanos as f64 / 1e9),
    );
    family(
        "dwcp_worker_queued_commands",
        "gauge",
        "Commands waiting in the worker's ring.",
        &per_worker(&|w| w.queued_commands as f64),
    );
    family(
        "dwcp_worker_codec_input_bytes_total",
        "counter",
        "Bytes of pages entering the codec pipeline.",
        &per_worker(&|w| w.telemetry.codec.input_bytes as f64),
    );
    family(
        "dwcp_worker_codec_output_bytes_total",
        "counter",
        "Bytes of frames the codec pipeline put out.",
        &per_worker(&|w| w.telemetry.codec.output_bytes as f64),
    );
    family(
        "dwcp_worker_stalled_seconds_total",
        "counter",
        "Time with work but no free send buffer.",
        &per_worker(&|w| w.telemetry.stalled_nanos as f64 / 1e9),
    );
    out
}

/// The HTTP listener for scrapers.
pub struct HttpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serve `GET /metrics` on `addr` (anything else: 404).
    pub fn start(addr: &str, calls: Sender<Call>) -> Result<HttpServer, String> {
        let listener = TcpListener::bind(addr).map_err(|e| format!("metrics on {addr}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("dwcp-metrics".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((s, _)) => serve(s, &calls),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(HttpServer {
            addr: bound,
            stop,
            handle: Some(handle),
        })
    }

    /// Stop listening.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One scrape (the request head is capped at 8 KiB and 2 s).
fn serve(mut s: std::net::TcpStream, calls: &Sender<Call>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let first = String::from_utf8_lossy(&head);
    let first = first.lines().next().unwrap_or("");
    let (status, body, kind) = if first.starts_with("GET /metrics ") {
        match call(
            calls,
            Request::new(Command::Metrics),
            Duration::from_secs(5),
        )
        .into_result::<MetricsText>()
        {
            Ok(m) => ("200 OK", m.text, "text/plain; version=0.0.4"),
            Err(e) => ("503 Service Unavailable", e, "text/plain"),
        }
    } else {
        ("404 Not Found", "only GET /metrics\n".into(), "text/plain")
    };
    let _ = write!(
        s,
        "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
