//! The vhost-user-blk device model: features, configuration space and queue
//! processing, one worker thread per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::disk::Disk;
use crate::qos::Limiter;
use crate::vhost_blk::config::BlkConfig;
use crate::vhost_blk::request::{self, Counters, Outcome};
use crate::vhost_blk::uring::QueueRing;

/// Guest memory as the backend sees it.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;
/// One snapshot of the guest's memory table.
pub type GuestMem = GuestMemoryMmap<()>;

/// How long a queue worker watches its ring for the next request after
/// finishing some, before sleeping until a kick.
const POLL: std::time::Duration = std::time::Duration::from_micros(30);
/// Requests handed to io_uring per submission while a queue is drained. One
/// submission per drained ring would turn 32 in-flight requests into a convoy:
/// the device takes them in one kick, completes them in one interrupt, the
/// frontend refills all 32 at once, and the device idles between batches (65 k
/// IOPS at QD32 here); small batches keep it busy (90 k, as fio's own loop).
const SUBMIT_BATCH: usize = 8;

/// Largest queue the backend accepts.
pub const QUEUE_SIZE: usize = 1024;

/// Device state shared by the control thread and the queue workers.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

struct Inner {
    disk: Arc<Disk>,
    read_only: bool,
    num_queues: usize,
    serial: Vec<u8>,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemory>>,
    /// Grows with every memory update, so a queue worker in the middle of
    /// draining notices regions the frontend added meanwhile.
    mem_generation: AtomicU64,
    counters: Arc<Counters>,
    limiter: Limiter,
    /// The channel for backend-initiated messages, if the frontend set one up.
    backend_req: Mutex<Option<Backend>>,
    /// One io_uring per queue; empty if io_uring is unavailable (all I/O is then
    /// synchronous in the queue's thread).
    rings: Vec<QueueRing>,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("num_queues", &self.inner.num_queues)
            .finish_non_exhaustive()
    }
}

