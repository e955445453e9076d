//! The supervisor's state: a pure state machine. It takes one [`Input`] at a time — an MQTT
//! message, a runner's report, the result of an effect it asked for, a timer tick, a reload,
//! shutdown — with the time, and returns the [`Effect`]s the shell must carry out: verify a
//! bundle, write the store, spawn or stop a runner, publish. It does no IO, reads no clock and
//! never waits: a runner told to stop reports its end later as an input, so the watchdog, a
//! removal or the status never wait on guest code. `daemon/mod.rs` is the shell.
//!
//! One lifecycle per module ([`Phase`]); what is persisted is the store's [`InstallState`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::config::Config;
use crate::core::keys::KeyId;
use crate::core::manifest::{Action as BundleAction, Caps, ChunkRef, Manifest, Sha256};
use crate::core::protocol::{self, Event, EventKind, LogRecord, ModuleState, ModuleStatus, Status};
use crate::core::reconcile::{Action, Offer, Reconciler};
use crate::core::text::printable;
use crate::core::topics::{Inbound, Scope, Topics};
use crate::core::trust::Policy;
use crate::runtime::runner::{CallKind, RunState, RunnerEvent};
use crate::runtime::{InstanceStats, PreparedModule};
use crate::store::{InstallState, ModuleRecord, StoredVersion};

/// The time an input happens at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Unix milliseconds (timestamps in reports).
    pub wall_ms: u64,
    /// Milliseconds on a monotonic clock (timers).
    pub mono_ms: u64,
}

/// A bundle that passed verification (and, for installs, compiled and checked against its
/// manifest and the board).
#[derive(Debug, Clone)]
pub struct Checked {
    /// The signed manifest.
    pub manifest: Manifest,
    /// The key that signed it.
    pub key_id: KeyId,
    /// The Wasm, for installs.
    pub wasm: Option<Arc<[u8]>>,
    /// The compiled module, for installs.
    pub prepared: Option<PreparedModule>,
    /// What the Wasm check left to remember ([`crate::engine::CheckedWasm::record`]), kept
    /// with the installed blob so that later starts of the module skip the check.
    pub check_record: Option<Vec<u8>>,
    /// The version of the trust document it was verified under (0: none, or simple mode).
    pub trust_version: u64,
    /// An install delivered in chunks whose Wasm is not assembled yet: its signed part (format
    /// 2), verified again with the Wasm once every chunk is in.
    pub awaiting_chunks: Option<Arc<[u8]>>,
}

/// The trust in effect, as far as the state needs it (trust-document mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrustView {
    /// The document's version (0: none accepted yet).
    pub version: u64,
    /// When it expires, unix seconds.
    pub expires_at: Option<u64>,
}

/// A trust document put in effect (the result of [`Effect::Trust`]).
#[derive(Debug, Clone)]
pub struct TrustOutcome {
    /// What it grants, for the verifier.
    pub policy: Arc<Policy>,
    /// Its version and expiry.
    pub view: TrustView,
    /// Module records it changed (revoked, or their rollback target dropped).
    pub changed: Vec<ModuleRecord>,
    /// The events recorded with it, with their ids.
    pub events: Vec<Event>,
}

/// A trust document refused (the result of [`Effect::Trust`]).
#[derive(Debug, Clone)]
pub struct TrustRefusal {
    /// Why.
    pub reason: String,
    /// The `trust_rejected` event recorded, with its id (none if it could not be recorded).
    pub events: Vec<Event>,
    /// False when it may pass later (the store failed): tried again when it is offered again.
    pub permanent: bool,
}

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What to tell the operator.
    pub reason: String,
    /// False when it may pass later (the store could not be read): evaluated again when it is
    /// offered again.
    pub permanent: bool,
}

/// A store operation, on one module, carried out in order with the others.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Install a new version on probation.
    Install {
        /// The manifest.
        manifest: Box<Manifest>,
        /// Its signer.
        key_id: KeyId,
        /// Its Wasm.
        wasm: Arc<[u8]>,
        /// The bundle's digest.
        bundle_sha256: Sha256,
        /// The record of the Wasm's check, kept beside the blob.
        check_record: Option<Vec<u8>>,
        /// The trust version it was verified under: the install is refused (and the bundle
        /// verified again) if another trust document came into effect meanwhile.
        trust_version: u64,
        /// Events written with it.
        events: Vec<Event>,
    },
    /// Snapshot the key-value store before a version on probation starts.
    BeginProbation {
        /// The version's seq.
        seq: u64,
    },
    /// Probation passed.
    Confirm {
        /// The version's seq.
        seq: u64,
        /// Events written with it.
        events: Vec<Event>,
    },
    /// Probation failed: back to the previous version, key-value store included.
    Rollback {
        /// Why.
        cause: String,
        /// Events written with it.
        events: Vec<Event>,
    },
    /// A signed removal.
    Remove {
        /// Its seq.
        seq: u64,
        /// The bundle's digest.
        bundle_sha256: Sha256,
        /// The bundle's `issued_at` (the time floor rises to it).
        issued_at: Option<u64>,
        /// The trust version it was verified under (as for an install).
        trust_version: u64,
        /// Events written with it.
        events: Vec<Event>,
    },
    /// A new persisted state.
    SetState {
        /// The state.
        state: InstallState,
        /// Events written with it.
        events: Vec<Event>,
    },
    /// Events not tied to a change (a rejection).
    PushEvents {
        /// The events.
        events: Vec<Event>,
    },
}

/// What a store operation returned.
#[derive(Debug, Clone)]
pub enum Stored {
    /// The module's record after the change.
    Record(Box<ModuleRecord>),
    /// After a rollback: the restored record, or none (no previous version: failed).
    RolledBack(Option<Box<ModuleRecord>>),
    /// Done; nothing to report.
    Done,
}

/// A store operation that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    /// Why.
    pub reason: String,
    /// The store can no longer be trusted (a change could not be made durable): the agent stops
    /// so that a restart reopens it.
    pub broken: bool,
}

/// Everything the state reacts to.
#[derive(Debug)]
pub enum Input {
    /// Connected to the broker (subscriptions sent).
    Connected,
    /// The connection dropped; it is retried.
    Disconnected(String),
    /// A message on a subscribed topic.
    Message {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A runner reported.
    Runner(RunnerEvent),
    /// The result of [`Effect::Verify`].
    Verified {
        /// The effect's ticket.
        ticket: u64,
        /// The bundle checked, or why not.
        result: Result<Box<Checked>, Rejection>,
    },
    /// The result of [`Effect::Prepare`].
    Prepared {
        /// The effect's ticket.
        ticket: u64,
        /// The compiled module, or why not.
        result: Result<Box<PreparedModule>, String>,
    },
    /// The result of [`Effect::Store`]: the outcome, and the events written (with their ids).
    Stored {
        /// The effect's ticket.
        ticket: u64,
        /// What happened.
        result: Result<(Stored, Vec<Event>), StoreFailure>,
    },
    /// The result of [`Effect::LoadOutbox`]: every event not yet seen on the broker.
    Outbox(Vec<Event>),
    /// [`Effect::Deliver`] could not queue the message (inbox full, too large, runner gone).
    Undelivered {
        /// The module.
        module: String,
        /// Why.
        reason: String,
    },
    /// [`Effect::Claim`] failed (another module drives one of the lines).
    ClaimRefused {
        /// The module.
        module: String,
        /// Why.
        reason: String,
    },
    /// The result of [`Effect::Trust`].
    Trust {
        /// The effect's ticket.
        ticket: u64,
        /// The document put in effect, or why not.
        result: Result<Box<TrustOutcome>, TrustRefusal>,
    },
    /// The result of [`Effect::PlanFetch`]: which chunks the device holds already.
    FetchPlanned {
        /// The effect's ticket.
        ticket: u64,
        /// The plan, or why the chunks could not be looked up (the store).
        result: Result<FetchPlan, String>,
    },
    /// The result of [`Effect::StageChunk`].
    ChunkStaged {
        /// The effect's ticket.
        ticket: u64,
        /// Staged, or why not.
        result: Result<(), ChunkFailure>,
    },
    /// The store's time floor (unix seconds), at start and whenever it rises.
    TimeFloor(u64),
    /// A key-value flush failed: the store can no longer be trusted.
    StoreBroken(String),
    /// Time passed (a timer of the shell, about once a second).
    Tick,
    /// A new configuration (trusted keys already loaded by the shell).
    Reload(Box<Config>),
    /// Stop: SIGTERM.
    Shutdown,
}

/// Quality of service of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Fire and forget.
    AtMostOnce,
    /// Acknowledged by the broker.
    AtLeastOnce,
}

