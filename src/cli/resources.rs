//! `apply -f`, `get`, `delete` over a registry of resource kinds. Each [`KindInfo`] says where a kind lives in
//! etcd, how to turn the operator's document into the stored bytes (defaults + validation) and back, and how
//! to print it as a table. IPPool, IPAMConfiguration, BGPConfiguration, BGPPeer and Node are registered; adding
//! a kind is adding one entry to [`KINDS`]. The BGP kinds are also checked together before a write, because a
//! node refuses an invalid set as a whole (password Secrets are the nodes' mounted files, so they are assumed).

use serde::Deserialize;
use serde_json::Value;

use super::table::Table;
use super::CliError;
use crate::config::bgp::{
    BgpConfiguration, BgpPeer, ConfigSet, Node, KIND_BGP_CONFIGURATION, KIND_BGP_PEER, KIND_NODE,
};
use crate::config::ipam_config::{self, IpamConfiguration, StoredIpamConfig};
use crate::config::ippool::{self, IpPool};
use crate::config::{tolerant, ConfigError};
use crate::datastore::{keys, Datastore, Guard, TxnOutcome, Write};

/// Where a kind's objects are stored.
pub enum Storage {
    /// One object per name under `/calico/resources/v3/projectcalico.org/<plural>/<name>`.
    Resources { plural: &'static str },
    /// A single object at a fixed key, whatever its name (IPAMConfiguration at `/calico/ipam/v2/config`).
    Singleton {
        key: &'static str,
        name: &'static str,
    },
}

/// Operator document and the other stored objects of its kind -> (name, stored bytes).
pub type EncodeFn = fn(&Value, &[Value]) -> Result<(String, Vec<u8>), CliError>;

/// One kind of resource the CLI knows.
pub struct KindInfo {
    pub kind: &'static str,
    /// Names accepted on the command line (lower case): `ippool`, `ippools`, `pool`, ...
    pub aliases: &'static [&'static str],
    pub storage: Storage,
    /// Operator document -> (name, stored bytes), applying defaults and validating against the other stored
    /// objects of the kind.
    pub encode: EncodeFn,
    /// Stored bytes -> the v3 document.
    pub decode: fn(&str, &[u8]) -> Result<Value, CliError>,
    /// Columns of the default and `-o wide` tables, and a row.
    pub columns: &'static [&'static str],
    pub wide_columns: &'static [&'static str],
    pub row: fn(&Value, bool) -> Vec<String>,
}

/// Every kind `apply`, `get` and `delete` handle.
pub static KINDS: &[KindInfo] = &[IPPOOL, IPAMCONFIG, BGPCONFIG, BGPPEER, NODE];

/// Find a kind by its `kind:` or a command-line alias (case-insensitive).
pub fn kind(name: &str) -> Result<&'static KindInfo, CliError> {
    let l = name.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|k| k.kind.eq_ignore_ascii_case(&l) || k.aliases.contains(&l.as_str()))
        .ok_or_else(|| {
            let known: Vec<&str> = KINDS.iter().map(|k| k.kind).collect();
            CliError::Usage(format!(
                "unknown resource kind {name:?}; known: {}",
                known.join(", ")
            ))
        })
}

fn invalid(e: ConfigError) -> CliError {
    CliError::Config(e)
}

fn json_err(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("{what}: {e}"))
}

