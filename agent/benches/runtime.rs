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
use edge_agent::runtime::{ModuleInstance, PreparedModule, Runtime, RuntimeConfig};
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

fn kv_for(m: &Manifest) -> Option<Box<dyn edge_agent::runtime::host::KvStoreDebug>> {
    (m.caps.kv_quota_bytes > 0).then(|| Box::new(MemoryKv::new(m.caps.kv_quota_bytes)) as Box<_>)
}

/// A fresh instance of a prepared module, its `init` and its first `tick`.
fn first_tick(rt: &Runtime, prepared: &PreparedModule, m: &Manifest) {
    let mut i = rt.instantiate(prepared, kv_for(m)).unwrap();
    assert!(i.init().outcome.is_finished());
    assert!(i.tick().outcome.is_finished());
}

/// The floor of a cold start: raw wasmi with fuel, lazy compilation (no validation up front),
/// every import a stub returning zeros, instantiate, `init` if exported, one `tick`.
fn raw_lazy_first_tick(wasm: &[u8]) {
    let mut config = Config::default();
    config
        .consume_fuel(true)
        .compilation_mode(CompilationMode::Lazy);
    let engine = Engine::new(&config);
    let module = Module::new(&engine, wasm).unwrap();
    let mut linker = Linker::<()>::new(&engine);
    for import in module.imports() {
        if let wasmi::ExternType::Func(ty) = import.ty() {
            linker
                .func_new(
                    import.module(),
                    import.name(),
                    ty.clone(),
                    |_, _, results| {
                        for r in results.iter_mut() {
                            *r = wasmi::Val::default_for_ty(r.ty());
                        }
                        Ok(())
                    },
                )
                .unwrap();
        }
    }
    let mut store = Store::new(&engine, ());
    store.set_fuel(10_000_000).unwrap();
    let instance = linker.instantiate_and_start(&mut store, &module).unwrap();
    for export in ["init", "tick"] {
        if let Ok(f) = instance.get_typed_func::<(), i32>(&store, export) {
            black_box(f.call(&mut store, ()).unwrap());
        }
    }
}

