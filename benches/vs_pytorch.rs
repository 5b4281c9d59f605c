//! pgrpo against PyTorch (and against stock candle) on the same machine, same shapes, same
//! weights and inputs, in one command:
//!
//! ```text
//! cargo bench --bench vs_pytorch                       # everything (about 10 minutes on 2 cores)
//! cargo bench --bench vs_pytorch -- step               # one part: step | optimizer | logprobs | sample | advantage
//! PGRPO_VS_SHAPES=0.86M,10M cargo bench --bench vs_pytorch -- step
//! PGRPO_VS_LEVERS=1 cargo bench --bench vs_pytorch -- step   # also each optimisation off, one at a time
//! ```
//!
//! The training step has two PyTorch columns: "PyTorch best" (`scaled_dot_product_attention`
//! with GQA and `AdamW(fused=True)`, PyTorch's fastest eager CPU form: the headline) and
//! "PyTorch" (the same model with hand-written attention and the default AdamW).
//!
//! Every measurement runs in its own child process (this binary again, or
//! `python3 benches/pytorch/mirror.py`), so each peak RSS is that of one workload; the
//! sides alternate shape by shape, so a change in machine load hits both. Times are the fastest
//! of the measured repetitions after the warm-up (interference from other work on a shared
//! machine only ever adds time), best of `PGRPO_VS_ROUNDS` alternating rounds. Threads: `PGRPO_VS_THREADS` (default 2)
//! for rayon (pgrpo, candle) and `torch.set_num_threads`.
//!
//! The pgrpo side runs with glibc's allocator tuned through environment variables set on its
//! child process only (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
//! `MALLOC_TOP_PAD_`; the library itself never changes the allocator); the PyTorch child
//! gets the same settings, so the comparison is like for like. `PGRPO_VS_MALLOC=0` turns the
//! tuning off on both sides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use pgrpo::lm::{Grad, Kernels, Llama, LlamaConfig, SamplingConfig};
use pgrpo::optim::{clip_grad_norm, AdamW, ParamsAdamW};
use pgrpo::{AdvantageConfig, GroupKey, RewardHistory, RolloutRewards};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[path = "common/proc.rs"]
mod proc;
use proc::{load_avg, peak_rss_mb};

const BATCH: usize = 32;
const SEQ: usize = 48;
const LR: f64 = 1e-3;
const WEIGHT_DECAY: f64 = 0.01;
const MAX_NORM: f64 = 1.0;
const MALLOC_ENV: [(&str, &str); 3] = [
    ("MALLOC_MMAP_THRESHOLD_", "33554432"),
    ("MALLOC_TRIM_THRESHOLD_", "8589934592"),
    ("MALLOC_TOP_PAD_", "268435456"),
];

/// The Llama shapes of the speed table in `shared/spec/candle-notes.md` plus SmolLM2-135M.
fn shapes() -> Vec<(&'static str, LlamaConfig)> {
    let llama =
        |h: usize, f: usize, layers: usize, heads: usize, kv: usize, vocab: usize| LlamaConfig {
            hidden_size: h,
            intermediate_size: f,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            vocab_size: vocab,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            eos_token_id: None,
            ..Default::default()
        };
    let mut smol = llama(576, 1536, 30, 9, 3, 49152);
    smol.rope_theta = 100_000.0;
    vec![
        ("0.86M", llama(128, 344, 4, 2, 2, 512)),
        ("10M", llama(256, 688, 10, 4, 4, 8192)),
        ("30M", llama(512, 1376, 8, 8, 8, 8192)),
        ("135M", smol),
    ]
}

fn threads() -> usize {
    std::env::var("PGRPO_VS_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

/// How many times pgrpo and PyTorch alternate per measurement (`PGRPO_VS_ROUNDS`, default 2).
fn rounds() -> usize {
    std::env::var("PGRPO_VS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
        .max(1)
}

/// The deterministic "gradient" both sides use for the optimizer bench: small integers
/// times 1e-6, exact in f32 and f64 on either side.
fn fake_grad(n: usize, k: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + k * 104_729) % 2001) as f64 - 1000.0) as f32 * 1e-6)
        .collect()
}

