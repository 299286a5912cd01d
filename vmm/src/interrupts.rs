//! Interrupt routing: the in-kernel PIC/IOAPIC routes plus one MSI route per
//! allocated GSI, committed to KVM as one table.

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// GSIs below this are the IOAPIC's pins.
pub const IOAPIC_PINS: u32 = 24;
/// Highest GSI handed out for MSIs.
const MAX_GSI: u32 = 1023;

/// Routing changes failed.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// KVM refused the table.
    #[error("cannot set the interrupt routing table")]
    Kvm(#[source] kvm_ioctls::Error),
    /// All GSIs are in use.
    #[error("no free interrupt lines (GSIs) left")]
    Exhausted,
}

/// The VM's GSI routing table.
pub struct IrqRouting {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

struct State {
    msi: BTreeMap<u32, Option<(u64, u32)>>,
    next: u32,
}

impl std::fmt::Debug for IrqRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqRouting").finish_non_exhaustive()
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

impl IrqRouting {
    /// The default legacy routes; call after `KVM_CREATE_IRQCHIP`.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, IrqError> {
        let r = Self {
            vm,
            state: Mutex::new(State {
                msi: BTreeMap::new(),
                next: IOAPIC_PINS,
            }),
        };
        r.commit(&r.lock())?;
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a GSI for an MSI (unrouted until [`set_msi`](Self::set_msi)).
    pub fn allocate(&self) -> Result<u32, IrqError> {
        let mut st = self.lock();
        if st.next > MAX_GSI {
            return Err(IrqError::Exhausted);
        }
        let gsi = st.next;
        st.next += 1;
        st.msi.insert(gsi, None);
        Ok(gsi)
    }

    /// Routes `gsi` to the MSI message `(address, data)`, or nowhere.
    pub fn set_msi(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), IrqError> {
        let mut st = self.lock();
        if st.msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        st.msi.insert(gsi, msg);
        self.commit(&st)
    }

    fn commit(&self, st: &State) -> Result<(), IrqError> {
        let mut entries = Vec::new();
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for pin in 0..16 {
            if pin == 2 {
                continue; // the cascade
            }
            let (chip, p) = if pin < 8 {
                (KVM_IRQCHIP_PIC_MASTER, pin)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, pin - 8)
            };
            entries.push(irqchip(pin, chip, p));
        }
        for (gsi, msg) in &st.msi {
            if let Some((addr, data)) = msg {
                entries.push(kvm_irq_routing_entry {
                    gsi: *gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        msi: kvm_irq_routing_msi {
                            address_lo: *addr as u32,
                            address_hi: (*addr >> 32) as u32,
                            data: *data,
                            ..Default::default()
                        },
                    },
                    ..Default::default()
                });
            }
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| IrqError::Kvm(kvm_ioctls::Error::new(libc::E2BIG)))?;
        self.vm.set_gsi_routing(&table).map_err(IrqError::Kvm)
    }
}
