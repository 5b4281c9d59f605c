//! The trainer's update: gradient accumulation gives the one-pass gradient for every loss
//! aggregation, `steps_per_generation` makes several optimizer updates per rollout, a step
//! happens entirely or not at all, the reference follows the policy (TR-DPO) and resumes
//! exactly, and the step budget is enforced.

use std::cell::Cell;
use std::rc::Rc;

use candle_core::{Device, Tensor, Var, D};
use candle_nn::Optimizer;
use pgrpo::models::TabularPolicy;
use pgrpo::objective::LossAggregation;
use pgrpo::optim::{LrScheduler, OptimizerState};
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::{
    Error, GroupKey, GroupedPrompt, HistoryKind, Policy, Result, StepMetrics, TokenLogProbs,
    Trainer, TrainerConfig,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const VOCAB: usize = 5;
const MAX_LEN: usize = 6;

/// A toy sequence policy: for prompt `p`, the token at position `t` is drawn from
/// `softmax(logits[p, t])`, and a completion has 1 to `MAX_LEN` tokens (its length drawn
/// uniformly). Completions of a batch have different lengths, so micro-batches have different
/// widths and token counts: what the aggregations' denominators depend on.
struct SeqPolicy {
    logits: Var,
}

impl SeqPolicy {
    fn new(prompts: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let init: Vec<f32> = (0..prompts * MAX_LEN * VOCAB)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let t = Tensor::from_vec(init, (prompts, MAX_LEN, VOCAB), &Device::Cpu).unwrap();
        Self {
            logits: Var::from_tensor(&t).unwrap(),
        }
    }
}

impl Policy for SeqPolicy {
    type Prompt = u32;
    type Completion = Vec<u32>;

    fn device(&self) -> &Device {
        self.logits.device()
    }

    fn sample(&self, prompts: &[u32], n: usize, rng: &mut StdRng) -> Result<Vec<Vec<u32>>> {
        let probs = candle_nn::ops::softmax_last_dim(self.logits.as_tensor())?.to_vec3::<f32>()?;
        let mut out = Vec::new();
        for &p in prompts {
            for _ in 0..n {
                let len = rng.random_range(1..=MAX_LEN);
                let seq = (0..len)
                    .map(|t| {
                        let u: f32 = rng.random();
                        let mut acc = 0.0;
                        for (a, q) in probs[p as usize][t].iter().enumerate() {
                            acc += q;
                            if u < acc {
                                return a as u32;
                            }
                        }
                        VOCAB as u32 - 1
                    })
                    .collect();
                out.push(seq);
            }
        }
        Ok(out)
    }

    fn log_probs(&self, prompts: &[&u32], completions: &[Vec<u32>]) -> Result<TokenLogProbs> {
        let dev = self.device();
        let b = prompts.len();
        let width = completions.iter().map(Vec::len).max().unwrap_or(0);
        let lsm = candle_nn::ops::log_softmax(self.logits.as_tensor(), D::Minus1)?;
        let rows = Tensor::new(prompts.iter().map(|p| **p).collect::<Vec<_>>(), dev)?;
        let sel = lsm
            .index_select(&rows, 0)?
            .narrow(1, 0, width)?
            .contiguous()?; // (B, T, V)
        let mut tok = vec![0u32; b * width];
        let mut mask = vec![0f32; b * width];
        for (i, c) in completions.iter().enumerate() {
            for (t, &x) in c.iter().enumerate() {
                tok[i * width + t] = x;
                mask[i * width + t] = 1.0;
            }
        }
        let tok = Tensor::from_vec(tok, (b, width, 1), dev)?;
        let logp = sel.gather(&tok, 2)?.squeeze(2)?;
        let entropy = (sel.exp()? * &sel)?.sum(2)?.neg()?.detach();
        Ok(TokenLogProbs {
            logp,
            mask: Tensor::from_vec(mask, (b, width), dev)?,
            entropy: Some(entropy),
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.logits.clone()]
    }

    /// The generation budget: `MAX_LEN` tokens.
    fn max_completion_len(&self) -> Option<usize> {
        Some(MAX_LEN)
    }

    /// A completion of `MAX_LEN` tokens was cut by the budget.
    fn is_truncated(&self, completion: &Vec<u32>) -> bool {
        completion.len() == MAX_LEN
    }

    fn snapshot(&self) -> Result<Self> {
        Ok(Self {
            logits: Var::from_tensor(&self.logits.as_tensor().copy()?)?,
        })
    }
}

/// Rewards that differ between completions of a prompt, except prompt 4's (all equal).
#[allow(clippy::ptr_arg)]
fn seq_reward(p: &u32, c: &Vec<u32>, g: &GroupKey) -> f32 {
    if *p == 4 {
        return 0.5; // one zero-spread prompt
    }
    let hits = c.iter().filter(|&&t| t == *p % VOCAB as u32).count() as f32;
    let bias = if g == &GroupKey::from("b") { 0.3 } else { 0.0 };
    hits / c.len() as f32 + bias - 0.05 * c.len() as f32
}

fn seq_batch() -> Vec<GroupedPrompt<u32>> {
    (0..5u32)
        .map(|p| GroupedPrompt::new(p, if p % 2 == 0 { "a" } else { "b" }))
        .collect()
}

fn flat(ts: &[Tensor]) -> Vec<f32> {
    ts.iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn weights(vars: &[Var]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| {
            let x = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            x.iter().map(|f| f.to_bits()).collect()
        })
        .collect()
}

#[track_caller]
fn assert_grads_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "{what}: an all-zero gradient proves nothing");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 2e-6 * scale,
            "{what}: element {i}: {x} vs {y} (scale {scale})"
        );
    }
}

