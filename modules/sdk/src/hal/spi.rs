//! [`Spi`]: an SPI device, and how an embedded-hal transaction becomes host calls.

use alloc::vec::Vec;

use edge_abi::limits;
use embedded_hal::delay::DelayNs;
use embedded_hal::spi::{ErrorType, Operation, SpiDevice};

use super::{Delay, id};
use crate::{Error, sys};

/// Most bytes one SPI host call moves.
const MAX: usize = limits::SPI_MAX as usize;

/// What is clocked out where an operation has nothing to write (a `Read`, or the tail of a
/// `Transfer` whose write buffer is the shorter).
const FILL: u8 = 0x00;

/// An SPI device: a bus and a chip select, as the manifest's `caps.spi` grants them (`spi =
/// [{ bus = 0, cs = 0 }]`). The host asserts the chip select for each `spi_transfer` call.
///
/// # Transactions
///
/// [`transaction`](SpiDevice::transaction) lays its operations end to end in one buffer and makes
/// **one** full-duplex `spi_transfer` of it, then hands each operation its share of the bytes
/// read: so a `[Write(command), Read(reply)]` transaction happens under one chip-select assertion,
/// as the device expects. `Read` operations clock out `0x00`, as does a `Transfer` past the end of
/// its write buffer; a `Transfer` past the end of its read buffer drops the extra bytes read.
///
/// Two things split a transaction into several transfers, **with the chip select released
/// between them** (the host has no call that keeps it asserted): more than
/// [`limits::SPI_MAX`] bytes, cut into chunks of that size, and a `DelayNs` between transfers,
/// which waits (with [`Delay`]) between the chunk before it and the one after. Devices that
/// must see a single assertion (an SPI flash read longer than `SPI_MAX`, a delay while selected)
/// will not work through it. A transaction that fails in one transfer has run the ones before;
/// one with no bytes to clock makes no transfer (the chip select is not pulsed).
#[derive(Debug)]
pub struct Spi {
    bus: u32,
    cs: u32,
}

impl Spi {
    /// The device at chip select `cs` on SPI bus `bus`. No host call: an ungranted device fails
    /// at the first transfer.
    pub const fn new(bus: u32, cs: u32) -> Self {
        Spi { bus, cs }
    }

    /// The bus number.
    pub const fn bus(&self) -> u32 {
        self.bus
    }

    /// The chip select.
    pub const fn cs(&self) -> u32 {
        self.cs
    }
}

impl ErrorType for Spi {
    type Error = Error;
}

impl SpiDevice<u8> for Spi {
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<(), Error> {
        transaction(&mut Host(self), operations, MAX)
    }
}

/// What a transaction is made of: the host's transfers and a delay, or a recording stand-in in
/// tests.
trait Calls {
    /// One full-duplex transfer, in place.
    fn transfer(&mut self, buf: &mut [u8]) -> Result<(), Error>;
    /// Waits at least `ns` nanoseconds.
    fn delay_ns(&mut self, ns: u32);
}

/// The host's transfers on one device.
struct Host<'a>(&'a Spi);

impl Calls for Host<'_> {
    fn transfer(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        let ptr = sys::addr(buf.as_mut_ptr());
        // SAFETY: the pair describes a live, exclusively borrowed slice of initialised bytes that
        // the host reads and then overwrites in place, only within it.
        let code = unsafe {
            sys::spi_transfer(id(self.0.bus), id(self.0.cs), ptr, ptr, sys::len(buf.len()))
        };
        Error::check(code).map(drop)
    }

    fn delay_ns(&mut self, ns: u32) {
        Delay::new().delay_ns(ns);
    }
}

/// Where the bytes of one operation lie in the transfer buffer: `len` bytes of operation `op`,
/// from byte `at` of it, following the segments before.
#[derive(Debug)]
struct Segment {
    op: usize,
    at: usize,
    len: usize,
}

