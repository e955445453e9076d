//! Decode and verify arbitrary bytes as a bundle: must return an error or a verified bundle, never
//! panic, hang or allocate beyond the input's size.

#![no_main]

use std::sync::OnceLock;

use edge_agent::core::bundle;
use edge_agent::core::keys::TrustSet;
use edge_agent::core::verify::{self, Verifier};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let trust = TrustSet::from_keys([key]).expect("fixed key is strong");
        Verifier::new(trust, edge_agent::engine::WasmLimits::default()).with_max_bundle_bytes(1 << 20)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = bundle::decode(data, 1 << 20);
    let _ = verify::read_unverified(data, 1 << 20);
    if let Ok(v) = verifier().verify(data, 1_800_000_000, |_| Some(0)) {
        // Anything accepted must really carry what its manifest says.
        if let (Some(wasm), Some(w)) = (v.wasm_bytes(), v.manifest().wasm) {
            assert_eq!(wasm.len() as u64, w.size);
        }
    }
});
