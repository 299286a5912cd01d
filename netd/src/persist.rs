//! netd's configuration on disk, so that a restarted netd (an upgrade, a
//! crash the node's supervisor restarts) comes back with every network,
//! subnet, port, security group and floating IP it had, under the same ids,
//! sockets, MACs and addresses: the VMs' NICs reconnect and carry on.
//!
//! The store is a SQLite file (`netd.db` in netd's data directory) with one
//! row per object, its settings as JSON. After every change the fabric's
//! [`Snapshot`] is taken and only the rows that differ are written, in one
//! transaction: a crash leaves the state before or after the change.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::fabric::{Kind, SubnetSettings};
use crate::qos::Limit;
use crate::secgroup::Rule;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// SQLite failed (open, read or write).
    #[error("state database {path}: {source}")]
    Db {
        /// The file.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A row does not parse.
    #[error("state database row {key:?}: {source}")]
    Row {
        /// Its key.
        key: String,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A row's key names no kind of object.
    #[error("state database row {0:?}: unknown kind")]
    Kind(String),
    /// Another netd has the data directory.
    #[error("data directory {0} is in use by another netd")]
    Locked(String),
    /// The data directory could not be made.
    #[error("data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The node-wide settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The fabric's next id (VPCs, networks, subnets, groups, floating
    /// IPs, port forwards share it).
    pub next: u32,
    /// The next port id.
    pub next_port: u32,
    /// The uplink's TAP interface.
    pub uplink: Option<String>,
    /// The tunnel endpoint asked for, and its encapsulation.
    pub tunnel: Option<(SocketAddr, String)>,
}

/// A security group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRec {
    /// Its id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Rules by id.
    pub rules: BTreeMap<u32, Rule>,
    /// The next rule's id.
    pub next_rule: u32,
}

/// A VPC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VpcRec {
    /// Its id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Its gateway: external network, address.
    pub gateway: Option<(u32, Ipv4Addr)>,
    /// VPCs with higher ids it is peered with.
    pub peers: Vec<u32>,
}

/// A network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRec {
    /// Its id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Its VPC.
    pub vpc: Option<u32>,
    /// On the uplink.
    pub uplink: bool,
    /// Overlay remotes.
    pub remotes: Vec<IpAddr>,
}

/// A subnet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubnetRec {
    /// Its id.
    pub id: u32,
    /// Its network.
    pub network: u32,
    /// "10.0.0.0/24".
    pub cidr: String,
    /// Settings (the gateway always given).
    pub settings: SubnetSettings,
}

/// A port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortRec {
    /// Its id (its socket's name).
    pub id: u32,
    /// Its network.
    pub network: u32,
    /// MAC.
    pub mac: [u8; 6],
    /// Fixed address.
    pub ip: Option<Ipv4Addr>,
    /// DNS name.
    pub name: String,
    /// Security groups.
    pub groups: Vec<u32>,
    /// Allowed address pairs, "a/len".
    pub allowed: Vec<String>,
    /// Chosen IPv6 address (DHCPv6 subnets).
    pub ipv6: Option<Ipv6Addr>,
    /// QoS: ingress, egress.
    pub qos: (Limit, Limit),
    /// Metadata: user-data, SSH keys.
    pub user_data: Vec<u8>,
    /// SSH keys.
    pub ssh_keys: Vec<String>,
    /// Mirrored to.
    pub mirror: Option<u32>,
}

/// A floating IP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloatingRec {
    /// Its id.
    pub id: u32,
    /// Its external network.
    pub network: u32,
    /// The address.
    pub ip: Ipv4Addr,
    /// Bound to.
    pub port: Option<u32>,
    /// QoS: ingress, egress.
    pub qos: (Limit, Limit),
}

/// A port forward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRec {
    /// Its id.
    pub id: u32,
    /// The VPC.
    pub vpc: u32,
    /// "tcp" or "udp".
    pub protocol: String,
    /// The gateway's port.
    pub external_port: u16,
    /// The VM's address.
    pub address: Ipv4Addr,
    /// The VM's port.
    pub port: u16,
}

/// Everything netd was told, object by object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Node-wide settings.
    pub meta: Meta,
    /// Security groups (the default one too: its rules may change).
    pub groups: Vec<GroupRec>,
    /// VPCs.
    pub vpcs: Vec<VpcRec>,
    /// Networks.
    pub networks: Vec<NetworkRec>,
    /// Subnets.
    pub subnets: Vec<SubnetRec>,
    /// Ports.
    pub ports: Vec<PortRec>,
    /// Floating IPs.
    pub floating: Vec<FloatingRec>,
    /// Port forwards.
    pub forwards: Vec<ForwardRec>,
}

