//! The device's trust state in the store: the trust document in effect, the roots it leaves in
//! effect and the time floor, in the `meta` tree (so that a trust update is one transaction with
//! the module records it changes and the events it causes).
//!
//! - `trust_document`: the accepted document's bytes, as received (its signatures verified when
//!   it was accepted; [`crate::core::trust::Policy::from_accepted`] reads it back).
//! - `trust_version`: its version, u64 big-endian. Never lowered: a document at or below it is
//!   refused, also after a restart.
//! - `trust_roots`: the roots in effect after the document (the configured roots until a
//!   document rotates them): the threshold, u64 big-endian, then each raw 32-byte public key.
//! - `time_floor`: u64 big-endian unix seconds, the highest `issued_at` of any signed document
//!   accepted (trust documents, and bundles that carry one).

use std::sync::atomic::Ordering;

use sled::transaction::ConflictableTransactionError;

use super::{
    Deltas, InstallState, ModuleRecord, SeqRecord, Store, StoreError, decode_meta_u64, encode,
    tx_meta_u64, tx_push, tx_record, tx_seq,
};
use crate::core::protocol::Event;
use crate::core::trust::{Fixed, RootKeys};

const DOCUMENT_KEY: &[u8] = b"trust_document";
const VERSION_KEY: &[u8] = b"trust_version";
const ROOTS_KEY: &[u8] = b"trust_roots";
pub(super) const FLOOR_KEY: &[u8] = b"time_floor";

/// The trust state kept in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTrust {
    /// The document in effect.
    pub document: Vec<u8>,
    /// Its version.
    pub version: u64,
    /// The roots in effect.
    pub roots: RootKeys,
}

/// A trust document to put in effect, with what it changes.
#[derive(Debug, Clone)]
pub struct TrustChange {
    /// The document's bytes.
    pub document: Vec<u8>,
    /// Its version (must be above the stored one).
    pub version: u64,
    /// The roots in effect after it.
    pub roots: RootKeys,
    /// Its `issued_at`: the time floor rises to it.
    pub issued_at: u64,
    /// Revoked key ids, as 16 hex digits: a current version they signed is set to
    /// [`InstallState::Revoked`]; a previous version they signed is no longer a rollback target.
    pub revoked: Vec<String>,
    /// Seq floors to lower: (module, seq).
    pub seq_resets: Vec<(String, u64)>,
}

/// What a trust change did.
#[derive(Debug, Clone, Default)]
pub struct TrustApplied {
    /// Records it changed (revoked, or their rollback target dropped), after the change.
    pub changed: Vec<ModuleRecord>,
    /// Modules whose seq floor it lowered: (module, from, to).
    pub seqs_lowered: Vec<(String, u64, u64)>,
    /// The events recorded, with their ids.
    pub events: Vec<Event>,
}

impl Store {
    /// The trust state in effect, if a document was ever accepted.
    pub fn trust(&self) -> Result<Option<StoredTrust>, StoreError> {
        self.usable()?;
        let get = |key: &[u8]| {
            self.meta.get(key).map_err(|source| StoreError::Db {
                action: "reading the trust state".into(),
                source,
            })
        };
        let (Some(document), Some(version), Some(roots)) =
            (get(DOCUMENT_KEY)?, get(VERSION_KEY)?, get(ROOTS_KEY)?)
        else {
            return Ok(None);
        };
        Ok(Some(StoredTrust {
            document: document.to_vec(),
            version: decode_meta_u64(VERSION_KEY, &version)?,
            roots: decode_roots(&roots)?,
        }))
    }

    /// The version of the trust document in effect (0: none).
    pub fn trust_version(&self) -> u64 {
        self.trust_version.load(Ordering::Acquire)
    }

    /// The time floor, unix seconds (0: none yet).
    pub fn time_floor(&self) -> u64 {
        self.time_floor.load(Ordering::Acquire)
    }

    /// Raises the time floor to `unix_s` if it is higher (an accepted bundle's `issued_at`).
    /// Not flushed by itself: it becomes durable with the next flush; losing it in a crash only
    /// leaves the floor where the last flush left it.
    pub fn raise_time_floor(&self, unix_s: u64) -> Result<(), StoreError> {
        self.usable()?;
        let _writer = self.lock();
        if unix_s <= self.time_floor() {
            return Ok(());
        }
        self.meta
            .insert(FLOOR_KEY, &unix_s.to_be_bytes())
            .map_err(|source| StoreError::Db {
                action: "raising the time floor".into(),
                source,
            })?;
        self.time_floor.store(unix_s, Ordering::Release);
        Ok(())
    }

