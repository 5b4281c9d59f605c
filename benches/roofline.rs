//! Roofline of pgrpo's two halves of a GRPO step on SmolLM2-135M (issue 15, targets 2 and 3),
//! against limits measured on the same machine in the same run:
//!
//! ```text
//! cargo bench --bench roofline                 # machine, decode, update (about 4 minutes on 2 cores)
//! cargo bench --bench roofline -- machine      # one or more parts: machine | decode | update
//! PGRPO_ROOF_THREADS=2 PGRPO_ROOF_REPS=3 PGRPO_ROOF_SETTINGS=2x4,8x8 cargo bench --bench roofline
//! ```
//!
//! - **machine**: streaming read bandwidth (sum of a 1 GiB `f32` array), copy bandwidth (1 GiB
//!   to 1 GiB), and `f32` GEMM throughput through pgrpo's own GEMM path
//!   ([`pgrpo::ops::linear`], i.e. the `gemm` crate with rayon parallelism) on a 2048³ product
//!   and on the update's real projection shapes. Best of several repetitions. Both limits are
//!   measured again before `decode` and before `update`, and each ratio divides by the best
//!   limit measured so far in the run (interference on a shared machine only lowers them).
//! - **decode**: milliseconds per decode step for 8 rows (2 prompts × 4) and 64 rows (8 × 8),
//!   prefill excluded: `generate` with `max_new_tokens` 33 minus `generate` with 1, over 32,
//!   with stop tokens off (every row runs to the end). The bytes a step must read are every
//!   weight once (the tied embedding read once, as the LM head) plus the KV cache at the
//!   average context of the 32 steps (the padded width the kernels read), in the model's
//!   dtype; achieved GB/s and the ratio to the measured read bandwidth. At 8 rows a second
//!   row decodes with bf16 decode weights (`DecodePrecision::Bf16`: the weights counted at 2
//!   bytes, the KV cache at 4; the once-per-call conversion is inside the 32 steps). Then a profile of one
//!   step at the average context, each piece timed alone with the model's weights.
//! - **update**: forward (`Policy::log_probs` with the fused kernels, entropy included, and the
//!   clipped objective) + backward + global-norm clip + pgrpo's AdamW, the calls
//!   `Trainer::update` makes, for the same rows with chat-formatted prompts and 32 completion
//!   tokens each. FLOPs are counted from the shapes (every GEMM `2·m·n·k` forward, twice that
//!   backward; the LM head over completion positions only; attention's `QKᵀ` and `PV` over
//!   the full padded square, as the kernel computes them), computed and useful (real tokens,
//!   causal pairs) apart; achieved GFLOP/s and the ratio to the measured 2048³ GEMM.
//!
//! Uses `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-smollm2.sh`), dequantised to
//! `f32` as pgrpo trains it; without the file, the same configuration with random weights and
//! synthetic prompts of the same lengths (said in the output). Every table prints the load
//! average; on a shared machine interference only adds time, hence best-of.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use pgrpo::lm::{DecodePrecision, Llama, LlamaConfig, LmPolicy, SamplingConfig};
use pgrpo::optim::{clip_grad_norm, AdamW, ParamsAdamW};
use pgrpo::{clipped_objective, ObjectiveConfig, ObjectiveInputs, Policy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

#[path = "common/proc.rs"]
#[allow(dead_code)] // peak_rss_mb: not used here
mod proc;
use proc::load_avg;

#[path = "common/smollm2.rs"]
mod smollm2;
use smollm2::{GGUF, QUESTIONS};
/// (prompts, G) of the vs_trl settings, or those of `PGRPO_ROOF_SETTINGS` (e.g. `2x4`).
fn settings() -> Vec<(usize, usize)> {
    let s = std::env::var("PGRPO_ROOF_SETTINGS").unwrap_or_else(|_| "2x4,8x8".into());
    s.split(',')
        .filter_map(|x| {
            let (p, g) = x.split_once('x')?;
            let (p, g) = (p.trim().parse().ok()?, g.trim().parse().ok()?);
            (1..=QUESTIONS.len()).contains(&p).then_some((p, g))
        })
        .collect()
}
const NEW_TOKENS: usize = 32;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether to print the profiles (`PGRPO_ROOF_PROFILE=0`: the headline tables only, e.g. under
/// `perf record`).
fn profile_on() -> bool {
    std::env::var("PGRPO_ROOF_PROFILE").map_or(true, |v| v != "0")
}

/// Fastest of `reps` runs of `f`, in seconds.
fn best<F: FnMut() -> Res<()>>(reps: usize, mut f: F) -> Res<f64> {
    let mut b = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        b = b.min(t.elapsed().as_secs_f64());
    }
    Ok(b)
}

/// What the machine does: GB/s and GFLOP/s.
struct Machine {
    read_gbs: f64,
    gemm_gflops: f64,
}

// ---------------------------------------------------------------- machine

/// Sum of a slice with 16 independent lanes (vectorises without reassociation licence).
#[inline(always)]
fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_sum_avx2(x: &[f32]) -> f32 {
    lanes_sum(x)
}

fn chunk_sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { lanes_sum_avx2(x) };
    }
    lanes_sum(x)
}

