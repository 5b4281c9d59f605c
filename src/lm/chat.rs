//! [`TokenizerConfig`]: what a model's `tokenizer.json` does not say — its special tokens and
//! its chat template — read from GGUF metadata or Hugging Face's `tokenizer_config.json`,
//! written back as `tokenizer_config.json` and `generation_config.json` so that the saved
//! directory works in `transformers` / TRL, and used to build prompts the way
//! `tokenizer.apply_chat_template` does.
//!
//! Chat templates are Jinja templates. They are rendered with [`minijinja`] configured as
//! `transformers` configures Jinja2 (`transformers/utils/chat_template_utils.py`):
//! `trim_blocks` and `lstrip_blocks` on, loop controls, a `raise_exception` function, a
//! `tojson` filter formatting like Python's `json.dumps`, `strftime_now`, Python string and
//! dict methods (`.strip()`, `.startswith()`, `.items()`, ... from `minijinja-contrib`),
//! and the special tokens (`bos_token`, `eos_token`, ...) as variables. The rendered text is
//! then tokenized without adding special tokens, as `apply_chat_template(tokenize=True)`
//! does. Templates that use `transformers`' `{% generation %}` extension are not supported
//! (an [`Error::ChatTemplate`]).

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::config::LlamaConfig;
use super::io::write_atomic;
use super::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Name of the tokenizer settings file of a Hugging Face directory.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Name of the separate chat template file (`transformers` ≥ 4.43 writes it; it takes
/// priority over `tokenizer_config.json`'s `chat_template`).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// Name of the generation defaults file of a Hugging Face directory.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// ChatML as a Jinja template: the prompt format of [`chatml`](super::chatml), used when a
/// model has no template of its own (no default system message).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One message of a conversation (`{"role": ..., "content": ...}` in `transformers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `"system"` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `"user"` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `"assistant"` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Special tokens, chat template and length limit of a tokenizer: the parts of Hugging Face's
/// `tokenizer_config.json` this crate reads and writes.
///
/// ```
/// use pgrpo::lm::{ChatMessage, TokenizerConfig};
/// // No template: ChatML.
/// let plain = TokenizerConfig::default();
/// assert_eq!(
///     plain.apply_chat_template(&[ChatMessage::user("Hi")], true)?,
///     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
/// );
/// // A template that adds a default system message.
/// let smol = TokenizerConfig {
///     chat_template: Some("{% for m in messages %}{% if loop.first and m.role != 'system' %}<s>sys</s>\n{% endif %}<s>{{ m.role }}: {{ m.content | trim }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}".into()),
///     ..Default::default()
/// };
/// assert_eq!(
///     smol.apply_chat_template(&[ChatMessage::user(" Hi ")], true)?,
///     "<s>sys</s>\n<s>user: Hi</s>\n<s>assistant: "
/// );
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenizerConfig {
    /// Beginning-of-sequence token (text), if any.
    pub bos_token: Option<String>,
    /// End-of-sequence token (text), if any.
    pub eos_token: Option<String>,
    /// Padding token (text), if any.
    pub pad_token: Option<String>,
    /// Unknown-token token (text), if any.
    pub unk_token: Option<String>,
    /// The Jinja chat template; `None` means ChatML ([`CHATML_TEMPLATE`]).
    pub chat_template: Option<String>,
    /// Longest input the model was trained for, if known.
    pub model_max_length: Option<usize>,
    /// Whether the tokenizer adds the BOS token when asked to add special tokens.
    pub add_bos_token: bool,
    /// Whether the tokenizer adds the EOS token when asked to add special tokens.
    pub add_eos_token: bool,
}

impl TokenizerConfig {
    /// The settings a model config implies: BOS / EOS / pad from its token ids (as text,
    /// through `tokenizer`), its context length, no template (ChatML).
    pub fn from_model(config: &LlamaConfig, tokenizer: Option<&Tokenizer>) -> Self {
        let text = |id: Option<u32>| id.and_then(|id| tokenizer.and_then(|t| t.id_to_token(id)));
        Self {
            bos_token: text(config.bos_token_id),
            eos_token: text(config.eos_token_ids().first().copied()),
            pad_token: text(config.pad_token_id),
            unk_token: None,
            chat_template: None,
            model_max_length: Some(config.max_position_embeddings),
            add_bos_token: false,
            add_eos_token: false,
        }
    }

    /// The settings stored in a GGUF file's metadata: `tokenizer.chat_template`,
    /// `tokenizer.ggml.{bos,eos,padding,unknown}_token_id` (as text through `tokenizer`),
    /// `tokenizer.ggml.add_{bos,eos}_token`, and `{arch}.context_length`.
    pub fn from_gguf(content: &Content, tokenizer: &Tokenizer) -> Self {
        let meta = |k: &str| content.metadata.get(k);
        let id = |k: &str| -> Option<String> {
            let v = meta(k)?;
            let id = match v {
                GgufValue::U8(x) => *x as u32,
                GgufValue::U16(x) => *x as u32,
                GgufValue::U32(x) => *x,
                GgufValue::U64(x) => u32::try_from(*x).ok()?,
                GgufValue::I32(x) => u32::try_from(*x).ok()?,
                GgufValue::I64(x) => u32::try_from(*x).ok()?,
                _ => return None,
            };
            tokenizer.id_to_token(id)
        };
        let flag = |k: &str| matches!(meta(k), Some(GgufValue::Bool(true)));
        let arch = match meta("general.architecture") {
            Some(GgufValue::String(a)) => a.clone(),
            _ => String::new(),
        };
        let ctx = match meta(&format!("{arch}.context_length")) {
            Some(GgufValue::U32(x)) => Some(*x as usize),
            Some(GgufValue::U64(x)) => Some(*x as usize),
            _ => None,
        };
        Self {
            bos_token: id("tokenizer.ggml.bos_token_id"),
            eos_token: id("tokenizer.ggml.eos_token_id"),
            pad_token: id("tokenizer.ggml.padding_token_id"),
            unk_token: id("tokenizer.ggml.unknown_token_id"),
            chat_template: match meta("tokenizer.chat_template") {
                Some(GgufValue::String(t)) => Some(t.clone()),
                _ => None,
            },
            model_max_length: ctx,
            add_bos_token: flag("tokenizer.ggml.add_bos_token"),
            add_eos_token: flag("tokenizer.ggml.add_eos_token"),
        }
    }

    /// Reads `dir/tokenizer_config.json` (and `dir/chat_template.jinja`, which takes
    /// priority for the template, as in `transformers`); `None` when neither exists.
    ///
    /// Special tokens may be strings or `{"content": ...}` objects; a template may be a
    /// string or a list of `{"name", "template"}` (the one named `"default"` is used).
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        if !path.is_file() && !jinja.is_file() {
            return Ok(None);
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| Error::File {
                path: p.to_path_buf(),
                reason: format!("cannot read: {e}"),
            })
        };
        let json: Value = if path.is_file() {
            serde_json::from_str(&read(&path)?).map_err(|e| Error::File {
                path: path.clone(),
                reason: format!("not valid JSON: {e}"),
            })?
        } else {
            json!({})
        };
        let token = |k: &str| match json.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let template = if jinja.is_file() {
            Some(read(&jinja)?)
        } else {
            match json.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(String::from),
                _ => None,
            }
        };
        Ok(Some(Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
            chat_template: template,
            // transformers writes a huge sentinel (int(1e30)) for "no limit".
            model_max_length: json
                .get("model_max_length")
                .and_then(Value::as_u64)
                .and_then(|v| usize::try_from(v).ok()),
            add_bos_token: json.get("add_bos_token").and_then(Value::as_bool) == Some(true),
            add_eos_token: json.get("add_eos_token").and_then(Value::as_bool) == Some(true),
        }))
    }

    /// The chat template in use: the model's, or ChatML.
    pub fn template(&self) -> &str {
        self.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE)
    }

    /// The `tokenizer_config.json` object: special tokens, `chat_template` (ChatML when the
    /// model has none, so `transformers` builds the prompts this crate builds),
    /// `model_max_length`, `add_bos_token` / `add_eos_token`, `clean_up_tokenization_spaces:
    /// false` and `tokenizer_class: "PreTrainedTokenizerFast"` (the class that reads
    /// `tokenizer.json`).
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        m.insert("add_bos_token".into(), json!(self.add_bos_token));
        m.insert("add_eos_token".into(), json!(self.add_eos_token));
        m.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.model_max_length {
            m.insert("model_max_length".into(), json!(n));
        }
        m.insert("chat_template".into(), json!(self.template()));
        Value::Object(m)
    }

    /// Writes `dir/tokenizer_config.json` ([`to_json`](Self::to_json)) atomically.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())?;
        write_atomic(&dir.as_ref().join(TOKENIZER_CONFIG_FILE), text.as_bytes())
    }

    /// The prompt text for `messages`, rendered with the model's template (or ChatML) as
    /// `transformers`' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` renders it.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] when the template does not parse, uses something this
    /// renderer lacks, or calls `raise_exception` (e.g. for roles it does not accept).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        render(self.template(), messages, add_generation_prompt, self)
    }
}

