//! The dataplane's SPSC ring (`dataplane/src/ring.rs`) and its synchronisation shim
//! (`dataplane/src/sync.rs`), compiled on their own: `make loom` model-checks the
//! ring's interleavings under `--cfg loom`, which rebuilds every dependency of what it
//! compiles; the ring needs only crossbeam-utils, not io_uring, zstd, aws-lc or hwloc.

#[path = "../src/sync.rs"]
mod sync;

#[path = "../src/ring.rs"]
pub mod ring;
