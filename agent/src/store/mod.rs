//! The persistent store: everything a device needs to run its installed modules after a reboot
//! with no broker, kept on the SD card.
//!
//! # Layout (schema version 1, [`SCHEMA_VERSION`])
//!
//! The store directory holds:
//!
//! - `sled/` — a sled 0.34 database with these trees:
//!   - `meta`: `schema_version` → the schema version, u64 big-endian (`1`); `outbox_next_id` →
//!     the next event id, u64 big-endian; `outbox_dropped` → how many events the full outbox
//!     dropped, u64 big-endian (absent while none was).
//!   - `modules`: module name (UTF-8) → CBOR [`ModuleRecord`]: the current version, the previous
//!     one (the rollback target), the explicit [`InstallState`] and `kv_snapshot`, the seq whose
//!     probation the key-value snapshot belongs to (omitted when there is none).
//!   - `blob_refs`: Wasm SHA-256 (32 bytes) → u64 big-endian: how many version slots (current or
//!     previous, of any module) refer to that blob. No entry when none does.
//!   - `seqs`: module name → CBOR [`SeqRecord`]: the highest `seq` ever accepted for that name
//!     (installs and removals) and the bundle that carried it. Never deleted, so a removed module
//!     cannot come back at an old version.
//!   - `kv/<name>`: the module's key-value data, raw keys → raw values (see [`SledKv`]); kept
//!     across versions and restarts, restored from the snapshot by a rollback, dropped when the
//!     module is removed.
//!   - `kvsnap/<name>`: a copy of `kv/<name>` taken when a new version with a rollback target
//!     starts its probation ([`Store::begin_probation`]); it exists while the record's
//!     `kv_snapshot` names the current version, and a rollback copies it back.
//!   - `outbox`: event id, u64 big-endian → CBOR [`Event`] (with its id): deployment events
//!     recorded with the change that caused them and kept until the caller acknowledges that
//!     the broker has them ([`Store::ack_events`]); at most [`OUTBOX_MAX`], the oldest dropped.
//!   - `checked`: Wasm SHA-256 (32 bytes) → the record of a passed Wasm check of that blob
//!     (opaque here: `crate::engine::CheckedWasm::record`), so that a module restarted from the
//!     store is not checked again ([`Store::check_record`]). A cache: written without a flush
//!     or a transaction, dropped with the blob; a lost or missing record costs one check.
//! - `wasm/<sha256 hex>` — the Wasm blobs, one file each, named by the SHA-256 of their content
//!   (`<sha256 hex>.tmp` while one is being written). Their SHA-256 is checked on every read.
//!
//! CBOR is ciborium's serde encoding of the types below (text keys, digests as byte strings).
//!
//! The snapshot trees, the outbox and its `meta` keys came after the first stores were written;
//! they are additions only, so the schema version stays 1: a store without them opens as one
//! with no snapshots and an empty outbox (a record without `kv_snapshot` decodes to `None`),
//! and an agent that does not know them ignores them.
//!
//! # Atomicity
//!
//! Install, confirmation, rollback, removal and state changes are each one sled transaction over
//! `modules`, `blob_refs`, `seqs`, `meta` and `outbox` (and, for taking and restoring a
//! key-value snapshot, the module's `kv/<name>` and `kvsnap/<name>`), flushed before the
//! function returns: after a crash (kill -9, panic = abort, power cut) the store holds either
//! the old or the new state — record, seqs, key-value data restored, events recorded — never a
//! mix. sled transactions cannot scan a tree, so the entries copied are read just before the
//! transaction, under the lock every change holds, with no instance writing the tree (the
//! caller's part). A Wasm file is written and fsynced *before* the transaction that first
//! refers to it, and deleted only *after* the transaction that drops its last reference is
//! flushed, so every referenced blob always has its file. What a crash can leave behind — a
//! blob file nothing refers to, the key-value tree of a module that is no longer installed, a
//! snapshot no record points at — is removed by [`Store::open`], which also recomputes the
//! reference counts from the records and rewrites them if they differ (they never should).
//! Dropping a tree is not transactional, so snapshots and key-value trees are dropped after the
//! transaction that stops referring to them.
//!
//! Events not caused by a change ([`Store::push_events`]) and acknowledgements are not flushed
//! by themselves: after a crash such an event may be missing and an acknowledged one may be
//! delivered again (at least once; consumers deduplicate by device and id). Ids are never
//! reused: [`Store::open`] moves the next id past any that may have been handed out unflushed.
//!
//! Wasm lives in files rather than in a sled tree because sled 0.34 writes values larger than a
//! quarter of its 512 KiB segment to side files it does not fsync, and on recovery skips a
//! missing one while applying the rest of its batch: after a power cut that would be a mix.
//! (Key-value values are at most 16 KiB, so a snapshot's copy never makes side files.)
//! Durability: sled's `flush` writes its log with `sync_file_range`, which neither flushes the
//! drive's cache nor the file's metadata; every flush here is followed by an fsync of the log
//! file (and of sled's side files, for large key-value entries).

mod files;
mod kv;
mod staging;
mod trust;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::Transactional as _;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};

use crate::core::keys::KeyId;
use crate::core::manifest::{Action, Manifest, Sha256, is_valid_module_name};
use crate::core::protocol::Event;

pub use kv::SledKv;
pub use trust::{StoredTrust, TrustApplied, TrustChange};

/// The schema version this agent writes and reads. A store with a newer one is refused.
pub const SCHEMA_VERSION: u64 = 1;

/// Key of the schema version in the `meta` tree.
const SCHEMA_KEY: &[u8] = b"schema_version";
/// Prefix of the per-module key-value trees.
const KV_PREFIX: &[u8] = b"kv/";
/// Prefix of the key-value snapshots taken when a version starts its probation.
const SNAPSHOT_PREFIX: &[u8] = b"kvsnap/";
/// Keys in the `meta` tree: the next event id, and how many events the full outbox dropped.
const NEXT_ID_KEY: &[u8] = b"outbox_next_id";
const DROPPED_KEY: &[u8] = b"outbox_dropped";
/// The first event id of a new store.
const FIRST_EVENT_ID: u64 = 1;
/// Each opening of the store moves the next event id to the next multiple of this (see
/// [`Store::push_events`]).
const EVENT_IDS_PER_OPEN: u64 = 1 << 32;
/// The most events the outbox holds; recording more drops the oldest.
pub const OUTBOX_MAX: usize = 1024;
/// The sled database, under the store directory.
const SLED_DIR: &str = "sled";
/// The Wasm blob files, under the store directory.
const WASM_DIR: &str = "wasm";
/// sled's log file and its side files for large values, under `SLED_DIR`.
const SLED_LOG: &str = "db";
const SLED_SIDE_FILES: &str = "blobs";
/// How long [`Store::open`] waits for the database lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store directory (or one inside it) could not be created.
    #[error("store: cannot create directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The database could not be opened (locked by another process, unreadable, ...).
    #[error("store: cannot open the database in {path}: {source}")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// The cause.
        source: sled::Error,
    },
    /// A database read, write or flush failed.
    #[error("store: {action}: database error: {source}")]
    Db {
        /// What was being done, naming the module when there is one.
        action: String,
        /// The cause.
        source: sled::Error,
    },
    /// A file operation failed.
    #[error("store: {action} {path}: {source}")]
    File {
        /// What was being done.
        action: String,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A module's Wasm could not be written (a full disk, typically); nothing was changed.
    #[error("store: cannot write the Wasm of module {module:?} to {path}: {source}")]
    WriteBlob {
        /// Module name.
        module: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Stored data is damaged: a record that does not decode, a blob whose SHA-256 does not
    /// match its name, a referenced blob whose file is missing.
    #[error("store: {what} is corrupt: {reason}")]
    Corrupt {
        /// What is damaged (names the module or the blob).
        what: String,
        /// How.
        reason: String,
    },
    /// The store was written by a newer agent with a schema this one does not know.
    #[error(
        "store: {path} has schema version {found}, newer than the {supported} this agent supports; \
         refusing to touch it (run the newer agent, or move the store aside to start empty)"
    )]
    NewerSchema {
        /// The store directory.
        path: PathBuf,
        /// The version found.
        found: u64,
        /// The version this agent writes.
        supported: u64,
    },
    /// The module is not installed.
    #[error("store: module {module:?} is not installed")]
    NotInstalled {
        /// Module name.
        module: String,
    },
    /// An install or removal whose seq does not exceed the highest accepted for the module.
    #[error(
        "store: module {module:?}: seq {seq} is not greater than {highest}, the highest accepted before"
    )]
    SeqNotGreater {
        /// Module name.
        module: String,
        /// The seq offered.
        seq: u64,
        /// The highest seq accepted before (installs and removals).
        highest: u64,
    },
    /// [`Store::install`] was given something that is not an install with its Wasm.
    #[error("store: module {module:?}: not an install: {reason}")]
    NotAnInstall {
        /// Module name.
        module: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// No blob with this SHA-256 is stored.
    #[error("store: no Wasm blob {sha256} is stored")]
    UnknownBlob {
        /// The digest asked for.
        sha256: Sha256,
    },
    /// An earlier change was committed but could not be made durable (a full disk, an IO error):
    /// what the store holds in memory may be ahead of the disk, so it answers nothing more.
    /// Reopen it (restart the agent); the disk holds the old state or the new, never a mix.
    #[error(
        "store: an earlier change could not be made durable ({cause}); the store must be reopened"
    )]
    NeedsReopen {
        /// The failure that left the store in this state.
        cause: String,
    },
    /// A trust document at or below the version in effect.
    #[error(
        "store: trust document version {version} is not above the version in effect, {current}"
    )]
    TrustNotNewer {
        /// The document's.
        version: u64,
        /// The stored one.
        current: u64,
    },
    /// Not a well-formed module name (it would not make a safe tree name).
    #[error("store: {module:?} is not a valid module name")]
    BadName {
        /// The name.
        module: String,
    },
}

