//! Host functions of ABI v1, written over a plain byte slice (the guest's memory) and the module's
//! host state, so they can be tested and fuzzed without an engine. `linker.rs` wires them to wasmi.
//!
//! Every pointer and length is checked before use: lengths against the ABI's limits first
//! (`TOO_LARGE`), then the range against the memory (`BAD_POINTER`). Everything a guest can make
//! the host keep — log lines, messages, key-value bytes — is bounded per call and counted, and
//! every call is charged fuel by the work it does ([`super::fuel::price`]); calls that wait (a
//! delay, a bus transfer, a store write) check the guest call's deadline.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use edge_abi::{err, limits};

use super::fuel::{Meter, Stop, price};
use super::kv::{KvError, KvStore};
use crate::core::manifest::{Caps, I2cGrant, SpiGrant, check_topic, topic_matches};
use crate::core::protocol::LogLevel;
use crate::core::rate::{Rate, TokenBucket};
use crate::hal::{Board, BoardError, Direction, HalError};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// Milliseconds added to the system clock's reading ([`set_clock_offset_ms`]).
static CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Shifts what [`SystemClock`] reads for the whole process: `edge-agent` sets it from
/// `EDGE_AGENT_CLOCK_OFFSET_S`, so that a test can run an agent whose clock is wrong (a board
/// without a real-time clock that booted at 1970) without changing the machine's clock.
pub fn set_clock_offset_ms(offset: i64) {
    CLOCK_OFFSET_MS.store(offset, std::sync::atomic::Ordering::Relaxed);
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let shifted =
            real.saturating_add(CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed));
        u64::try_from(shifted).unwrap_or(0)
    }
}

/// A line a module logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// The text (at most `LOG_LINE_MAX` bytes, invalid UTF-8 replaced).
    pub text: String,
}

/// A message a module published, topic relative to its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    /// Relative topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A host call that returned an error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The import.
    pub call: &'static str,
    /// The code returned.
    pub code: i32,
    /// Why, for the operator.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} refused ({}): {}",
            self.call,
            err::name(self.code),
            self.reason
        )
    }
}

/// Per-call bounds and rates the host enforces (from the agent's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostLimits {
    /// Publishes allowed over time.
    pub publish_rate: Rate,
    /// Log lines allowed over time.
    pub log_rate: Rate,
    /// Messages one guest call may queue.
    pub max_messages_per_call: usize,
    /// Payload bytes one guest call may queue.
    pub max_message_bytes_per_call: usize,
    /// Log lines one guest call may queue.
    pub max_log_lines_per_call: usize,
    /// Refused host calls after which the guest call is ended (a guest spinning on errors).
    pub max_refusals_per_call: u32,
    /// Key-value writes and deletes allowed over time (storage wear).
    pub kv_write_rate: Rate,
    /// Key-value writes and deletes one guest call may make.
    pub max_kv_writes_per_call: u32,
    /// Key and value bytes one guest call may write.
    pub max_kv_write_bytes_per_call: usize,
    /// Random bytes one guest call may draw.
    pub max_random_bytes_per_call: usize,
    /// Summaries of refused host calls logged over time (one per guest call at most).
    pub refusal_log_rate: Rate,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            publish_rate: Rate {
                per_sec: 20,
                burst: 50,
            },
            log_rate: Rate {
                per_sec: 50,
                burst: 100,
            },
            max_messages_per_call: 64,
            max_message_bytes_per_call: 256 * 1024,
            max_log_lines_per_call: 256,
            max_refusals_per_call: 100,
            kv_write_rate: Rate {
                per_sec: 50,
                burst: 200,
            },
            max_kv_writes_per_call: 64,
            max_kv_write_bytes_per_call: 64 * 1024,
            max_random_bytes_per_call: 64 * 1024,
            refusal_log_rate: Rate {
                per_sec: 1,
                burst: 5,
            },
        }
    }
}

/// Counters over the module's lifetime (across calls and restarts of the same instance).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostCounters {
    /// Lines logged.
    pub log_lines: u64,
    /// Lines dropped (rate limit or per-call bound).
    pub log_dropped: u64,
    /// Messages published.
    pub published: u64,
    /// Payload bytes published.
    pub published_bytes: u64,
    /// Host calls that returned an error code (not counting "not found").
    pub refused: u64,
    /// Summaries of refused host calls not logged (rate limit).
    pub refusal_logs_dropped: u64,
}

/// The guest call was ended by the host: the guest kept making calls that were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// The import whose refusal crossed the limit.
    pub call: &'static str,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.reason)
    }
}

impl std::error::Error for Abort {}
impl wasmi::errors::HostError for Abort {}

/// Why the host ended a guest call: the guest broke the host contract, or it ran out of fuel or
/// time inside a host call. Carried through wasmi as the host error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Too many refused host calls, or a bad `edge_alloc` buffer.
    Refused(Abort),
    /// Out of fuel or past the deadline.
    Stopped(Stop),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Refused(a) => a.fmt(f),
            Ended::Stopped(Stop::OutOfFuel) => f.write_str("out of fuel in a host call"),
            Ended::Stopped(Stop::Deadline) => f.write_str("deadline exceeded"),
        }
    }
}

impl std::error::Error for Ended {}
impl wasmi::errors::HostError for Ended {}

