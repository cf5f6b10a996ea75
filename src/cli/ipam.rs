//! `margay ipam show | check | release`: the text calicoctl prints, from `ipam::ops`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use super::table::Table;
use super::CliError;
use crate::datastore::Datastore;
use crate::ipam::block::now_ms;
use crate::ipam::liveness::{self, GcReport, NodeLiveness};
use crate::ipam::ops::{self, CheckReport};
use crate::ipam::View;

fn pct(part: u128, total: u128) -> String {
    if total == 0 {
        return "0%".into();
    }
    format!("{}%", part * 100 / total)
}

/// `ipam show [--show-blocks] [--show-borrowed]`.
pub async fn show(
    ds: &Datastore,
    show_blocks: bool,
    show_borrowed: bool,
) -> Result<String, CliError> {
    let snap = ops::snapshot(ds).await?;
    let (pools, borrowed) = ops::usage(&snap);
    let mut t = Table::new(&["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"]);
    for p in &pools {
        let free = p.total - p.in_use;
        t.row(vec![
            "IP Pool".into(),
            p.cidr.to_string(),
            p.total.to_string(),
            format!("{} ({})", p.in_use, pct(p.in_use, p.total)),
            format!("{} ({})", free, pct(free, p.total)),
        ]);
        if show_blocks {
            for b in &p.blocks {
                let free = b.total - b.in_use;
                t.row(vec![
                    "Block".into(),
                    b.cidr.to_string(),
                    b.total.to_string(),
                    format!("{} ({})", b.in_use, pct(b.in_use, b.total)),
                    format!("{} ({})", free, pct(free, b.total)),
                ]);
            }
        }
    }
    let mut out = t.render();
    out.push_str(&churn_summary(ds, &snap).await?);
    if show_borrowed {
        let mut t = Table::new(&[
            "IP",
            "BORROWING-NODE",
            "BLOCK",
            "BLOCK OWNER",
            "TYPE",
            "ALLOCATED-TO",
        ]);
        for b in &borrowed {
            t.row(vec![
                b.ip.to_string(),
                b.borrowing_node.clone(),
                b.block.to_string(),
                b.block_owner.clone(),
                b.kind.clone(),
                b.allocated_to.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    Ok(out)
}

/// `ipam show --ip ADDR`: whether the address is in use, and by what (block, owner node, handle, attributes).
pub async fn show_ip(ds: &Datastore, ip: IpAddr) -> Result<String, CliError> {
    let snap = ops::snapshot(ds).await?;
    let Some((cidr, b)) = snap.blocks.iter().find(|(c, _)| c.contains(ip)) else {
        return Ok(format!(
            "IP {ip} is not assigned (no IPAM block holds it)\n"
        ));
    };
    let Some(attr) = b
        .ordinal(ip)
        .ok()
        .and_then(|o| b.allocations.get(o).copied().flatten())
        .and_then(|a| b.attributes.get(a))
    else {
        return Ok(format!("IP {ip} is not assigned (block {cidr})\n"));
    };
    let mut out = format!(
        "IP {ip} is in use\nBlock: {cidr} (affine to {})\nHandle: {}\nAttributes:\n",
        b.host().unwrap_or("no node"),
        attr.handle_id.as_deref().unwrap_or("(none)")
    );
    for (k, v) in attr.secondary.iter().flatten() {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    Ok(out)
}

/// Empty blocks, addresses cooling down, nodes without liveness.
async fn churn_summary(ds: &Datastore, snap: &ops::Snapshot) -> Result<String, CliError> {
    let mut view = View::default();
    if let Some(kv) = ds.get(crate::datastore::keys::IPAM_CONFIG_KEY).await? {
        view.apply_config(
            crate::datastore::WatchEventKind::Put,
            &kv.value,
            kv.mod_revision,
        );
    }
    let cd = view.cooldown_at(now_ms());
    let empty = snap.blocks.values().filter(|b| b.is_empty()).count();
    let unheld = snap
        .blocks
        .values()
        .filter(|b| b.is_empty() && b.affinity.is_none())
        .count();
    let cooling: usize = snap.blocks.values().map(|b| b.cooling_count(&cd)).sum();
    let survey = liveness::survey(ds).await?;
    let missing: Vec<String> = survey
        .without_liveness()
        .map(|n| match n.liveness {
            NodeLiveness::NoRecord => format!("{} (no liveness record)", n.name),
            _ => n.name.clone(),
        })
        .collect();
    Ok(format!(
        "Empty blocks: {empty} ({unheld} held by no node)\nAddresses cooling down: {cooling} (cooldown {:?})\nNodes without liveness: {}\n",
        view.release_cooldown(),
        if missing.is_empty() {
            "none".to_string()
        } else {
            missing.join(", ")
        }
    ))
}

/// `ipam gc [--release] [--grace D]`: the table of nodes without liveness and what was done.
pub async fn gc(ds: &Datastore, grace: Duration, release: bool) -> Result<String, CliError> {
    let r: GcReport = liveness::gc(ds, grace, release).await?;
    let now = now_ms();
    let mut t = Table::new(&["NODE", "LIVENESS", "BLOCKS", "ACTION"]);
    for n in r.without_liveness() {
        let (state, action) = match &n.liveness {
            NodeLiveness::Missing { since, releasable } => {
                let ago = Duration::from_millis(now.saturating_sub(*since)).as_secs();
                let action = match (&n.released, releasable) {
                    (Some(rr), _) => format!(
                        "released: {} affinities, {} blocks deleted, {} kept for others' addresses, {} kept cooling, {} addresses",
                        rr.affinities_deleted, rr.blocks_deleted, rr.blocks_released, rr.blocks_cooling, rr.addresses_released
                    ),
                    (None, true) => "releasable: run with --release".to_string(),
                    (None, false) => format!(
                        "wait: releasable {}s after first seen missing",
                        grace.as_secs().saturating_sub(ago)
                    ),
                };
                (format!("missing for {ago}s"), action)
            }
            NodeLiveness::NoRecord => (
                "no liveness record".to_string(),
                "never released by gc: `margay node remove` if it is gone".to_string(),
            ),
            NodeLiveness::Alive => continue,
        };
        t.row(vec![n.name.clone(), state, n.blocks.to_string(), action]);
    }
    let alive = r
        .nodes
        .iter()
        .filter(|n| n.liveness == NodeLiveness::Alive)
        .count();
    let mut out = format!("{alive} nodes alive (liveness lease held).\n");
    if r.without_liveness().next().is_some() {
        out.push_str(&t.render());
    } else {
        out.push_str("No node without liveness.\n");
    }
    if release {
        out.push_str(&format!(
            "Deleted {} empty blocks held by no node whose addresses have cooled down.\n",
            r.cooled_blocks_deleted
        ));
    }
    Ok(out)
}

/// `ipam check --live-handles F --release`: release every handle that holds addresses but is not live.
pub async fn release_leaked(ds: &Datastore, live: &BTreeSet<String>) -> Result<String, CliError> {
    let snap = ops::snapshot(ds).await?;
    let mut leaked = BTreeSet::new();
    for b in snap.blocks.values() {
        for (_, a) in b.allocated() {
            if let Some(h) = &a.handle_id {
                if !live.contains(h) {
                    leaked.insert(h.clone());
                }
            }
        }
    }
    let mut out = String::new();
    let mut n = 0;
    for h in &leaked {
        let freed = ops::release_handle(ds, None, h).await?;
        n += freed.len();
        let ips: Vec<String> = freed.iter().map(|i| i.to_string()).collect();
        out.push_str(&format!(
            "Released leaked handle {h:?}: {}\n",
            ips.join(", ")
        ));
    }
    out.push_str(&format!(
        "Released {} leaked handles ({n} addresses).\n",
        leaked.len()
    ));
    Ok(out)
}

/// `ipam check`: the report and its text (ending "found N problems").
pub async fn check(
    ds: &Datastore,
    live: Option<&BTreeSet<String>>,
) -> Result<(CheckReport, String), CliError> {
    let snap = ops::snapshot(ds).await?;
    let r = ops::check(&snap, live);
    let mut out = String::from("Checking IPAM for inconsistencies...\n\n");
    out.push_str(&format!(
        "Found {} IPAM blocks, {} handles, {} affinities, {} allocations.\n",
        r.blocks, r.handles, r.affinities, r.allocations
    ));
    if live.is_none() {
        out.push_str("Allocations in use by no container: not checked (give --live-handles).\n");
    }
    for p in &r.problems {
        out.push_str(&format!("  {p}\n"));
    }
    out.push_str(&format!(
        "Check complete; found {} problems.\n",
        r.problems.len()
    ));
    Ok((r, out))
}

/// `ipam release --ip ADDR | --handle ID`.
pub async fn release(
    ds: &Datastore,
    ip: Option<IpAddr>,
    handle: Option<&str>,
) -> Result<String, CliError> {
    match (ip, handle) {
        (Some(ip), None) => {
            let freed = ops::release_ips(ds, None, &[ip]).await?;
            Ok(if freed.is_empty() {
                format!("IP address {ip} is not allocated; nothing to release\n")
            } else {
                format!("Successfully released IP address {ip}\n")
            })
        }
        (None, Some(h)) => {
            let freed = ops::release_handle(ds, None, h).await?;
            Ok(if freed.is_empty() {
                format!("Handle {h:?} holds no address; nothing to release\n")
            } else {
                let ips: Vec<String> = freed.iter().map(|i| i.to_string()).collect();
                format!("Successfully released handle {h:?}: {}\n", ips.join(", "))
            })
        }
        _ => Err(CliError::Usage(
            "give exactly one of --ip or --handle".into(),
        )),
    }
}
