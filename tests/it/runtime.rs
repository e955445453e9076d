//! The sandbox with the real wasmi engine: every outcome, the hostile fixtures, install-time
//! refusals, and modules running side by side.

use std::sync::Arc;

use edge_agent::core::manifest::Manifest;
use edge_agent::runtime::host::HostLimits;
use edge_agent::runtime::kv::MemoryKv;
use edge_agent::runtime::{
    DeliverError, InstallError, ModuleInstance, Outcome, Runtime, RuntimeConfig,
};

use crate::support::guest;

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default())
}

/// A runtime whose publish rate does not get in the way of a test sending many messages.
fn unthrottled() -> Runtime {
    Runtime::new(RuntimeConfig {
        host: HostLimits {
            publish_rate: edge_agent::core::rate::Rate {
                per_sec: 100_000,
                burst: 100_000,
            },
            ..HostLimits::default()
        },
        ..RuntimeConfig::default()
    })
}

fn kv(m: &Manifest) -> Option<Box<dyn edge_agent::runtime::host::KvStoreDebug>> {
    (m.caps.kv_quota_bytes > 0).then(|| Box::new(MemoryKv::new(m.caps.kv_quota_bytes)) as Box<_>)
}

fn start(rt: &Runtime, name: &str) -> ModuleInstance {
    let (m, wasm) = guest(name);
    let prepared = rt.prepare(&m, &wasm).unwrap();
    rt.instantiate(&prepared, kv(&m)).unwrap()
}

/// A module in text form: `body` (imports first, as the text format wants), then a memory and the
/// ABI marker.
fn wat(body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             {body}
             (memory (export "memory") 1)
             (func (export "edge_abi_v1")))"#
    ))
    .unwrap()
}

fn manifest(toml_caps: &str) -> Manifest {
    Manifest::from_toml(&format!(
        "name = \"t\"\nversion = \"1\"\nseq = 1\n[limits]\nfuel_per_call = 1000000\nmemory_max_bytes = 1048576\ntick_interval_ms = 100\n[caps]\n{toml_caps}\n"
    ))
    .unwrap()
}

fn prepare_err(m: &Manifest, wasm: &[u8]) -> InstallError {
    runtime().prepare(m, wasm).unwrap_err()
}

#[test]
fn heartbeat_publishes_a_counter_each_tick() {
    let rt = runtime();
    let mut hb = start(&rt, "heartbeat");
    assert_eq!(hb.init().outcome, Outcome::Finished);
    for n in 1..=3 {
        let r = hb.tick();
        assert_eq!(r.outcome, Outcome::Finished);
        assert_eq!(r.messages.len(), 1, "{r:?}");
        assert_eq!(r.messages[0].topic, "heartbeat/count");
        assert_eq!(r.messages[0].payload, n.to_string().as_bytes());
        assert!(r.fuel_used > 0);
    }
    let s = hb.stats();
    assert_eq!(s.calls, 4);
    assert_eq!(s.host.published, 3);
    assert!(s.fuel_total >= s.fuel_last && s.memory_bytes > 0);
}

#[test]
fn kv_counter_survives_a_restart() {
    let rt = runtime();
    let (m, wasm) = guest("kv-counter");
    let prepared = rt.prepare(&m, &wasm).unwrap();
    let mut first = rt.instantiate(&prepared, kv(&m)).unwrap();
    assert!(first.init().outcome.is_finished());
    for _ in 0..3 {
        assert!(first.tick().outcome.is_finished());
    }
    let store = first.into_kv().unwrap();
    assert!(store.used_bytes() > 0);
    let mut second = rt.instantiate(&prepared, Some(store)).unwrap();
    assert!(second.init().outcome.is_finished());
    let r = second.tick();
    assert_eq!(r.messages[0].payload, b"4", "{r:?}");
}

#[test]
fn echo_publishes_what_it_receives() {
    let rt = unthrottled();
    let mut echo = start(&rt, "echo");
    assert!(echo.init().outcome.is_finished());
    let r = echo.deliver("greeting", b"hello").unwrap();
    assert_eq!(r.outcome, Outcome::Finished);
    assert_eq!(r.messages[0].topic, "echo/greeting");
    assert_eq!(r.messages[0].payload, b"hello");
    // Empty payloads and many messages in a row are fine; memory does not leak per message.
    let before = echo.stats().memory_bytes;
    for i in 0..200 {
        let r = echo.deliver(&format!("n/{i}"), &[7; 1000]).unwrap();
        assert!(r.outcome.is_finished(), "{r:?}");
    }
    assert!(echo.deliver("empty", b"").unwrap().outcome.is_finished());
    assert!(echo.stats().memory_bytes <= before + 4 * 65536);
}