/// Runs `operations` as the [`Spi`] documentation describes, with transfers of at most `max`
/// bytes.
fn transaction(
    device: &mut impl Calls,
    operations: &mut [Operation<'_, u8>],
    max: usize,
) -> Result<(), Error> {
    let total: usize = operations.iter().map(len).sum();
    let mut buf = Vec::with_capacity(total.min(max));
    let mut segments = Vec::new();
    for i in 0..operations.len() {
        if let Operation::DelayNs(ns) = operations[i] {
            flush(device, operations, &mut buf, &mut segments)?;
            device.delay_ns(ns);
            continue;
        }
        let len = len(&operations[i]);
        let mut at = 0;
        while at < len {
            if buf.len() == max {
                flush(device, operations, &mut buf, &mut segments)?;
            }
            let n = (len - at).min(max - buf.len());
            push_written(&mut buf, &operations[i], at, n);
            segments.push(Segment { op: i, at, len: n });
            at += n;
        }
    }
    flush(device, operations, &mut buf, &mut segments)
}

/// Transfers what `buf` holds, if anything, and hands the bytes read to the operations its
/// `segments` came from; empties both.
fn flush(
    device: &mut impl Calls,
    operations: &mut [Operation<'_, u8>],
    buf: &mut Vec<u8>,
    segments: &mut Vec<Segment>,
) -> Result<(), Error> {
    if buf.is_empty() {
        return Ok(());
    }
    device.transfer(buf)?;
    let mut read = &buf[..];
    for Segment { op, at, len } in segments.drain(..) {
        let (part, rest) = read.split_at(len);
        read = rest;
        let dst = match &mut operations[op] {
            Operation::Read(dst)
            | Operation::Transfer(dst, _)
            | Operation::TransferInPlace(dst) => dst,
            Operation::Write(_) | Operation::DelayNs(_) => continue,
        };
        // A `Transfer`'s read buffer may end before the bytes it clocks do.
        let end = dst.len().min(at + len);
        if let (Some(dst), Some(src)) = (dst.get_mut(at..end), part.get(..end.saturating_sub(at))) {
            dst.copy_from_slice(src);
        }
    }
    buf.clear();
    Ok(())
}

/// The bytes operation `op` clocks: the longer of a `Transfer`'s two buffers.
fn len(op: &Operation<'_, u8>) -> usize {
    match op {
        Operation::Read(buf) | Operation::TransferInPlace(buf) => buf.len(),
        Operation::Write(bytes) => bytes.len(),
        Operation::Transfer(read, write) => read.len().max(write.len()),
        Operation::DelayNs(_) => 0,
    }
}

/// Appends the `n` bytes operation `op` writes from byte `at` on.
fn push_written(buf: &mut Vec<u8>, op: &Operation<'_, u8>, at: usize, n: usize) {
    let written: &[u8] = match op {
        Operation::Write(bytes) | Operation::Transfer(_, bytes) => bytes,
        Operation::TransferInPlace(bytes) => bytes,
        Operation::Read(_) | Operation::DelayNs(_) => &[],
    };
    let from = written.get(at..).unwrap_or_default();
    let from = from.get(..n).unwrap_or(from);
    buf.extend_from_slice(from);
    buf.resize(buf.len() + (n - from.len()), FILL);
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Call {
        /// The bytes written.
        Transfer(Vec<u8>),
        Delay(u32),
    }

    /// Records the calls; every transfer reads back its bytes plus 0x80 (so a 0x00 fill reads
    /// 0x80), and the call numbered `fail` fails.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<Call>,
        fail: Option<usize>,
    }

    impl Calls for Recorder {
        fn transfer(&mut self, buf: &mut [u8]) -> Result<(), Error> {
            self.calls.push(Call::Transfer(buf.to_vec()));
            if self.fail == Some(self.calls.len()) {
                return Err(Error::IO);
            }
            for b in buf {
                *b = b.wrapping_add(0x80);
            }
            Ok(())
        }

        fn delay_ns(&mut self, ns: u32) {
            self.calls.push(Call::Delay(ns));
        }
    }

    fn run(ops: &mut [Operation<'_, u8>], max: usize) -> (Vec<Call>, Result<(), Error>) {
        let mut device = Recorder::default();
        let result = transaction(&mut device, ops, max);
        (device.calls, result)
    }

    #[test]
    fn a_whole_transaction_is_one_transfer_under_one_chip_select() {
        let (mut reply, mut both, mut inplace) = ([0; 2], [0; 3], [5, 6]);
        let (calls, result) = run(
            &mut [
                Operation::Write(&[0x9f]),
                Operation::Read(&mut reply),
                Operation::Transfer(&mut both, &[1, 2, 3]),
                Operation::TransferInPlace(&mut inplace),
            ],
            MAX,
        );
        assert_eq!(result, Ok(()));
        assert_eq!(calls, [Call::Transfer(vec![0x9f, 0, 0, 1, 2, 3, 5, 6])]);
        assert_eq!(reply, [0x80, 0x80]);
        assert_eq!(both, [0x81, 0x82, 0x83]);
        assert_eq!(inplace, [0x85, 0x86]);
    }

    #[test]
    fn a_transfer_of_unequal_buffers_clocks_the_longer_one() {
        let mut short_read = [0; 1];
        let (calls, _) = run(&mut [Operation::Transfer(&mut short_read, &[1, 2, 3])], MAX);
        assert_eq!(calls, [Call::Transfer(vec![1, 2, 3])]);
        assert_eq!(short_read, [0x81]);

        let mut long_read = [0; 3];
        let (calls, _) = run(&mut [Operation::Transfer(&mut long_read, &[7])], MAX);
        assert_eq!(calls, [Call::Transfer(vec![7, 0, 0])]);
        assert_eq!(long_read, [0x87, 0x80, 0x80]);
    }

    #[test]
    fn long_transactions_are_cut_into_chunks_of_the_limit() {
        let mut read = [0; 5];
        let (calls, _) = run(
            &mut [
                Operation::Write(&[1, 2, 3]),
                Operation::Read(&mut read),
                Operation::Write(&[4]),
            ],
            4,
        );
        assert_eq!(
            calls,
            [
                Call::Transfer(vec![1, 2, 3, 0]),
                Call::Transfer(vec![0, 0, 0, 0]),
                Call::Transfer(vec![4]),
            ]
        );
        assert_eq!(read, [0x80; 5]);

        let mut buf: Vec<u8> = (0..10).collect();
        let (calls, _) = run(&mut [Operation::TransferInPlace(&mut buf)], 4);
        assert_eq!(calls.len(), 3);
        assert_eq!(buf, (0x80..0x8a).collect::<Vec<u8>>());
    }

    #[test]
    fn a_delay_between_transfers_splits_them_around_it() {
        let mut read = [0; 1];
        let (calls, _) = run(
            &mut [
                Operation::DelayNs(5),
                Operation::Write(&[1]),
                Operation::DelayNs(1000),
                Operation::Read(&mut read),
                Operation::DelayNs(7),
            ],
            MAX,
        );
        assert_eq!(
            calls,
            [
                Call::Delay(5),
                Call::Transfer(vec![1]),
                Call::Delay(1000),
                Call::Transfer(vec![0]),
                Call::Delay(7),
            ]
        );
        assert_eq!(read, [0x80]);
    }

    #[test]
    fn an_empty_transaction_makes_no_transfer() {
        assert_eq!(run(&mut [], MAX), (vec![], Ok(())));
        let (calls, _) = run(&mut [Operation::Write(&[]), Operation::Read(&mut [])], MAX);
        assert_eq!(calls, []);
    }

    #[test]
    fn a_failed_transfer_ends_the_transaction_with_its_code() {
        let mut device = Recorder {
            fail: Some(1),
            ..Recorder::default()
        };
        let mut read = [0; 4];
        let result = transaction(
            &mut device,
            &mut [Operation::Write(&[1, 2]), Operation::Read(&mut read)],
            2,
        );
        assert_eq!(result, Err(Error::IO));
        assert_eq!(device.calls, [Call::Transfer(vec![1, 2])]);
        assert_eq!(read, [0; 4]);
    }

    #[test]
    fn off_wasm32_the_device_is_unavailable() {
        let mut spi = Spi::new(0, 1);
        assert_eq!((spi.bus(), spi.cs()), (0, 1));
        assert_eq!(spi.write(&[1]), Err(Error::UNAVAILABLE));
    }
}
