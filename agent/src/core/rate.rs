//! A token bucket: at most `burst` events at once, refilled at `per_sec` events per second.

use serde::{Deserialize, Serialize};

/// A rate: sustained events per second and the burst allowed on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained events per second.
    pub per_sec: u32,
    /// Events allowed at once.
    pub burst: u32,
}

/// A token bucket driven by a clock reading the caller passes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    /// Tokens in thousandths, so slow rates refill smoothly.
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now_ms: u64) -> Self {
        TokenBucket {
            rate,
            milli_tokens: u64::from(rate.burst) * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let cap = u64::from(self.rate.burst) * 1000;
        let refill = elapsed.saturating_mul(u64::from(self.rate.per_sec));
        self.milli_tokens = self.milli_tokens.saturating_add(refill).min(cap);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_the_burst_then_refuses() {
        let mut b = TokenBucket::new(
            Rate {
                per_sec: 10,
                burst: 3,
            },
            0,
        );
        assert!((0..3).all(|_| b.try_take(0)));
        assert!(!b.try_take(0));
    }

    #[test]
    fn tokens_come_back_at_the_sustained_rate() {
        let mut b = TokenBucket::new(
            Rate {
                per_sec: 10,
                burst: 1,
            },
            0,
        );
        assert!(b.try_take(0));
        assert!(!b.try_take(50));
        assert!(b.try_take(100));
        assert!(!b.try_take(100));
    }

    #[test]
    fn refill_never_exceeds_the_burst_and_clock_steps_back_are_harmless() {
        let mut b = TokenBucket::new(
            Rate {
                per_sec: 1000,
                burst: 2,
            },
            0,
        );
        assert!(b.try_take(1_000_000));
        assert!(b.try_take(1_000_000));
        assert!(!b.try_take(1_000_000));
        assert!(!b.try_take(5));
    }

    #[test]
    fn a_zero_rate_allows_only_the_burst() {
        let mut b = TokenBucket::new(
            Rate {
                per_sec: 0,
                burst: 1,
            },
            0,
        );
        assert!(b.try_take(0));
        assert!(!b.try_take(u64::MAX));
    }
}
