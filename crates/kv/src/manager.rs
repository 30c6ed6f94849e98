//! Paged KV-cache accounting for many requests with automatic prefix caching: block ids,
//! reference counts and content hashes, never tensors. (vLLM `v1/core/kv_cache_manager.py` and
//! `block_pool.py`.)
//!
//! # Contract
//!
//! - **One pool** of `num_blocks` blocks of `block_size` tokens. Each request owns a block table
//!   (block `i` holds its tokens `i*block_size..(i+1)*block_size`); a block shared by several
//!   requests has one reference per holder.
//! - **`None` means preempt.** [`KvCacheManager::allocate_slots`] returns `Ok(None)` when the
//!   pool cannot cover the request, and then nothing has changed: the scheduler waits or
//!   preempts someone ([`KvCacheManager::free`]) and tries again. `Err` is kept for caller bugs
//!   (an unknown request, a stale prefix hit) and says how to fix them.
//! - **Prefix caching.** Once a block is full and its tokens computed,
//!   [`KvCacheManager::cache_full_blocks`] files it under
//!   `hash = H(parent block's hash, cache salt, its token ids)`: chained, so one hash names the
//!   whole prefix, and salted (the LoRA adapter id) so adapters never share entries.
//!   [`KvCacheManager::get_computed_blocks`] walks a new prompt block by block and returns the
//!   longest run of cached full blocks; the request then takes a reference on them instead of
//!   computing them. A partial block is never cached.
//! - **Always leave a token to compute.** A hit covers at most `prompt_len - 1` tokens, rounded
//!   down to whole blocks, so the model still runs on the prompt's last token and yields logits.
//!   A prompt of exactly `k` full blocks, all cached, reuses `k - 1` and recomputes the whole
//!   last block (vLLM does the same: computed counts stay block-aligned). That recomputed copy
//!   is not filed: one block per hash, and the first one stays.
//! - **Hits are exact, not probabilistic.** A cached block remembers its salt, its token ids and
//!   its parent as `(block id, generation)`; a block's generation changes whenever it loses its
//!   cache entry (eviction, [`KvCacheManager::reset_prefix_cache`]), so that pair names one
//!   content lifetime. A hash hit counts only when salt, tokens and parent match the block hit
//!   one step earlier, so by induction the whole prefix matches token for token: a 64-bit
//!   collision costs a miss, never wrong K/V. Filing a block whose hash is taken by a
//!   non-matching entry (a collision, or an orphan whose parent was evicted) replaces that
//!   entry.
//! - **LRU eviction.** A block whose reference count drops to 0 joins the free queue but keeps
//!   its cache entry until a new allocation evicts it: the least recently freed goes first. A
//!   request's blocks are freed tail first, so its last (least shared) blocks are evicted before
//!   its prefix. Blocks with no cache entry go to the front of the queue, since evicting them
//!   loses nothing (vLLM appends them too; this keeps cached blocks longer). A hit takes its
//!   block back out of the queue. [`KvCacheManager::num_free_blocks`] counts cached-but-unused
//!   blocks as free: they are reclaimable.
//! - **Preemption is free + resume.** A preempted request is [`KvCacheManager::free`]d; its full
//!   blocks were filed as they filled (prompt and generated tokens alike), so when it is
//!   scheduled again, `get_computed_blocks(prompt + generated so far)` finds whatever was not
//!   evicted meanwhile and only the rest is recomputed.
//!
//! The scheduler calls, per step: for a waiting request `get_computed_blocks` then, right away,
//! `allocate_slots(req, tokens, &hit)` (its `hit.num_tokens()` is the response's
//! `cached_tokens`); for a running one `allocate_slots(req, tokens, &ComputedBlocks::default())`;
//! after the forward pass `cache_full_blocks(req, all_tokens, num_computed, salt)`; and `free`
//! when it finishes, fails, disconnects or is preempted.
//!
//! Known limit: when two running requests compute the same prefix at once, only the first copy
//! is filed (one block per hash); if it is evicted while the second still runs, the second's
//! copy is not found by later requests, and blocks it files after that are orphans (never hit,
//! replaced when the prefix is filed again). vLLM keeps every copy under the hash instead.

