//! The persistent store on real sled files: installs, upgrades, rollbacks, removals, shared
//! blobs, key-value quotas, corruption, schema versions, SIGKILL at random moments, a full disk.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edge_agent::core::bundle;
use edge_agent::core::manifest::{Action, Manifest, Sha256};
use edge_agent::core::protocol::{Event, EventKind};
use edge_agent::runtime::kv::{ENTRY_OVERHEAD, KvError, KvStore as _};
use edge_agent::store::{
    InstallState, ModuleRecord, OUTBOX_MAX, SCHEMA_VERSION, SeqRecord, Store, StoreError,
};

use crate::store_model::{
    CACHE, NOW_MS, Rng, Snapshot, Workload, blob_files, cbor, check_raw, check_reopened, event,
    raw_db, seed, snapshot, tree_names, wasm,
};
use crate::support::{key, manifest, signed, tempdir, tiny_wasm, verifier};

/// Signs, verifies (as the device does) and installs `name` at `seq` with `wasm`.
fn install(store: &Store, k: &SigningKey, name: &str, seq: u64, wasm: &[u8]) -> ModuleRecord {
    try_install(store, k, name, seq, wasm).unwrap()
}

fn try_install(
    store: &Store,
    k: &SigningKey,
    name: &str,
    seq: u64,
    wasm: &[u8],
) -> Result<ModuleRecord, StoreError> {
    install_with_events(store, k, name, seq, wasm, &[]).map(|(record, _)| record)
}

/// [`try_install`], recording `events` with the install.
fn install_with_events(
    store: &Store,
    k: &SigningKey,
    name: &str,
    seq: u64,
    wasm: &[u8],
    events: &[Event],
) -> Result<(ModuleRecord, Vec<Event>), StoreError> {
    let bundle = signed(manifest(name, seq), wasm, k);
    let verified = verifier(&[k]).verify(&bundle, 0, |_| None).unwrap();
    store.install(
        verified.manifest(),
        verified.key_id(),
        verified.wasm_bytes(),
        Sha256::of(&bundle),
        NOW_MS + seq,
        events,
    )
}

fn sha(wasm: &[u8]) -> Sha256 {
    Sha256::of(wasm)
}

#[test]
fn an_install_survives_a_reopen_with_its_record_blob_and_seq() {
    let tmp = tempdir();
    let k = key(1);
    let w = tiny_wasm();
    let installed = {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        assert!(store.modules().unwrap().is_empty());
        let rec = install(&store, &k, "demo", 1, &w);
        assert_eq!(rec.state, InstallState::Probation);
        assert_eq!(rec.previous, None);
        assert_eq!(rec.current.manifest, manifest_with_digest("demo", 1, &w));
        assert_eq!(rec.current.installed_at_ms, NOW_MS + 1);
        assert_eq!(rec.current.key_id_hex.len(), 16);
        rec
    };
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.modules().unwrap(), vec![installed.clone()]);
    assert_eq!(store.module("demo").unwrap(), Some(installed.clone()));
    assert_eq!(store.module("other").unwrap(), None);
    assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
    let seq = store.seq("demo").unwrap().unwrap();
    assert_eq!(seq.highest_seq, 1);
    assert_eq!(seq.last_bundle_sha256, installed.current.bundle_sha256);
    assert_eq!(store.seqs().unwrap(), vec![("demo".to_string(), seq)]);
    assert_eq!(blob_files(tmp.path()), vec![sha(&w).to_hex()]);
}

fn manifest_with_digest(name: &str, seq: u64, w: &[u8]) -> Manifest {
    let mut m = manifest(name, seq);
    m.wasm = Some(edge_agent::core::manifest::WasmRef {
        sha256: sha(w),
        size: w.len() as u64,
    });
    m
}

#[test]
fn an_upgrade_keeps_the_previous_version_and_frees_the_one_before() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    let (w1, w2, w3) = (wasm(1, 10), wasm(2, 10), wasm(3, 10));
    let v1 = install(&store, &k, "demo", 1, &w1).current;
    store.confirm("demo", 1, &[]).unwrap();
    let rec = install(&store, &k, "demo", 2, &w2);
    assert_eq!(rec.previous.as_ref(), Some(&v1));
    assert_eq!(rec.current.manifest.seq, 2);
    store.confirm("demo", 2, &[]).unwrap();
    let rec = install(&store, &k, "demo", 5, &w3);
    assert_eq!(rec.previous.unwrap().manifest.seq, 2);
    assert_eq!(rec.state, InstallState::Probation);
    // v1 is no longer referenced: its blob is gone; v2 (previous) and v3 (current) remain.
    assert!(matches!(
        store.wasm(&sha(&w1)),
        Err(StoreError::UnknownBlob { sha256 }) if sha256 == sha(&w1)
    ));
    assert_eq!(store.wasm(&sha(&w2)).unwrap(), w2);
    assert_eq!(store.wasm(&sha(&w3)).unwrap(), w3);
    let mut expected = vec![sha(&w2).to_hex(), sha(&w3).to_hex()];
    expected.sort();
    assert_eq!(blob_files(tmp.path()), expected);
    assert_eq!(store.seq("demo").unwrap().unwrap().highest_seq, 5);
}

#[test]
fn an_upgrade_over_an_unproven_version_keeps_the_last_proven_one_as_the_rollback_target() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    let (w1, w2, w3, w4) = (wasm(1, 10), wasm(2, 10), wasm(3, 10), wasm(4, 10));
    let v1 = install(&store, &k, "demo", 1, &w1).current;
    store.confirm("demo", 1, &[]).unwrap();
    // v2 is still on probation when v3 arrives: v3's rollback target stays v1, v2 is dropped.
    install(&store, &k, "demo", 2, &w2);
    let rec = install(&store, &k, "demo", 3, &w3);
    assert_eq!(rec.previous.as_ref(), Some(&v1));
    assert!(matches!(
        store.wasm(&sha(&w2)),
        Err(StoreError::UnknownBlob { .. })
    ));
    // A quarantined current is no rollback target either.
    store.confirm("demo", 3, &[]).unwrap();
    store
        .set_state(
            "demo",
            InstallState::Quarantined {
                cause: "crash loop".into(),
            },
            &[],
        )
        .unwrap();
    let rec = install(&store, &k, "demo", 4, &w4);
    assert_eq!(rec.previous.as_ref(), Some(&v1));
    let mut expected = vec![sha(&w1).to_hex(), sha(&w4).to_hex()];
    expected.sort();
    assert_eq!(blob_files(tmp.path()), expected);
}

#[test]
fn an_install_at_an_old_or_equal_seq_is_refused_and_changes_nothing() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    let rec = install(&store, &k, "demo", 3, &wasm(1, 10));
    for seq in [1, 3] {
        let err = try_install(&store, &k, "demo", seq, &wasm(2, 10)).unwrap_err();
        assert!(
            matches!(&err, StoreError::SeqNotGreater { module, seq: s, highest: 3 } if module == "demo" && *s == seq),
            "{err}"
        );
        assert!(err.to_string().contains("not greater than 3"), "{err}");
    }
    assert_eq!(store.module("demo").unwrap(), Some(rec));
    assert_eq!(blob_files(tmp.path()), vec![sha(&wasm(1, 10)).to_hex()]);
}

