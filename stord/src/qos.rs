//! Per-volume QoS: the six limits of the product spec as token buckets, shared by
//! every queue of every attachment of the volume and changeable while it is in use.
//!
//! | key | limit | range |
//! | --- | --- | --- |
//! | `read_bytes_sec`, `write_bytes_sec`, `total_bytes_sec` | bytes per second | 0-99 999 999 |
//! | `read_iops_sec`, `write_iops_sec`, `total_iops_sec` | requests per second | 0-99 999 |
//!
//! 0 means unlimited. As in QEMU, a `total_*` limit excludes the `read_*`/`write_*`
//! limits of the same unit. Each bucket holds at most a tenth of a second of tokens,
//! so a volume idle for a while gets no long burst; a request may overdraw a bucket
//! and the next one waits until the debt is repaid.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Largest bytes-per-second limit.
pub const MAX_BYTES_SEC: u64 = 99_999_999;
/// Largest IOPS limit.
pub const MAX_IOPS_SEC: u64 = 99_999;
/// Seconds of tokens a bucket can hold.
const BURST_SECS: f64 = 0.1;

/// Why a QoS specification was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not one of the six keys.
    #[error("unknown QoS key {0:?}")]
    UnknownKey(String),
    /// Outside the key's range.
    #[error("{key} = {value} is out of range 0-{max}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value given.
        value: u64,
        /// Its maximum.
        max: u64,
    },
    /// A total limit set together with a read or write limit of the same unit.
    #[error("{0} cannot be combined with read_{1} or write_{1}")]
    Conflict(&'static str, &'static str),
}

/// The limits of one volume; 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QosSpec {
    /// Read bytes per second.
    pub read_bytes_sec: u64,
    /// Write bytes per second.
    pub write_bytes_sec: u64,
    /// Read+write bytes per second.
    pub total_bytes_sec: u64,
    /// Read requests per second.
    pub read_iops_sec: u64,
    /// Write requests per second.
    pub write_iops_sec: u64,
    /// Read+write requests per second.
    pub total_iops_sec: u64,
}

impl QosSpec {
    /// Builds a spec from `key -> value` pairs (missing keys are 0) and checks it.
    pub fn from_map(map: &BTreeMap<String, u64>) -> Result<Self, Error> {
        let mut s = Self::default();
        for (k, &v) in map {
            let (slot, max) = match k.as_str() {
                "read_bytes_sec" => (&mut s.read_bytes_sec, MAX_BYTES_SEC),
                "write_bytes_sec" => (&mut s.write_bytes_sec, MAX_BYTES_SEC),
                "total_bytes_sec" => (&mut s.total_bytes_sec, MAX_BYTES_SEC),
                "read_iops_sec" => (&mut s.read_iops_sec, MAX_IOPS_SEC),
                "write_iops_sec" => (&mut s.write_iops_sec, MAX_IOPS_SEC),
                "total_iops_sec" => (&mut s.total_iops_sec, MAX_IOPS_SEC),
                _ => return Err(Error::UnknownKey(k.clone())),
            };
            if v > max {
                return Err(Error::OutOfRange {
                    key: k.clone(),
                    value: v,
                    max,
                });
            }
            *slot = v;
        }
        if s.total_bytes_sec > 0 && (s.read_bytes_sec > 0 || s.write_bytes_sec > 0) {
            return Err(Error::Conflict("total_bytes_sec", "bytes_sec"));
        }
        if s.total_iops_sec > 0 && (s.read_iops_sec > 0 || s.write_iops_sec > 0) {
            return Err(Error::Conflict("total_iops_sec", "iops_sec"));
        }
        Ok(s)
    }

    /// The spec as `key -> value`, every key present.
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        [
            ("read_bytes_sec", self.read_bytes_sec),
            ("write_bytes_sec", self.write_bytes_sec),
            ("total_bytes_sec", self.total_bytes_sec),
            ("read_iops_sec", self.read_iops_sec),
            ("write_iops_sec", self.write_iops_sec),
            ("total_iops_sec", self.total_iops_sec),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Direction of a request, for the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// A read.
    Read,
    /// A write.
    Write,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    level: f64,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        #[allow(clippy::cast_precision_loss)] // limits are below 2^27
        let rate = rate as f64;
        Self {
            rate,
            level: rate * BURST_SECS,
        }
    }

