//! The desired peer set per node, as Calico's confd derives it: mesh (route reflectors skipped, passive
//! side by string comparison of the IPs), global peers, node / nodeSelector peers, peerSelector with reverse
//! peerings, RR client marking and the per-peer knobs.

use std::net::IpAddr;
use std::time::Duration;

use margay::config::bgp::{ConfigSet, NextHopMode};
use margay::config::peers::{desired_peers, DesiredPeer, PeerType};

/// A Node resource: `labels` as key/value pairs, `bgp_extra` as further lines under `spec.bgp`.
fn node(name: &str, v4: &str, labels: &[(&str, &str)], bgp_extra: &str) -> String {
    let mut doc =
        format!("apiVersion: projectcalico.org/v3\nkind: Node\nmetadata:\n  name: {name}\n");
    if !labels.is_empty() {
        doc.push_str("  labels:\n");
        for (k, v) in labels {
            doc.push_str(&format!("    {k}: \"{v}\"\n"));
        }
    }
    doc.push_str(&format!(
        "spec:\n  bgp:\n    ipv4Address: {v4}/24\n{bgp_extra}"
    ));
    doc
}

fn rr_node(name: &str, v4: &str, cluster: &str) -> String {
    node(
        name,
        v4,
        &[("route-reflector", "true")],
        &format!("    routeReflectorClusterID: {cluster}\n"),
    )
}

fn set(docs: &[String]) -> ConfigSet {
    ConfigSet::from_yaml(&docs.join("---\n")).expect("valid test config")
}

fn peers(s: &ConfigSet, n: &str) -> Vec<DesiredPeer> {
    desired_peers(s, n).expect("derivation")
}

fn find<'a>(ps: &'a [DesiredPeer], ip: &str) -> &'a DesiredPeer {
    let ip: IpAddr = ip.parse().expect("ip");
    ps.iter()
        .find(|p| p.address == ip)
        .unwrap_or_else(|| panic!("no peer {ip} in {ps:#?}"))
}

fn addrs(ps: &[DesiredPeer]) -> Vec<String> {
    ps.iter().map(|p| p.address.to_string()).collect()
}

const MESH_CFG: &str = "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec:\n  nodeMeshMaxRestartTime: 300s\n  nodeMeshPassword:\n    secretKeyRef: {name: mesh, key: pw}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: mesh, namespace: calico-system}\ndata:\n  pw: bWVzaC1zZWNyZXQ=\n";

#[test]
fn mesh_peers_every_other_node_passive_side_by_string_comparison() {
    let s = set(&[
        MESH_CFG.to_string(),
        node("a", "10.0.0.1", &[], ""),
        node("b", "10.0.0.2", &[], ""),
        node("c", "10.0.0.10", &[], "    ipv6Address: fd00::10/64\n"),
    ]);
    let a = peers(&s, "a");
    assert_eq!(addrs(&a), vec!["10.0.0.2", "10.0.0.10"]);
    let ab = find(&a, "10.0.0.2");
    assert_eq!(ab.name, "Mesh_10_0_0_2");
    assert_eq!(ab.peer_type, PeerType::Mesh);
    assert!(ab.passive, "\"10.0.0.2\" > \"10.0.0.1\": a waits for b");
    assert_eq!(ab.source_address, Some("10.0.0.1".parse().expect("ip")));
    assert_eq!((ab.port, ab.peer_as, ab.local_as), (179, 64512, 64512));
    assert_eq!(
        ab.password.as_deref(),
        Some("mesh-secret"),
        "nodeMeshPassword from the Secret (base64 data)"
    );
    assert_eq!(ab.max_restart_time, Duration::from_secs(300));
    assert_eq!(ab.ttl_security, None);
    assert!(!ab.rr_client);

    // String, not numeric, comparison: "10.0.0.10" < "10.0.0.2", so b is the active side towards c, and c is
    // passive towards b although 10 > 2 numerically.
    let b = peers(&s, "b");
    assert!(!find(&b, "10.0.0.10").passive);
    let c = peers(&s, "c");
    assert!(find(&c, "10.0.0.2").passive);
    assert!(
        !find(&c, "10.0.0.1").passive,
        "\"10.0.0.1\" < \"10.0.0.10\""
    );
    // c has IPv6 but nobody else does: no IPv6 mesh session.
    assert!(c.iter().all(|p| p.address.is_ipv4()));
}

