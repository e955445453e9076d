//! The bundle container: one CBOR array holding the COSE_Sign1 (as a byte string) and, for
//! installs, the Wasm bytes. Documented byte by byte in docs/protocol.md.
//!
//! ```text
//! bundle = [ format: 1, cose_sign1: bstr .cbor COSE_Sign1_Tagged, wasm: bstr / null ]
//!        / [ format: 2, cose_sign1: bstr .cbor COSE_Sign1_Tagged ]   ; Wasm in chunks
//! ```
//!
//! Decoding is bounded and zero-copy: the input length is checked against the maximum bundle size
//! first, every declared length is checked against the bytes that remain before it is used, and the
//! result borrows from the input. Only definite-length, shortest-form heads are accepted.

use coset::{
    CborSerializable as _, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable as _, iana,
};
use ed25519_dalek::{Signer as _, SigningKey};

use super::cbor;
use super::keys::KeyId;
use super::manifest::{Action, ChunkRef, Manifest, ManifestProblem, Sha256, WasmRef};

/// The container format version of a bundle that carries its Wasm (or none: a removal).
pub const FORMAT_VERSION: u64 = 1;
/// The container format version of an install whose Wasm travels in chunks: only the signed part.
pub const FORMAT_CHUNKED: u64 = 2;
/// Default maximum size of a whole bundle.
pub const DEFAULT_MAX_BUNDLE_BYTES: usize = 4 << 20;

/// A decoded container. Nothing in it has been verified yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBundle<'a> {
    /// The tagged COSE_Sign1 encoding.
    pub sign1: &'a [u8],
    /// The Wasm bytes, for installs in one message.
    pub wasm: Option<&'a [u8]>,
    /// Format 2: the Wasm travels in the chunks the manifest lists.
    pub chunked: bool,
}

/// Why bytes are not a well-formed bundle container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    /// The input is larger than the configured maximum.
    #[error("bundle is {size} bytes, above the maximum of {max} bytes")]
    TooLarge {
        /// Input size.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The input ends in the middle of an item.
    #[error("bundle is truncated: {0}")]
    Truncated(&'static str),
    /// A declared length is larger than any bundle may be.
    #[error(
        "bundle declares a {what} of {declared} bytes, above the maximum bundle size of {max} bytes"
    )]
    LengthOutOfBounds {
        /// Which item.
        what: &'static str,
        /// Declared length.
        declared: u64,
        /// The maximum bundle size.
        max: usize,
    },
    /// The bytes are not a bundle container at all.
    #[error("not a bundle: {0}")]
    NotABundle(String),
    /// A container of another format version.
    #[error(
        "bundle format version {0} is not supported (this agent reads versions {FORMAT_VERSION} and {FORMAT_CHUNKED})"
    )]
    UnsupportedFormat(u64),
    /// Bytes follow the container.
    #[error("{0} bytes follow the bundle")]
    TrailingBytes(usize),
}

