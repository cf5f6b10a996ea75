//! RIB-only throughput and memory: 1,000,000 unique IPv4 prefixes announced by one iBGP RR client, reflected
//! to a second RR client, through the real RIB task and channels (no sockets, no codec). The anchor in the
//! same run is the floor any RIB pays: the same prefixes into a plain `HashMap<IpNetwork, Arc<attrs>>` and
//! out as one Vec per batch.
//!
//! Run: `cargo bench --bench rib` (optional argument: prefix count). Figures go to BENCHMARKS.md.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};
use margay::bgp::rib::{
    self, NextHopMode, PeerId, PeerInfo, Policy, Query, RibConfig, RibInput, RibOutput,
};
use margay::bgp::wire::{AsPath, Family, Nlri, Origin, PathAttributes};
use margay::task::chan;
use tokio::sync::oneshot;

/// Prefixes per input message: what one 4096-byte UPDATE carries for /24s (about 4 bytes each).
const PER_UPDATE: usize = 800;
/// Distinct attribute sets among the prefixes (a route generator's next hops / paths).
const ATTR_SETS: usize = 8;

fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn prefix(i: usize) -> IpNetwork {
    // 1M /24s from 11.0.0.0 upwards: unique, in order, as a route generator sends them.
    let base = u32::from(Ipv4Addr::new(11, 0, 0, 0));
    let addr = Ipv4Addr::from(base + ((i as u32) << 8));
    IpNetwork::V4(Ipv4Network::new(addr, 24).expect("/24"))
}

fn attr_sets() -> Vec<Arc<PathAttributes>> {
    (0..ATTR_SETS)
        .map(|k| {
            Arc::new(PathAttributes {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath::default()),
                next_hop: Some(Ipv4Addr::new(10, 0, 1, 1 + k as u8)),
                local_pref: Some(100),
                ..Default::default()
            })
        })
        .collect()
}

fn client(n: u8) -> PeerInfo {
    PeerInfo {
        asn: 64512,
        local_asn: 64512,
        router_id: Ipv4Addr::new(10, 0, 0, n),
        address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
        local_v4: Some(Ipv4Addr::new(10, 0, 0, 254)),
        local_v6: None,
        rr_client: true,
        next_hop_mode: NextHopMode::Auto,
        graceful_restart: None,
        families: vec![Family::IPV4_UNICAST],
        add_path_rx: Vec::new(),
        add_path_tx: Vec::new(),
        max_prefixes: None,
        allow_local_as: 0,
    }
}

async fn run_rib(n: usize) -> (Duration, u64, usize) {
    let sets = attr_sets();
    let mut cfg = RibConfig::new(64512, Ipv4Addr::new(10, 0, 0, 254));
    cfg.cluster_id = Some(Ipv4Addr::new(244, 0, 0, 1));
    let handle = rib::spawn(cfg, Arc::new(Policy::accept_all()), 64, None);
    let tx = handle.tx.clone();

    let (out_a, mut rx_a) = chan::channel(1024);
    let (out_b, mut rx_b) = chan::channel(1024);
    tx.send(RibInput::PeerUp {
        peer: PeerId(2),
        info: client(2),
        out: out_b,
        direct: None,
    })
    .await
    .expect("rib");
    tx.send(RibInput::PeerUp {
        peer: PeerId(1),
        info: client(1),
        out: out_a,
        direct: None,
    })
    .await
    .expect("rib");
    // Drain the sender's channel (it gets nothing but End-of-RIB).
    tokio::spawn(async move { while rx_a.recv().await.is_some() {} });

    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut got = 0usize;
        let mut msgs = 0usize;
        while got < n {
            match rx_b.recv().await {
                Some(RibOutput::Updates { nlri, .. }) => {
                    got += nlri.len();
                    msgs += 1;
                }
                Some(_) => {}
                None => break,
            }
        }
        (got, msgs)
    });
    let mut i = 0;
    let mut k = 0;
    while i < n {
        let end = (i + PER_UPDATE).min(n);
        let announced: Vec<Nlri> = (i..end)
            .map(|j| Nlri {
                prefix: prefix(j),
                path_id: 0,
            })
            .collect();
        let attrs = sets[k % ATTR_SETS].clone();
        tx.send(RibInput::Routes {
            peer: PeerId(1),
            announced,
            attrs,
            withdrawn: Vec::new(),
        })
        .await
        .expect("rib");
        i = end;
        k += 1;
    }
    let (got, msgs) = consumer.await.expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(got, n, "every prefix reached the RR client");
    let hwm = rss_kb("VmHWM:");
    let (q, r) = oneshot::channel();
    tx.send(RibInput::Query(Query::Summary(q)))
        .await
        .expect("rib");
    let summary = r.await.expect("summary");
    assert_eq!(summary.ipv4_prefixes, n);
    drop(tx);
    drop(handle);
    (elapsed, hwm, msgs)
}

