//! Drives module instances: each module has an async task that ticks it and hands it messages,
//! running every guest call on a blocking thread from a bounded pool (never on the reactor). A
//! failed call restarts the module as a fresh instance after an exponential backoff; too many
//! failures quarantine it. A module on probation (a new version) is not restarted: its first
//! failure ends the runner, so the caller can roll back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::host::KvStoreDebug;
use super::{CallReport, InstallError, InstanceStats, ModuleInstance, PreparedModule, Runtime};
use crate::core::policy::{Decision, FailureTracker, RestartPolicy};

/// A bounded pool for guest calls: at most `n` run at once, each on a blocking thread, handed
/// out in the order they were asked for.
#[derive(Debug, Clone)]
pub struct GuestPool {
    permits: Arc<Semaphore>,
}

impl GuestPool {
    /// A pool running at most `n` guest calls at once.
    pub fn new(n: usize) -> Self {
        GuestPool {
            permits: Arc::new(Semaphore::new(n.max(1))),
        }
    }

    /// A pool as wide as the machine.
    pub fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// Runs `f(&mut value)` on a blocking thread; returns the value and the result.
    pub async fn run<T, R>(
        &self,
        mut value: T,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> (T, R)
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        // The semaphore is never closed.
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("the guest pool's semaphore is never closed"));
        let task = tokio::task::spawn_blocking(move || {
            let r = f(&mut value);
            drop(permit);
            (value, r)
        });
        match task.await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down and this task goes with it.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Which export a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    /// `init`.
    Init,
    /// `tick`.
    Tick,
    /// `on_message`.
    Message,
}

impl std::fmt::Display for CallKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CallKind::Init => "init",
            CallKind::Tick => "tick",
            CallKind::Message => "on_message",
        })
    }
}

/// Where a module's runner is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// Running (between calls or in one).
    Running,
    /// Waiting to restart after a failure.
    BackingOff {
        /// Milliseconds until the restart.
        delay_ms: u64,
        /// The failure.
        cause: String,
    },
    /// Stopped after too many failures; runs again only for a new version or an operator.
    Quarantined {
        /// The last failure.
        cause: String,
        /// Failures within the window.
        failures: u32,
    },
    /// A module on probation failed; the runner has ended (the caller rolls back).
    ProbationFailed {
        /// The failure.
        cause: String,
    },
    /// A module on probation passed `init` and its first ticks.
    ProbationPassed,
    /// Instantiation failed (not the guest's code: e.g. its memory no longer fits).
    Failed {
        /// Why.
        cause: String,
    },
    /// Stopped on request.
    Stopped,
}

/// What a runner reports.
#[derive(Debug, Clone)]
pub enum RunnerEvent {
    /// A guest call is about to run.
    Calling {
        /// The runner's id (`RunnerConfig::id`).
        id: u64,
        /// Module name.
        module: String,
        /// Which export.
        call: CallKind,
    },
    /// A guest call ended.
    Called {
        /// The runner's id.
        id: u64,
        /// Module name.
        module: String,
        /// Which export.
        call: CallKind,
        /// What it did (boxed: the event channel holds many small events).
        report: Box<CallReport>,
        /// The instance's figures after it.
        stats: InstanceStats,
    },
    /// A message for `on_message` arrived while the module was not running (backing off,
    /// quarantined) and was dropped.
    Dropped {
        /// The runner's id.
        id: u64,
        /// Module name.
        module: String,
    },
    /// The runner changed state.
    State {
        /// The runner's id.
        id: u64,
        /// Module name.
        module: String,
        /// The new state.
        state: RunState,
        /// Restarts so far.
        restarts: u32,
    },
}

/// Commands to a runner.
#[derive(Debug)]
enum Command {
    Deliver { topic: String, payload: Vec<u8> },
    Restart,
    Stop,
}

/// A handle to a module's runner task.
#[derive(Debug)]
pub struct RunnerHandle {
    module: String,
    commands: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    inbox: Arc<Inbox>,
    task: tokio::task::JoinHandle<Option<Box<dyn KvStoreDebug>>>,
}

/// Makes key-value writes durable before a guest call's outputs leave: a handle on a group
/// committer, which answers once a store flush that began after the request has finished
/// (one flush serves every request that arrived while the previous one ran).
#[derive(Debug, Clone)]
pub struct Durability {
    requests: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
}

impl Durability {
    /// A handle sending its requests to `requests`; the committer answers each.
    pub fn new(requests: mpsc::Sender<oneshot::Sender<Result<(), String>>>) -> Self {
        Durability { requests }
    }

    /// Waits until everything written before now is durable.
    pub async fn commit(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| "the committer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the committer has stopped".to_string())?
    }
}

