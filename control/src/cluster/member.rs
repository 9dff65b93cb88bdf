//! The daemon's membership: the raft node, its network, and the operators' writes
//! waiting for their entries to apply.
//!
//! The control thread owns it. It ticks it on the control loop's 100 ms ticker, hands
//! it what the network received, and calls [`Member::pump`] after each event: raft's
//! ready work is done, messages go to the peers' sender threads, and the writes whose
//! entries this appliance has applied (or that waited too long) come back to be
//! answered. An operator's write is answered only once applied here, so a `dwcpctl
//! flags` that returns has changed the flags on a majority and on this appliance.

use super::log::Durability;
use super::node::{ClusterError, ClusterNode};
use super::peers::PeerNet;
use super::state::{ClusterState, Command};
use crate::config::ClusterPlan;
use crossbeam::channel::{Receiver, Sender};
use dwcp_api::{ClusterInfo, ClusterMemberInfo, Response};
use dwcp_dataplane::security::Identity;
use raft::prelude::Message;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long an operator's write may wait for its entry to apply before it is answered
/// with an error (raft may still apply it later).
pub const WRITE_WAIT: Duration = Duration::from_secs(3);

/// What an operator asked for, so the daemon can answer in kind once it applies.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteKind {
    /// `flags NAME VALUE`: answered with the flags.
    Flag,
    /// `cluster budget`: answered with a sentence.
    Budget,
}

/// An operator's write waiting for its entry.
pub struct PendingWrite {
    proposal: u64,
    deadline: Instant,
    /// Where the answer goes.
    pub reply: Sender<Response>,
    /// What was asked.
    pub kind: WriteKind,
}

/// This appliance as a cluster member.
pub struct Member {
    plan: ClusterPlan,
    node: ClusterNode,
    net: PeerNet,
    pending: Vec<PendingWrite>,
}

impl Member {
    /// Opens the raft log and starts the network.
    pub fn start(plan: ClusterPlan, identity: Option<Arc<Identity>>) -> Result<Member, String> {
        let founders: Vec<u64> = plan.members.keys().copied().collect();
        let node = ClusterNode::open(plan.id, &plan.dir, &founders, Durability::Fsync)
            .map_err(|e| format!("cluster: {e}"))?;
        let net = PeerNet::start(plan.id, plan.listen, &plan.members, identity)?;
        Ok(Member {
            plan,
            node,
            net,
            pending: Vec::new(),
        })
    }

    /// Messages from the other members (for the control loop's `select!`).
    pub fn inbound(&self) -> Receiver<Message> {
        self.net.inbound.clone()
    }

    /// Reports on snapshots sent (for the control loop's `select!`).
    pub fn snapshot_reports(&self) -> Receiver<(u64, bool)> {
        self.net.snapshot_reports.clone()
    }

    /// One tick of the cluster's clock (100 ms).
    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// A message another member sent.
    pub fn receive(&mut self, message: Message) {
        // A message raft cannot use (from a member removed since, say) is dropped.
        let _ = self.node.step(message);
    }

    /// Whether a snapshot reached `to`.
    pub fn snapshot_sent(&mut self, to: u64, delivered: bool) {
        self.node.report_snapshot(to, delivered);
    }

    /// Proposes `command`; the answer goes to `reply` once it applies here (or fails).
    pub fn write(&mut self, command: &Command, kind: WriteKind, reply: Sender<Response>) {
        match self.node.propose(command) {
            Ok(proposal) => self.pending.push(PendingWrite {
                proposal,
                deadline: Instant::now() + WRITE_WAIT,
                reply,
                kind,
            }),
            Err(e) => {
                let _ = reply.try_send(Response::error(describe(&e)));
            }
        }
    }

    /// Proposes `command` with no one waiting for it (a migration's record): lost if
    /// the cluster has no leader now, and written again with the next report.
    pub fn record(&mut self, command: &Command) {
        let _ = self.node.propose(command);
    }

    /// This appliance's id in the cluster.
    pub fn id(&self) -> u64 {
        self.plan.id
    }

    /// Does raft's ready work; returns the writes now applied (`Ok`) or given up on.
    pub fn pump(&mut self) -> Vec<(PendingWrite, Result<(), String>)> {
        let mut answered = Vec::new();
        match self.node.process() {
            Ok(messages) => {
                for message in messages {
                    self.net.send(message);
                }
            }
            Err(e) => eprintln!("dwcpd: cluster: {e}"),
        }
        let applied = self.node.take_applied_proposals();
        let now = Instant::now();
        let mut waiting = Vec::new();
        for write in self.pending.drain(..) {
            if applied.contains(&write.proposal) {
                answered.push((write, Ok(())));
            } else if now >= write.deadline {
                answered.push((
                    write,
                    Err(format!(
                        "not applied within {} s: the cluster may have lost its leader or a majority (see `dwcpctl cluster status`); it may still apply",
                        WRITE_WAIT.as_secs()
                    )),
                ));
            } else {
                waiting.push(write);
            }
        }
        self.pending = waiting;
        answered
    }

    /// The replicated state as applied here.
    pub fn state(&self) -> &ClusterState {
        self.node.state()
    }

    /// `cluster-status`.
    pub fn info(&self) -> ClusterInfo {
        let status = self.node.status();
        let log = self.node.log();
        let counters = &self.net.counters;
        ClusterInfo {
            enabled: true,
            id: status.id,
            role: status.role.into(),
            leader: status.leader,
            term: status.term,
            commit: status.commit,
            applied: status.applied,
            last_index: status.last_index,
            members: status
                .members
                .iter()
                .map(|&id| ClusterMemberInfo {
                    id,
                    address: self
                        .plan
                        .members
                        .get(&id)
                        .map_or_else(|| "(unknown)".into(), |a| a.to_string()),
                    lag: status
                        .follower_lag
                        .iter()
                        .find(|(member, _)| *member == id)
                        .map(|(_, lag)| *lag)
                        .or((status.role == "leader" && id == status.id).then_some(0)),
                })
                .collect(),
            budget_bits_per_second: self.state().budget_bits_per_second,
            migration_records: self.state().migrations.len() as u64,
            ticks: self.node.ticks(),
            election_ticks: super::node::ELECTION_TICKS as u64,
            log_bytes: log.file_bytes(),
            log_syncs: log.syncs,
            log_sync_ms_mean: if log.syncs > 0 {
                log.sync_seconds * 1e3 / log.syncs as f64
            } else {
                0.0
            },
            messages_sent: counters.sent.load(Ordering::Relaxed),
            messages_received: counters.received.load(Ordering::Relaxed),
            messages_dropped: counters.dropped.load(Ordering::Relaxed),
            connections_refused: counters.refused.load(Ordering::Relaxed),
        }
    }

    /// Stops the network; the log is synced already.
    pub fn stop(self) {
        for write in self.pending {
            let _ = write
                .reply
                .try_send(Response::error("the daemon is shutting down"));
        }
        self.net.stop();
    }
}

/// A refusal in the operator's words.
fn describe(e: &ClusterError) -> String {
    format!("cluster: {e}")
}
