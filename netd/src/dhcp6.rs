//! DHCPv6 (RFC 8415) on subnets with a /64, answered by the distributed
//! router from its link-local address (no other port sees the request).
//!
//! Every subnet with a /64 answers information requests (DNS servers and
//! search domain for guests that form their address by SLAAC, which the
//! router advertisement's "other configuration" flag points them to). A
//! subnet in `dhcpv6` mode also assigns addresses: the router advertises
//! the prefix without the autonomous flag and with the "managed" flag, and
//! each port gets the one address its security allows (the port's address
//! in the /64), renewed as long as the guest asks. The server keeps no
//! state: the address is the port's, whoever asks from its MAC.

use std::net::Ipv6Addr;

use crate::frame::Mac;

/// UDP ports: the server's and the client's.
pub const SERVER_PORT: u16 = 547;
pub const CLIENT_PORT: u16 = 546;
/// All DHCP relay agents and servers on the link.
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

// Message types.
const SOLICIT: u8 = 1;
const ADVERTISE: u8 = 2;
const REQUEST: u8 = 3;
const CONFIRM: u8 = 4;
const RENEW: u8 = 5;
const REBIND: u8 = 6;
const REPLY: u8 = 7;
const RELEASE: u8 = 8;
const DECLINE: u8 = 9;
const INFORMATION_REQUEST: u8 = 11;

// Option codes.
const OPT_CLIENTID: u16 = 1;
const OPT_SERVERID: u16 = 2;
const OPT_IA_NA: u16 = 3;
const OPT_IA_TA: u16 = 4;
const OPT_IAADDR: u16 = 5;
const OPT_PREFERENCE: u16 = 7;
const OPT_STATUS_CODE: u16 = 13;
const OPT_RAPID_COMMIT: u16 = 14;
const OPT_DNS_SERVERS: u16 = 23;
const OPT_DOMAIN_LIST: u16 = 24;
const OPT_INFORMATION_REFRESH_TIME: u16 = 32;

// Status codes.
const SUCCESS: u16 = 0;
const NO_ADDRS_AVAIL: u16 = 2;
const NOT_ON_LINK: u16 = 4;

/// Address lifetimes handed out (seconds): preferred, valid; clients renew
/// at half the preferred lifetime and rebind at 80 % of it.
pub const PREFERRED: u32 = 14_400;
pub const VALID: u32 = 86_400;
/// How often stateless clients should ask again (seconds).
const INFORMATION_REFRESH: u32 = 86_400;
/// Longest client identifier (RFC 8415: a DUID is at most 128 bytes).
const MAX_DUID: usize = 130;

/// What the server answers a port with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config<'a> {
    /// The router's MAC: its DUID (link-layer, Ethernet).
    pub server_mac: Mac,
    /// The subnet's /64.
    pub prefix: Ipv6Addr,
    /// The address assigned to the asking port; None: the subnet does not
    /// assign addresses (SLAAC), only information.
    pub address: Option<Ipv6Addr>,
    /// DNS servers, the router's own first.
    pub dns: &'a [Ipv6Addr],
    /// The search domain (may be empty).
    pub domain: &'a str,
}

/// Why a message got no answer (logged at debug level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("shorter than a DHCPv6 header")]
    Short,
    #[error("an option runs past the message")]
    Truncated,
    #[error("message type {0} is not one a client sends to a server")]
    NotForServer(u8),
    #[error("no client identifier, or an oversized one")]
    NoClient,
    #[error("a server identifier where none may be")]
    UnwantedServer,
    #[error("for another server")]
    OtherServer,
    #[error("identity associations in an information request")]
    AssociationInInformation,
    #[error("a confirm without addresses")]
    NothingToConfirm,
}

/// An identity association for non-temporary addresses in a client's
/// message: its IAID and the addresses it names.
struct Association {
    iaid: [u8; 4],
    addresses: Vec<Ipv6Addr>,
}

/// What the server reads of a client's message.
struct Message<'m> {
    kind: u8,
    xid: [u8; 3],
    client: Option<&'m [u8]>,
    server: Option<&'m [u8]>,
    associations: Vec<Association>,
    temporary: bool,
    rapid_commit: bool,
}

