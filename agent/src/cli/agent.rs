//! `edge-agent`'s command line.

use clap::{Parser, Subcommand};

use super::run_module::RunModuleArgs;

/// Runs signed WebAssembly modules from an MQTT fleet.
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// edge-agent's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one module locally under the daemon's runtime, limits and capability checks.
    RunModule(RunModuleArgs),
}
