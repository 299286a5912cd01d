//! The virtio-pci modern transport: one 64-bit memory BAR holding the common
//! configuration, ISR, device configuration, notification area and the MSI-X
//! table; vendor capabilities point the driver at each.

// Hardware registers and guest-visible structures pack values into
// fixed-width fields: truncating casts here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use tracing::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, status, Activation, CreateContext, Queue, VirtioDevice, VirtioError};
use crate::pci::config::{Bar, Ids, PciConfig};
use crate::pci::msix::{Msix, ENTRY_SIZE};
use crate::pci::{BarAllocator, DeviceInfo, PciDevice, PciError};

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x1_0000;
/// Offsets inside BAR 0.
pub const COMMON: u64 = 0x0000;
/// ISR status byte.
pub const ISR: u64 = 0x1000;
/// Device-specific configuration.
pub const DEVICE: u64 = 0x2000;
/// Queue notifications, 4 bytes per queue.
pub const NOTIFY: u64 = 0x3000;
/// MSI-X table.
pub const MSIX_TABLE: u64 = 0x8000;
/// MSI-X pending bits.
pub const MSIX_PBA: u64 = 0xc000;
const NOTIFY_MULTIPLIER: u32 = 4;
const COMMON_LEN: u64 = 0x3c;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

#[derive(Debug, Clone, Copy, Default)]
struct QueueState {
    size: u16,
    max: u16,
    enabled: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: PciConfig,
    msix: Msix,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    vm: Arc<VmFd>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueState>,
    status: u8,
    generation: u8,
    isr: u8,
    /// Ioeventfds registered for the active queues: (address, eventfd).
    kicks: Vec<(u64, EventFd)>,
    /// Times the driver started the device (DRIVER_OK), reset it, and
    /// times starting it failed (the device is then marked broken).
    activations: u64,
    resets: u64,
    failed_activations: u64,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn class_of(device_type: u32) -> u32 {
    match device_type {
        super::types::BLOCK => 0x01_80_00,
        super::types::NET => 0x02_00_00,
        _ => 0xff_00_00,
    }
}

impl VirtioPci {
    /// Wraps `device`, placing its BAR with `bars`.
    pub fn new(
        ctx: &CreateContext<'_>,
        device: Box<dyn VirtioDevice>,
        bars: &mut BarAllocator,
    ) -> Result<Self, PciError> {
        let t = device.device_type();
        let (nq, max) = device.queues();
        let mut config = PciConfig::new(Ids {
            vendor: 0x1af4,
            device: 0x1040 + t as u16,
            revision: 1,
            class: class_of(t),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        let addr = bars.allocate(BAR_SIZE)?;
        config.add_bar(
            0,
            Bar {
                addr,
                size: BAR_SIZE,
                is_64: true,
            },
        );
        let cap = |cfg_type: u8, offset: u64, len: u64| {
            let mut b = vec![16u8, cfg_type, 0, 0, 0, 0];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b
        };
        config.add_capability(0x09, &cap(1, COMMON, COMMON_LEN), &[]);
        let mut notify = cap(2, NOTIFY, u64::from(nq) * u64::from(NOTIFY_MULTIPLIER));
        notify[0] = 20;
        notify.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(0x09, &notify, &[]);
        config.add_capability(0x09, &cap(3, ISR, 1), &[]);
        config.add_capability(0x09, &cap(4, DEVICE, 0x1000), &[]);
        // One vector per queue plus one for configuration changes.
        let vectors = nq + 1;
        let mut msix_body = Vec::new();
        msix_body.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(0x11, &msix_body, &[0, 0xc0]);
        let msix = Msix::new(vectors, &ctx.vm, ctx.irq.clone()).map_err(|e| {
            PciError::Virtio(VirtioError::Setup {
                what: "cannot set up MSI-X",
                source: std::io::Error::other(e.to_string()),
            })
        })?;
        Ok(Self {
            config,
            msix,
            msix_cap,
            device,
            vm: ctx.vm.clone(),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: vec![
                QueueState {
                    size: max,
                    max,
                    vector: NO_VECTOR,
                    ..Default::default()
                };
                usize::from(nq)
            ],
            status: 0,
            generation: 0,
            isr: 0,
            kicks: Vec::new(),
            activations: 0,
            resets: 0,
            failed_activations: 0,
        })
    }

    fn queue(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let lo = |old: u64| (old & !0xffff_ffff) | (v & 0xffff_ffff);
        let hi = |old: u64| (old & 0xffff_ffff) | ((v & 0xffff_ffff) << 32);
        // Queue fields may not change once the driver is running.
        let live = self.status & status::DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status & status::FEATURES_OK == 0 => {
                let offered = self.device.features();
                match self.driver_feature_select {
                    0 => self.driver_features = lo(self.driver_features) & offered,
                    1 => self.driver_features = hi(self.driver_features) & offered,
                    _ => {}
                }
            }
            0x10 => {
                self.config_vector = if v as usize >= self.msix.len() {
                    NO_VECTOR
                } else {
                    v as u16
                };
                self.update_internal();
            }
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if !live => {
                if let Some(q) = self.queue() {
                    let s = v as u16;
                    // Split rings: a power of two no larger than the maximum.
                    if s.is_power_of_two() && s <= q.max {
                        q.size = s;
                    }
                }
            }
            0x1a => {
                let vectors = self.msix.len();
                if let Some(q) = self.queue() {
                    q.vector = if (v as usize) < vectors {
                        v as u16
                    } else {
                        NO_VECTOR
                    };
                }
                self.update_internal();
            }
            0x1c if !live => {
                if let Some(q) = self.queue() {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if !live => {
                if let Some(q) = self.queue() {
                    let f = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *f = if offset & 4 == 0 { lo(*f) } else { hi(*f) };
                }
            }
            _ => {}
        }
    }

    /// Queue vectors are raised through their irqfd by whoever serves the queue.
    fn update_internal(&mut self) {
        let used: Vec<u16> = self
            .queues
            .iter()
            .map(|q| q.vector)
            .filter(|v| *v != NO_VECTOR)
            .collect();
        self.msix.set_external(&used);
    }

    fn set_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let mut new = new;
        if new & status::FEATURES_OK != 0
            && self.status & status::FEATURES_OK == 0
            && self.driver_features & features::VERSION_1 == 0
        {
            // Legacy drivers are not served: refuse FEATURES_OK.
            new &= !status::FEATURES_OK;
        }
        let starting = new & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = new;
        if starting {
            self.activations += 1;
            if let Err(e) = self.activate() {
                self.failed_activations += 1;
                warn!("virtio device type {}: {e}", self.device.device_type());
                self.status |= status::NEEDS_RESET;
                self.unregister_kicks();
                self.generation = self.generation.wrapping_add(1);
                if self.config_vector != NO_VECTOR {
                    self.msix.signal(self.config_vector);
                }
            }
        }
    }

    fn bar_addr(&self) -> u64 {
        self.config.bar(0).map_or(0, |b| b.addr)
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        let base = self.bar_addr();
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let index = i as u16;
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| VirtioError::Setup {
                what: "cannot create a queue eventfd",
                source,
            })?;
            let addr = base + NOTIFY + u64::from(index) * u64::from(NOTIFY_MULTIPLIER);
            self.vm
                .register_ioevent(&kick, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| VirtioError::Setup {
                    what: "cannot register a queue notification",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
            let kick2 = kick.try_clone().map_err(|source| VirtioError::Setup {
                what: "cannot clone an eventfd",
                source,
            })?;
            self.kicks.push((addr, kick2));
            // A queue without a vector gets an eventfd nobody reads: the
            // driver chose to poll.
            let call = match self.msix.irqfd(q.vector) {
                Some(fd) => fd.try_clone(),
                None => EventFd::new(EFD_NONBLOCK),
            }
            .map_err(|source| VirtioError::Setup {
                what: "cannot clone an interrupt eventfd",
                source,
            })?;
            queues.push(Queue {
                index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick,
                call,
            });
        }
        debug!(
            queues = queues.len(),
            features = format!("{:#x}", self.driver_features),
            "virtio device activated"
        );
        self.device.activate(Activation {
            features: self.driver_features,
            queues,
        })
    }

    fn unregister_kicks(&mut self) {
        for (addr, fd) in self.kicks.drain(..) {
            if let Err(e) =
                self.vm
                    .unregister_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            {
                warn!("cannot unregister a queue notification: {e}");
            }
        }
    }

    fn reset(&mut self) {
        self.resets += 1;
        if self.status & status::DRIVER_OK != 0 {
            self.device.reset();
        }
        self.unregister_kicks();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
        for q in &mut self.queues {
            *q = QueueState {
                size: q.max,
                max: q.max,
                vector: NO_VECTOR,
                ..Default::default()
            };
        }
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, at: usize, len: usize) {
        let control = self.msix_cap + 2;
        if at < control + 2 && at + len > control {
            let c = self.config.read16(control);
            self.msix.set_control(c);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            return data.fill(0xff);
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.read_common(o - COMMON, data),
            ISR => {
                data.fill(0);
                data[0] = std::mem::take(&mut self.isr);
            }
            o if (DEVICE..DEVICE + 0x1000).contains(&o) => {
                self.device.read_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.len() as u64 * ENTRY_SIZE).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o - COMMON, data),
            o if (DEVICE..DEVICE + 0x1000).contains(&o) => {
                self.device.write_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.len() as u64 * ENTRY_SIZE).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE, data)
            }
            // Notifications before DRIVER_OK (no ioeventfd yet) are dropped:
            // nothing runs the queues until then.
            _ => {}
        }
    }

