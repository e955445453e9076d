//! The store's crash model, shared by the SIGKILL test (tests/it/store.rs) and the power-cut
//! test (tests/powercut): a random workload of installs, upgrades, probations, confirmations,
//! rollbacks, quarantines, removals, key-value writes and events on three modules, the state a
//! model of the store expects after each operation, and the checks of a store a crash left (raw
//! with sled, then through `Store::open`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edge_agent::core::manifest::Sha256;
use edge_agent::core::protocol::{Event, EventKind};
use edge_agent::core::verify::Verifier;
use edge_agent::runtime::kv::KvStore as _;
use edge_agent::store::{InstallState, ModuleRecord, OUTBOX_MAX, SeqRecord, Store, StoredVersion};

use crate::support::{key, manifest, signed, verifier};

/// A small page cache, as on a Pi.
pub const CACHE: u64 = 1 << 20;
pub const NOW_MS: u64 = 1_700_000_000_000;

/// A valid module whose bytes differ by `n`, with a data segment of `pad` bytes.
pub fn wasm(n: u32, pad: usize) -> Vec<u8> {
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

/// A deployment event about `module` at `seq`, not numbered yet.
pub fn event(kind: EventKind, module: &str, seq: u64) -> Event {
    Event {
        id: 0,
        ts_ms: NOW_MS + seq,
        kind,
        module: module.to_string(),
        version: Some(format!("1.0.{seq}")),
        seq: Some(seq),
        reason: None,
    }
}

/// The blob files in the store's `wasm/` directory.
pub fn blob_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("wasm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The sled database of a closed store, opened directly. sled lets go of its lock a moment after
/// a `Db` is dropped, so this waits for it as `Store::open` does.
pub fn raw_db(dir: &Path) -> sled::Db {
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
pub fn tree_names(dir: &Path) -> Vec<String> {
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

/// What the store holds: the records and seqs, each installed module's key-value entry
/// `writer` (the seq of the version that wrote it), the `writer` of the key-value snapshot of
/// each module whose record points at one (`hidden`: only the raw database or a rollback
/// shows it), and the pending events as "kind module seq".
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub records: Vec<ModuleRecord>,
    pub seqs: Vec<(String, SeqRecord)>,
    pub kv: Vec<(String, Option<u64>)>,
    pub hidden: Vec<(String, Option<u64>)>,
    pub events: Vec<String>,
}

impl Snapshot {
    /// What the store's own interface shows.
    pub fn visible(&self) -> Snapshot {
        Snapshot {
            hidden: Vec::new(),
            ..self.clone()
        }
    }
}

pub fn snapshot(store: &Store) -> Snapshot {
    let records = store.modules().unwrap();
    let kv = records
        .iter()
        .map(|r| {
            let kv = store.kv(&r.name, 1 << 16).unwrap();
            (r.name.clone(), writer(kv.get(b"writer").unwrap()))
        })
        .collect();
    Snapshot {
        records,
        seqs: store.seqs().unwrap(),
        kv,
        hidden: Vec::new(),
        events: store
            .pending_events()
            .unwrap()
            .iter()
            .map(describe)
            .collect(),
    }
}

pub fn writer(value: Option<impl AsRef<[u8]>>) -> Option<u64> {
    value.map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
}

pub fn describe(e: &Event) -> String {
    format!("{} {} {}", e.kind.as_str(), e.module, e.seq.unwrap())
}

/// A tiny deterministic generator (xorshift64*), seeded per run and printed on failure.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.below(items.len() as u64)).unwrap()]
    }
}

pub fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    ((t.as_secs() << 30) ^ u64::from(t.subsec_nanos()) ^ u64::from(std::process::id())) | 1
}

