//! Chunked delivery on the state's side. A verified install whose Wasm travels in chunks
//! (format 2) becomes a [`Fetch`]: the shell first says which chunks the device holds already
//! (staged by an interrupted transfer, or inside an installed version's Wasm); the state then
//! subscribes to the chunk topics of the others, a window at a time; the shell checks each chunk
//! that arrives against its digest and length and writes it durably to the module's staging area;
//! once every chunk is in, the shell assembles the Wasm and verifies the signed part again with
//! it, and the install goes on as for a bundle in one message.
//!
//! Nothing installed is touched meanwhile. A fetch ends when it installs, when its bundle is
//! refused, or when its offer is replaced or withdrawn on the desired topic; a chunk that never
//! comes is reported (`fetch_stalled`) after `agent.fetch_timeout_s` and waited for.

use std::collections::BTreeSet;

use super::*;
use crate::core::topics::PUBLISH_OVERHEAD;

/// Chunk topics subscribed to at once, over every fetch: bounds what the broker may send ahead
/// (each chunk is at most the packet limit) while keeping a slow link busy.
pub const WINDOW_CHUNKS: usize = 16;

/// What the device holds of a fetch's chunks (the result of [`Effect::PlanFetch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPlan {
    /// Per chunk, in the manifest's order: staged already.
    pub have: Vec<bool>,
    /// Bytes of those chunks found in installed versions' Wasm (copied to staging now).
    pub reused_bytes: u64,
}

/// Why a chunk was not staged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFailure {
    /// What went wrong.
    pub reason: String,
    /// True when the chunk itself is wrong (digest, length): the fetch waits for a correct one.
    /// False when it could not be written (a full disk): the fetch is abandoned.
    pub refused: bool,
}

/// A version being fetched in chunks.
#[derive(Debug)]
pub struct Fetch {
    scope: Scope,
    /// The bundle's digest (what the reconciler has pending).
    sha256: Sha256,
    /// The signed part, verified again at assembly.
    signed: Arc<[u8]>,
    version: String,
    seq: u64,
    chunks: Arc<[ChunkRef]>,
    /// Per chunk: staged.
    have: Vec<bool>,
    /// The plan is known.
    planned: bool,
    /// Being assembled and verified.
    assembling: bool,
    refused: u64,
    reused_bytes: u64,
    /// When the last chunk (or the plan) came in, monotonic ms.
    progress_ms: u64,
    stalled: bool,
}

impl Fetch {
    fn missing(&self) -> impl Iterator<Item = (usize, &ChunkRef)> {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.have[*i])
    }

    fn wants(&self, sha256: &Sha256) -> bool {
        self.planned && !self.assembling && self.missing().any(|(_, c)| c.sha256() == *sha256)
    }

    fn bytes_have(&self) -> u64 {
        self.chunks
            .iter()
            .zip(&self.have)
            .filter(|(_, h)| **h)
            .map(|(c, _)| c.size())
            .sum()
    }

    fn complete(&self) -> bool {
        self.have.iter().all(|h| *h)
    }

    /// The status's view of it.
    pub fn status(&self, now: Now) -> protocol::FetchStatus {
        protocol::FetchStatus {
            version: self.version.clone(),
            seq: self.seq,
            chunks_have: self.have.iter().filter(|h| **h).count() as u64,
            chunks_total: self.chunks.len() as u64,
            bytes_have: self.bytes_have(),
            bytes_total: self.chunks.iter().map(ChunkRef::size).sum(),
            reused_bytes: self.reused_bytes,
            chunks_refused: self.refused,
            stalled_s: self
                .stalled
                .then(|| now.mono_ms.saturating_sub(self.progress_ms) / 1000),
        }
    }
}

