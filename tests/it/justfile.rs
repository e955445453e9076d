//! The Justfile parses: every line is blank, a comment, a setting, a variable, a recipe header
//! or an indented recipe line (CI does not install `just`, so a stray line would otherwise only
//! show when someone runs `just bench`).

#[test]
fn every_justfile_line_is_one_just_understands() {
    let text = std::fs::read_to_string(crate::support::repo().join("Justfile")).unwrap();
    let name = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // `name params...: deps...`, the colon found outside quoted defaults.
    let header = |l: &str| {
        if l.starts_with(char::is_whitespace) {
            return false;
        }
        let mut quoted = false;
        let Some(colon) = l.char_indices().find_map(|(i, c)| {
            if c == '"' {
                quoted = !quoted;
            }
            (c == ':' && !quoted).then_some(i)
        }) else {
            return false;
        };
        let (head, deps) = (&l[..colon], &l[colon + 1..]);
        head.split_whitespace().next().is_some_and(name) && deps.split_whitespace().all(name)
    };
    for (i, line) in text.lines().enumerate() {
        let ok = line.trim().is_empty()
            || line.starts_with('#')
            || line.starts_with("set ")
            || line.starts_with("    ")
            || line.starts_with('\t')
            || line.contains(" := ")
            || header(line);
        assert!(
            ok,
            "Justfile line {}: {line:?} is not something just parses",
            i + 1
        );
    }
}
