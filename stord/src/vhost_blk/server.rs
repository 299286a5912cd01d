//! One attachment: a listening socket served by a thread that accepts a frontend,
//! serves it until it disconnects, and waits for the next one (a VM process that
//! restarts reconnects to the same socket).
//!
//! A malformed or truncated vhost-user message ends that connection only; the
//! attachment goes back to accepting.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::disk::Disk;
use crate::qos::Limiter;
use crate::vhost_blk::{BlkBackend, Counters};

/// Why an attachment could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be created.
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    /// The vhost-user device could not be set up.
    #[error("cannot create the vhost-user device")]
    Device(String),
    /// The serving thread could not be started.
    #[error("cannot start the serving thread")]
    Thread(#[source] std::io::Error),
}

/// A fresh device for the next connection, with each queue worker also polling
/// its queue's io_uring completions.
fn new_daemon(name: &str, backend: &BlkBackend) -> Result<VhostUserDaemon<BlkBackend>, Error> {
    let daemon = VhostUserDaemon::new(
        name.to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| Error::Device(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    let nq = backend.num_queues() as u64;
    for (q, fd) in backend.ring_eventfds().into_iter().enumerate() {
        let handler = handlers
            .get(q)
            .ok_or_else(|| Error::Device(format!("no worker for queue {q}")))?;
        handler
            .register_listener(fd, EventSet::IN, nq + 1 + q as u64)
            .map_err(|e| Error::Device(format!("cannot poll the io_uring of queue {q}: {e}")))?;
    }
    Ok(daemon)
}

/// A volume exported on a vhost-user-blk socket until dropped or detached.
pub struct Attachment {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// Cuts the current frontend off, if one is connected.
    current: Arc<Mutex<Option<ShutdownHandle>>>,
    connections: Arc<AtomicU64>,
    counters: Arc<Counters>,
    backend: BlkBackend,
    /// The listening socket, owned by the serving thread until it ends.
    listen_fd: RawFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("socket", &self.socket)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Attachment {
    /// Serves `disk` (read-only if asked) on a new socket at `socket` with
    /// `num_queues` queues.
    pub fn start(
        socket: &Path,
        disk: Arc<Disk>,
        read_only: bool,
        num_queues: usize,
        serial: &str,
        limiter: Limiter,
    ) -> Result<Self, Error> {
        let mut listener =
            Listener::new(socket, true).map_err(|e| Error::Listen(socket.to_owned(), e))?;
        let counters = Arc::new(Counters::default());
        let backend = BlkBackend::new(
            disk,
            read_only,
            num_queues,
            serial,
            counters.clone(),
            limiter,
        );
        let backend_handle = backend.clone();
        let listen_fd = listener.as_raw_fd();
        let name = format!("vhost-blk-{serial}");
        // Fail now, not in the thread, if the device cannot be made at all.
        let mut daemon = new_daemon(&name, &backend)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let current = Arc::new(Mutex::new(None::<ShutdownHandle>));
        let (stop2, conns2, path, current2) = (
            stop.clone(),
            connections.clone(),
            socket.to_owned(),
            current.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("vhost-blk-accept".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    if let Err(e) = daemon.start(&mut listener) {
                        if stop2.load(Ordering::Acquire) {
                            break;
                        }
                        warn!(socket = %path.display(), error = %e, "cannot accept a frontend");
                        // Out of descriptors or similar: do not spin.
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                    if stop2.load(Ordering::Acquire) {
                        daemon.request_shutdown();
                        let _ = daemon.wait();
                        break;
                    }
                    *current2.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = daemon.shutdown_handle();
                    // A detach that raced with this accept found no handle to use.
                    if stop2.load(Ordering::Acquire) {
                        daemon.request_shutdown();
                    }
                    conns2.fetch_add(1, Ordering::Relaxed);
                    info!(socket = %path.display(), "frontend connected");
                    match daemon.wait() {
                        Ok(())
                        | Err(vhost_user_backend::Error::HandleRequest(
                            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
                        )) => info!(socket = %path.display(), "frontend disconnected"),
                        Err(e) => warn!(socket = %path.display(), error = %e, "frontend connection ended with an error"),
                    }
                    // The departed connection's queue workers stop, and are gone
                    // (dropping the daemon joins them), before anything else: they
                    // poll the same io_uring eventfds as the next connection's
                    // workers, and one left running could reap the next
                    // connection's completions into the old rings.
                    for handler in daemon.get_epoll_handlers() {
                        handler.send_exit_event();
                    }
                    drop(daemon);
                    // Requests the departed frontend left in flight complete into
                    // nowhere before the next one may see their completions.
                    backend.drain_rings();
                    // Every connection negotiates from scratch: a fresh device state
                    // (features, memory table, rings) over the same volume.
                    daemon = match new_daemon(&name, &backend) {
                        Ok(d) => d,
                        Err(e) => {
                            warn!(socket = %path.display(), error = %e, "cannot reset the device; attachment stops");
                            break;
                        }
                    };
                }
                debug!(socket = %path.display(), "attachment stopped");
            })
            .map_err(Error::Thread)?;
        Ok(Self {
            socket: socket.to_owned(),
            stop,
            current,
            connections,
            counters,
            backend: backend_handle,
            listen_fd,
            thread: Some(thread),
        })
    }

    /// Path of the socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// I/O counters of this attachment.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Announces a configuration change (new capacity) to the connected
    /// frontend, from a separate thread: a frontend that does not answer must
    /// not hold the caller up.
    pub fn config_changed(&self) {
        let backend = self.backend.clone();
        let _ = std::thread::Builder::new()
            .name("vhost-blk-config".into())
            .spawn(move || backend.config_changed());
    }

    /// How many frontends have connected so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Stops serving: the current frontend (if any) is disconnected and the socket
    /// removed.
    pub fn detach(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            h.shutdown();
        }
        if let Some(thread) = self.thread.take() {
            // Wake the accept loop: shutting the listening socket down makes a
            // blocked accept fail (connecting to the path would not work if the
            // socket file was removed under us).
            // SAFETY: the descriptor stays open until the thread, which owns it,
            // is joined below; shutdown does not close it.
            unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.shutdown();
    }
}
