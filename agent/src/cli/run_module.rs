//! `edge-agent run-module`: the module author's inner loop. Runs one module locally under exactly
//! the runtime, limits and capability checks the daemon uses, and prints what it does.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::files;
use crate::core::manifest::Manifest;
use crate::core::text::printable;
use crate::hal::{Board, HardwareConfig};
use crate::runtime::host::{Clock as _, SystemClock};
use crate::runtime::kv::MemoryKv;
use crate::runtime::{CallReport, Outcome, Runtime, RuntimeConfig};

/// Largest Wasm file read.
const WASM_MAX: u64 = 16 << 20;

/// Arguments of `edge-agent run-module` (parsed in `cli/agent.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunModuleArgs {
    /// The Wasm module.
    pub wasm: PathBuf,
    /// Its TOML manifest (the one `edgectl sign` takes).
    pub manifest: PathBuf,
    /// How many times to call `tick` (after `init` and the messages).
    pub ticks: u32,
    /// Messages for `on_message`, as (topic relative to the module's inbox, payload), delivered
    /// in order after `init`.
    pub messages: Vec<(String, String)>,
}

/// A `--message` value: `TOPIC=PAYLOAD`, split at the first `=`.
pub(crate) fn parse_message(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .ok_or_else(|| format!("{s:?} is not TOPIC=PAYLOAD"))
}

/// How `run-module` ended.
#[derive(Debug, thiserror::Error)]
pub enum RunModuleError {
    /// A file could not be read.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// The manifest is malformed.
    #[error("{path}: {reason}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The module was refused at install (exit status 3).
    #[error("refused at install: {0}")]
    Refused(String),
    /// A call did not finish (exit status 1).
    #[error("module {module:?}: {call}: {outcome}")]
    CallFailed {
        /// Module name.
        module: String,
        /// Which call.
        call: String,
        /// How it ended.
        outcome: Outcome,
    },
    /// Writing to the terminal failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

impl RunModuleError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunModuleError::CallFailed { .. } => 1,
            RunModuleError::Refused(_) => 3,
            _ => 2,
        }
    }
}

/// Runs the module as the arguments say, on `hardware` (the simulated board unless the agent's
/// configuration names real hardware), printing to `out`.
pub fn run(
    args: &RunModuleArgs,
    config: RuntimeConfig,
    hardware: &HardwareConfig,
    out: &mut dyn Write,
) -> Result<(), RunModuleError> {
    let text = files::read_text(&args.manifest, 64 * 1024)?;
    let manifest = Manifest::from_toml(&text)
        .and_then(|m| m.check().map(|()| m).map_err(|e| e.to_string()))
        .map_err(|reason| RunModuleError::Manifest {
            path: args.manifest.clone(),
            reason,
        })?;
    let wasm = files::read_bounded(&args.wasm, WASM_MAX)?;
    let board = Board::open(hardware, Arc::new(|| SystemClock.now_ms()));
    let runtime = Runtime::new(config).with_board(Arc::new(board));
    let refused = |e: String| RunModuleError::Refused(e);
    // The install checks a device makes: structure, validation and translation, then the
    // imports and exports against the manifest.
    let prepared = runtime
        .prepare(&manifest, &wasm)
        .map_err(|e| refused(e.to_string()))?;
    let limits = prepared.limits();
    writeln!(
        out,
        "{} {}: fuel {} per call, memory cap {} bytes, tick every {} ms, kv quota {} bytes",
        manifest.name,
        manifest.version,
        limits.fuel_per_call,
        limits.memory_max_bytes,
        limits.tick_interval_ms,
        limits.kv_quota_bytes
    )?;
    let kv = (limits.kv_quota_bytes > 0)
        .then(|| Box::new(MemoryKv::new(limits.kv_quota_bytes)) as Box<_>);
    let mut instance = runtime
        .instantiate(&prepared, kv)
        .map_err(|e| refused(e.to_string()))?;

    let check =
        |call: String, report: CallReport, out: &mut dyn Write| -> Result<(), RunModuleError> {
            print_report(out, &call, &report)?;
            if report.outcome.is_finished() {
                Ok(())
            } else {
                Err(RunModuleError::CallFailed {
                    module: manifest.name.clone(),
                    call,
                    outcome: report.outcome,
                })
            }
        };
    check("init".into(), instance.init(), out)?;
    for (topic, payload) in &args.messages {
        match instance.deliver(topic, payload.as_bytes()) {
            Ok(report) => check(format!("on_message {topic}"), report, out)?,
            Err(e) => writeln!(out, "{:<12} not delivered: {e}", "on_message")?,
        }
    }
    let ticks = if instance.has_tick() && limits.tick_interval_ms > 0 {
        args.ticks
    } else {
        0
    };
    for n in 1..=ticks {
        check(format!("tick {n}"), instance.tick(), out)?;
    }
    let s = instance.stats();
    writeln!(
        out,
        "{:<12} {} calls, fuel {} total (last {}), memory {} bytes, kv {} bytes, {} published, {} log lines ({} dropped), {} refused host calls",
        "summary",
        s.calls,
        s.fuel_total,
        s.fuel_last,
        s.memory_bytes,
        s.kv_bytes,
        s.host.published,
        s.host.log_lines,
        s.host.log_dropped,
        s.host.refused
    )?;
    // What the module did to the simulated lines it was granted.
    for line in &manifest.caps.gpio {
        if let Some(sim) = runtime.board().sim_line(*line) {
            writeln!(
                out,
                "{:<12} gpio {line} {} (changed {} times)",
                "board",
                if sim.level() { "high" } else { "low" },
                sim.toggles()
            )?;
        }
    }
    Ok(())
}

fn print_report(out: &mut dyn Write, call: &str, r: &CallReport) -> std::io::Result<()> {
    writeln!(out, "{call:<12} {}, fuel {}", r.outcome, r.fuel_used)?;
    for line in &r.logs {
        writeln!(
            out,
            "  log      {:<5} {}",
            line.level,
            printable(&line.text)
        )?;
    }
    for m in &r.messages {
        writeln!(out, "  publish  {} {}", m.topic, show_payload(&m.payload))?;
    }
    for refusal in &r.refusals {
        writeln!(out, "  refused  {}", printable(&refusal.to_string()))?;
    }
    Ok(())
}

/// A payload for the terminal: quoted text when it is printable UTF-8, hex otherwise.
pub fn show_payload(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ if p.len() > 64 => format!("0x{}… ({} bytes)", hex::encode(&p[..64]), p.len()),
        _ => format!("0x{}", hex::encode(p)),
    }
}