/// Severity of a line for the agent's own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something is wrong.
    Warn,
    /// Normal operation.
    Info,
    /// Detail.
    Debug,
}

/// What the shell must do.
#[derive(Debug)]
pub enum Effect {
    /// Verify a bundle (for installs also compile it and check it against the board); answer
    /// with [`Input::Verified`].
    Verify {
        /// Ticket for the answer.
        ticket: u64,
        /// The bundle.
        offer: Offer,
    },
    /// Verify a trust document under the roots in effect and, if it passes, put it in effect
    /// in the store (revocations, seq resets, events); answer with [`Input::Trust`].
    Trust {
        /// Ticket for the answer.
        ticket: u64,
        /// The document.
        document: Arc<[u8]>,
    },
    /// Verify bundles under this policy from now on.
    Policy(Arc<Policy>),
    /// Find which of a fetch's chunks the device holds (staged by an earlier transfer, or in an
    /// installed version's Wasm, copied to the staging area); answer with
    /// [`Input::FetchPlanned`].
    PlanFetch {
        /// Ticket for the answer.
        ticket: u64,
        /// The module.
        module: String,
        /// Its chunks, in order.
        chunks: Arc<[ChunkRef]>,
    },
    /// Check a chunk against its digest and write it durably to the staging area of each of
    /// `modules`; answer with [`Input::ChunkStaged`].
    StageChunk {
        /// Ticket for the answer.
        ticket: u64,
        /// The digest its topic names.
        sha256: Sha256,
        /// The length the manifests list.
        size: u64,
        /// Its bytes as they arrived.
        bytes: Vec<u8>,
        /// The modules fetching it.
        modules: Vec<String>,
    },
    /// Every chunk is staged: assemble the Wasm, verify the signed part again with it, compile
    /// it; answer with [`Input::Verified`].
    Assemble {
        /// Ticket for the answer.
        ticket: u64,
        /// The module.
        module: String,
        /// The signed part.
        signed: Arc<[u8]>,
        /// The chunks, in order.
        chunks: Arc<[ChunkRef]>,
    },
    /// Drop a module's staging area.
    ClearStaging {
        /// The module.
        module: String,
    },
    /// Read a stored version's Wasm and compile it; answer with [`Input::Prepared`].
    Prepare {
        /// Ticket for the answer.
        ticket: u64,
        /// The version.
        version: Box<StoredVersion>,
    },
    /// Run a store operation after the ones asked for before; answer with [`Input::Stored`].
    Store {
        /// Ticket for the answer.
        ticket: u64,
        /// The module.
        module: String,
        /// What.
        op: Box<StoreOp>,
    },
    /// Start a runner (the shell opens the module's key-value store for it).
    Spawn {
        /// The runner's id.
        runner: u64,
        /// The module, compiled.
        prepared: PreparedModule,
        /// On probation.
        probation: bool,
    },
    /// Tell a runner to stop after its call in progress; its end comes back as a runner event.
    Stop {
        /// The runner.
        runner: u64,
    },
    /// An operator's restart of a live runner.
    Restart {
        /// The runner.
        runner: u64,
    },
    /// Queue a message for a runner's `on_message`.
    Deliver {
        /// The runner.
        runner: u64,
        /// The module (for [`Input::Undelivered`]).
        module: String,
        /// Topic below the module's inbox.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// The module drives the output lines its manifest grants.
    Claim {
        /// The module.
        module: String,
        /// Its capabilities.
        caps: Box<Caps>,
    },
    /// The module drives no line any more: they go to their safe state.
    Release {
        /// The module.
        module: String,
    },
    /// Publish.
    Publish {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
        /// QoS.
        qos: Qos,
        /// Retained.
        retain: bool,
    },
    /// The last will the connection registers at its next (re)connect.
    Will(Vec<u8>),
    /// Read the outbox; answer with [`Input::Outbox`].
    LoadOutbox,
    /// These events were seen on the broker: drop them from the outbox.
    AckEvents(Vec<u64>),
    /// Subscribe to a topic for a moment, to be sent its retained message again.
    Refetch {
        /// The topic.
        topic: String,
    },
    /// Subscribe on every connect to these (changes with the groups).
    Subscriptions {
        /// The filters.
        filters: Vec<String>,
        /// Those to subscribe to now.
        added: Vec<String>,
        /// Those to unsubscribe from now.
        removed: Vec<String>,
    },
    /// Use this configuration for verification and new instances.
    Reconfigure(Box<Config>),
    /// A line for the agent's own log.
    Log(Level, String),
    /// Every module started that could be: tell the service manager.
    Ready,
    /// A one-line summary for the service manager.
    Summary(String),
    /// Make everything durable (shutdown).
    Flush,
    /// Stop the process: `None` for a clean stop, `Some(reason)` to exit with an error.
    Exit(Option<String>),
}

/// How long a stopping agent waits for runners to end.
const SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Events published but not seen back on the broker are published again after this long.
const REPUBLISH_MS: u64 = 30_000;
/// Telemetry and logs kept while the broker is away: at most this many, this many bytes and this
/// old; the oldest go first.
const OUTBOUND_MAX_MESSAGES: usize = 512;
const OUTBOUND_MAX_BYTES: usize = 1 << 20;
const OUTBOUND_MAX_AGE_MS: u64 = 60_000;
/// A session closed this soon after its connect counts as short; this many short ones within
/// the window look like another client taking the session over.
const SHORT_SESSION_MS: u64 = 10_000;
const TAKEOVER_SESSIONS: usize = 3;
const TAKEOVER_WINDOW_MS: u64 = 120_000;

/// Where a module is. One lifecycle for all it goes through; the store keeps [`InstallState`].
#[derive(Debug, Clone)]
enum Phase {
    /// Compiling from the store before it starts.
    Preparing {
        ticket: u64,
        probation: bool,
        /// An operator asked for it (the state is set and `restarted` reported when it compiles).
        restart: Option<InstallState>,
    },
    /// A version waits for runner `old` (the one it replaces) to end.
    Waiting {
        old: u64,
        prepared: PreparedModule,
        probation: bool,
    },
    /// The key-value snapshot is being taken before a version on probation starts.
    Snapshotting { prepared: PreparedModule },
    /// Its runner is alive (between calls, in one, or backing off after a failure).
    Running { runner: u64, probation: bool },
    /// Probation failed; the store rolls back.
    RollingBack { cause: String },
    /// Not running: quarantined, failed, or could not start.
    Stopped { cause: String },
}

/// One installed module.
#[derive(Debug, Clone)]
struct Slot {
    record: ModuleRecord,
    phase: Phase,
    prepared: Option<PreparedModule>,
    stats: InstanceStats,
    restarts: u32,
    detail: Option<String>,
    last_error: Option<String>,
    inbox_dropped: u64,
}

impl Slot {
    fn new(record: ModuleRecord, phase: Phase) -> Self {
        Slot {
            record,
            phase,
            prepared: None,
            stats: InstanceStats::default(),
            restarts: 0,
            detail: None,
            last_error: None,
            inbox_dropped: 0,
        }
    }

    fn runner(&self) -> Option<u64> {
        match self.phase {
            Phase::Running { runner, .. } => Some(runner),
            _ => None,
        }
    }

    fn manifest(&self) -> &Manifest {
        &self.record.current.manifest
    }
}

/// What happens when a runner told to stop has ended.
#[derive(Debug, Clone)]
enum Then {
    /// Its lines go to their safe state.
    Release(String),
    /// The version waiting for it starts.
    Start(String),
    /// Nothing (shutdown).
    Nothing,
}

/// What a store or compile ticket is for.
#[derive(Debug, Clone)]
enum Pending {
    Evaluate {
        module: String,
        scope: Scope,
        sha256: Sha256,
        /// The trust epoch it was asked under.
        epoch: u64,
    },
    Peek {
        module: String,
        scope: Scope,
        hidden_by: Scope,
    },
    Replaced {
        module: String,
    },
    Install {
        module: String,
        sha256: Sha256,
        prepared: PreparedModule,
        caps: Box<Caps>,
        epoch: u64,
    },
    Remove {
        module: String,
        sha256: Sha256,
        epoch: u64,
    },
    Module(String),
    Events,
    Trust {
        sha256: Sha256,
    },
    FetchPlan {
        module: String,
        sha256: Sha256,
    },
    Stage,
    Assembled {
        module: String,
        scope: Scope,
        sha256: Sha256,
        epoch: u64,
    },
}

/// Telemetry and logs waiting for the broker.
#[derive(Debug, Default)]
struct Outbound {
    queue: VecDeque<(u64, String, Vec<u8>)>,
    bytes: usize,
    dropped: u64,
}

impl Outbound {
    fn push(&mut self, now: u64, topic: String, payload: Vec<u8>) {
        self.bytes += payload.len();
        self.queue.push_back((now, topic, payload));
        self.expire(now);
    }

