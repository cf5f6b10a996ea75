//! The CNI result in a version-neutral model, encoded for and decoded from every supported version.

#[allow(unused_imports)]
use super::*;

/// A network interface in a result. `sandbox` is the netns path for interfaces inside the container, and
/// absent for host interfaces: chained plugins (bandwidth, portmap) rely on that distinction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Spec 1.1 only; dropped when encoding older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address in a result; `interface` indexes `interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    #[serde(with = "cidr")]
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    #[serde(with = "cidr")]
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// A CNI result in margay's version-neutral model (the 1.x shape). [`CniResult::encode`] writes it in any
/// supported version; [`CniResult::decode`] reads a `prevResult` of any supported version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// The result JSON in `version` (spec section 5). Before 1.0.0 each `ips[]` entry also says
    /// `"version": "4"|"6"`; interface `mtu` exists only from 1.1.0.
    pub fn encode(&self, version: CniVersion) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), Value::String(version.as_str().into()));
        if !self.interfaces.is_empty() {
            let ifs = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if version < CniVersion::V1_1_0 {
                        i.mtu = None;
                    }
                    to_value(&i)
                })
                .collect();
            m.insert("interfaces".into(), Value::Array(ifs));
        }
        if !self.ips.is_empty() {
            let ips = self
                .ips
                .iter()
                .map(|ip| {
                    let mut o = Map::new();
                    if version.ips_carry_version() {
                        let fam = if ip.address.is_ipv4() { "4" } else { "6" };
                        o.insert("version".into(), Value::String(fam.into()));
                    }
                    if let Some(i) = ip.interface {
                        o.insert("interface".into(), Value::from(i));
                    }
                    o.insert("address".into(), Value::String(ip.address.to_string()));
                    if let Some(g) = ip.gateway {
                        o.insert("gateway".into(), Value::String(g.to_string()));
                    }
                    Value::Object(o)
                })
                .collect();
            m.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            m.insert(
                "routes".into(),
                Value::Array(self.routes.iter().map(to_value).collect()),
            );
        }
        m.insert("dns".into(), to_value(&self.dns));
        Value::Object(m)
    }

    /// Read a result (a `prevResult`) of any supported version. Results of 0.1/0.2 (`ip4`/`ip6` keys) are
    /// refused: no runtime that speaks 0.3+ to margay can hold one.
    pub fn decode(v: &Value) -> Result<CniResult, String> {
        let obj = v.as_object().ok_or("a result must be a JSON object")?;
        if let Some(ver) = obj.get("cniVersion").and_then(Value::as_str) {
            ver.parse::<CniVersion>()
                .map_err(|_| format!("result version {ver:?} is not supported"))?;
        }
        if obj.contains_key("ip4") || obj.contains_key("ip6") {
            return Err("result in the 0.2 format (ip4/ip6) is not supported".into());
        }
        // "version" inside ips[] (0.3.x/0.4.0) is implied by the address; serde ignores it.
        let r: CniResult = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        for ip in &r.ips {
            if let Some(i) = ip.interface {
                if i >= r.interfaces.len() {
                    return Err(format!(
                        "ips entry {} points at interface {i}, but there are {} interfaces",
                        ip.address,
                        r.interfaces.len()
                    ));
                }
            }
        }
        Ok(r)
    }

    /// Append `other` (our own result) after the entries of `self` (a `prevResult` from earlier plugins),
    /// shifting `other`'s interface indices.
    pub fn merged_with(mut self, other: CniResult) -> CniResult {
        let shift = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + shift);
            ip
        }));
        self.routes.extend(other.routes);
        if self.dns == Dns::default() {
            self.dns = other.dns;
        }
        self
    }
}

/// serde_json::to_value for our own plain types, which cannot fail (string keys, no maps with non-string
/// keys); a failure would be a bug in this file, so it degrades to null rather than panicking.
pub(super) fn to_value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The answer to VERSION (spec section "VERSION").
pub fn version_info(version: CniVersion) -> Value {
    serde_json::json!({
        "cniVersion": version.as_str(),
        "supportedVersions": supported_versions(),
    })
}
