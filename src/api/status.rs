//! The status report (JSON on `/status`) and its human table, shaped like `calicoctl node status`.

use serde::{Deserialize, Serialize};

/// Everything `margay status` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// "node" or "reflector".
    pub role: String,
    pub node_name: String,
    pub version: String,
    pub asn: u32,
    pub router_id: String,
    /// Seconds since the process started.
    pub uptime_seconds: u64,
    pub ready: ReadyState,
    pub peers: Vec<PeerStatus>,
    /// BFD sessions (RFC 5880), one per BGP peer that asked for BFD.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bfd: Vec<crate::bfd::BfdReport>,
    /// The node's kernel routes (absent on a reflector, which has no dataplane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fib: Option<FibSummary>,
    /// The node's IPAM blocks and addresses (absent on a reflector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamSummary>,
    /// Requests to etcd and how many failed (absent when running without etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<DatastoreSummary>,
    /// How the node's dataplane fits the cluster (outgoing NAT, pod MTU, what is not supported or broken;
    /// absent on a reflector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<DataplaneSummary>,
    /// Present when the node is a gateway for outside hosts (`margay node run --gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySummary>,
}

/// A gateway node's forwarding settings, as the kernel holds them now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySummary {
    /// The interfaces whose reverse-path filtering was checked.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Each wrong setting, with the exact fix (`sysctl -w ...`); empty when all is right.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// The node's outgoing NAT, pod MTU and the settings it cannot honour.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSummary {
    /// Pool CIDRs whose traffic to outside every pool is masqueraded (as last applied to the kernel).
    #[serde(default)]
    pub nat_pools: Vec<String>,
    /// `natOutgoingAddress` in use (SNAT to it instead of masquerading), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_outgoing_address: Option<String>,
    /// The last failure to program outgoing NAT (retried), if the kernel does not hold the wanted rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_error: Option<String>,
    /// MTU given to pod interfaces when the CNI configuration sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_mtu: Option<u32>,
    /// Where that MTU comes from ("flag", "interface eth0 (1450)", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_mtu_source: Option<String>,
    /// The VXLAN tunnel endpoint ("vxlan.calico: tunnel 10.244.1.0, MAC 66:..., 2 remote VTEPs", or why it
    /// is not ready); absent when no pool uses VXLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<String>,
    /// The same for IPv6 (`vxlan-v6.calico`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_v6: Option<String>,
    /// The IPIP tunnel (`tunl0`: its tunnel address, or why it cannot be built); absent when no pool uses
    /// IPIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip: Option<String>,
    /// Learned routes whose next hop resolves through no kernel route (not installed, retried): the first
    /// 100 with the reason.
    #[serde(default)]
    pub unresolved_routes: Vec<String>,
    /// How many learned routes are unresolved.
    #[serde(default)]
    pub unresolved_total: u64,
    /// Settings the node cannot honour on this kernel and that break connectivity, with the fix.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Calico fields present in the datastore that margay parses but does not act on.
    #[serde(default)]
    pub not_supported: Vec<String>,
}

/// What the FIB task holds in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FibSummary {
    /// Routes with margay's protocol that the FIB task keeps (learned routes and the blackholes of own blocks).
    pub routes: u64,
}

/// The node's share of the IP pools.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamSummary {
    /// Blocks affine to this node.
    pub blocks: u64,
    /// Addresses those blocks hold.
    pub addresses_total: u64,
    /// Of those, allocated.
    pub addresses_allocated: u64,
    /// Addresses this node borrowed from other nodes' blocks (advertised as host routes).
    pub addresses_borrowed: u64,
    /// Affine blocks without any allocation.
    #[serde(default)]
    pub blocks_empty: u64,
    /// Free addresses of the affine blocks still cooling down after their release.
    #[serde(default)]
    pub addresses_cooling: u64,
    /// Empty blocks of other nodes this node took over (since start).
    #[serde(default)]
    pub blocks_reclaimed: u64,
    /// Own blocks released after staying empty for the grace period (since start).
    #[serde(default)]
    pub blocks_released_empty: u64,
    /// Addresses handed out inside their cooldown because the pools had nothing else (since start).
    #[serde(default)]
    pub addresses_cooling_handed_out: u64,
}

/// Requests to etcd since the process started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreSummary {
    /// Requests sent to an endpoint, failed attempts included.
    pub requests: u64,
    /// Attempts that failed (an endpoint unreachable, a timeout, or a refusal).
    pub errors: u64,
    /// Calls that gave up after trying every endpoint for the whole retry budget.
    pub unreachable: u64,
}

