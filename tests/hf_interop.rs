//! Directories written by `LmPolicy::save_hf_dir` work in the Python stack: `transformers`
//! loads the tokenizer with its special tokens and chat template, and
//! `apply_chat_template(..., tokenize=True, add_generation_prompt=True)` gives the prompt ids
//! pgrpo builds. The Python checks run with the interpreter named by `PGRPO_PYTHON` (default
//! `python3`) when it can import `transformers`; otherwise they print a `SKIPPED` line and
//! pass. The SmolLM2 check also needs `models/SmolLM2-135M-Instruct.Q4_1.gguf`
//! (`scripts/fetch-smollm2.sh`, or `PGRPO_SMOLLM2_GGUF`); without it, it prints why and
//! passes. Nothing is downloaded.
//!
//! With `PGRPO_HF_MODEL_CHECK=1` (and torch installed) the SmolLM2 check also loads the
//! saved LoRA-merged directory with `AutoModelForCausalLM` and compares its greedy answer
//! with pgrpo's.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::{DType, Device};
use pgrpo::lm::{tokenizer, ChatMessage, Llama, LlamaConfig, LmPolicy, TokenIds, TokenizerConfig};
use pgrpo::lm::{LoraConfig, LoraTarget, SamplingConfig};
use pgrpo::Policy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// SmolLM2-135M-Instruct's chat template, as stored in its GGUF (`tokenizer.chat_template`)
/// and its `tokenizer_config.json`: a default system message when the first message is not
/// a system message.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Prints a line that shows in `cargo test`'s output even when the test passes (the
/// harness captures `eprintln!`, not writes to the stderr handle).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgrpo-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A GGUF header (no tensors) with a byte-level BPE tokenizer over ASCII, SmolLM2's special
/// tokens and pre-tokenizer, its chat template and special-token ids.
fn gguf_content() -> Content {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend((33u8..=126).map(|b| (b as char).to_string()));
    tokens.extend(["Ġ", "Ċ", "He", "ll", "Hell", "Hello"].map(String::from));
    let merges = ["H e", "l l", "He ll", "Hell o"].map(String::from);
    let strings = |v: &[String]| Value::Array(v.iter().map(|t| Value::String(t.clone())).collect());
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.context_length".into(), Value::U32(8192)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..tokens.len())
                    .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(SMOLLM2_TEMPLATE.into()),
        ),
    ];
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).unwrap();
    buf.set_position(0);
    Content::read(&mut buf).unwrap()
}

/// A tiny model with the GGUF's tokenizer and tokenizer settings.
fn tiny_policy() -> LmPolicy {
    let content = gguf_content();
    let tok = tokenizer::tokenizer_from_gguf(&content).unwrap().unwrap();
    let tok_config = TokenizerConfig::from_gguf(&content, &tok);
    let config = LlamaConfig {
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        vocab_size: tok.get_vocab_size(true),
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        pad_token_id: Some(2),
        ..Default::default()
    };
    let model = Llama::new(
        config,
        &mut StdRng::seed_from_u64(0),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    LmPolicy::new(model, Some(tok)).with_tokenizer_config(tok_config)
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![ChatMessage::user("Hello, who are you?")],
        vec![
            ChatMessage::system("Answer in 3 words."),
            ChatMessage::user("Hello 2025!"),
        ],
        vec![
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Hello!"),
            ChatMessage::user("Say it again."),
        ],
    ]
}

