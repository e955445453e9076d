//! The staging area of chunked delivery: per module, the chunks of the version being fetched,
//! each a file named by its SHA-256 in `<store>/staging/<module>/`, written durably (temporary
//! file, fsync, rename, directory fsync) as it arrives, so that a transfer cut by a restart or a
//! power loss resumes from what is there. It holds at most the chunks one manifest lists (the
//! Wasm's size, bounded by the maximum bundle size), and is dropped when the version installs,
//! is refused, or its module is removed.

use std::fs;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use super::files::{BlobDir, Entry};
use super::{Store, StoreError};
use crate::core::manifest::{ChunkRef, Sha256, is_valid_module_name};

/// The staging area's directory under the store.
const STAGING_DIR: &str = "staging";

/// What the device holds of a fetch's chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// Per chunk, in order: in the staging area.
    pub have: Vec<bool>,
    /// Bytes copied in from installed versions' Wasm.
    pub reused_bytes: u64,
}

/// Where a chunk can be copied from: a range of an installed blob.
#[derive(Debug, Clone, Copy)]
struct Source {
    blob: Sha256,
    offset: u64,
    size: u64,
}

impl Store {
    fn staging_dir(&self, module: &str) -> Result<PathBuf, StoreError> {
        if !is_valid_module_name(module) {
            return Err(StoreError::Corrupt {
                what: format!("staging area for {module:?}"),
                reason: "not a module name".into(),
            });
        }
        Ok(self.dir.join(STAGING_DIR).join(module))
    }

    fn staging(&self, module: &str) -> Result<BlobDir, StoreError> {
        let dir = self.staging_dir(module)?;
        BlobDir::open(dir.clone()).map_err(|source| StoreError::CreateDir { path: dir, source })
    }

    /// Prepares `module`'s staging area for a version made of `chunks`: staged chunks it does
    /// not list are dropped, staged ones it lists are checked (a damaged one is dropped), and
    /// missing ones found in an installed version's Wasm (any module, current or previous, whose
    /// manifest lists its chunks) are copied in after their digest is checked. Says which chunks
    /// are now staged.
    pub fn stage_plan(&self, module: &str, chunks: &[ChunkRef]) -> Result<Staged, StoreError> {
        self.usable()?;
        let dir = self.staging(module)?;
        let file = |action: &str, path: PathBuf, source: io::Error| StoreError::File {
            action: action.into(),
            path,
            source,
        };
        let listed: std::collections::BTreeMap<Sha256, u64> =
            chunks.iter().map(|c| (c.sha256(), c.size())).collect();
        let mut staged = std::collections::BTreeSet::new();
        let entries = dir
            .list()
            .map_err(|e| file("listing", self.staging_dir(module).unwrap_or_default(), e))?;
        for entry in entries {
            match entry {
                Entry::Blob(sha, path) => {
                    let good = listed.get(&sha).is_some_and(|size| {
                        fs::read(&path)
                            .is_ok_and(|b| b.len() as u64 == *size && Sha256::of(&b) == sha)
                    });
                    if good {
                        staged.insert(sha);
                    } else {
                        dir.remove_path(&path)
                            .map_err(|e| file("removing staged chunk", path, e))?;
                    }
                }
                Entry::Other(path) => {
                    dir.remove_path(&path)
                        .map_err(|e| file("removing staged file", path, e))?;
                }
            }
        }
        let mut sources = std::collections::BTreeMap::new();
        for record in self.modules()? {
            for version in std::iter::once(&record.current).chain(record.previous.as_ref()) {
                let blob = version.wasm_sha256();
                let mut offset = 0;
                for c in &version.manifest.chunks {
                    sources.entry(c.sha256()).or_insert(Source {
                        blob,
                        offset,
                        size: c.size(),
                    });
                    offset += c.size();
                }
            }
        }
        let mut reused_bytes = 0;
        for c in chunks {
            if staged.contains(&c.sha256()) {
                continue;
            }
            let Some(source) = sources.get(&c.sha256()).filter(|s| s.size == c.size()) else {
                continue;
            };
            // A blob that cannot be read, or whose range does not hash right, is simply not a
            // source: the chunk is fetched.
            let Ok(bytes) = self.blob_range(source) else {
                continue;
            };
            if Sha256::of(&bytes) != c.sha256() {
                continue;
            }
            dir.write(&c.sha256(), &bytes)
                .map_err(|(path, source)| file("staging chunk", path, source))?;
            staged.insert(c.sha256());
            reused_bytes += c.size();
        }
        Ok(Staged {
            have: chunks
                .iter()
                .map(|c| staged.contains(&c.sha256()))
                .collect(),
            reused_bytes,
        })
    }

