//! Virtio devices behind the virtio-pci (modern) transport.

pub mod block;
pub mod net_ctrl;
pub mod pci;
pub mod rng;
pub mod vhost_user;
pub mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::interrupts::IrqRouting;
use crate::memory::GuestRam;
use crate::pci::{BarAllocator, PciError, SharedPci};

/// Device type IDs (virtio 1.x, 5).
pub mod types {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
}

/// Feature bits common to every device.
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user: the backend speaks protocol features (never offered to guests).
    pub const VHOST_USER_PROTOCOL: u64 = 1 << 30;
    /// Virtio 1.0 or later.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u8 = 8;
    /// The device failed and needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// A virtio device failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The vhost-user backend's socket could not be reached.
    #[error("cannot reach the vhost-user backend at {}", path.display())]
    Unreachable {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend refused or broke a protocol step.
    #[error("vhost-user backend {}: {step} failed", path.display())]
    Backend {
        /// Socket path.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The protocol error.
        #[source]
        source: vhost::Error,
    },
    /// The backend cannot do what the config asks.
    #[error("vhost-user backend {}: {why}", path.display())]
    Incompatible {
        /// Socket path.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// The guest programmed a queue the device cannot use.
    #[error("queue {queue}: {why}")]
    BadQueue {
        /// Queue index.
        queue: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// A configured device kind is not implemented yet.
    #[error("{0} devices are not supported yet")]
    Unsupported(&'static str),
    /// Setting up interrupts or notifications failed.
    #[error("{what}")]
    Setup {
        /// What.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One queue as the driver programmed it, ready for a backend.
#[derive(Debug)]
pub struct Queue {
    /// Index.
    pub index: u16,
    /// Size.
    pub size: u16,
    /// Descriptor table (guest physical).
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Signalled by the guest's notifications (an ioeventfd).
    pub kick: EventFd,
    /// Signal to interrupt the guest (an irqfd).
    pub call: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Features the driver accepted.
    pub features: u64,
    /// Enabled queues.
    pub queues: Vec<Queue>,
}

/// A device model behind the transport.
pub trait VirtioDevice: Send {
    /// Device type.
    fn device_type(&self) -> u32;
    /// Number of queues and the largest size of each.
    fn queues(&self) -> (u16, u16);
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Reads from the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device on the driver's queues.
    fn activate(&mut self, a: Activation) -> Result<(), VirtioError>;
    /// Stops it (driver reset or VM end); it may be activated again.
    fn reset(&mut self);
    /// Stops touching guest memory until [`VirtioDevice::resume`] (the VM is
    /// pausing); returns once requests in flight are done.
    fn pause(&mut self) {}
    /// Carries on after [`VirtioDevice::pause`].
    fn resume(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// What it is, for people ("virtio-blk vhost-user /run/disk.sock").
    fn describe(&self) -> String;
    /// Counters the device keeps (its backend may keep more).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// What device constructors need.
pub struct CreateContext<'a> {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest RAM (vhost-user shares it).
    pub ram: &'a GuestRam,
    /// Interrupt routing.
    pub irq: Arc<IrqRouting>,
}

/// Creates every virtio device of `config`, in slot order.
pub fn create_all(
    ctx: &CreateContext<'_>,
    config: &VmConfig,
    bars: &mut BarAllocator,
) -> Result<Vec<SharedPci>, PciError> {
    let mut out: Vec<SharedPci> = Vec::new();
    for d in &config.disks {
        let dev = vhost_user::VhostUserDevice::block(d, ctx.ram)?;
        out.push(Arc::new(Mutex::new(pci::VirtioPci::new(
            ctx,
            Box::new(dev),
            bars,
        )?)));
    }
    for n in &config.nets {
        let mac = crate::config::parse_mac(&n.mac).map_err(|why| VirtioError::Incompatible {
            path: n.vhost.socket.clone(),
            why,
        })?;
        let dev = vhost_user::VhostUserDevice::net(&n.vhost, ctx.ram, mac)?;
        out.push(Arc::new(Mutex::new(pci::VirtioPci::new(
            ctx,
            Box::new(dev),
            bars,
        )?)));
    }
    for (i, m) in config.media.iter().enumerate() {
        let dev = block::Media::open(&m.path, i, ctx.ram.mem.clone())?;
        out.push(Arc::new(Mutex::new(pci::VirtioPci::new(
            ctx,
            Box::new(dev),
            bars,
        )?)));
    }
    if config.rng {
        let dev = rng::Rng::new(ctx.ram.mem.clone());
        out.push(Arc::new(Mutex::new(pci::VirtioPci::new(
            ctx,
            Box::new(dev),
            bars,
        )?)));
    }
    Ok(out)
}

/// Host address of `len` bytes at guest address `gpa`, if they lie in one region.
pub fn host_address(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(gpa))?;
    let off = gpa - region.start_addr().0;
    if off.checked_add(len)? > region.len() {
        return None;
    }
    let base = region.as_ptr() as u64;
    Some(base + off)
}
