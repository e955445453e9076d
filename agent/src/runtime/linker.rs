//! Install-time checks of a module's imports and exports against ABI v1 and its manifest, and the
//! wasmi linker that wires exactly the granted imports to `host::HostState::call`.
//!
//! Deny by default: an import is linked only if it is in ABI v1, has ABI v1's type, and the
//! manifest grants its capability; anything else refuses the module, naming the import.

use edge_abi::{IMPORT_MODULE, export, import};
use wasmi::{Caller, Engine, ExternType, FuncType, ImportType, Linker, Module, ValType};

use super::InstallError;
use super::host::{HostCall, HostState};
use crate::core::manifest::Manifest;

use ValType::{I32, I64};

/// What an import needs from the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Always,
    Publish,
    Kv,
    Gpio,
    I2c,
    Spi,
}

/// ABI v1's imports: name, parameter and result types, and the capability each needs.
const IMPORTS: &[(&str, &[ValType], &[ValType], Grant)] = &[
    (import::LOG, &[I32, I32, I32], &[I32], Grant::Always),
    (import::NOW_MS, &[], &[I64], Grant::Always),
    (import::RANDOM, &[I32, I32], &[I32], Grant::Always),
    (import::DELAY_US, &[I32], &[I32], Grant::Always),
    (
        import::PUBLISH,
        &[I32, I32, I32, I32],
        &[I32],
        Grant::Publish,
    ),
    (import::KV_GET, &[I32, I32, I32, I32], &[I32], Grant::Kv),
    (import::KV_SET, &[I32, I32, I32, I32], &[I32], Grant::Kv),
    (import::KV_DELETE, &[I32, I32], &[I32], Grant::Kv),
    (import::GPIO_SET, &[I32, I32], &[I32], Grant::Gpio),
    (import::GPIO_GET, &[I32], &[I32], Grant::Gpio),
    (import::I2C_WRITE, &[I32, I32, I32, I32], &[I32], Grant::I2c),
    (import::I2C_READ, &[I32, I32, I32, I32], &[I32], Grant::I2c),
    (
        import::I2C_WRITE_READ,
        &[I32, I32, I32, I32, I32, I32],
        &[I32],
        Grant::I2c,
    ),
    (
        import::SPI_TRANSFER,
        &[I32, I32, I32, I32, I32],
        &[I32],
        Grant::Spi,
    ),
];

fn describe(params: &[ValType], results: &[ValType]) -> String {
    format!("{params:?} -> {results:?}")
}

/// Checks one import.
pub(super) fn check_import(
    module: &str,
    imp: &ImportType<'_>,
    manifest: &Manifest,
) -> Result<(), InstallError> {
    let refuse = |reason: String| InstallError::RefusedImport {
        module: module.to_string(),
        import: format!("{}.{}", imp.module(), imp.name()),
        reason,
    };
    if imp.module() != IMPORT_MODULE {
        return Err(refuse(format!(
            "unknown import module; host ABI v1 imports live under {IMPORT_MODULE:?}"
        )));
    }
    let ExternType::Func(ty) = imp.ty() else {
        return Err(refuse(
            "only functions may be imported (the module must define and export its own memory)"
                .into(),
        ));
    };
    let Some(&(_, params, results, grant)) = IMPORTS.iter().find(|(n, ..)| *n == imp.name()) else {
        return Err(refuse("unknown import: not part of host ABI v1".into()));
    };
    if ty.params() != params || ty.results() != results {
        return Err(refuse(format!(
            "has type {}, host ABI v1 defines {}",
            describe(ty.params(), ty.results()),
            describe(params, results)
        )));
    }
    match grant {
        Grant::Publish if manifest.caps.publish.is_empty() => Err(refuse(
            "the manifest grants no capability for it (caps.publish is empty)".into(),
        )),
        Grant::Kv if manifest.caps.kv_quota_bytes == 0 => Err(refuse(
            "the manifest grants no capability for it (caps.kv_quota_bytes is 0)".into(),
        )),
        Grant::Gpio if manifest.caps.gpio.is_empty() => Err(refuse(
            "the manifest grants no capability for it (caps.gpio is empty)".into(),
        )),
        Grant::I2c if manifest.caps.i2c.is_empty() => Err(refuse(
            "the manifest grants no capability for it (caps.i2c is empty)".into(),
        )),
        Grant::Spi if manifest.caps.spi.is_empty() => Err(refuse(
            "the manifest grants no capability for it (caps.spi is empty)".into(),
        )),
        _ => Ok(()),
    }
}

