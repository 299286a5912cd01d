//! A vhost-user-net backend that echoes every transmitted frame back into the
//! guest's receive queue. It stands in for netd where a test needs a NIC with
//! traffic and no switch: the vmm's NIC tests and the Linux boot test.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Frames longer than this (a 64 KiB GSO frame plus headers) are dropped.
const MAX_FRAME: usize = 65_562;
/// Transmitted frames waiting for a receive buffer, at most.
const MAX_PENDING: usize = 256;

/// The echo device. Counters are readable while it runs.
#[derive(Debug, Default)]
pub struct EchoNet {
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    pending: Mutex<VecDeque<Vec<u8>>>,
    event_idx: AtomicBool,
    /// Frames taken from the transmit queue.
    pub tx_frames: AtomicU64,
    /// Frames put into the receive queue.
    pub rx_frames: AtomicU64,
    /// Frames dropped (too long, unreadable, or no room).
    pub dropped: AtomicU64,
}

impl EchoNet {
    fn pump(&self, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(atomic) = self
            .mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let mem = atomic.memory();
        let (rxq, txq) = (&vrings[0], &vrings[1]);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let next = txq
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let mut frame = Vec::new();
            let mut ok = true;
            for d in chain.clone().readable() {
                let len = d.len() as usize;
                if frame.len() + len > MAX_FRAME {
                    ok = false;
                    break;
                }
                let start = frame.len();
                frame.resize(start + len, 0);
                if mem.read_slice(&mut frame[start..], d.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            txq.add_used(head, 0).map_err(io::Error::other)?;
            self.tx_frames.fetch_add(1, Ordering::Relaxed);
            if ok && pending.len() < MAX_PENDING {
                pending.push_back(frame);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        txq.signal_used_queue()?;
        while let Some(frame) = pending.front() {
            let next = rxq
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let mut written = 0usize;
            for d in chain.writable() {
                let n = (d.len() as usize).min(frame.len() - written);
                if mem
                    .write_slice(&frame[written..written + n], d.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            let used = u32::try_from(written).unwrap_or(u32::MAX);
            rxq.add_used(head, used).map_err(io::Error::other)?;
            self.rx_frames.fetch_add(1, Ordering::Relaxed);
            pending.pop_front();
        }
        rxq.signal_used_queue()
    }
}

impl VhostUserBackend for EchoNet {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        // VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF (the header is always
        // 12 bytes), VHOST_USER_F_PROTOCOL_FEATURES.
        (1 << 32) | (1 << 15) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }
    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // A new memory table is a new guest (or a rebooted one): frames from
        // before have nowhere to go.
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        self.pump(vrings)
    }
}

/// Serves one frontend connection on `socket` (created here), then returns.
pub fn serve_once(backend: Arc<EchoNet>, socket: &Path) -> io::Result<()> {
    let mut daemon = daemon(backend)?;
    daemon
        .serve(socket)
        .map_err(|e| io::Error::other(e.to_string()))
}

fn daemon(backend: Arc<EchoNet>) -> io::Result<VhostUserDaemon<Arc<EchoNet>>> {
    VhostUserDaemon::new(
        "atoll-net-echo".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| io::Error::other(e.to_string()))
}
