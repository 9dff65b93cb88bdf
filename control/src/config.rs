//! `dwcpd` configuration: a TOML file, overridden by command-line flags, validated as a
//! whole. Every invalid or contradictory field is reported by name with what is allowed,
//! all at once, and nothing starts until the whole configuration is valid.

use crate::codec_policy::{ModelPolicy, PolicyConfig};
use dwcp_dataplane::codec::CodecSettings;
use dwcp_dataplane::codec::policy::{CodecConfig, CodecMode};
use dwcp_dataplane::dirty::DirtyLogKind;
use dwcp_dataplane::engine::{DestConfig, SourceConfig, VerifyMode};
use dwcp_dataplane::guest::{AccessPattern, ContentMix, GuestWorkload};
use dwcp_dataplane::security::{Identity, SecurityFiles};
use dwcp_dataplane::transport::socket::{Congestion, SocketOptions};
use dwcp_dataplane::transport::{IdleStrategy, TransportChoice, TransportConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A size with an optional binary suffix: `4096`, `64K`, `512M`, `1G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "String")]
pub struct Size(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Number(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for Size {
    type Error = String;

    fn try_from(value: SizeRepr) -> Result<Self, Self::Error> {
        match value {
            SizeRepr::Number(n) => Ok(Size(n)),
            SizeRepr::Text(t) => t.parse(),
        }
    }
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        dwcp_api::parse_size(s).map(Size)
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if n >= 1 << shift && n.is_multiple_of(1 << shift) {
                return write!(f, "{}{suffix}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

/// `[migration]`: how the source runs pre-copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSection {
    /// Data streams (1..=256).
    pub streams: u16,
    /// Switch over when the estimated downtime is below this, milliseconds.
    pub downtime_limit_ms: u64,
    /// Abort after this many rounds.
    pub max_rounds: u32,
    /// Abort after this many seconds.
    pub max_seconds: u64,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: bool,
    /// `uffd-wp`, `rescan` or `explicit`.
    pub dirty_log: String,
    /// How the switchover is verified: `table` (the CRC table digests), `audit` (and
    /// the source's memory against its table after the switchover) or `full` (all of
    /// memory on both sides, inside the downtime).
    pub verify: String,
    /// A data stream with bytes outstanding and no progress for this long, in
    /// milliseconds, is given up and its pages go to the other streams (0: three times
    /// its smoothed round trip plus one second).
    pub stream_stall_ms: u64,
    /// How long a session survives the loss of its path, in seconds: its connections
    /// outlive an outage this long (`TCP_USER_TIMEOUT` on each; the streams wait for
    /// the path meanwhile), and when they die all the same the source reconnects for
    /// this long and the destination keeps the session's memory for it to resume.
    pub resume_grace_s: u64,
    /// A daemon that finds an interrupted migration at its start (`[control]
    /// state_dir`) resumes it at once, instead of listing it for `dwcpctl resume`.
    pub auto_resume: bool,
}

impl Default for MigrationSection {
    fn default() -> Self {
        MigrationSection {
            streams: 4,
            downtime_limit_ms: 50,
            max_rounds: 30,
            max_seconds: 600,
            auto_converge: true,
            dirty_log: "uffd-wp".into(),
            verify: "table".into(),
            stream_stall_ms: 0,
            resume_grace_s: 60,
            auto_resume: false,
        }
    }
}

/// `[transport]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSection {
    /// `auto`, `io_uring` or `plain`.
    pub kind: String,
    /// Use `SEND_ZC`.
    pub zero_copy: bool,
    /// Sends below this size are not zero-copy.
    pub zero_copy_threshold: Size,
    /// Bytes per send buffer.
    pub send_buffer: Size,
    /// TCP send/receive buffer.
    pub socket_buffer: Size,
    /// `cubic` or `bbr`.
    pub congestion: String,
    /// Send rate cap per stream, bytes per second (0 = none).
    pub pacing_rate: Size,
    /// Unsent bytes a stream may hold in the kernel (`TCP_NOTSENT_LOWAT`; 0 = no bound).
    pub notsent_lowat: Size,
    /// io_uring worker threads (0 = one per CPU).
    pub workers: usize,
    /// Pin workers to CPUs.
    pub pin_workers: bool,
    /// Empty polls before an idle worker sleeps.
    pub idle_spin: u32,
    /// Longest sleep of an idle worker, microseconds.
    pub idle_park_us: u64,
}

impl Default for TransportSection {
    fn default() -> Self {
        let t = TransportConfig::default();
        TransportSection {
            kind: "auto".into(),
            zero_copy: t.zero_copy,
            zero_copy_threshold: Size(t.zero_copy_threshold as u64),
            send_buffer: Size(t.send_buffer as u64),
            socket_buffer: Size(t.socket.buffer_bytes as u64),
            congestion: "cubic".into(),
            pacing_rate: Size(0),
            notsent_lowat: Size(u64::from(t.socket.notsent_lowat.unwrap_or(0))),
            workers: 0,
            pin_workers: t.pin_workers,
            idle_spin: t.idle.spin,
            idle_park_us: t.idle.park.as_micros() as u64,
        }
    }
}

/// `[guest]`: the guest a source migrates: a simulated one (labs, the demo) or a QEMU
/// VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestSection {
    /// `simulated` or `qemu`.
    pub kind: String,
    /// The QEMU VM's QMP socket (`kind = "qemu"`): its RAM file and size are found
    /// through it.
    pub qmp: Option<PathBuf>,
    /// Simulated guest memory size.
    pub memory: Size,
    /// Back the simulated guest's memory with this file (on /dev/shm or hugetlbfs)
    /// instead of anonymous memory. A file that exists is refused unless
    /// `overwrite_memory_file` says it holds nothing worth keeping.
    pub memory_file: Option<PathBuf>,
    /// Let the simulated guest overwrite an existing `memory_file`.
    pub overwrite_memory_file: bool,
    /// Dirty rate, MB/s (10^6 bytes of pages per second).
    pub dirty_rate_mbps: f64,
    /// Fraction of memory written.
    pub working_set: f64,
    /// `uniform`, `hot-cold` or `sequential`.
    pub pattern: String,
    /// Writer threads.
    pub vcpus: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for GuestSection {
    fn default() -> Self {
        GuestSection {
            kind: "simulated".into(),
            qmp: None,
            memory: Size(1 << 30),
            memory_file: None,
            overwrite_memory_file: false,
            dirty_rate_mbps: 50.0,
            working_set: 0.25,
            pattern: "hot-cold".into(),
            vcpus: 2,
            seed: 0x5EED_D1C9,
        }
    }
}

