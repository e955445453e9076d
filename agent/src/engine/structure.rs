//! A cheap scan of a Wasm module's structure before the engine sees it: every count that makes
//! the host allocate (functions, imports, globals, types, exports, table entries, element items,
//! segments, locals) is read from its section header and compared with a limit *before* the
//! section is walked, so a module of 900 000 functions costs a header read, not 150 MiB. It also
//! refuses what would only fail at instantiation: a second memory or table, a table or memory
//! above the agent's caps, and active data or element segments outside their memory or table.
//!
//! Pure: bytes in, a [`Shape`] or the limit that was passed out.

use serde::{Deserialize, Serialize};
use wasmparser::{
    DataKind, ElementItems, ElementKind, Operator, Parser, Payload, TypeRef, ValType,
};

/// Wasm page size in bytes.
const PAGE: u64 = 65536;

/// Limits on a module's structure: what it may make the host allocate beyond its linear memory.
/// Defaults fit every example module with a wide margin; documented in docs/abi.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StructureLimits {
    /// Entries in the type section.
    pub max_types: u32,
    /// Imports.
    pub max_imports: u32,
    /// Functions, imported and defined.
    pub max_functions: u32,
    /// Globals defined.
    pub max_globals: u32,
    /// Exports.
    pub max_exports: u32,
    /// Element segments (active, passive and declared).
    pub max_element_segments: u32,
    /// Items over all element segments (passive ones are kept by every instance).
    pub max_element_items: u32,
    /// Data segments.
    pub max_data_segments: u32,
    /// Parameters of one function type (also block types).
    pub max_params: u32,
    /// Results of one function type (also block types).
    pub max_results: u32,
    /// Locals of one function, parameters included.
    pub max_locals: u32,
    /// Values the engine must move for branches, over the whole module: each `br`, `br_if` and
    /// `br_table` target counts the values its label carries (at least one). This bounds the
    /// time validation and translation take: a 4 MiB module of `br_table`s into blocks of 32
    /// results took 1.5 s to check on x86_64 (15 s on a Pi), one of 1-result blocks 0.12 s.
    pub max_branch_values: u64,
}

impl Default for StructureLimits {
    fn default() -> Self {
        StructureLimits {
            max_types: 1_000,
            max_imports: 256,
            // wasmi's own strict limits (`EnforcedLimits::strict`, which the engine also applies)
            // allow 10 000 functions, 1 000 globals, 1 000 segments of each kind, 32 params and
            // results; these stay within them.
            max_functions: 10_000,
            max_globals: 1_000,
            max_exports: 1_000,
            max_element_segments: 1_000,
            max_element_items: 10_000,
            max_data_segments: 1_000,
            max_params: 32,
            max_results: 32,
            max_locals: 10_000,
            max_branch_values: 8_000_000,
        }
    }
}

/// The structure limits together with the agent's memory and table caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WasmLimits {
    /// Counts.
    pub structure: StructureLimits,
    /// Most entries a table may start with (the table cap at run time).
    pub max_table_elements: u32,
    /// Largest initial linear memory, bytes (the agent's memory cap).
    pub max_memory_bytes: u64,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits {
            structure: StructureLimits::default(),
            max_table_elements: 10_000,
            max_memory_bytes: 64 << 20,
        }
    }
}

/// What the scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Shape {
    /// Function imports.
    pub imports: u32,
    /// Functions defined.
    pub functions: u32,
    /// Globals defined.
    pub globals: u32,
    /// Initial table entries (0 without a table).
    pub table_elements: u64,
    /// Initial linear memory in bytes (0 without a memory).
    pub memory_bytes: u64,
    /// Element items over all segments.
    pub element_items: u64,
    /// Data bytes over all segments.
    pub data_bytes: u64,
    /// Bytes of function bodies.
    pub code_bytes: u64,
    /// Values moved by branches (see [`StructureLimits::max_branch_values`]).
    pub branch_values: u64,
}

