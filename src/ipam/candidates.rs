//! Which blocks of a pool a node tries to claim, in which order. Pure.
//!
//! Like Calico (`findUsableBlock`), the walk starts at an offset that depends only on the node name (FNV-1a
//! 32-bit hash), so nodes spread over the pool instead of all racing for its first block, and a node
//! restarting walks the same way. Existing blocks are skipped by the caller.

use ipnetwork::IpNetwork;

use super::block::{nth_ip, prefix_size};

/// FNV-1a, 32 bit.
pub fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// How many blocks of prefix `block_len` fit in `pool`.
pub fn block_count(pool: &IpNetwork, block_len: u8) -> u128 {
    let diff = u32::from(block_len.saturating_sub(pool.prefix()));
    if diff >= 128 {
        u128::MAX
    } else {
        1u128 << diff
    }
}

/// The `i`-th block of `pool`.
pub fn block_at(pool: &IpNetwork, block_len: u8, i: u128) -> IpNetwork {
    let size = prefix_size(&match pool {
        IpNetwork::V4(_) => IpNetwork::new(pool.network(), block_len).unwrap_or(*pool),
        IpNetwork::V6(_) => IpNetwork::new(pool.network(), block_len).unwrap_or(*pool),
    });
    let ip = nth_ip(pool, i.wrapping_mul(size));
    IpNetwork::new(ip, block_len).unwrap_or(*pool)
}

/// Every block of `pool`, starting at the node's offset and wrapping around.
pub fn candidates(pool: &IpNetwork, block_len: u8, node: &str) -> impl Iterator<Item = IpNetwork> {
    let pool = *pool;
    let m = block_count(&pool, block_len);
    let start = u128::from(fnv1a32(node)) % m;
    (0..m).map(move |i| block_at(&pool, block_len, (start + i) % m))
}

/// The block of prefix `block_len` containing `ip`.
pub fn block_containing(ip: std::net::IpAddr, block_len: u8) -> Option<IpNetwork> {
    let n = IpNetwork::new(ip, block_len).ok()?;
    IpNetwork::new(n.network(), block_len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn walks_every_block_once_from_a_name_dependent_start() {
        let pool: IpNetwork = "10.0.0.0/24".parse().unwrap();
        let a: Vec<_> = candidates(&pool, 26, "node-a").collect();
        assert_eq!(a.len(), 4);
        assert_eq!(a.iter().collect::<BTreeSet<_>>().len(), 4);
        for b in &a {
            assert_eq!(b.prefix(), 26);
            assert!(pool.contains(b.network()));
        }
        let starts: BTreeSet<_> = (0..16)
            .map(|i| candidates(&pool, 26, &format!("n{i}")).next().unwrap())
            .collect();
        assert!(starts.len() > 1, "start must depend on the node name");
        let v6: IpNetwork = "fd00::/120".parse().unwrap();
        let b: Vec<_> = candidates(&v6, 122, "x").collect();
        assert_eq!(b.len(), 4);
        assert_eq!(fnv1a32(""), 0x811c_9dc5);
        assert_eq!(fnv1a32("a"), 0xe40c_292c);
        assert_eq!(
            block_containing("10.0.0.77".parse().unwrap(), 26),
            Some("10.0.0.64/26".parse().unwrap())
        );
    }
}