#[test]
fn install_refuses_a_removal_bundle() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    let mut m = manifest("demo", 2);
    m.action = Action::Remove;
    m.caps = Default::default();
    m.limits = Default::default();
    let bundle = bundle::sign(m, None, &k, bundle::DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    let verified = verifier(&[&k]).verify(&bundle, 0, |_| None).unwrap();
    let err = store
        .install(
            verified.manifest(),
            verified.key_id(),
            verified.wasm_bytes(),
            Sha256::of(&bundle),
            NOW_MS,
            &[],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::NotAnInstall { .. }), "{err}");
    assert_eq!(store.seq("demo").unwrap(), None);
}

/// Every entry of a key-value store, through the store's own handle.
fn kv_entries(store: &Store, name: &str) -> (BTreeMap<Vec<u8>, Vec<u8>>, u64) {
    let kv = store.kv(name, 1 << 20).unwrap();
    let entries = raw_entries_of(&kv);
    (entries, kv.used_bytes())
}

fn raw_entries_of(kv: &edge_agent::store::SledKv) -> BTreeMap<Vec<u8>, Vec<u8>> {
    [b"count".as_slice(), b"kept", b"deleted", b"added"]
        .into_iter()
        .filter_map(|k| kv.get(k).unwrap().map(|v| (k.to_vec(), v)))
        .collect()
}

#[test]
fn rollback_restores_the_previous_version_with_its_kv_data_as_it_was_and_keeps_the_highest_seq() {
    let tmp = tempdir();
    let k = key(1);
    let (w1, w2) = (wasm(1, 10), wasm(2, 10));
    let before = {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        let v1 = install(&store, &k, "demo", 1, &w1);
        // A first install has nothing to roll back to: no snapshot.
        store.begin_probation("demo", 1).unwrap();
        assert_eq!(store.module("demo").unwrap().unwrap().kv_snapshot, None);
        store.confirm("demo", 1, &[]).unwrap();
        let mut kv = store.kv("demo", 4096).unwrap();
        kv.set(b"count", b"41").unwrap();
        kv.set(b"kept", b"same").unwrap();
        kv.set(b"deleted", b"by v2").unwrap();
        drop(kv);
        let before = kv_entries(&store, "demo");
        install(&store, &k, "demo", 2, &w2);
        store.begin_probation("demo", 2).unwrap();
        assert_eq!(store.module("demo").unwrap().unwrap().kv_snapshot, Some(2));
        // v2's init writes a value v1 cannot read, adds and deletes entries, then traps.
        let mut kv = store.kv("demo", 4096).unwrap();
        assert_eq!(kv.get(b"count").unwrap().unwrap(), b"41");
        kv.set(b"count", b"xyz").unwrap();
        kv.set(b"added", &[7; 300]).unwrap();
        assert!(kv.delete(b"deleted").unwrap());
        drop(kv);

        let restored = store
            .rollback("demo", "trapped on probation", &[])
            .unwrap()
            .0
            .unwrap();
        assert_eq!(restored.current, v1.current);
        assert_eq!(restored.previous, None);
        assert_eq!(restored.state, InstallState::Active);
        assert_eq!(restored.kv_snapshot, None);
        // The key-value data is v1's again, and a handle opened now counts its bytes.
        assert_eq!(kv_entries(&store, "demo"), before);
        // The failed version's blob is freed, the seq is not lowered.
        assert!(matches!(
            store.wasm(&sha(&w2)),
            Err(StoreError::UnknownBlob { .. })
        ));
        assert_eq!(store.seq("demo").unwrap().unwrap().highest_seq, 2);
        before
    };
    assert!(!tree_names(tmp.path()).contains(&"kvsnap/demo".to_string()));
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let rec = store.module("demo").unwrap().unwrap();
    assert_eq!(rec.current.manifest.seq, 1);
    assert_eq!(rec.state, InstallState::Active);
    assert_eq!(store.wasm(&sha(&w1)).unwrap(), w1);
    assert_eq!(kv_entries(&store, "demo"), before);
    assert_eq!(before.0[&b"count"[..]], b"41");
    assert_eq!(before.1, 3 * ENTRY_OVERHEAD + 5 + 2 + 4 + 4 + 7 + 5);
    assert_eq!(blob_files(tmp.path()), vec![sha(&w1).to_hex()]);
    // Neither the failed bundle nor an older one can come back; a newer one can.
    assert!(matches!(
        try_install(&store, &k, "demo", 2, &w2),
        Err(StoreError::SeqNotGreater { highest: 2, .. })
    ));
    let rec = install(&store, &k, "demo", 3, &w2);
    assert_eq!(rec.previous.unwrap().manifest.seq, 1);
}

#[test]
fn a_restart_during_probation_keeps_the_snapshot_taken_before_the_new_version_wrote() {
    let tmp = tempdir();
    let k = key(1);
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &k, "demo", 1, &wasm(1, 10));
        store.confirm("demo", 1, &[]).unwrap();
        kv_set(&store, b"count", b"41");
        install(&store, &k, "demo", 2, &wasm(2, 10));
        store.begin_probation("demo", 2).unwrap();
        kv_set(&store, b"count", b"xyz");
        store.flush().unwrap();
    }
    // The agent starts again with v2 still on probation and puts it on probation again.
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.module("demo").unwrap().unwrap().kv_snapshot, Some(2));
    store.begin_probation("demo", 2).unwrap();
    kv_set(&store, b"more", b"v2");
    store.rollback("demo", "trapped", &[]).unwrap();
    let kv = store.kv("demo", 4096).unwrap();
    assert_eq!(kv.get(b"count").unwrap().unwrap(), b"41");
    assert_eq!(kv.get(b"more").unwrap(), None);
    assert_eq!(kv.used_bytes(), ENTRY_OVERHEAD + 7);
}

#[test]
fn begin_probation_takes_a_snapshot_only_for_the_current_version_on_probation_with_a_previous_one()
{
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    assert!(matches!(
        store.begin_probation("ghost", 1),
        Err(StoreError::NotInstalled { .. })
    ));
    install(&store, &k, "demo", 1, &wasm(1, 10));
    store.confirm("demo", 1, &[]).unwrap();
    // Active, not on probation.
    store.begin_probation("demo", 1).unwrap();
    assert_eq!(store.module("demo").unwrap().unwrap().kv_snapshot, None);
    kv_set(&store, b"count", b"1");
    install(&store, &k, "demo", 2, &wasm(2, 10));
    // Not the current version.
    store.begin_probation("demo", 1).unwrap();
    store.begin_probation("demo", 3).unwrap();
    assert_eq!(store.module("demo").unwrap().unwrap().kv_snapshot, None);
    store.begin_probation("demo", 2).unwrap();
    kv_set(&store, b"count", b"2");
    // Probation passed: the snapshot is dropped and v2's data stays.
    let (rec, _) = store.confirm("demo", 2, &[]).unwrap();
    assert_eq!(rec.kv_snapshot, None);
    assert_eq!(kv_get(&store, b"count"), b"2");
    // A rollback from a state no snapshot belongs to leaves the data as it is.
    install(&store, &k, "demo", 3, &wasm(3, 10));
    kv_set(&store, b"count", b"3");
    store.rollback("demo", "trapped", &[]).unwrap();
    assert_eq!(kv_get(&store, b"count"), b"3");
    drop(store);
    assert!(
        tree_names(tmp.path())
            .iter()
            .all(|t| !t.starts_with("kvsnap/")),
        "{:?}",
        tree_names(tmp.path())
    );
}

