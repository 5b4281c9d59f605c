//! `pgrpo::optim::AdamW`: the numbers of `candle_nn::AdamW`, and state that round-trips.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use pgrpo::optim::{AdamW, OptimizerSnapshot, OptimizerState, ParamsAdamW};
use pgrpo::Error;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random_vars(seed: u64, dtype: DType) -> Vec<Var> {
    let mut rng = StdRng::seed_from_u64(seed);
    [vec![3usize, 5], vec![7], vec![2, 3, 4]]
        .into_iter()
        .map(|shape| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let t = Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect()
}

fn copy_vars(vars: &[Var]) -> Vec<Var> {
    vars.iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
        .collect()
}

/// A loss whose gradient changes with the parameters and differs per coordinate:
/// `Σ_v Σ (c_v ⊙ w_v + w_v³ / 3)`; var `skip` (if any) is left out (no gradient).
fn loss(vars: &[Var], step: usize, skip: Option<usize>) -> Tensor {
    let mut total: Option<Tensor> = None;
    for (i, v) in vars.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let w = v.as_tensor();
        let n = w.elem_count();
        let c: Vec<f32> = (0..n)
            .map(|j| ((j * 7 + i * 3 + step) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let c = Tensor::from_vec(c, w.shape(), w.device())
            .unwrap()
            .to_dtype(w.dtype())
            .unwrap();
        let term = ((w * &c).unwrap() + ((w.sqr().unwrap() * w).unwrap() / 3.0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        total = Some(match total {
            None => term,
            Some(t) => (t + term).unwrap(),
        });
    }
    total.unwrap()
}

fn values_f64(vars: &[Var]) -> Vec<Vec<f64>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

fn compare_with_candle(dtype: DType, tol: f64) {
    let ours_vars = random_vars(1, dtype);
    let theirs_vars = copy_vars(&ours_vars);
    let mut ours = AdamW::new(ours_vars.clone(), params()).unwrap();
    let mut theirs = candle_nn::AdamW::new(theirs_vars.clone(), params()).unwrap();
    for step in 0..40 {
        // A schedule, and a var without gradient now and then.
        let lr = 0.05 * (1.0 + (step as f64 * 0.3).sin()) / 2.0 + 1e-3;
        ours.set_learning_rate(lr);
        theirs.set_learning_rate(lr);
        let skip = (step % 5 == 3).then_some(step % 3);
        ours.step(&loss(&ours_vars, step, skip).backward().unwrap())
            .unwrap();
        theirs
            .step(&loss(&theirs_vars, step, skip).backward().unwrap())
            .unwrap();
        let d = max_abs_diff(&values_f64(&ours_vars), &values_f64(&theirs_vars));
        assert!(d <= tol, "{dtype:?} step {step}: max |Δθ| = {d}");
    }
    let moved = max_abs_diff(&values_f64(&ours_vars), &values_f64(&random_vars(1, dtype)));
    assert!(moved > 0.1, "the parameters barely moved ({moved})");
}

#[test]
fn adamw_matches_candle_f32_in_place_path() {
    // Same f32 operations in the same order: identical, well within 1e-6.
    compare_with_candle(DType::F32, 1e-6);
}

#[test]
fn adamw_matches_candle_f64_and_bf16() {
    compare_with_candle(DType::F64, 1e-12);
    // bf16 takes the tensor path (candle's own formula).
    compare_with_candle(DType::BF16, 0.0);
}

#[test]
fn adamw_state_round_trips_exactly() {
    let vars_a = random_vars(2, DType::F32);
    let mut a = AdamW::new(vars_a.clone(), params()).unwrap();
    for step in 0..7 {
        a.step(&loss(&vars_a, step, None).backward().unwrap())
            .unwrap();
    }
    // A second optimizer over copies of the variables, restored from a's state.
    let vars_b = copy_vars(&vars_a);
    let mut b = AdamW::new(vars_b.clone(), params()).unwrap();
    let snap = a.export_state().unwrap().unwrap();
    assert_eq!(snap.step, 7);
    assert_eq!(snap.tensors.len(), 6);
    b.import_state(&snap).unwrap();
    assert_eq!(b.steps(), 7);
    for step in 7..15 {
        a.step(&loss(&vars_a, step, None).backward().unwrap())
            .unwrap();
        b.step(&loss(&vars_b, step, None).backward().unwrap())
            .unwrap();
    }
    let bits = |vars: &[Var]| -> Vec<Vec<u32>> {
        vars.iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    assert_eq!(bits(&vars_a), bits(&vars_b));
}

#[test]
fn adamw_rejects_a_state_that_does_not_fit_and_stays_unchanged() {
    let vars = random_vars(3, DType::F32);
    let mut opt = AdamW::new(vars.clone(), params()).unwrap();
    opt.step(&loss(&vars, 0, None).backward().unwrap()).unwrap();
    let before = opt.state().unwrap();
    let mut snap = opt.export_state().unwrap().unwrap();
    // Wrong shape for var 1's second moment.
    snap.tensors[3].1 = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
    snap.step = 99;
    let err = opt.import_state(&snap).unwrap_err();
    assert!(
        matches!(&err, Error::OptimizerState(m) if m.contains("var 1")),
        "{err}"
    );
    let after = opt.state().unwrap();
    assert_eq!(
        after.step, before.step,
        "step count changed on a failed import"
    );
    for ((m0, v0), (m1, v1)) in before.moments.iter().zip(&after.moments) {
        assert_eq!(
            m0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            v0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    // Another optimizer's state, and a count mismatch.
    let err = opt
        .import_state(&OptimizerSnapshot::stateless("candle_nn.sgd"))
        .unwrap_err();
    assert!(matches!(err, Error::OptimizerState(_)), "{err}");
    let mut short = opt.export_state().unwrap().unwrap();
    short.tensors.pop();
    assert!(matches!(
        opt.import_state(&short),
        Err(Error::OptimizerState(_))
    ));
}

#[test]
fn optimizers_without_exportable_state_say_so() {
    let vars = random_vars(4, DType::F32);
    let candle_adamw = candle_nn::AdamW::new(vars.clone(), params()).unwrap();
    assert!(candle_adamw.export_state().unwrap().is_none());
    let mut sgd = candle_nn::SGD::new(vars, 0.1).unwrap();
    let snap = sgd.export_state().unwrap().unwrap();
    assert!(snap.tensors.is_empty());
    sgd.import_state(&snap).unwrap();
}
