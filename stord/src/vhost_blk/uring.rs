//! One io_uring per queue: reads and writes that a single layer file can serve
//! go to the kernel asynchronously, so one queue keeps many requests in flight.
//!
//! The ring's completions signal an eventfd that the queue's worker thread polls
//! next to the queue's kick; each completed request gets its status written and
//! is returned to the guest. A slot keeps everything the kernel may still touch
//! alive until its completion: the iovec array, the guest memory mapping (so a
//! new memory table cannot unmap buffers under the kernel) and the layer.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vhost_blk::request::Pending;
use crate::vhost_blk::GuestMem;

/// Submission queue entries per ring (completions: twice as many).
const ENTRIES: u32 = 256;

struct Slot {
    head: u16,
    pending: Pending,
    /// Referenced by the submitted entry until completion.
    _iov: Vec<libc::iovec>,
    mem: Arc<GuestMem>,
}

struct State {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

/// A completed request: its descriptor head, the memory it used, what it was
/// and how it ended (bytes transferred or the error).
pub struct Completion {
    /// Head of the descriptor chain.
    pub head: u16,
    /// Guest memory the request was made in.
    pub mem: Arc<GuestMem>,
    /// The request.
    pub pending: Pending,
    /// The kernel's result.
    pub result: io::Result<usize>,
}

/// The ring of one queue.
pub struct QueueRing {
    state: Mutex<State>,
    eventfd: EventFd,
}

impl std::fmt::Debug for QueueRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRing").finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers inside a slot (iovecs into guest memory) are only
// handed to the kernel and dereferenced by nobody else; the state is behind a mutex.
unsafe impl Send for Slot {}

impl QueueRing {
    /// A ring whose completions signal an eventfd.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(ENTRIES)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            state: Mutex::new(State {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
            }),
            eventfd,
        })
    }

    /// The eventfd signalled on completions.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `pending` for the kernel (sent at the next [`submit`](Self::submit)).
    /// On failure the request is handed back to be run synchronously.
    pub fn push(&self, head: u16, pending: Pending, mem: Arc<GuestMem>) -> Result<(), Pending> {
        let mut st = self.state();
        let Some(fd) = pending.direct.layer.data().raw_fd() else {
            return Err(pending);
        };
        let iov: Vec<libc::iovec> = pending
            .iov
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr.cast(),
                iov_len: s.len,
            })
            .collect();
        let Ok(count) = u32::try_from(iov.len()) else {
            return Err(pending);
        };
        let entry = if pending.write {
            opcode::Writev::new(types::Fd(fd), iov.as_ptr(), count)
                .offset(pending.offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), iov.as_ptr(), count)
                .offset(pending.offset)
                .build()
        };
        let idx = match st.free.pop() {
            Some(i) => i,
            None => {
                st.slots.push(None);
                st.slots.len() - 1
            }
        };
        let entry = entry.user_data(idx as u64);
        // Make room if the submission queue is full.
        if st.ring.submission().is_full() && st.ring.submit().is_err() {
            st.free.push(idx);
            return Err(pending);
        }
        // SAFETY: the entry points at `iov` and at guest memory, both kept alive in
        // the slot (with the memory mapping) until the completion is reaped.
        let pushed = unsafe { st.ring.submission().push(&entry) };
        if pushed.is_err() {
            st.free.push(idx);
            return Err(pending);
        }
        st.slots[idx] = Some(Slot {
            head,
            pending,
            _iov: iov,
            mem,
        });
        Ok(())
    }

    /// Sends everything pushed so far to the kernel.
    pub fn submit(&self) -> io::Result<()> {
        self.state().ring.submit().map(drop)
    }

    /// Requests the kernel has not completed yet.
    pub fn in_flight(&self) -> usize {
        let st = self.state();
        st.slots.len() - st.free.len()
    }

    /// Whether completions are waiting to be reaped (no syscall).
    pub fn has_completions(&self) -> bool {
        !self.state().ring.completion().is_empty()
    }

    /// Clears the completion eventfd (before reaping what woke it up).
    pub fn clear_event(&self) {
        let _ = self.eventfd.read();
    }

    /// Takes every completion available now.
    pub fn reap(&self) -> Vec<Completion> {
        let mut st = self.state();
        let done: Vec<(u64, i32)> = st
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut out = Vec::with_capacity(done.len());
        for (idx, res) in done {
            let Ok(idx) = usize::try_from(idx) else {
                continue;
            };
            let Some(slot) = st.slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            st.free.push(idx);
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(usize::try_from(res).unwrap_or(0))
            };
            out.push(Completion {
                head: slot.head,
                mem: slot.mem,
                pending: slot.pending,
                result,
            });
        }
        out
    }

    /// Waits until every request in flight has completed and returns them.
    pub fn drain(&self) -> Vec<Completion> {
        let mut out = Vec::new();
        loop {
            out.extend(self.reap());
            if self.in_flight() == 0 {
                return out;
            }
            if let Err(e) = self.state().ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "cannot wait for io_uring completions");
                    return out;
                }
            }
        }
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        // The kernel may still write into memory the slots keep alive.
        drop(self.drain());
    }
}
