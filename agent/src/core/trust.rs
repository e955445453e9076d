//! The trust document: which keys may sign bundles for a fleet, with what scope, which keys are
//! revoked, and which roots come next — signed by a threshold of the device's root keys
//! (docs/protocol.md, "Trust document").
//!
//! A device is provisioned once with its roots (`[trust] roots`, `threshold`). A document is a
//! tagged COSE_Sign (RFC 9052 §4.1: one payload, one signature per signer) whose payload is the
//! canonical CBOR of [`TrustPayload`]. [`verify`] accepts it only when at least `threshold`
//! distinct current roots signed it (each signature strict Ed25519; a root that signs twice, or a
//! signature by a root that does not verify, refuses the document), its `version` is above the
//! one in effect, it has not expired, and — when it names the next root set — the threshold of
//! the **new** roots signed it too (as TUF's root rotation).
//!
//! What a document grants is a [`Policy`]: a bundle's `kid` must be in it, not revoked, and
//! the key's scope (module-name patterns, device groups, `not_after`) must cover the bundle; the
//! document itself may expire. Clock readings are the caller's (`max(system clock, time floor)`
//! on a device).

use std::fmt;

use coset::cbor::Value;
use coset::{
    CborSerializable as _, CoseSignBuilder, CoseSignatureBuilder, HeaderBuilder,
    TaggedCborSerializable as _, iana,
};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::cbor;
use super::keys::{self, KEY_ID_LEN, KeyId};
use super::manifest::{LIST_MAX_LEN, NAME_MAX_LEN, SEQ_MAX, is_valid_id, is_valid_module_name};

/// Largest trust document accepted, bytes.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// Most signatures a document may carry: every current and every new root of a rotation.
pub const MAX_SIGNATURES: usize = 2 * MAX_ROOTS;
/// Most keys in a root set.
pub const MAX_ROOTS: usize = 16;
/// Most signing keys a document may grant.
pub const MAX_KEYS: usize = 256;
/// Most revoked key ids a document may list.
pub const MAX_REVOKED: usize = 1024;
/// Most seq floor resets a document may carry.
pub const MAX_SEQ_RESETS: usize = 256;
/// The content type in the document's body protected header: what tells a trust document from
/// anything else a root key might sign.
pub const CONTENT_TYPE: &str = "application/edge-trust+cbor";

/// The envelope: a tag, an array of four, the body headers, and per signature an array of three
/// with its headers. Each protected header is walked again on its own.
const ENVELOPE: cbor::Bounds = cbor::Bounds {
    max_items: 16 + 8 * 32,
    max_depth: 5,
};

const _: () = assert!(
    MAX_SIGNATURES == 32,
    "ENVELOPE's bound counts 8 items per signature"
);

/// A byte string of exactly `N` bytes in CBOR (hex in human-readable formats).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fixed<const N: usize>(pub [u8; N]);

impl<const N: usize> fmt::Debug for Fixed<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> Serialize for Fixed<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de, const N: usize> Deserialize<'de> for Fixed<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> serde::de::Visitor<'_> for V<N> {
            type Value = Fixed<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of {N} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Fixed<N>, E> {
                <[u8; N]>::try_from(v)
                    .map(Fixed)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Fixed<N>, E> {
                let bytes = hex::decode(v).map_err(E::custom)?;
                self.visit_bytes(&bytes)
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V::<N>)
        } else {
            d.deserialize_bytes(V::<N>)
        }
    }
}

/// A signing key the document grants, with its scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyGrant {
    /// The raw 32-byte Ed25519 public key (its key id is derived from it).
    pub key: Fixed<32>,
    /// Module-name patterns the key may sign for (`*` matches any run of characters); absent:
    /// every module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<Vec<String>>,
    /// Groups a device must be in (one of them) to accept the key's bundles; absent: every
    /// device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// Unix seconds after which the key's bundles are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// A root set on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootKeys {
    /// Raw 32-byte Ed25519 public keys.
    pub keys: Vec<Fixed<32>>,
    /// How many distinct roots must sign.
    pub threshold: u64,
}

/// A module whose seq floor the roots reset (recovery from a seq poisoned by a leaked key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqReset {
    /// The module.
    pub module: String,
    /// The highest seq the device keeps for it afterwards (lowered to this, never raised).
    pub seq: u64,
}

