//! Chunked delivery by hand, for the daemon tests: a Wasm cut with FastCDC, its signed part
//! (format 2) and its chunks, published on the broker as `edgectl deploy` does, or only some of
//! them, or damaged.

use super::*;
use ed25519_dalek::SigningKey;
use edge_agent::core::bundle;
use edge_agent::core::manifest::{Manifest, Sha256};

/// Lengths cutting `wasm` into content-defined chunks of about `avg` bytes.
pub fn cut(wasm: &[u8], avg: u32) -> Vec<usize> {
    fastcdc::v2020::FastCDC::new(wasm, avg / 4, avg, avg * 4)
        .map(|c| c.length)
        .collect()
}

/// A chunked install: the signed part and the chunks in order.
pub struct Chunked {
    /// The format 2 container.
    pub signed: Vec<u8>,
    /// The chunks in order: digest and bytes.
    pub chunks: Vec<(Sha256, Vec<u8>)>,
}

impl Chunked {
    /// Signs `manifest` for `wasm` cut at about `avg` bytes a chunk.
    pub fn new(manifest: Manifest, wasm: &[u8], avg: u32, key: &SigningKey) -> Chunked {
        let lengths = cut(wasm, avg);
        let (signed, refs) = bundle::sign_chunked(manifest, wasm, &lengths, key).unwrap();
        let mut at = 0;
        let chunks = refs
            .iter()
            .map(|r| {
                let bytes = wasm[at..at + usize::try_from(r.size()).unwrap()].to_vec();
                at += bytes.len();
                (r.sha256(), bytes)
            })
            .collect();
        Chunked { signed, chunks }
    }

    /// A ticking install of the module `name` at `seq`, carrying `wasm`, in chunks of ~16 KiB.
    pub fn module(name: &str, seq: u64, wasm: &[u8], key: &SigningKey) -> Chunked {
        let mut m = manifest(name, seq);
        m.limits.tick_interval_ms = operator::TICK_MS;
        Chunked::new(m, wasm, 16 << 10, key)
    }

    /// The topic a chunk is retained on.
    pub fn topic(sha: &Sha256) -> String {
        format!("edge/chunk/{}", sha.to_hex())
    }

    /// Publishes (retained) the chunks whose index `which` accepts.
    pub fn publish_chunks(&self, obs: &Observer, which: impl Fn(usize) -> bool) {
        for (i, (sha, bytes)) in self.chunks.iter().enumerate() {
            if which(i) {
                obs.publish(&Chunked::topic(sha), bytes, true);
            }
        }
    }

    /// The bytes of the chunks whose index `which` accepts.
    pub fn bytes(&self, which: impl Fn(usize) -> bool) -> u64 {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| which(*i))
            .map(|(_, (_, b))| b.len() as u64)
            .sum()
    }

    /// Publishes every chunk, then the signed part on the device's desired topic: a deploy.
    pub fn deploy(&self, obs: &Observer, device: &str, module: &str) {
        self.publish_chunks(obs, |_| true);
        obs.deploy(device, module, &self.signed);
    }

    /// The indexes of the chunks whose digest first appears there: a chunk repeated within the
    /// Wasm travels (and is counted) once.
    pub fn first_of_each(&self) -> Vec<usize> {
        let mut seen = std::collections::BTreeSet::new();
        (0..self.chunks.len())
            .filter(|&i| seen.insert(self.chunks[i].0))
            .collect()
    }

    /// Publishes (retained) each distinct chunk among those `which` accepts once; returns the
    /// bytes published.
    pub fn publish_distinct(&self, obs: &Observer, which: impl Fn(usize) -> bool) -> u64 {
        let mut bytes = 0;
        for i in self.first_of_each() {
            if which(i) {
                let (sha, b) = &self.chunks[i];
                obs.publish(&Chunked::topic(sha), b, true);
                bytes += b.len() as u64;
            }
        }
        bytes
    }

    /// The bytes of the distinct chunks among those `which` accepts.
    pub fn distinct_bytes(&self, which: impl Fn(usize) -> bool) -> u64 {
        self.first_of_each()
            .into_iter()
            .filter(|&i| which(i))
            .map(|i| self.chunks[i].1.len() as u64)
            .sum()
    }

    /// How many chunks (by index, repeats included) have a digest among the distinct chunks
    /// `which` accepts: what `fetch.chunks_have` shows once those are in.
    pub fn chunks_covered(&self, which: impl Fn(usize) -> bool) -> u64 {
        let shas: std::collections::BTreeSet<Sha256> = self
            .first_of_each()
            .into_iter()
            .filter(|&i| which(i))
            .map(|i| self.chunks[i].0)
            .collect();
        self.chunks.iter().filter(|(s, _)| shas.contains(s)).count() as u64
    }
}
