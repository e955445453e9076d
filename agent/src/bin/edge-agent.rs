//! `edge-agent`: the daemon, and `run-module` for module authors. See `edge_agent::cli::agent`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use edge_agent::cli::agent::{Cli, Command};
use edge_agent::cli::run_module;
use edge_agent::config::Config;
use edge_agent::daemon;
use edge_agent::hal::{Board, HardwareConfig};
use edge_agent::runtime::RuntimeConfig;
use edge_agent::runtime::host::{Clock as _, SystemClock};
use edge_agent::store::Store;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::RunModule(args)) => {
            // With --config: that agent's limits and hardware; without: defaults and the
            // simulated board.
            let (runtime, hardware) = match cli.config.as_deref().map(Config::load).transpose() {
                Ok(Some(c)) => (c.runtime, c.hardware),
                Ok(None) => (RuntimeConfig::default(), HardwareConfig::simulated()),
                Err(e) => {
                    eprintln!("edge-agent: {e}");
                    return ExitCode::from(2);
                }
            };
            match run_module::run(&args, runtime, &hardware, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edge-agent: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        None => match agent(cli) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // The whole cause chain, then a non-zero exit so systemd restarts the agent.
                eprintln!("edge-agent: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn agent(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let path = cli
        .config
        .context("no configuration: pass --config FILE or set EDGE_AGENT_CONFIG")?;
    let config = Config::load(&path)?;
    let store = Store::open(&config.state_dir, config.store.cache_capacity_bytes)
        .with_context(|| format!("opening the store in {}", config.state_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-agent")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut notifier = daemon::Silent;
        let board = Arc::new(Board::open(
            &config.hardware,
            Arc::new(|| SystemClock.now_ms()),
        ));
        daemon::run(config, store, board, shutdown_signal(), &mut notifier).await
    })?;
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