fn seq_config(aggregation: LossAggregation, max_len: Option<usize>, beta: f32) -> TrainerConfig {
    let mut c = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.1,
        seed: 3,
        max_grad_norm: None,
        ..Default::default()
    };
    c.advantage.estimator = pgrpo::Estimator::Grpo;
    c.objective.aggregation = aggregation;
    c.objective.max_completion_len = max_len;
    c.objective.beta = beta;
    c
}

/// Gradient accumulation over micro-batches gives the one-pass gradient, for every
/// aggregation (with its own denominator: rows, tokens, rows × width), with and without a KL
/// reference, with uneven micro-batches and with more micro-batches than rows (empty ones).
#[test]
fn accumulated_gradients_equal_the_one_pass_gradient_for_every_aggregation() {
    let batch = seq_batch(); // 5 prompts × 4 = 20 rows
    let cases = [
        (LossAggregation::Grpo, None, 0.0),
        (LossAggregation::Bnpo, None, 0.0),
        (LossAggregation::DrGrpo, None, 0.0),
        (LossAggregation::DrGrpo, Some(8), 0.0),
        (LossAggregation::Bnpo, None, 0.04),
        (LossAggregation::Grpo, None, 0.04),
    ];
    for (aggregation, max_len, beta) in cases {
        let base = seq_config(aggregation, max_len, beta);
        let mut one = Trainer::new(SeqPolicy::new(5, 1), seq_reward, base.clone()).unwrap();
        let r1 = one.rollout(&batch).unwrap();
        let g1 = flat(&one.gradients(&r1).unwrap());
        for ga in [2, 3, 8, 25] {
            let mut c = base.clone();
            c.gradient_accumulation_steps = ga;
            let mut acc = Trainer::new(SeqPolicy::new(5, 1), seq_reward, c).unwrap();
            let r = acc.rollout(&batch).unwrap();
            assert_eq!(r.completions, r1.completions, "same samples");
            let g = flat(&acc.gradients(&r).unwrap());
            assert_grads_close(
                &g1,
                &g,
                &format!("{aggregation:?} max_len {max_len:?} beta {beta} ga {ga}"),
            );
        }
    }
}

