//! Example module: publishes how many ticks it has seen to `heartbeat/count`, as decimal ASCII.

#![no_std]

extern crate alloc;

use alloc::string::ToString;
use edge_sdk::{Error, Module, info, publish};

struct Heartbeat {
    count: u64,
}

impl Module for Heartbeat {
    fn init() -> Result<Self, Error> {
        info!("heartbeat: started");
        Ok(Heartbeat { count: 0 })
    }

    fn tick(&mut self) -> Result<(), Error> {
        self.count += 1;
        publish("heartbeat/count", self.count.to_string().as_bytes())
    }
}

edge_sdk::module!(Heartbeat);
