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
use edge_agent::runtime::kv::{ENTRY_OVERHEAD, KvError, KvStore as _};
use edge_agent::store::{
    InstallState, ModuleRecord, SCHEMA_VERSION, SeqRecord, Store, StoreError, StoredVersion,
};

use crate::harness::{key, manifest, signed, tempdir, tiny_wasm, verifier};

/// A small page cache, as on a Pi.
const CACHE: u64 = 1 << 20;
const NOW_MS: u64 = 1_700_000_000_000;

/// A valid module whose bytes differ by `n`, with a data segment of `pad` bytes.
fn wasm(n: u32, pad: usize) -> Vec<u8> {
    let pages = pad / 65536 + 1;
    let data: String = (0..pad)
        .map(|i| char::from(b'a' + u8::try_from((i * 7 + n as usize) % 26).unwrap()))
        .collect();
    wat::parse_str(format!(
        r#"(module
             (memory (export "memory") {pages})
             (func (export "tick") (result i32) i32.const {n})
             (data (i32.const 0) "{data}"))"#
    ))
    .unwrap()
}

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
    let bundle = signed(manifest(name, seq), wasm, k);
    let verified = verifier(&[k]).verify(&bundle, 0, |_| None).unwrap();
    store.install(
        verified.manifest(),
        verified.key_id(),
        verified.wasm_bytes(),
        Sha256::of(&bundle),
        NOW_MS + seq,
    )
}

fn sha(wasm: &[u8]) -> Sha256 {
    Sha256::of(wasm)
}

/// The blob files in the store's `wasm/` directory.
fn blob_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("wasm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The sled database of a closed store, opened directly. sled lets go of its lock a moment after
/// a `Db` is dropped, so this waits for it as `Store::open` does.
fn raw_db(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match sled::Config::new().path(dir.join("sled")).open() {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result.unwrap(),
        }
    }
}

/// The sled trees of a closed store.
fn tree_names(dir: &Path) -> Vec<String> {
    let db = raw_db(dir);
    let mut names: Vec<String> = db
        .tree_names()
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .filter(|n| n != "__sled__default")
        .collect();
    names.sort();
    names
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
    store.confirm("demo", 1).unwrap();
    let rec = install(&store, &k, "demo", 2, &w2);
    assert_eq!(rec.previous.as_ref(), Some(&v1));
    assert_eq!(rec.current.manifest.seq, 2);
    store.confirm("demo", 2).unwrap();
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
    store.confirm("demo", 1).unwrap();
    // v2 is still on probation when v3 arrives: v3's rollback target stays v1, v2 is dropped.
    install(&store, &k, "demo", 2, &w2);
    let rec = install(&store, &k, "demo", 3, &w3);
    assert_eq!(rec.previous.as_ref(), Some(&v1));
    assert!(matches!(
        store.wasm(&sha(&w2)),
        Err(StoreError::UnknownBlob { .. })
    ));
    // A quarantined current is no rollback target either.
    store.confirm("demo", 3).unwrap();
    store
        .set_state(
            "demo",
            InstallState::Quarantined {
                cause: "crash loop".into(),
            },
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
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::NotAnInstall { .. }), "{err}");
    assert_eq!(store.seq("demo").unwrap(), None);
}

