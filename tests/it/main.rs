//! The integration test binary: one module per area, shared helpers in `harness`.

#![allow(clippy::unwrap_used)]

mod bundles;
mod edgectl;
mod harness;
mod run_module;
mod runner;
mod runtime;
