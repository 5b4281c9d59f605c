//! Data-parallel training: `N` processes (ranks) train one policy, and normalise advantages
//! exactly as one process with all the rollouts would.
//!
//! The communication is a [`Collective`]: [`SingleProcess`] (the default, no dependency),
//! `Mpi` (cargo feature `mpi`: processes on one or several hosts, started by `mpirun` or
//! Slurm's `srun`) and `Nccl` (feature `nccl`: gradients between CUDA GPUs over NCCL, the
//! rest over MPI). A [`Trainer`](crate::Trainer) becomes data-parallel with
//! [`Trainer::with_collective`](crate::Trainer::with_collective); every rank then calls
//! [`Trainer::step`](crate::Trainer::step) with the **same global batch**.
//!
//! # One step on rank `r` of `N`
//!
//! 1. **Shard.** The batch's `P` prompts are cut into `N` contiguous shards ([`shard`]):
//!    rank `r` takes prompts `r·⌊P/N⌋ + min(r, P mod N)` onwards, `⌊P/N⌋` of them plus one
//!    for the first `P mod N` ranks. `P ≥ N` is required.
//! 2. **Sample and score** its shard, `G` completions per prompt, with the generator
//!    [`rank_step_rng`](crate::rng::rank_step_rng)`(seed, step, r)`: a run is reproducible
//!    for a fixed `N` (rank 0 of any `N` draws what a single process would draw for its
//!    prompts).
//! 3. **All-gather the rewards** (4 bytes a row), in rank order, which is the batch's row
//!    order. Every rank now holds the batch's rewards, prompt ids and group labels, and runs
//!    [`AdvantageConfig::compute`](crate::AdvantageConfig::compute) on the whole batch with
//!    the history as it stood before the batch (identical on every rank): every estimator —
//!    per-prompt, batch std, batch z-score, P-GRPO with any cold start or update order —
//!    gives the advantages one process would give, **bit for bit**, and so do the batch's
//!    per-group statistics and diagnostics. The rank keeps its rows' advantages.
//! 4. **Gradients.** Each rank computes the loss of its rows and scales it by
//!    `local normaliser / global normaliser` (`B_r / B` for the `grpo` aggregation,
//!    `max(N_r, 1) / max(N, 1)` tokens for `bnpo`, `B_r·L_r / (B·L)` for `dr_grpo`, where the
//!    global values come from a small all-gather), so that the **sum** over ranks of the
//!    scaled gradients is the gradient of the full-batch loss. The gradients are flattened in
//!    [`Policy::vars`](crate::Policy::vars) order into one `f32` bucket (or a few, see
//!    [`Collective::bucket_elems`]) and all-reduced. Clipping, the optimizer step and the
//!    metrics then see the global gradient on every rank.
//! 5. **History.** Every rank folds the batch's per-group statistics — the rank-ordered
//!    concatenation of all ranks' rows — into its history: the same fold one process makes,
//!    so every rank's history is bit-identical to the single-process one.
//! 6. **Metrics** are global on every rank (rewards, per-group statistics and history from
//!    step 3, objective metrics and clip ratios weighted by each rank's rows or tokens, from
//!    step 4); log them on rank 0. Timings are the rank's own.
//!
//! Checkpoints ([`Trainer::save`](crate::Trainer::save)) are written by rank 0 after every
//! rank has checked that all hold the same weights, history and step; they hold each rank's
//! reward-function state, and resume exactly with the same `N` (every rank resumes from the
//! same directory, then calls `with_collective`).
//!
//! # What is equal to what
//!
//! - Advantages, rewards, per-group statistics, history: bit-identical to one process with
//!   the same rollouts, and across ranks.
//! - Gradients: equal to the full-batch gradient up to `f32` rounding (the sum runs in another
//!   order): about `1e-7` relative in the tests.
//! - Parameters: bit-identical on every rank, as long as the library's all-reduce hands
//!   every rank the same bits (MPI does not promise it; Open MPI did in every test, and
//!   [`Trainer::check_replicas`](crate::Trainer::check_replicas), run by every save,
//!   reports a library that does not).
//!
//! # Errors on one rank
//!
//! A rank whose sampling, reward function or loss fails still takes part in the step's next
//! collective and reports the failure there, so every rank returns an error
//! ([`Error::Distributed`] naming the rank, or the original error on the failing rank)
//! instead of waiting forever. An error outside the step (reading data, a panic) leaves the
//! other ranks waiting: end the program (MPI then stops every rank).

use std::ops::Range;

use candle_core::{backprop::GradStore, Var};

use crate::history::BatchDeltas;
use crate::{Error, GroupKey, Result, RewardHistory};

mod host;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub(crate) mod protocol;
pub(crate) mod wire;