/// Reads the killed worker's store with sled directly, before `Store::open` cleans anything:
/// reference counts equal the references, every referenced blob is there with the right hash,
/// seqs cover the versions. Returns what it holds.
pub fn check_raw(dir: &Path, seed: u64) -> Snapshot {
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
    // A snapshot belongs to the current version, which has a version to roll back to.
    let mut kv = Vec::new();
    let mut hidden = Vec::new();
    for rec in &records {
        let tree = db.open_tree(format!("kv/{}", rec.name)).unwrap();
        kv.push((rec.name.clone(), writer(tree.get("writer").unwrap())));
        if let Some(s) = rec.kv_snapshot {
            assert_eq!(s, rec.current.manifest.seq, "{} (seed {seed})", rec.name);
            assert!(rec.previous.is_some(), "{} (seed {seed})", rec.name);
            let tree = db.open_tree(format!("kvsnap/{}", rec.name)).unwrap();
            hidden.push((rec.name.clone(), writer(tree.get("writer").unwrap())));
        }
    }
    // Events numbered below the next id, in order, each under its own id.
    let next_id = db
        .open_tree("meta")
        .unwrap()
        .get("outbox_next_id")
        .unwrap()
        .map_or(1, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
    let mut events = Vec::new();
    for entry in db.open_tree("outbox").unwrap().iter() {
        let (k, v) = entry.unwrap();
        let id = u64::from_be_bytes(k.as_ref().try_into().unwrap());
        let event: Event = cbor(&v);
        assert_eq!(event.id, id, "seed {seed}");
        assert!(id < next_id, "event {id}, next id {next_id} (seed {seed})");
        events.push(describe(&event));
    }
    assert!(events.len() <= OUTBOX_MAX, "seed {seed}");
    Snapshot {
        records,
        seqs,
        kv,
        hidden,
        events,
    }
}

pub fn cbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    ciborium::from_reader(bytes).unwrap()
}

