//! Checkpoints written by an earlier build still load: two small format-version-1
//! checkpoints, written before the checkpoint module moved to candle's safetensors support,
//! are kept under `tests/fixtures/checkpoint-v1/`. Never regenerate them: they stand for
//! checkpoints already on users' disks. (`.gitattributes` keeps git from touching their bytes.)
//!
//! - `tabular/`: step 5 of the tabular bandit run of tests/checkpoint.rs (`full_config`: a
//!   reference policy, AdamW moments, the bandit reward's state, an exponential history);
//! - `dtypes/`: a run whose optimizer exported one state tensor of each dtype a checkpoint
//!   stores, plus a scalar, an empty and a transposed (non-contiguous) tensor.
//!
//! The checks do not depend on the training numerics (which may legitimately change): they
//! load, compare decoded values with the values that were written, resume, and check that a
//! re-save writes the tensor files byte for byte as the old build did.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use pgrpo::checkpoint::files;
use pgrpo::checkpoint::Checkpoint;
use pgrpo::models::TabularPolicy;
use pgrpo::optim::{OptimizerSnapshot, OptimizerState};
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::{GroupKey, GroupedPrompt, HistoryKind, Policy, Trainer};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/checkpoint-v1")
        .join(name)
}

fn policy() -> TabularPolicy {
    // Any initialisation: the checkpoint overwrites it.
    TabularPolicy::new(3, 4, true, &Device::Cpu).unwrap()
}

fn bandit() -> PreferenceBandit {
    PreferenceBandit::new(vec![0.6, 0.3, 0.1], vec![1.0, 0.5, 0.2], 4, 0.5, 0.3).unwrap()
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

fn values(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .into_iter()
        .map(f64::to_bits)
        .collect()
}

#[test]
fn a_version_1_checkpoint_loads_and_resumes() {
    let dir = fixture("tabular");
    let ck = Checkpoint::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(ck.step, 5);
    assert!(ck.is_exact());
    assert_eq!(
        ck.config.history,
        HistoryKind::Exponential { half_life: 16.0 }
    );
    assert_eq!(ck.config.objective.beta, 0.04);
    let shapes = |ts: &[Tensor]| -> Vec<(DType, Vec<usize>)> {
        ts.iter().map(|t| (t.dtype(), t.dims().to_vec())).collect()
    };
    let want = vec![(DType::F32, vec![4]), (DType::F32, vec![3, 4])];
    assert_eq!(shapes(&ck.weights), want);
    assert_eq!(shapes(ck.reference.as_ref().unwrap()), want);
    let opt = ck.optimizer.as_ref().unwrap();
    assert_eq!(opt.kind, "pgrpo.adamw");
    assert_eq!(opt.tensors.len(), 4);
    let groups: Vec<String> = ck.history.iter().map(|(g, _)| g.to_string()).collect();
    assert_eq!(groups, ["g0", "g1", "g2"]);
    assert!(ck.reward_state.is_some());

    // Resume, and save again straight away: the same state gives the same tensor files.
    let mut t = Trainer::resume(&dir, policy(), bandit().reward_fn(0)).unwrap();
    assert_eq!(t.steps_done(), 5);
    let out = tempfile::tempdir().unwrap();
    let again = t.save(out.path()).unwrap();
    for name in [
        files::MODEL,
        files::REFERENCE,
        files::OPTIMIZER_TENSORS,
        files::REWARD_STATE,
    ] {
        assert!(read(&dir, name) == read(&again, name), "{name} differs");
    }
    let back = Checkpoint::load(&again, &Device::Cpu).unwrap();
    assert_eq!(back.history, ck.history);
    assert_eq!(back.config, ck.config);

    // And it trains on.
    let batch: Vec<GroupedPrompt<u32>> = (0..6u32)
        .map(|i| GroupedPrompt::new(i % 3, GroupKey::Name(format!("g{}", i % 3))))
        .collect();
    let m = t.step(&batch).unwrap();
    assert!(m.get("loss").unwrap().is_finite());
    assert_eq!(t.steps_done(), 6);
}

/// The state tensors the `dtypes` fixture was written with (the writer's own list).
fn written() -> Vec<(&'static str, Tensor)> {
    let d = &Device::Cpu;
    let f = [0.1f64, -2.5, 3.0e-30, 65504.0, -0.0, 1.0 / 3.0];
    vec![
        ("a.u8", Tensor::new(&[0u8, 1, 127, 255], d).unwrap()),
        ("b.u32", Tensor::new(&[0u32, 7, u32::MAX], d).unwrap()),
        (
            "c.i16",
            Tensor::new(&[i16::MIN, -1, 0, i16::MAX], d).unwrap(),
        ),
        (
            "d.i32",
            Tensor::new(&[i32::MIN, -5, 9, i32::MAX], d).unwrap(),
        ),
        (
            "e.i64",
            Tensor::new(&[i64::MIN, -3, 0, i64::MAX], d).unwrap(),
        ),
        (
            "f.f16",
            Tensor::new(&f, d).unwrap().to_dtype(DType::F16).unwrap(),
        ),
        (
            "g.bf16",
            Tensor::new(&f, d).unwrap().to_dtype(DType::BF16).unwrap(),
        ),
        (
            "h.f32",
            Tensor::new(&f, d).unwrap().to_dtype(DType::F32).unwrap(),
        ),
        (
            "i.f64",
            Tensor::new(&f, d).unwrap().reshape((2, 3)).unwrap(),
        ),
        ("j.scalar", Tensor::new(1.5f32, d).unwrap()),
        ("k.empty", Tensor::zeros((0, 3), DType::F32, d).unwrap()),
        (
            "l.transposed",
            Tensor::arange(0f32, 6., d)
                .unwrap()
                .reshape((2, 3))
                .unwrap()
                .t()
                .unwrap(),
        ),
    ]
}

/// SGD that hands back, as its own state, whatever state it was given.
struct Echo {
    sgd: candle_nn::SGD,
    state: Option<OptimizerSnapshot>,
}

impl Optimizer for Echo {
    type Config = f64;
    fn new(vars: Vec<Var>, lr: f64) -> candle_core::Result<Self> {
        Ok(Self {
            sgd: candle_nn::SGD::new(vars, lr)?,
            state: None,
        })
    }
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.sgd.step(grads)
    }
    fn learning_rate(&self) -> f64 {
        self.sgd.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.sgd.set_learning_rate(lr)
    }
}

