//! Runtime benchmarks (`just bench`): cold start against fork+exec, fuel-metering overhead,
//! host-call throughput, memory per idle module, and the compilation modes behind the engine's
//! choice. Every figure comes from this one run; ratios compare figures taken side by side.
//!
//! Needs the guest modules (`modules/build`, which `just bench` runs first).

#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edge_agent::core::manifest::Manifest;
use edge_agent::runtime::host::HostLimits;
use edge_agent::runtime::kv::MemoryKv;
use edge_agent::runtime::{ModuleInstance, Runtime, RuntimeConfig};
use wasmi::{CompilationMode, Config, Engine, Linker, Module, Store};

fn modules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/modules")
}

fn guest(name: &str) -> (Manifest, Vec<u8>) {
    let dir = modules_dir();
    let wasm = std::fs::read(dir.join(format!("{name}.wasm")))
        .unwrap_or_else(|e| panic!("{name}.wasm: {e} (run modules/build or `just bench`)"));
    let manifest =
        Manifest::from_toml(&std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap())
            .unwrap();
    (manifest, wasm)
}

/// Median and 99th percentile of `runs` timings of `f`.
fn measure(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    (t[runs / 2], t[(runs * 99 / 100).min(runs - 1)])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A module of about `target` bytes of code: many functions of straight-line arithmetic, the
/// first called from `tick`. Stands in for a large real module.
fn big_module(target: usize) -> Vec<u8> {
    let mut body = String::new();
    for i in 0..60 {
        body.push_str(&format!(
            "local.get 0 i32.const {i} i32.add i32.const 7 i32.mul local.set 0 "
        ));
    }
    let func = format!("(func (param i32) (result i32) {body} local.get 0)\n");
    let mut wat = String::from(
        "(module (memory (export \"memory\") 1) (func (export \"edge_abi_v1\"))\n\
         (func (export \"tick\") (result i32) i32.const 1 call 2 drop i32.const 0)\n",
    );
    let one = wat::parse_str(format!("(module {func})")).unwrap().len();
    for _ in 0..target / one {
        wat.push_str(&func);
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

fn cold_start(rt: &Runtime, m: &Manifest, wasm: &[u8]) {
    let prepared = rt.prepare(m, wasm).unwrap();
    let kv = (m.caps.kv_quota_bytes > 0)
        .then(|| Box::new(MemoryKv::new(m.caps.kv_quota_bytes)) as Box<_>);
    let mut i = rt.instantiate(&prepared, kv).unwrap();
    assert!(i.init().outcome.is_finished());
    assert!(i.tick().outcome.is_finished());
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Raw wasmi, fuel on or off: an instance of the SHA-256 guest (imports stubbed) and its
/// `bench_sha256` export.
fn sha256_instance(wasm: &[u8], fuel: bool) -> (Store<()>, wasmi::TypedFunc<i32, i32>) {
    let mut config = Config::default();
    config.consume_fuel(fuel);
    let engine = Engine::new(&config);
    let module = Module::new(&engine, wasm).unwrap();
    let mut store = Store::new(&engine, ());
    if fuel {
        store.set_fuel(u64::MAX).unwrap();
    }
    let mut linker = Linker::<()>::new(&engine);
    for imp in module.imports() {
        match imp.name() {
            "log" => linker
                .func_wrap("edge", "log", |_: i32, _: i32, _: i32| 0i32)
                .unwrap(),
            "now_ms" => linker.func_wrap("edge", "now_ms", || 0i64).unwrap(),
            other => panic!("sha256-bench imports {other}"),
        };
    }
    let instance = linker.instantiate_and_start(&mut store, &module).unwrap();
    let f = instance
        .get_typed_func::<i32, i32>(&store, "bench_sha256")
        .unwrap();
    f.call(&mut store, 1024).unwrap();
    (store, f)
}

/// Median seconds of SHA-256 over 1 MiB with metering off and on, runs interleaved so that drift
/// in the machine's speed hits both alike.
fn metering(wasm: &[u8], rounds: usize) -> (Duration, Duration) {
    let (mut off_store, off_f) = sha256_instance(wasm, false);
    let (mut on_store, on_f) = sha256_instance(wasm, true);
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        black_box(off_f.call(&mut off_store, 1 << 20).unwrap());
        off.push(t.elapsed());
        let t = Instant::now();
        black_box(on_f.call(&mut on_store, 1 << 20).unwrap());
        on.push(t.elapsed());
    }
    off.sort();
    on.sort();
    (off[rounds / 2], on[rounds / 2])
}

fn throughput(i: &mut ModuleInstance, export: &str, n: i32) -> f64 {
    let (report, _) = i.call_export(export, 10).unwrap();
    assert!(
        report.outcome.is_finished(),
        "{export}: {:?}",
        report.outcome
    );
    let (t, _) = measure(5, || {
        let (report, done) = i.call_export(export, n).unwrap();
        assert!(
            report.outcome.is_finished(),
            "{export}: {:?}",
            report.outcome
        );
        black_box(done);
    });
    f64::from(n) / t.as_secs_f64()
}

fn main() {
    // Under `cargo test --benches` (no `--bench` flag) do nothing: these are measurements.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = Runtime::new(RuntimeConfig::default());
    println!("edge-agent runtime benchmarks (one process, one run; medians unless noted)\n");
    let (hb, hb_wasm) = guest("heartbeat");
    // Memory first, while the heap is still small: later runs leave freed memory behind that
    // new instances would reuse unseen.
    let base = rss_bytes();
    let prepared = rt.prepare(&hb, &hb_wasm).unwrap();
    let mut live = Vec::new();
    let grow_to = |count: usize, live: &mut Vec<ModuleInstance>| {
        while live.len() < count {
            let mut i = rt.instantiate(&prepared, None).unwrap();
            assert!(i.init().outcome.is_finished());
            live.push(i);
        }
        rss_bytes()
    };
    let ten = grow_to(10, &mut live);
    let hundred = grow_to(100, &mut live);
    let mem_each = live[0].stats().memory_bytes;
    println!(
        "process RSS with idle instantiated heartbeat modules (linear memory {mem_each} bytes each)"
    );
    println!(
        "  0: {:>7.2} MiB   10: {:>7.2} MiB   100: {:>7.2} MiB",
        base as f64 / 1048576.0,
        ten as f64 / 1048576.0,
        hundred as f64 / 1048576.0
    );
    println!(
        "  per module: {:.1} KiB (0 to 100 modules), {:.1} KiB (10 to 100)",
        hundred.saturating_sub(base) as f64 / 100.0 / 1024.0,
        hundred.saturating_sub(ten) as f64 / 90.0 / 1024.0
    );
    drop(live);

    // Cold start.
    println!();
    let big = big_module(1 << 20);
    let mut big_manifest = hb.clone();
    big_manifest.name = "big".into();
    big_manifest.caps = Default::default();
    let runs = 200;
    let (small, small_p99) = measure(runs, || cold_start(&rt, &hb, &hb_wasm));
    let (large, large_p99) = measure(50, || cold_start(&rt, &big_manifest, &big));
    let (fork, fork_p99) = measure(runs, || {
        let status = std::process::Command::new("/bin/true").status().unwrap();
        assert!(status.success());
    });
    println!(
        "cold start: verified bytes -> first tick returned (prepare, instantiate, init, tick)"
    );
    println!(
        "  heartbeat ({} bytes)   p50 {:>9.1} us  p99 {:>9.1} us  = {:.3}x fork+exec+wait",
        hb_wasm.len(),
        us(small),
        us(small_p99),
        small.as_secs_f64() / fork.as_secs_f64()
    );
    println!(
        "  generated ({} bytes) p50 {:>9.1} us  p99 {:>9.1} us  = {:.3}x fork+exec+wait",
        big.len(),
        us(large),
        us(large_p99),
        large.as_secs_f64() / fork.as_secs_f64()
    );
    println!(
        "  fork+exec+wait /bin/true  p50 {:>9.1} us  p99 {:>9.1} us",
        us(fork),
        us(fork_p99)
    );

    // Compilation modes, for the engine's choice (docs/ARCHITECTURE.md).
    println!(
        "\ncompilation mode: Module::new of the {} byte module, then its first tick",
        big.len()
    );
    for mode in [
        CompilationMode::Eager,
        CompilationMode::LazyTranslation,
        CompilationMode::Lazy,
    ] {
        let mut config = Config::default();
        config.consume_fuel(true).compilation_mode(mode);
        let engine = Engine::new(&config);
        let (compile, _) = measure(20, || {
            black_box(Module::new(&engine, &big).unwrap());
        });
        let module = Module::new(&engine, &big).unwrap();
        let (first_tick, _) = measure(20, || {
            let mut store = Store::new(&engine, ());
            store.set_fuel(1_000_000).unwrap();
            let i = Linker::<()>::new(&engine)
                .instantiate_and_start(&mut store, &module)
                .unwrap();
            let tick = i.get_typed_func::<(), i32>(&store, "tick").unwrap();
            black_box(tick.call(&mut store, ()).unwrap());
        });
        println!(
            "  {mode:<16?} compile {:>9.1} us  instantiate+tick {:>7.1} us",
            us(compile),
            us(first_tick)
        );
    }

    // Fuel metering overhead.
    let (_, sha) = guest("sha256-bench");
    let (off, on) = metering(&sha, 21);
    println!("\nfuel metering: SHA-256 over 1 MiB in the guest");
    println!(
        "  off {:>8.2} ms  on {:>8.2} ms  = {:.3}x ({:+.1}%)",
        off.as_secs_f64() * 1e3,
        on.as_secs_f64() * 1e3,
        on.as_secs_f64() / off.as_secs_f64(),
        (on.as_secs_f64() / off.as_secs_f64() - 1.0) * 100.0
    );

    // Host-call throughput.
    let n = 100_000;
    let rt_fast = Runtime::new(RuntimeConfig {
        max_fuel_per_call: u64::MAX,
        host: HostLimits {
            publish_rate: edge_agent::core::rate::Rate {
                per_sec: u32::MAX,
                burst: u32::MAX,
            },
            max_messages_per_call: n as usize,
            max_message_bytes_per_call: usize::MAX,
            ..HostLimits::default()
        },
        ..RuntimeConfig::default()
    });
    let (mut hc_manifest, hc) = guest("hostcall-bench");
    hc_manifest.limits.fuel_per_call = u64::MAX;
    let prepared = rt_fast.prepare(&hc_manifest, &hc).unwrap();
    let mut inst = rt_fast.instantiate(&prepared, None).unwrap();
    inst.init();
    println!("\nhost calls per second (one guest call making {n} host calls)");
    println!(
        "  now_ms  {:>12.0}/s",
        throughput(&mut inst, "bench_now_ms", n)
    );
    println!(
        "  publish {:>12.0}/s  (tiny payloads, queued for MQTT)",
        throughput(&mut inst, "bench_publish", n)
    );
}
