//! A private D-Bus broker for one test: Debian's `dbus-daemon`, the same broker a
//! node's system bus runs, in a session configuration on a temporary socket.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

/// A running broker; killed on drop, which closes every client connection.
#[derive(Debug)]
pub struct TestBus {
    address: String,
    child: Option<Child>,
    _dir: TempDir,
}

impl TestBus {
    /// Starts a broker and returns once it accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("bus.sock");
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon (Debian package dbus; .ci/run installs it)");
        // dbus-daemon prints its address once it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the bus address");
        assert!(line.starts_with("unix:"), "dbus-daemon printed {line:?}");
        Self {
            address: format!("unix:path={}", socket.display()),
            child: Some(child),
            _dir: dir,
        }
    }

    /// The `unix:path=...` address of the broker.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Stops the broker now; clients see their connection close.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        self.stop();
    }
}
