//! The hardware a device offers to modules: GPIO lines, I2C buses and SPI devices named in the
//! agent's configuration, each backed by any embedded-hal 1.0 implementation — the Linux backend
//! (GPIO character device, i2cdev, spidev) on a board, simulated devices everywhere else.
//!
//! Modules never see this directly: host functions (`runtime::host`) check every call against the
//! module's signed grants (line, bus + address, bus + chip select) and only then reach the
//! resource here. Resources are shared: each sits behind its own mutex, so two modules granted
//! different addresses on one I2C bus take turns on it.

#[cfg(target_os = "linux")]
pub mod linux;
pub mod sim;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::core::manifest::Caps;

/// What went wrong on a bus or line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HalError {
    /// No device answered at the address (an I2C NACK).
    #[error("no device answered at address {0:#04x}")]
    NoDevice(u8),
    /// The bus or line failed.
    #[error("{0}")]
    Io(String),
    /// The backend cannot do this (an SMBus-only adapter asked for a raw transfer, say).
    #[error("not supported here: {0}")]
    Unsupported(String),
    /// The line cannot be driven (an input).
    #[error("{0}")]
    NotAnOutput(String),
}

impl HalError {
    /// The ABI v1 return code for this failure.
    pub fn abi_code(&self) -> i32 {
        match self {
            HalError::NoDevice(_) | HalError::Io(_) => edge_abi::err::IO,
            HalError::Unsupported(_) => edge_abi::err::UNAVAILABLE,
            HalError::NotAnOutput(_) => edge_abi::err::BAD_ARGUMENT,
        }
    }
}

/// A GPIO line, as the host functions use it.
pub trait GpioLine: Send + fmt::Debug {
    /// Drives the line.
    fn set(&mut self, high: bool) -> Result<(), HalError>;
    /// Reads the line.
    fn get(&mut self) -> Result<bool, HalError>;
}

/// An I2C bus, as the host functions use it (7-bit addresses).
pub trait I2cBus: Send + fmt::Debug {
    /// Writes `bytes` to the device at `addr`.
    fn write(&mut self, addr: u8, bytes: &[u8]) -> Result<(), HalError>;
    /// Reads `buf.len()` bytes from the device at `addr`.
    fn read(&mut self, addr: u8, buf: &mut [u8]) -> Result<(), HalError>;
    /// Writes then reads with a repeated start (a register read).
    fn write_read(&mut self, addr: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), HalError>;
}

/// An SPI device (one chip select), as the host functions use it.
pub trait SpiDev: Send + fmt::Debug {
    /// A full-duplex transfer: `write` goes out while `read` (of the same length) comes in.
    fn transfer(&mut self, read: &mut [u8], write: &[u8]) -> Result<(), HalError>;
}

/// Adapts any embedded-hal 1.0 implementation (a Linux device, a simulated one, a test mock) to
/// the traits above.
pub struct Eh<T>(pub T);

impl<T> fmt::Debug for Eh<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Eh<{}>", std::any::type_name::<T>())
    }
}

fn digital_error(e: impl embedded_hal::digital::Error) -> HalError {
    HalError::Io(format!("GPIO {:?}: {e:?}", e.kind()))
}

impl<T> GpioLine for Eh<T>
where
    T: embedded_hal::digital::OutputPin + embedded_hal::digital::InputPin + Send,
{
    fn set(&mut self, high: bool) -> Result<(), HalError> {
        if high {
            self.0.set_high().map_err(digital_error)
        } else {
            self.0.set_low().map_err(digital_error)
        }
    }

    fn get(&mut self) -> Result<bool, HalError> {
        self.0.is_high().map_err(digital_error)
    }
}

fn i2c_error(addr: u8, e: impl embedded_hal::i2c::Error) -> HalError {
    use embedded_hal::i2c::ErrorKind;
    match e.kind() {
        ErrorKind::NoAcknowledge(_) => HalError::NoDevice(addr),
        kind => HalError::Io(format!("I2C {kind:?} at address {addr:#04x}")),
    }
}

