//! What the cluster replicates: the commands in its log and the state they build.
//!
//! Every appliance applies the same commands in the same order, so `apply` must be a
//! function of the state and the command alone: no clocks, no hosts, no files. A
//! command that does not apply (an unknown flag, say) is refused before it is proposed
//! ([`Command::check`]); one that reaches the log anyway is skipped the same way
//! everywhere, and counted.

use crate::flags::Flags;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One change to the replicated state, as the log carries it (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    /// A feature flag, the rollout percentage or safe mode, as `dwcpctl flags NAME
    /// VALUE` takes them.
    SetFlag {
        /// The flag's name.
        name: String,
        /// Its new value.
        value: String,
    },
    /// The site's WAN budget in bits per second; `None` lifts it.
    SetBudget {
        /// Bits per second shared out to the running migrations.
        bits_per_second: Option<u64>,
    },
    /// A migration's record, added or replaced whole.
    PutMigration(MigrationRecord),
    /// The mode override (`dwcpctl mode`): `datacenter`, `internet`, `hybrid`, or
    /// `auto` (detection decides).
    SetMode {
        /// The mode, or `auto`.
        mode: String,
    },
}

/// A migration as every appliance of the site sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The migration's id.
    pub id: u64,
    /// The VM it moves.
    pub vm: String,
    /// The appliance it leaves (raft node id).
    pub source: u64,
    /// The appliance it goes to, as its operator named it.
    pub destination: String,
    /// `running`, `completed`, `failed`, `interrupted`.
    pub state: String,
    /// The last pre-copy round reached.
    pub round: u64,
    /// When it was interrupted, seconds since the Unix epoch (set by the proposer: a
    /// clock read in `apply` would differ between appliances).
    pub interrupted_at: Option<u64>,
    /// Bytes it has left to send in its round, as last reported.
    #[serde(default)]
    pub remaining_bytes: u64,
    /// Its send rate as last reported, bits per second.
    #[serde(default)]
    pub rate_bits_per_second: u64,
    /// When it must be done by, seconds since the Unix epoch (its operator's
    /// `--deadline`): under a budget its share is at least what its bytes left need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// When the record was proposed, seconds since the Unix epoch (by the proposer's
    /// clock, like `interrupted_at`): the time left to a deadline counts from it, so
    /// every member computes the same need.
    #[serde(default)]
    pub reported_at: u64,
}

impl MigrationRecord {
    /// The rate its deadline needs, bits per second: its bytes left over the time left
    /// when it reported (a second at least; a deadline passed needs everything at once).
    fn deadline_need(&self) -> Option<f64> {
        let deadline = self.deadline?;
        let seconds = deadline.saturating_sub(self.reported_at).max(1);
        Some(self.remaining_bytes as f64 * 8.0 / seconds as f64)
    }
}

impl MigrationRecord {
    /// Its key in the state: migration ids are an appliance's own, so the source
    /// appliance's id goes in front.
    pub fn key(&self) -> u64 {
        record_key(self.source, self.id)
    }
}

/// The state's key of migration `id` of appliance `source`.
pub fn record_key(source: u64, id: u64) -> u64 {
    (source << 32) | (id & 0xffff_ffff)
}

impl Command {
    /// Refuses a command that could not apply, before it is proposed.
    pub fn check(&self, state: &ClusterState) -> Result<(), String> {
        match self {
            Command::SetFlag { name, value } => state.flags.clone().set(name, value),
            Command::SetMode { mode } if mode == "auto" => Ok(()),
            Command::SetMode { mode } => mode.parse::<crate::mode::Mode>().map(|_| ()),
            Command::SetBudget {
                bits_per_second: Some(0),
            } => Err(
                "a WAN budget of 0 bit/s would stop every migration; lift the budget instead"
                    .into(),
            ),
            Command::SetBudget { .. } => Ok(()),
            Command::PutMigration(record) => {
                const STATES: [&str; 5] =
                    ["running", "completed", "failed", "cancelled", "interrupted"];
                if STATES.contains(&record.state.as_str()) {
                    Ok(())
                } else {
                    Err(format!(
                        "migration state {:?} is not one of {}",
                        record.state,
                        STATES.join(", ")
                    ))
                }
            }
        }
    }

    /// The command as the log stores it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command serialises")
    }

    /// A command read back from the log.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a cluster command: {e}"))
    }
}

