//! vhost-user-blk benchmark: stord against qemu-storage-daemon, side by side in one
//! run, through the same frontend (the `blkio` crate, driver virtio-blk-vhost-user).
//!
//! ```sh
//! cargo bench -p stord --bench vhost_blk              # 3 reps x 3 s per figure
//! cargo bench -p stord --bench vhost_blk -- --reps 5 --secs 5 --only tmpfs
//! ```
//!
//! Scenarios: `tmpfs` (file in /dev/shm; qsd with aio=io_uring), `chain` (the same
//! file under three snapshot layers and an empty top, against the fresh volume;
//! `disk-chain` does the same on the O_DIRECT disk file),
//! `null` (no I/O:
//! the protocol path alone; qsd with null-co), `disk` (file on the root file system,
//! O_DIRECT; qsd with cache.direct=on,aio=native; fio io_uring O_DIRECT as the
//! limit, when fio is installed). Workloads: 4 KiB random read QD1 and QD32, 4 KiB
//! random write QD32, 128 KiB sequential read and write QD8, one queue. Each figure is
//! min/median/max over the reps; the backends take turns within every rep so they
//! share the machine's noise.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

const FILE_SIZE: u64 = 1 << 30;
const SERVE_ENV: &str = "ATOLL_BENCH_SERVE";

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
    qd: usize,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "4k randread QD1",
        write: false,
        random: true,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4k randread QD32",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "4k randwrite QD32",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "128k seqread QD8",
        write: false,
        random: false,
        bs: 128 << 10,
        qd: 8,
    },
    Workload {
        name: "128k seqwrite QD8",
        write: true,
        random: false,
        bs: 128 << 10,
        qd: 8,
    },
];

/// Result of one workload run: IOPS and median latency.
#[derive(Clone, Copy, Default)]
struct Sample {
    iops: f64,
    p50_us: f64,
}

/// A volume with three snapshots in its chain over `base_file`: three frozen
/// layers each holding 5 % of the volume as randomly placed 64 KiB extents, and
/// an empty top layer.
fn chain3(base_file: &Path) -> stord::disk::Disk {
    use std::sync::Arc;
    use stord::layer::Layer;
    let root = &base_file.with_file_name("atoll-bench-chain");
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root.join("base")).unwrap();
    std::os::unix::fs::symlink(base_file, root.join("base/data")).unwrap();
    let mut layers = vec![Arc::new(
        Layer::open(&root.join("base"), "base", false).unwrap(),
    )];
    let clusters = FILE_SIZE / 4096;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0x5au8; 64 << 10];
    for name in ["s1", "s2", "s3", "top"] {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        Layer::create(&dir, FILE_SIZE, true).unwrap();
        layers.push(Arc::new(Layer::open(&dir, name, true).unwrap()));
        if name == "top" {
            break;
        }
        let d = stord::disk::Disk::new(FILE_SIZE, layers.clone());
        let extents = clusters / 16;
        for _ in 0..extents / 20 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let iov = [stord::volume::IoSlice {
                ptr: buf.as_mut_ptr(),
                len: buf.len(),
            }];
            // SAFETY: `buf` outlives the call.
            unsafe {
                d.write_vectored(&iov, (rng % extents) * (64 << 10))
                    .unwrap()
            };
        }
        d.flush().unwrap();
    }
    stord::disk::Disk::new(FILE_SIZE, layers)
}

/// Serves `spec` (`null`, `chain3:<file>` or a file path) on `socket` in this
/// process, forever.
fn serve(spec: &str, socket: &str) {
    let disk = if spec == "null" {
        stord::disk::Disk::from_volume(stord::volume::Volume::null(FILE_SIZE))
    } else if let Some(file) = spec.strip_prefix("chain3:") {
        chain3(Path::new(file))
    } else if let Some(file) = spec.strip_prefix("empty:") {
        // A brand-new thin volume: every first write allocates, as in a new top layer.
        let _ = std::fs::remove_file(file);
        stord::disk::Disk::from_volume(
            stord::volume::Volume::create(Path::new(file), FILE_SIZE).unwrap(),
        )
    } else {
        stord::disk::Disk::from_volume(stord::volume::Volume::open(Path::new(spec), false).unwrap())
    };
    let limiter = stord::qos::Limiter::new(stord::qos::QosSpec::default());
    let disk = std::sync::Arc::new(disk);
    let _att =
        stord::vhost_blk::Attachment::start(Path::new(socket), disk, false, 1, "bench", limiter)
            .unwrap();
    loop {
        std::thread::park();
    }
}

