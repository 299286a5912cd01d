//! The `mgmtd` binary: the node's management daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mgmtd::cli;
use mgmtd::daemon::{Listen, Options};

#[derive(Debug, Parser)]
#[command(name = "mgmtd", version, about = "Atoll management daemon")]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// D-Bus address to connect to (default: the system bus).
    #[arg(long, value_name = "ADDRESS")]
    bus: Option<String>,
    /// Directory for the database and the HTTPS certificate.
    #[arg(long, default_value = "/var/lib/atoll/mgmtd")]
    data_dir: PathBuf,
    /// Address for the HTTPS API and web UI.
    #[arg(long, default_value = "0.0.0.0:8006", conflicts_with = "listen_fd")]
    listen: SocketAddr,
    /// Serve on this inherited listening socket instead of binding --listen.
    #[arg(long, value_name = "FD")]
    listen_fd: Option<i32>,
    /// Identifier of this node (default: /etc/machine-id).
    #[arg(long)]
    node_id: Option<String>,
}

fn main() -> ExitCode {
    let args = match Cli::try_parse() {
        Ok(a) => a,
        Err(e) => return cli::usage_error("mgmtd", &e),
    };
    if let Err(e) = cli::init_logging(&args.log_level) {
        eprintln!("mgmtd: {e}");
        return ExitCode::from(2);
    }
    let opts = Options {
        bus: args.bus,
        data_dir: args.data_dir,
        listen: args.listen_fd.map_or(Listen::Addr(args.listen), Listen::Fd),
        node_id: args.node_id.unwrap_or_else(cli::machine_id),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mgmtd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(mgmtd::daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mgmtd: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
