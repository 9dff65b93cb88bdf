//! `dwcpctl`: the operator's command line for `dwcpd`'s control socket.
//!
//! Each subcommand sends one request (see `dwcp-api`) and prints the answer for a
//! person, or as JSON with `--json`. `migrate --follow` and `watch` poll `migrations`
//! and redraw a progress line: bar, rate, ETA, round, dirty rate, mode.

// The argument docs are clap's help text, where `<level>` and the like are literal.
#![allow(rustdoc::invalid_html_tags)]

use clap::{Parser, Subcommand};
use dwcp_api::{
    ClusterInfo, Command, Done, FlagsInfo, MetricsText, MigrateOptions, MigrationInfo, Request,
    Response, SetOptions, StatusInfo,
};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Write to stdout; a reader that went away (`dwcpctl status | head -1`) ends the
/// program quietly, as it does other Unix tools, instead of panicking on EPIPE.
fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("dwcpctl: writing the output: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`emit`].
macro_rules! outln {
    () => { emit(format_args!(""), true) };
    ($($arg:tt)*) => { emit(format_args!($($arg)*), true) };
}

/// `print!` through [`emit`].
macro_rules! out {
    ($($arg:tt)*) => { emit(format_args!($($arg)*), false) };
}

#[derive(Parser)]
#[command(name = "dwcpctl", about = "Control a dwcpd appliance", version)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, short, default_value = dwcp_api::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Print the daemon's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Longest wait for the daemon's answer to one request, seconds.
    #[arg(long, global = true, default_value_t = 15, value_name = "SECONDS")]
    timeout: u64,
    #[command(subcommand)]
    command: Sub,
}

#[derive(Subcommand)]
enum Sub {
    /// Role, mode and why, transport, capabilities, uptime.
    Status,
    /// Migrate this appliance's guest to a peer.
    Migrate {
        /// Destination appliance, ip:port.
        peer: String,
        /// Guest memory (e.g. 1G).
        #[arg(long)]
        memory: Option<String>,
        /// Simulated guest dirty rate, MB/s.
        #[arg(long)]
        dirty_rate: Option<f64>,
        /// Data streams to open.
        #[arg(long)]
        streams: Option<u16>,
        /// Downtime limit, ms.
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Codec mode (auto, off, delta, zstd:<level>...).
        #[arg(long)]
        codec: Option<String>,
        /// Migrate the QEMU VM behind this QMP socket on the appliance's host (its RAM
        /// a shared memory-backend-file) instead of a simulated guest.
        #[arg(long, value_name = "SOCKET")]
        qmp: Option<String>,
        /// Have it done within this long (90s, 5m, 1h; plain seconds too): under a
        /// cluster's site budget, its share covers what its bytes left need.
        #[arg(long, value_name = "DURATION", value_parser = parse_deadline)]
        deadline: Option<u64>,
        /// Show live progress until it ends.
        #[arg(long)]
        follow: bool,
    },
    /// Every migration, with progress.
    Migrations,
    /// Live progress of running migrations (Ctrl-C to stop watching).
    Watch {
        /// Only this migration.
        id: Option<u64>,
    },
    /// Stop a running migration (the source stays intact).
    Cancel {
        /// Migration id.
        id: u64,
    },
    /// Continue an interrupted migration (the appliance stopped while it ran): the
    /// session is resumed where the destination kept it.
    Resume {
        /// Migration id.
        id: u64,
    },
    /// Fix the mode or return to detection.
    SetMode {
        /// auto, datacenter, internet or hybrid.
        mode: String,
    },
    /// Change running migrations (and later ones unless --id).
    Set {
        /// Only this migration.
        #[arg(long)]
        id: Option<u64>,
        /// Streams carrying pages.
        #[arg(long)]
        streams: Option<u16>,
        /// Total send-rate cap, bytes/s, with units like the configuration file
        /// (300M, 1G); 0 removes it.
        #[arg(long, value_parser = dwcp_api::parse_size)]
        pacing_rate: Option<u64>,
        /// Codec mode.
        #[arg(long)]
        codec: Option<String>,
        /// cubic or bbr.
        #[arg(long)]
        congestion: Option<String>,
        /// Downtime limit, ms.
        #[arg(long)]
        downtime_ms: Option<u64>,
    },
    /// Show flags, or set one (`flags safe-mode on`, `flags rollout 25`), or reload
    /// the flags file (`flags reload`).
    Flags {
        /// Flag name, or `reload`.
        name: Option<String>,
        /// on/off, or a percentage for rollout.
        value: Option<String>,
    },
    /// Prometheus metrics.
    Metrics,
    /// The effective configuration.
    Config,
    /// Stop the daemon gracefully.
    Shutdown,
    /// The appliance cluster (`[cluster]`).
    Cluster {
        #[command(subcommand)]
        command: ClusterSub,
    },
}

