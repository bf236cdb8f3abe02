//! One sequence's generation, token by token: its sampler, its text stream and its limits
//! turn each step's logits into the token to stream and, at the end, the reason it
//! ended. The direct path (`Session::generate`) and every sequence of the engine's
//! scheduler run this same state machine, so they end alike and stream the same text.

pub mod sampler;
mod session;

pub use sampler::{Sampled, Sampler, SamplerConfig};
pub use session::{GenParams, GenerateError, PREFILL_BATCH, Session, SessionOptions, Summary};

pub use crate::model::{LoadedModel, weight_memory};

use crate::ids::TokenId;
use crate::tokenizer::{TextStream, Tokenizer};

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (not streamed).
    EndOfGeneration(TokenId),
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// A stop string (the text from it on is not streamed).
    StopSequence,
    /// The next token would not fit in the context.
    ContextFull,
    /// The caller stopped reading. Never on an engine stream: nobody reads it any more.
    Cancelled,
}

impl FinishReason {
    /// The name on the wire and in traces (OpenTelemetry's `gen_ai.response.finish_reasons`).
    pub fn name(self) -> &'static str {
        match self {
            Self::EndOfGeneration(_) => "stop",
            Self::MaxTokens => "length",
            Self::StopSequence => "stop_sequence",
            Self::ContextFull => "context",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One streamed token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: TokenId,
    /// The text this token completes (whole characters; may be empty).
    pub text: String,
    /// log-softmax of the raw logits at the chosen token.
    pub logprob: f32,
    /// The most likely tokens (as many as the sampler reports), with their text.
    pub top_logprobs: Vec<(TokenId, String, f32)>,
}

/// The limits one generation runs within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationLimits {
    pub max_tokens: usize,
    /// Positions the sequence may use, prompt included.
    pub n_ctx: usize,
}

/// What one step's logits did to a generation.
#[derive(Debug, PartialEq)]
pub struct Advance {
    /// The token to stream; `None` for an end-of-generation token.
    pub token: Option<TokenEvent>,
    /// Set when the generation ended with this step.
    pub finish: Option<FinishReason>,
}

/// One sequence's generation state.
pub struct Generation {
    sampler: Sampler,
    text: TextStream,
    prompt_tokens: usize,
    limits: GenerationLimits,
    generated: usize,
    /// The last streamed token: the next one fed to the model.
    last: Option<TokenId>,
    finish: Option<FinishReason>,
}

impl Generation {
    /// A generation after `prompt` (which feeds the sampler's penalty window), ending
    /// before any of `stop`. One that may generate nothing has ended already.
    pub fn new(
        sampling: SamplerConfig,
        stop: Vec<String>,
        prompt: &[TokenId],
        limits: GenerationLimits,
    ) -> Self {
        let mut sampler = Sampler::new(sampling);
        for &t in prompt {
            sampler.accept(t);
        }
        Self {
            sampler,
            text: TextStream::new(stop),
            prompt_tokens: prompt.len(),
            limits,
            generated: 0,
            last: None,
            finish: (limits.max_tokens == 0).then_some(FinishReason::MaxTokens),
        }
    }

    /// Why it ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Tokens streamed so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The token to feed next and its position: the last one streamed (none before the
    /// first token, which comes from the prompt's last logits).
    pub fn next_input(&self) -> Option<(TokenId, usize)> {
        let pos = self.prompt_tokens + self.generated.checked_sub(1)?;
        self.last.map(|t| (t, pos))
    }