/// Checks the ABI marker, the memory and the handler exports.
pub(super) fn check_exports(module: &str, m: &Module) -> Result<(), InstallError> {
    let bad = |export: &str, reason: String| InstallError::BadExport {
        module: module.to_string(),
        export: export.to_string(),
        reason,
    };
    let func_type = |name: &str| match m.get_export(name) {
        None => Ok(None),
        Some(ExternType::Func(ty)) => Ok(Some(ty)),
        Some(_) => Err(bad(name, "is not a function".into())),
    };
    let expect = |name: &str, ty: &FuncType, params: &[ValType], results: &[ValType]| {
        if ty.params() == params && ty.results() == results {
            Ok(())
        } else {
            Err(bad(
                name,
                format!(
                    "has type {}, host ABI v1 expects {}",
                    describe(ty.params(), ty.results()),
                    describe(params, results)
                ),
            ))
        }
    };
    match func_type(export::ABI_MARKER)? {
        Some(ty) => expect(export::ABI_MARKER, &ty, &[], &[])?,
        None => {
            return Err(bad(
                export::ABI_MARKER,
                "missing: this is not a host ABI v1 module (build it with the edge SDK or export \
                 an empty function of that name)"
                    .into(),
            ));
        }
    }
    if !matches!(m.get_export(export::MEMORY), Some(ExternType::Memory(_))) {
        return Err(bad(
            export::MEMORY,
            "missing: the module must export its linear memory".into(),
        ));
    }
    for name in [export::INIT, export::TICK] {
        if let Some(ty) = func_type(name)? {
            expect(name, &ty, &[], &[I32])?;
        }
    }
    if let Some(ty) = func_type(export::ON_MESSAGE)? {
        expect(export::ON_MESSAGE, &ty, &[I32, I32, I32, I32], &[I32])?;
        match func_type(export::ALLOC)? {
            Some(ty) => expect(export::ALLOC, &ty, &[I32], &[I32])?,
            None => {
                return Err(bad(
                    export::ALLOC,
                    "missing: a module with on_message must export edge_alloc".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Runs a host call with the store's fuel in the host state's meter, so the call is charged by
/// its work (and can end the guest call when the fuel or the deadline runs out).
fn host(caller: &mut Caller<'_, HostState>, call: HostCall) -> Result<i64, wasmi::Error> {
    let memory = caller
        .data()
        .memory
        .ok_or_else(|| wasmi::Error::new("host call before the instance was ready"))?;
    let fuel = caller.get_fuel()?;
    let (mem, state) = memory.data_and_store_mut(&mut *caller);
    state.meter.store = fuel;
    let result = state.call(mem, call);
    let left = state.meter.store;
    caller.set_fuel(left)?;
    result.map_err(wasmi::Error::host)
}

/// Narrows a host result that is an ABI return code (always within i32).
fn code(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(edge_abi::err::UNAVAILABLE)
}

/// A linker defining exactly the imports `module` has (all checked by `check_import`).
pub(super) fn linker_for(
    name: &str,
    engine: &Engine,
    module: &Module,
) -> Result<Linker<HostState>, InstallError> {
    let mut linker = Linker::<HostState>::new(engine);
    let mut defined: Vec<&str> = Vec::new();
    for imp in module.imports() {
        if defined.contains(&imp.name()) {
            continue;
        }
        defined.push(imp.name());
        let m = IMPORT_MODULE;
        let result = match imp.name() {
            import::LOG => linker.func_wrap(
                m,
                import::LOG,
                |mut c: Caller<'_, HostState>, l: i32, p: i32, n: i32| {
                    host(&mut c, HostCall::Log(l, p, n)).map(code)
                },
            ),
            import::NOW_MS => {
                linker.func_wrap(m, import::NOW_MS, |mut c: Caller<'_, HostState>| {
                    host(&mut c, HostCall::NowMs)
                })
            }
            import::RANDOM => linker.func_wrap(
                m,
                import::RANDOM,
                |mut c: Caller<'_, HostState>, p: i32, n: i32| {
                    host(&mut c, HostCall::Random(p, n)).map(code)
                },
            ),
            import::PUBLISH => linker.func_wrap(
                m,
                import::PUBLISH,
                |mut c: Caller<'_, HostState>, tp: i32, tl: i32, pp: i32, pl: i32| {
                    host(&mut c, HostCall::Publish(tp, tl, pp, pl)).map(code)
                },
            ),
            import::KV_GET => linker.func_wrap(
                m,
                import::KV_GET,
                |mut c: Caller<'_, HostState>, kp: i32, kl: i32, bp: i32, bc: i32| {
                    host(&mut c, HostCall::KvGet(kp, kl, bp, bc)).map(code)
                },
            ),
            import::KV_SET => linker.func_wrap(
                m,
                import::KV_SET,
                |mut c: Caller<'_, HostState>, kp: i32, kl: i32, vp: i32, vl: i32| {
                    host(&mut c, HostCall::KvSet(kp, kl, vp, vl)).map(code)
                },
            ),
            import::KV_DELETE => linker.func_wrap(
                m,
                import::KV_DELETE,
                |mut c: Caller<'_, HostState>, kp: i32, kl: i32| {
                    host(&mut c, HostCall::KvDelete(kp, kl)).map(code)
                },
            ),
            import::DELAY_US => linker.func_wrap(
                m,
                import::DELAY_US,
                |mut c: Caller<'_, HostState>, us: i32| {
                    host(&mut c, HostCall::DelayUs(us)).map(code)
                },
            ),
            import::GPIO_SET => linker.func_wrap(
                m,
                import::GPIO_SET,
                |mut c: Caller<'_, HostState>, line: i32, v: i32| {
                    host(&mut c, HostCall::GpioSet(line, v)).map(code)
                },
            ),
            import::GPIO_GET => linker.func_wrap(
                m,
                import::GPIO_GET,
                |mut c: Caller<'_, HostState>, line: i32| {
                    host(&mut c, HostCall::GpioGet(line)).map(code)
                },
            ),
            import::I2C_WRITE => linker.func_wrap(
                m,
                import::I2C_WRITE,
                |mut c: Caller<'_, HostState>, b: i32, a: i32, p: i32, n: i32| {
                    host(&mut c, HostCall::I2cWrite(b, a, p, n)).map(code)
                },
            ),
            import::I2C_READ => linker.func_wrap(
                m,
                import::I2C_READ,
                |mut c: Caller<'_, HostState>, b: i32, a: i32, p: i32, n: i32| {
                    host(&mut c, HostCall::I2cRead(b, a, p, n)).map(code)
                },
            ),
            import::I2C_WRITE_READ => linker.func_wrap(
                m,
                import::I2C_WRITE_READ,
                |mut c: Caller<'_, HostState>,
                 b: i32,
                 a: i32,
                 wp: i32,
                 wn: i32,
                 rp: i32,
                 rn: i32| {
                    host(&mut c, HostCall::I2cWriteRead(b, a, wp, wn, rp, rn)).map(code)
                },
            ),
            import::SPI_TRANSFER => linker.func_wrap(
                m,
                import::SPI_TRANSFER,
                |mut c: Caller<'_, HostState>, b: i32, cs: i32, wp: i32, rp: i32, n: i32| {
                    host(&mut c, HostCall::SpiTransfer(b, cs, wp, rp, n)).map(code)
                },
            ),
            _ => continue,
        };
        result.map_err(|e| InstallError::Instantiate {
            module: name.to_string(),
            reason: format!("cannot link {}: {e}", imp.name()),
        })?;
    }
    Ok(linker)
}