impl<T> I2cBus for Eh<T>
where
    T: embedded_hal::i2c::I2c + Send,
{
    fn write(&mut self, addr: u8, bytes: &[u8]) -> Result<(), HalError> {
        self.0.write(addr, bytes).map_err(|e| i2c_error(addr, e))
    }

    fn read(&mut self, addr: u8, buf: &mut [u8]) -> Result<(), HalError> {
        self.0.read(addr, buf).map_err(|e| i2c_error(addr, e))
    }

    fn write_read(&mut self, addr: u8, bytes: &[u8], buf: &mut [u8]) -> Result<(), HalError> {
        self.0
            .write_read(addr, bytes, buf)
            .map_err(|e| i2c_error(addr, e))
    }
}

impl<T> SpiDev for Eh<T>
where
    T: embedded_hal::spi::SpiDevice + Send,
{
    fn transfer(&mut self, read: &mut [u8], write: &[u8]) -> Result<(), HalError> {
        self.0
            .transfer(read, write)
            .map_err(|e| HalError::Io(format!("SPI {:?}", embedded_hal::spi::Error::kind(&e))))
    }
}

/// Which way a line goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Read only.
    Input,
    /// Driven by (at most) one module.
    Output,
}

/// What backs a GPIO line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpioBackend {
    /// A line of a Linux GPIO character device (`chip`, `offset`).
    Linux,
    /// A simulated LED (an output).
    SimLed,
    /// A simulated push button (an input).
    SimButton,
}

/// A GPIO line the device offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioConfig {
    /// The number manifests grant (`caps.gpio`).
    pub line: u32,
    /// What backs it.
    pub backend: GpioBackend,
    /// Input or output (Linux lines; simulated LEDs are outputs, buttons inputs).
    #[serde(default)]
    pub direction: Option<Direction>,
    /// The GPIO character device (Linux), e.g. `/dev/gpiochip0`.
    #[serde(default)]
    pub chip: Option<PathBuf>,
    /// The line offset on that chip (Linux); defaults to `line`.
    #[serde(default)]
    pub offset: Option<u32>,
    /// The level an output line is driven to whenever no module owns it: at start, and when
    /// its module is removed, quarantined, rolled back or fails. Defaults to `low`; set `high`
    /// for active-low hardware (a relay board that switches on at low), or `keep` to leave the
    /// line as its last module left it.
    #[serde(default)]
    pub safe: SafeLevel,
}

/// What an output line does when no module owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SafeLevel {
    /// Driven low.
    #[default]
    Low,
    /// Driven high.
    High,
    /// Left as it is.
    Keep,
}

/// What backs an I2C bus or SPI device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BusBackend {
    /// `/dev/i2c-N` or `/dev/spidevB.C`.
    Linux,
    /// Simulated devices.
    Sim,
}

/// A simulated I2C device kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimI2cKind {
    /// A Bosch BME280 (temperature, pressure, humidity).
    Bme280,
}

/// A simulated device on a simulated I2C bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimI2cDeviceConfig {
    /// 7-bit address.
    pub address: u8,
    /// What it is.
    pub kind: SimI2cKind,
}

/// An I2C bus the device offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cConfig {
    /// The number manifests grant (`caps.i2c[].bus`).
    pub bus: u32,
    /// What backs it.
    pub backend: BusBackend,
    /// The device file (Linux); defaults to `/dev/i2c-<bus>`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Simulated devices on it (sim).
    #[serde(default)]
    pub devices: Vec<SimI2cDeviceConfig>,
}

/// An SPI device the device offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiConfig {
    /// Bus number (`caps.spi[].bus`).
    pub bus: u32,
    /// Chip select (`caps.spi[].cs`).
    pub cs: u32,
    /// What backs it: Linux spidev, or a simulated loopback (MISO wired to MOSI).
    pub backend: BusBackend,
    /// The device file (Linux); defaults to `/dev/spidev<bus>.<cs>`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Clock speed (Linux), Hz.
    #[serde(default)]
    pub max_speed_hz: Option<u32>,
}

