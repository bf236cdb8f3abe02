//! Parity with llama.cpp on Gemma 3 270M (the `gemma3` architecture), with the checks and
//! thresholds `fixtures/reference/README.md` gives for this model (looser than SmolLM2's:
//! correct implementations differ more here): tokenization ids, first-step logits,
//! free-running greedy continuations, teacher-forced agreement, and perplexity of GPL-3
//! at n_ctx 512.
//!
//! This model turns rounding into logit differences of a few tenths (an f32 instead of an
//! f16 KV cache moves first-step logits by up to 0.3), so the logit checks run in both
//! numerics: the default two-level activations and llama.cpp's Q8 ones
//! (`Numerics::Ggml`). Free-running greedy runs in the latter: with the default numerics
//! `chat_autumn_poem` takes the other side of a 0.23 near-tie at step 8, inside the
//! prefix on which the reference's five runs (llama.cpp's four, all on Q8 activations,
//! and a float64 pass) agree.

use powerinfer_daemon::generation::sampler::SamplerConfig;
use powerinfer_daemon::generation::{FinishReason, GenParams, Session, SessionOptions};
use powerinfer_daemon::ids::TokenId;
use powerinfer_daemon::tokenizer::{ChatMessage, Detokenizer};
use powerinfer_daemon::tools::perplexity::perplexity;
use powerinfer_ops::quant::Numerics;
use powerinfer_tests::{fixture_json, fixture_text, gemma3_loaded, ids};

use super::parity_common::{argmax, teacher_forced as teacher_forced_steps, tokens};

/// First step: top-10 logits may differ by this much (correct runs: up to 1.71).
const FIRST_STEP_LOGIT_TOL: f32 = 2.0;
/// First step: the top-1 must agree where the reference's top-2 margin is at least this.
const FIRST_STEP_DECISIVE_MARGIN: f64 = 1.0;
/// Teacher-forced: the reference token's logit within this of our maximum (correct runs:
/// 0.57 on these prompts, 1.08 on others; a wrong global RoPE base: 5.91).
const TEACHER_FORCED_GAP: f32 = 1.5;
/// Teacher-forced top-1 agreement over all 549 steps (correct runs: 96.7-98.2%).
const TEACHER_FORCED_AGREEMENT: f64 = 0.93;
const TEACHER_FORCED_STEPS: usize = 549;
/// Free-running greedy may diverge after the all-runs prefix only where the reference's
/// top-2 margin is below this (correct runs diverged at margins up to 0.81).
const NEAR_TIE_MARGIN: f64 = 1.25;
/// llama.cpp's perplexity of GPL-3 at n_ctx 512, and the allowed relative error (correct
/// runs: -0.6% to +0.2%; a wrong global RoPE base: +8.7%).
const LLAMA_CPP_PPL: f64 = 13.9062;
const PPL_REL_TOL: f64 = 0.03;

fn raw(t: &[TokenId]) -> Vec<u32> {
    t.iter().map(|t| t.0).collect()
}

const BOTH_NUMERICS: [Numerics; 2] = [Numerics::Precise, Numerics::Ggml];

fn session(n_ctx: usize, numerics: Numerics) -> Session<'static> {
    let opts = SessionOptions {
        numerics,
        ..SessionOptions::new(n_ctx, 2)
    };
    Session::new(gemma3_loaded(), opts).unwrap()
}

#[test]
fn gemma3_hard_strings_match_llama_cpp_ids() {
    let tok = &gemma3_loaded().tokenizer;
    let cases = fixture_json("reference/gemma3_tokenize.json");
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    for c in cases {
        let (id, text) = (c["id"].as_str().unwrap(), c["text"].as_str().unwrap());
        let parsed = tok.encode(text, true, true);
        assert_eq!(raw(&parsed), ids(&c["token_ids"]), "{id}");
        let plain = tok.encode(text, true, false);
        assert_eq!(
            raw(&plain),
            ids(&c["token_ids_no_parse_special"]),
            "{id} without special parsing"
        );
        // Decoding (after the BOS) reproduces the text byte for byte, whole and streamed.
        for ids in [&parsed[1..], &plain[1..]] {
            assert_eq!(tok.decode(ids, true), text, "{id} decode");
            let mut d = Detokenizer::new(true);
            let mut streamed = String::new();
            for &t in ids {
                streamed.push_str(&d.push(tok, t));
            }
            streamed.push_str(&d.finish());
            assert_eq!(streamed, text, "{id} streamed");
        }
    }
}

