//! Kernel settings margay needs, set and reported: the node's forwarding switches and the per-interface
//! settings of a pod's host-side veth. Keys are paths under `/proc/sys` (`net/ipv4/ip_forward`), because
//! interface names may contain dots. `/proc/sys/net` shows the network namespace of the thread that opens
//! it, so every read and write runs inside the namespace (see `netns`).

use std::path::Path;

use super::error::{ns_label, DataplaneError};
use super::netns::in_netns;

/// One setting: what it was and what it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlSetting {
    /// Path under /proc/sys, e.g. `net/ipv4/ip_forward`.
    pub key: String,
    /// The value before margay wrote it (`None`: the key does not exist, e.g. IPv6 disabled).
    pub before: Option<String>,
    /// The value now.
    pub after: Option<String>,
}

fn read_here(key: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Write `settings` inside `netns`. A key that does not exist is an error unless `optional` (IPv6 keys on a
/// kernel or namespace without IPv6). A value already right is not written.
pub fn set_many(
    netns: Option<&Path>,
    settings: &[(String, &str)],
    optional: bool,
) -> Result<Vec<SysctlSetting>, DataplaneError> {
    let label = ns_label(netns);
    in_netns(netns, || set_here(&label, settings, optional))
}

/// Like [`set_many`] for a thread already inside the namespace.
pub(crate) fn set_here(
    label: &str,
    settings: &[(String, &str)],
    optional: bool,
) -> Result<Vec<SysctlSetting>, DataplaneError> {
    let mut out = Vec::with_capacity(settings.len());
    for (key, value) in settings {
        let before = read_here(key);
        if before.is_none() && optional {
            out.push(SysctlSetting {
                key: key.clone(),
                before: None,
                after: None,
            });
            continue;
        }
        if before.as_deref() != Some(*value) {
            std::fs::write(Path::new("/proc/sys").join(key), value).map_err(|source| {
                DataplaneError::Sysctl {
                    key: key.clone(),
                    netns: label.to_string(),
                    source,
                }
            })?;
        }
        out.push(SysctlSetting {
            key: key.clone(),
            before,
            after: read_here(key),
        });
    }
    Ok(out)
}

/// Read keys inside `netns` (`None` for a missing key).
pub fn read_many(
    netns: Option<&Path>,
    keys: &[String],
) -> Result<Vec<(String, Option<String>)>, DataplaneError> {
    in_netns(netns, || {
        Ok(keys.iter().map(|k| (k.clone(), read_here(k))).collect())
    })
}

/// The node-wide settings margay needs: IPv4 forwarding always, IPv6 forwarding where IPv6 exists.
/// Returns what each was and is.
pub fn ensure_node(netns: Option<&Path>) -> Result<Vec<SysctlSetting>, DataplaneError> {
    let label = ns_label(netns);
    in_netns(netns, || {
        let mut out = set_here(&label, &[("net/ipv4/ip_forward".to_string(), "1")], false)?;
        out.extend(set_here(
            &label,
            &[("net/ipv6/conf/all/forwarding".to_string(), "1")],
            true,
        )?);
        for s in &out {
            if s.before != s.after {
                tracing::info!(netns = %label, key = %s.key, before = ?s.before, after = ?s.after, "sysctl set");
            }
        }
        Ok(out)
    })
}

/// Settings to write: (key under /proc/sys, value).
pub(crate) type Settings = Vec<(String, &'static str)>;

/// Host-side settings of a pod veth (Calico's set): (IPv4 ones, IPv6 ones; the latter optional when the
/// pod has no IPv6 address).
pub(crate) fn host_veth_settings(ifname: &str, ipv6: bool) -> (Settings, Settings) {
    let v4 = vec![
        (format!("net/ipv4/conf/{ifname}/proxy_arp"), "1"),
        (format!("net/ipv4/conf/{ifname}/forwarding"), "1"),
        (format!("net/ipv4/conf/{ifname}/route_localnet"), "1"),
        (format!("net/ipv4/neigh/{ifname}/proxy_delay"), "0"),
    ];
    let mut v6 = vec![(format!("net/ipv6/conf/{ifname}/accept_ra"), "0")];
    if ipv6 {
        v6.extend([
            (format!("net/ipv6/conf/{ifname}/disable_ipv6"), "0"),
            (format!("net/ipv6/conf/{ifname}/accept_dad"), "0"),
            (format!("net/ipv6/conf/{ifname}/proxy_ndp"), "1"),
            (format!("net/ipv6/conf/{ifname}/forwarding"), "1"),
        ]);
    }
    (v4, v6)
}

/// The sysctls a gateway node (one that forwards for hosts outside the cluster, `margay node run
/// --gateway`) needs, as read from the kernel: the forwarding switches and every interface's `rp_filter`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewaySysctls {
    /// `net.ipv4.ip_forward`.
    pub ip_forward: Option<String>,
    /// `net.ipv6.conf.all.forwarding` (`None`: no IPv6 in the namespace).
    pub ipv6_forwarding: Option<String>,
    /// `net.ipv4.conf.all.rp_filter`.
    pub rp_filter_all: Option<String>,
    /// (interface, its `rp_filter`) for every interface outside traffic may cross: all but `lo` and the
    /// pod veths (`mg*`, `mh*`), whose reverse-path settings are the pods' business.
    pub rp_filter: Vec<(String, Option<String>)>,
}

/// Read [`GatewaySysctls`] inside `netns`.
pub fn read_gateway(netns: Option<&Path>) -> Result<GatewaySysctls, DataplaneError> {
    in_netns(netns, || {
        let mut ifaces: Vec<String> = std::fs::read_dir("/proc/sys/net/ipv4/conf")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| {
                        !matches!(n.as_str(), "all" | "default" | "lo")
                            && !n.starts_with(crate::dataplane::pod::HOST_PREFIX)
                            && !n.starts_with(crate::dataplane::hostveth::HOST_VETH_PREFIX)
                    })
                    .collect()
            })
            .unwrap_or_default();
        ifaces.sort();
        Ok(GatewaySysctls {
            ip_forward: read_here("net/ipv4/ip_forward"),
            ipv6_forwarding: read_here("net/ipv6/conf/all/forwarding"),
            rp_filter_all: read_here("net/ipv4/conf/all/rp_filter"),
            rp_filter: ifaces
                .into_iter()
                .map(|i| {
                    let v = read_here(&format!("net/ipv4/conf/{i}/rp_filter"));
                    (i, v)
                })
                .collect(),
        })
    })
}

