//! virtio-rng: fills the guest's buffers from the host's getrandom(2).

// Guest-visible lengths and addresses are 32/64-bit fields bounded by the
// checks next to each cast (SIZE_MAX, request caps, queue sizes).
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::worker::{Chain, QueueHandler, Served};
use super::{features, types, Activation, VirtioDevice, VirtioError};

/// Most bytes served per request (the guest asks again for more).
const MAX_REQUEST: usize = 64 << 10;
const QUEUE_SIZE: u16 = 256;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    mem: Option<GuestMemoryMmap>,
    served: Served,
}

impl Rng {
    /// A device serving `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Self {
            mem: Some(mem),
            served: Served::default(),
        }
    }
}

struct Filler;

/// The rng's request handler (for the fuzz targets).
#[doc(hidden)]
pub fn fuzz_handler() -> impl QueueHandler {
    Filler
}

impl QueueHandler for Filler {
    fn handle(&mut self, _queue: u16, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let mut written = 0usize;
        let mut buf = vec![0u8; 4096];
        for d in chain.writable() {
            let mut left = (d.len() as usize).min(MAX_REQUEST - written);
            let mut addr = d.addr().0;
            while left > 0 {
                let n = left.min(buf.len());
                if getrandom(&mut buf[..n]).is_err()
                    || mem.write_slice(&buf[..n], GuestAddress(addr)).is_err()
                {
                    return written as u32;
                }
                written += n;
                left -= n;
                addr += n as u64;
            }
            if written >= MAX_REQUEST {
                break;
            }
        }
        written as u32
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        types::RNG
    }

    fn queues(&self) -> (u16, u16) {
        (1, QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let mem = self
            .mem
            .clone()
            .ok_or(VirtioError::Unsupported("memory-less rng"))?;
        self.served.start("rng", mem, a, QUEUE_SIZE, Filler)
    }

    fn reset(&mut self) {
        self.served.stop();
    }

    fn pause(&mut self) {
        self.served.pause();
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        self.served.resume();
        Ok(())
    }

    fn describe(&self) -> String {
        "virtio-rng".into()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.served.counters()
    }
}