#[test]
fn an_upgrade_over_a_version_still_on_probation_keeps_the_snapshot_of_the_last_proven_one() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    install(&store, &k, "demo", 1, &wasm(1, 10));
    store.confirm("demo", 1, &[]).unwrap();
    kv_set(&store, b"count", b"41");
    install(&store, &k, "demo", 2, &wasm(2, 10));
    store.begin_probation("demo", 2).unwrap();
    kv_set(&store, b"count", b"xyz");
    // v3 arrives while v2 is on probation: v1 stays the rollback target, with v1's data.
    let rec = install(&store, &k, "demo", 3, &wasm(3, 10));
    assert_eq!(rec.previous.unwrap().manifest.seq, 1);
    assert_eq!(rec.kv_snapshot, Some(3));
    store.begin_probation("demo", 3).unwrap();
    kv_set(&store, b"count", b"v3");
    let (restored, _) = store.rollback("demo", "trapped", &[]).unwrap();
    assert_eq!(restored.unwrap().current.manifest.seq, 1);
    assert_eq!(kv_get(&store, b"count"), b"41");
}

#[test]
fn a_snapshot_of_a_large_tree_is_restored_whole_with_its_quota_bytes() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    install(&store, &k, "demo", 1, &wasm(1, 10));
    store.confirm("demo", 1, &[]).unwrap();
    let quota = 1 << 20;
    let mut kv = store.kv("demo", quota).unwrap();
    // About 1 MiB: values of 16 KiB (the ABI's largest) and many small entries.
    for i in 0..40u32 {
        kv.set(
            format!("big{i}").as_bytes(),
            &vec![u8::try_from(i).unwrap(); 16 * 1024],
        )
        .unwrap();
    }
    let mut i = 0u32;
    while kv.set(format!("small{i}").as_bytes(), b"v").is_ok() {
        i += 1;
    }
    let used = kv.used_bytes();
    assert!(used > quota - 200, "{used}");
    drop(kv);
    install(&store, &k, "demo", 2, &wasm(2, 10));
    let started = Instant::now();
    store.begin_probation("demo", 2).unwrap();
    let snapshot_took = started.elapsed();
    let mut kv = store.kv("demo", quota).unwrap();
    for i in 0..40u32 {
        kv.delete(format!("big{i}").as_bytes()).unwrap();
    }
    kv.set(b"v2", b"data").unwrap();
    drop(kv);
    let started = Instant::now();
    store.rollback("demo", "trapped", &[]).unwrap();
    let rollback_took = started.elapsed();
    eprintln!(
        "a {used}-byte key-value tree: begin_probation {snapshot_took:?}, rollback {rollback_took:?}"
    );
    drop(store);
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let kv = store.kv("demo", quota).unwrap();
    assert_eq!(kv.used_bytes(), used);
    assert_eq!(kv.get(b"v2").unwrap(), None);
    assert_eq!(kv.get(b"big39").unwrap().unwrap(), vec![39; 16 * 1024]);
    assert_eq!(
        kv.get(format!("small{}", i - 1).as_bytes())
            .unwrap()
            .unwrap(),
        b"v"
    );
}

#[test]
fn rollback_without_a_previous_version_leaves_the_module_failed() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    let w = tiny_wasm();
    install(&store, &k, "demo", 1, &w);
    assert_eq!(store.rollback("demo", "init trapped", &[]).unwrap().0, None);
    drop(store);
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let rec = store.module("demo").unwrap().unwrap();
    assert_eq!(
        rec.state,
        InstallState::Failed {
            cause: "init trapped".into()
        }
    );
    assert_eq!(rec.current.manifest.seq, 1);
    assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
    assert!(matches!(
        store.rollback("nothing", "x", &[]),
        Err(StoreError::NotInstalled { module }) if module == "nothing"
    ));
}

#[test]
fn confirm_activates_only_the_version_on_probation() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    install(&store, &k, "demo", 1, &wasm(1, 10));
    install(&store, &k, "demo", 2, &wasm(2, 10));
    // A confirmation for the replaced version is a no-op.
    assert_eq!(
        store.confirm("demo", 1, &[]).unwrap().0.state,
        InstallState::Probation
    );
    assert_eq!(
        store.confirm("demo", 2, &[]).unwrap().0.state,
        InstallState::Active
    );
    let quarantined = InstallState::Quarantined {
        cause: "5 failures in 60 s".into(),
    };
    store.set_state("demo", quarantined.clone(), &[]).unwrap();
    // Confirming does not lift a quarantine.
    assert_eq!(store.confirm("demo", 2, &[]).unwrap().0.state, quarantined);
    drop(store);
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.module("demo").unwrap().unwrap().state, quarantined);
    assert!(matches!(
        store.confirm("ghost", 1, &[]),
        Err(StoreError::NotInstalled { .. })
    ));
    assert!(matches!(
        store.set_state("ghost", InstallState::Active, &[]),
        Err(StoreError::NotInstalled { .. })
    ));
}

