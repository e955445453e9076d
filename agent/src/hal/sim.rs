//! The simulated board: an I2C bus with a Bosch BME280 on it, an LED, a push button and an SPI
//! loopback, all implementing the embedded-hal 1.0 traits, so the host functions — and real,
//! unmodified device drivers in tests — work on them exactly as on a Raspberry Pi.
//!
//! # What is simulated, and how
//!
//! - **I2C** ([`SimI2c`]): a bus of devices by 7-bit address. A transaction to an address nobody
//!   answers fails with [`SimError::NoDevice`], whose kind is
//!   `NoAcknowledge(NoAcknowledgeSource::Address)`, as a real adapter reports a missing device.
//!   Following the embedded-hal transaction contract, adjacent operations of the same direction
//!   are one phase on the wire (no repeated start between them), so each run of writes reaches the
//!   device as one [`SimI2cDevice::write`] and each run of reads as one [`SimI2cDevice::read`]. A
//!   zero-length write is an address-only probe (what `i2cdetect` sends): it succeeds exactly when
//!   a device is attached.
//! - **BME280** ([`Bme280Sim`]): the register map of the Bosch datasheet (BST-BME280-DS002, §5):
//!   chip id `0x60` at `0xD0`, soft reset (`0xB6` to `0xE0`), the factory calibration at
//!   `0x88..=0xA1` and `0xE1..=0xE7` (dig_H4/dig_H5 packed in 12 bits as on the chip), `ctrl_hum`,
//!   `status`, `ctrl_meas`, `config` and the raw data at `0xF7..=0xFE` with their reset values.
//!   Writes are register/value pairs and reads auto-increment the register pointer (§6.2).
//!   Writing a forced mode (`01`/`10`) to `ctrl_meas` performs one measurement at once and
//!   returns the chip to sleep; in normal mode (`11`) the data registers are refreshed whenever a
//!   read starts inside them. `ctrl_hum` takes effect at the next `ctrl_meas` write, and a channel
//!   whose oversampling is "skipped" (`000`) keeps its reset value (`0x80000`, or `0x8000` for
//!   humidity), both as the datasheet says.
//!
//!   The values: [`Bme280Sim::target_at`] is a slow, smooth function of the injected clock
//!   (about 21 °C ± 2, 101 325 Pa ± 300, 45 %RH ± 5, with periods of minutes). For each
//!   measurement the simulator *inverts the datasheet's compensation*: it implements the
//!   floating-point compensation formulas of §4.2.3 / §8.1 with the calibration in its registers,
//!   and binary-searches the 20-bit temperature ADC range for the raw value whose compensated
//!   value is nearest the target; from that raw value's `t_fine` it then searches the 20-bit
//!   pressure and 16-bit humidity ranges the same way. A driver that applies the datasheet's
//!   formulas to the registers (the `bme280` crate, Bosch's BME280_driver, Linux's bmp280 driver)
//!   therefore reads the target to within half an ADC step (about 0.00016 °C, 0.13 Pa and
//!   0.003 %RH) plus its own rounding; the `bme280` crate, in f32, stays within 0.0002 °C,
//!   0.13 Pa and 0.003 %RH over hours of simulated time.
//!
//!   Not modelled: measurement time (`status` never reports measuring, a result is there at
//!   once), the IIR filter and the resolution oversampling buys (the values carry no noise to
//!   filter; `config` and the oversampling fields are stored and read back, and only "skipped"
//!   changes the output), normal mode's standby timing, and the chip's SPI interface.
//! - **GPIO** ([`SimLed`], [`SimButton`]): each line's level lives in a [`SimLineHandle`] shared
//!   with whoever observes the board (tests, the demo). An LED is an output: drivers set it, and
//!   the handle counts the changes of level ([`SimLineHandle::toggles`]); reading it returns the
//!   driven level. A button is an input: the handle's [`SimLineHandle::set_level`] "presses" it,
//!   and driving it fails with [`SimError::InputOnly`].
//! - **SPI** ([`SpiLoopback`]): MISO wired to MOSI. Every word written is read back in the same
//!   clock cycle; while only reading, the controller sends `0xFF` (the idle level of MOSI), so a
//!   read alone yields `0xFF`. Delays are accepted and take no time.
//!
//! Nothing here sleeps, spawns or touches the host's hardware; every type is `Send + Debug`.

use std::collections::BTreeMap;
use std::f64::consts::TAU;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use embedded_hal::digital::{self, InputPin, OutputPin, StatefulOutputPin};
use embedded_hal::i2c::{self, I2c, NoAcknowledgeSource};
use embedded_hal::spi::{self, SpiDevice};

/// Why an operation on the simulated board failed.
///
/// It implements the error traits of embedded-hal's `i2c`, `digital` and `spi` modules, so
/// every simulated peripheral uses it as its `Error` type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// No device is attached at this I2C address: the address byte was not acknowledged.
    #[error("no device acknowledged I2C address {address:#04x}")]
    NoDevice {
        /// The 7-bit address.
        address: u8,
    },
    /// The address does not fit in 7 bits.
    #[error("{address:#04x} is not a 7-bit I2C address")]
    NotSevenBit {
        /// The address given.
        address: u8,
    },
    /// The device refused a data byte (a simulated device's way to NACK data).
    #[error("the device did not acknowledge a data byte")]
    DataNotAcknowledged,
    /// An attempt to drive an input line (a simulated button).
    #[error(
        "a simulated button is an input line and cannot be driven; \
         change its level through its SimLineHandle"
    )]
    InputOnly,
}

impl i2c::Error for SimError {
    fn kind(&self) -> i2c::ErrorKind {
        match self {
            SimError::NoDevice { .. } => {
                i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
            }
            SimError::DataNotAcknowledged => {
                i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data)
            }
            SimError::NotSevenBit { .. } | SimError::InputOnly => i2c::ErrorKind::Other,
        }
    }
}

impl digital::Error for SimError {
    fn kind(&self) -> digital::ErrorKind {
        digital::ErrorKind::Other
    }
}

impl spi::Error for SimError {
    fn kind(&self) -> spi::ErrorKind {
        spi::ErrorKind::Other
    }
}

// ------------------------------------------------------------------------------------------------
// I2C
// ------------------------------------------------------------------------------------------------

/// A device on a [`SimI2c`] bus.
///
/// Each call is one phase of a transaction between start/repeated-start and stop: `write`
/// receives every byte the controller sent after the address, `read` fills every byte the
/// controller clocks in. The usual convention — and the one [`Bme280Sim`] follows — is register
/// pointer semantics: the first byte written selects a register, and reads continue from the
/// selected register, auto-incrementing. How further written bytes are used is the device's own
/// (auto-increment on most parts; address/value pairs on Bosch sensors).
pub trait SimI2cDevice: Send + fmt::Debug {
    /// A write phase: `bytes` as the controller sent them (possibly empty: an address-only probe).
    fn write(&mut self, bytes: &[u8]) -> Result<(), SimError>;
    /// A read phase: fill `buf`.
    fn read(&mut self, buf: &mut [u8]) -> Result<(), SimError>;
}

