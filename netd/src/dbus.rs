//! The D-Bus interface `org.atoll.Net1`.
//!
//! Object `/org/atoll/Net1` carries the network daemon's own state, the
//! methods that create things, and an `org.freedesktop.DBus.ObjectManager`;
//! what they create appears below it as `/org/atoll/Net1/<kind>/<n>` (kinds
//! `vpc`, `network`, `subnet`, `port`, `security_group`; see
//! [`crate::objects`]).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue};
use zbus::{interface, proxy};

use crate::fabric::{Fabric, FabricError, Kind, SubnetSettings};
use crate::frame::Mac;
use crate::health::Health;
use crate::objects::{
    FloatingIpObject, GroupObject, NetworkObject, PortObject, SubnetObject, VpcObject,
};
use crate::overlay::Encap;
use crate::secgroup::GroupId;

/// Errors of `org.atoll.Net1` methods.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.atoll.Net1.Error")]
pub enum NetError {
    /// Transport-level failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An argument is not acceptable (the message says which and why).
    InvalidArgument(String),
    /// No such object.
    NotFound(String),
    /// The switch could not do it.
    Failed(String),
}

impl From<FabricError> for NetError {
    fn from(e: FabricError) -> Self {
        match e {
            FabricError::Invalid(m) => NetError::InvalidArgument(m),
            FabricError::NotFound(m) => NetError::NotFound(m),
            FabricError::Rule(r) => NetError::InvalidArgument(r.to_string()),
            FabricError::Switch(s) => NetError::Failed(format!("{s:#}")),
        }
    }
}

/// Parses "52:54:00:12:34:56".
pub(crate) fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// "52:54:00:12:34:56".
pub(crate) fn format_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_ip(what: &str, s: &str) -> Result<Ipv4Addr, NetError> {
    s.parse()
        .map_err(|_| NetError::InvalidArgument(format!("{what} {s:?}: not an IPv4 address")))
}

/// Reserved ranges from their D-Bus strings.
pub(crate) fn parse_ranges(ranges: &[String]) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>, NetError> {
    ranges
        .iter()
        .map(|r| {
            crate::fabric::parse_range(r).ok_or_else(|| {
                NetError::InvalidArgument(format!(
                    "reserved {r:?}: want 192.0.2.5, 192.0.2.5-192.0.2.9 or 192.0.2.0/28"
                ))
            })
        })
        .collect()
}

/// `/org/atoll/Net1/<kind>/<id>`.
pub(crate) fn object_path(kind: &str, id: u32) -> Result<OwnedObjectPath, NetError> {
    ObjectPath::try_from(format!("{OBJECT_PATH}/{kind}/{id}"))
        .map(Into::into)
        .map_err(|e| NetError::Failed(e.to_string()))
}

