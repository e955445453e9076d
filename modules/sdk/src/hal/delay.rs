//! [`Delay`]: waiting on the host's `delay_us`.

use edge_abi::limits::DELAY_MAX_US;
use embedded_hal::delay::DelayNs;

/// [`DelayNs`] on the host's `delay_us`: the module blocks without burning fuel, for at least the
/// time asked (rounded up to whole microseconds), as embedded-hal requires. Meant for what
/// drivers wait while a device resets or converts: one entry-point call may spend at most
/// [`edge_abi::limits::DELAY_PER_CALL_MAX_US`] (one second) in delays; for anything longer,
/// return and carry on at the next tick.
///
/// A delay the host refuses (past that allowance) panics, which logs the reason and traps: a
/// driver must never go on believing it waited. Off wasm32 delays return at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delay;

impl Delay {
    /// A delay.
    pub const fn new() -> Self {
        Delay
    }
}

impl DelayNs for Delay {
    fn delay_ns(&mut self, ns: u32) {
        wait_us(u64::from(ns).div_ceil(1_000));
    }

    fn delay_us(&mut self, us: u32) {
        wait_us(u64::from(us));
    }

    fn delay_ms(&mut self, ms: u32) {
        wait_us(u64::from(ms) * 1_000);
    }
}

/// Waits `us` microseconds, in host calls of at most [`DELAY_MAX_US`].
fn wait_us(mut us: u64) {
    while us > 0 {
        let step = us.min(u64::from(DELAY_MAX_US));
        // step is at most DELAY_MAX_US, which fits an i32.
        let step_i32 = i32::try_from(step).unwrap_or(i32::MAX);
        // SAFETY: no pointers.
        let code = unsafe { crate::sys::delay_us(step_i32) };
        if cfg!(target_arch = "wasm32") && code < 0 {
            panic!(
                "hal::Delay: the host refused a delay of {step} us: {}",
                edge_abi::err::name(code)
            );
        }
        us -= step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_return_at_once_off_wasm32() {
        let mut d = Delay::new();
        d.delay_ms(1_000);
        d.delay_us(u32::MAX);
        d.delay_ns(1);
    }
}
