//! `stord` keeps the daemon contract on a real (private) D-Bus broker.

#![allow(clippy::unwrap_used)]

use atoll_tests::contract::{check, DaemonSpec};

#[test]
fn stord_keeps_the_dbus_contract() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let run = dir.path().join("run");
    check(&DaemonSpec {
        bin: env!("CARGO_BIN_EXE_stord").into(),
        args: &[
            "--data-dir",
            pool.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ],
        bus_name: stord::BUS_NAME,
        path: stord::OBJECT_PATH,
        version: stord::VERSION,
        object_manager: true,
        conflict: Some("is in use by another stord"),
    });
}
