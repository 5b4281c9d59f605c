//! Tests of the objective's successors of PPO's clip and its controls: the CISPO and SAPO
//! surrogates, the entropy bonus and the high-entropy token mask (TRL's `entropy_coef` and
//! `top_entropy_quantile`), the row mask (rows that leave the batch, `B` included) and the
//! checks of the mask and entropy values. The PPO/GRPO losses are tested in
//! `tests/objective.rs`.
//!
//! Golden values come from the PyTorch script below, kept runnable as
//! `tests/golden/surrogates_golden.py` (`/work/venv-trl/bin/python
//! tests/golden/surrogates_golden.py`, torch only), written from the papers' formulas. It
//! computes in float64 from float32 inputs, takes gradients with autograd and checks them (by
//! central differences, or against CISPO's stop-gradient formula) before printing. The test
//! `golden_script_is_pasted_verbatim` keeps the two copies identical. Tolerance: 1e-5
//! absolute. Every tensor test runs once per device (CPU, plus CUDA when built with
//! `--features cuda`).

/* ---- tests/golden/surrogates_golden.py (verbatim) ----
"""Golden values for the CISPO, SAPO, entropy-control and row-mask tests of tests/objective.rs.

Run: /work/venv-trl/bin/python tests/golden/surrogates_golden.py   (needs torch only)

Written from the papers' formulas, not from any implementation:
  CISPO  MiniMax-M1 (arXiv:2506.13585): sg(clip(r, 1 - eps_low_IS, 1 + eps_high_IS)) * A * log pi,
         with no lower bound (the paper sets eps_low_IS large) and the cap 1 + eps_high.
  SAPO   Gao et al. 2025 (arXiv:2511.20347): f(r) * A with f(x) = sigmoid(tau (x - 1)) * 4 / tau,
         tau = tau_pos if A > 0 else tau_neg.
  top-entropy mask  "Beyond the 80/20 Rule" (arXiv:2506.01939) as TRL's top_entropy_quantile:
         keep the completion tokens whose entropy is >= the (1 - rho) quantile of all of them.
  entropy bonus     TRL's entropy_coef: loss - coef * mean entropy of the tokens trained on.
  row mask          a dropped row leaves the batch: the result equals the batch without it.
Everything is float64 from float32 inputs. Gradients come from autograd and are checked before
printing: by central differences for the surrogates whose gradient is the derivative of their
value, and against the stop-gradient formula w * A for CISPO (whose gradient is not).
This file is pasted verbatim into tests/objective.rs; a test checks that the copies agree.
"""

import torch

torch.set_default_dtype(torch.float64)
f32 = lambda x: torch.tensor(x, dtype=torch.float32).to(torch.float64)

# The batch of tests/golden/objective_golden.py, plus per-token entropies (padding: garbage).
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
ENT = f32([[0.9, 0.1, 1.6, 0.4],
           [2.2, 0.7, 50.0, -3.0],
           [0.3, 1.2, 0.05, 99.0]])


def base(**kw):
    cfg = dict(surrogate="clip", eps_low=0.2, eps_high=0.2, ratio_level="token",
               aggregation="grpo", beta=0.0, tau_pos=1.0, tau_neg=1.05, entropy_coef=0.0,
               top_entropy_quantile=1.0, row_mask=None, max_completion_len=None)
    cfg.update(kw)
    return cfg


def objective(cfg, logp, ent, mask=MASK, old=OLD, ref=REF, adv=ADV):
    B, T = logp.shape
    keep_row = torch.ones(B) if cfg["row_mask"] is None else f32(cfg["row_mask"])
    m = mask * keep_row[:, None]
    rows = keep_row.sum()
    A = adv[:, None].expand(B, T)
    tok = m > 0
    n = m.sum(1)
    N = m.sum()

    log_r_tok = torch.where(tok, logp - old, 0.0)
    if cfg["ratio_level"] == "token":
        log_r = log_r_tok
    else:  # GSPO: one ratio per row, exp of the mean token log-ratio
        log_r = ((log_r_tok * m).sum(1) / n.clamp(min=1.0))[:, None].expand(B, T)
    r = torch.exp(log_r)
    lo, hi = 1.0 - f32(cfg["eps_low"]), 1.0 + f32(cfg["eps_high"])

    if cfg["surrogate"] == "clip":
        surr = torch.minimum(r * A, torch.clamp(r, lo, hi) * A)
        low, high = (r < lo) & (A < 0), (r > hi) & (A > 0)
    elif cfg["surrogate"] == "cispo":
        w = torch.clamp(r, max=hi).detach()  # sg(clip(r, -inf, 1 + eps_high))
        surr = w * A * torch.where(tok, logp, 0.0)
        low, high = torch.zeros_like(tok), (r > hi) & (A > 0)
    else:  # sapo
        tau = torch.where(A > 0, f32(cfg["tau_pos"]), f32(cfg["tau_neg"]))
        surr = torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau * A
        low, high = torch.zeros_like(tok), torch.zeros_like(tok)

    H = torch.where(tok, ent, 0.0)
    rho = cfg["top_entropy_quantile"]
    if rho < 1.0:
        threshold = torch.quantile(H[tok], 1.0 - rho)  # linear interpolation
        keep = ((H >= threshold) & tok).to(torch.float64)
    else:
        keep = torch.ones(B, T)
    surr = surr * keep

    d = torch.where(tok, ref - logp, 0.0)
    kl = torch.exp(d) - d - 1.0  # k3
    per_token = -surr + f32(cfg["beta"]) * kl

    L = cfg["max_completion_len"] or T
    agg = {"grpo": lambda x: ((x * m).sum(1) / n.clamp(min=1.0)).sum() / rows,
           "bnpo": lambda x: (x * m).sum() / N.clamp(min=1.0),
           "dr_grpo": lambda x: (x * m).sum() / (rows * L)}[cfg["aggregation"]]
    loss = agg(per_token)
    coef = f32(cfg["entropy_coef"])
    if coef != 0.0:
        kept = m * keep
        if cfg["aggregation"] == "bnpo":
            mean_entropy = (H * kept).sum() / N.clamp(min=1.0)
        else:
            mean_entropy = (H * kept).sum() / kept.sum().clamp(min=1.0)
        loss = loss - coef * mean_entropy

    mmean = lambda x: (x.to(torch.float64) * m).sum() / N
    metrics = dict(policy_loss=agg(-surr.detach()).item(), kl=mmean(kl.detach()).item(),
                   approx_kl=mmean((torch.exp(log_r_tok) - 1 - log_r_tok).detach()).item(),
                   clip_ratio_low=mmean(low).item(), clip_ratio_high=mmean(high).item(),
                   clip_ratio_region=mmean(low | high).item(), num_tokens=N.item())
    return loss, metrics, keep, w if cfg["surrogate"] == "cispo" else None


def run(cfg):
    logp = LOGP.clone().requires_grad_(True)
    ent = ENT.clone().requires_grad_(True)
    loss, metrics, keep, w = objective(cfg, logp, ent)
    g_logp, g_ent = torch.autograd.grad(loss, [logp, ent], allow_unused=True)
    check(cfg, g_logp, keep, w)
    return loss.item(), metrics, g_logp, g_ent


def check(cfg, g_logp, keep, w, h=1e-6):
    if cfg["surrogate"] == "cispo":
        # d loss / d logp = -w * A * keep * (aggregation weight) + beta * weight * (1 - e^d):
        # rebuild the aggregation weight from a per-token loss of ones.
        assert cfg["ratio_level"] == "token" or cfg["beta"] == 0.0
        B, T = LOGP.shape
        keep_row = torch.ones(B) if cfg["row_mask"] is None else f32(cfg["row_mask"])
        m = MASK * keep_row[:, None]
        n, N, rows = m.sum(1), m.sum(), keep_row.sum()
        L = cfg["max_completion_len"] or T
        weight = {"grpo": m / (rows * n.clamp(min=1.0))[:, None],
                  "bnpo": m / N.clamp(min=1.0),
                  "dr_grpo": m / (rows * L)}[cfg["aggregation"]]
        d = torch.where(m > 0, REF - LOGP, 0.0)
        want = weight * (-w * ADV[:, None] * keep + f32(cfg["beta"]) * (1.0 - torch.exp(d)))
        assert torch.allclose(g_logp, want, atol=1e-12), (cfg, g_logp, want)
        return
    fd = torch.zeros_like(LOGP)
    for i in range(LOGP.shape[0]):
        for j in range(LOGP.shape[1]):
            up, dn = LOGP.clone(), LOGP.clone()
            up[i, j] += h
            dn[i, j] -= h
            fd[i, j] = (objective(cfg, up, ENT)[0] - objective(cfg, dn, ENT)[0]) / (2 * h)
    assert (fd - g_logp).abs().max() < 1e-7, (cfg, fd, g_logp)


def check_row_mask_is_row_removal(cfg):
    """A row dropped by the row mask gives the loss of the batch without that row."""
    drop = [i for i, k in enumerate(cfg["row_mask"]) if not k]
    keep = [i for i in range(len(cfg["row_mask"])) if i not in drop]
    sub = dict(cfg, row_mask=None)
    a = objective(cfg, LOGP, ENT)[0]
    b = objective(sub, LOGP[keep], ENT[keep], MASK[keep], OLD[keep], REF[keep], ADV[keep])[0]
    assert abs(a - b) < 1e-12, (cfg, a, b)


CASES = [
    ("cispo_dapo", base(surrogate="cispo", aggregation="bnpo"), True, False),
    ("cispo_grpo_seq", base(surrogate="cispo", ratio_level="sequence"), True, False),
    ("cispo_dr_grpo_cap5_k3", base(surrogate="cispo", aggregation="dr_grpo", eps_high=4.0,
                                   beta=0.04, max_completion_len=6), True, False),
    ("sapo", base(surrogate="sapo"), True, False),
    ("sapo_bnpo_tau", base(surrogate="sapo", aggregation="bnpo", tau_pos=0.5, tau_neg=2.0),
     True, False),
    ("sapo_seq", base(surrogate="sapo", ratio_level="sequence"), True, False),
    ("clip_top50", base(top_entropy_quantile=0.5), True, False),
    ("clip_top20_bonus_dapo", base(aggregation="bnpo", top_entropy_quantile=0.2,
                                   entropy_coef=0.01), True, True),
    ("bonus_grpo", base(entropy_coef=0.05), False, True),
    ("cispo_top20_bonus_k3", base(surrogate="cispo", aggregation="bnpo",
                                  top_entropy_quantile=0.2, entropy_coef=0.01, beta=0.04),
     True, True),
    ("sapo_top50_bonus_dr", base(surrogate="sapo", aggregation="dr_grpo",
                                 top_entropy_quantile=0.5, entropy_coef=0.02), True, True),
    ("rows_grpo", base(row_mask=[1, 0, 1]), True, False),
    ("rows_dr_grpo", base(aggregation="dr_grpo", row_mask=[1, 1, 0], max_completion_len=6),
     True, False),
    ("rows_cispo_top50_bonus", base(surrogate="cispo", aggregation="bnpo", row_mask=[0, 1, 1],
                                    top_entropy_quantile=0.5, entropy_coef=0.01), True, True),
]

for name, cfg, want_logp, want_ent in CASES:
    if cfg["row_mask"] is not None:
        check_row_mask_is_row_removal(cfg)
    loss, met, g_logp, g_ent = run(cfg)
    assert (g_ent is not None) == (cfg["entropy_coef"] != 0.0) == want_ent, name
    print(f"{name}: loss = {loss:.9f}")
    items = [f"{k} = {v:.9f}" for k, v in met.items()]
    for group in (items[:3], items[3:6], items[6:]):
        print("   " + ", ".join(group))
    for what, g, want in (("logp", g_logp, want_logp), ("entropy", g_ent, want_ent)):
        if want:
            print(f"   d/d{what}:")
            for row in g.tolist():
                print("   [" + ", ".join(f"{x + 0.0:.9f}" for x in row) + "],")
---- end of script ----

Printed (/work/venv-trl/bin/python tests/golden/surrogates_golden.py, torch 2.15):
cispo_dapo: loss = 0.104043624
   policy_loss = 0.104043624, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.111111111, clip_ratio_region = 0.111111111
   num_tokens = 9.000000000
   d/dlogp:
   [-0.099999997, -0.119999997, -0.074081819, -0.110517092],
   [0.044688003, 0.080000003, 0.000000000, 0.000000000],
   [0.173333327, 0.130698734, 0.151850275, 0.000000000],
cispo_grpo_seq: loss = -0.152815239
   policy_loss = -0.152815239, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.000000000, clip_ratio_region = 0.000000000
   num_tokens = 9.000000000
   d/dlogp:
   [-0.075375938, -0.075375938, -0.075375938, -0.075375938],
   [0.092774353, 0.092774353, 0.000000000, 0.000000000],
   [0.173333327, 0.173333327, 0.173333327, 0.000000000],
cispo_dr_grpo_cap5_k3: loss = -0.064292733
   policy_loss = -0.065043598, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.000000000, clip_ratio_region = 0.000000000
   num_tokens = 9.000000000
   d/dlogp:
   [-0.049597178, -0.063021903, -0.036829437, -0.056351489],
   [0.021851995, 0.042909231, 0.000000000, 0.000000000],
   [0.324551908, 0.064857361, 0.076416691, 0.000000000],
sapo: loss = 0.849927855
   policy_loss = 0.849927855, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.000000000, clip_ratio_region = 0.000000000
   num_tokens = 9.000000000
   d/dlogp:
   [-0.074999998, -0.092055137, -0.054638626, -0.082659036],
   [0.065063337, 0.125589343, 0.000000000, 0.000000000],
   [0.063585752, 0.130373047, 0.151740306, 0.000000000],
sapo_bnpo_tau: loss = -0.907450024
   policy_loss = -0.907450024, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.000000000, clip_ratio_region = 0.000000000
   num_tokens = 9.000000000
   d/dlogp:
   [-0.099999997, -0.124137269, -0.073771659, -0.110440725],
   [0.040162343, 0.079051263, 0.000000000, 0.000000000],
   [0.002444695, 0.129522247, 0.151451799, 0.000000000],
sapo_seq: loss = 0.850538945
   policy_loss = 0.850538945, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.000000000, clip_ratio_region = 0.000000000
   num_tokens = 9.000000000
   d/dlogp:
   [-0.075375464, -0.075375464, -0.075375464, -0.075375464],
   [0.092640976, 0.092640976, 0.000000000, 0.000000000],
   [0.210948010, 0.210948010, 0.210948010, 0.000000000],
clip_top50: loss = 0.208539929
   policy_loss = 0.208539929, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
   d/dlogp:
   [-0.074999998, 0.000000000, -0.055561364, 0.000000000],
   [0.000000000, 0.128402554, 0.000000000, 0.000000000],
   [0.000000000, 0.130698734, 0.000000000, 0.000000000],
clip_top20_bonus_dapo: loss = -0.024970706
   policy_loss = -0.020748484, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
   d/dlogp:
   [0.000000000, 0.000000000, -0.074081819, 0.000000000],
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
   d/dentropy:
   [0.000000000, 0.000000000, -0.001111111, 0.000000000],
   [-0.001111111, 0.000000000, 0.000000000, 0.000000000],
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
bonus_grpo: loss = 0.793468561
   policy_loss = 0.834857452, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.111111111, clip_ratio_high = 0.111111111, clip_ratio_region = 0.222222222
   num_tokens = 9.000000000
   d/dentropy:
   [-0.005555556, -0.005555556, -0.005555556, -0.005555556],
   [-0.005555556, -0.005555556, 0.000000000, 0.000000000],
   [-0.005555556, -0.005555556, -0.005555556, 0.000000000],
cispo_top20_bonus_k3: loss = 0.007388159
   policy_loss = 0.010108652, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.111111111, clip_ratio_region = 0.111111111
   num_tokens = 9.000000000
   d/dlogp:
   [0.000805641, -0.001436132, -0.073658875, -0.002185887],
   [0.043703991, 0.000216758, 0.000000000, 0.000000000],
   [0.001748753, -0.000984012, 0.000983108, 0.000000000],
   d/dentropy:
   [0.000000000, 0.000000000, -0.001111111, 0.000000000],
   [-0.001111111, 0.000000000, 0.000000000, 0.000000000],
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
sapo_top50_bonus_dr: loss = 0.077230863
   policy_loss = 0.103630863, kl = 0.037543229, approx_kl = 0.240467662
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.000000000, clip_ratio_region = 0.000000000
   num_tokens = 9.000000000
   d/dlogp:
   [-0.074999998, 0.000000000, -0.054638626, 0.000000000],
   [0.032531668, 0.062794671, 0.000000000, 0.000000000],
   [0.000000000, 0.097779786, 0.000000000, 0.000000000],
   d/dentropy:
   [-0.004000000, 0.000000000, -0.004000000, 0.000000000],
   [-0.004000000, -0.004000000, 0.000000000, 0.000000000],
   [0.000000000, -0.004000000, 0.000000000, 0.000000000],
rows_grpo: loss = 0.939682341
   policy_loss = 0.939682341, kl = 0.045036695, approx_kl = 0.294266210
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.142857143, clip_ratio_region = 0.142857143
   num_tokens = 7.000000000
   d/dlogp:
   [-0.112499997, 0.000000000, -0.083342047, -0.124331728],
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
   [0.971032596, 0.196048101, 0.227775412, 0.000000000],
rows_dr_grpo: loss = -0.199247900
   policy_loss = -0.199247900, kl = 0.030192477, approx_kl = 0.029401896
   clip_ratio_low = 0.166666667, clip_ratio_high = 0.166666667, clip_ratio_region = 0.333333333
   num_tokens = 6.000000000
   d/dlogp:
   [-0.074999998, 0.000000000, -0.055561364, -0.082887819],
   [0.000000000, 0.064201277, 0.000000000, 0.000000000],
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
rows_cispo_top50_bonus: loss = -0.327585342
   policy_loss = -0.319385342, kl = 0.035873279, approx_kl = 0.418428616
   clip_ratio_low = 0.000000000, clip_ratio_high = 0.000000000, clip_ratio_region = 0.000000000
   num_tokens = 5.000000000
   d/dlogp:
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
   [0.080438406, 0.144000006, 0.000000000, 0.000000000],
   [0.000000000, 0.235257721, 0.000000000, 0.000000000],
   d/dentropy:
   [0.000000000, 0.000000000, 0.000000000, 0.000000000],
   [-0.002000000, -0.002000000, 0.000000000, 0.000000000],
   [0.000000000, -0.002000000, 0.000000000, 0.000000000],
*/

