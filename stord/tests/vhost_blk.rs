//! stord's vhost-user-blk backend driven through a real frontend (`blkio`), as a VM
//! would: I/O round trips, flush, discard, bounds, read-only, reconnect, several
//! queues, and malformed vhost-user traffic.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use common::{pattern, Frontend};
use stord::disk::Disk;
use stord::qos::{Limiter, QosSpec};
use stord::vhost_blk::Attachment;
use stord::volume::Volume;

const MIB: u64 = 1 << 20;

fn attach(dir: &Path, name: &str, size: u64, read_only: bool, queues: usize) -> Attachment {
    let path = dir.join(format!("{name}.vol"));
    if !path.exists() {
        drop(Volume::create(&path, size).unwrap());
    }
    let disk = Arc::new(Disk::from_volume(Volume::open(&path, read_only).unwrap()));
    let limiter = Limiter::new(QosSpec::default());
    Attachment::start(
        &dir.join(format!("{name}.sock")),
        disk,
        read_only,
        queues,
        name,
        limiter,
    )
    .unwrap()
}

#[test]
fn patterns_round_trip_and_capacity_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "a", 64 * MIB, false, 1);
    let mut fe = Frontend::connect(att.socket(), 1).unwrap();
    assert_eq!(fe.capacity(), 64 * MIB);
    assert!(!fe.read_only());
    let cases: [(u64, usize); 5] = [
        (0, 4096),
        (4096 * 7, 512),
        (MIB, 128 << 10),
        (33 * MIB + 512, 1536),
        (64 * MIB - 4096, 4096),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        assert_eq!(
            fe.write(off, &pattern(i as u64, len)),
            0,
            "write {off}+{len}"
        );
    }
    assert_eq!(fe.flush(), 0);
    for (i, &(off, len)) in cases.iter().enumerate() {
        assert_eq!(
            fe.read(off, len).unwrap(),
            pattern(i as u64, len),
            "read {off}+{len}"
        );
    }
    // Never-written space reads as zeros.
    assert!(fe.read(10 * MIB, 64 << 10).unwrap().iter().all(|&b| b == 0));
    assert!(
        att.counters()
            .write_ops
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 5
    );
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "d", 16 * MIB, false, 1);
    let mut fe = Frontend::connect(att.socket(), 1).unwrap();
    assert_eq!(fe.write(0, &pattern(1, 1 << 20)), 0);
    assert_eq!(fe.write(2 * MIB, &pattern(2, 1 << 20)), 0);
    assert_eq!(fe.discard(0, 512 << 10), 0);
    assert_eq!(fe.write_zeroes(2 * MIB + 4096, 8192), 0);
    let a = fe.read(0, 1 << 20).unwrap();
    assert!(a[..512 << 10].iter().all(|&b| b == 0));
    assert_eq!(&a[512 << 10..], &pattern(1, 1 << 20)[512 << 10..]);
    let b = fe.read(2 * MIB, 1 << 20).unwrap();
    let mut want = pattern(2, 1 << 20);
    want[4096..4096 + 8192].fill(0);
    assert_eq!(b, want);
}

#[test]
fn requests_past_the_end_fail_and_the_device_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "e", 4 * MIB, false, 1);
    let mut fe = Frontend::connect(att.socket(), 1).unwrap();
    assert_ne!(fe.write(4 * MIB - 4096, &pattern(3, 8192)), 0);
    assert!(fe.read(4 * MIB, 4096).is_err());
    assert_ne!(fe.discard(4 * MIB - 512, 4096), 0);
    // Nothing was written by the failed request.
    assert!(fe
        .read(4 * MIB - 4096, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(fe.write(0, &pattern(4, 4096)), 0);
    assert_eq!(fe.read(0, 4096).unwrap(), pattern(4, 4096));
}

#[test]
fn read_only_attachment_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let rw = attach(dir.path(), "r", 4 * MIB, false, 1);
    let mut fe = Frontend::connect(rw.socket(), 1).unwrap();
    assert_eq!(fe.write(0, &pattern(5, 4096)), 0);
    assert_eq!(fe.flush(), 0);
    drop(fe);
    rw.detach();
    let ro = attach(dir.path(), "r", 4 * MIB, true, 1);
    // A frontend that wants to write is turned away: the device is read-only.
    let err = Frontend::connect(ro.socket(), 1)
        .err()
        .expect("read-write connect must fail");
    assert!(err.message().contains("read-only"), "{}", err.message());
    let mut fe = Frontend::connect_with(ro.socket(), 1, true).unwrap();
    assert!(fe.read_only());
    assert_ne!(fe.write(0, &pattern(6, 4096)), 0);
    assert_eq!(fe.read(0, 4096).unwrap(), pattern(5, 4096));
}

#[test]
fn a_reconnecting_frontend_finds_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "c", 8 * MIB, false, 2);
    for round in 0..3u64 {
        let mut fe = Frontend::connect(att.socket(), 2).unwrap();
        if round > 0 {
            assert_eq!(
                fe.read(round * MIB, 4096).unwrap(),
                pattern(round - 1, 4096),
                "round {round}"
            );
        }
        assert_eq!(fe.write((round + 1) * MIB, &pattern(round, 4096)), 0);
        assert_eq!(fe.flush(), 0);
    }
    assert_eq!(att.connections(), 3);
}

