//! The text of a generation as it streams: tokens become text in whole characters (the
//! detokenizer), and text that could still become the start of a stop string is held back
//! until it cannot. The direct path and the engine's scheduler stream text through this.

use super::{Detokenizer, Tokenizer};
use crate::ids::TokenId;

/// One sequence's generated text: whole characters, stop strings applied.
pub struct TextStream {
    detok: Detokenizer,
    stops: StopMatcher,
}

impl TextStream {
    /// A stream that ends before any of `stops` (empty strings are ignored); special
    /// tokens are not rendered.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            detok: Detokenizer::new(false),
            stops: StopMatcher::new(stops),
        }
    }

    /// Adds a generated token; returns the text that may be released now and whether a
    /// stop string was found (the text then ends just before it, and nothing follows).
    pub fn push(&mut self, tok: &Tokenizer, t: TokenId) -> (String, bool) {
        let piece = self.detok.push(tok, t);
        self.stops.push(&piece)
    }

    /// Whether a stop string has been found.
    pub fn stopped(&self) -> bool {
        self.stops.done
    }

    /// The text still held at the end of generation: what was held back for a stop string
    /// that never came, and an unfinished character (as U+FFFD). Empty after a stop string.
    pub fn finish(&mut self) -> String {
        let tail = self.detok.finish();
        if self.stops.done {
            return String::new();
        }
        self.stops.finish(&tail)
    }
}

/// Streams text while watching for stop strings: text that could still become the start
/// of a stop string is held back until it cannot.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
    done: bool,
}

impl StopMatcher {
    fn new(mut stops: Vec<String>) -> Self {
        stops.retain(|s| !s.is_empty());
        Self {
            stops,
            held: String::new(),
            done: false,
        }
    }

    /// Adds text; returns what may be emitted now and whether a stop string was found
    /// (the emitted text then ends just before it).
    fn push(&mut self, piece: &str) -> (String, bool) {
        if self.done {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (piece.to_owned(), false);
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.done = true;
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .filter(move |&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }

    fn finish(&mut self, tail: &str) -> String {
        let mut out = std::mem::take(&mut self.held);
        out.push_str(tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::byte_level_for_tests;

    #[test]
    fn stop_strings_hold_back_only_possible_prefixes() {
        let stops = vec!["\n\nUser:".to_owned(), "END".to_owned()];
        let mut m = StopMatcher::new(stops.clone());
        assert_eq!(m.push("Hello"), ("Hello".to_owned(), false));
        assert_eq!(m.push(" world\n"), (" world".to_owned(), false));
        assert_eq!(m.push("\nUs"), (String::new(), false));
        assert_eq!(m.push("er: hi"), (String::new(), true));
        let mut m = StopMatcher::new(stops.clone());
        assert_eq!(m.push("THE E"), ("THE ".to_owned(), false));
        assert_eq!(m.push("ND"), (String::new(), true));
        let mut m = StopMatcher::new(stops);
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.finish("!"), "EN!");
    }

    /// Tokens of the byte-level test vocabulary: token `b` is byte `b`.
    fn bytes(s: &[u8]) -> Vec<TokenId> {
        s.iter().map(|&b| TokenId(u32::from(b))).collect()
    }

    #[test]
    fn characters_split_across_tokens_are_released_whole() {
        let tok = byte_level_for_tests();
        let mut text = TextStream::new(Vec::new());
        let out: Vec<String> = bytes("aé€".as_bytes())
            .into_iter()
            .map(|t| text.push(&tok, t).0)
            .collect();
        // "é" is 2 bytes and "€" 3: nothing is released until a character is complete.
        assert_eq!(out, ["a", "", "é", "", "", "€"]);
        assert_eq!(text.finish(), "");
    }

    #[test]
    fn held_text_is_released_at_the_end_unless_a_stop_string_matched() {
        let tok = byte_level_for_tests();
        let mut text = TextStream::new(vec!["xyz".into()]);
        let mut got = String::new();
        for t in bytes(b"abxy") {
            let (s, hit) = text.push(&tok, t);
            assert!(!hit);
            got.push_str(&s);
        }
        assert_eq!(got, "ab", "\"xy\" could begin the stop string");
        // An unfinished character ends as U+FFFD after the held text.
        assert_eq!(text.push(&tok, TokenId(0xE2)), (String::new(), false));
        assert_eq!(text.finish(), "xy\u{FFFD}");

        let mut text = TextStream::new(vec!["xyz".into()]);
        let released: String = bytes(b"abxyz")
            .into_iter()
            .map(|t| text.push(&tok, t).0)
            .collect();
        assert_eq!(released, "ab");
        assert!(text.stopped());
        assert_eq!(
            text.push(&tok, TokenId(u32::from(b'q'))),
            (String::new(), true)
        );
        assert_eq!(text.finish(), "", "nothing after a stop string");
    }
}
