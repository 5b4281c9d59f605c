//! Tests of `pgrpo::objective`: the clipped policy-gradient loss and its metrics.
//!
//! Golden values come from the NumPy script below, kept runnable as
//! `tests/golden/objective_golden.py` (`python3 tests/golden/objective_golden.py`, numpy only).
//! It computes the loss and all metrics in float64, derives d loss / d logp by hand and checks
//! that gradient against central finite differences before printing. The test
//! `golden_script_is_pasted_verbatim` keeps the two copies identical. Tolerance: 1e-5 absolute.
//! Every tensor test runs once per device (CPU, plus CUDA when built with `--features cuda`).

/* ---- tests/golden/objective_golden.py (verbatim) ----
"""Golden values for tests/objective.rs (pgrpo's clipped policy-gradient objective).

Run: python3 tests/golden/objective_golden.py   (needs numpy only)

Everything is computed in float64 from float32 inputs. Gradients of the loss with respect to
logp are derived by hand below and checked against central finite differences before printing.
This file is pasted verbatim into the header comment of tests/objective.rs; a test checks that
the two copies agree.
"""

import numpy as np

f32 = lambda x: np.array(x, dtype=np.float32).astype(np.float64)

# B = 3 rows, T = 4 columns; row 1 has 2 tokens, row 2 has 3; padding holds arbitrary values.
LOGP = f32([[-1.0, -1.78, -0.8, -1.4],
            [-1.1, -0.95, -25.0, 2.0],
            [-0.5, -0.4, -1.05, -9.0]])
OLD = f32([[-1.0, -2.0, -0.5, -1.5],
           [-0.7, -1.2, 4.0, 4.0],
           [-2.0, -0.3, -1.1, 9.0]])
REF = f32([[-1.2, -1.5, -0.9, -1.0],
           [-0.9, -1.0, 0.0, 0.0],
           [-1.0, -0.2, -1.3, 0.0]])
MASK = f32([[1, 1, 1, 1],
            [1, 1, 0, 0],
            [1, 1, 1, 0]])
ADV = f32([0.9, -0.6, -1.3])


def base(**kw):
    cfg = dict(eps_low=0.2, eps_high=0.2, dual_clip=None, ratio_level="token",
               aggregation="grpo", beta=0.0, kl_estimator="k3", max_completion_len=None)
    cfg.update(kw)
    return cfg


def objective(cfg, logp, with_grad=True):
    B, T = logp.shape
    m, A = MASK, ADV[:, None] * np.ones((B, T))
    n_row = m.sum(1)
    N = m.sum()
    lo, hi = 1.0 - f32(cfg["eps_low"]), 1.0 + f32(cfg["eps_high"])

    log_r_tok = np.where(m > 0, logp - OLD, 0.0)
    if cfg["ratio_level"] == "token":
        log_r = log_r_tok
    else:  # GSPO: masked mean of the token log-ratios, broadcast over the row
        log_r = ((log_r_tok * m).sum(1) / np.maximum(n_row, 1.0))[:, None] * np.ones((B, T))
    ratio = np.exp(log_r)
    clipped = np.clip(ratio, lo, hi)
    surr1 = ratio * A
    surr2 = clipped * A
    surr = np.minimum(surr1, surr2)
    unclipped = surr1 <= surr2  # the branch that carries the gradient (no ties in this data)
    if cfg["dual_clip"] is not None:
        floor = f32(cfg["dual_clip"]) * A
        dual = (A < 0) & (floor > surr)
        surr = np.where(dual, floor, surr)
        unclipped &= ~dual

    d = np.where(m > 0, REF - logp, 0.0)
    kl, dkl = {"k1": (-d, np.ones_like(d)),
               "k2": (0.5 * d * d, -d),
               "k3": (np.exp(d) - d - 1.0, 1.0 - np.exp(d))}[cfg["kl_estimator"]]
    beta = f32(cfg["beta"])
    per_token = -surr + beta * kl

    L = cfg["max_completion_len"] or T
    weight = {"grpo": m / (B * np.maximum(n_row, 1.0))[:, None],
              "bnpo": m / max(N, 1.0),
              "dr_grpo": m / (B * L)}[cfg["aggregation"]]
    loss = (weight * per_token).sum()
    policy_loss = (weight * -surr).sum()

    r_tok = np.exp(log_r_tok)
    low = (ratio < lo) & (A < 0)
    high = (ratio > hi) & (A > 0)
    mmean = lambda x: (x * m).sum() / N
    metrics = dict(policy_loss=policy_loss, kl=mmean(kl), approx_kl=mmean((r_tok - 1) - log_r_tok),
                   clip_ratio_low=mmean(low), clip_ratio_high=mmean(high),
                   clip_ratio_region=mmean(low | high), num_tokens=N)
    if not with_grad:
        return loss, metrics, None

    # d loss / d logp by hand: the surrogate's derivative flows only through the unclipped branch.
    dsurr_dr = np.where(unclipped, A, 0.0)  # d surr / d ratio
    if cfg["ratio_level"] == "token":
        grad = -weight * dsurr_dr * ratio * m
    else:  # ratio_i = exp(mean_u lr_iu): d ratio_i / d logp_iu = ratio_i * m_iu / n_i
        row = -(weight * dsurr_dr * ratio).sum(1) / np.maximum(n_row, 1.0)
        grad = row[:, None] * m
    grad = grad + beta * weight * dkl
    return loss, metrics, grad


def check_grad(cfg, grad, h=1e-6):
    fd = np.zeros_like(LOGP)
    for i in range(LOGP.shape[0]):
        for j in range(LOGP.shape[1]):
            up, dn = LOGP.copy(), LOGP.copy()
            up[i, j] += h
            dn[i, j] -= h
            fd[i, j] = (objective(cfg, up, False)[0] - objective(cfg, dn, False)[0]) / (2 * h)
    assert np.abs(fd - grad).max() < 1e-7, (cfg, fd, grad)


CASES = [
    ("default", base(), True),
    ("bnpo", base(aggregation="bnpo"), False),
    ("dr_grpo", base(aggregation="dr_grpo"), False),
    ("dr_grpo_len6", base(aggregation="dr_grpo", max_completion_len=6), False),
    ("beta_k1", base(beta=0.04, kl_estimator="k1"), False),
    ("beta_k2", base(beta=0.04, kl_estimator="k2"), True),
    ("beta_k3", base(beta=0.04, kl_estimator="k3"), False),
    ("dual_clip", base(dual_clip=3.0), False),
    ("clip_higher", base(eps_high=0.28, aggregation="bnpo"), False),
    ("dapo_dual_k3", base(eps_high=0.28, aggregation="bnpo", dual_clip=3.0, beta=0.04), True),
    ("gspo", base(ratio_level="sequence", eps_low=0.05, eps_high=0.1), True),
]

np.set_printoptions(precision=9, floatmode="fixed")
for name, cfg, want_grad in CASES:
    loss, met, grad = objective(cfg, LOGP)
    check_grad(cfg, grad)  # every case is checked, only some gradients are printed
    print(f"{name}: loss = {loss:.9f}")
    items = [f"{k} = {v:.9f}" for k, v in met.items()]
    for group in (items[:3], items[3:6], items[6:]):
        print("   " + ", ".join(group))
    if want_grad:
        for row in grad:
            print("   [" + ", ".join(f"{x + 0.0:.9f}" for x in row) + "],")
---- end of script ----

Printed (python3 tests/golden/objective_golden.py, numpy 2.4.6):
default: loss = 0.834857452
   policy_loss = 0.834857452, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
   [-0.074999998, 0.000000000, -0.055561364, -0.082887819],
   [0.000000000, 0.128402554, 0.000000000, 0.000000000],
   [0.647355064, 0.130698734, 0.151850275, 0.000000000],
bnpo: loss = 0.664240206
   policy_loss = 0.664240206, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
dr_grpo: loss = 0.498180155
   policy_loss = 0.498180155, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
dr_grpo_len6: loss = 0.332120103
   policy_loss = 0.332120103, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
beta_k1: loss = 0.835035229
   policy_loss = 0.834857452, kl = 0.002222225, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
beta_k2: loss = 0.836263118
   policy_loss = 0.834857452, kl = 0.037966667, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
   [-0.074333331, -0.000933333, -0.055228031, -0.084221152],
   [-0.001333334, 0.128735888, 0.000000000, 0.000000000],
   [0.649577286, 0.129809845, 0.152961386, 0.000000000],
beta_k3: loss = 0.836233338
   policy_loss = 0.834857452, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
dual_clip: loss = 0.620835705
   policy_loss = 0.620835705, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
clip_higher: loss = 0.659632530
   policy_loss = 0.659632530, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.000000000, clip_ratio_region = 0.111111111
   num_tokens = 9.000000000
dapo_dual_k3: loss = 0.447112512
   policy_loss = 0.445610783, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.000000000, clip_ratio_region = 0.111111111
   num_tokens = 9.000000000
   [-0.099194356, -0.126043806, -0.073658875, -0.112702979],
   [-0.000984012, 0.085818461, 0.000000000, 0.000000000],
   [0.001748753, 0.129714722, 0.152833382, 0.000000000],
gspo: loss = 0.591133381
   policy_loss = 0.591133381, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.222222222, clip_ratio_high = 0.000000000, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
   [-0.075375938, -0.075375938, -0.075375938, -0.075375938],
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
   [0.234212375, 0.234212375, 0.234212375, 0.000000000],
*/