    /// Drops the oldest until within the count, byte and age bounds.
    fn expire(&mut self, now: u64) {
        while let Some((at, _, payload)) = self.queue.front() {
            let over = self.queue.len() > OUTBOUND_MAX_MESSAGES
                || self.bytes > OUTBOUND_MAX_BYTES
                || now.saturating_sub(*at) > OUTBOUND_MAX_AGE_MS;
            if !over {
                break;
            }
            self.bytes -= payload.len();
            self.queue.pop_front();
            self.dropped += 1;
        }
    }
}

/// Watches the broker connection for a session that keeps being closed soon after it opens.
#[derive(Debug, Default)]
struct Session {
    since: Option<u64>,
    short: VecDeque<u64>,
    flapping: bool,
}

/// The supervisor's state.
#[derive(Debug)]
pub struct State {
    config: Config,
    topics: Topics,
    reconciler: Reconciler,
    slots: BTreeMap<String, Slot>,
    retiring: BTreeMap<u64, Then>,
    pending: BTreeMap<u64, Pending>,
    /// Boot-time preparations still running before READY.
    booting: usize,
    next_id: u64,
    connected: bool,
    session: Session,
    outbound: Outbound,
    /// Events published (or waiting for the broker), by id, with when they were last sent.
    unacked: BTreeMap<u64, (Event, Option<u64>)>,
    outbox_loaded: bool,
    /// The time of the input being handled.
    now: Now,
    started: Now,
    last_status_ms: Option<u64>,
    status_dirty: bool,
    stopping: Option<u64>,
    fatal: Option<String>,
    exited: bool,
    /// Trust-document mode: the trust in effect (`None`: simple mode).
    trust: Option<TrustView>,
    /// Bumped whenever a trust document comes into effect: a verification or an install asked
    /// under an older epoch is done again.
    trust_epoch: u64,
    /// The trust document being verified and applied, and the newest one offered meanwhile.
    trust_busy: bool,
    trust_next: Option<Arc<[u8]>>,
    /// The digest of the last trust document settled (accepted or refused for good).
    trust_seen: Option<Sha256>,
    /// The store's time floor, unix seconds.
    time_floor: u64,
    /// Versions being fetched in chunks, by module.
    fetches: BTreeMap<String, fetch::Fetch>,
    /// Chunks being checked and staged by the shell, by ticket.
    staging: BTreeMap<u64, Sha256>,
    /// Chunk topics subscribed to, by digest.
    subscribed_chunks: std::collections::BTreeSet<Sha256>,
    /// Chunk bytes received since start (refused ones too).
    fetched_bytes: u64,
    /// A fetch made progress since the last status report.
    fetch_progress: bool,
    /// Per module: the seq of its last install in chunks and the bytes it reused.
    reused: BTreeMap<String, (u64, u64)>,
}

impl State {
    /// The state at start: the configuration, the store's records and which bundle each module
    /// last settled on. Returns the effects that start every module the store says runs.
    pub fn new(
        config: Config,
        records: Vec<ModuleRecord>,
        settled: Vec<(String, Sha256)>,
        now: Now,
    ) -> Result<(State, Vec<Effect>), crate::core::topics::TopicError> {
        let topics = config.topics()?;
        let mut state = State {
            config,
            topics,
            reconciler: Reconciler::new(settled),
            slots: BTreeMap::new(),
            retiring: BTreeMap::new(),
            pending: BTreeMap::new(),
            booting: 0,
            next_id: 1,
            connected: false,
            session: Session::default(),
            outbound: Outbound::default(),
            unacked: BTreeMap::new(),
            outbox_loaded: false,
            now,
            started: now,
            last_status_ms: None,
            status_dirty: true,
            stopping: None,
            fatal: None,
            exited: false,
            trust: None,
            trust_epoch: 0,
            trust_busy: false,
            trust_next: None,
            trust_seen: None,
            time_floor: 0,
            fetches: BTreeMap::new(),
            staging: BTreeMap::new(),
            subscribed_chunks: Default::default(),
            fetched_bytes: 0,
            fetch_progress: false,
            reused: BTreeMap::new(),
        };
        let mut fx = Vec::new();
        for record in records {
            let name = record.name.clone();
            let phase = match &record.state {
                InstallState::Quarantined { cause } | InstallState::Failed { cause } => {
                    Phase::Stopped {
                        cause: cause.clone(),
                    }
                }
                InstallState::Revoked { key_id } => Phase::Stopped {
                    cause: trust::revoked_cause(key_id),
                },
                InstallState::Active | InstallState::Probation => {
                    let ticket = state.ticket(Pending::Module(name.clone()));
                    state.booting += 1;
                    fx.push(Effect::Prepare {
                        ticket,
                        version: Box::new(record.current.clone()),
                    });
                    Phase::Preparing {
                        ticket,
                        probation: record.state == InstallState::Probation,
                        restart: None,
                    }
                }
            };
            fx.push(Effect::Log(
                Level::Info,
                format!(
                    "module {name} {} (seq {}): {:?}",
                    record.current.manifest.version, record.current.manifest.seq, record.state
                ),
            ));
            let mut slot = Slot::new(record, phase);
            if let Phase::Stopped { cause } = &slot.phase {
                slot.last_error = Some(cause.clone());
            }
            state.slots.insert(name, slot);
        }
        if state.booting == 0 {
            fx.push(Effect::Ready);
        }
        fx.push(Effect::Summary(state.summary()));
        fx.extend(state.will(now));
        Ok((state, fx))
    }

    /// The configuration in effect.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the state asked to exit.
    pub fn exited(&self) -> bool {
        self.exited
    }

    /// Handles one input at time `now`.
    pub fn handle(&mut self, input: Input, now: Now) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.exited {
            return fx;
        }
        self.now = now;
        match input {
            Input::Connected => self.connected(now, &mut fx),
            Input::Disconnected(reason) => self.disconnected(&reason, now, &mut fx),
            Input::Message { topic, payload } => self.message(&topic, payload, now, &mut fx),
            Input::Runner(e) => self.runner_event(e, now, &mut fx),
            Input::Verified { ticket, result } => self.verified(ticket, result, now, &mut fx),
            Input::Prepared { ticket, result } => self.prepared(ticket, result, &mut fx),
            Input::Stored { ticket, result } => self.stored(ticket, result, now, &mut fx),
            Input::Outbox(events) => {
                for e in events {
                    self.unacked.entry(e.id).or_insert((e, None));
                }
                self.send_events(now, &mut fx);
            }
            Input::Undelivered { module, reason } => {
                if let Some(slot) = self.slots.get_mut(&module) {
                    slot.inbox_dropped += 1;
                    self.status_dirty = true;
                }
                fx.push(Effect::Log(Level::Warn, reason));
            }
            Input::ClaimRefused { module, reason } => {
                // Checked before the install; only a concurrent claim could intervene.
                fx.push(Effect::Log(
                    Level::Error,
                    format!("module {module}: hardware: {reason}"),
                ));
            }
            Input::Trust { ticket, result } => self.trust_done(ticket, result, now, &mut fx),
            Input::FetchPlanned { ticket, result } => {
                self.fetch_planned(ticket, result, now, &mut fx);
            }
            Input::ChunkStaged { ticket, result } => {
                self.chunk_staged(ticket, result, now, &mut fx);
            }
            Input::TimeFloor(floor) => {
                if floor != self.time_floor {
                    self.time_floor = floor;
                    self.status_dirty = true;
                }
            }
            Input::StoreBroken(reason) => {
                fx.push(Effect::Log(Level::Error, format!("store: {reason}")));
                if self.fatal.is_none() {
                    self.fatal = Some(reason);
                    self.shutdown(now, &mut fx);
                }
            }
            Input::Tick => self.tick(now, &mut fx),
            Input::Reload(config) => self.reload(*config, now, &mut fx),
            Input::Shutdown => self.shutdown(now, &mut fx),
        }
        self.finish(now, &mut fx);
        fx
    }

    fn ticket(&mut self, p: Pending) -> u64 {
        let t = self.next_id;
        self.next_id += 1;
        self.pending.insert(t, p);
        t
    }

    fn runner_id(&mut self) -> u64 {
        let t = self.next_id;
        self.next_id += 1;
        t
    }

    fn summary(&self) -> String {
        let running = self.slots.values().filter(|s| s.runner().is_some()).count();
        format!("{} modules installed, {running} running", self.slots.len())
    }

