//! The operator protocol of `dwcpd`'s control socket, shared by the daemon and
//! `dwcpctl` (which links nothing else of the daemon).
//!
//! One request per line, one response per line, both JSON objects. Every request names
//! the protocol version (`"v"`) and a command (`"cmd"`); every response carries the
//! version, `"ok"`, and either `"result"` or `"error"`. A request longer than
//! [`MAX_REQUEST_BYTES`], malformed, of another version, or naming an unknown command
//! gets an error response and changes nothing.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line, bytes (newline included).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Where the daemon listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dwcp/dwcpd.sock";

/// A request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub v: u32,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    /// `command` at this build's protocol version.
    pub fn new(command: Command) -> Self {
        Request {
            v: PROTOCOL_VERSION,
            command,
        }
    }
}

/// The commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// The daemon: role, mode and why, transport, capabilities, uptime.
    Status,
    /// Start migrating this appliance's guest to a peer.
    Migrate(MigrateOptions),
    /// Every migration, with its progress.
    Migrations,
    /// Stop a running migration (the source stays intact).
    Cancel {
        /// Migration id.
        id: u64,
    },
    /// Continue an `interrupted` migration (this appliance stopped while it ran): its
    /// session is resumed where the destination kept it.
    Resume {
        /// Migration id.
        id: u64,
    },
    /// Fix the mode, or let the detector choose (`auto`).
    SetMode {
        /// `auto`, `datacenter`, `internet` or `hybrid`.
        mode: String,
    },
    /// Change settings of running migrations (and of later ones).
    Set(SetOptions),
    /// Show the feature flags.
    Flags,
    /// Change one flag (and persist the flags).
    FlagSet {
        /// Flag name (see [`FlagsInfo`]), `rollout` or `safe-mode`.
        name: String,
        /// `on`/`off`, or a percentage for `rollout`.
        value: String,
    },
    /// Read the flags file again.
    FlagsReload,
    /// Prometheus text exposition.
    Metrics,
    /// The effective configuration.
    Config,
    /// Stop gracefully: drain migrations, then exit.
    Shutdown,
    /// The appliance cluster: this member's raft state, the members, the budget.
    ClusterStatus,
    /// Found a cluster of this appliance alone (`[cluster]` with no `members`); others
    /// then join it with [`Command::ClusterJoinAt`].
    ClusterInit,
    /// Join the cluster a member of which listens for raft at `address`: that member
    /// (or the leader it names) adds this appliance.
    ClusterJoinAt {
        /// A member's raft address, `host:port`.
        address: String,
    },
    /// Add an appliance to the cluster (on the leader): it must run with `[cluster]
    /// join = true` and listen for raft at `address`.
    ClusterJoin {
        /// Its id (unique in the site).
        id: u64,
        /// Where its raft messages go, `host:port`.
        address: String,
    },
    /// Remove an appliance from the cluster (on the leader); this one when no id.
    ClusterLeave {
        /// The member to remove.
        #[serde(default)]
        id: Option<u64>,
    },
    /// The migrations every member of the cluster has recorded, read through the
    /// leader (a read index), so that every member answers the same.
    ClusterMigrations,
    /// Set the site's WAN budget (bits per second), or lift it (`null`); replicated to
    /// every member.
    ClusterBudget {
        /// Bits per second; absent or `null` lifts the budget.
        #[serde(default)]
        bits_per_second: Option<u64>,
    },
}

/// Options of `migrate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateOptions {
    /// Destination appliance, `host:port`.
    pub peer: String,
    /// Guest memory to migrate (e.g. `1G`); the configured size when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Simulated guest dirty rate, MB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate_mbps: Option<f64>,
    /// Data streams to open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u16>,
    /// Downtime limit, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Codec mode (`auto`, `off`, `delta`, `zstd:<level>`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
    /// Migrate the QEMU VM behind this QMP socket (on the appliance's host; its RAM a
    /// shared memory-backend-file) instead of a simulated guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<String>,
    /// Seconds from now it should be done in: under a cluster's site budget its share
    /// covers what its bytes left need to make it (as far as the budget allows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
}

/// The QEMU VM a migration moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Its name (`-name`, or the QMP socket's file name).
    pub name: String,
    /// QEMU's version.
    pub qemu_version: String,
    /// The file holding its RAM.
    pub memory_file: String,
    /// Its run state as last seen: `running` while it migrates, `postmigrate` once the
    /// destination runs it, `running` again when it was taken back.
    pub state: String,
}

