//! Prototype advantage estimators, computed outside the crate from a rollout's rewards and a
//! per-group state kept by the lab.
//!
//! Notation (one batch): row `i` of prompt `q` has reward `R_i`; `μ_q`, `σ_q` are the mean and
//! sample std of the prompt's `G` rewards; `p` is the prompt's preference-group label; `n_p`,
//! `μ_p`, `σ_p` the count, mean and sample std of the group's cumulative reward history
//! *before* this batch (the crate's default update order); `ε = 1e-4`. GRPO's advantage is
//! `Â_i = (R_i − μ_q)/(σ_q + ε)`, and exactly 0 on a prompt whose rewards are all equal.
//! P-GRPO's is `A_i = (R_i − μ_p)/(σ_p + ε)`, which by the identity of the spec is
//!
//! ```text
//! A_i = (σ_q/σ_p)·Â_i  +  (μ_q − μ_p)/σ_p          (contrast term + offset term)
//! ```
//!
//! Every group-aware rule falls back to GRPO for a prompt whose group is *cold*: fewer than
//! `min_count = 8` rewards, an undefined std, or (all rules except `p_grpo_nofix`) a
//! **degenerate** history whose rewards are all equal (`σ_p ≤ 1e-6·|μ_p|`), the fix of
//! issue 12's defect 2, which the crate now makes too.
//!
//! [`Rule::Crate`] is not a prototype: the run uses the crate's own estimator (any
//! [`AdvantageConfig`]) and the lab does not touch the advantages. Phase 2's study runs only
//! those, so that it measures what ships.
//!
//! Rules are named on the command line as `name` or `name:key=value,key=value`; see
//! [`Rule::parse`] and [`Rule::catalogue`] for each one's equation.

use std::collections::BTreeMap;
use std::fmt;

use pgrpo::advantage::{AnnealOptions, Level as CrateLevel, LevelOptions};
use pgrpo::history::{RunningMoments, Variance};
use pgrpo::{AdvantageConfig, Estimator, GroupKey, HistoryKind, RewardHistory};

use crate::batch::{finite_f32, BatchView, PromptView};

/// The crate's `eps`, as the crate adds it (`1e-4_f32` widened to `f64`).
pub const EPS: f64 = 1e-4_f32 as f64;
/// The crate's default `min_count`.
pub const MIN_COUNT: u64 = 8;

/// Where a mean or a std comes from (candidate (d), "levels", after AReaL's
/// `mean_level`/`std_level`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Level {
    /// The prompt's own `G` rewards (`μ_q`, `σ_q`).
    Prompt,
    /// The preference group's cumulative history before the batch (`μ_p`, `σ_p`).
    Group,
    /// The whole batch (`μ_B`, `σ_B`).
    Batch,
    /// The std only: the group's pooled within-prompt std, an exponential average (half-life
    /// 64 prompts) of `σ_q²` over the group's past prompts (`s_p`).
    Within,
}

impl Level {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "prompt" => Level::Prompt,
            "group" => Level::Group,
            "batch" => Level::Batch,
            "within" => Level::Within,
            _ => {
                return Err(format!(
                    "unknown level {s:?} (prompt, group, batch, within)"
                ))
            }
        })
    }
    fn name(&self) -> &'static str {
        match self {
            Level::Prompt => "prompt",
            Level::Group => "group",
            Level::Batch => "batch",
            Level::Within => "within",
        }
    }
}

