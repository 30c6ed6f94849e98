//! The grammar itself: rules are alternatives of sequences of symbols, a symbol is a byte set (one
//! byte out of the set) or a reference to a rule. [`Builder`] collects rules; [`Builder::finish`]
//! checks and flattens them into the immutable [`Grammar`] the matcher walks.
//!
//! Contract of `finish`:
//! - alternatives that can never derive a finite byte string (a required self-reference with no
//!   way out) are removed, so every reachable matcher state can still complete; if the root
//!   itself cannot, that is an [`GrammarError::InvalidSchema`];
//! - left recursion (a rule that can reach itself without consuming a byte) is an error, because
//!   the matcher expands rules eagerly and would never stop;
//! - positions: the flattened element array holds every alternative as its symbols followed by an
//!   `End` element; position 0 is a synthetic `[Ref(root), End]` start sequence.

use std::collections::HashMap;
use std::fmt;

use crate::GrammarError;

/// A set of bytes, one bit per value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct ByteSet([u64; 4]);

impl ByteSet {
    pub const EMPTY: ByteSet = ByteSet([0; 4]);

    pub fn byte(b: u8) -> Self {
        let mut s = Self::EMPTY;
        s.insert(b);
        s
    }

    /// The bytes `lo..=hi`.
    pub fn range(lo: u8, hi: u8) -> Self {
        let mut s = Self::EMPTY;
        for b in lo..=hi {
            s.insert(b);
        }
        s
    }

    pub fn of(bytes: &[u8]) -> Self {
        let mut s = Self::EMPTY;
        for &b in bytes {
            s.insert(b);
        }
        s
    }

    pub fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    #[inline]
    pub fn contains(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)] >> (b & 63) & 1 != 0
    }

    pub fn union(self, other: ByteSet) -> ByteSet {
        ByteSet(std::array::from_fn(|i| self.0[i] | other.0[i]))
    }

    pub fn minus(self, other: ByteSet) -> ByteSet {
        ByteSet(std::array::from_fn(|i| self.0[i] & !other.0[i]))
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..=255u8).filter(move |&b| self.contains(b))
    }
}

/// Index of a rule in a [`Builder`] (and, after `finish`, in the [`Grammar`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub(crate) struct RuleId(pub u32);

/// One symbol of a sequence.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Sym {
    Bytes(ByteSet),
    Rule(RuleId),
}

/// One alternative: symbols matched one after the other. Empty means ε.
pub(crate) type Seq = Vec<Sym>;

/// A sequence matching exactly `bytes`.
pub(crate) fn lit(bytes: &[u8]) -> Seq {
    bytes
        .iter()
        .map(|&b| Sym::Bytes(ByteSet::byte(b)))
        .collect()
}

/// Largest grammar [`Builder`] accepts, in symbols (each costs ~40 bytes once flattened).
pub(crate) const MAX_SYMBOLS: usize = 1 << 21;

/// Collects rules while a schema is compiled. Rules may be reserved first and defined later,
/// which is how recursive `$ref`s are tied.
#[derive(Default)]
pub(crate) struct Builder {
    names: Vec<String>,
    rules: Vec<Vec<Seq>>,
    symbols: usize,
    /// `opt_chains[(item, k)]`: a rule matching `item` repeated 0..=k times.
    opt_chains: HashMap<(RuleId, u32), RuleId>,
    /// `stars[item]`: a rule matching `item` repeated any number of times.
    stars: HashMap<RuleId, RuleId>,
}

impl Builder {
    /// A new rule with no alternatives yet. `name` is a schema path or a descriptive name; it is
    /// what errors about this rule quote.
    pub fn reserve(&mut self, name: impl Into<String>) -> RuleId {
        let id = RuleId(self.rules.len() as u32);
        self.names.push(name.into());
        self.rules.push(Vec::new());
        id
    }

    /// Sets the alternatives of a reserved rule.
    pub fn define(&mut self, id: RuleId, alts: Vec<Seq>) -> Result<(), GrammarError> {
        self.symbols += alts.iter().map(|a| a.len() + 1).sum::<usize>();
        if self.symbols > MAX_SYMBOLS {
            return Err(GrammarError::TooLarge {
                path: self.names[id.0 as usize].clone(),
                limit: MAX_SYMBOLS,
            });
        }
        self.rules[id.0 as usize] = alts;
        Ok(())
    }

