//! `edge-agent`: the daemon, and `run-module` for module authors. See `edge_agent::cli::agent`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use edge_agent::cli::agent::{Cli, Command};
use edge_agent::cli::log::StderrLog;
use edge_agent::cli::report::one_line;
use edge_agent::cli::run_module;
use edge_agent::config::Config;
use edge_agent::daemon;
use edge_agent::hal::{Board, HardwareConfig};
use edge_agent::runtime::RuntimeConfig;
use edge_agent::runtime::host::{Clock as _, SystemClock};
use edge_agent::store::Store;
use tracing_subscriber::filter::{LevelFilter, Targets};

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
                    eprintln!("edge-agent: {}", one_line(&e));
                    return ExitCode::from(2);
                }
            };
            match run_module::run(&args, runtime, &hardware, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edge-agent: {}", one_line(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
        None => match agent(cli) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // The cause chain, each reason once, then a non-zero exit so systemd restarts
                // the agent.
                eprintln!("edge-agent: {}", one_line(e.as_ref()));
                ExitCode::FAILURE
            }
        },
    }
}

fn agent(cli: Cli) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    // RUST_LOG as targets and levels ("info", "warn,edge_agent::daemon=debug"); a plain parser,
    // not env-filter's regular expressions, which would cost the device binary ~0.5 MB.
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    StderrLog::new(filter, ansi)
        .install()
        .context("installing the log")?;
    let path = cli
        .config
        .context("no configuration: pass --config FILE or set EDGE_AGENT_CONFIG")?;
    let config = Config::load(&path)?;
    if let Some(offset) = std::env::var_os("EDGE_AGENT_CLOCK_OFFSET_S") {
        let offset: i64 = offset
            .to_str()
            .and_then(|s| s.parse().ok())
            .context("EDGE_AGENT_CLOCK_OFFSET_S must be a whole number of seconds")?;
        edge_agent::runtime::host::set_clock_offset_ms(offset.saturating_mul(1000));
        tracing::warn!("the clock is shifted by {offset} s (EDGE_AGENT_CLOCK_OFFSET_S)");
    }
    let store = Store::open(&config.state_dir, config.store.cache_capacity_bytes)
        .with_context(|| format!("opening the store in {}", config.state_dir.display()))?;
    // Threads are bounded (daemon::MAX_THREADS, the unit's TasksMax leaves room for them).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-agent")
        .worker_threads(daemon::WORKER_THREADS)
        .max_blocking_threads(daemon::MAX_BLOCKING_THREADS)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut notifier = daemon::notify::Systemd::from_env();
        let board = Arc::new(Board::open(
            &config.hardware,
            Arc::new(|| SystemClock.now_ms()),
        ));
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
        tokio::spawn(reload_on_sighup(path, reload_tx));
        daemon::run(
            config,
            store,
            board,
            shutdown_signal(),
            reloads,
            &mut notifier,
        )
        .await
    })?;
    Ok(())
}

/// On SIGHUP, reads the configuration again; a valid one goes to the daemon, an invalid one is
/// reported and the one in effect stays.
async fn reload_on_sighup(path: PathBuf, reloads: tokio::sync::mpsc::Sender<Config>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install the SIGHUP handler, reloads are off: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading {}", path.display());
        match Config::load(&path) {
            Ok(config) => {
                if reloads.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!("reload refused, the configuration in effect stays: {e}"),
        }
    }
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
