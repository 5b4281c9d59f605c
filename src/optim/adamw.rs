//! AdamW with state you can save: [`AdamW`].

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};

use super::state::{OptimizerSnapshot, OptimizerState};
use crate::{Error, Result};

/// Decoupled-weight-decay Adam (Loshchilov & Hutter 2019) with exportable state.
///
/// The same update, to the bit, as [`candle_nn::AdamW`] (same `f32` operations in the same
/// order), with the same [`ParamsAdamW`] config, but:
/// - parameters are updated **in place** in one fused pass per variable (no new tensors per
///   step), split over the cores in chunks (rayon), for contiguous `f32`/`f64` variables on
///   the CPU; other dtypes and devices take the tensor path, which is candle's formula;
/// - its state (first and second moments of every variable, step count) can be exported and
///   restored ([`state`](Self::state), [`load_state`](Self::load_state), and the
///   [`OptimizerState`] trait the [`Trainer`](crate::Trainer)'s checkpoints use).
///
/// For step `t` with gradient `g` and learning rate `lr`:
///
/// ```text
/// m ← β₁ m + (1 − β₁) g          v ← β₂ v + (1 − β₂) g²
/// θ ← θ (1 − lr λ) − lr · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)
/// ```
///
/// Variables without a gradient in a step are left alone (their moments do not decay), as in
/// candle. Non-float variables are ignored.
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_nn::Optimizer;
/// use pgrpo::optim::{AdamW, ParamsAdamW};
///
/// let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
/// let mut opt = AdamW::new(vec![w.clone()], ParamsAdamW { lr: 0.1, ..Default::default() })?;
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.backward_step(&loss)?;
/// // The first Adam step moves every coordinate by lr against its gradient's sign, after
/// // the decay θ(1 − lr·λ) with the default λ = 0.01.
/// let v = w.as_tensor().to_vec1::<f32>()?;
/// assert!((v[0] - 0.899).abs() < 1e-5 && (v[1] + 1.898).abs() < 1e-5);
/// assert_eq!(opt.state()?.step, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    step_t: usize,
    params: ParamsAdamW,
}

#[derive(Debug)]
struct Slot {
    var: Var,
    moments: Moments,
}

/// A variable's moments: plain buffers for the in-place CPU path, tensors otherwise.
#[derive(Debug)]
enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    F64 { m: Vec<f64>, v: Vec<f64> },
    Tensor { m: Tensor, v: Tensor },
}

