//! Data-parallel training over MPI, checked against one process.
//!
//! `harness = false`: run without a launcher (as `cargo test --features mpi --test mpi` does)
//! the binary relaunches itself under `mpirun -np 2` and `mpirun -np 3 --oversubscribe`
//! (uneven shards and group counts) and fails if any rank fails. Under the launcher every
//! rank runs the checks below; each also builds the single-process reference itself (every
//! rank knows the whole batch), so nothing but MPI passes between processes.
//!
//! What is asserted, for every estimator and loss aggregation:
//! - advantages, diagnostics and the reward history after each step are **bit-identical** to
//!   one process's on the whole batch, and the history is bit-identical across ranks;
//! - the all-reduced gradient equals the full-batch gradient to 1e-6 (relative to its
//!   largest component), and is bit-identical across ranks;
//! - after several steps the parameters are bit-identical on every rank and equal to a
//!   one-process run's to float tolerance, and so are the metrics;
//! - `distributed::merge_batch_deltas` (each rank folds all ranks' batch statistics in rank
//!   order) equals the pooled history of one process, bit-identical across ranks;
//! - a checkpoint written by rank 0 resumes exactly with the same number of ranks (with a
//!   reward function whose state differs per rank);
//! - a failing reward function on one rank, or a rank given another batch, makes every rank
//!   return an error instead of hanging, and the run can go on.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var, D};
use pgrpo::advantage::{ColdStart, UpdateOrder};
use pgrpo::distributed::{shard, Collective, Mpi};
use pgrpo::{
    AdvantageConfig, Error, Estimator, GroupKey, GroupedPrompt, HistoryKind, LossAggregation,
    Policy, RewardFn, RewardHistory, RolloutRewards, StepMetrics, TokenLogProbs, Trainer,
    TrainerConfig,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

// ---------------------------------------------------------------------------------------------
// The launcher.

const RUNS: [(usize, bool); 2] = [(2, false), (3, true)];
const TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let under_launcher = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
        || std::env::var_os("PMI_SIZE").is_some();
    if under_launcher {
        rank_main();
        return ExitCode::SUCCESS;
    }
    match launch() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mpi test FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn launch() -> std::result::Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let version = Command::new("mpirun")
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run `mpirun` ({e}); install OpenMPI or MPICH"))?;
    let open_mpi = String::from_utf8_lossy(&version.stdout).contains("Open MPI");
    let dir = std::env::temp_dir().join(format!("pgrpo-mpi-test-{}", std::process::id()));
    for (np, oversubscribe) in RUNS {
        let run_dir = dir.join(format!("np{np}"));
        std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("mpirun");
        cmd.arg("-np").arg(np.to_string());
        if open_mpi {
            // Threads of a rank may use any core; more ranks than cores where asked.
            cmd.args(["--bind-to", "none"]);
            if oversubscribe {
                cmd.arg("--oversubscribe");
            }
            cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        cmd.arg(&exe)
            .env("RAYON_NUM_THREADS", "1")
            .env("PGRPO_MPI_TEST_DIR", &run_dir)
            .stdin(Stdio::null());
        println!(
            "mpi test: mpirun -np {np}{}",
            if oversubscribe {
                " --oversubscribe"
            } else {
                ""
            }
        );
        let t = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("mpirun: {e}"))?;
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if t.elapsed() > TIMEOUT {
                child.kill().ok();
                child.wait().ok();
                return Err(format!("mpirun -np {np} timed out after {TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !status.success() {
            return Err(format!("mpirun -np {np} exited with {status}"));
        }
        println!(
            "mpi test: -np {np} passed in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A multi-token test policy whose samples depend on the prompt only.

/// Tokens `0..STOP` and the stop token.
const A: usize = 4;
const STOP: u32 = (A - 1) as u32;
/// Longest completion.
const TMAX: usize = 5;

/// A prompt: a context id and the seed its completions are sampled with. Sampling from the
/// prompt's own seed makes the rollout independent of how prompts are split across ranks,
/// so a data-parallel run and one process see the same completions.
type Prompt = (u32, u64);

/// `π(token | context, position) = softmax(base[context] + pos[position])`; a completion is
/// a token sequence ending at the stop token or after `TMAX` tokens, so lengths vary and
/// log-probs are padded to the longest completion of the call, as an LM's are.
struct SeqPolicy {
    base: Var,
    pos: Var,
    device: Device,
}

impl SeqPolicy {
    fn new(contexts: usize, seed: u64) -> SeqPolicy {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.5..0.5)).collect() };
        let device = Device::Cpu;
        SeqPolicy {
            base: Var::from_vec(draw(contexts * A), (contexts, A), &device).unwrap(),
            pos: Var::from_vec(draw(TMAX * A), (TMAX, A), &device).unwrap(),
            device,
        }
    }

    fn weights(&self) -> Vec<Vec<f32>> {
        self.vars()
            .iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }
}

impl Policy for SeqPolicy {
    type Prompt = Prompt;
    type Completion = Vec<u32>;

    fn device(&self) -> &Device {
        &self.device
    }

    fn sample(
        &self,
        prompts: &[Prompt],
        n: usize,
        _rng: &mut StdRng,
    ) -> pgrpo::Result<Vec<Vec<u32>>> {
        let base = self.base.as_tensor().to_vec2::<f32>()?;
        let pos = self.pos.as_tensor().to_vec2::<f32>()?;
        let mut out = Vec::with_capacity(prompts.len() * n);
        for &(ctx, seed) in prompts {
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..n {
                let mut seq = Vec::new();
                for pos_t in &pos {
                    let logits: Vec<f64> = (0..A)
                        .map(|a| (base[ctx as usize][a] + pos_t[a]) as f64)
                        .collect();
                    let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                    let mut u = rng.random::<f64>() * w.iter().sum::<f64>();
                    let mut tok = STOP;
                    for (a, wa) in w.iter().enumerate() {
                        if u < *wa {
                            tok = a as u32;
                            break;
                        }
                        u -= wa;
                    }
                    seq.push(tok);
                    if tok == STOP {
                        break;
                    }
                }
                out.push(seq);
            }
        }
        Ok(out)
    }

    fn log_probs(
        &self,
        prompts: &[&Prompt],
        completions: &[Vec<u32>],
    ) -> pgrpo::Result<TokenLogProbs> {
        let b = completions.len();
        let t = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let (mut ctx, mut pos, mut tok, mut mask) = (vec![], vec![], vec![], vec![]);
        for (p, c) in prompts.iter().zip(completions) {
            for i in 0..t {
                ctx.push(p.0);
                pos.push(i as u32);
                tok.push(c.get(i).copied().unwrap_or(0));
                mask.push(if i < c.len() { 1f32 } else { 0.0 });
            }
        }
        let dev = &self.device;
        let ctx = Tensor::new(ctx, dev)?;
        let pos = Tensor::new(pos, dev)?;
        let tok = Tensor::new(tok, dev)?;
        let logits = (self.base.as_tensor().index_select(&ctx, 0)?
            + self.pos.as_tensor().index_select(&pos, 0)?)?;
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let logp = lsm.gather(&tok.unsqueeze(1)?, 1)?.reshape((b, t))?;
        let entropy = (lsm.exp()? * &lsm)?
            .sum(1)?
            .neg()?
            .reshape((b, t))?
            .detach();
        Ok(TokenLogProbs {
            logp,
            mask: Tensor::new(mask, dev)?.reshape((b, t))?,
            entropy: Some(entropy),
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.base.clone(), self.pos.clone()]
    }

    fn snapshot(&self) -> pgrpo::Result<Self> {
        Ok(SeqPolicy {
            base: Var::from_tensor(&self.base.as_tensor().copy()?)?,
            pos: Var::from_tensor(&self.pos.as_tensor().copy()?)?,
            device: self.device.clone(),
        })
    }
}

/// Deterministic reward: the share of tokens equal to `context mod 3`, scaled per group,
/// minus a length cost. Context 0 always scores 1 (a zero-spread prompt).
fn score(prompt: &Prompt, completion: &[u32], group: &GroupKey) -> f32 {
    if prompt.0 == 0 {
        return 1.0;
    }
    let want = prompt.0 % 3;
    let hits = completion.iter().filter(|&&t| t == want).count() as f32;
    let scale = match group.to_string().as_str() {
        "a" => 1.0,
        "b" => 0.3,
        _ => 0.1,
    };
    scale * hits / completion.len() as f32 - 0.05 * completion.len() as f32
}

/// [`score`] plus noise from a generator whose position is its state: its stream differs
/// per rank, so an exact resume needs every rank's state back.
struct NoisyReward {
    seed: u64,
    rng: ChaCha12Rng,
    /// Fail (once) when asked to score at this call number.
    fail_at: Option<u64>,
    calls: u64,
}

impl NoisyReward {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: ChaCha12Rng::seed_from_u64(seed),
            fail_at: None,
            calls: 0,
        }
    }
}

impl RewardFn<Prompt, Vec<u32>> for NoisyReward {
    fn score(&mut self, p: &Prompt, c: &Vec<u32>, g: &GroupKey) -> pgrpo::Result<f32> {
        self.calls += 1;
        if self.fail_at == Some(self.calls) {
            return Err(Error::Reward("the judge timed out".into()));
        }
        Ok(score(p, c, g) + 0.1 * self.rng.random::<f32>())
    }

    fn state(&self) -> pgrpo::Result<Option<serde_json::Value>> {
        Ok(Some(serde_json::json!({
            "seed": self.seed,
            "word_pos": self.rng.get_word_pos().to_string(),
        })))
    }

    fn restore(&mut self, state: serde_json::Value) -> pgrpo::Result<()> {
        let seed = state["seed"]
            .as_u64()
            .ok_or_else(|| Error::Reward("seed".into()))?;
        let pos: u128 = state["word_pos"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Error::Reward("word_pos".into()))?;
        self.seed = seed;
        self.rng = ChaCha12Rng::seed_from_u64(seed);
        self.rng.set_word_pos(pos);
        Ok(())
    }
}

/// The batch of step `step`: 7 prompts over 3 preference groups with uneven counts; with
/// 3 ranks the shards are 3, 2, 2 prompts and the last holds only zero-spread prompts.
fn batch_at(step: u64) -> Vec<GroupedPrompt<Prompt>> {
    let contexts = [1u32, 2, 1, 4, 2, 0, 0];
    let groups = ["a", "b", "a", "a", "b", "c", "a"];
    contexts
        .iter()
        .zip(groups)
        .enumerate()
        .map(|(i, (&c, g))| GroupedPrompt::new((c, step * 1000 + i as u64), g))
        .collect()
}

fn config(estimator: Estimator, aggregation: LossAggregation) -> TrainerConfig {
    let mut cfg = TrainerConfig {
        num_generations: 4,
        num_iterations: 2,
        learning_rate: 0.02,
        max_grad_norm: Some(1.0),
        mask_zero_std_prompts: true,
        seed: 11,
        ..Default::default()
    };
    cfg.objective.beta = 0.04;
    cfg.objective.aggregation = aggregation;
    cfg.advantage.estimator = estimator;
    cfg.advantage.pgrpo.min_count = 6;
    cfg.advantage.pgrpo.cold_start = ColdStart::Batch;
    cfg
}

// ---------------------------------------------------------------------------------------------
// Checks, run on every rank.

fn rank_main() {
    let mpi = Mpi::init().expect("MPI init");
    let (rank, world) = (mpi.rank(), mpi.world());
    // A panic on one rank must stop all of them, not leave them waiting in a collective.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        // SAFETY: MPI is initialised; MPI_Abort ends every process of the job.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 1);
        }
    }));
    let dir = PathBuf::from(std::env::var("PGRPO_MPI_TEST_DIR").expect("PGRPO_MPI_TEST_DIR"));
    let say = |what: &str| {
        if rank == 0 {
            println!("  [{world} ranks] {what}: ok");
        }
    };

    primitives(&mpi);
    say("collective primitives (gather of uneven messages, broadcast, sums)");
    let mut worst = 0.0f32;
    for estimator in Estimator::ALL {
        for aggregation in LossAggregation::ALL {
            worst = worst.max(gradients_match(&mpi, config(estimator, aggregation)));
        }
    }
    let mut cfg = config(Estimator::PGrpo, LossAggregation::Grpo);
    cfg.advantage.pgrpo.cold_start = ColdStart::HistoryWithBatch;
    cfg.advantage.pgrpo.update_order = UpdateOrder::AfterBatch;
    worst = worst.max(gradients_match(&mpi, cfg));
    say(&format!(
        "advantages bit-identical, gradients equal to one process's (6 estimators x 3 \
         aggregations; largest relative difference {worst:.1e})"
    ));
    // Every rank accumulates its micro-batches (3 each, uneven, some of one row); the
    // denominator stays the whole batch's.
    let mut worst = 0.0f32;
    for aggregation in LossAggregation::ALL {
        let mut cfg = config(Estimator::PGrpo, aggregation);
        cfg.gradient_accumulation_steps = 3;
        worst = worst.max(gradients_match(&mpi, cfg));
    }
    let mut cfg = config(Estimator::Grpo, LossAggregation::DrGrpo);
    cfg.gradient_accumulation_steps = 5;
    cfg.objective.max_completion_len = Some(9);
    worst = worst.max(gradients_match(&mpi, cfg));
    let mut cfg = config(Estimator::PGrpo, LossAggregation::Bnpo);
    cfg.gradient_accumulation_steps = 2;
    let w = training_matches(&mpi, cfg, 3);
    say(&format!(
        "gradient accumulation on every rank: gradients equal to one process's without \
         accumulation (largest relative difference {worst:.1e}); 3 training steps within \
         {:.1e} (weights) and {:.1e} (metrics)",
        w.0, w.1
    ));

    let mut worst = (0.0f32, 0.0f64);
    for aggregation in LossAggregation::ALL {
        let w = training_matches(&mpi, config(Estimator::PGrpo, aggregation), 4);
        worst = (worst.0.max(w.0), worst.1.max(w.1));
    }
    let mut cfg = config(Estimator::PGrpo, LossAggregation::Bnpo);
    cfg.history = HistoryKind::Exponential { half_life: 20.0 };
    let w = training_matches(&mpi, cfg, 3);
    worst = (worst.0.max(w.0), worst.1.max(w.1));
    say(&format!(
        "4 training steps: history bit-identical to one process, weights identical across \
         ranks (against one process: weights within {:.1e}, metrics within {:.1e} relative)",
        worst.0, worst.1
    ));

    for kind in [
        HistoryKind::Cumulative,
        HistoryKind::Exponential { half_life: 5.0 },
        HistoryKind::Window { size: 7 },
    ] {
        merged_history_matches(&mpi, kind);
    }
    say("merge_batch_deltas equals the pooled history");

    resume_is_exact(&mpi, &dir);
    say("checkpoint by rank 0, exact resume with per-rank reward states");

    failures_reach_every_rank(&mpi);
    say("a failing rank stops every rank's step; the run goes on");
    let _ = rank;
}

