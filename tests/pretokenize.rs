//! Our pre-tokenizers (llama.cpp's expressions on the `regex` crate, with the `\s+(?!\S)`
//! look-ahead emulated) split the 20 hard strings exactly as Hugging Face `tokenizers`
//! splits them with a look-around engine (`fixtures/pretokenize_reference.py`).

use powerinfer_daemon::tokenizer::PreTokenizer;
use powerinfer_tests::fixture_json;

#[test]
fn every_family_matches_an_independent_lookaround_engine() {
    let reference = fixture_json("pretokenize_reference.json");
    let cases = fixture_json("reference/smollm2_tokenize.json");
    let mut mismatches = Vec::new();
    for (pre, by_case) in reference.as_object().unwrap() {
        let p = PreTokenizer::for_pre(Some(pre)).unwrap();
        for c in cases["cases"].as_array().unwrap() {
            let (id, text) = (c["id"].as_str().unwrap(), c["text"].as_str().unwrap());
            let want: Vec<&str> = by_case[id]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let got: Vec<&str> = p.split(text).into_iter().map(|r| &text[r]).collect();
            if got != want {
                mismatches.push(format!("{pre}/{id}:\n  ours {got:?}\n  hf   {want:?}"));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
