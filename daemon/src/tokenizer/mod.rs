//! Tokenizers built from a GGUF vocabulary: byte-level BPE (`tokenizer.ggml.model` =
//! `gpt2`, with the pre-tokenizer its `tokenizer.ggml.pre` names) and SentencePiece BPE
//! (`llama`), special tokens, BOS/EOS per the file's flags, incremental detokenization and
//! chat templates.

mod bpe;
mod chat;
mod detok;
mod pretok;
mod spm;
mod stream;

use std::collections::HashMap;

pub use bpe::byte_to_char;
pub use chat::ChatMessage;
pub use detok::Detokenizer;
use powerinfer_ops::gguf::{Metadata, Value};
pub use pretok::PreTokenizer;
pub use stream::TextStream;

use crate::ids::TokenId;

/// Why a vocabulary could not be used, or a template rendered.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("missing metadata key {key}")]
    MissingKey { key: &'static str },
    #[error("metadata key {key} is malformed: {reason}")]
    BadKey { key: &'static str, reason: String },
    #[error("unsupported tokenizer model {model:?} (supported: gpt2, llama)")]
    UnknownModel { model: String },
    #[error("unknown pre-tokenizer type {pre:?} (tokenizer.ggml.pre)")]
    UnknownPreTokenizer { pre: String },
    #[error("the model has no chat template (tokenizer.chat_template)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
}

/// `tokenizer.ggml.token_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_id(v: i32) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

enum Kind {
    Bpe {
        pre: pretok::PreTokenizer,
        merges: bpe::Merges,
        /// Token of each byte's GPT-2 character.
        byte_token: Box<[Option<TokenId>; 256]>,
        /// Emit a whole piece that is itself a token without merging (llama3, tekken).
        ignore_merges: bool,
    },
    Spm {
        scores: Vec<f32>,
        byte_tokens: Box<[Option<TokenId>; 256]>,
        add_space_prefix: bool,
    },
}

/// Texts llama.cpp treats as end of generation wherever they occur in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
];

pub struct Tokenizer {
    kind: Kind,
    tokens: Vec<String>,
    token_id: HashMap<String, TokenId>,
    types: Vec<TokenType>,
    /// What each token decodes to (special tokens: their text).
    bytes: Vec<Vec<u8>>,
    /// Special tokens that can occur in text, longest text first.
    specials: Vec<TokenId>,
    bos: Option<TokenId>,
    eos: Option<TokenId>,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<TokenId>,
    chat_template: Option<String>,
}

fn strings<'a>(
    md: &'a Metadata,
    key: &'static str,
) -> Result<Option<&'a [String]>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            v.as_array()
                .and_then(|a| a.as_strings())
                .map(Some)
                .ok_or(TokenizerError::BadKey {
                    key,
                    reason: "expected an array of strings".into(),
                })
        }
    }
}

fn token_key(md: &Metadata, key: &'static str, n: usize) -> Option<TokenId> {
    md.get(key)
        .and_then(Value::as_u64)
        .filter(|&v| (v as usize) < n)
        .map(|v| TokenId(v as u32))
}