impl DatastoreSummary {
    /// The datastore's request counters as the status report shows them.
    pub fn of(ds: &crate::datastore::Datastore) -> DatastoreSummary {
        let st = ds.stats();
        DatastoreSummary {
            requests: st.round_trips,
            errors: st.errors,
            unreachable: st.unreachable,
        }
    }
}

/// Readiness with the reason when not ready ("datastore not synced", "BGP initial convergence").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyState {
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One BGP peer as the operator sees it: the speaker's report, served as it is.
pub use crate::bgp::speaker::PeerReport as PeerStatus;

/// Render the report the way `calicoctl node status` does, with prefix counters added.
pub fn render_status_table(r: &StatusReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "margay {} is running ({}, node {}, AS {}, router id {}, up {}s).\n",
        r.role, r.version, r.node_name, r.asn, r.router_id, r.uptime_seconds
    ));
    match &r.ready {
        ReadyState { ready: true, .. } => out.push_str("Ready.\n"),
        ReadyState { reason, .. } => out.push_str(&format!(
            "Not ready: {}.\n",
            reason.as_deref().unwrap_or("starting")
        )),
    }
    if let Some(i) = &r.ipam {
        out.push_str(&format!(
            "IPAM: {} blocks, {} of {} addresses allocated, {} borrowed.\n",
            i.blocks, i.addresses_allocated, i.addresses_total, i.addresses_borrowed
        ));
    }
    if let Some(f) = &r.fib {
        out.push_str(&format!(
            "FIB: {} routes with margay's protocol.\n",
            f.routes
        ));
    }
    if let Some(d) = &r.datastore {
        out.push_str(&format!(
            "etcd: {} requests, {} failed attempts, {} calls gave up (unreachable).\n",
            d.requests, d.errors, d.unreachable
        ));
    }
    if let Some(d) = &r.dataplane {
        render_dataplane(&mut out, d);
    }
    if let Some(g) = &r.gateway {
        out.push_str(&format!(
            "Gateway: this node forwards for outside hosts (reverse-path filtering checked on {}): {}.\n",
            if g.interfaces.is_empty() {
                "no interface".to_string()
            } else {
                g.interfaces.join(", ")
            },
            if g.problems.is_empty() {
                "forwarding settings OK".to_string()
            } else {
                format!("{} wrong setting(s)", g.problems.len())
            }
        ));
        for p in &g.problems {
            out.push_str(&format!("ERROR: gateway: {p}\n"));
        }
    }
    for (title, v6) in [("IPv4 BGP status", false), ("IPv6 BGP status", true)] {
        let peers: Vec<&PeerStatus> = r
            .peers
            .iter()
            .filter(|p| p.address.contains(':') == v6)
            .collect();
        out.push('\n');
        out.push_str(title);
        out.push('\n');
        if peers.is_empty() {
            out.push_str(&format!(
                "No {} peers found.\n",
                if v6 { "IPv6" } else { "IPv4" }
            ));
            continue;
        }
        let header = [
            "PEER ADDRESS",
            "PEER TYPE",
            "STATE",
            "SINCE",
            "INFO",
            "RECEIVED",
            "ACCEPTED",
            "ADVERTISED",
        ];
        let rows: Vec<[String; 8]> = peers
            .iter()
            .map(|p| {
                [
                    if p.port == 179 || p.port == 0 {
                        p.address.clone()
                    } else {
                        format!("{}:{}", p.address, p.port)
                    },
                    p.peer_type.clone(),
                    p.state.clone(),
                    p.since
                        .as_deref()
                        .map(since_short)
                        .unwrap_or_else(|| "-".into()),
                    p.info.clone(),
                    p.prefixes_received.to_string(),
                    p.prefixes_accepted.to_string(),
                    p.prefixes_advertised.to_string(),
                ]
            })
            .collect();
        let mut t = super::table::Table::new(&header);
        for row in rows {
            t.row(row.to_vec());
        }
        out.push_str(&t.render());
    }
    render_bfd(&mut out, &r.bfd);
    out
}

