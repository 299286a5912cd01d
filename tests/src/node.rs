//! A whole node started with `atoll up`, as a developer would.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::bins::bin;

/// How long a node may take to print its banner.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `atoll up`; killed on drop.
#[derive(Debug)]
pub struct Node {
    child: Child,
    /// The data directory.
    pub data_dir: PathBuf,
    /// `https://127.0.0.1:PORT` as printed.
    pub url: String,
    /// `unix:path=...` as printed.
    pub bus_address: String,
    /// The admin password as printed.
    pub admin_password: String,
    /// The node id as printed.
    pub node_id: String,
    log: PathBuf,
    http: reqwest::blocking::Client,
    _tmp: Option<TempDir>,
}

/// Output of an `atoll` run that did not come up.
#[derive(Debug)]
pub struct Failed {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Node {
    /// Starts a node on a fresh temporary data directory and a free port.
    pub fn start() -> Self {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let mut node = Self::start_in(&tmp.path().join("data"), &["--port", "0"])
            .unwrap_or_else(|f| panic!("atoll up failed ({}): {}", f.status, f.stderr));
        node._tmp = Some(tmp);
        node
    }

    /// Starts `atoll up --data-dir dir EXTRA...`; returns how it failed if it exits
    /// before printing its banner.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Result<Self, Failed> {
        let log = dir.with_extension("atoll.log");
        let mut child = Command::new(bin("atoll"))
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("start atoll up");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("Press Ctrl-C") => break,
                Ok(line) => banner.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait");
                    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                    return Err(Failed { status, stderr });
                }
            }
        }
        let field = |key: &str| -> String {
            banner
                .iter()
                .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
                .unwrap_or_else(|| panic!("banner has no {key}: {banner:?}"))
        };
        let node_id = banner
            .first()
            .and_then(|l| l.strip_prefix("Atoll node "))
            .and_then(|l| l.strip_suffix(" is up."))
            .unwrap_or_else(|| panic!("unexpected banner {banner:?}"))
            .to_owned();
        let admin = field("admin:");
        let admin_password = admin.strip_prefix("admin / ").unwrap_or(&admin).to_owned();
        let http = reqwest::blocking::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(15))
            .build()
            .expect("HTTP client");
        Ok(Self {
            child,
            data_dir: dir.to_owned(),
            url: field("web UI:"),
            bus_address: field("bus:"),
            admin_password,
            node_id,
            log,
            http,
            _tmp: None,
        })
    }

    /// Process id of `atoll up`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything `atoll up` and its daemons logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the node's HTTPS API.
    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The node report from `/api/v1/node`.
    pub fn report(&self) -> Value {
        let res = self.get("/api/v1/node");
        assert!(
            res.status().is_success(),
            "GET /api/v1/node: {}",
            res.status()
        );
        res.json().expect("node report is JSON")
    }

    /// Entry of daemon `name` in the node report.
    pub fn daemon(&self, name: &str) -> Value {
        self.report()["daemons"]
            .as_array()
            .expect("daemons array")
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no daemon {name} in the report"))
            .clone()
    }

    /// Sends SIGTERM and waits for `atoll up` to exit. The data directory stays
    /// until the `Node` is dropped.
    pub fn stop(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let child = &mut self.child;
        crate::wait_until("atoll up to exit", Duration::from_secs(30), || {
            child.try_wait().expect("try_wait")
        })
    }

    /// Sends SIGKILL to `atoll up` itself and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
