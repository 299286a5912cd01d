//! How far apart two CPUs are, as a cache line sees it: one thread on each
//! passes a counter back and forth for a moment; prints the median round
//! trip in nanoseconds. On a virtual machine the host may move its vCPUs
//! between cores that share a cache (tens of ns) and cores that do not
//! (hundreds), and a vhost-user data path's speed follows; the benchmarks
//! tag each run with it (bench/netd-testpmd.sh).
//!
//! ```text
//! vcpu_distance [CPU_A CPU_B]     # default 0 1
//! ```

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Round trips per sample, and samples.
const TRIPS: u64 = 2000;
const SAMPLES: usize = 9;

fn pin(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for
    // CPUs below CPU_SETSIZE (checked).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such CPU"));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, a))
        })
        .collect::<io::Result<_>>()?;
    let (a, b) = match args[..] {
        [] => (0, 1),
        [a, b] => (a, b),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "usage: vcpu_distance [CPU_A CPU_B]",
            ))
        }
    };
    let ball = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (ball, stop) = (ball.clone(), stop.clone());
        std::thread::spawn(move || -> io::Result<()> {
            pin(b)?;
            // Odd values are ours to answer.
            while !stop.load(Ordering::Relaxed) {
                let v = ball.load(Ordering::Acquire);
                if v % 2 == 1 {
                    ball.store(v + 1, Ordering::Release);
                }
            }
            Ok(())
        })
    };
    pin(a)?;
    let mut v = 0u64;
    let mut samples = Vec::with_capacity(SAMPLES);
    let deadline = Instant::now() + Duration::from_secs(5);
    'outer: for _ in 0..SAMPLES {
        let t0 = Instant::now();
        for _ in 0..TRIPS {
            ball.store(v + 1, Ordering::Release);
            while ball.load(Ordering::Acquire) != v + 2 {
                if Instant::now() > deadline {
                    // The other thread never ran (one CPU only, or it is
                    // starved): no answer.
                    break 'outer;
                }
                std::hint::spin_loop();
            }
            v += 2;
        }
        samples.push(t0.elapsed().as_nanos() / u128::from(TRIPS));
    }
    stop.store(true, Ordering::Relaxed);
    other
        .join()
        .map_err(|_| io::Error::other("the other thread panicked"))??;
    samples.sort_unstable();
    match samples.get(samples.len() / 2) {
        Some(ns) if samples.len() == SAMPLES => println!("{ns}"),
        _ => return Err(io::Error::other("no answer from the other CPU")),
    }
    Ok(())
}