/// A whole step with accumulation: the same loss and metrics as one pass, and (with SGD,
/// whose update is linear in the gradient) the same weights to `f32` rounding. Also with
/// zero-spread prompts masked out of the loss.
#[test]
fn an_accumulated_step_matches_a_one_pass_step() {
    let batch = seq_batch();
    for mask_zero_std in [false, true] {
        let run = |ga: usize| -> (StepMetrics, Vec<f32>) {
            let mut c = seq_config(LossAggregation::Bnpo, None, 0.04);
            c.gradient_accumulation_steps = ga;
            c.mask_zero_std_prompts = mask_zero_std;
            let p = SeqPolicy::new(5, 2);
            let sgd = candle_nn::SGD::new(p.vars(), 0.5).unwrap();
            let mut t = Trainer::with_optimizer(p, seq_reward, c, sgd).unwrap();
            let m = t.step(&batch).unwrap();
            let w = flat(&[t.policy().vars()[0].as_tensor().clone()]);
            (m, w)
        };
        let (m1, w1) = run(1);
        let (m4, w4) = run(4);
        for name in [
            "loss",
            "policy_loss",
            "kl",
            "approx_kl",
            "clip_ratio/region_mean",
            "entropy",
            "completions/mean_length",
            "grad_norm",
        ] {
            let (a, b) = (m1.get(name).unwrap(), m4.get(name).unwrap());
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(1e-3),
                "{name}: {a} vs {b}"
            );
        }
        assert_eq!(m4.get("skipped_update"), Some(0.0));
        let moved = w1
            .iter()
            .zip(&w4)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(moved < 1e-6, "weights differ by {moved}");
    }
}

/// `steps_per_generation = 4` with `gradient_accumulation_steps = 2`: two optimizer updates
/// per rollout (AdamW counts them), the second from the sampling policy's log-probs (the
/// ratio leaves 1, so `approx_kl > 0`), and the learning rate of the trainer step.
#[test]
fn steps_per_generation_makes_several_updates_per_rollout() {
    let batch = seq_batch();
    let mut c = seq_config(LossAggregation::Grpo, None, 0.0);
    c.gradient_accumulation_steps = 2;
    c.steps_per_generation = Some(4);
    assert_eq!(c.optimizer_steps_per_step(), 2);
    let mut t = Trainer::new(SeqPolicy::new(5, 3), seq_reward, c.clone()).unwrap();
    let m = t.step(&batch).unwrap();
    assert_eq!(t.optimizer().state().unwrap().step, 2);
    assert_eq!(m.get("skipped_update"), Some(0.0));
    assert!(
        m.get("approx_kl").unwrap() > 0.0,
        "{:?}",
        m.get("approx_kl")
    );
    // With num_iterations = 2 the rollout is used twice: four updates.
    c.num_iterations = 2;
    let mut t = Trainer::new(SeqPolicy::new(5, 3), seq_reward, c).unwrap();
    t.step(&batch).unwrap();
    assert_eq!(t.optimizer().state().unwrap().step, 4);
}

#[test]
fn accumulation_settings_are_validated() {
    let field = |c: TrainerConfig| match c.validate() {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    let mut c = TrainerConfig {
        gradient_accumulation_steps: 0,
        ..Default::default()
    };
    assert_eq!(field(c.clone()), "gradient_accumulation_steps");
    c.gradient_accumulation_steps = 3;
    c.steps_per_generation = Some(4);
    assert_eq!(field(c.clone()), "steps_per_generation");
    c.steps_per_generation = Some(0);
    assert_eq!(field(c.clone()), "steps_per_generation");
    c.steps_per_generation = Some(6);
    c.validate().unwrap();
    assert_eq!(c.optimizer_steps_per_generation(), 2);
}

/// A policy that fails on its `n`-th differentiable forward pass after being armed
/// (detached passes, used by the rollout for old and reference log-probs, do not count).
struct Flaky<P> {
    inner: P,
    countdown: Rc<Cell<Option<usize>>>,
}

impl<P: Policy> Policy for Flaky<P> {
    type Prompt = P::Prompt;
    type Completion = P::Completion;

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn sample(
        &self,
        prompts: &[P::Prompt],
        n: usize,
        rng: &mut StdRng,
    ) -> Result<Vec<P::Completion>> {
        self.inner.sample(prompts, n, rng)
    }

    fn log_probs(
        &self,
        prompts: &[&P::Prompt],
        completions: &[P::Completion],
    ) -> Result<TokenLogProbs> {
        if let Some(n) = self.countdown.get() {
            if n <= 1 {
                self.countdown.set(None);
                return Err(Error::Reward("injected failure of a forward pass".into()));
            }
            self.countdown.set(Some(n - 1));
        }
        self.inner.log_probs(prompts, completions)
    }

    fn log_probs_detached(
        &self,
        prompts: &[&P::Prompt],
        completions: &[P::Completion],
    ) -> Result<TokenLogProbs> {
        self.inner.log_probs_detached(prompts, completions)
    }

    fn vars(&self) -> Vec<Var> {
        self.inner.vars()
    }

    fn snapshot(&self) -> Result<Self> {
        Ok(Self {
            inner: self.inner.snapshot()?,
            countdown: Rc::new(Cell::new(None)),
        })
    }
}

fn bandit() -> PreferenceBandit {
    PreferenceBandit::new(vec![0.6, 0.4], vec![1.0, 0.5], 4, 0.5, 0.1).unwrap()
}

fn bandit_batch(seed: u64) -> Vec<GroupedPrompt<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    bandit()
        .sample_groups(8, &mut rng)
        .into_iter()
        .map(|g| GroupedPrompt::new(g, GroupKey::Name(format!("g{g}"))))
        .collect()
}

