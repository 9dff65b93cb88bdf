//! One appliance's member of the cluster: raft-rs's `RawNode` over the durable log,
//! with the replicated state it applies. Sans-IO: the control thread feeds it ticks
//! and the messages other appliances sent, and sends the messages it returns; nothing
//! here opens a socket or reads a clock, so the simulated cluster in the tests runs
//! the same code as the daemon.
//!
//! [`ClusterNode::process`] handles one `Ready` the way raft requires: messages a
//! leader may send before its own write (appends to followers) go out at once; the
//! entries, hard state and snapshot are written and synced; only then the messages
//! that promise something about the log (votes, acknowledgements); committed entries
//! are applied in order (configuration changes to raft itself, commands to the state).

use super::log::{Durability, DurableLog};
use super::state::{ClusterState, Command};
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{Config, RawNode, StateRole, Storage};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Ticks without word from a leader before a follower stands for election.
pub const ELECTION_TICKS: usize = 10;
/// Ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 3;
/// Entries applied since the last snapshot that make the next one.
pub const SNAPSHOT_EVERY: u64 = 1_000;

/// Why a proposal or a step did not go through.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterError {
    /// Only the leader takes writes; this appliance knows of `leader` (0: none yet,
    /// as in a partitioned minority).
    NotLeader {
        /// The leader this appliance last heard from, 0 when none.
        leader: u64,
    },
    /// The command could not apply (an unknown flag, a bad value).
    Refused(String),
    /// The log could not be read or written.
    Storage(String),
    /// raft-rs refused (a message for another group, a proposal dropped while a
    /// leader hands over).
    Raft(String),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::NotLeader { leader: 0 } => write!(
                f,
                "no leader: this appliance cannot reach a majority of the cluster, so it takes no changes"
            ),
            ClusterError::NotLeader { leader } => {
                write!(
                    f,
                    "not the leader: appliance {leader} is; send the change there"
                )
            }
            ClusterError::Refused(why) => write!(f, "refused: {why}"),
            ClusterError::Storage(why) => write!(f, "raft log: {why}"),
            ClusterError::Raft(why) => write!(f, "raft: {why}"),
        }
    }
}

impl std::error::Error for ClusterError {}

/// What one member reports about itself and, as leader, about the others.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// This appliance's id.
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `pre-candidate`.
    pub role: &'static str,
    /// The leader it knows, 0 when none.
    pub leader: u64,
    /// The current term.
    pub term: u64,
    /// The highest log index known committed.
    pub commit: u64,
    /// The highest index applied to the state.
    pub applied: u64,
    /// The last index in this member's log.
    pub last_index: u64,
    /// Voting members.
    pub members: Vec<u64>,
    /// As leader: each follower's entries behind the leader's log.
    pub follower_lag: Vec<(u64, u64)>,
}

/// One member: raft, its log, the state applied from it.
pub struct ClusterNode {
    raw: RawNode<DurableLog>,
    state: ClusterState,
    applied: u64,
    snapshot_every: u64,
    next_proposal: u64,
    ticks: u64,
    next_read: u64,
    /// Members added or removed, not yet taken.
    membership_changes: Vec<(u64, Option<String>)>,
    /// The membership changed: snapshot at once.
    snapshot_now: bool,
    /// Read requests confirmed: (request id, the index to have applied first).
    read_states: Vec<(u64, u64)>,
    /// Proposals of this member applied, not yet taken.
    applied_proposals: Vec<u64>,
}

