//! GRPO vs P-GRPO on the paper's synthetic persona task, at laptop scale.
//!
//! ```text
//! cargo run --release --example personas                      # small model from scratch
//! cargo run --release --example personas -- --help            # every knob
//! cargo run --release --example personas -- \
//!     --model models/SmolLM2-135M-Instruct.Q4_1.gguf           # the real model (slow on CPU)
//! ```
//!
//! # The task
//!
//! Seven personas ask for music recommendations, with long-tailed frequencies. Each has a
//! writing style and a music genre it likes:
//!
//! | persona | share | style | genre |
//! |---|---|---|---|
//! | ava  | 40% | casual       | rock       |
//! | ben  | 20% | formal       | classical  |
//! | cleo | 12% | enthusiastic | pop        |
//! | dev  | 10% | technical    | electronic |
//! | eli  |  8% | poetic       | jazz       |
//! | fay  |  6% | terse        | folk       |
//! | gus  |  4% | humorous     | hiphop     |
//!
//! # The reward (computed from the decoded completion)
//!
//! The text is lower-cased, `hip-hop` / `hip hop` become `hiphop`, words are maximal runs of
//! letters and digits. `R = 0.5 · genre + 0.5 · style`, both parts in `[0, 1]`:
//!
//! - **genre** = `1 / #distinct genres named` if the persona's genre is named, else 0. The
//!   recognised genres are the seven above plus metal, blues, country and reggae, so naming
//!   every genre earns little: the reward is the precision of the recommendation.
//! - **style**, per persona:
//!   - casual: `min(#distinct of {hey, yeah, cool, gonna, dude}, 2) / 2`;
//!   - formal: `min(#distinct of {certainly, indeed, kindly, regards, sincerely}, 2) / 2`, but 0
//!     if the text contains `!`;
//!   - enthusiastic: `min(#'!', 3) / 3`;
//!   - technical: the same marker rule with {tempo, bpm, chord, harmonic, timbre};
//!   - poetic: with {moon, dream, whisper, soul, starlight};
//!   - terse: `clamp((10 − #words) / 7, 0, 1)` (1 at ≤ 3 words, 0 at ≥ 10);
//!   - humorous: with {haha, lol, joke, funny, silly}.
//!
//! So `"hey yeah , rock"` scores 1 for ava and 0 for everyone else, and the styles conflict
//! (formal forbids the `!` that enthusiastic wants; terse forbids the words the others want).
//!
//! # What the policy conditions on
//!
//! Every prompt is a one-turn ChatML request. With `--hint name` (default) the user message is
//! `"I am Ava. Recommend some music for me."`: the persona's name is the only thing in the
//! prompt that tells personas apart, and it is opaque (nothing in the name says "rock"), so
//! the policy must learn each persona's taste from rewards alone. With `--model` the request
//! also lists the genres (`" Rock, pop, jazz, classical, folk, hiphop or electronic?"`,
//! `--list-genres`): SmolLM2-135M rarely names a genre otherwise, and a reward that is always
//! 0 teaches nothing. With `--hint none` every persona sends the same request without
//! `"I am Ava."`: the policy sees identical prompts, so the
//! best it can do is one compromise answer for everybody (the frequency-weighted optimum),
//! and P-GRPO can only change how rewards are normalised, not what can be learned. Either
//! way the preference-group label of P-GRPO is the persona, given to the trainer (never to the
//! model), and the reward function knows the true persona.
//!
//! # The runs
//!
//! Each estimator (default `grpo`, `p_grpo`, and `p_grpo_shuffled`, the paper's ablation:
//! P-GRPO with group labels drawn at random with the same frequencies, independent of the
//! true persona) is trained from the same initial model, on the same stream of personas and
//! with the same sampling seeds for a given seed. Every `--eval-every` steps each persona's
//! prompt gets `--eval-samples` held-out completions (a fixed sampling seed per seed) and the
//! mean reward per persona is recorded. The tables give before / after (mean ± 95%
//! t-interval over seeds), then the paired P-GRPO − GRPO difference per persona; the curves
//! (held-out and training-batch rewards) go to the CSV.
//!
//! Default model: a Llama built from scratch (seeded init, width 64, 2 blocks, 4 heads, 2 KV
//! heads, tied embeddings, 0.08M parameters) with a word-level tokenizer made with the
//! `tokenizers` crate whose 95-token vocabulary holds the prompt words, the genres, the style
//! markers and neutral filler; 400 steps of 8 prompts × G = 4, AdamW lr 1e-3, up to 8 new
//! tokens, 8 seeds. With `--model PATH` (a `.gguf` file or an HF directory) the checkpoint's
//! own tokenizer and the ChatML template are used, with temperature 0.7 and top-p 0.9; on
//! CPU a SmolLM2-135M step takes tens of seconds, so the defaults shrink to 8 steps of
//! 2 prompts × G = 4, 32 new tokens, lr 1e-5, one seed.
//!
//! Runs are independent and spread over `--threads` worker threads; with more than one
//! worker the example sets `RAYON_NUM_THREADS=1` and `CANDLE_NUM_THREADS=1` (unless already
//! set), which is faster for small models than two runs fighting over candle's thread pool.
//! On a busy machine `CANDLE_NUM_THREADS=1` also helps a single SmolLM2 run (see below).
//!
//! # What the default run found (2 shared cores, load average 4–5)
//!
//! Held-out reward after 400 steps, mean ± 95% CI over 8 seeds (before training: 0.13 macro):
//!
//! ```text
//! persona                     before            grpo          p_grpo p_grpo_shuffled
//! ava (40%)            0.102 ± 0.040   0.920 ± 0.045   0.921 ± 0.023   0.904 ± 0.027
//! ben (20%)            0.122 ± 0.043   0.693 ± 0.158   0.600 ± 0.180   0.438 ± 0.186
//! cleo (12%)           0.035 ± 0.019   0.177 ± 0.183   0.349 ± 0.126   0.001 ± 0.003
//! dev (10%)            0.105 ± 0.021   0.295 ± 0.107   0.283 ± 0.120   0.047 ± 0.040
//! eli (8%)             0.158 ± 0.045   0.197 ± 0.069   0.240 ± 0.108   0.053 ± 0.026
//! fay (6%)             0.233 ± 0.035   0.259 ± 0.118   0.171 ± 0.022   0.150 ± 0.008
//! gus (4%)             0.135 ± 0.028   0.023 ± 0.025   0.045 ± 0.039   0.016 ± 0.012
//! mean (macro)         0.127 ± 0.015   0.366 ± 0.033   0.373 ± 0.050   0.230 ± 0.028
//! mean (by freq.)      0.112 ± 0.017   0.590 ± 0.030   0.590 ± 0.050   0.468 ± 0.045
//! ```
//!
//! - Every estimator learns the 40% persona first (about 0.6 at step 66, 0.8 at step 150),
//!   and its behaviour ("rock", casual words) spreads to every persona: the minorities'
//!   rewards drop below their start (eli 0.16 → 0.07, gus 0.13 → 0.03 at step 150) before
//!   most of them partly recover. After 400 steps the 20% persona is mostly learned, the
//!   8–12% ones partly, the 4–6% ones not at all (at or below their start with every
//!   estimator). This small policy learns what the majority wants first.
//! - **P-GRPO vs GRPO: no clear difference** (paired macro difference +0.009 ± 0.023 at
//!   step 150, +0.007 ± 0.040 at step 400). At step 150 P-GRPO is behind on the 40% persona
//!   (−0.050 ± 0.045); at step 400 it is ahead on the 12% persona by +0.17 ± 0.21 and behind
//!   on ben and fay by 0.09, none of it significant. The paper's "P-GRPO beats GRPO in every
//!   group" is not what this run shows.
//! - **The ablation holds**: with shuffled group labels P-GRPO is clearly worse
//!   (macro −0.143 ± 0.053 vs true labels; the 8–12% personas collapse to ~0.05), as pooled
//!   normalisation is in the bandit example.
//! - `--hint none` (4 seeds): macro 0.22 and frequency-weighted 0.43 for every estimator
//!   (vs 0.37 and 0.59 with names) — without the name the policy can only learn a
//!   compromise, and the estimators do not differ.
//! - Time per step (one run alone, single-threaded candle, load ~5): 0.034 s (sampling 0.006 s,
//!   update 0.029 s); with candle's default 2 threads under the same load 0.082 s. The
//!   default (24 runs × 400 steps, 2 workers, 0.040 s per step per run) took 3 min 19 s.
//! - SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to f32, `--estimators grpo,p_grpo`, 8
//!   steps of 2 prompts × G = 4, ≤ 32 new tokens, 35-token prompts, `CANDLE_NUM_THREADS=1`,
//!   load 6–7): 21.5 s per step (sampling 7.7 s, update 13.8 s), peak RSS 6.3 GB; with
//!   candle's default threads the update took 31 s at the same load. The held-out reward
//!   (4 samples per persona) rose from 0.014 to 0.07–0.08 for both estimators, mostly by
//!   echoing the genre list of the prompt (1/7 of the genre part for everyone) — not
//!   personalisation. Eight steps are a smoke test, not an experiment.

