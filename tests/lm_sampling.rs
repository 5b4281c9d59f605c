//! What the LM policy samples and what it scores: log-probs at the sampling temperature on
//! every kernel path, the sampler's own log-probs, min-p and the repetition penalty in the
//! decode loop, truncation, the text-level reward, and the trainer's use of the sampler's
//! log-probs. All models are tiny and built here (no download).

use std::cell::Cell;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var, D};
use pgrpo::lm::{
    Kernels, Llama, LlamaConfig, LmPolicy, LoraConfig, SamplingConfig, TextReward, TokenIds,
    Tokenizer,
};
use pgrpo::{GroupKey, GroupedPrompt, Policy, Result, TokenLogProbs, Trainer, TrainerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 40;
const EOS: u32 = 3;

/// A tiny model whose weights are O(1) (not HF's 0.02 init), so its next-token
/// distributions are far from uniform and the temperature matters.
fn tiny_model(seed: u64) -> Llama {
    let config = LlamaConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: VOCAB,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        eos_token_id: Some(TokenIds::One(EOS)),
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let model = Llama::new(config, &mut rng, &Device::Cpu, DType::F32).unwrap();
    for (name, var) in model.named_vars() {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        // Uniform in ±a: norms around 1, embeddings O(1), projections ~2.5 / √fan_in.
        let (base, a) = if name.ends_with("norm.weight") {
            (1.0, 0.2)
        } else if name == "model.embed_tokens.weight" {
            (0.0, 1.7)
        } else {
            (0.0, 2.5 / (dims[1] as f32).sqrt())
        };
        let data: Vec<f32> = (0..n).map(|_| base + rng.random_range(-a..a)).collect();
        var.set(&Tensor::from_vec(data, dims, &Device::Cpu).unwrap())
            .unwrap();
    }
    model
}

fn policy(seed: u64, sampling: SamplingConfig) -> LmPolicy {
    LmPolicy::new(tiny_model(seed), None)
        .with_sampling(sampling)
        .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![5, 9, 17, 30, 2], vec![7], vec![11, 12, 39]]
}

/// Row `i` of a row-major batch of `n` completions per prompt.
fn rows(prompts: &[Vec<u32>], n: usize) -> Vec<&Vec<u32>> {
    prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, n))
        .collect()
}

fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

/// `log_softmax(logits / T)` of the full forward of `prompt ++ completion` at the positions
/// that predict the completion: `(len(completion), V)`, computed in `f64`.
fn tempered_log_softmax(
    model: &Llama,
    prompt: &[u32],
    completion: &[u32],
    t: f64,
) -> Vec<Vec<f64>> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let logits = model.forward_detached(&ids, None).unwrap().get(0).unwrap();
    let logits = logits.to_dtype(DType::F64).unwrap();
    let lp = candle_nn::ops::log_softmax(&(logits / t).unwrap(), D::Minus1).unwrap();
    let lp = lp.to_vec2::<f64>().unwrap();
    lp[prompt.len() - 1..n - 1].to_vec()
}

/// **Regression (defect 1).** A policy sampling at `T ≠ 1` (with top-k / top-p, which
/// scoring ignores as TRL does) scores completions with `log_softmax(logits / T)` and its
/// entropy, on the training path and the detached path, with every kernel set (the fused
/// `log_softmax_gather` kernel, the per-op kernels, candle's stock ops). Before the fix the
/// policy scored at `T = 1` and this failed by ~0.3 nats.
#[test]
fn log_probs_and_entropy_are_scored_at_the_sampling_temperature() {
    let prompts = prompts();
    for (temperature, top_k, top_p) in [(0.7, 0, 1.0), (1.6, 8, 0.9)] {
        let sampling = SamplingConfig {
            max_new_tokens: 6,
            temperature,
            top_k,
            top_p,
            ..Default::default()
        };
        for kernels in [Kernels::Fused, Kernels::FusedOps, Kernels::Reference] {
            let model = tiny_model(1).with_kernels(kernels);
            let policy = LmPolicy::new(model, None)
                .with_sampling(sampling.clone())
                .unwrap();
            let completions = policy
                .sample(&prompts, 2, &mut StdRng::seed_from_u64(4))
                .unwrap();
            let r = rows(&prompts, 2);
            let tracked = policy.log_probs(&r, &completions).unwrap();
            let detached = policy.log_probs_detached(&r, &completions).unwrap();
            let mut worst = 0f64;
            for lp in [&tracked, &detached] {
                let (logp, entropy) = (vec2(&lp.logp), vec2(lp.entropy.as_ref().unwrap()));
                for (i, c) in completions.iter().enumerate() {
                    let want = tempered_log_softmax(policy.model(), r[i], c, temperature);
                    for (t, &tok) in c.iter().enumerate() {
                        worst = worst.max((logp[i][t] as f64 - want[t][tok as usize]).abs());
                        let h: f64 = -want[t].iter().map(|l| l.exp() * l).sum::<f64>();
                        worst = worst.max((entropy[i][t] as f64 - h).abs());
                    }
                }
            }
            assert!(
                worst < 2e-5,
                "T = {temperature}, {kernels:?}: worst difference {worst}"
            );
        }
    }
}