/// Whether the simulated guest may use `path` as its memory file: a new file, or an
/// existing one only when the operator said it may be overwritten (the simulated guest
/// fills its memory with made-up content: an existing file would be destroyed).
pub fn check_simulated_memory_file(path: &std::path::Path, overwrite: bool) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(meta) if !meta.is_file() => Err(
            "exists and is not a regular file; the simulated guest needs a file of its own".into(),
        ),
        Ok(_) if overwrite => Ok(()),
        Ok(_) => Err(
            "exists: the simulated guest would overwrite its content; set \
             guest.overwrite_memory_file = true if it holds nothing worth keeping"
                .into(),
        ),
    }
}

/// This host's memory (`MemTotal`), bytes, when known.
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `[dest]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestSection {
    /// Address to listen on.
    pub listen: String,
    /// Longest wait for the source, and longest silence mid-session, seconds.
    pub timeout_seconds: u64,
    /// The incoming QEMU VM's QMP socket (started with `-incoming defer`): received
    /// memory goes into its RAM file and the device state into QEMU.
    pub qmp: Option<PathBuf>,
    /// Received memory of a guest without a VM goes into this file (on /dev/shm or
    /// hugetlbfs, created at the guest's size) instead of this process's memory; with
    /// `[control] state_dir`, a restarted destination resumes the session from it.
    pub memory_file: Option<PathBuf>,
    /// Seconds a new connection has to say what it is, and a session to open its data
    /// streams after the welcome (anyone can connect; the silent are closed).
    pub handshake_timeout_seconds: u64,
    /// Largest guest memory allocated for sources, all sessions received at once
    /// together (0: what the host has available).
    pub max_memory: Size,
    /// Sessions received at once into this process's memory (a destination that
    /// receives into `memory_file` or the VM behind `qmp` takes one at a time).
    pub max_sessions: usize,
    /// Let sources write pages by RMA into this destination's memory (plain sessions;
    /// authenticated ones also need `[security] rma_in_clear`).
    pub rma: bool,
}

impl Default for DestSection {
    fn default() -> Self {
        DestSection {
            listen: "0.0.0.0:7410".into(),
            timeout_seconds: 60,
            qmp: None,
            memory_file: None,
            handshake_timeout_seconds: 5,
            max_memory: Size(0),
            max_sessions: 4,
            rma: true,
        }
    }
}

/// `[codec]`: the page codec pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecSection {
    /// `auto` (the codec policy decides from link and CPU measurements), `off`, or a
    /// fixed setting: `zstd:<level>` (dedup, delta and zstd) or `delta` (dedup and
    /// delta only), each optionally followed by `,nodedup`, `,nodelta`, `,nodict`.
    pub mode: String,
    /// Page cache for deltas and dedup, shared out over the streams.
    pub cache: Size,
    /// Bytes of frames per compressed batch at the fast levels (64K..=1M).
    pub batch: Size,
    /// Batch size from level `large_batch_level` up (64K..=1M): slow levels run on
    /// slow links, where larger batches pack tighter and cost nothing in latency.
    pub large_batch: Size,
    /// The first level that uses `large_batch`.
    pub large_batch_level: i32,
    /// Largest delta sent instead of a page (at most 4K).
    pub delta_limit: Size,
    /// Train a dictionary when compressing (the policy uses it where it measures a gain).
    pub dictionary: bool,
    /// Largest dictionary (1K..=1M).
    pub dictionary_size: Size,
    /// zstd levels the policy may choose from.
    pub levels: Vec<i32>,
    /// The policy switches only for a predicted gain above this fraction.
    pub hysteresis: f64,
    /// Append the policy's decisions (one JSON object each) to this file.
    pub decision_log: Option<PathBuf>,
    /// Destination: accept codec frames (off keeps them off this host).
    pub accept: bool,
}

impl Default for CodecSection {
    fn default() -> Self {
        let c = CodecConfig::default();
        CodecSection {
            mode: "auto".into(),
            cache: Size(c.cache_bytes as u64),
            batch: Size(c.batch_bytes as u64),
            large_batch: Size(c.large_batch_bytes as u64),
            large_batch_level: c.large_batch_level,
            delta_limit: Size(c.delta_limit as u64),
            dictionary: c.dictionary,
            dictionary_size: Size(c.dictionary_bytes as u64),
            levels: c.levels,
            hysteresis: PolicyConfig::default().hysteresis,
            decision_log: None,
            accept: true,
        }
    }
}

impl CodecSection {
    /// The mode, parsed.
    pub fn codec_mode(&self) -> Result<CodecMode, String> {
        let base = CodecSettings {
            batch_bytes: self.batch.0 as usize,
            delta_limit: self.delta_limit.0 as usize,
            ..CodecSettings::OFF
        };
        parse_codec_mode(&self.mode, base)
    }
}

/// Parse a codec mode (see [`CodecSection::mode`]) on top of `base` (batch size and
/// delta limit).
pub fn parse_codec_mode(text: &str, base: CodecSettings) -> Result<CodecMode, String> {
    let (head, rest) = text.split_once(',').unwrap_or((text, ""));
    let mut settings = match head.trim() {
        "auto" if rest.is_empty() => return Ok(CodecMode::Auto),
        "off" if rest.is_empty() => return Ok(CodecMode::Off),
        "delta" => CodecSettings {
            dedup: true,
            delta: true,
            ..base
        },
        h if h.starts_with("zstd:") => {
            let level: i32 = h["zstd:".len()..]
                .parse()
                .map_err(|_| format!("{h:?}: the level is not a number"))?;
            let (min, max) = dwcp_dataplane::codec::zstd::level_range();
            if !(min..=max).contains(&level) {
                return Err(format!("zstd level {level} (allowed {min}..={max})"));
            }
            CodecSettings {
                dedup: true,
                delta: true,
                level: Some(level),
                dictionary: true,
                ..base
            }
        }
        other => {
            return Err(format!(
                "{other:?} (expected auto, off, delta or zstd:<level>, options ,nodedup ,nodelta ,nodict)"
            ));
        }
    };
    for option in rest.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        match option {
            "nodedup" => settings.dedup = false,
            "nodelta" => settings.delta = false,
            "nodict" => settings.dictionary = false,
            other => {
                return Err(format!(
                    "unknown codec option {other:?} (nodedup, nodelta, nodict)"
                ));
            }
        }
    }
    Ok(CodecMode::Fixed(settings))
}

/// `[cluster]`: this appliance's place in its site's raft group. No cluster while `id`
/// is 0 (the default): the appliance keeps its flags to itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// This appliance's id in the group (1 and up, unique in the site); 0: no cluster.
    pub id: u64,
    /// Where the other members reach this one for raft (`host:port`).
    pub listen: Option<String>,
    /// The raft log and its snapshots (`state_dir/cluster` when unset).
    pub dir: Option<PathBuf>,
    /// The founding members, id → `host:port`, this one among them; every founding
    /// member is given the same list. With `join`, the members it joins (and itself).
    pub members: BTreeMap<String, String>,
    /// This appliance joins a running cluster (`dwcpctl cluster join ID ADDR` on its
    /// leader) instead of founding one: it starts with no say and learns the cluster
    /// from the leader.
    pub join: bool,
}

/// A checked `[cluster]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterPlan {
    /// This appliance's id.
    pub id: u64,
    /// Where raft messages reach it.
    pub listen: std::net::SocketAddr,
    /// The founding members and their raft addresses.
    pub members: BTreeMap<u64, std::net::SocketAddr>,
    /// The raft log's directory.
    pub dir: PathBuf,
    /// It joins a running cluster rather than founding one.
    pub join: bool,
}

