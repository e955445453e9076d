//! Bundle verification: a pure function from bytes, a trust set, a clock reading and the installed
//! sequence number to either a verified manifest (with its Wasm) or the one reason it is refused.
//!
//! The order is: size and container shape; COSE structure; algorithm EdDSA and a trusted `kid`
//! in the protected header; the signature (strict Ed25519); then, on signed bytes only, the
//! manifest's canonical encoding (decoded and encoded again, byte for byte the same), its form,
//! targets, expiry, sequence number, Wasm size and digest, then the Wasm itself through
//! [`crate::engine::check`]: structure within the limits before anything is allocated from its
//! counts, every function validated and translated, memory within the manifest's cap.

use std::sync::Arc;

use coset::iana;
use ed25519_dalek::VerifyingKey;

use super::bundle::{self, ContainerError, DEFAULT_MAX_BUNDLE_BYTES};
use super::keys::{self, KEY_ID_LEN, KeyId, TrustSet};
use super::manifest::{Action, Manifest, ManifestProblem, Sha256};
use super::trust::{KeyRefusal, Policy};
use crate::engine::{self, CheckError, CheckedWasm, WasmLimits};

/// What a device is, for matching a bundle's `targets`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceIdentity {
    /// Device id.
    pub id: String,
    /// Groups the device belongs to.
    pub groups: Vec<String>,
}

/// A bundle that passed every check. Only [`Verifier::verify`] makes one: its fields are private,
/// so holding a `Verified` means the checks ran.
///
/// ```compile_fail,E0451
/// use edge_agent::core::{keys::KeyId, manifest::Manifest, verify::Verified};
/// fn forge(manifest: Manifest) -> Verified<'static> {
///     Verified { manifest, key_id: KeyId([0; 8]), wasm: None }
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<'a> {
    manifest: Manifest,
    key_id: KeyId,
    wasm: Option<CheckedWasm<'a>>,
}

impl<'a> Verified<'a> {
    /// The signed manifest (its `wasm` digest matches [`Verified::wasm`]).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest, taken out of the verified bundle.
    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }

    /// The key that signed it.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The module, checked, for installs.
    pub fn wasm(&self) -> Option<CheckedWasm<'a>> {
        self.wasm
    }

    /// The module bytes, for installs.
    pub fn wasm_bytes(&self) -> Option<&'a [u8]> {
        self.wasm.map(|w| w.bytes())
    }

    /// An install delivered in chunks whose Wasm has not been assembled yet: everything but the
    /// Wasm is verified; [`Verifier::verify_assembled`] checks it once its chunks are in.
    pub fn awaits_chunks(&self) -> bool {
        self.wasm.is_none() && !self.manifest.chunks.is_empty()
    }
}

