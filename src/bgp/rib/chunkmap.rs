//! An ordered map stored as a list of sorted, fixed-capacity chunks: the Loc-RIB's prefix index.
//!
//! Why not `BTreeMap`: a route table is mostly loaded in prefix order (a peer's full table, a route
//! generator), and std's B-tree splits a full leaf in the middle even when appending, leaving every leaf about
//! half full: about 47 bytes per IPv4 prefix instead of 24. Here an append to a full last chunk starts a new
//! chunk instead, so an in-order load fills chunks completely; random inserts split a chunk in two halves as a
//! B-tree would. Lookups are two binary searches (over chunk first keys, then inside one chunk).

/// Entries per chunk. Small enough that an insert in the middle of a chunk moves at most a few KB.
const CAP: usize = 128;

#[derive(Debug, Clone)]
struct Chunk<K, V> {
    keys: Vec<K>,
    vals: Vec<V>,
}

impl<K, V> Chunk<K, V> {
    fn new() -> Self {
        Chunk {
            keys: Vec::with_capacity(CAP),
            vals: Vec::with_capacity(CAP),
        }
    }
}

/// Where a key is, or would be inserted: (chunk index, index in chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos(usize, usize);

#[derive(Debug, Clone)]
pub(crate) struct ChunkMap<K, V> {
    /// First key of each chunk, for the outer binary search.
    firsts: Vec<K>,
    chunks: Vec<Chunk<K, V>>,
    len: usize,
}