use candle_core::{DType, Device, Tensor, Var};
use pgrpo::objective::{RatioLevel, Surrogate};
use pgrpo::{
    clipped_objective, Error, LossAggregation, ObjectiveConfig, ObjectiveInputs, ObjectiveOutput,
    Result,
};

const TOL: f64 = 1e-5;

// The golden batch (the numbers of both scripts). Padding holds arbitrary finite values.
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
const ENT: [[f32; 4]; 3] = [
    [0.9, 0.1, 1.6, 0.4],
    [2.2, 0.7, 50.0, -3.0],
    [0.3, 1.2, 0.05, 99.0],
];

const ALL_AGGREGATIONS: [LossAggregation; 3] = [
    LossAggregation::Grpo,
    LossAggregation::Bnpo,
    LossAggregation::DrGrpo,
];

fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if candle_core::utils::cuda_is_available() {
        devices.push(Device::new_cuda(0).expect("CUDA is available but device 0 failed"));
    }
    devices
}

/// A batch of `(B, T)` rows on one device; `logp` and `entropy` are `Var`s so that their
/// gradients can be read (the entropy stands for a differentiable policy entropy).
struct Batch {
    logp: Var,
    old: Tensor,
    reference: Tensor,
    mask: Tensor,
    adv: Tensor,
    entropy: Var,
}

