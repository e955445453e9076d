//! The sandboxed module runtime: one wasmi engine; per module its own store with a fuel budget per
//! call, a memory cap, one memory, one table and one instance; host ABI v1 linked only as the
//! manifest grants it. A guest call ends in an [`Outcome`] — a value, never an agent error.
//!
//! - [`Runtime::prepare`] compiles and checks a module against its manifest (imports granted,
//!   exports well typed, initial memory under the cap); every refusal names the import or export.
//! - [`Runtime::instantiate`] makes a fresh [`ModuleInstance`]; a restart is a new instance.
//! - `runner` drives instances on blocking threads with restart backoff and quarantine.

pub mod host;
pub mod kv;
pub mod limiter;
mod linker;
pub mod runner;

use std::fmt;
use std::sync::Arc;

use edge_abi::{export, limits};
use serde::{Deserialize, Serialize};
use wasmi::{Memory, Store, TrapCode, TypedFunc};

use self::host::{
    Abort, Clock, Hardware, HostCounters, HostLimits, HostState, KvStoreDebug, LogLine, OutMessage,
    Refusal,
};
use self::limiter::GuestLimiter;
use crate::core::manifest::Manifest;
use crate::hal::Board;

/// Wasm page size.
const PAGE: u64 = 65536;

/// The agent's own maxima; a manifest's limits are clamped by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Most fuel any one guest call may have.
    pub max_fuel_per_call: u64,
    /// Largest linear memory any module may have, in bytes.
    pub max_memory_bytes: u64,
    /// Most entries in a module's table.
    pub max_table_elements: u32,
    /// Largest key-value quota any module may have, in bytes.
    pub max_kv_quota_bytes: u64,
    /// Shortest tick period, in milliseconds.
    pub min_tick_interval_ms: u64,
    /// Rates and per-call bounds on host calls.
    pub host: HostLimits,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_fuel_per_call: 100_000_000,
            max_memory_bytes: 64 << 20,
            max_table_elements: 10_000,
            max_kv_quota_bytes: 1 << 20,
            min_tick_interval_ms: 10,
            host: HostLimits::default(),
        }
    }
}

/// A module's limits after clamping by the agent's maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveLimits {
    /// Fuel per guest call.
    pub fuel_per_call: u64,
    /// Memory cap in bytes.
    pub memory_max_bytes: u64,
    /// Tick period in milliseconds; 0 = never ticked.
    pub tick_interval_ms: u64,
    /// Key-value quota in bytes; 0 = no key-value store.
    pub kv_quota_bytes: u64,
}

impl RuntimeConfig {
    /// Clamps a manifest's limits by this configuration.
    pub fn clamp(&self, m: &Manifest) -> EffectiveLimits {
        let tick = m.limits.tick_interval_ms;
        EffectiveLimits {
            fuel_per_call: m.limits.fuel_per_call.min(self.max_fuel_per_call),
            memory_max_bytes: m.limits.memory_max_bytes.min(self.max_memory_bytes),
            tick_interval_ms: if tick == 0 {
                0
            } else {
                tick.max(self.min_tick_interval_ms)
            },
            kv_quota_bytes: m.caps.kv_quota_bytes.min(self.max_kv_quota_bytes),
        }
    }
}

/// Why a module cannot be installed (or instantiated). Each names the module and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    /// The Wasm does not compile.
    #[error("module {module:?}: the Wasm does not compile: {reason}")]
    Compile {
        /// Module name.
        module: String,
        /// Compiler message.
        reason: String,
    },
    /// An import is unknown, ungranted or of the wrong type.
    #[error("module {module:?}: refused import {import}: {reason}")]
    RefusedImport {
        /// Module name.
        module: String,
        /// `module.name` of the import.
        import: String,
        /// Why.
        reason: String,
    },
    /// A required export is missing or an export has the wrong type.
    #[error("module {module:?}: export {export:?}: {reason}")]
    BadExport {
        /// Module name.
        module: String,
        /// The export.
        export: String,
        /// Why.
        reason: String,
    },
    /// The module's initial memory is above its cap.
    #[error(
        "module {module:?}: memory refused: it starts with {initial} bytes, above its cap of {cap} bytes"
    )]
    MemoryRefused {
        /// Module name.
        module: String,
        /// Initial memory in bytes.
        initial: u64,
        /// The cap.
        cap: u64,
    },
    /// The manifest grants hardware this device does not offer (or could not open).
    #[error("module {module:?}: hardware refused: {reason}")]
    Hardware {
        /// Module name.
        module: String,
        /// Which resource and why.
        reason: String,
    },
    /// Instantiation failed.
    #[error("module {module:?}: instantiation failed: {reason}")]
    Instantiate {
        /// Module name.
        module: String,
        /// Why.
        reason: String,
    },
}

