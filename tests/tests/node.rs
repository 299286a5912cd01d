//! A whole node, started with `atoll up` exactly as the README says, driven through
//! its printed interfaces: HTTPS, the private bus (with busctl) and signals.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use atoll_tests::{bins::bin, process_alive, wait_until, Node};
use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const DAEMONS: [(&str, &str); 4] = [
    ("vmm", "org.atoll.Vmm1"),
    ("netd", "org.atoll.Net1"),
    ("stord", "org.atoll.Storage1"),
    ("mgmtd", "org.atoll.Manager1"),
];

fn pid_of(d: &Value) -> u32 {
    u32::try_from(d["pid"].as_u64().expect("pid")).expect("pid fits")
}

fn busctl(address: &str, args: &[&str]) -> String {
    let out = Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(args)
        .output()
        .expect("run busctl (Debian package systemd; .ci/run installs it)");
    assert!(
        out.status.success(),
        "busctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir` with its contents, to prove a failed run changed nothing.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let ft = entry.file_type().unwrap();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                out.insert(path.display().to_string(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Runs `atoll ARGS`, expecting a failure with exactly one line on stderr.
fn fails_with_one_line(args: &[&str]) -> String {
    let child = Command::new(bin("atoll"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // A run that wrongly starts must not hang the suite.
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if !process_alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGTERM);
    });
    let out = child.wait_with_output().unwrap();
    watchdog.join().unwrap();
    assert!(!out.status.success(), "atoll {args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(
        stderr.lines().count(),
        1,
        "atoll {args:?} must say one line, said:\n{stderr}"
    );
    assert!(stderr.starts_with("atoll: "), "{stderr}");
    stderr
}

#[test]
fn node_serves_four_healthy_daemons_and_stops_cleanly() {
    let node = Node::start();
    let report = node.report();
    assert_eq!(report["healthy"], true, "{report:#}");
    assert_eq!(report["node_id"], node.node_id.as_str());
    let daemons = report["daemons"].as_array().unwrap();
    assert_eq!(daemons.len(), 4);
    for ((name, bus_name), d) in DAEMONS.iter().zip(daemons) {
        assert_eq!(d["name"], *name);
        assert_eq!(d["bus_name"], *bus_name);
        assert_eq!(d["running"], true, "{d}");
        assert_eq!(d["health"], "ok", "{d}");
        assert_eq!(d["restarts"], 0, "{d}");
        assert!(process_alive(pid_of(d)), "{name} pid is not a live process");
    }

    // The printed bus address works with the standard tool, and shows documented
    // interfaces.
    let names = busctl(&node.bus_address, &["list", "--no-pager"]);
    for (_, bus_name) in DAEMONS {
        assert!(
            names.contains(bus_name),
            "busctl list lacks {bus_name}:\n{names}"
        );
    }
    let intro = busctl(
        &node.bus_address,
        &[
            "introspect",
            "--no-pager",
            "org.atoll.Vmm1",
            "/org/atoll/Vmm1",
        ],
    );
    assert!(
        intro.contains(".Health") && intro.contains(".NodeId"),
        "{intro}"
    );
    let xml = busctl(
        &node.bus_address,
        &[
            "introspect",
            "--xml-interface",
            "org.atoll.Storage1",
            "/org/atoll/Storage1",
        ],
    );
    assert!(
        xml.contains("io_uring"),
        "Storage1 introspection has no documentation:\n{xml}"
    );

    // The web page and its security headers.
    let page = node.get("/");
    assert!(page.status().is_success());
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert!(page.headers()["strict-transport-security"]
        .to_str()
        .unwrap()
        .contains("max-age"));
    assert!(page.text().unwrap().contains("<title>Atoll"));
    let missing = node.get("/api/v1/nothing-here");
    assert_eq!(missing.status(), 404);
    assert!(missing.json::<Value>().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("/api/v1/nothing-here"));

    // SIGTERM: every daemon stops, the bus socket goes, the lock is released.
    let pids: Vec<u32> = daemons.iter().map(pid_of).collect();
    let data_dir = node.data_dir.clone();
    let password = node.admin_password.clone();
    let cert = std::fs::read(data_dir.join("mgmtd/tls/cert.pem")).unwrap();
    let mut node = node;
    let status = node.stop();
    assert!(status.success(), "atoll up exited with {status}");
    for pid in pids {
        assert!(!process_alive(pid), "daemon {pid} outlived atoll up");
    }
    assert!(
        !data_dir.join("run/bus.sock").exists(),
        "bus socket left behind"
    );

    // The same data dir starts again with the same identity, password and certificate.
    let mut again =
        Node::start_in(&data_dir, &["--port", "0"]).unwrap_or_else(|f| panic!("{}", f.stderr));
    assert_eq!(again.admin_password, password);
    assert_eq!(
        std::fs::read(data_dir.join("mgmtd/tls/cert.pem")).unwrap(),
        cert
    );
    assert_eq!(again.report()["healthy"], true);
    assert!(again.stop().success());
}

#[test]
fn killed_daemons_are_restarted_and_counted() {
    let node = Node::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let conn = rt
        .block_on(
            zbus::connection::Builder::address(node.bus_address.as_str())
                .unwrap()
                .build(),
        )
        .unwrap();
    let dbus = rt.block_on(zbus::fdo::DBusProxy::new(&conn)).unwrap();

    for (name, bus_name) in [("netd", "org.atoll.Net1"), ("mgmtd", "org.atoll.Manager1")] {
        let before = node.daemon(name);
        let old_pid = pid_of(&before);
        let mut changes = rt.block_on(dbus.receive_name_owner_changed()).unwrap();
        kill(
            Pid::from_raw(i32::try_from(old_pid).unwrap()),
            Signal::SIGKILL,
        )
        .unwrap();
        // Wait for the event: a new owner of the daemon's name.
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(signal) = changes.next().await {
                    let args = signal.args().unwrap();
                    if args.name() == bus_name && args.new_owner().is_some() {
                        return;
                    }
                }
                panic!("bus closed");
            })
            .await
            .unwrap_or_else(|_| panic!("{bus_name} was not re-owned within 10 s"))
        });
        // mgmtd serves again on the same port: the supervisor kept the socket.
        let after = node.daemon(name);
        assert_ne!(pid_of(&after), old_pid, "{after}");
        assert_eq!(after["restarts"], 1, "{after}");
        assert_eq!(
            after["last_exit"], "killed by signal 9 (SIGKILL)",
            "{after}"
        );
        assert_eq!(after["running"], true);
        assert!(
            node.log().contains(&format!("daemon=\"{name}\"")),
            "restart not logged"
        );
    }
    let report = node.report();
    assert_eq!(report["healthy"], true, "{report:#}");
    let restarts: Vec<u64> = report["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["restarts"].as_u64().unwrap())
        .collect();
    assert_eq!(restarts, [0, 1, 0, 1]);
}

