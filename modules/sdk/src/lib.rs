//! Guest SDK for edge-agent modules: safe wrappers over host ABI v1 ([`edge_abi`]) and the entry
//! points a module exports. `no_std` with `alloc`.
//!
//! A module is a type implementing [`Module`], exported with [`module!`] from the root of a
//! `#![no_std]` `cdylib` crate:
//!
//! ```no_run
//! extern crate alloc;
//!
//! use alloc::string::ToString;
//! use edge_sdk::{Error, Module, info, publish};
//!
//! struct Heartbeat {
//!     count: u64,
//! }
//!
//! impl Module for Heartbeat {
//!     fn init() -> Result<Self, Error> {
//!         info!("heartbeat: started");
//!         Ok(Heartbeat { count: 0 })
//!     }
//!
//!     fn tick(&mut self) -> Result<(), Error> {
//!         self.count += 1;
//!         publish("heartbeat/count", self.count.to_string().as_bytes())
//!     }
//! }
//!
//! edge_sdk::module!(Heartbeat);
//! # fn main() {}
//! ```
//!
//! Build it as a `cdylib` for `wasm32-unknown-unknown`. On other targets the crate compiles (so
//! code using it can be checked and unit-tested on the host) but every host call fails with
//! [`Error::UNAVAILABLE`] and [`module!`] exports nothing.
//!
//! - [`sys`]: the raw imports, for authors who need the exact ABI.
//! - [`kv`]: the module's key-value store.
//! - [`hal`]: GPIO lines, I2C buses, SPI devices and a delay as the embedded-hal 1.0 traits, so
//!   driver crates from crates.io run in a module unchanged.
//! - [`log()`] and the [`error!`], [`warn!`], [`info!`], [`debug!`] macros: the module's log.
//! - [`publish`], [`now_ms`], [`random`]: telemetry, the clock, random bytes.
//! - [`Module`] and [`module!`]: the module's life cycle and its exports.
//!
//! Cargo features, both on by default and only in effect on wasm32: `allocator` (a global
//! allocator, dlmalloc over `memory.grow`) and `panic-handler` (logs the panic message at error
//! level, then traps).

#![no_std]
#![warn(missing_docs)]
// The SDK is the FFI layer: it declares the host's imports and defines the exports, the global
// allocator and the panic handler, all of which need `unsafe`. Modules built on it need none.
#![allow(unsafe_code)]

extern crate alloc;

mod error;
pub mod hal;
pub mod kv;
mod log;
mod module;
pub mod sys;

#[cfg(target_arch = "wasm32")]
mod wasm;

pub use edge_abi as abi;
pub use error::Error;
pub use log::{Level, log};
pub use module::Module;

#[doc(hidden)]
pub mod __private {
    //! Used by the macros; not part of the API.
    pub use crate::log::log_fmt;
    #[cfg(target_arch = "wasm32")]
    pub use crate::wasm::{Instance, alloc};
}

/// Milliseconds since the Unix epoch, by the host's clock (0 on targets other than wasm32).
pub fn now_ms() -> i64 {
    // SAFETY: no arguments.
    unsafe { sys::now_ms() }
}

/// Publishes `payload` to `topic`, which is relative to the module's telemetry namespace and must
/// match one of the manifest's `caps.publish` filters.
///
/// Fails with [`Error::DENIED`] outside those filters, [`Error::TOO_LARGE`] above
/// [`abi::limits::TOPIC_MAX`] or [`abi::limits::PAYLOAD_MAX`], [`Error::RATE_LIMITED`] or
/// [`Error::BUSY`] when the host is pacing the module.
pub fn publish(topic: &str, payload: &[u8]) -> Result<(), Error> {
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

/// Fills `buf` with random bytes from the host, in calls of at most [`abi::limits::RANDOM_MAX`]
/// bytes each.
pub fn random(buf: &mut [u8]) -> Result<(), Error> {
    for chunk in buf.chunks_mut(abi::limits::RANDOM_MAX as usize) {
        // SAFETY: the pair describes a live, exclusively borrowed slice of initialised bytes;
        // the host writes only within it.
        let code = unsafe { sys::random(sys::addr(chunk.as_mut_ptr()), sys::len(chunk.len())) };
        Error::check(code)?;
    }
    Ok(())
}