/// A reward without state, so that a retried step scores its batch as the first try did.
fn pure_reward(c: &u32, a: &u32, _g: &GroupKey) -> f32 {
    if a == c {
        1.0
    } else {
        0.2 * *a as f32
    }
}

/// The state a failed step must leave alone: weights, history, step, optimizer step and
/// moments.
type State = (Vec<Vec<u32>>, String, u64, u64, Vec<Vec<u32>>);

fn state<P, R>(t: &Trainer<P, R>) -> State
where
    P: Policy<Prompt = u32, Completion = u32>,
    R: pgrpo::RewardFn<u32, u32>,
{
    let opt = t.optimizer().export_state().unwrap().unwrap();
    let moments = weights(
        &opt.tensors
            .iter()
            .map(|(_, x)| Var::from_tensor(x).unwrap())
            .collect::<Vec<_>>(),
    );
    (
        weights(&t.policy().vars()),
        t.history().to_json().unwrap(),
        t.steps_done(),
        opt.step,
        moments,
    )
}

/// Defect 6: with several optimizer updates per step, a failure in a later update used to
/// return after the earlier updates were applied (history and step counter untouched), so a
/// retry resampled on changed weights. Now the step is undone: the trainer is exactly as
/// before, and retrying gives the run that never failed, bit for bit.
#[test]
fn a_step_that_fails_in_a_later_update_changes_nothing() {
    // (num_iterations, gradient_accumulation_steps, steps_per_generation, failing forward)
    for (mu, ga, spg, fail_at) in [
        (2, 1, None, 2),
        (3, 1, None, 3),
        (1, 1, Some(2), 2),
        (2, 2, None, 3),
    ] {
        let mut cfg = TrainerConfig {
            num_generations: 4,
            num_iterations: mu,
            gradient_accumulation_steps: ga,
            steps_per_generation: spg,
            learning_rate: 0.05,
            seed: 9,
            ..Default::default()
        };
        cfg.objective.beta = 0.04;
        let countdown = Rc::new(Cell::new(None));
        let flaky = Flaky {
            inner: bandit().policy(&Device::Cpu).unwrap(),
            countdown: countdown.clone(),
        };
        let mut a = Trainer::new(flaky, pure_reward, cfg.clone()).unwrap();
        let mut b = Trainer::new(
            Flaky {
                inner: bandit().policy(&Device::Cpu).unwrap(),
                countdown: Rc::new(Cell::new(None)),
            },
            pure_reward,
            cfg,
        )
        .unwrap();
        a.step(&bandit_batch(0)).unwrap();
        b.step(&bandit_batch(0)).unwrap();
        let before = state(&a);
        countdown.set(Some(fail_at));
        let err = a.step(&bandit_batch(1)).unwrap_err();
        assert!(matches!(err, Error::Reward(_)), "{err}");
        assert!(countdown.get().is_none(), "the failure was reached");
        assert_eq!(
            state(&a),
            before,
            "mu {mu} ga {ga} spg {spg:?}: state changed"
        );
        assert_eq!(
            weights(&a.reference().unwrap().vars()),
            weights(&b.reference().unwrap().vars())
        );
        // The retry is the step the uninterrupted run makes.
        let ma = a.step(&bandit_batch(1)).unwrap();
        let mb = b.step(&bandit_batch(1)).unwrap();
        assert_eq!(ma.values, mb.values);
        assert_eq!(state(&a), state(&b));
    }
}