impl OptimizerState for Echo {
    fn export_state(&self) -> pgrpo::Result<Option<OptimizerSnapshot>> {
        Ok(self.state.clone())
    }
    fn import_state(&mut self, snapshot: &OptimizerSnapshot) -> pgrpo::Result<()> {
        self.state = Some(snapshot.clone());
        Ok(())
    }
}

#[test]
fn every_stored_dtype_reads_and_writes_as_in_version_1() {
    let dir = fixture("dtypes");
    let ck = Checkpoint::load(&dir, &Device::Cpu).unwrap();
    let snap = ck.optimizer.as_ref().unwrap();
    assert_eq!((snap.kind.as_str(), snap.step), ("fixture.zoo", 42));
    let want = written();
    assert_eq!(snap.tensors.len(), want.len());
    for ((name, got), (want_name, want)) in snap.tensors.iter().zip(&want) {
        assert_eq!(name, want_name);
        assert_eq!(got.dtype(), want.dtype(), "{name}");
        assert_eq!(got.dims(), want.dims(), "{name}");
        assert_eq!(values(got), values(want), "{name}");
    }

    // Through a trainer and back to disk: the same bytes.
    let p = policy();
    let echo = Echo::new(p.vars(), 0.05).unwrap();
    let t = Trainer::resume_with_optimizer(&dir, p, bandit().reward_fn(0), echo).unwrap();
    let out = tempfile::tempdir().unwrap();
    let again = t.save(out.path()).unwrap();
    for name in [
        files::MODEL,
        files::OPTIMIZER_TENSORS,
        files::OPTIMIZER_META,
    ] {
        assert!(read(&dir, name) == read(&again, name), "{name} differs");
    }
}
