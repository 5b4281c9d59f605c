//! LoRA on the Llama policy: exact gradients (f64 finite differences), the fused block
//! against the per-op paths, a frozen base through the trainer, adapter-only vars and
//! checkpoints, merging, the zero-`B` start, the storage-sharing KL reference, and PEFT-format
//! adapters tied to their base. All models are tiny and built here.

use std::path::PathBuf;

use candle_core::{DType, Device, Storage, Tensor};
use pgrpo::lm::{Grad, Kernels, Llama, LlamaConfig, LmPolicy, LoraConfig, LoraTarget};
use pgrpo::lm::{SamplingConfig, TokenIds};
use pgrpo::{Error, GroupKey, GroupedPrompt, LossAggregation, Policy, Trainer, TrainerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn config(bias: bool, tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: 31,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tied,
        attention_bias: Some(bias),
        eos_token_id: Some(TokenIds::One(3)),
        ..Default::default()
    }
}

fn base(bias: bool, tied: bool, dtype: DType, seed: u64) -> Llama {
    let mut rng = StdRng::seed_from_u64(seed);
    Llama::new(config(bias, tied), &mut rng, &Device::Cpu, dtype).unwrap()
}

fn all_targets(r: usize, dropout: f64) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout,
        target_modules: LoraTarget::ALL.to_vec(),
    }
}

/// Sets every adapter factor (B included) to O(1/√fan-in) random values, so that every
/// adapter gradient is far from zero.
fn randomise_adapters(m: &Llama, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, v) in m.named_adapter_vars() {
        let dims = v.dims().to_vec();
        let s = 1.0 / (dims[1] as f64).sqrt();
        let n = dims[0] * dims[1];
        let data: Vec<f64> = (0..n).map(|_| rng.random_range(-s..s)).collect();
        let t = Tensor::from_vec(data, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        v.set(&t).unwrap();
    }
}

fn batch() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    (
        vec![vec![5, 9, 17, 30, 2], vec![7], vec![11, 12, 29]],
        vec![vec![8, 21, 1], vec![21, 22, 23, 24], vec![6]],
    )
}

fn slices(v: &[Vec<u32>]) -> Vec<&[u32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// `Σ logp ⊙ mask ⊙ w` with fixed weights `w`, so every position matters.
fn loss(m: &Llama, grad: Grad) -> Tensor {
    let (p, c) = batch();
    let lp = m
        .token_log_probs(&slices(&p), &slices(&c), grad, false)
        .unwrap();
    let n = lp.logp.elem_count();
    let w = Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(lp.logp.dtype())
        .unwrap()
        .reshape(lp.logp.dims())
        .unwrap()
        .cos()
        .unwrap();
    (&lp.logp * &lp.mask)
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_f64(a), to_f64(b));
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())) + 1e-30;
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    to_f64(a)
        .iter()
        .zip(to_f64(b))
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

