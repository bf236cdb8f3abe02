//! Perplexity as llama.cpp's llama-perplexity computes it: the text is cut into chunks of
//! `n_ctx` tokens, each evaluated from an empty cache, and the second half of each chunk
//! is scored (every token predicted with at least `n_ctx / 2` tokens of context).

use crate::generation::sampler::log_sum_exp;
use crate::generation::{GenerateError, PREFILL_BATCH, Session};
use crate::ids::TokenId;

/// Running result after some chunks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    pub chunks: usize,
    pub scored: usize,
    /// Sum of negative log-likelihoods and of their squares (for the error estimate).
    pub nll: f64,
    pub nll2: f64,
}

impl Perplexity {
    pub fn value(&self) -> f64 {
        (self.nll / self.scored.max(1) as f64).exp()
    }

    /// Standard error, as llama-perplexity reports it.
    pub fn error(&self) -> f64 {
        let n = self.scored as f64;
        if n < 2.0 {
            return 0.0;
        }
        let mean = self.nll / n;
        let var = (self.nll2 / n - mean * mean).max(0.0) / (n - 1.0);
        self.value() * var.sqrt()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("the text has {tokens} tokens, fewer than 2 x the context of {n_ctx}")]
    TooShort { tokens: usize, n_ctx: usize },
    #[error("the context must be at least 4 tokens, not {0}")]
    ContextTooSmall(usize),
    #[error("{0}")]
    Generate(#[from] GenerateError),
}

/// Scores `tokens` in chunks of the session's context; `on_chunk` sees the running result.
/// A chunk's first token is replaced by BOS when the model adds one.
pub fn perplexity(
    session: &mut Session<'_>,
    tokens: &[TokenId],
    mut on_chunk: impl FnMut(&Perplexity),
) -> Result<Perplexity, PerplexityError> {
    let n_ctx = session.n_ctx();
    if n_ctx < 4 {
        return Err(PerplexityError::ContextTooSmall(n_ctx));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks < 1 || tokens.len() < 2 * n_ctx {
        return Err(PerplexityError::TooShort {
            tokens: tokens.len(),
            n_ctx,
        });
    }
    let first = n_ctx / 2;
    let n_vocab = session.model.config.n_vocab;
    let mut acc = Perplexity {
        chunks: 0,
        scored: 0,
        nll: 0.0,
        nll2: 0.0,
    };
    // A model that starts its texts with BOS sees one at the start of every chunk, in
    // place of the chunk's first token (as llama-perplexity does).
    let bos = session
        .tokenizer
        .adds_bos()
        .then(|| session.tokenizer.bos())
        .flatten();
    let mut chunk = Vec::with_capacity(n_ctx);
    for c in 0..n_chunks {
        chunk.clear();
        chunk.extend_from_slice(&tokens[c * n_ctx..(c + 1) * n_ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        for (b, part) in chunk.chunks(PREFILL_BATCH).enumerate() {
            let start = b * PREFILL_BATCH;
            // Rows `first..n_ctx-1` predict tokens `first+1..n_ctx`.
            let logits =
                session.eval(part, start, |i| (first..n_ctx - 1).contains(&(start + i)))?;
            let rows: Vec<usize> = (0..part.len())
                .filter(|&i| (first..n_ctx - 1).contains(&(start + i)))
                .collect();
            for (r, &i) in rows.iter().enumerate() {
                let row = &logits[r * n_vocab..(r + 1) * n_vocab];
                let target = chunk[start + i + 1].index();
                let nll = f64::from(log_sum_exp(row) - row[target]);
                acc.nll += nll;
                acc.nll2 += nll * nll;
                acc.scored += 1;
            }
        }
        acc.chunks += 1;
        on_chunk(&acc);
    }
    Ok(acc)
}
