//! Modules whose structure makes a host allocate or work in proportion to a count they declare,
//! written as bytes (a text form of them would be tens of megabytes). Shared with
//! `agent/benches/containment.rs`.

#![allow(dead_code, clippy::cast_possible_truncation)]

/// The Wasm binary magic and version 1.
const HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";

fn leb(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb(body.len() as u64, out);
    out.extend_from_slice(body);
}

/// The type section `[() -> ()]`.
const ONE_TYPE: [u8; 4] = [1, 0x60, 0, 0];

/// `n` empty functions of type () -> ().
pub fn functions(n: u64) -> Vec<u8> {
    let mut m = HEADER.to_vec();
    section(1, &ONE_TYPE, &mut m);
    let mut funcs = Vec::new();
    leb(n, &mut funcs);
    funcs.resize(funcs.len() + n as usize, 0);
    section(3, &funcs, &mut m);
    let mut code = Vec::new();
    leb(n, &mut code);
    for _ in 0..n {
        code.extend_from_slice(&[2, 0, 0x0b]);
    }
    section(10, &code, &mut m);
    m
}

/// One function and a passive element segment of `n` references to it.
pub fn elements(n: u64) -> Vec<u8> {
    let mut m = HEADER.to_vec();
    section(1, &ONE_TYPE, &mut m);
    section(3, &[1, 0], &mut m);
    let mut elems = vec![1, 1, 0];
    leb(n, &mut elems);
    elems.resize(elems.len() + n as usize, 0);
    section(9, &elems, &mut m);
    section(10, &[1, 2, 0, 0x0b], &mut m);
    m
}

/// `n` imports of `edge.log` (with ABI v1's type).
pub fn imports(n: u64) -> Vec<u8> {
    let mut m = HEADER.to_vec();
    section(1, &[1, 0x60, 3, 0x7f, 0x7f, 0x7f, 1, 0x7f], &mut m);
    let mut imports = Vec::new();
    leb(n, &mut imports);
    for _ in 0..n {
        imports.extend_from_slice(&[4, b'e', b'd', b'g', b'e', 3, b'l', b'o', b'g', 0, 0]);
    }
    section(2, &imports, &mut m);
    m
}

/// `n` immutable i32 globals.
pub fn globals(n: u64) -> Vec<u8> {
    let mut m = HEADER.to_vec();
    let mut globals = Vec::new();
    leb(n, &mut globals);
    for _ in 0..n {
        globals.extend_from_slice(&[0x7f, 0, 0x41, 0, 0x0b]);
    }
    section(6, &globals, &mut m);
    m
}

/// One function declaring `n` i32 locals.
pub fn locals(n: u64) -> Vec<u8> {
    let mut m = HEADER.to_vec();
    section(1, &ONE_TYPE, &mut m);
    section(3, &[1, 0], &mut m);
    let mut body = vec![1];
    leb(n, &mut body);
    body.extend_from_slice(&[0x7f, 0x0b]);
    let mut code = vec![1];
    leb(body.len() as u64, &mut code);
    code.extend_from_slice(&body);
    section(10, &code, &mut m);
    m
}

/// One function type of `n` i32 results.
pub fn results(n: u64) -> Vec<u8> {
    let mut m = HEADER.to_vec();
    let mut types = vec![1, 0x60, 0];
    leb(n, &mut types);
    types.resize(types.len() + n as usize, 0x7f);
    section(1, &types, &mut m);
    m
}

/// `count` functions, each a block of `arity` i64 results left by a `br_table` of `targets`
/// targets (as text, parsed by `wat`).
pub fn br_tables(arity: usize, targets: usize, count: usize) -> Vec<u8> {
    let results = "(result ".to_string() + &"i64 ".repeat(arity) + ")";
    let values = "i64.const 0 ".repeat(arity);
    let targets = "0 ".repeat(targets);
    let func = format!(
        "(func (param i32) (drop (block {results} {values} local.get 0 br_table {targets})) {})\n",
        "drop ".repeat(arity.saturating_sub(1))
    );
    wat::parse_str(format!("(module {})", func.repeat(count))).unwrap()
}

/// `count` functions, each a loop taking `arity` parameters that a `br_table` of `targets` targets
/// branches back to.
pub fn loop_tables(arity: usize, targets: usize, count: usize) -> Vec<u8> {
    let params = "(param ".to_string() + &"i64 ".repeat(arity) + ")";
    let values = "i64.const 0 ".repeat(arity);
    let targets = "0 ".repeat(targets);
    let mut wat = format!("(module (type $t{arity} (func {params}))\n");
    let func = format!(
        "(func (param i32) {values} (loop (type $t{arity}) {params} local.get 0 br_table {targets}))\n"
    );
    for _ in 0..count {
        wat.push_str(&func);
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

/// A function that pushes `n` values before dropping them: valid Wasm whose operand stack is
/// deeper than wasmi can lay out.
pub fn deep_stack(n: usize) -> Vec<u8> {
    let body = "i32.const 1\n".repeat(n) + &"drop\n".repeat(n);
    wat::parse_str(format!("(module (func {body}))")).unwrap()
}