/// Why a bundle is refused. Each reason is its own variant; `module` is the module's name, marked
/// "unverified" when it was read before the signature was checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The container is malformed, too large, truncated or of another version.
    #[error("bundle refused: {0}")]
    Container(#[from] ContainerError),
    /// The COSE_Sign1 is malformed.
    #[error("bundle refused: the COSE_Sign1 is malformed: {0}")]
    Cose(String),
    /// The COSE_Sign1 carries no payload (detached payloads are not used).
    #[error("bundle refused: the COSE_Sign1 has no payload")]
    MissingPayload,
    /// Something is in the unprotected header, which nothing signs.
    #[error("bundle for module {module}: refused: the unprotected header must be empty")]
    UnprotectedHeader {
        /// Module name (unverified).
        module: String,
    },
    /// The protected header holds parameters this agent does not understand.
    #[error("bundle for module {module}: refused: unexpected protected header parameter {what}")]
    UnexpectedHeader {
        /// Module name (unverified).
        module: String,
        /// Which parameter.
        what: String,
    },
    /// The algorithm is missing or is not EdDSA.
    #[error("bundle for module {module}: refused: algorithm {alg} is not EdDSA")]
    Algorithm {
        /// Module name (unverified).
        module: String,
        /// The algorithm found.
        alg: String,
    },
    /// No key id in the protected header.
    #[error("bundle for module {module}: refused: no key id (kid) in the protected header")]
    MissingKeyId {
        /// Module name (unverified).
        module: String,
    },
    /// The key id is not in the trust set.
    #[error(
        "bundle for module {module}: refused: signed by key {kid}, which this device does not trust"
    )]
    UnknownKey {
        /// Module name (unverified).
        module: String,
        /// The key id, hex.
        kid: String,
    },
    /// The trust document in effect does not let the key sign this bundle (revoked, not
    /// granted, out of scope, expired, or no document accepted yet).
    #[error("bundle for module {module}: refused: {reason}")]
    KeyRefused {
        /// Module name ("unverified" before the signature is checked).
        module: String,
        /// Why.
        reason: KeyRefusal,
    },
    /// The signature does not verify under the named key.
    #[error("bundle for module {module}: refused: the signature does not verify under key {kid}")]
    BadSignature {
        /// Module name (unverified).
        module: String,
        /// The key id.
        kid: KeyId,
    },
    /// The signed payload is not a manifest.
    #[error(
        "bundle for module {module}: refused: the signed payload is not a valid manifest: {reason}"
    )]
    ManifestDecode {
        /// Module name (unverified).
        module: String,
        /// Decoder message.
        reason: String,
    },
    /// The signed manifest decodes, but its bytes are not its canonical encoding (a non-shortest
    /// head, keys in another order, a default written out that is omitted, ...): exactly one
    /// encoding of each manifest is accepted (docs/protocol.md, "Canonical encoding").
    #[error(
        "bundle for module {module:?}: refused: the signed manifest is not in its canonical encoding (docs/protocol.md): it differs from the canonical bytes at byte {at}"
    )]
    ManifestNotCanonical {
        /// Module name.
        module: String,
        /// Offset of the first byte that differs (the shorter length when one is a prefix).
        at: usize,
    },
    /// A manifest field is malformed (bad name, limits, caps, targets).
    #[error("bundle refused: {0}")]
    Manifest(#[from] ManifestProblem),
    /// An install whose manifest or container lacks the Wasm.
    #[error(
        "bundle for module {module:?}: refused: an install must carry its Wasm module and digest"
    )]
    WasmMissing {
        /// Module name.
        module: String,
    },
    /// A removal that carries Wasm.
    #[error("bundle for module {module:?}: refused: a removal must not carry a Wasm module")]
    WasmUnexpected {
        /// Module name.
        module: String,
    },
    /// The manifest declares more Wasm than a bundle may hold.
    #[error(
        "bundle for module {module:?}: refused: its Wasm is {size} bytes, above the maximum bundle size of {max} bytes"
    )]
    WasmTooLarge {
        /// Module name.
        module: String,
        /// Declared size.
        size: u64,
        /// The maximum.
        max: usize,
    },
    /// A chunk the manifest lists is not the bytes at its place in the Wasm.
    #[error(
        "bundle for module {module:?}: refused: chunk {index} of the manifest's list does not match the Wasm"
    )]
    ChunkMismatch {
        /// Module name.
        module: String,
        /// The chunk's place in the list.
        index: usize,
    },
    /// A chunked container whose manifest lists no chunks.
    #[error(
        "bundle for module {module:?}: refused: a chunked bundle (format 2) must be an install that lists its chunks"
    )]
    ChunksMissing {
        /// Module name.
        module: String,
    },
    /// The bundle names other devices and groups.
    #[error(
        "bundle for module {module:?}: refused: its targets do not include device {device:?} or its groups"
    )]
    NotForThisDevice {
        /// Module name.
        module: String,
        /// This device.
        device: String,
    },
    /// The bundle has expired.
    #[error("bundle for module {module:?}: refused: expired at unix time {expires_at} (now {now})")]
    Expired {
        /// Module name.
        module: String,
        /// Expiry.
        expires_at: u64,
        /// The clock reading used.
        now: u64,
    },
    /// The sequence number does not exceed the installed one (a rollback or a replay).
    #[error(
        "bundle for module {module:?}: refused: seq {seq} is not greater than the installed seq {installed}"
    )]
    SeqNotGreater {
        /// Module name.
        module: String,
        /// The bundle's seq.
        seq: u64,
        /// The highest seq accepted before.
        installed: u64,
    },
    /// The Wasm length differs from the manifest.
    #[error(
        "bundle for module {module:?}: refused: Wasm is {actual} bytes, the manifest says {declared}"
    )]
    WasmSizeMismatch {
        /// Module name.
        module: String,
        /// Size in the manifest.
        declared: u64,
        /// Size carried.
        actual: u64,
    },
    /// The Wasm digest differs from the manifest.
    #[error(
        "bundle for module {module:?}: refused: Wasm SHA-256 is {actual}, the manifest says {declared}"
    )]
    WasmHashMismatch {
        /// Module name.
        module: String,
        /// Digest in the manifest.
        declared: Sha256,
        /// Digest of the bytes carried.
        actual: Sha256,
    },
    /// The bytes do not start with the Wasm magic and version.
    #[error("bundle for module {module:?}: refused: the module bytes are not a WebAssembly binary")]
    NotWasm {
        /// Module name.
        module: String,
    },
    /// The Wasm fails validation (or translation).
    #[error("bundle for module {module:?}: refused: the Wasm module does not validate: {reason}")]
    InvalidWasm {
        /// Module name.
        module: String,
        /// Validator message.
        reason: String,
    },
    /// The module's structure is above a limit, or would fail at instantiation.
    #[error("bundle for module {module:?}: refused: the module's structure is refused: {reason}")]
    Structure {
        /// Module name.
        module: String,
        /// Which limit, or what would fail.
        reason: String,
    },
    /// The module's initial memory is above the manifest's cap.
    #[error(
        "bundle for module {module:?}: refused: its memory starts with {initial} bytes, above the manifest's memory_max_bytes of {cap}"
    )]
    MemoryAboveCap {
        /// Module name.
        module: String,
        /// Initial memory, bytes.
        initial: u64,
        /// The manifest's cap.
        cap: u64,
    },
}