/// How one host call failed: an error code for the guest, or the end of the guest call.
#[derive(Debug)]
enum Fail {
    Code(i32, String),
    Stop(Stop),
}

impl From<(i32, String)> for Fail {
    fn from((code, reason): (i32, String)) -> Self {
        Fail::Code(code, reason)
    }
}

impl From<Stop> for Fail {
    fn from(stop: Stop) -> Self {
        Fail::Stop(stop)
    }
}

/// One host call with its raw arguments, as the guest made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCall {
    /// `log(level, ptr, len)`.
    Log(i32, i32, i32),
    /// `now_ms()`.
    NowMs,
    /// `random(ptr, len)`.
    Random(i32, i32),
    /// `delay_us(us)`.
    DelayUs(i32),
    /// `publish(topic_ptr, topic_len, payload_ptr, payload_len)`.
    Publish(i32, i32, i32, i32),
    /// `kv_get(key_ptr, key_len, buf_ptr, buf_cap)`.
    KvGet(i32, i32, i32, i32),
    /// `kv_set(key_ptr, key_len, val_ptr, val_len)`.
    KvSet(i32, i32, i32, i32),
    /// `kv_delete(key_ptr, key_len)`.
    KvDelete(i32, i32),
    /// `gpio_set(line, value)`.
    GpioSet(i32, i32),
    /// `gpio_get(line)`.
    GpioGet(i32),
    /// `i2c_write(bus, addr, ptr, len)`.
    I2cWrite(i32, i32, i32, i32),
    /// `i2c_read(bus, addr, ptr, len)`.
    I2cRead(i32, i32, i32, i32),
    /// `i2c_write_read(bus, addr, write_ptr, write_len, read_ptr, read_len)`.
    I2cWriteRead(i32, i32, i32, i32, i32, i32),
    /// `spi_transfer(bus, cs, write_ptr, read_ptr, len)`.
    SpiTransfer(i32, i32, i32, i32, i32),
}

/// The board and what a module's manifest grants on it.
#[derive(Debug, Clone, Default)]
pub struct Hardware {
    board: Option<Arc<Board>>,
    gpio: Vec<u32>,
    i2c: Vec<I2cGrant>,
    spi: Vec<SpiGrant>,
}

impl Hardware {
    /// The grants in `caps` on `board`.
    pub fn new(board: Arc<Board>, caps: &Caps) -> Self {
        Hardware {
            board: Some(board),
            gpio: caps.gpio.clone(),
            i2c: caps.i2c.clone(),
            spi: caps.spi.clone(),
        }
    }
}

/// Everything the host keeps for one module instance.
#[derive(Debug)]
pub struct HostState {
    publish: Vec<String>,
    kv: Option<Box<dyn KvStoreDebug>>,
    clock: Arc<dyn Clock>,
    limits: HostLimits,
    publish_bucket: TokenBucket,
    log_bucket: TokenBucket,
    kv_bucket: TokenBucket,
    refusal_log_bucket: TokenBucket,
    /// Queued for the caller, drained after each guest call.
    pub(super) messages: Vec<OutMessage>,
    message_bytes: usize,
    pub(super) logs: Vec<LogLine>,
    pub(super) refusals: Vec<Refusal>,
    refusals_this_call: u32,
    delayed_us_this_call: u64,
    random_bytes_this_call: usize,
    kv_writes_this_call: u32,
    kv_write_bytes_this_call: usize,
    /// The guest call's fuel outside the store, and its deadline.
    pub(super) meter: Meter,
    /// Lifetime counters.
    pub counters: HostCounters,
    /// The limiter (memory and table caps) wasmi consults.
    pub(super) limiter: super::limiter::GuestLimiter,
    /// The guest's memory, once instantiated.
    pub(super) memory: Option<wasmi::Memory>,
    hardware: Hardware,
}

/// `KvStore` plus `Debug`, so the state can be printed.
pub trait KvStoreDebug: KvStore + fmt::Debug {}
impl<T: KvStore + fmt::Debug> KvStoreDebug for T {}

/// Refusals kept per call for reporting (the count goes on beyond this).
const REFUSALS_KEPT_PER_CALL: usize = 16;

impl HostState {
    /// Host state for a module granted `publish` patterns and, if any, a key-value store.
    pub fn new(
        publish: Vec<String>,
        kv: Option<Box<dyn KvStoreDebug>>,
        clock: Arc<dyn Clock>,
        limits: HostLimits,
        limiter: super::limiter::GuestLimiter,
    ) -> Self {
        let now = clock.now_ms();
        HostState {
            publish,
            kv,
            publish_bucket: TokenBucket::new(limits.publish_rate, now),
            log_bucket: TokenBucket::new(limits.log_rate, now),
            kv_bucket: TokenBucket::new(limits.kv_write_rate, now),
            refusal_log_bucket: TokenBucket::new(limits.refusal_log_rate, now),
            clock,
            limits,
            messages: Vec::new(),
            message_bytes: 0,
            logs: Vec::new(),
            refusals: Vec::new(),
            refusals_this_call: 0,
            delayed_us_this_call: 0,
            random_bytes_this_call: 0,
            kv_writes_this_call: 0,
            kv_write_bytes_this_call: 0,
            meter: Meter::default(),
            counters: HostCounters::default(),
            limiter,
            memory: None,
            hardware: Hardware::default(),
        }
    }

