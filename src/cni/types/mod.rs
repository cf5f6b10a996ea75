//! CNI data model shared by the `margay-cni` shim and the daemon: spec versions, the network configuration a
//! runtime passes on stdin, `CNI_ARGS`, results in every version margay answers, and CNI error objects.
//!
//! This file must depend on nothing but `std`, `serde`, `serde_json` and `ipnetwork` (prefixes; a small
//! crate with no dependencies of its own): the shim links it and must stay small (no tokio, no etcd, no
//! netlink). Everything here is pure data and parsing.
//!
//! References are to the CNI specification (`SPEC.md` of containernetworking/cni): section "Execution
//! Protocol" for the environment, "Section 1: Network configuration format", "Section 5: Result Types".

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod error;
mod netconf;
mod result;

pub use error::*;
pub use netconf::*;
pub use result::*;

/// Where the daemon listens unless the network configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/margay/cni.sock";
/// The plugin `type` margay answers to. The runtime executes the file named by `type` in its CNI bin
/// directory, so the shim is installed there as `margay` (install-cni copies `margay-cni` to that name);
/// `margay-cni` is accepted too, for setups that install the binary under its own name.
pub const PLUGIN_TYPE: &str = "margay";
const PLUGIN_TYPE_ALIAS: &str = "margay-cni";

/// The CNI spec versions margay speaks. Results are encoded in the version of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// Every version `VERSION` reports, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    /// The newest version: used for errors when the configuration's own version is unknown.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists since spec 0.4.0.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist since spec 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` in each `ips[]` entry.
    fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CniVersion {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self, CniError> {
        CniVersion::ALL
            .iter()
            .copied()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::new(
                    codes::INCOMPATIBLE_CNI_VERSION,
                    format!("incompatible CNI version {s:?}"),
                    format!("margay-cni supports {}", supported_versions().join(", ")),
                )
            })
    }
}

/// The `supportedVersions` list of the VERSION answer.
pub fn supported_versions() -> Vec<&'static str> {
    CniVersion::ALL.iter().map(|v| v.as_str()).collect()
}

/// The spec's rules for `CNI_CONTAINERID`: non-empty, alphanumerics plus `_ . -`, starting alphanumeric.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_env(format!(
            "CNI_CONTAINERID {id:?} is invalid: use letters, digits, '_', '.', '-', starting with a letter or digit"
        )))
    }
}

