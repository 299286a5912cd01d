//! The switch: ports on L2 segments, the MAC table, and the forwarding of
//! each frame a guest sends (in the sending port's thread, in order).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::conntrack::{Conntrack, Direction};
use crate::datapath::{self, Datapath};
use crate::dhcp::{self, DhcpConfig, DhcpServer, Outcome};
use crate::dhcp6;
use crate::dns;
use crate::dnsfwd;
use crate::flow::{
    icmp_echo_reply, link_local, route_rewrite, slaac, udp6_frame, udp_frame, Packet, Packet6,
    Tracked, ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP,
};
use crate::frame::{
    Arp, Ethernet, Ipv4, Ipv6, Mac, ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
};
use crate::l2::{Forward, MacTable, PortId, SegmentId};
use crate::memo::{Addrs, FlowKey};
use crate::metadata::{self, Endpoint};
use crate::nat::{Floating, Gateway, Nat, PortForward};
use crate::ndp;
use crate::offload::{self, NetHdr};
use crate::overlay::{self, Encap, Overlay};
use crate::port::{self, Out, Port};
use crate::qos::Limit;
use crate::ring::Pieces;
use crate::router::VpcId;
use crate::router::{Host, Subnet, L3};
use crate::secgroup::{contains6, GroupId, Groups, PortSecurity, Rule, SecurityGroup};
use crate::tunnel::{self, Outbox, Tunnel, TunnelStats};
use crate::uplink::{Tap, UplinkError, UPLINK_PORT};

/// How long a learned address stays without traffic from it.
pub const MAC_AGEING: Duration = Duration::from_secs(300);
/// How often the metadata endpoints' timers run.
const METADATA_TICK: Duration = Duration::from_millis(50);
/// Addresses the switch learns at most (all segments).
pub const MAC_TABLE_SIZE: usize = 65_536;

/// Switch errors.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The port's socket could not be created.
    #[error("cannot listen on {}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such port.
    #[error("no port {0}")]
    NoPort(u32),
    /// No such security group.
    #[error("no security group {0}")]
    NoGroup(u32),
    /// A group a port is in cannot go.
    #[error("security group {0} has ports in it")]
    GroupInUse(u32),
    /// The uplink could not be opened.
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    /// The data-path thread or its wake-up call could not be made.
    #[error("cannot start the data path")]
    DataPath(#[source] std::io::Error),
    /// The tunnel endpoint could not be opened.
    #[error("cannot open the tunnel endpoint {addr}")]
    Tunnel {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such rule.
    #[error("security group {0} has no rule {1}")]
    NoRule(u32, u32),
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) table: Mutex<MacTable>,
    pub(crate) ports: RwLock<BTreeMap<PortId, Arc<Port>>>,
    dhcp: Mutex<HashMap<SegmentId, DhcpServer>>,
    pub(crate) l3: RwLock<L3>,
    groups: RwLock<Groups>,
    overlay: RwLock<Overlay>,
    tunnel: RwLock<Option<Arc<Tunnel>>>,
    pub(crate) nat: Mutex<Nat>,
    pub(crate) uplink: RwLock<Option<Arc<Tap>>>,
    /// Segments bridged to the uplink, with their 802.1Q tag.
    pub(crate) uplinked: RwLock<HashMap<SegmentId, Option<u16>>>,
    pub(crate) uplink_stats: TunnelStats,
    /// Each port's metadata endpoint and the gateway MAC it answers from.
    metadata: Mutex<HashMap<PortId, (Endpoint, Mac)>>,
    /// The clock the metadata endpoints count from.
    started: Instant,
    /// Whether any VPC has a gateway (else no frame needs the NAT lock).
    pub(crate) nat_on: std::sync::atomic::AtomicBool,
    /// ICMPv6 errors the router may still send this second.
    pub(crate) icmp6_errors: ErrorRate,
    /// Every new port's budget for requests to the switch's services.
    service_limit: Mutex<(f64, f64)>,
    /// Where DNS queries for other names go, if anywhere.
    dns_forwarder: RwLock<Option<Arc<dnsfwd::Forwarder>>>,
    /// When the router next advertises on its IPv6 subnets unasked.
    next_advert: Mutex<Instant>,
    /// The data-path threads and the transmit rings each polls (the first
    /// also reads the tunnel endpoint and retries waiting frames).
    pub(crate) datapaths: Vec<Arc<Datapath>>,
}

/// The wait until the next unsolicited router advertisement: somewhere in
/// [`ndp::ADVERT_INTERVAL`], so that nodes and subnets do not advertise in
/// step.
fn advert_interval() -> Duration {
    let (lo, hi) = ndp::ADVERT_INTERVAL;
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    Duration::from_secs(lo + jitter % (hi - lo + 1))
}

/// ICMPv6 errors per second the router sends at most (RFC 4443 wants a
/// limit; a guest scanning a /64 gets a trickle, not a flood).
const ICMP6_ERRORS_PER_SECOND: u32 = 100;

/// A budget of errors per second.
#[derive(Debug)]
pub(crate) struct ErrorRate(Mutex<(Instant, u32)>);

impl ErrorRate {
    fn new() -> Self {
        Self(Mutex::new((Instant::now(), 0)))
    }

    /// Whether one more may go at `now`.
    pub(crate) fn allow(&self, now: Instant) -> bool {
        let mut b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(b.0) >= Duration::from_secs(1) {
            *b = (now, 0);
        }
        b.1 += 1;
        b.1 <= ICMP6_ERRORS_PER_SECOND
    }
}

impl Inner {
    /// The data-path thread that polls `port`'s transmit ring of queue pair
    /// `pair`: a port's pairs go to consecutive threads, ports round the
    /// threads by id.
    pub(crate) fn datapath_for(&self, port: PortId, pair: usize) -> &Arc<Datapath> {
        let n = self.datapaths.len().max(1);
        let i = (port.0 as usize).wrapping_add(pair) % n;
        &self.datapaths[i]
    }

    /// Port `id`, if it is on `seg` (it may have gone, or a route be
    /// stale).
    pub(crate) fn port_on(&self, seg: SegmentId, id: PortId) -> Option<Arc<Port>> {
        self.ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .filter(|p| p.segment == seg)
            .cloned()
    }

    /// Stops polling `port`'s rings on every thread.
    pub(crate) fn forget_rings(&self, port: PortId) {
        for dp in &self.datapaths {
            dp.forget(port);
        }
    }
}

/// Reads frames from the uplink until the switch goes or it is replaced.
fn uplink_loop(switch: &Weak<Inner>, tap: &Arc<Tap>, reader: &Tap) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(uplink = %tap.name, "uplink failed: {e}");
                return;
            }
        };
        let Some(inner) = switch.upgrade() else {
            return;
        };
        let current = inner
            .uplink
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, tap));
        if !current {
            return;
        }
        let mut kicks = Kicks::default();
        inner.uplink_frame(&buf[..n], &mut kicks);
        kicks.flush();
    }
}

/// Frames staged before a batch is written out regardless.
const STAGED_MAX: usize = 256;

/// A batch of frames from one port: its clock reading (one per batch, for
/// ageing and connection tracking) and the ports with frames written during
/// it, signalled once at its end.
pub(crate) struct Kicks {
    ports: Vec<Arc<Port>>,
    /// Frames for those ports: index in `ports`, header, where the bytes
    /// are.
    staged: Vec<(usize, NetHdr, Staged)>,
    /// Copies of frames that are not in `burst`.
    bytes: Vec<u8>,
    /// The frames of the burst being switched, as read from the guest
    /// (`burst_len` bytes used; the rest is kept to grow into): staged
    /// from here without another copy.
    burst: Vec<u8>,
    burst_len: usize,
    /// While a burst frame is being switched: where `burst` is (address,
    /// length), to recognise frames that lie in it.
    arena: (usize, usize),
    /// When the batch started.
    pub(crate) now: Instant,
    /// Frames and bytes switched from the port being drained, added to
    /// its counters at the end of its burst.
    pub(crate) sent: (u64, u64),
    /// Within a burst: whether the sending port's segment is plain (see
    /// [`Inner::plain_segment`]; None: not asked yet), and where the last
    /// frame with the same addresses went.
    plain: Option<bool>,
    memo: Option<Memo>,
    /// Within one receive call on the tunnel endpoint: frames taken (added
    /// to its counter at the end), and where the last one went.
    pub(crate) tunnel_rx: u64,
    rx_memo: Option<RxMemo>,
    /// Where the rests of frames staged in part are (kept apart: a staged
    /// entry stays small).
    rests: Vec<Pieces>,
    /// Tunnel datagrams to send together, and the endpoint.
    tunnel_out: Outbox,
    tunnel: Option<Arc<Tunnel>>,
}

/// Where the last frame of a burst that went to one local port went: a
/// frame with the same addresses (and, where the switch looked at it, the
/// same connection) goes there too.
struct Memo {
    addrs: Addrs,
    /// The frame's flow and ICMP type when the switch checked it against
    /// port security and connection tracking; None on a plain segment.
    flow: Option<(crate::flow::Flow, Option<u8>)>,
    /// With a flow, the bytes naming it when the frame is simple TCP or UDP
    /// over IPv4: a frame that matches them is of the same connection
    /// without being parsed.
    key: Option<FlowKey>,
    to: Target,
}

impl Memo {
    /// Whether it covers a frame of `len` bytes with addresses `addrs`
    /// that starts with `start` (its headers at least): the same addresses
    /// on a plain segment, else also the same connection, from the raw
    /// header.
    #[inline]
    fn covers(&self, addrs: Option<Addrs>, start: &[u8], len: usize) -> bool {
        addrs == Some(self.addrs)
            && match (&self.flow, &self.key) {
                (None, _) => true,
                (Some(_), Some(k)) => k.matches_start(start, len),
                (Some(_), None) => false,
            }
    }
}

/// Where a remembered frame went.
#[derive(Clone, Copy)]
enum Target {
    /// A local port, by its place in the staged batch's ports.
    Port(usize),
    /// Another node's tunnel endpoint, with the header for `vni`, through
    /// the endpoint the batch's datagrams go through (no reference count
    /// per frame).
    Remote { to: SocketAddr, vni: u32 },
}

/// Where the last frame from a tunnel endpoint went, within one receive
/// call: one with the same endpoint, VNI and addresses goes there too
/// (the endpoint was accepted for the network then).
struct RxMemo {
    from: IpAddr,
    vni: u32,
    addrs: Addrs,
    /// The receiver's place in the staged batch's ports.
    to: usize,
}

/// TCP flags that change a tracked connection's state: packets carrying
/// them always meet the connection trackers.
const TCP_STATE_FLAGS: u8 = crate::flow::TCP_SYN | crate::flow::TCP_FIN | crate::flow::TCP_RST;

/// Where a staged frame's bytes are.
#[derive(Debug, Clone)]
enum Staged {
    Burst(std::ops::Range<usize>),
    Copy(std::ops::Range<usize>),
    /// The first bytes in the burst, the rest in the sender's guest memory
    /// (see [`Kicks::switch_burst`]; its place in `Kicks::rests`).
    Parted(std::ops::Range<usize>, usize),
}

/// Bytes of a long frame read at first when its burst is read in part (see
/// [`Kicks::switch_burst`]): the headers the memo compares.
pub(crate) const PART_READ: usize = 64;