/// How a guest call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Returned 0.
    Finished,
    /// Returned a non-zero code: the module reports a failure.
    Failed {
        /// The code.
        code: i32,
    },
    /// A Wasm trap.
    Trapped {
        /// The trap.
        trap: String,
    },
    /// The fuel budget ran out.
    OutOfFuel {
        /// The budget.
        budget: u64,
    },
    /// A memory growth past the cap was refused.
    MemoryRefused {
        /// Bytes asked for.
        desired: u64,
        /// The cap.
        cap: u64,
    },
    /// The host ended the call (the guest broke the host contract).
    HostCallRefused {
        /// The call.
        call: String,
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// Whether the call finished normally.
    pub fn is_finished(&self) -> bool {
        matches!(self, Outcome::Finished)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Finished => f.write_str("finished"),
            Outcome::Failed { code } => write!(f, "failed: the module returned {code}"),
            Outcome::Trapped { trap } => write!(f, "trapped: {trap}"),
            Outcome::OutOfFuel { budget } => write!(f, "out of fuel (budget {budget})"),
            Outcome::MemoryRefused { desired, cap } => write!(
                f,
                "memory growth refused: {desired} bytes asked for, the cap is {cap} bytes"
            ),
            Outcome::HostCallRefused { call, reason } => {
                write!(f, "host call refused: {call}: {reason}")
            }
        }
    }
}

/// What one guest call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Fuel it burned.
    pub fuel_used: u64,
    /// Lines it logged.
    pub logs: Vec<LogLine>,
    /// Messages it published (relative topics).
    pub messages: Vec<OutMessage>,
    /// Host calls that returned an error code (the first few).
    pub refusals: Vec<Refusal>,
}

/// Why a message was not delivered; the module is not at fault and was not called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// The module exports no `on_message`.
    #[error("module {0:?} does not take messages (no on_message export)")]
    NoHandler(String),
    /// Topic or payload above the ABI's limits.
    #[error("module {module:?}: message refused: {reason}")]
    TooLarge {
        /// Module name.
        module: String,
        /// Which limit.
        reason: String,
    },
}

/// A compiled module that passed every install-time check.
#[derive(Debug, Clone)]
pub struct PreparedModule {
    name: String,
    module: wasmi::Module,
    publish: Vec<String>,
    hardware: Hardware,
    limits: EffectiveLimits,
}

impl PreparedModule {
    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its limits after clamping.
    pub fn limits(&self) -> EffectiveLimits {
        self.limits
    }

    /// Whether it exports `tick`.
    pub fn has_tick(&self) -> bool {
        self.module.get_export(export::TICK).is_some()
    }
}

/// The runtime: one engine and the agent's limits.
#[derive(Debug, Clone)]
pub struct Runtime {
    engine: wasmi::Engine,
    config: RuntimeConfig,
    clock: Arc<dyn Clock>,
    board: Arc<Board>,
}

impl Runtime {
    /// A runtime with its own engine (`crate::engine::new`) and the system clock.
    pub fn new(config: RuntimeConfig) -> Self {
        Runtime {
            engine: crate::engine::new(),
            config,
            clock: Arc::new(host::SystemClock),
            board: Arc::new(Board::empty()),
        }
    }

    /// The same engine, clock and board under other limits (a configuration reload): modules
    /// prepared from now on get them.
    pub fn with_config(&self, config: RuntimeConfig) -> Self {
        Runtime {
            config,
            ..self.clone()
        }
    }

