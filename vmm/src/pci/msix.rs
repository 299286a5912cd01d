//! MSI-X: the vector table in a BAR, each vector a KVM GSI with an irqfd that
//! devices (or vhost-user backends) signal.

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::sync::Arc;

use kvm_ioctls::VmFd;
use tracing::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupts::{IrqError, IrqRouting};

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const FUNCTION_MASK: u16 = 1 << 14;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    addr: u64,
    data: u32,
    ctrl: u32,
}

/// One vector's interrupt line.
#[derive(Debug)]
pub struct Vector {
    /// KVM GSI routed to the vector's message.
    pub gsi: u32,
    /// Signalling it raises the interrupt.
    pub irqfd: EventFd,
}

/// A function's MSI-X state.
#[derive(Debug)]
pub struct Msix {
    entries: Vec<Entry>,
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    irq: Arc<IrqRouting>,
    /// Raised by the VMM while masked (the pending bit).
    pending: Vec<bool>,
    /// Raised by a backend or device thread straight through the irqfd (queue
    /// vectors), so `pending` cannot be known for it.
    external: Vec<bool>,
}

/// MSI-X set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    /// No GSI or routing.
    #[error(transparent)]
    Irq(#[from] IrqError),
    /// The irqfd could not be created or registered.
    #[error("cannot create an interrupt eventfd")]
    Eventfd(#[source] std::io::Error),
    /// KVM refused the irqfd.
    #[error("cannot register an irqfd")]
    Kvm(#[source] kvm_ioctls::Error),
}

impl Msix {
    /// `count` vectors, all masked, each with its own GSI and irqfd.
    pub fn new(count: u16, vm: &VmFd, irq: Arc<IrqRouting>) -> Result<Self, MsixError> {
        let mut vectors = Vec::new();
        for _ in 0..count {
            let gsi = irq.allocate()?;
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(MsixError::Eventfd)?;
            vm.register_irqfd(&irqfd, gsi).map_err(MsixError::Kvm)?;
            vectors.push(Vector { gsi, irqfd });
        }
        Ok(Self {
            entries: vec![
                Entry {
                    ctrl: CTRL_MASKED,
                    ..Default::default()
                };
                usize::from(count)
            ],
            vectors,
            enabled: false,
            function_masked: false,
            irq,
            pending: vec![false; usize::from(count)],
            external: vec![false; usize::from(count)],
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The vector's irqfd (to hand to a backend), if the vector exists.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.irqfd)
    }

    /// Raises `vector` from the VMM; held as pending while it is masked.
    pub fn signal(&mut self, vector: u16) {
        let i = usize::from(vector);
        if i >= self.vectors.len() {
            return;
        }
        if self.unmasked(i) {
            let _ = self.vectors[i].irqfd.write(1);
        } else {
            self.pending[i] = true;
        }
    }

    /// Marks the vectors queues use: backends and device threads signal them
    /// straight through the irqfd, so what arrives while they are masked cannot
    /// be seen, and unmasking them fires once (a spurious interrupt instead of
    /// a lost one). Other vectors keep exact pending bits.
    pub fn set_external(&mut self, external: &[u16]) {
        self.external.fill(false);
        for v in external {
            if let Some(x) = self.external.get_mut(usize::from(*v)) {
                *x = true;
            }
        }
    }

    fn unmasking(&mut self, i: usize) {
        if std::mem::take(&mut self.pending[i]) || self.external[i] {
            let _ = self.vectors[i].irqfd.write(1);
        }
    }

    fn unmasked(&self, i: usize) -> bool {
        self.enabled && !self.function_masked && self.entries[i].ctrl & CTRL_MASKED == 0
    }

    fn route(&self, i: usize) {
        let e = self.entries[i];
        let msg = self.unmasked(i).then_some((e.addr, e.data));
        if let Err(e) = self.irq.set_msi(self.vectors[i].gsi, msg) {
            warn!("MSI-X vector {i}: {e}");
        }
    }

    /// The message control word changed (enable / function mask bits).
    pub fn set_control(&mut self, control: u16) {
        let before: Vec<bool> = (0..self.entries.len()).map(|i| self.unmasked(i)).collect();
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & FUNCTION_MASK != 0;
        for (i, was) in before.into_iter().enumerate() {
            self.route(i);
            if !was && self.unmasked(i) {
                self.unmasking(i);
            }
        }
    }

    /// Guest read from the table (offset within the table).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (i, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = self.entries.get(i) else { return };
        let words = [e.addr as u32, (e.addr >> 32) as u32, e.data, e.ctrl];
        let mut bytes = [0u8; 16];
        for (k, w) in words.iter().enumerate() {
            bytes[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
        }
        let start = field as usize;
        let n = data.len().min(16 - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }

    /// Guest write to the table.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (i, field) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE) as usize,
        );
        let Some(e) = self.entries.get(i).copied() else {
            return;
        };
        let was = self.unmasked(i);
        let mut bytes = [0u8; 16];
        for (k, w) in [e.addr as u32, (e.addr >> 32) as u32, e.data, e.ctrl]
            .iter()
            .enumerate()
        {
            bytes[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
        }
        let n = data.len().min(16 - field);
        bytes[field..field + n].copy_from_slice(&data[..n]);
        let w = |k: usize| {
            u32::from_le_bytes([
                bytes[4 * k],
                bytes[4 * k + 1],
                bytes[4 * k + 2],
                bytes[4 * k + 3],
            ])
        };
        self.entries[i] = Entry {
            addr: u64::from(w(0)) | (u64::from(w(1)) << 32),
            data: w(2),
            ctrl: w(3) & CTRL_MASKED,
        };
        if self.entries[i] != e {
            self.route(i);
            if !was && self.unmasked(i) {
                self.unmasking(i);
            }
        }
    }
}