impl Default for Kicks {
    fn default() -> Self {
        Self {
            ports: Vec::new(),
            staged: Vec::new(),
            bytes: Vec::new(),
            burst: Vec::new(),
            burst_len: 0,
            arena: (0, 0),
            now: Instant::now(),
            sent: (0, 0),
            plain: None,
            memo: None,
            tunnel_rx: 0,
            rx_memo: None,
            rests: Vec::new(),
            tunnel_out: Outbox::default(),
            tunnel: None,
        }
    }
}

impl Kicks {
    /// Room for a frame of `len` bytes at the end of the burst, and where
    /// it starts; None past [`MAX_FRAME`](crate::frame::MAX_FRAME).
    pub(crate) fn reserve(&mut self, len: usize) -> Option<(usize, &mut [u8])> {
        if len > crate::frame::MAX_FRAME {
            return None;
        }
        if self.tunnel_out.has_lent() {
            // Gathered datagrams still point into the buffer.
            self.flush_tunnel();
        }
        let start = self.burst_len;
        if self.burst.len() < start + len {
            self.burst.resize(start + len, 0);
        }
        self.burst_len = start + len;
        Some((start, self.burst.get_mut(start..start + len)?))
    }

    /// Gives back the room reserved from `start` on.
    pub(crate) fn unreserve(&mut self, start: usize) {
        self.burst_len = self.burst_len.min(start);
    }

    /// Switches the frames read into the burst (where each is, its header,
    /// and for a frame read in part where the rest is) with `f`; they stay
    /// in the burst until the flush. Returns whether frames went to a port
    /// from where they were (reading the next burst in part pays).
    ///
    /// A frame read in part has its first [`PART_READ`] bytes in the
    /// burst. When the burst's remembered decision covers it (the same
    /// addresses as an earlier frame on a plain segment, or the same
    /// connection past both ports' checks; see [`Memo`]) and names a local
    /// port, it is staged as it lies: the port's buffers are written from
    /// the sender's memory, one copy instead of two. Otherwise the rest is
    /// read into the burst first and the frame switched as any other.
    ///
    /// # Safety
    /// The rests stay mapped until the staged frames are written (the
    /// caller flushes before it gives the chains back).
    pub(crate) unsafe fn switch_burst(
        &mut self,
        frames: &[(std::ops::Range<usize>, NetHdr, Option<usize>)],
        rests: &[Pieces],
        mut f: impl FnMut(&[u8], &NetHdr, &mut Self),
    ) -> bool {
        let mut burst = std::mem::take(&mut self.burst);
        self.arena = (burst.as_ptr() as usize, burst.len());
        self.plain = None;
        self.memo = None;
        let mut parted = false;
        for (range, hdr, rest) in frames {
            if let Some(rest) = rest.and_then(|i| rests.get(i)) {
                if self.stage_in_part(&burst, range, hdr, rest) {
                    parted = true;
                    continue;
                }
                let Some(dst) = burst.get_mut(range.start + PART_READ..range.end) else {
                    continue;
                };
                // SAFETY: mapped, as this function's contract says.
                if !unsafe { rest.read(0, dst) } {
                    continue;
                }
            }
            if let Some(frame) = burst.get(range.clone()) {
                f(frame, hdr, self);
            }
        }
        // Decisions hold for one burst: changes to the tables and the
        // configuration apply from the next.
        self.plain = None;
        self.memo = None;
        self.arena = (0, 0);
        self.burst = burst;
        parted
    }

    /// Stages the frame at `range` of `burst`, read in part (`rest` still
    /// in guest memory), for the local port the burst's remembered
    /// decision names, if it covers the frame; false (nothing done) if not.
    fn stage_in_part(
        &mut self,
        burst: &[u8],
        range: &std::ops::Range<usize>,
        hdr: &NetHdr,
        rest: &Pieces,
    ) -> bool {
        let Some(m) = &self.memo else {
            return false;
        };
        let Target::Port(at) = m.to else {
            return false;
        };
        let Some(start) = burst.get(range.start..range.start + PART_READ) else {
            return false;
        };
        if hdr.offloaded() || !m.covers(Addrs::of(start), start, range.len()) {
            return false;
        }
        self.sent.0 += 1;
        self.sent.1 += range.len() as u64;
        let admitted = self
            .ports
            .get(at)
            .is_some_and(|p| p.ingress_admit(range.len(), self.now));
        if admitted {
            let head = range.start..range.start + PART_READ;
            self.rests.push(*rest);
            let rest = self.rests.len() - 1;
            self.staged.push((at, *hdr, Staged::Parted(head, rest)));
        }
        true
    }

    /// Whether `frame` lies in the arena.
    fn in_arena(&self, frame: &[u8]) -> bool {
        let (base, len) = self.arena;
        let addr = frame.as_ptr() as usize;
        len > 0 && addr >= base && addr + frame.len() <= base + len
    }

    /// Lends the burst buffer, grown to `len` bytes, to `f` (to read
    /// frames into); frames staged from it are taken without a copy, and
    /// written out before it returns.
    pub(crate) fn lend_burst<R>(
        &mut self,
        len: usize,
        f: impl FnOnce(&mut [u8], &mut Self) -> R,
    ) -> R {
        // Nothing staged or gathered may point into the buffer while it is
        // rewritten.
        self.flush();
        let mut burst = std::mem::take(&mut self.burst);
        if burst.len() < len {
            burst.resize(len, 0);
        }
        self.arena = (burst.as_ptr() as usize, burst.len());
        let r = f(&mut burst, self);
        self.arena = (0, 0);
        self.burst = burst;
        self.flush();
        r
    }

    /// Stages `frame` for `port`: written into its rings with the others
    /// of the batch at the next flush.
    pub(crate) fn stage(&mut self, port: &Arc<Port>, hdr: &NetHdr, frame: &[u8]) {
        let at = match self.ports.iter().position(|p| p.id == port.id) {
            Some(at) => at,
            None => {
                self.ports.push(port.clone());
                self.ports.len() - 1
            }
        };
        self.stage_at(at, hdr, frame);
    }

    /// Where a remembered frame went: `frame` goes to the `at`-th port of
    /// the batch, if it admits it.
    #[inline]
    fn again(&mut self, to: &Target, hdr: &NetHdr, frame: &[u8]) {
        match to {
            Target::Port(at) => self.admit_at(*at, hdr, frame),
            Target::Remote { to, vni } => {
                if let Some(header) = self.tunnel.as_ref().map(|t| t.encap.header(*vni)) {
                    self.push_datagram(*to, header, frame);
                }
            }
        }
    }

    /// Stages `frame` for the `at`-th port of the batch if its ingress
    /// rate admits it.
    fn admit_at(&mut self, at: usize, hdr: &NetHdr, frame: &[u8]) {
        if self
            .ports
            .get(at)
            .is_some_and(|p| p.ingress_admit(frame.len(), self.now))
        {
            self.stage_at(at, hdr, frame);
        }
    }

    /// Where in the batch the last staged frame went, if to port `p` and
    /// `p` is not mirrored (a remembered decision may send there again),
    /// and the port.
    fn last_staged_to(&self, p: PortId) -> Option<(usize, &Arc<Port>)> {
        let (at, _, _) = self.staged.last()?;
        let to = self.ports.get(*at)?;
        (to.id == p && to.mirror_target().is_none()).then_some((*at, to))
    }

    /// [`Kicks::stage`] for the `at`-th port of the batch.
    fn stage_at(&mut self, at: usize, hdr: &NetHdr, frame: &[u8]) {
        let src = if self.in_arena(frame) {
            let off = frame.as_ptr() as usize - self.arena.0;
            Staged::Burst(off..off + frame.len())
        } else {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(frame);
            Staged::Copy(start..self.bytes.len())
        };
        self.staged.push((at, *hdr, src));
        // Outside a burst (which the data path flushes itself), a long
        // batch is written out before it grows further.
        if self.arena.1 == 0 && self.burst_len == 0 && self.staged.len() >= STAGED_MAX {
            self.flush_ports();
        }
    }

    /// Writes the staged frames into their ports' rings (a batch per port).
    fn flush_ports(&mut self) {
        // Remembered decisions name places in the batch.
        self.memo = None;
        self.rx_memo = None;
        let mut frames: Vec<(&NetHdr, Out<'_>)> = Vec::with_capacity(self.staged.len());
        for (at, p) in self.ports.iter().enumerate() {
            frames.clear();
            // Headers by reference: a copy through the stack was stored
            // field by field and read back whole, a stall per frame.
            for (i, h, src) in &self.staged {
                if *i != at {
                    continue;
                }
                let bytes = match src {
                    Staged::Burst(r) => self.burst.get(r.clone()).map(Out::whole),
                    Staged::Copy(r) => self.bytes.get(r.clone()).map(Out::whole),
                    // SAFETY: the rest stays mapped until this flush
                    // (`switch_burst`'s contract).
                    Staged::Parted(r, rest) => self
                        .burst
                        .get(r.clone())
                        .zip(self.rests.get(*rest))
                        .map(|(start, rest)| unsafe { Out::parted(start, rest) }),
                };
                if let Some(b) = bytes {
                    frames.push((h, b));
                }
            }
            p.enqueue_batch(&frames);
        }
        self.ports.clear();
        self.staged.clear();
        self.rests.clear();
        self.bytes.clear();
        self.burst_len = 0;
    }

    /// Adds `frame` for endpoint `to` (network `vni`) through `tunnel` to
    /// the datagrams to send.
    fn gather_datagram(&mut self, endpoint: &Arc<Tunnel>, to: SocketAddr, vni: u32, frame: &[u8]) {
        if !self
            .tunnel
            .as_ref()
            .is_some_and(|k| Arc::ptr_eq(k, endpoint))
        {
            // What was gathered for another endpoint goes first.
            self.flush_tunnel();
            self.tunnel = Some(endpoint.clone());
        }
        self.push_datagram(to, endpoint.encap.header(vni), frame);
    }

    /// Adds `frame` behind `header` for `to`, through the endpoint of the
    /// datagrams gathered.
    fn push_datagram(&mut self, to: SocketAddr, header: [u8; overlay::HEADER], frame: &[u8]) {
        if frame.len() >= tunnel::LEND_MIN && self.in_arena(frame) {
            // SAFETY: the arena (the burst buffer) is neither written nor
            // moved before the tunnel's datagrams are sent: `reserve` and
            // `lend_burst` send them first.
            unsafe { self.tunnel_out.push_lent(to, header, frame) };
        } else {
            self.tunnel_out.push(to, header, frame);
        }
        if self.tunnel_out.len() >= tunnel::BATCH {
            self.flush_tunnel();
        }
    }

    /// Ends a receive call on `endpoint`: its counter grows by the frames
    /// taken, and what was remembered is forgotten.
    pub(crate) fn end_tunnel_receive(&mut self, endpoint: &Tunnel) {
        let n = std::mem::take(&mut self.tunnel_rx);
        if n > 0 {
            endpoint.stats.rx.fetch_add(n, Ordering::Relaxed);
        }
        self.rx_memo = None;
    }

    /// Sends the tunnel datagrams gathered.
    pub(crate) fn flush_tunnel(&mut self) {
        if let (Some(t), false) = (&self.tunnel, self.tunnel_out.is_empty()) {
            t.send(&mut self.tunnel_out);
        }
    }

    /// Writes the staged frames and sends the tunnel datagrams.
    pub(crate) fn flush(&mut self) {
        self.flush_ports();
        self.flush_tunnel();
    }
}

/// A frame's ARP packet or IPv4 packet (with its transport view), parsed
/// once for everything that follows; either must be well formed. Other
/// protocols give neither.
pub(crate) type Parsed<'a> = (Option<Arp>, Option<(Packet, Ipv4<'a>)>);

