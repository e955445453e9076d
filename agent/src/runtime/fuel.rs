//! Fuel for the work host calls do, and the wall-clock deadline of a guest call.
//!
//! A guest call's budget is handed to the store in slices ([`SLICE`]); between slices the call
//! is paused (wasmi's resumable calls) and the deadline checked, so a guest that only computes is
//! stopped within one slice of its deadline. Host calls are charged from the same budget by the
//! work they do (the price list below, published in docs/abi.md): bytes copied, bytes written to
//! storage, microseconds slept, bytes moved on a bus. Prices are deterministic — the same call
//! costs the same fuel on every board — and were set from `just bench` so that a loop of any host
//! call takes about as long per unit of fuel as plain Wasm does (x86_64: ~1.5 ns per unit).

use std::time::{Duration, Instant};

/// Fuel handed to the store at a time; the deadline is checked between slices.
pub const SLICE: u64 = 1_000_000;

/// The price list, in fuel units. Every host call pays [`price::CALL`] plus what its work costs.
/// Measured by `just bench` (containment) on x86_64, where plain Wasm runs at ~0.5 ns per unit:
/// prices put a loop of each call at 1-2x that rate, except storage writes (priced for the wear
/// of the bytes they write) and waits (sleeps and buses, bounded by time rather than fuel).
pub mod price {
    /// Any host call: crossing into the host and back, argument checks (~120 ns).
    pub const CALL: u64 = 250;
    /// Bytes copied between guest memory and the host per unit (log text, topics, payloads, kv
    /// keys and values read, messages placed): see [`copied`].
    pub const BYTES_PER_UNIT: u64 = 4;
    /// A log line kept (~0.5 us: text checked, queued, later published).
    pub const LOG_LINE: u64 = 1_000;
    /// A call that asks the operating system for randomness (a system call).
    pub const RANDOM_CALL: u64 = 2_000;
    /// Per random byte (~4 us per KiB).
    pub const RANDOM_BYTE: u64 = 8;
    /// A publish beyond the bytes it copies: topic checks and queueing (~1.5 us).
    pub const PUBLISH: u64 = 3_000;
    /// A key-value read (a lookup in the store's tree).
    pub const KV_READ: u64 = 1_000;
    /// A key-value write or delete (a store write that reaches the disk).
    pub const KV_WRITE: u64 = 5_000;
    /// Per byte of key and value written to storage.
    pub const KV_BYTE_WRITTEN: u64 = 1;
    /// Per microsecond of `delay_us` asked for.
    pub const DELAY_US: u64 = 1;
    /// Least a `delay_us` is charged for, in microseconds: a sleep of 1 us really takes 60 to
    /// 160 us (timer slack and the system call).
    pub const DELAY_MIN_US: u64 = 100;
    /// A hardware call (a GPIO, I2C or SPI system call, a few microseconds).
    pub const HARDWARE_CALL: u64 = 5_000;
    /// Per byte moved on an I2C bus (at 100 kHz a byte takes ~90 us on the wire).
    pub const BUS_BYTE: u64 = 100;
    /// Per byte moved on an SPI bus (MHz clocks: ~1 us per byte).
    pub const SPI_BYTE: u64 = 10;

    /// The price of copying `bytes` bytes.
    pub fn copied(bytes: usize) -> u64 {
        (bytes as u64).div_ceil(BYTES_PER_UNIT)
    }
}

/// Why the host ended a guest call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The call's fuel ran out in a host call.
    OutOfFuel,
    /// The call's wall-clock deadline passed.
    Deadline,
}

/// A guest call's fuel outside the store and its deadline.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    /// The call's whole budget.
    budget: u64,
    /// Fuel not yet handed to the store.
    reserve: u64,
    /// The store's fuel while a host call runs (read before, written back after).
    pub(super) store: u64,
    /// When the call must end.
    deadline: Option<Instant>,
    /// The deadline's length, for reports.
    pub(super) deadline_ms: u64,
}

impl Meter {
    /// Starts a call with `budget` fuel and `deadline` of wall time; returns the first slice for
    /// the store.
    pub fn begin(&mut self, budget: u64, deadline: Duration) -> u64 {
        let first = budget.min(SLICE);
        self.budget = budget;
        self.reserve = budget - first;
        self.store = first;
        self.deadline = Instant::now().checked_add(deadline);
        self.deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        first
    }

    /// Fuel the call has burned, given the store's fuel now.
    pub fn used(&self, store_fuel: u64) -> u64 {
        self.budget
            .saturating_sub(self.reserve.saturating_add(store_fuel))
    }

    /// Whether the deadline has passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Time left before the deadline.
    pub fn time_left(&self) -> Duration {
        self.deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }

    /// The store ran dry with `store_fuel` left and needs `required`: the next slice to add, or
    /// why the call ends.
    pub fn refill(&mut self, store_fuel: u64, required: u64) -> Result<u64, Stop> {
        if self.past_deadline() {
            return Err(Stop::Deadline);
        }
        if self.reserve == 0 || store_fuel.saturating_add(self.reserve) < required {
            return Err(Stop::OutOfFuel);
        }
        let add = self
            .reserve
            .min(SLICE.max(required - store_fuel.min(required)));
        self.reserve -= add;
        Ok(add)
    }

    /// Charges `cost` for a host call against the store's fuel, refilling from the reserve (and
    /// checking the deadline) when the store runs dry. Out of fuel empties everything.
    pub fn charge(&mut self, cost: u64) -> Result<(), Stop> {
        while self.store < cost {
            match self.refill(self.store, cost) {
                Ok(add) => self.store += add,
                Err(stop) => {
                    if stop == Stop::OutOfFuel {
                        self.store = 0;
                        self.reserve = 0;
                    }
                    return Err(stop);
                }
            }
        }
        self.store -= cost;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_come_from_the_store_then_the_reserve_and_all_of_it_is_counted() {
        let mut m = Meter::default();
        let first = m.begin(2 * SLICE + 10, Duration::from_secs(60));
        assert_eq!(first, SLICE);
        m.charge(SLICE - 5).unwrap();
        assert_eq!(m.store, 5);
        // Past the slice: the reserve tops the store up.
        m.charge(100).unwrap();
        assert_eq!(m.used(m.store), SLICE + 95);
        assert_eq!(m.charge(10 * SLICE), Err(Stop::OutOfFuel));
        assert_eq!(
            m.used(m.store),
            2 * SLICE + 10,
            "out of fuel burns the whole budget"
        );
    }

    #[test]
    fn a_passed_deadline_ends_the_call_at_the_next_refill() {
        let mut m = Meter::default();
        m.begin(10 * SLICE, Duration::ZERO);
        assert!(m.past_deadline());
        assert_eq!(m.refill(0, 1), Err(Stop::Deadline));
        // A charge within the slice in hand still succeeds: the deadline is checked at refills
        // and at host calls that wait.
        m.charge(10).unwrap();
    }

    #[test]
    fn a_refill_gives_at_least_what_the_guest_needs() {
        let mut m = Meter::default();
        m.begin(5 * SLICE, Duration::from_secs(60));
        let add = m.refill(0, 2 * SLICE).unwrap();
        assert_eq!(add, 2 * SLICE);
        assert_eq!(m.refill(0, 10 * SLICE), Err(Stop::OutOfFuel));
    }
}