/// A prototype estimator. See [`Rule::catalogue`] for the equations.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// GRPO (crate-exact).
    Grpo,
    /// P-GRPO as the crate computes it (crate-exact; a degenerate history is cold).
    PGrpo,
    /// P-GRPO as the crate computed it before issue 12's fix (a degenerate history is
    /// divided by `eps`: the zero-std blow-up).
    PGrpoNoFix,
    /// The crate's own estimator, configured by `cfg` (not a prototype: the lab leaves the
    /// trainer's advantages alone). `label` names it in tables.
    Crate { label: String, cfg: AdvantageConfig },
    /// Diagnosis: `A = c·Â + o·(μ_q − μ_p)/σ_p`, the contrast scaled by the prompt
    /// (`contrast = prompt`: `c = 1`) or by the group (`contrast = group`: `c = σ_q/σ_p`),
    /// the offset on or off.
    Factor { contrast_group: bool, offset: bool },
    /// Diagnosis: P-GRPO with the history mean and/or std replaced by the oracle `μ*`, `σ*`
    /// of the true group under the sampling policy.
    Oracle { mean: bool, std: bool },
    /// Diagnosis: P-GRPO only on groups whose label is (`majority = true`) or is not the
    /// majority's `g0`; GRPO on the others.
    Only { majority: bool },
    /// (a) Confidence-weighted blend of prompt and group statistics.
    Blend { half_life: f64 },
    /// (b) James–Stein shrinkage of the prompt mean toward the group history mean.
    JamesStein { prompt_scale: bool },
    /// (c) Offset weight annealed with the group's history count: `λ_p = n0/(n0 + n_p)`.
    AnnealCount { n0: f64, prompt_scale: bool },
    /// (d) Separate levels for the mean and the std.
    Levels { mean: Level, std: Level },
    /// Kalman-filtered group mean (KRPO-style) as the baseline, history std as the scale.
    Kalman { q: f64 },
    /// Own: GRPO, plus P-GRPO's offset only on prompts where GRPO has no signal.
    FillIn,
    /// (c') Offset weight annealed with training progress: `λ = max(0, 1 − t/T)`.
    AnnealStep { t: f64 },
    /// Own: GRPO plus only the negative part of the offset (an optimistic baseline).
    Asym,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b: bool| if b { "prompt" } else { "group" };
        match self {
            Rule::Grpo => write!(f, "grpo"),
            Rule::PGrpo => write!(f, "p_grpo"),
            Rule::PGrpoNoFix => write!(f, "p_grpo_nofix"),
            Rule::Crate { label, .. } => write!(f, "{label}"),
            Rule::Factor {
                contrast_group,
                offset,
            } => write!(
                f,
                "factor:contrast={},offset={}",
                if *contrast_group { "group" } else { "prompt" },
                offset
            ),
            Rule::Oracle { mean, std } => write!(f, "oracle:mean={mean},std={std}"),
            Rule::Only { majority } => {
                write!(
                    f,
                    "only:{}",
                    if *majority { "majority" } else { "minorities" }
                )
            }
            Rule::Blend { half_life } => write!(f, "blend:hl={half_life}"),
            Rule::JamesStein { prompt_scale } => write!(f, "js:scale={}", yn(*prompt_scale)),
            Rule::AnnealCount { n0, prompt_scale } => {
                write!(f, "anneal:n0={n0},scale={}", yn(*prompt_scale))
            }
            Rule::Levels { mean, std } => write!(f, "levels:{}/{}", mean.name(), std.name()),
            Rule::Kalman { q } => write!(f, "kalman:q={q}"),
            Rule::FillIn => write!(f, "fillin"),
            Rule::AnnealStep { t } => write!(f, "astep:t={t}"),
            Rule::Asym => write!(f, "asym"),
        }
    }
}