/// Messages queued per module before `deliver` reports the module busy.
const INBOX_DEPTH: usize = 32;
/// Topic and payload bytes queued per module before `deliver` reports the module busy.
pub const INBOX_BYTES: usize = 256 * 1024;

/// What a module's inbox holds, shared by the handle (which admits) and the runner (which takes).
#[derive(Debug, Default)]
struct Inbox {
    bytes: AtomicUsize,
    dropped: AtomicU64,
}

/// Why a message could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The module's inbox is full.
    #[error("module {0:?}: inbox full, message dropped")]
    Full(String),
    /// The runner has ended.
    #[error("module {0:?} is not running, message dropped")]
    Gone(String),
    /// The topic or payload is above the ABI's limits.
    #[error("module {module:?}: message dropped: {reason}")]
    TooLarge {
        /// Module name.
        module: String,
        /// Which limit.
        reason: String,
    },
}

impl RunnerHandle {
    /// The module's name.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// Queues a message for `on_message`, bounded in count and bytes and checked against the
    /// ABI's limits on arrival; never waits. A message refused is counted ([`Self::dropped`]).
    pub fn deliver(&self, topic: String, payload: Vec<u8>) -> Result<(), QueueError> {
        let refuse = |e: QueueError| {
            self.inbox.dropped.fetch_add(1, Ordering::Relaxed);
            Err(e)
        };
        let too_large = |reason: String| QueueError::TooLarge {
            module: self.module.clone(),
            reason,
        };
        if topic.len() > edge_abi::limits::TOPIC_MAX as usize {
            return refuse(too_large(format!(
                "topic of {} bytes, above the limit of {}",
                topic.len(),
                edge_abi::limits::TOPIC_MAX
            )));
        }
        if payload.len() > edge_abi::limits::PAYLOAD_MAX as usize {
            return refuse(too_large(format!(
                "payload of {} bytes, above the limit of {}",
                payload.len(),
                edge_abi::limits::PAYLOAD_MAX
            )));
        }
        let size = topic.len() + payload.len();
        let admitted =
            self.inbox
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                    (queued + size <= INBOX_BYTES).then_some(queued + size)
                });
        if admitted.is_err() {
            return refuse(QueueError::Full(self.module.clone()));
        }
        self.commands
            .try_send(Command::Deliver { topic, payload })
            .or_else(|e| {
                self.inbox.bytes.fetch_sub(size, Ordering::AcqRel);
                refuse(match e {
                    mpsc::error::TrySendError::Full(_) => QueueError::Full(self.module.clone()),
                    mpsc::error::TrySendError::Closed(_) => QueueError::Gone(self.module.clone()),
                })
            })
    }

    /// Messages refused for this module's inbox so far (full, too large, not running).
    pub fn dropped(&self) -> u64 {
        self.inbox.dropped.load(Ordering::Relaxed)
    }

    /// Restarts the module with a clean failure record (an operator's restart, also out of
    /// quarantine). Never waits.
    pub fn restart(&self) -> Result<(), QueueError> {
        self.commands
            .try_send(Command::Restart)
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => QueueError::Full(self.module.clone()),
                mpsc::error::TrySendError::Closed(_) => QueueError::Gone(self.module.clone()),
            })
    }

    /// Tells the runner to stop after the call in progress (which ends within its deadline).
    /// Never waits: the runner's end arrives as its `Stopped` (or other final) state.
    pub fn stop_soon(&self) {
        let _ = self.stop.send(true);
    }

    /// Whether the runner task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the runner after any call in progress (which ends within its deadline) and returns the
    /// module's key-value store.
    pub async fn stop(self) -> Option<Box<dyn KvStoreDebug>> {
        self.stop_soon();
        match self.task.await {
            Ok(kv) => kv,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }
}

/// How a runner behaves.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Echoed in every event, so a caller can tell a runner from the one it replaced.
    pub id: u64,
    /// Restart backoff and quarantine.
    pub policy: RestartPolicy,
    /// `Some(n)`: the module is on probation until `init` and `n` ticks finish (a module that does
    /// not tick passes after `init`); its first failure ends the runner instead of restarting.
    pub probation_ticks: Option<u32>,
    /// Where a call that wrote key-value data waits for it to be durable before its report (and
    /// so its publishes) goes out; `None`: no waiting (an in-memory store).
    pub durability: Option<Durability>,
}

