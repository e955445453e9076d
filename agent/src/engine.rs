//! The wasmi engine configuration. One engine serves verification (validation uses its feature
//! set) and, with the runtime, every module's store.

/// A new engine with fuel metering on, Wasm start functions refused (a start function would run
/// during instantiation, before the agent sets a fuel budget for the module's `init`), and lazy
/// compilation: a function is translated on its first call, so code a module never runs costs no
/// memory. Validation is not left to laziness: `Verifier::verify` and `Runtime::prepare` validate
/// the whole module first. (Measured by `just bench`; see docs/ARCHITECTURE.md.)
pub fn new() -> wasmi::Engine {
    let mut config = wasmi::Config::default();
    config
        .consume_fuel(true)
        .allow_start_fn(false)
        .compilation_mode(wasmi::CompilationMode::Lazy);
    wasmi::Engine::new(&config)
}
