//! Greedy KV-cache sampling: 8 prompts of 16 tokens, 32 new tokens each, on the 10M shape,
//! fused kernels against candle's stock no-grad kernels, in generated tokens per second.
//!
//! `cargo bench --bench sampling` (about half a minute). The comparison with PyTorch is
//! `cargo bench --bench vs_pytorch -- sample`. On a GPU: `PGRPO_BENCH_DEVICE=cuda` with
//! `--features cuda` (group `generate_greedy_f32_cuda`; off the CPU both kernel sets run
//! candle's own ops, see `pgrpo::ops`).
//!
//! `PGRPO_SAMPLING=smollm2 cargo bench --bench sampling` instead decodes with SmolLM2-135M
//! (`models/SmolLM2-135M-Instruct.Q4_1.gguf`, dequantised to f32; `scripts/fetch-smollm2.sh`)
//! at 2 prompts × 4 and 8 × 8 completions of 32 new tokens (no stop token, so every row
//! decodes 32 steps; temperature 1, seed fixed), alternating in every round (`PGRPO_SAMPLING_ROUNDS`,
//! default 3, after a warm-up round; the order rotates) between: f32 weights with the skinny kernel up to 16 rows for every shape
//! (the old threshold), f32 with the current thresholds (skinny up to 64 rows for the wide
//! down projection), and bf16 decode weights ([`DecodePrecision::Bf16`]). It prints the
//! median total sampling time, the prefill (a 1-token `generate`), the decode time per step
//! `(total − prefill) / 31`, generated tokens per second, and the fraction of sampled
//! tokens equal, position by position under the same seed, to the first variant's.

use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use pgrpo::lm::{DecodePrecision, Kernels, Llama, LlamaConfig, LmPolicy, SamplingConfig};
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

#[path = "common/smollm2.rs"]
mod smollm2;
use smollm2::{GGUF, QUESTIONS};

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The SmolLM2-135M decode table (see the module docs).
fn smollm2() -> pgrpo::Result<()> {
    use std::time::Instant;
    if !std::path::Path::new(GGUF).exists() {
        eprintln!("{GGUF} is missing: run scripts/fetch-smollm2.sh first");
        return Ok(());
    }
    let policy = LmPolicy::from_gguf(GGUF, &Device::Cpu)?;
    let model = policy.model();
    let rounds: usize = std::env::var("PGRPO_SAMPLING_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let new_tokens = 32;
    // (name, wide-matrix skinny row limit, decode weights)
    let variants = [
        ("f32, skinny ≤ 16 rows (old)", 16, DecodePrecision::F32),
        (
            "f32, skinny ≤ 64 rows for down_proj",
            64,
            DecodePrecision::F32,
        ),
        ("bf16 decode weights", 64, DecodePrecision::Bf16),
    ];
    println!(
        "threads {}, load before {}",
        rayon::current_num_threads(),
        load_avg()
    );
    println!("| prompts × G | rows | variant | sampling ms | prefill ms | decode ms/step | tokens/s | tokens equal to first variant | load |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (np, g) in [(2usize, 4usize), (8, 8)] {
        let prompts = QUESTIONS[..np]
            .iter()
            .map(|q| policy.chat_prompt(q))
            .collect::<pgrpo::Result<Vec<_>>>()?;
        let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let cfg = |max_new_tokens: usize, decode_weights: DecodePrecision| SamplingConfig {
            max_new_tokens,
            temperature: 1.0,
            stop_tokens: Some(vec![]),
            decode_weights,
            ..Default::default()
        };
        let mut total = vec![Vec::new(); variants.len()];
        let mut prefill = vec![Vec::new(); variants.len()];
        let mut tokens: Vec<Vec<Vec<u32>>> = vec![Vec::new(); variants.len()];
        for round in 0..=rounds {
            // The order rotates from round to round, so no variant always runs first.
            for k in 0..variants.len() {
                let v = (k + round) % variants.len();
                let (_, wide, prec) = variants[v];
                pgrpo::ops::set_skinny_rows_wide(wide);
                let t = Instant::now();
                model.generate(&p, g, &cfg(1, prec), &mut StdRng::seed_from_u64(0))?;
                let t1 = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let out =
                    model.generate(&p, g, &cfg(new_tokens, prec), &mut StdRng::seed_from_u64(0))?;
                let tn = t.elapsed().as_secs_f64();
                if round > 0 {
                    // Round 0 warms up.
                    prefill[v].push(t1);
                    total[v].push(tn);
                }
                tokens[v] = out;
            }
        }
        pgrpo::ops::set_skinny_rows_wide(64);
        for (v, (name, _, _)) in variants.iter().enumerate() {
            let (tot, pre) = (median(total[v].clone()), median(prefill[v].clone()));
            let step = (tot - pre) / (new_tokens - 1) as f64;
            let gen = (np * g * new_tokens) as f64;
            let (mut same, mut all) = (0usize, 0usize);
            for (a, b) in tokens[v].iter().zip(&tokens[0]) {
                same += a.iter().zip(b).filter(|(x, y)| x == y).count();
                all += a.len().max(b.len());
            }
            println!(
                "| {np} × {g} | {} | {name} | {:.0} | {:.0} | {:.1} | {:.0} | {:.3} | {} |",
                np * g,
                tot * 1e3,
                pre * 1e3,
                step * 1e3,
                gen / tot,
                same as f64 / all as f64,
                load_avg()
            );
        }
    }
    Ok(())
}

fn main() {
    if std::env::var("PGRPO_SAMPLING").as_deref() == Ok("smollm2") {
        smollm2().expect("SmolLM2 decode table");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
