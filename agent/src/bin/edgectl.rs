//! `edgectl`: see `edge_agent::cli::edgectl`.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = edge_agent::cli::edgectl::Cli::parse();
    let result = edge_agent::cli::edgectl::run(
        cli,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each reason once: the error's text, then the causes it does not already say.
            eprintln!("edgectl: {}", edge_agent::cli::report::one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