pub use crate::engine::WASM_HEADER;

/// Where a device's trust in signing keys comes from.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Simple mode (`trusted_keys`): every listed key may sign anything.
    Keys(TrustSet),
    /// Trust-document mode (`[trust]`): the keys, scopes and revocations of the document in
    /// effect; `None` until the device accepts one (every bundle is refused meanwhile).
    Document(Option<Arc<Policy>>),
}

impl Trust {
    /// The version of the trust document in effect (0 in simple mode or before any).
    pub fn version(&self) -> u64 {
        match self {
            Trust::Document(Some(p)) => p.version,
            _ => 0,
        }
    }

    /// The key a bundle names, if this trust lets it sign at all.
    fn key(&self, kid: &KeyId) -> Result<&VerifyingKey, Option<KeyRefusal>> {
        match self {
            Trust::Keys(set) => set.get(kid).ok_or(None),
            Trust::Document(Some(policy)) => policy.key(kid).map_err(Some),
            Trust::Document(None) => Err(Some(KeyRefusal::NoDocument)),
        }
    }
}

/// Verifies bundles for one device.
#[derive(Debug, Clone)]
pub struct Verifier {
    trust: Trust,
    limits: WasmLimits,
    max_bundle_bytes: usize,
    device: Option<DeviceIdentity>,
}

impl Verifier {
    /// A verifier trusting `trust`, checking Wasm against `limits` (the runtime's, so that what
    /// passes here also runs: `RuntimeConfig::wasm_limits`).
    pub fn new(trust: TrustSet, limits: WasmLimits) -> Self {
        Self::with_trust(Trust::Keys(trust), limits)
    }

    /// A verifier under `trust` (a key set, or a trust document's policy).
    pub fn with_trust(trust: Trust, limits: WasmLimits) -> Self {
        Verifier {
            trust,
            limits,
            max_bundle_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            device: None,
        }
    }

    /// Sets the largest bundle accepted.
    pub fn with_max_bundle_bytes(mut self, max: usize) -> Self {
        self.max_bundle_bytes = max;
        self
    }

    /// Refuses bundles whose `targets` exclude this device.
    pub fn for_device(mut self, device: DeviceIdentity) -> Self {
        self.device = Some(device);
        self
    }

