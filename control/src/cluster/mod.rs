//! The appliance cluster: the appliances of a site form one raft group (raft-rs,
//! driven sans-IO from the control thread) that replicates migration records, feature
//! flags and the site's WAN budget.
//!
//! - [`state`]: the commands the log carries and the state they build, applied the
//!   same way on every appliance;
//! - [`log`]: the raft log on disk (one file of checksummed records, synced before a
//!   vote or acknowledgement leaves, compacted behind snapshots);
//! - [`node`]: one member: `RawNode` over that log, `Ready` handled in raft's order,
//!   status for operators;
//! - [`member`]: the daemon's membership: node, network, operators' writes waiting
//!   for their entries;
//! - [`peers`]: the messages between appliances (TLS with the appliance's identity),
//!   on threads of their own.
//!
//! Apart from [`peers`], nothing here opens a socket or reads a clock: the daemon
//! feeds ticks and messages in and sends what comes out, and the tests run whole clusters over a simulated
//! network (drops, delays, partitions, restarts) with the same code.

pub mod log;
pub mod member;
pub mod node;
pub mod peers;
#[cfg(test)]
mod sim;
pub mod state;

pub use log::{Durability, DurableLog};
pub use node::{ClusterError, ClusterNode, NodeStatus, decode_message, encode_message};
pub use state::{ClusterState, Command, MigrationRecord, record_key};
