//! The JSON of Docker's remote network driver and IPAM driver protocols (libnetwork `docs/remote.md`,
//! `docs/ipam.md`): `POST /<Interface>.<Method>`, Go field names as written. Pure serde types: no I/O.
//!
//! Requests are parsed leniently (fields Docker may leave out default to empty), and unknown fields are
//! ignored: a newer Docker adding a field must not break the plugin.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Docker's option key carrying the `-o k=v` driver options of `docker network create`.
pub const GENERIC_OPTIONS: &str = "com.docker.network.generic";
/// Docker's option key telling whether the network has IPv6 (`--ipv6`).
pub const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
/// `RequestAddress` option marking the gateway request.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
/// `RequestPool` reply data that gives Docker the gateway, so it does not ask for one.
pub const GATEWAY_DATA: &str = "com.docker.network.gateway";
/// The `--ipam-opt` naming the IPPool a network's addresses come from.
pub const POOL_OPTION: &str = "pool";

/// Our address spaces (Docker only passes them back to us).
pub const LOCAL_ADDRESS_SPACE: &str = "MargayLocal";
pub const GLOBAL_ADDRESS_SPACE: &str = "MargayGlobal";

/// Go marshals a nil map or slice as `null`: read it as empty.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `Plugin.Activate` reply.
pub fn activate() -> Value {
    serde_json::json!({"Implements": ["NetworkDriver", "IpamDriver"]})
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct IpamData {
    #[serde(rename = "AddressSpace")]
    pub address_space: String,
    #[serde(rename = "Pool")]
    pub pool: String,
    #[serde(rename = "Gateway")]
    pub gateway: String,
    #[serde(rename = "AuxAddresses", deserialize_with = "null_default")]
    pub aux_addresses: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "Options", deserialize_with = "null_default")]
    pub options: BTreeMap<String, Value>,
    #[serde(rename = "IPv4Data", deserialize_with = "null_default")]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data", deserialize_with = "null_default")]
    pub ipv6_data: Vec<IpamData>,
}

/// `DeleteNetwork`, `Leave`, `DeleteEndpoint`, `EndpointOperInfo`, `*ExternalConnectivity`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct EndpointInterface {
    #[serde(rename = "Address", skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(rename = "AddressIPv6", skip_serializing_if = "String::is_empty")]
    pub address_ipv6: String,
    #[serde(rename = "MacAddress", skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Options", deserialize_with = "null_default")]
    pub options: BTreeMap<String, Value>,
    #[serde(rename = "Interface")]
    pub interface: Option<EndpointInterface>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey")]
    pub sandbox_key: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct RequestPool {
    #[serde(rename = "AddressSpace")]
    pub address_space: String,
    #[serde(rename = "Pool")]
    pub pool: String,
    #[serde(rename = "SubPool")]
    pub sub_pool: String,
    #[serde(rename = "Options", deserialize_with = "null_default")]
    pub options: BTreeMap<String, String>,
    #[serde(rename = "V6")]
    pub v6: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ReleasePool {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Options", deserialize_with = "null_default")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address")]
    pub address: String,
}

/// The `-o k=v` options of `docker network create`, as Docker nests them in `CreateNetwork`'s options.
pub fn driver_options(options: &BTreeMap<String, Value>) -> BTreeMap<String, String> {
    options
        .get(GENERIC_OPTIONS)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_requests() {
        let c: CreateNetwork = serde_json::from_str(
            r#"{"NetworkID":"n1","Options":{"com.docker.network.enable_ipv6":false,
                "com.docker.network.generic":{"a":"b"}},
                "IPv4Data":[{"AddressSpace":"MargayLocal","Gateway":"0.0.0.0/0","Pool":"0.0.0.0/0"}],
                "IPv6Data":[],"Unknown":1}"#,
        )
        .unwrap();
        assert_eq!(c.ipv4_data[0].gateway, "0.0.0.0/0");
        assert_eq!(driver_options(&c.options)["a"], "b");
        let e: CreateEndpoint = serde_json::from_str(
            r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":"10.0.0.1/32","AddressIPv6":"","MacAddress":""}}"#,
        )
        .unwrap();
        assert_eq!(e.interface.unwrap().address, "10.0.0.1/32");
        // Go sends nil maps as `null`.
        let r: RequestAddress =
            serde_json::from_str(r#"{"PoolID":"p","Address":"","Options":null}"#).unwrap();
        assert_eq!(r.pool_id, "p");
    }
}