const IPPOOL: KindInfo = KindInfo {
    kind: ippool::KIND,
    aliases: &["ippool", "ippools", "pool", "pools", "ipp"],
    storage: Storage::Resources {
        plural: ippool::PLURAL,
    },
    encode: |doc, others| {
        let p: IpPool = tolerant::strict(ippool::KIND, doc).map_err(invalid)?;
        let mut p = p.with_defaults();
        // The stored pools were written by whoever: read them as the daemon does.
        let others: Vec<IpPool> = others
            .iter()
            .filter_map(|o| tolerant::tolerant(ippool::KIND, o.clone()).ok())
            .collect();
        ippool::validate_against(&p, &others).map_err(invalid)?;
        p.metadata.resource_version = None;
        let bytes = serde_json::to_vec(&p).map_err(|e| json_err("IPPool", e))?;
        Ok((p.metadata.name.clone(), bytes))
    },
    decode: |_, bytes| {
        serde_json::from_slice::<Value>(bytes).map_err(|e| json_err("stored IPPool", e))
    },
    columns: &["NAME", "CIDR", "SELECTOR"],
    wide_columns: &[
        "NAME",
        "CIDR",
        "NAT",
        "IPIPMODE",
        "VXLANMODE",
        "DISABLED",
        "DISABLEBGPEXPORT",
        "SELECTOR",
        "ASSIGNMENTMODE",
    ],
    row: |v, wide| {
        let s = |p: &str| match v.pointer(p) {
            Some(Value::String(x)) => x.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Null) | None => String::new(),
            Some(x) => x.to_string(),
        };
        let b = |p: &str| {
            v.pointer(p)
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .to_string()
        };
        if wide {
            vec![
                s("/metadata/name"),
                s("/spec/cidr"),
                b("/spec/natOutgoing"),
                s("/spec/ipipMode"),
                s("/spec/vxlanMode"),
                b("/spec/disabled"),
                b("/spec/disableBGPExport"),
                s("/spec/nodeSelector"),
                s("/spec/assignmentMode"),
            ]
        } else {
            vec![
                s("/metadata/name"),
                s("/spec/cidr"),
                s("/spec/nodeSelector"),
            ]
        }
    },
};

const IPAMCONFIG: KindInfo = KindInfo {
    kind: ipam_config::KIND,
    aliases: &[
        "ipamconfiguration",
        "ipamconfigurations",
        "ipamconfig",
        "ipamconfigs",
    ],
    storage: Storage::Singleton {
        key: keys::IPAM_CONFIG_KEY,
        name: ipam_config::NAME,
    },
    encode: |doc, _| {
        let c: IpamConfiguration = tolerant::strict(ipam_config::KIND, doc).map_err(invalid)?;
        c.validate().map_err(invalid)?;
        let stored = StoredIpamConfig::from(c.spec);
        let bytes = serde_json::to_vec(&stored).map_err(|e| json_err("IPAMConfiguration", e))?;
        Ok((c.metadata.name, bytes))
    },
    decode: |_, bytes| {
        let s: StoredIpamConfig =
            tolerant::tolerant_slice(ipam_config::KIND, bytes).map_err(invalid)?;
        serde_json::to_value(IpamConfiguration::new(s.into()))
            .map_err(|e| json_err("IPAMConfiguration", e))
    },
    columns: &["NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST"],
    wide_columns: &[
        "NAME",
        "STRICTAFFINITY",
        "MAXBLOCKSPERHOST",
        "AUTOALLOCATEBLOCKS",
    ],
    row: |v, wide| {
        let f = |p: &str| v.pointer(p).map(|x| x.to_string()).unwrap_or_default();
        let mut r = vec![
            v.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            f("/spec/strictAffinity"),
            f("/spec/maxBlocksPerHost"),
        ];
        if wide {
            r.push(f("/spec/autoAllocateBlocks"));
        }
        r
    },
};

/// A field of a v3 document as table text ("" when absent).
fn cell(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => String::new(),
        Some(x) => x.to_string(),
    }
}

/// Stored v3 JSON -> document, with `apiVersion` and `kind` filled in when the writer left them out.
fn decode_v3(kind: &'static str, what: &str, bytes: &[u8]) -> Result<Value, CliError> {
    let mut v: Value = serde_json::from_slice(bytes).map_err(|e| json_err(what, e))?;
    if let Some(o) = v.as_object_mut() {
        o.entry("apiVersion")
            .or_insert_with(|| crate::config::API_VERSION.into());
        o.entry("kind").or_insert_with(|| kind.into());
    }
    Ok(v)
}

/// Parse an operator document of a BGP kind (unknown fields are refused with their name), validate it,
/// and return (name, stored JSON).
fn encode_typed<T>(
    kind: &str,
    doc: &Value,
    validate: fn(&T) -> Result<(), ConfigError>,
    meta: fn(&mut T) -> &mut crate::config::ObjectMeta,
) -> Result<(String, Vec<u8>), CliError>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let mut t: T = tolerant::strict(kind, doc).map_err(invalid)?;
    validate(&t).map_err(invalid)?;
    let m = meta(&mut t);
    m.resource_version = None;
    let name = m.name.clone();
    let bytes = serde_json::to_vec(&t).map_err(|e| json_err(kind, e))?;
    Ok((name, bytes))
}

