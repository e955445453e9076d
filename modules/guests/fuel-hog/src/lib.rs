//! Hostile fixture: `tick` never returns, so only the fuel budget stops it.

#![no_std]

use core::hint::black_box;
use edge_sdk::{Error, Module};

struct FuelHog;

impl Module for FuelHog {
    fn init() -> Result<Self, Error> {
        Ok(FuelHog)
    }

    fn tick(&mut self) -> Result<(), Error> {
        let mut spins = 0u64;
        loop {
            // `black_box` keeps the optimiser from seeing that the loop does nothing.
            spins = black_box(spins).wrapping_add(1);
        }
    }
}

edge_sdk::module!(FuelHog);