    /// An event about `module` at the time of the input being handled, with its log line.
    fn event(
        &self,
        kind: EventKind,
        module: &str,
        version: Option<String>,
        seq: Option<u64>,
        reason: Option<String>,
        fx: &mut Vec<Effect>,
    ) -> Event {
        let line = match &reason {
            Some(r) => format!("{} {module}: {}", kind.as_str(), printable(r)),
            None => format!("{} {module}", kind.as_str()),
        };
        let level = match kind {
            EventKind::Rejected
            | EventKind::RolledBack
            | EventKind::Failed
            | EventKind::Quarantined
            | EventKind::Outranked => Level::Warn,
            _ => Level::Info,
        };
        fx.push(Effect::Log(level, line));
        Event {
            id: 0,
            ts_ms: self.now.wall_ms,
            kind,
            module: module.to_string(),
            version,
            seq,
            reason,
        }
    }

    /// Store operation `op` on `module`, answered under `pending`.
    fn store(&mut self, module: &str, pending: Pending, op: StoreOp, fx: &mut Vec<Effect>) -> u64 {
        let ticket = self.ticket(pending);
        fx.push(Effect::Store {
            ticket,
            module: module.to_string(),
            op: Box::new(op),
        });
        ticket
    }

    fn push_events(&mut self, events: Vec<Event>, fx: &mut Vec<Effect>) {
        let module = events.first().map(|e| e.module.clone()).unwrap_or_default();
        self.store(&module, Pending::Events, StoreOp::PushEvents { events }, fx);
    }

    // ---- the broker ----

    fn connected(&mut self, now: Now, fx: &mut Vec<Effect>) {
        self.connected = true;
        self.session.since = Some(now.mono_ms);
        self.status_dirty = true;
        fx.push(Effect::Log(Level::Info, "connected to the broker".into()));
        if !self.outbox_loaded {
            // Events owed from before this run; this run's own are in `unacked`, published
            // again below (a reload of the outbox could race with their acknowledgements).
            self.outbox_loaded = true;
            fx.push(Effect::LoadOutbox);
        }
        self.send_events(now, fx);
        // What waited while the broker was away, oldest first, if still fresh enough.
        self.outbound.expire(now.mono_ms);
        for (_, topic, payload) in std::mem::take(&mut self.outbound.queue) {
            fx.push(Effect::Publish {
                topic,
                payload,
                qos: Qos::AtMostOnce,
                retain: false,
            });
        }
        self.outbound.bytes = 0;
    }

    fn disconnected(&mut self, reason: &str, now: Now, fx: &mut Vec<Effect>) {
        let was = std::mem::take(&mut self.connected);
        fx.push(Effect::Log(
            Level::Warn,
            format!("broker connection lost: {reason}"),
        ));
        // Events in flight go again on the next connect.
        for (_, sent) in self.unacked.values_mut() {
            *sent = None;
        }
        let Some(since) = self.session.since.take().filter(|_| was) else {
            return;
        };
        let s = &mut self.session;
        if now.mono_ms.saturating_sub(since) < SHORT_SESSION_MS {
            s.short.push_back(now.mono_ms);
        }
        while s
            .short
            .front()
            .is_some_and(|t| now.mono_ms.saturating_sub(*t) > TAKEOVER_WINDOW_MS)
        {
            s.short.pop_front();
        }
        if s.short.len() >= TAKEOVER_SESSIONS && !s.flapping {
            s.flapping = true;
            self.status_dirty = true;
            fx.push(Effect::Log(
                Level::Error,
                format!(
                    "the broker closed this session {} times within {} s of connecting: another \
                     client may be connecting with client id {:?} (a session takeover); check the \
                     broker's `use_username_as_clientid` and which certificates it accepts",
                    s.short.len(),
                    TAKEOVER_WINDOW_MS / 1000,
                    self.config.device_id
                ),
            ));
        }
    }

    fn message(&mut self, topic: &str, payload: Vec<u8>, now: Now, fx: &mut Vec<Effect>) {
        if topic == self.topics.events() {
            // Our own event, back from the broker: it is delivered.
            if let Ok(e) = protocol::from_cbor::<Event>(&payload)
                && self.unacked.remove(&e.id).is_some()
            {
                fx.push(Effect::AckEvents(vec![e.id]));
            }
            return;
        }
        match self.topics.parse(topic) {
            Some(Inbound::Desired { scope, module }) => {
                if self.stopping.is_some() {
                    return;
                }
                let actions = self.reconciler.offered(scope, &module, &payload);
                self.act(actions, now, fx);
                self.check_fetches(now, fx);
            }
            Some(Inbound::Inbox { module, topic }) => match self.slots.get_mut(&module) {
                Some(slot) => match slot.runner() {
                    Some(runner) => fx.push(Effect::Deliver {
                        runner,
                        module,
                        topic,
                        payload,
                    }),
                    None => {
                        slot.inbox_dropped += 1;
                        self.status_dirty = true;
                    }
                },
                None => fx.push(Effect::Log(
                    Level::Debug,
                    format!("message for module {module}, which is not installed: dropped"),
                )),
            },
            Some(Inbound::Restart { module }) => self.operator_restart(&module, fx),
            Some(Inbound::Trust) => self.trust_offered(payload, fx),
            Some(Inbound::Chunk { sha256 }) => self.chunk_arrived(sha256, payload, now, fx),
            None => fx.push(Effect::Log(
                Level::Debug,
                format!("ignoring a message on {}", printable(topic)),
            )),
        }
    }

    fn act(&mut self, actions: Vec<Action>, now: Now, fx: &mut Vec<Effect>) {
        for action in actions {
            match action {
                Action::Evaluate {
                    module,
                    scope,
                    offer,
                } => {
                    let sha256 = offer.sha256;
                    let epoch = self.trust_epoch;
                    let ticket = self.ticket(Pending::Evaluate {
                        module,
                        scope,
                        sha256,
                        epoch,
                    });
                    fx.push(Effect::Verify { ticket, offer });
                }
                Action::Refetch { module, scope } => {
                    let topic = match &scope {
                        Scope::Device => self.topics.device_desired(&module),
                        Scope::Group(_, g) => {
                            Topics::group_desired(&self.config.mqtt.topic_prefix, g, &module)
                        }
                    };
                    fx.push(Effect::Refetch { topic });
                }
                Action::Replaced { module, offer, .. } => {
                    let ticket = self.ticket(Pending::Replaced { module });
                    fx.push(Effect::Verify { ticket, offer });
                }
                Action::Hidden {
                    module,
                    scope,
                    hidden_by,
                    offer,
                } => {
                    let ticket = self.ticket(Pending::Peek {
                        module,
                        scope,
                        hidden_by,
                    });
                    fx.push(Effect::Verify { ticket, offer });
                }
            }
        }
        let _ = now;
    }

    // ---- verification ----

    fn verified(
        &mut self,
        ticket: u64,
        result: Result<Box<Checked>, Rejection>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        match self.pending.remove(&ticket) {
            Some(Pending::Evaluate {
                module,
                sha256,
                epoch,
                ..
            }) if epoch != self.trust_epoch => {
                // Verified under a trust document no longer in effect: again, under this one.
                self.reevaluate(&module, sha256, now, fx);
            }
            Some(Pending::Evaluate {
                module,
                scope,
                sha256,
                ..
            }) => self.evaluated(module, scope, sha256, result, now, fx),
            Some(Pending::Peek {
                module,
                scope,
                hidden_by,
            }) => self.peeked(&module, &scope, &hidden_by, result, fx),
            Some(Pending::Assembled {
                module,
                scope,
                sha256,
                epoch,
            }) => self.assembled(module, scope, sha256, epoch, result, now, fx),
            Some(Pending::Replaced { module }) => {
                // A bundle replaced on its topic before it was looked at: it gets its verdict.
                let e = match result {
                    Ok(c) => self.event(
                        EventKind::Superseded,
                        &module,
                        Some(c.manifest.version.clone()),
                        Some(c.manifest.seq),
                        Some(
                            "replaced on its topic by a newer bundle before it was installed"
                                .into(),
                        ),
                        fx,
                    ),
                    Err(r) => {
                        self.event(EventKind::Rejected, &module, None, None, Some(r.reason), fx)
                    }
                };
                self.push_events(vec![e], fx);
            }
            _ => {}
        }
    }

