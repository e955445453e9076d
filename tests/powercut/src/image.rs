//! What a power cut leaves: replays a recording ([`crate::fs::Event`]) and, at any point of it,
//! writes the durable image a cut there leaves into a real directory, under one of two
//! persistence models ([`Mode`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::Path;

use crate::fs::{Event, ROOT};

/// The size of a page a disk's cache may write or lose on its own.
pub const PAGE: u64 = 4096;

/// How a power cut treats what was not made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// POSIX with no file system's favours: a file's bytes and size are durable as they were at
    /// its last fsync or fdatasync, a directory's entries as they were at its last fsync; nothing
    /// else survives. A new file's entry needs an fsync of its directory (an fsync of the file
    /// alone does not make it reachable), and so does a rename or an unlink.
    Strict,
    /// [`Mode::Strict`], plus some of what was not synced: of each file's writes since its last
    /// fsync, every 4 KiB page of each write independently (so writes are torn and reordered,
    /// as a drive's cache may do), each size change with probability 1/2; of each directory's
    /// entry changes since its last fsync, a random prefix (metadata is journalled in order).
    /// Drawn from `seed`.
    Torn {
        /// Seed of the draw (printed for reproduction).
        seed: u64,
    },
}

/// A change to a file's bytes.
#[derive(Debug, Clone)]
enum DataOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

/// A change to a directory's entries.
#[derive(Debug, Clone)]
enum EntryOp {
    Link(OsString, u64),
    Unlink(OsString),
}

/// The disk as a recording's prefix leaves it: what the program saw, and what a cut keeps.
#[derive(Debug, Default)]
pub struct Disk {
    applied: usize,
    files: HashMap<u64, Vec<u8>>,
    dirs: HashMap<u64, BTreeMap<OsString, u64>>,
    /// File bytes as of each file's last fsync.
    synced_files: HashMap<u64, Vec<u8>>,
    /// Directory entries as of each directory's last fsync.
    synced_dirs: HashMap<u64, BTreeMap<OsString, u64>>,
    /// What changed since.
    pending_files: HashMap<u64, Vec<DataOp>>,
    pending_dirs: HashMap<u64, Vec<EntryOp>>,
}

impl Disk {
    /// An empty disk: the recording's root directory, synced and empty.
    pub fn new() -> Disk {
        let mut disk = Disk::default();
        disk.dirs.insert(ROOT, BTreeMap::new());
        disk.synced_dirs.insert(ROOT, BTreeMap::new());
        disk
    }

    /// How many events were applied.
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// Applies one event, in recording order.
    pub fn apply(&mut self, event: &Event) {
        self.applied += 1;
        match event {
            Event::Create {
                parent,
                name,
                ino,
                dir,
            } => {
                self.dirs
                    .entry(*parent)
                    .or_default()
                    .insert(name.clone(), *ino);
                self.pending(*parent, EntryOp::Link(name.clone(), *ino));
                if *dir {
                    self.dirs.insert(*ino, BTreeMap::new());
                    self.synced_dirs.insert(*ino, BTreeMap::new());
                } else {
                    self.files.insert(*ino, Vec::new());
                    self.synced_files.insert(*ino, Vec::new());
                }
            }
            Event::Write { ino, offset, data } => {
                let bytes = self.files.entry(*ino).or_default();
                write_at(bytes, *offset, data);
                self.pending_files
                    .entry(*ino)
                    .or_default()
                    .push(DataOp::Write(*offset, data.clone()));
            }
            Event::SetLen { ino, len } => {
                set_len(self.files.entry(*ino).or_default(), *len);
                self.pending_files
                    .entry(*ino)
                    .or_default()
                    .push(DataOp::SetLen(*len));
            }
            Event::Rename {
                parent,
                name,
                new_parent,
                new_name,
            } => {
                let moved = self.dirs.entry(*parent).or_default().remove(name);
                if let Some(ino) = moved {
                    self.dirs
                        .entry(*new_parent)
                        .or_default()
                        .insert(new_name.clone(), ino);
                    self.pending(*parent, EntryOp::Unlink(name.clone()));
                    self.pending(*new_parent, EntryOp::Link(new_name.clone(), ino));
                }
            }
            Event::Remove { parent, name } => {
                self.dirs.entry(*parent).or_default().remove(name);
                self.pending(*parent, EntryOp::Unlink(name.clone()));
            }
            Event::Fsync { ino, .. } => {
                let bytes = self.files.get(ino).cloned().unwrap_or_default();
                self.synced_files.insert(*ino, bytes);
                self.pending_files.remove(ino);
            }
            Event::FsyncDir { ino, .. } => {
                let entries = self.dirs.get(ino).cloned().unwrap_or_default();
                self.synced_dirs.insert(*ino, entries);
                self.pending_dirs.remove(ino);
            }
            Event::Mark(_) => {}
        }
    }