/// Options of `set`; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetOptions {
    /// Only this migration (all running ones and later ones when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Streams carrying pages (at most those the migration opened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u16>,
    /// Total send-rate cap, bytes per second (0 removes it); `dwcpctl` takes sizes
    /// with units ([`parse_size`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pacing_rate: Option<u64>,
    /// Codec mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
    /// Congestion control: `cubic` or `bbr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub congestion: Option<String>,
    /// Downtime limit, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Whether the command succeeded.
    pub ok: bool,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The command's result (see the `*Info` types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    /// Success with `result`.
    pub fn ok(result: impl Serialize) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            error: None,
            result: Some(serde_json::to_value(result).unwrap_or(serde_json::Value::Null)),
        }
    }

    /// Failure.
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            error: Some(message.into()),
            result: None,
        }
    }

    /// The result as `T`, or the error.
    pub fn into_result<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        if !self.ok {
            return Err(self.error.unwrap_or_else(|| "failed".into()));
        }
        serde_json::from_value(self.result.unwrap_or(serde_json::Value::Null))
            .map_err(|e| format!("unexpected result: {e}"))
    }
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Daemon version.
    pub version: String,
    /// Protocol version.
    pub protocol: u32,
    /// `source+destination`: every appliance can do both.
    pub role: String,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// Mode and why.
    pub mode: ModeInfo,
    /// Transport settings in force for new migrations.
    pub transport: TransportInfo,
    /// What this host can do.
    pub capabilities: Capabilities,
    /// Where incoming migrations are accepted.
    pub listen: String,
    /// Migrations running now.
    pub running: usize,
    /// The kill switch.
    pub safe_mode: bool,
    /// Migrations received since start (as destination).
    pub received: u64,
    /// The QEMU VMs of running migrations.
    #[serde(default)]
    pub vms: Vec<VmInfo>,
    /// The incoming VM's QMP socket, when incoming migrations go into a QEMU VM.
    #[serde(default)]
    pub incoming_vm: Option<String>,
    /// Incoming migrations running now (as destination).
    #[serde(default)]
    pub receiving: usize,
    /// The settings a migration started now would run with, each with its source.
    #[serde(default)]
    pub settings: Vec<SettingInfo>,
    /// How new sessions are secured: the certificate and CA in use and pinned peers,
    /// or that sessions run plain (`--insecure`).
    #[serde(default)]
    pub security: String,
    /// What forecasts the migrations' links: the learned model (its card's version and
    /// held-out figures) or the EWMA, and why.
    #[serde(default)]
    pub link_forecast: String,
    /// What flags their paths going bad: the z-score or the learned detector, and why.
    #[serde(default)]
    pub anomaly_detection: String,
}

/// A setting in force and where its value comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingInfo {
    /// `streams`, `congestion`, `pacing-rate`, `codec`, `downtime`, `transport`,
    /// `zero-copy`.
    pub name: String,
    /// The value, as an operator writes it.
    pub value: String,
    /// `config`, `mode <name>`, `override`, `override (this migration)`, `flags`,
    /// `safe mode`.
    pub source: String,
}

/// The mode and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeInfo {
    /// `datacenter`, `internet`, `hybrid`, or `unknown` before any measurement.
    pub current: String,
    /// `auto` or the fixed mode.
    pub setting: String,
    /// Why: the measurements behind the mode.
    pub why: String,
    /// The policy the mode maps to.
    pub policy: String,
}

/// Transport settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportInfo {
    /// `io_uring` or `plain`.
    pub kind: String,
    /// Zero-copy sends.
    pub zero_copy: bool,
    /// Congestion control.
    pub congestion: String,
    /// Streams a migration opens.
    pub streams: u16,
    /// Codec mode.
    pub codec: String,
}

/// Capabilities probed at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// io_uring operations found (empty: none, plain sockets).
    pub io_uring_ops: Vec<String>,
    /// Why io_uring is not used, if it is not.
    pub io_uring_note: Option<String>,
    /// `SEND_ZC` available.
    pub zero_copy: bool,
    /// Huge pages: what is reserved and available.
    pub hugepages: String,
    /// RDMA devices found.
    pub rdma_devices: Vec<String>,
    /// libfabric providers offering RMA on connected endpoints (`provider: fabric,
    /// domain`, with the link speed where known).
    #[serde(default)]
    pub rma_providers: Vec<String>,
    /// Why there are none, or what they are (socket-based providers have RMA semantics
    /// but no RDMA hardware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rma_note: Option<String>,
    /// The RMA providers on RDMA hardware (not socket-based): datacenter mode writes
    /// pages through them.
    #[serde(default)]
    pub rma_hardware: Vec<String>,
    /// SIMD level in use and the CPU features behind it.
    pub cpu_features: Vec<String>,
}

