//! `edgectl` as a subprocess, bounded in time.

use super::*;
use std::fs::{self, File};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `edgectl` with `args`, killed if it takes longer than 30 s.
pub fn edgectl(args: &[&str]) -> Output {
    let dir = tempdir();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = target_command(env!("CARGO_BIN_EXE_edgectl"))
        .args(args)
        .env_remove("EDGECTL_BROKER")
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("run edgectl");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("edgectl {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: fs::read(out).unwrap(),
        stderr: fs::read(err).unwrap(),
    }
}

/// Runs `edgectl` and requires it to succeed; returns its stdout.
pub fn edgectl_ok(args: &[&str]) -> String {
    let out = edgectl(args);
    assert!(
        out.status.success(),
        "edgectl {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The stderr of an edgectl run that must have failed.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "edgectl succeeded unexpectedly: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}
