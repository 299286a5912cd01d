//! Image import and export (raw, qcow2) as D-Bus jobs on the `stord` binary,
//! checked byte for byte through a vhost-user-blk frontend and against
//! `qemu-img` (compare, check), plus the ways an operator can get it wrong.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{error_name, pattern, Frontend, Rig};
use futures_util::StreamExt;
use stord::{JobProxy, Storage1Proxy};
use zbus::zvariant::OwnedObjectPath;

const MIB: u64 = 1 << 20;

/// A raw image of 8 MiB + 1536 bytes with data at scattered places and holes.
fn raw_image(path: &Path) -> Vec<u8> {
    let size = 8 * MIB as usize + 1536;
    let mut model = vec![0u8; size];
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size as u64).unwrap();
    for (i, &(off, len)) in [
        (0usize, 4096usize),
        (70_000, 100_000),
        (3 << 20, 1 << 20),
        (size - 3000, 3000),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(i as u64 + 7, len);
        f.write_all_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    model
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

/// Waits (on PropertiesChanged, no polling) until the job leaves `running`.
fn finish(rig: &Rig, path: &OwnedObjectPath) -> JobProxy<'static> {
    // Uncached, and listening before the first read: a job that ends
    // between the read and the subscription cannot be missed.
    let job = rig
        .block_on(
            JobProxy::builder(&rig.conn)
                .path(path.clone())
                .unwrap()
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build(),
        )
        .unwrap();
    let props = rig
        .block_on(
            zbus::fdo::PropertiesProxy::builder(&rig.conn)
                .destination("org.atoll.Storage1")
                .unwrap()
                .path(path.clone())
                .unwrap()
                .build(),
        )
        .unwrap();
    rig.block_on(async {
        let mut changes = props.receive_properties_changed().await.unwrap();
        let ended = async {
            while job.state().await.unwrap() == "running" {
                changes.next().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(120), ended)
            .await
            .expect("the job ends");
    });
    job
}

fn read_all(rig: &Rig, vol: &OwnedObjectPath, len: usize) -> Vec<u8> {
    let v = rig.volume(vol);
    let socket = rig.block_on(v.attach(true)).unwrap();
    let mut fe = Frontend::connect_with(Path::new(&socket), 1, true).unwrap();
    let mut out = Vec::new();
    while out.len() < len {
        let n = (len - out.len()).min(MIB as usize);
        out.extend(fe.read(out.len() as u64, n).unwrap());
    }
    drop(fe);
    rig.block_on(v.detach(&socket)).unwrap();
    out
}

fn padded(model: &[u8]) -> Vec<u8> {
    let mut m = model.to_vec();
    m.resize(model.len().div_ceil(512) * 512, 0);
    m
}

#[test]
fn images_import_and_export_as_jobs() {
    let rig = Rig::new();
    let _guard = rig.rt.enter();
    let mut daemon = rig.spawn_stord();
    let storage = rig.block_on(Storage1Proxy::new(&rig.conn)).unwrap();
    let d = rig.dir.path();
    let raw = d.join("src.raw");
    let model = raw_image(&raw);
    let want = padded(&model);
    let qcow = d.join("src.qcow2");
    let out = qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");

    // Raw (detected) and compressed qcow2 import to the same bytes.
    let mut volumes = Vec::new();
    for (name, src, fmt) in [("from-raw", &raw, "auto"), ("from-qcow2", &qcow, "qcow2")] {
        let jpath = rig
            .block_on(storage.import_volume(name, src.to_str().unwrap(), fmt))
            .unwrap();
        let job = finish(&rig, &jpath);
        assert_eq!(
            rig.block_on(job.state()).unwrap(),
            "completed",
            "{}",
            rig.block_on(job.error()).unwrap()
        );
        assert_eq!(rig.block_on(job.kind()).unwrap(), "import");
        let done = rig.block_on(job.bytes_done()).unwrap();
        assert_eq!(done, rig.block_on(job.bytes_total()).unwrap());
        assert!(
            done > 0 && done < want.len() as u64,
            "{done} bytes moved: holes must be skipped"
        );
        let vol = rig.block_on(job.result()).unwrap();
        assert!(rig.volume_paths().contains(&vol));
        let v = rig.volume(&vol);
        assert_eq!(rig.block_on(v.size()).unwrap(), want.len() as u64);
        assert!(
            rig.block_on(v.used()).unwrap() < 4 * MIB,
            "import must stay thin"
        );
        assert!(
            read_all(&rig, &vol, want.len()) == want,
            "{name}: contents differ"
        );
        rig.block_on(job.dismiss()).unwrap();
        volumes.push(vol);
    }

    // Export as qcow2 and raw: qemu-img agrees with the source.
    let v = rig.volume(&volumes[1]);
    for (file, fmt) in [("out.qcow2", "qcow2"), ("out.raw", "raw")] {
        let dest = d.join(file);
        let job = finish(
            &rig,
            &rig.block_on(v.export(dest.to_str().unwrap(), fmt)).unwrap(),
        );
        assert_eq!(
            rig.block_on(job.state()).unwrap(),
            "completed",
            "{}",
            rig.block_on(job.error()).unwrap()
        );
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            fmt,
            raw.to_str().unwrap(),
            dest.to_str().unwrap(),
        ]);
        assert!(cmp.status.success(), "{fmt} export differs: {cmp:?}");
        assert!(!PathBuf::from(format!("{}.part", dest.display())).exists());
    }
    let check = qemu_img(&["check", d.join("out.qcow2").to_str().unwrap()]);
    assert!(check.status.success(), "{check:?}");

    // A snapshot exports as it was, whatever is written after it.
    let snap = rig.block_on(v.snapshot("before")).unwrap();
    let socket = rig.block_on(v.attach(false)).unwrap();
    let mut fe = Frontend::connect(Path::new(&socket), 1).unwrap();
    assert_eq!(fe.write(0, &[0xffu8; 4096]), 0);
    assert_eq!(fe.flush(), 0);
    let e = error_name(
        rig.block_on(v.export(d.join("busy.raw").to_str().unwrap(), "raw"))
            .unwrap_err(),
    );
    assert!(e.contains("Busy") && e.contains("snapshot"), "{e}");
    let snapshot = rig.snapshot(&snap);
    let dest = d.join("snap.raw");
    let job = finish(
        &rig,
        &rig.block_on(snapshot.export(dest.to_str().unwrap(), "raw"))
            .unwrap(),
    );
    assert_eq!(rig.block_on(job.state()).unwrap(), "completed");
    assert!(
        std::fs::read(&dest).unwrap() == want,
        "snapshot export differs"
    );
    drop(fe);
    rig.block_on(v.detach(&socket)).unwrap();

    // Bad input: precise errors, nothing left behind.
    let before = rig.volume_paths();
    let cases: [(&str, &str, &str); 4] = [
        ("missing", "/nonexistent/disk.img", "NotFound"),
        ("relative", "disk.img", "InvalidArgument"),
        ("dir", "/tmp", "InvalidArgument"),
        ("fmt", raw.to_str().unwrap(), "InvalidArgument"),
    ];
    for (name, src, err) in cases {
        let fmt = if name == "fmt" { "vmdk" } else { "auto" };
        let e = error_name(
            rig.block_on(storage.import_volume(name, src, fmt))
                .unwrap_err(),
        );
        assert!(e.contains(err), "{name}: {e}");
    }
    let junk = d.join("junk.qcow2");
    std::fs::write(&junk, b"QFI\xfb\0\0\0\x09garbage").unwrap();
    let e = error_name(
        rig.block_on(storage.import_volume("junk", junk.to_str().unwrap(), "auto"))
            .unwrap_err(),
    );
    assert!(e.contains("InvalidArgument") && e.contains("qcow2"), "{e}");
    // A qcow2 whose header is fine but whose data table points past the end:
    // the job fails and the half-made volume goes.
    let broken = d.join("broken.qcow2");
    std::fs::copy(&qcow, &broken).unwrap();
    let len = std::fs::metadata(&broken).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&broken)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let job = finish(
        &rig,
        &rig.block_on(storage.import_volume("broken", broken.to_str().unwrap(), "qcow2"))
            .unwrap(),
    );
    assert_eq!(rig.block_on(job.state()).unwrap(), "failed");
    assert!(!rig.block_on(job.error()).unwrap().is_empty());
    assert_eq!(rig.volume_paths(), before, "a failed import left a volume");
    let e = error_name(
        rig.block_on(v.export(d.join("x").to_str().unwrap(), "vhdx"))
            .unwrap_err(),
    );
    assert!(e.contains("InvalidArgument"), "{e}");
    let job = finish(
        &rig,
        &rig.block_on(v.export(raw.to_str().unwrap(), "raw"))
            .unwrap(),
    );
    assert_eq!(rig.block_on(job.state()).unwrap(), "failed");
    assert!(rig
        .block_on(job.error())
        .unwrap()
        .contains("already exists"));
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "an export overwrote a file"
    );

    // Cancel: a big import stops, undoes itself and says so.
    let big = d.join("big.raw");
    std::fs::write(&big, pattern(99, 128 * MIB as usize)).unwrap();
    let jpath = rig
        .block_on(storage.import_volume("big", big.to_str().unwrap(), "raw"))
        .unwrap();
    let job = rig
        .block_on(
            JobProxy::builder(&rig.conn)
                .path(jpath.clone())
                .unwrap()
                .build(),
        )
        .unwrap();
    rig.block_on(job.cancel()).unwrap();
    let job = finish(&rig, &jpath);
    assert_eq!(rig.block_on(job.state()).unwrap(), "cancelled");
    assert_eq!(
        rig.volume_paths(),
        before,
        "a cancelled import left a volume"
    );
    rig.block_on(storage.create_volume("big", MIB))
        .expect("the name of a cancelled import is free again");

    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
