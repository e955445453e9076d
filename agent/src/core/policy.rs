//! What follows a failed guest call: restart after an exponential backoff, or, after too many
//! failures within a window, quarantine (the module stays installed but does not run until a new
//! version arrives or an operator restarts it).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Restart and quarantine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    /// Delay before the first restart.
    pub backoff_initial_ms: u64,
    /// Longest delay between restarts.
    pub backoff_max_ms: u64,
    /// Failures within `window_ms` that quarantine the module.
    pub quarantine_after: u32,
    /// The window failures are counted in.
    pub window_ms: u64,
    /// A module that ran this long after a restart without failing starts its backoff over.
    pub stable_after_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            quarantine_after: 5,
            window_ms: 10 * 60_000,
            stable_after_ms: 60_000,
        }
    }
}

/// The decision after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start a fresh instance after this many milliseconds.
    RestartAfter(u64),
    /// Stop running the module; `failures` happened within the window.
    Quarantine {
        /// Failures counted.
        failures: u32,
    },
}

/// A module's recent failures.
#[derive(Debug, Clone, Default)]
pub struct FailureTracker {
    recent: VecDeque<u64>,
    consecutive: u32,
    /// When the last restart was due.
    resumed_at: Option<u64>,
}

impl FailureTracker {
    /// Records a failure at `now_ms` and decides what follows.
    pub fn on_failure(&mut self, policy: &RestartPolicy, now_ms: u64) -> Decision {
        if self
            .resumed_at
            .is_some_and(|r| now_ms.saturating_sub(r) >= policy.stable_after_ms)
        {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.recent.push_back(now_ms);
        while let Some(&oldest) = self.recent.front() {
            if now_ms.saturating_sub(oldest) >= policy.window_ms {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        let failures = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if failures >= policy.quarantine_after.max(1) {
            return Decision::Quarantine { failures };
        }
        let shift = (self.consecutive - 1).min(32);
        let delay = policy
            .backoff_initial_ms
            .saturating_mul(1u64 << shift)
            .min(policy.backoff_max_ms);
        self.resumed_at = Some(now_ms.saturating_add(delay));
        Decision::RestartAfter(delay)
    }

    /// Forgets everything (a new version, or an operator's restart).
    pub fn reset(&mut self) {
        *self = FailureTracker::default();
    }

    /// Failures counted in the current window.
    pub fn recent_failures(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_initial_ms: 100,
            backoff_max_ms: 1_000,
            quarantine_after: 5,
            window_ms: 60_000,
            stable_after_ms: 10_000,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut t = FailureTracker::default();
        let p = RestartPolicy {
            quarantine_after: 100,
            ..policy()
        };
        let delays: Vec<_> = (0..6).map(|i| t.on_failure(&p, i)).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000, 1000].map(Decision::RestartAfter)
        );
    }

    #[test]
    fn the_nth_failure_within_the_window_quarantines() {
        let mut t = FailureTracker::default();
        for i in 0..4 {
            assert!(matches!(
                t.on_failure(&policy(), i * 1000),
                Decision::RestartAfter(_)
            ));
        }
        assert_eq!(
            t.on_failure(&policy(), 4000),
            Decision::Quarantine { failures: 5 }
        );
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let mut t = FailureTracker::default();
        for i in 0..10 {
            let d = t.on_failure(&policy(), i * 20_000);
            assert!(matches!(d, Decision::RestartAfter(_)), "failure {i}: {d:?}");
        }
    }

    #[test]
    fn a_module_that_ran_long_enough_starts_its_backoff_over_but_the_window_remembers() {
        let mut t = FailureTracker::default();
        assert_eq!(t.on_failure(&policy(), 0), Decision::RestartAfter(100));
        assert_eq!(t.on_failure(&policy(), 200), Decision::RestartAfter(200));
        // Restarted at 400; failing again before 10.4 s keeps doubling.
        assert_eq!(t.on_failure(&policy(), 5_000), Decision::RestartAfter(400));
        // Restarted at 5.4 s, ran until 20 s: stable, so the backoff starts over.
        assert_eq!(t.on_failure(&policy(), 20_000), Decision::RestartAfter(100));
        assert_eq!(t.recent_failures(), 4);
        t.reset();
        assert_eq!(t.recent_failures(), 0);
    }
}
