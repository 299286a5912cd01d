//! `vmm daemon` keeps the daemon contract on a real (private) D-Bus broker.

use atoll_tests::contract::{check, DaemonSpec};

#[test]
fn vmm_daemon_keeps_the_dbus_contract() {
    check(&DaemonSpec {
        bin: env!("CARGO_BIN_EXE_vmm").into(),
        args: &["daemon"],
        bus_name: vmm::BUS_NAME,
        path: vmm::OBJECT_PATH,
        version: vmm::VERSION,
        object_manager: true,
        conflict: None,
    });
}
