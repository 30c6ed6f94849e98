//! Unit tests of [`KvCacheManager`]: scenario tests for each rule of the contract, then a
//! seeded random workload checked against a slow shadow model of what each block holds.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use super::*;

fn mgr(block_size: usize, num_blocks: usize) -> KvCacheManager {
    KvCacheManager::new(block_size, num_blocks).unwrap()
}

fn none() -> ComputedBlocks {
    ComputedBlocks::default()
}

/// Tokens `start..start + len`.
fn seq(start: u32, len: u32) -> Vec<u32> {
    (start..start + len).collect()
}

fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
    [a, b].concat()
}

/// What the scheduler does when it admits a request and prefills all of it in one step: look
/// up, allocate, compute, file. `None` when the pool is too full.
fn admit(
    m: &mut KvCacheManager,
    req: RequestId,
    tokens: &[u32],
    salt: u64,
) -> Option<ComputedBlocks> {
    let hit = m.get_computed_blocks(tokens, salt);
    m.allocate_slots(req, tokens.len(), &hit).unwrap()?;
    m.cache_full_blocks(req, tokens, tokens.len(), salt)
        .unwrap();
    check_invariants(m);
    Some(hit)
}

fn table(m: &KvCacheManager, req: RequestId) -> Vec<u32> {
    m.block_table(req).unwrap().to_vec()
}

fn free_order(m: &KvCacheManager) -> Vec<u32> {
    m.free.iter().collect()
}

/// Every block is free (in the queue) or held with a reference count equal to the number of
/// tables holding it; the prefix cache map and the blocks' entries agree one to one.
fn check_invariants(m: &KvCacheManager) {
    let n = m.blocks.len();
    let mut holders = vec![0u32; n];
    for (req, st) in &m.requests {
        let mut seen = HashSet::new();
        for &id in &st.table {
            assert!(seen.insert(id), "request {req} holds block {id} twice");
            holders[id as usize] += 1;
        }
        assert!(st.num_settled <= st.table.len());
    }
    for (id, &held) in holders.iter().enumerate() {
        assert_eq!(m.blocks[id].ref_count, held, "block {id} ref count");
        assert_eq!(m.free.contains(id as u32), held == 0, "block {id} queued");
    }
    let queued = free_order(m);
    assert_eq!(queued.len(), m.num_free_blocks());
    assert_eq!(queued.iter().collect::<HashSet<_>>().len(), queued.len());
    let used = holders.iter().filter(|&&h| h > 0).count();
    assert_eq!(m.num_free_blocks() + used, n);
    for (&hash, &id) in &m.cache {
        let entry = m.blocks[id as usize].cached.as_ref();
        assert_eq!(
            entry.map(|e| e.hash),
            Some(hash),
            "map entry for block {id}"
        );
    }
    let filed = m.blocks.iter().filter(|b| b.cached.is_some()).count();
    assert_eq!(filed, m.cache.len(), "a filed block missing from the map");
}

#[test]
fn bad_pool_shapes_are_errors() {
    assert_eq!(
        KvCacheManager::new(0, 4).unwrap_err(),
        KvError::ZeroBlockSize
    );
    assert!(matches!(
        KvCacheManager::new(16, u32::MAX as usize),
        Err(KvError::TooManyBlocks { .. })
    ));
    let mut empty = mgr(16, 0);
    assert_eq!(empty.allocate_slots(1, 1, &none()).unwrap(), None);
    assert_eq!(empty.allocate_slots(1, 0, &none()).unwrap(), Some(()));
    assert_eq!(empty.usage(), 0.0);
}