/// Median and 99th percentile of `runs` timings of `f`, each on a fresh value from `setup`
/// (not timed).
fn measure_after<T>(
    runs: usize,
    mut setup: impl FnMut() -> T,
    mut f: impl FnMut(&mut T),
) -> (Duration, Duration) {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let mut v = setup();
            let start = Instant::now();
            f(&mut v);
            let took = start.elapsed();
            drop(v);
            took
        })
        .collect();
    t.sort();
    (t[runs / 2], t[(runs * 99 / 100).min(runs - 1)])
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
    // new instances would reuse unseen. As the daemon runs them: each module prepared on its own
    // (an engine, the parsed module, its linker), instantiated, `init` called, one tick run.
    let n = 100;
    let limits = rt.config().wasm_limits();
    // Before the check, whose freed memory the first modules would otherwise reuse unseen.
    let base = rss_bytes();
    let checked = edge_agent::engine::check(&hb_wasm, &limits).unwrap();
    let prepared: Vec<PreparedModule> = (0..n)
        .map(|_| rt.prepare_checked(&hb, checked).unwrap())
        .collect();
    let after_prepare = rss_bytes();
    let mut live: Vec<ModuleInstance> = prepared
        .iter()
        .map(|p| {
            let mut i = rt.instantiate(p, None).unwrap();
            assert!(i.init().outcome.is_finished());
            i
        })
        .collect();
    let after_init = rss_bytes();
    for i in &mut live {
        assert!(i.tick().outcome.is_finished());
    }
    let after_tick = rss_bytes();
    let linear = live[0].stats().memory_bytes;
    let kib = |bytes: u64| bytes as f64 / 1024.0 / n as f64;
    let each = kib(after_tick.saturating_sub(base));
    let beyond = each - linear as f64 / 1024.0;
    println!(
        "memory per idle heartbeat module ({n} modules, each its own engine, linear memory {} KiB):",
        linear / 1024
    );
    println!(
        "  prepared (engine, module, linker) {:.1} KiB; instantiated + init {:.1} KiB; first tick {:.1} KiB",
        kib(after_prepare.saturating_sub(base)),
        kib(after_init.saturating_sub(after_prepare)),
        kib(after_tick.saturating_sub(after_init)),
    );
    println!(
        "  total {each:.1} KiB per module = {beyond:.1} KiB beyond its linear memory (goal <= 12 KiB)"
    );
    drop(live);
    drop(prepared);

    // Cold start: from verified bytes (checked once per digest, at install, by verification)
    // to the first tick returned, step by step; then a restart of the installed module.
    println!();
    let big = big_module(1 << 20);
    let mut big_manifest = hb.clone();
    big_manifest.name = "big".into();
    big_manifest.caps = Default::default();
    let (fork, fork_p99) = measure(200, || {
        let status = std::process::Command::new("/bin/true").status().unwrap();
        assert!(status.success());
    });
    println!(
        "cold start: verified bytes -> first tick returned, against fork+exec+wait of /bin/true \
         (p50 {:.1} us, p99 {:.1} us)",
        us(fork),
        us(fork_p99)
    );
    for (label, m, wasm, runs, goal) in [
        ("heartbeat", &hb, &hb_wasm[..], 200, 0.05),
        ("generated", &big_manifest, &big[..], 50, 0.5),
    ] {
        let (check, _) = measure(runs, || {
            black_box(edge_agent::engine::check(wasm, &limits).unwrap());
        });
        let checked = edge_agent::engine::check(wasm, &limits).unwrap();
        let (compile, _) = measure(runs, || {
            black_box(rt.prepare_checked(m, checked).unwrap());
        });
        let prepared = rt.prepare_checked(m, checked).unwrap();
        let (instantiate, _) = measure(runs, || {
            black_box(rt.instantiate(&prepared, kv_for(m)).unwrap());
        });
        // The first `init` and `tick` of a freshly prepared module: they include the lazy
        // translation of every function they run (the module's engine is new).
        let (init, _) = measure_after(
            runs,
            || {
                let prepared = rt.prepare_checked(m, checked).unwrap();
                rt.instantiate(&prepared, kv_for(m)).unwrap()
            },
            |i| assert!(i.init().outcome.is_finished()),
        );
        let (tick, _) = measure_after(
            runs,
            || {
                let prepared = rt.prepare_checked(m, checked).unwrap();
                let mut i = rt.instantiate(&prepared, kv_for(m)).unwrap();
                assert!(i.init().outcome.is_finished());
                i
            },
            |i| assert!(i.tick().outcome.is_finished()),
        );
        let (cold, cold_p99) = measure(runs, || {
            let prepared = rt.prepare_checked(m, checked).unwrap();
            first_tick(&rt, &prepared, m);
        });
        let (restart, restart_p99) = measure(runs, || first_tick(&rt, &prepared, m));
        let (floor, _) = measure(runs, || raw_lazy_first_tick(wasm));
        let share = |d: Duration| d.as_secs_f64() / cold.as_secs_f64() * 100.0;
        println!(
            "  {label} ({} bytes): p50 {:>8.1} us  p99 {:>8.1} us  = {:.3}x fork+exec+wait \
             (goal <= {goal}x), {:.2}x its floor",
            wasm.len(),
            us(cold),
            us(cold_p99),
            cold.as_secs_f64() / fork.as_secs_f64(),
            cold.as_secs_f64() / floor.as_secs_f64(),
        );
        println!(
            "    steps: compile+link {:.1} us ({:.0}%), instantiate {:.1} us ({:.0}%), first init {:.1} us \
             ({:.0}%), first tick {:.1} us ({:.0}%) (first calls: with the lazy translation of what \
             they run)",
            us(compile),
            share(compile),
            us(instantiate),
            share(instantiate),
            us(init),
            share(init),
            us(tick),
            share(tick),
        );
        println!(
            "    floor: raw wasmi, lazy Module::new + stub imports + instantiate + init + tick \
             {:.1} us",
            us(floor)
        );
        println!(
            "    not in the cold start: the Wasm check of verification, once per digest at install \
             {:.1} us ({:.1}x the cold start)",
            us(check),
            check.as_secs_f64() / cold.as_secs_f64()
        );
        println!(
            "    restart of the installed module (instantiate + init + first tick, its code already \
             translated): p50 {:.1} us  p99 {:.1} us  = {:.4}x fork+exec+wait (goal <= 0.01x)",
            us(restart),
            us(restart_p99),
            restart.as_secs_f64() / fork.as_secs_f64()
        );
    }

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
