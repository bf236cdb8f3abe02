//! Tokenization parity with llama.cpp on the default model: exact ids for 20 hard strings
//! (with and without special-token parsing) and the 12 reference prompts, and decoding
//! back to the exact bytes.

use powerinfer_daemon::ids::TokenId;
use powerinfer_daemon::tokenizer::{Detokenizer, Tokenizer};
use powerinfer_ops::gguf::GgufFile;
use powerinfer_tests::{default_model, fixture_json, ids};

fn tokenizer() -> Tokenizer {
    let file = GgufFile::open(default_model()).unwrap();
    Tokenizer::from_gguf(file.metadata()).unwrap()
}

fn raw(t: &[TokenId]) -> Vec<u32> {
    t.iter().map(|t| t.0).collect()
}

#[test]
fn hard_strings_match_llama_cpp_ids() {
    let tok = tokenizer();
    let cases = fixture_json("reference/smollm2_tokenize.json");
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    for c in cases {
        let (id, text) = (c["id"].as_str().unwrap(), c["text"].as_str().unwrap());
        assert_eq!(
            raw(&tok.encode(text, true, true)),
            ids(&c["token_ids"]),
            "{id}"
        );
        let plain = tok.encode(text, true, false);
        assert_eq!(
            raw(&plain),
            ids(&c["token_ids_no_parse_special"]),
            "{id} without special parsing"
        );
        // Decoding reproduces the text byte for byte (special tokens rendered).
        let with_special: Vec<TokenId> = ids(&c["token_ids"]).into_iter().map(TokenId).collect();
        assert_eq!(tok.decode(&with_special, true), text, "{id} decode");
        // Incremental decoding never splits a character and ends with the same text.
        let mut d = Detokenizer::new(true);
        let mut streamed = String::new();
        for &t in &with_special {
            streamed.push_str(&d.push(&tok, t));
        }
        streamed.push_str(&d.finish());
        assert_eq!(streamed, text, "{id} streamed");
    }
}

#[test]
fn reference_prompts_match_llama_cpp_ids() {
    let tok = tokenizer();
    let greedy = fixture_json("reference/smollm2_greedy.json");
    for c in greedy["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        assert_eq!(
            raw(&tok.encode(prompt, true, true)),
            ids(&c["prompt_token_ids"]),
            "{}",
            c["id"]
        );
    }
}

#[test]
fn end_of_generation_and_special_flags() {
    let tok = tokenizer();
    // The model sets add_bos_token = false: no BOS is added.
    assert_eq!(tok.encode("Hi", true, true), tok.encode("Hi", false, true));
    assert!(
        tok.is_eog(TokenId(0)) && tok.is_eog(TokenId(2)),
        "<|endoftext|> and <|im_end|>"
    );
    assert!(!tok.is_eog(TokenId(1)));
    // Control tokens render only when asked.
    assert_eq!(tok.token_bytes(TokenId(1), false), b"");
    assert_eq!(tok.token_bytes(TokenId(1), true), b"<|im_start|>");
}

#[test]
fn emoji_split_across_tokens_is_streamed_whole() {
    let tok = tokenizer();
    let text = "🇫🇷 👨\u{200d}👩\u{200d}👧";
    let ids = tok.encode(text, false, false);
    let mut d = Detokenizer::new(false);
    let mut chunks = Vec::new();
    for &t in &ids {
        let s = d.push(&tok, t);
        // Every chunk is whole characters (a `String` could not hold anything else); check
        // that no replacement character sneaked in.
        assert!(!s.contains('\u{fffd}'), "{s:?}");
        chunks.push(s);
    }
    assert!(
        ids.len() > text.chars().count() / 2,
        "emoji take several byte tokens"
    );
    assert_eq!(chunks.concat() + &d.finish(), text);
}
