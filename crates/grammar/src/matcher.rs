//! The per-request matching state, and the token mask.
//!
//! Contract: a [`Matcher`] is a set of parse stacks over its [`Grammar`]. Each stack is a chain
//! of frames `(position, parent)`: the top frame's position is always a byte set (the next byte
//! must be in it), and each parent's position is where to continue when the alternative below it
//! ends. The empty stack ([`ACCEPT`]) means "a whole document has been read". Frames are
//! hash-consed in an arena, so two equal stacks are the same id and a state is a sorted, duplicate
//! free list of ids.
//!
//! [`Matcher::allows`] is the slow, obviously correct path; [`Matcher::fill_mask`] is the fast one
//! and is held to it by tests: it walks the vocabulary trie depth first, caching each
//! (state, byte) → state transition, so a state reached by many prefixes (inside a string, after
//! any ASCII letter) is expanded once per call and every other trie node costs one table lookup.
//!
//! The arena only grows while bytes are accepted, so `accept` compacts it (keeps the frames the
//! current stacks use) once it has doubled; a clone of a matcher therefore stays small.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::grammar::{Elem, Grammar, START};
use crate::{GrammarError, Vocab};

/// The empty stack in a state, and "no parent" in a frame.
const ACCEPT: u32 = u32::MAX;

/// Most stacks a state keeps. Only a grammar that is ambiguous at every nesting level (say an
/// `anyOf` of two arrays of the same `$ref`) gets near it: its stack count doubles per level.
/// Past the cap the stacks with the highest ids are dropped. That keeps every output valid
/// (each kept stack can still complete on its own) but may forbid some valid continuations, and
/// `allows` and `fill_mask` (whose arenas number frames differently) may then disagree.
pub(crate) const MAX_STACKS: usize = 4096;

/// FxHash-style hasher for the small integer keys here (frames, states); SipHash's resistance to
/// chosen keys buys nothing for keys that are arena indices.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

/// One level of a parse stack.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Frame {
    /// Index into `Grammar::elems`.
    pos: u32,
    /// The frame below, or [`ACCEPT`] at the bottom.
    parent: u32,
}

/// The hash-consed frame arena. A frame's parent always has a smaller id than the frame.
#[derive(Clone, Debug, Default)]
struct Frames {
    list: Vec<Frame>,
    index: HashMap<Frame, u32, FxBuild>,
}

impl Frames {
    fn intern(&mut self, f: Frame) -> u32 {
        let list = &mut self.list;
        *self.index.entry(f).or_insert_with(|| {
            list.push(f);
            (list.len() - 1) as u32
        })
    }
}

/// Buffers reused across steps.
#[derive(Default)]
struct Scratch {
    work: Vec<Frame>,
    seen: HashSet<Frame, FxBuild>,
}