/// The signed payload. The order of the fields is the order of the keys in its canonical CBOR
/// encoding, which devices require (decoded and encoded again, byte for byte the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustPayload {
    /// Strictly increasing: a device refuses a document whose version is not above the one in
    /// effect, and keeps the version forever.
    pub version: u64,
    /// When it was signed, unix seconds (raises the device's time floor).
    pub issued_at: u64,
    /// Unix seconds after which the document no longer lets any bundle in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The signing keys and their scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyGrant>,
    /// Revoked key ids: modules installed from bundles they signed are stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<Fixed<KEY_ID_LEN>>,
    /// Seq floors reset, applied once, when this version is accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seq_resets: Vec<SeqReset>,
    /// The next root set (root rotation); absent: the roots stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots: Option<RootKeys>,
}

impl TrustPayload {
    /// The canonical CBOR encoding.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        ciborium::into_writer(self, &mut out).unwrap_or_else(|e| unreachable!("{e}"));
        out
    }

    /// Decodes a payload (bounded first); it must be in its canonical encoding: what
    /// [`TrustPayload::to_cbor`] writes and nothing else (shortest heads, definite lengths, keys
    /// in the order of the fields, absent and empty optional fields omitted, no other keys).
    ///
    /// Read through ciborium's `Value` (which the device binary has anyway for COSE) rather than
    /// a serde decoder per type: that kept 40 KB out of the device binary.
    pub fn from_cbor(bytes: &[u8]) -> Result<TrustPayload, TrustError> {
        cbor::check(bytes, cbor::DOCUMENT).map_err(|e| TrustError::Payload(e.to_string()))?;
        let value = Value::from_slice(bytes).map_err(|e| TrustError::Payload(format!("{e:?}")))?;
        // Encoding the value again gives the same bytes only if every head was shortest and
        // every length definite.
        let again = value
            .clone()
            .to_vec()
            .map_err(|e| TrustError::Payload(format!("{e:?}")))?;
        if let Some(at) = cbor::first_difference(&again, bytes) {
            return Err(TrustError::NotCanonical { at });
        }
        wire::payload(value).map_err(TrustError::Payload)
    }
}

/// The payload read from a CBOR value, field by field, as `TrustPayload`'s serde encoding
/// writes it.
mod wire {
    use coset::cbor::Value;

    use super::{Fixed, KeyGrant, RootKeys, SeqReset, TrustPayload};

    type Map = Vec<(Value, Value)>;

    /// The entries of a map whose keys are some of `order`, in that order, each once.
    fn fields(
        value: Value,
        what: &str,
        order: &[&'static str],
    ) -> Result<Vec<(usize, Value)>, String> {
        let Value::Map(entries): Value = value else {
            return Err(format!("{what} is not a map"));
        };
        let entries: Map = entries;
        let mut out: Vec<(usize, Value)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Value::Text(k) = k else {
                return Err(format!("{what} has a key that is not text"));
            };
            let i = order
                .iter()
                .position(|o| *o == k)
                .ok_or_else(|| format!("{what} has an unknown key {k:?}"))?;
            if out.last().is_some_and(|(last, _)| *last >= i) {
                return Err(format!(
                    "{what}: key {k:?} repeated or out of order (docs/protocol.md)"
                ));
            }
            out.push((i, v));
        }
        Ok(out)
    }

    fn uint(v: Value, what: &str) -> Result<u64, String> {
        match v {
            Value::Integer(i) => u64::try_from(i).map_err(|_| format!("{what} is out of range")),
            _ => Err(format!("{what} is not an unsigned integer")),
        }
    }

    fn text(v: Value, what: &str) -> Result<String, String> {
        match v {
            Value::Text(t) => Ok(t),
            _ => Err(format!("{what} is not text")),
        }
    }

    fn bytes<const N: usize>(v: Value, what: &str) -> Result<Fixed<N>, String> {
        match v {
            Value::Bytes(b) => <[u8; N]>::try_from(b.as_slice())
                .map(Fixed)
                .map_err(|_| format!("{what} is {} bytes, not {N}", b.len())),
            _ => Err(format!("{what} is not a byte string")),
        }
    }

    /// An array; `omit_empty`: an empty one must have been left out.
    fn array<T>(
        v: Value,
        what: &str,
        omit_empty: bool,
        item: impl Fn(Value) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        match v {
            Value::Array(items) if omit_empty && items.is_empty() => {
                Err(format!("{what} is empty: an empty list is omitted"))
            }
            Value::Array(items) => items.into_iter().map(item).collect(),
            _ => Err(format!("{what} is not an array")),
        }
    }

    fn texts(v: Value, what: &str) -> Result<Vec<String>, String> {
        array(v, what, false, |t| text(t, what))
    }

