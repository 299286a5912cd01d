//! `mgmtd`: the management daemon process.
//!
//! Start-up order: data directory, database (and first admin), TLS certificate,
//! HTTPS listener, then the D-Bus name. Owning `org.atoll.Manager1` therefore means
//! the API is ready to serve.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::{connection, Connection};

use crate::dbus::{Manager1, MANAGER_BUS_NAME, MANAGER_PATH};
use crate::{db, http, tls};

/// Where the HTTPS listener comes from.
#[derive(Debug, Clone)]
pub enum Listen {
    /// Bind this address.
    Addr(SocketAddr),
    /// Use a listening TCP socket inherited as this file descriptor (socket activation).
    Fd(RawFd),
}

/// Options of `mgmtd`.
#[derive(Debug, Clone)]
pub struct Options {
    /// D-Bus address; the system bus when `None`.
    pub bus: Option<String>,
    /// Directory for the database and certificate.
    pub data_dir: PathBuf,
    /// HTTPS listener.
    pub listen: Listen,
    /// Identifier of this node.
    pub node_id: String,
}

/// Why mgmtd stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory could not be created.
    #[error("cannot create data directory {0}")]
    DataDir(PathBuf, #[source] std::io::Error),
    /// The database could not be opened or prepared.
    #[error(transparent)]
    Db(#[from] db::Error),
    /// The certificate could not be made or loaded.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// The HTTPS socket could not be bound.
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// The inherited file descriptor is not a TCP listener.
    #[error("file descriptor {0} is not a listening TCP socket")]
    BadFd(RawFd, #[source] std::io::Error),
    /// The bus could not be reached or the name could not be owned.
    #[error("cannot connect to D-Bus and own {MANAGER_BUS_NAME}")]
    Connect(#[source] zbus::Error),
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The HTTPS server failed.
    #[error("HTTPS server failed")]
    Serve(#[source] std::io::Error),
    /// The bus went away under the daemon.
    #[error("lost the connection to D-Bus")]
    BusLost,
}

fn listener(listen: &Listen) -> Result<TcpListener, Error> {
    let l = match *listen {
        Listen::Addr(addr) => TcpListener::bind(addr).map_err(|e| Error::Bind(addr, e))?,
        Listen::Fd(fd) => {
            // SAFETY: the fd number was handed to us by whoever started mgmtd (`atoll up`
            // or systemd) as an inherited listening socket that nothing else in this
            // process owns; we take ownership exactly once.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            l.local_addr().map_err(|e| Error::BadFd(fd, e))?;
            l
        }
    };
    l.set_nonblocking(true).map_err(|e| {
        Error::Bind(
            l.local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            e,
        )
    })?;
    Ok(l)
}

async fn connect(opts: &Options, web_url: String) -> zbus::Result<Connection> {
    let builder = match &opts.bus {
        Some(address) => connection::Builder::address(address.as_str())?,
        None => connection::Builder::system()?,
    };
    let conn = builder
        .serve_at(MANAGER_PATH, Manager1::new(opts.node_id.clone(), web_url))?
        .build()
        .await?;
    // Refuse to queue behind another owner: a second instance must fail, not wait.
    match conn
        .request_name_with_flags(MANAGER_BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await?
    {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(conn),
        RequestNameReply::Exists | RequestNameReply::InQueue => Err(zbus::Error::NameTaken),
    }
}

/// Runs mgmtd until SIGTERM/SIGINT or until the bus goes away.
pub async fn run(opts: Options) -> Result<(), Error> {
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| Error::DataDir(opts.data_dir.clone(), e))?;
    let mut database = db::Db::open(&opts.data_dir)?;
    database.bootstrap_admin(&opts.data_dir)?;
    drop(database);

    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let (cert, key) = tls::ensure_certificate(&opts.data_dir, &names)?;
    let config = tls::server_config(&cert, &key)?;
    let listener = listener(&opts.listen)?;
    let local = listener.local_addr().map_err(|e| Error::BadFd(-1, e))?;
    let web_url = format!("https://{local}");

    let conn = connect(&opts, web_url.clone())
        .await
        .map_err(Error::Connect)?;
    let state = http::AppState {
        bus: conn.clone(),
        node_id: opts.node_id.clone(),
    };
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(config),
    )
    .handle(handle.clone())
    .serve(http::router(state).into_make_service());
    info!(url = %web_url, name = MANAGER_BUS_NAME, "management daemon ready");

    let mut server = std::pin::pin!(server);
    let result = tokio::select! {
        r = &mut server => r.map_err(Error::Serve),
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        () = conn.closed() => Err(Error::BusLost),
    };
    info!("management daemon stopping");
    handle.graceful_shutdown(Some(Duration::from_secs(5)));
    if result.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(6), server).await;
    }
    drop(conn);
    result
}