#[test]
fn a_frontend_vanishing_with_requests_in_flight_leaves_the_device_working() {
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "v", 8 * MIB, false, 1);
    for round in 0..5u64 {
        let mut fe = Frontend::connect(att.socket(), 1).unwrap();
        // Requests the next connection must be able to rely on.
        assert_eq!(fe.write(round * 4096, &pattern(round, 4096)), 0);
        assert_eq!(fe.flush(), 0);
        // 32 writes left in flight as the frontend goes away (its memory with it).
        for slot in 0..32usize {
            fe.submit_write(slot, MIB + slot as u64 * 4096, &pattern(100 + round, 4096));
        }
        let _ = fe.reap(0, std::time::Duration::ZERO);
        drop(fe);
    }
    let mut fe = Frontend::connect(att.socket(), 1).unwrap();
    for round in 0..5u64 {
        assert_eq!(fe.read(round * 4096, 4096).unwrap(), pattern(round, 4096));
    }
    // The in-flight writes either landed whole or not at all.
    for slot in 0..32u64 {
        let got = fe.read(MIB + slot * 4096, 4096).unwrap();
        assert!(
            got == vec![0; 4096] || (0..5).any(|r| got == pattern(100 + r, 4096)),
            "block {slot} holds torn data"
        );
    }
    assert_eq!(att.connections(), 6);
}

#[test]
fn every_queue_serves_io() {
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "q", 8 * MIB, false, 4);
    let mut fe = Frontend::connect(att.socket(), 4).unwrap();
    for q in 0..4 {
        assert_eq!(
            fe.write_on(q, q as u64 * MIB, &pattern(10 + q as u64, 64 << 10)),
            0
        );
    }
    for q in 0..4 {
        assert_eq!(
            fe.read_on((q + 1) % 4, q as u64 * MIB, 64 << 10).unwrap(),
            pattern(10 + q as u64, 64 << 10)
        );
    }
}

#[test]
fn malformed_vhost_user_messages_drop_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "m", 4 * MIB, false, 1);
    let other = attach(dir.path(), "o", 4 * MIB, false, 1);
    let mut busy = Frontend::connect(other.socket(), 1).unwrap();
    assert_eq!(busy.write(0, &pattern(7, 4096)), 0);

    let garbage: [&[u8]; 4] = [
        // Header of an unknown request with a payload size far over the limit.
        &[0xff, 0, 0, 0, 0x01, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f],
        // Truncated header.
        &[1, 0, 0],
        // GET_FEATURES with a wrong version flag.
        &[1, 0, 0, 0, 0x07, 0, 0, 0, 0, 0, 0, 0],
        // SET_MEM_TABLE claiming regions but sending no file descriptors.
        &[
            5, 0, 0, 0, 0x01, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ];
    for (i, g) in garbage.iter().enumerate() {
        let mut s = UnixStream::connect(att.socket()).unwrap();
        let _ = s.write_all(g);
        // Half-close: a truncated message is all there will ever be.
        let _ = s.shutdown(std::net::Shutdown::Write);
        // The backend must hang up on us, not wait forever or crash.
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        let r = std::io::Read::read(&mut s, &mut buf);
        let hung_up = matches!(&r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        assert!(hung_up, "garbage #{i}: backend answered {r:?}");
    }
    // The attachment accepts a real frontend afterwards, and the other volume never
    // noticed.
    let mut fe = Frontend::connect(att.socket(), 1).unwrap();
    assert_eq!(fe.write(0, &pattern(8, 4096)), 0);
    assert_eq!(fe.read(0, 4096).unwrap(), pattern(8, 4096));
    assert_eq!(busy.read(0, 4096).unwrap(), pattern(7, 4096));
}

/// A frontend that maps a new buffer region while the queue worker is busy
/// with its requests, and at once makes a request into it: the region was
/// acknowledged before the request naming it was made, so the request works
/// (the worker must not keep serving with the memory it started with).
#[test]
fn a_region_mapped_while_the_queue_is_served_is_usable_at_once() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let att = attach(dir.path(), "m", 4 * MIB, false, 1);
    let mut fe = Frontend::connect(att.socket(), 1).unwrap();
    const WRITES: usize = 32;
    for round in 0..60u64 {
        // Writes to blocks 0..32 from the current region, submitted.
        for slot in 0..WRITES {
            let block = slot as u64;
            fe.submit_write(slot, block * 4096, &pattern(round << 8 | block, 4096));
        }
        let mut done = fe.submit();
        // A new region, and a read into it of block 40 (written by the
        // previous round, so no request in flight touches it).
        let old = fe.remap().unwrap();
        fe.submit_read(WRITES, 40 * 4096, 4096);
        done.extend(fe.reap(WRITES + 1 - done.len(), Duration::from_secs(10)));
        assert_eq!(
            done.len(),
            WRITES + 1,
            "round {round}: requests did not complete"
        );
        let read = done.iter().find(|(tag, _)| *tag == WRITES).unwrap();
        assert_eq!(
            read.1, 0,
            "round {round}: the read into the new region failed"
        );
        if round > 0 {
            assert_eq!(
                fe.slot(WRITES, 4096),
                pattern(round - 1, 4096),
                "round {round}"
            );
        }
        assert!(done.iter().all(|(_, r)| *r == 0), "round {round}: {done:?}");
        fe.release(&old);
        // Block 40 for the next round, from the new region.
        assert_eq!(fe.write(40 * 4096, &pattern(round, 4096)), 0);
    }
}