impl Tokenizer {
    pub fn from_gguf(md: &Metadata) -> Result<Self, TokenizerError> {
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or(TokenizerError::MissingKey {
                key: "tokenizer.ggml.model",
            })?;
        let tokens = strings(md, "tokenizer.ggml.tokens")?
            .ok_or(TokenizerError::MissingKey {
                key: "tokenizer.ggml.tokens",
            })?
            .to_vec();
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(TokenizerError::BadKey {
                key: "tokenizer.ggml.tokens",
                reason: format!("{n} tokens"),
            });
        }
        let types: Vec<TokenType> = match md
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
        {
            Some(a) => {
                let ids = a
                    .as_i32s()
                    .filter(|v| v.len() == n)
                    .ok_or(TokenizerError::BadKey {
                        key: "tokenizer.ggml.token_type",
                        reason: format!("expected {n} i32 values"),
                    })?;
                ids.iter().map(|&v| TokenType::from_id(v)).collect()
            }
            None => vec![TokenType::Normal; n],
        };
        let mut token_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            // The first occurrence wins for duplicated texts, as in llama.cpp.
            token_id.entry(t.clone()).or_insert(TokenId(i as u32));
        }

        let pre = md.get("tokenizer.ggml.pre").and_then(Value::as_str);
        let (kind, default_add_bos) = match model {
            "gpt2" => {
                let pre_tok = pretok::PreTokenizer::for_pre(pre)?;
                let merges =
                    strings(md, "tokenizer.ggml.merges")?.ok_or(TokenizerError::MissingKey {
                        key: "tokenizer.ggml.merges",
                    })?;
                let table = bpe::byte_to_char();
                let byte_token = Box::new(std::array::from_fn(|b| {
                    token_id.get(&table[b].to_string()).copied()
                }));
                let merges_first = matches!(pre_tok.name(), "llama3" | "tekken");
                (
                    Kind::Bpe {
                        merges: bpe::Merges::new(merges, &token_id),
                        byte_token,
                        ignore_merges: merges_first,
                        pre: pre_tok,
                    },
                    merges_first,
                )
            }
            "llama" => {
                let scores = match md.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                    Some(a) => a
                        .as_f32s()
                        .filter(|s| s.len() == n)
                        .map(<[f32]>::to_vec)
                        .ok_or(TokenizerError::BadKey {
                            key: "tokenizer.ggml.scores",
                            reason: format!("expected {n} f32 values"),
                        })?,
                    None => vec![0.0; n],
                };
                let byte_tokens = Box::new(std::array::from_fn(|b| {
                    token_id.get(&format!("<0x{b:02X}>")).copied()
                }));
                let add_space_prefix = md
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                (
                    Kind::Spm {
                        scores,
                        byte_tokens,
                        add_space_prefix,
                    },
                    true,
                )
            }
            other => {
                return Err(TokenizerError::UnknownModel {
                    model: other.to_owned(),
                });
            }
        };

        let bos = token_key(md, "tokenizer.ggml.bos_token_id", n);
        let eos = token_key(md, "tokenizer.ggml.eos_token_id", n);
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(default_add_bos)
            && bos.is_some();
        let add_eos = md
            .get("tokenizer.ggml.add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            && eos.is_some();

        let mut eog: Vec<TokenId> = [
            eos,
            token_key(md, "tokenizer.ggml.eot_token_id", n),
            token_key(md, "tokenizer.ggml.eom_token_id", n),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (i, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t.as_str()) {
                eog.push(TokenId(i as u32));
            }
        }
        eog.sort();
        eog.dedup();

        let mut types = types;
        for &id in &eog {
            // llama.cpp makes end-of-generation tokens control tokens, user-defined ones
            // too (Gemma's `</s>`, an HTML tag there): they are then matched in text only
            // when special tokens are parsed.
            if matches!(
                types[id.index()],
                TokenType::Normal | TokenType::UserDefined
            ) {
                types[id.index()] = TokenType::Control;
            }
        }

        let bytes = token_bytes(&kind, &tokens, &types);
        let mut specials: Vec<TokenId> = (0..n)
            .filter(|&i| {
                matches!(
                    types[i],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                ) && !tokens[i].is_empty()
            })
            .map(|i| TokenId(i as u32))
            .collect();
        specials.sort_by(|a, b| {
            tokens[b.index()]
                .len()
                .cmp(&tokens[a.index()].len())
                .then(a.cmp(b))
        });

        Ok(Self {
            kind,
            tokens,
            token_id,
            types,
            bytes,
            specials,
            bos,
            eos,
            add_bos,
            add_eos,
            eog,
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<TokenId> {
        self.bos
    }

    pub fn eos(&self) -> Option<TokenId> {
        self.eos
    }

    /// Whether encoding with special tokens starts with BOS (`tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether generation ends at this token (EOS, EOT, `<|im_end|>`...).
    pub fn is_eog(&self, t: TokenId) -> bool {
        self.eog.binary_search(&t).is_ok()
    }

    pub fn eog_tokens(&self) -> &[TokenId] {
        &self.eog
    }

    pub fn token_type(&self, t: TokenId) -> Option<TokenType> {
        self.types.get(t.index()).copied()
    }

    /// The token's text as stored in the vocabulary.
    pub fn token_text(&self, t: TokenId) -> Option<&str> {
        self.tokens.get(t.index()).map(String::as_str)
    }

    /// The token's own id, when `text` is exactly one token.
    pub fn token_of(&self, text: &str) -> Option<TokenId> {
        self.token_id.get(text).copied()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Whether a token is special (control, user-defined, unknown): rendered only when asked.
    pub fn is_special(&self, t: TokenId) -> bool {
        matches!(
            self.token_type(t),
            Some(TokenType::Control | TokenType::Unknown | TokenType::Unused)
        )
    }

    /// The bytes a token decodes to. Control and unknown tokens give their text only when
    /// `render_special` is set.
    pub fn token_bytes(&self, t: TokenId, render_special: bool) -> &[u8] {
        match self.bytes.get(t.index()) {
            Some(b) if render_special || !self.is_special(t) => b,
            _ => &[],
        }
    }

    /// Text → tokens. `add_special` adds BOS/EOS as the file asks; `parse_special` turns
    /// the text of control tokens (`<|im_start|>`) into those tokens instead of spelling it.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<TokenId> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(t) => {
                    out.push(t);
                    prev_special = true;
                }
                Fragment::Text(s) => {
                    self.encode_text(s, prev_special, &mut out);
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    fn encode_text(&self, text: &str, after_special: bool, out: &mut Vec<TokenId>) {
        match &self.kind {
            Kind::Bpe {
                pre,
                merges,
                byte_token,
                ignore_merges,
            } => {
                let table = bpe::byte_to_char();
                let mut symbols = Vec::new();
                let mut encoded = String::new();
                for range in pre.split(text) {
                    let piece = &text.as_bytes()[range];
                    if *ignore_merges {
                        encoded.clear();
                        encoded.extend(piece.iter().map(|&b| table[b as usize]));
                        if let Some(&t) = self.token_id.get(&encoded) {
                            out.push(t);
                            continue;
                        }
                    }
                    symbols.clear();
                    // Every byte's character is a token in a byte-level vocabulary; a broken
                    // vocabulary without one loses that byte rather than failing.
                    symbols.extend(piece.iter().filter_map(|&b| byte_token[b as usize]));
                    bpe::merge(&symbols, merges, out);
                }
            }
            Kind::Spm {
                scores,
                byte_tokens,
                add_space_prefix,
            } => {
                let mut s = String::with_capacity(text.len() + 3);
                if *add_space_prefix && after_special {
                    s.push('\u{2581}');
                }
                s.extend(text.chars().map(|c| if c == ' ' { '\u{2581}' } else { c }));
                let unknown = (0..self.types.len())
                    .find(|&i| self.types[i] == TokenType::Unknown)
                    .map(|i| TokenId(i as u32));
                spm::Spm {
                    token_id: &self.token_id,
                    scores,
                    byte_tokens,
                    unknown,
                }
                .encode(&s, out);
            }
        }
    }

    /// Splits text at special tokens, longest first.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Text(text)];
        for &sp in &self.specials {
            let ty = self.types[sp.index()];
            if !parse_special && ty != TokenType::UserDefined {
                continue;
            }
            let needle = self.tokens[sp.index()].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Text(mut s) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = s.find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(&s[..at]));
                    }
                    next.push(Fragment::Token(sp));
                    s = &s[at + needle.len()..];
                }
                if !s.is_empty() {
                    next.push(Fragment::Text(s));
                }
            }
            frags = next;
        }
        frags
    }

    /// A whole sequence of tokens → text (lossy where tokens end inside a UTF-8
    /// character). SentencePiece vocabularies that add a space prefix lose it again here,
    /// as llama.cpp's detokenizer does.
    pub fn decode(&self, tokens: &[TokenId], render_special: bool) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend_from_slice(self.token_bytes(t, render_special));
        }
        let spm_prefix = matches!(
            self.kind,
            Kind::Spm {
                add_space_prefix: true,
                ..
            }
        );
        let skip = usize::from(spm_prefix && bytes.first() == Some(&b' '));
        String::from_utf8_lossy(&bytes[skip..]).into_owned()
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Token(TokenId),
}

