//! `margay reflector` (the real binary) as the route reflector between real BIRD 2, GoBGP and FRR in
//! network namespaces: sessions, RFC 4456 reflection, withdrawals, a peer killed, graceful restart of a
//! client and of margay itself, wrong AS / wrong password, SIGHUP reconfiguration.
//!
//! Every test builds a star (tests/common/reflector.rs): margay in the hub namespace on a bridge,
//! each client in its own namespace, all iBGP in AS 4200000001 (4-octet).
//!
//! The tests need root (namespaces) and the daemons; without them they SKIP (or fail under CI=true).

use crate::common;

use std::time::Duration;

use common::bgp_peers::{have_bird, have_frr, have_gobgp, wait_for, Bird, Frr, GoBgp};
use common::reflector::*;
use common::{is_root, require};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn prereqs(test: &str) -> bool {
    require(is_root(), test, "needs root for network namespaces")
        && require(
            have_bird(),
            test,
            "bird2 is not installed (scripts/install-deps.sh)",
        )
        && require(
            have_gobgp(),
            test,
            "gobgpd is not installed (scripts/install-deps.sh)",
        )
        && require(
            have_frr(),
            test,
            "frr is not installed (scripts/install-deps.sh)",
        )
}

// ------------------------------------------------------------------ peer configurations

