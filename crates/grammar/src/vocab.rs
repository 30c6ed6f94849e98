//! A model's token vocabulary as bytes, and the byte trie that [`crate::Matcher::fill_mask`]
//! walks.
//!
//! Contract: built once per model, immutable, `Send + Sync`. Token `i` of the vocabulary is
//! `tokens[i]`; `None` (special and control tokens) and empty byte strings are never allowed by
//! any grammar — an empty token would let a model "generate" forever without making progress.
//!
//! Layout: the trie's nodes are stored in depth-first pre-order, each with its depth and the index
//! one past its subtree, so a walk is a single forward loop that skips a dead subtree with one
//! jump. Tokens ending at a node are a slice of `token_ids`.

use std::fmt;

#[derive(Clone, Copy, Debug)]
pub(crate) struct TrieNode {
    /// Index one past the last node of this node's subtree.
    pub end: u32,
    /// Length of the byte string leading here (1 for children of the root).
    pub depth: u32,
    /// The byte that leads here from the parent.
    pub byte: u8,
}

/// The vocabulary as bytes with its trie.
pub struct Vocab {
    tokens: Vec<Option<Vec<u8>>>,
    pub(crate) nodes: Vec<TrieNode>,
    /// Tokens ending at node `i`: `token_ids[tok_start[i]..tok_start[i + 1]]`.
    pub(crate) tok_start: Vec<u32>,
    pub(crate) token_ids: Vec<u32>,
    pub(crate) max_depth: usize,
}

impl Vocab {
    /// Builds the trie. `tokens[i]` is the byte string of token id `i`, `None` for tokens that
    /// never appear in grammar-constrained output.
    pub fn new(tokens: Vec<Option<Vec<u8>>>) -> Vocab {
        let mut order: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| tokens[i as usize].as_ref().is_some_and(|t| !t.is_empty()))
            .collect();
        let bytes_of = |i: u32| tokens[i as usize].as_deref().unwrap_or(&[]);
        order.sort_by(|&a, &b| bytes_of(a).cmp(bytes_of(b)));

        let mut nodes: Vec<TrieNode> = Vec::new();
        let mut tok_start: Vec<u32> = Vec::new();
        let mut token_ids: Vec<u32> = Vec::with_capacity(order.len());
        // path[d]: the node at depth d + 1 on the way to the previous token.
        let mut path: Vec<usize> = Vec::new();
        let mut prev: &[u8] = &[];
        for &id in &order {
            let t = bytes_of(id);
            let common = prev.iter().zip(t).take_while(|(a, b)| a == b).count();
            while path.len() > common {
                if let Some(n) = path.pop() {
                    nodes[n].end = nodes.len() as u32;
                }
            }
            for (d, &byte) in t.iter().enumerate().skip(common) {
                path.push(nodes.len());
                nodes.push(TrieNode {
                    end: 0,
                    depth: d as u32 + 1,
                    byte,
                });
                tok_start.push(token_ids.len() as u32);
            }
            // Sorted order puts a token right after the node it ends at was created (or after
            // an identical token), so its id extends that node's slice.
            token_ids.push(id);
            prev = t;
        }
        for n in path {
            nodes[n].end = nodes.len() as u32;
        }
        tok_start.push(token_ids.len() as u32);
        let max_depth = nodes.iter().map(|n| n.depth as usize).max().unwrap_or(0);
        Vocab {
            tokens,
            nodes,
            tok_start,
            token_ids,
            max_depth,
        }
    }

    /// Number of token ids (including `None` entries).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The bytes of token `id`, if it has any.
    pub fn token(&self, id: usize) -> Option<&[u8]> {
        self.tokens.get(id)?.as_deref()
    }

    /// The token ids that end at trie node `i`.
    #[inline]
    pub(crate) fn tokens_at(&self, i: usize) -> &[u32] {
        &self.token_ids[self.tok_start[i] as usize..self.tok_start[i + 1] as usize]
    }
}

impl fmt::Debug for Vocab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vocab")
            .field("tokens", &self.tokens.len())
            .field("trie_nodes", &self.nodes.len())
            .field("max_token_bytes", &self.max_depth)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Reconstructs every token from the pre-order layout and checks subtree ends.
    #[test]
    fn trie_holds_every_token_once_at_the_right_node() {
        let tokens: Vec<Option<Vec<u8>>> = vec![
            Some(b"ab".to_vec()),
            None,
            Some(b"a".to_vec()),
            Some(b"abc".to_vec()),
            Some(b"b".to_vec()),
            Some(Vec::new()),
            Some(b"ab".to_vec()),
            Some(vec![0xE2, 0x82]),
            Some(vec![0xE2]),
        ];
        let v = Vocab::new(tokens.clone());
        assert_eq!(v.len(), 9);
        let mut path: Vec<u8> = Vec::new();
        let mut found = vec![0; tokens.len()];
        for (i, n) in v.nodes.iter().enumerate() {
            path.truncate(n.depth as usize - 1);
            path.push(n.byte);
            assert!(n.end as usize > i && n.end as usize <= v.nodes.len());
            for later in &v.nodes[i + 1..n.end as usize] {
                assert!(
                    later.depth > n.depth,
                    "subtree of node {i} holds a shallower node"
                );
            }
            for &t in v.tokens_at(i) {
                assert_eq!(tokens[t as usize].as_deref(), Some(&path[..]));
                found[t as usize] += 1;
            }
        }
        assert_eq!(found, vec![1, 0, 1, 1, 1, 0, 1, 1, 1]);
        assert_eq!(v.max_depth, 3);
        assert_eq!(v.token(3), Some(&b"abc"[..]));
        assert_eq!(v.token(1), None);
    }
}
