//! Guest-to-host signalling ports.
//!
//! * Boot timer, port 0x440: any byte written is a boot stage; the VMM logs it
//!   with the time since the process started, so boot time is measured without
//!   parsing guest output (`printf U | dd of=/dev/port bs=1 seek=1088`).
//! * Debug exit, port 0x501, only with `debug_exit` in the config: writing a
//!   byte ends the VM with that status (for test guests).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::info;

use crate::bus::BusDevice;
use crate::vm::{Exit, ExitReason};

/// Boot timer port.
pub const BOOT_TIMER: u64 = 0x440;
/// Debug exit port.
pub const DEBUG_EXIT: u64 = 0x501;

/// One stamp from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The byte the guest wrote.
    pub stage: u8,
    /// Microseconds since the VMM process started.
    pub micros: u64,
}

/// The boot timer.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    stamps: Arc<Mutex<Vec<Stamp>>>,
}

impl BootTimer {
    /// A timer counting from `start`, recording into `stamps`.
    pub fn new(start: Instant, stamps: Arc<Mutex<Vec<Stamp>>>) -> Self {
        Self { start, stamps }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let Some(&stage) = data.first() else { return };
        let micros = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        info!(stage, micros, "boot timer");
        let mut s = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < 256 {
            s.push(Stamp { stage, micros });
        }
    }
}

/// The debug exit port.
#[derive(Debug)]
pub struct DebugExit(pub Arc<Exit>);

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.0.set(ExitReason::GuestExit(code));
        }
    }
}