/// Why a module's structure is refused. Each names the limit or the item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StructureError {
    /// A count above its limit.
    #[error("it has {found} {what}, above the limit of {limit} (runtime.structure.{key})")]
    TooMany {
        /// What is counted.
        what: &'static str,
        /// How many the module declares.
        found: u64,
        /// The limit.
        limit: u64,
        /// The configuration key of the limit.
        key: &'static str,
    },
    /// A table or memory above the agent's caps, or a second one.
    #[error("{0}")]
    Refused(String),
    /// The bytes do not parse as a Wasm module.
    #[error("malformed module: {0}")]
    Malformed(String),
}

fn too_many(
    what: &'static str,
    found: impl Into<u64>,
    limit: u32,
    key: &'static str,
) -> StructureError {
    StructureError::TooMany {
        what,
        found: found.into(),
        limit: u64::from(limit),
        key,
    }
}

fn check_count(
    what: &'static str,
    found: u32,
    limit: u32,
    key: &'static str,
) -> Result<(), StructureError> {
    if found > limit {
        return Err(too_many(what, found, limit, key));
    }
    Ok(())
}

fn malformed(e: wasmparser::BinaryReaderError) -> StructureError {
    StructureError::Malformed(e.message().to_string())
}

/// An active segment's place, to be checked once the sizes are known.
struct Placement {
    what: &'static str,
    in_memory: bool,
    index: u32,
    offset: Option<u64>,
    len: u64,
}

