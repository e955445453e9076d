//! Each module's key-value store, behind a trait: in memory here, sled-backed in the agent's
//! store. The quota counts the bytes of keys plus values plus [`ENTRY_OVERHEAD`] per entry, so
//! that a quota bounds what the store really spends: measured with sled 0.34 (`just bench`),
//! entries of a few bytes cost ~150 bytes of memory and ~70 bytes of disk each beyond their key
//! and value (372 000 three-byte keys: 53 MiB RSS), which a plain byte count let a 1 MiB quota
//! reach. [`Quota`] holds those rules for every store.

use std::collections::BTreeMap;

/// Why a key-value operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The write would take the module past its quota.
    #[error(
        "key-value quota exceeded: {used} bytes used, the write needs {needed} more, quota {quota}"
    )]
    QuotaExceeded {
        /// Bytes in use.
        used: u64,
        /// Additional bytes the write needs.
        needed: u64,
        /// The quota.
        quota: u64,
    },
    /// The backing storage failed.
    #[error("key-value storage failed: {0}")]
    Storage(String),
}

/// A module's key-value namespace.
pub trait KvStore: Send {
    /// The value under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Sets `key` to `value` unless that would exceed the quota.
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError>;
    /// Removes `key`; whether it existed.
    fn delete(&mut self, key: &[u8]) -> Result<bool, KvError>;
    /// Bytes of keys plus values in use.
    fn used_bytes(&self) -> u64;
    /// The quota in bytes.
    fn quota_bytes(&self) -> u64;
}

/// What each entry counts against a quota beyond its key and value bytes.
pub const ENTRY_OVERHEAD: u64 = 128;

/// The bytes `key` = `value` counts against a quota.
pub fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    ENTRY_OVERHEAD + (key.len() + value.len()) as u64
}

/// A quota and the bytes counted against it: the quota rules, in one place for every store.
///
/// A store asks [`Quota::admit`] before it replaces an entry, then tells [`Quota::replaced`]
/// (or [`Quota::removed`]) what it really replaced, as its backing storage reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    used: u64,
    limit: u64,
}

impl Quota {
    /// A quota of `limit` bytes with nothing counted yet.
    pub fn new(limit: u64) -> Quota {
        Quota { used: 0, limit }
    }

    /// Bytes counted (see [`entry_bytes`]).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The quota in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts an entry that is already stored (a store counting what it holds when it opens).
    pub fn count(&mut self, key: &[u8], value: &[u8]) {
        self.used = self.used.saturating_add(entry_bytes(key, value));
    }

    /// Whether `key` = `value` may replace `old` (the entry's value now, if any). A write that
    /// does not grow the count always fits, even over a quota lowered since (an upgrade);
    /// one that grows it must end within the quota.
    pub fn admit(&self, key: &[u8], old: Option<&[u8]>, value: &[u8]) -> Result<(), KvError> {
        let old = old.map_or(0, |v| entry_bytes(key, v));
        let new = entry_bytes(key, value);
        let after = self.used - old.min(self.used) + new;
        if new > old && after > self.limit {
            return Err(KvError::QuotaExceeded {
                used: self.used,
                needed: new - old,
                quota: self.limit,
            });
        }
        Ok(())
    }

    /// Counts `key` = `value` in place of `replaced` (the value the store reports it replaced).
    pub fn replaced(&mut self, key: &[u8], replaced: Option<&[u8]>, value: &[u8]) {
        self.removed(key, replaced);
        self.used = self.used.saturating_add(entry_bytes(key, value));
    }

    /// Stops counting `key` = `removed` (nothing if there was no entry).
    pub fn removed(&mut self, key: &[u8], removed: Option<&[u8]>) {
        let bytes = removed.map_or(0, |v| entry_bytes(key, v));
        self.used = self.used.saturating_sub(bytes);
    }
}

/// An in-memory store (for `edge-agent run-module` and tests).
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    quota: Quota,
}

impl MemoryKv {
    /// An empty store with this quota.
    pub fn new(quota: u64) -> Self {
        MemoryKv {
            entries: BTreeMap::new(),
            quota: Quota::new(quota),
        }
    }
}

