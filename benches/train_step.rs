//! Training step (forward + backward + global-norm clip + AdamW) of a Llama-shaped model on
//! 32 sequences × 48 tokens, `f32`, with each kernel set ([`Kernels`]).
//!
//! `cargo bench --bench train_step` (about a minute). The comparison with PyTorch is
//! `cargo bench --bench vs_pytorch -- step`. On a GPU: `PGRPO_BENCH_DEVICE=cuda` with
//! `--features cuda` (group `train_step_f32_cuda`; off the CPU every kernel set runs candle's
//! own ops, see `pgrpo::ops`).

use std::time::Duration;

use candle_core::DType;
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrpo::lm::{Grad, Kernels, Llama, LlamaConfig};
use pgrpo::optim::{clip_grad_norm, AdamW, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/device.rs"]
mod device;

const BATCH: usize = 32;
const SEQ: usize = 48;

fn shapes() -> [(&'static str, LlamaConfig); 2] {
    let llama = |h: usize, f: usize, layers: usize, heads: usize, vocab: usize| LlamaConfig {
        hidden_size: h,
        intermediate_size: f,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(heads),
        vocab_size: vocab,
        tie_word_embeddings: true,
        eos_token_id: None,
        ..Default::default()
    };
    [
        ("0.86M", llama(128, 344, 4, 2, 512)),
        ("10M", llama(256, 688, 10, 4, 8192)),
    ]
}

fn train_step(c: &mut Criterion) {
    let dev = device::bench_device();
    let mut group = c.benchmark_group(device::group_name("train_step_f32", &dev));
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    for (name, cfg) in shapes() {
        let mut rng = StdRng::seed_from_u64(0);
        let v = cfg.vocab_size as u32;
        let seqs: Vec<Vec<u32>> = (0..BATCH)
            .map(|_| (0..=SEQ).map(|_| rng.random_range(0..v)).collect())
            .collect();
        let prompts: Vec<&[u32]> = seqs.iter().map(|s| &s[..1]).collect();
        let completions: Vec<&[u32]> = seqs.iter().map(|s| &s[1..]).collect();
        for kernels in [Kernels::Fused, Kernels::FusedOps, Kernels::Reference] {
            let model = Llama::new(cfg.clone(), &mut StdRng::seed_from_u64(1), &dev, DType::F32)
                .expect("model")
                .with_kernels(kernels);
            let vars = model.vars();
            let mut opt =
                <AdamW as Optimizer>::new(vars.clone(), ParamsAdamW::default()).expect("adamw");
            let id = BenchmarkId::new(format!("{kernels:?}"), name);
            group.bench_function(id, |b| {
                b.iter(|| {
                    let lp = model
                        .token_log_probs(&prompts, &completions, Grad::Track, false)
                        .expect("log-probs");
                    let loss = (lp.logp.sum_all().expect("sum") * (-1.0 / (BATCH * SEQ) as f64))
                        .expect("loss");
                    let mut grads = loss.backward().expect("backward");
                    clip_grad_norm(&vars, &mut grads, 1.0).expect("clip");
                    opt.step(&grads).expect("step");
                    // A GPU queues its kernels: time the step to its end (a no-op on the CPU).
                    dev.synchronize().expect("synchronize");
                })
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = train_step
}
criterion_main!(benches);