/// The bytes each token stands for.
fn token_bytes(kind: &Kind, tokens: &[String], types: &[TokenType]) -> Vec<Vec<u8>> {
    let table = bpe::byte_to_char();
    let mut char_to_byte: HashMap<char, u8> = HashMap::with_capacity(256);
    for (b, c) in table.iter().enumerate() {
        char_to_byte.insert(*c, b as u8);
    }
    tokens
        .iter()
        .zip(types)
        .map(|(text, ty)| match (ty, kind) {
            (
                TokenType::Control
                | TokenType::Unknown
                | TokenType::UserDefined
                | TokenType::Unused,
                _,
            ) => text.as_bytes().to_vec(),
            (TokenType::Byte, _) => {
                match text.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    Some(hex) => u8::from_str_radix(hex, 16)
                        .map_or_else(|_| text.as_bytes().to_vec(), |b| vec![b]),
                    None => text.as_bytes().to_vec(),
                }
            }
            (TokenType::Normal, Kind::Bpe { .. }) => {
                let mut out = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match char_to_byte.get(&c) {
                        Some(&b) => out.push(b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                out
            }
            (TokenType::Normal, Kind::Spm { .. }) => text.replace('\u{2581}', " ").into_bytes(),
        })
        .collect()
}

/// A byte-level vocabulary for unit tests elsewhere in the crate: token `b` (0..256) is
/// byte `b`; then `<|endoftext|>` (256), `<|im_start|>` (257, BOS), `<|im_end|>` (258,
/// EOS; both end generation) and `<|pad|>` (259); a ChatML template.
#[cfg(test)]
pub(crate) fn byte_level_for_tests() -> Tokenizer {
    use powerinfer_ops::gguf::Array;

    let table = bpe::byte_to_char();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"];
    tokens.extend(specials.iter().map(|s| (*s).to_owned()));
    let mut types = vec![1i32; 256];
    types.extend([3; 4]);
    let mut md = Metadata::new();
    let mut set = |k: &str, v: Value| md.set(k, v);
    set("tokenizer.ggml.model", Value::String("gpt2".into()));
    set("tokenizer.ggml.pre", Value::String("smollm".into()));
    set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    set(
        "tokenizer.ggml.merges",
        Value::Array(Array::String(Vec::new())),
    );
    set("tokenizer.ggml.bos_token_id", Value::U32(257));
    set("tokenizer.ggml.eos_token_id", Value::U32(258));
    set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    set(
        "tokenizer.chat_template",
        Value::String(
            "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
                .into(),
        ),
    );
    Tokenizer::from_gguf(&md).expect("a valid vocabulary")
}

#[cfg(test)]
mod tests {
    use powerinfer_ops::gguf::{Array, Metadata, Value};

    use super::*;

    /// A SentencePiece vocabulary: controls, 256 byte tokens, then pieces with scores.
    fn spm() -> Tokenizer {
        let pieces = [
            ("\u{2581}", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("ll", -3.0),
            ("he", -4.0),
            ("llo", -5.0),
            ("hello", -6.0),
            ("\u{2581}hello", -7.0),
            ("or", -8.0),
            ("\u{2581}w", -9.0),
            ("\u{2581}wor", -10.0),
            ("\u{2581}world", -11.0),
            ("ld", -12.0),
        ];
        let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (p, s) in pieces {
            tokens.push(p.to_owned());
            types.push(1);
            scores.push(s);
        }
        let mut md = Metadata::new();
        let mut set = |k: &str, v: Value| md.set(k, v);
        set("tokenizer.ggml.model", Value::String("llama".into()));
        set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
        set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
        set("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
        set("tokenizer.ggml.bos_token_id", Value::U32(1));
        set("tokenizer.ggml.eos_token_id", Value::U32(2));
        Tokenizer::from_gguf(&md).unwrap()
    }

    fn texts(tok: &Tokenizer, ids: &[TokenId]) -> Vec<String> {
        ids.iter()
            .map(|&t| tok.token_text(t).unwrap().to_owned())
            .collect()
    }

    #[test]
    fn sentencepiece_merges_by_score_with_a_space_prefix_and_bos() {
        let tok = spm();
        let ids = tok.encode("hello world", true, true);
        assert_eq!(texts(&tok, &ids), ["<s>", "\u{2581}hello", "\u{2581}world"]);
        assert_eq!(tok.decode(&ids, false), "hello world");
        // Without BOS when special tokens are not added.
        assert_eq!(
            texts(&tok, &tok.encode("hello", false, true)),
            ["\u{2581}hello"]
        );
    }

    #[test]
    fn sentencepiece_falls_back_to_bytes_and_splits_special_tokens() {
        let tok = spm();
        let ids = tok.encode("hé</s>", false, true);
        assert_eq!(
            texts(&tok, &ids),
            ["\u{2581}", "h", "<0xC3>", "<0xA9>", "</s>"]
        );
        assert_eq!(tok.decode(&ids, true), "hé</s>");
        assert!(tok.is_eog(TokenId(2)));
        // A space after a special token gets the prefix again.
        let ids = tok.encode("</s>hello", false, true);
        assert_eq!(texts(&tok, &ids), ["</s>", "\u{2581}hello"]);
    }

    #[test]
    fn unknown_models_and_bad_keys_are_named() {
        let mut md = Metadata::new();
        md.set("tokenizer.ggml.model", Value::String("wordpiece".into()));
        md.set(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(vec!["a".into()])),
        );
        let e = Tokenizer::from_gguf(&md).err().unwrap();
        assert!(e.to_string().contains("wordpiece"), "{e}");
        md.set("tokenizer.ggml.model", Value::String("llama".into()));
        md.set(
            "tokenizer.ggml.scores",
            Value::Array(Array::F32(vec![0.0, 1.0])),
        );
        let e = Tokenizer::from_gguf(&md).err().unwrap();
        assert!(e.to_string().contains("tokenizer.ggml.scores"), "{e}");
    }
}
