//! `edgectl trust`: the fleet's trust document (docs/protocol.md, "Trust document"). `sign` makes
//! one from a policy TOML with the root keys, `inspect` prints (and with the roots, verifies) one,
//! `publish` puts one, retained, on `<prefix>/trust`. edgectl only: `edge-agent` never calls this.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use ed25519_dalek::VerifyingKey;
use serde::Deserialize;

use super::common::{CliError, SMALL_FILE_MAX, read_private_key, read_public_key, unix_now};
use super::files;
use super::fleet::{self, BrokerArgs};
use crate::core::keys::{KEY_ID_LEN, KeyId};
use crate::core::text::printable;
use crate::core::topics::Topics;
use crate::core::trust::{
    self, Accepted, Fixed, KeyGrant, MAX_DOCUMENT_BYTES, RootKeys, Roots, SeqReset, TrustPayload,
};

/// `edgectl trust`'s commands.
#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Sign a trust document from a policy TOML with root keys.
    Sign(SignArgs),
    /// Print a trust document; with --root and --threshold, verify it and exit non-zero unless
    /// a device provisioned with those roots would accept it.
    Inspect(InspectArgs),
    /// Publish a trust document (retained, QoS 1) on <prefix>/trust.
    Publish(PublishArgs),
}

/// Arguments of `edgectl trust sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The policy (TOML; key file paths in it are relative to its directory).
    #[arg(long)]
    pub policy: PathBuf,
    /// A root private key to sign with (repeatable): at least the threshold of the devices'
    /// current roots, and for a root rotation the threshold of the new roots as well.
    #[arg(long = "root-key", value_name = "ROOT.key", required = true)]
    pub root_keys: Vec<PathBuf>,
    /// Where to write the document.
    #[arg(long)]
    pub out: PathBuf,
}

/// The roots devices are provisioned with (`[trust] roots`, `threshold`), to verify a trust
/// document as they would.
#[derive(Debug, Clone, Args)]
pub struct RootArgs {
    /// A root public key (repeatable; with --threshold).
    #[arg(long = "root", value_name = "ROOT.pub")]
    pub roots: Vec<PathBuf>,
    /// How many distinct roots must sign (the devices' `threshold`; with --root).
    #[arg(long)]
    pub threshold: Option<u64>,
}

impl RootArgs {
    /// The roots, or `None` when neither --root nor --threshold is given.
    pub fn read(&self) -> Result<Option<Roots>, CliError> {
        let threshold = match (self.roots.is_empty(), self.threshold) {
            (true, None) => return Ok(None),
            (false, Some(t)) => t,
            (true, Some(_)) => {
                return Err(CliError::Usage(
                    "--threshold needs the root public keys (--root ROOT.pub, repeated)".into(),
                ));
            }
            (false, None) => {
                return Err(CliError::Usage(
                    "--root needs --threshold: how many of the roots must sign, as the devices' \
                     [trust] threshold says"
                        .into(),
                ));
            }
        };
        let keys = self
            .roots
            .iter()
            .map(|p| read_public_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Roots::new(keys, threshold).map(Some).map_err(|e| {
            CliError::Usage(match e {
                trust::TrustError::BadRoots(why) => format!("--root/--threshold: {why}"),
                e => format!("--root/--threshold: {e}"),
            })
        })
    }
}

/// Arguments of `edgectl trust inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub roots: RootArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The trust document.
    pub document: PathBuf,
}

/// Arguments of `edgectl trust publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Verify the document under these roots before publishing (refuse it unless valid).
    #[command(flatten)]
    pub roots: RootArgs,
    /// The trust document (as `edgectl trust sign` wrote it).
    pub document: PathBuf,
}

/// Runs a `trust` command.
pub fn run(cmd: TrustCommand, out: &mut dyn Write, warn: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        TrustCommand::Sign(args) => sign(&args, out, warn),
        TrustCommand::Inspect(args) => inspect(&args, out),
        TrustCommand::Publish(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CliError::Output)?
            .block_on(publish(&args, out)),
    }
}