type Rows = BTreeMap<String, String>;

fn put<T: Serialize>(rows: &mut Rows, key: String, value: &T) {
    // Serialising these plain records cannot fail (no maps with non-string
    // keys other than integers, no custom serialisers).
    if let Ok(v) = serde_json::to_string(value) {
        rows.insert(key, v);
    }
}

fn get<T: for<'de> Deserialize<'de>>(key: &str, value: &str) -> Result<T, PersistError> {
    serde_json::from_str(value).map_err(|source| PersistError::Row {
        key: key.to_owned(),
        source,
    })
}

impl Snapshot {
    /// One row per object: "kind/id" → JSON.
    fn rows(&self) -> Rows {
        let mut rows = Rows::new();
        put(&mut rows, "meta".into(), &self.meta);
        for g in &self.groups {
            put(&mut rows, format!("group/{}", g.id), g);
        }
        for v in &self.vpcs {
            put(&mut rows, format!("vpc/{}", v.id), v);
        }
        for n in &self.networks {
            put(&mut rows, format!("network/{}", n.id), n);
        }
        for s in &self.subnets {
            put(&mut rows, format!("subnet/{}", s.id), s);
        }
        for p in &self.ports {
            put(&mut rows, format!("port/{}", p.id), p);
        }
        for f in &self.floating {
            put(&mut rows, format!("floating/{}", f.id), f);
        }
        for f in &self.forwards {
            put(&mut rows, format!("forward/{}", f.id), f);
        }
        rows
    }

    /// The snapshot the rows describe, and the rows that do not parse
    /// (left out: one damaged object must not take the node's other
    /// networks down).
    fn from_rows(rows: &Rows) -> (Self, Vec<PersistError>) {
        let mut s = Snapshot::default();
        let mut bad = Vec::new();
        for (k, v) in rows {
            let r = match k.split_once('/').map_or(k.as_str(), |(kind, _)| kind) {
                "meta" => get(k, v).map(|m| s.meta = m),
                "group" => get(k, v).map(|x| s.groups.push(x)),
                "vpc" => get(k, v).map(|x| s.vpcs.push(x)),
                "network" => get(k, v).map(|x| s.networks.push(x)),
                "subnet" => get(k, v).map(|x| s.subnets.push(x)),
                "port" => get(k, v).map(|x| s.ports.push(x)),
                "floating" => get(k, v).map(|x| s.floating.push(x)),
                "forward" => get(k, v).map(|x| s.forwards.push(x)),
                _ => Err(PersistError::Kind(k.clone())),
            };
            if let Err(e) = r {
                bad.push(e);
            }
        }
        // Rows come sorted as text ("port/10" before "port/9"); objects go
        // back in the order they were made.
        s.groups.sort_by_key(|g| g.id);
        s.vpcs.sort_by_key(|v| v.id);
        s.networks.sort_by_key(|n| n.id);
        s.subnets.sort_by_key(|x| x.id);
        s.ports.sort_by_key(|p| p.id);
        s.floating.sort_by_key(|f| f.id);
        s.forwards.sort_by_key(|f| f.id);
        (s, bad)
    }
}

/// The state database.
#[derive(Debug)]
pub struct Store {
    path: String,
    /// Held (flock) while the store is open: one netd per directory.
    _lock: std::fs::File,
    /// The connection and the rows as last written.
    db: Mutex<(Connection, Rows)>,
}

