#!/usr/bin/env python3
"""The peer engines of `cargo bench -p edge-agent --bench peers` (agent/benches/peers.rs): runs
guest exports in wasm3 (pywasm3) and wasmtime (its Python package) and prints JSON on stdout.

The request comes as JSON on stdin: {"runs": N, "workloads": [{"name", "path" (a .wasm file),
"export" (takes and returns one i32), "args" (the argument per engine), "imports": [{"module",
"name", "params", "results"}]}]}, value types as "i32", "i64", "f32", "f64".

For every workload and engine: the module is compiled and instantiated, every import is linked to
the same no-op stub (returns zeros), the export is called once untimed with the engine's argument
(translation, caches), then `runs` times with it and `runs` times with 0, each call timed alone
with perf_counter around the engine call only, the engines and workloads taken in turn. The calls
with 0 bound the Python-to-engine crossing (they include the guest's own set-up), which the Rust
side reports beside the figures. An engine that cannot be imported, or a workload that fails in
it, is reported with the reason; the others still run.
"""

import importlib.metadata
import json
import statistics
import sys
import time


def timed(call, arg):
    """Seconds of one call of `call(arg)` and its value."""
    start = time.perf_counter()
    value = call(arg)
    return time.perf_counter() - start, value


def stub(results):
    """A host function that does nothing and returns zeros."""
    zeros = tuple(0 for _ in results)
    return lambda *_: zeros[0] if len(zeros) == 1 else (zeros or None)


def wasm3_loader(wasm, imports):
    import wasm3

    codes = {"i32": "i", "i64": "I", "f32": "f", "f64": "F"}
    env = wasm3.Environment()
    # The interpreter's own stack; the guests' stack lives in their linear memory.
    runtime = env.new_runtime(1 << 20)
    module = env.parse_module(wasm)
    runtime.load(module)
    for imp in imports:
        params = "".join(codes[t] for t in imp["params"])
        results = "".join(codes[t] for t in imp["results"]) or "v"
        sig = f"{results}({params})"
        module.link_function(imp["module"], imp["name"], sig, stub(imp["results"]))

    def load(export):
        f = runtime.find_function(export)
        return lambda arg: f(arg)

    return load


def wasmtime_loader(wasm, imports):
    import wasmtime

    types = {
        "i32": wasmtime.ValType.i32(),
        "i64": wasmtime.ValType.i64(),
        "f32": wasmtime.ValType.f32(),
        "f64": wasmtime.ValType.f64(),
    }
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, wasm)
    linker = wasmtime.Linker(engine)
    for imp in imports:
        params = [types[t] for t in imp["params"]]
        results = [types[t] for t in imp["results"]]
        ty = wasmtime.FuncType(params, results)
        linker.define_func(imp["module"], imp["name"], ty, stub(imp["results"]))
    instance = linker.instantiate(store, module)

    def load(export):
        f = instance.exports(store)[export]
        return lambda arg: f(store, arg)

    return load


ENGINES = {
    "wasm3": ("pywasm3", wasm3_loader),
    "wasmtime": ("wasmtime", wasmtime_loader),
}


def main():
    request = json.load(sys.stdin)
    runs = request["runs"]
    out = {}
    # (engine, workload name, call, argument) of every export that loaded and ran once.
    calls = []
    for engine, (package, loader) in ENGINES.items():
        entry = {"package": package, "version": None, "error": None, "results": {}}
        out[engine] = entry
        try:
            entry["version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            entry["error"] = (
                f"the Python package {package} is not installed in {sys.prefix} "
                "(agent/benches/peers-setup installs it and says why when it cannot)"
            )
            continue
        for w in request["workloads"]:
            arg = w["args"][engine]
            try:
                with open(w["path"], "rb") as f:
                    wasm = f.read()
                call = loader(wasm, w["imports"])(w["export"])
                value = call(arg)
            except Exception as e:  # noqa: BLE001 - reported, with its type, to the Rust side
                entry["results"][w["name"]] = {"error": f"{type(e).__name__}: {e}"}
                continue
            entry["results"][w["name"]] = {"value": value, "times": [], "crossings": []}
            calls.append((engine, w["name"], call, arg))
    # Round-robin, so that drift in the machine's speed hits every engine alike.
    for _ in range(runs):
        for engine, name, call, arg in calls:
            r = out[engine]["results"][name]
            t, value = timed(call, arg)
            if value != r["value"]:
                r["error"] = f"returned {r['value']}, then {value}"
            r["times"].append(t)
            r["crossings"].append(timed(call, 0)[0])
    for engine, name, _, _ in calls:
        r = out[engine]["results"][name]
        r["median_s"] = statistics.median(r.pop("times"))
        r["crossing_s"] = statistics.median(r.pop("crossings"))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
