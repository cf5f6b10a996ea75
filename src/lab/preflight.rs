//! Before the lab builds anything: is this process root, and does the kernel have what the lab uses (network
//! namespaces, veth, bridge, VXLAN, nftables)? Each missing piece is named with what to do about it, instead of
//! a half-built lab and an `ip` error halfway through.
//!
//! The probes run inside a scratch namespace of the lab's own name that is deleted afterwards; nothing is ever
//! created in the host's namespace.

use std::process::Command;

/// One missing prerequisite: what it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: &'static str,
    pub detail: String,
    pub fix: &'static str,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}; {}", self.what, self.detail, self.fix)
    }
}

fn run(args: &[&str]) -> Result<(), String> {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("cannot run {}: {e}", args[0])),
    }
}

/// Probe the kernel in a scratch namespace named `scratch` (created and deleted here). Returns every missing
/// piece, or an empty list when the lab can run.
pub fn check(scratch: &str) -> Vec<Missing> {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push(Missing {
            what: "root",
            detail: "the lab creates network namespaces, which needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)".into(),
            fix: "run it as root (prefix sudo if you are not root)",
        });
        return missing;
    }
    if let Err(e) = run(&["ip", "netns", "add", scratch]) {
        missing.push(Missing {
            what: "network namespaces",
            detail: format!("`ip netns add` failed: {e}"),
            fix: "needs a kernel with CONFIG_NET_NS and, inside a container, a privileged one",
        });
        return missing;
    }
    let probes: [(&str, &[&str], &str); 4] = [
        (
            "veth",
            &["link", "add", "mgpre0", "type", "veth", "peer", "name", "mgpre1"],
            "load the module (modprobe veth) or use a kernel with CONFIG_VETH",
        ),
        (
            "bridge",
            &["link", "add", "mgprebr", "type", "bridge"],
            "load the module (modprobe bridge) or use a kernel with CONFIG_BRIDGE",
        ),
        (
            "vxlan",
            &[
                "link", "add", "mgprevx", "type", "vxlan", "id", "42", "dstport", "4789",
            ],
            "load the module (modprobe vxlan) or use a kernel with CONFIG_VXLAN (VXLAN pools need it)",
        ),
        (
            "nftables",
            &[],
            "install nftables (apt-get install nftables) and use a kernel with CONFIG_NF_TABLES (outgoing NAT needs it)",
        ),
    ];
    for (what, link_args, fix) in probes {
        let result = if what == "nftables" {
            run(&[
                "ip",
                "netns",
                "exec",
                scratch,
                "nft",
                "add",
                "table",
                "inet",
                "margay_preflight",
            ])
        } else {
            let mut args = vec!["ip", "-n", scratch];
            args.extend_from_slice(link_args);
            run(&args)
        };
        if let Err(e) = result {
            missing.push(Missing {
                what,
                detail: e,
                fix,
            });
        }
    }
    // Deleting the namespace deletes every probe device and table with it.
    let _ = run(&["ip", "netns", "del", scratch]);
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_says_what_and_how() {
        let m = Missing {
            what: "vxlan",
            detail: "Error: Unknown device type.".into(),
            fix: "load the module",
        };
        assert_eq!(
            m.to_string(),
            "vxlan: Error: Unknown device type.; load the module"
        );
    }
}
