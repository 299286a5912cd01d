//! PCI bus 0: configuration mechanism #1 (ports 0xcf8/0xcfc), a host bridge in
//! slot 0 and one device per slot after it. BARs are placed by the VMM, as
//! firmware would, in the 32-bit window; the guest may move them and the MMIO
//! bus follows. Slots are looked up at run time, so devices can be added and
//! removed while the VM runs (the hot-plug controller comes later).

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use tracing::{info, warn};

use crate::arch::layout;
use crate::bus::{Bus, BusDevice, BusError};
use crate::config::VmConfig;
use crate::interrupts::IrqRouting;
use crate::memory::GuestRam;
use crate::virtio::{self, VirtioError};
use config::{BarMove, Ids, PciConfig};

/// Port of the configuration address register.
pub const CONFIG_ADDRESS: u64 = 0xcf8;
/// Slots on bus 0.
pub const SLOTS: usize = 32;
/// Devices that fit besides the host bridge.
pub const MAX_DEVICES: usize = SLOTS - 1;

/// A device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A virtio device failed (for example its backend is unreachable).
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// Placing a BAR failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The 32-bit window is full.
    #[error("no room left for PCI BARs")]
    NoSpace,
    /// No free slot.
    #[error("the PCI bus is full")]
    Full,
}

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &PciConfig;
    /// The configuration space, for writes.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A configuration write happened at `at` (after it was applied).
    fn config_written(&mut self, _at: usize, _len: usize) {}
    /// Guest read inside BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write inside BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now lives at `addr`.
    fn bar_moved(&mut self, _bar: usize, _addr: u64) {}
    /// The VM is ending: stop backends and threads.
    fn shutdown(&mut self) {}
    /// The VM pauses: stop touching guest memory (requests in flight end).
    fn pause(&mut self) {}
    /// The VM resumes.
    fn resume(&mut self) {}
    /// What it is, its state and counters (devices beyond the host bridge).
    fn info(&self) -> Option<DeviceInfo> {
        None
    }
}

/// A device as the control socket and D-Bus show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// PCI slot on bus 0.
    pub slot: u32,
    /// What it is ("virtio-blk vhost-user /run/d.sock").
    pub kind: String,
    /// "idle" (no driver yet), "starting", "active" or "broken".
    pub state: String,
    /// Counters by name.
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// A shared PCI device.
pub type SharedPci = Arc<Mutex<dyn PciDevice>>;

fn lock(d: &SharedPci) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.0
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// Routes MMIO accesses of one BAR to its device.
struct BarMapping {
    dev: SharedPci,
    bar: usize,
}

impl BusDevice for BarMapping {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}

/// Allocates BAR addresses in the 32-bit window.
#[derive(Debug)]
pub struct BarAllocator {
    next: u64,
}

impl BarAllocator {
    /// `size` bytes aligned to `size`.
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        let addr = self.next.next_multiple_of(size);
        let end = addr.checked_add(size).ok_or(PciError::NoSpace)?;
        if end > layout::MMIO32_END {
            return Err(PciError::NoSpace);
        }
        self.next = end;
        Ok(addr)
    }
}

struct State {
    address: u32,
    slots: Vec<Option<SharedPci>>,
}

/// The root complex.
pub struct PciRoot {
    state: Mutex<State>,
    mmio: Arc<Bus>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot").finish_non_exhaustive()
    }
}