/// An optimizer that cannot export its state cannot undo a step of several updates: the
/// step is refused before anything changes. With one update per step it trains.
#[test]
fn a_step_of_several_updates_needs_an_optimizer_with_state() {
    let cfg = TrainerConfig {
        num_generations: 4,
        num_iterations: 2,
        learning_rate: 0.05,
        ..Default::default()
    };
    let p = bandit().policy(&Device::Cpu).unwrap();
    let opt = candle_nn::AdamW::new(p.vars(), Default::default()).unwrap();
    let mut t = Trainer::with_optimizer(p, bandit().reward_fn(1), cfg.clone(), opt).unwrap();
    let w = weights(&t.policy().vars());
    let err = t.step(&bandit_batch(0)).unwrap_err();
    assert!(
        matches!(&err, Error::OptimizerState(m) if m.contains("pgrpo::optim::AdamW")),
        "{err}"
    );
    assert_eq!(weights(&t.policy().vars()), w);
    assert_eq!(t.steps_done(), 0);
    let p = bandit().policy(&Device::Cpu).unwrap();
    let opt = candle_nn::AdamW::new(p.vars(), Default::default()).unwrap();
    let one = TrainerConfig {
        num_iterations: 1,
        ..cfg
    };
    let mut t = Trainer::with_optimizer(p, bandit().reward_fn(1), one, opt).unwrap();
    t.step(&bandit_batch(0)).unwrap();
}

fn sync_config(every: u64) -> TrainerConfig {
    let mut c = TrainerConfig {
        num_generations: 4,
        num_iterations: 2,
        learning_rate: 0.05,
        seed: 4,
        sync_ref_model: true,
        ref_model_sync_steps: every,
        ref_model_mixup_alpha: 0.6,
        history: HistoryKind::Exponential { half_life: 8.0 },
        ..Default::default()
    };
    c.objective.beta = 0.04;
    c
}

fn tensors(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// TR-DPO: after every `ref_model_sync_steps`-th step, `ref ← α · policy + (1 − α) · ref`;
/// between them the reference stays frozen.
#[test]
fn the_reference_is_mixed_toward_the_policy_every_sync_steps() {
    let mut t = Trainer::new(
        bandit().policy(&Device::Cpu).unwrap(),
        bandit().reward_fn(2),
        sync_config(2),
    )
    .unwrap();
    let r0 = tensors(&t.reference().unwrap().vars());
    t.step(&bandit_batch(0)).unwrap();
    assert_eq!(
        tensors(&t.reference().unwrap().vars()),
        r0,
        "step 1: not yet"
    );
    assert_ne!(tensors(&t.policy().vars()), r0, "the policy moved");
    t.step(&bandit_batch(1)).unwrap();
    let p2 = tensors(&t.policy().vars());
    let r2 = tensors(&t.reference().unwrap().vars());
    for ((r, p), old) in r2.iter().zip(&p2).zip(&r0) {
        for ((x, y), z) in r.iter().zip(p).zip(old) {
            let want = 0.6 * y + 0.4 * z;
            assert!((x - want).abs() < 1e-6, "{x} vs {want}");
        }
    }
    t.step(&bandit_batch(2)).unwrap();
    assert_eq!(
        tensors(&t.reference().unwrap().vars()),
        r2,
        "step 3: frozen"
    );
}

/// A run with a synchronised reference resumes exactly: same metrics, bit-identical weights
/// and reference weights as the run that never stopped.
#[test]
fn a_synchronised_reference_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let new = || {
        Trainer::new(
            bandit().policy(&Device::Cpu).unwrap(),
            bandit().reward_fn(2),
            sync_config(3),
        )
        .unwrap()
    };
    let mut whole = new();
    let mut first = new();
    for s in 0..4 {
        whole.step(&bandit_batch(s)).unwrap();
        first.step(&bandit_batch(s)).unwrap();
    }
    first.save(dir.path()).unwrap();
    let mut resumed = Trainer::resume(
        dir.path(),
        bandit().policy(&Device::Cpu).unwrap(),
        bandit().reward_fn(2),
    )
    .unwrap();
    for s in 4..8 {
        let a = whole.step(&bandit_batch(s)).unwrap();
        let b = resumed.step(&bandit_batch(s)).unwrap();
        assert_eq!(a.values, b.values, "step {s}");
    }
    assert_eq!(
        weights(&whole.policy().vars()),
        weights(&resumed.policy().vars())
    );
    assert_eq!(
        weights(&whole.reference().unwrap().vars()),
        weights(&resumed.reference().unwrap().vars())
    );
}

