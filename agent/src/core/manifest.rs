//! The manifest: what a signed bundle says about its module — name, version, anti-rollback
//! sequence number, the Wasm it carries, resource limits, granted capabilities, expiry and targets.
//!
//! The same types are read from TOML (what an operator writes) and from CBOR (what a device
//! receives, inside the COSE_Sign1 payload). Every field is checked by [`Manifest::check`], which
//! both `edgectl sign` and the device's verifier call.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest module name: `[a-z0-9][a-z0-9-]{0,62}`.
pub const NAME_MAX_LEN: usize = 63;
/// Longest human version string.
pub const VERSION_MAX_LEN: usize = 64;
/// Longest device id or group name.
pub const ID_MAX_LEN: usize = 128;
/// Longest `caps.publish` pattern.
pub const TOPIC_PATTERN_MAX_LEN: usize = 256;
/// Most entries in any one capability or target list.
pub const LIST_MAX_LEN: usize = 64;
/// Largest linear memory a wasm32 module can address.
pub const WASM32_MEMORY_MAX: u64 = 1 << 32;
/// Largest `seq`: 2^53. A device accepts only a greater `seq` than it accepted before (removals
/// included), so a bundle at the top of the u64 range would leave its module on the device for
/// good; the bound keeps 2^64 - 2^53 values above any accepted `seq`, and every `seq` exact in a
/// double (JSON, JavaScript tooling).
pub const SEQ_MAX: u64 = 1 << 53;
/// Most chunks a manifest may list (3 CBOR items each: within the manifest's item bound).
pub const CHUNKS_MAX: usize = 4096;
/// Largest chunk a manifest may list: no broker packet limit that matters is above it.
pub const CHUNK_MAX_BYTES: u64 = 1 << 20;

/// What a bundle asks the device to do with the module it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Install (or upgrade to) the Wasm module the bundle carries.
    #[default]
    Install,
    /// Remove the module. Signed like anything else: nothing unsigned changes what a device runs.
    Remove,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Install => "install",
            Action::Remove => "remove",
        })
    }
}

/// A SHA-256 digest: a 32-byte byte string in CBOR, lower-case hex in JSON and TOML.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// Digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Sha256(sha2::Sha256::digest(bytes).into())
    }

    /// Lower-case hex, as shown to operators.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_hex())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Sha256;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 32-byte SHA-256 digest as a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sha256, E> {
                <[u8; 32]>::try_from(v)
                    .map(Sha256)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sha256, E> {
                let bytes = hex::decode(v).map_err(E::custom)?;
                self.visit_bytes(&bytes)
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_bytes(V)
        }
    }
}

/// Digest and size of the module's Wasm bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmRef {
    /// SHA-256 of the Wasm bytes.
    pub sha256: Sha256,
    /// Length of the Wasm bytes.
    pub size: u64,
}

/// Resource limits the module runs under (the agent clamps them by its own maxima).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Fuel (roughly: Wasm instructions) one guest call may burn before it is stopped.
    pub fuel_per_call: u64,
    /// Cap on the module's linear memory, in bytes.
    pub memory_max_bytes: u64,
    /// Period of the module's `tick`, in milliseconds; 0 means the module is never ticked.
    pub tick_interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_call: 1_000_000,
            memory_max_bytes: 1 << 20,
            tick_interval_ms: 1_000,
        }
    }
}

/// An I2C grant: one bus and the device addresses on it the module may talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cGrant {
    /// Bus number as the device's config names it (`/dev/i2c-<bus>` on Linux).
    pub bus: u32,
    /// 7-bit device addresses.
    pub addresses: Vec<u16>,
}

/// An SPI grant: one device (bus and chip select).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiGrant {
    /// Bus number (`/dev/spidev<bus>.<cs>` on Linux).
    pub bus: u32,
    /// Chip select.
    pub cs: u32,
}

