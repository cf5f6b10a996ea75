//! Loading a set of BGP resources (YAML documents, Secrets) and validating it as a whole: a bad
//! document is refused naming the document, field and value.

#[allow(unused_imports)]
use super::*;

pub(super) fn check_header(
    kind: &str,
    api_version: &str,
    got_kind: &str,
    meta: &ObjectMeta,
) -> Result<(), ConfigError> {
    if api_version != API_VERSION {
        return Err(ConfigError::new(
            kind,
            &meta.name,
            "apiVersion",
            api_version,
            format!("expected {API_VERSION}"),
        ));
    }
    if got_kind != kind {
        return Err(ConfigError::new(
            kind,
            &meta.name,
            "kind",
            got_kind,
            format!("expected {kind}"),
        ));
    }
    let n = &meta.name;
    let valid = !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid {
        return Err(ConfigError::new(
            kind,
            n,
            "metadata.name",
            n,
            "names are lowercase letters, digits, '-' and '.', starting and ending alphanumeric (RFC 1123)",
        ));
    }
    Ok(())
}

pub(super) fn check_password(p: &BgpPassword) -> Result<(), (String, String, String)> {
    match &p.secret_key_ref {
        None => Err((
            "secretKeyRef".into(),
            "(missing)".into(),
            "a password comes from secretKeyRef {name, key}".into(),
        )),
        Some(r) if r.name.is_empty() => Err((
            "secretKeyRef.name".into(),
            String::new(),
            "the Secret's name is empty".into(),
        )),
        Some(r) if r.key.is_empty() => Err((
            "secretKeyRef.key".into(),
            String::new(),
            "the Secret's key is empty".into(),
        )),
        Some(_) => Ok(()),
    }
}

/// A Kubernetes Secret as the file datastore carries it (`v1` `Secret` with `data` (base64) or `stringData`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secret {
    pub namespace: Option<String>,
    pub name: String,
    pub data: BTreeMap<String, String>,
}

// ----- loading -----

/// Why a file of resources was refused. `document` counts from 1 in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("document {document}: not valid YAML: {reason}")]
    Yaml { document: usize, reason: String },
    #[error("document {document}: {error}")]
    Invalid {
        document: usize,
        error: Box<ConfigError>,
    },
    #[error("document {document}: {kind} {name:?} is defined twice (first in document {first})")]
    Duplicate {
        document: usize,
        first: usize,
        kind: String,
        name: String,
    },
}

/// Every resource of one source (file or datastore snapshot), validated together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSet {
    /// By name: `default` and `node.<name>`.
    pub bgp_configurations: BTreeMap<String, BgpConfiguration>,
    pub bgp_peers: BTreeMap<String, BgpPeer>,
    pub nodes: BTreeMap<String, Node>,
    /// By (namespace, name); namespace "" when none was given.
    pub secrets: BTreeMap<(String, String), Secret>,
    /// Documents of other `projectcalico.org/v3` kinds (IPPool, IPAMConfiguration, ...), kept as parsed YAML
    /// for the parts that own them.
    pub other: Vec<serde_yaml_ng::Value>,
}

pub(super) fn field_path(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." {
        String::new()
    } else {
        p
    }
}

/// The value at a serde path inside a document, rendered for an error message.
pub(super) fn value_at(v: &serde_yaml_ng::Value, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut cur = Some(v);
    for seg in path.iter() {
        cur = match (seg, cur) {
            (Segment::Map { key }, Some(c)) => c.get(key.as_str()),
            (Segment::Seq { index }, Some(c)) => c.get(*index),
            _ => None,
        };
    }
    match cur {
        Some(serde_yaml_ng::Value::String(s)) => s.clone(),
        Some(serde_yaml_ng::Value::Number(n)) => n.to_string(),
        Some(serde_yaml_ng::Value::Bool(b)) => b.to_string(),
        Some(other) => serde_yaml_ng::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        None => String::new(),
    }
}

/// How [`ConfigSet`] treats fields margay does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fields {
    /// Refuse them (operator files, `margay apply`): a typo must not pass silently.
    Strict,
    /// Ignore them, warned once and counted (the datastore, where a newer Calico may have written them).
    Tolerant,
}