    /// Reserve and define in one go.
    pub fn rule(
        &mut self,
        name: impl Into<String>,
        alts: Vec<Seq>,
    ) -> Result<RuleId, GrammarError> {
        let id = self.reserve(name);
        self.define(id, alts)?;
        Ok(id)
    }

    pub fn name(&self, id: RuleId) -> &str {
        &self.names[id.0 as usize]
    }

    /// A rule matching `item` zero or more times (right-recursive: `R ::= item R | ε`).
    pub fn star(&mut self, item: RuleId) -> Result<RuleId, GrammarError> {
        if let Some(&r) = self.stars.get(&item) {
            return Ok(r);
        }
        let r = self.reserve(format!("{}*", self.name(item)));
        self.define(r, vec![vec![Sym::Rule(item), Sym::Rule(r)], vec![]])?;
        self.stars.insert(item, r);
        Ok(r)
    }

    /// A rule matching `item` between 0 and `k` times (`O_k ::= item O_{k-1} | ε`), shared between
    /// all callers that repeat the same item.
    pub fn opt_chain(&mut self, item: RuleId, k: u32) -> Result<RuleId, GrammarError> {
        if let Some(&r) = self.opt_chains.get(&(item, k)) {
            return Ok(r);
        }
        // Extend the longest chain already built for this item (O_0 is ε).
        let (mut j, mut r) = match (0..k)
            .rev()
            .find_map(|j| self.opt_chains.get(&(item, j)).map(|&r| (j, r)))
        {
            Some(found) => found,
            None => {
                let eps = self.rule(format!("{}{{0,0}}", self.name(item)), vec![vec![]])?;
                self.opt_chains.insert((item, 0), eps);
                (0, eps)
            }
        };
        while j < k {
            j += 1;
            r = self.rule(
                format!("{}{{0,{j}}}", self.name(item)),
                vec![vec![Sym::Rule(item), Sym::Rule(r)], vec![]],
            )?;
            self.opt_chains.insert((item, j), r);
        }
        Ok(r)
    }

    /// Symbols matching `item` between `min` and `max` times (`None`: unbounded).
    pub fn repeat(
        &mut self,
        item: RuleId,
        min: u32,
        max: Option<u32>,
    ) -> Result<Seq, GrammarError> {
        if min as usize > MAX_SYMBOLS || max.is_some_and(|m| m as usize > MAX_SYMBOLS) {
            return Err(GrammarError::TooLarge {
                path: self.name(item).to_string(),
                limit: MAX_SYMBOLS,
            });
        }
        let mut seq = vec![Sym::Rule(item); min as usize];
        match max {
            None => seq.push(Sym::Rule(self.star(item)?)),
            Some(max) if max > min => seq.push(Sym::Rule(self.opt_chain(item, max - min)?)),
            Some(_) => {}
        }
        Ok(seq)
    }

    /// Checks the rules, prunes what can never finish, and flattens them with `root` as start.
    pub fn finish(self, root: RuleId) -> Result<Grammar, GrammarError> {
        let Builder {
            names, mut rules, ..
        } = self;
        let min_len = min_lengths(&rules);
        if min_len[root.0 as usize] == INF {
            return Err(GrammarError::InvalidSchema {
                path: names[root.0 as usize].clone(),
                message: "no finite JSON document satisfies this schema (a required property or \
                          item refers back to its own schema with no way to stop, or a list of \
                          alternatives is empty); make the recursive part optional"
                    .into(),
            });
        }
        // Drop alternatives that can never finish; every remaining one can.
        for alts in &mut rules {
            alts.retain(|seq| seq_min_len(seq, &min_len) != INF);
        }
        check_left_recursion(&rules, &names, &min_len)?;
        Ok(flatten(names, rules, root, &min_len))
    }
}

/// "Infinite" minimum length: the rule derives no finite string.
const INF: u32 = u32::MAX;

