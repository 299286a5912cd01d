//! The node's tunnel endpoint: the UDP socket overlay frames travel in
//! between nodes, in VXLAN or Geneve (see [`crate::overlay`]).
//!
//! The kernel's cost is per datagram, so the endpoint moves datagrams in
//! as few units as it can:
//!
//! * **Sending**: datagrams gathered during a burst go out with one
//!   `sendmmsg`, and each run of datagrams to one endpoint with one size
//!   (the last may be shorter) is a single UDP GSO message (`UDP_SEGMENT`):
//!   it crosses the stack once and is cut into datagrams at the device,
//!   or by the NIC. Order is kept: only neighbours in the batch are joined.
//!   A run the route cannot carry as one (segments over its MTU) is sent
//!   datagram by datagram, and runs of that size stay apart from then on.
//! * **Receiving**: the socket asks for UDP GRO, so datagrams of one flow
//!   that arrive together are read as one buffer plus their size, and
//!   `recvmmsg` reads a batch of those per call.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::debug;

use crate::overlay;

/// `setsockopt`/cmsg level and names for UDP segmentation offloads
/// (linux/udp.h).
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Messages per `sendmmsg`/`recvmmsg`.
pub(crate) const BATCH: usize = 64;
/// Datagrams in one GSO message, at most (the kernel's limit is 64 or
/// more), and its payload, at most (a UDP datagram's).
const GSO_SEGMENTS: usize = 64;
const GSO_BYTES: usize = 65_000;
/// Messages read with one system call, and the room for each: a GRO
/// train of datagrams (longer datagrams are dropped).
const RX_BATCH: usize = 16;
const RX_BUF: usize = 65_536;
/// Socket buffers: room for a few thousand small datagrams each way, so a
/// burst neither blocks the sender nor is dropped while the receiver
/// catches up.
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// How long a GSO size limit lasts before runs of every size are tried
/// again.
const GSO_RETRY: Duration = Duration::from_secs(60);
/// How long a waiting receive waits at most.
const RX_TIMEOUT: Duration = Duration::from_millis(500);

/// Tunnel (and uplink) counters.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Datagrams (frames) sent.
    pub tx: AtomicU64,
    /// Datagrams (frames) received and switched.
    pub rx: AtomicU64,
    /// Datagrams (frames) refused (not VXLAN, unknown endpoint or VNI, no
    /// network for the tag, malformed inner frame) or not sent.
    pub dropped: AtomicU64,
}

/// The node's tunnel endpoint.
#[derive(Debug)]
pub struct Tunnel {
    socket: UdpSocket,
    /// The UDP port of every endpoint.
    pub(crate) port: u16,
    /// How frames are wrapped.
    pub(crate) encap: overlay::Encap,
    /// Counters.
    pub stats: TunnelStats,
    /// Segments up to this size go in GSO messages (0: none).
    gso_limit: AtomicUsize,
    /// When a lowered limit is lifted again (milliseconds from `opened`;
    /// the route's MTU may have grown meanwhile).
    gso_retry_at: AtomicU64,
    gso_retry: Duration,
    opened: Instant,
}

/// Datagrams waiting to be sent, with their endpoints. Small frames are
/// copied in behind their VXLAN headers (neighbours then reach the kernel
/// as one iovec); large ones may be lent by the caller (see
/// [`Outbox::push_lent`]): the kernel reads them where they are.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Frames copied in, back to back.
    bytes: Vec<u8>,
    datagrams: Vec<Datagram>,
    /// Whether a frame is lent.
    lent: bool,
    /// Lists a send builds, kept for the next.
    scratch: Scratch,
}

/// The lists a send builds: kept from send to send (no allocation per
/// burst).
#[derive(Debug, Default)]
struct Scratch {
    runs: Vec<Run>,
    addrs: Vec<(RawAddr, libc::socklen_t)>,
    controls: Vec<Control>,
    iovs: Vec<libc::iovec>,
    starts: Vec<usize>,
    msgs: Vec<libc::mmsghdr>,
}