/// BIRD as client `i`: static IPv4 and IPv6 routes, one IPv4 and one IPv6 session to margay, exporting the
/// statics and importing everything. `gr`: graceful restart on (else off).
fn bird_conf(i: usize, v4: &[&str], v6: &[&str], gr: bool) -> String {
    let rid = client_v4(i);
    let v6addr = client_v6(i);
    let routes4: String = v4
        .iter()
        .map(|p| format!(" route {p} blackhole;"))
        .collect();
    let routes6: String = v6
        .iter()
        .map(|p| format!(" route {p} blackhole;"))
        .collect();
    let gr = if gr {
        "graceful restart on; graceful restart time 120;"
    } else {
        "graceful restart off;"
    };
    format!(
        r#"
router id {rid};
log stderr all;
protocol device {{ }}
protocol direct {{ ipv4; ipv6; }}
protocol static s4 {{ ipv4;{routes4} }}
protocol static s6 {{ ipv6;{routes6} }}
protocol bgp rr4 {{
  local {rid} as {RR_AS};
  neighbor {RR_V4} as {RR_AS};
  hold time 6;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  {gr}
  ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
protocol bgp rr6 {{
  local {v6addr} as {RR_AS};
  neighbor {RR_V6} as {RR_AS};
  hold time 6;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  {gr}
  ipv6 {{ import all; export where source = RTS_STATIC; }};
}}
"#
    )
}

/// GoBGP as client `i`, IPv4 session carrying IPv4 and IPv6 unicast, with a TCP MD5 password.
fn gobgp_conf(i: usize, password: &str) -> String {
    let a = client_v4(i);
    format!(
        r#"
[global.config]
  as = {RR_AS}
  router-id = "{a}"
  local-address-list = ["{a}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{RR_V4}"
    peer-as = {RR_AS}
    auth-password = "{password}"
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 6
    keepalive-interval = 2
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#
    )
}

/// FRR as client `i`: an IPv4 session (IPv4 unicast) and an IPv6 session (IPv6 unicast); `networks4` are
/// originated.
fn frr_conf(i: usize, networks4: &[&str]) -> String {
    let rid = client_v4(i);
    let nets: String = networks4
        .iter()
        .map(|n| format!("  network {n}\n"))
        .collect();
    format!(
        r#"
hostname frr
log stdout informational
router bgp {RR_AS}
 bgp router-id {rid}
 no bgp ebgp-requires-policy
 no bgp network import-check
 no bgp default ipv4-unicast
 neighbor {RR_V4} remote-as {RR_AS}
 neighbor {RR_V4} timers 2 6
 neighbor {RR_V4} timers connect 1
 neighbor {RR_V6} remote-as {RR_AS}
 neighbor {RR_V6} timers 2 6
 neighbor {RR_V6} timers connect 1
 address-family ipv4 unicast
{nets}  neighbor {RR_V4} activate
 exit-address-family
 address-family ipv6 unicast
  neighbor {RR_V6} activate
 exit-address-family
"#
    )
}

// ------------------------------------------------------------------ observations

/// margay's status entry for `addr` once it is up.
fn wait_up(rr: &Reflector, addr: &str) -> Value {
    wait_for(&format!("margay's session with {addr} up"), LIMIT, || {
        let p = rr.peer(addr)?;
        if p["state"] == "up" {
            Ok(p)
        } else {
            Err(format!("{p:#}\n{}", rr.status_table()))
        }
    })
}

/// GoBGP's path for `prefix` (IPv4 or IPv6 table), if it holds one.
fn gobgp_path(g: &GoBgp, afi: &str, prefix: &str) -> Result<Value, String> {
    let out = g.gobgp(&format!("global rib -a {afi} -j"));
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    v.get(prefix)
        .and_then(|ps| ps.as_array())
        .and_then(|ps| ps.first().cloned())
        .ok_or_else(|| format!("GoBGP has no {prefix}: {out}"))
}

/// The GoBGP attribute of `type_code` in a path.
fn gobgp_attr(path: &Value, type_code: u64) -> Option<&Value> {
    path["attrs"]
        .as_array()?
        .iter()
        .find(|a| a["type"].as_u64() == Some(type_code))
}

/// FRR's paths for `prefix` in `afi` ("ipv4" / "ipv6"), if it holds any.
fn frr_paths(f: &Frr, afi: &str, prefix: &str) -> Result<Vec<Value>, String> {
    let out = f.vtysh(&format!("show bgp {afi} unicast {prefix} json"));
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    match v["paths"].as_array() {
        Some(p) if !p.is_empty() => Ok(p.clone()),
        _ => Err(format!("FRR has no {prefix}: {out}")),
    }
}

fn bird_has(b: &Bird, prefix: &str) -> Result<String, String> {
    let out = b.birdc(&format!("show route {prefix} all"));
    if out.contains(prefix.split('/').next().unwrap_or(prefix)) && out.contains("BGP") {
        Ok(out)
    } else {
        Err(out)
    }
}

/// Check RFC 4456 attributes and the unchanged next hop of a path as GoBGP holds it.
fn check_gobgp_reflected(path: &Value, originator: &str, next_hop: &str) -> Result<(), String> {
    let orig = gobgp_attr(path, 9).ok_or_else(|| format!("no ORIGINATOR_ID: {path}"))?;
    let cl = gobgp_attr(path, 10).ok_or_else(|| format!("no CLUSTER_LIST: {path}"))?;
    if orig["value"] != originator {
        return Err(format!("ORIGINATOR_ID {} != {originator}", orig["value"]));
    }
    if cl["value"] != serde_json::json!([RR_CLUSTER_ID]) {
        return Err(format!("CLUSTER_LIST {} != [{RR_CLUSTER_ID}]", cl["value"]));
    }
    // IPv4: NEXT_HOP (3); IPv6: MP_REACH_NLRI (14).
    let nh = gobgp_attr(path, 3)
        .or_else(|| gobgp_attr(path, 14))
        .ok_or_else(|| format!("no next hop: {path}"))?;
    if nh["nexthop"] != next_hop {
        return Err(format!("next hop {} != {next_hop}: {path}", nh["nexthop"]));
    }
    Ok(())
}

fn check_frr_reflected(paths: &[Value], originator: &str, next_hop: &str) -> Result<(), String> {
    let p = &paths[0];
    if p["originatorId"] != originator {
        return Err(format!("originatorId != {originator}: {p:#}"));
    }
    if p["clusterList"]["list"] != serde_json::json!([RR_CLUSTER_ID]) {
        return Err(format!("clusterList != [{RR_CLUSTER_ID}]: {p:#}"));
    }
    let nh = p["nexthops"][0]["ip"].clone();
    if nh != next_hop {
        return Err(format!("next hop {nh} != {next_hop}: {p:#}"));
    }
    Ok(())
}

fn frr_neighbor(f: &Frr, addr: &str) -> Value {
    let out = f.vtysh(&format!("show bgp neighbors {addr} json"));
    serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v.get(addr).cloned())
        .unwrap_or(Value::Null)
}

// ------------------------------------------------------------------ tests

/// ```text
///   BIRD c1 10.1.0.2 / fd01::2 ──┐                        ┌── GoBGP c2 10.1.0.3 (MD5 "rr-md5")
///   static 192.0.2.0/24          ├── margay rr 10.1.0.1 ──┤
///          198.51.100.0/24       │   cluster id 1.1.1.1   └── FRR c3 10.1.0.4 / fd01::4
///          2001:db8:1::/48 ──────┘   all iBGP AS 4200000001, every client an RR client
///   expect at GoBGP and FRR: BIRD's prefixes, ORIGINATOR_ID 10.1.0.2, CLUSTER_LIST [1.1.1.1],
///   next hop 10.1.0.2 / fd01::2 (unchanged); then 198.51.100.0/24 removed from BIRD: gone from both.
/// ```
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn reflects_bird_routes_to_gobgp_and_frr_and_withdraws() {
    let t = "reflects_bird_routes_to_gobgp_and_frr_and_withdraws";
    if !prereqs(t) {
        return;
    }
    let star = Star::new("rf", 3);
    let cfg = config_head()
        + &bgp_peer("bird4", &client_v4(1), RR_AS, "")
        + &bgp_peer("bird6", &client_v6(1), RR_AS, "")
        + &password_secret("bgp-secrets", "gobgp", "rr-md5")
        + &bgp_peer(
            "gobgp",
            &client_v4(2),
            RR_AS,
            &password_ref("bgp-secrets", "gobgp"),
        )
        + &bgp_peer("frr4", &client_v4(3), RR_AS, "")
        + &bgp_peer("frr6", &client_v6(3), RR_AS, "");
    let rr = Reflector::start(&star.hub, &cfg);
    let v4 = ["192.0.2.0/24", "198.51.100.0/24"];
    let v6 = ["2001:db8:1::/48"];
    let bird = Bird::start(star.ns(1), &bird_conf(1, &v4, &v6, true));
    let gobgp = GoBgp::start(star.ns(2), &gobgp_conf(2, "rr-md5"));
    let frr = Frr::start(star.ns(3), &frr_conf(3, &[]));

    // Sessions: margay's view, then each peer's own.
    for a in [
        client_v4(1),
        client_v6(1),
        client_v4(2),
        client_v4(3),
        client_v6(3),
    ] {
        let p = wait_up(&rr, &a);
        assert_eq!(p["peerType"], "global", "{p:#}");
        assert_eq!(p["asn"], RR_AS, "{p:#}");
    }
    wait_for("BIRD's sessions Established", LIMIT, || {
        let out = bird.birdc("show protocols");
        let up = out.lines().filter(|l| l.contains("Established")).count();
        if up == 2 {
            Ok(())
        } else {
            Err(out)
        }
    });
    wait_for("GoBGP's neighbor Established", LIMIT, || {
        let out = gobgp.gobgp("neighbor");
        if out.contains(RR_V4) && out.contains("Establ") {
            Ok(())
        } else {
            Err(out)
        }
    });
    wait_for("FRR's neighbors Established", LIMIT, || {
        let out = frr.vtysh("show bgp summary json");
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let s4 = &v["ipv4Unicast"]["peers"][RR_V4]["state"];
        let s6 = &v["ipv6Unicast"]["peers"][RR_V6]["state"];
        if s4 == "Established" && s6 == "Established" {
            Ok(())
        } else {
            Err(out)
        }
    });

    // Reflection with RFC 4456 attributes, next hop unchanged.
    let bird_v4 = client_v4(1);
    let bird_v6 = client_v6(1);
    for p in v4 {
        wait_for(&format!("GoBGP to hold {p} reflected"), LIMIT, || {
            check_gobgp_reflected(&gobgp_path(&gobgp, "ipv4", p)?, &bird_v4, &bird_v4)
        });
        wait_for(&format!("FRR to hold {p} reflected"), LIMIT, || {
            check_frr_reflected(&frr_paths(&frr, "ipv4", p)?, &bird_v4, &bird_v4)
        });
    }
    wait_for("GoBGP to hold 2001:db8:1::/48 reflected", LIMIT, || {
        check_gobgp_reflected(&gobgp_path(&gobgp, "ipv6", v6[0])?, &bird_v4, &bird_v6)
    });
    wait_for("FRR to hold 2001:db8:1::/48 reflected", LIMIT, || {
        check_frr_reflected(&frr_paths(&frr, "ipv6", v6[0])?, &bird_v4, &bird_v6)
    });
    // margay's counters: BIRD's IPv4 session sent 2 prefixes, GoBGP and FRR were sent them.
    let p = wait_for("margay's prefix counters", LIMIT, || {
        let b = rr.peer(&bird_v4)?;
        let g = rr.peer(&client_v4(2))?;
        // GoBGP's one session carries both families: 2 IPv4 + 1 IPv6 prefixes.
        if b["prefixesReceived"] == 2 && b["prefixesAccepted"] == 2 && g["prefixesAdvertised"] == 3
        {
            Ok((b, g))
        } else {
            Err(format!("{b:#}\n{g:#}"))
        }
    });
    assert_eq!(p.0["prefixesAdvertised"], 0, "split horizon: {:#}", p.0);

    // Withdrawal: BIRD loses one static route.
    std::fs::write(
        bird.path("bird.conf"),
        bird_conf(1, &["192.0.2.0/24"], &v6, true),
    )
    .expect("write bird.conf");
    let out = bird.birdc("configure");
    assert!(out.contains("Reconfigured"), "birdc configure: {out}");
    wait_for(
        "198.51.100.0/24 gone from GoBGP",
        LIMIT,
        || match gobgp_path(&gobgp, "ipv4", "198.51.100.0/24") {
            Err(_) => Ok(()),
            Ok(p) => Err(p.to_string()),
        },
    );
    wait_for("198.51.100.0/24 gone from FRR", LIMIT, || {
        match frr_paths(&frr, "ipv4", "198.51.100.0/24") {
            Err(_) => Ok(()),
            Ok(p) => Err(format!("{p:?}")),
        }
    });
    // The other route stays.
    gobgp_path(&gobgp, "ipv4", "192.0.2.0/24").expect("192.0.2.0/24 still at GoBGP");
    frr_paths(&frr, "ipv4", "192.0.2.0/24").expect("192.0.2.0/24 still at FRR");

    // ROUTE-REFRESH (RFC 2918): FRR asks for margay's IPv4 routes again (soft in, no stored copy);
    // margay answers with its Adj-RIB-Out for FRR: more UPDATEs arrive, the route is still there.
    let updates = |f: &Frr| frr_neighbor(f, RR_V4)["messageStats"]["updatesRecv"].as_u64();
    let before = updates(&frr).expect("FRR's updatesRecv");
    let out = frr.vtysh(&format!("clear bgp ipv4 unicast {RR_V4} soft in"));
    assert!(!out.contains('%'), "clear soft in: {out}");
    wait_for("margay to answer FRR's route refresh", LIMIT, || {
        let n = updates(&frr).unwrap_or(0);
        if n > before {
            Ok(())
        } else {
            Err(format!(
                "updatesRecv {n} (before {before}): {:#}",
                frr_neighbor(&frr, RR_V4)
            ))
        }
    });
    check_frr_reflected(
        &frr_paths(&frr, "ipv4", "192.0.2.0/24").expect("192.0.2.0/24 at FRR after the refresh"),
        &bird_v4,
        &bird_v4,
    )
    .expect("192.0.2.0/24 as before");
    let g = rr.peer(&client_v4(3)).expect("FRR at margay");
    assert_eq!(g["state"], "up", "{g:#}");
    assert_eq!(
        g["prefixesAdvertised"], 1,
        "the counter counts prefixes once: {g:#}"
    );
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

fn gone<T: std::fmt::Debug>(r: Result<T, String>) -> Result<(), String> {
    match r {
        Err(_) => Ok(()),
        Ok(v) => Err(format!("still there: {v:?}")),
    }
}

/// ```text
///   BIRD c1 10.1.0.2 (GR on) ──┐                        ┌── GoBGP c2 10.1.0.3 (no GR), originates
///   static 192.0.2.0/24        ├── margay rr 10.1.0.1 ──┤      203.0.113.0/24
///          198.51.100.0/24 ────┘                        └── FRR c3 10.1.0.4
///   1. GoBGP SIGKILLed: 203.0.113.0/24 withdrawn from BIRD and FRR.
///   2. BIRD SIGKILLed: its prefixes stay (stale) at FRR while it is down; BIRD restarts with -R and
///      without 198.51.100.0/24: 192.0.2.0/24 stays, 198.51.100.0/24 is swept after BIRD's End-of-RIB.
/// ```
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn killed_peer_withdrawn_and_graceful_restart_peer_kept() {
    let t = "killed_peer_withdrawn_and_graceful_restart_peer_kept";
    if !prereqs(t) {
        return;
    }
    let star = Star::new("rk", 3);
    let cfg = config_head()
        + &bgp_peer("bird4", &client_v4(1), RR_AS, "")
        + &bgp_peer("bird6", &client_v6(1), RR_AS, "")
        + &bgp_peer("gobgp", &client_v4(2), RR_AS, "")
        + &bgp_peer("frr4", &client_v4(3), RR_AS, "");
    let rr = Reflector::start(&star.hub, &cfg);
    let v4 = ["192.0.2.0/24", "198.51.100.0/24"];
    let mut bird = Bird::start(star.ns(1), &bird_conf(1, &v4, &[], true));
    let gobgp = GoBgp::start(star.ns(2), &gobgp_conf(2, ""));
    let frr = Frr::start(star.ns(3), &frr_conf(3, &[]));
    let out = gobgp.gobgp("global rib add 203.0.113.0/24 -a ipv4");
    assert!(!out.contains("rror"), "gobgp global rib add: {out}");
    wait_for("203.0.113.0/24 at BIRD and FRR", LIMIT, || {
        bird_has(&bird, "203.0.113.0/24")?;
        check_frr_reflected(
            &frr_paths(&frr, "ipv4", "203.0.113.0/24")?,
            &client_v4(2),
            &client_v4(2),
        )
    });
    for p in v4 {
        wait_for(&format!("{p} at FRR"), LIMIT, || frr_paths(&frr, "ipv4", p));
    }

    // 1. GoBGP crashes; it has no graceful restart, so its route goes at once.
    sigkill(gobgp.pid());
    wait_for("margay to see GoBGP down", LIMIT, || {
        let p = rr.peer(&client_v4(2))?;
        if p["state"] != "up" {
            Ok(())
        } else {
            Err(p.to_string())
        }
    });
    wait_for("203.0.113.0/24 gone from BIRD and FRR", LIMIT, || {
        gone(bird_has(&bird, "203.0.113.0/24"))?;
        gone(frr_paths(&frr, "ipv4", "203.0.113.0/24"))
    });

    // 2. BIRD crashes with graceful restart negotiated: margay keeps its routes as a helper.
    bird.kill();
    wait_for("margay to see BIRD down", LIMIT, || {
        let p = rr.peer(&client_v4(1))?;
        if p["state"] != "up" {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    });
    for p in v4 {
        frr_paths(&frr, "ipv4", p)
            .unwrap_or_else(|e| panic!("{p} must stay at FRR while BIRD restarts: {e}"));
    }
    std::fs::write(
        bird.path("bird.conf"),
        bird_conf(1, &["192.0.2.0/24"], &[], true),
    )
    .expect("write bird.conf");
    bird.restart_with_args(&["-R"]);
    wait_up(&rr, &client_v4(1));
    wait_for(
        "198.51.100.0/24 swept from FRR after BIRD's End-of-RIB",
        LIMIT,
        || gone(frr_paths(&frr, "ipv4", "198.51.100.0/24")),
    );
    check_frr_reflected(
        &frr_paths(&frr, "ipv4", "192.0.2.0/24").expect("192.0.2.0/24 at FRR after the restart"),
        &client_v4(1),
        &client_v4(1),
    )
    .expect("192.0.2.0/24 refreshed");
    drop(star);
}

/// ```text
///   BIRD c1 10.1.0.2 AS 4200000001 ──┐                         ┌── GoBGP c2 10.1.0.3, MD5 "right"
///   margay expects AS 65099          ├── margay rr 10.1.0.1 ───┘   margay has password "wrong"
///   expect: both sessions stay down; margay status INFO "bad peer AS 4200000001, expected 65099" and
///   "connect: ..." for the password; neither peer shows Established.
/// ```
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn wrong_as_and_wrong_password_keep_sessions_down() {
    let t = "wrong_as_and_wrong_password_keep_sessions_down";
    if !prereqs(t) {
        return;
    }
    let star = Star::new("rw", 2);
    let cfg = config_head()
        + &bgp_peer("bird4", &client_v4(1), 65099, "")
        + &password_secret("bgp-secrets", "gobgp", "wrong")
        + &bgp_peer(
            "gobgp",
            &client_v4(2),
            RR_AS,
            &password_ref("bgp-secrets", "gobgp"),
        );
    let rr = Reflector::start(&star.hub, &cfg);
    let bird = Bird::start(star.ns(1), &bird_conf(1, &["192.0.2.0/24"], &[], false));
    let gobgp = GoBgp::start(star.ns(2), &gobgp_conf(2, "right"));
    let info = wait_for("margay to say why BIRD is down", LIMIT, || {
        let p = rr.peer(&client_v4(1))?;
        let info = p["info"].as_str().unwrap_or_default().to_string();
        if info.contains("bad peer AS 4200000001, expected 65099") {
            Ok(info)
        } else {
            Err(format!("{p:#}"))
        }
    });
    assert!(info.contains(&client_v4(1)), "{info}");
    let info = wait_for("margay to say why GoBGP is down", LIMIT, || {
        let p = rr.peer(&client_v4(2))?;
        let info = p["info"].as_str().unwrap_or_default().to_string();
        if info.starts_with("connect: ") {
            Ok(info)
        } else {
            Err(format!("{p:#}"))
        }
    });
    eprintln!("wrong password INFO: {info}");
    for a in [client_v4(1), client_v4(2)] {
        let p = rr.peer(&a).expect("peer in status");
        assert_ne!(p["state"], "up", "{p:#}");
    }
    assert!(
        !bird.birdc("show protocols").contains("Established"),
        "{}",
        bird.birdc("show protocols")
    );
    assert!(!gobgp.gobgp("neighbor").contains("Establ"));
    let table = rr.status_table();
    assert!(
        table.contains("bad peer AS 4200000001, expected 65099"),
        "{table}"
    );
}

fn bird_established(b: &Bird, proto: &str) -> Result<String, String> {
    let out = b.birdc(&format!("show protocols {proto}"));
    if out.contains("Established") {
        Ok(out)
    } else {
        Err(out)
    }
}

/// ```text
///   BIRD c1 10.1.0.2 (GR on) ──── margay rr 10.1.0.1 ──── FRR c2 10.1.0.3 originates 203.0.113.0/24
///   state dir kept across runs
///   expect: BIRD holds 203.0.113.0/24 (reflected by margay); margay SIGTERMed: BIRD keeps it while margay
///   is away; margay started again (announcing the restart): sessions back, BIRD still holds it, fresh.
/// ```
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn margay_restart_bird_keeps_reflected_routes() {
    let t = "margay_restart_bird_keeps_reflected_routes";
    if !prereqs(t) {
        return;
    }
    let star = Star::new("rg", 2);
    let cfg = config_head()
        + &bgp_peer("bird4", &client_v4(1), RR_AS, "")
        + &bgp_peer("frr4", &client_v4(2), RR_AS, "");
    let mut rr = Reflector::start(&star.hub, &cfg);
    // BIRD with only its IPv4 session (margay has no IPv6 peer for it here).
    let conf = bird_conf(1, &["192.0.2.0/24"], &[], true);
    let conf = conf[..conf.find("protocol bgp rr6").expect("rr6")].to_string();
    let bird = Bird::start(star.ns(1), &conf);
    let _frr = Frr::start(star.ns(2), &frr_conf(2, &["203.0.113.0/24"]));
    wait_for("BIRD to hold 203.0.113.0/24 from margay", LIMIT, || {
        bird_has(&bird, "203.0.113.0/24")
    });
    rr.terminate();
    wait_for("BIRD to see margay gone", LIMIT, || {
        gone(bird_established(&bird, "rr4"))
    });
    let held = bird_has(&bird, "203.0.113.0/24")
        .unwrap_or_else(|e| panic!("BIRD must keep margay's route while margay restarts: {e}"));
    eprintln!("while margay is away:\n{held}");
    rr.start_again();
    wait_up(&rr, &client_v4(1));
    wait_up(&rr, &client_v4(2));
    wait_for("BIRD Established with margay again", LIMIT, || {
        bird_established(&bird, "rr4")
    });
    // After margay's End-of-RIB BIRD's copy is fresh again (not stale) and still there.
    wait_for("BIRD to hold 203.0.113.0/24, not stale", LIMIT, || {
        let out = bird_has(&bird, "203.0.113.0/24")?;
        if out.contains("stale") {
            Err(out)
        } else {
            Ok(())
        }
    });
    assert!(
        rr.log().contains("restart"),
        "margay's second run: {}",
        rr.log()
    );
}

/// ```text
///   before SIGHUP: margay peers BIRD c1 10.1.0.2, FRR c2 10.1.0.3      (GoBGP c3 10.1.0.4 waiting)
///   after SIGHUP:  margay peers FRR c2 (same settings), GoBGP c3       (BIRD removed)
///   expect: GoBGP up, BIRD down, FRR's session not reset (FRR's connectionsEstablished and margay's
///   since unchanged); then a bad file on SIGHUP: refused, the log names the document and the field,
///   peers unchanged.
/// ```
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn sighup_adds_and_removes_peers_without_resetting_others() {
    let t = "sighup_adds_and_removes_peers_without_resetting_others";
    if !prereqs(t) {
        return;
    }
    let star = Star::new("rh", 3);
    let bird_peer = bgp_peer("bird4", &client_v4(1), RR_AS, "");
    let frr_peer = bgp_peer("frr4", &client_v4(2), RR_AS, "");
    let gobgp_peer = bgp_peer("gobgp", &client_v4(3), RR_AS, "");
    let rr = Reflector::start(&star.hub, &(config_head() + &bird_peer + &frr_peer));
    let conf = bird_conf(1, &["192.0.2.0/24"], &[], false);
    let conf = conf[..conf.find("protocol bgp rr6").expect("rr6")].to_string();
    let bird = Bird::start(star.ns(1), &conf);
    let frr = Frr::start(star.ns(2), &frr_conf(2, &["203.0.113.0/24"]));
    let gobgp = GoBgp::start(star.ns(3), &gobgp_conf(3, ""));
    wait_up(&rr, &client_v4(1));
    let frr_before = wait_up(&rr, &client_v4(2));
    wait_for("FRR to hold 192.0.2.0/24", LIMIT, || {
        frr_paths(&frr, "ipv4", "192.0.2.0/24")
    });
    let established = |f: &Frr| frr_neighbor(f, RR_V4)["connectionsEstablished"].clone();
    let frr_count = established(&frr);
    assert_eq!(frr_count, 1, "{:#}", frr_neighbor(&frr, RR_V4));

    rr.write_config(&(config_head() + &frr_peer + &gobgp_peer));
    rr.signal(nix::sys::signal::Signal::SIGHUP);
    wait_up(&rr, &client_v4(3));
    wait_for("BIRD removed from margay", LIMIT, || {
        gone(rr.peer(&client_v4(1)))?;
        gone(bird_established(&bird, "rr4"))
    });
    wait_for("GoBGP to hold FRR's 203.0.113.0/24", LIMIT, || {
        gobgp_path(&gobgp, "ipv4", "203.0.113.0/24")
    });
    wait_for("192.0.2.0/24 gone from FRR with BIRD", LIMIT, || {
        gone(frr_paths(&frr, "ipv4", "192.0.2.0/24"))
    });
    let frr_after = wait_up(&rr, &client_v4(2));
    assert_eq!(
        frr_after["since"], frr_before["since"],
        "FRR's session reset"
    );
    assert_eq!(established(&frr), frr_count, "FRR's session reset");

    // A bad file: document 3 (the BGPPeer for FRR) has a bad peerIP.
    rr.write_config(&(config_head() + &bgp_peer("frr4", "10.1.0.300", RR_AS, "") + &gobgp_peer));
    rr.signal(nix::sys::signal::Signal::SIGHUP);
    let line = wait_for("margay to refuse the bad file", LIMIT, || {
        rr.log()
            .lines()
            .find(|l| l.contains("configuration refused"))
            .map(str::to_string)
            .ok_or_else(|| rr.log())
    });
    assert!(line.contains("document 3"), "{line}");
    assert!(line.contains("peerIP"), "{line}");
    assert!(line.contains("10.1.0.300"), "{line}");
    let frr_now = wait_up(&rr, &client_v4(2));
    assert_eq!(frr_now["since"], frr_before["since"], "FRR's session reset");
    wait_up(&rr, &client_v4(3));
    assert_eq!(established(&frr), frr_count, "FRR's session reset");
    gobgp_path(&gobgp, "ipv4", "203.0.113.0/24").expect("GoBGP keeps FRR's route");
}

/// BIRD client `i` on IPv4 only, as Calico configures it (`gateway recursive`, graceful restart), with
/// `v4` as static routes. `add_paths`: the ADD-PATH option of its channel (`add paths rx` / `on`, or
/// nothing); its kernel protocol exports with `merge paths on`, so an ECMP set reaches the kernel whole.
fn bird_v4_conf(i: usize, v4: &[&str], add_paths: &str) -> String {
    let rid = client_v4(i);
    let routes: String = v4
        .iter()
        .map(|p| format!(" route {p} blackhole;"))
        .collect();
    format!(
        r#"
router id {rid};
log stderr all;
protocol device {{ }}
protocol direct {{ ipv4; }}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; merge paths on; }}
protocol static s4 {{ ipv4;{routes} }}
protocol bgp rr4 {{
  local {rid} as {RR_AS};
  neighbor {RR_V4} as {RR_AS};
  hold time 6;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  graceful restart on;
  ipv4 {{ import all; export where source = RTS_STATIC; gateway recursive; {add_paths} }};
}}
"#
    )
}

/// ADD-PATH send (RFC 7911), as Calico's BIRD has it (`add paths on`):
/// ```text
///   BIRD c1 10.1.0.2 static 192.0.2.0/24 ──┐                         ┌── BIRD c3 10.1.0.4 `add paths rx`
///                                          ├── margay rr 10.1.0.1 ───┤     kernel: 192.0.2.0/24
///   BIRD c2 10.1.0.3 static 192.0.2.0/24 ──┘   (every client an RR   │       nexthop via 10.1.0.2
///                                               client, iBGP)        │       nexthop via 10.1.0.3
///                                                                    └── GoBGP c4 10.1.0.5 (no ADD-PATH)
///   expect: c3 holds two BGP paths (next hops 10.1.0.2, 10.1.0.3) and its kernel both next hops;
///   GoBGP holds one path; c1 withdraws: c3 keeps exactly c2's path, kernel one next hop.
/// ```
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn add_path_reflects_both_origins_to_a_bird_client_and_its_kernel() {
    let t = "add_path_reflects_both_origins_to_a_bird_client_and_its_kernel";
    if !prereqs(t) {
        return;
    }
    let star = Star::new("ap", 4);
    let cfg = config_head()
        + &bgp_peer("c1", &client_v4(1), RR_AS, "")
        + &bgp_peer("c2", &client_v4(2), RR_AS, "")
        + &bgp_peer("c3", &client_v4(3), RR_AS, "")
        + &password_secret("bgp-secrets", "gobgp", "rr-md5")
        + &bgp_peer(
            "c4",
            &client_v4(4),
            RR_AS,
            &password_ref("bgp-secrets", "gobgp"),
        );
    let rr = Reflector::start(&star.hub, &cfg);
    let prefix = "192.0.2.0/24";
    let c1 = Bird::start(star.ns(1), &bird_v4_conf(1, &[prefix], ""));
    let _c2 = Bird::start(star.ns(2), &bird_v4_conf(2, &[prefix], ""));
    let c3 = Bird::start(star.ns(3), &bird_v4_conf(3, &[], "add paths rx;"));
    let gobgp = GoBgp::start(star.ns(4), &gobgp_conf(4, "rr-md5"));
    for i in 1..=4 {
        wait_up(&rr, &client_v4(i));
    }
    let paths_at_c3 = || {
        let out = c3.birdc(&format!("show route {prefix} all"));
        let n = out.matches("[rr4").count();
        (n, out)
    };
    let out = wait_for("c3 to hold two paths of 192.0.2.0/24", LIMIT, || {
        let (n, out) = paths_at_c3();
        if n == 2 && out.contains("10.1.0.2") && out.contains("10.1.0.3") {
            Ok(out)
        } else {
            Err(format!(
                "{n} paths:\n{out}\n{}",
                c3.birdc("show protocols all rr4")
            ))
        }
    });
    eprintln!("c3:\n{out}");
    let kernel = || crate::common::try_sh(&format!("ip -n {} route show {prefix}", star.ns(3))).1;
    wait_for("c3's kernel to get both next hops", LIMIT, || {
        let k = kernel();
        if k.contains("nexthop via 10.1.0.2") && k.contains("nexthop via 10.1.0.3") {
            Ok(())
        } else {
            Err(k)
        }
    });
    // GoBGP did not offer ADD-PATH: one path, the best (lower ORIGINATOR_ID: c1).
    let g = wait_for("GoBGP to hold one path", LIMIT, || {
        let out = gobgp.gobgp("global rib -a ipv4 -j");
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        match v.get(prefix).and_then(|p| p.as_array()) {
            Some(p) if !p.is_empty() => Ok(p.clone()),
            _ => Err(out),
        }
    });
    assert_eq!(
        g.len(),
        1,
        "one path towards a peer without ADD-PATH: {g:#?}"
    );
    check_gobgp_reflected(&g[0], &client_v4(1), &client_v4(1)).expect("c1's path");
    let c3_peer = rr.peer(&client_v4(3)).expect("c3 at margay");
    assert_eq!(
        c3_peer["prefixesAdvertised"], 2,
        "two paths to c3: {c3_peer:#}"
    );

    // c1 withdraws its origin: c3 keeps c2's path alone, its kernel one next hop.
    std::fs::write(c1.path("bird.conf"), bird_v4_conf(1, &[], "")).expect("write bird.conf");
    let out = c1.birdc("configure");
    assert!(out.contains("Reconfigured"), "birdc configure: {out}");
    wait_for("c3 to keep only c2's path", LIMIT, || {
        let (n, out) = paths_at_c3();
        if n == 1 && out.contains("10.1.0.3") && !out.contains("via 10.1.0.2") {
            Ok(())
        } else {
            Err(format!("{n} paths:\n{out}"))
        }
    });
    wait_for("c3's kernel to keep only 10.1.0.3", LIMIT, || {
        let k = kernel();
        if k.contains("via 10.1.0.3") && !k.contains("10.1.0.2") {
            Ok(())
        } else {
            Err(k)
        }
    });
}

/// `reflector::run_with` runs a reflector inside the test's process (as mini-redis's `server::run`): on
/// listeners the test bound to port 0, until a shutdown future the test completes. No root, no daemon: its
/// /healthz answers on the given HTTP listener, its BGP listener answers the configured peer's connection
/// with an OPEN, and completing the future ends the run cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_runs_in_process_on_given_listeners_until_shut_down() {
    use clap::Parser;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: margay::reflector::ReflectorArgs,
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("rr.yaml");
    std::fs::write(
        &config,
        config_head() + &bgp_peer("local", "127.0.0.2", RR_AS, ""),
    )
    .expect("write config");
    let state = dir.path().join("state");
    let args = Cli::parse_from([
        "reflector".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--node-name".as_ref(),
        "rr".as_ref(),
        "--router-id".as_ref(),
        RR_ROUTER_ID.as_ref(),
        "--cluster-id".as_ref(),
        RR_CLUSTER_ID.as_ref(),
    ])
    .args;
    let bgp = margay::bgp::session::Listener::bind(&["127.0.0.1:0".parse().expect("addr")])
        .await
        .expect("BGP listener");
    let bgp_addr = bgp.local_addrs()[0];
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("HTTP listener");
    let http_addr = http.local_addr().expect("HTTP address");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(margay::reflector::run_with(
        args,
        margay::reflector::Listeners {
            bgp: Some(bgp),
            http: Some(http),
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(http_addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: rr\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    let mut last = None;
    for _ in 0..100 {
        assert!(!run.is_finished(), "the reflector stopped early");
        last = get("/healthz").await;
        if last
            .as_deref()
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        last.as_deref()
            .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "/healthz on the given listener: {last:?}"
    );

    // The configured peer connects to the given BGP listener and is answered with an OPEN.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut conn = sock
        .connect(bgp_addr)
        .await
        .expect("connect to the reflector");
    let mut header = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut header))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    assert_eq!(header[18], 1, "OPEN: {header:?}");

    stop_tx.send(()).expect("the run is waiting");
    let ended = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the run ends once the shutdown future completes")
        .expect("no panic");
    assert!(ended.is_ok(), "{ended:?}");
}
