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