use candle_core::{DType, Device, Tensor, Var};
use pgrpo::objective::{KlEstimator, ObjectiveMetrics, RatioLevel};
use pgrpo::{
    clipped_objective, Error, LossAggregation, ObjectiveConfig, ObjectiveInputs, ObjectiveOutput,
    Result,
};

const TOL: f64 = 1e-5;

// The golden batch (same numbers as the script). Padding holds arbitrary finite values.
const LOGP: [[f32; 4]; 3] = [
    [-1.0, -1.78, -0.8, -1.4],
    [-1.1, -0.95, -25.0, 2.0],
    [-0.5, -0.4, -1.05, -9.0],
];
const OLD: [[f32; 4]; 3] = [
    [-1.0, -2.0, -0.5, -1.5],
    [-0.7, -1.2, 4.0, 4.0],
    [-2.0, -0.3, -1.1, 9.0],
];
const REF: [[f32; 4]; 3] = [
    [-1.2, -1.5, -0.9, -1.0],
    [-0.9, -1.0, 0.0, 0.0],
    [-1.0, -0.2, -1.3, 0.0],
];
const MASK: [[f32; 4]; 3] = [
    [1.0, 1.0, 1.0, 1.0],
    [1.0, 1.0, 0.0, 0.0],
    [1.0, 1.0, 1.0, 0.0],
];
const ADV: [f32; 3] = [0.9, -0.6, -1.3];

fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if candle_core::utils::cuda_is_available() {
        devices.push(Device::new_cuda(0).expect("CUDA is available but device 0 failed"));
    }
    devices
}

/// One batch on one device; `logp` is a `Var` so that its gradient can be read.
struct Batch {
    logp: Var,
    old: Tensor,
    reference: Tensor,
    mask: Tensor,
    adv: Tensor,
}

impl Batch {
    fn new<const B: usize, const T: usize>(
        dev: &Device,
        logp: [[f32; T]; B],
        old: [[f32; T]; B],
        reference: [[f32; T]; B],
        mask: [[f32; T]; B],
        adv: [f32; B],
    ) -> Result<Self> {
        Ok(Self {
            logp: Var::new(&logp, dev)?,
            old: Tensor::new(&old, dev)?,
            reference: Tensor::new(&reference, dev)?,
            mask: Tensor::new(&mask, dev)?,
            adv: Tensor::new(&adv, dev)?,
        })
    }

    fn golden(dev: &Device) -> Result<Self> {
        Self::new(dev, LOGP, OLD, REF, MASK, ADV)
    }

