//! One training run on the preference bandit with the crate's [`Trainer`], advantages
//! replaced by a prototype estimator between `rollout` and `update`.
//!
//! The run is set up exactly as `examples/grpo_vs_pgrpo.rs` sets up its runs (same seeds for
//! the reward noise, the prompt stream, the shuffled labels and the sampling), so for the same
//! seed the lab's `grpo` and `p_grpo` reproduce that example's curves bit for bit.

use candle_core::Device;
use pgrpo::models::TabularPolicy;
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::{
    AdvantageConfig, Estimator, GroupKey, GroupedPrompt, HistoryKind, Policy, Trainer,
    TrainerConfig,
};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::batch::BatchView;
use crate::estimators::{LabEstimator, Rule};

/// A bandit setting ("cell" of the study, without `G`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setting {
    /// Short name for tables.
    pub name: String,
    /// Group frequencies (the last is the smallest group).
    pub frequencies: Vec<f64>,
    /// Reward scales.
    pub scales: Vec<f32>,
    /// Actions.
    pub actions: usize,
    /// Quality of the majority's action for the other groups.
    pub majority_quality: f32,
    /// Reward noise std relative to the scale.
    pub noise: f32,
}

impl Setting {
    /// The bandit.
    pub fn bandit(&self) -> pgrpo::Result<PreferenceBandit> {
        PreferenceBandit::new(
            self.frequencies.clone(),
            self.scales.clone(),
            self.actions,
            self.majority_quality,
            self.noise,
        )
    }

    /// Index of the smallest group (the last with the lowest frequency).
    pub fn smallest(&self) -> usize {
        let mut best = 0;
        for (k, f) in self.frequencies.iter().enumerate() {
            if *f <= self.frequencies[best] {
                best = k;
            }
        }
        best
    }

    /// Index of the group with a 15% share, if any.
    pub fn fifteen(&self) -> Option<usize> {
        self.frequencies
            .iter()
            .position(|f| (f - 0.15).abs() < 1e-9)
    }
}

/// Training hyper-parameters shared by every run (those of `grpo_vs_pgrpo`'s defaults).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Steps per run.
    pub steps: usize,
    /// Prompts per step.
    pub prompts: usize,
    /// Adam learning rate.
    pub lr: f64,
}

/// One run's specification.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Completions per prompt.
    pub g: usize,
    /// The estimator.
    pub rule: Rule,
    /// Random group labels (the paper's ablation).
    pub shuffled: bool,
    /// Seed.
    pub seed: u64,
    /// Run the trainer with this crate estimator and check, at every step, that the lab's
    /// advantages equal the crate's bit for bit.
    pub verify: Option<AdvantageConfig>,
    /// Record the per-step diagnostics.
    pub diagnose: bool,
}

/// Per step and true group: what the diagnosis looks at (`NaN` when the group had no prompt).
#[derive(Debug, Clone, Copy)]
pub struct GroupStep {
    /// Batch mean reward of the group's rows.
    pub batch_mean: f64,
    /// History mean `μ_p` and std `σ_p` before the batch (`NaN` while cold).
    pub hist_mean: f64,
    /// See `hist_mean`.
    pub hist_std: f64,
    /// Oracle mean `μ*` and std `σ*` of the group's reward under the sampling policy.
    pub oracle_mean: f64,
    /// See `oracle_mean`.
    pub oracle_std: f64,
    /// Fraction of the group's rows with `A > 0`.
    pub frac_pos: f64,
    /// Fraction of rows with a non-preferred action that got `A > 0`.
    pub frac_pos_bad: f64,
    /// Mean within-prompt sample std of the advantages.
    pub spread: f64,
    /// Mean over prompts of `|mean advantage of the prompt|` (the offset's size).
    pub offset_abs: f64,
    /// Fraction of the group's prompts whose rewards are all equal.
    pub zero_spread: f64,
    /// `Σ_i A_i (1[a_i = k] − π_k)/rows`: the advantage-weighted push of the group's rows
    /// on its own preferred action's logit (> 0: toward the optimum).
    pub push: f64,
    /// The same push on the logit of the majority's action 0 (for a minority: the
    /// compromise; > 0: toward it).
    pub push0: f64,
}

