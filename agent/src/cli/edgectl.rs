//! `edgectl`, the operator's tool: keys, signing and inspecting bundles; the fleet commands are in
//! `fleet.rs`, the trust document's in `trust.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use super::common::{
    CliError, SMALL_FILE_MAX, generate_key, read_private_key, read_trust_set, unix_now,
};
use super::files::{self, FileError};
use super::fleet;
use super::gc;
use super::trust::{self, RootArgs, TrustCommand};
use crate::core::bundle::{self, DEFAULT_MAX_BUNDLE_BYTES};
use crate::core::chunking;
use crate::core::keys::{self, KeyId};
use crate::core::manifest::{Action, CHUNKS_MAX, Manifest, is_valid_id};
use crate::core::verify::{self, DeviceIdentity, Trust, Verifier};
use crate::engine::WasmLimits;

/// The operator's tool for an edge-agent fleet.
#[derive(Debug, Parser)]
#[command(name = "edgectl", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// edgectl's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a new Ed25519 signing key: KEY (private, mode 0600) and KEY.pub; prints the key id.
    Keygen {
        /// Where to write the private key; the public key goes to the same path plus `.pub`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a module (or a removal) into a bundle.
    Sign(SignArgs),
    /// Print a bundle's manifest; with --trust (or --trust-doc), verify it and exit non-zero
    /// unless it is valid.
    Inspect(InspectArgs),
    /// The fleet's trust document: sign, inspect, publish.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Publish a signed bundle (retained) to a device's or a group's desired state.
    Deploy(fleet::DeployArgs),
    /// Sign a removal of a module and publish it (retained) in place of its bundle.
    Remove(fleet::RemoveArgs),
    /// Show a device's status (modules, state, restarts, fuel, memory, last error).
    Status(fleet::WatchArgs),
    /// Print a device's deployment events as they happen.
    Events(fleet::WatchArgs),
    /// Print module log lines from a device as they arrive.
    Logs(fleet::WatchArgs),
    /// Print what modules on a device publish, as it arrives.
    Telemetry(fleet::WatchArgs),
    /// Restart a module on a device (also out of quarantine).
    Restart(fleet::RestartArgs),
    /// Remove the retained chunks that no retained desired bundle lists, and corrupt ones.
    ///
    /// Lists the retained bundles on `<prefix>/+/desired/+` and `<prefix>/group/+/desired/+`
    /// and the retained chunks on `<prefix>/chunk/+`, then clears every chunk that no bundle
    /// lists and every chunk whose bytes do not match its digest (`edgectl deploy` sends those
    /// again). Do not run it while a deploy is in progress: a deploy publishes its chunks before
    /// the signed part that lists them, so gc would remove chunks about to be referenced.
    Gc(gc::GcArgs),
}

/// Arguments of `edgectl sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The private key (PKCS#8 PEM, as `edgectl keygen` writes it).
    #[arg(long)]
    pub key: PathBuf,
    /// The Wasm module (installs only).
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// The TOML manifest.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Where to write the bundle.
    #[arg(long)]
    pub out: PathBuf,
    /// Largest bundle to produce (devices refuse larger ones).
    #[arg(long, default_value_t = DEFAULT_MAX_BUNDLE_BYTES)]
    pub max_bundle_bytes: usize,
    /// Average chunk size: a Wasm module larger than this is cut into content-defined chunks
    /// (FastCDC, a quarter to four times this size, at most 130816 bytes) that the manifest
    /// lists, so that `edgectl deploy` can send it in chunks below a broker's message size limit
    /// and an upgrade sends only the chunks that changed. 0: list no chunks (the bundle then
    /// travels only as one message).
    #[arg(long, default_value_t = chunking::DEFAULT_AVG_BYTES, value_name = "BYTES")]
    pub chunk_avg_bytes: usize,
}

