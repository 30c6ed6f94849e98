//! Incremental detokenization with stop strings.
//!
//! Contract: feed each generated token's bytes to [`TextStream::push`]; it returns only text
//! that is final — complete UTF-8 (a character split across tokens waits for its last byte) and
//! not possibly the start of a stop string (the longest suffix that could still grow into one
//! is held back). When a stop string appears, the text before it is released and the stream
//! reports the stop; the stop string itself is never shown.

#[derive(Debug, Default)]
pub struct TextStream {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character at the end.
    pending: Vec<u8>,
    /// All decoded text so far (up to a stop string, once found).
    text: String,
    /// Bytes of `text` already returned.
    emitted: usize,
    stopped: Option<String>,
}

/// What one push produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Piece {
    /// New final text (may be empty).
    pub text: String,
    /// The stop string that ended generation, if one appeared.
    pub stop: Option<String>,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Piece {
        if self.stopped.is_some() {
            return Piece {
                text: String::new(),
                stop: None,
            };
        }
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => {
                // Invalid, not just incomplete: replace the bad bytes and go on.
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                self.text.push_str(&s);
                return self.scan();
            }
            Err(e) => e.valid_up_to(),
        };
        let rest = self.pending.split_off(valid);
        // valid bytes are UTF-8 by construction
        self.text.push_str(&String::from_utf8_lossy(&self.pending));
        self.pending = rest;
        self.scan()
    }

    fn scan(&mut self) -> Piece {
        // A stop string may straddle already-emitted text only if we emitted part of it,
        // which the hold-back prevents; search from the emitted point minus nothing.
        let hay = &self.text[self.emitted..];
        let found = self
            .stops
            .iter()
            .filter_map(|s| hay.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, s)| (*at, usize::MAX - s.len()));
        if let Some((at, s)) = found {
            let out = hay[..at].to_owned();
            let stop = s.clone();
            self.text.truncate(self.emitted + at);
            self.emitted = self.text.len();
            self.stopped = Some(stop.clone());
            return Piece {
                text: out,
                stop: Some(stop),
            };
        }
        let hold = self.holdback(hay);
        let end = self.text.len() - hold;
        let out = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        Piece {
            text: out,
            stop: None,
        }
    }

    /// Bytes at the end of `hay` that are a proper prefix of some stop string.
    fn holdback(&self, hay: &str) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > best && hay.ends_with(&s[..k]) {
                    best = k;
                }
            }
        }
        best
    }

    /// Release everything held back (end of generation without a stop string).
    pub fn finish(&mut self) -> String {
        if self.stopped.is_some() {
            return String::new();
        }
        if !self.pending.is_empty() {
            let s = String::from_utf8_lossy(&self.pending).into_owned();
            self.text.push_str(&s);
            self.pending.clear();
        }
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }

    /// All text produced (up to any stop string).
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&[u8]]) -> (Vec<String>, Option<String>, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut ts = TextStream::new(&stops);
        let mut out = Vec::new();
        let mut stop = None;
        for c in chunks {
            let p = ts.push(c);
            out.push(p.text);
            if p.stop.is_some() {
                stop = p.stop;
                break;
            }
        }
        if stop.is_none() {
            out.push(ts.finish());
        }
        (out, stop, ts.text().to_owned())
    }

    #[test]
    fn multibyte_char_split_across_tokens_is_held() {
        let e = "é".as_bytes();
        let (out, _, text) = run(&[], &[b"caf", &e[..1], &e[1..], b"!"]);
        assert_eq!(out, vec!["caf", "", "é", "!", ""]);
        assert_eq!(text, "café!");
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_never_shown() {
        let (out, stop, text) = run(&["\nUser:"], &[b"Hello", b"\nUs", b"er", b":", b" more"]);
        assert_eq!(out.concat(), "Hello");
        assert_eq!(stop.as_deref(), Some("\nUser:"));
        assert_eq!(text, "Hello");
        // the partial "\nUs" was never emitted early
        assert_eq!(out[1], "");
    }

    #[test]
    fn held_back_prefix_released_when_it_diverges() {
        let (out, stop, _) = run(&["STOP"], &[b"ST", b"ART"]);
        assert_eq!(stop, None);
        assert_eq!(out, vec!["", "START", ""]);
    }

    #[test]
    fn earliest_stop_wins() {
        // "abc" starts before "b" does, so it is the one that ends the text.
        let (out, stop, _) = run(&["b", "abc"], &[b"xxabcd"]);
        assert_eq!(out.concat(), "xx");
        assert_eq!(stop.as_deref(), Some("abc"));
        let (out, stop, _) = run(&["b", "abc"], &[b"xxbabc"]);
        assert_eq!(out.concat(), "xx");
        assert_eq!(stop.as_deref(), Some("b"));
    }

    #[test]
    fn invalid_bytes_become_replacement_chars() {
        let (out, _, _) = run(&[], &[b"a\xffb"]);
        assert_eq!(out.concat(), "a\u{FFFD}b");
    }
}
