//! When a BGP speaker may trust what its peers sent after a (re)start: every configured peer
//! Established and its End-of-RIB received (RFC 4724 2), with two bounds so that a peer that never comes
//! back cannot hold the speaker forever. The node uses it before sweeping the routes it adopted from the
//! kernel; the reflector before ending its route-selection deferral (RFC 4724 4.1).

use std::time::Duration;

use super::speaker::PeerSync;

/// Has BGP converged? None: yes; Some(reason): not yet. Converged when every configured peer is
/// Established and sent End-of-RIB; or, after `min_wait`, when every *Established* peer has (peers that
/// are down are not waited for); or when `max_wait` has passed.
pub fn convergence(
    peers: &[PeerSync],
    elapsed: Duration,
    min_wait: Duration,
    max_wait: Duration,
) -> Option<String> {
    let pending: Vec<String> = peers
        .iter()
        .filter(|p| p.established && !p.end_of_rib)
        .map(|p| p.address.to_string())
        .collect();
    let down: Vec<String> = peers
        .iter()
        .filter(|p| !p.established)
        .map(|p| p.address.to_string())
        .collect();
    if (pending.is_empty() && (down.is_empty() || elapsed >= min_wait)) || elapsed >= max_wait {
        return None;
    }
    let mut why = Vec::new();
    if !pending.is_empty() {
        why.push(format!(
            "End-of-RIB not yet received from {}",
            pending.join(", ")
        ));
    }
    if !down.is_empty() {
        why.push(format!(
            "waiting up to {} s for {} to be Established",
            min_wait.as_secs(),
            down.join(", ")
        ));
    }
    Some(format!(
        "BGP converging ({:.0} s of at most {} s): {}",
        elapsed.as_secs_f64(),
        max_wait.as_secs(),
        why.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(a: &str, established: bool, end_of_rib: bool) -> PeerSync {
        PeerSync {
            address: a.parse().unwrap(),
            established,
            end_of_rib,
        }
    }

    const MIN: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(120);

    #[test]
    fn no_peers_is_converged_at_once() {
        assert_eq!(convergence(&[], Duration::ZERO, MIN, MAX), None);
    }

    #[test]
    fn every_peer_done_is_converged_before_the_minimum_wait() {
        let p = [peer("10.0.0.1", true, true), peer("10.0.0.2", true, true)];
        assert_eq!(convergence(&p, Duration::ZERO, MIN, MAX), None);
    }

    #[test]
    fn an_established_peer_without_end_of_rib_holds_until_the_bound() {
        let p = [peer("10.0.0.1", true, true), peer("10.0.0.2", true, false)];
        let why = convergence(&p, Duration::from_secs(60), MIN, MAX).expect("not converged");
        assert!(why.contains("10.0.0.2"), "{why}");
        assert!(!why.contains("10.0.0.1"), "{why}");
        assert_eq!(convergence(&p, MAX, MIN, MAX), None);
    }

    #[test]
    fn a_down_peer_is_waited_for_only_the_minimum() {
        let p = [peer("10.0.0.1", true, true), peer("10.0.0.3", false, false)];
        let why = convergence(&p, Duration::from_secs(1), MIN, MAX).expect("not converged");
        assert!(
            why.contains("10.0.0.3") && why.contains("Established"),
            "{why}"
        );
        assert_eq!(convergence(&p, MIN, MIN, MAX), None);
    }
}
