//! The data-path threads: each polls the transmit rings it was given in
//! turn, a burst from each, and switches what it finds. No thread per port
//! competes for the CPU, and frames for a port from all the rings of a
//! sweep reach it in batches. With more than one thread (`netd
//! --datapath-threads`), a port's queue pairs go to consecutive threads,
//! so a multi-queue NIC is served by as many CPUs; the first thread also
//! reads the tunnel endpoint and retries frames that wait for buffers.
//!
//! A ring joins on its driver's first kick (the vhost-user worker thread
//! hands it over) and leaves when its frontend goes. The node's tunnel
//! endpoint is read in the same sweep, so frames from other nodes are
//! switched without another thread to wake. When every ring and the
//! endpoint have been idle for [`TX_POLL`], the thread asks the drivers to
//! kick again and sleeps until a kick or a datagram comes; while it polls,
//! drivers need not kick at all. Waking a sleeping CPU costs tens of
//! microseconds on a virtual machine, so the thread polls that long after
//! the last frame before it sleeps.
//! A port over its egress rate is skipped until its bucket refills.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::l2::PortId;
use crate::offload::{NetHdr, NET_HDR};
use crate::port::{signal_if_wanted, with_ring, Port};
use crate::ring::{Desc, Pieces, Ring, MAX_CHAIN};
use crate::switch::{Inner, Kicks, PART_READ};
use crate::tunnel::{Receiver, Tunnel};

/// How long the rings are polled after the last frame before the thread
/// sleeps until a kick.
const TX_POLL: Duration = Duration::from_micros(500);
/// Receive calls on the tunnel endpoint per sweep, at most.
const TUNNEL_READS: usize = 4;
/// The longest sleep without a kick (the thread then checks that the
/// switch still exists).
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// The longest rest a shaped transmit ring takes at once.
const MAX_SHAPING_SLEEP: Duration = Duration::from_millis(10);
/// Frames taken from one ring before moving to the next.
const TX_BATCH: usize = 64;
/// Frames this long or longer are read in part when their ring's bursts
/// are (shorter ones cost less to copy twice than to write in pieces).
const PART_MIN: usize = 512;

/// The rings the thread serves and its wake-up call.
pub(crate) struct Datapath {
    rings: Mutex<Vec<(Arc<Port>, usize, VringRwLock)>>,
    generation: AtomicU64,
    wake: EventFd,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            rings: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Wakes the thread if it sleeps.
    pub(crate) fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            debug!("cannot wake the data path: {e}");
        }
    }

    /// Serves `vring`, the transmit ring of `port`'s queue pair `pair`
    /// (replacing one a previous frontend left), and wakes the thread.
    pub(crate) fn kicked(&self, port: &Arc<Port>, pair: usize, vring: &VringRwLock) {
        {
            let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
            if !rings.iter().any(|(p, q, _)| p.id == port.id && *q == pair) {
                rings.push((port.clone(), pair, vring.clone()));
                self.generation.fetch_add(1, Ordering::Release);
            }
        }
        self.wake();
    }

    /// How many transmit rings the thread polls.
    pub(crate) fn ring_count(&self) -> usize {
        self.rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Stops serving `port`'s rings (its frontend went, or it was deleted).
    pub(crate) fn forget(&self, port: PortId) {
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        rings.retain(|(p, _, _)| p.id != port);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// What the thread sleeps on: its wake-up call and the tunnel endpoint.
struct Sleep {
    epoll: Epoll,
    /// The endpoint registered, if any.
    tunnel: Option<Arc<Tunnel>>,
}

impl Sleep {
    fn new(dp: &Datapath) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            dp.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        Ok(Self {
            epoll,
            tunnel: None,
        })
    }

    /// Watches `tunnel` (the switch's current endpoint) instead of the one
    /// before.
    fn watch(&mut self, tunnel: Option<&Arc<Tunnel>>) {
        let same = match (&self.tunnel, tunnel) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let Some(old) = self.tunnel.take() {
            let fd = old.socket().as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if let Some(t) = tunnel {
            let fd = t.socket().as_raw_fd();
            match self
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 1))
            {
                Ok(()) => self.tunnel = Some(t.clone()),
                Err(e) => warn!("cannot watch the tunnel endpoint: {e}"),
            }
        }
    }

    /// Sleeps until a kick, a datagram or `timeout`.
    fn sleep(&self, dp: &Datapath, timeout: Duration) {
        let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut events = [EpollEvent::default(); 2];
        if let Err(e) = self.epoll.wait(ms, &mut events) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                debug!("data path wait failed: {e}");
            }
        }
        // Consumes the kicks (none is fine).
        let _ = dp.wake.read();
    }
}

