//! Benchmark: the cost of a host call. Exports `bench_now_ms(n) -> i64` and
//! `bench_publish(n) -> i32`; no tick.

#![no_std]
// `#[unsafe(no_mangle)]` on the benchmark's exports.
#![allow(unsafe_code)]

use edge_sdk::{Error, Module, now_ms, publish};

/// Calls `now_ms` `n` times and returns the (wrapping) sum of the readings.
#[unsafe(no_mangle)]
pub extern "C" fn bench_now_ms(n: i32) -> i64 {
    (0..n).fold(0i64, |sum, _| sum.wrapping_add(now_ms()))
}

/// Publishes `n` one-byte payloads to `bench/x` and returns how many the host accepted.
#[unsafe(no_mangle)]
pub extern "C" fn bench_publish(n: i32) -> i32 {
    (0..n)
        .map(|_| i32::from(publish("bench/x", b"x").is_ok()))
        .sum()
}

struct HostcallBench;

impl Module for HostcallBench {
    fn init() -> Result<Self, Error> {
        Ok(HostcallBench)
    }
}

edge_sdk::module!(HostcallBench);
