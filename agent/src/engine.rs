//! The wasmi engine configuration and the one check every module passes before it may run.
//!
//! [`check`] is the door: a structure scan against [`WasmLimits`] before anything is allocated
//! from a count ([`structure`]), then a full validation *and translation* of every function in a
//! throwaway engine with wasmi's strict enforced limits, so that whatever the engine would refuse
//! later (a function it cannot compile, too many locals, a block type above the limits) is
//! refused at verification, once per bundle. The engine is dropped with the compiled code.
//!
//! [`compile`] then parses checked bytes for the runtime without validating them a second time
//! (functions are translated lazily, on their first call).
//!
//! A passed check is remembered per Wasm digest ([`CheckedWasm::record`], kept by the store), so
//! that a module restarted later (agent start, operator restart, rollback) is compiled from its
//! stored bytes without being checked again: [`recall`] accepts the record only if it was made
//! by this very agent binary under the same limits ([`CheckStamp`]); anything else means one
//! full check again.
//!
//! Modules run each in an engine of their own ([`runtime_engine`]): wasmi keeps the code it
//! compiles for the life of its engine, so one shared engine would grow with every upgrade,
//! rejected bundle and restart; a module's engine goes away with the module.

pub mod structure;

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub use structure::{Shape, StructureError, StructureLimits, WasmLimits};

/// The Wasm binary magic and version 1.
pub const WASM_HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";

/// The Wasm proposals the engine accepts, and those it refuses (docs/abi.md lists the same).
pub const ACCEPTED_PROPOSALS: &[&str] = &[
    "mutable-global",
    "multi-value",
    "sign-extension",
    "saturating-float-to-int",
    "bulk-memory",
    "reference-types",
    "tail-call",
    "extended-const",
];

/// Refused: multi-memory, memory64, custom page sizes, SIMD and relaxed SIMD, wide arithmetic,
/// threads, exception handling, GC (wasmi 2 implements some of them; the agent turns them off).
pub const REFUSED_PROPOSALS: &[&str] = &[
    "multi-memory",
    "memory64",
    "custom-page-sizes",
    "simd",
    "relaxed-simd",
    "wide-arithmetic",
    "threads",
    "exceptions",
    "gc",
];

/// Deepest call stack of a guest call (frames).
pub const MAX_RECURSION_DEPTH: usize = 1000;
/// Largest value stack of a guest call, bytes.
pub const MAX_STACK_BYTES: usize = 1 << 20;

fn config(mode: wasmi::CompilationMode) -> wasmi::Config {
    let mut config = wasmi::Config::default();
    config
        .consume_fuel(true)
        // A start function would run during instantiation, before the agent sets a fuel budget.
        .allow_start_fn(false)
        .compilation_mode(mode)
        .enforced_limits(wasmi::EnforcedLimits::strict())
        .wasm_mutable_global(true)
        .wasm_multi_value(true)
        .wasm_sign_extension(true)
        .wasm_saturating_float_to_int(true)
        .wasm_bulk_memory(true)
        .wasm_reference_types(true)
        .wasm_tail_call(true)
        .wasm_extended_const(true)
        // memory64 and SIMD are cargo features of wasmi, off in this build (no code for them
        // in the binary); threads, exceptions and GC are not implemented by wasmi 2.
        .wasm_multi_memory(false)
        .wasm_custom_page_sizes(false)
        .wasm_wide_arithmetic(false)
        // Translation is paid once, at install, by `check`; lazy translation of a function on
        // its first call costs no fuel. (wasmi 2 ends a call that runs out of fuel while
        // translating a callee for good instead of pausing it, which would break the deadline's
        // fuel slices; and a guest's fuel per call stays the same on its first and later runs.)
        .fuel_cost(wasmi::CustomFuelCosts {
            bytes_copied_per_fuel: 64,
            fuel_per_bytes_translated: 0,
            fuel_per_bytes_validated: 0,
        })
        .set_max_recursion_depth(MAX_RECURSION_DEPTH)
        // One module runs one call at a time: one cached stack is all its engine needs.
        .set_max_cached_stacks(1);
    // The default maximum is 1 MB; the minimum stays below it, so this cannot fail.
    let _ = config.set_max_stack_height(MAX_STACK_BYTES);
    config
}

/// A new engine for one module: fuel metering on, start functions refused, lazy compilation (a
/// function is translated on its first call, so code a module never runs costs no memory; the
/// whole module was validated and translated once by [`check`] before).
pub fn runtime_engine() -> wasmi::Engine {
    wasmi::Engine::new(&config(wasmi::CompilationMode::Lazy))
}