/// The objective's output and its gradients w.r.t. `logp` and `entropy` (zeros when the loss
/// does not reach it).
struct Run {
    out: ObjectiveOutput,
    grad_logp: Vec<Vec<f32>>,
    grad_entropy: Vec<Vec<f32>>,
}

impl Batch {
    fn from_rows(
        dev: &Device,
        logp: &[Vec<f32>],
        old: &[Vec<f32>],
        reference: &[Vec<f32>],
        mask: &[Vec<f32>],
        adv: &[f32],
        entropy: &[Vec<f32>],
    ) -> Result<Self> {
        let t = |rows: &[Vec<f32>]| -> Result<Tensor> {
            let (b, w) = (rows.len(), rows.first().map_or(0, Vec::len));
            Ok(Tensor::from_vec(rows.concat(), (b, w), dev)?)
        };
        Ok(Self {
            logp: Var::from_tensor(&t(logp)?)?,
            old: t(old)?,
            reference: t(reference)?,
            mask: t(mask)?,
            adv: Tensor::from_slice(adv, adv.len(), dev)?,
            entropy: Var::from_tensor(&t(entropy)?)?,
        })
    }

    fn golden(dev: &Device) -> Result<Self> {
        Self::from_rows(
            dev,
            &rows(LOGP),
            &rows(OLD),
            &rows(REF),
            &rows(MASK),
            &ADV,
            &rows(ENT),
        )
    }

    fn inputs<'a>(&'a self, row_mask: Option<&'a [bool]>) -> ObjectiveInputs<'a> {
        ObjectiveInputs::new(self.logp.as_tensor(), &self.old, &self.mask, &self.adv)
            .with_ref_logp(Some(&self.reference))
            .with_entropy(Some(self.entropy.as_tensor()))
            .with_row_mask(row_mask)
    }

