//! The kernel's UDP path alone, as the overlay uses it, on one CPU: one
//! thread sends a UDP GSO message of N datagrams from one network
//! namespace and reads them (UDP GRO, recvmmsg) in another, then the next
//! message: a closed loop like the overlay benchmark's two netd daemons on
//! one CPU, with nothing lost to a full socket. What it moves per second is
//! the most any overlay over kernel sockets can carry on that CPU before
//! it touches a guest's memory (bench/udp-ceiling.sh).
//!
//! ```text
//! udp_ceiling RECV_NETNS RECV_ADDR SEND_ADDR DATAGRAM_BYTES SECONDS [PER_MESSAGE]
//! ```
//!
//! The receiving socket is made in the namespace `/run/netns/RECV_NETNS`,
//! the sending one in the namespace the program started in.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Receive buffers per recvmmsg call, as netd's tunnel reads.
const RX_MSGS: usize = 16;
const RX_MSGS_U32: u32 = 16;
const RX_BYTES: usize = 65_536;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_owned())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> io::Result<T> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad(what))
}

fn setsockopt(
    s: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: a namespace file descriptor, for this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        return Err(bad(
            "usage: udp_ceiling RECV_NETNS RECV_ADDR SEND_ADDR DATAGRAM_BYTES SECONDS [PER_MESSAGE]",
        ));
    }
    let netns: String = arg(&args, 1, "receiving namespace")?;
    let to: SocketAddr = arg(&args, 2, "receiving address")?;
    let from: SocketAddr = arg(&args, 3, "sending address")?;
    let size: usize = arg(&args, 4, "datagram bytes")?;
    let secs: f64 = arg(&args, 5, "seconds")?;
    let per: usize = args.get(6).and_then(|a| a.parse().ok()).unwrap_or(32);

    let home = File::open("/proc/self/ns/net")?;
    setns(&File::open(format!("/run/netns/{netns}"))?)?;
    let rx = UdpSocket::bind(to)?;
    setns(&home)?;
    let tx = UdpSocket::bind(from)?;
    tx.connect(to)?;
    setsockopt(&rx, SOL_UDP, UDP_GRO, 1)?;
    setsockopt(&rx, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20)?;
    setsockopt(&tx, libc::SOL_SOCKET, libc::SO_SNDBUF, 8 << 20)?;
    rx.set_read_timeout(Some(Duration::from_secs(2)))?;

    let per = per.clamp(1, 64).min(65_000 / size.max(1)).max(1);
    let mut sender = Sender::new(size, per)?;
    let mut receiver = Receiver::new();
    let t0 = Instant::now();
    let (mut moved, mut bytes) = (0u64, 0u64);
    while t0.elapsed().as_secs_f64() < secs {
        sender.send(&tx)?;
        let mut got = 0;
        while got < per {
            let (d, b) = receiver.receive(&rx)?;
            got += d;
            bytes += b;
        }
        moved += per as u64;
    }
    let t = t0.elapsed().as_secs_f64();
    println!(
        "moved {moved} datagrams, {bytes} bytes in {t:.2} s: {:.3} M datagrams/s",
        moved as f64 / t / 1e6
    );
    Ok(())
}

/// One GSO message of `per` datagrams, sent again and again.
struct Sender {
    buf: Vec<u8>,
    control: [u64; 4],
    seg: u16,
}

impl Sender {
    fn new(size: usize, per: usize) -> io::Result<Self> {
        Ok(Self {
            buf: vec![0x5a; per * size],
            control: [0; 4],
            seg: u16::try_from(size).map_err(|_| bad("datagram bytes"))?,
        })
    }

    fn send(&mut self, s: &UdpSocket) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // SAFETY: all-zero is a valid msghdr; it points at `iov`, the
        // buffer and the control area, all alive for the call, and the
        // control area holds one UDP_SEGMENT message written through the
        // libc macros.
        let r = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = self.control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), self.seg);
            libc::sendmsg(s.as_raw_fd(), &msg, 0)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// recvmmsg into 16 buffers of 64 KiB with room for the GRO segment size.
struct Receiver {
    bufs: Vec<u8>,
    cmsgs: Vec<u64>,
}

impl Receiver {
    fn new() -> Self {
        Self {
            bufs: vec![0; RX_MSGS * RX_BYTES],
            cmsgs: vec![0; RX_MSGS * 8],
        }
    }

    /// Datagrams and bytes of one call.
    fn receive(&mut self, s: &UdpSocket) -> io::Result<(usize, u64)> {
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .chunks_mut(RX_BYTES)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(self.cmsgs.chunks_mut(8))
            .map(|(iov, c)| {
                // SAFETY: all-zero is a valid mmsghdr.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_control = c.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = 64;
                m
            })
            .collect();
        // SAFETY: RX_MSGS headers, each with its own buffer and control
        // area, alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                msgs.as_mut_ptr(),
                RX_MSGS_U32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return Err(io::Error::last_os_error());
        };
        let (mut datagrams, mut bytes) = (0usize, 0u64);
        for m in msgs.iter().take(n) {
            let len = m.msg_len as usize;
            let mut seg = len;
            // SAFETY: the control area the kernel filled, walked with the
            // libc macros within msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        seg =
                            usize::from(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u16>()));
                    }
                    c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
                }
            }
            datagrams += len.div_ceil(seg.max(1));
            bytes += len as u64;
        }
        Ok((datagrams, bytes))
    }
}
