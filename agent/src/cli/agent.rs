//! `edge-agent`'s command line: the daemon (`edge-agent --config FILE`) and `run-module`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::run_module::RunModuleArgs;
use crate::config::CONFIG_ENV;

/// Runs signed WebAssembly modules from an MQTT fleet.
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about)]
pub struct Cli {
    /// The configuration file (config.d/*.toml beside it override it).
    #[arg(long, env = CONFIG_ENV, global = true)]
    pub config: Option<PathBuf>,
    /// What to do; without a command, run the agent.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// edge-agent's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one module locally under the daemon's runtime, limits and capability checks.
    RunModule(RunModuleArgs),
}