    fn inputs(&self, with_ref: bool) -> ObjectiveInputs<'_> {
        ObjectiveInputs {
            logp: self.logp.as_tensor(),
            old_logp: &self.old,
            ref_logp: with_ref.then_some(&self.reference),
            mask: &self.mask,
            advantages: &self.adv,
            entropy: None,
            row_mask: None,
        }
    }

    /// The objective with the reference log-probs, and d loss / d logp.
    fn run(&self, cfg: &ObjectiveConfig) -> Result<(ObjectiveOutput, Vec<Vec<f32>>)> {
        run_inputs(cfg, &self.inputs(true), &self.logp)
    }
}

fn run_inputs(
    cfg: &ObjectiveConfig,
    inputs: &ObjectiveInputs<'_>,
    logp: &Var,
) -> Result<(ObjectiveOutput, Vec<Vec<f32>>)> {
    let out = clipped_objective(cfg, inputs)?;
    assert_eq!(out.loss.rank(), 0, "the loss is a scalar");
    let grads = out.loss.backward()?;
    let grad = grads
        .get(logp.as_tensor())
        .expect("logp receives a gradient")
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    Ok((out, grad))
}

fn loss_of(out: &ObjectiveOutput) -> f64 {
    out.loss
        .to_dtype(DType::F64)
        .and_then(|l| l.to_scalar::<f64>())
        .expect("scalar loss")
}

fn metrics_array(m: &ObjectiveMetrics) -> [f64; 7] {
    [
        m.policy_loss,
        m.kl,
        m.approx_kl,
        m.clip_ratio_low,
        m.clip_ratio_high,
        m.clip_ratio_region,
        m.num_tokens,
    ]
}

#[track_caller]
fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= TOL,
        "{what}: got {got:.9}, want {want:.9} (diff {:.2e})",
        (got - want).abs()
    );
}

#[track_caller]
fn assert_grad_close(got: &[Vec<f32>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {i} length");
        for (t, (&g, &w)) in g.iter().zip(w).enumerate() {
            assert_close(g as f64, w, &format!("{what}: grad[{i}][{t}]"));
        }
    }
}

fn grad_rows<const B: usize, const T: usize>(g: [[f64; T]; B]) -> Vec<Vec<f64>> {
    g.iter().map(|r| r.to_vec()).collect()
}

// ---------------------------------------------------------------------------------------------
// Golden values
// ---------------------------------------------------------------------------------------------

struct Golden {
    name: &'static str,
    cfg: ObjectiveConfig,
    loss: f64,
    /// policy_loss, kl, approx_kl, clip_ratio_low, clip_ratio_high, clip_ratio_region, num_tokens
    metrics: [f64; 7],
    grad: Option<[[f64; 4]; 3]>,
}

fn golden_cases() -> Vec<Golden> {
    let d = ObjectiveConfig::default();
    // The metrics every eps = 0.2 token-level case shares, with its policy loss in front.
    let m = |policy_loss: f64| {
        [
            policy_loss,
            0.037543229,
            0.240467662,
            1.0 / 9.0,
            1.0 / 9.0,
            2.0 / 9.0,
            9.0,
        ]
    };
    vec![
        Golden {
            name: "default",
            cfg: d,
            loss: 0.834857452,
            metrics: m(0.834857452),
            grad: Some([
                [-0.074999998, 0.000000000, -0.055561364, -0.082887819],
                [0.000000000, 0.128402554, 0.000000000, 0.000000000],
                [0.647355064, 0.130698734, 0.151850275, 0.000000000],
            ]),
        },
        Golden {
            name: "bnpo",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::Bnpo,
                ..d
            },
            loss: 0.664240206,
            metrics: m(0.664240206),
            grad: None,
        },
        Golden {
            name: "dr_grpo",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::DrGrpo,
                ..d
            },
            loss: 0.498180155,
            metrics: m(0.498180155),
            grad: None,
        },
        Golden {
            name: "dr_grpo_len6",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::DrGrpo,
                max_completion_len: Some(6),
                ..d
            },
            loss: 0.332120103,
            metrics: m(0.332120103),
            grad: None,
        },
        Golden {
            name: "beta_k1",
            cfg: ObjectiveConfig {
                beta: 0.04,
                kl_estimator: KlEstimator::K1,
                ..d
            },
            loss: 0.835035229,
            metrics: [
                0.834857452,
                0.002222225,
                0.240467662,
                1.0 / 9.0,
                1.0 / 9.0,
                2.0 / 9.0,
                9.0,
            ],
            grad: None,
        },
        Golden {
            name: "beta_k2",
            cfg: ObjectiveConfig {
                beta: 0.04,
                kl_estimator: KlEstimator::K2,
                ..d
            },
            loss: 0.836263118,
            metrics: [
                0.834857452,
                0.037966667,
                0.240467662,
                1.0 / 9.0,
                1.0 / 9.0,
                2.0 / 9.0,
                9.0,
            ],
            grad: Some([
                [-0.074333331, -0.000933333, -0.055228031, -0.084221152],
                [-0.001333334, 0.128735888, 0.000000000, 0.000000000],
                [0.649577286, 0.129809845, 0.152961386, 0.000000000],
            ]),
        },
        Golden {
            name: "beta_k3",
            cfg: ObjectiveConfig {
                beta: 0.04,
                kl_estimator: KlEstimator::K3,
                ..d
            },
            loss: 0.836233338,
            metrics: m(0.834857452),
            grad: None,
        },
        Golden {
            name: "dual_clip",
            cfg: ObjectiveConfig {
                dual_clip: Some(3.0),
                ..d
            },
            loss: 0.620835705,
            metrics: m(0.620835705),
            grad: None,
        },
        Golden {
            name: "clip_higher",
            cfg: ObjectiveConfig {
                eps_high: 0.28,
                aggregation: LossAggregation::Bnpo,
                ..d
            },
            loss: 0.659632530,
            metrics: [
                0.659632530,
                0.037543229,
                0.240467662,
                1.0 / 9.0,
                0.0,
                1.0 / 9.0,
                9.0,
            ],
            grad: None,
        },
        Golden {
            name: "dapo_dual_k3",
            cfg: ObjectiveConfig {
                eps_high: 0.28,
                aggregation: LossAggregation::Bnpo,
                dual_clip: Some(3.0),
                beta: 0.04,
                ..d
            },
            loss: 0.447112512,
            metrics: [
                0.445610783,
                0.037543229,
                0.240467662,
                1.0 / 9.0,
                0.0,
                1.0 / 9.0,
                9.0,
            ],
            grad: Some([
                [-0.099194356, -0.126043806, -0.073658875, -0.112702979],
                [-0.000984012, 0.085818461, 0.000000000, 0.000000000],
                [0.001748753, 0.129714722, 0.152833382, 0.000000000],
            ]),
        },
        Golden {
            name: "gspo",
            cfg: ObjectiveConfig {
                ratio_level: RatioLevel::Sequence,
                eps_low: 0.05,
                eps_high: 0.1,
                ..d
            },
            loss: 0.591133381,
            metrics: [
                0.591133381,
                0.037543229,
                0.240467662,
                2.0 / 9.0,
                0.0,
                2.0 / 9.0,
                9.0,
            ],
            grad: Some([
                [-0.075375938, -0.075375938, -0.075375938, -0.075375938],
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
                [0.234212375, 0.234212375, 0.234212375, 0.000000000],
            ]),
        },
    ]
}

