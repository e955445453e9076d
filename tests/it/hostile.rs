//! Hostile modules against the sandbox's bounds (issue 11): host calls priced by their work and
//! capped per call, a wall-clock deadline per guest call, structure refused at verification
//! before it costs memory, and what reaches a terminal or an operator's log. The small ones are
//! WAT files in `tests/it/hostile/`, the large ones bytes made by `bombs`.

use std::sync::Arc;

use edge_agent::core::rate::Rate;
use edge_agent::core::verify::VerifyError;
use edge_agent::runtime::fuel::price;
use edge_agent::runtime::host::{Clock, HostLimits};
use edge_agent::runtime::kv::MemoryKv;
use edge_agent::runtime::runner::{self, GuestPool, QueueError, RunnerConfig, RunnerEvent};
use edge_agent::runtime::{ModuleInstance, Outcome, Runtime, RuntimeConfig};

use crate::bombs;
use crate::support::{key, manifest, signed, verifier};

macro_rules! fixture {
    ($name:literal) => {
        wat::parse_str(include_str!(concat!("hostile/", $name, ".wat"))).unwrap()
    };
}

/// The default runtime, but deadlines of an hour: these calls must end by fuel or a cap.
fn no_deadline() -> RuntimeConfig {
    RuntimeConfig {
        init_deadline_ms: 3_600_000,
        call_deadline_ms: 3_600_000,
        ..RuntimeConfig::default()
    }
}

/// An instance of `wasm` under `config`, its manifest asking for `fuel` per call and granting
/// publish under `t/#` and a 1 MiB key-value store.
fn start(config: RuntimeConfig, wasm: &[u8], fuel: u64) -> ModuleInstance {
    let mut m = manifest("t", 1);
    m.limits.fuel_per_call = fuel;
    m.caps.publish = vec!["t/#".into()];
    m.caps.kv_quota_bytes = 1 << 20;
    let rt = Runtime::new(config);
    let prepared = rt.prepare(&m, wasm).unwrap();
    let kv = Box::new(MemoryKv::new(1 << 20));
    rt.instantiate(&prepared, Some(kv)).unwrap()
}

#[test]
fn a_million_tiny_delays_are_counted_in_real_time_and_end_the_call() {
    let mut i = start(no_deadline(), &fixture!("delay-loop"), 100_000_000);
    let r = i.tick();
    // The per-call cap of 1 s of sleep counts the time really slept, so after about a second
    // every delay is refused (BUSY) and the guest, ignoring that, is stopped.
    assert!(
        matches!(&r.outcome, Outcome::HostCallRefused { call, reason }
            if call == "delay_us" && reason.contains("delays in one guest call would exceed")),
        "{:?}",
        r.outcome
    );
}

#[test]
fn random_bytes_are_capped_per_guest_call() {
    let mut i = start(no_deadline(), &fixture!("random-loop"), 100_000_000);
    let r = i.tick();
    assert!(
        matches!(&r.outcome, Outcome::HostCallRefused { call, .. } if call == "random"),
        "{:?}",
        r.outcome
    );
    assert!(
        r.refusals[0]
            .reason
            .contains("random bytes in one guest call")
    );
}

#[test]
fn key_value_writes_are_capped_per_guest_call() {
    let mut i = start(no_deadline(), &fixture!("kv-set-loop"), 100_000_000);
    let r = i.tick();
    assert!(
        matches!(&r.outcome, Outcome::HostCallRefused { call, .. } if call == "kv_set"),
        "{:?}",
        r.outcome
    );
    // The writes admitted before the cap: at most 64 KiB, that is three 16 KiB values.
    assert!(r.fuel_used >= 3 * (price::KV_WRITE + 16_387 * price::KV_BYTE_WRITTEN));
}

#[test]
fn key_value_writes_are_rate_limited_across_calls() {
    let config = RuntimeConfig {
        host: HostLimits {
            kv_write_rate: Rate {
                per_sec: 1,
                burst: 3,
            },
            ..HostLimits::default()
        },
        ..no_deadline()
    };
    let wat = r#"(module
        (import "edge" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "edge_abi_v1"))
        (func (export "tick") (result i32)
          (call $set (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1))))"#;
    let mut i = start(config, &wat::parse_str(wat).unwrap(), 1_000_000);
    let outcomes: Vec<_> = (0..5).map(|_| i.tick().outcome).collect();
    assert_eq!(
        &outcomes[..3],
        &[Outcome::Finished, Outcome::Finished, Outcome::Finished]
    );
    assert_eq!(
        outcomes[3],
        Outcome::Failed {
            code: edge_abi::err::RATE_LIMITED
        }
    );
}

#[test]
fn host_calls_cost_the_fuel_of_their_work() {
    let mut i = start(no_deadline(), &fixture!("priced"), 100_000_000);
    let r = i.tick();
    assert_eq!(r.outcome, Outcome::Finished);
    // At least 100 units per call and one per 8 bytes published (the price list asks more).
    let floor = 10_000 * 100 + 4 * 60_000 / 8;
    assert!(r.fuel_used >= floor, "{} < {floor}", r.fuel_used);
}

#[test]
fn a_guest_that_only_computes_is_stopped_at_its_deadline() {
    let config = RuntimeConfig {
        max_fuel_per_call: u64::MAX,
        call_deadline_ms: 200,
        ..RuntimeConfig::default()
    };
    // Ten billion units of fuel: minutes of work, ended by the deadline between fuel slices.
    let mut i = start(config, &fixture!("spin"), 10_000_000_000);
    let r = i.tick();
    assert_eq!(r.outcome, Outcome::DeadlineExceeded { deadline_ms: 200 });
    assert!(r.fuel_used < 10_000_000_000);
}