const BGPCONFIG: KindInfo = KindInfo {
    kind: KIND_BGP_CONFIGURATION,
    aliases: &[
        "bgpconfiguration",
        "bgpconfigurations",
        "bgpconfig",
        "bgpconfigs",
    ],
    storage: Storage::Resources {
        plural: crate::config::bgp::BGP_CONFIGURATION_PLURAL,
    },
    encode: |doc, _| {
        encode_typed::<BgpConfiguration>(
            KIND_BGP_CONFIGURATION,
            doc,
            BgpConfiguration::validate,
            |c| &mut c.metadata,
        )
    },
    decode: |_, bytes| decode_v3(KIND_BGP_CONFIGURATION, "stored BGPConfiguration", bytes),
    columns: &["NAME", "LOGSEVERITY", "MESHENABLED", "ASNUMBER"],
    wide_columns: &[
        "NAME",
        "LOGSEVERITY",
        "MESHENABLED",
        "ASNUMBER",
        "LISTENPORT",
        "SERVICECLUSTERIPS",
    ],
    row: |v, wide| {
        let cidrs = |p: &str| {
            v.pointer(p)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.get("cidr").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let mut r = vec![
            cell(v, "/metadata/name"),
            cell(v, "/spec/logSeverityScreen"),
            cell(v, "/spec/nodeToNodeMeshEnabled"),
            cell(v, "/spec/asNumber"),
        ];
        if wide {
            r.push(cell(v, "/spec/listenPort"));
            r.push(cidrs("/spec/serviceClusterIPs"));
        }
        r
    },
};

const BGPPEER: KindInfo = KindInfo {
    kind: KIND_BGP_PEER,
    aliases: &["bgppeer", "bgppeers", "bgpp", "peer", "peers"],
    storage: Storage::Resources {
        plural: crate::config::bgp::BGP_PEER_PLURAL,
    },
    encode: |doc, _| {
        encode_typed::<BgpPeer>(KIND_BGP_PEER, doc, BgpPeer::validate, |p| &mut p.metadata)
    },
    decode: |_, bytes| decode_v3(KIND_BGP_PEER, "stored BGPPeer", bytes),
    columns: &["NAME", "PEERIP", "NODE", "ASN"],
    wide_columns: &[
        "NAME",
        "PEERIP",
        "NODE",
        "ASN",
        "PEERSELECTOR",
        "NODESELECTOR",
    ],
    row: |v, wide| {
        // calicoctl shows "(global)" for a peer of every node.
        let node = match (cell(v, "/spec/node"), cell(v, "/spec/nodeSelector")) {
            (n, _) if !n.is_empty() => n,
            (_, sel) if !sel.is_empty() => sel,
            _ => "(global)".into(),
        };
        let mut r = vec![
            cell(v, "/metadata/name"),
            cell(v, "/spec/peerIP"),
            node,
            cell(v, "/spec/asNumber"),
        ];
        if wide {
            r.push(cell(v, "/spec/peerSelector"));
            r.push(cell(v, "/spec/nodeSelector"));
        }
        r
    },
};

const NODE: KindInfo = KindInfo {
    kind: KIND_NODE,
    aliases: &["node", "nodes", "no"],
    storage: Storage::Resources {
        plural: crate::config::bgp::NODE_PLURAL,
    },
    encode: |doc, _| encode_typed::<Node>(KIND_NODE, doc, Node::validate, |n| &mut n.metadata),
    decode: |_, bytes| decode_v3(KIND_NODE, "stored Node", bytes),
    columns: &["NAME"],
    wide_columns: &["NAME", "ASN", "IPV4", "IPV6", "RRCLUSTERID"],
    row: |v, wide| {
        let mut r = vec![cell(v, "/metadata/name")];
        if wide {
            let asn = cell(v, "/spec/bgp/asNumber");
            r.push(if asn.is_empty() {
                "(64512)".into()
            } else {
                asn
            });
            r.push(cell(v, "/spec/bgp/ipv4Address"));
            r.push(cell(v, "/spec/bgp/ipv6Address"));
            r.push(cell(v, "/spec/bgp/routeReflectorClusterID"));
        }
        r
    },
};

/// The BGP kinds a node validates as one set.
fn is_bgp_kind(k: &KindInfo) -> bool {
    [KIND_BGP_CONFIGURATION, KIND_BGP_PEER, KIND_NODE].contains(&k.kind)
}

/// Check that the stored BGP resources, with `doc` written as (kind, name), still form a set a node
/// accepts (for example, every BGPPeer's password secret resolves; a node refuses an invalid set whole).
async fn check_bgp_set(
    ds: &Datastore,
    k: &KindInfo,
    name: &str,
    doc: &Value,
) -> Result<(), CliError> {
    let mut text = String::new();
    for other in KINDS.iter().filter(|o| is_bgp_kind(o)) {
        for (n, _, v) in list(ds, other).await? {
            if other.kind == k.kind && n == name {
                continue;
            }
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(&v).map_err(|e| json_err("json", e))?);
            text.push('\n');
        }
    }
    text.push_str("---\n");
    text.push_str(&serde_json::to_string(doc).map_err(|e| json_err("json", e))?);
    text.push('\n');
    // Password Secrets live on the nodes (mounted files, see `margay node run --bgp-secrets-dir`), not in
    // etcd: stand in for every one referenced so that only what etcd holds is judged here.
    let mut refs = std::collections::BTreeMap::<String, Vec<String>>::new();
    for d in documents(&text)? {
        for p in [
            "/spec/password/secretKeyRef",
            "/spec/nodeMeshPassword/secretKeyRef",
        ] {
            if let Some(r) = d.pointer(p) {
                let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
                let key = r.get("key").and_then(Value::as_str).unwrap_or_default();
                refs.entry(name.to_string())
                    .or_default()
                    .push(key.to_string());
            }
        }
    }
    for (name, keys) in refs {
        let data: serde_json::Map<String, Value> = keys
            .into_iter()
            .map(|k| (k, Value::String("placeholder".into())))
            .collect();
        let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name}, "stringData": data});
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(&secret).map_err(|e| json_err("json", e))?);
        text.push('\n');
    }
    // The new document was decoded strictly already; the stored ones are read as the nodes read them.
    ConfigSet::from_datastore_yaml(&text)
        .map(|_| ())
        .map_err(|e| {
            CliError::Usage(format!(
                "{} {name:?} refused: with it the BGP resources would be invalid as a set ({e})",
                k.kind
            ))
        })
}

