//! The RIB task end to end through its channels: sessions come up, routes flow to the other peer grouped by
//! attributes, queries answer through oneshots, a lost session withdraws, and ECMP changes reach the FIB
//! consumer.

use std::net::Ipv4Addr;
use std::sync::Arc;

use margay::bgp::rib::{
    self, FibEvent, PeerId, PeerInfo, Policy, Query, RibConfig, RibInput, RibOutput,
};
use margay::bgp::wire::{Family, Nlri};
use margay::task::chan;
use tokio::sync::{mpsc, oneshot};

use crate::rib_common;
use rib_common::*;

async fn next_update(rx: &mut chan::Receiver<RibOutput>) -> RibOutput {
    loop {
        match rx.recv().await.expect("output channel open") {
            RibOutput::EndOfRib(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn routes_flow_through_the_task() {
    let (fib_tx, mut fib_rx) = mpsc::channel(16);
    let mut cfg = RibConfig::new(LOCAL_AS, RID);
    cfg.cluster_id = Some(Ipv4Addr::new(244, 0, 0, 1));
    let handle = rib::spawn(cfg, Arc::new(Policy::accept_all()), 8, Some(fib_tx));
    let tx = handle.tx.clone();

    let (a_tx, mut a_rx) = chan::channel(1024);
    let (b_tx, mut b_rx) = chan::channel(1024);
    let client = |n| PeerInfo {
        rr_client: true,
        ..peer(n, LOCAL_AS)
    };
    tx.send(RibInput::PeerUp {
        peer: PeerId(1),
        info: client(1),
        out: a_tx,
        direct: None,
    })
    .await
    .expect("send");
    tx.send(RibInput::PeerUp {
        peer: PeerId(2),
        info: client(2),
        out: b_tx,
        direct: None,
    })
    .await
    .expect("send");
    // A new peer gets End-of-RIB for each family even with an empty table.
    assert_eq!(
        a_rx.recv().await,
        Some(RibOutput::EndOfRib(Family::IPV4_UNICAST))
    );
    assert_eq!(
        a_rx.recv().await,
        Some(RibOutput::EndOfRib(Family::IPV6_UNICAST))
    );

    let announced: Vec<Nlri> = (0..300u32)
        .map(|i| Nlri {
            prefix: net(&format!("10.{}.{}.0/24", 20 + i / 256, i % 256)),
            path_id: 0,
        })
        .collect();
    tx.send(RibInput::Routes {
        peer: PeerId(1),
        announced,
        attrs: Arc::new(attrs(&[], "10.0.0.1")),
        withdrawn: vec![],
    })
    .await
    .expect("send");
    match next_update(&mut b_rx).await {
        RibOutput::Updates {
            family,
            attrs,
            nlri,
            ..
        } => {
            assert_eq!(family, Family::IPV4_UNICAST);
            assert_eq!(nlri.len(), 300, "one group for one attribute set");
            assert_eq!(attrs.originator_id, Some(ip4("10.0.0.1")));
        }
        other => panic!("expected updates, got {other:?}"),
    }
    let fib = fib_rx.recv().await.expect("fib batch");
    assert_eq!(fib.len(), 300);
    assert!(
        matches!(&fib[0], FibEvent::Set { next_hops, .. } if next_hops == &vec!["10.0.0.1".parse::<std::net::IpAddr>().expect("ip")])
    );

    let (q, r) = oneshot::channel();
    tx.send(RibInput::Query(Query::Summary(q)))
        .await
        .expect("send");
    let s = r.await.expect("summary");
    assert_eq!(s.ipv4_prefixes, 300);
    let b = s
        .peers
        .iter()
        .find(|p| p.peer == Some(PeerId(2)))
        .expect("peer 2");
    assert_eq!(b.advertised, 300);
    let a = s
        .peers
        .iter()
        .find(|p| p.peer == Some(PeerId(1)))
        .expect("peer 1");
    assert_eq!((a.received, a.accepted), (300, 300));

    let (q, r) = oneshot::channel();
    tx.send(RibInput::Query(Query::Prefix {
        prefix: net("10.20.5.0/24"),
        reply: q,
    }))
    .await
    .expect("send");
    let paths = r.await.expect("lookup");
    assert_eq!(paths.len(), 1);
    assert!(paths[0].best && paths[0].ecmp && !paths[0].stale);

    tx.send(RibInput::PeerDown {
        peer: PeerId(1),
        graceful: false,
    })
    .await
    .expect("send");
    match next_update(&mut b_rx).await {
        RibOutput::Withdraw { nlri, .. } => assert_eq!(nlri.len(), 300),
        other => panic!("expected withdrawals, got {other:?}"),
    }
    let fib = fib_rx.recv().await.expect("fib batch");
    assert!(fib.iter().all(|e| matches!(e, FibEvent::Remove { .. })) && fib.len() == 300);

    drop(tx);
    let rib = handle
        .shutdown()
        .await
        .expect("task ends when inputs close");
    assert_eq!(rib.summary().ipv4_prefixes, 0);
}
