//! Command-line front ends. The binaries in `src/bin` only call into here.

pub mod edgectl;
mod files;
