//! margay-cni against a running lab node, end to end: bad input gets a clear CNI error and leaks nothing,
//! and a real container runtime (podman with its CNI backend) runs containers on the node's network.
//!
//! ```text
//!   netns <lab>-br: bridge br0 10.99.0.1/24
//!     |-- <lab>-etcd  10.99.0.2   etcd                       (stopped and started again by the test)
//!     |-- <lab>-n1    10.99.0.11  margay node run  <── margay-cni (by hand, then from podman run inside n1)
//!     `-- <lab>-n2    10.99.0.12  margay node run  ── pod <lab>-n2p1 (the containers ping it)
//! ```
//!
//! One lab, in order:
//! 1. bad input, each a CNI error object (code + msg) and a non-zero exit: a configuration that is not
//!    JSON (6), a field of the wrong type (7), an unsupported cniVersion (1), an unknown CNI_COMMAND (4);
//! 2. daemon down (stopped, socket gone): ADD fails with 11 and names the socket; DEL of a pod it had made
//!    succeeds (spooled) and the restarted daemon releases the address and removes the veth;
//! 3. etcd down: ADD fails with 11 naming etcd, nothing half-made (no veth, no address);
//!    afterwards `margay ipam check` finds 0 problems and the node holds exactly its live pods' veths;
//! 4. podman (network_backend = "cni") inside n1: margay alone, then margay first in a chain with portmap,
//!    bandwidth and tuning: the container gets an address from n1's block and pings n2's pod; after
//!    `--rm` nothing is left (no veth, no address, no podman netns).

use crate::common;
use std::time::Duration;

use std::net::Ipv4Addr;
use std::path::Path;

use common::lab::{
    block_in_use, eventually, in_ns, ipam_check, lab_prerequisites, pod_veths, status_json, Lab,
};
use common::{have, require, try_sh};
use serde_json::{json, Value};

/// The CNI error object margay-cni printed, and its exit status.
fn cni_error(ok: bool, out: &str, what: &str) -> (u64, String) {
    assert!(!ok, "{what}: margay-cni succeeded: {out}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("{what}: no CNI error object in {out:?}"));
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: {e}: {line}"));
    let code = v["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: no code: {v}"));
    let msg = v["msg"].as_str().unwrap_or_default().to_string();
    assert!(!msg.is_empty(), "{what}: empty msg: {v}");
    println!("{what}: code {code}: {msg}");
    (code, msg)
}

