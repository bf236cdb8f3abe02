//! Pre-tokenization of byte-level BPE vocabularies: splitting text into the pieces BPE
//! merges inside, as llama.cpp does for each `tokenizer.ggml.pre` value.
//!
//! Each pre-tokenizer is a list of regular expressions applied in turn: every expression
//! re-splits every current piece, and text an expression does not match stays a piece of
//! its own. The expressions are llama.cpp's; the one construct the `regex` crate lacks,
//! the final `\s+(?!\S)` alternative, is emulated by giving back the last whitespace of a
//! run that a non-whitespace character follows.

use regex::Regex;

use super::TokenizerError;

/// How a trailing `\s+(?!\S)` alternative is emulated for one expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookahead {
    /// The expression has no such alternative.
    Absent,
    /// A whitespace-only match followed by non-whitespace gives back its last character.
    Shorten,
    /// As `Shorten`, but a match ending in CR or LF came from an earlier `\s*[\r\n]+`
    /// alternative and stays whole.
    ShortenUnlessNewline,
}

struct Expr {
    re: Regex,
    lookahead: Lookahead,
}

/// The pre-tokenizer of one `tokenizer.ggml.pre` family.
pub struct PreTokenizer {
    name: &'static str,
    exprs: Vec<Expr>,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+";
// `(?=[\p{L}])([^a-z])` (a letter that is not ASCII lower case) as a class intersection.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]*[\p{L}&&[^A-Z]]+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]+[\p{L}&&[^A-Z]]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+";

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` value (`None`: the key is absent and
    /// llama.cpp's default applies). Unknown values are an error naming the value.
    pub fn for_pre(pre: Option<&str>) -> Result<Self, TokenizerError> {
        use Lookahead::*;
        let (name, exprs): (&'static str, &[(&str, Lookahead)]) = match pre {
            None | Some("default") => (
                "default",
                &[
                    (r"[\p{P}\$\+<=>\^~\|]+", Absent),
                    (GPT2, Shorten),
                    (r"\p{N}+", Absent),
                    (r"[0-9][0-9][0-9]", Absent),
                ],
            ),
            Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral") => {
                ("llama3", &[(LLAMA3, ShortenUnlessNewline)])
            }
            Some("qwen2" | "deepseek-r1-qwen" | "megrez") => {
                ("qwen2", &[(QWEN2, ShortenUnlessNewline)])
            }
            Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone") => {
                ("smollm", &[(r"\p{N}", Absent), (GPT2, Shorten)])
            }
            Some("gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de") => {
                ("gpt2", &[(GPT2, Shorten)])
            }
            Some("tekken") => ("tekken", &[(TEKKEN, ShortenUnlessNewline)]),
            Some(other) => {
                return Err(TokenizerError::UnknownPreTokenizer {
                    pre: other.to_owned(),
                });
            }
        };
        let exprs = exprs
            .iter()
            .map(|&(pattern, lookahead)| Expr {
                re: Regex::new(pattern).expect("built-in pre-tokenizer expressions are valid"),
                lookahead,
            })
            .collect();
        Ok(Self { name, exprs })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Splits `text` into pieces (byte ranges), in order, covering all of it.
    pub fn split(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        // The whole text is the one piece the first expression splits.
        let mut pieces = Vec::with_capacity(16);
        pieces.push(0..text.len());
        for expr in &self.exprs {
            let mut next = Vec::with_capacity(pieces.len());
            for piece in pieces {
                split_piece(expr, text, piece, &mut next);
            }
            pieces = next;
        }
        pieces.retain(|r| !r.is_empty());
        pieces
    }
}

fn split_piece(
    expr: &Expr,
    text: &str,
    piece: std::ops::Range<usize>,
    out: &mut Vec<std::ops::Range<usize>>,
) {
    let s = &text[piece.clone()];
    let base = piece.start;
    let mut at = 0;
    while at < s.len() {
        let Some(m) = expr.re.find_at(s, at) else {
            break;
        };
        let (mut start, mut end) = (m.start(), m.end());
        if m.is_empty() {
            // No expression here matches the empty string; guard against looping anyway.
            at = next_char(s, at);
            continue;
        }
        if expr.lookahead != Lookahead::Absent {
            end = emulate_lookahead(expr.lookahead, s, start, end);
        }
        if start > at {
            out.push(base + at..base + start);
        }
        out.push(base + start..base + end);
        start = end;
        at = start;
    }
    if at < s.len() {
        out.push(base + at..base + s.len());
    }
}

fn next_char(s: &str, at: usize) -> usize {
    at + s[at..].chars().next().map_or(1, char::len_utf8)
}

/// `\s+(?!\S)`: a whitespace run of two or more characters followed by a non-whitespace
/// character keeps all but its last character.
fn emulate_lookahead(mode: Lookahead, s: &str, start: usize, end: usize) -> usize {
    let m = &s[start..end];
    if !m.chars().all(char::is_whitespace) {
        return end;
    }
    if mode == Lookahead::ShortenUnlessNewline && m.ends_with(['\r', '\n']) {
        return end;
    }
    let followed_by_text = s[end..].chars().next().is_some_and(|c| !c.is_whitespace());
    let mut chars = m.char_indices();
    let last = chars.next_back().map_or(0, |(i, _)| i);
    if followed_by_text && last > 0 {
        start + last
    } else {
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces<'a>(p: &PreTokenizer, text: &'a str) -> Vec<&'a str> {
        p.split(text).into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn gpt2_whitespace_lookahead() {
        let p = PreTokenizer::for_pre(Some("gpt-2")).unwrap();
        assert_eq!(pieces(&p, "a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces(&p, "a \nb"), ["a", " ", "\n", "b"]);
        assert_eq!(pieces(&p, "trailing   "), ["trailing", "   "]);
        assert_eq!(pieces(&p, "I'm you're"), ["I", "'m", " you", "'re"]);
        assert_eq!(pieces(&p, "x\ty"), ["x", "\t", "y"]);
    }

    #[test]
    fn smollm_splits_every_digit() {
        let p = PreTokenizer::for_pre(Some("smollm")).unwrap();
        assert_eq!(pieces(&p, "a 1234b"), ["a", " ", "1", "2", "3", "4", "b"]);
    }

    #[test]
    fn llama3_groups_digits_by_three_and_keeps_newline_runs() {
        let p = PreTokenizer::for_pre(Some("llama-bpe")).unwrap();
        assert_eq!(pieces(&p, "12345 x"), ["123", "45", " x"]);
        assert_eq!(pieces(&p, "a  \n\n  b"), ["a", "  \n\n", " ", " b"]);
        assert_eq!(pieces(&p, "DON'T"), ["DON", "'T"]);
        let q = PreTokenizer::for_pre(Some("qwen2")).unwrap();
        assert_eq!(pieces(&q, "123"), ["1", "2", "3"]);
    }

    #[test]
    fn tekken_splits_case_runs() {
        let p = PreTokenizer::for_pre(Some("tekken")).unwrap();
        assert_eq!(pieces(&p, "CamelCase"), ["Camel", "Case"]);
        assert_eq!(
            pieces(&p, "HTTPServer ABCdef GHI"),
            ["HTTPServer", " ABCdef", " GHI"]
        );
    }

    #[test]
    fn unknown_pre_is_an_error_naming_it() {
        let e = PreTokenizer::for_pre(Some("nonesuch")).err().unwrap();
        assert!(e.to_string().contains("nonesuch"));
    }
}