use std::collections::HashMap;

use crate::free_queue::FreeQueue;
use crate::KvError;

/// The scheduler's name for a request.
pub type RequestId = u64;

/// Chained content hash of a full block: see [`hash_block`].
pub type BlockHash = u64;

/// One cache lifetime of a block: its id and the generation it had when it was filed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockKey {
    id: u32,
    generation: u64,
}

/// What a filed block is: enough to check a hash hit exactly. Its token ids live in
/// `KvCacheManager::block_tokens`.
#[derive(Debug, Clone)]
struct CacheEntry {
    hash: BlockHash,
    salt: u64,
    /// The block hit (or filed) for the previous block of the prefix; `None` for a first block.
    parent: Option<BlockKey>,
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Bumped each time the block loses its cache entry.
    generation: u64,
    cached: Option<CacheEntry>,
}

#[derive(Debug, Clone, Default)]
struct RequestState {
    table: Vec<u32>,
    /// Fixed by the first `get_computed_blocks` result or `cache_full_blocks` call.
    salt: Option<u64>,
    /// Leading full blocks of `table` already filed (or found filed): `cache_full_blocks`
    /// resumes after them.
    num_settled: usize,
    /// Hash and cache key of block `num_settled - 1`, the parent of the next one filed.
    last_hash: Option<BlockHash>,
    last_key: Option<BlockKey>,
}

/// The cached prefix of a prompt, from [`KvCacheManager::get_computed_blocks`], to hand to the
/// request's first [`KvCacheManager::allocate_slots`] call. It holds no references: allocate
/// right away, or the blocks may be evicted (then `allocate_slots` answers
/// [`KvError::StalePrefix`]). `ComputedBlocks::default()` is "no hit" for running requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComputedBlocks {
    block_ids: Vec<u32>,
    generations: Vec<u64>,
    last_hash: Option<BlockHash>,
    salt: Option<u64>,
    num_tokens: usize,
}

impl ComputedBlocks {
    /// The cached blocks, in prompt order.
    pub fn block_ids(&self) -> &[u32] {
        &self.block_ids
    }

    /// Prompt tokens covered: the request's `cached_tokens`, where its computation starts.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.block_ids.is_empty()
    }

    fn keys(&self) -> impl Iterator<Item = BlockKey> + '_ {
        self.block_ids
            .iter()
            .zip(&self.generations)
            .map(|(&id, &generation)| BlockKey { id, generation })
    }
}

/// Prefix-cache effectiveness, in tokens, over every `get_computed_blocks` call (a resumed
/// request counts again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up.
    pub queried_tokens: u64,
    /// Of those, tokens found cached.
    pub hit_tokens: u64,
}

impl PrefixCacheStats {
    /// `hit_tokens / queried_tokens`, 0 before any query.
    pub fn hit_rate(&self) -> f64 {
        if self.queried_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.queried_tokens as f64
        }
    }
}

/// Chained hash of one full block: 64-bit FNV-1a over the parent's hash (or a "no parent"
/// tag), the salt and the token ids, little-endian. Fixed constants: the same prefix hashes the
/// same in every process and on every platform. Quality only matters for speed — hits are
/// checked exactly (module docs).
pub fn hash_block(parent: Option<BlockHash>, salt: u64, tokens: &[u32]) -> BlockHash {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
    };
    match parent {
        None => eat(&[0]),
        Some(p) => {
            eat(&[1]);
            eat(&p.to_le_bytes());
        }
    }
    eat(&salt.to_le_bytes());
    for t in tokens {
        eat(&t.to_le_bytes());
    }
    h
}

/// Block tables, reference counts, the free (LRU) queue and the prefix cache of one KV pool.
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    /// Token ids of each filed block, `block_size` per block id (4 bytes per cached token
    /// slot: small beside the K/V it describes), for the exact hit check.
    block_tokens: Vec<u32>,
    free: FreeQueue,
    cache: HashMap<BlockHash, u32>,
    requests: HashMap<RequestId, RequestState>,
    stats: PrefixCacheStats,
}