    /// Gives the module the hardware its manifest grants.
    pub fn with_hardware(mut self, hardware: Hardware) -> Self {
        self.hardware = hardware;
        self
    }

    /// Starts a guest call driven from outside an engine (tests, fuzzing): clears the per-call
    /// bounds and gives the meter `fuel` and `deadline`, all of it in the meter's hands.
    pub fn start_call(&mut self, fuel: u64, deadline: std::time::Duration) {
        self.begin_call();
        self.meter.begin(fuel, deadline);
    }

    /// Clears the per-call bounds before a guest call.
    pub(super) fn begin_call(&mut self) {
        self.messages.clear();
        self.message_bytes = 0;
        self.logs.clear();
        self.refusals.clear();
        self.refusals_this_call = 0;
        self.delayed_us_this_call = 0;
        self.random_bytes_this_call = 0;
        self.kv_writes_this_call = 0;
        self.kv_write_bytes_this_call = 0;
        self.limiter.denied = None;
    }

    /// One line summarising the host calls refused in the call that just ended, unless none
    /// were refused or the summaries' rate limit holds it back (then it is counted).
    pub(super) fn refusal_summary(&mut self) -> Option<LogLine> {
        let n = self.refusals_this_call;
        let first = self.refusals.first()?;
        if !self.refusal_log_bucket.try_take(self.clock.now_ms()) {
            self.counters.refusal_logs_dropped += 1;
            return None;
        }
        let mut text = if n == 1 {
            format!("host call {first}")
        } else {
            let last = self.refusals.last().unwrap_or(first);
            format!("{n} host calls refused in one call; first: {first}; last kept: {last}")
        };
        if self.counters.refusal_logs_dropped > 0 {
            text.push_str(&format!(
                " ({} earlier summaries not logged: rate limit)",
                self.counters.refusal_logs_dropped
            ));
        }
        Some(LogLine {
            level: LogLevel::Warn,
            text: utf8_lossy_bounded(text.as_bytes(), limits::LOG_LINE_MAX as usize),
        })
    }

    /// Key-value writes and deletes made in the current guest call.
    pub(super) fn kv_writes(&self) -> u32 {
        self.kv_writes_this_call
    }

    /// The module's key-value store.
    pub(super) fn into_kv(self) -> Option<Box<dyn KvStoreDebug>> {
        self.kv
    }

    /// Bytes in the module's key-value store.
    pub fn kv_used_bytes(&self) -> u64 {
        self.kv.as_ref().map_or(0, |kv| kv.used_bytes())
    }

    /// Runs one host call against `mem`, charging its fuel to the meter. `Ok` carries the value
    /// returned to the guest (an `i32` code widened, or `now_ms`); `Err` ends the guest call.
    pub fn call(&mut self, mem: &mut [u8], call: HostCall) -> Result<i64, Ended> {
        self.meter.charge(price::CALL).map_err(Ended::Stopped)?;
        let (name, result) = match call {
            HostCall::Log(l, p, n) => (edge_abi::import::LOG, self.log(mem, l, p, n)),
            HostCall::NowMs => {
                let now = i64::try_from(self.clock.now_ms()).unwrap_or(i64::MAX);
                return Ok(now);
            }
            HostCall::Random(p, n) => (edge_abi::import::RANDOM, self.random(mem, p, n)),
            HostCall::DelayUs(us) => (edge_abi::import::DELAY_US, self.delay_us(us)),
            HostCall::Publish(tp, tl, pp, pl) => {
                (edge_abi::import::PUBLISH, self.publish(mem, tp, tl, pp, pl))
            }
            HostCall::KvGet(kp, kl, bp, bc) => {
                (edge_abi::import::KV_GET, self.kv_get(mem, kp, kl, bp, bc))
            }
            HostCall::KvSet(kp, kl, vp, vl) => {
                (edge_abi::import::KV_SET, self.kv_set(mem, kp, kl, vp, vl))
            }
            HostCall::KvDelete(kp, kl) => {
                (edge_abi::import::KV_DELETE, self.kv_delete(mem, kp, kl))
            }
            HostCall::GpioSet(line, value) => {
                (edge_abi::import::GPIO_SET, self.gpio_set(line, value))
            }
            HostCall::GpioGet(line) => (edge_abi::import::GPIO_GET, self.gpio_get(line)),
            HostCall::I2cWrite(b, a, p, n) => {
                (edge_abi::import::I2C_WRITE, self.i2c_write(mem, b, a, p, n))
            }
            HostCall::I2cRead(b, a, p, n) => {
                (edge_abi::import::I2C_READ, self.i2c_read(mem, b, a, p, n))
            }
            HostCall::I2cWriteRead(b, a, wp, wn, rp, rn) => (
                edge_abi::import::I2C_WRITE_READ,
                self.i2c_write_read(mem, b, a, (wp, wn), (rp, rn)),
            ),
            HostCall::SpiTransfer(b, cs, wp, rp, n) => (
                edge_abi::import::SPI_TRANSFER,
                self.spi_transfer(mem, b, cs, wp, rp, n),
            ),
        };
        match result {
            Ok(v) => Ok(i64::from(v)),
            Err(Fail::Stop(stop)) => Err(Ended::Stopped(stop)),
            Err(Fail::Code(code, _)) if code == err::NOT_FOUND => Ok(i64::from(code)),
            Err(Fail::Code(code, reason)) => self
                .refuse(name, code, reason)
                .map(i64::from)
                .map_err(Ended::Refused),
        }
    }