fn seq_min_len(seq: &[Sym], min_len: &[u32]) -> u32 {
    seq.iter().fold(0u32, |acc, s| {
        let l = match s {
            Sym::Bytes(_) => 1,
            Sym::Rule(r) => min_len[r.0 as usize],
        };
        if acc == INF || l == INF {
            INF
        } else {
            acc.saturating_add(l).min(INF - 1)
        }
    })
}

/// The length of each rule's shortest derivation (`INF` if none), by Knuth's generalisation of
/// Dijkstra's algorithm: a rule's length is final when it is the smallest known; an
/// alternative's length is known once all the rules it uses are final. O(symbols · log).
fn min_lengths(rules: &[Vec<Seq>]) -> Vec<u32> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    // Per alternative: its rule, the bytes and final lengths summed so far, and how many
    // rule references are still unknown. `uses[r]`: the alternatives that refer to r (once
    // per reference).
    let mut alt_rule = Vec::new();
    let mut partial = Vec::new();
    let mut pending = Vec::new();
    let mut uses: Vec<Vec<usize>> = vec![Vec::new(); rules.len()];
    let mut heap = BinaryHeap::new();
    for (r, alts) in rules.iter().enumerate() {
        for seq in alts {
            let a = alt_rule.len();
            alt_rule.push(r);
            let mut bytes = 0u32;
            let mut refs = 0u32;
            for s in seq {
                match s {
                    Sym::Bytes(_) => bytes = bytes.saturating_add(1),
                    Sym::Rule(x) => {
                        refs += 1;
                        uses[x.0 as usize].push(a);
                    }
                }
            }
            partial.push(bytes.min(INF - 1));
            pending.push(refs);
            if refs == 0 {
                heap.push(Reverse((bytes.min(INF - 1), r)));
            }
        }
    }
    let mut min_len = vec![INF; rules.len()];
    while let Some(Reverse((len, r))) = heap.pop() {
        if min_len[r] != INF {
            continue;
        }
        min_len[r] = len;
        for &a in &uses[r] {
            partial[a] = partial[a].saturating_add(len).min(INF - 1);
            pending[a] -= 1;
            if pending[a] == 0 {
                heap.push(Reverse((partial[a], alt_rule[a])));
            }
        }
    }
    min_len
}

/// Errors if some rule can reach itself through leading rule references whose predecessors in
/// the sequence are all nullable.
fn check_left_recursion(
    rules: &[Vec<Seq>],
    names: &[String],
    min_len: &[u32],
) -> Result<(), GrammarError> {
    // left[r]: rules that r can expand to without consuming a byte first.
    let left: Vec<Vec<usize>> = rules
        .iter()
        .map(|alts| {
            let mut out = Vec::new();
            for seq in alts {
                for s in seq {
                    match s {
                        Sym::Bytes(_) => break,
                        Sym::Rule(r) => {
                            out.push(r.0 as usize);
                            if min_len[r.0 as usize] != 0 {
                                break;
                            }
                        }
                    }
                }
            }
            out
        })
        .collect();
    // Iterative DFS with colours: 0 new, 1 on the path, 2 done.
    let mut colour = vec![0u8; rules.len()];
    for start in 0..rules.len() {
        if colour[start] != 0 {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        colour[start] = 1;
        while let Some(&mut (r, ref mut next)) = path.last_mut() {
            if let Some(&s) = left[r].get(*next) {
                *next += 1;
                match colour[s] {
                    0 => {
                        colour[s] = 1;
                        path.push((s, 0));
                    }
                    1 => {
                        let from = path.iter().position(|&(p, _)| p == s).unwrap_or(0);
                        let cycle: Vec<&str> = path[from..]
                            .iter()
                            .map(|&(p, _)| names[p].as_str())
                            .collect();
                        return Err(GrammarError::InvalidSchema {
                            path: names[s].clone(),
                            message: format!(
                                "the schema refers to itself without any JSON in between ({} -> \
                                 {}), so it describes no document; a $ref cycle must pass \
                                 through an object or array",
                                cycle.join(" -> "),
                                names[s]
                            ),
                        });
                    }
                    _ => {}
                }
            } else {
                colour[r] = 2;
                path.pop();
            }
        }
    }
    Ok(())
}

/// One element of the flattened grammar.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Elem {
    /// Matches one byte of the set.
    Bytes(ByteSet),
    /// Expands to one of the rule's alternatives.
    Ref(u32),
    /// End of an alternative: return to the caller.
    End,
}