impl KvStore for MemoryKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.entries.get(key).cloned())
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.quota
            .admit(key, self.entries.get(key).map(Vec::as_slice), value)?;
        let replaced = self.entries.insert(key.to_vec(), value.to_vec());
        self.quota.replaced(key, replaced.as_deref(), value);
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool, KvError> {
        let removed = self.entries.remove(key);
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

#[cfg(test)]
mod tests {
    use super::*;

    const O: u64 = ENTRY_OVERHEAD;

    #[test]
    fn keys_and_values_count_against_the_quota() {
        let mut kv = MemoryKv::new(O + 10);
        kv.set(b"ab", b"cdef").unwrap();
        assert_eq!(kv.used_bytes(), O + 6);
        assert!(matches!(
            kv.set(b"x", b"12345"),
            Err(KvError::QuotaExceeded { needed, .. }) if needed == O + 6
        ));
        // Replacing a value with a smaller one always fits; growing it counts only the growth.
        kv.set(b"ab", b"c").unwrap();
        assert_eq!(kv.used_bytes(), O + 3);
        kv.set(b"ab", b"cdefghij").unwrap();
        assert_eq!(kv.used_bytes(), O + 10);
        assert!(kv.delete(b"ab").unwrap());
        assert!(!kv.delete(b"ab").unwrap());
        assert_eq!(kv.used_bytes(), 0);
        assert_eq!(kv.get(b"ab").unwrap(), None);
    }

    #[test]
    fn every_entry_pays_its_overhead_so_tiny_keys_cannot_flood_the_store() {
        let quota = 1 << 20;
        let mut kv = MemoryKv::new(quota);
        let mut n = 0u32;
        while kv.set(format!("{n:x}").as_bytes(), b"").is_ok() {
            n += 1;
        }
        // Without the overhead, ~250 000 keys of up to 5 bytes fit in a MiB.
        assert!(u64::from(n) <= quota / O, "{n} entries fit");
        assert!(u64::from(n) > quota / (O + 8), "{n} entries fit");
    }

    #[test]
    fn the_quota_admits_a_replacement_by_its_growth_and_counts_what_was_really_replaced() {
        let mut q = Quota::new(2 * O + 10);
        q.admit(b"k", None, b"12345").unwrap();
        q.replaced(b"k", None, b"12345");
        assert_eq!(q.used(), O + 6);
        // Growing by more than is left is refused; the refusal names the growth only.
        assert_eq!(
            q.admit(
                b"k",
                Some(b"12345"),
                &vec![0; usize::try_from(O + 10).unwrap()]
            ),
            Err(KvError::QuotaExceeded {
                used: O + 6,
                needed: O + 5,
                quota: 2 * O + 10
            })
        );
        // Growth that fits, and a new entry that fits exactly.
        q.admit(b"k", Some(b"12345"), b"123456").unwrap();
        q.replaced(b"k", Some(b"12345"), b"123456");
        q.admit(b"j", None, b"12").unwrap();
        q.replaced(b"j", None, b"12");
        assert_eq!(q.used(), 2 * O + 10);
        assert!(q.admit(b"i", None, b"").is_err());
        // What the store reports it replaced is what stops counting.
        q.replaced(b"k", Some(b"123456"), b"1");
        assert_eq!(q.used(), 2 * O + 5);
        q.removed(b"j", Some(b"12"));
        q.removed(b"j", None);
        assert_eq!(q.used(), O + 2);
    }

    #[test]
    fn over_a_lowered_quota_only_writes_that_do_not_grow_are_admitted() {
        let mut q = Quota::new(5);
        q.count(b"key", b"a long value");
        assert_eq!((q.used(), q.limit()), (O + 15, 5));
        q.admit(b"key", Some(b"a long value"), b"short").unwrap();
        q.admit(b"key", Some(b"a long value"), b"a long value")
            .unwrap();
        assert!(
            q.admit(b"key", Some(b"a long value"), b"a longer value")
                .is_err()
        );
        assert!(q.admit(b"new", None, b"").is_err());
        // Counting never wraps, whatever a store reports.
        q.removed(b"key", Some(&[0; 200]));
        assert_eq!(q.used(), 0);
    }

    #[test]
    fn a_zero_quota_refuses_every_write() {
        let mut kv = MemoryKv::new(0);
        assert!(kv.set(b"k", b"").is_err());
    }
}
