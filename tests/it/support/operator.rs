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
    /// The deterministic test key `harness::key(seed)`, written out.
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
}
