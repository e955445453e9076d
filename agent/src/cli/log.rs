//! The agent's log: each `tracing` event as one line on stderr, in tracing-subscriber's `fmt`
//! format (`2026-12-03T15:22:17.123456Z  INFO edge_agent::daemon: message`, coloured on a
//! terminal), filtered by `RUST_LOG`'s targets and levels.
//!
//! A subscriber of its own rather than tracing-subscriber's `fmt` (which the demo keeps): the
//! agent records no spans, and the registry, span storage and formatting layers cost the device
//! binary ~0.04 MB (docs/ARCHITECTURE.md, "Binary size").

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};

/// Writes events that `filter` enables to stderr, with ANSI colours if `ansi`.
#[derive(Debug)]
pub struct StderrLog {
    filter: Targets,
    ansi: bool,
}

impl StderrLog {
    /// A subscriber with this filter.
    pub fn new(filter: Targets, ansi: bool) -> StderrLog {
        StderrLog { filter, ansi }
    }

    /// Installs it as the process's subscriber (refused if one was installed already).
    pub fn install(self) -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
        tracing::subscriber::set_global_default(self)
    }
}

impl Subscriber for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter
            .would_enable(metadata.target(), metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.filter
            .iter()
            .map(|(_, level)| level)
            .chain(self.filter.default_level())
            .max()
            .or(Some(LevelFilter::OFF))
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Spans are neither recorded nor printed; every span gets the same id.
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let text = line(
            SystemTime::now(),
            metadata.level(),
            metadata.target(),
            &fields.text,
            self.ansi,
        );
        // Nowhere to report a failed write to stderr.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// An event's fields as the `fmt` format prints them: the message, then `name=value` pairs.
#[derive(Default)]
struct Fields {
    text: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.text.is_empty() {
            self.text.push(' ');
        }
        if field.name() != "message" {
            self.text.push_str(field.name());
            self.text.push('=');
        }
        let _ = write!(Escaped(&mut self.text), "{value:?}");
    }
}

/// Writes through, escaping the control characters that could steer a terminal (as the `fmt`
/// format does since tracing-subscriber 0.3.20).
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                    write!(self.0, "\\x{:02x}", u32::from(c))?
                }
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// One log line, newline included.
fn line(now: SystemTime, level: &Level, target: &str, fields: &str, ansi: bool) -> String {
    let time = Timestamp(now);
    let name = match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    };
    if ansi {
        let colour = match *level {
            Level::TRACE => "35",
            Level::DEBUG => "34",
            Level::INFO => "32",
            Level::WARN => "33",
            Level::ERROR => "31",
        };
        format!(
            "\x1b[2m{time}\x1b[0m \x1b[{colour}m{name}\x1b[0m \x1b[2m{target}\x1b[0m\x1b[2m:\x1b[0m {fields}\n"
        )
    } else {
        format!("{time} {name} {target}: {fields}\n")
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber's `SystemTime` timer writes it.
struct Timestamp(SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Before 1970 only if the clock is badly wrong: shown as the epoch.
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (year, month, day) = civil_from_days(secs / 86_400);
        let rest = secs % 86_400;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            rest / 3600,
            rest % 3600 / 60,
            rest % 60,
            since.subsec_micros()
        )
    }
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    #[test]
    fn lines_are_in_the_fmt_format() {
        let now = at(1_796_311_337, 123_456);
        assert_eq!(
            line(now, &Level::INFO, "edge_agent::daemon", "connected", false),
            "2026-12-03T15:22:17.123456Z  INFO edge_agent::daemon: connected\n"
        );
        assert_eq!(
            line(now, &Level::ERROR, "edge_agent", "x", false),
            "2026-12-03T15:22:17.123456Z ERROR edge_agent: x\n"
        );
        assert_eq!(
            line(now, &Level::WARN, "t", "m", true),
            "\x1b[2m2026-12-03T15:22:17.123456Z\x1b[0m \x1b[33m WARN\x1b[0m \x1b[2mt\x1b[0m\x1b[2m:\x1b[0m m\n"
        );
    }

    #[test]
    fn timestamps_match_the_calendar() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, "2000-02-29T00:00:00.000000Z"),
            (4_107_542_399, "2100-02-28T23:59:59.000000Z"),
            (4_107_542_400, "2100-03-01T00:00:00.000000Z"),
            (253_402_300_799, "9999-12-31T23:59:59.000000Z"),
        ];
        for (secs, text) in cases {
            assert_eq!(Timestamp(at(secs, 0)).to_string(), text);
        }
    }

    #[test]
    fn control_characters_in_fields_are_escaped() {
        let mut s = String::new();
        write!(Escaped(&mut s), "a\x1b[31mb\x07c\u{9b}d\ne").unwrap();
        assert_eq!(s, "a\\x1b[31mb\\x07c\\u{9b}d\ne");
    }

    #[test]
    fn fields_are_the_message_then_name_value_pairs() {
        use std::sync::{Arc, Mutex};
        use tracing::subscriber::with_default;

        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<String>>>);
        impl Subscriber for Capture {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &Attributes<'_>) -> Id {
                Id::from_u64(1)
            }
            fn record(&self, _: &Id, _: &Record<'_>) {}
            fn record_follows_from(&self, _: &Id, _: &Id) {}
            fn event(&self, event: &Event<'_>) {
                let mut fields = Fields::default();
                event.record(&mut fields);
                self.0.lock().unwrap().push(fields.text);
            }
            fn enter(&self, _: &Id) {}
            fn exit(&self, _: &Id) {}
        }
        let capture = Capture::default();
        with_default(capture.clone(), || {
            tracing::info!("module {} started", "echo");
            tracing::warn!(module = "echo", n = 3, "restarting");
        });
        assert_eq!(
            *capture.0.lock().unwrap(),
            ["module echo started", "restarting module=\"echo\" n=3"]
        );
    }

    #[test]
    fn the_filter_decides_and_hints_the_highest_level() {
        let log = StderrLog::new("warn,edge_agent::daemon=debug".parse().unwrap(), false);
        assert_eq!(log.max_level_hint(), Some(LevelFilter::DEBUG));
        let off = StderrLog::new(Targets::new(), false);
        assert_eq!(off.max_level_hint(), Some(LevelFilter::OFF));
    }
}
