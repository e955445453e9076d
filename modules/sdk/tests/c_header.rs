//! modules/c/edge_abi.h, the C form of the ABI, agrees with the edge-abi crate: the same
//! constants with the same values, the same imports, the same marker.

use std::collections::BTreeMap;

use edge_abi::{IMPORT_MODULE, VERSION, err, export, import, level, limits};

fn header() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../c/edge_abi.h");
    std::fs::read_to_string(path).expect("modules/c/edge_abi.h is readable")
}

/// Every `#define EDGE_NAME <integer>` (optionally parenthesised) in the header.
fn numeric_defines(header: &str) -> BTreeMap<String, i64> {
    header
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("#define ")?.split_whitespace();
            let name = words.next()?;
            let value = words.next()?.trim_start_matches('(').trim_end_matches(')');
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The `NAME` of every `EDGE_IMPORT(NAME)` that declares a function.
fn imports(header: &str) -> Vec<&str> {
    header
        .lines()
        .filter_map(|line| line.strip_prefix("EDGE_IMPORT(")?.split_once(')'))
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn the_header_defines_exactly_the_crates_constants() {
    let expected: BTreeMap<String, i64> = [
        ("EDGE_ABI_VERSION", i64::from(VERSION)),
        ("EDGE_OK", err::OK.into()),
        ("EDGE_ERR_BAD_POINTER", err::BAD_POINTER.into()),
        ("EDGE_ERR_DENIED", err::DENIED.into()),
        ("EDGE_ERR_TOO_LARGE", err::TOO_LARGE.into()),
        ("EDGE_ERR_RATE_LIMITED", err::RATE_LIMITED.into()),
        ("EDGE_ERR_QUOTA_EXCEEDED", err::QUOTA_EXCEEDED.into()),
        ("EDGE_ERR_NOT_FOUND", err::NOT_FOUND.into()),
        ("EDGE_ERR_BAD_ARGUMENT", err::BAD_ARGUMENT.into()),
        ("EDGE_ERR_BUSY", err::BUSY.into()),
        ("EDGE_ERR_UNAVAILABLE", err::UNAVAILABLE.into()),
        ("EDGE_ERR_IO", err::IO.into()),
        ("EDGE_LEVEL_ERROR", level::ERROR.into()),
        ("EDGE_LEVEL_WARN", level::WARN.into()),
        ("EDGE_LEVEL_INFO", level::INFO.into()),
        ("EDGE_LEVEL_DEBUG", level::DEBUG.into()),
        ("EDGE_LOG_LINE_MAX", limits::LOG_LINE_MAX.into()),
        ("EDGE_TOPIC_MAX", limits::TOPIC_MAX.into()),
        ("EDGE_PAYLOAD_MAX", limits::PAYLOAD_MAX.into()),
        ("EDGE_KV_KEY_MAX", limits::KV_KEY_MAX.into()),
        ("EDGE_KV_VALUE_MAX", limits::KV_VALUE_MAX.into()),
        ("EDGE_RANDOM_MAX", limits::RANDOM_MAX.into()),
        ("EDGE_I2C_MAX", limits::I2C_MAX.into()),
        ("EDGE_SPI_MAX", limits::SPI_MAX.into()),
        ("EDGE_DELAY_MAX_US", limits::DELAY_MAX_US.into()),
        (
            "EDGE_DELAY_PER_CALL_MAX_US",
            limits::DELAY_PER_CALL_MAX_US.into(),
        ),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    assert_eq!(numeric_defines(&header()), expected);
}

#[test]
fn the_header_declares_exactly_the_crates_imports_under_its_module() {
    let header = header();
    let mut declared = imports(&header);
    declared.sort_unstable();
    let mut expected = [
        import::LOG,
        import::NOW_MS,
        import::RANDOM,
        import::DELAY_US,
        import::PUBLISH,
        import::KV_GET,
        import::KV_SET,
        import::KV_DELETE,
        import::GPIO_SET,
        import::GPIO_GET,
        import::I2C_WRITE,
        import::I2C_READ,
        import::I2C_WRITE_READ,
        import::SPI_TRANSFER,
    ];
    expected.sort_unstable();
    assert_eq!(declared, expected);
    assert!(header.contains(&format!("import_module(\"{IMPORT_MODULE}\")")));
}

#[test]
fn the_headers_marker_has_the_crates_name() {
    assert!(header().contains(&format!(
        "EDGE_EXPORT({0}) void {0}(void)",
        export::ABI_MARKER
    )));
}
