//! Example module: a counter kept under the key-value key `count` (8 bytes, little-endian), so it
//! survives restarts and upgrades; every tick increments it and publishes it to `kv-counter/count`
//! as decimal ASCII.

#![no_std]

extern crate alloc;

use alloc::string::ToString;
use edge_sdk::{Error, Module, info, kv, publish};

const KEY: &str = "count";

struct KvCounter {
    count: u64,
}

impl Module for KvCounter {
    fn init() -> Result<Self, Error> {
        let mut stored = [0; 8];
        let count = match kv::get_into(KEY, &mut stored)? {
            Some(8) => u64::from_le_bytes(stored),
            Some(_) => return Err(Error::BAD_ARGUMENT),
            None => 0,
        };
        info!("kv-counter: starting from {count}");
        Ok(KvCounter { count })
    }

    fn tick(&mut self) -> Result<(), Error> {
        let count = self.count + 1;
        kv::set(KEY, &count.to_le_bytes())?;
        self.count = count;
        publish("kv-counter/count", count.to_string().as_bytes())
    }
}

edge_sdk::module!(KvCounter);
