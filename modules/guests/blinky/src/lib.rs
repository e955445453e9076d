//! Example module: blinks an LED on GPIO line 17, toggling it every tick (500 ms in its manifest),
//! through the SDK's embedded-hal pin. After each toggle it reads the line back (`gpio_get`: on a
//! Linux board, the level the kernel's GPIO driver reports) and logs both at debug level.

#![no_std]

use edge_sdk::hal::Pin;
use edge_sdk::hal::embedded_hal::digital::{InputPin, OutputPin, StatefulOutputPin};
use edge_sdk::{Error, Module, debug, error, info};

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
        self.led.toggle()?;
        let driven = self.led.is_set_high()?;
        let reads = self.led.is_high()?;
        debug!(
            "blinky: line {LINE} driven {}, reads {}",
            level(driven),
            level(reads)
        );
        Ok(())
    }
}

fn level(high: bool) -> &'static str {
    if high { "high" } else { "low" }
}

edge_sdk::module!(Blinky);