/// Parses what follows `eth`'s header (see [`Parsed`]).
#[inline(always)]
pub(crate) fn parse_l3<'a>(eth: &Ethernet<'a>) -> Result<Parsed<'a>, crate::frame::FrameError> {
    Ok(match eth.ethertype {
        ETHERTYPE_ARP => (Some(Arp::parse(eth.payload)?), None),
        ETHERTYPE_IPV4 => {
            let ip = Ipv4::parse(eth.payload)?;
            (None, Some((Packet::of(&ip)?, ip)))
        }
        _ => (None, None),
    })
}

/// An IPv6 packet's flow and its header, parsed.
type Parsed6<'a> = (Packet6, Ipv6<'a>);

/// The IPv6 packet in `eth`, if it carries one (None for other protocols).
pub(crate) fn parse_ipv6<'a>(
    eth: &Ethernet<'a>,
) -> Result<Option<Parsed6<'a>>, crate::frame::FrameError> {
    if eth.ethertype != ETHERTYPE_IPV6 {
        return Ok(None);
    }
    let ip = Ipv6::parse(eth.payload)?;
    Ok(Some((Packet6::of6(&ip)?, ip)))
}

/// Whether `p` (in `frame`, to port `to`) is an ICMP error about a
/// connection `to` has (a path MTU too small, a port unreachable): let in
/// with it, whatever the rules (path MTU discovery depends on it).
fn related(to: &Port, frame: &[u8], p: &Packet, now: Instant) -> bool {
    if p.flow.proto != PROTO_ICMP || !p.icmp_type.is_some_and(crate::flow::icmp_error) {
        return false;
    }
    let quoted = Ethernet::parse(frame)
        .ok()
        .and_then(|e| Ipv4::parse(e.payload).ok())
        .and_then(|ip| crate::flow::quoted(ip.payload));
    quoted.is_some_and(|f| {
        to.conntrack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .related(&f, now)
    })
}

/// [`related`] for ICMPv6 errors (packet too big above all).
fn related6(to: &Port, p: &Packet6, ip: &Ipv6<'_>, now: Instant) -> bool {
    if p.flow.proto != PROTO_ICMPV6 || !p.icmp_type.is_some_and(crate::flow::icmpv6_error) {
        return false;
    }
    crate::flow::quoted6(ip.payload).is_some_and(|f| {
        to.conntrack6
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .related(&f, now)
    })
}

/// ICMPv6 types of neighbour discovery and multicast listener discovery:
/// what IPv6 needs to work on a link at all. They pass ingress without a
/// rule, as ARP does.
fn link_control(p: &Packet6) -> bool {
    p.flow.proto == PROTO_ICMPV6 && matches!(p.icmp_type, Some(130..=137 | 143))
}

