//! vhost-user frontends: the device's queues are served by another process
//! (stord, netd, or any standard backend) that maps guest memory from our
//! memfd and is kicked and interrupts through eventfds KVM wires directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::net_ctrl::{self, Control, Pairs, NET_F_CTRL_VQ, NET_F_MQ};
use super::worker::Served;
use super::{features, host_address, types, Activation, VirtioDevice, VirtioError};
use crate::config::VhostUserConfig;
use crate::memory::GuestRam;

/// virtio-blk feature bits we pass through from a backend.
const BLK_FEATURES: u64 = (1 << 1) // SIZE_MAX
    | (1 << 2) // SEG_MAX
    | (1 << 4) // GEOMETRY
    | (1 << 5) // RO
    | (1 << 6) // BLK_SIZE
    | (1 << 9) // FLUSH
    | (1 << 10) // TOPOLOGY
    | (1 << 11) // CONFIG_WCE
    | (1 << 12) // MQ
    | (1 << 13) // DISCARD
    | (1 << 14); // WRITE_ZEROES
const BLK_F_MQ: u64 = 1 << 12;
/// Bytes of virtio_blk_config we fetch (through write_zeroes_may_unmap).
const BLK_CONFIG_LEN: u32 = 60;

/// A vhost-user device.
pub struct VhostUserDevice {
    path: PathBuf,
    frontend: Frontend,
    device_type: u32,
    offered: u64,
    /// What the backend offered (only those bits are acked to it).
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    has_protocol: bool,
    config: Vec<u8>,
    num_queues: u16,
    queue_size: u16,
    mem: GuestMemoryMmap,
    regions: Vec<VhostUserMemoryRegionInfo>,
    active: Vec<u16>,
    /// The rings as the driver set them up, to restart them after a pause.
    rings: Vec<Ring>,
    paused: bool,
    /// A multi-queue NIC's pairs (None: one pair, no control queue).
    pairs: Option<Arc<Pairs>>,
    /// Whether the driver took more than one pair (rings beyond the pairs in
    /// use stay disabled in the backend).
    multiqueue: bool,
    /// The control queue's worker (the VMM answers it, not the backend).
    control: Served,
}

/// One ring's setup: what the backend needs to (re)start it.
struct Ring {
    index: u16,
    size: u16,
    addrs: (u64, u64, u64),
    kick: EventFd,
    call: EventFd,
    /// Where the backend stopped (GET_VRING_BASE at pause).
    base: u16,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn step(path: &Path, step: &'static str) -> impl FnOnce(vhost::Error) -> VirtioError {
    let path = path.to_owned();
    move |source| VirtioError::Backend { path, step, source }
}

/// What sits behind the socket.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// vhost-user-blk.
    Block,
    /// vhost-user-net with this MAC address.
    Net([u8; 6]),
}

/// virtio-net feature bits passed through from a backend: checksum and
/// segmentation offloads (TCP and UDP), mergeable receive buffers.
const NET_FEATURES: u64 = (1 << 0) // CSUM
    | (1 << 1) // GUEST_CSUM
    | (1 << 7) // GUEST_TSO4
    | (1 << 8) // GUEST_TSO6
    | (1 << 9) // GUEST_ECN
    | (1 << 10) // GUEST_UFO
    | (1 << 11) // HOST_TSO4
    | (1 << 12) // HOST_TSO6
    | (1 << 13) // HOST_ECN
    | (1 << 14) // HOST_UFO
    | (1 << 15) // MRG_RXBUF
    | (1 << 54) // GUEST_USO4
    | (1 << 55) // GUEST_USO6
    | (1 << 56); // HOST_USO
/// Offered by the VMM itself: the MAC and link status live in our config space.
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;

impl VhostUserDevice {
    /// Connects to a vhost-user-blk backend and reads its configuration.
    pub fn block(cfg: &VhostUserConfig, ram: &GuestRam) -> Result<Self, VirtioError> {
        Self::connect(cfg, ram, Kind::Block)
    }

    /// Connects to a vhost-user-net backend; the NIC gets `mac`.
    pub fn net(cfg: &VhostUserConfig, ram: &GuestRam, mac: [u8; 6]) -> Result<Self, VirtioError> {
        Self::connect(cfg, ram, Kind::Net(mac))
    }

