//! [`Pin`]: a GPIO line.

use embedded_hal::digital::{ErrorType, InputPin, OutputPin, StatefulOutputPin};

use super::id;
use crate::{Error, sys};

/// A GPIO line, by the number the manifest's `caps.gpio` grants (`gpio = [17]`): drives it with
/// `gpio_set` and reads it with `gpio_get`.
///
/// It remembers the level it last drove the line to, so
/// [`is_set_high`](StatefulOutputPin::is_set_high) and [`toggle`](StatefulOutputPin::toggle) cost
/// no host call once it has driven the line; before that (or after a drive failed) they read the
/// line back with `gpio_get`. [`is_high`](InputPin::is_high) always reads the line.
#[derive(Debug)]
pub struct Pin {
    line: u32,
    driven: Option<bool>,
}

impl Pin {
    /// GPIO `line`. No host call: an ungranted line fails at the first use, with
    /// [`Error::DENIED`] (a module importing the GPIO functions without any `caps.gpio` is refused
    /// at install).
    pub const fn new(line: u32) -> Self {
        Pin { line, driven: None }
    }

    /// The line number.
    pub const fn line(&self) -> u32 {
        self.line
    }

    fn drive(&mut self, high: bool) -> Result<(), Error> {
        // A failed drive leaves the level unknown: the next query reads it back.
        self.driven = None;
        // SAFETY: no pointers.
        Error::check(unsafe { sys::gpio_set(id(self.line), i32::from(high)) })?;
        self.driven = Some(high);
        Ok(())
    }

    fn read(&mut self) -> Result<bool, Error> {
        // SAFETY: no pointers.
        Error::check(unsafe { sys::gpio_get(id(self.line)) }).map(|level| level != 0)
    }
}

impl ErrorType for Pin {
    type Error = Error;
}

impl OutputPin for Pin {
    fn set_low(&mut self) -> Result<(), Error> {
        self.drive(false)
    }

    fn set_high(&mut self) -> Result<(), Error> {
        self.drive(true)
    }
}

impl StatefulOutputPin for Pin {
    fn is_set_high(&mut self) -> Result<bool, Error> {
        match self.driven {
            Some(high) => Ok(high),
            None => self.read(),
        }
    }

    fn is_set_low(&mut self) -> Result<bool, Error> {
        self.is_set_high().map(|high| !high)
    }
}

impl InputPin for Pin {
    fn is_high(&mut self) -> Result<bool, Error> {
        self.read()
    }

    fn is_low(&mut self) -> Result<bool, Error> {
        self.read().map(|high| !high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_wasm32_every_call_is_unavailable_and_the_level_stays_unknown() {
        let mut pin = Pin::new(17);
        assert_eq!(pin.line(), 17);
        assert_eq!(pin.set_high(), Err(Error::UNAVAILABLE));
        assert_eq!(pin.driven, None);
        assert_eq!(pin.is_set_high(), Err(Error::UNAVAILABLE));
        assert_eq!(pin.toggle(), Err(Error::UNAVAILABLE));
        assert_eq!(pin.is_low(), Err(Error::UNAVAILABLE));
    }

    #[test]
    fn a_driven_level_is_remembered() {
        let mut pin = Pin::new(17);
        pin.driven = Some(true);
        assert_eq!(pin.is_set_high(), Ok(true));
        assert_eq!(pin.is_set_low(), Ok(false));
    }
}