/// Check records live as long as a version refers to their blob: none is kept for a blob no
/// version refers to, a freed blob's goes with it, and `open` drops any left behind.
#[test]
fn a_check_record_is_kept_while_a_version_refers_to_its_blob() {
    let tmp = tempdir();
    let k = key(1);
    let (w1, w2, w3) = (wasm(1, 10), wasm(2, 10), wasm(3, 10));
    let store = Store::open(tmp.path(), CACHE).unwrap();
    store.set_check_record(&sha(&w1), b"early").unwrap();
    assert_eq!(store.check_record(&sha(&w1)).unwrap(), None);
    install(&store, &k, "demo", 1, &w1);
    store.set_check_record(&sha(&w1), b"one").unwrap();
    assert_eq!(store.check_record(&sha(&w1)).unwrap().unwrap(), b"one");
    store.confirm("demo", 1, &[]).unwrap();
    install(&store, &k, "demo", 2, &w2);
    store.set_check_record(&sha(&w2), b"two").unwrap();
    store.confirm("demo", 2, &[]).unwrap();
    // The third version frees the first one's blob, and its record.
    install(&store, &k, "demo", 3, &w3);
    assert_eq!(store.check_record(&sha(&w1)).unwrap(), None);
    assert_eq!(store.check_record(&sha(&w2)).unwrap().unwrap(), b"two");
    drop(store);
    // A record whose blob is gone (as a crash between a removal and its clean-up leaves it).
    {
        let db = raw_db(tmp.path());
        db.open_tree("checked")
            .unwrap()
            .insert(sha(&w1).0, &b"stale"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.check_record(&sha(&w1)).unwrap(), None);
    assert_eq!(store.check_record(&sha(&w2)).unwrap().unwrap(), b"two");
    store
        .remove("demo", 4, Sha256::of(b"removal"), &[])
        .unwrap();
    assert_eq!(store.check_record(&sha(&w2)).unwrap(), None);
}

#[test]
fn removal_drops_record_blobs_and_kv_but_keeps_the_seq() {
    let tmp = tempdir();
    let k = key(1);
    let (w1, w2) = (wasm(1, 10), wasm(2, 10));
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &k, "demo", 1, &w1);
        store.confirm("demo", 1, &[]).unwrap();
        let mut kv = store.kv("demo", 4096).unwrap();
        kv.set(b"k", b"v").unwrap();
        drop(kv);
        install(&store, &k, "demo", 2, &w2);
        store.begin_probation("demo", 2).unwrap();
        let removal = Sha256::of(b"removal bundle");
        assert!(matches!(
            store.remove("demo", 2, removal, &[]),
            Err(StoreError::SeqNotGreater {
                seq: 2,
                highest: 2,
                ..
            })
        ));
        assert!(store.remove("demo", 3, removal, &[]).unwrap().0);
        assert_eq!(store.module("demo").unwrap(), None);
        assert_eq!(
            store.seq("demo").unwrap(),
            Some(SeqRecord {
                highest_seq: 3,
                last_bundle_sha256: removal
            })
        );
        for w in [&w1, &w2] {
            assert!(matches!(
                store.wasm(&sha(w)),
                Err(StoreError::UnknownBlob { .. })
            ));
        }
        assert!(blob_files(tmp.path()).is_empty());
        assert!(matches!(
            store.kv("demo", 4096),
            Err(StoreError::NotInstalled { .. })
        ));
    }
    assert_eq!(
        tree_names(tmp.path()),
        ["blob_refs", "checked", "meta", "modules", "outbox", "seqs"]
    );
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.seq("demo").unwrap().unwrap().highest_seq, 3);
    for seq in [1, 2, 3] {
        assert!(matches!(
            try_install(&store, &k, "demo", seq, &w1),
            Err(StoreError::SeqNotGreater { highest: 3, .. })
        ));
    }
    // A removal of something not installed is still recorded, so an old install stays out.
    assert!(!store.remove("never", 7, Sha256::of(b"r"), &[]).unwrap().0);
    assert!(matches!(
        try_install(&store, &k, "never", 7, &w1),
        Err(StoreError::SeqNotGreater { highest: 7, .. })
    ));
    assert!(matches!(
        store.remove("Bad/Name", 1, Sha256::of(b"r"), &[]),
        Err(StoreError::BadName { .. })
    ));
}

#[test]
fn a_removed_module_can_come_back_at_a_higher_seq_with_an_empty_kv() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    let w = tiny_wasm();
    install(&store, &k, "demo", 1, &w);
    let mut kv = store.kv("demo", 4096).unwrap();
    kv.set(b"secret", b"from the first life").unwrap();
    drop(kv);
    store.remove("demo", 2, Sha256::of(b"r"), &[]).unwrap();
    let rec = install(&store, &k, "demo", 3, &w);
    assert_eq!(rec.previous, None);
    assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
    let kv = store.kv("demo", 4096).unwrap();
    assert_eq!(kv.get(b"secret").unwrap(), None);
    assert_eq!(kv.used_bytes(), 0);
}

#[test]
fn a_blob_shared_by_two_modules_survives_the_removal_of_one() {
    let tmp = tempdir();
    let k = key(1);
    let w = wasm(9, 1000);
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &k, "one", 1, &w);
        install(&store, &k, "two", 1, &w);
        store.confirm("two", 1, &[]).unwrap();
        // Same Wasm again as an upgrade of "two": three slots refer to it.
        install(&store, &k, "two", 2, &w);
        assert_eq!(blob_files(tmp.path()), vec![sha(&w).to_hex()]);
        store.remove("one", 2, Sha256::of(b"r"), &[]).unwrap();
        assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
        // Rolling "two" back drops one of its two references only.
        store
            .rollback("two", "probation failed", &[])
            .unwrap()
            .0
            .unwrap();
        assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
    store.remove("two", 3, Sha256::of(b"r"), &[]).unwrap();
    assert!(matches!(
        store.wasm(&sha(&w)),
        Err(StoreError::UnknownBlob { .. })
    ));
    assert!(blob_files(tmp.path()).is_empty());
}

#[test]
fn kv_quota_is_enforced_and_used_bytes_are_right_after_reopen() {
    // Every entry counts its key, its value and a fixed overhead.
    const O: u64 = ENTRY_OVERHEAD;
    let tmp = tempdir();
    let k = key(1);
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &k, "demo", 1, &tiny_wasm());
        install(&store, &k, "other", 1, &tiny_wasm());
        let mut kv = store.kv("demo", 2 * O + 20).unwrap();
        assert_eq!(kv.quota_bytes(), 2 * O + 20);
        kv.set(b"ab", b"cdef").unwrap();
        kv.set(b"x", b"0123456789").unwrap();
        assert_eq!(kv.used_bytes(), 2 * O + 17);
        assert_eq!(
            kv.set(b"y", b"1234"),
            Err(KvError::QuotaExceeded {
                used: 2 * O + 17,
                needed: O + 5,
                quota: 2 * O + 20
            })
        );
        // Shrinking is always allowed; growing counts only the growth.
        kv.set(b"x", b"0").unwrap();
        assert_eq!(kv.used_bytes(), 2 * O + 8);
        kv.set(b"x", b"012345678901").unwrap();
        assert_eq!(kv.used_bytes(), 2 * O + 19);
        assert!(kv.delete(b"ab").unwrap());
        assert!(!kv.delete(b"ab").unwrap());
        assert_eq!(kv.used_bytes(), O + 13);
        // Another module's store is separate.
        let mut other = store.kv("other", O + 100).unwrap();
        assert_eq!(other.get(b"x").unwrap(), None);
        other.set(b"x", b"mine").unwrap();
        drop((kv, other));
        store.flush().unwrap();
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let mut kv = store.kv("demo", 2 * O + 20).unwrap();
    assert_eq!(kv.used_bytes(), O + 13);
    assert_eq!(kv.get(b"x").unwrap().unwrap(), b"012345678901");
    assert!(matches!(
        kv.set(b"zz", b"123456"),
        Err(KvError::QuotaExceeded { used, .. }) if used == O + 13
    ));
    // A smaller quota after an upgrade: what is there stays, only shrinking writes pass.
    drop(kv);
    let mut kv = store.kv("demo", 5).unwrap();
    assert_eq!(kv.used_bytes(), O + 13);
    assert!(kv.set(b"x", b"0123456789012").is_err());
    kv.set(b"x", b"0").unwrap();
    assert_eq!(kv.used_bytes(), O + 2);
    assert_eq!(
        store
            .kv("other", O + 100)
            .unwrap()
            .get(b"x")
            .unwrap()
            .unwrap(),
        b"mine"
    );
    assert!(matches!(
        store.kv("ghost", 1),
        Err(StoreError::NotInstalled { .. })
    ));
}

#[test]
fn a_tampered_blob_is_reported_as_corrupt_naming_module_and_hash() {
    let tmp = tempdir();
    let k = key(1);
    let w = tiny_wasm();
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &k, "demo", 1, &w);
    }
    let path = tmp.path().join("wasm").join(sha(&w).to_hex());
    let mut bytes = fs::read(&path).unwrap();
    bytes[9] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let err = store.wasm(&sha(&w)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
    assert!(text.contains(&sha(&w).to_hex()), "{text}");
    assert!(text.contains("module demo"), "{text}");
    // A missing file for a referenced blob is corruption too, not "unknown".
    fs::remove_file(&path).unwrap();
    let err = store.wasm(&sha(&w)).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    // Installing the same Wasm again (a newer seq) repairs the file.
    install(&store, &k, "demo", 2, &w);
    assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
}