#[derive(Debug)]
struct Datagram {
    to: SocketAddr,
    bytes: Bytes,
}

/// Where a datagram's bytes are.
#[derive(Debug)]
enum Bytes {
    /// Header and frame in [`Outbox::bytes`].
    Copied(std::ops::Range<usize>),
    /// The header here, the frame in the caller's memory (valid until the
    /// outbox is sent or emptied).
    Lent([u8; overlay::HEADER], *const u8, usize),
}

impl Datagram {
    fn len(&self) -> usize {
        match &self.bytes {
            Bytes::Copied(r) => r.len(),
            Bytes::Lent(_, _, n) => overlay::HEADER + n,
        }
    }
}

impl Outbox {
    /// Adds a copy of `frame` behind tunnel header `header`, for `to`.
    pub(crate) fn push(&mut self, to: SocketAddr, header: [u8; overlay::HEADER], frame: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(frame);
        self.datagrams.push(Datagram {
            to,
            bytes: Bytes::Copied(start..self.bytes.len()),
        });
    }

    /// Adds `frame` behind tunnel header `header`, for `to`, without a
    /// copy.
    ///
    /// # Safety
    /// The bytes of `frame` must stay where they are, unchanged, until the
    /// outbox is next sent ([`Tunnel::send`]) or dropped.
    pub(crate) unsafe fn push_lent(
        &mut self,
        to: SocketAddr,
        header: [u8; overlay::HEADER],
        frame: &[u8],
    ) {
        self.datagrams.push(Datagram {
            to,
            bytes: Bytes::Lent(header, frame.as_ptr(), frame.len()),
        });
        self.lent = true;
    }

    /// Datagrams waiting.
    pub(crate) fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// Whether none wait.
    pub(crate) fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Whether a waiting datagram's frame is lent.
    pub(crate) fn has_lent(&self) -> bool {
        self.lent
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams.clear();
        self.lent = false;
    }

    /// Appends the iovecs of datagram `d` to `iovs`; one that starts where
    /// the last of the same message (from `msg` on) ends extends it.
    fn add_iovecs(&self, d: &Datagram, iovs: &mut Vec<libc::iovec>, msg: usize) -> bool {
        let mut add = |p: *const u8, n: usize| {
            let len = iovs.len();
            if let Some(last) = iovs.last_mut().filter(|_| len > msg) {
                if last
                    .iov_base
                    .cast_const()
                    .cast::<u8>()
                    .wrapping_add(last.iov_len)
                    == p
                {
                    last.iov_len += n;
                    return;
                }
            }
            iovs.push(libc::iovec {
                iov_base: p.cast_mut().cast(),
                iov_len: n,
            });
        };
        match &d.bytes {
            Bytes::Copied(r) => match self.bytes.get(r.clone()) {
                Some(b) => add(b.as_ptr(), b.len()),
                None => return false,
            },
            Bytes::Lent(head, p, n) => {
                add(head.as_ptr(), head.len());
                add(*p, *n);
            }
        }
        true
    }
}

/// A socket address in the kernel's form, IPv4 or IPv6 (room for either).
#[derive(Clone, Copy)]
#[repr(C)]
struct RawAddr(libc::sockaddr_in6);

impl std::fmt::Debug for RawAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.ip())
    }
}

impl RawAddr {
    /// An empty one (to be filled by the kernel).
    fn empty() -> Self {
        // SAFETY: all-zero sockaddr_in6 values are valid.
        Self(unsafe { std::mem::zeroed() })
    }

