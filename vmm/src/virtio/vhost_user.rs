//! vhost-user frontends: the device's queues are served by another process
//! (stord, netd, or any standard backend) that maps guest memory from our
//! memfd and is kicked and interrupts through eventfds KVM wires directly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    device_type: u32,
    offered: u64,
    /// What the backend offered (only those bits are acked to it).
    backend_features: u64,
    config: Vec<u8>,
    num_queues: u16,
    queue_size: u16,
    mem: GuestMemoryMmap,
    /// The connection and what the driver set up (shared with the
    /// reconnecting thread of a NIC).
    link: Arc<Mutex<Link>>,
    /// The control queue's worker (the VMM answers it, not the backend).
    control: Served,
    /// A NIC's thread that reconnects to a backend that went away.
    monitor: Option<Monitor>,
}

/// The backend connection and everything needed to set it up again: a new
/// connection after the backend restarted gets the same memory, features
/// and rings (from where the guest's used rings say the old one stopped).
struct Link {
    path: PathBuf,
    frontend: Frontend,
    /// Whether the connection is up (false while reconnecting: changes
    /// are recorded and applied when it is back).
    up: bool,
    protocol: VhostUserProtocolFeatures,
    has_protocol: bool,
    /// The features the backend was given (None before activation).
    acked: Option<u64>,
    regions: Vec<VhostUserMemoryRegionInfo>,
    queue_size: u16,
    active: Vec<u16>,
    /// The rings as the driver set them up, to restart them after a pause.
    rings: Vec<Ring>,
    paused: bool,
    /// A multi-queue NIC's pairs (None: one pair, no control queue).
    pairs: Option<Arc<Pairs>>,
    /// Whether the driver took more than one pair (rings beyond the pairs in
    /// use stay disabled in the backend).
    multiqueue: bool,
}

/// The reconnecting thread and what stops it.
struct Monitor {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
    reconnects: Arc<AtomicU64>,
}