/// One migration. In a cluster, `migrations` lists this appliance's migrations first,
/// then the other members' as the cluster records them (`appliance` says whose; ids
/// are each appliance's own, so an id is unique only with its appliance).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// Id (unique in this daemon's life, shared by both directions).
    pub id: u64,
    /// `outgoing` (this appliance is the source) or `incoming` (the destination).
    #[serde(default = "outgoing")]
    pub direction: String,
    /// The other appliance: the destination of an outgoing migration, the source of an
    /// incoming one.
    pub peer: String,
    /// `running`, `completed`, `failed`, `cancelled`, or `interrupted` (this appliance
    /// stopped while it ran; `resume` continues it).
    pub state: String,
    /// `setup`, `precopy`, `switchover`, `verify`, or `done`; incoming migrations also
    /// `device-state` (loading it into the VM).
    pub phase: String,
    /// What it is doing while it sets up (e.g. filling a simulated guest's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    /// Current round.
    pub round: u64,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Pages of the current round and those queued of it.
    pub round_pages: u64,
    /// Pages of the current round handed to workers.
    pub round_pages_queued: u64,
    /// Pages of the current round sent (staged for the wire by the workers; at most
    /// `round_pages_queued`).
    #[serde(default)]
    pub round_pages_sent: u64,
    /// Bytes on the wire so far (received, for an incoming migration).
    pub bytes_sent: u64,
    /// Pages sent so far, the round in progress included (received, for an incoming
    /// migration).
    pub pages_sent: u64,
    /// Send (or receive) rate, bytes per second (recent).
    pub rate: f64,
    /// Guest dirty rate, bytes per second.
    pub dirty_rate: f64,
    /// Seconds to the end of round 0 (or of the current round), if known.
    pub eta_seconds: Option<f64>,
    /// Guest throttle, percent.
    pub throttle: u32,
    /// Seconds since the migration started.
    pub elapsed_seconds: f64,
    /// Mode in force (for a migration that ended, the mode it ended in).
    pub mode: String,
    /// Streams carrying pages / opened.
    pub active_streams: u16,
    /// Streams opened.
    pub streams: u16,
    /// The workers' transport now (`io_uring` or `plain`; empty before the first
    /// report).
    #[serde(default)]
    pub transport: String,
    /// Settings epoch adopted.
    pub epoch: u64,
    /// Latest control-stream round trip, ms.
    pub ping_ms: Option<f64>,
    /// Components this migration uses (after flags and rollout).
    pub components: Vec<String>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// When completed: measured downtime, ms.
    pub downtime_ms: Option<f64>,
    /// When completed: the downtime the planner estimated as the guest paused, ms.
    pub estimated_downtime_ms: Option<f64>,
    /// When completed with `[control] forecast_path_rate`: the path rate that estimate
    /// priced the final round at, Mbit/s.
    pub estimate_path_mbit: Option<f64>,
    /// When completed: why it switched over when it did (and any switchover put off).
    pub switchover: Option<String>,
    /// When completed: pages the destination verified.
    pub verified_pages: Option<u64>,
    /// When completed with `verify = "audit"`: pages of the source's memory that
    /// differ from what was sent (writes the dirty log missed; the destination holds
    /// stale copies of them), and the first of their numbers.
    #[serde(default)]
    pub audit_mismatched: Option<u64>,
    /// Page numbers of [`MigrationInfo::audit_mismatched`], ascending (at most 1024).
    #[serde(default)]
    pub audit_pages: Vec<u64>,
    /// Things the engine could not do as asked.
    pub notes: Vec<String>,
    /// The QEMU VM, for migrations of one.
    #[serde(default)]
    pub vm: Option<VmInfo>,
    /// Its live settings and where each comes from (outgoing migrations).
    #[serde(default)]
    pub settings: Vec<SettingInfo>,
    /// How the session is secured: TLS 1.3 with the peer's certificate names and sealed
    /// data streams, or plain (`--insecure`); empty before the session is open.
    #[serde(default)]
    pub session: String,
    /// The path's acknowledged rate ahead (running outgoing migrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_forecast: Option<LinkForecastInfo>,
    /// While the anomaly detector flags the path (outgoing migrations): since when
    /// (seconds into the migration) and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_flag: Option<String>,
    /// Episodes the anomaly detector flagged on its path so far.
    #[serde(default)]
    pub path_anomalies: u64,
    /// The data streams flagged as going bad now, on their own and against the others
    /// (running outgoing migrations).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stream_flags: Vec<StreamFlagInfo>,
    /// Episodes flagged on single data streams so far.
    #[serde(default)]
    pub stream_anomalies: u64,
    /// Another cluster member's migration: the member it runs on (absent for this
    /// appliance's own). It has only what the cluster records of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appliance: Option<u64>,
}

/// A data stream flagged as going bad.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamFlagInfo {
    /// The stream's id.
    pub stream: u16,
    /// Since when, seconds into the migration.
    pub since_s: f64,
    /// Why.
    pub why: String,
}

/// A forecast of a migration's link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkForecastInfo {
    /// The acknowledged rate now (the recent rows' mean), Mbit/s.
    pub now_mbit: f64,
    /// Mbit/s at each horizon of `horizons_s` (one value, no horizon, from the EWMA).
    pub mbit: Vec<f64>,
    pub horizons_s: Vec<f64>,
    /// `model` or `ewma`.
    pub by: String,
}

