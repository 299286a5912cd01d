//! Devices emulated inside the VMM: a thread per device waits for the guest's
//! queue notifications, hands each descriptor chain to the device's handler
//! and interrupts the guest when the ring says so.
//!
//! Everything a chain contains comes from the guest: handlers must treat every
//! address and length as hostile (virtio-queue already rejects loops,
//! out-of-range tables and oversized chains when walking them).

// Guest-visible lengths and addresses are 32/64-bit fields bounded by the
// checks next to each cast (SIZE_MAX, request caps, queue sizes).
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tracing::warn;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, Activation, VirtioError};

/// A chain as handlers see it.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// What a device does with each request.
pub trait QueueHandler: Send + 'static {
    /// Serves one chain from queue `queue`; returns the bytes written into it.
    fn handle(&mut self, queue: u16, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32;
}

/// What a worker did, kept across activations (readable any time).
#[derive(Debug, Default)]
pub struct Stats {
    /// Chains served.
    pub requests: AtomicU64,
    /// Bytes written into the guest's buffers.
    pub bytes_to_guest: AtomicU64,
    /// Queues stopped because the guest corrupted them.
    pub broken_queues: AtomicU64,
}

impl Stats {
    /// The counters by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("requests", self.requests.load(Ordering::Relaxed)),
            (
                "bytes_to_guest",
                self.bytes_to_guest.load(Ordering::Relaxed),
            ),
            ("broken_queues", self.broken_queues.load(Ordering::Relaxed)),
        ]
    }
}

/// A device's worker slot: the thread while the device runs and the counters
/// that outlive it.
#[derive(Debug, Default)]
pub struct Served {
    worker: Option<Worker>,
    stats: Arc<Stats>,
}

impl Served {
    /// Starts serving `a` with `handler` (see [`start`]).
    pub fn start(
        &mut self,
        name: &str,
        mem: GuestMemoryMmap,
        a: Activation,
        max_size: u16,
        handler: impl QueueHandler,
    ) -> Result<(), VirtioError> {
        self.stop();
        self.worker = Some(start(name, mem, a, max_size, handler, self.stats.clone())?);
        Ok(())
    }

    /// Stops the thread (device reset).
    pub fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    /// See [`Worker::pause`].
    pub fn pause(&self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    /// See [`Worker::resume`].
    pub fn resume(&self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    /// The counters by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.stats.counters()
    }
}

/// The running worker of one device.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    wake: EventFd,
    /// Held while the thread serves a queue; true while the VM is paused.
    paused: Arc<Mutex<bool>>,
    thread: Option<JoinHandle<()>>,
}

struct Live {
    queue: Queue,
    index: u16,
    kick: EventFd,
    call: EventFd,
    broken: bool,
}