#[test]
fn a_record_that_does_not_decode_is_reported_as_corrupt() {
    let tmp = tempdir();
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &key(1), "demo", 1, &tiny_wasm());
    }
    {
        let db = raw_db(tmp.path());
        db.open_tree("seqs")
            .unwrap()
            .insert("demo", &b"\xff\x00garbage"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let err = store.seq("demo").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains("seq record of module \"demo\""),
        "{err}"
    );
    // An install checks the seq record too, and refuses rather than overwrite it blindly.
    assert!(matches!(
        try_install(&store, &key(1), "demo", 9, &tiny_wasm()),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn a_store_with_a_newer_schema_is_refused_with_a_clear_message() {
    let tmp = tempdir();
    drop(Store::open(tmp.path(), CACHE).unwrap());
    {
        let db = raw_db(tmp.path());
        let meta = db.open_tree("meta").unwrap();
        assert_eq!(
            meta.get("schema_version").unwrap().unwrap().as_ref(),
            SCHEMA_VERSION.to_be_bytes()
        );
        meta.insert("schema_version", &(SCHEMA_VERSION + 1).to_be_bytes()[..])
            .unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(tmp.path(), CACHE).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            StoreError::NewerSchema {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("schema version 2"), "{text}");
    assert!(text.contains(&tmp.path().display().to_string()), "{text}");
}

#[test]
fn open_removes_what_an_interrupted_operation_left_behind() {
    let tmp = tempdir();
    let w = tiny_wasm();
    let w2 = wasm(2, 10);
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &key(1), "demo", 1, &w);
        store.confirm("demo", 1, &[]).unwrap();
        store
            .kv("demo", ENTRY_OVERHEAD + 100)
            .unwrap()
            .set(b"keep", b"me")
            .unwrap();
        install(&store, &key(1), "demo", 2, &w2);
        store.begin_probation("demo", 2).unwrap();
        install(&store, &key(1), "other", 1, &w);
        store.flush().unwrap();
    }
    // A blob written for an install that never committed, a half-written one, the kv tree and
    // snapshot of a module whose removal committed but whose trees were not dropped yet, and
    // the snapshot of a module whose probation ended before it was dropped.
    let orphan = Sha256::of(b"orphan");
    fs::write(tmp.path().join("wasm").join(orphan.to_hex()), b"orphan").unwrap();
    fs::write(
        tmp.path()
            .join("wasm")
            .join(format!("{}.tmp", orphan.to_hex())),
        b"orph",
    )
    .unwrap();
    {
        let db = raw_db(tmp.path());
        for tree in ["kv/gone", "kvsnap/gone", "kvsnap/other"] {
            db.open_tree(tree).unwrap().insert("k", "v").unwrap();
        }
        db.flush().unwrap();
    }
    assert_eq!(tree_names(tmp.path()).len(), 11);
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let mut expected = vec![sha(&w).to_hex(), sha(&w2).to_hex()];
    expected.sort();
    assert_eq!(blob_files(tmp.path()), expected);
    assert_eq!(
        store
            .kv("demo", 100)
            .unwrap()
            .get(b"keep")
            .unwrap()
            .unwrap(),
        b"me"
    );
    // The snapshot demo's record points at stays, and a rollback restores it.
    store.kv("demo", 100).unwrap().set(b"keep", b"v2").unwrap();
    store.rollback("demo", "trapped", &[]).unwrap();
    assert_eq!(
        store
            .kv("demo", 100)
            .unwrap()
            .get(b"keep")
            .unwrap()
            .unwrap(),
        b"me"
    );
    drop(store);
    assert_eq!(
        tree_names(tmp.path()),
        [
            "blob_refs",
            "checked",
            "kv/demo",
            "meta",
            "modules",
            "outbox",
            "seqs"
        ]
    );
}

#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let tmp = tempdir();
    let _store = Store::open(tmp.path(), CACHE).unwrap();
    let err = Store::open(tmp.path(), CACHE).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The event outbox.

/// The events as recorded: `events` numbered with `ids`.
fn numbered(events: &[Event], ids: &[u64]) -> Vec<Event> {
    assert_eq!(events.len(), ids.len());
    events
        .iter()
        .zip(ids)
        .map(|(e, &id)| Event { id, ..e.clone() })
        .collect()
}

fn ids(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.id).collect()
}

#[test]
fn every_change_records_its_events_in_its_transaction_and_they_wait_until_acknowledged() {
    let tmp = tempdir();
    let k = key(1);
    let mut recorded = Vec::new();
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        assert_eq!(store.pending_events().unwrap(), vec![]);
        let e = [event(EventKind::Installed, "demo", 1)];
        let (_, out) = install_with_events(&store, &k, "demo", 1, &wasm(1, 10), &e).unwrap();
        recorded.extend(out);
        let e = [event(EventKind::Installed, "demo", 1)];
        recorded.extend(store.confirm("demo", 1, &e).unwrap().1);
        let e = [event(EventKind::Rejected, "demo", 2)];
        recorded.extend(store.push_events(&e).unwrap());
        install(&store, &k, "demo", 3, &wasm(3, 10));
        // Two events from one change.
        let e = [
            event(EventKind::RolledBack, "demo", 3),
            event(EventKind::Restarted, "demo", 1),
        ];
        recorded.extend(store.rollback("demo", "trapped", &e).unwrap().1);
        let quarantined = InstallState::Quarantined {
            cause: "crash loop".into(),
        };
        let e = [event(EventKind::Quarantined, "demo", 1)];
        recorded.extend(store.set_state("demo", quarantined, &e).unwrap().1);
        let e = [event(EventKind::Removed, "demo", 4)];
        recorded.extend(store.remove("demo", 4, Sha256::of(b"r"), &e).unwrap().1);

        // Numbered by the store in order, strictly increasing, the rest as given.
        let given = [
            event(EventKind::Installed, "demo", 1),
            event(EventKind::Installed, "demo", 1),
            event(EventKind::Rejected, "demo", 2),
            event(EventKind::RolledBack, "demo", 3),
            event(EventKind::Restarted, "demo", 1),
            event(EventKind::Quarantined, "demo", 1),
            event(EventKind::Removed, "demo", 4),
        ];
        assert_eq!(recorded, numbered(&given, &ids(&recorded)));
        assert!(
            ids(&recorded).windows(2).all(|w| w[0] < w[1]),
            "{recorded:?}"
        );
        assert!(recorded[0].id > 0);
        assert_eq!(store.pending_events().unwrap(), recorded);

        // A refused change records nothing.
        let e = [event(EventKind::Installed, "demo", 4)];
        assert!(matches!(
            install_with_events(&store, &k, "demo", 4, &wasm(4, 10), &e),
            Err(StoreError::SeqNotGreater { .. })
        ));
        assert!(matches!(
            store.confirm("ghost", 1, &e),
            Err(StoreError::NotInstalled { .. })
        ));
        assert_eq!(store.pending_events().unwrap(), recorded);
        // A confirmation that changes nothing still records what the caller reports.
        install(&store, &k, "demo", 5, &wasm(5, 10));
        let e = [event(EventKind::Installed, "demo", 4)];
        let (rec, out) = store.confirm("demo", 4, &e).unwrap();
        assert_eq!(rec.state, InstallState::Probation);
        assert_eq!(out.len(), 1);
        recorded.extend(out);

        // Acknowledged events go; unknown ids are fine.
        store
            .ack_events(&[recorded[1].id, recorded[3].id, 999_999])
            .unwrap();
        recorded.remove(3);
        recorded.remove(1);
        assert_eq!(store.pending_events().unwrap(), recorded);
        store.ack_events(&[]).unwrap();
        store.flush().unwrap();
        assert_eq!(store.outbox_dropped(), 0);
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.pending_events().unwrap(), recorded);
    // Ids keep increasing after a reopen.
    let out = store
        .push_events(&[event(EventKind::Rejected, "demo", 9)])
        .unwrap();
    assert!(out[0].id > recorded.last().unwrap().id);
}

