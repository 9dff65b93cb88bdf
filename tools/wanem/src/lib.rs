//! `wanem`: a WAN emulator in userspace. It creates two network namespaces — the
//! source side and the destination side — each with a TUN device, and forwards IP
//! packets between the two devices through a model of a wide-area path: delay and
//! jitter, random and bursty loss, a rate-limited bottleneck with a bounded queue,
//! reordering, duplication and corruption, each per direction and deterministic for a
//! seed. Settings change live, without restarting or losing packets in flight.
//!
//! Modules: [`units`] (quantities as written), [`scenario`] (link specs, scenario
//! files, the shipped scenarios), [`impair`] (the sans-IO model of one direction),
//! [`forward`] (the forwarding threads), [`netns`] (namespaces, TUN devices, the
//! janitor that cleans up after a crash), [`control`] (the live-change socket),
//! [`probe`] (measuring a path from outside with ping and iperf3), [`trace`] (paths
//! that follow a time series: files and seeded generators, played back live).
//! [`Emulator`] puts them together; the `wanem` binary is a thin shell over it.

pub mod control;
pub mod forward;
pub mod impair;
pub mod netns;
pub mod probe;
pub mod scenario;
pub mod trace;
pub mod units;

use forward::{Direction, DirectionStats, Forwarder, LinkControl};
use netns::{Janitor, Tun};
use scenario::{LinkChanges, Scenario};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

/// Device name inside both namespaces.
pub const DEVICE: &str = "wan0";
pub const DEFAULT_NAME: &str = "wanem";
pub const DEFAULT_SOURCE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const DEFAULT_DESTINATION_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Where `wanem up` puts its control socket: `<dir>/<name>.sock`.
pub const CONTROL_DIR: &str = "/run/wanem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wanem needs root: it creates network namespaces and TUN devices (run it with sudo)")]
    NotRoot,
    #[error(
        "network namespace `{0}` already exists: another wanem with this name is running, or one was left behind (remove it with `ip netns del {0}`, or pick another --name)"
    )]
    NameTaken(String),
    #[error("invalid emulator name `{0}`: use 1–20 characters from a-z, 0-9 and '-'")]
    BadName(String),
    #[error("setting up the emulator failed: {0}")]
    Setup(String),
    #[error("{0}")]
    Scenario(#[from] scenario::ScenarioError),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Prefix of the namespaces (`<name>-src`, `<name>-dst`) and of the control socket.
    pub name: String,
    pub scenario: Scenario,
    pub source_address: Ipv4Addr,
    pub destination_address: Ipv4Addr,
    /// Serve live changes on this Unix socket.
    pub control_socket: Option<PathBuf>,
    /// What a `down` request on the control socket does (refused when unset).
    pub on_down_request: Option<fn()>,
}

impl EmulatorConfig {
    pub fn new(name: &str, scenario: Scenario) -> EmulatorConfig {
        EmulatorConfig {
            name: name.to_string(),
            scenario,
            source_address: DEFAULT_SOURCE_ADDRESS,
            destination_address: DEFAULT_DESTINATION_ADDRESS,
            control_socket: None,
            on_down_request: None,
        }
    }

    pub fn source_namespace(&self) -> String {
        format!("{}-src", self.name)
    }

    pub fn destination_namespace(&self) -> String {
        format!("{}-dst", self.name)
    }
}

pub fn default_control_socket(name: &str) -> PathBuf {
    PathBuf::from(CONTROL_DIR).join(format!("{name}.sock"))
}

/// Both directions' counters.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub forward: DirectionStats,
    pub reverse: DirectionStats,
}

/// A trace being played back ([`Emulator::play`]); dropping it stops playback.
pub struct Playback {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Playback {
    /// Whether every point has been applied.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Playback {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running emulator. Dropping it stops forwarding and removes the namespaces.
pub struct Emulator {
    config: EmulatorConfig,
    control_server: Option<control::Server>,
    forwarder: Option<Forwarder>,
    link: Arc<LinkControl>,
    tuns: Vec<Tun>,
    created: Vec<String>,
    janitor: Option<Janitor>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Emulator {
    /// Checks that it can run (root, free names), then builds everything. On failure
    /// nothing is left behind.
    pub fn start(config: EmulatorConfig) -> Result<Emulator, Error> {
        let valid_name = !config.name.is_empty()
            && config.name.len() <= 20
            && config
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            return Err(Error::BadName(config.name));
        }
        if !is_root() {
            return Err(Error::NotRoot);
        }
        let namespaces = [config.source_namespace(), config.destination_namespace()];
        for namespace in &namespaces {
            if netns::exists(namespace) {
                return Err(Error::NameTaken(namespace.clone()));
            }
        }
        let files: Vec<PathBuf> = config.control_socket.iter().cloned().collect();
        let janitor = Janitor::spawn(&[&namespaces[0], &namespaces[1]], &files)
            .map_err(|e| Error::Setup(format!("starting the cleanup process: {e}")))?;
        let scenario = &config.scenario;
        let link = LinkControl::new(scenario.forward.clone(), scenario.reverse.clone());
        let mut emulator = Emulator {
            control_server: None,
            forwarder: None,
            link,
            tuns: Vec::new(),
            created: Vec::new(),
            janitor: Some(janitor),
            config,
        };
        emulator.build().map_err(Error::Setup)?;
        Ok(emulator)
    }

