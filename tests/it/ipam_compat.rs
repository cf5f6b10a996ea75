//! Compatibility with Calico's etcdv3 data, both ways:
//! - what margay writes has Calico's keys, JSON field names (Go struct tags of `model.AllocationBlock`,
//!   `model.BlockAffinity`, `model.IPAMHandle`, `model.IPAMConfig`) and meaning;
//! - a Calico-written datastore (values as libcalico-go's etcdv3 backend writes them) is read back and used:
//!   margay assigns next to Calico's allocations, releases them, and keeps fields it does not know.

use crate::common;

use std::sync::Arc;

use common::etcd::{etcd_available, Etcd};
use margay::cli::resources;
use margay::datastore::{keys, Datastore, DatastoreConfig};
use margay::ipam::{ops, AssignRequest, Block, Handle, NodeInfo, NodeIpam};
use serde_json::{json, Value};

/// A /26 block as Calico writes it after two pods on node "calico-1": ordinals 0 and 1 allocated (ordinal 0 to
/// the IPIP tunnel, ordinal 1 to a pod), unallocated FIFO 2..63, Calico's attribute extras preserved.
fn calico_block() -> Value {
    let mut allocations = vec![Value::Null; 64];
    allocations[0] = json!(0);
    allocations[1] = json!(1);
    json!({
        "cidr": "192.168.7.0/26",
        "affinity": "host:calico-1",
        "allocations": allocations,
        "unallocated": (2..64).collect::<Vec<_>>(),
        "attributes": [
            {"handle_id": "ipip-tunnel-addr-calico-1", "secondary": {"node": "calico-1", "type": "ipipTunnelAddress"}},
            {"handle_id": "k8s-pod-network.0a1b2c", "secondary": {"namespace": "kube-system", "node": "calico-1",
             "pod": "coredns-abc", "timestamp": "2024-05-01 10:00:00.1 +0000 UTC"}}
        ],
        "sequenceNumber": 1714557600000000002u64,
        "sequenceNumberForAllocation": {"0": 1714557600000000000u64, "1": 1714557600000000001u64},
        "deleted": false,
        "strictAffinity": false
    })
}

const CALICO_POOL: &str = r#"{"kind":"IPPool","apiVersion":"projectcalico.org/v3","metadata":{"name":"default-ipv4-ippool","uid":"8d3bbf3c-1d2e-4bd8-9b1c-0c3c2f0f6a11","creationTimestamp":"2024-05-01T10:00:00Z"},"spec":{"cidr":"192.168.0.0/16","vxlanMode":"Never","ipipMode":"Always","natOutgoing":true,"blockSize":26,"nodeSelector":"all()","allowedUses":["Workload","Tunnel"]}}"#;

#[test]
fn block_json_has_calicos_fields_and_meaning() {
    let cidr = "10.9.0.0/30".parse().unwrap();
    let mut b = Block::for_node(cidr, "node-a", 100);
    let attrs = [
        ("node".to_string(), "node-a".to_string()),
        ("pod".to_string(), "p".to_string()),
    ]
    .into();
    b.assign(1, "h1", &attrs);
    let v: Value = serde_json::to_value(&b).unwrap();
    let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "affinity",
            "allocations",
            "attributes",
            "cidr",
            "deleted",
            "sequenceNumber",
            "sequenceNumberForAllocation",
            "unallocated"
        ]
    );
    assert_eq!(
        v,
        json!({
            "cidr": "10.9.0.0/30",
            "affinity": "host:node-a",
            "allocations": [0, null, null, null],
            "unallocated": [1, 2, 3],
            "attributes": [{"handle_id": "h1", "secondary": {"node": "node-a", "pod": "p"}}],
            "sequenceNumber": 101,
            "sequenceNumberForAllocation": {"0": 101},
            "deleted": false
        })
    );
    let mut h = Handle::default();
    h.add(&cidr, 1);
    assert_eq!(
        serde_json::to_string(&h).unwrap(),
        r#"{"block":{"10.9.0.0/30":1},"deleted":false}"#
    );
    assert_eq!(
        serde_json::to_string(&margay::ipam::Affinity::confirmed()).unwrap(),
        r#"{"state":"confirmed","deleted":false}"#
    );
}

#[test]
fn reads_calico_block_with_go_nulls() {
    // Go writes nil slices and maps as null; a fresh Calico block has null attributes and sequence map.
    let raw = r#"{"cidr":"10.0.0.0/30","affinity":null,"allocations":[null,null,null,null],"unallocated":[0,1,2,3],"attributes":null,"sequenceNumber":5,"sequenceNumberForAllocation":null,"deleted":false}"#;
    let b: Block = serde_json::from_str(raw).unwrap();
    assert!(b.attributes.is_empty() && b.sequence_number_for_allocation.is_empty());
    assert!(b.problems().is_empty());
    assert_eq!(b.host(), None);
}