    /// `a` and its length.
    fn of(a: SocketAddr) -> (Self, libc::socklen_t) {
        let mut r = Self::empty();
        match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: a sockaddr_in (16 bytes, align 4) fits at the start
                // of a sockaddr_in6 (28 bytes, align 4).
                unsafe { std::ptr::write(std::ptr::from_mut(&mut r.0).cast(), sin) };
                (r, socklen::<libc::sockaddr_in>())
            }
            SocketAddr::V6(v6) => {
                r.0.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or(10);
                r.0.sin6_port = v6.port().to_be();
                r.0.sin6_addr.s6_addr = v6.ip().octets();
                r.0.sin6_scope_id = v6.scope_id();
                (r, socklen::<libc::sockaddr_in6>())
            }
        }
    }

    /// The address the kernel put here (None: neither family).
    fn ip(&self) -> Option<IpAddr> {
        match i32::from(self.0.sin6_family) {
            libc::AF_INET => {
                // SAFETY: the family says a sockaddr_in is at the start.
                let sin: libc::sockaddr_in =
                    unsafe { std::ptr::read(std::ptr::from_ref(&self.0).cast()) };
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(self.0.sin6_addr.s6_addr))),
            _ => None,
        }
    }
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}

/// Sets the int socket option `level`/`name` to `value`.
fn set_int(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: a plain int option on a socket of ours.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            socklen::<libc::c_int>(),
        )
    };
    r == 0
}

/// Room for one control message with an int (CMSG_SPACE(sizeof(int))),
/// aligned for a cmsghdr.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 24]);

/// One run of datagrams for one message: destination, bytes, segment size
/// (Some when several datagrams go as one GSO message).
/// A message: its endpoint, the datagrams it carries (indexes in the
/// outbox) and, for a GSO run, their size.
type Run = (SocketAddr, std::ops::Range<usize>, Option<u16>);

