//! Calico's BGP resources: documented examples parse with Calico's defaults, bad documents are refused with the
//! document, resource, field and value named, and a file with one bad document yields nothing at all.

use std::time::Duration;

use margay::config::bgp::{parse_peer_ip, AsNumber, ConfigSet, GoDuration, LoadError, NextHopMode};

const CALICO_EXAMPLES: &str = r#"
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  logSeverityScreen: Info
  nodeToNodeMeshEnabled: true
  nodeMeshMaxRestartTime: 120s
  asNumber: 63400
  serviceClusterIPs:
    - cidr: 10.96.0.0/12
  serviceExternalIPs:
    - cidr: 104.244.42.129/32
    - cidr: 172.217.3.0/24
  listenPort: 178
  bindMode: NodeIP
  communities:
    - name: bgp-large-community
      value: 63400:300:100
  prefixAdvertisements:
    - cidr: 172.218.4.0/26
      communities:
        - bgp-large-community
        - 63400:120
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: some.name
spec:
  node: rack1-host1
  peerIP: 192.168.1.1
  asNumber: 63400
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: route-reflector == 'true'
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: tor
spec:
  peerIP: "[fd00::1]:1790"
  asNumber: "1.10"
  keepaliveTime: 1m30s
  maxRestartTime: 300s
  nextHopMode: Self
  ttlSecurity: 1
  sourceAddress: None
  password:
    secretKeyRef:
      name: bgp-secrets
      key: rr-password
---
apiVersion: v1
kind: Secret
metadata:
  name: bgp-secrets
  namespace: calico-system
type: Opaque
stringData:
  rr-password: very-secret
---
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  name: rack1-host1
  labels:
    route-reflector: "true"
spec:
  bgp:
    ipv4Address: 10.0.0.1/24
    ipv6Address: fd00::10/64
    routeReflectorClusterID: 244.0.0.1
  orchRefs:
    - nodeName: rack1-host1
      orchestrator: k8s
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  cidr: 192.168.0.0/16
---
"#;

#[test]
fn calico_examples_parse_with_their_values() {
    let set = ConfigSet::from_yaml(CALICO_EXAMPLES).expect("valid examples");
    let d = set.default_bgp();
    assert_eq!(d.as_number(), 63400);
    assert_eq!(d.listen_port(), 178);
    assert!(d.mesh_enabled());
    assert_eq!(d.node_mesh_max_restart_time(), Duration::from_secs(120));
    assert_eq!(d.spec.service_cluster_ips[0].cidr, "10.96.0.0/12");
    let tor = &set.bgp_peers["tor"];
    assert_eq!(
        tor.spec.as_number,
        Some(AsNumber(65546)),
        "asdot 1.10 = 65536 + 10"
    );
    assert_eq!(
        tor.spec.keepalive_time,
        Some(GoDuration(Duration::from_secs(90)))
    );
    assert_eq!(tor.max_restart_time(), Duration::from_secs(300));
    assert_eq!(tor.next_hop_mode(), NextHopMode::SelfAddr);
    let addr = tor.peer_address().expect("peer address");
    assert_eq!(
        (addr.ip.to_string(), addr.port),
        ("fd00::1".to_string(), Some(1790))
    );
    let node = &set.nodes["rack1-host1"];
    assert_eq!(
        node.ipv4().map(|i| i.to_string()).as_deref(),
        Some("10.0.0.1")
    );
    assert_eq!(
        node.cluster_id().map(|i| i.to_string()).as_deref(),
        Some("244.0.0.1")
    );
    assert_eq!(set.other.len(), 1, "the IPPool is kept for its owner");
    assert_eq!(
        set.resolve_secret(
            tor.spec
                .password
                .as_ref()
                .and_then(|p| p.secret_key_ref.as_ref())
                .expect("ref")
        ),
        Some("very-secret")
    );
}

