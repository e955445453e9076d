//! `edgectl keygen`, `sign` and `inspect`, run as an operator would run them, and how both
//! binaries print a refusal: each reason once.

use crate::support::edgectl::fails;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use crate::support::{tempdir, tiny_wasm};

const MANIFEST: &str = r#"
name = "heartbeat"
version = "1.0.0"
seq = 1
[limits]
fuel_per_call = 1000000
memory_max_bytes = 1048576
tick_interval_ms = 1000
[caps]
publish = ["heartbeat/#"]
kv_quota_bytes = 4096
gpio = [17]
i2c = [{ bus = 1, addresses = [0x76] }]
"#;

fn edgectl(dir: &Path, args: &[&str]) -> Output {
    crate::support::target_command(env!("CARGO_BIN_EXE_edgectl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run edgectl")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "edgectl failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A directory with a key pair `op.key`, `heartbeat.wasm`, `heartbeat.toml` and a signed
/// `heartbeat.bundle`.
fn signed_dir() -> tempfile::TempDir {
    let dir = tempdir();
    ok(edgectl(dir.path(), &["keygen", "--out", "op.key"]));
    fs::write(dir.path().join("heartbeat.wasm"), tiny_wasm()).unwrap();
    fs::write(dir.path().join("heartbeat.toml"), MANIFEST).unwrap();
    ok(edgectl(
        dir.path(),
        &[
            "sign",
            "--key",
            "op.key",
            "--wasm",
            "heartbeat.wasm",
            "--manifest",
            "heartbeat.toml",
            "--out",
            "heartbeat.bundle",
        ],
    ));
    dir
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_can_read_and_prints_the_key_id() {
    let dir = tempdir();
    let out = ok(edgectl(dir.path(), &["keygen", "--out", "op.key"]));
    let kid = out.trim();
    assert_eq!(kid.len(), 16, "{out}");
    assert!(kid.bytes().all(|c| c.is_ascii_hexdigit()));
    let mode = fs::metadata(dir.path().join("op.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let private = fs::read_to_string(dir.path().join("op.key")).unwrap();
    let public = fs::read_to_string(dir.path().join("op.key.pub")).unwrap();
    assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    let key = edge_agent::core::keys::parse_public_key(&public).unwrap();
    assert_eq!(edge_agent::core::keys::KeyId::of(&key).to_string(), kid);
}

#[test]
fn keygen_never_overwrites_a_key() {
    let dir = tempdir();
    ok(edgectl(dir.path(), &["keygen", "--out", "op.key"]));
    let before = fs::read(dir.path().join("op.key")).unwrap();
    let err = fails(edgectl(dir.path(), &["keygen", "--out", "op.key"]));
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read(dir.path().join("op.key")).unwrap(), before);
}

#[test]
fn openssl_reads_the_key_files() {
    let dir = tempdir();
    ok(edgectl(dir.path(), &["keygen", "--out", "op.key"]));
    for args in [
        vec!["pkey", "-in", "op.key", "-noout"],
        vec!["pkey", "-pubin", "-in", "op.key.pub", "-noout"],
    ] {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir.path())
            .output()
            .expect("openssl is installed by the test setup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn sign_then_inspect_with_the_trusted_key_succeeds() {
    let dir = signed_dir();
    let out = ok(edgectl(
        dir.path(),
        &["inspect", "--trust", "op.key.pub", "heartbeat.bundle"],
    ));
    assert!(out.contains("valid, by trusted key"), "{out}");
    assert!(out.contains("heartbeat 1.0.0"), "{out}");
    assert!(out.contains("i2c1=0x76"), "{out}");
    assert!(out.contains("gpio=17"), "{out}");
}

#[test]
fn inspect_json_reports_the_manifest() {
    let dir = signed_dir();
    let out = ok(edgectl(
        dir.path(),
        &[
            "inspect",
            "--trust",
            "op.key.pub",
            "--json",
            "heartbeat.bundle",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["manifest"]["name"], "heartbeat");
    assert_eq!(v["manifest"]["seq"], 1);
    assert_eq!(v["manifest"]["caps"]["i2c"][0]["addresses"][0], 0x76);
    let sha = v["manifest"]["wasm"]["sha256"].as_str().unwrap();
    assert_eq!(
        sha,
        edge_agent::core::manifest::Sha256::of(&tiny_wasm()).to_hex()
    );
}

#[test]
fn inspect_without_trust_prints_but_says_it_did_not_check() {
    let dir = signed_dir();
    let out = ok(edgectl(dir.path(), &["inspect", "heartbeat.bundle"]));
    assert!(out.contains("NOT CHECKED"), "{out}");
}

#[test]
fn inspect_refuses_a_bundle_with_any_changed_byte_with_a_reason() {
    let dir = signed_dir();
    let bundle = fs::read(dir.path().join("heartbeat.bundle")).unwrap();
    // A sample of positions across the whole bundle: container, headers, payload, signature, Wasm.
    for i in (0..bundle.len()).step_by(7) {
        let mut b = bundle.clone();
        b[i] ^= 0x20;
        fs::write(dir.path().join("tampered.bundle"), &b).unwrap();
        let err = fails(edgectl(
            dir.path(),
            &["inspect", "--trust", "op.key.pub", "tampered.bundle"],
        ));
        assert!(
            err.starts_with("edgectl: tampered.bundle: "),
            "byte {i}: {err}"
        );
        assert!(err.contains("refused"), "byte {i}: {err}");
    }
}

#[test]
fn inspect_refuses_a_bundle_signed_by_an_untrusted_key() {
    let dir = signed_dir();
    ok(edgectl(dir.path(), &["keygen", "--out", "other.key"]));
    let err = fails(edgectl(
        dir.path(),
        &["inspect", "--trust", "other.key.pub", "heartbeat.bundle"],
    ));
    assert!(
        err.contains("\"heartbeat\"") && err.contains("does not trust"),
        "{err}"
    );
}

#[test]
fn a_removal_is_signed_without_wasm() {
    let dir = signed_dir();
    fs::write(
        dir.path().join("remove.toml"),
        "name = \"heartbeat\"\nseq = 2\naction = \"remove\"\n",
    )
    .unwrap();
    ok(edgectl(
        dir.path(),
        &[
            "sign",
            "--key",
            "op.key",
            "--manifest",
            "remove.toml",
            "--out",
            "remove.bundle",
        ],
    ));
    let out = ok(edgectl(
        dir.path(),
        &["inspect", "--trust", "op.key.pub", "remove.bundle"],
    ));
    assert!(out.contains("action     remove"), "{out}");
}

#[test]
fn sign_explains_what_is_wrong() {
    let dir = signed_dir();
    let err = fails(edgectl(
        dir.path(),
        &[
            "sign",
            "--key",
            "op.key",
            "--manifest",
            "heartbeat.toml",
            "--out",
            "x.bundle",
        ],
    ));
    assert!(err.contains("needs the Wasm module"), "{err}");

    fs::write(
        dir.path().join("bad.toml"),
        MANIFEST.replace("heartbeat\"", "Heart Beat\""),
    )
    .unwrap();
    let err = fails(edgectl(
        dir.path(),
        &[
            "sign",
            "--key",
            "op.key",
            "--wasm",
            "heartbeat.wasm",
            "--manifest",
            "bad.toml",
            "--out",
            "x.bundle",
        ],
    ));
    assert!(err.contains("not well formed"), "{err}");

    fs::write(
        dir.path().join("typo.toml"),
        format!("{MANIFEST}\nfuel = 3\n"),
    )
    .unwrap();
    let err = fails(edgectl(
        dir.path(),
        &[
            "sign",
            "--key",
            "op.key",
            "--wasm",
            "heartbeat.wasm",
            "--manifest",
            "typo.toml",
            "--out",
            "x.bundle",
        ],
    ));
    assert!(err.contains("typo.toml") && err.contains("fuel"), "{err}");

    let err = fails(edgectl(
        dir.path(),
        &[
            "sign",
            "--key",
            "op.key.pub",
            "--wasm",
            "heartbeat.wasm",
            "--manifest",
            "heartbeat.toml",
            "--out",
            "x.bundle",
        ],
    ));
    assert!(
        err.contains("op.key.pub") && err.contains("private key"),
        "{err}"
    );

    let err = fails(edgectl(
        dir.path(),
        &[
            "sign",
            "--key",
            "missing.key",
            "--wasm",
            "heartbeat.wasm",
            "--manifest",
            "heartbeat.toml",
            "--out",
            "x.bundle",
        ],
    ));
    assert!(err.contains("missing.key"), "{err}");
    assert!(!dir.path().join("x.bundle").exists());
}

#[test]
fn inspect_refuses_what_is_not_a_bundle() {
    let dir = signed_dir();
    let err = fails(edgectl(
        dir.path(),
        &["inspect", "--trust", "op.key.pub", "heartbeat.wasm"],
    ));
    assert!(err.contains("not a bundle"), "{err}");
}

/// Signs `manifest` (TOML) with op.key into `out`, returning the whole output.
fn sign_manifest(dir: &Path, manifest: &str, out: &str) -> Output {
    fs::write(dir.join("m.toml"), manifest).unwrap();
    edgectl(
        dir,
        &[
            "sign",
            "--key",
            "op.key",
            "--wasm",
            "heartbeat.wasm",
            "--manifest",
            "m.toml",
            "--out",
            out,
        ],
    )
}

#[test]
fn sign_refuses_a_seq_above_two_to_the_53() {
    let dir = signed_dir();
    let at_max = MANIFEST.replace("seq = 1", "seq = 9007199254740992");
    ok(sign_manifest(dir.path(), &at_max, "max.bundle"));
    let above = MANIFEST.replace("seq = 1", "seq = 9007199254740993");
    let err = fails(sign_manifest(dir.path(), &above, "above.bundle"));
    assert!(
        err.contains("seq 9007199254740993") && err.contains("2^53"),
        "{err}"
    );
    assert!(!dir.path().join("above.bundle").exists());
}

#[test]
fn sign_warns_on_stderr_when_the_bundle_names_no_targets() {
    let dir = signed_dir();
    let out = sign_manifest(dir.path(), MANIFEST, "any.bundle");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("no [targets]"),
        "{stderr}"
    );
    assert!(stderr.contains("every device that trusts key"), "{stderr}");

    let targeted = format!("{MANIFEST}[targets]\ndevices = [\"pi-7\"]\n");
    let out = sign_manifest(dir.path(), &targeted, "pi-7.bundle");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no warning");
    let shown = ok(edgectl(dir.path(), &["inspect", "pi-7.bundle"]));
    assert!(shown.contains("devices=[pi-7]"), "{shown}");
}

/// How often `reason` appears in `text`.
fn count(text: &str, reason: &str) -> usize {
    text.matches(reason).count()
}

#[test]
fn inspect_prints_each_reason_for_a_refusal_once() {
    let dir = signed_dir();
    let bundle = fs::read(dir.path().join("heartbeat.bundle")).unwrap();
    // Format 2 exists (chunked delivery): 3 is a version no agent reads.
    let mut version3 = bundle.clone();
    version3[1] = 0x03;
    let mut signature = bundle.clone();
    // The bundle ends with the signature, then the Wasm's byte string head and the Wasm.
    let wasm_len = tiny_wasm().len();
    let wasm_head = if wasm_len < 24 { 1 } else { 2 };
    let last_signature_byte = bundle.len() - wasm_len - wasm_head - 1;
    signature[last_signature_byte] ^= 0x01;
    let mut trailing = bundle.clone();
    trailing.push(0);
    for (tampered, reason) in [
        (version3, "bundle format version 3 is not supported"),
        (signature, "the signature does not verify"),
        (trailing, "1 bytes follow the bundle"),
    ] {
        fs::write(dir.path().join("tampered.bundle"), &tampered).unwrap();
        let err = fails(edgectl(
            dir.path(),
            &["inspect", "--trust", "op.key.pub", "tampered.bundle"],
        ));
        assert_eq!(count(&err, reason), 1, "{err}");
        assert_eq!(count(&err, "refused"), 1, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    // A key error: the file named once, the reason once.
    let err = fails(edgectl(
        dir.path(),
        &["inspect", "--trust", "op.key", "heartbeat.bundle"],
    ));
    assert_eq!(count(&err, "op.key"), 1, "{err}");
    assert_eq!(count(&err, "not an Ed25519 public key"), 1, "{err}");
}

#[test]
fn the_agent_prints_each_reason_it_cannot_start_once() {
    let dir = tempdir();
    let missing = dir.path().join("missing.toml");
    let out = crate::support::target_command(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("--config")
        .arg(&missing)
        .env_remove("RUST_LOG")
        .output()
        .expect("run edge-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("edge-agent: cannot read"), "{err}");
    assert_eq!(count(&err, "No such file or directory"), 1, "{err}");
}
