//! The Linux backend: GPIO through the character device (`/dev/gpiochipN`, never sysfs), I2C
//! through i2cdev (`/dev/i2c-N`), SPI through spidev (`/dev/spidevB.C`), all via
//! linux-embedded-hal.
//!
//! I2C adapters differ: many (and the kernel's `i2c-stub`) speak SMBus only and refuse raw
//! `I2C_RDWR` transfers. The bus asks its adapter what it supports (`I2C_FUNCS`) when opened, and
//! without raw I2C it carries a register write-read over SMBus "I2C block" reads (at most 32 bytes
//! each, the register advanced between chunks — devices auto-increment), a one-byte write as an
//! SMBus byte write and longer writes as SMBus I2C block writes.

use std::path::{Path, PathBuf};

use gpio_cdev::{Chip, LineRequestFlags};
use i2cdev::core::I2CDevice as _;
use i2cdev::linux::{LinuxI2CDevice, LinuxI2CError};
use linux_embedded_hal::{CdevPin, I2cdev, SpidevDevice};

use super::{Direction, Eh, HalError, I2cBus};

/// Opens a GPIO line as an input or an output (initially low), labelled for `gpioinfo`.
pub fn open_gpio(chip: &Path, offset: u32, direction: Direction) -> Result<Eh<CdevPin>, String> {
    let mut chip = Chip::new(chip).map_err(|e| e.to_string())?;
    let line = chip.get_line(offset).map_err(|e| e.to_string())?;
    let flags = match direction {
        Direction::Input => LineRequestFlags::INPUT,
        Direction::Output => LineRequestFlags::OUTPUT,
    };
    let handle = line
        .request(flags, 0, "edge-agent")
        .map_err(|e| e.to_string())?;
    CdevPin::new(handle).map(Eh).map_err(|e| e.to_string())
}

/// Opens an SPI device in mode 0 at `speed_hz` (default 1 MHz).
pub fn open_spi(path: &Path, speed_hz: Option<u32>) -> Result<Eh<SpidevDevice>, String> {
    use spidev::{SpiModeFlags, SpidevOptions};
    let mut dev = SpidevDevice::open(path).map_err(|e| e.to_string())?;
    let options = SpidevOptions::new()
        .bits_per_word(8)
        .max_speed_hz(speed_hz.unwrap_or(1_000_000))
        .mode(SpiModeFlags::SPI_MODE_0)
        .build();
    dev.0.configure(&options).map_err(|e| e.to_string())?;
    Ok(Eh(dev))
}

/// `I2C_FUNCS` functionality bits (linux/i2c.h).
mod func {
    pub const I2C: u64 = 0x0000_0001;
    pub const SMBUS_READ_BYTE: u64 = 0x0002_0000;
    pub const SMBUS_WRITE_BYTE: u64 = 0x0004_0000;
    pub const SMBUS_READ_I2C_BLOCK: u64 = 0x0400_0000;
    pub const SMBUS_WRITE_I2C_BLOCK: u64 = 0x0800_0000;
}

/// The most an SMBus block transfer moves.
const SMBUS_BLOCK_MAX: usize = 32;

/// Asks the adapter behind `fd` what it supports.
#[allow(unsafe_code)]
fn functionality(fd: std::os::fd::RawFd) -> Result<u64, String> {
    const I2C_FUNCS: u64 = 0x0705;
    let mut funcs: libc::c_ulong = 0;
    // SAFETY: I2C_FUNCS writes one unsigned long through the pointer, which points at `funcs`,
    // alive for the call; `fd` is an open i2c-dev file descriptor owned by the caller.
    let r = unsafe { libc::ioctl(fd, I2C_FUNCS as libc::Ioctl, &raw mut funcs) };
    if r < 0 {
        return Err(format!("I2C_FUNCS: {}", std::io::Error::last_os_error()));
    }
    // c_ulong is 32 bits on armv7 and 64 on aarch64.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(funcs))
}

