//! `wanem`: run the WAN emulator (`up`), change it live (`set`), look at it
//! (`status`), stop it (`down`), list the shipped scenarios (`scenarios`).

use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use wanem::control::{self, Request};
use wanem::scenario::{BUILT_IN, JitterDistribution, LinkChanges, Scenario, apply_both};
use wanem::units::{BitsPerSecond, Bytes, Nanos, Probability};
use wanem::{Emulator, EmulatorConfig};

#[derive(Parser)]
#[command(name = "wanem", about = "WAN emulator between two network namespaces")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the namespaces and forward between them until SIGINT/SIGTERM or `down`.
    Up(UpArgs),
    /// Change a running emulator's links (both directions unless --direction).
    Set {
        #[command(flatten)]
        target: Target,
        /// both, forward (source to destination) or reverse.
        #[arg(long, default_value = "both")]
        direction: String,
        /// Start from this scenario's links, then apply the flags.
        #[arg(long)]
        scenario: Option<String>,
        #[command(flatten)]
        link: LinkFlags,
    },
    /// Show a running emulator's links and counters.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Stop a running emulator (it cleans up and exits).
    Down {
        #[command(flatten)]
        target: Target,
    },
    /// Print a generated trace as CSV (the form `up --trace FILE` reads).
    Trace {
        /// diurnal, steps, bursts or loss-episodes.
        #[arg(long)]
        family: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Length, seconds.
        #[arg(long, default_value_t = 120.0)]
        seconds: f64,
    },
    /// List the shipped scenarios.
    Scenarios {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    target: Target,
    /// A shipped scenario (see `wanem scenarios`) or a scenario file; flags refine it.
    #[arg(long)]
    scenario: Option<String>,
    #[command(flatten)]
    link: LinkFlags,
    /// MTU of both devices.
    #[arg(long)]
    mtu: Option<u32>,
    /// Seed of the impairments' random decisions.
    #[arg(long)]
    seed: Option<u64>,
    /// Play a trace back over the scenario: a CSV file (see `wanem trace`), or
    /// FAMILY:SEED[:SECONDS] generated (diurnal, steps, bursts, loss-episodes).
    #[arg(long)]
    trace: Option<String>,
    #[arg(long, default_value_t = wanem::DEFAULT_SOURCE_ADDRESS)]
    source_address: Ipv4Addr,
    #[arg(long, default_value_t = wanem::DEFAULT_DESTINATION_ADDRESS)]
    destination_address: Ipv4Addr,
}

#[derive(Args)]
struct Target {
    /// Emulator name: namespaces `<name>-src` and `<name>-dst`.
    #[arg(long, default_value = wanem::DEFAULT_NAME)]
    name: String,
    /// Control socket (default /run/wanem/<name>.sock).
    #[arg(long)]
    control: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| wanem::default_control_socket(&self.name))
    }
}

/// Link settings as flags; each one given replaces the scenario's value.
#[derive(Args, Default)]
struct LinkFlags {
    /// One-way delay, e.g. 40ms.
    #[arg(long)]
    delay: Option<Nanos>,
    /// Jitter around the delay, e.g. 1ms.
    #[arg(long)]
    jitter: Option<Nanos>,
    /// normal (jitter = standard deviation), uniform (± jitter) or pareto (mean jitter).
    #[arg(long)]
    jitter_distribution: Option<JitterDistribution>,
    /// Random loss, e.g. 0.1%.
    #[arg(long)]
    loss: Option<Probability>,
    /// Mean loss burst in packets: makes --loss bursty (Gilbert-Elliott).
    #[arg(long)]
    loss_burst: Option<f64>,
    /// Bottleneck rate, e.g. 100mbit, or unlimited.
    #[arg(long)]
    rate: Option<BitsPerSecond>,
    /// Token bucket depth, e.g. 64KiB (default: 1 ms at the rate).
    #[arg(long)]
    burst: Option<Bytes>,
    /// Bottleneck queue bound, e.g. 2MB (default: one bandwidth-delay product).
    #[arg(long)]
    queue: Option<Bytes>,
    /// Fraction of packets sent without the delay (they overtake others).
    #[arg(long)]
    reorder: Option<Probability>,
    /// Fraction of packets delivered twice.
    #[arg(long)]
    duplicate: Option<Probability>,
    /// Fraction of packets with one bit flipped.
    #[arg(long)]
    corrupt: Option<Probability>,
}