    fn blob_range(&self, s: &Source) -> io::Result<Vec<u8>> {
        let mut f = fs::File::open(self.blobs.path(&s.blob))?;
        f.seek(SeekFrom::Start(s.offset))?;
        let len = usize::try_from(s.size).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut out = vec![0; len];
        f.read_exact(&mut out)?;
        Ok(out)
    }

    /// Writes a chunk (already checked against its digest) durably to `module`'s staging area.
    pub fn stage_chunk(
        &self,
        module: &str,
        sha256: &Sha256,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.usable()?;
        self.staging(module)?
            .write(sha256, bytes)
            .map_err(|(path, source)| StoreError::File {
                action: "staging chunk".into(),
                path,
                source,
            })
    }

    /// The Wasm of `module`'s fetch, from its staged chunks in order, each checked against its
    /// digest. Built in place: the bytes are in memory once.
    pub fn assemble(&self, module: &str, chunks: &[ChunkRef]) -> Result<Arc<[u8]>, StoreError> {
        self.usable()?;
        let dir = self.staging(module)?;
        let total: u64 = chunks.iter().map(ChunkRef::size).sum();
        let total = usize::try_from(total).map_err(|_| StoreError::Corrupt {
            what: format!("the chunks of module {module:?}"),
            reason: "they add up to more than memory can hold".into(),
        })?;
        // One allocation of the final size (a `TrustedLen` iterator collects straight into
        // the `Arc`), filled in place: no second copy of the Wasm.
        let mut wasm: Arc<[u8]> = std::iter::repeat_n(0u8, total).collect();
        let buf = Arc::get_mut(&mut wasm).unwrap_or_else(|| unreachable!("a fresh Arc is unique"));
        let mut at = 0;
        for c in chunks {
            let len = usize::try_from(c.size()).unwrap_or(usize::MAX);
            let path = dir.path(&c.sha256());
            let piece = &mut buf[at..at + len];
            let read = fs::File::open(&path).and_then(|mut f| {
                f.read_exact(piece)?;
                // Nothing may follow: a longer file is not this chunk.
                let mut extra = [0u8; 1];
                match f.read(&mut extra)? {
                    0 => Ok(()),
                    _ => Err(io::Error::other("the file is longer than the chunk")),
                }
            });
            if let Err(source) = read {
                return Err(StoreError::File {
                    action: "reading staged chunk".into(),
                    path,
                    source,
                });
            }
            if Sha256::of(piece) != c.sha256() {
                return Err(StoreError::Corrupt {
                    what: format!("staged chunk {} of module {module:?}", c.sha256()),
                    reason: "its bytes do not hash to its name".into(),
                });
            }
            at += len;
        }
        Ok(wasm)
    }

    /// Drops `module`'s staging area (nothing there is needed any more).
    pub fn clear_staging(&self, module: &str) -> Result<(), StoreError> {
        let dir = self.staging_dir(module)?;
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::File {
                action: "removing the staging area".into(),
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Bytes in `module`'s staging area (tests, status).
    pub fn staged_bytes(&self, module: &str) -> u64 {
        let Ok(dir) = self.staging_dir(module) else {
            return 0;
        };
        fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}