#[test]
fn event_ids_are_not_reused_when_the_last_ones_handed_out_were_lost_in_a_crash() {
    let tmp = tempdir();
    let (kept, lost) = {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        let kept = store
            .push_events(&[event(EventKind::Rejected, "demo", 1)])
            .unwrap();
        let lost = store
            .push_events(&[event(EventKind::Rejected, "demo", 2)])
            .unwrap();
        store.flush().unwrap();
        (kept[0].clone(), lost[0].clone())
    };
    // As if the second push had not reached the disk when the agent died, after the event was
    // published: the outbox and the next id as they were before it.
    {
        let db = raw_db(tmp.path());
        db.open_tree("outbox")
            .unwrap()
            .remove(lost.id.to_be_bytes())
            .unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("outbox_next_id", &lost.id.to_be_bytes()[..])
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.pending_events().unwrap(), vec![kept]);
    let next = store
        .push_events(&[event(EventKind::Rejected, "demo", 3)])
        .unwrap();
    assert!(
        next[0].id > lost.id,
        "{} reused after {}",
        next[0].id,
        lost.id
    );
}

#[test]
fn the_outbox_keeps_the_newest_events_and_counts_the_ones_it_dropped() {
    let tmp = tempdir();
    let k = key(1);
    let many = |n: u64| -> Vec<Event> {
        (0..n)
            .map(|i| event(EventKind::Rejected, "demo", i))
            .collect()
    };
    let (pending, dropped) = {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        let first = store.push_events(&many(1000)).unwrap();
        let e = many(30);
        let (_, installed) = install_with_events(&store, &k, "demo", 1, &wasm(1, 10), &e).unwrap();
        let pending = store.pending_events().unwrap();
        assert_eq!(pending.len(), OUTBOX_MAX);
        assert_eq!(pending[0], first[6]);
        assert_eq!(&pending[OUTBOX_MAX - 30..], &installed[..]);
        assert_eq!(store.outbox_dropped(), 6);
        // More than the outbox holds at once: the newest of them stay.
        let flood = store.push_events(&many(2000)).unwrap();
        assert_eq!(flood.len(), 2000);
        let pending = store.pending_events().unwrap();
        assert_eq!(pending, flood[2000 - OUTBOX_MAX..]);
        assert_eq!(store.outbox_dropped(), 6 + 2000);
        store.flush().unwrap();
        (pending, store.outbox_dropped())
    };
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.pending_events().unwrap(), pending);
    assert_eq!(store.outbox_dropped(), dropped);
}

const ABORT_ENV: &str = "EDGE_AGENT_STORE_ABORT_WORKER";
const ABORT_TEST: &str = "store::events_recorded_with_a_change_survive_an_abort_right_after_it";

#[test]
fn events_recorded_with_a_change_survive_an_abort_right_after_it() {
    if let Ok(dir) = std::env::var(ABORT_ENV) {
        // The child: a change with its event, then the process dies as a panic would.
        let store = Store::open(Path::new(&dir), CACHE).unwrap();
        let e = [event(EventKind::Installed, "demo", 1)];
        let (_, out) = install_with_events(&store, &key(1), "demo", 1, &tiny_wasm(), &e).unwrap();
        println!("event id {}", out[0].id);
        std::process::abort();
    }
    let tmp = tempdir();
    let out = crate::support::target_command(std::env::current_exe().unwrap())
        .args([ABORT_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(ABORT_ENV, tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The test harness prints its own text before it on the same line.
    let id: u64 = stdout
        .split_once("event id ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| {
            panic!(
                "the child printed no event id ({}): {stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .parse()
        .unwrap();
    assert!(!out.status.success());
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(
        store.pending_events().unwrap(),
        numbered(&[event(EventKind::Installed, "demo", 1)], &[id])
    );
}

// ---------------------------------------------------------------------------------------------
// Crash consistency: a child process works on a store and is killed with SIGKILL at a random
// moment; the parent checks the store is wholly the state before or after the operation in flight.

const WORKER_ENV: &str = "EDGE_AGENT_STORE_CRASH_WORKER";
const CRASH_TEST: &str = "store::the_store_is_wholly_old_or_new_after_sigkill_at_random_moments";

#[test]
fn the_store_is_wholly_old_or_new_after_sigkill_at_random_moments() {
    if let Ok(root) = std::env::var(WORKER_ENV) {
        crash_worker(Path::new(&root));
        return;
    }
    let tmp = tempdir();
    let root = tmp.path();
    let dir = root.join("store");
    let seed = seed();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut kills, mut mid_op, mut between, mut before_first) = (0, 0, 0, 0);
    let mut ops_total = 0usize;
    let mut state = Snapshot::default();
    while kills < 25 && started.elapsed() < Duration::from_secs(120) {
        let journal = root.join("journal");
        let _ = fs::remove_file(&journal);
        // The worker starts from what the last run left, snapshots included.
        let mut initial = Vec::new();
        ciborium::into_writer(&state, &mut initial).unwrap();
        fs::write(root.join("state"), initial).unwrap();
        let mut child = crate::support::target_command(std::env::current_exe().unwrap())
            .args([CRASH_TEST, "--exact", "--nocapture", "--test-threads", "1"])
            .env(WORKER_ENV, root)
            .env("EDGE_AGENT_STORE_CRASH_SEED", rng.next().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // One kill in five lands during start-up (`open` and its clean-up); the others once the
        // worker has begun its first operation, however slow the machine, a random while later.
        if rng.below(5) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
        } else {
            let waiting = Instant::now();
            while fs::metadata(&journal).map_or(0, |m| m.len()) == 0
                && waiting.elapsed() < Duration::from_secs(20)
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(rng.below(300)));
        }
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "worker exited on its own ({exited:?}, seed {seed}): {}",
            {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut s).unwrap();
                s
            }
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;

        let entries = read_journal(&journal);
        ops_total += entries.iter().filter(|e| e.done).count();
        let found = check_raw(&dir, seed);
        match entries.last() {
            None => {
                before_first += 1;
                assert_eq!(found, state, "killed before any operation (seed {seed})");
            }
            Some(last) => {
                assert_eq!(
                    entries[0].before, state,
                    "the worker saw the state the previous run left (seed {seed})"
                );
                if last.done {
                    between += 1;
                    assert_eq!(
                        found, last.after,
                        "after a finished operation (seed {seed})"
                    );
                } else {
                    mid_op += 1;
                    assert!(
                        found == last.before || found == last.after,
                        "killed during {}: the store is neither the state before nor after it \
                         (seed {seed})\nfound:  {found:#?}\nbefore: {:#?}\nafter:  {:#?}",
                        last.op,
                        last.before,
                        last.after
                    );
                }
            }
        }
        check_reopened(&dir, &found, seed);
        state = found;
    }
    eprintln!(
        "store crash test (seed {seed}): {kills} SIGKILLs in {:.1} s: {mid_op} during an operation, \
         {between} between operations, {before_first} before the first; {ops_total} operations completed",
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= 20, "only {kills} kills in the time allowed");
    assert!(
        mid_op >= 5,
        "only {mid_op} kills landed during an operation (seed {seed})"
    );
}

/// One line pair of the worker's journal: the operation, the state before it and the state the
/// worker's model expects after it; `done` once the operation returned and the store matched.
struct JournalEntry {
    op: String,
    before: Snapshot,
    after: Snapshot,
    done: bool,
}

fn read_journal(path: &Path) -> Vec<JournalEntry> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut entries: Vec<JournalEntry> = Vec::new();
    // Only whole lines: a kill can cut the last one short.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    for line in complete.lines() {
        if line == "A" {
            entries.last_mut().unwrap().done = true;
        } else if let Some(rest) = line.strip_prefix("B ") {
            let (op, data) = rest.split_once(' ').unwrap();
            let (before, after): (Snapshot, Snapshot) =
                ciborium::from_reader(&hex::decode(data).unwrap()[..]).unwrap();
            entries.push(JournalEntry {
                op: op.to_string(),
                before,
                after,
                done: false,
            });
        }
    }
    entries
}

