//! The data-parallel protocol of a training step: what the ranks exchange, and what every
//! rank computes from the exchange. The [`Trainer`](crate::Trainer) says *when* (it is the
//! only place that knows the order of a step); this module says *how*, and
//! [`wire`](super::wire) says in which bytes.
//!
//! | exchange | in | what every rank gets |
//! |---|---|---|
//! | [`exchange_rewards`] | the rollout | the whole batch's rewards in row order, after checking that every rank was given the same batch |
//! | [`exchange_loss_parts`] → [`GlobalNorm`] | every iteration | its loss's weight and the whole batch's objective metrics |
//! | [`gather`] | with_collective, saving | every rank's outcome (or the first failure) |
//! | [`agree`] | saving, [`check_replicas`](crate::Trainer::check_replicas) | whether every rank holds the same state |
//! | [`gather_reward_states`], [`gather_checkpoint_path`] | saving | the reward-function states to save; the path rank 0 wrote |
//!
//! A rank that fails still sends its message, with its error instead of its numbers, so every
//! rank leaves the exchange with an error instead of waiting for it: the failing rank its own
//! error, the others [`Error::Distributed`] naming the first rank that failed.
//!
//! # One process runs the same code
//!
//! The trainer goes through this protocol in every run. With
//! [`SingleProcess`](super::SingleProcess) (or any world of one) each all-gather hands back
//! the rank's own message, and every result is the one process's own, **bit for bit**:
//!
//! - [`exchange_rewards`] returns the rank's rewards: `f32` → 4 little-endian bytes → `f32`
//!   is the identity on bits;
//! - [`GlobalNorm::weight`] is `d / d` where `d` is the one rank's loss denominator (`B`,
//!   `max(N, 1)` or `B · L`, finite and `≥ 1`), which is exactly `1.0`; the trainer's
//!   `loss · 1.0` is an `affine(1, 0)` whose backward hands the loss the gradient
//!   `0 + (1 · 1 + 0) = 1`, the very seed `backward` starts from, so the gradients are the
//!   unscaled loss's;
//! - sums over ranks ([`rank_sum`], [`GlobalNorm::batch_loss`]) start from `−0.0`, the
//!   identity of IEEE addition (`−0.0 + x = x` for every `x`, `−0.0` included, where `0.0 + x`
//!   would turn a `−0.0` into `0.0`), and the token weights are `max(N, 1) / max(N, 1) = 1`:
//!   `−0.0 + 1 · x = x`;
//! - the `f64`s of a loss part travel as their bytes; the reward-function state of a world of
//!   one is saved as that state (the format a single process writes), after a JSON round trip
//!   that gives back the same value (`serde_json`'s `float_roundtrip`).
//!
//! Only [`agree`] looks at the size of the world: a lone rank has no one to compare its
//! fingerprint with, and computing it would cost a pass over the weights for nothing.

use std::path::PathBuf;

use candle_core::DType;
use serde_json::Value;

use super::wire::{self, RankPart};
use super::{shard, Collective};
use crate::objective::ObjectiveMetrics;
use crate::{Error, GroupKey, ObjectiveConfig, ObjectiveOutput, Result, RewardFn, TokenLogProbs};

/// The fingerprint of a batch as the trainer is given it: the step number, the batch's size
/// and its prompts' group labels (not the prompts themselves).
pub(crate) fn batch_fingerprint<'a>(
    step: u64,
    groups: impl ExactSizeIterator<Item = &'a GroupKey>,
) -> u64 {
    let mut h = wire::Fnv64::default();
    h.write(&step.to_le_bytes());
    h.write(&(groups.len() as u64).to_le_bytes());
    for key in groups {
        wire::hash_key(&mut h, key);
    }
    h.finish()
}

