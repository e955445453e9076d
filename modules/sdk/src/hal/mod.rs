//! The [embedded-hal 1.0](embedded_hal) traits over the host's hardware imports, so that driver
//! crates written for those traits run in a module unchanged:
//!
//! - [`Pin`]: a GPIO line (`gpio_set`, `gpio_get`): [`OutputPin`](embedded_hal::digital::OutputPin),
//!   [`StatefulOutputPin`](embedded_hal::digital::StatefulOutputPin),
//!   [`InputPin`](embedded_hal::digital::InputPin). Needs the line in the manifest's `caps.gpio`.
//! - [`I2c`]: an I2C bus (`i2c_write`, `i2c_read`, `i2c_write_read`):
//!   [`I2c`](embedded_hal::i2c::I2c) with 7-bit addresses. Needs the bus and each address in
//!   `caps.i2c`.
//! - [`Spi`]: an SPI device, a bus and a chip select (`spi_transfer`):
//!   [`SpiDevice`](embedded_hal::spi::SpiDevice). Needs the device in `caps.spi`.
//! - [`Delay`]: [`DelayNs`](embedded_hal::delay::DelayNs) on the host's `delay_us` (always
//!   granted; blocks without burning fuel, up to one second per entry-point call).
//!
//! ```no_run
//! use edge_sdk::hal::{Delay, I2c, Pin};
//! use edge_sdk::hal::embedded_hal::{delay::DelayNs, digital::StatefulOutputPin, i2c::I2c as _};
//!
//! # fn main() -> Result<(), edge_sdk::Error> {
//! let mut led = Pin::new(17);
//! led.toggle()?;
//!
//! let mut bus = I2c::new(1);
//! let mut id = [0];
//! bus.write_read(0x76, &[0xd0], &mut id)?; // a register read, with a repeated start
//! Delay::new().delay_ms(2);
//! # Ok(())
//! # }
//! ```
//!
//! # Errors
//!
//! The error type of all of them is the SDK's [`Error`], so the ABI's code stays visible (a driver
//! hands it back as its bus error, and an entry point can return it as it is). Its embedded-hal
//! kind is:
//!
//! | code                  | I2C [`ErrorKind`](embedded_hal::i2c::ErrorKind) | SPI, digital |
//! |-----------------------|------------------------------------------------|--------------|
//! | [`Error::IO`]         | `NoAcknowledge(Unknown)`: the device did not answer (or the bus failed: the host does not tell them apart) | `Other` |
//! | any other             | `Other`                                        | `Other`      |
//!
//! The host answers [`Error::DENIED`] for a line, bus, address or device the manifest does not
//! grant, [`Error::UNAVAILABLE`] for hardware the device does not have (and on targets other than
//! wasm32, where there is no host), [`Error::TOO_LARGE`] for more than
//! [`limits::I2C_MAX`](edge_abi::limits::I2C_MAX) or [`limits::SPI_MAX`](edge_abi::limits::SPI_MAX)
//! bytes in one call (see each type for how it stays within them).

mod delay;
mod i2c;
mod pin;
mod spi;

pub use delay::Delay;
/// The embedded-hal 1.0 crate these types implement, for its traits: bring the one you call into
/// scope (`use edge_sdk::hal::embedded_hal::digital::StatefulOutputPin;`).
pub use embedded_hal;
pub use i2c::I2c;
pub use pin::Pin;
pub use spi::Spi;

use embedded_hal::{digital, i2c as eh_i2c, spi as eh_spi};

use crate::Error;

impl digital::Error for Error {
    fn kind(&self) -> digital::ErrorKind {
        digital::ErrorKind::Other
    }
}

impl eh_i2c::Error for Error {
    fn kind(&self) -> eh_i2c::ErrorKind {
        if *self == Error::IO {
            eh_i2c::ErrorKind::NoAcknowledge(eh_i2c::NoAcknowledgeSource::Unknown)
        } else {
            eh_i2c::ErrorKind::Other
        }
    }
}

impl eh_spi::Error for Error {
    fn kind(&self) -> eh_spi::ErrorKind {
        eh_spi::ErrorKind::Other
    }
}

/// A line, bus, chip select or address as the ABI's `i32`: the same 32 bits; numbers above
/// `i32::MAX` reach the host as negative ones, which no manifest grants.
#[allow(
    clippy::cast_possible_wrap,
    reason = "the host refuses the negative numbers this makes of numbers above i32::MAX"
)]
const fn id(n: u32) -> i32 {
    n as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_i2c_nacks_and_keep_their_code() {
        use eh_i2c::Error as _;
        assert_eq!(
            Error::IO.kind(),
            eh_i2c::ErrorKind::NoAcknowledge(eh_i2c::NoAcknowledgeSource::Unknown)
        );
        assert_eq!(Error::DENIED.kind(), eh_i2c::ErrorKind::Other);
        assert_eq!(Error::IO.code(), edge_abi::err::IO);
        assert_eq!(Error::IO.name(), "io error");
    }

    #[test]
    fn other_kinds_are_other() {
        assert_eq!(digital::Error::kind(&Error::IO), digital::ErrorKind::Other);
        assert_eq!(eh_spi::Error::kind(&Error::IO), eh_spi::ErrorKind::Other);
        assert_eq!(
            eh_spi::Error::kind(&Error::UNAVAILABLE),
            eh_spi::ErrorKind::Other
        );
    }
}