#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn lab_cni_bad_input_and_podman() {
    const T: &str = "lab_cni_bad_input_and_podman";
    if !lab_prerequisites(T) {
        return;
    }
    let lab = Lab::up("cn", &["--nodes", "2", "--pods", "1"]);
    let n1 = lab.node(0).to_string();
    let n2 = lab.node(1).to_string();
    let block = lab.own_block(&n1);
    let in_use = block_in_use(&n1, block);
    let veths = pod_veths(&n1);
    assert_eq!(veths.len(), 1, "{n1} should hold one pod veth: {veths:?}");
    // A spare pod namespace, named under the lab's prefix so `lab down` deletes it.
    let spare = format!("{}-x", lab.name);
    let (ok, out) = try_sh(&format!(
        "ip netns add {spare} && ip -n {spare} link set lo up"
    ));
    assert!(ok, "{out}");
    let conf = lab.cni_conf(&n1);
    let with = |k: &str, v: Value| {
        let mut c = conf.clone();
        c[k] = v;
        c.to_string()
    };

    // 1. Bad input.
    let (ok, out) = lab.cni(&n1, "bad1", "ADD", "{not json", &[]);
    assert_eq!(cni_error(ok, &out, "config not JSON").0, 6);
    let (ok, out) = lab.cni(&n1, "bad1", "ADD", &with("mtu", json!("big")), &[]);
    let (code, msg) = cni_error(ok, &out, "mtu of the wrong type");
    assert_eq!(code, 7);
    assert!(msg.contains("mtu"), "{msg}");
    let (ok, out) = lab.cni(&n1, "bad1", "ADD", &with("cniVersion", json!("9.9.9")), &[]);
    assert_eq!(cni_error(ok, &out, "unsupported cniVersion").0, 1);
    let (ok, out) = lab.cni(&n1, "bad1", "FROB", &conf.to_string(), &[]);
    let (code, msg) = cni_error(ok, &out, "unknown CNI_COMMAND");
    assert_eq!(code, 4);
    assert!(msg.contains("FROB"), "{msg}");

    // 2. Daemon down. First a pod it makes, to DEL while it is away.
    let cni_spare = |id: &str, cmd: &str, conf: &str| {
        lab.cni(
            &n1,
            id,
            cmd,
            conf,
            &[("CNI_NETNS", &format!("/var/run/netns/{spare}"))],
        )
    };
    let (ok, out) = cni_spare("spare1", "ADD", &conf.to_string());
    assert!(ok, "ADD spare1: {out}");
    assert_eq!(block_in_use(&n1, block), in_use + 1);
    let pid: i32 = std::fs::read_to_string(lab.state_path(&format!("{n1}.pid")))
        .expect("n1 pid file")
        .trim()
        .parse()
        .expect("pid");
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM n1");
    assert!(
        eventually(Duration::from_millis(20000), || nix::sys::signal::kill(
            pid, None
        )
        .is_err()),
        "{n1}'s daemon did not stop"
    );
    let (ok, out) = lab.cni(&n1, "bad2", "ADD", &conf.to_string(), &[]);
    let (code, msg) = cni_error(ok, &out, "daemon down");
    assert_eq!(code, 11);
    assert!(
        msg.contains("margay daemon not reachable") && msg.contains("cni.sock"),
        "{msg}"
    );
    // DEL must not block pod deletion: the shim spools it for the daemon.
    let (ok, out) = cni_spare("spare1", "DEL", &conf.to_string());
    assert!(ok, "DEL with the daemon down: {out}");
    let (ok, out) = lab.margay_lab("restart-node", &[&n1]);
    assert!(ok, "restart-node {n1}: {out}");
    let ready = eventually(Duration::from_millis(30000), || {
        status_json(&n1, None).is_ok_and(|r| r["ready"]["ready"] == true)
    });
    assert!(ready, "{n1} not ready after restart:\n{}", lab.logs());
    assert!(
        eventually(Duration::from_millis(20000), || block_in_use(&n1, block)
            == in_use
            && pod_veths(&n1) == veths),
        "the spooled DEL was not replayed: in use {} (want {in_use}), veths {:?} (want {veths:?})",
        block_in_use(&n1, block),
        pod_veths(&n1)
    );

    // 3. etcd down.
    let (ok, out) = lab.margay_lab("etcd", &["stop"]);
    assert!(ok, "etcd stop: {out}");
    let (ok, out) = cni_spare("bad3", "ADD", &conf.to_string());
    let (code, msg) = cni_error(ok, &out, "etcd down");
    assert_eq!(code, 11);
    assert!(msg.contains("etcd"), "{msg}");
    assert_eq!(pod_veths(&n1), veths, "a veth was left by the failed ADD");
    let (_, links) = in_ns(&spare, &["ip", "-o", "link", "show"]);
    assert_eq!(
        links.lines().count(),
        1,
        "the pod netns holds more than lo: {links}"
    );
    let (ok, out) = lab.margay_lab("etcd", &["start"]);
    assert!(ok, "etcd start: {out}");
    assert_eq!(
        block_in_use(&n1, block),
        in_use,
        "the failed ADD kept an address"
    );
    let check = ipam_check(&n1);
    assert!(check.contains("found 0 problems"), "{check}");

    // 4. podman through the node.
    let podman_ok = have("podman")
        && have("busybox")
        && have("nsenter")
        && have("unshare")
        && Path::new("/usr/lib/cni/portmap").exists();
    if !require(
        podman_ok,
        T,
        "needs podman, busybox-static, util-linux and containernetworking-plugins (scripts/install-deps.sh)",
    ) {
        return;
    }
    let (_, target) = lab.pod_on(&n2);
    let _guard = podman::Leftovers::note(block);
    let margay = json!({"type": "margay", "socket": lab.socket(&n1), "timeout_seconds": 30,
                        "log_file": lab.state_path("podman-cni.log")});
    let nets = [
        (
            "margay alone",
            json!({"cniVersion": "1.0.0", "name": "mglab", "plugins": [margay.clone()]}),
            "",
        ),
        (
            "margay, portmap, bandwidth, tuning",
            json!({"cniVersion": "1.0.0", "name": "mglab", "plugins": [
                margay,
                {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
                {"type": "bandwidth", "ingressRate": 80_000_000, "ingressBurst": 1_000_000,
                 "egressRate": 80_000_000, "egressBurst": 1_000_000},
                {"type": "tuning", "sysctl": {"net.core.somaxconn": "1024"},
                 "dataDir": lab.state_path("tuning")}
            ]}),
            "-p 18080:80",
        ),
    ];
    for (what, conflist, flags) in nets {
        let p = podman::Podman::new(&n1, &conflist);
        let (ok, out) = p.run(&format!(
            "run --rm --network mglab {flags} localhost/test-busybox \
             sh -c 'ip -4 -o addr show eth0; cat /proc/sys/net/core/somaxconn; ping -c 3 -W 2 {target}'"
        ));
        assert!(ok, "podman run ({what}) failed: {out}\n{}", lab.logs());
        let addr: Ipv4Addr = out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("({what}) no address in: {out}"));
        assert!(
            block.contains(addr),
            "({what}) {addr} is outside {n1}'s block {block}"
        );
        assert!(
            out.contains(" 0% packet loss"),
            "({what}) ping {target}: {out}"
        );
        if !flags.is_empty() {
            assert!(
                out.contains("\n1024\n"),
                "({what}) tuning did not run after margay: {out}"
            );
        }
        println!("podman ({what}): container {addr} in {block} pinged {target} on {n2}");
        // --rm: DEL reached the node; nothing is left.
        assert!(
            eventually(Duration::from_millis(10000), || pod_veths(&n1) == veths
                && block_in_use(&n1, block) == in_use),
            "({what}) left behind: veths {:?} (want {veths:?}), in use {} (want {in_use})",
            pod_veths(&n1),
            block_in_use(&n1, block)
        );
    }
    let (_, nat) = in_ns(&n1, &["iptables", "-t", "nat", "-S"]);
    assert!(!nat.contains("18080"), "portmap rules left: {nat}");
    let check = ipam_check(&n1);
    assert!(check.contains("found 0 problems"), "{check}");
}