/// The sampler's own log-probs (`sample_with_log_probs`) are the completions' scoring-path
/// log-probs (`log_probs_detached`) to float tolerance, with the same `(B, C)` layout and
/// mask, at `T = 1`, at `T ≠ 1`, and with every sampling control on (they are not part of
/// the scored distribution); the completions are those `sample` draws with the same seed.
/// Greedy decoding is scored at `T = 1`. A LoRA policy (merged for sampling) too.
#[test]
fn sampler_log_probs_equal_the_scoring_path() {
    let prompts = prompts();
    let configs = [
        SamplingConfig {
            max_new_tokens: 7,
            ..Default::default()
        },
        SamplingConfig {
            max_new_tokens: 7,
            temperature: 0.6,
            ..Default::default()
        },
        SamplingConfig {
            max_new_tokens: 9,
            temperature: 1.4,
            top_k: 12,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.3,
            ..Default::default()
        },
        SamplingConfig {
            max_new_tokens: 5,
            temperature: 0.0,
            ..Default::default()
        },
    ];
    let lora = |p: LmPolicy| {
        let cfg = LoraConfig {
            r: 4,
            ..Default::default()
        };
        let p = p.with_lora(cfg, &mut StdRng::seed_from_u64(8)).unwrap();
        // Non-zero B, so the adapters change the logits.
        for v in p.vars() {
            let t = (v.as_tensor().ones_like().unwrap() * 0.05).unwrap();
            v.set(&(v.as_tensor() + t).unwrap()).unwrap();
        }
        p
    };
    for (k, cfg) in configs.iter().enumerate() {
        for adapters in [false, true] {
            let mut p = policy(2, cfg.clone());
            if adapters {
                p = lora(p);
            }
            let (completions, lp) = p
                .sample_with_log_probs(&prompts, 3, &mut StdRng::seed_from_u64(10 + k as u64))
                .unwrap();
            let plain = p
                .sample(&prompts, 3, &mut StdRng::seed_from_u64(10 + k as u64))
                .unwrap();
            assert_eq!(completions, plain, "config {k}");
            let lp = lp.expect("the LM sampler returns its log-probs");
            let want = p
                .log_probs_detached(&rows(&prompts, 3), &completions)
                .unwrap();
            assert_eq!(lp.logp.dims(), want.logp.dims(), "config {k}");
            assert_eq!(vec2(&lp.mask), vec2(&want.mask), "config {k}");
            assert!(lp.entropy.is_none());
            let (got, want, mask) = (vec2(&lp.logp), vec2(&want.logp), vec2(&lp.mask));
            let mut worst = 0f32;
            for i in 0..got.len() {
                for t in 0..got[i].len() {
                    if mask[i][t] > 0.0 {
                        worst = worst.max((got[i][t] - want[i][t]).abs());
                    } else {
                        assert_eq!(got[i][t], 0.0);
                    }
                }
            }
            assert!(worst < 1e-5, "config {k}, LoRA {adapters}: {worst}");
        }
    }
}