/// Streaming read and copy bandwidth in GB/s (best of `reps`) over 1 GiB arrays.
fn bandwidth(reps: usize, threads: usize) -> (f64, f64) {
    const LEN: usize = 1 << 28; // 1 GiB of f32
    let chunk = LEN / (threads * 64);
    let mut a = vec![0f32; LEN];
    a.par_chunks_mut(chunk).enumerate().for_each(|(c, s)| {
        s.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = ((c * 7 + i) % 13) as f32)
    });
    let mut sink = 0f32;
    let mut read = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        sink += a.par_chunks(chunk).map(chunk_sum).sum::<f32>();
        read = read.min(t.elapsed().as_secs_f64());
    }
    let mut b = vec![1f32; LEN];
    let mut copy = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        b.par_chunks_mut(chunk)
            .zip(a.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        copy = copy.min(t.elapsed().as_secs_f64());
    }
    sink += b[LEN / 3];
    std::hint::black_box(sink);
    let bytes = (LEN * 4) as f64;
    (bytes / read / 1e9, 2.0 * bytes / copy / 1e9)
}

/// GFLOP/s and seconds of `y = x·Wᵀ` through `pgrpo::ops::linear`, `x: (m, k)`, `W: (n, k)`,
/// best of `reps` after a warm-up.
fn gemm_rate(m: usize, n: usize, k: usize, reps: usize) -> Res<(f64, f64)> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    pgrpo::ops::linear(&x, &w)?; // warm-up
    let t = best(reps, || {
        pgrpo::ops::linear(&x, &w)?;
        Ok(())
    })?;
    Ok((2.0 * (m * n * k) as f64 / t / 1e9, t))
}

impl Machine {
    /// Measures the limits again and keeps the best of the run (interference on a shared
    /// machine only lowers them), printing what this measurement gave.
    fn refresh(&mut self, threads: usize, before: &str) -> Res<()> {
        let (read, _) = bandwidth(3, threads);
        let (gemm, _) = gemm_rate(2048, 2048, 2048, 2)?;
        self.read_gbs = self.read_gbs.max(read);
        self.gemm_gflops = self.gemm_gflops.max(gemm);
        println!(
            "Limits re-measured before {before}: read {read:.1} GB/s, GEMM 2048³ {gemm:.1} GFLOP/s; \
             used below (best of the run): **{:.1} GB/s**, **{:.1} GFLOP/s** (load {}).\n",
            self.read_gbs,
            self.gemm_gflops,
            load_avg()
        );
        Ok(())
    }
}

fn machine(reps: usize, threads: usize) -> Res<Machine> {
    let (read_gbs, copy_gbs) = bandwidth(reps + 2, threads);

    // GEMMs through pgrpo's linear (y = x·Wᵀ): the 2048³ square and the update's shapes at
    // 64 rows × 72 positions (the 8 × 8 setting's 4608 token rows; LM head over 64 × 32).
    let c = LlamaConfig::default();
    let (h, f, kv, v) = (c.hidden_size, c.intermediate_size, 192, c.vocab_size);
    let shapes: [(&str, usize, usize, usize); 6] = [
        ("2048 × 2048 × 2048", 2048, 2048, 2048),
        ("q/o proj 4608 × 576 × 576", 4608, h, h),
        ("k/v proj 4608 × 192 × 576", 4608, kv, h),
        ("gate/up 4608 × 1536 × 576", 4608, f, h),
        ("down 4608 × 576 × 1536", 4608, h, f),
        ("LM head 2048 × 49152 × 576", 2048, v, h),
    ];
    let mut rows = Vec::new();
    for (name, m, n, k) in shapes {
        let (g, t) = gemm_rate(m, n, k, reps)?;
        rows.push((name, g, t));
    }
    let gemm_gflops = rows[0].1;
    println!(
        "## Machine ({threads} threads, best of {} / {reps})\n",
        reps + 2
    );
    println!("| measure | value | load |");
    println!("|---|---|---|");
    println!(
        "| streaming read, sum of 1 GiB f32 | **{read_gbs:.1} GB/s** | {} |",
        load_avg()
    );
    println!(
        "| copy 1 GiB → 1 GiB (read + write bytes) | {copy_gbs:.1} GB/s | {} |",
        load_avg()
    );
    for (name, g, t) in &rows {
        let bold = if *name == rows[0].0 { "**" } else { "" };
        println!(
            "| f32 GEMM (pgrpo::ops::linear) {name} | {bold}{g:.1} GFLOP/s{bold} ({:.1} ms) | {} |",
            t * 1e3,
            load_avg()
        );
    }
    println!();
    Ok(Machine {
        read_gbs,
        gemm_gflops,
    })
}

