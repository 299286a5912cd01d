//! `mgmtd` keeps the daemon contract on a real (private) D-Bus broker.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use atoll_tests::contract::{check, DaemonSpec};

#[test]
fn mgmtd_keeps_the_dbus_contract() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("mgmtd");
    let data_dir = data_dir.to_str().unwrap();
    check(&DaemonSpec {
        bin: env!("CARGO_BIN_EXE_mgmtd").into(),
        args: &["--data-dir", data_dir, "--listen", "127.0.0.1:0"],
        bus_name: mgmtd::dbus::MANAGER_BUS_NAME,
        path: mgmtd::dbus::MANAGER_PATH,
        version: mgmtd::VERSION,
        object_manager: false,
        conflict: None,
    });
}