/// The options in `b`: (code, body) until the end; Err if one runs past it.
fn options(mut b: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), Ignored>> {
    std::iter::from_fn(move || {
        if b.is_empty() {
            return None;
        }
        let (Some(&[c0, c1, l0, l1]), rest) = (b.first_chunk::<4>(), b.get(4..)) else {
            b = &[];
            return Some(Err(Ignored::Truncated));
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let rest = rest.unwrap_or_default();
        let Some(body) = rest.get(..len) else {
            b = &[];
            return Some(Err(Ignored::Truncated));
        };
        b = &rest[len..];
        Some(Ok((u16::from_be_bytes([c0, c1]), body)))
    })
}

fn parse(msg: &[u8]) -> Result<Message<'_>, Ignored> {
    let (&[kind, x0, x1, x2], rest) = (msg.first_chunk::<4>().ok_or(Ignored::Short)?, &msg[4..]);
    let mut m = Message {
        kind,
        xid: [x0, x1, x2],
        client: None,
        server: None,
        associations: Vec::new(),
        temporary: false,
        rapid_commit: false,
    };
    for o in options(rest) {
        match o? {
            (OPT_CLIENTID, id) => m.client = Some(id),
            (OPT_SERVERID, id) => m.server = Some(id),
            (OPT_IA_NA, body) => {
                let iaid = body.first_chunk::<4>().copied().ok_or(Ignored::Truncated)?;
                let mut addresses = Vec::new();
                for o in options(body.get(12..).ok_or(Ignored::Truncated)?) {
                    if let (OPT_IAADDR, a) = o? {
                        let a = a.first_chunk::<16>().ok_or(Ignored::Truncated)?;
                        addresses.push(Ipv6Addr::from(*a));
                    }
                }
                m.associations.push(Association { iaid, addresses });
            }
            (OPT_IA_TA, _) => m.temporary = true,
            (OPT_RAPID_COMMIT, _) => m.rapid_commit = true,
            _ => {}
        }
    }
    Ok(m)
}

/// The server's answer to `msg` (a DHCPv6 message, the UDP payload) from a
/// port that `cfg` describes: the reply's UDP payload, or why there is
/// none.
pub fn answer(cfg: &Config<'_>, msg: &[u8]) -> Result<Vec<u8>, Ignored> {
    let m = parse(msg)?;
    let ours = duid(cfg.server_mac);
    // Who must and may be named (RFC 8415 section 16).
    let client = m
        .client
        .filter(|c| !c.is_empty() && c.len() <= MAX_DUID)
        .ok_or(Ignored::NoClient);
    let for_us = |must: bool| match m.server {
        Some(s) if s == ours.as_slice() => Ok(()),
        Some(_) => Err(Ignored::OtherServer),
        None if must => Err(Ignored::OtherServer),
        None => Ok(()),
    };
    let no_server = || match m.server {
        Some(_) => Err(Ignored::UnwantedServer),
        None => Ok(()),
    };
    match m.kind {
        SOLICIT | CONFIRM | REBIND => {
            client?;
            no_server()?;
        }
        REQUEST | RENEW | RELEASE | DECLINE => {
            client?;
            for_us(true)?;
        }
        INFORMATION_REQUEST => {
            for_us(false)?;
            if !m.associations.is_empty() || m.temporary {
                return Err(Ignored::AssociationInInformation);
            }
        }
        k => return Err(Ignored::NotForServer(k)),
    }
    let advertise = m.kind == SOLICIT && !m.rapid_commit;
    let mut out = vec![if advertise { ADVERTISE } else { REPLY }];
    out.extend_from_slice(&m.xid);
    put(&mut out, OPT_SERVERID, &ours);
    if let Some(c) = m.client {
        put(&mut out, OPT_CLIENTID, c);
    }
    match m.kind {
        SOLICIT | REQUEST | RENEW | REBIND => {
            if m.kind == SOLICIT {
                if m.rapid_commit {
                    put(&mut out, OPT_RAPID_COMMIT, &[]);
                }
                // The only server on the link: no need to wait for others.
                put(&mut out, OPT_PREFERENCE, &[255]);
            }
            for ia in &m.associations {
                put(&mut out, OPT_IA_NA, &association(cfg, ia));
            }
            if m.temporary && m.associations.is_empty() {
                status(&mut out, NO_ADDRS_AVAIL, "no temporary addresses");
            }
        }
        CONFIRM => {
            let named: Vec<Ipv6Addr> = m
                .associations
                .iter()
                .flat_map(|ia| ia.addresses.iter().copied())
                .collect();
            if named.is_empty() {
                return Err(Ignored::NothingToConfirm);
            }
            if named.iter().all(|a| on_link(cfg.prefix, *a)) {
                status(&mut out, SUCCESS, "on link");
            } else {
                status(&mut out, NOT_ON_LINK, "not on this link");
            }
        }
        RELEASE | DECLINE => {
            status(&mut out, SUCCESS, "");
            return Ok(out);
        }
        _ => put(
            &mut out,
            OPT_INFORMATION_REFRESH_TIME,
            &INFORMATION_REFRESH.to_be_bytes(),
        ),
    }
    information(cfg, &mut out);
    Ok(out)
}

