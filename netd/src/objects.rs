//! The objects below `/org/atoll/Net1`: VPCs, networks, subnets, ports and
//! security groups, each a view of the [`Fabric`].

use std::collections::HashMap;
use std::sync::Arc;

use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{interface, proxy};

use crate::conntrack::Direction;
use crate::dbus::{format_mac, group_ids, id_in, object_path, saved, NetError};
use crate::fabric::{Fabric, Kind, PortEntry};
use crate::qos::Limit;
use crate::router::VpcId;
use crate::secgroup::{GroupId, Protocol, Remote, Rule};

/// A VPC on the bus.
#[derive(Debug)]
pub struct VpcObject {
    pub(crate) fabric: Arc<Fabric>,
    pub(crate) id: u32,
    pub(crate) name: String,
}

/// A VPC: networks whose subnets route to each other, and a gateway out.
#[interface(name = "org.atoll.Net1.Vpc")]
impl VpcObject {
    /// Name, unique on the node.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// The router's address on its external network ("" without one).
    #[zbus(property)]
    fn gateway_address(&self) -> String {
        self.fabric
            .vpc_gateway(self.id)
            .map(|(_, ip)| ip.to_string())
            .unwrap_or_default()
    }

    /// The router's IPv6 address on its external network, where that has a
    /// /64 ("" otherwise): the outside routes the VPC's /64s to it.
    #[zbus(property)]
    fn gateway_ipv6_address(&self) -> String {
        self.fabric
            .switch
            .gateway6(VpcId(self.id))
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    }