#[test]
fn reference_sync_settings_are_validated() {
    let field = |c: TrainerConfig| match c.validate() {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    let mut c = sync_config(2);
    c.objective.beta = 0.0;
    assert_eq!(field(c), "sync_ref_model");
    let mut c = sync_config(0);
    assert_eq!(field(c.clone()), "ref_model_sync_steps");
    c.ref_model_sync_steps = 1;
    c.ref_model_mixup_alpha = 1.5;
    assert_eq!(field(c), "ref_model_mixup_alpha");
}

/// A reference without weights of its own (here: an empty `vars()`, as a LoRA policy's
/// adapters-off reference has) is refused when the trainer is built.
#[test]
fn a_reference_without_weights_cannot_be_synchronised() {
    struct SharedBase(TabularPolicy, bool);
    impl Policy for SharedBase {
        type Prompt = u32;
        type Completion = u32;
        fn device(&self) -> &Device {
            self.0.device()
        }
        fn sample(&self, p: &[u32], n: usize, rng: &mut StdRng) -> Result<Vec<u32>> {
            self.0.sample(p, n, rng)
        }
        fn log_probs(&self, p: &[&u32], c: &[u32]) -> Result<TokenLogProbs> {
            self.0.log_probs(p, c)
        }
        fn vars(&self) -> Vec<Var> {
            if self.1 {
                Vec::new()
            } else {
                self.0.vars()
            }
        }
        fn snapshot(&self) -> Result<Self> {
            Ok(SharedBase(self.0.snapshot()?, true))
        }
    }
    let p = SharedBase(bandit().policy(&Device::Cpu).unwrap(), false);
    let err = Trainer::new(p, bandit().reward_fn(1), sync_config(2))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig { field: "sync_ref_model", reason } if reason.contains("LoRA")),
        "{err}"
    );
}

/// Defect 7: the trainer used to step past `max_steps` with a learning rate of 0. It now
/// stops there (as TRL does), before sampling, with a typed error; the run's state is intact.
#[test]
fn stepping_past_max_steps_is_refused() {
    let cfg = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.05,
        lr_scheduler: LrScheduler::Linear,
        max_steps: Some(2),
        ..Default::default()
    };
    let mut t = Trainer::new(
        bandit().policy(&Device::Cpu).unwrap(),
        bandit().reward_fn(1),
        cfg,
    )
    .unwrap();
    let lrs: Vec<f64> = (0..2)
        .map(|s| {
            t.step(&bandit_batch(s))
                .unwrap()
                .get("learning_rate")
                .unwrap()
        })
        .collect();
    assert_eq!(lrs, [0.05, 0.025]);
    let w = weights(&t.policy().vars());
    let err = t.step(&bandit_batch(2)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "max_steps",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(t.steps_done(), 2);
    assert_eq!(weights(&t.policy().vars()), w);
}

/// Defect 7: a warm-up as long as the run was accepted; the schedule never left it.
#[test]
fn a_warmup_as_long_as_the_run_is_refused() {
    for warmup in [4, 5] {
        let c = TrainerConfig {
            warmup_steps: warmup,
            max_steps: Some(4),
            lr_scheduler: LrScheduler::Cosine,
            ..Default::default()
        };
        assert!(
            matches!(
                c.validate(),
                Err(Error::InvalidConfig {
                    field: "warmup_steps",
                    ..
                })
            ),
            "warmup {warmup}"
        );
    }
    TrainerConfig {
        warmup_steps: 3,
        max_steps: Some(4),
        ..Default::default()
    }
    .validate()
    .unwrap();
}

