//! One AdamW step over a Llama parameter set: pgrpo's fused in-place [`AdamW`] against
//! `candle_nn::AdamW` (same numbers, bit for bit), and the global-norm clip.
//!
//! `cargo bench --bench optimizer` (about half a minute). The 135M comparison with PyTorch is
//! `cargo bench --bench vs_pytorch -- optimizer`.

use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgrpo::lm::{Llama, LlamaConfig};
use pgrpo::optim::{clip_grad_norm, AdamW, ParamsAdamW};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The 30M shape of the speed table (29.5M parameters, 74 tensors).
fn model() -> Llama {
    let cfg = LlamaConfig {
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        vocab_size: 8192,
        tie_word_embeddings: true,
        ..Default::default()
    };
    Llama::new(cfg, &mut StdRng::seed_from_u64(0), &Device::Cpu, DType::F32).expect("model")
}

fn grads(model: &Llama) -> GradStore {
    let mut g = GradStore::default();
    for v in model.vars() {
        let t = Tensor::full(1e-3f32, v.shape(), &Device::Cpu).expect("grad");
        g.insert(v.as_tensor(), t);
    }
    g
}

fn adamw_step(c: &mut Criterion) {
    let model = model();
    let n: usize = model.vars().iter().map(|v| v.elem_count()).sum();
    let g = grads(&model);
    let p = ParamsAdamW::default();
    let mut group = c.benchmark_group("adamw_step_f32");
    group.throughput(Throughput::Elements(n as u64));
    let mut ours = <AdamW as Optimizer>::new(model.vars(), p.clone()).expect("adamw");
    group.bench_function(BenchmarkId::new("pgrpo", "29.5M"), |b| {
        b.iter(|| ours.step(&g).expect("step"))
    });
    let mut stock = candle_nn::AdamW::new(model.vars(), p).expect("adamw");
    group.bench_function(BenchmarkId::new("candle_nn", "29.5M"), |b| {
        b.iter(|| stock.step(&g).expect("step"))
    });
    group.finish();
}

fn clip(c: &mut Criterion) {
    let model = model();
    let vars = model.vars();
    let n: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut group = c.benchmark_group("clip_grad_norm_f32");
    group.throughput(Throughput::Elements(n as u64));
    let mut g = grads(&model);
    group.bench_function(BenchmarkId::from_parameter("29.5M"), |b| {
        // The norm is far above 1e9, so every call scales (by ~1): the full cost.
        b.iter(|| clip_grad_norm(&vars, &mut g, 1e-9).expect("clip"))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = adamw_step, clip
}
criterion_main!(benches);