/// Opens the store as the agent would and checks it serves what the raw check found, with no
/// leftovers: no unreferenced blob files, no key-value trees of modules not installed, no
/// snapshots no record points at.
pub fn check_reopened(dir: &Path, found: &Snapshot, seed: u64) {
    let store = Store::open(dir, CACHE).unwrap();
    assert_eq!(snapshot(&store), found.visible(), "seed {seed}");
    let mut referenced = Vec::new();
    for rec in &found.records {
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
    let installed: Vec<String> = found
        .records
        .iter()
        .map(|r| format!("kv/{}", r.name))
        .collect();
    let snapshots: Vec<String> = found
        .hidden
        .iter()
        .map(|(name, _)| format!("kvsnap/{name}"))
        .collect();
    for tree in tree_names(dir) {
        if tree.starts_with("kv/") {
            assert!(
                installed.contains(&tree),
                "{tree} left behind (seed {seed})"
            );
        }
        if tree.starts_with("kvsnap/") {
            assert!(
                snapshots.contains(&tree),
                "{tree} left behind (seed {seed})"
            );
        }
    }
}

/// What the workload works with: a signing key and its verifier, three Wasm blobs of 100 B,
/// 20 KiB and 300 KiB shared by the modules, and a clock.
pub struct Workload {
    k: SigningKey,
    v: Verifier,
    wasms: [Vec<u8>; 3],
    clock: u64,
}

impl Workload {
    pub fn new() -> Workload {
        let k = key(7);
        let v = verifier(&[&k]);
        Workload {
            k,
            v,
            wasms: [wasm(1, 100), wasm(2, 20_000), wasm(3, 300_000)],
            clock: NOW_MS,
        }
    }

    /// Draws the next operation on one of three modules, as the model in `before` (what `store`
    /// holds) allows: installs, upgrades, probations, confirmations, rollbacks, quarantines,
    /// removals, key-value writes made durable (as the group committer does), events recorded
    /// and acknowledged. Returns its name ("install:alpha:3"), the state the model expects after
    /// it, and the call, which panics if the store refuses it. Every call is durable when it
    /// returns.
    pub fn next_op<'a>(
        &'a mut self,
        rng: &mut Rng,
        store: &'a Store,
        before: &Snapshot,
    ) -> (String, Snapshot, Box<dyn FnOnce() + 'a>) {
        let names = ["alpha", "beta", "gamma"];
        let name = *rng.pick(&names);
        let installed = before.records.iter().find(|r| r.name == name).cloned();
        let next_seq = store.seq(name).unwrap().map_or(1, |s| s.highest_seq + 1);
        let mut after = before.clone();
        let pick = rng.below(100);
        self.clock += 1;
        let clock = self.clock;
        let (k, v, wasms) = (&self.k, &self.v, &self.wasms);
        let (op, run): (String, Box<dyn FnOnce() + 'a>) = match (&installed, pick) {
            (_, 0..25) | (None, 25..75) => {
                let w = rng.pick(&wasms[..]);
                let bundle = signed(manifest(name, next_seq), w, k);
                let verified = v.verify(&bundle, 0, |_| None).unwrap();
                let version = StoredVersion {
                    manifest: verified.manifest().clone(),
                    key_id_hex: verified.key_id().to_string(),
                    bundle_sha256: Sha256::of(&bundle),
                    installed_at_ms: clock,
                };
                // The rollback target is the last version that proved itself; over one that
                // did not, the target stays and so does its snapshot.
                let (previous, snapshot_kept) = match &installed {
                    Some(r) if r.state == InstallState::Active => (Some(r.current.clone()), false),
                    Some(r) => (r.previous.clone(), r.kv_snapshot.is_some()),
                    None => (None, false),
                };
                let record = ModuleRecord {
                    name: name.to_string(),
                    current: version,
                    previous,
                    state: InstallState::Probation,
                    kv_snapshot: snapshot_kept.then_some(next_seq),
                };
                set_record(&mut after, name, Some(record));
                set_seq(&mut after, name, next_seq, Sha256::of(&bundle));
                if installed.is_none() {
                    set_kv(&mut after, name, Some(None));
                }
                if !snapshot_kept {
                    set_hidden(&mut after, name, None);
                }
                let e = record_event(&mut after, EventKind::Installed, name, next_seq);
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
                                &[e],
                            )
                            .unwrap();
                    }),
                )
            }
            (Some(rec), 25..75) if needs_snapshot(rec) => {
                // As the agent does before a new version's first instance runs, before
                // anything else happens to it.
                let seq = rec.current.manifest.seq;
                let mut r = rec.clone();
                r.kv_snapshot = Some(seq);
                set_record(&mut after, name, Some(r));
                set_hidden(&mut after, name, Some(kv_of(before, name)));
                (
                    format!("begin_probation:{name}:{seq}"),
                    Box::new(move || store.begin_probation(name, seq).unwrap()),
                )
            }
            (Some(rec), 25..30) => {
                // Nothing to snapshot: begin_probation changes nothing.
                let seq = rec.current.manifest.seq;
                (
                    format!("begin_probation:{name}:{seq}"),
                    Box::new(move || store.begin_probation(name, seq).unwrap()),
                )
            }
            (Some(rec), 58..75) => {
                // The version that runs writes its seq, made durable before the next operation.
                let seq = rec.current.manifest.seq;
                set_kv(&mut after, name, Some(Some(seq)));
                (
                    format!("kv:{name}:{seq}"),
                    Box::new(move || {
                        let mut kv = store.kv(name, 1 << 16).unwrap();
                        kv.set(b"writer", &seq.to_be_bytes()).unwrap();
                        drop(kv);
                        store.flush().unwrap();
                    }),
                )
            }
            (Some(rec), 30..40) => {
                let mut r = rec.clone();
                if r.state == InstallState::Probation {
                    r.state = InstallState::Active;
                    r.kv_snapshot = None;
                    set_hidden(&mut after, name, None);
                }
                set_record(&mut after, name, Some(r));
                let seq = rec.current.manifest.seq;
                let e = record_event(&mut after, EventKind::Installed, name, seq);
                (
                    format!("confirm:{name}:{seq}"),
                    Box::new(move || drop(store.confirm(name, seq, &[e]).unwrap())),
                )
            }
            (Some(rec), 40..52) => {
                let r = match &rec.previous {
                    Some(p) => {
                        if rec.kv_snapshot == Some(rec.current.manifest.seq) {
                            set_kv(&mut after, name, Some(hidden_of(before, name)));
                        }
                        ModuleRecord {
                            name: name.to_string(),
                            current: p.clone(),
                            previous: None,
                            state: InstallState::Active,
                            kv_snapshot: None,
                        }
                    }
                    None => ModuleRecord {
                        state: InstallState::Failed {
                            cause: "crash test".into(),
                        },
                        kv_snapshot: None,
                        ..rec.clone()
                    },
                };
                set_record(&mut after, name, Some(r));
                set_hidden(&mut after, name, None);
                let seq = rec.current.manifest.seq;
                let e = record_event(&mut after, EventKind::RolledBack, name, seq);
                (
                    format!("rollback:{name}"),
                    Box::new(move || drop(store.rollback(name, "crash test", &[e]).unwrap())),
                )
            }
            (Some(rec), 52..58) => {
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
                let seq = rec.current.manifest.seq;
                let e = record_event(&mut after, EventKind::Quarantined, name, seq);
                (
                    format!("quarantine:{name}"),
                    Box::new(move || drop(store.set_state(name, state, &[e]).unwrap())),
                )
            }
            (_, 75..83) => {
                let e = record_event(&mut after, EventKind::Rejected, name, next_seq);
                (
                    format!("push:{name}:{next_seq}"),
                    Box::new(move || {
                        store.push_events(&[e]).unwrap();
                        store.flush().unwrap();
                    }),
                )
            }
            (_, 83..91) => {
                let n = after.events.len().min(20);
                after.events.drain(..n);
                (
                    format!("ack:{n}"),
                    Box::new(move || {
                        let pending = store.pending_events().unwrap();
                        let ids: Vec<u64> = pending.iter().take(n).map(|e| e.id).collect();
                        store.ack_events(&ids).unwrap();
                        store.flush().unwrap();
                    }),
                )
            }
            _ => {
                let sha = Sha256::of(format!("removal {next_seq}").as_bytes());
                set_record(&mut after, name, None);
                set_seq(&mut after, name, next_seq, sha);
                set_kv(&mut after, name, None);
                set_hidden(&mut after, name, None);
                let e = record_event(&mut after, EventKind::Removed, name, next_seq);
                (
                    format!("remove:{name}:{next_seq}"),
                    Box::new(move || {
                        store.remove(name, next_seq, sha, &[e]).unwrap();
                    }),
                )
            }
        };
        (op, after, run)
    }
}

