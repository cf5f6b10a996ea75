//! Long-lived graceful restart (RFC 9494) settings, carried as an annotation so calicoctl's strict schema
//! still accepts the resources: `margay.io/llgr-stale-time` on a BGPPeer (its sessions) and on the default
//! BGPConfiguration (every session between Calico nodes: the mesh, and BGPPeers whose peer is a Calico Node,
//! such as a route reflector). Parsing, validation and the defaults live here.

#[allow(unused_imports)]
use super::*;

/// The annotation: a Go duration (`24h`, `3600s`), or `0` for LLGR off.
pub const LLGR_STALE_TIME_ANNOTATION: &str = "margay.io/llgr-stale-time";

/// Default Long-Lived Stale Time for sessions between Calico nodes (mesh, node <-> route reflector): one
/// day. A reflector outage (every reflector down, a bad rollout, a power cycle) then costs no pod route for a
/// day, long enough for an operator to notice and repair it overnight; stale routes still lose to any fresh
/// one, and the next hop of a node's block is that node itself, so a stale route cannot loop through a
/// third router (the hop-by-hop risk RFC 9494 section 5 warns about).
pub const DEFAULT_LLGR_STALE_TIME: Duration = Duration::from_secs(86_400);

/// The largest Long-Lived Stale Time the capability carries (24 bits of seconds, RFC 9494 3.1).
pub const MAX_LLGR_STALE_TIME: Duration = Duration::from_secs(0x00ff_ffff);

/// The stale time an annotation value asks for (`0` = off), or why it cannot be used, in words that name the
/// fix.
pub fn parse_llgr_stale_time(value: &str) -> Result<Duration, String> {
    let d = value.parse::<GoDuration>().map(|d| d.0).map_err(|e| {
        format!("{e}; use a duration such as \"24h\" or \"3600s\", or \"0\" to turn LLGR off")
    })?;
    if d > MAX_LLGR_STALE_TIME {
        return Err(format!(
            "at most {}s (the 24-bit Long-Lived Stale Time of RFC 9494); use \"0\" to turn LLGR off",
            MAX_LLGR_STALE_TIME.as_secs()
        ));
    }
    if !d.is_zero() && d < Duration::from_secs(1) {
        return Err(
            "below 1s: the stale time is counted in whole seconds; use \"0\" to turn LLGR off"
                .into(),
        );
    }
    Ok(d)
}

/// The annotation of a resource, parsed; None when absent. Errors name the resource, the annotation, the
/// value and the fix.
pub fn llgr_annotation(kind: &str, meta: &ObjectMeta) -> Result<Option<Duration>, ConfigError> {
    let Some(v) = meta.annotations.get(LLGR_STALE_TIME_ANNOTATION) else {
        return Ok(None);
    };
    parse_llgr_stale_time(v).map(Some).map_err(|reason| {
        ConfigError::new(
            kind,
            &meta.name,
            &format!("metadata.annotations[{LLGR_STALE_TIME_ANNOTATION}]"),
            v,
            reason,
        )
    })
}

impl BgpPeer {
    /// The BGPPeer's own Long-Lived Stale Time (annotation), if it sets one (validated at load).
    pub fn llgr_stale_time(&self) -> Option<Duration> {
        llgr_annotation(KIND_BGP_PEER, &self.metadata)
            .ok()
            .flatten()
    }
}

impl BgpConfiguration {
    /// The Long-Lived Stale Time of sessions between Calico nodes (the mesh, and BGPPeers towards Calico
    /// Nodes without their own annotation): the annotation, else [`DEFAULT_LLGR_STALE_TIME`].
    pub fn node_llgr_stale_time(&self) -> Duration {
        llgr_annotation(KIND_BGP_CONFIGURATION, &self.metadata)
            .ok()
            .flatten()
            .unwrap_or(DEFAULT_LLGR_STALE_TIME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(parse_llgr_stale_time("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_llgr_stale_time("24h"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_llgr_stale_time("3600s"),
            Ok(Duration::from_secs(3600))
        );
        assert!(parse_llgr_stale_time("16777215s").is_ok());
        for bad in ["", "1d", "forever", "16777216s", "-5s", "500ms"] {
            let e = parse_llgr_stale_time(bad).expect_err(bad);
            assert!(e.contains("\"0\""), "{bad}: the fix is named: {e}");
        }
    }

    #[test]
    fn a_bad_annotation_names_resource_annotation_value_and_fix() {
        let mut meta = ObjectMeta {
            name: "rr".into(),
            ..Default::default()
        };
        meta.annotations
            .insert(LLGR_STALE_TIME_ANNOTATION.into(), "a day".into());
        let e = llgr_annotation(KIND_BGP_PEER, &meta).expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains("BGPPeer \"rr\"")
                && text.contains("margay.io/llgr-stale-time")
                && text.contains("a day")
                && text.contains("24h"),
            "{text}"
        );
    }
}
