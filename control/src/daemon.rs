//! The daemon: its control thread and the components around it.
//!
//! Start order (each depends on the ones before it): flags → control thread →
//! destination listener → control socket → metrics listener. Stop order is the reverse;
//! running migrations are drained first (given `drain_seconds` to finish, then
//! cancelled, which leaves each source intact).
//!
//! The **control thread** is the slow path: it owns all daemon state (migrations,
//! flags, the mode detector, counters) and is the only thread that changes it. Clients
//! reach it through a request channel, engines through their live-report channel; it
//! never waits on either (a slow client waits on its own thread, a lagging report is
//! dropped by the engine). Every 100 ms it also checks the flags file.

use crate::anomaly::{AnomalyModel, DEFAULT_ZSCORE_THRESHOLD, Detector, PathWatch, StreamWatch};
use crate::call::{Call, ServerCounters, call};
use crate::cluster::Command as ClusterCommand;
use crate::cluster::member::{Member, ReadKind, WriteKind};
use crate::config::{ClusterPlan, Config};
use crate::flags::{Components, FlagStore};
use crate::incoming::{IncomingBook, IncomingEvent};
use crate::linkrec::LinkRecorder;
use crate::mode::{DetectorConfig, LinkMeter, Mode, ModeDetector, policy_for};
use crate::predict::{DEFAULT_EWMA_WEIGHT, Forecast, LinkForecaster, LinkModel, PathRateForecast};
use crate::qemu::QemuSource;
use crate::receiver::{DestCancel, DestThread};
use crate::runner::{self, Run, RunningGuest};
use crate::settings::{Layers, Overrides, layered};
use crossbeam::channel::{Receiver, Sender, bounded, never, select, tick};
use dwcp_api::{
    Capabilities, Command, Done, MetricsText, MigrateOptions, MigrationInfo, ModeInfo, Request,
    Response, SetOptions, SettingInfo, StatusInfo, TransportInfo,
};
use dwcp_dataplane::engine::{
    self, LiveControl, LiveReport, LiveSettings, MigrationReport, Progress,
};
use dwcp_dataplane::transport::{TransportChoice, TransportKind};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the daemon needs beyond its configuration file.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The validated configuration.
    pub config: Config,
}

/// How often a running migration's record goes to the cluster.
const RECORD_EVERY: Duration = Duration::from_secs(1);

/// Migration `m` as the cluster records it.
fn cluster_record(m: &Migration, source: u64) -> crate::cluster::MigrationRecord {
    let (round, remaining_bytes, rate) = m.latest.as_ref().map_or((0, m.memory_bytes, 0.0), |p| {
        (
            p.round,
            p.round_pages.saturating_sub(p.round_pages_sent) * PAGE_BYTES,
            p.bandwidth,
        )
    });
    crate::cluster::MigrationRecord {
        id: m.id,
        vm: m
            .vm
            .as_ref()
            .map_or_else(|| "simulated".into(), |vm| vm.name.clone()),
        source,
        destination: m.peer.clone(),
        state: match m.state {
            "running" | "completed" | "failed" | "cancelled" | "interrupted" => m.state.into(),
            _ => "running".into(),
        },
        round,
        interrupted_at: None,
        remaining_bytes,
        rate_bits_per_second: (rate * 8.0) as u64,
        deadline: m.deadline,
        reported_at: unix_now(),
    }
}

/// Bytes in a guest page.
const PAGE_BYTES: u64 = 4096;

/// Another member's migration as `migrations` lists it: what the cluster records.
fn recorded_migration_info(
    r: &crate::cluster::MigrationRecord,
    share_bits_per_second: Option<u64>,
) -> MigrationInfo {
    let mut notes = vec![format!(
        "on appliance {}, as the cluster records it (VM {})",
        r.source, r.vm
    )];
    if let Some(bits) = share_bits_per_second {
        notes.push(format!("budget share {:.1} Mbit/s", bits as f64 / 1e6));
    }
    MigrationInfo {
        id: r.id,
        direction: "outgoing".into(),
        peer: r.destination.clone(),
        state: r.state.clone(),
        phase: r.state.clone(),
        round: r.round,
        rate: r.rate_bits_per_second as f64 / 8.0,
        appliance: Some(r.source),
        notes,
        ..MigrationInfo::default()
    }
}

/// Seconds since the Unix epoch, by this appliance's clock.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A cluster command on an appliance whose cluster is to be founded at run time.
const UNFOUNDED: &str = "this appliance is in no cluster yet: `dwcpctl cluster init` founds \
     one here, `dwcpctl cluster join ADDR` joins the one a member of which listens at ADDR";

/// `cluster budget` on an appliance with no `[cluster]`.
const NOT_IN_A_CLUSTER: &str = "this appliance is not a cluster member: set [cluster] id, listen \
    and members (the same founding members on each appliance of the site)";

/// A migration the daemon started.
struct Migration {
    /// How its session is secured, as configured (the report says with whom).
    secured: bool,
    id: u64,
    peer: String,
    memory_bytes: u64,
    live: Arc<LiveControl>,
    components: Components,
    started: Instant,
    /// When it completed, failed or was cancelled.
    ended: Option<Instant>,
    latest: Option<Progress>,
    /// Link samples (and the recent send rate) from its reports.
    link: LinkMeter,
    /// What its reports say of its path: rows, forecast, anomaly flag.
    path: PathView,
    state: &'static str,
    error: Option<String>,
    report: Option<MigrationReport>,
    handle: Option<JoinHandle<()>>,
    /// The QEMU VM it moves, if it moves one.
    vm: Option<dwcp_api::VmInfo>,
    /// What its session opens with: the bottom layer of its live settings.
    base: LiveSettings,
    /// Streams its session opens.
    opened_streams: u16,
    /// Its share of the site's WAN budget (a cluster member's), bytes per second.
    budget_share: Option<u64>,
    /// When its record last went to the cluster.
    recorded: Option<Instant>,
    /// When its operator wants it done, seconds since the Unix epoch (`--deadline`):
    /// under a site budget its share covers what its bytes left need.
    deadline: Option<u64>,
    /// `set --id` overrides of this migration alone.
    overrides: Overrides,
    /// The mode it ended in (a running one follows the daemon's).
    ended_mode: Option<String>,
    /// While `interrupted` (this appliance stopped while it ran): its session's record,
    /// for `resume`.
    interrupted: Option<engine::OutgoingRecord>,
}

/// Counters for metrics.
#[derive(Default)]
struct Counters {
    requests_ok: u64,
    requests_failed: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    bytes_completed: u64,
}

/// The daemon's state, owned by the control thread.
struct ControlState {
    config: Config,
    started: Instant,
    flags: FlagStore,
    detector: ModeDetector,
    migrations: BTreeMap<u64, Migration>,
    next_id: u64,
    reports_tx: Sender<LiveReport>,
    done_tx: Sender<(u64, Result<MigrationReport, String>)>,
    capabilities: Capabilities,
    counters: Counters,
    server: Arc<ServerCounters>,
    shutdown: Arc<AtomicBool>,
    /// Overrides for every migration, set with `set` (no id).
    defaults: Overrides,
    mode_changes: u64,
    /// Incoming migrations.
    incoming: IncomingBook,
    /// What forecasts the migrations' links and flags their paths.
    path_models: PathModels,
    /// This appliance's membership of its site's cluster (`[cluster]`), if any.
    cluster: Option<Member>,
    /// `[cluster]` with no members and no log yet: founded or joined at run time
    /// (`cluster init`, `cluster join ADDR`).
    unfounded: Option<ClusterPlan>,
    /// Join requests this appliance made, answered (on their own threads).
    joins_done: (Sender<JoinDone>, Receiver<JoinDone>),
}

/// A join request this appliance made: the members' addresses, or why not; and the
/// operator waiting for it.
type JoinDone = (Result<BTreeMap<u64, String>, String>, Sender<Response>);

/// The link-rate predictor and the anomaly detector the daemon started with, each
/// with what `status` says of it (the rule in force, and why, when no model is).
struct PathModels {
    link_model: Option<LinkModel>,
    link_why: String,
    detector: Detector,
    detector_why: String,
}

impl PathModels {
    /// Load `[control] link_model` and `anomaly_model` if set; a model that fails its
    /// card's checks is reported here and left out.
    fn load(config: &Config) -> PathModels {
        let (detector, detector_why) = Self::load_detector(config);
        let (link_model, link_why) = Self::load_link_model(config);
        PathModels {
            link_model,
            link_why,
            detector,
            detector_why,
        }
    }