    /// Where its trust comes from.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Verifies `bytes` at clock reading `now_unix` (seconds). `installed_seq` is asked, with the
    /// verified module name, for the highest sequence number the device accepted for it before.
    ///
    /// A chunked bundle (format 2) passes with everything but its Wasm checked
    /// ([`Verified::awaits_chunks`]).
    pub fn verify<'a>(
        &self,
        bytes: &'a [u8],
        now_unix: u64,
        installed_seq: impl FnOnce(&str) -> Option<u64>,
    ) -> Result<Verified<'a>, VerifyError> {
        self.verify_parts(bytes, None, now_unix, installed_seq)
    }

    /// Verifies a chunked bundle's signed part `bytes` with its Wasm assembled from the chunks:
    /// every check [`Verifier::verify`] makes, the Wasm's included.
    pub fn verify_assembled<'a>(
        &self,
        bytes: &'a [u8],
        wasm: &'a [u8],
        now_unix: u64,
        installed_seq: impl FnOnce(&str) -> Option<u64>,
    ) -> Result<Verified<'a>, VerifyError> {
        self.verify_parts(bytes, Some(wasm), now_unix, installed_seq)
    }

    fn verify_parts<'a>(
        &self,
        bytes: &'a [u8],
        assembled: Option<&'a [u8]>,
        now_unix: u64,
        installed_seq: impl FnOnce(&str) -> Option<u64>,
    ) -> Result<Verified<'a>, VerifyError> {
        let raw = bundle::decode(bytes, self.max_bundle_bytes)?;
        let sign1 = bundle::parse_sign1(raw.sign1).map_err(VerifyError::Cose)?;
        let payload = sign1
            .payload
            .as_deref()
            .ok_or(VerifyError::MissingPayload)?;
        let unverified = || match bundle::peek_name(payload) {
            Some(name) => format!("{name:?} (unverified name)"),
            None => "<unknown>".to_string(),
        };
        let key_id = self.check_headers(&sign1, &unverified)?;
        self.check_signature(&sign1, key_id, &unverified)?;

        let manifest =
            Manifest::from_cbor(payload).map_err(|reason| VerifyError::ManifestDecode {
                module: unverified(),
                reason,
            })?;
        if let Some(at) = super::cbor::first_difference(&manifest.to_cbor(), payload) {
            return Err(VerifyError::ManifestNotCanonical {
                module: manifest.name,
                at,
            });
        }
        manifest.check()?;
        let module = || manifest.name.clone();
        if raw.chunked && (manifest.action != Action::Install || manifest.chunks.is_empty()) {
            return Err(VerifyError::ChunksMissing { module: module() });
        }
        if let Some(big) = manifest
            .wasm
            .filter(|w| w.size > self.max_bundle_bytes as u64)
        {
            return Err(VerifyError::WasmTooLarge {
                module: module(),
                size: big.size,
                max: self.max_bundle_bytes,
            });
        }
        let carried = if raw.chunked { assembled } else { raw.wasm };
        let wasm = match (manifest.action, carried, manifest.wasm) {
            (Action::Install, Some(wasm), Some(_)) => Some(wasm),
            (Action::Install, None, Some(_)) if raw.chunked => None,
            (Action::Install, _, _) => return Err(VerifyError::WasmMissing { module: module() }),
            (Action::Remove, None, None) => None,
            (Action::Remove, _, _) => {
                return Err(VerifyError::WasmUnexpected { module: module() });
            }
        };
        if let (Some(device), Some(targets)) = (&self.device, &manifest.targets)
            && !targets.includes(&device.id, &device.groups)
        {
            return Err(VerifyError::NotForThisDevice {
                module: module(),
                device: device.id.clone(),
            });
        }
        if let Trust::Document(Some(policy)) = &self.trust {
            let groups = self.device.as_ref().map_or(&[][..], |d| &d.groups[..]);
            policy
                .admit(&key_id, &manifest.name, groups, now_unix)
                .map_err(|reason| VerifyError::KeyRefused {
                    module: format!("{:?}", manifest.name),
                    reason,
                })?;
        }
        if let Some(expires_at) = manifest.expires_at
            && expires_at <= now_unix
        {
            return Err(VerifyError::Expired {
                module: module(),
                expires_at,
                now: now_unix,
            });
        }
        if let Some(installed) = installed_seq(&manifest.name)
            && manifest.seq <= installed
        {
            return Err(VerifyError::SeqNotGreater {
                module: module(),
                seq: manifest.seq,
                installed,
            });
        }
        let wasm = match (wasm, manifest.wasm) {
            (Some(wasm), Some(declared)) => {
                Some(self.check_wasm(&manifest, wasm, declared.size, declared.sha256)?)
            }
            _ => None,
        };
        Ok(Verified {
            manifest,
            key_id,
            wasm,
        })
    }

    fn check_headers(
        &self,
        sign1: &coset::CoseSign1,
        unverified: &dyn Fn() -> String,
    ) -> Result<KeyId, VerifyError> {
        if !sign1.unprotected.is_empty() {
            return Err(VerifyError::UnprotectedHeader {
                module: unverified(),
            });
        }
        let h = &sign1.protected.header;
        let unexpected = |what: &str| VerifyError::UnexpectedHeader {
            module: unverified(),
            what: what.to_string(),
        };
        if !h.crit.is_empty() {
            return Err(unexpected("crit"));
        }
        if h.content_type.is_some() {
            return Err(unexpected("content type"));
        }
        if !h.iv.is_empty() || !h.partial_iv.is_empty() {
            return Err(unexpected("IV"));
        }
        if !h.counter_signatures.is_empty() {
            return Err(unexpected("counter signature"));
        }
        if let Some((label, _)) = h.rest.first() {
            return Err(unexpected(&format!("{label:?}")));
        }
        let eddsa = coset::Algorithm::Assigned(iana::Algorithm::EdDSA);
        match &h.alg {
            Some(alg) if *alg == eddsa => {}
            other => {
                return Err(VerifyError::Algorithm {
                    module: unverified(),
                    alg: other
                        .as_ref()
                        .map_or_else(|| "(none)".to_string(), |a| format!("{a:?}")),
                });
            }
        }
        if h.key_id.is_empty() {
            return Err(VerifyError::MissingKeyId {
                module: unverified(),
            });
        }
        let unknown = || VerifyError::UnknownKey {
            module: unverified(),
            kid: hex::encode(&h.key_id),
        };
        let kid = <[u8; KEY_ID_LEN]>::try_from(h.key_id.as_slice()).map_err(|_| unknown())?;
        let kid = KeyId(kid);
        match self.trust.key(&kid) {
            Ok(_) => Ok(kid),
            Err(None) => Err(unknown()),
            Err(Some(reason)) => Err(VerifyError::KeyRefused {
                module: unverified(),
                reason,
            }),
        }
    }

    fn check_signature(
        &self,
        sign1: &coset::CoseSign1,
        kid: KeyId,
        unverified: &dyn Fn() -> String,
    ) -> Result<(), VerifyError> {
        let bad = || VerifyError::BadSignature {
            module: unverified(),
            kid,
        };
        let key = self.trust.key(&kid).map_err(|_| bad())?;
        sign1.verify_signature(&[], |sig, tbs| {
            if keys::verify_strict(key, tbs, sig) {
                Ok(())
            } else {
                Err(bad())
            }
        })
    }

    fn check_wasm<'a>(
        &self,
        manifest: &Manifest,
        wasm: &'a [u8],
        size: u64,
        sha256: Sha256,
    ) -> Result<CheckedWasm<'a>, VerifyError> {
        let module = || manifest.name.clone();
        if wasm.len() as u64 != size {
            return Err(VerifyError::WasmSizeMismatch {
                module: module(),
                declared: size,
                actual: wasm.len() as u64,
            });
        }
        let actual = Sha256::of(wasm);
        if actual != sha256 {
            return Err(VerifyError::WasmHashMismatch {
                module: module(),
                declared: sha256,
                actual,
            });
        }
        // The chunks add up to `size` (Manifest::check); each must be the bytes it names.
        let mut at = 0usize;
        for (index, c) in manifest.chunks.iter().enumerate() {
            let len = usize::try_from(c.size()).unwrap_or(usize::MAX);
            if wasm.get(at..at + len).map(Sha256::of) != Some(c.sha256()) {
                return Err(VerifyError::ChunkMismatch {
                    module: module(),
                    index,
                });
            }
            at += len;
        }
        let checked = engine::check(wasm, &self.limits).map_err(|e| match e {
            CheckError::NotWasm => VerifyError::NotWasm { module: module() },
            CheckError::Structure(e) => VerifyError::Structure {
                module: module(),
                reason: e.to_string(),
            },
            CheckError::Invalid(reason) => VerifyError::InvalidWasm {
                module: module(),
                reason,
            },
        })?;
        let initial = checked.shape().memory_bytes;
        if initial > manifest.limits.memory_max_bytes {
            return Err(VerifyError::MemoryAboveCap {
                module: module(),
                initial,
                cap: manifest.limits.memory_max_bytes,
            });
        }
        Ok(checked)
    }
}

/// A bundle's contents read without any check of its signature, for display only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified {
    /// The manifest as the payload states it.
    pub manifest: Manifest,
    /// The `kid` from the protected header, hex (empty when absent).
    pub kid: String,
    /// Length of the Wasm carried, if any.
    pub wasm_len: Option<usize>,
}

/// Reads a bundle's manifest without verifying it. Never act on the result.
pub fn read_unverified(bytes: &[u8], max_bundle_bytes: usize) -> Result<Unverified, VerifyError> {
    let raw = bundle::decode(bytes, max_bundle_bytes)?;
    let sign1 = bundle::parse_sign1(raw.sign1).map_err(VerifyError::Cose)?;
    let payload = sign1
        .payload
        .as_deref()
        .ok_or(VerifyError::MissingPayload)?;
    let manifest = Manifest::from_cbor(payload).map_err(|reason| VerifyError::ManifestDecode {
        module: bundle::peek_name(payload).unwrap_or_else(|| "<unknown>".into()),
        reason,
    })?;
    Ok(Unverified {
        manifest,
        kid: hex::encode(&sign1.protected.header.key_id),
        wasm_len: raw.wasm.map(<[u8]>::len),
    })
}