/// Scans `wasm` against `limits`. Nothing is allocated from a count before the count is checked.
pub fn scan(wasm: &[u8], limits: &WasmLimits) -> Result<Shape, StructureError> {
    let l = &limits.structure;
    let mut shape = Shape::default();
    let mut tables = 0u32;
    let mut memories = 0u32;
    // Values of the module's globals, for constant offsets (`global.get` in an offset).
    let mut globals: Vec<Option<i64>> = Vec::new();
    let mut placements: Vec<Placement> = Vec::new();
    // Parameter counts per type and the type of each defined function (both bounded by limits
    // checked before they are filled): a function's parameters are locals too.
    let mut type_params: Vec<u32> = Vec::new();
    let mut type_results: Vec<u32> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new();
    let mut bodies = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(malformed)? {
            Payload::TypeSection(reader) => {
                check_count("types", reader.count(), l.max_types, "max_types")?;
                for group in reader {
                    for sub in group.map_err(malformed)?.types() {
                        let (params, results) = match &sub.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => {
                                (len_u32(f.params().len()), len_u32(f.results().len()))
                            }
                            _ => (0, 0),
                        };
                        check_count(
                            "types",
                            len_u32(type_params.len()) + 1,
                            l.max_types,
                            "max_types",
                        )?;
                        type_params.push(params);
                        type_results.push(results);
                        if let wasmparser::CompositeInnerType::Func(f) = &sub.composite_type.inner {
                            check_count(
                                "parameters in a function type",
                                len_u32(f.params().len()),
                                l.max_params,
                                "max_params",
                            )?;
                            check_count(
                                "results in a function type",
                                len_u32(f.results().len()),
                                l.max_results,
                                "max_results",
                            )?;
                        }
                    }
                }
            }
            Payload::ImportSection(reader) => {
                check_count("imports", reader.count(), l.max_imports, "max_imports")?;
                for import in reader {
                    let import = import.map_err(malformed)?;
                    if !matches!(import.ty, TypeRef::Func(_)) {
                        return Err(StructureError::Refused(format!(
                            "it imports {}.{}, which is not a function: a module defines its own \
                             memory, table and globals",
                            import.module, import.name
                        )));
                    }
                    shape.imports += 1;
                }
            }
            Payload::FunctionSection(reader) => {
                let total = u64::from(reader.count()) + u64::from(shape.imports);
                if total > u64::from(l.max_functions) {
                    return Err(too_many(
                        "functions",
                        total,
                        l.max_functions,
                        "max_functions",
                    ));
                }
                shape.functions = reader.count();
                for ty in reader {
                    func_types.push(ty.map_err(malformed)?);
                }
            }
            Payload::TableSection(reader) => {
                tables = tables.saturating_add(reader.count());
                if tables > 1 {
                    return Err(StructureError::Refused(format!(
                        "it defines {tables} tables; a module may have one"
                    )));
                }
                for table in reader {
                    let initial = table.map_err(malformed)?.ty.initial;
                    if initial > u64::from(limits.max_table_elements) {
                        return Err(StructureError::Refused(format!(
                            "its table starts with {initial} entries, above the agent's cap of {} \
                             (runtime.max_table_elements)",
                            limits.max_table_elements
                        )));
                    }
                    shape.table_elements = initial;
                }
            }
            Payload::MemorySection(reader) => {
                memories = memories.saturating_add(reader.count());
                if memories > 1 {
                    return Err(StructureError::Refused(format!(
                        "it defines {memories} memories; a module may have one"
                    )));
                }
                for memory in reader {
                    let memory = memory.map_err(malformed)?;
                    if memory.memory64 || memory.shared || memory.page_size_log2.is_some() {
                        return Err(StructureError::Refused(
                            "its memory is 64-bit, shared or of a custom page size; only a plain \
                             32-bit memory is supported"
                                .into(),
                        ));
                    }
                    let bytes = memory.initial.saturating_mul(PAGE);
                    if bytes > limits.max_memory_bytes {
                        return Err(StructureError::Refused(format!(
                            "its memory starts with {bytes} bytes, above the agent's cap of {} \
                             bytes (runtime.max_memory_bytes)",
                            limits.max_memory_bytes
                        )));
                    }
                    shape.memory_bytes = bytes;
                }
            }
            Payload::GlobalSection(reader) => {
                check_count("globals", reader.count(), l.max_globals, "max_globals")?;
                shape.globals = reader.count();
                for global in reader {
                    let global = global.map_err(malformed)?;
                    let value = eval(&global.init_expr, &globals);
                    globals.push(if global.ty.mutable { None } else { value });
                }
            }
            Payload::ExportSection(reader) => {
                check_count("exports", reader.count(), l.max_exports, "max_exports")?;
            }
            Payload::ElementSection(reader) => {
                check_count(
                    "element segments",
                    reader.count(),
                    l.max_element_segments,
                    "max_element_segments",
                )?;
                for (index, element) in (0u32..).zip(reader) {
                    let element = element.map_err(malformed)?;
                    let count = match &element.items {
                        ElementItems::Functions(items) => items.count(),
                        ElementItems::Expressions(_, items) => items.count(),
                    };
                    shape.element_items += u64::from(count);
                    if shape.element_items > u64::from(l.max_element_items) {
                        return Err(too_many(
                            "element items over all segments",
                            shape.element_items,
                            l.max_element_items,
                            "max_element_items",
                        ));
                    }
                    if let ElementKind::Active {
                        table_index,
                        offset_expr,
                    } = &element.kind
                    {
                        if table_index.unwrap_or(0) != 0 {
                            return Err(StructureError::Refused(format!(
                                "element segment {index} names table {}; a module has one table",
                                table_index.unwrap_or(0)
                            )));
                        }
                        placements.push(Placement {
                            what: "element segment",
                            in_memory: false,
                            index,
                            offset: offset(offset_expr, &globals),
                            len: u64::from(count),
                        });
                    }
                }
            }
            Payload::DataSection(reader) => {
                check_count(
                    "data segments",
                    reader.count(),
                    l.max_data_segments,
                    "max_data_segments",
                )?;
                for (index, data) in (0u32..).zip(reader) {
                    let data = data.map_err(malformed)?;
                    shape.data_bytes += data.data.len() as u64;
                    if let DataKind::Active {
                        memory_index,
                        offset_expr,
                    } = &data.kind
                    {
                        if *memory_index != 0 {
                            return Err(StructureError::Refused(format!(
                                "data segment {index} names memory {memory_index}; a module has \
                                 one memory"
                            )));
                        }
                        placements.push(Placement {
                            what: "data segment",
                            in_memory: true,
                            index,
                            offset: offset(offset_expr, &globals),
                            len: data.data.len() as u64,
                        });
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                shape.code_bytes += body.range().len() as u64;
                let ty = func_types
                    .get(bodies)
                    .and_then(|t| usize::try_from(*t).ok());
                let params = ty.and_then(|t| type_params.get(t)).copied().unwrap_or(0);
                let results = ty.and_then(|t| type_results.get(t)).copied().unwrap_or(0);
                bodies += 1;
                let mut locals = u64::from(params);
                let reader = body.get_locals_reader().map_err(malformed)?;
                for group in reader {
                    let (count, _ty): (u32, ValType) = group.map_err(malformed)?;
                    locals += u64::from(count);
                    if locals > u64::from(l.max_locals) {
                        return Err(too_many(
                            "locals in one function",
                            locals,
                            l.max_locals,
                            "max_locals",
                        ));
                    }
                }
                let arity = |ty: wasmparser::BlockType, of: &[u32]| match ty {
                    wasmparser::BlockType::Empty => 0,
                    wasmparser::BlockType::Type(_) => 1,
                    wasmparser::BlockType::FuncType(t) => usize::try_from(t)
                        .ok()
                        .and_then(|t| of.get(t))
                        .copied()
                        .unwrap_or(0),
                };
                // The values each label carries: a loop's parameters, a block's results.
                let mut labels: Vec<u32> = vec![results];
                let mut ops = body.get_operators_reader().map_err(malformed)?;
                while !ops.eof() {
                    // wasmparser's operator visitor does not check this itself (its own loop
                    // does), and wasmi's translator asserts it: refuse before either sees it.
                    if labels.is_empty() {
                        return Err(StructureError::Malformed(format!(
                            "function body {}: operators after its end (offset {})",
                            bodies - 1,
                            ops.original_position()
                        )));
                    }
                    let moved = match ops.read().map_err(malformed)? {
                        Operator::Block { blockty } | Operator::If { blockty } => {
                            labels.push(arity(blockty, &type_results));
                            0
                        }
                        Operator::Loop { blockty } => {
                            labels.push(arity(blockty, &type_params));
                            0
                        }
                        Operator::End => {
                            labels.pop();
                            0
                        }
                        Operator::Br { relative_depth } | Operator::BrIf { relative_depth } => {
                            label_values(&labels, relative_depth)
                        }
                        Operator::BrTable { targets } => {
                            u64::from(targets.len() + 1) * label_values(&labels, targets.default())
                        }
                        _ => 0,
                    };
                    shape.branch_values += moved;
                    if shape.branch_values > l.max_branch_values {
                        return Err(StructureError::TooMany {
                            what: "values moved by branches",
                            found: shape.branch_values,
                            limit: l.max_branch_values,
                            key: "max_branch_values",
                        });
                    }
                }
            }
            Payload::TagSection(_) => {
                return Err(StructureError::Refused(
                    "it uses exception handling (a tag section), which the engine does not support"
                        .into(),
                ));
            }
            _ => {}
        }
    }
    for p in placements {
        let (room, unit) = if p.in_memory {
            (shape.memory_bytes, "bytes of memory")
        } else {
            (shape.table_elements, "table entries")
        };
        let Some(offset) = p.offset else {
            return Err(StructureError::Refused(format!(
                "active {} {}: its offset is not a constant this agent can evaluate",
                p.what, p.index
            )));
        };
        if offset.checked_add(p.len).is_none_or(|end| end > room) {
            return Err(StructureError::Refused(format!(
                "active {} {} at offset {offset} of {} items lies outside the module's {room} {unit}",
                p.what, p.index, p.len
            )));
        }
    }
    Ok(shape)
}

