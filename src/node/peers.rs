//! The peer loop: the desired peer set recomputed from each configuration snapshot, and only the difference
//! applied to the speaker.

#[allow(unused_imports)]
use super::*;

/// Hand `input` to the RIB task. False when its inbox is closed: the RIB task has ended, which the supervisor
/// reports before it stops the daemon; the calling task (`task`) logs that it stops too and returns.
pub(super) async fn to_rib(rib: &mpsc::Sender<RibInput>, input: RibInput, task: &str) -> bool {
    if rib.send(input).await.is_err() {
        tracing::error!(
            task,
            "the RIB task is gone: this task stops too (the supervisor stops the daemon)"
        );
        return false;
    }
    true
}

/// The node's addresses as the address monitors last found them (fixed ones never change).
pub(super) struct NodeAddresses {
    pub v4: watch::Receiver<Ipv4Addr>,
    pub v6: watch::Receiver<Option<std::net::Ipv6Addr>>,
}

/// Re-derive the peers and the service prefixes from every snapshot the configuration feed publishes (and
/// when a mounted password Secret changes); apply only what changed. No etcd request is made here.
pub(super) async fn peer_loop(
    feed: ConfigFeed,
    mut id: Identity,
    spk: Arc<SpeakerHandle>,
    bfd: Arc<crate::bfd::BfdHandle>,
    applied: watch::Sender<bool>,
    mut originated: watch::Receiver<bool>,
    addresses: NodeAddresses,
) {
    let NodeAddresses {
        v4: mut addr,
        v6: mut addr6,
    } = addresses;
    let mut current: Option<Vec<DesiredPeer>> = None;
    let mut current_bfd: Option<Vec<crate::bfd::BfdPeer>> = None;
    let mut services: BTreeSet<IpNetwork> = BTreeSet::new();
    let mut policy: Option<Policy> = None;
    let mut last_error: Option<String> = None;
    let mut cluster_id = id.cluster_id;
    let mut snapshots = feed.subscribe();
    let rib = spk.rib();
    let mut attrs = Arc::new(PathAttributes {
        next_hop: Some(id.ip),
        ..Default::default()
    });
    loop {
        // The address monitor found a new node address (and wrote it to our Node resource): sessions and
        // the service routes follow it.
        if addr.has_changed().unwrap_or(false) {
            id.ip = *addr.borrow_and_update();
            attrs = Arc::new(PathAttributes {
                next_hop: Some(id.ip),
                ..Default::default()
            });
            services.clear();
        }
        // The same for the IPv6 address: the peers' IPv6 next hop (and so the sessions) follow it; the
        // other nodes re-peer with it from our Node resource.
        if addr6.has_changed().unwrap_or(false) {
            id.ip6 = *addr6.borrow_and_update();
        }
        let snapshot = snapshots.borrow_and_update().clone();
        let secrets_text = secrets_from_dir(&id.secrets_dir).unwrap_or_default();
        let derived = async {
            let set = snapshot.config_set(secrets_in(Some(&id.secrets_dir))?)?;
            let wanted = desired_peers(&set, &id.name)?;
            let bfd_peers = crate::peering::bfd_peers(&wanted);
            let peers: Vec<DesiredPeer> = wanted
                .iter()
                .map(|p| {
                    let mut d = crate::peering::speaker_peer(p, id.ip);
                    d.next_hop_v6 = id.ip6;
                    // Between nodes that both have an IPv6 address each family rides on its own transport, as
                    // in Calico's BIRD; otherwise IPv6 routes ride on the IPv4 session (MP-BGP, next hop IP6).
                    let peer_has_v6 = p
                        .peer_node
                        .as_ref()
                        .and_then(|n| set.nodes.get(n))
                        .and_then(Node::ipv6)
                        .is_some();
                    if p.address.is_ipv6() {
                        d.session.families = vec![crate::bgp::wire::Family::IPV6_UNICAST];
                    } else if peer_has_v6 && id.ip6.is_some() {
                        d.session.families = vec![crate::bgp::wire::Family::IPV4_UNICAST];
                    }
                    // RFC 4724 3: after a daemon restart the kernel still forwards on the adopted routes (the
                    // FIB never flushes), so peers may keep ours until End-of-RIB; after a reboot nothing
                    // was preserved and they should not.
                    if let Some(gr) = d.session.graceful_restart.as_mut() {
                        gr.forwarding_preserved = id.forwarding_preserved;
                        gr.long_lived_forwarding_preserved = id.forwarding_preserved;
                        gr.restarting = id.restarting;
                    }
                    d
                })
                .collect();
            let pools = snapshot.pools()?;
            anyhow::Ok((set, peers, pools, bfd_peers))
        };
        match derived.await {
            Ok((set, peers, pools, bfd_peers)) => {
                last_error = None;
                cluster::report_unsupported(
                    &set,
                    &pools,
                    &id.name,
                    id.kernel_has_ipip,
                    id.ip6.is_some(),
                    &id.dp_status,
                );
                // routeReflectorClusterID changed live (a node made a reflector or no longer one): the RIB takes
                // the new id before the apply below restarts the sessions whose client role changed.
                let want_cluster_id = set.nodes.get(&id.name).and_then(Node::cluster_id);
                if want_cluster_id != cluster_id {
                    tracing::info!(from = ?cluster_id, to = ?want_cluster_id, "route-reflector cluster id changed");
                    if !to_rib(&rib, RibInput::SetClusterId(want_cluster_id), "peer-loop").await {
                        return;
                    }
                    cluster_id = want_cluster_id;
                }
                // Service CIDRs (Calico's confd `routes.go`): originated by every node, next hop self.
                let want = service_prefixes(&set, &id.name);
                let new: Vec<IpNetwork> = want.difference(&services).copied().collect();
                let gone: Vec<IpNetwork> = services.difference(&want).copied().collect();
                if !new.is_empty() {
                    tracing::info!(prefixes = %prefix_list(&new), "advertising service CIDRs");
                    let input = RibInput::Originate {
                        prefixes: new,
                        attrs: attrs.clone(),
                    };
                    if !to_rib(&rib, input, "peer-loop").await {
                        return;
                    }
                }
                if !gone.is_empty() {
                    tracing::info!(prefixes = %prefix_list(&gone), "withdrawing service CIDRs");
                    if !to_rib(
                        &rib,
                        RibInput::WithdrawLocal { prefixes: gone },
                        "peer-loop",
                    )
                    .await
                    {
                        return;
                    }
                }
                services = want;
                // Before the first apply, so no session ever sees a wider export than Calico's.
                let want_policy = export_policy(&pools, &services);
                if policy.as_ref() != Some(&want_policy) {
                    let input = RibInput::SetPolicy(Arc::new(want_policy.clone()));
                    if !to_rib(&rib, input, "peer-loop").await {
                        return;
                    }
                    policy = Some(want_policy);
                }
                // BFD sessions first, so a new peer's BFD is already coming up when BGP connects.
                if current_bfd.as_ref() != Some(&bfd_peers) {
                    match bfd.apply(bfd_peers.clone()).await {
                        Ok(()) => current_bfd = Some(bfd_peers),
                        Err(e) => tracing::error!(error = %e, "applying BFD sessions"),
                    }
                }
                if current.is_none() {
                    wait_for_own_routes(&mut originated).await;
                }
                if current.as_ref() != Some(&peers) {
                    match spk.apply(peers.clone()).await {
                        // The speaker logs what the apply changed.
                        Ok(_) => {
                            applied.send_replace(true);
                            current = Some(peers);
                        }
                        Err(e) => tracing::error!(error = %e, "applying BGP peers"),
                    }
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, "BGP configuration refused; running peers unchanged");
                    last_error = Some(msg);
                }
            }
        }
        // Wait for a new snapshot, or a rotated Secret file.
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return; // the feed is gone: the daemon is stopping
                    }
                    // Let a burst of writes (a node registering, an operator's apply) land together.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
                changed = addr.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                changed = addr6.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = tokio::time::sleep(SECRETS_POLL) => {
                    if secrets_from_dir(&id.secrets_dir).unwrap_or_default() != secrets_text {
                        break;
                    }
                }
            }
        }
    }
}

/// Before the first sessions: wait until the node's blocks are in the RIB, so every session's initial
/// table carries them ahead of its End-of-RIB. A peer that kept our routes across our restart (RFC 4724
/// 4.2) sweeps what is missing at End-of-RIB: a block announced a moment later would be withdrawn from its
/// kernel in between, and traffic to our pods dropped. The wait is bounded: a node whose IPAM cannot be read
/// still peers (and learns the routes it needs), and says why its blocks come late.
async fn wait_for_own_routes(originated: &mut watch::Receiver<bool>) {
    match tokio::time::timeout(ORIGINATE_WAIT, originated.wait_for(|done| *done)).await {
        Ok(Ok(_)) => {}
        // The advertise task is gone (the daemon is stopping, or the supervisor reports it).
        Ok(Err(_)) => {}
        Err(_) => tracing::warn!(
            waited_s = ORIGINATE_WAIT.as_secs(),
            "the node's blocks are not in the RIB yet (IPAM unreadable?); starting BGP without them: peers \
             that kept our routes across a restart drop them at End-of-RIB until they are announced"
        ),
    }
}
