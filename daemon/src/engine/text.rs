//! The tokenizer actor (async): prompts and chat messages to tokens, tokens to text.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::types::{EngineError, Input};
use crate::ids::TokenId;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Requests waiting for the tokenizer.
const INBOX: usize = 256;

pub(crate) enum TextMsg {
    /// A generation input to tokens (BOS as the model asks, special tokens parsed).
    Encode {
        input: Input,
        reply: oneshot::Sender<Result<Vec<TokenId>, EngineError>>,
    },
    Tokenize {
        text: String,
        add_special: bool,
        parse_special: bool,
        reply: oneshot::Sender<Vec<TokenId>>,
    },
    Detokenize {
        ids: Vec<TokenId>,
        render_special: bool,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
}

struct TextActor {
    tokenizer: Arc<Tokenizer>,
    rx: mpsc::Receiver<TextMsg>,
}

impl TextActor {
    async fn run(mut self) {
        while let Some(msg) = self.rx.recv().await {
            match msg {
                TextMsg::Encode { input, reply } => {
                    let _ = reply.send(self.encode(input));
                }
                TextMsg::Tokenize {
                    text,
                    add_special,
                    parse_special,
                    reply,
                } => {
                    let _ = reply.send(self.tokenizer.encode(&text, add_special, parse_special));
                }
                TextMsg::Detokenize {
                    ids,
                    render_special,
                    reply,
                } => {
                    let n = self.tokenizer.n_vocab();
                    let r = match ids.iter().find(|t| t.index() >= n) {
                        Some(t) => Err(EngineError::InvalidArgument(format!(
                            "token id {t} is out of range (vocabulary of {n})"
                        ))),
                        None => Ok(self.tokenizer.decode(&ids, render_special)),
                    };
                    let _ = reply.send(r);
                }
            }
        }
    }

    fn encode(&self, input: Input) -> Result<Vec<TokenId>, EngineError> {
        let tok = &self.tokenizer;
        match input {
            Input::Text(t) => Ok(tok.encode(&t, true, true)),
            Input::Tokens(ids) => Ok(ids),
            Input::Chat(messages) => {
                let text = tok.render_chat(&messages).map_err(|e| match e {
                    TokenizerError::NoChatTemplate => {
                        EngineError::InvalidArgument("the model has no chat template".into())
                    }
                    e => EngineError::InvalidArgument(e.to_string()),
                })?;
                Ok(tok.encode(&text, true, true))
            }
        }
    }
}

#[derive(Clone)]
pub(crate) struct TextHandle {
    tx: mpsc::Sender<TextMsg>,
}

impl TextHandle {
    /// Starts the actor on the current tokio runtime.
    pub fn spawn(tokenizer: Arc<Tokenizer>) -> Self {
        let (tx, rx) = mpsc::channel(INBOX);
        tokio::spawn(TextActor { tokenizer, rx }.run());
        Self { tx }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> TextMsg,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    pub async fn encode(&self, input: Input) -> Result<Vec<TokenId>, EngineError> {
        self.ask(|reply| TextMsg::Encode { input, reply }).await?
    }

    pub async fn tokenize(
        &self,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<TokenId>, EngineError> {
        self.ask(|reply| TextMsg::Tokenize {
            text,
            add_special,
            parse_special,
            reply,
        })
        .await
    }

    pub async fn detokenize(
        &self,
        ids: Vec<TokenId>,
        render_special: bool,
    ) -> Result<String, EngineError> {
        self.ask(|reply| TextMsg::Detokenize {
            ids,
            render_special,
            reply,
        })
        .await?
    }
}
