//! `edgectl`: see `edge_agent::cli::edgectl`.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = edge_agent::cli::edgectl::Cli::parse();
    match edge_agent::cli::edgectl::run(cli, &mut std::io::stdout().lock()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprint!("edgectl: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                eprint!(": {cause}");
                source = cause.source();
            }
            eprintln!();
            std::process::ExitCode::FAILURE
        }
    }
}
