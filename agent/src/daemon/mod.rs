//! The agent daemon: the supervisor that joins the MQTT connection, the store, the reconciler and
//! the module runners with one closed `enum Event` and a shutdown signal.
//!
//! `run(config, store, shutdown)` starts every installed, non-quarantined module from the store
//! (no broker needed), then follows the fleet: retained bundles on the desired topics are
//! verified, installed atomically and run on probation; a new version that fails its probation
//! is rolled back to the previous one, with its key-value state, without a reboot or an operator.

mod connection;
pub mod notify;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::core::keys::{self, KeyId, TrustSet};
use crate::core::manifest::{Action as BundleAction, Sha256};
use crate::core::protocol::{
    self, Event as DeployEvent, EventKind, LogRecord, ModuleState, ModuleStatus, Status,
};
use crate::core::reconcile::{Action, Offer, Reconciler};
use crate::core::text::printable;
use crate::core::topics::{Inbound, Scope, Topics};
use crate::core::verify::{DeviceIdentity, Verifier};
use crate::hal::Board;
use crate::mqtt::{self, BrokerUrl, ClientSettings};
use crate::runtime::host::{Clock as _, SystemClock};
use crate::runtime::runner::{
    self, CallKind, GuestPool, RunState, RunnerConfig, RunnerEvent, RunnerHandle,
};
use crate::runtime::{InstanceStats, PreparedModule, Runtime};
use crate::store::{InstallState, ModuleRecord, Store, StoreError};

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

/// Everything the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
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
    /// A module runner reported.
    Runner(RunnerEvent),
}

/// Reads the trusted public keys named in the configuration.
pub fn load_trust(config: &Config) -> Result<TrustSet, DaemonError> {
    let mut trust = TrustSet::new();
    for path in &config.trusted_keys {
        let bad = |reason: String| DaemonError::TrustedKey {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let key = keys::parse_public_key(&text).map_err(|e| bad(e.to_string()))?;
        trust.insert(key).map_err(|e| bad(e.to_string()))?;
    }
    Ok(trust)
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

/// The verifier a configuration asks for.
fn verifier(config: &Config) -> Result<Verifier, DaemonError> {
    Ok(
        Verifier::new(load_trust(config)?, config.runtime.wasm_limits())
            .with_max_bundle_bytes(config.agent.max_bundle_bytes)
            .for_device(DeviceIdentity {
                id: config.device_id.clone(),
                groups: config.groups.clone(),
            }),
    )
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
    let topics = config.topics()?;
    let runtime = Runtime::new(config.runtime).with_board(board);
    let verifier = verifier(&config)?;
    let pool = match config.agent.max_concurrent_calls {
        0 => GuestPool::for_this_machine(),
        n => GuestPool::new(n),
    };
    let offline = status_payload(&config.device_id, false, 0, Vec::new(), 0);
    let settings = ClientSettings {
        client_id: config.device_id.clone(),
        url: BrokerUrl::parse(&config.mqtt.url)?,
        tls: config.mqtt.tls(),
        keep_alive: Duration::from_secs(config.mqtt.keep_alive_s),
        max_packet_bytes: config.agent.max_bundle_bytes + mqtt::PACKET_OVERHEAD,
        last_will: Some(LastWill::new(
            topics.status(),
            offline.clone(),
            QoS::AtLeastOnce,
            true,
        )),
        clean_session: true,
    };
    let (client, eventloop) = mqtt::connect(&settings, 1024)?;
    let (events_tx, mut events) = mpsc::channel::<Event>(1024);
    let (runner_tx, mut runner_rx) = mpsc::channel::<RunnerEvent>(4096);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (subscriptions, subscriptions_rx) = watch::channel(topics.subscriptions());
    let connection = tokio::spawn(connection::run(
        eventloop,
        subscriptions_rx,
        connection::Backoff {
            min: Duration::from_millis(config.mqtt.reconnect_min_ms),
            max: Duration::from_millis(config.mqtt.reconnect_max_ms),
        },
        events_tx,
        stop_rx,
    ));

    let settled: Vec<(String, Sha256)> = store
        .seqs()?
        .into_iter()
        .map(|(name, s)| (name, s.last_bundle_sha256))
        .collect();
    let mut sup = Supervisor {
        config,
        subscriptions,
        topics,
        store: Arc::new(store),
        runtime,
        pool,
        verifier: Arc::new(verifier),
        client,
        reconciler: Reconciler::new(settled),
        slots: BTreeMap::new(),
        runner_tx,
        next_id: 1,
        started: Instant::now(),
        dropped: 0,
        status_dirty: true,
        fatal: None,
    };
    sup.start_installed().await?;
    notifier.ready();
    notifier.status(&sup.summary());

    tokio::pin!(shutdown);
    // State changes publish the status at once; the figures (calls, fuel, memory) ride along with
    // the periodic report.
    let mut status_timer =
        tokio::time::interval(Duration::from_secs(sup.config.agent.status_interval_s));
    let mut alive = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(event) = events.recv() => sup.handle(event).await,
            Some(event) = runner_rx.recv() => sup.handle(Event::Runner(event)).await,
            _ = status_timer.tick() => sup.status_dirty = true,
            Some(new) = reloads.recv() => {
                notifier.reloading();
                let interval = new.agent.status_interval_s;
                sup.reload(new).await;
                status_timer = tokio::time::interval(Duration::from_secs(interval));
                notifier.reloaded();
            }
            _ = alive.tick() => notifier.watchdog(),
        }
        if sup.status_dirty {
            sup.publish_status(true);
            notifier.status(&sup.summary());
        }
        if sup.fatal.is_some() {
            break;
        }
    }

    notifier.stopping();
    tracing::info!("shutting down: stopping modules");
    let slots = std::mem::take(&mut sup.slots);
    for (_, slot) in slots {
        if let Some(runner) = slot.runner {
            runner.stop().await;
        }
    }
    if let Some(reason) = sup.fatal.take() {
        let _ = stop_tx.send(true);
        let _ = connection.await;
        return Err(DaemonError::StoreUnusable(reason));
    }
    sup.store.flush()?;
    let _ = sup
        .client
        .try_publish(sup.topics.status(), QoS::AtLeastOnce, true, offline);
    let _ = sup.client.try_disconnect();
    let _ = stop_tx.send(true);
    let _ = connection.await;
    tracing::info!("stopped");
    Ok(())
}