/// Starts a runner for `prepared`, with its key-value store, reporting to `events`.
pub fn spawn(
    runtime: Runtime,
    pool: GuestPool,
    prepared: PreparedModule,
    kv: Option<Box<dyn KvStoreDebug>>,
    config: RunnerConfig,
    events: mpsc::Sender<RunnerEvent>,
) -> RunnerHandle {
    let (commands, rx) = mpsc::channel(INBOX_DEPTH);
    let (stop, stop_rx) = watch::channel(false);
    let module = prepared.name().to_string();
    let inbox = Arc::new(Inbox::default());
    let runner = Runner {
        inbox: Arc::clone(&inbox),
        runtime,
        pool,
        prepared,
        config,
        events,
        commands: rx,
        stop: stop_rx,
        failures: FailureTracker::default(),
        restarts: 0,
        epoch: Instant::now(),
    };
    let task = tokio::spawn(runner.run(kv));
    RunnerHandle {
        module,
        commands,
        stop,
        inbox,
        task,
    }
}

struct Runner {
    inbox: Arc<Inbox>,
    runtime: Runtime,
    pool: GuestPool,
    prepared: PreparedModule,
    config: RunnerConfig,
    events: mpsc::Sender<RunnerEvent>,
    commands: mpsc::Receiver<Command>,
    stop: watch::Receiver<bool>,
    failures: FailureTracker,
    restarts: u32,
    epoch: Instant,
}

/// How one instance's life ended.
enum End {
    Failed(String),
    Restart,
    Stop,
    ProbationFailed(String),
    InstantiateFailed(InstallError),
}

impl Runner {
    fn name(&self) -> String {
        self.prepared.name().to_string()
    }

    async fn state(&self, state: RunState) {
        let _ = self
            .events
            .send(RunnerEvent::State {
                id: self.config.id,
                module: self.name(),
                state,
                restarts: self.restarts,
            })
            .await;
    }

    /// The next command (a stop request comes as `Stop`); a message taken leaves the inbox's
    /// byte count.
    async fn next_command(&mut self) -> Option<Command> {
        if *self.stop.borrow() {
            return Some(Command::Stop);
        }
        let cmd = tokio::select! {
            biased;
            _ = self.stop.changed() => return Some(Command::Stop),
            cmd = self.commands.recv() => cmd,
        };
        if let Some(Command::Deliver { topic, payload }) = &cmd {
            self.inbox
                .bytes
                .fetch_sub(topic.len() + payload.len(), Ordering::AcqRel);
        }
        cmd
    }