impl Tunnel {
    /// Binds the endpoint on `local` (port 0: any), speaking `encap`;
    /// returns it and the address bound.
    pub(crate) fn open(
        local: SocketAddr,
        encap: overlay::Encap,
    ) -> std::io::Result<(Self, SocketAddr)> {
        let socket = UdpSocket::bind(local)?;
        socket.set_read_timeout(Some(RX_TIMEOUT))?;
        let fd = socket.as_raw_fd();
        // Beyond the system's limits when the daemon may (CAP_NET_ADMIN),
        // else as far as they allow.
        for (forced, plain) in [
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        ] {
            if !set_int(fd, libc::SOL_SOCKET, forced, SOCKET_BUFFER)
                && !set_int(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER)
            {
                debug!(
                    "cannot grow the tunnel socket's buffers: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        // Kernels without UDP GSO refuse the option; then every datagram
        // goes alone. GRO is only asked for.
        let gso = set_int(fd, SOL_UDP, UDP_SEGMENT, 0);
        let gro = set_int(fd, SOL_UDP, UDP_GRO, 1);
        debug!(gso, gro, "tunnel endpoint offloads");
        let bound = socket.local_addr()?;
        let tunnel = Self {
            socket,
            port: bound.port(),
            encap,
            stats: TunnelStats::default(),
            gso_limit: AtomicUsize::new(if gso { usize::MAX } else { 0 }),
            gso_retry_at: AtomicU64::new(u64::MAX),
            gso_retry: GSO_RETRY,
            opened: Instant::now(),
        };
        Ok((tunnel, bound))
    }

    /// The largest segment GSO messages carry now; a lowered limit is
    /// lifted once its retry time came.
    fn gso_limit(&self) -> usize {
        let limit = self.gso_limit.load(Ordering::Relaxed);
        if limit != 0 && limit != usize::MAX {
            let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            if now >= self.gso_retry_at.load(Ordering::Relaxed) {
                debug!("trying GSO runs of every size again");
                self.gso_retry_at.store(u64::MAX, Ordering::Relaxed);
                self.gso_limit.store(usize::MAX, Ordering::Relaxed);
                return usize::MAX;
            }
        }
        limit
    }

    /// Keeps segments over `limit` out of GSO messages until the retry
    /// time.
    fn lower_gso_limit(&self, limit: usize) {
        self.gso_limit.fetch_min(limit, Ordering::Relaxed);
        let at = self.opened.elapsed().saturating_add(self.gso_retry);
        let at = u64::try_from(at.as_millis()).unwrap_or(u64::MAX);
        self.gso_retry_at.store(at, Ordering::Relaxed);
    }

    /// The endpoint's socket.
    pub(crate) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Sends the datagrams in `out` and empties it.
    pub(crate) fn send(&self, out: &mut Outbox) {
        let mut scratch = std::mem::take(&mut out.scratch);
        let mut runs = std::mem::take(&mut scratch.runs);
        runs.clear();
        let limit = self.gso_limit();
        let mut i = 0;
        while i < out.datagrams.len() {
            let to = out.datagrams[i].to;
            let size = out.datagrams[i].len();
            let mut bytes = size;
            let mut j = i + 1;
            if size <= limit.min(usize::from(u16::MAX)) {
                // Joins followers to the same endpoint of the same size;
                // a shorter one ends the run.
                while let Some(d) = out.datagrams.get(j) {
                    let len = d.len();
                    if j - i >= GSO_SEGMENTS || d.to != to || len > size || bytes + len > GSO_BYTES
                    {
                        break;
                    }
                    bytes += len;
                    j += 1;
                    if len < size {
                        break;
                    }
                }
            }
            let seg = u16::try_from(size).ok().filter(|_| j - i > 1);
            runs.push((to, i..j, seg));
            i = j;
        }
        let mut k = 0;
        while k < runs.len() {
            let sent = self.send_runs(out, &runs[k..(k + BATCH).min(runs.len())], &mut scratch);
            k += sent.as_ref().map_or(1, |n| (*n).max(1));
            if let Err(e) = sent {
                // The first message failed. A GSO run the route refuses
                // (EINVAL: segments over its MTU) is sent datagram by
                // datagram, and runs of its size stay apart from then on;
                // otherwise the message is lost.
                let (to, range, seg) = runs[k - 1].clone();
                let refused = e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::EMSGSIZE);
                match seg.filter(|_| refused) {
                    Some(s) => {
                        let s = usize::from(s);
                        self.lower_gso_limit(s - 1);
                        debug!(segment = s, "the route does not take GSO runs of this size");
                        let singles: Vec<Run> = range.map(|d| (to, d..d + 1, None)).collect();
                        let mut m = 0;
                        while m < singles.len() {
                            match self.send_runs(out, &singles[m..], &mut scratch) {
                                Ok(n) if n > 0 => m += n,
                                _ => {
                                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                                    m += 1;
                                }
                            }
                        }
                    }
                    None => {
                        self.stats
                            .dropped
                            .fetch_add(range.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }
        out.clear();
        scratch.runs = runs;
        out.scratch = scratch;
    }

    /// Sends `runs` (at most [`BATCH`]) with one `sendmmsg`; returns how
    /// many went (an error: the first failed) and counts their datagrams.
    fn send_runs(&self, out: &Outbox, runs: &[Run], sc: &mut Scratch) -> std::io::Result<usize> {
        let runs = &runs[..runs.len().min(BATCH)];
        sc.addrs.clear();
        sc.addrs
            .extend(runs.iter().map(|(a, _, _)| RawAddr::of(*a)));
        sc.controls.clear();
        sc.controls.resize(runs.len(), Control([0; 24]));
        // Each message's iovecs are neighbours: where each starts.
        sc.iovs.clear();
        sc.starts.clear();
        for (_, r, _) in runs {
            let msg = sc.iovs.len();
            sc.starts.push(msg);
            for d in out.datagrams.get(r.clone()).unwrap_or_default() {
                if !out.add_iovecs(d, &mut sc.iovs, msg) {
                    return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
                }
            }
        }
        sc.starts.push(sc.iovs.len());
        sc.msgs.clear();
        for (((a, control), (_, _, seg)), span) in sc
            .addrs
            .iter_mut()
            .zip(sc.controls.iter_mut())
            .zip(runs)
            .zip(sc.starts.windows(2))
        {
            // SAFETY: an all-zero mmsghdr is a valid empty one.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = std::ptr::from_mut(&mut a.0).cast();
            h.msg_hdr.msg_namelen = a.1;
            let Some(v) = sc.iovs.get_mut(span[0]..span[1]) else {
                return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
            };
            h.msg_hdr.msg_iov = v.as_mut_ptr();
            h.msg_hdr.msg_iovlen = v.len();
            if let Some(seg) = seg {
                // SAFETY: the control buffer has room for one cmsghdr and
                // a u16 (CMSG_SPACE of 2 is 24 on Linux); CMSG_FIRSTHDR
                // and CMSG_DATA point inside it.
                unsafe {
                    h.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), *seg);
                }
            }
            sc.msgs.push(h);
        }
        let fd = self.socket.as_raw_fd();
        let count = u32::try_from(sc.msgs.len()).unwrap_or(u32::MAX);
        // SAFETY: the headers point at addresses, iovecs, control buffers
        // and datagrams that live until this call returns (lent frames:
        // by `push_lent`'s contract).
        let n = unsafe { libc::sendmmsg(fd, sc.msgs.as_mut_ptr(), count, 0) };
        let Ok(n) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            debug!("tunnel send failed: {e}");
            return Err(e);
        };
        let datagrams: usize = runs[..n].iter().map(|(_, r, _)| r.len()).sum();
        self.stats.tx.fetch_add(datagrams as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Frames this long or longer are lent to the outbox rather than copied
/// (shorter ones cost less to copy than as iovecs of their own).
pub(crate) const LEND_MIN: usize = 512;
/// Bytes a receive call reads into at most.
pub(crate) const RX_AREA: usize = RX_BATCH * RX_BUF;

/// Reads tunnel datagrams a batch at a time, into a buffer the caller
/// lends (the switch stages the frames from there, without a copy).
pub(crate) struct Receiver {
    addrs: Vec<RawAddr>,
    controls: Vec<Control>,
}

impl Receiver {
    pub(crate) fn new() -> Self {
        Self {
            addrs: (0..RX_BATCH).map(|_| RawAddr::empty()).collect(),
            controls: vec![Control([0; 24]); RX_BATCH],
        }
    }

    /// Reads the datagrams waiting on `socket` into `bufs` (up to
    /// [`RX_AREA`] bytes of it; with `wait`, waits for one up to the
    /// socket's read timeout) and hands each to `each` with its sender;
    /// Ok(false) when none came, an error when the socket fails.
    pub(crate) fn receive(
        &mut self,
        bufs: &mut [u8],
        socket: &UdpSocket,
        stats: &TunnelStats,
        wait: bool,
        mut each: impl FnMut(IpAddr, &[u8]),
    ) -> std::io::Result<bool> {
        let mut iovs: Vec<libc::iovec> = bufs
            .chunks_exact_mut(RX_BUF)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = self
            .addrs
            .iter_mut()
            .zip(iovs.iter_mut())
            .zip(self.controls.iter_mut())
            .map(|((a, iov), c)| {
                // SAFETY: an all-zero mmsghdr is a valid empty one.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = std::ptr::from_mut(&mut a.0).cast();
                h.msg_hdr.msg_namelen = socklen::<libc::sockaddr_in6>();
                h.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = c.0.len();
                h
            })
            .collect();
        let count = u32::try_from(msgs.len()).unwrap_or(1);
        // SAFETY: every header points at a buffer, an iovec, an address
        // and a control buffer of ours that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                count,
                if wait {
                    libc::MSG_WAITFORONE
                } else {
                    libc::MSG_DONTWAIT
                },
                std::ptr::null_mut(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            };
        };
        for (i, m) in msgs.iter().take(n).enumerate() {
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let seg = gro_size(&m.msg_hdr);
            let Some(from) = self.addrs.get(i).and_then(RawAddr::ip) else {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let start = i * RX_BUF;
            let len = (m.msg_len as usize).min(RX_BUF);
            let Some(train) = bufs.get(start..start + len) else {
                continue;
            };
            match seg {
                Some(s) if s > 0 => train.chunks(s).for_each(|d| each(from, d)),
                _ => each(from, train),
            }
        }
        Ok(true)
    }
}

/// The segment size of a GRO train, from its control message.
fn gro_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel filled the control buffer (msg_controllen says
    // how much); CMSG_FIRSTHDR/NXTHDR stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> (Tunnel, SocketAddr) {
        endpoint_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    fn endpoint_on(ip: IpAddr) -> (Tunnel, SocketAddr) {
        Tunnel::open(SocketAddr::new(ip, 0), overlay::Encap::Vxlan).unwrap()
    }

    /// Receives until `want` datagrams came (or a timeout), with their
    /// senders.
    fn gather(t: &Tunnel, want: usize) -> Vec<(IpAddr, Vec<u8>)> {
        let mut r = Receiver::new();
        let mut bufs = vec![0u8; RX_AREA];
        let mut got = Vec::new();
        while got.len() < want {
            let more = r
                .receive(&mut bufs, t.socket(), &t.stats, true, |f, d| {
                    got.push((f, d.to_vec()));
                })
                .unwrap();
            if !more {
                break;
            }
        }
        got
    }

    #[test]
    fn runs_of_datagrams_arrive_whole_and_in_order() {
        runs_arrive_whole_and_in_order(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn runs_of_datagrams_arrive_whole_and_in_order_over_ipv6() {
        runs_arrive_whole_and_in_order(IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    fn runs_arrive_whole_and_in_order(ip: IpAddr) {
        let (a, a_addr) = endpoint_on(ip);
        let (b, b_addr) = endpoint_on(ip);
        let mut out = Outbox::default();
        // Equal sizes (one GSO run), a shorter tail, then other sizes.
        let mut sent = Vec::new();
        for i in 0..100u32 {
            let len = match i {
                0..=69 => 60,
                70 => 30,
                _ => 200 + (i as usize % 3),
            };
            let frame: Vec<u8> = (0..len)
                .map(|j| u8::try_from((i as usize + j) % 251).unwrap_or(0))
                .collect();
            out.push(b_addr, overlay::Encap::Vxlan.header(5001), &frame);
            sent.push(frame);
        }
        a.send(&mut out);
        assert!(out.is_empty());
        assert_eq!(a.stats.tx.load(Ordering::Relaxed), 100);
        let got = gather(&b, 100);
        assert!(got.iter().all(|(f, _)| *f == a_addr.ip()), "from {a_addr}");
        let frames: Vec<Vec<u8>> = got
            .iter()
            .map(|(_, d)| {
                let (vni, f) = overlay::Encap::Vxlan.decap(d).unwrap();
                assert_eq!(vni, 5001);
                f.to_vec()
            })
            .collect();
        assert_eq!(frames, sent);
    }

    #[test]
    fn a_lowered_gso_limit_is_lifted_after_its_retry_time() {
        let (mut a, _) = endpoint();
        if a.gso_limit() == 0 {
            return; // no UDP GSO in this kernel
        }
        a.lower_gso_limit(1400);
        assert_eq!(a.gso_limit(), 1400);
        a.gso_retry = Duration::ZERO;
        a.lower_gso_limit(1000);
        assert_eq!(a.gso_limit(), usize::MAX);
    }

    #[test]
    fn datagrams_too_long_to_join_go_alone() {
        // Two 40 kB datagrams are more than one GSO message holds.
        let (a, _) = endpoint();
        let (b, b_addr) = endpoint();
        let mut out = Outbox::default();
        let frame = vec![7u8; 40_000];
        for _ in 0..3 {
            out.push(b_addr, overlay::Encap::Vxlan.header(9), &frame);
        }
        a.send(&mut out);
        let got = gather(&b, 3);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(_, d)| d.len() == 40_000 + overlay::HEADER));
    }
}
