//! `dwcp-bench <suite> [--json]`: side-by-side comparisons against baselines, one JSON
//! line each on stdout with `--json`, and a table.

use clap::{Parser, Subcommand};
use dwcp_bench::measure::Plan;
use dwcp_bench::report::Reporter;

#[derive(Parser)]
#[command(about = "dwcp comparison benchmarks (ours vs a baseline, same run)")]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Our page stream against iperf3 (goodput, CPU per GB) and a 1 GiB live migration.
    Transport {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// The codec pipeline on the reference guest images: zstd against the zstd
    /// command, bytes on the wire against QEMU's codecs, migration time through
    /// rate-limited links against codecs off (needs root for a network namespace).
    Codec {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Live migration across each WAN emulator scenario against one plain TCP stream
    /// copying the same memory (needs root for the emulator's namespaces).
    Wan {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text (e.g. `wan/cross`).
        #[arg(long)]
        filter: Option<String>,
        /// Guest memory to migrate, in MiB.
        #[arg(long, default_value_t = 1024)]
        guest_mib: usize,
        /// Longest the plain stream may run; beyond it its time is projected.
        #[arg(long, default_value_t = 60)]
        baseline_limit_s: u64,
    },
    /// A live migration with clients on the daemon's control socket against the same
    /// migration with none (watchers at 1 Hz each, and a flood).
    Control {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text (e.g. `flood`).
        #[arg(long)]
        filter: Option<String>,
    },
    /// The demo's migration, ten times at 20 ms and 50 ms limits (measured downtime and
    /// the estimate's error), the table digest against the full check, 4 GiB against 1.
    Downtime {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text (e.g. `limit-50`).
        #[arg(long)]
        filter: Option<String>,
    },
    /// A QEMU guest migrated by QEMU (precopy, multifd 4, multifd 4 + zstd) and by dwcp,
    /// fresh VM pairs each run: time to the destination running, downtime (STOP to
    /// RESUME), source CPU, bytes; on loopback and across wanem's cross-region and
    /// intercontinental paths (those need root).
    Qemu {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text (e.g. `loopback`).
        #[arg(long)]
        filter: Option<String>,
        /// Guest RAM, MiB.
        #[arg(long, default_value_t = 512)]
        guest_mib: u64,
        /// Downtime limit on loopback, ms (both QEMU and dwcp).
        #[arg(long, default_value_t = 20)]
        downtime_ms: u64,
        /// Runs of each configuration.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory for the VMs' RAM files (tmpfs or hugetlbfs).
        #[arg(long, default_value = "/dev/shm")]
        ram_dir: std::path::PathBuf,
        /// QEMU configurations to run, comma-separated (precopy, multifd4,
        /// multifd4-zstd, multifd4-tls; all by default). QEMU precopy never converges on the
        /// intercontinental path and runs to the 600 s cap.
        #[arg(long, value_delimiter = ',')]
        qemu_configs: Vec<String>,
    },
    /// Authenticated, encrypted sessions: sealed page streams against plain ones and
    /// against rustls streams, and the session setup with 16 streams.
    Security {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// A 5 s path outage mid round 0 across wanem's cross-region path, against the same
    /// migration without it (plus 5 s) and against starting over (needs root).
    Resume {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// The appliance cluster: what making a raft entry durable costs in our log against
    /// a bare write and fdatasync of the same bytes; two migrations under a site budget.
    Cluster {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// The learned link models against their baselines on held-out recordings; with
    /// `--record DIR`, record the migrations they learn from instead (needs root).
    Ml {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons (or, recording, the traces) whose name contains
        /// this text.
        #[arg(long)]
        filter: Option<String>,
        /// Record migrations across generated traces into this directory.
        #[arg(long)]
        record: Option<std::path::PathBuf>,
        /// Length of each recorded trace, seconds.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Measure the compression-choice cases into this directory (`cases.csv`).
        #[arg(long)]
        codec_data: Option<std::path::PathBuf>,
    },
    /// Page kernels (CRC32C, zero test, XBZRLE) and the SPSC ring.
    Kernels {
        /// Print one JSON object per comparison on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run only the comparisons whose name contains this text (e.g. `ring/`).
        #[arg(long)]
        filter: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let plan = Plan::from_env();
    match cli.suite {
        Suite::Transport { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::transport::run(plan, &mut out);
            out.finish();
        }
        Suite::Security { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::security::run(plan, &mut out);
            out.finish();
        }
        Suite::Resume { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::resume::run(plan, &mut out);
            out.finish();
        }
        Suite::Codec { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::codec::run(plan, &mut out);
            out.finish();
        }
        Suite::Wan {
            json,
            filter,
            guest_mib,
            baseline_limit_s,
        } => {
            let mut out = Reporter::new(json).with_filter(filter);
            let plan = dwcp_bench::wan::WanPlan {
                guest_bytes: guest_mib << 20,
                baseline_limit: std::time::Duration::from_secs(baseline_limit_s),
            };
            dwcp_bench::wan::run(plan, &mut out);
            out.finish();
        }
        Suite::Control { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::control::run(&mut out);
            out.finish();
        }
        Suite::Downtime { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::downtime::run(dwcp_bench::downtime::DowntimePlan::from_env(), &mut out);
            out.finish();
        }
        Suite::Qemu {
            json,
            filter,
            guest_mib,
            downtime_ms,
            runs,
            ram_dir,
            qemu_configs,
        } => {
            let mut out = Reporter::new(json).with_filter(filter);
            if let Some(bad) = qemu_configs
                .iter()
                .find(|c| !dwcp_bench::qemu::QEMU_CONFIGS.contains(&c.as_str()))
            {
                eprintln!(
                    "dwcp-bench: no QEMU configuration {bad:?} (there are {:?})",
                    dwcp_bench::qemu::QEMU_CONFIGS
                );
                std::process::exit(2);
            }
            let plan = dwcp_bench::qemu::QemuPlan {
                guest_mib,
                downtime_ms,
                runs,
                ram_dir,
                qemu_configs,
            };
            dwcp_bench::qemu::run(plan, &mut out);
            out.finish();
        }
        Suite::Ml {
            json,
            filter,
            record,
            seconds,
            codec_data,
        } => {
            if let Some(dir) = codec_data {
                if let Err(e) = dwcp_bench::codec_choice::record(&dir) {
                    eprintln!("dwcp-bench ml: {e}");
                    std::process::exit(1);
                }
                return;
            }
            if let Some(dir) = record {
                if let Err(e) = dwcp_bench::ml::record(&dir, seconds, filter.as_deref()) {
                    eprintln!("dwcp-bench ml: {e}");
                    std::process::exit(1);
                }
                return;
            }
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::ml::run(&mut out);
            dwcp_bench::codec_choice::judge(&mut out);
            out.finish();
        }
        Suite::Cluster { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::cluster::run(plan, &mut out);
            dwcp_bench::cluster::budget(&mut out);
            out.finish();
        }
        Suite::Kernels { json, filter } => {
            let mut out = Reporter::new(json).with_filter(filter);
            dwcp_bench::kernels::run(plan, &mut out);
            out.finish();
        }
    }
}
