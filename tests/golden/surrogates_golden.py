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
