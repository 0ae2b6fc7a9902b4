//! Chat templates: the Jinja template a model ships (`chat_template` in `tokenizer_config.json`,
//! `chat_template.jinja`, or `tokenizer.chat_template` in GGUF) rendered with minijinja, with the
//! variables transformers' `apply_chat_template` passes (`messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`) and its `raise_exception` helper. Python string methods that
//! templates call (`.strip()`, `.startswith()`…) come from minijinja-contrib's pycompat.

use anyhow::{Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Templates come from strangers' model files: a few bytes of Jinja can loop for hours or grow
/// gigabytes. Rendering one conversation gets this many instructions (real templates use a few
/// dozen per message)…
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// …and may produce at most this much text.
pub const TEMPLATE_MAX_OUTPUT: usize = 8 << 20;

/// A `Write` that refuses to grow past its cap.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > TEMPLATE_MAX_OUTPUT {
            return Err(std::io::Error::other("output cap"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        Self {
            source,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer begins. The result is tokenized without adding special tokens (as transformers does).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        render_sandboxed(&self.source, ctx, "the chat template")
    }
}

/// Renders a Jinja template from a file someone else wrote (a chat template, a judge's rubric)
/// under the fuel and output caps above; `what` names it in errors.
pub fn render_sandboxed(source: &str, ctx: minijinja::Value, what: &str) -> Result<String> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("t", source)
        .with_context(|| format!("{what} does not parse"))?;
    let t = env.get_template("t")?;
    let mut out = Capped(Vec::new());
    match t.render_captured_to(ctx, &mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::OutOfFuel => anyhow::bail!(
            "rendering {what}: it ran past {TEMPLATE_FUEL} instructions (a loop that never ends, or far too long); refusing it"
        ),
        Err(e) if e.kind() == ErrorKind::WriteFailure => anyhow::bail!(
            "rendering {what}: its output grew past {} MiB; refusing it",
            TEMPLATE_MAX_OUTPUT >> 20
        ),
        Err(e) => return Err(e).with_context(|| format!("rendering {what}")),
    }
    String::from_utf8(out.0).with_context(|| format!("{what} produced invalid UTF-8"))
}

/// The template of an HF model directory, if it has one: `chat_template.jinja` (newer
/// transformers) or the `chat_template` string of `tokenizer_config.json`.
pub fn template_from_dir(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return crate::input::read_text(&jinja, crate::input::MAX_CONFIG_BYTES).map(Some);
    }
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.exists() {
        return Ok(None);
    }
    let text = crate::input::read_text(&cfg, crate::input::MAX_CONFIG_BYTES)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg.display()))?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        // A list of named templates: use the one named "default".
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_with_generation_prompt_and_python_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
            None,
            Some("<|im_end|>".into()),
        );
        let s = t.render(&[Message::new("user", "  hi  ")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let bad = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            None,
            None,
        );
        let e = format!("{:#}", bad.render(&[], false).unwrap_err());
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn hostile_templates_are_bounded() {
        let huge = r#"{% set a = "x" * 10000 %}{% for i in range(99999) %}{{ a }}{% endfor %}"#;
        let e = format!(
            "{:#}",
            ChatTemplate::new(huge.into(), None, None)
                .render(&[], false)
                .unwrap_err()
        );
        assert!(e.contains("MiB"), "{e}");
        let slow = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}";
        let e = format!(
            "{:#}",
            ChatTemplate::new(slow.into(), None, None)
                .render(&[], false)
                .unwrap_err()
        );
        assert!(e.contains("instructions"), "{e}");
        let deep = "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}";
        assert!(ChatTemplate::new(deep.into(), None, None)
            .render(&[], false)
            .is_err());
    }
}