/// `[control]`: the daemon's slow path and its operator interfaces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// The control socket.
    pub socket: PathBuf,
    /// Serve Prometheus metrics over HTTP here (`host:port`), when set.
    pub metrics_addr: Option<String>,
    /// Feature flags persist here (in memory only when unset).
    pub flags_file: Option<PathBuf>,
    /// Where the appliance keeps what must survive its restart: the record of a session
    /// received into a memory file (`[dest] memory_file`), so that a restarted
    /// destination resumes it (unset: nothing is kept).
    pub state_dir: Option<PathBuf>,
    /// `auto` (detected) or a fixed mode: `datacenter`, `internet`, `hybrid`.
    pub mode: String,
    /// Seconds running migrations get to finish at shutdown before they are cancelled.
    pub drain_seconds: u64,
    /// Control socket clients served at once (1..=4096).
    pub max_clients: usize,
    /// The learned link-rate predictor's directory (`models/link`: its ONNX model and
    /// model card), checked at start; its forecasts show in `status` and `migrations`.
    /// Unset, or refused at start (the reason is printed and shown): the EWMA
    /// forecasts. Off by default: it does not beat the EWMA on held-out paths at every
    /// horizon (`models/README.md`).
    pub link_model: Option<PathBuf>,
    /// The learned path anomaly detector's directory (`models/anomaly`), checked at
    /// start. Unset, or refused at start: a rolling z-score flags paths going bad. Off
    /// by default: it does not beat the z-score on held-out paths.
    pub anomaly_model: Option<PathBuf>,
    /// Keep what the control thread saw of each outgoing migration's path here, as CSV
    /// (`migration-ID.csv`, the recorder's rows: `control/src/linkrec.rs`; each data
    /// stream's part of them in `migration-ID-streams.csv`), when it ends: recordings
    /// of an appliance's own paths to judge or retrain the models on.
    pub record_links: Option<PathBuf>,
    /// Give up a data stream the anomaly detector flags (on its own and against the
    /// migration's other streams) and carry it on a new connection, as a lost one is.
    /// Off by default: the per-stream thresholds are set, not learned from labelled
    /// recordings.
    pub replace_flagged_streams: bool,
    /// Tell each migration's pre-copy planner what its path will carry over the next
    /// second (the link model's forecast when one is loaded, else the EWMA's, made
    /// from the spans where the migration had pages waiting), so the downtime estimate
    /// never prices the final round faster than the path, and the codec policy takes
    /// its link share from it while the workers wait on the link. Off by default: on migrations
    /// across the held-out traces neither the model's forecast nor the EWMA's missed
    /// the limit or the estimate less often than the rounds alone
    /// (`ml/downtime-misses-vs-ewma`, `ml/codec-time-vs-ewma`, `models/README.md`).
    pub forecast_path_rate: bool,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            socket: PathBuf::from(dwcp_api::DEFAULT_SOCKET),
            metrics_addr: None,
            flags_file: None,
            state_dir: None,
            mode: "auto".into(),
            drain_seconds: 10,
            max_clients: 512,
            link_model: None,
            anomaly_model: None,
            record_links: None,
            replace_flagged_streams: false,
            forecast_path_rate: false,
        }
    }
}

/// `[security]`: this appliance's identity. Sessions are TLS 1.3 with mutual
/// authentication and sealed data streams; without certificates the appliance refuses
/// to run unless `insecure` (or `--insecure`) says to run plain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    /// This appliance's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The site's CA certificate(s) (PEM).
    pub ca: Option<PathBuf>,
    /// Accept only peers whose certificate is valid for one of these names (empty:
    /// any appliance of the site's CA).
    pub peers: Vec<String>,
    /// Run without authentication or encryption (labs on a trusted network).
    pub insecure: bool,
    /// Let authenticated sessions write pages by RMA into this destination (`transport
    /// = "rma"` at the source): page bytes then cross the fabric unencrypted, beside
    /// the sealed streams. Only for a fabric the site trusts.
    pub rma_in_clear: bool,
}

/// How sessions are secured, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSecurityConfig {
    /// Authenticated and encrypted with these files.
    Certificates(SecurityFiles),
    /// Plain, as asked (`insecure`).
    Insecure,
    /// Nothing configured: refused.
    Missing,
}

impl SessionSecurityConfig {
    /// The identity, loaded from its files now: `None` when insecure; an error when
    /// nothing is configured or the files do not load.
    pub fn identity(&self) -> Result<Option<Arc<Identity>>, String> {
        match self {
            SessionSecurityConfig::Insecure => Ok(None),
            SessionSecurityConfig::Missing => Err(NO_CERTIFICATES.into()),
            SessionSecurityConfig::Certificates(files) => Identity::load(files)
                .map(Some)
                .map_err(|e| format!("[security]: {e}")),
        }
    }
}

/// Why an appliance without certificates does not start.
pub const NO_CERTIFICATES: &str = "no certificates configured: sessions between appliances are \
    authenticated and encrypted (TLS 1.3), so set [security] cert, key and ca (`dwcpd certs \
    init DIR` makes a lab set), or pass --insecure to run unauthenticated and unencrypted";