/// The child: installs, upgrades, starts probations, confirms, rolls back, quarantines and
/// removes three modules (sharing three Wasm blobs of 100 B, 20 KiB and 300 KiB), writes their
/// key-value data as the version that runs, records and acknowledges events, until it is
/// killed, journaling each operation with the state before it and the state its model expects
/// after it.
fn crash_worker(root: &Path) {
    let store = Store::open(&root.join("store"), CACHE).unwrap();
    let mut model: Snapshot = cbor(&fs::read(root.join("state")).unwrap());
    assert_eq!(
        snapshot(&store),
        model.visible(),
        "the state the last run left"
    );
    let mut journal = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("journal"))
        .unwrap();
    let seed = std::env::var("EDGE_AGENT_STORE_CRASH_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let mut rng = Rng(seed);
    let mut workload = Workload::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let before = model.clone();
        let (op, after, run) = workload.next_op(&mut rng, &store, &before);
        let mut payload = Vec::new();
        ciborium::into_writer(&(&before, &after), &mut payload).unwrap();
        journal
            .write_all(format!("B {op} {}\n", hex::encode(payload)).as_bytes())
            .unwrap();
        run();
        assert_eq!(
            snapshot(&store),
            after.visible(),
            "the worker's model after {op}"
        );
        journal.write_all(b"A\n").unwrap();
        model = after;
    }
}

// ---------------------------------------------------------------------------------------------
// Full disk: a 4 MiB tmpfs, filled up, in a mount namespace of its own.

const TMPFS_ENV: &str = "EDGE_AGENT_STORE_TMPFS";
const TMPFS_DONE: &str = "tmpfs worker: done";

/// Runs `work` on a 4 MiB tmpfs: the test `test` runs again in a child process in a private
/// mount namespace (`unshare --mount`, which needs root, as the tests have in CI), where the
/// tmpfs is mounted and `work` runs; the mount goes with the namespace. Fails, never skips,
/// when the namespace or the tmpfs cannot be had.
fn on_a_small_tmpfs(test: &str, work: impl FnOnce(&Path)) {
    if let Ok(mnt) = std::env::var(TMPFS_ENV) {
        let mnt = PathBuf::from(mnt);
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&mnt)
            .status()
            .expect("running mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        work(&mnt);
        println!("{TMPFS_DONE}");
        return;
    }
    let tmp = tempdir();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let runner = std::env::var("EDGE_TEST_RUNNER").unwrap_or_default();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .args(runner.split_whitespace())
        .arg(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(TMPFS_ENV, &mnt)
        .output()
        .expect("running unshare (util-linux)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprint!("{stderr}");
    assert!(
        out.status.success() && stdout.contains(TMPFS_DONE),
        "the tmpfs worker failed ({}; a private mount namespace and a tmpfs need root):\n{stdout}\n{stderr}",
        out.status
    );
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [65536usize, 4096, 512, 1] {
        let buf = vec![0x55u8; chunk];
        while f.write_all(&buf).is_ok() {
            written += chunk as u64;
        }
    }
    let _ = f.sync_all();
    written
}

#[test]
fn a_full_disk_fails_an_install_cleanly_and_keeps_the_installed_version() {
    on_a_small_tmpfs(
        "store::a_full_disk_fails_an_install_cleanly_and_keeps_the_installed_version",
        full_disk_install,
    );
}

fn full_disk_install(mnt: &Path) {
    let dir = mnt.join("store");
    let k = key(1);
    let (w1, w2) = (wasm(1, 1000), wasm(2, 300_000));
    let (v1, last_ok, failed) = {
        let store = Store::open(&dir, CACHE).unwrap();
        install(&store, &k, "demo", 1, &w1);
        let v1 = store.confirm("demo", 1, &[]).unwrap().0;
        let mut kv = store.kv("demo", 1 << 20).unwrap();
        kv.set(b"k", b"v").unwrap();
        store.flush().unwrap();
        assert!(fill(&mnt.join("filler")) > 0);

        // The new version's Wasm does not fit: a clear error, nothing changed.
        let err = try_install(&store, &k, "demo", 2, &w2).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::WriteBlob { .. }), "{text}");
        assert!(text.contains("No space left on device"), "{text}");
        assert!(text.contains("\"demo\""), "{text}");
        assert_eq!(store.module("demo").unwrap(), Some(v1.clone()));
        assert_eq!(store.wasm(&sha(&w1)).unwrap(), w1);

        // Re-signed installs of the Wasm already stored need only database space: a few may
        // still fit in the log's last page, then one fails to flush, with an error.
        let mut last_ok = 1;
        let mut failed = None;
        for seq in 2..300 {
            match try_install(&store, &k, "demo", seq, &w1) {
                Ok(_) => last_ok = seq,
                Err(e) => {
                    eprintln!("install of seq {seq} on a full disk: {e}");
                    assert!(
                        matches!(e, StoreError::Db { .. } | StoreError::File { .. }),
                        "{e}"
                    );
                    failed = Some(seq);
                    break;
                }
            }
        }
        let failed = failed.expect("the database never ran out of space");
        // The store no longer answers from memory that may be ahead of the disk.
        for result in [store.modules().map(drop), store.flush()] {
            assert!(
                matches!(result, Err(StoreError::NeedsReopen { .. })),
                "{result:?}"
            );
        }
        eprintln!(
            "key-value write after the failure: {:?}",
            kv.set(b"k2", b"v2")
        );
        (v1, last_ok, failed)
    };
    fs::remove_file(mnt.join("filler")).unwrap();
    let store = Store::open(&dir, CACHE).unwrap();
    let rec = store.module("demo").unwrap().unwrap();
    // Wholly the last flushed install, or wholly the one whose flush failed.
    let seq = rec.current.manifest.seq;
    eprintln!("after reopen: seq {seq} (last flushed {last_ok}, flush failed {failed})");
    assert!(seq == last_ok || seq == failed, "seq {seq}");
    let highest = store.seq("demo").unwrap().unwrap().highest_seq;
    assert_eq!(highest, seq);
    if seq == 1 {
        assert_eq!(rec, v1);
    } else {
        // Every later install was on probation: the rollback target stays the proven seq 1.
        assert_eq!(rec.previous.unwrap().manifest.seq, 1);
    }
    assert_eq!(store.wasm(&rec.current.wasm_sha256()).unwrap(), w1);
    assert_eq!(blob_files(&dir), vec![sha(&w1).to_hex()]);
    assert_eq!(
        store.kv("demo", 100).unwrap().get(b"k").unwrap().unwrap(),
        b"v"
    );
    // With space again, the upgrade goes through.
    let rec = install(&store, &k, "demo", highest + 1, &w2);
    assert_eq!(rec.previous.unwrap().manifest.seq, 1);
    assert_eq!(store.wasm(&sha(&w2)).unwrap(), w2);
}