// ---------------------------------------------------------------- model and prompts

struct Model {
    policy: LmPolicy,
    real: bool,
}

fn load() -> Res<Model> {
    if std::path::Path::new(GGUF).exists() {
        let policy = LmPolicy::from_gguf(GGUF, &Device::Cpu)?;
        return Ok(Model { policy, real: true });
    }
    eprintln!("{GGUF} is missing (scripts/fetch-smollm2.sh): random weights, synthetic prompts");
    let model = Llama::new(
        LlamaConfig::default(),
        &mut StdRng::seed_from_u64(0),
        &Device::Cpu,
        DType::F32,
    )?;
    Ok(Model {
        policy: LmPolicy::new(model, None),
        real: false,
    })
}

/// The chat-formatted prompts of vs_trl, or synthetic ones of similar lengths.
fn prompts(m: &Model, n: usize) -> Res<Vec<Vec<u32>>> {
    let mut rng = StdRng::seed_from_u64(7);
    QUESTIONS[..n]
        .iter()
        .enumerate()
        .map(|(i, q)| {
            if m.real {
                Ok(m.policy.chat_prompt(q)?)
            } else {
                Ok((0..31 + i % 5)
                    .map(|_| rng.random_range(3..49152))
                    .collect())
            }
        })
        .collect()
}

fn source(m: &Model) -> &'static str {
    if m.real {
        "SmolLM2-135M-Instruct (GGUF, dequantised)"
    } else {
        "**random weights** (GGUF missing), SmolLM2-135M config"
    }
}

// ---------------------------------------------------------------- decode

