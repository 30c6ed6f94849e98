//! JSON's lexical building blocks as grammar rules: whitespace, strings (UTF-8 checked byte by
//! byte), numbers, literals, "any value", and keys that avoid a given set.
//!
//! Contract: every byte string these rules derive is accepted by `serde_json::from_slice` in its
//! place: strings are valid UTF-8 without overlongs, surrogates or code points above U+10FFFF,
//! `\u` escapes never name a surrogate (each escape is then exactly one code point, which is what
//! `minLength`/`maxLength` count), and numbers stay inside `f64` range. Bounds that keep a model
//! from looping forever: whitespace between tokens is at most one space or tab, or one newline
//! and up to [`MAX_INDENT`] spaces or tabs; numbers have at most [`MAX_INT_DIGITS`] integer digits,
//! [`MAX_FRAC_DIGITS`] fraction digits and a 2-digit exponent.

use std::collections::HashMap;

use crate::grammar::{lit, Builder, ByteSet, RuleId, Seq, Sym};
use crate::GrammarError;

pub(crate) const MAX_INDENT: u32 = 20;
pub(crate) const MAX_INT_DIGITS: u32 = 15;
pub(crate) const MAX_FRAC_DIGITS: u32 = 15;

/// The multi-byte UTF-8 sequences, as byte ranges per position (Unicode Table 3-7): no
/// overlongs (C0, C1, E0 80-9F, F0 80-8F), no surrogates (ED A0-BF), nothing above U+10FFFF.
pub(crate) const UTF8_MULTI: [&[(u8, u8)]; 8] = [
    &[(0xC2, 0xDF), (0x80, 0xBF)],
    &[(0xE0, 0xE0), (0xA0, 0xBF), (0x80, 0xBF)],
    &[(0xE1, 0xEC), (0x80, 0xBF), (0x80, 0xBF)],
    &[(0xED, 0xED), (0x80, 0x9F), (0x80, 0xBF)],
    &[(0xEE, 0xEF), (0x80, 0xBF), (0x80, 0xBF)],
    &[(0xF0, 0xF0), (0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    &[(0xF1, 0xF3), (0x80, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    &[(0xF4, 0xF4), (0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)],
];

fn utf8_sets(alt: &[(u8, u8)]) -> Vec<ByteSet> {
    alt.iter().map(|&(lo, hi)| ByteSet::range(lo, hi)).collect()
}

/// ASCII that may appear unescaped in a JSON string: 0x20..=0x7F except `"` and `\`.
pub(crate) fn ascii_plain() -> ByteSet {
    ByteSet::range(0x20, 0x7F).minus(ByteSet::of(b"\"\\"))
}

pub(crate) fn digit() -> Sym {
    Sym::Bytes(ByteSet::range(b'0', b'9'))
}

fn bytes(set: ByteSet) -> Sym {
    Sym::Bytes(set)
}

/// A [`Builder`] plus the shared JSON rules, each built once on first use.
#[derive(Default)]
pub(crate) struct Json {
    pub b: Builder,
    shared: HashMap<&'static str, RuleId>,
    comma_items: HashMap<RuleId, RuleId>,
}

impl Json {
    /// The shared rule `name`, built by `alts` the first time. The rule is reserved before `alts`
    /// runs, so it may refer to itself.
    fn shared(
        &mut self,
        name: &'static str,
        alts: impl FnOnce(&mut Self, RuleId) -> Result<Vec<Seq>, GrammarError>,
    ) -> Result<RuleId, GrammarError> {
        if let Some(&r) = self.shared.get(name) {
            return Ok(r);
        }
        let r = self.b.reserve(name);
        self.shared.insert(name, r);
        let alts = alts(self, r)?;
        self.b.define(r, alts)?;
        Ok(r)
    }

    /// Bounded whitespace between JSON tokens.
    pub fn ws(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("ws", |j, _| {
            let blank = ByteSet::of(b" \t");
            let indent_char = j.b.rule("indent", vec![vec![bytes(blank)]])?;
            let indent = j.b.opt_chain(indent_char, MAX_INDENT)?;
            Ok(vec![
                vec![],
                vec![bytes(blank)],
                vec![bytes(ByteSet::byte(b'\n')), Sym::Rule(indent)],
            ])
        })
    }

    /// `ws "," ws item`, one rule per item.
    pub fn comma_item(&mut self, item: RuleId) -> Result<RuleId, GrammarError> {
        if let Some(&r) = self.comma_items.get(&item) {
            return Ok(r);
        }
        let ws = Sym::Rule(self.ws()?);
        let name = format!(", {}", self.b.name(item));
        let r = self.b.rule(
            name,
            vec![vec![ws, bytes(ByteSet::byte(b',')), ws, Sym::Rule(item)]],
        )?;
        self.comma_items.insert(item, r);
        Ok(r)
    }

    /// One character of a JSON string's content, escapes included.
    pub fn char(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("char", |j, _| {
            let mut alts = j.plain_char_alts();
            let hex = ByteSet::range(b'0', b'9')
                .union(ByteSet::range(b'a', b'f'))
                .union(ByteSet::range(b'A', b'F'));
            let backslash = bytes(ByteSet::byte(b'\\'));
            alts.push(vec![backslash, bytes(ByteSet::of(b"\"\\/bfnrt"))]);
            // \uXXXX, never D800-DFFF: serde_json rejects lone surrogates, and a pair would
            // count as two characters here but as one code point in minLength/maxLength.
            let u = bytes(ByteSet::byte(b'u'));
            let not_d = hex.minus(ByteSet::of(b"dD"));
            alts.push(vec![
                backslash,
                u,
                bytes(not_d),
                bytes(hex),
                bytes(hex),
                bytes(hex),
            ]);
            alts.push(vec![
                backslash,
                u,
                bytes(ByteSet::of(b"dD")),
                bytes(ByteSet::range(b'0', b'7')),
                bytes(hex),
                bytes(hex),
            ]);
            Ok(alts)
        })
    }

    /// The unescaped characters: printable ASCII but `"` and `\`, and multi-byte UTF-8.
    fn plain_char_alts(&self) -> Vec<Seq> {
        let mut alts = vec![vec![bytes(ascii_plain())]];
        alts.extend(
            UTF8_MULTI
                .iter()
                .map(|alt| utf8_sets(alt).into_iter().map(bytes).collect()),
        );
        alts
    }

    /// Any JSON string.
    pub fn string(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("string", |j, _| {
            let ch = j.char()?;
            let chars = j.b.star(ch)?;
            let q = bytes(ByteSet::byte(b'"'));
            Ok(vec![vec![q, Sym::Rule(chars), q]])
        })
    }

    /// A string of `min..=max` characters (code points).
    pub fn string_len(&mut self, min: u32, max: Option<u32>) -> Result<Seq, GrammarError> {
        let ch = self.char()?;
        let q = bytes(ByteSet::byte(b'"'));
        let mut seq = vec![q];
        seq.extend(self.b.repeat(ch, min, max)?);
        seq.push(q);
        Ok(seq)
    }

    /// `[0-9]` as a rule, for repetition.
    pub fn digit_rule(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("digit", |_, _| Ok(vec![vec![digit()]]))
    }

    /// Between 0 and `k` more digits.
    pub fn opt_digits(&mut self, k: u32) -> Result<Sym, GrammarError> {
        let d = self.digit_rule()?;
        Ok(Sym::Rule(self.b.opt_chain(d, k)?))
    }

    /// A non-negative integer without sign or leading zeros, up to [`MAX_INT_DIGITS`] digits.
    pub fn uint(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("uint", |j, _| {
            let more = j.opt_digits(MAX_INT_DIGITS - 1)?;
            Ok(vec![
                lit(b"0"),
                vec![bytes(ByteSet::range(b'1', b'9')), more],
            ])
        })
    }

    /// Optional fraction: ε or `.` and 1..=MAX_FRAC_DIGITS digits.
    pub fn opt_frac(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("fraction?", |j, _| {
            let more = j.opt_digits(MAX_FRAC_DIGITS - 1)?;
            Ok(vec![
                vec![],
                vec![bytes(ByteSet::byte(b'.')), digit(), more],
            ])
        })
    }

    /// Optional fraction of zeros only: ε or `.` and 1..=MAX_FRAC_DIGITS `0`s (for a bound
    /// reached exactly, like `1.000`).
    pub fn opt_zero_frac(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("zero fraction?", |j, _| {
            let zero = j.b.rule("0", vec![lit(b"0")])?;
            let more = j.b.opt_chain(zero, MAX_FRAC_DIGITS - 1)?;
            Ok(vec![
                vec![],
                vec![bytes(ByteSet::byte(b'.')), Sym::Rule(zero), Sym::Rule(more)],
            ])
        })
    }

    /// Any JSON number (within the digit bounds).
    pub fn number(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("number", |j, _| {
            let int = Sym::Rule(j.uint()?);
            let frac = Sym::Rule(j.opt_frac()?);
            let exp_digits = j.opt_digits(1)?;
            let exp = j.b.rule(
                "exponent?",
                vec![
                    vec![],
                    vec![bytes(ByteSet::of(b"eE")), digit(), exp_digits],
                    vec![
                        bytes(ByteSet::of(b"eE")),
                        bytes(ByteSet::of(b"+-")),
                        digit(),
                        exp_digits,
                    ],
                ],
            )?;
            let exp = Sym::Rule(exp);
            Ok(vec![
                vec![int, frac, exp],
                vec![bytes(ByteSet::byte(b'-')), int, frac, exp],
            ])
        })
    }

    /// Any JSON integer (within the digit bound), written without fraction or exponent.
    pub fn integer(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("integer", |j, _| {
            let int = Sym::Rule(j.uint()?);
            Ok(vec![vec![int], vec![bytes(ByteSet::byte(b'-')), int]])
        })
    }

    pub fn boolean(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("boolean", |_, _| Ok(vec![lit(b"true"), lit(b"false")]))
    }

    pub fn null(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("null", |_, _| Ok(vec![lit(b"null")]))
    }

    /// Any JSON value.
    pub fn value(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("value", |j, _| {
            Ok(vec![
                vec![Sym::Rule(j.object_any()?)],
                vec![Sym::Rule(j.array_any()?)],
                vec![Sym::Rule(j.string()?)],
                vec![Sym::Rule(j.number()?)],
                vec![Sym::Rule(j.boolean()?)],
                vec![Sym::Rule(j.null()?)],
            ])
        })
    }

    /// Any JSON object.
    pub fn object_any(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("object", |j, _| {
            let key = j.string()?;
            let value = j.value()?;
            let member = j.member(key, value)?;
            let more = j.members_star(member)?;
            j.object_of(vec![vec![Sym::Rule(member), Sym::Rule(more)]], true)
        })
    }

    /// Any JSON array.
    pub fn array_any(&mut self) -> Result<RuleId, GrammarError> {
        self.shared("array", |j, _| {
            let value = j.value()?;
            let tail = j.comma_item(value)?;
            let tail = j.b.star(tail)?;
            j.array_of(vec![vec![Sym::Rule(value), Sym::Rule(tail)]], true)
        })
    }

    /// `key ws ":" ws value` as a rule.
    pub fn member(&mut self, key: RuleId, value: RuleId) -> Result<RuleId, GrammarError> {
        let ws = Sym::Rule(self.ws()?);
        let name = format!("{}: {}", self.b.name(key), self.b.name(value));
        self.b.rule(
            name,
            vec![vec![
                Sym::Rule(key),
                ws,
                bytes(ByteSet::byte(b':')),
                ws,
                Sym::Rule(value),
            ]],
        )
    }

    /// `(ws "," ws member)*`
    pub fn members_star(&mut self, member: RuleId) -> Result<RuleId, GrammarError> {
        let m = self.comma_item(member)?;
        self.b.star(m)
    }

    /// The alternatives of an object: `"{" ws "}"` (if `may_be_empty`) or
    /// `"{" ws <members> ws "}"` for each non-empty member list.
    pub fn object_of(
        &mut self,
        members: Vec<Seq>,
        may_be_empty: bool,
    ) -> Result<Vec<Seq>, GrammarError> {
        self.bracketed(b'{', b'}', members, may_be_empty)
    }

    /// Like [`Json::object_of`] for arrays.
    pub fn array_of(
        &mut self,
        items: Vec<Seq>,
        may_be_empty: bool,
    ) -> Result<Vec<Seq>, GrammarError> {
        self.bracketed(b'[', b']', items, may_be_empty)
    }

    fn bracketed(
        &mut self,
        open: u8,
        close: u8,
        inner: Vec<Seq>,
        may_be_empty: bool,
    ) -> Result<Vec<Seq>, GrammarError> {
        let ws = Sym::Rule(self.ws()?);
        let (open, close) = (bytes(ByteSet::byte(open)), bytes(ByteSet::byte(close)));
        let mut alts = Vec::new();
        if may_be_empty {
            alts.push(vec![open, ws, close]);
        }
        for seq in inner {
            let mut alt = vec![open, ws];
            alt.extend(seq);
            alt.extend([ws, close]);
            alts.push(alt);
        }
        Ok(alts)
    }

    /// A JSON value written exactly as `serde_json` writes it (compact).
    pub fn literal(&self, value: &serde_json::Value) -> Seq {
        lit(value.to_string().as_bytes())
    }

    /// A JSON string key (with its quotes) that is none of `keys`. To keep the comparison exact,
    /// such keys are written without backslash escapes; a key that would need one (it contains
    /// `"`, `\` or a control character) can never collide with them.
    pub fn key_not_in(&mut self, keys: &[&str], name: &str) -> Result<RuleId, GrammarError> {
        let plain = self.shared("plain char", |j, _| Ok(j.plain_char_alts()))?;
        let plain_star = self.b.star(plain)?;
        let q = bytes(ByteSet::byte(b'"'));
        let rest = self.b.rule(
            format!("{name}: rest"),
            vec![vec![Sym::Rule(plain_star), q]],
        )?;

        let mut trie = KeyTrie::default();
        for key in keys {
            if !key.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
                trie.insert(key.as_bytes());
            }
        }
        if trie.nodes.is_empty() {
            return self
                .b
                .rule(name.to_string(), vec![vec![q, Sym::Rule(rest)]]);
        }
        // Where each node sits in a UTF-8 character: None at a character boundary, Some((alt, k))
        // inside a character of UTF8_MULTI[alt] with byte k next. Children come after their parent
        // in `nodes`, so one forward pass fills this, and one backward pass builds each node's
        // rule after its children's (no recursion: keys may be long).
        let mut mid_char: Vec<Option<(usize, usize)>> = vec![None; trie.nodes.len()];
        for node in 0..trie.nodes.len() {
            for &(byte, child) in &trie.nodes[node].children {
                mid_char[child] = match mid_char[node] {
                    Some((alt, k)) if k + 1 < UTF8_MULTI[alt].len() => Some((alt, k + 1)),
                    Some(_) => None,
                    None if byte < 0x80 => None,
                    None => UTF8_MULTI
                        .iter()
                        .position(|a| (a[0].0..=a[0].1).contains(&byte))
                        .map(|alt| (alt, 1)),
                };
            }
        }
        // Any multi-byte character then the rest: how most nodes leave the trie.
        let multi_rest = self.b.rule(
            format!("{name}: non-ASCII rest"),
            UTF8_MULTI
                .iter()
                .map(|alt| {
                    utf8_sets(alt)
                        .into_iter()
                        .map(bytes)
                        .chain([Sym::Rule(rest)])
                        .collect()
                })
                .collect(),
        )?;
        let mut rules: Vec<Option<RuleId>> = vec![None; trie.nodes.len()];
        for node in (0..trie.nodes.len()).rev() {
            let mut alts = leave_trie(&trie.nodes[node], mid_char[node], rest, multi_rest);
            for &(byte, child) in &trie.nodes[node].children {
                if let Some(rule) = rules[child] {
                    alts.push(vec![bytes(ByteSet::byte(byte)), Sym::Rule(rule)]);
                }
            }
            rules[node] = Some(self.b.rule(format!("{name}: after {node}"), alts)?);
        }
        let body = rules[0].unwrap_or(rest);
        self.b
            .rule(name.to_string(), vec![vec![q, Sym::Rule(body)]])
    }
}

/// The ways to leave the key trie at `node` (a byte no declared key continues with there, then
/// any key characters and the closing quote), and the closing quote itself if no declared key ends
/// here. `multi_rest` is "any multi-byte character, then `rest`".
fn leave_trie(
    node: &KeyNode,
    mid_char: Option<(usize, usize)>,
    rest: RuleId,
    multi_rest: RuleId,
) -> Vec<Seq> {
    let child_bytes = ByteSet::of(&node.children.iter().map(|&(b, _)| b).collect::<Vec<_>>());
    let mut alts: Vec<Seq> = Vec::new();
    let mut leave = |first: ByteSet, then: &[ByteSet]| {
        let first = first.minus(child_bytes);
        if !first.is_empty() {
            let mut seq = vec![bytes(first)];
            seq.extend(then.iter().map(|&s| bytes(s)));
            seq.push(Sym::Rule(rest));
            alts.push(seq);
        }
    };
    match mid_char {
        None => {
            leave(ascii_plain(), &[]);
            if node.children.iter().all(|&(b, _)| b < 0x80) {
                alts.push(vec![Sym::Rule(multi_rest)]);
            } else {
                for alt in UTF8_MULTI {
                    let sets = utf8_sets(alt);
                    leave(sets[0], &sets[1..]);
                }
            }
            if !node.terminal {
                alts.push(lit(b"\""));
            }
        }
        Some((alt, k)) => {
            let sets = utf8_sets(UTF8_MULTI[alt]);
            leave(sets[k], &sets[k + 1..]);
        }
    }
    alts
}

/// A byte trie of the declared keys, for [`Json::key_not_in`].
#[derive(Default)]
struct KeyTrie {
    nodes: Vec<KeyNode>,
}

#[derive(Default)]
struct KeyNode {
    children: Vec<(u8, usize)>,
    terminal: bool,
}

impl KeyTrie {
    fn insert(&mut self, key: &[u8]) {
        if self.nodes.is_empty() {
            self.nodes.push(KeyNode::default());
        }
        let mut node = 0;
        for &b in key {
            node = match self.nodes[node].children.iter().find(|&&(c, _)| c == b) {
                Some(&(_, child)) => child,
                None => {
                    let child = self.nodes.len();
                    self.nodes.push(KeyNode::default());
                    self.nodes[node].children.push((b, child));
                    child
                }
            };
        }
        self.nodes[node].terminal = true;
    }
}

// Formats: the content of the string, without quotes.

fn two_digits(first: ByteSet, second: ByteSet) -> Seq {
    vec![bytes(first), bytes(second)]
}

fn cat(parts: &[&[Sym]]) -> Seq {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// `YYYY-MM-DD` with the right number of days per month, February 29 in leap years only.
fn date_alts() -> Vec<Seq> {
    let d = ByteSet::range(b'0', b'9');
    let year = vec![bytes(d); 4];
    let day_1_9 = two_digits(ByteSet::byte(b'0'), ByteSet::range(b'1', b'9'));
    let day_10_19 = two_digits(ByteSet::byte(b'1'), d);
    let day_20_28 = two_digits(ByteSet::byte(b'2'), ByteSet::range(b'0', b'8'));
    let day_20_29 = two_digits(ByteSet::byte(b'2'), d);
    let dash = lit(b"-");
    let mut alts = Vec::new();
    // (months, last days beyond 29: "" for none, "0" for 30, "01" for 31)
    let months: [(Seq, &[u8]); 4] = [
        (
            two_digits(ByteSet::byte(b'0'), ByteSet::of(b"13578")),
            b"01",
        ),
        (two_digits(ByteSet::byte(b'1'), ByteSet::of(b"02")), b"01"),
        (two_digits(ByteSet::byte(b'0'), ByteSet::of(b"469")), b"0"),
        (lit(b"11"), b"0"),
    ];
    for (month, last) in months {
        let mut days = vec![day_1_9.clone(), day_10_19.clone(), day_20_29.clone()];
        days.push(two_digits(ByteSet::byte(b'3'), ByteSet::of(last)));
        for day in days {
            alts.push(cat(&[&year, &dash, &month, &dash, &day]));
        }
    }
    let feb = lit(b"02");
    for day in [day_1_9, day_10_19, day_20_28] {
        alts.push(cat(&[&year, &dash, &feb, &dash, &day]));
    }
    // February 29: years divisible by 4, except centuries not divisible by 400.
    let even = ByteSet::of(b"02468");
    let odd = ByteSet::of(b"13579");
    let leap_pairs = |allow_00: bool| -> Vec<Seq> {
        let mut v = vec![
            two_digits(even, ByteSet::of(b"48")),
            two_digits(odd, ByteSet::of(b"26")),
            two_digits(ByteSet::of(b"2468"), ByteSet::byte(b'0')),
        ];
        if allow_00 {
            v.push(lit(b"00"));
        }
        v
    };
    let feb29 = lit(b"-02-29");
    for low in leap_pairs(false) {
        alts.push(cat(&[&[bytes(d), bytes(d)], &low, &feb29]));
    }
    for century in leap_pairs(true) {
        alts.push(cat(&[&century, &lit(b"00"), &feb29]));
    }
    alts
}

/// `HH:MM:SS(.fraction)?(Z|+HH:MM|-HH:MM)` (RFC 3339 full-time, no leap second).
fn time_alts(j: &mut Json) -> Result<Vec<Seq>, GrammarError> {
    let d = ByteSet::range(b'0', b'9');
    let hour = j.b.rule(
        "hour",
        vec![
            two_digits(ByteSet::of(b"01"), d),
            two_digits(ByteSet::byte(b'2'), ByteSet::range(b'0', b'3')),
        ],
    )?;
    let min_sec = two_digits(ByteSet::range(b'0', b'5'), d);
    let colon = bytes(ByteSet::byte(b':'));
    let frac_digits = j.opt_digits(8)?;
    let frac = j.b.rule(
        "time fraction?",
        vec![
            vec![],
            vec![bytes(ByteSet::byte(b'.')), digit(), frac_digits],
        ],
    )?;
    let offset = j.b.rule(
        "time offset",
        vec![
            lit(b"Z"),
            cat(&[
                &[bytes(ByteSet::of(b"+-")), Sym::Rule(hour), colon],
                &min_sec,
            ]),
        ],
    )?;
    Ok(vec![cat(&[
        &[Sym::Rule(hour), colon],
        &min_sec,
        &[colon],
        &min_sec,
        &[Sym::Rule(frac), Sym::Rule(offset)],
    ])])
}

impl Json {
    /// The rule for a string of the given `format`, or `None` if the format is not supported.
    pub fn format(&mut self, format: &str) -> Result<Option<RuleId>, GrammarError> {
        let q = bytes(ByteSet::byte(b'"'));
        let quoted = |alts: Vec<Seq>| -> Vec<Seq> {
            alts.into_iter().map(|a| cat(&[&[q], &a, &[q]])).collect()
        };
        let rule = match format {
            "date" => self.shared("date", |_, _| Ok(quoted(date_alts())))?,
            "time" => self.shared("time", |j, _| Ok(quoted(time_alts(j)?)))?,
            "date-time" => self.shared("date-time", |j, _| {
                let date = j.b.rule("date content", date_alts())?;
                let time_alts = time_alts(j)?;
                let time = j.b.rule("time content", time_alts)?;
                Ok(quoted(vec![vec![
                    Sym::Rule(date),
                    bytes(ByteSet::byte(b'T')),
                    Sym::Rule(time),
                ]]))
            })?,
            "uuid" => self.shared("uuid", |_, _| {
                let hex = bytes(
                    ByteSet::range(b'0', b'9')
                        .union(ByteSet::range(b'a', b'f'))
                        .union(ByteSet::range(b'A', b'F')),
                );
                let mut seq = Vec::new();
                for (i, n) in [8, 4, 4, 4, 12].into_iter().enumerate() {
                    if i > 0 {
                        seq.push(bytes(ByteSet::byte(b'-')));
                    }
                    seq.extend(std::iter::repeat_n(hex, n));
                }
                Ok(quoted(vec![seq]))
            })?,
            _ => return Ok(None),
        };
        Ok(Some(rule))
    }
}
