//! edge-agent: runs signed WebAssembly modules from an MQTT fleet on small ARM boards.
//!
//! - [`core`] — the sans-IO rules: bundle format, manifest, keys, verification.
//! - [`config`] — the agent's TOML configuration with `config.d` overrides, validated once.
//! - [`daemon`] — the supervisor: MQTT connection, reconciler, store and runners joined by one event loop.
//! - [`engine`] — the one wasmi engine configuration shared by verification and the runtime.
//! - [`hal`] — GPIO, I2C and SPI a device offers: Linux backend, simulated board, embedded-hal adapters.
//! - [`mqtt`] — broker URLs and client setup (rustls on ring, TCP_NODELAY) for agent and edgectl.
//! - [`runtime`] — the sandbox: wasmi stores with fuel and memory caps, host ABI v1, outcomes.
//! - [`store`] — the persistent store on sled: modules, Wasm blobs, seqs, key-value data.
//! - [`cli`] — the operator's `edgectl` commands (the binaries in `src/bin` are thin).

pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;
pub mod engine;
pub mod hal;
pub mod mqtt;
pub mod runtime;
pub mod store;
