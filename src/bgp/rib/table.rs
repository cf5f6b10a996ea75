//! Compact per-family prefix tables: prefix → paths (best first). Sized for a million prefixes: an IPv4
//! prefix with one path costs a 32-byte map slot (8-byte key, 16-byte path with its interned attributes
//! shared, 8-byte change-log position), in a `ChunkMap` so memory grows with the table and not in
//! power-of-two steps, and iteration is in prefix order (full-table dumps come out sorted, which packs
//! well).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::chunkmap::ChunkMap;
use crate::bgp::wire::PathAttributes;

/// Peer slot 0 is the local speaker (originated routes).
pub(crate) const LOCAL_SLOT: u16 = 0;

pub(crate) const FLAG_STALE: u8 = 1;
pub(crate) const FLAG_ECMP: u8 = 2;
/// Kept past the restart time, with LLGR_STALE added to its attributes (RFC 9494 4.2); always with
/// `FLAG_STALE`.
pub(crate) const FLAG_LLGR: u8 = 4;

/// One path to a prefix: who sent it (peer slot), its ADD-PATH id and its interned attributes.
#[derive(Debug, Clone)]
pub(crate) struct Path {
    pub attrs: Arc<PathAttributes>,
    pub path_id: u32,
    pub slot: u16,
    pub flags: u8,
}

impl Path {
    pub fn stale(&self) -> bool {
        self.flags & FLAG_STALE != 0
    }
    pub fn llgr(&self) -> bool {
        self.flags & FLAG_LLGR != 0
    }
    pub fn ecmp(&self) -> bool {
        self.flags & FLAG_ECMP != 0
    }
    /// Same path identity and same attributes (what a change check needs).
    pub fn same(&self, other: &Path) -> bool {
        self.slot == other.slot
            && self.path_id == other.path_id
            && Arc::ptr_eq(&self.attrs, &other.attrs)
    }
}

/// The paths of one prefix, and where the prefix stands in the RIB's change log. Invariant: never empty;
/// `paths()[0]` is the best path; paths flagged ECMP follow it directly.
#[derive(Debug, Clone)]
pub(crate) struct Dest {
    paths: Paths,
    /// The sequence number of the prefix's entry in the RIB's change log, 0 for none (`core/log.rs`):
    /// kept here so that logging a change costs no map from prefix to position.
    pub log: u64,
}

#[derive(Debug, Clone)]
enum Paths {
    One(Path),
    // Boxed on purpose: a thin pointer keeps this at 16 bytes (the common one-path case pays for it in
    // every table slot), and the rare multi-path prefix pays one extra allocation.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Path>>),
}

impl Dest {
    /// A prefix with one path, at log position `log`.
    pub fn one(path: Path, log: u64) -> Dest {
        Dest {
            paths: Paths::One(path),
            log,
        }
    }

    pub fn paths(&self) -> &[Path] {
        match &self.paths {
            Paths::One(p) => std::slice::from_ref(p),
            Paths::Many(v) => v,
        }
    }

    pub fn paths_mut(&mut self) -> &mut [Path] {
        match &mut self.paths {
            Paths::One(p) => std::slice::from_mut(p),
            Paths::Many(v) => v,
        }
    }

    /// The path, when there is only one.
    pub fn only_mut(&mut self) -> Option<&mut Path> {
        match &mut self.paths {
            Paths::One(p) => Some(p),
            Paths::Many(_) => None,
        }
    }

    pub fn best(&self) -> &Path {
        &self.paths()[0]
    }

    /// Mutable access as a Vec; give it back with `set_paths`.
    pub fn to_vec(&self) -> Vec<Path> {
        self.paths().to_vec()
    }

    /// Replace the paths (the log position stays). `v` is not empty (a prefix with no path leaves the
    /// table); an empty `v` leaves the paths as they were.
    pub fn set_paths(&mut self, mut v: Vec<Path>) {
        if v.len() > 1 {
            self.paths = Paths::Many(Box::new(v));
        } else if let Some(p) = v.pop() {
            self.paths = Paths::One(p);
        }
    }
}

/// A table key: orderable, small, convertible to and from an `IpNetwork`.
pub(crate) trait PrefixKey: Ord + Copy {
    fn to_net(self) -> IpNetwork;
}

/// IPv4 prefix packed as address << 8 | length: orders by address, then length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct V4Key(u64);

impl V4Key {
    pub fn new(n: Ipv4Network) -> V4Key {
        V4Key((u64::from(u32::from(n.ip())) << 8) | u64::from(n.prefix()))
    }
}

impl PrefixKey for V4Key {
    fn to_net(self) -> IpNetwork {
        let addr = Ipv4Addr::from((self.0 >> 8) as u32);
        let len = (self.0 & 0xff) as u8;
        // The length came from a valid Ipv4Network, so it is at most 32.
        IpNetwork::V4(
            Ipv4Network::new(addr, len.min(32)).unwrap_or_else(|_| Ipv4Network::from(addr)),
        )
    }
}

/// IPv6 prefix: address bytes then length (17 bytes, byte order = numeric order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct V6Key([u8; 16], u8);

impl V6Key {
    pub fn new(n: Ipv6Network) -> V6Key {
        V6Key(n.ip().octets(), n.prefix())
    }
}

impl PrefixKey for V6Key {
    fn to_net(self) -> IpNetwork {
        let addr = Ipv6Addr::from(self.0);
        IpNetwork::V6(
            Ipv6Network::new(addr, self.1.min(128)).unwrap_or_else(|_| Ipv6Network::from(addr)),
        )
    }
}

/// Both unicast tables.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    pub v4: ChunkMap<V4Key, Dest>,
    pub v6: ChunkMap<V6Key, Dest>,
}

impl Tables {
    pub fn get(&self, prefix: &IpNetwork) -> Option<&Dest> {
        match prefix {
            IpNetwork::V4(n) => self.v4.get(&V4Key::new(*n)),
            IpNetwork::V6(n) => self.v6.get(&V6Key::new(*n)),
        }
    }
}
