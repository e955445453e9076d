//! `edge-agent`'s command line: the daemon (`edge-agent --config FILE`) and `run-module`.
//!
//! Parsed by hand rather than with clap (which `edgectl` keeps): the device binary has two
//! commands and six options, and clap's builder, help renderer and derive code were ~0.1 MB of
//! it (docs/ARCHITECTURE.md, "Binary size"). The command line is clap's: `--opt VALUE` and
//! `--opt=VALUE`, `--config` before or after the command, `--` ends the options, `-h`/`--help`,
//! `help [COMMAND]`, `-V`/`--version`; a usage error goes to stderr with exit status 2.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use super::run_module::{RunModuleArgs, parse_message};
use crate::config::CONFIG_ENV;

/// `run-module --ticks` when not given.
const DEFAULT_TICKS: u32 = 3;

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    /// The configuration file (config.d/*.toml beside it override it): `--config`, else the
    /// environment variable [`CONFIG_ENV`].
    pub config: Option<PathBuf>,
    /// What to do; without a command, run the agent.
    pub command: Option<Command>,
}

/// edge-agent's commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run one module locally under the daemon's runtime, limits and capability checks.
    RunModule(RunModuleArgs),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Run (the agent, or a command).
    Run(Cli),
    /// Print this text (help or version) to stdout and exit successfully.
    Print(String),
}

/// A command line that cannot be used, with the usage of the command it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}\n\nUsage: {usage}\n\nFor more information, try '--help'.")]
pub struct UsageError {
    /// What is wrong.
    pub message: String,
    /// The usage line of the command concerned.
    pub usage: &'static str,
}

const USAGE: &str = "edge-agent [OPTIONS] [COMMAND]";
const RUN_MODULE_USAGE: &str = "edge-agent run-module [OPTIONS] --manifest <MANIFEST> <WASM>";

