//! Chat templates: the model's own Jinja `tokenizer.chat_template`, rendered as Hugging
//! Face's `apply_chat_template` does (trim_blocks, lstrip_blocks, Python string methods).

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value, context};

use super::{Tokenizer, TokenizerError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

impl Tokenizer {
    /// `messages` rendered with the model's chat template, the assistant's turn opened:
    /// the text a chat request generates from (`powerinferd run --chat` and the engine's
    /// chat input both come here).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let template = self.chat_template().ok_or(TokenizerError::NoChatTemplate)?;
        self.render_chat_with(template, messages)
    }

    /// `messages` rendered with `template` (a model's template from elsewhere than its
    /// file), with this vocabulary's BOS and EOS, the assistant's turn opened.
    pub fn render_chat_with(
        &self,
        template: &str,
        messages: &[ChatMessage],
    ) -> Result<String, TokenizerError> {
        let special =
            |t: Option<crate::ids::TokenId>| t.and_then(|t| self.token_text(t)).unwrap_or("");
        render_template(
            template,
            messages,
            true,
            special(self.bos()),
            special(self.eos()),
        )
    }
}

/// Renders `messages` with `template`; `add_generation_prompt` opens the assistant turn.
fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    tmpl.render(context! {
        messages => Value::from(
            messages
                .iter()
                .map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                .collect::<Vec<_>>()
        ),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| TokenizerError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::byte_level_for_tests;

    #[test]
    fn the_model_s_template_renders_with_its_special_tokens_and_opens_the_answer() {
        let tok = byte_level_for_tests();
        let text = tok
            .render_chat(&[
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "hi"),
            ])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system: be brief<|im_end|>\nuser: hi<|im_end|>\nassistant:"
        );
    }
}