/// An I2C bus on Linux, raw I2C when the adapter has it, SMBus otherwise.
pub struct LinuxI2c {
    path: PathBuf,
    funcs: u64,
    raw: I2cdev,
    smbus: Option<(u8, LinuxI2CDevice)>,
}

impl std::fmt::Debug for LinuxI2c {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxI2c")
            .field("path", &self.path)
            .field("funcs", &format_args!("{:#x}", self.funcs))
            .finish_non_exhaustive()
    }
}

fn smbus_error(addr: u8, e: LinuxI2CError) -> HalError {
    let errno = match &e {
        LinuxI2CError::Errno(n) => Some(*n),
        LinuxI2CError::Io(io) => io.raw_os_error(),
    };
    match errno {
        // No device acknowledged the address (ENXIO, EREMOTEIO, EIO from some adapters).
        Some(libc::ENXIO | libc::EREMOTEIO) => HalError::NoDevice(addr),
        _ => HalError::Io(format!("SMBus transfer at {addr:#04x}: {e}")),
    }
}

impl LinuxI2c {
    /// Opens the bus and asks its adapter what it supports.
    pub fn open(path: &Path) -> Result<LinuxI2c, String> {
        use std::os::fd::AsRawFd as _;
        let raw = I2cdev::new(path).map_err(|e| e.to_string())?;
        let funcs = functionality(raw.as_raw_fd())?;
        tracing::info!(
            "{}: adapter functionality {funcs:#x} ({})",
            path.display(),
            if funcs & func::I2C != 0 {
                "raw I2C"
            } else {
                "SMBus only"
            }
        );
        Ok(LinuxI2c {
            path: path.to_path_buf(),
            funcs,
            raw,
            smbus: None,
        })
    }

    /// Whether the adapter does raw I2C transfers (`I2C_RDWR`).
    pub fn raw_i2c(&self) -> bool {
        self.funcs & func::I2C != 0
    }

    fn smbus(&mut self, addr: u8) -> Result<&mut LinuxI2CDevice, HalError> {
        if self.smbus.as_ref().map(|(a, _)| *a) != Some(addr) {
            let dev = LinuxI2CDevice::new(&self.path, u16::from(addr))
                .map_err(|e| smbus_error(addr, e))?;
            self.smbus = Some((addr, dev));
        }
        match &mut self.smbus {
            Some((_, dev)) => Ok(dev),
            None => unreachable!("set just above"),
        }
    }

    fn unsupported(&self, what: &str) -> HalError {
        HalError::Unsupported(format!(
            "{} is SMBus-only (functionality {:#x}) and cannot {what}",
            self.path.display(),
            self.funcs
        ))
    }
}

/// How an SMBus-only adapter carries a write.
#[derive(Debug, PartialEq, Eq)]
enum SmbusWrite<'a> {
    /// An SMBus byte write.
    Byte(u8),
    /// An SMBus I2C block write of `data` at `register`.
    Block { register: u8, data: &'a [u8] },
}

/// The SMBus transfer that carries a write of `bytes` on an adapter with the `I2C_FUNCS` bits
/// `funcs`, or what the adapter cannot do. Pure, like the other `smbus_*` plans: the shapes are
/// decided (and tested) without a kernel device.
fn smbus_write(funcs: u64, bytes: &[u8]) -> Result<SmbusWrite<'_>, String> {
    match bytes {
        [byte] if funcs & func::SMBUS_WRITE_BYTE != 0 => Ok(SmbusWrite::Byte(*byte)),
        [register, data @ ..]
            if !data.is_empty()
                && data.len() <= SMBUS_BLOCK_MAX
                && funcs & func::SMBUS_WRITE_I2C_BLOCK != 0 =>
        {
            Ok(SmbusWrite::Block {
                register: *register,
                data,
            })
        }
        _ => Err(format!("write {} bytes in one transfer", bytes.len())),
    }
}

/// Whether an adapter with `funcs` can read `len` bytes without a register (an SMBus byte read).
fn smbus_read(funcs: u64, len: usize) -> Result<(), String> {
    if len == 1 && funcs & func::SMBUS_READ_BYTE != 0 {
        Ok(())
    } else {
        Err(format!("read {len} bytes without a register"))
    }
}

