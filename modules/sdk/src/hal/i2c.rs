//! [`I2c`]: an I2C bus, and how an embedded-hal transaction becomes host calls.

use alloc::borrow::Cow;
use alloc::vec;

use edge_abi::limits;
use embedded_hal::i2c::{self, ErrorType, Operation, SevenBitAddress};

use super::id;
use crate::{Error, sys};

/// Most bytes one I2C host call moves each way.
const MAX: usize = limits::I2C_MAX as usize;

/// An I2C bus, by the number the manifest's `caps.i2c` grants (`i2c = [{ bus = 1, addresses =
/// [0x76] }]`), with 7-bit addresses. Every address a driver talks to must be granted, else
/// [`Error::DENIED`]. It is only the bus number: clone it to hand one bus to several drivers (each
/// host call is a whole bus transfer, which another driver's cannot cut into).
///
/// # Transactions
///
/// The host has three calls: a write, a read, and a write then a read with a repeated start
/// (`i2c_write_read`). [`transaction`](i2c::I2c::transaction) maps operations onto them:
///
/// 1. Adjacent operations of the same kind are one run, as the embedded-hal contract says (no
///    start or stop between them): their bytes are gathered into one write or one read.
/// 2. Runs are taken from the front: a write run followed by a read run is one `i2c_write_read`;
///    any other run alone is one `i2c_write` or `i2c_read`.
///
/// So `[Write]`, `[Read]` and `[Write, Read]` (what `write`, `read` and `write_read` send) are one
/// call each, with exactly the contract's bus events. **Only a write followed by a read is
/// atomic**: a longer sequence (`[Write, Read, Write]`, `[Read, Write, Read]`, ...) becomes
/// several calls with a stop and a start between them instead of a repeated start, and another
/// module granted the same device may get its own transfers in between. Every run is checked
/// against [`limits::I2C_MAX`] before the first call, so a transaction refused for its size
/// ([`Error::TOO_LARGE`]) has not touched the bus; one that fails in a later call has run the
/// calls before it. An empty transaction makes no call.
#[derive(Debug, Clone)]
pub struct I2c {
    bus: u32,
}

impl I2c {
    /// I2C bus `bus`. No host call: an ungranted bus or address fails at the first transfer.
    pub const fn new(bus: u32) -> Self {
        I2c { bus }
    }

    /// The bus number.
    pub const fn bus(&self) -> u32 {
        self.bus
    }
}

impl ErrorType for I2c {
    type Error = Error;
}

impl i2c::I2c<SevenBitAddress> for I2c {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), Error> {
        transaction(&mut Host(self.bus), address, operations)
    }
}

/// The three bus calls a transaction is made of: the host's, or a recording stand-in in tests.
trait Calls {
    fn write(&mut self, address: u8, bytes: &[u8]) -> Result<(), Error>;
    fn read(&mut self, address: u8, buf: &mut [u8]) -> Result<(), Error>;
    fn write_read(&mut self, address: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), Error>;
}

/// The host's calls on one bus.
struct Host(u32);

impl Calls for Host {
    fn write(&mut self, address: u8, bytes: &[u8]) -> Result<(), Error> {
        // SAFETY: the pair describes a live slice the host only reads.
        let code = unsafe {
            sys::i2c_write(
                id(self.0),
                address.into(),
                sys::addr(bytes.as_ptr()),
                sys::len(bytes.len()),
            )
        };
        Error::check(code).map(drop)
    }

    fn read(&mut self, address: u8, buf: &mut [u8]) -> Result<(), Error> {
        // SAFETY: the pair describes a live, exclusively borrowed slice of initialised bytes; the
        // host writes only within it.
        let code = unsafe {
            sys::i2c_read(
                id(self.0),
                address.into(),
                sys::addr(buf.as_mut_ptr()),
                sys::len(buf.len()),
            )
        };
        Error::check(code).map(drop)
    }

    fn write_read(&mut self, address: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), Error> {
        // SAFETY: as for `write` and `read`; the two slices are distinct borrows.
        let code = unsafe {
            sys::i2c_write_read(
                id(self.0),
                address.into(),
                sys::addr(bytes.as_ptr()),
                sys::len(bytes.len()),
                sys::addr(buf.as_mut_ptr()),
                sys::len(buf.len()),
            )
        };
        Error::check(code).map(drop)
    }
}