#[test]
fn a_guest_looping_on_host_calls_is_stopped_at_its_deadline() {
    let config = RuntimeConfig {
        max_fuel_per_call: u64::MAX,
        call_deadline_ms: 200,
        ..RuntimeConfig::default()
    };
    let mut i = start(config, &fixture!("clock-spin"), 10_000_000_000);
    assert_eq!(
        i.tick().outcome,
        Outcome::DeadlineExceeded { deadline_ms: 200 }
    );
}

#[test]
fn a_sleep_that_would_cross_the_deadline_ends_the_call() {
    let config = RuntimeConfig {
        init_deadline_ms: 250,
        ..RuntimeConfig::default()
    };
    let mut i = start(config, &fixture!("sleepy-init"), 1_000_000);
    // Ten sleeps of 100 ms are within the 1 s delay cap; the third crosses the init deadline.
    assert_eq!(
        i.init().outcome,
        Outcome::DeadlineExceeded { deadline_ms: 250 }
    );
}

/// Verifies a signed bundle of `wasm` as a device does.
fn verify(wasm: &[u8]) -> Result<(), VerifyError> {
    let k = key(1);
    let bundle = signed(manifest("bomb", 1), wasm, &k);
    verifier(&[&k]).verify(&bundle, 0, |_| None).map(|_| ())
}

fn refused_naming(result: Result<(), VerifyError>, needle: &str) {
    match result {
        Err(VerifyError::Structure { reason, .. }) if reason.contains(needle) => {}
        other => panic!("expected a structure refusal naming {needle:?}, got {other:?}"),
    }
}

#[test]
fn structure_that_would_cost_host_memory_is_refused_at_verification() {
    refused_naming(verify(&bombs::functions(900_000)), "max_functions");
    refused_naming(verify(&bombs::elements(3_500_000)), "max_element_items");
    refused_naming(verify(&bombs::imports(280_000)), "max_imports");
    refused_naming(verify(&bombs::globals(700_000)), "max_globals");
}

#[test]
fn validation_work_is_bounded_at_verification() {
    refused_naming(verify(&bombs::results(1_000)), "max_results");
    refused_naming(
        verify(&bombs::br_tables(32, 20_000, 13)),
        "max_branch_values",
    );
}

#[test]
fn what_the_engine_cannot_compile_is_refused_at_verification() {
    refused_naming(verify(&bombs::locals(49_990)), "max_locals");
    assert!(matches!(
        verify(&bombs::deep_stack(70_000)),
        Err(VerifyError::InvalidWasm { .. })
    ));
}

#[test]
fn what_would_fail_at_instantiation_is_refused_at_verification() {
    refused_naming(verify(&fixture!("two-memories")), "memories");
    refused_naming(verify(&fixture!("data-out-of-bounds")), "outside");
    refused_naming(verify(&fixture!("elem-out-of-bounds")), "outside");
    refused_naming(verify(&fixture!("table-too-large")), "max_table_elements");
}

#[derive(Debug)]
struct FixedClock;

impl Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        1_000
    }
}

#[test]
fn refused_host_calls_are_summarised_once_per_call_and_rate_limited() {
    let rt = Runtime::new(RuntimeConfig::default()).with_clock(Arc::new(FixedClock));
    let mut m = manifest("t", 1);
    m.caps.publish = vec!["t/#".into()];
    let prepared = rt.prepare(&m, &fixture!("refuser")).unwrap();
    let mut i = rt.instantiate(&prepared, None).unwrap();
    let mut summaries = Vec::new();
    for _ in 0..10 {
        let r = i.tick();
        assert_eq!(r.outcome, Outcome::Finished);
        summaries.extend(r.refusal_summary);
    }
    // The clock stands still: the burst of five summaries, then none; each sums up 50 calls.
    assert_eq!(summaries.len(), 5, "{summaries:?}");
    assert!(
        summaries[0].text.starts_with("50 host calls refused"),
        "{:?}",
        summaries[0]
    );
    assert_eq!(i.stats().host.refusal_logs_dropped, 5);
}

#[tokio::test]
async fn inbox_messages_are_checked_on_arrival_and_bounded_in_bytes() {
    let rt = Runtime::new(RuntimeConfig::default());
    let mut m = manifest("slow", 1);
    m.caps = Default::default();
    let prepared = rt.prepare(&m, &fixture!("slow-inbox")).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let config = RunnerConfig {
        id: 1,
        policy: Default::default(),
        probation_ticks: None,
        durability: None,
    };
    let handle = runner::spawn(rt, GuestPool::new(1), prepared, None, config, tx);
    // A payload above the ABI's limit is refused at once, not when its call would run.
    let big = vec![0u8; edge_abi::limits::PAYLOAD_MAX as usize + 1];
    assert!(matches!(
        handle.deliver("x".into(), big),
        Err(QueueError::TooLarge { .. })
    ));
    // 60 KB messages to a module that takes 300 ms over each: the inbox holds 256 KiB.
    let results: Vec<_> = (0..8)
        .map(|_| handle.deliver("x".into(), vec![0u8; 60_000]))
        .collect();
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(QueueError::Full(_))))
        .count();
    assert!(full >= 3, "{results:?}");
    assert_eq!(handle.dropped(), 1 + full as u64);
    // The runner is alive and working through what it holds.
    let event = rx.recv().await.unwrap();
    assert!(matches!(
        event,
        RunnerEvent::State { .. } | RunnerEvent::Calling { .. }
    ));
    handle.stop().await;
}
