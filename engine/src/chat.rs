//! Chat templates: the model's own Jinja template rendered with `minijinja`, configured the
//! way Hugging Face's `apply_chat_template` configures Jinja (block trimming, Python string
//! methods, `raise_exception`, a `tojson` that writes like Python's `json.dumps`), so the
//! prompt text is the one the model was trained on.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

use crate::EngineError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported here, not at first use.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string()).map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, EngineError> {
        let tmpl = self.env.get_template("chat").map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        })
        .map_err(|e| EngineError::ChatTemplate(format!("{e:#}")))
    }
}

/// `json.dumps(value, ensure_ascii=False)` (with `indent` when given): Python's separators,
/// and no HTML escaping, unlike minijinja's built-in filter.
fn tojson(value: minijinja::Value, indent: Option<usize>) -> Result<minijinja::Value, Error> {
    let v = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&v, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (item_sep, key_sep) = if indent.is_some() { (",", ": ") } else { (", ", ": ") };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(key_sep);
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_hf_whitespace_rules_and_python_methods() {
        let src = "{% for m in messages %}\n  {{ m.role.upper() }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let out = t.render(&[ChatMessage::new("user", "  hi ")], true).unwrap();
        assert_eq!(out, "  USER: hi\nA:");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        assert!(t.render(&[], false).unwrap_err().to_string().contains("no system role"));
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }

    #[test]
    fn tojson_writes_like_python() {
        let t = ChatTemplate::new("{{ messages | tojson }}", None, None).unwrap();
        let out = t.render(&[ChatMessage::new("user", "<é>")], false).unwrap();
        assert_eq!(out, r#"[{"role": "user", "content": "<é>"}]"#);
    }
}