/// The exportable state of an [`AdamW`]: step count and, per variable (in the order the
/// optimizer was built with), first and second moments shaped like the variable.
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// Optimizer steps taken (the `t` of the bias corrections).
    pub step: u64,
    /// `(m, v)` per variable.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        let n = var.elem_count();
        Ok(match (var.device().is_cpu(), var.dtype()) {
            (true, DType::F32) => Moments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            (true, DType::F64) => Moments::F64 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            _ => Moments::Tensor {
                m: var.zeros_like()?,
                v: var.zeros_like()?,
            },
        })
    }

    fn to_tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        let (shape, dev) = (var.shape(), var.device());
        Ok(match self {
            Moments::F32 { m, v } => (
                Tensor::from_slice(m, shape, dev)?,
                Tensor::from_slice(v, shape, dev)?,
            ),
            Moments::F64 { m, v } => (
                Tensor::from_slice(m, shape, dev)?,
                Tensor::from_slice(v, shape, dev)?,
            ),
            Moments::Tensor { m, v } => (m.copy()?, v.copy()?),
        })
    }

    /// Replaces the moments (tensors shaped like the variable, on its device).
    fn set_from(&mut self, m_new: Tensor, v_new: Tensor) -> Result<()> {
        match self {
            Moments::F32 { m, v } => {
                *m = m_new.flatten_all()?.to_vec1()?;
                *v = v_new.flatten_all()?.to_vec1()?;
            }
            Moments::F64 { m, v } => {
                *m = m_new.flatten_all()?.to_vec1()?;
                *v = v_new.flatten_all()?.to_vec1()?;
            }
            Moments::Tensor { m, v } => {
                *m = m_new;
                *v = v_new;
            }
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let moments = Moments::zeros(&var).map_err(candle_core::Error::wrap)?;
                Ok(Slot { var, moments })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step_t: 0,
            params,
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let c = Coefficients::new(&self.params, self.step_t);
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.var) else {
                continue;
            };
            let theta = slot.var.as_tensor();
            match &mut slot.moments {
                Moments::F32 { m, v } if theta.is_contiguous() => {
                    let g = g.contiguous()?;
                    let kernel = Kernel {
                        c,
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                    };
                    theta.inplace_op2(&g, &kernel)?;
                }
                Moments::F64 { m, v } if theta.is_contiguous() => {
                    let g = g.contiguous()?;
                    let kernel = Kernel {
                        c,
                        m: RefCell::new(m),
                        v: RefCell::new(v),
                    };
                    theta.inplace_op2(&g, &kernel)?;
                }
                moments => {
                    // candle's formula, tensor by tensor.
                    let (m, v) = match &*moments {
                        Moments::Tensor { m, v } => (m.clone(), v.clone()),
                        other => other
                            .to_tensors(&slot.var)
                            .map_err(candle_core::Error::wrap)?,
                    };
                    let next_m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                    let next_v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let m_hat = (&next_m * c.scale_m)?;
                    let v_hat = (&next_v * c.scale_v)?;
                    let next_theta = (theta * (1.0 - c.lr_lambda))?;
                    let adjusted = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    let next_theta = (next_theta - (adjusted * c.lr)?)?;
                    moments
                        .set_from(next_m, next_v)
                        .map_err(candle_core::Error::wrap)?;
                    slot.var.set(&next_theta)?;
                }
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

impl AdamW {
    /// AdamW with `ParamsAdamW::default()` except the learning rate.
    ///
    /// # Errors
    /// Never for CPU variables; a candle error if moments cannot be allocated on the device.
    pub fn new_lr(vars: Vec<Var>, lr: f64) -> Result<Self> {
        Ok(<Self as Optimizer>::new(
            vars,
            ParamsAdamW {
                lr,
                ..Default::default()
            },
        )?)
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// Replaces the hyper-parameters (the moments are kept).
    pub fn set_params(&mut self, params: ParamsAdamW) {
        self.params = params;
    }

    /// The variables it updates (float variables of the construction list, in order).
    pub fn vars(&self) -> impl Iterator<Item = &Var> + '_ {
        self.slots.iter().map(|s| &s.var)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step_t as u64
    }

    /// A copy of the state (moments and step count).
    ///
    /// # Errors
    /// A candle error if a moment cannot be copied.
    pub fn state(&self) -> Result<AdamWState> {
        Ok(AdamWState {
            step: self.step_t as u64,
            moments: self
                .slots
                .iter()
                .map(|s| s.moments.to_tensors(&s.var))
                .collect::<Result<_>>()?,
        })
    }

    /// Restores a state taken with [`state`](Self::state) from an optimizer over variables of
    /// the same shapes and dtypes. Everything is checked before anything changes: on error
    /// the optimizer is untouched.
    ///
    /// # Errors
    /// [`Error::OptimizerState`] naming the variable whose moments do not fit.
    pub fn load_state(&mut self, state: &AdamWState) -> Result<()> {
        if state.moments.len() != self.slots.len() {
            return Err(Error::OptimizerState(format!(
                "the state holds moments for {} variables, the optimizer has {}",
                state.moments.len(),
                self.slots.len()
            )));
        }
        let step_t = usize::try_from(state.step)
            .ok()
            .filter(|&s| s <= i32::MAX as usize)
            .ok_or_else(|| {
                Error::OptimizerState(format!("step count {} is out of range", state.step))
            })?;
        for (i, (slot, (m, v))) in self.slots.iter().zip(&state.moments).enumerate() {
            for (what, t) in [("first", m), ("second", v)] {
                if t.dims() != slot.var.dims() || t.dtype() != slot.var.dtype() {
                    return Err(Error::OptimizerState(format!(
                        "var {i}: {what} moment is {:?} {:?}, the variable is {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        slot.var.dtype(),
                        slot.var.dims()
                    )));
                }
            }
        }
        // Convert everything first, then swap in.
        let mut fresh = Vec::with_capacity(self.slots.len());
        for (slot, (m, v)) in self.slots.iter().zip(&state.moments) {
            let mut moments = Moments::zeros(&slot.var)?;
            // `copy` so that the optimizer never shares storage with the caller's tensors.
            moments.set_from(
                m.to_device(slot.var.device())?.copy()?,
                v.to_device(slot.var.device())?.copy()?,
            )?;
            fresh.push(moments);
        }
        for (slot, moments) in self.slots.iter_mut().zip(fresh) {
            slot.moments = moments;
        }
        self.step_t = step_t;
        Ok(())
    }
}

/// The scalars of one step, computed once (in `f64`, as candle does).
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    lr: f64,
    lr_lambda: f64,
    beta1: f64,
    beta2: f64,
    scale_m: f64,
    scale_v: f64,
    eps: f64,
}

impl Coefficients {
    fn new(p: &ParamsAdamW, t: usize) -> Self {
        Self {
            lr: p.lr,
            lr_lambda: p.lr * p.weight_decay,
            beta1: p.beta1,
            beta2: p.beta2,
            scale_m: 1.0 / (1.0 - p.beta1.powi(t as i32)),
            scale_v: 1.0 / (1.0 - p.beta2.powi(t as i32)),
            eps: p.eps,
        }
    }
}

/// The fused in-place update of one contiguous variable: `θ` is the destination, `g` the
/// source, the moments are borrowed buffers.
struct Kernel<'a, T> {
    c: Coefficients,
    m: RefCell<&'a mut Vec<T>>,
    v: RefCell<&'a mut Vec<T>>,
}