/// A stored version of a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    /// The signed manifest (its `wasm` digest names the blob).
    pub manifest: Manifest,
    /// The key that signed it, as 16 hex digits.
    pub key_id_hex: String,
    /// SHA-256 of the whole bundle it came in.
    pub bundle_sha256: Sha256,
    /// When it was installed, Unix milliseconds.
    pub installed_at_ms: u64,
}

impl StoredVersion {
    /// The SHA-256 of its Wasm, the key for [`Store::wasm`].
    pub fn wasm_sha256(&self) -> Sha256 {
        // Every stored manifest has its digest: `install` requires it, decoding checks it.
        self.manifest.wasm.map_or(Sha256([0; 32]), |w| w.sha256)
    }
}

/// Explicit, persisted install state (not implied by which keys exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstallState {
    /// Just installed; not yet proven to run. A failure now rolls back.
    Probation,
    /// Running normally (probation passed, or restored by a rollback).
    Active,
    /// Stopped after repeated failures.
    Quarantined {
        /// Why.
        cause: String,
    },
    /// Failed on probation with no previous version to return to.
    Failed {
        /// Why.
        cause: String,
    },
    /// Stopped because the trust document in effect revokes the key that signed it; runs
    /// again only when a bundle under a valid key replaces it.
    Revoked {
        /// The revoked key id, 16 hex digits.
        key_id: String,
    },
}

/// An installed module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// Module name.
    pub name: String,
    /// The version to run.
    pub current: StoredVersion,
    /// The version it replaced, kept for rollback.
    pub previous: Option<StoredVersion>,
    /// Where it is in its lifecycle.
    pub state: InstallState,
    /// The seq whose probation the key-value snapshot (`kvsnap/<name>`) belongs to: a rollback
    /// while that seq is current restores the key-value tree from it. `None` when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_snapshot: Option<u64>,
}

impl ModuleRecord {
    /// The blobs it refers to, once per slot.
    fn blobs(&self) -> impl Iterator<Item = Sha256> + '_ {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .map(StoredVersion::wasm_sha256)
    }
}

/// Per module name, kept forever (also after removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRecord {
    /// The highest seq ever accepted for the name, by an install or a removal.
    pub highest_seq: u64,
    /// SHA-256 of the bundle that carried it.
    pub last_bundle_sha256: Sha256,
}

/// The device's persistent store. Cheap to share behind an `Arc`: every method takes `&self`,
/// and changes are serialised internally.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    /// sled's log file, opened again to fsync it after sled's flush.
    log: File,
    meta: sled::Tree,
    modules: sled::Tree,
    blob_refs: sled::Tree,
    seqs: sled::Tree,
    outbox: sled::Tree,
    checked: sled::Tree,
    /// Events the full outbox dropped, as recorded in `meta`.
    outbox_dropped: AtomicU64,
    /// The trust version and the time floor, as recorded in `meta` (`trust.rs`).
    trust_version: AtomicU64,
    time_floor: AtomicU64,
    blobs: files::BlobDir,
    /// Held by every change, so a blob file is never deleted while another change needs it.
    writer: Mutex<()>,
    /// Set when a committed change could not be flushed; see [`StoreError::NeedsReopen`].
    broken: OnceLock<String>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A transaction's result.
type Tx<A> = ConflictableTransactionResult<A, StoreError>;

/// The trees every transaction covers.
struct Trees<'a> {
    modules: &'a TransactionalTree,
    refs: &'a TransactionalTree,
    seqs: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    outbox: &'a TransactionalTree,
}

/// Events a transaction recorded in the outbox.
#[derive(Default)]
struct Pushed {
    /// The events, with their ids.
    events: Vec<Event>,
    /// How many events (older ones, or these) the bound on the outbox dropped.
    dropped: u64,
}

