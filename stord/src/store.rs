//! The daemon's state: the pool plus the live attachments of its volumes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use crate::pool::{self, Pool, VolumeMeta};
use crate::qos::{self, Limiter, QosSpec};
use crate::vhost_blk::{self, Attachment};
use crate::volume::{self, Volume};

/// Queues each attachment offers.
pub const NUM_QUEUES: usize = 4;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the pool.
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// The volume is attached where the operation needs it free, or attached
    /// read-write where another attachment was asked for.
    #[error("volume {0} is busy: {1}")]
    Busy(String, String),
    /// No attachment with this socket.
    #[error("volume {0} has no attachment at {1}")]
    NoAttachment(String, String),
    /// The data file could not be opened.
    #[error("cannot open volume {0}")]
    Open(String, #[source] volume::Error),
    /// The socket could not be served.
    #[error("cannot attach volume {0}")]
    Attach(String, #[source] vhost_blk::Error),
    /// The QoS specification was refused.
    #[error("invalid QoS for volume {0}")]
    Qos(String, #[source] qos::Error),
    /// The run directory could not be prepared.
    #[error("cannot prepare {0}")]
    RunDir(PathBuf, #[source] std::io::Error),
}

/// The pool and its attachments.
#[derive(Debug)]
pub struct Store {
    pool: Pool,
    run_dir: PathBuf,
    attachments: HashMap<String, Vec<(Attachment, bool)>>,
    limiters: HashMap<String, Limiter>,
    next_socket: u64,
}

impl Store {
    /// Opens the pool in `data_dir`; sockets go to `run_dir` (stale ones are removed).
    pub fn open(data_dir: &Path, run_dir: &Path) -> Result<Self, Error> {
        let pool = Pool::open(data_dir)?;
        std::fs::create_dir_all(run_dir).map_err(|e| Error::RunDir(run_dir.to_owned(), e))?;
        for entry in std::fs::read_dir(run_dir)
            .map_err(|e| Error::RunDir(run_dir.to_owned(), e))?
            .flatten()
        {
            if entry.path().extension().is_some_and(|x| x == "sock") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            pool,
            run_dir: run_dir.to_owned(),
            attachments: HashMap::new(),
            limiters: HashMap::new(),
            next_socket: 0,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Creates a volume.
    pub fn create(&mut self, name: &str, size: u64) -> Result<VolumeMeta, Error> {
        Ok(self.pool.create(name, size)?)
    }

    /// Deletes a volume that has no attachment.
    pub fn delete(&mut self, id: &str) -> Result<(), Error> {
        if self.attachments.get(id).is_some_and(|a| !a.is_empty()) {
            return Err(Error::Busy(id.to_owned(), "detach it first".to_owned()));
        }
        self.pool.delete(id)?;
        self.limiters.remove(id);
        self.attachments.remove(id);
        Ok(())
    }

    /// The limiter of volume `id`, shared by all its attachments.
    fn limiter(&mut self, id: &str) -> Result<Limiter, Error> {
        let spec = self.pool.get(id)?.qos;
        Ok(self
            .limiters
            .entry(id.to_owned())
            .or_insert_with(|| Limiter::new(spec))
            .clone())
    }

    /// Validates, persists and applies new QoS limits; attached frontends are
    /// throttled by them from their next request.
    pub fn set_qos(&mut self, id: &str, limits: &BTreeMap<String, u64>) -> Result<QosSpec, Error> {
        let spec = QosSpec::from_map(limits).map_err(|e| Error::Qos(id.to_owned(), e))?;
        self.pool.set_qos(id, spec)?;
        self.limiter(id)?.set(spec);
        tracing::info!(volume = id, ?spec, "QoS changed");
        Ok(spec)
    }

    /// Grows a volume that has no attachment (online resize comes with the
    /// config-change notification).
    pub fn resize(&mut self, id: &str, size: u64) -> Result<VolumeMeta, Error> {
        if self.attachments.get(id).is_some_and(|a| !a.is_empty()) {
            return Err(Error::Busy(
                id.to_owned(),
                "detach it before resizing".to_owned(),
            ));
        }
        Ok(self.pool.resize(id, size)?)
    }

    /// Serves volume `id` on a new socket. Any number of read-only attachments, or
    /// exactly one read-write one.
    pub fn attach(&mut self, id: &str, read_only: bool) -> Result<PathBuf, Error> {
        self.pool.get(id)?;
        let current = self
            .attachments
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if current.iter().any(|(_, ro)| !ro) {
            return Err(Error::Busy(
                id.to_owned(),
                "it has a read-write attachment".to_owned(),
            ));
        }
        if !read_only && !current.is_empty() {
            return Err(Error::Busy(
                id.to_owned(),
                "it has read-only attachments".to_owned(),
            ));
        }
        let vol = Volume::open(&self.pool.data_path(id), read_only)
            .map_err(|e| Error::Open(id.to_owned(), e))?;
        self.next_socket += 1;
        let short: String = id.chars().take(8).collect();
        let socket = self
            .run_dir
            .join(format!("{short}-{}.sock", self.next_socket));
        let limiter = self.limiter(id)?;
        let att = Attachment::start(&socket, vol, NUM_QUEUES, id, limiter)
            .map_err(|e| Error::Attach(id.to_owned(), e))?;
        tracing::info!(volume = id, socket = %socket.display(), read_only, "volume attached");
        self.attachments
            .entry(id.to_owned())
            .or_default()
            .push((att, read_only));
        Ok(socket)
    }

    /// Stops serving the attachment of `id` at `socket`.
    pub fn detach(&mut self, id: &str, socket: &str) -> Result<(), Error> {
        let list = self.attachments.entry(id.to_owned()).or_default();
        let pos = list
            .iter()
            .position(|(a, _)| a.socket() == Path::new(socket))
            .ok_or_else(|| Error::NoAttachment(id.to_owned(), socket.to_owned()))?;
        let (att, _) = list.remove(pos);
        att.detach();
        tracing::info!(volume = id, socket, "volume detached");
        Ok(())
    }

    /// Sockets of volume `id` with their read-only flag.
    pub fn attachments(&self, id: &str) -> Vec<(String, bool)> {
        self.attachments
            .get(id)
            .map(|l| {
                l.iter()
                    .map(|(a, ro)| (a.socket().display().to_string(), *ro))
                    .collect()
            })
            .unwrap_or_default()
    }
}
