//! The operator's signing key and its files.

use super::*;
use ed25519_dalek::SigningKey;
use edge_agent::core::keys;
use std::fs::{self};
use std::path::PathBuf;

/// The operator's signing key, trusted by every agent started with it: `op.key` (PKCS#8 PEM) and
/// `op.key.pub` in a temporary directory.
pub struct Operator {
    dir: tempfile::TempDir,
    /// The signing key.
    pub key: SigningKey,
    /// The private key file (for `edgectl`).
    pub key_file: PathBuf,
    /// The public key file (for the agent's `trusted_keys`).
    pub pub_file: PathBuf,
}

impl Operator {
    /// The deterministic test key `support::key(seed)`, written out.
    pub fn new(seed: u8) -> Operator {
        let dir = tempdir();
        let key = key(seed);
        let key_file = dir.path().join("op.key");
        let pub_file = dir.path().join("op.key.pub");
        fs::write(&key_file, keys::private_key_pem(&key)).unwrap();
        fs::write(&pub_file, keys::public_key_pem(&key.verifying_key())).unwrap();
        Operator {
            dir,
            key,
            key_file,
            pub_file,
        }
    }

    /// Writes `bytes` to a file in the operator's directory (a bundle for `edgectl deploy`).
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    /// A signed install bundle: guest `name`'s manifest at `seq` (ticking every [`TICK_MS`]),
    /// carrying `wasm`.
    pub fn bundle_with(&self, name: &str, seq: u64, wasm: &[u8]) -> Vec<u8> {
        let (mut m, _) = guest(name);
        m.seq = seq;
        m.version = format!("1.0.{seq}");
        if m.limits.tick_interval_ms > 0 {
            m.limits.tick_interval_ms = TICK_MS;
        }
        signed(m, wasm, &self.key)
    }

    /// A signed install bundle of guest `name` at `seq`, carrying the Wasm of guest `wasm_of`
    /// (usually `name` itself; another guest's to make a version that misbehaves).
    pub fn bundle(&self, name: &str, seq: u64, wasm_of: &str) -> Vec<u8> {
        self.bundle_with(name, seq, &guest(wasm_of).1)
    }
}

/// Tick interval of every ticking module the daemon tests deploy: a handful of ticks takes a
/// fraction of a second.
pub const TICK_MS: u64 = 50;