/// Capabilities the module is granted. Everything not listed is denied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Caps {
    /// MQTT topic filters, relative to the module's own telemetry namespace, it may publish to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Bytes of key-value storage (keys plus values); 0 grants no key-value store.
    #[serde(skip_serializing_if = "is_zero")]
    pub kv_quota_bytes: u64,
    /// GPIO lines, as the device's config numbers them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpio: Vec<u32>,
    /// I2C buses and addresses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub i2c: Vec<I2cGrant>,
    /// SPI devices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spi: Vec<SpiGrant>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Caps {
    /// True when nothing at all is granted.
    pub fn is_empty(&self) -> bool {
        *self == Caps::default()
    }
}

/// Which devices a bundle is meant for. A device accepts a bundle that names it, or one of
/// its groups; a bundle without targets is accepted by any device that receives it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Targets {
    /// Device ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Group names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Targets {
    /// Whether a device with this id and these groups is targeted.
    pub fn includes(&self, device: &str, groups: &[String]) -> bool {
        self.devices.iter().any(|d| d == device) || self.groups.iter().any(|g| groups.contains(g))
    }
}

/// The signed manifest.
///
/// The order of the fields here (and in the types it holds) is the order of the keys in its
/// canonical CBOR encoding ([`Manifest::to_cbor`], docs/protocol.md "Canonical encoding"), which
/// devices require: reordering fields, or changing which are omitted, changes what every
/// existing bundle must look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Module name, `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// Human version string (not used for ordering; `seq` is).
    #[serde(default)]
    pub version: String,
    /// Sequence number; must strictly increase per module on a device (anti-rollback). At most
    /// [`SEQ_MAX`].
    pub seq: u64,
    /// Install or remove.
    #[serde(default)]
    pub action: Action,
    /// Digest and size of the Wasm bytes (installs only; filled in by `edgectl sign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmRef>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Granted capabilities.
    #[serde(default, skip_serializing_if = "Caps::is_empty")]
    pub caps: Caps,
    /// Unix seconds after which a device refuses the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Devices and groups the bundle is meant for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    /// When it was signed, unix seconds (`edgectl sign` sets it). A device that accepts the
    /// bundle raises its time floor to it: expiry is judged by `max(clock, floor)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<u64>,
    /// The Wasm's content-defined chunks in order (installs delivered in chunks): each is
    /// fetched from `<prefix>/chunk/<sha256>` and verified on arrival. Their sizes add up to
    /// `wasm.size`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
}

/// One chunk of a module's Wasm: its SHA-256 and length. A two-item array in CBOR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef(pub Sha256, pub u64);

impl ChunkRef {
    /// The chunk's digest.
    pub fn sha256(&self) -> Sha256 {
        self.0
    }

    /// The chunk's length in bytes.
    pub fn size(&self) -> u64 {
        self.1
    }
}

/// Why a manifest is not acceptable, before any signature or device state is considered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestProblem {
    /// The name does not match `[a-z0-9][a-z0-9-]{0,62}`.
    #[error("module name {0:?} is not well formed: it must match [a-z0-9][a-z0-9-]{{0,62}}")]
    BadName(String),
    /// The sequence number is above [`SEQ_MAX`].
    #[error(
        "module {module:?}: seq {seq} is above the largest allowed seq, 2^53 = {SEQ_MAX}: nothing could ever replace or remove it"
    )]
    SeqTooLarge {
        /// Module name.
        module: String,
        /// The offending seq.
        seq: u64,
    },
    /// The version string is empty (installs), too long or has control characters.
    #[error("module {module:?}: version {version:?} {reason}")]
    BadVersion {
        /// Module name.
        module: String,
        /// The offending version.
        version: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A limit is out of range.
    #[error("module {module:?}: limits: {reason}")]
    BadLimits {
        /// Module name.
        module: String,
        /// What is wrong.
        reason: String,
    },
    /// A capability is malformed.
    #[error("module {module:?}: caps: {reason}")]
    BadCaps {
        /// Module name.
        module: String,
        /// What is wrong.
        reason: String,
    },
    /// A target is malformed.
    #[error("module {module:?}: targets: {reason}")]
    BadTargets {
        /// Module name.
        module: String,
        /// What is wrong.
        reason: String,
    },
    /// The chunk list is malformed.
    #[error("module {module:?}: chunks: {reason}")]
    BadChunks {
        /// Module name.
        module: String,
        /// What is wrong.
        reason: String,
    },
}