/// `BFD status`: per session its state, the peer's, the negotiated transmit interval and detection time.
fn render_bfd(out: &mut String, sessions: &[crate::bfd::BfdReport]) {
    if sessions.is_empty() {
        return;
    }
    out.push_str("\nBFD status\n");
    let mut t = super::table::Table::new(&[
        "PEER ADDRESS",
        "MODE",
        "STATE",
        "REMOTE",
        "SINCE",
        "INTERVAL",
        "DETECT",
        "DOWNS",
        "INFO",
    ]);
    for b in sessions {
        let ms = |v: u64| {
            if v == 0 {
                "-".to_string()
            } else {
                format!("{v}ms")
            }
        };
        let since = crate::bgp::speaker::rfc3339(
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(b.since_unix_secs),
        );
        t.row(vec![
            b.peer.clone(),
            if b.multihop { "multihop" } else { "single hop" }.to_string(),
            b.state.clone(),
            b.remote_state.clone(),
            since_short(&since),
            ms(b.tx_interval_ms),
            ms(b.detect_time_ms),
            b.down_count.to_string(),
            b.error.clone().unwrap_or_else(|| b.diag.clone()),
        ]);
    }
    out.push_str(&t.render());
}

fn render_dataplane(out: &mut String, d: &DataplaneSummary) {
    if let Some(mtu) = d.pod_mtu {
        out.push_str(&format!(
            "Pod MTU: {mtu} ({}).\n",
            d.pod_mtu_source.as_deref().unwrap_or("configured")
        ));
    }
    let nat = if d.nat_pools.is_empty() {
        "no natOutgoing pool".to_string()
    } else {
        format!(
            "{} -> {}",
            d.nat_pools.join(", "),
            d.nat_outgoing_address
                .as_deref()
                .map(|a| format!("SNAT to {a}"))
                .unwrap_or_else(|| "masquerade".into())
        )
    };
    out.push_str(&format!("Outgoing NAT: {nat}.\n"));
    for v in d.vxlan.iter().chain(d.vxlan_v6.iter()) {
        out.push_str(&format!("VXLAN: {v}.\n"));
    }
    if let Some(v) = &d.ipip {
        out.push_str(&format!("IPIP: {v}.\n"));
    }
    if let Some(e) = &d.nat_error {
        out.push_str(&format!("ERROR: outgoing NAT not programmed: {e}\n"));
    }
    for e in &d.errors {
        out.push_str(&format!("ERROR: {e}\n"));
    }
    for r in &d.unresolved_routes {
        out.push_str(&format!("Unresolved next hop: {r}\n"));
    }
    for n in &d.not_supported {
        out.push_str(&format!("Not supported: {n}\n"));
    }
}

/// `2026-11-22T03:40:12Z` -> `03:40:12` (Calico prints the time of day, or the date when older).
fn since_short(s: &str) -> String {
    s.split('T')
        .nth(1)
        .map(|t| {
            t.trim_end_matches('Z')
                .split('.')
                .next()
                .unwrap_or(t)
                .to_string()
        })
        .unwrap_or_else(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_calico_columns_and_failure_reason() {
        let r = StatusReport {
            role: "reflector".into(),
            node_name: "rr1".into(),
            version: "0.1.0".into(),
            asn: 64512,
            router_id: "10.0.0.1".into(),
            uptime_seconds: 5,
            ready: ReadyState {
                ready: true,
                reason: None,
            },
            bfd: Vec::new(),
            peers: vec![
                PeerStatus {
                    address: "10.0.0.2".into(),
                    port: 179,
                    peer_type: "global".into(),
                    state: "up".into(),
                    fsm_state: "Established".into(),
                    since: Some("2026-11-22T03:40:12Z".into()),
                    info: "Established".into(),
                    prefixes_received: 3,
                    prefixes_accepted: 2,
                    prefixes_advertised: 7,
                    ..Default::default()
                },
                PeerStatus {
                    address: "fd00::3".into(),
                    port: 1179,
                    peer_type: "node specific".into(),
                    state: "start".into(),
                    fsm_state: "Active".into(),
                    info: "OPEN from fd00::3: bad peer AS 65001, expected 65000".into(),
                    ..Default::default()
                },
            ],
            ipam: Some(IpamSummary {
                blocks: 1,
                addresses_total: 64,
                addresses_allocated: 3,
                addresses_borrowed: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = render_status_table(&r);
        assert!(
            t.contains("IPAM: 1 blocks, 3 of 64 addresses allocated"),
            "{t}"
        );
        assert!(
            !t.contains("FIB:"),
            "a report without a FIB prints no FIB line: {t}"
        );
        assert!(t.contains("| PEER ADDRESS | PEER TYPE"), "{t}");
        assert!(t.contains("| 10.0.0.2     | global"), "{t}");
        assert!(t.contains("03:40:12"), "{t}");
        assert!(t.contains("fd00::3:1179"), "{t}");
        assert!(t.contains("bad peer AS 65001, expected 65000"), "{t}");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"peerType\":\"global\""), "{json}");
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), r);
    }
}
