//! The control queue of a multi-queue virtio-net NIC whose data queues a
//! vhost-user backend serves: the VMM answers it. The one command a NIC
//! with `VIRTIO_NET_F_MQ` must take is how many queue pairs the driver
//! uses (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`); the backend is told to serve
//! exactly those pairs (`SET_VRING_ENABLE`). Anything else is refused with
//! `VIRTIO_NET_ERR`, as is a command that does not fit its chain.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use tracing::{info, warn};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::worker::{Chain, QueueHandler};

/// Feature bits: the control queue, and more than one queue pair.
pub const NET_F_CTRL_VQ: u64 = 1 << 17;
pub const NET_F_MQ: u64 = 1 << 22;
/// Queue pairs a NIC offers at most (virtio allows 0x8000; the vmm's
/// devices have at most 64 queues).
pub const MAX_PAIRS: u16 = 31;

const CLASS_MQ: u8 = 4;
const MQ_VQ_PAIRS_SET: u8 = 0;
const OK: u8 = 0;
const ERR: u8 = 1;
/// Longest command read (class, command, and a few bytes of data).
const MAX_COMMAND: usize = 64;

/// The queue pairs in use, shared between the control queue's handler and
/// the device (which restarts that many after a pause).
#[derive(Debug)]
pub struct Pairs {
    /// Offered.
    pub max: u16,
    /// In use (1 until the driver says otherwise).
    pub used: AtomicU16,
}

impl Pairs {
    /// `max` offered, one in use.
    pub fn new(max: u16) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: AtomicU16::new(1),
        })
    }

    /// Whether data queue `index` belongs to a pair in use.
    pub fn enabled(&self, index: u16) -> bool {
        index / 2 < self.used.load(Ordering::Acquire)
    }
}

/// The control queue's handler.
pub struct Control {
    /// Switches a data queue's ring on or off in the backend.
    pub enable: Box<dyn FnMut(u16, bool) -> Result<(), String> + Send>,
    /// The pairs.
    pub pairs: Arc<Pairs>,
    /// Whether the driver took MQ (without it, it may not set pairs).
    pub multiqueue: bool,
    /// The NIC, for logs.
    pub name: String,
}

impl Control {
    /// Carries out `cmd` (class, command, data); the ack byte.
    fn command(&mut self, cmd: &[u8]) -> u8 {
        match cmd {
            [CLASS_MQ, MQ_VQ_PAIRS_SET, lo, hi, ..] if self.multiqueue => {
                let n = u16::from_le_bytes([*lo, *hi]);
                if n == 0 || n > self.pairs.max {
                    warn!(nic = %self.name, "driver asked for {n} queue pairs of {}", self.pairs.max);
                    return ERR;
                }
                for q in 0..2 * self.pairs.max {
                    let on = q / 2 < n;
                    if let Err(e) = (self.enable)(q, on) {
                        warn!(nic = %self.name, "SET_VRING_ENABLE {q} {on}: {e}");
                        return ERR;
                    }
                }
                self.pairs.used.store(n, Ordering::Release);
                info!(nic = %self.name, pairs = n, "queue pairs in use");
                OK
            }
            _ => {
                warn!(nic = %self.name, class = ?cmd.first(), command = ?cmd.get(1), "control command refused");
                ERR
            }
        }
    }
}

impl QueueHandler for Control {
    fn handle(&mut self, _queue: u16, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        // The command is the readable part (at most MAX_COMMAND bytes read);
        // the ack is the first byte of the writable part.
        let mut cmd = Vec::new();
        for d in chain.clone().readable() {
            let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
            let take = len.min(MAX_COMMAND - cmd.len());
            let start = cmd.len();
            cmd.resize(start + take, 0);
            if mem.read_slice(&mut cmd[start..], d.addr()).is_err() {
                cmd.clear();
                break;
            }
            if cmd.len() == MAX_COMMAND {
                break;
            }
        }
        let Some(ack_at) = chain.writable().find(|d| d.len() > 0) else {
            warn!(nic = %self.name, "control command without room for its ack");
            return 0;
        };
        let ack = self.command(&cmd);
        match mem.write_obj(ack, ack_at.addr()) {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }
}
