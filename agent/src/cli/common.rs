//! What `edgectl`'s key and bundle commands (`cli/edgectl.rs`) and its fleet commands
//! (`cli/fleet.rs`) share: the error type, key files and the clock. Both depend on this module;
//! it depends on neither.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::files::{self, FileError};
use crate::core::bundle::SignError;
use crate::core::keys::{self, KeyError, TrustSet};
use crate::core::trust::TrustError;
use crate::core::verify::VerifyError;
use crate::mqtt;

/// Largest key or manifest file read.
pub const SMALL_FILE_MAX: u64 = 64 * 1024;

/// Why an edgectl command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// A key file is not a usable key.
    #[error("{path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The TOML manifest is malformed.
    #[error("{path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// A trust policy TOML file is malformed.
    #[error("{path}: {reason}")]
    TrustPolicy {
        /// The policy file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A trust document is invalid, or could not be made from its policy.
    #[error("{path}: {source}")]
    Trust {
        /// The document (or the policy it was to be signed from).
        path: PathBuf,
        /// Why.
        #[source]
        source: TrustError,
    },
    /// The bundle failed verification (or could not be read at all).
    #[error("{path}: {source}")]
    Invalid {
        /// The bundle file.
        path: PathBuf,
        /// Why.
        #[source]
        source: VerifyError,
    },
    /// Arguments that do not make sense together (beyond what the parser checks).
    #[error("{0}")]
    Usage(String),
    /// A fleet command failed (broker, timeout, arguments).
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The operating system's random source failed.
    #[error("the system random source failed: {0}")]
    Random(String),
    /// Writing to the terminal failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Why a fleet command failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Broker settings.
    #[error(transparent)]
    Setup(#[from] mqtt::MqttSetupError),
    /// The broker could not be reached or dropped the connection.
    #[error("broker {broker}: {reason}")]
    Broker {
        /// The URL.
        broker: String,
        /// Why.
        reason: String,
    },
    /// Nothing arrived in time.
    #[error("{0}")]
    Timeout(String),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

/// Reads a private key file.
pub fn read_private_key(path: &Path) -> Result<ed25519_dalek::SigningKey, CliError> {
    let text = files::read_text(path, SMALL_FILE_MAX)?;
    keys::parse_private_key(&text).map_err(|source| CliError::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a public key file (SubjectPublicKeyInfo PEM).
pub fn read_public_key(path: &Path) -> Result<ed25519_dalek::VerifyingKey, CliError> {
    let text = files::read_text(path, SMALL_FILE_MAX)?;
    keys::parse_public_key(&text).map_err(|source| CliError::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads public key files into a trust set.
pub fn read_trust_set(paths: &[PathBuf]) -> Result<TrustSet, CliError> {
    let mut trust = TrustSet::new();
    for path in paths {
        let key_err = |source| CliError::Key {
            path: path.clone(),
            source,
        };
        let text = files::read_text(path, SMALL_FILE_MAX)?;
        let key = keys::parse_public_key(&text).map_err(key_err)?;
        trust.insert(key).map_err(key_err)?;
    }
    Ok(trust)
}

/// A new signing key from the operating system's random source.
pub fn generate_key() -> Result<ed25519_dalek::SigningKey, CliError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| CliError::Random(e.to_string()))?;
    Ok(keys::signing_key_from_seed(&seed))
}

/// Seconds since the Unix epoch, by the system clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            generate_key().unwrap().to_bytes(),
            generate_key().unwrap().to_bytes()
        );
    }
}