/// Arguments of `edgectl inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A trusted public key (repeatable). With at least one, the bundle is verified.
    #[arg(long = "trust", value_name = "KEY.pub")]
    pub trust: Vec<PathBuf>,
    /// A trust document: verify it under --root/--threshold, then the bundle as a device in
    /// trust-document mode (with --device, --group) would.
    #[arg(
        long,
        value_name = "TRUST.cbor",
        conflicts_with = "trust",
        requires_all = ["roots", "threshold"]
    )]
    pub trust_doc: Option<PathBuf>,
    /// The devices' roots (with --trust-doc).
    #[command(flatten)]
    pub roots: RootArgs,
    /// Verify as this device (with --trust-doc): its id is matched against the bundle's
    /// `targets`. Without it, `targets` is not checked.
    #[arg(long, requires = "trust_doc")]
    pub device: Option<String>,
    /// A group the device is in (repeatable; with --device).
    #[arg(long = "group", value_name = "GROUP", requires = "device")]
    pub groups: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Largest bundle accepted.
    #[arg(long, default_value_t = DEFAULT_MAX_BUNDLE_BYTES)]
    pub max_bundle_bytes: usize,
    /// The bundle file.
    pub bundle: PathBuf,
}

/// Runs a parsed command, writing its report to `out` and warnings to `warn` (stderr).
pub fn run(cli: Cli, out: &mut dyn Write, warn: &mut dyn Write) -> Result<(), CliError> {
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CliError::Output)
    };
    match cli.command {
        Command::Keygen { out: path } => keygen(&path, out),
        Command::Sign(args) => sign(&args, out, warn),
        Command::Inspect(args) => inspect(&args, out),
        Command::Trust(cmd) => trust::run(cmd, out, warn),
        Command::Deploy(args) => rt()?.block_on(fleet::deploy(&args, out)),
        Command::Remove(args) => rt()?.block_on(fleet::remove(&args, out)),
        Command::Status(args) => rt()?.block_on(fleet::status(&args, out)),
        Command::Events(args) => rt()?.block_on(fleet::events(&args, out)),
        Command::Logs(args) => rt()?.block_on(fleet::logs(&args, out)),
        Command::Telemetry(args) => rt()?.block_on(fleet::telemetry(&args, out)),
        Command::Restart(args) => rt()?.block_on(fleet::restart(&args, out)),
        Command::Gc(args) => rt()?.block_on(gc::gc(&args, out, warn)),
    }
}

fn keygen(path: &Path, out: &mut dyn Write) -> Result<(), CliError> {
    let key = generate_key()?;
    let public = key.verifying_key();
    let pub_path = public_key_path(path);
    // Refuse before writing anything, so a failure leaves no half-made pair behind.
    for p in [path, pub_path.as_path()] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(FileError {
                action: "refusing to overwrite",
                path: p.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
            }
            .into());
        }
    }
    files::write_atomic(path, keys::private_key_pem(&key).as_bytes(), 0o600, true)?;
    files::write_atomic(
        &pub_path,
        keys::public_key_pem(&public).as_bytes(),
        0o644,
        true,
    )?;
    writeln!(out, "{}", KeyId::of(&public))?;
    Ok(())
}

/// `KEY` -> `KEY.pub`.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

fn read_manifest(path: &Path) -> Result<Manifest, CliError> {
    let text = files::read_text(path, SMALL_FILE_MAX)?;
    Manifest::from_toml(&text).map_err(|reason| CliError::Manifest {
        path: path.to_path_buf(),
        reason,
    })
}

fn sign(args: &SignArgs, out: &mut dyn Write, warn: &mut dyn Write) -> Result<(), CliError> {
    let mut manifest = read_manifest(&args.manifest)?;
    // Devices raise their time floor to it (expiry without a real-time clock).
    manifest.issued_at.get_or_insert_with(unix_now);
    let key = read_private_key(&args.key)?;
    let wasm = match &args.wasm {
        Some(path) => Some(files::read_bounded(path, args.max_bundle_bytes as u64)?),
        None => None,
    };
    if args.chunk_avg_bytes != 0 {
        chunking::bounds(args.chunk_avg_bytes)
            .map_err(|e| CliError::Usage(format!("--chunk-avg-bytes: {e}; 0 lists no chunks")))?;
    }
    let lengths = match wasm.as_deref() {
        Some(w)
            if manifest.action == Action::Install
                && args.chunk_avg_bytes != 0
                && w.len() > args.chunk_avg_bytes =>
        {
            let lengths = chunking::cut(w, args.chunk_avg_bytes)
                .map_err(|e| CliError::Usage(format!("--chunk-avg-bytes: {e}")))?;
            if lengths.len() > CHUNKS_MAX {
                return Err(CliError::Usage(format!(
                    "--chunk-avg-bytes {}: the {} bytes of Wasm make {} chunks, above the \
                     {CHUNKS_MAX} a manifest may list; give a larger average",
                    args.chunk_avg_bytes,
                    w.len(),
                    lengths.len()
                )));
            }
            lengths
        }
        _ => Vec::new(),
    };
    let bundle = match wasm.as_deref() {
        Some(w) if !lengths.is_empty() => {
            bundle::sign_listing_chunks(manifest.clone(), w, &lengths, &key, args.max_bundle_bytes)?
        }
        _ => bundle::sign(
            manifest.clone(),
            wasm.as_deref(),
            &key,
            args.max_bundle_bytes,
        )?,
    };
    files::write_atomic(&args.out, &bundle, 0o644, false)?;
    let chunks = if lengths.is_empty() {
        String::new()
    } else {
        format!(", listing {} chunks", lengths.len())
    };
    writeln!(
        out,
        "signed {} {} {} seq {} with key {} -> {} ({} bytes{chunks})",
        manifest.action,
        manifest.name,
        manifest.version,
        manifest.seq,
        KeyId::of(&key.verifying_key()),
        args.out.display(),
        bundle.len()
    )?;
    if manifest.targets.is_none() {
        writeln!(
            warn,
            "edgectl: warning: {} has no [targets]: {} is valid on every device that trusts key {}, \
             whichever device's or group's topic it is published to",
            args.manifest.display(),
            args.out.display(),
            KeyId::of(&key.verifying_key())
        )?;
    }
    Ok(())
}

