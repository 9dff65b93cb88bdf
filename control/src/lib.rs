//! The dwcp slow path: the control thread that watches telemetry from the workers,
//! detects the link mode, decides codec and transport policy, keeps cluster state in
//! consensus, and serves operators on the control socket; and `dwcpd`, the daemon that
//! composes it with the fast path.
//!
//! It depends on the dataplane's public API only; the dataplane never depends on it.
//! The crate is empty until the migration engine it drives exists.