#[derive(Subcommand)]
enum ClusterSub {
    /// This member's raft state: leader, term, commit index, members and their lag.
    Status,
    /// Every member's migrations as the cluster records them (read through the leader).
    Migrations,
    /// Found a cluster of this appliance alone (`[cluster]` with an id and listen, no
    /// members); others then join it.
    Init,
    /// Join the cluster a member of which takes raft messages at ADDR (that member, or
    /// the leader it names, adds this appliance).
    Join {
        /// A member's raft address, host:port.
        address: String,
    },
    /// Add an appliance (run on the leader; the new one runs with `[cluster] join = true`
    /// and the members listed).
    Add {
        /// Its id, unique in the site.
        id: u64,
        /// Its raft address, host:port.
        address: String,
    },
    /// Remove an appliance (run on the leader); this one when no id is given.
    Leave {
        /// The member to remove.
        id: Option<u64>,
    },
    /// Set the site's WAN budget (e.g. 800Mbit, 2Gbit), or lift it (`off`), on every
    /// member.
    Budget {
        /// Bits per second with a unit (bit, kbit, Mbit, Gbit), or `off`.
        rate: String,
    },
}

/// `800Mbit`, `2Gbit`, `1500kbit`, `100000bit` (a trailing `/s` allowed), or `off`.
fn parse_bit_rate(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    let lower = t.to_ascii_lowercase();
    let (number, scale) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(unit, scale)| lower.strip_suffix(unit).map(|n| (n.to_string(), *scale)))
        .ok_or_else(|| format!("{text:?}: give a rate with its unit (800Mbit, 2Gbit), or off"))?;
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
    let bits = value * scale;
    if !(1.0..1e15).contains(&bits) {
        return Err(format!(
            "{text:?}: a budget is at least 1 bit/s and below 1 Pbit/s"
        ));
    }
    Ok(Some(bits.round() as u64))
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Longest wait for an answer.
    timeout: Duration,
}

impl Client {
    fn connect(path: &PathBuf, timeout: Duration) -> Result<Client, String> {
        let s = UnixStream::connect(path)
            .map_err(|e| format!("{}: {e} (is dwcpd serving? see --socket)", path.display()))?;
        let _ = s.set_read_timeout(Some(timeout));
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Client {
            reader: BufReader::new(s),
            writer,
            timeout,
        })
    }

    fn call(&mut self, command: Command) -> Result<Response, String> {
        let mut line = serde_json::to_vec(&Request::new(command)).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| format!("sending: {e}"))?;
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .map_err(|e| match e.kind() {
                // The read timeout ends the read with EAGAIN, which says nothing of a wait.
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                    "no answer from the daemon within {} s (is it overloaded or stuck?)",
                    self.timeout.as_secs()
                ),
                _ => format!("reading the answer: {e}"),
            })?;
        if answer.is_empty() {
            return Err("the daemon closed the connection".into());
        }
        serde_json::from_str(&answer).map_err(|e| format!("bad answer: {e}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dwcpctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--deadline`: seconds, or a number with `s`, `m` or `h`.
fn parse_deadline(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.trim().char_indices().find(|(_, c)| c.is_alphabetic()) {
        Some((at, _)) => text.trim().split_at(at),
        None => (text.trim(), "s"),
    };
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(format!(
                "{text:?}: give seconds, or a number with s, m or h"
            ));
        }
    };
    let n: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: give seconds, or a number with s, m or h"))?;
    if n == 0 {
        return Err("a deadline of 0 cannot be met".into());
    }
    Ok(n * seconds_per)
}