#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
#[cfg(feature = "nccl")]
pub use self::nccl::Nccl;

/// Default size of one gradient bucket, in `f32` elements (2²⁴, 64 MiB): a policy up to 16M
/// parameters is all-reduced in one call.
pub const DEFAULT_BUCKET_ELEMS: usize = 1 << 24;

/// The communication a data-parallel run needs, between `world()` ranks numbered
/// `0..world()`: what the [`Trainer`](crate::Trainer) uses, and no more.
///
/// - **The transport** (required): the rank and world size and four primitives, an `f32`
///   sum, a byte broadcast, a byte all-gather and a barrier.
/// - **Hooks** a transport may override: the gradient all-reduce and the weight broadcast
///   (the NCCL one keeps them on the GPU; the default goes through host memory) and the
///   bucket size they use.
/// - **Built on the primitives**, not meant to be overridden: [`is_root`](Self::is_root) and
///   [`check_same`](Self::check_same), both used by the trainer.
///
/// For loops of your own, free functions build on any `Collective`: [`all_gather_f64`],
/// [`sum_f64`], [`all_gather_deltas`] and [`merge_batch_deltas`].
///
/// Every operation is **collective**: each rank must call it, in the same order, with
/// matching sizes. Every result is the same, bit for bit, on every rank: sums of `f64`
/// statistics are all-gathered and added in rank order on each rank rather than reduced by
/// the library. It is implemented for references too, so several trainers can share one
/// `Mpi` (`with_collective(&mpi)`). What the trainer exchanges through it: the
/// [module docs](self) (and `src/distributed/protocol.rs`).
///
/// ```
/// use pgrpo::distributed::{Collective, SingleProcess};
/// let c = SingleProcess;
/// assert_eq!((c.rank(), c.world()), (0, 1));
/// let mut g = [1.0f32, 2.0];
/// c.all_reduce_sum_f32(&mut g)?; // one rank: unchanged
/// assert_eq!(g, [1.0, 2.0]);
/// # Ok::<(), pgrpo::Error>(())
/// ```
pub trait Collective {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world(&self) -> usize;

    /// Element-wise sum over ranks, in place. Implementations should hand every rank the
    /// same bits (the trainer's replicas stay identical only then; `Mpi` relies on the MPI
    /// library for it, `SingleProcess` trivially does).
    ///
    /// # Errors
    /// [`Error::Distributed`] if the buffer is too long for the transport.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;

    /// Overwrites `buf` on every rank with `root`'s `buf` (the same length everywhere).
    ///
    /// # Errors
    /// [`Error::Distributed`] for a bad root or a buffer too long for the transport.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;

    /// Every rank's `local` message (any length), in rank order.
    ///
    /// # Errors
    /// [`Error::Distributed`] if the messages are too long for the transport.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Waits until every rank has called it.
    ///
    /// # Errors
    /// None from the implementations here (MPI errors abort the job).
    fn barrier(&self) -> Result<()>;

    // Hooks a transport may override.

    /// Largest gradient bucket, in `f32` elements ([`DEFAULT_BUCKET_ELEMS`]). A single
    /// variable larger than this still goes in one bucket of its own.
    fn bucket_elems(&self) -> usize {
        DEFAULT_BUCKET_ELEMS
    }

    /// Sums the gradients of `vars` over ranks, in place in `grads`: the vars are flattened,
    /// in order, into `f32` buckets of up to [`bucket_elems`](Self::bucket_elems) elements,
    /// each all-reduced in one call. A var without a gradient on a rank counts as zeros there;
    /// a var without a gradient on every rank stays without one (as in one process). Scale
    /// the loss beforehand to get a mean (the trainer does).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a gradient whose shape is not its var's; errors of the
    /// transport and of candle.
    fn all_reduce_gradients(&self, vars: &[Var], grads: &mut GradStore) -> Result<()> {
        host::all_reduce_gradients(self, vars, grads)
    }

    /// Sets `vars` on every rank to `root`'s values (exactly: the raw bytes travel). Checks
    /// first that every rank has the same shapes and dtypes.
    ///
    /// # Errors
    /// [`Error::Distributed`] if the ranks' vars differ in shape or dtype; errors of the
    /// transport and of candle.
    fn broadcast_vars(&self, vars: &[Var], root: usize) -> Result<()> {
        host::broadcast_vars(self, vars, root)
    }

    // Built on the primitives; not meant to be overridden.