#[test]
fn daemons_die_with_a_killed_supervisor_and_the_node_starts_again() {
    let mut node = Node::start();
    let pids: Vec<u32> = node.report()["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .map(pid_of)
        .collect();
    let data_dir = node.data_dir.clone();
    node.kill();
    for pid in &pids {
        wait_until(
            &format!("daemon {pid} to die with the supervisor"),
            Duration::from_secs(10),
            || (!process_alive(*pid)).then_some(()),
        );
    }
    // The stale socket and lock of the killed instance do not block a new start.
    let mut again =
        Node::start_in(&data_dir, &["--port", "0"]).unwrap_or_else(|f| panic!("{}", f.stderr));
    assert_eq!(again.report()["healthy"], true);
    assert!(again.stop().success());
}

#[test]
fn bad_input_exits_with_one_clear_line_and_damages_nothing() {
    let err = fails_with_one_line(&["up", "--frobnicate"]);
    assert!(err.contains("--frobnicate"), "{err}");
    let err = fails_with_one_line(&["frobnicate"]);
    assert!(err.contains("frobnicate"), "{err}");
    let err = fails_with_one_line(&["up", "--port", "99999"]);
    assert!(err.contains("99999"), "{err}");
    let err = fails_with_one_line(&["up", "--log-level", "loud", "--data-dir", "/proc/atoll"]);
    assert!(err.contains("--log-level"), "{err}");

    // Unwritable data directories (root ignores permission bits, so use places no
    // one can write).
    let err = fails_with_one_line(&["up", "--data-dir", "/proc/atoll", "--port", "0"]);
    assert!(
        err.contains("cannot use data directory /proc/atoll"),
        "{err}"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = fails_with_one_line(&[
        "up",
        "--data-dir",
        file.path().to_str().unwrap(),
        "--port",
        "0",
    ]);
    assert!(err.contains("cannot use data directory"), "{err}");

    // A running node: a second instance on its data dir and another on its port are
    // refused, and neither touches a byte of the data dir.
    let mut node = Node::start();
    let dir = node.data_dir.to_str().unwrap().to_owned();
    let before = snapshot(&node.data_dir);
    let err = fails_with_one_line(&["up", "--data-dir", &dir, "--port", "0"]);
    assert!(err.contains("in use by another atoll"), "{err}");
    assert!(err.contains(&format!("pid {}", node.pid())), "{err}");

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().join("data");
    let err = fails_with_one_line(&[
        "up",
        "--data-dir",
        other_dir.to_str().unwrap(),
        "--port",
        &port,
    ]);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("already in use"),
        "{err}"
    );

    assert_eq!(
        snapshot(&node.data_dir).keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &before {
        // SQLite's WAL and shared-memory files belong to the running mgmtd.
        if path.ends_with("-wal") || path.ends_with("-shm") {
            continue;
        }
        assert_eq!(&std::fs::read(path).unwrap(), bytes, "{path} changed");
    }
    assert_eq!(
        node.report()["healthy"],
        true,
        "the running node was disturbed"
    );
    assert!(node.stop().success());
}

#[test]
fn web_ui_shows_the_daemons_in_a_real_browser() {
    let mut node = Node::start();
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--ignore-certificate-errors",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&node.url)
        .output()
        .expect("run chromium (Debian package chromium; .ci/run installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page did not render the report:\n{dom}"
    );
    for (name, bus_name) in DAEMONS {
        assert!(
            dom.contains(&format!("data-daemon=\"{name}\"")),
            "no row for {name}:\n{dom}"
        );
        assert!(dom.contains(bus_name), "{dom}");
    }
    assert!(dom.contains(&node.node_id));
    assert!(dom.contains(">healthy<"), "{dom}");
    assert!(node.stop().success());
}
