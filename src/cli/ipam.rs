//! `margay ipam show | check | release`: the text calicoctl prints, from `ipam::ops`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::table::Table;
use super::CliError;
use crate::datastore::Datastore;
use crate::ipam::ops::{self, CheckReport};

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
