//! The supervisor's side of trust-document mode: a retained trust document arrives, the shell
//! verifies it and puts it in effect in the store ([`Effect::Trust`]), and its result
//! ([`Input::Trust`]) stops the modules it revokes, swaps the verifier's policy
//! ([`Effect::Policy`]) and has bundles refused under the old trust evaluated again. One
//! document is handled at a time; the newest one offered meanwhile waits.

use std::sync::Arc;

use super::{
    Effect, Level, Now, Pending, Phase, State, Then, TrustOutcome, TrustRefusal, TrustView,
};
use crate::core::manifest::Sha256;
use crate::core::protocol::{Event, EventKind};
use crate::core::text::printable;
use crate::store::{InstallState, ModuleRecord};

/// How far behind the time floor the system clock may be before the status says so, seconds.
const CLOCK_BEHIND_NOTE_S: u64 = 60;

/// Why a module revoked by the trust document is stopped.
pub(super) fn revoked_cause(key_id: &str) -> String {
    format!("revoked: its bundle was signed by key {key_id}, which the trust document revokes")
}

impl State {
    /// Trust-document mode, with the trust in effect at start (version 0: none yet) and the
    /// store's time floor. Simple mode is the default.
    /// `seen` is the digest of the document in effect, so that the retained copy the broker
    /// sends again at every connect is not evaluated again.
    pub fn set_trust(&mut self, view: Option<TrustView>, time_floor: u64, seen: Option<Sha256>) {
        self.trust = view;
        self.time_floor = time_floor;
        self.trust_seen = seen;
        self.status_dirty = true;
    }

    /// A message on the trust topic.
    pub(super) fn trust_offered(&mut self, payload: Vec<u8>, fx: &mut Vec<Effect>) {
        if self.trust.is_none() || self.stopping.is_some() {
            return;
        }
        if payload.is_empty() {
            fx.push(Effect::Log(
                Level::Info,
                "the retained trust document was cleared; the one in effect stays".into(),
            ));
            return;
        }
        let sha256 = Sha256::of(&payload);
        if self.trust_seen == Some(sha256) {
            return;
        }
        if self.trust_busy {
            self.trust_next = Some(payload.into());
            return;
        }
        self.trust_start(payload.into(), fx);
    }

    fn trust_start(&mut self, document: Arc<[u8]>, fx: &mut Vec<Effect>) {
        let sha256 = Sha256::of(&document);
        let ticket = self.ticket(Pending::Trust { sha256 });
        self.trust_busy = true;
        fx.push(Effect::Trust { ticket, document });
    }

    /// The result of [`Effect::Trust`].
    pub(super) fn trust_done(
        &mut self,
        ticket: u64,
        result: Result<Box<TrustOutcome>, TrustRefusal>,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        let Some(Pending::Trust { sha256 }) = self.pending.remove(&ticket) else {
            return;
        };
        self.trust_busy = false;
        self.status_dirty = true;
        match result {
            Ok(outcome) => {
                let TrustOutcome {
                    policy,
                    view,
                    changed,
                    events,
                } = *outcome;
                self.trust_seen = Some(sha256);
                // The verifier first: every verification asked from here on uses the new policy.
                fx.push(Effect::Policy(policy));
                self.trust = Some(view);
                self.trust_epoch += 1;
                self.record_events(events, fx);
                for record in changed {
                    self.trust_changed(record, fx);
                }
                // Bundles refused under the old trust are evaluated again.
                self.reconsider_refused(now, fx);
            }
            Err(refusal) => {
                if refusal.permanent {
                    self.trust_seen = Some(sha256);
                }
                if refusal.events.is_empty() {
                    fx.push(Effect::Log(
                        Level::Warn,
                        format!("trust_rejected: {}", printable(&refusal.reason)),
                    ));
                }
                self.record_events(refusal.events, fx);
            }
        }
        self.send_events(now, fx);
        if let Some(next) = self.trust_next.take()
            && self.trust_seen != Some(Sha256::of(&next))
        {
            self.trust_start(next, fx);
        }
    }

    /// Events the shell recorded: logged, and published like the state's own.
    fn record_events(&mut self, events: Vec<Event>, fx: &mut Vec<Effect>) {
        for e in events {
            let level = match e.kind {
                EventKind::TrustRejected | EventKind::Revoked => Level::Warn,
                _ => Level::Info,
            };
            let subject = if e.module.is_empty() {
                String::new()
            } else {
                format!(" {}", e.module)
            };
            let reason = e.reason.as_deref().map(printable).unwrap_or_default();
            fx.push(Effect::Log(
                level,
                format!("{}{subject}: {reason}", e.kind.as_str()),
            ));
            self.unacked.insert(e.id, (e, None));
        }
    }

    /// A module record the trust document changed: a revoked version stops (its lines go to
    /// their safe state once its runner has ended); nothing else about the module changes.
    fn trust_changed(&mut self, record: ModuleRecord, fx: &mut Vec<Effect>) {
        let name = record.name.clone();
        let Some(slot) = self.slots.get_mut(&name) else {
            return;
        };
        let cause = match &record.state {
            InstallState::Revoked { key_id } => Some(revoked_cause(key_id)),
            _ => None,
        };
        slot.record = record;
        let Some(cause) = cause else {
            return;
        };
        if matches!(slot.phase, Phase::RollingBack { .. }) {
            // The rollback in flight replaces the revoked version with the previous one.
            return;
        }
        slot.last_error = Some(cause.clone());
        slot.detail = None;
        let phase = std::mem::replace(&mut slot.phase, Phase::Stopped { cause });
        match phase {
            Phase::Running { runner, .. } => {
                fx.push(Effect::Stop { runner });
                self.retiring.insert(runner, Then::Release(name));
            }
            Phase::Waiting { old, .. } => {
                self.retiring.insert(old, Then::Release(name));
            }
            Phase::Preparing { restart: None, .. } if self.booting > 0 => {
                // It was starting with the agent: it no longer holds READY back.
                self.booting -= 1;
                if self.booting == 0 {
                    fx.push(Effect::Ready);
                }
            }
            _ => {}
        }
    }

    /// A bundle verified (or about to be installed) under a trust document no longer in effect:
    /// it goes back to the reconciler and is evaluated again under the current one.
    pub(super) fn reevaluate(
        &mut self,
        module: &str,
        sha256: Sha256,
        now: Now,
        fx: &mut Vec<Effect>,
    ) {
        fx.push(Effect::Log(
            Level::Debug,
            format!("module {module}: the trust document changed; verifying its bundle again"),
        ));
        self.reconciler.abandoned(module, sha256);
        self.reconsider_refused(now, fx);
    }

    /// What the status says about trust: no document yet, or the one in effect expired.
    pub(super) fn trust_note(&self, now: Now) -> Option<String> {
        let t = self.trust?;
        if t.version == 0 {
            return Some(
                "no trust document accepted yet: every bundle is refused until one signed by the \
                 roots arrives on the trust topic"
                    .into(),
            );
        }
        let clock = (now.wall_ms / 1000).max(self.time_floor);
        match t.expires_at {
            Some(e) if e <= clock => Some(format!(
                "trust document version {} expired at unix time {e}: new bundles are refused \
                 until a newer one arrives (installed modules keep running)",
                t.version
            )),
            _ => None,
        }
    }

    /// How far the system clock is behind the time floor, when that is worth reporting.
    pub(super) fn clock_behind_s(&self, now: Now) -> Option<u64> {
        let behind = self.time_floor.saturating_sub(now.wall_ms / 1000);
        (behind > CLOCK_BEHIND_NOTE_S).then_some(behind)
    }
}