    fn build(&mut self) -> Result<(), String> {
        let config = self.config.clone();
        let mtu = config.scenario.mtu.to_string();
        let ends = [
            (
                config.source_namespace(),
                config.source_address,
                config.destination_address,
            ),
            (
                config.destination_namespace(),
                config.destination_address,
                config.source_address,
            ),
        ];
        for (namespace, local, peer) in &ends {
            netns::create(namespace)?;
            self.created.push(namespace.clone());
            let tun = Tun::create_in(namespace, DEVICE)
                .map_err(|e| format!("creating TUN device {DEVICE} in {namespace}: {e}"))?;
            self.tuns.push(tun);
            netns::ip(&["-n", namespace, "link", "set", "lo", "up"])?;
            // No IPv6 link-local address: nothing but the user's traffic crosses.
            netns::ip(&[
                "-n",
                namespace,
                "link",
                "set",
                DEVICE,
                "addrgenmode",
                "none",
            ])?;
            netns::ip(&[
                "-n",
                namespace,
                "link",
                "set",
                DEVICE,
                "mtu",
                &mtu,
                "txqueuelen",
                "10000",
                "up",
            ])?;
            let local = local.to_string();
            let peer = format!("{peer}/32");
            netns::ip(&[
                "-n", namespace, "addr", "add", &local, "peer", &peer, "dev", DEVICE,
            ])?;
        }
        let forwarder = Forwarder::start(
            self.tuns[0].raw_fd(),
            self.tuns[1].raw_fd(),
            config.scenario.mtu,
            config.scenario.seed,
            self.link.clone(),
        )
        .map_err(|e| format!("starting the forwarding threads: {e}"))?;
        self.forwarder = Some(forwarder);
        if let Some(path) = &config.control_socket {
            let server = control::Server::start(
                path,
                self.describe(),
                self.link.clone(),
                config.on_down_request,
            )
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
            self.control_server = Some(server);
        }
        Ok(())
    }

    fn describe(&self) -> control::Description {
        control::Description {
            name: self.config.name.clone(),
            scenario: self.config.scenario.name.clone(),
            mtu: self.config.scenario.mtu,
            seed: self.config.scenario.seed,
            source_namespace: self.config.source_namespace(),
            destination_namespace: self.config.destination_namespace(),
            source_address: self.config.source_address,
            destination_address: self.config.destination_address,
            device: DEVICE.to_string(),
        }
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.config
    }

    pub fn source_namespace(&self) -> String {
        self.config.source_namespace()
    }

    pub fn destination_namespace(&self) -> String {
        self.config.destination_namespace()
    }

    pub fn source_address(&self) -> Ipv4Addr {
        self.config.source_address
    }

    pub fn destination_address(&self) -> Ipv4Addr {
        self.config.destination_address
    }

    /// Applies `changes` to one direction or both (`None`), live.
    pub fn change(
        &self,
        direction: Option<Direction>,
        changes: &LinkChanges,
    ) -> Result<(), Vec<String>> {
        control::apply(&self.link, direction, None, changes)
    }

    /// Plays `trace` back from now on a thread of its own: each point is applied to
    /// both directions at its time (the reverse direction keeps its rate); the last
    /// one holds. Dropping the handle stops playback where it is.
    pub fn play(&self, trace: trace::Trace) -> Playback {
        let link = self.link.clone();
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let stop_thread = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wanem-trace".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                for point in &trace.points {
                    let (lock, wake) = &*stop_thread;
                    let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while !*stopped {
                        let Some(left) = point.at.checked_sub(start.elapsed()) else {
                            break;
                        };
                        stopped = wake
                            .wait_timeout(stopped, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    // Points were checked when the trace was made: a failure here would
                    // be a bug, and the path keeps its previous state.
                    let _ = control::apply(
                        &link,
                        Some(Direction::Forward),
                        None,
                        &point.forward_changes(),
                    );
                    let _ = control::apply(
                        &link,
                        Some(Direction::Reverse),
                        None,
                        &point.reverse_changes(),
                    );
                }
            })
            .expect("spawn the trace playback thread");
        Playback {
            stop,
            thread: Some(thread),
        }
    }

    /// Replaces both directions' links with a scenario's (its MTU stays as started).
    pub fn switch_to(&self, scenario: &Scenario) {
        self.link.set(Direction::Forward, scenario.forward.clone());
        self.link.set(Direction::Reverse, scenario.reverse.clone());
    }

    pub fn stats(&self) -> Stats {
        Stats {
            forward: self.link.stats(Direction::Forward),
            reverse: self.link.stats(Direction::Reverse),
        }
    }

    /// Stops and cleans up now (dropping does the same).
    pub fn shutdown(self) {}
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.control_server.take();
        self.forwarder.take();
        self.tuns.clear();
        for namespace in self.created.drain(..) {
            netns::delete(&namespace);
        }
        if let Some(path) = &self.config.control_socket {
            let _ = std::fs::remove_file(path);
        }
        self.janitor.take();
    }
}