/// The replicated state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// Feature flags, rollout, safe mode.
    pub flags: Flags,
    /// The site's WAN budget, bits per second.
    pub budget_bits_per_second: Option<u64>,
    /// Migration records by id.
    pub migrations: BTreeMap<u64, MigrationRecord>,
    /// Commands in the log that did not apply (refused everywhere alike).
    pub skipped: u64,
    /// Flag changes applied: until the first, the cluster has no say over an
    /// appliance's flags (a new cluster does not reset them to defaults).
    pub flag_changes: u64,
    /// Raft addresses of the members: the founders' from the founding snapshot, the
    /// others' from the change that added them (`cluster join`).
    #[serde(default)]
    pub addresses: BTreeMap<u64, String>,
    /// The mode override set through the cluster (`auto` for detection); `None` until
    /// the first, so that a new cluster leaves each appliance's own setting alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl ClusterState {
    /// Applies one committed log entry's data.
    pub fn apply(&mut self, data: &[u8]) {
        let applied = Command::decode(data).and_then(|command| {
            command.check(self)?;
            match command {
                Command::SetFlag { name, value } => {
                    self.flag_changes += 1;
                    self.flags.set(&name, &value)
                }
                Command::SetBudget { bits_per_second } => {
                    self.budget_bits_per_second = bits_per_second;
                    Ok(())
                }
                Command::PutMigration(record) => {
                    self.migrations.insert(record.key(), record);
                    Ok(())
                }
                Command::SetMode { mode } => {
                    self.mode = Some(mode);
                    Ok(())
                }
            }
        });
        if applied.is_err() {
            self.skipped += 1;
        }
    }

    /// The site's WAN budget shared out to the running migrations, bits per second by
    /// record key. Each gets a floor of a quarter of an even share (none starves); then
    /// a migration with a deadline gets what its bytes left need to meet it (all such
    /// needs scaled down alike when the budget cannot cover them); what is left goes to
    /// all in proportion to the bytes each has left, so that they finish closer
    /// together. It changes when one starts or ends and as their reports come in. A
    /// function of the replicated state alone: every member computes the same shares,
    /// and applies those of its own migrations as their pacing caps, without a message
    /// more.
    pub fn budget_shares(&self) -> BTreeMap<u64, u64> {
        let Some(budget) = self.budget_bits_per_second else {
            return BTreeMap::new();
        };
        let running: Vec<(u64, &MigrationRecord)> = self
            .migrations
            .iter()
            .filter(|(_, r)| r.state == "running")
            .map(|(&key, r)| (key, r))
            .collect();
        if running.is_empty() {
            return BTreeMap::new();
        }
        let budget = budget as f64;
        let n = running.len() as f64;
        let floor = budget / (4.0 * n);
        let mut rest = budget - floor * n;
        // What deadlines need beyond the floor.
        let extra: Vec<f64> = running
            .iter()
            .map(|(_, r)| {
                r.deadline_need()
                    .map_or(0.0, |need| (need - floor).max(0.0))
            })
            .collect();
        let wanted: f64 = extra.iter().sum();
        let scale = if wanted > rest { rest / wanted } else { 1.0 };
        rest -= wanted * scale;
        let left: f64 = running
            .iter()
            .map(|(_, r)| r.remaining_bytes.max(1) as f64)
            .sum();
        running
            .iter()
            .zip(extra)
            .map(|((key, r), extra)| {
                let by_bytes = rest * r.remaining_bytes.max(1) as f64 / left;
                (*key, (floor + extra * scale + by_bytes) as u64)
            })
            .collect()
    }

    /// The state as a snapshot carries it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the cluster state serialises")
    }

    /// The state a snapshot carried.
    pub fn decode(bytes: &[u8]) -> Result<ClusterState, String> {
        if bytes.is_empty() {
            return Ok(ClusterState::default());
        }
        serde_json::from_slice(bytes).map_err(|e| format!("not a cluster state snapshot: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_apply_in_order_and_bad_ones_are_refused_or_skipped_alike() {
        let mut state = ClusterState::default();
        let safe = Command::SetFlag {
            name: "safe-mode".into(),
            value: "on".into(),
        };
        assert_eq!(safe.check(&state), Ok(()));
        state.apply(&safe.encode());
        assert!(state.flags.safe_mode);
        let unknown = Command::SetFlag {
            name: "warp-drive".into(),
            value: "on".into(),
        };
        assert!(unknown.check(&state).is_err());
        // In the log anyway (proposed by an appliance of another version): skipped.
        state.apply(&unknown.encode());
        state.apply(b"{not json");
        assert_eq!(state.skipped, 2);
        let zero = Command::SetBudget {
            bits_per_second: Some(0),
        };
        assert!(zero.check(&state).unwrap_err().contains("lift the budget"));
        let warp = Command::SetMode {
            mode: "warp".into(),
        };
        assert!(warp.check(&state).unwrap_err().contains("unknown mode"));
        assert_eq!(
            state.mode, None,
            "no say over the mode until the first change"
        );
        state.apply(
            &Command::SetMode {
                mode: "internet".into(),
            }
            .encode(),
        );
        assert_eq!(state.mode.as_deref(), Some("internet"));
        state.apply(
            &Command::SetBudget {
                bits_per_second: Some(800_000_000),
            }
            .encode(),
        );
        let record = MigrationRecord {
            id: 7,
            vm: "db-1".into(),
            source: 1,
            destination: "10.0.0.2:7000".into(),
            state: "interrupted".into(),
            round: 3,
            interrupted_at: Some(1_765_000_000),
            remaining_bytes: 0,
            rate_bits_per_second: 0,
            ..MigrationRecord::default()
        };
        state.apply(&Command::PutMigration(record.clone()).encode());
        let back = ClusterState::decode(&state.encode()).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.migrations[&record.key()], record);
        assert_eq!(back.budget_bits_per_second, Some(800_000_000));
    }

    #[test]
    fn the_budget_goes_to_running_migrations_by_what_they_have_left() {
        let mut state = ClusterState::default();
        let record = |source: u64, id: u64, state: &str, left: u64| MigrationRecord {
            id,
            vm: "vm".into(),
            source,
            destination: "peer".into(),
            state: state.into(),
            round: 1,
            interrupted_at: None,
            remaining_bytes: left,
            rate_bits_per_second: 0,
            ..MigrationRecord::default()
        };
        // Migration 1 on appliances 1 and 2 alike: the keys differ.
        let a = record(1, 1, "running", 3 << 30);
        let b = record(2, 1, "running", 1 << 30);
        let done = record(3, 1, "completed", 0);
        for r in [&a, &b, &done] {
            state.apply(&Command::PutMigration(r.clone()).encode());
        }
        assert_eq!(state.migrations.len(), 3);
        assert!(state.budget_shares().is_empty(), "no budget, no shares");
        state.apply(
            &Command::SetBudget {
                bits_per_second: Some(800_000_000),
            }
            .encode(),
        );
        let shares = state.budget_shares();
        assert_eq!(shares.len(), 2, "only running migrations get a share");
        // Floors of 100 Mbit/s each; the other 600 split 3:1.
        assert_eq!(shares[&a.key()], 100_000_000 + 450_000_000);
        assert_eq!(shares[&b.key()], 100_000_000 + 150_000_000);
        // One ends: the other gets the whole budget.
        state.apply(&Command::PutMigration(record(1, 1, "completed", 0)).encode());
        assert_eq!(state.budget_shares()[&b.key()], 800_000_000);
    }

    #[test]
    fn a_deadline_gets_what_it_needs_first_and_the_rest_goes_by_bytes_left() {
        let mut state = ClusterState {
            budget_bits_per_second: Some(800_000_000),
            ..ClusterState::default()
        };
        let gib = 1u64 << 30;
        let a = MigrationRecord {
            id: 1,
            source: 1,
            state: "running".into(),
            remaining_bytes: 3 * gib,
            ..MigrationRecord::default()
        };
        // 1 GiB left, due 40 s after its report: it needs 214.7 Mbit/s.
        let b = MigrationRecord {
            id: 1,
            source: 2,
            state: "running".into(),
            remaining_bytes: gib,
            deadline: Some(1_000_040),
            reported_at: 1_000_000,
            ..MigrationRecord::default()
        };
        for r in [&a, &b] {
            state.apply(&Command::PutMigration(r.clone()).encode());
        }
        let need = gib as f64 * 8.0 / 40.0;
        let shares = state.budget_shares();
        // Floors of 100 Mbit/s; b's extra need (need - 100 M) first; the rest 3:1.
        let rest = 600e6 - (need - 100e6);
        assert_eq!(
            shares[&b.key()],
            (100e6 + (need - 100e6) + rest / 4.0) as u64
        );
        assert_eq!(shares[&a.key()], (100e6 + rest * 3.0 / 4.0) as u64);
        assert!(shares[&b.key()] as f64 >= need);
        assert!(shares.values().sum::<u64>() <= 800_000_000);

        // A deadline the budget cannot meet: b gets all but a's floor, never a's floor.
        let mut late = b.clone();
        late.deadline = Some(1_000_002);
        state.apply(&Command::PutMigration(late.clone()).encode());
        let shares = state.budget_shares();
        assert_eq!(shares[&a.key()], 100_000_000);
        assert_eq!(shares[&late.key()], 700_000_000);

        // Two deadlines that cannot both be met are scaled down alike (beyond their
        // floors: 300 M each asked for 2 GiB in 4 s, the 600 M of the rest split evenly).
        let mut c = late.clone();
        c.source = 3;
        c.remaining_bytes = gib;
        state.apply(&Command::PutMigration(c.clone()).encode());
        let mut a_due = a.clone();
        a_due.remaining_bytes = gib;
        a_due.deadline = late.deadline;
        a_due.reported_at = late.reported_at;
        state.apply(&Command::PutMigration(a_due.clone()).encode());
        let shares = state.budget_shares();
        let even = 800_000_000 / 3;
        for key in [a_due.key(), late.key(), c.key()] {
            assert!(shares[&key].abs_diff(even) <= 1, "{shares:?}");
        }
    }
}