    fn connect(cfg: &VhostUserConfig, ram: &GuestRam, kind: Kind) -> Result<Self, VirtioError> {
        let path = cfg.socket.clone();
        let mut frontend =
            Frontend::connect(&path, u64::from(cfg.num_queues)).map_err(|source| {
                VirtioError::Unreachable {
                    path: path.clone(),
                    source,
                }
            })?;
        frontend.set_owner().map_err(step(&path, "SET_OWNER"))?;
        let backend_features = frontend
            .get_features()
            .map_err(step(&path, "GET_FEATURES"))?;
        let has_protocol = backend_features & features::VHOST_USER_PROTOCOL != 0;
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if has_protocol {
            let theirs = frontend
                .get_protocol_features()
                .map_err(step(&path, "GET_PROTOCOL_FEATURES"))?;
            protocol = theirs & wanted;
            frontend
                .set_protocol_features(protocol)
                .map_err(step(&path, "SET_PROTOCOL_FEATURES"))?;
        }
        if backend_features & features::VERSION_1 == 0 {
            return Err(VirtioError::Incompatible {
                path,
                why: "it does not offer VIRTIO_F_VERSION_1".into(),
            });
        }
        let mut num_queues = cfg.num_queues;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = frontend
                .get_queue_num()
                .map_err(step(&path, "GET_QUEUE_NUM"))?;
            if u64::from(num_queues) > max {
                warn!(
                    path = %path.display(),
                    "backend offers {max} queues; using {max} instead of {num_queues}"
                );
                num_queues = u16::try_from(max.max(1)).unwrap_or(num_queues);
            }
        } else if matches!(kind, Kind::Block) {
            num_queues = 1;
        }
        let common = features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX;
        let mut pairs = None;
        let (device_type, offered, config) = match kind {
            Kind::Block => {
                let mut config = vec![0u8; BLK_CONFIG_LEN as usize];
                if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
                    return Err(VirtioError::Incompatible {
                        path,
                        why: "it does not offer the CONFIG protocol feature (needed for the disk size)"
                            .into(),
                    });
                }
                let (_, payload) = frontend
                    .get_config(0, BLK_CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &config)
                    .map_err(step(&path, "GET_CONFIG"))?;
                let n = payload.len().min(config.len());
                config[..n].copy_from_slice(&payload[..n]);
                let mut offered = backend_features & (BLK_FEATURES | common);
                if num_queues == 1 {
                    offered &= !BLK_F_MQ;
                }
                // num_queues in the config space is what the guest may use.
                config[34..36].copy_from_slice(&num_queues.to_le_bytes());
                let capacity = u64::from_le_bytes(config[..8].try_into().unwrap_or([0; 8]));
                info!(path = %path.display(), sectors = capacity, queues = num_queues, "vhost-user-blk backend connected");
                (types::BLOCK, offered, config)
            }
            Kind::Net(mac) => {
                // num_queues counts data queues, two per pair; more than one
                // pair needs the backend to say how many it serves (MQ) and
                // a control queue (ours).
                let mq = protocol.contains(VhostUserProtocolFeatures::MQ);
                let max = if mq {
                    (num_queues / 2).clamp(1, net_ctrl::MAX_PAIRS)
                } else {
                    1
                };
                if max == 1 && num_queues > 2 {
                    warn!(path = %path.display(), "using one queue pair of {num_queues} queues");
                }
                let mut offered =
                    (backend_features & (NET_FEATURES | common)) | NET_F_MAC | NET_F_STATUS;
                if max > 1 {
                    offered |= NET_F_MQ | NET_F_CTRL_VQ;
                    pairs = Some(Pairs::new(max));
                }
                // The control queue comes after the data queues.
                num_queues = 2 * max + u16::from(max > 1);
                let mut config = vec![0u8; 12];
                config[..6].copy_from_slice(&mac);
                config[6..8].copy_from_slice(&1u16.to_le_bytes()); // link up
                config[8..10].copy_from_slice(&max.to_le_bytes());
                config[10..12].copy_from_slice(&1500u16.to_le_bytes());
                info!(path = %path.display(), mac = ?mac, pairs = max, "vhost-user-net backend connected");
                (types::NET, offered, config)
            }
        };
        let mut regions = Vec::new();
        for r in ram.mem.iter() {
            regions.push(
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                    VirtioError::Incompatible {
                        path: path.clone(),
                        why: "guest memory is not file-backed".into(),
                    }
                })?,
            );
        }
        Ok(Self {
            path,
            frontend,
            device_type,
            offered,
            backend_features,
            protocol,
            has_protocol,
            config,
            num_queues,
            queue_size: cfg.queue_size,
            mem: ram.mem.clone(),
            regions,
            active: Vec::new(),
            rings: Vec::new(),
            paused: false,
            pairs,
            multiqueue: false,
            control: Served::default(),
        })
    }

    fn start(&mut self, mut a: Activation) -> Result<(), VirtioError> {
        let path = self.path.clone();
        // MAC, STATUS and the control queue are ours, not the backend's.
        let mut acked = a.features & self.offered & self.backend_features;
        if self.device_type == types::NET {
            acked &= !(NET_F_MAC | NET_F_STATUS | NET_F_CTRL_VQ);
        }
        self.multiqueue = a.features & NET_F_MQ != 0 && self.pairs.is_some();
        if let Some(p) = &self.pairs {
            p.used.store(1, std::sync::atomic::Ordering::Release);
        }
        if a.features & NET_F_CTRL_VQ != 0 {
            // The control queue: 2N with N pairs offered when the driver
            // took MQ, 2 otherwise.
            let at = if self.multiqueue {
                self.pairs.as_ref().map_or(2, |p| 2 * p.max)
            } else {
                2
            };
            let ctrl = a.queues.iter().position(|q| q.index == at);
            if let (Some(i), Some(pairs)) = (ctrl, &self.pairs) {
                let q = a.queues.swap_remove(i);
                let handler = Control {
                    frontend: self.frontend.clone(),
                    pairs: pairs.clone(),
                    multiqueue: self.multiqueue,
                    name: path.display().to_string(),
                };
                let ctl = Activation {
                    features: a.features,
                    queues: vec![q],
                };
                self.control
                    .start("net-ctrl", self.mem.clone(), ctl, self.queue_size, handler)?;
            }
        }
        if self.has_protocol {
            acked |= features::VHOST_USER_PROTOCOL;
        }
        self.frontend
            .set_features(acked)
            .map_err(step(&path, "SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&self.regions)
            .map_err(step(&path, "SET_MEM_TABLE"))?;
        self.rings.clear();
        for q in &a.queues {
            let n = u64::from(q.size);
            let bad = |why| VirtioError::BadQueue {
                queue: q.index,
                why,
            };
            let desc = host_address(&self.mem, q.desc, 16 * n)
                .ok_or(bad("descriptor table outside guest memory"))?;
            let avail = host_address(&self.mem, q.avail, 6 + 2 * n)
                .ok_or(bad("available ring outside guest memory"))?;
            let used = host_address(&self.mem, q.used, 6 + 8 * n)
                .ok_or(bad("used ring outside guest memory"))?;
            let dup = |fd: &EventFd| {
                fd.try_clone().map_err(|source| VirtioError::Setup {
                    what: "cannot clone a queue eventfd",
                    source,
                })
            };
            self.rings.push(Ring {
                index: q.index,
                size: q.size,
                addrs: (desc, avail, used),
                kick: dup(&q.kick)?,
                call: dup(&q.call)?,
                base: 0,
            });
        }
        self.start_rings()
    }

    /// Hands every ring of `self.rings` to the backend, each from its base.
    fn start_rings(&mut self) -> Result<(), VirtioError> {
        let path = self.path.clone();
        for r in &self.rings {
            let i = usize::from(r.index);
            self.frontend
                .set_vring_num(i, r.size)
                .map_err(step(&path, "SET_VRING_NUM"))?;
            let addrs = VringConfigData {
                queue_max_size: self.queue_size,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: r.addrs.0,
                used_ring_addr: r.addrs.2,
                avail_ring_addr: r.addrs.1,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(i, &addrs)
                .map_err(step(&path, "SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, r.base)
                .map_err(step(&path, "SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &r.call)
                .map_err(step(&path, "SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &r.kick)
                .map_err(step(&path, "SET_VRING_KICK"))?;
            if self.has_protocol {
                // Pairs the driver does not use stay off.
                let on = !self.multiqueue || self.pairs.as_ref().is_none_or(|p| p.enabled(r.index));
                self.frontend
                    .set_vring_enable(i, on)
                    .map_err(step(&path, "SET_VRING_ENABLE"))?;
            }
            self.active.push(r.index);
        }
        Ok(())
    }

    /// Stops every active ring in the backend (it finishes what it took);
    /// returns where each stopped.
    fn stop_rings(&mut self) -> Vec<(u16, u16)> {
        let mut bases = Vec::new();
        for q in std::mem::take(&mut self.active) {
            let i = usize::from(q);
            if self.has_protocol {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            match self.frontend.get_vring_base(i) {
                Ok(base) => bases.push((q, u16::try_from(base & 0xffff).unwrap_or(0))),
                Err(e) => warn!(path = %self.path.display(), "stopping queue {q}: {e}"),
            }
        }
        bases
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queues(&self) -> (u16, u16) {
        (self.num_queues, self.queue_size)
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        // The eventfds are duplicated into the backend; ours go at the end.
        self.start(a)
    }

    fn reset(&mut self) {
        self.control.stop();
        // GET_VRING_BASE stops each ring in the backend.
        self.stop_rings();
        self.rings.clear();
        self.paused = false;
        let _ = self.protocol;
    }

    fn pause(&mut self) {
        if self.paused || self.active.is_empty() {
            return;
        }
        self.control.pause();
        for (q, base) in self.stop_rings() {
            if let Some(r) = self.rings.iter_mut().find(|r| r.index == q) {
                r.base = base;
            }
        }
        self.paused = true;
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        if !std::mem::take(&mut self.paused) {
            return Ok(());
        }
        let r = self.start_rings();
        // After the rings: a command it takes meanwhile sees them all.
        self.control.resume();
        r
    }

    fn describe(&self) -> String {
        let kind = match self.device_type {
            super::types::BLOCK => "virtio-blk",
            super::types::NET => "virtio-net",
            _ => "virtio",
        };
        format!("{kind} vhost-user {}", self.path.display())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let pairs = self
            .pairs
            .as_ref()
            .filter(|_| self.multiqueue)
            .map_or(1, |p| p.used.load(std::sync::atomic::Ordering::Acquire));
        let mut c = vec![("queues_started", self.active.len() as u64)];
        if self.device_type == types::NET {
            c.push(("queue_pairs", u64::from(pairs)));
        }
        c
    }
}
