//! Tokenizers: Hugging Face `tokenizer.json`, GGUF metadata, and the ChatML prompt format.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
pub use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Loads a Hugging Face `tokenizer.json`.
pub fn load_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    if !path.is_file() {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "missing".into(),
        });
    }
    Tokenizer::from_file(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("not a valid tokenizer.json: {e}"),
    })
}

/// Writes a tokenizer as `tokenizer.json`, atomically.
pub fn save_tokenizer_json(tokenizer: &Tokenizer, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let text = tokenizer
        .to_string(true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    super::io::write_atomic(path, text.as_bytes())
}

/// The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata, or `None` when it has
/// none.
///
/// Built by candle's [`TokenizerFromGguf`], with one fix: for `tokenizer.ggml.pre = "smollm"`
/// candle falls back to GPT-2's pre-tokenizer (ByteLevel with `add_prefix_space = true`, so
/// `"Hello"` becomes `"ĠHello"`). SmolLM2's own `tokenizer.json` splits digits individually,
/// then applies ByteLevel without a prefix space; that is installed here.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Option<Tokenizer>> {
    if !content.metadata.contains_key("tokenizer.ggml.model") {
        return Ok(None);
    }
    let mut tok = Tokenizer::from_gguf(content).map_err(|e| Error::Tokenizer(e.to_string()))?;
    if let Some(Value::String(pre)) = content.metadata.get("tokenizer.ggml.pre") {
        if pre == "smollm" {
            let seq = Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ]);
            tok.with_pre_tokenizer(Some(seq));
        }
    }
    Ok(Some(tok))
}

/// Token ids of `text` (special tokens written in the text, like `<|im_start|>`, are
/// recognised; no BOS/EOS is added).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// Text of `ids`, skipping special tokens when `skip_special` is set.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32], skip_special: bool) -> Result<String> {
    tokenizer
        .decode(ids, skip_special)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// A single-turn ChatML prompt that ends where the assistant's answer begins:
///
/// ```text
/// <|im_start|>system\n{system}<|im_end|>\n      (only with a system message)
/// <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n
/// ```
///
/// ```
/// assert_eq!(
///     pgrpo::lm::chatml(None, "Hi"),
///     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
/// );
/// ```
pub fn chatml(system: Option<&str>, user: &str) -> String {
    let mut s = String::new();
    if let Some(sys) = system {
        s.push_str("<|im_start|>system\n");
        s.push_str(sys);
        s.push_str("<|im_end|>\n");
    }
    s.push_str("<|im_start|>user\n");
    s.push_str(user);
    s.push_str("<|im_end|>\n<|im_start|>assistant\n");
    s
}