    fn grant(v: Value) -> Result<KeyGrant, String> {
        let mut g = KeyGrant {
            key: Fixed([0; 32]),
            modules: None,
            groups: None,
            not_after: None,
        };
        let mut has_key = false;
        for (i, v) in fields(v, "a key", &["key", "modules", "groups", "not_after"])? {
            match i {
                0 => {
                    g.key = bytes(v, "a key's key")?;
                    has_key = true;
                }
                1 => g.modules = Some(texts(v, "a key's modules")?),
                2 => g.groups = Some(texts(v, "a key's groups")?),
                _ => g.not_after = Some(uint(v, "a key's not_after")?),
            }
        }
        if !has_key {
            return Err("a key has no key".into());
        }
        Ok(g)
    }

    fn reset(v: Value) -> Result<SeqReset, String> {
        let (mut module, mut seq) = (None, None);
        for (i, v) in fields(v, "a seq reset", &["module", "seq"])? {
            match i {
                0 => module = Some(text(v, "a seq reset's module")?),
                _ => seq = Some(uint(v, "a seq reset's seq")?),
            }
        }
        match (module, seq) {
            (Some(module), Some(seq)) => Ok(SeqReset { module, seq }),
            _ => Err("a seq reset needs module and seq".into()),
        }
    }

    fn roots(v: Value) -> Result<RootKeys, String> {
        let (mut keys, mut threshold) = (None, None);
        for (i, v) in fields(v, "roots", &["keys", "threshold"])? {
            match i {
                0 => keys = Some(array(v, "roots' keys", false, |k| bytes(k, "a root key"))?),
                _ => threshold = Some(uint(v, "roots' threshold")?),
            }
        }
        match (keys, threshold) {
            (Some(keys), Some(threshold)) => Ok(RootKeys { keys, threshold }),
            _ => Err("roots need keys and threshold".into()),
        }
    }

    pub(super) fn payload(value: Value) -> Result<TrustPayload, String> {
        let mut p = TrustPayload {
            version: 0,
            issued_at: 0,
            expires_at: None,
            keys: Vec::new(),
            revoked: Vec::new(),
            seq_resets: Vec::new(),
            roots: None,
        };
        let (mut version, mut issued_at) = (false, false);
        let order = [
            "version",
            "issued_at",
            "expires_at",
            "keys",
            "revoked",
            "seq_resets",
            "roots",
        ];
        for (i, v) in fields(value, "the payload", &order)? {
            match i {
                0 => {
                    p.version = uint(v, "version")?;
                    version = true;
                }
                1 => {
                    p.issued_at = uint(v, "issued_at")?;
                    issued_at = true;
                }
                2 => p.expires_at = Some(uint(v, "expires_at")?),
                3 => p.keys = array(v, "keys", true, grant)?,
                4 => p.revoked = array(v, "revoked", true, |k| bytes(k, "a revoked key id"))?,
                5 => p.seq_resets = array(v, "seq_resets", true, reset)?,
                _ => p.roots = Some(roots(v)?),
            }
        }
        if !version || !issued_at {
            return Err("the payload needs version and issued_at".into());
        }
        Ok(p)
    }
}

/// A set of root keys and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// In the order given; at most [`MAX_ROOTS`], so lists beat maps here (in code size too).
    keys: Vec<(KeyId, VerifyingKey)>,
    threshold: usize,
}

impl Roots {
    /// Roots from keys and a threshold: 1 ≤ threshold ≤ keys, at most [`MAX_ROOTS`] keys, no
    /// key twice, no weak key.
    pub fn new(
        keys: impl IntoIterator<Item = VerifyingKey>,
        threshold: u64,
    ) -> Result<Roots, TrustError> {
        let mut map: Vec<(KeyId, VerifyingKey)> = Vec::new();
        for key in keys {
            let id = KeyId::of(&key);
            if key.is_weak() {
                return Err(TrustError::BadRoots(format!(
                    "root {id} is a weak (small-order) key"
                )));
            }
            if map.iter().any(|(k, _)| *k == id) {
                return Err(TrustError::BadRoots(format!("root {id} is listed twice")));
            }
            if map.len() == MAX_ROOTS {
                return Err(TrustError::BadRoots(format!("more than {MAX_ROOTS} roots")));
            }
            map.push((id, key));
        }
        if threshold == 0 || threshold > map.len() as u64 {
            return Err(TrustError::BadRoots(format!(
                "threshold {threshold} must be between 1 and the number of roots ({})",
                map.len()
            )));
        }
        Ok(Roots {
            keys: map,
            threshold: usize::try_from(threshold).unwrap_or(usize::MAX),
        })
    }

