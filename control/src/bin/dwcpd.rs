//! `dwcpd`: the dwcp migration appliance daemon.

// The argument docs are clap's help text, where `<level>` and the like are literal.
#![allow(rustdoc::invalid_html_tags)]

use clap::{Args, Parser, Subcommand};
use dwcp_control::config::{Config, ConfigErrors, Size};
use dwcp_control::daemon::{Daemon, DaemonOptions};
use dwcp_control::{appliance, certs};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dwcpd", about = "dwcp live-migration appliance", version)]
struct Cli {
    /// Check a configuration file and exit (0 when valid).
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Args, Clone)]
struct Common {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data streams.
    #[arg(long)]
    streams: Option<u16>,
    /// Transport: auto, io_uring, plain, or rma (page contents by RMA write where the
    /// destination grants it).
    #[arg(long)]
    transport: Option<String>,
    /// Congestion control: cubic or bbr.
    #[arg(long)]
    congestion: Option<String>,
    /// Zero-copy sends on or off.
    #[arg(long)]
    zero_copy: Option<bool>,
    /// Codecs: auto (the policy decides), off, delta, or zstd:<level>, with options
    /// ,nodedup ,nodelta ,nodict (e.g. zstd:3,nodict).
    #[arg(long, value_name = "MODE")]
    codec: Option<String>,
    /// Append the codec policy's decisions (JSON lines) to this file.
    #[arg(long, value_name = "FILE")]
    codec_log: Option<PathBuf>,
    /// This appliance's certificate (PEM; `[security] cert`).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Its private key (PEM; `[security] key`).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The site's CA certificate (PEM; `[security] ca`).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Accept only peers whose certificate is valid for this name (repeatable;
    /// `[security] peers`).
    #[arg(long = "peer-name", value_name = "NAME")]
    peer_names: Vec<String>,
    /// Run sessions without authentication or encryption (a trusted lab network).
    #[arg(long)]
    insecure: bool,
}

