//! Guest memory and queue geometry from the fuzzer; the read-only block
//! server and the rng walk whatever chains it holds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::virtqueue(data));
