//! The dwcp fast path.
//!
//! This crate owns everything a worker thread touches while pages move: the lock-free
//! SPSC rings that connect the engine, the workers and the control thread ([`ring`]).
//! It depends only on the page kernels (`dwcp-simd`) and memory (`dwcp-hugepages`);
//! nothing here links the control plane.

pub mod ring;
mod sync;
