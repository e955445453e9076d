//! The reconciler: desired state (retained bundles addressed to the device and its groups) plus
//! what the device already settled → which bundle to evaluate next. Pure: the shell verifies,
//! installs or rejects, and reports back with [`Reconciler::settled`].
//!
//! Rules: a device-addressed bundle outranks any group's for the same module; among groups, the
//! one listed first in the configuration wins. Seeing the bundle already settled again (a retained
//! message after a reconnect) does nothing. A cleared retained message withdraws an offer but
//! never removes a module: only a signed removal does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::manifest::Sha256;
use super::topics::Scope;

/// A bundle on offer for a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// SHA-256 of the bundle bytes.
    pub sha256: Sha256,
    /// The bundle.
    pub bytes: Arc<[u8]>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Verify this bundle and act on it (install, remove, or reject with an event).
    Evaluate {
        /// The module the topic named.
        module: String,
        /// Where the bundle came from.
        scope: Scope,
        /// The bundle.
        offer: Offer,
    },
}

/// Desired state and settled bundles, per module.
#[derive(Debug, Clone, Default)]
pub struct Reconciler {
    offers: BTreeMap<String, BTreeMap<Scope, Offer>>,
    settled: HashMap<String, Sha256>,
    pending: HashMap<String, Sha256>,
}

impl Reconciler {
    /// A reconciler that knows which bundle each module last settled on (from the store).
    pub fn new(settled: impl IntoIterator<Item = (String, Sha256)>) -> Self {
        Reconciler {
            settled: settled.into_iter().collect(),
            ..Default::default()
        }
    }

    /// A retained message arrived on a desired topic (an empty payload clears the offer).
    pub fn offered(&mut self, scope: Scope, module: &str, payload: &[u8]) -> Vec<Action> {
        let offers = self.offers.entry(module.to_string()).or_default();
        if payload.is_empty() {
            offers.remove(&scope);
        } else {
            offers.insert(
                scope,
                Offer {
                    sha256: Sha256::of(payload),
                    bytes: payload.into(),
                },
            );
        }
        self.next(module)
    }

    /// The shell finished with `sha256` for `module` (installed, removed or rejected for good).
    pub fn settled(&mut self, module: &str, sha256: Sha256) -> Vec<Action> {
        self.settled.insert(module.to_string(), sha256);
        if self.pending.get(module) == Some(&sha256) {
            self.pending.remove(module);
        }
        self.next(module)
    }

    /// The shell could not finish with `sha256` for now (storage trouble): it will be tried again
    /// when it is offered again.
    pub fn abandoned(&mut self, module: &str, sha256: Sha256) {
        if self.pending.get(module) == Some(&sha256) {
            self.pending.remove(module);
        }
    }

    /// The configured groups changed: offers from groups the device left are dropped, the rest
    /// re-ranked by the new order (`rank` gives a group's new position, `None` if it is gone).
    pub fn regroup(&mut self, rank: impl Fn(&str) -> Option<usize>) {
        for offers in self.offers.values_mut() {
            let old = std::mem::take(offers);
            for (scope, offer) in old {
                let scope = match scope {
                    Scope::Device => Some(Scope::Device),
                    Scope::Group(_, name) => rank(&name).map(|i| Scope::Group(i, name)),
                };
                if let Some(scope) = scope {
                    offers.insert(scope, offer);
                }
            }
        }
    }

    /// Evaluates again every winning offer the device settled on without accepting it (a
    /// rejection), after something that decides acceptance changed (trusted keys, say).
    /// `accepted` gives the bundle last accepted for a module (installed or removed), if any.
    pub fn reconsider(&mut self, accepted: impl Fn(&str) -> Option<Sha256>) -> Vec<Action> {
        let modules: Vec<String> = self.offers.keys().cloned().collect();
        let mut actions = Vec::new();
        for module in modules {
            if let Some(settled) = self.settled.get(&module)
                && accepted(&module) != Some(*settled)
            {
                self.settled.remove(&module);
            }
            actions.extend(self.next(&module));
        }
        actions
    }

    /// The winning offer for `module`, if any.
    pub fn winner(&self, module: &str) -> Option<(&Scope, &Offer)> {
        self.offers.get(module)?.iter().next()
    }

