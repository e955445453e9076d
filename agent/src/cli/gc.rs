//! `edgectl gc`: clears the retained chunks that no retained desired bundle references.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;

use clap::Args;

use super::common::CliError;
use super::fleet::{BrokerArgs, connect};
use crate::core::bundle::DEFAULT_MAX_BUNDLE_BYTES;
use crate::core::manifest::Sha256;
use crate::core::topics::CHUNK_LEVEL;
use crate::core::verify;

/// `edgectl gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Only print what would be removed.
    #[arg(long)]
    dry_run: bool,
}

/// One retained chunk as the broker holds it (never its bytes).
#[derive(Debug, Clone, Copy)]
struct Held {
    len: usize,
    /// Whether the payload is the chunk its topic names.
    intact: bool,
}

/// Lists the retained desired bundles (device and group) and the retained chunks, then clears
/// (an empty retained message) every chunk that no bundle lists and every chunk whose bytes do
/// not match its digest (`edgectl deploy` sends those again).
pub async fn gc(args: &GcArgs, out: &mut dyn Write, warn: &mut dyn Write) -> Result<(), CliError> {
    let p = &args.broker.prefix;
    let chunk_prefix = format!("{p}/{CHUNK_LEVEL}/");
    let filters = vec![
        format!("{p}/+/desired/+"),
        format!("{p}/group/+/desired/+"),
        format!("{chunk_prefix}+"),
    ];
    let mut referenced: HashSet<Sha256> = HashSet::new();
    let mut bundles = 0usize;
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    let mut notes: Vec<String> = Vec::new();
    let mut session = connect(&args.broker).await?;
    session
        .retained(p, filters, |topic, payload| {
            if let Some(hex) = topic.strip_prefix(&chunk_prefix) {
                let mut digest = [0u8; 32];
                let named = hex.len() == 64
                    && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                    && hex::decode_to_slice(hex, &mut digest).is_ok();
                if named {
                    held.insert(
                        hex.to_string(),
                        Held {
                            len: payload.len(),
                            intact: Sha256::of(payload) == Sha256(digest),
                        },
                    );
                } else {
                    notes.push(format!("{topic}: not a chunk topic, left alone"));
                }
                return;
            }
            match verify::read_unverified(payload, DEFAULT_MAX_BUNDLE_BYTES * 4) {
                Ok(u) if !u.manifest.chunks.is_empty() => {
                    bundles += 1;
                    referenced.extend(u.manifest.chunks.iter().map(|c| c.sha256()));
                }
                Ok(_) => {}
                Err(e) => notes.push(format!(
                    "{topic}: not a bundle ({e}); it references no chunks"
                )),
            }
        })
        .await?;
    session.close().await;
    for note in &notes {
        writeln!(warn, "edgectl: {note}")?;
    }
    let mut remove: Vec<(String, Held, &str)> = Vec::new();
    let (mut kept, mut kept_bytes) = (0usize, 0usize);
    for (hex, h) in &held {
        let mut digest = [0u8; 32];
        let _ = hex::decode_to_slice(hex, &mut digest);
        if !h.intact {
            remove.push((hex.clone(), *h, "corrupt"));
        } else if !referenced.contains(&Sha256(digest)) {
            remove.push((hex.clone(), *h, "unreferenced"));
        } else {
            kept += 1;
            kept_bytes += h.len;
        }
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for (hex, h, why) in &remove {
        let note = if *why == "corrupt" {
            " (its bytes do not match its digest; `edgectl deploy` sends it again)"
        } else {
            ""
        };
        writeln!(out, "{verb} chunk {hex} {} bytes {why}{note}", h.len)?;
    }
    if !args.dry_run && !remove.is_empty() {
        let mut session = connect(&args.broker).await?;
        session
            .publish_all(
                remove
                    .iter()
                    .map(|(hex, _, _)| (format!("{chunk_prefix}{hex}"), Vec::new())),
                true,
            )
            .await?;
        session.close().await;
    }
    let removed_bytes: usize = remove.iter().map(|(_, h, _)| h.len).sum();
    writeln!(
        out,
        "{verb} {} chunks ({removed_bytes} bytes), kept {kept} chunks ({kept_bytes} bytes) \
         referenced by {bundles} bundles",
        remove.len()
    )?;
    Ok(())
}