/// Every call a broken store must refuse, with what it answered when it did not.
fn calls_a_broken_store_refuses(store: &Store, k: &SigningKey, w: &[u8]) -> Vec<String> {
    let e = [event(EventKind::Rejected, "demo", 1)];
    let results: Vec<(&str, Result<(), StoreError>)> = vec![
        ("modules", store.modules().map(drop)),
        ("module", store.module("demo").map(drop)),
        ("seq", store.seq("demo").map(drop)),
        ("seqs", store.seqs().map(drop)),
        ("wasm", store.wasm(&sha(w)).map(drop)),
        ("kv", store.kv("demo", 100).map(drop)),
        ("install", try_install(store, k, "demo", 999, w).map(drop)),
        ("begin_probation", store.begin_probation("demo", 2)),
        ("confirm", store.confirm("demo", 1, &e).map(drop)),
        ("rollback", store.rollback("demo", "x", &e).map(drop)),
        (
            "set_state",
            store.set_state("demo", InstallState::Active, &e).map(drop),
        ),
        (
            "remove",
            store.remove("demo", 1000, Sha256::of(b"r"), &e).map(drop),
        ),
        ("push_events", store.push_events(&e).map(drop)),
        ("pending_events", store.pending_events().map(drop)),
        ("ack_events", store.ack_events(&[1])),
        ("flush", store.flush()),
    ];
    results
        .into_iter()
        .filter(|(_, r)| !matches!(r, Err(StoreError::NeedsReopen { .. })))
        .map(|(call, r)| format!("{call}: {r:?}"))
        .collect()
}

/// What a reopened store must hold wholly, before or after the change whose flush failed.
type Durable = (Vec<ModuleRecord>, Vec<(String, SeqRecord)>, Vec<Event>);

fn durable(store: &Store) -> Durable {
    (
        store.modules().unwrap(),
        store.seqs().unwrap(),
        store.pending_events().unwrap(),
    )
}

#[test]
fn a_failed_flush_leaves_the_store_broken_and_a_reopen_finds_the_old_or_the_new_state() {
    on_a_small_tmpfs(
        "store::a_failed_flush_leaves_the_store_broken_and_a_reopen_finds_the_old_or_the_new_state",
        failed_flush,
    );
}

fn failed_flush(mnt: &Path) {
    let dir = mnt.join("store");
    let k = key(1);
    let w = wasm(1, 1000);
    let (seq, before) = {
        let store = Store::open(&dir, CACHE).unwrap();
        install(&store, &k, "demo", 1, &w);
        store.confirm("demo", 1, &[]).unwrap();
        store.kv("demo", 1 << 20).unwrap().set(b"k", b"v").unwrap();
        store.flush().unwrap();
        assert!(!store.is_broken());
        assert!(fill(&mnt.join("filler")) > 0);
        // Upgrades to the Wasm already stored, each with its event, need database space only:
        // a few fit in what sled has left, then one commits and cannot be made durable.
        let mut failed = None;
        for seq in 2..1000 {
            let before = durable(&store);
            let e = [event(EventKind::Installed, "demo", seq)];
            match install_with_events(&store, &k, "demo", seq, &w, &e) {
                Ok(_) => assert!(!store.is_broken(), "seq {seq}"),
                Err(err) => {
                    failed = Some((seq, before, err));
                    break;
                }
            }
        }
        let (seq, before, err) = failed.expect("the database never ran out of space");
        eprintln!("install of seq {seq} on a full disk: {err}");
        assert!(
            matches!(err, StoreError::Db { .. } | StoreError::File { .. }),
            "{err}"
        );
        assert!(
            store.is_broken(),
            "a failed flush ({err}) left the store usable"
        );
        let answered = calls_a_broken_store_refuses(&store, &k, &w);
        assert!(
            answered.is_empty(),
            "a broken store answered: {answered:#?}"
        );
        assert!(store.is_broken());
        (seq, before)
    };
    fs::remove_file(mnt.join("filler")).unwrap();
    let store = Store::open(&dir, CACHE).unwrap();
    assert!(!store.is_broken());
    let (records, seqs, events) = durable(&store);
    if records == before.0 {
        assert_eq!(
            (&seqs, &events),
            (&before.1, &before.2),
            "the old state, wholly"
        );
        eprintln!("after reopen: the old state (seq {seq} lost)");
    } else {
        // The new state, wholly: the record, the seq and the event of the failed install.
        let (rec, old) = (&records[0], &before.0[0]);
        assert_eq!(rec.current.manifest.seq, seq);
        assert_eq!(rec.current.installed_at_ms, NOW_MS + seq);
        assert_eq!(rec.previous, old.previous);
        assert_eq!(rec.state, InstallState::Probation);
        assert_eq!(seqs[0].1.highest_seq, seq);
        assert_eq!(&events[..events.len() - 1], &before.2[..]);
        let last = events.last().unwrap();
        assert_eq!(
            *last,
            Event {
                id: last.id,
                ..event(EventKind::Installed, "demo", seq)
            }
        );
        assert!(before.2.last().is_none_or(|e| e.id < last.id));
        eprintln!("after reopen: the new state (seq {seq})");
    }
    assert_eq!(
        store.kv("demo", 100).unwrap().get(b"k").unwrap().unwrap(),
        b"v"
    );
    // The store takes changes again.
    let next = seqs[0].1.highest_seq + 1;
    install(&store, &k, "demo", next, &wasm(2, 1000));
    store.flush().unwrap();
}

/// Sets `key` in module demo's key-value store (quota 4 KiB).
fn kv_set(store: &Store, key: &[u8], value: &[u8]) {
    store.kv("demo", 4096).unwrap().set(key, value).unwrap();
}

/// The value of `key` in module demo's key-value store; it must be there.
fn kv_get(store: &Store, key: &[u8]) -> Vec<u8> {
    store.kv("demo", 4096).unwrap().get(key).unwrap().unwrap()
}