impl GroupStep {
    const NAN: GroupStep = GroupStep {
        batch_mean: f64::NAN,
        hist_mean: f64::NAN,
        hist_std: f64::NAN,
        oracle_mean: f64::NAN,
        oracle_std: f64::NAN,
        frac_pos: f64::NAN,
        frac_pos_bad: f64::NAN,
        spread: f64::NAN,
        offset_abs: f64::NAN,
        zero_spread: f64::NAN,
        push: f64::NAN,
        push0: f64::NAN,
    };
}

/// What a run produces.
#[derive(Debug, Clone)]
pub struct RunOut {
    /// `curves[step][group]`: fraction of the group's optimum after `step` updates.
    pub curves: Vec<Vec<f64>>,
    /// `diag[step][group]` (empty unless asked for).
    pub diag: Vec<Vec<GroupStep>>,
    /// Steps whose lab advantages differed from the crate's (only with `verify`).
    pub mismatched_steps: usize,
    /// Rows with `|A| > 50`.
    pub blowups: u64,
    /// The policy's shared logits at the end.
    pub shared_logits: Vec<f32>,
}

/// `(μ*, σ*)` of each true group's reward under `policy`.
fn oracle(bandit: &PreferenceBandit, policy: &TabularPolicy) -> pgrpo::Result<Vec<(f64, f64)>> {
    let probs = policy.probs()?;
    Ok((0..bandit.num_groups())
        .map(|k| {
            let s = bandit.scales[k] as f64;
            let (mut m1, mut m2) = (0.0, 0.0);
            for (&p, &q) in probs[k].iter().zip(&bandit.quality[k]) {
                m1 += p as f64 * q as f64;
                m2 += p as f64 * (q as f64).powi(2);
            }
            let noise = bandit.noise_std as f64;
            let var = (m2 - m1 * m1).max(0.0) + noise * noise;
            (s * m1, s * var.sqrt())
        })
        .collect())
}

/// Runs one seed.
pub fn run(
    setting: &Setting,
    sched: &Schedule,
    spec: &RunSpec,
) -> Result<RunOut, Box<dyn std::error::Error + Send + Sync>> {
    let bandit = setting.bandit()?;
    let seed = spec.seed;
    let mut cfg = TrainerConfig {
        num_generations: spec.g,
        learning_rate: sched.lr,
        seed,
        history: HistoryKind::Cumulative,
        ..Default::default()
    };
    let crate_rule = spec.rule.crate_config();
    if crate_rule.is_some() && (spec.diagnose || spec.verify.is_some()) {
        return Err("a crate estimator is neither diagnosed nor verified".into());
    }
    cfg.advantage = match (crate_rule, spec.verify) {
        (Some(c), _) | (None, Some(c)) => c,
        (None, None) => AdvantageConfig {
            estimator: Estimator::Grpo,
            ..Default::default()
        },
    };
    let policy = bandit.policy(&Device::Cpu)?;
    let mut trainer = Trainer::new(policy, bandit.reward_fn(seed.wrapping_mul(7919) + 1), cfg)?;
    let mut data_rng = StdRng::seed_from_u64(seed.wrapping_mul(104_729) + 3);
    let mut label_rng = StdRng::seed_from_u64(seed.wrapping_mul(15_485_863) + 5);
    let mut est = LabEstimator::new(spec.rule.clone());
    let k = bandit.num_groups();
    let mut curves = vec![bandit.evaluate(trainer.policy())?];
    let mut diag = Vec::new();
    let mut mismatched_steps = 0;
    for _ in 0..sched.steps {
        let groups = bandit.sample_groups(sched.prompts, &mut data_rng);
        let labels = if spec.shuffled {
            bandit.sample_groups(sched.prompts, &mut label_rng)
        } else {
            groups.clone()
        };
        let batch: Vec<GroupedPrompt<u32>> = groups
            .iter()
            .zip(&labels)
            .map(|(&g, &l)| GroupedPrompt::new(g, GroupKey::Name(format!("g{l}"))))
            .collect();
        let needs_oracle = spec.diagnose || spec.rule.uses_oracle();
        let orc = if needs_oracle {
            oracle(&bandit, trainer.policy())?
        } else {
            vec![(f64::NAN, f64::NAN); k]
        };
        let probs = if spec.diagnose {
            trainer.policy().probs()?
        } else {
            Vec::new()
        };
        let mut rollout = trainer.rollout(&batch)?;
        if crate_rule.is_some() {
            // The crate's estimator: the lab only counts blow-ups.
            est.blowups += rollout.advantages.iter().filter(|a| a.abs() > 50.0).count() as u64;
            trainer.update(rollout)?;
            curves.push(bandit.evaluate(trainer.policy())?);
            continue;
        }
        let true_groups: Vec<usize> = groups.iter().map(|&g| g as usize).collect();
        let view = BatchView::new(
            &rollout.rewards,
            &rollout.completions,
            &rollout.group_ids,
            &rollout.group_keys,
            &true_groups,
            spec.g,
            &orc,
        );
        let adv = est.advantages(&view);
        if spec.verify.is_some()
            && adv
                .iter()
                .zip(&rollout.advantages)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            mismatched_steps += 1;
        }
        if spec.diagnose {
            diag.push(diagnose_step(&est, &view, &adv, &probs, &orc, k));
        }
        est.fold(&view, &rollout.group_ids);
        rollout.advantages = adv;
        trainer.update(rollout)?;
        curves.push(bandit.evaluate(trainer.policy())?);
    }
    let shared_logits = trainer.policy().vars()[0]
        .as_tensor()
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(RunOut {
        curves,
        diag,
        mismatched_steps,
        blowups: est.blowups,
        shared_logits,
    })
}

