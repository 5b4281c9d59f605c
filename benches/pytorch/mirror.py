"""PyTorch mirror of pgrpo's benchmarks: the same shapes, weights and inputs (written by
`cargo bench --bench vs_pytorch` as safetensors), timed on the same machine.

Usage (normally run by the bench binary, one process per measurement):
    python3 benches/pytorch/mirror.py step DIR        # forward + backward + clip + AdamW
    python3 benches/pytorch/mirror.py step DIR best   # the same with scaled_dot_product_attention
                                                      # and AdamW(fused=True): the fastest eager form
    python3 benches/pytorch/mirror.py optimizer DIR   # AdamW alone on the model's parameters
    python3 benches/pytorch/mirror.py logprobs DIR    # log-softmax + gather, forward + backward
    python3 benches/pytorch/mirror.py sample DIR      # greedy KV-cache decoding
    python3 benches/pytorch/mirror.py advantage DIR   # P-GRPO advantages + history update

DIR holds `config.json` (shape and run settings) and the tensors; the result is one JSON
line on stdout. Threads: `torch.set_num_threads(config["threads"])`.
Needs only torch (the safetensors reader is below, 20 lines).
"""
import json
import math
import os
import resource
import struct
import sys
import time

import torch

DTYPES = {"F32": torch.float32, "F64": torch.float64, "U32": torch.int64, "I64": torch.int64,
          "U8": torch.uint8}
NP = {"F32": "<f4", "F64": "<f8", "U32": "<u4", "I64": "<i8", "U8": "u1"}


def load_safetensors(path):
    """A minimal safetensors reader (the format: u64 header length, JSON header, raw data)."""
    import numpy as np
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        arr = np.frombuffer(data, dtype=NP[meta["dtype"]], count=(b - a) // np.dtype(NP[meta["dtype"]]).itemsize,
                            offset=8 + n + a).reshape(meta["shape"])
        t = torch.from_numpy(arr.copy())
        out[name] = t.to(DTYPES[meta["dtype"]]) if meta["dtype"] == "U32" else t
    return out


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Llama(torch.nn.Module):
    """A Llama with Hugging Face parameter names (rotate-half RoPE, GQA, SwiGLU, RMSNorm)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
        nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = h // nh
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.embed = torch.nn.Parameter(torch.empty(v, h))
        self.layers = torch.nn.ModuleList()
        for _ in range(c["num_hidden_layers"]):
            m = torch.nn.Module()
            m.ln1 = torch.nn.Parameter(torch.empty(h))
            m.q = torch.nn.Parameter(torch.empty(nh * hd, h))
            m.k = torch.nn.Parameter(torch.empty(nkv * hd, h))
            m.v = torch.nn.Parameter(torch.empty(nkv * hd, h))
            m.o = torch.nn.Parameter(torch.empty(h, nh * hd))
            m.ln2 = torch.nn.Parameter(torch.empty(h))
            m.gate = torch.nn.Parameter(torch.empty(f, h))
            m.up = torch.nn.Parameter(torch.empty(f, h))
            m.down = torch.nn.Parameter(torch.empty(h, f))
            self.layers.append(m)
        self.norm = torch.nn.Parameter(torch.empty(h))
        self.tied = c["tie_word_embeddings"]
        if not self.tied:
            self.head = torch.nn.Parameter(torch.empty(v, h))

    def load(self, w):
        p = "model.layers.{}."
        with torch.no_grad():
            self.embed.copy_(w["model.embed_tokens.weight"])
            for i, m in enumerate(self.layers):
                q = p.format(i)
                for attr, name in [("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"),
                                   ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"),
                                   ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
                                   ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                                   ("down", "mlp.down_proj")]:
                    getattr(m, attr).copy_(w[q + name + ".weight"])
            self.norm.copy_(w["model.norm.weight"])
            if not self.tied:
                self.head.copy_(w["lm_head.weight"])

    def named(self):
        """Parameters in pgrpo's `Llama::named_vars` order."""
        out = [self.embed]
        for m in self.layers:
            out += [m.ln1, m.q, m.k, m.v, m.o, m.ln2, m.gate, m.up, m.down]
        out.append(self.norm)
        if not self.tied:
            out.append(self.head)
        return out

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"]) * w

    def rope_tables(self, start, t):
        half = self.hd // 2
        inv = torch.tensor([self.c["rope_theta"] ** (-(2 * i) / self.hd) for i in range(half)],
                           dtype=torch.float64)
        ang = torch.arange(start, start + t, dtype=torch.float64)[:, None] * inv[None, :]
        return ang.cos().float(), ang.sin().float()

    def rope(self, x, cos, sin):  # x: (B, H, T, D)
        half = self.hd // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, ids, cache=None, sdpa=False):
        b, t = ids.shape
        start = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]
        cos, sin = self.rope_tables(start, t)
        x = self.embed[ids]
        rep = self.nh // self.nkv
        for li, m in enumerate(self.layers):
            h = self.rms(x, m.ln1)
            q = (h @ m.q.t()).view(b, t, self.nh, self.hd).transpose(1, 2)
            k = (h @ m.k.t()).view(b, t, self.nkv, self.hd).transpose(1, 2)
            v = (h @ m.v.t()).view(b, t, self.nkv, self.hd).transpose(1, 2)
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            if cache is not None:
                if cache[li] is not None:
                    k = torch.cat([cache[li][0], k], 2)
                    v = torch.cat([cache[li][1], v], 2)
                cache[li] = (k, v)
            if sdpa and cache is None:
                # PyTorch's fused attention (flash / memory-efficient CPU kernels), with GQA.
                a = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=rep > 1)
            else:
                k = k.repeat_interleave(rep, 1)
                v = v.repeat_interleave(rep, 1)
                tk = k.shape[2]
                s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
                causal = torch.ones(t, tk, dtype=torch.bool).tril(tk - t)
                s = s.masked_fill(~causal, float("-inf"))
                a = torch.softmax(s, -1) @ v
            a = a.transpose(1, 2).reshape(b, t, self.nh * self.hd)
            x = x + a @ m.o.t()
            h = self.rms(x, m.ln2)
            x = x + (torch.nn.functional.silu(h @ m.gate.t()) * (h @ m.up.t())) @ m.down.t()
        x = self.rms(x, self.norm)
        head = self.embed if self.tied else self.head
        return x @ head.t()


