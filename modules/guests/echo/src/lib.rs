//! Example module: publishes every message it receives, unchanged, to `echo/<topic>`.

#![no_std]

extern crate alloc;

use alloc::format;
use edge_sdk::{Error, Module, publish};

struct Echo;

impl Module for Echo {
    fn init() -> Result<Self, Error> {
        Ok(Echo)
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error> {
        publish(&format!("echo/{topic}"), payload)
    }
}

edge_sdk::module!(Echo);