/// Whether the message `msg` is a Decline (a guest found its address in
/// use: worth a warning).
pub fn is_decline(msg: &[u8]) -> bool {
    msg.first() == Some(&DECLINE)
}

/// The IA_NA body answering `ia`: the port's address with its lifetimes,
/// other addresses the client names with none (it must stop using them),
/// or no address at all.
fn association(cfg: &Config<'_>, ia: &Association) -> Vec<u8> {
    let mut b = ia.iaid.to_vec();
    let Some(mine) = cfg.address else {
        b.extend_from_slice(&[0; 8]);
        status(&mut b, NO_ADDRS_AVAIL, "addresses are formed by SLAAC here");
        return b;
    };
    b.extend_from_slice(&(PREFERRED / 2).to_be_bytes());
    b.extend_from_slice(&(PREFERRED / 5 * 4).to_be_bytes());
    iaaddr(&mut b, mine, PREFERRED, VALID);
    for a in ia.addresses.iter().filter(|a| **a != mine) {
        iaaddr(&mut b, *a, 0, 0);
    }
    b
}

fn iaaddr(out: &mut Vec<u8>, a: Ipv6Addr, preferred: u32, valid: u32) {
    let mut body = a.octets().to_vec();
    body.extend_from_slice(&preferred.to_be_bytes());
    body.extend_from_slice(&valid.to_be_bytes());
    put(out, OPT_IAADDR, &body);
}

/// DNS servers and search domain.
fn information(cfg: &Config<'_>, out: &mut Vec<u8>) {
    if !cfg.dns.is_empty() {
        let servers: Vec<u8> = cfg.dns.iter().flat_map(|a| a.octets()).collect();
        put(out, OPT_DNS_SERVERS, &servers);
    }
    if let Some(name) = dns_name(cfg.domain) {
        put(out, OPT_DOMAIN_LIST, &name);
    }
}

fn status(out: &mut Vec<u8>, code: u16, text: &str) {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(text.as_bytes());
    put(out, OPT_STATUS_CODE, &b);
}

fn put(out: &mut Vec<u8>, code: u16, body: &[u8]) {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body.get(..usize::from(len)).unwrap_or(body));
}

/// The server's DUID: link-layer address (type 3), Ethernet.
fn duid(mac: Mac) -> Vec<u8> {
    let mut d = vec![0, 3, 0, 1];
    d.extend_from_slice(&mac);
    d
}

fn on_link(prefix: Ipv6Addr, a: Ipv6Addr) -> bool {
    u128::from(prefix) >> 64 == u128::from(a) >> 64
}

