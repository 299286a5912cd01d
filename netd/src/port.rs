//! A switch port as a vhost-user-net backend: queue 0 receives (switch to
//! guest), queue 1 transmits (guest to switch). One frontend at a time; when
//! it goes, the socket stays and the next one (the VM restarted) connects.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::conntrack::Conntrack;
use crate::frame::{Mac, MAX_FRAME};
use crate::l2::{PortId, SegmentId};
use crate::secgroup::PortSecurity;
use crate::switch::Inner;

/// virtio-net header with VIRTIO_F_VERSION_1.
pub const NET_HDR: usize = 12;
/// Frames waiting for the guest's receive buffers, at most; more are dropped.
const MAX_PENDING: usize = 1024;
/// Connections tracked per port, at most; new ones past that are refused.
pub const MAX_CONNECTIONS: usize = 65_536;
const RXQ: usize = 0;
const TXQ: usize = 1;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_VERSION_1: u64 = 1 << 32;

/// Counters of one port, from the switch's side.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames the guest sent.
    pub tx_frames: AtomicU64,
    /// Bytes the guest sent (frames, without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames from the guest the switch refused (malformed, runt, oversized).
    pub tx_dropped: AtomicU64,
    /// Frames for the guest dropped because it had no room for them.
    pub rx_dropped: AtomicU64,
    /// Frames from the guest its security refused (spoofed addresses,
    /// connections no egress rule allows).
    pub tx_filtered: AtomicU64,
    /// Frames for the guest no ingress rule allows.
    pub rx_filtered: AtomicU64,
}

impl PortStats {
    /// The counters by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("tx_frames", g(&self.tx_frames)),
            ("tx_bytes", g(&self.tx_bytes)),
            ("rx_frames", g(&self.rx_frames)),
            ("rx_bytes", g(&self.rx_bytes)),
            ("tx_dropped", g(&self.tx_dropped)),
            ("rx_dropped", g(&self.rx_dropped)),
            ("tx_filtered", g(&self.tx_filtered)),
            ("rx_filtered", g(&self.rx_filtered)),
        ]
    }
}

/// The receive side: what other ports' threads need to hand a frame over.
#[derive(Default)]
struct RxSide {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    vrings: Option<Vec<VringRwLock>>,
    pending: VecDeque<Vec<u8>>,
}

/// A port: identity, counters and the receive side.
pub struct Port {
    /// Its id in the switch.
    pub id: PortId,
    /// The L2 segment it is on.
    pub segment: SegmentId,
    /// The MAC its NIC gets.
    pub mac: Mac,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Counters.
    pub stats: PortStats,
    /// Its address and security groups.
    pub(crate) security: RwLock<PortSecurity>,
    /// Connections its security groups let through.
    pub(crate) conntrack: Mutex<Conntrack>,
    rx: Mutex<RxSide>,
    /// Set when the port is deleted: its thread ends instead of waiting for
    /// the next frontend.
    deleted: AtomicBool,
    /// Disconnects the current frontend, if one is connected.
    connection: Mutex<Option<ShutdownHandle>>,
    /// The listening socket's descriptor (shut down to wake its accept).
    listener_fd: Mutex<Option<RawFd>>,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("id", &self.id)
            .field("segment", &self.segment)
            .finish_non_exhaustive()
    }
}

