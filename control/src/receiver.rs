//! The destination thread: takes incoming sessions on the migration port until the
//! daemon stops, and tells the control thread about each ([`IncomingEvent`]).
//!
//! Into this process's memory, sessions run at once (up to `[dest] max_sessions`, their
//! memory together within `[dest] max_memory`): the port's dispatcher
//! ([`engine::SessionPorts`]) hands each new connection to a thread of its own and
//! routes data streams, and returning sources' resumes, to their sessions. Into a
//! memory file or the incoming VM (one of each), sessions run one at a time through
//! the port's gate, and whoever comes meanwhile hears `busy`.

use crate::incoming::{IncomingEvent, Received};
use crossbeam::channel::Sender;
use dwcp_dataplane::engine::{
    self, Acceptor, DestMemory, DestReport, MigrationError, ReceiveProgress, SessionPorts,
};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The destination's cancel flags: one for the daemon's stop, and each session's own
/// (which the operator's `cancel` sets through the control thread).
#[derive(Clone, Default)]
pub(crate) struct DestCancel {
    all: Arc<AtomicBool>,
    /// The sessions in progress, by number: their cancel flags and what they have done.
    sessions: Arc<Mutex<BTreeMap<u64, SessionFlags>>>,
}

/// A receiving session's cancel flag and progress.
type SessionFlags = (Arc<AtomicBool>, Arc<ReceiveProgress>);

impl DestCancel {
    /// A flag for session `number`, set already when everything is cancelled.
    fn start(&self, number: u64, progress: &Arc<ReceiveProgress>) -> Arc<AtomicBool> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        // Acquire: pairs with the Release in `cancel_all` (under the same lock, so a
        // session started after it sees it).
        let flag = Arc::new(AtomicBool::new(self.all.load(Ordering::Acquire)));
        sessions.insert(number, (flag.clone(), progress.clone()));
        flag
    }

    /// Session `number` ended.
    fn end(&self, number: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(&number);
    }

    /// Make every session give up, those in progress and any later one.
    pub(crate) fn cancel_all(&self) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        self.all.store(true, Ordering::Release);
        for (flag, _) in sessions.values() {
            // Release: pairs with the Acquire in the receiving coordinator's loop.
            flag.store(true, Ordering::Release);
        }
    }

    /// Stop the sessions only waiting for a source to say hello: at shutdown they have
    /// nothing to drain.
    pub(crate) fn cancel_waiting(&self) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for (flag, progress) in sessions.values() {
            if matches!(progress.snapshot().phase, "" | "handshake") {
                // Release: pairs with the Acquire in the gate's loop.
                flag.store(true, Ordering::Release);
            }
        }
    }
}

/// What the destination thread works with.
pub(crate) struct DestThread<'a> {
    pub config: engine::DestConfig,
    pub app_config: &'a crate::config::Config,
    pub security: &'a crate::config::SessionSecurityConfig,
    /// The incoming VM's QMP socket, when sessions go into a VM.
    pub vm_qmp: Option<std::path::PathBuf>,
    pub shutdown: &'a AtomicBool,
    pub cancel: &'a DestCancel,
    pub events: &'a Sender<IncomingEvent>,
}