#[test]
fn allocation_until_exhaustion_returns_none_and_changes_nothing() {
    let mut m = mgr(4, 4);
    assert_eq!(m.allocate_slots(1, 10, &none()).unwrap(), Some(()));
    assert_eq!(table(&m, 1), vec![0, 1, 2]);
    assert_eq!(m.num_free_blocks(), 1);
    assert_eq!(m.usage(), 0.75);

    // A new request that does not fit is not created.
    assert_eq!(m.allocate_slots(2, 8, &none()).unwrap(), None);
    assert!(!m.contains(2));
    assert_eq!(m.block_table(2), Err(KvError::UnknownRequest(2)));
    // A running request that does not fit keeps its table.
    assert_eq!(m.allocate_slots(1, 17, &none()).unwrap(), None);
    assert_eq!(table(&m, 1), vec![0, 1, 2]);
    assert_eq!(m.num_free_blocks(), 1);
    check_invariants(&m);

    assert_eq!(m.allocate_slots(1, 16, &none()).unwrap(), Some(()));
    assert_eq!(table(&m, 1), vec![0, 1, 2, 3]);
    assert_eq!(m.usage(), 1.0);
    // Tables never shrink.
    assert_eq!(m.allocate_slots(1, 5, &none()).unwrap(), Some(()));
    assert_eq!(table(&m, 1).len(), 4);

    m.free(1).unwrap();
    assert_eq!(m.num_free_blocks(), 4);
    assert_eq!(m.usage(), 0.0);
    check_invariants(&m);
}

#[test]
fn failed_allocation_with_a_hit_takes_no_reference() {
    let mut m = mgr(4, 4);
    let a = seq(1, 9); // 2 full blocks + 1
    admit(&mut m, 1, &a, 0).unwrap();
    m.free(1).unwrap();
    // 2 cached blocks hit, but 40 tokens need 8 more blocks than the 2 hits: refused.
    let hit = m.get_computed_blocks(&a, 0);
    assert_eq!(hit.num_tokens(), 8);
    assert_eq!(m.allocate_slots(2, 40, &hit).unwrap(), None);
    assert!(!m.contains(2));
    for &id in hit.block_ids() {
        assert_eq!(m.ref_count(id), 0);
        assert!(m.free.contains(id) && m.is_cached(id));
    }
    // Exactly enough: the 2 hits plus the 2 other blocks.
    assert_eq!(m.allocate_slots(2, 16, &hit).unwrap(), Some(()));
    assert_eq!(m.num_free_blocks(), 0);
    check_invariants(&m);
}

#[test]
fn requests_share_a_cached_system_prompt() {
    let mut m = mgr(4, 16);
    let system = seq(100, 12); // 3 full blocks
    let a = cat(&system, &[1, 2, 3]);
    let b = cat(&system, &[7, 8]);

    assert!(admit(&mut m, 1, &a, 0).unwrap().is_empty());
    let ta = table(&m, 1);
    assert_eq!(ta.len(), 4);
    assert_eq!(m.num_cached_blocks(), 3);

    let hit = admit(&mut m, 2, &b, 0).unwrap();
    assert_eq!(hit.num_tokens(), 12);
    assert_eq!(hit.block_ids(), &ta[..3]);
    let tb = table(&m, 2);
    assert_eq!(tb[..3], ta[..3]);
    assert_ne!(tb[3], ta[3]);
    for &id in &ta[..3] {
        assert_eq!(m.ref_count(id), 2);
    }
    assert_eq!((m.ref_count(ta[3]), m.ref_count(tb[3])), (1, 1));
    assert_eq!(m.num_free_blocks(), 16 - 5);
    assert_eq!(
        m.stats(),
        PrefixCacheStats {
            queried_tokens: 15 + 14,
            hit_tokens: 12
        }
    );

    // Both finish: the shared blocks stay cached and a third request still hits them.
    m.free(1).unwrap();
    assert_eq!(m.ref_count(ta[0]), 1);
    m.free(2).unwrap();
    assert_eq!(m.num_free_blocks(), 16);
    for &id in &ta[..3] {
        assert!(m.is_cached(id) && m.ref_count(id) == 0);
    }
    let hit = admit(&mut m, 3, &cat(&system, &[9]), 0).unwrap();
    assert_eq!(hit.block_ids(), &ta[..3]);
    for &id in &ta[..3] {
        assert_eq!(m.ref_count(id), 1);
        assert!(!m.free.contains(id), "a hit block leaves the free queue");
    }
    assert!((m.stats().hit_rate() - 24.0 / 42.0).abs() < 1e-12);
}

