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
use super::peers::{JoinAnswer, JoinRequest, PeerNet};
use super::state::{ClusterState, Command};
use crate::config::ClusterPlan;
use crossbeam::channel::{Receiver, Sender};
use dwcp_api::{ClusterInfo, ClusterMemberInfo, Response};
use dwcp_dataplane::security::Identity;
use raft::prelude::Message;
use std::collections::BTreeMap;
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
    /// `mode`: answered with a sentence.
    Mode,
    /// `cluster add|leave`: answered with a sentence.
    Membership,
    /// An appliance's join request (through the raft port): answered with every
    /// member's address, the new one's included.
    Join(BTreeMap<u64, String>),
}

/// What an operator's read is for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadKind {
    /// `cluster migrations`: the records.
    Records,
    /// `migrations`: this appliance's own, then the other members' records.
    Migrations,
}

/// An operator's read waiting for the leader's word and this member's log to catch up.
pub struct PendingRead {
    /// What was asked.
    pub kind: ReadKind,
    request: u64,
    /// The index to have applied, once the leader has answered.
    index: Option<u64>,
    deadline: Instant,
    /// Where the answer goes.
    pub reply: Sender<Response>,
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
    /// Writes made while this member knew no leader (an election, or a member that
    /// joined a moment ago): proposed once one is known, refused after `WRITE_WAIT`.
    leaderless: Vec<(Command, WriteKind, Sender<Response>, Instant)>,
    reads: Vec<PendingRead>,
    /// The tick at which each other member was last heard from.
    last_heard: BTreeMap<u64, u64>,
    /// Records this member (as leader) marked interrupted, by key and the round then.
    marked: BTreeMap<u64, u64>,
}