/// Deterministic logits for the log-probs bench (same formula in the mirror).
fn fake_logits(n: usize, v: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let logits = (0..n * v)
        .map(|i| (((i * 7919) % 4001) as f64 - 2000.0) as f32 * 2e-3)
        .collect();
    let targets = (0..n).map(|i| ((i * 104_729) % v) as u32).collect();
    let probe = (0..n)
        .map(|i| ((i % 7) as f64 - 3.0) as f32 * 0.25)
        .collect();
    (logits, targets, probe)
}

/// Rewards for the advantage bench: `n / g` prompts of `g` completions, prompt `q` in group
/// `q % groups`, reward `level(group) + noise(i)` from integer formulas (same in the mirror).
fn fake_rewards(n: usize, g: usize, groups: usize) -> (Vec<f32>, Vec<u32>, Vec<u32>) {
    let mut r = Vec::with_capacity(n);
    let mut p = Vec::with_capacity(n);
    let mut gid = Vec::with_capacity(n);
    for i in 0..n {
        let q = i / g;
        let k = q % groups;
        let level = ((k * 37) % 11) as f64 * 0.1 - 0.5;
        let noise = ((i * 7919) % 1001) as f64 * 1e-3 - 0.5;
        r.push((level + noise) as f32);
        p.push(q as u32);
        gid.push(k as u32);
    }
    (r, p, gid)
}

/// 16 earlier rewards per group for a warm history (same formula in the mirror).
fn warm_rewards(k: usize) -> Vec<f32> {
    (0..16)
        .map(|j| ((((k * 31 + j * 17) % 23) as f64) * 0.05 - 0.5) as f32)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Children: one measurement each, a JSON line on stdout.
// ---------------------------------------------------------------------------------------

fn read_config(dir: &Path) -> Value {
    let s = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    serde_json::from_str(&s).expect("valid config.json")
}

fn load_model(dir: &Path, cfg: &Value, kernels: Kernels) -> Llama {
    let config: LlamaConfig = serde_json::from_value(cfg["model"].clone()).expect("model config");
    let tensors = candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu)
        .expect("weights");
    Llama::from_tensors(config, tensors, &Device::Cpu, DType::F32, dir)
        .expect("model")
        .with_kernels(kernels)
}

enum Opt {
    Ours(AdamW),
    Candle(candle_nn::AdamW),
}

impl Opt {
    fn new(ours: bool, vars: Vec<Var>) -> Self {
        let p = ParamsAdamW {
            lr: LR,
            weight_decay: WEIGHT_DECAY,
            ..Default::default()
        };
        if ours {
            Opt::Ours(<AdamW as Optimizer>::new(vars, p).expect("adamw"))
        } else {
            Opt::Candle(candle_nn::AdamW::new(vars, p).expect("adamw"))
        }
    }

    fn step(&mut self, g: &GradStore) {
        match self {
            Opt::Ours(o) => o.step(g).expect("step"),
            Opt::Candle(o) => o.step(g).expect("step"),
        }
    }
}

fn child_step(dir: &Path, variant: &str) -> Value {
    let cfg = read_config(dir);
    let (kernels, ours) = match variant {
        "pgrpo" | "pgrpo-no-malloc" => (Kernels::Fused, true),
        "pgrpo-reference-kernels" => (Kernels::Reference, true),
        "pgrpo-per-op-kernels" => (Kernels::FusedOps, true),
        "pgrpo-candle-adamw" => (Kernels::Fused, false),
        _ => (Kernels::Reference, false), // "candle": stock ops and candle_nn::AdamW
    };
    let model = load_model(dir, &cfg, kernels);
    let batch =
        candle_core::safetensors::load(dir.join("batch.safetensors"), &Device::Cpu).expect("batch");
    let ids = batch["ids"].to_vec2::<u32>().expect("ids");
    let targets = batch["targets"].to_vec2::<u32>().expect("targets");
    // Prompt = the first input token; completion = the targets: one forward over exactly the
    // SEQ input tokens, log-probs of all SEQ targets (same as the mirror's full forward).
    let prompts: Vec<Vec<u32>> = ids.iter().map(|r| vec![r[0]]).collect();
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let c: Vec<&[u32]> = targets.iter().map(Vec::as_slice).collect();
    let vars = model.vars();
    let mut opt = Opt::new(ours, vars.clone());
    let steps = cfg["steps"].as_u64().unwrap_or(3) as usize;
    let (mut times, mut losses, mut norms) = (vec![], vec![], vec![]);
    let mut var_norms = vec![];
    let mut phases = vec![];
    for step in 0..steps {
        let t0 = Instant::now();
        let lp = model
            .token_log_probs(&p, &c, Grad::Track, false)
            .expect("log-probs");
        let n = lp.logp.elem_count() as f64;
        let loss = (lp.logp.sum_all().expect("sum") * (-1.0 / n)).expect("loss");
        let t_fwd = t0.elapsed().as_secs_f64();
        let mut grads = loss.backward().expect("backward");
        let t_bwd = t0.elapsed().as_secs_f64();
        if step == 0 && std::env::var("PGRPO_VS_VAR_NORMS").is_ok() {
            var_norms = vars
                .iter()
                .map(|v| pgrpo::optim::grad_norm(std::slice::from_ref(v), &grads).expect("norm"))
                .collect();
        }
        let norm = clip_grad_norm(&vars, &mut grads, MAX_NORM).expect("clip");
        let t_clip = t0.elapsed().as_secs_f64();
        opt.step(&grads);
        drop(grads);
        let t_all = t0.elapsed().as_secs_f64();
        times.push(t_all);
        phases.push([t_fwd, t_bwd - t_fwd, t_clip - t_bwd, t_all - t_clip]);
        losses.push(loss.to_scalar::<f32>().expect("loss") as f64);
        norms.push(norm);
    }
    json!({"times": times, "losses": losses, "grad_norms": norms, "var_norms": var_norms,
           "phases": phases,
           "peak_rss_mb": peak_rss_mb()})
}