/// One installed module.
#[derive(Debug)]
struct Slot {
    record: ModuleRecord,
    runner: Option<RunnerHandle>,
    /// Inbox messages dropped by runners that have ended, and while none ran.
    inbox_dropped: u64,
    runner_id: u64,
    prepared: Option<PreparedModule>,
    stats: InstanceStats,
    restarts: u32,
    detail: Option<String>,
    last_error: Option<String>,
    failed: bool,
}

impl Slot {
    /// Takes the runner out, keeping its count of dropped messages.
    fn take_runner(&mut self) -> Option<RunnerHandle> {
        let runner = self.runner.take();
        self.inbox_dropped += runner.as_ref().map_or(0, RunnerHandle::dropped);
        runner
    }

    /// Inbox messages dropped for this module since the agent started.
    fn inbox_dropped(&self) -> u64 {
        self.inbox_dropped + self.runner.as_ref().map_or(0, RunnerHandle::dropped)
    }
}

struct Supervisor {
    /// The configuration in effect (the parts a reload can change are applied to it).
    config: Config,
    /// The filters the connection subscribes to on every (re)connect.
    subscriptions: watch::Sender<Vec<String>>,
    topics: Topics,
    store: Arc<Store>,
    runtime: Runtime,
    pool: GuestPool,
    verifier: Arc<Verifier>,
    client: AsyncClient,
    reconciler: Reconciler,
    slots: BTreeMap<String, Slot>,
    runner_tx: mpsc::Sender<RunnerEvent>,
    next_id: u64,
    started: Instant,
    dropped: u64,
    status_dirty: bool,
    /// Set when the store can no longer be trusted (a flush failed): the agent stops, and
    /// systemd's restart reopens and recovers the store.
    fatal: Option<String>,
}

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

