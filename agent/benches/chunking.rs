//! Chunked delivery (`just bench`): for the 1 MiB test module and its one-function variant, at
//! average chunk sizes of 4, 16 and 64 KiB, what a device downloads on first install and on an
//! upgrade (chunks, the signed part, and the MQTT PUBLISH header of each message) against the
//! Wasm's size, and what cutting costs against hashing the same bytes (SHA-256: the floor, every
//! chunk is hashed anyway).

#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

#[path = "../../tests/it/support/big_module.rs"]
mod big_module;

use std::collections::HashSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edge_agent::core::bundle;
use edge_agent::core::chunking;
use edge_agent::core::manifest::{ChunkRef, Manifest, Sha256};
use edge_agent::core::topics::Topics;

const PREFIX: &str = "edge";

/// Bytes of an MQTT 3.1.1 QoS 1 PUBLISH besides its payload: fixed header (1 byte and the
/// remaining length's varint), topic (2-byte length and the topic), packet id (2).
fn publish_overhead(topic: &str, payload: usize) -> usize {
    let variable = 2 + topic.len() + 2;
    let remaining = variable + payload;
    let varint = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + varint + variable
}

fn chunk_overhead(c: &ChunkRef) -> usize {
    publish_overhead(
        &Topics::chunk(PREFIX, &c.sha256()),
        usize::try_from(c.size()).unwrap(),
    )
}

/// The format 2 signed part edgectl deploy publishes for `wasm` cut into `lengths`.
fn signed_part(wasm: &[u8], lengths: &[usize], key: &SigningKey) -> Vec<u8> {
    let m =
        Manifest::from_toml("name = \"big\"\nversion = \"1\"\nseq = 1\nissued_at = 1800000000\n")
            .unwrap();
    let format1 = bundle::sign_listing_chunks(m, wasm, lengths, key, usize::MAX).unwrap();
    let raw = bundle::decode(&format1, format1.len()).unwrap();
    bundle::encode_chunked(raw.sign1)
}

/// Median time of `runs` calls of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn main() {
    let v0 = big_module::big_module(1 << 20, 0);
    let v1 = big_module::big_module(1 << 20, 1);
    let key = SigningKey::from_bytes(&[1; 32]);
    let desired = format!("{PREFIX}/pi-1/desired/big");
    let size = v1.len() as f64;
    println!(
        "chunking: module v0 {} bytes, v1 {} bytes (one function changed)",
        v0.len(),
        v1.len()
    );
    println!(
        "{:>7} {:>7} {:>11} {:>9} {:>13} {:>14} {:>13} {:>13} {:>9}",
        "avg",
        "chunks",
        "signed part",
        "per chunk",
        "upgrade: new",
        "upgrade bytes",
        "upgrade/Wasm",
        "install/Wasm",
        "cut/sha"
    );
    let sha = median(21, || {
        black_box(Sha256::of(black_box(&v0)));
    });
    for avg in [4 << 10, 16 << 10, 64 << 10] {
        let l0 = chunking::cut(&v0, avg).unwrap();
        let l1 = chunking::cut(&v1, avg).unwrap();
        let r0 = chunking::refs(&v0, &l0).unwrap();
        let r1 = chunking::refs(&v1, &l1).unwrap();
        let part = signed_part(&v1, &l1, &key);
        let part_msg = part.len() + publish_overhead(&desired, part.len());
        let per_chunk = r1.iter().map(chunk_overhead).sum::<usize>() as f64 / r1.len() as f64;

        let held: HashSet<Sha256> = r0.iter().map(ChunkRef::sha256).collect();
        let mut seen = HashSet::new();
        let new: Vec<&ChunkRef> = r1
            .iter()
            .filter(|c| !held.contains(&c.sha256()) && seen.insert(c.sha256()))
            .collect();
        let upgrade: usize = new
            .iter()
            .map(|c| usize::try_from(c.size()).unwrap() + chunk_overhead(c))
            .sum::<usize>()
            + part_msg;
        let mut seen = HashSet::new();
        let install: usize = r1
            .iter()
            .filter(|c| seen.insert(c.sha256()))
            .map(|c| usize::try_from(c.size()).unwrap() + chunk_overhead(c))
            .sum::<usize>()
            + part_msg;

        let cut = median(21, || {
            black_box(chunking::cut(black_box(&v0), avg).unwrap());
        });
        println!(
            "{:>6}K {:>7} {:>9} B {:>7.1} B {:>6} chunks {:>12} B {:>12.4} {:>13.4} {:>8.2}x",
            avg >> 10,
            r1.len(),
            part.len(),
            per_chunk,
            new.len(),
            upgrade,
            upgrade as f64 / size,
            install as f64 / size,
            cut.as_secs_f64() / sha.as_secs_f64()
        );
    }
    println!(
        "SHA-256 of {} bytes: {:.2} ms (median of 21); cut/sha = FastCDC cutting time over that",
        v0.len(),
        sha.as_secs_f64() * 1e3
    );
}
