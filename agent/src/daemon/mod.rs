//! The agent daemon: the shell around the supervisor's pure state ([`state`]). It owns the IO —
//! the MQTT connection, the store, the runners, the board, the service manager — feeds every
//! happening to the state as an [`Input`] with the time, and carries out the [`Effect`]s the state
//! returns. It never waits on a module: a runner is told to stop and its end comes back later as
//! an input, so the watchdog, removals and the status keep going whatever guest code does.
//!
//! `run(config, store, board, shutdown, reloads, notifier)` starts every installed,
//! non-quarantined module from the store (no broker needed), then follows the fleet: retained
//! bundles on the desired topics are verified, installed atomically and run on probation; a new
//! version that fails its probation is rolled back to the previous one, with its key-value state,
//! without a reboot or an operator.

mod commit;
mod connection;
pub mod notify;
pub mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::core::keys::{self, TrustSet};
use crate::core::manifest::{Action as BundleAction, Sha256};
use crate::core::protocol::{Event, EventKind};
use crate::core::trust::{self, Policy, Roots};
use crate::core::verify::{DeviceIdentity, Trust, Verified, Verifier, VerifyError};
use crate::hal::Board;
use crate::mqtt::{self, BrokerUrl, ClientSettings};
use crate::runtime::host::{Clock as _, SystemClock};
use crate::runtime::runner::{
    self, Durability, GuestPool, RunnerConfig, RunnerEvent, RunnerHandle,
};
use crate::runtime::{InstallError, PreparedModule, Runtime};
use crate::store::{Store, StoreError, StoredVersion};

use state::{
    Checked, ChunkFailure, FetchPlan, Level, Qos, Rejection, State, StoreFailure, StoreOp, Stored,
    TrustOutcome, TrustRefusal, TrustView,
};
pub use state::{Effect, Input, Now};