    fn load_detector(config: &Config) -> (Detector, String) {
        let rule = format!(
            "rolling z-score of the acknowledged rate and the RTT (threshold {DEFAULT_ZSCORE_THRESHOLD} sd)"
        );
        let Some(dir) = &config.control.anomaly_model else {
            return (
                Detector::ZScore(DEFAULT_ZSCORE_THRESHOLD),
                format!("{rule}: no anomaly model configured ([control] anomaly_model)"),
            );
        };
        match AnomalyModel::load(dir) {
            Ok(model) => {
                let why = format!(
                    "model {} v{} from {} ({}), checked against its card; flags above {}",
                    model.card().name,
                    model.card().version,
                    dir.display(),
                    model.card().model.kind,
                    model.card().output.threshold
                );
                (Detector::Model(Box::new(model)), why)
            }
            Err(e) => {
                eprintln!("dwcpd: anomaly model refused, the z-score flags instead: {e}");
                (
                    Detector::ZScore(DEFAULT_ZSCORE_THRESHOLD),
                    format!("{rule}: the anomaly model was refused at start: {e}"),
                )
            }
        }
    }

    fn load_link_model(config: &Config) -> (Option<LinkModel>, String) {
        let rule = format!("EWMA (weight {DEFAULT_EWMA_WEIGHT})");
        let Some(dir) = &config.control.link_model else {
            return (
                None,
                format!("{rule}: no link model configured ([control] link_model)"),
            );
        };
        match LinkModel::load(dir) {
            Ok(model) => {
                let card = model.card();
                let figures = card
                    .held_out
                    .metrics_line()
                    .unwrap_or_else(|| "no held-out figures".into());
                let why = format!(
                    "model {} v{} from {} ({}), checked against its card; held out: {figures}",
                    card.name,
                    card.version,
                    dir.display(),
                    card.model.kind
                );
                (Some(model), why)
            }
            Err(e) => {
                eprintln!("dwcpd: link model refused, the EWMA forecasts instead: {e}");
                (
                    None,
                    format!("{rule}: the link model was refused at start: {e}"),
                )
            }
        }
    }

    /// The link model's forecaster, else the EWMA.
    fn forecaster(&self) -> LinkForecaster {
        match &self.link_model {
            Some(m) => LinkForecaster::with_model(m.clone()),
            None => LinkForecaster::rule(DEFAULT_EWMA_WEIGHT),
        }
    }

    /// A new migration's view of its path; its rows kept for `record_links` when
    /// `keep_rows`.
    fn view(&self, keep_rows: bool) -> PathView {
        let now = Instant::now();
        PathView {
            rows: if keep_rows {
                LinkRecorder::new(now)
            } else {
                LinkRecorder::passing(now)
            },
            forecaster: self.forecaster(),
            forecast: None,
            path_rate: PathRateForecast::new(self.forecaster()),
            watch: PathWatch::new(self.detector.clone()),
            streams: StreamWatch::default(),
        }
    }
}

/// What a report told about a migration's path: the reason, when the path began an
/// anomaly episode; and the streams that began one, with theirs.
#[derive(Default)]
struct PathNews {
    path: Option<String>,
    streams: Vec<(u16, String)>,
}

/// One migration's path as the control thread sees it: its reports as link rows, the
/// forecast made from them (with the acknowledged rate it was made at), and whether
/// the path, or one of its data streams, is going bad.
struct PathView {
    rows: LinkRecorder,
    forecaster: LinkForecaster,
    forecast: Option<(f64, Forecast)>,
    /// The path's rate for the planner (`[control] forecast_path_rate`).
    path_rate: PathRateForecast,
    watch: PathWatch,
    streams: StreamWatch,
}

impl PathView {
    /// Take a report; what began an anomaly episode with it.
    fn observe(&mut self, progress: &Progress, at: Instant) -> PathNews {
        self.path_rate.report(progress);
        let Some(row) = self.rows.observe(progress, at) else {
            return PathNews::default();
        };
        self.path_rate.row(row);
        self.forecaster.push(row);
        self.forecast = self.forecaster.forecast().map(|f| (row.acked_mbit, f));
        PathNews {
            path: self
                .watch
                .push(row)
                .then(|| self.watch.flagged().map(|(_, why)| why.clone()))
                .flatten(),
            streams: self.streams.push(self.rows.last_streams()),
        }
    }

    /// Write the rows kept to `dir` (`migration-ID.csv`, `migration-ID-streams.csv`),
    /// then let go of them.
    fn keep(&mut self, dir: &std::path::Path, id: u64) {
        let path = dir.join(format!("migration-{id}.csv"));
        let streams = dir.join(format!("migration-{id}-streams.csv"));
        if let Err(e) = std::fs::write(&path, self.rows.to_csv())
            .and_then(|()| std::fs::write(&streams, self.rows.streams_csv()))
        {
            eprintln!(
                "dwcpd: keeping migration {id}'s link rows in {}: {e}",
                path.display()
            );
        }
        self.rows.forget();
    }
}

/// Everything probed about this host, for `status`.
pub fn probe_capabilities(config: &Config) -> Capabilities {
    let transport = config.source_config().transport;
    let probe = dwcp_dataplane::transport::probe(&transport);
    let rdma_devices = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let hugepages = format!(
        "{} reserved, {} free, {} kB each; transparent: {}",
        field("HugePages_Total:"),
        field("HugePages_Free:"),
        field("Hugepagesize:"),
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unavailable".into())
    );
    let mut cpu_features = vec![format!(
        "simd level {}",
        dwcp_simd::Kernels::active().level()
    )];
    #[cfg(target_arch = "x86_64")]
    {
        for (on, name) in [
            (std::arch::is_x86_feature_detected!("sse4.2"), "sse4.2"),
            (
                std::arch::is_x86_feature_detected!("pclmulqdq"),
                "pclmulqdq",
            ),
            (std::arch::is_x86_feature_detected!("avx2"), "avx2"),
            (std::arch::is_x86_feature_detected!("avx512f"), "avx512f"),
            (std::arch::is_x86_feature_detected!("avx512bw"), "avx512bw"),
            (
                std::arch::is_x86_feature_detected!("vpclmulqdq"),
                "vpclmulqdq",
            ),
        ] {
            if on {
                cpu_features.push(name.into());
            }
        }
    }
    let (rma_providers, rma_note, rma_hardware) = probe_rma();
    Capabilities {
        io_uring_ops: probe.uring_ops.iter().map(|s| s.to_string()).collect(),
        io_uring_note: (probe.kind != TransportKind::IoUring).then(|| probe.notes.join("; ")),
        zero_copy: probe.zero_copy,
        hugepages,
        rdma_devices,
        rma_providers,
        rma_note,
        rma_hardware,
        cpu_features,
    }
}

/// The libfabric providers offering RMA here, each as `status` shows it, a note, and
/// those on RDMA hardware (`provider on domain`).
fn probe_rma() -> (Vec<String>, Option<String>, Vec<String>) {
    use dwcp_dataplane::transport::fabric;
    match fabric::providers() {
        Ok(list) => {
            let shown = list
                .iter()
                .map(|p| {
                    format!(
                        "{}: fabric {}, domain {}{}",
                        p.provider,
                        p.fabric,
                        p.domain,
                        p.link_speed
                            .map_or(String::new(), |s| format!(", {:.0} Gbit/s", s as f64 / 1e9))
                    )
                })
                .collect();
            let version = fabric::library_version().unwrap_or_default();
            let note = if list.is_empty() {
                format!("libfabric {version}: no provider offers RMA on connected endpoints")
            } else if list.iter().all(|p| p.is_socket_based()) {
                format!(
                    "libfabric {version}: socket-based providers only (RMA semantics over TCP, \
                     no RDMA hardware)"
                )
            } else {
                format!("libfabric {version}")
            };
            let hardware = list
                .iter()
                .filter(|p| !p.is_socket_based())
                .map(|p| format!("{} on {}", p.provider, p.domain))
                .collect();
            (shown, Some(note), hardware)
        }
        Err(e) => (Vec::new(), Some(e.to_string()), Vec::new()),
    }
}

impl ControlState {
    fn mode_name(&self) -> String {
        self.detector
            .mode()
            .map_or("unknown".into(), |m| m.name().into())
    }