#[test]
fn rollback_restores_the_previous_version_with_its_kv_data_and_keeps_the_highest_seq() {
    let tmp = tempdir();
    let k = key(1);
    let (w1, w2) = (wasm(1, 10), wasm(2, 10));
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        let v1 = install(&store, &k, "demo", 1, &w1);
        store.confirm("demo", 1).unwrap();
        let mut kv = store.kv("demo", 4096).unwrap();
        kv.set(b"count", b"41").unwrap();
        drop(kv);
        install(&store, &k, "demo", 2, &w2);
        let mut kv = store.kv("demo", 4096).unwrap();
        assert_eq!(kv.get(b"count").unwrap().unwrap(), b"41");
        kv.set(b"count", b"42").unwrap();
        drop(kv);

        let restored = store
            .rollback("demo", "trapped on probation")
            .unwrap()
            .unwrap();
        assert_eq!(restored.current, v1.current);
        assert_eq!(restored.previous, None);
        assert_eq!(restored.state, InstallState::Active);
        // The failed version's blob is freed, the seq is not lowered.
        assert!(matches!(
            store.wasm(&sha(&w2)),
            Err(StoreError::UnknownBlob { .. })
        ));
        assert_eq!(store.seq("demo").unwrap().unwrap().highest_seq, 2);
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let rec = store.module("demo").unwrap().unwrap();
    assert_eq!(rec.current.manifest.seq, 1);
    assert_eq!(rec.state, InstallState::Active);
    assert_eq!(store.wasm(&sha(&w1)).unwrap(), w1);
    let kv = store.kv("demo", 4096).unwrap();
    assert_eq!(kv.get(b"count").unwrap().unwrap(), b"42");
    drop(kv);
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
fn rollback_without_a_previous_version_leaves_the_module_failed() {
    let tmp = tempdir();
    let store = Store::open(tmp.path(), CACHE).unwrap();
    let k = key(1);
    let w = tiny_wasm();
    install(&store, &k, "demo", 1, &w);
    assert_eq!(store.rollback("demo", "init trapped").unwrap(), None);
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
        store.rollback("nothing", "x"),
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
        store.confirm("demo", 1).unwrap().state,
        InstallState::Probation
    );
    assert_eq!(
        store.confirm("demo", 2).unwrap().state,
        InstallState::Active
    );
    let quarantined = InstallState::Quarantined {
        cause: "5 failures in 60 s".into(),
    };
    store.set_state("demo", quarantined.clone()).unwrap();
    // Confirming does not lift a quarantine.
    assert_eq!(store.confirm("demo", 2).unwrap().state, quarantined);
    drop(store);
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.module("demo").unwrap().unwrap().state, quarantined);
    assert!(matches!(
        store.confirm("ghost", 1),
        Err(StoreError::NotInstalled { .. })
    ));
    assert!(matches!(
        store.set_state("ghost", InstallState::Active),
        Err(StoreError::NotInstalled { .. })
    ));
}

#[test]
fn removal_drops_record_blobs_and_kv_but_keeps_the_seq() {
    let tmp = tempdir();
    let k = key(1);
    let (w1, w2) = (wasm(1, 10), wasm(2, 10));
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &k, "demo", 1, &w1);
        install(&store, &k, "demo", 2, &w2);
        let mut kv = store.kv("demo", 4096).unwrap();
        kv.set(b"k", b"v").unwrap();
        drop(kv);
        let removal = Sha256::of(b"removal bundle");
        assert!(matches!(
            store.remove("demo", 2, removal),
            Err(StoreError::SeqNotGreater {
                seq: 2,
                highest: 2,
                ..
            })
        ));
        assert!(store.remove("demo", 3, removal).unwrap());
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
        ["blob_refs", "meta", "modules", "seqs"]
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
    assert!(!store.remove("never", 7, Sha256::of(b"r")).unwrap());
    assert!(matches!(
        try_install(&store, &k, "never", 7, &w1),
        Err(StoreError::SeqNotGreater { highest: 7, .. })
    ));
    assert!(matches!(
        store.remove("Bad/Name", 1, Sha256::of(b"r")),
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
    store.remove("demo", 2, Sha256::of(b"r")).unwrap();
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
        store.confirm("two", 1).unwrap();
        // Same Wasm again as an upgrade of "two": three slots refer to it.
        install(&store, &k, "two", 2, &w);
        assert_eq!(blob_files(tmp.path()), vec![sha(&w).to_hex()]);
        store.remove("one", 2, Sha256::of(b"r")).unwrap();
        assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
        // Rolling "two" back drops one of its two references only.
        store.rollback("two", "probation failed").unwrap().unwrap();
        assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
    }
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(store.wasm(&sha(&w)).unwrap(), w);
    store.remove("two", 3, Sha256::of(b"r")).unwrap();
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
    {
        let store = Store::open(tmp.path(), CACHE).unwrap();
        install(&store, &key(1), "demo", 1, &w);
        store
            .kv("demo", ENTRY_OVERHEAD + 100)
            .unwrap()
            .set(b"keep", b"me")
            .unwrap();
        store.flush().unwrap();
    }
    // A blob written for an install that never committed, a half-written one, and the kv tree
    // of a module whose removal committed but whose tree was not dropped yet.
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
        db.open_tree("kv/gone").unwrap().insert("k", "v").unwrap();
        db.flush().unwrap();
    }
    assert_eq!(tree_names(tmp.path()).len(), 6);
    let store = Store::open(tmp.path(), CACHE).unwrap();
    assert_eq!(blob_files(tmp.path()), vec![sha(&w).to_hex()]);
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
        ["blob_refs", "kv/demo", "meta", "modules", "seqs"]
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
// Crash consistency: a child process works on a store and is killed with SIGKILL at a random
// moment; the parent checks the store is wholly the state before or after the operation in flight.