mod report;
mod task;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Var};
use clap::Parser;
use pgrpo::lm::{Llama, LlamaConfig, LmPolicy, SamplingConfig, TokenIds, Tokenizer};
use pgrpo::{
    Estimator, GroupKey, GroupedPrompt, Policy, RewardFn, TokenLogProbs, Trainer, TrainerConfig,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

use report::RunResult;
use task::{Hint, PERSONAS};

#[derive(Parser, Debug, Clone)]
#[command(about = "GRPO vs P-GRPO on seven personas with their own style and music taste")]
struct Args {
    /// A `.gguf` file or a Hugging Face checkpoint directory (e.g.
    /// models/SmolLM2-135M-Instruct.Q4_1.gguf). Without it: a small Llama built from scratch
    /// with a word-level tokenizer.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training steps per run [default: 400; 8 with --model].
    #[arg(long)]
    steps: Option<usize>,
    /// Seeds per estimator [default: 8; 1 with --model].
    #[arg(long)]
    seeds: Option<u64>,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 4)]
    g: usize,
    /// Prompts per step, personas drawn by frequency [default: 8; 2 with --model].
    #[arg(long)]
    prompts: Option<usize>,
    /// Estimators, comma-separated (grpo, grpo_batch_std, dr_grpo, batch_z_score, rloo,
    /// p_grpo; a `_shuffled` suffix draws the group labels at random).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "grpo,p_grpo,p_grpo_shuffled"
    )]
    estimators: Vec<String>,
    /// AdamW learning rate [default: 1e-3; 1e-5 with --model].
    #[arg(long)]
    lr: Option<f64>,
    /// Maximum new tokens per completion, the stop token included [default: 8; 32 with
    /// --model].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature (training and evaluation) [default: 1.0; 0.7 with --model].
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass [default:
    /// 1.0; 0.9 with --model].
    #[arg(long)]
    top_p: Option<f64>,
    /// What the prompt says about who is asking.
    #[arg(long, value_enum, default_value_t = Hint::Name)]
    hint: Hint,
    /// Append the list of genres to the request [default: false; true with --model].
    #[arg(long)]
    list_genres: Option<bool>,
    /// Held-out completions per persona at each evaluation [default: 16; 4 with --model].
    #[arg(long)]
    eval_samples: Option<usize>,
    /// Evaluate every N steps (and always before the first and after the last) [default:
    /// steps / 8; steps with --model].
    #[arg(long)]
    eval_every: Option<usize>,
    /// KL coefficient β against the initial model (0 skips the reference pass).
    #[arg(long, default_value_t = 0.0)]
    beta: f32,
    /// P-GRPO offset weight λ (1 = the paper).
    #[arg(long, default_value_t = 1.0)]
    offset_weight: f32,
    /// P-GRPO cold start: rewards a group needs before its history is used.
    #[arg(long, default_value_t = 8)]
    min_count: u64,
    /// Width of the from-scratch model.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Decoder blocks of the from-scratch model.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Where to write the curves.
    #[arg(long, default_value = "runs/personas.csv")]
    out: PathBuf,
    /// Worker threads (runs are independent; results do not depend on this) [default: 2;
    /// 1 with --model].
    #[arg(long)]
    threads: Option<usize>,
}