    fn status(&self) -> StatusInfo {
        let mode = self.detector.mode();
        let c = &self.config;
        let (next, settings) = self.new_live_settings();
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: dwcp_api::PROTOCOL_VERSION,
            role: "source+destination".into(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            mode: ModeInfo {
                current: self.mode_name(),
                setting: self
                    .detector
                    .fixed()
                    .map_or("auto".into(), |m| m.name().into()),
                why: self.detector.why(),
                policy: mode.map_or("configured settings (no mode yet)".into(), |m| {
                    policy_for(m, &self.capabilities.rma_hardware).to_string()
                }),
            },
            transport: TransportInfo {
                kind: if self.flags.flags.safe_mode {
                    "plain (safe mode)".into()
                } else if c.transport.kind == "rma" {
                    "rma (page contents by RMA write where the destination grants it; not encrypted)"
                        .into()
                } else if self.capabilities.io_uring_ops.is_empty() || c.transport.kind == "plain" {
                    "plain".into()
                } else {
                    "io_uring".into()
                },
                zero_copy: self.capabilities.zero_copy
                    && c.transport.zero_copy
                    && !self.flags.flags.safe_mode,
                congestion: next.congestion.to_string(),
                streams: c.migration.streams,
                codec: crate::settings::codec_text(&next.codec),
            },
            security: match c.session_security() {
                crate::config::SessionSecurityConfig::Certificates(f) => format!(
                    "TLS 1.3, mutual authentication, sealed data streams: certificate {}, CA {}{}",
                    f.cert.display(),
                    f.ca.display(),
                    if f.peers.is_empty() {
                        String::new()
                    } else {
                        format!(", peers pinned to {}", f.peers.join(", "))
                    }
                ),
                crate::config::SessionSecurityConfig::Insecure => {
                    "plain: not authenticated, not encrypted (--insecure)".into()
                }
                crate::config::SessionSecurityConfig::Missing => "no certificates".into(),
            },
            link_forecast: self.path_models.link_why.clone(),
            anomaly_detection: self.path_models.detector_why.clone(),
            capabilities: self.capabilities.clone(),
            listen: c.dest.listen.clone(),
            running: self.running_ids().len() + self.incoming.running(),
            receiving: self.incoming.running(),
            settings,
            safe_mode: self.flags.flags.safe_mode,
            received: self.incoming.counts().completed,
            vms: self
                .migrations
                .values()
                .filter(|m| m.state == "running")
                .filter_map(|m| m.vm.clone())
                .collect(),
            incoming_vm: c.dest.qmp.as_ref().map(|p| p.display().to_string()),
        }
    }

    fn info(&self, m: &Migration) -> MigrationInfo {
        let p = m.latest.as_ref();
        let phase = match (m.state, p) {
            ("running", Some(p)) => p.phase.to_string(),
            ("running", None) => "setup".into(),
            ("interrupted", _) => "interrupted".into(),
            _ => "done".into(),
        };
        let eta = p.and_then(|p| {
            let left = p.round_pages.saturating_sub(p.round_pages_sent) as f64 * 4096.0;
            (m.link.rate() > 0.0 && m.state == "running").then(|| left / m.link.rate())
        });
        let activity = m.live.activity();
        MigrationInfo {
            id: m.id,
            direction: "outgoing".into(),
            peer: m.peer.clone(),
            state: m.state.into(),
            activity: (phase == "setup" && !activity.is_empty()).then_some(activity),
            phase,
            round: m.report.as_ref().map_or(p.map_or(0, |p| p.round), |r| {
                r.rounds.len().saturating_sub(1) as u64
            }),
            memory_bytes: m.memory_bytes,
            round_pages: p.map_or(0, |p| p.round_pages),
            round_pages_queued: p.map_or(0, |p| p.round_pages_queued),
            round_pages_sent: p.map_or(0, |p| p.round_pages_sent),
            bytes_sent: p
                .map_or(0, |p| p.stream_bytes())
                .max(m.report.as_ref().map_or(0, |r| r.bytes_sent)),
            pages_sent: m
                .report
                .as_ref()
                .map_or(p.map_or(0, |p| p.pages_sent), |r| {
                    r.rounds.iter().map(|r| r.pages).sum()
                }),
            rate: m.link.rate(),
            dirty_rate: p.map_or(0.0, |p| p.dirty_rate),
            eta_seconds: eta,
            throttle: p.map_or(0, |p| p.throttle),
            elapsed_seconds: m
                .ended
                .unwrap_or_else(Instant::now)
                .duration_since(m.started)
                .as_secs_f64(),
            mode: m.ended_mode.clone().unwrap_or_else(|| self.mode_name()),
            active_streams: p.map_or(0, |p| p.active_streams),
            streams: p.map_or(0, |p| p.connected_streams),
            // The last progress says; a migration that ended before its first
            // report has its report (RMA when pages went by RMA).
            transport: p
                .map(|p| p.transport.to_string())
                .or_else(|| {
                    m.report.as_ref().map(|r| match &r.transport.rma {
                        Some(rma) if rma.pages > 0 => "rma".into(),
                        _ => r.transport.kind.clone(),
                    })
                })
                .unwrap_or_default(),
            epoch: m.live.adopted(),
            ping_ms: p.and_then(|p| p.ping_rtt).map(|d| d.as_secs_f64() * 1e3),
            components: m.components.names(),
            error: m.error.clone(),
            session: match &m.report {
                Some(r) => engine::SecurityReport::describe(r.transport.security.as_ref()),
                None if m.secured => {
                    "TLS 1.3 with mutual authentication, data streams sealed (AES-256-GCM)".into()
                }
                None => engine::SecurityReport::describe(None),
            },
            link_forecast: m
                .path
                .forecast
                .as_ref()
                .filter(|_| m.state == "running")
                .map(|(now, f)| dwcp_api::LinkForecastInfo {
                    now_mbit: *now,
                    mbit: f.mbit.clone(),
                    horizons_s: f.horizons_s.clone(),
                    by: f.by.into(),
                }),
            path_flag: m
                .path
                .watch
                .flagged()
                .filter(|_| m.state == "running")
                .map(|(since, why)| format!("going bad since {since:.1} s: {why}")),
            path_anomalies: m.path.watch.episodes(),
            stream_flags: m
                .path
                .streams
                .flagged()
                .iter()
                .filter(|_| m.state == "running")
                .map(|(&stream, (since, why))| dwcp_api::StreamFlagInfo {
                    stream,
                    since_s: *since,
                    why: why.clone(),
                })
                .collect(),
            stream_anomalies: m.path.streams.episodes(),
            appliance: None,
            downtime_ms: m.report.as_ref().map(|r| r.measured_downtime * 1e3),
            estimated_downtime_ms: m.report.as_ref().map(|r| r.estimated_downtime * 1e3),
            estimate_path_mbit: m
                .report
                .as_ref()
                .map(|r| r.downtime.estimated.path_rate * 8e-6)
                .filter(|mbit| *mbit > 0.0),
            switchover: m.report.as_ref().map(|r| r.switchover_reason.clone()),
            verified_pages: m.report.as_ref().map(|r| r.verified_pages),
            audit_mismatched: m
                .report
                .as_ref()
                .and_then(|r| r.audit.as_ref())
                .map(|a| a.mismatched),
            audit_pages: m
                .report
                .as_ref()
                .and_then(|r| r.audit.as_ref())
                .map(|a| a.pages.clone())
                .unwrap_or_default(),
            notes: m.live.notes(),
            vm: m.vm.clone(),
            settings: if m.state == "running" {
                self.layers_of(m).1
            } else {
                Vec::new()
            },
        }
    }

    /// Every migration, outgoing and incoming, by id.
    fn all_infos(&mut self) -> Vec<MigrationInfo> {
        self.incoming.refresh(&mut self.next_id);
        let mut list: Vec<MigrationInfo> = self.migrations.values().map(|m| self.info(m)).collect();
        list.extend(self.incoming.infos(&self.mode_name()));
        list.sort_by_key(|m| m.id);
        list
    }

    /// Migration `m`'s live settings, from all layers, and where each comes from.
    fn layers_of(&self, m: &Migration) -> (LiveSettings, Vec<SettingInfo>) {
        self.layers(
            &m.base,
            m.opened_streams,
            Some(&m.overrides),
            &m.components,
            m.budget_share,
        )
    }

    /// The daemon's layers (mode, overrides for all) over a migration's own.
    fn layers(
        &self,
        base: &LiveSettings,
        opened: u16,
        own: Option<&Overrides>,
        components: &Components,
        budget_share: Option<u64>,
    ) -> (LiveSettings, Vec<SettingInfo>) {
        layered(&Layers {
            base,
            opened,
            mode: self.detector.mode(),
            rma_hardware: &self.capabilities.rma_hardware,
            all: &self.defaults,
            own,
            components,
            budget_share,
        })
    }

    /// What a migration started now with the configured settings would run with.
    fn new_live_settings(&self) -> (LiveSettings, Vec<SettingInfo>) {
        let source = self.config.source_config();
        let components = self.flags.flags.components_for(self.next_id);
        self.layers(
            &LiveSettings::from_config(&source),
            source.streams,
            None,
            &components,
            None,
        )
    }