    fn run(&self, cfg: &ObjectiveConfig, row_mask: Option<&[bool]>) -> Result<Run> {
        run_inputs(cfg, &self.inputs(row_mask), &self.logp, &self.entropy)
    }
}

fn rows<const B: usize, const T: usize>(a: [[f32; T]; B]) -> Vec<Vec<f32>> {
    a.iter().map(|r| r.to_vec()).collect()
}

fn run_inputs(
    cfg: &ObjectiveConfig,
    inputs: &ObjectiveInputs<'_>,
    logp: &Var,
    entropy: &Var,
) -> Result<Run> {
    let out = clipped_objective(cfg, inputs)?;
    assert_eq!(out.loss.rank(), 0, "the loss is a scalar");
    let grads = out.loss.backward()?;
    let read = |v: &Var| -> Result<Vec<Vec<f32>>> {
        let g = match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like()?,
        };
        Ok(g.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    };
    Ok(Run {
        grad_logp: read(logp)?,
        grad_entropy: read(entropy)?,
        out,
    })
}

fn loss_of(out: &ObjectiveOutput) -> f64 {
    out.loss
        .to_dtype(DType::F64)
        .and_then(|l| l.to_scalar::<f64>())
        .expect("scalar loss")
}

fn metrics_array(out: &ObjectiveOutput) -> [f64; 7] {
    let m = &out.metrics;
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

const METRIC_NAMES: [&str; 7] = [
    "policy_loss",
    "kl",
    "approx_kl",
    "clip_ratio_low",
    "clip_ratio_high",
    "clip_ratio_region",
    "num_tokens",
];

#[track_caller]
fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:.9}, want {want:.9} (diff {:.2e})",
        (got - want).abs()
    );
}

#[track_caller]
fn assert_rows_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {i} length");
        for (t, (&g, &w)) in g.iter().zip(w).enumerate() {
            assert_close(g as f64, w as f64, tol, &format!("{what}[{i}][{t}]"));
        }
    }
}