fn run(cli: &Cli) -> Result<(), String> {
    let mut client = Client::connect(&cli.socket, Duration::from_secs(cli.timeout.max(1)))?;
    let (command, follow) = match &cli.command {
        Sub::Status => (Command::Status, None),
        Sub::Migrate {
            peer,
            memory,
            dirty_rate,
            streams,
            downtime_ms,
            codec,
            qmp,
            deadline,
            follow,
        } => (
            Command::Migrate(MigrateOptions {
                peer: peer.clone(),
                memory: memory.clone(),
                dirty_rate_mbps: *dirty_rate,
                streams: *streams,
                downtime_ms: *downtime_ms,
                codec: codec.clone(),
                qmp: qmp.clone(),
                deadline_s: *deadline,
            }),
            Some(*follow),
        ),
        Sub::Migrations => (Command::Migrations, None),
        Sub::Watch { id } => return watch(&mut client, *id, cli.json),
        Sub::Cancel { id } => (Command::Cancel { id: *id }, None),
        Sub::Resume { id } => (Command::Resume { id: *id }, None),
        Sub::SetMode { mode } => (Command::SetMode { mode: mode.clone() }, None),
        Sub::Set {
            id,
            streams,
            pacing_rate,
            codec,
            congestion,
            downtime_ms,
        } => (
            Command::Set(SetOptions {
                id: *id,
                streams: *streams,
                pacing_rate: *pacing_rate,
                codec: codec.clone(),
                congestion: congestion.clone(),
                downtime_ms: *downtime_ms,
            }),
            None,
        ),
        Sub::Flags { name, value } => match (name.as_deref(), value) {
            (None, _) => (Command::Flags, None),
            (Some("reload"), None) => (Command::FlagsReload, None),
            (Some(n), Some(v)) => (
                Command::FlagSet {
                    name: n.into(),
                    value: v.clone(),
                },
                None,
            ),
            (Some(n), None) => {
                return Err(format!(
                    "flags {n}: give a value (on, off, or a percentage)"
                ));
            }
        },
        Sub::Metrics => (Command::Metrics, None),
        Sub::Config => (Command::Config, None),
        Sub::Shutdown => (Command::Shutdown, None),
        Sub::Cluster { command } => match command {
            ClusterSub::Status => (Command::ClusterStatus, None),
            ClusterSub::Migrations => (Command::ClusterMigrations, None),
            ClusterSub::Init => (Command::ClusterInit, None),
            ClusterSub::Join { address } => (
                Command::ClusterJoinAt {
                    address: address.clone(),
                },
                None,
            ),
            ClusterSub::Add { id, address } => (
                Command::ClusterJoin {
                    id: *id,
                    address: address.clone(),
                },
                None,
            ),
            ClusterSub::Leave { id } => (Command::ClusterLeave { id: *id }, None),
            ClusterSub::Budget { rate } => (
                Command::ClusterBudget {
                    bits_per_second: parse_bit_rate(rate)?,
                },
                None,
            ),
        },
    };
    let response = client.call(command.clone())?;
    if cli.json {
        outln!(
            "{}",
            serde_json::to_string(&response).map_err(|e| e.to_string())?
        );
        if !response.ok {
            return Err(response.error.unwrap_or_default());
        }
    } else {
        print_human(&command, response.clone())?;
    }
    if follow == Some(true) {
        let done: Done = response.into_result()?;
        let id = done.id.ok_or("the daemon named no migration")?;
        return watch(&mut client, Some(id), cli.json);
    }
    Ok(())
}