/// What is wrong with a gateway's settings, one finding per problem, each ending in the exact fix.
///
/// - Forwarding off: the gateway drops every packet it should pass on (margay sets it at start; something
///   turned it off since).
/// - Strict reverse-path filtering (`rp_filter` 1) on an interface: the kernel uses the highest of
///   `conf.all` and `conf.<if>`, and strict mode drops a packet whose source is best reached through
///   another interface: outside hosts routed back another way, and traffic arriving on a tunnel
///   (`vxlan.calico`). margay cannot know the outside hosts' return paths, so it asks for loose mode (2),
///   which only demands that the source be reachable at all (RFC 3704 section 2.4, "feasible path").
pub fn gateway_findings(s: &GatewaySysctls) -> Vec<String> {
    let mut out = Vec::new();
    if s.ip_forward.as_deref() != Some("1") {
        out.push(format!(
            "net.ipv4.ip_forward is {}: the gateway does not forward outside hosts' packets to the pods; fix: sysctl -w net.ipv4.ip_forward=1",
            s.ip_forward.as_deref().unwrap_or("unreadable")
        ));
    }
    if let Some(v) = s.ipv6_forwarding.as_deref().filter(|v| *v != "1") {
        out.push(format!(
            "net.ipv6.conf.all.forwarding is {v}: the gateway does not forward IPv6; fix: sysctl -w net.ipv6.conf.all.forwarding=1"
        ));
    }
    let all_strict = s.rp_filter_all.as_deref() == Some("1");
    for (iface, v) in &s.rp_filter {
        let own_strict = v.as_deref() == Some("1");
        // Effective = max(all, interface): 2 anywhere is loose, else 1 anywhere is strict.
        let loose = s.rp_filter_all.as_deref() == Some("2") || v.as_deref() == Some("2");
        if loose || !(all_strict || own_strict) {
            continue;
        }
        let mut fix = Vec::new();
        if all_strict {
            fix.push("net.ipv4.conf.all.rp_filter=2".to_string());
        }
        if own_strict {
            fix.push(format!("net.ipv4.conf.{iface}.rp_filter=2"));
        }
        out.push(format!(
            "{iface}: strict reverse-path filtering (net.ipv4.conf.all.rp_filter={}, net.ipv4.conf.{iface}.rp_filter={}) drops outside hosts' packets whose return route leaves by another interface; fix: sysctl -w {}",
            s.rp_filter_all.as_deref().unwrap_or("?"),
            v.as_deref().unwrap_or("?"),
            fix.join(" ")
        ));
    }
    out
}

#[cfg(test)]
mod gateway_tests {
    use super::*;

    fn s(fwd: &str, all: &str, ifs: &[(&str, &str)]) -> GatewaySysctls {
        GatewaySysctls {
            ip_forward: Some(fwd.into()),
            ipv6_forwarding: None,
            rp_filter_all: Some(all.into()),
            rp_filter: ifs
                .iter()
                .map(|(i, v)| (i.to_string(), Some(v.to_string())))
                .collect(),
        }
    }

    #[test]
    fn a_good_gateway_has_no_findings() {
        assert!(gateway_findings(&s("1", "0", &[("eth0", "0"), ("eth1", "2")])).is_empty());
        // Loose on `all` wins over strict on the interface (the kernel takes the maximum).
        assert!(gateway_findings(&s("1", "2", &[("eth0", "1")])).is_empty());
    }

    #[test]
    fn each_wrong_setting_names_its_fix() {
        let f = gateway_findings(&s("0", "0", &[("eth0", "0"), ("eth1", "1")]));
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].ends_with("fix: sysctl -w net.ipv4.ip_forward=1"),
            "{f:?}"
        );
        assert!(
            f[1].starts_with("eth1:")
                && f[1].ends_with("fix: sysctl -w net.ipv4.conf.eth1.rp_filter=2"),
            "{f:?}"
        );
        // Strict on `all` makes every interface strict: the fix names both keys where both are 1.
        let f = gateway_findings(&s("1", "1", &[("eth0", "1"), ("eth1", "0")]));
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].ends_with(
            "fix: sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.eth0.rp_filter=2"
        ));
        assert!(f[1].ends_with("fix: sysctl -w net.ipv4.conf.all.rp_filter=2"));
        let mut v6 = s("1", "0", &[]);
        v6.ipv6_forwarding = Some("0".into());
        assert!(gateway_findings(&v6)[0].contains("net.ipv6.conf.all.forwarding=1"));
    }
}