#[test]
fn lru_evicts_least_recently_freed_first_and_sequence_tails_first() {
    let mut m = mgr(2, 6);
    let (a, b, c) = (seq(1, 4), seq(11, 4), seq(21, 4)); // 2 full blocks each
    admit(&mut m, 1, &a, 0).unwrap();
    admit(&mut m, 2, &b, 0).unwrap();
    admit(&mut m, 3, &c, 0).unwrap();
    assert_eq!(
        (table(&m, 1), table(&m, 2), table(&m, 3)),
        (vec![0, 1], vec![2, 3], vec![4, 5])
    );
    for req in [1, 2, 3] {
        m.free(req).unwrap();
    }
    // Freed in order A, B, C, each tail first.
    assert_eq!(free_order(&m), vec![1, 0, 3, 2, 5, 4]);

    // D hits all of B: blocks 2 and 3 leave the queue; its third block evicts A's tail.
    let hit = admit(&mut m, 4, &cat(&b, &[99]), 0).unwrap();
    assert_eq!(hit.block_ids(), &[2, 3]);
    assert_eq!(table(&m, 4), vec![2, 3, 1]);
    assert!(!m.is_cached(1));
    assert_eq!(free_order(&m), vec![0, 5, 4]);
    assert_eq!(m.get_computed_blocks(&cat(&a, &[99]), 0).block_ids(), &[0]);

    // Two unrelated blocks: A's head, then C's tail. B's blocks are held, so safe.
    admit(&mut m, 5, &seq(31, 4), 0).unwrap();
    assert_eq!(table(&m, 5), vec![0, 5]);
    assert!(m.get_computed_blocks(&cat(&a, &[99]), 0).is_empty());
    assert_eq!(m.get_computed_blocks(&cat(&c, &[99]), 0).block_ids(), &[4]);
    assert_eq!(
        m.get_computed_blocks(&cat(&b, &[99]), 0).block_ids(),
        &[2, 3]
    );
    check_invariants(&m);
}

#[test]
fn uncached_blocks_are_reused_before_cached_ones() {
    let mut m = mgr(4, 4);
    admit(&mut m, 1, &seq(1, 6), 0).unwrap(); // block 0 filed, block 1 partial
    m.free(1).unwrap();
    assert_eq!(free_order(&m), vec![1, 2, 3, 0]);
}

#[test]
fn different_salts_never_share() {
    let mut m = mgr(4, 8);
    let p = seq(1, 9);
    admit(&mut m, 1, &p, 7).unwrap();
    assert!(m.get_computed_blocks(&p, 8).is_empty());
    assert!(m.get_computed_blocks(&p, 0).is_empty());
    assert_eq!(m.get_computed_blocks(&p, 7).num_tokens(), 8);
    assert_ne!(hash_block(None, 7, &p[..4]), hash_block(None, 8, &p[..4]));
    // The other adapter files its own copy.
    admit(&mut m, 2, &p, 8).unwrap();
    assert!(table(&m, 1).iter().all(|id| !table(&m, 2).contains(id)));
    assert_eq!(m.num_cached_blocks(), 4);
}

#[test]
fn partial_last_block_is_never_cached() {
    let mut m = mgr(4, 8);
    let mut a = seq(1, 6);
    admit(&mut m, 1, &a, 0).unwrap();
    let ta = table(&m, 1);
    assert!(m.is_cached(ta[0]) && !m.is_cached(ta[1]));
    // The same 6 tokens and more: only the full block hits.
    let longer = cat(&a, &[7, 8, 9]);
    assert_eq!(m.get_computed_blocks(&longer, 0).num_tokens(), 4);

    // Decoding fills block 1 (tokens 7 and 8); it is filed once full.
    for t in [7, 8] {
        a.push(t);
        m.allocate_slots(1, a.len(), &none()).unwrap().unwrap();
        m.cache_full_blocks(1, &a, a.len(), 0).unwrap();
    }
    assert!(m.is_cached(ta[1]));
    assert_eq!(m.get_computed_blocks(&longer, 0).num_tokens(), 8);
    check_invariants(&m);
}