fn child_optimizer(dir: &Path, variant: &str) -> Value {
    let cfg = read_config(dir);
    let model = load_model(dir, &cfg, Kernels::Fused);
    let vars = model.vars();
    let mut grads = GradStore::default();
    for (k, v) in vars.iter().enumerate() {
        let g =
            Tensor::from_vec(fake_grad(v.elem_count(), k), v.shape(), &Device::Cpu).expect("grad");
        grads.insert(v.as_tensor(), g);
    }
    let mut opt = Opt::new(variant == "pgrpo", vars.clone());
    let steps = cfg["steps"].as_u64().unwrap_or(5) as usize;
    let mut times = vec![];
    for _ in 0..steps {
        let t0 = Instant::now();
        opt.step(&grads);
        times.push(t0.elapsed().as_secs_f64());
    }
    // Every 101st parameter value after the steps, for the cross-check.
    let mut sample = Vec::new();
    let mut offset = 0usize;
    for v in &vars {
        let x = v
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let start = (101 - offset % 101) % 101;
        sample.extend(x.iter().skip(start).step_by(101).copied());
        offset += x.len();
    }
    let bytes: Vec<u8> = sample.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("sample-{variant}.bin")), bytes).expect("write sample");
    json!({"times": times, "peak_rss_mb": peak_rss_mb()})
}

fn child_logprobs(dir: &Path, variant: &str) -> Value {
    let cfg = read_config(dir);
    let (n, v) = (
        cfg["rows"].as_u64().unwrap_or(1536) as usize,
        cfg["vocab"].as_u64().unwrap_or(49152) as usize,
    );
    let (logits, targets, probe) = fake_logits(n, v);
    let logits = Tensor::from_vec(logits, (n, v), &Device::Cpu).expect("logits");
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).expect("targets");
    let probe = Tensor::from_vec(probe, n, &Device::Cpu).expect("probe");
    let steps = cfg["steps"].as_u64().unwrap_or(5) as usize;
    let (mut times, mut check) = (vec![], json!(null));
    for _ in 0..steps {
        let x = Var::from_tensor(&logits.copy().expect("copy")).expect("var");
        let t0 = Instant::now();
        let lp = if variant == "pgrpo" {
            pgrpo::ops::log_softmax_gather(x.as_tensor(), &targets).expect("fused")
        } else {
            candle_nn::ops::log_softmax(x.as_tensor(), 1)
                .and_then(|l| l.gather(&targets.unsqueeze(1)?, 1))
                .and_then(|l| l.squeeze(1))
                .expect("stock")
        };
        let grads = (&lp * &probe)
            .and_then(|l| l.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        times.push(t0.elapsed().as_secs_f64());
        let g = grads.get(&x).expect("grad");
        let gn = g
            .to_dtype(DType::F64)
            .and_then(|g| g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>())
            .expect("norm");
        let s = lp
            .to_dtype(DType::F64)
            .and_then(|l| l.sum_all()?.to_scalar::<f64>())
            .expect("sum");
        check = json!([s, gn]);
    }
    json!({"times": times, "check": check, "peak_rss_mb": peak_rss_mb()})
}