impl BlkBackend {
    /// A device serving `disk` (refusing writes if `read_only`) with `num_queues`
    /// queues; `serial` is what GET_ID returns (at most 20 bytes are used).
    pub fn new(
        disk: Arc<Disk>,
        read_only: bool,
        num_queues: usize,
        serial: &str,
        counters: Arc<Counters>,
        limiter: Limiter,
    ) -> Self {
        let num_queues = num_queues.max(1);
        // Only direct I/O on device-backed files goes through io_uring; other
        // volumes get no rings at all.
        let ring_count = if disk.uses_direct_io() { num_queues } else { 0 };
        let rings = (0..ring_count)
            .map(|_| QueueRing::new())
            .collect::<io::Result<Vec<_>>>()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "io_uring unavailable; I/O stays synchronous");
                Vec::new()
            });
        Self {
            inner: Arc::new(Inner {
                disk,
                read_only,
                num_queues,
                serial: serial.as_bytes().to_vec(),
                event_idx: AtomicBool::new(false),
                mem: RwLock::new(None),
                mem_generation: AtomicU64::new(0),
                counters,
                limiter,
                backend_req: Mutex::new(None),
                rings,
            }),
        }
    }

    /// Tells the connected frontend that the configuration space changed (the
    /// capacity after a resize). Returns whether a frontend was told; a frontend
    /// without the backend channel sees the new size when it reads the
    /// configuration again (e.g. on reconnect).
    pub fn config_changed(&self) -> bool {
        let req = self
            .inner
            .backend_req
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match req.map(|r| r.handle_config_change()) {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot notify the frontend of a config change");
                false
            }
            None => false,
        }
    }

    fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity_sectors: self.inner.disk.capacity() / crate::volume::SECTOR,
            blk_size: 512,
            num_queues: u16::try_from(self.inner.num_queues).unwrap_or(u16::MAX),
        }
    }

    /// The completion eventfd of each queue's ring (none without io_uring), to be
    /// polled by that queue's worker thread with event id `num_queues + 1 + thread`.
    pub fn ring_eventfds(&self) -> Vec<std::os::fd::RawFd> {
        self.inner.rings.iter().map(QueueRing::eventfd).collect()
    }

    /// Waits for every request in flight and drops them: the frontend that made
    /// them is gone, so there is nobody to tell.
    pub fn drain_rings(&self) {
        for ring in &self.inner.rings {
            let n = ring.drain().len();
            if n > 0 {
                tracing::debug!(requests = n, "dropped completions of a departed frontend");
            }
        }
    }

    fn memory(&self) -> Option<Arc<GuestMem>> {
        self.inner
            .mem
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|m| m.memory().into_inner())
    }

    /// Signals the guest if it asked to be told about the used entries just added.
    fn notify(vring: &VringRwLock, event_idx: bool) -> io::Result<()> {
        let notify = if event_idx {
            vring.needs_notification().map_err(io::Error::other)?
        } else {
            true
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Returns completed asynchronous requests of queue `q` to the guest; true
    /// if there were any.
    fn complete(&self, q: usize, vring: &VringRwLock) -> io::Result<bool> {
        let Some(ring) = self.inner.rings.get(q) else {
            return Ok(false);
        };
        let done = ring.reap();
        let any = !done.is_empty();
        for c in done {
            let used = request::complete(&*c.mem, c.pending, c.result, &self.inner.counters);
            vring.add_used(c.head, used).map_err(io::Error::other)?;
        }
        Ok(any)
    }

    /// Spins for up to [`POLL`] until the guest makes a request available on
    /// `vring` or a request of queue `q` in io_uring completes; true if so.
    fn poll_for_more(&self, q: usize, vring: &VringRwLock, mem: &GuestMem) -> bool {
        let start = std::time::Instant::now();
        let ring = self.inner.rings.get(q);
        loop {
            if ring.is_some_and(QueueRing::has_completions) {
                return true;
            }
            let next = vring.get_ref().get_queue().next_avail();
            let avail = vring
                .get_ref()
                .get_queue()
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire);
            match avail {
                Ok(idx) if idx.0 != next => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            if start.elapsed() >= POLL {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Drains queue `q`, running or submitting every available request.
    fn process_queue(&self, q: usize, vring: &VringRwLock) -> io::Result<()> {
        let mut generation = self.inner.mem_generation.load(Ordering::Acquire);
        let Some(mut mem) = self.memory() else {
            return Ok(());
        };
        let ring = self.inner.rings.get(q);
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        let ctx = request::Context {
            disk: &self.inner.disk,
            read_only: self.inner.read_only,
            serial: &self.inner.serial,
            counters: &self.inner.counters,
            limiter: Some(&self.inner.limiter),
            allow_async: ring.is_some(),
        };
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mut completed = false;
            let mut pushed = 0usize;
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                // A request the frontend made after adding a memory region
                // (acknowledged before it could use it) must see the region,
                // even if this loop started before: when the memory changed,
                // the snapshot is renewed and the chain read again with it
                // (its indirect table may lie in the new region too).
                let now = self.inner.mem_generation.load(Ordering::Acquire);
                if now != generation {
                    generation = now;
                    if let Some(m) = self.memory() {
                        mem = m;
                    }
                    vring.get_mut().get_queue_mut().go_to_previous_position();
                    continue;
                }
                let head = chain.head_index();
                let used = match request::process(&*mem, chain, &ctx) {
                    Outcome::Done(used) => used,
                    Outcome::Async(p) => match ring.map(|r| r.push(head, p, mem.clone())) {
                        Some(Ok(())) => {
                            pushed += 1;
                            if pushed == SUBMIT_BATCH {
                                if let Some(r) = ring {
                                    r.submit()?;
                                }
                                pushed = 0;
                            }
                            continue;
                        }
                        // No room in the ring: run it here.
                        Some(Err(p)) => request::complete(
                            &*mem,
                            p,
                            Err(io::ErrorKind::WouldBlock.into()),
                            &self.inner.counters,
                        ),
                        None => continue,
                    },
                };
                vring.add_used(head, used).map_err(io::Error::other)?;
                completed = true;
            }
            if let Some(ring) = ring {
                if pushed > 0 {
                    ring.submit()?;
                }
                // Whatever completed by now (during submission, or while
                // polling) goes back without an eventfd round trip.
                completed |= self.complete(q, vring)?;
            }
            if completed {
                Self::notify(vring, event_idx)?;
            }
            // Before going back to sleep, watch the ring for a moment: a kick and
            // the wake-up it causes cost ~20 µs on these machines, more than a
            // request; with notifications off, the frontend does not kick at all.
            if event_idx && completed && self.poll_for_more(q, vring, &mem) {
                continue;
            }
            // With EVENT_IDX, re-enabling may reveal requests that raced in.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self
            .inner
            .backend_req
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(backend);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        *self
            .inner
            .mem
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(mem);
        self.inner.mem_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the library stop our queue workers when the device goes away.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a worker exit event");
                None
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.num_queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // Each worker thread serves one queue (see `queues_per_thread`), so its
        // `vrings` hold just that queue and its ring is the thread's.
        let event = usize::from(device_event);
        let nq = self.inner.num_queues;
        let vring = if event < nq {
            vrings.get(event)
        } else {
            vrings.first()
        };
        let vring =
            vring.ok_or_else(|| io::Error::other(format!("event {device_event} for no queue")))?;
        if event < nq {
            self.process_queue(thread_id, vring)
        } else {
            if let Some(ring) = self.inner.rings.get(thread_id) {
                ring.clear_event();
            }
            if self.complete(thread_id, vring)? {
                Self::notify(vring, self.inner.event_idx.load(Ordering::Relaxed))?;
            }
            Ok(())
        }
    }
}