struct Backend {
    name: String,
    child: Child,
    socket: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn wait_for_socket(p: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backend exited before listening on {}",
            p.display()
        );
        assert!(Instant::now() < deadline, "no socket at {}", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_stord(dir: &Path, target: &str) -> Backend {
    start_stord_as(dir, target, "stord")
}

fn start_stord_as(dir: &Path, target: &str, name: &str) -> Backend {
    let socket = dir.join("stord.sock");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(SERVE_ENV, format!("{target}|{}", socket.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&socket, &mut child);
    Backend {
        name: name.into(),
        child,
        socket,
    }
}

fn start_qsd(dir: &Path, blockdev: &str) -> Backend {
    let socket = dir.join("qsd.sock");
    let mut child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", blockdev, "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (Debian package qemu-system-common)");
    wait_for_socket(&socket, &mut child);
    Backend {
        name: "qemu-storage-daemon".into(),
        child,
        socket,
    }
}

fn run(socket: &Path, w: Workload, secs: f64) -> Sample {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    let mut q = b.start().unwrap().queues.remove(0);
    let len = w.bs * w.qd;
    let region = b
        .alloc_mem_region(len.div_ceil(2 << 20) * (2 << 20))
        .unwrap();
    b.map_mem_region(&region).unwrap();
    let buf = region.addr as *mut u8;
    // SAFETY: the region is at least `len` bytes of mapped memory.
    unsafe { std::ptr::write_bytes(buf, 0xa5, len) };
    let blocks = FILE_SIZE / w.bs as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq = 0u64;
    let mut next_off = |rng: &mut u64| {
        if w.random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % blocks) * w.bs as u64
        } else {
            seq = (seq + 1) % blocks;
            seq * w.bs as u64
        }
    };
    let mut started = vec![Instant::now(); w.qd];
    let mut submit =
        |q: &mut blkio::Blkioq, slot: usize, rng: &mut u64, started: &mut [Instant]| {
            let off = next_off(rng);
            // SAFETY: slot * bs + bs <= len, inside the region.
            let p = unsafe { buf.add(slot * w.bs) };
            started[slot] = Instant::now();
            if w.write {
                q.write(off, p, w.bs, slot, ReqFlags::empty());
            } else {
                q.read(off, p, w.bs, slot, ReqFlags::empty());
            }
        };
    for slot in 0..w.qd {
        submit(&mut q, slot, &mut rng, &mut started);
    }
    let warm = Instant::now() + Duration::from_millis(500);
    let mut t0: Option<Instant> = None;
    let mut done = 0u64;
    let mut lat = Vec::new();
    let mut comps = [const { MaybeUninit::<Completion>::uninit() }; 64];
    loop {
        let n = q.do_io(&mut comps, 1, None, None).unwrap();
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised `n` completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "I/O error");
            if t0.is_some() {
                done += 1;
                if w.qd == 1 {
                    lat.push(now.duration_since(started[c.user_data]).as_secs_f64() * 1e6);
                }
            }
            submit(&mut q, c.user_data, &mut rng, &mut started);
        }
        if t0.is_none() && now >= warm {
            t0 = Some(now);
        }
        if let Some(t) = t0 {
            if now.duration_since(t).as_secs_f64() >= secs {
                let el = now.duration_since(t).as_secs_f64();
                lat.sort_by(f64::total_cmp);
                let p50 = lat.get(lat.len() / 2).copied().unwrap_or(0.0);
                // Let the in-flight requests finish before tearing down.
                let mut left = w.qd;
                while left > 0 {
                    left -= q
                        .do_io(&mut comps, 1, Some(&mut Duration::from_secs(5)), None)
                        .unwrap_or(left);
                }
                return Sample {
                    iops: done as f64 / el,
                    p50_us: p50,
                };
            }
        }
    }
}