    /// Gives modules the hardware on `board` (as their manifests grant it).
    pub fn with_board(mut self, board: Arc<Board>) -> Self {
        self.board = board;
        self
    }

    /// The board.
    pub fn board(&self) -> &Arc<Board> {
        &self.board
    }

    /// Replaces the clock modules see (`now_ms`, rate limits).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The engine (bundle verification validates Wasm against it).
    pub fn engine(&self) -> &wasmi::Engine {
        &self.engine
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Validates and compiles `wasm` and checks it against `manifest`: every import known, of the right type
    /// and granted; the ABI marker, memory and handler exports present and well typed; initial
    /// memory within the cap.
    pub fn prepare(
        &self,
        manifest: &Manifest,
        wasm: &[u8],
    ) -> Result<PreparedModule, InstallError> {
        let name = manifest.name.clone();
        let compile_error = |e: wasmi::Error| InstallError::Compile {
            module: name.clone(),
            reason: e.to_string(),
        };
        // The engine compiles lazily; validate everything now so that no invalid function is
        // ever installed, whoever the caller is.
        wasmi::Module::validate(&self.engine, wasm).map_err(compile_error)?;
        let module = wasmi::Module::new(&self.engine, wasm).map_err(compile_error)?;
        let limits = self.config.clamp(manifest);
        for import in module.imports() {
            linker::check_import(&name, &import, manifest)?;
        }
        linker::check_exports(&name, &module)?;
        self.board
            .check_grants(&manifest.caps)
            .map_err(|e| InstallError::Hardware {
                module: name.clone(),
                reason: format!("the manifest grants {e}"),
            })?;
        if let Some(wasmi::ExternType::Memory(mem)) = module.get_export(export::MEMORY) {
            let initial = mem.minimum().saturating_mul(PAGE);
            if initial > limits.memory_max_bytes {
                return Err(InstallError::MemoryRefused {
                    module: name,
                    initial,
                    cap: limits.memory_max_bytes,
                });
            }
        }
        Ok(PreparedModule {
            name,
            module,
            publish: manifest.caps.publish.clone(),
            hardware: Hardware::new(Arc::clone(&self.board), &manifest.caps),
            limits,
        })
    }

    /// A fresh instance of a prepared module. `kv` is the module's key-value store (required
    /// when the manifest grants a quota; the runtime refuses kv imports otherwise).
    pub fn instantiate(
        &self,
        prepared: &PreparedModule,
        kv: Option<Box<dyn KvStoreDebug>>,
    ) -> Result<ModuleInstance, InstallError> {
        let name = prepared.name.clone();
        let limiter = GuestLimiter::new(
            prepared.limits.memory_max_bytes,
            self.config.max_table_elements,
        );
        let state = HostState::new(
            prepared.publish.clone(),
            kv,
            Arc::clone(&self.clock),
            self.config.host,
            limiter,
        )
        .with_hardware(prepared.hardware.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        set_fuel(&mut store, prepared.limits.fuel_per_call);
        let linker = linker::linker_for(&name, &self.engine, &prepared.module)?;
        let fail = |reason: String| InstallError::Instantiate {
            module: name.clone(),
            reason,
        };
        let instance = linker
            .instantiate_and_start(&mut store, &prepared.module)
            .map_err(|e| match store.data().limiter.denied {
                Some(d) => InstallError::MemoryRefused {
                    module: name.clone(),
                    initial: d.desired,
                    cap: prepared.limits.memory_max_bytes,
                },
                None => fail(e.to_string()),
            })?;
        let memory = instance
            .get_memory(&store, export::MEMORY)
            .ok_or_else(|| fail("no memory export".into()))?;
        store.data_mut().memory = Some(memory);
        let func = |n: &str| instance.get_func(&store, n);
        let typed = |n: &str| -> Result<Option<TypedFunc<(), i32>>, InstallError> {
            func(n)
                .map(|f| f.typed::<(), i32>(&store))
                .transpose()
                .map_err(|e| fail(e.to_string()))
        };
        let init = typed(export::INIT)?;
        let tick = typed(export::TICK)?;
        let on_message = func(export::ON_MESSAGE)
            .map(|f| f.typed::<(i32, i32, i32, i32), i32>(&store))
            .transpose()
            .map_err(|e| fail(e.to_string()))?;
        let alloc = func(export::ALLOC)
            .map(|f| f.typed::<i32, i32>(&store))
            .transpose()
            .map_err(|e| fail(e.to_string()))?;
        Ok(ModuleInstance {
            name,
            store,
            instance,
            memory,
            init,
            tick,
            on_message,
            alloc,
            limits: prepared.limits,
            calls: 0,
            fuel_last: 0,
            fuel_total: 0,
        })
    }
}

fn set_fuel(store: &mut Store<HostState>, fuel: u64) {
    // The runtime's engine always meters fuel (`crate::engine::new`); this cannot fail.
    store
        .set_fuel(fuel)
        .unwrap_or_else(|e| unreachable!("fuel metering is on: {e}"));
}

/// Per-instance figures for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InstanceStats {
    /// Guest calls made.
    pub calls: u64,
    /// Fuel the last call burned.
    pub fuel_last: u64,
    /// Fuel burned over all calls.
    pub fuel_total: u64,
    /// Linear memory in use, bytes.
    pub memory_bytes: u64,
    /// Key-value bytes in use.
    pub kv_bytes: u64,
    /// Host call counters.
    pub host: HostCounters,
}

/// A running instance of one module.
#[derive(Debug)]
pub struct ModuleInstance {
    name: String,
    store: Store<HostState>,
    instance: wasmi::Instance,
    memory: Memory,
    init: Option<TypedFunc<(), i32>>,
    tick: Option<TypedFunc<(), i32>>,
    on_message: Option<TypedFunc<(i32, i32, i32, i32), i32>>,
    alloc: Option<TypedFunc<i32, i32>>,
    limits: EffectiveLimits,
    calls: u64,
    fuel_last: u64,
    fuel_total: u64,
}

impl ModuleInstance {
    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its limits.
    pub fn limits(&self) -> EffectiveLimits {
        self.limits
    }