/// Decision (vLLM's): a hit covers at most `len - 1` tokens, rounded down to whole blocks, so
/// a fully cached prompt of `k` blocks reuses `k - 1` and recomputes the last block.
#[test]
fn fully_cached_prompt_leaves_its_last_block_to_compute() {
    let mut m = mgr(4, 8);
    let p = seq(1, 8); // exactly 2 full blocks
    admit(&mut m, 1, &p, 0).unwrap();
    let ta = table(&m, 1);
    assert!(m.is_cached(ta[0]) && m.is_cached(ta[1]));

    let hit = admit(&mut m, 2, &p, 0).unwrap();
    assert_eq!(hit.block_ids(), &ta[..1]);
    assert_eq!(hit.num_tokens(), 4);
    let tb = table(&m, 2);
    assert_eq!(tb.len(), 2);
    // The recomputed copy is not filed: the first copy keeps the hash.
    assert!(!m.is_cached(tb[1]) && m.is_cached(ta[1]));

    assert_eq!(
        m.get_computed_blocks(&cat(&p, &[9]), 0).block_ids(),
        &ta[..]
    );
    assert_eq!(m.get_computed_blocks(&p[..5], 0).num_tokens(), 4);
    assert!(m.get_computed_blocks(&p[..4], 0).is_empty());
    assert!(m.get_computed_blocks(&p[..1], 0).is_empty());
    assert!(m.get_computed_blocks(&[], 0).is_empty());
    check_invariants(&m);
}

#[test]
fn chained_hash_same_block_after_a_different_prefix_misses() {
    let mut m = mgr(2, 16);
    let a = [1, 2, 3, 4, 0];
    let b = [9, 9, 3, 4, 0];
    admit(&mut m, 1, &a, 0).unwrap();
    assert!(admit(&mut m, 2, &b, 0).unwrap().is_empty());
    assert_ne!(
        table(&m, 1)[1],
        table(&m, 2)[1],
        "[3, 4] filed once per prefix"
    );
    assert_eq!(m.get_computed_blocks(&[1, 2, 9, 9, 0], 0).num_tokens(), 2);
    assert_eq!(m.get_computed_blocks(&[9, 9, 3, 4, 0], 0).num_tokens(), 4);
    let (h12, h99) = (hash_block(None, 0, &[1, 2]), hash_block(None, 0, &[9, 9]));
    assert_ne!(
        hash_block(Some(h12), 0, &[3, 4]),
        hash_block(Some(h99), 0, &[3, 4])
    );
    assert_ne!(
        hash_block(None, 0, &[3, 4]),
        hash_block(Some(h12), 0, &[3, 4])
    );
    check_invariants(&m);
}

#[test]
fn hash_is_stable() {
    // FNV-1a with fixed constants: these values must not change between builds, or caches
    // shared across processes (later: offload, KV events) stop matching. Reference values from
    // an independent implementation:
    //   def fnv(b): h = 0xcbf29ce484222325; [h := ((h ^ x) * 0x100000001b3) % 2**64 for x in b]
    //   fnv(b'\0' + pack('<Q', 0));  fnv(b'\1' + pack('<QQII', 1, 2, 3, 4))
    assert_eq!(hash_block(None, 0, &[]), 0xe604_823a_2490_29bf);
    assert_eq!(hash_block(Some(1), 2, &[3, 4]), 0xa35f_5d61_f525_88e8);
    assert_eq!(hash_block(None, 0, &[]), hash_block(None, 0, &[]));
    assert_ne!(hash_block(None, 0, &[1, 2]), hash_block(None, 0, &[2, 1]));
}

#[test]
fn hash_collision_is_a_miss_not_a_wrong_hit() {
    let mut m = mgr(4, 8);
    let a = seq(1, 5);
    admit(&mut m, 1, &a, 0).unwrap();
    m.free(1).unwrap();
    // Forge a collision: the hash of another block's content points at A's block 0.
    let q = [7, 7, 7, 7, 5];
    let hq = hash_block(None, 0, &q[..4]);
    m.cache.insert(hq, 0);
    assert!(m.get_computed_blocks(&q, 0).is_empty());

    // Filing q's block replaces the colliding entry (block 0 loses its own entry too).
    admit(&mut m, 2, &q, 0).unwrap();
    assert_eq!(m.cache.get(&hq), Some(&table(&m, 2)[0]));
    assert!(!m.is_cached(0));
    check_invariants(&m);
    assert_eq!(m.get_computed_blocks(&q, 0).block_ids(), &table(&m, 2)[..1]);
    assert!(m.get_computed_blocks(&a, 0).is_empty());
}

