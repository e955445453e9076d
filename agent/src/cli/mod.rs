//! Command-line front ends. The binaries in `src/bin` only call into here.

pub mod agent;
pub mod common;
mod delivery;
pub mod edgectl;
mod files;
pub mod fleet;
pub mod gc;
pub mod log;
pub mod report;
pub mod run_module;
pub mod trust;