fn print_human(command: &Command, response: Response) -> Result<(), String> {
    match command {
        Command::Status => {
            let s: StatusInfo = response.into_result()?;
            outln!(
                "dwcpd {} (protocol {}), {}, up {:.0} s",
                s.version,
                s.protocol,
                s.role,
                s.uptime_seconds
            );
            outln!(
                "mode:         {} (setting: {})",
                s.mode.current,
                s.mode.setting
            );
            outln!("  why:        {}", s.mode.why);
            outln!("  policy:     {}", s.mode.policy);
            outln!(
                "transport:    {}, zero-copy {}, {} streams, congestion {}, codecs {}",
                s.transport.kind,
                on_off(s.transport.zero_copy),
                s.transport.streams,
                s.transport.congestion,
                s.transport.codec
            );
            if !s.security.is_empty() {
                outln!("security:     {}", s.security);
            }
            if !s.link_forecast.is_empty() {
                outln!("link forecast: {}", s.link_forecast);
            }
            if !s.anomaly_detection.is_empty() {
                outln!("path anomalies: {}", s.anomaly_detection);
            }
            outln!(
                "listening:    {} ({} running: {} outgoing, {} incoming; {} received)",
                s.listen,
                s.running,
                s.running.saturating_sub(s.receiving),
                s.receiving,
                s.received
            );
            if !s.settings.is_empty() {
                outln!("new migrations get:");
                for setting in &s.settings {
                    outln!(
                        "  {:<12}{:<22}({})",
                        setting.name,
                        setting.value,
                        setting.source
                    );
                }
            }
            for vm in &s.vms {
                outln!(
                    "vm:           {:?} (QEMU {}), RAM {}: migrating",
                    vm.name,
                    vm.qemu_version,
                    vm.memory_file
                );
            }
            if let Some(qmp) = &s.incoming_vm {
                outln!("incoming vm:  the QEMU VM behind {qmp}");
            }
            outln!("safe mode:    {}", on_off(s.safe_mode));
            let c = &s.capabilities;
            outln!(
                "io_uring:     {}",
                if c.io_uring_ops.is_empty() {
                    format!(
                        "unavailable ({})",
                        c.io_uring_note.clone().unwrap_or_default()
                    )
                } else {
                    c.io_uring_ops.join(" ")
                }
            );
            outln!(
                "zero-copy:    {}",
                if c.zero_copy {
                    "SEND_ZC available"
                } else {
                    "unavailable"
                }
            );
            outln!("hugepages:    {}", c.hugepages);
            outln!(
                "rdma:         {}",
                if c.rdma_devices.is_empty() {
                    "no devices".to_string()
                } else {
                    c.rdma_devices.join(", ")
                }
            );
            outln!(
                "rma:          {}",
                c.rma_note.as_deref().unwrap_or("not probed")
            );
            for provider in &c.rma_providers {
                outln!("              {provider}");
            }
            outln!("cpu:          {}", c.cpu_features.join(" "));
        }
        Command::Migrations => {
            let list: Vec<MigrationInfo> = response.into_result()?;
            if list.is_empty() {
                outln!("no migrations");
            }
            for m in &list {
                // Another cluster member's: what the cluster records of it.
                if let Some(appliance) = m.appliance {
                    outln!(
                        "appliance {appliance} #{} to {:<21} {:<11} round {:>3} {:>8.1} Mbit/s",
                        m.id,
                        m.peer,
                        m.state,
                        m.round,
                        m.rate * 8.0 / 1e6
                    );
                    for note in m.notes.iter().skip(1) {
                        outln!("    {note}");
                    }
                    continue;
                }
                outln!("{}", migration_line(m));
                if let Some(a) = &m.activity {
                    outln!("    setting up: {a}");
                }
                if m.state == "running" && !m.settings.is_empty() {
                    let shown: Vec<String> = m
                        .settings
                        .iter()
                        .map(|s| format!("{} {} ({})", s.name, s.value, s.source))
                        .collect();
                    outln!("    settings: {}", shown.join("; "));
                }
                if !m.session.is_empty() {
                    outln!("    session: {}", m.session);
                }
                if let Some(f) = &m.link_forecast {
                    outln!("    link: {}", describe_forecast(f));
                }
                if let Some(why) = &m.switchover {
                    outln!("    switchover: {why}");
                }
                if let Some(flag) = &m.path_flag {
                    outln!("    path: {flag} ({} episodes so far)", m.path_anomalies);
                } else if m.path_anomalies > 0 {
                    outln!("    path: {} episodes flagged", m.path_anomalies);
                }
                for f in &m.stream_flags {
                    outln!(
                        "    stream {}: going bad since {:.1} s: {}",
                        f.stream,
                        f.since_s,
                        f.why
                    );
                }
                if m.stream_flags.is_empty() && m.stream_anomalies > 0 {
                    outln!("    streams: {} episodes flagged", m.stream_anomalies);
                }
                if let Some(vm) = &m.vm {
                    outln!(
                        "    VM {:?} (QEMU {}), RAM {}: {}",
                        vm.name,
                        vm.qemu_version,
                        vm.memory_file,
                        vm.state
                    );
                }
                for n in &m.notes {
                    outln!("    note: {n}");
                }
            }
        }
        Command::Flags | Command::FlagSet { .. } | Command::FlagsReload => {
            let f: FlagsInfo = response.into_result()?;
            for (name, state) in &f.flags {
                outln!("{name:<14}{}", on_off(state.enabled));
            }
            outln!("{:<14}{}%", "rollout", f.rollout_percent);
            outln!("{:<14}{}", "safe-mode", on_off(f.safe_mode));
            outln!(
                "{:<14}{}",
                "file",
                f.file.as_deref().unwrap_or("(in memory only)")
            );
        }
        Command::ClusterStatus => {
            let c: ClusterInfo = response.into_result()?;
            if !c.enabled {
                outln!("not a cluster member (no [cluster] in the configuration)");
                return Ok(());
            }
            if c.role == "unfounded" {
                outln!(
                    "appliance {} is in no cluster yet: `dwcpctl cluster init` founds one here, \
                     `dwcpctl cluster join ADDR` joins the one a member of which listens at ADDR",
                    c.id
                );
                return Ok(());
            }
            let leader = if c.leader == 0 {
                "none (no majority reachable)".to_string()
            } else {
                c.leader.to_string()
            };
            outln!(
                "member {} ({}), leader {leader}, term {}",
                c.id,
                c.role,
                c.term
            );
            outln!(
                "log: last index {}, commit {}, applied {}; {} bytes, {} syncs of {:.2} ms on average",
                c.last_index,
                c.commit,
                c.applied,
                c.log_bytes,
                c.log_syncs,
                c.log_sync_ms_mean
            );
            for m in &c.members {
                let lag = match m.lag {
                    Some(lag) => format!("lag {lag}"),
                    None => String::new(),
                };
                let this = if m.id == c.id { " (this)" } else { "" };
                outln!("  {:>3}  {:<22} {lag}{this}", m.id, m.address);
            }
            outln!(
                "budget: {}",
                match c.budget_bits_per_second {
                    Some(b) => format!("{:.1} Mbit/s", b as f64 / 1e6),
                    None => "none".into(),
                }
            );
            outln!(
                "migration records: {}; raft messages sent {}, received {}, dropped {}; connections refused {}",
                c.migration_records,
                c.messages_sent,
                c.messages_received,
                c.messages_dropped,
                c.connections_refused
            );
        }
        Command::ClusterMigrations => {
            let records: Vec<dwcp_api::ClusterMigrationInfo> = response.into_result()?;
            if records.is_empty() {
                outln!("no migrations recorded");
            }
            for r in &records {
                let share = r
                    .budget_share_bits_per_second
                    .map(|b| format!(", budget share {:.1} Mbit/s", b as f64 / 1e6))
                    .unwrap_or_default();
                let mut when = r
                    .interrupted_at
                    .filter(|_| r.state == "interrupted")
                    .map(|t| format!(" at {t} (Unix time)"))
                    .unwrap_or_default();
                if let Some(deadline) = r.deadline.filter(|_| r.state == "running") {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    when += &match deadline.checked_sub(now) {
                        Some(left) => format!(", due in {left} s"),
                        None => format!(", {} s past its deadline", now - deadline),
                    };
                }
                outln!(
                    "appliance {} migration {} ({}): {}{when}, to {}, round {}, {:.1} MB left in the round, {:.1} Mbit/s{share}",
                    r.source,
                    r.id,
                    r.vm,
                    r.state,
                    r.destination,
                    r.round,
                    r.remaining_bytes as f64 / 1e6,
                    r.rate_bits_per_second as f64 / 1e6
                );
            }
        }
        Command::Metrics => {
            let m: MetricsText = response.into_result()?;
            out!("{}", m.text);
        }
        Command::Config => {
            let v: serde_json::Value = response.into_result()?;
            outln!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
            );
        }
        _ => {
            let d: Done = response.into_result()?;
            outln!("{}", d.message);
        }
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn migration_line(m: &MigrationInfo) -> String {
    // The bar follows the round in progress; a migration that ended is whole, however
    // far its last reported round had come.
    let done = if m.state == "completed" {
        1.0
    } else if m.round_pages > 0 {
        m.round_pages_sent.min(m.round_pages) as f64 / m.round_pages as f64
    } else {
        // Setting up (nothing queued yet), or ended early.
        0.0
    };
    let width = 24;
    let filled = (done * width as f64).round() as usize;
    let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
    let eta = m
        .eta_seconds
        .map_or("--".to_string(), |s| format!("{s:.1}s"));
    let incoming = m.direction == "incoming";
    let mut line = format!(
        "#{} {} {:<21} {:<9} [{bar}] {:>3.0}% round {:>3} {:<12} {:>8.1} MB/s  ETA {eta:>6}  dirty {:>6.1} MB/s  {} {:>8.1} MB  mode {}  {} streams {}/{}  {:.1}s",
        m.id,
        if incoming { "from" } else { "to" },
        m.peer,
        m.state,
        done * 100.0,
        m.round,
        m.phase,
        m.rate / 1e6,
        m.dirty_rate / 1e6,
        if incoming { "received" } else { "sent" },
        m.bytes_sent as f64 / 1e6,
        m.mode,
        if m.transport.is_empty() {
            "--"
        } else {
            &m.transport
        },
        m.active_streams,
        m.streams,
        m.elapsed_seconds
    );
    match (m.downtime_ms, m.verified_pages) {
        (Some(d), pages) => {
            line += &format!("  downtime {d:.1} ms");
            if let Some(e) = m.estimated_downtime_ms {
                line += &format!(" (estimated {e:.1}");
                if let Some(path) = m.estimate_path_mbit {
                    line += &format!(", the path at {path:.0} Mbit/s");
                }
                if m.vm.is_some() {
                    // The planner has no figure for QEMU's own part of the switchover.
                    line += ", without QEMU's stop, device state and load";
                }
                line += ")";
            }
            line += &format!(", {} pages verified", pages.unwrap_or(0));
        }
        (None, Some(pages)) => line += &format!("  {pages} pages verified"),
        (None, None) => {}
    }
    match m.audit_mismatched {
        Some(0) => line += ", audit clean",
        Some(n) => {
            let shown: Vec<String> = m.audit_pages.iter().take(8).map(u64::to_string).collect();
            line += &format!(
                ", AUDIT: {n} pages differ from what was sent (pages {}{})",
                shown.join(", "),
                if m.audit_pages.len() > 8 { ", ..." } else { "" }
            );
        }
        None => {}
    }
    if let Some(e) = &m.error {
        line += &format!("  ({e})");
    }
    line
}

/// Redraw progress until the watched migrations end.
fn watch(client: &mut Client, id: Option<u64>, json: bool) -> Result<(), String> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let list: Vec<MigrationInfo> = client.call(Command::Migrations)?.into_result()?;
        let watched: Vec<&MigrationInfo> = list
            .iter()
            .filter(|m| id.is_none_or(|i| m.id == i))
            .collect();
        if let Some(i) = id
            && watched.is_empty()
        {
            return Err(format!("no migration {i}"));
        }
        let running = watched.iter().any(|m| m.state == "running");
        for m in &watched {
            if json {
                outln!("{}", serde_json::to_string(m).map_err(|e| e.to_string())?);
            } else if tty && running {
                out!("\r\x1b[2K{}", migration_line(m));
            } else {
                outln!("{}", migration_line(m));
            }
        }
        let _ = std::io::stdout().flush();
        if !running {
            if tty && !json {
                outln!();
            }
            if let Some(m) = watched
                .iter()
                .find(|m| m.state == "failed" || m.state == "cancelled")
            {
                return Err(format!("migration {} {}", m.id, m.state));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(if tty { 250 } else { 1000 }));
    }
}