/// Threads the agent may run at most, for the service manager's `TasksMax`: the main thread,
/// tokio's workers and blocking pool (bounded below), the signal thread, and sled's IO pool
/// (up to 128 threads, a constant of sled 0.34, plus its flusher).
pub const MAX_THREADS: usize = 1 + WORKER_THREADS + MAX_BLOCKING_THREADS + 1 + 130;
/// tokio worker threads (the reactor; guest code never runs there).
pub const WORKER_THREADS: usize = 2;
/// tokio's blocking pool: guest calls (at most `agent.max_concurrent_calls`), store and compile
/// work (one at a time each), the commit flush.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A trusted key file cannot be used.
    #[error("trusted key {path}: {reason}")]
    TrustedKey {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The broker settings cannot be used.
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttSetupError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A store write failed in a way that leaves it unusable until it is reopened.
    #[error("the store is unusable ({0}); stopping so that a restart recovers it")]
    StoreUnusable(String),
    /// The topics cannot be made.
    #[error(transparent)]
    Topics(#[from] crate::core::topics::TopicError),
}

/// Reads the trusted public keys named in the configuration (simple mode).
pub fn load_trust(config: &Config) -> Result<TrustSet, DaemonError> {
    let mut trust = TrustSet::new();
    for path in &config.trusted_keys {
        let key = read_public_key(path)?;
        trust.insert(key).map_err(|e| DaemonError::TrustedKey {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(trust)
}

/// Reads the root keys of `[trust]` (trust-document mode); `None` in simple mode.
pub fn load_roots(config: &Config) -> Result<Option<Roots>, DaemonError> {
    let Some(t) = &config.trust else {
        return Ok(None);
    };
    let keys = t
        .roots
        .iter()
        .map(|p| read_public_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    Roots::new(keys, t.threshold)
        .map(Some)
        .map_err(|e| DaemonError::TrustedKey {
            path: t.roots.first().cloned().unwrap_or_default(),
            reason: format!("[trust] roots: {e}"),
        })
}

fn read_public_key(path: &std::path::Path) -> Result<ed25519_dalek::VerifyingKey, DaemonError> {
    let bad = |reason: String| DaemonError::TrustedKey {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    keys::parse_public_key(&text).map_err(|e| bad(e.to_string()))
}

/// Hooks for the service manager (systemd's notify protocol); all optional.
pub trait Notifier: Send {
    /// The store is open and the installed modules are started.
    fn ready(&mut self) {}
    /// A one-line status.
    fn status(&mut self, _line: &str) {}
    /// The supervisor loop is alive.
    fn watchdog(&mut self) {}
    /// A configuration reload begins.
    fn reloading(&mut self) {}
    /// A configuration reload is done.
    fn reloaded(&mut self) {}
    /// Shutting down.
    fn stopping(&mut self) {}
}

/// A notifier that tells no one.
#[derive(Debug, Default)]
pub struct Silent;
impl Notifier for Silent {}

/// The verifier a configuration asks for: its trusted keys, or in trust-document mode the
/// policy of the document in effect (`None`: none accepted yet).
fn verifier(config: &Config, policy: Option<Arc<Policy>>) -> Result<Verifier, DaemonError> {
    let trust = match &config.trust {
        Some(_) => Trust::Document(policy),
        None => Trust::Keys(load_trust(config)?),
    };
    Ok(Verifier::with_trust(trust, config.runtime.wasm_limits())
        .with_max_bundle_bytes(config.agent.max_bundle_bytes)
        .for_device(DeviceIdentity {
            id: config.device_id.clone(),
            groups: config.groups.clone(),
        }))
}

/// What the shell's workers report back to its loop.
enum Back {
    Input(Input),
    /// A runner's key-value store is open (or not): spawn it.
    Opened {
        runner: u64,
        prepared: PreparedModule,
        probation: bool,
        kv: Result<Option<crate::store::SledKv>, String>,
    },
    Flushed,
}

/// Work done off the reactor, one job at a time per worker, in the order given.
type Job = Box<dyn FnOnce() -> Back + Send>;

/// A worker running jobs one after the other on tokio's blocking pool.
fn worker(back: mpsc::UnboundedSender<Back>) -> mpsc::UnboundedSender<Job> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            let done = match tokio::task::spawn_blocking(job).await {
                Ok(done) => done,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return,
            };
            if back.send(done).is_err() {
                return;
            }
        }
    });
    tx
}

fn now(started: Instant) -> Now {
    Now {
        wall_ms: SystemClock.now_ms(),
        mono_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// Runs the agent with the hardware on `board` until `shutdown` completes, then stops every
/// module (each in-flight call ends within its deadline), flushes the store and leaves the status
/// offline. Each configuration from `reloads` (SIGHUP) is applied as far as it can be without a
/// restart.
pub async fn run(
    config: Config,
    store: Store,
    board: Arc<Board>,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<Config>,
    notifier: &mut dyn Notifier,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    let topics = config.topics()?;
    let store = Arc::new(store);
    let records = store.modules()?;
    let settled = store
        .seqs()?
        .into_iter()
        .map(|(name, s)| (name, s.last_bundle_sha256))
        .collect();
    let (mut state, first) = State::new(config.clone(), records, settled, now(started))?;
    let roots = load_roots(&config)?;
    let mut policy = None;
    if roots.is_some() {
        let stored = store.trust()?;
        let view = match &stored {
            Some(t) => {
                let p = Policy::from_accepted(&t.document).map_err(|e| StoreError::Corrupt {
                    what: "the trust document in effect".into(),
                    reason: e.to_string(),
                })?;
                tracing::info!(
                    "trust document version {} in effect (roots {})",
                    p.version,
                    Roots::from_wire(&t.roots).map_or_else(|e| e.to_string(), |r| r.to_string())
                );
                let view = TrustView {
                    version: p.version,
                    expires_at: p.expires_at,
                };
                policy = Some(Arc::new(p));
                view
            }
            None => {
                tracing::warn!(
                    "no trust document accepted yet: bundles are refused until one signed by the \
                     roots arrives"
                );
                TrustView::default()
            }
        };
        let seen = stored.map(|t| Sha256::of(&t.document));
        state.set_trust(Some(view), store.time_floor(), seen);
    }

    let settings = ClientSettings {
        client_id: config.device_id.clone(),
        url: BrokerUrl::parse(&config.mqtt.url)?,
        tls: config.mqtt.tls(),
        keep_alive: Duration::from_secs(config.mqtt.keep_alive_s),
        max_packet_bytes: config.agent.max_bundle_bytes + mqtt::PACKET_OVERHEAD,
        last_will: None,
        clean_session: true,
    };
    let (client, eventloop) = mqtt::connect(&settings, 1024)?;
    let (events_tx, mut events) = mpsc::channel::<Input>(1024);
    let (runner_tx, mut runner_rx) = mpsc::channel::<RunnerEvent>(4096);
    let (back_tx, mut back) = mpsc::unbounded_channel::<Back>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subscriptions = topics.subscriptions();
    subscriptions.push(topics.events());
    let (subscriptions_tx, subscriptions_rx) = watch::channel(subscriptions);
    // The first connect registers the will the state made at start (offline, every module).
    let first_will = first
        .iter()
        .rev()
        .find_map(|e| match e {
            Effect::Will(payload) => Some(payload.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let (will_tx, will_rx) = watch::channel(LastWill::new(
        topics.status(),
        first_will,
        QoS::AtLeastOnce,
        true,
    ));
    let connection = tokio::spawn(connection::run(
        eventloop,
        subscriptions_rx,
        will_rx,
        connection::Backoff {
            min: Duration::from_millis(config.mqtt.reconnect_min_ms),
            max: Duration::from_millis(config.mqtt.reconnect_max_ms),
        },
        events_tx,
        stop_rx,
    ));
    let (commit_tx, commit_rx) = mpsc::channel(1024);
    let committer = tokio::spawn(commit::run(
        Arc::clone(&store),
        commit_rx,
        Duration::from_millis(config.agent.kv_commit_interval_ms),
        {
            let back = back_tx.clone();
            move |reason: String| {
                let _ = back.send(Back::Input(Input::StoreBroken(reason)));
            }
        },
    ));

    let mut shell = Shell {
        runtime: Runtime::new(config.runtime).with_board(Arc::clone(&board)),
        pool: match config.agent.max_concurrent_calls {
            0 => GuestPool::for_this_machine(),
            n => GuestPool::new(n),
        },
        verifier: Arc::new(verifier(&config, policy.clone())?),
        policy,
        roots,
        time_floor: store.time_floor(),
        config,
        store,
        board,
        client,
        store_jobs: worker(back_tx.clone()),
        compile_jobs: worker(back_tx),
        runners: BTreeMap::new(),
        opening: BTreeMap::new(),
        runner_tx,
        durability: Durability::new(commit_tx),
        subscriptions: subscriptions_tx,
        will: will_tx,
        topics,
        started,
        exit: None,
    };
    shell.run_effects(first, &mut state, notifier);

    tokio::pin!(shutdown);
    let mut shutdown_seen = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shell.exit.is_none() {
        let input = tokio::select! {
            () = &mut shutdown, if !shutdown_seen => {
                shutdown_seen = true;
                notifier.stopping();
                Input::Shutdown
            }
            Some(input) = events.recv() => input,
            Some(e) = runner_rx.recv() => {
                shell.runner_event(&e);
                Input::Runner(e)
            }
            Some(done) = back.recv() => match shell.back(done) {
                Some(input) => input,
                None => continue,
            },
            Some(new) = reloads.recv() => {
                notifier.reloading();
                match verifier(&new, None).and_then(|_| load_roots(&new)) {
                    Ok(_) => Input::Reload(Box::new(new)),
                    Err(e) => {
                        tracing::error!("reload refused, the configuration in effect stays: {e}");
                        notifier.reloaded();
                        continue;
                    }
                }
            }
            _ = tick.tick() => {
                notifier.watchdog();
                Input::Tick
            }
        };
        let reload = matches!(input, Input::Reload(_));
        let fx = state.handle(input, now(started));
        shell.run_effects(fx, &mut state, notifier);
        let floor = shell.store.time_floor();
        if floor != shell.time_floor {
            shell.time_floor = floor;
            let fx = state.handle(Input::TimeFloor(floor), now(started));
            shell.run_effects(fx, &mut state, notifier);
        }
        if reload {
            notifier.reloaded();
        }
    }

    // The final status and the disconnect go out, then the connection ends.
    let _ = shell.client.try_disconnect();
    let _ = stop_tx.send(true);
    let _ = connection.await;
    committer.abort();
    tracing::info!("stopped");
    match shell.exit.take().flatten() {
        None => Ok(()),
        Some(reason) => Err(DaemonError::StoreUnusable(reason)),
    }
}

/// The shell's side: everything that does IO.
struct Shell {
    config: Config,
    runtime: Runtime,
    pool: GuestPool,
    verifier: Arc<Verifier>,
    /// Trust-document mode: the policy of the document in effect, and the provisioned roots.
    policy: Option<Arc<Policy>>,
    roots: Option<Roots>,
    /// The store's time floor as last told to the state.
    time_floor: u64,
    store: Arc<Store>,
    board: Arc<Board>,
    client: AsyncClient,
    store_jobs: mpsc::UnboundedSender<Job>,
    compile_jobs: mpsc::UnboundedSender<Job>,
    runners: BTreeMap<u64, RunnerHandle>,
    /// Runners spawned whose key-value store the store worker is still opening, and whether a
    /// stop was asked for meanwhile (such a runner never starts: its end is reported at once).
    opening: BTreeMap<u64, bool>,
    runner_tx: mpsc::Sender<RunnerEvent>,
    durability: Durability,
    subscriptions: watch::Sender<Vec<String>>,
    will: watch::Sender<LastWill>,
    topics: crate::core::topics::Topics,
    started: Instant,
    /// Set by `Effect::Exit`.
    exit: Option<Option<String>>,
}

impl Shell {
    /// A runner that has ended is forgotten (its task finishes on its own).
    fn runner_event(&mut self, e: &RunnerEvent) {
        if let RunnerEvent::State { id, state, .. } = e
            && matches!(
                state,
                runner::RunState::Stopped
                    | runner::RunState::ProbationFailed { .. }
                    | runner::RunState::Failed { .. }
            )
        {
            self.runners.remove(id);
        }
    }

    /// What a worker finished, as an input (or handled here).
    fn back(&mut self, done: Back) -> Option<Input> {
        match done {
            Back::Input(input) => Some(input),
            Back::Flushed => None,
            Back::Opened {
                runner,
                prepared,
                probation,
                kv,
            } => {
                let name = prepared.name().to_string();
                if self.opening.remove(&runner) == Some(true) {
                    // Told to stop before it could start: it ends here, as a runner would.
                    return Some(Input::Runner(RunnerEvent::State {
                        id: runner,
                        module: name,
                        state: runner::RunState::Stopped,
                        restarts: 0,
                    }));
                }
                let kv = match kv {
                    Ok(kv) => kv.map(|kv| Box::new(kv) as Box<_>),
                    Err(reason) => {
                        // The runner ends at once and says why, as a runner would.
                        return Some(Input::Runner(RunnerEvent::State {
                            id: runner,
                            module: name,
                            state: runner::RunState::Failed {
                                cause: format!("key-value store: {reason}"),
                            },
                            restarts: 0,
                        }));
                    }
                };
                let handle = runner::spawn(
                    self.runtime.clone(),
                    self.pool.clone(),
                    prepared,
                    kv,
                    RunnerConfig {
                        id: runner,
                        policy: self.config.restart,
                        probation_ticks: probation.then_some(self.config.agent.probation_ticks),
                        durability: Some(self.durability.clone()),
                    },
                    self.runner_tx.clone(),
                );
                self.runners.insert(runner, handle);
                None
            }
        }
    }

    fn run_effects(&mut self, fx: Vec<Effect>, state: &mut State, notifier: &mut dyn Notifier) {
        for effect in fx {
            self.effect(effect, state, notifier);
        }
    }

    fn effect(&mut self, effect: Effect, state: &mut State, notifier: &mut dyn Notifier) {
        match effect {
            Effect::Verify { ticket, offer } => {
                let verifier = Arc::clone(&self.verifier);
                let store = Arc::clone(&self.store);
                let runtime = self.runtime.clone();
                let job: Job = Box::new(move || {
                    Back::Input(Input::Verified {
                        ticket,
                        result: verify(&verifier, &store, &runtime, &offer.bytes),
                    })
                });
                let _ = self.compile_jobs.send(job);
            }
            Effect::PlanFetch {
                ticket,
                module,
                chunks,
            } => {
                let store = Arc::clone(&self.store);
                let job: Job = Box::new(move || {
                    let result = store
                        .stage_plan(&module, &chunks)
                        .map(|s| FetchPlan {
                            have: s.have,
                            reused_bytes: s.reused_bytes,
                        })
                        .map_err(|e| e.to_string());
                    Back::Input(Input::FetchPlanned { ticket, result })
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::StageChunk {
                ticket,
                sha256,
                size,
                bytes,
                modules,
            } => {
                let store = Arc::clone(&self.store);
                let job: Job = Box::new(move || {
                    let result = stage_chunk(&store, &sha256, size, &bytes, &modules);
                    Back::Input(Input::ChunkStaged { ticket, result })
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::Assemble {
                ticket,
                module,
                signed,
                chunks,
            } => {
                let verifier = Arc::clone(&self.verifier);
                let store = Arc::clone(&self.store);
                let runtime = self.runtime.clone();
                let job: Job = Box::new(move || {
                    let result = match store.assemble(&module, &chunks) {
                        Ok(wasm) => verify_assembled(&verifier, &store, &runtime, &signed, wasm),
                        Err(e) => Err(Rejection {
                            reason: format!("its chunks could not be assembled: {e}"),
                            permanent: false,
                        }),
                    };
                    Back::Input(Input::Verified { ticket, result })
                });
                let _ = self.compile_jobs.send(job);
            }
            Effect::ClearStaging { module } => {
                let store = Arc::clone(&self.store);
                let job: Job = Box::new(move || {
                    if let Err(e) = store.clear_staging(&module) {
                        tracing::warn!("module {module}: {e}");
                    }
                    Back::Flushed
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::Prepare { ticket, version } => {
                let store = Arc::clone(&self.store);
                let runtime = self.runtime.clone();
                let job: Job = Box::new(move || {
                    let result = prepare_stored(&store, &runtime, &version).map(Box::new);
                    Back::Input(Input::Prepared { ticket, result })
                });
                let _ = self.compile_jobs.send(job);
            }
            Effect::Store { ticket, module, op } => {
                let store = Arc::clone(&self.store);
                let job: Job = Box::new(move || {
                    let result = match &*op {
                        // The trust document changed after the bundle was verified (trust
                        // updates run on this worker too, so this check cannot race one).
                        StoreOp::Install { trust_version, .. }
                        | StoreOp::Remove { trust_version, .. }
                            if *trust_version != store.trust_version() =>
                        {
                            Err(StoreFailure {
                                reason: format!(
                                    "module {module:?}: the trust document changed (version \
                                     {trust_version} -> {}) after its bundle was verified",
                                    store.trust_version()
                                ),
                                broken: false,
                            })
                        }
                        _ => store_op(&store, &module, *op).map_err(|e| StoreFailure {
                            reason: e.to_string(),
                            broken: store.is_broken(),
                        }),
                    };
                    Back::Input(Input::Stored { ticket, result })
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::Trust { ticket, document } => {
                let store = Arc::clone(&self.store);
                let Some(roots) = self.roots.clone() else {
                    return;
                };
                let job: Job = Box::new(move || {
                    let result = apply_trust_document(&store, &roots, &document);
                    if store.is_broken() {
                        // The change could not be made durable: the agent stops, as for any
                        // store write that fails so.
                        Back::Input(Input::StoreBroken(match result {
                            Err(r) => r.reason,
                            Ok(_) => "the store failed while applying a trust document".into(),
                        }))
                    } else {
                        Back::Input(Input::Trust { ticket, result })
                    }
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::Policy(policy) => {
                self.policy = Some(policy);
                match verifier(&self.config, self.policy.clone()) {
                    Ok(v) => self.verifier = Arc::new(v),
                    Err(e) => tracing::error!("trust: {e}"),
                }
            }
            Effect::Spawn {
                runner,
                prepared,
                probation,
            } => {
                self.opening.insert(runner, false);
                let store = Arc::clone(&self.store);
                let job: Job = Box::new(move || {
                    let kv = match prepared.limits().kv_quota_bytes {
                        0 => Ok(None),
                        quota => store
                            .kv(prepared.name(), quota)
                            .map(Some)
                            .map_err(|e| e.to_string()),
                    };
                    Back::Opened {
                        runner,
                        prepared,
                        probation,
                        kv,
                    }
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::Stop { runner } => {
                if let Some(h) = self.runners.get(&runner) {
                    h.stop_soon();
                } else if let Some(stop) = self.opening.get_mut(&runner) {
                    *stop = true;
                }
            }
            Effect::Restart { runner } => {
                if let Some(h) = self.runners.get(&runner)
                    && let Err(e) = h.restart()
                {
                    tracing::warn!("{e}");
                }
            }
            Effect::Deliver {
                runner,
                module,
                topic,
                payload,
            } => {
                let result = match self.runners.get(&runner) {
                    Some(h) => h.deliver(topic, payload).map_err(|e| e.to_string()),
                    None => Err(format!("module {module:?} is not running, message dropped")),
                };
                if let Err(reason) = result {
                    let fx = state.handle(Input::Undelivered { module, reason }, self.now());
                    self.run_effects(fx, state, notifier);
                }
            }
            Effect::Claim { module, caps } => {
                if let Err(e) = self.board.claim_outputs(&module, &caps) {
                    let fx = state.handle(
                        Input::ClaimRefused {
                            module,
                            reason: e.to_string(),
                        },
                        self.now(),
                    );
                    self.run_effects(fx, state, notifier);
                }
            }
            Effect::Release { module } => self.board.release(&module),
            Effect::Publish {
                topic,
                payload,
                qos,
                retain,
            } => {
                let qos = match qos {
                    Qos::AtMostOnce => QoS::AtMostOnce,
                    Qos::AtLeastOnce => QoS::AtLeastOnce,
                };
                if let Err(e) = self.client.try_publish(topic, qos, retain, payload) {
                    tracing::debug!("publish dropped: {e}");
                }
            }
            Effect::Will(payload) => {
                self.will.send_replace(LastWill::new(
                    self.topics.status(),
                    payload,
                    QoS::AtLeastOnce,
                    true,
                ));
            }
            Effect::LoadOutbox => {
                let store = Arc::clone(&self.store);
                let job: Job = Box::new(move || {
                    Back::Input(Input::Outbox(store.pending_events().unwrap_or_default()))
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::AckEvents(ids) => {
                let store = Arc::clone(&self.store);
                let job: Job = Box::new(move || {
                    if let Err(e) = store.ack_events(&ids) {
                        tracing::warn!("outbox: {e}");
                    }
                    Back::Flushed
                });
                let _ = self.store_jobs.send(job);
            }
            Effect::Refetch { topic } => {
                // A subscription to the exact topic has the broker send its retained message.
                let _ = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                let _ = self.client.try_unsubscribe(topic);
            }
            Effect::Subscriptions {
                mut filters,
                added,
                removed,
            } => {
                for t in removed {
                    let _ = self.client.try_unsubscribe(t);
                }
                for t in added {
                    let _ = self.client.try_subscribe(t, QoS::AtLeastOnce);
                }
                filters.push(self.topics.events());
                self.subscriptions.send_replace(filters);
            }
            Effect::Reconfigure(config) => match verifier(&config, self.policy.clone()) {
                Ok(v) => {
                    self.verifier = Arc::new(v);
                    self.runtime = self.runtime.with_config(config.runtime);
                    if let Ok(t) = config.topics() {
                        self.topics = t;
                    }
                    self.config = *config;
                }
                Err(e) => tracing::error!("reload: {e}"),
            },
            Effect::Log(level, text) => match level {
                Level::Error => tracing::error!("{text}"),
                Level::Warn => tracing::warn!("{text}"),
                Level::Info => tracing::info!("{text}"),
                Level::Debug => tracing::debug!("{text}"),
            },
            Effect::Ready => notifier.ready(),
            Effect::Summary(line) => notifier.status(&line),
            Effect::Flush => {
                if let Err(e) = self.store.flush() {
                    tracing::error!("store: {e}");
                }
            }
            Effect::Exit(reason) => {
                for h in self.runners.values() {
                    h.stop_soon();
                }
                self.exit = Some(reason);
            }
        }
    }

    fn now(&self) -> Now {
        now(self.started)
    }
}

/// The clock for expiry: the system clock, or the time floor when the clock is behind it (a
/// board without a real-time clock boots at 1970).
fn clock(store: &Store) -> u64 {
    (SystemClock.now_ms() / 1000).max(store.time_floor())
}

/// Runs `verify` with the highest seq the store accepted for the module; a store that cannot
/// be read is a refusal that may pass later.
fn with_seq<'a>(
    store: &Store,
    verify: impl FnOnce(&mut dyn FnMut(&str) -> Option<u64>) -> Result<Verified<'a>, VerifyError>,
) -> Result<Verified<'a>, Rejection> {
    let mut seq_error = None;
    let verified = verify(&mut |name| match store.seq(name) {
        Ok(s) => s.map(|s| s.highest_seq),
        Err(e) => {
            seq_error = Some(e.to_string());
            None
        }
    });
    if let Some(e) = seq_error {
        return Err(Rejection {
            reason: format!("store unavailable: {e}"),
            permanent: false,
        });
    }
    verified.map_err(|e| Rejection {
        reason: e.to_string(),
        permanent: true,
    })
}

/// Verifies a bundle as the device does, and for an install compiles it and checks it against
/// the manifest and the board. A chunked install comes back with its signed part, to be fetched.
fn verify(
    verifier: &Verifier,
    store: &Store,
    runtime: &Runtime,
    bytes: &Arc<[u8]>,
) -> Result<Box<Checked>, Rejection> {
    let now = clock(store);
    let verified = with_seq(store, |seq| verifier.verify(bytes, now, seq))?;
    if verified.awaits_chunks() {
        return Ok(Box::new(Checked {
            trust_version: verifier.trust().version(),
            check_record: None,
            key_id: verified.key_id(),
            wasm: None,
            manifest: verified.into_manifest(),
            prepared: None,
            awaiting_chunks: Some(Arc::clone(bytes)),
        }));
    }
    let wasm = verified.wasm_bytes().map(Arc::from);
    checked(verifier, runtime, &verified, wasm)
}

/// Verifies a chunked install again with its assembled Wasm, then as [`verify`].
fn verify_assembled(
    verifier: &Verifier,
    store: &Store,
    runtime: &Runtime,
    signed: &[u8],
    wasm: Arc<[u8]>,
) -> Result<Box<Checked>, Rejection> {
    let now = clock(store);
    let verified = with_seq(store, |seq| {
        verifier.verify_assembled(signed, &wasm, now, seq)
    })?;
    checked(verifier, runtime, &verified, Some(Arc::clone(&wasm)))
}

/// A verified bundle compiled (installs) and checked against the board.
fn checked(
    verifier: &Verifier,
    runtime: &Runtime,
    verified: &Verified<'_>,
    wasm: Option<Arc<[u8]>>,
) -> Result<Box<Checked>, Rejection> {
    let refused = |reason: String| Rejection {
        reason,
        permanent: true,
    };
    let manifest = verified.manifest().clone();
    let prepared = match (manifest.action, verified.wasm()) {
        (BundleAction::Install, Some(wasm)) => {
            let prepared = runtime
                .prepare_checked(&manifest, wasm)
                .map_err(|e| refused(e.to_string()))?;
            // Two modules may not drive one output line.
            runtime
                .board()
                .claimable(&manifest.name, &manifest.caps)
                .map_err(|e| {
                    refused(format!("module {:?}: hardware refused: {e}", manifest.name))
                })?;
            Some(prepared)
        }
        _ => None,
    };
    Ok(Box::new(Checked {
        trust_version: verifier.trust().version(),
        check_record: verified.wasm().map(|w| w.record()),
        key_id: verified.key_id(),
        wasm,
        manifest,
        prepared,
        awaiting_chunks: None,
    }))
}

/// Checks a chunk that arrived against the digest its topic names and the length the manifests
/// list, then stages it for each module fetching it.
fn stage_chunk(
    store: &Store,
    sha256: &Sha256,
    size: u64,
    bytes: &[u8],
    modules: &[String],
) -> Result<(), ChunkFailure> {
    if bytes.len() as u64 != size {
        return Err(ChunkFailure {
            reason: format!("it is {} bytes, the manifest lists {size}", bytes.len()),
            refused: true,
        });
    }
    let actual = Sha256::of(bytes);
    if actual != *sha256 {
        return Err(ChunkFailure {
            reason: format!("its bytes hash to {actual}"),
            refused: true,
        });
    }
    for m in modules {
        store
            .stage_chunk(m, sha256, bytes)
            .map_err(|e| ChunkFailure {
                reason: e.to_string(),
                refused: false,
            })?;
    }
    Ok(())
}

/// Compiles an installed version from the store: its Wasm (whose digest the store verifies) is
/// checked again only when no record of an earlier check by this agent, under its current
/// limits, is kept for it; a check made here is recorded for the next start.
fn prepare_stored(
    store: &Store,
    runtime: &Runtime,
    version: &StoredVersion,
) -> Result<PreparedModule, String> {
    let sha = version.wasm_sha256();
    let wasm = store.wasm(&sha).map_err(|e| e.to_string())?;
    let limits = runtime.config().wasm_limits();
    let recalled = match store.check_record(&sha) {
        Ok(Some(record)) => crate::engine::recall(&wasm, &record, &limits),
        _ => None,
    };
    let checked = match recalled {
        Some(checked) => checked,
        None => {
            let checked = crate::engine::check(&wasm, &limits).map_err(|source| {
                InstallError::Check {
                    module: version.manifest.name.clone(),
                    source,
                }
                .to_string()
            })?;
            if let Err(e) = store.set_check_record(&sha, &checked.record()) {
                tracing::debug!(module = %version.manifest.name, "check record not kept: {e}");
            }
            checked
        }
    };
    runtime
        .prepare_checked(&version.manifest, checked)
        .map_err(|e| e.to_string())
}

/// Carries out one store operation.
fn store_op(store: &Store, module: &str, op: StoreOp) -> Result<(Stored, Vec<Event>), StoreError> {
    let now_ms = SystemClock.now_ms();
    Ok(match op {
        StoreOp::Install {
            manifest,
            key_id,
            wasm,
            bundle_sha256,
            check_record,
            trust_version: _,
            events,
        } => {
            let (record, events) = store.install(
                &manifest,
                key_id,
                Some(&wasm),
                bundle_sha256,
                now_ms,
                &events,
            )?;
            if let Some(t) = manifest.issued_at
                && let Err(e) = store.raise_time_floor(t)
            {
                tracing::warn!("time floor not raised: {e}");
            }
            // The chunks it was fetched in (if it was) are in its blob now.
            if let Err(e) = store.clear_staging(module) {
                tracing::warn!("module {module}: {e}");
            }
            if let (Some(r), Some(w)) = (check_record, manifest.wasm) {
                // A record that cannot be kept costs one check at the module's next start.
                if let Err(e) = store.set_check_record(&w.sha256, &r) {
                    tracing::debug!(module = %manifest.name, "check record not kept: {e}");
                }
            }
            (Stored::Record(Box::new(record)), events)
        }
        StoreOp::BeginProbation { seq } => {
            store.begin_probation(module, seq)?;
            (Stored::Done, Vec::new())
        }
        StoreOp::Confirm { seq, events } => {
            let (record, events) = store.confirm(module, seq, &events)?;
            (Stored::Record(Box::new(record)), events)
        }
        StoreOp::Rollback { cause, events } => {
            let (restored, events) = store.rollback(module, &cause, &events)?;
            (Stored::RolledBack(restored.map(Box::new)), events)
        }
        StoreOp::Remove {
            seq,
            bundle_sha256,
            issued_at,
            trust_version: _,
            events,
        } => {
            let (_, events) = store.remove(module, seq, bundle_sha256, &events)?;
            if let Err(e) = store.clear_staging(module) {
                tracing::warn!("module {module}: {e}");
            }
            if let Some(t) = issued_at
                && let Err(e) = store.raise_time_floor(t)
            {
                tracing::warn!("time floor not raised: {e}");
            }
            (Stored::Done, events)
        }
        StoreOp::SetState { state, events } => {
            let (record, events) = store.set_state(module, state, &events)?;
            (Stored::Record(Box::new(record)), events)
        }
        StoreOp::PushEvents { events } => (Stored::Done, store.push_events(&events)?),
    })
}

/// Verifies a trust document under the roots in effect (the store's, or the provisioned ones
/// before any document) and the version in effect, then puts it in effect in the store with
/// what it changes and the events it causes. A refused document is reported with a
/// `trust_rejected` event; nothing else changes.
fn apply_trust_document(
    store: &Store,
    provisioned: &Roots,
    document: &[u8],
) -> Result<Box<TrustOutcome>, TrustRefusal> {
    let now_ms = SystemClock.now_ms();
    let clock = (now_ms / 1000).max(store.time_floor());
    let transient = |reason: String| TrustRefusal {
        reason: format!("trust document not applied: {reason}"),
        events: Vec::new(),
        permanent: false,
    };
    let event = |kind, module: &str, version, seq, reason: String| Event {
        id: 0,
        ts_ms: now_ms,
        kind,
        module: module.to_string(),
        version,
        seq,
        reason: Some(reason),
    };
    let stored = store.trust().map_err(|e| transient(e.to_string()))?;
    let (roots, current) = match &stored {
        Some(t) => (
            Roots::from_wire(&t.roots).map_err(|e| transient(format!("the stored roots: {e}")))?,
            t.version,
        ),
        None => (provisioned.clone(), 0),
    };
    let accepted = match trust::verify(document, &roots, current, clock) {
        Ok(a) => a,
        Err(e) => {
            let reason = e.to_string();
            let e = event(EventKind::TrustRejected, "", None, None, reason.clone());
            let events = store.push_events(&[e]).unwrap_or_default();
            return Err(TrustRefusal {
                reason,
                events,
                permanent: true,
            });
        }
    };
    let policy = accepted.policy;
    let revoked: Vec<String> = policy.revoked().map(ToString::to_string).collect();
    let records = store.modules().map_err(|e| transient(e.to_string()))?;
    let signers: Vec<String> = accepted.signers.iter().map(ToString::to_string).collect();
    let mut summary = format!(
        "trust document version {} in effect: {} signing key(s), {} revoked, signed by {}",
        policy.version,
        policy.grants().count(),
        revoked.len(),
        signers.join(", ")
    );
    if accepted.rotated {
        summary.push_str(&format!("; roots rotated to {}", accepted.roots));
    }
    for r in &policy.seq_resets {
        summary.push_str(&format!(
            "; seq floor of {} lowered to {} if above",
            r.module, r.seq
        ));
    }
    let mut events = vec![event(EventKind::TrustUpdated, "", None, None, summary)];
    for r in records.iter().filter(|r| {
        revoked.contains(&r.current.key_id_hex)
            && !matches!(r.state, crate::store::InstallState::Revoked { .. })
    }) {
        events.push(event(
            EventKind::Revoked,
            &r.name,
            Some(r.current.manifest.version.clone()),
            Some(r.current.manifest.seq),
            format!(
                "stopped: its bundle was signed by key {}, which trust document version {} \
                 revokes; a bundle signed by a valid key replaces it",
                r.current.key_id_hex, policy.version
            ),
        ));
    }
    let change = crate::store::TrustChange {
        document: document.to_vec(),
        version: policy.version,
        roots: accepted.roots.to_wire(),
        issued_at: policy.issued_at,
        revoked,
        seq_resets: policy
            .seq_resets
            .iter()
            .map(|r| (r.module.clone(), r.seq))
            .collect(),
    };
    let applied = store
        .apply_trust(&change, &events)
        .map_err(|e| transient(e.to_string()))?;
    Ok(Box::new(TrustOutcome {
        view: TrustView {
            version: policy.version,
            expires_at: policy.expires_at,
        },
        policy: Arc::new(policy),
        changed: applied.changed,
        events: applied.events,
    }))
}