/// The parent check: a block with the right tokens and salt, filed after a different prefix,
/// is not a hit even if its hash collides with this prefix's.
#[test]
fn hash_collision_after_a_different_parent_is_a_miss() {
    let mut m = mgr(4, 8);
    let a = [1, 2, 3, 4, 5, 6, 7, 8, 0];
    let q = [9, 9, 9, 9, 5, 6, 7, 8, 0];
    admit(&mut m, 1, &a, 0).unwrap();
    admit(&mut m, 2, &q[..5], 0).unwrap(); // files [9, 9, 9, 9] only
    let (ta, tq) = (table(&m, 1), table(&m, 2));
    m.free(1).unwrap();
    m.free(2).unwrap();
    // Forge: q's second-block hash points at A's block [5, 6, 7, 8] (parent [1, 2, 3, 4]).
    let h = hash_block(Some(hash_block(None, 0, &q[..4])), 0, &q[4..8]);
    m.cache.insert(h, ta[1]);
    assert_eq!(m.get_computed_blocks(&q, 0).block_ids(), &tq[..1]);
}

/// The known limit from the module docs, and how it heals: a block filed after a parent that
/// was evicted is never hit, and is replaced when the prefix is filed again.
#[test]
fn orphan_entry_is_never_hit_and_is_replaced() {
    let mut m = mgr(2, 8);
    let xy = [1, 2, 3, 4, 0];
    // A and B start before either files anything: B computes its own copy of X.
    let hit = m.get_computed_blocks(&[1, 2, 0], 0);
    m.allocate_slots(1, 3, &hit).unwrap().unwrap();
    let hit = m.get_computed_blocks(&xy, 0);
    m.allocate_slots(2, 5, &hit).unwrap().unwrap();
    m.cache_full_blocks(1, &[1, 2, 0], 3, 0).unwrap();
    m.cache_full_blocks(2, &xy, 5, 0).unwrap();
    let (ta, tb) = (table(&m, 1), table(&m, 2));
    assert!(
        m.is_cached(ta[0]) && !m.is_cached(tb[0]),
        "one block per hash"
    );
    assert!(m.is_cached(tb[1]), "Y filed after A's X");
    // A ends and its X is evicted while B still runs: B's Y is an orphan.
    m.free(1).unwrap();
    m.allocate_slots(3, 2 * 5, &none()).unwrap().unwrap(); // takes every free block
    assert!(!m.is_cached(ta[0]));
    m.free(3).unwrap();
    assert!(m.get_computed_blocks(&xy, 0).is_empty());

    // C files X and Y again: its Y replaces the orphan, and a later request hits both.
    admit(&mut m, 4, &xy, 0).unwrap();
    assert!(!m.is_cached(tb[1]));
    let tc = table(&m, 4);
    assert_eq!(m.get_computed_blocks(&xy, 0).block_ids(), &tc[..2]);
    check_invariants(&m);
}

#[test]
fn preempted_request_resumes_from_cache() {
    let mut m = mgr(4, 8);
    let mut toks = seq(1, 6);
    admit(&mut m, 1, &toks, 0).unwrap();
    for t in 50..57 {
        toks.push(t); // one decode step
        m.allocate_slots(1, toks.len(), &none()).unwrap().unwrap();
        m.cache_full_blocks(1, &toks, toks.len(), 0).unwrap();
    }
    assert_eq!(toks.len(), 13);
    let before = table(&m, 1);
    m.free(1).unwrap(); // preempted
    assert!(!m.contains(1));

    // Resumed with prompt + generated tokens: 3 full blocks (12 tokens) come from cache.
    let hit = m.get_computed_blocks(&toks, 0);
    assert_eq!(hit.num_tokens(), 12);
    assert_eq!(hit.block_ids(), &before[..3]);
    m.allocate_slots(1, toks.len(), &hit).unwrap().unwrap();
    assert_eq!(table(&m, 1)[..3], before[..3]);
    assert_eq!(table(&m, 1).len(), 4);
    check_invariants(&m);
}