/// A CBOR item head: major type and argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    major: u8,
    arg: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Largest length any item may declare.
    max: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ContainerError> {
        if n > self.remaining() {
            return Err(ContainerError::Truncated(what));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Reads a definite, shortest-form head.
    fn head(&mut self, what: &'static str) -> Result<Head, ContainerError> {
        let first = self.take(1, what)?[0];
        let major = first >> 5;
        let info = first & 0x1f;
        let (arg, min) = match info {
            0..=23 => (u64::from(info), 0),
            24 => (u64::from(self.take(1, what)?[0]), 24),
            25 => (u64::from(u16::from_be_bytes(self.array(what)?)), 1 << 8),
            26 => (u64::from(u32::from_be_bytes(self.array(what)?)), 1 << 16),
            27 => (u64::from_be_bytes(self.array(what)?), 1 << 32),
            31 => {
                return Err(ContainerError::NotABundle(format!(
                    "{what} uses an indefinite length"
                )));
            }
            _ => {
                return Err(ContainerError::NotABundle(format!(
                    "{what} has a reserved CBOR head {first:#04x}"
                )));
            }
        };
        if arg < min {
            return Err(ContainerError::NotABundle(format!(
                "{what} length is not in shortest form"
            )));
        }
        Ok(Head { major, arg })
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ContainerError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// Reads a byte string whose declared length is checked before it is used: a length no
    /// bundle could have is refused as such, one that merely runs past the end as truncation.
    fn bytes(&mut self, head: Head, what: &'static str) -> Result<&'a [u8], ContainerError> {
        let len = usize::try_from(head.arg)
            .ok()
            .filter(|len| *len <= self.max)
            .ok_or(ContainerError::LengthOutOfBounds {
                what,
                declared: head.arg,
                max: self.max,
            })?;
        self.take(len, what)
    }
}

const MAJOR_UINT: u8 = 0;
const MAJOR_BYTES: u8 = 2;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_SIMPLE: u8 = 7;
const SIMPLE_NULL: u64 = 22;

/// Decodes a bundle container without verifying anything in it.
pub fn decode(bytes: &[u8], max_bundle_bytes: usize) -> Result<RawBundle<'_>, ContainerError> {
    if bytes.len() > max_bundle_bytes {
        return Err(ContainerError::TooLarge {
            size: bytes.len(),
            max: max_bundle_bytes,
        });
    }
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        max: max_bundle_bytes,
    };
    let top = r.head("bundle array")?;
    if top.major != MAJOR_ARRAY || !(2..=3).contains(&top.arg) {
        return Err(ContainerError::NotABundle(
            "expected a CBOR array of 3 items (or 2, chunked)".into(),
        ));
    }
    let version = r.head("format version")?;
    if version.major != MAJOR_UINT {
        return Err(ContainerError::NotABundle(
            "format version is not an unsigned integer".into(),
        ));
    }
    let chunked = match (version.arg, top.arg) {
        (FORMAT_VERSION, 3) => false,
        (FORMAT_CHUNKED, 2) => true,
        (FORMAT_VERSION | FORMAT_CHUNKED, n) => {
            return Err(ContainerError::NotABundle(format!(
                "a format {} bundle is an array of {} items, not {n}",
                version.arg,
                if version.arg == FORMAT_VERSION { 3 } else { 2 }
            )));
        }
        (other, _) => return Err(ContainerError::UnsupportedFormat(other)),
    };
    let sign1_head = r.head("COSE_Sign1")?;
    if sign1_head.major != MAJOR_BYTES {
        return Err(ContainerError::NotABundle(
            "the COSE_Sign1 is not a byte string".into(),
        ));
    }
    let sign1 = r.bytes(sign1_head, "COSE_Sign1")?;
    if chunked {
        if r.remaining() != 0 {
            return Err(ContainerError::TrailingBytes(r.remaining()));
        }
        return Ok(RawBundle {
            sign1,
            wasm: None,
            chunked,
        });
    }
    let wasm_head = r.head("Wasm")?;
    let wasm = match wasm_head {
        Head {
            major: MAJOR_BYTES, ..
        } => Some(r.bytes(wasm_head, "Wasm")?),
        Head {
            major: MAJOR_SIMPLE,
            arg: SIMPLE_NULL,
        } => None,
        _ => {
            return Err(ContainerError::NotABundle(
                "the Wasm item is neither a byte string nor null".into(),
            ));
        }
    };
    if r.remaining() != 0 {
        return Err(ContainerError::TrailingBytes(r.remaining()));
    }
    Ok(RawBundle {
        sign1,
        wasm,
        chunked,
    })
}

fn push_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    // Each arm narrows `arg` only after the match has bounded it.
    #[allow(clippy::cast_possible_truncation)]
    match arg {
        0..=23 => out.push(m | arg as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, arg as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(arg as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(arg as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&arg.to_be_bytes());
        }
    }
}

/// Encodes the container of an install whose Wasm travels in chunks (format 2).
pub fn encode_chunked(sign1: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + sign1.len());
    push_head(&mut out, MAJOR_ARRAY, 2);
    push_head(&mut out, MAJOR_UINT, FORMAT_CHUNKED);
    push_head(&mut out, MAJOR_BYTES, sign1.len() as u64);
    out.extend_from_slice(sign1);
    out
}