impl Store {
    /// Opens (or creates) the store in `dir` with a page cache of `cache_capacity_bytes`. Writes
    /// the schema version into a new store and refuses a newer one; then cleans up what an
    /// interrupted operation can leave: blob files no record refers to and key-value trees of
    /// modules that are not installed. Fails with [`StoreError::Corrupt`] if a record does not
    /// decode. The directory is locked while the store (or a [`SledKv`] from it) is alive; a store
    /// another process holds is refused ([`StoreError::Open`]) after a wait of ten seconds.
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<Store, StoreError> {
        let create = |path: &Path| {
            fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
                path: path.to_path_buf(),
                source,
            })
        };
        create(dir)?;
        let sled_dir = dir.join(SLED_DIR);
        let config = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(cache_capacity_bytes)
            .mode(sled::Mode::LowSpace);
        let db = open_db(&config).map_err(|source| StoreError::Open {
            path: sled_dir.clone(),
            source,
        })?;
        let log_path = sled_dir.join(SLED_LOG);
        let log = File::open(&log_path).map_err(|source| StoreError::File {
            action: "opening the database log".into(),
            path: log_path,
            source,
        })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Db {
                action: format!("opening tree {name}"),
                source,
            })
        };
        let (meta, modules, blob_refs, seqs, outbox, checked) = (
            tree("meta")?,
            tree("modules")?,
            tree("blob_refs")?,
            tree("seqs")?,
            tree("outbox")?,
            tree("checked")?,
        );
        let wasm_dir = dir.join(WASM_DIR);
        let blobs =
            files::BlobDir::open(wasm_dir.clone()).map_err(|source| StoreError::CreateDir {
                path: wasm_dir,
                source,
            })?;
        // The store directory's own entry, in case it was just created (best effort: the parent
        // may not be readable).
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = files::sync_dir(parent);
        }
        for d in [dir, &sled_dir] {
            files::sync_dir(d).map_err(|source| StoreError::File {
                action: "syncing directory".into(),
                path: d.to_path_buf(),
                source,
            })?;
        }
        let store = Store {
            dir: dir.to_path_buf(),
            db,
            log,
            meta,
            modules,
            blob_refs,
            seqs,
            outbox,
            checked,
            outbox_dropped: AtomicU64::new(0),
            trust_version: AtomicU64::new(0),
            time_floor: AtomicU64::new(0),
            blobs,
            writer: Mutex::new(()),
            broken: OnceLock::new(),
        };
        store.check_schema()?;
        store.clean_up()?;
        store.load_trust_cache()?;
        Ok(store)
    }

    /// Every installed module, sorted by name.
    pub fn modules(&self) -> Result<Vec<ModuleRecord>, StoreError> {
        self.usable()?;
        self.modules
            .iter()
            .map(|entry| {
                let (k, v) = entry.map_err(|source| StoreError::Db {
                    action: "reading the module records".into(),
                    source,
                })?;
                decode_record(&k, &v)
            })
            .collect()
    }

    /// The installed module `name`, if any.
    pub fn module(&self, name: &str) -> Result<Option<ModuleRecord>, StoreError> {
        self.usable()?;
        let value = self.modules.get(name).map_err(|source| StoreError::Db {
            action: format!("reading the record of module {name:?}"),
            source,
        })?;
        value
            .map(|v| decode_record(name.as_bytes(), &v))
            .transpose()
    }

    /// The highest seq ever accepted for `name` (by installs and removals), if any.
    pub fn seq(&self, name: &str) -> Result<Option<SeqRecord>, StoreError> {
        self.usable()?;
        let value = self.seqs.get(name).map_err(|source| StoreError::Db {
            action: format!("reading the seq of module {name:?}"),
            source,
        })?;
        value.map(|v| decode_seq(name.as_bytes(), &v)).transpose()
    }

    /// Every seq record, sorted by module name (removed modules included).
    pub fn seqs(&self) -> Result<Vec<(String, SeqRecord)>, StoreError> {
        self.usable()?;
        self.seqs
            .iter()
            .map(|entry| {
                let (k, v) = entry.map_err(|source| StoreError::Db {
                    action: "reading the seq records".into(),
                    source,
                })?;
                let record = decode_seq(&k, &v)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), record))
            })
            .collect()
    }

    /// The Wasm bytes with this SHA-256. The bytes are hashed on every read: a mismatch, or a
    /// referenced blob whose file is gone, is [`StoreError::Corrupt`] naming the blob and the
    /// modules that use it.
    pub fn wasm(&self, sha256: &Sha256) -> Result<Vec<u8>, StoreError> {
        self.usable()?;
        let _writer = self.lock();
        match self.blobs.read(sha256) {
            Ok(bytes) => {
                let actual = Sha256::of(&bytes);
                if actual == *sha256 {
                    Ok(bytes)
                } else {
                    Err(StoreError::Corrupt {
                        what: self.describe_blob(sha256),
                        reason: format!(
                            "its {} bytes hash to {actual} (file {})",
                            bytes.len(),
                            self.blobs.path(sha256).display()
                        ),
                    })
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.ref_count(sha256)? > 0 {
                    Err(StoreError::Corrupt {
                        what: self.describe_blob(sha256),
                        reason: format!(
                            "its file {} is missing",
                            self.blobs.path(sha256).display()
                        ),
                    })
                } else {
                    Err(StoreError::UnknownBlob { sha256: *sha256 })
                }
            }
            Err(source) => Err(StoreError::File {
                action: "reading Wasm blob".into(),
                path: self.blobs.path(sha256),
                source,
            }),
        }
    }

    /// Installs (or upgrades to) a verified bundle, in one transaction: the Wasm blob stored (if
    /// new), `current` = the new version in state [`InstallState::Probation`], `previous` = the
    /// old current if any (the older previous is dropped, its blob deleted if nothing else refers
    /// to it), the seq record = (`manifest.seq`, `bundle_sha256`), and `events` recorded in the
    /// outbox. Refuses ([`StoreError::SeqNotGreater`]) a seq not greater than the highest ever
    /// accepted for the name, and anything but an install carrying its Wasm; a refusal records
    /// nothing. Flushed before it returns. Returns the record and the events with their ids.
    ///
    /// An old current that never proved itself (on probation, quarantined, failed) is dropped and
    /// the older previous stays the rollback target; so does its key-value snapshot, if it has
    /// one, which then belongs to the new version's probation ([`Store::begin_probation`] keeps
    /// it): a rollback returns the previous version to its key-value data as it last ran.
    pub fn install(
        &self,
        m: &Manifest,
        key_id: KeyId,
        wasm: Option<&[u8]>,
        bundle_sha256: Sha256,
        now_ms: u64,
        events: &[Event],
    ) -> Result<(ModuleRecord, Vec<Event>), StoreError> {
        self.usable()?;
        let name = m.name.as_str();
        check_name(name)?;
        let not_install = |reason: &str| StoreError::NotAnInstall {
            module: name.to_string(),
            reason: reason.to_string(),
        };
        if m.action != Action::Install {
            return Err(not_install("the manifest's action is remove"));
        }
        let (Some(wasm), Some(wasm_ref)) = (wasm, m.wasm) else {
            return Err(not_install("it carries no Wasm module or digest"));
        };
        let sha = wasm_ref.sha256;
        if Sha256::of(wasm) != sha {
            return Err(not_install(
                "the Wasm bytes do not match the manifest's digest",
            ));
        }
        let _writer = self.lock();
        // Checked again in the transaction; here it saves writing a blob for nothing.
        check_seq(name, m.seq, self.seq(name)?)?;
        let installed_before = self.module(name)?.is_some();
        if !installed_before {
            // A fresh install starts with an empty key-value store and no snapshot, even if an
            // earlier removal was interrupted before it dropped them.
            self.drop_kv(name)?;
            self.drop_snapshot(name)?;
        }
        let pending = self.pending_ids(events)?;
        self.blobs
            .write(&sha, wasm)
            .map_err(|(path, source)| StoreError::WriteBlob {
                module: name.to_string(),
                path,
                source,
            })?;
        let version = StoredVersion {
            manifest: m.clone(),
            key_id_hex: key_id.to_string(),
            bundle_sha256,
            installed_at_ms: now_ms,
        };
        let action = || format!("installing module {name:?} seq {}", m.seq);
        let result = self.transact(action, |t| {
            check_seq(name, m.seq, tx_seq(t.seqs, name)?)
                .map_err(ConflictableTransactionError::Abort)?;
            let mut deltas = Deltas::default();
            deltas.add(sha, 1);
            // The rollback target is the last version that proved itself (Active). An old
            // current that never did (still on probation, quarantined, failed) is dropped and
            // the older previous stays, with its snapshot.
            let (previous, kv_snapshot) = match tx_record(t.modules, name)? {
                Some(old) if old.state == InstallState::Active => {
                    if let Some(older) = &old.previous {
                        deltas.add(older.wasm_sha256(), -1);
                    }
                    (Some(old.current), None)
                }
                Some(old) => {
                    deltas.add(old.current.wasm_sha256(), -1);
                    let snapshot = old.kv_snapshot.and(old.previous.as_ref()).map(|_| m.seq);
                    (old.previous, snapshot)
                }
                None => (None, None),
            };
            let record = ModuleRecord {
                name: name.to_string(),
                current: version.clone(),
                previous,
                state: InstallState::Probation,
                kv_snapshot,
            };
            t.modules.insert(name.as_bytes(), encode(&record))?;
            let seq = SeqRecord {
                highest_seq: m.seq,
                last_bundle_sha256: bundle_sha256,
            };
            t.seqs.insert(name.as_bytes(), encode(&seq))?;
            let freed = deltas.apply(t.refs)?;
            let pushed = tx_push(t, &pending, events)?;
            Ok((record, freed, pushed))
        });
        match result {
            Ok((record, freed, pushed)) => {
                self.pushed(&pushed);
                self.commit(&action(), &freed)?;
                if record.kv_snapshot.is_none() {
                    // A snapshot the old record pointed at belongs to nothing now.
                    let _ = self.drop_snapshot(name);
                }
                Ok((record, pushed.events))
            }
            Err(e) => {
                // The blob written above may be referenced by nothing now.
                if let Ok(0) = self.ref_count(&sha) {
                    self.blobs.remove(&sha);
                }
                Err(e)
            }
        }
    }

    /// The version `seq` of `name` starts its probation: if it is the current version, in state
    /// [`InstallState::Probation`], with a previous version to roll back to, the module's whole
    /// key-value tree is copied to its snapshot (`kvsnap/<name>`, replacing any older one) and
    /// the record's `kv_snapshot` set to `seq`, in one transaction, flushed. A rollback while
    /// `seq` is current then gives the previous version its key-value data back as it was.
    ///
    /// Idempotent: nothing changes when the snapshot already belongs to `seq` (after a restart
    /// during the probation, the tree holds the new version's writes; the snapshot must stay).
    /// Nothing is taken for a first install (there is nothing to roll back to) or a version
    /// that is not current or not on probation. Call it before the version's first instance
    /// runs, with no instance writing the module's key-value tree during the call.
    pub fn begin_probation(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        self.usable()?;
        check_name(name)?;
        let _writer = self.lock();
        let record = self.module(name)?.ok_or_else(|| StoreError::NotInstalled {
            module: name.to_string(),
        })?;
        if !needs_snapshot(&record, seq) {
            return Ok(());
        }
        let (kv, snapshot) = (self.kv_tree(name)?, self.snapshot_tree(name)?);
        let entries = read_entries(&kv, name)?;
        let stale = read_entries(&snapshot, name)?;
        let action = || format!("taking the key-value snapshot of module {name:?} seq {seq}");
        let taken = self.transact_kv(action, &kv, &snapshot, |t, _, snap| {
            let mut record = tx_installed(t.modules, name)?;
            if !needs_snapshot(&record, seq) {
                return Ok(false);
            }
            for (k, _) in &stale {
                snap.remove(k)?;
            }
            for (k, v) in &entries {
                snap.insert(k, v)?;
            }
            record.kv_snapshot = Some(seq);
            t.modules.insert(name.as_bytes(), encode(&record))?;
            Ok(true)
        })?;
        if taken {
            self.commit(&action(), &[])?;
        }
        Ok(())
    }

    /// Probation passed: state [`InstallState::Probation`] → [`InstallState::Active`] and the
    /// key-value snapshot dropped, if the current version's seq is `seq`; otherwise the record
    /// does not change. `events` are recorded in the outbox either way (the caller decided they
    /// happened), in the same transaction. Returns the record and the events with their ids.
    /// Flushed when anything was written.
    pub fn confirm(
        &self,
        name: &str,
        seq: u64,
        events: &[Event],
    ) -> Result<(ModuleRecord, Vec<Event>), StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let pending = self.pending_ids(events)?;
        let action = || format!("confirming module {name:?} seq {seq}");
        let (record, changed, pushed) = self.transact(action, |t| {
            let mut record = tx_installed(t.modules, name)?;
            let pushed = tx_push(t, &pending, events)?;
            if record.state != InstallState::Probation || record.current.manifest.seq != seq {
                return Ok((record, false, pushed));
            }
            record.state = InstallState::Active;
            record.kv_snapshot = None;
            t.modules.insert(name.as_bytes(), encode(&record))?;
            Ok((record, true, pushed))
        })?;
        self.pushed(&pushed);
        if changed || !pushed.events.is_empty() {
            self.commit(&action(), &[])?;
        }
        if changed {
            let _ = self.drop_snapshot(name);
        }
        Ok((record, pushed.events))
    }

    /// Probation failed: in one transaction, `current` = `previous`, `previous` = none, state
    /// [`InstallState::Active`], the module's key-value tree restored from the snapshot
    /// [`Store::begin_probation`] took for the failed version (when the record points at one
    /// for it; without one the tree stays as it is), and `events` recorded in the outbox; the
    /// failed version's blob is deleted if nothing else refers to it, the snapshot dropped. The
    /// seq record is not lowered, so neither the failed bundle nor anything older can be
    /// applied again. Returns the restored record; with no previous version the record stays,
    /// in state [`InstallState::Failed`] with `cause`, and `None` is returned. Flushed. Drop the
    /// module's [`SledKv`] first: one opened afterwards counts the restored data.
    pub fn rollback(
        &self,
        name: &str,
        cause: &str,
        events: &[Event],
    ) -> Result<(Option<ModuleRecord>, Vec<Event>), StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let pending = self.pending_ids(events)?;
        let action = || format!("rolling back module {name:?}");
        let rollback = |t: &Trees<'_>| -> Tx<_> {
            let mut record = tx_installed(t.modules, name)?;
            let snapshot = record.kv_snapshot.take();
            let result = match record.previous.take() {
                Some(previous) => {
                    let mut deltas = Deltas::default();
                    deltas.add(record.current.wasm_sha256(), -1);
                    let restored = ModuleRecord {
                        name: name.to_string(),
                        current: previous,
                        previous: None,
                        state: InstallState::Active,
                        kv_snapshot: None,
                    };
                    t.modules.insert(name.as_bytes(), encode(&restored))?;
                    let freed = deltas.apply(t.refs)?;
                    (Some(restored), freed)
                }
                None => {
                    record.state = InstallState::Failed {
                        cause: cause.to_string(),
                    };
                    t.modules.insert(name.as_bytes(), encode(&record))?;
                    (None, Vec::new())
                }
            };
            let pushed = tx_push(t, &pending, events)?;
            // Whether the snapshot is the one to restore: taken for the failed version.
            let restore = result.0.is_some() && snapshot == Some(record.current.manifest.seq);
            Ok((result, pushed, restore))
        };
        let restorable = self
            .module(name)?
            .is_some_and(|r| r.previous.is_some() && r.kv_snapshot == Some(r.current.manifest.seq));
        let ((restored, freed), pushed) = if restorable {
            let (kv, snapshot) = (self.kv_tree(name)?, self.snapshot_tree(name)?);
            let now = read_entries(&kv, name)?;
            let saved = read_entries(&snapshot, name)?;
            self.transact_kv(action, &kv, &snapshot, |t, kv, _| {
                let (result, pushed, restore) = rollback(t)?;
                if restore {
                    for (k, _) in &now {
                        kv.remove(k)?;
                    }
                    for (k, v) in &saved {
                        kv.insert(k, v)?;
                    }
                }
                Ok((result, pushed))
            })?
        } else {
            self.transact(action, |t| {
                let (result, pushed, _) = rollback(t)?;
                Ok((result, pushed))
            })?
        };
        self.pushed(&pushed);
        self.commit(&action(), &freed)?;
        let _ = self.drop_snapshot(name);
        Ok((restored, pushed.events))
    }

    /// A signed removal: in one transaction, the record removed, its blobs deleted if nothing
    /// else refers to them, the seq record = (`seq`, `bundle_sha256`) — `seq` must exceed the
    /// highest accepted before ([`StoreError::SeqNotGreater`]; nothing is recorded then) — and
    /// `events` recorded in the outbox. Then the module's key-value tree and its snapshot are
    /// dropped (if a crash intervenes, [`Store::open`] drops them). Valid with nothing
    /// installed too: the seq is recorded so an older install cannot come back. Returns whether
    /// a module was installed and the events with their ids. Flushed. Drop the module's
    /// [`SledKv`] first.
    pub fn remove(
        &self,
        name: &str,
        seq: u64,
        bundle_sha256: Sha256,
        events: &[Event],
    ) -> Result<(bool, Vec<Event>), StoreError> {
        self.usable()?;
        check_name(name)?;
        let _writer = self.lock();
        let pending = self.pending_ids(events)?;
        let action = || format!("removing module {name:?} at seq {seq}");
        let (was_installed, freed, pushed) = self.transact(action, |t| {
            check_seq(name, seq, tx_seq(t.seqs, name)?)
                .map_err(ConflictableTransactionError::Abort)?;
            let mut deltas = Deltas::default();
            let old = match t.modules.remove(name.as_bytes())? {
                Some(v) => Some(
                    decode_record(name.as_bytes(), &v)
                        .map_err(ConflictableTransactionError::Abort)?,
                ),
                None => None,
            };
            for sha in old.iter().flat_map(ModuleRecord::blobs) {
                deltas.add(sha, -1);
            }
            let record = SeqRecord {
                highest_seq: seq,
                last_bundle_sha256: bundle_sha256,
            };
            t.seqs.insert(name.as_bytes(), encode(&record))?;
            let freed = deltas.apply(t.refs)?;
            Ok((old.is_some(), freed, tx_push(t, &pending, events)?))
        })?;
        self.pushed(&pushed);
        self.commit(&action(), &freed)?;
        // The removal is durable; a tree left behind by a failure here is dropped by the next
        // install of the name or the next open.
        let _ = self.drop_kv(name);
        let _ = self.drop_snapshot(name);
        Ok((was_installed, pushed.events))
    }

    /// Sets the state of an installed module (typically [`InstallState::Active`],
    /// [`InstallState::Quarantined`] or [`InstallState::Failed`]) and records `events` in the
    /// outbox, in one transaction. The key-value snapshot, if any, stays. Flushed.
    pub fn set_state(
        &self,
        name: &str,
        state: InstallState,
        events: &[Event],
    ) -> Result<(ModuleRecord, Vec<Event>), StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let pending = self.pending_ids(events)?;
        let action = || format!("setting the state of module {name:?}");
        let (record, pushed) = self.transact(action, |t| {
            let mut record = tx_installed(t.modules, name)?;
            record.state = state.clone();
            t.modules.insert(name.as_bytes(), encode(&record))?;
            Ok((record, tx_push(t, &pending, events)?))
        })?;
        self.pushed(&pushed);
        self.commit(&action(), &[])?;
        Ok((record, pushed.events))
    }

    /// Records events that no change of the store causes (a refused bundle, say) in the
    /// outbox, in their own transaction, and returns them with their ids. Not flushed: they
    /// become durable with the next flush (of any change, or sled's own within half a second).
    ///
    /// Event ids strictly increase and are never reused, also across restarts and crashes:
    /// the next id is kept in `meta` and written in the transaction that uses it, and because
    /// an id handed out here may be lost in a crash before it was flushed (and perhaps already
    /// published), every [`Store::open`] moves the next id on to the next multiple of 2^32.
    /// The outbox holds at most [`OUTBOX_MAX`] events: recording more drops the oldest, in the
    /// same transaction, counted in [`Store::outbox_dropped`].
    pub fn push_events(&self, events: &[Event]) -> Result<Vec<Event>, StoreError> {
        self.usable()?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let _writer = self.lock();
        let pending = self.pending_ids(events)?;
        let pushed = self.transact(
            || "recording events".into(),
            |t| tx_push(t, &pending, events),
        )?;
        self.pushed(&pushed);
        Ok(pushed.events)
    }

    /// The events in the outbox (recorded, not yet acknowledged), in id order.
    pub fn pending_events(&self) -> Result<Vec<Event>, StoreError> {
        self.usable()?;
        self.outbox
            .iter()
            .map(|entry| {
                let (k, v) = entry.map_err(|source| StoreError::Db {
                    action: "reading the event outbox".into(),
                    source,
                })?;
                decode_event(&k, &v)
            })
            .collect()
    }

    /// Removes these events from the outbox: the broker has them. Ids not in the outbox are
    /// ignored. Not flushed: after a crash an acknowledged event may be delivered again.
    pub fn ack_events(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(&id.to_be_bytes()[..]);
        }
        self.outbox
            .apply_batch(batch)
            .map_err(|source| StoreError::Db {
                action: "removing acknowledged events".into(),
                source,
            })
    }

    /// How many events the outbox dropped because it was full ([`OUTBOX_MAX`]), over the
    /// store's life.
    pub fn outbox_dropped(&self) -> u64 {
        self.outbox_dropped.load(Ordering::Relaxed)
    }

    /// Whether a committed change could not be made durable: from then on every call answers
    /// [`StoreError::NeedsReopen`], and the store must be reopened (the agent restarted).
    pub fn is_broken(&self) -> bool {
        self.broken.get().is_some()
    }

    /// The key-value store of installed module `name` with this quota: its own sled tree, kept
    /// across versions, rollbacks and restarts, dropped on removal. Use one at a time per module.
    pub fn kv(&self, name: &str, quota_bytes: u64) -> Result<SledKv, StoreError> {
        self.usable()?;
        check_name(name)?;
        let _writer = self.lock();
        if self.module(name)?.is_none() {
            return Err(StoreError::NotInstalled {
                module: name.to_string(),
            });
        }
        SledKv::open(name, self.kv_tree(name)?, quota_bytes)
    }

    /// The check record kept for the blob `sha256` ([`Store::set_check_record`]), if any.
    pub fn check_record(&self, sha256: &Sha256) -> Result<Option<Vec<u8>>, StoreError> {
        self.usable()?;
        self.checked
            .get(sha256.0)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|source| StoreError::Db {
                action: format!("reading the check record of blob {sha256}"),
                source,
            })
    }

    /// Keeps `record` for the blob `sha256` while a version refers to it (nothing is kept for a
    /// blob no version refers to). Not flushed: it becomes durable with the next flush.
    pub fn set_check_record(&self, sha256: &Sha256, record: &[u8]) -> Result<(), StoreError> {
        self.usable()?;
        let _writer = self.lock();
        if self.ref_count(sha256)? == 0 {
            return Ok(());
        }
        self.checked
            .insert(sha256.0, record)
            .map(drop)
            .map_err(|source| StoreError::Db {
                action: format!("recording the check of blob {sha256}"),
                source,
            })
    }

    /// Makes everything written so far durable (key-value writes included); for shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.usable()?;
        self.sync("flushing the store")
    }

    fn usable(&self) -> Result<(), StoreError> {
        match self.broken.get() {
            Some(cause) => Err(StoreError::NeedsReopen {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let db_err = |source| StoreError::Db {
            action: "reading the schema version".into(),
            source,
        };
        match self.meta.get(SCHEMA_KEY).map_err(db_err)? {
            None => {
                self.meta
                    .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                    .map_err(|source| StoreError::Db {
                        action: "recording the schema version".into(),
                        source,
                    })?;
                self.sync("recording the schema version")
            }
            Some(v) => {
                let found = <[u8; 8]>::try_from(v.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        what: "the schema version".into(),
                        reason: format!("{} bytes instead of 8", v.len()),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: self.dir.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found < SCHEMA_VERSION {
                    return Err(StoreError::Corrupt {
                        what: "the schema version".into(),
                        reason: format!("{found} is not a version any agent wrote"),
                    });
                }
                Ok(())
            }
        }
    }

    /// Removes what an interrupted operation can leave behind (see the module docs).
    fn clean_up(&self) -> Result<(), StoreError> {
        let _writer = self.lock();
        let records = self.modules()?;
        let mut expected = BTreeMap::<Sha256, u64>::new();
        for sha in records.iter().flat_map(ModuleRecord::blobs) {
            *expected.entry(sha).or_default() += 1;
        }
        let stored = self.ref_counts()?;
        if stored != expected {
            self.transact(
                || "repairing blob reference counts".into(),
                |t| {
                    for sha in stored.keys() {
                        t.refs.remove(&sha.0[..])?;
                    }
                    for (sha, n) in &expected {
                        t.refs.insert(&sha.0[..], &n.to_be_bytes())?;
                    }
                    Ok(())
                },
            )?;
        }
        let listed = self.blobs.list().map_err(|source| StoreError::File {
            action: "listing".into(),
            path: self.dir.join(WASM_DIR),
            source,
        })?;
        for entry in listed {
            let leftover = match entry {
                files::Entry::Blob(sha, path) => (!expected.contains_key(&sha)).then_some(path),
                files::Entry::Other(path) => {
                    path.extension().is_some_and(|e| e == "tmp").then_some(path)
                }
            };
            if let Some(path) = leftover {
                self.blobs
                    .remove_path(&path)
                    .map_err(|source| StoreError::File {
                        action: "removing leftover blob".into(),
                        path,
                        source,
                    })?;
            }
        }
        self.blobs.sync().map_err(|source| StoreError::File {
            action: "syncing directory".into(),
            path: self.dir.join(WASM_DIR),
            source,
        })?;
        // Check records of blobs nothing refers to any more.
        for entry in self.checked.iter() {
            let (key, _) = entry.map_err(|source| StoreError::Db {
                action: "listing check records".into(),
                source,
            })?;
            let referenced = <[u8; 32]>::try_from(key.as_ref())
                .is_ok_and(|sha| expected.contains_key(&Sha256(sha)));
            if !referenced {
                self.checked.remove(&key).map_err(|source| StoreError::Db {
                    action: "removing a leftover check record".into(),
                    source,
                })?;
            }
        }
        let installed: BTreeSet<&[u8]> = records.iter().map(|r| r.name.as_bytes()).collect();
        // A snapshot is kept only while its record points at it (for the current version).
        let snapshots: BTreeSet<&[u8]> = records
            .iter()
            .filter(|r| r.kv_snapshot == Some(r.current.manifest.seq))
            .map(|r| r.name.as_bytes())
            .collect();
        for tree in self.db.tree_names() {
            let leftover = if let Some(name) = tree.strip_prefix(KV_PREFIX) {
                (!installed.contains(name)).then_some(("key-value store", name))
            } else if let Some(name) = tree.strip_prefix(SNAPSHOT_PREFIX) {
                (!snapshots.contains(name)).then_some(("key-value snapshot", name))
            } else {
                None
            };
            if let Some((what, name)) = leftover {
                self.db.drop_tree(&tree).map_err(|source| StoreError::Db {
                    action: format!(
                        "dropping the leftover {what} of module {:?}",
                        String::from_utf8_lossy(name)
                    ),
                    source,
                })?;
            }
        }
        self.clean_up_outbox()?;
        self.sync("cleaning up the store")
    }

    /// Moves the next event id on to the next multiple of [`EVENT_IDS_PER_OPEN`] (ids handed
    /// out since the last flush may have been lost in a crash, and perhaps published: they must
    /// not be handed out again), removes outbox entries that do not decode, counting them as
    /// dropped, and loads the dropped count. Made durable by the clean-up's flush, before the
    /// store hands out any id.
    fn clean_up_outbox(&self) -> Result<(), StoreError> {
        let db_err = |source| StoreError::Db {
            action: "cleaning up the event outbox".into(),
            source,
        };
        let mut damaged = Vec::new();
        for entry in self.outbox.iter() {
            let (k, v) = entry.map_err(db_err)?;
            if decode_event(&k, &v).is_err() {
                damaged.push(k);
            }
        }
        let dropped = self.transact(
            || "cleaning up the event outbox".into(),
            |t| {
                for k in &damaged {
                    t.outbox.remove(k)?;
                }
                let dropped = tx_meta_u64(t.meta, DROPPED_KEY)?
                    .unwrap_or(0)
                    .saturating_add(damaged.len() as u64);
                if !damaged.is_empty() {
                    t.meta.insert(DROPPED_KEY, &dropped.to_be_bytes())?;
                }
                let next = match tx_meta_u64(t.meta, NEXT_ID_KEY)? {
                    None => FIRST_EVENT_ID,
                    Some(n) => (n / EVENT_IDS_PER_OPEN)
                        .saturating_add(1)
                        .saturating_mul(EVENT_IDS_PER_OPEN),
                };
                t.meta.insert(NEXT_ID_KEY, &next.to_be_bytes())?;
                Ok(dropped)
            },
        )?;
        self.outbox_dropped.store(dropped, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `f` as one transaction over `modules`, `blob_refs`, `seqs`, `meta` and `outbox`.
    fn transact<A>(
        &self,
        action: impl Fn() -> String,
        f: impl Fn(&Trees<'_>) -> Tx<A>,
    ) -> Result<A, StoreError> {
        self.transact_over(action, &[], |t, _| f(t))
    }

    /// Runs `f` as one transaction over the trees of [`Store::transact`] and a module's
    /// key-value tree and its snapshot.
    fn transact_kv<A>(
        &self,
        action: impl Fn() -> String,
        kv: &sled::Tree,
        snapshot: &sled::Tree,
        f: impl Fn(&Trees<'_>, &TransactionalTree, &TransactionalTree) -> Tx<A>,
    ) -> Result<A, StoreError> {
        self.transact_over(action, &[kv, snapshot], |t, extra| match extra {
            [kv, snapshot] => f(t, kv, snapshot),
            _ => unreachable!("two trees were given"),
        })
    }

    fn transact_over<A>(
        &self,
        action: impl Fn() -> String,
        extra: &[&sled::Tree],
        f: impl Fn(&Trees<'_>, &[TransactionalTree]) -> Tx<A>,
    ) -> Result<A, StoreError> {
        let base = [
            &self.modules,
            &self.blob_refs,
            &self.seqs,
            &self.meta,
            &self.outbox,
        ];
        let trees: Vec<&sled::Tree> = base.iter().copied().chain(extra.iter().copied()).collect();
        trees
            .as_slice()
            .transaction(|view: &Vec<TransactionalTree>| {
                let (base, extra) = view.split_at(5);
                let trees = Trees {
                    modules: &base[0],
                    refs: &base[1],
                    seqs: &base[2],
                    meta: &base[3],
                    outbox: &base[4],
                };
                f(&trees, extra)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(source) => StoreError::Db {
                    action: action(),
                    source,
                },
            })
    }

    /// Makes a committed transaction durable, then deletes the blob files it freed. If the flush
    /// fails the files stay (the transaction may not survive a crash; `open` collects them).
    fn commit(&self, action: &str, freed: &[Sha256]) -> Result<(), StoreError> {
        self.sync(action)?;
        for sha in freed {
            let _ = self.checked.remove(sha.0);
            self.blobs.remove(sha);
        }
        if !freed.is_empty() {
            let _ = self.blobs.sync();
        }
        Ok(())
    }

    /// sled's flush, then an fsync of its log and side files (sled's flush uses
    /// `sync_file_range`, which does not reach through the drive's cache or the file's size).
    /// A failure leaves the store refusing further use ([`StoreError::NeedsReopen`]).
    fn sync(&self, action: &str) -> Result<(), StoreError> {
        self.sync_inner(action).inspect_err(|e| {
            let _ = self.broken.set(e.to_string());
        })
    }

    fn sync_inner(&self, action: &str) -> Result<(), StoreError> {
        self.db.flush().map_err(|source| StoreError::Db {
            action: format!("{action}: flushing"),
            source,
        })?;
        let file_err = |path: PathBuf| {
            move |source| StoreError::File {
                action: format!("{action}: syncing"),
                path,
                source,
            }
        };
        self.log
            .sync_all()
            .map_err(file_err(self.dir.join(SLED_DIR).join(SLED_LOG)))?;
        let side = self.dir.join(SLED_DIR).join(SLED_SIDE_FILES);
        let entries = match fs::read_dir(&side) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(file_err(side)(e)),
        };
        let mut present = 0usize;
        for entry in entries {
            let path = entry.map_err(file_err(side.clone()))?.path();
            present += 1;
            match File::open(&path).and_then(|f| f.sync_all()) {
                // sled deletes side files it no longer needs at any time.
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(file_err(path)(e)),
                _ => {}
            }
        }
        // The directory's fsync makes the entries of the side files there durable; a removal
        // need not be (a side file sled dropped that comes back after a power cut is one it no
        // longer refers to). With none there, which is the rule here (no value reaches sled's
        // side-file size: Wasm lives in blob files, key-value values are at most 16 KiB), the
        // flush costs one fsync, the log's (the power-cut test, tests/powercut, checks both).
        if present == 0 {
            return Ok(());
        }
        files::sync_dir(&side).map_err(file_err(side))
    }

    fn ref_count(&self, sha256: &Sha256) -> Result<u64, StoreError> {
        let value = self
            .blob_refs
            .get(sha256.0)
            .map_err(|source| StoreError::Db {
                action: format!("reading the reference count of blob {sha256}"),
                source,
            })?;
        value.map_or(Ok(0), |v| decode_count(sha256, &v))
    }

    fn ref_counts(&self) -> Result<BTreeMap<Sha256, u64>, StoreError> {
        self.blob_refs
            .iter()
            .map(|entry| {
                let (k, v) = entry.map_err(|source| StoreError::Db {
                    action: "reading the blob reference counts".into(),
                    source,
                })?;
                let sha = <[u8; 32]>::try_from(k.as_ref()).map(Sha256).map_err(|_| {
                    StoreError::Corrupt {
                        what: "the blob reference counts".into(),
                        reason: format!("a key of {} bytes", k.len()),
                    }
                })?;
                Ok((sha, decode_count(&sha, &v)?))
            })
            .collect()
    }

    /// "Wasm blob <sha> (module a, b)", for errors.
    fn describe_blob(&self, sha256: &Sha256) -> String {
        let users: Vec<String> = self
            .modules()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.blobs().any(|s| s == *sha256))
            .map(|r| r.name)
            .collect();
        if users.is_empty() {
            format!("Wasm blob {sha256}")
        } else {
            format!("Wasm blob {sha256} (module {})", users.join(", "))
        }
    }

    fn drop_kv(&self, name: &str) -> Result<(), StoreError> {
        self.db
            .drop_tree(kv_tree_name(name))
            .map(|_| ())
            .map_err(|source| StoreError::Db {
                action: format!("dropping the key-value store of module {name:?}"),
                source,
            })
    }

    fn drop_snapshot(&self, name: &str) -> Result<(), StoreError> {
        self.db
            .drop_tree(snapshot_tree_name(name))
            .map(|_| ())
            .map_err(|source| StoreError::Db {
                action: format!("dropping the key-value snapshot of module {name:?}"),
                source,
            })
    }

    fn kv_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(kv_tree_name(name))
            .map_err(|source| StoreError::Db {
                action: format!("opening the key-value store of module {name:?}"),
                source,
            })
    }

    fn snapshot_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(snapshot_tree_name(name))
            .map_err(|source| StoreError::Db {
                action: format!("opening the key-value snapshot of module {name:?}"),
                source,
            })
    }

    /// The ids in the outbox, in order, for a transaction that records `events` (none are read
    /// when there are none). Call with the writer lock held: every change to the outbox holds
    /// it, so the transaction sees the same ids.
    fn pending_ids(&self, events: &[Event]) -> Result<Vec<u64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.outbox
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(|source| StoreError::Db {
                    action: "reading the event outbox".into(),
                    source,
                })?;
                decode_id(&k)
            })
            .collect()
    }

    /// Counts what a committed transaction's outbox bound dropped.
    fn pushed(&self, pushed: &Pushed) {
        self.outbox_dropped
            .fetch_add(pushed.dropped, Ordering::Relaxed);
    }
}

/// Changes to blob reference counts within one transaction.
#[derive(Default)]
struct Deltas(BTreeMap<Sha256, i64>);

impl Deltas {
    fn add(&mut self, sha: Sha256, delta: i64) {
        *self.0.entry(sha).or_default() += delta;
    }

    /// Applies the changes; returns the blobs no longer referenced.
    fn apply(&self, refs: &TransactionalTree) -> Tx<Vec<Sha256>> {
        let mut freed = Vec::new();
        for (sha, &delta) in self.0.iter().filter(|(_, d)| **d != 0) {
            let count = match refs.get(sha.0)? {
                Some(v) => decode_count(sha, &v).map_err(ConflictableTransactionError::Abort)?,
                None => 0,
            };
            let after = if delta > 0 {
                count.checked_add(delta.unsigned_abs())
            } else {
                count.checked_sub(delta.unsigned_abs())
            };
            let Some(after) = after else {
                return Err(ConflictableTransactionError::Abort(StoreError::Corrupt {
                    what: format!("the reference count of Wasm blob {sha}"),
                    reason: format!("{count} cannot change by {delta}"),
                }));
            };
            if after == 0 {
                refs.remove(&sha.0[..])?;
                freed.push(*sha);
            } else {
                refs.insert(&sha.0[..], &after.to_be_bytes())?;
            }
        }
        Ok(freed)
    }
}

/// Opens the database, waiting up to [`LOCK_WAIT`] for its lock: sled's background threads let go
/// of the files a moment after the `Db` of the previous store is dropped, so a store reopened in
/// the same process could otherwise find its own old lock. Another process holding the lock
/// still makes this fail, after the wait.
fn open_db(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

fn check_name(name: &str) -> Result<(), StoreError> {
    if is_valid_module_name(name) {
        Ok(())
    } else {
        Err(StoreError::BadName {
            module: name.to_string(),
        })
    }
}

fn check_seq(name: &str, seq: u64, highest: Option<SeqRecord>) -> Result<(), StoreError> {
    match highest {
        Some(h) if seq <= h.highest_seq => Err(StoreError::SeqNotGreater {
            module: name.to_string(),
            seq,
            highest: h.highest_seq,
        }),
        _ => Ok(()),
    }
}

fn kv_tree_name(name: &str) -> Vec<u8> {
    [KV_PREFIX, name.as_bytes()].concat()
}

fn snapshot_tree_name(name: &str) -> Vec<u8> {
    [SNAPSHOT_PREFIX, name.as_bytes()].concat()
}

/// Whether [`Store::begin_probation`] of `seq` takes a snapshot for this record.
fn needs_snapshot(record: &ModuleRecord, seq: u64) -> bool {
    record.current.manifest.seq == seq
        && record.state == InstallState::Probation
        && record.previous.is_some()
        && record.kv_snapshot != Some(seq)
}

/// Every entry of a module's key-value tree or snapshot.
fn read_entries(
    tree: &sled::Tree,
    name: &str,
) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
    tree.iter()
        .collect::<Result<_, _>>()
        .map_err(|source| StoreError::Db {
            action: format!("reading the key-value data of module {name:?}"),
            source,
        })
}

/// Records `events` in the outbox with the next ids, dropping the oldest events beyond
/// [`OUTBOX_MAX`]; `pending` are the ids in the outbox before, in order.
fn tx_push(t: &Trees<'_>, pending: &[u64], events: &[Event]) -> Tx<Pushed> {
    if events.is_empty() {
        return Ok(Pushed::default());
    }
    let next = tx_meta_u64(t.meta, NEXT_ID_KEY)?.unwrap_or(FIRST_EVENT_ID);
    let after = u64::try_from(events.len())
        .ok()
        .and_then(|n| next.checked_add(n))
        .ok_or_else(|| {
            ConflictableTransactionError::Abort(StoreError::Corrupt {
                what: "the next event id".into(),
                reason: format!("{next} leaves no room for {} events", events.len()),
            })
        })?;
    let events: Vec<Event> = events
        .iter()
        .zip(next..)
        .map(|(e, id)| Event { id, ..e.clone() })
        .collect();
    let excess = (pending.len() + events.len()).saturating_sub(OUTBOX_MAX);
    for id in pending.iter().take(excess) {
        t.outbox.remove(&id.to_be_bytes())?;
    }
    for e in events.iter().skip(excess.saturating_sub(pending.len())) {
        t.outbox.insert(&e.id.to_be_bytes(), encode(e))?;
    }
    t.meta.insert(NEXT_ID_KEY, &after.to_be_bytes())?;
    let dropped = excess as u64;
    if dropped > 0 {
        let before = tx_meta_u64(t.meta, DROPPED_KEY)?.unwrap_or(0);
        t.meta
            .insert(DROPPED_KEY, &before.saturating_add(dropped).to_be_bytes())?;
    }
    Ok(Pushed { events, dropped })
}

fn tx_meta_u64(meta: &TransactionalTree, key: &[u8]) -> Tx<Option<u64>> {
    match meta.get(key)? {
        Some(v) => decode_meta_u64(key, &v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
        None => Ok(None),
    }
}

fn tx_record(modules: &TransactionalTree, name: &str) -> Tx<Option<ModuleRecord>> {
    match modules.get(name.as_bytes())? {
        Some(v) => decode_record(name.as_bytes(), &v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
        None => Ok(None),
    }
}

fn tx_installed(modules: &TransactionalTree, name: &str) -> Tx<ModuleRecord> {
    tx_record(modules, name)?.ok_or_else(|| {
        ConflictableTransactionError::Abort(StoreError::NotInstalled {
            module: name.to_string(),
        })
    })
}

fn tx_seq(seqs: &TransactionalTree, name: &str) -> Tx<Option<SeqRecord>> {
    match seqs.get(name.as_bytes())? {
        Some(v) => decode_seq(name.as_bytes(), &v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
        None => Ok(None),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    // Plain data into a Vec: cannot fail.
    ciborium::into_writer(value, &mut out).unwrap_or_else(|e| unreachable!("{e}"));
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: impl Fn() -> String) -> Result<T, StoreError> {
    let mut rest = bytes;
    let corrupt = |reason: String| StoreError::Corrupt {
        what: what(),
        reason,
    };
    let value = ciborium::from_reader(&mut rest).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} bytes after the record", rest.len())));
    }
    Ok(value)
}

fn decode_record(key: &[u8], bytes: &[u8]) -> Result<ModuleRecord, StoreError> {
    let name = String::from_utf8_lossy(key);
    let what = || format!("the record of module {name:?}");
    let record: ModuleRecord = decode(bytes, what)?;
    let corrupt = |reason: &str| StoreError::Corrupt {
        what: what(),
        reason: reason.to_string(),
    };
    if record.name.as_bytes() != key {
        return Err(corrupt(&format!("it names module {:?}", record.name)));
    }
    let versions = std::iter::once(&record.current).chain(&record.previous);
    if versions.clone().any(|v| v.manifest.wasm.is_none()) {
        return Err(corrupt("a version has no Wasm digest"));
    }
    if versions.clone().any(|v| v.manifest.name != record.name) {
        return Err(corrupt("a version's manifest names another module"));
    }
    Ok(record)
}

fn decode_seq(key: &[u8], bytes: &[u8]) -> Result<SeqRecord, StoreError> {
    decode(bytes, || {
        format!(
            "the seq record of module {:?}",
            String::from_utf8_lossy(key)
        )
    })
}

fn decode_meta_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: format!("{} in the meta tree", String::from_utf8_lossy(key)),
            reason: format!("{} bytes instead of 8", bytes.len()),
        })
}