/// The number in `/org/atoll/Net1/<kind>/<id>`.
pub(crate) fn id_in(kind: &str, path: &ObjectPath<'_>) -> Result<u32, NetError> {
    path.as_str()
        .strip_prefix(OBJECT_PATH)
        .and_then(|p| p.strip_prefix('/'))
        .and_then(|p| p.strip_prefix(kind))
        .and_then(|p| p.strip_prefix('/'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| NetError::NotFound(format!("no {kind} {}", path.as_str())))
}

pub(crate) fn group_ids(paths: &[OwnedObjectPath]) -> Result<Vec<GroupId>, NetError> {
    paths
        .iter()
        .map(|p| id_in("security_group", p).map(GroupId))
        .collect()
}

/// A method's `a{sv}` options, taken one by one; what is left over is an
/// error naming it.
struct Options(HashMap<String, OwnedValue>);

impl Options {
    fn take<T>(&mut self, key: &str, want: &str) -> Result<Option<T>, NetError>
    where
        T: TryFrom<OwnedValue>,
    {
        self.0
            .remove(key)
            .map(|v| {
                T::try_from(v).map_err(|_| {
                    NetError::InvalidArgument(format!("option {key:?}: want type {want}"))
                })
            })
            .transpose()
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, NetError> {
        self.take(key, "s")
    }

    fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, NetError> {
        self.take(key, "as")
    }

    fn u16(&mut self, key: &str) -> Result<Option<u16>, NetError> {
        self.take(key, "q")
    }

    fn u32(&mut self, key: &str) -> Result<Option<u32>, NetError> {
        self.take(key, "u")
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, NetError> {
        self.take(key, "b")
    }

    fn path(&mut self, key: &str) -> Result<Option<OwnedObjectPath>, NetError> {
        self.take(key, "o")
    }

    fn paths(&mut self, key: &str) -> Result<Option<Vec<OwnedObjectPath>>, NetError> {
        self.take(key, "ao")
    }

    fn done(self) -> Result<(), NetError> {
        match self.0.keys().next() {
            Some(k) => Err(NetError::InvalidArgument(format!("unknown option {k:?}"))),
            None => Ok(()),
        }
    }
}

/// Saves the fabric's state after a change (see [`crate::persist`]); an
/// error says the change is made but would not survive a restart.
pub(crate) async fn saved(fabric: &Arc<Fabric>) -> Result<(), NetError> {
    let f = fabric.clone();
    tokio::task::spawn_blocking(move || f.save())
        .await
        .map_err(|e| NetError::Failed(e.to_string()))?
        .map_err(|e| NetError::Failed(format!("done, but not saved for a restart: {e}")))
}

/// Serves an object for everything the fabric has: the default security
/// group on a fresh start, all that came back after a restart.
pub async fn serve_all(
    server: &zbus::ObjectServer,
    fabric: &Arc<Fabric>,
) -> Result<(), zbus::Error> {
    let path = |kind: &str, id: u32| {
        object_path(kind, id).map_err(|e| zbus::Error::Failure(format!("{e:?}")))
    };
    let snap = fabric.snapshot();
    for g in &snap.groups {
        let id = GroupId(g.id);
        let obj = GroupObject {
            fabric: fabric.clone(),
            id,
        };
        server.at(&path("security_group", g.id)?, obj).await?;
    }
    for v in &snap.vpcs {
        let obj = VpcObject {
            fabric: fabric.clone(),
            id: v.id,
            name: v.name.clone(),
        };
        server.at(&path("vpc", v.id)?, obj).await?;
    }
    for n in &snap.networks {
        let vpc = n.vpc.map(|v| path("vpc", v)).transpose()?;
        let obj = NetworkObject {
            fabric: fabric.clone(),
            id: n.id,
            vpc,
        };
        server.at(&path("network", n.id)?, obj).await?;
    }
    for s in &snap.subnets {
        let obj = SubnetObject {
            fabric: fabric.clone(),
            id: s.id,
            network: path("network", s.network)?,
        };
        server.at(&path("subnet", s.id)?, obj).await?;
    }
    for p in &snap.ports {
        let Some(entry) = fabric.port(p.id) else {
            continue;
        };
        let obj = PortObject {
            fabric: fabric.clone(),
            entry,
            network: path("network", p.network)?,
        };
        server.at(&path("port", p.id)?, obj).await?;
    }
    for f in &snap.floating {
        let obj = FloatingIpObject {
            fabric: fabric.clone(),
            id: f.id,
            network: path("network", f.network)?,
        };
        server.at(&path("floating_ip", f.id)?, obj).await?;
    }
    Ok(())
}

/// Well-known bus name owned by `netd`.
pub const BUS_NAME: &str = "org.atoll.Net1";
/// Path of the network daemon object.
pub const OBJECT_PATH: &str = "/org/atoll/Net1";

/// State behind the `org.atoll.Net1` interface.
#[derive(Debug)]
pub struct Net1 {
    node_id: String,
    started_at_us: u64,
    health: Health,
    fabric: Arc<Fabric>,
}

impl Net1 {
    /// Creates the interface state for a network daemon that starts now.
    pub fn new(node_id: String, health: Health, fabric: Arc<Fabric>) -> Self {
        Self {
            node_id,
            started_at_us: now_us(),
            health,
            fabric,
        }
    }
}

/// Microseconds since the Unix epoch.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The node's virtual switch: networks, ports, security groups and the services answered inside it.
#[interface(name = "org.atoll.Net1")]
impl Net1 {
    /// Version of the netd (semantic version).
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_owned()
    }

    /// Identifier of the node this network daemon runs on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn node_id(&self) -> String {
        self.node_id.clone()
    }

    /// "ok", "degraded" (running but cannot do everything, see HealthDetail) or "failed".
    #[zbus(property)]
    fn health(&self) -> String {
        self.health.state.to_owned()
    }

    /// Why Health is not "ok"; empty when it is.
    #[zbus(property)]
    fn health_detail(&self) -> String {
        self.health.detail.clone()
    }

    /// When this network daemon started, in microseconds since the Unix epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> u64 {
        self.started_at_us
    }

    /// Whether /dev/net/tun can be opened, which TAP uplinks need.
    #[zbus(property)]
    fn tun_available(&self) -> bool {
        self.health.tun_available
    }

    /// The resolvers the VPC routers forward other names to (`netd
    /// --dns-upstream`; empty: such names are refused).
    #[zbus(property(emits_changed_signal = "const"))]
    fn dns_upstreams(&self) -> Vec<String> {
        self.fabric
            .switch
            .dns_upstreams()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// How many transmit rings each data-path thread polls now (one entry
    /// per thread; `netd --datapath-threads`).
    #[zbus(property(emits_changed_signal = "false"))]
    fn datapath_rings(&self) -> Vec<u32> {
        self.fabric
            .switch
            .datapath_rings()
            .into_iter()
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            .collect()
    }

    /// Opens (creating if need be) the TAP interface `interface` as this
    /// node's uplink: networks created with option "uplink" meet the host's
    /// network there (flat untagged, vlan with its 802.1Q tag).
    async fn set_uplink(&self, interface: String) -> Result<(), NetError> {
        let fabric = self.fabric.clone();
        tokio::task::spawn_blocking(move || fabric.set_uplink(&interface))
            .await
            .map_err(|e| NetError::Failed(e.to_string()))?
            .map_err(|e| {
                NetError::Failed(format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ))
            })?;
        saved(&self.fabric).await
    }

    /// Frames the uplink sent ("tx"), received ("rx") and dropped (no
    /// network for their tag, malformed, not sent).
    #[zbus(property(emits_changed_signal = "false"))]
    fn uplink_counters(&self) -> HashMap<String, u64> {
        self.fabric
            .switch
            .uplink_stats()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    /// Takes a floating IP (`ip`, or "" for the first free one) on a
    /// network with an external subnet; bind it with its Associate.
    /// Returns its object and address.
    async fn create_floating_ip(
        &self,
        network: OwnedObjectPath,
        ip: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(OwnedObjectPath, String), NetError> {
        let net = id_in("network", &network)?;
        let want = if ip.is_empty() {
            None
        } else {
            Some(parse_ip("ip", &ip)?)
        };
        let (id, ip) = self.fabric.create_floating_ip(net, want)?;
        let path = object_path("floating_ip", id)?;
        server
            .at(
                &path,
                FloatingIpObject {
                    fabric: self.fabric.clone(),
                    id,
                    network,
                },
            )
            .await?;
        saved(&self.fabric).await?;
        Ok((path, ip.to_string()))
    }

    /// Opens this node's tunnel endpoint on `address` (an address of the
    /// node) and UDP `port`, which overlay networks use, speaking
    /// `encapsulation`: "vxlan" (or "") or "geneve" (every node of a
    /// cluster the same). Port 0 is the encapsulation's own (4789, 6081).
    /// Returns "address:port".
    async fn set_tunnel_endpoint(
        &self,
        address: String,
        port: u16,
        encapsulation: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, NetError> {
        let ip: std::net::IpAddr = address.parse().map_err(|_| {
            NetError::InvalidArgument(format!("address {address:?}: not an IP address"))
        })?;
        let encap = Encap::parse(&encapsulation).ok_or_else(|| {
            NetError::InvalidArgument(format!(
                "encapsulation {encapsulation:?}: want vxlan or geneve"
            ))
        })?;
        let port = if port == 0 { encap.port() } else { port };
        let fabric = self.fabric.clone();
        let bound = tokio::task::spawn_blocking(move || {
            fabric.set_tunnel(std::net::SocketAddr::new(ip, port), encap)
        })
        .await
        .map_err(|e| NetError::Failed(e.to_string()))?
        .map_err(|e| match e {
            FabricError::Switch(s) => NetError::Failed(format!(
                "{s}: {}",
                std::error::Error::source(&s)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )),
            other => other.into(),
        })?;
        self.tunnel_encapsulation_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(bound.to_string())
    }

    /// The tunnel endpoint's encapsulation ("" without an endpoint).
    #[zbus(property)]
    fn tunnel_encapsulation(&self) -> String {
        self.fabric
            .switch
            .tunnel_encap()
            .map(|e| e.name().to_owned())
            .unwrap_or_default()
    }

    /// Datagrams the tunnel endpoint sent ("tx"), received ("rx") and
    /// refused or failed to send ("dropped"); empty without an endpoint.
    #[zbus(property(emits_changed_signal = "false"))]
    fn tunnel_counters(&self) -> HashMap<String, u64> {
        self.fabric
            .switch
            .tunnel_stats()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    /// Creates a VPC: the subnets of its networks route to each other
    /// (through the gateway of each, answered on every node) and to no other
    /// VPC's.
    async fn create_vpc(
        &self,
        name: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, NetError> {
        let id = self.fabric.create_vpc(&name)?;
        let path = object_path("vpc", id)?;
        server
            .at(
                &path,
                VpcObject {
                    fabric: self.fabric.clone(),
                    id,
                    name,
                },
            )
            .await?;
        saved(&self.fabric).await?;
        Ok(path)
    }

    /// Creates a network (one L2 segment). `kind` is "flat", "vlan" (option
    /// "vlan": q, 1 to 4094) or "overlay" (option "vni": u, VXLAN or Geneve across
    /// nodes; see SetTunnelEndpoint and the network's SetRemotes); option
    /// "vpc": o puts it in a VPC, "uplink": b bridges it to the node's
    /// uplink.
    async fn create_network(
        &self,
        name: String,
        kind: String,
        options: HashMap<String, OwnedValue>,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, NetError> {
        let mut o = Options(options);
        let vpc = o.path("vpc")?.map(|p| id_in("vpc", &p)).transpose()?;
        let kind = match kind.as_str() {
            "flat" => Kind::Flat,
            "vlan" => Kind::Vlan(o.u16("vlan")?.ok_or_else(|| {
                NetError::InvalidArgument("a vlan network needs option \"vlan\"".into())
            })?),
            "overlay" => Kind::Overlay(o.u32("vni")?.ok_or_else(|| {
                NetError::InvalidArgument("an overlay network needs option \"vni\"".into())
            })?),
            k => {
                return Err(NetError::InvalidArgument(format!(
                    "kind {k:?}: want \"flat\", \"vlan\" or \"overlay\""
                )))
            }
        };
        let uplink = o.bool("uplink")?.unwrap_or(false);
        o.done()?;
        let id = self.fabric.create_network(&name, kind, vpc, uplink)?;
        let path = object_path("network", id)?;
        let vpc = vpc.map(|v| object_path("vpc", v)).transpose()?;
        server
            .at(
                &path,
                NetworkObject {
                    fabric: self.fabric.clone(),
                    id,
                    vpc,
                },
            )
            .await?;
        saved(&self.fabric).await?;
        Ok(path)
    }

    /// Creates the IPv4 subnet `cidr` on `network`. Options: "gateway" s
    /// (default the first address), "dns" as (IPv4 or IPv6 servers after
    /// the gateway's own), "domain" s (of VM names), "mtu" q,
    /// "lease_seconds" u, "external" b (the gateway is a router outside:
    /// VPC gateways and floating IPs take their addresses here), "ipv6" s
    /// (a /64 for the VMs), "ipv6_mode" s ("slaac", the default: VMs form
    /// their addresses; "dhcpv6": DHCPv6 assigns them), "ipv6_snat" b (the
    /// /64 leaves the VPC translated to the router's IPv6 address, NAT66,
    /// instead of routed: for unique-local /64s), "reserved" as (address
    /// ranges never handed out: "192.0.2.5", "192.0.2.5-192.0.2.9",
    /// "192.0.2.0/28").
    async fn create_subnet(
        &self,
        network: OwnedObjectPath,
        cidr: String,
        options: HashMap<String, OwnedValue>,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, NetError> {
        let net = id_in("network", &network)?;
        let mut o = Options(options);
        let mut settings = SubnetSettings::default();
        if let Some(g) = o.string("gateway")? {
            settings.gateway = Some(parse_ip("gateway", &g)?);
        }
        for d in o.strings("dns")?.unwrap_or_default() {
            match d.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(a)) => settings.dns6.push(a),
                _ => settings.dns.push(parse_ip("dns", &d)?),
            }
        }
        settings.domain = o.string("domain")?.unwrap_or_default();
        settings.external = o.bool("external")?.unwrap_or(false);
        if let Some(v6) = o.string("ipv6")? {
            let prefix = crate::secgroup::parse_cidr6(&v6).ok_or_else(|| {
                NetError::InvalidArgument(format!("ipv6 {v6:?}: want a prefix like fd00:1::/64"))
            })?;
            settings.ipv6 = Some(prefix);
        }
        settings.snat6 = o.bool("ipv6_snat")?.unwrap_or(false);
        settings.reserved = parse_ranges(&o.strings("reserved")?.unwrap_or_default())?;
        settings.dhcp6 = match o.string("ipv6_mode")?.as_deref() {
            None | Some("slaac") => false,
            Some("dhcpv6") => true,
            Some(m) => {
                return Err(NetError::InvalidArgument(format!(
                    "ipv6_mode {m:?}: want \"slaac\" or \"dhcpv6\""
                )))
            }
        };
        settings.mtu = o.u16("mtu")?.unwrap_or(settings.mtu);
        if let Some(l) = o.u32("lease_seconds")? {
            if l < 60 {
                return Err(NetError::InvalidArgument(
                    "lease_seconds: at least 60".into(),
                ));
            }
            settings.lease = std::time::Duration::from_secs(u64::from(l));
        }
        o.done()?;
        let id = self.fabric.create_subnet(net, &cidr, settings)?;
        let path = object_path("subnet", id)?;
        server
            .at(
                &path,
                SubnetObject {
                    fabric: self.fabric.clone(),
                    id,
                    network,
                },
            )
            .await?;
        saved(&self.fabric).await?;
        Ok(path)
    }

    /// Creates a port on `network` for one VM NIC; `mac` "" picks one.
    /// Options: "ip" s (on a network with a subnet; default the first free
    /// address), "ipv6" s (its address in the subnet's /64; default the one
    /// its MAC gives), "name" s (the VM's DNS name), "security_groups" ao (default
    /// the default group), "allowed_addresses" as (other source addresses or
    /// prefixes the VM may use, e.g. a virtual IP). Returns the port's object path, the vhost-user
    /// socket the VM's NIC connects to, and the MAC.
    async fn create_port(
        &self,
        network: OwnedObjectPath,
        mac: String,
        options: HashMap<String, OwnedValue>,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(OwnedObjectPath, String, String), NetError> {
        let net = id_in("network", &network)?;
        let mac = if mac.is_empty() {
            None
        } else {
            Some(parse_mac(&mac).ok_or_else(|| {
                NetError::InvalidArgument(format!(
                    "mac {mac:?}: want six hex bytes, 52:54:00:12:34:56"
                ))
            })?)
        };
        let mut o = Options(options);
        let ip = o.string("ip")?.map(|s| parse_ip("ip", &s)).transpose()?;
        let name = o.string("name")?.unwrap_or_default();
        let groups = o
            .paths("security_groups")?
            .map(|g| group_ids(&g))
            .transpose()?;
        let allowed = o.strings("allowed_addresses")?;
        let ip6 = o
            .string("ipv6")?
            .map(|s| {
                s.parse::<std::net::Ipv6Addr>().map_err(|_| {
                    NetError::InvalidArgument(format!("ipv6 {s:?}: not an IPv6 address"))
                })
            })
            .transpose()?;
        o.done()?;
        let fabric = self.fabric.clone();
        let entry = tokio::task::spawn_blocking(move || {
            let entry = fabric.create_port(net, mac, ip, &name, groups)?;
            let id = entry.port.id.0;
            let more = allowed
                .map_or(Ok(()), |a| fabric.set_allowed_addresses(id, &a))
                .and_then(|()| ip6.map_or(Ok(()), |a| fabric.set_port_ipv6(id, a)));
            if let Err(e) = more {
                let _ = fabric.delete_port(id);
                return Err(e);
            }
            Ok::<_, FabricError>(entry)
        })
        .await
        .map_err(|e| NetError::Failed(e.to_string()))??;
        let path = object_path("port", entry.port.id.0)?;
        let socket = entry.port.socket.display().to_string();
        let mac = format_mac(&entry.port.mac);
        server
            .at(
                &path,
                PortObject {
                    fabric: self.fabric.clone(),
                    entry,
                    network,
                },
            )
            .await?;
        saved(&self.fabric).await?;
        Ok((path, socket, mac))
    }

    /// Deletes a network and its subnet (refused while ports, a VPC gateway
    /// or floating IPs use it).
    async fn delete_network(
        &self,
        network: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let id = id_in("network", &network)?;
        let subnet = self.fabric.delete_network(id)?;
        server.remove::<NetworkObject, _>(&network).await?;
        if let Some(s) = subnet {
            server
                .remove::<SubnetObject, _>(&object_path("subnet", s)?)
                .await?;
        }
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Deletes a VPC no network is in; its gateway, port forwards and
    /// peerings go with it.
    async fn delete_vpc(
        &self,
        vpc: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let id = id_in("vpc", &vpc)?;
        let peers = self.fabric.vpc_peers(id);
        self.fabric.delete_vpc(id)?;
        server.remove::<VpcObject, _>(&vpc).await?;
        crate::objects::peers_changed(server, &peers).await;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Deletes a floating IP (unbinding it first) and frees its address.
    async fn delete_floating_ip(
        &self,
        floating_ip: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let id = id_in("floating_ip", &floating_ip)?;
        self.fabric.delete_floating_ip(id)?;
        server.remove::<FloatingIpObject, _>(&floating_ip).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Deletes a port: its VM's NIC is disconnected, the socket removed and
    /// its address freed (a floating IP bound to it stays, unbound).
    async fn delete_port(
        &self,
        port: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let id = id_in("port", &port)?;
        let mirrored = self.fabric.mirrored_to(id);
        let fabric = self.fabric.clone();
        tokio::task::spawn_blocking(move || fabric.delete_port(id))
            .await
            .map_err(|e| NetError::Failed(e.to_string()))??;
        server.remove::<PortObject, _>(&port).await?;
        crate::objects::mirrors_changed(server, &mirrored).await;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Creates a security group: it lets anything out and nothing in until
    /// rules are added.
    async fn create_security_group(
        &self,
        name: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<OwnedObjectPath, NetError> {
        let id = self.fabric.create_group(&name)?;
        let path = object_path("security_group", id.0)?;
        server
            .at(
                &path,
                GroupObject {
                    fabric: self.fabric.clone(),
                    id,
                },
            )
            .await?;
        saved(&self.fabric).await?;
        Ok(path)
    }

    /// Deletes a security group no port is in.
    async fn delete_security_group(
        &self,
        group: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let id = GroupId(id_in("security_group", &group)?);
        self.fabric.delete_group(id)?;
        server.remove::<GroupObject, _>(&group).await?;
        saved(&self.fabric).await?;
        Ok(())
    }
}

/// Typed client of `org.atoll.Net1`.
#[proxy(
    interface = "org.atoll.Net1",
    default_service = "org.atoll.Net1",
    default_path = "/org/atoll/Net1"
)]
pub trait Net1 {
    /// Version of the netd.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// Identifier of the node.
    #[zbus(property)]
    fn node_id(&self) -> zbus::Result<String>;
    /// "ok", "degraded" or "failed".
    #[zbus(property)]
    fn health(&self) -> zbus::Result<String>;
    /// Why Health is not "ok".
    #[zbus(property)]
    fn health_detail(&self) -> zbus::Result<String>;
    /// Start time in microseconds since the Unix epoch.
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<u64>;
    /// Whether /dev/net/tun can be opened, which TAP uplinks need.
    #[zbus(property)]
    fn tun_available(&self) -> zbus::Result<bool>;
    /// Transmit rings per data-path thread.
    #[zbus(property)]
    fn datapath_rings(&self) -> zbus::Result<Vec<u32>>;
    /// DNS resolvers forwarded to.
    #[zbus(property)]
    fn dns_upstreams(&self) -> zbus::Result<Vec<String>>;
    /// Opens the uplink.
    fn set_uplink(&self, interface: &str) -> zbus::Result<()>;
    /// Uplink counters.
    #[zbus(property)]
    fn uplink_counters(&self) -> zbus::Result<HashMap<String, u64>>;
    /// Takes a floating IP: (object, address).
    fn create_floating_ip(
        &self,
        network: &ObjectPath<'_>,
        ip: &str,
    ) -> zbus::Result<(OwnedObjectPath, String)>;
    /// Opens the tunnel endpoint.
    fn set_tunnel_endpoint(
        &self,
        address: &str,
        port: u16,
        encapsulation: &str,
    ) -> zbus::Result<String>;
    /// The tunnel endpoint's encapsulation.
    #[zbus(property)]
    fn tunnel_encapsulation(&self) -> zbus::Result<String>;
    /// Tunnel counters.
    #[zbus(property)]
    fn tunnel_counters(&self) -> zbus::Result<HashMap<String, u64>>;
    /// Creates a VPC.
    fn create_vpc(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Creates a network.
    fn create_network(
        &self,
        name: &str,
        kind: &str,
        options: HashMap<&str, zbus::zvariant::Value<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;
    /// Creates a subnet.
    fn create_subnet(
        &self,
        network: &ObjectPath<'_>,
        cidr: &str,
        options: HashMap<&str, zbus::zvariant::Value<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;
    /// Creates a port: (object, socket, mac).
    fn create_port(
        &self,
        network: &ObjectPath<'_>,
        mac: &str,
        options: HashMap<&str, zbus::zvariant::Value<'_>>,
    ) -> zbus::Result<(OwnedObjectPath, String, String)>;
    /// Deletes a port.
    fn delete_port(&self, port: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Deletes a network.
    fn delete_network(&self, network: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Deletes a VPC.
    fn delete_vpc(&self, vpc: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Deletes a floating IP.
    fn delete_floating_ip(&self, floating_ip: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Creates a security group.
    fn create_security_group(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Deletes a security group.
    fn delete_security_group(&self, group: &ObjectPath<'_>) -> zbus::Result<()>;
}
