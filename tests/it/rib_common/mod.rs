//! A harness around the Sans-IO `Rib` for the RIB tests: peers with channels, announcements by string, and a
//! model of what each peer holds built only from the `RibOutput` messages it received.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use margay::bgp::rib::{
    NextHopMode, PathView, PeerGracefulRestart, PeerId, PeerInfo, Policy, Rib, RibConfig, RibInput,
    RibOutput,
};
use margay::bgp::wire::{AsPath, AsSegment, Family, MpReach, Nlri, Origin, PathAttributes};
use margay::task::chan;

pub const LOCAL_AS: u32 = 65000;
pub const RID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

pub fn net(s: &str) -> IpNetwork {
    s.parse().expect("test prefix")
}

pub fn ip4(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// IPv4 attributes: AS_SEQUENCE `path`, NEXT_HOP `nh`, ORIGIN IGP.
pub fn attrs(path: &[u32], nh: &str) -> PathAttributes {
    PathAttributes {
        origin: Some(Origin::Igp),
        as_path: Some(if path.is_empty() {
            AsPath::default()
        } else {
            AsPath {
                segments: vec![AsSegment::Sequence(path.to_vec())],
            }
        }),
        next_hop: Some(ip4(nh)),
        ..Default::default()
    }
}

/// IPv6 attributes with an MP_REACH next hop.
pub fn attrs6(path: &[u32], nh: &str) -> PathAttributes {
    PathAttributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath {
            segments: vec![AsSegment::Sequence(path.to_vec())],
        }),
        mp_reach: Some(MpReach {
            family: Family::IPV6_UNICAST,
            next_hop: vec![nh.parse().expect("v6 next hop")],
            nlri: Vec::new(),
        }),
        ..Default::default()
    }
}

/// A peer: iBGP when `asn == LOCAL_AS`; router id and address from `n` (10.0.0.n); both families.
pub fn peer(n: u8, asn: u32) -> PeerInfo {
    PeerInfo {
        asn,
        local_asn: LOCAL_AS,
        router_id: Ipv4Addr::new(10, 0, 0, n),
        address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
        local_v4: Some(ip4("10.0.0.254")),
        local_v6: Some("fd00::254".parse().expect("v6")),
        rr_client: false,
        next_hop_mode: NextHopMode::Auto,
        graceful_restart: None,
        families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
        add_path_rx: Vec::new(),
        add_path_tx: Vec::new(),
        max_prefixes: None,
        allow_local_as: 0,
    }
}

pub fn gr(secs: u64) -> Option<PeerGracefulRestart> {
    Some(PeerGracefulRestart {
        restart_time: Duration::from_secs(secs),
        forwarding_preserved: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
        long_lived: None,
    })
}

/// Graceful restart with `restart` seconds and long-lived graceful restart for both families with
/// `stale` seconds and the F bit (RFC 9494).
pub fn llgr(restart: u64, stale: u64) -> Option<PeerGracefulRestart> {
    Some(PeerGracefulRestart {
        restart_time: Duration::from_secs(restart),
        forwarding_preserved: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
        long_lived: Some(margay::bgp::rib::PeerLongLived {
            families: vec![
                (Family::IPV4_UNICAST, Duration::from_secs(stale)),
                (Family::IPV6_UNICAST, Duration::from_secs(stale)),
            ],
            forwarding_preserved: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
        }),
    })
}