    /// Gives the VPC a way out on `network` (one with an external subnet):
    /// the router takes `address` there ("" for the first free one) and
    /// its VMs reach the outside with SNAT to it. Returns the address.
    async fn set_gateway(
        &self,
        network: OwnedObjectPath,
        address: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, NetError> {
        let net = id_in("network", &network)?;
        let want = if address.is_empty() {
            None
        } else {
            Some(address.parse().map_err(|_| {
                NetError::InvalidArgument(format!("address {address:?}: not an IPv4 address"))
            })?)
        };
        let ip = self.fabric.set_vpc_gateway(self.id, net, want)?;
        self.gateway_address_changed(&emitter).await?;
        self.gateway_ipv6_address_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(ip.to_string())
    }

    /// The VPCs peered with this one.
    #[zbus(property)]
    fn peers(&self) -> Vec<OwnedObjectPath> {
        self.fabric
            .vpc_peers(self.id)
            .into_iter()
            .filter_map(|v| object_path("vpc", v).ok())
            .collect()
    }

    /// Peers this VPC with `vpc`: the subnets of both route to each other
    /// (not on to a peer's peers); refused while any overlap.
    async fn peer(
        &self,
        vpc: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let other = id_in("vpc", &vpc)?;
        self.fabric.peer_vpcs(self.id, other)?;
        peers_changed(server, &[self.id, other]).await;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Parts this VPC from peer `vpc`.
    async fn unpeer(
        &self,
        vpc: OwnedObjectPath,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<(), NetError> {
        let other = id_in("vpc", &vpc)?;
        self.fabric.unpeer_vpcs(self.id, other)?;
        peers_changed(server, &[self.id, other]).await;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Port forwards of the gateway address: (id, protocol, gateway port,
    /// VM address, VM port).
    #[zbus(property)]
    fn port_forwards(&self) -> Vec<(u32, String, u16, String, u16)> {
        self.fabric
            .port_forwards(self.id)
            .into_iter()
            .map(|(id, f)| {
                let addr = f.address.to_string();
                (id, f.protocol().to_owned(), f.external_port, addr, f.port)
            })
            .collect()
    }

    /// Forwards `protocol` ("tcp" or "udp") port `external_port` of the
    /// gateway address to `address`:`port` in one of the VPC's subnets (the
    /// VM's ingress rules apply). Returns the forward's id.
    async fn add_port_forward(
        &self,
        protocol: String,
        external_port: u16,
        address: String,
        port: u16,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<u32, NetError> {
        let ip = address.parse().map_err(|_| {
            NetError::InvalidArgument(format!("address {address:?}: not an IPv4 address"))
        })?;
        let id = self
            .fabric
            .add_port_forward(self.id, &protocol, external_port, ip, port)?;
        self.port_forwards_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(id)
    }

    /// Removes port forward `id`; its connections end.
    async fn remove_port_forward(
        &self,
        id: u32,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        self.fabric.remove_port_forward(self.id, id)?;
        self.port_forwards_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }
}

/// Signals that the peers of the VPCs `ids` changed (those still on the
/// bus).
pub(crate) async fn peers_changed(server: &zbus::ObjectServer, ids: &[u32]) {
    for id in ids {
        let Ok(path) = object_path("vpc", *id) else {
            continue;
        };
        let Ok(iface) = server.interface::<_, VpcObject>(path).await else {
            continue;
        };
        let emitter = iface.signal_emitter().clone();
        let vpc = iface.get().await;
        if let Err(e) = vpc.peers_changed(&emitter).await {
            tracing::debug!("cannot signal VPC {id}'s peers: {e}");
        }
    }
}

/// Signals that the mirror targets of the ports `ids` changed (those still
/// on the bus).
pub(crate) async fn mirrors_changed(server: &zbus::ObjectServer, ids: &[u32]) {
    for id in ids {
        let Ok(path) = object_path("port", *id) else {
            continue;
        };
        let Ok(iface) = server.interface::<_, PortObject>(path).await else {
            continue;
        };
        let emitter = iface.signal_emitter().clone();
        let port = iface.get().await;
        if let Err(e) = port.mirror_changed(&emitter).await {
            tracing::debug!("cannot signal port {id}'s mirror: {e}");
        }
    }
}

/// A floating IP on the bus.
#[derive(Debug)]
pub struct FloatingIpObject {
    pub(crate) fabric: Arc<Fabric>,
    pub(crate) id: u32,
    pub(crate) network: OwnedObjectPath,
}

/// An address on an external network that stands for one VM's port
/// (DNAT in, SNAT out).
#[interface(name = "org.atoll.Net1.FloatingIp")]
impl FloatingIpObject {
    /// The address.
    #[zbus(property(emits_changed_signal = "const"))]
    fn ip(&self) -> String {
        self.fabric
            .floating_ip(self.id)
            .map(|f| f.ip.to_string())
            .unwrap_or_default()
    }

    /// Its external network.
    #[zbus(property(emits_changed_signal = "const"))]
    fn network(&self) -> OwnedObjectPath {
        self.network.clone()
    }

    /// The port it stands for ("/" if none).
    #[zbus(property)]
    fn port(&self) -> OwnedObjectPath {
        self.fabric
            .floating_ip(self.id)
            .and_then(|f| f.port)
            .and_then(|p| object_path("port", p).ok())
            .unwrap_or_else(root)
    }

    /// Binds it to `port` (one with an address in a VPC whose gateway is on
    /// this network).
    async fn associate(
        &self,
        port: OwnedObjectPath,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        let p = id_in("port", &port)?;
        self.fabric.associate_floating_ip(self.id, Some(p))?;
        self.port_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Unbinds it.
    async fn disassociate(
        &self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        self.fabric.associate_floating_ip(self.id, None)?;
        self.port_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Rate limits (ingress kbit/s, ingress burst KiB, egress kbit/s,
    /// egress burst KiB; ingress is towards the VM); 0 kbit/s is no limit.
    /// Both directions are policed: beyond the rate, packets are dropped.
    #[zbus(property)]
    fn qos(&self) -> (u32, u32, u32, u32) {
        let Some(f) = self.fabric.floating_ip(self.id) else {
            return (0, 0, 0, 0);
        };
        let ((i, e), _) = self.fabric.switch.floating_traffic(f.ip);
        (i.kbps, i.burst_kib, e.kbps, e.burst_kib)
    }

    /// Sets the rate limits (see Qos), online.
    async fn set_qos(
        &self,
        ingress_kbps: u32,
        ingress_burst_kib: u32,
        egress_kbps: u32,
        egress_burst_kib: u32,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        let ingress = qos_limit("ingress", ingress_kbps, ingress_burst_kib)?;
        let egress = qos_limit("egress", egress_kbps, egress_burst_kib)?;
        self.fabric.set_floating_qos(self.id, ingress, egress)?;
        self.qos_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// rx (towards the VM) and tx packets and bytes through the address,
    /// and those dropped over the limits (rx_policed, tx_policed).
    #[zbus(property(emits_changed_signal = "false"))]
    fn counters(&self) -> HashMap<String, u64> {
        let Some(f) = self.fabric.floating_ip(self.id) else {
            return HashMap::new();
        };
        let (_, c) = self.fabric.switch.floating_traffic(f.ip);
        c.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

/// A direction's limit from D-Bus arguments: a rate of 0 (none) or at
/// least 64 kbit/s.
fn qos_limit(what: &str, kbps: u32, burst_kib: u32) -> Result<Limit, NetError> {
    if kbps != 0 && kbps < 64 {
        return Err(NetError::InvalidArgument(format!(
            "{what}_kbps {kbps}: 0 (no limit) or at least 64"
        )));
    }
    Ok(Limit { kbps, burst_kib })
}

/// A network on the bus.
#[derive(Debug)]
pub struct NetworkObject {
    pub(crate) fabric: Arc<Fabric>,
    pub(crate) id: u32,
    pub(crate) vpc: Option<OwnedObjectPath>,
}

/// One L2 segment.
#[interface(name = "org.atoll.Net1.Network")]
impl NetworkObject {
    /// Name, unique on the node.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.fabric
            .network(self.id)
            .map(|n| n.name)
            .unwrap_or_default()
    }

    /// "flat", "vlan" or "overlay".
    #[zbus(property(emits_changed_signal = "const"))]
    fn kind(&self) -> String {
        self.fabric
            .network(self.id)
            .map(|n| n.kind.name().to_owned())
            .unwrap_or_default()
    }

    /// The VLAN id of a "vlan" network; 0 otherwise.
    #[zbus(property(emits_changed_signal = "const"))]
    fn vlan(&self) -> u16 {
        match self.fabric.network(self.id).map(|n| n.kind) {
            Some(Kind::Vlan(v)) => v,
            _ => 0,
        }
    }

    /// The VNI of an "overlay" network; 0 otherwise.
    #[zbus(property(emits_changed_signal = "const"))]
    fn vni(&self) -> u32 {
        match self.fabric.network(self.id).map(|n| n.kind) {
            Some(Kind::Overlay(v)) => v,
            _ => 0,
        }
    }

    /// Tunnel endpoints of the other nodes with ports on this overlay
    /// network.
    #[zbus(property)]
    fn remotes(&self) -> Vec<String> {
        self.fabric
            .network(self.id)
            .map(|n| n.remotes.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    /// Replaces the tunnel endpoints of the other nodes with ports on this
    /// overlay network (mgmtd keeps it current as ports come and go).
    async fn set_remotes(
        &self,
        remotes: Vec<String>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        let ips = remotes
            .iter()
            .map(|r| {
                r.parse().map_err(|_| {
                    NetError::InvalidArgument(format!("remote {r:?}: not an IP address"))
                })
            })
            .collect::<Result<Vec<std::net::IpAddr>, NetError>>()?;
        self.fabric.set_remotes(self.id, ips)?;
        self.remotes_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Its VPC ("/" if none).
    #[zbus(property(emits_changed_signal = "const"))]
    fn vpc(&self) -> OwnedObjectPath {
        self.vpc.clone().unwrap_or_else(root)
    }

    /// Its subnet ("/" if none).
    #[zbus(property)]
    fn subnet(&self) -> OwnedObjectPath {
        self.fabric
            .network(self.id)
            .and_then(|n| n.subnet)
            .and_then(|s| object_path("subnet", s).ok())
            .unwrap_or_else(root)
    }
}

fn root() -> OwnedObjectPath {
    ObjectPath::from_static_str_unchecked("/").into()
}

/// A subnet on the bus.
#[derive(Debug)]
pub struct SubnetObject {
    pub(crate) fabric: Arc<Fabric>,
    pub(crate) id: u32,
    pub(crate) network: OwnedObjectPath,
}

/// An IPv4 subnet: addresses for the ports of its network, and a gateway
/// that answers DHCP, DNS and ping and routes within the VPC.
#[interface(name = "org.atoll.Net1.Subnet")]
impl SubnetObject {
    /// Its network.
    #[zbus(property(emits_changed_signal = "const"))]
    fn network(&self) -> OwnedObjectPath {
        self.network.clone()
    }

    /// "10.0.0.0/24".
    #[zbus(property(emits_changed_signal = "const"))]
    fn cidr(&self) -> String {
        self.fabric
            .subnet(self.id)
            .map(|s| format!("{}/{}", s.subnet.net, s.subnet.prefix))
            .unwrap_or_default()
    }

    /// The gateway's address.
    #[zbus(property(emits_changed_signal = "const"))]
    fn gateway(&self) -> String {
        self.fabric
            .subnet(self.id)
            .map(|s| s.subnet.gateway.to_string())
            .unwrap_or_default()
    }

    /// The IPv6 /64 VMs form their addresses in ("" for none).
    #[zbus(property(emits_changed_signal = "const"))]
    fn ipv6(&self) -> String {
        self.fabric
            .subnet(self.id)
            .and_then(|s| s.subnet.prefix6)
            .map(|p| format!("{p}/64"))
            .unwrap_or_default()
    }

    /// How VMs get their IPv6 addresses: "slaac" (they form them from the
    /// router's advertisements), "dhcpv6" (DHCPv6 assigns them), "" (no
    /// /64).
    #[zbus(property(emits_changed_signal = "const"))]
    fn ipv6_mode(&self) -> String {
        match self.fabric.subnet(self.id).map(|s| s.subnet) {
            Some(s) if s.prefix6.is_some() => if s.dhcp6 { "dhcpv6" } else { "slaac" }.into(),
            _ => String::new(),
        }
    }

    /// Whether the /64 leaves the VPC translated to the router's IPv6
    /// address (NAT66) rather than routed.
    #[zbus(property(emits_changed_signal = "const"))]
    fn ipv6_snat(&self) -> bool {
        self.fabric.subnet(self.id).is_some_and(|s| s.subnet.snat6)
    }

    /// IPv6 DNS servers VMs are told of: the router's own, then the
    /// subnet's others.
    #[zbus(property(emits_changed_signal = "const"))]
    fn dns6(&self) -> Vec<String> {
        self.fabric
            .subnet(self.id)
            .map(|s| {
                s.subnet
                    .dns6_servers()
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The gateway's MAC.
    #[zbus(property(emits_changed_signal = "const"))]
    fn gateway_mac(&self) -> String {
        self.fabric
            .subnet(self.id)
            .map(|s| format_mac(&s.subnet.gateway_mac))
            .unwrap_or_default()
    }

    /// Address ranges never handed out ("first-last", or one address).
    #[zbus(property)]
    fn reserved(&self) -> Vec<String> {
        self.fabric
            .subnet(self.id)
            .map(|s| {
                s.settings
                    .reserved
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sets the reserved ranges ("192.0.2.5", "192.0.2.5-192.0.2.9",
    /// "192.0.2.0/28"); refused if one covers an address in use.
    async fn set_reserved(
        &self,
        reserved: Vec<String>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        let ranges = crate::dbus::parse_ranges(&reserved)?;
        self.fabric.set_subnet_reserved(self.id, ranges)?;
        self.reserved_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// DNS domain of VM names.
    #[zbus(property(emits_changed_signal = "const"))]
    fn domain(&self) -> String {
        self.fabric
            .subnet(self.id)
            .map(|s| s.settings.domain)
            .unwrap_or_default()
    }

    /// DNS servers DHCP hands out after the gateway.
    #[zbus(property(emits_changed_signal = "const"))]
    fn dns(&self) -> Vec<String> {
        self.fabric
            .subnet(self.id)
            .map(|s| s.settings.dns.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    /// MTU for the guests.
    #[zbus(property(emits_changed_signal = "const"))]
    fn mtu(&self) -> u16 {
        self.fabric
            .subnet(self.id)
            .map(|s| s.settings.mtu)
            .unwrap_or_default()
    }
}

/// A port on the bus.
#[derive(Debug)]
pub struct PortObject {
    pub(crate) fabric: Arc<Fabric>,
    pub(crate) entry: PortEntry,
    pub(crate) network: OwnedObjectPath,
}

/// A switch port: one VM NIC's vhost-user-net socket.
#[interface(name = "org.atoll.Net1.Port")]
impl PortObject {
    /// The network it is on.
    #[zbus(property(emits_changed_signal = "const"))]
    fn network(&self) -> OwnedObjectPath {
        self.network.clone()
    }

    /// The MAC its NIC gets.
    #[zbus(property(emits_changed_signal = "const"))]
    fn mac(&self) -> String {
        format_mac(&self.entry.port.mac)
    }

    /// The vhost-user socket the VM connects to.
    #[zbus(property(emits_changed_signal = "const"))]
    fn socket(&self) -> String {
        self.entry.port.socket.display().to_string()
    }

    /// Its fixed address ("" on a network without a subnet: the port is
    /// then not filtered).
    #[zbus(property(emits_changed_signal = "const"))]
    fn ip(&self) -> String {
        self.entry
            .port
            .security()
            .ip
            .map(|i| i.to_string())
            .unwrap_or_default()
    }

    /// Other source prefixes the VM may use besides Ip.
    #[zbus(property(emits_changed_signal = "const"))]
    fn allowed_addresses(&self) -> Vec<String> {
        self.entry
            .port
            .security()
            .allowed
            .iter()
            .map(|(ip, len)| format!("{ip}/{len}"))
            .chain(
                self.entry
                    .port
                    .security()
                    .allowed6
                    .iter()
                    .map(|(ip, len)| format!("{ip}/{len}")),
            )
            .collect()
    }

    /// The IPv6 addresses the VM forms for itself and may use (empty while
    /// the port has no address and is unfiltered).
    #[zbus(property(emits_changed_signal = "const"))]
    fn ipv6_addresses(&self) -> Vec<String> {
        self.entry
            .port
            .security()
            .ip6
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Its VM's DNS name.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.entry.name.clone()
    }

    /// The security groups whose rules its traffic meets.
    #[zbus(property)]
    fn security_groups(&self) -> Vec<OwnedObjectPath> {
        self.entry
            .port
            .security()
            .groups
            .iter()
            .filter_map(|g| object_path("security_group", g.0).ok())
            .collect()
    }

    /// Replaces the port's security groups, online: connections the new
    /// groups do not allow are cut, the others carry on.
    async fn set_security_groups(
        &self,
        groups: Vec<OwnedObjectPath>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        let ids = group_ids(&groups)?;
        self.fabric.set_port_groups(self.entry.port.id.0, ids)?;
        self.security_groups_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// Sets what the metadata service (http://169.254.169.254/) tells the
    /// VM: its user-data (at most 64 KiB) and SSH public keys (at most 32).
    async fn set_metadata(
        &self,
        user_data: Vec<u8>,
        ssh_keys: Vec<String>,
    ) -> Result<(), NetError> {
        if user_data.len() > crate::metadata::MAX_USER_DATA {
            return Err(NetError::InvalidArgument(format!(
                "user_data: {} bytes, at most {}",
                user_data.len(),
                crate::metadata::MAX_USER_DATA
            )));
        }
        if ssh_keys.len() > 32 {
            return Err(NetError::InvalidArgument("ssh_keys: at most 32".into()));
        }
        if let Some(k) = ssh_keys
            .iter()
            .find(|k| k.is_empty() || k.len() > 16_384 || k.contains(['\n', '\r']))
        {
            return Err(NetError::InvalidArgument(format!(
                "ssh key {:?}: one line of at most 16 KiB",
                k.chars().take(32).collect::<String>()
            )));
        }
        self.entry.port.set_metadata(user_data, ssh_keys, None);
        saved(&self.fabric).await?;
        Ok(())
    }

    /// The port that gets a copy of every frame this one sends or receives
    /// ("/" if none).
    #[zbus(property)]
    fn mirror(&self) -> OwnedObjectPath {
        self.entry
            .port
            .mirror_target()
            .and_then(|p| object_path("port", p.0).ok())
            .unwrap_or_else(root)
    }

    /// Mirrors this port's traffic to `target` (another port, say a
    /// capture VM's); "/" stops it.
    async fn set_mirror(
        &self,
        target: OwnedObjectPath,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        let t = if target.as_str() == "/" {
            None
        } else {
            Some(crate::l2::PortId(id_in("port", &target)?))
        };
        self.fabric
            .switch
            .set_mirror(self.entry.port.id, t)
            .map_err(|e| NetError::InvalidArgument(format!("mirror target: {e}")))?;
        self.mirror_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// The SSH keys the metadata service hands out.
    #[zbus(property(emits_changed_signal = "false"))]
    fn ssh_keys(&self) -> Vec<String> {
        self.entry.port.metadata().ssh_keys
    }

    /// Rate limits: (ingress kbit/s, ingress burst KiB, egress kbit/s,
    /// egress burst KiB); 0 kbit/s is no limit. Ingress (to the VM) is
    /// policed, egress (from the VM) shaped.
    #[zbus(property)]
    fn qos(&self) -> (u32, u32, u32, u32) {
        let (i, e) = self.entry.port.qos();
        (i.kbps, i.burst_kib, e.kbps, e.burst_kib)
    }

    /// Sets the rate limits (see Qos), online.
    async fn set_qos(
        &self,
        ingress_kbps: u32,
        ingress_burst_kib: u32,
        egress_kbps: u32,
        egress_burst_kib: u32,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        let ingress = qos_limit("ingress", ingress_kbps, ingress_burst_kib)?;
        let egress = qos_limit("egress", egress_kbps, egress_burst_kib)?;
        self.entry.port.set_qos(ingress, egress);
        self.qos_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }

    /// tx/rx frames and bytes (tx = from the VM), tx_dropped (malformed or
    /// unroutable), rx_dropped (no room in the VM), rx_pending (waiting for the VM's
    /// receive buffers now), tx_filtered (spoofed or
    /// not allowed out), rx_filtered (not allowed in), rx_policed (over the
    /// ingress rate).
    /// Read on each Get.
    #[zbus(property(emits_changed_signal = "false"))]
    fn counters(&self) -> HashMap<String, u64> {
        self.entry
            .port
            .counters()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// Connections its security groups let through, tracked now.
    #[zbus(property(emits_changed_signal = "false"))]
    fn connections(&self) -> u32 {
        u32::try_from(self.entry.port.connections()).unwrap_or(u32::MAX)
    }
}

/// A security group on the bus.
#[derive(Debug)]
pub struct GroupObject {
    pub(crate) fabric: Arc<Fabric>,
    pub(crate) id: GroupId,
}

/// One rule as D-Bus carries it: (id, direction, protocol, port_min,
/// port_max, remote_cidr, remote_group).
pub type RuleTuple = (u32, String, String, u16, u16, String, String);

fn rule_tuple(id: u32, r: &Rule) -> RuleTuple {
    let dir = match r.direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let proto = match r.protocol {
        Protocol::Any => "any",
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
    };
    let (lo, hi) = match r.protocol {
        Protocol::Tcp | Protocol::Udp => r.ports,
        _ => (0, 0),
    };
    let (cidr, group) = match r.remote {
        Remote::Any => (String::new(), String::new()),
        Remote::Cidr(ip, len) => (format!("{ip}/{len}"), String::new()),
        Remote::Cidr6(ip, len) => (format!("{ip}/{len}"), String::new()),
        Remote::Group(g) => (
            String::new(),
            object_path("security_group", g.0)
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ),
    };
    (id, dir.into(), proto.into(), lo, hi, cidr, group)
}

/// A security group: allow rules for the ports in it; ingress is denied
/// and egress allowed unless a rule says otherwise.
#[interface(name = "org.atoll.Net1.SecurityGroup")]
impl GroupObject {
    /// Name, unique on the node.
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.fabric.group(self.id).unwrap_or_default()
    }

    /// Its rules: (id, direction "ingress"/"egress", protocol
    /// "any"/"tcp"/"udp"/"icmp", port_min, port_max, remote_cidr ("" any),
    /// remote_group (a group's path, or "")).
    #[zbus(property)]
    fn rules(&self) -> Vec<RuleTuple> {
        self.fabric
            .switch
            .rules(self.id)
            .unwrap_or_default()
            .iter()
            .map(|(id, r)| rule_tuple(*id, r))
            .collect()
    }

    /// Adds a rule, online (ports 0, 0: all; a remote CIDR or a remote
    /// group, or neither for any address). Returns its id.
    #[allow(clippy::too_many_arguments)]
    async fn add_rule(
        &self,
        direction: String,
        protocol: String,
        port_min: u16,
        port_max: u16,
        remote_cidr: String,
        remote_group: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<u32, NetError> {
        let group = if remote_group.is_empty() {
            None
        } else {
            let path = ObjectPath::try_from(remote_group.as_str()).map_err(|_| {
                NetError::InvalidArgument(format!("remote_group {remote_group:?}: not a path"))
            })?;
            let g = GroupId(id_in("security_group", &path)?);
            if self.fabric.group(g).is_none() {
                return Err(NetError::NotFound(format!(
                    "no security group {remote_group}"
                )));
            }
            Some(g)
        };
        let rule = Rule::parse(
            &direction,
            &protocol,
            (port_min, port_max),
            &remote_cidr,
            group,
        )
        .map_err(|e| NetError::InvalidArgument(e.to_string()))?;
        let id = self
            .fabric
            .switch
            .add_rule(self.id, rule)
            .map_err(|e| NetError::Failed(e.to_string()))?;
        self.rules_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(id)
    }

    /// Removes a rule, online: connections no remaining rule allows are
    /// cut; the others carry on.
    async fn remove_rule(
        &self,
        id: u32,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), NetError> {
        self.fabric
            .switch
            .remove_rule(self.id, id)
            .map_err(|e| NetError::NotFound(e.to_string()))?;
        self.rules_changed(&emitter).await?;
        saved(&self.fabric).await?;
        Ok(())
    }
}

/// Typed client of a VPC.
#[proxy(interface = "org.atoll.Net1.Vpc", default_service = "org.atoll.Net1")]
pub trait Vpc {
    /// The gateway's address.
    #[zbus(property)]
    fn gateway_address(&self) -> zbus::Result<String>;
    /// Gives the VPC a way out.
    fn set_gateway(&self, network: &ObjectPath<'_>, address: &str) -> zbus::Result<String>;
    /// The VPCs peered with it.
    #[zbus(property)]
    fn peers(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// Peers it with another VPC.
    fn peer(&self, vpc: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Parts it from a peer.
    fn unpeer(&self, vpc: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Its port forwards.
    #[zbus(property)]
    fn port_forwards(&self) -> zbus::Result<Vec<(u32, String, u16, String, u16)>>;
    /// Forwards a port of the gateway address to a VM.
    fn add_port_forward(
        &self,
        protocol: &str,
        external_port: u16,
        address: &str,
        port: u16,
    ) -> zbus::Result<u32>;
    /// Removes a port forward.
    fn remove_port_forward(&self, id: u32) -> zbus::Result<()>;
}

/// Typed client of a floating IP.
#[proxy(
    interface = "org.atoll.Net1.FloatingIp",
    default_service = "org.atoll.Net1"
)]
pub trait FloatingIp {
    /// The address.
    #[zbus(property)]
    fn ip(&self) -> zbus::Result<String>;
    /// The port.
    #[zbus(property)]
    fn port(&self) -> zbus::Result<OwnedObjectPath>;
    /// Binds it.
    fn associate(&self, port: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Rate limits.
    #[zbus(property)]
    fn qos(&self) -> zbus::Result<(u32, u32, u32, u32)>;
    /// Sets the rate limits.
    fn set_qos(
        &self,
        ingress_kbps: u32,
        ingress_burst_kib: u32,
        egress_kbps: u32,
        egress_burst_kib: u32,
    ) -> zbus::Result<()>;
    /// Counters.
    #[zbus(property)]
    fn counters(&self) -> zbus::Result<HashMap<String, u64>>;
    /// Unbinds it.
    fn disassociate(&self) -> zbus::Result<()>;
}

/// Typed client of a network.
#[proxy(
    interface = "org.atoll.Net1.Network",
    default_service = "org.atoll.Net1"
)]
pub trait Network {
    /// Name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// VNI.
    #[zbus(property)]
    fn vni(&self) -> zbus::Result<u32>;
    /// Remote endpoints.
    #[zbus(property)]
    fn remotes(&self) -> zbus::Result<Vec<String>>;
    /// Replaces the remote endpoints.
    fn set_remotes(&self, remotes: &[&str]) -> zbus::Result<()>;
}

/// Typed client of a port.
#[proxy(interface = "org.atoll.Net1.Port", default_service = "org.atoll.Net1")]
pub trait Port {
    /// Its network.
    #[zbus(property)]
    fn network(&self) -> zbus::Result<OwnedObjectPath>;
    /// MAC.
    #[zbus(property)]
    fn mac(&self) -> zbus::Result<String>;
    /// Socket.
    #[zbus(property)]
    fn socket(&self) -> zbus::Result<String>;
    /// Fixed address.
    #[zbus(property)]
    fn ip(&self) -> zbus::Result<String>;
    /// IPv6 addresses (link-local, then the one in the subnet's /64).
    #[zbus(property)]
    fn ipv6_addresses(&self) -> zbus::Result<Vec<String>>;
    /// DNS name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// Security groups.
    #[zbus(property)]
    fn security_groups(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// Replaces the security groups.
    fn set_security_groups(&self, groups: &[ObjectPath<'_>]) -> zbus::Result<()>;
    /// Counters.
    #[zbus(property)]
    fn counters(&self) -> zbus::Result<HashMap<String, u64>>;
    /// Tracked connections.
    #[zbus(property)]
    fn connections(&self) -> zbus::Result<u32>;
    /// Rate limits.
    #[zbus(property)]
    fn qos(&self) -> zbus::Result<(u32, u32, u32, u32)>;
    /// Sets the metadata.
    fn set_metadata(&self, user_data: &[u8], ssh_keys: &[&str]) -> zbus::Result<()>;
    /// SSH keys handed out.
    #[zbus(property)]
    fn ssh_keys(&self) -> zbus::Result<Vec<String>>;
    /// The mirror target.
    #[zbus(property)]
    fn mirror(&self) -> zbus::Result<OwnedObjectPath>;
    /// Mirrors the port's traffic.
    fn set_mirror(&self, target: &ObjectPath<'_>) -> zbus::Result<()>;
    /// Sets the rate limits.
    fn set_qos(
        &self,
        ingress_kbps: u32,
        ingress_burst_kib: u32,
        egress_kbps: u32,
        egress_burst_kib: u32,
    ) -> zbus::Result<()>;
}

/// Typed client of a subnet.
#[proxy(
    interface = "org.atoll.Net1.Subnet",
    default_service = "org.atoll.Net1"
)]
pub trait Subnet {
    /// Prefix.
    #[zbus(property)]
    fn cidr(&self) -> zbus::Result<String>;
    /// Gateway address.
    #[zbus(property)]
    fn gateway(&self) -> zbus::Result<String>;
    /// Gateway MAC.
    #[zbus(property)]
    fn gateway_mac(&self) -> zbus::Result<String>;
    /// IPv6 /64.
    #[zbus(property)]
    fn ipv6(&self) -> zbus::Result<String>;
    /// How VMs get IPv6 addresses.
    #[zbus(property)]
    fn ipv6_mode(&self) -> zbus::Result<String>;
    /// IPv6 DNS servers told to VMs.
    #[zbus(property)]
    fn dns6(&self) -> zbus::Result<Vec<String>>;
    /// NAT66 on the way out.
    #[zbus(property)]
    fn ipv6_snat(&self) -> zbus::Result<bool>;
    /// Reserved ranges.
    #[zbus(property)]
    fn reserved(&self) -> zbus::Result<Vec<String>>;
    /// Sets the reserved ranges.
    fn set_reserved(&self, reserved: &[&str]) -> zbus::Result<()>;
}

/// Typed client of a security group.
#[proxy(
    interface = "org.atoll.Net1.SecurityGroup",
    default_service = "org.atoll.Net1"
)]
pub trait SecurityGroup {
    /// Name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// Rules.
    #[zbus(property)]
    fn rules(&self) -> zbus::Result<Vec<RuleTuple>>;
    /// Adds a rule; returns its id.
    #[allow(clippy::too_many_arguments)]
    fn add_rule(
        &self,
        direction: &str,
        protocol: &str,
        port_min: u16,
        port_max: u16,
        remote_cidr: &str,
        remote_group: &str,
    ) -> zbus::Result<u32>;
    /// Removes a rule.
    fn remove_rule(&self, id: u32) -> zbus::Result<()>;
}