/// Whether `name` is a well-formed module name.
pub fn is_valid_module_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= NAME_MAX_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Whether `id` is a well-formed device id or group name: `[A-Za-z0-9._:-]{1,128}`, so that it
/// is always exactly one MQTT topic level and never a wildcard.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_MAX_LEN
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// Checks a topic filter relative to a module's namespace: non-empty levels separated by `/`,
/// `+` only as a whole level, `#` only as the whole last level, no `$` at the start, no NUL.
pub fn check_topic_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty publish pattern".into());
    }
    if pattern.len() > TOPIC_PATTERN_MAX_LEN {
        return Err(format!(
            "publish pattern longer than {TOPIC_PATTERN_MAX_LEN} bytes"
        ));
    }
    if pattern.starts_with('$') {
        return Err(format!("publish pattern {pattern:?} starts with '$'"));
    }
    let levels: Vec<&str> = pattern.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.is_empty() {
            return Err(format!("publish pattern {pattern:?} has an empty level"));
        }
        if level.chars().any(char::is_control) {
            return Err(format!(
                "publish pattern {pattern:?} has a control character"
            ));
        }
        let wild = level.contains('+') || level.contains('#');
        if wild && *level != "+" && *level != "#" {
            return Err(format!(
                "publish pattern {pattern:?}: a wildcard must be a whole level"
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!(
                "publish pattern {pattern:?}: '#' must be the last level"
            ));
        }
    }
    Ok(())
}

/// Checks a concrete topic (no wildcards) relative to a module's namespace.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.contains('+') || topic.contains('#') {
        return Err(format!("topic {topic:?} contains a wildcard"));
    }
    check_topic_pattern(topic)
}