    fn pending(&mut self, dir: u64, op: EntryOp) {
        self.pending_dirs.entry(dir).or_default().push(op);
    }

    /// Writes what a power cut now leaves under `mode` into the empty directory `to` (the
    /// recording's root). Returns how many bytes of unsynced writes it kept (0 when strict).
    pub fn write_image(&self, mode: Mode, to: &Path) -> io::Result<u64> {
        let mut rng = match mode {
            Mode::Strict => None,
            Mode::Torn { seed } => Some(Rng::new(seed)),
        };
        let mut kept = 0;
        let mut seen = HashSet::new();
        self.write_dir(ROOT, to, &mut rng, &mut kept, &mut seen, 0)?;
        Ok(kept)
    }

    fn write_dir(
        &self,
        ino: u64,
        to: &Path,
        rng: &mut Option<Rng>,
        kept: &mut u64,
        seen: &mut HashSet<u64>,
        depth: usize,
    ) -> io::Result<()> {
        // A directory reachable twice (a cross-directory rename half durable) is written once.
        if depth > 32 || !seen.insert(ino) {
            return Ok(());
        }
        let mut entries = self.synced_dirs.get(&ino).cloned().unwrap_or_default();
        if let (Some(rng), Some(ops)) = (rng.as_mut(), self.pending_dirs.get(&ino)) {
            let prefix = usize::try_from(rng.below(ops.len() as u64 + 1)).unwrap_or(0);
            for op in &ops[..prefix] {
                match op {
                    EntryOp::Link(name, child) => {
                        entries.insert(name.clone(), *child);
                    }
                    EntryOp::Unlink(name) => {
                        entries.remove(name);
                    }
                }
            }
        }
        for (name, child) in entries {
            let path = to.join(&name);
            if self.dirs.contains_key(&child) {
                fs::create_dir(&path)?;
                self.write_dir(child, &path, rng, kept, seen, depth + 1)?;
            } else {
                let mut bytes = self.synced_files.get(&child).cloned().unwrap_or_default();
                if let (Some(rng), Some(ops)) = (rng.as_mut(), self.pending_files.get(&child)) {
                    *kept += torn(&mut bytes, ops, rng);
                }
                fs::write(&path, bytes)?;
            }
        }
        Ok(())
    }
}

/// Applies a random part of `ops` to `bytes`: each page of each write, each size change, with
/// probability 1/2, in order. Returns how many written bytes it kept.
fn torn(bytes: &mut Vec<u8>, ops: &[DataOp], rng: &mut Rng) -> u64 {
    let mut kept = 0;
    for op in ops {
        match op {
            DataOp::Write(offset, data) => {
                let mut at = *offset;
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let in_page =
                        usize::try_from(PAGE - at % PAGE).map_or(rest.len(), |p| p.min(rest.len()));
                    let (chunk, tail) = rest.split_at(in_page);
                    if rng.below(2) == 0 {
                        write_at(bytes, at, chunk);
                        kept += chunk.len() as u64;
                    }
                    at += in_page as u64;
                    rest = tail;
                }
            }
            DataOp::SetLen(len) => {
                if rng.below(2) == 0 {
                    set_len(bytes, *len);
                }
            }
        }
    }
    kept
}

fn write_at(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(data.len());
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[start..end].copy_from_slice(data);
}

