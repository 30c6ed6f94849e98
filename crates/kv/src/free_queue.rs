//! Free blocks in eviction order, for [`crate::manager::KvCacheManager`].
//!
//! Contract: an intrusive doubly-linked list over block ids `0..n` (two `u32` links per block,
//! no allocation after [`FreeQueue::new`]) with O(1) `push_back`, `push_front`, `pop_front` and
//! `remove` from the middle — a prefix-cache hit takes its block back out of the queue wherever
//! it sits. The front is evicted first. A block is in the queue at most once; pushing a queued
//! block or removing an absent one is a no-op that returns `false`. (vLLM
//! `v1/core/kv_cache_utils.py` `FreeKVCacheBlockQueue`.)

/// "No block": the end of the list. Block ids stay below it (checked by the manager).
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub(crate) struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    queued: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    /// Every block `0..n` free, low ids at the front (handed out first). `n < u32::MAX`.
    pub(crate) fn new(n: u32) -> Self {
        let mut q = FreeQueue {
            prev: vec![NIL; n as usize],
            next: vec![NIL; n as usize],
            queued: vec![false; n as usize],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for id in 0..n {
            q.push_back(id);
        }
        q
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.queued.get(id as usize).copied().unwrap_or(false)
    }

    /// Queue `id` last: evicted after everything already queued.
    pub(crate) fn push_back(&mut self, id: u32) -> bool {
        if !self.is_absent(id) {
            return false;
        }
        let i = id as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        match self.tail {
            NIL => self.head = id,
            t => self.next[t as usize] = id,
        }
        self.tail = id;
        self.queued[i] = true;
        self.len += 1;
        true
    }

    /// Queue `id` first: the next block handed out.
    pub(crate) fn push_front(&mut self, id: u32) -> bool {
        if !self.is_absent(id) {
            return false;
        }
        let i = id as usize;
        self.prev[i] = NIL;
        self.next[i] = self.head;
        match self.head {
            NIL => self.tail = id,
            h => self.prev[h as usize] = id,
        }
        self.head = id;
        self.queued[i] = true;
        self.len += 1;
        true
    }

    /// Take the block at the front (the next to be evicted).
    pub(crate) fn pop_front(&mut self) -> Option<u32> {
        let id = self.head;
        (id != NIL && self.remove(id)).then_some(id)
    }

    /// Unlink `id` from wherever it sits.
    pub(crate) fn remove(&mut self, id: u32) -> bool {
        if !self.contains(id) {
            return false;
        }
        let i = id as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.queued[i] = false;
        self.len -= 1;
        true
    }

    /// Front to back (eviction order).
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            let id = cur;
            if id == NIL {
                return None;
            }
            cur = self.next[id as usize];
            Some(id)
        })
    }

    /// In range and not queued.
    fn is_absent(&self, id: u32) -> bool {
        (id as usize) < self.queued.len() && !self.queued[id as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(q: &FreeQueue) -> Vec<u32> {
        q.iter().collect()
    }

    #[test]
    fn starts_full_in_id_order() {
        let q = FreeQueue::new(4);
        assert_eq!(order(&q), vec![0, 1, 2, 3]);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn pop_remove_and_push_keep_links() {
        let mut q = FreeQueue::new(5);
        assert_eq!(q.pop_front(), Some(0));
        assert!(q.remove(2)); // middle
        assert!(q.remove(4)); // tail
        assert!(!q.remove(4)); // already out
        assert_eq!(order(&q), vec![1, 3]);
        assert!(q.push_back(4));
        assert!(q.push_front(2));
        assert!(!q.push_back(2)); // already in
        assert!(!q.push_back(9)); // out of range
        assert_eq!(order(&q), vec![2, 1, 3, 4]);
        assert_eq!(q.len(), 4);
        while q.pop_front().is_some() {}
        assert_eq!(q.len(), 0);
        assert_eq!(q.pop_front(), None);
        assert!(q.push_front(3));
        assert_eq!(order(&q), vec![3]);
        assert!(q.contains(3) && !q.contains(0));
    }

    #[test]
    fn empty_queue() {
        let mut q = FreeQueue::new(0);
        assert_eq!(q.pop_front(), None);
        assert!(!q.push_back(0));
        assert_eq!(q.len(), 0);
    }
}