/// `generation_config.json` for `config`: `bos_token_id`, `eos_token_id` (one id or a list)
/// and `pad_token_id` where known. (GGUF files carry no sampling defaults, so none are
/// written.)
pub fn generation_config_json(config: &LlamaConfig) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(b) = config.bos_token_id {
        m.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = &config.eos_token_id {
        m.insert(
            "eos_token_id".into(),
            serde_json::to_value(e).unwrap_or(Value::Null),
        );
    }
    if let Some(p) = config.pad_token_id {
        m.insert("pad_token_id".into(), json!(p));
    }
    Value::Object(m)
}

/// Writes `dir/generation_config.json` ([`generation_config_json`]) atomically.
pub fn write_generation_config(config: &LlamaConfig, dir: impl AsRef<Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(&generation_config_json(config))?;
    write_atomic(&dir.as_ref().join(GENERATION_CONFIG_FILE), text.as_bytes())
}

fn template_error(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::ChatTemplate(msg)
}

fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    tokens: &TokenizerConfig,
) -> Result<String> {
    use minijinja::value::Value as J;
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(template_error)?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<J, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("the template raised: {msg}"),
            ))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_filter("tojson", tojson);
    let tmpl = env.template_from_str(template).map_err(template_error)?;
    let msgs: Vec<J> = messages
        .iter()
        .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() })
        .collect();
    let mut special = std::collections::BTreeMap::new();
    for (k, v) in [
        ("bos_token", &tokens.bos_token),
        ("eos_token", &tokens.eos_token),
        ("pad_token", &tokens.pad_token),
        ("unk_token", &tokens.unk_token),
    ] {
        if let Some(v) = v {
            special.insert(k, J::from(v.as_str()));
        }
    }
    let ctx = minijinja::context! {
        messages => msgs,
        add_generation_prompt => add_generation_prompt,
        tools => (),
        documents => (),
        ..J::from(special)
    };
    tmpl.render(ctx).map_err(template_error)
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=indent)` (the `tojson` filter
/// `transformers` installs: `", "` and `": "` separators, keys in insertion order, no HTML
/// escaping).
fn tojson(
    value: minijinja::value::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_dumps(&value, indent, 0, &mut out)?;
    Ok(out)
}

fn py_dumps(
    v: &minijinja::value::Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let (open_sep, item_sep, close_sep) = match indent {
        Some(n) => (
            format!("\n{}", " ".repeat(n * (depth + 1))),
            format!(",\n{}", " ".repeat(n * (depth + 1))),
            format!("\n{}", " ".repeat(n * depth)),
        ),
        None => (String::new(), ", ".to_string(), String::new()),
    };
    let quote = |s: &str| Value::String(s.to_string()).to_string();
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => out.push_str(&quote(v.as_str().unwrap_or(""))),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<_> = v.try_iter()?.collect();
            out.push('[');
            if !items.is_empty() {
                out.push_str(&open_sep);
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&item_sep);
                    }
                    py_dumps(x, indent, depth + 1, out)?;
                }
                out.push_str(&close_sep);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<_> = v.try_iter()?.collect();
            out.push('{');
            if !keys.is_empty() {
                out.push_str(&open_sep);
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&item_sep);
                    }
                    out.push_str(&quote(&k.to_string()));
                    out.push_str(": ");
                    py_dumps(&v.get_item(k)?, indent, depth + 1, out)?;
                }
                out.push_str(&close_sep);
            }
            out.push('}');
        }
        _ => out.push_str(&quote(&v.to_string())),
    }
    Ok(())
}

/// `datetime.now().strftime(fmt)` in UTC for the directives chat templates use (`%d %m %Y
/// %y %b %B %a %A %H %M %S %j %%`).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let yday = before + day + i64::from(leap && month > 2);
    let mname = MONTHS[(month - 1) as usize];
    let wname = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&mname[..3]),
            Some('B') => out.push_str(mname),
            Some('a') => out.push_str(&wname[..3]),
            Some('A') => out.push_str(wname),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_matches_the_chatml_function() {
        let cfg = TokenizerConfig::default();
        for (sys, user) in [(None, "Hi"), (Some("Be brief."), "Name a colour.")] {
            let mut msgs = Vec::new();
            if let Some(s) = sys {
                msgs.push(ChatMessage::system(s));
            }
            msgs.push(ChatMessage::user(user));
            assert_eq!(
                cfg.apply_chat_template(&msgs, true).unwrap(),
                super::super::tokenizer::chatml(sys, user)
            );
        }
    }

    #[test]
    fn python_style_json_and_raise_exception() {
        let cfg = TokenizerConfig {
            chat_template: Some(
                "{{ {'a': [1, 'x<'], 'b': none} | tojson }}|{{ messages[0] | tojson(indent=2) }}"
                    .into(),
            ),
            ..Default::default()
        };
        let out = cfg
            .apply_chat_template(&[ChatMessage::user("é")], false)
            .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, \"x<\"], \"b\": null}|{\n  \"role\": \"user\",\n  \"content\": \"é\"\n}"
        );
        let raising = TokenizerConfig {
            chat_template: Some(
                "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
                    .into(),
            ),
            ..Default::default()
        };
        let err = raising
            .apply_chat_template(&[ChatMessage::assistant("x")], false)
            .unwrap_err();
        assert!(
            matches!(&err, Error::ChatTemplate(m) if m.contains("user first")),
            "{err}"
        );
        let bad = TokenizerConfig {
            chat_template: Some("{% for %}".into()),
            ..Default::default()
        };
        assert!(matches!(
            bad.apply_chat_template(&[], false),
            Err(Error::ChatTemplate(_))
        ));
    }

    #[test]
    fn strftime_now_formats_a_date() {
        let s = strftime_now("%d %b %Y|%%|%H:%M");
        let (date, rest) = s.split_once('|').unwrap();
        assert_eq!(date.len(), 11, "{s}");
        assert!(rest.starts_with("%|"));
    }
}
