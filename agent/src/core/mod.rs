//! The sans-IO core: pure rules with no network, disk or clock access, unit-testable alone.
//!
//! Architecture Invariant: nothing under `core` performs IO or reads the clock; callers pass in
//! bytes, times and state.

pub mod bundle;
pub mod cbor;
pub mod keys;
pub mod manifest;
pub mod policy;
pub mod protocol;
pub mod rate;
pub mod reconcile;
pub mod text;
pub mod topics;
pub mod verify;
