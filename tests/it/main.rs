//! The integration test binary: one module per area, shared helpers in `harness`.

#![allow(clippy::unwrap_used)]

mod bombs;
mod broker;
mod bundles;
mod daemon;
mod edgectl;
mod hardware;
mod harness;
mod hostile;
mod recovery;
mod run_module;
mod runner;
mod runtime;
mod store;
mod systemd;
