//! `atoll up`: a whole single-node Atoll on a developer machine.
//!
//! 1. Create the data directory and take an exclusive `flock` on `atoll.lock` in it;
//!    a second instance on the same directory stops here, having changed nothing.
//! 2. Bind the HTTPS port (so "port in use" is reported before anything starts) and
//!    hand the socket to mgmtd as fd 3, the way systemd socket activation would.
//! 3. Start a private D-Bus broker (`busd`) on `run/bus.sock` in this process.
//! 4. Start vmm, netd, stord and mgmtd as child processes, wait until each owns its
//!    bus name, print the addresses and the admin credentials.
//! 5. Restart a daemon that dies, with exponential backoff, counting restarts on
//!    `org.atoll.Supervisor1.Service` objects that mgmtd reads for its node report.
//! 6. On SIGINT/SIGTERM stop every daemon (SIGTERM, then SIGKILL after a grace
//!    period), stop the broker and remove its socket.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};
use zbus::{connection, fdo::DBusProxy, fdo::ObjectManager, names::BusName, Connection};

use crate::db::INITIAL_PASSWORD_FILE;
use crate::dbus::{
    now_us, service_path, Service, SharedServiceState, Supervisor1, SUPERVISOR_BUS_NAME,
    SUPERVISOR_PATH,
};
use crate::report::DAEMONS;

/// How long the daemons get to own their names at start-up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// First restart delay; doubled after each quick death up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A daemon that ran this long before dying is restarted after [`MIN_BACKOFF`] again.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// File descriptor number under which mgmtd receives the HTTPS socket.
const LISTEN_FD: RawFd = 3;

/// Options of `atoll up`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory holding all of the node's state.
    pub data_dir: PathBuf,
    /// Address of the web UI and API.
    pub listen: SocketAddr,
    /// Log level passed to every daemon.
    pub log_level: String,
    /// Directory of the daemon binaries (default: next to the running executable).
    pub bin_dir: Option<PathBuf>,
}

/// Why `atoll up` failed; each message is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory cannot be created or written.
    #[error("cannot use data directory {0}: {1}")]
    DataDir(PathBuf, #[source] std::io::Error),
    /// Another instance holds the lock.
    #[error("data directory {path} is in use by another atoll (pid {pid}); stop it first")]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// Process id recorded in the lock file.
        pid: String,
    },
    /// The HTTPS port is taken.
    #[error("cannot listen on {0}: the address is already in use")]
    PortInUse(SocketAddr),
    /// The HTTPS port cannot be bound for another reason.
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// A daemon binary is missing.
    #[error("{0} not found; build the workspace first (cargo build --release)")]
    MissingBinary(PathBuf),
    /// The location of the running executable is unknown.
    #[error("cannot find the daemon binaries")]
    BinDir(#[source] std::io::Error),
    /// The bus socket path does not fit in a Unix socket address.
    #[error("bus socket path {0} is too long for a Unix socket; use a shorter --data-dir")]
    SocketPath(PathBuf),
    /// The private D-Bus broker failed.
    #[error("D-Bus broker on {0} failed: {1}")]
    Broker(String, String),
    /// The supervisor could not join its own bus.
    #[error("cannot connect to the private bus")]
    Connect(#[source] zbus::Error),
    /// Some daemons never came up.
    #[error("daemons did not start within {secs} s: {detail}")]
    StartTimeout {
        /// The timeout.
        secs: u64,
        /// Which daemons, and how their last attempt ended.
        detail: String,
    },
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// What a daemon is and how to start it.
#[derive(Debug, Clone)]
struct Spec {
    name: &'static str,
    bus_name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    listener_fd: Option<RawFd>,
}

/// Everything [`up`] prepared before the broker starts.
struct Prepared {
    _lock: Flock<File>,
    listener: TcpListener,
    node_id: String,
    socket: PathBuf,
    bus_address: String,
    web_url: String,
}

/// Escapes a path for a D-Bus address (`unix:path=...`).
fn dbus_escape(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"-_/.\\*".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn lock_data_dir(dir: &Path) -> Result<Flock<File>, Error> {
    fs::create_dir_all(dir).map_err(|e| Error::DataDir(dir.to_owned(), e))?;
    let path = dir.join("atoll.lock");
    // No truncation before the lock is ours: a refused instance changes nothing.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::DataDir(dir.to_owned(), e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let write = |f: &mut File| -> std::io::Result<()> {
                f.set_len(0)?;
                f.rewind()?;
                writeln!(f, "{}", std::process::id())?;
                f.sync_all()
            };
            write(&mut lock).map_err(|e| Error::DataDir(dir.to_owned(), e))?;
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Err(Error::Locked {
                path: dir.to_owned(),
                pid: pid.trim().to_owned(),
            })
        }
        Err((_, errno)) => Err(Error::DataDir(dir.to_owned(), errno.into())),
    }
}

