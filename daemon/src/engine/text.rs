//! The tokenizer actor: prompts and chat messages to tokens, tokens to text. Encoding a
//! long prompt is compute (milliseconds for thousands of tokens), so it runs on its own
//! thread, `pi-text`, never on a tokio worker; async callers await the reply on a oneshot.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use tokio::sync::oneshot;

use super::types::{EngineError, Input};
use crate::ids::TokenId;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Requests waiting for the tokenizer: one per request being admitted or a Tokenize /
/// Detokenize call in flight, each a few milliseconds of work at most; a backlog this
/// deep means the daemon is overloaded, and more are refused as a full queue.
const INBOX: usize = 256;

enum TextMsg {
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
    rx: Receiver<TextMsg>,
}

impl TextActor {
    fn run(self) {
        while let Ok(msg) = self.rx.recv() {
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
                    let _ = reply.send(self.detokenize(&ids, render_special));
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

    fn detokenize(&self, ids: &[TokenId], render_special: bool) -> Result<String, EngineError> {
        let n = self.tokenizer.n_vocab();
        match ids.iter().find(|t| t.index() >= n) {
            Some(t) => Err(EngineError::InvalidArgument(format!(
                "token id {t} is out of range (vocabulary of {n})"
            ))),
            None => Ok(self.tokenizer.decode(ids, render_special)),
        }
    }
}

/// Sends work to the tokenizer thread; the thread ends when the last handle drops.
#[derive(Clone)]
pub(crate) struct TextHandle {
    tx: Sender<TextMsg>,
}

impl TextHandle {
    /// Starts the actor on thread `pi-text`; returns once the thread runs.
    pub fn spawn(tokenizer: Arc<Tokenizer>) -> Result<Self, EngineError> {
        let (tx, rx) = bounded(INBOX);
        let (ready_tx, ready_rx) = bounded::<()>(1);
        std::thread::Builder::new()
            .name("pi-text".into())
            .spawn(move || {
                let _ = ready_tx.send(());
                TextActor { tokenizer, rx }.run();
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the tokenizer: {e}")))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)?;
        Ok(Self { tx })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> TextMsg,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            TrySendError::Full(_) => EngineError::QueueFull { max: INBOX },
            TrySendError::Disconnected(_) => EngineError::Stopped,
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{ChatMessage, byte_level_for_tests};

    /// The actor needs no tokio runtime of its own: a bare executor drives the replies.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    #[test]
    fn encodes_on_its_own_thread_and_stops_with_its_last_handle() {
        let tok = Arc::new(byte_level_for_tests());
        let text = TextHandle::spawn(tok.clone()).unwrap();
        let ids = block_on(text.encode(Input::Text("hi".into()))).unwrap();
        assert_eq!(ids, [TokenId(104), TokenId(105)]);
        let chat = Input::Chat(vec![ChatMessage::new("user", "x")]);
        let ids = block_on(text.encode(chat)).unwrap();
        assert_eq!(
            ids[0],
            TokenId(257),
            "the template's BOS, parsed as a special token"
        );
        let bad = block_on(text.detokenize(vec![TokenId(999)], false));
        assert!(bad.unwrap_err().to_string().contains("999"));
        assert_eq!(
            block_on(text.detokenize(ids.clone(), true)).unwrap(),
            tok.render_chat(&[ChatMessage::new("user", "x")]).unwrap()
        );

        // The thread holds the tokenizer until the last handle is gone.
        let copy = text.clone();
        drop(text);
        assert!(block_on(copy.tokenize("a".into(), false, false)).is_ok());
        drop(copy);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&tok) > 1 {
            assert!(std::time::Instant::now() < deadline, "pi-text did not stop");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