impl Member {
    /// Opens the raft log and starts the network.
    pub fn start(plan: ClusterPlan, identity: Option<Arc<Identity>>) -> Result<Member, String> {
        // A joining member founds nothing: the leader's log tells it who the members are.
        let founders: BTreeMap<u64, String> = if plan.join {
            BTreeMap::new()
        } else {
            plan.members
                .iter()
                .map(|(id, address)| (*id, address.to_string()))
                .collect()
        };
        let node = ClusterNode::open(plan.id, &plan.dir, &founders, Durability::Fsync)
            .map_err(|e| format!("cluster: {e}"))?;
        let net = PeerNet::start(plan.id, plan.listen, &plan.members, identity)?;
        Ok(Member {
            plan,
            node,
            net,
            pending: Vec::new(),
            leaderless: Vec::new(),
            reads: Vec::new(),
            last_heard: BTreeMap::new(),
            marked: BTreeMap::new(),
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
        self.last_heard.insert(message.from, self.node.ticks());
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
            Err(ClusterError::NotLeader { leader: 0 }) => {
                // Refused now if it could never apply; else it waits for a leader.
                if let Err(why) = command.check(self.node.state()) {
                    let _ = reply.try_send(Response::error(describe(&ClusterError::Refused(why))));
                    return;
                }
                self.leaderless
                    .push((command.clone(), kind, reply, Instant::now() + WRITE_WAIT));
            }
            proposal => self.wait_for(proposal, kind, reply),
        }
    }

    /// Writes that waited for a leader: proposed once one is known; refused (saying
    /// why) once they have waited too long.
    fn retry_leaderless(&mut self) {
        if self.leaderless.is_empty() {
            return;
        }
        let now = Instant::now();
        for (command, kind, reply, deadline) in std::mem::take(&mut self.leaderless) {
            match self.node.propose(&command) {
                Err(ClusterError::NotLeader { leader: 0 }) if now < deadline => {
                    self.leaderless.push((command, kind, reply, deadline));
                }
                proposal => self.wait_for(proposal, kind, reply),
            }
        }
    }

    /// A proposal made for an operator: waits for its entry, or is refused now.
    fn wait_for(
        &mut self,
        proposal: Result<u64, ClusterError>,
        kind: WriteKind,
        reply: Sender<Response>,
    ) {
        match proposal {
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

    /// Proposes adding member `id` at `address`, or removing it (`None`); answered once
    /// applied here.
    pub fn change_membership(&mut self, id: u64, address: Option<&str>, reply: Sender<Response>) {
        if let Some(address) = address
            && address.parse::<std::net::SocketAddr>().is_err()
        {
            let _ = reply.try_send(Response::error(format!(
                "cluster: {address:?} is not an address like 10.0.0.4:7401"
            )));
            return;
        }
        let proposal = self.node.propose_membership(id, address);
        self.wait_for(proposal, WriteKind::Membership, reply);
    }

    /// An appliance asks to join. The leader adds it and answers, once the change has
    /// applied here, with every member's address; another member names the leader; an
    /// appliance already a member at that address gets the addresses again (its join
    /// was retried), one whose id another holds is refused.
    pub fn join_request(&mut self, request: JoinRequest) {
        let JoinRequest {
            id, address, from, ..
        } = &request;
        eprintln!("dwcpd: cluster: appliance {id} asks to join from {from} (raft at {address})");
        let book = self.address_book();
        let status = self.node.status();
        if self.node.leading().is_none() {
            // No leader known (this member joined a moment ago, or an election runs):
            // neither field, and the appliance asks again shortly.
            let _ = request.reply.try_send(Response::ok(JoinAnswer {
                members: BTreeMap::new(),
                leader: book.get(&status.leader).cloned(),
            }));
            return;
        }
        if status.members.contains(id) {
            let answer = match book.get(id) {
                Some(known) if known == address => Response::ok(JoinAnswer {
                    members: book,
                    leader: None,
                }),
                known => Response::error(format!(
                    "cluster: appliance id {id} is taken (by the member at {}): give this appliance another id",
                    known.map_or("an unknown address", String::as_str)
                )),
            };
            let _ = request.reply.try_send(answer);
            return;
        }
        if address.parse::<std::net::SocketAddr>().is_err() {
            let _ = request.reply.try_send(Response::error(format!(
                "cluster: {address:?} is not an address like 10.0.0.4:7401"
            )));
            return;
        }
        let mut members = book;
        members.insert(*id, address.clone());
        let proposal = self.node.propose_membership(*id, Some(address));
        self.wait_for(proposal, WriteKind::Join(members), request.reply);
    }

    /// Every member's raft address as this member knows them (configured, or in the
    /// replicated state), its own included.
    pub fn address_book(&self) -> BTreeMap<u64, String> {
        self.node
            .status()
            .members
            .into_iter()
            .filter_map(|id| {
                let address = if id == self.plan.id {
                    Some(self.plan.listen.to_string())
                } else {
                    self.plan
                        .members
                        .get(&id)
                        .map(|a| a.to_string())
                        .or_else(|| self.state().addresses.get(&id).cloned())
                };
                Some((id, address?))
            })
            .collect()
    }

    /// Sends to and takes messages from the members at these addresses (what a join
    /// request was answered with).
    pub fn add_peers(&mut self, members: &BTreeMap<u64, String>) {
        for (&id, address) in members {
            match address.parse() {
                Ok(address) => {
                    if let Err(e) = self.net.add_peer(id, address) {
                        eprintln!("dwcpd: cluster: member {id}: {e}");
                    }
                }
                Err(_) => eprintln!("dwcpd: cluster: member {id} at {address:?}: not an address"),
            }
        }
    }

    /// Appliances asking to join (for the control loop's `select!`).
    pub fn join_requests(&self) -> Receiver<JoinRequest> {
        self.net.join_requests.clone()
    }

    /// A read that must be current (`cluster migrations`): answered by
    /// [`Member::pump`] once the leader has confirmed the read index and this member
    /// has applied up to it.
    pub fn read(&mut self, kind: ReadKind, reply: Sender<Response>) {
        let request = self.node.request_read();
        self.reads.push(PendingRead {
            kind,
            request,
            index: None,
            deadline: Instant::now() + WRITE_WAIT,
            reply,
        });
    }

    /// Reads now current (answer them from [`Member::state`]), and the ones given up on.
    pub fn take_reads(&mut self) -> Vec<(PendingRead, Result<(), String>)> {
        for (request, index) in self.node.take_read_states() {
            if let Some(read) = self.reads.iter_mut().find(|r| r.request == request) {
                read.index = Some(index);
            }
        }
        let applied = self.node.applied();
        settle(
            &mut self.reads,
            |read| read.index.is_some_and(|i| applied >= i),
            |read| read.deadline,
            || {
                format!(
                    "no current view within {} s: this appliance cannot reach the cluster's leader (see `dwcpctl cluster status`)",
                    WRITE_WAIT.as_secs()
                )
            },
        )
    }

    /// As leader: the running migrations of members not heard from for two election
    /// timeouts are recorded `interrupted` (at `now_unix`, this appliance's clock, which
    /// goes into the log as it is). A member that comes back records its own again.
    pub fn mark_silent_members(&mut self, now_unix: u64) {
        if self.node.leading().is_none() {
            return;
        }
        let ticks = self.node.ticks();
        let silent_after = 2 * super::node::ELECTION_TICKS as u64;
        let silent: Vec<u64> = self
            .node
            .status()
            .members
            .into_iter()
            .filter(|&m| m != self.plan.id)
            .filter(|m| {
                ticks.saturating_sub(self.last_heard.get(m).copied().unwrap_or(0)) > silent_after
            })
            .collect();
        let to_mark: Vec<_> = self
            .node
            .state()
            .migrations
            .iter()
            .filter(|(_, r)| r.state == "running" && silent.contains(&r.source))
            .filter(|(key, r)| self.marked.get(key) != Some(&r.round))
            .map(|(key, r)| (*key, r.clone()))
            .collect();
        for (key, mut record) in to_mark {
            self.marked.insert(key, record.round);
            record.state = "interrupted".into();
            record.interrupted_at = Some(now_unix);
            let _ = self.node.propose(&Command::PutMigration(record));
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

    /// Where this appliance takes raft messages.
    pub fn listen(&self) -> std::net::SocketAddr {
        self.net.local
    }

    /// Does raft's ready work; returns the writes now applied (`Ok`) or given up on.
    pub fn pump(&mut self) -> Vec<(PendingWrite, Result<(), String>)> {
        self.retry_leaderless();
        match self.node.process() {
            Ok(messages) => {
                for message in messages {
                    self.net.send(message);
                }
            }
            Err(e) => eprintln!("dwcpd: cluster: {e}"),
        }
        // Members that joined get messages; those that left, none.
        for (member, address) in self.node.take_membership_changes() {
            match address.and_then(|a| a.parse().ok()) {
                Some(address) => {
                    if let Err(e) = self.net.add_peer(member, address) {
                        eprintln!("dwcpd: cluster: member {member}: {e}");
                    }
                }
                None => self.net.remove_peer(member),
            }
        }
        // A member that joined learns the others' addresses from a snapshot, not from
        // their changes.
        let known: Vec<(u64, std::net::SocketAddr)> = self
            .node
            .state()
            .addresses
            .iter()
            .filter_map(|(m, a)| Some((*m, a.parse().ok()?)))
            .collect();
        for (member, address) in known {
            let _ = self.net.add_peer(member, address);
        }
        let applied = self.node.take_applied_proposals();
        settle(
            &mut self.pending,
            |write| applied.contains(&write.proposal),
            |write| write.deadline,
            || {
                format!(
                    "not applied within {} s: the cluster may have lost its leader or a majority (see `dwcpctl cluster status`); it may still apply",
                    WRITE_WAIT.as_secs()
                )
            },
        )
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
                        .map(|a| a.to_string())
                        .or_else(|| self.state().addresses.get(&id).cloned())
                        .unwrap_or_else(|| "(unknown)".into()),
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
        for (_, _, reply, _) in self.leaderless {
            let _ = reply.try_send(Response::error("the daemon is shutting down"));
        }
        self.net.stop();
    }
}

/// Takes out of `waiting` what `done` says is answered (`Ok`) and what is past its
/// `deadline` (`Err`, saying `why`), in order; the rest stays.
fn settle<T>(
    waiting: &mut Vec<T>,
    done: impl Fn(&T) -> bool,
    deadline: impl Fn(&T) -> Instant,
    why: impl Fn() -> String,
) -> Vec<(T, Result<(), String>)> {
    let now = Instant::now();
    let mut settled = Vec::new();
    for item in std::mem::take(waiting) {
        if done(&item) {
            settled.push((item, Ok(())));
        } else if now >= deadline(&item) {
            settled.push((item, Err(why())));
        } else {
            waiting.push(item);
        }
    }
    settled
}

/// A refusal in the operator's words.
fn describe(e: &ClusterError) -> String {
    format!("cluster: {e}")
}
