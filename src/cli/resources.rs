//! `apply -f`, `get`, `delete` over the registry of resource kinds (`config::resource::KINDS`: where a kind
//! lives in etcd, how the operator's document becomes the stored bytes, defaults + validation, and back),
//! reading and writing through `datastore::resources`. What is the CLI's own is how each kind is printed
//! as a table ([`Columns`]); adding a kind is one `Resource` impl, one entry in `KINDS` and one here.
//! The BGP kinds are also checked together before a write, because a node refuses an invalid set as a whole (password Secrets are the nodes' mounted files, so they are assumed).

use serde::Deserialize;
use serde_json::Value;

use super::table::Table;
use super::CliError;
use crate::config::bgp::ConfigSet;
use crate::config::resource::{self, DocumentError, KindInfo, KINDS};
use crate::datastore::resources::{self as stored, ResourceError, StoredDocument};
use crate::datastore::Datastore;

/// How `get` shows one kind as a table: columns of the default and `-o wide` tables, and a row.
struct Columns {
    kind: &'static str,
    columns: &'static [&'static str],
    wide_columns: &'static [&'static str],
    row: fn(&Value, bool) -> Vec<String>,
}

/// Find a kind by its `kind:` or a command-line alias (case-insensitive).
pub fn kind(name: &str) -> Result<&'static KindInfo, CliError> {
    resource::kind(name).ok_or_else(|| {
        let known: Vec<&str> = KINDS.iter().map(|k| k.kind).collect();
        CliError::Usage(format!(
            "unknown resource kind {name:?}; known: {}",
            known.join(", ")
        ))
    })
}

impl From<DocumentError> for CliError {
    fn from(e: DocumentError) -> CliError {
        match e {
            DocumentError::Invalid(e) => CliError::Config(e),
            e @ DocumentError::Json { .. } => CliError::Usage(e.to_string()),
        }
    }
}

impl From<ResourceError> for CliError {
    fn from(e: ResourceError) -> CliError {
        match e {
            ResourceError::Datastore(e) => CliError::Datastore(e),
            ResourceError::Document(e) => e.into(),
            e => CliError::Usage(e.to_string()),
        }
    }
}

fn json_err(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("{what}: {e}"))
}

/// The table of every kind in [`KINDS`].
static TABLES: &[Columns] = &[IPPOOL, IPAMCONFIG, BGPCONFIG, BGPPEER, NODE];

fn columns(k: &KindInfo) -> Result<&'static Columns, CliError> {
    TABLES
        .iter()
        .find(|c| c.kind == k.kind)
        .ok_or_else(|| CliError::Usage(format!("no table for kind {}", k.kind)))
}

const IPPOOL: Columns = Columns {
    kind: crate::config::ippool::KIND,
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

const IPAMCONFIG: Columns = Columns {
    kind: crate::config::ipam_config::KIND,
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

const BGPCONFIG: Columns = Columns {
    kind: crate::config::bgp::KIND_BGP_CONFIGURATION,
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

const BGPPEER: Columns = Columns {
    kind: crate::config::bgp::KIND_BGP_PEER,
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

const NODE: Columns = Columns {
    kind: crate::config::bgp::KIND_NODE,
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

/// Check that the stored BGP resources, with `doc` written as (kind, name), still form a set a node
/// accepts (for example, every BGPPeer's password secret resolves; a node refuses an invalid set whole).
async fn check_bgp_set(
    ds: &Datastore,
    k: &KindInfo,
    name: &str,
    doc: &Value,
) -> Result<(), CliError> {
    let mut text = String::new();
    for other in KINDS.iter().filter(|o| o.bgp_set) {
        for StoredDocument {
            name: n, doc: v, ..
        } in stored::list_documents(ds, other).await?
        {
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
        let existing = stored::list_documents(ds, k).await?;
        let others: Vec<Value> = existing.iter().map(|s| s.doc.clone()).collect();
        let (name, bytes) = (k.encode)(doc, &others)?;
        if k.bgp_set {
            check_bgp_set(ds, k, &name, doc).await?;
        }
        let rev = existing
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.mod_revision);
        if stored::put_document(ds, k, &name, bytes, rev).await? {
            Ok(format!(
                "Successfully applied 1 '{}' resource(s): {name}",
                k.kind
            ))
        } else {
            Err(CliError::Usage(format!(
                "{} {name:?} changed while it was being applied; run apply again",
                k.kind
            )))
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
    let table = columns(k)?;
    let mut objs: Vec<Value> = stored::list_documents(ds, k)
        .await?
        .into_iter()
        .filter(|s| name.is_none_or(|x| x == s.name))
        .map(
            |StoredDocument {
                 mod_revision: rev,
                 doc: mut v,
                 ..
             }| {
                if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.insert("resourceVersion".into(), Value::String(rev.to_string()));
                }
                v
            },
        )
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
            let mut t = Table::new(if wide {
                table.wide_columns
            } else {
                table.columns
            });
            for o in &objs {
                t.row((table.row)(o, wide));
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
    let existing = stored::list_documents(ds, k).await?;
    let Some(found) = existing.iter().find(|s| s.name == name) else {
        return Err(CliError::NotFound(format!("{} {name:?} not found", k.kind)));
    };
    if stored::delete_document(ds, k, name, found.mod_revision).await? {
        Ok(format!(
            "Successfully deleted 1 '{}' resource(s): {name}\n",
            k.kind
        ))
    } else {
        Err(CliError::Usage(format!(
            "{} {name:?} changed while it was being deleted; run delete again",
            k.kind
        )))
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
