//! The sandboxed module runtime: per module its own wasmi engine and store, a fuel budget and a
//! wall-clock deadline per call, a memory cap, one memory, one table and one instance; host ABI
//! v1 linked only as the manifest grants it. A guest call ends in an [`Outcome`] — a value, never
//! an agent error.
//!
//! - [`Runtime::prepare`] compiles a module that passed [`crate::engine::check`] and checks it
//!   against its manifest (imports granted, exports well typed, initial memory under the cap);
//!   every refusal names the import or export.
//! - [`Runtime::instantiate`] makes a fresh [`ModuleInstance`]; a restart is a new instance.
//! - `runner` drives instances on blocking threads with restart backoff and quarantine.

pub mod fuel;
pub mod host;
pub mod kv;
pub mod limiter;
mod linker;
pub mod runner;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use edge_abi::{export, limits};
use serde::{Deserialize, Serialize};
use wasmi::{Memory, Store, TrapCode, TypedFunc, TypedResumableCall, WasmParams, WasmResults};

use self::fuel::Stop;
use self::host::{
    Abort, Clock, Ended, Hardware, HostCounters, HostLimits, HostState, KvStoreDebug, LogLine,
    OutMessage, Refusal,
};
use self::limiter::GuestLimiter;
use crate::core::manifest::Manifest;
use crate::engine::{CheckedWasm, StructureLimits, WasmLimits};
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
    /// Wall-clock deadline of an `init` call, milliseconds.
    pub init_deadline_ms: u64,
    /// Wall-clock deadline of a `tick` or `on_message` call, milliseconds.
    pub call_deadline_ms: u64,
    /// Rates and per-call bounds on host calls.
    pub host: HostLimits,
    /// Limits on a module's structure (functions, imports, globals, segments, ...).
    pub structure: StructureLimits,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_fuel_per_call: 100_000_000,
            max_memory_bytes: 64 << 20,
            max_table_elements: 10_000,
            max_kv_quota_bytes: 1 << 20,
            min_tick_interval_ms: 10,
            init_deadline_ms: 5_000,
            call_deadline_ms: 1_000,
            host: HostLimits::default(),
            structure: StructureLimits::default(),
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
    /// The limits every module's structure is checked against ([`crate::engine::check`]).
    pub fn wasm_limits(&self) -> WasmLimits {
        WasmLimits {
            structure: self.structure,
            max_table_elements: self.max_table_elements,
            max_memory_bytes: self.max_memory_bytes,
        }
    }

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
    /// The Wasm fails [`crate::engine::check`]: not Wasm, a structure limit, invalid.
    #[error("module {module:?}: {source}")]
    Check {
        /// Module name.
        module: String,
        /// Why.
        source: crate::engine::CheckError,
    },
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
    /// The call's wall-clock deadline passed.
    DeadlineExceeded {
        /// The deadline, milliseconds.
        deadline_ms: u64,
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
            Outcome::DeadlineExceeded { deadline_ms } => {
                write!(f, "deadline exceeded ({deadline_ms} ms)")
            }
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
    /// One line summing up the refused host calls, for the agent's and the module's log; `None`
    /// when none were refused or the summaries' rate limit held it back.
    pub refusal_summary: Option<LogLine>,
    /// Key-value writes and deletes the call made.
    pub kv_writes: u32,
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

/// A compiled module that passed every install-time check, with its own engine (which holds the
/// code wasmi translates for it and goes away with the last clone).
#[derive(Debug, Clone)]
pub struct PreparedModule {
    name: String,
    engine: wasmi::Engine,
    module: wasmi::Module,
    /// The host functions its imports name, built once for every instance (restarts included).
    linker: Arc<wasmi::Linker<HostState>>,
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

/// The runtime: the agent's limits, the clock and the board modules see.
#[derive(Debug, Clone)]
pub struct Runtime {
    config: RuntimeConfig,
    clock: Arc<dyn Clock>,
    board: Arc<Board>,
}

impl Runtime {
    /// A runtime with the system clock and no hardware.
    pub fn new(config: RuntimeConfig) -> Self {
        Runtime {
            config,
            clock: Arc::new(host::SystemClock),
            board: Arc::new(Board::empty()),
        }
    }

    /// The same clock and board under other limits (a configuration reload): modules prepared
    /// from now on get them.
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

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Checks `wasm` ([`crate::engine::check`] against this runtime's limits), then prepares it
    /// ([`Runtime::prepare_checked`]): for Wasm that did not come through bundle verification
    /// (the store at start, `run-module`, tests).
    pub fn prepare(
        &self,
        manifest: &Manifest,
        wasm: &[u8],
    ) -> Result<PreparedModule, InstallError> {
        let checked = crate::engine::check(wasm, &self.config.wasm_limits()).map_err(|source| {
            InstallError::Check {
                module: manifest.name.clone(),
                source,
            }
        })?;
        self.prepare_checked(manifest, checked)
    }

    /// Compiles checked Wasm (lazily, in an engine of its own) and checks it against `manifest`:
    /// every import known, of the right type and granted; the ABI marker, memory and handler
    /// exports present and well typed; initial memory within the cap.
    pub fn prepare_checked(
        &self,
        manifest: &Manifest,
        wasm: CheckedWasm<'_>,
    ) -> Result<PreparedModule, InstallError> {
        let name = manifest.name.clone();
        let engine = crate::engine::runtime_engine();
        let module = crate::engine::compile(&engine, wasm).map_err(|e| InstallError::Compile {
            module: name.clone(),
            reason: e.to_string(),
        })?;
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
        let linker = Arc::new(linker::linker_for(&name, &engine, &module)?);
        Ok(PreparedModule {
            name,
            engine,
            module,
            linker,
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
        let mut store = Store::new(&prepared.engine, state);
        store.limiter(|s| &mut s.limiter);
        let fail = |reason: String| InstallError::Instantiate {
            module: name.clone(),
            reason,
        };
        let instance = prepared
            .linker
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
            init_deadline: Duration::from_millis(self.config.init_deadline_ms),
            call_deadline: Duration::from_millis(self.config.call_deadline_ms),
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
    init_deadline: Duration,
    call_deadline: Duration,
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

    /// Calls `init` (a module without one is ready at once), under the init deadline.
    pub fn init(&mut self) -> CallReport {
        let f = self.init;
        self.call(self.init_deadline, |store| {
            f.map_or(Ok(0), |f| run(store, f, ()))
        })
    }

    /// Calls `tick` (a module without one does nothing).
    pub fn tick(&mut self) -> CallReport {
        let f = self.tick;
        self.call(self.call_deadline, |store| {
            f.map_or(Ok(0), |f| run(store, f, ()))
        })
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
        Ok(self.call(self.call_deadline, |store| {
            let (tp, tl) = place(store, memory, alloc, topic.as_bytes())?;
            let (pp, pl) = place(store, memory, alloc, payload)?;
            run(store, on_message, (tp, tl, pp, pl))
        }))
    }

    /// Calls another export taking one `i32` (benchmarks and tests drive modules this way), under
    /// the same fuel budget and outcome rules; returns the report and the value it returned. An
    /// `i32` result other than 0 is *not* a failure here: the caller interprets it.
    pub fn call_export(&mut self, name: &str, arg: i32) -> Option<(CallReport, i64)> {
        let func = self.instance.get_func(&self.store, name)?;
        let narrow = func.typed::<i32, i32>(&self.store).ok();
        let wide = func.typed::<i32, i64>(&self.store).ok();
        if narrow.is_none() && wide.is_none() {
            return None;
        }
        let mut value = 0;
        let report = self.call(self.call_deadline, |store| {
            value = match (narrow, wide) {
                (Some(f), _) => i64::from(run(store, f, arg)?),
                (None, Some(f)) => run(store, f, arg)?,
                (None, None) => 0,
            };
            Ok(0)
        });
        Some((report, value))
    }

    fn call(
        &mut self,
        deadline: Duration,
        f: impl FnOnce(&mut Store<HostState>) -> Result<i32, wasmi::Error>,
    ) -> CallReport {
        let budget = self.limits.fuel_per_call;
        let state = self.store.data_mut();
        state.begin_call();
        let first = state.meter.begin(budget, deadline);
        set_fuel(&mut self.store, first);
        let result = f(&mut self.store);
        let left = self.store.get_fuel().unwrap_or(0);
        let state = self.store.data_mut();
        let fuel_used = state.meter.used(left);
        self.calls += 1;
        self.fuel_last = fuel_used;
        self.fuel_total = self.fuel_total.saturating_add(fuel_used);
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
            refusal_summary: state.refusal_summary(),
            refusals: std::mem::take(&mut state.refusals),
            kv_writes: state.kv_writes(),
        }
    }
}

/// Runs `f` to its end in fuel slices: whenever the store runs dry the deadline is checked and
/// the next slice of the call's budget handed over, so a guest that only computes is stopped
/// within one slice of its deadline.
fn run<P: WasmParams, R: WasmResults>(
    store: &mut Store<HostState>,
    f: TypedFunc<P, R>,
    params: P,
) -> Result<R, wasmi::Error> {
    let mut call = f.call_resumable(&mut *store, params)?;
    loop {
        call = match call {
            TypedResumableCall::Finished(result) => return Ok(result),
            TypedResumableCall::HostTrap(trap) => {
                // The typed handle lends its error; the host's own errors are `Ended` values.
                let error = trap.host_error();
                return Err(match error.downcast_ref::<Ended>() {
                    Some(ended) => wasmi::Error::host(ended.clone()),
                    None => wasmi::Error::new(error.to_string()),
                });
            }
            TypedResumableCall::OutOfFuel(paused) => {
                let have = store.get_fuel().unwrap_or(0);
                match store.data_mut().meter.refill(have, paused.required_fuel()) {
                    Ok(add) => {
                        set_fuel(store, have.saturating_add(add));
                        paused.resume(&mut *store)?
                    }
                    Err(stop) => return Err(wasmi::Error::host(Ended::Stopped(stop))),
                }
            }
        };
    }
}

/// Charges fuel for work the host does between guest functions (placing a message).
fn charge(store: &mut Store<HostState>, cost: u64) -> Result<(), wasmi::Error> {
    let have = store.get_fuel().unwrap_or(0);
    let meter = &mut store.data_mut().meter;
    meter.store = have;
    let charged = meter.charge(cost);
    let left = meter.store;
    set_fuel(store, left);
    charged.map_err(|stop| wasmi::Error::host(Ended::Stopped(stop)))
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
    let ptr = run(store, alloc, len)?;
    let refused = |reason: String| {
        wasmi::Error::host(Ended::Refused(Abort {
            call: export::ALLOC,
            reason,
        }))
    };
    if ptr == 0 {
        return Err(refused(format!("could not allocate {len} bytes")));
    }
    let mem = memory.data_mut(&mut *store);
    let range = host::range(mem, ptr, len, u32::MAX, "allocation")
        .map_err(|(_, reason)| refused(format!("returned a bad buffer: {reason}")))?;
    mem[range].copy_from_slice(bytes);
    charge(store, fuel::price::copied(bytes.len()))?;
    Ok((ptr, len))
}

fn classify(e: &wasmi::Error, state: &HostState, budget: u64) -> Outcome {
    match e.downcast_ref::<Ended>() {
        Some(Ended::Refused(abort)) => {
            return Outcome::HostCallRefused {
                call: abort.call.to_string(),
                reason: abort.reason.clone(),
            };
        }
        Some(Ended::Stopped(Stop::OutOfFuel)) => return Outcome::OutOfFuel { budget },
        Some(Ended::Stopped(Stop::Deadline)) => {
            return Outcome::DeadlineExceeded {
                deadline_ms: state.meter.deadline_ms,
            };
        }
        None => {}
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
