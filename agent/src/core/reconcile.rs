//! The reconciler: desired state (retained bundles addressed to the device and its groups) plus
//! what the device already settled → which bundle to evaluate next. Pure: the shell verifies,
//! installs or rejects, and reports back with [`Reconciler::settled`].
//!
//! Rules: a device-addressed bundle outranks any group's for the same module; among groups, the
//! one listed first in the configuration wins. Seeing the bundle already settled again (a retained
//! message after a reconnect) does nothing. A cleared retained message withdraws an offer but
//! never removes a module: only a signed removal does.
//!
//! Memory: the reconciler keeps an offer's bytes (up to the maximum bundle size each) only until
//! it hands them out — to be evaluated, or, for an offer a higher-ranked one hides, to be looked
//! at once. Afterwards it keeps the digest; should an offer whose bytes it let go become the one
//! to evaluate (the offer above it withdrawn, a reload that reconsiders a rejection), it asks the
//! shell to fetch the retained message again ([`Action::Refetch`]).

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
    /// The offer to evaluate next is one whose bytes were let go: fetch the retained message on
    /// its topic again (it comes back through [`Reconciler::offered`]).
    Refetch {
        /// The module.
        module: String,
        /// Whose topic.
        scope: Scope,
    },
    /// An offer was replaced on its topic before it was evaluated (bundles published back to
    /// back): look at it once, so that it gets a verdict too.
    Replaced {
        /// The module.
        module: String,
        /// Where it came from.
        scope: Scope,
        /// The replaced bundle.
        offer: Offer,
    },
    /// An offer that a higher-ranked one hides arrived: look at it (its seq), so that a newer
    /// version hidden by an older device-addressed one is reported rather than silent.
    Hidden {
        /// The module.
        module: String,
        /// Where the hidden offer came from.
        scope: Scope,
        /// The offer that hides it.
        hidden_by: Scope,
        /// The hidden bundle.
        offer: Offer,
    },
}

/// An offer as kept: its digest, and its bytes until they are handed out.
#[derive(Debug, Clone)]
struct Held {
    sha256: Sha256,
    bytes: Option<Arc<[u8]>>,
}

/// Desired state and settled bundles, per module.
#[derive(Debug, Clone, Default)]
pub struct Reconciler {
    offers: BTreeMap<String, BTreeMap<Scope, Held>>,
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
        let mut actions = Vec::new();
        if payload.is_empty() {
            offers.remove(&scope);
            if offers.is_empty() {
                self.offers.remove(module);
            }
        } else {
            let sha256 = Sha256::of(payload);
            let unchanged = offers.get(&scope).is_some_and(|h| h.sha256 == sha256);
            if !unchanged
                && let Some(Held {
                    sha256: old,
                    bytes: Some(bytes),
                }) = offers.remove(&scope)
            {
                actions.push(Action::Replaced {
                    module: module.to_string(),
                    scope: scope.clone(),
                    offer: Offer { sha256: old, bytes },
                });
            }
            offers.insert(
                scope.clone(),
                Held {
                    sha256,
                    bytes: Some(payload.into()),
                },
            );
            let winner = offers.keys().next().cloned();
            if let Some(hidden_by) = winner.filter(|w| *w != scope) {
                // Outranked: looked at once (unless seen before), then only its digest is kept.
                if let Some(held) = offers.get_mut(&scope)
                    && let Some(bytes) = held.bytes.take()
                    && !unchanged
                {
                    actions.push(Action::Hidden {
                        module: module.to_string(),
                        scope,
                        hidden_by,
                        offer: Offer { sha256, bytes },
                    });
                }
            }
        }
        actions.extend(self.next(module));
        actions
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

    /// The shell stopped working on `sha256` for `module` because it is no longer the offer to
    /// evaluate (replaced or withdrawn meanwhile): what is on offer now is next.
    pub fn cancelled(&mut self, module: &str, sha256: Sha256) -> Vec<Action> {
        self.abandoned(module, sha256);
        self.next(module)
    }

