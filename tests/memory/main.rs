//! What hostile input makes the agent allocate, counted exactly: this test binary's global
//! allocator counts live and peak heap bytes, and each test measures the peak of one operation
//! against the size of its input. The tests share the process-wide counter, so they take turns.

#![allow(clippy::unwrap_used)]
// A global allocator is an `unsafe impl`: it forwards to the system allocator unchanged.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

#[path = "../it/bombs.rs"]
mod bombs;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `System` as it came; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One measurement at a time.
static TURN: Mutex<()> = Mutex::new(());

/// Runs `f` and returns its result and the most heap bytes it had allocated at once beyond what
/// was live when it started.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

use edge_agent::core::bundle;
use edge_agent::core::keys::TrustSet;
use edge_agent::core::manifest::Manifest;
use edge_agent::core::verify::{self, Verifier};
use edge_agent::engine::WasmLimits;
use edge_agent::runtime::{Runtime, RuntimeConfig};

fn key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[1; 32])
}

fn verifier() -> Verifier {
    Verifier::new(
        TrustSet::from_keys([key().verifying_key()]).unwrap(),
        WasmLimits::default(),
    )
}

fn manifest(name: &str) -> Manifest {
    Manifest::from_toml(&format!(
        "name = \"{name}\"\nversion = \"1\"\nseq = 1\n[limits]\nfuel_per_call = 100000000\n"
    ))
    .unwrap()
}

/// `head` followed by `n` empty CBOR arrays: the shape of a COSE item of millions of values.
fn many_arrays(head: &[u8], n: usize) -> Vec<u8> {
    let mut out = head.to_vec();
    out.resize(head.len() + n, 0x80);
    out
}

/// A CBOR head of `first` (the major type with a four-byte argument) and the argument `n`.
fn head4(first: u8, n: usize) -> Vec<u8> {
    let mut out = vec![first];
    out.extend_from_slice(&u32::try_from(n).unwrap().to_be_bytes());
    out
}

/// Peak heap while verifying and while reading `bytes` unverified (as `edgectl inspect` does).
fn peak_checking(bytes: &[u8]) -> usize {
    let v = verifier();
    let (verified, a) = peak_of(|| v.verify(bytes, 0, |_| None).map(|_| ()));
    assert!(verified.is_err());
    let (read, b) = peak_of(|| verify::read_unverified(bytes, bundle::DEFAULT_MAX_BUNDLE_BYTES));
    assert!(read.is_err());
    a.max(b)
}

#[test]
fn bundles_of_millions_of_cbor_items_cost_little_before_their_signature() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let n = 4_000_000;
    // Tag 18 around an array of four million empty arrays, as the COSE_Sign1.
    let head = [&[0xd2][..], &head4(0x9a, n)].concat();
    let envelope = bundle::encode(&many_arrays(&head, n), None);
    // A well-formed envelope whose protected header is four million empty arrays.
    let protected = many_arrays(&head4(0x9a, n), n);
    let mut sign1 = [&[0xd2, 0x84][..], &head4(0x5a, protected.len())].concat();
    sign1.extend_from_slice(&protected);
    sign1.extend_from_slice(&[0xa0, 0x40, 0x40]);
    let header = bundle::encode(&sign1, None);
    // A payload of four million empty arrays under a key this device does not trust (its name
    // is read for the error message).
    let payload = many_arrays(&head4(0x9a, n), n);
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let sign1 = coset::CoseSign1Builder::new()
        .protected(
            coset::HeaderBuilder::new()
                .algorithm(coset::iana::Algorithm::EdDSA)
                .key_id(vec![1; 8])
                .build(),
        )
        .payload(payload)
        .create_signature(&[], |tbs| {
            use ed25519_dalek::Signer as _;
            stranger.sign(tbs).to_bytes().to_vec()
        })
        .build();
    let sign1 = coset::TaggedCborSerializable::to_tagged_vec(sign1).unwrap();
    let payload = bundle::encode(&sign1, None);
    for (what, bytes) in [
        ("envelope", envelope),
        ("protected header", header),
        ("payload", payload),
    ] {
        let peak = peak_checking(&bytes);
        assert!(
            peak <= 2 * bytes.len() + (1 << 20),
            "{what}: {peak} bytes allocated for a {} byte bundle",
            bytes.len()
        );
    }
}

#[test]
fn structure_bombs_are_refused_before_they_cost_memory() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let v = verifier();
    for (what, wasm) in [
        ("900k functions", bombs::functions(900_000)),
        ("3.5M element items", bombs::elements(3_500_000)),
        ("280k imports", bombs::imports(280_000)),
        ("700k globals", bombs::globals(700_000)),
    ] {
        let bytes = bundle::sign(manifest("bomb"), Some(&wasm), &key(), 4 << 20).unwrap();
        let (result, peak) = peak_of(|| v.verify(&bytes, 0, |_| None).map(|_| ()));
        assert!(result.is_err(), "{what} was accepted");
        assert!(
            peak <= 2 * bytes.len() + (1 << 20),
            "{what}: {peak} bytes allocated for a {} byte bundle",
            bytes.len()
        );
    }
}

/// A module of `n` functions that `tick` all calls, so every one of them is translated.
fn called_functions(n: usize) -> Vec<u8> {
    let body = "local.get 0 i32.const 3 i32.add i32.const 7 i32.mul local.set 0 ".repeat(30);
    let mut wat = String::from(
        "(module (memory (export \"memory\") 1) (func (export \"edge_abi_v1\"))\n(func (export \"tick\") (result i32)\n",
    );
    for f in 0..n {
        wat.push_str(&format!("i32.const 1 call {} drop\n", f + 2));
    }
    wat.push_str("i32.const 0)\n");
    for _ in 0..n {
        wat.push_str(&format!(
            "(func (param i32) (result i32) {body} local.get 0)\n"
        ));
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

#[test]
fn upgrades_leave_no_compiled_code_behind() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let rt = Runtime::new(RuntimeConfig::default());
    let wasm = called_functions(300);
    let m = manifest("big");
    let upgrade = || {
        let prepared = rt.prepare(&m, &wasm).unwrap();
        let mut i = rt.instantiate(&prepared, None).unwrap();
        assert!(i.tick().outcome.is_finished());
    };
    for _ in 0..20 {
        upgrade();
    }
    let settled = live();
    for _ in 0..200 {
        upgrade();
    }
    let grown = live().saturating_sub(settled);
    // One engine for all versions kept every version's translated code (~300 KiB each here).
    assert!(
        grown < 1 << 20,
        "{grown} bytes still held after 200 upgrades"
    );
}
