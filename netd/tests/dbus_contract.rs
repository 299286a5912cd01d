//! `netd` keeps the daemon contract on a real (private) D-Bus broker.

#![allow(clippy::unwrap_used)]

use atoll_tests::contract::{check, DaemonSpec};

#[test]
fn netd_keeps_the_dbus_contract() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = dir.path().join("run");
    check(&DaemonSpec {
        bin: env!("CARGO_BIN_EXE_netd").into(),
        args: &[
            "--data-dir",
            data.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ],
        bus_name: netd::BUS_NAME,
        path: netd::OBJECT_PATH,
        version: netd::VERSION,
        object_manager: true,
        conflict: Some("is in use by another netd"),
    });
}