impl Rule {
    /// Parses `name` or `name:key=value,...` (the [`Display`](fmt::Display) form).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let mut kv: BTreeMap<&str, &str> = BTreeMap::new();
        let mut positional = Vec::new();
        for part in args.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((k, v)) => {
                    kv.insert(k, v);
                }
                None => positional.push(part),
            }
        }
        let num = |k: &str, default: f64| -> Result<f64, String> {
            kv.get(k).map_or(Ok(default), |v| {
                v.parse().map_err(|_| format!("{s}: {k} must be a number"))
            })
        };
        let flag = |k: &str, default: bool| -> Result<bool, String> {
            kv.get(k).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| format!("{s}: {k} must be true or false"))
            })
        };
        let scale = |default: bool| -> Result<bool, String> {
            match kv.get("scale").copied() {
                None => Ok(default),
                Some("prompt") => Ok(true),
                Some("group") => Ok(false),
                Some(v) => Err(format!("{s}: scale must be prompt or group, got {v}")),
            }
        };
        Ok(match name {
            "grpo" => Rule::Grpo,
            // `p_grpo_fix` was phase 1's name for what the crate's P-GRPO is now.
            "p_grpo" | "p_grpo_fix" => Rule::PGrpo,
            "p_grpo_nofix" => Rule::PGrpoNoFix,
            "factor" => Rule::Factor {
                contrast_group: match kv.get("contrast").copied().unwrap_or("group") {
                    "group" => true,
                    "prompt" => false,
                    v => return Err(format!("{s}: contrast must be prompt or group, got {v}")),
                },
                offset: flag("offset", true)?,
            },
            "oracle" => Rule::Oracle {
                mean: flag("mean", true)?,
                std: flag("std", true)?,
            },
            "only" => match positional.first().copied() {
                Some("majority") => Rule::Only { majority: true },
                Some("minorities") => Rule::Only { majority: false },
                _ => return Err(format!("{s}: only:majority or only:minorities")),
            },
            "blend" => Rule::Blend {
                half_life: num("hl", 64.0)?,
            },
            "js" => Rule::JamesStein {
                prompt_scale: scale(true)?,
            },
            "anneal" => Rule::AnnealCount {
                n0: num("n0", 128.0)?,
                prompt_scale: scale(true)?,
            },
            "levels" => {
                let (m, d) = positional
                    .first()
                    .and_then(|p| p.split_once('/'))
                    .ok_or_else(|| format!("{s}: levels:<mean>/<std>"))?;
                let mean = Level::parse(m)?;
                if mean == Level::Within {
                    return Err(format!("{s}: `within` is a std level only"));
                }
                Rule::Levels {
                    mean,
                    std: Level::parse(d)?,
                }
            }
            "kalman" => Rule::Kalman { q: num("q", 0.01)? },
            "fillin" => Rule::FillIn,
            "astep" => Rule::AnnealStep {
                t: num("t", 100.0)?,
            },
            "asym" => Rule::Asym,
            _ => return Err(format!("unknown rule {s:?}; see --help")),
        })
    }

    /// A crate estimator: its name (`grpo`, `p_grpo`, `annealed_offset`, `james_stein`,
    /// `blend`, `levels`, ...) with options after a `:`: `annealed_offset:n0=512`,
    /// `levels:prompt/group` (mean level / std level). Every other option is the crate's
    /// default.
    pub fn parse_crate(s: &str) -> Result<Self, String> {
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let estimator: Estimator = name.parse().map_err(|e| format!("{s}: {e}"))?;
        let mut cfg = AdvantageConfig {
            estimator,
            ..Default::default()
        };
        for part in args.split(',').filter(|p| !p.is_empty()) {
            match (estimator, part.split_once('=')) {
                (Estimator::AnnealedOffset, Some(("n0", v))) => {
                    cfg.anneal = AnnealOptions {
                        n0: v.parse().map_err(|_| format!("{s}: n0 must be a number"))?,
                    }
                }
                (Estimator::Levels, None) => {
                    let (m, d) = part
                        .split_once('/')
                        .ok_or_else(|| format!("{s}: levels:<mean>/<std>"))?;
                    let level = |x: &str| x.parse::<CrateLevel>().map_err(|e| format!("{s}: {e}"));
                    cfg.levels = LevelOptions {
                        mean: level(m)?,
                        std: level(d)?,
                    };
                }
                _ => return Err(format!("{s}: unknown option {part:?}")),
            }
        }
        cfg.validate().map_err(|e| format!("{s}: {e}"))?;
        Ok(Rule::Crate {
            label: s.to_string(),
            cfg,
        })
    }

    /// The crate estimator the run uses (`Rule::Crate`), if any.
    pub fn crate_config(&self) -> Option<AdvantageConfig> {
        match self {
            Rule::Crate { cfg, .. } => Some(*cfg),
            _ => None,
        }
    }

    /// Whether the rule reads the oracle (diagnosis only; meaningless under shuffled labels).
    pub fn uses_oracle(&self) -> bool {
        matches!(self, Rule::Oracle { .. })
    }

    /// The equations, for `--help` and the report.
    pub fn catalogue() -> &'static str {
        "grpo                      Â = (R−μ_q)/(σ_q+ε); 0 on a zero-spread prompt