fn primitives(c: &Mpi) {
    let (rank, world) = (c.rank(), c.world());
    // Uneven messages, including an empty one.
    let mine: Vec<u8> = (0..rank as u8 * 3).collect();
    let all = c.all_gather_bytes(&mine).unwrap();
    for (r, m) in all.iter().enumerate() {
        assert_eq!(m, &(0..r as u8 * 3).collect::<Vec<u8>>());
    }
    let mut b = if rank == world - 1 {
        vec![7u8, 8, 9]
    } else {
        vec![0; 3]
    };
    c.broadcast_bytes(&mut b, world - 1).unwrap();
    assert_eq!(b, [7, 8, 9]);
    let mut f = vec![rank as f32 + 0.5, 1.0];
    c.all_reduce_sum_f32(&mut f).unwrap();
    let n = world as f32;
    assert_eq!(f, [n * (n - 1.0) / 2.0 + 0.5 * n, n]);
    let s = pgrpo::distributed::sum_f64(&c, &[0.1 * (rank as f64 + 1.0)]).unwrap();
    let want = (0..world).fold(0.0, |acc, r| acc + 0.1 * (r as f64 + 1.0));
    assert_eq!(s[0].to_bits(), want.to_bits());
    c.check_same("a constant", b"same").unwrap();
    let e = c.check_same("the rank", &[rank as u8]).unwrap_err();
    assert!(e.to_string().contains("disagree"), "{e}");
    c.barrier().unwrap();
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Bytes of `values` for a cross-rank comparison.
fn bits(values: &[Vec<f32>]) -> Vec<u8> {
    values
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

/// One rollout on `N` ranks against one process with the whole batch: advantages and
/// diagnostics bit-identical, gradients to 1e-6.
/// Returns the largest gradient difference relative to the largest component.
fn gradients_match(c: &Mpi, cfg: TrainerConfig) -> f32 {
    let what = format!(
        "{} / {}",
        cfg.advantage.estimator.name(),
        cfg.objective.aggregation.name()
    );
    let mk = || SeqPolicy::new(5, 3);
    let reward = |p: &Prompt, comp: &Vec<u32>, g: &GroupKey| score(p, comp, g);
    // One process computes the whole batch in one pass, whatever the ranks accumulate.
    let one_cfg = TrainerConfig {
        gradient_accumulation_steps: 1,
        ..cfg.clone()
    };
    let mut one = Trainer::new(mk(), reward, one_cfg).unwrap();
    // Another initialisation on purpose: `with_collective` broadcasts rank 0's weights.
    let init_seed = if c.rank() == 0 { 3 } else { 99 };
    let mut many = Trainer::new(SeqPolicy::new(5, init_seed), reward, cfg.clone())
        .unwrap()
        .with_collective(c)
        .unwrap();
    // A step first, so that P-GRPO has a history to use.
    let m1 = one.step(&batch_at(0)).unwrap();
    let mn = many.step(&batch_at(0)).unwrap();
    assert_close_metrics(&m1, &mn, &what);
    assert_eq!(
        one.history().to_json().unwrap(),
        many.history().to_json().unwrap()
    );

    let batch = batch_at(1);
    let r1 = one.rollout(&batch).unwrap();
    let rn = many.rollout(&batch).unwrap();
    let g = cfg.num_generations;
    let rows = {
        let s = shard(batch.len(), c.rank(), c.world());
        s.start * g..s.end * g
    };
    assert_eq!(rn.advantages.len(), rows.len());
    let a1: Vec<u32> = r1.advantages[rows.clone()]
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let an: Vec<u32> = rn.advantages.iter().map(|x| x.to_bits()).collect();
    assert_eq!(a1, an, "{what}: advantages");
    assert_eq!(r1.rewards[rows].to_vec(), rn.rewards, "{what}: rewards");
    assert_eq!(
        format!("{:?}", r1.diagnostics),
        format!("{:?}", rn.diagnostics),
        "{what}"
    );
    assert_eq!(r1.group_keys, rn.group_keys);

    let g1: Vec<Vec<f32>> = one.gradients(&r1).unwrap().iter().map(flat).collect();
    let gn: Vec<Vec<f32>> = many.gradients(&rn).unwrap().iter().map(flat).collect();
    let mut worst = 0.0f32;
    for (v, (x, y)) in g1.iter().zip(&gn).enumerate() {
        let scale = max_abs(x).max(1e-3);
        let diff = x
            .iter()
            .zip(y)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-6 * scale,
            "{what}: var {v}: gradient differs by {diff:e} (largest component {scale:e})"
        );
        worst = worst.max(diff / scale);
    }
    c.check_same("the all-reduced gradient", &bits(&gn))
        .unwrap();
    worst
}

/// Relative closeness of every metric two runs report (timings left out); returns the
/// largest relative difference.
fn assert_close_metrics(a: &StepMetrics, b: &StepMetrics, what: &str) -> f64 {
    assert_eq!(
        a.values.keys().collect::<Vec<_>>(),
        b.values.keys().collect::<Vec<_>>(),
        "{what}: metric names"
    );
    let mut worst = 0.0f64;
    for (k, x) in &a.values {
        let y = b.values[k];
        if x.is_nan() && y.is_nan() {
            continue;
        }
        let rel = (x - y).abs() / x.abs().max(1.0);
        assert!(
            rel <= 1e-5,
            "{what}: metric {k}: one process {x}, data-parallel {y}"
        );
        worst = worst.max(rel);
    }
    worst
}

/// `steps` training steps on `N` ranks and in one process: the same metrics (to float
/// tolerance), the same history (bit for bit), the same weights (bit for bit across ranks,
/// to float tolerance against one process).
/// Returns the largest weight difference and the largest relative metric difference.
fn training_matches(c: &Mpi, cfg: TrainerConfig, steps: u64) -> (f32, f64) {
    let what = format!("training, {}", cfg.objective.aggregation.name());
    let reward = |p: &Prompt, comp: &Vec<u32>, g: &GroupKey| score(p, comp, g);
    let mut one = Trainer::new(SeqPolicy::new(5, 8), reward, cfg.clone()).unwrap();
    let mut many = Trainer::new(SeqPolicy::new(5, 8), reward, cfg)
        .unwrap()
        .with_collective(c)
        .unwrap();
    let mut worst_metric = 0.0f64;
    for s in 0..steps {
        let m1 = one.step(&batch_at(s)).unwrap();
        let mn = many.step(&batch_at(s)).unwrap();
        worst_metric =
            worst_metric.max(assert_close_metrics(&m1, &mn, &format!("{what}, step {s}")));
        assert_eq!(
            one.history().to_json().unwrap(),
            many.history().to_json().unwrap(),
            "{what}, step {s}: history"
        );
        assert!(mn.timings.contains_key("all_reduce"));
    }
    many.check_replicas().unwrap();
    let w1 = one.policy().weights();
    let wn = many.policy().weights();
    c.check_same("the weights", &bits(&wn)).unwrap();
    let mut worst = 0.0f32;
    for (x, y) in w1.iter().zip(&wn) {
        let diff = x
            .iter()
            .zip(y)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-5,
            "{what}: weights differ from one process's by {diff:e}"
        );
        worst = worst.max(diff);
    }
    (worst, worst_metric)
}