impl Port {
    /// Its address and security groups.
    pub fn security(&self) -> PortSecurity {
        self.security
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Connections its security groups currently let through.
    pub fn connections(&self) -> usize {
        self.conntrack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub(crate) fn new(id: PortId, segment: SegmentId, mac: Mac, socket: PathBuf) -> Self {
        Self {
            id,
            segment,
            mac,
            socket,
            stats: PortStats::default(),
            security: RwLock::new(PortSecurity::default()),
            conntrack: Mutex::new(Conntrack::new(MAX_CONNECTIONS)),
            rx: Mutex::new(RxSide::default()),
            deleted: AtomicBool::new(false),
            connection: Mutex::new(None),
            listener_fd: Mutex::new(None),
        }
    }

    /// Ends the port: the frontend (if any) is disconnected, the socket stops
    /// accepting and is removed, and the port's thread ends.
    pub(crate) fn close(&self) {
        self.deleted.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            c.shutdown();
        }
        if let Some(fd) = *self
            .listener_fd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            // SAFETY: shutdown(2) on the listening socket the port's thread
            // owns (it is closed only after that thread sees `deleted`); it
            // wakes the thread's accept.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        let _ = std::fs::remove_file(&self.socket);
        self.detach();
    }

    fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    /// Queues `frame` for the guest and hands over what fits.
    pub(crate) fn deliver(&self, frame: &[u8]) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        if rx.pending.len() >= MAX_PENDING {
            self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        rx.pending.push_back(frame.to_vec());
        self.flush(&mut rx);
    }

    /// Moves pending frames into the guest's receive buffers.
    fn flush(&self, rx: &mut RxSide) {
        let (Some(atomic), Some(vrings)) = (&rx.mem, &rx.vrings) else {
            return;
        };
        let Some(vring) = vrings.get(RXQ) else {
            return;
        };
        let mem = atomic.memory();
        let mut used_any = false;
        while let Some(frame) = rx.pending.front() {
            let next = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let mut data = Vec::with_capacity(NET_HDR + frame.len());
            data.resize(NET_HDR, 0);
            data.extend_from_slice(frame);
            let mut written = 0usize;
            let mut ok = true;
            for d in chain.writable() {
                if written == data.len() {
                    break;
                }
                let n = (d.len() as usize).min(data.len() - written);
                if mem
                    .write_slice(&data[written..written + n], d.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
                written += n;
            }
            let used = u32::try_from(written).unwrap_or(0);
            if vring.add_used(head, used).is_err() {
                warn!(port = self.id.0, "receive ring is broken");
                break;
            }
            used_any = true;
            if ok && written == data.len() {
                self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .rx_bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
            } else {
                // A buffer too small or outside memory: the frame is lost.
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            rx.pending.pop_front();
        }
        if used_any {
            if let Err(e) = vring.signal_used_queue() {
                debug!(port = self.id.0, "cannot signal the guest: {e}");
            }
        }
    }

    fn attach(&self, vrings: &[VringRwLock]) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        if rx.vrings.is_none() {
            rx.vrings = Some(vrings.to_vec());
        }
        self.flush(&mut rx);
    }

    fn detach(&self) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        rx.vrings = None;
        rx.mem = None;
        rx.pending.clear();
    }
}

/// The vhost-user backend of one port.
pub(crate) struct Backend {
    port: Arc<Port>,
    switch: Weak<Inner>,
    /// Exit events handed to the ring threads of the current daemon.
    exits: Mutex<Vec<EventNotifier>>,
}

impl Backend {
    /// Takes every frame the guest queued for transmission and switches it.
    fn transmit(&self, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(vring) = vrings.get(TXQ) else {
            return Ok(());
        };
        let Some(atomic) = self
            .port
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .mem
            .clone()
        else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut frames = Vec::new();
        loop {
            let next = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let mut data = Vec::new();
            let mut ok = true;
            for d in chain.clone().readable() {
                let len = d.len() as usize;
                if data.len() + len > NET_HDR + MAX_FRAME {
                    ok = false;
                    break;
                }
                let start = data.len();
                data.resize(start + len, 0);
                if mem.read_slice(&mut data[start..], d.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            vring.add_used(head, 0).map_err(io::Error::other)?;
            if ok && data.len() > NET_HDR {
                frames.push(data.split_off(NET_HDR));
            } else {
                self.port.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        vring.signal_used_queue()?;
        if let Some(switch) = self.switch.upgrade() {
            for f in &frames {
                switch.switch_frame(&self.port, f);
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_STATUS | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        let keep = notifier.try_clone().ok()?;
        self.exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(keep);
        Some((consumer, notifier))
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config: mac, status (link up), one queue pair,
        // MTU 1500.
        let mut c = Vec::with_capacity(12);
        c.extend_from_slice(&self.port.mac);
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&1500u16.to_le_bytes());
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let mut rx = self.port.rx.lock().unwrap_or_else(PoisonError::into_inner);
        rx.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // The first notification shows us the rings; receive buffers the guest
        // added are filled from what is pending.
        self.port.attach(vrings);
        if usize::from(device_event) == TXQ {
            self.transmit(vrings)?;
        }
        Ok(())
    }
}

/// Serves `port` on `listener` (bound to its socket) until the listener
/// fails or the switch is gone: one frontend after another.
pub(crate) fn serve(
    port: Arc<Port>,
    switch: Weak<Inner>,
    mut listener: Listener,
) -> io::Result<()> {
    let backend = Arc::new(Backend {
        port: port.clone(),
        switch,
        exits: Mutex::new(Vec::new()),
    });
    *port
        .listener_fd
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(listener.as_raw_fd());
    let result = serve_loop(&port, &backend, &mut listener);
    *port
        .listener_fd
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    drop(listener);
    if port.is_deleted() {
        return Ok(());
    }
    result
}

fn serve_loop(port: &Arc<Port>, backend: &Arc<Backend>, listener: &mut Listener) -> io::Result<()> {
    loop {
        if port.is_deleted() || backend.switch.upgrade().is_none() {
            return Ok(());
        }
        // A daemon per connection: its request handler remembers the owner
        // (SET_OWNER) and refuses a second one.
        let mut daemon = VhostUserDaemon::new(
            format!("netd-port-{}", port.id.0),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| io::Error::other(e.to_string()))?;
        let started = daemon.start(listener);
        if let Ok(()) = &started {
            *port
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = daemon.shutdown_handle();
            if port.is_deleted() {
                // Deleted between accept and here: close() found no handle.
                daemon.request_shutdown();
            }
            if let Err(e) = daemon.wait() {
                debug!(port = port.id.0, "frontend gone: {e}");
            }
            *port
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
        port.detach();
        // Its ring threads end on their exit events; then it can go.
        for e in backend
            .exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = e.notify();
        }
        drop(daemon);
        if let Err(e) = started {
            return Err(io::Error::other(e.to_string()));
        }
    }
}

/// Where a port's socket goes under `dir`.
pub fn socket_path(dir: &Path, id: PortId) -> PathBuf {
    dir.join(format!("port-{}.sock", id.0))
}
