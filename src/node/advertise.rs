//! Advertising the node's blocks and borrowed addresses: the RIB's originations follow IPAM.

#[allow(unused_imports)]
use super::*;

/// `a, b, c` (or `none`) for a log line.
pub(crate) fn prefix_list(prefixes: &[IpNetwork]) -> String {
    if prefixes.is_empty() {
        return "none".into();
    }
    prefixes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keep the RIB's local routes and the blackhole routes equal to the node's blocks (exact prefix) and
/// borrowed addresses (/32). `originated` turns true once the first set is in the RIB.
pub(super) async fn advertise_blocks(
    ipam: Arc<NodeIpam>,
    fib: FibHandle,
    rib: mpsc::Sender<RibInput>,
    mut addr: watch::Receiver<Ipv4Addr>,
    refresh: Arc<Notify>,
    originated: watch::Sender<bool>,
) {
    let mut attrs = Arc::new(PathAttributes {
        next_hop: Some(*addr.borrow_and_update()),
        ..Default::default()
    });
    let mut blocks: BTreeSet<IpNetwork> = BTreeSet::new();
    let mut hosts: BTreeSet<IpNetwork> = BTreeSet::new();
    loop {
        if addr.has_changed().unwrap_or(false) {
            // The node's address changed: announce everything again with the new next hop.
            attrs = Arc::new(PathAttributes {
                next_hop: Some(*addr.borrow_and_update()),
                ..Default::default()
            });
            blocks.clear();
            hosts.clear();
        }
        match ipam.routes().await {
            Ok(r) => {
                let want_blocks: BTreeSet<IpNetwork> = r.blocks.iter().copied().collect();
                let want_hosts: BTreeSet<IpNetwork> = r
                    .borrowed
                    .iter()
                    .filter_map(|(a, _)| {
                        IpNetwork::new(*a, if a.is_ipv4() { 32 } else { 128 }).ok()
                    })
                    .collect();
                let gone: Vec<IpNetwork> = blocks
                    .difference(&want_blocks)
                    .chain(hosts.difference(&want_hosts))
                    .copied()
                    .collect();
                let new_blocks: Vec<IpNetwork> = want_blocks.difference(&blocks).copied().collect();
                let new: Vec<IpNetwork> = new_blocks
                    .iter()
                    .copied()
                    .chain(want_hosts.difference(&hosts).copied())
                    .collect();
                // Blackhole first, then advertise: traffic for a free address of the block is dropped here
                // instead of looping back to a peer.
                if !new_blocks.is_empty() {
                    if let Err(e) = fib
                        .replace_many(new_blocks.iter().map(|b| Route::blackhole(*b)).collect())
                        .await
                    {
                        tracing::error!(error = %e, "blackhole routes for the node's blocks");
                    }
                }
                if !new.is_empty() {
                    tracing::info!(prefixes = %prefix_list(&new), "advertising");
                    let input = RibInput::Originate {
                        prefixes: new,
                        attrs: attrs.clone(),
                    };
                    if !to_rib(&rib, input, "advertise").await {
                        return;
                    }
                }
                if !gone.is_empty() {
                    tracing::info!(prefixes = %prefix_list(&gone), "withdrawing");
                    let input = RibInput::WithdrawLocal {
                        prefixes: gone.clone(),
                    };
                    if !to_rib(&rib, input, "advertise").await {
                        return;
                    }
                    let gone_blocks: Vec<IpNetwork> =
                        gone.into_iter().filter(|g| blocks.contains(g)).collect();
                    if !gone_blocks.is_empty() {
                        if let Err(e) = fib.remove_many(gone_blocks).await {
                            tracing::error!(error = %e, "removing blackhole routes");
                        }
                    }
                }
                blocks = want_blocks;
                hosts = want_hosts;
                originated.send_replace(true);
            }
            Err(e) => tracing::warn!(error = %e, "reading the node's blocks"),
        }
        tokio::select! {
            _ = refresh.notified() => {}
            _ = addr.changed() => {}
            _ = tokio::time::sleep(BLOCK_POLL) => {}
        }
    }
}