/// The diagnosis numbers of one step, per true group (labels are the true groups here).
fn diagnose_step(
    est: &LabEstimator,
    view: &BatchView<'_>,
    adv: &[f32],
    probs: &[Vec<f32>],
    orc: &[(f64, f64)],
    k: usize,
) -> Vec<GroupStep> {
    (0..k)
        .map(|grp| {
            let prompts: Vec<_> = view
                .prompts
                .iter()
                .filter(|p| p.true_group == grp)
                .collect();
            if prompts.is_empty() {
                return GroupStep::NAN;
            }
            let key = GroupKey::Name(format!("g{grp}"));
            let h = est.hist(&key, false);
            let (mut rows, mut pos, mut bad, mut pos_bad) = (0usize, 0usize, 0usize, 0usize);
            let (mut rsum, mut spread, mut off_abs, mut zero, mut push, mut push0) =
                (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
            let pk = probs[grp][grp] as f64;
            let p0 = probs[grp][0] as f64;
            for p in &prompts {
                let a: Vec<f64> = p.rows.clone().map(|i| adv[i] as f64).collect();
                let m = a.iter().sum::<f64>() / a.len() as f64;
                let v = a.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (a.len() as f64 - 1.0);
                spread += v.sqrt();
                off_abs += m.abs();
                zero += p.zero_spread as u8 as f64;
                for i in p.rows.clone() {
                    rows += 1;
                    rsum += view.rewards[i] as f64;
                    let good = view.actions[i] as usize == grp;
                    let a = adv[i] as f64;
                    pos += (a > 0.0) as usize;
                    if !good {
                        bad += 1;
                        pos_bad += (a > 0.0) as usize;
                    }
                    push += a * (good as u8 as f64 - pk);
                    push0 += a * ((view.actions[i] == 0) as u8 as f64 - p0);
                }
            }
            let np = prompts.len() as f64;
            GroupStep {
                batch_mean: rsum / rows as f64,
                hist_mean: h.map_or(f64::NAN, |h| h.mean),
                hist_std: h.map_or(f64::NAN, |h| h.std),
                oracle_mean: orc[grp].0,
                oracle_std: orc[grp].1,
                frac_pos: pos as f64 / rows as f64,
                frac_pos_bad: if bad > 0 {
                    pos_bad as f64 / bad as f64
                } else {
                    f64::NAN
                },
                spread: spread / np,
                offset_abs: off_abs / np,
                zero_spread: zero / np,
                push: push / rows as f64,
                push0: push0 / rows as f64,
            }
        })
        .collect()
}
