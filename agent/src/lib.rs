//! edge-agent: runs signed WebAssembly modules from an MQTT fleet on small ARM boards.
//!
//! - [`core`] — the sans-IO rules: bundle format, manifest, keys, verification.
//! - [`engine`] — the one wasmi engine configuration shared by verification and the runtime.
//! - [`runtime`] — the sandbox: wasmi stores with fuel and memory caps, host ABI v1, outcomes.
//! - [`cli`] — the operator's `edgectl` commands (the binaries in `src/bin` are thin).

pub mod cli;
pub mod core;
pub mod engine;
pub mod runtime;
