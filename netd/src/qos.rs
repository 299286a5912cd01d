//! Per-port QoS: a rate and a burst for each direction, as token buckets.
//! What a VM sends beyond its rate is held back (its transmit ring is not
//! read until the bucket refills, so the guest slows down instead of losing
//! frames); what comes for it beyond its rate is dropped (policed) and
//! counted.

use std::time::{Duration, Instant};

/// A direction's limit: 0 kbit/s means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limit {
    /// Rate in kbit/s (1000 bit/s).
    pub kbps: u32,
    /// Burst in KiB: what may pass at once after a quiet spell.
    pub burst_kib: u32,
}

/// The smallest burst: a bucket must hold a whole large frame.
const MIN_BURST: f64 = 9_216.0;

/// A token bucket counting bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    /// Bytes at most in the bucket.
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `limit` (None when it sets no limit).
    pub fn new(limit: Limit, now: Instant) -> Option<Self> {
        if limit.kbps == 0 {
            return None;
        }
        let burst = (f64::from(limit.burst_kib) * 1024.0).max(MIN_BURST);
        Some(Self {
            rate: f64::from(limit.kbps) * 1000.0 / 8.0,
            burst,
            tokens: burst,
            last: now,
        })
    }

    /// A full bucket of `burst` units refilled at `rate` units a second
    /// (packets, say).
    pub fn counting(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Policing: takes `n` bytes if the bucket holds them.
    pub fn admit(&mut self, n: usize, now: Instant) -> bool {
        self.refill(now);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Shaping: takes `n` bytes, going into debt if need be.
    pub fn debit(&mut self, n: usize, now: Instant) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// How long until the bucket is out of debt (zero if it is not).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A port's two buckets and their limits.
#[derive(Debug, Default)]
pub struct Qos {
    /// Towards the VM (policed).
    pub ingress: Option<TokenBucket>,
    /// From the VM (shaped).
    pub egress: Option<TokenBucket>,
    /// The limits as set.
    pub limits: (Limit, Limit),
}

impl Qos {
    /// Buckets for `ingress` and `egress`.
    pub fn new(ingress: Limit, egress: Limit, now: Instant) -> Self {
        Self {
            ingress: TokenBucket::new(ingress, now),
            egress: TokenBucket::new(egress, now),
            limits: (ingress, egress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policing_lets_the_burst_then_the_rate_through() {
        let t = Instant::now();
        // 8000 kbit/s = 1 MB/s, burst 16 KiB.
        let mut b = TokenBucket::new(
            Limit {
                kbps: 8000,
                burst_kib: 16,
            },
            t,
        )
        .unwrap();
        let passed = (0..100).filter(|_| b.admit(1000, t)).count();
        assert_eq!(passed, 16);
        // 10 ms later: 10 kB more.
        let later = t + Duration::from_millis(10);
        assert_eq!((0..100).filter(|_| b.admit(1000, later)).count(), 10);
        assert!(TokenBucket::new(Limit::default(), t).is_none());
    }

    #[test]
    fn shaping_owes_and_says_how_long_to_wait() {
        let t = Instant::now();
        let mut b = TokenBucket::new(
            Limit {
                kbps: 8000,
                burst_kib: 0,
            },
            t,
        )
        .unwrap();
        b.debit(9216 + 1000, t);
        let w = b.wait(t);
        assert!((w.as_secs_f64() - 0.001).abs() < 1e-6, "{w:?}");
        assert_eq!(b.wait(t + Duration::from_millis(1)), Duration::ZERO);
    }
}