    /// A call from the socket or the metrics listener: answered now, or, for a write to
    /// the cluster, once its entry has applied here ([`ControlState::pump_cluster`]).
    fn call(&mut self, request: Request, reply: Sender<Response>) {
        if request.v == dwcp_api::PROTOCOL_VERSION {
            match &request.command {
                Command::ClusterInit => {
                    let _ = reply.try_send(self.found_cluster().unwrap_or_else(Response::error));
                    return;
                }
                Command::ClusterJoinAt { address } => {
                    if let Err(e) = self.join_cluster(address, reply.clone()) {
                        let _ = reply.try_send(Response::error(e));
                    }
                    return;
                }
                _ => {}
            }
        }
        if request.v == dwcp_api::PROTOCOL_VERSION
            && let Some(member) = self.cluster.as_mut()
        {
            let write = match &request.command {
                Command::FlagSet { name, value } => Some((
                    ClusterCommand::SetFlag {
                        name: name.clone(),
                        value: value.clone(),
                    },
                    WriteKind::Flag,
                )),
                Command::ClusterBudget { bits_per_second } => Some((
                    ClusterCommand::SetBudget {
                        bits_per_second: *bits_per_second,
                    },
                    WriteKind::Budget,
                )),
                Command::SetMode { mode } => Some((
                    ClusterCommand::SetMode { mode: mode.clone() },
                    WriteKind::Mode,
                )),
                _ => None,
            };
            if let Some((command, kind)) = write {
                member.write(&command, kind, reply);
                return;
            }
            match &request.command {
                // Current, like `cluster migrations`: this appliance's own, then what
                // the cluster records of the other members'.
                Command::Migrations => {
                    member.read(ReadKind::Migrations, reply);
                    return;
                }
                Command::ClusterMigrations => {
                    member.read(ReadKind::Records, reply);
                    return;
                }
                Command::ClusterJoin { id, address } => {
                    member.change_membership(*id, Some(address), reply);
                    return;
                }
                Command::ClusterLeave { id } => {
                    let id = id.unwrap_or(member.id());
                    member.change_membership(id, None, reply);
                    return;
                }
                _ => {}
            }
        }
        let _ = reply.try_send(self.handle(request));
    }

    /// `cluster init`: a cluster of this appliance alone, which others then join.
    fn found_cluster(&mut self) -> Result<Response, String> {
        let Some(mut plan) = self.unfounded.take() else {
            return Err(self.cluster_founded_already());
        };
        plan.members = BTreeMap::from([(plan.id, plan.listen)]);
        let (id, listen) = (plan.id, plan.listen);
        match Member::start(plan.clone(), self.config.identity()?) {
            Ok(member) => self.cluster = Some(member),
            Err(e) => {
                self.unfounded = Some(ClusterPlan {
                    members: BTreeMap::new(),
                    ..plan
                });
                return Err(e);
            }
        }
        Ok(Response::ok(Done {
            message: format!(
                "founded a cluster of one: appliance {id} leads it once elected (about a \
                 second); other appliances join with `dwcpctl cluster join {listen}`"
            ),
            id: None,
        }))
    }

    /// `cluster join ADDR`: starts this appliance's member (it founds nothing) and asks
    /// the member at `address` to add it, on a thread; the answer comes back through
    /// `joins_done`.
    fn join_cluster(&mut self, address: &str, reply: Sender<Response>) -> Result<(), String> {
        let target: SocketAddr = address.parse().map_err(|_| {
            format!("{address:?} is not a member's raft address like 10.0.0.1:7401")
        })?;
        let identity = self.config.identity()?;
        match (&self.unfounded, &self.cluster) {
            (Some(_), _) => {}
            // Started to join before (or with `join = true`), not added yet: ask again.
            (None, Some(member)) if member.info().members.is_empty() => {}
            _ => return Err(self.cluster_founded_already()),
        }
        if let Some(plan) = self.unfounded.take() {
            let plan = ClusterPlan { join: true, ..plan };
            match Member::start(plan.clone(), identity.clone()) {
                Ok(member) => self.cluster = Some(member),
                Err(e) => {
                    self.unfounded = Some(ClusterPlan {
                        join: false,
                        ..plan
                    });
                    return Err(e);
                }
            }
        }
        let member = self.cluster.as_ref().expect("started above");
        let (id, listen) = (member.id(), member.listen());
        let done = self.joins_done.0.clone();
        std::thread::Builder::new()
            .name("dwcp-cluster-join".into())
            .spawn(move || {
                let answer =
                    crate::cluster::peers::request_join(target, id, listen, identity.as_ref());
                let _ = done.send((answer, reply));
            })
            .map_err(|e| format!("starting the join request: {e}"))?;
        Ok(())
    }

    /// Why `init` or `join` cannot run here.
    fn cluster_founded_already(&self) -> String {
        match &self.cluster {
            Some(member) => format!(
                "this appliance is already member {} of a cluster (see `dwcpctl cluster status`)",
                member.id()
            ),
            None => NOT_IN_A_CLUSTER.into(),
        }
    }

    /// A join request this appliance made was answered: it talks to the members from
    /// now on.
    fn joined(&mut self, (answer, reply): JoinDone) {
        let response = match (answer, self.cluster.as_mut()) {
            (Ok(members), Some(member)) => {
                member.add_peers(&members);
                let list: Vec<String> = members
                    .iter()
                    .map(|(id, address)| format!("{id} at {address}"))
                    .collect();
                Response::ok(Done {
                    message: format!(
                        "appliance {} joined the cluster: members {}; it catches up from the leader",
                        member.id(),
                        list.join(", ")
                    ),
                    id: None,
                })
            }
            (Ok(_), None) => Response::error("the daemon is shutting down"),
            (Err(e), _) => Response::error(format!("cluster: joining: {e}")),
        };
        let _ = reply.try_send(response);
    }

    /// Raft's ready work; answers the writes that applied; takes the cluster's flags
    /// once it has any.
    fn pump_cluster(&mut self) {
        let Some(member) = self.cluster.as_mut() else {
            return;
        };
        member.mark_silent_members(unix_now());
        let answered = member.pump();
        // `migrations` reads and `cluster migrations` reads, answered from one view.
        let (migration_reads, record_reads): (Vec<_>, Vec<_>) = member
            .take_reads()
            .into_iter()
            .partition(|(read, _)| read.kind == ReadKind::Migrations);
        let state = member.state();
        let me = member.id();
        let shares = state.budget_shares();
        let others: Vec<MigrationInfo> = if migration_reads.is_empty() {
            Vec::new()
        } else {
            state
                .migrations
                .iter()
                .filter(|(_, r)| r.source != me)
                .map(|(key, r)| recorded_migration_info(r, shares.get(key).copied()))
                .collect()
        };
        if !record_reads.is_empty() {
            let view: Vec<dwcp_api::ClusterMigrationInfo> = state
                .migrations
                .iter()
                .map(|(key, r)| dwcp_api::ClusterMigrationInfo {
                    id: r.id,
                    source: r.source,
                    vm: r.vm.clone(),
                    destination: r.destination.clone(),
                    state: r.state.clone(),
                    round: r.round,
                    interrupted_at: r.interrupted_at,
                    remaining_bytes: r.remaining_bytes,
                    rate_bits_per_second: r.rate_bits_per_second,
                    budget_share_bits_per_second: shares.get(key).copied(),
                    deadline: r.deadline,
                })
                .collect();
            for (read, result) in record_reads {
                let _ = read.reply.try_send(match result {
                    Ok(()) => Response::ok(&view),
                    Err(e) => Response::error(format!("cluster: {e}")),
                });
            }
        }
        let budget = state.budget_bits_per_second;
        let recorded: Vec<u64> = state.migrations.keys().copied().collect();
        let cluster_flags = (state.flag_changes > 0 && state.flags != self.flags.flags)
            .then(|| state.flags.clone());
        let cluster_mode = state.mode.clone();
        if let Some(flags) = cluster_flags {
            let was_safe = self.flags.flags.safe_mode;
            if let Err(e) = self.flags.replace(flags.clone()) {
                eprintln!("dwcpd: flags file: {e} (the cluster's flags are in force, not written)");
                self.flags.flags = flags;
            }
            if was_safe != self.flags.flags.safe_mode {
                self.apply_safe_mode();
            }
        }
        self.apply_budget_shares(me, &shares, &recorded);
        if let Some(mode) = cluster_mode {
            let fixed = mode.parse::<Mode>().ok();
            if fixed != self.detector.fixed() {
                self.detector.set_override(fixed);
                self.apply_mode("cluster mode");
            }
        }
        for (read, result) in migration_reads {
            let reply = read.reply;
            let mut list = self.all_infos();
            let mut others = others.clone();
            // No current view: what this member applied last, said so.
            if let Err(e) = result {
                for m in &mut others {
                    m.notes.push(format!("as last applied here: {e}"));
                }
            }
            list.extend(others);
            let _ = reply.try_send(Response::ok(list));
        }
        for (write, result) in answered {
            let response = match (result, write.kind) {
                (Err(e), _) => Response::error(format!("cluster: {e}")),
                (Ok(()), WriteKind::Flag) => Response::ok(self.flags.flags.info(self.flags.path())),
                (Ok(()), WriteKind::Join(members)) => {
                    Response::ok(crate::cluster::peers::JoinAnswer {
                        members,
                        leader: None,
                    })
                }
                (Ok(()), WriteKind::Mode) => Response::ok(Done {
                    message: format!(
                        "mode {} on every member; here now {}",
                        match self.detector.fixed() {
                            Some(m) => m.to_string(),
                            None => "auto".into(),
                        },
                        self.mode_name()
                    ),
                    id: None,
                }),
                (Ok(()), WriteKind::Membership) => Response::ok(Done {
                    message: "membership changed on every member (see `dwcpctl cluster status`)"
                        .into(),
                    id: None,
                }),
                (Ok(()), WriteKind::Budget) => Response::ok(Done {
                    message: match budget {
                        Some(bits) => format!(
                            "the site's WAN budget is {:.1} Mbit/s on every member",
                            bits as f64 / 1e6
                        ),
                        None => "the site's WAN budget is lifted on every member".into(),
                    },
                    id: None,
                }),
            };
            let _ = write.reply.try_send(response);
        }
    }