/// Compiles checked Wasm for `engine` (a [`runtime_engine`]) without validating it again: the
/// sections are parsed now, each function translated on its first call. Validation happened
/// once, in [`check`], for exactly these bytes.
pub fn compile(
    engine: &wasmi::Engine,
    wasm: CheckedWasm<'_>,
) -> Result<wasmi::Module, wasmi::Error> {
    // SAFETY: `CheckedWasm` is made only by `check`, which validated and translated these bytes
    // (borrowed immutably since) with the same features and enforced limits as every
    // `runtime_engine` (`config`), the two conditions `Module::new_unchecked` requires.
    #[allow(unsafe_code)]
    unsafe {
        wasmi::Module::new_unchecked(engine, wasm.bytes())
    }
}

/// Wasm bytes that passed [`check`]: structure within the limits, every function validated and
/// translated. Only [`check`] (and [`recall`], from what a check recorded) makes one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CheckedWasm<'a> {
    bytes: &'a [u8],
    shape: Shape,
    stamp: CheckStamp,
}

impl<'a> CheckedWasm<'a> {
    /// The module bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Its structure.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// What to remember of this check, stored beside the Wasm under its digest: [`recall`]
    /// turns it back into a `CheckedWasm` for the same bytes without checking them again.
    pub fn record(&self) -> Vec<u8> {
        let record = CheckRecord {
            stamp: self.stamp,
            shape: self.shape,
        };
        let mut out = Vec::new();
        // Serialising two fixed-size plain values into a Vec cannot fail.
        ciborium::into_writer(&record, &mut out)
            .unwrap_or_else(|e| unreachable!("encoding a check record: {e}"));
        out
    }
}

/// Identifies what a check accepted: this agent binary (its engine configuration, wasmi and the
/// structure scan are all in it) and the limits checked against. A record made under another
/// stamp is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStamp([u8; 32]);

impl CheckStamp {
    /// The stamp of a check against `limits` by this binary.
    pub fn of(limits: &WasmLimits) -> CheckStamp {
        let mut h = sha2::Sha256::new();
        h.update(b"edge-agent check record v1\0");
        h.update(binary_digest());
        h.update(format!("{limits:?}").as_bytes());
        CheckStamp(h.finalize().into())
    }
}

/// The identity of the running executable, taken once per process: the agent's version and
/// its file's device, inode, size and modification time (a rebuilt or upgraded binary is a new
/// file or a new mtime). A stat, not a hash of the file: a debug build of the agent is over
/// 100 MB, and hashing it at every start took seconds under emulation. An executable that
/// cannot be looked at gets a random value, so that nothing it records is trusted by another run.
fn binary_digest() -> &'static [u8; 32] {
    static DIGEST: OnceLock<[u8; 32]> = OnceLock::new();
    DIGEST.get_or_init(|| {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::metadata("/proc/self/exe") {
            Ok(m) => {
                let id = format!(
                    "edge-agent {} {} {} {} {}.{}",
                    env!("CARGO_PKG_VERSION"),
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec()
                );
                sha2::Sha256::digest(id.as_bytes()).into()
            }
            Err(_) => {
                let mut random = [0; 32];
                if getrandom::fill(&mut random).is_err() {
                    // Without randomness either: the process id and the time, which never
                    // repeat a run.
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    let seed = format!("{} {:?}", std::process::id(), t);
                    random = sha2::Sha256::digest(seed.as_bytes()).into();
                }
                random
            }
        }
    })
}

/// What [`CheckedWasm::record`] stores.
#[derive(Debug, Serialize, Deserialize)]
struct CheckRecord {
    stamp: CheckStamp,
    shape: Shape,
}

/// `wasm` as checked, if `record` says these bytes passed [`check`] under `limits` in this
/// agent binary. The caller must know that `wasm` are the bytes the record was made for (the
/// store keys records by the Wasm's SHA-256 and verifies the digest of every blob it reads).
/// `None`: check them again.
pub fn recall<'a>(wasm: &'a [u8], record: &[u8], limits: &WasmLimits) -> Option<CheckedWasm<'a>> {
    let record: CheckRecord = ciborium::from_reader(record).ok()?;
    (record.stamp == CheckStamp::of(limits) && wasm.starts_with(&WASM_HEADER)).then_some(
        CheckedWasm {
            bytes: wasm,
            shape: record.shape,
            stamp: record.stamp,
        },
    )
}

impl fmt::Debug for CheckedWasm<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedWasm")
            .field("len", &self.bytes.len())
            .field("shape", &self.shape)
            .finish()
    }
}

/// Why Wasm bytes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// Not a WebAssembly binary (magic and version).
    #[error("the module bytes are not a WebAssembly binary")]
    NotWasm,
    /// A structure limit.
    #[error("the module's structure is refused: {0}")]
    Structure(#[from] StructureError),
    /// Validation or translation failed.
    #[error("the Wasm module does not validate: {0}")]
    Invalid(String),
}