/// In f64, the analytic gradient of every adapter factor matches central finite differences
/// (eight entries of every `A` and `B`, with and without dropout, with q/k/v biases and
/// untied head or not), every adapter gets a non-zero gradient, and no base weight gets one.
#[test]
fn adapter_gradients_match_finite_differences_in_f64() {
    for (bias, tied, dropout) in [(false, true, 0.0), (true, false, 0.0), (false, true, 0.3)] {
        for kernels in [Kernels::Reference, Kernels::FusedOps] {
            let mut rng = StdRng::seed_from_u64(40);
            let m = base(bias, tied, DType::F64, 1)
                .with_kernels(kernels)
                .with_lora(all_targets(2, dropout), &mut rng)
                .unwrap();
            randomise_adapters(&m, 2);
            // Each forward draws its dropout masks from the call counter: pin it so that
            // every evaluation sees the same masks.
            let eval = |m: &Llama| {
                m.set_lora_dropout_calls(5);
                loss(m, Grad::Track)
            };
            let grads = eval(&m).backward().unwrap();
            for (name, var) in m.named_vars() {
                assert!(
                    grads.get(&var).is_none(),
                    "{name}: frozen, but got a gradient"
                );
            }
            let named = m.named_adapter_vars();
            assert_eq!(named.len(), 2 * 7 * 2);
            let h = 1e-5;
            for (name, var) in &named {
                let g = to_f64(grads.get(var).unwrap_or_else(|| panic!("{name}: no grad")));
                assert!(g.iter().any(|x| *x != 0.0), "{name}: zero gradient");
                let x0 = to_f64(var.as_tensor());
                // Errors relative to the tensor's largest gradient entry (entries near zero
                // would otherwise measure only finite-difference rounding).
                let scale = g.iter().fold(0f64, |m, x| m.max(x.abs()));
                let mut worst = 0f64;
                // Eight entries spread over each tensor (all of them would take minutes).
                let picks: Vec<usize> = (0..8).map(|k| (2 * k + 1) * x0.len() / 16).collect();
                for &i in &picks {
                    let at = |d: f64| {
                        let mut x = x0.clone();
                        x[i] += d;
                        var.set(&Tensor::from_vec(x, var.dims(), &Device::Cpu).unwrap())
                            .unwrap();
                        scalar(&eval(&m))
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    worst = worst.max((fd - g[i]).abs() / scale);
                }
                var.set(&Tensor::from_vec(x0, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                assert!(
                    worst < 1e-7,
                    "{name} ({kernels:?}, bias {bias}, dropout {dropout}): relative error {worst}"
                );
            }
        }
    }
}

/// In f32, the fused whole-block node with adapters gives the log-probs and adapter
/// gradients of the per-op fused kernels and of candle's stock ops, with and without
/// dropout (same masks on every path), and the frozen base weights get no gradient.
#[test]
fn fused_block_with_adapters_matches_the_per_op_paths() {
    for (bias, tied, dropout) in [(false, true, 0.0), (true, false, 0.0), (true, true, 0.25)] {
        let mut rng = StdRng::seed_from_u64(50);
        let fused = base(bias, tied, DType::F32, 3)
            .with_lora(all_targets(4, dropout), &mut rng)
            .unwrap();
        randomise_adapters(&fused, 4);
        assert_eq!(fused.kernels(), Kernels::Fused);
        let run = |m: &Llama| {
            m.set_lora_dropout_calls(0);
            let l = loss(m, Grad::Track);
            (scalar(&l), l.backward().unwrap())
        };
        let (lf, gf) = run(&fused);
        for other in [Kernels::FusedOps, Kernels::Reference] {
            let m = fused.clone().with_kernels(other);
            let (lo, go) = run(&m);
            assert!(
                (lf - lo).abs() < 1e-4 * lo.abs().max(1.0),
                "{other:?}: loss {lf} vs {lo}"
            );
            for (name, var) in fused.named_adapter_vars() {
                let r = max_rel(gf.get(&var).unwrap(), go.get(&var).unwrap());
                assert!(r < 2e-4, "{name} vs {other:?} (dropout {dropout}): {r}");
            }
            for (name, var) in fused.named_vars() {
                assert!(gf.get(&var).is_none(), "{name}: frozen, but got a gradient");
            }
        }
        // Dropout changes the result, and only the training path.
        if dropout > 0.0 {
            let plain = fused.clone();
            plain.set_lora_dropout_calls(0);
            let a = scalar(&loss(&plain, Grad::Track));
            let b = scalar(&loss(&plain, Grad::Track)); // next call, new masks
            assert_ne!(a, b);
            let d1 = scalar(&loss(&plain, Grad::Detached));
            let d2 = scalar(&loss(&plain, Grad::Detached));
            assert_eq!(d1, d2);
        }
    }
}

/// Fresh adapters (`B = 0`) give exactly the base model's log-probs, on the training path
/// (fused block and reference kernels) and the detached path, and sample the same tokens.
#[test]
fn zero_b_start_gives_exactly_the_base_log_probs() {
    for kernels in [Kernels::Fused, Kernels::Reference] {
        let plain = base(true, false, DType::F32, 5).with_kernels(kernels);
        let lora = plain
            .clone()
            .with_lora(all_targets(8, 0.0), &mut StdRng::seed_from_u64(6))
            .unwrap();
        for grad in [Grad::Track, Grad::Detached] {
            let a = scalar(&loss(&plain, grad));
            let b = scalar(&loss(&lora, grad));
            assert_eq!(a.to_bits(), b.to_bits(), "{kernels:?} {grad:?}");
        }
        let cfg = SamplingConfig {
            max_new_tokens: 6,
            ..Default::default()
        };
        let (p, _) = batch();
        let s1 = plain
            .generate(&slices(&p), 3, &cfg, &mut StdRng::seed_from_u64(9))
            .unwrap();
        let s2 = lora
            .generate(&slices(&p), 3, &cfg, &mut StdRng::seed_from_u64(9))
            .unwrap();
        assert_eq!(s1, s2);
    }
}

/// The merged model (`W + (α/r)·B A`) gives the log-probs of base + adapters to 1e-5, on
/// every path, also after a save / load round trip of the merged HF directory; and the
/// adapted model differs from the base by far more than that.
#[test]
fn merged_model_matches_base_plus_adapters() {
    let mut rng = StdRng::seed_from_u64(7);
    let lora = base(false, true, DType::F32, 8)
        .with_lora(all_targets(4, 0.0), &mut rng)
        .unwrap();
    randomise_adapters(&lora, 9);
    let merged = lora.merged().unwrap();
    assert!(!merged.has_adapters() && !merged.is_frozen());
    let (p, c) = batch();
    let lp = |m: &Llama, g: Grad| {
        let t = m
            .token_log_probs(&slices(&p), &slices(&c), g, false)
            .unwrap();
        (t.logp * t.mask).unwrap()
    };
    let want = lp(&lora, Grad::Track);
    for g in [Grad::Track, Grad::Detached] {
        assert!(max_abs(&lp(&merged, g), &want) < 1e-5, "{g:?}");
        assert!(max_abs(&lp(&lora, g), &want) < 1e-5, "{g:?}");
    }
    let base_lp = lp(&lora.without_adapters(), Grad::Detached);
    assert!(
        max_abs(&base_lp, &want) > 1e-2,
        "the adapters should matter"
    );

    let dir = temp_dir("merged");
    let policy = LmPolicy::new(lora.clone(), None);
    policy.save_hf_dir(&dir).unwrap();
    let loaded = LmPolicy::from_hf_dir(&dir, &Device::Cpu).unwrap();
    assert!(!loaded.model().has_adapters());
    assert!(max_abs(&lp(loaded.model(), Grad::Track), &want) < 1e-5);
    let _ = std::fs::remove_dir_all(&dir);
}

fn storage_ptr(t: &Tensor) -> usize {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => match c {
            candle_core::CpuStorage::F32(v) => v.as_ptr() as usize + 4 * l.start_offset(),
            _ => panic!("f32 expected"),
        },
        _ => panic!("cpu expected"),
    }
}

/// `Policy::snapshot` of a LoRA policy (the KL reference) holds no vars, shares every base
/// weight's storage with the policy (no copy), computes the base model's log-probs (adapters
/// off), and does not follow adapter updates.
#[test]
fn snapshot_shares_the_base_and_has_adapters_off() {
    let plain = base(false, true, DType::F32, 10);
    let policy = LmPolicy::new(plain.clone(), None)
        .with_lora(all_targets(4, 0.0), &mut StdRng::seed_from_u64(11))
        .unwrap();
    randomise_adapters(policy.model(), 12);
    let snap = policy.snapshot().unwrap();
    assert!(snap.vars().is_empty());
    assert!(!snap.model().has_adapters());
    for ((n1, v1), (_, v2)) in policy
        .model()
        .named_vars()
        .iter()
        .zip(snap.model().named_vars())
    {
        assert_eq!(
            storage_ptr(v1.as_tensor()),
            storage_ptr(v2.as_tensor()),
            "{n1} was copied"
        );
    }
    let (p, c) = batch();
    let rows: Vec<&Vec<u32>> = p.iter().collect();
    let lp = |x: &LmPolicy| {
        let t = x.log_probs_detached(&rows, &c).unwrap();
        (t.logp * t.mask).unwrap()
    };
    let base_policy = LmPolicy::new(plain, None);
    assert_eq!(max_abs(&lp(&snap), &lp(&base_policy)), 0.0);
    assert!(max_abs(&lp(&snap), &lp(&policy)) > 1e-2);
    // An adapter update moves the policy, not the reference.
    let before = lp(&snap);
    randomise_adapters(policy.model(), 13);
    assert_eq!(max_abs(&lp(&snap), &before), 0.0);
}

#[allow(clippy::ptr_arg)]
fn spread(_p: &Vec<u32>, c: &Vec<u32>, _g: &GroupKey) -> f32 {
    c.iter()
        .enumerate()
        .map(|(i, &t)| (t as f32 + 1.0) * (i as f32 + 1.0).sqrt())
        .sum::<f32>()
        / 50.0
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn lora_policy(seed: u64, lora: LoraConfig) -> LmPolicy {
    LmPolicy::new(base(true, false, DType::F32, seed), None)
        .with_sampling(SamplingConfig {
            max_new_tokens: 5,
            ..Default::default()
        })
        .unwrap()
        .with_lora(lora, &mut StdRng::seed_from_u64(seed + 100))
        .unwrap()
}

fn trainer_config(beta: f32) -> TrainerConfig {
    let mut cfg = TrainerConfig {
        num_generations: 4,
        learning_rate: 1e-2,
        seed: 3,
        ..Default::default()
    };
    cfg.objective.beta = beta;
    cfg
}

fn prompts() -> Vec<GroupedPrompt<Vec<u32>>> {
    vec![
        GroupedPrompt::new(vec![1, 4, 5, 9], "a"),
        GroupedPrompt::new(vec![1, 6], "b"),
    ]
}

/// Five trainer steps (GRPO with and without the KL term, dropout on) move every adapter and
/// leave every base weight bit-identical.
#[test]
fn base_weights_do_not_move_through_the_trainer() {
    for (beta, dropout) in [(0.0, 0.0), (0.1, 0.1)] {
        let lora = LoraConfig {
            dropout,
            ..all_targets(4, 0.0)
        };
        let policy = lora_policy(20, lora);
        let base_before: Vec<Vec<u32>> = policy
            .model()
            .named_vars()
            .iter()
            .map(|(_, v)| bits(v.as_tensor()))
            .collect();
        let adapters_before: Vec<Vec<u32>> =
            policy.vars().iter().map(|v| bits(v.as_tensor())).collect();
        let mut trainer = Trainer::new(policy, spread, trainer_config(beta)).unwrap();
        for _ in 0..5 {
            trainer.step(&prompts()).unwrap();
        }
        let after = trainer.policy();
        for ((name, v), b) in after.model().named_vars().iter().zip(&base_before) {
            assert_eq!(&bits(v.as_tensor()), b, "{name} moved (beta {beta})");
        }
        for ((name, v), b) in after
            .model()
            .named_adapter_vars()
            .iter()
            .zip(&adapters_before)
        {
            assert_ne!(&bits(v.as_tensor()), b, "{name} did not move (beta {beta})");
        }
    }
}

/// TR-DPO's reference sync mixes the reference's weights toward the policy's; a LoRA
/// policy's reference is its base with the adapters off, sharing the frozen weights, so there
/// is nothing to mix: the trainer refuses it when built (TRL refuses PEFT models too), and
/// accumulates a LoRA policy's gradients like any other.
#[test]
fn reference_sync_is_refused_for_lora_and_accumulation_works() {
    let mut cfg = trainer_config(0.1);
    cfg.sync_ref_model = true;
    let err = Trainer::new(lora_policy(21, all_targets(4, 0.0)), spread, cfg)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig { field: "sync_ref_model", reason } if reason.contains("LoRA")),
        "{err}"
    );
    let grads = |ga: usize, aggregation: LossAggregation| -> Vec<f32> {
        let mut cfg = trainer_config(0.1);
        cfg.gradient_accumulation_steps = ga;
        cfg.objective.aggregation = aggregation;
        let mut t = Trainer::new(lora_policy(22, all_targets(4, 0.0)), spread, cfg).unwrap();
        randomise_adapters(t.policy().model(), 5);
        let batch = prompts();
        let r = t.rollout(&batch).unwrap();
        t.gradients(&r)
            .unwrap()
            .iter()
            .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    for aggregation in LossAggregation::ALL {
        let (one, acc) = (grads(1, aggregation), grads(3, aggregation));
        let scale = one.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0);
        for (a, b) in one.iter().zip(&acc) {
            assert!((a - b).abs() <= 1e-5 * scale, "{aggregation:?}: {a} vs {b}");
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgrpo-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `Policy::vars` of a LoRA policy is the adapters (A `(r, in)`, B `(out, r)` for each
/// targeted projection), and a trainer checkpoint's `model.safetensors` holds exactly those
/// tensors; it resumes onto a fresh LoRA policy and steps on. With the KL term on,
/// `reference.safetensors` holds no tensor: the reference is the frozen base, rebuilt by
/// `snapshot`. (Resuming that needs the checkpoint loader to accept an empty reference; see
/// docs/lora.md.)
#[test]
fn vars_and_trainer_checkpoints_hold_only_adapters() {
    let lora = LoraConfig {
        r: 3,
        target_modules: vec![LoraTarget::VProj, LoraTarget::QProj, LoraTarget::DownProj],
        ..Default::default()
    };
    let policy = lora_policy(30, lora.clone());
    let c = config(true, false);
    let (h, q, kv) = (24, 24, 12);
    let mut want = Vec::new();
    for _ in 0..c.num_hidden_layers {
        for (out, inp) in [(q, h), (kv, h), (h, c.intermediate_size)] {
            want.push(vec![3, inp]);
            want.push(vec![out, 3]);
        }
    }
    let got: Vec<Vec<usize>> = policy.vars().iter().map(|v| v.dims().to_vec()).collect();
    assert_eq!(got, want);

    let mut trainer = Trainer::new(policy.clone(), spread, trainer_config(0.0)).unwrap();
    trainer.step(&prompts()).unwrap();
    let dir = temp_dir("ckpt");
    let path = trainer.save(&dir).unwrap();
    let model =
        candle_core::safetensors::load(path.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(model.len(), want.len());
    let mut shapes: Vec<Vec<usize>> = model.values().map(|t| t.dims().to_vec()).collect();
    let mut sorted_want = want.clone();
    shapes.sort();
    sorted_want.sort();
    assert_eq!(shapes, sorted_want);
    assert!(!path.join("reference.safetensors").exists());
    // Resume onto a fresh LoRA policy over the same base, and step on.
    let lora_for_kl = lora.clone();
    let fresh = lora_policy(30, lora);
    let mut resumed = Trainer::resume(&path, fresh, spread).unwrap();
    for (a, b) in resumed.policy().vars().iter().zip(trainer.policy().vars()) {
        assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()));
    }
    resumed.step(&prompts()).unwrap();

    // KL on: the reference is saved, and holds nothing.
    let kl = Trainer::new(policy, spread, trainer_config(0.05)).unwrap();
    assert!(kl.reference().unwrap().vars().is_empty());
    let kl_dir = temp_dir("ckpt-kl");
    let path = kl.save(&kl_dir).unwrap();
    let r =
        candle_core::safetensors::load(path.join("reference.safetensors"), &Device::Cpu).unwrap();
    assert!(r.is_empty(), "the reference should hold no tensors");
    // ... and resumes: the reference is the fresh policy's base with adapters off.
    let mut kl = kl;
    let next = kl.step(&prompts()).unwrap();
    let fresh = lora_policy(30, lora_for_kl.clone());
    let mut resumed = Trainer::resume(&path, fresh, spread).unwrap();
    assert!(resumed.reference().unwrap().vars().is_empty());
    assert_eq!(resumed.step(&prompts()).unwrap().values, next.values);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&kl_dir);
}

/// Adapters saved in PEFT's format (config, tensor names, shapes, base fingerprint) load back
/// onto the same base with bit-identical log-probs; onto another base they are a typed
/// error, as are a corrupted config and unsupported PEFT features.
#[test]
fn adapter_files_round_trip_and_refuse_a_wrong_base() {
    let lora = LoraConfig {
        r: 4,
        alpha: 16.0,
        dropout: 0.05,
        target_modules: vec![LoraTarget::QProj, LoraTarget::UpProj],
    };
    let policy = lora_policy(40, lora.clone());
    randomise_adapters(policy.model(), 41);
    let dir = temp_dir("adapter");
    policy.save_adapter(&dir).unwrap();

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "up_proj"])
    );
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names.len(), 2 * 2 * 2);
    assert!(names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(names.contains(&"base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"));
    let up_b = st
        .tensor("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
        .unwrap();
    assert_eq!(up_b.shape(), &[40, 4]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    assert_eq!(
        meta["pgrpo.base_sha256"],
        policy.model().base_sha256().unwrap()
    );

    // Same base (rebuilt from its seed): identical log-probs.
    let loaded = LmPolicy::new(base(true, false, DType::F32, 40), None)
        .with_adapter(&dir)
        .unwrap();
    let got = loaded.model().lora_config().unwrap();
    assert_eq!((got.r, got.alpha, got.dropout), (4, 16.0, 0.05));
    assert_eq!(got.target_modules, lora.target_modules);
    let (p, c) = batch();
    let rows: Vec<&Vec<u32>> = p.iter().collect();
    let lp = |x: &LmPolicy| {
        let t = x.log_probs_detached(&rows, &c).unwrap();
        bits(&(t.logp * t.mask).unwrap())
    };
    assert_eq!(lp(&loaded), lp(&policy));
    assert_eq!(loaded.vars().len(), policy.vars().len());

    // Another base: typed error naming both fingerprints.
    let err = LmPolicy::new(base(true, false, DType::F32, 41), None)
        .with_adapter(&dir)
        .unwrap_err();
    match &err {
        Error::AdapterBase {
            expected, found, ..
        } => assert_ne!(expected, found),
        other => panic!("expected AdapterBase, got {other:?}"),
    }
    assert!(err.to_string().contains("load the base it was trained on"));

    // A base with one weight nudged is another base too.
    let nudged = base(true, false, DType::F32, 40);
    let (name, v) = &nudged.named_vars()[2];
    assert!(name.ends_with("q_proj.weight"));
    v.set(&(v.as_tensor() * 1.0001).unwrap()).unwrap();
    assert!(matches!(
        LmPolicy::new(nudged, None).with_adapter(&dir),
        Err(Error::AdapterBase { .. })
    ));

    // PEFT features we do not implement are refused by name.
    let mut dora = cfg.clone();
    dora["use_dora"] = serde_json::json!(true);
    std::fs::write(dir.join("adapter_config.json"), dora.to_string()).unwrap();
    let err = LmPolicy::new(base(true, false, DType::F32, 40), None)
        .with_adapter(&dir)
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedModel(m) if m.contains("use_dora")),
        "{err}"
    );
    // A config whose rank contradicts the tensors.
    let mut wrong_r = cfg.clone();
    wrong_r["r"] = serde_json::json!(5);
    std::fs::write(dir.join("adapter_config.json"), wrong_r.to_string()).unwrap();
    assert!(matches!(
        LmPolicy::new(base(true, false, DType::F32, 40), None).with_adapter(&dir),
        Err(Error::TensorShape { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The config validates its fields and serialises with documented defaults; LoRA needs an
/// f32/f64 model without adapters.
#[test]
fn config_validation_and_defaults() {
    let d = LoraConfig::default();
    assert_eq!(
        (d.r, d.alpha, d.dropout),
        (8, 8.0, 0.0),
        "PEFT's LoraConfig defaults"
    );
    assert_eq!(d.target_modules, vec![LoraTarget::QProj, LoraTarget::VProj]);
    let back: LoraConfig = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
    assert_eq!(back, d);
    assert!(serde_json::from_str::<LoraConfig>(r#"{"rank": 4}"#).is_err());
    for bad in [
        LoraConfig { r: 0, ..d.clone() },
        LoraConfig {
            dropout: 1.0,
            ..d.clone()
        },
        LoraConfig {
            alpha: f64::NAN,
            ..d.clone()
        },
        LoraConfig {
            target_modules: vec![],
            ..d.clone()
        },
        LoraConfig {
            target_modules: vec![LoraTarget::QProj, LoraTarget::QProj],
            ..d.clone()
        },
    ] {
        assert!(matches!(bad.validate(), Err(Error::InvalidConfig { .. })));
    }
    let mut rng = StdRng::seed_from_u64(0);
    let once = base(false, true, DType::F32, 1)
        .with_lora(d.clone(), &mut rng)
        .unwrap();
    assert!(matches!(
        once.with_lora(d.clone(), &mut rng),
        Err(Error::UnsupportedModel(_))
    ));
    assert!(matches!(
        base(false, true, DType::BF16, 1).with_lora(d, &mut rng),
        Err(Error::UnsupportedModel(_))
    ));
    // A is Kaiming-uniform within ±1/√in; B starts at zero.
    let m = base(false, true, DType::F32, 2)
        .with_lora(all_targets(8, 0.0), &mut rng)
        .unwrap();
    for (name, v) in m.named_adapter_vars() {
        let x = to_f64(v.as_tensor());
        if name.contains("lora_B") {
            assert!(x.iter().all(|&e| e == 0.0), "{name}");
        } else {
            let bound = 1.0 / (v.dims()[1] as f64).sqrt();
            assert!(x.iter().all(|e| e.abs() <= bound), "{name}");
            assert!(x.iter().any(|e| e.abs() > 0.5 * bound), "{name}");
        }
    }
}

/// A LoRA trainer's checkpoint records its base model's fingerprint (`policy.json`):
/// resuming the adapters onto another base is a typed error naming that file; onto the same
/// base (loaded again) it resumes.
#[test]
fn a_lora_checkpoint_refuses_another_base() {
    let dir = temp_dir("identity");
    let mut t = Trainer::new(
        lora_policy(31, all_targets(4, 0.0)),
        spread,
        trainer_config(0.0),
    )
    .unwrap();
    t.step(&prompts()).unwrap();
    let path = t.save(&dir).unwrap();
    let identity = std::fs::read_to_string(path.join("policy.json")).unwrap();
    assert!(identity.contains("lora_base_sha256"), "{identity}");
    let err = Trainer::resume(&path, lora_policy(32, all_targets(4, 0.0)), spread)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Checkpoint { path, .. } if path.ends_with("policy.json")),
        "{err}"
    );
    let again = Trainer::resume(&path, lora_policy(31, all_targets(4, 0.0)), spread).unwrap();
    assert_eq!(again.steps_done(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