    /// Charges `cost` fuel for the work a call is about to do.
    fn pay(&mut self, cost: u64) -> Result<(), Stop> {
        self.meter.charge(cost)
    }

    /// After a call that may have waited: ends the guest call if its deadline passed meanwhile.
    fn check_deadline(&self) -> Result<(), Stop> {
        if self.meter.past_deadline() {
            return Err(Stop::Deadline);
        }
        Ok(())
    }

    fn refuse(&mut self, call: &'static str, code: i32, reason: String) -> Result<i32, Abort> {
        self.counters.refused += 1;
        self.refusals_this_call += 1;
        if self.refusals.len() < REFUSALS_KEPT_PER_CALL {
            self.refusals.push(Refusal {
                call,
                code,
                reason: reason.clone(),
            });
        }
        if self.refusals_this_call > self.limits.max_refusals_per_call {
            return Err(Abort {
                call,
                reason: format!(
                    "more than {} refused host calls in one guest call (last: {reason})",
                    self.limits.max_refusals_per_call
                ),
            });
        }
        Ok(code)
    }

    fn log(&mut self, mem: &[u8], lvl: i32, ptr: i32, len: i32) -> HostResult {
        let level = LogLevel::from_abi(lvl)
            .ok_or_else(|| (err::BAD_ARGUMENT, format!("unknown log level {lvl}")))?;
        // Long lines are cut, not refused: read at most LOG_LINE_MAX bytes of them.
        let range = range(mem, ptr, len, u32::MAX, "log line")?;
        let keep = range.len().min(limits::LOG_LINE_MAX as usize);
        self.pay(price::LOG_LINE + price::copied(keep))?;
        let bytes = &mem[range.start..range.start + keep];
        if self.logs.len() >= self.limits.max_log_lines_per_call {
            self.counters.log_dropped += 1;
            return Err((err::BUSY, "too many log lines in one call".to_string()).into());
        }
        if !self.log_bucket.try_take(self.clock.now_ms()) {
            self.counters.log_dropped += 1;
            return Err((err::RATE_LIMITED, "log rate exceeded".to_string()).into());
        }
        self.counters.log_lines += 1;
        self.logs.push(LogLine {
            level,
            text: utf8_lossy_bounded(bytes, limits::LOG_LINE_MAX as usize),
        });
        Ok(err::OK)
    }

    /// Sleeps the calling thread (a guest-pool thread, never the reactor), bounded per call, per
    /// guest call (counting the time really slept, which is longer than asked for short sleeps)
    /// and by the guest call's deadline.
    fn delay_us(&mut self, us: i32) -> HostResult {
        let us = u32::try_from(us)
            .map_err(|_| (err::BAD_ARGUMENT, format!("negative delay {us} us")))?;
        if us > limits::DELAY_MAX_US {
            return Err((
                err::TOO_LARGE,
                format!(
                    "a delay of {us} us is above the limit of {} us",
                    limits::DELAY_MAX_US
                ),
            )
                .into());
        }
        let cap = u64::from(limits::DELAY_PER_CALL_MAX_US);
        if self.delayed_us_this_call + u64::from(us) > cap {
            return Err((
                err::BUSY,
                format!("delays in one guest call would exceed {cap} us"),
            )
                .into());
        }
        self.pay(u64::from(us).max(price::DELAY_MIN_US) * price::DELAY_US)?;
        let asked = std::time::Duration::from_micros(u64::from(us));
        let left = self.meter.time_left();
        let started = std::time::Instant::now();
        std::thread::sleep(asked.min(left));
        let slept = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.delayed_us_this_call = self.delayed_us_this_call.saturating_add(slept);
        self.check_deadline()?;
        Ok(err::OK)
    }

    fn random(&mut self, mem: &mut [u8], ptr: i32, len: i32) -> HostResult {
        let range = range(mem, ptr, len, limits::RANDOM_MAX, "random buffer")?;
        if self.random_bytes_this_call + range.len() > self.limits.max_random_bytes_per_call {
            return Err((
                err::BUSY,
                format!(
                    "more than {} random bytes in one guest call",
                    self.limits.max_random_bytes_per_call
                ),
            )
                .into());
        }
        self.pay(price::RANDOM_CALL + range.len() as u64 * price::RANDOM_BYTE)?;
        self.random_bytes_this_call += range.len();
        getrandom::fill(&mut mem[range])
            .map_err(|e| (err::UNAVAILABLE, format!("random source failed: {e}")))?;
        Ok(err::OK)
    }