p_grpo                    (R−μ_p)/(σ_p+ε), crate-exact (a degenerate history counts as cold;
                              p_grpo_fix is another name for it)
p_grpo_nofix              p_grpo as the crate computed it before the fix of issue 12 (a history
                              of equal rewards is divided by ε)
factor:contrast=C,offset=O  c·Â + o·(μ_q−μ_p)/σ_p, c = σ_q/σ_p (C=group) or 1 (C=prompt)
oracle:mean=M,std=S       (R−m)/s with m = μ* (M) or μ_p, s = σ* (S) or σ_p   [diagnosis]
only:majority|minorities  p_grpo on label g0 only / on every label but g0      [diagnosis]
blend:hl=H                (a) (R−b)/d, b = wμ_q+(1−w)μ_p, d² = wσ_q²+(1−w)σ_p²,
                              w = V_p/(V_p+V_q), V_q = s_p²/G, V_p = max(D_p − s_p²/G, 0)
                                  + σ_p²/n_p; D_p, s_p²: EMAs (half-life H prompts) of
                                  (μ_q−μ_p)² and σ_q² over the group's prompts
js:scale=prompt|group     (b) b_q = μ_p + (1−c)(μ_q−μ_p), c = min(1, (K−2)/Σ_q z_q²),
                              z_q = (μ_q−μ_p)/(s_p/√G) over the K warm prompts of the batch;
                              scale=prompt: Â + c(μ_q−μ_p)/σ_p; scale=group: (R−b_q)/σ_p
anneal:n0=N,scale=…       (c) Â + λ_p(μ_q−μ_p)/σ_p (scale=prompt) or
                              (R−μ_q+λ_p(μ_q−μ_p))/σ_p (scale=group), λ_p = N/(N+n_p)
levels:M/S                (d) (R−m)/(s+ε), m ∈ prompt|group|batch, s ∈ prompt|group|batch|within
kalman:q=Q                (R−θ_p)/σ_p, θ_p a Kalman-filtered group mean: random walk with
                              variance Q·σ_p² per step, observation = batch mean of the group
                              with variance s_p²/n_rows
fillin                    (own) Â on prompts with spread; (μ_q−μ_p)/σ_p on a zero-spread
                              prompt (where Â = 0)
astep:t=T                 (c') Â + λ(μ_q−μ_p)/σ_p, λ = max(0, 1 − step/T)
asym                      (own) Â + min(0, (μ_q−μ_p)/σ_p): only prompts that did worse than
                              their group's history get an offset (a baseline never below μ_q)"
    }
}

/// A group's cumulative history before the batch.
#[derive(Debug, Clone, Copy)]
pub struct Hist {
    /// `n_p`.
    pub n: u64,
    /// `μ_p`.
    pub mean: f64,
    /// `σ_p` (sample std).
    pub std: f64,
}

/// Extra per-group state some rules keep besides the cumulative history.
#[derive(Debug, Clone, Copy, Default)]
struct Extra {
    /// EMA of `σ_q²` over the group's prompts, and its weight (bias correction).
    within: Ema,
    /// EMA of `(μ_q − μ_p)²` over the group's warm prompts.
    disc: Ema,
    /// Kalman filter of the group mean: estimate and its variance (`None`: not started).
    kalman: Option<(f64, f64)>,
}

/// An exponential moving average with bias correction (weights sum to `weight`).
#[derive(Debug, Clone, Copy, Default)]
struct Ema {
    sum: f64,
    weight: f64,
}

impl Ema {
    fn push(&mut self, x: f64, decay: f64) {
        self.sum = self.sum * decay + x;
        self.weight = self.weight * decay + 1.0;
    }
    fn value(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.sum / self.weight)
    }
}

/// How one prompt's rows get their advantage.
#[derive(Debug, Clone, Copy)]
enum Norm {
    /// GRPO, exactly as the crate: `ratio(R − μ_q, σ_q + ε)`, 0 on a zero-spread prompt.
    Grpo,
    /// `(R − base) · inv`, exactly as the crate's P-GRPO.
    Centre { base: f64, inv: f64 },
    /// `(R − μ_q)/den_c + offset` (the contrast 0 on a zero-spread prompt).
    Split { den_c: f64, offset: f64 },
}

