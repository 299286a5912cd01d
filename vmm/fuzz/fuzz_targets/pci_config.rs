//! Configuration space reads and writes from the fuzzer, including BAR sizing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::pci_config(data));