/// All-gathers every rank's rewards (or its failure) with the fingerprint of the batch it
/// was given: `local` is this rank's rewards of its shard (`g` rows per prompt of a batch of
/// `prompts`), with what it keeps alongside them (`T`: its completions). Returns `T` and the
/// whole batch's rewards in row order (= rank order), the same on every rank.
///
/// # Errors
/// This rank's own error; [`Error::Distributed`] when another rank failed, was given another
/// batch or is at another step, or sent a malformed message.
pub(crate) fn exchange_rewards<C: Collective + ?Sized, T>(
    comm: &C,
    batch_fp: u64,
    prompts: usize,
    g: usize,
    local: Result<(T, Vec<f32>)>,
) -> Result<(T, Vec<f32>)> {
    let msg = match &local {
        Ok((_, rewards)) => wire::encode_rollout(batch_fp, Ok(rewards)),
        Err(e) => wire::encode_rollout(batch_fp, Err(&e.to_string())),
    };
    let all = comm.all_gather_bytes(&msg)?;
    let (rank, world) = (comm.rank(), comm.world());
    let mut global = Vec::with_capacity(prompts * g);
    let mut failure = None;
    for (r, m) in all.iter().enumerate() {
        let m = wire::decode_rollout(m).ok_or_else(|| wire::bad_message(r, &"rollout"))?;
        if m.batch_fp != batch_fp && failure.is_none() {
            failure = Some(Error::distributed_rank(
                r,
                format!(
                    "rank {r} was given another batch or is at another step than rank {rank} \
                 (every rank must step on the same global batch)"
                ),
            ));
        }
        match m.rewards {
            Ok(rw) => {
                let want = shard(prompts, r, world).len() * g;
                if rw.len() != want {
                    return Err(wire::bad_message(
                        r,
                        &format!("{} rewards for {want} rows", rw.len()),
                    ));
                }
                global.extend(rw);
            }
            Err(msg) if r != rank && failure.is_none() => {
                failure = Some(Error::distributed_rank(
                    r,
                    format!("rank {r} failed during the rollout: {msg}"),
                ));
            }
            Err(_) => {}
        }
    }
    let (keep, _) = local?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((keep, global))
}

/// All-gathers every rank's outcome of `what` (an activity: "computing its loss"): this
/// rank's `local` value, and every rank's message (`body` of its value) in rank order.
///
/// # Errors
/// This rank's own error; else [`Error::Distributed`] naming the first other rank that
/// failed (`rank r failed <what>: <its error>`) or sent a malformed message.
pub(crate) fn gather<C: Collective + ?Sized, T>(
    comm: &C,
    what: &str,
    local: Result<T>,
    body: impl FnOnce(&T) -> Vec<u8>,
) -> Result<(T, Vec<Vec<u8>>)> {
    let mut msg = Vec::new();
    match &local {
        Ok(v) => wire::push_outcome(&mut msg, Ok(&body(v))),
        Err(e) => wire::push_outcome(&mut msg, Err(&e.to_string())),
    }
    let all = comm.all_gather_bytes(&msg)?;
    let rank = comm.rank();
    let mut bodies = Vec::with_capacity(all.len());
    let mut failure = None;
    for (r, m) in all.iter().enumerate() {
        match wire::read_outcome(m).ok_or_else(|| wire::bad_message(r, &what))? {
            Ok(b) => bodies.push(b.to_vec()),
            Err(e) => {
                if r != rank && failure.is_none() {
                    failure = Some(Error::distributed_rank(
                        r,
                        format!("rank {r} failed {what}: {e}"),
                    ));
                }
                bodies.push(Vec::new());
            }
        }
    }
    let local = local?;
    match failure {
        Some(e) => Err(e),
        None => Ok((local, bodies)),
    }
}

/// Fails on every rank unless every rank's `fingerprint` of `what` is the same. The
/// fingerprint is computed only when there is another rank to compare it with.
///
/// # Errors
/// [`Error::Distributed`] naming the ranks that differ from rank 0; errors of `fingerprint`.
pub(crate) fn agree<C: Collective + ?Sized>(
    comm: &C,
    what: &str,
    fingerprint: impl FnOnce() -> Result<u64>,
) -> Result<()> {
    if comm.world() < 2 {
        return Ok(());
    }
    comm.check_same(what, &fingerprint()?.to_le_bytes())
}

