//! Verify arbitrary bytes as a trust document under fixed roots, and read them for display: must
//! return an error or an accepted document, never panic, hang or allocate beyond the input's size.

#![no_main]

use std::sync::OnceLock;

use edge_agent::core::trust::{self, Roots};
use libfuzzer_sys::fuzz_target;

fn roots() -> &'static Roots {
    static R: OnceLock<Roots> = OnceLock::new();
    R.get_or_init(|| {
        let keys = [1u8, 2, 3].map(|s| ed25519_dalek::SigningKey::from_bytes(&[s; 32]).verifying_key());
        Roots::new(keys, 2).expect("fixed roots are valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = trust::read_unverified(data);
    if let Ok(a) = trust::verify(data, roots(), 0, 1_800_000_000) {
        // Anything accepted was signed by at least the threshold of the roots.
        assert!(a.signers.iter().filter(|k| roots().contains(k)).count() >= roots().threshold());
        assert!(a.policy.version > 0);
    }
});