/// The hardware section of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareConfig {
    /// GPIO lines.
    #[serde(default)]
    pub gpio: Vec<GpioConfig>,
    /// I2C buses.
    #[serde(default)]
    pub i2c: Vec<I2cConfig>,
    /// SPI devices.
    #[serde(default)]
    pub spi: Vec<SpiConfig>,
}

impl HardwareConfig {
    /// The simulated board `run-module` and the demo use: an LED on line 17, a button on line 27,
    /// a BME280 at 0x76 on I2C bus 1, an SPI loopback on 0.0.
    pub fn simulated() -> Self {
        HardwareConfig {
            gpio: vec![
                GpioConfig {
                    line: 17,
                    backend: GpioBackend::SimLed,
                    direction: None,
                    chip: None,
                    offset: None,
                    safe: SafeLevel::Low,
                },
                GpioConfig {
                    line: 27,
                    backend: GpioBackend::SimButton,
                    direction: None,
                    chip: None,
                    offset: None,
                    safe: SafeLevel::Low,
                },
            ],
            i2c: vec![I2cConfig {
                bus: 1,
                backend: BusBackend::Sim,
                path: None,
                devices: vec![SimI2cDeviceConfig {
                    address: 0x76,
                    kind: SimI2cKind::Bme280,
                }],
            }],
            spi: vec![SpiConfig {
                bus: 0,
                cs: 0,
                backend: BusBackend::Sim,
                path: None,
                max_speed_hz: None,
            }],
        }
    }

    /// Checks numbers, duplicates and backend-specific fields.
    pub fn validate(&self) -> Result<(), String> {
        let mut lines = std::collections::BTreeSet::new();
        for g in &self.gpio {
            if !lines.insert(g.line) {
                return Err(format!("hardware.gpio: line {} is listed twice", g.line));
            }
            match g.backend {
                GpioBackend::Linux if g.chip.is_none() || g.direction.is_none() => {
                    return Err(format!(
                        "hardware.gpio line {}: a linux line needs chip and direction",
                        g.line
                    ));
                }
                GpioBackend::SimLed | GpioBackend::SimButton
                    if g.chip.is_some() || g.offset.is_some() =>
                {
                    return Err(format!(
                        "hardware.gpio line {}: chip and offset are for linux lines",
                        g.line
                    ));
                }
                _ => {}
            }
        }
        let mut buses = std::collections::BTreeSet::new();
        for b in &self.i2c {
            if !buses.insert(b.bus) {
                return Err(format!("hardware.i2c: bus {} is listed twice", b.bus));
            }
            if b.backend == BusBackend::Linux && !b.devices.is_empty() {
                return Err(format!(
                    "hardware.i2c bus {}: devices are for sim buses",
                    b.bus
                ));
            }
            if let Some(d) = b.devices.iter().find(|d| d.address > 0x7f) {
                return Err(format!(
                    "hardware.i2c bus {}: address {:#x} is not 7-bit",
                    b.bus, d.address
                ));
            }
            let mut addresses = std::collections::BTreeSet::new();
            if let Some(d) = b.devices.iter().find(|d| !addresses.insert(d.address)) {
                return Err(format!(
                    "hardware.i2c bus {}: two devices at address {:#04x}",
                    b.bus, d.address
                ));
            }
        }
        let mut spis = std::collections::BTreeSet::new();
        for s in &self.spi {
            if !spis.insert((s.bus, s.cs)) {
                return Err(format!("hardware.spi: {}.{} is listed twice", s.bus, s.cs));
            }
        }
        Ok(())
    }
}

/// A shared device.
pub type Shared<T> = Arc<Mutex<Box<T>>>;

/// A resource: the device behind its mutex, or why it could not be opened.
type Slot<T> = Result<Shared<T>, String>;

