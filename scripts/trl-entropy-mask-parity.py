"""Checks pgrpo's high-entropy mask against TRL's own `GRPOTrainer.get_high_entropy_mask`.

Run: /work/venv-trl/bin/python scripts/trl-entropy-mask-parity.py   (needs trl and torch)

TRL's method is called on the golden batch of tests/golden/surrogates_golden.py with a stand-in
for its accelerator (one process: padding and gathering are the identity). The expected masks
are the `keep` masks of that script, which the Rust tests check (`clip_top50`,
`clip_top20_bonus_dapo`, and top_entropy_quantile = 0 in
`top_entropy_quantile_keeps_the_kl_term_and_every_denominator`). The rho = 0.5 case puts the
threshold exactly on a token's entropy (0.7), which TRL keeps (`>=`), as pgrpo does.
"""

import types

import torch
from trl.trainer.grpo_trainer import GRPOTrainer

ENT = torch.tensor([[0.9, 0.1, 1.6, 0.4],
                    [2.2, 0.7, 50.0, -3.0],
                    [0.3, 1.2, 0.05, 99.0]])
MASK = torch.tensor([[1, 1, 1, 1],
                     [1, 1, 0, 0],
                     [1, 1, 1, 0]])
EXPECTED = {
    0.5: [[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0]],
    0.2: [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
    0.0: [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
}

one_process = types.SimpleNamespace(pad_across_processes=lambda t, dim, pad_index: t,
                                    gather=lambda t: t)
trainer = types.SimpleNamespace(accelerator=one_process)
for rho, want in EXPECTED.items():
    got = GRPOTrainer.get_high_entropy_mask(trainer, ENT, MASK, 1 - rho).int().tolist()
    assert got == want, (rho, got, want)
    print(f"top_entropy_quantile = {rho}: TRL keeps {got}, as pgrpo")
