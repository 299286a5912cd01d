//! `stord` keeps the daemon contract on a real (private) D-Bus broker.

use atoll_tests::contract::{check, DaemonSpec};

#[test]
fn stord_keeps_the_dbus_contract() {
    check(&DaemonSpec {
        bin: env!("CARGO_BIN_EXE_stord").into(),
        args: &[],
        bus_name: stord::BUS_NAME,
        path: stord::OBJECT_PATH,
        version: stord::VERSION,
        object_manager: true,
    });
}