    fn evaluated(
        &mut self,
        module: String,
        scope: Scope,
        sha256: Sha256,
        result: Result<Box<Checked>, Rejection>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let source = match &scope {
            Scope::Device => String::new(),
            Scope::Group(_, g) => format!(" (from group {g})"),
        };
        let checked = match result.and_then(|c| {
            if c.manifest.name == module {
                Ok(c)
            } else {
                Err(Rejection {
                    reason: format!(
                        "the bundle is for module {:?} but was published on the desired topic \
                         of {module:?}",
                        c.manifest.name
                    ),
                    permanent: true,
                })
            }
        }) {
            Ok(c) => c,
            Err(rejection) => {
                let e = self.event(
                    EventKind::Rejected,
                    &module,
                    None,
                    None,
                    Some(format!("{}{source}", rejection.reason)),
                    fx,
                );
                self.push_events(vec![e], fx);
                if rejection.permanent {
                    let next = self.reconciler.settled(&module, sha256);
                    self.act(next, now, fx);
                } else {
                    self.reconciler.abandoned(&module, sha256);
                }
                return;
            }
        };
        if let Some(signed) = checked.awaiting_chunks.clone() {
            self.start_fetch(module, scope, sha256, signed, &checked.manifest, now, fx);
            return;
        }
        let Checked {
            manifest,
            key_id,
            wasm,
            prepared,
            check_record,
            trust_version,
            awaiting_chunks: _,
        } = *checked;
        match (manifest.action, wasm, prepared) {
            (BundleAction::Remove, _, _) => {
                let version = self
                    .slots
                    .get(&module)
                    .map(|s| s.manifest().version.clone());
                let e = self.event(
                    EventKind::Removed,
                    &module,
                    version,
                    Some(manifest.seq),
                    None,
                    fx,
                );
                self.store(
                    &module,
                    Pending::Remove {
                        module: module.clone(),
                        sha256,
                        epoch: self.trust_epoch,
                    },
                    StoreOp::Remove {
                        seq: manifest.seq,
                        bundle_sha256: sha256,
                        issued_at: manifest.issued_at,
                        trust_version,
                        events: vec![e],
                    },
                    fx,
                );
            }
            (BundleAction::Install, Some(wasm), Some(prepared)) => {
                let mut events = Vec::new();
                // A version still on probation that this one replaces never gets its verdict.
                if let Some(slot) = self.slots.get(&module)
                    && slot.record.state == InstallState::Probation
                {
                    let m = slot.manifest().clone();
                    events.push(self.event(
                        EventKind::Superseded,
                        &module,
                        Some(m.version),
                        Some(m.seq),
                        Some(format!(
                            "replaced by {} (seq {}) before its probation ended",
                            manifest.version, manifest.seq
                        )),
                        fx,
                    ));
                }
                let caps = Box::new(manifest.caps.clone());
                let epoch = self.trust_epoch;
                self.store(
                    &module,
                    Pending::Install {
                        module: module.clone(),
                        sha256,
                        prepared,
                        caps,
                        epoch,
                    },
                    StoreOp::Install {
                        manifest: Box::new(manifest),
                        key_id,
                        wasm,
                        bundle_sha256: sha256,
                        check_record,
                        trust_version,
                        events,
                    },
                    fx,
                );
            }
            (BundleAction::Install, _, _) => {
                let e = self.event(
                    EventKind::Rejected,
                    &module,
                    None,
                    None,
                    Some("internal: an install without its compiled module".into()),
                    fx,
                );
                self.push_events(vec![e], fx);
                self.reconciler.abandoned(&module, sha256);
            }
        }
    }

    /// A hidden offer, verified: reported when it is newer than what hides it.
    fn peeked(
        &mut self,
        module: &str,
        scope: &Scope,
        hidden_by: &Scope,
        result: Result<Box<Checked>, Rejection>,
        fx: &mut Vec<Effect>,
    ) {
        let Ok(c) = result else {
            return;
        };
        let Some(installed) = self.slots.get(module).map(|s| s.manifest().seq) else {
            return;
        };
        if c.manifest.name != module || c.manifest.seq <= installed {
            return;
        }
        let from = match scope {
            Scope::Device => "this device's topic".to_string(),
            Scope::Group(_, g) => format!("group {g}"),
        };
        let by = match hidden_by {
            Scope::Device => "the device-addressed bundle".to_string(),
            Scope::Group(_, g) => format!("group {g}'s bundle"),
        };
        let e = self.event(
            EventKind::Outranked,
            module,
            Some(c.manifest.version.clone()),
            Some(c.manifest.seq),
            Some(format!(
                "{from} offers seq {}, newer than the installed seq {installed}, but {by} \
                 outranks it",
                c.manifest.seq
            )),
            fx,
        );
        self.push_events(vec![e], fx);
    }

    // ---- results of store and compile effects ----

    fn stored(
        &mut self,
        ticket: u64,
        result: Result<(Stored, Vec<Event>), StoreFailure>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let Some(pending) = self.pending.remove(&ticket) else {
            return;
        };
        let (stored, events) = match result {
            Ok(r) => r,
            Err(failure) => {
                self.store_failed(pending, failure, now, fx);
                return;
            }
        };
        for e in events {
            self.unacked.insert(e.id, (e, None));
        }
        self.send_events(now, fx);
        match (pending, stored) {
            (
                Pending::Install {
                    module,
                    sha256,
                    prepared,
                    caps,
                    ..
                },
                Stored::Record(record),
            ) => {
                fx.push(Effect::Log(
                    Level::Info,
                    format!(
                        "module {module}: seq {} stored, starting on probation",
                        record.current.manifest.seq
                    ),
                ));
                fx.push(Effect::Claim {
                    module: module.clone(),
                    caps,
                });
                let next = self.reconciler.settled(&module, sha256);
                let old = self.slots.get(&module).and_then(Slot::runner);
                let slot = self.slots.entry(module.clone()).or_insert_with(|| {
                    Slot::new(
                        (*record).clone(),
                        Phase::Stopped {
                            cause: String::new(),
                        },
                    )
                });
                slot.record = *record;
                slot.last_error = None;
                slot.prepared = Some(prepared.clone());
                match (old, &slot.phase) {
                    (Some(old), _) => {
                        // Committed; now the old runner goes, and the new one starts when it
                        // has ended (the key-value store and the lines are then free).
                        slot.phase = Phase::Waiting {
                            old,
                            prepared,
                            probation: true,
                        };
                        fx.push(Effect::Stop { runner: old });
                        self.retiring.insert(old, Then::Start(module.clone()));
                    }
                    // A version that had not started yet (waiting for the runner before it, or
                    // for its snapshot) gives way to this one, which starts in its place.
                    (None, Phase::Waiting { old, .. }) => {
                        slot.phase = Phase::Waiting {
                            old: *old,
                            prepared,
                            probation: true,
                        };
                    }
                    (None, Phase::Snapshotting { .. }) => {
                        slot.phase = Phase::Snapshotting { prepared };
                    }
                    (None, _) => self.start(&module, prepared, true, fx),
                }
                self.status_dirty = true;
                self.act(next, now, fx);
            }
            (Pending::Remove { module, sha256, .. }, _) => {
                // Committed; then the runner is told to stop and its lines go to their safe
                // state once it has ended. Nothing it publishes from now on is sent.
                if let Some(slot) = self.slots.remove(&module) {
                    match (slot.runner(), slot.phase) {
                        (Some(runner), _) => {
                            fx.push(Effect::Stop { runner });
                            self.retiring.insert(runner, Then::Release(module.clone()));
                        }
                        (None, Phase::Waiting { old, .. }) => {
                            self.retiring.insert(old, Then::Release(module.clone()));
                        }
                        (None, _) => fx.push(Effect::Release {
                            module: module.clone(),
                        }),
                    }
                }
                self.status_dirty = true;
                let next = self.reconciler.settled(&module, sha256);
                self.act(next, now, fx);
            }
            (Pending::Module(module), stored) => self.module_stored(&module, stored, now, fx),
            _ => {}
        }
    }

    fn store_failed(
        &mut self,
        pending: Pending,
        failure: StoreFailure,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        fx.push(Effect::Log(
            Level::Error,
            format!("store: {}", failure.reason),
        ));
        if failure.broken && self.fatal.is_none() {
            self.fatal = Some(failure.reason.clone());
            self.shutdown(now, fx);
        }
        match pending {
            Pending::Install {
                module,
                sha256,
                epoch,
                ..
            }
            | Pending::Remove {
                module,
                sha256,
                epoch,
            } if epoch != self.trust_epoch && !failure.broken => {
                // A trust document came into effect after the bundle was verified.
                self.reevaluate(&module, sha256, now, fx);
            }
            Pending::Install { module, sha256, .. } | Pending::Remove { module, sha256, .. } => {
                let e = self.event(
                    EventKind::Rejected,
                    &module,
                    None,
                    None,
                    Some(format!(
                        "storage failed, the running version is untouched: {}",
                        failure.reason
                    )),
                    fx,
                );
                if !failure.broken {
                    self.push_events(vec![e], fx);
                }
                self.reconciler.abandoned(&module, sha256);
            }
            Pending::Module(module) => {
                if let Some(slot) = self.slots.get_mut(&module) {
                    slot.last_error = Some(format!("storage failed: {}", failure.reason));
                    match std::mem::replace(
                        &mut slot.phase,
                        Phase::Stopped {
                            cause: String::new(),
                        },
                    ) {
                        // A snapshot that could not be taken: the version does not start.
                        Phase::Snapshotting { .. } | Phase::RollingBack { .. } => {
                            slot.phase = Phase::Stopped {
                                cause: format!("storage failed: {}", failure.reason),
                            };
                        }
                        other => slot.phase = other,
                    }
                }
                self.status_dirty = true;
            }
            _ => {}
        }
    }