#[test]
fn reset_prefix_cache_only_when_idle() {
    let mut m = mgr(4, 8);
    let p = seq(1, 9);
    admit(&mut m, 1, &p, 0).unwrap();
    assert!(!m.reset_prefix_cache());
    assert_eq!(m.num_cached_blocks(), 2);
    m.free(1).unwrap();
    let stats = m.stats();
    assert!(m.reset_prefix_cache());
    assert_eq!(m.num_cached_blocks(), 0);
    assert_eq!(m.stats(), stats);
    assert!(m.get_computed_blocks(&p, 0).is_empty());
    check_invariants(&m);
}

#[test]
fn caller_bugs_are_errors_that_change_nothing() {
    let mut m = mgr(4, 4);
    assert_eq!(m.free(9), Err(KvError::UnknownRequest(9)));
    assert_eq!(m.block_table(9), Err(KvError::UnknownRequest(9)));
    assert_eq!(
        m.cache_full_blocks(9, &[1], 1, 0),
        Err(KvError::UnknownRequest(9))
    );

    let p = seq(1, 9);
    admit(&mut m, 1, &p, 3).unwrap();
    assert_eq!(
        m.cache_full_blocks(1, &p, 9, 4),
        Err(KvError::SaltChanged {
            req: 1,
            was: 3,
            now: 4
        })
    );
    assert!(matches!(
        m.cache_full_blocks(1, &p[..4], 9, 3),
        Err(KvError::MissingTokens { .. })
    ));
    let long = seq(1, 20);
    assert!(matches!(
        m.cache_full_blocks(1, &long, 20, 3),
        Err(KvError::TableTooShort { .. })
    ));
    let hit = m.get_computed_blocks(&p, 3);
    assert_eq!(
        m.allocate_slots(1, 12, &hit),
        Err(KvError::PrefixForRunningRequest(1))
    );
    // A hit for another adapter handed to a new request whose salt is already set cannot
    // happen (new requests have none); a running request's salt is checked on filing, above.
    m.free(1).unwrap();

    // A hit that went stale: another request evicted its blocks in between.
    let hit = m.get_computed_blocks(&p, 3);
    assert_eq!(hit.num_tokens(), 8);
    m.allocate_slots(2, 16, &none()).unwrap().unwrap();
    m.free(2).unwrap();
    let free = m.num_free_blocks();
    assert!(matches!(
        m.allocate_slots(3, 9, &hit),
        Err(KvError::StalePrefix { .. })
    ));
    assert!(!m.contains(3));
    assert_eq!(m.num_free_blocks(), free);
    check_invariants(&m);
}

// ---- seeded random workload against a shadow model ----

/// splitmix64: small, seeded, good enough to drive a workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct SimRequest {
    id: RequestId,
    salt: u64,
    tokens: Vec<u32>,
    /// Tokens whose K/V are in the request's blocks.
    computed: usize,
}

/// What each block's K/V was computed from: `(salt, the whole prefix up to the block's end)`.
type Shadow = Vec<Option<(u64, Vec<u32>)>>;

/// The model runs: tokens `r.computed..upto` are written into the request's blocks. A block
/// written must be held by this request alone and not be filed — otherwise the manager handed
/// out shared K/V to be overwritten.
fn compute(m: &mut KvCacheManager, shadow: &mut Shadow, r: &mut SimRequest, upto: usize) {
    let bs = m.block_size();
    let table = table(m, r.id);
    for (i, &id) in table
        .iter()
        .enumerate()
        .take(upto.div_ceil(bs))
        .skip(r.computed / bs)
    {
        assert_eq!(m.ref_count(id), 1, "writing into shared block {id}");
        assert!(!m.is_cached(id), "writing into filed block {id}");
        shadow[id as usize] = Some((r.salt, r.tokens[..upto.min((i + 1) * bs)].to_vec()));
    }
    r.computed = upto;
    m.cache_full_blocks(r.id, &r.tokens, upto, r.salt).unwrap();
}