const METRIC_NAMES: [&str; 7] = [
    "policy_loss",
    "kl",
    "approx_kl",
    "clip_ratio_low",
    "clip_ratio_high",
    "clip_ratio_region",
    "num_tokens",
];

#[test]
fn golden_script_is_pasted_verbatim() {
    let this_file = include_str!("objective.rs");
    let script = include_str!("golden/objective_golden.py");
    assert!(
        this_file.contains(script),
        "tests/golden/objective_golden.py changed: paste it again into the header comment"
    );
}

#[test]
fn golden_loss_and_metrics() -> Result<()> {
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        for case in golden_cases() {
            let (out, _) = batch.run(&case.cfg)?;
            let what = format!("{} on {dev:?}", case.name);
            assert_close(loss_of(&out), case.loss, &format!("{what}: loss"));
            for ((got, want), name) in metrics_array(&out.metrics)
                .into_iter()
                .zip(case.metrics)
                .zip(METRIC_NAMES)
            {
                assert_close(got, want, &format!("{what}: {name}"));
            }
        }
    }
    Ok(())
}

#[test]
fn golden_gradients() -> Result<()> {
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        let cases: Vec<_> = golden_cases()
            .into_iter()
            .filter(|c| c.grad.is_some())
            .collect();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let (_, grad) = batch.run(&case.cfg)?;
            let want = grad_rows(case.grad.expect("filtered"));
            assert_grad_close(&grad, &want, &format!("{} on {dev:?}", case.name));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// `old_logp` is the very tensor `logp` (the first optimisation step on a fresh rollout).
fn on_policy(
    cfg: &ObjectiveConfig,
    logp: &Var,
    mask: &Tensor,
    adv: &Tensor,
) -> Result<(ObjectiveOutput, Vec<Vec<f32>>)> {
    let inputs = ObjectiveInputs {
        logp: logp.as_tensor(),
        old_logp: logp.as_tensor(),
        ref_logp: None,
        mask,
        advantages: adv,
        entropy: None,
        row_mask: None,
    };
    run_inputs(cfg, &inputs, logp)
}

const ALL_AGGREGATIONS: [LossAggregation; 3] = [
    LossAggregation::Grpo,
    LossAggregation::Bnpo,
    LossAggregation::DrGrpo,
];

#[test]
fn ratio_one_gives_minus_mean_advantage_with_equal_lengths() -> Result<()> {
    for dev in devices() {
        let logp = Var::new(
            &[
                [-1.0f32, -2.0, -0.5],
                [-0.1, -3.0, -1.0],
                [-2.0, -2.0, -0.7],
            ],
            &dev,
        )?;
        let mask = Tensor::ones((3, 3), DType::F32, &dev)?;
        let adv = Tensor::new(&[1.0f32, -0.5, 2.0], &dev)?;
        let mean_adv = (1.0 - 0.5 + 2.0) / 3.0;
        for aggregation in ALL_AGGREGATIONS {
            for ratio_level in RatioLevel::ALL {
                // eps = 0 is the degenerate clip: the on-policy gradient must still be exact.
                for (eps_low, eps_high) in [(0.2, 0.2), (0.0, 0.0), (0.2, 0.28)] {
                    let cfg = ObjectiveConfig {
                        aggregation,
                        ratio_level,
                        eps_low,
                        eps_high,
                        ..Default::default()
                    };
                    let what = format!("{cfg:?} on {dev:?}");
                    let (out, grad) = on_policy(&cfg, &logp, &mask, &adv)?;
                    assert_close(loss_of(&out), -mean_adv, &what);
                    assert_eq!(out.metrics.approx_kl, 0.0, "{what}");
                    assert_eq!(out.metrics.clip_ratio_region, 0.0, "{what}");
                    assert_eq!(out.metrics.num_tokens, 9.0, "{what}");
                    // d loss / d logp_it = −A_i / (B·T) for every aggregation here.
                    let want = grad_rows([[-1.0 / 9.0; 3], [0.5 / 9.0; 3], [-2.0 / 9.0; 3]]);
                    assert_grad_close(&grad, &want, &what);
                }
            }
        }
        // Dr. GRPO with a longer generation budget L = 5 scales by T/L.
        let cfg = ObjectiveConfig {
            aggregation: LossAggregation::DrGrpo,
            max_completion_len: Some(5),
            ..Default::default()
        };
        let (out, _) = on_policy(&cfg, &logp, &mask, &adv)?;
        assert_close(loss_of(&out), -mean_adv * 3.0 / 5.0, "dr_grpo L = 5");
    }
    Ok(())
}

#[test]
fn ratio_one_gives_length_weighted_mean_advantage_with_unequal_lengths() -> Result<()> {
    for dev in devices() {
        let logp = Var::new(
            &[[-1.0f32, -2.0, -0.5], [-0.1, 7.0, 7.0], [-2.0, -2.0, 7.0]],
            &dev,
        )?;
        let mask = Tensor::new(
            &[[1.0f32, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]],
            &dev,
        )?;
        let adv = Tensor::new(&[1.0f32, -0.5, 2.0], &dev)?;
        // n = (3, 1, 2), N = 6, Σ n_i A_i = 3 − 0.5 + 4 = 6.5
        let cases = [
            (LossAggregation::Grpo, -(1.0 - 0.5 + 2.0) / 3.0),
            (LossAggregation::Bnpo, -6.5 / 6.0),
            (LossAggregation::DrGrpo, -6.5 / 9.0),
        ];
        for (aggregation, want) in cases {
            for ratio_level in RatioLevel::ALL {
                let cfg = ObjectiveConfig {
                    aggregation,
                    ratio_level,
                    ..Default::default()
                };
                let (out, grad) = on_policy(&cfg, &logp, &mask, &adv)?;
                assert_close(loss_of(&out), want, &format!("{cfg:?}"));
                assert_eq!(grad[1][1..], [0.0, 0.0], "no gradient into padding");
                assert_eq!(grad[2][2], 0.0, "no gradient into padding");
            }
        }
    }
    Ok(())
}

#[test]
fn clipped_tokens_get_zero_gradient_and_are_counted() -> Result<()> {
    let ln = |r: f32| r.ln();
    // Row 0 has A = +1, row 1 has A = −1; old_logp = 0 so logp = ln(ratio). The last column is
    // padding with extreme ratios that must not be counted.
    let logp = [
        [ln(1.5), ln(0.5), ln(1.1), ln(4.0), ln(10.0)],
        [ln(0.5), ln(1.5), ln(0.9), ln(4.0), ln(0.1)],
    ];
    let mask = [[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]];
    let zeros = [[0.0f32; 5]; 2];
    for dev in devices() {
        let batch = Batch::new(&dev, logp, zeros, zeros, mask, [1.0, -1.0])?;
        let bnpo = ObjectiveConfig {
            aggregation: LossAggregation::Bnpo,
            ..Default::default()
        };

        // Clipped: (0,0) r = 1.5 > 1.2 with A > 0; (0,3) r = 4 > 1.2 with A > 0;
        // (1,0) r = 0.5 < 0.8 with A < 0. Everything else is on the unclipped branch: grad = −A·r/N.
        let (out, grad) = batch.run(&bnpo)?;
        let want = grad_rows([
            [0.0, -0.5 / 8.0, -1.1 / 8.0, 0.0, 0.0],
            [0.0, 1.5 / 8.0, 0.9 / 8.0, 4.0 / 8.0, 0.0],
        ]);
        assert_grad_close(&grad, &want, "plain clip");
        for (i, t) in [(0, 0), (0, 3), (1, 0)] {
            assert_eq!(
                grad[i][t], 0.0,
                "clipped token ({i},{t}) has an exactly zero gradient"
            );
        }
        // Surrogates: row 0: 1.2, 0.5, 1.1, 1.2; row 1: −0.8, −1.5, −0.9, −4.0.
        assert_close(loss_of(&out), -(4.0 - 7.2) / 8.0, "plain clip loss");
        assert_close(out.metrics.clip_ratio_high, 2.0 / 8.0, "high");
        assert_close(out.metrics.clip_ratio_low, 1.0 / 8.0, "low");
        assert_close(out.metrics.clip_ratio_region, 3.0 / 8.0, "region");
        assert_eq!(out.metrics.num_tokens, 8.0);

        // Dual clip c = 3: (1,3) has r·A = −4 < c·A = −3 and is held at −3 with zero gradient.
        let dual = ObjectiveConfig {
            dual_clip: Some(3.0),
            ..bnpo
        };
        let (out, grad) = batch.run(&dual)?;
        let want = grad_rows([
            [0.0, -0.5 / 8.0, -1.1 / 8.0, 0.0, 0.0],
            [0.0, 1.5 / 8.0, 0.9 / 8.0, 0.0, 0.0],
        ]);
        assert_grad_close(&grad, &want, "dual clip");
        assert_eq!(grad[1][3], 0.0);
        assert_close(loss_of(&out), -(4.0 - 6.2) / 8.0, "dual clip loss");
        // Dual clip does not touch positive advantages: (0,3) stays at 1.2 (not 3).
        assert_close(
            out.metrics.policy_loss,
            -(4.0 - 6.2) / 8.0,
            "dual clip policy loss",
        );

        // Clip-higher: eps_high = 0.6 lets (0,0) (r = 1.5) through; (0,3) stays clipped.
        let higher = ObjectiveConfig {
            eps_high: 0.6,
            ..bnpo
        };
        let (out, grad) = batch.run(&higher)?;
        assert_close(
            grad[0][0] as f64,
            -1.5 / 8.0,
            "clip-higher lets r = 1.5 through",
        );
        assert_eq!(grad[0][3], 0.0);
        assert_close(
            out.metrics.clip_ratio_high,
            1.0 / 8.0,
            "high with eps_high 0.6",
        );
    }
    Ok(())
}

#[test]
fn kl_estimators_match_hand_values() -> Result<()> {
    // d = ref_logp − logp
    let d = [-1.0f32, 0.0, 0.5, 2.0];
    let hand: [(KlEstimator, [f64; 4], [f64; 4]); 3] = [
        // (estimator, values, d k / d logp = −d k / d d)
        (KlEstimator::K1, [1.0, 0.0, -0.5, -2.0], [1.0; 4]),
        (
            KlEstimator::K2,
            [0.5, 0.0, 0.125, 2.0],
            [1.0, 0.0, -0.5, -2.0],
        ),
        (
            KlEstimator::K3,
            // e^d − d − 1 and 1 − e^d
            [0.367879441, 0.0, 0.148721271, 4.389056099],
            [0.632120559, 0.0, -0.648721271, -6.389056099],
        ),
    ];
    for dev in devices() {
        let dt = Tensor::new(&d, &dev)?;
        for (est, values, dk) in hand {
            let got = est.per_token(&dt)?.to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(values) {
                assert_close(*g as f64, w, &format!("{est:?} value"));
            }
            // Through the objective: A = 0 removes the surrogate, so loss = beta · mean kl.
            let batch = Batch::new(&dev, [[0.0; 4]], [[0.0; 4]], [d], [[1.0; 4]], [0.0])?;
            let cfg = ObjectiveConfig {
                beta: 0.5,
                kl_estimator: est,
                ..Default::default()
            };
            let (out, grad) = batch.run(&cfg)?;
            let mean = values.iter().sum::<f64>() / 4.0;
            assert_close(out.metrics.kl, mean, &format!("{est:?} kl metric"));
            assert_close(loss_of(&out), 0.5 * mean, &format!("{est:?} loss"));
            assert_eq!(out.metrics.policy_loss, 0.0);
            let want = vec![dk.iter().map(|g| 0.5 * g / 4.0).collect::<Vec<_>>()];
            assert_grad_close(&grad, &want, &format!("{est:?} grad"));
        }
    }
    Ok(())
}

#[test]
fn k3_and_k2_are_non_negative_and_k3_is_accurate_near_zero() -> Result<()> {
    // A dense grid, including tiny |d| where exp(d) − d − 1 cancels in f32.
    let mut d: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 5e-3).collect();
    for e in -12..=-1 {
        for m in [1.0f32, 1.7, 3.3, 5.9, 8.1] {
            let x = m * 10f32.powi(e);
            d.extend([x, -x]);
        }
    }
    for dev in devices() {
        let dt = Tensor::new(d.as_slice(), &dev)?;
        for est in [KlEstimator::K2, KlEstimator::K3] {
            let k = est.per_token(&dt)?.to_vec1::<f32>()?;
            for (x, v) in d.iter().zip(&k) {
                assert!(*v >= 0.0, "{est:?}({x}) = {v} < 0");
            }
        }
        // k3 against f64: exp_m1(d) − d, or for |d| < 1e-3 (where even f64 cancels) the series
        // to d⁵, whose truncation error is below 1e-15 relative there.
        let k3 = KlEstimator::K3.per_token(&dt)?.to_vec1::<f32>()?;
        for (&x, &v) in d.iter().zip(&k3) {
            let y = x as f64;
            let want = if y.abs() < 1e-3 {
                y * y / 2.0 * (1.0 + y / 3.0 * (1.0 + y / 4.0 * (1.0 + y / 5.0)))
            } else {
                y.exp_m1() - y
            };
            let rel = (v as f64 - want).abs() / want.max(f64::MIN_POSITIVE);
            let tol = if x.abs() < 0.1 { 1e-5 } else { 1e-4 };
            assert!(
                want == 0.0 || rel <= tol,
                "k3({x}) = {v}, want {want} (rel {rel:.1e})"
            );
        }
    }
    Ok(())
}

