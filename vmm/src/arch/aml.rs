//! Just enough ACPI Machine Language to describe our devices in a DSDT:
//! names, integers, strings, packages, buffers, scopes, devices, methods and
//! `Notify`. Encodings follow the ACPI specification, section 20 (AML grammar).

// Firmware tables pack values into fixed-width fields: truncating casts
// here are the layout, not accidents.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

/// Something that serializes to AML.
pub trait Aml {
    /// Appends the encoding to `out`.
    fn emit(&self, out: &mut Vec<u8>);

    /// The encoding on its own.
    fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.emit(&mut v);
        v
    }
}

impl Aml for u64 {
    fn emit(&self, out: &mut Vec<u8>) {
        match *self {
            0 => out.push(0x00), // ZeroOp
            1 => out.push(0x01), // OneOp
            v if v <= 0xff => out.extend_from_slice(&[0x0a, v as u8]),
            v if v <= 0xffff => {
                out.push(0x0b);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            v if v <= 0xffff_ffff => {
                out.push(0x0c);
                out.extend_from_slice(&(v as u32).to_le_bytes());
            }
            v => {
                out.push(0x0e);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// A string constant.
pub struct Str<'a>(pub &'a str);

impl Aml for Str<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        out.push(0x0d);
        out.extend_from_slice(self.0.as_bytes());
        out.push(0);
    }
}

/// A name path such as `_S5_`, `PWRB` or `\_SB_.PWRB` (segments padded with `_`).
pub struct Path<'a>(pub &'a str);

impl Aml for Path<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        let mut s = self.0;
        if let Some(rest) = s.strip_prefix('\\') {
            out.push(b'\\');
            s = rest;
        }
        let segs: Vec<&str> = s.split('.').filter(|x| !x.is_empty()).collect();
        match segs.len() {
            0 => out.push(0), // NullName
            1 => {}
            2 => out.push(0x2e), // DualNamePrefix
            n => out.extend_from_slice(&[0x2f, n as u8]),
        }
        for seg in segs {
            let mut b = [b'_'; 4];
            for (d, c) in b.iter_mut().zip(seg.bytes()) {
                *d = c;
            }
            out.extend_from_slice(&b);
        }
    }
}

/// PkgLength: the length of what follows including the encoding itself.
fn pkg_length(body: usize, out: &mut Vec<u8>) {
    let total = body + 1;
    if total < 0x40 {
        out.push(total as u8);
        return;
    }
    for n in 1..=3usize {
        let total = body + 1 + n;
        if total < 1 << (4 + 8 * n) {
            out.push(((n as u8) << 6) | (total & 0xf) as u8);
            for i in 0..n {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return;
        }
    }
    panic!("AML package too large");
}

fn emit_all(items: &[&dyn Aml]) -> Vec<u8> {
    let mut v = Vec::new();
    for i in items {
        i.emit(&mut v);
    }
    v
}

/// `Name(path, value)`.
pub struct Name<'a>(pub &'a str, pub &'a dyn Aml);

impl Aml for Name<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        out.push(0x08);
        Path(self.0).emit(out);
        self.1.emit(out);
    }
}

/// `Package() { ... }`.
pub struct Package<'a>(pub Vec<&'a dyn Aml>);

impl Aml for Package<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        let mut body = vec![self.0.len() as u8];
        body.extend(emit_all(&self.0));
        out.push(0x12);
        pkg_length(body.len(), out);
        out.extend(body);
    }
}

/// `Buffer() { bytes }`.
pub struct Buffer(pub Vec<u8>);

impl Aml for Buffer {
    fn emit(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        (self.0.len() as u64).emit(&mut body);
        body.extend_from_slice(&self.0);
        out.push(0x11);
        pkg_length(body.len(), out);
        out.extend(body);
    }
}

/// `Scope(path) { ... }`.
pub struct Scope<'a>(pub &'a str, pub Vec<&'a dyn Aml>);

impl Aml for Scope<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        let mut body = Path(self.0).to_bytes();
        body.extend(emit_all(&self.1));
        out.push(0x10);
        pkg_length(body.len(), out);
        out.extend(body);
    }
}

/// `Device(path) { ... }`.
pub struct Device<'a>(pub &'a str, pub Vec<&'a dyn Aml>);

impl Aml for Device<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        let mut body = Path(self.0).to_bytes();
        body.extend(emit_all(&self.1));
        out.extend_from_slice(&[0x5b, 0x82]);
        pkg_length(body.len(), out);
        out.extend(body);
    }
}

/// `Method(path, args, NotSerialized) { ... }`.
pub struct Method<'a>(pub &'a str, pub u8, pub Vec<&'a dyn Aml>);

impl Aml for Method<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        let mut body = Path(self.0).to_bytes();
        body.push(self.1 & 7);
        body.extend(emit_all(&self.2));
        out.push(0x14);
        pkg_length(body.len(), out);
        out.extend(body);
    }
}

/// `Notify(path, value)`.
pub struct Notify<'a>(pub &'a str, pub u64);

