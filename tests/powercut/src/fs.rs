//! The recording file system: an in-memory FUSE file system that serves a program's file
//! operations and records, in the order it served them, every one that changes what a power cut
//! could leave on a disk (with the bytes written), every fsync and every mark its owner puts in.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// The root directory's inode.
pub const ROOT: u64 = 1;

/// Attributes and entries are never cached by the kernel: every lookup and stat comes here, so
/// the program sees exactly the state recorded.
const NO_CACHE: Duration = Duration::ZERO;

/// One recorded operation. Inodes are numbered by the file system and never reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A file (`dir` false) or directory created under `parent`.
    Create {
        /// The directory it was created in.
        parent: u64,
        /// Its name there.
        name: OsString,
        /// Its inode.
        ino: u64,
        /// Whether it is a directory.
        dir: bool,
    },
    /// Bytes written into a file at an offset.
    Write {
        /// The file.
        ino: u64,
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// A file's size set (truncated or extended with zeros).
    SetLen {
        /// The file.
        ino: u64,
        /// The new size.
        len: u64,
    },
    /// An entry moved (replacing whatever `new_name` named in `new_parent`).
    Rename {
        /// The directory it was in.
        parent: u64,
        /// Its name there.
        name: OsString,
        /// The directory it moves to.
        new_parent: u64,
        /// Its new name.
        new_name: OsString,
    },
    /// An entry removed (unlink or rmdir).
    Remove {
        /// The directory.
        parent: u64,
        /// The entry's name.
        name: OsString,
    },
    /// fsync (`datasync` false) or fdatasync of a file.
    Fsync {
        /// The file.
        ino: u64,
        /// fdatasync rather than fsync.
        datasync: bool,
        /// Its path from the root when it was synced, for reports.
        path: String,
        /// The thread that asked (its Linux thread id), for reports.
        tid: u32,
    },
    /// fsync of a directory.
    FsyncDir {
        /// The directory.
        ino: u64,
        /// Its path from the root when it was synced, for reports.
        path: String,
        /// The thread that asked (its Linux thread id), for reports.
        tid: u32,
    },
    /// A mark the owner put in ([`Recorder::mark`]): everything before it was served before the
    /// owner's call, everything after it after.
    Mark(u64),
}

/// The owner's handle on the recording, shared with the mounted file system.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
}