fn status_payload(
    device: &str,
    online: bool,
    uptime_s: u64,
    modules: Vec<ModuleStatus>,
    dropped: u64,
) -> Vec<u8> {
    protocol::to_cbor(&Status {
        device: device.to_string(),
        online,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s,
        ts_ms: now_ms(),
        modules,
        dropped_messages: dropped,
    })
}

/// Runs blocking work (verification, compilation, store transactions) off the reactor.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Supervisor {
    fn summary(&self) -> String {
        let running = self.slots.values().filter(|s| s.runner.is_some()).count();
        format!("{} modules installed, {running} running", self.slots.len())
    }

    /// Applies a new configuration: trusted keys, groups, agent and restart settings and runtime
    /// limits (for instances started from now on) take effect; what needs a restart (device id,
    /// broker, store, hardware, topic prefix) is reported and left as it was. Bundles refused
    /// under the old configuration are evaluated again.
    async fn reload(&mut self, mut new: Config) {
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
        if new.hardware != old.hardware {
            needs_restart.push("hardware");
            new.hardware = old.hardware.clone();
        }
        if new.agent.max_concurrent_calls != old.agent.max_concurrent_calls {
            needs_restart.push("agent.max_concurrent_calls");
            new.agent.max_concurrent_calls = old.agent.max_concurrent_calls;
        }
        if !needs_restart.is_empty() {
            tracing::warn!(
                "reload: {} changed; that takes effect after a restart",
                needs_restart.join(", ")
            );
        }
        let verifier = match verifier(&new) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("reload refused, the configuration in effect stays: {e}");
                return;
            }
        };
        let topics = match new.topics() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("reload refused, the configuration in effect stays: {e}");
                return;
            }
        };
        if new.groups != self.config.groups {
            let (before, after) = (self.topics.subscriptions(), topics.subscriptions());
            for gone in before.iter().filter(|t| !after.contains(t)) {
                let _ = self.client.try_unsubscribe(gone.clone());
            }
            for added in after.iter().filter(|t| !before.contains(t)) {
                let _ = self.client.try_subscribe(added.clone(), QoS::AtLeastOnce);
            }
            self.subscriptions.send_replace(after);
            self.reconciler
                .regroup(|g| new.groups.iter().position(|x| x == g));
        }
        self.runtime = self.runtime.with_config(new.runtime);
        self.verifier = Arc::new(verifier);
        self.topics = topics;
        self.config = new;
        tracing::info!("configuration reloaded");
        let store = Arc::clone(&self.store);
        let accepted = blocking(move || store.seqs())
            .await
            .map(|seqs| {
                seqs.into_iter()
                    .map(|(m, s)| (m, s.last_bundle_sha256))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        let actions = self.reconciler.reconsider(|m| accepted.get(m).copied());
        self.act(actions).await;
        self.status_dirty = true;
    }

    /// Notes a store failure; one that leaves the store unusable stops the agent.
    fn store_error(&mut self, e: &StoreError) {
        if matches!(e, StoreError::NeedsReopen { .. }) && self.fatal.is_none() {
            self.fatal = Some(e.to_string());
        }
    }

    /// Starts every installed module that is not quarantined or failed.
    async fn start_installed(&mut self) -> Result<(), DaemonError> {
        for record in self.store.modules()? {
            let name = record.name.clone();
            let mut slot = Slot {
                record,
                runner: None,
                inbox_dropped: 0,
                runner_id: 0,
                prepared: None,
                stats: InstanceStats::default(),
                restarts: 0,
                detail: None,
                last_error: None,
                failed: false,
            };
            match &slot.record.state {
                InstallState::Quarantined { cause } | InstallState::Failed { cause } => {
                    slot.last_error = Some(cause.clone());
                    slot.failed = matches!(slot.record.state, InstallState::Failed { .. });
                }
                InstallState::Active | InstallState::Probation => {
                    let probation = slot.record.state == InstallState::Probation;
                    match self.prepare_stored(&slot.record).await {
                        Ok(prepared) => {
                            slot.prepared = Some(prepared);
                            self.spawn_runner(&mut slot, probation);
                        }
                        Err(e) => {
                            tracing::error!("module {name}: cannot start: {e}");
                            slot.failed = true;
                            slot.last_error = Some(e);
                        }
                    }
                }
            }
            tracing::info!(
                "module {name} {} (seq {}): {:?}",
                slot.record.current.manifest.version,
                slot.record.current.manifest.seq,
                slot.record.state
            );
            self.slots.insert(name, slot);
        }
        self.status_dirty = true;
        Ok(())
    }

    async fn prepare_stored(&self, record: &ModuleRecord) -> Result<PreparedModule, String> {
        let store = Arc::clone(&self.store);
        let runtime = self.runtime.clone();
        let manifest = record.current.manifest.clone();
        let sha = record.current.wasm_sha256();
        blocking(move || {
            let wasm = store.wasm(&sha).map_err(|e| e.to_string())?;
            // Checked at install by this or an earlier agent; checked again against the limits
            // in effect now, once per start.
            let prepared = runtime
                .prepare(&manifest, &wasm)
                .map_err(|e| e.to_string())?;
            // An installed module keeps the output lines it drives, also across restarts.
            runtime
                .board()
                .claim_outputs(&manifest.name, &manifest.caps)
                .map_err(|e| format!("hardware refused: {e}"))?;
            Ok(prepared)
        })
        .await
    }

    fn spawn_runner(&mut self, slot: &mut Slot, probation: bool) {
        let Some(prepared) = slot.prepared.clone() else {
            return;
        };
        let kv = match prepared.limits().kv_quota_bytes {
            0 => None,
            quota => match self.store.kv(prepared.name(), quota) {
                Ok(kv) => Some(Box::new(kv) as Box<_>),
                Err(e) => {
                    slot.failed = true;
                    slot.last_error = Some(format!("key-value store: {e}"));
                    return;
                }
            },
        };
        let id = self.next_id;
        self.next_id += 1;
        let config = RunnerConfig {
            id,
            policy: self.config.restart,
            probation_ticks: probation.then_some(self.config.agent.probation_ticks),
        };
        slot.runner = Some(runner::spawn(
            self.runtime.clone(),
            self.pool.clone(),
            prepared,
            kv,
            config,
            self.runner_tx.clone(),
        ));
        slot.runner_id = id;
        slot.failed = false;
        slot.detail = probation.then(|| "on probation".to_string());
        slot.stats = InstanceStats::default();
        self.status_dirty = true;
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Connected => {
                tracing::info!("connected to the broker");
                self.status_dirty = true;
            }
            Event::Disconnected(reason) => tracing::warn!("broker connection lost: {reason}"),
            Event::Message { topic, payload } => match self.topics.parse(&topic) {
                Some(Inbound::Desired { scope, module }) => {
                    let actions = self.reconciler.offered(scope, &module, &payload);
                    self.act(actions).await;
                }
                Some(Inbound::Inbox { module, topic }) => self.deliver(&module, topic, payload),
                Some(Inbound::Restart { module }) => self.operator_restart(&module).await,
                None => tracing::debug!("ignoring a message on {topic}"),
            },
            Event::Runner(e) => self.runner_event(e).await,
        }
    }

    fn deliver(&mut self, module: &str, topic: String, payload: Vec<u8>) {
        let Some(slot) = self.slots.get_mut(module) else {
            tracing::debug!("message for module {module}, which is not installed: dropped");
            return;
        };
        match &slot.runner {
            Some(runner) => {
                if let Err(e) = runner.deliver(topic, payload) {
                    tracing::warn!("{e}");
                    self.status_dirty = true;
                }
            }
            None => {
                slot.inbox_dropped += 1;
                self.status_dirty = true;
                tracing::debug!("message for module {module}, which is not running: dropped");
            }
        }
    }

    async fn act(&mut self, mut actions: Vec<Action>) {
        while let Some(Action::Evaluate {
            module,
            scope,
            offer,
        }) = actions.pop()
        {
            actions.extend(self.evaluate(module, scope, offer).await);
        }
    }

    fn event(
        &mut self,
        kind: EventKind,
        module: &str,
        version: Option<String>,
        seq: Option<u64>,
        reason: Option<String>,
    ) {
        match &reason {
            Some(r) => tracing::info!("{} {module}: {r}", kind.as_str()),
            None => tracing::info!("{} {module}", kind.as_str()),
        }
        let payload = protocol::to_cbor(&DeployEvent {
            ts_ms: now_ms(),
            kind,
            module: module.to_string(),
            version,
            seq,
            reason,
        });
        if self
            .client
            .try_publish(self.topics.events(), QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            self.dropped += 1;
        }
        self.status_dirty = true;
    }

    /// Verifies a bundle on offer and acts on it. Returns what the reconciler wants next.
    async fn evaluate(&mut self, module: String, scope: Scope, offer: Offer) -> Vec<Action> {
        let verifier = Arc::clone(&self.verifier);
        let store = Arc::clone(&self.store);
        let runtime = self.runtime.clone();
        let bytes = Arc::clone(&offer.bytes);
        let topic_module = module.clone();
        // Verify and compile off the reactor. The verified manifest and its compiled module come
        // back, or the reason for refusing.
        let checked = blocking(move || {
            let mut seq_error = None;
            let verified = verifier.verify(&bytes, now_ms() / 1000, |name| {
                match store.seq(name) {
                    Ok(s) => s.map(|s| s.highest_seq),
                    Err(e) => {
                        seq_error = Some(e.to_string());
                        None
                    }
                }
            });
            if let Some(e) = seq_error {
                return Err((false, format!("store unavailable: {e}")));
            }
            let verified = verified.map_err(|e| (true, e.to_string()))?;
            if verified.manifest().name != topic_module {
                return Err((
                    true,
                    format!(
                        "the bundle is for module {:?} but was published on the desired topic of {topic_module:?}",
                        verified.manifest().name
                    ),
                ));
            }
            let prepared = match (verified.manifest().action, verified.wasm()) {
                (BundleAction::Install, Some(wasm)) => {
                    let prepared = runtime
                        .prepare_checked(verified.manifest(), wasm)
                        .map_err(|e| (true, e.to_string()))?;
                    // Two modules may not drive one output line.
                    runtime
                        .board()
                        .claimable(&verified.manifest().name, &verified.manifest().caps)
                        .map_err(|e| (true, format!("module {:?}: hardware refused: {e}", verified.manifest().name)))?;
                    Some(prepared)
                }
                _ => None,
            };
            Ok((verified.manifest().clone(), verified.key_id(), verified.wasm_bytes().map(<[u8]>::to_vec), prepared))
        })
        .await;
        let (manifest, key_id, wasm, prepared) = match checked {
            Ok(c) => c,
            Err((permanent, reason)) => {
                let source = match scope {
                    Scope::Device => String::new(),
                    Scope::Group(_, g) => format!(" (from group {g})"),
                };
                self.event(
                    EventKind::Rejected,
                    &module,
                    None,
                    None,
                    Some(format!("{reason}{source}")),
                );
                return if permanent {
                    self.reconciler.settled(&module, offer.sha256)
                } else {
                    self.reconciler.abandoned(&module, offer.sha256);
                    Vec::new()
                };
            }
        };
        let result = match (manifest.action, prepared) {
            (BundleAction::Remove, _) => self.remove(&module, manifest.seq, offer.sha256).await,
            (BundleAction::Install, Some(prepared)) => {
                self.install(
                    manifest.clone(),
                    key_id,
                    wasm.unwrap_or_default(),
                    offer.sha256,
                    prepared,
                )
                .await
            }
            (BundleAction::Install, None) => {
                Err("internal: install without a compiled module".into())
            }
        };
        match result {
            Ok(()) => self.reconciler.settled(&module, offer.sha256),
            Err(reason) => {
                self.event(
                    EventKind::Rejected,
                    &module,
                    Some(manifest.version),
                    Some(manifest.seq),
                    Some(reason),
                );
                self.reconciler.abandoned(&module, offer.sha256);
                Vec::new()
            }
        }
    }

    async fn install(
        &mut self,
        manifest: crate::core::manifest::Manifest,
        key_id: KeyId,
        wasm: Vec<u8>,
        sha: Sha256,
        prepared: PreparedModule,
    ) -> Result<(), String> {
        let name = manifest.name.clone();
        let caps = manifest.caps.clone();
        let store = Arc::clone(&self.store);
        let record = blocking(move || store.install(&manifest, key_id, Some(&wasm), sha, now_ms()))
            .await
            .map_err(|e| {
                self.store_error(&e);
                format!("storage failed, the running version is untouched: {e}")
            })?;
        tracing::info!(
            "module {name}: seq {} stored, starting on probation",
            record.current.manifest.seq
        );
        if let Err(e) = self.runtime.board().claim_outputs(&name, &caps) {
            // Checked before the install; only a concurrent claim could intervene.
            tracing::error!("module {name}: {e}");
        }
        let mut slot = match self.slots.remove(&name) {
            Some(mut old) => {
                if let Some(runner) = old.take_runner() {
                    runner.stop().await;
                }
                old.record = record;
                old.last_error = None;
                old
            }
            None => Slot {
                record,
                runner: None,
                inbox_dropped: 0,
                runner_id: 0,
                prepared: None,
                stats: InstanceStats::default(),
                restarts: 0,
                detail: None,
                last_error: None,
                failed: false,
            },
        };
        slot.prepared = Some(prepared);
        self.spawn_runner(&mut slot, true);
        self.slots.insert(name, slot);
        Ok(())
    }

    async fn remove(&mut self, name: &str, seq: u64, sha: Sha256) -> Result<(), String> {
        let old = self.slots.remove(name);
        let version = old
            .as_ref()
            .map(|s| s.record.current.manifest.version.clone());
        if let Some(runner) = old.and_then(|s| s.runner) {
            runner.stop().await;
        }
        let store = Arc::clone(&self.store);
        let n = name.to_string();
        let removed = blocking(move || store.remove(&n, seq, sha))
            .await
            .map_err(|e| {
                self.store_error(&e);
                format!("storage failed: {e}")
            });
        match removed {
            Ok(_) => {
                self.runtime.board().release(name);
                self.event(EventKind::Removed, name, version, Some(seq), None);
                Ok(())
            }
            Err(e) => {
                // Nothing changed on disk: run the module again.
                if let Ok(Some(record)) = self.store.module(name) {
                    self.restore_slot(record).await;
                }
                Err(e)
            }
        }
    }

    /// Puts a stored module back into a slot and starts it (after a failed removal or rollback).
    async fn restore_slot(&mut self, record: ModuleRecord) {
        let name = record.name.clone();
        let mut slot = Slot {
            record,
            runner: None,
            inbox_dropped: 0,
            runner_id: 0,
            prepared: None,
            stats: InstanceStats::default(),
            restarts: 0,
            detail: None,
            last_error: None,
            failed: false,
        };
        match self.prepare_stored(&slot.record).await {
            Ok(p) => {
                slot.prepared = Some(p);
                self.spawn_runner(&mut slot, false);
            }
            Err(e) => {
                slot.failed = true;
                slot.last_error = Some(e);
            }
        }
        self.slots.insert(name, slot);
        self.status_dirty = true;
    }

    async fn operator_restart(&mut self, name: &str) {
        let Some(slot) = self.slots.get_mut(name) else {
            tracing::warn!("restart of module {name}, which is not installed: ignored");
            return;
        };
        if let Some(runner) = &slot.runner {
            let _ = runner.restart().await;
        } else {
            let store = Arc::clone(&self.store);
            let n = name.to_string();
            match blocking(move || store.set_state(&n, InstallState::Active)).await {
                Ok(record) => {
                    let mut slot = self
                        .slots
                        .remove(name)
                        .unwrap_or_else(|| unreachable!("checked above"));
                    slot.record = record;
                    slot.last_error = None;
                    self.spawn_runner(&mut slot, false);
                    self.slots.insert(name.to_string(), slot);
                }
                Err(e) => {
                    tracing::error!("module {name}: cannot restart: {e}");
                    self.store_error(&e);
                    return;
                }
            }
        }
        let seq = self.slots.get(name).map(|s| s.record.current.manifest.seq);
        self.event(EventKind::Restarted, name, None, seq, None);
    }

    async fn runner_event(&mut self, e: RunnerEvent) {
        match e {
            RunnerEvent::Calling { .. } => {}
            RunnerEvent::Called {
                id,
                module,
                call,
                report,
                stats,
            } => {
                // A call of a runner that was stopped since (a removal, an upgrade) is not
                // reported: its module no longer runs, and nothing it published may appear after
                // the removal's event and status.
                if self.slots.get(&module).is_none_or(|s| s.runner_id != id) {
                    return;
                }
                for m in &report.messages {
                    let topic = self.topics.telemetry(&module, &m.topic);
                    if self
                        .client
                        .try_publish(topic, QoS::AtMostOnce, false, m.payload.clone())
                        .is_err()
                    {
                        self.dropped += 1;
                    }
                }
                // Refused host calls go to the agent's log and the module's log topic, so an
                // operator sees a module knocking on doors its manifest does not open: one
                // summary per call at most, rate-limited per module (the runtime decides).
                if let Some(summary) = &report.refusal_summary {
                    tracing::warn!("module {module}: {}", printable(&summary.text));
                }
                for line in report.logs.iter().chain(&report.refusal_summary) {
                    let payload = protocol::to_cbor(&LogRecord {
                        ts_ms: now_ms(),
                        level: line.level,
                        text: line.text.clone(),
                    });
                    tracing::debug!("module {module}: {} {}", line.level, printable(&line.text));
                    if self
                        .client
                        .try_publish(self.topics.logs(&module), QoS::AtMostOnce, false, payload)
                        .is_err()
                    {
                        self.dropped += 1;
                    }
                }
                if let Some(slot) = self.slots.get_mut(&module).filter(|s| s.runner_id == id) {
                    slot.stats = stats;
                    if !report.outcome.is_finished() {
                        slot.last_error = Some(format!("{call}: {}", report.outcome));
                        self.status_dirty = true;
                    }
                    if call == CallKind::Init {
                        self.status_dirty = true;
                    }
                }
            }
            RunnerEvent::State {
                id,
                module,
                state,
                restarts,
            } => {
                let Some(slot) = self.slots.get_mut(&module).filter(|s| s.runner_id == id) else {
                    return;
                };
                slot.restarts = restarts;
                self.status_dirty = true;
                match state {
                    RunState::Running => {
                        if slot.record.state != InstallState::Probation {
                            slot.detail = None;
                        }
                    }
                    RunState::BackingOff { delay_ms, cause } => {
                        slot.detail = Some(format!("restarting in {delay_ms} ms"));
                        slot.last_error = Some(cause);
                    }
                    RunState::ProbationPassed => self.probation_passed(&module).await,
                    RunState::ProbationFailed { cause } => {
                        self.probation_failed(&module, cause).await
                    }
                    RunState::Quarantined { cause, failures } => {
                        let reason = format!("{failures} failures in the window, last: {cause}");
                        let store = Arc::clone(&self.store);
                        let n = module.clone();
                        let c = reason.clone();
                        if let Err(e) = blocking(move || {
                            store.set_state(&n, InstallState::Quarantined { cause: c })
                        })
                        .await
                        {
                            tracing::error!("module {module}: cannot record the quarantine: {e}");
                            self.store_error(&e);
                        }
                        if let Some(slot) = self.slots.get_mut(&module) {
                            if let Some(runner) = slot.take_runner() {
                                runner.stop().await;
                            }
                            slot.record.state = InstallState::Quarantined {
                                cause: reason.clone(),
                            };
                            slot.detail = None;
                            slot.last_error = Some(cause);
                        }
                        let seq = self
                            .slots
                            .get(&module)
                            .map(|s| s.record.current.manifest.seq);
                        self.event(EventKind::Quarantined, &module, None, seq, Some(reason));
                    }
                    RunState::Failed { cause } => {
                        slot.failed = true;
                        slot.take_runner();
                        slot.last_error = Some(cause);
                    }
                    RunState::Stopped => {
                        slot.take_runner();
                    }
                }
            }
        }
    }

    async fn probation_passed(&mut self, name: &str) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        let seq = slot.record.current.manifest.seq;
        let version = slot.record.current.manifest.version.clone();
        let store = Arc::clone(&self.store);
        let n = name.to_string();
        match blocking(move || store.confirm(&n, seq)).await {
            Ok(record) => {
                if let Some(slot) = self.slots.get_mut(name) {
                    slot.record = record;
                    slot.detail = None;
                }
                self.event(EventKind::Installed, name, Some(version), Some(seq), None);
            }
            Err(e) => {
                tracing::error!("module {name}: cannot confirm seq {seq}: {e}");
                self.store_error(&e);
            }
        }
    }

    async fn probation_failed(&mut self, name: &str, cause: String) {
        let Some(mut slot) = self.slots.remove(name) else {
            return;
        };
        if let Some(runner) = slot.take_runner() {
            runner.stop().await;
        }
        let failed_version = slot.record.current.manifest.version.clone();
        let failed_seq = slot.record.current.manifest.seq;
        let store = Arc::clone(&self.store);
        let n = name.to_string();
        let c = cause.clone();
        match blocking(move || store.rollback(&n, &c)).await {
            Ok(Some(record)) => {
                let restored = format!(
                    "{} (seq {})",
                    record.current.manifest.version, record.current.manifest.seq
                );
                self.restore_slot(record).await;
                self.event(
                    EventKind::RolledBack,
                    name,
                    Some(failed_version),
                    Some(failed_seq),
                    Some(format!("{cause}; running {restored} again")),
                );
            }
            Ok(None) => {
                self.runtime.board().release(name);
                slot.record.state = InstallState::Failed {
                    cause: cause.clone(),
                };
                slot.failed = true;
                slot.detail = None;
                slot.last_error = Some(cause.clone());
                self.slots.insert(name.to_string(), slot);
                self.event(
                    EventKind::Failed,
                    name,
                    Some(failed_version),
                    Some(failed_seq),
                    Some(format!("{cause}; no previous version to restore")),
                );
            }
            Err(e) => {
                tracing::error!("module {name}: rollback failed: {e}");
                self.store_error(&e);
                slot.failed = true;
                slot.last_error = Some(format!("{cause}; rollback failed: {e}"));
                self.slots.insert(name.to_string(), slot);
                self.status_dirty = true;
            }
        }
    }

    fn module_statuses(&self) -> Vec<ModuleStatus> {
        self.slots
            .values()
            .map(|s| {
                let state = match (&s.record.state, s.failed, s.runner.is_some()) {
                    (InstallState::Quarantined { .. }, _, _) => ModuleState::Quarantined,
                    (InstallState::Failed { .. }, _, _) | (_, true, _) => ModuleState::Failed,
                    (_, _, true) => ModuleState::Running,
                    _ => ModuleState::Stopped,
                };
                let m = &s.record.current.manifest;
                ModuleStatus {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    seq: m.seq,
                    state,
                    detail: s.detail.clone(),
                    restarts: s.restarts,
                    calls: s.stats.calls,
                    fuel_last: s.stats.fuel_last,
                    fuel_total: s.stats.fuel_total,
                    memory_bytes: s.stats.memory_bytes,
                    kv_bytes: s.stats.kv_bytes,
                    published: s.stats.host.published,
                    refused: s.stats.host.refused,
                    inbox_dropped: s.inbox_dropped(),
                    last_error: s.last_error.clone(),
                }
            })
            .collect()
    }

    fn publish_status(&mut self, online: bool) {
        let payload = status_payload(
            self.topics.device(),
            online,
            self.started.elapsed().as_secs(),
            self.module_statuses(),
            self.dropped,
        );
        if self
            .client
            .try_publish(self.topics.status(), QoS::AtLeastOnce, true, payload)
            .is_ok()
        {
            self.status_dirty = false;
        }
    }
}
