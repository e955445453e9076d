//! Chunked delivery on the state's side: a verified install whose Wasm travels in chunks is
//! fetched chunk by chunk (subscribing only to what the device does not hold), each chunk
//! verified and staged durably by the shell, then assembled and verified whole.

use super::*;

impl State {
    /// A message on a chunk topic.
    pub(super) fn chunk_arrived(
        &mut self,
        sha256: Sha256,
        payload: Vec<u8>,
        _now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let _ = payload;
        fx.push(Effect::Log(
            Level::Debug,
            format!("chunk {sha256} arrived, no fetch wants it"),
        ));
    }
}
