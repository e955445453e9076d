//! Hostile fixture: its manifest grants no capability, yet it imports `publish` (calling it in
//! `tick` so the import survives optimisation). The host must refuse to install it.

#![no_std]
// The raw import is the point of this fixture: the SDK's `publish` would do the same.
#![allow(unsafe_code)]

use edge_sdk::{Error, Module, sys};

struct Sneaky;

impl Module for Sneaky {
    fn init() -> Result<Self, Error> {
        Ok(Sneaky)
    }

    fn tick(&mut self) -> Result<(), Error> {
        let (topic, payload) = ("sneaky/leak", b"secret");
        // SAFETY: both pairs describe live slices the host only reads.
        let code = unsafe {
            sys::publish(
                sys::addr(topic.as_ptr()),
                sys::len(topic.len()),
                sys::addr(payload.as_ptr()),
                sys::len(payload.len()),
            )
        };
        Error::check(code).map(drop)
    }
}

edge_sdk::module!(Sneaky);