impl Store {
    /// Opens (creating if need be) `dir/netd.db`.
    pub fn open(dir: &Path) -> Result<Self, PersistError> {
        std::fs::create_dir_all(dir).map_err(|source| PersistError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let dir_err = |source| PersistError::Dir {
            path: dir.display().to_string(),
            source,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("netd.lock"))
            .map_err(dir_err)?;
        // SAFETY: flock on a descriptor of ours.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                PersistError::Locked(dir.display().to_string())
            } else {
                dir_err(e)
            });
        }
        let file = dir.join("netd.db");
        let path = file.display().to_string();
        let db = |source| PersistError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&file).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS objects (
                 key TEXT PRIMARY KEY NOT NULL,
                 value TEXT NOT NULL
             );",
        )
        .map_err(db)?;
        let rows = {
            let mut q = conn.prepare("SELECT key, value FROM objects").map_err(db)?;
            let it = q
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(db)?;
            it.collect::<Result<Rows, _>>().map_err(db)?
        };
        Ok(Self {
            path,
            _lock: lock,
            db: Mutex::new((conn, rows)),
        })
    }

    /// What was saved (empty for a new database), and the rows left out
    /// because they do not parse.
    pub fn load(&self) -> (Snapshot, Vec<PersistError>) {
        let g = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        Snapshot::from_rows(&g.1)
    }

    /// Writes a consistent copy of the database to `to` (replacing it).
    pub fn copy_to(&self, to: &Path) -> Result<(), PersistError> {
        let g = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = std::fs::remove_file(to);
        g.0.execute("VACUUM INTO ?1", params![to.display().to_string()])
            .map(|_| ())
            .map_err(|source| PersistError::Db {
                path: self.path.clone(),
                source,
            })
    }

    /// Saves `take()`'s snapshot: the rows that changed since the last
    /// save, in one transaction. The snapshot is taken under the store's
    /// lock, so concurrent saves write in the order they saw the state.
    pub fn save(&self, take: impl FnOnce() -> Snapshot) -> Result<(), PersistError> {
        let mut g = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let rows = take().rows();
        let (conn, saved) = &mut *g;
        if *saved == rows {
            return Ok(());
        }
        let db = |source| PersistError::Db {
            path: self.path.clone(),
            source,
        };
        let tx = conn.transaction().map_err(db)?;
        for k in saved.keys().filter(|k| !rows.contains_key(*k)) {
            tx.execute("DELETE FROM objects WHERE key = ?1", params![k])
                .map_err(db)?;
        }
        for (k, v) in rows.iter().filter(|(k, v)| saved.get(*k) != Some(*v)) {
            tx.execute(
                "INSERT INTO objects (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        *saved = rows;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_comes_back_as_saved_and_only_changes_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (empty, bad) = store.load();
        assert!(empty == Snapshot::default() && bad.is_empty(), "{bad:?}");
        let mut s = Snapshot::default();
        s.meta.next = 12;
        s.ports = (1u8..=11)
            .map(|id| PortRec {
                id: u32::from(id),
                network: 3,
                mac: [0x52, 0x54, 0, 0, 0, id],
                ip: Some(Ipv4Addr::new(10, 0, 0, id + 1)),
                name: format!("vm{id}"),
                groups: vec![1],
                allowed: vec!["10.0.0.200/32".into()],
                ipv6: None,
                qos: (
                    Limit::default(),
                    Limit {
                        kbps: 1000,
                        burst_kib: 64,
                    },
                ),
                user_data: vec![0, 1, 255],
                ssh_keys: vec!["ssh-ed25519 AAAA k".into()],
                mirror: None,
            })
            .collect();
        store.save(|| s.clone()).expect("save");
        s.ports.remove(4);
        s.ports[0].name = "renamed".into();
        store.save(|| s.clone()).expect("save again");
        drop(store);
        let (back, bad) = Store::open(dir.path()).expect("reopen").load();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            back, s,
            "ports in id order (10 after 9), the deleted one gone"
        );
    }

    #[test]
    fn one_store_per_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path()).expect("open");
        let e = Store::open(dir.path()).expect_err("a second one");
        assert!(e.to_string().contains("in use by another netd"), "{e}");
        drop(first);
        Store::open(dir.path()).expect("free again");
    }

    #[test]
    fn a_damaged_row_is_left_out_and_named_and_the_others_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut s = Snapshot::default();
        s.vpcs.push(VpcRec {
            id: 2,
            name: "prod".into(),
            gateway: None,
            peers: Vec::new(),
        });
        store.save(|| s.clone()).expect("save");
        drop(store);
        let conn = Connection::open(dir.path().join("netd.db")).expect("sqlite");
        conn.execute(
            "INSERT INTO objects (key, value) VALUES ('port/3', '{\"id\": 3'), ('router/1', '{}')",
            [],
        )
        .expect("insert");
        drop(conn);
        let (back, bad) = Store::open(dir.path()).expect("open").load();
        assert_eq!(back, s);
        let bad: Vec<String> = bad.iter().map(ToString::to_string).collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].contains("port/3"), "{bad:?}");
        assert!(
            bad[1].contains("router/1") && bad[1].contains("unknown kind"),
            "{bad:?}"
        );
    }
}