/// Each rank folds its own rows' statistics and everyone else's, in rank order: the same
/// history on every rank, equal to one process that saw all the rows.
fn merged_history_matches(c: &Mpi, kind: HistoryKind) {
    let (rank, world) = (c.rank(), c.world());
    let keys_all: Vec<GroupKey> = vec!["a".into(), "b".into(), "rare".into()];
    let mut rng = StdRng::seed_from_u64(5);
    // 3 batches of 23 rows; group "rare" only in the last rows.
    let mut pooled = RewardHistory::new(kind).unwrap();
    let mut merged = RewardHistory::new(kind).unwrap();
    pooled.update("a", &[0.5, 0.7]).unwrap();
    merged.update("a", &[0.5, 0.7]).unwrap();
    for _ in 0..3 {
        let n = 23;
        let rewards: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..2.0)).collect();
        let groups: Vec<u32> = (0..n)
            .map(|i| if i >= 20 { 2 } else { (i % 3 == 0) as u32 })
            .collect();
        pooled.update_rows(&keys_all, &groups, &rewards).unwrap();
        // This rank's contiguous rows, with its own key table (first appearance order).
        let rows = shard(n, rank, world);
        let mut keys: Vec<GroupKey> = Vec::new();
        let mut ids = Vec::new();
        for &g in &groups[rows.clone()] {
            let k = &keys_all[g as usize];
            let id = keys.iter().position(|x| x == k).unwrap_or_else(|| {
                keys.push(k.clone());
                keys.len() - 1
            });
            ids.push(id as u32);
        }
        let local = &rewards[rows.clone()];
        // Prompts of two rows; an odd shard's last row joins the prompt before it (every
        // prompt needs two completions for a spread).
        let last = (local.len() as u32 / 2).max(1) - 1;
        let prompt_ids: Vec<u32> = (0..local.len() as u32).map(|i| (i / 2).min(last)).collect();
        let adv = AdvantageConfig {
            estimator: Estimator::DrGrpo,
            ..Default::default()
        }
        .compute(
            &RolloutRewards {
                rewards: local,
                prompt_ids: &prompt_ids,
                group_ids: &ids,
                group_keys: &keys,
            },
            &merged,
        )
        .unwrap();
        pgrpo::distributed::merge_batch_deltas(&c, &mut merged, &keys, &adv.deltas).unwrap();
    }
    c.check_same("the merged history", merged.to_json().unwrap().as_bytes())
        .unwrap();
    for (key, p) in pooled.iter() {
        let m = merged.stats(key).unwrap();
        assert_eq!((p.n, m.n), (p.n, p.n), "{kind:?} {key}");
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(1.0);
        assert!(
            close(p.mean, m.mean),
            "{kind:?} {key}: mean {} vs {}",
            p.mean,
            m.mean
        );
        assert!(
            close(p.std, m.std),
            "{kind:?} {key}: std {} vs {}",
            p.std,
            m.std
        );
        assert!(close(p.weight, m.weight), "{kind:?} {key}: weight");
    }
    assert_eq!(pooled.len(), merged.len());
}