#[test]
fn ipv6_mesh_when_both_sides_have_it() {
    let s = set(&[
        node("a", "10.0.0.1", &[], "    ipv6Address: fd00::1/64\n"),
        node("b", "10.0.0.2", &[], "    ipv6Address: fd00::2/64\n"),
    ]);
    let a = peers(&s, "a");
    assert_eq!(addrs(&a), vec!["10.0.0.2", "fd00::2"]);
    let v6 = find(&a, "fd00::2");
    assert_eq!(v6.name, "Mesh_fd00__2");
    assert_eq!(v6.source_address, Some("fd00::1".parse().expect("ip")));
}

#[test]
fn route_reflector_topology() {
    // as Calico's reflector set-up: RR nodes carry a cluster id and a label; one BGPPeer makes every node peer with them.
    let s = set(&[
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {nodeToNodeMeshEnabled: false}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: peer-with-rrs}\nspec:\n  nodeSelector: all()\n  peerSelector: route-reflector == 'true'\n".into(),
        node("a", "10.0.0.1", &[], ""),
        node("b", "10.0.0.2", &[], ""),
        rr_node("rr1", "10.0.0.101", "244.0.0.1"),
        rr_node("rr2", "10.0.0.102", "244.0.0.1"),
        rr_node("rr3", "10.0.0.103", "244.0.0.3"),
    ]);
    let a = peers(&s, "a");
    assert_eq!(
        addrs(&a),
        vec!["10.0.0.101", "10.0.0.102", "10.0.0.103"],
        "clients peer with every RR, not each other"
    );
    let to_rr = find(&a, "10.0.0.101");
    assert_eq!(to_rr.peer_type, PeerType::Node);
    assert_eq!(to_rr.name, "Node_10_0_0_101");
    assert!(!to_rr.rr_client, "a has no cluster id: it reflects nothing");
    assert!(
        to_rr.passive,
        "a Calico node peer: \"10.0.0.101\" > \"10.0.0.1\""
    );

    let rr1 = peers(&s, "rr1");
    assert_eq!(
        addrs(&rr1),
        vec!["10.0.0.1", "10.0.0.2", "10.0.0.102", "10.0.0.103"],
        "reverse peerings to the clients"
    );
    assert!(
        find(&rr1, "10.0.0.1").rr_client,
        "iBGP peer without a cluster id: client"
    );
    assert!(find(&rr1, "10.0.0.2").rr_client);
    assert!(
        !find(&rr1, "10.0.0.102").rr_client,
        "same cluster id: plain iBGP (non-client)"
    );
    assert!(
        find(&rr1, "10.0.0.103").rr_client,
        "another cluster id: client"
    );
    assert_eq!(
        find(&rr1, "10.0.0.1").cluster_id,
        Some("244.0.0.1".parse().expect("ip"))
    );
    assert!(
        !find(&rr1, "10.0.0.1").passive,
        "\"10.0.0.1\" < \"10.0.0.101\": the RR connects"
    );
}

#[test]
fn mesh_skips_route_reflectors_and_rrs_build_no_mesh() {
    let s = set(&[
        node("a", "10.0.0.1", &[], ""),
        node("b", "10.0.0.2", &[], ""),
        rr_node("rr1", "10.0.0.101", "244.0.0.1"),
    ]);
    assert_eq!(addrs(&peers(&s, "a")), vec!["10.0.0.2"]);
    assert!(peers(&s, "rr1").is_empty());
}

#[test]
fn reverse_peering_manual_suppresses_the_reverse_side() {
    let s = set(&[
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {nodeToNodeMeshEnabled: false}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: to-rr}\nspec:\n  node: a\n  peerSelector: route-reflector == 'true'\n  reversePeering: Manual\n".into(),
        node("a", "10.0.0.1", &[], ""),
        rr_node("rr1", "10.0.0.101", "244.0.0.1"),
    ]);
    assert_eq!(addrs(&peers(&s, "a")), vec!["10.0.0.101"]);
    assert!(peers(&s, "rr1").is_empty());
}

