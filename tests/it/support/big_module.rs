//! A large, realistic Wasm module for chunked delivery: ~`size` bytes of code in ~500-byte
//! functions whose constants come from a fixed pseudo-random sequence, so no two functions are
//! alike (as in compiled code) and the module is the same on every run. `variant` changes the
//! body of one function in the middle of the code section and nothing else: what "a change to one
//! function" does to the bytes. Shared by the tests, the benchmarks and the demo (`#[path]`).

/// The module, about `size` bytes (at least ~1 KiB), with one function changed per `variant`.
pub fn big_module(size: usize, variant: u32) -> Vec<u8> {
    wat::parse_str(big_module_wat(size, variant)).expect("the generated module is valid WAT")
}

/// The module's text.
pub fn big_module_wat(size: usize, variant: u32) -> String {
    use std::fmt::Write as _;
    // 32 steps per function; a function is ~458 bytes in the binary (measured: a step's two
    // constants are 1 to 5 LEB128 bytes each). 1 MiB makes ~2,300 functions, well within the
    // agent's 10,000 (engine/structure.rs).
    const STEPS: usize = 32;
    const FUNCTION_BYTES: usize = 458;
    let functions = (size / FUNCTION_BYTES).max(2);
    let changed = functions / 2;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as i32
    };
    let mut wat = String::with_capacity(functions * STEPS * 40);
    wat.push_str(
        "(module\n  (memory (export \"memory\") 1)\n  (func (export \"edge_abi_v1\"))\n  \
         (func (export \"tick\") (result i32) i32.const 0)\n",
    );
    for f in 0..functions {
        let _ = write!(
            wat,
            "  (func $f{f} (param i32) (result i32)\n    local.get 0\n"
        );
        for step in 0..STEPS {
            let (mut a, b) = (next(), next());
            if f == changed && step == 0 {
                a = a.wrapping_add(variant as i32);
            }
            let _ = writeln!(wat, "    i32.const {a} i32.mul i32.const {b} i32.xor");
        }
        wat.push_str("  )\n");
    }
    wat.push(')');
    wat
}