/// The Sans-IO core alone, no task or channel hop on the input side.
fn run_core(n: usize) -> Duration {
    let sets = attr_sets();
    let mut cfg = RibConfig::new(64512, Ipv4Addr::new(10, 0, 0, 254));
    cfg.cluster_id = Some(Ipv4Addr::new(244, 0, 0, 1));
    let mut rib = rib::Rib::new(cfg, Arc::new(Policy::accept_all()), false);
    let now = Instant::now();
    let (out_a, _rx_a) = chan::channel(1024);
    let (out_b, mut rx_b) = chan::channel(1024);
    rib.handle(
        RibInput::PeerUp {
            peer: PeerId(2),
            info: client(2),
            out: out_b,
            direct: None,
        },
        now,
    );
    rib.handle(
        RibInput::PeerUp {
            peer: PeerId(1),
            info: client(1),
            out: out_a,
            direct: None,
        },
        now,
    );
    let start = Instant::now();
    let mut got = 0usize;
    let mut i = 0;
    let mut k = 0;
    while i < n {
        let end = (i + PER_UPDATE).min(n);
        let announced: Vec<Nlri> = (i..end)
            .map(|j| Nlri {
                prefix: prefix(j),
                path_id: 0,
            })
            .collect();
        let attrs = sets[k % ATTR_SETS].clone();
        rib.handle(
            RibInput::Routes {
                peer: PeerId(1),
                announced,
                attrs,
                withdrawn: Vec::new(),
            },
            now,
        );
        while let Ok(m) = rx_b.try_recv() {
            if let RibOutput::Updates { nlri, .. } = m {
                got += nlri.len();
            }
        }
        i = end;
        k += 1;
    }
    let t = start.elapsed();
    assert_eq!(got, n);
    drop(rib);
    t
}

fn run_anchor(n: usize) -> Duration {
    let sets = attr_sets();
    let start = Instant::now();
    let mut map: HashMap<IpNetwork, Arc<PathAttributes>> = HashMap::new();
    let mut sent = 0usize;
    let mut i = 0;
    let mut k = 0;
    while i < n {
        let end = (i + PER_UPDATE).min(n);
        let attrs = &sets[k % ATTR_SETS];
        let mut out = Vec::with_capacity(end - i);
        for j in i..end {
            let p = prefix(j);
            map.insert(p, attrs.clone());
            out.push(Nlri {
                prefix: p,
                path_id: 0,
            });
        }
        sent += std::hint::black_box(out).len();
        i = end;
        k += 1;
    }
    assert_eq!(sent, n);
    assert_eq!(map.len(), n);
    start.elapsed()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rss0 = rss_kb("VmRSS:");
    let (rib_t, hwm, msgs) = rt.block_on(run_rib(n));
    let rib_rate = n as f64 / rib_t.as_secs_f64();
    println!(
        "rib: {n} IPv4 prefixes peer -> RIB (RR) -> client in {:.3} s = {:.2} M prefixes/s, {msgs} output messages",
        rib_t.as_secs_f64(),
        rib_rate / 1e6
    );
    println!(
        "rib: peak RSS {:.1} MB (process start {:.1} MB, delta {:.1} MB = {:.0} bytes/prefix)",
        hwm as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        (hwm - rss0) as f64 / 1024.0,
        (hwm - rss0) as f64 * 1024.0 / n as f64
    );
    let core_t = run_core(n);
    println!(
        "rib core only (no task/channel on input): {:.3} s = {:.2} M prefixes/s",
        core_t.as_secs_f64(),
        n as f64 / core_t.as_secs_f64() / 1e6
    );
    let anchor_t = run_anchor(n);
    let anchor_rate = n as f64 / anchor_t.as_secs_f64();
    println!(
        "anchor: HashMap insert + Vec out, same prefixes: {:.3} s = {:.2} M prefixes/s (RIB at {:.2}x of it)",
        anchor_t.as_secs_f64(),
        anchor_rate / 1e6,
        rib_rate / anchor_rate
    );
    println!(
        "issue 2 budget for the whole reflector: 1.71 M prefixes/s (1.5x BIRD's 1.14 M/s), RSS <= 94 MB; \
         the RIB alone uses {:.0}% of that time budget",
        100.0 * 1.71e6 / rib_rate
    );
}
