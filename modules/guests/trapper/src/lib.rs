//! Hostile fixture: `init` succeeds; `tick` logs a line, then traps with `unreachable`.

#![no_std]

use edge_sdk::{Error, Module, error};

struct Trapper;

impl Module for Trapper {
    fn init() -> Result<Self, Error> {
        Ok(Trapper)
    }

    fn tick(&mut self) -> Result<(), Error> {
        error!("trapper: about to trap");
        core::arch::wasm32::unreachable()
    }
}

edge_sdk::module!(Trapper);