/// The spec's rules for `CNI_IFNAME`: 1..15 bytes (IFNAMSIZ), not `.`/`..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_env(format!(
            "CNI_IFNAME {name:?} is invalid: 1 to 15 characters, not '.' or '..', without '/', ':' or spaces"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(extra: Value) -> Vec<u8> {
        let mut base = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "margay"});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&base).unwrap()
    }

    #[test]
    fn host_veth_mode_parses_and_refuses_bad_configs() {
        let c = NetConf::parse(&conf(json!({"mode": "host-veth"}))).unwrap();
        let hv = c.host_veth.unwrap();
        assert_eq!(hv.veth_name, DEFAULT_HOST_VETH_NAME);
        assert!(hv.service_routes && hv.extra_routes.is_empty());
        let c = NetConf::parse(&conf(json!({"mode": "host-veth", "veth_name": "hv0",
            "extra_routes": ["10.0.0.0/8"], "service_routes": false})))
        .unwrap();
        let hv = c.host_veth.unwrap();
        assert_eq!(hv.veth_name, "hv0");
        assert_eq!(hv.extra_routes[0].to_string(), "10.0.0.0/8");
        assert!(!hv.service_routes);
        assert!(NetConf::parse(&conf(json!({})))
            .unwrap()
            .host_veth
            .is_none());
        for (bad, says) in [
            (json!({"mode": "hostveth"}), "mode"),
            (
                json!({"mode": "host-veth", "veth_name": "a/b"}),
                "veth_name",
            ),
            (
                json!({"mode": "host-veth", "extra_routes": ["10.1.0.0/8"]}),
                "host bits",
            ),
            (
                json!({"mode": "host-veth", "extra_routes": "10.0.0.0/8"}),
                "extra_routes",
            ),
            (
                json!({"mode": "host-veth", "service_routes": "yes"}),
                "service_routes",
            ),
            (
                json!({"mode": "host-veth", "ipv4_pools": ["10.0.0.0/8"]}),
                "IPAM",
            ),
            (json!({"veth_name": "hv0"}), "host-veth"),
        ] {
            let e = NetConf::parse(&conf(bad.clone())).unwrap_err();
            assert_eq!(e.code, codes::INVALID_NETWORK_CONFIG, "{bad}: {e}");
            assert!(e.msg.contains(says), "{bad}: {}", e.msg);
        }
    }

    #[test]
    fn versions_parse_order_and_features() {
        for v in CniVersion::ALL {
            assert_eq!(v.as_str().parse::<CniVersion>().unwrap(), v);
        }
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc());
        assert!(CniVersion::V1_1_0.has_status_and_gc());
        let e = "0.2.0".parse::<CniVersion>().unwrap_err();
        assert_eq!(e.code, codes::INCOMPATIBLE_CNI_VERSION);
        assert!(e.details.contains("1.0.0"), "{e}");
        let vi = version_info(CniVersion::V1_1_0);
        assert_eq!(
            vi["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = NetConf::parse(&conf(json!({}))).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "k8s-pod-network");
        assert_eq!(c.socket, DEFAULT_SOCKET);
        assert_eq!(c.mtu, None);
        assert!(c.ipv4_pools.is_empty() && c.ipv6_pools.is_empty());
        assert_eq!(c.log_level, LogLevel::Info);
        assert!(c.prev_result.is_none() && c.runtime_config.is_none());
    }

    #[test]
    fn full_config_parses() {
        let c = NetConf::parse(&conf(json!({
            "mtu": 1440, "socket": "/run/x.sock", "log_file": "/tmp/l", "log_level": "debug",
            "ipv4_pools": ["10.65.0.0/16", "pool-a"], "ipam": {"ipv6_pools": ["fd00:65::/48"]},
            "timeout_seconds": 5, "runtimeConfig": {"portMappings": []}, "unknownField": 1,
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]
        })))
        .unwrap();
        assert_eq!(c.mtu, Some(1440));
        assert_eq!(c.socket, "/run/x.sock");
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.timeout_seconds, Some(5));
        assert_eq!(
            c.ipv4_pools,
            vec![
                PoolRef::Cidr(cidr::parse("10.65.0.0/16").unwrap()),
                PoolRef::Name("pool-a".into())
            ]
        );
        assert_eq!(
            c.ipv6_pools,
            vec![PoolRef::Cidr(cidr::parse("fd00:65::/48").unwrap())]
        );
        assert_eq!(c.runtime_config, Some(json!({"portMappings": []})));
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "abc");
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases: Vec<(Vec<u8>, u32, &str)> = vec![
            (b"{not json".to_vec(), codes::DECODING_FAILURE, "not JSON"),
            (
                b"[1]".to_vec(),
                codes::DECODING_FAILURE,
                "not a JSON object",
            ),
            (conf(json!({"type": "bridge"})), 7, "\"bridge\""),
            (conf(json!({"name": ""})), 7, "\"name\""),
            (conf(json!({"cniVersion": "0.2.0"})), 1, "0.2.0"),
            (conf(json!({"cniVersion": 1})), 7, "cniVersion"),
            (conf(json!({"mtu": 20})), 7, "mtu"),
            (conf(json!({"mtu": "1500"})), 7, "mtu"),
            (conf(json!({"socket": "rel.sock"})), 7, "absolute"),
            (conf(json!({"ipv4_pools": ["10.0.0.1/16"]})), 7, "host bits"),
            (
                conf(json!({"ipv4_pools": ["fd00::/48"]})),
                7,
                "IPv6 CIDR in the IPv4",
            ),
            (conf(json!({"ipv6_pools": ["Bad_Name"]})), 7, "neither"),
            (conf(json!({"ipv4_pools": "10.0.0.0/8"})), 7, "list"),
            (conf(json!({"log_level": "loud"})), 7, "log_level"),
            (conf(json!({"timeout_seconds": 0})), 7, "timeout_seconds"),
            (conf(json!({"prevResult": {"ip4": {}}})), 6, "0.2"),
        ];
        for (bytes, code, needle) in cases {
            let e = NetConf::parse(&bytes).unwrap_err();
            assert_eq!(e.code, code, "{e} for {}", String::from_utf8_lossy(&bytes));
            assert!(
                e.msg.contains(needle) || e.details.contains(needle),
                "{e:?} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn mtu_zero_means_auto() {
        assert_eq!(NetConf::parse(&conf(json!({"mtu": 0}))).unwrap().mtu, None);
    }

    #[test]
    fn cni_args_known_unknown_and_ignore_unknown() {
        let a = CniArgs::parse(
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1",
        )
        .unwrap();
        assert_eq!(a.k8s_pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.k8s_pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.k8s_pod_infra_container_id.as_deref(), Some("abc"));
        assert_eq!(a.k8s_pod_uid.as_deref(), Some("u1"));
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());

        let e = CniArgs::parse("K8S_POD_NAME=x;FOO=bar").unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("FOO"), "{e}");

        // IgnoreUnknown works wherever it sits and in both spellings.
        for s in ["FOO=bar;IgnoreUnknown=1", "IgnoreUnknown=true;FOO=bar;"] {
            let a = CniArgs::parse(s).unwrap();
            assert_eq!(a.ignored.get("FOO").map(String::as_str), Some("bar"));
        }
        assert!(CniArgs::parse("IgnoreUnknown=0;FOO=bar").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=maybe").is_err());
        assert!(CniArgs::parse("novalue").is_err());
        assert!(CniArgs::parse("a=b=c").is_err());
    }

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "mg0123456789a".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    mtu: None,
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:41:00:07".into()),
                    mtu: Some(1440),
                    sandbox: Some("/var/run/netns/p1".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.65.0.7/32".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:65::7/128".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn result_encodes_per_version() {
        let r = sample();
        let v1 = r.encode(CniVersion::V1_0_0);
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["ips"][0]["address"], "10.65.0.7/32");
        assert_eq!(v1["ips"][1]["interface"], 1);
        assert!(v1["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v1["interfaces"][1]["sandbox"], "/var/run/netns/p1");
        assert!(v1["interfaces"][1].get("mtu").is_none(), "mtu is 1.1 only");
        assert_eq!(v1["routes"][0]["gw"], "169.254.1.1");

        let v11 = r.encode(CniVersion::V1_1_0);
        assert_eq!(v11["interfaces"][1]["mtu"], 1440);

        for v in [CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let old = r.encode(v);
            assert_eq!(old["cniVersion"], v.as_str());
            assert_eq!(old["ips"][0]["version"], "4");
            assert_eq!(old["ips"][1]["version"], "6");
        }
        // Every encoding reads back to the same model (mtu aside before 1.1).
        for v in CniVersion::ALL {
            let mut want = r.clone();
            if v < CniVersion::V1_1_0 {
                want.interfaces[1].mtu = None;
            }
            assert_eq!(CniResult::decode(&r.encode(v)).unwrap(), want, "{v}");
        }
    }

    #[test]
    fn decode_rejects_dangling_interface_index() {
        let mut v = sample().encode(CniVersion::V1_0_0);
        v["ips"][0]["interface"] = json!(7);
        assert!(CniResult::decode(&v).unwrap_err().contains("interface 7"));
    }

    #[test]
    fn merge_shifts_interface_indices() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "other0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = prev.merged_with(sample());
        assert_eq!(m.interfaces.len(), 3);
        assert_eq!(m.ips[0].interface, Some(2));
    }

    #[test]
    fn error_object_shape() {
        let e = CniError::new(11, "try later", "");
        assert_eq!(
            e.to_json("0.4.0"),
            json!({"cniVersion": "0.4.0", "code": 11, "msg": "try later"})
        );
        let e = CniError::new(7, "bad", "why");
        assert_eq!(e.to_json("1.0.0")["details"], "why");
    }

    #[test]
    fn container_id_and_ifname_rules() {
        assert!(validate_container_id("a1b2_c.d-e").is_ok());
        for bad in ["", "-abc", "a/b", "a b"] {
            assert_eq!(validate_container_id(bad).unwrap_err().code, 4);
        }
        assert!(validate_ifname("eth0").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert_eq!(validate_ifname(bad).unwrap_err().code, 4, "{bad}");
        }
    }

    #[test]
    fn cidr_parse_and_network_check() {
        let c = cidr::parse("10.65.0.0/26").unwrap();
        assert!(cidr::is_network(&c));
        assert!(!cidr::is_network(&cidr::parse("10.65.0.1/26").unwrap()));
        assert!(cidr::is_network(&cidr::parse("0.0.0.0/0").unwrap()));
        assert!(cidr::parse("10.0.0.0/33").is_err());
        assert!(cidr::parse("fd00::/129").is_err());
        assert!(cidr::parse("nope/8").is_err());
        // A bare address is not a CIDR here (ipnetwork alone would read it as /32).
        assert!(cidr::parse("10.65.0.1").is_err());
        assert_eq!(
            cidr::host("fd00::1".parse().unwrap()).to_string(),
            "fd00::1/128"
        );
        // JSON both ways as before: the string form, the strict parser.
        let r: Route = serde_json::from_str(r#"{"dst":"10.0.0.0/8"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"dst":"10.0.0.0/8"}"#
        );
        assert!(serde_json::from_str::<Route>(r#"{"dst":"10.0.0.0"}"#).is_err());
    }
}