fn key_of(k: &KindInfo, name: &str) -> String {
    match &k.storage {
        Storage::Resources { plural } => keys::resource_key(plural, name),
        Storage::Singleton { key, .. } => key.to_string(),
    }
}

/// Every stored object of a kind: (name, mod_revision, v3 document).
pub async fn list(ds: &Datastore, k: &KindInfo) -> Result<Vec<(String, i64, Value)>, CliError> {
    let mut out = Vec::new();
    match &k.storage {
        Storage::Resources { plural } => {
            let prefix = keys::resource_prefix(plural);
            for kv in ds.list(&prefix).await?.0 {
                let name = kv.key.trim_start_matches(&prefix).to_string();
                out.push((name.clone(), kv.mod_revision, (k.decode)(&name, &kv.value)?));
            }
        }
        Storage::Singleton { key, name } => {
            if let Some(kv) = ds.get(key).await? {
                out.push((
                    name.to_string(),
                    kv.mod_revision,
                    (k.decode)(name, &kv.value)?,
                ));
            }
        }
    }
    Ok(out)
}

/// Split a YAML (or JSON) file into documents, unrolling `kind: List`.
pub fn documents(text: &str) -> Result<Vec<Value>, CliError> {
    let mut docs = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(d)
            .map_err(|e| CliError::Usage(format!("cannot parse the file: {e}")))?;
        match &v {
            Value::Null => {}
            Value::Object(m)
                if m.get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                if let Some(Value::Array(items)) = m.get("items") {
                    docs.extend(items.iter().cloned());
                }
            }
            _ => docs.push(v),
        }
    }
    Ok(docs)
}

/// Create or replace every object in `text`. Returns one line per object ("Successfully applied ...").
pub async fn apply(ds: &Datastore, text: &str) -> Result<Vec<String>, CliError> {
    let mut lines = Vec::new();
    for (i, doc) in documents(text)?.into_iter().enumerate() {
        lines.push(apply_one(ds, &doc).await.map_err(|e| CliError::Document {
            document: i + 1,
            source: Box::new(e),
        })?);
    }
    Ok(lines)
}

