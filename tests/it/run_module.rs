//! `edge-agent run-module`, the module author's inner loop, run as a process.

use std::process::Output;

use crate::support::guest_file;

fn run_module(name: &str, extra: &[&str]) -> Output {
    let wasm = guest_file(&format!("{name}.wasm"));
    let manifest = guest_file(&format!("{name}.toml"));
    crate::support::target_command(env!("CARGO_BIN_EXE_edge-agent"))
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

#[test]
fn bme280_telemetry_prints_plausible_readings_from_the_simulated_board() {
    let out = run_module("bme280-telemetry", &["--ticks", "2"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.contains("publish  bme280/reading"))
        .unwrap_or_else(|| panic!("no reading: {stdout}"));
    let json = line.split_once("bme280/reading ").unwrap().1;
    let json: String = serde_json::from_str(json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let t = v["temperature_c"].as_f64().unwrap();
    let p = v["pressure_pa"].as_f64().unwrap();
    let h = v["humidity_pct"].as_f64().unwrap();
    assert!((18.0..24.0).contains(&t), "{t}");
    assert!((100_000.0..102_500.0).contains(&p), "{p}");
    assert!((35.0..55.0).contains(&h), "{h}");
}

#[test]
fn bme280_telemetry_without_its_i2c_grant_is_refused_at_install() {
    let dir = crate::support::tempdir();
    let manifest = std::fs::read_to_string(guest_file("bme280-telemetry.toml")).unwrap();
    let stripped: String = manifest
        .lines()
        .filter(|l| !l.trim_start().starts_with("i2c"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(stripped, manifest, "the manifest had an i2c grant");
    let path = dir.path().join("no-i2c.toml");
    std::fs::write(&path, stripped).unwrap();
    let out = crate::support::target_command(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("run-module")
        .arg(guest_file("bme280-telemetry.wasm"))
        .arg("--manifest")
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stderr.contains("refused import edge.i2c_"), "{stderr}");
    assert!(stderr.contains("caps.i2c"), "{stderr}");
}

#[test]
fn blinky_toggles_the_simulated_led() {
    let out = run_module("blinky", &["--ticks", "3"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("gpio 17 high (changed 3 times)"),
        "{stdout}"
    );
}

#[test]
fn a_module_cannot_drive_the_terminal_or_forge_a_line() {
    let dir = crate::support::tempdir();
    let wasm = dir.path().join("forger.wasm");
    let manifest = dir.path().join("forger.toml");
    std::fs::write(
        &wasm,
        wat::parse_str(include_str!("hostile/log-forger.wat")).unwrap(),
    )
    .unwrap();
    std::fs::write(&manifest, "name = \"forger\"\nversion = \"1\"\nseq = 1\n").unwrap();
    let out = crate::support::target_command(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("run-module")
        .arg(&wasm)
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for control in ['\u{1b}', '\r', '\0'] {
        assert!(
            !stdout.contains(control),
            "{control:?} reached the terminal: {stdout:?}"
        );
    }
    // The forged summary stays inside the log line, escaped; only the real one starts a line.
    assert!(
        stdout.contains("\\u{1b}[2J\\rhidden\\r\\u{0}\\nsummary"),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("summary")).count(),
        1,
        "{stdout}"
    );
}
