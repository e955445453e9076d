//! The sans-IO core: pure rules with no network, disk or clock access, unit-testable alone.
//!
//! Architecture Invariant: nothing under `core` performs IO, reads the clock or the operating
//! system's random source, or imports `runtime`, `daemon` or `store`; callers pass in bytes,
//! times, seeds and state.

pub mod bundle;
pub mod cbor;
pub mod chunking;
pub mod keys;
pub mod manifest;
pub mod policy;
pub mod protocol;
pub mod rate;
pub mod reconcile;
pub mod text;
pub mod topics;
pub mod trust;
pub mod verify;

#[cfg(test)]
mod tests {
    /// What code under `core` may not name: the IO shell's modules, the file system, the network,
    /// processes, the clock and the OS random source.
    const FORBIDDEN: &[&str] = &[
        "crate::runtime",
        "crate::daemon",
        "crate::store",
        "crate::hal",
        "crate::mqtt",
        "crate::cli",
        "crate::config",
        "std::fs",
        "std::net",
        "std::process",
        "std::env",
        "stdin",
        "stdout",
        "stderr",
        "println!",
        "thread::sleep",
        "SystemTime",
        "Instant",
        "getrandom",
        "tokio",
        "rumqttc",
        "sled",
    ];

    #[test]
    fn core_names_no_io_no_clock_no_randomness_and_no_shell_module() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
        let mut checked = 0;
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        let mut dirs = vec![dir.clone()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            // This file names them only to forbid them.
            let code = match path.file_name().and_then(|n| n.to_str()) {
                Some("mod.rs") if path.parent() == Some(dir.as_path()) => {
                    text.split("#[cfg(test)]").next().unwrap_or_default()
                }
                _ => &text,
            };
            for word in FORBIDDEN {
                assert!(
                    !code.contains(word),
                    "{} names {word}: core must stay sans-IO (docs/ARCHITECTURE.md)",
                    path.display()
                );
            }
            checked += 1;
        }
        assert!(
            checked >= 10,
            "only {checked} files under {}",
            dir.display()
        );
    }
}