#[test]
fn defaults_are_calicos() {
    let set = ConfigSet::from_yaml(
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec: {}\n",
    )
    .expect("empty spec");
    let d = set.default_bgp();
    assert_eq!(d.as_number(), 64512);
    assert!(d.mesh_enabled());
    assert_eq!(d.listen_port(), 179);
    assert_eq!(d.log_severity_screen(), "Info");
    assert_eq!(d.node_mesh_max_restart_time(), Duration::from_secs(120));
    assert_eq!(d.service_load_balancer_aggregation(), "Enabled");
    assert_eq!(d.program_cluster_routes(), "EnabledNoEncapOnly");
    assert_eq!(d.ipv4_normal_route_priority(), 1024);
    // No BGPConfiguration at all: the same defaults.
    let empty = ConfigSet::from_yaml("").expect("empty file");
    assert_eq!(empty.default_bgp().as_number(), 64512);
    assert_eq!(empty.listen_port("any"), 179);
}

#[test]
fn per_node_listen_port_overrides_the_cluster_one() {
    let set = ConfigSet::from_yaml(
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {listenPort: 1790}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: node.n1}\nspec: {listenPort: 1791}\n",
    )
    .expect("valid");
    assert_eq!(set.listen_port("n1"), 1791);
    assert_eq!(set.listen_port("n2"), 1790);
}

/// Load `yaml`, expect a refusal, and return its message.
fn refused(yaml: &str) -> (LoadError, String) {
    let e = ConfigSet::from_yaml(yaml).expect_err("must be refused");
    let msg = e.to_string();
    (e, msg)
}

fn peer_doc(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

#[test]
fn bad_documents_name_document_resource_field_and_value() {
    let good = peer_doc("ok", "  peerIP: 10.0.0.9\n  asNumber: 65001\n");
    let cases: Vec<(String, &str, &str, &str)> = vec![
        (peer_doc("p1", "  peerIP: 10.0.0.300\n  asNumber: 65001\n"), "p1", "spec.peerIP", "10.0.0.300"),
        (peer_doc("p2", "  peerIP: 10.0.0.9\n"), "p2", "spec.asNumber", "missing"),
        (peer_doc("p3", "  peerSelector: rr = 'x'\n"), "p3", "spec.peerSelector", "rr = 'x'"),
        (peer_doc("p4", "  peerIP: 10.0.0.9\n  asNumber: 65001\n  ttlSecurity: 0\n"), "p4", "spec.ttlSecurity", "0"),
        (peer_doc("p5", "  peerIP: 10.0.0.9\n  asNumber: 65001\n  nextHopMode: Sometimes\n"), "p5", "nextHopMode", "Sometimes"),
        (peer_doc("p6", "  peerIP: 10.0.0.9\n  asNumber: 65001\n  keepaliveTime: soon\n"), "p6", "keepaliveTime", "soon"),
        (peer_doc("p7", "  peerIP: 10.0.0.9\n  asnumber: 65001\n"), "p7", "spec", "asnumber"),
        (peer_doc("p8", "  node: a\n  nodeSelector: all()\n  peerIP: 10.0.0.9\n  asNumber: 1\n"), "p8", "spec.nodeSelector", "all()"),
        (
            peer_doc("p9", "  peerIP: 10.0.0.9\n  asNumber: 65001\n  password:\n    secretKeyRef: {name: nope, key: k}\n"),
            "p9",
            "spec.password.secretKeyRef",
            "nope/k",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {listenPort: 70000}\n".into(),
            "default",
            "spec.listenPort",
            "70000",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec:\n  nodeToNodeMeshEnabled: false\n  nodeMeshMaxRestartTime: 60s\n".into(),
            "default",
            "spec.nodeMeshMaxRestartTime",
            "60s",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: node.n1}\nspec: {asNumber: 65001}\n".into(),
            "node.n1",
            "spec.asNumber",
            "",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: cluster}\nspec: {}\n".into(),
            "cluster",
            "metadata.name",
            "cluster",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec:\n  communities: [{name: c, value: '70000:1'}]\n".into(),
            "default",
            "spec.communities[0].value",
            "70000:1",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1}\nspec:\n  bgp: {ipv4Address: 10.0.0.1/33}\n".into(),
            "n1",
            "spec.bgp.ipv4Address",
            "10.0.0.1/33",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1}\nspec:\n  bgp: {ipv4Address: 10.0.0.1/24, routeReflectorClusterID: rr-1}\n".into(),
            "n1",
            "spec.bgp.routeReflectorClusterID",
            "rr-1",
        ),
        (
            "apiVersion: projectcalico.org/v2\nkind: BGPPeer\nmetadata: {name: old}\nspec: {}\n".into(),
            "old",
            "apiVersion",
            "projectcalico.org/v2",
        ),
    ];
    for (bad, name, field, value) in cases {
        // The bad document is the second one: the message must say so.
        let yaml = format!("{good}---\n{bad}");
        let (e, msg) = refused(&yaml);
        match &e {
            LoadError::Invalid { document, error } => {
                assert_eq!(*document, 2, "{msg}");
                assert_eq!(error.name, name, "{msg}");
                assert!(
                    error.field.contains(field) || error.reason.contains(field),
                    "field {field} not named: {msg}"
                );
            }
            other => panic!("unexpected error kind: {other}"),
        }
        assert!(msg.starts_with("document 2: "), "{msg}");
        assert!(msg.contains(value), "value {value:?} not named: {msg}");
    }
}

