//! The wasmi engine configuration. One engine serves verification (validation uses its feature
//! set) and, with the runtime, every module's store.

/// A new engine with fuel metering on and Wasm start functions refused (a start function would
/// run during instantiation, before the agent sets a fuel budget for the module's `init`).
pub fn new() -> wasmi::Engine {
    let mut config = wasmi::Config::default();
    config.consume_fuel(true).allow_start_fn(false);
    wasmi::Engine::new(&config)
}
