//! The resource limiter wasmi consults when a module's memory or table grows: wasmi's
//! `StoreLimits` (memory cap, one memory, one table with an element cap, one instance), with the
//! refused growth recorded so a call's outcome can say "memory growth refused" exactly.

use wasmi::errors::{MemoryError, TableError};
use wasmi::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// A refused memory growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// Size before, in bytes.
    pub current: u64,
    /// Size asked for, in bytes.
    pub desired: u64,
}

/// `StoreLimits` that remembers what it refused.
#[derive(Debug)]
pub struct GuestLimiter {
    inner: StoreLimits,
    /// Memory cap in bytes.
    pub memory_cap: u64,
    /// The last refused memory growth since the call began.
    pub denied: Option<Denied>,
}

impl GuestLimiter {
    /// Linear memory capped at `memory_cap` bytes, one memory, one table of at most
    /// `table_elements` entries, one instance. Growth past a cap traps the guest call.
    pub fn new(memory_cap: u64, table_elements: u32) -> Self {
        let inner = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(memory_cap).unwrap_or(usize::MAX))
            .table_elements(table_elements as usize)
            .instances(1)
            .memories(1)
            .tables(1)
            .trap_on_grow_failure(true)
            .build();
        GuestLimiter {
            inner,
            memory_cap,
            denied: None,
        }
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        let result = self.inner.memory_growing(current, desired, maximum);
        if !matches!(result, Ok(true)) {
            self.denied = Some(Denied {
                current: current as u64,
                desired: desired as u64,
            });
        }
        result
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: &MemoryError) -> Result<(), wasmi_core::LimiterError> {
        self.inner.memory_grow_failed(error)
    }

    fn table_grow_failed(&mut self, error: &TableError) -> Result<(), wasmi_core::LimiterError> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}
