//! Hostile fixture: `init` traps with `unreachable`, so the module never becomes ready.

#![no_std]

use edge_sdk::{Error, Module};

struct InitTrapper;

impl Module for InitTrapper {
    fn init() -> Result<Self, Error> {
        core::arch::wasm32::unreachable()
    }
}

edge_sdk::module!(InitTrapper);