/// The settings after the model-dependent defaults are filled in.
#[derive(Debug, Clone)]
struct Settings {
    steps: usize,
    seeds: u64,
    g: usize,
    prompts: usize,
    lr: f64,
    max_new_tokens: usize,
    temperature: f64,
    top_p: f64,
    hint: Hint,
    list_genres: bool,
    eval_samples: usize,
    eval_every: usize,
    beta: f32,
    offset_weight: f32,
    min_count: u64,
    threads: usize,
    /// Print every step (the real model's steps are slow).
    verbose: bool,
}

impl Settings {
    fn from_args(a: &Args) -> Self {
        let real = a.model.is_some();
        let pick =
            |v: Option<usize>, tiny: usize, big: usize| v.unwrap_or(if real { big } else { tiny });
        let steps = pick(a.steps, 400, 8);
        Self {
            steps,
            seeds: a.seeds.unwrap_or(if real { 1 } else { 8 }),
            g: a.g,
            prompts: pick(a.prompts, 8, 2),
            lr: a.lr.unwrap_or(if real { 1e-5 } else { 1e-3 }),
            max_new_tokens: pick(a.max_new_tokens, 8, 32),
            temperature: a.temperature.unwrap_or(if real { 0.7 } else { 1.0 }),
            top_p: a.top_p.unwrap_or(if real { 0.9 } else { 1.0 }),
            hint: a.hint,
            list_genres: a.list_genres.unwrap_or(real),
            eval_samples: pick(a.eval_samples, 16, 4),
            eval_every: a
                .eval_every
                .unwrap_or(if real { steps } else { (steps / 8).max(1) }),
            beta: a.beta,
            offset_weight: a.offset_weight,
            min_count: a.min_count,
            threads: pick(a.threads, 2, 1),
            verbose: real,
        }
    }

