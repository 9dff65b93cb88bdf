//! Incoming migrations (this appliance as destination) as the control thread keeps
//! them: listed, followed, cancelled and counted like outgoing ones.
//!
//! The destination thread receives sessions (several at once, `receiver.rs`). For each
//! it hands the control thread the session's [`ReceiveProgress`] and its cancel flag
//! ([`IncomingEvent::Started`]), then the outcome ([`IncomingEvent::Ended`]). A
//! connection becomes a migration, with an id from the daemon's one sequence, once its
//! handshake is accepted; a connection that never got that far (a port scanner, a
//! refused source) is only logged.

use dwcp_api::MigrationInfo;
use dwcp_dataplane::engine::{IncomingProgress, ReceiveProgress, SecurityReport};
use dwcp_dataplane::memory::PAGE_SIZE;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the destination thread tells the control thread.
pub enum IncomingEvent {
    /// A connection is being received.
    Started {
        /// The session's number on the destination thread.
        session: u64,
        /// Kept current by the receiving engine.
        progress: Arc<ReceiveProgress>,
        /// Set to make it give up (the source is told and keeps its guest).
        cancel: Arc<AtomicBool>,
        /// The VM it goes into, if any.
        vm: Option<String>,
    },
    /// Session `session` ended.
    Ended {
        /// As in `Started`.
        session: u64,
        /// What it gave.
        result: Result<Received, String>,
    },
}

/// A completed incoming migration.
#[derive(Debug, Clone)]
pub struct Received {
    /// Pages the destination verified.
    pub verified_pages: u64,
    /// The final round's number.
    pub final_round: u64,
    /// Bytes received on data streams.
    pub bytes: u64,
}

/// One incoming migration.
struct Incoming {
    cancel: Arc<AtomicBool>,
    latest: IncomingProgress,
    started: Instant,
    ended: Option<Instant>,
    state: &'static str,
    error: Option<String>,
    received: Option<Received>,
    /// The mode it ended in.
    mode: Option<String>,
    vm: Option<String>,
    /// Receive rate: the bytes at the last mark, and when.
    rate_mark: (Instant, u64),
    rate: f64,
}

/// Outcomes, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct IncomingCounts {
    /// Completed (verified).
    pub completed: u64,
    /// Failed.
    pub failed: u64,
    /// Cancelled at this destination.
    pub cancelled: u64,
}

/// The incoming migrations, and the connections being received now.
#[derive(Default)]
pub struct IncomingBook {
    /// The sessions in progress, by number: their progress, cancel flag, VM, and id
    /// once each is a migration.
    current: BTreeMap<u64, Current>,
    migrations: BTreeMap<u64, Incoming>,
    counts: IncomingCounts,
}

struct Current {
    progress: Arc<ReceiveProgress>,
    cancel: Arc<AtomicBool>,
    vm: Option<String>,
    id: Option<u64>,
    started: Instant,
}

/// How long a receive rate is measured over.
const RATE_SPAN: Duration = Duration::from_secs(1);

impl IncomingBook {
    /// Take an event from the destination thread; `next_id` is the daemon's id sequence.
    pub fn on_event(&mut self, event: IncomingEvent, next_id: &mut u64, mode: &str) {
        match event {
            IncomingEvent::Started {
                session,
                progress,
                cancel,
                vm,
            } => {
                self.current.insert(
                    session,
                    Current {
                        progress,
                        cancel,
                        vm,
                        id: None,
                        started: Instant::now(),
                    },
                );
            }
            IncomingEvent::Ended { session, result } => {
                self.refresh(next_id);
                let Some(current) = self.current.remove(&session) else {
                    return;
                };
                let Some(id) = current.id else { return };
                let Some(m) = self.migrations.get_mut(&id) else {
                    return;
                };
                m.ended = Some(Instant::now());
                m.mode = Some(mode.to_string());
                match result {
                    Ok(received) => {
                        m.state = "completed";
                        self.counts.completed += 1;
                        m.received = Some(received);
                    }
                    Err(e) => {
                        // Acquire: pairs with the Release store of `cancel`.
                        if m.cancel.load(Ordering::Acquire) {
                            m.state = "cancelled";
                            self.counts.cancelled += 1;
                        } else {
                            m.state = "failed";
                            self.counts.failed += 1;
                        }
                        m.error = Some(e);
                    }
                }
            }
        }
    }

    /// Take the receiving engine's latest figures; a connection whose handshake was
    /// accepted becomes a migration.
    pub fn refresh(&mut self, next_id: &mut u64) {
        for current in self.current.values_mut() {
            Self::refresh_one(&mut self.migrations, current, next_id);
        }
    }

