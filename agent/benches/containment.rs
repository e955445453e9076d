//! Containment benchmarks (`just bench`): what a hostile module can make the agent spend.
//!
//! - host-call prices: for each host call, wall time per unit of fuel against plain Wasm (the
//!   floor: what the interpreter does per unit), with rates and per-call caps lifted;
//! - the worst-case wall time of one guest call at the default limits, for a loop of each host
//!   call kind (the module's manifest asks the agent's maximum fuel);
//! - peak RSS while checking the worst module structure the default limits allow;
//! - RSS after 1,000 upgrades of a 1 MiB module (each prepared in its own engine, run, dropped),
//!   against one shared engine (what the agent did before).
//!
//! Every figure comes from this one run; memory figures from fresh child processes of it.

#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::core::keys::KeyId;
use edge_agent::core::manifest::{Manifest, Sha256, WasmRef};
use edge_agent::core::rate::Rate;
use edge_agent::engine::{self, WasmLimits};
use edge_agent::hal::{Board, HardwareConfig};
use edge_agent::runtime::host::HostLimits;
use edge_agent::runtime::kv::KvStore;
use edge_agent::runtime::{ModuleInstance, Outcome, Runtime, RuntimeConfig};
use edge_agent::store::Store;

#[path = "../../tests/it/bombs.rs"]
mod bombs;

fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

fn proc_status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// One host call kind: its import, the call made in a loop, and the caps it needs.
struct Kind {
    name: &'static str,
    import: &'static str,
    body: &'static str,
}

const KINDS: &[Kind] = &[
    Kind {
        name: "now_ms",
        import: r#"(import "edge" "now_ms" (func $h (result i64)))"#,
        body: "call $h drop",
    },
    Kind {
        name: "log 100 B",
        import: r#"(import "edge" "log" (func $h (param i32 i32 i32) (result i32)))"#,
        body: "i32.const 3 i32.const 1024 i32.const 100 call $h drop",
    },
    Kind {
        name: "random 1 KiB",
        import: r#"(import "edge" "random" (func $h (param i32 i32) (result i32)))"#,
        body: "i32.const 4096 i32.const 1024 call $h drop",
    },
    Kind {
        name: "publish 1 KiB",
        import: r#"(import "edge" "publish" (func $h (param i32 i32 i32 i32) (result i32)))"#,
        body: "i32.const 0 i32.const 3 i32.const 4096 i32.const 1024 call $h drop",
    },
    Kind {
        name: "kv_get 16 KiB",
        import: r#"(import "edge" "kv_get" (func $h (param i32 i32 i32 i32) (result i32)))"#,
        body: "i32.const 16 i32.const 3 i32.const 32768 i32.const 16384 call $h drop",
    },
    Kind {
        name: "kv_set 16 KiB",
        import: r#"(import "edge" "kv_set" (func $h (param i32 i32 i32 i32) (result i32)))"#,
        body: "i32.const 16 i32.const 3 i32.const 4096 i32.const 16384 call $h drop",
    },
    Kind {
        name: "delay_us 1",
        import: r#"(import "edge" "delay_us" (func $h (param i32) (result i32)))"#,
        body: "i32.const 1 call $h drop",
    },
    Kind {
        name: "gpio_set",
        import: r#"(import "edge" "gpio_set" (func $h (param i32 i32) (result i32)))"#,
        body: "i32.const 17 local.get 1 i32.const 1 i32.and call $h drop",
    },
    Kind {
        name: "i2c 1+8 B",
        import: r#"(import "edge" "i2c_write_read" (func $h (param i32 i32 i32 i32 i32 i32) (result i32)))"#,
        body: "i32.const 1 i32.const 0x76 i32.const 64 i32.const 1 i32.const 128 i32.const 8 call $h drop",
    },
];

/// A module whose `run(n)` makes `n` calls of `kind` (or, without a kind, spins `n` times) and
/// whose `tick` loops forever.
fn module(kind: Option<&Kind>) -> Vec<u8> {
    let (import, body) = kind.map_or(("", "nop"), |k| (k.import, k.body));
    let wat = format!(
        r#"(module {import}
             (memory (export "memory") 1)
             (data (i32.const 0) "t/x")
             (data (i32.const 16) "key")
             (data (i32.const 64) "\d0")
             (func (export "edge_abi_v1"))
             (func $run (export "run") (param i32) (result i32) (local i32)
               (block $done (loop $l
                 (br_if $done (i32.ge_u (local.get 1) (local.get 0)))
                 {body}
                 (local.set 1 (i32.add (local.get 1) (i32.const 1)))
                 (br $l)))
               i32.const 0)
             (func (export "tick") (result i32) (drop (call $run (i32.const -1))) i32.const 0))"#
    );
    wat::parse_str(wat).unwrap()
}