    fn refill(&mut self, secs: f64) {
        if self.rate > 0.0 {
            self.level = (self.level + secs * self.rate).min(self.rate * BURST_SECS);
        }
    }

    /// Seconds until the bucket is out of debt. A request may drive the level
    /// negative (a request larger than the bucket must still pass); the next one
    /// then waits for the debt to be repaid, which keeps the average at the rate.
    fn wait(&self) -> f64 {
        if self.rate == 0.0 || self.level >= 0.0 {
            0.0
        } else {
            -self.level / self.rate
        }
    }

    fn take(&mut self, cost: f64) {
        if self.rate > 0.0 {
            self.level -= cost;
        }
    }
}

/// The buckets of one volume.
#[derive(Debug)]
struct Buckets {
    spec: QosSpec,
    // read/write/total bytes, then read/write/total iops.
    b: [Bucket; 6],
    last: Instant,
}

impl Buckets {
    fn new(spec: QosSpec) -> Self {
        Self {
            spec,
            b: [
                Bucket::new(spec.read_bytes_sec),
                Bucket::new(spec.write_bytes_sec),
                Bucket::new(spec.total_bytes_sec),
                Bucket::new(spec.read_iops_sec),
                Bucket::new(spec.write_iops_sec),
                Bucket::new(spec.total_iops_sec),
            ],
            last: Instant::now(),
        }
    }
}

/// A volume's limiter, shared by its attachments.
#[derive(Debug, Clone)]
pub struct Limiter(Arc<Mutex<Buckets>>);

impl Limiter {
    /// A limiter enforcing `spec`.
    pub fn new(spec: QosSpec) -> Self {
        Self(Arc::new(Mutex::new(Buckets::new(spec))))
    }

    /// The limits in force.
    pub fn spec(&self) -> QosSpec {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spec
    }

    /// Replaces the limits; requests already waiting see the new ones at once.
    pub fn set(&self, spec: QosSpec) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Buckets::new(spec);
    }

    /// Blocks the calling queue worker until a `dir` request of `bytes` may run, and
    /// charges it.
    pub fn admit(&self, dir: Dir, bytes: u64) {
        #[allow(clippy::cast_precision_loss)] // request sizes are far below 2^52
        let bytes = bytes as f64;
        let (bytes_i, iops_i) = match dir {
            Dir::Read => (0, 3),
            Dir::Write => (1, 4),
        };
        loop {
            let wait = {
                let mut g = self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                let secs = now.duration_since(g.last).as_secs_f64();
                g.last = now;
                for b in &mut g.b {
                    b.refill(secs);
                }
                let costs = [(bytes_i, bytes), (2, bytes), (iops_i, 1.0), (5, 1.0)];
                let wait = costs
                    .iter()
                    .map(|&(i, _)| g.b[i].wait())
                    .fold(0.0, f64::max);
                if wait == 0.0 {
                    for (i, c) in costs {
                        g.b[i].take(c);
                    }
                    return;
                }
                wait
            };
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.05)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn specs_are_validated_like_the_product_spec() {
        let s = QosSpec::from_map(&map(&[
            ("read_iops_sec", 500),
            ("write_bytes_sec", 1 << 20),
        ]))
        .unwrap();
        assert_eq!(s.read_iops_sec, 500);
        assert_eq!(QosSpec::from_map(&s.to_map()).unwrap(), s);
        assert_eq!(
            QosSpec::from_map(&map(&[("bogus", 1)])),
            Err(Error::UnknownKey("bogus".into()))
        );
        assert!(matches!(
            QosSpec::from_map(&map(&[("total_iops_sec", 100_000)])),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            QosSpec::from_map(&map(&[("read_bytes_sec", 100_000_000)])),
            Err(Error::OutOfRange { .. })
        ));
        assert!(QosSpec::from_map(&map(&[("read_bytes_sec", 99_999_999)])).is_ok());
        assert!(matches!(
            QosSpec::from_map(&map(&[("total_iops_sec", 10), ("read_iops_sec", 5)])),
            Err(Error::Conflict(..))
        ));
    }

    #[test]
    fn unlimited_never_waits() {
        let l = Limiter::new(QosSpec::default());
        let start = Instant::now();
        for _ in 0..100_000 {
            l.admit(Dir::Write, 1 << 20);
        }
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