/// The SMBus I2C block reads, as (register, length), that carry a write of `bytes` (a register)
/// followed by a read of `len` bytes: chunks of at most 32 bytes, the register advanced between
/// them. Checked whole before any transfer, so a refused read moves nothing.
fn smbus_block_reads(
    funcs: u64,
    bytes: &[u8],
    len: usize,
) -> Result<impl Iterator<Item = (u8, usize)>, String> {
    let [register] = bytes else {
        return Err(format!("write {} bytes before a read", bytes.len()));
    };
    if funcs & func::SMBUS_READ_I2C_BLOCK == 0 {
        return Err("do SMBus I2C block reads".to_string());
    }
    let register = usize::from(*register);
    let last_chunk = register + len.saturating_sub(1) / SMBUS_BLOCK_MAX * SMBUS_BLOCK_MAX;
    if len > 0 && last_chunk > 0xff {
        return Err(format!(
            "read {len} bytes from register {register:#04x}: its chunk at {last_chunk:#x} is past register 0xff"
        ));
    }
    Ok((0..len).step_by(SMBUS_BLOCK_MAX).map(move |start| {
        // Every chunk's register fits a u8 (checked above).
        let reg = u8::try_from(register + start).unwrap_or(u8::MAX);
        (reg, SMBUS_BLOCK_MAX.min(len - start))
    }))
}

impl I2cBus for LinuxI2c {
    fn write(&mut self, addr: u8, bytes: &[u8]) -> Result<(), HalError> {
        if self.raw_i2c() {
            return Eh(&mut self.raw).write(addr, bytes);
        }
        let plan = smbus_write(self.funcs, bytes).map_err(|what| self.unsupported(&what))?;
        let dev = self.smbus(addr)?;
        match plan {
            SmbusWrite::Byte(byte) => dev.smbus_write_byte(byte),
            SmbusWrite::Block { register, data } => dev.smbus_write_i2c_block_data(register, data),
        }
        .map_err(|e| smbus_error(addr, e))
    }

    fn read(&mut self, addr: u8, buf: &mut [u8]) -> Result<(), HalError> {
        if self.raw_i2c() {
            return Eh(&mut self.raw).read(addr, buf);
        }
        smbus_read(self.funcs, buf.len()).map_err(|what| self.unsupported(&what))?;
        let byte = self
            .smbus(addr)?
            .smbus_read_byte()
            .map_err(|e| smbus_error(addr, e))?;
        buf.fill(byte);
        Ok(())
    }