const WORKER_ENV: &str = "EDGE_AGENT_STORE_CRASH_WORKER";
const CRASH_TEST: &str = "store::the_store_is_wholly_old_or_new_after_sigkill_at_random_moments";

/// What the store holds, as `modules()` and `seqs()` report it.
type Snapshot = (Vec<ModuleRecord>, Vec<(String, SeqRecord)>);

fn snapshot(store: &Store) -> Snapshot {
    (store.modules().unwrap(), store.seqs().unwrap())
}

/// A tiny deterministic generator (xorshift64*), seeded per run and printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.below(items.len() as u64)).unwrap()]
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    ((t.as_secs() << 30) ^ u64::from(t.subsec_nanos()) ^ u64::from(std::process::id())) | 1
}

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
    let mut state: Snapshot = (vec![], vec![]);
    while kills < 25 && started.elapsed() < Duration::from_secs(120) {
        let journal = root.join("journal");
        let _ = fs::remove_file(&journal);
        let mut child = crate::harness::target_command(std::env::current_exe().unwrap())
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

/// Reads the killed worker's store with sled directly, before `Store::open` cleans anything:
/// reference counts equal the references, every referenced blob is there with the right hash,
/// seqs cover the versions. Returns what it holds.
fn check_raw(dir: &Path, seed: u64) -> Snapshot {
    let db = raw_db(dir);
    let records: Vec<ModuleRecord> = db
        .open_tree("modules")
        .unwrap()
        .iter()
        .map(|e| cbor(&e.unwrap().1))
        .collect();
    let seqs: Vec<(String, SeqRecord)> = db
        .open_tree("seqs")
        .unwrap()
        .iter()
        .map(|e| {
            let (k, v) = e.unwrap();
            (String::from_utf8(k.to_vec()).unwrap(), cbor(&v))
        })
        .collect();
    let refs: BTreeMap<Sha256, u64> = db
        .open_tree("blob_refs")
        .unwrap()
        .iter()
        .map(|e| {
            let (k, v) = e.unwrap();
            (
                Sha256(k.as_ref().try_into().unwrap()),
                u64::from_be_bytes(v.as_ref().try_into().unwrap()),
            )
        })
        .collect();
    let mut expected = BTreeMap::<Sha256, u64>::new();
    for rec in &records {
        let versions: Vec<&StoredVersion> =
            std::iter::once(&rec.current).chain(&rec.previous).collect();
        for v in versions {
            *expected.entry(v.wasm_sha256()).or_default() += 1;
            let bytes =
                fs::read(dir.join("wasm").join(v.wasm_sha256().to_hex())).unwrap_or_else(|e| {
                    panic!(
                        "blob of {} seq {}: {e} (seed {seed})",
                        rec.name, v.manifest.seq
                    )
                });
            assert_eq!(Sha256::of(&bytes), v.wasm_sha256(), "seed {seed}");
        }
        let seq = seqs.iter().find(|(n, _)| *n == rec.name).unwrap().1;
        assert!(seq.highest_seq >= rec.current.manifest.seq, "seed {seed}");
        if let Some(p) = &rec.previous {
            assert!(p.manifest.seq < rec.current.manifest.seq, "seed {seed}");
        }
    }
    assert_eq!(
        refs, expected,
        "blob_refs against the records (seed {seed})"
    );
    (records, seqs)
}

fn cbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    ciborium::from_reader(bytes).unwrap()
}

