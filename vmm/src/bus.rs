//! Port I/O and MMIO buses: address ranges mapped to devices.
//!
//! vCPU threads look devices up on every exit; devices can be inserted and
//! removed while the VM runs (PCI BAR moves now, hot-plug later).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus. `offset` is relative to the range start.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors changing a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or overlaps a device already there.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length.
        len: u64,
    },
    /// No device starts at that address.
    #[error("no device at {0:#x}")]
    Missing(u64),
}

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// One address space (I/O ports or memory).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Range>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn ranges(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Range>> {
        self.ranges.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps `device` at `base..base+len`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let overlaps = end.is_none_or(|end| {
            ranges
                .range(..end)
                .next_back()
                .is_some_and(|(b, r)| b + r.len > base)
        });
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// Unmaps the device at `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(drop)
            .ok_or(BusError::Missing(base))
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, u64, SharedDevice)> {
        let ranges = self.ranges();
        let (base, r) = ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off + len as u64 <= r.len).then(|| (*base, off, r.device.clone()))
    }

    /// Runs `f` on the device covering `len` bytes at `addr`; false if none.
    fn dispatch(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut dyn BusDevice, u64, u64),
    ) -> bool {
        let Some((base, off, dev)) = self.find(addr, len) else {
            return false;
        };
        f(
            &mut *dev.lock().unwrap_or_else(|e| e.into_inner()),
            base,
            off,
        );
        true
    }

    /// Dispatches a read; false if no device covers the access (the caller
    /// then returns all ones, as real hardware does).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.dispatch(addr, data.len(), |d, base, off| d.read(base, off, data))
    }

    /// Dispatches a write; false if no device covers it (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.dispatch(addr, data.len(), |d, base, off| d.write(base, off, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, _: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_overlap_and_removal() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(dev.clone(), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev.clone(), 0x110, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x110, 1).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(!bus.read(0x10f, &mut b), "access crossing the end");
        assert!(bus.write(0x101, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(0x100, 1, vec![7])]);
        bus.remove(0x100).unwrap();
        assert!(!bus.write(0x101, &[7]));
        assert_eq!(bus.remove(0x100), Err(BusError::Missing(0x100)));
    }
}
