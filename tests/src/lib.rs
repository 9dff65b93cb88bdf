//! Shared helpers for the end-to-end tests in `tests/tests/`: whole migrations between
//! two appliances, fault injection and WAN scenarios. Empty until the migration engine
//! exists; the component tests live beside each crate.