    fn write_read(&mut self, addr: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), HalError> {
        if self.raw_i2c() {
            return Eh(&mut self.raw).write_read(addr, bytes, buf);
        }
        let reads = smbus_block_reads(self.funcs, bytes, buf.len())
            .map_err(|what| self.unsupported(&what))?;
        let dev = self.smbus(addr)?;
        for ((reg, len), chunk) in reads.zip(buf.chunks_mut(SMBUS_BLOCK_MAX)) {
            // chunks of at most 32 bytes fit a u8.
            let data = dev
                .smbus_read_i2c_block_data(reg, u8::try_from(len).unwrap_or(u8::MAX))
                .map_err(|e| smbus_error(addr, e))?;
            if data.len() != chunk.len() {
                return Err(HalError::Io(format!(
                    "SMBus block read at {addr:#04x} register {reg:#04x}: {} bytes of {}",
                    data.len(),
                    chunk.len()
                )));
            }
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel's i2c-stub reports (`I2C_FUNCS`, seen in the full-system test): SMBus only,
    /// byte and I2C block transfers included.
    const I2C_STUB: u64 = 0x0c7f_0000;
    /// An adapter with SMBus byte transfers and nothing else.
    const BYTES_ONLY: u64 = func::SMBUS_READ_BYTE | func::SMBUS_WRITE_BYTE;

    #[test]
    fn i2c_stub_is_smbus_only_with_block_transfers() {
        assert_eq!(I2C_STUB & func::I2C, 0);
        assert_ne!(I2C_STUB & func::SMBUS_READ_I2C_BLOCK, 0);
        assert_ne!(I2C_STUB & func::SMBUS_WRITE_I2C_BLOCK, 0);
    }

    #[test]
    fn writes_become_byte_or_block_writes() {
        assert_eq!(smbus_write(I2C_STUB, &[0xb6]), Ok(SmbusWrite::Byte(0xb6)));
        assert_eq!(
            smbus_write(I2C_STUB, &[0xe0, 0xb6]),
            Ok(SmbusWrite::Block {
                register: 0xe0,
                data: &[0xb6]
            })
        );
        let longest = [7u8; 1 + SMBUS_BLOCK_MAX];
        assert_eq!(
            smbus_write(I2C_STUB, &longest),
            Ok(SmbusWrite::Block {
                register: 7,
                data: &longest[1..]
            })
        );
    }

    #[test]
    fn writes_an_adapter_cannot_carry_are_refused_with_their_size() {
        assert_eq!(
            smbus_write(I2C_STUB, &[0u8; 2 + SMBUS_BLOCK_MAX]),
            Err("write 34 bytes in one transfer".to_string())
        );
        assert_eq!(
            smbus_write(I2C_STUB, &[]),
            Err("write 0 bytes in one transfer".to_string())
        );
        assert_eq!(
            smbus_write(BYTES_ONLY, &[0xf4, 0x27]),
            Err("write 2 bytes in one transfer".to_string())
        );
        assert!(smbus_write(func::SMBUS_WRITE_I2C_BLOCK, &[0xb6]).is_err());
    }

    #[test]
    fn reads_without_a_register_are_single_bytes() {
        assert_eq!(smbus_read(I2C_STUB, 1), Ok(()));
        assert_eq!(
            smbus_read(I2C_STUB, 2),
            Err("read 2 bytes without a register".to_string())
        );
        assert!(smbus_read(func::SMBUS_WRITE_BYTE, 1).is_err());
    }

    fn block_reads(funcs: u64, bytes: &[u8], len: usize) -> Result<Vec<(u8, usize)>, String> {
        smbus_block_reads(funcs, bytes, len).map(Iterator::collect)
    }

    #[test]
    fn write_reads_become_chunked_block_reads() {
        // The BME280's data registers, and its calibration (26 bytes) in one chunk.
        assert_eq!(block_reads(I2C_STUB, &[0xf7], 8), Ok(vec![(0xf7, 8)]));
        assert_eq!(block_reads(I2C_STUB, &[0x88], 26), Ok(vec![(0x88, 26)]));
        assert_eq!(
            block_reads(I2C_STUB, &[0x00], 70),
            Ok(vec![(0x00, 32), (0x20, 32), (0x40, 6)])
        );
        // The last chunk may start at 0xff.
        assert_eq!(
            block_reads(I2C_STUB, &[0xdf], 33),
            Ok(vec![(0xdf, 32), (0xff, 1)])
        );
        assert_eq!(block_reads(I2C_STUB, &[0xff], 0), Ok(vec![]));
    }

    #[test]
    fn write_reads_an_adapter_cannot_carry_are_refused_before_any_transfer() {
        assert_eq!(
            block_reads(I2C_STUB, &[0x00, 0x10], 2),
            Err("write 2 bytes before a read".to_string())
        );
        assert_eq!(
            block_reads(I2C_STUB, &[], 2),
            Err("write 0 bytes before a read".to_string())
        );
        assert_eq!(
            block_reads(BYTES_ONLY, &[0xd0], 1),
            Err("do SMBus I2C block reads".to_string())
        );
        assert_eq!(
            block_reads(I2C_STUB, &[0xe0], 34),
            Err(
                "read 34 bytes from register 0xe0: its chunk at 0x100 is past register 0xff"
                    .to_string()
            )
        );
    }
}