/// Why the switch refused a frame (logged at debug level, counted on the port).
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub(crate) enum Refused {
    #[error("spoofed {0}")]
    Spoofed(&'static str),
    #[error("no egress rule allows the connection")]
    Egress,
    #[error("neither IPv4, IPv6 nor ARP")]
    NotIp,
    #[error("{0} from a VM")]
    RouterOnly(&'static str),
    #[error("malformed neighbour discovery: {0}")]
    Neighbour(&'static str),
}

/// Checks a router solicitation (133), neighbour solicitation (135) or
/// advertisement (136) from a port with `mac`: link-layer address options
/// must name the port's MAC, and an advertisement's target must be an
/// address the port may use (no answering for another VM's address).
///
/// A solicitation from `::` (`dad`: duplicate address detection) must be
/// for an address the port may use too: another's tentative address would
/// otherwise look taken to its owner, who would give it up.
pub(crate) fn nd_about_itself(
    kind: u8,
    icmp: &[u8],
    mac: Mac,
    sec: &PortSecurity,
    dad: bool,
) -> Result<(), Refused> {
    // Fixed part: type, code, checksum, then 4 bytes (RS) or 4 bytes and a
    // 16-byte target (NS, NA).
    let fixed = if kind == ndp::ROUTER_SOLICITATION {
        8
    } else {
        24
    };
    let Some(mut opts) = icmp.get(fixed..) else {
        return Err(Refused::Neighbour("message too short"));
    };
    if kind == ndp::NEIGHBOUR_ADVERTISEMENT || (kind == ndp::NEIGHBOUR_SOLICITATION && dad) {
        let mut t = [0u8; 16];
        t.copy_from_slice(&icmp[8..24]);
        if !sec.may_use6(std::net::Ipv6Addr::from(t)) {
            return Err(Refused::Spoofed("neighbour discovery target"));
        }
    }
    while !opts.is_empty() {
        let (Some(&kind), Some(&units)) = (opts.first(), opts.get(1)) else {
            return Err(Refused::Neighbour("truncated option"));
        };
        let len = usize::from(units) * 8;
        let Some(opt) = opts.get(..len).filter(|_| len > 0) else {
            return Err(Refused::Neighbour("option length"));
        };
        // Source (1) and target (2) link-layer address options.
        if matches!(kind, 1 | 2) && opt.get(2..8) != Some(&mac[..]) {
            return Err(Refused::Spoofed("link-layer address option"));
        }
        opts = &opts[len..];
    }
    Ok(())
}

impl Inner {
    /// Forwards one frame `from` sent.
    pub(crate) fn switch_frame(&self, from: &Port, frame: &[u8], hdr: &NetHdr, kicks: &mut Kicks) {
        let addrs = Addrs::of(frame);
        if !hdr.offloaded() && frame.len() <= crate::frame::MAX_FRAME {
            // The same addresses as an earlier frame of this burst on a
            // plain segment, or the same connection where that one passed
            // the security checks: where that one went, unparsed.
            let hit = kicks
                .memo
                .as_ref()
                .filter(|m| m.covers(addrs, frame, frame.len()));
            if let Some(to) = hit.map(|m| m.to) {
                kicks.sent.0 += 1;
                kicks.sent.1 += frame.len() as u64;
                kicks.again(&to, hdr, frame);
                return;
            }
        }
        let eth = match Ethernet::parse(frame) {
            Ok(e) => e,
            Err(e) => {
                from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                warn!(port = from.id.0, "dropped a frame: {e}");
                return;
            }
        };
        if hdr.offloaded() && !self.offload_stays(from, &eth, kicks.now) {
            // Not for one local port: finished here, then switched as the
            // frames the guest could have sent.
            let done = offload::finish(frame, hdr, |f| {
                self.switch_frame(from, f, &NetHdr::PLAIN, kicks);
            });
            if let Err(e) = done {
                self.malformed(from, e);
            }
            return;
        }
        // On a plain segment the switch is a learning bridge and leaves the
        // payload alone, as any L2 switch does; where it acts on L3 (a
        // subnet, filters, NAT), ARP and IPv4 must parse, and other
        // protocols pass as they are on unfiltered ports.
        let plain = self.plain(from, kicks);
        let (arp, ip) = if plain {
            (None, None)
        } else {
            match parse_l3(&eth) {
                Ok(l3) => l3,
                Err(e) => return self.malformed(from, e),
            }
        };
        let ip6 = if plain {
            None
        } else {
            match parse_ipv6(&eth) {
                Ok(p) => p,
                Err(e) => return self.malformed(from, e),
            }
        };
        kicks.sent.0 += 1;
        kicks.sent.1 += frame.len() as u64;
        if let (Some(m), Some((p, _))) = (&kicks.memo, &ip) {
            // The same connection as a frame before it in this burst that
            // passed both ports' checks: where that one went.
            let same = m.flow.is_some_and(|(f, icmp)| {
                p.flow == f && p.icmp_type == icmp && p.tcp_flags & TCP_STATE_FLAGS == 0
            }) && addrs == Some(m.addrs)
                && !hdr.offloaded();
            if same {
                let to = m.to;
                kicks.again(&to, hdr, frame);
                return;
            }
        }
        self.mirror(from, frame, hdr, kicks);
        let now = kicks.now;
        if from.filtered.load(Ordering::Acquire) {
            let sec = from.security.read().unwrap_or_else(PoisonError::into_inner);
            let pkt = ip.as_ref().map(|p| &p.0);
            let l3 = (arp.as_ref(), pkt, ip6.as_ref());
            if let Err(why) = self.egress(from, &sec, &eth, l3, now) {
                from.stats.tx_filtered.fetch_add(1, Ordering::Relaxed);
                debug!(port = from.id.0, "refused a frame: {why}");
                return;
            }
        }
        // DHCP requests are the switch's to answer on a segment with a server.
        let dhcp_port = |p: &(Packet, Ipv4<'_>)| {
            p.0.flow.proto == PROTO_UDP && p.0.flow.sport == 68 && p.0.flow.dport == 67
        };
        let dhcp = if ip.as_ref().is_some_and(dhcp_port) && dhcp::is_request(frame) {
            self.dhcp
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&from.segment)
                .map(|server| {
                    if from.service_admit(now) {
                        server.handle(frame, now)
                    } else {
                        Outcome::Ignored
                    }
                })
        } else {
            None
        };
        match dhcp {
            Some(Outcome::Reply(reply)) => {
                from.deliver(&reply);
                return;
            }
            Some(Outcome::Ignored) => return,
            Some(Outcome::NotDhcp) | None => {}
        }
        if !plain {
            let l3 = self.l3.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(subnet) = l3.subnet(from.segment) {
                if let Some(a) = arp.filter(|a| {
                    a.op == ARP_REQUEST && (a.tpa == subnet.gateway || a.tpa == metadata::ADDRESS)
                }) {
                    if from.service_admit(now) {
                        from.deliver(&a.reply_from(subnet.gateway_mac).to_frame(a.sha));
                    }
                    return;
                }
                if let (Some((_, ipv4)), true) = (&ip, eth.dst == subnet.gateway_mac) {
                    if ipv4.dst == metadata::ADDRESS {
                        let len = ipv4.header_len + ipv4.payload.len();
                        if let Some(packet) =
                            eth.payload.get(..len).filter(|_| from.service_admit(now))
                        {
                            self.metadata_packet(from, subnet.gateway_mac, Some(packet));
                        }
                        return;
                    }
                }
                if let (Some((pkt, ipv4)), true) = (&ip, eth.dst == subnet.gateway_mac) {
                    self.route(from, &l3, subnet, (frame, hdr), pkt, ipv4, now, kicks);
                    return;
                }
                if let Some((p6, v6)) = &ip6 {
                    match self.service6(from, &l3, subnet, (p6, v6), now) {
                        Service::Reply(reply) => {
                            from.deliver(&reply);
                            return;
                        }
                        Service::Taken => return,
                        Service::Pass => {}
                    }
                    let routes = subnet.vpc.is_some();
                    let ours = |a| l3.is_gateway6(from.segment, a);
                    if let Some(reply) = ndp::answer(subnet, routes, from.mac, (p6, v6), ours) {
                        if from.service_admit(now) {
                            from.deliver(&reply);
                        }
                        return;
                    }
                    if eth.dst == subnet.gateway_mac {
                        // Without a /64 the router does not route IPv6.
                        self.route6(from, &l3, (frame, hdr), v6, now, kicks);
                        return;
                    }
                }
            }
        }
        let decision = self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forward(from.segment, from.id, eth.src, eth.dst, now);
        if self.external_frame(from.segment, frame, &eth, arp.as_ref(), ip.as_ref(), kicks) {
            return;
        }
        if let Some((p6, v6)) = &ip6 {
            if self.external_frame6(from.segment, frame, &eth, (p6, v6), kicks) {
                return;
            }
        }
        let pkt = ip.as_ref().map(|p| &p.0);
        let staged = kicks.staged.len();
        self.forward_local(from.segment, from.id, decision, (frame, hdr), pkt, kicks);
        if kicks.staged.len() == staged + 1 {
            // Delivered to one port, past its checks.
            self.remember(from, frame, pkt, decision, hdr, kicks);
        }
        match decision {
            Forward::Port(p) if p.0 >= overlay::REMOTE_PORTS => {
                let remote = self
                    .overlay
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remote_of(p);
                if let Some(r) = remote {
                    let sent = self.to_tunnel(from.segment, &[r], frame, kicks);
                    // On a plain segment the next frames with these
                    // addresses go to the same endpoint.
                    if let (Some((vni, tunnel)), true) = (sent, plain && !hdr.offloaded()) {
                        kicks.memo = addrs.map(|addrs| Memo {
                            addrs,
                            flow: None,
                            key: None,
                            to: Target::Remote {
                                to: SocketAddr::new(r, tunnel.port),
                                vni,
                            },
                        });
                    }
                }
            }
            Forward::Flood => {
                let remotes = self
                    .overlay
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remotes(from.segment)
                    .map(|(_, r)| r.to_vec());
                if let Some(r) = remotes.filter(|r| !r.is_empty()) {
                    self.to_tunnel(from.segment, &r, frame, kicks);
                }
            }
            _ => {}
        }
    }

    /// [`Inner::plain_segment`] for `from`, asked once per burst.
    fn plain(&self, from: &Port, kicks: &mut Kicks) -> bool {
        match kicks.plain {
            Some(b) => b,
            None => {
                let b = self.plain_segment(from);
                kicks.plain = Some(b);
                b
            }
        }
    }

    /// Whether frames from `from` need nothing but the MAC table: it is not
    /// filtered or mirrored, its segment has no subnet (no gateway,
    /// routing, metadata) and no DHCP server, and no VPC has a way out
    /// (NAT).
    fn plain_segment(&self, from: &Port) -> bool {
        !from.filtered.load(Ordering::Acquire)
            && from.mirror_target().is_none()
            && !self.nat_on.load(Ordering::Acquire)
            && self
                .l3
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .subnet(from.segment)
                .is_none()
            && !self
                .dhcp
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&from.segment)
    }

    /// Remembers, for the rest of the burst, that frames from `from` with
    /// `frame`'s addresses go to the one local port `decision` names (which
    /// took this one): on a plain segment for any such frame, otherwise
    /// for frames of `pkt`'s connection that change no tracked state, once
    /// this one passed both ports' security (neither port mirrored, no
    /// NAT, no offload).
    fn remember(
        &self,
        from: &Port,
        frame: &[u8],
        pkt: Option<&Packet>,
        decision: Forward,
        hdr: &NetHdr,
        kicks: &mut Kicks,
    ) {
        let Forward::Port(p) = decision else {
            return;
        };
        if p == UPLINK_PORT || p.0 >= overlay::REMOTE_PORTS || hdr.offloaded() {
            return;
        }
        let flow = if self.plain(from, kicks) {
            None
        } else {
            let Some(pkt) = pkt else {
                return;
            };
            if from.mirror_target().is_some() || self.nat_on.load(Ordering::Acquire) {
                return;
            }
            Some((pkt.flow, pkt.icmp_type))
        };
        // The frame was just staged for `p`.
        let to = kicks.last_staged_to(p).and_then(|(at, to)| {
            let fits = to.segment == from.segment
                && (flow.is_some() || !to.filtered.load(Ordering::Acquire));
            fits.then_some(at)
        });
        let key = flow.and_then(|_| FlowKey::of(frame));
        kicks.memo = to.zip(Addrs::of(frame)).map(|(at, addrs)| Memo {
            addrs,
            flow,
            key,
            to: Target::Port(at),
        });
    }

    /// Hands a frame on `segment` that came in on `in_port` to the local
    /// ports `decision` names; an offloaded frame going anywhere but one
    /// port is finished first.
    pub(crate) fn forward_local(
        &self,
        segment: SegmentId,
        in_port: PortId,
        decision: Forward,
        (frame, hdr): (&[u8], &NetHdr),
        pkt: Option<&Packet>,
        kicks: &mut Kicks,
    ) {
        let one_port = matches!(decision, Forward::Port(p) if p != UPLINK_PORT);
        if hdr.offloaded() && !one_port {
            let done = offload::finish(frame, hdr, |f| {
                let ip = Ethernet::parse(f)
                    .ok()
                    .and_then(|e| parse_l3(&e).ok())
                    .and_then(|(_, ip)| ip.map(|(p, _)| p));
                let plain = (f, &NetHdr::PLAIN);
                self.forward_local(segment, in_port, decision, plain, ip.as_ref(), kicks);
            });
            if let Err(e) = done {
                debug!(segment = segment.0, "dropped an offloaded frame: {e}");
            }
            return;
        }
        let ports = self.ports.read().unwrap_or_else(PoisonError::into_inner);
        match decision {
            Forward::Port(UPLINK_PORT) => {
                drop(ports);
                self.to_uplink(segment, frame);
            }
            Forward::Port(p) => {
                if let Some(to) = ports.get(&p).filter(|to| to.segment == segment) {
                    self.deliver_checked(to, (frame, hdr), pkt, kicks.now, kicks);
                }
            }
            Forward::Flood => {
                for to in ports
                    .values()
                    .filter(|p| p.segment == segment && p.id != in_port)
                {
                    self.deliver_checked(to, (frame, hdr), pkt, kicks.now, kicks);
                }
                drop(ports);
                if in_port != UPLINK_PORT {
                    self.to_uplink(segment, frame);
                }
            }
            Forward::Drop => {}
        }
    }

    /// Whether an offloaded frame from `from` goes to one local port (by
    /// MAC, or routed to a VM of the VPC), so it may keep its offload.
    fn offload_stays(&self, from: &Port, eth: &Ethernet<'_>, now: Instant) -> bool {
        if crate::frame::is_group(&eth.dst) {
            return false;
        }
        let to = {
            let l3 = self.l3.read().unwrap_or_else(PoisonError::into_inner);
            match l3.subnet(from.segment) {
                Some(subnet) if subnet.gateway_mac == eth.dst => {
                    let Some(ip) = crate::frame::Ipv4::parse(eth.payload).ok() else {
                        return false;
                    };
                    if l3.is_gateway(from.segment, ip.dst) {
                        return false;
                    }
                    match l3.route(from.segment, ip.dst) {
                        Some((seg, _, host)) => Some((seg, host.port)),
                        None => return false,
                    }
                }
                _ => None,
            }
        };
        let (segment, port) = match to {
            Some(t) => t,
            None => {
                let found = self
                    .table
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .lookup(from.segment, eth.dst, now);
                match found {
                    Some(p) if p != UPLINK_PORT && p.0 < overlay::REMOTE_PORTS => (from.segment, p),
                    _ => return false,
                }
            }
        };
        self.ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&port)
            .is_some_and(|p| p.segment == segment)
    }

    /// Sends `frame` of overlay `segment` to the endpoints `remotes`.
    /// Returns the VNI and the endpoint used, if sent.
    fn to_tunnel(
        &self,
        segment: SegmentId,
        remotes: &[IpAddr],
        frame: &[u8],
        kicks: &mut Kicks,
    ) -> Option<(u32, Arc<Tunnel>)> {
        let tunnel = self
            .tunnel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let vni = self
            .overlay
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .remotes(segment)
            .map(|(v, _)| v);
        let (Some(t), Some(vni)) = (tunnel, vni) else {
            return None;
        };
        for r in remotes {
            kicks.gather_datagram(&t, SocketAddr::new(*r, t.port), vni, frame);
        }
        Some((vni, t))
    }

    /// The node's tunnel endpoint, if it has one.
    pub(crate) fn tunnel(&self) -> Option<Arc<Tunnel>> {
        self.tunnel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A datagram from the tunnel endpoint `from`.
    pub(crate) fn tunnel_datagram(
        &self,
        t: &Tunnel,
        from: IpAddr,
        datagram: &[u8],
        kicks: &mut Kicks,
    ) {
        let decap = t.encap.decap(datagram);
        let addrs = decap.and_then(|(_, inner)| Addrs::of(inner));
        let hit = kicks.rx_memo.as_ref().filter(|m| {
            decap.is_some_and(|(vni, _)| m.vni == vni) && m.from == from && addrs == Some(m.addrs)
        });
        if let (Some(at), Some((_, inner))) = (hit.map(|m| m.to), decap) {
            // From the endpoint, for the network and with the addresses of
            // an earlier datagram of this receive call: where that went.
            kicks.tunnel_rx += 1;
            kicks.admit_at(at, &NetHdr::PLAIN, inner);
            return;
        }
        let accepted = decap.and_then(|(vni, inner)| {
            let (seg, pseudo) = self
                .overlay
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .accept(vni, from)?;
            Some((vni, seg, pseudo, inner))
        });
        let Some((vni, seg, pseudo, inner)) = accepted else {
            t.stats.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(%from, "dropped a datagram from no endpoint of its network");
            return;
        };
        // Bridged as it came (the sending node's switch checked it); a
        // filtered receiver parses what it gets.
        let Ok(eth) = Ethernet::parse(inner) else {
            t.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        kicks.tunnel_rx += 1;
        let decision = self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forward(seg, pseudo, eth.src, eth.dst, kicks.now);
        // Split horizon: what came from the tunnel never goes back into it.
        let staged = kicks.staged.len();
        self.forward_local(seg, pseudo, decision, (inner, &NetHdr::PLAIN), None, kicks);
        if let (Forward::Port(p), true) = (decision, kicks.staged.len() == staged + 1) {
            let to = kicks
                .last_staged_to(p)
                .and_then(|(at, to)| (!to.filtered.load(Ordering::Acquire)).then_some(at));
            kicks.rx_memo = to.zip(addrs).map(|(to, addrs)| RxMemo {
                from,
                vni,
                addrs,
                to,
            });
        }
    }

    /// Feeds a packet (or, with None, only the timers) to `from`'s
    /// metadata endpoint and hands its answers to the VM.
    fn metadata_packet(&self, from: &Port, gateway_mac: Mac, packet: Option<&[u8]>) {
        let md = from.metadata.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.started.elapsed();
        let out = {
            let mut eps = self.metadata.lock().unwrap_or_else(PoisonError::into_inner);
            let ep = eps
                .entry(from.id)
                .or_insert_with(|| (Endpoint::new(now), gateway_mac));
            ep.1 = gateway_mac;
            ep.0.poll(packet, now, &md)
        };
        drop(md);
        for p in out {
            let mut f = Vec::with_capacity(14 + p.len());
            f.extend_from_slice(&from.mac);
            f.extend_from_slice(&gateway_mac);
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            f.extend_from_slice(&p);
            from.deliver(&f);
        }
    }

    /// Runs the metadata endpoints' timers (retransmissions, closing).
    fn metadata_timers(&self) {
        let ids: Vec<(PortId, Mac)> = self
            .metadata
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, (_, mac))| (*id, *mac))
            .collect();
        for (id, mac) in ids {
            let port = self
                .ports
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&id)
                .cloned();
            match port {
                Some(p) => self.metadata_packet(&p, mac, None),
                None => {
                    self.metadata
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id);
                }
            }
        }
    }

    /// Advertises on every IPv6 subnet when it is time.
    fn advert_timer(&self, now: Instant) {
        {
            let mut next = self
                .next_advert
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if now < *next {
                return;
            }
            *next = now + advert_interval();
        }
        self.advertise();
    }

    /// An unsolicited router advertisement to every local port on a subnet
    /// with an IPv6 /64.
    fn advertise(&self) {
        let adverts: Vec<(SegmentId, Vec<u8>)> = self
            .l3
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .subnets6()
            .filter_map(|(seg, s)| {
                ndp::advertise(s, s.vpc.is_some(), ndp::ALL_NODES_TO).map(|f| (seg, f))
            })
            .collect();
        let ports: Vec<Arc<Port>> = self
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for (seg, frame) in &adverts {
            // Only to connected guests: one without a frontend would find a
            // pile of stale ones when it comes.
            for p in ports
                .iter()
                .filter(|p| p.segment == *seg && p.memory().is_some())
            {
                p.deliver(frame);
            }
        }
    }

    fn malformed(&self, from: &Port, e: crate::frame::FrameError) {
        from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
        debug!(port = from.id.0, "dropped a malformed frame: {e}");
    }

    /// What a filtered port may send: its own MAC and addresses only, ARP,
    /// IPv4 and IPv6 only, and IP only on connections its groups allow out.
    fn egress(
        &self,
        from: &Port,
        sec: &PortSecurity,
        eth: &Ethernet<'_>,
        (arp, pkt, ip6): (Option<&Arp>, Option<&Packet>, Option<&Parsed6<'_>>),
        now: Instant,
    ) -> Result<(), Refused> {
        if !sec.enabled() {
            return Ok(());
        }
        if eth.src != from.mac || eth.vlan.is_some() {
            return Err(Refused::Spoofed("source MAC"));
        }
        if let Some(a) = arp {
            if a.sha != from.mac || !(sec.may_use(a.spa) || a.spa.is_unspecified()) {
                return Err(Refused::Spoofed("ARP sender"));
            }
            return Ok(());
        }
        let Some(p) = pkt else {
            return match ip6 {
                Some(v6) => self.egress6(from, sec, v6, now),
                None => Err(Refused::NotIp),
            };
        };
        // DHCP is always let out, from no address yet or from its own; a
        // DHCP server's messages are the router's.
        if p.flow.proto == PROTO_UDP && p.flow.sport == 67 && p.flow.dport == 68 {
            return Err(Refused::RouterOnly("DHCP server message"));
        }
        let dhcp = p.flow.proto == PROTO_UDP && p.flow.sport == 68 && p.flow.dport == 67;
        if !sec.may_use(p.flow.src) {
            return if dhcp && p.flow.src.is_unspecified() {
                Ok(())
            } else {
                Err(Refused::Spoofed("source IP"))
            };
        }
        if dhcp {
            return Ok(());
        }
        if self.admit(from, sec, Direction::Egress, p, now) {
            Ok(())
        } else {
            Err(Refused::Egress)
        }
    }

    /// What a filtered port may send in IPv6: from its own addresses (the
    /// unspecified address for duplicate address detection and listener
    /// reports); neighbour discovery only about itself, never as a router
    /// (router advertisements and redirects are the router's); anything
    /// else on connections its groups allow out.
    fn egress6(
        &self,
        from: &Port,
        sec: &PortSecurity,
        (p, ip): &Parsed6<'_>,
        now: Instant,
    ) -> Result<(), Refused> {
        let own = sec.may_use6(p.flow.src) || (p.flow.src.is_unspecified() && link_control(p));
        if !own {
            return Err(Refused::Spoofed("source IPv6"));
        }
        if link_control(p) {
            return match p.icmp_type {
                Some(ndp::ROUTER_ADVERTISEMENT) => Err(Refused::RouterOnly("router advertisement")),
                Some(ndp::REDIRECT) => Err(Refused::RouterOnly("redirect")),
                Some(t @ ndp::ROUTER_SOLICITATION..=ndp::NEIGHBOUR_ADVERTISEMENT) => {
                    let dad = p.flow.src.is_unspecified();
                    nd_about_itself(t, ip.payload, from.mac, sec, dad)
                }
                _ => Ok(()),
            };
        }
        // DHCPv6 clients are always let out (from their link-local
        // address); servers' messages are the router's.
        if p.flow.proto == PROTO_UDP {
            match (p.flow.sport, p.flow.dport) {
                (dhcp6::SERVER_PORT, dhcp6::CLIENT_PORT) => {
                    return Err(Refused::RouterOnly("DHCPv6 server message"))
                }
                (dhcp6::CLIENT_PORT, dhcp6::SERVER_PORT) => return Ok(()),
                _ => {}
            }
        }
        if self.admit6(from, sec, Direction::Egress, p, now) {
            Ok(())
        } else {
            Err(Refused::Egress)
        }
    }

    /// [`Inner::admit`] for IPv6.
    fn admit6(
        &self,
        port: &Port,
        sec: &PortSecurity,
        dir: Direction,
        p: &Packet6,
        now: Instant,
    ) -> bool {
        self.admit_by(&port.conntrack6, p, dir, now, |g| {
            g.allows6(&sec.groups, dir, &p.flow)
        })
    }

    /// Whether `port`'s tracker or groups let `p` through in `dir`.
    fn admit(
        &self,
        port: &Port,
        sec: &PortSecurity,
        dir: Direction,
        p: &Packet,
        now: Instant,
    ) -> bool {
        self.admit_by(&port.conntrack, p, dir, now, |g| {
            g.allows(&sec.groups, dir, &p.flow)
        })
    }

    /// Whether tracker `ct` passes `p` in `dir`, else whether `rules` (asked
    /// of the groups only then) do.
    fn admit_by<F: Tracked>(
        &self,
        ct: &Mutex<Conntrack<F>>,
        p: &Packet<F>,
        dir: Direction,
        now: Instant,
        rules: impl FnOnce(&Groups) -> bool,
    ) -> bool {
        let groups = || rules(&self.groups.read().unwrap_or_else(PoisonError::into_inner));
        ct.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(p, dir, now, groups)
    }

    /// Hands `frame` to `to` if its ingress allows it.
    pub(crate) fn deliver_checked(
        &self,
        to: &Arc<Port>,
        (frame, hdr): (&[u8], &NetHdr),
        pkt: Option<&Packet>,
        now: Instant,
        kicks: &mut Kicks,
    ) {
        if to.filtered.load(Ordering::Acquire) {
            let sec = to.security.read().unwrap_or_else(PoisonError::into_inner);
            // From a plain segment the frame comes unparsed.
            let parsed;
            let pkt = match pkt {
                Some(p) => Some(p),
                None => {
                    parsed = Ethernet::parse(frame)
                        .ok()
                        .and_then(|e| parse_l3(&e).ok())
                        .and_then(|(_, ip)| ip.map(|(p, _)| p));
                    parsed.as_ref()
                }
            };
            let ok = match pkt {
                Some(p) => {
                    self.admit(to, &sec, Direction::Ingress, p, now) || related(to, frame, p, now)
                }
                // ARP is always let in, IPv6 as its rules say; anything else
                // is not.
                None => match Ethernet::parse(frame) {
                    Ok(e) if e.ethertype == ETHERTYPE_ARP => true,
                    Ok(e) => match parse_ipv6(&e) {
                        Ok(Some((p, _))) if link_control(&p) => true,
                        Ok(Some((p, ip))) => {
                            self.admit6(to, &sec, Direction::Ingress, &p, now)
                                || related6(to, &p, &ip, now)
                        }
                        _ => false,
                    },
                    Err(_) => false,
                },
            };
            if !ok {
                to.stats.rx_filtered.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if !to.ingress_admit(frame.len(), now) {
            return;
        }
        self.mirror(to, frame, hdr, kicks);
        kicks.stage(to, hdr, frame);
    }

    /// A copy of `frame` (sent or received by `port`) for the port it is
    /// mirrored to, if any.
    fn mirror(&self, port: &Port, frame: &[u8], hdr: &NetHdr, kicks: &mut Kicks) {
        let Some(target) = port.mirror_target() else {
            return;
        };
        let to = self
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&target)
            .cloned();
        if let Some(to) = to.filter(|t| t.id != port.id) {
            kicks.stage(&to, hdr, frame);
        }
    }

    /// An IPv6 packet to the gateway's MAC: routed to a VM of another
    /// subnet of the VPC (or of a peer), hop limit one less.
    fn route6(
        &self,
        from: &Port,
        l3: &L3,
        (frame, hdr): (&[u8], &NetHdr),
        ip: &Ipv6<'_>,
        now: Instant,
        kicks: &mut Kicks,
    ) {
        // Link-local and unspecified sources stay on their link (RFC 4291).
        let scoped = ip.src.is_unspecified() || ip.src.is_unicast_link_local();
        let route = l3
            .route6(from.segment, ip.dst)
            .filter(|_| ip.hop_limit > 1 && !scoped);
        let Some((seg, dst_subnet, host)) = route else {
            // Outside the VPC: through its router's IPv6 leg, if it has one.
            let subnet = l3.subnet(from.segment);
            let vpc = subnet.and_then(|s| s.vpc);
            // A /64 under NAT66 leaves as the router's address.
            let snat = subnet.is_some_and(|s| s.snat6 && s.contains6(ip.src));
            let out = ip.hop_limit > 1 && !scoped && !l3.covers6(from.segment, ip.dst);
            if let (Some(vpc), true) = (vpc, out) {
                if self.route_external6(vpc, frame, (ip, snat), kicks) {
                    return;
                }
            }
            from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            debug!(port = from.id.0, dst = %ip.dst, "no IPv6 route");
            // The sender learns why at once (traceroute, a connection that
            // fails fast instead of timing out), within a rate.
            let why = if ip.hop_limit <= 1 {
                (ndp::TIME_EXCEEDED, 0)
            } else if l3.covers6(from.segment, ip.dst) {
                (ndp::UNREACHABLE, ndp::ADDRESS_UNREACHABLE)
            } else {
                (ndp::UNREACHABLE, ndp::NO_ROUTE)
            };
            let packet = crate::flow::ipv6_packet(frame);
            let error = l3
                .subnet(from.segment)
                .filter(|_| !scoped && self.icmp6_errors.allow(now))
                .and_then(|s| ndp::error(s, from.mac, packet, ip, why));
            if let Some(e) = error {
                from.deliver(&e);
            }
            return;
        };
        let to = self.port_on(seg, host.port);
        if let Some(to) = to {
            let mut out = frame.to_vec();
            out[0..6].copy_from_slice(&host.mac);
            out[6..12].copy_from_slice(&dst_subnet.gateway_mac);
            if let Some(h) = out.get_mut(crate::flow::ip_offset(frame) + 7) {
                *h -= 1;
            }
            self.deliver_checked(&to, (&out, hdr), None, now, kicks);
        }
    }

    /// An IPv4 packet to the gateway's MAC: for the gateway itself (ping,
    /// DNS) or routed to another subnet of the VPC.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        from: &Port,
        l3: &L3,
        subnet: &Subnet,
        (frame, hdr): (&[u8], &NetHdr),
        pkt: &Packet,
        ip: &Ipv4<'_>,
        now: Instant,
        kicks: &mut Kicks,
    ) {
        if l3.is_gateway(from.segment, ip.dst) {
            if !from.service_admit(now) {
                return;
            }
            if let Some(reply) = self.gateway_service(from, l3, subnet, frame, pkt, ip) {
                from.deliver(&reply);
            }
            return;
        }
        let Some((seg, dst_subnet, host)) = l3.route(from.segment, ip.dst) else {
            // A frame still carrying an offload was meant for a VM (the
            // route went away since): NAT wants it finished.
            let out = !hdr.offloaded()
                && subnet.vpc.is_some_and(|vpc| {
                    !l3.vpc_contains(vpc, ip.dst) && self.route_external(vpc, frame, pkt, ip, kicks)
                });
            if out {
                return;
            }
            from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            debug!(port = from.id.0, dst = %ip.dst, "no route");
            return;
        };
        if ip.ttl <= 1 {
            from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let to = self.port_on(seg, host.port);
        if let Some(to) = to {
            let mut out = frame.to_vec();
            route_rewrite(&mut out, dst_subnet.gateway_mac, host.mac);
            self.deliver_checked(&to, (&out, hdr), Some(pkt), now, kicks);
        }
    }

    /// The gateway's own answers: echo replies and DNS.
    fn gateway_service(
        &self,
        from: &Port,
        l3: &L3,
        subnet: &Subnet,
        frame: &[u8],
        pkt: &Packet,
        ip: &Ipv4<'_>,
    ) -> Option<Vec<u8>> {
        match (pkt.flow.proto, pkt.icmp_type) {
            (PROTO_ICMP, Some(ICMP_ECHO_REQUEST)) if !ip.fragment => {
                Some(icmp_echo_reply(frame, ip, subnet.gateway_mac))
            }
            (PROTO_UDP, _) if pkt.flow.dport == dns::PORT && !ip.fragment => {
                let query = ip.payload.get(8..)?;
                let answer =
                    dns::answer(query, &subnet.domain, |name| l3.resolve(from.segment, name))?;
                let macs = (subnet.gateway_mac, from.mac);
                let ends = (IpAddr::V4(ip.dst), IpAddr::V4(ip.src));
                if dns::refused(&answer)
                    && self.forward_dns((from, subnet), query, macs, ends, pkt.flow.sport)
                {
                    return None;
                }
                let src_mac = subnet.gateway_mac;
                Some(udp_frame(
                    src_mac,
                    from.mac,
                    ip.dst,
                    ip.src,
                    dns::PORT,
                    pkt.flow.sport,
                    &answer,
                ))
            }
            _ => None,
        }
    }
}

impl Inner {
    /// Forwards a DNS query `query` from `from` (to the router of `subnet`
    /// at `ends.0`, from `ends.1` port `sport`) to the node's resolvers;
    /// false if there are none, the subnet's VPC has no way out (it stays
    /// isolated: no names resolved through the host), or it could not go.
    fn forward_dns(
        &self,
        (from, subnet): (&Port, &Subnet),
        query: &[u8],
        macs: (Mac, Mac),
        ends: (IpAddr, IpAddr),
        sport: u16,
    ) -> bool {
        let way_out = subnet.vpc.is_some_and(|v| {
            self.nat
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .has_gateway(v)
        });
        if !way_out {
            return false;
        }
        let Some(fwd) = self
            .dns_forwarder
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return false;
        };
        let Some(port) = self
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&from.id)
            .map(Arc::downgrade)
        else {
            return false;
        };
        let asker = dnsfwd::Asker {
            port,
            macs,
            ends,
            sport,
        };
        fwd.forward(query, asker, Instant::now())
    }
}