    fn next(&mut self, module: &str) -> Vec<Action> {
        let Some((scope, offer)) = self.winner(module) else {
            return Vec::new();
        };
        if self.settled.get(module) == Some(&offer.sha256) || self.pending.contains_key(module) {
            return Vec::new();
        }
        let action = Action::Evaluate {
            module: module.to_string(),
            scope: scope.clone(),
            offer: offer.clone(),
        };
        self.pending.insert(module.to_string(), offer.sha256);
        vec![action]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluates(actions: &[Action]) -> Vec<(Scope, Vec<u8>)> {
        actions
            .iter()
            .map(|Action::Evaluate { scope, offer, .. }| (scope.clone(), offer.bytes.to_vec()))
            .collect()
    }

    fn group(i: usize) -> Scope {
        Scope::Group(i, format!("g{i}"))
    }

    #[test]
    fn a_new_bundle_is_evaluated_once() {
        let mut r = Reconciler::default();
        assert_eq!(
            evaluates(&r.offered(Scope::Device, "m", b"v1")),
            [(Scope::Device, b"v1".to_vec())]
        );
        // Seen again while being evaluated, and after it settled: nothing.
        assert!(r.offered(Scope::Device, "m", b"v1").is_empty());
        assert!(r.settled("m", Sha256::of(b"v1")).is_empty());
        assert!(r.offered(Scope::Device, "m", b"v1").is_empty());
        assert_eq!(evaluates(&r.offered(Scope::Device, "m", b"v2")).len(), 1);
    }

    #[test]
    fn what_the_store_settled_before_a_restart_is_not_evaluated_again() {
        let mut r = Reconciler::new([("m".to_string(), Sha256::of(b"v1"))]);
        assert!(r.offered(Scope::Device, "m", b"v1").is_empty());
    }

    #[test]
    fn a_device_bundle_outranks_a_group_bundle() {
        let mut r = Reconciler::default();
        let a = r.offered(Scope::Device, "m", b"device");
        r.settled("m", Sha256::of(b"device"));
        assert_eq!(evaluates(&a)[0].0, Scope::Device);
        assert!(r.offered(group(0), "m", b"group").is_empty(), "outranked");
        // Withdrawn device offer: the group's is next.
        assert_eq!(
            evaluates(&r.offered(Scope::Device, "m", b"")),
            [(group(0), b"group".to_vec())]
        );
    }

    #[test]
    fn earlier_groups_outrank_later_ones() {
        let mut r = Reconciler::default();
        r.offered(group(1), "m", b"late");
        r.settled("m", Sha256::of(b"late"));
        assert_eq!(
            evaluates(&r.offered(group(0), "m", b"early"))[0].0,
            group(0)
        );
    }

    #[test]
    fn one_evaluation_per_module_at_a_time() {
        let mut r = Reconciler::default();
        assert_eq!(r.offered(Scope::Device, "m", b"v1").len(), 1);
        assert!(
            r.offered(Scope::Device, "m", b"v2").is_empty(),
            "v1 still in flight"
        );
        // When v1 settles, the newer offer follows.
        assert_eq!(
            evaluates(&r.settled("m", Sha256::of(b"v1"))),
            [(Scope::Device, b"v2".to_vec())]
        );
        // Other modules are independent.
        assert_eq!(r.offered(Scope::Device, "n", b"x").len(), 1);
    }

    #[test]
    fn an_abandoned_evaluation_is_retried_when_offered_again() {
        let mut r = Reconciler::default();
        r.offered(Scope::Device, "m", b"v1");
        r.abandoned("m", Sha256::of(b"v1"));
        assert_eq!(r.offered(Scope::Device, "m", b"v1").len(), 1);
    }

    #[test]
    fn a_rejected_offer_is_evaluated_again_when_reconsidered_but_an_accepted_one_is_not() {
        let mut r = Reconciler::default();
        r.offered(Scope::Device, "ok", b"v1");
        r.settled("ok", Sha256::of(b"v1"));
        r.offered(Scope::Device, "bad", b"x");
        r.settled("bad", Sha256::of(b"x"));
        let accepted = |m: &str| (m == "ok").then(|| Sha256::of(b"v1"));
        let again = evaluates(&r.reconsider(accepted));
        assert_eq!(again, [(Scope::Device, b"x".to_vec())]);
    }

    #[test]
    fn offers_of_a_group_the_device_left_are_dropped() {
        let mut r = Reconciler::default();
        r.offered(group(0), "m", b"a");
        r.settled("m", Sha256::of(b"a"));
        r.offered(group(1), "n", b"b");
        r.settled("n", Sha256::of(b"b"));
        // g0 is gone, g1 is now first.
        r.regroup(|g| (g == "g1").then_some(0));
        assert!(r.winner("m").is_none());
        assert_eq!(
            r.winner("n").map(|(s, _)| s.clone()),
            Some(Scope::Group(0, "g1".into()))
        );
    }

    #[test]
    fn clearing_every_offer_does_nothing() {
        let mut r = Reconciler::default();
        r.offered(Scope::Device, "m", b"v1");
        r.settled("m", Sha256::of(b"v1"));
        assert!(r.offered(Scope::Device, "m", b"").is_empty());
        assert!(r.winner("m").is_none());
    }
}