pub(super) fn typed<T: serde::de::DeserializeOwned>(
    doc: usize,
    kind: &str,
    name: &str,
    v: serde_yaml_ng::Value,
    fields: Fields,
) -> Result<T, LoadError> {
    let decoded = match fields {
        Fields::Strict => serde_path_to_error::deserialize::<_, T>(v.clone()),
        Fields::Tolerant => crate::config::tolerant::tolerant_yaml(kind, name, v.clone()),
    };
    decoded.map_err(|e| {
        let field = field_path(e.path());
        let value = value_at(&v, e.path());
        // serde's message says what was expected ("unknown field `asnumber`, expected one of ...").
        let reason = e.into_inner().to_string();
        LoadError::Invalid {
            document: doc,
            error: Box::new(ConfigError::new(kind, name, &field, value, reason)),
        }
    })
}

impl ConfigSet {
    /// The cluster-wide BGPConfiguration (Calico's defaults when there is none).
    pub fn default_bgp(&self) -> BgpConfiguration {
        self.bgp_configurations
            .get("default")
            .cloned()
            .unwrap_or_else(|| BgpConfiguration {
                api_version: API_VERSION.into(),
                kind: KIND_BGP_CONFIGURATION.into(),
                metadata: ObjectMeta {
                    name: "default".into(),
                    ..Default::default()
                },
                spec: BgpConfigurationSpec::default(),
            })
    }

    /// The BGP port `node` listens on: its `node.<name>` object, else the cluster-wide one, else 179.
    pub fn listen_port(&self, node: &str) -> u16 {
        self.bgp_configurations
            .get(&format!("node.{node}"))
            .and_then(|c| c.spec.listen_port)
            .unwrap_or_else(|| self.default_bgp().listen_port())
    }

    /// Resolve a password reference against the Secrets of the set. Calico reads BGP secrets from its own
    /// namespace; a Secret given without a namespace matches any.
    pub fn resolve_secret(&self, r: &SecretKeyRef) -> Option<&str> {
        self.secrets
            .iter()
            .find(|((_, name), _)| *name == r.name)
            .and_then(|(_, s)| s.data.get(&r.key))
            .map(String::as_str)
    }