    /// Migration `id`'s share of the site's budget once its record is in, bytes per
    /// second (`None` without a cluster or a budget).
    fn provisional_share(&self, id: u64, memory_bytes: u64, deadline: Option<u64>) -> Option<u64> {
        let member = self.cluster.as_ref()?;
        let mut state = member.state().clone();
        let record = crate::cluster::MigrationRecord {
            id,
            source: member.id(),
            state: "running".into(),
            remaining_bytes: memory_bytes,
            deadline,
            reported_at: unix_now(),
            ..Default::default()
        };
        let key = record.key();
        state.migrations.insert(key, record);
        state
            .budget_shares()
            .get(&key)
            .map(|bits| (bits / 8).max(1))
    }

    /// Each running migration of this appliance gets its share of the site's budget as
    /// a pacing cap (under any lower one an operator set); a share that moved by less
    /// than 2% is left as it was, so that reports do not republish settings every time.
    /// A migration whose record is not in the cluster's state yet keeps the share it
    /// started with.
    fn apply_budget_shares(&mut self, me: u64, shares: &BTreeMap<u64, u64>, recorded: &[u64]) {
        for id in self.running_ids() {
            let key = crate::cluster::record_key(me, id);
            if !recorded.contains(&key) {
                continue;
            }
            let share = shares.get(&key).map(|bits| (bits / 8).max(1));
            let m = &self.migrations[&id];
            let moved = match (m.budget_share, share) {
                (Some(old), Some(new)) => old.abs_diff(new) * 50 > old,
                (old, new) => old != new,
            };
            if !moved {
                continue;
            }
            self.migrations
                .get_mut(&id)
                .expect("running id")
                .budget_share = share;
            let m = &self.migrations[&id];
            let (settings, _) = self.layers_of(m);
            m.live.publish(
                settings,
                match share {
                    Some(bytes) => {
                        format!("cluster budget: {:.1} Mbit/s", bytes as f64 * 8.0 / 1e6)
                    }
                    None => "cluster budget lifted".into(),
                },
            );
        }
    }

    fn handle(&mut self, request: Request) -> Response {
        if request.v != dwcp_api::PROTOCOL_VERSION {
            return Response::error(format!(
                "protocol version {} not supported (this daemon speaks {})",
                request.v,
                dwcp_api::PROTOCOL_VERSION
            ));
        }
        let result = self.dispatch(request.command);
        match result {
            Ok(r) => {
                self.counters.requests_ok += 1;
                r
            }
            Err(e) => {
                self.counters.requests_failed += 1;
                Response::error(e)
            }
        }
    }

    fn dispatch(&mut self, command: Command) -> Result<Response, String> {
        match command {
            Command::Status => Ok(Response::ok(self.status())),
            Command::Migrations => Ok(Response::ok(self.all_infos())),
            Command::Migrate(options) => self.migrate(options),
            Command::Cancel { id } => self.cancel(id),
            Command::Resume { id } => self.resume(id),
            Command::SetMode { mode } => {
                let fixed = match mode.as_str() {
                    "auto" => None,
                    other => Some(other.parse::<Mode>()?),
                };
                self.detector.set_override(fixed);
                self.apply_mode("set-mode");
                Ok(Response::ok(Done {
                    message: format!("mode {mode}; now {}", self.mode_name()),
                    id: None,
                }))
            }
            Command::Set(options) => self.set(options),
            Command::Flags => Ok(Response::ok(self.flags.flags.info(self.flags.path()))),
            Command::FlagSet { name, value } => {
                let was_safe = self.flags.flags.safe_mode;
                self.flags.set(&name, &value)?;
                if was_safe != self.flags.flags.safe_mode {
                    self.apply_safe_mode();
                }
                Ok(Response::ok(self.flags.flags.info(self.flags.path())))
            }
            Command::FlagsReload if self.cluster.is_some() => Err(
                "this appliance is a cluster member: its flags are the cluster's, changed with \
                 `dwcpctl flags NAME VALUE` on any member, not read from its file"
                    .into(),
            ),
            Command::ClusterStatus => Ok(Response::ok(match (&self.cluster, &self.unfounded) {
                (Some(member), _) => member.info(),
                (None, Some(plan)) => dwcp_api::ClusterInfo {
                    enabled: true,
                    id: plan.id,
                    role: "unfounded".into(),
                    ..Default::default()
                },
                (None, None) => dwcp_api::ClusterInfo::default(),
            })),
            Command::ClusterBudget { .. }
            | Command::ClusterMigrations
            | Command::ClusterJoin { .. }
            | Command::ClusterLeave { .. }
                if self.unfounded.is_some() =>
            {
                Err(UNFOUNDED.into())
            }
            Command::ClusterBudget { .. }
            | Command::ClusterMigrations
            | Command::ClusterJoin { .. }
            | Command::ClusterLeave { .. } => Err(NOT_IN_A_CLUSTER.into()),
            // Taken in `call`.
            Command::ClusterInit | Command::ClusterJoinAt { .. } => {
                Err("cluster init and join are answered by the control loop".into())
            }
            Command::FlagsReload => {
                let was_safe = self.flags.flags.safe_mode;
                self.flags.reload()?;
                if was_safe != self.flags.flags.safe_mode {
                    self.apply_safe_mode();
                }
                Ok(Response::ok(self.flags.flags.info(self.flags.path())))
            }
            Command::Metrics => Ok(Response::ok(MetricsText {
                text: self.metrics(),
            })),
            Command::Config => {
                // The file's settings, and beside them what a migration started now would
                // run with (mode policy, overrides and flags applied), with sources.
                let mut value = serde_json::to_value(&self.config).map_err(|e| e.to_string())?;
                if let Some(object) = value.as_object_mut() {
                    object.insert(
                        "effective".into(),
                        serde_json::to_value(self.new_live_settings().1)
                            .map_err(|e| e.to_string())?,
                    );
                }
                Ok(Response::ok(value))
            }
            Command::Shutdown => {
                self.shutdown.store(true, Ordering::Release);
                Ok(Response::ok(Done {
                    message: "shutting down: draining migrations".into(),
                    id: None,
                }))
            }
        }
    }

    /// Cancel migration `id`, outgoing (the source keeps its guest) or incoming (its
    /// source is told and keeps its guest).
    fn cancel(&self, id: u64) -> Result<Response, String> {
        let message = match (self.incoming.cancel(id), self.migrations.get(&id)) {
            (Some(result), _) => {
                result?;
                format!("incoming migration {id}: cancelling (its source keeps the guest)")
            }
            (None, Some(m)) if m.state == "running" => {
                m.live.cancel("by the operator");
                format!("migration {id}: cancelling")
            }
            (None, Some(m)) => return Err(format!("migration {id} is {}, not running", m.state)),
            (None, None) => return Err(format!("no migration {id}")),
        };
        Ok(Response::ok(Done {
            message,
            id: Some(id),
        }))
    }