/// A GPIO line on the board.
#[derive(Debug)]
pub struct Line {
    /// Input or output.
    pub direction: Direction,
    dev: Slot<dyn GpioLine>,
    safe: SafeLevel,
}

/// What a module may do with a resource the board lacks or could not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoardError {
    /// The manifest grants something this device does not offer.
    #[error("{0} is not on this device")]
    Missing(String),
    /// The device offers it but it could not be opened.
    #[error("{what} could not be opened: {reason}")]
    Unavailable {
        /// The resource.
        what: String,
        /// Why.
        reason: String,
    },
    /// Another module drives the line.
    #[error("gpio line {line} is an output already driven by module {owner:?}")]
    LineTaken {
        /// The line.
        line: u32,
        /// The module driving it.
        owner: String,
    },
}

/// Everything the device offers, opened.
#[derive(Debug, Default)]
pub struct Board {
    gpio: BTreeMap<u32, Line>,
    i2c: BTreeMap<u32, Slot<dyn I2cBus>>,
    spi: BTreeMap<(u32, u32), Slot<dyn SpiDev>>,
    sim_lines: BTreeMap<u32, sim::SimLineHandle>,
    owners: Mutex<BTreeMap<u32, String>>,
}

fn shared<T: ?Sized>(b: Box<T>) -> Shared<T> {
    Arc::new(Mutex::new(b))
}

impl Board {
    /// A board with nothing on it.
    pub fn empty() -> Self {
        Board::default()
    }