impl LinkFlags {
    fn changes(&self) -> LinkChanges {
        LinkChanges {
            delay: self.delay,
            jitter: self.jitter,
            jitter_distribution: self.jitter_distribution,
            loss: self.loss,
            loss_burst: self.loss_burst,
            gilbert_elliott: None,
            rate: self.rate,
            burst: self.burst,
            queue: self.queue,
            reorder: self.reorder,
            duplicate: self.duplicate,
            corrupt: self.corrupt,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up(args),
        Command::Set {
            target,
            direction,
            scenario,
            link,
        } => {
            let request = Request::Set {
                direction: Some(direction),
                scenario,
                changes: Box::new(link.changes()),
            };
            control::request(&target.socket(), &request).map(|response| {
                for direction in ["forward", "reverse"] {
                    println!("{direction}: {}", describe_link(&response[direction]));
                }
            })
        }
        Command::Status { target, json } => control::request(&target.socket(), &Request::Status)
            .map(|response| {
                if json {
                    println!("{response}");
                } else {
                    print_status(&response);
                }
            }),
        Command::Down { target } => control::request(&target.socket(), &Request::Down).map(|_| ()),
        Command::Trace {
            family,
            seed,
            seconds,
        } => {
            wanem::trace::Trace::generate(&family, seed, seconds).map(|t| print!("{}", t.to_csv()))
        }
        Command::Scenarios { json } => {
            for (name, _) in BUILT_IN {
                let scenario = Scenario::built_in(name).expect("shipped scenario");
                if json {
                    println!("{}", serde_json::to_string(&scenario).unwrap_or_default());
                } else {
                    println!("{name:<17} {}", scenario.description);
                }
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wanem: {message}");
            ExitCode::FAILURE
        }
    }
}

fn up(args: UpArgs) -> Result<(), String> {
    let UpArgs {
        target,
        scenario,
        link,
        mtu,
        seed,
        trace,
        source_address,
        destination_address,
    } = args;
    let trace = trace
        .as_deref()
        .map(wanem::trace::Trace::load)
        .transpose()?;
    let mut scenario = match &scenario {
        Some(name) => Scenario::load(name).map_err(|e| e.to_string())?,
        None => Scenario::clean("custom"),
    };
    let changes = link.changes();
    (scenario.forward, scenario.reverse) =
        apply_both((&changes, &scenario.forward), (&changes, &scenario.reverse))
            .map_err(|problems| problems.join("\n  "))?;
    if let Some(mtu) = mtu {
        if !(576..=65_535).contains(&mtu) {
            return Err(format!("--mtu {mtu} is outside 576–65535"));
        }
        scenario.mtu = mtu;
    }
    if let Some(seed) = seed {
        scenario.seed = seed;
    }
    // Block the stop signals before any thread starts, so they all inherit the mask and
    // only the sigwait below receives them.
    let signals = stop_signals();
    // SAFETY: changes this thread's mask to a set we built.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    let socket = target.socket();
    let mut config = EmulatorConfig::new(&target.name, scenario);
    config.source_address = source_address;
    config.destination_address = destination_address;
    config.control_socket = Some(socket.clone());
    config.on_down_request = Some(|| {
        // SAFETY: signalling our own process; `up` waits for it.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    let emulator = Emulator::start(config).map_err(|e| e.to_string())?;
    let s = &emulator.config().scenario;
    println!(
        "wanem {}: {} (MTU {}, seed {})",
        emulator.config().name,
        s.name,
        s.mtu,
        s.seed
    );
    if !s.description.is_empty() {
        println!("  {}", s.description);
    }
    println!("  forward: {}", describe_spec(&s.forward));
    println!("  reverse: {}", describe_spec(&s.reverse));
    println!(
        "source:      namespace {}, device {}, address {}",
        emulator.source_namespace(),
        wanem::DEVICE,
        emulator.source_address()
    );
    println!(
        "destination: namespace {}, device {}, address {}",
        emulator.destination_namespace(),
        wanem::DEVICE,
        emulator.destination_address()
    );
    println!(
        "control:     {} (wanem set|status|down --name {})",
        socket.display(),
        emulator.config().name
    );
    let playback = trace.map(|t| {
        println!(
            "trace:       {} ({} points over {:.0} s; the last one holds)",
            t.name,
            t.points.len(),
            t.duration().as_secs_f64()
        );
        emulator.play(t)
    });
    println!("ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut received = 0;
    // SAFETY: waits on the set blocked above.
    unsafe { libc::sigwait(&signals, &mut received) };
    eprintln!("wanem: signal {received}, cleaning up");
    drop(playback);
    drop(emulator);
    Ok(())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

fn describe_spec(spec: &wanem::scenario::LinkSpec) -> String {
    serde_json::to_value(spec)
        .map(|v| describe_link(&v))
        .unwrap_or_default()
}

/// One line from a link spec's JSON form, leaving out what is off.
fn describe_link(link: &Value) -> String {
    let Some(fields) = link.as_object() else {
        return String::new();
    };
    let off = |v: &Value| {
        matches!(
            v.as_str(),
            Some("0ms" | "0%" | "unlimited" | "0B" | "normal")
        ) || v.is_null()
    };
    let parts: Vec<String> = fields
        .iter()
        .filter(|(_, v)| !off(v))
        .map(|(k, v)| match v.as_str() {
            Some(s) => format!("{k} {s}"),
            None => format!("{k} {v}"),
        })
        .collect();
    if parts.is_empty() {
        "clean".to_string()
    } else {
        parts.join(", ")
    }
}

fn print_status(response: &Value) {
    let e = &response["emulator"];
    println!(
        "wanem {}: scenario {}, MTU {}, {} {} <-> {} {}",
        e["name"].as_str().unwrap_or("?"),
        e["scenario"].as_str().unwrap_or("?"),
        e["mtu"],
        e["source_namespace"].as_str().unwrap_or("?"),
        e["source_address"].as_str().unwrap_or("?"),
        e["destination_namespace"].as_str().unwrap_or("?"),
        e["destination_address"].as_str().unwrap_or("?"),
    );
    for direction in ["forward", "reverse"] {
        let d = &response[direction];
        let s = &d["stats"];
        println!("{direction}: {}", describe_link(&d["link"]));
        println!(
            "  in {} pkts / {} B, out {} pkts / {} B, lost {}, queue drops {}, duplicated {}, corrupted {}, reordered {}, held {}",
            s["packets_in"],
            s["bytes_in"],
            s["packets_out"],
            s["bytes_out"],
            s["lost"],
            s["queue_drops"],
            s["duplicated"],
            s["corrupted"],
            s["reordered"],
            s["in_flight"]
        );
    }
}
