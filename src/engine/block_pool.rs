//! The KV cache's block manager (vLLM's `BlockPool` with automatic prefix caching): which blocks
//! are in use and by how many sequences, and which hold a full, reusable block of some prompt.
//!
//! A full block is keyed by a hash of every token up to and including it ([`BlockHasher`]), so
//! equal keys mean equal prefixes: a new sequence whose prompt starts with cached blocks takes
//! them instead of recomputing. Blocks are reference-counted. A block nobody references stays
//! cached until the pool needs room: free blocks are handed out least recently freed first,
//! blocks that hold nothing reusable before any cached one.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};

/// A block's content key: 128 bits of hash chained over the whole prefix.
pub type BlockKey = u128;

/// Chained block keys: key(i) = hash(key(i - 1), tokens of block i). Two SipHash states with
/// random keys per pool, so keys are 128 bits and cannot be precomputed by a client to collide.
#[derive(Clone)]
pub struct BlockHasher {
    a: RandomState,
    b: RandomState,
}

impl Default for BlockHasher {
    fn default() -> Self {
        BlockHasher { a: RandomState::new(), b: RandomState::new() }
    }
}

impl BlockHasher {
    /// The key of a block of `tokens` after the prefix keyed `parent`. A first block (no parent)
    /// is keyed with `seed` too: what besides the tokens decides its K and V (the LoRA adapters
    /// applied), so the same prompt under other adapters never shares blocks.
    pub fn key(&self, parent: Option<BlockKey>, seed: u32, tokens: &[u32]) -> BlockKey {
        let half = |s: &RandomState| {
            let mut h = s.build_hasher();
            h.write_u128(parent.unwrap_or(0));
            h.write_u8(parent.is_some() as u8);
            if parent.is_none() {
                h.write_u32(seed);
            }
            for &t in tokens {
                h.write_u32(t);
            }
            h.finish()
        };
        ((half(&self.a) as u128) << 64) | half(&self.b) as u128
    }

    /// Keys of every full block of `tokens`, in blocks of `block_size`, continuing `keys`.
    pub fn extend(&self, keys: &mut Vec<BlockKey>, seed: u32, tokens: &[u32], block_size: usize) {
        for i in keys.len()..tokens.len() / block_size {
            let key = self.key(keys.last().copied(), seed, &tokens[i * block_size..(i + 1) * block_size]);
            keys.push(key);
        }
    }
}

/// Reference counts, the prefix cache and the free queue of a pool of `blocks` blocks.
pub struct BlockPool {
    refs: Vec<u32>,
    /// The content key of each block that holds a registered full block.
    key_of: Vec<Option<BlockKey>>,
    cached: HashMap<BlockKey, u32>,
    /// Free blocks (refs == 0) by eviction order: the smallest stamp goes first.
    free: BTreeMap<i64, u32>,
    stamp_of: Vec<i64>,
    /// Stamps for cached blocks count up (evicted last, least recently freed first); stamps for
    /// blocks with nothing to reuse count down (handed out before any cached block).
    next_late: i64,
    next_early: i64,
}

impl BlockPool {
    pub fn new(blocks: u32) -> BlockPool {
        let mut pool = BlockPool {
            refs: vec![0; blocks as usize],
            key_of: vec![None; blocks as usize],
            cached: HashMap::new(),
            free: BTreeMap::new(),
            stamp_of: vec![0; blocks as usize],
            next_late: 1,
            next_early: 0,
        };
        for b in (0..blocks).rev() {
            pool.push_free(b);
        }
        pool
    }

    pub fn total(&self) -> u32 {
        self.refs.len() as u32
    }