/// podman with the CNI backend (tests/common/podman.rs), run inside a lab node's network namespace, and what it
/// may leave behind.
mod podman {
    use std::path::Path;

    use super::try_sh;

    pub use crate::common::podman::Podman;

    /// What podman and crun may leave on the host when a run fails: /run/crun, /run/mount (when this test
    /// created them) and podman's cni-* network namespaces holding an address of the lab's block.
    pub struct Leftovers {
        crun_existed: bool,
        mount_existed: bool,
        block: ipnetwork::Ipv4Network,
    }

    impl Leftovers {
        pub fn note(block: ipnetwork::Ipv4Network) -> Leftovers {
            Leftovers {
                crun_existed: Path::new("/run/crun").exists(),
                mount_existed: Path::new("/run/mount").exists(),
                block,
            }
        }
    }

    impl Drop for Leftovers {
        fn drop(&mut self) {
            if !self.crun_existed {
                let _ = std::fs::remove_dir("/run/crun");
            }
            if !self.mount_existed {
                let _ = std::fs::remove_file("/run/mount/utab");
                let _ = std::fs::remove_dir("/run/mount");
            }
            let Ok(dir) = std::fs::read_dir("/run/netns") else {
                return;
            };
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !name.starts_with("cni-") {
                    continue;
                }
                let (_, addrs) = try_sh(&format!("ip -n {name} -4 -o addr show"));
                let ours = addrs.split_whitespace().any(|w| {
                    w.split('/')
                        .next()
                        .and_then(|a| a.parse().ok())
                        .is_some_and(|a| self.block.contains(a))
                });
                if ours {
                    let _ = try_sh(&format!(
                        "ip netns pids {name} | xargs -r kill -9; ip netns del {name}"
                    ));
                }
            }
        }
    }
}
