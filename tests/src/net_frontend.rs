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
    /// Receive queue of pair p at 2p, its transmit queue at 2p + 1.
    queues: Vec<Virtqueue<'static, u16>>,
    calls: Vec<Arc<EventFd>>,
    rx_used_seen: Vec<u16>,
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

/// Bytes of buffers per queue.
const QUEUE_BYTES: usize = QUEUE_SIZE as usize * BUF;

impl NetFrontend {
    /// Connects to the vhost-user-net socket at `path` and fills the receive
    /// queue.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        Self::connect_with(path, 0)
    }

    /// Connects asking for the virtio-net features `extra` too (offloads,
    /// MRG_RXBUF); [`NetFrontend::features`] tells what the port granted.
    pub fn connect_with(path: &Path, extra: u64) -> Result<Self, Error> {
        Self::connect_pairs(path, extra, 1)
    }

    /// Connects with `pairs` receive/transmit queue pairs (more than one
    /// needs the device's MQ feature), each receive queue filled.
    pub fn connect_pairs(path: &Path, extra: u64, pairs: usize) -> Result<Self, Error> {
        let path_str = path
            .to_str()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "socket path is not UTF-8"))?;
        let features = VirtioFeatureFlags::VERSION_1.bits() | (1 << 5) | extra; // NET_F_MAC
        let mut transport = Box::new(Transport::new(path_str, features)?);
        let features = transport.get_features();
        let config = transport.get_config()?;
        let n = 2 * pairs.max(1);
        if transport.max_queues().unwrap_or(2) < n {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("the device has fewer than {n} queues"),
            ));
        }
        let flags = VirtioFeatureFlags::VERSION_1;
        let layout = VirtqueueLayout::new::<u16>(n, usize::from(QUEUE_SIZE), flags)?;
        let translators: Vec<_> = (0..n).map(|_| transport.iova_translator()).collect();
        let mem = transport.alloc_queue_mem(&layout)?;
        let base = mem.as_mut_ptr();
        let mut queues = Vec::with_capacity(n);
        for (i, t) in translators.into_iter().enumerate() {
            // SAFETY: the n parts of the queue memory do not overlap, and
            // the mapping lives in the boxed transport, which outlives the
            // queues (field order above).
            let q = unsafe {
                std::slice::from_raw_parts_mut(base.add(i * layout.end_offset), layout.end_offset)
            };
            queues.push(Virtqueue::new(t, q, QUEUE_SIZE, flags)?);
        }
        // Buffers: per queue, QUEUE_SIZE slots.
        let len = n * QUEUE_BYTES;
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
        transport.setup_queues(&queues)?;
        let calls = (0..n).map(|q| transport.get_completion_fd(q)).collect();
        let mut me = Self {
            queues,
            calls,
            rx_used_seen: vec![0; pairs.max(1)],
            features,
            data,
            _data_file: data_file,
            transport,
            config,
        };
        for pair in 0..pairs.max(1) {
            for slot in 0..QUEUE_SIZE {
                me.post_rx(pair, slot)?;
            }
            me.transport.get_submission_notifier(2 * pair).notify()?;
        }
        Ok(me)
    }

    /// Start of buffer `slot` of queue `queue`.
    fn slot_ptr(&mut self, queue: usize, slot: usize) -> *mut u8 {
        // SAFETY: queue < 2 * pairs and slot < QUEUE_SIZE: inside the mapping.
        unsafe { self.data.as_mut_ptr().add(queue * QUEUE_BYTES + slot * BUF) }
    }

    fn post_rx(&mut self, pair: usize, slot: u16) -> Result<(), Error> {
        let base = self.slot_ptr(2 * pair, usize::from(slot));
        self.queues[2 * pair].add_request(|req, add| {
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
        self.send_on(0, hdr, frame)
    }

    /// Like [`NetFrontend::send_with_header`], on queue pair `pair`.
    pub fn send_on(&mut self, pair: usize, hdr: [u8; NET_HDR], frame: &[u8]) -> Result<(), Error> {
        if pair >= self.rx_used_seen.len() {
            return Err(Error::new(ErrorKind::InvalidInput, "no such queue pair"));
        }
        if frame.len() + NET_HDR > QUEUE_BYTES {
            return Err(Error::new(ErrorKind::InvalidInput, "frame too long"));
        }
        let base = self.slot_ptr(2 * pair + 1, 0);
        // SAFETY: the transmit buffers are QUEUE_BYTES inside our mapping;
        // nothing else writes them while the previous send has completed.
        let buf = unsafe { std::slice::from_raw_parts_mut(base, QUEUE_BYTES) };
        buf[..NET_HDR].copy_from_slice(&hdr);
        buf[NET_HDR..NET_HDR + frame.len()].copy_from_slice(frame);
        self.submit_tx(2 * pair + 1, base, NET_HDR + frame.len())
    }

    /// Makes `len` bytes at `base` available on transmit queue `q` as one
    /// descriptor (no kick).
    fn add_tx(&mut self, q: usize, base: *mut u8, len: usize) -> Result<(), Error> {
        self.queues[q].add_request(|req, add| {
            *req = 0;
            add(
                libc::iovec {
                    iov_base: base.cast(),
                    iov_len: len,
                },
                false,
            )
        })?;
        Ok(())
    }

    /// Sends `frames` (at most 64, each with an empty header and up to
    /// 2 KiB) as one burst: all are made available before the port is
    /// kicked once, as a busy driver does. Waits until the port has taken
    /// them all.
    pub fn send_burst(&mut self, frames: &[Vec<u8>]) -> Result<(), Error> {
        self.send_burst_in(frames, 1)
    }

    /// [`NetFrontend::send_burst`] with each frame's buffer (header and
    /// frame) in a chain of `pieces` descriptors of about equal length.
    pub fn send_burst_in(&mut self, frames: &[Vec<u8>], pieces: usize) -> Result<(), Error> {
        if frames.len() > usize::from(QUEUE_SIZE)
            || frames.iter().any(|f| f.len() + NET_HDR > BUF)
            || pieces == 0
        {
            return Err(Error::new(ErrorKind::InvalidInput, "burst too large"));
        }
        for (slot, f) in frames.iter().enumerate() {
            let base = self.slot_ptr(TX, slot);
            // SAFETY: slot `slot` of the transmit buffers, BUF bytes inside
            // our mapping; no earlier send is outstanding.
            let buf = unsafe { std::slice::from_raw_parts_mut(base, BUF) };
            buf[..NET_HDR].fill(0);
            buf[NET_HDR..NET_HDR + f.len()].copy_from_slice(f);
            let len = NET_HDR + f.len();
            let step = len.div_ceil(pieces);
            self.queues[TX].add_request(|req, add| {
                *req = 0;
                let mut at = 0;
                while at < len {
                    let n = step.min(len - at);
                    add(
                        libc::iovec {
                            // SAFETY: inside the slot.
                            iov_base: unsafe { base.add(at) }.cast(),
                            iov_len: n,
                        },
                        false,
                    )?;
                    at += n;
                }
                Ok(())
            })?;
        }
        self.transport.get_submission_notifier(TX).notify()?;
        // Polled first, as a busy driver does (it sees buffers back the
        // moment the port returns them, before any interrupt).
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let mut done = 0;
        while done < frames.len() {
            done += self.queues[TX].completions().count();
            if done < frames.len() && start.elapsed() < Duration::from_millis(5) {
                std::hint::spin_loop();
                continue;
            }
            if done < frames.len() && !wait(&[&self.calls[TX]], deadline)? {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    "the port did not take the burst",
                ));
            }
        }
        Ok(())
    }

    /// Overwrites every transmit buffer with `byte`, as a driver reusing
    /// them for its next frames does once the port has taken them.
    pub fn scribble_tx(&mut self, byte: u8) {
        let base = self.slot_ptr(TX, 0);
        // SAFETY: the transmit queue's buffers, QUEUE_BYTES inside our
        // mapping; no send is outstanding.
        unsafe { std::ptr::write_bytes(base, byte, QUEUE_BYTES) };
    }

    /// Submits one transmit descriptor claiming `len` bytes from the start
    /// of the transmit buffers, whatever is there (at most the buffers'
    /// mapping): a guest lying about a frame's length. Waits until the port
    /// has taken it.
    pub fn send_descriptor(&mut self, len: usize) -> Result<(), Error> {
        let base = self.slot_ptr(TX, 0);
        self.submit_tx(TX, base, len.min(QUEUE_BYTES))
    }

    /// Puts one descriptor of `len` bytes at `base` on transmit queue `q`
    /// and waits until the port has taken it.
    fn submit_tx(&mut self, q: usize, base: *mut u8, len: usize) -> Result<(), Error> {
        self.add_tx(q, base, len)?;
        self.transport.get_submission_notifier(q).notify()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.queues[q].completions().next().is_some() {
                return Ok(());
            }
            if !wait(&[&self.calls[q]], deadline)? {
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
        Ok(self.recv_any(timeout)?.map(|(_, r)| r))
    }

    /// The next frame received on any queue pair, with the pair.
    pub fn recv_any(&mut self, timeout: Duration) -> Result<Option<(usize, Received)>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            for pair in 0..self.rx_used_seen.len() {
                if let Some(got) = self.take_frame(pair, deadline)? {
                    return Ok(Some((pair, got)));
                }
            }
            let calls: Vec<Arc<EventFd>> = self.calls.iter().step_by(2).cloned().collect();
            let refs: Vec<&EventFd> = calls.iter().map(|c| &**c).collect();
            if !wait(&refs, deadline)? {
                for pair in 0..self.rx_used_seen.len() {
                    if let Some(got) = self.take_frame(pair, deadline)? {
                        return Ok(Some((pair, got)));
                    }
                }
                return Ok(None);
            }
        }
    }

    /// A frame already received, if any (no waiting).
    pub fn try_recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let soon = Instant::now() + Duration::from_secs(1);
        for pair in 0..self.rx_used_seen.len() {
            if let Some((_, f)) = self.take_frame(pair, soon)? {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// A frame received on `pair`: its first buffer, and with MRG_RXBUF the
    /// further buffers its header counts (waited for until `deadline`).
    fn take_frame(&mut self, pair: usize, deadline: Instant) -> Result<Option<Received>, Error> {
        let Some(first) = self.take_used(pair)? else {
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
                if let Some(b) = self.take_used(pair)? {
                    break b;
                }
                let call = self.calls[2 * pair].clone();
                if !wait(&[&call], deadline)? {
                    return Err(Error::other(format!("buffer {i} of {buffers} never came")));
                }
            };
            frame.extend_from_slice(&more);
        }
        Ok(Some((hdr, frame)))
    }

    /// The next used receive buffer's contents on `pair` (the buffer is
    /// posted again).
    fn take_used(&mut self, pair: usize) -> Result<Option<Vec<u8>>, Error> {
        let q = 2 * pair;
        // The used ring: flags u16, idx u16, then {id u32, len u32} entries.
        // virtio-driver hands back ids but not lengths, so the length is read
        // from the ring here, in the same order the iterator yields them.
        let used = self.queues[q].device_area_ptr();
        // SAFETY: the used ring lies in the queue mapping; the device writes
        // it concurrently, hence volatile reads.
        let idx = unsafe { std::ptr::read_volatile(used.add(2).cast::<u16>()) };
        if idx == self.rx_used_seen[pair] {
            return Ok(None);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let at = usize::from(self.rx_used_seen[pair] % QUEUE_SIZE);
        // SAFETY: entry `at` < QUEUE_SIZE of the used ring.
        let len = unsafe { std::ptr::read_volatile(used.add(4 + at * 8 + 4).cast::<u32>()) };
        self.rx_used_seen[pair] = self.rx_used_seen[pair].wrapping_add(1);
        let Some(done) = self.queues[q].completions().next() else {
            return Err(Error::other("used ring and driver disagree"));
        };
        let slot = done.req;
        let len = (len as usize).min(BUF);
        let base = self.slot_ptr(q, usize::from(slot));
        // SAFETY: the slot is BUF bytes inside our mapping and the device is
        // done with it (it is in the used ring).
        let data = unsafe { std::slice::from_raw_parts(base, len) }.to_vec();
        self.post_rx(pair, slot)?;
        self.transport.get_submission_notifier(q).notify()?;
        Ok(Some(data))
    }
}

/// Waits for any of `fds` until `deadline`; true if one fired (and those
/// that did were read).
fn wait(fds: &[&EventFd], deadline: Instant) -> Result<bool, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    let count = libc::nfds_t::try_from(p.len()).unwrap_or(0);
    // SAFETY: `p` holds `count` valid pollfds.
    let n = unsafe { libc::poll(p.as_mut_ptr(), count, ms) };
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
    for (fd, p) in fds.iter().zip(&p) {
        if p.revents & libc::POLLIN != 0 {
            fd.read().map_err(|e| other("reading a call eventfd", e))?;
        }
    }
    Ok(true)
}