#[test]
fn a_message_above_the_abi_limit_is_not_delivered() {
    let rt = runtime();
    let mut echo = start(&rt, "echo");
    echo.init();
    assert!(echo.deliver("t", &vec![0; 64 * 1024 + 1]).is_err());
    assert!(echo.deliver(&"t".repeat(257), b"x").is_err());
    let ticks_only = wat(r#"(func (export "tick") (result i32) i32.const 0)"#);
    let p = rt.prepare(&manifest(""), &ticks_only).unwrap();
    let mut i = rt.instantiate(&p, None).unwrap();
    assert!(matches!(
        i.deliver("t", b"x"),
        Err(DeliverError::NoHandler(_))
    ));
}

#[test]
fn fuel_hog_is_stopped_at_its_budget_and_its_thread_comes_back() {
    let rt = runtime();
    let mut hog = start(&rt, "fuel-hog");
    let budget = hog.limits().fuel_per_call;
    hog.init();
    let r = hog.tick();
    assert_eq!(r.outcome, Outcome::OutOfFuel { budget });
    // The call stops at the first instruction it cannot pay for: within a few units of the budget.
    assert!(
        r.fuel_used <= budget && r.fuel_used > budget - 100,
        "{}",
        r.fuel_used
    );
    drop(hog);
    // On a pool of one worker, the worker comes back from the hog for the next call.
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let pool = edge_agent::runtime::runner::GuestPool::new(1);
    tokio.block_on(async {
        let mut hog = start(&rt, "fuel-hog");
        hog.init();
        let (_, r) = pool.run(hog, |h| h.tick()).await;
        assert_eq!(r.outcome, Outcome::OutOfFuel { budget });
        let (_, r) = pool.run(start(&rt, "heartbeat"), |h| h.init()).await;
        assert!(r.outcome.is_finished());
    });
}

#[test]
fn mem_hog_is_refused_at_its_cap() {
    let rt = runtime();
    let mut hog = start(&rt, "mem-hog");
    let cap = hog.limits().memory_max_bytes;
    assert_eq!(cap, 2 << 20);
    hog.init();
    let r = hog.tick();
    match r.outcome {
        Outcome::MemoryRefused { desired, cap: c } => {
            assert_eq!(c, cap);
            assert!(desired > cap);
        }
        other => panic!("expected memory refused, got {other:?}"),
    }
    assert!(hog.stats().memory_bytes <= cap);
}

#[test]
fn the_agent_maximum_clamps_the_manifest_memory_cap() {
    let rt = Runtime::new(RuntimeConfig {
        max_memory_bytes: 1 << 20,
        ..RuntimeConfig::default()
    });
    let mut hog = start(&rt, "mem-hog");
    assert_eq!(hog.limits().memory_max_bytes, 1 << 20);
    hog.init();
    assert!(matches!(
        hog.tick().outcome,
        Outcome::MemoryRefused { cap: 1048576, .. }
    ));
}

#[test]
fn trapper_traps_with_the_trap_named() {
    let rt = runtime();
    let mut t = start(&rt, "trapper");
    assert!(t.init().outcome.is_finished());
    let r = t.tick();
    let Outcome::Trapped { trap } = &r.outcome else {
        panic!("expected a trap, got {:?}", r.outcome);
    };
    assert!(!trap.is_empty());
    assert!(
        !r.logs.is_empty(),
        "the line logged before the trap is kept"
    );
    let mut t = start(&rt, "init-trapper");
    assert!(matches!(t.init().outcome, Outcome::Trapped { .. }));
}

#[test]
fn sneaky_is_refused_at_install_with_the_import_named() {
    let (m, wasm) = guest("sneaky");
    match prepare_err(&m, &wasm) {
        InstallError::RefusedImport { import, reason, .. } => {
            assert_eq!(import, "edge.publish");
            assert!(reason.contains("caps.publish"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Granting the capability is what makes the difference.
    let mut granted = m.clone();
    granted.caps.publish = vec!["sneaky/#".into()];
    runtime().prepare(&granted, &wasm).unwrap();
}

#[test]
fn wild_pointers_get_error_codes_never_a_host_panic() {
    let rt = runtime();
    let mut w = start(&rt, "wild-pointers");
    assert!(w.init().outcome.is_finished());
    let r = w.tick();
    assert_eq!(r.outcome, Outcome::Finished, "{r:?}");
    assert!(r.messages.is_empty());
    assert!(
        r.logs.iter().any(|l| l.text.contains("all refused")),
        "{:?}",
        r.logs
    );
    assert!(!r.refusals.is_empty());
    assert!(w.stats().host.refused > 10);
}

#[test]
fn a_guest_spinning_on_refused_calls_is_stopped() {
    let rt = Runtime::new(RuntimeConfig {
        host: HostLimits {
            max_refusals_per_call: 3,
            ..HostLimits::default()
        },
        ..RuntimeConfig::default()
    });
    let mut w = start(&rt, "wild-pointers");
    w.init();
    assert!(matches!(w.tick().outcome, Outcome::HostCallRefused { .. }));
}

#[test]
fn a_non_zero_return_is_a_failure_with_its_code() {
    let wasm = wat(r#"(func (export "tick") (result i32) i32.const 7)"#);
    let rt = runtime();
    let p = rt.prepare(&manifest(""), &wasm).unwrap();
    let mut i = rt.instantiate(&p, None).unwrap();
    assert_eq!(i.tick().outcome, Outcome::Failed { code: 7 });
}

#[test]
fn an_allocator_that_fails_ends_the_delivery() {
    let wasm = wat(
        r#"(func (export "edge_alloc") (param i32) (result i32) i32.const 0)
           (func (export "on_message") (param i32 i32 i32 i32) (result i32) i32.const 0)"#,
    );
    let rt = runtime();
    let p = rt.prepare(&manifest(""), &wasm).unwrap();
    let mut i = rt.instantiate(&p, None).unwrap();
    let r = i.deliver("t", b"x").unwrap();
    assert!(
        matches!(&r.outcome, Outcome::HostCallRefused { call, .. } if call == "edge_alloc"),
        "{r:?}"
    );
    let wasm = wat(
        r#"(func (export "edge_alloc") (param i32) (result i32) i32.const 65535)
           (func (export "on_message") (param i32 i32 i32 i32) (result i32) i32.const 0)"#,
    );
    let p = rt.prepare(&manifest(""), &wasm).unwrap();
    let mut i = rt.instantiate(&p, None).unwrap();
    assert!(matches!(
        i.deliver("topic", b"x").unwrap().outcome,
        Outcome::HostCallRefused { .. }
    ));
}

#[test]
fn install_refusals_name_what_is_wrong() {
    let m = manifest("");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown import",
            wat(r#"(import "edge" "open_file" (func (param i32) (result i32)))"#),
            "edge.open_file",
        ),
        (
            "another import module",
            wat(r#"(import "env" "abort" (func))"#),
            "env.abort",
        ),
        (
            "wrong import type",
            wat(r#"(import "edge" "log" (func (param i32) (result i32)))"#),
            "edge.log",
        ),
        (
            "kv without a quota",
            wat(r#"(import "edge" "kv_get" (func (param i32 i32 i32 i32) (result i32)))"#),
            "kv_quota_bytes",
        ),
        (
            "tick of the wrong type",
            wat(r#"(func (export "tick") (param i32))"#),
            "tick",
        ),
        (
            "on_message without edge_alloc",
            wat(r#"(func (export "on_message") (param i32 i32 i32 i32) (result i32) i32.const 0)"#),
            "edge_alloc",
        ),
        (
            "no ABI marker",
            wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap(),
            "edge_abi_v1",
        ),
        (
            "no exported memory",
            wat::parse_str(r#"(module (func (export "edge_abi_v1")))"#).unwrap(),
            "memory",
        ),
        (
            "imported memory",
            wat::parse_str(
                r#"(module (import "edge" "memory" (memory 1)) (func (export "edge_abi_v1")))"#,
            )
            .unwrap(),
            "edge.memory",
        ),
        (
            "initial memory above the cap",
            wat::parse_str(
                r#"(module (memory (export "memory") 17) (func (export "edge_abi_v1")))"#,
            )
            .unwrap(),
            "memory refused",
        ),
    ];
    for (what, wasm, expect) in cases {
        let e = prepare_err(&m, &wasm).to_string();
        assert!(e.contains(expect), "{what}: {e}");
        assert!(e.contains("\"t\""), "{what}: the module is named: {e}");
    }
    // Basic imports need no grant.
    let ok = wat(
        r#"(import "edge" "log" (func (param i32 i32 i32) (result i32)))
           (import "edge" "now_ms" (func (result i64)))
           (import "edge" "random" (func (param i32 i32) (result i32)))"#,
    );
    runtime().prepare(&m, &ok).unwrap();
}

#[test]
fn limits_are_clamped_by_the_agent_configuration() {
    let rt = Runtime::new(RuntimeConfig {
        max_fuel_per_call: 1000,
        min_tick_interval_ms: 500,
        max_kv_quota_bytes: 10,
        ..RuntimeConfig::default()
    });
    let m = manifest("kv_quota_bytes = 4096");
    let p = rt.prepare(&m, &wat("")).unwrap();
    let l = p.limits();
    assert_eq!(
        (l.fuel_per_call, l.tick_interval_ms, l.kv_quota_bytes),
        (1000, 500, 10)
    );
}

#[test]
fn time_comes_from_the_injected_clock() {
    #[derive(Debug)]
    struct At(u64);
    impl edge_agent::runtime::host::Clock for At {
        fn now_ms(&self) -> u64 {
            self.0
        }
    }
    let wasm = wat(r#"(import "edge" "now_ms" (func $now (result i64)))
           (global $t (export "t") (mut i64) (i64.const 0))
           (func (export "tick") (result i32) call $now i64.const 1234567 i64.ne)"#);
    let rt = runtime().with_clock(Arc::new(At(1_234_567)));
    let p = rt.prepare(&manifest(""), &wasm).unwrap();
    assert!(
        rt.instantiate(&p, None)
            .unwrap()
            .tick()
            .outcome
            .is_finished()
    );
}