    /// A message that arrived while the module was not running is dropped, counted and reported.
    async fn count_dropped(&self) {
        self.inbox.dropped.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .events
            .send(RunnerEvent::Dropped {
                id: self.config.id,
                module: self.name(),
            })
            .await;
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, mut kv: Option<Box<dyn KvStoreDebug>>) -> Option<Box<dyn KvStoreDebug>> {
        let mut probation = self.config.probation_ticks;
        loop {
            let (returned_kv, end) = self.live(kv, &mut probation).await;
            kv = returned_kv;
            match end {
                End::Stop => {
                    self.state(RunState::Stopped).await;
                    return kv;
                }
                End::ProbationFailed(cause) => {
                    self.state(RunState::ProbationFailed { cause }).await;
                    return kv;
                }
                End::InstantiateFailed(e) => {
                    self.state(RunState::Failed {
                        cause: e.to_string(),
                    })
                    .await;
                    return kv;
                }
                End::Restart => {
                    self.failures.reset();
                    self.restarts += 1;
                }
                End::Failed(cause) => {
                    match self.failures.on_failure(&self.config.policy, self.now_ms()) {
                        Decision::RestartAfter(delay_ms) => {
                            self.state(RunState::BackingOff {
                                delay_ms,
                                cause: cause.clone(),
                            })
                            .await;
                            match self.wait(Duration::from_millis(delay_ms)).await {
                                Some(Command::Stop) => {
                                    self.state(RunState::Stopped).await;
                                    return kv;
                                }
                                Some(Command::Restart) => self.failures.reset(),
                                _ => {}
                            }
                            self.restarts += 1;
                        }
                        Decision::Quarantine { failures } => {
                            self.state(RunState::Quarantined { cause, failures }).await;
                            match self.wait_for_restart().await {
                                Command::Restart => {
                                    self.failures.reset();
                                    self.restarts += 1;
                                }
                                _ => {
                                    self.state(RunState::Stopped).await;
                                    return kv;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Waits `delay` for a stop or restart command (messages meanwhile are dropped: the module is
    /// not running).
    async fn wait(&mut self, delay: Duration) -> Option<Command> {
        let deadline = tokio::time::sleep(delay);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return None,
                cmd = self.next_command() => match cmd {
                    Some(Command::Deliver { .. }) => self.count_dropped().await,
                    Some(other) => return Some(other),
                    None => return Some(Command::Stop),
                },
            }
        }
    }

    async fn wait_for_restart(&mut self) -> Command {
        loop {
            match self.next_command().await {
                Some(Command::Deliver { .. }) => self.count_dropped().await,
                Some(other) => return other,
                None => return Command::Stop,
            }
        }
    }

    /// One instance's life: instantiate, init, then ticks and messages until it fails or is told
    /// to stop. Returns the key-value store for the next instance.
    async fn live(
        &mut self,
        kv: Option<Box<dyn KvStoreDebug>>,
        probation: &mut Option<u32>,
    ) -> (Option<Box<dyn KvStoreDebug>>, End) {
        let runtime = self.runtime.clone();
        let prepared = self.prepared.clone();
        let (_, made) = self
            .pool
            .run((), move |()| runtime.instantiate(&prepared, kv))
            .await;
        let mut instance = match made {
            Ok(i) => i,
            Err(e) => return (None, End::InstantiateFailed(e)),
        };
        self.state(RunState::Running).await;
        let (back, report) = self.call(instance, CallKind::Init, |i| i.init()).await;
        instance = back;
        if let Some(end) = self.judge(&report, probation, CallKind::Init).await {
            return (instance.into_kv(), end);
        }
        let period = instance.limits().tick_interval_ms;
        let ticking = period > 0 && instance.has_tick();
        let mut ticker = tokio::time::interval(Duration::from_millis(period.max(1)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.reset();
        loop {
            tokio::select! {
                _ = ticker.tick(), if ticking => {
                    let (back, report) = self.call(instance, CallKind::Tick, |i| i.tick()).await;
                    instance = back;
                    if let Some(end) = self.judge(&report, probation, CallKind::Tick).await {
                        return (instance.into_kv(), end);
                    }
                }
                cmd = self.next_command() => match cmd {
                    Some(Command::Deliver { topic, payload }) => {
                        let (back, result) = self
                            .call(instance, CallKind::Message, move |i| i.deliver(&topic, &payload))
                            .await;
                        instance = back;
                        // A message the module cannot take (no handler, too large) is dropped.
                        if let Ok(report) = result
                            && let Some(end) = self.judge(&report, probation, CallKind::Message).await
                        {
                            return (instance.into_kv(), end);
                        }
                    }
                    Some(Command::Restart) => return (instance.into_kv(), End::Restart),
                    Some(Command::Stop) | None => return (instance.into_kv(), End::Stop),
                },
            }
        }
    }

    /// Runs one guest call on the pool, reporting it before and after.
    async fn call<R: MaybeReport + Send + 'static>(
        &self,
        instance: ModuleInstance,
        kind: CallKind,
        f: impl FnOnce(&mut ModuleInstance) -> R + Send + 'static,
    ) -> (ModuleInstance, R) {
        let _ = self
            .events
            .send(RunnerEvent::Calling {
                id: self.config.id,
                module: self.name(),
                call: kind,
            })
            .await;
        let (instance, result) = self.pool.run(instance, f).await;
        if let Some(report) = result.report() {
            // Key-value writes of the call become durable before anything it published leaves.
            if report.kv_writes > 0
                && let Some(d) = &self.config.durability
                && let Err(e) = d.commit().await
            {
                tracing::error!(
                    "module {}: key-value writes not made durable: {e}",
                    self.name()
                );
            }
            let _ = self
                .events
                .send(RunnerEvent::Called {
                    id: self.config.id,
                    module: self.name(),
                    call: kind,
                    report: Box::new(report.clone()),
                    stats: instance.stats(),
                })
                .await;
        }
        (instance, result)
    }

    /// What a call's outcome means for the instance: `None` to go on.
    async fn judge(
        &mut self,
        report: &CallReport,
        probation: &mut Option<u32>,
        kind: CallKind,
    ) -> Option<End> {
        if !report.outcome.is_finished() {
            let cause = format!("{kind}: {}", report.outcome);
            return Some(if probation.is_some() {
                End::ProbationFailed(cause)
            } else {
                End::Failed(cause)
            });
        }
        if let Some(left) = probation {
            let passed = match kind {
                CallKind::Init => {
                    *left == 0
                        || !self.prepared.has_tick()
                        || self.prepared.limits().tick_interval_ms == 0
                }
                CallKind::Tick => {
                    *left = left.saturating_sub(1);
                    *left == 0
                }
                CallKind::Message => false,
            };
            if passed {
                *probation = None;
                self.state(RunState::ProbationPassed).await;
            }
        }
        None
    }
}

/// A call's result that may carry a report (a message the module could not take carries none).
trait MaybeReport {
    fn report(&self) -> Option<&CallReport>;
}

impl MaybeReport for CallReport {
    fn report(&self) -> Option<&CallReport> {
        Some(self)
    }
}

impl<E> MaybeReport for Result<CallReport, E> {
    fn report(&self) -> Option<&CallReport> {
        self.as_ref().ok()
    }
}