/// Runs `operations` on `address` as the [`I2c`] documentation describes.
fn transaction(
    bus: &mut impl Calls,
    address: u8,
    operations: &mut [Operation<'_>],
) -> Result<(), Error> {
    let mut start = 0;
    while start < operations.len() {
        let end = run_end(operations, start);
        if operations[start..end].iter().map(len).sum::<usize>() > MAX {
            return Err(Error::TOO_LARGE);
        }
        start = end;
    }

    let mut start = 0;
    while start < operations.len() {
        let end = run_end(operations, start);
        if !is_write(&operations[start]) {
            read_into(&mut operations[start..end], |buf| bus.read(address, buf))?;
            start = end;
        } else if end == operations.len() {
            bus.write(address, &gather(&operations[start..end]))?;
            start = end;
        } else {
            let read_end = run_end(operations, end);
            let (writes, reads) = operations.split_at_mut(end);
            let bytes = gather(&writes[start..]);
            read_into(&mut reads[..read_end - end], |buf| {
                bus.write_read(address, &bytes, buf)
            })?;
            start = read_end;
        }
    }
    Ok(())
}

fn is_write(operation: &Operation<'_>) -> bool {
    matches!(operation, Operation::Write(_))
}

fn len(operation: &Operation<'_>) -> usize {
    match operation {
        Operation::Read(buf) => buf.len(),
        Operation::Write(bytes) => bytes.len(),
    }
}

/// The end of the run of operations of one kind that begins at `start`.
fn run_end(operations: &[Operation<'_>], start: usize) -> usize {
    let kind = is_write(&operations[start]);
    operations[start..]
        .iter()
        .position(|op| is_write(op) != kind)
        .map_or(operations.len(), |n| start + n)
}

/// The bytes of a run of writes, in one slice: borrowed when the run is one operation.
fn gather<'a>(writes: &'a [Operation<'_>]) -> Cow<'a, [u8]> {
    match writes {
        [Operation::Write(bytes)] => Cow::Borrowed(bytes),
        _ => Cow::Owned(
            writes
                .iter()
                .filter_map(|op| match op {
                    Operation::Write(bytes) => Some(*bytes),
                    Operation::Read(_) => None,
                })
                .flatten()
                .copied()
                .collect(),
        ),
    }
}

/// Reads a run of reads with one `call`: straight into the buffer when the run is one operation,
/// else into one buffer then spread over theirs, in order.
fn read_into(
    reads: &mut [Operation<'_>],
    call: impl FnOnce(&mut [u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    if let [Operation::Read(buf)] = reads {
        return call(buf);
    }
    let mut all = vec![0; reads.iter().map(len).sum()];
    call(&mut all)?;
    let mut rest = &all[..];
    for op in reads {
        if let Operation::Read(buf) = op {
            let (part, tail) = rest.split_at(buf.len());
            buf.copy_from_slice(part);
            rest = tail;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Call {
        Write(u8, Vec<u8>),
        Read(u8, usize),
        WriteRead(u8, Vec<u8>, usize),
    }

    /// Records the calls; every read returns 1, 2, 3, ... (255, 1, ...) and the call numbered `fail` fails.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<Call>,
        fail: Option<usize>,
    }

    impl Recorder {
        fn record(&mut self, call: Call, buf: &mut [u8]) -> Result<(), Error> {
            self.calls.push(call);
            if self.fail == Some(self.calls.len()) {
                return Err(Error::IO);
            }
            for (b, n) in buf.iter_mut().zip((1..=255).cycle()) {
                *b = n;
            }
            Ok(())
        }
    }

    impl Calls for Recorder {
        fn write(&mut self, address: u8, bytes: &[u8]) -> Result<(), Error> {
            self.record(Call::Write(address, bytes.to_vec()), &mut [])
        }

        fn read(&mut self, address: u8, buf: &mut [u8]) -> Result<(), Error> {
            self.record(Call::Read(address, buf.len()), buf)
        }

        fn write_read(&mut self, address: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), Error> {
            self.record(Call::WriteRead(address, bytes.to_vec(), buf.len()), buf)
        }
    }

    fn run(ops: &mut [Operation<'_>]) -> (Vec<Call>, Result<(), Error>) {
        let mut bus = Recorder::default();
        let result = transaction(&mut bus, 0x76, ops);
        (bus.calls, result)
    }

    #[test]
    fn a_write_a_read_and_a_write_then_read_are_one_call_each() {
        let (calls, result) = run(&mut [Operation::Write(&[0xf4, 0x25])]);
        assert_eq!(calls, [Call::Write(0x76, vec![0xf4, 0x25])]);
        assert_eq!(result, Ok(()));

        let mut buf = [0; 3];
        let (calls, _) = run(&mut [Operation::Read(&mut buf)]);
        assert_eq!(calls, [Call::Read(0x76, 3)]);
        assert_eq!(buf, [1, 2, 3]);

        let mut buf = [0; 2];
        let (calls, _) = run(&mut [Operation::Write(&[0xd0]), Operation::Read(&mut buf)]);
        assert_eq!(calls, [Call::WriteRead(0x76, vec![0xd0], 2)]);
        assert_eq!(buf, [1, 2]);
    }

    #[test]
    fn adjacent_operations_of_one_kind_are_merged_into_one_call() {
        let (mut a, mut b) = ([0; 2], [0; 3]);
        let (calls, _) = run(&mut [
            Operation::Write(&[0x10]),
            Operation::Write(&[]),
            Operation::Write(&[0x20, 0x30]),
            Operation::Read(&mut a),
            Operation::Read(&mut b),
        ]);
        assert_eq!(calls, [Call::WriteRead(0x76, vec![0x10, 0x20, 0x30], 5)]);
        assert_eq!((a, b), ([1, 2], [3, 4, 5]));

        let (calls, _) = run(&mut [Operation::Write(&[1]), Operation::Write(&[2])]);
        assert_eq!(calls, [Call::Write(0x76, vec![1, 2])]);
    }

    #[test]
    fn longer_sequences_split_into_write_reads_from_the_front() {
        let (mut a, mut b) = ([0; 1], [0; 2]);
        let (calls, _) = run(&mut [
            Operation::Write(&[1]),
            Operation::Read(&mut a),
            Operation::Write(&[2]),
            Operation::Read(&mut b),
            Operation::Write(&[3]),
        ]);
        assert_eq!(
            calls,
            [
                Call::WriteRead(0x76, vec![1], 1),
                Call::WriteRead(0x76, vec![2], 2),
                Call::Write(0x76, vec![3]),
            ]
        );

        let (mut a, mut b) = ([0; 1], [0; 1]);
        let (calls, _) = run(&mut [
            Operation::Read(&mut a),
            Operation::Write(&[9]),
            Operation::Read(&mut b),
        ]);
        assert_eq!(
            calls,
            [Call::Read(0x76, 1), Call::WriteRead(0x76, vec![9], 1)]
        );
    }

    #[test]
    fn an_empty_transaction_makes_no_call_and_an_empty_write_is_passed_on() {
        assert_eq!(run(&mut []), (vec![], Ok(())));
        // An address-only write: how drivers probe for a device.
        let (calls, _) = run(&mut [Operation::Write(&[])]);
        assert_eq!(calls, [Call::Write(0x76, vec![])]);
    }

    #[test]
    fn a_run_above_the_limit_is_refused_before_any_call() {
        let big = vec![0; MAX];
        let (calls, result) = run(&mut [
            Operation::Write(&[1]),
            Operation::Read(&mut [0; 1]),
            Operation::Write(&big),
            Operation::Write(&[1]),
        ]);
        assert_eq!((calls, result), (vec![], Err(Error::TOO_LARGE)));

        // Exactly the limit on each side is fine.
        let mut buf = vec![0; MAX];
        let (calls, result) = run(&mut [Operation::Write(&big), Operation::Read(&mut buf)]);
        assert_eq!(calls, [Call::WriteRead(0x76, big.clone(), MAX)]);
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn a_failed_call_ends_the_transaction_with_its_code() {
        let mut bus = Recorder {
            fail: Some(1),
            ..Recorder::default()
        };
        let mut buf = [0; 2];
        let result = transaction(
            &mut bus,
            0x76,
            &mut [
                Operation::Write(&[1]),
                Operation::Read(&mut buf),
                Operation::Write(&[2]),
            ],
        );
        assert_eq!(result, Err(Error::IO));
        assert_eq!(bus.calls.len(), 1);
        assert_eq!(buf, [0, 0]);
    }

    #[test]
    fn off_wasm32_the_bus_is_unavailable() {
        use embedded_hal::i2c::I2c as _;
        let mut bus = I2c::new(1);
        assert_eq!(bus.bus(), 1);
        assert_eq!(bus.write(0x76, &[0xe0, 0xb6]), Err(Error::UNAVAILABLE));
        assert_eq!(
            bus.write_read(0x76, &[0xd0], &mut [0]),
            Err(Error::UNAVAILABLE)
        );
    }
}
