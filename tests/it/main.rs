//! The integration test binary: one module per area, shared helpers in `support`.

#![allow(clippy::unwrap_used)]

mod bombs;
mod bundles;
mod chunks;
mod chunks_edgectl;
mod daemon;
mod edgectl;
mod hardware;
mod hostile;
mod justfile;
mod recovery;
mod run_module;
mod runner;
mod runtime;
mod store;
mod store_model;
mod support;
mod systemd;
mod trust;
mod trust_doc;