#[test]
fn reference_is_needed_only_for_the_kl_term() -> Result<()> {
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        let cfg = ObjectiveConfig::default();
        let without = clipped_objective(&cfg, &batch.inputs(false))?;
        let with = clipped_objective(&cfg, &batch.inputs(true))?;
        assert_eq!(without.metrics.kl, 0.0, "no reference, no kl metric");
        assert_close(with.metrics.kl, 0.037543229, "kl metric with beta = 0");
        assert_eq!(
            loss_of(&without),
            loss_of(&with),
            "beta = 0: the reference is not in the loss"
        );
        assert_eq!(without.metrics.policy_loss, with.metrics.policy_loss);
    }
    Ok(())
}

#[test]
fn gradient_flows_only_into_logp_and_never_into_padding() -> Result<()> {
    for dev in devices() {
        let logp = Var::new(&LOGP, &dev)?;
        // Pass Vars everywhere: only logp may receive a gradient.
        let old = Var::new(&OLD, &dev)?;
        let reference = Var::new(&REF, &dev)?;
        let mask = Var::new(&MASK, &dev)?;
        let adv = Var::new(&ADV, &dev)?;
        let inputs = ObjectiveInputs {
            logp: logp.as_tensor(),
            old_logp: old.as_tensor(),
            ref_logp: Some(reference.as_tensor()),
            mask: mask.as_tensor(),
            advantages: adv.as_tensor(),
            entropy: None,
            row_mask: None,
        };
        for cfg in golden_cases().into_iter().map(|c| c.cfg) {
            let out = clipped_objective(&cfg, &inputs)?;
            let grads = out.loss.backward()?;
            for (name, v) in [
                ("old_logp", &old),
                ("ref_logp", &reference),
                ("mask", &mask),
                ("advantages", &adv),
            ] {
                assert!(
                    grads.get(v.as_tensor()).is_none(),
                    "{name} must be treated as a constant"
                );
            }
            let g = grads
                .get(logp.as_tensor())
                .expect("logp has a gradient")
                .to_vec2::<f32>()?;
            for (i, row) in MASK.iter().enumerate() {
                for (t, &m) in row.iter().enumerate() {
                    assert!(g[i][t].is_finite());
                    if m == 0.0 {
                        assert_eq!(g[i][t], 0.0, "{cfg:?}: padding ({i},{t}) got a gradient");
                    }
                }
            }
            // Tokens on the unclipped branch move: (0,0) is inside the clip range in every case.
            assert!(g[0][0] != 0.0, "{cfg:?}");
        }
    }
    Ok(())
}

