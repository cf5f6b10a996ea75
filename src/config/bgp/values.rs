//! Value types shared by the BGP resources: AS numbers, Go durations, passwords, next-hop and
//! source-address modes, communities, prefix advertisements.

#[allow(unused_imports)]
use super::*;

/// An AS number as Calico accepts it (`numorstring.ASNumber`): an integer, a decimal string, or asdot
/// notation `"1.10"` (= 1 * 65536 + 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AsNumber(pub u32);

impl FromStr for AsNumber {
    type Err = String;
    fn from_str(s: &str) -> Result<AsNumber, String> {
        let s = s.trim();
        if let Some((hi, lo)) = s.split_once('.') {
            let hi: u16 = hi
                .parse()
                .map_err(|_| format!("{s:?} is not an AS number (asdot high part)"))?;
            let lo: u16 = lo
                .parse()
                .map_err(|_| format!("{s:?} is not an AS number (asdot low part)"))?;
            return Ok(AsNumber((u32::from(hi) << 16) | u32::from(lo)));
        }
        s.parse::<u32>()
            .map(AsNumber)
            .map_err(|_| format!("{s:?} is not an AS number (0..4294967295 or asdot a.b)"))
    }
}

impl<'de> Deserialize<'de> for AsNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AsNumber, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = AsNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an AS number (0..4294967295, or asdot \"a.b\")")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<AsNumber, E> {
                u32::try_from(n)
                    .map(AsNumber)
                    .map_err(|_| E::custom(format!("AS number {n} does not fit in 32 bits")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<AsNumber, E> {
                u32::try_from(n)
                    .map(AsNumber)
                    .map_err(|_| E::custom(format!("AS number {n} is out of range 0..4294967295")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<AsNumber, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for AsNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

/// A Go duration (`15m`, `90s`, `1m30s`) for a flag.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<GoDuration>().map(|d| d.0)
}

/// A Go `time.Duration` string as Kubernetes `metav1.Duration` carries it: `"120s"`, `"1m30s"`, `"500ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GoDuration(pub Duration);

impl FromStr for GoDuration {
    type Err = String;
    fn from_str(text: &str) -> Result<GoDuration, String> {
        let bad = || {
            format!("{text:?} is not a duration (examples: \"120s\", \"2m\", \"1m30s\", \"500ms\")")
        };
        let s = text.trim();
        if s == "0" {
            return Ok(GoDuration(Duration::ZERO));
        }
        if s.is_empty() {
            return Err(bad());
        }
        let mut total = 0f64;
        let mut rest = s;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            if num_end == 0 {
                return Err(bad());
            }
            let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
            rest = &rest[num_end..];
            let unit_end = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_end] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                _ => return Err(bad()),
            };
            total += value * scale;
            rest = &rest[unit_end..];
        }
        Ok(GoDuration(Duration::from_secs_f64(total)))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<GoDuration, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", self.0.as_secs_f64()))
    }
}

/// A reference to a key of a Kubernetes Secret (BGPPeer `password.secretKeyRef`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// BGP password source (`BGPPassword`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPassword {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// BGPPeer `nextHopMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum NextHopMode {
    #[default]
    Auto,
    #[serde(rename = "Self")]
    SelfAddr,
    Keep,
}

/// BGPPeer `sourceAddress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SourceAddress {
    #[default]
    UseNodeIP,
    None,
}

/// BGPPeer `reversePeering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReversePeering {
    #[default]
    Auto,
    Manual,
}

/// BGPConfiguration `bindMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BindMode {
    #[default]
    None,
    NodeIP,
}

/// `{cidr: ...}` entries of the service IP lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrEntry {
    pub cidr: String,
}

/// A named community (`communities[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Community {
    pub name: String,
    pub value: String,
}

/// `prefixAdvertisements[]`: communities to attach to routes inside `cidr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixAdvertisement {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
}

// ----- BGPConfiguration -----

pub(super) fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    s.parse::<IpNetwork>()
        .map_err(|_| "not a CIDR (e.g. 10.96.0.0/12)".to_string())
}

/// A community literal: `aa:nn` (RFC 1997, 16-bit parts) or `aa:nn:mm` (RFC 8092 large, 32-bit parts).
pub fn parse_community(s: &str) -> Result<Vec<u32>, String> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.len() {
        2 => parts
            .iter()
            .map(|p| {
                p.parse::<u16>()
                    .map(u32::from)
                    .map_err(|_| format!("{p:?} is not 0..65535"))
            })
            .collect(),
        3 => parts
            .iter()
            .map(|p| {
                p.parse::<u32>()
                    .map_err(|_| format!("{p:?} is not 0..4294967295"))
            })
            .collect(),
        _ => Err("a community is aa:nn (standard) or aa:nn:mm (large)".into()),
    }
}

// ----- Secrets (for passwords) -----
