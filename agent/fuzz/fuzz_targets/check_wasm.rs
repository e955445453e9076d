//! Check arbitrary bytes as a module (structure scan, then validation and translation of every
//! function): must refuse or accept, never panic, hang or allocate beyond a small multiple of the
//! input; whatever is accepted must compile and instantiate-check like the agent does.

#![no_main]

use edge_agent::engine::{self, WasmLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = WasmLimits::default();
    if let Ok(checked) = engine::check(data, &limits) {
        // What passed the check compiles for the runtime without validating again.
        let engine = engine::runtime_engine();
        engine::compile(&engine, checked).expect("checked Wasm compiles");
    }
    // Bytes with the Wasm header in front, so the fuzzer reaches the sections quickly.
    let mut wasm = engine::WASM_HEADER.to_vec();
    wasm.extend_from_slice(data);
    if let Ok(checked) = engine::check(&wasm, &limits) {
        let engine = engine::runtime_engine();
        engine::compile(&engine, checked).expect("checked Wasm compiles");
    }
});