    fn refresh_one(
        migrations: &mut BTreeMap<u64, Incoming>,
        current: &mut Current,
        next_id: &mut u64,
    ) {
        let latest = current.progress.snapshot();
        if current.id.is_none() {
            if matches!(latest.phase, "" | "handshake") {
                return;
            }
            let id = *next_id;
            *next_id += 1;
            current.id = Some(id);
            migrations.insert(
                id,
                Incoming {
                    cancel: current.cancel.clone(),
                    latest: IncomingProgress::default(),
                    started: current.started,
                    ended: None,
                    state: "running",
                    error: None,
                    received: None,
                    mode: None,
                    vm: current.vm.clone(),
                    rate_mark: (Instant::now(), 0),
                    rate: 0.0,
                },
            );
        }
        let Some(m) = current.id.and_then(|id| migrations.get_mut(&id)) else {
            return;
        };
        let now = Instant::now();
        let (mark, bytes) = m.rate_mark;
        let span = now.duration_since(mark);
        if span >= RATE_SPAN {
            m.rate = latest.bytes.saturating_sub(bytes) as f64 / span.as_secs_f64();
            m.rate_mark = (now, latest.bytes);
        }
        m.latest = latest;
    }

    /// Cancel incoming migration `id`, if it is one (`None` when it is not incoming).
    pub fn cancel(&self, id: u64) -> Option<Result<(), String>> {
        let m = self.migrations.get(&id)?;
        if m.state != "running" {
            return Some(Err(format!("migration {id} is {}, not running", m.state)));
        }
        // Release: pairs with the Acquire in the receiving coordinator's loop.
        m.cancel.store(true, Ordering::Release);
        Some(Ok(()))
    }

    /// Whether `id` is an incoming migration.
    pub fn contains(&self, id: u64) -> bool {
        self.migrations.contains_key(&id)
    }

    /// Incoming migrations running now.
    pub fn running(&self) -> usize {
        self.migrations
            .values()
            .filter(|m| m.state == "running")
            .count()
    }

    /// Outcomes so far.
    pub fn counts(&self) -> IncomingCounts {
        self.counts
    }

    /// What `migrations` shows of each, `mode` being the daemon's mode now.
    pub fn infos(&self, mode: &str) -> Vec<MigrationInfo> {
        self.migrations
            .iter()
            .map(|(&id, m)| info(id, m, mode))
            .collect()
    }
}

fn info(id: u64, m: &Incoming, mode: &str) -> MigrationInfo {
    let p = &m.latest;
    let memory_pages = p.memory_bytes / PAGE_SIZE as u64;
    let received = m.received.as_ref();
    MigrationInfo {
        id,
        direction: "incoming".into(),
        peer: p.peer.map_or(String::new(), |a| a.to_string()),
        session: if p.opened {
            SecurityReport::describe(p.security.as_ref())
        } else {
            String::new()
        },
        link_forecast: None,
        path_flag: None,
        path_anomalies: 0,
        stream_flags: Vec::new(),
        stream_anomalies: 0,
        appliance: None,
        state: m.state.into(),
        phase: if m.state == "running" {
            p.phase.into()
        } else {
            "done".into()
        },
        activity: None,
        round: received.map_or(p.round, |r| r.final_round),
        memory_bytes: p.memory_bytes,
        // The bar: guest memory received at least once (round 0's pages, zero pages
        // included, cover all of it).
        round_pages: memory_pages,
        round_pages_queued: p.pages.min(memory_pages),
        round_pages_sent: p.pages.min(memory_pages),
        bytes_sent: received.map_or(p.bytes, |r| r.bytes.max(p.bytes)),
        pages_sent: p.pages,
        rate: if m.state == "running" { m.rate } else { 0.0 },
        dirty_rate: 0.0,
        eta_seconds: None,
        throttle: 0,
        elapsed_seconds: m
            .ended
            .unwrap_or_else(Instant::now)
            .duration_since(m.started)
            .as_secs_f64(),
        mode: m.mode.clone().unwrap_or_else(|| mode.to_string()),
        active_streams: p.streams,
        streams: p.streams,
        transport: String::new(),
        epoch: 0,
        ping_ms: None,
        components: Vec::new(),
        error: m.error.clone(),
        downtime_ms: None,
        estimated_downtime_ms: None,
        estimate_path_mbit: None,
        switchover: None,
        verified_pages: received.map(|r| r.verified_pages),
        audit_mismatched: None,
        audit_pages: Vec::new(),
        notes: m
            .vm
            .iter()
            .map(|vm| format!("into the QEMU VM behind {vm}"))
            .collect(),
        vm: None,
        settings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_becomes_a_migration_only_once_its_handshake_is_accepted() {
        let mut book = IncomingBook::default();
        let mut next_id = 7;
        let progress = Arc::new(ReceiveProgress::default());
        let cancel = Arc::new(AtomicBool::new(false));
        book.on_event(
            IncomingEvent::Started {
                session: 1,
                progress: progress.clone(),
                cancel: cancel.clone(),
                vm: None,
            },
            &mut next_id,
            "datacenter",
        );
        book.refresh(&mut next_id);
        assert!(
            book.infos("x").is_empty(),
            "a bare connection is no migration"
        );
        // A connection that never finished its handshake leaves nothing behind.
        book.on_event(
            IncomingEvent::Ended {
                session: 1,
                result: Err("timed out".into()),
            },
            &mut next_id,
            "datacenter",
        );
        assert!(book.infos("x").is_empty());
        assert_eq!(next_id, 7);
    }
}
