//! The DNS answers the gateway gives for the VMs of a network: A records for
//! port names (`web1` and `web1.<domain>`), AAAA records where the VM has an
//! address in its subnet's IPv6 /64. A name outside the network's
//! domain gets REFUSED, so that a resolver moves on to the next server the
//! DHCP options list; an unknown name inside it gets NXDOMAIN.

use std::net::{Ipv4Addr, Ipv6Addr};

/// DNS over UDP.
pub const PORT: u16 = 53;

/// Whether `answer` (from [`answer`]) refuses the name as not the
/// network's: one to forward to a resolver, if the node has one.
pub fn refused(answer: &[u8]) -> bool {
    answer.get(3).is_some_and(|b| b & 0x0f == RCODE_REFUSED)
}
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
const RCODE_REFUSED: u8 = 5;
/// TTL of the answers: names move when VMs do.
const TTL: u32 = 30;

/// A parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    /// Lower-case name without the trailing dot.
    name: String,
    qtype: u16,
    qclass: u16,
    /// Where the question section ends in the message.
    end: usize,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn question(msg: &[u8]) -> Option<Question> {
    let mut at = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers (0xc0) and the reserved label types have no
        // place in a question; labels are at most 63 bytes, names 255.
        if len > 63 || name.len() + len > 254 {
            return None;
        }
        let label = msg.get(at..at + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &c in label {
            if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                return None;
            }
            name.push(char::from(c.to_ascii_lowercase()));
        }
        at += len;
    }
    let qtype = be16(msg, at)?;
    let qclass = be16(msg, at + 2)?;
    Some(Question {
        name,
        qtype,
        qclass,
        end: at + 4,
    })
}

/// The answer to the query `msg`, looking names up with `lookup` (a bare
/// host name) inside `domain`; None when `msg` is not a query worth an
/// answer (a response, or too short to carry an id).
pub fn answer(
    msg: &[u8],
    domain: &str,
    lookup: impl Fn(&str) -> Option<(Ipv4Addr, Option<Ipv6Addr>)>,
) -> Option<Vec<u8>> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None;
    }
    let opcode = (msg[2] >> 3) & 0x0f;
    let rd = msg[2] & 0x01;
    let qdcount = be16(msg, 4)?;
    let header = |rcode: u8, answers: u16, q: Option<&Question>| {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(&msg[0..2]);
        // QR, opcode copied, AA, RD copied; RA 0.
        h.push(0x80 | (opcode << 3) | 0x04 | rd);
        h.push(rcode);
        h.extend_from_slice(&u16::from(q.is_some()).to_be_bytes());
        h.extend_from_slice(&answers.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        if let Some(q) = q {
            h.extend_from_slice(&msg[12..q.end]);
        }
        h
    };
    if opcode != 0 {
        return Some(header(RCODE_NOTIMP, 0, None));
    }
    let q = match (qdcount, question(msg)) {
        (1, Some(q)) => q,
        _ => return Some(header(RCODE_FORMERR, 0, None)),
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let host = if !q.name.contains('.') {
        Some(q.name.as_str())
    } else if domain.is_empty() {
        None
    } else {
        q.name
            .strip_suffix(domain.as_str())
            .and_then(|h| h.strip_suffix('.'))
            .filter(|h| !h.contains('.'))
            .or((q.name == domain).then_some(""))
    };
    let Some(host) = host else {
        return Some(header(RCODE_REFUSED, 0, Some(&q)));
    };
    let Some((v4, v6)) = (!host.is_empty()).then(|| lookup(host)).flatten() else {
        return Some(header(RCODE_NXDOMAIN, 0, Some(&q)));
    };
    // The records of the type asked for (none: the name exists without
    // them).
    let mut records: Vec<(u16, Vec<u8>)> = Vec::with_capacity(2);
    if q.qclass == CLASS_IN {
        if matches!(q.qtype, TYPE_A | TYPE_ANY) {
            records.push((TYPE_A, v4.octets().to_vec()));
        }
        if let (TYPE_AAAA | TYPE_ANY, Some(v6)) = (q.qtype, v6) {
            records.push((TYPE_AAAA, v6.octets().to_vec()));
        }
    }
    let count = u16::try_from(records.len()).unwrap_or(0);
    let mut out = header(0, count, Some(&q));
    for (kind, data) in records {
        out.extend_from_slice(&[0xc0, 12]); // the name in the question
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&u16::try_from(data.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&data);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            m.push(u8::try_from(l.len()).unwrap());
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    fn lookup(h: &str) -> Option<(Ipv4Addr, Option<Ipv6Addr>)> {
        let v6 = "fd00::5".parse().ok();
        match h {
            "web1" => Some((Ipv4Addr::new(10, 0, 0, 5), None)),
            "dual1" => Some((Ipv4Addr::new(10, 0, 0, 6), v6)),
            _ => None,
        }
    }

    #[test]
    fn names_resolve_with_and_without_the_domain() {
        for name in ["web1", "WEB1.lan.atoll"] {
            let r = answer(&query(name, TYPE_A), "lan.atoll", lookup).unwrap();
            assert_eq!(&r[0..2], &[0x12, 0x34]);
            assert_eq!(r[3] & 0x0f, 0, "{name}: NOERROR");
            assert_eq!(be16(&r, 6), Some(1), "one answer");
            assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 5]);
        }
        let r = answer(&query("db1.lan.atoll", TYPE_A), "lan.atoll", lookup).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        let r = answer(&query("example.com", TYPE_A), "lan.atoll", lookup).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_REFUSED);
        let r = answer(&query("web1", TYPE_AAAA), "lan.atoll", lookup).unwrap();
        assert_eq!((r[3] & 0x0f, be16(&r, 6)), (0, Some(0)), "no IPv6: no data");
        // A VM with an IPv6 address: AAAA alone, or both for ANY.
        let r = answer(&query("dual1", TYPE_AAAA), "lan.atoll", lookup).unwrap();
        assert_eq!(be16(&r, 6), Some(1));
        let v6: Ipv6Addr = "fd00::5".parse().unwrap();
        assert_eq!(&r[r.len() - 16..], &v6.octets());
        assert_eq!(be16(&r, r.len() - 18), Some(16), "RDLENGTH");
        let r = answer(&query("dual1", TYPE_ANY), "lan.atoll", lookup).unwrap();
        assert_eq!(be16(&r, 6), Some(2));
        assert_eq!(&r[r.len() - 16..], &v6.octets());
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let mut q = query("web1", TYPE_A);
        q[12] = 0xc0; // a pointer in the question
        assert_eq!(answer(&q, "", lookup).unwrap()[3] & 0x0f, RCODE_FORMERR);
        let q = query("web1", TYPE_A);
        assert_eq!(
            answer(&q[..q.len() - 1], "", lookup).unwrap()[3] & 0x0f,
            RCODE_FORMERR
        );
        assert!(answer(&q[..11], "", lookup).is_none());
        let mut resp = q.clone();
        resp[2] |= 0x80;
        assert!(answer(&resp, "", lookup).is_none());
    }
}