/// Every filed block holds exactly the prefix its hash names.
fn check_shadow(m: &KvCacheManager, shadow: &Shadow) {
    let bs = m.block_size();
    for (id, meta) in m.blocks.iter().enumerate() {
        let Some(entry) = &meta.cached else { continue };
        let (salt, prefix) = shadow[id].as_ref().expect("a filed block was computed");
        assert_eq!(entry.salt, *salt);
        assert!(
            prefix.len() >= bs && prefix.len() / bs * bs == prefix.len(),
            "filed block {id} is full"
        );
        assert_eq!(m.tokens_of(id as u32), &prefix[prefix.len() - bs..]);
        let chained = prefix
            .chunks(bs)
            .fold(None, |h, c| Some(hash_block(h, *salt, c)));
        assert_eq!(
            Some(entry.hash),
            chained,
            "block {id} filed under its prefix's hash"
        );
        match entry.parent {
            None => assert_eq!(prefix.len(), bs),
            Some(p) if m.blocks[p.id as usize].generation == p.generation => {
                let parent = shadow[p.id as usize].as_ref().map(|(_, t)| t.as_slice());
                assert_eq!(
                    parent,
                    Some(&prefix[..prefix.len() - bs]),
                    "block {id}'s parent"
                );
            }
            Some(_) => {} // an orphan: its parent was evicted
        }
    }
}

fn random_workload(seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let bs = 1 + rng.below(4);
    let n = 4 + rng.below(28);
    let mut m = mgr(bs, n);
    let mut shadow: Shadow = vec![None; n];
    // Few prefixes over a 3-letter alphabet: lots of sharing and of equal blocks under
    // different prefixes.
    let prefixes: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..rng.below(13)).map(|_| rng.below(3) as u32).collect())
        .collect();
    let (mut waiting, mut running): (Vec<SimRequest>, Vec<SimRequest>) = (vec![], vec![]);
    let mut next_id = 0;
    let preempt = |m: &mut KvCacheManager, mut r: SimRequest, waiting: &mut Vec<SimRequest>| {
        m.free(r.id).unwrap();
        r.computed = 0;
        waiting.push(r);
    };

    for _ in 0..steps {
        match rng.below(12) {
            0..=1 => {
                let mut tokens = prefixes[rng.below(3)].clone();
                tokens.extend((0..1 + rng.below(6)).map(|_| rng.below(3) as u32));
                let salt = rng.below(2) as u64;
                waiting.push(SimRequest {
                    id: next_id,
                    salt,
                    tokens,
                    computed: 0,
                });
                next_id += 1;
            }
            2..=4 if !waiting.is_empty() => {
                let mut r = waiting.swap_remove(rng.below(waiting.len()));
                let hit = m.get_computed_blocks(&r.tokens, r.salt);
                assert!(
                    hit.num_tokens() < r.tokens.len()
                        && hit.num_tokens() == hit.block_ids().len() * bs
                );
                for (j, &id) in hit.block_ids().iter().enumerate() {
                    let want = (r.salt, r.tokens[..(j + 1) * bs].to_vec());
                    assert_eq!(
                        shadow[id as usize].as_ref(),
                        Some(&want),
                        "hit block {id} is exact"
                    );
                }
                let free = m.num_free_blocks();
                match m.allocate_slots(r.id, r.tokens.len(), &hit).unwrap() {
                    None => {
                        assert!(!m.contains(r.id));
                        assert_eq!(m.num_free_blocks(), free);
                        waiting.push(r);
                        if !running.is_empty() && rng.below(2) == 0 {
                            let victim = running.swap_remove(rng.below(running.len()));
                            preempt(&mut m, victim, &mut waiting);
                        }
                    }
                    Some(()) => {
                        r.computed = hit.num_tokens();
                        let len = r.tokens.len();
                        compute(&mut m, &mut shadow, &mut r, len);
                        running.push(r);
                    }
                }
            }
            5..=8 if !running.is_empty() => {
                let i = rng.below(running.len());
                let r = &mut running[i];
                r.tokens.push(rng.below(3) as u32);
                match m.allocate_slots(r.id, r.tokens.len(), &none()).unwrap() {
                    None => {
                        let r = running.swap_remove(i);
                        preempt(&mut m, r, &mut waiting);
                    }
                    Some(()) => {
                        let len = r.tokens.len();
                        compute(&mut m, &mut shadow, r, len);
                        if len > 40 {
                            m.free(r.id).unwrap();
                            running.swap_remove(i);
                        }
                    }
                }
            }
            9 if !running.is_empty() => {
                let r = running.swap_remove(rng.below(running.len()));
                m.free(r.id).unwrap();
            }
            10 if !running.is_empty() => {
                let r = running.swap_remove(rng.below(running.len()));
                preempt(&mut m, r, &mut waiting);
            }
            11 if rng.below(8) == 0 => {
                assert_eq!(m.reset_prefix_cache(), running.is_empty());
                if running.is_empty() {
                    assert_eq!(m.num_cached_blocks(), 0);
                }
            }
            _ => {}
        }
        check_invariants(&m);
        check_shadow(&m, &shadow);
        let held: usize = running.iter().map(|r| table(&m, r.id).len()).sum();
        assert!(
            held >= n - m.num_free_blocks(),
            "every used block is in a running table"
        );
    }
    for r in running {
        m.free(r.id).unwrap();
    }
    assert_eq!(m.num_free_blocks(), n);
    check_invariants(&m);
}