impl Monitor {
    /// Watches `link`'s connection from a thread of its own.
    fn start(link: Arc<Mutex<Link>>, max_queues: u64) -> Result<Self, VirtioError> {
        let setup = |source| VirtioError::Setup {
            what: "cannot start the backend link's thread",
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?;
        let stop2 = stop.try_clone().map_err(setup)?;
        let reconnects = Arc::new(AtomicU64::new(0));
        let counted = reconnects.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-link".into())
            .spawn(move || watch(&link, &stop2, max_queues, &counted))
            .map_err(setup)?;
        Ok(Self {
            stop,
            thread: Some(thread),
            reconnects,
        })
    }

    /// Times the backend came back.
    fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// Waits for `fd` to say `events` (or the stop eventfd to be written),
/// `timeout_ms` at most (-1: no limit); true if `fd` did.
fn wait_for(
    fd: std::os::fd::RawFd,
    events: libc::c_short,
    stop: &EventFd,
    timeout_ms: i32,
) -> Option<bool> {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n = fds.len() as libc::nfds_t;
    // SAFETY: `fds` is an array of `n` initialised pollfd structures.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    if r < 0 {
        return (std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted)
            .then_some(false);
    }
    if fds[1].revents != 0 {
        return None;
    }
    Some(fds[0].revents != 0)
}

/// The backend link's thread: when the backend hangs up, connects again
/// (every 100 ms) and sets the new connection up as the old one was.
/// Ends when the device goes (`stop`).
fn watch(link: &Mutex<Link>, stop: &EventFd, max_queues: u64, reconnects: &AtomicU64) {
    use std::os::fd::AsRawFd;
    let lock = || link.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let fd = lock().frontend.as_raw_fd();
        // Only a hang-up: replies are read by whoever asked, under the lock.
        match wait_for(fd, libc::POLLRDHUP, stop, -1) {
            None => return,
            Some(false) => continue,
            Some(true) => {}
        }
        let path = {
            let mut l = lock();
            l.up = false;
            l.path.clone()
        };
        warn!(path = %path.display(), "vhost-user backend went away; reconnecting");
        loop {
            // A pause between tries (or the end).
            if wait_for(-1, 0, stop, 100).is_none() {
                return;
            }
            let Ok(f) = Frontend::connect(&path, max_queues) else {
                continue;
            };
            let mut l = lock();
            match l.reconnect(f) {
                Ok(()) => {
                    l.up = true;
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    info!(path = %path.display(), "vhost-user backend back; rings restarted");
                    break;
                }
                Err(e) => warn!(path = %path.display(), "vhost-user backend back but refused: {e}"),
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
        let link = Arc::new(Mutex::new(Link {
            path: path.clone(),
            frontend,
            up: true,
            protocol,
            has_protocol,
            acked: None,
            regions,
            queue_size: cfg.queue_size,
            active: Vec::new(),
            rings: Vec::new(),
            paused: false,
            pairs,
            multiqueue: false,
        }));
        // A NIC survives its backend restarting (a frame or two may be
        // lost or sent twice); a disk's requests in flight could not be
        // told apart from finished ones, so a disk does not reconnect.
        let monitor = match kind {
            Kind::Net(_) => Some(Monitor::start(link.clone(), u64::from(num_queues))?),
            Kind::Block => None,
        };
        Ok(Self {
            path,
            device_type,
            offered,
            backend_features,
            config,
            num_queues,
            queue_size: cfg.queue_size,
            mem: ram.mem.clone(),
            link,
            control: Served::default(),
            monitor,
        })
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(&mut self, mut a: Activation) -> Result<(), VirtioError> {
        let path = self.path.clone();
        // MAC, STATUS and the control queue are ours, not the backend's.
        let mut acked = a.features & self.offered & self.backend_features;
        if self.device_type == types::NET {
            acked &= !(NET_F_MAC | NET_F_STATUS | NET_F_CTRL_VQ);
        }
        let (pairs, has_protocol) = {
            let l = self.link();
            (l.pairs.clone(), l.has_protocol)
        };
        let multiqueue = a.features & NET_F_MQ != 0 && pairs.is_some();
        if let Some(p) = &pairs {
            p.used.store(1, std::sync::atomic::Ordering::Release);
        }
        if a.features & NET_F_CTRL_VQ != 0 {
            // The control queue: 2N with N pairs offered when the driver
            // took MQ, 2 otherwise.
            let at = if multiqueue {
                pairs.as_ref().map_or(2, |p| 2 * p.max)
            } else {
                2
            };
            let ctrl = a.queues.iter().position(|q| q.index == at);
            if let (Some(i), Some(pairs)) = (ctrl, &pairs) {
                let q = a.queues.swap_remove(i);
                let link = self.link.clone();
                let handler = Control {
                    enable: Box::new(move |q, on| {
                        link.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .enable(q, on)
                    }),
                    pairs: pairs.clone(),
                    multiqueue,
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
        if has_protocol {
            acked |= features::VHOST_USER_PROTOCOL;
        }
        let mut rings = Vec::new();
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
            rings.push(Ring {
                index: q.index,
                size: q.size,
                addrs: (desc, avail, used),
                kick: dup(&q.kick)?,
                call: dup(&q.call)?,
                base: 0,
            });
        }
        let mut l = self.link();
        l.multiqueue = multiqueue;
        l.acked = Some(acked);
        l.rings = rings;
        if !l.up {
            // Set up when the backend is back.
            return Ok(());
        }
        l.set_up()
    }
}

impl Link {
    /// Gives the backend the features, memory and rings recorded.
    fn set_up(&mut self) -> Result<(), VirtioError> {
        let path = self.path.clone();
        let Some(acked) = self.acked else {
            return Ok(());
        };
        self.frontend
            .set_features(acked)
            .map_err(step(&path, "SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&self.regions)
            .map_err(step(&path, "SET_MEM_TABLE"))?;
        if self.paused {
            return Ok(());
        }
        self.start_rings()
    }

    /// Takes `f`, a new connection to a backend that restarted, and sets
    /// it up as the old one was: owner, features, protocol features, then
    /// memory and rings, each ring going on from the guest's used index
    /// (the new backend knows nothing of the old one's place).
    fn reconnect(&mut self, f: Frontend) -> Result<(), VirtioError> {
        let path = self.path.clone();
        self.frontend = f;
        self.frontend
            .set_owner()
            .map_err(step(&path, "SET_OWNER"))?;
        let theirs = self
            .frontend
            .get_features()
            .map_err(step(&path, "GET_FEATURES"))?;
        if let Some(acked) = self.acked {
            if theirs & acked != acked {
                return Err(VirtioError::Incompatible {
                    path,
                    why: format!("it no longer offers features {:#x}", acked & !theirs),
                });
            }
        }
        if self.has_protocol {
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(step(&path, "GET_PROTOCOL_FEATURES"))?;
            if !offered.contains(self.protocol) {
                return Err(VirtioError::Incompatible {
                    path,
                    why: "it no longer offers the protocol features in use".into(),
                });
            }
            self.frontend
                .set_protocol_features(self.protocol)
                .map_err(step(&path, "SET_PROTOCOL_FEATURES"))?;
        }
        for r in &mut self.rings {
            // SAFETY: `addrs.2` is the used ring's address in our mapping of
            // guest memory (checked when the driver set it up), which lives
            // as long as the VM; its index is the u16 at offset 2.
            let idx = unsafe { std::ptr::read_volatile((r.addrs.2 + 2) as *const u16) };
            r.base = u16::from_le(idx);
        }
        self.active.clear();
        self.set_up()?;
        self.nudge();
        Ok(())
    }

    /// After its rings (re)started: a kick for each, so the backend looks
    /// at what the guest queued meanwhile (a kick the guest sent may have
    /// gone to a backend that was away, or been taken before the ring was
    /// on), and an interrupt, so the driver looks at what was used (a
    /// spurious one costs the driver one look).
    fn nudge(&self) {
        for r in &self.rings {
            let _ = r.kick.write(1);
            let _ = r.call.write(1);
        }
    }

    /// Turns data queue `q`'s ring on or off in the backend (the control
    /// queue's pair count); recorded only while reconnecting.
    fn enable(&mut self, q: u16, on: bool) -> Result<(), String> {
        if !self.up || !self.has_protocol {
            return Ok(());
        }
        self.frontend
            .set_vring_enable(usize::from(q), on)
            .map_err(|e| e.to_string())
    }

    /// Hands every ring of `self.rings` to the backend, each from its base.
    fn start_rings(&mut self) -> Result<(), VirtioError> {
        let path = self.path.clone();
        self.active.clear();
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
        // The control worker first: it takes the link's lock.
        self.control.stop();
        let mut l = self.link();
        // GET_VRING_BASE stops each ring in the backend.
        if l.up {
            l.stop_rings();
        }
        l.rings.clear();
        l.active.clear();
        l.acked = None;
        l.paused = false;
    }

    fn pause(&mut self) {
        {
            let l = self.link();
            if l.paused || l.rings.is_empty() {
                return;
            }
        }
        self.control.pause();
        let mut l = self.link();
        if l.up {
            for (q, base) in l.stop_rings() {
                if let Some(r) = l.rings.iter_mut().find(|r| r.index == q) {
                    r.base = base;
                }
            }
        }
        l.paused = true;
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        let r = {
            let mut l = self.link();
            if !std::mem::take(&mut l.paused) {
                return Ok(());
            }
            if l.up {
                let r = l.start_rings();
                if r.is_ok() {
                    l.nudge();
                }
                r
            } else {
                Ok(())
            }
        };
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
        let l = self.link();
        let pairs = l
            .pairs
            .as_ref()
            .filter(|_| l.multiqueue)
            .map_or(1, |p| p.used.load(std::sync::atomic::Ordering::Acquire));
        let mut c = vec![("queues_started", l.active.len() as u64)];
        if self.device_type == types::NET {
            c.push(("queue_pairs", u64::from(pairs)));
            c.push((
                "reconnects",
                self.monitor.as_ref().map_or(0, Monitor::reconnects),
            ));
        }
        c
    }
}
