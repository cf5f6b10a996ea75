//! Outgoing NAT for `natOutgoing` pools: traffic from such a pool to a destination outside every pool is
//! masqueraded to the node's address.
//!
//! margay owns exactly one nftables table, `inet margay`, and replaces it as a whole in one `nft -f -`
//! transaction (create-if-missing, delete, define: atomic, so packets never see a half-made rule set). No
//! other table, chain or rule is read or touched. `nft` runs inside the node's network namespace.
//!
//! ```text
//! table inet margay {
//!   set nat_v4 { type ipv4_addr; flags interval; elements = { <natOutgoing IPv4 pools> } }
//!   set all_v4 { type ipv4_addr; flags interval; elements = { <every IPv4 pool> } }
//!   (same for v6)
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr @nat_v4 ip daddr != @all_v4 masquerade fully-random      (or: snat ip to <natOutgoingAddress>)
//!     ip6 saddr @nat_v6 ip6 daddr != @all_v6 masquerade fully-random } }
//! ```
//!
//! This is Calico's rule (`cali-nat-outgoing`: source in a NAT pool, destination in no pool at all, disabled
//! pools included, so a disabled pool is the way to mark a CIDR "reach without NAT"), with `fully-random`
//! as Calico adds `--random-fully` where the kernel has it. Only the first packet of a connection reaches a
//! nat chain, so replies to connections opened from outside are never rewritten.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;

use super::error::{ns_label, DataplaneError};
use super::netns::in_netns;

/// The table margay owns.
pub const TABLE: &str = "margay";

/// One IP pool as NAT sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatPool {
    pub cidr: IpNetwork,
    /// Masquerade traffic from this pool to destinations outside every pool.
    pub nat_outgoing: bool,
}

fn elements(pools: &[NatPool], v4: bool, only_nat: bool) -> Vec<String> {
    let mut v: Vec<String> = pools
        .iter()
        .filter(|p| p.cidr.is_ipv4() == v4 && (!only_nat || p.nat_outgoing))
        .map(|p| format!("{}/{}", p.cidr.network(), p.cidr.prefix()))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn set_def(name: &str, v4: bool, elems: &[String]) -> String {
    let ty = if v4 { "ipv4_addr" } else { "ipv6_addr" };
    if elems.is_empty() {
        format!("  set {name} {{ type {ty}; flags interval; }}\n")
    } else {
        format!(
            "  set {name} {{ type {ty}; flags interval; auto-merge; elements = {{ {} }} }}\n",
            elems.join(", ")
        )
    }
}

/// How masqueraded traffic leaves the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatOptions {
    /// Calico's `natOutgoingAddress` (IPv4 only, as Calico validates it): SNAT to this address instead of
    /// masquerading to the outgoing interface's address.
    pub outgoing_address_v4: Option<std::net::Ipv4Addr>,
}

/// The nft script that replaces margay's table with the rules for `pools` (masquerade).
pub fn render(pools: &[NatPool]) -> String {
    render_with(pools, &NatOptions::default())
}

/// The nft script that replaces margay's table with the rules for `pools` and `opts`.
pub fn render_with(pools: &[NatPool], opts: &NatOptions) -> String {
    let mut s = String::new();
    // Create (a no-op if present), delete, define: one transaction, so the old table is replaced atomically.
    s.push_str(&format!(
        "table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
    ));
    s.push_str(&format!("table inet {TABLE} {{\n"));
    s.push_str(&set_def("nat_v4", true, &elements(pools, true, true)));
    s.push_str(&set_def("all_v4", true, &elements(pools, true, false)));
    s.push_str(&set_def("nat_v6", false, &elements(pools, false, true)));
    s.push_str(&set_def("all_v6", false, &elements(pools, false, false)));
    s.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    match opts.outgoing_address_v4 {
        Some(a) => s.push_str(&format!(
            "    ip saddr @nat_v4 ip daddr != @all_v4 snat ip to {a} fully-random\n"
        )),
        None => s.push_str("    ip saddr @nat_v4 ip daddr != @all_v4 masquerade fully-random\n"),
    }
    s.push_str("    ip6 saddr @nat_v6 ip6 daddr != @all_v6 masquerade fully-random\n");
    s.push_str("  }\n}\n");
    s
}

fn run_nft(
    netns: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, DataplaneError> {
    let label = ns_label(netns);
    // A child inherits the network namespace of the thread that forks it.
    in_netns(netns, || {
        let err = |detail: String| DataplaneError::Nft {
            netns: label.clone(),
            detail,
        };
        let mut child = Command::new("nft")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot run nft: {e}")))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| err(format!("writing to nft: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| err(format!("waiting for nft: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "nft {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

/// Make margay's table hold exactly the rules for `pools` (an empty list still defines the table, with
/// nothing masqueraded). Atomic.
pub fn apply(netns: Option<&Path>, pools: &[NatPool]) -> Result<(), DataplaneError> {
    apply_with(netns, pools, &NatOptions::default())
}

/// [`apply`] with [`NatOptions`].
pub fn apply_with(
    netns: Option<&Path>,
    pools: &[NatPool],
    opts: &NatOptions,
) -> Result<(), DataplaneError> {
    run_nft(netns, &["-f", "-"], Some(&render_with(pools, opts)))?;
    Ok(())
}

/// Remove margay's table (success if it is not there).
pub fn remove(netns: Option<&Path>) -> Result<(), DataplaneError> {
    let script = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
    run_nft(netns, &["-f", "-"], Some(&script))?;
    Ok(())
}

/// margay's table as `nft list` prints it, or `None` when it does not exist.
pub fn show(netns: Option<&Path>) -> Result<Option<String>, DataplaneError> {
    let tables = run_nft(netns, &["list", "tables"], None)?;
    if !tables
        .lines()
        .any(|l| l.trim() == format!("table inet {TABLE}"))
    {
        return Ok(None);
    }
    run_nft(netns, &["list", "table", "inet", TABLE], None).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_separates_nat_and_all_pools() {
        let pools = [
            NatPool {
                cidr: "10.244.0.0/16".parse().unwrap(),
                nat_outgoing: true,
            },
            NatPool {
                cidr: "10.250.0.0/16".parse().unwrap(),
                nat_outgoing: false,
            },
            NatPool {
                cidr: "fd00:244::/64".parse().unwrap(),
                nat_outgoing: true,
            },
        ];
        let s = render(&pools);
        assert!(s.starts_with("table inet margay {}\ndelete table inet margay\n"));
        assert!(s.contains("set nat_v4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.244.0.0/16 } }"));
        assert!(s.contains("set all_v4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.244.0.0/16, 10.250.0.0/16 } }"));
        assert!(s.contains("elements = { fd00:244::/64 }"));
        assert!(s.contains("ip saddr @nat_v4 ip daddr != @all_v4 masquerade fully-random"));
        let s = render_with(
            &pools,
            &NatOptions {
                outgoing_address_v4: Some("192.0.2.7".parse().unwrap()),
            },
        );
        assert!(
            s.contains("ip saddr @nat_v4 ip daddr != @all_v4 snat ip to 192.0.2.7 fully-random")
        );
        assert!(s.contains("ip6 saddr @nat_v6 ip6 daddr != @all_v6 masquerade fully-random"));
    }

    #[test]
    fn render_without_pools_has_empty_sets() {
        let s = render(&[]);
        assert!(s.contains("set nat_v4 { type ipv4_addr; flags interval; }"));
        assert!(!s.contains("elements"));
    }
}
