//! What exists only on wasm32: the instance behind the exports, the message buffers handed to the
//! host, the global allocator and the panic handler.

use alloc::vec::Vec;
use core::cell::RefCell;

use crate::{Error, Module, sys};

/// The module's instance, in the static that [`module!`](crate::module!) declares: `None` until
/// `init` succeeds.
#[derive(Debug)]
pub struct Instance<M>(RefCell<Option<M>>);

// SAFETY: a wasm32 module has one thread, and the host makes one call into it at a time and
// never re-enters it (no import calls back into the guest). The RefCell catches re-entry anyway.
unsafe impl<M> Sync for Instance<M> {}

impl<M: Module> Instance<M> {
    /// An instance not yet initialised.
    #[allow(
        clippy::new_without_default,
        reason = "only ever a static's initialiser"
    )]
    pub const fn new() -> Self {
        Instance(RefCell::new(None))
    }

    /// The `init` export.
    pub fn init(&self) -> i32 {
        let (module, code) = match M::init() {
            Ok(module) => (Some(module), 0),
            Err(e) => (None, e.code()),
        };
        *self.0.borrow_mut() = module;
        code
    }

    /// The `tick` export.
    pub fn tick(&self) -> i32 {
        self.with(M::tick)
    }

    /// The `on_message` export: finds the topic and payload among the buffers `edge_alloc` handed
    /// out, passes them to the module and frees them all.
    pub fn on_message(
        &self,
        topic_ptr: i32,
        topic_len: i32,
        payload_ptr: i32,
        payload_len: i32,
    ) -> i32 {
        let buffers = INBOX.0.take();
        let (Some(topic), Some(payload)) = (
            find(&buffers, topic_ptr, topic_len),
            find(&buffers, payload_ptr, payload_len),
        ) else {
            return Error::BAD_POINTER.code();
        };
        let Ok(topic) = core::str::from_utf8(topic) else {
            return Error::BAD_ARGUMENT.code();
        };
        self.with(|module| module.on_message(topic, payload))
    }

    fn with(&self, call: impl FnOnce(&mut M) -> Result<(), Error>) -> i32 {
        match self.0.borrow_mut().as_mut() {
            Some(module) => status(call(module)),
            None => Error::FAILED.code(),
        }
    }
}

/// An entry point's return code.
fn status(result: Result<(), Error>) -> i32 {
    result.err().map_or(0, Error::code)
}

/// The buffers `edge_alloc` handed to the host since the last `on_message`.
struct Inbox(RefCell<Vec<Vec<u8>>>);

// SAFETY: as for `Instance`.
unsafe impl Sync for Inbox {}

static INBOX: Inbox = Inbox(RefCell::new(Vec::new()));

/// The `edge_alloc` export: a zeroed buffer of `size` bytes, kept until the next `on_message`
/// returns; 0 if it cannot be had.
pub fn alloc(size: i32) -> i32 {
    let Ok(size) = usize::try_from(size) else {
        return 0;
    };
    let mut inbox = INBOX.0.borrow_mut();
    let mut buffer = Vec::new();
    if buffer.try_reserve_exact(size).is_err() || inbox.try_reserve(1).is_err() {
        return 0;
    }
    buffer.resize(size, 0);
    // An empty buffer's address is a dangling non-zero one, so it too reads as success.
    let addr = sys::addr(buffer.as_mut_ptr());
    inbox.push(buffer);
    addr
}

/// The `len` bytes at `ptr` if they lie within one of `buffers`.
fn find(buffers: &[Vec<u8>], ptr: i32, len: i32) -> Option<&[u8]> {
    let (start, len) = (ptr as u32 as usize, usize::try_from(len).ok()?);
    if len == 0 {
        return Some(&[]);
    }
    buffers.iter().find_map(|buffer| {
        let offset = start.checked_sub(buffer.as_ptr() as usize)?;
        buffer.get(offset..offset.checked_add(len)?)
    })
}

#[cfg(feature = "allocator")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// Logs the panic at error level (cut to one log line), then traps.
#[cfg(feature = "panic-handler")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::sync::atomic::{AtomicBool, Ordering};

    // A panic while logging a panic traps at once instead of recursing.
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let message = info.message();
        match info.location() {
            Some(at) => crate::log::log_fmt(
                crate::Level::Error,
                format_args!("panic at {}:{}: {message}", at.file(), at.line()),
            ),
            None => crate::log::log_fmt(crate::Level::Error, format_args!("panic: {message}")),
        }
    }
    core::arch::wasm32::unreachable()
}