/// The float types of the in-place path. Every scalar is rounded to `Self` first, exactly
/// as candle's `affine` does, so results match candle's tensor formula bit for bit.
trait Float: Copy + candle_core::WithDType {
    fn sqrt(self) -> Self;
}

impl Float for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Float for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Elements per rayon task: large enough to amortise scheduling, small enough to spread a
/// single large variable (the embedding) over every core.
const CHUNK: usize = 32 * 1024;

impl<T: Float + Send + Sync> Kernel<'_, T> {
    fn run(&self, theta: &mut [T], g: &[T]) {
        use rayon::prelude::*;
        let c = &self.c;
        let s = |x: f64| T::from_f64(x);
        let (b1, omb1) = (s(c.beta1), s(1.0 - c.beta1));
        let (b2, omb2) = (s(c.beta2), s(1.0 - c.beta2));
        let (sm, sv) = (s(c.scale_m), s(c.scale_v));
        let (decay, lr, eps) = (s(1.0 - c.lr_lambda), s(c.lr), s(c.eps));
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        // Every element is independent: splitting the work changes no result bit.
        #[allow(clippy::type_complexity)]
        let update = |(((th, g), m), v): (((&mut [T], &[T]), &mut [T]), &mut [T])| {
            for (((th, &gi), mi), vi) in th.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let nm = *mi * b1 + gi * omb1;
                let nv = *vi * b2 + (gi * gi) * omb2;
                *mi = nm;
                *vi = nv;
                let adjusted = (nm * sm) / ((nv * sv).sqrt() + eps);
                *th = *th * decay - adjusted * lr;
            }
        };
        if theta.len() <= CHUNK {
            update((((theta, g), &mut m[..]), &mut v[..]));
        } else {
            theta
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(update);
        }
    }
}

fn contiguous_range(l: &Layout, len: usize) -> candle_core::Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == len => Ok((a, b)),
        _ => candle_core::bail!("adamw: expected a contiguous layout of {len} elements"),
    }
}

macro_rules! kernel_impl {
    ($t:ty, $variant:ident) => {
        impl candle_core::InplaceOp2 for Kernel<'_, $t> {
            fn name(&self) -> &'static str {
                "pgrpo-adamw"
            }

            fn cpu_fwd(
                &self,
                s1: &mut CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<()> {
                let n = self.m.borrow().len();
                let (a1, b1) = contiguous_range(l1, n)?;
                let (a2, b2) = contiguous_range(l2, n)?;
                match (s1, s2) {
                    (CpuStorage::$variant(theta), CpuStorage::$variant(g)) => {
                        self.run(&mut theta[a1..b1], &g[a2..b2]);
                        Ok(())
                    }
                    _ => candle_core::bail!("adamw: variable and gradient dtypes differ"),
                }
            }
        }
    };
}
kernel_impl!(f32, F32);
kernel_impl!(f64, F64);

impl OptimizerState for AdamW {
    fn export_state(&self) -> Result<Option<OptimizerSnapshot>> {
        let st = self.state()?;
        let mut tensors = Vec::with_capacity(2 * st.moments.len());
        for (i, (m, v)) in st.moments.into_iter().enumerate() {
            tensors.push((format!("m.{i:05}"), m));
            tensors.push((format!("v.{i:05}"), v));
        }
        Ok(Some(OptimizerSnapshot {
            kind: Self::KIND.to_owned(),
            step: st.step,
            tensors,
            meta: serde_json::json!({
                "lr": self.params.lr,
                "beta1": self.params.beta1,
                "beta2": self.params.beta2,
                "eps": self.params.eps,
                "weight_decay": self.params.weight_decay,
            }),
        }))
    }

    fn import_state(&mut self, snapshot: &OptimizerSnapshot) -> Result<()> {
        if snapshot.kind != Self::KIND {
            return Err(Error::OptimizerState(format!(
                "the state is of a {:?} optimizer, this one is {:?}",
                snapshot.kind,
                Self::KIND
            )));
        }
        let n = self.slots.len();
        if snapshot.tensors.len() != 2 * n {
            return Err(Error::OptimizerState(format!(
                "the state holds {} tensors, expected {} (m and v for {n} variables)",
                snapshot.tensors.len(),
                2 * n
            )));
        }
        let mut moments = Vec::with_capacity(n);
        for i in 0..n {
            let (mn, m) = &snapshot.tensors[2 * i];
            let (vn, v) = &snapshot.tensors[2 * i + 1];
            let (want_m, want_v) = (format!("m.{i:05}"), format!("v.{i:05}"));
            if *mn != want_m || *vn != want_v {
                return Err(Error::OptimizerState(format!(
                    "tensors {mn:?}, {vn:?} found where {want_m:?}, {want_v:?} belong"
                )));
            }
            moments.push((m.clone(), v.clone()));
        }
        self.load_state(&AdamWState {
            step: snapshot.step,
            moments,
        })
    }
}

impl AdamW {
    /// The `kind` of its [`OptimizerSnapshot`]s.
    pub const KIND: &'static str = "pgrpo.adamw";
}