    fn module_stored(&mut self, module: &str, stored: Stored, now: Now, fx: &mut Vec<Effect>) {
        let Some(slot) = self.slots.get_mut(module) else {
            return;
        };
        self.status_dirty = true;
        match (
            std::mem::replace(
                &mut slot.phase,
                Phase::Stopped {
                    cause: String::new(),
                },
            ),
            stored,
        ) {
            (Phase::Snapshotting { prepared, .. }, _) => self.spawn(module, prepared, true, fx),
            (Phase::RollingBack { cause, .. }, Stored::RolledBack(Some(record))) => {
                slot.record = (*record).clone();
                slot.detail = None;
                slot.last_error = Some(cause);
                // The failed version's lines go to their safe state; the restored version
                // claims its own when it compiles.
                fx.push(Effect::Release {
                    module: module.to_string(),
                });
                let ticket = self.ticket(Pending::Module(module.to_string()));
                if let Some(slot) = self.slots.get_mut(module) {
                    slot.phase = Phase::Preparing {
                        ticket,
                        probation: false,
                        restart: None,
                    };
                }
                fx.push(Effect::Prepare {
                    ticket,
                    version: Box::new(record.current),
                });
            }
            (Phase::RollingBack { cause, .. }, Stored::RolledBack(None)) => {
                slot.record.state = InstallState::Failed {
                    cause: cause.clone(),
                };
                slot.last_error = Some(cause.clone());
                slot.detail = None;
                slot.phase = Phase::Stopped { cause };
                fx.push(Effect::Release {
                    module: module.to_string(),
                });
            }
            (phase, Stored::Record(record)) => {
                slot.record = *record;
                slot.phase = phase;
                if slot.record.state == InstallState::Active
                    && matches!(
                        slot.phase,
                        Phase::Running {
                            probation: true,
                            ..
                        }
                    )
                    && let Phase::Running { runner, .. } = slot.phase
                {
                    slot.phase = Phase::Running {
                        runner,
                        probation: false,
                    };
                    slot.detail = None;
                }
            }
            (phase, _) => slot.phase = phase,
        }
        let _ = now;
    }

    fn prepared(
        &mut self,
        ticket: u64,
        result: Result<Box<PreparedModule>, String>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(Pending::Module(module)) = self.pending.remove(&ticket) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(&module) else {
            return;
        };
        let Phase::Preparing {
            ticket: expected,
            probation,
            restart,
        } = slot.phase.clone()
        else {
            return;
        };
        if expected != ticket {
            return;
        }
        match result {
            Ok(prepared) => {
                let prepared = *prepared;
                slot.prepared = Some(prepared.clone());
                fx.push(Effect::Claim {
                    module: module.clone(),
                    caps: Box::new(slot.manifest().caps.clone()),
                });
                if let Some(state) = restart.clone() {
                    // An operator's restart: persisted first (a Failed version goes back on
                    // probation, since it never passed one), then it starts.
                    let seq = slot.manifest().seq;
                    let e = self.event(EventKind::Restarted, &module, None, Some(seq), None, fx);
                    let slot = self
                        .slots
                        .get_mut(&module)
                        .unwrap_or_else(|| unreachable!());
                    slot.record.state = state.clone();
                    slot.last_error = None;
                    self.store(
                        &module,
                        Pending::Module(module.clone()),
                        StoreOp::SetState {
                            state,
                            events: vec![e],
                        },
                        fx,
                    );
                }
                self.start(&module, prepared, probation, fx);
            }
            Err(reason) => {
                slot.last_error = Some(reason.clone());
                slot.phase = Phase::Stopped {
                    cause: reason.clone(),
                };
                fx.push(Effect::Log(
                    Level::Error,
                    format!("module {module}: cannot start: {}", printable(&reason)),
                ));
                if restart.is_some() {
                    let seq = slot.manifest().seq;
                    let e = self.event(
                        EventKind::Failed,
                        &module,
                        None,
                        Some(seq),
                        Some(format!("restart refused: {reason}")),
                        fx,
                    );
                    self.push_events(vec![e], fx);
                }
            }
        }
        if restart.is_none() && self.booting > 0 {
            self.booting -= 1;
            if self.booting == 0 {
                fx.push(Effect::Ready);
            }
        }
        self.status_dirty = true;
    }

    /// Starts `prepared`: on probation after the key-value snapshot, otherwise at once.
    fn start(
        &mut self,
        module: &str,
        prepared: PreparedModule,
        probation: bool,
        fx: &mut Vec<Effect>,
    ) {
        if self.stopping.is_some() {
            return;
        }
        if probation {
            let seq = self.slots.get(module).map_or(0, |s| s.manifest().seq);
            self.store(
                module,
                Pending::Module(module.to_string()),
                StoreOp::BeginProbation { seq },
                fx,
            );
            if let Some(slot) = self.slots.get_mut(module) {
                slot.phase = Phase::Snapshotting { prepared };
            }
        } else {
            self.spawn(module, prepared, false, fx);
        }
    }

    fn spawn(
        &mut self,
        module: &str,
        prepared: PreparedModule,
        probation: bool,
        fx: &mut Vec<Effect>,
    ) {
        let runner = self.runner_id();
        if let Some(slot) = self.slots.get_mut(module) {
            slot.phase = Phase::Running { runner, probation };
            slot.stats = InstanceStats::default();
            slot.detail = probation.then(|| "on probation".to_string());
            fx.push(Effect::Spawn {
                runner,
                prepared,
                probation,
            });
            self.status_dirty = true;
        }
    }

    // ---- runners ----

    fn runner_event(&mut self, e: RunnerEvent, now: Now, fx: &mut Vec<Effect>) {
        match e {
            RunnerEvent::Calling { .. } => {}
            RunnerEvent::Dropped { module, .. } => {
                if let Some(slot) = self.slots.get_mut(&module) {
                    slot.inbox_dropped += 1;
                    self.status_dirty = true;
                }
            }
            RunnerEvent::Called {
                id,
                module,
                call,
                report,
                stats,
            } => {
                // Only the module's current runner is heard: nothing a removed or replaced
                // version publishes appears after its removal or replacement.
                let Some(slot) = self
                    .slots
                    .get_mut(&module)
                    .filter(|s| s.runner() == Some(id))
                else {
                    return;
                };
                slot.stats = stats;
                if !report.outcome.is_finished() {
                    slot.last_error = Some(format!("{call}: {}", report.outcome));
                    self.status_dirty = true;
                }
                if call == CallKind::Init {
                    self.status_dirty = true;
                }
                for m in &report.messages {
                    let topic = self.topics.telemetry(&module, &m.topic);
                    self.publish_telemetry(topic, m.payload.clone(), now, fx);
                }
                if let Some(summary) = &report.refusal_summary {
                    fx.push(Effect::Log(
                        Level::Warn,
                        format!("module {module}: {}", printable(&summary.text)),
                    ));
                }
                for line in report.logs.iter().chain(&report.refusal_summary) {
                    let payload = protocol::to_cbor(&LogRecord {
                        ts_ms: now.wall_ms,
                        level: line.level,
                        text: line.text.clone(),
                    });
                    fx.push(Effect::Log(
                        Level::Debug,
                        format!("module {module}: {} {}", line.level, printable(&line.text)),
                    ));
                    let topic = self.topics.logs(&module);
                    self.publish_telemetry(topic, payload, now, fx);
                }
            }
            RunnerEvent::State {
                id,
                module,
                state,
                restarts,
            } => self.runner_state(id, &module, state, restarts, now, fx),
        }
    }