    /// Picks the next token from `logits` (one per vocabulary entry) and decides whether
    /// the generation goes on: an end-of-generation token ends it unstreamed; a stop
    /// string, then `max_tokens`, then the context end it after the token.
    pub fn advance(&mut self, tok: &Tokenizer, logits: &[f32]) -> Advance {
        if let Some(finish) = self.finish {
            return Advance {
                token: None,
                finish: Some(finish),
            };
        }
        let sampled = self.sampler.sample(logits);
        if tok.is_eog(sampled.token) {
            self.finish = Some(FinishReason::EndOfGeneration(sampled.token));
            return Advance {
                token: None,
                finish: self.finish,
            };
        }
        self.sampler.accept(sampled.token);
        self.generated += 1;
        self.last = Some(sampled.token);
        let (text, hit) = self.text.push(tok, sampled.token);
        let top_logprobs = sampled
            .top
            .iter()
            .map(|&(t, lp)| {
                let text = String::from_utf8_lossy(tok.token_bytes(t, true)).into_owned();
                (t, text, lp)
            })
            .collect();
        // Where this token is fed next.
        let next_pos = self.prompt_tokens + self.generated - 1;
        self.finish = if hit {
            Some(FinishReason::StopSequence)
        } else if self.generated >= self.limits.max_tokens {
            Some(FinishReason::MaxTokens)
        } else if next_pos >= self.limits.n_ctx {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        Advance {
            token: Some(TokenEvent {
                id: sampled.token,
                text,
                logprob: sampled.logprob,
                top_logprobs,
            }),
            finish: self.finish,
        }
    }

    /// Ends it because the caller stopped reading (whatever ended it before: nothing
    /// more is delivered).
    pub fn cancel(&mut self) {
        self.finish = Some(FinishReason::Cancelled);
    }

    /// The text held back until the end, released when the generation ended for another
    /// reason than a stop string or a cancel (empty otherwise).
    pub fn take_tail(&mut self) -> String {
        match self.finish {
            Some(FinishReason::StopSequence | FinishReason::Cancelled) => String::new(),
            _ => self.text.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::byte_level_for_tests;

    /// Logits over the test vocabulary whose argmax is `t`.
    fn pick(t: u32) -> Vec<f32> {
        let mut l = vec![0.0; 260];
        l[t as usize] = 5.0;
        l
    }

    fn limits(max_tokens: usize, n_ctx: usize) -> GenerationLimits {
        GenerationLimits { max_tokens, n_ctx }
    }

    fn generation(stop: &[&str], prompt: usize, limits: GenerationLimits) -> Generation {
        let prompt: Vec<TokenId> = (0..prompt as u32).map(TokenId).collect();
        let stop = stop.iter().map(|s| (*s).to_owned()).collect();
        Generation::new(SamplerConfig::greedy(), stop, &prompt, limits)
    }

    #[test]
    fn tokens_stream_until_max_tokens_with_the_next_input_at_its_position() {
        let tok = byte_level_for_tests();
        let mut g = generation(&[], 4, limits(2, 64));
        assert_eq!(g.next_input(), None);
        let a = g.advance(&tok, &pick(u32::from(b'h')));
        let ev = a.token.unwrap();
        assert_eq!(
            (ev.id, ev.text.as_str(), a.finish),
            (TokenId(104), "h", None)
        );
        assert!(ev.logprob < 0.0 && ev.top_logprobs.is_empty());
        assert_eq!(g.next_input(), Some((TokenId(104), 4)));
        let a = g.advance(&tok, &pick(u32::from(b'i')));
        assert_eq!(a.finish, Some(FinishReason::MaxTokens));
        assert_eq!(g.next_input(), Some((TokenId(105), 5)));
        assert_eq!(g.generated(), 2);
    }

    #[test]
    fn an_end_of_generation_token_ends_it_unstreamed_and_releases_held_text() {
        let tok = byte_level_for_tests();
        let mut g = generation(&["ab"], 1, limits(10, 64));
        assert_eq!(
            g.advance(&tok, &pick(u32::from(b'a'))).token.unwrap().text,
            ""
        );
        let a = g.advance(&tok, &pick(258));
        assert_eq!(a.token, None);
        assert_eq!(a.finish, Some(FinishReason::EndOfGeneration(TokenId(258))));
        assert_eq!(g.generated(), 1);
        assert_eq!(
            g.take_tail(),
            "a",
            "\"a\" was held for the stop string \"ab\""
        );
    }

    #[test]
    fn a_cancelled_generation_releases_nothing_more() {
        let tok = byte_level_for_tests();
        let mut g = generation(&["ab"], 1, limits(1, 64));
        let a = g.advance(&tok, &pick(u32::from(b'a')));
        assert_eq!(a.finish, Some(FinishReason::MaxTokens));
        g.cancel();
        assert_eq!(g.finish(), Some(FinishReason::Cancelled));
        assert_eq!(g.take_tail(), "", "the held \"a\" has no reader");
    }

    #[test]
    fn a_stop_string_ends_it_before_the_length_limit_and_drops_the_held_text() {
        let tok = byte_level_for_tests();
        let mut g = generation(&["c"], 1, limits(2, 64));
        g.advance(&tok, &pick(u32::from(b'x')));
        let a = g.advance(&tok, &pick(u32::from(b'c')));
        assert_eq!(a.token.unwrap().text, "");
        assert_eq!(a.finish, Some(FinishReason::StopSequence));
        assert_eq!(g.take_tail(), "");
    }

    #[test]
    fn a_full_context_ends_it_when_the_next_token_has_no_position() {
        let tok = byte_level_for_tests();
        // Prompt at 0..6; the first token is fed at 6, the second at 7, the third at 8.
        let mut g = generation(&[], 6, limits(100, 8));
        assert_eq!(g.advance(&tok, &pick(1)).finish, None);
        assert_eq!(g.advance(&tok, &pick(2)).finish, None);
        assert_eq!(
            g.advance(&tok, &pick(3)).finish,
            Some(FinishReason::ContextFull)
        );
    }

    #[test]
    fn top_logprobs_carry_their_text_and_no_tokens_means_ended_at_once() {
        let tok = byte_level_for_tests();
        let sampling = SamplerConfig {
            n_logprobs: 2,
            ..SamplerConfig::greedy()
        };
        let mut g = Generation::new(sampling, Vec::new(), &[TokenId(1)], limits(5, 64));
        let mut l = pick(u32::from(b'z'));
        l[usize::from(b'y')] = 4.0;
        let ev = g.advance(&tok, &l).token.unwrap();
        let top: Vec<_> = ev
            .top_logprobs
            .iter()
            .map(|t| (t.0, t.1.as_str()))
            .collect();
        assert_eq!(top, [(TokenId(122), "z"), (TokenId(121), "y")]);

        let mut g = generation(&[], 3, limits(0, 64));
        assert_eq!(g.finish(), Some(FinishReason::MaxTokens));
        assert_eq!(g.advance(&tok, &pick(1)).token, None);
        assert_eq!(g.next_input(), None);
    }
}
