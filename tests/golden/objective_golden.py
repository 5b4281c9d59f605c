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