/// Masked zero-spread prompts leave the rows `B` as well as the tokens `N`, under every
/// aggregation: the gradient with prompt 4 (zero spread, the batch's last) masked out equals
/// the gradient of the batch without it. Before, `grpo` and `dr_grpo` still divided by its
/// rows.
#[test]
fn masked_prompts_leave_every_denominator() {
    let full = seq_batch();
    let without: Vec<_> = full[..4].to_vec();
    for aggregation in LossAggregation::ALL {
        let mut c = seq_config(aggregation, None, 0.0);
        c.mask_zero_std_prompts = true;
        let mut masked = Trainer::new(SeqPolicy::new(5, 4), seq_reward, c).unwrap();
        let r = masked.rollout(&full).unwrap();
        let g_masked = flat(&masked.gradients(&r).unwrap());
        let c = seq_config(aggregation, None, 0.0);
        let mut fewer = Trainer::new(SeqPolicy::new(5, 4), seq_reward, c).unwrap();
        let r_fewer = fewer.rollout(&without).unwrap();
        assert_eq!(r.completions[..16], r_fewer.completions[..], "same samples");
        let g_fewer = flat(&fewer.gradients(&r_fewer).unwrap());
        assert_grads_close(&g_fewer, &g_masked, &format!("{aggregation:?}"));
    }
}

/// Dr. GRPO's constant is the policy's generation budget when the config sets none (TRL's
/// `max_completion_length`), not the batch's widest completion.
#[test]
fn dr_grpo_takes_the_policys_budget() {
    let batch = seq_batch();
    let grads = |max_len: Option<usize>| {
        let c = seq_config(LossAggregation::DrGrpo, max_len, 0.0);
        let mut t = Trainer::new(SeqPolicy::new(5, 5), seq_reward, c).unwrap();
        assert_eq!(
            t.config().objective.max_completion_len,
            Some(max_len.unwrap_or(MAX_LEN))
        );
        let r = t.rollout(&batch).unwrap();
        flat(&t.gradients(&r).unwrap())
    };
    let (unset, budget, other) = (grads(None), grads(Some(MAX_LEN)), grads(Some(3 * MAX_LEN)));
    assert_grads_close(&budget, &unset, "unset = the policy's budget");
    let scaled: Vec<f32> = other.iter().map(|g| g * 3.0).collect();
    assert_grads_close(&budget, &scaled, "a set constant is kept");
}

/// `mask_truncated_completions`: completions cut by the budget (here: `MAX_LEN` tokens) leave
/// the loss, so no gradient reaches the last position, which only they reach.
#[test]
fn truncated_completions_leave_the_loss() {
    let batch = seq_batch();
    let last_position_grad = |mask: bool| {
        let mut c = seq_config(LossAggregation::Bnpo, None, 0.0);
        c.mask_truncated_completions = mask;
        let mut t = Trainer::new(SeqPolicy::new(5, 6), seq_reward, c).unwrap();
        let r = t.rollout(&batch).unwrap();
        assert!(
            r.completions.iter().any(|c| c.len() == MAX_LEN),
            "the batch needs truncated completions"
        );
        let g = t.gradients(&r).unwrap().remove(0); // (prompts, MAX_LEN, VOCAB)
        let last = g.narrow(1, MAX_LEN - 1, 1).unwrap();
        let all = flat(&[g]).iter().fold(0f32, |m, x| m.max(x.abs()));
        let last = flat(&[last]).iter().fold(0f32, |m, x| m.max(x.abs()));
        (last, all)
    };
    let (last, all) = last_position_grad(false);
    assert!(last > 0.0 && all > 0.0);
    let (last, all) = last_position_grad(true);
    assert_eq!(last, 0.0);
    assert!(all > 0.0, "the other rows still learn");
}

/// The entropy bonus needs an entropy that carries the gradient; a policy whose entropy is
/// detached is refused with the field named (the high-entropy mask only needs its values).
#[test]
fn an_entropy_bonus_needs_a_differentiable_entropy() {
    let batch = seq_batch();
    let mut c = seq_config(LossAggregation::Grpo, None, 0.0);
    c.objective.entropy_coef = 0.01;
    let mut t = Trainer::new(SeqPolicy::new(5, 7), seq_reward, c).unwrap();
    let err = t.step(&batch).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidConfig {
                field: "objective.entropy_coef",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(t.steps_done(), 0, "nothing happened");
    let mut c = seq_config(LossAggregation::Grpo, None, 0.0);
    c.objective.top_entropy_quantile = 0.5;
    let mut t = Trainer::new(SeqPolicy::new(5, 7), seq_reward, c).unwrap();
    let m = t.step(&batch).unwrap();
    assert_eq!(m.get("skipped_update"), Some(0.0));
}