/// Hands a resolver's `answer` back to the VM that asked, from the router.
fn dns_answer_back(asker: &dnsfwd::Asker, answer: &[u8]) {
    let Some(port) = asker.port.upgrade() else {
        return;
    };
    let ports = (dns::PORT, asker.sport);
    let frame = match asker.ends {
        (IpAddr::V4(router), IpAddr::V4(vm)) => udp_frame(
            asker.macs.0,
            asker.macs.1,
            router,
            vm,
            ports.0,
            ports.1,
            answer,
        ),
        (IpAddr::V6(router), IpAddr::V6(vm)) => udp6_frame(asker.macs, (router, vm), ports, answer),
        _ => return,
    };
    port.deliver(&frame);
}

/// What the router's services made of a packet.
enum Service {
    /// Not for them: switched as usual.
    Pass,
    /// Theirs, without an answer (malformed, or not to be answered).
    Taken,
    /// Theirs: the answer for the sender.
    Reply(Vec<u8>),
}

impl Inner {
    /// The router's IPv6 services on `subnet` (with a /64) for `from`:
    /// DHCPv6 (to all servers or the router) and DNS (to the router's
    /// addresses). Client messages to all DHCPv6 servers reach no other
    /// port, answered or not.
    fn service6(
        &self,
        from: &Port,
        l3: &L3,
        subnet: &Subnet,
        (p, ip): (&Packet6, &Ipv6<'_>),
        now: Instant,
    ) -> Service {
        let (Some(prefix), PROTO_UDP, false) = (subnet.prefix6, p.flow.proto, ip.fragment) else {
            return Service::Pass;
        };
        // Most packets are neither: no router addresses worked out for them.
        if p.flow.dport != dhcp6::SERVER_PORT && p.flow.dport != dns::PORT {
            return Service::Pass;
        }
        let Some([router, _]) = subnet.gateway6() else {
            return Service::Pass;
        };
        let payload = ip.payload.get(8..).unwrap_or_default();
        let macs = (subnet.gateway_mac, from.mac);
        let reply_to = (ip.dst, ip.src);
        let ports = (p.flow.dport, p.flow.sport);
        if p.flow.dport == dhcp6::SERVER_PORT
            && p.flow.sport == dhcp6::CLIENT_PORT
            && (ip.dst == dhcp6::ALL_SERVERS || ip.dst == router)
        {
            let servers = subnet.dns6_servers();
            let cfg = dhcp6::Config {
                server_mac: subnet.gateway_mac,
                prefix,
                address: subnet
                    .dhcp6
                    .then(|| from.security().ip6.get(1).copied())
                    .flatten(),
                dns: &servers,
                domain: &subnet.domain,
            };
            if !from.service_admit(now) {
                return Service::Taken;
            }
            if dhcp6::is_decline(payload) {
                warn!(
                    port = from.id.0,
                    "a guest declined its DHCPv6 address (in use?)"
                );
            }
            return match dhcp6::answer(&cfg, payload) {
                Ok(reply) => Service::Reply(udp6_frame(macs, (router, ip.src), ports, &reply)),
                Err(e) => {
                    debug!(port = from.id.0, "DHCPv6 message ignored: {e}");
                    Service::Taken
                }
            };
        }
        if p.flow.dport == dns::PORT && l3.is_gateway6(from.segment, ip.dst) {
            if !from.service_admit(now) {
                return Service::Taken;
            }
            let answer = dns::answer(payload, &subnet.domain, |name| {
                l3.resolve(from.segment, name)
            });
            let ends = (IpAddr::V6(ip.dst), IpAddr::V6(ip.src));
            if answer.as_deref().is_some_and(dns::refused)
                && self.forward_dns((from, subnet), payload, macs, ends, p.flow.sport)
            {
                return Service::Taken;
            }
            return match answer {
                Some(a) => Service::Reply(udp6_frame(macs, reply_to, ports, &a)),
                None => Service::Taken,
            };
        }
        Service::Pass
    }
}

/// The node's switch.
#[derive(Debug)]
pub struct Switch {
    inner: Arc<Inner>,
    next: Mutex<u32>,
    dir: PathBuf,
}

impl Switch {
    /// A switch whose port sockets live in `dir`, with one data-path
    /// thread running.
    pub fn new(dir: PathBuf) -> Result<Self, SwitchError> {
        Self::with_threads(dir, 1)
    }