fn fio(file: &Path, w: Workload, secs: f64) -> Option<Sample> {
    let out = Command::new("fio")
        .args([
            "--name=limit",
            "--direct=1",
            "--ioengine=io_uring",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!(
            "--rw={}",
            match (w.write, w.random) {
                (false, true) => "randread",
                (true, true) => "randwrite",
                (false, false) => "read",
                (true, false) => "write",
            }
        ))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--runtime={}", secs.ceil() as u64))
        .arg("--ramp_time=1")
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let job = &v["jobs"][0];
    let side = if w.write { &job["write"] } else { &job["read"] };
    Some(Sample {
        iops: side["iops"].as_f64()?,
        p50_us: side["clat_ns"]["percentile"]["50.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
    })
}

fn prefill(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == FILE_SIZE) {
        return;
    }
    let status = Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=1M",
            "count=1024",
            "status=none",
            "oflag=direct",
        ])
        .arg(format!("of={}", path.display()))
        .status()
        .unwrap();
    if !status.success() {
        // tmpfs refuses O_DIRECT.
        let status = Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "count=1024", "status=none"])
            .arg(format!("of={}", path.display()))
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn fmt_iops(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else {
        format!("{:.1} k", x / 1e3)
    }
}

/// In-process read timing of a disk, without vhost-user (for profiling).
fn micro(spec: &str) {
    let disk = if let Some(f) = spec.strip_prefix("chain3:") {
        chain3(Path::new(f))
    } else {
        stord::disk::Disk::from_volume(stord::volume::Volume::open(Path::new(spec), false).unwrap())
    };
    let mut buf = vec![0u8; 128 << 10];
    let n = 20_000u64;
    let t = Instant::now();
    for i in 0..n {
        let iov = [stord::volume::IoSlice {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        // SAFETY: `buf` outlives the call.
        unsafe { disk.read_vectored(&iov, (i % 8192) * (128 << 10)).unwrap() };
    }
    println!(
        "{spec}: {:.1} µs per 128 KiB read",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}

/// Starts one backend of a scenario in a scratch directory.
type Start = Box<dyn Fn(&Path) -> Backend>;

/// The backends of a chain scenario on `file`: three snapshots in the chain,
/// the fresh volume, and a new empty volume next to it.
fn chain_backends(file: &Path) -> Vec<Start> {
    let (a, b) = (file.display().to_string(), file.display().to_string());
    let empty = file.with_file_name("atoll-bench-empty.img");
    vec![
        Box::new(move |d| start_stord_as(d, &format!("chain3:{a}"), "stord, 3 snapshots in chain")),
        Box::new(move |d| start_stord_as(d, &b, "stord, fresh volume")),
        Box::new(move |d| {
            start_stord_as(
                d,
                &format!("empty:{}", empty.display()),
                "stord, new empty volume",
            )
        }),
    ]
}

fn main() {
    if let Ok(spec) = std::env::var("ATOLL_BENCH_MICRO") {
        micro(&spec);
        return;
    }
    if let Ok(spec) = std::env::var(SERVE_ENV) {
        let (target, socket) = spec.split_once('|').unwrap();
        serve(target, socket);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let reps: usize = arg("--reps").map_or(3, |v| v.parse().unwrap());
    let secs: f64 = arg("--secs").map_or(3.0, |v| v.parse().unwrap());
    let only = arg("--only");
    // `--workload QD32` keeps the workloads whose name contains the text.
    let wl = arg("--workload").unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();

    let shm = PathBuf::from("/dev/shm/atoll-bench.img");
    let disk = PathBuf::from("/var/tmp/atoll-bench.img");
    let mut scenarios: Vec<(&str, Vec<Start>, Option<PathBuf>)> = Vec::new();
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if want("tmpfs") {
        prefill(&shm);
        let (a, b) = (shm.display().to_string(), shm.display().to_string());
        scenarios.push((
            "tmpfs",
            vec![
                Box::new(move |d| start_stord(d, &a)),
                Box::new(move |d| {
                    start_qsd(
                        d,
                        &format!("driver=file,node-name=n0,filename={b},aio=io_uring"),
                    )
                }),
            ],
            None,
        ));
    }
    for (key, name, file) in [
        ("chain", "tmpfs, 3 snapshots", &shm),
        ("disk-chain", "disk (O_DIRECT), 3 snapshots", &disk),
    ] {
        if want(key) {
            prefill(file);
            scenarios.push((name, chain_backends(file), None));
        }
    }
    if want("null") {
        scenarios.push((
            "null",
            vec![
                Box::new(|d| start_stord(d, "null")),
                Box::new(|d| {
                    start_qsd(d, &format!("driver=null-co,node-name=n0,size={FILE_SIZE}"))
                }),
            ],
            None,
        ));
    }
    if want("disk") {
        prefill(&disk);
        let (a, b) = (disk.display().to_string(), disk.display().to_string());
        scenarios.push((
            "disk (O_DIRECT)",
            vec![
                Box::new(move |d| start_stord(d, &a)),
                Box::new(move |d| {
                    start_qsd(
                        d,
                        &format!(
                            "driver=file,node-name=n0,filename={b},cache.direct=on,aio=native"
                        ),
                    )
                }),
            ],
            Some(disk.clone()),
        ));
    }

    println!("| scenario | workload | backend | IOPS min / median / max | p50 latency (QD1) | vs 2nd backend (median) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (scenario, starts, fio_file) in &scenarios {
        // samples[backend][workload] = Vec<Sample>
        let mut names = Vec::new();
        let mut samples: Vec<Vec<Vec<Sample>>> =
            vec![vec![Vec::new(); WORKLOADS.len()]; starts.len() + 1];
        for _ in 0..reps {
            for (bi, start) in starts.iter().enumerate() {
                let mut backend = start(dir.path());
                if names.len() <= bi {
                    names.push(backend.name.clone());
                }
                for (wi, w) in WORKLOADS.iter().enumerate() {
                    if !w.name.contains(wl.as_str()) {
                        continue;
                    }
                    // The chain scenario measures each workload on a freshly built
                    // chain: otherwise the random writes of one workload would
                    // fragment the top layer under the next.
                    if wi > 0 && scenario.contains("snapshots") {
                        drop(backend);
                        backend = start(dir.path());
                    }
                    samples[bi][wi].push(run(&backend.socket, *w, secs));
                }
            }
            if let Some(f) = fio_file {
                for (wi, w) in WORKLOADS.iter().enumerate() {
                    if !w.name.contains(wl.as_str()) {
                        continue;
                    }
                    if let Some(s) = fio(f, *w, secs) {
                        samples[starts.len()][wi].push(s);
                    }
                }
            }
        }
        names.push("fio io_uring O_DIRECT (limit)".into());
        for (wi, w) in WORKLOADS.iter().enumerate() {
            if samples[1][wi].is_empty() {
                continue;
            }
            let qsd_median = stats(&samples[1][wi].iter().map(|s| s.iops).collect::<Vec<_>>()).1;
            for (bi, name) in names.iter().enumerate() {
                let s = &samples[bi][wi];
                if s.is_empty() {
                    continue;
                }
                let (lo, med, hi) = stats(&s.iter().map(|x| x.iops).collect::<Vec<_>>());
                let lat = if w.qd == 1 {
                    let (l, m, h) = stats(&s.iter().map(|x| x.p50_us).collect::<Vec<_>>());
                    format!("{m:.1} µs ({l:.1}-{h:.1})")
                } else {
                    String::new()
                };
                println!(
                    "| {scenario} | {} | {name} | {} / {} / {} | {lat} | {:.2}x |",
                    w.name,
                    fmt_iops(lo),
                    fmt_iops(med),
                    fmt_iops(hi),
                    med / qsd_median
                );
            }
        }
    }
}
