//! Drive the host functions of ABI v1 with arbitrary pointers, lengths and memory contents, the
//! hardware ones against the simulated board: every call must return a code (or end the guest
//! call after too many refusals), never panic, never touch memory outside the guest's.

#![no_main]

use std::sync::{Arc, OnceLock};

use edge_agent::core::manifest::Manifest;
use edge_agent::hal::{Board, HardwareConfig};
use edge_agent::runtime::host::{Clock, Hardware, HostCall, HostLimits, HostState};
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

/// The simulated board, and grants of one LED line, the button, the BME280 and the SPI loopback
/// (other lines, addresses and devices are not granted).
fn hardware() -> Hardware {
    static BOARD: OnceLock<Arc<Board>> = OnceLock::new();
    let board = BOARD.get_or_init(|| Arc::new(Board::open(&HardwareConfig::simulated(), Arc::new(|| 1_000))));
    let manifest = Manifest::from_toml(
        "name = 'f'\nversion = '1'\nseq = 1\n[caps]\ngpio = [17, 27]\ni2c = [{ bus = 1, addresses = [0x76] }]\nspi = [{ bus = 0, cs = 0 }]\n",
    )
    .expect("a valid manifest");
    Hardware::new(Arc::clone(board), &manifest.caps)
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
    )
    .with_hardware(hardware());
    state.start_call(1 << 40, std::time::Duration::from_secs(3600));
    for chunk in script.chunks(25) {
        let w = |i: usize| word(chunk, 1 + 4 * i);
        let call = match chunk[0] % 13 {
            0 => HostCall::Log(w(0) & 7, w(1), w(2)),
            1 => HostCall::NowMs,
            2 => HostCall::Random(w(0), w(1)),
            3 => HostCall::Publish(w(0), w(1), w(2), w(3)),
            4 => HostCall::KvGet(w(0), w(1), w(2), w(3)),
            5 => HostCall::KvSet(w(0), w(1), w(2), w(3)),
            6 => HostCall::KvDelete(w(0), w(1)),
            7 => HostCall::GpioSet(w(0) & 31, w(1)),
            8 => HostCall::GpioGet(w(0) & 31),
            9 => HostCall::I2cWrite(w(0) & 3, 0x70 + (w(1) & 15), w(2), w(3)),
            10 => HostCall::I2cRead(w(0) & 3, 0x70 + (w(1) & 15), w(2), w(3)),
            11 => HostCall::I2cWriteRead(w(0) & 3, 0x76, w(1), w(2), w(3), w(4)),
            _ => HostCall::SpiTransfer(w(0) & 1, w(1) & 1, w(2), w(3), w(4)),
        };
        match state.call(&mut mem, call) {
            Ok(_) => {}
            Err(_) => break,
        }
        assert_eq!(mem.len(), mem_len);
        assert!(state.kv_used_bytes() <= 4096);
    }
});