#[test]
fn global_and_node_specific_peers() {
    let s = set(&[
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {nodeToNodeMeshEnabled: false, asNumber: 64600}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: tor}\nspec: {peerIP: 192.168.1.1, asNumber: 65001}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: tor-alt}\nspec: {peerIP: '192.168.1.2:1790', asNumber: 65001}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: dup}\nspec: {node: a, peerIP: 192.168.1.1, asNumber: 65009, ttlSecurity: 3}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: rack}\nspec: {nodeSelector: rack == 'r1', peerIP: 192.168.9.9, asNumber: 64600}\n".into(),
        node("a", "10.0.0.1", &[("rack", "r1")], "    asNumber: 64700\n"),
        node("b", "10.0.0.2", &[], ""),
    ]);
    let a = peers(&s, "a");
    assert_eq!(addrs(&a), vec!["192.168.1.1", "192.168.1.2", "192.168.9.9"]);
    let tor = find(&a, "192.168.1.1");
    assert_eq!(tor.name, "Global_192_168_1_1");
    assert_eq!(tor.peer_type, PeerType::Global);
    assert_eq!(
        tor.peer_as, 65001,
        "the global peer wins over the node-specific one to the same IP:port"
    );
    assert_eq!(
        tor.local_as, 64700,
        "the node's own AS beats the global one"
    );
    assert!(!tor.passive, "not a Calico node: we connect");
    assert_eq!(tor.source_address, Some("10.0.0.1".parse().expect("ip")));
    let alt = find(&a, "192.168.1.2");
    assert_eq!(
        (alt.name.as_str(), alt.port),
        ("Global_192_168_1_2_port_1790", 1790)
    );
    let rack = find(&a, "192.168.9.9");
    assert_eq!(rack.peer_type, PeerType::Node);
    assert!(!rack.is_ibgp(), "64600 vs node AS 64700");

    let b = peers(&s, "b");
    assert_eq!(
        addrs(&b),
        vec!["192.168.1.1", "192.168.1.2"],
        "b is not in rack r1"
    );
    assert_eq!(
        find(&b, "192.168.1.1").local_as,
        64600,
        "no node AS: the global one"
    );
}

#[test]
fn per_peer_knobs() {
    let s = set(&[
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {nodeToNodeMeshEnabled: false}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: p1}\nspec:\n  peerIP: 192.168.1.1\n  asNumber: 65001\n  keepOriginalNextHop: true\n  keepaliveTime: 10s\n  maxRestartTime: 30s\n  ttlSecurity: 1\n  sourceAddress: None\n  localASNumber: 65100\n  numAllowedLocalASNumbers: 2\n  password:\n    secretKeyRef: {name: s, key: p1}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: p2}\nspec: {peerIP: 192.168.1.2, asNumber: 64512, keepOriginalNextHop: true}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: p3}\nspec: {peerIP: 192.168.1.3, asNumber: 64512, nextHopMode: Self}\n".into(),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {p1: hunter2}\n".into(),
        node("a", "10.0.0.1", &[], ""),
    ]);
    let a = peers(&s, "a");
    let p1 = find(&a, "192.168.1.1");
    assert_eq!(
        p1.next_hop_mode,
        NextHopMode::Keep,
        "keepOriginalNextHop on an eBGP peer"
    );
    assert_eq!(p1.keepalive_time, Some(Duration::from_secs(10)));
    assert_eq!(p1.max_restart_time, Duration::from_secs(30));
    assert_eq!(p1.ttl_security, Some(1));
    assert_eq!(p1.source_address, None);
    assert_eq!(p1.local_as, 65100);
    assert_eq!(p1.num_allowed_local_as, Some(2));
    assert_eq!(p1.password.as_deref(), Some("hunter2"));
    assert_eq!(
        find(&a, "192.168.1.2").next_hop_mode,
        NextHopMode::Auto,
        "keepOriginalNextHop is eBGP-only"
    );
    assert_eq!(find(&a, "192.168.1.3").next_hop_mode, NextHopMode::SelfAddr);
    assert_eq!(
        find(&a, "192.168.1.3").max_restart_time,
        Duration::from_secs(120),
        "BIRD's default"
    );
}