    fn runner_state(
        &mut self,
        id: u64,
        module: &str,
        state: RunState,
        restarts: u32,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let ended = matches!(
            state,
            RunState::Stopped | RunState::ProbationFailed { .. } | RunState::Failed { .. }
        );
        if let Some(then) = ended.then(|| self.retiring.remove(&id)).flatten() {
            self.retired(then, now, fx);
            return;
        }
        let Some(slot) = self
            .slots
            .get_mut(module)
            .filter(|s| s.runner() == Some(id))
        else {
            return;
        };
        slot.restarts = restarts;
        self.status_dirty = true;
        match state {
            RunState::Running => {
                if let Phase::Running { probation, .. } = slot.phase {
                    slot.detail = probation.then(|| "on probation".to_string());
                }
            }
            RunState::BackingOff { delay_ms, cause } => {
                slot.detail = Some(format!("restarting in {delay_ms} ms"));
                slot.last_error = Some(cause);
            }
            RunState::ProbationPassed => {
                // Still "on probation" in the status until the store has confirmed it.
                let m = slot.manifest().clone();
                let e = self.event(
                    EventKind::Installed,
                    module,
                    Some(m.version),
                    Some(m.seq),
                    None,
                    fx,
                );
                self.store(
                    module,
                    Pending::Module(module.to_string()),
                    StoreOp::Confirm {
                        seq: m.seq,
                        events: vec![e],
                    },
                    fx,
                );
            }
            RunState::ProbationFailed { cause } => {
                // The runner has ended by itself: the store rolls back, key-value data included.
                let m = slot.manifest().clone();
                let restore = slot.record.previous.clone();
                let (kind, reason) = match &restore {
                    Some(p) => (
                        EventKind::RolledBack,
                        format!(
                            "{cause}; running {} (seq {}) again",
                            p.manifest.version, p.manifest.seq
                        ),
                    ),
                    None => (
                        EventKind::Failed,
                        format!("{cause}; no previous version to restore"),
                    ),
                };
                let e = self.event(kind, module, Some(m.version), Some(m.seq), Some(reason), fx);
                self.store(
                    module,
                    Pending::Module(module.to_string()),
                    StoreOp::Rollback {
                        cause: cause.clone(),
                        events: vec![e],
                    },
                    fx,
                );
                if let Some(slot) = self.slots.get_mut(module) {
                    slot.phase = Phase::RollingBack { cause };
                    slot.detail = None;
                }
            }
            RunState::Quarantined { cause, failures } => {
                let reason = format!("{failures} failures in the window, last: {cause}");
                let seq = slot.manifest().seq;
                slot.detail = None;
                slot.last_error = Some(cause);
                slot.phase = Phase::Stopped {
                    cause: reason.clone(),
                };
                slot.record.state = InstallState::Quarantined {
                    cause: reason.clone(),
                };
                fx.push(Effect::Stop { runner: id });
                self.retiring.insert(id, Then::Release(module.to_string()));
                let e = self.event(
                    EventKind::Quarantined,
                    module,
                    None,
                    Some(seq),
                    Some(reason.clone()),
                    fx,
                );
                self.store(
                    module,
                    Pending::Module(module.to_string()),
                    StoreOp::SetState {
                        state: InstallState::Quarantined { cause: reason },
                        events: vec![e],
                    },
                    fx,
                );
            }
            RunState::Failed { cause }
                if matches!(
                    slot.phase,
                    Phase::Running {
                        probation: true,
                        ..
                    }
                ) =>
            {
                // A version on probation that cannot even be instantiated failed its probation.
                self.runner_state(
                    id,
                    module,
                    RunState::ProbationFailed { cause },
                    restarts,
                    now,
                    fx,
                );
            }
            RunState::Failed { cause } => {
                slot.last_error = Some(cause.clone());
                slot.detail = None;
                slot.phase = Phase::Stopped { cause };
                fx.push(Effect::Release {
                    module: module.to_string(),
                });
            }
            RunState::Stopped => {
                slot.phase = Phase::Stopped {
                    cause: "stopped".into(),
                };
                fx.push(Effect::Release {
                    module: module.to_string(),
                });
            }
        }
    }

    /// A runner told to stop has ended.
    fn retired(&mut self, then: Then, _now: Now, fx: &mut Vec<Effect>) {
        match then {
            Then::Release(module) => {
                // Unless the module came back meanwhile (installed again) and drives its lines.
                if self.slots.get(&module).is_none_or(|s| s.runner().is_none()) {
                    fx.push(Effect::Release { module });
                }
            }
            Then::Start(module) => {
                if let Some(slot) = self.slots.get_mut(&module)
                    && let Phase::Waiting {
                        prepared,
                        probation,
                        ..
                    } = slot.phase.clone()
                {
                    self.start(&module, prepared, probation, fx);
                }
            }
            Then::Nothing => {}
        }
        self.status_dirty = true;
    }

    fn operator_restart(&mut self, module: &str, fx: &mut Vec<Effect>) {
        let Some(slot) = self.slots.get_mut(module) else {
            fx.push(Effect::Log(
                Level::Warn,
                format!("restart of module {module}, which is not installed: ignored"),
            ));
            return;
        };
        match &slot.phase {
            Phase::Running { runner, .. } => {
                let runner = *runner;
                let seq = slot.manifest().seq;
                fx.push(Effect::Restart { runner });
                let e = self.event(EventKind::Restarted, module, None, Some(seq), None, fx);
                self.push_events(vec![e], fx);
            }
            Phase::Stopped { .. } if matches!(slot.record.state, InstallState::Revoked { .. }) => {
                let seq = slot.manifest().seq;
                let reason = format!(
                    "restart refused: {}; a bundle signed by a valid key replaces it",
                    slot.last_error.clone().unwrap_or_default()
                );
                let e = self.event(EventKind::Failed, module, None, Some(seq), Some(reason), fx);
                self.push_events(vec![e], fx);
            }
            Phase::Stopped { .. } => {
                // A version that failed its probation never passed one: it restarts on
                // probation. A quarantined or stopped one restarts as it was.
                let (state, probation) = match slot.record.state {
                    InstallState::Failed { .. } | InstallState::Probation => {
                        (InstallState::Probation, true)
                    }
                    _ => (InstallState::Active, false),
                };
                let version = Box::new(slot.record.current.clone());
                let ticket = self.ticket(Pending::Module(module.to_string()));
                if let Some(slot) = self.slots.get_mut(module) {
                    slot.phase = Phase::Preparing {
                        ticket,
                        probation,
                        restart: Some(state),
                    };
                }
                fx.push(Effect::Prepare { ticket, version });
            }
            _ => fx.push(Effect::Log(
                Level::Warn,
                format!(
                    "restart of module {module}: it is being installed or rolled back; ignored"
                ),
            )),
        }
    }

    // ---- publishing ----

    fn publish_telemetry(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let packet = payload.len() + topic.len() + crate::core::topics::PUBLISH_OVERHEAD;
        if packet > self.config.mqtt.max_packet_bytes {
            // A broker with a packet limit (AWS IoT Core: 128 KiB) closes the connection of a
            // client that sends more: dropped here, counted, said once per message.
            self.outbound.dropped += 1;
            self.status_dirty = true;
            fx.push(Effect::Log(
                Level::Warn,
                format!(
                    "a {}-byte message on {} is above mqtt.max_packet_bytes ({}): dropped",
                    payload.len(),
                    printable(&topic),
                    self.config.mqtt.max_packet_bytes
                ),
            ));
            return;
        }
        if self.connected {
            fx.push(Effect::Publish {
                topic,
                payload,
                qos: Qos::AtMostOnce,
                retain: false,
            });
        } else {
            self.outbound.push(now.mono_ms, topic, payload);
            self.status_dirty = true;
        }
    }

    /// Publishes events not yet published in this session (all of them after a connect).
    fn send_events(&mut self, now: Now, fx: &mut Vec<Effect>) {
        if !self.connected {
            return;
        }
        let topic = self.topics.events();
        for (e, sent) in self.unacked.values_mut() {
            let due = sent.is_none_or(|t| now.mono_ms.saturating_sub(t) >= REPUBLISH_MS);
            if due {
                *sent = Some(now.mono_ms);
                fx.push(Effect::Publish {
                    topic: topic.clone(),
                    payload: protocol::to_cbor(e),
                    qos: Qos::AtLeastOnce,
                    retain: false,
                });
            }
        }
    }

    fn status(&self, online: bool, now: Now) -> Status {
        Status {
            device: self.topics.device().to_string(),
            online,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: now.mono_ms.saturating_sub(self.started.mono_ms) / 1000,
            ts_ms: now.wall_ms,
            started_ms: self.started.wall_ms,
            modules: {
                let mut modules = self.module_statuses();
                self.fetch_statuses(&mut modules, now);
                modules
            },
            dropped_messages: self.outbound.dropped,
            fetched_bytes: self.fetched_bytes,
            broker_note: self.session.flapping.then(|| {
                "the broker keeps closing this session soon after it connects: another client \
                 may be using this device's client id"
                    .to_string()
            }),
            trust_version: self.trust.map(|t| t.version),
            trust_note: self.trust_note(now),
            clock_behind_s: self.clock_behind_s(now),
        }
    }