/// The lab's estimator state: the rule, the cumulative history (the crate's own
/// [`RewardHistory`], folded exactly as the trainer folds it) and extra per-group state.
pub struct LabEstimator {
    rule: Rule,
    history: RewardHistory,
    extra: BTreeMap<GroupKey, Extra>,
    /// Rows with `|A| > 50` (the zero-std blow-up).
    pub blowups: u64,
    /// Batches folded in so far (the training step).
    step: u64,
}

/// Half-life of the within-prompt variance EMA (`Level::Within`, blend, JS), in prompts.
const WITHIN_HALF_LIFE: f64 = 64.0;

fn decay_for(half_life: f64) -> f64 {
    (-std::f64::consts::LN_2 / half_life).exp()
}

impl LabEstimator {
    /// A fresh estimator (empty history).
    pub fn new(rule: Rule) -> Self {
        Self {
            rule,
            history: RewardHistory::new(HistoryKind::Cumulative).expect("cumulative"),
            extra: BTreeMap::new(),
            blowups: 0,
            step: 0,
        }
    }

    /// The group's history as the crate would use it (`None`: cold). `fix`: a degenerate
    /// history is cold too.
    pub fn hist(&self, key: &GroupKey, fix: bool) -> Option<Hist> {
        let m: RunningMoments = self.history.moments(key)?;
        let var = m.variance(Variance::Sample)?;
        if m.count < MIN_COUNT {
            return None;
        }
        let std = var.sqrt();
        if fix && std <= 1e-6 * m.mean.abs() {
            return None;
        }
        Some(Hist {
            n: m.count,
            mean: m.mean,
            std,
        })
    }

    fn within(&self, key: &GroupKey) -> Option<f64> {
        self.extra.get(key).and_then(|e| e.within.value())
    }

    /// The advantages of `batch` (the state is not changed; call [`fold`](Self::fold) after).
    pub fn advantages(&mut self, batch: &BatchView<'_>) -> Vec<f32> {
        let g = batch.prompts.first().map_or(1, |p| p.rows.len()) as f64;
        let batch_stats = || {
            let n = batch.len() as f64;
            let mean = batch.rewards.iter().map(|&r| r as f64).sum::<f64>() / n;
            let var = batch
                .rewards
                .iter()
                .map(|&r| (r as f64 - mean).powi(2))
                .sum::<f64>()
                / (n - 1.0).max(1.0);
            (mean, var.sqrt())
        };
        let js_c = if let Rule::JamesStein { .. } = self.rule {
            Some(self.james_stein_factor(batch, g))
        } else {
            None
        };
        let norms: Vec<Norm> = batch
            .prompts
            .iter()
            .map(|p| self.norm(p, &batch.keys[p.label], batch, g, js_c, &batch_stats))
            .collect();
        let mut out = vec![0f32; batch.len()];
        for (p, norm) in batch.prompts.iter().zip(norms) {
            for i in p.rows.clone() {
                let r = batch.rewards[i] as f64;
                let centred = if p.zero_spread { 0.0 } else { r - p.mean };
                let a = match norm {
                    Norm::Grpo => {
                        if centred == 0.0 {
                            0.0
                        } else {
                            centred / (p.std() + EPS)
                        }
                    }
                    Norm::Centre { base, inv } => (r - base) * inv,
                    Norm::Split { den_c, offset } => {
                        let c = if centred == 0.0 { 0.0 } else { centred / den_c };
                        c + offset
                    }
                };
                let a = finite_f32(a);
                if a.abs() > 50.0 {
                    self.blowups += 1;
                }
                out[i] = a;
            }
        }
        out
    }