    /// Steps at which the held-out rewards are measured.
    fn eval_steps(&self) -> Vec<usize> {
        let mut s: Vec<usize> = (0..=self.steps).step_by(self.eval_every.max(1)).collect();
        if s.last() != Some(&self.steps) {
            s.push(self.steps);
        }
        s
    }
}

/// One estimator as run by the experiment.
#[derive(Clone, Debug)]
struct Arm {
    name: String,
    estimator: Estimator,
    shuffled: bool,
}

/// Where every run's initial policy comes from.
// One value per process: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Base {
    /// A fresh model per seed (seeded init) with the word-level tokenizer.
    Scratch {
        config: LlamaConfig,
        tokenizer: Tokenizer,
    },
    /// A loaded checkpoint, deep-copied for every run.
    Loaded(LmPolicy),
}

impl Base {
    fn tokenizer(&self) -> pgrpo::Result<&Tokenizer> {
        match self {
            Base::Scratch { tokenizer, .. } => Ok(tokenizer),
            Base::Loaded(p) => p
                .tokenizer()
                .ok_or_else(|| pgrpo::Error::Tokenizer("the checkpoint has no tokenizer".into())),
        }
    }

    fn config(&self) -> &LlamaConfig {
        match self {
            Base::Scratch { config, .. } => config,
            Base::Loaded(p) => p.model().config(),
        }
    }

