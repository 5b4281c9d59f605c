//! Greedy KV-cache sampling: 8 prompts of 16 tokens, 32 new tokens each, on the 10M shape,
//! fused kernels against candle's stock no-grad kernels, in generated tokens per second.
//!
//! `cargo bench --bench sampling` (about half a minute). The comparison with PyTorch is
//! `cargo bench --bench vs_pytorch -- sample`. On a GPU: `PGRPO_BENCH_DEVICE=cuda` with
//! `--features cuda` (group `generate_greedy_f32_cuda`; off the CPU both kernel sets run
//! candle's own ops, see `pgrpo::ops`).

use std::time::Duration;

use candle_core::DType;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrpo::lm::{Kernels, Llama, LlamaConfig, SamplingConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "common/device.rs"]
mod device;

fn sampling(c: &mut Criterion) {
    let dev = device::bench_device();
    let cfg = LlamaConfig {
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 10,
        num_attention_heads: 4,
        // The 10M shape of benches/train_step.rs: 4 K/V heads (the default, 3, divides only
        // SmolLM2's 9 query heads and fails the config check).
        num_key_value_heads: Some(4),
        vocab_size: 8192,
        tie_word_embeddings: true,
        eos_token_id: None,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(5);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|_| (0..16).map(|_| rng.random_range(0..8192)).collect())
        .collect();
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let sampling = SamplingConfig {
        max_new_tokens: 32,
        temperature: 0.0,
        stop_tokens: Some(vec![]),
        ..Default::default()
    };
    let mut group = c.benchmark_group(device::group_name("generate_greedy_f32", &dev));
    group.throughput(Throughput::Elements(8 * 32));
    for kernels in [Kernels::Fused, Kernels::Reference] {
        let model = Llama::new(cfg.clone(), &mut StdRng::seed_from_u64(0), &dev, DType::F32)
            .expect("model")
            .with_kernels(kernels);
        group.bench_function(BenchmarkId::new(format!("{kernels:?}"), "10M"), |b| {
            b.iter(|| {
                let out = model
                    .generate(&p, 1, &sampling, &mut StdRng::seed_from_u64(0))
                    .expect("generate");
                dev.synchronize().expect("synchronize");
                out
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = sampling
}
criterion_main!(benches);
