//! The persistent store: everything a device needs to run its installed modules after a reboot
//! with no broker, kept on the SD card.
//!
//! # Layout (schema version 1, [`SCHEMA_VERSION`])
//!
//! The store directory holds:
//!
//! - `sled/` — a sled 0.34 database with these trees:
//!   - `meta`: `schema_version` → the schema version, u64 big-endian (`1`).
//!   - `modules`: module name (UTF-8) → CBOR [`ModuleRecord`]: the current version, the previous
//!     one (the rollback target) and the explicit [`InstallState`].
//!   - `blob_refs`: Wasm SHA-256 (32 bytes) → u64 big-endian: how many version slots (current or
//!     previous, of any module) refer to that blob. No entry when none does.
//!   - `seqs`: module name → CBOR [`SeqRecord`]: the highest `seq` ever accepted for that name
//!     (installs and removals) and the bundle that carried it. Never deleted, so a removed module
//!     cannot come back at an old version.
//!   - `kv/<name>`: the module's key-value data, raw keys → raw values (see [`SledKv`]); kept
//!     across versions, rollbacks and restarts, dropped when the module is removed.
//! - `wasm/<sha256 hex>` — the Wasm blobs, one file each, named by the SHA-256 of their content
//!   (`<sha256 hex>.tmp` while one is being written). Their SHA-256 is checked on every read.
//!
//! CBOR is ciborium's serde encoding of the types below (text keys, digests as byte strings).
//!
//! # Atomicity
//!
//! Install, rollback and removal are each one sled transaction over `modules`, `blob_refs` and
//! `seqs`, flushed before the function returns: after a crash (kill -9, panic = abort, power cut)
//! the store holds either the old or the new state, never a mix. A Wasm file is written and
//! fsynced *before* the transaction that first refers to it, and deleted only *after* the
//! transaction that drops its last reference is flushed, so every referenced blob always has its
//! file. What a crash can leave behind — a blob file nothing refers to, the key-value tree of a
//! module that is no longer installed — is removed by [`Store::open`], which also recomputes the
//! reference counts from the records and rewrites them if they differ (they never should).
//!
//! Wasm lives in files rather than in a sled tree because sled 0.34 writes values larger than a
//! quarter of its 512 KiB segment to side files it does not fsync, and on recovery skips a
//! missing one while applying the rest of its batch: after a power cut that would be a mix.
//! Durability: sled's `flush` writes its log with `sync_file_range`, which neither flushes the
//! drive's cache nor the file's metadata; every flush here is followed by an fsync of the log
//! file (and of sled's side files, for large key-value entries).

mod files;
mod kv;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
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

pub use kv::SledKv;

/// The schema version this agent writes and reads. A store with a newer one is refused.
pub const SCHEMA_VERSION: u64 = 1;

/// Key of the schema version in the `meta` tree.
const SCHEMA_KEY: &[u8] = b"schema_version";
/// Prefix of the per-module key-value trees.
const KV_PREFIX: &[u8] = b"kv/";
/// The sled database, under the store directory.
const SLED_DIR: &str = "sled";
/// The Wasm blob files, under the store directory.
const WASM_DIR: &str = "wasm";
/// sled's log file and its side files for large values, under `SLED_DIR`.
const SLED_LOG: &str = "db";
const SLED_SIDE_FILES: &str = "blobs";
/// How long [`Store::open`] waits for the database lock.
const LOCK_WAIT: Duration = Duration::from_secs(2);

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

/// A transaction over `modules`, `blob_refs` and `seqs`.
type Tx<A> = ConflictableTransactionResult<A, StoreError>;