impl Aml for Notify<'_> {
    fn emit(&self, out: &mut Vec<u8>) {
        out.push(0x86);
        Path(self.0).emit(out);
        self.1.emit(out);
    }
}

/// A resource template (`_CRS`) holding one extended interrupt: edge
/// triggered, active high, exclusive, consumer.
pub fn interrupt_resource(gsi: u32) -> Buffer {
    let mut r = vec![0x89, 6, 0, 0x03, 1];
    r.extend_from_slice(&gsi.to_le_bytes());
    r.extend_from_slice(&[0x79, 0]); // end tag, checksum 0 = ignore
    Buffer(r)
}

/// The `_CRS` of a PCI host bridge on bus 0: the bus number, the
/// configuration ports it consumes, and the I/O and memory windows it
/// forwards (`mem` = first..=last address of the 32-bit BAR window).
pub fn pci_root_resources(mem: (u32, u32)) -> Buffer {
    let word = |kind: u8, tflags: u8, min: u16, max: u16| {
        let mut d = vec![0x88, 0x0d, 0x00, kind, 0x0c, tflags];
        for v in [0u16, min, max, 0, max - min + 1] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d
    };
    let mut r = word(2, 0, 0, 0); // bus numbers 0..=0
                                  // Configuration mechanism #1 ports, consumed by the bridge itself.
    r.extend_from_slice(&[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]);
    r.extend(word(1, 3, 0x0000, 0x0cf7));
    r.extend(word(1, 3, 0x0d00, 0xffff));
    // 32-bit memory window, not cacheable, read-write.
    let mut d = vec![0x87, 0x17, 0x00, 0, 0x0c, 0x01];
    for v in [0u32, mem.0, mem.1, 0, mem.1 - mem.0 + 1] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    r.extend(d);
    r.extend_from_slice(&[0x79, 0]);
    Buffer(r)
}

/// A resource template with one I/O port range.
pub fn io_resource(port: u16, len: u8) -> Buffer {
    let mut r = io_descriptor(port, len);
    r.extend_from_slice(&[0x79, 0]);
    Buffer(r)
}

/// A resource template for a legacy ISA device: one I/O port range and one
/// ISA interrupt (edge triggered, active high), like a 16550's.
pub fn isa_resources(port: u16, len: u8, irq: u8) -> Buffer {
    let mut r = io_descriptor(port, len);
    let mask = 1u16 << (irq & 15);
    r.push(0x22);
    r.extend_from_slice(&mask.to_le_bytes());
    r.extend_from_slice(&[0x79, 0]);
    Buffer(r)
}

fn io_descriptor(port: u16, len: u8) -> Vec<u8> {
    let mut r = vec![0x47, 1];
    r.extend_from_slice(&port.to_le_bytes());
    r.extend_from_slice(&port.to_le_bytes());
    r.extend_from_slice(&[1, len]);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_names_and_packages() {
        assert_eq!(0u64.to_bytes(), [0x00]);
        assert_eq!(5u64.to_bytes(), [0x0a, 5]);
        assert_eq!(0x1234u64.to_bytes(), [0x0b, 0x34, 0x12]);
        assert_eq!(Path("_S5").to_bytes(), *b"_S5_");
        assert_eq!(Path("\\_SB.PWRB").to_bytes(), b"\\\x2e_SB_PWRB");
        // Name (_S5_, Package (0x02) { 5, Zero }) as iasl emits it.
        let s5 = Name("_S5_", &Package(vec![&5u64, &0u64]));
        assert_eq!(
            s5.to_bytes(),
            [0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]
        );
        assert_eq!(Str("ACPI0013").to_bytes()[..2], [0x0d, b'A']);
    }

    #[test]
    fn long_package_lengths() {
        let mut out = Vec::new();
        pkg_length(0x3e, &mut out);
        assert_eq!(out, [0x3f]);
        out.clear();
        // 0x40 bytes of body: two-byte PkgLength, total 0x42.
        pkg_length(0x40, &mut out);
        assert_eq!(out, [0x42, 0x04]);
        out.clear();
        pkg_length(0x1000, &mut out);
        let total = 0x1000 + 3;
        assert_eq!(
            out,
            [
                0x80 | (total & 0xf) as u8,
                (total >> 4) as u8,
                (total >> 12) as u8
            ]
        );
    }

    #[test]
    fn device_with_method() {
        let d = Device("PWRB", vec![&Name("_HID", &Str("PNP0C0C"))]);
        let b = d.to_bytes();
        assert_eq!(&b[..2], [0x5b, 0x82]);
        assert_eq!(usize::from(b[2]), b.len() - 2);
        let m = Method("_EVT", 1, vec![&Notify("\\_SB.PWRB", 0x80)]);
        let b = m.to_bytes();
        assert_eq!(b[0], 0x14);
        assert_eq!(usize::from(b[1]), b.len() - 1);
        assert_eq!(&b[2..6], b"_EVT");
        assert_eq!(b[6], 1);
        assert_eq!(b[7], 0x86);
    }
}