/// A compiled grammar: immutable, cheap to share behind an `Arc`.
pub struct Grammar {
    pub(crate) elems: Vec<Elem>,
    /// Start position of each alternative; rule `r`'s are
    /// `alt_starts[rule_alts[r].0..rule_alts[r].1]`.
    alt_starts: Vec<u32>,
    rule_alts: Vec<(u32, u32)>,
    /// `rest_min[pos]`: fewest bytes that complete the alternative from `pos` on.
    pub(crate) rest_min: Vec<u32>,
    names: Vec<String>,
    root: u32,
}

/// Position of the synthetic start sequence `[Ref(root), End]`.
pub(crate) const START: u32 = 0;

fn flatten(names: Vec<String>, rules: Vec<Vec<Seq>>, root: RuleId, min_len: &[u32]) -> Grammar {
    let mut elems = vec![Elem::Ref(root.0), Elem::End];
    let mut alt_starts = Vec::new();
    let mut rule_alts = Vec::with_capacity(rules.len());
    for alts in &rules {
        let first = alt_starts.len() as u32;
        for seq in alts {
            alt_starts.push(elems.len() as u32);
            elems.extend(seq.iter().map(|s| match *s {
                Sym::Bytes(set) => Elem::Bytes(set),
                Sym::Rule(r) => Elem::Ref(r.0),
            }));
            elems.push(Elem::End);
        }
        rule_alts.push((first, alt_starts.len() as u32));
    }
    let mut rest_min = vec![0u32; elems.len()];
    for pos in (0..elems.len()).rev() {
        rest_min[pos] = match elems[pos] {
            Elem::End => 0,
            Elem::Bytes(_) => rest_min[pos + 1].saturating_add(1),
            Elem::Ref(r) => rest_min[pos + 1].saturating_add(min_len[r as usize]),
        };
    }
    Grammar {
        elems,
        alt_starts,
        rule_alts,
        rest_min,
        names,
        root: root.0,
    }
}

impl Grammar {
    /// Start positions of rule `r`'s alternatives.
    #[inline]
    pub(crate) fn alts(&self, r: u32) -> &[u32] {
        let (a, b) = self.rule_alts[r as usize];
        &self.alt_starts[a as usize..b as usize]
    }

    /// Number of rules (for diagnostics).
    pub fn rule_count(&self) -> usize {
        self.rule_alts.len()
    }
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammar")
            .field("root", &self.names[self.root as usize])
            .field("rules", &self.rule_alts.len())
            .field("elements", &self.elems.len())
            .finish()
    }
}

