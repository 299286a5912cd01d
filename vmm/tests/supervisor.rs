//! `vmm daemon` on a real D-Bus broker: CreateVm, VM objects and their
//! lifecycle, state signals, restart after a guest reset, failed starts, and
//! VMs that outlive a killed supervisor and are re-adopted by the next one.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use atoll_tests::contract::wait_owner;
use atoll_tests::{process_alive, wait_until, TestBus};
use futures_util::StreamExt;
use vmm::{VmProxy, Vmm1Proxy};
use zbus::zvariant::OwnedObjectPath;

/// Kills every VM process started under `dir` when the test ends, passed or
/// not (VM processes outlive their supervisor by design).
struct Reaper(std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains(&needle) && cmd.contains("run") {
                // SAFETY: kill(2) on a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn daemon(bus: &TestBus, state: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["daemon", "--node-id", "n1", "--bus", bus.address()])
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

async fn connect(bus: &TestBus) -> zbus::Connection {
    let conn = zbus::connection::Builder::address(bus.address())
        .unwrap()
        .build()
        .await
        .unwrap();
    wait_owner(&conn, vmm::BUS_NAME, true).await;
    conn
}

fn spin_config(name: &str) -> String {
    serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 32,
        "boot": {"kernel": common::guest("spin")},
        "rng": true,
    })
    .to_string()
}

/// A proxy reading properties afresh (a cached proxy may answer from before
/// the PropertiesChanged that preceded a method's reply was processed).
async fn vm<'a>(conn: &zbus::Connection, path: &'a OwnedObjectPath) -> VmProxy<'a> {
    VmProxy::builder(conn)
        .path(path.as_ref())
        .unwrap()
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

/// Waits for a StateChanged signal announcing `state`.
async fn until_state(v: &VmProxy<'_>, state: &str) -> String {
    let mut sig = v.receive_vm_state_changed().await.unwrap();
    if v.state().await.unwrap() == state {
        return v.exit_reason().await.unwrap();
    }
    let wait = async {
        loop {
            let s = sig.next().await.unwrap();
            let a = s.args().unwrap();
            if a.state == state {
                return a.exit_reason.clone();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("VM never became {state}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_survives_a_supervisor_restart() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = Reaper(dir.path().to_owned());
    let state = dir.path().join("state");
    let bus = TestBus::start();
    let mut d = daemon(&bus, &state);
    let conn = connect(&bus).await;
    let vmm = Vmm1Proxy::new(&conn).await.unwrap();

    let path = vmm.create_vm(&spin_config("spinner")).await.unwrap();
    let v = vm(&conn, &path).await;
    assert_eq!(v.name().await.unwrap(), "spinner");
    assert_eq!(v.state().await.unwrap(), "stopped");
    assert_eq!(v.memory_mib().await.unwrap(), 32);
    let err = vmm.create_vm("{\"memory_mib\": 1}").await.unwrap_err();
    assert!(err.to_string().contains("InvalidConfig"), "{err}");

    v.start().await.unwrap();
    assert_eq!(v.state().await.unwrap(), "running");
    let pid = v.pid().await.unwrap();
    assert!(pid > 0 && process_alive(pid));
    assert_eq!(v.boots().await.unwrap(), 1);
    let devices = v.devices().await.unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    let (slot, kind, dev_state, counters) = &devices[0];
    assert_eq!(
        (*slot, kind.as_str(), dev_state.as_str()),
        (1, "virtio-rng", "idle")
    );
    assert_eq!(counters.get("activations"), Some(&0), "{counters:?}");
    let again = v.start().await.unwrap_err();
    assert!(again.to_string().contains("InvalidState"), "{again}");

    v.pause().await.unwrap();
    assert_eq!(v.state().await.unwrap(), "paused");
    v.resume().await.unwrap();
    assert_eq!(v.state().await.unwrap(), "running");
    let busy = v.delete().await.unwrap_err();
    assert!(busy.to_string().contains("InvalidState"), "{busy}");

    // The supervisor dies; the VM does not.
    d.kill().unwrap();
    d.wait().unwrap();
    assert!(process_alive(pid), "the VM process outlives its supervisor");
    wait_owner(&conn, vmm::BUS_NAME, false).await;
    let mut d = daemon(&bus, &state);
    wait_owner(&conn, vmm::BUS_NAME, true).await;
    let v = vm(&conn, &path).await;
    assert_eq!(v.state().await.unwrap(), "running", "re-adopted");
    assert_eq!(v.pid().await.unwrap(), pid);

    let stop = v.stop();
    let (stopped, r) = tokio::join!(until_state(&v, "stopped"), stop);
    r.unwrap();
    assert_eq!(stopped, "stopped");
    wait_until("the VM process to end", Duration::from_secs(10), || {
        (!process_alive(pid)).then_some(())
    });
    assert_eq!(v.pid().await.unwrap(), 0);

    v.delete().await.unwrap();
    assert!(v.state().await.is_err(), "the object is gone");
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "and its files"
    );
    d.kill().unwrap();
    d.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reset_restarts_and_bad_kernels_report_why() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = Reaper(dir.path().to_owned());
    let bus = TestBus::start();
    let mut d = daemon(&bus, &dir.path().join("state"));
    let conn = connect(&bus).await;
    let vmm = Vmm1Proxy::new(&conn).await.unwrap();

    // A guest that resets at once is restarted each time (a reboot).
    let cfg = serde_json::json!({
        "memory_mib": 32, "boot": {"kernel": common::guest("reset")},
    });
    let path = vmm.create_vm(&cfg.to_string()).await.unwrap();
    let v = vm(&conn, &path).await;
    let mut changes = v.receive_vm_state_changed().await.unwrap();
    v.start().await.unwrap();
    // Each reset ends a process with reason "reset" and starts the next.
    let wait = async {
        let mut saw_reset = false;
        loop {
            let s = changes.next().await.unwrap();
            let a = s.args().unwrap();
            saw_reset |= a.state == "starting" && a.exit_reason == "reset";
            if saw_reset && v.boots().await.unwrap() >= 3 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("restarts after resets");
    // Stop lands between two boots or on a running one; either way it ends
    // and no restart follows.
    let stop = v.stop();
    let (reason, r) = tokio::join!(until_state(&v, "stopped"), stop);
    r.unwrap();
    assert!(reason == "reset" || reason == "stopped", "{reason}");
    let boots = v.boots().await.unwrap();
    assert_eq!(v.state().await.unwrap(), "stopped");
    assert_eq!(v.boots().await.unwrap(), boots, "no restart after Stop");

    // A kernel that is not one: Start fails and says why.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"nope").unwrap();
    let cfg = serde_json::json!({"memory_mib": 32, "boot": {"kernel": junk}});
    let path = vmm.create_vm(&cfg.to_string()).await.unwrap();
    let v = vm(&conn, &path).await;
    let err = v.start().await.unwrap_err().to_string();
    assert!(err.contains("not a bootable kernel"), "{err}");
    assert_eq!(v.state().await.unwrap(), "crashed");
    assert!(v
        .exit_reason()
        .await
        .unwrap()
        .contains("not a bootable kernel"));
    d.kill().unwrap();
    d.wait().unwrap();
}