/// Opens the store as the agent would and checks it serves what the raw check found, with no
/// leftovers: no unreferenced blob files, no key-value trees of modules not installed.
fn check_reopened(dir: &Path, found: &Snapshot, seed: u64) {
    let store = Store::open(dir, CACHE).unwrap();
    assert_eq!(&snapshot(&store), found, "seed {seed}");
    let mut referenced = Vec::new();
    for rec in &found.0 {
        for v in std::iter::once(&rec.current).chain(&rec.previous) {
            store.wasm(&v.wasm_sha256()).unwrap();
            referenced.push(v.wasm_sha256().to_hex());
        }
        let kv = store.kv(&rec.name, 1 << 16).unwrap();
        assert!(kv.used_bytes() < 1 << 16);
    }
    drop(store);
    referenced.sort();
    referenced.dedup();
    assert_eq!(blob_files(dir), referenced, "seed {seed}");
    let installed: Vec<String> = found.0.iter().map(|r| format!("kv/{}", r.name)).collect();
    for tree in tree_names(dir) {
        if tree.starts_with("kv/") {
            assert!(
                installed.contains(&tree),
                "{tree} left behind (seed {seed})"
            );
        }
    }
}

/// The child: installs, upgrades, confirms, rolls back, quarantines and removes three modules
/// (sharing three Wasm blobs of 100 B, 20 KiB and 300 KiB) until it is killed, journaling each
/// operation with the state before it and the state its model expects after it.
fn crash_worker(root: &Path) {
    let store = Store::open(&root.join("store"), CACHE).unwrap();
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
    let k = key(7);
    let v = &verifier(&[&k]);
    let wasms = [wasm(1, 100), wasm(2, 20_000), wasm(3, 300_000)];
    let names = ["alpha", "beta", "gamma"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut clock = NOW_MS;
    while Instant::now() < deadline {
        let name = *rng.pick(&names);
        let before = snapshot(&store);
        let installed = before.0.iter().find(|r| r.name == name).cloned();
        let next_seq = store.seq(name).unwrap().map_or(1, |s| s.highest_seq + 1);
        let mut after = before.clone();
        let pick = rng.below(100);
        clock += 1;
        let (op, run): (String, Box<dyn FnOnce() + '_>) = match (&installed, pick) {
            (_, 0..40) | (None, 40..80) => {
                let w = rng.pick(&wasms);
                let bundle = signed(manifest(name, next_seq), w, &k);
                let verified = v.verify(&bundle, 0, |_| None).unwrap();
                let version = StoredVersion {
                    manifest: verified.manifest().clone(),
                    key_id_hex: verified.key_id().to_string(),
                    bundle_sha256: Sha256::of(&bundle),
                    installed_at_ms: clock,
                };
                let record = ModuleRecord {
                    name: name.to_string(),
                    current: version,
                    // The rollback target is the last version that proved itself.
                    previous: installed.clone().and_then(|r| {
                        if r.state == InstallState::Active {
                            Some(r.current)
                        } else {
                            r.previous
                        }
                    }),
                    state: InstallState::Probation,
                };
                set_record(&mut after, name, Some(record));
                set_seq(&mut after, name, next_seq, Sha256::of(&bundle));
                let store = &store;
                let now = clock;
                (
                    format!("install:{name}:{next_seq}"),
                    Box::new(move || {
                        let verified = v.verify(&bundle, 0, |_| None).unwrap();
                        store
                            .install(
                                verified.manifest(),
                                verified.key_id(),
                                verified.wasm_bytes(),
                                Sha256::of(&bundle),
                                now,
                            )
                            .unwrap();
                    }),
                )
            }
            (Some(rec), 40..55) => {
                let mut r = rec.clone();
                if r.state == InstallState::Probation {
                    r.state = InstallState::Active;
                }
                set_record(&mut after, name, Some(r));
                let seq = rec.current.manifest.seq;
                let store = &store;
                (
                    format!("confirm:{name}:{seq}"),
                    Box::new(move || drop(store.confirm(name, seq).unwrap())),
                )
            }
            (Some(rec), 55..72) => {
                let r = match &rec.previous {
                    Some(p) => ModuleRecord {
                        name: name.to_string(),
                        current: p.clone(),
                        previous: None,
                        state: InstallState::Active,
                    },
                    None => ModuleRecord {
                        state: InstallState::Failed {
                            cause: "crash test".into(),
                        },
                        ..rec.clone()
                    },
                };
                set_record(&mut after, name, Some(r));
                let store = &store;
                (
                    format!("rollback:{name}"),
                    Box::new(move || drop(store.rollback(name, "crash test").unwrap())),
                )
            }
            (Some(rec), 72..80) => {
                let state = InstallState::Quarantined {
                    cause: format!("crash test {clock}"),
                };
                set_record(
                    &mut after,
                    name,
                    Some(ModuleRecord {
                        state: state.clone(),
                        ..rec.clone()
                    }),
                );
                let store = &store;
                (
                    format!("quarantine:{name}"),
                    Box::new(move || drop(store.set_state(name, state).unwrap())),
                )
            }
            _ => {
                let sha = Sha256::of(format!("removal {next_seq}").as_bytes());
                set_record(&mut after, name, None);
                set_seq(&mut after, name, next_seq, sha);
                let store = &store;
                (
                    format!("remove:{name}:{next_seq}"),
                    Box::new(move || {
                        store.remove(name, next_seq, sha).unwrap();
                    }),
                )
            }
        };
        let mut payload = Vec::new();
        ciborium::into_writer(&(&before, &after), &mut payload).unwrap();
        journal
            .write_all(format!("B {op} {}\n", hex::encode(payload)).as_bytes())
            .unwrap();
        run();
        assert_eq!(snapshot(&store), after, "the worker's model after {op}");
        journal.write_all(b"A\n").unwrap();
        // Key-value traffic between operations (not journaled: not transactional by design).
        if let Some(rec) = after.0.iter().find(|r| r.name == name) {
            let mut kv = store.kv(&rec.name, 1 << 16).unwrap();
            let n = kv.get(b"n").unwrap().map_or(0, |v| v.len());
            kv.set(b"n", &vec![b'x'; (n + 1) % 500]).unwrap();
        }
    }
}

fn set_record(s: &mut Snapshot, name: &str, record: Option<ModuleRecord>) {
    s.0.retain(|r| r.name != name);
    s.0.extend(record);
    s.0.sort_by(|a, b| a.name.cmp(&b.name));
}

fn set_seq(s: &mut Snapshot, name: &str, seq: u64, sha: Sha256) {
    s.1.retain(|(n, _)| n != name);
    s.1.push((
        name.to_string(),
        SeqRecord {
            highest_seq: seq,
            last_bundle_sha256: sha,
        },
    ));
    s.1.sort_by(|a, b| a.0.cmp(&b.0));
}

// ---------------------------------------------------------------------------------------------
// Full disk: a 4 MiB tmpfs (root only), filled up.

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

/// Unmounts at drop, also when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
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
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs to fill needs root");
        return;
    }
    let tmp = tempdir();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mount -t tmpfs failed: {status}");
    let _unmount = Unmount(mnt.clone());
    let dir = mnt.join("store");
    let k = key(1);
    let (w1, w2) = (wasm(1, 1000), wasm(2, 300_000));
    let (v1, last_ok, failed) = {
        let store = Store::open(&dir, CACHE).unwrap();
        install(&store, &k, "demo", 1, &w1);
        let v1 = store.confirm("demo", 1).unwrap();
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