/// Expands the frames in `s.work` until every stack top is a byte set (or the stack is empty),
/// adding the resulting stacks to `out`, which ends sorted and deduplicated.
fn settle(g: &Grammar, frames: &mut Frames, out: &mut Vec<u32>, s: &mut Scratch) {
    s.seen.clear();
    while let Some(f) = s.work.pop() {
        if !s.seen.insert(f) {
            continue;
        }
        match g.elems[f.pos as usize] {
            Elem::Bytes(_) => out.push(frames.intern(f)),
            Elem::End if f.parent == ACCEPT => out.push(ACCEPT),
            Elem::End => s.work.push(frames.list[f.parent as usize]),
            Elem::Ref(rule) => {
                // A reference at the end of its alternative is a tail call: no return frame.
                let ret = match g.elems[f.pos as usize + 1] {
                    Elem::End => f.parent,
                    _ => frames.intern(Frame {
                        pos: f.pos + 1,
                        parent: f.parent,
                    }),
                };
                s.work
                    .extend(g.alts(rule).iter().map(|&pos| Frame { pos, parent: ret }));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.len() > MAX_STACKS {
        let accept = out.last() == Some(&ACCEPT);
        out.truncate(MAX_STACKS);
        if accept {
            out[MAX_STACKS - 1] = ACCEPT;
        }
    }
}

/// The stacks after `byte` from `stacks`, into `out` (empty: `byte` is not allowed).
fn advance(
    g: &Grammar,
    frames: &mut Frames,
    stacks: &[u32],
    byte: u8,
    out: &mut Vec<u32>,
    s: &mut Scratch,
) {
    out.clear();
    s.work.clear();
    for &id in stacks {
        if id == ACCEPT {
            continue;
        }
        let f = frames.list[id as usize];
        if let Elem::Bytes(set) = g.elems[f.pos as usize] {
            if set.contains(byte) {
                s.work.push(Frame {
                    pos: f.pos + 1,
                    parent: f.parent,
                });
            }
        }
    }
    settle(g, frames, out, s);
}

/// Per-request matching state. Cloning is cheap (the arena is kept compact).
#[derive(Clone, Debug)]
pub struct Matcher {
    grammar: Arc<Grammar>,
    frames: Frames,
    /// The current stacks: sorted frame ids, [`ACCEPT`] (last) if the output is complete.
    stacks: Vec<u32>,
    /// Bytes accepted so far.
    position: usize,
    /// Arena size right after the last compaction.
    compacted: usize,
}

impl Matcher {
    pub fn new(grammar: Arc<Grammar>) -> Matcher {
        let mut frames = Frames::default();
        let mut stacks = Vec::new();
        let mut s = Scratch::default();
        s.work.push(Frame {
            pos: START,
            parent: ACCEPT,
        });
        settle(&grammar, &mut frames, &mut stacks, &mut s);
        let compacted = frames.list.len();
        Matcher {
            grammar,
            frames,
            stacks,
            position: 0,
            compacted,
        }
    }

    /// Could `bytes` be the next bytes of the output? (Empty: true.)
    pub fn allows(&self, bytes: &[u8]) -> bool {
        let mut frames = self.frames.clone();
        let mut cur = self.stacks.clone();
        let mut next = Vec::new();
        let mut s = Scratch::default();
        for &b in bytes {
            advance(&self.grammar, &mut frames, &cur, b, &mut next, &mut s);
            if next.is_empty() {
                return false;
            }
            std::mem::swap(&mut cur, &mut next);
        }
        true
    }

    /// Sets `allowed[i]` to whether token `i`'s bytes may come next, for every token.
    ///
    /// # Panics
    /// If `allowed.len() != vocab.len()` (a caller bug: the mask belongs to another vocabulary).
    pub fn fill_mask(&self, vocab: &Vocab, allowed: &mut [bool]) {
        assert_eq!(
            allowed.len(),
            vocab.len(),
            "fill_mask: the mask must have one entry per vocabulary token"
        );
        allowed.fill(false);
        let mut dfa = Dfa::new(self);
        let mut state_at = vec![0u32; vocab.max_depth + 1];
        let nodes = &vocab.nodes;
        let mut i = 0;
        while i < nodes.len() {
            let node = nodes[i];
            let depth = node.depth as usize;
            match dfa.step(state_at[depth - 1], node.byte) {
                None => i = node.end as usize,
                Some(state) => {
                    state_at[depth] = state;
                    for &t in vocab.tokens_at(i) {
                        allowed[t as usize] = true;
                    }
                    i += 1;
                }
            }
        }
    }

    /// Advances by the bytes of a chosen token. On error the state is unchanged.
    pub fn accept(&mut self, bytes: &[u8]) -> Result<(), GrammarError> {
        let mut cur = self.stacks.clone();
        let mut next = Vec::new();
        let mut s = Scratch::default();
        for (offset, &byte) in bytes.iter().enumerate() {
            advance(
                &self.grammar,
                &mut self.frames,
                &cur,
                byte,
                &mut next,
                &mut s,
            );
            if next.is_empty() {
                return Err(GrammarError::Rejected {
                    byte,
                    offset,
                    position: self.position,
                    finished: cur == [ACCEPT],
                });
            }
            std::mem::swap(&mut cur, &mut next);
        }
        self.stacks = cur;
        self.position += bytes.len();
        if self.frames.list.len() > 2 * self.compacted.max(512) {
            self.compact();
        }
        Ok(())
    }

    /// The output so far is a complete document: the caller may end generation now.
    pub fn is_complete(&self) -> bool {
        self.stacks.last() == Some(&ACCEPT)
    }

    /// Complete, and no byte may follow: the caller must end generation now.
    pub fn is_finished(&self) -> bool {
        self.stacks == [ACCEPT]
    }

    /// The fewest further bytes that make the output complete (0 when it is). Useful to close a
    /// document before a length limit: among the allowed next bytes, one always lowers this by
    /// exactly one.
    pub fn min_bytes_to_complete(&self) -> usize {
        let g = &self.grammar;
        self.stacks
            .iter()
            .map(|&top| {
                let mut total = 0usize;
                let mut id = top;
                while id != ACCEPT {
                    let f = self.frames.list[id as usize];
                    total = total.saturating_add(g.rest_min[f.pos as usize] as usize);
                    id = f.parent;
                }
                total
            })
            .min()
            .unwrap_or(usize::MAX)
    }

    /// Bytes accepted so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Keeps only the frames the current stacks use. Ids are reassigned in increasing order, so
    /// "parent id < child id" and the sortedness of `stacks` survive.
    fn compact(&mut self) {
        let old = &self.frames.list;
        let mut live = vec![false; old.len()];
        for &top in &self.stacks {
            let mut id = top;
            while id != ACCEPT && !live[id as usize] {
                live[id as usize] = true;
                id = old[id as usize].parent;
            }
        }
        let mut frames = Frames::default();
        let mut remap = vec![ACCEPT; old.len()];
        for (i, f) in old.iter().enumerate() {
            if live[i] {
                let parent = if f.parent == ACCEPT {
                    ACCEPT
                } else {
                    remap[f.parent as usize]
                };
                remap[i] = frames.intern(Frame { pos: f.pos, parent });
            }
        }
        for id in &mut self.stacks {
            if *id != ACCEPT {
                *id = remap[*id as usize];
            }
        }
        self.compacted = frames.list.len();
        self.frames = frames;
    }

    #[cfg(test)]
    fn arena_len(&self) -> usize {
        self.frames.list.len()
    }
}

const UNKNOWN: u32 = u32::MAX;
const DEAD: u32 = u32::MAX - 1;

/// The lazily built automaton of one `fill_mask` call: states are stack sets, transitions are
/// computed on first use.
struct Dfa<'m> {
    grammar: &'m Grammar,
    frames: Frames,
    states: Vec<Vec<u32>>,
    index: HashMap<Vec<u32>, u32, FxBuild>,
    next: Vec<[u32; 256]>,
    scratch: Scratch,
    buf: Vec<u32>,
}

impl<'m> Dfa<'m> {
    /// State 0 is the matcher's current state.
    fn new(m: &'m Matcher) -> Self {
        let mut index = HashMap::default();
        index.insert(m.stacks.clone(), 0);
        Dfa {
            grammar: &m.grammar,
            frames: m.frames.clone(),
            states: vec![m.stacks.clone()],
            index,
            next: vec![[UNKNOWN; 256]],
            scratch: Scratch::default(),
            buf: Vec::new(),
        }
    }

    #[inline]
    fn step(&mut self, state: u32, byte: u8) -> Option<u32> {
        let mut t = self.next[state as usize][usize::from(byte)];
        if t == UNKNOWN {
            t = self.compute(state, byte);
        }
        (t != DEAD).then_some(t)
    }

    #[cold]
    fn compute(&mut self, state: u32, byte: u8) -> u32 {
        advance(
            self.grammar,
            &mut self.frames,
            &self.states[state as usize],
            byte,
            &mut self.buf,
            &mut self.scratch,
        );
        let t = if self.buf.is_empty() {
            DEAD
        } else if let Some(&t) = self.index.get(&self.buf) {
            t
        } else {
            let t = self.states.len() as u32;
            self.states.push(self.buf.clone());
            self.index.insert(self.buf.clone(), t);
            self.next.push([UNKNOWN; 256]);
            t
        };
        self.next[state as usize][usize::from(byte)] = t;
        t
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn arena_stays_small_over_a_long_document() {
        let g = Arc::new(
            Grammar::json_schema(
                &serde_json::json!({"type": "array", "items": {"type": "string"}}),
            )
            .unwrap(),
        );
        let mut m = Matcher::new(g.clone());
        m.accept(b"[").unwrap();
        for i in 0..5000 {
            m.accept(format!("\"item {i}\", ").as_bytes()).unwrap();
        }
        m.accept(b"\"last\"]").unwrap();
        assert!(m.is_finished());
        assert!(m.arena_len() < 2048, "arena grew to {}", m.arena_len());
    }

    #[test]
    fn rejection_leaves_the_state_unchanged() {
        let g = Arc::new(Grammar::json_object());
        let mut m = Matcher::new(g);
        m.accept(b"{\"a\"").unwrap();
        let err = m.accept(b": 1x").unwrap_err();
        assert!(
            matches!(
                err,
                GrammarError::Rejected {
                    byte: b'x',
                    offset: 3,
                    position: 4,
                    finished: false
                }
            ),
            "{err}"
        );
        assert_eq!(m.position(), 4);
        m.accept(b": 1}").unwrap();
        assert!(m.is_finished());
        let err = m.accept(b" ").unwrap_err();
        assert!(
            matches!(err, GrammarError::Rejected { finished: true, .. }),
            "{err}"
        );
    }
}
