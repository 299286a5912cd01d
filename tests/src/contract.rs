//! The contract every Atoll daemon keeps on D-Bus, checked against its real binary.
//!
//! * it owns its well-known name and serves its interface at its object path with
//!   `Version`, `NodeId`, `Health`, `HealthDetail` and `StartedAt`;
//! * introspection carries the interface's documentation;
//! * a second instance on the same bus exits 1 with one clear line;
//! * SIGTERM stops it with status 0 and releases the name;
//! * when the bus goes away it exits non-zero saying so;
//! * an unknown flag exits 2 with one line.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use zbus::fdo::{DBusProxy, IntrospectableProxy, PropertiesProxy};
use zbus::names::{BusName, InterfaceName};
use zbus::zvariant::OwnedValue;

use crate::TestBus;

/// A daemon under test.
#[derive(Debug, Clone)]
pub struct DaemonSpec<'a> {
    /// The binary.
    pub bin: PathBuf,
    /// Arguments before `--bus` (e.g. `["daemon"]` for vmm).
    pub args: &'a [&'a str],
    /// Its well-known name, which is also its main interface name.
    pub bus_name: &'a str,
    /// Its main object path.
    pub path: &'a str,
    /// The version it must report.
    pub version: &'a str,
    /// Whether an ObjectManager must be served at `path`.
    pub object_manager: bool,
    /// What a second instance with the same arguments must say, when it is not
    /// that the bus name is taken (a daemon that locks its state first).
    pub conflict: Option<&'a str>,
}

/// Node id the harness passes with `--node-id`.
pub const NODE_ID: &str = "contract-test-node";

const TIMEOUT: Duration = Duration::from_secs(20);

struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process {} did not exit within {TIMEOUT:?}; it logged:\n{}",
                self.child.id(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(spec: &DaemonSpec<'_>, bus: &str, dir: &Path, tag: &str) -> Running {
    let log = dir.join(format!("{tag}.log"));
    let child = Command::new(&spec.bin)
        .args(spec.args)
        .args(["--bus", bus, "--node-id", NODE_ID, "--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", spec.bin.display()));
    Running { child, log }
}

fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
}

/// Waits until `name` has an owner (`true`) or none (`false`) on `conn`.
pub async fn wait_owner(conn: &zbus::Connection, name: &str, owned: bool) {
    let dbus = DBusProxy::new(conn).await.expect("DBus proxy");
    let mut changes = dbus
        .receive_name_owner_changed()
        .await
        .expect("subscribe NameOwnerChanged");
    let bus_name = BusName::try_from(name.to_owned()).expect("valid bus name");
    let wait = async {
        loop {
            if dbus
                .name_has_owner(bus_name.clone())
                .await
                .expect("NameHasOwner")
                == owned
            {
                return;
            }
            changes.next().await.expect("bus closed");
        }
    };
    tokio::time::timeout(TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{name} did not become {}",
                if owned { "owned" } else { "free" }
            )
        });
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_micros(),
    )
    .expect("fits")
}

async fn check_interface(conn: &zbus::Connection, spec: &DaemonSpec<'_>) {
    let props = PropertiesProxy::builder(conn)
        .destination(spec.bus_name)
        .expect("destination")
        .path(spec.path)
        .expect("path")
        .build()
        .await
        .expect("properties proxy");
    let all: HashMap<String, OwnedValue> = props
        .get_all(InterfaceName::try_from(spec.bus_name).expect("interface name"))
        .await
        .expect("GetAll on the daemon interface");
    let s = |k: &str| -> String {
        let v = all
            .get(k)
            .unwrap_or_else(|| panic!("property {k} missing: {all:?}"));
        String::try_from(v.clone()).unwrap_or_else(|_| panic!("{k} is not a string"))
    };
    assert_eq!(s("Version"), spec.version);
    assert_eq!(s("NodeId"), NODE_ID);
    let health = s("Health");
    assert!(
        ["ok", "degraded", "failed"].contains(&health.as_str()),
        "Health = {health}"
    );
    assert_eq!(
        s("HealthDetail").is_empty(),
        health == "ok",
        "HealthDetail must explain a non-ok Health"
    );
    let started =
        u64::try_from(all.get("StartedAt").expect("StartedAt").clone()).expect("StartedAt is u64");
    assert!(
        started <= now_us() && now_us() - started < 120_000_000,
        "StartedAt {started} is not recent"
    );

    let xml = IntrospectableProxy::builder(conn)
        .destination(spec.bus_name)
        .expect("destination")
        .path(spec.path)
        .expect("path")
        .build()
        .await
        .expect("introspectable proxy")
        .introspect()
        .await
        .expect("Introspect");
    assert!(
        xml.contains(&format!("<interface name=\"{}\">", spec.bus_name)),
        "{xml}"
    );
    assert!(
        xml.contains("<!--"),
        "introspection carries no documentation:\n{xml}"
    );
    assert_eq!(
        xml.contains("org.freedesktop.DBus.ObjectManager"),
        spec.object_manager,
        "ObjectManager presence at {}",
        spec.path
    );
}

/// Checks the whole contract for `spec`.
pub fn check(spec: &DaemonSpec<'_>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Unknown flag: exit 2, one line.
    let out = Command::new(&spec.bin)
        .args(spec.args)
        .arg("--no-such-flag")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    assert!(err.contains("--no-such-flag"), "{err}");

    let mut bus = TestBus::start();
    let conn = rt
        .block_on(
            zbus::connection::Builder::address(bus.address())
                .expect("address")
                .build(),
        )
        .expect("connect to the test bus");

    let mut first = spawn(spec, bus.address(), dir.path(), "first");
    rt.block_on(wait_owner(&conn, spec.bus_name, true));
    rt.block_on(check_interface(&conn, spec));

    // A second instance cannot take the name and says so in one line.
    let mut second = spawn(spec, bus.address(), dir.path(), "second");
    let status = second.wait();
    assert_eq!(status.code(), Some(1), "second instance: {}", second.log());
    let line = second.log();
    let expected = spec.conflict.map_or_else(
        || format!("cannot connect to D-Bus and own {}", spec.bus_name),
        str::to_owned,
    );
    assert!(
        last_line(&line).contains(&expected),
        "second instance said: {line}"
    );
    rt.block_on(check_interface(&conn, spec));

    // SIGTERM: clean exit, name released.
    sigterm(&first.child);
    let status = first.wait();
    assert!(status.success(), "SIGTERM exit {status:?}: {}", first.log());
    rt.block_on(wait_owner(&conn, spec.bus_name, false));

    // The bus goes away: the daemon notices and exits non-zero.
    let mut third = spawn(spec, bus.address(), dir.path(), "third");
    rt.block_on(wait_owner(&conn, spec.bus_name, true));
    drop(conn);
    bus.stop();
    let status = third.wait();
    assert!(!status.success(), "daemon kept running without a bus");
    let log = third.log();
    // Debug lines of the closing connection may follow the error line.
    assert!(
        log.lines()
            .any(|l| l.ends_with(": lost the connection to D-Bus")),
        "daemon said: {log}"
    );
}