#[test]
fn padding_values_never_reach_loss_metrics_or_gradient() -> Result<()> {
    let garbage = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30];
    for dev in devices() {
        let clean = Batch::golden(&dev)?;
        for (k, &bad) in garbage.iter().enumerate() {
            let (mut logp, mut old, mut reference) = (LOGP, OLD, REF);
            for (i, row) in MASK.iter().enumerate() {
                for (t, &m) in row.iter().enumerate() {
                    if m == 0.0 {
                        // Different garbage in each tensor, so no difference cancels.
                        logp[i][t] = bad;
                        old[i][t] = garbage[(k + 1) % garbage.len()];
                        reference[i][t] = garbage[(k + 2) % garbage.len()];
                    }
                }
            }
            let dirty = Batch::new(&dev, logp, old, reference, MASK, ADV)?;
            for case in golden_cases() {
                let (a, ga) = clean.run(&case.cfg)?;
                let (b, gb) = dirty.run(&case.cfg)?;
                let what = format!("{} with padding {bad}", case.name);
                assert_eq!(loss_of(&a), loss_of(&b), "{what}");
                assert_eq!(a.metrics, b.metrics, "{what}");
                assert_eq!(ga, gb, "{what}");
            }
        }
    }
    Ok(())
}

#[test]
fn rows_without_tokens_give_no_nan() -> Result<()> {
    for dev in devices() {
        // Row 2 has no completion token (e.g. a generation that stopped at once).
        let logp = Var::new(&[[-1.0f32, -0.5], [-0.2, 3.0], [-7.0, -9.0]], &dev)?;
        let mask = Tensor::new(&[[1.0f32, 1.0], [1.0, 0.0], [0.0, 0.0]], &dev)?;
        let adv = Tensor::new(&[1.0f32, 2.0, 5.0], &dev)?;
        // Ratio 1: token losses are −A. n = (2, 1, 0), N = 3.
        let cases = [
            (LossAggregation::Grpo, -(1.0 + 2.0 + 0.0) / 3.0), // the empty row still counts in B
            (LossAggregation::Bnpo, -(2.0 + 2.0) / 3.0),
            (LossAggregation::DrGrpo, -(2.0 + 2.0) / 6.0),
        ];
        for (aggregation, want) in cases {
            for ratio_level in RatioLevel::ALL {
                let cfg = ObjectiveConfig {
                    aggregation,
                    ratio_level,
                    ..Default::default()
                };
                let (out, grad) = on_policy(&cfg, &logp, &mask, &adv)?;
                assert_close(loss_of(&out), want, &format!("{cfg:?}"));
                assert_eq!(grad[2], [0.0, 0.0], "{cfg:?}");
                assert!(grad.iter().flatten().all(|g| g.is_finite()));
                let m = metrics_array(&out.metrics);
                assert!(m.iter().all(|x| x.is_finite()), "{m:?}");
                assert_eq!(out.metrics.num_tokens, 3.0);
            }
        }
    }
    Ok(())
}

