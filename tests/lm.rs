//! Tests of the trainable Llama ([`pgrpo::lm`]): gradients, padding, KV cache, loading and
//! saving (HF directory, GGUF), seeded sampling, typed errors. All models are tiny and built
//! here; the real SmolLM2 test is `#[ignore]`d (see `smollm2_gguf_answers_and_trains`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var, D};
use pgrpo::lm::{Grad, KvCache, Llama, LlamaConfig, LmPolicy, SamplingConfig, TokenIds, Tokenizer};
use pgrpo::{Error, Policy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 110;
const EOS: u32 = 3;

fn tiny_config(bias: bool, tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: VOCAB,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: tied,
        attention_bias: Some(bias),
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(EOS)),
        ..Default::default()
    }
}

fn normals(n: usize, std: f64, rng: &mut StdRng) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
            std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

/// A tiny model whose every weight is random and O(1)-scaled (norm weights and biases too), so
/// that the output distribution and every gradient are far from trivial.
fn tiny_model(bias: bool, tied: bool, dtype: DType, seed: u64) -> Llama {
    let mut rng = StdRng::seed_from_u64(seed);
    let model = Llama::new(tiny_config(bias, tied), &mut rng, &Device::Cpu, dtype).unwrap();
    for (name, var) in model.named_vars() {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let data = if name.ends_with("norm.weight") {
            normals(n, 0.2, &mut rng)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect()
        } else if name.ends_with(".bias") {
            normals(n, 0.2, &mut rng)
        } else if name == "model.embed_tokens.weight" {
            normals(n, 1.0, &mut rng)
        } else {
            normals(n, 1.0 / (dims[1] as f64).sqrt(), &mut rng)
        };
        let t = Tensor::from_vec(data, dims, &Device::Cpu).unwrap();
        var.set(&t.to_dtype(dtype).unwrap()).unwrap();
    }
    model
}

/// Prompts of different lengths (so some rows are left-padded) and completions of different
/// lengths (so some rows are right-padded), ids avoiding EOS.
fn batch() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let prompts = vec![vec![5, 9, 17, 40, 2], vec![7], vec![11, 12, 109]];
    let completions = vec![vec![8, 30], vec![21, 22, 23, 24], vec![50]];
    (prompts, completions)
}

fn slices(v: &[Vec<u32>]) -> Vec<&[u32]> {
    v.iter().map(Vec::as_slice).collect()
}

