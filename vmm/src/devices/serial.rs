//! COM1: a 16550A UART (vm-superio) at port 0x3f8, IRQ 4, wired to the console.

use std::sync::{Arc, Mutex};

use tracing::warn;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::Console;
use crate::bus::BusDevice;

/// I/O port base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Its ISA interrupt.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART on the port bus.
pub struct SerialDevice(Serial<IrqTrigger, NoEvents, Console>);

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART writing to `console` and interrupting through `irq`.
    pub fn new(irq: EventFd, console: Console) -> Self {
        Self(Serial::new(IrqTrigger(irq), console))
    }

    /// Queues console input; bytes beyond the FIFO's room are dropped, as a
    /// real UART overruns.
    pub fn input(dev: &Arc<Mutex<Self>>, bytes: &[u8]) {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = d.0.enqueue_raw_bytes(bytes) {
            warn!("serial input: {e:?}");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.0.write(off, *b) {
                warn!("serial write: {e:?}");
            }
        }
    }
}
