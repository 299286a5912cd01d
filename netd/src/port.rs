//! A switch port as a vhost-user-net backend: queue 2p receives (switch to
//! guest), queue 2p + 1 transmits (guest to switch), for up to QUEUE_PAIRS
//! pairs p, each pair on its own thread. One frontend at a time; when
//! it goes, the socket stays and the next one (the VM restarted) connects.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringState, VringT,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::conntrack::Conntrack;
use crate::flow::Flow6;
use crate::frame::Mac;
use crate::l2::{PortId, SegmentId};
use crate::metadata::Metadata;
use crate::offload::{
    self, NetHdr, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_USO4, F_GUEST_USO6,
    F_HOST_TSO4, F_HOST_TSO6, F_HOST_USO, F_MRG_RXBUF,
};
use crate::qos::{Limit, Qos, TokenBucket};
use crate::ring::{writable_len, Desc, Pieces, Ring};
use crate::secgroup::PortSecurity;
use crate::switch::Inner;

pub use crate::offload::NET_HDR;
/// Waiting frames handed to the guest per step when it has room again.
const FLUSH_BURST: usize = 64;
/// Frames waiting for the guest's receive buffers, at most; more are dropped.
const MAX_PENDING: usize = 1024;
/// Connections tracked per port, at most; new ones past that are refused.
pub const MAX_CONNECTIONS: usize = 65_536;
/// Receive/transmit queue pairs a port offers (MQ): receive queue of pair
/// p at 2p, transmit at 2p + 1, each pair served by its own thread.
/// Requests a port may make to the switch's services by default: a
/// second, and at once (DHCP, DNS, neighbour discovery and metadata need a
/// few hundred at boot; a guest resolving names first asks the router).
pub const SERVICE_LIMIT: (f64, f64) = (2000.0, 1000.0);
pub const QUEUE_PAIRS: usize = 4;
const F_MQ: u64 = 1 << 22;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
/// Buffers are used in the order they were made available (every ring
/// here is served front to back), so drivers may free them in batches.
const F_IN_ORDER: u64 = 1 << 35;

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
    /// Frames for the guest over its ingress rate (QoS).
    pub rx_policed: AtomicU64,
    /// Requests to the switch's own services (DHCP, DHCPv6, DNS, ARP and
    /// neighbour discovery for the router, pings of it, metadata) beyond
    /// the port's budget, dropped unanswered.
    pub tx_service_dropped: AtomicU64,
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
            ("rx_policed", g(&self.rx_policed)),
            ("tx_service_dropped", g(&self.tx_service_dropped)),
        ]
    }
}

/// The receive side: what other ports' threads need to hand a frame over.
#[derive(Default)]
struct RxSide {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// The rings by queue index, each pair's known once its thread has
    /// seen the first event (empty while no frontend is connected).
    vrings: Vec<Option<VringRwLock>>,
    pending: VecDeque<(NetHdr, Vec<u8>)>,
    /// Buffers of frames that left `pending`, for the next ones to wait in
    /// (no allocation per waiting frame).
    spare: Vec<Vec<u8>>,
    /// Per pair, the receive ring's used index at the last signal decision.
    since: [u16; QUEUE_PAIRS],
    /// Room to gather the chains a frame takes.
    taken: Taken,
    /// The receive queues (vring indexes) the driver has set up and enabled.
    active: Vec<usize>,
    /// Receive queues (bit p) whose kicks for new buffers are turned off.
    quiet: u32,
}

impl RxSide {
    /// Keeps a copy of `frame` until the guest has room for it.
    fn hold(&mut self, hdr: &NetHdr, frame: Out<'_>) {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        frame.append_to(&mut buf);
        self.pending.push_back((*hdr, buf));
    }
}

/// A frame to write into a port's receive buffers: in one slice, or its
/// first bytes and the rest still in the sending guest's memory (written
/// from there, one copy instead of two).
#[derive(Clone, Copy)]
pub(crate) struct Out<'a>(Src<'a>);