fn decode(m: &Model, mach: Option<&Machine>, reps: usize) -> Res<()> {
    let model = m.policy.model();
    let cfg = model.config().clone();
    let dsize = model.dtype().size_in_bytes();
    let tensors = model.tensors();
    // Every weight once: the tied embedding counts once, as the LM head (the lookup reads B rows).
    let weight_elems: usize = tensors.values().map(|t| t.elem_count()).sum();
    let (l, nkv, hd) = (cfg.num_hidden_layers, cfg.num_kv_heads(), cfg.head_dim());
    println!(
        "## Decode: {}, {:?}, {} new tokens, T = 1, stop tokens off\n",
        source(m),
        model.dtype(),
        NEW_TOKENS
    );
    println!("| rows | prompt width (padded) | avg context | ms / step | MB read / step (weights + KV) | achieved GB/s | read bandwidth GB/s (best of run) | **achieved / bandwidth limit** | target ≥ 70% | GFLOP / step | compute floor ms (at the 2048³ GEMM rate) | roofline floor ms = max(bytes / bandwidth, FLOPs / GEMM rate) | floor / measured | load |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut profiles = Vec::new();
    for (p, g) in settings() {
        let ps = prompts(m, p)?;
        let refs: Vec<&[u32]> = ps.iter().map(|q| q.as_slice()).collect();
        let width = ps.iter().map(Vec::len).max().unwrap_or(0);
        let rows = p * g;
        // bf16 decode weights apply to steps of at most 16 rows (`DecodePrecision::Bf16`).
        let precisions: &[DecodePrecision] = if rows <= 16 {
            &[DecodePrecision::F32, DecodePrecision::Bf16]
        } else {
            &[DecodePrecision::F32]
        };
        for &prec in precisions {
            // The projections and the LM head are read in bf16 under `Bf16` (the norms' few
            // weights stay f32: counted as bf16, a 0.03% error); the KV cache stays f32.
            let wsize = if prec == DecodePrecision::Bf16 {
                2
            } else {
                dsize
            };
            let mk = |n| SamplingConfig {
                max_new_tokens: n,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                stop_tokens: Some(Vec::new()),
                decode_weights: prec,
                ..Default::default()
            };
            let (c1, c33) = (mk(1), mk(NEW_TOKENS + 1));
            let run = |c: &SamplingConfig| -> Res<()> {
                let out = model.generate(&refs, g, c, &mut StdRng::seed_from_u64(1))?;
                assert!(out.iter().all(|o| o.len() == c.max_new_tokens));
                Ok(())
            };
            run(&c1)?; // warm-up
            let reps_here = if rows > 8 {
                reps.saturating_sub(1).max(1)
            } else {
                reps
            };
            let t1 = best(reps_here + 1, || run(&c1))?;
            let t33 = best(reps_here, || run(&c33))?;
            let step = (t33 - t1) / NEW_TOKENS as f64;
            // Step s (1..=32) attends over width + s cached columns.
            let avg_ctx = width as f64 + (NEW_TOKENS as f64 + 1.0) / 2.0;
            let kv_bytes = 2.0 * (l * rows * nkv * hd) as f64 * avg_ctx * dsize as f64;
            let bytes = (weight_elems * wsize) as f64 + kv_bytes;
            let gbs = bytes / step / 1e9;
            // FLOPs of the step: every projection and the LM head per row, QKᵀ and PV over the context.
            let per_tok = 2.0 * ((weight_elems - cfg.vocab_size * cfg.hidden_size) as f64)
                + 2.0 * (cfg.vocab_size * cfg.hidden_size) as f64
                + l as f64 * cfg.num_attention_heads as f64 * 4.0 * hd as f64 * avg_ctx;
            let flops = rows as f64 * per_tok;
            let floors = match mach {
                Some(mm) => {
                    let (mem, comp) = (bytes / (mm.read_gbs * 1e9), flops / (mm.gemm_gflops * 1e9));
                    format!(
                        "{:.1} | {:.1} ({}) | {:.0}%",
                        comp * 1e3,
                        mem.max(comp) * 1e3,
                        if mem >= comp { "memory" } else { "compute" },
                        100.0 * mem.max(comp) / step
                    )
                }
                None => "– | – | –".into(),
            };
            let (lim, ratio, met) = match mach {
                Some(mm) => {
                    let r = gbs / mm.read_gbs;
                    (
                        format!("{:.1}", mm.read_gbs),
                        format!("**{:.0}%**", 100.0 * r),
                        if r >= 0.7 { "met" } else { "**not met**" },
                    )
                }
                None => ("–".into(), "– (run `machine` too)".into(), "–"),
            };
            println!(
            "| {rows} ({p} × {g}){} | {width} | {avg_ctx:.1} | {:.1} | {:.1} ({:.1} + {:.1}) | {gbs:.1} | {lim} | {ratio} | {met} | {:.1} | {floors} | {} |",
            if prec == DecodePrecision::Bf16 { ", bf16 decode weights" } else { "" },
            step * 1e3,
            bytes / 1e6,
            (weight_elems * wsize) as f64 / 1e6,
            kv_bytes / 1e6,
            flops / 1e9,
            load_avg()
        );
            if prec == DecodePrecision::F32 {
                profiles.push((rows, width + NEW_TOKENS / 2 + 1, step));
            }
        }
    }
    println!();
    for (rows, ctx, step) in profiles.into_iter().filter(|_| profile_on()) {
        decode_profile(m, rows, ctx, step, reps)?;
    }
    Ok(())
}

/// One decode step's pieces at `rows` rows and `ctx` cached columns, each timed alone (best of
/// `reps`, summed over the 30 blocks) with the model's weights, as shares of the measured step.
fn decode_profile(m: &Model, rows: usize, ctx: usize, step: f64, reps: usize) -> Res<()> {
    use pgrpo::ops;
    let model = m.policy.model();
    let cfg = model.config().clone();
    let tensors = model.tensors();
    let dev = Device::Cpu;
    let (l, h, f, nh, nkv, hd, v) = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
        cfg.vocab_size,
    );
    let w = |name: String| tensors[&name].clone();
    let layer = |i: usize, p: &str| w(format!("model.layers.{i}.{p}.weight"));
    let x = Tensor::randn(0f32, 1.0, (rows, h), &dev)?;
    let xf = Tensor::randn(0f32, 1.0, (rows, f), &dev)?;
    let proj = |i: usize| -> Res<()> {
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ] {
            ops::linear(&x, &layer(i, p))?;
        }
        ops::linear(&xf, &layer(i, "mlp.down_proj"))?;
        Ok(())
    };
    let t_proj = best(reps, || (0..l).try_for_each(proj))?;
    let head = w("model.embed_tokens.weight".into());
    let head = tensors
        .get("lm_head.weight")
        .cloned()
        .unwrap_or(head.clone());
    let t_head = best(reps, || {
        ops::linear(&x, &head)?;
        Ok(())
    })?;
    // Attention over ctx columns, and the KV-cache append (a concatenation per step).
    let q = Tensor::randn(0f32, 1.0, (rows, 1, nh, hd), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (rows, ctx, nkv, hd), &dev)?;
    let vv = Tensor::randn(0f32, 1.0, (rows, ctx, nkv, hd), &dev)?;
    let mask = Tensor::zeros((rows, 1, ctx), DType::F32, &dev)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let t_attn = best(reps, || {
        for _ in 0..l {
            ops::attention(&q, &k, &vv, &mask, scale)?;
        }
        Ok(())
    })?;
    let pk = k.narrow(1, 0, ctx - 1)?.contiguous()?;
    let nk = k.narrow(1, ctx - 1, 1)?.contiguous()?;
    let t_cat = best(reps, || {
        for _ in 0..2 * l {
            Tensor::cat(&[&pk, &nk], 1)?;
        }
        Ok(())
    })?;
    // Norms, RoPE, SwiGLU, residual adds.
    let nw = w("model.norm.weight".into());
    let qf = q.reshape((rows, 1, nh, hd))?;
    let kf = Tensor::randn(0f32, 1.0, (rows, 1, nkv, hd), &dev)?;
    let cos = Tensor::randn(0f32, 1.0, (rows, 1, hd / 2), &dev)?;
    let sin = Tensor::randn(0f32, 1.0, (rows, 1, hd / 2), &dev)?;
    let t_elem = best(reps, || {
        for _ in 0..l {
            ops::rms_norm(&x, &nw, 1e-5)?;
            ops::rms_norm(&x, &nw, 1e-5)?;
            ops::rope(&qf, &cos, &sin)?;
            ops::rope(&kf, &cos, &sin)?;
            ops::swiglu(&xf, &xf)?;
            (&x + &x)?;
            (&x + &x)?;
        }
        ops::rms_norm(&x, &nw, 1e-5)?;
        Ok(())
    })?;
    // Sampling: logits to host rows, then one draw per row over the whole vocabulary.
    let logits = (Tensor::randn(0f32, 1.0, (rows, v), &dev)? * 3.0)?;
    let scfg = SamplingConfig {
        temperature: 1.0,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(3);
    let t_copy = best(reps, || {
        logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(())
    })?;
    let host = logits.to_vec2::<f32>()?;
    let t_sample = best(reps, || {
        for r in &host {
            pgrpo::lm::sample_token(r, &scfg, &mut rng)?;
        }
        Ok(())
    })?;
    let parts = [
        ("block projections (7 × 30 matmuls)", t_proj),
        ("LM head (tied embedding, 49152 × 576)", t_head),
        ("attention (30 layers)", t_attn),
        ("KV-cache append (cat of K and V, 30 layers)", t_cat),
        (
            "RMSNorm ×61, RoPE ×60, SwiGLU ×30, residual adds ×60",
            t_elem,
        ),
        ("logits → host rows (`to_vec2`)", t_copy),
        ("sampling (`sample_token`, all rows)", t_sample),
    ];
    // Lever probe (not what decode runs): above 16 rows `ops::linear` goes through `gemm`,
    // which packs every weight matrix on every call; the same products as 16-row calls take
    // the skinny path, which streams each weight row once per call.
    let probe = if rows > 16 {
        let chunks: Vec<(Tensor, Tensor)> = (0..rows)
            .step_by(16)
            .map(|r| {
                let n = 16.min(rows - r);
                Ok((
                    x.narrow(0, r, n)?.contiguous()?,
                    xf.narrow(0, r, n)?.contiguous()?,
                ))
            })
            .collect::<Res<_>>()?;
        let t = best(reps, || {
            for (xc, xfc) in &chunks {
                for i in 0..l {
                    for p in [
                        "self_attn.q_proj",
                        "self_attn.k_proj",
                        "self_attn.v_proj",
                        "self_attn.o_proj",
                        "mlp.gate_proj",
                        "mlp.up_proj",
                    ] {
                        ops::linear(xc, &layer(i, p))?;
                    }
                    ops::linear(xfc, &layer(i, "mlp.down_proj"))?;
                }
                ops::linear(xc, &head)?;
            }
            Ok(())
        })?;
        Some((chunks.len(), t))
    } else {
        None
    };
    let sum: f64 = parts.iter().map(|p| p.1).sum();
    println!(
        "### Decode step profile, {rows} rows, context {ctx} (pieces timed alone, best of {reps})\n"
    );
    println!("| piece | ms | share of the measured step |");
    println!("|---|---|---|");
    for (name, t) in parts {
        println!("| {name} | {:.2} | {:.0}% |", t * 1e3, 100.0 * t / step);
    }
    println!(
        "| rest (embedding lookup, mask and RoPE tables, graph and allocation; step − pieces) | {:.2} | {:.0}% |",
        (step - sum) * 1e3,
        100.0 * (step - sum) / step
    );
    println!(
        "| **measured step** | **{:.2}** | 100% (load {}) |",
        step * 1e3,
        load_avg()
    );
    if let Some((calls, t)) = probe {
        println!(
            "| *lever probe, not the code path*: projections + LM head as {calls} calls of ≤ 16 rows (skinny path) instead of one `gemm` call | {:.2} | {:.0}% (vs {:.2} ms as decode runs them) |",
            t * 1e3,
            100.0 * t / step,
            (t_proj + t_head) * 1e3
        );
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------- update

/// Forward FLOPs of the update: (computed, useful). Backward is twice each.
struct Flops {
    gemm: f64,
    attn: f64,
    head: f64,
    useful: f64,
}

fn update_flops(cfg: &LlamaConfig, prompt_lens: &[usize], c: usize) -> Flops {
    let (l, h, f, nh, nkv, hd, v) = (
        cfg.num_hidden_layers as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.num_attention_heads as f64,
        cfg.num_kv_heads() as f64,
        cfg.head_dim() as f64,
        cfg.vocab_size as f64,
    );
    let b = prompt_lens.len() as f64;
    let p = *prompt_lens.iter().max().unwrap_or(&0);
    let t = (p + c - 1) as f64;
    // q, k, v, o, gate, up, down per token.
    let per_tok = 2.0 * h * (nh * hd + 2.0 * nkv * hd + nh * hd) + 2.0 * 3.0 * h * f;
    let gemm = b * t * l * per_tok;
    // QKᵀ and PV: 2·T·T·hd each per head, over the full padded square.
    let attn = l * b * nh * 4.0 * t * t * hd;
    let head = 2.0 * b * c as f64 * h * v;
    // Useful: real tokens only (prompt + c − 1 fed), causal pairs among them.
    let useful: f64 = prompt_lens
        .iter()
        .map(|&q| {
            let n = (q + c - 1) as f64;
            n * l * per_tok + l * nh * 4.0 * hd * n * (n + 1.0) / 2.0 + 2.0 * c as f64 * h * v
        })
        .sum();
    Flops {
        gemm,
        attn,
        head,
        useful,
    }
}

fn update(m: &Model, mach: Option<&Machine>, reps: usize) -> Res<()> {
    let policy = &m.policy;
    let cfg = policy.model().config().clone();
    let vars = policy.vars();
    let mut opt = <AdamW as Optimizer>::new(
        vars.clone(),
        ParamsAdamW {
            lr: 1e-6,
            ..Default::default()
        },
    )?;
    let ocfg = ObjectiveConfig::default();
    println!(
        "## Update: {}, f32, forward + backward + clip + AdamW, {NEW_TOKENS} completion tokens per row\n",
        source(m)
    );
    println!("| rows | tokens computed (B × T) | useful | forward s | backward s | clip s | AdamW s | **update s** | GFLOP / step computed (useful) | achieved GFLOP/s | GEMM 2048³ GFLOP/s (best of run) | achieved / GEMM | target ≥ 80% | load |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rng = StdRng::seed_from_u64(11);
    let mut profiles = Vec::new();
    let mut warmed = false;
    for (p, g) in settings() {
        let ps = prompts(m, p)?;
        let rows = p * g;
        let prompt_rows: Vec<&Vec<u32>> = (0..rows).map(|r| &ps[r / g]).collect();
        let completions: Vec<Vec<u32>> = (0..rows)
            .map(|_| {
                (0..NEW_TOKENS)
                    .map(|_| rng.random_range(3..cfg.vocab_size as u32))
                    .collect()
            })
            .collect();
        let adv: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0..1.0)).collect();
        let adv = Tensor::from_vec(adv, rows, &Device::Cpu)?;
        let mut times = [f64::INFINITY; 4];
        let n = if rows > 8 { reps.min(2) } else { reps } + usize::from(!warmed);
        for i in 0..n {
            let t0 = Instant::now();
            let lp = policy.log_probs(&prompt_rows, &completions)?;
            let old = lp.logp.detach();
            let out =
                clipped_objective(&ocfg, &ObjectiveInputs::new(&lp.logp, &old, &lp.mask, &adv))?;
            let t1 = Instant::now();
            let mut grads = out.loss.backward()?;
            drop(out);
            drop(lp);
            let t2 = Instant::now();
            clip_grad_norm(&vars, &mut grads, 1.0)?;
            let t3 = Instant::now();
            opt.step(&grads)?;
            let t4 = Instant::now();
            if i == 0 && !warmed {
                warmed = true; // AdamW's first step allocates its moments
                continue;
            }
            let d = [t1 - t0, t2 - t1, t3 - t2, t4 - t3].map(|d| d.as_secs_f64());
            if d.iter().sum::<f64>() < times.iter().sum::<f64>() {
                times = d;
            }
        }
        let total: f64 = times.iter().sum();
        let lens: Vec<usize> = prompt_rows.iter().map(|q| q.len()).collect();
        let fl = update_flops(&cfg, &lens, NEW_TOKENS);
        let computed = 3.0 * (fl.gemm + fl.attn + fl.head);
        let useful = 3.0 * fl.useful;
        let width = lens.iter().max().copied().unwrap_or(0) + NEW_TOKENS - 1;
        let real: usize = lens.iter().map(|q| q + NEW_TOKENS - 1).sum();
        let gfs = computed / total / 1e9;
        let (lim, ratio, met) = match mach {
            Some(mm) => {
                let r = gfs / mm.gemm_gflops;
                (
                    format!("{:.1}", mm.gemm_gflops),
                    format!("**{:.0}%**", 100.0 * r),
                    if r >= 0.8 { "met" } else { "**not met**" },
                )
            }
            None => ("–".into(), "– (run `machine` too)".into(), "–"),
        };
        println!(
            "| {rows} ({p} × {g}) | {} ({rows} × {width}) | {real} | {:.3} | {:.3} | {:.3} | {:.3} | **{total:.3}** | {:.1} ({:.1}) | {gfs:.1} | {lim} | {ratio} | {met} | {} |",
            rows * width,
            times[0],
            times[1],
            times[2],
            times[3],
            computed / 1e9,
            useful / 1e9,
            load_avg()
        );
        profiles.push((rows, width, total, times, fl));
    }
    println!();
    for (rows, width, total, times, fl) in profiles.into_iter().filter(|_| profile_on()) {
        update_profile(&cfg, &vars, rows, width, total, times, &fl, reps)?;
    }
    Ok(())
}

/// Where the update's time goes: the GEMMs of its shapes timed alone (forward, and forward +
/// backward of one `linear` node), scaled by their count, against the measured phases.
#[allow(clippy::too_many_arguments)]
fn update_profile(
    cfg: &LlamaConfig,
    vars: &[candle_core::Var],
    rows: usize,
    width: usize,
    total: f64,
    times: [f64; 4],
    fl: &Flops,
    reps: usize,
) -> Res<()> {
    let dev = Device::Cpu;
    let (l, h, f, nkv, hd, v) = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_kv_heads(),
        cfg.head_dim(),
        cfg.vocab_size,
    );
    let m_tok = rows * width;
    // (name, m, out, in, count per step)
    let shapes = [
        ("q, o", m_tok, h, h, 2 * l),
        ("k, v", m_tok, nkv * hd, h, 2 * l),
        ("gate, up", m_tok, f, h, 2 * l),
        ("down", m_tok, h, f, l),
        ("LM head", rows * NEW_TOKENS, v, h, 1),
    ];
    let reps = reps.min(2);
    println!(
        "### Update profile, {rows} rows × {width} positions (GEMMs timed alone through `pgrpo::ops::linear`, best of {reps}, × count)\n"
    );
    println!("| piece | count | fwd ms each | fwd+bwd ms each | s per step | GFLOP/s | share of update |");
    println!("|---|---|---|---|---|---|---|");
    let mut gemm_fwd = 0.0;
    let mut gemm_all = 0.0;
    for (name, m, out, inp, count) in shapes {
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, inp), &dev)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.05, (out, inp), &dev)?)?;
        let tf = best(reps, || {
            pgrpo::ops::linear(x.as_tensor(), w.as_tensor())?;
            Ok(())
        })?;
        let tb = best(reps, || {
            pgrpo::ops::linear(x.as_tensor(), w.as_tensor())?.backward()?;
            Ok(())
        })?;
        let s = tb * count as f64;
        gemm_fwd += tf * count as f64;
        gemm_all += s;
        println!(
            "| {name} ({m} × {out} × {inp}) | {count} | {:.1} | {:.1} | {s:.3} | {:.1} | {:.0}% |",
            tf * 1e3,
            tb * 1e3,
            6.0 * (m * out * inp) as f64 / tb / 1e9,
            100.0 * s / total
        );
    }
    // candle's backprop sums every gradient into a fresh `zeros_like` (one add per
    // contribution, even the first): that cost over every parameter, timed alone.
    let t_acc = best(reps, || {
        for v in vars {
            let z = v.as_tensor().zeros_like()?;
            std::hint::black_box(z.add(v.as_tensor())?);
        }
        Ok(())
    })?;
    let attn_flops = 3.0 * fl.attn;
    println!(
        "| **all projection + LM-head GEMMs** (fwd {:.3} s, bwd {:.3} s) | | | | **{gemm_all:.3}** | {:.1} | **{:.0}%** |",
        gemm_fwd,
        gemm_all - gemm_fwd,
        3.0 * (fl.gemm + fl.head) / gemm_all / 1e9,
        100.0 * gemm_all / total
    );
    println!(
        "| forward, measured (log-probs + entropy + objective) | | | | {:.3} | | {:.0}% |",
        times[0],
        100.0 * times[0] / total
    );
    println!(
        "| backward, measured | | | | {:.3} | | {:.0}% |",
        times[1],
        100.0 * times[1] / total
    );
    println!(
        "| of which, inside backward: candle's gradient accumulation (`zeros_like` + `add` once per parameter tensor, {} tensors), timed alone | | | | {t_acc:.3} | | {:.0}% |",
        vars.len(),
        100.0 * t_acc / total
    );
    println!(
        "| clip (global norm) + AdamW, measured | | | | {:.3} | | {:.0}% |",
        times[2] + times[3],
        100.0 * (times[2] + times[3]) / total
    );
    println!(
        "| everything but the projection/LM-head GEMMs (attention {:.1} GFLOP, norms, RoPE, SwiGLU, log-softmax, entropy, graph, clip, AdamW) | | | | {:.3} | | {:.0}% |",
        attn_flops / 1e9,
        total - gemm_all,
        100.0 * (total - gemm_all) / total
    );
    println!(
        "| **measured update** | | | | **{total:.3}** | | 100% (load {}) |\n",
        load_avg()
    );
    Ok(())
}