    /// Roots as a document names them.
    pub fn from_wire(wire: &RootKeys) -> Result<Roots, TrustError> {
        let keys = wire
            .keys
            .iter()
            .map(|k| public_key(k).map_err(TrustError::BadRoots))
            .collect::<Result<Vec<_>, _>>()?;
        Roots::new(keys, wire.threshold)
    }

    /// The wire form.
    pub fn to_wire(&self) -> RootKeys {
        RootKeys {
            keys: self.keys.iter().map(|(_, k)| Fixed(k.to_bytes())).collect(),
            threshold: self.threshold as u64,
        }
    }

    /// How many must sign.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The root key ids.
    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.iter().map(|(id, _)| id)
    }

    /// Whether `id` is one of them.
    pub fn contains(&self, id: &KeyId) -> bool {
        self.get(id).is_some()
    }

    fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.ids().map(KeyId::to_string).collect();
        write!(f, "{} of [{}]", self.threshold, ids.join(", "))
    }
}

fn public_key(raw: &Fixed<32>) -> Result<VerifyingKey, String> {
    let key = VerifyingKey::from_bytes(&raw.0)
        .map_err(|_| format!("{} is not an Ed25519 public key", hex::encode(raw.0)))?;
    if key.is_weak() {
        return Err(format!("{} is a weak (small-order) key", KeyId::of(&key)));
    }
    Ok(key)
}

/// A granted key, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The public key.
    pub key: VerifyingKey,
    /// Module-name patterns; `None`: every module.
    pub modules: Option<Vec<String>>,
    /// Groups; `None`: every device.
    pub groups: Option<Vec<String>>,
    /// Expiry of the key, unix seconds.
    pub not_after: Option<u64>,
}

/// Why a key may not sign a bundle under a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    /// The key is revoked.
    #[error("key {kid} is revoked by trust document version {version}")]
    Revoked {
        /// The key.
        kid: KeyId,
        /// The document.
        version: u64,
    },
    /// The key is not in the document.
    #[error("key {kid} is not a signing key in trust document version {version}")]
    Unknown {
        /// The key.
        kid: KeyId,
        /// The document.
        version: u64,
    },
    /// No trust document has been accepted yet.
    #[error("no trust document has been accepted yet, so no key may sign bundles")]
    NoDocument,
    /// The document has expired.
    #[error(
        "trust document version {version} expired at unix time {expires_at} (now {now}); a newer one is needed"
    )]
    DocumentExpired {
        /// The document.
        version: u64,
        /// Its expiry.
        expires_at: u64,
        /// The clock reading used.
        now: u64,
    },
    /// The key's scope does not cover the module.
    #[error("key {kid} may not sign module {module:?}: its scope is modules {patterns:?}")]
    ModuleOutOfScope {
        /// The key.
        kid: KeyId,
        /// The module.
        module: String,
        /// Its patterns.
        patterns: Vec<String>,
    },
    /// The key's scope does not cover this device's groups.
    #[error(
        "key {kid} may not sign for this device: its scope is groups {groups:?}, the device is in {device_groups:?}"
    )]
    GroupOutOfScope {
        /// The key.
        kid: KeyId,
        /// Its groups.
        groups: Vec<String>,
        /// The device's.
        device_groups: Vec<String>,
    },
    /// The key has passed its `not_after`.
    #[error("key {kid} expired at unix time {not_after} (now {now})")]
    KeyExpired {
        /// The key.
        kid: KeyId,
        /// Its expiry.
        not_after: u64,
        /// The clock reading used.
        now: u64,
    },
}

/// What a trust document grants, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The document's version.
    pub version: u64,
    /// When it was signed.
    pub issued_at: u64,
    /// When it expires.
    pub expires_at: Option<u64>,
    /// At most [`MAX_KEYS`] and [`MAX_REVOKED`]: looked up by a scan.
    keys: Vec<(KeyId, Grant)>,
    revoked: Vec<KeyId>,
    /// Seq floors the document resets.
    pub seq_resets: Vec<SeqReset>,
}

