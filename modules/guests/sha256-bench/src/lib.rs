//! Benchmark: SHA-256 inside the guest. Exports `bench_sha256(len) -> i32`; every `tick` hashes
//! 1 MiB.

#![no_std]
// `#[unsafe(no_mangle)]` on the benchmark's export.
#![allow(unsafe_code)]

use edge_sdk::{Error, Module, debug};
use sha2::{Digest, Sha256};

/// Hashes `len` bytes of a repeating generated pattern and returns the digest's first 4 bytes,
/// big-endian; a negative `len` counts as 0.
#[unsafe(no_mangle)]
pub extern "C" fn bench_sha256(len: i32) -> i32 {
    let mut block = [0u8; 4096];
    for (i, byte) in block.iter_mut().enumerate() {
        *byte = (i ^ (i >> 8)) as u8;
    }
    let mut hasher = Sha256::new();
    let mut left = usize::try_from(len).unwrap_or(0);
    while left > 0 {
        let n = left.min(block.len());
        hasher.update(&block[..n]);
        left -= n;
    }
    let digest = hasher.finalize();
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

struct Sha256Bench;

impl Module for Sha256Bench {
    fn init() -> Result<Self, Error> {
        Ok(Sha256Bench)
    }

    fn tick(&mut self) -> Result<(), Error> {
        let head = bench_sha256(1 << 20);
        debug!(
            "sha256-bench: 1 MiB hashed, digest starts {:08x}",
            head as u32
        );
        Ok(())
    }
}

edge_sdk::module!(Sha256Bench);
