//! BFD settings carried as annotations, so calicoctl's strict schema still accepts every resource: on a
//! BGPPeer they apply to the sessions it produces; on the default BGPConfiguration to the node-to-node mesh.
//!
//! ```yaml
//! metadata:
//!   annotations:
//!     margay.io/bfd: "true"            # required to turn BFD on
//!     margay.io/bfd-min-rx: "100ms"    # RequiredMinRxInterval, default 300ms
//!     margay.io/bfd-min-tx: "100ms"    # DesiredMinTxInterval once Up, default 300ms
//!     margay.io/bfd-multiplier: "3"    # DetectMult, default 3
//!     margay.io/bfd-multihop: "false"  # RFC 5883 on UDP 4784 instead of RFC 5881 single hop
//! ```
//!
//! Pure parsing and validation; a bad value is refused naming the resource, the annotation and the value.

use std::collections::BTreeMap;
use std::time::Duration;

use super::meta::{ConfigError, ObjectMeta};

pub const ANNOTATION_BFD: &str = "margay.io/bfd";
pub const ANNOTATION_MIN_RX: &str = "margay.io/bfd-min-rx";
pub const ANNOTATION_MIN_TX: &str = "margay.io/bfd-min-tx";
pub const ANNOTATION_MULTIPLIER: &str = "margay.io/bfd-multiplier";
pub const ANNOTATION_MULTIHOP: &str = "margay.io/bfd-multihop";
const PREFIX: &str = "margay.io/bfd";

/// The shortest interval accepted: below 10 ms a busy node misses its own deadlines and flaps.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest: beyond a minute BFD is slower than a tuned hold timer and has no point.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// BFD for one peer (or the mesh).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BfdConfig {
    pub min_rx: Duration,
    pub min_tx: Duration,
    pub multiplier: u8,
    pub multihop: bool,
}

impl Default for BfdConfig {
    /// 300 ms x 3, FRR bfdd's defaults: a failure is seen in under a second, and a node under CPU load
    /// does not flap.
    fn default() -> BfdConfig {
        BfdConfig {
            min_rx: Duration::from_millis(300),
            min_tx: Duration::from_millis(300),
            multiplier: 3,
            multihop: false,
        }
    }
}

impl BfdConfig {
    /// Detection time if the peer asks for the same figures (RFC 5880 6.8.4).
    pub fn detect_time(&self) -> Duration {
        self.min_rx.max(self.min_tx) * u32::from(self.multiplier)
    }

    /// BFD settings of a resource: None when `margay.io/bfd` is absent or "false".
    pub fn from_meta(kind: &str, meta: &ObjectMeta) -> Result<Option<BfdConfig>, ConfigError> {
        from_annotations(kind, &meta.name, &meta.annotations)
    }
}

/// See [`BfdConfig::from_meta`].
pub fn from_annotations(
    kind: &str,
    name: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<BfdConfig>, ConfigError> {
    let err = |key: &str, value: &str, reason: &str| {
        ConfigError::new(
            kind,
            name,
            &format!("metadata.annotations[{key}]"),
            value,
            reason,
        )
    };
    for (k, v) in annotations {
        if k.starts_with(PREFIX)
            && ![
                ANNOTATION_BFD,
                ANNOTATION_MIN_RX,
                ANNOTATION_MIN_TX,
                ANNOTATION_MULTIPLIER,
                ANNOTATION_MULTIHOP,
            ]
            .contains(&k.as_str())
        {
            return Err(err(
                k,
                v,
                "unknown BFD annotation; known: margay.io/bfd, margay.io/bfd-min-rx, margay.io/bfd-min-tx, \
                 margay.io/bfd-multiplier, margay.io/bfd-multihop",
            ));
        }
    }
    let flag = |key: &str| -> Result<Option<bool>, ConfigError> {
        match annotations.get(key).map(String::as_str) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(v) => Err(err(key, v, "must be \"true\" or \"false\"")),
        }
    };
    let enabled = flag(ANNOTATION_BFD)?;
    let mut c = BfdConfig::default();
    let interval = |key: &str| -> Result<Option<Duration>, ConfigError> {
        let Some(v) = annotations.get(key) else {
            return Ok(None);
        };
        let d = parse_interval(v).ok_or_else(|| {
            err(
                key,
                v,
                "must be a duration such as \"100ms\" or \"1s\" (a bare number is milliseconds)",
            )
        })?;
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
            return Err(err(key, v, "must be between 10ms and 60s"));
        }
        Ok(Some(d))
    };
    if let Some(d) = interval(ANNOTATION_MIN_RX)? {
        c.min_rx = d;
    }
    if let Some(d) = interval(ANNOTATION_MIN_TX)? {
        c.min_tx = d;
    }
    if let Some(v) = annotations.get(ANNOTATION_MULTIPLIER) {
        c.multiplier = v
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|m| *m >= 1)
            .ok_or_else(|| err(ANNOTATION_MULTIPLIER, v, "must be an integer from 1 to 255"))?;
    }
    if let Some(m) = flag(ANNOTATION_MULTIHOP)? {
        c.multihop = m;
    }
    // Timers without the switch are most likely a forgotten `margay.io/bfd: "true"`: say so rather than
    // silently running without BFD.
    if enabled.is_none() {
        if let Some(k) = annotations.keys().find(|k| k.starts_with(PREFIX)) {
            return Err(err(
                k,
                &annotations[k],
                "BFD settings without margay.io/bfd: add margay.io/bfd: \"true\" (or \"false\" to keep them off)",
            ));
        }
    }
    Ok(enabled.unwrap_or(false).then_some(c))
}

