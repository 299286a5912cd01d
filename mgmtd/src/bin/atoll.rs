//! The `atoll` command.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mgmtd::cli;

#[derive(Debug, Parser)]
#[command(name = "atoll", version, about = "Atoll hyperconverged node")]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a single-node Atoll here: private D-Bus, the four daemons, web UI on localhost.
    Up {
        /// Directory for all of the node's state.
        #[arg(long, default_value = "./atoll-data")]
        data_dir: PathBuf,
        /// HTTPS port of the web UI and API (0 picks a free one).
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Address the web UI listens on.
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
        listen_address: IpAddr,
    },
}

fn main() -> ExitCode {
    let args = match Cli::try_parse() {
        Ok(a) => a,
        Err(e) => return cli::usage_error("atoll", &e),
    };
    if let Err(e) = cli::init_logging(&args.log_level) {
        eprintln!("atoll: {e}");
        return ExitCode::from(2);
    }
    match args.command {
        Command::Up {
            data_dir,
            port,
            listen_address,
        } => {
            let opts = mgmtd::supervisor::Options {
                data_dir,
                listen: SocketAddr::new(listen_address, port),
                log_level: args.log_level,
                bin_dir: None,
            };
            // One thread: children get PR_SET_PDEATHSIG tied to it.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("atoll: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(mgmtd::supervisor::up(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("atoll: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
