//! The node's uplink: a TAP interface joining the switch to the host's
//! network. Networks bridged to it meet it untagged (flat) or with their
//! 802.1Q tag (vlan); frames from it are sorted by tag onto those networks.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use crate::l2::PortId;

/// The pseudo-port the MAC table learns the uplink's addresses behind.
pub const UPLINK_PORT: PortId = PortId(0x7fff_fff0);

/// Why the uplink could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The name is empty or too long for an interface.
    #[error("interface name {0:?}: 1 to 15 characters")]
    Name(String),
    /// /dev/net/tun or the ioctl failed.
    #[error("cannot open TAP interface {name}")]
    Open {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    /// The interface's name.
    pub name: String,
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_UP: libc::c_short = 0x0001;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens (creating if need be) the TAP interface `name` and brings it
    /// up.
    pub fn open(name: &str) -> Result<Self, UplinkError> {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(UplinkError::Name(name.to_owned()));
        }
        let fail = |source| UplinkError::Open {
            name: name.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(fail)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is
        // (name, flags, padding to its 40 bytes); the descriptor is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        let tap = Self {
            file,
            name: name.to_owned(),
        };
        tap.set_up().map_err(fail)?;
        Ok(tap)
    }

    fn set_up(&self) -> std::io::Result<()> {
        // SAFETY: a datagram socket only for the SIOC[GS]IFFLAGS ioctls on
        // an ifreq we own; closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: as above; the kernel fills in and reads the flags.
        let r = unsafe {
            if libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
                -1
            } else {
                req.flags |= IFF_UP;
                libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &mut req)
            }
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(sock) };
        if r < 0 {
            return Err(err);
        }
        Ok(())
    }

    /// Reads one frame into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame.
    pub fn write(&self, frame: &[u8]) -> std::io::Result<()> {
        (&self.file).write(frame).map(|_| ())
    }

    /// A second handle on the same interface (for the reading thread).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

/// `frame` with an 802.1Q tag for `vlan` after the MAC addresses.
pub fn tag(frame: &[u8], vlan: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&crate::frame::ETHERTYPE_VLAN.to_be_bytes());
    out.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// `frame` without its 802.1Q tag (the caller knows it has one).
pub fn untag(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len().saturating_sub(4));
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(frame.get(16..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Ethernet;

    #[test]
    fn tags_go_on_and_come_off() {
        let mut f = vec![1u8; 12];
        f.extend_from_slice(&[0x08, 0x06, 9, 9]);
        let t = tag(&f, 10);
        let e = Ethernet::parse(&t).unwrap();
        assert_eq!(
            (e.vlan, e.ethertype, e.payload),
            (Some(10), 0x0806, &[9u8, 9][..])
        );
        assert_eq!(untag(&t), f);
        assert!(matches!(Tap::open(""), Err(UplinkError::Name(_))));
        assert!(matches!(
            Tap::open("a-name-far-too-long"),
            Err(UplinkError::Name(_))
        ));
    }
}