#[test]
fn sequence_ratio_equals_token_ratio_when_a_row_has_one_log_ratio() -> Result<()> {
    // Each row has a single log-ratio for all its tokens (inside, clipped low, clipped high).
    let old = [[-1.0f32, -2.0, -0.5], [-0.3, -0.7, 5.0], [-1.5, -0.2, -0.9]];
    let lr = [0.1f32, -0.4, 0.3];
    let mut logp = old;
    for (row, l) in logp.iter_mut().zip(lr) {
        for x in row.iter_mut() {
            *x += l;
        }
    }
    let mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]];
    for dev in devices() {
        let batch = Batch::new(&dev, logp, old, old, mask, [0.7, -1.1, 0.4])?;
        for aggregation in ALL_AGGREGATIONS {
            let token = ObjectiveConfig {
                aggregation,
                ..Default::default()
            };
            let seq = ObjectiveConfig {
                ratio_level: RatioLevel::Sequence,
                ..token
            };
            let (a, ga) = batch.run(&token)?;
            let (b, gb) = batch.run(&seq)?;
            assert_close(loss_of(&a), loss_of(&b), &format!("{aggregation:?} loss"));
            assert_close(
                a.metrics.clip_ratio_region,
                b.metrics.clip_ratio_region,
                "region",
            );
            assert_close(
                a.metrics.clip_ratio_region,
                5.0 / 8.0,
                "rows 1 and 2 are clipped",
            );
            let ga: Vec<Vec<f64>> = ga
                .iter()
                .map(|r| r.iter().map(|&x| x as f64).collect())
                .collect();
            assert_grad_close(&gb, &ga, &format!("{aggregation:?} grad"));
        }
    }
    Ok(())
}