    /// Whether it exports `tick`.
    pub fn has_tick(&self) -> bool {
        self.tick.is_some()
    }

    /// Ends the instance, handing back its key-value store for the next one.
    pub fn into_kv(self) -> Option<Box<dyn KvStoreDebug>> {
        self.store.into_data().into_kv()
    }

    /// Figures for status reports.
    pub fn stats(&self) -> InstanceStats {
        InstanceStats {
            calls: self.calls,
            fuel_last: self.fuel_last,
            fuel_total: self.fuel_total,
            memory_bytes: self.memory.data_size(&self.store) as u64,
            kv_bytes: self.store.data().kv_used_bytes(),
            host: self.store.data().counters,
        }
    }

    /// Calls `init` (a module without one is ready at once).
    pub fn init(&mut self) -> CallReport {
        let f = self.init;
        self.call(|store| f.map_or(Ok(0), |f| f.call(store, ())))
    }

    /// Calls `tick` (a module without one does nothing).
    pub fn tick(&mut self) -> CallReport {
        let f = self.tick;
        self.call(|store| f.map_or(Ok(0), |f| f.call(store, ())))
    }

    /// Hands a message to `on_message`: topic (relative to the module's inbox) and payload are
    /// placed in guest memory through `edge_alloc`, all within one fuel budget.
    pub fn deliver(&mut self, topic: &str, payload: &[u8]) -> Result<CallReport, DeliverError> {
        let (Some(on_message), Some(alloc)) = (self.on_message, self.alloc) else {
            return Err(DeliverError::NoHandler(self.name.clone()));
        };
        let too_large = |reason: String| DeliverError::TooLarge {
            module: self.name.clone(),
            reason,
        };
        if topic.len() > limits::TOPIC_MAX as usize {
            return Err(too_large(format!(
                "topic longer than {} bytes",
                limits::TOPIC_MAX
            )));
        }
        if payload.len() > limits::PAYLOAD_MAX as usize {
            return Err(too_large(format!(
                "payload larger than {} bytes",
                limits::PAYLOAD_MAX
            )));
        }
        let memory = self.memory;
        Ok(self.call(|store| {
            let (tp, tl) = place(store, memory, alloc, topic.as_bytes())?;
            let (pp, pl) = place(store, memory, alloc, payload)?;
            on_message.call(store, (tp, tl, pp, pl))
        }))
    }