    /// A switch whose port sockets live in `dir`, with `threads` data-path
    /// threads (at least one) sharing the ports' transmit rings.
    pub fn with_threads(dir: PathBuf, threads: usize) -> Result<Self, SwitchError> {
        let datapaths = (0..threads.max(1))
            .map(|_| Datapath::new().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SwitchError::DataPath)?;
        let inner = Arc::new(Inner {
            table: Mutex::new(MacTable::new(MAC_AGEING, MAC_TABLE_SIZE)),
            ports: RwLock::new(BTreeMap::new()),
            dhcp: Mutex::new(HashMap::new()),
            l3: RwLock::new(L3::default()),
            groups: RwLock::new(Groups::default()),
            overlay: RwLock::new(Overlay::default()),
            tunnel: RwLock::new(None),
            nat: Mutex::new(Nat::default()),
            uplink: RwLock::new(None),
            uplinked: RwLock::new(HashMap::new()),
            uplink_stats: TunnelStats::default(),
            nat_on: std::sync::atomic::AtomicBool::new(false),
            metadata: Mutex::new(HashMap::new()),
            started: Instant::now(),
            icmp6_errors: ErrorRate::new(),
            service_limit: Mutex::new(crate::port::SERVICE_LIMIT),
            dns_forwarder: RwLock::new(None),
            next_advert: Mutex::new(Instant::now() + advert_interval()),
            datapaths,
        });
        for (i, dp) in inner.datapaths.iter().enumerate() {
            datapath::start(dp.clone(), Arc::downgrade(&inner), i)
                .map_err(SwitchError::DataPath)?;
        }
        let weak = Arc::downgrade(&inner);
        let timers = std::thread::Builder::new()
            .name("netd-timers".into())
            .spawn(move || {
                while let Some(inner) = weak.upgrade() {
                    inner.metadata_timers();
                    inner.advert_timer(Instant::now());
                    drop(inner);
                    std::thread::sleep(METADATA_TICK);
                }
            });
        if let Err(e) = timers {
            warn!("no metadata timer thread: {e}");
        }
        Ok(Self {
            inner,
            next: Mutex::new(1),
            dir,
        })
    }

    /// Adds a port on `segment` whose NIC gets `mac`; returns it once its
    /// socket accepts connections.
    pub fn add_port(&self, segment: SegmentId, mac: Mac) -> Result<Arc<Port>, SwitchError> {
        self.add_port_with(segment, |_| mac)
    }

