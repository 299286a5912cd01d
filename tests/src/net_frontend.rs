//! A vhost-user-net frontend for tests: it connects to a port's socket the way
//! a VM's NIC does (vhost-user over the `virtio-driver` crate, rings and
//! buffers in shared memory) and sends and receives raw Ethernet frames.
//!
//! Frames go out behind a 12-byte virtio-net header (VERSION_1) and come back
//! behind one; the header is added and removed here, or given and returned
//! as it is (`send_with_header`, `recv_with_header`) for offload tests. With
//! MRG_RXBUF a received frame is gathered from the buffers it spans.

use std::fs::File;
use std::io::{Error, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
use virtio_driver::{ByteValued, EventFd, VhostUser, VirtioFeatureFlags, VirtioTransport};

/// virtio-net header size with VERSION_1.
pub const NET_HDR: usize = 12;
const QUEUE_SIZE: u16 = 64;
const BUF: usize = 2048;
const RX: usize = 0;
const TX: usize = 1;
/// VIRTIO_NET_F_MRG_RXBUF.
pub const F_MRG_RXBUF: u64 = 1 << 15;

/// `struct virtio_net_config` up to the MTU.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C, packed)]
pub struct NetConfig {
    /// The port's MAC.
    pub mac: [u8; 6],
    /// Bit 0: link up.
    pub status: u16,
    /// Queue pairs.
    pub max_virtqueue_pairs: u16,
    /// MTU.
    pub mtu: u16,
}

// SAFETY: plain integers, packed: no padding, every bit pattern valid.
unsafe impl ByteValued for NetConfig {}

type Transport = VhostUser<NetConfig, u16>;

/// A received frame with the virtio-net header it came behind.
pub type Received = ([u8; NET_HDR], Vec<u8>);

/// One connected NIC.
pub struct NetFrontend {
    // Field order is drop order: the queues point into memory the transport
    // and `data` own.
    rx: Virtqueue<'static, u16>,
    tx: Virtqueue<'static, u16>,
    rx_call: Arc<EventFd>,
    tx_call: Arc<EventFd>,
    rx_used_seen: u16,
    features: u64,
    data: memmap2::MmapMut,
    _data_file: File,
    transport: Box<Transport>,
    /// The device's configuration as read at connect time.
    pub config: NetConfig,
}

fn other(what: &str, e: impl std::fmt::Display) -> Error {
    Error::other(format!("{what}: {e}"))
}

impl NetFrontend {
    /// Connects to the vhost-user-net socket at `path` and fills the receive
    /// queue.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        Self::connect_with(path, 0)
    }

    /// Connects asking for the virtio-net features `extra` too (offloads,
    /// MRG_RXBUF); [`NetFrontend::features`] tells what the port granted.
    pub fn connect_with(path: &Path, extra: u64) -> Result<Self, Error> {
        let path_str = path
            .to_str()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "socket path is not UTF-8"))?;
        let features = VirtioFeatureFlags::VERSION_1.bits() | (1 << 5) | extra; // NET_F_MAC
        let mut transport = Box::new(Transport::new(path_str, features)?);
        let features = transport.get_features();
        let config = transport.get_config()?;
        let flags = VirtioFeatureFlags::VERSION_1;
        let layout = VirtqueueLayout::new::<u16>(2, usize::from(QUEUE_SIZE), flags)?;
        let translators = [transport.iova_translator(), transport.iova_translator()];
        let mem = transport.alloc_queue_mem(&layout)?;
        let base = mem.as_mut_ptr();
        let [t0, t1] = translators;
        // SAFETY: the two halves of the queue memory do not overlap, and the
        // mapping lives in the boxed transport, which outlives the queues
        // (field order above).
        let (q0, q1) = unsafe {
            (
                std::slice::from_raw_parts_mut(base, layout.end_offset),
                std::slice::from_raw_parts_mut(base.add(layout.end_offset), layout.end_offset),
            )
        };
        let rx = Virtqueue::new(t0, q0, QUEUE_SIZE, flags)?;
        let tx = Virtqueue::new(t1, q1, QUEUE_SIZE, flags)?;
        // Buffers: QUEUE_SIZE receive slots, then QUEUE_SIZE transmit slots.
        let len = 2 * usize::from(QUEUE_SIZE) * BUF;
        // SAFETY: memfd_create with a valid name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"net-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let data_file = unsafe { File::from_raw_fd(fd) };
        data_file.set_len(len as u64)?;
        // SAFETY: a shared mapping of our own memfd.
        let data = unsafe { memmap2::MmapMut::map_mut(&data_file) }?;
        transport.map_mem_region(data.as_ptr() as usize, len, data_file.as_raw_fd(), 0)?;
        let mut queues = vec![rx, tx];
        transport.setup_queues(&queues)?;
        let (Some(tx), Some(rx)) = (queues.pop(), queues.pop()) else {
            return Err(Error::other("queue setup lost a queue"));
        };
        let rx_call = transport.get_completion_fd(RX);
        let tx_call = transport.get_completion_fd(TX);
        let mut me = Self {
            rx,
            tx,
            rx_call,
            tx_call,
            rx_used_seen: 0,
            features,
            data,
            _data_file: data_file,
            transport,
            config,
        };
        for slot in 0..QUEUE_SIZE {
            me.post_rx(slot)?;
        }
        me.transport.get_submission_notifier(RX).notify()?;
        Ok(me)
    }

    fn slot_ptr(&mut self, slot: usize) -> *mut u8 {
        // SAFETY: slot < 2 * QUEUE_SIZE: inside the mapping.
        unsafe { self.data.as_mut_ptr().add(slot * BUF) }
    }

    fn post_rx(&mut self, slot: u16) -> Result<(), Error> {
        let base = self.slot_ptr(usize::from(slot));
        self.rx.add_request(|req, add| {
            *req = slot;
            add(
                libc::iovec {
                    iov_base: base.cast(),
                    iov_len: BUF,
                },
                true,
            )
        })?;
        Ok(())
    }

    /// The features negotiated with the port.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Sends one frame and waits until the port has taken it.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        if frame.len() + NET_HDR > BUF {
            return Err(Error::new(ErrorKind::InvalidInput, "frame too long"));
        }
        self.send_with_header([0; NET_HDR], frame)
    }

    /// Sends one frame behind the virtio-net header `hdr` as given (a
    /// checksum or segmentation left to the device), in one descriptor of
    /// up to all the transmit buffers; waits until the port has taken it.
    pub fn send_with_header(&mut self, hdr: [u8; NET_HDR], frame: &[u8]) -> Result<(), Error> {
        let room = usize::from(QUEUE_SIZE) * BUF;
        if frame.len() + NET_HDR > room {
            return Err(Error::new(ErrorKind::InvalidInput, "frame too long"));
        }
        let slot = usize::from(QUEUE_SIZE);
        let base = self.slot_ptr(slot);
        // SAFETY: the transmit buffers are `room` bytes inside our mapping;
        // nothing else writes them while the previous send has completed.
        let buf = unsafe { std::slice::from_raw_parts_mut(base, room) };
        buf[..NET_HDR].copy_from_slice(&hdr);
        buf[NET_HDR..NET_HDR + frame.len()].copy_from_slice(frame);
        self.submit_tx(base, NET_HDR + frame.len())
    }

    /// Submits one transmit descriptor claiming `len` bytes from the start
    /// of the transmit buffers, whatever is there (at most the buffers'
    /// mapping): a guest lying about a frame's length. Waits until the port
    /// has taken it.
    pub fn send_descriptor(&mut self, len: usize) -> Result<(), Error> {
        let slot = usize::from(QUEUE_SIZE);
        let base = self.slot_ptr(slot);
        self.submit_tx(base, len.min(usize::from(QUEUE_SIZE) * BUF))
    }

    /// Puts one descriptor of `len` bytes at `base` on the transmit queue
    /// and waits until the port has taken it.
    fn submit_tx(&mut self, base: *mut u8, len: usize) -> Result<(), Error> {
        self.tx.add_request(|req, add| {
            *req = 0;
            add(
                libc::iovec {
                    iov_base: base.cast(),
                    iov_len: len,
                },
                false,
            )
        })?;
        self.transport.get_submission_notifier(TX).notify()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.tx.completions().next().is_some() {
                return Ok(());
            }
            if !wait(&self.tx_call, deadline)? {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    "the port did not take the descriptor",
                ));
            }
        }
    }

    /// The next received frame, or `None` when none arrives within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.recv_with_header(timeout)?.map(|(_, f)| f))
    }

    /// The next received frame with its virtio-net header, or `None` when
    /// none arrives within `timeout`.
    pub fn recv_with_header(&mut self, timeout: Duration) -> Result<Option<Received>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(got) = self.take_frame(deadline)? {
                return Ok(Some(got));
            }
            if !wait(&self.rx_call, deadline)? {
                return self.take_frame(deadline);
            }
        }
    }

    /// A frame already received, if any (no waiting).
    pub fn try_recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let soon = Instant::now() + Duration::from_secs(1);
        Ok(self.take_frame(soon)?.map(|(_, f)| f))
    }

    /// A received frame: its first buffer, and with MRG_RXBUF the further
    /// buffers its header counts (waited for until `deadline`).
    fn take_frame(&mut self, deadline: Instant) -> Result<Option<Received>, Error> {
        let Some(first) = self.take_used()? else {
            return Ok(None);
        };
        if first.len() < NET_HDR {
            return Err(Error::other(format!(
                "received {} bytes, less than a header",
                first.len()
            )));
        }
        let mut hdr = [0u8; NET_HDR];
        hdr.copy_from_slice(&first[..NET_HDR]);
        let mut frame = first[NET_HDR..].to_vec();
        let buffers = if self.features & F_MRG_RXBUF != 0 {
            u16::from_le_bytes([hdr[10], hdr[11]])
        } else {
            1
        };
        if buffers == 0 {
            return Err(Error::other("num_buffers is 0"));
        }
        for i in 1..buffers {
            let more = loop {
                if let Some(b) = self.take_used()? {
                    break b;
                }
                if !wait(&self.rx_call, deadline)? {
                    return Err(Error::other(format!("buffer {i} of {buffers} never came")));
                }
            };
            frame.extend_from_slice(&more);
        }
        Ok(Some((hdr, frame)))
    }

    /// The next used receive buffer's contents (the buffer is posted again).
    fn take_used(&mut self) -> Result<Option<Vec<u8>>, Error> {
        // The used ring: flags u16, idx u16, then {id u32, len u32} entries.
        // virtio-driver hands back ids but not lengths, so the length is read
        // from the ring here, in the same order the iterator yields them.
        let used = self.rx.device_area_ptr();
        // SAFETY: the used ring lies in the queue mapping; the device writes
        // it concurrently, hence volatile reads.
        let idx = unsafe { std::ptr::read_volatile(used.add(2).cast::<u16>()) };
        if idx == self.rx_used_seen {
            return Ok(None);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let at = usize::from(self.rx_used_seen % QUEUE_SIZE);
        // SAFETY: entry `at` < QUEUE_SIZE of the used ring.
        let len = unsafe { std::ptr::read_volatile(used.add(4 + at * 8 + 4).cast::<u32>()) };
        self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
        let Some(done) = self.rx.completions().next() else {
            return Err(Error::other("used ring and driver disagree"));
        };
        let slot = done.req;
        let len = (len as usize).min(BUF);
        let base = self.slot_ptr(usize::from(slot));
        // SAFETY: the slot is BUF bytes inside our mapping and the device is
        // done with it (it is in the used ring).
        let data = unsafe { std::slice::from_raw_parts(base, len) }.to_vec();
        self.post_rx(slot)?;
        self.transport.get_submission_notifier(RX).notify()?;
        Ok(Some(data))
    }
}

/// Waits for `fd` until `deadline`; true if it fired (and was read).
fn wait(fd: &EventFd, deadline: Instant) -> Result<bool, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        let e = Error::last_os_error();
        return if e.kind() == ErrorKind::Interrupted {
            Ok(true)
        } else {
            Err(e)
        };
    }
    if n == 0 {
        return Ok(false);
    }
    fd.read().map_err(|e| other("reading a call eventfd", e))?;
    Ok(true)
}