impl Policy {
    /// The policy a payload states; refuses a malformed one (bad keys or patterns, a key both
    /// granted and revoked, a key granted twice, lists above their bounds).
    pub fn from_payload(p: &TrustPayload) -> Result<Policy, TrustError> {
        let bad = |s: String| Err(TrustError::BadPolicy(s));
        if p.version == 0 {
            return bad("version must be 1 or more".into());
        }
        if p.keys.len() > MAX_KEYS {
            return bad(format!("{} keys, more than {MAX_KEYS}", p.keys.len()));
        }
        if p.revoked.len() > MAX_REVOKED {
            return bad(format!(
                "{} revoked keys, more than {MAX_REVOKED}",
                p.revoked.len()
            ));
        }
        if p.seq_resets.len() > MAX_SEQ_RESETS {
            return bad(format!(
                "{} seq resets, more than {MAX_SEQ_RESETS}",
                p.seq_resets.len()
            ));
        }
        let revoked: Vec<KeyId> = p.revoked.iter().map(|k| KeyId(k.0)).collect();
        let mut keys: Vec<(KeyId, Grant)> = Vec::with_capacity(p.keys.len());
        for grant in &p.keys {
            let key = public_key(&grant.key).map_err(TrustError::BadPolicy)?;
            let kid = KeyId::of(&key);
            if revoked.contains(&kid) {
                return bad(format!("key {kid} is both granted and revoked"));
            }
            if let Some(patterns) = &grant.modules {
                check_list(patterns, "modules", kid, check_pattern)?;
            }
            if let Some(groups) = &grant.groups {
                check_list(groups, "groups", kid, |g| {
                    if is_valid_id(g) {
                        Ok(())
                    } else {
                        Err(format!("group {g:?} is not well formed"))
                    }
                })?;
            }
            let grant = Grant {
                key,
                modules: grant.modules.clone(),
                groups: grant.groups.clone(),
                not_after: grant.not_after,
            };
            if keys.iter().any(|(k, _)| *k == kid) {
                return bad(format!("key {kid} is granted twice"));
            }
            keys.push((kid, grant));
        }
        for (i, r) in p.seq_resets.iter().enumerate() {
            if !is_valid_module_name(&r.module) {
                return bad(format!(
                    "seq reset: module name {:?} is not well formed",
                    r.module
                ));
            }
            if r.seq > SEQ_MAX {
                return bad(format!("seq reset of {:?}: seq above 2^53", r.module));
            }
            if p.seq_resets[..i].iter().any(|o| o.module == r.module) {
                return bad(format!("seq reset of {:?} listed twice", r.module));
            }
        }
        if let Some(roots) = &p.roots {
            Roots::from_wire(roots)?;
        }
        Ok(Policy {
            version: p.version,
            issued_at: p.issued_at,
            expires_at: p.expires_at,
            keys,
            revoked,
            seq_resets: p.seq_resets.clone(),
        })
    }

    /// The policy of a document accepted earlier (from the device's store), without checking its
    /// signatures again.
    pub fn from_accepted(document: &[u8]) -> Result<Policy, TrustError> {
        let sign = parse(document)?;
        let payload = sign.payload.as_deref().ok_or(TrustError::MissingPayload)?;
        Policy::from_payload(&TrustPayload::from_cbor(payload)?)
    }

    /// Whether `kid` is revoked.
    pub fn is_revoked(&self, kid: &KeyId) -> bool {
        self.revoked.contains(kid)
    }

    /// The revoked key ids.
    pub fn revoked(&self) -> impl Iterator<Item = &KeyId> {
        self.revoked.iter()
    }

    /// The granted keys.
    pub fn grants(&self) -> impl Iterator<Item = (&KeyId, &Grant)> {
        self.keys.iter().map(|(k, g)| (k, g))
    }

    fn grant(&self, kid: &KeyId) -> Option<&Grant> {
        self.keys.iter().find(|(k, _)| k == kid).map(|(_, g)| g)
    }

    /// The key a bundle names, if the document grants it and does not revoke it (the first
    /// check, before the signature).
    pub fn key(&self, kid: &KeyId) -> Result<&VerifyingKey, KeyRefusal> {
        if self.revoked.contains(kid) {
            return Err(KeyRefusal::Revoked {
                kid: *kid,
                version: self.version,
            });
        }
        self.grant(kid).map(|g| &g.key).ok_or(KeyRefusal::Unknown {
            kid: *kid,
            version: self.version,
        })
    }