/// Whether the concrete `topic` matches the MQTT-style `pattern` (both relative, both checked).
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('/');
    let mut t = topic.split('/');
    loop {
        match (p.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Manifest {
    /// Parses the operator's TOML manifest (see README, "Manifest"). The Wasm digest is not part
    /// of it: `edgectl sign` computes it from the module bytes.
    pub fn from_toml(text: &str) -> Result<Manifest, String> {
        let m: Manifest = toml::from_str(text).map_err(|e| e.to_string())?;
        if m.wasm.is_some() {
            return Err(
                "`wasm` is computed by `edgectl sign` from the module bytes; remove it".into(),
            );
        }
        Ok(m)
    }

    /// Checks every field's form. It does not look at signatures, device state or the clock.
    pub fn check(&self) -> Result<(), ManifestProblem> {
        if !is_valid_module_name(&self.name) {
            return Err(ManifestProblem::BadName(self.name.clone()));
        }
        let module = || self.name.clone();
        if self.seq > SEQ_MAX {
            return Err(ManifestProblem::SeqTooLarge {
                module: module(),
                seq: self.seq,
            });
        }
        let bad_version = |reason| ManifestProblem::BadVersion {
            module: module(),
            version: self.version.clone(),
            reason,
        };
        if self.action == Action::Install && self.version.is_empty() {
            return Err(bad_version("is empty"));
        }
        if self.version.len() > VERSION_MAX_LEN {
            return Err(bad_version("is longer than 64 bytes"));
        }
        if self.version.chars().any(char::is_control) {
            return Err(bad_version("has control characters"));
        }
        self.check_limits()
            .map_err(|reason| ManifestProblem::BadLimits {
                module: module(),
                reason,
            })?;
        self.check_caps()
            .map_err(|reason| ManifestProblem::BadCaps {
                module: module(),
                reason,
            })?;
        self.check_targets()
            .map_err(|reason| ManifestProblem::BadTargets {
                module: module(),
                reason,
            })?;
        self.check_chunks()
            .map_err(|reason| ManifestProblem::BadChunks {
                module: module(),
                reason,
            })
    }

    fn check_chunks(&self) -> Result<(), String> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        let Some(wasm) = self.wasm.filter(|_| self.action == Action::Install) else {
            return Err("only an install with a Wasm digest lists chunks".into());
        };
        if self.chunks.len() > CHUNKS_MAX {
            return Err(format!(
                "{} chunks, above the maximum of {CHUNKS_MAX}",
                self.chunks.len()
            ));
        }
        let mut total: u64 = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.size() == 0 || c.size() > CHUNK_MAX_BYTES {
                return Err(format!(
                    "chunk {i} is {} bytes: a chunk is 1 to {CHUNK_MAX_BYTES} bytes",
                    c.size()
                ));
            }
            total = total.saturating_add(c.size());
        }
        if total != wasm.size {
            return Err(format!(
                "the chunks add up to {total} bytes but the Wasm is {} bytes",
                wasm.size
            ));
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), String> {
        let l = &self.limits;
        if self.action == Action::Remove {
            return Ok(());
        }
        if l.fuel_per_call == 0 {
            return Err("fuel_per_call must be at least 1".into());
        }
        if l.memory_max_bytes > WASM32_MEMORY_MAX {
            return Err(format!(
                "memory_max_bytes {} is above the 4 GiB a wasm32 module can address",
                l.memory_max_bytes
            ));
        }
        Ok(())
    }

    fn check_caps(&self) -> Result<(), String> {
        let c = &self.caps;
        let too_long = |what: &str, n: usize| {
            (n > LIST_MAX_LEN).then(|| format!("more than {LIST_MAX_LEN} {what} entries"))
        };
        for (what, n) in [
            ("publish", c.publish.len()),
            ("gpio", c.gpio.len()),
            ("i2c", c.i2c.len()),
            ("spi", c.spi.len()),
        ] {
            if let Some(e) = too_long(what, n) {
                return Err(e);
            }
        }
        for p in &c.publish {
            check_topic_pattern(p)?;
        }
        for grant in &c.i2c {
            if grant.addresses.is_empty() {
                return Err(format!("i2c bus {} grants no addresses", grant.bus));
            }
            if let Some(e) = too_long("i2c address", grant.addresses.len()) {
                return Err(e);
            }
            if let Some(a) = grant.addresses.iter().find(|a| !(0x03..=0x77).contains(*a)) {
                return Err(format!(
                    "i2c bus {}: address {a:#04x} is not a 7-bit device address (0x03..=0x77)",
                    grant.bus
                ));
            }
        }
        Ok(())
    }

    fn check_targets(&self) -> Result<(), String> {
        let Some(t) = &self.targets else {
            return Ok(());
        };
        if t.devices.is_empty() && t.groups.is_empty() {
            return Err("targets is present but names no device and no group".into());
        }
        if t.devices.len() > LIST_MAX_LEN || t.groups.len() > LIST_MAX_LEN {
            return Err(format!("more than {LIST_MAX_LEN} devices or groups"));
        }
        if let Some(bad) = t
            .devices
            .iter()
            .chain(&t.groups)
            .find(|id| !is_valid_id(id))
        {
            return Err(format!(
                "{bad:?} is not a valid device id or group name ([A-Za-z0-9._:-]{{1,128}})"
            ));
        }
        Ok(())
    }

    /// Encodes the manifest as CBOR, as it travels in the COSE_Sign1 payload: its one canonical
    /// encoding (docs/protocol.md, "Canonical encoding"). Keys in field order, every head in
    /// shortest form, definite lengths, no tags; `wasm`, `caps`, `expires_at`, `targets` and the
    /// lists and quota inside `caps` and `targets` omitted when empty; everything else always
    /// written. Devices decode a signed manifest, encode it again with this function and refuse
    /// it unless the bytes are the same.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        // Writing plain data into a Vec cannot fail.
        ciborium::into_writer(self, &mut out).unwrap_or_else(|e| unreachable!("{e}"));
        out
    }

    /// Decodes a CBOR manifest.
    pub fn from_cbor(bytes: &[u8]) -> Result<Manifest, String> {
        super::cbor::check(bytes, super::cbor::DOCUMENT).map_err(|e| e.to_string())?;
        let mut rest = bytes;
        let m = ciborium::from_reader(&mut rest).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the manifest", rest.len()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
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

    #[test]
    fn the_documented_toml_shape_parses_and_checks() {
        let m = Manifest::from_toml(SAMPLE).unwrap();
        assert_eq!(m.name, "heartbeat");
        assert_eq!(m.action, Action::Install);
        assert_eq!(m.caps.i2c[0].addresses, vec![0x76]);
        assert_eq!(m.caps.gpio, vec![17]);
        m.check().unwrap();
    }

    #[test]
    fn manifest_round_trips_through_cbor() {
        let mut m = Manifest::from_toml(SAMPLE).unwrap();
        m.wasm = Some(WasmRef {
            sha256: Sha256::of(b"x"),
            size: 1,
        });
        m.expires_at = Some(42);
        m.targets = Some(Targets {
            devices: vec!["pi-1".into()],
            groups: vec![],
        });
        assert_eq!(Manifest::from_cbor(&m.to_cbor()).unwrap(), m);
    }

    fn cbor_keys(bytes: &[u8]) -> Vec<String> {
        let value: ciborium::Value = ciborium::from_reader(bytes).unwrap();
        value
            .into_map()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.into_text().unwrap())
            .collect()
    }

    #[test]
    fn the_cbor_encoding_has_the_documented_key_order_and_omits_only_empty_optionals() {
        let mut m = Manifest::from_toml(SAMPLE).unwrap();
        m.caps.spi = vec![SpiGrant { bus: 0, cs: 1 }];
        m.wasm = Some(WasmRef {
            sha256: Sha256::of(b"x"),
            size: 1,
        });
        m.expires_at = Some(42);
        m.targets = Some(Targets {
            devices: vec!["pi-1".into()],
            groups: vec!["barn".into()],
        });
        let every = [
            "name",
            "version",
            "seq",
            "action",
            "wasm",
            "limits",
            "caps",
            "expires_at",
            "targets",
        ];
        assert_eq!(cbor_keys(&m.to_cbor()), every);
        let removal = Manifest::from_toml("name = 'heartbeat'\nseq = 3\naction = 'remove'\n");
        assert_eq!(
            cbor_keys(&removal.unwrap().to_cbor()),
            ["name", "version", "seq", "action", "limits"],
            "a removal's version, action and limits are written even at their defaults"
        );
        let value: ciborium::Value = ciborium::from_reader(&m.to_cbor()[..]).unwrap();
        let map = value.into_map().unwrap();
        let keys_of = |key: &str| -> Vec<String> {
            let (_, v) = map.iter().find(|(k, _)| k.as_text() == Some(key)).unwrap();
            let mut bytes = Vec::new();
            ciborium::into_writer(v, &mut bytes).unwrap();
            cbor_keys(&bytes)
        };
        assert_eq!(keys_of("wasm"), ["sha256", "size"]);
        assert_eq!(
            keys_of("limits"),
            ["fuel_per_call", "memory_max_bytes", "tick_interval_ms"]
        );
        assert_eq!(
            keys_of("caps"),
            ["publish", "kv_quota_bytes", "gpio", "i2c", "spi"]
        );
        assert_eq!(keys_of("targets"), ["devices", "groups"]);
    }

    #[test]
    fn every_integer_in_the_cbor_encoding_has_a_shortest_head() {
        // (seq, the bytes its value is encoded as after the "seq" key)
        for (seq, head) in [
            (0, &[0x00][..]),
            (23, &[0x17]),
            (24, &[0x18, 24]),
            (255, &[0x18, 0xff]),
            (256, &[0x19, 0x01, 0x00]),
            (65_535, &[0x19, 0xff, 0xff]),
            (65_536, &[0x1a, 0, 1, 0, 0]),
            (u64::from(u32::MAX), &[0x1a, 0xff, 0xff, 0xff, 0xff]),
            (1 << 32, &[0x1b, 0, 0, 0, 1, 0, 0, 0, 0]),
            (SEQ_MAX, &[0x1b, 0, 0x20, 0, 0, 0, 0, 0, 0]),
        ] {
            let mut m = Manifest::from_toml(SAMPLE).unwrap();
            m.seq = seq;
            let bytes = m.to_cbor();
            let mut expected = b"\x63seq".to_vec();
            expected.extend_from_slice(head);
            assert!(
                bytes.windows(expected.len()).any(|w| w == expected),
                "seq {seq}: {}",
                hex::encode(&bytes)
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_in_toml_and_cbor() {
        assert!(Manifest::from_toml(&format!("{SAMPLE}\nbogus = 1\n")).is_err());
        assert!(Manifest::from_toml("name='a'\nseq=1\n[caps]\nsudo=true\n").is_err());
    }

    #[test]
    fn a_wasm_digest_in_toml_is_refused() {
        let err = Manifest::from_toml(&format!(
            "name='a'\nversion='1'\nseq=1\n[wasm]\nsha256='{}'\nsize=1\n",
            "0".repeat(64)
        ))
        .unwrap_err();
        assert!(err.contains("computed by"), "{err}");
    }

    #[test]
    fn removal_needs_only_name_and_seq() {
        let m = Manifest::from_toml("name = 'heartbeat'\nseq = 3\naction = 'remove'\n").unwrap();
        assert_eq!(m.action, Action::Remove);
        m.check().unwrap();
    }

    #[test]
    fn module_names_follow_the_pattern() {
        for ok in ["a", "0", "heartbeat", "kv-counter", &"a".repeat(63)] {
            assert!(is_valid_module_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "A",
            "a_b",
            "a/b",
            "a.b",
            "é",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(!is_valid_module_name(bad), "{bad}");
        }
    }

    #[test]
    fn topic_patterns_are_checked() {
        for ok in ["a", "a/b", "a/+/c", "a/#", "#", "+"] {
            check_topic_pattern(ok).unwrap();
        }
        for bad in [
            "", "/a", "a/", "a//b", "a#", "a/#/b", "a+/b", "$SYS/x", "a\0b",
        ] {
            assert!(check_topic_pattern(bad).is_err(), "{bad:?}");
        }
        assert!(check_topic("a/+").is_err());
    }

    #[test]
    fn topic_matching_follows_mqtt_rules() {
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("a/+/c", "a/b/d"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(!topic_matches("a/b/c", "a/b"));
        assert!(topic_matches("#", "x"));
    }

    #[test]
    fn seq_is_bounded_by_two_to_the_53() {
        let mut m = Manifest::from_toml(SAMPLE).unwrap();
        m.seq = SEQ_MAX;
        m.check().unwrap();
        for seq in [SEQ_MAX + 1, u64::MAX] {
            m.seq = seq;
            let e = m.check().unwrap_err();
            assert_eq!(
                e,
                ManifestProblem::SeqTooLarge {
                    module: "heartbeat".into(),
                    seq
                }
            );
            assert!(e.to_string().contains("9007199254740992"), "{e}");
        }
        // A removal too: one at the top of the range could never be followed by an install.
        let removal = Manifest::from_toml(&format!(
            "name = 'heartbeat'\nseq = {}\naction = 'remove'\n",
            SEQ_MAX + 1
        ))
        .unwrap();
        assert!(matches!(
            removal.check(),
            Err(ManifestProblem::SeqTooLarge { .. })
        ));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut m = Manifest::from_toml(SAMPLE).unwrap();
        m.limits.fuel_per_call = 0;
        assert!(matches!(m.check(), Err(ManifestProblem::BadLimits { .. })));
        let mut m = Manifest::from_toml(SAMPLE).unwrap();
        m.caps.i2c[0].addresses = vec![0x80];
        let e = m.check().unwrap_err();
        assert!(e.to_string().contains("0x80"), "{e}");
        let mut m = Manifest::from_toml(SAMPLE).unwrap();
        m.targets = Some(Targets {
            devices: vec!["a/b".into()],
            groups: vec![],
        });
        assert!(matches!(m.check(), Err(ManifestProblem::BadTargets { .. })));
        let mut m = Manifest::from_toml(SAMPLE).unwrap();
        m.version = String::new();
        assert!(matches!(m.check(), Err(ManifestProblem::BadVersion { .. })));
    }
}