/// "100ms", "1s", "1.5s", "250" (milliseconds).
fn parse_interval(v: &str) -> Option<Duration> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        (v, 1e-3)
    };
    let x: f64 = num.trim().parse().ok()?;
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(x * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn off_without_the_switch_and_defaults_with_it() {
        assert_eq!(from_annotations("BGPPeer", "p", &ann(&[])), Ok(None));
        assert_eq!(
            from_annotations("BGPPeer", "p", &ann(&[(ANNOTATION_BFD, "false")])),
            Ok(None)
        );
        assert_eq!(
            from_annotations("BGPPeer", "p", &ann(&[(ANNOTATION_BFD, "true")])),
            Ok(Some(BfdConfig::default()))
        );
    }

    #[test]
    fn reads_every_setting() {
        let c = from_annotations(
            "BGPPeer",
            "tor",
            &ann(&[
                (ANNOTATION_BFD, "true"),
                (ANNOTATION_MIN_RX, "100ms"),
                (ANNOTATION_MIN_TX, "0.2s"),
                (ANNOTATION_MULTIPLIER, "5"),
                (ANNOTATION_MULTIHOP, "true"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.min_rx, Duration::from_millis(100));
        assert_eq!(c.min_tx, Duration::from_millis(200));
        assert_eq!(c.multiplier, 5);
        assert!(c.multihop);
        assert_eq!(c.detect_time(), Duration::from_secs(1));
        let c = from_annotations(
            "BGPPeer",
            "tor",
            &ann(&[(ANNOTATION_BFD, "true"), (ANNOTATION_MIN_RX, "50")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.min_rx, Duration::from_millis(50));
    }

    #[test]
    fn bad_values_name_resource_annotation_and_value() {
        for (k, v, why) in [
            (ANNOTATION_BFD, "yes", "\"true\" or \"false\""),
            (ANNOTATION_MIN_RX, "fast", "duration"),
            (ANNOTATION_MIN_TX, "1ms", "between 10ms and 60s"),
            (ANNOTATION_MIN_TX, "2m", "duration"),
            (ANNOTATION_MULTIPLIER, "0", "1 to 255"),
            (ANNOTATION_MULTIPLIER, "300", "1 to 255"),
            ("margay.io/bfd-min-rxx", "100ms", "unknown BFD annotation"),
        ] {
            let mut a = ann(&[(k, v)]);
            if k != ANNOTATION_BFD {
                a.insert(ANNOTATION_BFD.into(), "true".into());
            }
            let e = from_annotations("BGPPeer", "tor-a", &a).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("BGPPeer") && msg.contains("tor-a"), "{msg}");
            assert!(msg.contains(k), "{msg}");
            assert!(msg.contains(v), "{msg}");
            assert!(msg.contains(why), "{msg}");
        }
    }

    #[test]
    fn timers_without_the_switch_are_refused() {
        let e = from_annotations(
            "BGPConfiguration",
            "default",
            &ann(&[(ANNOTATION_MIN_RX, "100ms")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("add margay.io/bfd"), "{e}");
    }
}