fn outgoing() -> String {
    "outgoing".into()
}

/// A size or rate with an optional binary suffix, as in the configuration file:
/// `4096`, `64K`, `300M`, `1G`, `2T` (bytes, or bytes per second for rates).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let (digits, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 64K, 512M, 1G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A feature flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagState {
    /// On for migrations in the rollout.
    pub enabled: bool,
}

/// `flags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlagsInfo {
    /// Per component.
    pub flags: BTreeMap<String, FlagState>,
    /// Share of migrations (by a hash of their id) that get the enabled components;
    /// the rest run the plain path.
    pub rollout_percent: u8,
    /// The kill switch: plain TCP, no codecs, for every migration, now.
    pub safe_mode: bool,
    /// Where flags persist.
    pub file: Option<String>,
}

/// `cluster-status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Whether this appliance is a cluster member (`[cluster]`); the rest is empty
    /// when not.
    pub enabled: bool,
    /// This member's id.
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `pre-candidate`; `unfounded` for an
    /// appliance with `[cluster]` but no members yet (`cluster init` or `cluster join`).
    pub role: String,
    /// The leader this member knows, 0 when none (a partitioned minority).
    pub leader: u64,
    /// The raft term.
    pub term: u64,
    /// The highest log index known committed.
    pub commit: u64,
    /// The highest index applied here.
    pub applied: u64,
    /// The last index in this member's log.
    pub last_index: u64,
    /// The voting members.
    pub members: Vec<ClusterMemberInfo>,
    /// The site's WAN budget, bits per second.
    pub budget_bits_per_second: Option<u64>,
    /// Migration records replicated.
    pub migration_records: u64,
    /// Ticks of this member's raft clock since it started (100 ms each).
    pub ticks: u64,
    /// Ticks without a leader's word before a follower stands for election.
    pub election_ticks: u64,
    /// The raft log file's size, bytes.
    pub log_bytes: u64,
    /// fdatasync calls on the log, and their mean duration.
    pub log_syncs: u64,
    /// Mean fdatasync time, milliseconds.
    pub log_sync_ms_mean: f64,
    /// Raft messages sent, received, dropped, and connections refused.
    pub messages_sent: u64,
    /// Raft messages received and taken.
    pub messages_received: u64,
    /// Raft messages dropped (no connection, a full queue).
    pub messages_dropped: u64,
    /// Connections refused (authentication, not a member, bad frames).
    pub connections_refused: u64,
}

/// One migration as the cluster records it (`cluster-migrations`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterMigrationInfo {
    /// Its id on its source appliance.
    pub id: u64,
    /// The source appliance (member id).
    pub source: u64,
    /// The VM it moves (`simulated` for the simulated guest).
    pub vm: String,
    /// Where it goes.
    pub destination: String,
    /// `running`, `completed`, `failed`, `cancelled`, `interrupted`.
    pub state: String,
    /// The round reached.
    pub round: u64,
    /// When it was marked interrupted, seconds since the Unix epoch.
    pub interrupted_at: Option<u64>,
    /// Bytes left in its round when last reported.
    pub remaining_bytes: u64,
    /// Its send rate when last reported, bits per second.
    pub rate_bits_per_second: u64,
    /// Its share of the site's WAN budget, bits per second, while it runs under one.
    pub budget_share_bits_per_second: Option<u64>,
    /// When it should be done by, seconds since the Unix epoch (`migrate --deadline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
}

/// One member in `cluster-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterMemberInfo {
    /// Its id.
    pub id: u64,
    /// Its raft address, as configured.
    pub address: String,
    /// As seen by the leader: entries it lacks of the leader's log.
    pub lag: Option<u64>,
}

/// `metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsText {
    /// Prometheus text exposition format 0.0.4.
    pub text: String,
}

/// The result of `migrate`, `cancel`, `set`, `set-mode`, `shutdown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// What happened.
    pub message: String,
    /// The migration concerned, if any.
    pub id: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknowns() {
        let r = Request::new(Command::Set(SetOptions {
            streams: Some(8),
            ..SetOptions::default()
        }));
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"v":1,"cmd":"set","streams":8}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"v":1,"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"v":1,"cmd":"cancel"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"v":1,"cmd":"set","bogus":1}"#).is_err());
        let status = serde_json::to_string(&Request::new(Command::Status)).unwrap();
        assert_eq!(status, r#"{"v":1,"cmd":"status"}"#);
    }

    #[test]
    fn sizes_take_the_configuration_files_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("300M"), Ok(300 << 20));
        assert_eq!(parse_size(" 1g "), Ok(1 << 30));
        assert!(parse_size("300Mbit").is_err());
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }
}