#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn reads_and_extends_a_calico_written_datastore() {
    if !etcd_available("reads_and_extends_a_calico_written_datastore") {
        return;
    }
    let etcd = Etcd::start();
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(&[etcd.endpoint()])).unwrap());
    let cidr = "192.168.7.0/26".parse().unwrap();
    // The keys and values Calico's etcdv3 backend writes.
    ds.create(
        "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool",
        CALICO_POOL.as_bytes().to_vec(),
    )
    .await
    .unwrap()
    .unwrap();
    ds.create(
        "/calico/ipam/v2/assignment/ipv4/block/192.168.7.0-26",
        serde_json::to_vec(&calico_block()).unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    ds.create(
        "/calico/ipam/v2/host/calico-1/ipv4/block/192.168.7.0-26",
        br#"{"state":"confirmed","deleted":false}"#.to_vec(),
    )
    .await
    .unwrap()
    .unwrap();
    for (h, _) in [
        ("ipip-tunnel-addr-calico-1", 0),
        ("k8s-pod-network.0a1b2c", 1),
    ] {
        ds.create(
            &format!("/calico/ipam/v2/handle/{h}"),
            br#"{"block":{"192.168.7.0/26":1},"deleted":false}"#.to_vec(),
        )
        .await
        .unwrap()
        .unwrap();
    }
    ds.create(
        "/calico/ipam/v2/config",
        br#"{"strict_affinity":false,"auto_allocate_blocks":true}"#.to_vec(),
    )
    .await
    .unwrap()
    .unwrap();

    // margay sees a consistent datastore and Calico's pool.
    let (r, text) = margay::cli::ipam::check(&ds, None).await.unwrap();
    assert!(r.problems.is_empty(), "{text}");
    let get = resources::get(
        &ds,
        "ippool",
        Some("default-ipv4-ippool"),
        margay::cli::Output::Wide,
    )
    .await
    .unwrap();
    assert!(
        get.contains("Always") && get.contains("192.168.0.0/16"),
        "{get}"
    );

    // Running as calico-1, margay continues Calico's FIFO in Calico's block.
    let n = NodeIpam::start(ds.clone(), NodeInfo::new("calico-1"))
        .await
        .unwrap();
    let a = n
        .assign(AssignRequest::v4("k8s-pod-network.margay1"))
        .await
        .unwrap();
    assert_eq!(a.ips[0].ip.to_string(), "192.168.7.2");
    assert_eq!(a.ips[0].block, cidr);
    let raw = ds.get(&keys::block_key(&cidr)).await.unwrap().unwrap();
    let v: Value = serde_json::from_slice(&raw.value).unwrap();
    assert_eq!(v["allocations"][2], json!(2));
    assert_eq!(v["attributes"][2]["handle_id"], "k8s-pod-network.margay1");
    assert_eq!(
        v["attributes"][1]["secondary"]["timestamp"],
        "2024-05-01 10:00:00.1 +0000 UTC"
    );
    assert_eq!(v["sequenceNumber"], json!(1714557600000000003u64));
    assert_eq!(
        v["sequenceNumberForAllocation"]["2"],
        json!(1714557600000000003u64)
    );
    assert_eq!(
        v["strictAffinity"],
        json!(false),
        "a field margay does not model is kept"
    );
    assert_eq!(v["unallocated"][0], json!(3));

    // Release Calico's pod: its ordinal goes to the FIFO tail and its handle is deleted.
    let freed = n.release_handle("k8s-pod-network.0a1b2c").await.unwrap();
    assert_eq!(freed[0].to_string(), "192.168.7.1");
    let b: Block = serde_json::from_slice(
        &ds.get(&keys::block_key(&cidr))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert_eq!(b.unallocated.last(), Some(&1));
    assert_eq!(b.attributes.len(), 2, "attributes compacted as Calico does");
    assert_eq!(
        b.handle_of("192.168.7.2".parse().unwrap()),
        Some("k8s-pod-network.margay1")
    );
    assert!(ds
        .get("/calico/ipam/v2/handle/k8s-pod-network.0a1b2c")
        .await
        .unwrap()
        .is_none());
    let snap = ops::snapshot(&ds).await.unwrap();
    assert!(ops::check(&snap, None).problems.is_empty());
}
