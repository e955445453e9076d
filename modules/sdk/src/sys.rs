//! The raw host imports of ABI v1, exactly as the host declares them (module `edge`), for authors
//! who need them; everything else in the SDK is built on these.
//!
//! Every pointer and length is the ABI's `i32` (see [`addr`] and [`len`]); the return codes are
//! described in [`edge_abi::err`]. On targets other than wasm32 these are stand-ins that fail
//! with [`edge_abi::err::UNAVAILABLE`] (and `now_ms` returns 0), so the SDK builds and its users
//! can be unit-tested on the host.
//!
//! # Safety
//!
//! The host checks every pointer and length against the module's memory and refuses what lies
//! outside it ([`edge_abi::err::BAD_POINTER`]), so a wrong address cannot reach past the
//! sandbox. These functions are `unsafe` because the host writes into the guest's memory behind
//! the compiler's back (`random`, `kv_get`, `i2c_read`, the read side of `i2c_write_read` and
//! `spi_transfer`): the range it is given must be memory the caller owns and nothing else borrows,
//! and it reads (`log`, `publish`, keys, values, bytes to write to a bus) ranges the caller must
//! not be writing to concurrently.

/// Declares each import once: the `extern` block on wasm32, stand-ins elsewhere.
macro_rules! imports {
    ($(
        $(#[$doc:meta])*
        fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $stub:expr;
    )*) => {
        #[cfg(target_arch = "wasm32")]
        #[link(wasm_import_module = "edge")]
        unsafe extern "C" {
            $(
                $(#[$doc])*
                ///
                /// # Safety
                ///
                /// See the [module documentation](self).
                pub fn $name($($arg: $ty),*) -> $ret;
            )*
        }

        $(
            #[cfg(not(target_arch = "wasm32"))]
            $(#[$doc])*
            ///
            /// # Safety
            ///
            /// See the [module documentation](self).
            pub unsafe fn $name($($arg: $ty),*) -> $ret {
                let _ = ($($arg,)*);
                $stub
            }
        )*
    };
}

imports! {
    /// Writes a log line at `level` ([`edge_abi::level`]); lines longer than
    /// [`edge_abi::limits::LOG_LINE_MAX`] are truncated. Always granted.
    fn log(level: i32, ptr: i32, len: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Milliseconds since the Unix epoch. Always granted.
    fn now_ms() -> i64 = 0;
    /// Fills `len` bytes (at most [`edge_abi::limits::RANDOM_MAX`]) at `ptr` with random bytes.
    /// Always granted.
    fn random(ptr: i32, len: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Blocks the module at least `us` microseconds (at most
    /// [`edge_abi::limits::DELAY_MAX_US`] per call, [`edge_abi::limits::DELAY_PER_CALL_MAX_US`]
    /// per entry-point call) without burning fuel. Always granted.
    fn delay_us(us: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Publishes a payload to a topic relative to the module's namespace. Needs `caps.publish`.
    fn publish(topic_ptr: i32, topic_len: i32, payload_ptr: i32, payload_len: i32) -> i32 =
        edge_abi::err::UNAVAILABLE;
    /// Returns the value's length, copying the value to `buf_ptr` only when it fits in
    /// `buf_cap`. Needs `caps.kv_quota_bytes`.
    fn kv_get(key_ptr: i32, key_len: i32, buf_ptr: i32, buf_cap: i32) -> i32 =
        edge_abi::err::UNAVAILABLE;
    /// Stores a value under a key. Needs `caps.kv_quota_bytes`.
    fn kv_set(key_ptr: i32, key_len: i32, val_ptr: i32, val_len: i32) -> i32 =
        edge_abi::err::UNAVAILABLE;
    /// Deletes a key. Needs `caps.kv_quota_bytes`.
    fn kv_delete(key_ptr: i32, key_len: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Drives GPIO output `line` low (`value` 0) or high (non-zero). Needs the line in
    /// `caps.gpio`.
    fn gpio_set(line: i32, value: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Reads GPIO `line`: 0 low, 1 high. Needs the line in `caps.gpio`.
    fn gpio_get(line: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Writes `len` bytes (at most [`edge_abi::limits::I2C_MAX`]) at `ptr` to the I2C device at
    /// 7-bit address `addr` on `bus`. Needs the bus and address in `caps.i2c`.
    fn i2c_write(bus: i32, addr: i32, ptr: i32, len: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Reads `len` bytes (at most [`edge_abi::limits::I2C_MAX`]) from the I2C device at `addr`
    /// on `bus` into `ptr`. Needs the bus and address in `caps.i2c`.
    fn i2c_read(bus: i32, addr: i32, ptr: i32, len: i32) -> i32 = edge_abi::err::UNAVAILABLE;
    /// Writes `write_len` bytes, then with a repeated start (no stop in between) reads
    /// `read_len` bytes, from the I2C device at `addr` on `bus`: a register read. Each side at
    /// most [`edge_abi::limits::I2C_MAX`]. Needs the bus and address in `caps.i2c`.
    fn i2c_write_read(
        bus: i32,
        addr: i32,
        write_ptr: i32,
        write_len: i32,
        read_ptr: i32,
        read_len: i32
    ) -> i32 = edge_abi::err::UNAVAILABLE;
    /// A full-duplex transfer of `len` bytes (at most [`edge_abi::limits::SPI_MAX`]) with the SPI
    /// device at chip select `cs` on `bus`: writes the bytes at `write_ptr` while reading as many
    /// into `read_ptr` (which may equal `write_ptr`). Needs the device in `caps.spi`.
    fn spi_transfer(bus: i32, cs: i32, write_ptr: i32, read_ptr: i32, len: i32) -> i32 =
        edge_abi::err::UNAVAILABLE;
}

/// A guest address as the ABI's `i32`: the same 32 bits (the host reads addresses as unsigned).
pub fn addr<T>(ptr: *const T) -> i32 {
    len(ptr as usize)
}

/// A length as the ABI's `i32`. On wasm32 no object is larger than `i32::MAX` bytes, so the
/// value is unchanged.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "usize is 32 bits on wasm32, the only target where the value reaches a host"
)]
pub fn len(n: usize) -> i32 {
    n as u32 as i32
}