/// A checkpoint of an `N`-rank run resumes exactly on `N` ranks, each rank getting its own
/// reward-function state back.
fn resume_is_exact(c: &Mpi, dir: &Path) {
    let rank = c.rank() as u64;
    let cfg = config(Estimator::PGrpo, LossAggregation::Grpo);
    let fresh = || SeqPolicy::new(5, 21);
    let noisy = || NoisyReward::new(100 + rank);
    let mut a = Trainer::new(fresh(), noisy(), cfg)
        .unwrap()
        .with_collective(c)
        .unwrap();
    a.step(&batch_at(0)).unwrap();
    a.step(&batch_at(1)).unwrap();
    let saved = a.save(dir).unwrap();
    assert!(
        saved.ends_with("checkpoint-000000002"),
        "{}",
        saved.display()
    );
    let mut straight = Vec::new();
    for s in 2..4 {
        straight.push(a.step(&batch_at(s)).unwrap());
    }

    let mut b = Trainer::resume(dir, fresh(), NoisyReward::new(0))
        .unwrap()
        .with_collective(c)
        .unwrap();
    assert_eq!(b.steps_done(), 2);
    for (s, m) in (2..4).zip(&straight) {
        let mb = b.step(&batch_at(s)).unwrap();
        let bits = |m: &StepMetrics| {
            m.values
                .iter()
                .map(|(k, v)| (k.clone(), v.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(m), bits(&mb), "resumed step {s}");
    }
    assert_eq!(bits(&a.policy().weights()), bits(&b.policy().weights()));
    assert_eq!(
        a.history().to_json().unwrap(),
        b.history().to_json().unwrap()
    );

    // A single process cannot take the per-rank reward states of this checkpoint.
    let mut single = Trainer::resume(dir, fresh(), NoisyReward::new(0)).unwrap();
    let e = single.step(&batch_at(2)).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("resume it with"), "{e}");
    c.barrier().unwrap();
}

/// A failure on one rank reaches every rank as an error, in the rollout and in the loss; a
/// rank given another batch is caught; afterwards the ranks step together again.
fn failures_reach_every_rank(c: &Mpi) {
    let (rank, world) = (c.rank(), c.world());
    let cfg = config(Estimator::PGrpo, LossAggregation::Bnpo);
    let mut reward = NoisyReward::new(7 + rank as u64);
    if rank == world - 1 {
        // Its rows of the second step: fail on the first of them.
        let rows_before = shard(batch_at(0).len(), rank, world).len() * cfg.num_generations;
        reward.fail_at = Some(rows_before as u64 + 1);
    }
    let mut t = Trainer::new(SeqPolicy::new(5, 1), reward, cfg)
        .unwrap()
        .with_collective(c)
        .unwrap();
    t.step(&batch_at(0)).unwrap();
    let e = t.step(&batch_at(1)).map(|_| ()).unwrap_err();
    if rank == world - 1 {
        assert!(matches!(e, Error::Reward(_)), "{e}");
    } else {
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("rank {}", world - 1)) && msg.contains("judge"),
            "{msg}"
        );
    }
    // Another batch on one rank.
    let mut batch = batch_at(2);
    if rank == 1 {
        batch[0].group = "z".into();
    }
    let e = t.step(&batch).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("another batch"), "{e}");
    // Too few prompts for the ranks.
    let e = t.step(&batch_at(3)[..world - 1]).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
    // The state did not change and the ranks go on together.
    assert_eq!(t.steps_done(), 1);
    t.step(&batch_at(3)).unwrap();
    t.check_replicas().unwrap();
}