    /// Whether the document has expired at `now`.
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    /// Whether `kid` may sign a bundle for `module` on a device in `groups` at `now`.
    pub fn admit(
        &self,
        kid: &KeyId,
        module: &str,
        groups: &[String],
        now: u64,
    ) -> Result<(), KeyRefusal> {
        self.key(kid)?;
        if let Some(expires_at) = self.expires_at
            && expires_at <= now
        {
            return Err(KeyRefusal::DocumentExpired {
                version: self.version,
                expires_at,
                now,
            });
        }
        let Some(grant) = self.grant(kid) else {
            return Err(KeyRefusal::Unknown {
                kid: *kid,
                version: self.version,
            });
        };
        if let Some(patterns) = &grant.modules
            && !patterns.iter().any(|p| glob(p, module))
        {
            return Err(KeyRefusal::ModuleOutOfScope {
                kid: *kid,
                module: module.to_string(),
                patterns: patterns.clone(),
            });
        }
        if let Some(scope) = &grant.groups
            && !scope.iter().any(|g| groups.contains(g))
        {
            return Err(KeyRefusal::GroupOutOfScope {
                kid: *kid,
                groups: scope.clone(),
                device_groups: groups.to_vec(),
            });
        }
        if let Some(not_after) = grant.not_after
            && not_after <= now
        {
            return Err(KeyRefusal::KeyExpired {
                kid: *kid,
                not_after,
                now,
            });
        }
        Ok(())
    }
}

fn check_list(
    items: &[String],
    what: &str,
    kid: KeyId,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<(), TrustError> {
    if items.is_empty() {
        return Err(TrustError::BadPolicy(format!(
            "key {kid}: an empty {what} list would let it sign nothing (omit it to allow all, or revoke the key)"
        )));
    }
    if items.len() > LIST_MAX_LEN {
        return Err(TrustError::BadPolicy(format!(
            "key {kid}: {} {what}, more than {LIST_MAX_LEN}",
            items.len()
        )));
    }
    for item in items {
        check(item).map_err(|e| TrustError::BadPolicy(format!("key {kid}: {e}")))?;
    }
    Ok(())
}

/// A module-name pattern: module-name characters and `*`, at most 64 bytes.
pub fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty()
        || p.len() > NAME_MAX_LEN + 1
        || !p
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
    {
        return Err(format!(
            "module pattern {p:?} must be 1 to {} of [a-z0-9-] and '*'",
            NAME_MAX_LEN + 1
        ));
    }
    Ok(())
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (also none).
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Why a trust document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// Larger than [`MAX_DOCUMENT_BYTES`].
    #[error("trust document is {0} bytes, above the maximum of {MAX_DOCUMENT_BYTES}")]
    TooLarge(usize),
    /// Not a well-formed tagged COSE_Sign.
    #[error("trust document is not a well-formed COSE_Sign: {0}")]
    Cose(String),
    /// No payload.
    #[error("trust document has no payload")]
    MissingPayload,
    /// Headers other than the ones this format uses.
    #[error("trust document refused: {0}")]
    Headers(String),
    /// No signature, or more than [`MAX_SIGNATURES`].
    #[error("trust document carries {0} signatures: 1 to {MAX_SIGNATURES} are accepted")]
    SignatureCount(usize),
    /// One key signed twice.
    #[error("trust document refused: key {0} signed it more than once")]
    DuplicateSigner(KeyId),
    /// A signature by a root does not verify.
    #[error("trust document refused: the signature by root {0} does not verify")]
    BadSignature(KeyId),
    /// Fewer current roots signed than the threshold.
    #[error(
        "trust document refused: signed by {have} of the current roots {roots} (signers: {signers}), the threshold is {need}"
    )]
    BelowThreshold {
        /// Valid root signatures.
        have: usize,
        /// The threshold.
        need: usize,
        /// The current roots.
        roots: String,
        /// Who signed, key ids.
        signers: String,
    },
    /// A root rotation not signed by the threshold of the new roots.
    #[error(
        "trust document refused: it rotates the roots to {roots}, but only {have} of the new roots signed it (threshold {need})"
    )]
    RotationBelowThreshold {
        /// The new roots.
        roots: String,
        /// Valid signatures by new roots.
        have: usize,
        /// Their threshold.
        need: usize,
    },
    /// The payload does not decode.
    #[error("trust document payload is malformed: {0}")]
    Payload(String),
    /// The payload is not in its canonical encoding.
    #[error(
        "trust document payload is not in its canonical encoding (docs/protocol.md): it differs at byte {at}"
    )]
    NotCanonical {
        /// First differing byte.
        at: usize,
    },
    /// The payload decodes but states something invalid.
    #[error("trust document refused: {0}")]
    BadPolicy(String),
    /// The root set is invalid.
    #[error("trust document refused: root set: {0}")]
    BadRoots(String),
    /// The version is not above the one in effect (a replay or a rollback).
    #[error(
        "trust document refused: version {version} is not above the version in effect, {current}"
    )]
    VersionNotNewer {
        /// The document's.
        version: u64,
        /// The device's.
        current: u64,
    },
    /// The document has expired.
    #[error(
        "trust document refused: version {version} expired at unix time {expires_at} (now {now})"
    )]
    Expired {
        /// The document's version.
        version: u64,
        /// Its expiry.
        expires_at: u64,
        /// The clock reading used.
        now: u64,
    },
    /// Signing failed.
    #[error("trust document: {0}")]
    Sign(String),
}