/// Encodes a bundle container.
pub fn encode(sign1: &[u8], wasm: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + sign1.len() + wasm.map_or(0, <[u8]>::len));
    push_head(&mut out, MAJOR_ARRAY, 3);
    push_head(&mut out, MAJOR_UINT, FORMAT_VERSION);
    push_head(&mut out, MAJOR_BYTES, sign1.len() as u64);
    out.extend_from_slice(sign1);
    match wasm {
        Some(w) => {
            push_head(&mut out, MAJOR_BYTES, w.len() as u64);
            out.extend_from_slice(w);
        }
        None => push_head(&mut out, MAJOR_SIMPLE, SIMPLE_NULL),
    }
    out
}

/// Why a bundle could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The manifest is malformed.
    #[error(transparent)]
    Manifest(#[from] ManifestProblem),
    /// An install without Wasm bytes.
    #[error("module {0:?}: an install needs the Wasm module (--wasm)")]
    WasmMissing(String),
    /// A removal with Wasm bytes.
    #[error("module {0:?}: a removal carries no Wasm module; drop --wasm")]
    WasmUnexpected(String),
    /// The finished bundle would be larger than a device accepts.
    #[error(
        "module {module:?}: the bundle would be {size} bytes, above the maximum of {max} bytes"
    )]
    TooLarge {
        /// Module name.
        module: String,
        /// Bundle size.
        size: usize,
        /// Maximum.
        max: usize,
    },
    /// Chunk lengths that do not cut the Wasm.
    #[error("module {module:?}: chunks: {reason}")]
    Chunks {
        /// Module name.
        module: String,
        /// Why.
        reason: String,
    },
    /// COSE encoding failed.
    #[error("module {module:?}: COSE encoding failed: {reason}")]
    Cose {
        /// Module name.
        module: String,
        /// Why.
        reason: String,
    },
}

/// Signs `manifest` (filling in the Wasm digest) and packs the bundle.
pub fn sign(
    mut manifest: Manifest,
    wasm: Option<&[u8]>,
    key: &SigningKey,
    max_bundle_bytes: usize,
) -> Result<Vec<u8>, SignError> {
    match (manifest.action, wasm) {
        (Action::Install, None) => return Err(SignError::WasmMissing(manifest.name)),
        (Action::Remove, Some(_)) => return Err(SignError::WasmUnexpected(manifest.name)),
        _ => {}
    }
    manifest.wasm = wasm.map(|w| WasmRef {
        sha256: Sha256::of(w),
        size: w.len() as u64,
    });
    if manifest.action == Action::Remove {
        // A removal's limits and capabilities mean nothing; leave them out of what is signed.
        manifest.limits = Default::default();
        manifest.caps = Default::default();
    }
    manifest.chunks.clear();
    let sign1 = sign1_of(&manifest, key)?;
    let bundle = encode(&sign1, wasm);
    if bundle.len() > max_bundle_bytes {
        return Err(SignError::TooLarge {
            module: manifest.name,
            size: bundle.len(),
            max: max_bundle_bytes,
        });
    }
    Ok(bundle)
}

/// Signs an install whose Wasm travels in chunks: `lengths` cut `wasm` in order (they must add
/// up to its length). Returns the signed part (a format 2 container) and the chunks' digests
/// and lengths, in order.
pub fn sign_chunked(
    manifest: Manifest,
    wasm: &[u8],
    lengths: &[usize],
    key: &SigningKey,
) -> Result<(Vec<u8>, Vec<ChunkRef>), SignError> {
    let manifest = listing_chunks(manifest, wasm, lengths)?;
    let sign1 = sign1_of(&manifest, key)?;
    Ok((encode_chunked(&sign1), manifest.chunks))
}