    /// Puts a trust document in effect, in one transaction with what it changes: the trust
    /// state, the time floor, revoked module versions ([`TrustChange::revoked`]), lowered seq
    /// floors and `events`. Refused ([`StoreError::TrustNotNewer`]) unless its version is above
    /// the stored one. Flushed.
    pub fn apply_trust(
        &self,
        change: &TrustChange,
        events: &[Event],
    ) -> Result<TrustApplied, StoreError> {
        self.usable()?;
        let _writer = self.lock();
        let pending = self.pending_ids(events)?;
        let names: Vec<String> = self.modules()?.into_iter().map(|r| r.name).collect();
        let action = || {
            format!(
                "putting trust document version {} in effect",
                change.version
            )
        };
        let (applied, freed, pushed, floor) = self.transact(action, |t| {
            let current = tx_meta_u64(t.meta, VERSION_KEY)?.unwrap_or(0);
            if change.version <= current {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::TrustNotNewer {
                        version: change.version,
                        current,
                    },
                ));
            }
            t.meta.insert(DOCUMENT_KEY, change.document.as_slice())?;
            t.meta.insert(VERSION_KEY, &change.version.to_be_bytes())?;
            t.meta.insert(ROOTS_KEY, encode_roots(&change.roots))?;
            let floor = tx_meta_u64(t.meta, FLOOR_KEY)?
                .unwrap_or(0)
                .max(change.issued_at);
            t.meta.insert(FLOOR_KEY, &floor.to_be_bytes())?;
            let mut applied = TrustApplied::default();
            let mut deltas = Deltas::default();
            for name in &names {
                let Some(mut record) = tx_record(t.modules, name)? else {
                    continue;
                };
                let mut changed = false;
                if change.revoked.contains(&record.current.key_id_hex)
                    && !matches!(record.state, InstallState::Revoked { .. })
                {
                    record.state = InstallState::Revoked {
                        key_id: record.current.key_id_hex.clone(),
                    };
                    changed = true;
                }
                if let Some(previous) = &record.previous
                    && change.revoked.contains(&previous.key_id_hex)
                {
                    deltas.add(previous.wasm_sha256(), -1);
                    record.previous = None;
                    record.kv_snapshot = None;
                    changed = true;
                }
                if changed {
                    t.modules.insert(name.as_bytes(), encode(&record))?;
                    applied.changed.push(record);
                }
            }
            for (module, seq) in &change.seq_resets {
                if let Some(old) = tx_seq(t.seqs, module)?
                    && old.highest_seq > *seq
                {
                    let lowered = SeqRecord {
                        highest_seq: *seq,
                        ..old
                    };
                    t.seqs.insert(module.as_bytes(), encode(&lowered))?;
                    applied
                        .seqs_lowered
                        .push((module.clone(), old.highest_seq, *seq));
                }
            }
            let freed = deltas.apply(t.refs)?;
            let pushed = tx_push(t, &pending, events)?;
            Ok((applied, freed, pushed, floor))
        })?;
        self.pushed(&pushed);
        self.commit(&action(), &freed)?;
        self.trust_version.store(change.version, Ordering::Release);
        self.time_floor.store(floor, Ordering::Release);
        for record in applied.changed.iter().filter(|r| r.kv_snapshot.is_none()) {
            // A snapshot for a rollback target that is gone belongs to nothing now.
            let _ = self.drop_snapshot(&record.name);
        }
        Ok(TrustApplied {
            events: pushed.events,
            ..applied
        })
    }

    /// Loads the cached trust version and time floor (at open).
    pub(super) fn load_trust_cache(&self) -> Result<(), StoreError> {
        let read = |key: &[u8]| -> Result<u64, StoreError> {
            match self.meta.get(key).map_err(|source| StoreError::Db {
                action: "reading the trust state".into(),
                source,
            })? {
                Some(v) => decode_meta_u64(key, &v),
                None => Ok(0),
            }
        };
        self.trust_version
            .store(read(VERSION_KEY)?, Ordering::Release);
        self.time_floor.store(read(FLOOR_KEY)?, Ordering::Release);
        Ok(())
    }
}

fn encode_roots(roots: &RootKeys) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 32 * roots.keys.len());
    out.extend_from_slice(&roots.threshold.to_be_bytes());
    for k in &roots.keys {
        out.extend_from_slice(&k.0);
    }
    out
}

fn decode_roots(bytes: &[u8]) -> Result<RootKeys, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "the trust roots".into(),
        reason: format!("{} bytes: not a threshold and 32-byte keys", bytes.len()),
    };
    let (threshold, keys) = bytes.split_first_chunk::<8>().ok_or_else(corrupt)?;
    if keys.is_empty() || keys.len() % 32 != 0 {
        return Err(corrupt());
    }
    Ok(RootKeys {
        threshold: u64::from_be_bytes(*threshold),
        keys: keys
            .chunks_exact(32)
            .map(|k| Fixed(<[u8; 32]>::try_from(k).unwrap_or([0; 32])))
            .collect(),
    })
}