/// A simulated I2C bus: devices attached by 7-bit address.
///
/// ```
/// # use edge_agent::hal::sim::{Bme280Sim, SimI2c};
/// # use std::sync::Arc;
/// use embedded_hal::i2c::I2c;
/// let mut bus = SimI2c::new().with_device(0x76, Bme280Sim::new(Arc::new(|| 0)));
/// let mut id = [0];
/// bus.write_read(0x76, &[0xD0], &mut id).unwrap();
/// assert_eq!(id, [0x60]);
/// ```
#[derive(Debug, Default)]
pub struct SimI2c {
    devices: BTreeMap<u8, Box<dyn SimI2cDevice>>,
}

impl SimI2c {
    /// An empty bus: every address is unanswered.
    pub fn new() -> Self {
        SimI2c::default()
    }

    /// Attaches `device` at the 7-bit `address`, replacing any device already there. A device
    /// given an address above `0x7F` is never reached (such transactions fail with
    /// [`SimError::NotSevenBit`]); configuration is expected to refuse both cases first.
    pub fn with_device(mut self, address: u8, device: impl SimI2cDevice + 'static) -> Self {
        self.devices.insert(address, Box::new(device));
        self
    }

    /// The addresses that answer, in increasing order (what a bus scan finds).
    pub fn addresses(&self) -> impl Iterator<Item = u8> + '_ {
        self.devices.keys().copied()
    }
}

impl i2c::ErrorType for SimI2c {
    type Error = SimError;
}