impl PciRoot {
    /// The bus with every device `config` asks for.
    pub fn new(
        vm: &Arc<VmFd>,
        ram: &GuestRam,
        irq: &Arc<IrqRouting>,
        mmio: &Arc<Bus>,
        config: &VmConfig,
    ) -> Result<Arc<Self>, PciError> {
        let bridge = PciConfig::new(Ids {
            vendor: 0x1b36, // Red Hat, the usual ID of paravirtual host bridges
            device: 0x0008,
            revision: 0,
            class: 0x06_00_00,
            subsystem_vendor: 0x1b36,
            subsystem: 0x0008,
        });
        let root = Arc::new(Self {
            state: Mutex::new(State {
                address: 0,
                slots: vec![None; SLOTS],
            }),
            mmio: mmio.clone(),
        });
        root.plug(Arc::new(Mutex::new(HostBridge(bridge))))?;
        let mut bars = BarAllocator {
            next: layout::MMIO32_START,
        };
        let ctx = virtio::CreateContext {
            vm: vm.clone(),
            ram,
            irq: irq.clone(),
        };
        for dev in virtio::create_all(&ctx, config, &mut bars)? {
            root.plug(dev)?;
        }
        Ok(root)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `dev` in the first free slot and maps its BARs; returns the slot.
    pub fn plug(&self, dev: SharedPci) -> Result<usize, PciError> {
        let mut st = self.state();
        let slot = st
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::Full)?;
        for bar in 0..6 {
            if let Some(b) = lock(&dev).config().bar(bar) {
                let m = Arc::new(Mutex::new(BarMapping {
                    dev: dev.clone(),
                    bar,
                }));
                self.mmio.insert(m, b.addr, b.size)?;
            }
        }
        st.slots[slot] = Some(dev);
        info!(slot, "PCI device plugged");
        Ok(slot)
    }

    /// Every device but the host bridge, in slot order.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let slots: Vec<(usize, SharedPci)> = self
            .state()
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.clone().map(|d| (i, d)))
            .collect();
        slots
            .into_iter()
            .filter_map(|(i, d)| {
                let mut info = lock(&d).info()?;
                info.slot = u32::try_from(i).unwrap_or(u32::MAX);
                Some(info)
            })
            .collect()
    }

    /// Quiesces every device (the vCPUs are parked).
    pub fn pause(&self) {
        let slots: Vec<SharedPci> = self.state().slots.iter().flatten().cloned().collect();
        for d in slots {
            lock(&d).pause();
        }
    }

    /// Lets every device run again (before the vCPUs do).
    pub fn resume(&self) {
        let slots: Vec<SharedPci> = self.state().slots.iter().flatten().cloned().collect();
        for d in slots {
            lock(&d).resume();
        }
    }

    /// Stops every device.
    pub fn shutdown(&self) {
        let slots: Vec<SharedPci> = self.state().slots.iter().flatten().cloned().collect();
        for d in slots {
            lock(&d).shutdown();
        }
    }

    fn device(&self, address: u32) -> Option<(SharedPci, usize)> {
        let enabled = address & 0x8000_0000 != 0;
        let bus = (address >> 16) & 0xff;
        let slot = ((address >> 11) & 0x1f) as usize;
        let function = (address >> 8) & 0x7;
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        let dev = self.state().slots[slot].clone()?;
        Some((dev, (address & 0xfc) as usize))
    }

    fn config_read(&self, offset: usize, data: &mut [u8]) {
        let address = self.state().address;
        match self.device(address) {
            Some((dev, reg)) => lock(&dev).config().read(reg + offset, data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, offset: usize, data: &[u8]) {
        let address = self.state().address;
        let Some((dev, reg)) = self.device(address) else {
            return;
        };
        let moved = {
            let mut d = lock(&dev);
            let moved = d.config_mut().write(reg + offset, data);
            d.config_written(reg + offset, data.len());
            moved
        };
        if let Some(m) = moved {
            self.move_bar(&dev, m);
        }
    }

    fn move_bar(&self, dev: &SharedPci, m: BarMove) {
        let Some(b) = lock(dev).config().bar(m.bar) else {
            return;
        };
        let _ = self.mmio.remove(m.old);
        let mapping = Arc::new(Mutex::new(BarMapping {
            dev: dev.clone(),
            bar: m.bar,
        }));
        if let Err(e) = self.mmio.insert(mapping, m.new, b.size) {
            // Overlapping another BAR or in flight during sizing: unmapped
            // until the guest writes a usable address.
            warn!("BAR {} at {:#x}: {e}", m.bar, m.new);
            return;
        }
        lock(dev).bar_moved(m.bar, m.new);
    }
}

/// The root complex on the port bus.
pub struct ConfigIo(pub Arc<PciRoot>);

impl BusDevice for ConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.0.state().address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
        } else {
            self.0.config_read(offset as usize - 4, data);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                self.0.state().address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
        } else {
            self.0.config_write(offset as usize - 4, data);
        }
    }
}