def model_from(d, cfg):
    model = Llama(cfg["model"])
    model.load(load_safetensors(f"{d}/weights.safetensors"))
    return model


def step(d, cfg):
    model = model_from(d, cfg)
    batch = load_safetensors(f"{d}/batch.safetensors")
    ids, targets = batch["ids"], batch["targets"]
    params = model.named()
    # "best": PyTorch's fastest eager CPU form (fused attention and fused AdamW).
    best = cfg.get("best", False)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg["weight_decay"], **({"fused": True} if best else {}))
    times, losses, norms, var_norms, phases = [], [], [], [], []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        logits = model(ids, sdpa=best)
        logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -logp.mean()
        t_fwd = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        # Untimed: the exact (f64) global norm, for the cross-check; clip_grad_norm_ sums in
        # f32 and is off by up to ~1e-4 relative at these sizes.
        norm64 = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in params))
        if not norms and os.environ.get("PGRPO_VS_VAR_NORMS"):
            var_norms = [p.grad.double().norm().item() for p in params]
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg["max_norm"])
        opt.step()
        t3 = time.perf_counter()
        times.append(t3 - t2 + (t1 - t0))
        phases.append([t_fwd - t0, t1 - t_fwd, t3 - t2])
        losses.append(loss.item())
        norms.append(norm64)
        del logits, logp, loss
    return {"times": times, "losses": losses, "grad_norms": norms, "var_norms": var_norms,
            "phases": phases,
            "peak_rss_mb": peak_rss_mb()}


def optimizer(d, cfg):
    model = model_from(d, cfg)
    params = model.named()
    for k, p in enumerate(params):
        i = torch.arange(p.numel(), dtype=torch.int64)
        g = (((i * 7919 + k * 104729) % 2001) - 1000).float() * 1e-6  # same formula as Rust
        p.grad = g.view(p.shape)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        flat = torch.cat([p.detach().flatten() for p in params])[::101].contiguous()
    flat.numpy().astype("<f4").tofile(f"{d}/sample-torch.bin")
    return {"times": times, "peak_rss_mb": peak_rss_mb()}