    /// Calls another export taking one `i32` (benchmarks and tests drive modules this way), under
    /// the same fuel budget and outcome rules; returns the report and the value it returned. An
    /// `i32` result other than 0 is *not* a failure here: the caller interprets it.
    pub fn call_export(&mut self, name: &str, arg: i32) -> Option<(CallReport, i64)> {
        let func = self.instance.get_func(&self.store, name)?;
        let mut result = [wasmi::Val::I64(0)];
        let ty = func.ty(&self.store);
        if ty.params() != [wasmi::ValType::I32] || ty.results().len() != 1 {
            return None;
        }
        let mut value = 0;
        let report = self.call(|store| {
            func.call(&mut *store, &[wasmi::Val::I32(arg)], &mut result)?;
            value = match result[0] {
                wasmi::Val::I32(v) => i64::from(v),
                wasmi::Val::I64(v) => v,
                _ => 0,
            };
            Ok(0)
        });
        Some((report, value))
    }

    fn call(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>) -> Result<i32, wasmi::Error>,
    ) -> CallReport {
        let budget = self.limits.fuel_per_call;
        self.store.data_mut().begin_call();
        set_fuel(&mut self.store, budget);
        let result = f(&mut self.store);
        let fuel_used = budget.saturating_sub(self.store.get_fuel().unwrap_or(0));
        self.calls += 1;
        self.fuel_last = fuel_used;
        self.fuel_total = self.fuel_total.saturating_add(fuel_used);
        let state = self.store.data_mut();
        let outcome = match result {
            Ok(0) => Outcome::Finished,
            Ok(code) => Outcome::Failed { code },
            Err(e) => classify(&e, state, budget),
        };
        CallReport {
            outcome,
            fuel_used,
            logs: std::mem::take(&mut state.logs),
            messages: std::mem::take(&mut state.messages),
            refusals: std::mem::take(&mut state.refusals),
        }
    }
}

/// Copies `bytes` into guest memory at a buffer the guest allocates; an empty slice needs none.
fn place(
    store: &mut Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    bytes: &[u8],
) -> Result<(i32, i32), wasmi::Error> {
    // Lengths were checked against the ABI limits, far below i32::MAX.
    let len = i32::try_from(bytes.len()).map_err(|_| wasmi::Error::new("length above i32"))?;
    if len == 0 {
        return Ok((0, 0));
    }
    let ptr = alloc.call(&mut *store, len)?;
    let refused = |reason: String| {
        wasmi::Error::host(Abort {
            call: export::ALLOC,
            reason,
        })
    };
    if ptr == 0 {
        return Err(refused(format!("could not allocate {len} bytes")));
    }
    let mem = memory.data_mut(&mut *store);
    let range = host::range(mem, ptr, len, u32::MAX, "allocation")
        .map_err(|(_, reason)| refused(format!("returned a bad buffer: {reason}")))?;
    mem[range].copy_from_slice(bytes);
    Ok((ptr, len))
}

fn classify(e: &wasmi::Error, state: &HostState, budget: u64) -> Outcome {
    if let Some(abort) = e.downcast_ref::<Abort>() {
        return Outcome::HostCallRefused {
            call: abort.call.to_string(),
            reason: abort.reason.clone(),
        };
    }
    if let Some(denied) = state.limiter.denied {
        return Outcome::MemoryRefused {
            desired: denied.desired,
            cap: state.limiter.memory_cap,
        };
    }
    match e.as_trap_code() {
        Some(TrapCode::OutOfFuel) => Outcome::OutOfFuel { budget },
        Some(code) => Outcome::Trapped {
            trap: code.to_string(),
        },
        None => Outcome::Trapped {
            trap: e.to_string(),
        },
    }
}
