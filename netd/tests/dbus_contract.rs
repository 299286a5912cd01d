//! `netd` keeps the daemon contract on a real (private) D-Bus broker.

use atoll_tests::contract::{check, DaemonSpec};

#[test]
fn netd_keeps_the_dbus_contract() {
    check(&DaemonSpec {
        bin: env!("CARGO_BIN_EXE_netd").into(),
        args: &[],
        bus_name: netd::BUS_NAME,
        path: netd::OBJECT_PATH,
        version: netd::VERSION,
        object_manager: true,
        conflict: None,
    });
}