fn manifest(fuel: u64) -> Manifest {
    Manifest::from_toml(&format!(
        r#"name = "hostile"
version = "1"
seq = 1
[limits]
fuel_per_call = {fuel}
memory_max_bytes = 1048576
tick_interval_ms = 1000
[caps]
publish = ["t/#"]
kv_quota_bytes = 1048576
gpio = [17]
i2c = [{{ bus = 1, addresses = [0x76] }}]
"#
    ))
    .unwrap()
}

fn runtime(config: RuntimeConfig) -> Runtime {
    let board = Board::open(&HardwareConfig::simulated(), Arc::new(|| 0));
    Runtime::new(config).with_board(Arc::new(board))
}

/// Limits lifted so that each call does its work every time (for prices).
fn lifted() -> RuntimeConfig {
    let free = Rate {
        per_sec: u32::MAX,
        burst: u32::MAX,
    };
    RuntimeConfig {
        max_fuel_per_call: u64::MAX,
        call_deadline_ms: 3_600_000,
        host: HostLimits {
            publish_rate: free,
            log_rate: free,
            kv_write_rate: free,
            max_messages_per_call: usize::MAX,
            max_message_bytes_per_call: usize::MAX,
            max_log_lines_per_call: usize::MAX,
            max_kv_writes_per_call: u32::MAX,
            max_kv_write_bytes_per_call: usize::MAX,
            max_random_bytes_per_call: usize::MAX,
            ..HostLimits::default()
        },
        ..RuntimeConfig::default()
    }
}

