//! The SmolLM2 setting the whole-step benches share (`vs_trl`, `roofline`, `sampling`): the
//! model file `scripts/fetch-smollm2.sh` writes and the questions their prompts are made of.
//! `benches/trl/grpo_step.py` (TRL's side of `vs_trl`) keeps the same list: change both.

/// SmolLM2-135M-Instruct, as `scripts/fetch-smollm2.sh` fetches it.
pub const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The user questions, chat-formatted into prompts; a setting of `P` prompts takes the first `P`.
pub const QUESTIONS: [&str; 8] = [
    "Describe your ideal weekend.",
    "What should I cook tonight?",
    "Recommend a book for a long train ride.",
    "How do I start running?",
    "Give me an idea for a birthday present.",
    "What is a good houseplant for a dark room?",
    "How can I sleep better?",
    "Suggest a board game for four people.",
];