/// A ring the thread serves, with its signalling and shaping state.
struct TxRing {
    port: Arc<Port>,
    pair: usize,
    vring: VringRwLock,
    /// The used index at the last signal decision.
    since: u16,
    /// Over its egress rate: not polled before then.
    resume_at: Option<Instant>,
    /// Whether its bursts' long frames are read in part (see
    /// [`Kicks::switch_burst`]): the last burst's went to ports so.
    in_part: bool,
}

/// Starts data-path thread `index` for `switch`; it ends soon after the
/// switch. Thread 0 also serves the tunnel endpoint and waiting frames.
pub(crate) fn start(dp: Arc<Datapath>, switch: Weak<Inner>, index: usize) -> std::io::Result<()> {
    let name = if index == 0 {
        "netd-datapath".to_owned()
    } else {
        format!("netd-datapath{index}")
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(&dp, &switch, index == 0))
        .map(|_| ())
}

fn run(dp: &Datapath, switch: &Weak<Inner>, first: bool) {
    let mut sleeper = match Sleep::new(dp) {
        Ok(s) => s,
        Err(e) => {
            warn!("the data path cannot start: {e}");
            return;
        }
    };
    let mut receiver = Receiver::new();
    let mut rings: Vec<TxRing> = Vec::new();
    let mut seen = u64::MAX;
    let mut descs = Vec::with_capacity(MAX_CHAIN);
    let mut frames = (Vec::with_capacity(TX_BATCH), Vec::with_capacity(TX_BATCH));
    let mut kicks = Kicks::default();
    let mut idle_since: Option<Instant> = None;
    let mut asleep = false;
    loop {
        let Some(inner) = switch.upgrade() else {
            return;
        };
        let generation = dp.generation.load(Ordering::Acquire);
        if generation != seen {
            seen = generation;
            refresh(dp, &mut rings);
            // Rings that just joined were kicking: polled from now on.
            asleep = true;
        }
        if std::mem::take(&mut asleep) {
            // Polling again: no kicks needed.
            for r in &rings {
                quiet(r, false);
            }
        }
        let now = Instant::now();
        kicks.now = now;
        let mut work = 0usize;
        let mut next_resume: Option<Instant> = None;
        for r in &mut rings {
            if let Some(t) = r.resume_at {
                if now < t {
                    next_resume = Some(next_resume.map_or(t, |n| n.min(t)));
                    continue;
                }
                r.resume_at = None;
            }
            let Some(atomic) = r.port.memory() else {
                continue;
            };
            let mem = atomic.memory();
            let in_part = &mut r.in_part;
            let burst = with_ring(&r.vring, &mem, |ring, _| {
                let scratch = (&mut descs, &mut frames);
                drain(&r.port, ring, &inner, scratch, &mut kicks, in_part)
            });
            let Some((n, wait)) = burst else {
                continue;
            };
            if n > 0 {
                work += n;
                kicks.flush();
                let signalled = with_ring(&r.vring, &mem, |ring, state| {
                    signal_if_wanted(ring, state, &mut r.since)
                });
                if let Some(Err(e)) = signalled {
                    debug!(port = r.port.id.0, "cannot signal the guest: {e}");
                }
            }
            if !wait.is_zero() {
                let t = now + wait.min(MAX_SHAPING_SLEEP);
                r.resume_at = Some(t);
                next_resume = Some(next_resume.map_or(t, |n| n.min(t)));
            }
        }
        // Frames from other nodes.
        let tunnel = if first { inner.tunnel() } else { None };
        sleeper.watch(tunnel.as_ref());
        if let Some(t) = &tunnel {
            for _ in 0..TUNNEL_READS {
                let mut got = 0usize;
                let read = kicks.lend_burst(crate::tunnel::RX_AREA, |bufs, kicks| {
                    let read = receiver.receive(bufs, t.socket(), &t.stats, false, |from, d| {
                        got += 1;
                        inner.tunnel_datagram(t, from, d, kicks);
                    });
                    // Counted before the frames reach their ports.
                    kicks.end_tunnel_receive(t);
                    read
                });
                work += got;
                match read {
                    Ok(true) if got > 0 => {}
                    Ok(_) => break,
                    Err(e) => {
                        debug!("tunnel receive failed: {e}");
                        break;
                    }
                }
            }
        }
        // Frames that wait for receive buffers, for any port.
        let waiting: Vec<Arc<Port>> = if first {
            inner
                .ports
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .filter(|p| p.has_pending())
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for p in &waiting {
            if p.retry_pending() {
                work += 1;
            }
        }
        if work > 0 {
            idle_since = None;
            continue;
        }
        let idle = *idle_since.get_or_insert(now);
        if idle.elapsed() < TX_POLL {
            drop(inner);
            std::thread::yield_now();
            continue;
        }
        // Going to sleep: every ring not resting asks for kicks again; a
        // chain that came meanwhile means more work instead.
        let mut more = false;
        for r in rings.iter().filter(|r| r.resume_at.is_none()) {
            more |= quiet(r, true);
        }
        for p in &waiting {
            p.arm_pending();
        }
        drop(inner);
        asleep = true;
        if more {
            continue;
        }
        let timeout = next_resume
            .map_or(IDLE_WAIT, |t| t.saturating_duration_since(Instant::now()))
            .min(IDLE_WAIT);
        sleeper.sleep(dp, timeout);
        idle_since = None;
    }
}

/// Turns `r`'s kicks on or off; true if chains are waiting (when on).
fn quiet(r: &TxRing, kicks_on: bool) -> bool {
    let Some(atomic) = r.port.memory() else {
        return false;
    };
    let mem = atomic.memory();
    with_ring(&r.vring, &mem, |ring, _| ring.notify(kicks_on)).unwrap_or(false)
}

/// Whether `a` and `b` are the same ring (not two connections' rings of
/// one queue).
fn same(a: &VringRwLock, b: &VringRwLock) -> bool {
    let pa: *const _ = &*a.get_ref();
    let pb: *const _ = &*b.get_ref();
    std::ptr::eq(pa, pb)
}

/// Brings `rings` in line with the registry, keeping the state of rings
/// that stay.
fn refresh(dp: &Datapath, rings: &mut Vec<TxRing>) {
    let now = dp
        .rings
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut old = std::mem::take(rings);
    for (port, pair, vring) in now {
        let kept = old
            .iter()
            .position(|r| r.port.id == port.id && r.pair == pair && same(&r.vring, &vring));
        match kept.map(|i| old.swap_remove(i)) {
            Some(r) => rings.push(r),
            None => {
                let since = vring.get_ref().get_queue().next_used();
                rings.push(TxRing {
                    port,
                    pair,
                    vring,
                    since,
                    resume_at: None,
                    in_part: true,
                });
            }
        }
    }
}

/// Switches up to a burst of frames from `port`'s transmit ring; returns
/// how many, and how long the ring must rest first if the port is over
/// its egress rate.
///
/// The chains go back to the driver and the port's counters grow once,
/// after the burst is switched: the locks the switch takes per frame then do not wait
/// for those writes to memory the driver's CPU holds. With `in_part`, the
/// burst's long frames are read in part; it tells whether the next
/// burst's should be.
fn drain(
    port: &Port,
    ring: &mut Ring<'_>,
    switch: &Inner,
    scratch: (&mut Vec<Desc>, &mut Frames),
    kicks: &mut Kicks,
    in_part: &mut bool,
) -> (usize, Duration) {
    let mut done: [u16; TX_BATCH] = [0; TX_BATCH];
    let r = drain_burst(port, ring, switch, scratch, kicks, &mut done, in_part);
    for head in &done[..r.0] {
        ring.push_used(*head, 0);
    }
    ring.publish();
    r
}

/// [`drain`]'s work; the heads of the chains taken go to `done`.
///
/// The burst's chains are taken first and their frames' first bytes
/// prefetched; then every frame is read, then each is switched. The reads
/// from the driver's memory (cache misses on another CPU's lines) overlap
/// instead of each waiting behind the previous frame's locks.
fn drain_burst(
    port: &Port,
    ring: &mut Ring<'_>,
    switch: &Inner,
    (descs, (frames, rests)): (&mut Vec<Desc>, &mut Frames),
    kicks: &mut Kicks,
    done: &mut [u16; TX_BATCH],
    in_part: &mut bool,
) -> (usize, Duration) {
    let mut n = 0usize;
    // Each chain taken: where its descriptors are in `descs`.
    let mut chains = [(0usize, 0usize); TX_BATCH];
    let mut taken = 0usize;
    let mut wait = Duration::ZERO;
    descs.clear();
    while n < TX_BATCH {
        let w = port.egress_wait();
        if !w.is_zero() {
            wait = w;
            break;
        }
        let start = descs.len();
        let head = match ring.pop(descs) {
            None => break,
            Some(Ok(h)) => h,
            Some(Err((head, e))) => {
                debug!(port = port.id.0, "transmit chain {head}: {e}");
                done[n] = head;
                port.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                n += 1;
                continue;
            }
        };
        done[n] = head;
        n += 1;
        let chain = &descs[start..];
        if let Some(d) = chain.iter().find(|d| !d.write) {
            ring.prefetch(d.addr);
        }
        // Charged now, so the egress rate holds within the burst.
        let len = readable(chain).saturating_sub(NET_HDR);
        port.egress_debit(len);
        chains[taken] = (start, descs.len());
        taken += 1;
    }
    // A list kept from burst to burst: an array made here was written
    // element by element through the stack, a stall each.
    frames.clear();
    rests.clear();
    for &(start, end) in &chains[..taken] {
        match read_frame(
            port,
            ring,
            &descs[start..end],
            kicks,
            in_part.then_some(rests),
        ) {
            Some(f) => frames.push(f),
            None => {
                port.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // SAFETY: the rests lie in guest memory mapped while `ring` is
    // borrowed, and what was staged is written below, before the chains go
    // back to the driver.
    let parted = unsafe {
        kicks.switch_burst(frames, rests, |frame, hdr, kicks| {
            switch.switch_frame(port, frame, hdr, kicks);
        })
    };
    // Counted before any frame reaches a receiver, so whoever has seen
    // one finds it counted.
    let (sent, bytes) = std::mem::take(&mut kicks.sent);
    if sent > 0 {
        port.stats.tx_frames.fetch_add(sent, Ordering::Relaxed);
        port.stats.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    if parted {
        // Their rests must be read before the sender gets its buffers back.
        kicks.flush();
    }
    // Read in part while that pays; whole (the reads overlap better) when
    // no frame went to a port from where it was.
    *in_part = parted || rests.is_empty();
    (n, wait)
}

/// A frame read into the burst: where it is there, its header, and for a
/// frame read in part where the rest is (its place in the rests).
type Frame = (std::ops::Range<usize>, NetHdr, Option<usize>);
/// A burst's frames and the rests of those read in part.
type Frames = (Vec<Frame>, Vec<Pieces>);

/// Bytes the device may read in `chain`.
fn readable(chain: &[Desc]) -> usize {
    chain
        .iter()
        .filter(|d| !d.write)
        .fold(0usize, |n, d| n.saturating_add(d.len as usize))
}

/// Reads the virtio-net header and the frame of the chain `descs` into
/// the burst; where the frame is there, and its header. None (nothing
/// kept) for a chain longer than a frame, one pointing outside memory,
/// or a header the driver may not send.
///
/// With `rests`, of a frame of [`PART_MIN`] bytes or more only the first
/// [`PART_READ`] are read when the rest lies in a few mapped pieces: their
/// places go to `rests` (the burst has room for them).
fn read_frame(
    port: &Port,
    ring: &Ring<'_>,
    descs: &[Desc],
    kicks: &mut Kicks,
    rests: Option<&mut Vec<Pieces>>,
) -> Option<Frame> {
    let readable = readable(descs);
    if readable <= NET_HDR {
        return None;
    }
    let len = readable - NET_HDR;
    let (mut limit, mut rest) = match rests.as_ref() {
        Some(_) if len >= PART_MIN => (PART_READ, Some(Pieces::EMPTY)),
        _ => (len, None),
    };
    let mut hdr = [0u8; NET_HDR];
    let (start, dst) = kicks.reserve(len)?;
    let (mut got, mut at) = (0usize, 0usize);
    let mut ok = true;
    for d in descs.iter().filter(|d| !d.write) {
        let mut left = d.len as usize;
        let mut addr = d.addr;
        let s = (NET_HDR - got).min(left);
        if s > 0 && !ring.read(addr, &mut hdr[got..got + s]) {
            ok = false;
            break;
        }
        got += s;
        left -= s;
        let Some(a) = addr.checked_add(s as u64) else {
            ok = false;
            break;
        };
        addr = a;
        if left == 0 {
            continue;
        }
        // The first `now` bytes are read; the rest stay where they are.
        let now = limit.saturating_sub(at).min(left);
        let (Some(part), Some(later)) = (dst.get_mut(at..at + now), addr.checked_add(now as u64))
        else {
            ok = false;
            break;
        };
        if !ring.read(addr, part) {
            ok = false;
            break;
        }
        if now < left {
            let host = ring.host_ptr(later, left - now);
            let kept = match (rest.as_mut(), host) {
                (Some(r), Some(p)) => r.push(p, left - now),
                _ => false,
            };
            if !kept {
                // Not in a few mapped pieces: read whole after all (what
                // was left so far, this descriptor's rest, the others).
                let so_far = dst.get_mut(PART_READ.min(at + now)..at + now);
                // SAFETY: the pieces were mapped by `ring`, still borrowed.
                let read = so_far.is_some_and(|d| rest.is_none_or(|r| unsafe { r.read(0, d) }));
                let tail = dst.get_mut(at + now..at + left);
                if !read || !tail.is_some_and(|d| ring.read(later, d)) {
                    ok = false;
                    break;
                }
                rest = None;
                limit = len;
            }
        }
        at += left;
    }
    let hdr = NetHdr::parse(&hdr);
    let valid = ok.then(|| hdr.validate(port.features(), len));
    match valid {
        Some(Ok(())) => {
            let at = match (rest, rests) {
                (Some(r), Some(rests)) => {
                    rests.push(r);
                    Some(rests.len() - 1)
                }
                _ => None,
            };
            Some((start..start + len, hdr, at))
        }
        other => {
            if let Some(Err(e)) = other {
                debug!(port = port.id.0, "refused a frame's header: {e}");
            }
            kicks.unreserve(start);
            None
        }
    }
}