fn instance(rt: &Runtime, kind: Option<&Kind>, fuel: u64, store: &Store) -> ModuleInstance {
    let m = manifest(fuel);
    let prepared = rt.prepare(&m, &module(kind)).unwrap();
    let kv = store.kv("hostile", m.caps.kv_quota_bytes).unwrap();
    let mut i = rt.instantiate(&prepared, Some(Box::new(kv))).unwrap();
    assert!(i.init().outcome.is_finished());
    i
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        child_main(&args[at + 1..]);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    // The module is installed so that it has a key-value tree in the store.
    let wasm = module(None);
    let mut installed = manifest(1);
    installed.wasm = Some(WasmRef {
        sha256: Sha256::of(&wasm),
        size: wasm.len() as u64,
    });
    store
        .install(
            &installed,
            KeyId([0; 8]),
            Some(&wasm),
            Sha256::of(b"b"),
            0,
            &[],
        )
        .unwrap();
    // kv_get reads a 16 KiB value under "key".
    store
        .kv("hostile", 1 << 20)
        .unwrap()
        .set(b"key", &[7u8; 16384])
        .unwrap();
    println!("edge-agent containment benchmarks (one process, one run)\n");

    // Prices: wall time per unit of fuel, each host call against plain Wasm.
    let rt = runtime(lifted());
    let mut plain = instance(&rt, None, u64::MAX, &store);
    let spins = 20_000_000;
    let t = Instant::now();
    let (report, _) = plain.call_export("run", spins).unwrap();
    let plain_ns = t.elapsed().as_nanos() as f64 / report.fuel_used as f64;
    println!("host-call prices (limits lifted): wall time per unit of fuel");
    println!(
        "  {:<16} {:>10.1} fuel/iteration  {:>8.3} ns/fuel  (the floor)",
        "plain loop",
        report.fuel_used as f64 / f64::from(spins),
        plain_ns
    );
    for kind in KINDS {
        let mut i = instance(&rt, Some(kind), u64::MAX, &store);
        let n = if kind.name.starts_with("delay") {
            2_000
        } else {
            20_000
        };
        let t = Instant::now();
        let (report, _) = i.call_export("run", n).unwrap();
        let wall = t.elapsed();
        assert!(
            report.outcome.is_finished(),
            "{}: {}",
            kind.name,
            report.outcome
        );
        let ns = wall.as_nanos() as f64 / report.fuel_used as f64;
        println!(
            "  {:<16} {:>10.0} fuel/call  {:>8.2} us/call  {:>8.3} ns/fuel = {:>5.2}x the floor",
            kind.name,
            report.fuel_used as f64 / f64::from(n),
            wall.as_secs_f64() * 1e6 / f64::from(n),
            ns,
            ns / plain_ns
        );
    }

    // Worst case at the default limits: the module asks the agent's maximum fuel and its tick
    // loops on one host call until the call is ended.
    let config = RuntimeConfig::default();
    let rt = runtime(config);
    println!(
        "\nworst-case wall time of one guest call at the default limits (fuel {}, deadline {} ms)",
        config.max_fuel_per_call, config.call_deadline_ms
    );
    let mut spin = instance(&rt, None, u64::MAX, &store);
    let t = Instant::now();
    let report = spin.tick();
    let floor = t.elapsed();
    println!(
        "  {:<16} {:>8.1} ms  {}",
        "plain loop",
        floor.as_secs_f64() * 1e3,
        report.outcome
    );
    let mut worst = Duration::ZERO;
    for kind in KINDS {
        let mut i = instance(&rt, Some(kind), u64::MAX, &store);
        let t = Instant::now();
        let report = i.tick();
        let wall = t.elapsed();
        worst = worst.max(wall);
        assert!(!matches!(report.outcome, Outcome::Finished));
        println!(
            "  {:<16} {:>8.1} ms = {:>5.2}x the plain loop  {}",
            kind.name,
            wall.as_secs_f64() * 1e3,
            wall.as_secs_f64() / floor.as_secs_f64(),
            report.outcome
        );
    }
    println!(
        "  worst {:.1} ms = {:.2}x the deadline",
        worst.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3 / config.call_deadline_ms as f64
    );

    // Memory figures, each in a fresh process of this benchmark (a heap that earlier work left
    // large would hide what the measured work takes).
    println!("\npeak RSS of a fresh process checking one module (engine::check, default limits)");
    let limits = WasmLimits::default();
    let dir = tempfile::tempdir().unwrap();
    for (n, (what, wasm)) in structure_bombs(&limits).into_iter().enumerate() {
        let path = dir.path().join(format!("{n}.wasm"));
        std::fs::write(&path, &wasm).unwrap();
        let out = child(&["check", path.to_str().unwrap()]);
        println!("  {what:<34} {:>8} bytes  {out}", wasm.len());
    }
    println!(
        "\nRSS of a fresh process across 1,000 upgrades of a 1 MiB module (prepare, instantiate, \
         init, tick, drop)"
    );
    println!(
        "  an engine per module (the agent): {}",
        child(&["upgrades", "own"])
    );
    println!(
        "  one shared engine (before):       {}",
        child(&["upgrades", "shared"])
    );
}

/// Runs this benchmark again as `--child ARGS` and returns the line it prints.
fn child(args: &[&str]) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--bench")
        .arg("--child")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The child side of [`child`].
fn child_main(args: &[String]) {
    match args {
        [what, path] if what == "check" => {
            let wasm = std::fs::read(path).unwrap();
            let limits = WasmLimits::default();
            let before = peak_rss_bytes();
            let t = Instant::now();
            let result = engine::check(&wasm, &limits);
            let took = t.elapsed();
            let peak = peak_rss_bytes().saturating_sub(before);
            println!(
                "check {:>7.1} ms  peak +{:>6.1} MiB = {:>5.2}x the input  {}",
                took.as_secs_f64() * 1e3,
                mib(peak),
                peak as f64 / wasm.len() as f64,
                match result {
                    Ok(_) => "accepted".to_string(),
                    Err(e) => format!("refused: {e}"),
                }
            );
        }
        [what, how] if what == "upgrades" => {
            let big = big_module(1 << 20);
            let mut m = manifest(100_000_000);
            m.caps = Default::default();
            let rt = runtime(RuntimeConfig::default());
            let shared = how == "shared";
            // The peer: raw wasmi with one engine for every version, as the agent had it.
            let engine = wasmi::Engine::new(&{
                let mut c = wasmi::Config::default();
                c.compilation_mode(wasmi::CompilationMode::Lazy);
                c
            });
            let mut marks = Vec::new();
            let start = rss_bytes();
            for n in 1..=1000 {
                if shared {
                    let module = wasmi::Module::new(&engine, &big).unwrap();
                    let mut store = wasmi::Store::new(&engine, ());
                    let i = wasmi::Linker::<()>::new(&engine)
                        .instantiate_and_start(&mut store, &module)
                        .unwrap();
                    let tick = i.get_typed_func::<(), i32>(&store, "tick").unwrap();
                    assert_eq!(tick.call(&mut store, ()).unwrap(), 0);
                } else {
                    let prepared = rt.prepare(&m, &big).unwrap();
                    let mut i = rt.instantiate(&prepared, None).unwrap();
                    assert!(i.init().outcome.is_finished());
                    let report = i.tick();
                    assert!(report.outcome.is_finished(), "{}", report.outcome);
                }
                if n % 250 == 0 {
                    marks.push((n, rss_bytes()));
                }
            }
            let mut line = format!("start {:>6.1} MiB", mib(start));
            for (n, rss) in &marks {
                line.push_str(&format!("  after {n}: {:>6.1} MiB", mib(*rss)));
            }
            println!("{line}");
        }
        _ => panic!("unknown child {args:?}"),
    }
}