fn child_sample(dir: &Path, variant: &str) -> Value {
    let cfg = read_config(dir);
    let kernels = if variant == "pgrpo" {
        Kernels::Fused
    } else {
        Kernels::Reference
    };
    let model = load_model(dir, &cfg, kernels);
    let prompts = candle_core::safetensors::load(dir.join("prompts.safetensors"), &Device::Cpu)
        .expect("prompts")["prompts"]
        .to_vec2::<u32>()
        .expect("prompts");
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let sampling = SamplingConfig {
        max_new_tokens: cfg["new_tokens"].as_u64().unwrap_or(32) as usize,
        temperature: 0.0,
        stop_tokens: Some(vec![]),
        ..Default::default()
    };
    let steps = cfg["steps"].as_u64().unwrap_or(3) as usize;
    let (mut times, mut tokens) = (vec![], vec![]);
    for _ in 0..steps {
        let t0 = Instant::now();
        tokens = model
            .generate(&p, 1, &sampling, &mut StdRng::seed_from_u64(0))
            .expect("generate");
        times.push(t0.elapsed().as_secs_f64());
    }
    json!({"times": times, "tokens": tokens, "peak_rss_mb": peak_rss_mb()})
}

fn child_advantage(dir: &Path, variant: &str) -> Value {
    let cfg = read_config(dir);
    let n = cfg["n"].as_u64().unwrap_or(1 << 20) as usize;
    let g = cfg["g"].as_u64().unwrap_or(8) as usize;
    let groups = cfg["groups"].as_u64().unwrap_or(8) as usize;
    let (r, p, gid) = fake_rewards(n, g, groups);
    let keys: Vec<GroupKey> = (0..groups as u64).map(GroupKey::Id).collect();
    let mut history = RewardHistory::default();
    for (k, key) in keys.iter().enumerate() {
        history.update(key.clone(), &warm_rewards(k)).expect("warm");
    }
    let steps = cfg["steps"].as_u64().unwrap_or(20) as usize;
    let mut times = vec![];
    let mut check = json!(null);
    if variant == "memcpy" {
        // The memory floor: read the three input arrays and write the same bytes (12 B/row)
        // plus the output (4 B/row) once.
        let (mut a, mut b, mut c, mut d) =
            (vec![0f32; n], vec![0u32; n], vec![0u32; n], vec![0f32; n]);
        for _ in 0..steps {
            let t0 = Instant::now();
            a.copy_from_slice(std::hint::black_box(&r));
            b.copy_from_slice(std::hint::black_box(&p));
            c.copy_from_slice(std::hint::black_box(&gid));
            d.copy_from_slice(std::hint::black_box(&r));
            std::hint::black_box((&a, &b, &c, &d));
            times.push(t0.elapsed().as_secs_f64());
        }
        return json!({"times": times, "peak_rss_mb": peak_rss_mb()});
    }
    let cfg_adv = AdvantageConfig::default();
    let batch = RolloutRewards {
        rewards: &r,
        prompt_ids: &p,
        group_ids: &gid,
        group_keys: &keys,
    };
    for _ in 0..steps {
        let mut h = history.clone();
        let t0 = Instant::now();
        let adv = cfg_adv
            .compute_and_update(&batch, &mut h)
            .expect("advantages");
        times.push(t0.elapsed().as_secs_f64());
        let sum: f64 = adv.values.iter().map(|&a| (a as f64) * (a as f64)).sum();
        check = json!([&adv.values[..4], sum]);
        std::hint::black_box(h);
    }
    json!({"times": times, "check": check, "peak_rss_mb": peak_rss_mb()})
}

fn run_child(job: &str) {
    let mut it = job.splitn(3, ':');
    let (what, variant, dir) = (
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        PathBuf::from(it.next().unwrap_or(".")),
    );
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads())
        .build_global()
        .expect("rayon pool");
    let out = match what {
        "step" => child_step(&dir, variant),
        "optimizer" => child_optimizer(&dir, variant),
        "logprobs" => child_logprobs(&dir, variant),
        "sample" => child_sample(&dir, variant),
        "advantage" => child_advantage(&dir, variant),
        other => panic!("unknown job {other}"),
    };
    println!("{out}");
}