/// Greedy decoding with a repetition penalty equals greedy decoding by full recompute with
/// transformers' rule applied by hand (every token of prompt and completion so far: positive
/// logits / r, negative · r), and the penalty changes the output (the test is not vacuous).
#[test]
fn repetition_penalty_follows_transformers_in_the_decode_loop() {
    let r = 2.5f32;
    let greedy = |penalty: f64| SamplingConfig {
        max_new_tokens: 8,
        temperature: 0.0,
        repetition_penalty: penalty,
        stop_tokens: Some(vec![]),
        ..Default::default()
    };
    let p = policy(3, greedy(r as f64));
    let prompts = prompts();
    let got = p
        .sample(&prompts, 1, &mut StdRng::seed_from_u64(0))
        .unwrap();
    let plain = policy(3, greedy(1.0))
        .sample(&prompts, 1, &mut StdRng::seed_from_u64(0))
        .unwrap();
    assert_ne!(
        got, plain,
        "the penalty should change some greedy completion"
    );
    for (i, prompt) in prompts.iter().enumerate() {
        let mut seq = prompt.clone();
        let mut out = Vec::new();
        for _ in 0..8 {
            let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
            let logits = p.model().forward_detached(&ids, None).unwrap();
            let mut row = logits
                .get(0)
                .unwrap()
                .get(seq.len() - 1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut seen = seq.clone();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                let x = row[t as usize];
                row[t as usize] = if x < 0.0 { x * r } else { x / r };
            }
            let tok = (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .unwrap() as u32;
            out.push(tok);
            seq.push(tok);
        }
        assert_eq!(got[i], out, "prompt {i}");
    }
}

/// Every token drawn under min-p has `p ≥ min_p · p_max` under the tempered distribution of
/// its step (full recompute), and without min-p the same model draws tokens below that bar.
#[test]
fn min_p_bounds_every_sampled_token() {
    let (min_p, temperature) = (0.2, 1.3);
    let cfg = |min_p: f64| SamplingConfig {
        max_new_tokens: 10,
        temperature,
        min_p,
        ..Default::default()
    };
    let prompts = prompts();
    let lowest_ratio = |p: &LmPolicy| {
        let cs = p
            .sample(&prompts, 6, &mut StdRng::seed_from_u64(21))
            .unwrap();
        let mut lowest = f64::INFINITY;
        for (prompt, c) in rows(&prompts, 6).into_iter().zip(&cs) {
            let lp = tempered_log_softmax(p.model(), prompt, c, temperature);
            for (t, &tok) in c.iter().enumerate() {
                let top = lp[t].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lowest = lowest.min((lp[t][tok as usize] - top).exp());
            }
        }
        lowest
    };
    let with = lowest_ratio(&policy(4, cfg(min_p)));
    let without = lowest_ratio(&policy(4, cfg(0.0)));
    assert!(with >= min_p - 1e-5, "lowest p / p_max with min-p: {with}");
    assert!(without < min_p, "lowest p / p_max without min-p: {without}");
}

/// A completion is truncated exactly when it does not end with a stop token; a truncated
/// sampled completion has exactly `max_new_tokens` tokens. Stop tokens default to the
/// model's EOS. `max_completion_len` is `max_new_tokens`. Policies without a budget keep the
/// defaults (`false`, `None`).
#[test]
fn truncation_and_the_generation_budget() {
    let p = policy(
        5,
        SamplingConfig {
            max_new_tokens: 4,
            stop_tokens: Some(vec![EOS, 8, 9, 10, 11, 12]),
            ..Default::default()
        },
    );
    assert_eq!(p.max_completion_len(), Some(4));
    let cs = p
        .sample(&prompts(), 8, &mut StdRng::seed_from_u64(2))
        .unwrap();
    let (mut cut, mut ended) = (0, 0);
    for c in &cs {
        let stops = matches!(c.last(), Some(t) if [EOS, 8, 9, 10, 11, 12].contains(t));
        assert_eq!(p.is_truncated(c), !stops, "{c:?}");
        if p.is_truncated(c) {
            assert_eq!(c.len(), 4);
            cut += 1;
        } else {
            ended += 1;
        }
    }
    assert!(cut > 0 && ended > 0, "{cut} truncated, {ended} ended");
    // Default stop tokens: the model's EOS.
    let q = policy(5, SamplingConfig::default());
    assert!(!q.is_truncated(&vec![4, 5, EOS]));
    assert!(q.is_truncated(&vec![4, EOS, 5]));
    assert!(q.is_truncated(&vec![]));
    // A policy with no budget.
    let tab = pgrpo::models::TabularPolicy::new(2, 3, false, &Device::Cpu).unwrap();
    assert_eq!(tab.max_completion_len(), None);
    assert!(!tab.is_truncated(&1));
    let (acts, lp) = tab
        .sample_with_log_probs(&[0, 1], 2, &mut StdRng::seed_from_u64(0))
        .unwrap();
    assert_eq!(acts.len(), 4);
    assert!(lp.is_none());
}

/// A WordLevel tokenizer whose `<eos>` (id 3) is a special token.
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
        "added_tokens": [{"id": 3, "content": "<eos>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    json.to_string().parse::<Tokenizer>().unwrap()
}

/// `TextReward` decodes the completion without special tokens and the prompt with them,
/// passes the group, reports its name, and needs a tokenizer.
#[test]
fn text_reward_scores_decoded_text() {
    use pgrpo::RewardFn;
    let p = LmPolicy::new(tiny_model(6), Some(word_tokenizer()));
    let seen = Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = seen.clone();
    let mut reward = TextReward::new(&p, move |prompt: &str, completion: &str, g: &GroupKey| {
        log.borrow_mut()
            .push((prompt.to_owned(), completion.to_owned(), g.to_string()));
        completion.split_whitespace().count() as f32
    })
    .unwrap()
    .with_name("words");
    assert_eq!(reward.name(), "words");
    let (q1, q2) = (vec![6u32, 7, 3], vec![4u32]);
    let a = reward.score(&q1, &vec![7, 8, EOS], &"x".into()).unwrap();
    let b = reward.score(&q1, &vec![4, 5, 6, 7], &"x".into()).unwrap();
    let c = reward.score(&q2, &vec![EOS], &"y".into()).unwrap();
    assert_eq!((a, b, c), (2.0, 4.0, 0.0));
    let seen = seen.borrow();
    assert_eq!(
        seen[0],
        ("the cat <eos>".into(), "cat sat".into(), "x".into())
    );
    assert_eq!(seen[1].0, "the cat <eos>");
    assert_eq!(seen[1].1, "hello world the cat");
    assert_eq!(seen[2], ("hello".into(), "".into(), "y".into()));
    let none = LmPolicy::new(tiny_model(6), None);
    let err = TextReward::new(&none, |_: &str, _: &str, _: &GroupKey| 0.0).err();
    assert!(matches!(err, Some(pgrpo::Error::Tokenizer(_))), "{err:?}");
}

/// What [`Counting`] does with the sampler's log-probs.
#[derive(Clone, Copy)]
enum Share {
    Yes,
    No,
    /// One row too few: a broken policy.
    WrongRows,
}

/// An [`LmPolicy`] that counts its calls, and can hide (or break) the sampler's log-probs.
struct Counting {
    inner: LmPolicy,
    share_sampled: Share,
    detached_calls: Rc<Cell<usize>>,
    sampled_calls: Rc<Cell<usize>>,
}

impl Policy for Counting {
    type Prompt = Vec<u32>;
    type Completion = Vec<u32>;

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn sample(&self, prompts: &[Vec<u32>], n: usize, rng: &mut StdRng) -> Result<Vec<Vec<u32>>> {
        self.inner.sample(prompts, n, rng)
    }

    fn sample_with_log_probs(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        rng: &mut StdRng,
    ) -> Result<(Vec<Vec<u32>>, Option<TokenLogProbs>)> {
        self.sampled_calls.set(self.sampled_calls.get() + 1);
        let (c, lp) = self.inner.sample_with_log_probs(prompts, n, rng)?;
        Ok(match self.share_sampled {
            Share::Yes => (c, lp),
            Share::No => (c, None),
            Share::WrongRows => {
                let lp = lp.unwrap();
                let rows = lp.logp.dim(0)? - 1;
                let cut = TokenLogProbs {
                    logp: lp.logp.narrow(0, 0, rows)?,
                    mask: lp.mask.narrow(0, 0, rows)?,
                    entropy: None,
                };
                (c, Some(cut))
            }
        })
    }

    fn log_probs(&self, prompts: &[&Vec<u32>], completions: &[Vec<u32>]) -> Result<TokenLogProbs> {
        self.inner.log_probs(prompts, completions)
    }

    fn log_probs_detached(
        &self,
        prompts: &[&Vec<u32>],
        completions: &[Vec<u32>],
    ) -> Result<TokenLogProbs> {
        self.detached_calls.set(self.detached_calls.get() + 1);
        self.inner.log_probs_detached(prompts, completions)
    }

    fn vars(&self) -> Vec<Var> {
        self.inner.vars()
    }

    fn snapshot(&self) -> Result<Self> {
        Ok(Counting {
            inner: self.inner.snapshot()?,
            share_sampled: self.share_sampled,
            detached_calls: Rc::new(Cell::new(0)),
            sampled_calls: Rc::new(Cell::new(0)),
        })
    }
}

/// With `num_iterations > 1` the trainer takes the old log-probs from the sampler when it
/// has them (no `log_probs_detached` call) and computes them otherwise; with
/// `num_iterations = 1` it does not ask for them. Both runs give the same losses to float
/// tolerance (the old log-probs agree to ~1e-6).
#[test]
fn trainer_takes_old_log_probs_from_the_sampler() {
    let run = |share: Share, iterations: usize| {
        let (detached, sampled) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let policy = Counting {
            inner: policy(
                7,
                SamplingConfig {
                    max_new_tokens: 5,
                    temperature: 0.8,
                    ..Default::default()
                },
            ),
            share_sampled: share,
            detached_calls: detached.clone(),
            sampled_calls: sampled.clone(),
        };
        let config = TrainerConfig {
            num_generations: 4,
            num_iterations: iterations,
            learning_rate: 1e-3,
            seed: 3,
            ..Default::default()
        };
        let reward = |_p: &Vec<u32>, c: &Vec<u32>, _g: &GroupKey| {
            c.iter().filter(|&&t| t < 20).count() as f32
        };
        let mut trainer = Trainer::new(policy, reward, config).unwrap();
        let batch: Vec<_> = prompts()
            .into_iter()
            .map(GroupedPrompt::ungrouped)
            .collect();
        let mut losses = Vec::new();
        for _ in 0..2 {
            match trainer.step(&batch) {
                Ok(m) => losses.push(m.get("loss").unwrap()),
                Err(e) => return (detached.get(), sampled.get(), Err(e)),
            }
        }
        (detached.get(), sampled.get(), Ok(losses))
    };
    let (d, s, shared) = run(Share::Yes, 2);
    assert_eq!((d, s), (0, 2), "the sampler's log-probs are used");
    let (d, s, computed) = run(Share::No, 2);
    assert_eq!((d, s), (2, 2), "computed when the sampler has none");
    let (shared, computed) = (shared.unwrap(), computed.unwrap());
    for (a, b) in shared.iter().zip(&computed) {
        assert!(
            (a - b).abs() < 1e-4 * b.abs().max(1.0),
            "{shared:?} vs {computed:?}"
        );
    }
    let (d, s, _) = run(Share::Yes, 1);
    assert_eq!((d, s), (0, 0), "num_iterations = 1 needs no old log-probs");
    let (_, _, broken) = run(Share::WrongRows, 2);
    assert!(
        matches!(
            broken,
            Err(pgrpo::Error::ShapeMismatch {
                what: "sampled log-probs",
                ..
            })
        ),
        "{broken:?}"
    );
}

/// `bf16` decode weights: the policy hands back no sampler log-probs (the trainer then
/// scores old log-probs in f32), with `F32` it does; the tokens are drawn all the same.
#[test]
fn bf16_decoding_returns_no_sampler_log_probs() {
    use pgrpo::lm::DecodePrecision;
    let base = SamplingConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let f32 = policy(2, base.clone());
    let bf16 = policy(
        2,
        SamplingConfig {
            decode_weights: DecodePrecision::Bf16,
            ..base
        },
    );
    let prompts = prompts();
    let (c, lp) = f32
        .sample_with_log_probs(&prompts, 2, &mut StdRng::seed_from_u64(4))
        .unwrap();
    assert!(lp.is_some());
    assert_eq!(c.len(), 6);
    let (c, lp) = bf16
        .sample_with_log_probs(&prompts, 2, &mut StdRng::seed_from_u64(4))
        .unwrap();
    assert!(lp.is_none(), "bf16 decoding must not report old log-probs");
    assert_eq!(c.len(), 6);
    assert!(c.iter().all(|c| !c.is_empty() && c.len() <= 6));
}

/// `bf16` decode weights change only the decode steps with at most 16 rows: the first token
/// (from the f32 prefill) is the f32 one in every row, a batch of more than 16 rows that
/// never stops decodes exactly as with f32, and a small batch reads the bf16 weights (its
/// greedy tokens or its log-probs differ somewhere from f32's).
#[test]
fn bf16_decoding_keeps_prefill_and_wide_steps_in_f32() {
    use pgrpo::lm::DecodePrecision;
    let model = tiny_model(5);
    let prompts = prompts();
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let run = |n: usize, decode_weights: DecodePrecision| {
        let cfg = SamplingConfig {
            max_new_tokens: 8,
            temperature: 0.0,
            stop_tokens: Some(vec![]),
            decode_weights,
            ..Default::default()
        };
        model
            .generate_with_log_probs(&p, n, &cfg, &mut StdRng::seed_from_u64(1))
            .unwrap()
    };
    // 3 prompts × 6 = 18 rows > 16: every step in f32.
    assert_eq!(run(6, DecodePrecision::F32), run(6, DecodePrecision::Bf16));
    // 3 × 2 = 6 rows: steps after the first read bf16 weights.
    let (tf, lf) = run(2, DecodePrecision::F32);
    let (tb, lb) = run(2, DecodePrecision::Bf16);
    for r in 0..6 {
        assert_eq!(
            tf[r][0], tb[r][0],
            "row {r}: first token comes from the f32 prefill"
        );
        assert_eq!(lf[r][0], lb[r][0], "row {r}");
    }
    assert!(tf != tb || lf != lb, "bf16 weights not read");
    let worst = lf
        .iter()
        .flatten()
        .zip(lb.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        tf != tb || worst < 0.05,
        "greedy tokens agree but log-probs differ by {worst}"
    );
}