#[test]
fn global_peer_that_is_a_calico_node_uses_its_port_and_the_passive_rule() {
    let s = set(&[
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {nodeToNodeMeshEnabled: false}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: node.b}\nspec: {listenPort: 1790}\n".into(),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: to-b}\nspec: {peerIP: 10.0.0.2, asNumber: 64512}\n".into(),
        node("a", "10.0.0.1", &[], ""),
        node("b", "10.0.0.2", &[], ""),
    ]);
    let a = peers(&s, "a");
    let to_b = find(&a, "10.0.0.2");
    assert_eq!(
        to_b.port, 1790,
        "a Calico node peer without a port: its listenPort"
    );
    assert!(to_b.passive);
    assert_eq!(to_b.peer_node.as_deref(), Some("b"));
    assert!(peers(&s, "b").is_empty(), "b does not peer with itself");
}

#[test]
fn unknown_node_is_an_error_naming_it() {
    let s = set(&[node("a", "10.0.0.1", &[], "")]);
    let e = desired_peers(&s, "zz").expect_err("no such node");
    assert_eq!(e.name, "zz");
    assert!(e.to_string().contains("Node"));
}

/// Long-lived graceful restart (RFC 9494) per session: a day between Calico nodes (mesh, node <-> reflector)
/// unless the default BGPConfiguration's `margay.io/llgr-stale-time` says otherwise; a BGPPeer's own
/// annotation wins for its sessions; external routers are off unless annotated; bad values are refused
/// naming the resource, the annotation, the value and the fix.
#[test]
fn llgr_stale_time_from_annotations_and_defaults() {
    let day = Duration::from_secs(86_400);
    let ext = "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: tor}\nspec:\n  peerIP: 10.0.0.254\n  asNumber: 65001\n".to_string();
    let rr_peer = |ann: &str| {
        format!("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: to-rr\n{ann}spec:\n  nodeSelector: \"!has(route-reflector)\"\n  peerSelector: has(route-reflector)\n")
    };
    let nodes = || {
        vec![
            node("a", "10.0.0.1", &[], ""),
            node("b", "10.0.0.2", &[], ""),
            rr_node("rr", "10.0.0.3", "244.0.0.1"),
        ]
    };
    let mut docs = nodes();
    docs.push(ext.clone());
    docs.push(rr_peer(""));
    let s = set(&docs);
    let a = peers(&s, "a");
    assert_eq!(find(&a, "10.0.0.2").llgr_stale_time, day, "mesh: a day");
    assert_eq!(
        find(&a, "10.0.0.3").llgr_stale_time,
        day,
        "to the reflector: a day"
    );
    assert_eq!(
        find(&a, "10.0.0.254").llgr_stale_time,
        Duration::ZERO,
        "external router: off (RFC 9494 5)"
    );
    let rr = peers(&s, "rr");
    assert_eq!(
        find(&rr, "10.0.0.1").llgr_stale_time,
        day,
        "reflector side too"
    );

    // The mesh setting on the default BGPConfiguration; a BGPPeer's own annotation wins.
    let mut docs = nodes();
    docs.push("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\n  annotations:\n    margay.io/llgr-stale-time: \"0\"\n".into());
    docs.push(rr_peer(
        "  annotations:\n    margay.io/llgr-stale-time: 1h\n",
    ));
    docs.push(ext.replace(
        "name: tor}",
        "name: tor, annotations: {margay.io/llgr-stale-time: 2h}}",
    ));
    let s = set(&docs);
    let a = peers(&s, "a");
    assert_eq!(
        find(&a, "10.0.0.2").llgr_stale_time,
        Duration::ZERO,
        "mesh off"
    );
    assert_eq!(
        find(&a, "10.0.0.3").llgr_stale_time,
        Duration::from_secs(3600)
    );
    assert_eq!(
        find(&a, "10.0.0.254").llgr_stale_time,
        Duration::from_secs(7200)
    );

    // Refused loudly.
    let mut docs = nodes();
    docs.push(rr_peer(
        "  annotations:\n    margay.io/llgr-stale-time: a week\n",
    ));
    let e = ConfigSet::from_yaml(&docs.join("---\n"))
        .expect_err("a bad annotation is refused")
        .to_string();
    assert!(
        e.contains("to-rr")
            && e.contains("margay.io/llgr-stale-time")
            && e.contains("a week")
            && e.contains("\"0\""),
        "{e}"
    );
}
