//! The module's log: [`log`] for a ready string, the [`error!`](crate::error!),
//! [`warn!`](crate::warn!), [`info!`](crate::info!) and [`debug!`](crate::debug!) macros to
//! format a line on the stack, without allocating.

use core::fmt::{self, Write};

use edge_abi::{level, limits};

use crate::{Error, sys};

/// How much a log line matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(i32)]
pub enum Level {
    /// Something failed.
    Error = level::ERROR,
    /// Something is wrong but the module goes on.
    Warn = level::WARN,
    /// Normal operation.
    Info = level::INFO,
    /// Detail for the module's author.
    Debug = level::DEBUG,
}

/// Writes `line` to the module's log at `level`. The host truncates lines longer than
/// [`limits::LOG_LINE_MAX`] bytes and may refuse lines when the module logs too often
/// ([`Error::RATE_LIMITED`]).
pub fn log(level: Level, line: &str) -> Result<(), Error> {
    // SAFETY: the pair describes a live slice the host only reads.
    let code = unsafe { sys::log(level as i32, sys::addr(line.as_ptr()), sys::len(line.len())) };
    Error::check(code).map(drop)
}

/// Formats `args` into a line of at most [`limits::LOG_LINE_MAX`] bytes on the stack (cut on a
/// character boundary) and logs it, ignoring failure. What the macros expand to.
pub fn log_fmt(level: Level, args: fmt::Arguments<'_>) {
    let mut line = LineBuf::new();
    // An error here only means the line was cut short; what fits is logged.
    let _ = line.write_fmt(args);
    let _ = log(level, line.as_str());
}

const LINE_MAX: usize = limits::LOG_LINE_MAX as usize;

/// A log line being formatted: keeps what fits and fails the write that overflows, which stops
/// the formatting early.
struct LineBuf {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl LineBuf {
    const fn new() -> Self {
        LineBuf {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s, or their prefixes cut on a character boundary, are ever copied in.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = LINE_MAX - self.len;
        let (fits, result) = if s.len() <= room {
            (s.len(), Ok(()))
        } else {
            (
                (0..=room)
                    .rev()
                    .find(|&i| s.is_char_boundary(i))
                    .unwrap_or(0),
                Err(fmt::Error),
            )
        };
        self.buf[self.len..self.len + fits].copy_from_slice(&s.as_bytes()[..fits]);
        self.len += fits;
        result
    }
}

/// Logs a formatted line at error level: `error!("sensor {} gone", id)`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::__private::log_fmt($crate::Level::Error, format_args!($($arg)+)) };
}

/// Logs a formatted line at warn level: `warn!("retrying in {} ms", ms)`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::__private::log_fmt($crate::Level::Warn, format_args!($($arg)+)) };
}

/// Logs a formatted line at info level: `info!("started, interval {} ms", ms)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::__private::log_fmt($crate::Level::Info, format_args!($($arg)+)) };
}

/// Logs a formatted line at debug level: `debug!("read {:?}", value)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::__private::log_fmt($crate::Level::Debug, format_args!($($arg)+)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(args: fmt::Arguments<'_>) -> (LineBuf, fmt::Result) {
        let mut line = LineBuf::new();
        let result = line.write_fmt(args);
        (line, result)
    }

    #[test]
    fn a_short_line_is_kept_whole() {
        let (line, result) = format(format_args!("count {} of {}", 3, "seven"));
        assert_eq!(line.as_str(), "count 3 of seven");
        assert!(result.is_ok());
    }

    #[test]
    fn a_long_line_is_cut_at_the_limit() {
        let (line, result) = format(format_args!("{:x<2000}", "a"));
        assert_eq!(line.as_str().len(), LINE_MAX);
        assert!(line.as_str().starts_with("axx"));
        assert!(result.is_err());
    }

    #[test]
    fn a_long_line_is_cut_on_a_character_boundary() {
        // 1023 ASCII bytes leave one byte for a two-byte character: it is left out whole.
        let (line, _) = format(format_args!("{:x<1023}{}", "", "é"));
        assert_eq!(line.as_str().len(), LINE_MAX - 1);
        assert!(line.as_str().ends_with('x'));
    }
}
