//! dwcp's benchmarks.
//!
//! The comparison runner (`dwcp-bench <suite> --json`) measures our component and a
//! baseline side by side in the same process, interleaving their runs so drift on a
//! shared machine hits both alike, and prints one JSON line per comparison (the format
//! is in DESIGN.md). The criterion benches in `benches/` give per-kernel detail.
//!
//! - [`measure`]: timing, medians, interleaving.
//! - [`report`]: the JSON lines and the human table.
//! - [`reference`](mod@reference): the baselines we write ourselves (the shape of QEMU's XBZRLE loop,
//!   a read-bandwidth probe).
//! - [`transport`]: the `transport` suite (page stream against iperf3, a live
//!   migration of 1 GiB);
//! - [`kernels`]: the `kernels` suite (CRC32C, zero test, XBZRLE) and [`ring`] (the
//!   SPSC ring against rtrb and crossbeam);
//! - [`codec`]: the `codec` suite (zstd against the zstd command, bytes on the wire
//!   against QEMU's codecs, migration time through rate-limited links).
//! - [`wan`]: the `wan` suite (live migration across each WAN emulator scenario
//!   against one plain TCP stream, and the emulator's own forwarding and bottleneck).
//! - [`control`]: the `control` suite (a live migration with clients on the daemon's
//!   control socket against the same migration with none).
//! - [`security`]: the `security` suite (sealed against plain page streams, against
//!   rustls streams, session setup with 16 streams).
//! - [`ml`] and [`codec_choice`]: the `ml` suite (the learned models against the rules
//!   they would replace, and the data they learn from).
//! - [`downtime`]: the `downtime` suite (the demo's migration against its downtime
//!   limit, the table digest against the full check, 4 GiB against 1 GiB).

pub mod cluster;
pub mod codec;
pub mod codec_choice;
pub mod control;
pub mod downtime;
pub mod kernels;
pub mod measure;
pub mod ml;
pub mod qemu;
pub mod reference;
pub mod report;
pub mod resume;
pub mod ring;
pub mod security;
pub mod transport;
pub mod wan;