fn to_vec2_f64(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A fresh empty directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgrpo-lm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Loss `Σ w ⊙ mask ⊙ logp` with fixed random weights `w`.
fn weighted_loss(model: &Llama, w: &Tensor) -> Tensor {
    let (p, c) = batch();
    let lp = model
        .token_log_probs(&slices(&p), &slices(&c), Grad::Track, false)
        .unwrap();
    (lp.logp * lp.mask)
        .unwrap()
        .mul(w)
        .unwrap()
        .sum_all()
        .unwrap()
}

/// Central finite differences in f64 against autograd, for a few random entries of every var
/// (embedding, norms, q/k/v/o with biases, MLP, final norm, lm_head).
#[test]
fn gradient_matches_finite_differences_f64() {
    let model = tiny_model(true, false, DType::F64, 1);
    let mut rng = StdRng::seed_from_u64(2);
    let w = Tensor::from_vec(normals(3 * 4, 1.0, &mut rng), (3, 4), &Device::Cpu).unwrap();
    let loss = weighted_loss(&model, &w);
    let grads = loss.backward().unwrap();
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for (name, var) in model.named_vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no grad for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let n = orig.len();
        // The embedding rows of tokens in the batch; any entry elsewhere.
        let picks: Vec<usize> = if name == "model.embed_tokens.weight" {
            let hsz = 32;
            vec![
                9 * hsz + rng.random_range(0..hsz),
                22 * hsz + rng.random_range(0..hsz),
            ]
        } else {
            (0..3).map(|_| rng.random_range(0..n)).collect()
        };
        for i in picks {
            let eval = |delta: f64| {
                let mut p = orig.clone();
                p[i] += delta;
                var.set(&Tensor::from_vec(p, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                weighted_loss(&model, &w).to_scalar::<f64>().unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(orig.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (fd - g[i]).abs() / (1e-4 + fd.abs().max(g[i].abs()));
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "{name}[{i}]: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }
    assert!(worst < 1e-5, "worst relative error {worst}");
}

/// Every var gets a finite, non-zero gradient, for a Qwen2-style model (q/k/v bias, untied)
/// and a SmolLM-style one (no bias, tied embeddings).
#[test]
fn every_var_receives_a_nonzero_gradient() {
    for (bias, tied) in [(true, false), (false, true)] {
        let model = tiny_model(bias, tied, DType::F32, 3);
        let w = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        let grads = weighted_loss(&model, &w).backward().unwrap();
        let vars = model.named_vars();
        let expected = 1 + 2 * (9 + if bias { 3 } else { 0 }) + 1 + usize::from(!tied);
        assert_eq!(vars.len(), expected);
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient (bias={bias}, tied={tied})"));
            let s = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(s.is_finite() && s > 0.0, "{name}: gradient norm {s}");
        }
    }
}

/// Prefill + one-token-at-a-time decoding with a KV cache gives the logits of a full
/// forward, with left padding in the batch; the detached (fused) and tracked paths agree.
#[test]
fn kv_cache_decoding_equals_full_recompute() {
    let model = tiny_model(true, false, DType::F32, 4);
    let dev = Device::Cpu;
    let ids: Vec<u32> = vec![
        0, 0, 0, 5, 6, 7, 8, 9, //
        10, 11, 12, 13, 14, 15, 16, 17, //
        0, 0, 0, 0, 0, 20, 21, 22,
    ];
    let real: Vec<bool> = (0..24).map(|i| !matches!(i, 0..=2 | 16..=20)).collect();
    let ids_t = Tensor::from_vec(ids.clone(), (3, 8), &dev).unwrap();
    let mask = Tensor::from_vec(
        real.iter().map(|&r| r as u8).collect::<Vec<_>>(),
        (3, 8),
        &dev,
    )
    .unwrap();
    let full = model.forward(&ids_t, Some(&mask)).unwrap();
    let full_fast = model.forward_detached(&ids_t, Some(&mask)).unwrap();

    let mut cache: KvCache = model.new_cache();
    let prefill = ids_t.narrow(1, 0, 5).unwrap();
    let real_prefill: Vec<bool> = (0..3)
        .flat_map(|r| real[r * 8..r * 8 + 5].to_vec())
        .collect();
    let mut steps = vec![model
        .forward_cached(&prefill, Some(&real_prefill), &mut cache)
        .unwrap()];
    for col in 5..8 {
        let x = ids_t.narrow(1, col, 1).unwrap();
        let r: Vec<bool> = (0..3).map(|row| real[row * 8 + col]).collect();
        steps.push(model.forward_cached(&x, Some(&r), &mut cache).unwrap());
    }
    assert_eq!(cache.len(), 8);
    let cached = Tensor::cat(&steps, 1).unwrap();
    for row in 0..3 {
        for col in 0..8 {
            if !real[row * 8 + col] {
                continue;
            }
            let a = full.get(row).unwrap().get(col).unwrap();
            let b = cached.get(row).unwrap().get(col).unwrap();
            let c = full_fast.get(row).unwrap().get(col).unwrap();
            assert!(max_abs_diff(&a, &b) < 1e-4, "row {row} col {col}: cache");
            assert!(max_abs_diff(&a, &c) < 1e-4, "row {row} col {col}: detached");
        }
    }
}

/// Log-probs of a padded batch equal each row scored alone (no padding), for the tracked
/// and the detached path.
#[test]
fn left_padding_does_not_change_log_probs() {
    let policy = LmPolicy::new(tiny_model(false, true, DType::F32, 5), None);
    let (prompts, completions) = batch();
    let refs: Vec<&Vec<u32>> = prompts.iter().collect();
    for detached in [false, true] {
        let score = |p: &[&Vec<u32>], c: &[Vec<u32>]| {
            if detached {
                policy.log_probs_detached(p, c).unwrap()
            } else {
                policy.log_probs(p, c).unwrap()
            }
        };
        let batched = score(&refs, &completions);
        assert_eq!(batched.logp.dims(), &[3, 4]);
        let lp = to_vec2_f64(&batched.logp);
        let mask = to_vec2_f64(&batched.mask);
        let ent = to_vec2_f64(batched.entropy.as_ref().unwrap());
        for row in 0..3 {
            let alone = score(&[refs[row]], std::slice::from_ref(&completions[row]));
            let lp1 = to_vec2_f64(&alone.logp);
            let ent1 = to_vec2_f64(alone.entropy.as_ref().unwrap());
            for t in 0..4 {
                let in_completion = t < completions[row].len();
                assert_eq!(mask[row][t], if in_completion { 1.0 } else { 0.0 });
                if in_completion {
                    assert!((lp[row][t] - lp1[0][t]).abs() < 1e-5, "row {row} t {t}");
                    assert!((ent[row][t] - ent1[0][t]).abs() < 1e-5);
                    assert!(lp[row][t] < 0.0 && ent[row][t] > 0.0);
                }
            }
        }
    }
}

/// The log-prob of a token equals `log_softmax` of the full forward's logits at the
/// previous position.
#[test]
fn log_probs_match_log_softmax_of_full_forward() {
    let model = tiny_model(false, false, DType::F64, 6);
    let prompt = [4u32, 8, 15];
    let completion = [16u32, 23, 42];
    let lp = model
        .token_log_probs(&[&prompt], &[&completion], Grad::Detached, false)
        .unwrap();
    let ids: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
    let ids = Tensor::from_vec(ids, (1, 6), &Device::Cpu).unwrap();
    let logp_all = candle_nn::ops::log_softmax(&model.forward(&ids, None).unwrap(), D::Minus1)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let got = to_vec2_f64(&lp.logp);
    for t in 0..3 {
        let want = logp_all[0][2 + t][completion[t] as usize];
        assert!((got[0][t] - want).abs() < 1e-10);
    }
}

/// A tiny WordLevel tokenizer built with the `tokenizers` crate.
fn word_tokenizer() -> Tokenizer {
    let words = [
        "<unk>", "<s>", "</s>", "<eos>", "hello", "world", "the", "cat", "sat",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    json.to_string().parse::<Tokenizer>().unwrap()
}

/// Save to an HF directory and load back: same config, names, logits and tokenizer; the
/// same checkpoint split into two shards with an index loads too.
#[test]
fn hf_directory_round_trip() {
    let dir = temp_dir("hf");
    let model = tiny_model(true, false, DType::F32, 7);
    let policy = LmPolicy::new(model, Some(word_tokenizer()));
    policy.save_hf_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");

    let loaded = LmPolicy::from_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model().config(), policy.model().config());
    let names = |p: &LmPolicy| -> Vec<String> {
        p.model().named_vars().into_iter().map(|(n, _)| n).collect()
    };
    assert_eq!(names(&loaded), names(&policy));
    let ids = Tensor::new(&[[4u32, 5, 6, 7, 8]], &Device::Cpu).unwrap();
    let a = policy.model().forward(&ids, None).unwrap();
    let b = loaded.model().forward(&ids, None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert_eq!(loaded.encode("the cat sat").unwrap(), vec![6, 7, 8]);

    // Sharded: two safetensors files and an index.
    let sharded = temp_dir("hf-sharded");
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let tensors = policy.model().tensors();
    let (mut s1, mut s2) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let (file, shard) = if i % 2 == 0 {
            ("a.safetensors", &mut s1)
        } else {
            ("b.safetensors", &mut s2)
        };
        weight_map.insert(name.clone(), serde_json::json!(file));
        shard.insert(name, t);
    }
    candle_core::safetensors::save(&s1, sharded.join("a.safetensors")).unwrap();
    candle_core::safetensors::save(&s2, sharded.join("b.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let from_shards = Llama::from_hf_dir(&sharded, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(
        max_abs_diff(&a, &from_shards.forward(&ids, None).unwrap()),
        0.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&sharded);
}

/// llama.cpp's q/k row permutation (HF → GGUF), written index by index:
/// GGUF row `h·d + 2i + j` holds HF row `h·d + j·d/2 + i`.
fn llama_cpp_permute(t: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = t.dims2().unwrap();
    let d = out / heads;
    let rows = t.to_vec2::<f32>().unwrap();
    let mut perm = Vec::with_capacity(out * inp);
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                perm.extend_from_slice(&rows[h * d + j * (d / 2) + i]);
            }
        }
    }
    Tensor::from_vec(perm, (out, inp), &Device::Cpu).unwrap()
}

/// GPT-2 byte-level BPE metadata over a small vocabulary: specials, printable ASCII, `Ġ`
/// (space), `Ċ` (newline) and the merges for "Hello"; pre-tokenizer "smollm".
fn gguf_tokenizer_metadata() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend((33u8..=126).map(|b| (b as char).to_string()));
    tokens.extend(
        ["Ġ", "Ċ", "He", "ll", "Hell", "Hello"]
            .iter()
            .map(|s| s.to_string()),
    );
    let merges = ["H e", "l l", "He ll", "Hell o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    (tokens, merges)
}

fn write_gguf(model: &Llama, path: &Path, arch: &str) {
    let c = model.config();
    let (tokens, merges) = gguf_tokenizer_metadata();
    assert!(tokens.len() <= c.vocab_size);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, var) in model.named_vars() {
        let t = var.as_tensor().to_dtype(DType::F32).unwrap();
        let layer = name.split('.').nth(2).unwrap_or("");
        let (gguf, t) = match name.as_str() {
            "model.embed_tokens.weight" => ("token_embd.weight".to_string(), t),
            "model.norm.weight" => ("output_norm.weight".to_string(), t),
            "lm_head.weight" => ("output.weight".to_string(), t),
            n if n.ends_with("input_layernorm.weight") => {
                (format!("blk.{layer}.attn_norm.weight"), t)
            }
            n if n.ends_with("post_attention_layernorm.weight") => {
                (format!("blk.{layer}.ffn_norm.weight"), t)
            }
            // llama.cpp permutes Llama's q/k rows (not Qwen2's).
            n if n.ends_with("q_proj.weight") && arch == "llama" => (
                format!("blk.{layer}.attn_q.weight"),
                llama_cpp_permute(&t, c.num_attention_heads),
            ),
            n if n.ends_with("k_proj.weight") && arch == "llama" => (
                format!("blk.{layer}.attn_k.weight"),
                llama_cpp_permute(&t, c.num_kv_heads()),
            ),
            n if n.ends_with("q_proj.weight") => (format!("blk.{layer}.attn_q.weight"), t),
            n if n.ends_with("k_proj.weight") => (format!("blk.{layer}.attn_k.weight"), t),
            n if n.ends_with("q_proj.bias") => (format!("blk.{layer}.attn_q.bias"), t),
            n if n.ends_with("k_proj.bias") => (format!("blk.{layer}.attn_k.bias"), t),
            n if n.ends_with("v_proj.bias") => (format!("blk.{layer}.attn_v.bias"), t),
            n if n.ends_with("v_proj.weight") => (format!("blk.{layer}.attn_v.weight"), t),
            n if n.ends_with("o_proj.weight") => (format!("blk.{layer}.attn_output.weight"), t),
            n if n.ends_with("gate_proj.weight") => (format!("blk.{layer}.ffn_gate.weight"), t),
            n if n.ends_with("up_proj.weight") => (format!("blk.{layer}.ffn_up.weight"), t),
            n if n.ends_with("down_proj.weight") => (format!("blk.{layer}.ffn_down.weight"), t),
            n => panic!("no GGUF name for {n}"),
        };
        tensors.push((gguf, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let a = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (a("embedding_length"), Value::U32(c.hidden_size as u32)),
        (
            a("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (a("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (
            a("attention.head_count"),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            a("attention.head_count_kv"),
            Value::U32(c.num_kv_heads() as u32),
        ),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (a("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (a("rope.dimension_count"), Value::U32(c.head_dim() as u32)),
        (
            a("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..tokens.len())
                    .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| Value::String(m.clone())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    meta.sort_by(|x, y| x.0.cmp(&y.0));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// A GGUF written the llama.cpp way (names, permuted q/k, metadata, BPE tokenizer) loads
/// with HF names, un-permuted q/k (identical weights and logits) and the SmolLM2
/// pre-tokenizer fix; a Qwen2 GGUF (biases, no permutation) loads too.
#[test]
fn gguf_loads_with_hf_names_and_unpermuted_qk() {
    let dir = temp_dir("gguf");
    for tied in [false, true] {
        let model = tiny_model(false, tied, DType::F32, 8);
        let path = dir.join(format!("tiny-{tied}.gguf"));
        write_gguf(&model, &path, "llama");
        let loaded = LmPolicy::from_gguf(&path, &Device::Cpu).unwrap();
        let cfg = loaded.model().config();
        assert_eq!(cfg.tie_word_embeddings, tied);
        assert_eq!(cfg.num_kv_heads(), 2);
        assert_eq!(cfg.eos_token_ids(), vec![2]);
        let want: HashMap<String, Var> = model.named_vars().into_iter().collect();
        let got = loaded.model().named_vars();
        assert_eq!(got.len(), want.len());
        for (name, var) in got {
            let d = max_abs_diff(var.as_tensor(), want[&name].as_tensor());
            assert_eq!(d, 0.0, "{name} differs after GGUF round trip");
        }
        let ids = Tensor::new(&[[4u32, 50, 6, 7]], &Device::Cpu).unwrap();
        let a = model.forward(&ids, None).unwrap();
        let b = loaded.model().forward(&ids, None).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);

        let tok = loaded.tokenizer().unwrap();
        let id = |s: &str| tok.token_to_id(s).unwrap();
        // SmolLM2's pre-tokenizer: no prefix space, digits split one by one.
        assert_eq!(
            loaded.encode("Hello 12").unwrap(),
            vec![id("Hello"), id("Ġ"), id("1"), id("2")]
        );
        let chat = loaded.chat_prompt("Hi").unwrap();
        assert_eq!(chat[0], 1, "<|im_start|> is one special token");
        assert_eq!(
            loaded.decode(&loaded.encode("Hello 12").unwrap()).unwrap(),
            "Hello 12"
        );
    }
    // Qwen2-style: q/k/v biases, rows not permuted.
    let model = tiny_model(true, false, DType::F32, 8);
    let path = dir.join("tiny-qwen2.gguf");
    write_gguf(&model, &path, "qwen2");
    let loaded = LmPolicy::from_gguf(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.model().config().model_type, "qwen2");
    assert!(loaded.model().config().has_qkv_bias());
    let ids = Tensor::new(&[[4u32, 50, 6, 7]], &Device::Cpu).unwrap();
    let a = model.forward(&ids, None).unwrap();
    let b = loaded.model().forward(&ids, None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn sampling_policy(cfg: SamplingConfig) -> LmPolicy {
    LmPolicy::new(tiny_model(false, true, DType::F32, 9), None)
        .with_sampling(cfg)
        .unwrap()
}

/// Same seed ⇒ identical completions; different seed ⇒ different; completions stop at the
/// first stop token and respect `max_new_tokens`, for plain, top-k and top-p sampling.
#[test]
fn sampling_is_reproducible_from_the_seed() {
    let prompts = vec![vec![5u32, 6, 7], vec![8], vec![9, 10]];
    for (top_k, top_p) in [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.9)] {
        let policy = sampling_policy(SamplingConfig {
            max_new_tokens: 12,
            temperature: 1.0,
            top_k,
            top_p,
            stop_tokens: Some(vec![EOS, 4]),
            ..Default::default()
        });
        let a = policy
            .sample(&prompts, 4, &mut StdRng::seed_from_u64(11))
            .unwrap();
        let b = policy
            .sample(&prompts, 4, &mut StdRng::seed_from_u64(11))
            .unwrap();
        let c = policy
            .sample(&prompts, 4, &mut StdRng::seed_from_u64(12))
            .unwrap();
        assert_eq!(a.len(), 12);
        assert_eq!(a, b, "top_k={top_k} top_p={top_p}");
        assert_ne!(a, c, "top_k={top_k} top_p={top_p}");
        for comp in &a {
            assert!(!comp.is_empty() && comp.len() <= 12);
            let stops = comp.iter().filter(|t| **t == EOS || **t == 4).count();
            let ends_with_stop = matches!(comp.last(), Some(&t) if t == EOS || t == 4);
            assert!(
                stops == usize::from(ends_with_stop),
                "stop token inside {comp:?}"
            );
            if !ends_with_stop {
                assert_eq!(comp.len(), 12);
            }
        }
    }
}

/// Greedy KV-cache generation over a left-padded batch (rows finishing at different steps)
/// equals greedy decoding by full recompute of each prompt alone.
#[test]
fn greedy_generation_matches_full_recompute() {
    // This seed's model switches tokens mid-way, so rows stop after 6, 1 and 10 tokens.
    let stop = [EOS, 77, 8];
    let policy = LmPolicy::new(tiny_model(false, true, DType::F32, 21), None)
        .with_sampling(SamplingConfig {
            max_new_tokens: 10,
            temperature: 0.0,
            stop_tokens: Some(stop.to_vec()),
            ..Default::default()
        })
        .unwrap();
    let prompts = vec![vec![5u32, 6, 7, 30], vec![8], vec![9, 10]];
    let got = policy
        .sample(&prompts, 2, &mut StdRng::seed_from_u64(0))
        .unwrap();
    let lens: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(lens, [6, 6, 1, 1, 10, 10]);
    // top-k = 1 (or a tiny top-p) at any temperature is greedy too.
    for (top_k, top_p) in [(1, 1.0), (0, 1e-6)] {
        let cfg = SamplingConfig {
            temperature: 1.5,
            top_k,
            top_p,
            ..policy.sampling().clone()
        };
        let p = policy.clone().with_sampling(cfg).unwrap();
        assert_eq!(
            p.sample(&prompts, 2, &mut StdRng::seed_from_u64(5))
                .unwrap(),
            got
        );
    }
    let model = policy.model();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut seq = prompt.clone();
        let mut out = Vec::new();
        for _ in 0..10 {
            let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
            let logits = model.forward_detached(&ids, None).unwrap();
            let last = logits.get(0).unwrap().get(seq.len() - 1).unwrap();
            let tok = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            out.push(tok);
            seq.push(tok);
            if stop.contains(&tok) {
                break;
            }
        }
        assert_eq!(got[2 * i], out, "prompt {i}");
        assert_eq!(got[2 * i + 1], out, "prompt {i} (second sample)");
    }
}

/// A snapshot owns its storage: changing the policy's vars leaves it unchanged.
#[test]
fn snapshot_is_a_deep_copy() {
    let policy = LmPolicy::new(tiny_model(false, true, DType::F32, 10), None);
    let snap = policy.snapshot().unwrap();
    let v = &policy.vars()[0];
    let before = snap.vars()[0].as_tensor().copy().unwrap();
    v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    assert_eq!(max_abs_diff(snap.vars()[0].as_tensor(), &before), 0.0);
    assert!(max_abs_diff(v.as_tensor(), &before) > 0.0);
}

/// Missing files, an unsupported architecture, a missing tensor and a wrong shape each give
/// their typed error.
#[test]
fn loading_errors_are_typed() {
    let dev = Device::Cpu;
    let nowhere = std::env::temp_dir().join("pgrpo-lm-does-not-exist");
    assert!(matches!(
        Llama::from_hf_dir(&nowhere, &dev, DType::F32),
        Err(Error::File { .. })
    ));
    assert!(matches!(
        LmPolicy::from_gguf(nowhere.join("x.gguf"), &dev),
        Err(Error::File { .. })
    ));

    let dir = temp_dir("errors");
    // No config.json.
    let err = Llama::from_hf_dir(&dir, &dev, DType::F32).unwrap_err();
    assert!(
        matches!(&err, Error::File { path, .. } if path.ends_with("config.json")),
        "{err}"
    );

    let model = tiny_model(false, false, DType::F32, 12);
    model.save_hf_dir(&dir).unwrap();
    // No weights.
    std::fs::rename(dir.join("model.safetensors"), dir.join("weights.bak")).unwrap();
    let err = Llama::from_hf_dir(&dir, &dev, DType::F32).unwrap_err();
    assert!(
        matches!(&err, Error::File { path, .. } if path.ends_with("model.safetensors")),
        "{err}"
    );
    std::fs::rename(dir.join("weights.bak"), dir.join("model.safetensors")).unwrap();

    // Unsupported architecture.
    let config_path = dir.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    json["model_type"] = serde_json::json!("gpt2");
    std::fs::write(&config_path, json.to_string()).unwrap();
    let err = Llama::from_hf_dir(&dir, &dev, DType::F32).unwrap_err();
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");
    json["model_type"] = serde_json::json!("llama");
    json["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    std::fs::write(&config_path, json.to_string()).unwrap();
    let err = Llama::from_hf_dir(&dir, &dev, DType::F32).unwrap_err();
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");

    // Wrong shape: the config claims a wider MLP than the weights have.
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    json["intermediate_size"] = serde_json::json!(64);
    std::fs::write(&config_path, json.to_string()).unwrap();
    let err = Llama::from_hf_dir(&dir, &dev, DType::F32).unwrap_err();
    match &err {
        Error::TensorShape {
            name,
            expected,
            got,
            ..
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(
                (expected.as_slice(), got.as_slice()),
                (&[64, 32][..], &[48, 32][..])
            );
        }
        other => panic!("expected TensorShape, got {other}"),
    }

    // Missing tensor: the config asks for q/k/v biases the checkpoint lacks. Unexpected
    // tensor: the checkpoint has biases the config does not ask for.
    json["intermediate_size"] = serde_json::json!(48);
    json["attention_bias"] = serde_json::json!(true);
    std::fs::write(&config_path, json.to_string()).unwrap();
    let err = Llama::from_hf_dir(&dir, &dev, DType::F32).unwrap_err();
    assert!(
        matches!(&err, Error::File { reason, .. } if reason.contains("q_proj.bias")),
        "{err}"
    );
    let biased = tiny_model(true, false, DType::F32, 12);
    biased.save_hf_dir(&dir).unwrap();
    json["attention_bias"] = serde_json::json!(false);
    std::fs::write(&config_path, json.to_string()).unwrap();
    let err = Llama::from_hf_dir(&dir, &dev, DType::F32).unwrap_err();
    assert!(
        matches!(&err, Error::File { reason, .. } if reason.contains("unexpected")),
        "{err}"
    );

    // Unsupported GGUF architecture.
    let path = dir.join("m.gguf");
    write_gguf(&model, &path, "gpt2");
    let err = LmPolicy::from_gguf(&path, &dev).unwrap_err();
    assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");
    // Not a GGUF file at all.
    std::fs::write(&path, b"definitely not gguf").unwrap();
    assert!(matches!(
        LmPolicy::from_gguf(&path, &dev),
        Err(Error::File { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The real SmolLM2-135M-Instruct GGUF (Q4_1, dequantised to f32): greedy ChatML answer to
/// "What is the capital of France?" mentions Paris, saving it as an HF directory and loading
/// that back gives the same tokens, and one forward + backward reaches every var (all 272).
///
/// Opt-in (98 MB download, ~0.6 GB written to the temp dir, ~3 GB RAM): fetch the model with
/// `scripts/fetch-smollm2.sh`, then `cargo test --release --test lm -- --ignored`. Set
/// `PGRPO_SMOLLM2_GGUF` to use another path.
#[test]
#[ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-smollm2.sh)"]
fn smollm2_gguf_answers_and_trains() {
    let path = std::env::var("PGRPO_SMOLLM2_GGUF").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .into()
    });
    let policy = LmPolicy::from_gguf(&path, &Device::Cpu)
        .unwrap()
        .with_sampling(SamplingConfig {
            max_new_tokens: 20,
            temperature: 0.0,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(policy.model().config().num_hidden_layers, 30);
    // SmolLM2's pre-tokenizer (no prefix space): "Hello" is one token, 19556, not "ĠHello".
    assert_eq!(policy.encode("Hello").unwrap(), vec![19556]);
    let prompt = policy
        .chat_prompt("What is the capital of France?")
        .unwrap();
    let out = policy
        .sample(
            std::slice::from_ref(&prompt),
            1,
            &mut StdRng::seed_from_u64(0),
        )
        .unwrap();
    let answer = policy.decode(&out[0]).unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");

    // Saved as an HF directory (f32 safetensors + tokenizer.json), it loads and answers alike.
    let dir = temp_dir("smollm2");
    policy.save_hf_dir(&dir).unwrap();
    let reloaded = LmPolicy::from_hf_dir(&dir, &Device::Cpu)
        .unwrap()
        .with_sampling(policy.sampling().clone())
        .unwrap();
    assert_eq!(
        reloaded
            .chat_prompt("What is the capital of France?")
            .unwrap(),
        prompt
    );
    let again = reloaded.sample(
        std::slice::from_ref(&prompt),
        1,
        &mut StdRng::seed_from_u64(0),
    );
    assert_eq!(again.unwrap(), out);
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(policy.vars().len(), 272);
    let lp = policy.log_probs(&[&prompt], &out).unwrap();
    let loss = (lp.logp * lp.mask).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in policy.model().named_vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s.is_finite() && s > 0.0, "{name}: {s}");
    }
}