    fn migrate(&mut self, o: MigrateOptions) -> Result<Response, String> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err("shutting down: no new migrations".into());
        }
        let peer: SocketAddr = o
            .peer
            .parse()
            .map_err(|_| format!("peer {:?} is not host:port (an IP address)", o.peer))?;
        let mut config = self.config.clone();
        if let Some(m) = &o.memory {
            config.guest.memory = m.parse()?;
        }
        if let Some(r) = o.dirty_rate_mbps {
            config.guest.dirty_rate_mbps = r;
        }
        if let Some(s) = o.streams {
            config.migration.streams = s;
        }
        if let Some(d) = o.downtime_ms {
            config.migration.downtime_limit_ms = d;
        }
        if let Some(c) = &o.codec {
            config.codec.mode = c.clone();
        }
        if let Some(qmp) = &o.qmp {
            config.guest.kind = "qemu".into();
            config.guest.qmp = Some(qmp.into());
        }
        config.validate().map_err(|e| e.to_string())?;
        if let Some(record) = config.outgoing_record_path()
            && record.exists()
        {
            return Err(format!(
                "an interrupted migration's record is in {}: resume it (`dwcpctl resume ID`) \
                 before starting another from the same guest memory file",
                record.display()
            ));
        }
        let deadline = match o.deadline_s {
            Some(0) => return Err("a deadline of 0 s cannot be met: give seconds from now".into()),
            Some(seconds) => Some(unix_now() + seconds),
            None => None,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.start_outgoing(id, config, peer, None, deadline)
    }

    /// Resume interrupted migration `id` (see [`ControlState::load_interrupted`]).
    fn resume(&mut self, id: u64) -> Result<Response, String> {
        if self.shutdown.load(Ordering::Acquire) {
            return Err("shutting down: no new migrations".into());
        }
        let record = match self.migrations.get(&id) {
            Some(m) if m.interrupted.is_some() => m.interrupted.clone(),
            Some(m) => return Err(format!("migration {id} is {}, not interrupted", m.state)),
            None => return Err(format!("no migration {id}")),
        };
        let Some(record) = record else {
            return Err(format!("no migration {id}"));
        };
        let mut config = self.config.clone();
        config.guest.memory = crate::config::Size(record.memory_bytes);
        config.migration.streams = record.streams;
        if let Some(qmp) = &record.guest {
            config.guest.kind = "qemu".into();
            config.guest.qmp = Some(qmp.into());
        }
        let peer = record.peer;
        let deadline = self.migrations.remove(&id).and_then(|m| m.deadline);
        self.start_outgoing(id, config, peer, Some(record), deadline)
    }

    /// A migration this appliance was sending when it stopped, found by its record in
    /// `[control] state_dir`: listed as `interrupted` (and resumed at once with
    /// `[migration] auto_resume`).
    fn load_interrupted(&mut self) {
        let Some(path) = self.config.outgoing_record_path() else {
            return;
        };
        if !path.exists() {
            return;
        }
        let record = match engine::OutgoingRecord::read(&path) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dwcpd: {e}; the migration it recorded cannot be resumed");
                return;
            }
        };
        // It keeps its number: the operator and the cluster's record know it by that.
        let id = record
            .migration_id
            .filter(|id| *id > 0 && !self.migrations.contains_key(id))
            .unwrap_or(self.next_id);
        self.next_id = self.next_id.max(id + 1);
        eprintln!(
            "dwcpd: migration {id} to {} was interrupted in round {} (session {:032x}); \
             `dwcpctl resume {id}` continues it",
            record.peer, record.round, record.session_id
        );
        let source = self.config.source_config();
        let base = LiveSettings::from_config(&source);
        let components = self.flags.flags.components_for(id);
        // Its deadline, if it had one, is in the cluster's record of it.
        let deadline = self.cluster.as_ref().and_then(|member| {
            let key = crate::cluster::record_key(member.id(), id);
            member.state().migrations.get(&key)?.deadline
        });
        self.migrations.insert(
            id,
            Migration {
                secured: source.security.is_some() || !self.config.security.insecure,
                id,
                peer: record.peer.to_string(),
                memory_bytes: record.memory_bytes,
                live: LiveControl::new(id, base.clone(), None),
                components,
                started: Instant::now(),
                ended: None,
                latest: None,
                link: LinkMeter::default(),
                path: self
                    .path_models
                    .view(self.config.control.record_links.is_some()),
                state: "interrupted",
                error: None,
                report: None,
                handle: None,
                vm: None,
                base,
                opened_streams: record.streams,
                overrides: Overrides::default(),
                budget_share: None,
                recorded: None,
                deadline,
                ended_mode: None,
                interrupted: Some(record),
            },
        );
        if self.config.migration.auto_resume
            && let Err(e) = self.resume(id)
        {
            eprintln!("dwcpd: resuming migration {id}: {e}");
        }
    }

    /// Start migration `id` of `config`'s guest to `peer` (resuming `resume`'s session
    /// when given).
    fn start_outgoing(
        &mut self,
        id: u64,
        config: Config,
        peer: SocketAddr,
        resume: Option<engine::OutgoingRecord>,
        deadline: Option<u64>,
    ) -> Result<Response, String> {
        // A VM is checked here, before the migration starts, so that the operator hears
        // at once why one cannot move (not QEMU, RAM not a shared file, not running).
        let vm = match &config.guest.qmp {
            Some(qmp) => Some(QemuSource::open(qmp).map_err(|e| e.to_string())?),
            None => None,
        };
        let vm_info = vm.as_ref().map(|vm| {
            let i = vm.info();
            dwcp_api::VmInfo {
                name: i.name.clone(),
                qemu_version: i.qemu_version.clone(),
                memory_file: i.memory_file.display().to_string(),
                state: i.state.clone(),
            }
        });
        let memory_bytes = vm
            .as_ref()
            .map_or(config.guest.memory.0, |vm| vm.info().memory_bytes);
        let components = self.flags.flags.components_for(id);
        let mut source = config.source_config();
        // Loaded for each migration: replaced certificates apply without a restart.
        source.security = config.identity()?;
        // The bottom layer is what was configured; flags narrow it in `layered`.
        let base = LiveSettings::from_config(&source);
        if !components.io_uring {
            source.transport.choice = TransportChoice::Plain;
        }
        source.transport.zero_copy &= components.zero_copy;
        let resuming = resume.is_some();
        source.resume = resume;
        source.record_migration_id = Some(id);
        // Under a site budget it starts at its share, not at full speed until its first
        // record comes back from the cluster.
        let budget_share = self.provisional_share(id, memory_bytes, deadline);
        let (settings, _) = self.layers(&base, source.streams, None, &components, budget_share);
        // RMA connections open with the session: it asks for them when the settings
        // in force say RMA (configured, or datacenter mode on RDMA hardware), never in
        // safe mode or with the rdma flag off.
        match settings.transport {
            Some(TransportKind::Rma) => source.transport.choice = TransportChoice::Rma,
            _ if source.transport.choice == TransportChoice::Rma => {
                source.transport.choice = if components.io_uring {
                    TransportChoice::Auto
                } else {
                    TransportChoice::Plain
                };
            }
            _ => {}
        }
        let live = LiveControl::new(id, settings, Some(self.reports_tx.clone()));
        let done = self.done_tx.clone();
        let thread_live = live.clone();
        let use_model = components.ml_predictor;
        let source_streams = source.streams;
        let source_secured = source.security.is_some();
        let handle = std::thread::Builder::new()
            .name(format!("dwcp-mig{id}"))
            .spawn(move || {
                let result = run_migration(&config, peer, &source, &thread_live, use_model, vm);
                let _ = done.send((id, result));
            })
            .map_err(|e| format!("starting the migration thread: {e}"))?;
        self.migrations.insert(
            id,
            Migration {
                secured: source_secured,
                id,
                peer: peer.to_string(),
                memory_bytes,
                live,
                components,
                started: Instant::now(),
                ended: None,
                latest: None,
                link: LinkMeter::default(),
                path: self
                    .path_models
                    .view(self.config.control.record_links.is_some()),
                state: "running",
                error: None,
                report: None,
                handle: Some(handle),
                vm: vm_info,
                base,
                opened_streams: source_streams,
                overrides: Overrides::default(),
                budget_share,
                recorded: None,
                deadline,
                ended_mode: None,
                interrupted: None,
            },
        );
        if let Some(member) = self.cluster.as_mut() {
            let m = self.migrations.get_mut(&id).expect("just inserted");
            m.recorded = Some(Instant::now());
            member.record(&ClusterCommand::PutMigration(cluster_record(
                m,
                member.id(),
            )));
        }
        Ok(Response::ok(Done {
            message: if resuming {
                format!("migration {id} to {peer} resumed")
            } else {
                format!("migration {id} to {peer} started")
            },
            id: Some(id),
        }))
    }

    fn set(&mut self, o: SetOptions) -> Result<Response, String> {
        // Check everything before changing anything.
        let changes = Overrides::parse(&o)?;
        let targets: Vec<u64> = match o.id {
            Some(id) => match self.migrations.get(&id) {
                Some(m) if m.state == "running" => vec![id],
                Some(m) => return Err(format!("migration {id} is {}, not running", m.state)),
                None if self.incoming.contains(id) => {
                    return Err(format!(
                        "migration {id} is incoming: its settings are its source's to change"
                    ));
                }
                None => return Err(format!("no migration {id}")),
            },
            None => self.running_ids(),
        };
        if let Some(n) = changes.streams {
            // A session cannot carry pages on streams it never opened.
            let short: Vec<String> = targets
                .iter()
                .map(|id| &self.migrations[id])
                .filter(|m| m.opened_streams < n)
                .map(|m| format!("migration {} opened {}", m.id, m.opened_streams))
                .collect();
            if !short.is_empty() {
                return Err(format!(
                    "refused: streams {n} is more than a running migration opened ({}); \
                     nothing changed (give at most that many, or --id for another migration)",
                    short.join(", ")
                ));
            }
        }
        match o.id {
            Some(id) => self
                .migrations
                .get_mut(&id)
                .expect("checked above")
                .overrides
                .merge(&changes),
            None => self.defaults.merge(&changes),
        }
        for id in &targets {
            let m = &self.migrations[id];
            let (settings, _) = self.layers_of(m);
            m.live.publish(settings, "operator: set");
        }
        let mut what = changes.describe();
        let opens = self.config.migration.streams;
        if o.id.is_none()
            && let Some(n) = changes.streams
            && n > opens
        {
            // Not refused: `migrate --streams` may open more. But say so.
            what += &format!(
                " (a migration opens {opens} streams unless `migrate --streams` asks for more, \
                 and carries pages on at most those)"
            );
        }
        let message = match (o.id, targets.len()) {
            (Some(id), _) => format!("migration {id}: {what}"),
            (None, 0) => format!("no migration running; later migrations get {what}"),
            (None, n) => format!("{n} running migration(s) and later ones: {what}"),
        };
        Ok(Response::ok(Done { message, id: o.id }))
    }

    fn running_ids(&self) -> Vec<u64> {
        self.migrations
            .values()
            .filter(|m| m.state == "running")
            .map(|m| m.id)
            .collect()
    }

    /// Publish the mode's policy to every running migration (under the overrides and
    /// flags, which a mode change leaves in force).
    fn apply_mode(&mut self, why: &str) {
        let Some(mode) = self.detector.mode() else {
            return;
        };
        for id in self.running_ids() {
            let m = &self.migrations[&id];
            let (settings, _) = self.layers_of(m);
            m.live.publish(settings, format!("mode {mode} ({why})"));
        }
    }

    /// Safe mode changed: every running migration gets (or loses) the simplest path.
    fn apply_safe_mode(&mut self) {
        let safe = self.flags.flags.safe_mode;
        for id in self.running_ids() {
            let components = self.flags.flags.components_for(id);
            let m = self.migrations.get_mut(&id).expect("running id");
            m.components = components;
            let m = &self.migrations[&id];
            // Off: back to what the migration opened with, under the other layers.
            let (settings, _) = self.layers_of(m);
            m.live.publish(
                settings,
                if safe {
                    "safe mode on"
                } else {
                    "safe mode off"
                },
            );
        }
    }

    fn take_report(&mut self, r: LiveReport) {
        let Some(m) = self.migrations.get_mut(&r.migration) else {
            return;
        };
        let news = m.path.observe(&r.progress, r.at);
        if self.config.control.forecast_path_rate {
            m.live.set_path_rate(m.path.path_rate.bytes_per_second());
        }
        if let Some(why) = news.path {
            eprintln!("dwcpd: migration {}: its path is going bad: {why}", m.id);
        }
        for (stream, why) in news.streams {
            eprintln!(
                "dwcpd: migration {}: data stream {stream} is going bad: {why}",
                m.id
            );
            if self.config.control.replace_flagged_streams {
                m.live
                    .replace_stream(stream, format!("flagged going bad: {why}"));
            }
        }
        let sample = m.link.sample(&r.progress, r.at, self.started);
        m.latest = Some(r.progress);
        // The cluster hears of it about once a second (its share follows).
        if let Some(member) = self.cluster.as_mut()
            && m.recorded.is_none_or(|t| t.elapsed() >= RECORD_EVERY)
        {
            m.recorded = Some(Instant::now());
            member.record(&ClusterCommand::PutMigration(cluster_record(
                m,
                member.id(),
            )));
        }
        if let Some(sample) = sample
            && self.detector.push(sample).is_some()
        {
            self.mode_changes += 1;
            self.apply_mode("detected");
        }
    }

    fn finish(&mut self, id: u64, result: Result<MigrationReport, String>) {
        let Some(m) = self.migrations.get_mut(&id) else {
            return;
        };
        if let Some(h) = m.handle.take() {
            let _ = h.join();
        }
        m.ended = Some(Instant::now());
        if let Some(dir) = &self.config.control.record_links {
            m.path.keep(dir, id);
        }
        m.ended_mode = Some(
            self.detector
                .mode()
                .map_or("unknown".into(), |m| m.name().into()),
        );
        match &result {
            Ok(report) => eprintln!(
                "dwcpd: migration {id} to {} completed: final round {}, {} pages verified, \
                 downtime {:.1} ms; session {}",
                m.peer,
                report.rounds.len().saturating_sub(1),
                report.verified_pages,
                report.measured_downtime * 1e3,
                engine::SecurityReport::describe(report.transport.security.as_ref())
            ),
            Err(e) => eprintln!(
                "dwcpd: migration {id} to {} {}: {e} ({})",
                m.peer,
                if m.live.cancelled().is_some() {
                    "cancelled"
                } else {
                    "failed"
                },
                match &m.vm {
                    Some(vm) => format!("the VM {:?} runs on here", vm.name),
                    None => "the simulated guest it moved is discarded".into(),
                }
            ),
        }
        if let Some(vm) = &mut m.vm {
            // Handed over, or taken back (the report's notes say if that failed).
            vm.state = if result.is_ok() {
                "postmigrate"
            } else {
                "running"
            }
            .into();
        }
        match result {
            Ok(report) => {
                m.state = "completed";
                self.counters.completed += 1;
                self.counters.bytes_completed += report.bytes_sent;
                m.report = Some(report);
            }
            Err(e) => {
                if m.live.cancelled().is_some() {
                    m.state = "cancelled";
                    self.counters.cancelled += 1;
                } else {
                    m.state = "failed";
                    self.counters.failed += 1;
                }
                m.error = Some(e);
            }
        }
        if let Some(member) = self.cluster.as_mut() {
            member.record(&ClusterCommand::PutMigration(cluster_record(
                m,
                member.id(),
            )));
        }
    }

    fn metrics(&mut self) -> String {
        self.incoming.refresh(&mut self.next_id);
        crate::metrics::render(&crate::metrics::Snapshot {
            uptime: self.started.elapsed().as_secs_f64(),
            mode: self.detector.mode(),
            mode_changes: self.mode_changes,
            safe_mode: self.flags.flags.safe_mode,
            requests_ok: self.counters.requests_ok,
            requests_failed: self.counters.requests_failed,
            clients_refused: self.server.refused.load(Ordering::Relaxed),
            bad_requests: self.server.bad_requests.load(Ordering::Relaxed),
            client_timeouts: self.server.timeouts.load(Ordering::Relaxed),
            completed: self.counters.completed,
            failed: self.counters.failed,
            cancelled: self.counters.cancelled,
            received: self.incoming.counts(),
            incoming: self.incoming.infos(&self.mode_name()),
            tls_handshakes: dwcp_dataplane::security::counters::handshakes(),
            records_rejected: dwcp_dataplane::security::counters::records_rejected(),
            stream_losses: dwcp_dataplane::engine::counters::stream_losses(),
            migrations: self
                .migrations
                .values()
                .map(|m| crate::metrics::MigrationMetrics {
                    info: self.info(m),
                    progress: m.latest.clone(),
                    dropped_reports: m.live.dropped_reports(),
                })
                .collect(),
            cluster: self.cluster.as_ref().map(Member::info),
        })
    }
}