    fn bar_moved(&mut self, _bar: usize, _addr: u64) {
        if self.kicks.is_empty() {
            return;
        }
        // Queue notifications follow the BAR.
        let base = self.bar_addr();
        let old: Vec<(u64, EventFd)> = self.kicks.drain(..).collect();
        for (addr, fd) in old {
            let _ = self
                .vm
                .unregister_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch);
            // BARs are aligned to their size: the offset inside survives.
            let new = base + addr % BAR_SIZE;
            match self
                .vm
                .register_ioevent(&fd, &IoEventAddress::Mmio(new), NoDatamatch)
            {
                Ok(()) => self.kicks.push((new, fd)),
                Err(e) => warn!("cannot move a queue notification: {e}"),
            }
        }
    }

    fn shutdown(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.device.reset();
        }
        self.unregister_kicks();
    }

    fn pause(&mut self) {
        if self.status & status::DRIVER_OK != 0 && self.status & status::NEEDS_RESET == 0 {
            self.device.pause();
        }
    }

    fn resume(&mut self) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::NEEDS_RESET != 0 {
            return;
        }
        if let Err(e) = self.device.resume() {
            warn!(
                "virtio device type {} cannot resume: {e}",
                self.device.device_type()
            );
            self.failed_activations += 1;
            self.status |= status::NEEDS_RESET;
            self.generation = self.generation.wrapping_add(1);
            if self.config_vector != NO_VECTOR {
                self.msix.signal(self.config_vector);
            }
        }
    }

    fn info(&self) -> Option<DeviceInfo> {
        let state = if self.status & status::NEEDS_RESET != 0 {
            "broken"
        } else if self.status & status::DRIVER_OK != 0 {
            "active"
        } else if self.status == 0 {
            "idle"
        } else {
            "starting"
        };
        let mut counters = vec![
            ("activations", self.activations),
            ("resets", self.resets),
            ("failed_activations", self.failed_activations),
        ];
        counters.extend(self.device.counters());
        Some(DeviceInfo {
            slot: 0,
            kind: self.device.describe(),
            state: state.into(),
            counters: counters
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })
    }
}
