//! Host ABI v1 of edge-agent: the names, return codes and limits shared by the agent (host) and
//! modules (guests). `no_std`, no dependencies. docs/abi.md is the prose form of this file.
//!
//! Every pointer and length crossing the boundary is an `i32` (wasm32). Functions that can fail
//! return an `i32`: zero or a positive length on success, one of the negative [`err`] codes
//! otherwise.

#![no_std]

/// The ABI version this crate describes.
pub const VERSION: u32 = 1;

/// The module name every host import lives under.
pub const IMPORT_MODULE: &str = "edge";

/// Names of the guest's exports.
pub mod export {
    /// ABI version marker: a function `() -> ()` the host never calls; its name says the module
    /// speaks ABI v1. Required.
    pub const ABI_MARKER: &str = "edge_abi_v1";
    /// The guest's linear memory. Required, and the module's only memory (not imported).
    pub const MEMORY: &str = "memory";
    /// `(size: i32) -> i32`: allocates `size` bytes the host then fills and hands to the guest,
    /// which owns them afterwards; returns 0 when it cannot. Required when `on_message` is exported.
    pub const ALLOC: &str = "edge_alloc";
    /// `() -> i32`: called once after instantiation; 0 means ready. Optional.
    pub const INIT: &str = "init";
    /// `() -> i32`: called every `tick_interval_ms`; 0 means fine. Optional.
    pub const TICK: &str = "tick";
    /// `(topic_ptr, topic_len, payload_ptr, payload_len: i32) -> i32`: a message from the
    /// module's inbox; both buffers came from `edge_alloc` and belong to the guest. Optional.
    pub const ON_MESSAGE: &str = "on_message";
}

/// Names of the host's imports (all under [`IMPORT_MODULE`]).
pub mod import {
    /// `(level, ptr, len: i32) -> i32`. Always granted.
    pub const LOG: &str = "log";
    /// `() -> i64`: milliseconds since the Unix epoch. Always granted.
    pub const NOW_MS: &str = "now_ms";
    /// `(ptr, len: i32) -> i32`: fills the buffer with random bytes. Always granted.
    pub const RANDOM: &str = "random";
    /// `(us: i32) -> i32`: blocks the module at least `us` microseconds (at most
    /// [`crate::limits::DELAY_MAX_US`] per call and [`crate::limits::DELAY_PER_CALL_MAX_US`] per
    /// guest call), without burning fuel: what drivers wait while a device converts. Always
    /// granted.
    pub const DELAY_US: &str = "delay_us";
    /// `(topic_ptr, topic_len, payload_ptr, payload_len: i32) -> i32`. Needs `caps.publish`.
    pub const PUBLISH: &str = "publish";
    /// `(key_ptr, key_len, buf_ptr, buf_cap: i32) -> i32`: the value's length (copied only when
    /// it fits in `buf_cap`). Needs `caps.kv_quota_bytes > 0`.
    pub const KV_GET: &str = "kv_get";
    /// `(key_ptr, key_len, val_ptr, val_len: i32) -> i32`. Needs `caps.kv_quota_bytes > 0`.
    pub const KV_SET: &str = "kv_set";
    /// `(key_ptr, key_len: i32) -> i32`. Needs `caps.kv_quota_bytes > 0`.
    pub const KV_DELETE: &str = "kv_delete";
    /// `(line, value: i32) -> i32`: drives a GPIO output line low (0) or high (non-zero). Needs
    /// the line in `caps.gpio`.
    pub const GPIO_SET: &str = "gpio_set";
    /// `(line: i32) -> i32`: reads a GPIO line: 0 low, 1 high. Needs the line in `caps.gpio`.
    pub const GPIO_GET: &str = "gpio_get";
    /// `(bus, addr, ptr, len: i32) -> i32`: writes bytes to an I2C device. Needs the bus and
    /// address in `caps.i2c`.
    pub const I2C_WRITE: &str = "i2c_write";
    /// `(bus, addr, ptr, len: i32) -> i32`: reads bytes from an I2C device. Needs `caps.i2c`.
    pub const I2C_READ: &str = "i2c_read";
    /// `(bus, addr, write_ptr, write_len, read_ptr, read_len: i32) -> i32`: a write then a read
    /// with a repeated start (a register read). Needs `caps.i2c`.
    pub const I2C_WRITE_READ: &str = "i2c_write_read";
    /// `(bus, cs, write_ptr, read_ptr, len: i32) -> i32`: a full-duplex SPI transfer of `len`
    /// bytes (`read_ptr` may equal `write_ptr`). Needs the device in `caps.spi`.
    pub const SPI_TRANSFER: &str = "spi_transfer";
}