    fn publish(&mut self, mem: &[u8], tp: i32, tl: i32, pp: i32, pl: i32) -> HostResult {
        let topic = range(mem, tp, tl, limits::TOPIC_MAX, "topic")?;
        let payload = range(mem, pp, pl, limits::PAYLOAD_MAX, "payload")?;
        self.pay(price::PUBLISH + price::copied(topic.len() + payload.len()))?;
        let topic = std::str::from_utf8(&mem[topic])
            .map_err(|_| (err::BAD_ARGUMENT, "topic is not UTF-8".to_string()))?;
        check_topic(topic).map_err(|e| (err::BAD_ARGUMENT, e))?;
        if !self.publish.iter().any(|p| topic_matches(p, topic)) {
            return Err((
                err::DENIED,
                format!(
                    "topic {topic:?} is not granted by caps.publish {:?}",
                    self.publish
                ),
            )
                .into());
        }
        if self.messages.len() >= self.limits.max_messages_per_call
            || self.message_bytes + payload.len() > self.limits.max_message_bytes_per_call
        {
            return Err((err::BUSY, "outgoing queue full for this call".to_string()).into());
        }
        if !self.publish_bucket.try_take(self.clock.now_ms()) {
            return Err((err::RATE_LIMITED, "publish rate exceeded".to_string()).into());
        }
        self.message_bytes += payload.len();
        self.counters.published += 1;
        self.counters.published_bytes += payload.len() as u64;
        self.messages.push(OutMessage {
            topic: topic.to_string(),
            payload: mem[payload].to_vec(),
        });
        Ok(err::OK)
    }

    fn kv(&mut self) -> Result<&mut Box<dyn KvStoreDebug>, (i32, String)> {
        self.kv
            .as_mut()
            .ok_or_else(|| (err::DENIED, "no key-value store is granted".to_string()))
    }

    fn kv_get(&mut self, mem: &mut [u8], kp: i32, kl: i32, bp: i32, bc: i32) -> HostResult {
        let key = key_range(mem, kp, kl)?;
        let buf = range(mem, bp, bc, u32::MAX, "value buffer")?;
        self.pay(price::KV_READ + price::copied(key.len()))?;
        let key = mem[key].to_vec();
        let value = self.kv()?.get(&key).map_err(kv_error)?;
        let Some(value) = value else {
            return Err((err::NOT_FOUND, "no such key".to_string()).into());
        };
        if value.len() <= buf.len() {
            self.pay(price::copied(value.len()))?;
            mem[buf.start..buf.start + value.len()].copy_from_slice(&value);
        }
        Ok(i32::try_from(value.len()).unwrap_or(i32::MAX))
    }

    /// Admits one key-value write of `bytes` (key plus value): per-call count and bytes, the
    /// write rate, then its price.
    fn admit_write(&mut self, bytes: usize) -> Result<(), Fail> {
        if self.kv_writes_this_call >= self.limits.max_kv_writes_per_call
            || self.kv_write_bytes_this_call + bytes > self.limits.max_kv_write_bytes_per_call
        {
            return Err((
                err::BUSY,
                format!(
                    "more than {} key-value writes or {} bytes written in one guest call",
                    self.limits.max_kv_writes_per_call, self.limits.max_kv_write_bytes_per_call
                ),
            )
                .into());
        }
        self.pay(price::KV_WRITE + bytes as u64 * price::KV_BYTE_WRITTEN)?;
        if !self.kv_bucket.try_take(self.clock.now_ms()) {
            return Err((
                err::RATE_LIMITED,
                "key-value write rate exceeded".to_string(),
            )
                .into());
        }
        self.kv_writes_this_call += 1;
        self.kv_write_bytes_this_call += bytes;
        Ok(())
    }

    fn kv_set(&mut self, mem: &[u8], kp: i32, kl: i32, vp: i32, vl: i32) -> HostResult {
        let key = key_range(mem, kp, kl)?;
        let value = range(mem, vp, vl, limits::KV_VALUE_MAX, "value")?;
        self.kv()?;
        self.admit_write(key.len() + value.len())?;
        self.kv()?.set(&mem[key], &mem[value]).map_err(kv_error)?;
        self.check_deadline()?;
        Ok(err::OK)
    }

    fn kv_delete(&mut self, mem: &[u8], kp: i32, kl: i32) -> HostResult {
        let key = key_range(mem, kp, kl)?;
        self.kv()?;
        self.admit_write(key.len())?;
        let existed = self.kv()?.delete(&mem[key]).map_err(kv_error)?;
        self.check_deadline()?;
        if existed {
            Ok(err::OK)
        } else {
            Err((err::NOT_FOUND, "no such key".to_string()).into())
        }
    }
}

impl HostState {
    fn board(&self) -> Result<&Board, (i32, String)> {
        self.hardware.board.as_deref().ok_or_else(|| {
            (
                err::UNAVAILABLE,
                "this device offers no hardware".to_string(),
            )
        })
    }

    fn granted_line(&self, line: i32) -> Result<u32, (i32, String)> {
        u32::try_from(line)
            .ok()
            .filter(|l| self.hardware.gpio.contains(l))
            .ok_or_else(|| {
                (
                    err::DENIED,
                    format!("gpio line {line} is not granted by caps.gpio"),
                )
            })
    }

    fn granted_i2c(&self, bus: i32, addr: i32) -> Result<(u32, u8), (i32, String)> {
        let denied = || {
            (
                err::DENIED,
                format!("i2c bus {bus} address {addr:#04x} is not granted by caps.i2c"),
            )
        };
        let bus = u32::try_from(bus).map_err(|_| denied())?;
        let addr = u8::try_from(addr)
            .ok()
            .filter(|a| *a <= 0x7f)
            .ok_or_else(denied)?;
        let granted = self
            .hardware
            .i2c
            .iter()
            .any(|g| g.bus == bus && g.addresses.contains(&u16::from(addr)));
        if granted {
            Ok((bus, addr))
        } else {
            Err(denied())
        }
    }

