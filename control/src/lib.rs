//! The dwcp slow path and the `dwcpd` daemon.
//!
//! - [`config`]: the daemon's TOML configuration and its validation;
//! - [`codec_policy`]: the model that chooses codecs from link and CPU measurements;
//! - [`appliance`]: running as a source, a destination, or both (the demo).
//!
//! The control thread, mode detection, policy and the operator socket build on these.
//! This crate uses the dataplane's public API only; the dataplane never depends on it.

pub mod appliance;
pub mod codec_policy;
pub mod config;