#[derive(Clone, Copy)]
enum Src<'a> {
    Whole(&'a [u8]),
    Parted(&'a [u8], &'a Pieces),
}

impl<'a> Out<'a> {
    /// A frame in one slice.
    pub(crate) fn whole(frame: &'a [u8]) -> Self {
        Self(Src::Whole(frame))
    }

    /// A frame whose first bytes are `start` and the rest `rest`.
    ///
    /// # Safety
    /// The pieces stay mapped as long as the frame may be written.
    pub(crate) unsafe fn parted(start: &'a [u8], rest: &'a Pieces) -> Self {
        Self(Src::Parted(start, rest))
    }

    /// Its length.
    pub(crate) fn len(&self) -> usize {
        match self.0 {
            Src::Whole(f) => f.len(),
            Src::Parted(s, r) => s.len() + r.as_slice().iter().map(|(_, n)| n).sum::<usize>(),
        }
    }

    /// Its first bytes (all of it, or the headers at least).
    pub(crate) fn start(&self) -> &'a [u8] {
        match self.0 {
            Src::Whole(f) | Src::Parted(f, _) => f,
        }
    }

    /// Appends it to `buf`.
    fn append_to(&self, buf: &mut Vec<u8>) {
        match self.0 {
            Src::Whole(f) => buf.extend_from_slice(f),
            Src::Parted(s, r) => {
                buf.extend_from_slice(s);
                let at = buf.len();
                let rest = self.len() - s.len();
                buf.resize(at + rest, 0);
                // SAFETY: the pieces are mapped (`parted`'s contract).
                let whole = unsafe { r.read(0, &mut buf[at..]) };
                if !whole {
                    buf.truncate(at);
                }
            }
        }
    }

    /// Writes bytes `from..from + len` to guest memory at `addr`; false if
    /// it cannot.
    fn write(&self, ring: &Ring<'_>, addr: u64, from: usize, len: usize) -> bool {
        match self.0 {
            Src::Whole(f) => f.get(from..from + len).is_some_and(|b| ring.write(addr, b)),
            Src::Parted(s, r) => {
                let mut done = 0usize;
                if from < s.len() {
                    let n = len.min(s.len() - from);
                    if !ring.write(addr, &s[from..from + n]) {
                        return false;
                    }
                    done = n;
                }
                if done == len {
                    return true;
                }
                let Some(to) = addr.checked_add(done as u64) else {
                    return false;
                };
                // SAFETY: the pieces are mapped (`parted`'s contract).
                unsafe { r.write_to(ring, to, from + done - s.len(), len - done) }
            }
        }
    }
}

