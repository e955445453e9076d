//! Example module: a Bosch BME280 at address 0x76 on I2C bus 1, read with the unmodified `bme280`
//! driver crate from crates.io through the SDK's embedded-hal implementation ([`edge_sdk::hal`]).
//! `init` sets the sensor up (and fails if it does not answer); every tick measures temperature,
//! pressure and humidity and publishes them to `bme280/reading` as JSON:
//! `{"temperature_c":21.43,"pressure_pa":101325.2,"humidity_pct":45.12}`.
//!
//! The driver waits with [`Delay`] (the host's `delay_us`, which burns no fuel): 2 ms in `init`
//! and 40 ms, the sensor's conversion, in every tick. A tick costs about 14 000 fuel.

#![no_std]

extern crate alloc;

use alloc::string::String;
use core::fmt::{self, Write};

use bme280::i2c::BME280;
use edge_sdk::hal::{Delay, I2c};
use edge_sdk::{Error, Module, error, info, publish};

const BUS: u32 = 1;
const TOPIC: &str = "bme280/reading";

/// The module's own failure codes (positive), for what is not a host call failing.
const UNSUPPORTED_CHIP: Error = Error::new(2);
const BAD_DATA: Error = Error::new(3);

struct Bme280Telemetry {
    sensor: BME280<I2c>,
    delay: Delay,
}

impl Module for Bme280Telemetry {
    fn init() -> Result<Self, Error> {
        let mut sensor = BME280::new_primary(I2c::new(BUS));
        let mut delay = Delay::new();
        sensor.init(&mut delay).map_err(|e| {
            error!("bme280-telemetry: no BME280 set up at 0x76 on I2C bus {BUS}: {e:?}");
            code(e)
        })?;
        info!("bme280-telemetry: BME280 at 0x76 on I2C bus {BUS} ready");
        Ok(Bme280Telemetry { sensor, delay })
    }

    fn tick(&mut self) -> Result<(), Error> {
        let m = self.sensor.measure(&mut self.delay).map_err(|e| {
            error!("bme280-telemetry: measurement failed: {e:?}");
            code(e)
        })?;
        let mut json = String::with_capacity(80);
        // Writing to a String cannot fail.
        let _ = write!(
            json,
            r#"{{"temperature_c":{},"pressure_pa":{},"humidity_pct":{}}}"#,
            Fixed(m.temperature, 2),
            Fixed(m.pressure, 1),
            Fixed(m.humidity, 2),
        );
        publish(TOPIC, json.as_bytes())
    }
}

/// The code an entry point returns for a driver error: the host's for a bus failure.
fn code(e: bme280::Error<Error>) -> Error {
    match e {
        bme280::Error::Bus(e) => e,
        bme280::Error::UnsupportedChip => UNSUPPORTED_CHIP,
        bme280::Error::InvalidData | bme280::Error::CompensationFailed => BAD_DATA,
        bme280::Error::NoCalibrationData | bme280::Error::Delay => Error::FAILED,
    }
}

/// A JSON number with a fixed number of decimals, rounded half away from zero; `null` if not
/// finite. Integer formatting only: core's float formatting (`{:.2}`) would add 17 KB to the
/// module.
struct Fixed(f32, u32);

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Fixed(value, decimals) = *self;
        if !value.is_finite() {
            return f.write_str("null");
        }
        let scale = 10_u64.pow(decimals);
        let scaled = f64::from(value) * scale as f64;
        // Readings are far inside i64; the cast saturates anyway.
        let rounded = if scaled < 0.0 {
            scaled - 0.5
        } else {
            scaled + 0.5
        } as i64;
        let sign = if rounded < 0 { "-" } else { "" };
        let (whole, frac) = (
            rounded.unsigned_abs() / scale,
            rounded.unsigned_abs() % scale,
        );
        if decimals == 0 {
            write!(f, "{sign}{whole}")
        } else {
            write!(f, "{sign}{whole}.{frac:0width$}", width = decimals as usize)
        }
    }
}

edge_sdk::module!(Bme280Telemetry);