    /// Whether this is rank 0 (the rank that logs and writes checkpoints).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Fails on every rank unless every rank passed the same `bytes` (compared by a 64-bit
    /// fingerprint). `what` names the thing compared in the error.
    ///
    /// # Errors
    /// [`Error::Distributed`] naming the ranks that differ from rank 0.
    fn check_same(&self, what: &str, bytes: &[u8]) -> Result<()> {
        let fp = wire::fingerprint(bytes);
        let all = self.all_gather_bytes(&fp.to_le_bytes())?;
        let differ: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, m)| m.as_slice() != all[0].as_slice())
            .map(|(r, _)| r)
            .collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(Error::Distributed {
                rank: differ.first().copied(),
                reason: format!("ranks {differ:?} disagree with rank 0 on {what}"),
            })
        }
    }
}

/// One process: rank 0 of 1. Every operation leaves its input as it is. The default
/// [`Collective`] of a [`Trainer`](crate::Trainer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, 1)
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![local.to_vec()])
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn all_reduce_gradients(&self, _vars: &[Var], _grads: &mut GradStore) -> Result<()> {
        Ok(())
    }

    fn broadcast_vars(&self, _vars: &[Var], root: usize) -> Result<()> {
        check_root(root, 1)
    }
}

impl<C: Collective + ?Sized> Collective for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world(&self) -> usize {
        (**self).world()
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum_f32(buf)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        (**self).broadcast_bytes(buf, root)
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        (**self).all_gather_bytes(local)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
    fn bucket_elems(&self) -> usize {
        (**self).bucket_elems()
    }
    fn all_reduce_gradients(&self, vars: &[Var], grads: &mut GradStore) -> Result<()> {
        (**self).all_reduce_gradients(vars, grads)
    }
    fn broadcast_vars(&self, vars: &[Var], root: usize) -> Result<()> {
        (**self).broadcast_vars(vars, root)
    }
}

/// Element-wise sum over ranks of `local` (the same length on every rank), added in rank
/// order on every rank, so the result is bit-identical everywhere and does not depend on
/// the MPI library: for metrics and normalisers. Collective.
///
/// # Errors
/// As [`all_gather_f64`]; [`Error::Distributed`] when the lengths differ between ranks.
pub fn sum_f64<C: Collective + ?Sized>(comm: &C, local: &[f64]) -> Result<Vec<f64>> {
    let all = all_gather_f64(comm, local)?;
    let mut out = vec![0.0; local.len()];
    for (r, v) in all.iter().enumerate() {
        if v.len() != out.len() {
            return Err(Error::distributed_rank(
                r,
                format!("sum of {} values: rank {r} sent {}", out.len(), v.len()),
            ));
        }
        for (o, x) in out.iter_mut().zip(v) {
            *o += x;
        }
    }
    Ok(out)
}

/// All-gathers every rank's batch statistics and folds them into `history` in rank order
/// (Chan et al.'s parallel formula, [`RewardHistory::apply`]), so that every rank ends
/// with the same history, bit for bit. It equals the history of one process that saw all
/// the rows up to rounding (exactly for a window history); the rows of later ranks count
/// as newer for exponential and window histories.
///
/// ```
/// use pgrpo::distributed::{merge_batch_deltas, SingleProcess};
/// use pgrpo::{AdvantageConfig, GroupKey, RewardHistory, RolloutRewards};
/// let keys: Vec<GroupKey> = vec!["a".into()];
/// let batch = RolloutRewards {
///     rewards: &[1.0, 0.0],
///     prompt_ids: &[0, 0],
///     group_ids: &[0, 0],
///     group_keys: &keys,
/// };
/// let mut history = RewardHistory::default();
/// let adv = AdvantageConfig::default().compute(&batch, &history)?;
/// merge_batch_deltas(&SingleProcess, &mut history, &keys, &adv.deltas)?;
/// assert_eq!(history.stats(&"a".into()).unwrap().n, 2);
/// # Ok::<(), pgrpo::Error>(())
/// ```
///
/// # Errors
/// As [`all_gather_deltas`]; [`Error::InvalidHistory`] when a rank's statistics were
/// computed for another history kind (checked for every rank before anything is folded).
pub fn merge_batch_deltas<C: Collective + ?Sized>(
    comm: &C,
    history: &mut RewardHistory,
    keys: &[GroupKey],
    deltas: &BatchDeltas,
) -> Result<()> {
    let all = all_gather_deltas(comm, keys, deltas)?;
    if let Some(r) = all.iter().position(|(_, d)| d.kind() != history.kind()) {
        return Err(Error::invalid_history(format!(
            "rank {r} computed its batch statistics for a {:?} history, this one is {:?}",
            all[r].1.kind(),
            history.kind()
        )));
    }
    for (k, d) in all {
        history.apply(&k, d)?;
    }
    Ok(())
}