/// A module of about `target` bytes: many functions of straight-line arithmetic, each called
/// once from `tick` so that all of them are translated.
fn big_module(target: usize) -> Vec<u8> {
    let mut body = String::new();
    for i in 0..60 {
        body.push_str(&format!(
            "local.get 0 i32.const {i} i32.add i32.const 7 i32.mul local.set 0 "
        ));
    }
    let func = format!("(func (param i32) (result i32) {body} local.get 0)\n");
    let one = wat::parse_str(format!("(module {func})")).unwrap().len();
    let count = target / one;
    let mut calls = String::new();
    for f in 0..count {
        calls.push_str(&format!("i32.const 1 call {} drop ", f + 2));
    }
    let mut wat = format!(
        "(module (memory (export \"memory\") 1) (func (export \"edge_abi_v1\"))\n\
         (func (export \"tick\") (result i32) {calls} i32.const 0)\n"
    );
    for _ in 0..count {
        wat.push_str(&func);
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

/// Modules at (or just inside) the default structure limits, and the issue's bombs above them.
fn structure_bombs(limits: &WasmLimits) -> Vec<(&'static str, Vec<u8>)> {
    let s = limits.structure;
    let mut out = Vec::new();
    // The most functions, each of the least code wasmi accepts on average (40 bytes).
    let mut wat = String::from("(module (memory 1)\n");
    let body = "local.get 0 i32.const 3 i32.mul local.set 0 ".repeat(12);
    for _ in 0..s.max_functions {
        wat.push_str(&format!("(func (param i32) {body})\n"));
    }
    wat.push(')');
    out.push(("max functions, 40 B each", wat::parse_str(&wat).unwrap()));
    // 4 MiB of code in the most functions: 64-bit arithmetic over many locals.
    let body =
        "local.get 1 i64.const 0x123456789 i64.mul local.get 2 i64.add local.set 3 ".repeat(20);
    let func = format!("(func (param i32) (local i64 i64 i64) {body})\n");
    let one = wat::parse_str(format!("(module {func})")).unwrap().len();
    let n = ((4usize << 20) / one).min(s.max_functions as usize);
    out.push((
        "4 MiB of code, i64 arithmetic",
        wat::parse_str(format!("(module {})", func.repeat(n))).unwrap(),
    ));
    // Branches moving the most values allowed: br_tables into 32-result blocks and 32-parameter
    // loops up to the branch limit, and 4 MiB of br_tables into 1-result blocks.
    let per_func = 20_001 * u64::from(s.max_results);
    let funcs = usize::try_from(s.max_branch_values / per_func).unwrap();
    out.push((
        "br_tables at the limit, 32 results",
        bombs::br_tables(s.max_results as usize, 20_000, funcs),
    ));
    out.push((
        "br_tables at the limit, 32 params",
        bombs::loop_tables(s.max_params as usize, 20_000, funcs),
    ));
    let one = bombs::br_tables(1, 20_000, 1).len();
    out.push((
        "br_tables 4 MiB, 1-result blocks",
        bombs::br_tables(1, 20_000, (4 << 20) / one),
    ));
    // The bombs of the issue, above the limits: refused from the header.
    out.push(("900k functions", bombs::functions(900_000)));
    out.push(("passive segment of 3.5M refs", bombs::elements(3_500_000)));
    out
}
