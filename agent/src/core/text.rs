//! Text from modules and devices made safe for a terminal or a log: control characters (ESC,
//! CR, NUL, newlines) and the Unicode controls that reorder text are shown escaped, so a module
//! cannot clear a screen, overwrite a line or forge one. The raw text stays raw on MQTT.

use std::borrow::Cow;

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every control character written as an escape (`\u{1b}`, `\r`, `\0`, ...).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_escaped_and_plain_text_is_untouched() {
        assert!(matches!(printable("21.5 °C, ok"), Cow::Borrowed(_)));
        assert_eq!(
            printable("\u{1b}[2J\rsummary\0\nforged"),
            "\\u{1b}[2J\\rsummary\\u{0}\\nforged"
        );
        assert_eq!(printable("a\u{202e}b"), "a\\u{202e}b");
    }
}
