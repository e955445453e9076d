//! The power-cut durability test's machinery (the test itself is `tests/powercut.rs`):
//!
//! - [`fs`]: an in-memory FUSE file system that records, in order, every operation that changes
//!   what a disk holds, every fsync, and marks from its owner;
//! - [`image`]: replays a recording and writes the durable image a power cut at any point of it
//!   leaves, under a strict POSIX model or a harsher one with torn, reordered writes.

pub mod fs;
pub mod image;
