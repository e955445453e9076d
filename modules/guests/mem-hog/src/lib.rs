//! Hostile fixture: every `tick` grows the memory one 64 KiB page at a time until `memory.grow`
//! fails (-1), then logs how far it got and returns 0. A host that ends the call at the cap
//! instead (edge-agent does: "memory growth refused") stops it before the log line.

#![no_std]

use core::arch::wasm32::{memory_grow, memory_size};
use edge_sdk::{Error, Module, info};

const PAGE: usize = 64 * 1024;

struct MemHog;

impl Module for MemHog {
    fn init() -> Result<Self, Error> {
        Ok(MemHog)
    }

    fn tick(&mut self) -> Result<(), Error> {
        let mut grown = 0;
        while memory_grow(0, 1) != usize::MAX {
            grown += 1;
        }
        info!(
            "mem-hog: grew {grown} pages, refused at {} bytes",
            memory_size(0) * PAGE
        );
        Ok(())
    }
}

edge_sdk::module!(MemHog);
