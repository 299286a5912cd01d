//! The VM process's control socket: one JSON request per line
//! (`{"op":"pause"}`), one JSON reply per line (`{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`). The node supervisor drives VMs through it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use serde::Deserialize;

/// A request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Current state.
    State,
    /// State, sizes, uptime, boot stamps.
    Info,
    /// Park every vCPU.
    Pause,
    /// Let them run again.
    Resume,
    /// End the VM now (reason "stopped").
    Stop,
    /// End the VM for a restart (reason "reset").
    Reboot,
    /// Ask the guest to power off.
    Shutdown,
}

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The listening socket and its clients.
pub struct Api {
    listener: UnixListener,
    clients: Vec<Client>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

impl Api {
    /// Listens at `path` (replacing a stale socket).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            clients: Vec::new(),
        })
    }

    /// Descriptors to poll for input.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.listener.as_raw_fd()];
        v.extend(self.clients.iter().map(|c| c.stream.as_raw_fd()));
        v
    }

    /// Accepts and reads whatever is ready; answers each complete request
    /// with `handle`.
    pub fn service(
        &mut self,
        mut handle: impl FnMut(Result<Request, String>) -> serde_json::Value,
    ) {
        while let Ok((s, _)) = self.listener.accept() {
            if s.set_nonblocking(true).is_ok() {
                self.clients.push(Client {
                    stream: s,
                    buf: Vec::new(),
                });
            }
        }
        let mut chunk = [0u8; 1024];
        self.clients.retain_mut(|c| {
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => return false,
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
            while let Some(nl) = c.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = c.buf.drain(..=nl).collect();
                let req = std::str::from_utf8(&line)
                    .map_err(|_| "request is not UTF-8".to_owned())
                    .and_then(|l| serde_json::from_str(l.trim()).map_err(|e| e.to_string()));
                let mut reply = handle(req).to_string();
                reply.push('\n');
                // Replies are small; a client whose socket buffer is full
                // (it does not read its replies) is dropped.
                if c.stream.write_all(reply.as_bytes()).is_err() {
                    return false;
                }
            }
            c.buf.len() <= MAX_LINE
        });
    }
}
