//! Wasm blob files: content-addressed, written durably (temporary file, fsync, rename, fsync of
//! the directory) before any database record refers to them, removed only after the record that
//! last referred to them is gone and flushed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use crate::core::manifest::Sha256;

/// Suffix of a blob file being written.
const TMP_SUFFIX: &str = ".tmp";

/// A file in the blob directory, as [`BlobDir::list`] sees it.
#[derive(Debug)]
pub(super) enum Entry {
    /// A finished blob: its file name is the hex SHA-256 of its content (unless tampered with).
    Blob(Sha256, PathBuf),
    /// Anything else: a temporary file from an interrupted write, or a stranger.
    Other(PathBuf),
}

/// The directory of Wasm blob files.
#[derive(Debug)]
pub(super) struct BlobDir {
    dir: PathBuf,
}

impl BlobDir {
    /// The blob directory at `dir`, created if missing.
    pub(super) fn open(dir: PathBuf) -> io::Result<BlobDir> {
        fs::create_dir_all(&dir)?;
        Ok(BlobDir { dir })
    }

    /// The file holding `sha256`.
    pub(super) fn path(&self, sha256: &Sha256) -> PathBuf {
        self.dir.join(sha256.to_hex())
    }

    /// Makes sure the file for `sha256` exists with exactly `bytes` and is durable. A file that is
    /// already there with the right content is kept; one with the wrong content is replaced.
    /// `bytes` must hash to `sha256` (the caller checks).
    pub(super) fn write(&self, sha256: &Sha256, bytes: &[u8]) -> Result<(), (PathBuf, io::Error)> {
        let path = self.path(sha256);
        if let Ok(existing) = fs::read(&path)
            && Sha256::of(&existing) == *sha256
        {
            // Possibly left by an install that crashed before its directory entry was synced.
            return sync_dir(&self.dir).map_err(|e| (self.dir.clone(), e));
        }
        let tmp = self.dir.join(format!("{}{TMP_SUFFIX}", sha256.to_hex()));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err((tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err((path, e));
        }
        sync_dir(&self.dir).map_err(|e| (self.dir.clone(), e))
    }

    /// The bytes of the file for `sha256` (not checked here).
    pub(super) fn read(&self, sha256: &Sha256) -> io::Result<Vec<u8>> {
        let mut f = File::open(self.path(sha256))?;
        let mut out = Vec::new();
        f.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Removes the file for `sha256`, ignoring failures: a file left behind is removed by the next
    /// [`super::Store::open`].
    pub(super) fn remove(&self, sha256: &Sha256) {
        let _ = fs::remove_file(self.path(sha256));
    }

    /// Removes a file found by [`BlobDir::list`].
    pub(super) fn remove_path(&self, path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every file in the directory.
    pub(super) fn list(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let sha = path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.len() == 64)
                .and_then(|n| hex::decode(n).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            out.push(match sha {
                Some(sha) => Entry::Blob(Sha256(sha), path),
                None => Entry::Other(path),
            });
        }
        Ok(out)
    }

    /// Makes removals and renames in the directory durable.
    pub(super) fn sync(&self) -> io::Result<()> {
        sync_dir(&self.dir)
    }
}

/// fsyncs a directory, so that entries created, renamed or removed in it survive a power cut.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_written_once_and_a_damaged_one_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = BlobDir::open(tmp.path().join("wasm")).unwrap();
        let bytes = b"\0asm\x01\0\0\0".to_vec();
        let sha = Sha256::of(&bytes);
        dir.write(&sha, &bytes).unwrap();
        assert_eq!(dir.read(&sha).unwrap(), bytes);
        dir.write(&sha, &bytes).unwrap();
        fs::write(dir.path(&sha), b"garbage").unwrap();
        dir.write(&sha, &bytes).unwrap();
        assert_eq!(dir.read(&sha).unwrap(), bytes);
        let listed = dir.list().unwrap();
        assert!(matches!(listed.as_slice(), [Entry::Blob(s, _)] if *s == sha));
    }

    #[test]
    fn files_that_are_not_blobs_are_listed_as_others() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = BlobDir::open(tmp.path().to_path_buf()).unwrap();
        fs::write(
            tmp.path().join(format!("{}{TMP_SUFFIX}", "ab".repeat(32))),
            b"x",
        )
        .unwrap();
        fs::write(tmp.path().join("zz".repeat(32)), b"x").unwrap();
        let listed = dir.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|e| matches!(e, Entry::Other(_))));
    }
}