    fn granted_spi(&self, bus: i32, cs: i32) -> Result<(u32, u32), (i32, String)> {
        let denied = || {
            (
                err::DENIED,
                format!("spi device {bus}.{cs} is not granted by caps.spi"),
            )
        };
        let (bus, cs) = (
            u32::try_from(bus).map_err(|_| denied())?,
            u32::try_from(cs).map_err(|_| denied())?,
        );
        if self.hardware.spi.iter().any(|g| g.bus == bus && g.cs == cs) {
            Ok((bus, cs))
        } else {
            Err(denied())
        }
    }

    fn gpio_set(&mut self, line: i32, value: i32) -> HostResult {
        let line = self.granted_line(line)?;
        self.pay(price::HARDWARE_CALL)?;
        let (direction, dev) = self.board()?.gpio(line).map_err(board_error)?;
        if direction != Direction::Output {
            return Err((
                err::BAD_ARGUMENT,
                format!("gpio line {line} is an input and cannot be driven"),
            )
                .into());
        }
        lock(dev).set(value != 0).map_err(hal_error)?;
        self.check_deadline()?;
        Ok(err::OK)
    }

    fn gpio_get(&mut self, line: i32) -> HostResult {
        let line = self.granted_line(line)?;
        self.pay(price::HARDWARE_CALL)?;
        let (_, dev) = self.board()?.gpio(line).map_err(board_error)?;
        let high = lock(dev).get().map_err(hal_error)?;
        self.check_deadline()?;
        Ok(i32::from(high))
    }

    fn i2c_write(&mut self, mem: &[u8], bus: i32, addr: i32, p: i32, n: i32) -> HostResult {
        let (bus, addr) = self.granted_i2c(bus, addr)?;
        let r = range(mem, p, n, limits::I2C_MAX, "i2c write buffer")?;
        self.pay(price::HARDWARE_CALL + r.len() as u64 * price::BUS_BYTE)?;
        let dev = self.board()?.i2c(bus).map_err(board_error)?;
        lock(dev).write(addr, &mem[r]).map_err(hal_error)?;
        self.check_deadline()?;
        Ok(err::OK)
    }

    fn i2c_read(&mut self, mem: &mut [u8], bus: i32, addr: i32, p: i32, n: i32) -> HostResult {
        let (bus, addr) = self.granted_i2c(bus, addr)?;
        let r = range(mem, p, n, limits::I2C_MAX, "i2c read buffer")?;
        self.pay(price::HARDWARE_CALL + r.len() as u64 * price::BUS_BYTE)?;
        let dev = self.board()?.i2c(bus).map_err(board_error)?;
        lock(dev).read(addr, &mut mem[r]).map_err(hal_error)?;
        self.check_deadline()?;
        Ok(err::OK)
    }

    fn i2c_write_read(
        &mut self,
        mem: &mut [u8],
        bus: i32,
        addr: i32,
        (wp, wn): (i32, i32),
        (rp, rn): (i32, i32),
    ) -> HostResult {
        let (bus, addr) = self.granted_i2c(bus, addr)?;
        let w = range(mem, wp, wn, limits::I2C_MAX, "i2c write buffer")?;
        let r = range(mem, rp, rn, limits::I2C_MAX, "i2c read buffer")?;
        self.pay(price::HARDWARE_CALL + (w.len() + r.len()) as u64 * price::BUS_BYTE)?;
        let dev = self.board()?.i2c(bus).map_err(board_error)?;
        // The two ranges may overlap; the bytes to write are copied out first.
        let bytes = mem[w].to_vec();
        lock(dev)
            .write_read(addr, &bytes, &mut mem[r])
            .map_err(hal_error)?;
        self.check_deadline()?;
        Ok(err::OK)
    }

    fn spi_transfer(
        &mut self,
        mem: &mut [u8],
        bus: i32,
        cs: i32,
        wp: i32,
        rp: i32,
        n: i32,
    ) -> HostResult {
        let (bus, cs) = self.granted_spi(bus, cs)?;
        let w = range(mem, wp, n, limits::SPI_MAX, "spi write buffer")?;
        let r = range(mem, rp, n, limits::SPI_MAX, "spi read buffer")?;
        self.pay(price::HARDWARE_CALL + r.len() as u64 * price::SPI_BYTE)?;
        let dev = self.board()?.spi(bus, cs).map_err(board_error)?;
        let bytes = mem[w].to_vec();
        lock(dev).transfer(&mut mem[r], &bytes).map_err(hal_error)?;
        self.check_deadline()?;
        Ok(err::OK)
    }
}

fn lock<T: ?Sized>(m: &std::sync::Mutex<Box<T>>) -> std::sync::MutexGuard<'_, Box<T>> {
    // A panic while a bus was held cannot leave it in a state another call must not see: the
    // next transfer starts from scratch.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn board_error(e: BoardError) -> (i32, String) {
    (err::UNAVAILABLE, e.to_string())
}

fn hal_error(e: HalError) -> (i32, String) {
    (e.abi_code(), e.to_string())
}

type HostResult = Result<i32, Fail>;