impl<K, V> Default for ChunkMap<K, V> {
    fn default() -> Self {
        ChunkMap {
            firsts: Vec::new(),
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Copy, V> ChunkMap<K, V> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Ok(position) when present, Err(insert position) when not.
    pub fn find(&self, key: &K) -> Result<Pos, Pos> {
        if self.chunks.is_empty() {
            return Err(Pos(0, 0));
        }
        // The last chunk whose first key is <= key (or chunk 0).
        let ci = self.firsts.partition_point(|f| f <= key).saturating_sub(1);
        match self.chunks[ci].keys.binary_search(key) {
            Ok(i) => Ok(Pos(ci, i)),
            Err(i) => Err(Pos(ci, i)),
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|Pos(c, i)| &self.chunks[c].vals[i])
    }

    pub fn at_mut(&mut self, p: Pos) -> &mut V {
        &mut self.chunks[p.0].vals[p.1]
    }

    /// Insert at a position `find` returned as Err; returns the entry's new position.
    pub fn insert_at(&mut self, p: Pos, key: K, val: V) -> Pos {
        self.len += 1;
        if self.chunks.is_empty() {
            let mut c = Chunk::new();
            c.keys.push(key);
            c.vals.push(val);
            self.chunks.push(c);
            self.firsts.push(key);
            return Pos(0, 0);
        }
        let Pos(ci, i) = p;
        if self.chunks[ci].keys.len() < CAP {
            return self.put(ci, i, key, val);
        }
        if i == CAP {
            // Appending after a full chunk: use the next chunk's free room, or start a new chunk (in-order
            // loads end up with full chunks).
            if ci + 1 < self.chunks.len() && self.chunks[ci + 1].keys.len() < CAP {
                return self.put(ci + 1, 0, key, val);
            }
            let mut c = Chunk::new();
            c.keys.push(key);
            c.vals.push(val);
            self.chunks.insert(ci + 1, c);
            self.firsts.insert(ci + 1, key);
            return Pos(ci + 1, 0);
        }
        // Split in halves, then insert into the half the key belongs to.
        let mut right = Chunk::new();
        right.keys.extend(self.chunks[ci].keys.drain(CAP / 2..));
        right.vals.extend(self.chunks[ci].vals.drain(CAP / 2..));
        self.firsts.insert(ci + 1, right.keys[0]);
        self.chunks.insert(ci + 1, right);
        if i <= CAP / 2 {
            self.put(ci, i, key, val)
        } else {
            self.put(ci + 1, i - CAP / 2, key, val)
        }
    }

    fn put(&mut self, ci: usize, i: usize, key: K, val: V) -> Pos {
        let c = &mut self.chunks[ci];
        c.keys.insert(i, key);
        c.vals.insert(i, val);
        if i == 0 {
            self.firsts[ci] = key;
        }
        Pos(ci, i)
    }

    /// Remove the entry at a position `find` returned as Ok.
    pub fn remove_at(&mut self, p: Pos) -> V {
        let Pos(ci, i) = p;
        self.len -= 1;
        let c = &mut self.chunks[ci];
        c.keys.remove(i);
        let v = c.vals.remove(i);
        if c.keys.is_empty() {
            self.chunks.remove(ci);
            self.firsts.remove(ci);
        } else if i == 0 {
            self.firsts[ci] = c.keys[0];
        }
        v
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.chunks
            .iter()
            .flat_map(|c| c.keys.iter().zip(c.vals.iter()))
    }

    /// The entries from `key` on (`key` itself when present), in key order: a walk resumed where it stopped.
    pub fn iter_from(&self, key: &K) -> impl Iterator<Item = (&K, &V)> {
        let (Ok(Pos(ci, i)) | Err(Pos(ci, i))) = self.find(key);
        self.chunks
            .iter()
            .skip(ci)
            .enumerate()
            .flat_map(move |(n, c)| {
                let start = if n == 0 { i.min(c.keys.len()) } else { 0 };
                c.keys[start..].iter().zip(c.vals[start..].iter())
            })
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.chunks
            .iter_mut()
            .flat_map(|c| c.keys.iter().zip(c.vals.iter_mut()))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.chunks.iter_mut().flat_map(|c| c.vals.iter_mut())
    }

    /// Keep the entries for which `f` returns true (`f` may also modify them), in key order.
    pub fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        for c in &mut self.chunks {
            let mut keep = Vec::with_capacity(c.keys.len());
            for (k, v) in c.keys.iter().zip(c.vals.iter_mut()) {
                keep.push(f(k, v));
            }
            if keep.iter().all(|k| *k) {
                continue;
            }
            let mut it = keep.iter();
            c.keys.retain(|_| *it.next().unwrap_or(&true));
            let mut it = keep.iter();
            c.vals.retain(|_| *it.next().unwrap_or(&true));
        }
        self.chunks.retain(|c| !c.keys.is_empty());
        self.firsts = self.chunks.iter().map(|c| c.keys[0]).collect();
        self.len = self.chunks.iter().map(|c| c.keys.len()).sum();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn insert(m: &mut ChunkMap<u32, u32>, k: u32, v: u32) {
        match m.find(&k) {
            Ok(p) => *m.at_mut(p) = v,
            Err(p) => {
                m.insert_at(p, k, v);
            }
        }
    }

    #[test]
    fn in_order_load_fills_chunks() {
        let mut m = ChunkMap::default();
        for k in 0..(CAP as u32 * 10) {
            insert(&mut m, k, k);
        }
        assert_eq!(m.chunks.len(), 10);
        assert!(m.chunks.iter().all(|c| c.keys.len() == CAP));
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreemap(ops in prop::collection::vec((0u8..4, 0u32..2000, any::<u32>()), 1..3000)) {
            let mut m = ChunkMap::default();
            let mut b = BTreeMap::new();
            for (op, k, v) in ops {
                match op {
                    0 | 1 => { insert(&mut m, k, v); b.insert(k, v); }
                    2 => {
                        let got = m.find(&k).ok().map(|p| m.remove_at(p));
                        prop_assert_eq!(got, b.remove(&k));
                    }
                    _ => {
                        // Drop keys divisible by (v % 7 + 2), bump the others.
                        let d = v % 7 + 2;
                        m.retain(|k, v| { *v = v.wrapping_add(1); k % d != 0 });
                        b.retain(|k, v| { *v = v.wrapping_add(1); k % d != 0 });
                    }
                }
                prop_assert_eq!(m.len(), b.len());
                prop_assert_eq!(m.get(&k), b.get(&k));
            }
            let got: Vec<(u32, u32)> = m.iter().map(|(k, v)| (*k, *v)).collect();
            let want: Vec<(u32, u32)> = b.into_iter().collect();
            prop_assert_eq!(got, want);
            for (ci, c) in m.chunks.iter().enumerate() {
                prop_assert!(!c.keys.is_empty() && c.keys.len() <= CAP);
                prop_assert_eq!(m.firsts[ci], c.keys[0]);
            }
        }
    }
}