pub struct Harness {
    pub rib: Rib,
    pub now: Instant,
    rx: HashMap<u32, chan::Receiver<RibOutput>>,
    /// What each peer holds, rebuilt from its outputs only.
    pub held: HashMap<u32, BTreeMap<IpNetwork, Arc<PathAttributes>>>,
    /// Every output each peer received, in order.
    pub log: HashMap<u32, Vec<RibOutput>>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with(RibConfig::new(LOCAL_AS, RID), Policy::accept_all())
    }

    pub fn with(cfg: RibConfig, policy: Policy) -> Harness {
        Harness {
            rib: Rib::new(cfg, Arc::new(policy), true),
            now: Instant::now(),
            rx: HashMap::new(),
            held: HashMap::new(),
            log: HashMap::new(),
        }
    }

    pub fn up(&mut self, id: u32, info: PeerInfo) {
        // Roomy: these tests look at exact output sequences, not at the slow-peer path.
        let (tx, rx) = chan::channel(1 << 16);
        self.rx.insert(id, rx);
        self.held.insert(id, BTreeMap::new());
        self.log.insert(id, Vec::new());
        self.rib.handle(
            RibInput::PeerUp {
                peer: PeerId(id),
                info,
                out: tx,
                direct: None,
            },
            self.now,
        );
        self.pump();
    }

    pub fn down(&mut self, id: u32, graceful: bool) {
        self.rib.handle(
            RibInput::PeerDown {
                peer: PeerId(id),
                graceful,
            },
            self.now,
        );
        self.rx.remove(&id);
        self.held.remove(&id);
        self.pump();
    }

    pub fn announce(&mut self, id: u32, prefixes: &[&str], a: PathAttributes) {
        self.announce_ids(id, &prefixes.iter().map(|p| (*p, 0)).collect::<Vec<_>>(), a);
    }

    pub fn announce_ids(&mut self, id: u32, prefixes: &[(&str, u32)], a: PathAttributes) {
        let announced = prefixes
            .iter()
            .map(|(p, i)| Nlri {
                prefix: net(p),
                path_id: *i,
            })
            .collect();
        self.rib.handle(
            RibInput::Routes {
                peer: PeerId(id),
                announced,
                attrs: Arc::new(a),
                withdrawn: Vec::new(),
            },
            self.now,
        );
        self.pump();
    }

    pub fn withdraw(&mut self, id: u32, prefixes: &[&str]) {
        let withdrawn = prefixes
            .iter()
            .map(|p| Nlri {
                prefix: net(p),
                path_id: 0,
            })
            .collect();
        self.rib.handle(
            RibInput::Withdraw {
                peer: PeerId(id),
                withdrawn,
            },
            self.now,
        );
        self.pump();
    }

    pub fn originate(&mut self, prefixes: &[&str], a: PathAttributes) {
        let prefixes = prefixes.iter().map(|p| net(p)).collect();
        self.rib.handle(
            RibInput::Originate {
                prefixes,
                attrs: Arc::new(a),
            },
            self.now,
        );
        self.pump();
    }

    pub fn input(&mut self, i: RibInput) {
        self.rib.handle(i, self.now);
        self.pump();
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        // One step may pass several timers (a restart time, then a Long-Lived Stale Time).
        for _ in 0..8 {
            if self.rib.next_deadline().is_none_or(|t| t > self.now) {
                break;
            }
            self.rib.on_timer(self.now);
        }
        self.pump();
    }

    /// Move every pending output into `held` and `log`.
    pub fn pump(&mut self) {
        for (id, rx) in self.rx.iter_mut() {
            let held = self.held.entry(*id).or_default();
            let log = self.log.entry(*id).or_default();
            while let Ok(m) = rx.try_recv() {
                match &m {
                    RibOutput::Updates { attrs, nlri, .. } => {
                        for n in nlri {
                            held.insert(n.prefix, attrs.clone());
                        }
                    }
                    RibOutput::Withdraw { nlri, .. } => {
                        for n in nlri {
                            held.remove(&n.prefix);
                        }
                    }
                    _ => {}
                }
                log.push(m);
            }
        }
    }

    pub fn best(&self, prefix: &str) -> Option<PathView> {
        self.rib.lookup(&net(prefix)).into_iter().next()
    }

    /// The address of the peer whose path is best.
    pub fn best_from(&self, prefix: &str) -> Option<IpAddr> {
        self.best(prefix).and_then(|p| p.peer_address)
    }

    pub fn holds(&self, id: u32, prefix: &str) -> Option<Arc<PathAttributes>> {
        self.held
            .get(&id)
            .and_then(|h| h.get(&net(prefix)).cloned())
    }

    pub fn take_log(&mut self, id: u32) -> Vec<RibOutput> {
        self.log
            .get_mut(&id)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}