    /// Positive-part James–Stein factor `c = min(1, (K−2)/Σ z_q²)` over the batch's warm
    /// prompts, `z_q = (μ_q − μ_p)/(s_p/√G)`; 1 (full shrinkage to the history mean) when
    /// `K ≤ 2` or no prompt is warm.
    fn james_stein_factor(&self, batch: &BatchView<'_>, g: f64) -> f64 {
        let (mut k, mut sum) = (0usize, 0.0);
        for p in &batch.prompts {
            let key = &batch.keys[p.label];
            let (Some(h), Some(w)) = (self.hist(key, true), self.within(key)) else {
                continue;
            };
            let se2 = (w / g).max(1e-12 * h.std * h.std);
            k += 1;
            sum += (p.mean - h.mean).powi(2) / se2;
        }
        if k <= 2 || sum <= 0.0 {
            return 1.0;
        }
        ((k - 2) as f64 / sum).min(1.0)
    }

    fn norm(
        &self,
        p: &PromptView,
        key: &GroupKey,
        batch: &BatchView<'_>,
        g: f64,
        js_c: Option<f64>,
        batch_stats: &dyn Fn() -> (f64, f64),
    ) -> Norm {
        let den = |s: f64| s + EPS;
        let centre = |base: f64, s: f64| Norm::Centre {
            base,
            inv: 1.0 / den(s),
        };
        // `Â + λ(μ_q − μ_p)/σ_p` or `(R − μ_q + λ(μ_q − μ_p))/σ_p`.
        let offset_rule = |h: Hist, lambda: f64, prompt_scale: bool| {
            if prompt_scale {
                Norm::Split {
                    den_c: den(p.std()),
                    offset: lambda * (p.mean - h.mean) / den(h.std),
                }
            } else {
                Norm::Split {
                    den_c: den(h.std),
                    offset: lambda * (p.mean - h.mean) / den(h.std),
                }
            }
        };
        match &self.rule {
            Rule::Grpo => Norm::Grpo,
            Rule::PGrpo => match self.hist(key, true) {
                Some(h) => centre(h.mean, h.std),
                None => Norm::Grpo,
            },
            Rule::PGrpoNoFix => match self.hist(key, false) {
                Some(h) => centre(h.mean, h.std),
                None => Norm::Grpo,
            },
            // The run uses the crate's advantages (see `sim::run`): never reached.
            Rule::Crate { .. } => Norm::Grpo,
            Rule::Factor {
                contrast_group,
                offset,
            } => match self.hist(key, true) {
                Some(h) => offset_rule(h, if *offset { 1.0 } else { 0.0 }, !contrast_group),
                None => Norm::Grpo,
            },
            Rule::Oracle { mean, std } => match self.hist(key, true) {
                Some(h) => {
                    let (om, os) = batch.oracle[p.true_group];
                    centre(
                        if *mean { om } else { h.mean },
                        if *std { os } else { h.std },
                    )
                }
                None => Norm::Grpo,
            },
            Rule::Only { majority } => {
                let is_majority = key == &GroupKey::Name("g0".into());
                match self.hist(key, true) {
                    Some(h) if is_majority == *majority => centre(h.mean, h.std),
                    _ => Norm::Grpo,
                }
            }
            Rule::Blend { half_life: _ } => {
                let (Some(h), Some(e)) = (self.hist(key, true), self.extra.get(key)) else {
                    return Norm::Grpo;
                };
                let (Some(sw), Some(d)) = (e.within.value(), e.disc.value()) else {
                    return Norm::Grpo;
                };
                let vq = sw / g;
                let vp = (d - vq).max(0.0) + h.std * h.std / h.n as f64;
                let w = if vp + vq > 0.0 { vp / (vp + vq) } else { 0.5 };
                let base = w * p.mean + (1.0 - w) * h.mean;
                let s = (w * p.var.unwrap_or(0.0) + (1.0 - w) * h.std * h.std).sqrt();
                centre(base, s)
            }
            Rule::JamesStein { prompt_scale } => match (self.hist(key, true), self.within(key)) {
                (Some(h), Some(_)) => offset_rule(h, js_c.unwrap_or(1.0), *prompt_scale),
                _ => Norm::Grpo,
            },
            Rule::AnnealCount { n0, prompt_scale } => match self.hist(key, true) {
                Some(h) => offset_rule(h, n0 / (n0 + h.n as f64), *prompt_scale),
                None => Norm::Grpo,
            },
            Rule::Levels { mean, std } => {
                let h = self.hist(key, true);
                let needs_group = *mean == Level::Group || *std == Level::Group;
                if needs_group && h.is_none() {
                    return Norm::Grpo;
                }
                let m = match mean {
                    Level::Prompt => p.mean,
                    Level::Group => h.map_or(p.mean, |h| h.mean),
                    Level::Batch => batch_stats().0,
                    Level::Within => unreachable!("rejected by parse"),
                };
                let s = match std {
                    Level::Prompt => p.std(),
                    Level::Group => h.map_or(p.std(), |h| h.std),
                    Level::Batch => batch_stats().1,
                    Level::Within => match self.within(key) {
                        Some(w) => w.sqrt(),
                        None => return Norm::Grpo,
                    },
                };
                if *mean == Level::Prompt {
                    // Keep GRPO's exact 0 on zero-spread prompts.
                    Norm::Split {
                        den_c: den(s),
                        offset: 0.0,
                    }
                } else {
                    centre(m, s)
                }
            }
            Rule::Kalman { .. } => match (self.hist(key, true), self.extra.get(key)) {
                (
                    Some(h),
                    Some(Extra {
                        kalman: Some((theta, _)),
                        ..
                    }),
                ) => centre(*theta, h.std),
                _ => Norm::Grpo,
            },
            Rule::AnnealStep { t } => match self.hist(key, true) {
                Some(h) => offset_rule(h, (1.0 - self.step as f64 / t).max(0.0), true),
                None => Norm::Grpo,
            },
            Rule::Asym => match self.hist(key, true) {
                Some(h) => Norm::Split {
                    den_c: den(p.std()),
                    offset: ((p.mean - h.mean) / den(h.std)).min(0.0),
                },
                None => Norm::Grpo,
            },
            Rule::FillIn => match self.hist(key, true) {
                Some(h) if p.zero_spread => Norm::Split {
                    den_c: 1.0,
                    offset: (p.mean - h.mean) / den(h.std),
                },
                _ => Norm::Grpo,
            },
        }
    }