    /// Opens every resource in `config`. One that cannot be opened (a missing device file, no
    /// permission) is kept with the reason, so modules granted it are refused with that reason
    /// while the rest of the board works. `clock` drives the simulated sensors (ms).
    pub fn open(config: &HardwareConfig, clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Board {
        let mut board = Board::default();
        for g in &config.gpio {
            let (direction, dev): (Direction, Slot<dyn GpioLine>) = match g.backend {
                GpioBackend::SimLed => {
                    let (led, handle) = sim::SimLed::new();
                    board.sim_lines.insert(g.line, handle);
                    (
                        Direction::Output,
                        Ok(shared(Box::new(Eh(led)) as Box<dyn GpioLine>)),
                    )
                }
                GpioBackend::SimButton => {
                    let (button, handle) = sim::SimButton::new();
                    board.sim_lines.insert(g.line, handle);
                    (
                        Direction::Input,
                        Ok(shared(Box::new(Eh(button)) as Box<dyn GpioLine>)),
                    )
                }
                GpioBackend::Linux => {
                    let direction = g.direction.unwrap_or(Direction::Input);
                    (direction, open_linux_gpio(g, direction))
                }
            };
            if let Err(reason) = &dev {
                tracing::error!("gpio line {}: {reason}", g.line);
            }
            board.gpio.insert(
                g.line,
                Line {
                    direction,
                    dev,
                    safe: g.safe,
                },
            );
            // No module owns a line yet.
            board.make_safe(g.line);
        }
        for b in &config.i2c {
            let bus: Slot<dyn I2cBus> = match b.backend {
                BusBackend::Sim => {
                    let mut bus = sim::SimI2c::new();
                    for d in &b.devices {
                        bus = match d.kind {
                            SimI2cKind::Bme280 => {
                                bus.with_device(d.address, sim::Bme280Sim::new(Arc::clone(&clock)))
                            }
                        };
                    }
                    Ok(shared(Box::new(Eh(bus)) as Box<dyn I2cBus>))
                }
                BusBackend::Linux => open_linux_i2c(b),
            };
            if let Err(reason) = &bus {
                tracing::error!("i2c bus {}: {reason}", b.bus);
            }
            board.i2c.insert(b.bus, bus);
        }
        for s in &config.spi {
            let dev: Slot<dyn SpiDev> = match s.backend {
                BusBackend::Sim => Ok(shared(
                    Box::new(Eh(sim::SpiLoopback::new())) as Box<dyn SpiDev>
                )),
                BusBackend::Linux => open_linux_spi(s),
            };
            if let Err(reason) = &dev {
                tracing::error!("spi {}.{}: {reason}", s.bus, s.cs);
            }
            board.spi.insert((s.bus, s.cs), dev);
        }
        board
    }

    /// Adds a GPIO line backed by `dev` (tests use embedded-hal mocks this way).
    pub fn with_gpio(mut self, line: u32, direction: Direction, dev: Box<dyn GpioLine>) -> Self {
        self.gpio.insert(
            line,
            Line {
                direction,
                dev: Ok(shared(dev)),
                // A mock sees only what its test expects.
                safe: SafeLevel::Keep,
            },
        );
        self
    }

    /// Adds an I2C bus backed by `dev`.
    pub fn with_i2c(mut self, bus: u32, dev: Box<dyn I2cBus>) -> Self {
        self.i2c.insert(bus, Ok(shared(dev)));
        self
    }

    /// Adds an SPI device backed by `dev`.
    pub fn with_spi(mut self, bus: u32, cs: u32, dev: Box<dyn SpiDev>) -> Self {
        self.spi.insert((bus, cs), Ok(shared(dev)));
        self
    }

    /// The observer handle of a simulated line (tests, the demo).
    pub fn sim_line(&self, line: u32) -> Option<&sim::SimLineHandle> {
        self.sim_lines.get(&line)
    }

    /// A line, opened.
    pub fn gpio(&self, line: u32) -> Result<(Direction, &Shared<dyn GpioLine>), BoardError> {
        let l = self
            .gpio
            .get(&line)
            .ok_or_else(|| BoardError::Missing(format!("gpio line {line}")))?;
        let dev = l.dev.as_ref().map_err(|reason| BoardError::Unavailable {
            what: format!("gpio line {line}"),
            reason: reason.clone(),
        })?;
        Ok((l.direction, dev))
    }

    /// A bus, opened.
    pub fn i2c(&self, bus: u32) -> Result<&Shared<dyn I2cBus>, BoardError> {
        self.i2c
            .get(&bus)
            .ok_or_else(|| BoardError::Missing(format!("i2c bus {bus}")))?
            .as_ref()
            .map_err(|reason| BoardError::Unavailable {
                what: format!("i2c bus {bus}"),
                reason: reason.clone(),
            })
    }

    /// An SPI device, opened.
    pub fn spi(&self, bus: u32, cs: u32) -> Result<&Shared<dyn SpiDev>, BoardError> {
        self.spi
            .get(&(bus, cs))
            .ok_or_else(|| BoardError::Missing(format!("spi device {bus}.{cs}")))?
            .as_ref()
            .map_err(|reason| BoardError::Unavailable {
                what: format!("spi device {bus}.{cs}"),
                reason: reason.clone(),
            })
    }

    /// Checks that everything `caps` grants is on this board and opened.
    pub fn check_grants(&self, caps: &Caps) -> Result<(), BoardError> {
        for line in &caps.gpio {
            self.gpio(*line)?;
        }
        for g in &caps.i2c {
            self.i2c(g.bus)?;
        }
        for s in &caps.spi {
            self.spi(s.bus, s.cs)?;
        }
        Ok(())
    }

    /// The output lines among `caps.gpio`: the lines a module granted them would drive.
    pub fn outputs_in(&self, caps: &Caps) -> Vec<u32> {
        caps.gpio
            .iter()
            .copied()
            .filter(|l| {
                self.gpio
                    .get(l)
                    .is_some_and(|l| l.direction == Direction::Output)
            })
            .collect()
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, String>> {
        self.owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `module` could claim the output lines `caps` grants (no other module drives one).
    pub fn claimable(&self, module: &str, caps: &Caps) -> Result<(), BoardError> {
        let owners = self.owners();
        match self.outputs_in(caps).iter().find_map(|l| {
            owners
                .get(l)
                .filter(|o| *o != module)
                .map(|o| (*l, o.clone()))
        }) {
            Some((line, owner)) => Err(BoardError::LineTaken { line, owner }),
            None => Ok(()),
        }
    }

    /// Claims the output lines `caps` grants for `module`: refused if another module holds one.
    /// A module's earlier claims are replaced (an upgrade may grant other lines); a line it no
    /// longer claims goes to its safe level.
    pub fn claim_outputs(&self, module: &str, caps: &Caps) -> Result<(), BoardError> {
        self.claimable(module, caps)?;
        let wanted = self.outputs_in(caps);
        let dropped: Vec<u32> = {
            let mut owners = self.owners();
            let before: Vec<u32> = owners
                .iter()
                .filter(|(_, o)| *o == module)
                .map(|(l, _)| *l)
                .collect();
            owners.retain(|_, o| o != module);
            for l in &wanted {
                owners.insert(*l, module.to_string());
            }
            before.into_iter().filter(|l| !wanted.contains(l)).collect()
        };
        for l in dropped {
            self.make_safe(l);
        }
        Ok(())
    }

    /// Releases the lines `module` drives (removal, quarantine, rollback, failure): each goes to
    /// its safe level.
    pub fn release(&self, module: &str) {
        let freed: Vec<u32> = {
            let mut owners = self.owners();
            let freed = owners
                .iter()
                .filter(|(_, o)| *o == module)
                .map(|(l, _)| *l)
                .collect();
            owners.retain(|_, o| o != module);
            freed
        };
        for l in freed {
            self.make_safe(l);
        }
    }

    /// The module driving output `line`, if any.
    pub fn owner(&self, line: u32) -> Option<String> {
        self.owners().get(&line).cloned()
    }

    /// Drives output `line` to its safe level (unless that is `keep`).
    fn make_safe(&self, line: u32) {
        let Some(l) = self.gpio.get(&line) else {
            return;
        };
        let level = match l.safe {
            SafeLevel::Low => false,
            SafeLevel::High => true,
            SafeLevel::Keep => return,
        };
        if l.direction != Direction::Output {
            return;
        }
        if let Ok(dev) = &l.dev {
            let mut dev = dev
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = dev.set(level) {
                tracing::error!("gpio line {line}: cannot drive it to its safe level: {e}");
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn open_linux_gpio(g: &GpioConfig, direction: Direction) -> Slot<dyn GpioLine> {
    let chip = g.chip.clone().unwrap_or_default();
    let offset = g.offset.unwrap_or(g.line);
    linux::open_gpio(&chip, offset, direction)
        .map(|l| shared(Box::new(l) as Box<dyn GpioLine>))
        .map_err(|e| format!("{} line {offset}: {e}", chip.display()))
}

#[cfg(target_os = "linux")]
fn open_linux_i2c(b: &I2cConfig) -> Slot<dyn I2cBus> {
    let path = b
        .path
        .clone()
        .unwrap_or_else(|| format!("/dev/i2c-{}", b.bus).into());
    linux::LinuxI2c::open(&path)
        .map(|d| shared(Box::new(d) as Box<dyn I2cBus>))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(target_os = "linux")]
fn open_linux_spi(s: &SpiConfig) -> Slot<dyn SpiDev> {
    let path = s
        .path
        .clone()
        .unwrap_or_else(|| format!("/dev/spidev{}.{}", s.bus, s.cs).into());
    linux::open_spi(&path, s.max_speed_hz)
        .map(|d| shared(Box::new(d) as Box<dyn SpiDev>))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(not(target_os = "linux"))]
fn open_linux_gpio(_: &GpioConfig, _: Direction) -> Slot<dyn GpioLine> {
    Err("the linux backend needs Linux".into())
}

#[cfg(not(target_os = "linux"))]
fn open_linux_i2c(_: &I2cConfig) -> Slot<dyn I2cBus> {
    Err("the linux backend needs Linux".into())
}

#[cfg(not(target_os = "linux"))]
fn open_linux_spi(_: &SpiConfig) -> Slot<dyn SpiDev> {
    Err("the linux backend needs Linux".into())
}