/// One migration of the simulated guest, or of the QEMU VM opened already, on its
/// own thread.
fn run_migration(
    config: &Config,
    peer: SocketAddr,
    source: &engine::SourceConfig,
    live: &LiveControl,
    use_model: bool,
    vm: Option<QemuSource>,
) -> Result<MigrationReport, String> {
    let mut guest = match vm {
        Some(vm) => {
            live.set_activity("mapping the VM's RAM file and starting its dirty log");
            RunningGuest::qemu(config, vm)?
        }
        None if source.resume.is_some() => {
            live.set_activity(
                "opening the guest's memory file as it is, reading it back into the CRC \
                 table, resuming the session",
            );
            RunningGuest::resume(config)?
        }
        None => {
            live.set_activity(RunningGuest::describe_start(config));
            RunningGuest::start_until(config, &|| live.cancelled().is_some())?
        }
    };
    let run = Run {
        config,
        source,
        live: Some(live),
        codec_policy: use_model,
    };
    let result = runner::migrate(&run, peer, &mut guest, &mut |_| {});
    guest.stop();
    result
}

/// The daemon, running.
pub struct Daemon {
    calls: Sender<Call>,
    shutdown: Arc<AtomicBool>,
    control: Option<JoinHandle<()>>,
    dest: Option<JoinHandle<()>>,
    /// Set when incoming migrations must give up (the drain time is over).
    dest_cancel: DestCancel,
    /// How long shutdown lets migrations run before cancelling them.
    drain: Duration,
    server: Option<crate::server::Server>,
    metrics: Option<crate::metrics::HttpServer>,
    /// Where incoming migrations are accepted.
    pub listen_addr: SocketAddr,
    /// The control socket.
    pub socket: PathBuf,
    /// The metrics listener, if any.
    pub metrics_addr: Option<SocketAddr>,
}

