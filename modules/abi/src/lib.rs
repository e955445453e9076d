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
    /// `(topic_ptr, topic_len, payload_ptr, payload_len: i32) -> i32`. Needs `caps.publish`.
    pub const PUBLISH: &str = "publish";
    /// `(key_ptr, key_len, buf_ptr, buf_cap: i32) -> i32`: the value's length (copied only when
    /// it fits in `buf_cap`). Needs `caps.kv_quota_bytes > 0`.
    pub const KV_GET: &str = "kv_get";
    /// `(key_ptr, key_len, val_ptr, val_len: i32) -> i32`. Needs `caps.kv_quota_bytes > 0`.
    pub const KV_SET: &str = "kv_set";
    /// `(key_ptr, key_len: i32) -> i32`. Needs `caps.kv_quota_bytes > 0`.
    pub const KV_DELETE: &str = "kv_delete";
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
    /// The host could not do it (storage or random source failure).
    pub const UNAVAILABLE: i32 = -9;

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
}