impl Store {
    /// Opens (or creates) the store in `dir` with a page cache of `cache_capacity_bytes`. Writes
    /// the schema version into a new store and refuses a newer one; then cleans up what an
    /// interrupted operation can leave: blob files no record refers to and key-value trees of
    /// modules that are not installed. Fails with [`StoreError::Corrupt`] if a record does not
    /// decode. The directory is locked while the store (or a [`SledKv`] from it) is alive; a store
    /// another process holds is refused ([`StoreError::Open`]) after a wait of two seconds.
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
        let (meta, modules, blob_refs, seqs) = (
            tree("meta")?,
            tree("modules")?,
            tree("blob_refs")?,
            tree("seqs")?,
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
            blobs,
            writer: Mutex::new(()),
            broken: OnceLock::new(),
        };
        store.check_schema()?;
        store.clean_up()?;
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
    /// to it), and the seq record = (`manifest.seq`, `bundle_sha256`). Refuses
    /// ([`StoreError::SeqNotGreater`]) a seq not greater than the highest ever accepted for the
    /// name, and anything but an install carrying its Wasm. Flushed before it returns.
    pub fn install(
        &self,
        m: &Manifest,
        key_id: KeyId,
        wasm: Option<&[u8]>,
        bundle_sha256: Sha256,
        now_ms: u64,
    ) -> Result<ModuleRecord, StoreError> {
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
            // A fresh install starts with an empty key-value store, even if an earlier removal
            // was interrupted before it dropped the old one.
            self.drop_kv(name)?;
        }
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
        let result = self.transact(action, |modules, refs, seqs| {
            check_seq(name, m.seq, tx_seq(seqs, name)?)
                .map_err(ConflictableTransactionError::Abort)?;
            let mut deltas = Deltas::default();
            deltas.add(sha, 1);
            // The rollback target is the last version that proved itself (Active). An old
            // current that never did (still on probation, quarantined, failed) is dropped and
            // the older previous stays.
            let previous = tx_record(modules, name)?.and_then(|old| {
                if old.state == InstallState::Active {
                    if let Some(older) = &old.previous {
                        deltas.add(older.wasm_sha256(), -1);
                    }
                    Some(old.current)
                } else {
                    deltas.add(old.current.wasm_sha256(), -1);
                    old.previous
                }
            });
            let record = ModuleRecord {
                name: name.to_string(),
                current: version.clone(),
                previous,
                state: InstallState::Probation,
            };
            modules.insert(name.as_bytes(), encode(&record))?;
            let seq = SeqRecord {
                highest_seq: m.seq,
                last_bundle_sha256: bundle_sha256,
            };
            seqs.insert(name.as_bytes(), encode(&seq))?;
            let freed = deltas.apply(refs)?;
            Ok((record, freed))
        });
        match result {
            Ok((record, freed)) => {
                self.commit(&action(), &freed)?;
                Ok(record)
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

    /// Probation passed: state [`InstallState::Probation`] → [`InstallState::Active`], if the
    /// current version's seq is `seq`; otherwise nothing changes. Returns the record. Flushed.
    pub fn confirm(&self, name: &str, seq: u64) -> Result<ModuleRecord, StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let action = || format!("confirming module {name:?} seq {seq}");
        let (record, changed) = self.transact(action, |modules, _, _| {
            let mut record = tx_installed(modules, name)?;
            if record.state != InstallState::Probation || record.current.manifest.seq != seq {
                return Ok((record, false));
            }
            record.state = InstallState::Active;
            modules.insert(name.as_bytes(), encode(&record))?;
            Ok((record, true))
        })?;
        if changed {
            self.commit(&action(), &[])?;
        }
        Ok(record)
    }

    /// Probation failed: in one transaction, `current` = `previous`, `previous` = none, state
    /// [`InstallState::Active`]; the failed version's blob is deleted if nothing else refers to
    /// it. The seq record is not lowered, so neither the failed bundle nor anything older can be
    /// applied again. Returns the restored record; with no previous version the record stays,
    /// in state [`InstallState::Failed`] with `cause`, and `None` is returned. Flushed.
    pub fn rollback(&self, name: &str, cause: &str) -> Result<Option<ModuleRecord>, StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let action = || format!("rolling back module {name:?}");
        let (restored, freed) = self.transact(action, |modules, refs, _| {
            let mut record = tx_installed(modules, name)?;
            match record.previous.take() {
                Some(previous) => {
                    let mut deltas = Deltas::default();
                    deltas.add(record.current.wasm_sha256(), -1);
                    let restored = ModuleRecord {
                        name: name.to_string(),
                        current: previous,
                        previous: None,
                        state: InstallState::Active,
                    };
                    modules.insert(name.as_bytes(), encode(&restored))?;
                    let freed = deltas.apply(refs)?;
                    Ok((Some(restored), freed))
                }
                None => {
                    record.state = InstallState::Failed {
                        cause: cause.to_string(),
                    };
                    modules.insert(name.as_bytes(), encode(&record))?;
                    Ok((None, Vec::new()))
                }
            }
        })?;
        self.commit(&action(), &freed)?;
        Ok(restored)
    }