impl ClusterNode {
    /// Opens member `id` over the log in `dir`. A new log starts with `initial_members`
    /// (id and raft address) as the voters (every founding member must be given the
    /// same list; a member that joins later is given none and learns the configuration
    /// from the leader). An existing log resumes where it stopped, and
    /// `initial_members` is not used.
    pub fn open(
        id: u64,
        dir: &Path,
        initial_members: &BTreeMap<u64, String>,
        durability: Durability,
    ) -> Result<ClusterNode, ClusterError> {
        if id == 0 {
            return Err(ClusterError::Refused(
                "appliance id 0 is reserved by raft".into(),
            ));
        }
        let mut log = DurableLog::open(dir, durability).map_err(ClusterError::Storage)?;
        if log.is_empty() && !initial_members.is_empty() {
            // The founding configuration is a snapshot at index 1, not a configuration
            // set beside an empty log: the log a leader replicates then starts at 2,
            // and a member that joins later is sent that snapshot first, so it learns
            // who the founders are (entries alone would tell it only of itself).
            // The founders' addresses are in it too: a member that joins, or restarts
            // with no list of members in its configuration, finds them there.
            let mut founding = Snapshot::default();
            let state = ClusterState {
                addresses: initial_members.clone(),
                ..ClusterState::default()
            };
            founding.set_data(state.encode().into());
            let meta = founding.mut_metadata();
            meta.index = 1;
            meta.term = 1;
            meta.set_conf_state(ConfState {
                voters: initial_members.keys().copied().collect(),
                ..Default::default()
            });
            log.install(&founding).map_err(ClusterError::Storage)?;
            log.sync().map_err(ClusterError::Storage)?;
        }
        let snapshot = log.snapshot_ref().clone();
        let state = ClusterState::decode(snapshot.get_data()).map_err(ClusterError::Storage)?;
        let applied = snapshot.get_metadata().index;
        let config = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            // A leader that cannot hear a majority steps down (a partitioned minority
            // takes no writes), and a member cut off for a while does not disrupt the
            // others with a higher term when it returns.
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 64,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw =
            RawNode::new(&config, log, &logger).map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(ClusterNode {
            raw,
            state,
            applied,
            snapshot_every: SNAPSHOT_EVERY,
            next_proposal: 0,
            ticks: 0,
            next_read: 0,
            membership_changes: Vec::new(),
            snapshot_now: false,
            read_states: Vec::new(),
            applied_proposals: Vec::new(),
        })
    }

    /// Snapshots after this many applied entries (tests use small numbers).
    pub fn set_snapshot_every(&mut self, entries: u64) {
        self.snapshot_every = entries.max(1);
    }