impl I2c for SimI2c {
    fn transaction(
        &mut self,
        address: u8,
        operations: &mut [i2c::Operation<'_>],
    ) -> Result<(), SimError> {
        if address > 0x7F {
            return Err(SimError::NotSevenBit { address });
        }
        let device = self
            .devices
            .get_mut(&address)
            .ok_or(SimError::NoDevice { address })?;
        // Adjacent operations of one direction are one phase on the wire.
        let mut rest = operations;
        while let Some(first) = rest.first() {
            let writing = matches!(first, i2c::Operation::Write(_));
            let run = rest
                .iter()
                .take_while(|op| matches!(op, i2c::Operation::Write(_)) == writing)
                .count();
            let (phase, tail) = std::mem::take(&mut rest).split_at_mut(run);
            if writing {
                let mut bytes = Vec::new();
                for op in phase.iter() {
                    if let i2c::Operation::Write(b) = op {
                        bytes.extend_from_slice(b);
                    }
                }
                device.write(&bytes)?;
            } else {
                let total = phase
                    .iter()
                    .map(|op| match op {
                        i2c::Operation::Read(b) => b.len(),
                        i2c::Operation::Write(_) => 0,
                    })
                    .sum();
                let mut bytes = vec![0; total];
                device.read(&mut bytes)?;
                let mut from = bytes.as_slice();
                for op in phase.iter_mut() {
                    if let i2c::Operation::Read(buf) = op {
                        let (now, later) = from.split_at(buf.len());
                        buf.copy_from_slice(now);
                        from = later;
                    }
                }
            }
            rest = tail;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// BME280
// ------------------------------------------------------------------------------------------------

/// The milliseconds clock a simulated sensor reads its signal from.
pub type SimClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What the simulated BME280 is measuring at some instant (the value a driver should read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Air temperature, °C.
    pub temperature_c: f64,
    /// Air pressure, Pa.
    pub pressure_pa: f64,
    /// Relative humidity, %.
    pub humidity_pct: f64,
}

const REG_CALIB_PT: u8 = 0x88; // ..=0xA1: dig_T1..dig_P9, reserved 0xA0, dig_H1
const REG_CHIP_ID: u8 = 0xD0;
const REG_RESET: u8 = 0xE0;
const REG_CALIB_H: u8 = 0xE1; // ..=0xE7: dig_H2..dig_H6
const REG_CTRL_HUM: u8 = 0xF2;
const REG_STATUS: u8 = 0xF3;
const REG_CTRL_MEAS: u8 = 0xF4;
const REG_CONFIG: u8 = 0xF5;
const REG_DATA: u8 = 0xF7; // ..=0xFE: press (3), temp (3), hum (2)
const REG_DATA_END: u8 = 0xFE;

const CHIP_ID: u8 = 0x60;
const SOFT_RESET: u8 = 0xB6;
const MODE_MASK: u8 = 0b11;
const MODE_NORMAL: u8 = 0b11;
/// The value a skipped (or not yet measured) 20-bit channel holds.
const SKIPPED_20: u32 = 0x8_0000;
/// The value a skipped (or not yet measured) humidity channel holds.
const SKIPPED_16: u32 = 0x8000;
const MAX_20: u32 = 0xF_FFFF;
const MAX_16: u32 = 0xFFFF;

/// Factory trimming parameters, typed and named as in the datasheet (table 16).
#[derive(Debug, Clone, Copy)]
struct Calibration {
    t1: u16,
    t2: i16,
    t3: i16,
    p1: u16,
    p2: i16,
    p3: i16,
    p4: i16,
    p5: i16,
    p6: i16,
    p7: i16,
    p8: i16,
    p9: i16,
    h1: u8,
    h2: i16,
    h3: u8,
    h4: i16,
    h5: i16,
    h6: i8,
}

/// The temperature and pressure parameters are those of the worked example in Bosch's BMP280
/// datasheet (BST-BMP280-DS001 §3.12; the BME280 shares the formulas); the humidity ones are
/// typical of real BME280 parts, and put 45 %RH at 21 °C near raw 28 900 of 65 535.
const CALIBRATION: Calibration = Calibration {
    t1: 27504,
    t2: 26435,
    t3: -1000,
    p1: 36477,
    p2: -10685,
    p3: 3024,
    p4: 2855,
    p5: 140,
    p6: -7,
    p7: 15500,
    p8: -14600,
    p9: 6000,
    h1: 75,
    h2: 362,
    h3: 0,
    h4: 324,
    h5: 50,
    h6: 30,
};

impl Calibration {
    /// The register images: `0x88..=0xA1` (26 bytes) and `0xE1..=0xE7` (7 bytes).
    fn registers(&self) -> ([u8; 26], [u8; 7]) {
        let mut pt = [0u8; 26];
        let words = [
            self.t1.to_le_bytes(),
            self.t2.to_le_bytes(),
            self.t3.to_le_bytes(),
            self.p1.to_le_bytes(),
            self.p2.to_le_bytes(),
            self.p3.to_le_bytes(),
            self.p4.to_le_bytes(),
            self.p5.to_le_bytes(),
            self.p6.to_le_bytes(),
            self.p7.to_le_bytes(),
            self.p8.to_le_bytes(),
            self.p9.to_le_bytes(),
        ];
        for (chunk, word) in pt.chunks_exact_mut(2).zip(words) {
            chunk.copy_from_slice(&word);
        }
        // pt[24] is 0xA0, reserved.
        pt[25] = self.h1;
        // dig_H4 = 0xE4 << 4 | 0xE5[3:0]; dig_H5 = 0xE6 << 4 | 0xE5[7:4] (12-bit signed values).
        let [h4_lo, h4_hi] = self.h4.to_le_bytes();
        let [h5_lo, h5_hi] = self.h5.to_le_bytes();
        let h2 = self.h2.to_le_bytes();
        let h = [
            h2[0],
            h2[1],
            self.h3,
            (h4_hi << 4) | (h4_lo >> 4),
            (h5_lo << 4) | (h4_lo & 0x0F),
            (h5_hi << 4) | (h5_lo >> 4),
            self.h6.to_le_bytes()[0],
        ];
        (pt, h)
    }

    /// The datasheet's `BME280_compensate_T_double`: °C and `t_fine`.
    fn temperature(&self, adc_t: u32) -> (f64, i32) {
        let adc = f64::from(adc_t);
        let t1 = f64::from(self.t1);
        let var1 = (adc / 16384.0 - t1 / 1024.0) * f64::from(self.t2);
        let d = adc / 131_072.0 - t1 / 8192.0;
        let var2 = d * d * f64::from(self.t3);
        ((var1 + var2) / 5120.0, truncate_t_fine(var1 + var2))
    }

    /// The datasheet's `BME280_compensate_P_double`: Pa.
    fn pressure(&self, adc_p: u32, t_fine: i32) -> f64 {
        let mut var1 = f64::from(t_fine) / 2.0 - 64000.0;
        let mut var2 = var1 * var1 * f64::from(self.p6) / 32768.0;
        var2 += var1 * f64::from(self.p5) * 2.0;
        var2 = var2 / 4.0 + f64::from(self.p4) * 65536.0;
        var1 =
            (f64::from(self.p3) * var1 * var1 / 524_288.0 + f64::from(self.p2) * var1) / 524_288.0;
        var1 = (1.0 + var1 / 32768.0) * f64::from(self.p1);
        if var1 == 0.0 {
            return 0.0;
        }
        let mut p = 1_048_576.0 - f64::from(adc_p);
        p = (p - var2 / 4096.0) * 6250.0 / var1;
        let var1 = f64::from(self.p9) * p * p / 2_147_483_648.0;
        let var2 = p * f64::from(self.p8) / 32768.0;
        p + (var1 + var2 + f64::from(self.p7)) / 16.0
    }

    /// The datasheet's `BME280_compensate_H_double`: %RH, clamped to 0..=100.
    fn humidity(&self, adc_h: u32, t_fine: i32) -> f64 {
        let var_h = f64::from(t_fine) - 76800.0;
        let var_h = (f64::from(adc_h)
            - (f64::from(self.h4) * 64.0 + f64::from(self.h5) / 16384.0 * var_h))
            * (f64::from(self.h2) / 65536.0
                * (1.0
                    + f64::from(self.h6) / 67_108_864.0
                        * var_h
                        * (1.0 + f64::from(self.h3) / 67_108_864.0 * var_h)));
        let var_h = var_h * (1.0 - f64::from(self.h1) * var_h / 524_288.0);
        var_h.clamp(0.0, 100.0)
    }

    /// The raw ADC values whose compensation gives `target` (temperature first: its `t_fine`
    /// feeds the other two).
    fn raw_for(&self, target: Reading) -> RawSample {
        let adc_t = invert(MAX_20, SKIPPED_20, target.temperature_c, |x| {
            self.temperature(x).0
        });
        let (_, t_fine) = self.temperature(adc_t);
        let adc_p = invert(MAX_20, SKIPPED_20, target.pressure_pa, |x| {
            self.pressure(x, t_fine)
        });
        let adc_h = invert(MAX_16, SKIPPED_16, target.humidity_pct, |x| {
            self.humidity(x, t_fine)
        });
        RawSample {
            adc_t,
            adc_p,
            adc_h,
        }
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "the datasheet defines t_fine as (BME280_S32_t)(var1 + var2), a truncating cast"
)]
fn truncate_t_fine(v: f64) -> i32 {
    v as i32
}

/// The value in `0..=max` whose image under `f` is nearest `target`, for an `f` that is
/// monotonic (rising or falling) over the range: a binary search for the first value at or
/// past the target, then the nearer of it and its predecessor. `avoid` (the chip's "skipped"
/// marker, which drivers may treat as no data) is never returned.
fn invert(max: u32, avoid: u32, target: f64, f: impl Fn(u32) -> f64) -> u32 {
    let rising = f(max) >= f(0);
    let before = |x: u32| {
        let v = f(x);
        if rising { v < target } else { v > target }
    };
    let (mut lo, mut hi) = (0, max);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if before(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let error = |x: u32| (f(x) - target).abs();
    let mut best = if lo > 0 && error(lo - 1) <= error(lo) {
        lo - 1
    } else {
        lo
    };
    if best == avoid {
        best = if error(avoid - 1) <= error(avoid + 1) {
            avoid - 1
        } else {
            avoid + 1
        };
    }
    best
}

/// Uncompensated ADC outputs.
#[derive(Debug, Clone, Copy)]
struct RawSample {
    adc_t: u32,
    adc_p: u32,
    adc_h: u32,
}

/// Register bytes of a 20-bit reading: msb, lsb, and xlsb with the value's low 4 bits on top.
fn bytes_20(v: u32) -> [u8; 3] {
    let [_, msb, lsb, xlsb] = (v << 4).to_be_bytes();
    [msb, lsb, xlsb]
}

/// Register bytes of a 16-bit reading: msb, lsb.
fn bytes_16(v: u32) -> [u8; 2] {
    let [_, _, msb, lsb] = v.to_be_bytes();
    [msb, lsb]
}

/// A simulated Bosch BME280 (temperature, pressure, humidity) for a [`SimI2c`] bus, at `0x76`
/// or `0x77` on real boards. See the module documentation for what is modelled.
pub struct Bme280Sim {
    clock: SimClock,
    regs: [u8; 256],
    pointer: u8,
    /// `ctrl_hum` as last latched by a `ctrl_meas` write (§5.4.3).
    osrs_h: u8,
}

impl fmt::Debug for Bme280Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bme280Sim")
            .field("pointer", &format_args!("{:#04x}", self.pointer))
            .field(
                "ctrl_hum",
                &format_args!("{:#04x}", self.regs[usize::from(REG_CTRL_HUM)]),
            )
            .field(
                "ctrl_meas",
                &format_args!("{:#04x}", self.regs[usize::from(REG_CTRL_MEAS)]),
            )
            .field(
                "config",
                &format_args!("{:#04x}", self.regs[usize::from(REG_CONFIG)]),
            )
            .field("data", &format_args!("{:02x?}", self.data_registers()))
            .finish_non_exhaustive()
    }
}

impl Bme280Sim {
    /// A BME280 as after power-on (sleep mode, no measurement yet) whose signal follows
    /// `clock` (milliseconds; any origin).
    pub fn new(clock: SimClock) -> Self {
        let mut regs = [0u8; 256];
        let (pt, h) = CALIBRATION.registers();
        let pt_at = usize::from(REG_CALIB_PT);
        regs[pt_at..pt_at + pt.len()].copy_from_slice(&pt);
        let h_at = usize::from(REG_CALIB_H);
        regs[h_at..h_at + h.len()].copy_from_slice(&h);
        regs[usize::from(REG_CHIP_ID)] = CHIP_ID;
        let mut sim = Bme280Sim {
            clock,
            regs,
            pointer: 0,
            osrs_h: 0,
        };
        sim.reset();
        sim
    }

    /// What the sensor measures at `ms` on its clock: 21 °C ± 2 (10-minute period); 101 325 Pa
    /// ± 290 (45 minutes, plus ± 40 over 170 s); 45 %RH ± 5, falling as the temperature rises
    /// (10 minutes, plus ± 1 over 7 minutes).
    pub fn target_at(ms: u64) -> Reading {
        let s = ms as f64 / 1000.0;
        let wave = |period_s: f64| (TAU * s / period_s).sin();
        Reading {
            temperature_c: 21.0 + 2.0 * wave(600.0),
            pressure_pa: 101_325.0 + 250.0 * wave(2700.0) + 40.0 * wave(170.0),
            humidity_pct: 45.0 - 4.0 * wave(600.0) + 1.0 * wave(420.0),
        }
    }

    /// The power-on state of the control and data registers (§5.3, table 18).
    fn reset(&mut self) {
        for reg in [REG_CTRL_HUM, REG_STATUS, REG_CTRL_MEAS, REG_CONFIG] {
            self.regs[usize::from(reg)] = 0;
        }
        self.osrs_h = 0;
        self.store(RawSample {
            adc_t: SKIPPED_20,
            adc_p: SKIPPED_20,
            adc_h: SKIPPED_16,
        });
    }

    fn store(&mut self, raw: RawSample) {
        let mut data = [0u8; 8];
        data[0..3].copy_from_slice(&bytes_20(raw.adc_p));
        data[3..6].copy_from_slice(&bytes_20(raw.adc_t));
        data[6..8].copy_from_slice(&bytes_16(raw.adc_h));
        let at = usize::from(REG_DATA);
        self.regs[at..at + data.len()].copy_from_slice(&data);
    }

    fn data_registers(&self) -> &[u8] {
        &self.regs[usize::from(REG_DATA)..=usize::from(REG_DATA_END)]
    }

    /// One measurement of every channel not skipped, at the clock's current time.
    fn measure(&mut self) {
        let ctrl_meas = self.regs[usize::from(REG_CTRL_MEAS)];
        let osrs_t = ctrl_meas >> 5;
        let osrs_p = (ctrl_meas >> 2) & 0b111;
        let mut raw = CALIBRATION.raw_for(Self::target_at((self.clock)()));
        if osrs_t == 0 {
            raw.adc_t = SKIPPED_20;
        }
        if osrs_p == 0 {
            raw.adc_p = SKIPPED_20;
        }
        if self.osrs_h == 0 {
            raw.adc_h = SKIPPED_16;
        }
        self.store(raw);
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            REG_RESET if value == SOFT_RESET => self.reset(),
            REG_CTRL_HUM => self.regs[usize::from(reg)] = value & 0b111,
            REG_CTRL_MEAS => {
                self.osrs_h = self.regs[usize::from(REG_CTRL_HUM)];
                self.regs[usize::from(reg)] = value;
                match value & MODE_MASK {
                    0b00 => {}
                    MODE_NORMAL => self.measure(),
                    _ => {
                        // Forced: one measurement, then back to sleep.
                        self.measure();
                        self.regs[usize::from(reg)] = value & !MODE_MASK;
                    }
                }
            }
            // Bit 1 is reserved.
            REG_CONFIG => self.regs[usize::from(reg)] = value & !0b10,
            // Read-only and reserved registers, and anything but 0xB6 to `reset`: ignored, as
            // by the chip.
            _ => {}
        }
    }
}

impl SimI2cDevice for Bme280Sim {
    /// Datasheet §6.2.1: the first byte selects a register; a write continues as register
    /// address / value pairs (no auto-increment on writes). The last address sent is the
    /// pointer a following read starts from.
    fn write(&mut self, bytes: &[u8]) -> Result<(), SimError> {
        for pair in bytes.chunks(2) {
            self.pointer = pair[0];
            if let Some(&value) = pair.get(1) {
                self.write_register(pair[0], value);
            }
        }
        Ok(())
    }

    /// Datasheet §6.2.2: reads start at the pointer and auto-increment.
    fn read(&mut self, buf: &mut [u8]) -> Result<(), SimError> {
        let normal = self.regs[usize::from(REG_CTRL_MEAS)] & MODE_MASK == MODE_NORMAL;
        if normal && (REG_DATA..=REG_DATA_END).contains(&self.pointer) {
            self.measure();
        }
        for byte in buf {
            *byte = self.regs[usize::from(self.pointer)];
            self.pointer = self.pointer.wrapping_add(1);
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// GPIO
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LineState {
    level: AtomicBool,
    toggles: AtomicU64,
}

/// The shared state of a simulated GPIO line, for whoever observes or stimulates the board
/// (tests, the demo). Clones share the line.
#[derive(Clone, Debug, Default)]
pub struct SimLineHandle(Arc<LineState>);

impl SimLineHandle {
    /// A line at `high` (true) or low.
    pub fn new(high: bool) -> Self {
        SimLineHandle(Arc::new(LineState {
            level: AtomicBool::new(high),
            toggles: AtomicU64::new(0),
        }))
    }

    /// The line's level: true is high.
    pub fn level(&self) -> bool {
        self.0.level.load(Ordering::SeqCst)
    }

    /// Sets the level from outside, as a finger on a button does. Not counted in
    /// [`toggles`](Self::toggles).
    pub fn set_level(&self, high: bool) {
        self.0.level.store(high, Ordering::SeqCst);
    }

    /// How many times a driver changed the level of this (output) line. Setting the level it
    /// already has is not a change.
    pub fn toggles(&self) -> u64 {
        self.0.toggles.load(Ordering::SeqCst)
    }

    fn drive(&self, high: bool) {
        if self.0.level.swap(high, Ordering::SeqCst) != high {
            self.0.toggles.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A simulated LED: an output line. Reading it returns the level it drives.
#[derive(Debug)]
pub struct SimLed {
    line: SimLineHandle,
}

impl SimLed {
    /// An LED, off (low), and the handle to observe it.
    pub fn new() -> (SimLed, SimLineHandle) {
        let line = SimLineHandle::new(false);
        (SimLed::from_handle(line.clone()), line)
    }

    /// An LED driving the line behind `line`.
    pub fn from_handle(line: SimLineHandle) -> SimLed {
        SimLed { line }
    }
}

impl digital::ErrorType for SimLed {
    type Error = SimError;
}

impl OutputPin for SimLed {
    fn set_low(&mut self) -> Result<(), SimError> {
        self.line.drive(false);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), SimError> {
        self.line.drive(true);
        Ok(())
    }
}

impl StatefulOutputPin for SimLed {
    fn is_set_high(&mut self) -> Result<bool, SimError> {
        Ok(self.line.level())
    }

    fn is_set_low(&mut self) -> Result<bool, SimError> {
        Ok(!self.line.level())
    }
}

impl InputPin for SimLed {
    fn is_high(&mut self) -> Result<bool, SimError> {
        Ok(self.line.level())
    }

    fn is_low(&mut self) -> Result<bool, SimError> {
        Ok(!self.line.level())
    }
}

/// A simulated push button: an input line, pressed and released through its
/// [`SimLineHandle`]. It implements `OutputPin` only so it fits where a bidirectional line is
/// expected; driving it fails with [`SimError::InputOnly`].
#[derive(Debug)]
pub struct SimButton {
    line: SimLineHandle,
}

impl SimButton {
    /// A button, released (low; active high), and the handle to press it.
    pub fn new() -> (SimButton, SimLineHandle) {
        let line = SimLineHandle::new(false);
        (SimButton::from_handle(line.clone()), line)
    }

    /// A button reading the line behind `line`.
    pub fn from_handle(line: SimLineHandle) -> SimButton {
        SimButton { line }
    }
}

impl digital::ErrorType for SimButton {
    type Error = SimError;
}

impl InputPin for SimButton {
    fn is_high(&mut self) -> Result<bool, SimError> {
        Ok(self.line.level())
    }

    fn is_low(&mut self) -> Result<bool, SimError> {
        Ok(!self.line.level())
    }
}

impl OutputPin for SimButton {
    fn set_low(&mut self) -> Result<(), SimError> {
        Err(SimError::InputOnly)
    }

    fn set_high(&mut self) -> Result<(), SimError> {
        Err(SimError::InputOnly)
    }
}

// ------------------------------------------------------------------------------------------------
// SPI
// ------------------------------------------------------------------------------------------------

/// The word the simulated controller sends while it only reads: MOSI idles high.
const SPI_IDLE: u8 = 0xFF;

/// A simulated SPI device with MISO wired to MOSI.
///
/// - `Write`: sent, and what came back is discarded;
/// - `Transfer(read, write)`: `read[i] = write[i]`; past the end of `write` the controller sends
///   `0xFF`, so the rest of `read` is `0xFF`; words of `write` past the end of `read` are sent
///   and their echo discarded;
/// - `TransferInPlace(buf)`: `buf` is unchanged (each word comes back as it went out);
/// - `Read(buf)`: the controller sends `0xFF`, so `buf` fills with `0xFF`;
/// - `DelayNs`: accepted, takes no time.
#[derive(Debug, Default)]
pub struct SpiLoopback {
    _private: (),
}

impl SpiLoopback {
    /// A loopback device.
    pub fn new() -> Self {
        SpiLoopback::default()
    }
}

impl spi::ErrorType for SpiLoopback {
    type Error = SimError;
}

impl SpiDevice for SpiLoopback {
    fn transaction(&mut self, operations: &mut [spi::Operation<'_, u8>]) -> Result<(), SimError> {
        for op in operations {
            match op {
                spi::Operation::Read(buf) => buf.fill(SPI_IDLE),
                spi::Operation::Transfer(read, write) => {
                    let echoed = read.len().min(write.len());
                    read[..echoed].copy_from_slice(&write[..echoed]);
                    read[echoed..].fill(SPI_IDLE);
                }
                spi::Operation::Write(_)
                | spi::Operation::TransferInPlace(_)
                | spi::Operation::DelayNs(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use bme280::i2c::BME280;
    use embedded_hal_mock::eh1::delay::NoopDelay;

    /// A clock the test sets by hand, and the sensor's view of it.
    fn manual_clock(start_ms: u64) -> (Arc<AtomicU64>, SimClock) {
        let now = Arc::new(AtomicU64::new(start_ms));
        let seen = Arc::clone(&now);
        (now, Arc::new(move || seen.load(Ordering::SeqCst)))
    }

    /// The `bme280` crate's driver on a bus with a simulated BME280 at 0x76, initialised.
    fn driver_at(start_ms: u64) -> (Arc<AtomicU64>, BME280<SimI2c>) {
        let (now, clock) = manual_clock(start_ms);
        let bus = SimI2c::new().with_device(0x76, Bme280Sim::new(clock));
        let mut bme = BME280::new_primary(bus);
        bme.init(&mut NoopDelay::new()).expect("init");
        (now, bme)
    }

    fn measure(bme: &mut BME280<SimI2c>) -> Reading {
        let m = bme.measure(&mut NoopDelay::new()).expect("measure");
        Reading {
            temperature_c: f64::from(m.temperature),
            pressure_pa: f64::from(m.pressure),
            humidity_pct: f64::from(m.humidity),
        }
    }

    /// A `ctrl_meas` value: temperature and pressure oversampling codes, mode.
    fn ctrl_meas(osrs_t: u8, osrs_p: u8, mode: u8) -> u8 {
        (osrs_t << 5) | (osrs_p << 2) | mode
    }

    fn sim_with_clock(ms: u64) -> Bme280Sim {
        Bme280Sim::new(Arc::new(move || ms))
    }

    const TIMES_MS: [u64; 9] = [
        0,
        1,
        37_000,
        150_000,
        299_999,
        451_000,
        3_600_000,
        86_400_000 + 12_345,
        1_750_000_000_000, // a Unix-epoch clock works as well as a monotonic one
    ];

    #[test]
    fn unmodified_bme280_driver_reads_the_target_values() {
        let (now, mut bme) = driver_at(0);
        for ms in TIMES_MS {
            now.store(ms, Ordering::SeqCst);
            let got = measure(&mut bme);
            let want = Bme280Sim::target_at(ms);
            let dt = (got.temperature_c - want.temperature_c).abs();
            let dp = (got.pressure_pa - want.pressure_pa).abs();
            let dh = (got.humidity_pct - want.humidity_pct).abs();
            assert!(dt <= 0.5, "at {ms} ms: {got:?} vs {want:?}");
            assert!(dp <= 50.0, "at {ms} ms: {got:?} vs {want:?}");
            assert!(dh <= 1.0, "at {ms} ms: {got:?} vs {want:?}");
            // Far tighter than required: the driver's f32 arithmetic is the only error left.
            assert!(
                dt < 0.01 && dp < 2.0 && dh < 0.02,
                "at {ms} ms: {got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn consecutive_readings_a_second_apart_differ_only_slightly() {
        let (now, mut bme) = driver_at(0);
        let mut previous = measure(&mut bme);
        for second in 1..=120 {
            now.store(second * 1000, Ordering::SeqCst);
            let r = measure(&mut bme);
            assert!(
                (r.temperature_c - previous.temperature_c).abs() < 0.05,
                "{r:?}"
            );
            assert!((r.pressure_pa - previous.pressure_pa).abs() < 5.0, "{r:?}");
            assert!(
                (r.humidity_pct - previous.humidity_pct).abs() < 0.1,
                "{r:?}"
            );
            previous = r;
        }
    }

    #[test]
    fn readings_over_ten_minutes_stay_within_plausible_bands() {
        let (now, mut bme) = driver_at(0);
        let (mut t_min, mut t_max) = (f64::MAX, f64::MIN);
        for step in 0..=600 {
            now.store(step * 1000, Ordering::SeqCst);
            let r = measure(&mut bme);
            assert!((18.0..=24.0).contains(&r.temperature_c), "{r:?}");
            assert!((100_000.0..=102_500.0).contains(&r.pressure_pa), "{r:?}");
            assert!((35.0..=55.0).contains(&r.humidity_pct), "{r:?}");
            t_min = t_min.min(r.temperature_c);
            t_max = t_max.max(r.temperature_c);
        }
        // And it does move: a full temperature period fits in ten minutes.
        assert!(t_max - t_min > 3.5, "{t_min}..{t_max}");
    }

    #[test]
    fn compensation_reproduces_the_datasheet_worked_example() {
        // BST-BMP280-DS001 §3.12: adc_T = 519888, adc_P = 415148 with these parameters.
        let (t, t_fine) = CALIBRATION.temperature(519_888);
        assert!((t - 25.08).abs() < 0.005, "{t}");
        assert_eq!(t_fine, 128_422);
        // The example carries t_fine unrounded (128422.2869); truncated, as in the formula,
        // it moves the result by about 0.01 Pa.
        let p = CALIBRATION.pressure(415_148, t_fine);
        assert!((p - 100_653.27).abs() < 0.02, "{p}");
        assert_eq!(integer::temperature(&CALIBRATION, 519_888), (2508, 128_422));
        assert_eq!(
            integer::pressure(&CALIBRATION, 415_148, 128_422) / 256,
            100_653
        );
    }

    /// The datasheet's integer compensation (`BME280_compensate_T_int32`, `_P_int64`,
    /// `_H_int32`, §8.2), as Linux's bmp280 driver and Bosch's BME280_driver use it, written in
    /// i64 (the i32 originals do not overflow for valid inputs, so the results are the same).
    mod integer {
        use super::Calibration;

        pub(super) fn temperature(c: &Calibration, adc_t: u32) -> (i64, i64) {
            let adc = i64::from(adc_t);
            let t1 = i64::from(c.t1);
            let var1 = (((adc >> 3) - (t1 << 1)) * i64::from(c.t2)) >> 11;
            let var2 = (((((adc >> 4) - t1) * ((adc >> 4) - t1)) >> 12) * i64::from(c.t3)) >> 14;
            let t_fine = var1 + var2;
            ((t_fine * 5 + 128) >> 8, t_fine)
        }

        /// Pa in Q24.8.
        pub(super) fn pressure(c: &Calibration, adc_p: u32, t_fine: i64) -> i64 {
            let mut var1 = t_fine - 128_000;
            let mut var2 = var1 * var1 * i64::from(c.p6);
            var2 += (var1 * i64::from(c.p5)) << 17;
            var2 += i64::from(c.p4) << 35;
            var1 = ((var1 * var1 * i64::from(c.p3)) >> 8) + ((var1 * i64::from(c.p2)) << 12);
            var1 = (((1i64 << 47) + var1) * i64::from(c.p1)) >> 33;
            if var1 == 0 {
                return 0;
            }
            let mut p = 1_048_576 - i64::from(adc_p);
            p = (((p << 31) - var2) * 3125) / var1;
            let var1 = (i64::from(c.p9) * (p >> 13) * (p >> 13)) >> 25;
            let var2 = (i64::from(c.p8) * p) >> 19;
            ((p + var1 + var2) >> 8) + (i64::from(c.p7) << 4)
        }

        /// %RH in Q22.10.
        pub(super) fn humidity(c: &Calibration, adc_h: u32, t_fine: i64) -> i64 {
            let mut v = t_fine - 76_800;
            v = ((((i64::from(adc_h) << 14) - (i64::from(c.h4) << 20) - (i64::from(c.h5) * v))
                + 16_384)
                >> 15)
                * (((((((v * i64::from(c.h6)) >> 10)
                    * (((v * i64::from(c.h3)) >> 11) + 32_768))
                    >> 10)
                    + 2_097_152)
                    * i64::from(c.h2)
                    + 8192)
                    >> 14);
            v -= ((((v >> 15) * (v >> 15)) >> 7) * i64::from(c.h1)) >> 4;
            v.clamp(0, 419_430_400) >> 12
        }
    }

    #[test]
    fn drivers_using_the_integer_formulas_read_the_target_values_too() {
        for ms in TIMES_MS {
            let mut sim = sim_with_clock(ms);
            sim.write(&[
                REG_CTRL_HUM,
                0b001,
                REG_CTRL_MEAS,
                ctrl_meas(0b010, 0b101, 0b01),
            ])
            .expect("write");
            let mut d = [0u8; 8];
            sim.write(&[REG_DATA]).expect("write");
            sim.read(&mut d).expect("read");
            let adc_p = (u32::from(d[0]) << 12) | (u32::from(d[1]) << 4) | (u32::from(d[2]) >> 4);
            let adc_t = (u32::from(d[3]) << 12) | (u32::from(d[4]) << 4) | (u32::from(d[5]) >> 4);
            let adc_h = (u32::from(d[6]) << 8) | u32::from(d[7]);
            let (t, t_fine) = integer::temperature(&CALIBRATION, adc_t);
            let p = integer::pressure(&CALIBRATION, adc_p, t_fine);
            let h = integer::humidity(&CALIBRATION, adc_h, t_fine);
            let want = Bme280Sim::target_at(ms);
            let t = t as f64 / 100.0;
            let p = p as f64 / 256.0;
            let h = h as f64 / 1024.0;
            assert!((t - want.temperature_c).abs() < 0.02, "{t} vs {want:?}");
            assert!((p - want.pressure_pa).abs() < 1.0, "{p} vs {want:?}");
            assert!((h - want.humidity_pct).abs() < 0.02, "{h} vs {want:?}");
        }
    }

    #[test]
    fn inversion_is_within_one_adc_step_of_the_target() {
        for ms in TIMES_MS {
            let want = Bme280Sim::target_at(ms);
            let raw = CALIBRATION.raw_for(want);
            let (t, t_fine) = CALIBRATION.temperature(raw.adc_t);
            let p = CALIBRATION.pressure(raw.adc_p, t_fine);
            let h = CALIBRATION.humidity(raw.adc_h, t_fine);
            assert!((t - want.temperature_c).abs() < 0.0005, "{t} vs {want:?}");
            assert!((p - want.pressure_pa).abs() < 0.2, "{p} vs {want:?}");
            assert!((h - want.humidity_pct).abs() < 0.005, "{h} vs {want:?}");
        }
    }

    #[test]
    fn chip_id_reads_0x60_through_write_read() {
        let mut bus = SimI2c::new().with_device(0x76, sim_with_clock(0));
        let mut id = [0u8];
        bus.write_read(0x76, &[REG_CHIP_ID], &mut id)
            .expect("write_read");
        assert_eq!(id, [0x60]);
    }

    #[test]
    fn a_missing_address_is_not_acknowledged() {
        let mut bus = SimI2c::new().with_device(0x76, sim_with_clock(0));
        let mut buf = [0u8; 2];
        let err = bus.read(0x77, &mut buf).expect_err("nobody at 0x77");
        assert_eq!(
            i2c::Error::kind(&err),
            i2c::ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
        );
        assert_eq!(err, SimError::NoDevice { address: 0x77 });
        assert!(bus.write(0x10, &[0]).is_err());
        assert!(bus.write_read(0x10, &[0], &mut buf).is_err());
        // An address-only probe finds exactly the attached device.
        let found: Vec<u8> = (0..=0x7F).filter(|&a| bus.write(a, &[]).is_ok()).collect();
        assert_eq!(found, [0x76]);
        assert_eq!(bus.addresses().collect::<Vec<_>>(), [0x76]);
        let err = bus.read(0x80, &mut buf).expect_err("not 7-bit");
        assert_eq!(i2c::Error::kind(&err), i2c::ErrorKind::Other);
    }

    #[test]
    fn register_reads_auto_increment_across_the_calibration_blocks() {
        let mut bus = SimI2c::new().with_device(0x76, sim_with_clock(0));
        let mut block = [0u8; 26];
        bus.write_read(0x76, &[0x88], &mut block).expect("block");
        for (i, &byte) in block.iter().enumerate() {
            let reg = 0x88 + u8::try_from(i).expect("small");
            let mut one = [0u8];
            bus.write_read(0x76, &[reg], &mut one).expect("one");
            assert_eq!(one[0], byte, "register {reg:#04x}");
        }
        let word = |i: usize| [block[i], block[i + 1]];
        assert_eq!(u16::from_le_bytes(word(0)), 27504);
        assert_eq!(i16::from_le_bytes(word(2)), 26435);
        assert_eq!(i16::from_le_bytes(word(4)), -1000);
        assert_eq!(u16::from_le_bytes(word(6)), 36477);
        assert_eq!(i16::from_le_bytes(word(8)), -10685);
        assert_eq!(i16::from_le_bytes(word(22)), 6000);
        assert_eq!(block[25], 75, "dig_H1 at 0xA1");

        // Two adjacent reads are one read phase: the pointer runs on from one to the next.
        let (mut a, mut b) = ([0u8; 3], [0u8; 4]);
        bus.transaction(
            0x76,
            &mut [
                i2c::Operation::Write(&[0xE1]),
                i2c::Operation::Read(&mut a),
                i2c::Operation::Read(&mut b),
            ],
        )
        .expect("transaction");
        let h = [a[0], a[1], a[2], b[0], b[1], b[2], b[3]];
        assert_eq!(i16::from_le_bytes([h[0], h[1]]), 362, "dig_H2");
        assert_eq!(h[2], 0, "dig_H3");
        let h4 = (i16::from(i8::from_le_bytes([h[3]])) * 16) | i16::from(h[4] & 0x0F);
        let h5 = (i16::from(i8::from_le_bytes([h[5]])) * 16) | i16::from(h[4] >> 4);
        assert_eq!((h4, h5), (324, 50));
        assert_eq!(i8::from_le_bytes([h[6]]), 30, "dig_H6");
    }

    #[test]
    fn negative_h4_and_h5_survive_the_12_bit_packing() {
        let c = Calibration {
            h4: -300,
            h5: -7,
            ..CALIBRATION
        };
        let (_, h) = c.registers();
        // Sign-extend the 12-bit fields as drivers do.
        let h4 = (i16::from(i8::from_le_bytes([h[3]])) << 4) | i16::from(h[4] & 0x0F);
        let h5 = (i16::from(i8::from_le_bytes([h[5]])) << 4) | i16::from(h[4] >> 4);
        assert_eq!((h4, h5), (-300, -7));
    }

    #[test]
    fn data_registers_hold_reset_values_until_the_first_measurement() {
        let mut bus = SimI2c::new().with_device(0x76, sim_with_clock(0));
        let mut data = [0u8; 8];
        bus.write_read(0x76, &[REG_DATA], &mut data).expect("read");
        assert_eq!(data, [0x80, 0, 0, 0x80, 0, 0, 0x80, 0]);
        let mut status = [0xAAu8];
        bus.write_read(0x76, &[REG_STATUS], &mut status)
            .expect("status");
        assert_eq!(status, [0], "neither measuring nor copying calibration");
    }

    #[test]
    fn a_forced_measurement_fills_the_data_and_returns_to_sleep() {
        let mut bus = SimI2c::new().with_device(0x76, sim_with_clock(42_000));
        // Address/value pairs in one write, as Bosch's API sends them.
        bus.write(
            0x76,
            &[
                REG_CTRL_HUM,
                0x01,
                REG_CTRL_MEAS,
                ctrl_meas(0b001, 0b001, 0b01),
            ],
        )
        .expect("write");
        let mut ctrl = [0u8; 4];
        bus.write_read(0x76, &[REG_CTRL_HUM], &mut ctrl)
            .expect("read");
        assert_eq!(
            ctrl,
            [0x01, 0x00, ctrl_meas(0b001, 0b001, 0b00), 0x00],
            "ctrl_hum, status, ctrl_meas, config"
        );
        let mut data = [0u8; 8];
        bus.write_read(0x76, &[REG_DATA], &mut data).expect("read");
        assert_ne!(data, [0x80, 0, 0, 0x80, 0, 0, 0x80, 0]);
        assert_eq!(data[2] & 0x0F, 0, "xlsb uses its upper 4 bits only");
        assert_eq!(data[5] & 0x0F, 0, "xlsb uses its upper 4 bits only");

        // Soft reset: control and data registers back to their reset values.
        bus.write(0x76, &[REG_RESET, SOFT_RESET]).expect("reset");
        bus.write_read(0x76, &[REG_CTRL_HUM], &mut ctrl)
            .expect("read");
        assert_eq!(ctrl, [0; 4]);
        bus.write_read(0x76, &[REG_DATA], &mut data).expect("read");
        assert_eq!(data, [0x80, 0, 0, 0x80, 0, 0, 0x80, 0]);
        let mut id = [0u8];
        bus.write_read(0x76, &[REG_CHIP_ID], &mut id).expect("id");
        assert_eq!(id, [CHIP_ID], "read-only registers survive a reset");
    }

    #[test]
    fn ctrl_hum_takes_effect_at_the_next_ctrl_meas_write_and_skipped_channels_keep_reset_values() {
        let mut sim = sim_with_clock(0);
        // Humidity skipped (ctrl_hum never written), temperature and pressure measured.
        sim.write(&[REG_CTRL_MEAS, ctrl_meas(0b001, 0b001, 0b01)])
            .expect("forced");
        let mut data = [0u8; 8];
        sim.write(&[REG_DATA]).expect("pointer");
        sim.read(&mut data).expect("read");
        assert_eq!(&data[6..], &[0x80, 0x00]);
        // ctrl_hum written alone changes nothing yet...
        sim.write(&[REG_CTRL_HUM, 0x01]).expect("ctrl_hum");
        assert_eq!(sim.osrs_h, 0);
        // ...the ctrl_meas write latches it. Pressure skipped this time.
        sim.write(&[REG_CTRL_MEAS, ctrl_meas(0b001, 0b000, 0b01)])
            .expect("forced");
        sim.write(&[REG_DATA]).expect("pointer");
        sim.read(&mut data).expect("read");
        assert_eq!(&data[..3], &[0x80, 0x00, 0x00]);
        assert_ne!(&data[6..], &[0x80, 0x00]);
    }

    #[test]
    fn writes_to_read_only_registers_are_ignored() {
        let mut sim = sim_with_clock(0);
        sim.write(&[REG_CHIP_ID, 0x12, 0x88, 0x00, REG_DATA, 0x00])
            .expect("write");
        let mut id = [0u8];
        sim.write(&[REG_CHIP_ID]).expect("pointer");
        sim.read(&mut id).expect("read");
        assert_eq!(id, [CHIP_ID]);
        let mut t1 = [0u8; 2];
        sim.write(&[0x88]).expect("pointer");
        sim.read(&mut t1).expect("read");
        assert_eq!(u16::from_le_bytes(t1), 27504);
    }

    #[test]
    fn normal_mode_refreshes_the_data_whenever_it_is_read() {
        let (now, clock) = manual_clock(0);
        let mut bus = SimI2c::new().with_device(0x76, Bme280Sim::new(clock));
        bus.write(
            0x76,
            &[
                REG_CTRL_HUM,
                0x01,
                REG_CTRL_MEAS,
                ctrl_meas(0b001, 0b001, 0b11),
            ],
        )
        .expect("normal");
        let mut meas = [0u8];
        bus.write_read(0x76, &[REG_CTRL_MEAS], &mut meas)
            .expect("read");
        assert_eq!(meas[0] & MODE_MASK, MODE_NORMAL, "normal mode stays normal");
        let mut first = [0u8; 8];
        bus.write_read(0x76, &[REG_DATA], &mut first).expect("read");
        now.store(150_000, Ordering::SeqCst);
        let mut later = [0u8; 8];
        bus.write_read(0x76, &[REG_DATA], &mut later).expect("read");
        assert_ne!(first, later);
        let t =
            |d: &[u8; 8]| (u32::from(d[3]) << 12) | (u32::from(d[4]) << 4) | (u32::from(d[5]) >> 4);
        let want = Bme280Sim::target_at(150_000).temperature_c;
        assert!((CALIBRATION.temperature(t(&later)).0 - want).abs() < 0.001);
    }

    #[test]
    fn led_counts_toggles_and_reads_back_its_driven_level() {
        let (mut led, handle) = SimLed::new();
        assert!(!handle.level());
        led.set_high().expect("high");
        led.set_high().expect("high again: no change");
        assert!(handle.level());
        assert!(led.is_high().expect("read"));
        assert!(led.is_set_high().expect("state"));
        led.toggle().expect("toggle");
        assert!(led.is_low().expect("read"));
        assert!(led.is_set_low().expect("state"));
        led.set_low().expect("low again: no change");
        assert_eq!(handle.toggles(), 2);
        for _ in 0..10 {
            led.toggle().expect("toggle");
        }
        assert_eq!(handle.toggles(), 12);
        assert!(!handle.level());
    }

    #[test]
    fn button_cannot_be_driven_and_follows_its_handle() {
        let (mut button, handle) = SimButton::new();
        assert!(button.is_low().expect("released"));
        handle.set_level(true);
        assert!(button.is_high().expect("pressed"));
        let err = button.set_low().expect_err("an input");
        assert_eq!(err, SimError::InputOnly);
        assert_eq!(digital::Error::kind(&err), digital::ErrorKind::Other);
        assert!(err.to_string().contains("cannot be driven"), "{err}");
        assert!(button.set_high().is_err());
        assert!(handle.level(), "the failed drive changed nothing");
        assert_eq!(handle.toggles(), 0);
        handle.set_level(false);
        assert!(button.is_low().expect("released"));
    }

    #[test]
    fn lines_share_state_through_cloned_handles() {
        let handle = SimLineHandle::new(true);
        let mut button = SimButton::from_handle(handle.clone());
        let mut led = SimLed::from_handle(handle.clone());
        assert!(button.is_high().expect("read"));
        led.set_low().expect("drive");
        assert!(button.is_low().expect("read"));
        assert_eq!(handle.toggles(), 1);
    }

    #[test]
    fn spi_loopback_echoes_transfers_and_reads_idle_high() {
        let mut spi = SpiLoopback::new();
        let mut read = [0u8; 4];
        spi.transfer(&mut read, &[1, 2, 3, 4]).expect("transfer");
        assert_eq!(read, [1, 2, 3, 4]);
        let mut longer = [0u8; 6];
        spi.transfer(&mut longer, &[9, 8]).expect("transfer");
        assert_eq!(longer, [9, 8, 0xFF, 0xFF, 0xFF, 0xFF]);
        let mut shorter = [0u8; 1];
        spi.transfer(&mut shorter, &[7, 6, 5]).expect("transfer");
        assert_eq!(shorter, [7]);
        let mut buf = [0xDE, 0xAD, 0xBE, 0xEF];
        spi.transfer_in_place(&mut buf).expect("in place");
        assert_eq!(buf, [0xDE, 0xAD, 0xBE, 0xEF]);
        let mut idle = [0u8; 3];
        spi.read(&mut idle).expect("read");
        assert_eq!(idle, [0xFF; 3]);
        spi.write(&[1, 2, 3]).expect("write");
        let mut echoed = [0u8; 2];
        spi.transaction(&mut [
            spi::Operation::Write(&[0x9F]),
            spi::Operation::DelayNs(1_000),
            spi::Operation::Transfer(&mut echoed, &[0x42, 0x43]),
        ])
        .expect("transaction");
        assert_eq!(echoed, [0x42, 0x43]);
    }

    #[test]
    fn every_simulated_type_is_send_and_debug() {
        fn check<T: Send + fmt::Debug>() {}
        check::<SimI2c>();
        check::<Bme280Sim>();
        check::<SimLed>();
        check::<SimButton>();
        check::<SimLineHandle>();
        check::<SpiLoopback>();
        check::<SimError>();
        check::<Reading>();
        let text = format!("{:?}", sim_with_clock(0));
        assert!(text.contains("ctrl_meas"), "{text}");
    }
}