    /// [`Switch::add_port`] with the MAC chosen from the new port's id.
    pub fn add_port_with(
        &self,
        segment: SegmentId,
        mac: impl FnOnce(PortId) -> Mac,
    ) -> Result<Arc<Port>, SwitchError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| SwitchError::Listen {
            path: self.dir.clone(),
            source,
        })?;
        let id = {
            let mut n = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let id = PortId(*n);
            *n += 1;
            id
        };
        let path = port::socket_path(&self.dir, id);
        let port = Arc::new(Port::new(id, segment, mac(id), path.clone()));
        port.set_service_limit(
            *self
                .inner
                .service_limit
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        // Bound here, so that the socket accepts connections when this returns.
        let listener =
            vhost::vhost_user::Listener::new(&path, true).map_err(|e| SwitchError::Listen {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        self.inner
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, port.clone());
        let (p, weak) = (port.clone(), Arc::downgrade(&self.inner));
        std::thread::Builder::new()
            .name(format!("port-{}", id.0))
            .spawn(move || {
                if let Err(e) = port::serve(p, weak, listener) {
                    warn!(port = id.0, "port stopped serving: {e}");
                }
            })
            .map_err(|source| SwitchError::Listen { path, source })?;
        Ok(port)
    }

    /// Forgets everything about `segment` (its network was deleted): its
    /// subnet, DHCP server, learned addresses, overlay and uplink binding.
    pub fn remove_segment(&self, segment: SegmentId) {
        self.inner
            .l3
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove_segment(segment);
        self.inner
            .dhcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&segment);
        self.inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_segment(segment);
        self.inner
            .overlay
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(segment);
        self.set_uplinked(segment, None);
    }

    /// Answers DHCP on `segment` with `cfg` (replacing any server there;
    /// leases start empty).
    pub fn set_dhcp(&self, segment: SegmentId, cfg: DhcpConfig) {
        self.inner
            .dhcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(segment, DhcpServer::new(cfg));
    }