fn kv_error(e: KvError) -> (i32, String) {
    match e {
        KvError::QuotaExceeded { .. } => (err::QUOTA_EXCEEDED, e.to_string()),
        KvError::Storage(_) => (err::UNAVAILABLE, e.to_string()),
    }
}

/// The guest range `ptr .. ptr + len`, checked: `len` against `max` (`TOO_LARGE`), then the range
/// against the memory (`BAD_POINTER`). Both are unsigned 32-bit values as wasm32 sees them.
pub fn range(
    mem: &[u8],
    ptr: i32,
    len: i32,
    max: u32,
    what: &str,
) -> Result<Range<usize>, (i32, String)> {
    let (ptr, len) = (ptr as u32, len as u32);
    if len > max {
        return Err((
            err::TOO_LARGE,
            format!("{what} of {len} bytes is above the limit of {max}"),
        ));
    }
    let start = ptr as usize;
    match start.checked_add(len as usize) {
        Some(end) if end <= mem.len() => Ok(start..end),
        _ => Err((
            err::BAD_POINTER,
            format!(
                "{what} at {ptr:#x}+{len} lies outside the module's {} bytes of memory",
                mem.len()
            ),
        )),
    }
}

fn key_range(mem: &[u8], ptr: i32, len: i32) -> Result<Range<usize>, (i32, String)> {
    let r = range(mem, ptr, len, limits::KV_KEY_MAX, "key")?;
    if r.is_empty() {
        return Err((err::BAD_ARGUMENT, "empty key".into()));
    }
    Ok(r)
}