/// Checks `wasm`: header, structure against `limits`, then validation and translation of every
/// function with the runtime's own features and limits.
pub fn check<'a>(wasm: &'a [u8], limits: &WasmLimits) -> Result<CheckedWasm<'a>, CheckError> {
    if !wasm.starts_with(&WASM_HEADER) {
        return Err(CheckError::NotWasm);
    }
    let shape = structure::scan(wasm, limits).map_err(|e| match e {
        StructureError::Malformed(m) => CheckError::Invalid(m),
        other => CheckError::Structure(other),
    })?;
    let engine = wasmi::Engine::new(&config(wasmi::CompilationMode::Eager));
    wasmi::Module::new(&engine, wasm).map_err(|e| CheckError::Invalid(e.to_string()))?;
    Ok(CheckedWasm {
        bytes: wasm,
        shape,
        stamp: CheckStamp::of(limits),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn a_check_record_is_recalled_only_under_the_limits_it_was_made_with() {
        let bytes = wasm("(module (memory 1) (func (export \"f\")))");
        let limits = WasmLimits::default();
        let checked = check(&bytes, &limits).unwrap();
        let record = checked.record();
        assert_eq!(recall(&bytes, &record, &limits), Some(checked));
        let stricter = WasmLimits {
            structure: StructureLimits {
                max_functions: 1,
                ..StructureLimits::default()
            },
            ..limits
        };
        assert_eq!(recall(&bytes, &record, &stricter), None);
        let smaller_memory = WasmLimits {
            max_memory_bytes: 1 << 16,
            ..limits
        };
        assert_eq!(recall(&bytes, &record, &smaller_memory), None);
        // A damaged record, or one that is not a record, is not trusted.
        let mut damaged = record.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        // The record is a CBOR map whose first entry is "stamp": 32 bytes from index 9 on.
        assert_eq!(&record[..9], b"\xa2\x65stamp\x98\x20");
        let mut flipped_stamp = record.clone();
        flipped_stamp[9] ^= 0x01;
        for bad in [
            &damaged[..],
            &flipped_stamp[..],
            &record[..4],
            &b"\xa0"[..],
            &[][..],
        ] {
            assert_ne!(recall(&bytes, bad, &limits), Some(checked), "{bad:02x?}");
        }
        // Bytes that are not Wasm are never taken as checked.
        assert_eq!(recall(b"not wasm", &record, &limits), None);
    }

    #[test]
    fn a_function_the_engine_cannot_translate_is_refused_by_the_check() {
        // 70 000 values on the operand stack: valid Wasm, beyond what wasmi can lay out.
        let body = "i32.const 1\n".repeat(70_000) + &"drop\n".repeat(70_000);
        let bytes = wasm(&format!("(module (func {body}))"));
        assert!(wasmi::Module::validate(&runtime_engine(), &bytes).is_ok());
        let limits = WasmLimits {
            structure: StructureLimits::default(),
            ..WasmLimits::default()
        };
        assert!(matches!(
            check(&bytes, &limits),
            Err(CheckError::Invalid(_))
        ));
    }

    #[test]
    fn the_documented_proposals_are_accepted_and_the_others_refused() {
        let limits = WasmLimits::default();
        let accepted = [
            (
                "multi-value",
                "(module (func (result i32 i32) i32.const 1 i32.const 2))",
            ),
            (
                "sign-extension",
                "(module (func (result i32) i32.const 1 i32.extend8_s))",
            ),
            (
                "saturating-float-to-int",
                "(module (func (result i32) f32.const 1 i32.trunc_sat_f32_s))",
            ),
            (
                "bulk-memory",
                "(module (memory 1) (func i32.const 0 i32.const 0 i32.const 1 memory.copy))",
            ),
            (
                "reference-types",
                "(module (func (result externref) ref.null extern))",
            ),
            ("tail-call", "(module (func $f return_call $f))"),
            (
                "extended-const",
                "(module (global i32 (i32.add (i32.const 1) (i32.const 2))))",
            ),
        ];
        for (name, wat) in accepted {
            assert!(ACCEPTED_PROPOSALS.contains(&name));
            check(&wasm(wat), &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let refused = [
            ("multi-memory", "(module (memory 1) (memory 1))"),
            ("memory64", "(module (memory i64 1))"),
            ("simd", "(module (func (result v128) v128.const i64x2 0 0))"),
            (
                "threads",
                "(module (memory 1 1 shared) (func (result i32) i32.const 0 i32.atomic.load))",
            ),
            ("exceptions", "(module (tag) (func throw 0))"),
        ];
        for (name, wat) in refused {
            assert!(REFUSED_PROPOSALS.contains(&name));
            assert!(check(&wasm(wat), &limits).is_err(), "{name} was accepted");
        }
    }
}
