//! The kernel's UDP path alone, as the overlay uses it: a sender of UDP GSO
//! messages and a receiver with UDP GRO (bench/udp-ceiling.sh runs both on
//! one CPU, in two network namespaces joined by a veth pair). What it
//! receives per second is the most any overlay over kernel sockets can
//! carry on that CPU, before touching a guest's memory.
//!
//! ```text
//! udp_ceiling recv BIND_ADDR SECONDS
//! udp_ceiling send BIND_ADDR PEER_ADDR DATAGRAM_BYTES SECONDS [PER_MESSAGE]
//! ```

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

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("recv") => recv(&arg(&args, 2, "bind address")?, arg(&args, 3, "seconds")?),
        Some("send") => send(
            &arg(&args, 2, "bind address")?,
            &arg(&args, 3, "peer address")?,
            arg(&args, 4, "datagram bytes")?,
            arg(&args, 5, "seconds")?,
            args.get(6).and_then(|a| a.parse().ok()).unwrap_or(32),
        ),
        _ => Err(bad(
            "usage: udp_ceiling recv ADDR SECS | send ADDR PEER BYTES SECS [PER_MESSAGE]",
        )),
    }
}

/// Counts datagrams for `secs` seconds from the first one; prints the rate.
fn recv(bind: &SocketAddr, secs: f64) -> io::Result<()> {
    let s = UdpSocket::bind(bind)?;
    setsockopt(&s, SOL_UDP, UDP_GRO, 1)?;
    setsockopt(&s, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut bufs = vec![0u8; RX_MSGS * RX_BYTES];
    let mut cmsgs = vec![0u64; RX_MSGS * 8];
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(RX_MSGS);
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(RX_MSGS);
    for i in 0..RX_MSGS {
        iovs.push(libc::iovec {
            iov_base: bufs[i * RX_BYTES..].as_mut_ptr().cast(),
            iov_len: RX_BYTES,
        });
    }
    for i in 0..RX_MSGS {
        // SAFETY: all-zero is a valid mmsghdr.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_iov = &raw mut iovs[i];
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_control = cmsgs[i * 8..].as_mut_ptr().cast();
        msgs.push(m);
    }
    let mut start: Option<Instant> = None;
    let mut datagrams = 0u64;
    let mut bytes = 0u64;
    loop {
        for m in &mut msgs {
            m.msg_hdr.msg_controllen = 64;
        }
        // SAFETY: RX_MSGS headers, each with its own buffer and control
        // area, alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                msgs.as_mut_ptr(),
                RX_MSGS_U32,
                0,
                std::ptr::null_mut(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return Err(io::Error::last_os_error());
        };
        let t0 = *start.get_or_insert_with(Instant::now);
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
            datagrams += len.div_ceil(seg.max(1)) as u64;
            bytes += len as u64;
        }
        let t = t0.elapsed().as_secs_f64();
        if t >= secs {
            println!(
                "received {datagrams} datagrams, {bytes} bytes in {t:.2} s: {:.3} M datagrams/s",
                datagrams as f64 / t / 1e6
            );
            return Ok(());
        }
    }
}

/// Sends GSO messages of `per` datagrams of `size` bytes for `secs`.
fn send(
    bind: &SocketAddr,
    peer: &SocketAddr,
    size: usize,
    secs: f64,
    per: usize,
) -> io::Result<()> {
    let s = UdpSocket::bind(bind)?;
    s.connect(peer)?;
    setsockopt(&s, libc::SOL_SOCKET, libc::SO_SNDBUF, 8 << 20)?;
    let per = per.clamp(1, 64).min(65_000 / size.max(1)).max(1);
    let buf = vec![0x5au8; per * size];
    let seg = u16::try_from(size).map_err(|_| bad("datagram bytes"))?;
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr; the control area holds one
    // UDP_SEGMENT message, written through the libc macros.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: as above.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
    }
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        // SAFETY: `msg` points at `iov`, `buf` and `control`, all alive.
        let r = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS) => continue,
                // The receiver is done.
                Some(libc::ECONNREFUSED) => break,
                _ => return Err(e),
            }
        }
        sent += per as u64;
    }
    println!("sent {sent} datagrams in {secs} s");
    Ok(())
}