/// Builds the queues of `a` and starts serving them with `handler`.
pub fn start(
    name: &str,
    mem: GuestMemoryMmap,
    a: Activation,
    max_size: u16,
    handler: impl QueueHandler,
    stats: Arc<Stats>,
) -> Result<Worker, VirtioError> {
    let mut handler = Counted {
        inner: handler,
        stats: stats.clone(),
    };
    let mut live = Vec::new();
    for q in a.queues {
        let bad = |why| VirtioError::BadQueue {
            queue: q.index,
            why,
        };
        let mut queue = Queue::new(max_size).map_err(|_| bad("invalid maximum size"))?;
        queue.set_size(q.size);
        queue.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(q.avail as u32), Some((q.avail >> 32) as u32));
        queue.set_used_ring_address(Some(q.used as u32), Some((q.used >> 32) as u32));
        queue.set_event_idx(a.features & features::RING_EVENT_IDX != 0);
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return Err(bad("rings misaligned or outside guest memory"));
        }
        live.push(Live {
            queue,
            index: q.index,
            kick: q.kick,
            call: q.call,
            broken: false,
        });
    }
    let setup = |what| move |source| VirtioError::Setup { what, source };
    let stop = EventFd::new(EFD_NONBLOCK).map_err(setup("cannot create an eventfd"))?;
    let epoll = Epoll::new().map_err(setup("cannot create an epoll"))?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(setup("cannot create an eventfd"))?;
    let stop_id = live.len() as u64;
    let wake_id = stop_id + 1;
    for (fd, id) in [(&stop, stop_id), (&wake, wake_id)] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, id),
            )
            .map_err(setup("cannot watch an eventfd"))?;
    }
    let paused = Arc::new(Mutex::new(false));
    let (paused2, wake2) = (
        paused.clone(),
        wake.try_clone().map_err(setup("cannot clone an eventfd"))?,
    );
    for (i, l) in live.iter().enumerate() {
        epoll
            .ctl(
                ControlOperation::Add,
                l.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )
            .map_err(setup("cannot watch a queue eventfd"))?;
    }
    let thread = std::thread::Builder::new()
        .stack_size(crate::DEVICE_STACK)
        .name(format!("virtio-{name}"))
        .spawn(move || {
            // Requests that arrived before activation (no notification yet).
            for l in &mut live {
                serve(l, &mem, &mut handler, &stats);
            }
            let mut events = vec![EpollEvent::default(); live.len() + 2];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("virtio worker: {e}");
                        return;
                    }
                };
                for ev in &events[..n] {
                    let id = ev.data();
                    if id == stop_id {
                        return;
                    }
                    // Serving happens with the pause lock held: pause() returns
                    // only between requests, and nothing is served while paused
                    // (kicks then wait in the ring until the wake-up).
                    let p = paused2.lock().unwrap_or_else(PoisonError::into_inner);
                    if id == wake_id {
                        let _ = wake2.read();
                        if !*p {
                            for l in &mut live {
                                serve(l, &mem, &mut handler, &stats);
                            }
                        }
                    } else if let Some(l) = live.get_mut(id as usize) {
                        let _ = l.kick.read();
                        if !*p {
                            serve(l, &mem, &mut handler, &stats);
                        }
                    }
                }
            }
        })
        .map_err(setup("cannot start the device thread"))?;
    Ok(Worker {
        stop,
        wake,
        paused,
        thread: Some(thread),
    })
}

/// Drains a queue; a ring the guest corrupted stops that queue only.
fn serve(l: &mut Live, mem: &GuestMemoryMmap, handler: &mut impl QueueHandler, stats: &Stats) {
    if l.broken {
        return;
    }
    match drain(&mut l.queue, l.index, mem, handler) {
        Ok(true) => {
            let _ = l.call.write(1);
        }
        Ok(false) => {}
        Err(why) => {
            stats.broken_queues.fetch_add(1, Ordering::Relaxed);
            broken(l, &why);
        }
    }
}

/// A handler that counts what it serves.
struct Counted<H> {
    inner: H,
    stats: Arc<Stats>,
}

impl<H: QueueHandler> QueueHandler for Counted<H> {
    fn handle(&mut self, queue: u16, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let n = self.inner.handle(queue, mem, chain);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_to_guest
            .fetch_add(u64::from(n), Ordering::Relaxed);
        n
    }
}

/// Serves every available chain of `queue`; true if the guest wants an
/// interrupt. An error means the guest corrupted the ring itself.
pub fn drain(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemoryMmap,
    handler: &mut impl QueueHandler,
) -> Result<bool, String> {
    // A ring can hold at most `size` new chains per pass over it; a guest that
    // keeps publishing cannot hold this thread forever.
    let mut budget = 64 * usize::from(queue.size().max(1));
    loop {
        queue.disable_notification(mem).map_err(|e| e.to_string())?;
        loop {
            let chain = queue.iter(mem).map_err(|e| e.to_string())?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = handler.handle(index, mem, chain);
            queue.add_used(mem, head, len).map_err(|e| e.to_string())?;
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return Ok(true);
            }
        }
        // More may have arrived while notifications were off.
        if !queue.enable_notification(mem).map_err(|e| e.to_string())? {
            break;
        }
    }
    queue.needs_notification(mem).map_err(|e| e.to_string())
}

fn broken(l: &mut Live, why: &str) {
    warn!(
        queue = l.index,
        "guest broke the queue, ignoring it until reset: {why}"
    );
    l.broken = true;
}

impl Worker {
    /// Stops serving; returns once no request is being served.
    pub fn pause(&self) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = true;
    }

    /// Serves again, starting with whatever the guest queued meanwhile.
    pub fn resume(&self) {
        *self.paused.lock().unwrap_or_else(PoisonError::into_inner) = false;
        let _ = self.wake.write(1);
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