/// The GGUF's settings reach the saved `tokenizer_config.json` / `generation_config.json`,
/// come back unchanged through `from_hf_dir`, and prompts follow the model's own template
/// (SmolLM2's default system message included), not plain ChatML.
#[test]
fn tokenizer_settings_round_trip_and_prompts_use_the_models_template() {
    let policy = tiny_policy();
    let cfg = policy.tokenizer_config();
    assert_eq!(cfg.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(cfg.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(cfg.pad_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(cfg.unk_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(cfg.model_max_length, Some(8192));
    assert_eq!(cfg.chat_template.as_deref(), Some(SMOLLM2_TEMPLATE));
    let text = cfg
        .apply_chat_template(&[ChatMessage::user("Hi")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        policy.chat_prompt("Hi").unwrap(),
        policy.encode(&text).unwrap()
    );
    let dir = temp_dir("roundtrip");
    policy.save_hf_dir(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        gen,
        serde_json::json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    );
    let back = LmPolicy::from_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.tokenizer_config(), policy.tokenizer_config());
    for conv in conversations() {
        assert_eq!(
            back.chat_prompt_messages(&conv).unwrap(),
            policy.chat_prompt_messages(&conv).unwrap()
        );
    }
    // Without a template, ChatML is used and written out.
    let plain = LmPolicy::new(policy.model().clone(), policy.tokenizer().cloned());
    assert_eq!(
        plain.chat_prompt("Hi").unwrap(),
        plain.encode(&pgrpo::lm::chatml(None, "Hi")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Python interpreter to use, or `None` (with the reason printed) when it cannot import
/// `transformers`.
fn python_with_transformers() -> Option<String> {
    let py = std::env::var("PGRPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&py)
        .args(["-c", "import transformers; print(transformers.__version__)"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
            say(&format!("hf_interop: using {py} with transformers {v}"));
            Some(py)
        }
        Ok(o) => {
            say(&format!(
                "SKIPPED: `{py}` cannot import transformers ({}); set PGRPO_PYTHON to a python with transformers to run this check",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            ));
            None
        }
        Err(e) => {
            say(&format!("SKIPPED: cannot run `{py}` ({e}); set PGRPO_PYTHON to a python with transformers to run this check"));
            None
        }
    }
}

/// Runs `script` with `args`, returns its stdout parsed as JSON.
fn run_python(py: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Loads the tokenizer of `argv[1]` and prints, as JSON, its special tokens and the
/// `apply_chat_template(tokenize=True, add_generation_prompt=True)` ids of the conversations
/// in `argv[2]`, plus the plain `encode` (no special tokens) of the strings in `argv[3]`.
const TOKENIZER_SCRIPT: &str = r#"
import json, sys
from transformers import AutoTokenizer, GenerationConfig
tok = AutoTokenizer.from_pretrained(sys.argv[1])
convs = json.loads(sys.argv[2])
texts = json.loads(sys.argv[3])
def ids(x):
    # transformers 5 returns a BatchEncoding here, 4.x a list.
    return list(x["input_ids"]) if hasattr(x, "keys") else list(x)
gen = GenerationConfig.from_pretrained(sys.argv[1])
print(json.dumps({
    "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token, "unk": tok.unk_token,
    "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
    "gen": [gen.bos_token_id, gen.eos_token_id, gen.pad_token_id],
    "chat": [ids(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True)) for c in convs],
    "encode": [tok.encode(t, add_special_tokens=False) for t in texts],
}))
"#;

fn check_with_transformers(py: &str, policy: &LmPolicy, dir: &Path, texts: &[&str]) {
    let convs = conversations();
    let got = run_python(
        py,
        TOKENIZER_SCRIPT,
        &[
            dir.to_str().unwrap(),
            &serde_json::to_string(&convs).unwrap(),
            &serde_json::to_string(texts).unwrap(),
        ],
    );
    let cfg = policy.tokenizer_config();
    assert_eq!(got["bos"], serde_json::json!(cfg.bos_token));
    assert_eq!(got["eos"], serde_json::json!(cfg.eos_token));
    assert_eq!(got["pad"], serde_json::json!(cfg.pad_token));
    assert_eq!(got["unk"], serde_json::json!(cfg.unk_token));
    let c = policy.model().config();
    assert_eq!(got["eos_id"], serde_json::json!(c.eos_token_ids()[0]));
    assert_eq!(got["pad_id"], serde_json::json!(c.pad_token_id));
    assert_eq!(
        got["gen"],
        serde_json::json!([c.bos_token_id, c.eos_token_ids()[0], c.pad_token_id])
    );
    for (i, conv) in convs.iter().enumerate() {
        let ours = policy.chat_prompt_messages(conv).unwrap();
        assert_eq!(got["chat"][i], serde_json::json!(ours), "conversation {i}");
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(
            got["encode"][i],
            serde_json::json!(policy.encode(t).unwrap()),
            "{t:?}"
        );
    }
}

/// A tiny saved directory loads in `transformers` with its special tokens, generation
/// config and chat template, and `apply_chat_template(tokenize=True,
/// add_generation_prompt=True)` gives pgrpo's prompt ids for three conversations.
#[test]
fn transformers_builds_the_same_prompts_tiny() {
    let Some(py) = python_with_transformers() else {
        return;
    };
    let policy = tiny_policy();
    let dir = temp_dir("tiny-py");
    policy.save_hf_dir(&dir).unwrap();
    check_with_transformers(&py, &policy, &dir, &["Hello 12", "Hello, who are you?"]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn smollm2_path() -> Option<PathBuf> {
    let path: PathBuf = std::env::var("PGRPO_SMOLLM2_GGUF")
        .unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
            .into()
        })
        .into();
    if path.is_file() {
        Some(path)
    } else {
        say(&format!(
            "SKIPPED: {} not found (run scripts/fetch-smollm2.sh, or set PGRPO_SMOLLM2_GGUF)",
            path.display()
        ));
        None
    }
}

/// Greedy answer of the directory `argv[1]` to the chat prompt ids in `argv[2]`
/// (`AutoModelForCausalLM`, float32, `max_new_tokens = argv[3]`).
const MODEL_SCRIPT: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor([json.loads(sys.argv[2])])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]), do_sample=False)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"#;

/// Per-token log-probs of the completion `argv[4]` after the prompt `argv[3]` under the base
/// directory `argv[1]` with the PEFT adapter directory `argv[2]` (`PeftModel`), as JSON.
const PEFT_SCRIPT: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
p, c = json.loads(sys.argv[3]), json.loads(sys.argv[4])
ids = torch.tensor([p + c])
with torch.no_grad():
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
print(json.dumps([logp[len(p) - 1 + t, c[t]].item() for t in range(len(c))]))
"#;

/// SmolLM2-135M-Instruct from its GGUF, with trained-looking LoRA adapters merged and saved:
/// `transformers` builds pgrpo's prompt ids (its default system message included) and
/// tokenizes text alike. With `PGRPO_HF_MODEL_CHECK=1` it also loads the weights with
/// `AutoModelForCausalLM` and answers greedily with pgrpo's tokens, and — when `peft`
/// imports — `PeftModel.from_pretrained(base, adapter_dir)` on the adapter saved by
/// `save_adapter` gives pgrpo's log-probs.
#[test]
fn transformers_builds_the_same_prompts_smollm2() {
    let Some(path) = smollm2_path() else {
        return;
    };
    let Some(py) = python_with_transformers() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(1);
    let policy = LmPolicy::from_gguf(&path, &Device::Cpu)
        .unwrap()
        .with_sampling(SamplingConfig {
            max_new_tokens: 12,
            temperature: 0.0,
            ..Default::default()
        })
        .unwrap()
        .with_lora(
            LoraConfig {
                target_modules: LoraTarget::ALL.to_vec(),
                ..Default::default()
            },
            &mut rng,
        )
        .unwrap();
    // Small random B so that the merged weights differ from the base.
    for v in policy.vars() {
        let dims = v.dims().to_vec();
        if dims[1] == 8 {
            let n = dims[0] * dims[1];
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1e-3..1e-3)).collect();
            v.set(&candle_core::Tensor::from_vec(data, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let dir = temp_dir("smollm2-py");
    policy.save_hf_dir(&dir).unwrap();
    check_with_transformers(
        &py,
        &policy,
        &dir,
        &[
            "Hello 12",
            "I am Ana. Recommend some music for me.",
            "Ünïcødé — ok?",
        ],
    );
    if std::env::var("PGRPO_HF_MODEL_CHECK").as_deref() == Ok("1") {
        let prompt = policy
            .chat_prompt("What is the capital of France?")
            .unwrap();
        let ours = policy
            .sample(
                std::slice::from_ref(&prompt),
                1,
                &mut StdRng::seed_from_u64(0),
            )
            .unwrap();
        let theirs = run_python(
            &py,
            MODEL_SCRIPT,
            &[
                dir.to_str().unwrap(),
                &serde_json::to_string(&prompt).unwrap(),
                "12",
            ],
        );
        eprintln!(
            "pgrpo: {:?}\ntransformers: {:?}",
            policy.decode(&ours[0]).unwrap(),
            policy
                .decode(&serde_json::from_value::<Vec<u32>>(theirs.clone()).unwrap())
                .unwrap()
        );
        assert_eq!(theirs, serde_json::json!(ours[0]));
        peft_check(&py, &policy, &dir, &prompt, &ours[0]);
    } else {
        eprintln!(
            "hf_interop: AutoModelForCausalLM check off (set PGRPO_HF_MODEL_CHECK=1; needs torch)"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// PEFT loads the adapter directory onto the saved base and computes pgrpo's log-probs.
fn peft_check(py: &str, policy: &LmPolicy, dir: &Path, prompt: &[u32], completion: &[u32]) {
    let ok = Command::new(py)
        .args(["-c", "import peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        say("SKIPPED: PEFT check (`import peft` fails; install peft into PGRPO_PYTHON's environment)");
        return;
    }
    let base_dir = dir.join("base");
    let adapter_dir = dir.join("adapter");
    policy.model().save_hf_dir(&base_dir).unwrap();
    policy.save_adapter(&adapter_dir).unwrap();
    let theirs: Vec<f64> = serde_json::from_value(run_python(
        py,
        PEFT_SCRIPT,
        &[
            base_dir.to_str().unwrap(),
            adapter_dir.to_str().unwrap(),
            &serde_json::to_string(prompt).unwrap(),
            &serde_json::to_string(completion).unwrap(),
        ],
    ))
    .unwrap();
    let prompt = prompt.to_vec();
    let lp = policy
        .log_probs(&[&prompt], &[completion.to_vec()])
        .unwrap();
    let ours: Vec<f32> = lp.logp.flatten_all().unwrap().to_vec1().unwrap();
    let worst = ours
        .iter()
        .zip(&theirs)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    say(&format!(
        "hf_interop: PEFT vs pgrpo log-probs, max |diff| {worst:.2e} over {} tokens",
        ours.len()
    ));
    assert_eq!(ours.len(), theirs.len());
    assert!(worst < 1e-3, "PEFT {theirs:?} vs pgrpo {ours:?}");
}
