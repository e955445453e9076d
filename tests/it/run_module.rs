//! `edge-agent run-module`, the module author's inner loop, run as a process.

use std::process::{Command, Output};

use crate::harness::guest_file;

fn run_module(name: &str, extra: &[&str]) -> Output {
    let wasm = guest_file(&format!("{name}.wasm"));
    let manifest = guest_file(&format!("{name}.toml"));
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("run-module")
        .arg(&wasm)
        .arg("--manifest")
        .arg(&manifest)
        .args(extra)
        .output()
        .expect("run edge-agent")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn heartbeat_runs_and_its_publishes_are_printed() {
    let out = run_module("heartbeat", &["--ticks", "3"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for n in 1..=3 {
        assert!(
            stdout.contains(&format!("publish  heartbeat/count \"{n}\"")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("summary"), "{stdout}");
}

#[test]
fn echo_answers_messages_given_on_the_command_line() {
    let out = run_module("echo", &["--message", "hello=world", "--message", "a/b=c"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("publish  echo/hello \"world\""), "{stdout}");
    assert!(stdout.contains("publish  echo/a/b \"c\""), "{stdout}");
}

#[test]
fn fuel_hog_ends_promptly_out_of_fuel_with_a_non_zero_exit() {
    let out = run_module("fuel-hog", &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("tick 1: out of fuel"), "{stderr}");
}

#[test]
fn mem_hog_is_refused_at_its_cap() {
    let out = run_module("mem-hog", &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("memory growth refused"), "{stderr}");
    assert!(stderr.contains("2097152"), "{stderr}");
}

#[test]
fn trapper_reports_its_trap() {
    let out = run_module("trapper", &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tick 1: trapped"), "{stderr}");
}

#[test]
fn sneaky_is_refused_at_install_with_the_import_named() {
    let out = run_module("sneaky", &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stderr.contains("refused import edge.publish"), "{stderr}");
}

#[test]
fn the_c_example_runs_too() {
    let out = run_module("c-counter", &["--ticks", "2"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("publish  c-counter/count"), "{stdout}");
}
