//! Incremental detokenization: text is released only in whole UTF-8 characters, so a
//! character split across tokens (emoji, CJK in byte-level vocabularies) is never cut.

use super::Tokenizer;
use crate::ids::TokenId;

#[derive(Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
    render_special: bool,
}

impl Detokenizer {
    pub fn new(render_special: bool) -> Self {
        Self {
            pending: Vec::new(),
            render_special,
        }
    }

    /// Adds a token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, t: TokenId) -> String {
        self.pending
            .extend_from_slice(tok.token_bytes(t, self.render_special));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // SAFETY-free: the prefix is valid UTF-8 per `valid_up_to`.
                    out.push_str(std::str::from_utf8(&self.pending[..good]).expect("valid prefix"));
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        // Invalid bytes: replace them and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// The rest at the end of generation (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
