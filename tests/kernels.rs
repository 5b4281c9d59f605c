//! The fused kernels ([`pgrpo::ops`], [`Kernels::Fused`]) against candle's stock
//! differentiable ops ([`Kernels::Reference`]) on whole models: log-probs, entropy, every
//! var's gradient, KV-cache sampling, with padding on both sides and grouped-query attention.
//! (Each kernel also has its own gradient test next to it in `src/ops/`.)

use candle_core::{DType, Device, Tensor};
use pgrpo::lm::{Grad, Kernels, Llama, LlamaConfig, SamplingConfig, TokenIds};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn config(bias: bool, tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 48,
        intermediate_size: 80,
        num_hidden_layers: 3,
        num_attention_heads: 6,
        num_key_value_heads: Some(2),
        vocab_size: 97,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: tied,
        attention_bias: Some(bias),
        eos_token_id: Some(TokenIds::One(3)),
        ..Default::default()
    }
}

/// A model whose weights are O(1)-scaled so that every gradient is far from trivial.
fn model(bias: bool, tied: bool, seed: u64) -> Llama {
    let mut rng = StdRng::seed_from_u64(seed);
    let m = Llama::new(config(bias, tied), &mut rng, &Device::Cpu, DType::F32).unwrap();
    for (name, var) in m.named_vars() {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let s = if name.ends_with("norm.weight") || name.ends_with("bias") {
            0.3
        } else if name.contains("embed") {
            1.0
        } else {
            1.5 / (dims[1] as f32).sqrt()
        };
        let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-s..s)).collect();
        if name.ends_with("norm.weight") {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        var.set(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap())
            .unwrap();
    }
    m
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) + 1e-12;
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Left-padded prompts and right-padded completions.
fn batch() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    (
        vec![
            vec![5, 9, 17, 40, 2, 8],
            vec![7],
            vec![11, 12, 96],
            vec![4, 4],
        ],
        vec![
            vec![8, 30, 1],
            vec![21, 22, 23, 24, 25],
            vec![50],
            vec![60, 61],
        ],
    )
}

#[test]
fn fused_log_probs_entropy_and_every_gradient_match_the_reference() {
    for (bias, tied) in [(false, true), (true, false)] {
        let fused = model(bias, tied, 1);
        assert_eq!(fused.kernels(), Kernels::Fused);
        let reference = fused.clone().with_kernels(Kernels::Reference);
        let per_op = fused.clone().with_kernels(Kernels::FusedOps);
        let (p, c) = batch();
        let (p, c): (Vec<&[u32]>, Vec<&[u32]>) = (
            p.iter().map(Vec::as_slice).collect(),
            c.iter().map(Vec::as_slice).collect(),
        );
        let run = |m: &Llama| {
            let lp = m.token_log_probs(&p, &c, Grad::Track, true).unwrap();
            let w = Tensor::arange(0f32, lp.logp.elem_count() as f32, &Device::Cpu)
                .unwrap()
                .reshape(lp.logp.dims())
                .unwrap()
                .cos()
                .unwrap();
            let loss = (&lp.logp * &lp.mask)
                .unwrap()
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            (lp, grads)
        };
        let (lf, gf) = run(&fused);
        let (lr, gr) = run(&reference);
        let (lo, go) = run(&per_op);
        // The whole-block node against the per-op kernels it is built from.
        assert!(
            rel(
                &(&lf.logp * &lf.mask).unwrap(),
                &(&lo.logp * &lo.mask).unwrap()
            ) < 2e-6
        );
        for (name, var) in fused.named_vars() {
            let r = rel(gf.get(&var).unwrap(), go.get(&var).unwrap());
            assert!(
                r < 1e-4,
                "{name}: block vs per-op relative gradient difference {r}"
            );
        }
        let masked = |t: &Tensor, m: &Tensor| (t * m).unwrap();
        assert!(rel(&masked(&lf.logp, &lf.mask), &masked(&lr.logp, &lr.mask)) < 2e-6);
        assert!(rel(&lf.entropy.unwrap(), &lr.entropy.unwrap()) < 2e-6);
        for (name, var) in fused.named_vars() {
            let (a, b) = (gf.get(&var), gr.get(&var));
            let (a, b) = (
                a.unwrap_or_else(|| panic!("no fused gradient for {name}")),
                b.unwrap(),
            );
            let r = rel(a, b);
            assert!(r < 1e-4, "{name}: relative gradient difference {r}");
            let norm = a
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name}: zero gradient");
        }
    }
}

#[test]
fn fused_and_reference_sample_the_same_tokens_with_the_kv_cache() {
    let fused = model(true, true, 2);
    let reference = fused.clone().with_kernels(Kernels::Reference);
    let prompts: Vec<&[u32]> = vec![&[5, 9, 17], &[7], &[11, 12, 96, 40, 41]];
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 0.0,
        stop_tokens: Some(vec![]),
        ..Default::default()
    };
    let a = fused
        .generate(&prompts, 2, &cfg, &mut StdRng::seed_from_u64(3))
        .unwrap();
    let b = reference
        .generate(&prompts, 2, &cfg, &mut StdRng::seed_from_u64(3))
        .unwrap();
    assert_eq!(a, b);
    // And the cached logits equal a full recompute under the fused kernels.
    let ids = Tensor::new(&[[5u32, 9, 17, 30, 31, 32]], &Device::Cpu).unwrap();
    let full = fused.forward_detached(&ids, None).unwrap();
    let mut cache = fused.new_cache();
    let pre = fused
        .forward_cached(&ids.narrow(1, 0, 3).unwrap(), None, &mut cache)
        .unwrap();
    let mut steps = vec![pre];
    for i in 3..6 {
        steps.push(
            fused
                .forward_cached(&ids.narrow(1, i, 1).unwrap(), None, &mut cache)
                .unwrap(),
        );
    }
    let inc = Tensor::cat(&steps, 1).unwrap();
    assert!(rel(&inc, &full) < 1e-5);
}
