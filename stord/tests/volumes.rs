//! The `stord` binary on a real D-Bus broker: the volume lifecycle an operator (via
//! mgmtd) drives, with I/O through the sockets it hands out, across a restart.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{error_name, pattern, Frontend, Rig};
use stord::Storage1Proxy;

const MIB: u64 = 1 << 20;

fn stop(mut child: std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn volume_lifecycle_over_dbus_survives_a_restart() {
    let rig = Rig::new();
    let (rt, conn) = (&rig.rt, &rig.conn);
    let _guard = rt.enter();
    let daemon = rig.spawn_stord();
    let storage = rt.block_on(Storage1Proxy::new(conn)).unwrap();

    // Bad requests get precise errors and change nothing.
    let e = error_name(
        rt.block_on(storage.create_volume("bad/name", MIB))
            .unwrap_err(),
    );
    assert!(
        e.starts_with("org.atoll.Storage1.Error.InvalidArgument: invalid name"),
        "{e}"
    );
    let e = error_name(rt.block_on(storage.create_volume("odd", 1000)).unwrap_err());
    assert!(e.contains("InvalidArgument") && e.contains("1000"), "{e}");

    let path = rt
        .block_on(storage.create_volume("disk0", 64 * MIB))
        .unwrap();
    let e = error_name(
        rt.block_on(storage.create_volume("disk0", MIB))
            .unwrap_err(),
    );
    assert!(e.contains("already taken"), "{e}");
    let vol = rig.volume(&path);
    assert_eq!(rt.block_on(vol.name()).unwrap(), "disk0");
    assert_eq!(rt.block_on(vol.size()).unwrap(), 64 * MIB);
    let used_empty = rt.block_on(vol.used()).unwrap();
    assert!(
        used_empty < MIB,
        "a new thin volume uses {used_empty} bytes"
    );

    // Attach, write through the socket, and see the space grow.
    let socket = rt.block_on(vol.attach(false)).unwrap();
    assert_eq!(
        rt.block_on(vol.attachments()).unwrap(),
        vec![(socket.clone(), false)]
    );
    let mut fe = Frontend::connect(Path::new(&socket), 2).unwrap();
    assert_eq!(fe.capacity(), 64 * MIB);
    assert_eq!(fe.write(5 * MIB, &pattern(1, 1 << 20)), 0);
    assert_eq!(fe.flush(), 0);
    assert!(rt.block_on(vol.used()).unwrap() >= used_empty + MIB);
    let c = rt.block_on(vol.io_counters()).unwrap();
    assert_eq!(c["write_bytes"], MIB, "{c:?}");
    assert_eq!((c["flush_ops"], c["errors"]), (1, 0), "{c:?}");

    // One writer at a time; no delete under a VM.
    for e in [
        rt.block_on(vol.attach(false)).unwrap_err(),
        rt.block_on(vol.attach(true)).unwrap_err(),
    ] {
        assert!(error_name(e).starts_with("org.atoll.Storage1.Error.Busy"));
    }
    assert!(error_name(rt.block_on(vol.delete()).unwrap_err()).contains("Busy"));
    let e = error_name(rt.block_on(vol.detach("/nowhere.sock")).unwrap_err());
    assert!(e.starts_with("org.atoll.Storage1.Error.NotFound"), "{e}");

    // Detach cuts a connected frontend off instead of waiting for it to leave (the
    // frontend is still alive here; a detach that waited would hit the D-Bus timeout).
    rt.block_on(vol.detach(&socket)).unwrap();
    drop(fe);
    assert!(rt.block_on(vol.attachments()).unwrap().is_empty());
    assert!(!Path::new(&socket).exists(), "socket left after detach");

    // Restart: the volume and its data are still there.
    stop(daemon);
    let daemon = rig.spawn_stord();
    let objects = rig.volume_paths();
    assert!(
        objects.contains(&path),
        "volume missing after restart: {objects:?}"
    );
    let vol = rig.volume(&path);
    rt.block_on(vol.resize(96 * MIB)).unwrap();
    let e = error_name(rt.block_on(vol.resize(MIB)).unwrap_err());
    assert!(e.contains("shrinking"), "{e}");
    let socket = rt.block_on(vol.attach(true)).unwrap();
    let mut fe = Frontend::connect_with(Path::new(&socket), 1, true).unwrap();
    assert_eq!(fe.capacity(), 96 * MIB);
    assert_eq!(fe.read(5 * MIB, 1 << 20).unwrap(), pattern(1, 1 << 20));
    // Online resize: the attached volume grows; the frontend sees the new
    // capacity when it reads the configuration again (here: on reconnect).
    rt.block_on(vol.resize(128 * MIB)).unwrap();
    assert_eq!(rt.block_on(vol.size()).unwrap(), 128 * MIB);
    drop(fe);
    let mut fe = Frontend::connect_with(Path::new(&socket), 1, true).unwrap();
    assert_eq!(fe.capacity(), 128 * MIB);
    assert_eq!(fe.read(5 * MIB, 1 << 20).unwrap(), pattern(1, 1 << 20));
    assert_eq!(fe.read(127 * MIB, 4096).unwrap(), vec![0; 4096]);
    drop(fe);
    rt.block_on(vol.detach(&socket)).unwrap();

    rt.block_on(vol.delete()).unwrap();
    let objects = rig.volume_paths();
    assert!(!objects.contains(&path));
    for sub in ["pool/volumes", "pool/layers"] {
        let left: Vec<_> = std::fs::read_dir(rig.dir.path().join(sub))
            .unwrap()
            .collect();
        assert!(
            left.is_empty(),
            "files left in {sub} after delete: {left:?}"
        );
    }
    stop(daemon);
}