    fn module_statuses(&self) -> Vec<ModuleStatus> {
        self.slots
            .values()
            .map(|s| {
                let state = match (&s.record.state, &s.phase) {
                    (InstallState::Revoked { .. }, Phase::Stopped { .. }) => ModuleState::Revoked,
                    (InstallState::Quarantined { .. }, _) => ModuleState::Quarantined,
                    (InstallState::Failed { .. }, Phase::Stopped { .. }) => ModuleState::Failed,
                    (_, Phase::Running { .. }) => ModuleState::Running,
                    (_, Phase::Stopped { cause }) if !cause.is_empty() && cause != "stopped" => {
                        ModuleState::Failed
                    }
                    _ => ModuleState::Stopped,
                };
                let detail = match &s.phase {
                    Phase::Preparing { .. } => Some("starting".to_string()),
                    Phase::Waiting { .. } => {
                        Some("waiting for the previous version to stop".into())
                    }
                    Phase::Snapshotting { .. } => Some("starting on probation".into()),
                    Phase::RollingBack { .. } => Some("rolling back".into()),
                    _ => s.detail.clone(),
                };
                let m = s.manifest();
                ModuleStatus {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    seq: m.seq,
                    state,
                    detail,
                    restarts: s.restarts,
                    calls: s.stats.calls,
                    fuel_last: s.stats.fuel_last,
                    fuel_total: s.stats.fuel_total,
                    memory_bytes: s.stats.memory_bytes,
                    kv_bytes: s.stats.kv_bytes,
                    published: s.stats.host.published,
                    refused: s.stats.host.refused,
                    inbox_dropped: s.inbox_dropped,
                    last_error: s.last_error.clone(),
                    fetch: None,
                    reused_bytes: None,
                }
            })
            .collect()
    }

    /// The last will for the next connect: the status as it is now, offline.
    fn will(&self, now: Now) -> Option<Effect> {
        Some(Effect::Will(protocol::to_cbor(&self.status(false, now))))
    }

    fn publish_status(&mut self, now: Now, fx: &mut Vec<Effect>) {
        if self.connected {
            fx.push(Effect::Publish {
                topic: self.topics.status(),
                payload: protocol::to_cbor(&self.status(true, now)),
                qos: Qos::AtLeastOnce,
                retain: true,
            });
            self.status_dirty = false;
            self.last_status_ms = Some(now.mono_ms);
        }
        fx.extend(self.will(now));
        fx.push(Effect::Summary(self.summary()));
    }

    // ---- time, reload, shutdown ----

    fn tick(&mut self, now: Now, fx: &mut Vec<Effect>) {
        let every = self.config.agent.status_interval_s.saturating_mul(1000);
        if self
            .last_status_ms
            .is_none_or(|t| now.mono_ms.saturating_sub(t) >= every)
        {
            self.status_dirty = true;
        }
        self.outbound.expire(now.mono_ms);
        self.send_events(now, fx);
        self.fetch_tick(now, fx);
        if let Some(since) = self.session.since
            && self.session.flapping
            && now.mono_ms.saturating_sub(since) > TAKEOVER_WINDOW_MS
        {
            // A session that lasts: whatever took it over has gone.
            self.session.flapping = false;
            self.session.short.clear();
            self.status_dirty = true;
        }
    }

    fn reload(&mut self, mut new: Config, now: Now, fx: &mut Vec<Effect>) {
        let old = &self.config;
        let mut needs_restart = Vec::new();
        if new.device_id != old.device_id {
            needs_restart.push("device_id");
            new.device_id.clone_from(&old.device_id);
        }
        if new.state_dir != old.state_dir || new.store != old.store {
            needs_restart.push("state_dir/store");
            new.state_dir.clone_from(&old.state_dir);
            new.store = old.store;
        }
        if new.mqtt != old.mqtt {
            needs_restart.push("mqtt");
            new.mqtt = old.mqtt.clone();
        }
        if new.trust != old.trust || (new.trust.is_some() && new.trusted_keys != old.trusted_keys) {
            // The roots and the mode are provisioned; the trust document is what changes.
            needs_restart.push("trust");
            new.trust.clone_from(&old.trust);
            new.trusted_keys.clone_from(&old.trusted_keys);
        }
        if new.hardware != old.hardware {
            needs_restart.push("hardware");
            new.hardware = old.hardware.clone();
        }
        if new.agent.max_concurrent_calls != old.agent.max_concurrent_calls {
            needs_restart.push("agent.max_concurrent_calls");
            new.agent.max_concurrent_calls = old.agent.max_concurrent_calls;
        }
        if !needs_restart.is_empty() {
            fx.push(Effect::Log(
                Level::Warn,
                format!(
                    "reload: {} changed; that takes effect after a restart",
                    needs_restart.join(", ")
                ),
            ));
        }
        let topics = match new.topics() {
            Ok(t) => t,
            Err(e) => {
                fx.push(Effect::Log(
                    Level::Error,
                    format!("reload refused, the configuration in effect stays: {e}"),
                ));
                return;
            }
        };
        if new.groups != self.config.groups {
            let (before, after) = (self.topics.subscriptions(), topics.subscriptions());
            fx.push(Effect::Subscriptions {
                removed: before
                    .iter()
                    .filter(|t| !after.contains(t))
                    .cloned()
                    .collect(),
                added: after
                    .iter()
                    .filter(|t| !before.contains(t))
                    .cloned()
                    .collect(),
                filters: after.into_iter().chain(self.chunk_filters()).collect(),
            });
            let groups = new.groups.clone();
            self.reconciler
                .regroup(|g| groups.iter().position(|x| x == g));
        }
        self.topics = topics;
        self.config = new.clone();
        fx.push(Effect::Reconfigure(Box::new(new)));
        fx.push(Effect::Log(Level::Info, "configuration reloaded".into()));
        // Bundles refused under the old configuration are evaluated again.
        self.reconsider_refused(now, fx);
        self.check_fetches(now, fx);
        self.status_dirty = true;
    }

    /// Evaluates again every bundle the device refused (after something that decides
    /// acceptance changed: trusted keys, the trust document).
    fn reconsider_refused(&mut self, now: Now, fx: &mut Vec<Effect>) {
        let accepted: BTreeMap<String, Sha256> = self
            .slots
            .iter()
            .map(|(n, s)| (n.clone(), s.record.current.bundle_sha256))
            .collect();
        let actions = self.reconciler.reconsider(|m| accepted.get(m).copied());
        self.act(actions, now, fx);
    }

    fn shutdown(&mut self, now: Now, fx: &mut Vec<Effect>) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(now.mono_ms + SHUTDOWN_GRACE_MS);
        fx.push(Effect::Log(
            Level::Info,
            "shutting down: stopping modules".into(),
        ));
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for name in names {
            if let Some(slot) = self.slots.get_mut(&name) {
                match slot.phase.clone() {
                    Phase::Running { runner, .. } => {
                        fx.push(Effect::Stop { runner });
                        self.retiring.insert(runner, Then::Nothing);
                        slot.phase = Phase::Stopped {
                            cause: "stopped".into(),
                        };
                    }
                    Phase::Waiting { old, .. } => {
                        self.retiring.insert(old, Then::Nothing);
                    }
                    _ => {}
                }
            }
        }
    }

    /// After every input: status, and the end of a shutdown.
    fn finish(&mut self, now: Now, fx: &mut Vec<Effect>) {
        if let Some(deadline) = self.stopping {
            // Store operations still running are waited for (they are short and bounded);
            // runners for the grace period at most.
            let store_busy = self.pending.values().any(|p| {
                !matches!(
                    p,
                    Pending::Evaluate { .. }
                        | Pending::Peek { .. }
                        | Pending::Replaced { .. }
                        | Pending::Assembled { .. }
                )
            });
            let runners_left = !self.retiring.is_empty();
            if (!runners_left && !store_busy) || now.mono_ms >= deadline {
                if runners_left {
                    fx.push(Effect::Log(
                        Level::Warn,
                        format!(
                            "{} module(s) still in a call after {} s: leaving them",
                            self.retiring.len(),
                            SHUTDOWN_GRACE_MS / 1000
                        ),
                    ));
                }
                if self.fatal.is_none() {
                    fx.push(Effect::Flush);
                }
                // The offline status, as things are now.
                if self.connected {
                    fx.push(Effect::Publish {
                        topic: self.topics.status(),
                        payload: protocol::to_cbor(&self.status(false, now)),
                        qos: Qos::AtLeastOnce,
                        retain: true,
                    });
                }
                fx.push(Effect::Exit(self.fatal.clone()));
                self.exited = true;
                return;
            }
        }
        if self.status_dirty {
            self.publish_status(now, fx);
        }
    }
}

mod fetch;
pub use fetch::{ChunkFailure, FetchPlan};
mod trust;

#[cfg(test)]
mod tests;