impl Daemon {
    /// Start every component, in dependency order.
    pub fn start(options: DaemonOptions) -> Result<Daemon, String> {
        let config = options.config;
        // Certificates first: an appliance that cannot secure its sessions does not
        // start (unless told to run insecure).
        config.identity()?;
        let flags = FlagStore::open(config.control.flags_file.clone())?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let server_counters = Arc::new(ServerCounters::default());
        // The destination listener binds first: a taken port fails the start cleanly.
        let listener = TcpListener::bind(&config.dest.listen)
            .map_err(|e| format!("listening on {}: {e}", config.dest.listen))?;
        let listen_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (calls_tx, calls_rx) = bounded::<Call>(1024);
        let (reports_tx, reports_rx) = LiveControl::report_channel(4096);
        let (done_tx, done_rx) = bounded(256);
        let (incoming_tx, incoming_rx) = bounded::<IncomingEvent>(64);
        let mut detector = ModeDetector::new(DetectorConfig::default());
        if config.control.mode != "auto" {
            detector.set_override(Some(config.control.mode.parse()?));
        }
        let mut state = ControlState {
            capabilities: probe_capabilities(&config),
            config: config.clone(),
            started: Instant::now(),
            flags,
            detector,
            migrations: BTreeMap::new(),
            next_id: 1,
            reports_tx,
            done_tx,
            counters: Counters::default(),
            server: server_counters.clone(),
            incoming: IncomingBook::default(),
            shutdown: shutdown.clone(),
            defaults: Overrides::default(),
            mode_changes: 0,
            path_models: PathModels::load(&config),
            cluster: None,
            unfounded: None,
            joins_done: bounded(4),
        };
        if let Some(plan) = config.cluster_plan()?
            && plan.members.is_empty()
            && !crate::cluster::DurableLog::exists_in(&plan.dir)
        {
            eprintln!(
                "dwcpd: cluster: appliance {} is in no cluster yet (`dwcpctl cluster init` or `cluster join ADDR`)",
                plan.id
            );
            state.unfounded = Some(plan);
        } else if let Some(plan) = config.cluster_plan()? {
            let mut member = Member::start(plan, config.identity()?)?;
            // The entries this member had committed apply now; its own migrations'
            // records among them keep their numbers: new migrations count on from them.
            member.pump();
            let me = member.id();
            if let Some(last) = member
                .state()
                .migrations
                .values()
                .filter(|r| r.source == me)
                .map(|r| r.id)
                .max()
            {
                state.next_id = last + 1;
            }
            state.cluster = Some(member);
        }
        state.load_interrupted();
        let control_shutdown = shutdown.clone();
        let drain = Duration::from_secs(config.control.drain_seconds);
        let control = std::thread::Builder::new()
            .name("dwcp-control".into())
            .spawn(move || {
                control_loop(
                    &mut state,
                    calls_rx,
                    reports_rx,
                    done_rx,
                    incoming_rx,
                    &control_shutdown,
                    drain,
                )
            })
            .map_err(|e| e.to_string())?;
        let dest_config = config.dest_config();
        let dest_security = config.session_security();
        let dest_qmp = config.dest.qmp.clone();
        let dest_app_config = config.clone();
        let dest_shutdown = shutdown.clone();
        let dest_cancel = DestCancel::default();
        let dest_cancelled = dest_cancel.clone();
        let dest = std::thread::Builder::new()
            .name("dwcp-dest".into())
            .spawn(move || {
                DestThread {
                    config: dest_config,
                    app_config: &dest_app_config,
                    security: &dest_security,
                    vm_qmp: dest_qmp,
                    shutdown: &dest_shutdown,
                    cancel: &dest_cancelled,
                    events: &incoming_tx,
                }
                .run(listener)
            })
            .map_err(|e| e.to_string())?;
        let mut daemon = Daemon {
            calls: calls_tx.clone(),
            shutdown,
            control: Some(control),
            dest: Some(dest),
            dest_cancel,
            drain,
            socket: config.control.socket.clone(),
            metrics_addr: None,
            server: None,
            metrics: None,
            listen_addr,
        };
        // A component that fails to start stops those started before it: no thread
        // runs on and no socket file stays behind.
        match crate::server::Server::start(
            &config.control.socket,
            config.control.max_clients,
            calls_tx.clone(),
            server_counters,
        ) {
            Ok(server) => daemon.server = Some(server),
            Err(e) => {
                daemon.stop();
                return Err(e);
            }
        }
        if let Some(addr) = &config.control.metrics_addr {
            match crate::metrics::HttpServer::start(addr, calls_tx) {
                Ok(m) => {
                    daemon.metrics_addr = Some(m.addr);
                    daemon.metrics = Some(m);
                }
                Err(e) => {
                    daemon.stop();
                    return Err(e);
                }
            }
        }
        Ok(daemon)
    }

    /// Whether a shutdown was asked for (by `shutdown` or [`Daemon::request_shutdown`]).
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Ask for a graceful stop (SIGTERM does this).
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
    }

    /// A request to the control thread from inside the process.
    pub fn call(&self, command: Command) -> Response {
        call(&self.calls, Request::new(command), Duration::from_secs(10))
    }

    /// Stop in reverse order: metrics, socket, then the control thread drains
    /// outgoing migrations, then the destination listener drains an incoming one. Each
    /// drain gets `drain_seconds` from now, then cancels (a cancelled source resumes its
    /// guest intact), so the whole stop is bounded by about that long.
    pub fn stop(mut self) {
        let deadline = Instant::now() + self.drain;
        self.request_shutdown();
        if let Some(m) = self.metrics.take() {
            m.stop();
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
        if let Some(d) = self.dest.take() {
            while !d.is_finished() && Instant::now() < deadline {
                self.dest_cancel.cancel_waiting();
                std::thread::sleep(Duration::from_millis(20));
            }
            self.dest_cancel.cancel_all();
            let _ = d.join();
        }
    }
}

fn control_loop(
    state: &mut ControlState,
    calls: Receiver<Call>,
    reports: Receiver<LiveReport>,
    done: Receiver<(u64, Result<MigrationReport, String>)>,
    incoming: Receiver<IncomingEvent>,
    shutdown: &AtomicBool,
    drain: Duration,
) {
    let ticker = tick(Duration::from_millis(100));
    let mut drain_deadline: Option<Instant> = None;
    let joins_done = state.joins_done.1.clone();
    loop {
        // Fetched again each time round: a cluster founded or joined at run time has
        // its member, and its channels, only from then on.
        let (cluster_in, cluster_snapshots, join_requests) = match &state.cluster {
            Some(member) => (
                member.inbound(),
                member.snapshot_reports(),
                member.join_requests(),
            ),
            None => (never(), never(), never()),
        };
        select! {
            recv(calls) -> c => if let Ok((request, reply)) = c {
                state.call(request, reply);
            },
            recv(cluster_in) -> m => if let (Ok(m), Some(member)) = (m, state.cluster.as_mut()) {
                member.receive(m);
            },
            recv(cluster_snapshots) -> r => if let (Ok((to, delivered)), Some(member)) = (r, state.cluster.as_mut()) {
                member.snapshot_sent(to, delivered);
            },
            recv(join_requests) -> r => if let (Ok(request), Some(member)) = (r, state.cluster.as_mut()) {
                member.join_request(request);
            },
            recv(joins_done) -> d => if let Ok(done) = d { state.joined(done) },
            recv(reports) -> r => if let Ok(r) = r { state.take_report(r) },
            recv(done) -> d => if let Ok((id, result)) = d { state.finish(id, result) },
            recv(incoming) -> e => if let Ok(e) = e {
                let mode = state.mode_name();
                state.incoming.on_event(e, &mut state.next_id, &mode);
            },
            recv(ticker) -> _ => {
                state.incoming.refresh(&mut state.next_id);
                if let Some(member) = state.cluster.as_mut() {
                    member.tick();
                } else {
                    match state.flags.reload_if_changed() {
                        Ok(true) => state.apply_safe_mode(),
                        Ok(false) => {}
                        Err(e) => eprintln!("dwcpd: flags file: {e} (flags unchanged)"),
                    }
                }
            },
        }
        state.pump_cluster();
        if shutdown.load(Ordering::Acquire) {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + drain);
            let running = state.running_ids();
            if running.is_empty() {
                if let Some(member) = state.cluster.take() {
                    member.stop();
                }
                return;
            }
            if Instant::now() >= deadline {
                for id in running {
                    let m = &state.migrations[&id];
                    if m.live.cancelled().is_none() {
                        m.live.cancel("the daemon is shutting down");
                    }
                }
            }
        }
    }
}
