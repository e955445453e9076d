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

    fn has(&self, f: u64) -> bool {
        self.funcs & f != 0
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

impl I2cBus for LinuxI2c {
    fn write(&mut self, addr: u8, bytes: &[u8]) -> Result<(), HalError> {
        if self.raw_i2c() {
            return Eh(&mut self.raw).write(addr, bytes);
        }
        match bytes {
            [byte] if self.has(func::SMBUS_WRITE_BYTE) => {
                let byte = *byte;
                self.smbus(addr)?
                    .smbus_write_byte(byte)
                    .map_err(|e| smbus_error(addr, e))
            }
            [register, rest @ ..]
                if !rest.is_empty()
                    && rest.len() <= SMBUS_BLOCK_MAX
                    && self.has(func::SMBUS_WRITE_I2C_BLOCK) =>
            {
                let (register, rest) = (*register, rest.to_vec());
                self.smbus(addr)?
                    .smbus_write_i2c_block_data(register, &rest)
                    .map_err(|e| smbus_error(addr, e))
            }
            _ => Err(self.unsupported(&format!("write {} bytes in one transfer", bytes.len()))),
        }
    }

    fn read(&mut self, addr: u8, buf: &mut [u8]) -> Result<(), HalError> {
        if self.raw_i2c() {
            return Eh(&mut self.raw).read(addr, buf);
        }
        match buf {
            [byte] if self.has(func::SMBUS_READ_BYTE) => {
                *byte = self
                    .smbus(addr)?
                    .smbus_read_byte()
                    .map_err(|e| smbus_error(addr, e))?;
                Ok(())
            }
            _ => Err(self.unsupported(&format!("read {} bytes without a register", buf.len()))),
        }
    }

    fn write_read(&mut self, addr: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), HalError> {
        if self.raw_i2c() {
            return Eh(&mut self.raw).write_read(addr, bytes, buf);
        }
        let [register] = bytes else {
            return Err(self.unsupported(&format!("write {} bytes before a read", bytes.len())));
        };
        if !self.has(func::SMBUS_READ_I2C_BLOCK) {
            return Err(self.unsupported("do SMBus I2C block reads"));
        }
        let register = *register;
        let dev = self.smbus(addr)?;
        for (i, chunk) in buf.chunks_mut(SMBUS_BLOCK_MAX).enumerate() {
            let at = usize::from(register) + i * SMBUS_BLOCK_MAX;
            let reg = u8::try_from(at)
                .map_err(|_| HalError::Io(format!("register {at:#x} is past 0xff")))?;
            // chunks of at most 32 bytes fit a u8.
            let len = u8::try_from(chunk.len()).unwrap_or(u8::MAX);
            let data = dev
                .smbus_read_i2c_block_data(reg, len)
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