#[test]
fn gemma3_reference_prompts_match_llama_cpp_ids() {
    let tok = &gemma3_loaded().tokenizer;
    let greedy = fixture_json("reference/gemma3_greedy.json");
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
fn gemma3_special_tokens_and_end_of_generation() {
    let tok = &gemma3_loaded().tokenizer;
    // add_bos_token = true: BOS (2) first.
    assert_eq!(tok.encode("Hi", true, true)[0], TokenId(2));
    assert_ne!(tok.encode("Hi", false, true)[0], TokenId(2));
    // `<eos>`, `<end_of_turn>` and `</s>` end generation (llama.cpp's list), `<bos>` not.
    for t in [1, 106, 212] {
        assert!(tok.is_eog(TokenId(t)), "{t}");
    }
    assert!(!tok.is_eog(TokenId(2)));
    assert_eq!(
        tok.encode("<start_of_turn>user\n", false, true)[0],
        TokenId(105)
    );
    assert_eq!(tok.token_bytes(TokenId(106), false), b"");
    assert_eq!(tok.token_bytes(TokenId(106), true), b"<end_of_turn>");
}

/// The GGUF has no chat template; Gemma 3's (from its Hugging Face tokenizer config)
/// renders through our renderer into the reference's chat prompts, token for token.
#[test]
fn gemma3_chat_template_renders_the_reference_chat_prompts() {
    let tok = &gemma3_loaded().tokenizer;
    assert!(tok.chat_template().is_none());
    let template = fixture_text("templates/gemma3.jinja");
    let greedy = fixture_json("reference/gemma3_greedy.json");
    let case = |id: &str| {
        greedy["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap()
            .clone()
    };
    for (id, question) in [
        ("chat_capital_italy", "What is the capital of Italy?"),
        (
            "chat_autumn_poem",
            "Write a short poem about autumn leaves.",
        ),
    ] {
        let text = tok
            .render_chat_with(&template, &[ChatMessage::new("user", question)])
            .unwrap();
        let c = case(id);
        assert_eq!(
            format!("<bos>{}", c["prompt"].as_str().unwrap()),
            text,
            "{id}"
        );
        // The template writes BOS itself: no second one.
        assert_eq!(
            raw(&tok.encode(&text, false, true)),
            ids(&c["prompt_token_ids"]),
            "{id}"
        );
    }
    // A system message opens the first user turn; roles must alternate.
    let text = tok
        .render_chat_with(
            &template,
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello."),
                ChatMessage::new("user", "Bye"),
            ],
        )
        .unwrap();
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.\
         <end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    let e = tok
        .render_chat_with(
            &template,
            &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
        )
        .unwrap_err();
    assert!(e.to_string().contains("alternate"), "{e}");
}

#[test]
fn gemma3_first_step_logits_match_llama_cpp() {
    for numerics in BOTH_NUMERICS {
        first_step_logits(numerics);
    }
}

fn first_step_logits(numerics: Numerics) {
    let reference = fixture_json("reference/gemma3_next_token_logits.json");
    let greedy = fixture_json("reference/gemma3_greedy.json");
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    let (mut worst, mut decisive) = (0.0f32, 0);
    for c in cases {
        let name = c["id"].as_str().unwrap();
        let g = greedy["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == c["id"])
            .unwrap();
        let margin = g["steps"][0]["margin_top1_top2"].as_f64().unwrap();
        let prompt = tokens(&c["prompt_token_ids"]);
        let mut s = session(prompt.len() + 1, numerics);
        let logits = s.eval(&prompt, 0, |i| i == prompt.len() - 1).unwrap();
        let top = c["llama_cpp"]["top10"].as_array().unwrap();
        let want_top = top[0]["id"].as_u64().unwrap() as usize;
        if margin >= FIRST_STEP_DECISIVE_MARGIN {
            decisive += 1;
            assert_eq!(
                argmax(logits),
                want_top,
                "{name} top-1 (margin {margin}, {numerics:?})"
            );
        }
        for t in top {
            let (id, want) = (
                t["id"].as_u64().unwrap() as usize,
                t["logit"].as_f64().unwrap() as f32,
            );
            let diff = (logits[id] - want).abs();
            worst = worst.max(diff);
            assert!(
                diff <= FIRST_STEP_LOGIT_TOL,
                "{name} token {id}: {} vs {want} ({numerics:?})",
                logits[id]
            );
        }
    }
    eprintln!(
        "gemma3 first-step top-10 logits ({numerics:?}): max |ours - llama.cpp| = {worst:.3}"
    );
    assert_eq!(decisive, 6, "prompts with a decisive first step");
}

/// In llama.cpp's numerics (see the module docs).
#[test]
fn gemma3_greedy_continuations_match_up_to_near_ties() {
    let reference = fixture_json("reference/gemma3_greedy.json");
    for c in reference["cases"].as_array().unwrap() {
        let name = c["id"].as_str().unwrap();
        let prompt = tokens(&c["prompt_token_ids"]);
        let want = tokens(&c["generated_token_ids"]);
        let steps = c["steps"].as_array().unwrap();
        let stable = c["stable_prefix_len_all_runs"].as_u64().unwrap() as usize;
        let mut s = session(prompt.len() + steps.len() + 1, Numerics::Ggml);
        // One step more than the reference emitted, so a reference stop at end of
        // generation can be reproduced.
        let params = GenParams {
            max_tokens: want.len() + 1,
            sampler: SamplerConfig::greedy(),
            stop: Vec::new(),
        };
        let got = s
            .generate(&prompt, &params, |_| std::ops::ControlFlow::Continue(()))
            .unwrap();
        let diverged = got.generated.iter().zip(&want).position(|(a, b)| a != b);
        eprintln!(
            "gemma3 greedy {name}: {} of {} reference tokens equal (all-runs prefix {stable})",
            diverged.unwrap_or(got.generated.len().min(want.len())),
            want.len()
        );
        let near_tie = |i: usize| steps[i]["margin_top1_top2"].as_f64().unwrap() < NEAR_TIE_MARGIN;
        match diverged {
            None if got.generated.len() < want.len() => {
                // We stopped early: only allowed at a near-tie with the end-of-generation token.
                let i = got.generated.len();
                assert!(
                    i >= stable && near_tie(i),
                    "{name}: stopped early at step {i} ({:?})",
                    got.stop
                );
            }
            None => {
                let eog_stop = c["stopped_at_eog"].as_bool().unwrap();
                let stopped = matches!(got.stop, FinishReason::EndOfGeneration(_));
                if eog_stop && !stopped {
                    assert!(
                        want.len() >= stable && near_tie(want.len()),
                        "{name}: should stop at end of generation"
                    );
                }
            }
            Some(i) => {
                assert!(
                    i >= stable,
                    "{name}: diverged at step {i}, inside the all-runs prefix of {stable}"
                );
                assert!(
                    near_tie(i),
                    "{name}: diverged at step {i} where the margin is {}",
                    steps[i]["margin_top1_top2"]
                );
            }
        }
    }
}

#[test]
fn gemma3_teacher_forced_agreement() {
    for numerics in BOTH_NUMERICS {
        teacher_forced(numerics);
    }
}

fn teacher_forced(numerics: Numerics) {
    let reference = fixture_json("reference/gemma3_greedy.json");
    let label = format!("{numerics:?}");
    let (agree, total, worst_gap) = teacher_forced_steps(
        &reference,
        |n| session(n, numerics),
        TEACHER_FORCED_GAP,
        &label,
    );
    let rate = agree as f64 / total as f64;
    eprintln!(
        "gemma3 teacher-forced ({numerics:?}): top-1 agreement {agree}/{total} = {:.1}%, \
         worst gap {worst_gap:.3}",
        rate * 100.0
    );
    assert_eq!(total, TEACHER_FORCED_STEPS);
    assert!(
        rate >= TEACHER_FORCED_AGREEMENT,
        "agreement {rate} ({numerics:?})"
    );
}

#[test]
fn gemma3_gpl3_perplexity_matches_llama_cpp() {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
        .expect("Debian's base-files ships GPL-3");
    // As llama-perplexity reads it: one trailing newline dropped, BOS added, special
    // tokens not parsed.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let toks = gemma3_loaded().tokenizer.encode(text, true, false);
    assert_eq!(toks.len(), 7562);
    let mut s = session(512, Numerics::Precise);
    let p = perplexity(&mut s, &toks, |_| {}).unwrap();
    eprintln!(
        "gemma3 GPL-3 perplexity at n_ctx 512: {:.4} +/- {:.4} ({} chunks)",
        p.value(),
        p.error(),
        p.chunks
    );
    assert_eq!(p.chunks, 14);
    let rel = (p.value() - LLAMA_CPP_PPL).abs() / LLAMA_CPP_PPL;
    assert!(
        rel <= PPL_REL_TOL,
        "perplexity {} vs llama.cpp {LLAMA_CPP_PPL}",
        p.value()
    );
}
