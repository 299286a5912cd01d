//! `atoll-net-echo SOCKET`: a vhost-user-net backend that echoes each frame a
//! guest sends back to it. It serves one frontend and exits when that one
//! disconnects. Test equipment, not part of a node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use atoll_tests::net_echo::{serve_once, EchoNet};

fn main() -> ExitCode {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: atoll-net-echo SOCKET");
        return ExitCode::from(2);
    };
    let backend = Arc::new(EchoNet::default());
    let result = serve_once(backend.clone(), &socket);
    eprintln!(
        "atoll-net-echo: tx {} rx {} dropped {}",
        backend.tx_frames.load(Ordering::Relaxed),
        backend.rx_frames.load(Ordering::Relaxed),
        backend.dropped.load(Ordering::Relaxed),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atoll-net-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