/// Return codes. Zero or positive is success; these are the failures.
pub mod err {
    /// Success.
    pub const OK: i32 = 0;
    /// A pointer or length lies outside the guest's memory.
    pub const BAD_POINTER: i32 = -1;
    /// The manifest does not grant this (a topic outside `caps.publish`, ...).
    pub const DENIED: i32 = -2;
    /// An argument is larger than the ABI allows (see [`crate::limits`]).
    pub const TOO_LARGE: i32 = -3;
    /// Too many calls in too short a time; try again later.
    pub const RATE_LIMITED: i32 = -4;
    /// The module's key-value quota would be exceeded.
    pub const QUOTA_EXCEEDED: i32 = -5;
    /// No such key.
    pub const NOT_FOUND: i32 = -6;
    /// A malformed argument: unknown log level, a topic that is not UTF-8 or not well formed.
    pub const BAD_ARGUMENT: i32 = -7;
    /// The module's outgoing queue is full for this call.
    pub const BUSY: i32 = -8;
    /// The host could not do it (storage or random source failure, or hardware this device
    /// does not have).
    pub const UNAVAILABLE: i32 = -9;
    /// The device did not answer or the bus failed (an I2C NACK, an IO error).
    pub const IO: i32 = -10;

    /// The name of a return code, for messages.
    pub const fn name(code: i32) -> &'static str {
        match code {
            OK => "ok",
            BAD_POINTER => "bad pointer",
            DENIED => "denied",
            TOO_LARGE => "too large",
            RATE_LIMITED => "rate limited",
            QUOTA_EXCEEDED => "quota exceeded",
            NOT_FOUND => "not found",
            BAD_ARGUMENT => "bad argument",
            BUSY => "busy",
            UNAVAILABLE => "unavailable",
            IO => "io error",
            _ => "unknown error",
        }
    }
}

/// Log levels for `log`.
pub mod level {
    /// Something failed.
    pub const ERROR: i32 = 1;
    /// Something is wrong but the module goes on.
    pub const WARN: i32 = 2;
    /// Normal operation.
    pub const INFO: i32 = 3;
    /// Detail for the module's author.
    pub const DEBUG: i32 = 4;
}

/// Size limits on what crosses the boundary, in bytes.
pub mod limits {
    /// Longest log line; longer lines are truncated (on a UTF-8 boundary) and the call still
    /// succeeds.
    pub const LOG_LINE_MAX: u32 = 1024;
    /// Longest topic (relative to the module's namespace).
    pub const TOPIC_MAX: u32 = 256;
    /// Largest payload of one `publish`, and of one message to `on_message`.
    pub const PAYLOAD_MAX: u32 = 64 * 1024;
    /// Longest key-value key.
    pub const KV_KEY_MAX: u32 = 128;
    /// Largest key-value value.
    pub const KV_VALUE_MAX: u32 = 16 * 1024;
    /// Most bytes one `random` call fills.
    pub const RANDOM_MAX: u32 = 1024;
    /// Most bytes one I2C write or read moves (each side of a write-read).
    pub const I2C_MAX: u32 = 4096;
    /// Most bytes one SPI transfer moves.
    pub const SPI_MAX: u32 = 4096;
    /// Longest single `delay_us`, microseconds.
    pub const DELAY_MAX_US: u32 = 100_000;
    /// Longest a guest call may spend in `delay_us` in all, microseconds.
    pub const DELAY_PER_CALL_MAX_US: u32 = 1_000_000;
}