def logprobs(d, cfg):
    n, v = cfg["rows"], cfg["vocab"]
    i = torch.arange(n * v, dtype=torch.int64)
    logits = (((i * 7919) % 4001) - 2000).float().view(n, v) * 2e-3  # same formulas as Rust
    del i
    r = torch.arange(n, dtype=torch.int64)
    targets = (r * 104729) % v
    probe = ((r % 7) - 3).float() * 0.25
    times, values = [], None
    for _ in range(cfg["steps"]):
        x = logits.clone().requires_grad_(True)
        t0 = time.perf_counter()
        logp = torch.log_softmax(x, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (logp * probe).sum().backward()
        times.append(time.perf_counter() - t0)
        values = [logp.double().sum().item(), x.grad.double().pow(2).sum().sqrt().item()]
        del x, logp
    return {"times": times, "check": values, "peak_rss_mb": peak_rss_mb()}


@torch.no_grad()
def sample(d, cfg):
    model = model_from(d, cfg)
    prompts = load_safetensors(f"{d}/prompts.safetensors")["prompts"]
    times, out = [], None
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        cache = [None] * len(model.layers)
        logits = model(prompts, cache)[:, -1]
        toks = []
        for _ in range(cfg["new_tokens"]):
            nxt = logits.argmax(-1)
            toks.append(nxt)
            logits = model(nxt[:, None], cache)[:, -1]
        times.append(time.perf_counter() - t0)
        out = torch.stack(toks, 1)
    return {"times": times, "tokens": out.tolist(), "peak_rss_mb": peak_rss_mb()}


def advantage(d, cfg):
    """P-GRPO in TRL's style: per-prompt statistics from a (P, G) view, per-group history
    statistics gathered by index, the batch folded into the history with scatter-adds and
    Chan's merge."""
    t = load_safetensors(f"{d}/rewards.safetensors")
    r, gid = t["rewards"].double(), t["group_ids"]
    g_count, g_mean, g_m2 = t["hist_count"].double(), t["hist_mean"].double(), t["hist_m2"].double()
    k, G, eps = g_count.numel(), cfg["g"], cfg["eps"]
    times, adv = [], None
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        grouped = r.view(-1, G)
        mean_q = grouped.mean(1)
        std_q = grouped.std(1)
        zero_std = (std_q == 0).float().mean()  # TRL's frac_reward_zero_std
        std_p = (g_m2 / (g_count - 1)).sqrt()
        adv = ((r - g_mean[gid]) / (std_p[gid] + eps)).float()
        # Fold the batch into the history.
        n_b = torch.zeros(k, dtype=torch.float64).index_add_(0, gid, torch.ones_like(r))
        s_b = torch.zeros(k, dtype=torch.float64).index_add_(0, gid, r)
        mean_b = s_b / n_b.clamp(min=1)
        m2_b = torch.zeros(k, dtype=torch.float64).index_add_(0, gid, (r - mean_b[gid]) ** 2)
        n = g_count + n_b
        delta = mean_b - g_mean
        new_mean = g_mean + delta * n_b / n
        new_m2 = g_m2 + m2_b + delta ** 2 * g_count * n_b / n
        times.append(time.perf_counter() - t0)
        _ = (mean_q, zero_std, new_mean, new_m2)
    return {"times": times, "check": [adv[:4].tolist(), adv.double().pow(2).sum().item()],
            "peak_rss_mb": peak_rss_mb()}


def main():
    what, d = sys.argv[1], sys.argv[2]
    with open(f"{d}/config.json") as f:
        cfg = json.load(f)
    cfg["best"] = len(sys.argv) > 3 and sys.argv[3] == "best"
    torch.set_num_threads(cfg.get("threads", 2))
    torch.manual_seed(0)
    res = {"step": step, "optimizer": optimizer, "logprobs": logprobs, "sample": sample,
           "advantage": advantage}[what](d, cfg)
    res["torch"] = torch.__version__
    print(json.dumps(res))


if __name__ == "__main__":
    main()
