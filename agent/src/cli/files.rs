//! File helpers shared by the commands: reads with the path in the error, atomic writes.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// An IO failure on a named file.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FileError {
    /// What was being done.
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Reads a whole file, refusing anything larger than `max` bytes before reading it.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let err = |action, source| FileError {
        action,
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(|e| err("cannot read", e))?;
    if meta.len() > max {
        return Err(err(
            "cannot read",
            std::io::Error::other(format!(
                "file is {} bytes, above the limit of {max} bytes",
                meta.len()
            )),
        ));
    }
    fs::read(path).map_err(|e| err("cannot read", e))
}

/// Reads a whole text file.
pub fn read_text(path: &Path, max: u64) -> Result<String, FileError> {
    let bytes = read_bounded(path, max)?;
    String::from_utf8(bytes).map_err(|e| FileError {
        action: "cannot read",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename),
/// with the given Unix mode. With `create_new`, an existing `path` is an error.
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    create_new: bool,
) -> Result<(), FileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |action, source| FileError {
        action,
        path: path.to_path_buf(),
        source,
    };
    if create_new && fs::symlink_metadata(path).is_ok() {
        return Err(err(
            "refusing to overwrite",
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
        ));
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| err("cannot write", std::io::Error::other("not a file path")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if create_new {
            // A hard link never replaces an existing file: no window in which one is clobbered.
            fs::hard_link(&tmp, path)?;
            fs::remove_file(&tmp)
        } else {
            fs::rename(&tmp, path)
        }
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err("cannot write", e));
    }
    Ok(())
}