    /// Blocks no sequence references (some of them still cached).
    pub fn free_blocks(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn used_blocks(&self) -> u32 {
        self.total() - self.free_blocks()
    }

    /// Blocks holding a reusable full block, referenced or not.
    pub fn cached_blocks(&self) -> u32 {
        self.cached.len() as u32
    }

    fn push_free(&mut self, block: u32) {
        let stamp = if self.key_of[block as usize].is_some() {
            self.next_late += 1;
            self.next_late
        } else {
            self.next_early -= 1;
            self.next_early
        };
        self.stamp_of[block as usize] = stamp;
        self.free.insert(stamp, block);
    }

    /// A block for new content (refs 1), evicting the least recently freed cached one if need be.
    pub fn allocate(&mut self) -> Option<u32> {
        let (_, block) = self.free.pop_first()?;
        if let Some(key) = self.key_of[block as usize].take() {
            self.cached.remove(&key);
        }
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Take a reference to the cached block holding `key`, if there is one.
    pub fn take_cached(&mut self, key: BlockKey) -> Option<u32> {
        let block = *self.cached.get(&key)?;
        if self.refs[block as usize] == 0 {
            self.free.remove(&self.stamp_of[block as usize]);
        }
        self.refs[block as usize] += 1;
        Some(block)
    }

    /// How many of `keys` (in order) are cached: what `take_cached` would find.
    pub fn cached_prefix(&self, keys: &[BlockKey]) -> usize {
        keys.iter().take_while(|k| self.cached.contains_key(k)).count()
    }

    /// Of the cached blocks among the first `hits` of `keys`, how many are free now (taking
    /// them uses up free blocks).
    pub fn free_among(&self, keys: &[BlockKey]) -> u32 {
        keys.iter().filter(|k| self.cached.get(k).is_some_and(|&b| self.refs[b as usize] == 0)).count() as u32
    }

    /// Mark `block` (referenced, now full) as holding `key`. A key already cached elsewhere keeps
    /// that block; this one stays private to its sequence.
    pub fn register(&mut self, block: u32, key: BlockKey) {
        debug_assert!(self.refs[block as usize] > 0, "registering a free block");
        if self.key_of[block as usize].is_some() || self.cached.contains_key(&key) {
            return;
        }
        self.key_of[block as usize] = Some(key);
        self.cached.insert(key, block);
    }

    /// Drop one reference to each of `blocks`, last block first: a sequence's tail is the least
    /// likely to be shared, so it is evicted first.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let r = &mut self.refs[b as usize];
            assert!(*r > 0, "block {b} released more often than taken");
            *r -= 1;
            if *r == 0 {
                self.push_free(b);
            }
        }
    }

    pub fn refs(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// Every invariant, for tests: free ⇔ unreferenced, the cache map and keys agree.
    pub fn check(&self) -> Result<(), String> {
        for (b, &r) in self.refs.iter().enumerate() {
            let in_free = self.free.get(&self.stamp_of[b]) == Some(&(b as u32));
            if (r == 0) != in_free {
                return Err(format!("block {b}: refs {r}, in the free queue: {in_free}"));
            }
            if let Some(k) = self.key_of[b] {
                if self.cached.get(&k) != Some(&(b as u32)) {
                    return Err(format!("block {b} has a key the cache does not map to it"));
                }
            }
        }
        if self.free.len() != self.refs.iter().filter(|&&r| r == 0).count() {
            return Err("the free queue holds a block twice or a referenced block".into());
        }
        for (k, &b) in &self.cached {
            if self.key_of[b as usize] != Some(*k) {
                return Err(format!("cache entry for block {b} does not match its key"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_survive_until_room_is_needed_and_uncached_go_first() {
        let mut pool = BlockPool::new(4);
        let h = BlockHasher::default();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let key = h.key(None, 0, &[1, 2, 3]);
        pool.register(a, key);
        pool.release(&[a, b]);
        assert_eq!(pool.free_blocks(), 4);
        // Two never-used blocks and b (nothing cached) go before a.
        let got: Vec<u32> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert!(!got.contains(&a), "the cached block is evicted last: {got:?}");
        assert_eq!(pool.take_cached(key), Some(a), "still cached");
        assert_eq!(pool.refs(a), 1);
        pool.release(&[a]);
        pool.release(&got);
        // Now a must be evicted to make a fifth allocation possible in a full pool.
        let all: Vec<u32> = (0..4).map(|_| pool.allocate().unwrap()).collect();
        assert!(all.contains(&a));
        assert_eq!(pool.take_cached(key), None, "evicted");
        assert!(pool.allocate().is_none());
        pool.check().unwrap();
    }

    #[test]
    fn keys_chain_over_the_whole_prefix() {
        let h = BlockHasher::default();
        let mut x = Vec::new();
        let mut y = Vec::new();
        h.extend(&mut x, 0, &[1, 2, 3, 4, 5, 6, 7], 2);
        h.extend(&mut y, 0, &[9, 9, 3, 4, 5, 6], 2);
        assert_eq!(x.len(), 3);
        assert_eq!(y.len(), 3);
        assert!(x.iter().zip(&y).all(|(a, b)| a != b), "same block tokens after a different prefix differ");
        let mut z = x[..1].to_vec();
        h.extend(&mut z, 0, &[1, 2, 3, 4, 5, 6], 2);
        assert_eq!(z, x, "extending continues the chain");
        let mut w = Vec::new();
        h.extend(&mut w, 1, &[1, 2, 3, 4, 5, 6, 7], 2);
        assert!(x.iter().zip(&w).all(|(a, b)| a != b), "the same tokens under other adapters never match");
    }
}
