//! Example module: blinks an LED on GPIO line 17, toggling it every tick (500 ms in its manifest),
//! through the SDK's embedded-hal pin.

#![no_std]

use edge_sdk::hal::Pin;
use edge_sdk::hal::embedded_hal::digital::{OutputPin, StatefulOutputPin};
use edge_sdk::{Error, Module, error, info};

const LINE: u32 = 17;

struct Blinky {
    led: Pin,
}

impl Module for Blinky {
    fn init() -> Result<Self, Error> {
        let mut led = Pin::new(LINE);
        // Start from a known level; this also fails at once if the line cannot be driven.
        led.set_low().inspect_err(|e| {
            error!("blinky: cannot drive GPIO line {LINE}: {e}");
        })?;
        info!("blinky: started on GPIO line {LINE}");
        Ok(Blinky { led })
    }

    fn tick(&mut self) -> Result<(), Error> {
        self.led.toggle()
    }
}

edge_sdk::module!(Blinky);
