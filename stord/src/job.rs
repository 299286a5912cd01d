//! Long operations (image import and export) as D-Bus job objects:
//! `/org/atoll/Storage1/job/<n>` with `org.atoll.Storage1.Job`.
//!
//! A job runs on a blocking thread; its `BytesDone` property is announced with
//! PropertiesChanged while it runs (at most twice a second), and `State` goes
//! from `running` to `completed`, `failed` (with `Error`) or `cancelled`, with a
//! signal. A finished job stays until `Dismiss` or the daemon's restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{interface, proxy, Connection};

use crate::image::Progress;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// Object path of job `n`.
pub fn job_path(n: u64) -> String {
    format!("{}/job/{n}", crate::OBJECT_PATH)
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    state: String,
    error: String,
    result: Option<OwnedObjectPath>,
}

/// One long operation.
#[derive(Debug)]
pub struct Job {
    kind: String,
    target: String,
    progress: Arc<Progress>,
    outcome: Arc<Mutex<Outcome>>,
}

impl Job {
    fn outcome(&self) -> Outcome {
        self.outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// An import or export in progress, with what it has done so far.
#[interface(name = "org.atoll.Storage1.Job")]
impl Job {
    /// What the job does: `import` or `export`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn kind(&self) -> String {
        self.kind.clone()
    }

    /// What it works on (image path and volume name).
    #[zbus(property(emits_changed_signal = "const"))]
    fn target(&self) -> String {
        self.target.clone()
    }

    /// `running`, `completed`, `failed` or `cancelled`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.outcome().state
    }

    /// Why the job failed (empty otherwise).
    #[zbus(property)]
    fn error(&self) -> String {
        self.outcome().error
    }

    /// The object the job produced (the imported volume), or `/`.
    #[zbus(property)]
    fn result(&self) -> OwnedObjectPath {
        self.outcome()
            .result
            .unwrap_or_else(|| ObjectPath::from_static_str_unchecked("/").into())
    }

    /// Bytes handled so far.
    #[zbus(property)]
    fn bytes_done(&self) -> u64 {
        self.progress.done.load(Ordering::Relaxed)
    }

    /// Bytes to handle in all (data only: holes are not counted).
    #[zbus(property)]
    fn bytes_total(&self) -> u64 {
        self.progress.total.load(Ordering::Relaxed)
    }

    /// Asks a running job to stop; it ends `cancelled` and undoes its work.
    fn cancel(&self) {
        self.progress.cancel.store(true, Ordering::Relaxed);
    }

    /// Removes a finished job's object.
    async fn dismiss(
        &self,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> zbus::fdo::Result<()> {
        if self.outcome().state == "running" {
            return Err(zbus::fdo::Error::Failed(
                "the job is still running; cancel it first".into(),
            ));
        }
        if let Some(path) = header.path() {
            server.remove::<Job, _>(path).await?;
        }
        Ok(())
    }
}

/// What a job's work returns: the object it produced, if any.
pub type WorkResult = Result<Option<OwnedObjectPath>, String>;

/// Publishes a job and runs `work` on a blocking thread; `finish` then runs on
/// the bus executor with the work's result (to publish objects) and its return
/// becomes the job's outcome. Returns the job's path at once.
pub async fn start<W, F, Fut>(
    conn: &Connection,
    kind: &str,
    target: String,
    progress: Arc<Progress>,
    work: W,
    finish: F,
) -> zbus::Result<OwnedObjectPath>
where
    W: FnOnce() -> Result<String, (String, bool)> + Send + 'static,
    F: FnOnce(Connection, Result<String, (String, bool)>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = WorkResult> + Send,
{
    let path = job_path(NEXT.fetch_add(1, Ordering::Relaxed));
    let outcome = Arc::new(Mutex::new(Outcome {
        state: "running".into(),
        ..Outcome::default()
    }));
    let job = Job {
        kind: kind.to_owned(),
        target,
        progress: progress.clone(),
        outcome: outcome.clone(),
    };
    conn.object_server().at(path.as_str(), job).await?;
    let conn = conn.clone();
    let task_path = path.clone();
    tokio::spawn(async move {
        let mut handle = tokio::task::spawn_blocking(work);
        let iface = conn
            .object_server()
            .interface::<_, Job>(task_path.as_str())
            .await;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let res = loop {
            tokio::select! {
                r = &mut handle => break r.unwrap_or_else(|e| Err((e.to_string(), false))),
                _ = tick.tick() => {
                    if let Ok(i) = &iface {
                        let _ = i.get().await.bytes_done_changed(i.signal_emitter()).await;
                    }
                }
            }
        };
        let cancelled = matches!(&res, Err((_, true)));
        let finished = finish(conn.clone(), res).await;
        {
            let mut o = outcome
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match finished {
                Ok(result) => {
                    o.state = "completed".into();
                    o.result = result;
                }
                Err(_) if cancelled => o.state = "cancelled".into(),
                Err(e) => {
                    o.state = "failed".into();
                    o.error = e;
                }
            }
        }
        if let Ok(i) = &iface {
            let j = i.get().await;
            let e = i.signal_emitter();
            let _ = j.bytes_done_changed(e).await;
            let _ = j.bytes_total_changed(e).await;
            let _ = j.error_changed(e).await;
            let _ = j.result_changed(e).await;
            let _ = j.state_changed(e).await;
        }
    });
    Ok(ObjectPath::try_from(path)?.into())
}

/// Typed client of one `org.atoll.Storage1.Job`.
#[proxy(
    interface = "org.atoll.Storage1.Job",
    default_service = "org.atoll.Storage1"
)]
pub trait Job {
    /// `import` or `export`.
    #[zbus(property)]
    fn kind(&self) -> zbus::Result<String>;
    /// What it works on.
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;
    /// `running`, `completed`, `failed` or `cancelled`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Why it failed.
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
    /// What it produced.
    #[zbus(property)]
    fn result(&self) -> zbus::Result<OwnedObjectPath>;
    /// Bytes handled.
    #[zbus(property)]
    fn bytes_done(&self) -> zbus::Result<u64>;
    /// Bytes in all.
    #[zbus(property)]
    fn bytes_total(&self) -> zbus::Result<u64>;
    /// Stops it.
    fn cancel(&self) -> zbus::Result<()>;
    /// Removes a finished job.
    fn dismiss(&self) -> zbus::Result<()>;
}