    /// Folds the batch into the state (after the update, as the trainer folds its history).
    pub fn fold(&mut self, batch: &BatchView<'_>, group_ids: &[u32]) {
        // Extra state first: it reads the history as it stood before this batch.
        let wd = decay_for(WITHIN_HALF_LIFE);
        let blend_decay = match self.rule {
            Rule::Blend { half_life } => decay_for(half_life),
            _ => wd,
        };
        let q = match self.rule {
            Rule::Kalman { q } => Some(q),
            _ => None,
        };
        for (label, key) in batch.keys.iter().enumerate() {
            let h = self.hist(key, true);
            let within_now = self.within(key);
            let e = self.extra.entry(key.clone()).or_default();
            let (mut rows, mut sum) = (0usize, 0.0);
            for p in batch.prompts.iter().filter(|p| p.label == label) {
                if let Some(v) = p.var {
                    e.within.push(v, wd);
                }
                if let Some(h) = h {
                    e.disc.push((p.mean - h.mean).powi(2), blend_decay);
                }
                rows += p.rows.len();
                sum += p.mean * p.rows.len() as f64;
            }
            if let (Some(q), true) = (q, rows > 0) {
                let y = sum / rows as f64;
                match (e.kalman, h) {
                    (Some((theta, var)), Some(h)) => {
                        let prior = var + q * h.std * h.std;
                        let obs = within_now.unwrap_or(h.std * h.std) / rows as f64;
                        let gain = prior / (prior + obs).max(1e-300);
                        e.kalman = Some((theta + gain * (y - theta), (1.0 - gain) * prior));
                    }
                    (Some(_), None) | (None, _) => {
                        // Start (and restart while cold) at the cumulative mean including
                        // this batch, with the variance of that mean.
                        let m = self.history.moments(key).unwrap_or_default();
                        let n = (m.count + rows as u64) as f64;
                        let mean = (m.mean * m.count as f64 + sum) / n;
                        let var = within_now.unwrap_or(0.0);
                        e.kalman = Some((mean, var / n));
                    }
                }
            }
        }
        self.history
            .update_rows(batch.keys, group_ids, batch.rewards)
            .expect("finite rewards, valid ids");
        self.step += 1;
    }
}
