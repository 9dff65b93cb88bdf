//! The page codec pipeline: zero page → dedup → delta → compress → raw.
//!
//! - [`zstd`]: compression contexts, dictionaries and training;
//! - [`cache`]: the per-stream cache of pages last sent, for XBZRLE deltas and dedup;
//! - [`encode`]: turning runs of pages into codec frames, per stream;
//! - [`calibrate`]: measuring levels and training dictionaries on sampled pages;
//! - [`policy`]: what a codec policy sees and decides (the model lives in the control
//!   crate).
pub mod cache;
pub mod calibrate;
pub mod encode;
pub mod policy;
pub mod zstd;

pub use encode::{CodecCounters, CodecSettings, CodecSetup, EncodedRun, StreamCodec, WorkerCodec};
