//! Calico's etcdv3 key layout (`libcalico-go/lib/backend/model`), so an existing Calico datastore can be adopted
//! in place and `calicoctl` (etcd mode) reads what margay writes. Pure string functions; no I/O.

use ipnetwork::IpNetwork;

use crate::config::resource::Storage;

/// Root of every v3 resource: `/calico/resources/v3/projectcalico.org/<plural>/<name>`.
pub const RESOURCES_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
/// Root of all IPAM blocks (both families).
pub const BLOCKS_PREFIX: &str = "/calico/ipam/v2/assignment/";
/// Root of all block affinities (`/calico/ipam/v2/host/<node>/ipv4/block/<cidr>`).
pub const AFFINITIES_PREFIX: &str = "/calico/ipam/v2/host/";
/// Root of all IPAM handles.
pub const HANDLES_PREFIX: &str = "/calico/ipam/v2/handle/";
/// The single IPAM configuration object (Calico's v1 model `IPAMConfig`).
pub const IPAM_CONFIG_KEY: &str = crate::config::ipam_config::STORED_KEY;

/// margay's own keys (no Calico equivalent; calicoctl never reads them). Liveness: one key per running node,
/// bound to an etcd lease the node keeps alive.
pub const LIVENESS_PREFIX: &str = "/calico/margay/v1/liveness/";
/// One permanent record per node that runs with liveness (so `ipam gc` can tell a vanished margay node from a
/// node that never had a liveness key, e.g. a Calico node in a mixed cluster).
pub const NODE_RECORDS_PREFIX: &str = "/calico/margay/v1/node/";

/// Held (on its lease) by the node elected to run the automatic `ipam gc`.
pub const GC_LEADER_KEY: &str = "/calico/margay/v1/gc-leader";

/// `/calico/margay/v1/liveness/<node>`.
pub fn liveness_key(node: &str) -> String {
    format!("{LIVENESS_PREFIX}{node}")
}

/// `/calico/margay/v1/node/<node>`.
pub fn node_record_key(node: &str) -> String {
    format!("{NODE_RECORDS_PREFIX}{node}")
}

fn family(cidr: &IpNetwork) -> u8 {
    if cidr.is_ipv4() {
        4
    } else {
        6
    }
}

/// `10.10.0.0/26` -> `10.10.0.0-26`, as Calico writes CIDRs inside keys.
pub fn cidr_component(cidr: &IpNetwork) -> String {
    format!("{}-{}", cidr.network(), cidr.prefix())
}

/// Parse a key component written by [`cidr_component`].
pub fn parse_cidr_component(s: &str) -> Option<IpNetwork> {
    let (ip, len) = s.rsplit_once('-')?;
    let net = IpNetwork::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (net.network() == net.ip()).then_some(net)
}

/// `/calico/ipam/v2/assignment/ipv4/block/10.10.0.0-26`.
pub fn block_key(cidr: &IpNetwork) -> String {
    format!(
        "{BLOCKS_PREFIX}ipv{}/block/{}",
        family(cidr),
        cidr_component(cidr)
    )
}

/// The block CIDR named by a block key, or None when the key is not a block key.
pub fn parse_block_key(key: &str) -> Option<IpNetwork> {
    let rest = key.strip_prefix(BLOCKS_PREFIX)?;
    let (fam, rest) = rest.split_once('/')?;
    let comp = rest.strip_prefix("block/")?;
    let cidr = parse_cidr_component(comp)?;
    (fam == format!("ipv{}", family(&cidr))).then_some(cidr)
}

/// `/calico/ipam/v2/host/<node>/ipv4/block/10.10.0.0-26`.
pub fn affinity_key(node: &str, cidr: &IpNetwork) -> String {
    format!(
        "{AFFINITIES_PREFIX}{node}/ipv{}/block/{}",
        family(cidr),
        cidr_component(cidr)
    )
}

/// Prefix of every affinity of one node.
pub fn node_affinities_prefix(node: &str) -> String {
    format!("{AFFINITIES_PREFIX}{node}/")
}

/// (node, block CIDR) named by an affinity key.
pub fn parse_affinity_key(key: &str) -> Option<(String, IpNetwork)> {
    let rest = key.strip_prefix(AFFINITIES_PREFIX)?;
    let mut parts = rest.split('/');
    let node = parts.next()?;
    let fam = parts.next()?;
    if parts.next()? != "block" {
        return None;
    }
    let cidr = parse_cidr_component(parts.next()?)?;
    if parts.next().is_some() || node.is_empty() || fam != format!("ipv{}", family(&cidr)) {
        return None;
    }
    Some((node.to_string(), cidr))
}

/// `/calico/ipam/v2/handle/<id>`.
pub fn handle_key(handle_id: &str) -> String {
    format!("{HANDLES_PREFIX}{handle_id}")
}

/// The handle id named by a handle key.
pub fn parse_handle_key(key: &str) -> Option<&str> {
    key.strip_prefix(HANDLES_PREFIX).filter(|s| !s.is_empty())
}

/// `/calico/resources/v3/projectcalico.org/<plural>/<name>` (cluster-scoped resources).
pub fn resource_key(plural: &str, name: &str) -> String {
    format!("{RESOURCES_PREFIX}{plural}/{name}")
}

/// The key of the object `name` of a kind stored as `storage`.
pub fn storage_key(storage: &Storage, name: &str) -> String {
    match storage {
        Storage::Resources { plural } => resource_key(plural, name),
        Storage::Singleton { key, .. } => key.to_string(),
    }
}

/// Prefix of every resource of one kind.
pub fn resource_prefix(plural: &str) -> String {
    format!("{RESOURCES_PREFIX}{plural}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_calico_layout() {
        let v4: IpNetwork = "10.10.0.0/26".parse().unwrap();
        let v6: IpNetwork = "fd00:1::/122".parse().unwrap();
        assert_eq!(
            block_key(&v4),
            "/calico/ipam/v2/assignment/ipv4/block/10.10.0.0-26"
        );
        assert_eq!(
            block_key(&v6),
            "/calico/ipam/v2/assignment/ipv6/block/fd00:1::-122"
        );
        assert_eq!(
            affinity_key("node-1", &v4),
            "/calico/ipam/v2/host/node-1/ipv4/block/10.10.0.0-26"
        );
        assert_eq!(
            handle_key("k8s-pod-network.abc"),
            "/calico/ipam/v2/handle/k8s-pod-network.abc"
        );
        assert_eq!(parse_block_key(&block_key(&v6)), Some(v6));
        assert_eq!(parse_block_key(&block_key(&v4)), Some(v4));
        assert_eq!(
            parse_affinity_key(&affinity_key("n", &v6)),
            Some(("n".to_string(), v6))
        );
        assert_eq!(
            parse_block_key("/calico/ipam/v2/assignment/ipv6/block/10.0.0.0-26"),
            None
        );
        assert_eq!(
            parse_block_key("/calico/ipam/v2/assignment/ipv4/block/10.0.0.1-26"),
            None
        );
        assert_eq!(parse_handle_key("/calico/ipam/v2/handle/h1"), Some("h1"));
    }
}