// ---------------------------------------------------------------------------------------
// The parent: prepare inputs, run the children, print the tables.
// ---------------------------------------------------------------------------------------

fn malloc_on() -> bool {
    std::env::var("PGRPO_VS_MALLOC").map_or(true, |v| v != "0")
}

/// Runs one child; `None` (with a message) if it failed.
fn spawn(what: &str, variant: &str, dir: &Path, malloc: bool) -> Option<Value> {
    let mut cmd = if variant == "torch" || variant == "torch-best" {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pytorch/mirror.py");
        let mut c = Command::new("python3");
        c.arg(script).arg(what).arg(dir);
        if variant == "torch-best" {
            c.arg("best");
        }
        c
    } else {
        let mut c = Command::new(std::env::current_exe().expect("own path"));
        c.env(
            "PGRPO_VS_CHILD",
            format!("{what}:{variant}:{}", dir.display()),
        );
        c
    };
    for (k, v) in MALLOC_ENV {
        if malloc && malloc_on() {
            cmd.env(k, v);
        } else {
            cmd.env_remove(k);
        }
    }
    cmd.env("RAYON_NUM_THREADS", threads().to_string());
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("  {what}/{variant}: could not start: {e}");
            return None;
        }
    };
    if !out.status.success() {
        eprintln!(
            "  {what}/{variant} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
}

fn times(v: &Option<Value>) -> f64 {
    v.as_ref()
        .and_then(|v| v["times"].as_array().cloned())
        .map(|t| {
            let t: Vec<f64> = t.iter().filter_map(Value::as_f64).collect();
            // The first repetitions are the warm-up (PyTorch's first two steps are slow); of
            // the rest the fastest counts (the machine is shared: interference only adds).
            let skip = if t.len() > 3 {
                2
            } else {
                usize::from(t.len() > 1)
            };
            t[skip..].iter().copied().fold(f64::INFINITY, f64::min)
        })
        .unwrap_or(f64::NAN)
}

fn mem(v: &Option<Value>) -> f64 {
    v.as_ref()
        .and_then(|v| v["peak_rss_mb"].as_f64())
        .unwrap_or(f64::NAN)
}

fn write_config(dir: &Path, v: Value) {
    std::fs::create_dir_all(dir).expect("bench dir");
    std::fs::write(dir.join("config.json"), v.to_string()).expect("config.json");
}

fn write_model(dir: &Path, config: &LlamaConfig) -> Llama {
    let model = Llama::new(
        config.clone(),
        &mut StdRng::seed_from_u64(0),
        &Device::Cpu,
        DType::F32,
    )
    .expect("model");
    candle_core::safetensors::save(&model.tensors(), dir.join("weights.safetensors"))
        .expect("weights");
    model
}

fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

fn first_f64(v: &Option<Value>, key: &str, i: usize) -> f64 {
    v.as_ref()
        .and_then(|v| v[key][i].as_f64())
        .unwrap_or(f64::NAN)
}

fn bench_step(root: &Path, names: &[String]) {
    let levers = std::env::var("PGRPO_VS_LEVERS").is_ok_and(|v| v != "0");
    println!("\n## Training step: forward + backward + clip + AdamW, {BATCH} x {SEQ} tokens, f32");
    println!("(times: fastest step after 2 warm-up steps, best of the alternating rounds; memory: peak RSS of the process, MiB; grad norm: exact f64 norm on both sides)\n");
    println!("(PyTorch best: `scaled_dot_product_attention` and `AdamW(fused=True)`, its fastest eager CPU form; PyTorch: the same model with hand-written attention and the default AdamW)\n");
    println!(
        "| model | params | pgrpo s | PyTorch best s | PyTorch s | stock candle s | pgrpo/PyTorch best | pgrpo/PyTorch | stock/PyTorch | pgrpo MiB | PyTorch best MiB | PyTorch MiB | stock MiB | loss rel. diff (steps 1,2,3) | grad-norm rel. diff (1,2,3) | best's loss rel. diff (1,2,3) | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut lever_rows = Vec::new();
    for (name, config) in shapes() {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        let dir = root.join(format!("step-{name}"));
        let big = config.hidden_size >= 576;
        write_config(
            &dir,
            json!({"model": config, "steps": if big { 4 } else { 7 }, "threads": threads(),
                   "lr": LR, "weight_decay": WEIGHT_DECAY, "max_norm": MAX_NORM}),
        );
        let model = write_model(&dir, &config);
        let params: usize = model.vars().iter().map(|v| v.elem_count()).sum();
        drop(model);
        let mut rng = StdRng::seed_from_u64(1);
        let v = config.vocab_size as u32;
        // Sequences of SEQ + 1 tokens: inputs are the first SEQ, targets the last SEQ.
        let seqs: Vec<Vec<u32>> = (0..BATCH)
            .map(|_| (0..=SEQ).map(|_| rng.random_range(0..v)).collect())
            .collect();
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s[..SEQ].to_vec()).collect();
        let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].to_vec()).collect();
        let mut batch = HashMap::new();
        batch.insert(
            "ids".to_string(),
            Tensor::from_vec(ids, (BATCH, SEQ), &Device::Cpu).expect("ids"),
        );
        batch.insert(
            "targets".to_string(),
            Tensor::from_vec(targets, (BATCH, SEQ), &Device::Cpu).expect("targets"),
        );
        candle_core::safetensors::save(&batch, dir.join("batch.safetensors")).expect("batch");
        let load = load_avg();
        // pgrpo and PyTorch alternate `rounds` times (the machine may be shared); the faster
        // round of each is kept. Stock candle runs once.
        let mut ours = None;
        let mut torch = None;
        let mut best = None;
        for _ in 0..rounds() {
            let o = spawn("step", "pgrpo", &dir, true);
            if ours.is_none() || times(&o) < times(&ours) {
                ours = o;
            }
            let b = spawn("step", "torch-best", &dir, true);
            if best.is_none() || times(&b) < times(&best) {
                best = b;
            }
            let t = spawn("step", "torch", &dir, true);
            if torch.is_none() || times(&t) < times(&torch) {
                torch = t;
            }
        }
        let stock = spawn("step", "candle", &dir, false);
        let diffs = |other: &Option<Value>, key: &str| {
            (0..3)
                .map(|i| {
                    format!(
                        "{:.1e}",
                        rel_diff(first_f64(&ours, key, i), first_f64(other, key, i))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (to, tb, tt, ts) = (times(&ours), times(&best), times(&torch), times(&stock));
        println!(
            "| {name} | {:.2}M | {to:.3} | {tb:.3} | {tt:.3} | {ts:.3} | {:.2}x | {:.2}x | {:.2}x | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {load} |",
            params as f64 / 1e6,
            to / tb,
            to / tt,
            ts / tt,
            mem(&ours),
            mem(&best),
            mem(&torch),
            mem(&stock),
            diffs(&torch, "losses"),
            diffs(&torch, "grad_norms"),
            diffs(&best, "losses"),
        );
        if levers {
            let mut row = vec![(name.to_string(), "pgrpo (all on)".to_string(), to)];
            for (label, variant, malloc) in [
                ("malloc tuning off", "pgrpo-no-malloc", false),
                (
                    "per-op fused kernels, no whole-block node",
                    "pgrpo-per-op-kernels",
                    true,
                ),
                ("stock kernels (own AdamW)", "pgrpo-reference-kernels", true),
                ("candle_nn::AdamW", "pgrpo-candle-adamw", true),
            ] {
                let r = spawn("step", variant, &dir, malloc);
                row.push((name.to_string(), label.to_string(), times(&r)));
            }
            let tn = times(&spawn("step", "torch", &dir, false));
            row.push((name.to_string(), "PyTorch, malloc tuning off".into(), tn));
            row.push((name.to_string(), "PyTorch (tuned, above)".into(), tt));
            lever_rows.extend(row);
        }
    }
    if !lever_rows.is_empty() {
        println!("\n### Each optimisation off, one at a time (s/step)\n");
        println!("| model | variant | s/step |");
        println!("|---|---|---|");
        for (m, l, t) in lever_rows {
            println!("| {m} | {l} | {t:.3} |");
        }
    }
}

fn bench_optimizer(root: &Path) {
    let (name, config) = shapes().pop().expect("135M shape");
    let dir = root.join("optimizer");
    write_config(
        &dir,
        json!({"model": config, "steps": 6, "threads": threads(), "lr": LR, "weight_decay": WEIGHT_DECAY}),
    );
    write_model(&dir, &config);
    let load = load_avg();
    let ours = spawn("optimizer", "pgrpo", &dir, true);
    let candle = spawn("optimizer", "candle", &dir, true);
    let torch = spawn("optimizer", "torch", &dir, true);
    let read = |v: &str| -> Vec<f32> {
        std::fs::read(dir.join(format!("sample-{v}.bin")))
            .map(|b| {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (a, b, c) = (read("pgrpo"), read("candle"), read("torch"));
    let max_rel = |x: &[f32], y: &[f32]| {
        if x.len() != y.len() || x.is_empty() {
            return f64::NAN;
        }
        x.iter().zip(y).fold(0f64, |m, (&p, &q)| {
            m.max((p as f64 - q as f64).abs() / (q.abs() as f64).max(1e-3))
        })
    };
    let identical = !a.is_empty() && a == b;
    println!(
        "\n## AdamW step on the {name} parameter set ({} tensors)\n",
        272
    );
    println!("| pgrpo s | candle_nn::AdamW s | PyTorch AdamW s | candle_nn / pgrpo | PyTorch / pgrpo | pgrpo = candle_nn bitwise | max rel. diff vs PyTorch (6 steps) | load |");
    println!("|---|---|---|---|---|---|---|---|");
    let (to, tc, tt) = (times(&ours), times(&candle), times(&torch));
    println!(
        "| {to:.4} | {tc:.4} | {tt:.4} | {:.1}x | {:.1}x | {identical} | {:.1e} | {load} |",
        tc / to,
        tt / to,
        max_rel(&a, &c)
    );
}

fn bench_logprobs(root: &Path) {
    let dir = root.join("logprobs");
    write_config(
        &dir,
        json!({"rows": BATCH * SEQ, "vocab": 49152, "steps": 6, "threads": threads()}),
    );
    let load = load_avg();
    let ours = spawn("logprobs", "pgrpo", &dir, true);
    let candle = spawn("logprobs", "candle", &dir, true);
    let torch = spawn("logprobs", "torch", &dir, true);
    println!(
        "\n## Token log-probs, forward + backward, ({} x 49152) logits\n",
        BATCH * SEQ
    );
    println!("| pgrpo s | stock candle s | PyTorch s | pgrpo/PyTorch | pgrpo MiB | stock MiB | PyTorch MiB | Σlogp rel. diff | ‖∂logits‖ rel. diff | load |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let (to, tc, tt) = (times(&ours), times(&candle), times(&torch));
    println!(
        "| {to:.4} | {tc:.4} | {tt:.4} | {:.2}x | {:.0} | {:.0} | {:.0} | {:.1e} | {:.1e} | {load} |",
        to / tt,
        mem(&ours),
        mem(&candle),
        mem(&torch),
        rel_diff(first_f64(&ours, "check", 0), first_f64(&torch, "check", 0)),
        rel_diff(first_f64(&ours, "check", 1), first_f64(&torch, "check", 1)),
    );
}

fn bench_sample(root: &Path, names: &[String]) {
    println!("\n## Greedy KV-cache sampling: 8 prompts x 16 tokens, 32 new tokens\n");
    println!("| model | pgrpo s | stock candle s | PyTorch s | pgrpo tokens/s | PyTorch tokens/s | pgrpo/PyTorch time | same tokens | load |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, config) in shapes().into_iter().skip(1) {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        let dir = root.join(format!("sample-{name}"));
        write_config(
            &dir,
            json!({"model": config, "steps": 3, "new_tokens": 32, "threads": threads()}),
        );
        write_model(&dir, &config);
        let mut rng = StdRng::seed_from_u64(5);
        let v = config.vocab_size as u32;
        let prompts: Vec<u32> = (0..8 * 16).map(|_| rng.random_range(0..v)).collect();
        let mut t = HashMap::new();
        t.insert(
            "prompts".to_string(),
            Tensor::from_vec(prompts, (8, 16), &Device::Cpu).expect("prompts"),
        );
        candle_core::safetensors::save(&t, dir.join("prompts.safetensors")).expect("prompts");
        let load = load_avg();
        let ours = spawn("sample", "pgrpo", &dir, true);
        let candle = spawn("sample", "candle", &dir, true);
        let torch = spawn("sample", "torch", &dir, true);
        let toks = |v: &Option<Value>| v.as_ref().map(|v| v["tokens"].clone());
        let same = match (toks(&ours), toks(&torch)) {
            (Some(a), Some(b)) => {
                let (a, b) = (a.to_string(), b.to_string());
                if a == b {
                    "yes".to_string()
                } else {
                    "no".to_string()
                }
            }
            _ => "?".into(),
        };
        let (to, tc, tt) = (times(&ours), times(&candle), times(&torch));
        let n = 8.0 * 32.0;
        println!(
            "| {name} | {to:.3} | {tc:.3} | {tt:.3} | {:.0} | {:.0} | {:.2}x | {same} | {load} |",
            n / to,
            n / tt,
            to / tt
        );
    }
}

fn bench_advantage(root: &Path) {
    println!("\n## P-GRPO advantages + history update, 1M rewards (G = 8)\n");
    println!("| groups | pgrpo ms | PyTorch (TRL-style ops) ms | memcpy of the same bytes ms | PyTorch / pgrpo | pgrpo / memcpy | Σ A² rel. diff | load |");
    println!("|---|---|---|---|---|---|---|---|");
    for groups in [8usize, 10_000] {
        let dir = root.join(format!("advantage-{groups}"));
        write_config(
            &dir,
            json!({"n": 1 << 20, "g": 8, "groups": groups, "steps": 100, "eps": 1e-4, "threads": threads()}),
        );
        // The mirror reads the rewards and the warm history from a file.
        let (r, _, gid) = fake_rewards(1 << 20, 8, groups);
        let mut hist = (vec![], vec![], vec![]);
        for k in 0..groups {
            let w: Vec<f64> = warm_rewards(k).iter().map(|&x| x as f64).collect();
            let m = pgrpo::history::RunningMoments::from_slice(&w);
            hist.0.push(m.count as f64);
            hist.1.push(m.mean);
            hist.2.push(m.m2);
        }
        let mut t = HashMap::new();
        let dev = &Device::Cpu;
        t.insert("rewards".to_string(), Tensor::new(r, dev).expect("r"));
        t.insert("group_ids".to_string(), Tensor::new(gid, dev).expect("g"));
        t.insert(
            "hist_count".to_string(),
            Tensor::new(hist.0, dev).expect("c"),
        );
        t.insert(
            "hist_mean".to_string(),
            Tensor::new(hist.1, dev).expect("m"),
        );
        t.insert("hist_m2".to_string(), Tensor::new(hist.2, dev).expect("m2"));
        candle_core::safetensors::save(&t, dir.join("rewards.safetensors")).expect("rewards");
        let load = load_avg();
        let ours = spawn("advantage", "pgrpo", &dir, true);
        let torch = spawn("advantage", "torch", &dir, true);
        let copy = spawn("advantage", "memcpy", &dir, true);
        let (to, tt, tm) = (times(&ours), times(&torch), times(&copy));
        println!(
            "| {groups} | {:.2} | {:.2} | {:.2} | {:.1}x | {:.2}x | {:.1e} | {load} |",
            to * 1e3,
            tt * 1e3,
            tm * 1e3,
            tt / to,
            to / tm,
            rel_diff(first_f64(&ours, "check", 1), first_f64(&torch, "check", 1)),
        );
    }
}

fn main() {
    if let Ok(job) = std::env::var("PGRPO_VS_CHILD") {
        run_child(&job);
        return;
    }
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |p: &str| parts.is_empty() || parts.iter().any(|a| a == p);
    let shapes: Vec<String> = std::env::var("PGRPO_VS_SHAPES")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let root = std::env::temp_dir().join(format!("pgrpo-vs-pytorch-{}", std::process::id()));
    println!(
        "# pgrpo vs PyTorch: {} thread(s), load average at start {}, malloc tuning {}",
        threads(),
        load_avg(),
        if malloc_on() { "on" } else { "off" }
    );
    if want("advantage") {
        bench_advantage(&root);
    }
    if want("logprobs") {
        bench_logprobs(&root);
    }
    if want("optimizer") {
        bench_optimizer(&root);
    }
    if want("step") {
        bench_step(&root, &shapes);
    }
    if want("sample") {
        bench_sample(&root, &shapes);
    }
    if std::env::var("PGRPO_VS_KEEP").is_err() {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        println!("\n(inputs kept in {})", root.display());
    }
}
