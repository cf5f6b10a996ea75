//! Address monitoring: the node's IPv4 and IPv6 addresses detected again periodically (as Calico does every
//! 60 s), the Node resource and the peers following a change.

#[allow(unused_imports)]
use super::*;

/// The IPv6 twin of [`monitor_address`] for IP6=autodetect: on a change the Node resource's `ipv6Address`
/// is rewritten and the peer loop follows through `tx`.
pub(super) async fn monitor_address6(
    ds: Arc<Datastore>,
    name: String,
    method: crate::dataplane::autodetect::Method,
    netns: Option<PathBuf>,
    every: Duration,
    tx: watch::Sender<Option<std::net::Ipv6Addr>>,
) {
    let mut current = *tx.borrow();
    loop {
        tokio::time::sleep(every).await;
        let (m, ns) = (method.clone(), netns.clone());
        let detected = tokio::task::spawn_blocking(move || {
            crate::dataplane::autodetect::detect_ipv6(&m, ns.as_deref())
        })
        .await;
        let (ip, prefix_len) = match detected {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, address = ?current, "IPv6 address re-detection failed; keeping the current address");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "IPv6 address re-detection did not finish");
                continue;
            }
        };
        if Some(ip) == current {
            continue;
        }
        match register_node_ipv6(&ds, &name, ip, prefix_len).await {
            Ok(()) => {
                tracing::info!(from = ?current, to = %ip, "node IPv6 address changed: Node resource updated; sessions and routes follow");
                current = Some(ip);
                tx.send_replace(current);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), to = %ip, "node IPv6 address changed but the Node resource could not be updated; retrying")
            }
        }
    }
}

/// Write `spec.bgp.ipv6Address` of this node's Node resource, keeping everything else (compare-and-swap).
/// The Node must exist: a node whose resource was deleted under it registers again when restarted.
pub(super) async fn register_node_ipv6(
    ds: &Datastore,
    name: &str,
    ipv6: std::net::Ipv6Addr,
    prefix_len: u8,
) -> anyhow::Result<()> {
    resources::patch_node(ds, name, false, |spec| {
        resources::bgp_of(spec).insert("ipv6Address".into(), format!("{ipv6}/{prefix_len}").into());
    })
    .await
    .with_context(|| format!("updating the IPv6 address of Node {name:?}"))?;
    Ok(())
}

/// Detect the node's address again every `every` (Calico re-checks every 60 s). On a change: write it to
/// the Node resource (the other nodes re-derive their peers from it), then tell the peer loop and the
/// block advertiser through `tx`. A failed detection or write keeps the current address and is retried.
pub(super) async fn monitor_address(
    ds: Arc<Datastore>,
    name: String,
    method: crate::dataplane::autodetect::Method,
    netns: Option<PathBuf>,
    asn: Option<u32>,
    every: Duration,
    tx: watch::Sender<Ipv4Addr>,
) {
    let mut current = *tx.borrow();
    loop {
        tokio::time::sleep(every).await;
        let (m, ns) = (method.clone(), netns.clone());
        let detected = tokio::task::spawn_blocking(move || {
            crate::dataplane::autodetect::detect_ipv4(&m, ns.as_deref())
        })
        .await;
        let (ip, prefix_len) = match detected {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, address = %current, "address re-detection failed; keeping the current address");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "address re-detection did not finish");
                continue;
            }
        };
        if ip == current {
            continue;
        }
        match register_node(&ds, &name, ip, prefix_len, asn).await {
            Ok(()) => {
                tracing::info!(from = %current, to = %ip, "node address changed: Node resource updated; sessions and routes follow");
                current = ip;
                tx.send_replace(ip);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), to = %ip, "node address changed but the Node resource could not be updated; retrying")
            }
        }
    }
}