/// Which of `active` receive queues a frame goes to: by its addresses and
/// ports, so a flow keeps to one queue (and one guest CPU).
fn pick_queue(active: &[usize], frame: &[u8]) -> Option<usize> {
    match active {
        [] => None,
        [one] => Some(*one),
        _ => {
            // MACs, then (IPv4) addresses and ports.
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            let key = frame.get(..12).into_iter().chain(frame.get(26..38));
            for b in key.flatten() {
                h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
            let i = usize::try_from(h % active.len() as u64).unwrap_or(0);
            active.get(i).copied()
        }
    }
}

/// Frames written into (or lost in) the guest's receive buffers, to add
/// to the port's counters.
#[derive(Default)]
struct RxCounts {
    frames: u64,
    bytes: u64,
    dropped: u64,
}

impl RxCounts {
    /// Adds what was counted to `stats` and starts again from nothing.
    fn add_to(&mut self, stats: &PortStats) {
        let counted = std::mem::take(self);
        for (counter, n) in [
            (&stats.rx_frames, counted.frames),
            (&stats.rx_bytes, counted.bytes),
            (&stats.rx_dropped, counted.dropped),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// What became of a frame offered to the receive ring.
enum Written {
    /// In the guest's buffer.
    Done,
    /// A buffer was used but could not hold it (counted as dropped).
    Lost,
    /// No buffer: the guest has not posted one.
    NoRoom,
}

/// Runs `f` on `vring`'s ring mapped in `mem`, with the ring's lock held
/// and its indexes handed back after; None if the ring is not usable
/// (not ready, areas outside memory).
pub(crate) fn with_ring<R>(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    f: impl FnOnce(&mut Ring<'_>, &VringState) -> R,
) -> Option<R> {
    let mut state = vring.get_mut();
    let mut ring = Ring::open(state.get_queue(), mem)?;
    let r = f(&mut ring, &state);
    ring.close(state.get_queue_mut());
    Some(r)
}

/// Signals the driver of `state` if it wants to hear about the entries used
/// since `since` (which moves to now).
pub(crate) fn signal_if_wanted(
    ring: &Ring<'_>,
    state: &VringState,
    since: &mut u16,
) -> io::Result<()> {
    let wanted = ring.needs_signal(*since);
    *since = ring.next_used();
    if wanted {
        state.signal_used_queue()?;
    }
    Ok(())
}

/// Chains taken for one frame: descriptors, and per chain its head and
/// where its descriptors end (kept between frames, so filling allocates
/// nothing).
#[derive(Default)]
struct Taken {
    descs: Vec<Desc>,
    chains: Vec<(u16, usize)>,
}

/// Writes `frame` behind `hdr` into the next chains of `ring` (one, or as
/// many as it takes when `mergeable`); the caller publishes them.
fn fill(
    ring: &mut Ring<'_>,
    taken: &mut Taken,
    hdr: &NetHdr,
    frame: Out<'_>,
    mergeable: bool,
) -> Written {
    let flen = frame.len();
    let total = NET_HDR + flen;
    taken.descs.clear();
    taken.chains.clear();
    let mut have = 0usize;
    while taken.chains.is_empty() || (mergeable && have < total) {
        let start = taken.descs.len();
        match ring.pop(&mut taken.descs) {
            Some(Ok(head)) => {
                let added = taken.descs.get(start..).unwrap_or_default();
                have = have.saturating_add(writable_len(added));
                taken.chains.push((head, taken.descs.len()));
            }
            Some(Err((head, e))) => {
                // A chain the driver broke: returned unused, the frame lost
                // with it.
                debug!("receive chain {head}: {e}");
                // In the order they were taken (IN_ORDER).
                for (h, _) in &taken.chains {
                    ring.push_used(*h, 0);
                }
                ring.push_used(head, 0);
                return Written::Lost;
            }
            None => {
                // Out of buffers: what was taken goes back, and the frame
                // waits (the data-path thread retries; it asks the driver
                // to kick for new buffers only before it sleeps).
                ring.unpop(u16::try_from(taken.chains.len()).unwrap_or(0));
                return Written::NoRoom;
            }
        }
    }
    let mut h = *hdr;
    h.num_buffers = u16::try_from(taken.chains.len()).unwrap_or(u16::MAX);
    let head = h.to_bytes();
    // The usual case: one buffer holds header and frame.
    if let ([(c, _)], Some(d)) = (&taken.chains[..], taken.descs.first()) {
        if d.write && d.len as usize >= total {
            let at_frame = d.addr.checked_add(NET_HDR as u64);
            if let Some(f) = at_frame.filter(|_| ring.write_if_changed(d.addr, &head)) {
                if frame.write(ring, f, 0, flen) {
                    ring.push_used(*c, u32::try_from(total).unwrap_or(0));
                    return Written::Done;
                }
            }
        }
    }
    // The header, then the frame, across the chains' buffers.
    let mut at = 0usize;
    let mut ok = true;
    let mut from = 0usize;
    for (c, end) in &taken.chains {
        let mut written = 0usize;
        let descs = taken.descs.get(from..*end).unwrap_or_default();
        from = *end;
        'descs: for d in descs.iter().filter(|d| d.write) {
            let mut room = d.len as usize;
            let mut addr = d.addr;
            while room > 0 && ok && at < total {
                let n = if at < NET_HDR {
                    let n = room.min(NET_HDR - at);
                    ok = ring.write_if_changed(addr, &head[at..at + n]);
                    n
                } else {
                    let n = room.min(total - at);
                    ok = frame.write(ring, addr, at - NET_HDR, n);
                    n
                };
                if !ok {
                    break 'descs;
                }
                written += n;
                room -= n;
                at += n;
                let Some(next) = addr.checked_add(n as u64) else {
                    ok = false;
                    break 'descs;
                };
                addr = next;
            }
        }
        ring.push_used(*c, u32::try_from(written).unwrap_or(0));
    }
    if ok && at == total {
        Written::Done
    } else {
        Written::Lost
    }
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
    /// Whether `security` is enabled (it has an address): read without the
    /// lock on every frame.
    pub(crate) filtered: AtomicBool,
    /// Connections its security groups let through.
    pub(crate) conntrack: Mutex<Conntrack>,
    /// Its IPv6 connections.
    pub(crate) conntrack6: Mutex<Conntrack<Flow6>>,
    /// What the metadata service tells its VM.
    pub(crate) metadata: Mutex<Metadata>,
    /// The port its traffic is mirrored to (0: none).
    mirror: AtomicU32,
    /// The virtio features the current frontend's driver acked.
    features: AtomicU64,
    /// Whether frames wait for receive buffers (read without the lock).
    has_pending: AtomicBool,
    /// How many requests to the switch's services it may make (one token
    /// each): a VM flooding them cannot take the data path's time from
    /// the other ports.
    service: Mutex<TokenBucket>,
    /// Rate limits, if any (`qos_on` says whether to look).
    qos: Mutex<Qos>,
    qos_on: AtomicBool,
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
    /// The port this one's traffic is mirrored to.
    pub fn mirror_target(&self) -> Option<PortId> {
        match self.mirror.load(Ordering::Relaxed) {
            0 => None,
            n => Some(PortId(n)),
        }
    }

    pub(crate) fn set_mirror_target(&self, target: Option<PortId>) {
        self.mirror
            .store(target.map_or(0, |t| t.0), Ordering::Relaxed);
    }

    /// Sets what the metadata service tells the VM (user-data, SSH keys,
    /// host name).
    pub fn set_metadata(
        &self,
        user_data: Vec<u8>,
        ssh_keys: Vec<String>,
        hostname: Option<String>,
    ) {
        let mut m = self.metadata.lock().unwrap_or_else(PoisonError::into_inner);
        m.user_data = user_data;
        m.ssh_keys = ssh_keys;
        if let Some(h) = hostname {
            m.hostname = h;
        }
    }

    /// What the metadata service tells the VM.
    pub fn metadata(&self) -> Metadata {
        self.metadata
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Limits what the VM receives (`ingress`, policed) and sends
    /// (`egress`, shaped); a 0 kbit/s rate is no limit.
    pub fn set_qos(&self, ingress: Limit, egress: Limit) {
        let q = Qos::new(ingress, egress, Instant::now());
        let on = q.ingress.is_some() || q.egress.is_some();
        *self.qos.lock().unwrap_or_else(PoisonError::into_inner) = q;
        self.qos_on.store(on, Ordering::Release);
    }

    /// The (ingress, egress) limits.
    pub fn qos(&self) -> (Limit, Limit) {
        self.qos
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .limits
    }

    /// Sets the budget for requests to the switch's services: `rate` a
    /// second, `burst` at once.
    pub fn set_service_limit(&self, (rate, burst): (f64, f64)) {
        *self.service.lock().unwrap_or_else(PoisonError::into_inner) =
            TokenBucket::counting(rate, burst, Instant::now());
    }

    /// Whether one more request to the switch's services fits the budget;
    /// counted when it does not.
    pub(crate) fn service_admit(&self, now: Instant) -> bool {
        let ok = self
            .service
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(1, now);
        if !ok {
            self.stats
                .tx_service_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Whether a frame of `len` bytes for the VM fits its ingress rate.
    pub(crate) fn ingress_admit(&self, len: usize, now: Instant) -> bool {
        if !self.qos_on.load(Ordering::Acquire) {
            return true;
        }
        let mut q = self.qos.lock().unwrap_or_else(PoisonError::into_inner);
        let ok = q.ingress.as_mut().is_none_or(|b| b.admit(len, now));
        if !ok {
            self.stats.rx_policed.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// How long the VM's transmit ring must rest (egress rate).
    pub(crate) fn egress_wait(&self) -> Duration {
        if !self.qos_on.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let mut q = self.qos.lock().unwrap_or_else(PoisonError::into_inner);
        q.egress
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(Instant::now()))
    }

    /// Charges a frame the VM sent to its egress rate.
    pub(crate) fn egress_debit(&self, len: usize) {
        if !self.qos_on.load(Ordering::Acquire) {
            return;
        }
        let mut q = self.qos.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = q.egress.as_mut() {
            b.debit(len, Instant::now());
        }
    }

    /// Counters by name, with `rx_pending`: frames waiting for the guest's
    /// receive buffers now.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut c = self.stats.snapshot();
        let pending = self
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .len();
        c.push(("rx_pending", pending as u64));
        c
    }

    /// Its address and security groups.
    pub fn security(&self) -> PortSecurity {
        self.security
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Connections its security groups currently let through.
    pub fn connections(&self) -> usize {
        let v4 = self
            .conntrack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        let v6 = self
            .conntrack6
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        v4 + v6
    }

    pub(crate) fn new(id: PortId, segment: SegmentId, mac: Mac, socket: PathBuf) -> Self {
        Self {
            id,
            segment,
            mac,
            socket,
            stats: PortStats::default(),
            security: RwLock::new(PortSecurity::default()),
            filtered: AtomicBool::new(false),
            conntrack: Mutex::new(Conntrack::new(MAX_CONNECTIONS)),
            conntrack6: Mutex::new(Conntrack::new(MAX_CONNECTIONS)),
            metadata: Mutex::new(Metadata {
                instance_id: format!("atoll-port-{}", id.0),
                ..Metadata::default()
            }),
            mirror: AtomicU32::new(0),
            features: AtomicU64::new(0),
            has_pending: AtomicBool::new(false),
            service: Mutex::new(TokenBucket::counting(
                SERVICE_LIMIT.0,
                SERVICE_LIMIT.1,
                Instant::now(),
            )),
            qos: Mutex::new(Qos::default()),
            qos_on: AtomicBool::new(false),
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

    /// The guest's memory while a frontend is connected.
    pub(crate) fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .mem
            .clone()
    }

    /// The virtio features the connected driver acked (0 when none is).
    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Relaxed)
    }

    /// Hands `frame` to the guest now (signalled at once): for the
    /// switch's own answers, off the fast path.
    pub(crate) fn deliver(&self, frame: &[u8]) {
        self.enqueue_batch(&[(&NetHdr::PLAIN, Out::whole(frame))]);
    }

    /// Whether frames wait for the guest's receive buffers.
    pub(crate) fn has_pending(&self) -> bool {
        self.has_pending.load(Ordering::Acquire)
    }

    /// Tries again to hand waiting frames to the guest; true if some went.
    pub(crate) fn retry_pending(&self) -> bool {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        let before = rx.pending.len();
        self.flush(&mut rx);
        rx.pending.len() < before
    }

    /// Asks the driver to kick when it posts receive buffers, if frames
    /// wait for them (the data-path thread is about to sleep); frames go
    /// at once if buffers came meanwhile.
    pub(crate) fn arm_pending(&self) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        if rx.pending.is_empty() {
            return;
        }
        let mut more = false;
        for q in &rx.active {
            if let Some(v) = rx.vrings.get(*q).and_then(Option::as_ref) {
                more |= v.enable_notification().unwrap_or(false);
            }
        }
        if more {
            self.flush(&mut rx);
        }
    }

    /// Writes a burst of frames for the guest: each receive ring is mapped
    /// once for the frames that go to it, its used index published and the
    /// driver signalled (if it wants) once. Offloads the driver did not
    /// take are finished first; frames with no room wait, in order.
    pub(crate) fn enqueue_batch(&self, frames: &[(&NetHdr, Out<'_>)]) {
        let features = self.features();
        let mut finished: Vec<(NetHdr, Vec<u8>)> = Vec::new();
        let mut done: Vec<(&NetHdr, Out<'_>)> = Vec::new();
        let list = if frames
            .iter()
            .any(|(h, _)| h.needs_features() & !features != 0)
        {
            for (h, f) in frames {
                let mut whole = Vec::new();
                f.append_to(&mut whole);
                if h.needs_features() & !features == 0 {
                    finished.push((**h, whole));
                    continue;
                }
                let done = offload::finish(&whole, h, |seg| {
                    finished.push((NetHdr::PLAIN, seg.to_vec()));
                });
                if let Err(e) = done {
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    debug!(port = self.id.0, "cannot finish an offloaded frame: {e}");
                }
            }
            done.extend(finished.iter().map(|(h, f)| (h, Out::whole(f))));
            &done[..]
        } else {
            frames
        };
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        if !rx.pending.is_empty() {
            // Frames that waited for room go first.
            self.flush(&mut rx);
        }
        let i = if rx.pending.is_empty() {
            self.write_list(&mut rx, list)
        } else {
            0
        };
        for (hdr, frame) in list.get(i..).unwrap_or_default() {
            if rx.pending.len() >= MAX_PENDING {
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            rx.hold(hdr, *frame);
        }
        self.has_pending
            .store(!rx.pending.is_empty(), Ordering::Release);
    }

    /// Writes frames of `list` into the receive rings, each ring mapped
    /// once for the frames that go to it, its used index published and the
    /// driver signalled (if it wants) once; returns how many were taken
    /// (written or lost), stopping at the first with no room.
    fn write_list(&self, rx: &mut RxSide, list: &[(&NetHdr, Out<'_>)]) -> usize {
        let mergeable = self.features() & F_MRG_RXBUF != 0;
        // Counted once per ring's run, just before it is published: an
        // atomic add per frame would wait each time for the writes into
        // the guest's memory to land.
        let mut counts = RxCounts::default();
        self.write_runs(rx, list, mergeable, &mut counts)
    }

    /// [`Port::write_list`]'s work: each run of frames for one queue
    /// written into its ring, until a ring is full.
    fn write_runs(
        &self,
        rx: &mut RxSide,
        list: &[(&NetHdr, Out<'_>)],
        mergeable: bool,
        counts: &mut RxCounts,
    ) -> usize {
        let mut i = 0;
        while i < list.len() {
            let Some(q) = pick_queue(&rx.active, list[i].1.start()) else {
                break;
            };
            let RxSide {
                mem,
                vrings,
                taken,
                since,
                active,
                ..
            } = &mut *rx;
            let (Some(atomic), Some(vring)) =
                (mem.as_ref(), vrings.get(q).and_then(Option::as_ref))
            else {
                break;
            };
            let mem = atomic.memory();
            let from = i;
            let done = with_ring(vring, &mem, |ring, state| {
                let mut j = from;
                while let Some((hdr, frame)) = list.get(j) {
                    if pick_queue(active, frame.start()) != Some(q) {
                        break;
                    }
                    match fill(ring, taken, hdr, *frame, mergeable) {
                        Written::Done => {
                            counts.frames += 1;
                            counts.bytes += frame.len() as u64;
                        }
                        // Buffers too small or outside memory: the frame
                        // is lost.
                        Written::Lost => counts.dropped += 1,
                        Written::NoRoom => break,
                    }
                    j += 1;
                }
                // Counted before the driver can see the frames, so whoever
                // has seen them finds them counted.
                counts.add_to(&self.stats);
                ring.publish();
                if let Some(since) = since.get_mut(q / 2) {
                    if let Err(e) = signal_if_wanted(ring, state, since) {
                        debug!(port = self.id.0, "cannot signal the guest: {e}");
                    }
                }
                j
            });
            match done {
                Some(j) if j > from => i = j,
                _ => break,
            }
        }
        i
    }

    /// Moves pending frames into the guest's receive buffers.
    fn flush(&self, rx: &mut RxSide) {
        let waiting = !rx.pending.is_empty();
        if waiting {
            // A burst at a time, so a long queue costs what moves, not what
            // stays.
            let mut pending = std::mem::take(&mut rx.pending);
            let mut list: Vec<(&NetHdr, Out<'_>)> = Vec::with_capacity(FLUSH_BURST);
            let mut from = 0;
            loop {
                list.clear();
                list.extend(
                    pending
                        .range(from..)
                        .take(FLUSH_BURST)
                        .map(|(h, f)| (h, Out::whole(f))),
                );
                let taken = self.write_list(rx, &list);
                from += taken;
                if taken < list.len() || list.is_empty() {
                    break;
                }
            }
            drop(list);
            for (_, buf) in pending.drain(..from.min(pending.len())) {
                if rx.spare.len() < MAX_PENDING {
                    rx.spare.push(buf);
                }
            }
            rx.pending = pending;
            self.has_pending
                .store(!rx.pending.is_empty(), Ordering::Release);
        }
        if waiting && rx.pending.is_empty() {
            // Caught up: no more kicks for receive buffers.
            for q in &rx.active {
                if let Some(v) = rx.vrings.get(*q).and_then(Option::as_ref) {
                    let _ = v.disable_notification();
                }
            }
        }
    }

    /// Takes the rings on the driver's first notification, and on every one
    /// notes which receive queues it has set up (a driver enables more
    /// pairs as it brings its CPUs up); then fills buffers it added from
    /// what is pending.
    fn attach(&self, pair: usize, vrings: &[VringRwLock]) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        if rx.vrings.len() < 2 * QUEUE_PAIRS {
            rx.vrings.resize(2 * QUEUE_PAIRS, None);
        }
        for (i, v) in vrings.iter().enumerate() {
            let new = rx.vrings.get(2 * pair + i).is_some_and(Option::is_none);
            if !new {
                continue;
            }
            if let Some(slot) = rx.vrings.get_mut(2 * pair + i) {
                *slot = Some(v.clone());
            }
            if i == 0 {
                if let Some(since) = rx.since.get_mut(pair) {
                    *since = v.get_ref().get_queue().next_used();
                }
            }
        }
        let mut active = Vec::new();
        for pair in 0..QUEUE_PAIRS {
            let Some(v) = rx.vrings.get(2 * pair).and_then(Option::as_ref) else {
                continue;
            };
            let ready = {
                let state = v.get_ref();
                state.get_queue().ready() && state.is_enabled()
            };
            if !ready {
                rx.quiet &= !(1 << pair);
                continue;
            }
            if rx.quiet & (1 << pair) == 0 {
                // The guest need not kick when it adds receive buffers,
                // unless frames wait for them (`arm_pending` asks then).
                let _ = v.disable_notification();
                rx.quiet |= 1 << pair;
            }
            active.push(2 * pair);
        }
        rx.active = active;
        self.flush(&mut rx);
    }

    fn detach(&self) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        rx.vrings.clear();
        rx.mem = None;
        rx.pending.clear();
        rx.spare = Vec::new();
        rx.active.clear();
        rx.quiet = 0;
        rx.since = [0; QUEUE_PAIRS];
        self.features.store(0, Ordering::Relaxed);
    }
}

/// The vhost-user backend of one port.
pub(crate) struct Backend {
    port: Arc<Port>,
    switch: Weak<Inner>,
    /// Exit events handed to the ring threads of the current daemon.
    exits: Mutex<Vec<EventNotifier>>,
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * QUEUE_PAIRS
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // A thread per queue pair.
        (0..QUEUE_PAIRS).map(|p| 0b11 << (2 * p)).collect()
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_GUEST_USO4
            | F_GUEST_USO6
            | F_HOST_USO
            | F_MRG_RXBUF
            | F_MQ
            | F_MAC
            | F_STATUS
            | F_EVENT_IDX
            | F_IN_ORDER
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn acked_features(&self, features: u64) {
        self.port.features.store(features, Ordering::Relaxed);
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
        // struct virtio_net_config: mac, status (link up), queue pairs,
        // MTU 1500.
        let mut c = Vec::with_capacity(12);
        c.extend_from_slice(&self.port.mac);
        c.extend_from_slice(&1u16.to_le_bytes());
        let pairs = u16::try_from(QUEUE_PAIRS).unwrap_or(1);
        c.extend_from_slice(&pairs.to_le_bytes());
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
        thread_id: usize,
    ) -> io::Result<()> {
        // A thread per queue pair: `vrings` are that pair's receive and
        // transmit rings, `device_event` indexes them. The first
        // notification shows us the rings; receive buffers the guest added
        // are filled from what is pending.
        self.port.attach(thread_id, vrings);
        if device_event == 1 {
            // The transmit ring is the data-path thread's to poll.
            if let (Some(tx), Some(switch)) = (vrings.get(1), self.switch.upgrade()) {
                switch
                    .datapath_for(self.port.id, thread_id)
                    .kicked(&self.port, thread_id, tx);
            }
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

/// Waits until a frontend is at `listener`'s door (or the listener is shut
/// down).
fn wait_for_frontend(listener: &Listener) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd of ours, for the listener we own.
        match unsafe { libc::poll(&mut p, 1, -1) } {
            n if n > 0 => return Ok(()),
            0 => {}
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

fn serve_loop(port: &Arc<Port>, backend: &Arc<Backend>, listener: &mut Listener) -> io::Result<()> {
    loop {
        if port.is_deleted() || backend.switch.upgrade().is_none() {
            return Ok(());
        }
        // The daemon (its ring threads, their epoll and event descriptors)
        // only once a frontend comes: an idle port holds its socket alone,
        // so a node carries thousands.
        wait_for_frontend(listener)?;
        if port.is_deleted() || backend.switch.upgrade().is_none() {
            return Ok(());
        }
        // A daemon per connection: its request handler remembers the owner
        // (SET_OWNER) and refuses a second one.
        let made = VhostUserDaemon::new(
            format!("netd-port-{}", port.id.0),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        );
        let mut daemon = match made {
            Ok(d) => d,
            Err(e) => {
                // Out of threads or descriptors for now: this frontend is
                // turned away (it connects again) and the port lives on.
                warn!(port = port.id.0, "cannot serve a frontend: {e}");
                drop(listener.accept());
                continue;
            }
        };
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
        // Its ring threads end on their exit events, and dropping the
        // daemon waits for them: a kick one of them still handled cannot
        // bring this connection's rings back after they are forgotten (the
        // data path would then keep them and ignore the next frontend's).
        for e in backend
            .exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = e.notify();
        }
        drop(daemon);
        if let Some(switch) = backend.switch.upgrade() {
            switch.forget_rings(port.id);
        }
        port.detach();
        if let Err(e) = started {
            return Err(io::Error::other(e.to_string()));
        }
    }
}

/// Where a port's socket goes under `dir`.
pub fn socket_path(dir: &Path, id: PortId) -> PathBuf {
    dir.join(format!("port-{}.sock", id.0))
}
