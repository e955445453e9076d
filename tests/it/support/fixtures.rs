//! Fixtures: deterministic keys, small Wasm modules, manifests, hand-made bundles, the guest
//! modules as `modules/build` leaves them, and how to run this build's binaries.

use coset::{CoseSign1Builder, HeaderBuilder, TaggedCborSerializable as _, iana};
use ed25519_dalek::{Signer as _, SigningKey};
use edge_agent::core::bundle;
use edge_agent::core::keys::{KeyId, TrustSet};
use edge_agent::core::manifest::{Manifest, Sha256, WasmRef};
use edge_agent::core::verify::Verifier;

/// A fixed signing key (deterministic fixtures).
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A verifier trusting exactly `keys`.
pub fn verifier(keys: &[&SigningKey]) -> Verifier {
    let trust = TrustSet::from_keys(keys.iter().map(|k| k.verifying_key())).unwrap();
    Verifier::new(trust, edge_agent::engine::WasmLimits::default())
}

/// A small valid Wasm module.
pub fn tiny_wasm() -> Vec<u8> {
    wat::parse_str(
        r#"(module
             (memory (export "memory") 1)
             (func (export "tick") (result i32) i32.const 0))"#,
    )
    .unwrap()
}

/// An install manifest in the documented shape.
pub fn manifest(name: &str, seq: u64) -> Manifest {
    Manifest::from_toml(&format!(
        r#"
name = "{name}"
version = "1.0.{seq}"
seq = {seq}
[limits]
fuel_per_call = 1000000
memory_max_bytes = 1048576
tick_interval_ms = 1000
[caps]
publish = ["{name}/#"]
kv_quota_bytes = 4096
"#
    ))
    .unwrap()
}

/// A properly signed install bundle.
pub fn signed(m: Manifest, wasm: &[u8], key: &SigningKey) -> Vec<u8> {
    bundle::sign(m, Some(wasm), key, bundle::DEFAULT_MAX_BUNDLE_BYTES).unwrap()
}

/// How to build a bundle by hand, bypassing every check `bundle::sign` makes.
pub struct Raw<'a> {
    pub payload: Vec<u8>,
    pub wasm: Option<&'a [u8]>,
    pub key: &'a SigningKey,
    pub alg: iana::Algorithm,
    pub kid: Option<Vec<u8>>,
    pub unprotected_kid: bool,
}

impl<'a> Raw<'a> {
    /// Defaults: EdDSA, the key's own kid, the manifest as given (its digest filled from `wasm`).
    pub fn new(mut m: Manifest, wasm: Option<&'a [u8]>, key: &'a SigningKey) -> Self {
        if let Some(w) = wasm {
            m.wasm.get_or_insert(WasmRef {
                sha256: Sha256::of(w),
                size: w.len() as u64,
            });
        }
        Raw {
            payload: m.to_cbor(),
            wasm,
            key,
            alg: iana::Algorithm::EdDSA,
            kid: Some(KeyId::of(&key.verifying_key()).0.to_vec()),
            unprotected_kid: false,
        }
    }

    pub fn build(self) -> Vec<u8> {
        let mut protected = HeaderBuilder::new().algorithm(self.alg);
        if let Some(kid) = &self.kid {
            protected = protected.key_id(kid.clone());
        }
        let mut builder = CoseSign1Builder::new()
            .protected(protected.build())
            .payload(self.payload);
        if self.unprotected_kid {
            builder = builder.unprotected(HeaderBuilder::new().key_id(vec![1]).build());
        }
        let key = self.key;
        let sign1 = builder
            .create_signature(&[], |tbs| key.sign(tbs).to_bytes().to_vec())
            .build()
            .to_tagged_vec()
            .unwrap();
        bundle::encode(&sign1, self.wasm)
    }
}

/// A temporary directory removed at drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Decodes hex written with spaces and newlines.
pub fn unhex(text: &str) -> Vec<u8> {
    let digits: String = text.chars().filter(char::is_ascii_hexdigit).collect();
    hex::decode(digits).unwrap()
}

/// The repository root.
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds the guest modules once per test process (`modules/build`, incremental and locked).
fn built_modules() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let status = std::process::Command::new(repo().join("modules/build"))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run modules/build");
        assert!(status.success(), "modules/build failed");
        repo().join("target/modules")
    })
}

/// A guest module's Wasm bytes and manifest, as `modules/build` leaves them.
pub fn guest(name: &str) -> (Manifest, Vec<u8>) {
    let dir = built_modules();
    let wasm = std::fs::read(dir.join(format!("{name}.wasm")))
        .unwrap_or_else(|e| panic!("{name}.wasm: {e}"));
    let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
    (Manifest::from_toml(&text).unwrap(), wasm)
}

/// Path of a built guest module file (`.wasm` or `.toml`).
pub fn guest_file(file: &str) -> std::path::PathBuf {
    built_modules().join(file)
}

/// A command running `program`, one of this build's binaries (or the test binary itself). When
/// the tests run for another architecture under qemu-user (`just test-arm`), `EDGE_TEST_RUNNER`
/// holds the emulator command (`qemu-aarch64 -L /usr/aarch64-linux-gnu`), which is put in front:
/// qemu-user does not follow `execve` into another emulated binary by itself.
pub fn target_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    match std::env::var("EDGE_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            let mut cmd = std::process::Command::new(words.next().unwrap_or_default());
            cmd.args(words).arg(program);
            cmd
        }
        _ => std::process::Command::new(program),
    }
}