fn inspect(args: &InspectArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if args.trust_doc.is_none() && (!args.roots.roots.is_empty() || args.roots.threshold.is_some())
    {
        return Err(CliError::Usage(
            "--root and --threshold verify a trust document: give it with --trust-doc".into(),
        ));
    }
    let bytes = files::read_bounded(&args.bundle, args.max_bundle_bytes as u64)?;
    let invalid = |source| CliError::Invalid {
        path: args.bundle.clone(),
        source,
    };
    let mut document = None;
    let verifier = if let Some(doc) = &args.trust_doc {
        let Some(roots) = args.roots.read()? else {
            return Err(CliError::Usage(
                "--trust-doc needs the devices' roots: --root ROOT.pub (repeated) and --threshold"
                    .into(),
            ));
        };
        let device = match &args.device {
            Some(id) => {
                if let Some(bad) = std::iter::once(id)
                    .chain(&args.groups)
                    .find(|i| !is_valid_id(i))
                {
                    return Err(CliError::Usage(format!(
                        "{bad:?} is not a device id or group name ([A-Za-z0-9._:-]{{1,128}})"
                    )));
                }
                Some(DeviceIdentity {
                    id: id.clone(),
                    groups: args.groups.clone(),
                })
            }
            None => None,
        };
        let (_, accepted) = trust::verify_file(doc, &roots)?;
        document = Some((accepted.policy.version, device.clone()));
        let v = Verifier::with_trust(
            Trust::Document(Some(Arc::new(accepted.policy))),
            WasmLimits::default(),
        );
        Some(match device {
            Some(d) => v.for_device(d),
            None => v,
        })
    } else if !args.trust.is_empty() {
        Some(Verifier::new(
            read_trust_set(&args.trust)?,
            WasmLimits::default(),
        ))
    } else {
        None
    };
    let (manifest, kid, verified) = match verifier {
        None => {
            let u = verify::read_unverified(&bytes, args.max_bundle_bytes).map_err(invalid)?;
            (u.manifest, u.kid, false)
        }
        Some(verifier) => {
            let v = verifier
                .with_max_bundle_bytes(args.max_bundle_bytes)
                .verify(&bytes, unix_now(), |_| None)
                .map_err(invalid)?;
            let kid = v.key_id().to_string();
            (v.into_manifest(), kid, true)
        }
    };
    // Already decoded once above: the container is well formed.
    let format = match bundle::decode(&bytes, args.max_bundle_bytes) {
        Ok(raw) if raw.chunked => bundle::FORMAT_CHUNKED,
        _ => bundle::FORMAT_VERSION,
    };
    if args.json {
        let mut report = serde_json::json!({
            "file": args.bundle.display().to_string(),
            "bytes": bytes.len(),
            "format": format,
            "verified": verified,
            "key_id": kid,
            "manifest": manifest,
        });
        if let Some((version, device)) = &document {
            report["trust_document_version"] = (*version).into();
            report["device"] = device.as_ref().map_or(
                serde_json::Value::Null,
                |d| serde_json::json!({ "id": d.id, "groups": d.groups }),
            );
        }
        writeln!(out, "{report:#}")?;
        return Ok(());
    }
    let signature = match (&document, verified) {
        (Some((version, _)), _) => {
            format!("valid, by key {kid}, granted by trust document version {version}")
        }
        (None, true) => format!("valid, by trusted key {kid}"),
        (None, false) => format!("NOT CHECKED (no --trust given); claims key {kid}"),
    };
    print_manifest(out, &args.bundle, bytes.len(), &manifest, &signature)?;
    print_container(out, format, &manifest)?;
    if let Some((version, device)) = &document {
        let who = match device {
            Some(d) => format!(
                "device {} in groups [{}]: it would accept this bundle",
                d.id,
                d.groups.join(",")
            ),
            None => "a device in no group (no --device: targets not checked): it would accept \
                     this bundle"
                .to_string(),
        };
        writeln!(out, "trust      trust document version {version}; as {who}")?;
    }
    Ok(())
}