/// `domain` in DNS wire form (labels, then the root); None if empty.
pub fn dns_name(domain: &str) -> Option<Vec<u8>> {
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() {
        return None;
    }
    let mut b = Vec::with_capacity(domain.len() + 2);
    for label in domain.split('.') {
        b.push(u8::try_from(label.len()).ok().filter(|n| *n <= 63)?);
        b.extend_from_slice(label.as_bytes());
    }
    b.push(0);
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [2, 0xa7, 0, 0, 0, 1];
    const CLIENT: &[u8] = &[0, 3, 0, 1, 0x52, 0x54, 0, 0, 0, 9];

    fn cfg(address: Option<Ipv6Addr>) -> Config<'static> {
        static DNS: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1)];
        Config {
            server_mac: MAC,
            prefix: "fd00:1::".parse().unwrap(),
            address,
            dns: &DNS,
            domain: "lan.atoll",
        }
    }

    fn msg(kind: u8, opts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![kind, 0xab, 0xcd, 0xef];
        for (c, b) in opts {
            put(&mut m, *c, b);
        }
        m
    }

    fn ia_na(iaid: u32, addrs: &[Ipv6Addr]) -> Vec<u8> {
        let mut b = iaid.to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 8]);
        for a in addrs {
            iaaddr(&mut b, *a, 0, 0);
        }
        b
    }

    fn opts_of(reply: &[u8]) -> Vec<(u16, Vec<u8>)> {
        options(&reply[4..])
            .map(|o| o.map(|(c, b)| (c, b.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn find(reply: &[u8], code: u16) -> Option<Vec<u8>> {
        opts_of(reply)
            .into_iter()
            .find(|(c, _)| *c == code)
            .map(|(_, b)| b)
    }

    #[test]
    fn a_solicit_is_advertised_the_ports_address_and_a_request_gets_it() {
        let mine: Ipv6Addr = "fd00:1::5054:ff:fe00:9".parse().unwrap();
        let c = cfg(Some(mine));
        let solicit = msg(
            SOLICIT,
            &[(OPT_CLIENTID, CLIENT.to_vec()), (OPT_IA_NA, ia_na(7, &[]))],
        );
        let adv = answer(&c, &solicit).unwrap();
        assert_eq!(&adv[..4], &[ADVERTISE, 0xab, 0xcd, 0xef]);
        assert_eq!(find(&adv, OPT_CLIENTID).unwrap(), CLIENT);
        let server = find(&adv, OPT_SERVERID).unwrap();
        assert_eq!(server, duid(MAC));
        assert_eq!(find(&adv, OPT_PREFERENCE).unwrap(), vec![255]);
        let ia = find(&adv, OPT_IA_NA).unwrap();
        assert_eq!(&ia[..4], &7u32.to_be_bytes());
        assert_eq!(&ia[4..8], &7200u32.to_be_bytes(), "T1");
        assert_eq!(&ia[8..12], &11520u32.to_be_bytes(), "T2");
        let (code, addr) = options(&ia[12..]).next().unwrap().unwrap();
        assert_eq!(code, OPT_IAADDR);
        assert_eq!(&addr[..16], &mine.octets());
        assert_eq!(&addr[16..24], &[0, 0, 0x38, 0x40, 0, 1, 0x51, 0x80]);
        assert_eq!(
            find(&adv, OPT_DNS_SERVERS).unwrap(),
            cfg(None).dns[0].octets()
        );
        assert_eq!(
            find(&adv, OPT_DOMAIN_LIST).unwrap(),
            b"\x03lan\x05atoll\x00"
        );

        // The request names the server: the reply carries the address.
        let request = msg(
            REQUEST,
            &[
                (OPT_CLIENTID, CLIENT.to_vec()),
                (OPT_SERVERID, server.clone()),
                (OPT_IA_NA, ia_na(7, &[mine])),
            ],
        );
        let reply = answer(&c, &request).unwrap();
        assert_eq!(reply[0], REPLY);
        assert_eq!(find(&reply, OPT_IA_NA).unwrap(), ia);

        // A renewal naming an address that is not the port's is told to
        // drop it (lifetimes 0) and given the port's.
        let other: Ipv6Addr = "fd00:1::99".parse().unwrap();
        let renew = msg(
            RENEW,
            &[
                (OPT_CLIENTID, CLIENT.to_vec()),
                (OPT_SERVERID, server),
                (OPT_IA_NA, ia_na(7, &[other])),
            ],
        );
        let ia = find(&answer(&c, &renew).unwrap(), OPT_IA_NA).unwrap();
        let addrs: Vec<(Vec<u8>, Vec<u8>)> = options(&ia[12..])
            .map(|o| {
                let (_, b) = o.unwrap();
                (b[..16].to_vec(), b[16..24].to_vec())
            })
            .collect();
        assert_eq!(
            addrs,
            vec![
                (
                    mine.octets().to_vec(),
                    vec![0, 0, 0x38, 0x40, 0, 1, 0x51, 0x80]
                ),
                (other.octets().to_vec(), vec![0; 8]),
            ]
        );
    }

    #[test]
    fn rapid_commit_gets_a_reply_at_once() {
        let mine: Ipv6Addr = "fd00:1::9".parse().unwrap();
        let solicit = msg(
            SOLICIT,
            &[
                (OPT_CLIENTID, CLIENT.to_vec()),
                (OPT_RAPID_COMMIT, vec![]),
                (OPT_IA_NA, ia_na(1, &[])),
            ],
        );
        let reply = answer(&cfg(Some(mine)), &solicit).unwrap();
        assert_eq!(reply[0], REPLY);
        assert!(find(&reply, OPT_RAPID_COMMIT).is_some());
    }

    #[test]
    fn without_addresses_to_assign_only_information_is_given() {
        let c = cfg(None);
        let solicit = msg(
            SOLICIT,
            &[(OPT_CLIENTID, CLIENT.to_vec()), (OPT_IA_NA, ia_na(3, &[]))],
        );
        let ia = find(&answer(&c, &solicit).unwrap(), OPT_IA_NA).unwrap();
        let (code, st) = options(&ia[12..]).next().unwrap().unwrap();
        assert_eq!((code, &st[..2]), (OPT_STATUS_CODE, &[0, 2][..]));

        // Stateless clients ask for information only, with or without
        // naming themselves.
        let info = answer(&c, &msg(INFORMATION_REQUEST, &[])).unwrap();
        assert_eq!(info[0], REPLY);
        assert!(find(&info, OPT_CLIENTID).is_none());
        assert!(find(&info, OPT_DNS_SERVERS).is_some());
        assert_eq!(
            find(&info, OPT_INFORMATION_REFRESH_TIME).unwrap(),
            86_400u32.to_be_bytes()
        );
    }

    #[test]
    fn confirm_says_whether_addresses_are_on_the_link() {
        let c = cfg(None);
        let confirm = |a: &str| {
            msg(
                CONFIRM,
                &[
                    (OPT_CLIENTID, CLIENT.to_vec()),
                    (OPT_IA_NA, ia_na(1, &[a.parse().unwrap()])),
                ],
            )
        };
        let status_of = |r: Vec<u8>| find(&r, OPT_STATUS_CODE).unwrap()[..2].to_vec();
        assert_eq!(
            status_of(answer(&c, &confirm("fd00:1::42")).unwrap()),
            [0, 0]
        );
        assert_eq!(
            status_of(answer(&c, &confirm("fd00:2::42")).unwrap()),
            [0, 4]
        );
        let empty = msg(CONFIRM, &[(OPT_CLIENTID, CLIENT.to_vec())]);
        assert_eq!(answer(&c, &empty), Err(Ignored::NothingToConfirm));
    }

    #[test]
    fn what_a_server_must_not_answer_is_ignored() {
        let c = cfg(Some("fd00:1::9".parse().unwrap()));
        let other_server = vec![0, 3, 0, 1, 1, 2, 3, 4, 5, 6];
        let client = (OPT_CLIENTID, CLIENT.to_vec());
        let cases: Vec<(Vec<u8>, Ignored)> = vec![
            (vec![1, 2, 3], Ignored::Short),
            (msg(SOLICIT, &[]), Ignored::NoClient),
            (msg(SOLICIT, &[(OPT_CLIENTID, vec![])]), Ignored::NoClient),
            (
                msg(SOLICIT, &[(OPT_CLIENTID, vec![7; 200])]),
                Ignored::NoClient,
            ),
            (
                msg(SOLICIT, &[client.clone(), (OPT_SERVERID, duid(MAC))]),
                Ignored::UnwantedServer,
            ),
            (
                msg(REQUEST, std::slice::from_ref(&client)),
                Ignored::OtherServer,
            ),
            (
                msg(RENEW, &[client.clone(), (OPT_SERVERID, other_server)]),
                Ignored::OtherServer,
            ),
            (
                msg(INFORMATION_REQUEST, &[(OPT_IA_NA, ia_na(1, &[]))]),
                Ignored::AssociationInInformation,
            ),
            (
                msg(ADVERTISE, std::slice::from_ref(&client)),
                Ignored::NotForServer(2),
            ),
            (
                msg(REPLY, std::slice::from_ref(&client)),
                Ignored::NotForServer(7),
            ),
            (
                msg(12, std::slice::from_ref(&client)),
                Ignored::NotForServer(12),
            ),
            // An option longer than the message; an IA_NA too short for
            // its fixed part; an address option cut short.
            (
                [
                    msg(SOLICIT, std::slice::from_ref(&client)),
                    vec![0, 3, 0, 40, 1, 2],
                ]
                .concat(),
                Ignored::Truncated,
            ),
            (
                msg(SOLICIT, &[client.clone(), (OPT_IA_NA, vec![0; 8])]),
                Ignored::Truncated,
            ),
            (
                msg(
                    SOLICIT,
                    &[
                        client,
                        (
                            OPT_IA_NA,
                            [vec![0; 12], vec![0, 5, 0, 4, 1, 2, 3, 4]].concat(),
                        ),
                    ],
                ),
                Ignored::Truncated,
            ),
        ];
        for (m, why) in cases {
            assert_eq!(answer(&c, &m), Err(why), "{m:?}");
        }
    }

    #[test]
    fn release_and_decline_are_acknowledged() {
        let c = cfg(Some("fd00:1::9".parse().unwrap()));
        for kind in [RELEASE, DECLINE] {
            let m = msg(
                kind,
                &[(OPT_CLIENTID, CLIENT.to_vec()), (OPT_SERVERID, duid(MAC))],
            );
            let r = answer(&c, &m).unwrap();
            assert_eq!(r[0], REPLY);
            assert_eq!(&find(&r, OPT_STATUS_CODE).unwrap()[..2], &[0, 0]);
            assert_eq!(is_decline(&m), kind == DECLINE);
        }
    }

    #[test]
    fn domains_in_wire_form() {
        assert_eq!(dns_name(""), None);
        assert_eq!(dns_name("a.b.").unwrap(), b"\x01a\x01b\x00");
        assert_eq!(dns_name(&"x".repeat(64)), None);
    }
}