    /// The address `mac` holds a DHCP lease for on `segment`.
    pub fn dhcp_lease(&self, segment: SegmentId, mac: &Mac) -> Option<std::net::Ipv4Addr> {
        self.inner
            .dhcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&segment)
            .and_then(|s| s.lease_of(mac, Instant::now()))
    }

    /// Puts `subnet` on `segment` with a DHCP server answering from its
    /// gateway (`dhcp` carries DNS servers, MTU and lease time; its pool is
    /// the range handed to ports without a fixed address). Ports with fixed
    /// addresses on the segment keep them as DHCP reservations.
    pub fn set_subnet(&self, segment: SegmentId, subnet: Subnet, mut dhcp: DhcpConfig) {
        dhcp.gateway = subnet.gateway;
        dhcp.gateway_mac = subnet.gateway_mac;
        dhcp.prefix = subnet.prefix;
        dhcp.domain = subnet.domain.clone();
        for p in self.ports_on(segment) {
            if let Some(ip) = p.security().ip {
                dhcp.reservations.insert(p.mac, ip);
            }
        }
        self.inner
            .l3
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .set_subnet(segment, subnet);
        self.set_dhcp(segment, dhcp);
    }

    fn ports_on(&self, segment: SegmentId) -> Vec<Arc<Port>> {
        self.inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|p| p.segment == segment)
            .cloned()
            .collect()
    }

    /// Chooses `ip6` (in its subnet's /64) as port `id`'s IPv6 address
    /// instead of the one its MAC gives (None: that one again): the source
    /// it may use, its route, its DNS answer and its DHCPv6 address.
    pub fn set_port_ipv6(&self, id: PortId, ip6: Option<Ipv6Addr>) -> Result<(), SwitchError> {
        let port = self.port(id)?;
        let (ip, name) = {
            let mut sec = port
                .security
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            sec.chosen6 = ip6;
            let md = port.metadata.lock().unwrap_or_else(PoisonError::into_inner);
            (sec.ip, md.hostname.clone())
        };
        self.set_port_address(id, ip, &name)
    }

    /// Gives port `id` the fixed address `ip` (None: none; the port is then
    /// unfiltered) and the DNS name `name`: its DHCP reservation, its host
    /// route and the only source address it may use.
    pub fn set_port_address(
        &self,
        id: PortId,
        ip: Option<Ipv4Addr>,
        name: &str,
    ) -> Result<(), SwitchError> {
        let port = self.port(id)?;
        let mut sec = port
            .security
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut ip6: Vec<std::net::Ipv6Addr>;
        {
            let mut l3 = self
                .inner
                .l3
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(old) = sec.ip {
                l3.set_host(port.segment, old, None);
            }
            for old in sec.ip6.iter().skip(1) {
                l3.set_host6(port.segment, *old, None);
            }
            // Its address in the subnet's /64: the one chosen for it, or
            // the one it forms (SLAAC).
            let global = l3.subnet(port.segment).and_then(|s| s.prefix6).map(|p| {
                sec.chosen6
                    .filter(|c| contains6(p, 64, *c))
                    .unwrap_or(slaac(p, port.mac))
            });
            let host = Host {
                port: id,
                mac: port.mac,
                name: name.to_owned(),
                ip6: global,
            };
            ip6 = match ip {
                // Its link-local address first, then the global one.
                Some(_) => std::iter::once(link_local(port.mac))
                    .chain(global)
                    .collect(),
                None => Vec::new(),
            };
            for new in ip6.iter().skip(1) {
                l3.set_host6(port.segment, *new, Some(host.clone()));
            }
            if let Some(new) = ip {
                l3.set_host(port.segment, new, Some(host));
            }
        }
        {
            let mut groups = self
                .inner
                .groups
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            groups.set_member(&sec.addresses(), &sec.groups, &[]);
            sec.ip = ip;
            sec.ip6 = std::mem::take(&mut ip6);
            groups.set_member(&sec.addresses(), &[], &sec.groups);
        }
        if let Some(server) = self
            .inner
            .dhcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&port.segment)
        {
            server.reserve(port.mac, ip);
        }
        sec.ip = ip;
        port.filtered.store(sec.enabled(), Ordering::Release);
        {
            let mut md = port.metadata.lock().unwrap_or_else(PoisonError::into_inner);
            md.ip = ip;
            md.hostname = name.to_owned();
        }
        port.conntrack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        port.conntrack6
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }

    /// Lets port `id` also send from `allowed` (prefixes; a virtual IP
    /// that moves between VMs, say), besides its own address.
    pub fn set_port_allowed(
        &self,
        id: PortId,
        allowed: Vec<(Ipv4Addr, u8)>,
        allowed6: Vec<(std::net::Ipv6Addr, u8)>,
    ) -> Result<(), SwitchError> {
        let port = self.port(id)?;
        let mut sec = port
            .security
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        sec.allowed = allowed;
        sec.allowed6 = allowed6;
        Ok(())
    }

    /// Puts port `id` in `groups` (replacing its groups); connections the
    /// new groups do not allow are cut, the others carry on.
    pub fn set_port_groups(&self, id: PortId, groups: Vec<GroupId>) -> Result<(), SwitchError> {
        let port = self.port(id)?;
        let mut sec = port
            .security
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        {
            let mut all = self
                .inner
                .groups
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(g) = groups.iter().find(|g| !all.groups.contains_key(g)) {
                return Err(SwitchError::NoGroup(g.0));
            }
            all.set_member(&sec.addresses(), &sec.groups, &groups);
        }
        sec.groups = groups;
        drop(sec);
        self.revalidate();
        Ok(())
    }

    /// Creates an empty security group `id` named `name` (nothing in,
    /// nothing out until rules say so).
    pub fn create_group(&self, id: GroupId, name: String) {
        self.inner
            .groups
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .groups
            .insert(id, SecurityGroup::new(name));
    }

    /// Deletes group `id`; refused while a port is in it.
    pub fn delete_group(&self, id: GroupId) -> Result<(), SwitchError> {
        let in_use = self
            .inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|p| p.security().groups.contains(&id));
        if in_use {
            return Err(SwitchError::GroupInUse(id.0));
        }
        self.inner
            .groups
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .groups
            .remove(&id)
            .map(|_| ())
            .ok_or(SwitchError::NoGroup(id.0))
    }

    /// `f` on group `id`, under the groups' lock.
    fn with_group<R>(
        &self,
        id: GroupId,
        f: impl FnOnce(&mut SecurityGroup) -> R,
    ) -> Result<R, SwitchError> {
        let mut groups = self
            .inner
            .groups
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(f(groups
            .groups
            .get_mut(&id)
            .ok_or(SwitchError::NoGroup(id.0))?))
    }

    /// Adds `rule` to group `id`, online; returns the rule's id.
    pub fn add_rule(&self, id: GroupId, rule: Rule) -> Result<u32, SwitchError> {
        self.with_group(id, |g| g.add(rule))
    }

    /// Removes rule `rule` of group `id`, online: connections that no rule
    /// allows any more are cut; the others carry on.
    pub fn remove_rule(&self, id: GroupId, rule: u32) -> Result<(), SwitchError> {
        self.with_group(id, |g| g.rules.remove(&rule))?
            .ok_or(SwitchError::NoRule(id.0, rule))?;
        self.revalidate();
        Ok(())
    }

    /// The rules of group `id`, by id.
    pub fn rules(&self, id: GroupId) -> Result<Vec<(u32, Rule)>, SwitchError> {
        let groups = self
            .inner
            .groups
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let g = groups.groups.get(&id).ok_or(SwitchError::NoGroup(id.0))?;
        Ok(g.rules.iter().map(|(k, r)| (*k, *r)).collect())
    }

    /// Group `id`'s rules by id and the id its next rule gets (what a
    /// restart must bring back).
    pub fn rules_state(&self, id: GroupId) -> Option<(BTreeMap<u32, Rule>, u32)> {
        let groups = self
            .inner
            .groups
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let g = groups.groups.get(&id)?;
        Some((g.rules.clone(), g.next_rule()))
    }

    /// Replaces group `id`'s rules with `rules`, ids kept, the next rule's
    /// id past `next` (see [`Switch::rules_state`]).
    pub fn restore_rules(
        &self,
        id: GroupId,
        rules: BTreeMap<u32, Rule>,
        next: u32,
    ) -> Result<(), SwitchError> {
        self.with_group(id, |g| g.restore(rules, next))?;
        self.revalidate();
        Ok(())
    }

    /// The id the next port gets.
    pub fn next_port_id(&self) -> u32 {
        *self.next.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `id` the next port's id (a restart gives ports back theirs);
    /// ids at or below the highest in use are not taken.
    pub fn set_next_port_id(&self, id: u32) {
        let top = self
            .inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .map(|p| p.0.saturating_add(1))
            .max()
            .unwrap_or(1);
        *self.next.lock().unwrap_or_else(PoisonError::into_inner) = id.max(top);
    }

    /// Re-checks every port's tracked connections against its groups' rules.
    fn revalidate(&self) {
        let ports: Vec<Arc<Port>> = self
            .inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for p in ports {
            let sec = p.security();
            if !sec.enabled() {
                continue;
            }
            let groups = self
                .inner
                .groups
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            p.conntrack
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .revalidate(|flow, dir| groups.allows(&sec.groups, dir, flow));
            p.conntrack6
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .revalidate(|flow, dir| groups.allows6(&sec.groups, dir, flow));
        }
    }

    /// Opens (creating if need be) the TAP interface `name` as the node's
    /// uplink, replacing any other.
    pub fn set_uplink(&self, name: &str) -> Result<(), SwitchError> {
        let tap = Arc::new(Tap::open(name)?);
        let reader = tap.try_clone().map_err(|source| {
            SwitchError::Uplink(UplinkError::Open {
                name: name.to_owned(),
                source,
            })
        })?;
        *self
            .inner
            .uplink
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(tap.clone());
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("uplink".into())
            .spawn(move || uplink_loop(&weak, &tap, &reader))
            .map_err(|source| {
                SwitchError::Uplink(UplinkError::Open {
                    name: name.to_owned(),
                    source,
                })
            })?;
        Ok(())
    }

    /// Bridges `segment` to the uplink (untagged, or with `vlan`'s tag);
    /// None for `tag` takes it off.
    pub fn set_uplinked(&self, segment: SegmentId, tag: Option<Option<u16>>) {
        let mut u = self
            .inner
            .uplinked
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match tag {
            Some(t) => u.insert(segment, t),
            None => u.remove(&segment),
        };
    }

    /// The uplink's counters (frames sent, received, dropped).
    pub fn uplink_stats(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.inner.uplink_stats;
        vec![
            ("tx", g(&s.tx)),
            ("rx", g(&s.rx)),
            ("dropped", g(&s.dropped)),
        ]
    }

    /// `vpc`'s router's IPv6 address on its external network, if it has
    /// one.
    pub fn gateway6(&self, vpc: VpcId) -> Option<std::net::Ipv6Addr> {
        self.inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .gateway6(vpc)
            .map(|(_, _, g)| g.ip)
    }

    /// Sets (or removes) the external gateway of `vpc`.
    pub fn set_gateway(&self, vpc: VpcId, gw: Option<Gateway>) {
        self.inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_gateway(vpc, gw);
        let any = self
            .inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .has_gateways();
        self.inner.nat_on.store(any, Ordering::Release);
    }

    /// Peers (`on`) or parts VPCs `a` and `b`.
    pub fn set_peering(&self, a: VpcId, b: VpcId, on: bool) {
        self.inner
            .l3
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .set_peering(a, b, on);
    }

    /// Adds (`on`) or removes port forward `f` on gateway address `gw`.
    pub fn set_forward(&self, gw: Ipv4Addr, f: PortForward, on: bool) {
        self.inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_forward(gw, f, on, Instant::now());
    }

    /// Forwards DNS queries for names that are not a VPC's to `upstreams`
    /// (none: the router refuses them); the answers are read on a thread
    /// of their own.
    pub fn set_dns_upstreams(&self, upstreams: Vec<std::net::SocketAddr>) {
        let fwd = dnsfwd::Forwarder::new(upstreams);
        *self
            .inner
            .dns_forwarder
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fwd.clone();
        let Some(fwd) = fwd else { return };
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("netd-dns".into())
            .spawn(move || {
                // Until the switch goes or another forwarder replaces this one.
                while let Some(inner) = weak.upgrade() {
                    let current = inner
                        .dns_forwarder
                        .read()
                        .unwrap_or_else(PoisonError::into_inner)
                        .as_ref()
                        .is_some_and(|f| Arc::ptr_eq(f, &fwd));
                    drop(inner);
                    if !current || !fwd.receive(dns_answer_back) {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("DNS forwarding off: {e}");
        }
    }

    /// The resolvers DNS queries are forwarded to.
    pub fn dns_upstreams(&self) -> Vec<std::net::SocketAddr> {
        self.inner
            .dns_forwarder
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|f| f.upstreams().to_vec())
            .unwrap_or_default()
    }

    /// Sets every port's budget for requests to the switch's services
    /// (`rate` a second, `burst` at once), and new ports' (default
    /// [`SERVICE_LIMIT`](crate::port::SERVICE_LIMIT)).
    pub fn set_service_limit(&self, limit: (f64, f64)) {
        *self
            .inner
            .service_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = limit;
        for p in self
            .inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            p.set_service_limit(limit);
        }
    }

    /// Sets floating IP `ip`'s rate limits (towards its VM, from it).
    pub fn set_floating_qos(&self, ip: Ipv4Addr, ingress: Limit, egress: Limit) {
        self.inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_floating_qos(ip, ingress, egress, Instant::now());
    }

    /// Floating IP `ip`'s limits and counters.
    pub fn floating_traffic(&self, ip: Ipv4Addr) -> ((Limit, Limit), Vec<(&'static str, u64)>) {
        let nat = self
            .inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        nat.floating_traffic.get(&ip).map_or_else(
            || {
                (
                    (Limit::default(), Limit::default()),
                    crate::nat::FloatingTraffic::default().counters(),
                )
            },
            |t| (t.limits(), t.counters()),
        )
    }

    /// Forgets floating IP `ip`'s limits and counters.
    pub fn forget_floating(&self, ip: Ipv4Addr) {
        self.inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_floating(ip);
    }

    /// Binds (or frees) floating IP `ip`.
    pub fn set_floating(&self, ip: Ipv4Addr, f: Option<Floating>) {
        self.inner
            .nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_floating(ip, f);
    }

    /// Makes `segment` the overlay network `vni`.
    pub fn set_overlay(&self, segment: SegmentId, vni: u32) {
        self.inner
            .overlay
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(segment, vni);
    }

    /// The tunnel endpoints of the other nodes with ports on overlay
    /// `segment` (replacing the list).
    pub fn set_remotes(&self, segment: SegmentId, remotes: Vec<IpAddr>) {
        self.inner
            .overlay
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .set_remotes(segment, remotes);
    }

    /// Opens this node's tunnel endpoint on `local` (UDP; every endpoint
    /// uses the same port); returns the address bound.
    pub fn set_tunnel(&self, local: SocketAddr, encap: Encap) -> Result<SocketAddr, SwitchError> {
        let fail = |source| SwitchError::Tunnel {
            addr: local,
            source,
        };
        let (tunnel, bound) = Tunnel::open(local, encap).map_err(fail)?;
        let tunnel = Arc::new(tunnel);
        let old = self
            .inner
            .tunnel
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(tunnel.clone());
        drop(old);
        // The first data-path thread reads it from its next sweep.
        if let Some(dp) = self.inner.datapaths.first() {
            dp.wake();
        }
        Ok(bound)
    }

    /// The tunnel endpoint's encapsulation (None without one).
    pub fn tunnel_encap(&self) -> Option<Encap> {
        self.inner.tunnel().map(|t| t.encap)
    }

    /// The tunnel endpoint's counters (None without one).
    pub fn tunnel_stats(&self) -> Option<Vec<(&'static str, u64)>> {
        let t = self
            .inner
            .tunnel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Some(vec![
            ("tx", g(&t.stats.tx)),
            ("rx", g(&t.stats.rx)),
            ("dropped", g(&t.stats.dropped)),
        ])
    }

    /// Mirrors everything port `id` sends and receives to port `target`
    /// (None: stops).
    pub fn set_mirror(&self, id: PortId, target: Option<PortId>) -> Result<(), SwitchError> {
        let port = self.port(id)?;
        if let Some(t) = target {
            self.port(t)?;
            if t == id {
                return Err(SwitchError::NoPort(t.0));
            }
        }
        port.set_mirror_target(target);
        Ok(())
    }

    /// Sends every IPv6 subnet's router advertisement to its local ports
    /// now (it also goes every few minutes unasked).
    pub fn advertise_now(&self) {
        self.inner.advertise();
    }

    /// How many transmit rings each data-path thread polls now.
    pub fn datapath_rings(&self) -> Vec<usize> {
        self.inner
            .datapaths
            .iter()
            .map(|d| d.ring_count())
            .collect()
    }

    /// Deletes port `id`: no more frames to or from it, its frontend is
    /// disconnected and its socket removed.
    pub fn remove_port(&self, id: PortId) -> Result<(), SwitchError> {
        let port = self
            .inner
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
            .ok_or(SwitchError::NoPort(id.0))?;
        // Ports mirrored to it stop being mirrored (not to a port gone).
        for p in self
            .inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|p| p.mirror_target() == Some(id))
        {
            p.set_mirror_target(None);
        }
        self.inner.forget_rings(id);
        self.inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_port(id);
        let sec = port.security();
        if let Some(ip) = sec.ip {
            let mut l3 = self
                .inner
                .l3
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            l3.set_host(port.segment, ip, None);
            for a in sec.ip6.iter().skip(1) {
                l3.set_host6(port.segment, *a, None);
            }
            drop(l3);
            self.inner
                .groups
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .set_member(&sec.addresses(), &sec.groups, &[]);
            if let Some(server) = self
                .inner
                .dhcp
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&port.segment)
            {
                server.reserve(port.mac, None);
            }
        }
        port.close();
        Ok(())
    }

    /// The port with `id`.
    pub fn port(&self, id: PortId) -> Result<Arc<Port>, SwitchError> {
        self.inner
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
            .ok_or(SwitchError::NoPort(id.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{Receiver, RX_AREA};

    /// Frames lent to the tunnel's outbox from the burst buffer reach the
    /// wire as they were, even when the buffer is rewritten and regrown
    /// before the datagrams are sent.
    #[test]
    fn lent_frames_are_sent_before_the_burst_buffer_is_reused() {
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let (tx, _) = Tunnel::open(local, Encap::Vxlan).unwrap();
        let tx = Arc::new(tx);
        let (rx, rx_addr) = Tunnel::open(local, Encap::Vxlan).unwrap();
        let mut kicks = Kicks::default();
        let mut frames = Vec::new();
        for fill in [0xa1u8, 0xa2] {
            let (start, dst) = kicks.reserve(1000).unwrap();
            dst.fill(fill);
            frames.push((start..start + 1000, NetHdr::PLAIN, None));
        }
        // SAFETY: no frame is read in part.
        unsafe {
            kicks.switch_burst(&frames, &[], |frame, _, k| {
                k.gather_datagram(&tx, rx_addr, 7, frame);
            })
        };
        assert_eq!(kicks.tunnel_out.len(), 2);
        assert!(kicks.tunnel_out.has_lent());
        // The staged batch is written out (no ports: nothing to write),
        // which frees the burst buffer for the next burst; taking room in
        // it, here more than it has (it grows and may move), sends what is
        // lent first.
        kicks.flush_ports();
        let (_, dst) = kicks.reserve(crate::frame::MAX_FRAME).unwrap();
        dst.fill(0xee);
        assert!(kicks.tunnel_out.is_empty());
        let mut got = Vec::new();
        let mut bufs = vec![0u8; RX_AREA];
        let mut r = Receiver::new();
        while got.len() < 2 {
            let more = r
                .receive(&mut bufs, rx.socket(), &rx.stats, true, |_, d| {
                    got.push(d.to_vec())
                })
                .unwrap();
            assert!(more, "the datagrams did not come");
        }
        for (d, fill) in got.iter().zip([0xa1u8, 0xa2]) {
            let (vni, inner) = Encap::Vxlan.decap(d).unwrap();
            assert_eq!(vni, 7);
            assert_eq!(inner.len(), 1000);
            assert!(inner.iter().all(|b| *b == fill));
        }
    }
}
