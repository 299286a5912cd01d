//! x86-64 specifics: the address map, CPU state at entry, CPUID and boot protocols.

pub mod acpi;
pub mod aml;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
