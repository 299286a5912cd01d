//! The serial console behind a Unix stream socket.
//!
//! Output the guest writes goes to the attached client; while nobody is
//! attached (or the client reads slowly) it waits in a bounded ring buffer and
//! is delivered, in order, to the next client. A new client takes over from
//! the previous one. What a client sends becomes serial input.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where console input goes (the serial device's receive FIFO).
pub type InputSink = Box<dyn Fn(&[u8]) + Send>;

struct State {
    ring: VecDeque<u8>,
    cap: usize,
    /// Bytes dropped from the ring's head because it was full.
    dropped: u64,
    client: Option<UnixStream>,
    /// No socket: output goes straight to the process's standard output.
    stdout: bool,
    /// The last byte written was a newline (or nothing was written).
    at_line_start: bool,
}

impl State {
    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            self.dropped += (data.len() - self.cap) as u64;
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let over = (self.ring.len() + data.len()).saturating_sub(self.cap);
        if over > 0 {
            self.ring.drain(..over);
            self.dropped += over as u64;
        }
        self.ring.extend(data);
    }

    /// Sends what the ring holds to the client; drops a broken client.
    fn flush(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        while !self.ring.is_empty() {
            let (a, _) = self.ring.as_slices();
            match c.write(a) {
                Ok(0) => {
                    self.client = None;
                    return;
                }
                Ok(n) => {
                    self.ring.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("console client went away: {e}");
                    self.client = None;
                    return;
                }
            }
        }
    }
}

/// The console: a writer for the serial device and a socket thread.
#[derive(Clone)]
pub struct Console {
    state: Arc<Mutex<State>>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A console keeping up to `cap` bytes for absent clients.
    pub fn new(cap: usize) -> io::Result<Self> {
        Ok(Self {
            state: Arc::new(Mutex::new(State {
                ring: VecDeque::new(),
                cap: cap.max(1),
                dropped: 0,
                client: None,
                stdout: false,
                at_line_start: true,
            })),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends output to standard output instead of keeping it for clients.
    pub fn use_stdout(&self) {
        self.state().stdout = true;
    }

    /// Whether output ended with a newline (so a status line can follow).
    pub fn at_line_start(&self) -> bool {
        self.state().at_line_start
    }

    /// Bytes lost because the ring overflowed while nobody read.
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    /// Serves clients on a socket at `path` (replaced if it exists) on a thread.
    pub fn listen(&self, path: &Path, input: InputSink) -> io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let me = self.clone();
        std::thread::Builder::new()
            .stack_size(crate::DEVICE_STACK)
            .name("console".into())
            .spawn(move || me.serve(&listener, &input))?;
        Ok(())
    }

    fn serve(&self, listener: &UnixListener, input: &InputSink) {
        let mut reader: Option<UnixStream> = None;
        let mut buf = [0u8; 1024];
        loop {
            let want_out = {
                let st = self.state();
                st.client.is_some() && !st.ring.is_empty()
            };
            let mut fds = vec![
                libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if let Some(r) = &reader {
                let events = libc::POLLIN | if want_out { libc::POLLOUT } else { 0 };
                fds.push(libc::pollfd {
                    fd: r.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("console poll failed: {}", io::Error::last_os_error());
                return;
            }
            if fds[1].revents != 0 {
                let _ = self.wake.read();
            }
            if fds[0].revents & libc::POLLIN != 0 {
                if let Ok((stream, _)) = listener.accept() {
                    match self.attach(&stream) {
                        Ok(r) => reader = Some(r),
                        Err(e) => warn!("cannot attach console client: {e}"),
                    }
                }
            }
            if let Some(r) = reader.as_mut() {
                let rev = fds.get(2).map_or(0, |f| f.revents);
                if rev & libc::POLLIN != 0 {
                    match r.read(&mut buf) {
                        Ok(0) => self.detach(&mut reader),
                        Ok(n) => input(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => self.detach(&mut reader),
                    }
                } else if rev & (libc::POLLHUP | libc::POLLERR) != 0 {
                    self.detach(&mut reader);
                }
            }
            self.state().flush();
            // A client the writer found broken is gone for the reader too.
            if reader.is_some() && self.state().client.is_none() {
                reader = None;
            }
        }
    }

    fn attach(&self, stream: &UnixStream) -> io::Result<UnixStream> {
        stream.set_nonblocking(true)?;
        let reader = stream.try_clone()?;
        let mut st = self.state();
        if let Some(old) = st.client.take() {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        st.client = Some(stream.try_clone()?);
        st.flush();
        Ok(reader)
    }

    fn detach(&self, reader: &mut Option<UnixStream>) {
        *reader = None;
        self.state().client = None;
    }
}

impl Write for Console {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut st = self.state();
        if let Some(&last) = data.last() {
            st.at_line_start = last == b'\n';
        }
        if st.stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(data).and_then(|()| out.flush());
            return Ok(data.len());
        }
        st.push(data);
        st.flush();
        if st.client.is_some() && !st.ring.is_empty() {
            // The client is slow: let the socket thread wait for POLLOUT.
            let _ = self.wake.write(1);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::BufRead;

    #[test]
    fn output_waits_for_a_client_and_input_flows_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let mut con = Console::new(1024).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        con.listen(&path, Box::new(move |b| tx.send(b.to_vec()).unwrap()))
            .unwrap();
        con.write_all(b"early line\n").unwrap();
        let c = UnixStream::connect(&path).unwrap();
        let mut lines = io::BufReader::new(c.try_clone().unwrap());
        let mut l = String::new();
        lines.read_line(&mut l).unwrap();
        assert_eq!(l, "early line\n");
        con.write_all(b"live\n").unwrap();
        l.clear();
        lines.read_line(&mut l).unwrap();
        assert_eq!(l, "live\n");
        (&c).write_all(b"typed").unwrap();
        assert_eq!(rx.recv().unwrap(), b"typed");
        drop(lines);
        drop(c);
        // Detached again: output is kept for the next client.
        con.write_all(b"while away\n").unwrap();
        let c2 = UnixStream::connect(&path).unwrap();
        let mut l2 = String::new();
        io::BufReader::new(c2).read_line(&mut l2).unwrap();
        assert_eq!(l2, "while away\n");
    }

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut con = Console::new(4).unwrap();
        con.write_all(b"abcdef").unwrap();
        con.write_all(b"g").unwrap();
        assert_eq!(con.dropped(), 3);
        assert_eq!(
            con.state().ring.iter().copied().collect::<Vec<_>>(),
            b"defg"
        );
    }
}