/// Whether `Store::begin_probation` of the current version takes a snapshot.
pub fn needs_snapshot(rec: &ModuleRecord) -> bool {
    rec.state == InstallState::Probation
        && rec.previous.is_some()
        && rec.kv_snapshot != Some(rec.current.manifest.seq)
}

pub fn set_record(s: &mut Snapshot, name: &str, record: Option<ModuleRecord>) {
    s.records.retain(|r| r.name != name);
    s.records.extend(record);
    s.records.sort_by(|a, b| a.name.cmp(&b.name));
}

pub fn set_seq(s: &mut Snapshot, name: &str, seq: u64, sha: Sha256) {
    s.seqs.retain(|(n, _)| n != name);
    s.seqs.push((
        name.to_string(),
        SeqRecord {
            highest_seq: seq,
            last_bundle_sha256: sha,
        },
    ));
    s.seqs.sort_by(|a, b| a.0.cmp(&b.0));
}

/// Sets (`Some`) or removes (`None`) `name`'s entry in a sorted list.
pub fn set_entry(list: &mut Vec<(String, Option<u64>)>, name: &str, value: Option<Option<u64>>) {
    list.retain(|(n, _)| n != name);
    if let Some(value) = value {
        list.push((name.to_string(), value));
        list.sort();
    }
}

pub fn set_kv(s: &mut Snapshot, name: &str, value: Option<Option<u64>>) {
    set_entry(&mut s.kv, name, value);
}

pub fn set_hidden(s: &mut Snapshot, name: &str, value: Option<Option<u64>>) {
    set_entry(&mut s.hidden, name, value);
}

pub fn kv_of(s: &Snapshot, name: &str) -> Option<u64> {
    s.kv.iter().find(|(n, _)| n == name).and_then(|(_, v)| *v)
}

pub fn hidden_of(s: &Snapshot, name: &str) -> Option<u64> {
    s.hidden
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| *v)
}

/// Adds the event to the model's outbox (dropping the oldest beyond its bound); returns it.
pub fn record_event(s: &mut Snapshot, kind: EventKind, name: &str, seq: u64) -> Event {
    let e = event(kind, name, seq);
    s.events.push(describe(&e));
    let excess = s.events.len().saturating_sub(OUTBOX_MAX);
    s.events.drain(..excess);
    e
}