fn help() -> String {
    format!(
        "Runs signed WebAssembly modules from an MQTT fleet

Usage: {USAGE}

Commands:
  run-module  Run one module locally under the daemon's runtime, limits and capability checks
  help        Print this message or the help of the given command

Options:
      --config <CONFIG>  The configuration file (config.d/*.toml beside it override it)
                         [env: {CONFIG_ENV}=]
  -h, --help             Print help
  -V, --version          Print version

Without a command, edge-agent runs the agent.
"
    )
}

fn run_module_help() -> String {
    format!(
        "Run one module locally under the daemon's runtime, limits and capability checks

Usage: {RUN_MODULE_USAGE}

Arguments:
  <WASM>  The Wasm module

Options:
      --manifest <MANIFEST>      Its TOML manifest (the one `edgectl sign` takes)
      --ticks <TICKS>            How many times to call `tick` (after `init` and the messages)
                                 [default: {DEFAULT_TICKS}]
      --message <TOPIC=PAYLOAD>  A message for `on_message` (topic relative to the module's
                                 inbox); repeatable, delivered in order after `init`
      --config <CONFIG>          The agent's configuration, for its limits and hardware (without
                                 it: the defaults and the simulated board) [env: {CONFIG_ENV}=]
  -h, --help                     Print help
"
    )
}

fn version() -> String {
    format!("edge-agent {}\n", env!("CARGO_PKG_VERSION"))
}

impl Cli {
    /// Parses the process's arguments and environment. Prints help or the version and exits 0
    /// when asked to; prints a usage error and exits 2 when the command line cannot be used.
    pub fn parse() -> Cli {
        use std::io::Write as _;
        let env = std::env::var_os(CONFIG_ENV);
        match parse(std::env::args_os().skip(1), env) {
            Ok(Invocation::Run(cli)) => cli,
            Ok(Invocation::Print(text)) => {
                // A closed stdout (`edge-agent --help | head -0`) is no reason to fail.
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
                std::process::exit(0)
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(i32::from(USAGE_EXIT))
            }
        }
    }
}

/// The exit status of a usage error (as clap's).
pub const USAGE_EXIT: u8 = 2;

/// One option of a command, as written on the command line.
struct Opt<'a> {
    /// `--name` of `--name VALUE` or `--name=VALUE`.
    name: &'a str,
    /// The value given with `=`, if any.
    inline: Option<OsString>,
}

/// Splits `--name=value`; `None` for anything that is not a long option.
fn long_option(arg: &OsStr) -> Option<Opt<'_>> {
    let text = arg.to_str()?;
    let rest = text.strip_prefix("--").filter(|r| !r.is_empty())?;
    Some(match rest.split_once('=') {
        Some((name, value)) => Opt {
            name,
            inline: Some(value.into()),
        },
        None => Opt {
            name: rest,
            inline: None,
        },
    })
}

/// The value of an option: the part after `=`, else the next argument.
fn value(
    opt: &Opt<'_>,
    placeholder: &str,
    args: &mut impl Iterator<Item = OsString>,
    usage: &'static str,
) -> Result<OsString, UsageError> {
    opt.inline.clone().or_else(|| args.next()).ok_or_else(|| {
        usage_error(
            format!(
                "a value is required for '--{} <{placeholder}>' but none was supplied",
                opt.name
            ),
            usage,
        )
    })
}

/// Sets an option that may be given once.
fn once<T>(
    slot: &mut Option<T>,
    value: T,
    name: &str,
    placeholder: &str,
    usage: &'static str,
) -> Result<(), UsageError> {
    if slot.replace(value).is_some() {
        return Err(usage_error(
            format!("the argument '--{name} <{placeholder}>' cannot be used multiple times"),
            usage,
        ));
    }
    Ok(())
}

fn usage_error(message: String, usage: &'static str) -> UsageError {
    UsageError { message, usage }
}

/// `--name` (of `--name` or `--name=VALUE`) is no option here.
fn unexpected_option(name: &str, usage: &'static str) -> UsageError {
    usage_error(format!("unexpected argument '--{name}' found"), usage)
}

fn unexpected(arg: &OsStr, usage: &'static str) -> UsageError {
    usage_error(
        format!("unexpected argument '{}' found", arg.to_string_lossy()),
        usage,
    )
}

/// Parses `args` (without the program name); `env_config` is the value of [`CONFIG_ENV`], used
/// when `--config` is not given (an empty value counts as unset).
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env_config: Option<OsString>,
) -> Result<Invocation, UsageError> {
    let mut args = args.into_iter();
    let mut config: Option<PathBuf> = None;
    let mut command = None;
    while let Some(arg) = args.next() {
        if arg == "-h" {
            return Ok(Invocation::Print(help()));
        }
        if arg == "-V" {
            return Ok(Invocation::Print(version()));
        }
        if let Some(opt) = long_option(&arg) {
            match opt.name {
                "help" if opt.inline.is_none() => return Ok(Invocation::Print(help())),
                "version" if opt.inline.is_none() => return Ok(Invocation::Print(version())),
                "config" => {
                    let v = value(&opt, "CONFIG", &mut args, USAGE)?;
                    once(&mut config, v.into(), "config", "CONFIG", USAGE)?;
                }
                name => return Err(unexpected_option(name, USAGE)),
            }
            continue;
        }
        if arg == "run-module" {
            match run_module(&mut args, &mut config)? {
                Some(run) => command = Some(Command::RunModule(run)),
                None => return Ok(Invocation::Print(run_module_help())),
            }
            break;
        }
        if arg == "help" {
            return match args.next() {
                None => Ok(Invocation::Print(help())),
                Some(c) if c == "run-module" => Ok(Invocation::Print(run_module_help())),
                Some(c) => Err(usage_error(
                    format!("unrecognized subcommand '{}'", c.to_string_lossy()),
                    USAGE,
                )),
            };
        }
        return Err(if arg.to_str().is_some_and(|a| a.starts_with('-')) {
            unexpected(&arg, USAGE)
        } else {
            usage_error(
                format!("unrecognized subcommand '{}'", arg.to_string_lossy()),
                USAGE,
            )
        });
    }
    let config = config.or_else(|| env_config.filter(|v| !v.is_empty()).map(PathBuf::from));
    Ok(Invocation::Run(Cli { config, command }))
}

/// `run-module`'s arguments, after the command's name; `--config` may be given here too. `None`
/// when its help is asked for.
fn run_module(
    args: &mut impl Iterator<Item = OsString>,
    config: &mut Option<PathBuf>,
) -> Result<Option<RunModuleArgs>, UsageError> {
    let usage = RUN_MODULE_USAGE;
    let mut options = RunModuleOptions::default();
    let mut wasm: Option<PathBuf> = None;
    let mut positional_only = false;
    while let Some(arg) = args.next() {
        if !positional_only {
            if arg == "--" {
                positional_only = true;
                continue;
            }
            if arg == "-h" {
                return Ok(None);
            }
            if let Some(opt) = long_option(&arg) {
                if opt.name == "help" && opt.inline.is_none() {
                    return Ok(None);
                }
                options.take(&opt, args, config)?;
                continue;
            }
            if arg.to_str().is_some_and(|a| a.starts_with('-')) {
                return Err(unexpected(&arg, usage));
            }
        }
        if wasm.is_some() {
            return Err(unexpected(&arg, usage));
        }
        wasm = Some(arg.into());
    }
    let mut missing = Vec::new();
    if options.manifest.is_none() {
        missing.push("--manifest <MANIFEST>");
    }
    if wasm.is_none() {
        missing.push("<WASM>");
    }
    match (wasm, options.manifest) {
        (Some(wasm), Some(manifest)) => Ok(Some(RunModuleArgs {
            wasm,
            manifest,
            ticks: options.ticks.unwrap_or(DEFAULT_TICKS),
            messages: options.messages,
        })),
        _ => Err(usage_error(
            format!(
                "the following required arguments were not provided:\n  {}",
                missing.join("\n  ")
            ),
            usage,
        )),
    }
}

/// `run-module`'s options as they are read.
#[derive(Default)]
struct RunModuleOptions {
    manifest: Option<PathBuf>,
    ticks: Option<u32>,
    messages: Vec<(String, String)>,
}

impl RunModuleOptions {
    /// Takes one option (and its value).
    fn take(
        &mut self,
        opt: &Opt<'_>,
        args: &mut impl Iterator<Item = OsString>,
        config: &mut Option<PathBuf>,
    ) -> Result<(), UsageError> {
        let usage = RUN_MODULE_USAGE;
        let invalid = |v: &OsStr, placeholder: &str, reason: &str| {
            usage_error(
                format!(
                    "invalid value '{}' for '--{} <{placeholder}>': {reason}",
                    v.to_string_lossy(),
                    opt.name
                ),
                usage,
            )
        };
        match opt.name {
            "config" => {
                let v = value(opt, "CONFIG", args, usage)?;
                once(config, v.into(), "config", "CONFIG", usage)
            }
            "manifest" => {
                let v = value(opt, "MANIFEST", args, usage)?;
                once(&mut self.manifest, v.into(), "manifest", "MANIFEST", usage)
            }
            "ticks" => {
                let v = value(opt, "TICKS", args, usage)?;
                let reason = format!("not a number from 0 to {}", u32::MAX);
                let n = v
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| invalid(&v, "TICKS", &reason))?;
                once(&mut self.ticks, n, "ticks", "TICKS", usage)
            }
            "message" => {
                let v = value(opt, "TOPIC=PAYLOAD", args, usage)?;
                let text = v
                    .to_str()
                    .ok_or_else(|| invalid(&v, "TOPIC=PAYLOAD", "not UTF-8"))?;
                let message =
                    parse_message(text).map_err(|reason| invalid(&v, "TOPIC=PAYLOAD", &reason))?;
                self.messages.push(message);
                Ok(())
            }
            name => Err(unexpected_option(name, usage)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: Option<&str>) -> Result<Invocation, UsageError> {
        parse(args.iter().map(OsString::from), env.map(OsString::from))
    }

    fn cli(args: &[&str], env: Option<&str>) -> Cli {
        match run(args, env) {
            Ok(Invocation::Run(cli)) => cli,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        match run(args, None) {
            Err(e) => e.to_string(),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn printed(args: &[&str]) -> String {
        match run(args, None) {
            Ok(Invocation::Print(text)) => text,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn module(wasm: &str, manifest: &str, ticks: u32, messages: &[(&str, &str)]) -> Command {
        Command::RunModule(RunModuleArgs {
            wasm: wasm.into(),
            manifest: manifest.into(),
            ticks,
            messages: messages
                .iter()
                .map(|(t, p)| (t.to_string(), p.to_string()))
                .collect(),
        })
    }

    #[test]
    fn the_daemon_takes_its_configuration_from_the_flag_else_the_environment() {
        let flag = cli(&["--config", "/etc/a.toml"], Some("/etc/b.toml"));
        assert_eq!(flag.config, Some(PathBuf::from("/etc/a.toml")));
        assert_eq!(flag.command, None);
        let joined = cli(&["--config=/etc/a.toml"], None);
        assert_eq!(joined.config, Some(PathBuf::from("/etc/a.toml")));
        let env = cli(&[], Some("/etc/b.toml"));
        assert_eq!(env.config, Some(PathBuf::from("/etc/b.toml")));
        assert_eq!(
            cli(&[], Some("")).config,
            None,
            "an empty variable is unset"
        );
        assert_eq!(cli(&[], None).config, None);
    }

    #[test]
    fn run_module_takes_its_options_in_any_order_and_config_on_either_side() {
        let c = cli(
            &[
                "--config",
                "agent.toml",
                "run-module",
                "--message",
                "a/b=c=d",
                "m.wasm",
                "--ticks=7",
                "--manifest",
                "m.toml",
                "--message=x=",
            ],
            None,
        );
        assert_eq!(c.config, Some(PathBuf::from("agent.toml")));
        assert_eq!(
            c.command,
            Some(module("m.wasm", "m.toml", 7, &[("a/b", "c=d"), ("x", "")]))
        );
        let after = cli(
            &[
                "run-module",
                "m.wasm",
                "--manifest",
                "m.toml",
                "--config",
                "a.toml",
            ],
            Some("env.toml"),
        );
        assert_eq!(after.config, Some(PathBuf::from("a.toml")));
        assert_eq!(after.command, Some(module("m.wasm", "m.toml", 3, &[])));
        let dashed = cli(
            &["run-module", "--manifest", "m.toml", "--", "-odd.wasm"],
            None,
        );
        assert_eq!(dashed.command, Some(module("-odd.wasm", "m.toml", 3, &[])));
    }

    #[test]
    fn help_and_version_are_printed_not_run() {
        for args in [
            &["--help"][..],
            &["-h"],
            &["help"],
            &["--config", "x", "-h"],
        ] {
            let text = printed(args);
            assert!(
                text.starts_with("Runs signed WebAssembly modules"),
                "{text}"
            );
            assert!(
                text.contains("run-module") && text.contains(CONFIG_ENV),
                "{text}"
            );
        }
        for args in [
            &["run-module", "--help"][..],
            &["run-module", "m.wasm", "-h"],
            &["help", "run-module"],
        ] {
            let text = printed(args);
            assert!(text.contains(RUN_MODULE_USAGE), "{text}");
            assert!(text.contains("[default: 3]"), "{text}");
        }
        for args in [&["--version"][..], &["-V"]] {
            assert_eq!(
                printed(args),
                format!("edge-agent {}\n", env!("CARGO_PKG_VERSION"))
            );
        }
    }

    #[test]
    fn usage_errors_say_what_is_wrong_and_show_the_usage() {
        let cases: &[(&[&str], &str, &str)] = &[
            (
                &["--conf", "x"],
                "unexpected argument '--conf' found",
                USAGE,
            ),
            (&["--bogus=1"], "unexpected argument '--bogus' found", USAGE),
            (&["-x"], "unexpected argument '-x' found", USAGE),
            (&["start"], "unrecognized subcommand 'start'", USAGE),
            (&["help", "start"], "unrecognized subcommand 'start'", USAGE),
            (
                &["--config"],
                "a value is required for '--config <CONFIG>' but none was supplied",
                USAGE,
            ),
            (
                &["--config", "a", "--config", "b"],
                "the argument '--config <CONFIG>' cannot be used multiple times",
                USAGE,
            ),
            (
                &["run-module", "m.wasm"],
                "the following required arguments were not provided:\n  --manifest <MANIFEST>",
                RUN_MODULE_USAGE,
            ),
            (
                &["run-module"],
                "the following required arguments were not provided:\n  --manifest <MANIFEST>\n  <WASM>",
                RUN_MODULE_USAGE,
            ),
            (
                &["run-module", "a.wasm", "b.wasm", "--manifest", "m"],
                "unexpected argument 'b.wasm' found",
                RUN_MODULE_USAGE,
            ),
            (
                &["run-module", "a.wasm", "--manifest", "m", "--ticks", "-1"],
                "invalid value '-1' for '--ticks <TICKS>'",
                RUN_MODULE_USAGE,
            ),
            (
                &[
                    "run-module",
                    "a.wasm",
                    "--manifest",
                    "m",
                    "--message",
                    "hello",
                ],
                "invalid value 'hello' for '--message <TOPIC=PAYLOAD>': \"hello\" is not TOPIC=PAYLOAD",
                RUN_MODULE_USAGE,
            ),
            (
                &["run-module", "a.wasm", "--manifest", "m", "--manifest", "n"],
                "the argument '--manifest <MANIFEST>' cannot be used multiple times",
                RUN_MODULE_USAGE,
            ),
            (
                &["run-module", "a.wasm", "--manifest", "m", "-x"],
                "unexpected argument '-x' found",
                RUN_MODULE_USAGE,
            ),
            (
                &["run-module", "a.wasm", "--manifest"],
                "a value is required for '--manifest <MANIFEST>'",
                RUN_MODULE_USAGE,
            ),
        ];
        for (args, message, usage) in cases {
            let text = error(args);
            assert!(text.starts_with(message), "{args:?}: {text}");
            assert!(
                text.contains(&format!("Usage: {usage}\n")),
                "{args:?}: {text}"
            );
        }
    }
}
