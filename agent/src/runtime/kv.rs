//! Each module's key-value store, behind a trait: in memory here, sled-backed in the agent's
//! store. The quota counts the bytes of keys plus values plus [`ENTRY_OVERHEAD`] per entry, so
//! that a quota bounds what the store really spends: measured with sled 0.34 (`just bench`),
//! entries of a few bytes cost ~150 bytes of memory and ~70 bytes of disk each beyond their key
//! and value (372 000 three-byte keys: 53 MiB RSS), which a plain byte count let a 1 MiB quota
//! reach.

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

/// Checks that replacing an entry of `old` bytes by one of `new` bytes fits in the quota.
pub fn check_quota(used: u64, old: u64, new: u64, quota: u64) -> Result<(), KvError> {
    let after = used - old.min(used) + new;
    if new > old && after > quota {
        return Err(KvError::QuotaExceeded {
            used,
            needed: new - old,
            quota,
        });
    }
    Ok(())
}

/// An in-memory store (for `edge-agent run-module` and tests).
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    used: u64,
    quota: u64,
}

impl MemoryKv {
    /// An empty store with this quota.
    pub fn new(quota: u64) -> Self {
        MemoryKv {
            quota,
            ..Default::default()
        }
    }
}

impl KvStore for MemoryKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.entries.get(key).cloned())
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        let old = self.entries.get(key).map_or(0, |v| entry_bytes(key, v));
        let new = entry_bytes(key, value);
        check_quota(self.used, old, new, self.quota)?;
        self.entries.insert(key.to_vec(), value.to_vec());
        self.used = self.used - old + new;
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool, KvError> {
        match self.entries.remove(key) {
            Some(v) => {
                self.used -= entry_bytes(key, &v);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn used_bytes(&self) -> u64 {
        self.used
    }

    fn quota_bytes(&self) -> u64 {
        self.quota
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
    fn a_zero_quota_refuses_every_write() {
        let mut kv = MemoryKv::new(0);
        assert!(kv.set(b"k", b"").is_err());
    }
}