impl KvCacheManager {
    /// A pool with every block free and nothing cached.
    pub fn new(block_size: usize, num_blocks: usize) -> Result<Self, KvError> {
        if block_size == 0 {
            return Err(KvError::ZeroBlockSize);
        }
        // u32::MAX is the free queue's end marker.
        let max = u32::MAX as usize - 1;
        let n = u32::try_from(num_blocks)
            .ok()
            .filter(|&n| n as usize <= max)
            .ok_or(KvError::TooManyBlocks {
                requested: num_blocks,
                max,
            })?;
        Ok(KvCacheManager {
            block_size,
            blocks: vec![BlockMeta::default(); num_blocks],
            block_tokens: vec![0; num_blocks * block_size],
            free: FreeQueue::new(n),
            cache: HashMap::new(),
            requests: HashMap::new(),
            stats: PrefixCacheStats::default(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks no request holds, cached ones included (they are evicted on demand).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Fraction of the pool held by requests, in `[0, 1]`.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.blocks.len() as f64
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Holders of block `id` (0 for a free block or an id outside the pool).
    pub fn ref_count(&self, id: u32) -> u32 {
        self.blocks.get(id as usize).map_or(0, |b| b.ref_count)
    }

    /// Whether block `id` is filed in the prefix cache.
    pub fn is_cached(&self, id: u32) -> bool {
        self.blocks
            .get(id as usize)
            .is_some_and(|b| b.cached.is_some())
    }

    /// Number of filed blocks.
    pub fn num_cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Whether `req` holds a block table (allocated and not yet freed).
    pub fn contains(&self, req: RequestId) -> bool {
        self.requests.contains_key(&req)
    }

    /// The longest run of cached full blocks that starts `tokens` under `salt`, leaving at least
    /// one token to compute. Takes no references (see [`ComputedBlocks`]); counts the lookup in
    /// [`Self::stats`].
    pub fn get_computed_blocks(&mut self, tokens: &[u32], salt: u64) -> ComputedBlocks {
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut hit = ComputedBlocks {
            salt: Some(salt),
            ..ComputedBlocks::default()
        };
        let mut parent: Option<BlockKey> = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = hash_block(hit.last_hash, salt, chunk);
            let Some(key) = self.find_cached(hash, parent, salt, chunk) else {
                break;
            };
            hit.block_ids.push(key.id);
            hit.generations.push(key.generation);
            hit.last_hash = Some(hash);
            parent = Some(key);
        }
        hit.num_tokens = hit.block_ids.len() * self.block_size;
        self.stats.queried_tokens += tokens.len() as u64;
        self.stats.hit_tokens += hit.num_tokens as u64;
        hit
    }

    /// Make `req`'s block table cover `total_tokens` tokens (a new request is created). On its
    /// first call `computed` is the request's prefix hit: the table starts with those blocks,
    /// each with one more reference (taken out of the free queue if unused); later calls pass
    /// `ComputedBlocks::default()`. Missing blocks come from the front of the free queue,
    /// evicting their old cache entries. `Ok(None)`: the pool is too full — nothing changed;
    /// wait or preempt. Never shrinks a table.
    pub fn allocate_slots(
        &mut self,
        req: RequestId,
        total_tokens: usize,
        computed: &ComputedBlocks,
    ) -> Result<Option<()>, KvError> {
        let (held, salt) = self
            .requests
            .get(&req)
            .map_or((0, None), |s| (s.table.len(), s.salt));
        let mut reclaimed = 0; // computed blocks that leave the free queue
        if !computed.is_empty() {
            if held > 0 {
                return Err(KvError::PrefixForRunningRequest(req));
            }
            for key in computed.keys() {
                let meta = self
                    .blocks
                    .get(key.id as usize)
                    .ok_or(KvError::OutOfRange(key.id))?;
                if meta.generation != key.generation || meta.cached.is_none() {
                    return Err(KvError::StalePrefix { block: key.id });
                }
                reclaimed += usize::from(meta.ref_count == 0);
            }
        }
        if let (Some(was), Some(now)) = (salt, computed.salt) {
            if was != now {
                return Err(KvError::SaltChanged { req, was, now });
            }
        }
        let have = held + computed.block_ids.len();
        let needed = self.blocks_for(total_tokens).saturating_sub(have);
        if needed > self.free.len() - reclaimed {
            return Ok(None);
        }

        for &id in &computed.block_ids {
            self.touch(id);
        }
        let fresh: Vec<u32> = std::iter::from_fn(|| self.take_free_block())
            .take(needed)
            .collect();
        debug_assert_eq!(fresh.len(), needed, "free count checked above");

        let state = self.requests.entry(req).or_default();
        if !computed.is_empty() {
            state.table.extend_from_slice(&computed.block_ids);
            state.num_settled = computed.block_ids.len();
            state.last_hash = computed.last_hash;
            state.last_key = computed.keys().last();
        }
        if state.salt.is_none() {
            state.salt = computed.salt;
        }
        state.table.extend(fresh);
        Ok(Some(()))
    }

    /// After a step computed `req`'s tokens up to `num_computed` (`tokens` = all of its tokens,
    /// prompt then generated, at least `num_computed` of them), file its newly full blocks so
    /// later requests hit them. A hash already filed for the same prefix keeps its block; one
    /// filed for a different prefix (collision or orphan) is replaced. `salt` must be the one
    /// the request was looked up with.
    pub fn cache_full_blocks(
        &mut self,
        req: RequestId,
        tokens: &[u32],
        num_computed: usize,
        salt: u64,
    ) -> Result<(), KvError> {
        let bs = self.block_size;
        let state = self
            .requests
            .get_mut(&req)
            .ok_or(KvError::UnknownRequest(req))?;
        match state.salt {
            Some(was) if was != salt => {
                return Err(KvError::SaltChanged {
                    req,
                    was,
                    now: salt,
                })
            }
            _ => {}
        }
        if num_computed > tokens.len() {
            return Err(KvError::MissingTokens {
                req,
                num_computed,
                num_tokens: tokens.len(),
            });
        }
        let num_full = num_computed / bs;
        if num_full > state.table.len() {
            return Err(KvError::TableTooShort {
                req,
                num_computed,
                needed: num_full,
                held: state.table.len(),
            });
        }
        state.salt = Some(salt);
        if num_full <= state.num_settled {
            return Ok(());
        }
        let start = state.num_settled;
        let ids = state.table[start..num_full].to_vec();
        let (mut last_hash, mut last_key) = (state.last_hash, state.last_key);

        for (i, id) in (start..num_full).zip(ids) {
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let hash = hash_block(last_hash, salt, chunk);
            let key = match self.find_cached(hash, last_key, salt, chunk) {
                Some(existing) => existing,
                None => {
                    if let Some(&other) = self.cache.get(&hash) {
                        self.uncache(other);
                    }
                    self.file(id, hash, salt, last_key, chunk)
                }
            };
            last_hash = Some(hash);
            last_key = Some(key);
        }

        if let Some(state) = self.requests.get_mut(&req) {
            state.num_settled = num_full;
            state.last_hash = last_hash;
            state.last_key = last_key;
        }
        Ok(())
    }

    /// `req`'s block ids, in token order.
    pub fn block_table(&self, req: RequestId) -> Result<&[u32], KvError> {
        self.requests
            .get(&req)
            .map(|s| s.table.as_slice())
            .ok_or(KvError::UnknownRequest(req))
    }

    /// Shrink `req`'s block table to the blocks `num_tokens` tokens need, releasing the rest
    /// (the rollback of speculative decoding: blocks that only held rejected drafts). Blocks
    /// already filed in the prefix cache are kept: they hold computed, accepted tokens.
    /// Released blocks join the free queue as [`Self::free`] puts them.
    pub fn truncate(&mut self, req: RequestId, num_tokens: usize) -> Result<(), KvError> {
        let keep = self.blocks_for(num_tokens);
        let state = self
            .requests
            .get_mut(&req)
            .ok_or(KvError::UnknownRequest(req))?;
        let keep = keep.max(state.num_settled);
        if keep >= state.table.len() {
            return Ok(());
        }
        let released: Vec<u32> = state.table.drain(keep..).collect();
        for &id in released.iter().rev() {
            self.release(id);
        }
        Ok(())
    }

    /// Drop one reference on block `id`; an unused block joins the free queue (a cached one at
    /// the back, evicted last; an uncached one at the front, reused first).
    fn release(&mut self, id: u32) {
        let Some(meta) = self.blocks.get_mut(id as usize) else {
            return;
        };
        debug_assert!(
            meta.ref_count > 0,
            "block {id} in a table with no reference"
        );
        meta.ref_count = meta.ref_count.saturating_sub(1);
        if meta.ref_count == 0 {
            if meta.cached.is_some() {
                self.free.push_back(id);
            } else {
                self.free.push_front(id);
            }
        }
    }

    /// Release all of `req`'s blocks (finished, aborted, disconnected or preempted). Each loses
    /// one reference; those left unused join the free queue, tail of the sequence first — cached
    /// ones at the back (evicted last), uncached ones at the front (reused first).
    pub fn free(&mut self, req: RequestId) -> Result<(), KvError> {
        let state = self
            .requests
            .remove(&req)
            .ok_or(KvError::UnknownRequest(req))?;
        for &id in state.table.iter().rev() {
            self.release(id);
        }
        Ok(())
    }

    /// Forget every cache entry (e.g. after the weights changed). Refused — `false` — while any
    /// request holds blocks, since their K/V would be filed again as they fill (vLLM does the
    /// same). Stats are kept.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.free.len() != self.blocks.len() {
            return false;
        }
        for id in 0..self.blocks.len() as u32 {
            self.uncache(id);
        }
        debug_assert!(self.cache.is_empty());
        true
    }

    /// The block filed under `hash`, if it really is this prefix's next block: same salt, same
    /// token ids, and filed after the block matched for the previous position.
    fn find_cached(
        &self,
        hash: BlockHash,
        parent: Option<BlockKey>,
        salt: u64,
        tokens: &[u32],
    ) -> Option<BlockKey> {
        let &id = self.cache.get(&hash)?;
        let meta = self.blocks.get(id as usize)?;
        let entry = meta.cached.as_ref()?;
        let exact = entry.salt == salt && entry.parent == parent && self.tokens_of(id) == tokens;
        exact.then_some(BlockKey {
            id,
            generation: meta.generation,
        })
    }

    fn tokens_of(&self, id: u32) -> &[u32] {
        let start = id as usize * self.block_size;
        self.block_tokens
            .get(start..start + self.block_size)
            .unwrap_or(&[])
    }

    /// File block `id` (held by the caller's request, not filed yet) under `hash`.
    fn file(
        &mut self,
        id: u32,
        hash: BlockHash,
        salt: u64,
        parent: Option<BlockKey>,
        tokens: &[u32],
    ) -> BlockKey {
        let start = id as usize * self.block_size;
        if let Some(slot) = self.block_tokens.get_mut(start..start + self.block_size) {
            slot.copy_from_slice(tokens);
        }
        let meta = &mut self.blocks[id as usize];
        meta.cached = Some(CacheEntry { hash, salt, parent });
        self.cache.insert(hash, id);
        BlockKey {
            id,
            generation: meta.generation,
        }
    }

    /// Drop block `id`'s cache entry, if any, and start its next generation.
    fn uncache(&mut self, id: u32) {
        let Some(meta) = self.blocks.get_mut(id as usize) else {
            return;
        };
        if let Some(entry) = meta.cached.take() {
            if self.cache.get(&entry.hash) == Some(&id) {
                self.cache.remove(&entry.hash);
            }
            meta.generation += 1;
        }
    }

    /// One more holder; an unused block leaves the free queue.
    fn touch(&mut self, id: u32) {
        let meta = &mut self.blocks[id as usize];
        if meta.ref_count == 0 {
            self.free.remove(id);
        }
        meta.ref_count += 1;
    }

    /// The front of the free queue with one reference, its old cache entry evicted.
    fn take_free_block(&mut self) -> Option<u32> {
        let id = self.free.pop_front()?;
        self.uncache(id);
        self.blocks[id as usize].ref_count = 1;
        Some(id)
    }
}

#[cfg(test)]
mod tests;
