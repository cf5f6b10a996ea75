//! The optional default IPv6 pool against a real etcd: `MARGAY_IPV6POOL_CIDR` creates it (block size 122 by
//! default) when no IPv6 pool exists, also beside an existing IPv4 pool; an existing IPv6 pool is left
//! alone; and the node's IPAM assigns IPv6 addresses from it.
//!
//! ```text
//!   test ──ensure_default_pool / ensure_default_ipv6_pool / NodeIpam::assign──▶ etcd (loopback, temporary)
//! ```

use crate::common;

use std::sync::Arc;

use common::etcd::{etcd_available, Etcd};
use margay::datastore::{keys, Datastore, DatastoreConfig};
use margay::ipam::{AssignRequest, NodeInfo, NodeIpam};
use margay::node::{ensure_default_ipv6_pool, ensure_default_pool};
use serde_json::Value;

async fn pools(ds: &Datastore) -> Vec<Value> {
    let (kvs, _) = ds
        .list(&keys::resource_prefix(margay::config::ippool::PLURAL))
        .await
        .expect("list pools");
    kvs.iter()
        .map(|kv| serde_json::from_slice(&kv.value).expect("pool JSON"))
        .collect()
}

#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn default_ipv6_pool_when_none_exists_and_usable() {
    const T: &str = "default_ipv6_pool_when_none_exists_and_usable";
    if !etcd_available(T) {
        return;
    }
    let etcd = Etcd::start();
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(&[etcd.endpoint()])).expect("datastore"));
    // As `margay node run` does: the IPv4 default first, then the IPv6 one.
    ensure_default_pool(&ds, "10.244.0.0/16".parse().unwrap(), 26)
        .await
        .expect("IPv4 default pool");
    ensure_default_ipv6_pool(&ds, "fd00:244::/48".parse().unwrap(), 122)
        .await
        .expect("IPv6 default pool");
    let p = pools(&ds).await;
    assert_eq!(p.len(), 2, "{p:?}");
    let v6 = p
        .iter()
        .find(|p| p["metadata"]["name"] == "default-ipv6-ippool")
        .expect("default-ipv6-ippool");
    assert_eq!(v6["spec"]["cidr"], "fd00:244::/48");
    assert_eq!(v6["spec"]["blockSize"], 122);

    // An IPv6 pool exists: another default changes nothing.
    ensure_default_ipv6_pool(&ds, "fd00:999::/48".parse().unwrap(), 120)
        .await
        .expect("second call");
    assert_eq!(pools(&ds).await.len(), 2);

    // The node's IPAM assigns from it: an address in the pool, from a /122 block.
    let ipam = NodeIpam::start(ds.clone(), NodeInfo::new("node-v6"))
        .await
        .expect("node IPAM");
    let a = ipam
        .assign(AssignRequest {
            handle_id: "k8s-pod-network.v6".into(),
            ipv6: true,
            ..Default::default()
        })
        .await
        .expect("assign IPv6");
    assert_eq!(a.ips.len(), 1, "{a:?}");
    let pool: ipnetwork::IpNetwork = "fd00:244::/48".parse().unwrap();
    assert!(pool.contains(a.ips[0].ip), "{a:?}");
    assert_eq!(a.ips[0].block.prefix(), 122, "{a:?}");
}