/// UTF-8 text of `bytes`, invalid sequences replaced, at most `max` bytes long (cut back to a
/// character boundary).
fn utf8_lossy_bounded(bytes: &[u8], max: usize) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::kv::MemoryKv;
    use crate::runtime::limiter::GuestLimiter;
    use edge_abi::level;

    #[derive(Debug)]
    struct FixedClock(u64);
    impl Clock for FixedClock {
        fn now_ms(&self) -> u64 {
            self.0
        }
    }

    fn state(limits: HostLimits) -> HostState {
        let mut s = HostState::new(
            vec!["t/#".into()],
            Some(Box::new(MemoryKv::new(
                crate::runtime::kv::ENTRY_OVERHEAD + 64,
            ))),
            Arc::new(FixedClock(1_000)),
            limits,
            GuestLimiter::new(65536, 10),
        );
        s.meter.begin(1 << 40, std::time::Duration::from_secs(3600));
        s
    }

    fn mem_with(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; 1024];
        m[at..at + bytes.len()].copy_from_slice(bytes);
        m
    }

    #[test]
    fn every_out_of_bounds_pointer_or_length_is_an_error_code() {
        let mut s = state(HostLimits::default());
        let mut mem = vec![0u8; 1024];
        let bad = [
            (1020, 8),
            (-1, 1),
            (0, -1),
            (i32::MIN, 4),
            (1024, 1),
            (0, 1025),
        ];
        for (p, n) in bad {
            for call in [
                HostCall::Log(level::INFO, p, n),
                HostCall::Random(p, n),
                HostCall::Publish(p, n, 0, 1),
                HostCall::Publish(0, 1, p, n),
                HostCall::KvGet(p, n, 0, 4),
                HostCall::KvGet(0, 1, p, n),
                HostCall::KvSet(p, n, 0, 1),
                HostCall::KvSet(0, 1, p, n),
                HostCall::KvDelete(p, n),
            ] {
                let r = s.call(&mut mem, call).unwrap();
                assert!(
                    r == i64::from(err::BAD_POINTER) || r == i64::from(err::TOO_LARGE),
                    "{call:?} returned {r}"
                );
            }
        }
    }

    #[test]
    fn publish_checks_the_grant_and_queues_a_copy() {
        let mut s = state(HostLimits::default());
        let mut mem = mem_with(0, b"t/ax/yhello");
        assert_eq!(s.call(&mut mem, HostCall::Publish(0, 3, 6, 5)), Ok(0));
        assert_eq!(
            s.messages,
            vec![OutMessage {
                topic: "t/a".into(),
                payload: b"hello".to_vec()
            }]
        );
        // "x/y" is not under "t/#".
        assert_eq!(
            s.call(&mut mem, HostCall::Publish(3, 3, 6, 5)),
            Ok(i64::from(err::DENIED))
        );
        // A wildcard in a concrete topic is a bad argument.
        let mut mem = mem_with(0, b"t/#");
        assert_eq!(
            s.call(&mut mem, HostCall::Publish(0, 3, 0, 0)),
            Ok(i64::from(err::BAD_ARGUMENT))
        );
        assert_eq!(s.counters.published, 1);
        assert_eq!(s.counters.refused, 2);
    }

    #[test]
    fn publishes_are_rate_limited_and_bounded_per_call() {
        let mut s = state(HostLimits {
            publish_rate: Rate {
                per_sec: 1,
                burst: 2,
            },
            ..HostLimits::default()
        });
        let mut mem = mem_with(0, b"t/a");
        let codes: Vec<_> = (0..3)
            .map(|_| s.call(&mut mem, HostCall::Publish(0, 3, 0, 0)).unwrap())
            .collect();
        assert_eq!(codes, [0, 0, i64::from(err::RATE_LIMITED)]);

        let mut s = state(HostLimits {
            max_messages_per_call: 1,
            ..HostLimits::default()
        });
        assert_eq!(s.call(&mut mem, HostCall::Publish(0, 3, 0, 0)), Ok(0));
        assert_eq!(
            s.call(&mut mem, HostCall::Publish(0, 3, 0, 0)),
            Ok(i64::from(err::BUSY))
        );
        s.begin_call();
        assert_eq!(s.call(&mut mem, HostCall::Publish(0, 3, 0, 0)), Ok(0));
    }

    #[test]
    fn kv_round_trips_and_reports_sizes_without_overrunning_the_buffer() {
        let mut s = state(HostLimits::default());
        let mut mem = mem_with(0, b"keyvalue");
        assert_eq!(s.call(&mut mem, HostCall::KvSet(0, 3, 3, 5)), Ok(0));
        // Too small a buffer: the length comes back, nothing is written.
        assert_eq!(s.call(&mut mem, HostCall::KvGet(0, 3, 100, 2)), Ok(5));
        assert_eq!(&mem[100..102], &[0, 0]);
        assert_eq!(s.call(&mut mem, HostCall::KvGet(0, 3, 100, 16)), Ok(5));
        assert_eq!(&mem[100..105], b"value");
        assert_eq!(s.call(&mut mem, HostCall::KvDelete(0, 3)), Ok(0));
        assert_eq!(
            s.call(&mut mem, HostCall::KvGet(0, 3, 100, 16)),
            Ok(i64::from(err::NOT_FOUND))
        );
        assert_eq!(
            s.call(&mut mem, HostCall::KvDelete(0, 3)),
            Ok(i64::from(err::NOT_FOUND))
        );
        assert_eq!(s.counters.refused, 0, "not found is not a refusal");
        assert_eq!(
            s.call(&mut mem, HostCall::KvSet(0, 3, 0, 100)),
            Ok(i64::from(err::QUOTA_EXCEEDED))
        );
        assert_eq!(
            s.call(&mut mem, HostCall::KvSet(0, 0, 0, 1)),
            Ok(i64::from(err::BAD_ARGUMENT))
        );
    }

    #[test]
    fn long_log_lines_are_cut_and_unknown_levels_refused() {
        let mut s = state(HostLimits::default());
        let mut mem = vec![b'a'; 4096];
        assert_eq!(s.call(&mut mem, HostCall::Log(level::WARN, 0, 4000)), Ok(0));
        assert_eq!(s.logs[0].text.len(), limits::LOG_LINE_MAX as usize);
        assert_eq!(
            s.call(&mut mem, HostCall::Log(9, 0, 1)),
            Ok(i64::from(err::BAD_ARGUMENT))
        );
        let mut mem = vec![0xff; 8];
        assert_eq!(s.call(&mut mem, HostCall::Log(level::INFO, 0, 8)), Ok(0));
        assert!(s.logs[1].text.contains('\u{fffd}'));
    }

    #[test]
    fn delays_are_bounded_per_call_and_per_guest_call() {
        let mut s = state(HostLimits::default());
        let mut mem = vec![0u8; 8];
        assert_eq!(
            s.call(&mut mem, HostCall::DelayUs(-1)),
            Ok(i64::from(err::BAD_ARGUMENT))
        );
        assert_eq!(
            s.call(&mut mem, HostCall::DelayUs(100_001)),
            Ok(i64::from(err::TOO_LARGE))
        );
        assert_eq!(s.call(&mut mem, HostCall::DelayUs(10)), Ok(0));
        // Pretend the call already slept almost its whole allowance.
        s.delayed_us_this_call = u64::from(limits::DELAY_PER_CALL_MAX_US) - 5;
        assert_eq!(
            s.call(&mut mem, HostCall::DelayUs(10)),
            Ok(i64::from(err::BUSY))
        );
        s.begin_call();
        assert_eq!(s.call(&mut mem, HostCall::DelayUs(10)), Ok(0));
    }

    #[test]
    fn a_guest_spinning_on_refusals_is_stopped() {
        let mut s = state(HostLimits {
            max_refusals_per_call: 3,
            ..HostLimits::default()
        });
        let mut mem = vec![0u8; 16];
        for _ in 0..3 {
            assert!(s.call(&mut mem, HostCall::Random(0, 100)).is_ok());
        }
        let Err(Ended::Refused(abort)) = s.call(&mut mem, HostCall::Random(0, 100)) else {
            panic!("the fourth refusal ends the call");
        };
        assert_eq!(abort.call, "random");
        assert_eq!(s.refusals.len(), 4);
    }

    #[test]
    fn without_a_kv_grant_kv_calls_are_denied() {
        let mut s = HostState::new(
            vec![],
            None,
            Arc::new(FixedClock(0)),
            HostLimits::default(),
            GuestLimiter::new(65536, 10),
        );
        s.meter.begin(1 << 40, std::time::Duration::from_secs(3600));
        let mut mem = vec![b'a'; 16];
        assert_eq!(
            s.call(&mut mem, HostCall::KvGet(0, 1, 0, 1)),
            Ok(i64::from(err::DENIED))
        );
        assert_eq!(
            s.call(&mut mem, HostCall::Publish(0, 1, 0, 1)),
            Ok(i64::from(err::DENIED))
        );
    }
}
