//! Hostile fixture: every `tick` passes out-of-bounds pointers and lengths to each import that
//! takes them, one bad pair at a time with the others valid, and checks the host refuses every
//! call with a negative code. Logs each call that was not refused, then a summary; fails (1)
//! unless all were refused.

#![no_std]
// Raw imports with wild arguments are the point of this fixture.
#![allow(unsafe_code)]

use core::arch::wasm32::memory_size;
use edge_sdk::{Error, Module, abi::level, error, info, kv, sys};

struct WildPointers;

impl Module for WildPointers {
    fn init() -> Result<Self, Error> {
        // A value to read, so `kv_get` has something to copy into a bad buffer.
        kv::set("k", b"v")?;
        Ok(WildPointers)
    }

    fn tick(&mut self) -> Result<(), Error> {
        let (topic, key, mut buf) = (b"wild/x", b"k", [0u8; 16]);
        let (t, k, b) = (
            topic.as_ptr() as i32,
            key.as_ptr() as i32,
            buf.as_mut_ptr() as i32,
        );
        let end = (memory_size(0) * 64 * 1024) as i32;
        let wild = [
            (0x7fff_fff0, 64),
            (end - 16, 64),
            (t, -1),
            (t, i32::MIN),
            (-1, 1),
        ];
        let (mut calls, mut accepted) = (0, 0);
        for (p, n) in wild {
            // SAFETY: every call has one pair outside the memory, which the host must refuse; the
            // valid pairs describe live locals (`buf` is the only one written to).
            let results = unsafe {
                [
                    ("log", sys::log(level::INFO, p, n)),
                    ("random", sys::random(p, n)),
                    ("publish topic", sys::publish(p, n, t, 1)),
                    ("publish payload", sys::publish(t, 6, p, n)),
                    ("kv_get key", sys::kv_get(p, n, b, 16)),
                    ("kv_get buffer", sys::kv_get(k, 1, p, n)),
                    ("kv_set key", sys::kv_set(p, n, t, 1)),
                    ("kv_set value", sys::kv_set(k, 1, p, n)),
                    ("kv_delete key", sys::kv_delete(p, n)),
                ]
            };
            for (call, code) in results {
                calls += 1;
                if code >= 0 {
                    accepted += 1;
                    error!(
                        "wild-pointers: {call} ptr={:#x} len={n} returned {code}",
                        p as u32
                    );
                }
            }
        }
        if accepted > 0 {
            error!("wild-pointers: {calls} calls, {accepted} not refused");
            return Err(Error::FAILED);
        }
        info!("wild-pointers: {calls} calls, all refused");
        Ok(())
    }
}

edge_sdk::module!(WildPointers);