fn dns_name_or_address(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok { Ok(()) } else { Err(name.into()) }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[migration]`
    pub migration: MigrationSection,
    /// `[transport]`
    pub transport: TransportSection,
    /// `[guest]`
    pub guest: GuestSection,
    /// `[dest]`
    pub dest: DestSection,
    /// `[codec]`
    pub codec: CodecSection,
    /// `[control]`
    pub control: ControlSection,
    /// `[security]`
    pub security: SecuritySection,
    /// `[cluster]`
    pub cluster: ClusterSection,
}

/// Section `name` of the file, key by key: each key is deserialized alone first, so
/// that every bad one is named (`migration.streams: invalid type: string "four",
/// expected u16`), then the good ones together.
fn section<T: serde::de::DeserializeOwned + Default>(
    name: &str,
    value: Option<toml::Value>,
    errors: &mut Vec<String>,
) -> T {
    let Some(value) = value else {
        return T::default();
    };
    let toml::Value::Table(table) = value else {
        errors.push(format!(
            "[{name}] must be a table of settings, not a {}",
            value.type_str()
        ));
        return T::default();
    };
    let mut good = toml::Table::new();
    for (key, v) in table {
        let mut alone = toml::Table::new();
        alone.insert(key.clone(), v.clone());
        match T::deserialize(toml::Value::Table(alone)) {
            Ok(_) => {
                good.insert(key, v);
            }
            Err(e) => errors.push(format!("{name}.{key}: {}", e.to_string().trim())),
        }
    }
    T::deserialize(toml::Value::Table(good)).unwrap_or_else(|e| {
        errors.push(format!("[{name}]: {}", e.to_string().trim()));
        T::default()
    })
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Read a TOML file. Unknown keys and wrong types are errors, reported all at once
    /// and together with what [`Config::validate`] finds in the rest of the file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        let (config, mut errors) = Self::parse_all(&text);
        if errors.is_empty() {
            return Ok(config);
        }
        if let Err(more) = config.validate() {
            errors.extend(more.0);
        }
        let file = path.display();
        Err(ConfigErrors(
            errors.into_iter().map(|e| format!("{file}: {e}")).collect(),
        ))
    }

    /// Parse TOML text (every unknown key and wrong type reported).
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let (config, errors) = Self::parse_all(text);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Parse TOML text key by key: a key of the wrong type or an unknown one is
    /// reported and left at its default, so that one bad key hides no other.
    pub fn parse_all(text: &str) -> (Config, Vec<String>) {
        let mut errors = Vec::new();
        let mut top: toml::Table = match text.parse() {
            Ok(t) => t,
            // A syntax error leaves nothing to read further.
            Err(e) => return (Config::default(), vec![e.to_string()]),
        };
        // Zero-copy is on by default and quietly unused by plain sockets; asked for
        // explicitly with them, it is a contradiction.
        let explicit_zero_copy = top
            .get("transport")
            .and_then(|t| t.get("zero_copy"))
            .and_then(toml::Value::as_bool)
            == Some(true);
        let mut take = |name: &str| top.remove(name);
        let config = Config {
            migration: section("migration", take("migration"), &mut errors),
            transport: section("transport", take("transport"), &mut errors),
            guest: section("guest", take("guest"), &mut errors),
            dest: section("dest", take("dest"), &mut errors),
            codec: section("codec", take("codec"), &mut errors),
            control: section("control", take("control"), &mut errors),
            security: section("security", take("security"), &mut errors),
            cluster: section("cluster", take("cluster"), &mut errors),
        };
        for (name, _) in top {
            errors.push(format!(
                "unknown section or key {name:?} at the top (sections: [migration], \
                 [transport], [guest], [dest], [codec], [control], [security], [cluster])"
            ));
        }
        if explicit_zero_copy && config.transport.kind == "plain" {
            errors.push(
                "transport.kind = \"plain\" with transport.zero_copy = true: zero-copy sends \
                 need io_uring (drop zero_copy, or set kind = \"auto\" or \"io_uring\")"
                    .into(),
            );
        }
        (config, errors)
    }

    /// Check every field; report all problems at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let check = |errors: &mut Vec<String>, ok: bool, msg: String| {
            if !ok {
                errors.push(msg);
            }
        };
        check(
            &mut errors,
            self.dest.qmp.is_none() || self.dest.memory_file.is_none(),
            "dest.qmp and dest.memory_file both set: received memory goes into the incoming \
             VM's RAM file, or into memory_file for a guest without a VM"
                .into(),
        );
        let m = &self.migration;
        check(
            &mut errors,
            (1..=dwcp_dataplane::wire::MAX_STREAMS).contains(&m.streams),
            format!("migration.streams = {} (allowed 1..=256)", m.streams),
        );
        check(
            &mut errors,
            (1..=60_000).contains(&m.downtime_limit_ms),
            format!(
                "migration.downtime_limit_ms = {} (allowed 1..=60000)",
                m.downtime_limit_ms
            ),
        );
        check(
            &mut errors,
            (1..=10_000).contains(&m.max_rounds),
            format!(
                "migration.max_rounds = {} (allowed 1..=10000)",
                m.max_rounds
            ),
        );
        check(
            &mut errors,
            (1..=86_400).contains(&m.max_seconds),
            format!(
                "migration.max_seconds = {} (allowed 1..=86400)",
                m.max_seconds
            ),
        );
        if let Err(e) = m.dirty_log.parse::<DirtyLogKind>() {
            errors.push(format!("migration.dirty_log: {e}"));
        }
        if let Err(e) = m.verify.parse::<VerifyMode>() {
            errors.push(format!("migration.verify: {e}"));
        }
        let t = &self.transport;
        if let Err(e) = t.kind.parse::<TransportChoice>() {
            errors.push(format!("transport.kind: {e}"));
        }
        if let Err(e) = t.congestion.parse::<Congestion>() {
            errors.push(format!("transport.congestion: {e}"));
        }
        check(
            &mut errors,
            (64 << 10..=64 << 20).contains(&t.send_buffer.0),
            format!(
                "transport.send_buffer = {} (allowed 64K..=64M)",
                t.send_buffer
            ),
        );
        check(
            &mut errors,
            (64 << 10..=1 << 30).contains(&t.socket_buffer.0),
            format!(
                "transport.socket_buffer = {} (allowed 64K..=1G)",
                t.socket_buffer
            ),
        );
        check(
            &mut errors,
            t.zero_copy_threshold.0 <= t.send_buffer.0,
            format!(
                "transport.zero_copy_threshold = {} is larger than transport.send_buffer = {}: zero-copy would never be used",
                t.zero_copy_threshold, t.send_buffer
            ),
        );
        check(
            &mut errors,
            t.workers <= 1024,
            format!("transport.workers = {} (allowed 0..=1024)", t.workers),
        );
        check(
            &mut errors,
            t.idle_park_us <= 1_000_000,
            format!(
                "transport.idle_park_us = {} (allowed 0..=1000000)",
                t.idle_park_us
            ),
        );
        let g = &self.guest;
        check(
            &mut errors,
            g.memory.0 >= 1 << 20 && g.memory.0.is_multiple_of(4096),
            format!(
                "guest.memory = {} (at least 1M, a multiple of 4K)",
                g.memory
            ),
        );
        check(
            &mut errors,
            g.dirty_rate_mbps.is_finite() && g.dirty_rate_mbps >= 0.0,
            format!("guest.dirty_rate_mbps = {} (a rate ≥ 0)", g.dirty_rate_mbps),
        );
        check(
            &mut errors,
            g.working_set > 0.0 && g.working_set <= 1.0,
            format!("guest.working_set = {} (allowed (0, 1])", g.working_set),
        );
        check(
            &mut errors,
            matches!(g.pattern.as_str(), "uniform" | "hot-cold" | "sequential"),
            format!(
                "guest.pattern = {:?} (expected uniform, hot-cold or sequential)",
                g.pattern
            ),
        );
        check(
            &mut errors,
            (1..=256).contains(&g.vcpus),
            format!("guest.vcpus = {} (allowed 1..=256)", g.vcpus),
        );
        match (g.kind.as_str(), &g.qmp) {
            ("simulated", None) | ("qemu", Some(_)) => {}
            ("simulated", Some(q)) => errors.push(format!(
                "guest.qmp = {} needs guest.kind = \"qemu\"",
                q.display()
            )),
            ("qemu", None) => errors
                .push("guest.kind = \"qemu\" needs guest.qmp, the VM's QMP socket".to_string()),
            (other, _) => errors.push(format!(
                "guest.kind = {other:?} (expected simulated or qemu)"
            )),
        }
        if let Some(f) = &g.memory_file
            && g.kind == "simulated"
            && let Err(e) = check_simulated_memory_file(f, g.overwrite_memory_file)
        {
            errors.push(format!("guest.memory_file = {}: {e}", f.display()));
        }
        if let Some(f) = &g.memory_file
            && f.parent()
                .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            errors.push(format!(
                "guest.memory_file = {}: its directory does not exist",
                f.display()
            ));
        }
        let c = &self.codec;
        if let Err(e) = c.codec_mode() {
            errors.push(format!("codec.mode: {e}"));
        }
        check(
            &mut errors,
            c.cache.0 <= 1 << 40,
            format!("codec.cache = {} (allowed 0..=1T)", c.cache),
        );
        check(
            &mut errors,
            (64 << 10..=1 << 20).contains(&c.batch.0),
            format!("codec.batch = {} (allowed 64K..=1M)", c.batch),
        );
        check(
            &mut errors,
            (64 << 10..=1 << 20).contains(&c.large_batch.0),
            format!("codec.large_batch = {} (allowed 64K..=1M)", c.large_batch),
        );
        check(
            &mut errors,
            (1..=4096).contains(&c.delta_limit.0),
            format!("codec.delta_limit = {} (allowed 1..=4K)", c.delta_limit),
        );
        check(
            &mut errors,
            (1 << 10..=1 << 20).contains(&c.dictionary_size.0),
            format!(
                "codec.dictionary_size = {} (allowed 1K..=1M)",
                c.dictionary_size
            ),
        );
        let (min, max) = dwcp_dataplane::codec::zstd::level_range();
        check(
            &mut errors,
            !c.levels.is_empty() && c.levels.iter().all(|l| (min..=max).contains(l)),
            format!(
                "codec.levels = {:?} (at least one, each in {min}..={max})",
                c.levels
            ),
        );
        check(
            &mut errors,
            (0.0..1.0).contains(&c.hysteresis),
            format!("codec.hysteresis = {} (allowed [0, 1))", c.hysteresis),
        );
        if let Some(f) = &c.decision_log
            && f.parent()
                .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            errors.push(format!(
                "codec.decision_log = {}: its directory does not exist",
                f.display()
            ));
        }
        if self.dest.listen.parse::<std::net::SocketAddr>().is_err() {
            errors.push(format!(
                "dest.listen = {:?} (expected an address such as 0.0.0.0:7410)",
                self.dest.listen
            ));
        }
        let sec = &self.security;
        let given = [("cert", &sec.cert), ("key", &sec.key), ("ca", &sec.ca)];
        let set: Vec<&str> = given
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| *k)
            .collect();
        if !set.is_empty() && set.len() < 3 {
            let missing: Vec<&str> = given
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| *k)
                .collect();
            errors.push(format!(
                "[security] has {} but not {}: an appliance needs its certificate, its key \
                 and the site's CA",
                set.join(" and "),
                missing.join(" and ")
            ));
        }
        for (key, path) in given {
            if let Some(p) = path
                && !p.is_file()
            {
                errors.push(format!(
                    "security.{key} = {:?}: no such file",
                    p.display().to_string()
                ));
            }
        }
        for name in &sec.peers {
            if dns_name_or_address(name).is_err() {
                errors.push(format!(
                    "security.peers: {name:?} is not a DNS name or an IP address"
                ));
            }
        }
        check(
            &mut errors,
            (1..=64).contains(&self.dest.max_sessions),
            format!(
                "dest.max_sessions = {} (allowed 1..=64)",
                self.dest.max_sessions
            ),
        );
        check(
            &mut errors,
            (1..=600).contains(&self.dest.handshake_timeout_seconds),
            format!(
                "dest.handshake_timeout_seconds = {} (allowed 1..=600)",
                self.dest.handshake_timeout_seconds
            ),
        );
        check(
            &mut errors,
            (1..=3600).contains(&self.dest.timeout_seconds),
            format!(
                "dest.timeout_seconds = {} (allowed 1..=3600)",
                self.dest.timeout_seconds
            ),
        );
        let c = &self.control;
        check(
            &mut errors,
            c.mode == "auto" || c.mode.parse::<crate::mode::Mode>().is_ok(),
            format!(
                "control.mode = {:?} (allowed auto, datacenter, internet, hybrid)",
                c.mode
            ),
        );
        check(
            &mut errors,
            (1..=3600).contains(&c.drain_seconds),
            format!(
                "control.drain_seconds = {} (allowed 1..=3600)",
                c.drain_seconds
            ),
        );
        check(
            &mut errors,
            (1..=4096).contains(&c.max_clients),
            format!("control.max_clients = {} (allowed 1..=4096)", c.max_clients),
        );
        check(
            &mut errors,
            c.socket.is_absolute(),
            format!("control.socket = {:?} (an absolute path)", c.socket),
        );
        if let Some(a) = &c.metrics_addr {
            check(
                &mut errors,
                a.parse::<std::net::SocketAddr>().is_ok(),
                format!("control.metrics_addr = {a:?} (an address like 127.0.0.1:9410)"),
            );
            if let (Ok(m), Ok(l)) = (
                a.parse::<std::net::SocketAddr>(),
                self.dest.listen.parse::<std::net::SocketAddr>(),
            ) && m.port() == l.port()
                && m.port() != 0
                && (m.ip() == l.ip() || m.ip().is_unspecified() || l.ip().is_unspecified())
            {
                errors.push(format!(
                    "control.metrics_addr = {a:?} and dest.listen = {:?} are one port: \
                     metrics and incoming migrations need a port each",
                    self.dest.listen
                ));
            }
        }
        if g.kind == "simulated"
            && let Some(total) = host_memory_bytes()
            && g.memory.0 > total
        {
            errors.push(format!(
                "guest.memory = {} is more than this host's memory ({}): the simulated guest \
                 could never be filled",
                g.memory,
                Size(total)
            ));
        }
        if let Err(e) = self.cluster_plan() {
            errors.push(e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The cluster this appliance is a member of, from `[cluster]`: `None` when `id` is
    /// 0; an error naming the key when the section does not describe one.
    pub fn cluster_plan(&self) -> Result<Option<ClusterPlan>, String> {
        let c = &self.cluster;
        if c.id == 0 {
            if c.listen.is_some() || !c.members.is_empty() {
                return Err(
                    "[cluster] has members or listen but no id: give this appliance its id \
                     (1 and up, unique in the site)"
                        .into(),
                );
            }
            return Ok(None);
        }
        let listen = c
            .listen
            .as_deref()
            .ok_or("cluster.listen is missing: the address the other members reach this one at")?;
        let listen: std::net::SocketAddr = listen
            .parse()
            .map_err(|_| format!("cluster.listen = {listen:?} (an address like 10.0.0.1:7401)"))?;
        let mut members = BTreeMap::new();
        for (id, address) in &c.members {
            let id: u64 =
                id.parse().ok().filter(|&id| id > 0).ok_or_else(|| {
                    format!("cluster.members: {id:?} is not a member id (1 and up)")
                })?;
            let address: std::net::SocketAddr = address.parse().map_err(|_| {
                format!("cluster.members.{id} = {address:?} (an address like 10.0.0.2:7401)")
            })?;
            members.insert(id, address);
        }
        if members.is_empty() && c.join {
            return Err(
                "cluster.join = true needs the members it joins in cluster.members; or leave \
                 both out and run `dwcpctl cluster join ADDR`"
                    .into(),
            );
        }
        // No members: the cluster is founded at run time (`dwcpctl cluster init` or
        // `cluster join ADDR`), or was, and its log says who the members are.
        if !members.is_empty() && !c.join && !members.contains_key(&c.id) {
            return Err(format!(
                "cluster.members does not hold this appliance's id {}: list every founding \
                 member, this one too, the same on each",
                c.id
            ));
        }
        let dir = match (&c.dir, &self.control.state_dir) {
            (Some(dir), _) => dir.clone(),
            (None, Some(state)) => state.join("cluster"),
            (None, None) => {
                return Err(
                    "[cluster] needs a directory for its raft log: set cluster.dir or \
                     control.state_dir"
                        .into(),
                );
            }
        };
        Ok(Some(ClusterPlan {
            id: c.id,
            listen,
            members,
            dir,
            join: c.join,
        }))
    }

    /// Transport settings (the configuration must be valid).
    pub fn transport_config(&self) -> TransportConfig {
        let t = &self.transport;
        TransportConfig {
            choice: t.kind.parse().unwrap_or(TransportChoice::Auto),
            zero_copy: t.zero_copy,
            zero_copy_threshold: t.zero_copy_threshold.0 as usize,
            send_buffer: t.send_buffer.0 as usize,
            socket: SocketOptions {
                buffer_bytes: t.socket_buffer.0 as usize,
                congestion: t.congestion.parse().unwrap_or(Congestion::Cubic),
                pacing_rate: (t.pacing_rate.0 > 0).then_some(t.pacing_rate.0),
                notsent_lowat: (t.notsent_lowat.0 > 0)
                    .then_some(t.notsent_lowat.0.min(u64::from(u32::MAX)) as u32),
                user_timeout: Some(Duration::from_secs(self.migration.resume_grace_s.max(1))),
                ..SocketOptions::default()
            },
            pin_workers: t.pin_workers,
            idle: IdleStrategy {
                spin: t.idle_spin,
                park: Duration::from_micros(t.idle_park_us),
            },
            ..TransportConfig::default()
        }
    }

    /// Source settings.
    pub fn source_config(&self) -> SourceConfig {
        let m = &self.migration;
        SourceConfig {
            streams: m.streams,
            workers: self.transport.workers,
            transport: self.transport_config(),
            downtime_limit: Duration::from_millis(m.downtime_limit_ms),
            max_rounds: m.max_rounds,
            max_duration: Duration::from_secs(m.max_seconds),
            auto_converge: m.auto_converge,
            verify: m.verify.parse().unwrap_or_default(),
            codec: self.codec_config(),
            stream_stall: (m.stream_stall_ms > 0).then(|| Duration::from_millis(m.stream_stall_ms)),
            resume_grace: Duration::from_secs(m.resume_grace_s),
            session_record: self.outgoing_session_record(),
            record_guest: self.guest.qmp.as_ref().map(|q| q.display().to_string()),
            ..SourceConfig::default()
        }
    }

    /// Codec settings of the source (the configuration must be valid).
    pub fn codec_config(&self) -> CodecConfig {
        let c = &self.codec;
        let mut levels = c.levels.clone();
        levels.sort_unstable();
        levels.dedup();
        CodecConfig {
            mode: c.codec_mode().unwrap_or(CodecMode::Off),
            cache_bytes: c.cache.0 as usize,
            batch_bytes: c.batch.0 as usize,
            large_batch_bytes: c.large_batch.0 as usize,
            large_batch_level: c.large_batch_level,
            delta_limit: c.delta_limit.0 as usize,
            dictionary: c.dictionary,
            dictionary_bytes: c.dictionary_size.0 as usize,
            levels,
            ..CodecConfig::default()
        }
    }

    /// The codec policy for automatic mode.
    pub fn codec_policy(&self) -> ModelPolicy {
        let codec = self.codec_config();
        ModelPolicy::new(PolicyConfig {
            levels: codec.levels,
            hysteresis: self.codec.hysteresis,
            dictionary: codec.dictionary,
            base: CodecSettings {
                batch_bytes: codec.batch_bytes,
                delta_limit: codec.delta_limit,
                ..PolicyConfig::default().base
            },
            large_batch_bytes: codec.large_batch_bytes,
            large_batch_level: codec.large_batch_level,
            ..PolicyConfig::default()
        })
    }

    /// How sessions are secured.
    pub fn session_security(&self) -> SessionSecurityConfig {
        let s = &self.security;
        if s.insecure {
            return SessionSecurityConfig::Insecure;
        }
        match (&s.cert, &s.key, &s.ca) {
            (Some(cert), Some(key), Some(ca)) => {
                SessionSecurityConfig::Certificates(SecurityFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                    peers: s.peers.clone(),
                })
            }
            _ => SessionSecurityConfig::Missing,
        }
    }

    /// This appliance's identity, loaded from its files now (each session loads it
    /// anew, so replaced certificates apply to new sessions without a restart):
    /// `None` when running insecure; an error when nothing is configured or the files
    /// do not load.
    pub fn identity(&self) -> Result<Option<Arc<Identity>>, String> {
        self.session_security().identity()
    }

    /// Destination settings.
    pub fn dest_config(&self) -> DestConfig {
        use dwcp_dataplane::wire::caps;
        DestConfig {
            transport: self.transport_config(),
            workers: self.transport.workers,
            timeout: Duration::from_secs(self.dest.timeout_seconds),
            handshake_timeout: Duration::from_secs(self.dest.handshake_timeout_seconds),
            max_memory: (self.dest.max_memory.0 > 0).then_some(self.dest.max_memory.0),
            capabilities: if self.codec.accept {
                caps::ALL
            } else {
                caps::ZERO_PAGES | caps::PAGE_RUNS | caps::STREAM_LOSS | caps::RESUME
            },
            // Loaded per session by whoever runs it (see `identity`).
            security: None,
            resume_grace: Duration::from_secs(self.migration.resume_grace_s),
            session_record: self.incoming_session_record(),
            record_guest: self.dest.qmp.as_ref().map(|q| q.display().to_string()),
            rma: self.rma_admission(),
        }
    }

    /// Which sessions may write pages by RMA into this destination.
    pub fn rma_admission(&self) -> dwcp_dataplane::engine::RmaAdmission {
        use dwcp_dataplane::engine::RmaAdmission;
        match (self.dest.rma, self.security.rma_in_clear) {
            (false, _) => RmaAdmission::Never,
            (true, false) => RmaAdmission::PlainSessions,
            (true, true) => RmaAdmission::Always,
        }
    }

    /// Where the record of an outgoing session is kept, when `[control] state_dir` is
    /// set and the guest's memory outlives this process: a QEMU VM's, or the simulated
    /// guest's `[guest] memory_file`.
    pub fn outgoing_session_record(&self) -> Option<PathBuf> {
        let memory_outlives_us = self.guest.qmp.is_some() || self.guest.memory_file.is_some();
        self.outgoing_record_path().filter(|_| memory_outlives_us)
    }

    /// Where an outgoing session's record is, whatever the guest: `[control] state_dir`'s
    /// `outgoing.session`.
    pub fn outgoing_record_path(&self) -> Option<PathBuf> {
        self.control
            .state_dir
            .as_ref()
            .map(|dir| dir.join("outgoing.session"))
    }

    /// Where the record of a session received into a file that outlives this process
    /// (`[dest] memory_file`, or the RAM file of the incoming VM `[dest] qmp` names) is
    /// kept, when `[control] state_dir` is set.
    pub fn incoming_session_record(&self) -> Option<PathBuf> {
        let memory_outlives_us = self.dest.qmp.is_some() || self.dest.memory_file.is_some();
        self.control
            .state_dir
            .as_ref()
            .filter(|_| memory_outlives_us)
            .map(|dir| dir.join("incoming.session"))
    }

    /// Where the incoming VM listens for its device state, when `[control] state_dir`
    /// is set: a place that outlives this process, so that an appliance restarted
    /// mid-migration finds QEMU listening there still.
    pub fn incoming_device_socket(&self) -> Option<PathBuf> {
        self.control
            .state_dir
            .as_ref()
            .filter(|_| self.dest.qmp.is_some())
            .map(|dir| dir.join("incoming-device-state.sock"))
    }

    /// The simulated guest's workload.
    pub fn workload(&self) -> GuestWorkload {
        let g = &self.guest;
        GuestWorkload {
            dirty_rate: g.dirty_rate_mbps * 1e6,
            working_set: g.working_set,
            pattern: match g.pattern.as_str() {
                "uniform" => AccessPattern::Uniform,
                "sequential" => AccessPattern::Sequential,
                _ => AccessPattern::HotCold {
                    hot_fraction: 0.1,
                    hot_share: 0.8,
                },
            },
            writes: ContentMix::WRITES,
            vcpus: g.vcpus,
            seed: g.seed,
        }
    }

    /// The dirty tracker to use.
    pub fn dirty_log(&self) -> DirtyLogKind {
        self.migration
            .dirty_log
            .parse()
            .unwrap_or(DirtyLogKind::Uffd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("1G".parse::<Size>(), Ok(Size(1 << 30)));
        assert_eq!("64k".parse::<Size>(), Ok(Size(64 << 10)));
        assert_eq!("4096".parse::<Size>(), Ok(Size(4096)));
        assert!("12Q".parse::<Size>().is_err());
        assert_eq!(Size(512 << 20).to_string(), "512M");
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c);
    }

    #[test]
    fn every_problem_is_reported_at_once_by_name() {
        let text = r#"
            [migration]
            streams = 0
            dirty_log = "magic"
            [transport]
            kind = "carrier-pigeon"
            send_buffer = "1M"
            zero_copy_threshold = "2M"
            [guest]
            working_set = 1.5
            [dest]
            listen = "nowhere"
        "#;
        let errors = Config::parse(text).unwrap().validate().unwrap_err().0;
        let joined = errors.join("\n");
        for field in [
            "migration.streams",
            "migration.dirty_log",
            "transport.kind",
            "transport.zero_copy_threshold",
            "guest.working_set",
            "dest.listen",
        ] {
            assert!(joined.contains(field), "{field} missing from:\n{joined}");
        }
        assert_eq!(errors.len(), 6, "{joined}");
    }

    #[test]
    fn an_existing_file_is_never_the_simulated_guests_memory_unless_allowed() {
        let dir = std::env::temp_dir().join(format!("dwcp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let precious = dir.join("precious");
        std::fs::write(&precious, b"the only copy").unwrap();
        let mut c = Config::default();
        c.guest.memory_file = Some(precious.clone());
        let errors = c.validate().unwrap_err().0.join("\n");
        assert!(
            errors.contains("guest.memory_file") && errors.contains("exists"),
            "{errors}"
        );
        c.guest.memory_file = Some("/etc".into());
        let errors = c.validate().unwrap_err().0.join("\n");
        assert!(errors.contains("not a regular file"), "{errors}");
        c.guest.memory_file = Some(precious.clone());
        c.guest.overwrite_memory_file = true;
        c.validate().unwrap();
        c.guest.memory_file = Some(dir.join("new"));
        c.guest.overwrite_memory_file = false;
        c.validate().unwrap();
        assert_eq!(std::fs::read(&precious).unwrap(), b"the only copy");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_qemu_guest_needs_its_qmp_socket_and_a_simulated_one_none() {
        let mut c = Config::default();
        c.guest.kind = "qemu".into();
        let errors = c.validate().unwrap_err().0.join("\n");
        assert!(errors.contains("needs guest.qmp"), "{errors}");
        c.guest.qmp = Some("/run/vm.qmp".into());
        c.validate().unwrap();
        c.guest.kind = "simulated".into();
        let errors = c.validate().unwrap_err().0.join("\n");
        assert!(errors.contains("needs guest.kind"), "{errors}");
        c.guest.kind = "xen".into();
        let errors = c.validate().unwrap_err().0.join("\n");
        assert!(errors.contains("expected simulated or qemu"), "{errors}");
    }

    #[test]
    fn codec_modes_parse_with_options() {
        let base = CodecSettings::OFF;
        assert_eq!(parse_codec_mode("auto", base), Ok(CodecMode::Auto));
        assert_eq!(parse_codec_mode("off", base), Ok(CodecMode::Off));
        let Ok(CodecMode::Fixed(s)) = parse_codec_mode("zstd:-3,nodict,nodedup", base) else {
            panic!("fixed mode expected");
        };
        assert_eq!(
            (s.level, s.dictionary, s.dedup, s.delta),
            (Some(-3), false, false, true)
        );
        let Ok(CodecMode::Fixed(d)) = parse_codec_mode("delta", base) else {
            panic!("fixed mode expected");
        };
        assert!(d.delta && d.dedup && d.level.is_none());
        for bad in ["zstd:fast", "zstd:99", "lz4", "delta,nofun", "off,nodict"] {
            assert!(parse_codec_mode(bad, base).is_err(), "{bad}");
        }
        let text = "[codec]\nmode = \"zstd:1000\"\nbatch = \"2M\"\nlevels = []";
        let errors = Config::parse(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .0
            .join("\n");
        for field in ["codec.mode", "codec.batch", "codec.levels"] {
            assert!(errors.contains(field), "{field} missing from:\n{errors}");
        }
    }

    #[test]
    fn a_cluster_section_names_what_it_lacks() {
        let plan = |text: &str| Config::parse(text).unwrap().cluster_plan();
        assert_eq!(plan("").unwrap(), None);
        let err = plan("[cluster]\nid = 2\n").unwrap_err();
        assert!(err.contains("cluster.listen is missing"), "{err}");
        let err = plan(
            "[cluster]\nid = 2\nlisten = \"127.0.0.1:7402\"\n[cluster.members]\n1 = \"127.0.0.1:7401\"\n",
        )
        .unwrap_err();
        assert!(err.contains("does not hold this appliance's id 2"), "{err}");
        let err = plan(
            "[cluster]\nid = 1\nlisten = \"127.0.0.1:7401\"\n[cluster.members]\n1 = \"127.0.0.1:7401\"\n",
        )
        .unwrap_err();
        assert!(err.contains("cluster.dir or control.state_dir"), "{err}");
        let err = plan("[cluster]\nlisten = \"127.0.0.1:7401\"\n").unwrap_err();
        assert!(err.contains("no id"), "{err}");
        let text = "[control]\nstate_dir = \"/var/lib/dwcp\"\n[cluster]\nid = 1\nlisten = \"127.0.0.1:7401\"\n\
                    [cluster.members]\n1 = \"127.0.0.1:7401\"\n2 = \"127.0.0.1:7402\"\nx = \"127.0.0.1:7403\"\n";
        let err = plan(text).unwrap_err();
        assert!(err.contains("\"x\" is not a member id"), "{err}");
        let ok = plan(&text.replace("x = ", "3 = ")).unwrap().unwrap();
        assert_eq!(ok.members.len(), 3);
        assert_eq!(ok.dir, PathBuf::from("/var/lib/dwcp/cluster"));
        assert!(Config::parse(text).unwrap().validate().is_err());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        assert!(
            Config::parse("[migration]\nstreems = 4")
                .unwrap_err()
                .to_string()
                .contains("streems")
        );
        assert!(Config::parse("[migration]\nstreams = \"four\"").is_err());
    }

    #[test]
    fn type_errors_unknown_keys_and_invalid_values_are_reported_together() {
        let dir = std::env::temp_dir().join(format!("dwcp-config-all-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(
            &path,
            "bogus = 1\n[migration]\nstreams = \"four\"\ndowntime_limit_ms = 0\n\
             [transport]\nzero_copy = \"yes\"\nkind = \"plain\"\nturbo = true\n",
        )
        .unwrap();
        let errors = Config::load(&path).unwrap_err().0.join("\n");
        for expected in [
            "migration.streams: invalid type",
            "transport.zero_copy: invalid type",
            "transport.turbo: unknown field",
            "\"bogus\"",
            "migration.downtime_limit_ms = 0",
        ] {
            assert!(
                errors.contains(expected),
                "{expected} missing from:\n{errors}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn contradictions_between_settings_are_refused() {
        let errors = Config::parse("[transport]\nkind = \"plain\"\nzero_copy = true")
            .unwrap_err()
            .to_string();
        assert!(errors.contains("need io_uring"), "{errors}");
        Config::parse("[transport]\nkind = \"plain\"").unwrap();
        let mut c = Config::default();
        c.dest.listen = "0.0.0.0:7410".into();
        c.control.metrics_addr = Some("127.0.0.1:7410".into());
        c.guest.memory = Size(1 << 50);
        let errors = c.validate().unwrap_err().0.join("\n");
        for expected in ["one port", "more than this host's memory"] {
            assert!(
                errors.contains(expected),
                "{expected} missing from:\n{errors}"
            );
        }
        let mut c = Config::default();
        c.control.metrics_addr = Some("127.0.0.1:9410".into());
        c.validate().unwrap();
    }
}
