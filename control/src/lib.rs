//! The dwcp slow path and the `dwcpd` daemon.
//!
//! - [`config`]: the daemon's TOML configuration and its validation;
//! - [`codec_policy`]: the model that chooses codecs from link and CPU measurements;
//! - [`appliance`]: running as a source, a destination, or both (the demo);
//! - [`runner`]: one migration of the configured guest, for `dwcpd source`, the demo and
//!   the daemon alike; [`progress`]: how a running migration shows on a terminal;
//! - [`qemu`]: QEMU guests: the source VM as the engine's guest, the incoming VM as the
//!   sink of its device state, over QMP;
//! - [`mode`]: mode detection (sans-IO) and the mode → policy mapping;
//! - [`linkrec`]: what the control thread sees of a migration's path, a row per quarter
//!   second; [`predict`]: the learned link-rate predictor (tract-onnx) checked against
//!   its model card, and the EWMA it has to beat; [`anomaly`]: whether a path is going
//!   bad (a rolling z-score, and the learned detector it was judged against);
//! - [`flags`]: feature flags, rollout by a hash of the migration id, safe mode;
//! - [`daemon`]: `dwcpd serve`: the control thread that owns the daemon's state and
//!   reconfigures running migrations through settings epochs; [`settings`]: how their
//!   live settings are layered (configuration, mode, overrides, flags) and shown;
//!   [`incoming`]: the migrations it receives, as the control thread keeps them;
//! - [`call`]: how the socket server and the metrics listener reach the control thread;
//! - [`server`]: the operator control socket (`dwcpctl`; protocol in `dwcp-api`);
//! - [`metrics`]: Prometheus exposition and its HTTP listener.
//!
//! This crate uses the dataplane's public API only; the dataplane never depends on it.

pub mod anomaly;
pub mod appliance;
pub mod call;
pub mod certs;
pub mod cluster;
pub mod codec_model;
pub mod codec_policy;
pub mod config;
pub mod daemon;
pub mod flags;
pub mod incoming;
pub mod linkrec;
pub mod metrics;
pub mod mode;
pub mod predict;
pub mod progress;
pub mod qemu;
mod receiver;
pub mod runner;
pub mod server;
pub mod settings;