fn decode_id(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "the event outbox".into(),
            reason: format!("a key of {} bytes", key.len()),
        })
}

fn decode_event(key: &[u8], bytes: &[u8]) -> Result<Event, StoreError> {
    let id = decode_id(key)?;
    let event: Event = decode(bytes, || format!("event {id} in the outbox"))?;
    Ok(Event { id, ..event })
}

fn decode_count(sha: &Sha256, bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: format!("the reference count of Wasm blob {sha}"),
            reason: format!("{} bytes instead of 8", bytes.len()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::WasmRef;
    use crate::runtime::kv::{KvError, KvStore as _};

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    fn manifest(name: &str, seq: u64, wasm: &[u8]) -> Manifest {
        Manifest {
            name: name.into(),
            version: format!("1.{seq}"),
            seq,
            action: Action::Install,
            wasm: Some(WasmRef {
                sha256: Sha256::of(wasm),
                size: wasm.len() as u64,
            }),
            limits: Default::default(),
            caps: Default::default(),
            expires_at: None,
            targets: None,
            issued_at: None,
            chunks: Vec::new(),
        }
    }

    fn install(store: &Store, name: &str, seq: u64, wasm: &[u8]) -> ModuleRecord {
        let m = manifest(name, seq, wasm);
        store
            .install(&m, KeyId([7; 8]), Some(wasm), Sha256::of(b"bundle"), 1, &[])
            .unwrap()
            .0
    }

    #[test]
    fn a_kv_handle_that_outlives_its_module_only_reports_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        install(&store, "demo", 1, WASM);
        let mut old = store.kv("demo", 1000).unwrap();
        old.set(b"k", b"old life").unwrap();
        store.remove("demo", 2, Sha256::of(b"r"), &[]).unwrap();
        install(&store, "demo", 3, WASM);
        let new = store.kv("demo", 1000).unwrap();
        let late = old.set(b"k", b"late write");
        assert!(
            matches!(&late, Err(KvError::Storage(m)) if m.contains("\"demo\"")),
            "{late:?}"
        );
        assert!(old.get(b"k").is_err());
        assert_eq!(new.get(b"k").unwrap(), None);
        assert_eq!(new.used_bytes(), 0);
    }

    #[test]
    fn the_sled_and_the_memory_stores_admit_and_count_alike() {
        use crate::runtime::kv::{ENTRY_OVERHEAD, MemoryKv};
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        install(&store, "demo", 1, WASM);
        let quota = 3 * ENTRY_OVERHEAD + 20;
        let mut sled = store.kv("demo", quota).unwrap();
        let mut memory = MemoryKv::new(quota);
        let script: [(&[u8], Option<&[u8]>); 12] = [
            (b"a", Some(b"12345")),
            (b"b", Some(b"")),
            (b"a", Some(b"1234567890")),
            (b"c", Some(&[0; 200])),
            (b"c", Some(b"123456")),
            (b"d", Some(b"")),
            (b"b", None),
            (b"d", Some(b"")),
            (b"a", Some(b"1")),
            (b"a", None),
            (b"a", None),
            (b"c", Some(b"123456789012345678")),
        ];
        for (key, value) in script {
            let (s, m) = match value {
                Some(v) => (
                    sled.set(key, v).map(|()| true),
                    memory.set(key, v).map(|()| true),
                ),
                None => (sled.delete(key), memory.delete(key)),
            };
            assert_eq!(s, m, "{key:?} = {value:?}");
            assert_eq!(
                sled.used_bytes(),
                memory.used_bytes(),
                "{key:?} = {value:?}"
            );
        }
        drop(sled);
        assert_eq!(
            store.kv("demo", quota).unwrap().used_bytes(),
            memory.used_bytes()
        );
    }

    #[test]
    fn a_record_without_a_snapshot_is_stored_as_before_and_old_records_decode() {
        #[derive(Serialize)]
        struct OldRecord {
            name: String,
            current: StoredVersion,
            previous: Option<StoredVersion>,
            state: InstallState,
        }
        let current = StoredVersion {
            manifest: manifest("one", 1, WASM),
            key_id_hex: "0707070707070707".into(),
            bundle_sha256: Sha256::of(b"b"),
            installed_at_ms: 1,
        };
        let old = OldRecord {
            name: "one".into(),
            current: current.clone(),
            previous: None,
            state: InstallState::Active,
        };
        let record = ModuleRecord {
            name: "one".into(),
            current,
            previous: None,
            state: InstallState::Active,
            kv_snapshot: None,
        };
        assert_eq!(encode(&record), encode(&old));
        assert_eq!(decode_record(b"one", &encode(&old)).unwrap(), record);
        let with = ModuleRecord {
            kv_snapshot: Some(1),
            ..record
        };
        assert_eq!(decode_record(b"one", &encode(&with)).unwrap(), with);
    }

    #[test]
    fn reference_counts_that_disagree_with_the_records_are_rebuilt_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (WASM.to_vec(), [WASM, b"\0"].concat());
        {
            let store = Store::open(tmp.path(), 1 << 20).unwrap();
            install(&store, "one", 1, &a);
            store.confirm("one", 1, &[]).unwrap();
            install(&store, "one", 2, &b);
            install(&store, "two", 1, &b);
            assert_eq!(
                store.ref_counts().unwrap(),
                BTreeMap::from([(Sha256::of(&a), 1), (Sha256::of(&b), 2)])
            );
            store
                .blob_refs
                .insert(Sha256::of(&a).0, &9u64.to_be_bytes()[..])
                .unwrap();
            store
                .blob_refs
                .insert([0u8; 32], &1u64.to_be_bytes()[..])
                .unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(
            store.ref_counts().unwrap(),
            BTreeMap::from([(Sha256::of(&a), 1), (Sha256::of(&b), 2)])
        );
    }

    #[test]
    fn a_reference_count_never_goes_below_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let mut deltas = Deltas::default();
        deltas.add(Sha256::of(b"x"), -1);
        let err = store
            .transact(String::new, |t| deltas.apply(t.refs))
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let mut deltas = Deltas::default();
        deltas.add(Sha256::of(b"x"), 2);
        deltas.add(Sha256::of(b"y"), 1);
        deltas.add(Sha256::of(b"y"), -1);
        let freed = store
            .transact(String::new, |t| deltas.apply(t.refs))
            .unwrap();
        assert!(freed.is_empty());
        assert_eq!(store.ref_count(&Sha256::of(b"x")).unwrap(), 2);
        assert_eq!(store.ref_count(&Sha256::of(b"y")).unwrap(), 0);
        let mut deltas = Deltas::default();
        deltas.add(Sha256::of(b"x"), -2);
        let freed = store
            .transact(String::new, |t| deltas.apply(t.refs))
            .unwrap();
        assert_eq!(freed, vec![Sha256::of(b"x")]);
        assert!(store.blob_refs.is_empty());
    }

    #[test]
    fn a_record_stored_under_another_name_is_corrupt() {
        let record = ModuleRecord {
            name: "one".into(),
            current: StoredVersion {
                manifest: manifest("one", 1, WASM),
                key_id_hex: "0707070707070707".into(),
                bundle_sha256: Sha256::of(b"b"),
                installed_at_ms: 1,
            },
            previous: None,
            state: InstallState::Active,
            kv_snapshot: None,
        };
        let bytes = encode(&record);
        assert_eq!(decode_record(b"one", &bytes).unwrap(), record);
        let err = decode_record(b"two", &bytes).unwrap_err();
        assert!(err.to_string().contains("names module \"one\""), "{err}");
        let err = decode_record(b"one", &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let err = decode_record(b"one", &[bytes.as_slice(), &[0]].concat()).unwrap_err();
        assert!(
            err.to_string().contains("1 bytes after the record"),
            "{err}"
        );
    }

    #[test]
    fn install_refuses_wasm_that_does_not_match_its_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let m = manifest("demo", 1, WASM);
        let err = store
            .install(
                &m,
                KeyId([7; 8]),
                Some(b"\0asm\x01\0\0\x01"),
                Sha256::of(b"b"),
                1,
                &[],
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::NotAnInstall { .. }), "{err}");
        assert_eq!(store.seq("demo").unwrap(), None);
    }
}