#[derive(Args, Clone)]
struct GuestArgs {
    /// Guest memory size (e.g. 1G).
    #[arg(long)]
    memory: Option<Size>,
    /// Simulated guest dirty rate, MB/s.
    #[arg(long)]
    dirty_rate: Option<f64>,
    /// Downtime limit, milliseconds.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Dirty log: uffd-wp, rescan or explicit.
    #[arg(long)]
    dirty_log: Option<String>,
    /// Switchover verification: table (compare the CRC tables' digests), audit (and
    /// check the source's memory against its table afterwards) or full (checksum all
    /// of memory on both sides inside the downtime).
    #[arg(long)]
    verify: Option<String>,
    /// Migrate the QEMU VM behind this QMP socket (its RAM a shared memory-backend-file)
    /// instead of a simulated guest.
    #[arg(long, value_name = "SOCKET")]
    qmp: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Mode {
    /// Both appliances in this process over loopback: migrate a simulated guest live
    /// and print the report (1 GiB, 4 streams, ~50 MB/s of writes by default).
    Demo {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        guest: GuestArgs,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Migrate a simulated guest to a destination appliance.
    Source {
        /// Destination address.
        #[arg(long)]
        peer: SocketAddr,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        guest: GuestArgs,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run as an appliance: the control thread, the operator socket (`dwcpctl`),
    /// incoming migrations, optional metrics; until SIGTERM/SIGINT or `shutdown`.
    Serve {
        /// Address to accept migrations on.
        #[arg(long)]
        listen: Option<String>,
        /// Control socket path.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Serve Prometheus metrics over HTTP here.
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Feature flags file.
        #[arg(long)]
        flags_file: Option<PathBuf>,
        /// Receive incoming migrations into the QEMU VM behind this QMP socket (started
        /// with `-incoming defer`; opened afresh for each session).
        #[arg(long, value_name = "SOCKET")]
        incoming_qmp: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Certificates for labs.
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Receive one migration.
    Dest {
        /// Address to listen on.
        #[arg(long)]
        listen: Option<String>,
        /// Receive into the QEMU VM behind this QMP socket (started with
        /// `-incoming defer`, its RAM a shared memory-backend-file of the same size).
        #[arg(long, value_name = "SOCKET")]
        qmp: Option<PathBuf>,
        /// Receive a guest without a VM into this file (on /dev/shm or hugetlbfs).
        #[arg(long, value_name = "PATH")]
        memory_file: Option<PathBuf>,
        /// Keep the record of a session received into `--memory-file` here; started
        /// again after a crash, the destination resumes that session.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Make a site CA and appliance certificates in DIR: ca.pem, ca-key.pem, and
    /// NAME.pem, NAME-key.pem per appliance (appliance-a and appliance-b on loopback
    /// when none is given).
    Init {
        /// Where to write them.
        dir: PathBuf,
        /// An appliance: NAME (reached on loopback) or NAME=ADDR,ADDR,... (IP
        /// addresses and DNS names it is reached at). Repeatable.
        #[arg(long = "appliance", value_name = "SPEC")]
        appliances: Vec<certs::ApplianceSpec>,
    },
}

/// The configuration file (or the defaults), with the flags applied, validated.
fn configured(
    common: &Common,
    guest: Option<&GuestArgs>,
    listen: Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut config = match &common.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    apply_common(&mut config, common);
    if let Some(g) = guest {
        apply_guest(&mut config, g);
    }
    if let Some(l) = listen {
        config.dest.listen = l;
    }
    config.validate()?;
    Ok(config)
}

fn apply_common(c: &mut Config, common: &Common) {
    if let Some(s) = common.streams {
        c.migration.streams = s;
    }
    if let Some(t) = &common.transport {
        c.transport.kind = t.clone();
    }
    if let Some(t) = &common.congestion {
        c.transport.congestion = t.clone();
    }
    if let Some(z) = common.zero_copy {
        c.transport.zero_copy = z;
    }
    if let Some(m) = &common.codec {
        c.codec.mode = m.clone();
    }
    if let Some(f) = &common.codec_log {
        c.codec.decision_log = Some(f.clone());
    }
    if let Some(p) = &common.cert {
        c.security.cert = Some(p.clone());
    }
    if let Some(p) = &common.key {
        c.security.key = Some(p.clone());
    }
    if let Some(p) = &common.ca {
        c.security.ca = Some(p.clone());
    }
    if !common.peer_names.is_empty() {
        c.security.peers = common.peer_names.clone();
    }
    if common.insecure {
        c.security.insecure = true;
    }
}

fn apply_guest(c: &mut Config, g: &GuestArgs) {
    if let Some(m) = g.memory {
        c.guest.memory = m;
    }
    if let Some(r) = g.dirty_rate {
        c.guest.dirty_rate_mbps = r;
    }
    if let Some(d) = g.downtime_ms {
        c.migration.downtime_limit_ms = d;
    }
    if let Some(d) = &g.dirty_log {
        c.migration.dirty_log = d.clone();
    }
    if let Some(v) = &g.verify {
        c.migration.verify = v.clone();
    }
    if let Some(q) = &g.qmp {
        c.guest.kind = "qemu".into();
        c.guest.qmp = Some(q.clone());
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("dwcpd: {message}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        return match Config::load(path).and_then(|c| c.validate()) {
            Ok(()) => {
                println!("{}: valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let Some(mode) = cli.mode else {
        return fail(
            "nothing to do: give a mode (demo, source, dest) or --check-config FILE; see --help",
        );
    };
    match mode {
        Mode::Certs {
            action: CertsAction::Init { dir, appliances },
        } => match certs::init(&dir, &appliances) {
            Ok(written) => {
                println!(
                    "CA: {} (its key {}: keep it off the appliances)",
                    written.ca.display(),
                    written.ca_key.display()
                );
                for (name, cert, key) in &written.appliances {
                    println!("{name}: cert {} key {}", cert.display(), key.display());
                }
                println!(
                    "configure each appliance with [security] cert, key and ca = {:?}",
                    written.ca.display().to_string()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Mode::Demo {
            common,
            guest,
            json,
        } => {
            let config = match configured(&common, Some(&guest), None) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            match appliance::run_demo(&config, json) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    } else {
                        println!("{}", report.source);
                        println!(
                            "destination: rounds 0-{} received, {:.1} MB over {}; byte-for-byte comparison: {}",
                            report.destination.rounds.saturating_sub(1),
                            report.destination.bytes as f64 / 1e6,
                            report.destination.transport,
                            if report.byte_identical {
                                "identical"
                            } else {
                                "DIFFERENT"
                            }
                        );
                    }
                    if report.byte_identical {
                        ExitCode::SUCCESS
                    } else {
                        fail("source and destination memory differ")
                    }
                }
                Err(e) => fail(e),
            }
        }
        Mode::Source {
            peer,
            common,
            guest,
            json,
        } => {
            let config = match configured(&common, Some(&guest), None) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            match appliance::run_source(&config, peer, json) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    } else {
                        println!("{report}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Mode::Serve {
            listen,
            socket,
            metrics_addr,
            flags_file,
            incoming_qmp,
            common,
            guest,
        } => {
            let mut config = match common.config.as_deref().map(Config::load).transpose() {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => return fail(e),
            };
            apply_common(&mut config, &common);
            apply_guest(&mut config, &guest);
            if let Some(l) = listen {
                config.dest.listen = l;
            }
            if let Some(s) = socket {
                config.control.socket = s;
            }
            if metrics_addr.is_some() {
                config.control.metrics_addr = metrics_addr;
            }
            if flags_file.is_some() {
                config.control.flags_file = flags_file;
            }
            if incoming_qmp.is_some() {
                config.dest.qmp = incoming_qmp;
            }
            if let Err(e) = config.validate() {
                return fail(e);
            }
            serve(config)
        }
        Mode::Dest {
            listen,
            qmp,
            memory_file,
            state_dir,
            common,
        } => {
            let mut config = match configured(&common, None, listen) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            if qmp.is_some() {
                config.dest.qmp = qmp;
            }
            if memory_file.is_some() {
                config.dest.memory_file = memory_file;
            }
            if state_dir.is_some() {
                config.control.state_dir = state_dir;
            }
            if let Err(e) = config.validate() {
                return fail(e);
            }
            let listening = |addr, vm: Option<&str>| match vm {
                Some(name) => eprintln!("dwcpd: receiving on {addr} into VM {name:?}"),
                None => eprintln!("dwcpd: receiving on {addr}"),
            };
            match appliance::run_dest(&config, listening) {
                Ok(report) => {
                    println!(
                        "received rounds 0-{}, {:.1} MB over {}; verified {} pages (digest {}){}",
                        report.rounds.saturating_sub(1),
                        report.bytes as f64 / 1e6,
                        report.transport,
                        report.verified_pages,
                        report.digest,
                        if report.device_state_bytes > 0 {
                            format!(
                                "; {:.1} KiB of device state loaded, the VM runs here",
                                report.device_state_bytes as f64 / 1024.0
                            )
                        } else {
                            String::new()
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// Run the daemon until a signal or `shutdown`, then stop it in order.
fn serve(config: Config) -> ExitCode {
    let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, term.clone()) {
            return fail(format!("installing the signal handler: {e}"));
        }
    }
    let daemon = match Daemon::start(DaemonOptions { config }) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    eprintln!(
        "dwcpd: serving: control socket {}, migrations on {}{}",
        daemon.socket.display(),
        daemon.listen_addr,
        daemon
            .metrics_addr
            .map(|a| format!(", metrics on http://{a}/metrics"))
            .unwrap_or_default()
    );
    while !daemon.shutting_down() && !term.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("dwcpd: stopping (draining migrations)");
    daemon.stop();
    eprintln!("dwcpd: stopped");
    ExitCode::SUCCESS
}
