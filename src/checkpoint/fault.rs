//! Simulated failures, to test that a save is atomic. **Testing only.**
//!
//! Compiled only with the `fault-injection` cargo feature (off by default) or in this crate's
//! own unit tests; a normal build of the library has neither this module nor any counting on
//! its save path. This repository's integration tests get the feature through a
//! dev-dependency of the crate on itself (see `Cargo.toml`), which cargo applies to test,
//! example and bench builds only.
//!
//! Every file write, rename, directory sync and removal during a save is an *operation*.
//! [`fail_at(n, crash)`](fail_at) makes operation number `n` (0-based) of this thread's next
//! saves fail: a file write writes half its bytes and then reports a full disk
//! (`ErrorKind::StorageFull`). With `crash = true` the save also skips its clean-up, as a
//! process killed at that point would.
//!
//! ```
//! use candle_core::Device;
//! use pgrpo::checkpoint::fault;
//! use pgrpo::{models::TabularPolicy, CheckpointProblem, Error, Trainer, TrainerConfig};
//!
//! let policy = TabularPolicy::new(1, 2, false, &Device::Cpu)?;
//! let reward = |_: &u32, a: &u32, _: &pgrpo::GroupKey| *a as f32;
//! let cfg = TrainerConfig { num_generations: 2, ..Default::default() };
//! let trainer = Trainer::new(policy, reward, cfg)?;
//! let run = tempfile::tempdir()?;
//!
//! fault::fail_at(3, false); // the fourth operation of the save fails
//! let err = trainer.save(run.path()).unwrap_err();
//! assert!(fault::fired());
//! assert!(matches!(err, Error::Checkpoint { problem: CheckpointProblem::Io(_), .. }));
//! fault::clear();
//! trainer.save(run.path())?; // and the next save succeeds
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::cell::Cell;
use std::io;

thread_local! {
    static PLAN: Cell<Option<(u64, bool)>> = const { Cell::new(None) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
    static FIRED: Cell<bool> = const { Cell::new(false) };
}

/// Makes operation `n` of this thread's saves fail, skipping the clean-up if `crash` (see
/// the module docs).
pub fn fail_at(n: u64, crash: bool) {
    PLAN.with(|p| p.set(Some((n, crash))));
    COUNT.with(|c| c.set(0));
    FIRED.with(|f| f.set(false));
}

/// Stops injecting failures.
pub fn clear() {
    PLAN.with(|p| p.set(None));
    FIRED.with(|f| f.set(false));
}

/// Whether an injected failure fired since the last [`fail_at`].
pub fn fired() -> bool {
    FIRED.with(|f| f.get())
}

/// Counts one operation; `Err` if it is the one planned to fail.
pub(super) fn point() -> io::Result<()> {
    let Some((n, _)) = PLAN.with(|p| p.get()) else {
        return Ok(());
    };
    let i = COUNT.with(|c| {
        let i = c.get();
        c.set(i + 1);
        i
    });
    if i == n {
        FIRED.with(|f| f.set(true));
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            "injected failure: no space left on device",
        ));
    }
    Ok(())
}

/// Whether the planned failure fired and is a crash (no clean-up).
pub(super) fn crashed() -> bool {
    fired() && PLAN.with(|p| p.get()).is_some_and(|(_, c)| c)
}
