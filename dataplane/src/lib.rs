//! The dwcp fast path.
//!
//! This crate owns everything a worker thread touches while pages move:
//! - [`ring`]: the lock-free SPSC rings that connect the engine, the workers and the
//!   control thread;
//! - [`memory`]: guest memory, accessed only by page copies;
//! - [`crc_table`]: per-page CRC tables on both sides and their running digest;
//! - [`dirty`]: dirty-page trackers (userfaultfd write-protect, CRC rescans, an
//!   explicit bitmap);
//! - [`guest`]: a simulated guest whose vCPUs write memory at a set rate;
//! - [`wire`]: the wire protocol;
//! - [`transport`]: workers moving frames over io_uring or plain sockets;
//! - [`engine`]: the pre-copy migration, source and destination.
//!
//! It depends only on the page kernels (`dwcp-simd`) and memory (`dwcp-hugepages`);
//! nothing here links the control plane.

pub mod codec;
pub mod crc_table;
pub mod dirty;
pub mod engine;
pub mod guest;
pub mod memory;
pub mod ring;
pub mod security;
mod sync;
pub mod transport;
pub mod wire;
