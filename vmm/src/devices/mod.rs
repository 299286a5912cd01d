//! Legacy devices on the port bus and the serial console.

pub mod cmos;
pub mod console;
pub mod debug;
pub mod i8042;
pub mod serial;