impl State {
    /// A verified install whose Wasm travels in chunks: fetch them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_fetch(
        &mut self,
        module: String,
        scope: Scope,
        sha256: Sha256,
        signed: Arc<[u8]>,
        manifest: &Manifest,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let limit = self.config.mqtt.max_packet_bytes;
        if let Some((i, c)) = manifest
            .chunks
            .iter()
            .enumerate()
            .find(|(_, c)| c.size().saturating_add(PUBLISH_OVERHEAD as u64) > limit as u64)
        {
            let reason = format!(
                "chunk {i} is {} bytes: with its topic it does not fit mqtt.max_packet_bytes \
                 ({limit}), so it could never arrive through this broker (sign with a smaller \
                 --chunk-avg-bytes)",
                c.size()
            );
            let id = (manifest.version.clone(), manifest.seq);
            self.fetch_refused(&module, sha256, id, reason, true, now, fx);
            return;
        }
        if self.fetches.remove(&module).is_some() {
            // Replaced by a newer offer (the reconciler hands out one bundle per module at a
            // time, so this is a leftover): its chunks are pruned by the new plan.
            self.fill_window(now, fx);
        }
        let chunks: Arc<[ChunkRef]> = manifest.chunks.clone().into();
        fx.push(Effect::Log(
            Level::Info,
            format!(
                "module {module}: fetching {} (seq {}) in {} chunks, {} bytes",
                manifest.version,
                manifest.seq,
                chunks.len(),
                manifest.wasm.map_or(0, |w| w.size)
            ),
        ));
        let ticket = self.ticket(Pending::FetchPlan {
            module: module.clone(),
            sha256,
        });
        fx.push(Effect::PlanFetch {
            ticket,
            module: module.clone(),
            chunks: Arc::clone(&chunks),
        });
        self.fetches.insert(
            module,
            Fetch {
                scope,
                sha256,
                signed,
                version: manifest.version.clone(),
                seq: manifest.seq,
                have: vec![false; chunks.len()],
                chunks,
                planned: false,
                assembling: false,
                refused: 0,
                reused_bytes: 0,
                progress_ms: now.mono_ms,
                stalled: false,
            },
        );
        self.status_dirty = true;
    }

    /// The bundle of a fetch (or one about to be) is refused: a `rejected` event; a permanent
    /// refusal settles the offer, another lets it be tried again when it is offered again.
    #[allow(clippy::too_many_arguments)]
    fn fetch_refused(
        &mut self,
        module: &str,
        sha256: Sha256,
        (version, seq): (String, u64),
        reason: String,
        permanent: bool,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        // Staging goes first: on a full disk it frees the room the event needs.
        fx.push(Effect::ClearStaging {
            module: module.to_string(),
        });
        let e = self.event(
            EventKind::Rejected,
            module,
            Some(version),
            Some(seq),
            Some(reason),
            fx,
        );
        self.push_events(vec![e], fx);
        self.status_dirty = true;
        if permanent {
            let next = self.reconciler.settled(module, sha256);
            self.act(next, now, fx);
        } else {
            self.reconciler.abandoned(module, sha256);
        }
    }

    /// Ends `module`'s fetch with a refusal that may pass later (see [`State::fetch_refused`]).
    fn abandon_fetch(&mut self, module: &str, reason: String, now: Now, fx: &mut Vec<Effect>) {
        let Some(f) = self.fetches.remove(module) else {
            return;
        };
        self.fill_window(now, fx);
        self.fetch_refused(module, f.sha256, (f.version, f.seq), reason, false, now, fx);
    }

    pub(super) fn fetch_planned(
        &mut self,
        ticket: u64,
        result: Result<FetchPlan, String>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let Some(Pending::FetchPlan { module, sha256 }) = self.pending.remove(&ticket) else {
            return;
        };
        if self.fetches.get(&module).is_none_or(|f| f.sha256 != sha256) {
            return;
        }
        let plan = match result {
            Ok(plan) => plan,
            Err(reason) => {
                self.abandon_fetch(
                    &module,
                    format!("the staging area for its chunks is unusable: {reason}"),
                    now,
                    fx,
                );
                return;
            }
        };
        if let Some(f) = self.fetches.get_mut(&module) {
            if plan.have.len() == f.have.len() {
                f.have = plan.have;
            }
            f.planned = true;
            f.reused_bytes = plan.reused_bytes;
            f.progress_ms = now.mono_ms;
            let (have, total) = (f.have.iter().filter(|h| **h).count(), f.have.len());
            fx.push(Effect::Log(
                Level::Info,
                format!(
                    "module {module}: {have} of {total} chunks held already ({} bytes reused from \
                     installed versions)",
                    f.reused_bytes
                ),
            ));
        }
        self.status_dirty = true;
        self.advance_fetch(&module, now, fx);
    }

    /// Assembles a complete fetch; tops up the chunk subscriptions.
    fn advance_fetch(&mut self, module: &str, now: Now, fx: &mut Vec<Effect>) {
        let ready = self.fetches.get(module).and_then(|f| {
            (f.planned && f.complete() && !f.assembling).then(|| {
                (
                    f.scope.clone(),
                    f.sha256,
                    Arc::clone(&f.signed),
                    Arc::clone(&f.chunks),
                    f.version.clone(),
                    f.seq,
                )
            })
        });
        if let Some((scope, sha256, signed, chunks, version, seq)) = ready {
            if let Some(f) = self.fetches.get_mut(module) {
                f.assembling = true;
            }
            fx.push(Effect::Log(
                Level::Info,
                format!("module {module}: every chunk of {version} (seq {seq}) is in"),
            ));
            let epoch = self.trust_epoch;
            let ticket = self.ticket(Pending::Assembled {
                module: module.to_string(),
                scope,
                sha256,
                epoch,
            });
            fx.push(Effect::Assemble {
                ticket,
                module: module.to_string(),
                signed,
                chunks,
            });
        }
        self.fill_window(now, fx);
    }

    /// The chunk topics subscribed to now: the first missing chunks of each fetch, up to
    /// [`WINDOW_CHUNKS`] over all fetches.
    fn window(&self) -> BTreeSet<Sha256> {
        let mut window = BTreeSet::new();
        let busy: BTreeSet<Sha256> = self.staging.values().copied().collect();
        for f in self.fetches.values().filter(|f| f.planned && !f.assembling) {
            for (_, c) in f.missing() {
                if window.len() >= WINDOW_CHUNKS {
                    return window;
                }
                if !busy.contains(&c.sha256()) {
                    window.insert(c.sha256());
                }
            }
        }
        window
    }

    /// The chunk topics currently subscribed to.
    pub(super) fn chunk_filters(&self) -> Vec<String> {
        self.subscribed_chunks
            .iter()
            .map(|sha| Topics::chunk(&self.config.mqtt.topic_prefix, sha))
            .collect()
    }

    /// Every filter the connection subscribes to at a (re)connect: the device's topics and the
    /// chunk window.
    pub(super) fn filters(&self) -> Vec<String> {
        let mut filters = self.topics.subscriptions();
        filters.extend(self.chunk_filters());
        filters
    }

    /// Brings the chunk subscriptions in line with the window.
    fn fill_window(&mut self, _now: Now, fx: &mut Vec<Effect>) {
        let window = self.window();
        if window == self.subscribed_chunks {
            return;
        }
        let prefix = self.config.mqtt.topic_prefix.clone();
        let added: Vec<String> = window
            .difference(&self.subscribed_chunks)
            .map(|s| Topics::chunk(&prefix, s))
            .collect();
        // A chunk being staged keeps its subscription until it is in (a refused one is sent
        // again when it is published again).
        let busy: BTreeSet<Sha256> = self.staging.values().copied().collect();
        let removed: Vec<String> = self
            .subscribed_chunks
            .iter()
            .filter(|s| !window.contains(*s) && !busy.contains(*s))
            .map(|s| Topics::chunk(&prefix, s))
            .collect();
        self.subscribed_chunks = self
            .subscribed_chunks
            .iter()
            .filter(|s| window.contains(*s) || busy.contains(*s))
            .copied()
            .chain(window.iter().copied())
            .collect();
        if added.is_empty() && removed.is_empty() {
            return;
        }
        fx.push(Effect::Subscriptions {
            filters: self.filters(),
            added,
            removed,
        });
    }

    /// A message on a chunk topic.
    pub(super) fn chunk_arrived(
        &mut self,
        sha256: Sha256,
        payload: Vec<u8>,
        _now: Now,
        fx: &mut Vec<Effect>,
    ) {
        if payload.is_empty() {
            // A chunk cleared on the broker (`edgectl gc`): nothing arrived.
            return;
        }
        self.fetched_bytes += payload.len() as u64;
        self.fetch_progress = true;
        let modules: Vec<String> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.wants(&sha256))
            .map(|(m, _)| m.clone())
            .collect();
        if modules.is_empty() || self.staging.values().any(|s| *s == sha256) {
            // Not wanted (any more), or a copy of one being staged (sent again at a reconnect).
            return;
        }
        let size = self
            .fetches
            .get(&modules[0])
            .and_then(|f| f.chunks.iter().find(|c| c.sha256() == sha256))
            .map_or(0, ChunkRef::size);
        let ticket = self.ticket(Pending::Stage);
        self.staging.insert(ticket, sha256);
        fx.push(Effect::StageChunk {
            ticket,
            sha256,
            size,
            bytes: payload,
            modules,
        });
    }

    pub(super) fn chunk_staged(
        &mut self,
        ticket: u64,
        result: Result<(), ChunkFailure>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        self.pending.remove(&ticket);
        let Some(sha256) = self.staging.remove(&ticket) else {
            return;
        };
        // Whatever the result, a topic held only because this chunk was being written is
        // released (its fetch may have ended meanwhile), or a later fetch of the same chunk would
        // take it as subscribed and never be sent its retained copy.
        self.chunk_result(sha256, result, now, fx);
        self.fill_window(now, fx);
    }

    fn chunk_result(
        &mut self,
        sha256: Sha256,
        result: Result<(), ChunkFailure>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let modules: Vec<String> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.wants(&sha256))
            .map(|(m, _)| m.clone())
            .collect();
        match result {
            Ok(()) => {
                for m in &modules {
                    if let Some(f) = self.fetches.get_mut(m) {
                        for (i, c) in f.chunks.iter().enumerate() {
                            if c.sha256() == sha256 {
                                f.have[i] = true;
                            }
                        }
                        f.progress_ms = now.mono_ms;
                        if f.stalled {
                            f.stalled = false;
                            self.status_dirty = true;
                        }
                    }
                }
                for m in &modules {
                    self.advance_fetch(m, now, fx);
                }
                self.fill_window(now, fx);
            }
            Err(ChunkFailure {
                reason,
                refused: true,
            }) => {
                for m in &modules {
                    let Some(f) = self.fetches.get_mut(m) else {
                        continue;
                    };
                    f.refused += 1;
                    // Whoever can publish on the topic can send damaged copies as fast as the
                    // broker passes them: each costs a hash; the log says the first few, then
                    // ever more rarely (the status has the count).
                    if f.refused <= 3 || f.refused.is_power_of_two() {
                        fx.push(Effect::Log(
                            Level::Warn,
                            format!(
                                "module {m}: chunk {sha256} refused ({} so far): {reason}; \
                                 waiting for a correct copy",
                                f.refused
                            ),
                        ));
                    }
                }
                self.status_dirty = true;
            }
            Err(ChunkFailure {
                reason,
                refused: false,
            }) => {
                for m in &modules {
                    self.abandon_fetch(
                        m,
                        format!(
                            "chunk {sha256} could not be staged: {reason}; nothing installed \
                             changed"
                        ),
                        now,
                        fx,
                    );
                }
            }
        }
    }

    /// The assembled Wasm was verified (or not): the fetch ends either way, and the result goes
    /// where a bundle in one message goes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn assembled(
        &mut self,
        module: String,
        scope: Scope,
        sha256: Sha256,
        epoch: u64,
        result: Result<Box<Checked>, Rejection>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        if self
            .fetches
            .get(&module)
            .is_none_or(|f| f.sha256 != sha256 || !f.assembling)
        {
            return;
        }
        let Some(f) = self.fetches.remove(&module) else {
            return;
        };
        self.status_dirty = true;
        if epoch != self.trust_epoch {
            // Verified under a trust document no longer in effect: again (the chunks are
            // staged, so it comes straight back here).
            self.reevaluate(&module, sha256, now, fx);
            return;
        }
        match &result {
            Ok(c) => {
                self.reused
                    .insert(module.clone(), (c.manifest.seq, f.reused_bytes));
            }
            Err(_) => fx.push(Effect::ClearStaging {
                module: module.clone(),
            }),
        }
        self.evaluated(module, scope, sha256, result, now, fx);
    }

    /// Fetches whose offer is no longer the one to install (replaced, withdrawn, outranked, or
    /// the device left the group) end here; the reconciler moves on to what is on offer now.
    pub(super) fn check_fetches(&mut self, now: Now, fx: &mut Vec<Effect>) {
        let stale: Vec<(String, Option<Sha256>)> = self
            .fetches
            .iter()
            .filter_map(|(m, f)| {
                let winner = self.reconciler.winner(m).map(|(_, sha)| sha);
                (winner != Some(f.sha256)).then(|| (m.clone(), winner))
            })
            .collect();
        for (module, winner) in stale {
            let Some(f) = self.fetches.remove(&module) else {
                continue;
            };
            self.status_dirty = true;
            let e = self.event(
                EventKind::Superseded,
                &module,
                Some(f.version.clone()),
                Some(f.seq),
                Some(match winner {
                    Some(_) => {
                        "replaced on its desired topic before its chunks arrived".to_string()
                    }
                    None => "withdrawn from its desired topic before its chunks arrived".into(),
                }),
                fx,
            );
            self.push_events(vec![e], fx);
            if winner.is_none() {
                fx.push(Effect::ClearStaging {
                    module: module.clone(),
                });
            }
            self.fill_window(now, fx);
            let next = self.reconciler.cancelled(&module, f.sha256);
            self.act(next, now, fx);
        }
    }

    /// Once a second: a status report when a fetch made progress, and `fetch_stalled` for a fetch
    /// that has received nothing for `agent.fetch_timeout_s`.
    pub(super) fn fetch_tick(&mut self, now: Now, fx: &mut Vec<Effect>) {
        if std::mem::take(&mut self.fetch_progress) {
            self.status_dirty = true;
        }
        let timeout_ms = self.config.agent.fetch_timeout_s.saturating_mul(1000);
        let stalled: Vec<String> = self
            .fetches
            .iter()
            .filter(|(_, f)| {
                f.planned
                    && !f.assembling
                    && !f.stalled
                    && now.mono_ms.saturating_sub(f.progress_ms) >= timeout_ms
            })
            .map(|(m, _)| m.clone())
            .collect();
        for module in stalled {
            let Some(f) = self.fetches.get_mut(&module) else {
                continue;
            };
            f.stalled = true;
            let missing: Vec<Sha256> = f.missing().map(|(_, c)| c.sha256()).collect();
            let (version, seq) = (f.version.clone(), f.seq);
            let reason = format!(
                "{} of {} chunks have not arrived for {} s (first missing: {}); still waiting, \
                 nothing installed changed",
                missing.len(),
                f.chunks.len(),
                self.config.agent.fetch_timeout_s,
                missing.first().map(Sha256::to_hex).unwrap_or_default()
            );
            let e = self.event(
                EventKind::FetchStalled,
                &module,
                Some(version),
                Some(seq),
                Some(reason),
                fx,
            );
            self.push_events(vec![e], fx);
            self.status_dirty = true;
        }
    }

    /// The status entries of fetches: attached to the installed module, or one of their own
    /// (state `fetching`) for a module not installed yet.
    pub(super) fn fetch_statuses(&self, modules: &mut Vec<ModuleStatus>, now: Now) {
        for m in modules.iter_mut() {
            if let Some(f) = self.fetches.get(&m.name) {
                m.fetch = Some(f.status(now));
            }
            if let Some((seq, reused)) = self.reused.get(&m.name)
                && *seq == m.seq
            {
                m.reused_bytes = Some(*reused);
            }
        }
        for (name, f) in &self.fetches {
            if self.slots.contains_key(name) {
                continue;
            }
            modules.push(ModuleStatus {
                name: name.clone(),
                version: String::new(),
                seq: 0,
                state: ModuleState::Fetching,
                detail: Some(format!(
                    "fetching {} (seq {}) in chunks",
                    printable(&f.version),
                    f.seq
                )),
                restarts: 0,
                calls: 0,
                fuel_last: 0,
                fuel_total: 0,
                memory_bytes: 0,
                kv_bytes: 0,
                published: 0,
                refused: 0,
                inbox_dropped: 0,
                last_error: None,
                fetch: Some(f.status(now)),
                reused_bytes: None,
            });
        }
        modules.sort_by(|a, b| a.name.cmp(&b.name));
    }
}