#[test]
fn other_dtypes_are_converted_to_logp_dtype() -> Result<()> {
    let f64_rows = |a: [[f32; 4]; 3]| a.map(|r| r.map(|x| x as f64));
    for dev in devices() {
        // f64 throughout.
        let logp = Var::new(&f64_rows(LOGP), &dev)?;
        let old = Tensor::new(&f64_rows(OLD), &dev)?;
        let mask = Tensor::new(&f64_rows(MASK), &dev)?;
        let adv = Tensor::new(&ADV.map(|x| x as f64), &dev)?;
        let inputs = ObjectiveInputs {
            logp: logp.as_tensor(),
            old_logp: &old,
            ref_logp: None,
            mask: &mask,
            advantages: &adv,
            entropy: None,
            row_mask: None,
        };
        let (out, grad) = run_inputs(&ObjectiveConfig::default(), &inputs, &logp)?;
        assert_eq!(out.loss.dtype(), DType::F64);
        assert_close(loss_of(&out), 0.834857452, "f64 loss");
        assert_close(grad[2][0] as f64, 0.647355064, "f64 grad");

        // f32 logp with a u8 mask and f64 advantages.
        let batch = Batch::golden(&dev)?;
        let mask_u8 = batch.mask.to_dtype(DType::U8)?;
        let inputs = ObjectiveInputs {
            mask: &mask_u8,
            advantages: &adv,
            ..batch.inputs(true)
        };
        let out = clipped_objective(&ObjectiveConfig::default(), &inputs)?;
        assert_eq!(out.loss.dtype(), DType::F32);
        assert_close(loss_of(&out), 0.834857452, "u8 mask");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: typed errors, no panics
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn expect_shape_error(r: Result<ObjectiveOutput>, what: &str, expected: &[usize], got: &[usize]) {
    match r {
        Err(Error::ShapeMismatch {
            what: w,
            expected: e,
            got: g,
        }) => {
            assert_eq!((w, e.as_slice(), g.as_slice()), (what, expected, got));
        }
        other => panic!(
            "expected ShapeMismatch for {what}, got {:?}",
            other.map(|o| o.metrics)
        ),
    }
}

#[track_caller]
fn expect_config_error(r: Result<ObjectiveOutput>, field: &str) -> String {
    match r {
        Err(Error::InvalidConfig { field: f, reason }) => {
            assert_eq!(f, field, "{reason}");
            reason
        }
        other => panic!(
            "expected InvalidConfig({field}), got {:?}",
            other.map(|o| o.metrics)
        ),
    }
}

#[test]
fn wrong_shapes_are_typed_errors_naming_the_tensor() -> Result<()> {
    let dev = Device::Cpu;
    let b = Batch::golden(&dev)?;
    let cfg = ObjectiveConfig::default();
    let flat = b.logp.as_tensor().flatten_all()?;
    let short = b.old.narrow(1, 0, 3)?;
    let col = b.adv.unsqueeze(1)?;
    let wide_mask = Tensor::ones((3, 5), DType::F32, &dev)?;
    let ref_rows = b.reference.narrow(0, 0, 2)?;

    let r = clipped_objective(
        &cfg,
        &ObjectiveInputs {
            logp: &flat,
            ..b.inputs(true)
        },
    );
    expect_shape_error(r, "logp", &[3, 4], &[12]);
    let r = clipped_objective(
        &cfg,
        &ObjectiveInputs {
            old_logp: &short,
            ..b.inputs(true)
        },
    );
    expect_shape_error(r, "old_logp", &[3, 4], &[3, 3]);
    let r = clipped_objective(
        &cfg,
        &ObjectiveInputs {
            mask: &wide_mask,
            ..b.inputs(true)
        },
    );
    expect_shape_error(r, "mask", &[3, 4], &[3, 5]);
    let r = clipped_objective(
        &cfg,
        &ObjectiveInputs {
            ref_logp: Some(&ref_rows),
            ..b.inputs(true)
        },
    );
    expect_shape_error(r, "ref_logp", &[3, 4], &[2, 4]);
    let r = clipped_objective(
        &cfg,
        &ObjectiveInputs {
            advantages: &col,
            ..b.inputs(true)
        },
    );
    expect_shape_error(r, "advantages", &[3], &[3, 1]);
    let one = Tensor::new(&[1.0f32, 2.0], &dev)?;
    let r = clipped_objective(
        &cfg,
        &ObjectiveInputs {
            advantages: &one,
            ..b.inputs(true)
        },
    );
    expect_shape_error(r, "advantages", &[3], &[2]);
    Ok(())
}

#[test]
fn missing_reference_empty_mask_and_bad_config_are_typed_errors() -> Result<()> {
    let dev = Device::Cpu;
    let b = Batch::golden(&dev)?;

    // beta > 0 without ref_logp
    let cfg = ObjectiveConfig {
        beta: 0.04,
        ..Default::default()
    };
    let reason = expect_config_error(clipped_objective(&cfg, &b.inputs(false)), "beta");
    assert!(reason.contains("ref_logp"), "{reason}");

    // all-zero mask
    let zeros = b.mask.zeros_like()?;
    let r = clipped_objective(
        &ObjectiveConfig::default(),
        &ObjectiveInputs {
            mask: &zeros,
            ..b.inputs(true)
        },
    );
    assert!(
        matches!(r, Err(Error::Empty("mask"))),
        "{:?}",
        r.map(|o| o.metrics)
    );

    // no rows / no columns
    for (rows, cols) in [(0, 4), (3, 0)] {
        let e = Tensor::zeros((rows, cols), DType::F32, &dev)?;
        let a = Tensor::zeros(rows, DType::F32, &dev)?;
        let inputs = ObjectiveInputs {
            logp: &e,
            old_logp: &e,
            ref_logp: None,
            mask: &e,
            advantages: &a,
            entropy: None,
            row_mask: None,
        };
        let r = clipped_objective(&ObjectiveConfig::default(), &inputs);
        assert!(
            matches!(r, Err(Error::Empty("mask"))),
            "({rows}, {cols}): {:?}",
            r.map(|o| o.metrics)
        );
    }

    // max_completion_len shorter than the mask
    let cfg = ObjectiveConfig {
        max_completion_len: Some(3),
        ..Default::default()
    };
    let reason = expect_config_error(
        clipped_objective(&cfg, &b.inputs(true)),
        "max_completion_len",
    );
    assert!(reason.contains("T = 4"), "{reason}");

    // invalid fields are reported before any tensor work
    let d = ObjectiveConfig::default();
    for (cfg, field) in [
        (ObjectiveConfig { eps_low: 1.0, ..d }, "eps_low"),
        (
            ObjectiveConfig {
                eps_high: -0.5,
                ..d
            },
            "eps_high",
        ),
        (
            ObjectiveConfig {
                dual_clip: Some(1.0),
                ..d
            },
            "dual_clip",
        ),
        (
            ObjectiveConfig {
                beta: f32::NAN,
                ..d
            },
            "beta",
        ),
        (
            ObjectiveConfig {
                max_completion_len: Some(0),
                ..d
            },
            "max_completion_len",
        ),
    ] {
        expect_config_error(clipped_objective(&cfg, &b.inputs(true)), field);
    }

    // a device or dtype problem surfaces as candle's error, not a panic
    let ints = Tensor::new(&[[1u32, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]], &dev)?;
    let r = clipped_objective(
        &ObjectiveConfig::default(),
        &ObjectiveInputs {
            logp: &ints,
            ..b.inputs(true)
        },
    );
    assert!(
        matches!(r, Err(Error::Candle(_))),
        "{:?}",
        r.map(|o| o.metrics)
    );
    Ok(())
}