/// A link forecast for people: `acknowledged 212 Mbit/s; ahead: 1 s 205, 5 s 190
/// (model)`.
fn describe_forecast(f: &dwcp_api::LinkForecastInfo) -> String {
    let ahead = if f.horizons_s.len() == f.mbit.len() && !f.horizons_s.is_empty() {
        f.horizons_s
            .iter()
            .zip(&f.mbit)
            .map(|(h, v)| format!("{h} s {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        f.mbit
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "acknowledged {:.0} Mbit/s; ahead: {ahead} Mbit/s ({})",
        f.now_mbit, f.by
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_take_a_unit_or_off() {
        assert_eq!(parse_bit_rate("800Mbit"), Ok(Some(800_000_000)));
        assert_eq!(parse_bit_rate("2Gbit/s"), Ok(Some(2_000_000_000)));
        assert_eq!(parse_bit_rate("1.5kbit"), Ok(Some(1_500)));
        assert_eq!(parse_bit_rate("off"), Ok(None));
        assert!(parse_bit_rate("800").unwrap_err().contains("with its unit"));
        assert!(
            parse_bit_rate("0bit")
                .unwrap_err()
                .contains("at least 1 bit/s")
        );
        assert!(
            parse_bit_rate("fastMbit")
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn deadlines_take_seconds_minutes_or_hours() {
        assert_eq!(parse_deadline("90"), Ok(90));
        assert_eq!(parse_deadline("90s"), Ok(90));
        assert_eq!(parse_deadline("5m"), Ok(300));
        assert_eq!(parse_deadline("1h"), Ok(3600));
        assert!(parse_deadline("0s").unwrap_err().contains("cannot be met"));
        assert!(parse_deadline("5d").unwrap_err().contains("s, m or h"));
        assert!(parse_deadline("soon").unwrap_err().contains("s, m or h"));
    }

    fn migration(state: &str, round_pages: u64, sent: u64) -> MigrationInfo {
        MigrationInfo {
            id: 1,
            direction: "outgoing".into(),
            activity: None,
            settings: Vec::new(),
            peer: "10.0.0.2:7410".into(),
            state: state.into(),
            phase: "done".into(),
            round: 3,
            memory_bytes: 1 << 28,
            round_pages,
            round_pages_queued: sent,
            round_pages_sent: sent,
            bytes_sent: 1 << 27,
            pages_sent: 1 << 15,
            rate: 0.0,
            dirty_rate: 0.0,
            eta_seconds: None,
            throttle: 0,
            elapsed_seconds: 1.0,
            mode: "auto".into(),
            active_streams: 4,
            streams: 4,
            transport: "io_uring".into(),
            epoch: 1,
            ping_ms: None,
            components: Vec::new(),
            error: None,
            downtime_ms: None,
            estimated_downtime_ms: None,
            estimate_path_mbit: None,
            switchover: None,
            verified_pages: None,
            audit_mismatched: None,
            audit_pages: Vec::new(),
            notes: Vec::new(),
            vm: None,
            session: String::new(),
            link_forecast: None,
            path_flag: None,
            path_anomalies: 0,
            stream_flags: Vec::new(),
            stream_anomalies: 0,
            appliance: None,
        }
    }

    #[test]
    fn a_completed_migration_shows_a_full_bar_and_a_running_one_its_round() {
        // The last report came mid-round: the migration is complete all the same.
        assert!(migration_line(&migration("completed", 200, 0)).contains("100%"));
        assert!(migration_line(&migration("running", 200, 50)).contains(" 25%"));
        assert!(migration_line(&migration("running", 0, 0)).contains("  0%"));
    }

    #[test]
    fn a_completed_migration_shows_its_downtime_beside_the_estimate() {
        let mut m = migration("completed", 0, 0);
        m.downtime_ms = Some(94.6);
        m.estimated_downtime_ms = Some(100.1);
        m.verified_pages = Some(65536);
        assert!(
            migration_line(&m).contains("downtime 94.6 ms (estimated 100.1), 65536 pages verified"),
            "{}",
            migration_line(&m)
        );
        m.estimate_path_mbit = Some(266.4);
        assert!(
            migration_line(&m).contains("(estimated 100.1, the path at 266 Mbit/s)"),
            "{}",
            migration_line(&m)
        );
        // A QEMU VM's estimate leaves out QEMU's own part, and says so.
        m.estimate_path_mbit = None;
        m.vm = Some(dwcp_api::VmInfo {
            name: "vm1".into(),
            qemu_version: "10.0.2".into(),
            memory_file: "/dev/shm/vm1".into(),
            state: "postmigrate".into(),
        });
        assert!(
            migration_line(&m)
                .contains("(estimated 100.1, without QEMU's stop, device state and load)"),
            "{}",
            migration_line(&m)
        );
    }
}
