//! What the node reads from and writes to the datastore at start and on reload: its Node resource, the
//! default pools, the BGP resources and the password Secrets.

#[allow(unused_imports)]
use super::*;

/// Create or update this node's Node resource so that `spec.bgp.ipv4Address` (and the AS, if given) are
/// what this daemon runs with. Other fields written by operators are kept.
pub async fn register_node(
    ds: &Datastore,
    name: &str,
    ipv4: Ipv4Addr,
    prefix_len: u8,
    asn: Option<u32>,
) -> anyhow::Result<()> {
    register_node_with(ds, name, Some((ipv4, prefix_len)), None, asn).await
}

/// [`register_node`], also writing `spec.bgp.ipv6Address` (`<address>/<prefix length>`) when given; without
/// it a stored ipv6Address is left as it is. `ipv4` None (an IPv6-only node, IP=none) removes a stored
/// ipv4Address, so no node peers with an address this one no longer has.
pub async fn register_node_with(
    ds: &Datastore,
    name: &str,
    ipv4: Option<(Ipv4Addr, u8)>,
    ipv6: Option<(std::net::Ipv6Addr, u8)>,
    asn: Option<u32>,
) -> anyhow::Result<()> {
    let updated = resources::patch_node(ds, name, true, |spec| {
        let bgp = resources::bgp_of(spec);
        match ipv4 {
            Some((a, len)) => {
                bgp.insert("ipv4Address".into(), format!("{a}/{len}").into());
            }
            None => {
                bgp.remove("ipv4Address");
            }
        }
        if let Some(a) = asn {
            bgp.insert("asNumber".into(), a.into());
        }
        if let Some((v6, len)) = ipv6 {
            bgp.insert("ipv6Address".into(), format!("{v6}/{len}").into());
        }
    })
    .await?;
    if updated != Updated::Unchanged {
        tracing::info!(node = name, address = ?ipv4.map(|a| a.0), ipv6 = ?ipv6.map(|a| a.0), "Node resource registered");
    }
    Ok(())
}

/// Create the default IPv4 pool when the datastore has no pool at all (as calico-node does at start).
pub async fn ensure_default_pool(
    ds: &Datastore,
    cidr: ipnetwork::Ipv4Network,
    block_size: u8,
) -> anyhow::Result<()> {
    if !resources::list_pools(ds).await?.is_empty() {
        return Ok(());
    }
    let mut pool = IpPool::new("default-ipv4-ippool", cidr.into());
    pool.spec.block_size = Some(block_size);
    pool.spec.nat_outgoing = true;
    create_default_pool(ds, pool, |pools| !pools.is_empty()).await
}

/// Create the default IPv6 pool when no IPv6 pool exists (Calico creates each family's default pool on its
/// own). natOutgoing is off, as in Calico's default IPv6 pool.
pub async fn ensure_default_ipv6_pool(
    ds: &Datastore,
    cidr: ipnetwork::Ipv6Network,
    block_size: u8,
) -> anyhow::Result<()> {
    let has_v6 = |pools: &[IpPool]| pools.iter().any(|p| p.spec.cidr.is_ipv6());
    if has_v6(&resources::list_pools(ds).await?) {
        return Ok(());
    }
    let mut pool = IpPool::new("default-ipv6-ippool", cidr.into());
    pool.spec.block_size = Some(block_size);
    create_default_pool(ds, pool, has_v6).await
}

/// Create a default pool. Nodes starting together race to create it: when our create-only write loses,
/// or fails, and `present` now finds a pool that does the job, another node made it: success.
pub(super) async fn create_default_pool(
    ds: &Datastore,
    pool: IpPool,
    present: impl Fn(&[IpPool]) -> bool,
) -> anyhow::Result<()> {
    let (name, cidr, block_size) = (pool.name().to_string(), pool.spec.cidr, pool.block_size());
    match resources::create_pool(ds, pool).await {
        Ok(true) => {
            tracing::info!(pool = name, %cidr, block_size, "created the default pool");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(_) if present(&resources::list_pools(ds).await?) => {
            tracing::info!(%cidr, "the default pool was created by another node meanwhile");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("creating the default pool {cidr}: {e}")),
    }
}

/// The IP pools in the datastore (for the export policy).
pub async fn load_pools(ds: &Datastore) -> anyhow::Result<Vec<IpPool>> {
    Ok(resources::list_pools(ds).await?)
}

/// The BGP resources in the datastore, validated together (a bad set is refused as a whole).
pub async fn load_config(ds: &Datastore) -> anyhow::Result<ConfigSet> {
    load_config_with(ds, None).await
}

/// [`load_config`], plus the BGP password Secrets found under `secrets_dir` (see [`secrets_from_dir`]),
/// read again on every load so that a rotated Secret applies without a restart.
pub async fn load_config_with(
    ds: &Datastore,
    secrets_dir: Option<&std::path::Path>,
) -> anyhow::Result<ConfigSet> {
    let snapshot = crate::feed::list_snapshot(ds).await?;
    Ok(snapshot.config_set(secrets_in(secrets_dir)?)?)
}

/// The password Secrets mounted under `dir` (none without a directory).
pub(super) fn secrets_in(
    dir: Option<&std::path::Path>,
) -> anyhow::Result<std::collections::BTreeMap<(String, String), crate::config::bgp::Secret>> {
    let Some(dir) = dir else {
        return Ok(Default::default());
    };
    let text = secrets_from_dir(dir)?;
    Ok(ConfigSet::from_yaml(&text)
        .map_err(|e| anyhow::anyhow!("BGP secrets in {}: {e}", dir.display()))?
        .secrets)
}

/// BGP password Secrets mounted as files, as v1 Secret documents for [`ConfigSet`]: `<dir>/<secret>/<key>`
/// holds the value of `secretKeyRef {name: <secret>, key: <key>}` (a Kubernetes Secret volume mounted at
/// `<dir>/<secret>` has exactly this layout; its `..data` bookkeeping entries are skipped). A missing `dir`
/// means no Secrets; an unreadable one is an error naming it. Values are used byte for byte, as Calico does.
pub fn secrets_from_dir(dir: &std::path::Path) -> anyhow::Result<String> {
    let mut text = String::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(text),
        Err(e) => anyhow::bail!("BGP secrets directory {}: {e}", dir.display()),
    };
    let mut secrets =
        std::collections::BTreeMap::<String, serde_json::Map<String, serde_json::Value>>::new();
    for secret in entries {
        let secret = secret.with_context(|| format!("reading {}", dir.display()))?;
        let name = secret.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !secret.path().is_dir() {
            continue;
        }
        let data = secrets.entry(name.clone()).or_default();
        for key in std::fs::read_dir(secret.path())
            .with_context(|| format!("reading {}", secret.path().display()))?
        {
            let key = key.with_context(|| format!("reading {}", secret.path().display()))?;
            let k = key.file_name().to_string_lossy().to_string();
            if k.starts_with('.') || key.path().is_dir() {
                continue;
            }
            let value = std::fs::read_to_string(key.path()).with_context(|| {
                format!("BGP secret {name:?} key {k:?} ({})", key.path().display())
            })?;
            data.insert(k, serde_json::Value::String(value));
        }
    }
    for (name, data) in secrets {
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": data,
        });
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(&doc)?);
        text.push('\n');
    }
    Ok(text)
}