/// The values a branch to `depth` moves: what its label carries, counted as at least one.
fn label_values(labels: &[u32], depth: u32) -> u64 {
    let at = usize::try_from(depth)
        .ok()
        .and_then(|d| labels.len().checked_sub(d + 1));
    u64::from(at.and_then(|i| labels.get(i)).copied().unwrap_or(0).max(1))
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The offset of an active segment as an unsigned 32-bit value.
fn offset(expr: &wasmparser::ConstExpr<'_>, globals: &[Option<i64>]) -> Option<u64> {
    // Offsets into 32-bit memories and tables are i32 values read as unsigned.
    #[allow(clippy::cast_possible_truncation)]
    eval(expr, globals).map(|v| u64::from(v as u32))
}

/// Evaluates a constant expression of integer constants, `global.get` of immutable module
/// globals and (extended-const) integer add, sub and mul; anything else is `None`.
fn eval(expr: &wasmparser::ConstExpr<'_>, globals: &[Option<i64>]) -> Option<i64> {
    let mut stack: Vec<i64> = Vec::with_capacity(4);
    let mut ops = expr.get_operators_reader();
    // A constant expression of more than a few operators is not an offset a compiler writes.
    for _ in 0..64 {
        let op = ops.read().ok()?;
        // i32 arithmetic wraps at 32 bits; the narrowing casts are the point.
        #[allow(clippy::cast_possible_truncation)]
        match op {
            Operator::End => return if stack.len() == 1 { stack.pop() } else { None },
            Operator::I32Const { value } => stack.push(i64::from(value)),
            Operator::I64Const { value } => stack.push(value),
            Operator::GlobalGet { global_index } => {
                stack.push((*globals.get(usize::try_from(global_index).ok()?)?)?);
            }
            Operator::I32Add | Operator::I32Sub | Operator::I32Mul => {
                let (b, a) = (stack.pop()? as i32, stack.pop()? as i32);
                stack.push(i64::from(match op {
                    Operator::I32Add => a.wrapping_add(b),
                    Operator::I32Sub => a.wrapping_sub(b),
                    _ => a.wrapping_mul(b),
                }));
            }
            Operator::I64Add | Operator::I64Sub | Operator::I64Mul => {
                let (b, a) = (stack.pop()?, stack.pop()?);
                stack.push(match op {
                    Operator::I64Add => a.wrapping_add(b),
                    Operator::I64Sub => a.wrapping_sub(b),
                    _ => a.wrapping_mul(b),
                });
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    fn scan_wat(wat: &str) -> Result<Shape, StructureError> {
        scan(&wasm(wat), &WasmLimits::default())
    }

    /// The Wasm header followed by raw section bytes.
    fn raw(sections: &[u8]) -> Vec<u8> {
        let mut bytes = crate::engine::WASM_HEADER.to_vec();
        bytes.extend_from_slice(sections);
        bytes
    }

    #[test]
    fn operators_after_the_end_of_a_body_are_refused_before_translation() {
        // (func (param i32) end local.get 0 end): found by the check_wasm fuzzer; wasmparser's
        // visitor lets the local.get through and wasmi's translator asserts on it.
        let bytes = raw(&[
            0x01, 0x05, 0x01, 0x60, 0x01, 0x7f, 0x00, // type (func (param i32))
            0x03, 0x02, 0x01, 0x00, // one function of type 0
            0x0a, 0x07, 0x01, 0x05, 0x00, 0x0b, 0x20, 0x00, 0x0b, // its body
        ]);
        let err = scan(&bytes, &WasmLimits::default()).unwrap_err();
        assert!(
            matches!(&err, StructureError::Malformed(m) if m.contains("after its end")),
            "{err:?}"
        );
        assert!(crate::engine::check(&bytes, &WasmLimits::default()).is_err());
    }

    #[test]
    fn a_second_table_or_memory_section_of_any_count_is_refused() {
        for id in [0x04u8, 0x05] {
            let first: &[u8] = if id == 0x04 {
                &[0x04, 0x04, 0x01, 0x70, 0x00, 0x00] // one table of 0 funcref
            } else {
                &[0x05, 0x03, 0x01, 0x00, 0x00] // one memory of 0 pages
            };
            let mut sections = first.to_vec();
            // A second section claiming u32::MAX entries, with none present.
            sections.extend_from_slice(&[id, 0x05, 0xff, 0xff, 0xff, 0xff, 0x0f]);
            let err = scan(&raw(&sections), &WasmLimits::default()).unwrap_err();
            assert!(
                matches!(&err, StructureError::Refused(m) if m.contains("4294967295")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn a_plain_module_is_measured() {
        let shape = scan_wat(
            r#"(module
                 (import "edge" "log" (func (param i32 i32 i32) (result i32)))
                 (memory (export "memory") 2)
                 (table 4 funcref)
                 (global i32 (i32.const 8))
                 (elem (i32.const 1) 0 1)
                 (data (i32.const 16) "hello")
                 (func (result i32) (local i32 i64) i32.const 0))"#,
        )
        .unwrap();
        assert_eq!(
            shape,
            Shape {
                imports: 1,
                functions: 1,
                globals: 1,
                table_elements: 4,
                memory_bytes: 2 * PAGE,
                element_items: 2,
                data_bytes: 5,
                code_bytes: shape.code_bytes,
                branch_values: 0,
            }
        );
    }

    #[test]
    fn counts_above_their_limits_are_refused_naming_the_limit() {
        let limits = WasmLimits {
            structure: StructureLimits {
                max_functions: 2,
                max_globals: 1,
                max_locals: 3,
                max_element_items: 2,
                max_params: 2,
                max_imports: 1,
                max_branch_values: 19,
                ..StructureLimits::default()
            },
            ..WasmLimits::default()
        };
        let cases = [
            ("(module (func) (func) (func))", "max_functions"),
            (
                r#"(module (import "edge" "a" (func)) (import "edge" "b" (func)))"#,
                "max_imports",
            ),
            (
                r#"(module (import "edge" "a" (func)) (func) (func))"#,
                "max_functions",
            ),
            (
                "(module (global i32 (i32.const 0)) (global i32 (i32.const 0)))",
                "max_globals",
            ),
            ("(module (func (local i32 i32 i32 i32)))", "max_locals"),
            (
                "(module (func (param i32 i32) (local i32 i32)))",
                "max_locals",
            ),
            (
                "(module (func $f) (elem func $f $f) (elem func $f))",
                "max_element_items",
            ),
            ("(module (type (func (param i32 i32 i32))))", "max_params"),
            (
                "(module (func (block (result i32 i32) i32.const 0 i32.const 0 \
                 i32.const 0 br_table 0 0 0 0 0 0 0 0 0 0) drop drop))",
                "max_branch_values",
            ),
        ];
        for (wat, key) in cases {
            match scan(&wasm(wat), &limits) {
                Err(StructureError::TooMany { key: k, .. }) if k == key => {}
                other => panic!("{wat}: expected {key}, got {other:?}"),
            }
        }
    }

    #[test]
    fn what_would_fail_at_instantiation_is_refused_here() {
        let limits = WasmLimits {
            max_table_elements: 10,
            max_memory_bytes: 2 * PAGE,
            ..WasmLimits::default()
        };
        let cases = [
            ("(module (memory 1) (memory 1))", "memories"),
            ("(module (table 1 funcref) (table 1 funcref))", "tables"),
            ("(module (table 11 funcref))", "max_table_elements"),
            ("(module (memory 3))", "max_memory_bytes"),
            (
                r#"(module (memory 1) (data (i32.const 65535) "ab"))"#,
                "outside",
            ),
            (
                r#"(module (memory 1) (data (i32.const -1) "a"))"#,
                "outside",
            ),
            (
                "(module (func $f) (table 2 funcref) (elem (i32.const 1) $f $f))",
                "outside",
            ),
            (r#"(module (data (i32.const 0) "a"))"#, "outside"),
            (
                r#"(module (import "env" "m" (memory 1)))"#,
                "not a function",
            ),
            (
                r#"(module (import "env" "g" (global i32)))"#,
                "not a function",
            ),
            (
                r#"(module (global $g (mut i32) (i32.const 0)) (memory 1)
                     (data (global.get $g) "a"))"#,
                "not a constant",
            ),
        ];
        for (wat, needle) in cases {
            match scan(&wasm(wat), &limits) {
                Err(e) if e.to_string().contains(needle) => {}
                other => panic!("{wat}: expected {needle:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn constant_offsets_follow_globals_and_extended_const() {
        let ok = r#"(module (memory 1)
              (global $base i32 (i32.const 100))
              (global $end i32 (i32.add (global.get $base) (i32.const 10)))
              (data (global.get $end) "x")
              (data (i32.sub (i32.const 65536) (i32.const 1)) "y"))"#;
        assert_eq!(scan_wat(ok).unwrap().data_bytes, 2);
        let over = r#"(module (memory 1)
              (global $base i32 (i32.const 65530))
              (data (i32.add (global.get $base) (i32.const 6)) "z"))"#;
        assert!(scan_wat(over).is_err());
    }

    #[test]
    fn huge_declared_counts_are_refused_from_the_header_alone() {
        // A function section that claims 2^32-1 entries and holds none: refused on the count.
        let mut bytes = b"\0asm\x01\0\0\0".to_vec();
        bytes.extend_from_slice(&[0x03, 0x05, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            scan(&bytes, &WasmLimits::default()),
            Err(StructureError::TooMany {
                key: "max_functions",
                ..
            })
        ));
    }
}
