//! What the parity tests against llama.cpp's reference outputs share (SmolLM2's and
//! Gemma 3's): reading token ids, the top token of a row of logits, and the
//! teacher-forced comparison.

use powerinfer_daemon::generation::Session;
use powerinfer_daemon::ids::TokenId;
use powerinfer_tests::ids;

pub(crate) fn tokens(v: &serde_json::Value) -> Vec<TokenId> {
    ids(v).into_iter().map(TokenId).collect()
}

/// The index of a row's largest logit (the first of equals).
pub(crate) fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

/// Teacher forcing: every reference case's prompt and its reference continuation go
/// through the model in one pass (a session of `session(len)`), and at each step the
/// reference token must be within `gap_limit` of our top logit. Returns (steps where our
/// top-1 is the reference's, steps, the worst gap).
pub(crate) fn teacher_forced(
    reference: &serde_json::Value,
    session: impl Fn(usize) -> Session<'static>,
    gap_limit: f32,
    label: &str,
) -> (usize, usize, f32) {
    let (mut agree, mut total) = (0usize, 0usize);
    let mut worst_gap = 0.0f32;
    for c in reference["cases"].as_array().unwrap() {
        let prompt = tokens(&c["prompt_token_ids"]);
        let forced: Vec<TokenId> = c["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|st| TokenId(st["id"].as_u64().unwrap() as u32))
            .collect();
        let mut all = prompt.clone();
        all.extend(&forced[..forced.len() - 1]);
        let mut s = session(all.len() + 1);
        let n_vocab = s.model.config.n_vocab;
        let first = prompt.len() - 1;
        let logits = s.eval(&all, 0, |i| i >= first).unwrap();
        for (i, &want) in forced.iter().enumerate() {
            let row = &logits[i * n_vocab..(i + 1) * n_vocab];
            let best = argmax(row);
            let gap = row[best] - row[want.index()];
            worst_gap = worst_gap.max(gap);
            assert!(
                gap <= gap_limit,
                "{} step {i}: reference token {want} is {gap} below our top ({label})",
                c["id"]
            );
            agree += usize::from(best == want.index());
            total += 1;
        }
    }
    (agree, total, worst_gap)
}
