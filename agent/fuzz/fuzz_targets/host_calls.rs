//! Drive the host functions of ABI v1 with arbitrary pointers, lengths and memory contents: every
//! call must return a code (or end the guest call after too many refusals), never panic, never
//! touch memory outside the guest's, never queue more than the per-call bounds.

#![no_main]

use std::sync::Arc;

use edge_agent::runtime::host::{Clock, HostCall, HostLimits, HostState};
use edge_agent::runtime::kv::MemoryKv;
use edge_agent::runtime::limiter::GuestLimiter;
use libfuzzer_sys::fuzz_target;

#[derive(Debug)]
struct Ticking(std::sync::atomic::AtomicU64);

impl Clock for Ticking {
    fn now_ms(&self) -> u64 {
        self.0.fetch_add(7, std::sync::atomic::Ordering::Relaxed)
    }
}

fn word(b: &[u8], i: usize) -> i32 {
    let mut w = [0u8; 4];
    for (k, slot) in w.iter_mut().enumerate() {
        *slot = b.get(i + k).copied().unwrap_or(0);
    }
    // Bias towards interesting values: small offsets, the memory's end, negatives.
    match w[0] % 8 {
        0 => i32::from(w[1]) * 16,
        1 => -1 - i32::from(w[1]),
        2 => i32::MAX - i32::from(w[1]),
        _ => i32::from_le_bytes(w),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mem_len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let (init, script) = data[2..].split_at(data.len().saturating_sub(2).min(mem_len.min(256)));
    let mut mem = vec![0u8; mem_len];
    mem[..init.len()].copy_from_slice(init);
    let limits = HostLimits {
        max_refusals_per_call: 1_000,
        ..HostLimits::default()
    };
    let mut state = HostState::new(
        vec!["a/#".into(), "+/b".into()],
        Some(Box::new(MemoryKv::new(4096))),
        Arc::new(Ticking(Default::default())),
        limits,
        GuestLimiter::new(1 << 20, 16),
    );
    for chunk in script.chunks(17) {
        let w = |i: usize| word(chunk, 1 + 4 * i);
        let call = match chunk[0] % 7 {
            0 => HostCall::Log(w(0) & 7, w(1), w(2)),
            1 => HostCall::NowMs,
            2 => HostCall::Random(w(0), w(1)),
            3 => HostCall::Publish(w(0), w(1), w(2), w(3)),
            4 => HostCall::KvGet(w(0), w(1), w(2), w(3)),
            5 => HostCall::KvSet(w(0), w(1), w(2), w(3)),
            _ => HostCall::KvDelete(w(0), w(1)),
        };
        match state.call(&mut mem, call) {
            Ok(_) => {}
            Err(_) => break,
        }
        assert_eq!(mem.len(), mem_len);
        assert!(state.kv_used_bytes() <= 4096);
    }
});