/// A document [`verify`] accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// What it grants.
    pub policy: Policy,
    /// The roots in effect after it (the new set when it rotates them).
    pub roots: Roots,
    /// Whether it rotated the roots.
    pub rotated: bool,
    /// The key ids of the roots (old and new) whose signatures verified.
    pub signers: Vec<KeyId>,
}

/// Parses the tagged COSE_Sign (structure only), within bounds.
fn parse(bytes: &[u8]) -> Result<coset::CoseSign, TrustError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(TrustError::TooLarge(bytes.len()));
    }
    cbor::check(bytes, ENVELOPE).map_err(|e| TrustError::Cose(e.to_string()))?;
    // Protected headers are CBOR inside byte strings: each is bounded before coset decodes it.
    let envelope = Value::from_slice(bytes).map_err(|e| TrustError::Cose(format!("{e:?}")))?;
    let mut protected = Vec::new();
    if let Value::Tag(_, inner) = &envelope
        && let Value::Array(items) = inner.as_ref()
    {
        if let Some(Value::Bytes(b)) = items.first() {
            protected.push(b.clone());
        }
        if let Some(Value::Array(sigs)) = items.get(3) {
            for sig in sigs {
                if let Value::Array(parts) = sig
                    && let Some(Value::Bytes(b)) = parts.first()
                {
                    protected.push(b.clone());
                }
            }
        }
    }
    for header in protected.iter().filter(|h| !h.is_empty()) {
        cbor::check(header, cbor::COSE_SIGN1)
            .map_err(|e| TrustError::Cose(format!("protected header: {e}")))?;
    }
    coset::CoseSign::from_tagged_slice(bytes).map_err(|e| TrustError::Cose(format!("{e:?}")))
}

/// The signers' key ids, with the index of their signature; checks the headers.
fn signers(sign: &coset::CoseSign) -> Result<Vec<(usize, KeyId)>, TrustError> {
    let headers = |s: &str| TrustError::Headers(s.to_string());
    if !sign.unprotected.is_empty() {
        return Err(headers("the unprotected body header must be empty"));
    }
    let body = &sign.protected.header;
    let ours = Some(coset::ContentType::Text(CONTENT_TYPE.to_string()));
    if body.content_type != ours {
        return Err(headers(&format!(
            "the body's protected header must hold exactly content type {CONTENT_TYPE:?}"
        )));
    }
    let only_ct = coset::Header {
        content_type: ours,
        ..Default::default()
    };
    if *body != only_ct {
        return Err(headers(
            "the body's protected header holds parameters other than the content type",
        ));
    }
    let n = sign.signatures.len();
    if n == 0 || n > MAX_SIGNATURES {
        return Err(TrustError::SignatureCount(n));
    }
    let mut out: Vec<(usize, KeyId)> = Vec::with_capacity(n);
    for (i, sig) in sign.signatures.iter().enumerate() {
        if !sig.unprotected.is_empty() {
            return Err(headers(&format!(
                "signature {i}: the unprotected header must be empty"
            )));
        }
        let h = &sig.protected.header;
        let expected = coset::Header {
            alg: Some(coset::Algorithm::Assigned(iana::Algorithm::EdDSA)),
            key_id: h.key_id.clone(),
            ..Default::default()
        };
        if *h != expected {
            return Err(headers(&format!(
                "signature {i}: the protected header must hold exactly alg EdDSA and a kid"
            )));
        }
        let kid = <[u8; KEY_ID_LEN]>::try_from(h.key_id.as_slice())
            .map(KeyId)
            .map_err(|_| {
                headers(&format!(
                    "signature {i}: the kid must be {KEY_ID_LEN} bytes"
                ))
            })?;
        if out.iter().any(|(_, k)| *k == kid) {
            return Err(TrustError::DuplicateSigner(kid));
        }
        out.push((i, kid));
    }
    Ok(out)
}

