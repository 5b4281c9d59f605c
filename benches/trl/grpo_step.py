"""TRL's side of `cargo bench --bench vs_trl`: whole GRPO steps of TRL's `GRPOTrainer` on CPU.

Run by the bench binary (one child process per measurement); by hand:

    pip install torch transformers trl datasets
    python3 benches/trl/grpo_step.py --model target/vs_trl/smollm2-hf --prompts 2 --g 4

The model directory is the one the bench writes with `LmPolicy::save_hf_dir` (the same f32
weights pgrpo trains). The settings mirror pgrpo's side: plain GRPO (`scale_rewards="group"`,
`loss_type="grpo"`), `beta = 0`, one update per generation (`num_iterations = 1`), sampling at
temperature `--temperature` with top-k and top-p off, at most `--max-new-tokens` new tokens,
AdamW at lr 1e-6, the reward `len(completion) / 100` in characters (the same function on
both sides). The prompts are the chat-formatted `QUESTIONS`, `--prompts` distinct ones per
step. Generation is transformers' `generate` (no vLLM).

Prints one JSON object on the last line: per step the seconds of the whole step, of
generation and scoring (`_generate_and_score_completions`) and of the rest (the update), the
mean completion length in tokens, and the process's peak RSS in MiB.
"""

import argparse
import json
import resource
import sys
import tempfile
import time

# The same list as benches/common/smollm2.rs (pgrpo's side): change both.
QUESTIONS = [
    "Describe your ideal weekend.",
    "What should I cook tonight?",
    "Recommend a book for a long train ride.",
    "How do I start running?",
    "Give me an idea for a birthday present.",
    "What is a good houseplant for a dark room?",
    "How can I sleep better?",
    "Suggest a board game for four people.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(a.threads)
    if a.prompts > len(QUESTIONS):
        sys.exit(f"--prompts must be at most {len(QUESTIONS)}")
    rows = [
        {"prompt": [{"role": "user", "content": QUESTIONS[i % a.prompts]}]}
        for i in range(a.prompts * a.steps)
    ]
    dataset = Dataset.from_list(rows)

    def length_reward(completions, **_):
        return [len(c[0]["content"]) / 100.0 for c in completions]

    out = tempfile.mkdtemp(prefix="pgrpo-vs-trl-")
    cfg = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=a.prompts * a.g,
        num_generations=a.g,
        max_completion_length=a.max_new_tokens,
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        learning_rate=1e-6,
        max_steps=a.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=a.gradient_checkpointing,
        seed=a.seed,
        loss_type="grpo",
        scale_rewards="group",
    )
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=cfg,
        train_dataset=dataset,
        processing_class=tok,
    )

    steps = []
    gen = {"t": 0.0}
    inner = trainer._generate_and_score_completions

    def timed(*args, **kwargs):
        t = time.perf_counter()
        r = inner(*args, **kwargs)
        gen["t"] += time.perf_counter() - t
        return r

    trainer._generate_and_score_completions = timed

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            gen["t"] = 0.0
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.t
            steps.append({"total": total, "sample": gen["t"], "update": total - gen["t"]})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1]["mean_length"] = logs["completions/mean_length"]

    trainer.add_callback(Clock())
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"steps": steps, "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