fn set_len(bytes: &mut Vec<u8>, len: u64) {
    bytes.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> OsString {
        OsString::from(s)
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let bytes = if e.path().is_dir() {
                    b"<dir>".to_vec()
                } else {
                    fs::read(e.path()).unwrap()
                };
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect();
        out.sort();
        out
    }

    fn image(disk: &Disk, mode: Mode) -> Vec<(String, Vec<u8>)> {
        let tmp = tempfile::tempdir().unwrap();
        disk.write_image(mode, tmp.path()).unwrap();
        listing(tmp.path())
    }

    #[test]
    fn a_strict_cut_keeps_only_what_was_synced_file_and_directory_alike() {
        let mut disk = Disk::new();
        let create = Event::Create {
            parent: ROOT,
            name: name("a"),
            ino: 2,
            dir: false,
        };
        let write = |data: &[u8]| Event::Write {
            ino: 2,
            offset: 0,
            data: data.to_vec(),
        };
        disk.apply(&create);
        disk.apply(&write(b"one"));
        disk.apply(&Event::Fsync {
            ino: 2,
            datasync: false,
            path: "a".into(),
            tid: 0,
        });
        // The file's fsync does not make its entry durable.
        assert_eq!(image(&disk, Mode::Strict), vec![]);
        disk.apply(&Event::FsyncDir {
            ino: ROOT,
            path: String::new(),
            tid: 0,
        });
        assert_eq!(
            image(&disk, Mode::Strict),
            vec![("a".into(), b"one".to_vec())]
        );
        disk.apply(&write(b"two"));
        disk.apply(&Event::Rename {
            parent: ROOT,
            name: name("a"),
            new_parent: ROOT,
            new_name: name("b"),
        });
        assert_eq!(
            image(&disk, Mode::Strict),
            vec![("a".into(), b"one".to_vec())]
        );
        disk.apply(&Event::FsyncDir {
            ino: ROOT,
            path: String::new(),
            tid: 0,
        });
        assert_eq!(
            image(&disk, Mode::Strict),
            vec![("b".into(), b"one".to_vec())]
        );
        disk.apply(&Event::Fsync {
            ino: 2,
            datasync: true,
            path: "b".into(),
            tid: 0,
        });
        assert_eq!(
            image(&disk, Mode::Strict),
            vec![("b".into(), b"two".to_vec())]
        );
        disk.apply(&Event::Remove {
            parent: ROOT,
            name: name("b"),
        });
        assert_eq!(
            image(&disk, Mode::Strict),
            vec![("b".into(), b"two".to_vec())]
        );
        assert_eq!(disk.applied(), 9);
    }

    const PAGE_BYTES: usize = 4096;

    #[test]
    fn a_torn_cut_keeps_synced_data_and_some_pages_of_the_rest() {
        assert_eq!(PAGE_BYTES as u64, PAGE);
        let mut disk = Disk::new();
        disk.apply(&Event::Create {
            parent: ROOT,
            name: name("f"),
            ino: 2,
            dir: false,
        });
        disk.apply(&Event::FsyncDir {
            ino: ROOT,
            path: String::new(),
            tid: 0,
        });
        disk.apply(&Event::Write {
            ino: 2,
            offset: 0,
            data: vec![1; 3 * PAGE_BYTES],
        });
        disk.apply(&Event::Fsync {
            ino: 2,
            datasync: false,
            path: "f".into(),
            tid: 0,
        });
        disk.apply(&Event::Write {
            ino: 2,
            offset: 100,
            data: vec![2; 3 * PAGE_BYTES],
        });
        let mut shapes = HashSet::new();
        for seed in 0..64 {
            let files = image(&disk, Mode::Torn { seed });
            let bytes = &files[0].1;
            assert!(bytes.len() == 3 * PAGE_BYTES || bytes.len() == 3 * PAGE_BYTES + 100);
            // Synced bytes are there; each page is wholly old or wholly new.
            assert!(bytes[..100].iter().all(|&b| b == 1));
            for page in bytes.chunks(PAGE_BYTES) {
                let skip = usize::from(page.as_ptr() == bytes.as_ptr()) * 100;
                let rest = &page[skip..];
                assert!(
                    rest.iter().all(|&b| b == rest[0]),
                    "a page is neither old nor new"
                );
            }
            shapes.insert(bytes.clone());
        }
        assert!(shapes.len() > 4, "only {} different images", shapes.len());
    }
}