impl DestThread<'_> {
    /// Take incoming migrations on `listener` until shutdown.
    pub(crate) fn run(mut self, listener: TcpListener) {
        let into_own_memory = self.vm_qmp.is_none()
            && matches!(
                crate::appliance::incoming_memory(self.app_config),
                Ok(DestMemory::Allocate(_))
            );
        if into_own_memory {
            self.at_once(&listener);
        } else {
            self.one_at_a_time(&listener);
        }
    }

    /// Whether a connection waits on `listener` (up to 200 ms).
    fn readable(listener: &TcpListener) -> bool {
        let mut fds = [libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the call's duration.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 200) > 0 }
    }

    /// The identity is loaded again whenever connections come: replaced certificates
    /// apply to the next session without a restart. Files that no longer load keep the
    /// last good identity (and say so).
    fn reload_identity(&mut self) {
        match self.security.identity() {
            Ok(identity) => self.config.security = identity,
            Err(e) => eprintln!("dwcpd: {e}; sessions keep the certificates loaded before"),
        }
    }

    /// Session `number` begins (into `vm`, if any): its progress and cancel flag, which
    /// the control thread is given.
    fn begin(&self, number: u64, vm: Option<String>) -> (Arc<ReceiveProgress>, Arc<AtomicBool>) {
        let progress = Arc::new(ReceiveProgress::default());
        let cancel = self.cancel.start(number, &progress);
        let _ = self.events.send(IncomingEvent::Started {
            session: number,
            progress: progress.clone(),
            cancel: cancel.clone(),
            vm,
        });
        (progress, cancel)
    }

    /// Sessions into this process's memory, several at once.
    fn at_once(&mut self, listener: &TcpListener) {
        let mut ports = SessionPorts::new(listener, self.app_config.dest.max_sessions);
        let never = AtomicBool::new(false);
        let mut loaded_at: Option<Instant> = None;
        std::thread::scope(|scope| {
            loop {
                // Stopping, the dispatcher goes on while sessions drain: their data
                // streams (a session still opening its last ones) and resumes come
                // through it. New sessions are refused meanwhile.
                let stopping = self.shutdown.load(Ordering::Acquire);
                if stopping && ports.lanes() == 0 {
                    break;
                }
                // Pending connections first: a stream accepted before its hello came must
                // not wait out the listener's poll.
                if !ports.has_pending() && !Self::readable(listener) {
                    continue;
                }
                // Loaded for a session that comes to an idle destination, as one at a
                // time does; while sessions run (their data streams arriving), at most
                // once a second.
                if ports.lanes() == 0
                    || loaded_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    self.reload_identity();
                    ports.set_identity(self.config.security.clone());
                    loaded_at = Some(Instant::now());
                }
                let Some(mut lane) = ports.dispatch(
                    Duration::from_millis(50),
                    self.config.handshake_timeout,
                    &never,
                ) else {
                    continue;
                };
                if stopping {
                    lane.refuse("this destination is shutting down");
                    continue;
                }
                let number = lane.number();
                let (progress, cancel) = self.begin(number, None);
                let config = self.config.clone();
                let (events, sessions) = (self.events, self.cancel);
                let spawned = std::thread::Builder::new()
                    .name(format!("dwcp-recv-{number}"))
                    .spawn_scoped(scope, move || {
                        let result = engine::receive_lane(
                            &mut lane,
                            DestMemory::Allocate(dwcp_hugepages::PagePreference::TransparentHuge),
                            &config,
                            &cancel,
                            &progress,
                        );
                        // Its routes and admitted memory go before it is reported.
                        drop(lane);
                        let outcome = outcome(&progress, result.map_err(|e| (e.to_string(), e)));
                        end(sessions, events, number, outcome);
                    });
                if let Err(e) = spawned {
                    eprintln!("dwcpd: cannot start a thread for an incoming session: {e}");
                    end(self.cancel, self.events, number, Err("no thread".into()));
                }
            }
        });
    }

    /// Sessions into a memory file or the incoming VM, one after another.
    fn one_at_a_time(&mut self, listener: &TcpListener) {
        // One gate for every session: what it sorted while a session ran (a second
        // source's control connection) waits there for the next.
        let mut gate = Acceptor::new(listener);
        let mut number = 0;
        while !self.shutdown.load(Ordering::Acquire) {
            if !gate.has_pending() && !Self::readable(listener) {
                continue;
            }
            self.reload_identity();
            let received_into = match &self.vm_qmp {
                // The incoming VM is opened for each session: once it runs a migrated
                // guest, the next session needs a new one (at the same QMP path).
                Some(qmp) => match crate::appliance::incoming_vm(self.app_config, qmp) {
                    Ok(opened) => Some(opened),
                    Err(e) => {
                        eprintln!("dwcpd: the incoming VM: {e}; a source with a VM is refused");
                        None
                    }
                },
                None => None,
            };
            number += 1;
            let vm = self.vm_qmp.as_ref().map(|p| p.display().to_string());
            let (progress, session_cancel) = self.begin(number, vm);
            let config = &self.config;
            let result = match received_into {
                Some((mut vm, memory)) => {
                    let name = vm.info().name.clone();
                    engine::receive_through(
                        &mut gate,
                        memory,
                        config,
                        &session_cancel,
                        Some(&mut vm),
                        &progress,
                    )
                    .map_err(|e| (format!("into VM {name:?}: {e}"), e))
                }
                // A session a restart left, `[dest] memory_file`, or memory of this
                // process.
                None => match crate::appliance::incoming_memory(self.app_config) {
                    Ok(memory) => engine::receive_through(
                        &mut gate,
                        memory,
                        config,
                        &session_cancel,
                        None,
                        &progress,
                    )
                    .map_err(|e| (e.to_string(), e)),
                    Err(e) => Err((e.clone(), MigrationError::Config(e))),
                },
            };
            end(self.cancel, self.events, number, outcome(&progress, result));
        }
    }
}

/// Session `number` ended with `result`: its cancel flag goes, and the control thread
/// hears it.
fn end(
    sessions: &DestCancel,
    events: &Sender<IncomingEvent>,
    number: u64,
    result: Result<Received, String>,
) {
    sessions.end(number);
    let _ = events.send(IncomingEvent::Ended {
        session: number,
        result,
    });
}

/// What a session's result tells the control thread (and the log).
fn outcome(
    progress: &ReceiveProgress,
    result: Result<DestReport, (String, MigrationError)>,
) -> Result<Received, String> {
    let seen = progress.snapshot();
    let from = seen
        .peer
        .map_or("an unknown peer".to_string(), |p| p.to_string());
    match result {
        Ok(report) => {
            let final_round = report.rounds.saturating_sub(1);
            eprintln!(
                "dwcpd: received a migration from {from}: final round {final_round}, {} \
                 pages verified; session {}",
                report.verified_pages,
                engine::SecurityReport::describe(report.security.as_ref())
            );
            Ok(Received {
                verified_pages: report.verified_pages,
                final_round,
                bytes: report.bytes,
            })
        }
        // A source back for a session already running here: that session took it.
        Err((text, MigrationError::PassedOn(_))) => Err(text),
        // Nobody came but connections that said nothing (a port scan): the gate
        // closed them; nothing to report.
        Err((text, _)) if seen.peer.is_none() => Err(text),
        Err((text, _)) => {
            eprintln!("dwcpd: incoming migration from {from} failed: {text}");
            Err(text)
        }
    }
}
