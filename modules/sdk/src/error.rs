//! [`Error`]: a failed host call, or a module's own failure.

use core::fmt;
use core::num::NonZeroI32;

use edge_abi::err;

/// A failure: a negative code from the host ([`edge_abi::err`]) or a positive one of the
/// module's own. An entry point that fails returns the code to the host.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Error(NonZeroI32);

impl Error {
    /// A failure of the module's own with no more specific code (1).
    pub const FAILED: Error = Error(NonZeroI32::new(1).expect("1 is not 0"));
    /// A pointer or length lies outside the guest's memory.
    pub const BAD_POINTER: Error = Error::new(err::BAD_POINTER);
    /// The manifest does not grant this.
    pub const DENIED: Error = Error::new(err::DENIED);
    /// An argument is larger than the ABI allows ([`edge_abi::limits`]).
    pub const TOO_LARGE: Error = Error::new(err::TOO_LARGE);
    /// Too many calls in too short a time; try again later.
    pub const RATE_LIMITED: Error = Error::new(err::RATE_LIMITED);
    /// The module's key-value quota would be exceeded.
    pub const QUOTA_EXCEEDED: Error = Error::new(err::QUOTA_EXCEEDED);
    /// No such key.
    pub const NOT_FOUND: Error = Error::new(err::NOT_FOUND);
    /// A malformed argument.
    pub const BAD_ARGUMENT: Error = Error::new(err::BAD_ARGUMENT);
    /// The module's outgoing queue is full for this call.
    pub const BUSY: Error = Error::new(err::BUSY);
    /// The host could not do it (storage or random source failure, hardware the device does not
    /// have), or this is not wasm32.
    pub const UNAVAILABLE: Error = Error::new(err::UNAVAILABLE);
    /// The device did not answer or the bus failed (an I2C NACK, an IO error).
    pub const IO: Error = Error::new(err::IO);

    /// An error with `code`: negative codes are the ABI's, positive ones the module's own. Zero
    /// means success, not an error, and becomes [`Error::FAILED`].
    pub const fn new(code: i32) -> Self {
        match NonZeroI32::new(code) {
            Some(code) => Error(code),
            None => Error::FAILED,
        }
    }

    /// Turns a host return code into a result: the non-negative value, or the error.
    pub const fn check(code: i32) -> Result<u32, Error> {
        if code >= 0 {
            Ok(code.unsigned_abs())
        } else {
            Err(Error::new(code))
        }
    }

    /// The code, never 0.
    pub const fn code(self) -> i32 {
        self.0.get()
    }

    /// What the code means: the ABI's name for negative codes, "module error" for positive ones.
    pub const fn name(self) -> &'static str {
        if self.code() > 0 {
            "module error"
        } else {
            err::name(self.code())
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({}: {})", self.code(), self.name())
    }
}

impl core::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_passes_non_negative_codes_through_and_names_negative_ones() {
        assert_eq!(Error::check(0), Ok(0));
        assert_eq!(Error::check(17), Ok(17));
        assert_eq!(Error::check(err::NOT_FOUND), Err(Error::NOT_FOUND));
        assert_eq!(Error::NOT_FOUND.name(), "not found");
    }

    #[test]
    fn zero_is_not_an_error_code() {
        assert_eq!(Error::new(0), Error::FAILED);
        assert_eq!(Error::new(0).code(), 1);
    }

    #[test]
    fn display_shows_name_and_code() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(Error::DENIED.to_string(), "denied (-2)");
        assert_eq!(Error::new(3).to_string(), "module error (3)");
        assert_eq!(Error::new(-99).to_string(), "unknown error (-99)");
    }
}