fn node_id(dir: &Path) -> Result<String, Error> {
    let path = dir.join("node-id");
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            crate::tls::write_atomic(&path, format!("{id}\n").as_bytes(), 0o644)
                .map_err(|e| Error::DataDir(dir.to_owned(), e))?;
            Ok(id)
        }
    }
}

fn prepare(opts: &Options) -> Result<Prepared, Error> {
    let lock = lock_data_dir(&opts.data_dir)?;
    let listener = TcpListener::bind(opts.listen).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            Error::PortInUse(opts.listen)
        } else {
            Error::Bind(opts.listen, e)
        }
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Bind(opts.listen, e))?;
    let node_id = node_id(&opts.data_dir)?;
    let data_dir =
        fs::canonicalize(&opts.data_dir).map_err(|e| Error::DataDir(opts.data_dir.clone(), e))?;
    let run_dir = data_dir.join("run");
    fs::create_dir_all(&run_dir).map_err(|e| Error::DataDir(run_dir.clone(), e))?;
    let socket = run_dir.join("bus.sock");
    if socket.as_os_str().len() >= 108 {
        return Err(Error::SocketPath(socket));
    }
    // We hold the lock, so a socket left here belongs to a dead instance.
    let _ = fs::remove_file(&socket);
    let bus_address = format!("unix:path={}", dbus_escape(&socket));
    Ok(Prepared {
        _lock: lock,
        listener,
        node_id,
        socket,
        bus_address,
        web_url: format!("https://{local}"),
    })
}

fn specs(opts: &Options, p: &Prepared) -> Result<Vec<Spec>, Error> {
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .map_err(Error::BinDir)?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                Error::BinDir(std::io::Error::other("executable has no parent directory"))
            })?,
    };
    let data_dir =
        fs::canonicalize(&opts.data_dir).map_err(|e| Error::DataDir(opts.data_dir.clone(), e))?;
    let common = |extra: &[&str]| -> Vec<OsString> {
        let mut args: Vec<OsString> = extra.iter().map(OsString::from).collect();
        for a in [
            "--bus",
            &p.bus_address,
            "--node-id",
            &p.node_id,
            "--log-level",
            &opts.log_level,
        ] {
            args.push(a.into());
        }
        args
    };
    let mut out = Vec::new();
    for (name, bus_name) in DAEMONS {
        let program = bin_dir.join(name);
        if !program.is_file() {
            return Err(Error::MissingBinary(program));
        }
        let (args, listener_fd) = match name {
            "vmm" => {
                let mut args = common(&["daemon"]);
                args.push("--state-dir".into());
                args.push(data_dir.join("run/vmm").into_os_string());
                (args, None)
            }
            "mgmtd" => {
                let mut args = common(&["--listen-fd", "3"]);
                args.push("--data-dir".into());
                args.push(data_dir.join("mgmtd").into_os_string());
                (args, Some(p.listener.as_raw_fd()))
            }
            "stord" => {
                let mut args = common(&[]);
                args.push("--data-dir".into());
                args.push(data_dir.join("stord").into_os_string());
                args.push("--run-dir".into());
                args.push(data_dir.join("run/stord").into_os_string());
                (args, None)
            }
            "netd" => {
                let mut args = common(&[]);
                args.push("--run-dir".into());
                args.push(data_dir.join("run/netd").into_os_string());
                args.push("--data-dir".into());
                args.push(data_dir.join("netd").into_os_string());
                (args, None)
            }
            _ => (common(&[]), None),
        };
        out.push(Spec {
            name,
            bus_name,
            program,
            args,
            listener_fd,
        });
    }
    Ok(out)
}

