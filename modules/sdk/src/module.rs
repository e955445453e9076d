//! [`Module`], the life cycle of a module, and [`module!`](crate::module!), which exports it.

use crate::Error;

/// A module: made by `init`, then called on every tick and for every message, for as long as it
/// runs. An entry point returning `Err(e)` reports `e.code()` to the host; a panic traps.
pub trait Module {
    /// Called once after the module is instantiated. The host calls nothing else until it has
    /// returned `Ok`.
    fn init() -> Result<Self, Error>
    where
        Self: Sized;

    /// Called every `limits.tick_interval_ms` of the manifest (never when it is 0).
    fn tick(&mut self) -> Result<(), Error> {
        Ok(())
    }

    /// A message from the module's inbox: its topic and payload.
    fn on_message(&mut self, topic: &str, payload: &[u8]) -> Result<(), Error> {
        let _ = (topic, payload);
        Ok(())
    }
}

/// Exports a [`Module`] type as the module's entry points, with the ABI marker and the allocator
/// the host places messages with: `edge_abi_v1`, `edge_alloc`, `init`, `tick` and `on_message`.
/// Use it once, in the crate root of a `cdylib`.
///
/// The instance lives in a static; `tick` and `on_message` before a successful `init` return
/// [`Error::FAILED`]'s code. Topic and payload buffers are freed when `on_message` returns.
/// On targets other than wasm32 it only checks that the type is a [`Module`].
#[macro_export]
macro_rules! module {
    ($module:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static INSTANCE: $crate::__private::Instance<$module> =
                $crate::__private::Instance::new();

            #[unsafe(no_mangle)]
            extern "C" fn edge_abi_v1() {}

            #[unsafe(no_mangle)]
            extern "C" fn edge_alloc(size: i32) -> i32 {
                $crate::__private::alloc(size)
            }

            #[unsafe(no_mangle)]
            extern "C" fn init() -> i32 {
                INSTANCE.init()
            }

            #[unsafe(no_mangle)]
            extern "C" fn tick() -> i32 {
                INSTANCE.tick()
            }

            #[unsafe(no_mangle)]
            extern "C" fn on_message(
                topic_ptr: i32,
                topic_len: i32,
                payload_ptr: i32,
                payload_len: i32,
            ) -> i32 {
                INSTANCE.on_message(topic_ptr, topic_len, payload_ptr, payload_len)
            }
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            const fn is_module<M: $crate::Module>() {}
            is_module::<$module>()
        };
    };
}