    /// One tick of the cluster's clock.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.raw.tick();
    }

    /// Ticks since this member started (elections are timed in ticks).
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// A message another member sent.
    pub fn step(&mut self, message: Message) -> Result<(), ClusterError> {
        self.raw
            .step(message)
            .map_err(|e| ClusterError::Raft(e.to_string()))
    }

    /// Tells raft whether a snapshot message it returned reached member `to`: until
    /// then the leader sends that member nothing else, so a transport must report
    /// every snapshot it was given, delivered or not.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        self.raw.report_snapshot(
            to,
            if delivered {
                raft::SnapshotStatus::Finish
            } else {
                raft::SnapshotStatus::Failure
            },
        );
    }

    /// Proposes a command, on any member: a follower passes it to the leader it knows.
    /// Returns the proposal's id, which [`ClusterNode::take_applied_proposals`] names
    /// once this member has applied it.
    pub fn propose(&mut self, command: &Command) -> Result<u64, ClusterError> {
        if self.raw.raft.state != StateRole::Leader && self.raw.raft.leader_id == 0 {
            return Err(ClusterError::NotLeader { leader: 0 });
        }
        command.check(&self.state).map_err(ClusterError::Refused)?;
        self.next_proposal += 1;
        let id = self.request_id(self.next_proposal);
        self.raw
            .propose(id.to_le_bytes().to_vec(), command.encode())
            .map_err(|e| match e {
                raft::Error::ProposalDropped => ClusterError::NotLeader {
                    leader: self.raw.raft.leader_id,
                },
                other => ClusterError::Raft(other.to_string()),
            })?;
        Ok(id)
    }

    /// Asks for a read index: once the leader has confirmed it still leads, the read
    /// state comes back ([`ClusterNode::take_read_states`]) with the index this member
    /// must have applied for a read of its state to be current. Returns the request's
    /// id. Without a leader the request is dropped (the caller's wait ends it).
    pub fn request_read(&mut self) -> u64 {
        self.next_read += 1;
        let id = self.request_id(self.next_read);
        self.raw.read_index(id.to_le_bytes().to_vec());
        id
    }

    /// Read requests confirmed since last asked: (request id, index to apply first).
    pub fn take_read_states(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.read_states)
    }

    /// Ids of proposals made on this member that it has applied since last asked.
    pub fn take_applied_proposals(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.applied_proposals)
    }

    /// Proposes adding (`address`: where its raft messages go) or removing (`None`) a
    /// voting member. Leader only (raft-rs does not pass membership changes on).
    /// Returns the proposal's id, as [`ClusterNode::propose`] does.
    pub fn propose_membership(
        &mut self,
        member: u64,
        address: Option<&str>,
    ) -> Result<u64, ClusterError> {
        self.leader_only()?;
        if member == 0 {
            return Err(ClusterError::Refused(
                "appliance id 0 is reserved by raft".into(),
            ));
        }
        let add = address.is_some();
        let voters: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        if add == voters.contains(&member) {
            return Err(ClusterError::Refused(format!(
                "appliance {member} is {} a member",
                if add { "already" } else { "not" }
            )));
        }
        if !add && voters.len() == 1 {
            return Err(ClusterError::Refused(
                "the last member cannot leave: the cluster's state would have no home".into(),
            ));
        }
        if !add && member == self.raw.raft.id {
            // A leader that removes itself trips raft-rs (its own progress is gone while
            // it still persists entries): leadership moves to the most caught-up
            // follower first, and the new leader removes this one.
            let successor = self
                .raw
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != member && voters.contains(id))
                .max_by_key(|(_, progress)| progress.matched)
                .map(|(id, _)| *id);
            if let Some(successor) = successor {
                self.raw.transfer_leader(successor);
                return Err(ClusterError::Refused(format!(
                    "appliance {member} leads; leadership is moving to appliance {successor}: \
                     ask again in a moment (on the new leader)"
                )));
            }
        }
        self.next_proposal += 1;
        let id = self.request_id(self.next_proposal);
        let mut change = ConfChange {
            node_id: member,
            context: address.unwrap_or_default().as_bytes().to_vec().into(),
            id,
            ..Default::default()
        };
        change.set_change_type(if add {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::RemoveNode
        });
        self.raw
            .propose_conf_change(id.to_le_bytes().to_vec(), change)
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        Ok(id)
    }

    /// Members added (with their address) or removed (`None`) since last asked.
    pub fn take_membership_changes(&mut self) -> Vec<(u64, Option<String>)> {
        std::mem::take(&mut self.membership_changes)
    }

    /// An id for a proposal or read, unique across members and restarts: the member
    /// (whose own applied proposals [`ClusterNode::take_applied_proposals`] picks out by
    /// it), the term, a counter.
    fn request_id(&self, counter: u64) -> u64 {
        (self.raw.raft.id << 48) ^ (self.raw.raft.term << 24) ^ counter
    }

    fn leader_only(&self) -> Result<(), ClusterError> {
        if self.raw.raft.state == StateRole::Leader {
            Ok(())
        } else {
            Err(ClusterError::NotLeader {
                leader: self.raw.raft.leader_id,
            })
        }
    }

    /// Handles what raft has ready; returns the messages to send, in order.
    pub fn process(&mut self) -> Result<Vec<Message>, ClusterError> {
        let mut out = Vec::new();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut ready = self.raw.ready();
        out.extend(ready.take_messages());
        for read in ready.take_read_states() {
            if let Ok(id) = <[u8; 8]>::try_from(read.request_ctx.as_slice()) {
                self.read_states.push((u64::from_le_bytes(id), read.index));
            }
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.state =
                ClusterState::decode(snapshot.get_data()).map_err(ClusterError::Storage)?;
            self.applied = snapshot.get_metadata().index;
            self.raw
                .mut_store()
                .install(&snapshot)
                .map_err(ClusterError::Storage)?;
        }
        let committed = ready.take_committed_entries();
        self.raw
            .mut_store()
            .append(ready.entries())
            .map_err(ClusterError::Storage)?;
        if let Some(hard_state) = ready.hs() {
            let hard_state = hard_state.clone();
            self.raw
                .mut_store()
                .set_hard_state(&hard_state)
                .map_err(ClusterError::Storage)?;
        }
        self.raw.mut_store().sync().map_err(ClusterError::Storage)?;
        out.extend(ready.take_persisted_messages());
        self.apply(committed)?;
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .set_commit(commit)
                .map_err(ClusterError::Storage)?;
            self.raw.mut_store().sync().map_err(ClusterError::Storage)?;
        }
        out.extend(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.snapshot_if_due()?;
        Ok(out)
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ClusterError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            self.applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    // A new leader's empty entry carries nothing.
                    if !entry.get_data().is_empty() {
                        self.state.apply(entry.get_data());
                    }
                    self.note_proposal(entry.get_context());
                }
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(entry.get_data()).map_err(|e| {
                        ClusterError::Storage(format!(
                            "a bad membership change at {}: {e}",
                            entry.index
                        ))
                    })?;
                    let conf = self
                        .raw
                        .apply_conf_change(&change)
                        .map_err(|e| ClusterError::Raft(e.to_string()))?;
                    self.raw
                        .mut_store()
                        .set_conf_state(&conf)
                        .map_err(ClusterError::Storage)?;
                    let member = change.node_id;
                    // raft-rs takes a snapshot only if its configuration names the
                    // member: one taken now is what a member that joins is sent.
                    self.snapshot_now = true;
                    if change.get_change_type() == ConfChangeType::AddNode {
                        let address = String::from_utf8_lossy(change.get_context()).into_owned();
                        self.state.addresses.insert(member, address.clone());
                        self.membership_changes.push((member, Some(address)));
                    } else {
                        self.state.addresses.remove(&member);
                        self.membership_changes.push((member, None));
                    }
                    self.note_proposal(entry.get_context());
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(ClusterError::Raft(format!(
                        "entry {} is a joint membership change, which this appliance does not propose or take",
                        entry.index
                    )));
                }
            }
        }
        Ok(())
    }

    /// An applied entry's context names the proposal it came from; this member's own
    /// are kept for [`ClusterNode::take_applied_proposals`].
    fn note_proposal(&mut self, context: &[u8]) {
        if let Ok(id) = <[u8; 8]>::try_from(context) {
            let id = u64::from_le_bytes(id);
            if id >> 48 == self.raw.raft.id && self.applied_proposals.len() < 4096 {
                self.applied_proposals.push(id);
            }
        }
    }

    fn snapshot_if_due(&mut self) -> Result<(), ClusterError> {
        let since = self.applied - self.raw.store().snapshot_ref().get_metadata().index;
        if since >= self.snapshot_every || (self.snapshot_now && since > 0) {
            self.snapshot_now = false;
            let data = self.state.encode();
            let applied = self.applied;
            self.raw
                .mut_store()
                .compact(applied, data)
                .map_err(ClusterError::Storage)?;
        }
        Ok(())
    }

    /// The replicated state as this member has applied it.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The highest index applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The log underneath (its size, its syncs).
    pub fn log(&self) -> &DurableLog {
        self.raw.store()
    }

    /// Whether this member leads, and in which term.
    pub fn leading(&self) -> Option<u64> {
        (self.raw.raft.state == StateRole::Leader).then_some(self.raw.raft.term)
    }

    /// This member's view of the cluster.
    pub fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let last_index = raft.raft_log.last_index();
        let members: Vec<u64> = {
            let mut m: Vec<u64> = raft.prs().conf().voters().ids().iter().collect();
            m.sort_unstable();
            m
        };
        let follower_lag = if raft.state == StateRole::Leader {
            let mut lag: Vec<(u64, u64)> = raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != raft.id)
                .map(|(id, progress)| (*id, last_index.saturating_sub(progress.matched)))
                .collect();
            lag.sort_unstable();
            lag
        } else {
            Vec::new()
        };
        NodeStatus {
            id: raft.id,
            role: match raft.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre-candidate",
            },
            leader: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.applied,
            last_index: self.raw.store().last_index().unwrap_or(0),
            members,
            follower_lag,
        }
    }
}

/// A raft message as it goes between appliances.
pub fn encode_message(message: &Message) -> Vec<u8> {
    message.write_to_bytes().expect("a raft message encodes")
}

/// A raft message another appliance sent.
pub fn decode_message(bytes: &[u8]) -> Result<Message, String> {
    Message::parse_from_bytes(bytes).map_err(|e| format!("not a raft message: {e}"))
}