    /// A signed removal: in one transaction, the record removed, its blobs deleted if nothing
    /// else refers to them, and the seq record = (`seq`, `bundle_sha256`) — `seq` must exceed the
    /// highest accepted before ([`StoreError::SeqNotGreater`]). Then the module's key-value tree
    /// is dropped (if a crash intervenes, [`Store::open`] drops it). Valid with nothing
    /// installed too: the seq is recorded so an older install cannot come back. Returns whether
    /// a module was installed. Flushed. Drop the module's [`SledKv`] first.
    pub fn remove(&self, name: &str, seq: u64, bundle_sha256: Sha256) -> Result<bool, StoreError> {
        self.usable()?;
        check_name(name)?;
        let _writer = self.lock();
        let action = || format!("removing module {name:?} at seq {seq}");
        let (was_installed, freed) = self.transact(action, |modules, refs, seqs| {
            check_seq(name, seq, tx_seq(seqs, name)?)
                .map_err(ConflictableTransactionError::Abort)?;
            let mut deltas = Deltas::default();
            let old = match modules.remove(name.as_bytes())? {
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
            seqs.insert(name.as_bytes(), encode(&record))?;
            Ok((old.is_some(), deltas.apply(refs)?))
        })?;
        self.commit(&action(), &freed)?;
        // The removal is durable; a tree left behind by a failure here is dropped by the next
        // install of the name or the next open.
        let _ = self.drop_kv(name);
        Ok(was_installed)
    }

    /// Sets the state of an installed module (typically [`InstallState::Active`],
    /// [`InstallState::Quarantined`] or [`InstallState::Failed`]). Flushed.
    pub fn set_state(&self, name: &str, state: InstallState) -> Result<ModuleRecord, StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let action = || format!("setting the state of module {name:?}");
        let record = self.transact(action, |modules, _, _| {
            let mut record = tx_installed(modules, name)?;
            record.state = state.clone();
            modules.insert(name.as_bytes(), encode(&record))?;
            Ok(record)
        })?;
        self.commit(&action(), &[])?;
        Ok(record)
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
        let tree = self
            .db
            .open_tree(kv_tree(name))
            .map_err(|source| StoreError::Db {
                action: format!("opening the key-value store of module {name:?}"),
                source,
            })?;
        SledKv::open(name, tree, quota_bytes)
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
                |_, refs, _| {
                    for sha in stored.keys() {
                        refs.remove(&sha.0[..])?;
                    }
                    for (sha, n) in &expected {
                        refs.insert(&sha.0[..], &n.to_be_bytes())?;
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
        let installed: BTreeSet<&[u8]> = records.iter().map(|r| r.name.as_bytes()).collect();
        for tree in self.db.tree_names() {
            if let Some(name) = tree.strip_prefix(KV_PREFIX)
                && !installed.contains(name)
            {
                self.db.drop_tree(&tree).map_err(|source| StoreError::Db {
                    action: format!(
                        "dropping the key-value store of removed module {:?}",
                        String::from_utf8_lossy(name)
                    ),
                    source,
                })?;
            }
        }
        self.sync("cleaning up the store")
    }

    /// Runs `f` as one transaction over `modules`, `blob_refs` and `seqs`.
    fn transact<A>(
        &self,
        action: impl Fn() -> String,
        f: impl Fn(&TransactionalTree, &TransactionalTree, &TransactionalTree) -> Tx<A>,
    ) -> Result<A, StoreError> {
        (&self.modules, &self.blob_refs, &self.seqs)
            .transaction(|(modules, refs, seqs)| f(modules, refs, seqs))
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
        for entry in entries {
            let path = entry.map_err(file_err(side.clone()))?.path();
            match File::open(&path).and_then(|f| f.sync_all()) {
                // sled deletes side files it no longer needs at any time.
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(file_err(path)(e)),
                _ => {}
            }
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
            .drop_tree(kv_tree(name))
            .map(|_| ())
            .map_err(|source| StoreError::Db {
                action: format!("dropping the key-value store of module {name:?}"),
                source,
            })
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

fn kv_tree(name: &str) -> Vec<u8> {
    [KV_PREFIX, name.as_bytes()].concat()
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
        }
    }

    fn install(store: &Store, name: &str, seq: u64, wasm: &[u8]) -> ModuleRecord {
        let m = manifest(name, seq, wasm);
        store
            .install(&m, KeyId([7; 8]), Some(wasm), Sha256::of(b"bundle"), 1)
            .unwrap()
    }

    #[test]
    fn a_kv_handle_that_outlives_its_module_only_reports_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        install(&store, "demo", 1, WASM);
        let mut old = store.kv("demo", 1000).unwrap();
        old.set(b"k", b"old life").unwrap();
        store.remove("demo", 2, Sha256::of(b"r")).unwrap();
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
    fn reference_counts_that_disagree_with_the_records_are_rebuilt_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (WASM.to_vec(), [WASM, b"\0"].concat());
        {
            let store = Store::open(tmp.path(), 1 << 20).unwrap();
            install(&store, "one", 1, &a);
            store.confirm("one", 1).unwrap();
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
            .transact(String::new, |_, refs, _| deltas.apply(refs))
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let mut deltas = Deltas::default();
        deltas.add(Sha256::of(b"x"), 2);
        deltas.add(Sha256::of(b"y"), 1);
        deltas.add(Sha256::of(b"y"), -1);
        let freed = store
            .transact(String::new, |_, refs, _| deltas.apply(refs))
            .unwrap();
        assert!(freed.is_empty());
        assert_eq!(store.ref_count(&Sha256::of(b"x")).unwrap(), 2);
        assert_eq!(store.ref_count(&Sha256::of(b"y")).unwrap(), 0);
        let mut deltas = Deltas::default();
        deltas.add(Sha256::of(b"x"), -2);
        let freed = store
            .transact(String::new, |_, refs, _| deltas.apply(refs))
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
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::NotAnInstall { .. }), "{err}");
        assert_eq!(store.seq("demo").unwrap(), None);
    }
}
