//! A module's key-value store on sled: one tree per module name (`kv/<name>`), raw keys to raw
//! values, with the quota of [`crate::runtime::kv`] (keys plus values).

use std::fmt;

use crate::runtime::kv::{KvError, KvStore, Quota};

use super::StoreError;

/// A module's key-value store, backed by its sled tree. Implements [`KvStore`].
///
/// Used bytes are counted by scanning the tree when it is opened, then maintained by each write.
/// Every write is a single sled operation; writes become durable at sled's periodic flush
/// (every 500 ms) or at the next [`super::Store`] flush, whichever comes first. Drop it before the
/// module is removed: removal drops the tree, and a handle to a dropped tree only reports errors.
pub struct SledKv {
    module: String,
    tree: sled::Tree,
    quota: Quota,
}

impl SledKv {
    /// Opens `tree` for `module`, counting the bytes it holds.
    pub(super) fn open(module: &str, tree: sled::Tree, quota: u64) -> Result<SledKv, StoreError> {
        let mut counted = Quota::new(quota);
        for entry in tree.iter() {
            let (k, v) = entry.map_err(|source| StoreError::Db {
                action: format!("reading the key-value store of module {module:?}"),
                source,
            })?;
            counted.count(&k, &v);
        }
        Ok(SledKv {
            module: module.to_string(),
            tree,
            quota: counted,
        })
    }

    fn storage(&self, what: &str, e: sled::Error) -> KvError {
        KvError::Storage(format!(
            "module {:?}: key-value {what} failed: {e}",
            self.module
        ))
    }
}

impl fmt::Debug for SledKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledKv")
            .field("module", &self.module)
            .field("used", &self.quota.used())
            .field("quota", &self.quota.limit())
            .finish_non_exhaustive()
    }
}

impl KvStore for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.tree
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| self.storage("read", e))
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        let old = self.tree.get(key).map_err(|e| self.storage("read", e))?;
        self.quota.admit(key, old.as_deref(), value)?;
        // The value replaced is the one sled reports, in case it changed since the read above.
        let replaced = self
            .tree
            .insert(key, value)
            .map_err(|e| self.storage("write", e))?;
        self.quota.replaced(key, replaced.as_deref(), value);
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool, KvError> {
        let removed = self
            .tree
            .remove(key)
            .map_err(|e| self.storage("delete", e))?;
        self.quota.removed(key, removed.as_deref());
        Ok(removed.is_some())
    }

    fn used_bytes(&self) -> u64 {
        self.quota.used()
    }

    fn quota_bytes(&self) -> u64 {
        self.quota.limit()
    }
}