/// How many of `roots` signed validly; a root's signature that does not verify refuses the
/// document.
fn count(
    sign: &coset::CoseSign,
    signers: &[(usize, KeyId)],
    roots: &Roots,
    valid: &mut Vec<KeyId>,
) -> Result<usize, TrustError> {
    let mut n = 0;
    for (i, kid) in signers {
        let Some(key) = roots.get(kid) else {
            continue;
        };
        if !valid.contains(kid) {
            sign.verify_signature(*i, &[], |sig, tbs| {
                if keys::verify_strict(key, tbs, sig) {
                    Ok(())
                } else {
                    Err(TrustError::BadSignature(*kid))
                }
            })?;
            valid.push(*kid);
        }
        n += 1;
    }
    Ok(n)
}

/// Verifies a trust document under the device's current `roots`, with `current` the version in
/// effect (0: none yet) and `now` the clock reading (unix seconds). The signatures are checked
/// before any payload field is interpreted.
pub fn verify(bytes: &[u8], roots: &Roots, current: u64, now: u64) -> Result<Accepted, TrustError> {
    let sign = parse(bytes)?;
    let signers = signers(&sign)?;
    let mut valid = Vec::new();
    let have = count(&sign, &signers, roots, &mut valid)?;
    if have < roots.threshold {
        return Err(TrustError::BelowThreshold {
            have,
            need: roots.threshold,
            roots: roots.to_string(),
            signers: signers
                .iter()
                .map(|(_, k)| k.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let payload = sign.payload.as_deref().ok_or(TrustError::MissingPayload)?;
    let payload = TrustPayload::from_cbor(payload)?;
    let policy = Policy::from_payload(&payload)?;
    if policy.version <= current {
        return Err(TrustError::VersionNotNewer {
            version: policy.version,
            current,
        });
    }
    if let Some(expires_at) = policy.expires_at
        && expires_at <= now
    {
        return Err(TrustError::Expired {
            version: policy.version,
            expires_at,
            now,
        });
    }
    let (next, rotated) = match &payload.roots {
        Some(wire) => {
            let next = Roots::from_wire(wire)?;
            let have = count(&sign, &signers, &next, &mut valid)?;
            if have < next.threshold {
                return Err(TrustError::RotationBelowThreshold {
                    roots: next.to_string(),
                    have,
                    need: next.threshold,
                });
            }
            (next, true)
        }
        None => (roots.clone(), false),
    };
    Ok(Accepted {
        policy,
        roots: next,
        rotated,
        signers: valid,
    })
}

/// A document read without checking any signature, for display only.
#[derive(Debug, Clone)]
pub struct Unverified {
    /// The payload as stated.
    pub payload: TrustPayload,
    /// The key ids that claim to have signed it.
    pub signers: Vec<KeyId>,
}

/// Reads a document without verifying it. Never act on the result.
pub fn read_unverified(bytes: &[u8]) -> Result<Unverified, TrustError> {
    let sign = parse(bytes)?;
    let signers = signers(&sign)?.into_iter().map(|(_, k)| k).collect();
    let payload = sign.payload.as_deref().ok_or(TrustError::MissingPayload)?;
    Ok(Unverified {
        payload: TrustPayload::from_cbor(payload)?,
        signers,
    })
}

/// Signs `payload` with each of `keys` (one signature each, in the order given). The payload is
/// checked as a device would ([`Policy::from_payload`]) first.
pub fn sign(payload: &TrustPayload, keys: &[SigningKey]) -> Result<Vec<u8>, TrustError> {
    Policy::from_payload(payload)?;
    if keys.is_empty() || keys.len() > MAX_SIGNATURES {
        return Err(TrustError::SignatureCount(keys.len()));
    }
    let body = HeaderBuilder::new()
        .content_type(CONTENT_TYPE.to_string())
        .build();
    let mut builder = CoseSignBuilder::new()
        .protected(body)
        .payload(payload.to_cbor());
    let mut seen: Vec<KeyId> = Vec::new();
    for key in keys {
        let kid = KeyId::of(&key.verifying_key());
        if seen.contains(&kid) {
            return Err(TrustError::DuplicateSigner(kid));
        }
        seen.push(kid);
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::EdDSA)
            .key_id(kid.0.to_vec())
            .build();
        let sig = CoseSignatureBuilder::new().protected(protected).build();
        builder = builder.add_created_signature(sig, &[], |tbs| key.sign(tbs).to_bytes().to_vec());
    }
    let bytes = builder
        .build()
        .to_tagged_vec()
        .map_err(|e| TrustError::Sign(e.to_string()))?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(TrustError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