/// How a child ended, in words.
fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {sig} ({s})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".to_owned(),
    }
}

fn command(spec: &Spec) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args).stdin(Stdio::null()).kill_on_drop(true);
    let parent = nix::unistd::getpid();
    let fd = spec.listener_fd;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, dup2, fcntl, _exit) on values
    // copied into it.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the supervisor (its single runtime thread is the main thread).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent.as_raw() {
                libc::_exit(1);
            }
            if let Some(fd) = fd {
                let rc = if fd == LISTEN_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, LISTEN_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Publishes every property of service `name` as changed.
async fn announce(conn: &Connection, name: &str) {
    let Ok(iface) = conn
        .object_server()
        .interface::<_, Service>(service_path(name))
        .await
    else {
        return;
    };
    let svc = iface.get().await;
    let e = iface.signal_emitter();
    let _ = tokio::try_join!(
        svc.main_pid_changed(e),
        svc.state_changed(e),
        svc.restarts_changed(e),
        svc.last_exit_changed(e),
        svc.started_at_changed(e),
    );
}

/// Sends SIGTERM, waits [`STOP_GRACE`], then kills.
async fn terminate(name: &str, child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => info!(daemon = name, exit = %describe_exit(status), "daemon stopped"),
        Ok(Err(e)) => warn!(daemon = name, error = %e, "cannot wait for daemon"),
        Err(_) => {
            warn!(daemon = name, "daemon ignored SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Runs one daemon until `stop` turns true, restarting it whenever it dies.
async fn keep_running(
    spec: Spec,
    state: SharedServiceState,
    conn: Connection,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        {
            let mut s = state.lock();
            s.state = "starting";
            s.pid = 0;
        }
        let started = Instant::now();
        let exit = match command(&spec).spawn() {
            Ok(mut child) => {
                {
                    let mut s = state.lock();
                    s.state = "running";
                    s.pid = child.id().unwrap_or(0);
                    s.started_at_us = now_us();
                }
                announce(&conn, spec.name).await;
                tokio::select! {
                    status = child.wait() => match status {
                        Ok(status) => describe_exit(status),
                        Err(e) => format!("cannot be waited for: {e}"),
                    },
                    _ = stop.changed() => {
                        state.lock().state = "stopping";
                        announce(&conn, spec.name).await;
                        terminate(spec.name, &mut child).await;
                        let mut s = state.lock();
                        s.state = "stopped";
                        s.pid = 0;
                        return;
                    }
                }
            }
            Err(e) => format!("cannot start {}: {e}", spec.program.display()),
        };
        if *stop.borrow() {
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            backoff = MIN_BACKOFF;
        }
        let restarts = {
            let mut s = state.lock();
            s.restarts += 1;
            s.last_exit = exit.clone();
            s.state = "restarting";
            s.pid = 0;
            s.restarts
        };
        announce(&conn, spec.name).await;
        warn!(daemon = spec.name, %exit, restart = restarts, delay_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "daemon died; restarting");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Waits until every daemon owns its bus name.
async fn wait_for_names(conn: &Connection, specs: &[Spec]) -> zbus::Result<()> {
    let dbus = DBusProxy::new(conn).await?;
    let mut changes = dbus.receive_name_owner_changed().await?;
    let mut pending: BTreeSet<&str> = specs.iter().map(|s| s.bus_name).collect();
    loop {
        let mut owned = Vec::new();
        for name in &pending {
            if dbus.name_has_owner(BusName::try_from(*name)?).await? {
                owned.push(*name);
            }
        }
        for name in owned {
            pending.remove(name);
        }
        if pending.is_empty() {
            return Ok(());
        }
        if changes.next().await.is_none() {
            return Err(zbus::Error::Failure("bus closed".into()));
        }
    }
}

fn print_banner(opts: &Options, p: &Prepared) {
    let password_file = opts.data_dir.join("mgmtd").join(INITIAL_PASSWORD_FILE);
    let admin = match fs::read_to_string(&password_file) {
        Ok(pw) => format!("admin / {}", pw.trim()),
        Err(_) => "admin (password changed by the administrator)".to_owned(),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "Atoll node {} is up.\n  web UI:   {}\n  bus:      {}\n  admin:    {}\n  data dir: {}\nPress Ctrl-C to stop.",
        p.node_id,
        p.web_url,
        p.bus_address,
        admin,
        opts.data_dir.display()
    );
    let _ = out.flush();
}

async fn supervise(opts: &Options, p: &Prepared, specs: Vec<Spec>) -> Result<(), Error> {
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let states: Vec<SharedServiceState> = specs
        .iter()
        .map(|_| SharedServiceState::default())
        .collect();
    let mut builder = connection::Builder::address(p.bus_address.as_str())
        .map_err(Error::Connect)?
        .name(SUPERVISOR_BUS_NAME)
        .map_err(Error::Connect)?
        .serve_at(
            SUPERVISOR_PATH,
            Supervisor1::new(opts.data_dir.display().to_string(), p.web_url.clone()),
        )
        .map_err(Error::Connect)?
        .serve_at(SUPERVISOR_PATH, ObjectManager)
        .map_err(Error::Connect)?;
    for (spec, state) in specs.iter().zip(&states) {
        builder = builder
            .serve_at(
                service_path(spec.name),
                Service::new(spec.name, spec.bus_name, state.clone()),
            )
            .map_err(Error::Connect)?;
    }
    let conn = builder.build().await.map_err(Error::Connect)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (spec, state) in specs.iter().zip(&states) {
        tasks.spawn(keep_running(
            spec.clone(),
            state.clone(),
            conn.clone(),
            stop_rx.clone(),
        ));
    }

    let started = tokio::select! {
        r = tokio::time::timeout(START_TIMEOUT, wait_for_names(&conn, &specs)) => match r {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) => Err(Error::Connect(e)),
            Err(_) => {
                let dbus = DBusProxy::new(&conn).await.map_err(Error::Connect)?;
                let mut missing = Vec::new();
                for (spec, state) in specs.iter().zip(&states) {
                    let owned = match BusName::try_from(spec.bus_name) {
                        Ok(n) => dbus.name_has_owner(n).await.unwrap_or(false),
                        Err(_) => false,
                    };
                    if !owned {
                        let last = state.lock().last_exit.clone();
                        missing.push(if last.is_empty() { spec.name.to_owned() } else { format!("{} ({last})", spec.name) });
                    }
                }
                Err(Error::StartTimeout { secs: START_TIMEOUT.as_secs(), detail: missing.join(", ") })
            }
        },
        _ = term.recv() => Ok(false),
        _ = int.recv() => Ok(false),
    };
    let result = match started {
        Ok(true) => {
            info!("all daemons are up");
            print_banner(opts, p);
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    info!("stopping the node");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    drop(conn);
    result
}

/// Runs a single-node Atoll until SIGINT/SIGTERM.
pub async fn up(opts: Options) -> Result<(), Error> {
    let prepared = prepare(&opts)?;
    let specs = specs(&opts, &prepared)?;
    let mut bus = busd::bus::Bus::for_address(Some(&prepared.bus_address))
        .await
        .map_err(|e| Error::Broker(prepared.bus_address.clone(), format!("{e:#}")))?;
    info!(address = %prepared.bus_address, "private D-Bus broker listening");
    let result = tokio::select! {
        r = bus.run() => Err(Error::Broker(prepared.bus_address.clone(), match r { Err(e) => format!("{e:#}"), Ok(()) => "stopped".to_owned() })),
        r = supervise(&opts, &prepared, specs) => r,
    };
    if let Err(e) = bus.cleanup().await {
        error!(error = %e, "cannot remove the bus socket");
    }
    let _ = fs::remove_file(&prepared.socket);
    result
}