    /// Read, parse and validate a multi-document YAML file (`margay reflector --config FILE`). All or nothing.
    pub fn from_file(path: &std::path::Path) -> Result<ConfigSet, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        ConfigSet::from_yaml(&text)
    }

    /// Parse and validate a multi-document YAML stream. All or nothing; a field margay does not know is
    /// refused (this is what operators write).
    pub fn from_yaml(text: &str) -> Result<ConfigSet, LoadError> {
        ConfigSet::parse(text, Fields::Strict)
    }

    /// [`ConfigSet::from_yaml`] for resources read from the datastore: fields margay does not know (a newer
    /// Calico wrote them) are ignored, warned about once per kind and field and counted (see
    /// [`crate::config::tolerant`]); everything else is validated as strictly.
    pub fn from_datastore_yaml(text: &str) -> Result<ConfigSet, LoadError> {
        ConfigSet::parse(text, Fields::Tolerant)
    }

    pub(super) fn parse(text: &str, fields: Fields) -> Result<ConfigSet, LoadError> {
        let mut set = ConfigSet::default();
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let doc = i + 1;
            let value = serde_yaml_ng::Value::deserialize(de).map_err(|e| LoadError::Yaml {
                document: doc,
                reason: e.to_string(),
            })?;
            if value.is_null() {
                continue; // an empty document (`---` at the end)
            }
            let get = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let kind = get("kind").unwrap_or_default();
            let api = get("apiVersion").unwrap_or_default();
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string();
            let invalid = |field: &str, v: &str, reason: &str| LoadError::Invalid {
                document: doc,
                error: Box::new(ConfigError::new(
                    if kind.is_empty() { "(no kind)" } else { &kind },
                    &name,
                    field,
                    v,
                    reason,
                )),
            };
            if kind.is_empty() {
                return Err(invalid(
                    "kind",
                    "",
                    "every document needs apiVersion, kind and metadata.name",
                ));
            }
            if name.is_empty() {
                return Err(invalid("metadata.name", "", "every resource needs a name"));
            }
            let key = (kind.clone(), name.clone());
            if let Some(first) = seen.insert(key, doc) {
                return Err(LoadError::Duplicate {
                    document: doc,
                    first,
                    kind,
                    name,
                });
            }
            let checked = |r: Result<(), ConfigError>| {
                r.map_err(|error| LoadError::Invalid {
                    document: doc,
                    error: Box::new(error),
                })
            };
            match (api.as_str(), kind.as_str()) {
                (API_VERSION, KIND_BGP_CONFIGURATION) => {
                    let c: BgpConfiguration = typed(doc, &kind, &name, value, fields)?;
                    checked(c.validate())?;
                    set.bgp_configurations.insert(name, c);
                }
                (API_VERSION, KIND_BGP_PEER) => {
                    let p: BgpPeer = typed(doc, &kind, &name, value, fields)?;
                    checked(p.validate())?;
                    set.bgp_peers.insert(name, p);
                }
                (API_VERSION, KIND_NODE) => {
                    let n: Node = typed(doc, &kind, &name, value, fields)?;
                    checked(n.validate())?;
                    set.nodes.insert(name, n);
                }
                ("v1", "Secret") => {
                    let s = parse_secret(&value, &name).map_err(|(f, v, r)| invalid(&f, &v, &r))?;
                    set.secrets
                        .insert((s.namespace.clone().unwrap_or_default(), name), s);
                }
                (API_VERSION, _) => set.other.push(value),
                _ => {
                    return Err(invalid(
                        "apiVersion",
                        &api,
                        &format!("unsupported apiVersion/kind {api}/{kind}: expected {API_VERSION} resources or v1 Secrets"),
                    ));
                }
            }
        }
        set.validate_references(&seen)?;
        Ok(set)
    }

    /// Checks that span documents: password secrets exist (unless `optional`).
    pub(crate) fn validate_references(
        &self,
        docs: &BTreeMap<(String, String), usize>,
    ) -> Result<(), LoadError> {
        let mut refs: Vec<(&str, &str, &str, &SecretKeyRef)> = Vec::new();
        for (name, c) in &self.bgp_configurations {
            if let Some(r) = c
                .spec
                .node_mesh_password
                .as_ref()
                .and_then(|p| p.secret_key_ref.as_ref())
            {
                refs.push((
                    KIND_BGP_CONFIGURATION,
                    name,
                    "spec.nodeMeshPassword.secretKeyRef",
                    r,
                ));
            }
        }
        for (name, p) in &self.bgp_peers {
            if let Some(r) = p
                .spec
                .password
                .as_ref()
                .and_then(|p| p.secret_key_ref.as_ref())
            {
                refs.push((KIND_BGP_PEER, name, "spec.password.secretKeyRef", r));
            }
        }
        for (kind, name, field, r) in refs {
            if r.optional != Some(true) && self.resolve_secret(r).is_none() {
                return Err(LoadError::Invalid {
                    document: docs
                        .get(&(kind.to_string(), name.to_string()))
                        .copied()
                        .unwrap_or(0),
                    error: Box::new(ConfigError::new(
                        kind,
                        name,
                        field,
                        format!("{}/{}", r.name, r.key),
                        "no Secret with that name and key in the file (add a v1 Secret document)",
                    )),
                });
            }
        }
        Ok(())
    }
}

pub(super) fn parse_secret(
    v: &serde_yaml_ng::Value,
    name: &str,
) -> Result<Secret, (String, String, String)> {
    let mut s = Secret {
        namespace: v
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .map(str::to_string),
        name: name.to_string(),
        data: BTreeMap::new(),
    };
    if let Some(m) = v.get("data").and_then(|d| d.as_mapping()) {
        for (k, val) in m {
            let k = k.as_str().unwrap_or_default().to_string();
            let raw = val.as_str().unwrap_or_default();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(raw.trim())
                .map_err(|_| {
                    (
                        format!("data.{k}"),
                        raw.to_string(),
                        "not base64".to_string(),
                    )
                })?;
            let text = String::from_utf8(bytes).map_err(|_| {
                (
                    format!("data.{k}"),
                    raw.to_string(),
                    "not UTF-8 text".to_string(),
                )
            })?;
            s.data.insert(k, text);
        }
    }
    if let Some(m) = v.get("stringData").and_then(|d| d.as_mapping()) {
        for (k, val) in m {
            s.data.insert(
                k.as_str().unwrap_or_default().to_string(),
                val.as_str().unwrap_or_default().to_string(),
            );
        }
    }
    Ok(s)
}