impl Recorder {
    /// A recorder for a new, empty file system.
    pub fn new() -> Recorder {
        let mut inner = Inner::default();
        inner.nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: OsString::new(),
                data: Data::Dir(BTreeMap::new()),
            },
        );
        inner.next_ino = ROOT + 1;
        Recorder {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// Appends a mark to the recording, ordered after every operation already served.
    pub fn mark(&self, mark: u64) {
        self.lock().events.push(Event::Mark(mark));
    }

    /// The recording so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// The file system to mount ([`fuser::spawn_mount`]).
    pub fn file_system(&self) -> RecordingFs {
        RecordingFs {
            inner: Arc::clone(&self.inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The FUSE side: serves the operations and records them. Files are opened with direct I/O, so
/// every write reaches it when the program makes it, and nothing is cached.
#[derive(Debug)]
pub struct RecordingFs {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    events: Vec<Event>,
}

#[derive(Debug)]
struct Node {
    /// The directory that last linked it, and its name there (for paths in reports).
    parent: u64,
    name: OsString,
    data: Data,
}

#[derive(Debug)]
enum Data {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
}

impl Inner {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.nodes.get(&ino)?;
        let (kind, size, perm, nlink) = match &node.data {
            Data::File(bytes) => (FileType::RegularFile, bytes.len() as u64, 0o644, 1),
            Data::Dir(_) => (FileType::Directory, 0, 0o755, 2),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get(&ino).map(|n| &n.data) {
            Some(Data::Dir(entries)) => Ok(entries),
            Some(Data::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.data) {
            Some(Data::Dir(entries)) => Ok(entries),
            Some(Data::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Vec<u8>, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.data) {
            Some(Data::File(bytes)) => Ok(bytes),
            Some(Data::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn create(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<FileAttr, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.dir_mut(parent)?.insert(name.to_os_string(), ino);
        let data = if dir {
            Data::Dir(BTreeMap::new())
        } else {
            Data::File(Vec::new())
        };
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_os_string(),
                data,
            },
        );
        self.events.push(Event::Create {
            parent,
            name: name.to_os_string(),
            ino,
            dir,
        });
        self.attr(ino).ok_or(Errno::EIO)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (&self.nodes[&ino].data, dir) {
            (Data::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Data::Dir(_), false) => return Err(Errno::EISDIR),
            (Data::File(_), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.dir_mut(parent)?.remove(name);
        self.events.push(Event::Remove {
            parent,
            name: name.to_os_string(),
        });
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let moving_dir = matches!(self.nodes[&ino].data, Data::Dir(_));
        if let Ok(target) = self.lookup(new_parent, new_name) {
            match (&self.nodes[&target].data, moving_dir) {
                (Data::Dir(entries), true) if !entries.is_empty() => {
                    return Err(Errno::ENOTEMPTY);
                }
                (Data::Dir(_), false) => return Err(Errno::EISDIR),
                (Data::File(_), true) => return Err(Errno::ENOTDIR),
                _ => {}
            }
        }
        self.dir_mut(new_parent)?;
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?
            .insert(new_name.to_os_string(), ino);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.parent = new_parent;
            node.name = new_name.to_os_string();
        }
        self.events.push(Event::Rename {
            parent,
            name: name.to_os_string(),
            new_parent,
            new_name: new_name.to_os_string(),
        });
        Ok(())
    }

    /// The path of `ino` from the root, as it was last linked.
    fn path(&self, mut ino: u64) -> String {
        let mut parts = Vec::new();
        while ino != ROOT && parts.len() < 64 {
            let Some(node) = self.nodes.get(&ino) else {
                break;
            };
            parts.push(node.name.to_string_lossy().into_owned());
            ino = node.parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

impl RecordingFs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn open_flags() -> FopenFlags {
    FopenFlags::FOPEN_DIRECT_IO
}

impl Filesystem for RecordingFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = self.lock();
        match inner
            .lookup(parent.0, name)
            .and_then(|ino| inner.attr(ino).ok_or(Errno::EIO))
        {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().attr(ino.0) {
            Some(attr) => reply.attr(&NO_CACHE, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut inner = self.lock();
        if let Some(len) = size {
            let resized = inner.file_mut(ino.0).and_then(|bytes| {
                let len = usize::try_from(len).map_err(|_| Errno::EFBIG)?;
                bytes.resize(len, 0);
                Ok(())
            });
            if let Err(e) = resized {
                return reply.error(e);
            }
            inner.events.push(Event::SetLen { ino: ino.0, len });
        }
        // Modes, owners and times are not kept: the store does not depend on them.
        match inner.attr(ino.0) {
            Some(attr) => reply.attr(&NO_CACHE, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc_s_ifmt() != libc_s_ifreg() {
            return reply.error(Errno::EPERM);
        }
        match self.lock().create(parent.0, name, false) {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.lock().create(parent.0, name, true) {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            // RENAME_NOREPLACE / EXCHANGE / WHITEOUT: nothing the store uses.
            return reply.error(Errno::EINVAL);
        }
        match self.lock().rename(parent.0, name, newparent.0, newname) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().attr(ino.0) {
            Some(_) => reply.opened(FileHandle(0), open_flags()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut inner = self.lock();
        match inner.file_mut(ino.0) {
            Ok(bytes) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut inner = self.lock();
        let written = inner.file_mut(ino.0).and_then(|bytes| {
            let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let end = start.checked_add(data.len()).ok_or(Errno::EFBIG)?;
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
            Ok(())
        });
        match written {
            Ok(()) => {
                inner.events.push(Event::Write {
                    ino: ino.0,
                    offset,
                    data: data.to_vec(),
                });
                reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.lock();
        let path = inner.path(ino.0);
        inner.events.push(Event::Fsync {
            ino: ino.0,
            datasync,
            path,
            tid: req.pid(),
        });
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inner = self.lock();
        let entries = match inner.dir(ino.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        let parent = inner.nodes.get(&ino.0).map_or(ROOT, |n| n.parent);
        let all = [
            (ino.0, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ]
        .into_iter()
        .chain(entries.iter().map(|(name, &child)| {
            let kind = match inner.nodes.get(&child).map(|n| &n.data) {
                Some(Data::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (child, kind, name.clone())
        }));
        for (i, (child, kind, name)) in all.enumerate().skip(usize::try_from(offset).unwrap_or(0)) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut inner = self.lock();
        let path = inner.path(ino.0);
        inner.events.push(Event::FsyncDir {
            ino: ino.0,
            path,
            tid: req.pid(),
        });
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 1 GiB free in 4 KiB blocks.
        reply.statfs(1 << 18, 1 << 18, 1 << 18, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.lock().create(parent.0, name, false) {
            Ok(attr) => reply.created(&NO_CACHE, &attr, Generation(0), FileHandle(0), open_flags()),
            Err(e) => reply.error(e),
        }
    }
}

/// `S_IFMT` and `S_IFREG` (Linux values), to refuse special files in `mknod`.
const fn libc_s_ifmt() -> u32 {
    0o170000
}

const fn libc_s_ifreg() -> u32 {
    0o100000
}
