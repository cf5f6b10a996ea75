//! The conflist the DaemonSet installs is one margay-cni accepts, after install-cni's substitution and the
//! runtime's flattening (name + cniVersion copied into each plugin), and the DaemonSet wires what the shim
//! and the daemon expect (socket directory, netns propagation, probes on the loopback endpoint).

use margay::cni::types::{CniVersion, NetConf, DEFAULT_SOCKET};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

fn docs(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .filter(|d: &Yaml| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

#[test]
fn installed_conflist_is_accepted_by_the_shim() {
    let d = docs(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/daemonset.yaml"
    ));
    let cm = &find(&d, "ConfigMap", "margay-config")["data"];
    let mtu = cm["veth_mtu"].as_str().unwrap();
    let conflist = cm["cni_network_config"]
        .as_str()
        .unwrap()
        .replace("__CNI_MTU__", mtu);
    let list: Json = serde_json::from_str(&conflist).expect("conflist is JSON after substitution");
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(
        plugins[0]["type"], "margay",
        "margay must be first in the chain"
    );
    let mut first = plugins[0].clone();
    first["name"] = list["name"].clone();
    first["cniVersion"] = list["cniVersion"].clone();
    let conf = NetConf::parse(first.to_string().as_bytes()).expect("the shim accepts it");
    assert_eq!(conf.socket, DEFAULT_SOCKET);
    assert!(conf.cni_version >= CniVersion::V1_0_0);
    // Every other plugin of the chain exists in the reference plugins.
    for p in &plugins[1..] {
        let t = p["type"].as_str().unwrap();
        assert!(["portmap", "bandwidth", "tuning"].contains(&t), "{t}");
    }
}

#[test]
fn daemonset_mounts_and_probes_match_the_daemon() {
    let d = docs(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/daemonset.yaml"
    ));
    let ds = find(&d, "DaemonSet", "margay-node");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    assert_eq!(
        spec["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    let c = &spec["containers"][0];
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let socket_dir = std::path::Path::new(DEFAULT_SOCKET).parent().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["mountPath"].as_str() == socket_dir.to_str()));
    let netns = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/var/run/netns"))
        .expect("netns mount");
    assert_eq!(netns["mountPropagation"].as_str(), Some("HostToContainer"));
    // Probes go to the loopback listener the daemon is told to use.
    let listen = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("MARGAY_HTTP_LISTEN"))
        .and_then(|e| e["value"].as_str())
        .expect("MARGAY_HTTP_LISTEN");
    let (host, port) = listen.rsplit_once(':').unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"].as_str(), Some(path));
        assert_eq!(
            g["port"].as_u64().map(|p| p.to_string()).as_deref(),
            Some(port)
        );
        assert!(
            host == "0.0.0.0" || g["host"].as_str() == Some(host),
            "{probe}"
        );
    }
    // install-cni writes both files the kubelet needs; the binary under the name the conflist's "type"
    // makes the runtime execute.
    let script = spec["initContainers"][0]["command"][2].as_str().unwrap();
    assert!(script.contains("mv -f /host/opt/cni/bin/.margay.tmp /host/opt/cni/bin/margay\n"));
    assert!(script.contains("/host/etc/cni/net.d/10-margay.conflist"));
}

/// The topology in deploy/route-reflector.yaml means what the comments say, read by margay's own config code
/// once applied, the reflectors have registered their addresses and two workers their Nodes: each reflector
/// has every worker as a client and the other reflector as a non-client; each worker peers with both
/// reflectors and with nobody else.
#[test]
fn reflector_resources_give_the_intended_peers() {
    use margay::config::bgp::ConfigSet;
    use margay::config::peers::desired_peers;
    let d = docs(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/route-reflector.yaml"
    ));
    let cm = find(&d, "ConfigMap", "margay-reflector-topology");
    let topology = cm["data"]["topology.yaml"].as_str().unwrap();
    // What the running reflectors add to their Nodes (their address), and the workers' own Nodes.
    let mut text = String::new();
    for (i, part) in topology
        .split("    routeReflectorClusterID: 244.0.0.1\n")
        .enumerate()
    {
        text.push_str(part);
        if i < 2 {
            text.push_str(&format!(
                "    routeReflectorClusterID: 244.0.0.1\n    ipv4Address: 10.0.0.{}/24\n",
                i + 2
            ));
        }
    }
    for (n, ip) in [("worker-1", "10.0.0.11"), ("worker-2", "10.0.0.12")] {
        text.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: {n}}}\nspec: {{bgp: {{ipv4Address: {ip}/24}}}}\n"
        ));
    }
    let set = ConfigSet::from_yaml(&text).expect("resources parse");
    let mut peers = desired_peers(&set, "rr-1").expect("rr-1 peers");
    peers.sort_by_key(|p| p.address);
    let seen: Vec<(String, bool)> = peers
        .iter()
        .map(|p| (p.address.to_string(), p.rr_client))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("10.0.0.3".to_string(), false),
            ("10.0.0.11".to_string(), true),
            ("10.0.0.12".to_string(), true)
        ]
    );
    let mut w: Vec<String> = desired_peers(&set, "worker-1")
        .unwrap()
        .iter()
        .map(|p| p.address.to_string())
        .collect();
    w.sort();
    assert_eq!(w, vec!["10.0.0.2", "10.0.0.3"]);
    // The Deployment names its Node by the Kubernetes node name.
    let dep = find(&d, "Deployment", "margay-route-reflector");
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    let env = c["env"].as_sequence().unwrap();
    assert!(env.iter().any(|e| e["name"].as_str() == Some("NODENAME")
        && e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("spec.nodeName")));
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    // etcd mode: no --config file; the cluster id matches the topology's.
    assert!(!args.iter().any(|a| a.starts_with("--config")), "{args:?}");
    assert!(args.contains(&"--cluster-id=244.0.0.1"), "{args:?}");
    assert!(env
        .iter()
        .any(|e| e["name"].as_str() == Some("ETCD_ENDPOINTS")));
}