/// `Σ x` in the order given (rank order), from `−0.0`: a sum of one value is that value.
pub(crate) fn rank_sum(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().fold(-0.0, |sum, x| sum + x)
}

/// This rank's loss part: its `rows`, its log-probs' width and token sums, and, when it has
/// a loss (`out`), the loss and its metrics.
///
/// # Errors
/// Errors of candle reading the sums and the loss.
pub(crate) fn loss_part(
    rows: usize,
    out: Option<&ObjectiveOutput>,
    lp: &TokenLogProbs,
) -> Result<RankPart> {
    let scalar =
        |t: candle_core::Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let mut part = RankPart {
        rows,
        width: lp.logp.dims().get(1).copied().unwrap_or(0),
        mask_sum: scalar(lp.mask.sum_all()?)?,
        entropy_sum: match &lp.entropy {
            Some(e) => Some(scalar((e * &lp.mask)?.sum_all()?)?),
            None => None,
        },
        ..Default::default()
    };
    if let Some(out) = out {
        part.has_loss = true;
        part.loss = scalar(out.loss.clone())?;
        part.metrics = out.metrics;
    }
    Ok(part)
}

/// All-gathers every rank's loss part (or its failure): this rank's `T` (its objective) and
/// every rank's part, in rank order.
///
/// # Errors
/// As [`gather`].
pub(crate) fn exchange_loss_parts<C: Collective + ?Sized, T>(
    comm: &C,
    local: Result<(T, RankPart)>,
) -> Result<(T, Vec<RankPart>)> {
    let ((keep, _), bodies) = gather(comm, "computing its loss", local, |(_, p)| p.to_bytes())?;
    let parts = bodies
        .iter()
        .enumerate()
        .map(|(r, b)| {
            RankPart::from_bytes(b).ok_or_else(|| wire::bad_message(r, &"loss statistics"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((keep, parts))
}

/// The whole batch's loss normaliser, from every rank's part: the aggregation's
/// [denominator](crate::LossAggregation::denominator) over all rows (`B`, `max(N, 1)` or
/// `B · L`, with `L` the largest width of any rank when `max_completion_len` is unset).
pub(crate) struct GlobalNorm {
    cfg: ObjectiveConfig,
    /// The whole batch's denominator.
    den: f64,
    /// `N`, the whole batch's completion tokens after masking.
    tokens: f64,
}

/// An iteration's loss and metrics over the whole batch.
pub(crate) struct BatchLoss {
    /// The loss the summed gradient is the gradient of.
    pub(crate) loss: f64,
    pub(crate) metrics: ObjectiveMetrics,
}

impl GlobalNorm {
    /// The normaliser of the batch whose parts are `parts`; `None` when no rank has a loss
    /// (no completion token to learn from). Ranks without a loss still count in `B`.
    pub(crate) fn new(cfg: &ObjectiveConfig, parts: &[RankPart]) -> Option<Self> {
        if !parts.iter().any(|p| p.has_loss) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let tokens = rank_sum(parts.iter().map(|p| p.metrics.num_tokens));
        let width = parts.iter().map(|p| p.width).max().unwrap_or(0);
        Some(Self {
            cfg: *cfg,
            den: cfg
                .aggregation
                .denominator(rows, tokens, width, cfg.max_completion_len),
            tokens,
        })
    }

    /// The factor that turns a rank's loss (normalised over its rows) into its share of the
    /// whole batch's loss: its denominator over the whole batch's (`B_r / B`,
    /// `max(N_r, 1) / max(N, 1)`, `B_r · L_r / (B · L)`).
    pub(crate) fn weight(&self, p: &RankPart) -> f64 {
        own_denominator(&self.cfg, p) / self.den
    }

    /// The whole batch's denominator (`B`, `max(N, 1)` or `B · L`).
    pub(crate) fn denominator(&self) -> f64 {
        self.den
    }

    /// The whole batch's loss and metrics: the loss and the aggregated `policy_loss` weighted
    /// as the loss, the token means by each rank's share of the tokens; sums in rank order.
    pub(crate) fn batch_loss(&self, parts: &[RankPart]) -> BatchLoss {
        let mut loss = -0.0;
        let mut metrics = ObjectiveMetrics::from_values([-0.0; 6], self.tokens);
        for p in parts.iter().filter(|p| p.has_loss) {
            let w = self.weight(p);
            let t = p.metrics.num_tokens.max(1.0) / self.tokens.max(1.0);
            loss += w * p.loss;
            metrics.add_part(&p.metrics, w, t);
        }
        BatchLoss { loss, metrics }
    }
}

/// What a part's loss was divided by: the aggregation's
/// [denominator](crate::LossAggregation::denominator) of its own rows.
pub(crate) fn own_denominator(cfg: &ObjectiveConfig, p: &RankPart) -> f64 {
    cfg.aggregation.denominator(
        p.rows,
        p.metrics.num_tokens,
        p.width,
        cfg.max_completion_len,
    )
}

/// `Σ mask` and, when some part reports entropy, `Σ entropy · mask` over `parts`.
pub(crate) fn token_sums(parts: &[RankPart]) -> (f64, Option<f64>) {
    (
        rank_sum(parts.iter().map(|p| p.mask_sum)),
        parts
            .iter()
            .any(|p| p.entropy_sum.is_some())
            .then(|| rank_sum(parts.iter().filter_map(|p| p.entropy_sum))),
    )
}

/// One rank's part made of the parts of its micro-batches (gradient accumulation): the
/// micro-batches combine exactly as ranks do ([`GlobalNorm`]), so the merged part is the one
/// a single pass over all of the rank's rows would have sent: `B_r = Σ B_m`, `N_r = Σ N_m`,
/// `T_r = max T_m`, the loss `Σ_m (den_m / den_r) · loss_m` and the metrics pooled the same
/// way. A rank whose micro-batches have no loss sends a part without one (its rows still
/// count).
pub(crate) fn merge_parts(cfg: &ObjectiveConfig, micro: &[RankPart]) -> RankPart {
    let (mask_sum, entropy_sum) = token_sums(micro);
    let mut merged = RankPart {
        rows: micro.iter().map(|p| p.rows).sum(),
        width: micro.iter().map(|p| p.width).max().unwrap_or(0),
        mask_sum,
        entropy_sum,
        ..Default::default()
    };
    if let Some(norm) = GlobalNorm::new(cfg, micro) {
        let b = norm.batch_loss(micro);
        merged.has_loss = true;
        merged.loss = b.loss;
        merged.metrics = b.metrics;
    }
    merged
}

/// Every rank's reward-function state (`local`: this rank's), as the checkpoint saves it: one
/// rank's state as itself, the format of a single process; several as [`RankRewardStates`].
///
/// # Errors
/// As [`gather`], with this rank's error of exporting or serializing its state.
pub(crate) fn gather_reward_states<C: Collective + ?Sized>(
    comm: &C,
    local: Result<Option<Value>>,
) -> Result<Option<Value>> {
    let local = local.and_then(|s| Ok(serde_json::to_vec(&s)?));
    let (_, all) = gather(comm, "saving its reward-function state", local, Vec::clone)?;
    let mut states = all
        .iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice::<Option<Value>>(b).map_err(|e| wire::bad_message(r, &e))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(match states.len() {
        1 => states.pop().flatten(),
        world => Some(RankRewardStates { world, states }.to_value()),
    })
}

/// Tells every rank where rank 0 wrote the checkpoint: `written` is `Some(path)` on the rank
/// that wrote it, `None` on the others.
///
/// # Errors
/// As [`gather`].
pub(crate) fn gather_checkpoint_path<C: Collective + ?Sized>(
    comm: &C,
    written: Result<Option<PathBuf>>,
) -> Result<PathBuf> {
    let (written, all) = gather(comm, "writing the checkpoint", written, |p| {
        p.as_ref()
            .map(|p| p.to_string_lossy().into_owned().into_bytes())
            .unwrap_or_default()
    })?;
    Ok(written.unwrap_or_else(|| PathBuf::from(String::from_utf8_lossy(&all[0]).into_owned())))
}

/// The reward-function states of every rank of a data-parallel run, as saved in a
/// checkpoint's `reward_state.json`:
/// `{"kind": "pgrpo.rank_reward_states", "world": N, "states": [s_0, …, s_{N-1}]}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RankRewardStates {
    world: usize,
    states: Vec<Option<Value>>,
}

const RANK_REWARD_STATES_KIND: &str = "pgrpo.rank_reward_states";

impl RankRewardStates {
    fn to_value(&self) -> Value {
        serde_json::json!({
            "kind": RANK_REWARD_STATES_KIND,
            "world": self.world,
            "states": self.states,
        })
    }

    /// `Some` for a data-parallel run's states, `None` for any other value (one reward
    /// function's own state).
    ///
    /// # Errors
    /// [`Error::Distributed`] for a value of this kind that is malformed.
    pub(crate) fn from_value(v: &Value) -> Result<Option<Self>> {
        if v.get("kind").and_then(|k| k.as_str()) != Some(RANK_REWARD_STATES_KIND) {
            return Ok(None);
        }
        let bad = |what: &str| Error::distributed(format!("per-rank reward states: {what}"));
        let world = v
            .get("world")
            .and_then(|w| w.as_u64())
            .filter(|&w| w >= 1)
            .ok_or_else(|| bad("no `world` >= 1"))? as usize;
        let states = v
            .get("states")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no `states` array"))?;
        if states.len() != world {
            return Err(bad(&format!(
                "{} states for a world of {world}",
                states.len()
            )));
        }
        let states = states
            .iter()
            .map(|s| (!s.is_null()).then(|| s.clone()))
            .collect();
        Ok(Some(Self { world, states }))
    }

    /// Restores rank `rank`'s state into `reward`. Stateless reward functions resume with
    /// any number of ranks; stateful ones need the number that saved them.
    ///
    /// # Errors
    /// [`Error::Distributed`] for stateful reward functions saved by another number of
    /// ranks; errors of the reward function's [`restore`](RewardFn::restore).
    pub(crate) fn restore_rank<Q, A, R: RewardFn<Q, A>>(
        self,
        reward: &mut R,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        if self.world != world {
            if self.states.iter().any(Option::is_some) {
                return Err(Error::distributed(format!(
                    "the checkpoint was written by {} ranks whose reward functions have state; \
                     resume it with {} ranks (this run has {world})",
                    self.world, self.world
                )));
            }
            tracing::warn!(
                saved = self.world,
                now = world,
                "resuming a data-parallel checkpoint with another number of ranks: the run \
                 continues, but samples differently from a run with the saved number"
            );
            return Ok(());
        }
        match self.states.into_iter().nth(rank).flatten() {
            Some(state) => reward.restore(state),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::SingleProcess;
    use crate::LossAggregation;

    fn part(rows: usize, tokens: f64, width: usize, loss: f64) -> RankPart {
        RankPart {
            has_loss: true,
            rows,
            width,
            loss,
            metrics: ObjectiveMetrics::from_values([loss, 0.25, -0.0, 0.1, 0.2, 0.3], tokens),
            mask_sum: tokens + 1.0,
            entropy_sum: Some(-0.0),
        }
    }

    /// A world of one: every exchange hands back the rank's own numbers, to the bit.
    #[test]
    fn one_rank_gets_its_own_numbers_back() -> Result<()> {
        let rewards = vec![0.1f32, -0.0, f32::NAN, 3.0];
        let fp = batch_fingerprint(3, [GroupKey::from("a"), GroupKey::from(2u32)].iter());
        let ((), back) = exchange_rewards(&SingleProcess, fp, 2, 2, Ok(((), rewards.clone())))?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&rewards));

        for aggregation in LossAggregation::ALL {
            for max_completion_len in [None, Some(12)] {
                let cfg = ObjectiveConfig {
                    aggregation,
                    max_completion_len,
                    ..Default::default()
                };
                for loss in [0.37, -0.0, -1.5e-9] {
                    let p = part(6, 17.0, 9, loss);
                    let ((), parts) = exchange_loss_parts(&SingleProcess, Ok(((), p.clone())))?;
                    let norm = GlobalNorm::new(&cfg, &parts).unwrap();
                    assert_eq!(norm.weight(&parts[0]).to_bits(), 1f64.to_bits());
                    let b = norm.batch_loss(&parts);
                    assert_eq!(b.loss.to_bits(), loss.to_bits());
                    let got = b.metrics.values().map(f64::to_bits);
                    assert_eq!(got, p.metrics.values().map(f64::to_bits));
                    let (mask_sum, entropy_sum) = token_sums(&parts);
                    assert_eq!(mask_sum, 18.0);
                    assert_eq!(entropy_sum.map(f64::to_bits), Some((-0.0f64).to_bits()));
                }
            }
        }
        // A rank without a loss: nothing to learn from.
        let none = RankPart {
            rows: 4,
            ..Default::default()
        };
        assert!(GlobalNorm::new(&ObjectiveConfig::default(), &[none]).is_none());

        let state = serde_json::json!({"calls": 3, "mean": 0.1 + 0.2});
        assert_eq!(
            gather_reward_states(&SingleProcess, Ok(Some(state.clone())))?,
            Some(state)
        );
        assert_eq!(gather_reward_states(&SingleProcess, Ok(None))?, None);
        let p = PathBuf::from("/runs/a/checkpoint-000000003");
        assert_eq!(
            gather_checkpoint_path(&SingleProcess, Ok(Some(p.clone())))?,
            p
        );
        Ok(())
    }

    /// Two ranks: each rank's loss weight is its denominator over the whole batch's, and the
    /// token means are pooled by tokens.
    #[test]
    fn weights_are_shares_of_the_batch_denominator() {
        let parts = [part(6, 17.0, 9, 0.5), part(3, 3.0, 4, 1.0)];
        let expect = [
            (LossAggregation::Grpo, None, [6.0 / 9.0, 3.0 / 9.0]),
            (LossAggregation::Bnpo, None, [17.0 / 20.0, 3.0 / 20.0]),
            // L = the largest width, 9; each rank normalised over its own width.
            (LossAggregation::DrGrpo, None, [54.0 / 81.0, 12.0 / 81.0]),
            (
                LossAggregation::DrGrpo,
                Some(10),
                [60.0 / 90.0, 30.0 / 90.0],
            ),
        ];
        for (aggregation, max_completion_len, w) in expect {
            let cfg = ObjectiveConfig {
                aggregation,
                max_completion_len,
                ..Default::default()
            };
            let norm = GlobalNorm::new(&cfg, &parts).unwrap();
            for (p, w) in parts.iter().zip(w) {
                assert!((norm.weight(p) - w).abs() < 1e-15, "{aggregation:?}");
            }
        }
        let norm = GlobalNorm::new(&ObjectiveConfig::default(), &parts).unwrap();
        let b = norm.batch_loss(&parts);
        assert!((b.loss - (0.5 * 6.0 + 3.0) / 9.0).abs() < 1e-15);
        assert!((b.metrics.kl - 0.25).abs() < 1e-15);
        assert_eq!(b.metrics.num_tokens, 20.0);
        assert_eq!(token_sums(&parts).0, 22.0);
    }

    /// A rank's micro-batches merged into one part count in the batch as the micro-batches
    /// themselves would: the same denominator, loss and metrics (gradient accumulation
    /// composes with data parallelism).
    #[test]
    fn merged_micro_batches_count_as_their_parts() {
        let no_tokens = RankPart {
            rows: 1,
            width: 2,
            ..Default::default()
        };
        let micro = [part(2, 5.0, 4, 0.3), part(3, 9.0, 6, -0.2), no_tokens];
        let other = part(4, 7.0, 5, 0.8);
        for aggregation in LossAggregation::ALL {
            for max_completion_len in [None, Some(8)] {
                let cfg = ObjectiveConfig {
                    aggregation,
                    max_completion_len,
                    ..Default::default()
                };
                let merged = merge_parts(&cfg, &micro);
                assert_eq!((merged.rows, merged.width), (6, 6));
                assert_eq!(merged.metrics.num_tokens, 14.0);
                assert_eq!(merged.mask_sum, 5.0 + 1.0 + 9.0 + 1.0);
                let flat = [
                    micro[0].clone(),
                    micro[1].clone(),
                    micro[2].clone(),
                    other.clone(),
                ];
                let by_micro = GlobalNorm::new(&cfg, &flat).unwrap();
                let by_rank = GlobalNorm::new(&cfg, &[merged, other.clone()]).unwrap();
                assert_eq!(by_micro.denominator(), by_rank.denominator());
                let (a, b) = (
                    by_micro.batch_loss(&flat),
                    by_rank.batch_loss(&[merge_parts(&cfg, &micro), other.clone()]),
                );
                assert!((a.loss - b.loss).abs() < 1e-15, "{aggregation:?}");
                for (x, y) in a.metrics.values().iter().zip(b.metrics.values()) {
                    assert!((x - y).abs() < 1e-15, "{aggregation:?}: {x} vs {y}");
                }
            }
        }
        // Micro-batches without a loss make a part without one.
        let none = merge_parts(&ObjectiveConfig::default(), &[no_tokens_part()]);
        assert!(!none.has_loss && none.rows == 1);
    }

    fn no_tokens_part() -> RankPart {
        RankPart {
            rows: 1,
            width: 3,
            ..Default::default()
        }
    }

    #[test]
    fn a_failing_rank_is_named() {
        struct Two;
        impl Collective for Two {
            fn rank(&self) -> usize {
                0
            }
            fn world(&self) -> usize {
                2
            }
            fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
                Ok(())
            }
            fn broadcast_bytes(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
                Ok(())
            }
            fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
                let mut other = Vec::new();
                wire::push_outcome(&mut other, Err("the judge timed out"));
                Ok(vec![local.to_vec(), other])
            }
            fn barrier(&self) -> Result<()> {
                Ok(())
            }
        }
        let e = gather(&Two, "computing its loss", Ok(()), |_| Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            Error::distributed("rank 1 failed computing its loss: the judge timed out").to_string()
        );
        // This rank's own error comes first.
        let own = gather(&Two, "x", Err::<(), _>(Error::Empty("mine")), |_| {
            Vec::new()
        });
        assert!(matches!(own, Err(Error::Empty("mine"))));
    }

    #[test]
    fn rank_reward_states_round_trip() -> Result<()> {
        let s = RankRewardStates {
            world: 2,
            states: vec![Some(serde_json::json!({"n": 1})), None],
        };
        assert_eq!(RankRewardStates::from_value(&s.to_value())?, Some(s));
        assert_eq!(
            RankRewardStates::from_value(&serde_json::json!({"n": 1}))?,
            None
        );
        let bad = serde_json::json!({"kind": RANK_REWARD_STATES_KIND, "world": 2, "states": []});
        assert!(RankRewardStates::from_value(&bad).is_err());
        Ok(())
    }
}
