//! Prometheus metrics derived from the status report at scrape time: BGP sessions by state, prefixes per
//! peer, FIB routes, IPAM blocks and addresses, etcd requests and errors, readiness. They are computed from
//! the same [`StatusReport`] `/status` serves, so the two never disagree; metrics the daemon's parts keep
//! themselves (the CNI latency histogram) live in the registry handed to [`super::serve`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::status::StatusReport;

/// The FSM states, so that every state is exported (a state with no session reads 0 rather than vanishing).
const FSM_STATES: [&str; 6] = [
    "Idle",
    "Connect",
    "Active",
    "OpenSent",
    "OpenConfirm",
    "Established",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FieldLabel {
    kind: String,
    field: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BfdLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
    peer_type: String,
}

/// A registry holding the report's metrics, ready to encode.
pub fn report_registry(r: &StatusReport) -> Registry {
    let mut reg = Registry::with_prefix("margay");

    let ready = Gauge::<i64>::default();
    ready.set(i64::from(r.ready.ready));
    reg.register(
        "ready",
        "1 when /readyz answers ready (datastore synced and BGP converged)",
        ready,
    );
    let uptime = Gauge::<i64>::default();
    uptime.set(i64::try_from(r.uptime_seconds).unwrap_or(i64::MAX));
    reg.register("uptime_seconds", "Seconds since the daemon started", uptime);

    let sessions = Family::<StateLabel, Gauge>::default();
    for s in FSM_STATES {
        let n = r.peers.iter().filter(|p| p.fsm_state == s).count();
        sessions
            .get_or_create(&StateLabel { state: s.into() })
            .set(n as i64);
    }
    reg.register(
        "bgp_sessions",
        "Configured BGP sessions by RFC 4271 FSM state",
        sessions,
    );

    let received = Family::<PeerLabel, Gauge>::default();
    let accepted = Family::<PeerLabel, Gauge>::default();
    let advertised = Family::<PeerLabel, Gauge>::default();
    let up = Family::<PeerLabel, Gauge>::default();
    for p in &r.peers {
        let l = PeerLabel {
            peer: if p.port == 0 || p.port == 179 {
                p.address.clone()
            } else {
                format!("{}:{}", p.address, p.port)
            },
            peer_type: p.peer_type.clone(),
        };
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        received.get_or_create(&l).set(g(p.prefixes_received));
        accepted.get_or_create(&l).set(g(p.prefixes_accepted));
        advertised.get_or_create(&l).set(g(p.prefixes_advertised));
        up.get_or_create(&l)
            .set(i64::from(p.fsm_state == "Established"));
    }
    reg.register(
        "bgp_peer_up",
        "1 when the session with the peer is Established",
        up,
    );
    reg.register(
        "bgp_prefixes_received",
        "Prefixes the peer currently announces to us",
        received,
    );
    reg.register(
        "bgp_prefixes_accepted",
        "Of the received prefixes, those import policy accepted",
        accepted,
    );
    reg.register(
        "bgp_prefixes_advertised",
        "Prefixes we currently announce to the peer",
        advertised,
    );

    let bfd_up = Family::<BfdLabel, Gauge>::default();
    let bfd_detect = Family::<BfdLabel, Gauge>::default();
    let bfd_tx = Family::<BfdLabel, Gauge>::default();
    let bfd_downs = Family::<BfdLabel, Counter>::default();
    for b in &r.bfd {
        let l = BfdLabel {
            peer: b.peer.clone(),
        };
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        bfd_up.get_or_create(&l).set(i64::from(b.state == "Up"));
        bfd_detect.get_or_create(&l).set(g(b.detect_time_ms));
        bfd_tx.get_or_create(&l).set(g(b.tx_interval_ms));
        bfd_downs.get_or_create(&l).inc_by(b.down_count);
    }
    reg.register(
        "bfd_session_up",
        "1 when the BFD session with the peer is Up (RFC 5880)",
        bfd_up,
    );
    reg.register(
        "bfd_detect_time_milliseconds",
        "Negotiated BFD detection time (RFC 5880 6.8.4); 0 until the peer is heard",
        bfd_detect,
    );
    reg.register(
        "bfd_tx_interval_milliseconds",
        "Negotiated BFD transmit interval before jitter (RFC 5880 6.8.7)",
        bfd_tx,
    );
    reg.register(
        "bfd_session_downs",
        "Times the BFD session went from Up to Down",
        bfd_downs,
    );

    let unknown = Family::<FieldLabel, Counter>::default();
    for (kind, field, n) in crate::config::tolerant::unknown_fields() {
        unknown.get_or_create(&FieldLabel { kind, field }).inc_by(n);
    }
    reg.register(
        "datastore_unknown_fields",
        "Resources read from the datastore carrying a field margay does not know (ignored), by kind and field",
        unknown,
    );

    if let Some(f) = &r.fib {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(f.routes).unwrap_or(i64::MAX));
        reg.register(
            "fib_routes",
            "Kernel routes with margay's protocol (learned routes and own blackholes)",
            g,
        );
    }
    if let Some(i) = &r.ipam {
        for (name, help, v) in [
            ("ipam_blocks", "IPAM blocks affine to this node", i.blocks),
            (
                "ipam_addresses",
                "Addresses in this node's blocks",
                i.addresses_total,
            ),
            (
                "ipam_addresses_allocated",
                "Allocated addresses in this node's blocks",
                i.addresses_allocated,
            ),
            (
                "ipam_addresses_borrowed",
                "Addresses this node borrowed from other nodes' blocks",
                i.addresses_borrowed,
            ),
            (
                "ipam_blocks_empty",
                "Blocks affine to this node without any allocation",
                i.blocks_empty,
            ),
            (
                "ipam_addresses_cooling",
                "Free addresses of this node's blocks still inside their release cooldown",
                i.addresses_cooling,
            ),
        ] {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            reg.register(name, help, g);
        }
        for (name, help, v) in [
            (
                "ipam_blocks_reclaimed",
                "Empty blocks of other nodes this node took over because its pools had no unclaimed block",
                i.blocks_reclaimed,
            ),
            (
                "ipam_blocks_released_empty",
                "Own blocks released after staying empty for the grace period",
                i.blocks_released_empty,
            ),
            (
                "ipam_addresses_cooling_handed_out",
                "Addresses handed out inside their cooldown because the pools had no other free address",
                i.addresses_cooling_handed_out,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            reg.register(name, help, c);
        }
    }
    if let Some(d) = &r.datastore {
        for (name, help, v) in [
            (
                "etcd_requests",
                "Requests sent to etcd endpoints, failed attempts included",
                d.requests,
            ),
            (
                "etcd_errors",
                "etcd request attempts that failed (unreachable endpoint, timeout or refusal)",
                d.errors,
            ),
            (
                "etcd_unreachable",
                "etcd calls that gave up after trying every endpoint for the whole retry budget",
                d.unreachable,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            reg.register(name, help, c);
        }
    }
    if let Some(d) = &r.dataplane {
        for (name, help, v) in [
            (
                "unresolved_routes",
                "Learned routes not installed because no kernel route resolves their next hop (retried)",
                d.unresolved_total,
            ),
            (
                "pod_mtu",
                "MTU given to pod interfaces when the CNI configuration sets none",
                u64::from(d.pod_mtu.unwrap_or(0)),
            ),
            (
                "dataplane_errors",
                "Settings the node cannot honour and that break connectivity (see margay status)",
                d.errors.len() as u64 + u64::from(d.nat_error.is_some()),
            ),
            (
                "not_supported_settings",
                "Calico fields in the datastore that margay parses but does not act on",
                d.not_supported.len() as u64,
            ),
        ] {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            reg.register(name, help, g);
        }
    }
    if let Some(g) = &r.gateway {
        let v = Gauge::<i64>::default();
        v.set(i64::try_from(g.problems.len()).unwrap_or(i64::MAX));
        reg.register(
            "gateway_problems",
            "On a gateway node (--gateway): kernel settings that keep it from forwarding for outside hosts (see margay status)",
            v,
        );
    }
    reg
}

/// Encode the daemon's own registry and the report's metrics as one OpenMetrics text (one `# EOF`).
pub fn encode(daemon: &Registry, r: &StatusReport) -> Result<String, std::fmt::Error> {
    let mut first = String::new();
    prometheus_client::encoding::text::encode(&mut first, daemon)?;
    let mut second = String::new();
    prometheus_client::encoding::text::encode(&mut second, &report_registry(r))?;
    let mut out = first.strip_suffix("# EOF\n").unwrap_or(&first).to_string();
    out.push_str(&second);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::{DatastoreSummary, FibSummary, IpamSummary, PeerStatus, ReadyState};

    fn report() -> StatusReport {
        StatusReport {
            role: "node".into(),
            ready: ReadyState {
                ready: true,
                reason: None,
            },
            bfd: Vec::new(),
            peers: vec![
                PeerStatus {
                    address: "10.0.0.2".into(),
                    port: 179,
                    peer_type: "node-to-node mesh".into(),
                    fsm_state: "Established".into(),
                    prefixes_received: 3,
                    prefixes_accepted: 2,
                    prefixes_advertised: 1,
                    ..Default::default()
                },
                PeerStatus {
                    address: "10.0.0.3".into(),
                    port: 1790,
                    peer_type: "global".into(),
                    fsm_state: "Active".into(),
                    ..Default::default()
                },
            ],
            fib: Some(FibSummary { routes: 7 }),
            ipam: Some(IpamSummary {
                blocks: 2,
                addresses_total: 128,
                addresses_allocated: 5,
                addresses_borrowed: 1,
                blocks_empty: 1,
                addresses_cooling: 4,
                blocks_reclaimed: 2,
                blocks_released_empty: 3,
                addresses_cooling_handed_out: 0,
            }),
            datastore: Some(DatastoreSummary {
                requests: 40,
                errors: 3,
                unreachable: 1,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn report_becomes_one_openmetrics_text() {
        let mut daemon = Registry::default();
        let c = Counter::<u64>::default();
        c.inc();
        daemon.register("margay_cni_requests", "test counter", c);
        let text = encode(&daemon, &report()).unwrap();
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"));
        for line in [
            "margay_cni_requests_total 1",
            "margay_ready 1",
            "margay_bgp_sessions{state=\"Established\"} 1",
            "margay_bgp_sessions{state=\"Active\"} 1",
            "margay_bgp_sessions{state=\"Idle\"} 0",
            "margay_bgp_prefixes_received{peer=\"10.0.0.2\",peer_type=\"node-to-node mesh\"} 3",
            "margay_bgp_prefixes_accepted{peer=\"10.0.0.2\",peer_type=\"node-to-node mesh\"} 2",
            "margay_bgp_prefixes_advertised{peer=\"10.0.0.2\",peer_type=\"node-to-node mesh\"} 1",
            "margay_bgp_peer_up{peer=\"10.0.0.3:1790\",peer_type=\"global\"} 0",
            "margay_fib_routes 7",
            "margay_ipam_blocks 2",
            "margay_ipam_addresses 128",
            "margay_ipam_addresses_allocated 5",
            "margay_ipam_addresses_borrowed 1",
            "margay_ipam_blocks_empty 1",
            "margay_ipam_addresses_cooling 4",
            "margay_ipam_blocks_reclaimed_total 2",
            "margay_ipam_blocks_released_empty_total 3",
            "margay_ipam_addresses_cooling_handed_out_total 0",
            "margay_etcd_requests_total 40",
            "margay_etcd_errors_total 3",
            "margay_etcd_unreachable_total 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn reflector_report_has_no_dataplane_metrics() {
        let r = StatusReport {
            fib: None,
            ipam: None,
            datastore: None,
            ..report()
        };
        let text = encode(&Registry::default(), &r).unwrap();
        assert!(!text.contains("margay_fib_routes"));
        assert!(!text.contains("margay_ipam_"));
        assert!(!text.contains("margay_etcd_"));
        assert!(text.contains("margay_bgp_sessions{state=\"Established\"} 1"));
    }
}
