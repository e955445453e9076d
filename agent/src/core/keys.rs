//! Signing keys, key ids and the device's trust set.
//!
//! Keys are Ed25519. Private keys are stored as PKCS#8 PEM, public keys as SubjectPublicKeyInfo
//! PEM, so `openssl pkey` reads both. A key id is the first 8 bytes of the SHA-256 of the 32-byte
//! raw public key; it travels as the COSE `kid` and is shown as 16 hex digits.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::manifest::Sha256;

/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 8;

/// A key id: the first 8 bytes of SHA-256(raw Ed25519 public key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// The key id of a public key.
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::of(key.as_bytes());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.0[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Problems with key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not a PKCS#8 PEM Ed25519 private key.
    #[error("not an Ed25519 private key in PKCS#8 PEM form: {0}")]
    BadPrivateKey(String),
    /// The text is not an SPKI PEM Ed25519 public key.
    #[error("not an Ed25519 public key in SubjectPublicKeyInfo PEM form: {0}")]
    BadPublicKey(String),
    /// The public key is of small order and would accept forged signatures.
    #[error("public key {0} is a weak (small-order) Ed25519 key and cannot be trusted")]
    WeakKey(KeyId),
    /// Another trusted key has the same key id: a bundle's `kid` could not say which signed it.
    #[error(
        "public key with key id {0} cannot be trusted: a different trusted key has the same key id"
    )]
    KeyIdCollision(KeyId),
}

/// The signing key made from a 32-byte secret seed. The seed must come from a cryptographically
/// secure random source, which the caller reads (`edgectl keygen`: the operating system's).
pub fn signing_key_from_seed(seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(seed)
}

/// PKCS#8 PEM of a private key. Written as PKCS#8 v1 (RFC 8410 `PrivateKeyInfo` without the
/// optional public key), which OpenSSL 3.0 reads; the public key is derived when loaded.
pub fn private_key_pem(key: &SigningKey) -> String {
    let bytes = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    // Encoding a valid 32-byte key into PKCS#8 cannot fail.
    bytes
        .to_pkcs8_pem(Default::default())
        .map(|pem| pem.to_string())
        .unwrap_or_else(|e| unreachable!("PKCS#8 encoding of an Ed25519 key: {e}"))
}

/// SPKI PEM of a public key.
pub fn public_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(Default::default())
        .unwrap_or_else(|e| unreachable!("SPKI encoding of an Ed25519 key: {e}"))
}

/// Parses a PKCS#8 PEM private key.
pub fn parse_private_key(pem: &str) -> Result<SigningKey, KeyError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError::BadPrivateKey(e.to_string()))
}

/// Parses an SPKI PEM public key, refusing weak keys.
pub fn parse_public_key(pem: &str) -> Result<VerifyingKey, KeyError> {
    let key = VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| KeyError::BadPublicKey(e.to_string()))?;
    if key.is_weak() {
        return Err(KeyError::WeakKey(KeyId::of(&key)));
    }
    Ok(key)
}

/// Whether `sig` is a valid strict Ed25519 signature of `msg` by `key` (`verify_strict`: no
/// small-order components, canonical encodings). The one place the device binary verifies a
/// signature, bundles and trust documents alike (one copy of the code, not one per caller).
#[inline(never)]
pub fn verify_strict(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> bool {
    ed25519_dalek::Signature::from_slice(sig).is_ok_and(|sig| key.verify_strict(msg, &sig).is_ok())
}

/// The public keys a device accepts bundles from, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustSet {
    keys: BTreeMap<KeyId, VerifyingKey>,
}

impl TrustSet {
    /// An empty trust set: every bundle is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key; returns its id. Weak keys are refused, and so is a key whose id another
    /// trusted key has ([`KeyError::KeyIdCollision`]: the set stays as it was). The same key
    /// again is harmless and changes nothing (two copies of one key file, say).
    pub fn insert(&mut self, key: VerifyingKey) -> Result<KeyId, KeyError> {
        self.insert_as(KeyId::of(&key), key)
    }

    /// [`TrustSet::insert`] under a given id: a real 64-bit collision cannot be made in a test.
    fn insert_as(&mut self, id: KeyId, key: VerifyingKey) -> Result<KeyId, KeyError> {
        if key.is_weak() {
            return Err(KeyError::WeakKey(id));
        }
        match self.keys.get(&id) {
            Some(trusted) if *trusted == key => Ok(id),
            Some(_) => Err(KeyError::KeyIdCollision(id)),
            None => {
                self.keys.insert(id, key);
                Ok(id)
            }
        }
    }

    /// The key with this id, if trusted.
    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted key ids.
    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }
}

impl TrustSet {
    /// A trust set of these keys; weak keys are refused.
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> Result<TrustSet, KeyError> {
        let mut set = TrustSet::new();
        for key in keys {
            set.insert(key)?;
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let back = parse_private_key(&private_key_pem(&key)).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let public = parse_public_key(&public_key_pem(&key.verifying_key())).unwrap();
        assert_eq!(public, key.verifying_key());
    }

    #[test]
    fn key_id_is_the_sha256_prefix_of_the_raw_public_key() {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let digest = Sha256::of(key.as_bytes());
        assert_eq!(KeyId::of(&key).0, digest.0[..8]);
        assert_eq!(KeyId::of(&key).to_string().len(), 16);
    }

    #[test]
    fn a_private_key_is_not_a_public_key() {
        let key = SigningKey::from_bytes(&[7; 32]);
        assert!(parse_public_key(&private_key_pem(&key)).is_err());
        assert!(parse_private_key(&public_key_pem(&key.verifying_key())).is_err());
        assert!(parse_public_key("garbage").is_err());
    }

    #[test]
    fn a_second_key_with_the_same_key_id_is_refused_and_the_first_stays() {
        let first = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let second = SigningKey::from_bytes(&[8; 32]).verifying_key();
        let id = KeyId::of(&first);
        let mut set = TrustSet::new();
        assert_eq!(set.insert(first), Ok(id));
        let err = set.insert_as(id, second).unwrap_err();
        assert_eq!(err, KeyError::KeyIdCollision(id));
        assert!(err.to_string().contains(&id.to_string()), "{err}");
        assert_eq!(
            set.get(&id),
            Some(&first),
            "the first key is still the one trusted"
        );
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn the_same_key_twice_is_trusted_once() {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let set = TrustSet::from_keys([key, key]).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.get(&KeyId::of(&key)), Some(&key));
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point (small order) encoded as a public key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        assert!(matches!(
            TrustSet::new().insert(weak),
            Err(KeyError::WeakKey(_))
        ));
        assert!(parse_public_key(&public_key_pem(&weak)).is_err());
    }
}
