//! KV-cache block accounting: block ids and reference counts, never tensors.
//!
//! Contract: a pool of `num_blocks` fixed-size blocks. [`BlockAllocator::allocate`] hands out a
//! free block with reference count 1 or returns `None` — the caller's signal to wait or preempt,
//! never an error. Blocks shared between sequences (a common prefix) are retained once per
//! holder and return to the pool when the last holder releases them. It serves one sequence
//! (the CLI session); the server's scheduler uses [`KvCacheManager`] ([`manager`]), which adds
//! per-request block tables, automatic prefix caching and LRU eviction on the same terms.

mod free_queue;
pub mod manager;

pub use manager::{BlockHash, ComputedBlocks, KvCacheManager, PrefixCacheStats, RequestId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("block {0} is outside the pool")]
    OutOfRange(u32),
    #[error("block {0} is not allocated (double free?)")]
    NotAllocated(u32),
    #[error("the KV block size must be at least 1 token")]
    ZeroBlockSize,
    #[error("{requested} KV blocks is more than block ids can name (at most {max}): raise the block size or give the cache less memory")]
    TooManyBlocks { requested: usize, max: usize },
    #[error("request {0} holds no KV blocks: call allocate_slots first (or it was already freed)")]
    UnknownRequest(u64),
    #[error("request {0} already holds KV blocks: a prefix hit is taken only by a request's first allocate_slots call; pass ComputedBlocks::default() afterwards")]
    PrefixForRunningRequest(u64),
    #[error("prefix-cache block {block} was evicted or dropped after get_computed_blocks returned it: call get_computed_blocks again right before allocate_slots")]
    StalePrefix { block: u32 },
    #[error("request {req} changed its cache salt from {was} to {now}: the salt (its adapter) is fixed for a request's lifetime")]
    SaltChanged { req: u64, was: u64, now: u64 },
    #[error("request {req}: {num_computed} tokens are computed but only {num_tokens} token ids were given: pass all of the request's tokens")]
    MissingTokens {
        req: u64,
        num_computed: usize,
        num_tokens: usize,
    },
    #[error("request {req}: {num_computed} computed tokens fill {needed} blocks but it holds {held}: allocate_slots before computing tokens")]
    TableTooShort {
        req: u64,
        num_computed: usize,
        needed: usize,
        held: usize,
    },
}

#[derive(Debug, Clone)]
pub struct BlockAllocator {
    pub block_size: usize,
    refcount: Vec<u32>,
    /// Free ids, popped from the end; kept so that low ids are handed out first.
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(block_size: usize, num_blocks: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        BlockAllocator {
            block_size,
            refcount: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// A fresh block (reference count 1), or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = self.free.pop()?;
        self.refcount[id as usize] = 1;
        Some(id)
    }

    /// One more holder of an allocated block.
    pub fn retain(&mut self, id: u32) -> Result<(), KvError> {
        let rc = self
            .refcount
            .get_mut(id as usize)
            .ok_or(KvError::OutOfRange(id))?;
        if *rc == 0 {
            return Err(KvError::NotAllocated(id));
        }
        *rc += 1;
        Ok(())
    }

    /// Drop one holder; the block is free again when none is left. Returns the new count.
    pub fn release(&mut self, id: u32) -> Result<u32, KvError> {
        let rc = self
            .refcount
            .get_mut(id as usize)
            .ok_or(KvError::OutOfRange(id))?;
        if *rc == 0 {
            return Err(KvError::NotAllocated(id));
        }
        *rc -= 1;
        if *rc == 0 {
            self.free.push(id);
        }
        Ok(*rc)
    }

    pub fn ref_count(&self, id: u32) -> u32 {
        self.refcount.get(id as usize).copied().unwrap_or(0)
    }

    /// Grow `table` until it can hold `tokens` tokens. On exhaustion the table keeps the blocks
    /// it got so far and `false` is returned.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        while table.len() < self.blocks_for(tokens) {
            match self.allocate() {
                Some(b) => table.push(b),
                None => return false,
            }
        }
        true
    }

    /// Release every block of `table` and clear it.
    pub fn free_table(&mut self, table: &mut Vec<u32>) -> Result<(), KvError> {
        for b in table.drain(..) {
            self.release(b)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_exhausted_then_none() {
        let mut a = BlockAllocator::new(16, 3);
        let ids: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(a.allocate(), None);
        assert_eq!(a.release(1).unwrap(), 0);
        assert_eq!(a.allocate(), Some(1));
    }

    #[test]
    fn shared_blocks_free_on_last_release() {
        let mut a = BlockAllocator::new(16, 2);
        let b = a.allocate().unwrap();
        a.retain(b).unwrap();
        assert_eq!(a.release(b).unwrap(), 1);
        assert_eq!(a.num_free(), 1);
        assert_eq!(a.release(b).unwrap(), 0);
        assert_eq!(a.num_free(), 2);
        assert_eq!(a.release(b), Err(KvError::NotAllocated(b)));
        assert_eq!(a.retain(99), Err(KvError::OutOfRange(99)));
    }

    #[test]
    fn grow_and_free_table() {
        let mut a = BlockAllocator::new(4, 3);
        let mut t = Vec::new();
        assert!(a.grow(&mut t, 9));
        assert_eq!(t.len(), 3);
        assert!(!a.grow(&mut t, 13));
        a.free_table(&mut t).unwrap();
        assert_eq!(a.num_free(), 3);
    }
}