#[test]
fn duplicates_and_broken_yaml_are_refused() {
    let p = peer_doc("same", "  peerIP: 10.0.0.9\n  asNumber: 65001\n");
    let (e, msg) = refused(&format!("{p}---\n{p}"));
    assert!(
        matches!(
            e,
            LoadError::Duplicate {
                document: 2,
                first: 1,
                ..
            }
        ),
        "{msg}"
    );
    let (e, _) = refused(&format!("{p}---\nkind: [unclosed\n"));
    assert!(matches!(e, LoadError::Yaml { document: 2, .. }));
    let (e, msg) = refused("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: x}\nspec: {peerIP: 10.0.0.9, asNumber: -5}\n");
    assert!(matches!(e, LoadError::Invalid { document: 1, .. }), "{msg}");
    assert!(msg.contains("spec.asNumber") && msg.contains("-5"), "{msg}");
}

#[test]
fn small_value_parsers() {
    assert_eq!("0".parse::<GoDuration>().map(|d| d.0), Ok(Duration::ZERO));
    assert_eq!(
        "1h2m3s".parse::<GoDuration>().map(|d| d.0),
        Ok(Duration::from_secs(3723))
    );
    assert_eq!(
        "250ms".parse::<GoDuration>().map(|d| d.0),
        Ok(Duration::from_millis(250))
    );
    assert!("10".parse::<GoDuration>().is_err(), "a unit is required");
    assert!("5x".parse::<GoDuration>().is_err());
    assert_eq!(
        "4200000000".parse::<AsNumber>(),
        Ok(AsNumber(4_200_000_000))
    );
    assert!("70000.1".parse::<AsNumber>().is_err());
    assert_eq!(
        parse_peer_ip("10.0.0.1:1790").map(|a| a.port),
        Ok(Some(1790))
    );
    assert_eq!(parse_peer_ip("fd00::1").map(|a| a.port), Ok(None));
    assert!(parse_peer_ip("10.0.0.1:0").is_err());
    assert!(parse_peer_ip("fd00::1:179:").is_err());
}

#[test]
fn from_file_reads_or_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("margay.yaml");
    std::fs::write(&path, CALICO_EXAMPLES).expect("write");
    let set = ConfigSet::from_file(&path).expect("file loads");
    assert_eq!(set.bgp_peers.len(), 3);
    let missing = dir.path().join("nope.yaml");
    let e = ConfigSet::from_file(&missing).expect_err("missing file");
    assert!(matches!(e, LoadError::Io { .. }));
    assert!(e.to_string().contains("nope.yaml"), "{e}");
}