/// The policy TOML (README, "Trust: rotation and revocation").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u64,
    #[serde(default)]
    expires_at: Option<u64>,
    /// Key ids (16 hex digits).
    #[serde(default)]
    revoked: Vec<String>,
    /// Public key files whose key ids are revoked too.
    #[serde(default)]
    revoked_keys: Vec<PathBuf>,
    #[serde(default)]
    keys: Vec<KeyEntry>,
    #[serde(default)]
    seq_resets: Vec<SeqReset>,
    #[serde(default)]
    roots: Option<NextRoots>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    public_key: PathBuf,
    #[serde(default)]
    modules: Option<Vec<String>>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    not_after: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NextRoots {
    public_keys: Vec<PathBuf>,
    threshold: u64,
}

/// A key id as edgectl prints it: 16 hex digits.
fn parse_key_id(text: &str) -> Option<Fixed<KEY_ID_LEN>> {
    if text.len() != 2 * KEY_ID_LEN {
        return None;
    }
    let bytes = hex::decode(text).ok()?;
    <[u8; KEY_ID_LEN]>::try_from(bytes).ok().map(Fixed)
}

/// The payload a policy file states, with `issued_at`; key files are read relative to it.
fn read_policy(path: &Path, issued_at: u64) -> Result<TrustPayload, CliError> {
    let bad = |reason: String| CliError::TrustPolicy {
        path: path.to_path_buf(),
        reason,
    };
    let text = files::read_text(path, SMALL_FILE_MAX)?;
    let file: PolicyFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new(""));
    let key = |p: &Path| -> Result<Fixed<32>, CliError> {
        Ok(Fixed(read_public_key(&base.join(p))?.to_bytes()))
    };
    let mut revoked = Vec::new();
    for r in &file.revoked {
        let id = parse_key_id(r).ok_or_else(|| {
            bad(format!(
                "revoked: {:?} is not a key id (16 hex digits, as `edgectl keygen` prints)",
                printable(r)
            ))
        })?;
        if !revoked.contains(&id) {
            revoked.push(id);
        }
    }
    for p in &file.revoked_keys {
        let path = base.join(p);
        let id = Fixed(KeyId::of(&read_public_key(&path)?).0);
        if !revoked.contains(&id) {
            revoked.push(id);
        }
    }
    let keys = file
        .keys
        .iter()
        .map(|k| {
            Ok(KeyGrant {
                key: key(&k.public_key)?,
                modules: k.modules.clone(),
                groups: k.groups.clone(),
                not_after: k.not_after,
            })
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    let roots = match &file.roots {
        Some(r) => Some(RootKeys {
            keys: r
                .public_keys
                .iter()
                .map(|p| key(p))
                .collect::<Result<_, _>>()?,
            threshold: r.threshold,
        }),
        None => None,
    };
    Ok(TrustPayload {
        version: file.version,
        issued_at,
        expires_at: file.expires_at,
        keys,
        revoked,
        seq_resets: file.seq_resets,
        roots,
    })
}

fn sign(args: &SignArgs, out: &mut dyn Write, warn: &mut dyn Write) -> Result<(), CliError> {
    let payload = read_policy(&args.policy, unix_now())?;
    let refused = |source| CliError::Trust {
        path: args.policy.clone(),
        source,
    };
    let keys = args
        .root_keys
        .iter()
        .map(|p| read_private_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let signers: Vec<KeyId> = keys.iter().map(|k| KeyId::of(&k.verifying_key())).collect();
    // A rotation the new roots did not sign can never be accepted: refuse to make it.
    let next = match &payload.roots {
        Some(wire) => {
            let next = Roots::from_wire(wire).map_err(refused)?;
            let have = signers.iter().filter(|k| next.contains(k)).count();
            if have < next.threshold() {
                return Err(refused(trust::TrustError::RotationBelowThreshold {
                    roots: next.to_string(),
                    have,
                    need: next.threshold(),
                }));
            }
            Some(next)
        }
        None => None,
    };
    let bytes = trust::sign(&payload, &keys).map_err(refused)?;
    files::write_atomic(&args.out, &bytes, 0o644, false)?;
    writeln!(
        out,
        "signed trust document version {} -> {} ({} bytes)",
        payload.version,
        args.out.display(),
        bytes.len()
    )?;
    writeln!(out, "signed by  {}", join(&signers))?;
    print_payload(out, &payload)?;
    if let Some(next) = next {
        writeln!(
            warn,
            "edgectl: warning: {} rotates the roots to {next}: a device accepts it only if it is \
             signed by the threshold of its current roots AND by {} of the new ones; signed by {}",
            args.out.display(),
            next.threshold(),
            join(&signers)
        )?;
    }
    Ok(())
}

/// Reads a trust document (bounded) and verifies it under `roots` as a device that has accepted
/// none yet would, at the system clock.
pub fn verify_file(path: &Path, roots: &Roots) -> Result<(Vec<u8>, Accepted), CliError> {
    let bytes = files::read_bounded(path, MAX_DOCUMENT_BYTES as u64)?;
    let accepted =
        trust::verify(&bytes, roots, 0, unix_now()).map_err(|source| CliError::Trust {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((bytes, accepted))
}

/// Reads a trust document (bounded) and decodes it without checking any signature.
fn read_unverified(path: &Path) -> Result<(Vec<u8>, trust::Unverified), CliError> {
    let bytes = files::read_bounded(path, MAX_DOCUMENT_BYTES as u64)?;
    let u = trust::read_unverified(&bytes).map_err(|source| CliError::Trust {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((bytes, u))
}

fn inspect(args: &InspectArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let roots = args.roots.read()?;
    let (bytes, checked) = match &roots {
        Some(roots) => {
            let (bytes, accepted) = verify_file(&args.document, roots)?;
            (bytes, Some(accepted))
        }
        None => (
            files::read_bounded(&args.document, MAX_DOCUMENT_BYTES as u64)?,
            None,
        ),
    };
    // The payload as stated (verified above when roots were given: the same bytes).
    let u = trust::read_unverified(&bytes).map_err(|source| CliError::Trust {
        path: args.document.clone(),
        source,
    })?;
    if args.json {
        let report = serde_json::json!({
            "file": args.document.display().to_string(),
            "bytes": bytes.len(),
            "verified": checked.is_some(),
            "signers": match &checked {
                Some(a) => ids(&a.signers),
                None => ids(&u.signers),
            },
            "roots_after": checked.as_ref().map(|a| roots_json(&a.roots.to_wire())),
            "version": u.payload.version,
            "issued_at": u.payload.issued_at,
            "expires_at": u.payload.expires_at,
            "keys": u.payload.keys.iter().map(|g| serde_json::json!({
                "key_id": grant_id(g),
                "public_key": hex::encode(g.key.0),
                "modules": g.modules,
                "groups": g.groups,
                "not_after": g.not_after,
            })).collect::<Vec<_>>(),
            "revoked": u.payload.revoked.iter().map(|k| hex::encode(k.0)).collect::<Vec<_>>(),
            "seq_resets": u.payload.seq_resets,
            "roots": u.payload.roots.as_ref().map(roots_json),
        });
        writeln!(out, "{report:#}")?;
        return Ok(());
    }
    writeln!(
        out,
        "document   {} ({} bytes)",
        args.document.display(),
        bytes.len()
    )?;
    match (&checked, &roots) {
        (Some(a), Some(roots)) => {
            writeln!(
                out,
                "signatures valid: signed by {} (devices need {roots})",
                join(&a.signers)
            )?;
            if a.rotated {
                writeln!(
                    out,
                    "           the new roots' threshold signed too: devices move to roots {}",
                    a.roots
                )?;
            }
        }
        _ => writeln!(
            out,
            "signatures NOT CHECKED (no --root given); claims signers {}",
            join(&u.signers)
        )?,
    }
    print_payload(out, &u.payload)
}

async fn publish(args: &PublishArgs, out: &mut dyn Write) -> Result<(), CliError> {
    // The prefix is checked as the agent checks its own.
    Topics::new(&args.broker.prefix, "edgectl", &[])
        .map_err(|e| CliError::Usage(format!("--prefix: {e}")))?;
    let (bytes, version, checked) = match args.roots.read()? {
        Some(roots) => {
            let (bytes, accepted) = verify_file(&args.document, &roots)?;
            (bytes, accepted.policy.version, true)
        }
        None => {
            let (bytes, u) = read_unverified(&args.document)?;
            (bytes, u.payload.version, false)
        }
    };
    let topic = Topics::trust_document(&args.broker.prefix);
    let len = bytes.len();
    let mut session = fleet::connect(&args.broker).await?;
    session.publish(topic.clone(), true, bytes).await?;
    writeln!(
        out,
        "published trust document version {version} ({len} bytes) to {topic} (retained){}",
        if checked {
            ""
        } else {
            "; signatures not checked (give --root and --threshold to check them first)"
        }
    )?;
    Ok(())
}

fn join(ids: &[KeyId]) -> String {
    if ids.is_empty() {
        return "(nobody)".into();
    }
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn ids(ids: &[KeyId]) -> Vec<String> {
    ids.iter().map(KeyId::to_string).collect()
}

/// The key id of a granted key; an unverified document may carry bytes that are no key.
fn grant_id(g: &KeyGrant) -> String {
    match VerifyingKey::from_bytes(&g.key.0) {
        Ok(k) => KeyId::of(&k).to_string(),
        Err(_) => format!("(not an Ed25519 key: {})", hex::encode(g.key.0)),
    }
}

fn roots_json(r: &RootKeys) -> serde_json::Value {
    serde_json::json!({
        "threshold": r.threshold,
        "keys": r.keys.iter().map(|k| serde_json::json!({
            "key_id": VerifyingKey::from_bytes(&k.0).map(|k| KeyId::of(&k).to_string()).ok(),
            "public_key": hex::encode(k.0),
        })).collect::<Vec<_>>(),
    })
}

fn list(items: &Option<Vec<String>>) -> String {
    match items {
        None => "all".into(),
        Some(items) => {
            let items: Vec<String> = items.iter().map(|i| printable(i).into_owned()).collect();
            format!("[{}]", items.join(","))
        }
    }
}

/// The payload, one fact per line (strings escaped: an unverified document is anyone's text).
fn print_payload(out: &mut dyn Write, p: &TrustPayload) -> Result<(), CliError> {
    writeln!(out, "version    {}", p.version)?;
    writeln!(out, "issued_at  unix {}", p.issued_at)?;
    match p.expires_at {
        Some(t) => writeln!(out, "expires    unix {t}")?,
        None => writeln!(out, "expires    never")?,
    }
    if p.keys.is_empty() {
        writeln!(out, "keys       (none: no key may sign bundles)")?;
    }
    for g in &p.keys {
        let not_after = g
            .not_after
            .map_or_else(|| "never".to_string(), |t| format!("unix {t}"));
        writeln!(
            out,
            "key        {} modules={} groups={} expires {not_after}",
            grant_id(g),
            list(&g.modules),
            list(&g.groups)
        )?;
    }
    if p.revoked.is_empty() {
        writeln!(out, "revoked    (none)")?;
    } else {
        let revoked: Vec<String> = p.revoked.iter().map(|k| hex::encode(k.0)).collect();
        writeln!(out, "revoked    {}", revoked.join(", "))?;
    }
    for r in &p.seq_resets {
        writeln!(
            out,
            "seq reset  {}: highest seq lowered to {}",
            printable(&r.module),
            r.seq
        )?;
    }
    match &p.roots {
        None => writeln!(out, "roots      unchanged")?,
        Some(r) => {
            let ids: Vec<String> = r
                .keys
                .iter()
                .map(|k| {
                    VerifyingKey::from_bytes(&k.0).map_or_else(
                        |_| format!("(not an Ed25519 key: {})", hex::encode(k.0)),
                        |k| KeyId::of(&k).to_string(),
                    )
                })
                .collect();
            writeln!(
                out,
                "roots      ROTATED to {} of [{}]",
                r.threshold,
                ids.join(", ")
            )?;
        }
    }
    Ok(())
}