// ---------------------------------------------------------------- main

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo bench -- --list`
    }
    let threads = env_usize("PGRPO_ROOF_THREADS", 2);
    let reps = env_usize("PGRPO_ROOF_REPS", 3);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let all = ["machine", "decode", "update"];
    let parts: Vec<&str> = if args.is_empty() {
        all.to_vec()
    } else {
        all.iter()
            .copied()
            .filter(|p| args.iter().any(|a| a == p))
            .collect()
    };
    println!(
        "# pgrpo roofline ({threads} rayon threads; load average at start {})\n",
        load_avg()
    );
    let t = Instant::now();
    let mut mach = if parts.contains(&"machine") {
        Some(machine(reps, threads)?)
    } else {
        None
    };
    if parts.contains(&"decode") || parts.contains(&"update") {
        let m = load()?;
        if parts.contains(&"decode") {
            if let Some(mm) = mach.as_mut() {
                mm.refresh(threads, "decode")?;
            }
            decode(&m, mach.as_ref(), reps)?;
        }
        if parts.contains(&"update") {
            if let Some(mm) = mach.as_mut() {
                mm.refresh(threads, "update")?;
            }
            update(&m, mach.as_ref(), reps)?;
        }
    }
    println!(
        "(whole run {:.0} s; load average at the end {})",
        t.elapsed().as_secs_f64(),
        load_avg()
    );
    Ok(())
}