fn config(surrogate: Surrogate, aggregation: LossAggregation) -> ObjectiveConfig {
    ObjectiveConfig {
        surrogate,
        aggregation,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Golden values
// ---------------------------------------------------------------------------------------------

struct Golden {
    name: &'static str,
    cfg: ObjectiveConfig,
    row_mask: Option<[bool; 3]>,
    loss: f64,
    /// policy_loss, kl, approx_kl, clip_ratio_low, clip_ratio_high, clip_ratio_region, num_tokens
    metrics: [f64; 7],
    grad_logp: Option<[[f64; 4]; 3]>,
    /// d loss / d entropy; checked to be all zeros when `None` (no bonus).
    grad_entropy: Option<[[f64; 4]; 3]>,
}

fn golden_cases() -> Vec<Golden> {
    let d = ObjectiveConfig::default();
    let cispo = ObjectiveConfig {
        surrogate: Surrogate::Cispo,
        ..d
    };
    let sapo = ObjectiveConfig {
        surrogate: Surrogate::Sapo,
        ..d
    };
    // The metrics shared by the full golden batch: kl, approx_kl and N do not depend on the
    // surrogate; the clip fractions are given per case.
    let m = |policy_loss: f64, low: f64, high: f64| {
        [
            policy_loss,
            0.037543229,
            0.240467662,
            low,
            high,
            low + high,
            9.0,
        ]
    };
    vec![
        Golden {
            name: "cispo_dapo",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::Bnpo,
                ..cispo
            },
            row_mask: None,
            loss: 0.104043624,
            metrics: m(0.104043624, 0.0, 1.0 / 9.0),
            grad_logp: Some([
                [-0.099999997, -0.119999997, -0.074081819, -0.110517092],
                [0.044688003, 0.080000003, 0.000000000, 0.000000000],
                [0.173333327, 0.130698734, 0.151850275, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "cispo_grpo_seq",
            cfg: ObjectiveConfig {
                ratio_level: RatioLevel::Sequence,
                ..cispo
            },
            row_mask: None,
            loss: -0.152815239,
            metrics: m(-0.152815239, 0.0, 0.0),
            grad_logp: Some([
                [-0.075375938, -0.075375938, -0.075375938, -0.075375938],
                [0.092774353, 0.092774353, 0.000000000, 0.000000000],
                [0.173333327, 0.173333327, 0.173333327, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "cispo_dr_grpo_cap5_k3",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::DrGrpo,
                eps_high: 4.0,
                beta: 0.04,
                max_completion_len: Some(6),
                ..cispo
            },
            row_mask: None,
            loss: -0.064292733,
            metrics: m(-0.065043598, 0.0, 0.0),
            grad_logp: Some([
                [-0.049597178, -0.063021903, -0.036829437, -0.056351489],
                [0.021851995, 0.042909231, 0.000000000, 0.000000000],
                [0.324551908, 0.064857361, 0.076416691, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "sapo",
            cfg: sapo,
            row_mask: None,
            loss: 0.849927855,
            metrics: m(0.849927855, 0.0, 0.0),
            grad_logp: Some([
                [-0.074999998, -0.092055137, -0.054638626, -0.082659036],
                [0.065063337, 0.125589343, 0.000000000, 0.000000000],
                [0.063585752, 0.130373047, 0.151740306, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "sapo_bnpo_tau",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::Bnpo,
                sapo_temperature_pos: 0.5,
                sapo_temperature_neg: 2.0,
                ..sapo
            },
            row_mask: None,
            loss: -0.907450024,
            metrics: m(-0.907450024, 0.0, 0.0),
            grad_logp: Some([
                [-0.099999997, -0.124137269, -0.073771659, -0.110440725],
                [0.040162343, 0.079051263, 0.000000000, 0.000000000],
                [0.002444695, 0.129522247, 0.151451799, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "sapo_seq",
            cfg: ObjectiveConfig {
                ratio_level: RatioLevel::Sequence,
                ..sapo
            },
            row_mask: None,
            loss: 0.850538945,
            metrics: m(0.850538945, 0.0, 0.0),
            grad_logp: Some([
                [-0.075375464, -0.075375464, -0.075375464, -0.075375464],
                [0.092640976, 0.092640976, 0.000000000, 0.000000000],
                [0.210948010, 0.210948010, 0.210948010, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "clip_top50",
            cfg: ObjectiveConfig {
                top_entropy_quantile: 0.5,
                ..d
            },
            row_mask: None,
            loss: 0.208539929,
            metrics: m(0.208539929, 1.0 / 9.0, 1.0 / 9.0),
            grad_logp: Some([
                [-0.074999998, 0.000000000, -0.055561364, 0.000000000],
                [0.000000000, 0.128402554, 0.000000000, 0.000000000],
                [0.000000000, 0.130698734, 0.000000000, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "clip_top20_bonus_dapo",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::Bnpo,
                top_entropy_quantile: 0.2,
                entropy_coef: 0.01,
                ..d
            },
            row_mask: None,
            loss: -0.024970706,
            metrics: m(-0.020748484, 1.0 / 9.0, 1.0 / 9.0),
            grad_logp: Some([
                [0.000000000, 0.000000000, -0.074081819, 0.000000000],
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
            ]),
            grad_entropy: Some([
                [0.000000000, 0.000000000, -0.001111111, 0.000000000],
                [-0.001111111, 0.000000000, 0.000000000, 0.000000000],
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
            ]),
        },
        Golden {
            name: "bonus_grpo",
            cfg: ObjectiveConfig {
                entropy_coef: 0.05,
                ..d
            },
            row_mask: None,
            loss: 0.793468561,
            metrics: m(0.834857452, 1.0 / 9.0, 1.0 / 9.0),
            grad_logp: None,
            grad_entropy: Some([
                [-0.005555556, -0.005555556, -0.005555556, -0.005555556],
                [-0.005555556, -0.005555556, 0.000000000, 0.000000000],
                [-0.005555556, -0.005555556, -0.005555556, 0.000000000],
            ]),
        },
        Golden {
            name: "cispo_top20_bonus_k3",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::Bnpo,
                top_entropy_quantile: 0.2,
                entropy_coef: 0.01,
                beta: 0.04,
                ..cispo
            },
            row_mask: None,
            loss: 0.007388159,
            metrics: m(0.010108652, 0.0, 1.0 / 9.0),
            grad_logp: Some([
                [0.000805641, -0.001436132, -0.073658875, -0.002185887],
                [0.043703991, 0.000216758, 0.000000000, 0.000000000],
                [0.001748753, -0.000984012, 0.000983108, 0.000000000],
            ]),
            grad_entropy: Some([
                [0.000000000, 0.000000000, -0.001111111, 0.000000000],
                [-0.001111111, 0.000000000, 0.000000000, 0.000000000],
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
            ]),
        },
        Golden {
            name: "sapo_top50_bonus_dr",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::DrGrpo,
                top_entropy_quantile: 0.5,
                entropy_coef: 0.02,
                ..sapo
            },
            row_mask: None,
            loss: 0.077230863,
            metrics: m(0.103630863, 0.0, 0.0),
            grad_logp: Some([
                [-0.074999998, 0.000000000, -0.054638626, 0.000000000],
                [0.032531668, 0.062794671, 0.000000000, 0.000000000],
                [0.000000000, 0.097779786, 0.000000000, 0.000000000],
            ]),
            grad_entropy: Some([
                [-0.004000000, 0.000000000, -0.004000000, 0.000000000],
                [-0.004000000, -0.004000000, 0.000000000, 0.000000000],
                [0.000000000, -0.004000000, 0.000000000, 0.000000000],
            ]),
        },
        Golden {
            name: "rows_grpo",
            cfg: d,
            row_mask: Some([true, false, true]),
            loss: 0.939682341,
            metrics: [
                0.939682341,
                0.045036695,
                0.294266210,
                0.0,
                1.0 / 7.0,
                1.0 / 7.0,
                7.0,
            ],
            grad_logp: Some([
                [-0.112499997, 0.000000000, -0.083342047, -0.124331728],
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
                [0.971032596, 0.196048101, 0.227775412, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "rows_dr_grpo",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::DrGrpo,
                max_completion_len: Some(6),
                ..d
            },
            row_mask: Some([true, true, false]),
            loss: -0.199247900,
            metrics: [
                -0.199247900,
                0.030192477,
                0.029401896,
                1.0 / 6.0,
                1.0 / 6.0,
                2.0 / 6.0,
                6.0,
            ],
            grad_logp: Some([
                [-0.074999998, 0.000000000, -0.055561364, -0.082887819],
                [0.000000000, 0.064201277, 0.000000000, 0.000000000],
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
            ]),
            grad_entropy: None,
        },
        Golden {
            name: "rows_cispo_top50_bonus",
            cfg: ObjectiveConfig {
                aggregation: LossAggregation::Bnpo,
                top_entropy_quantile: 0.5,
                entropy_coef: 0.01,
                ..cispo
            },
            row_mask: Some([false, true, true]),
            loss: -0.327585342,
            metrics: [-0.319385342, 0.035873279, 0.418428616, 0.0, 0.0, 0.0, 5.0],
            grad_logp: Some([
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
                [0.080438406, 0.144000006, 0.000000000, 0.000000000],
                [0.000000000, 0.235257721, 0.000000000, 0.000000000],
            ]),
            grad_entropy: Some([
                [0.000000000, 0.000000000, 0.000000000, 0.000000000],
                [-0.002000000, -0.002000000, 0.000000000, 0.000000000],
                [0.000000000, -0.002000000, 0.000000000, 0.000000000],
            ]),
        },
    ]
}

fn grid(g: [[f64; 4]; 3]) -> Vec<Vec<f32>> {
    g.iter()
        .map(|r| r.iter().map(|&x| x as f32).collect())
        .collect()
}

#[test]
fn golden_script_is_pasted_verbatim() {
    let this_file = include_str!("objective_surrogates.rs");
    let script = include_str!("golden/surrogates_golden.py");
    assert!(
        this_file.contains(script),
        "tests/golden/surrogates_golden.py changed: paste it again into the header comment"
    );
}

#[test]
fn golden_loss_metrics_and_gradients() -> Result<()> {
    let cases = golden_cases();
    assert_eq!(cases.len(), 14);
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        for case in &cases {
            let what = format!("{} on {dev:?}", case.name);
            let keep = case.row_mask.as_ref().map(|k| &k[..]);
            let run = batch.run(&case.cfg, keep)?;
            assert_close(loss_of(&run.out), case.loss, TOL, &format!("{what}: loss"));
            for ((got, want), name) in metrics_array(&run.out)
                .into_iter()
                .zip(case.metrics)
                .zip(METRIC_NAMES)
            {
                assert_close(got, want, TOL, &format!("{what}: {name}"));
            }
            if let Some(g) = case.grad_logp {
                assert_rows_close(&run.grad_logp, &grid(g), TOL, &format!("{what}: d/dlogp"));
            }
            let want_entropy = grid(case.grad_entropy.unwrap_or([[0.0; 4]; 3]));
            assert_rows_close(
                &run.grad_entropy,
                &want_entropy,
                TOL,
                &format!("{what}: d/dentropy"),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties of the surrogates
// ---------------------------------------------------------------------------------------------

#[test]
fn every_surrogate_has_the_policy_gradient_on_policy() -> Result<()> {
    // With old_logp = logp (ratio 1) CISPO's weight is 1 and SAPO's gate has slope 1, so all
    // three surrogates give the plain policy gradient −A · (aggregation weight), for every
    // aggregation, ratio level and (for CISPO) cap.
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        for aggregation in ALL_AGGREGATIONS {
            for ratio_level in RatioLevel::ALL {
                let clip = ObjectiveConfig {
                    aggregation,
                    ratio_level,
                    ..Default::default()
                };
                let on_policy = |cfg: &ObjectiveConfig| -> Result<Run> {
                    let inputs = ObjectiveInputs {
                        old_logp: batch.logp.as_tensor(),
                        ..batch.inputs(None)
                    };
                    run_inputs(cfg, &inputs, &batch.logp, &batch.entropy)
                };
                let want = on_policy(&clip)?.grad_logp;
                for cfg in [
                    ObjectiveConfig {
                        surrogate: Surrogate::Cispo,
                        ..clip
                    },
                    ObjectiveConfig {
                        surrogate: Surrogate::Cispo,
                        eps_high: 0.0,
                        ..clip
                    },
                    ObjectiveConfig {
                        surrogate: Surrogate::Sapo,
                        ..clip
                    },
                    ObjectiveConfig {
                        surrogate: Surrogate::Sapo,
                        sapo_temperature_pos: 7.0,
                        sapo_temperature_neg: 0.1,
                        ..clip
                    },
                ] {
                    let run = on_policy(&cfg)?;
                    assert_rows_close(&run.grad_logp, &want, 1e-6, &format!("{cfg:?}"));
                    assert_eq!(run.out.metrics.clip_ratio_region, 0.0, "{cfg:?}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn cispo_keeps_the_gradient_of_tokens_the_clip_drops() -> Result<()> {
    // Token (0, 1) has ratio e^0.22 = 1.246 > 1.2 with A > 0: PPO's clip zeroes its gradient,
    // CISPO weights it by the cap 1.2; token (2, 0) has ratio e^1.5 with A < 0 and is capped too.
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        let clip = batch.run(&config(Surrogate::Clip, LossAggregation::Bnpo), None)?;
        let cispo = batch.run(&config(Surrogate::Cispo, LossAggregation::Bnpo), None)?;
        assert_eq!(clip.grad_logp[0][1], 0.0);
        assert_close(
            cispo.grad_logp[0][1] as f64,
            -1.2 * 0.9 / 9.0,
            1e-6,
            "capped weight",
        );
        assert_close(
            cispo.grad_logp[2][0] as f64,
            1.2 * 1.3 / 9.0,
            1e-6,
            "capped weight, A < 0",
        );
        // No completion token has a zero gradient under CISPO (every A ≠ 0).
        for (i, row) in MASK.iter().enumerate() {
            for (t, &m) in row.iter().enumerate() {
                assert_eq!(cispo.grad_logp[i][t] != 0.0, m != 0.0, "({i}, {t})");
            }
        }
    }
    Ok(())
}

#[test]
fn new_surrogates_ignore_padding_values() -> Result<()> {
    // Padding may hold NaN/±inf in logp, old_logp, ref_logp and entropy: nothing leaks.
    let garbage = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30];
    for dev in devices() {
        let clean = Batch::golden(&dev)?;
        for (k, &bad) in garbage.iter().enumerate() {
            let dirty_rows = |a: [[f32; 4]; 3], shift: usize| -> Vec<Vec<f32>> {
                let mut r = rows(a);
                for (i, row) in MASK.iter().enumerate() {
                    for (t, &m) in row.iter().enumerate() {
                        if m == 0.0 {
                            r[i][t] = garbage[(k + shift) % garbage.len()];
                        }
                    }
                }
                r
            };
            let dirty = Batch::from_rows(
                &dev,
                &dirty_rows(LOGP, 0),
                &dirty_rows(OLD, 1),
                &dirty_rows(REF, 2),
                &rows(MASK),
                &ADV,
                &dirty_rows(ENT, 3),
            )?;
            for case in golden_cases() {
                let keep = case.row_mask.as_ref().map(|k| &k[..]);
                let a = clean.run(&case.cfg, keep)?;
                let b = dirty.run(&case.cfg, keep)?;
                let what = format!("{} with padding {bad}", case.name);
                assert_eq!(loss_of(&a.out), loss_of(&b.out), "{what}");
                assert_eq!(a.out.metrics, b.out.metrics, "{what}");
                assert_eq!(a.grad_logp, b.grad_logp, "{what}");
                assert_eq!(a.grad_entropy, b.grad_entropy, "{what}");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Entropy controls
// ---------------------------------------------------------------------------------------------

#[test]
fn entropy_controls_off_leave_the_loss_bit_identical() -> Result<()> {
    // Passing an entropy with entropy_coef = 0 and top_entropy_quantile = 1 changes nothing,
    // to the bit, for every surrogate and aggregation.
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        for surrogate in Surrogate::ALL {
            for aggregation in ALL_AGGREGATIONS {
                let cfg = config(surrogate, aggregation);
                let with = batch.run(&cfg, None)?;
                let without = run_inputs(
                    &cfg,
                    &batch.inputs(None).with_entropy(None),
                    &batch.logp,
                    &batch.entropy,
                )?;
                assert_eq!(loss_of(&with.out), loss_of(&without.out), "{cfg:?}");
                assert_eq!(with.out.metrics, without.out.metrics, "{cfg:?}");
                assert_eq!(with.grad_logp, without.grad_logp, "{cfg:?}");
                assert!(with.grad_entropy.iter().flatten().all(|&g| g == 0.0));
            }
        }
    }
    Ok(())
}

#[test]
fn top_entropy_quantile_keeps_the_kl_term_and_every_denominator() -> Result<()> {
    // With rho = 0 only the highest-entropy token (1, 0) keeps its surrogate; every token keeps
    // its KL term and N = 9 stays the denominator (TRL multiplies the per-token loss, not the
    // mask). Row 1 is clipped at (1, 0) (A < 0, ratio 0.67 < 0.8): no surrogate gradient left.
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        let cfg = ObjectiveConfig {
            aggregation: LossAggregation::Bnpo,
            top_entropy_quantile: 0.0,
            beta: 0.04,
            ..Default::default()
        };
        let run = batch.run(&cfg, None)?;
        let kl_only = batch.run(
            &ObjectiveConfig {
                beta: 0.04,
                aggregation: LossAggregation::Bnpo,
                ..Default::default()
            },
            None,
        )?;
        // Surrogate of (1, 0): −min(r·A, clip(r)·A) with r = e^−0.4, A = −0.6 → clip at 0.8.
        let surr = 0.8f64 * -0.6;
        assert_close(
            run.out.metrics.policy_loss,
            -surr / 9.0,
            1e-6,
            "one token's surrogate over N = 9",
        );
        assert_close(
            loss_of(&run.out) - run.out.metrics.policy_loss,
            loss_of(&kl_only.out) - kl_only.out.metrics.policy_loss,
            1e-6,
            "the KL term is unchanged",
        );
        assert_eq!(run.out.metrics.num_tokens, 9.0);
    }
    Ok(())
}

#[test]
fn entropy_bonus_is_the_mean_token_entropy_for_every_aggregation() -> Result<()> {
    // Without the high-entropy mask the bonus is −coef · (Σ m·H / N) whatever the aggregation
    // (TRL's entropy_coef means the same for every loss type), and moves only the entropy.
    let mean_h: f64 = {
        let (mut s, mut n) = (0.0, 0.0);
        for (hr, mr) in ENT.iter().zip(MASK) {
            for (&h, m) in hr.iter().zip(mr) {
                s += (h * m) as f64;
                n += m as f64;
            }
        }
        s / n
    };
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        for surrogate in Surrogate::ALL {
            for aggregation in ALL_AGGREGATIONS {
                let cfg = config(surrogate, aggregation);
                let bonus = ObjectiveConfig {
                    entropy_coef: 0.3,
                    ..cfg
                };
                let a = batch.run(&cfg, None)?;
                let b = batch.run(&bonus, None)?;
                let what = format!("{bonus:?}");
                assert_close(
                    loss_of(&b.out) - loss_of(&a.out),
                    -0.3 * mean_h,
                    1e-5,
                    &what,
                );
                assert_eq!(a.out.metrics, b.out.metrics, "{what}");
                assert_eq!(a.grad_logp, b.grad_logp, "{what}");
                for (hr, mr) in b.grad_entropy.iter().zip(MASK) {
                    for (&g, m) in hr.iter().zip(mr) {
                        assert_close(g as f64, -0.3 * m as f64 / 9.0, 1e-7, &what);
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn entropy_inputs_are_checked() -> Result<()> {
    let dev = Device::Cpu;
    let batch = Batch::golden(&dev)?;
    let d = ObjectiveConfig::default();
    let bonus = ObjectiveConfig {
        entropy_coef: 0.01,
        ..d
    };
    let top = ObjectiveConfig {
        top_entropy_quantile: 0.2,
        ..d
    };
    // Missing entropy: InvalidConfig naming the option that needs it.
    for (cfg, field) in [(bonus, "entropy_coef"), (top, "top_entropy_quantile")] {
        match clipped_objective(&cfg, &batch.inputs(None).with_entropy(None)) {
            Err(Error::InvalidConfig { field: f, reason }) => {
                assert_eq!(f, field);
                assert!(reason.contains("entropy"), "{reason}");
            }
            other => panic!("{field}: {:?}", other.map(|o| o.metrics)),
        }
    }
    // A detached entropy cannot carry the bonus's gradient: an error, not a silent no-op.
    let detached = batch.entropy.as_tensor().detach();
    let inputs = batch.inputs(None).with_entropy(Some(&detached));
    match clipped_objective(&bonus, &inputs) {
        Err(Error::InvalidInput { what, reason }) => {
            assert_eq!(what, "entropy");
            assert!(reason.contains("detached"), "{reason}");
        }
        other => panic!("{:?}", other.map(|o| o.metrics)),
    }
    // ... but it is fine for the high-entropy mask, and for a loss computed without gradients.
    clipped_objective(&top, &inputs)?;
    let logp = batch.logp.as_tensor().detach();
    clipped_objective(
        &bonus,
        &ObjectiveInputs {
            logp: &logp,
            ..inputs
        },
    )?;
    // Wrong shape.
    let short = batch.entropy.as_tensor().narrow(1, 0, 3)?;
    match clipped_objective(&top, &batch.inputs(None).with_entropy(Some(&short))) {
        Err(Error::ShapeMismatch {
            what,
            expected,
            got,
        }) => assert_eq!((what, expected, got), ("entropy", vec![3, 4], vec![3, 3])),
        other => panic!("{:?}", other.map(|o| o.metrics)),
    }
    // A NaN or infinite entropy on a completion token, through either control.
    for bad in [f32::NAN, f32::INFINITY] {
        let mut ent = rows(ENT);
        ent[2][1] = bad;
        let b = Batch::from_rows(
            &dev,
            &rows(LOGP),
            &rows(OLD),
            &rows(REF),
            &rows(MASK),
            &ADV,
            &ent,
        )?;
        for cfg in [bonus, top] {
            match clipped_objective(&cfg, &b.inputs(None)) {
                Err(Error::InvalidInput { what, reason }) => {
                    assert_eq!(what, "entropy", "{reason}");
                    assert!(reason.contains("1 completion token"), "{reason}");
                }
                other => panic!("{bad} {cfg:?}: {:?}", other.map(|o| o.metrics)),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Row mask (defect: masked prompts still counted in B)
// ---------------------------------------------------------------------------------------------

/// A batch of 4 rows of unequal lengths; row `drop` is the one the row mask removes.
fn four_rows(dev: &Device) -> Result<Batch> {
    Batch::from_rows(
        dev,
        &[
            vec![-1.0, -1.78, -0.8, -1.4, -0.3],
            vec![-1.1, -0.95, -0.2, 2.0, 2.0],
            vec![-0.5, -0.4, -1.05, -9.0, -9.0],
            vec![-0.2, -2.5, -0.7, -0.6, -1.0],
        ],
        &[
            vec![-1.0, -2.0, -0.5, -1.5, -0.2],
            vec![-0.7, -1.2, -0.1, 4.0, 4.0],
            vec![-2.0, -0.3, -1.1, 9.0, 9.0],
            vec![-0.3, -2.4, -0.9, -0.5, -1.1],
        ],
        &[
            vec![-1.2, -1.5, -0.9, -1.0, -0.4],
            vec![-0.9, -1.0, -0.3, 0.0, 0.0],
            vec![-1.0, -0.2, -1.3, 0.0, 0.0],
            vec![-0.25, -2.6, -0.8, -0.4, -0.9],
        ],
        &[
            vec![1.0, 1.0, 1.0, 1.0, 1.0],
            vec![1.0, 1.0, 1.0, 0.0, 0.0],
            vec![1.0, 1.0, 0.0, 0.0, 0.0],
            vec![1.0, 1.0, 1.0, 1.0, 0.0],
        ],
        &[0.9, -0.6, -1.3, 0.4],
        &[
            vec![0.9, 0.1, 1.6, 0.4, 0.8],
            vec![2.2, 0.7, 0.3, 9.0, 9.0],
            vec![0.3, 1.2, 9.0, 9.0, 9.0],
            vec![1.1, 0.6, 0.2, 1.4, 9.0],
        ],
    )
}

/// Every surrogate × aggregation × ratio level, with and without the entropy controls and KL.
fn row_mask_configs() -> Vec<ObjectiveConfig> {
    let mut out = Vec::new();
    for surrogate in Surrogate::ALL {
        for aggregation in ALL_AGGREGATIONS {
            for ratio_level in RatioLevel::ALL {
                let cfg = ObjectiveConfig {
                    surrogate,
                    aggregation,
                    ratio_level,
                    ..Default::default()
                };
                out.push(cfg);
                out.push(ObjectiveConfig {
                    beta: 0.04,
                    entropy_coef: 0.02,
                    top_entropy_quantile: 0.5,
                    max_completion_len: Some(7),
                    ..cfg
                });
            }
        }
    }
    out
}

#[test]
fn a_masked_row_is_the_batch_without_that_row() -> Result<()> {
    // Regression test for `mask_zero_std_prompts` under grpo/dr_grpo: a row the row mask drops
    // leaves B as well as N, so loss, metrics and the other rows' gradients are those of the
    // batch without it, for every aggregation; the dropped row gets no gradient.
    for dev in devices() {
        let full = four_rows(&dev)?;
        for drop in 0..4 {
            let kept: Vec<usize> = (0..4).filter(|&i| i != drop).collect();
            let sub = Batch::from_rows(
                &dev,
                &select(&full.logp, &kept)?,
                &select(&full.old, &kept)?,
                &select(&full.reference, &kept)?,
                &select(&full.mask, &kept)?,
                &kept
                    .iter()
                    .map(|&i| full.adv.to_vec1::<f32>().map(|a| a[i]))
                    .collect::<candle_core::Result<Vec<_>>>()?,
                &select(&full.entropy, &kept)?,
            )?;
            let keep: Vec<bool> = (0..4).map(|i| i != drop).collect();
            for cfg in row_mask_configs() {
                let what = format!("drop row {drop}, {cfg:?}");
                let a = full.run(&cfg, Some(&keep))?;
                let b = sub.run(&cfg, None)?;
                assert_close(loss_of(&a.out), loss_of(&b.out), 1e-6, &what);
                for ((x, y), name) in metrics_array(&a.out)
                    .into_iter()
                    .zip(metrics_array(&b.out))
                    .zip(METRIC_NAMES)
                {
                    assert_close(x, y, 1e-6, &format!("{what}: {name}"));
                }
                let pick = |g: &[Vec<f32>]| kept.iter().map(|&i| g[i].clone()).collect::<Vec<_>>();
                assert_rows_close(&pick(&a.grad_logp), &b.grad_logp, 1e-6, &what);
                assert_rows_close(&pick(&a.grad_entropy), &b.grad_entropy, 1e-6, &what);
                assert!(a.grad_logp[drop].iter().all(|&g| g == 0.0), "{what}");
                assert!(a.grad_entropy[drop].iter().all(|&g| g == 0.0), "{what}");
            }
        }
    }
    Ok(())
}

#[test]
fn zeroing_a_mask_row_is_not_dropping_it_under_grpo_and_dr_grpo() -> Result<()> {
    // The old way to mask a prompt (multiply its mask rows by 0) keeps the row in B: the loss of
    // grpo and dr_grpo is scaled by B_kept / B; bnpo, which divides by N, is unaffected. This is
    // the defect the row mask fixes (see a_masked_row_is_the_batch_without_that_row).
    for dev in devices() {
        let full = four_rows(&dev)?;
        let keep = [true, false, true, true];
        let zeroed_rows = Tensor::new(&[[1.0f32], [0.0], [1.0], [1.0]], &dev)?;
        let zeroed = full.mask.broadcast_mul(&zeroed_rows)?;
        for aggregation in ALL_AGGREGATIONS {
            let cfg = config(Surrogate::Clip, aggregation);
            let dropped = full.run(&cfg, Some(&keep))?;
            let inputs = ObjectiveInputs {
                mask: &zeroed,
                ..full.inputs(None)
            };
            let old_way = run_inputs(&cfg, &inputs, &full.logp, &full.entropy)?;
            let (a, b) = (loss_of(&dropped.out), loss_of(&old_way.out));
            match aggregation {
                LossAggregation::Bnpo => assert_close(a, b, 1e-7, "bnpo"),
                _ => assert_close(b, a * 3.0 / 4.0, 1e-6, &format!("{aggregation:?}")),
            }
        }
    }
    Ok(())
}

fn select(t: &Tensor, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
    let all = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows.iter().map(|&i| all[i].clone()).collect())
}

#[test]
fn an_all_true_row_mask_is_bit_identical_to_none() -> Result<()> {
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        for cfg in row_mask_configs() {
            let a = batch.run(&cfg, None)?;
            let b = batch.run(&cfg, Some(&[true; 3]))?;
            assert_eq!(loss_of(&a.out), loss_of(&b.out), "{cfg:?}");
            assert_eq!(a.out.metrics, b.out.metrics, "{cfg:?}");
            assert_eq!(a.grad_logp, b.grad_logp, "{cfg:?}");
        }
    }
    Ok(())
}

#[test]
fn row_mask_errors() -> Result<()> {
    let batch = Batch::golden(&Device::Cpu)?;
    let cfg = ObjectiveConfig::default();
    match clipped_objective(&cfg, &batch.inputs(Some(&[true, false]))) {
        Err(Error::ShapeMismatch {
            what,
            expected,
            got,
        }) => assert_eq!((what, expected, got), ("row_mask", vec![3], vec![2])),
        other => panic!("{:?}", other.map(|o| o.metrics)),
    }
    // Every row dropped: nothing to learn from, as with an all-zero mask.
    let r = clipped_objective(&cfg, &batch.inputs(Some(&[false; 3])));
    assert!(
        matches!(r, Err(Error::Empty("mask"))),
        "{:?}",
        r.map(|o| o.metrics)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mask values (defect: negative weights were accepted)
// ---------------------------------------------------------------------------------------------

#[test]
fn negative_or_non_finite_mask_entries_are_invalid_input() -> Result<()> {
    // Regression test: a negative mask entry used to flow into the loss as a negative token
    // weight (and NaN into a NaN loss). Now it is Error::InvalidInput naming the mask, for every
    // surrogate, also in a row the row mask drops.
    for dev in devices() {
        let batch = Batch::golden(&dev)?;
        for (bad, count) in [
            (-1.0f32, 1.0),
            (-1e-7, 1.0),
            (f32::NAN, 1.0),
            (f32::INFINITY, 1.0),
        ] {
            let mut mask = rows(MASK);
            mask[1][0] = bad;
            let mask = Tensor::from_vec(mask.concat(), (3, 4), &dev)?;
            for surrogate in Surrogate::ALL {
                for keep in [None, Some(&[true, false, true][..])] {
                    let inputs = ObjectiveInputs {
                        mask: &mask,
                        ..batch.inputs(keep)
                    };
                    let cfg = config(surrogate, LossAggregation::Grpo);
                    match clipped_objective(&cfg, &inputs) {
                        Err(Error::InvalidInput { what, reason }) => {
                            assert_eq!(what, "mask");
                            assert!(reason.starts_with(&format!("{count} entries")), "{reason}");
                        }
                        other => panic!("{bad} {surrogate:?}: {:?}", other.map(|o| o.metrics)),
                    }
                }
            }
        }
        // Non-negative weights are still token weights: 0.5 on a token halves its share.
        let mut mask = rows(MASK);
        mask[0][3] = 0.5;
        let mask = Tensor::from_vec(mask.concat(), (3, 4), &dev)?;
        let inputs = ObjectiveInputs {
            mask: &mask,
            ..batch.inputs(None)
        };
        let out = clipped_objective(&ObjectiveConfig::default(), &inputs)?;
        assert_eq!(out.metrics.num_tokens, 8.5);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dr. GRPO's constant
// ---------------------------------------------------------------------------------------------

#[test]
fn dr_grpo_without_max_completion_len_divides_by_the_padded_width() -> Result<()> {
    // The same completions padded to T = 4 or T = 6: with max_completion_len unset the
    // normaliser is B·T and the loss moves with the padding; with it set (the generation
    // budget, which a trainer should take from its policy) it does not.
    for dev in devices() {
        let narrow = Batch::golden(&dev)?;
        let widen = |a: [[f32; 4]; 3], pad: f32| -> Vec<Vec<f32>> {
            a.iter()
                .map(|r| r.iter().copied().chain([pad, pad]).collect())
                .collect()
        };
        let wide = Batch::from_rows(
            &dev,
            &widen(LOGP, -3.0),
            &widen(OLD, 5.0),
            &widen(REF, 0.0),
            &widen(MASK, 0.0),
            &ADV,
            &widen(ENT, 0.0),
        )?;
        let unset = config(Surrogate::Clip, LossAggregation::DrGrpo);
        let (a, b) = (narrow.run(&unset, None)?, wide.run(&unset, None)?);
        assert_close(loss_of(&b.out), loss_of(&a.out) * 4.0 / 6.0, 1e-6, "B·T");
        let budget = ObjectiveConfig {
            max_completion_len: Some(8),
            ..unset
        };
        let (a, b) = (narrow.run(&budget, None)?, wide.run(&budget, None)?);
        assert_close(loss_of(&a.out), loss_of(&b.out), 1e-7, "B·L");
    }
    Ok(())
}
