//! `edge-agent`: see `edge_agent::cli::agent`.

use std::process::ExitCode;

use clap::Parser as _;
use edge_agent::cli::agent::{Cli, Command};
use edge_agent::cli::run_module;
use edge_agent::runtime::RuntimeConfig;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::RunModule(args) => {
            match run_module::run(
                &args,
                RuntimeConfig::default(),
                &mut std::io::stdout().lock(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edge-agent: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}