/// Every rank's `local` values, in rank order (the lengths may differ). Collective.
///
/// ```
/// use pgrpo::distributed::{all_gather_f64, SingleProcess};
/// assert_eq!(all_gather_f64(&SingleProcess, &[0.1, 2.0])?, vec![vec![0.1, 2.0]]);
/// # Ok::<(), pgrpo::Error>(())
/// ```
///
/// # Errors
/// As [`Collective::all_gather_bytes`]; [`Error::Distributed`] for a message that is not a
/// whole number of `f64`s.
pub fn all_gather_f64<C: Collective + ?Sized>(comm: &C, local: &[f64]) -> Result<Vec<Vec<f64>>> {
    comm.all_gather_bytes(&wire::f64_bytes(local))?
        .iter()
        .enumerate()
        .map(|(r, m)| wire::f64s(m).ok_or_else(|| wire::bad_message(r, &"f64 values")))
        .collect()
}

/// Every rank's batch statistics with their group keys, in rank order: for loops where each
/// rank sees only its own rows (the trainer does not need it: it all-gathers the rewards, see
/// the [module docs](self)). Each message is checked as [`BatchDeltas::from_json`] checks.
/// Collective; [`merge_batch_deltas`] folds the result into a history.
///
/// # Errors
/// [`Error::LengthMismatch`] if `keys` and `deltas` differ in length; [`Error::Distributed`]
/// for a malformed message from a rank.
pub fn all_gather_deltas<C: Collective + ?Sized>(
    comm: &C,
    keys: &[GroupKey],
    deltas: &BatchDeltas,
) -> Result<Vec<(Vec<GroupKey>, BatchDeltas)>> {
    if keys.len() != deltas.len() {
        return Err(Error::LengthMismatch {
            what: "group_keys",
            got: keys.len(),
            against: "batch deltas",
            expected: deltas.len(),
        });
    }
    let msg = wire::encode_deltas(keys, deltas)?;
    comm.all_gather_bytes(&msg)?
        .iter()
        .enumerate()
        .map(|(r, m)| wire::decode_deltas(m).map_err(|e| wire::bad_message(r, &e)))
        .collect()
}

/// The contiguous shard of `len` items that rank `rank` of `world` takes: `⌊len/world⌋`
/// items, one more for the first `len mod world` ranks, in rank order.
///
/// ```
/// use pgrpo::distributed::shard;
/// // 7 prompts over 3 ranks: 3, 2, 2.
/// assert_eq!([shard(7, 0, 3), shard(7, 1, 3), shard(7, 2, 3)], [0..3, 3..5, 5..7]);
/// assert_eq!(shard(4, 0, 1), 0..4);
/// ```
pub fn shard(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// This process's rank among the ranks on its host, as the launcher reports it (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, Slurm's `SLURM_LOCALID`): the
/// GPU a rank should use when each host runs one rank per GPU. `None` without a launcher.
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "MV2_COMM_WORLD_LOCAL_RANK",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

fn check_root(root: usize, world: usize) -> Result<()> {
    if root < world {
        Ok(())
    } else {
        Err(Error::distributed(format!(
            "root rank {root} does not exist (world of {world})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shards_cover_the_batch_in_order() {
        for len in 0..20 {
            for world in 1..6 {
                let mut next = 0;
                for r in 0..world {
                    let s = shard(len, r, world);
                    assert_eq!(s.start, next);
                    assert!(s.len() == len / world || s.len() == len / world + 1);
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn single_process_is_the_identity() -> Result<()> {
        let c = SingleProcess;
        assert!(c.is_root());
        let mut f = vec![1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut f)?;
        assert_eq!(f, [1.5, -2.0]);
        let mut b = vec![1u8, 2, 3];
        c.broadcast_bytes(&mut b, 0)?;
        assert_eq!(b, [1, 2, 3]);
        assert!(c.broadcast_bytes(&mut b, 1).is_err());
        assert_eq!(c.all_gather_bytes(b"xy")?, vec![b"xy".to_vec()]);
        assert_eq!(
            all_gather_f64(&c, &[0.1, f64::MAX])?,
            vec![vec![0.1, f64::MAX]]
        );
        assert_eq!(sum_f64(&c, &[0.1, 0.2])?, vec![0.1, 0.2]);
        c.check_same("anything", b"abc")?;
        c.barrier()?;

        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32, 2.0], &dev)?;
        let loss = (v.as_tensor() * 3.0)?.sum_all()?;
        let mut grads = loss.backward()?;
        c.all_reduce_gradients(std::slice::from_ref(&v), &mut grads)?;
        assert_eq!(
            grads.get(v.as_tensor()).unwrap().to_vec1::<f32>()?,
            [3.0, 3.0]
        );
        c.broadcast_vars(std::slice::from_ref(&v), 0)?;
        assert_eq!(v.as_tensor().to_vec1::<f32>()?, [1.0, 2.0]);
        Ok(())
    }
}