    /// The initial policy of seed `seed` (the same for every estimator).
    fn policy(&self, seed: u64, s: &Settings) -> pgrpo::Result<LmPolicy> {
        let policy = match self {
            Base::Scratch { config, tokenizer } => {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(6_364_136_223) + 17);
                let model = Llama::new(config.clone(), &mut rng, &Device::Cpu, DType::F32)?;
                LmPolicy::new(model, Some(tokenizer.clone()))
            }
            Base::Loaded(p) => p.snapshot()?,
        };
        policy.with_entropy(false).with_sampling(SamplingConfig {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            ..Default::default()
        })
    }
}

/// A prompt's tokens and the persona who sent it. Only the tokens reach the model; the
/// persona is for the reward function.
#[derive(Debug, Clone, PartialEq)]
struct PersonaPrompt {
    persona: usize,
    tokens: Vec<u32>,
}

/// [`LmPolicy`] over [`PersonaPrompt`]s: strips the persona and forwards the tokens.
struct PersonaPolicy(LmPolicy);

impl Policy for PersonaPolicy {
    type Prompt = PersonaPrompt;
    type Completion = Vec<u32>;

    fn device(&self) -> &Device {
        self.0.device()
    }

    fn sample(
        &self,
        prompts: &[PersonaPrompt],
        n: usize,
        rng: &mut StdRng,
    ) -> pgrpo::Result<Vec<Vec<u32>>> {
        let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
        self.0.sample(&tokens, n, rng)
    }

    fn sample_with_log_probs(
        &self,
        prompts: &[PersonaPrompt],
        n: usize,
        rng: &mut StdRng,
    ) -> pgrpo::Result<(Vec<Vec<u32>>, Option<TokenLogProbs>)> {
        let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
        self.0.sample_with_log_probs(&tokens, n, rng)
    }

    fn is_truncated(&self, completion: &Vec<u32>) -> bool {
        self.0.is_truncated(completion)
    }

    fn max_completion_len(&self) -> Option<usize> {
        self.0.max_completion_len()
    }

    fn log_probs(
        &self,
        prompts: &[&PersonaPrompt],
        completions: &[Vec<u32>],
    ) -> pgrpo::Result<TokenLogProbs> {
        let tokens: Vec<&Vec<u32>> = prompts.iter().map(|p| &p.tokens).collect();
        self.0.log_probs(&tokens, completions)
    }

    fn log_probs_detached(
        &self,
        prompts: &[&PersonaPrompt],
        completions: &[Vec<u32>],
    ) -> pgrpo::Result<TokenLogProbs> {
        let tokens: Vec<&Vec<u32>> = prompts.iter().map(|p| &p.tokens).collect();
        self.0.log_probs_detached(&tokens, completions)
    }

    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }

    fn snapshot(&self) -> pgrpo::Result<Self> {
        Ok(Self(self.0.snapshot()?))
    }
}

/// Decodes a completion and scores it for the prompt's true persona (not its group label,
/// which the ablation shuffles). Keeps `(persona, reward)` of every call for the curves.
struct PersonaReward {
    tokenizer: Tokenizer,
    log: Vec<(usize, f32)>,
}

impl PersonaReward {
    fn text(&self, ids: &[u32]) -> pgrpo::Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| pgrpo::Error::Tokenizer(e.to_string()))
    }
}

impl RewardFn<PersonaPrompt, Vec<u32>> for PersonaReward {
    fn score(
        &mut self,
        prompt: &PersonaPrompt,
        completion: &Vec<u32>,
        _group: &GroupKey,
    ) -> pgrpo::Result<f32> {
        let text = self.text(completion)?;
        let r = task::score(&PERSONAS[prompt.persona], &text).total();
        self.log.push((prompt.persona, r));
        Ok(r)
    }

    fn name(&self) -> &str {
        "persona"
    }
}