#[test]
fn random_workload_keeps_invariants() {
    for seed in 0..64 {
        random_workload(seed, 800);
    }
}

/// Speculative decoding's rollback: a request computes 3 drafts past its 14 tokens (block size
/// 4: 18 slots, 5 blocks), accepts one, and truncates to its 16 tokens (15 computed + the new
/// one). The block that only held rejected drafts goes back to the free queue uncached, and
/// filing stops at the computed tokens, so no hash ever covers a rejected draft.
#[test]
fn truncate_releases_blocks_of_rejected_drafts_and_never_files_them() {
    let mut m = mgr(4, 8);
    let prompt = seq(0, 13);
    admit(&mut m, 1, &prompt, 0).unwrap();
    // Decode: token 13 is uncomputed; verify it with drafts 100, 101, 102 (positions 14..17).
    let mut tokens = cat(&prompt, &[13]);
    m.allocate_slots(1, tokens.len() + 3, &none())
        .unwrap()
        .unwrap();
    assert_eq!(table(&m, 1).len(), 5);
    let held = table(&m, 1);
    // Draft 100 accepted, 101 rejected: the model's token 7 follows. Computed: 0..=14.
    tokens.extend([100, 7]);
    let num_computed = 15;
    m.cache_full_blocks(1, &tokens, num_computed, 0).unwrap();
    m.truncate(1, tokens.len()).unwrap();
    check_invariants(&m);
    assert_eq!(table(&m, 1), held[..4].to_vec(), "16 tokens need 4 blocks");
    assert!(!m.is_cached(held[4]));
    assert_eq!(m.ref_count(held[4]), 0);
    assert_eq!(
        free_order(&m)[0],
        held[4],
        "an uncached block is reused first"
    );
    // Blocks 0..=2 are full of computed tokens and filed; block 3 (12..16) is not computed to
    // its end, so it is not filed, though it holds the accepted draft.
    assert_eq!(m.num_cached_blocks(), 3);
    assert!(!m.is_cached(held[3]));
    // A prompt that shares the prefix through the accepted draft hits only the filed blocks;
    // one with the rejected draft 101 in place of 7 hits the same (nothing of it was filed).
    let with_rejected = cat(&tokens[..15], &[101, 5, 5, 5]);
    assert_eq!(m.get_computed_blocks(&with_rejected, 0).num_tokens(), 12);
    // Truncating never drops filed blocks, and a longer length is a no-op.
    m.truncate(1, 1).unwrap();
    assert_eq!(table(&m, 1).len(), 3);
    m.truncate(1, 100).unwrap();
    assert_eq!(table(&m, 1).len(), 3);
    check_invariants(&m);
    assert_eq!(m.truncate(9, 1), Err(KvError::UnknownRequest(9)));
    m.free(1).unwrap();
    check_invariants(&m);
}