/// `manifest` for an install of `wasm`, listing the chunks `lengths` cut it into.
fn listing_chunks(
    mut manifest: Manifest,
    wasm: &[u8],
    lengths: &[usize],
) -> Result<Manifest, SignError> {
    if manifest.action != Action::Install {
        return Err(SignError::WasmUnexpected(manifest.name));
    }
    manifest.wasm = Some(WasmRef {
        sha256: Sha256::of(wasm),
        size: wasm.len() as u64,
    });
    manifest.chunks = super::chunking::refs(wasm, lengths).ok_or_else(|| SignError::Chunks {
        module: manifest.name.clone(),
        reason: format!(
            "the chunk lengths add up to {} bytes, not the {} bytes of Wasm",
            lengths.iter().fold(0usize, |a, &l| a.saturating_add(l)),
            wasm.len()
        ),
    })?;
    Ok(manifest)
}

/// Signs an install that carries its Wasm (format 1) and lists the chunks `lengths` cut it into
/// (they must add up to its length): the same file is then delivered either way, in one message
/// or, since the signature covers only the manifest, as the format 2 signed part
/// ([`encode_chunked`] of its COSE_Sign1) plus the chunks cut from its Wasm, without the key.
pub fn sign_listing_chunks(
    manifest: Manifest,
    wasm: &[u8],
    lengths: &[usize],
    key: &SigningKey,
    max_bundle_bytes: usize,
) -> Result<Vec<u8>, SignError> {
    let manifest = listing_chunks(manifest, wasm, lengths)?;
    let sign1 = sign1_of(&manifest, key)?;
    let bundle = encode(&sign1, Some(wasm));
    if bundle.len() > max_bundle_bytes {
        return Err(SignError::TooLarge {
            module: manifest.name,
            size: bundle.len(),
            max: max_bundle_bytes,
        });
    }
    Ok(bundle)
}

/// The tagged COSE_Sign1 over a checked manifest.
fn sign1_of(manifest: &Manifest, key: &SigningKey) -> Result<Vec<u8>, SignError> {
    manifest.check()?;
    let kid = KeyId::of(&key.verifying_key());
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::EdDSA)
        .key_id(kid.0.to_vec())
        .build();
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(manifest.to_cbor())
        .create_signature(&[], |tbs| key.sign(tbs).to_bytes().to_vec())
        .build()
        .to_tagged_vec()
        .map_err(|e| SignError::Cose {
            module: manifest.name.clone(),
            reason: e.to_string(),
        })?;
    Ok(sign1)
}

/// Parses the tagged COSE_Sign1 (structure only, nothing verified). The envelope and its
/// protected header are walked within small bounds first ([`cbor`]), so the decoder builds a
/// handful of values, whatever the bytes hold.
pub(crate) fn parse_sign1(bytes: &[u8]) -> Result<coset::CoseSign1, String> {
    cbor::check(bytes, cbor::COSE_SIGN1).map_err(|e| e.to_string())?;
    // The protected header is CBOR inside a byte string: bounded too before coset decodes it.
    let envelope = coset::cbor::Value::from_slice(bytes).map_err(|e| format!("{e:?}"))?;
    if let coset::cbor::Value::Tag(_, inner) = &envelope
        && let coset::cbor::Value::Array(items) = inner.as_ref()
        && let Some(coset::cbor::Value::Bytes(protected)) = items.first()
        && !protected.is_empty()
    {
        cbor::check(protected, cbor::COSE_SIGN1).map_err(|e| format!("protected header: {e}"))?;
    }
    coset::CoseSign1::from_tagged_slice(bytes).map_err(|e| format!("{e:?}"))
}