    /// The configured groups changed: offers from groups the device left are dropped, the rest
    /// re-ranked by the new order (`rank` gives a group's new position, `None` if it is gone).
    pub fn regroup(&mut self, rank: impl Fn(&str) -> Option<usize>) {
        for offers in self.offers.values_mut() {
            let old = std::mem::take(offers);
            for (scope, held) in old {
                let scope = match scope {
                    Scope::Device => Some(Scope::Device),
                    Scope::Group(_, name) => rank(&name).map(|i| Scope::Group(i, name)),
                };
                if let Some(scope) = scope {
                    offers.insert(scope, held);
                }
            }
        }
        self.offers.retain(|_, offers| !offers.is_empty());
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

    /// The winning offer for `module`: its scope and digest.
    pub fn winner(&self, module: &str) -> Option<(&Scope, Sha256)> {
        self.offers
            .get(module)?
            .iter()
            .next()
            .map(|(scope, held)| (scope, held.sha256))
    }

    /// Bundle bytes held, over all offers (what the reconciler costs in memory).
    pub fn held_bytes(&self) -> usize {
        self.offers
            .values()
            .flat_map(BTreeMap::values)
            .filter_map(|h| h.bytes.as_ref().map(|b| b.len()))
            .sum()
    }

    fn next(&mut self, module: &str) -> Vec<Action> {
        let pending = self.pending.contains_key(module);
        let settled = self.settled.get(module).copied();
        let Some((scope, held)) = self
            .offers
            .get_mut(module)
            .and_then(|offers| offers.iter_mut().next())
        else {
            return Vec::new();
        };
        if settled == Some(held.sha256) {
            held.bytes = None;
            return Vec::new();
        }
        if pending {
            return Vec::new();
        }
        let action = match held.bytes.take() {
            Some(bytes) => {
                self.pending.insert(module.to_string(), held.sha256);
                Action::Evaluate {
                    module: module.to_string(),
                    scope: scope.clone(),
                    offer: Offer {
                        sha256: held.sha256,
                        bytes,
                    },
                }
            }
            None => Action::Refetch {
                module: module.to_string(),
                scope: scope.clone(),
            },
        };
        vec![action]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluates(actions: &[Action]) -> Vec<(Scope, Vec<u8>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Evaluate { scope, offer, .. } => {
                    Some((scope.clone(), offer.bytes.to_vec()))
                }
                _ => None,
            })
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
        // Outranked: looked at once, then held as a digest only.
        let hidden = r.offered(group(0), "m", b"group");
        assert!(evaluates(&hidden).is_empty(), "outranked");
        assert!(matches!(
            &hidden[..],
            [Action::Hidden { scope, hidden_by: Scope::Device, .. }] if *scope == group(0)
        ));
        assert_eq!(r.held_bytes(), 0);
        // Withdrawn device offer: the group's is next, fetched again from the broker.
        assert_eq!(
            r.offered(Scope::Device, "m", b""),
            [Action::Refetch {
                module: "m".into(),
                scope: group(0)
            }]
        );
        assert_eq!(
            evaluates(&r.offered(group(0), "m", b"group")),
            [(group(0), b"group".to_vec())]
        );
    }

    #[test]
    fn no_bundle_bytes_are_held_once_handed_out() {
        let mut r = Reconciler::default();
        let big = vec![7u8; 1 << 20];
        for i in 0..50u8 {
            let mut b = big.clone();
            b[0] = i;
            // Each a newer offer on a group topic while a device offer outranks it.
            r.offered(Scope::Device, "m", b"device");
            r.settled("m", Sha256::of(b"device"));
            r.offered(group(0), "m", &b);
            r.offered(Scope::Device, &format!("n{i}"), &b);
            r.settled(&format!("n{i}"), Sha256::of(&b));
        }
        // Fifty 1 MiB bundles offered, outranked, evaluated or rejected: none kept.
        assert_eq!(r.held_bytes(), 0);
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
        // v3 replaces v2 before v2 was looked at: v2 is handed out once, to be reported.
        assert_eq!(
            r.offered(Scope::Device, "m", b"v3"),
            [Action::Replaced {
                module: "m".into(),
                scope: Scope::Device,
                offer: Offer {
                    sha256: Sha256::of(b"v2"),
                    bytes: b"v2"[..].into()
                }
            }]
        );
        r.offered(Scope::Device, "m", b"v2");
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
        // Its bytes were let go: the shell fetches them again, then it is evaluated.
        assert_eq!(
            r.reconsider(accepted),
            [Action::Refetch {
                module: "bad".into(),
                scope: Scope::Device
            }]
        );
        assert_eq!(
            evaluates(&r.offered(Scope::Device, "bad", b"x")),
            [(Scope::Device, b"x".to_vec())]
        );
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