/// Draws a persona index by frequency.
fn draw_persona(rng: &mut StdRng) -> usize {
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, p) in PERSONAS.iter().enumerate() {
        acc += p.frequency;
        if u < acc {
            return i;
        }
    }
    PERSONAS.len() - 1
}

/// Mean held-out reward per persona, and one decoded completion per persona.
fn evaluate(
    policy: &LmPolicy,
    reward: &PersonaReward,
    prompts: &[Vec<u32>],
    n: usize,
    seed: u64,
) -> pgrpo::Result<(Vec<f64>, Vec<String>)> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(2_862_933_555_777_941_757) + 101);
    let outs = policy.sample(prompts, n, &mut rng)?;
    let mut means = Vec::with_capacity(PERSONAS.len());
    let mut examples = Vec::with_capacity(PERSONAS.len());
    for (k, persona) in PERSONAS.iter().enumerate() {
        let mut sum = 0.0;
        for (j, ids) in outs[k * n..(k + 1) * n].iter().enumerate() {
            let text = reward.text(ids)?;
            sum += task::score(persona, &text).total() as f64;
            if j == 0 {
                examples.push(text);
            }
        }
        means.push(sum / n as f64);
    }
    Ok((means, examples))
}

fn run(
    base: &Base,
    prompts: &[Vec<u32>],
    s: &Settings,
    arm: &Arm,
    seed: u64,
) -> pgrpo::Result<RunResult> {
    let lm = base.policy(seed, s)?;
    let reward = PersonaReward {
        tokenizer: base.tokenizer()?.clone(),
        log: Vec::new(),
    };
    let eval_reward = PersonaReward {
        tokenizer: reward.tokenizer.clone(),
        log: Vec::new(),
    };
    let mut cfg = TrainerConfig {
        num_generations: s.g,
        learning_rate: s.lr,
        seed,
        ..Default::default()
    };
    cfg.advantage.estimator = arm.estimator;
    cfg.advantage.pgrpo.offset_weight = s.offset_weight;
    cfg.advantage.pgrpo.min_count = s.min_count;
    cfg.objective.beta = s.beta;
    let mut trainer = Trainer::new(PersonaPolicy(lm), reward, cfg)?;
    // The persona stream and the eval samples depend on the seed only, so every estimator
    // sees the same prompts.
    let mut data_rng = StdRng::seed_from_u64(seed.wrapping_mul(104_729) + 3);
    let mut label_rng = StdRng::seed_from_u64(seed.wrapping_mul(15_485_863) + 5);
    let eval_steps = s.eval_steps();
    let mut out = RunResult {
        arm: 0,
        seed,
        evals: Vec::new(),
        train: Vec::new(),
        sample_secs: Vec::new(),
        reward_secs: Vec::new(),
        update_secs: Vec::new(),
        eval_secs: 0.0,
        examples: Vec::new(),
    };
    for step in 0..=s.steps {
        if eval_steps.contains(&step) {
            let t = Instant::now();
            let (means, examples) = evaluate(
                &trainer.policy().0,
                &eval_reward,
                prompts,
                s.eval_samples,
                seed,
            )?;
            out.eval_secs += t.elapsed().as_secs_f64();
            out.evals.push((step, means));
            out.examples = examples;
        }
        if step == s.steps {
            break;
        }
        let personas: Vec<usize> = (0..s.prompts)
            .map(|_| draw_persona(&mut data_rng))
            .collect();
        let batch: Vec<GroupedPrompt<PersonaPrompt>> = personas
            .iter()
            .map(|&k| {
                let label = if arm.shuffled {
                    draw_persona(&mut label_rng)
                } else {
                    k
                };
                GroupedPrompt::new(
                    PersonaPrompt {
                        persona: k,
                        tokens: prompts[k].clone(),
                    },
                    PERSONAS[label].name,
                )
            })
            .collect();
        let m = trainer.step(&batch)?;
        let time = |k: &str| m.timings.get(k).copied().unwrap_or(0.0);
        out.sample_secs.push(time("sample"));
        out.reward_secs.push(time("reward"));
        out.update_secs.push(time("update") + time("old_logp"));
        // Training-batch reward per true persona (the group metrics are per label, which the
        // ablation shuffles).
        let mut sums = vec![(0.0f64, 0usize); PERSONAS.len()];
        for (k, r) in trainer.reward_fn().log.drain(..) {
            sums[k].0 += r as f64;
            sums[k].1 += 1;
        }
        let per_persona: Vec<Option<f64>> = sums
            .iter()
            .map(|&(sum, n)| (n > 0).then(|| sum / n as f64))
            .collect();
        out.train.push((step + 1, per_persona));
        if s.verbose {
            eprintln!(
                "  {} seed {seed} step {}: batch reward {:.3} (sample {:.1}s, update {:.1}s)",
                arm.name,
                step + 1,
                m.reward(),
                time("sample"),
                time("update")
            );
        }
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let s = Settings::from_args(&args);
    if s.threads > 1 {
        for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
            if std::env::var_os(var).is_none() {
                // Set before any candle op or thread exists, so no one reads it concurrently.
                std::env::set_var(var, "1");
            }
        }
    }
    if s.steps == 0 || s.seeds == 0 || s.prompts == 0 || s.eval_samples == 0 {
        return Err("--steps, --seeds, --prompts and --eval-samples must be at least 1".into());
    }
    let arms: Vec<Arm> = args
        .estimators
        .iter()
        .map(|name| -> pgrpo::Result<Arm> {
            let (base, shuffled) = match name.strip_suffix("_shuffled") {
                Some(b) => (b, true),
                None => (name.as_str(), false),
            };
            Ok(Arm {
                name: name.clone(),
                estimator: base.parse()?,
                shuffled,
            })
        })
        .collect::<pgrpo::Result<_>>()?;
    let arm_names: Vec<String> = arms.iter().map(|a| a.name.clone()).collect();

    let t_load = Instant::now();
    let base = match &args.model {
        Some(path) => {
            let p = if path.extension().is_some_and(|e| e == "gguf") {
                LmPolicy::from_gguf(path, &Device::Cpu)?
            } else {
                LmPolicy::from_hf_dir(path, &Device::Cpu)?
            };
            Base::Loaded(p)
        }
        None => {
            let tokenizer = task::word_tokenizer()?;
            let config = LlamaConfig {
                hidden_size: args.hidden,
                intermediate_size: 2 * args.hidden,
                num_hidden_layers: args.layers,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                vocab_size: tokenizer.get_vocab_size(true),
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                max_position_embeddings: 128,
                tie_word_embeddings: true,
                bos_token_id: None,
                eos_token_id: Some(TokenIds::One(2)),
                ..Default::default()
            };
            Base::Scratch { config, tokenizer }
        }
    };
    let load_secs = t_load.elapsed().as_secs_f64();
    let tokenizer = base.tokenizer()?;
    let prompts: Vec<Vec<u32>> = PERSONAS
        .iter()
        .map(|p| {
            let text = task::prompt_text(p, s.hint, s.list_genres);
            tokenizer
                .encode(text.as_str(), false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| pgrpo::Error::Tokenizer(e.to_string()))
        })
        .collect::<pgrpo::Result<_>>()?;

    println!("# GRPO vs P-GRPO on seven personas");
    let cfg = base.config();
    match &args.model {
        Some(p) => println!(
            "model: {} ({:.1}M params, f32, loaded in {load_secs:.1}s), its tokenizer, ChatML",
            p.display(),
            cfg.num_parameters() as f64 / 1e6
        ),
        None => println!(
            "model: from scratch, width {}, {} blocks, vocab {} words ({:.3}M params, f32)",
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.vocab_size,
            cfg.num_parameters() as f64 / 1e6
        ),
    }
    println!(
        "G = {}, {} prompts/step, {} steps, {} seeds, AdamW lr {}, β = {}, temperature {}, \
         top-p {}, max {} new tokens, hint {:?}, genre list {}, offset weight {}, min_count {}",
        s.g,
        s.prompts,
        s.steps,
        s.seeds,
        s.lr,
        s.beta,
        s.temperature,
        s.top_p,
        s.max_new_tokens,
        s.hint,
        s.list_genres,
        s.offset_weight,
        s.min_count
    );
    println!(
        "prompt of ava: {:?} ({} tokens)",
        task::prompt_text(&PERSONAS[0], s.hint, s.list_genres),
        prompts[0].len()
    );
    println!("\nreward R = 0.5·genre + 0.5·style; genre = 1/#genres named if the persona's is named, else 0");
    println!(
        "{:<6} {:>5} {:<12} {:<11} style rule",
        "persona", "share", "style", "genre"
    );
    for p in &PERSONAS {
        println!(
            "{:<6} {:>4.0}% {:<12} {:<11} {}",
            p.name,
            100.0 * p.frequency,
            p.style.name(),
            p.genre,
            p.style.rule()
        );
    }

    let jobs: Vec<(usize, u64)> = (0..s.seeds)
        .flat_map(|seed| (0..arms.len()).map(move |a| (a, seed)))
        .collect();
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<RunResult>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..s.threads.max(1) {
            scope.spawn(|| loop {
                let job = {
                    let mut n = next.lock().expect("job counter");
                    let j = jobs.get(*n).copied();
                    *n += 1;
                    j
                };
                let Some((a, seed)) = job else { break };
                if failure.lock().expect("failure").is_some() {
                    break;
                }
                let t = Instant::now();
                match run(&base, &prompts, &s, &arms[a], seed) {
                    Ok(mut r) => {
                        r.arm = a;
                        eprintln!(
                            "done: {} seed {seed} in {:.1}s",
                            arms[a].name,
                            t.elapsed().as_secs_f64()
                        );
                        results.lock().expect("results").push(r);
                    }
                    Err(e) => {
                        *failure.lock().expect("failure") =
                            Some(format!("{} seed {seed}: {e}", arms[a].name));
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner()? {
        return Err(e.into());
    }
    let mut results = results.into_inner()?;
    results.sort_by_key(|r| (r.arm, r.seed));
    let wall = t0.elapsed().as_secs_f64();
    report::write_csv(&args.out, &results, &arm_names)?;

    let eval_steps = s.eval_steps();
    let mid = *eval_steps
        .iter()
        .min_by_key(|&&x| x.abs_diff(s.steps / 3))
        .unwrap_or(&s.steps);
    println!(
        "\nHeld-out reward per persona ({} samples each), mean ± 95% CI over {} seeds",
        s.eval_samples, s.seeds
    );
    for step in [mid, s.steps] {
        if step == 0 {
            continue;
        }
        println!("\n## after {step} steps");
        report::print_table(&results, &arm_names, step);
    }
    let mut steps = vec![mid, s.steps];
    steps.dedup();
    steps.retain(|&x| x > 0);
    report::print_paired(&results, &arm_names, "p_grpo", "grpo", &steps);
    report::print_paired(&results, &arm_names, "p_grpo_shuffled", "p_grpo", &steps);
    report::print_timings(&results, &arm_names);

    for r in results.iter().filter(|r| r.seed == 0) {
        println!(
            "\n## One held-out completion per persona after training ({}, seed 0)",
            arm_names[r.arm]
        );
        for (p, text) in PERSONAS.iter().zip(&r.examples) {
            println!("{:<6} {text:?}", p.name);
        }
    }
    println!(
        "\n{} runs × {} steps in {wall:.1}s wall on {} worker thread(s); curves: {}",
        results.len(),
        s.steps,
        s.threads,
        args.out.display()
    );
    Ok(())
}
