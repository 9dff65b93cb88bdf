//! Raw bindings to the system's libfabric, generated at build time from its headers
//! (see `build.rs`). Only `imp` calls them.

#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

unsafe extern "C" {
    /// Load libfabric if it is not yet (`loader.c`): null when it is usable, else a
    /// static NUL-terminated text saying why not.
    pub fn dwcp_fabric_load() -> *const std::ffi::c_char;
}

/// `FI_VERSION(major, minor)` (a function-like macro in `fabric.h`).
pub const fn fi_version_of(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}

/// The API version asked for: 1.17, what Debian 12 ships (newer libraries serve it
/// too).
pub const DWCP_FI_VERSION: u32 = fi_version_of(1, 17);

/// `FI_ADDR_UNSPEC` (a cast in `fabric.h`, which bindgen leaves out).
pub const FI_ADDR_UNSPEC_VALUE: u64 = u64::MAX;