/// Create or replace one object; the line to print.
async fn apply_one(ds: &Datastore, doc: &Value) -> Result<String, CliError> {
    {
        let kind_name = doc
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| CliError::Usage("a document has no kind".into()))?;
        let k = kind(kind_name)?;
        let existing = list(ds, k).await?;
        let others: Vec<Value> = existing.iter().map(|(_, _, v)| v.clone()).collect();
        let (name, bytes) = (k.encode)(doc, &others)?;
        if is_bgp_kind(k) {
            check_bgp_set(ds, k, &name, doc).await?;
        }
        let key = key_of(k, &name);
        let guard = match existing.iter().find(|(n, _, _)| *n == name) {
            Some((_, rev, _)) => Guard::ModRevision(key.clone(), *rev),
            None => Guard::Absent(key.clone()),
        };
        match ds.txn(&[guard], &[Write::Put(key, bytes)]).await? {
            TxnOutcome::Committed { .. } => Ok(format!(
                "Successfully applied 1 '{}' resource(s): {name}",
                k.kind
            )),
            TxnOutcome::Conflict { .. } => Err(CliError::Usage(format!(
                "{} {name:?} changed while it was being applied; run apply again",
                k.kind
            ))),
        }
    }
}

/// Output format of `get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Yaml,
    Json,
}

/// `get KIND [NAME]`.
pub async fn get(
    ds: &Datastore,
    kind_name: &str,
    name: Option<&str>,
    output: Output,
) -> Result<String, CliError> {
    let k = kind(kind_name)?;
    let mut objs: Vec<Value> = list(ds, k)
        .await?
        .into_iter()
        .filter(|(n, _, _)| name.is_none_or(|x| x == n))
        .map(|(_, rev, mut v)| {
            if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("resourceVersion".into(), Value::String(rev.to_string()));
            }
            v
        })
        .collect();
    if let (Some(n), true) = (name, objs.is_empty()) {
        return Err(CliError::NotFound(format!("{} {n:?} not found", k.kind)));
    }
    let single = name.is_some();
    Ok(match output {
        Output::Json => {
            let v = if single {
                objs.remove(0)
            } else {
                list_doc(objs)
            };
            let mut s = serde_json::to_string_pretty(&v).map_err(|e| json_err("json", e))?;
            s.push('\n');
            s
        }
        Output::Yaml => {
            let v = if single {
                objs.remove(0)
            } else {
                list_doc(objs)
            };
            serde_yaml_ng::to_string(&v).map_err(|e| json_err("yaml", e))?
        }
        Output::Table | Output::Wide => {
            let wide = output == Output::Wide;
            let mut t = Table::new(if wide { k.wide_columns } else { k.columns });
            for o in &objs {
                t.row((k.row)(o, wide));
            }
            t.render()
        }
    })
}

fn list_doc(items: Vec<Value>) -> Value {
    serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "List", "items": items})
}

/// `delete KIND NAME`.
pub async fn delete(ds: &Datastore, kind_name: &str, name: &str) -> Result<String, CliError> {
    let k = kind(kind_name)?;
    let existing = list(ds, k).await?;
    let Some((_, rev, _)) = existing.iter().find(|(n, _, _)| n == name) else {
        return Err(CliError::NotFound(format!("{} {name:?} not found", k.kind)));
    };
    let key = key_of(k, name);
    match ds.delete(&key, *rev).await? {
        Some(_) => Ok(format!(
            "Successfully deleted 1 '{}' resource(s): {name}\n",
            k.kind
        )),
        None => Err(CliError::Usage(format!(
            "{} {name:?} changed while it was being deleted; run delete again",
            k.kind
        ))),
    }
}

/// Names in a file, for `delete -f`.
pub fn names_in(text: &str) -> Result<Vec<(String, String)>, CliError> {
    documents(text)?
        .iter()
        .map(|d| {
            let kind = d
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let name = d
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .ok_or_else(|| CliError::Usage(format!("a {kind} document has no metadata.name")))?
                .to_string();
            Ok((kind, name))
        })
        .collect()
}