/// The grammar in a BNF-like notation, one rule per line, for debugging.
impl fmt::Display for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in 0..self.rule_alts.len() {
            write!(f, "<{}> ::=", self.names[r])?;
            for (i, &start) in self.alts(r as u32).iter().enumerate() {
                if i > 0 {
                    write!(f, " |")?;
                }
                let mut pos = start as usize;
                let mut empty = true;
                loop {
                    match self.elems[pos] {
                        Elem::End => break,
                        Elem::Ref(s) => write!(f, " <{}>", self.names[s as usize])?,
                        Elem::Bytes(set) => write!(f, " {}", DisplaySet(set))?,
                    }
                    empty = false;
                    pos += 1;
                }
                if empty {
                    write!(f, " \"\"")?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

struct DisplaySet(ByteSet);

impl fmt::Debug for ByteSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", DisplaySet(*self))
    }
}

impl fmt::Display for DisplaySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |b: u8| -> String {
            if b.is_ascii_graphic() && !matches!(b, b'\\' | b']' | b'-' | b'"' | b'^') {
                char::from(b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        };
        let bytes: Vec<u8> = self.0.iter().collect();
        if let [b] = bytes[..] {
            return write!(f, "\"{}\"", show(b));
        }
        write!(f, "[")?;
        let mut i = 0;
        while i < bytes.len() {
            let mut j = i;
            while j + 1 < bytes.len() && bytes[j + 1] == bytes[j] + 1 {
                j += 1;
            }
            if j > i {
                write!(f, "{}-{}", show(bytes[i]), show(bytes[j]))?;
            } else {
                write!(f, "{}", show(bytes[i]))?;
            }
            i = j + 1;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn byte_set_operations() {
        let digits = ByteSet::range(b'0', b'9');
        assert!(digits.contains(b'0') && digits.contains(b'9') && !digits.contains(b'a'));
        let odd = ByteSet::of(b"13579");
        let even = digits.minus(odd);
        assert_eq!(even.iter().collect::<Vec<_>>(), b"02468".to_vec());
        assert_eq!(even.union(odd), digits);
        assert!(ByteSet::EMPTY.is_empty() && !ByteSet::byte(255).is_empty());
        assert!(ByteSet::byte(255).contains(255) && ByteSet::byte(64).contains(64));
    }

    #[test]
    fn left_recursion_is_an_error() {
        let mut b = Builder::default();
        let a = b.reserve("a");
        let eps = b.rule("eps", vec![vec![]]).unwrap();
        // a ::= eps a "x" | "y": reaches itself through a nullable prefix.
        b.define(
            a,
            vec![
                vec![
                    Sym::Rule(eps),
                    Sym::Rule(a),
                    Sym::Bytes(ByteSet::byte(b'x')),
                ],
                lit(b"y"),
            ],
        )
        .unwrap();
        let err = b.finish(a).unwrap_err();
        assert!(matches!(err, GrammarError::InvalidSchema { .. }), "{err}");
    }

    #[test]
    fn unproductive_alternatives_are_pruned_and_an_unproductive_root_is_an_error() {
        let mut b = Builder::default();
        let loop_ = b.reserve("loop");
        b.define(
            loop_,
            vec![vec![Sym::Bytes(ByteSet::byte(b'a')), Sym::Rule(loop_)]],
        )
        .unwrap();
        let root = b
            .rule("root", vec![vec![Sym::Rule(loop_)], lit(b"ok")])
            .unwrap();
        let g = b.finish(root).unwrap();
        assert_eq!(
            g.alts(root.0).len(),
            1,
            "the alternative through `loop` must be gone"
        );
        assert!(g.to_string().contains("<root> ::= \"o\" \"k\""), "{g}");

        let mut b = Builder::default();
        let loop_ = b.reserve("loop");
        b.define(
            loop_,
            vec![vec![Sym::Bytes(ByteSet::byte(b'a')), Sym::Rule(loop_)]],
        )
        .unwrap();
        assert!(matches!(
            b.finish(loop_),
            Err(GrammarError::InvalidSchema { .. })
        ));
    }

    #[test]
    fn min_lengths_follow_references_in_any_order() {
        // r0 ::= r1 r1 | "abcdefgh", r1 ::= r2 "x", r2 ::= "y" | r0
        let (r0, r1, r2) = (RuleId(0), RuleId(1), RuleId(2));
        let rules = vec![
            vec![vec![Sym::Rule(r1), Sym::Rule(r1)], lit(b"abcdefgh")],
            vec![vec![Sym::Rule(r2), Sym::Bytes(ByteSet::byte(b'x'))]],
            vec![lit(b"y"), vec![Sym::Rule(r0)]],
            vec![vec![Sym::Rule(RuleId(3))]],
        ];
        assert_eq!(min_lengths(&rules), vec![4, 2, 1, INF]);
    }

    #[test]
    fn repeat_shares_chains() {
        let mut b = Builder::default();
        let x = b.rule("x", vec![lit(b"x")]).unwrap();
        let s5 = b.repeat(x, 1, Some(5)).unwrap();
        let s3 = b.repeat(x, 0, Some(3)).unwrap();
        assert_eq!(s5.len(), 2);
        assert_eq!(s3.len(), 1);
        let before = b.rules.len();
        b.repeat(x, 2, Some(6)).unwrap(); // O_4 exists already
        assert_eq!(b.rules.len(), before);
    }
}