/// Reads the `name` field out of an unverified CBOR manifest, for error messages only.
pub(crate) fn peek_name(payload: &[u8]) -> Option<String> {
    cbor::check(payload, cbor::DOCUMENT).ok()?;
    let value = coset::cbor::Value::from_slice(payload).ok()?;
    value
        .into_map()
        .ok()?
        .into_iter()
        .find(|(k, _)| k.as_text() == Some("name"))
        .and_then(|(_, v)| v.into_text().ok())
        .map(|name| name.chars().filter(|c| !c.is_control()).take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_round_trip() {
        let big = vec![1u8; 70_000];
        for (sign1, wasm) in [
            (&b"s"[..], Some(&b"w"[..])),
            (&[9u8; 300][..], Some(&big[..])),
            (&b""[..], None),
        ] {
            let bytes = encode(sign1, wasm);
            assert_eq!(
                decode(&bytes, usize::MAX),
                Ok(RawBundle {
                    sign1,
                    wasm,
                    chunked: false
                })
            );
            let bytes = encode_chunked(sign1);
            assert_eq!(
                decode(&bytes, usize::MAX),
                Ok(RawBundle {
                    sign1,
                    wasm: None,
                    chunked: true
                })
            );
        }
    }

    #[test]
    fn the_size_limit_is_checked_first() {
        let bytes = encode(b"s", Some(&[0; 100]));
        assert!(matches!(
            decode(&bytes, 50),
            Err(ContainerError::TooLarge { size: 106, max: 50 })
        ));
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_use() {
        // array(3), 1, bstr with an 8-byte length of 2^62.
        let mut bytes = vec![0x83, 0x01, 0x5b];
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert!(matches!(
            decode(&bytes, 4 << 20),
            Err(ContainerError::LengthOutOfBounds {
                declared: 0x4000_0000_0000_0000,
                ..
            })
        ));
        // A plausible length that merely runs past the end is truncation.
        assert!(matches!(
            decode(&[0x83, 0x01, 0x59, 0x01, 0x00, 0xd2], 4 << 20),
            Err(ContainerError::Truncated(_))
        ));
    }

    #[test]
    fn non_shortest_and_indefinite_heads_are_refused() {
        // array(3) written with a one-byte length.
        assert!(matches!(
            decode(&[0x98, 0x03, 0x01, 0x40, 0xf6], usize::MAX),
            Err(ContainerError::NotABundle(_))
        ));
        assert!(matches!(
            decode(&[0x9f, 0x01, 0x40, 0xf6, 0xff], usize::MAX),
            Err(ContainerError::NotABundle(_))
        ));
    }

    #[test]
    fn other_versions_and_trailing_bytes_are_refused() {
        assert_eq!(
            decode(&[0x83, 0x03, 0x40, 0xf6], usize::MAX),
            Err(ContainerError::UnsupportedFormat(3))
        );
        assert!(matches!(
            decode(&[0x82, 0x01, 0x40], usize::MAX),
            Err(ContainerError::NotABundle(_))
        ));
        assert_eq!(
            decode(&[0x82, 0x02, 0x40, 0x00], usize::MAX),
            Err(ContainerError::TrailingBytes(1))
        );
        // Format 2 is the two-item chunked container; three items are not one.
        assert!(matches!(
            decode(&[0x83, 0x02, 0x40, 0xf6], usize::MAX),
            Err(ContainerError::NotABundle(_))
        ));
        assert_eq!(
            decode(&[0x83, 0x01, 0x40, 0xf6, 0x00], usize::MAX),
            Err(ContainerError::TrailingBytes(1))
        );
        assert!(matches!(
            decode(&[0x83, 0x01, 0x40], usize::MAX),
            Err(ContainerError::Truncated(_))
        ));
        assert!(matches!(
            decode(&[0x83, 0x01, 0x40, 0xf5], usize::MAX),
            Err(ContainerError::NotABundle(_))
        ));
    }

    #[test]
    fn the_name_can_be_peeked_for_messages() {
        let m = Manifest::from_toml("name='echo'\nversion='1'\nseq=1\n").unwrap();
        assert_eq!(peek_name(&m.to_cbor()).as_deref(), Some("echo"));
        assert_eq!(peek_name(b"\xff"), None);
    }
}