/// The container format and the chunk list.
fn print_container(out: &mut dyn Write, format: u64, m: &Manifest) -> std::io::Result<()> {
    let n = m.chunks.len();
    if format == bundle::FORMAT_CHUNKED {
        writeln!(
            out,
            "container  format 2: the signed part only; the Wasm travels in {n} chunks"
        )?;
    } else if m.wasm.is_some() {
        writeln!(
            out,
            "container  format 1: the Wasm inline{}",
            if n > 0 {
                " (edgectl deploy sends it in chunks when it does not fit one message)"
            } else {
                ""
            }
        )?;
    } else {
        writeln!(out, "container  format 1")?;
    }
    if n > 0 {
        let largest = m.chunks.iter().map(|c| c.size()).max().unwrap_or(0);
        let total: u64 = m.chunks.iter().map(|c| c.size()).sum();
        writeln!(
            out,
            "chunks     {n} (average {} bytes, largest {largest} bytes)",
            total / n as u64
        )?;
    } else {
        writeln!(out, "chunks     none listed")?;
    }
    Ok(())
}

fn print_manifest(
    out: &mut dyn Write,
    path: &Path,
    len: usize,
    m: &Manifest,
    signature: &str,
) -> std::io::Result<()> {
    writeln!(out, "bundle     {} ({len} bytes)", path.display())?;
    writeln!(out, "signature  {signature}")?;
    writeln!(out, "module     {} {}", m.name, m.version)?;
    writeln!(out, "action     {}", m.action)?;
    writeln!(out, "seq        {}", m.seq)?;
    if let Some(w) = &m.wasm {
        writeln!(out, "wasm       {} bytes, sha256 {}", w.size, w.sha256)?;
    }
    if m.action == Action::Install {
        let l = &m.limits;
        writeln!(
            out,
            "limits     fuel_per_call={} memory_max_bytes={} tick_interval_ms={}",
            l.fuel_per_call, l.memory_max_bytes, l.tick_interval_ms
        )?;
        let c = &m.caps;
        let mut caps = Vec::new();
        if !c.publish.is_empty() {
            caps.push(format!("publish={}", c.publish.join(",")));
        }
        if c.kv_quota_bytes > 0 {
            caps.push(format!("kv_quota_bytes={}", c.kv_quota_bytes));
        }
        if !c.gpio.is_empty() {
            let lines: Vec<String> = c.gpio.iter().map(u32::to_string).collect();
            caps.push(format!("gpio={}", lines.join(",")));
        }
        for g in &c.i2c {
            let addrs: Vec<String> = g.addresses.iter().map(|a| format!("{a:#04x}")).collect();
            caps.push(format!("i2c{}={}", g.bus, addrs.join(",")));
        }
        for s in &c.spi {
            caps.push(format!("spi{}.{}", s.bus, s.cs));
        }
        if caps.is_empty() {
            caps.push("(none)".into());
        }
        writeln!(out, "caps       {}", caps.join(" "))?;
    }
    match m.expires_at {
        Some(t) => writeln!(out, "expires    unix {t}")?,
        None => writeln!(out, "expires    never")?,
    }
    match &m.targets {
        Some(t) => writeln!(
            out,
            "targets    devices=[{}] groups=[{}]",
            t.devices.join(","),
            t.groups.join(",")
        )?,
        None => writeln!(out, "targets    any device that receives it")?,
    }
    Ok(())
}
