//! A whole pre-norm Llama decoder block as one graph node with a hand-written backward.
//!
//! Per-op kernels still leave candle's autograd about 15 nodes per block, and for every node
//! input candle's `GradStore` allocates a zero tensor and adds the gradient into it. Here the
//! block's forward runs on plain buffers (the kernels of the sibling modules plus `gemm`),
//! keeps what its backward needs, and its backward produces `∂x` and all weight gradients in
//! one go. The weights reach the graph through a chain of tiny "attach" nodes, one per
//! weight, each carrying a 1-element tensor: their backward hands candle the weight gradient
//! the block's backward computed, so every [`Var`](candle_core::Var) still gets its gradient
//! through candle's ordinary `backward()`.
//!
//! **Frozen weights and LoRA.** A weight with no var behind it (`!track_op()`, e.g. the
//! frozen base of a LoRA model) gets no attach node and its gradient GEMM is skipped. Each
//! projection may carry a LoRA adapter ([`BlockLora`]): `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`,
//! computed in low rank (two thin GEMMs each way), so a LoRA update skips the weight-sized
//! `∂W` GEMMs of the frozen base entirely.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use super::attention::{self, Dims};
use super::dropout::Dropout;
use super::{cpu_f32, gemm, rms_norm, rope, swiglu, with_f32};

/// The projections of a block, in the order of [`BlockWeights::lora`].
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A LoRA adapter on one projection `W: (out, in)` of a block (Hu et al. 2021, "LoRA:
/// Low-Rank Adaptation of Large Language Models", eq. 3, with PEFT's dropout on the
/// adapter's input):
///
/// ```text
/// y = x Wᵀ + scale · (drop(x) Aᵀ) Bᵀ,    A: (r, in),  B: (out, r)
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BlockLora<'a> {
    /// The down-projection `A: (r, in)`.
    pub a: &'a Tensor,
    /// The up-projection `B: (out, r)`.
    pub b: &'a Tensor,
    /// The factor `α / r`.
    pub scale: f32,
    /// Dropout on the adapter's input (training only), or `None`.
    pub dropout: Option<Dropout>,
}

/// The weights of one block, as the tensors of their vars (attached: the gradients reach
/// them). Shapes as in Hugging Face's Llama: `q: (H·D, hidden)`, `k, v: (Hkv·D, hidden)`,
/// `o: (hidden, H·D)`, `gate, up: (ffn, hidden)`, `down: (hidden, ffn)`, norms `(hidden,)`,
/// optional biases `(H·D,)` / `(Hkv·D,)`.
#[derive(Debug, Clone, Copy)]
pub struct BlockWeights<'a> {
    /// Input RMSNorm weight.
    pub input_norm: &'a Tensor,
    /// Query projection and optional bias.
    pub q: (&'a Tensor, Option<&'a Tensor>),
    /// Key projection and optional bias.
    pub k: (&'a Tensor, Option<&'a Tensor>),
    /// Value projection and optional bias.
    pub v: (&'a Tensor, Option<&'a Tensor>),
    /// Output projection.
    pub o: &'a Tensor,
    /// Post-attention RMSNorm weight.
    pub post_norm: &'a Tensor,
    /// MLP gate projection.
    pub gate: &'a Tensor,
    /// MLP up projection.
    pub up: &'a Tensor,
    /// MLP down projection.
    pub down: &'a Tensor,
    /// LoRA adapters on the projections, in the order of [`PROJECTIONS`] (q, k, v, o, gate,
    /// up, down); `[None; 7]` for none.
    pub lora: [Option<BlockLora<'a>>; 7],
}

/// The block's shape and per-call inputs.
#[derive(Debug, Clone)]
pub struct BlockShape {
    /// Batch rows `B` and tokens per row `T`.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `Hkv` (divides `H`).
    pub kv_heads: usize,
    /// Head size `D` (even).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// `(B, T, D/2)` RoPE cosines and sines (rotate-half convention), row-major.
    pub cos: Arc<[f32]>,
    /// See `cos`.
    pub sin: Arc<[f32]>,
    /// `(B, T, T)` additive attention mask (0 or `-inf`), row-major.
    pub mask: Arc<[f32]>,
}

/// One decoder block `x ↦ x' + mlp(rms(x'))` with `x' = x + attn(rms(x))` on `x: (B·T,
/// hidden)`, as in [`Llama`](crate::lm::Llama): RMSNorm, q/k/v projections, rotate-half RoPE,
/// masked grouped-query attention with scale `1/√D`, output projection, residual, RMSNorm,
/// SwiGLU MLP, residual, each projection with its optional LoRA adapter. Differentiable in
/// `x` and every weight and adapter that tracks a gradient (frozen ones get none, and their
/// gradient GEMMs are skipped).
///
/// CPU and `f32` only (an error otherwise): the model falls back to the per-op kernels
/// elsewhere. Tested against them (and so against candle's stock ops) in `tests/kernels.rs`
/// and, with adapters, in `tests/lora.rs`.
pub fn decoder_block(
    x: &Tensor,
    w: &BlockWeights<'_>,
    shape: &BlockShape,
) -> candle_core::Result<Tensor> {
    let (list, lora) = weight_list(w);
    if !(x.device().is_cpu() && x.dtype() == DType::F32)
        || list
            .iter()
            .any(|t| !(t.device().is_cpu() && t.dtype() == DType::F32))
    {
        candle_core::bail!("decoder_block: CPU f32 tensors only");
    }
    let (n, hidden) = x.dims2()?;
    let (nh, nkv, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
    let ffn = w.gate.dim(0)?;
    let expect: [(&Tensor, &[usize]); 9] = [
        (w.input_norm, &[hidden]),
        (w.q.0, &[nh * hd, hidden]),
        (w.k.0, &[nkv * hd, hidden]),
        (w.v.0, &[nkv * hd, hidden]),
        (w.o, &[hidden, nh * hd]),
        (w.post_norm, &[hidden]),
        (w.gate, &[ffn, hidden]),
        (w.up, &[ffn, hidden]),
        (w.down, &[hidden, ffn]),
    ];
    // (out, in) of each projection, in `PROJECTIONS` order.
    let io = [
        (nh * hd, hidden),
        (nkv * hd, hidden),
        (nkv * hd, hidden),
        (hidden, nh * hd),
        (ffn, hidden),
        (ffn, hidden),
        (hidden, ffn),
    ];
    let lora_ok = w.lora.iter().zip(io).all(|(l, (out, inp))| match l {
        None => true,
        Some(l) => {
            let r = l.a.dim(0).unwrap_or(0);
            r > 0
                && l.a.dims() == [r, inp]
                && l.b.dims() == [out, r]
                && l.dropout.is_none_or(|d| (0.0..1.0).contains(&d.p))
        }
    });
    let (b, t) = (shape.batch, shape.seq);
    if expect.iter().any(|(t, d)| t.dims() != *d)
        || !lora_ok
        || n != b * t
        || nkv == 0
        || nh % nkv != 0
        || hd % 2 != 0
        || shape.cos.len() != b * t * hd / 2
        || shape.sin.len() != b * t * hd / 2
        || shape.mask.len() != b * t * t
    {
        candle_core::bail!("decoder_block: inconsistent shapes (x {:?})", x.dims());
    }
    let need: Vec<bool> = list.iter().map(|t| t.track_op()).collect();
    let shared = Arc::new(Shared {
        weights: list
            .iter()
            .map(|t| t.detach().contiguous())
            .collect::<candle_core::Result<_>>()?,
        bias: [w.q.1.is_some(), w.k.1.is_some(), w.v.1.is_some()],
        lora,
        need: need.clone(),
        saved: Mutex::new(None),
        grads: Mutex::new(Vec::new()),
    });
    // The chain that puts every weight that wants a gradient into the graph.
    let mut chain = Tensor::zeros(1, DType::F32, x.device())?;
    for (index, wt) in list.iter().enumerate() {
        if need[index] {
            chain = chain.apply_op2(
                wt,
                Attach {
                    shared: shared.clone(),
                    index,
                },
            )?;
        }
    }
    let op = Block {
        shared,
        shape: shape.clone(),
        ffn,
        hidden,
    };
    x.contiguous()?.apply_op2(&chain, op)
}

/// An adapter's place in the weight list and its constants.
#[derive(Debug, Clone, Copy)]
struct LoraSlot {
    /// Index of `A` in the weight list (`B` follows it).
    index: usize,
    rank: usize,
    scale: f32,
    dropout: Option<Dropout>,
}

/// The weights in chain order: input norm, q, (q bias), k, (k bias), v, (v bias), o, post
/// norm, gate, up, down, then `A, B` of every adapter in [`PROJECTIONS`] order.
fn weight_list<'a>(w: &BlockWeights<'a>) -> (Vec<&'a Tensor>, [Option<LoraSlot>; 7]) {
    let mut v = vec![w.input_norm, w.q.0];
    v.extend(w.q.1);
    v.push(w.k.0);
    v.extend(w.k.1);
    v.push(w.v.0);
    v.extend(w.v.1);
    v.extend([w.o, w.post_norm, w.gate, w.up, w.down]);
    let mut slots = [None; 7];
    for (slot, l) in slots.iter_mut().zip(&w.lora) {
        if let Some(l) = l {
            *slot = Some(LoraSlot {
                index: v.len(),
                rank: l.a.dim(0).unwrap_or(0),
                scale: l.scale,
                dropout: l.dropout,
            });
            v.extend([l.a, l.b]);
        }
    }
    (v, slots)
}

/// State shared by a block node and its attach nodes.
struct Shared {
    /// Detached weights (same storage as the vars) in chain order.
    weights: Vec<Tensor>,
    /// Which of q, k, v have a bias.
    bias: [bool; 3],
    /// The adapters, in [`PROJECTIONS`] order.
    lora: [Option<LoraSlot>; 7],
    /// Which weights want a gradient (chain order).
    need: Vec<bool>,
    /// Activations kept by the forward for the backward.
    saved: Mutex<Option<Saved>>,
    /// Weight gradients computed by the block's backward, taken by the attach nodes.
    grads: Mutex<Vec<Option<Tensor>>>,
}

/// Forward activations, all row-major with `N = B·T` rows.
struct Saved {
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    x2: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// Per adapter, `u = drop(x) Aᵀ: (N, r)`.
    lora_u: [Option<Vec<f32>>; 7],
}

fn lock_err() -> candle_core::Error {
    candle_core::Error::Msg("decoder_block: a thread panicked holding the block state".into())
}

/// Carries a 1-element tensor along and puts one weight into the graph.
struct Attach {
    shared: Arc<Shared>,
    index: usize,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        "pgrpo-block-attach"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = cpu_f32(s1, l1, self.name())?;
        Ok((CpuStorage::F32(c.to_vec()), l1.shape().clone()))
    }

    fn bwd(
        &self,
        chain: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self
            .shared
            .grads
            .lock()
            .map_err(|_| lock_err())?
            .get_mut(self.index)
            .and_then(Option::take);
        let Some(g) = g else {
            candle_core::bail!("decoder_block: weight gradient {} missing", self.index);
        };
        Ok((Some(chain.zeros_like()?), Some(g)))
    }
}

struct Block {
    shared: Arc<Shared>,
    shape: BlockShape,
    ffn: usize,
    hidden: usize,
}

fn threads() -> usize {
    rayon::current_num_threads()
}

/// `dst (n, out) (+)= x (n, inp) · wᵀ` for `w: (out, inp)`.
fn lin(x: &[f32], w: &[f32], n: usize, out: usize, inp: usize, dst: &mut [f32], acc: bool) {
    gemm(
        n,
        out,
        inp,
        dst,
        out,
        (x, inp, 1),
        (w, 1, inp),
        acc,
        threads(),
    );
}

/// `dst (n, inp) (+)= d (n, out) · w (out, inp)`.
fn lin_dx(d: &[f32], w: &[f32], n: usize, out: usize, inp: usize, dst: &mut [f32], acc: bool) {
    gemm(
        n,
        inp,
        out,
        dst,
        inp,
        (d, out, 1),
        (w, inp, 1),
        acc,
        threads(),
    );
}

/// `(out, inp) = dᵀ (out, n) · x (n, inp)`.
fn lin_dw(d: &[f32], x: &[f32], n: usize, out: usize, inp: usize) -> Vec<f32> {
    let mut dw = vec![0f32; out * inp];
    gemm(
        out,
        inp,
        n,
        &mut dw,
        inp,
        (d, 1, out),
        (x, inp, 1),
        false,
        threads(),
    );
    dw
}

fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

fn col_sums(d: &[f32], width: usize) -> Vec<f32> {
    let mut s = vec![0f32; width];
    for row in d.chunks(width) {
        s.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    s
}

/// One adapter's data for a call: `A: (r, in)`, `B: (out, r)` and its slot.
#[derive(Clone, Copy)]
struct Lora<'a> {
    a: &'a [f32],
    b: &'a [f32],
    slot: LoraSlot,
}

impl Lora<'_> {
    /// `y (n, out) += scale · (drop(x) Aᵀ) Bᵀ`; returns `u = drop(x) Aᵀ: (n, r)`.
    fn forward(&self, x: &[f32], n: usize, out: usize, inp: usize, y: &mut [f32]) -> Vec<f32> {
        let r = self.slot.rank;
        let dropped = self.slot.dropout.map(|d| d.apply(x));
        let xd = dropped.as_deref().unwrap_or(x);
        let mut u = vec![0f32; n * r];
        lin(xd, self.a, n, r, inp, &mut u, false);
        let us: Vec<f32> = u.iter().map(|v| v * self.slot.scale).collect();
        lin(&us, self.b, n, out, r, y, true);
        u
    }

    /// The backward of [`forward`](Self::forward) for `dy: (n, out)`: returns `(∂A, ∂B)`
    /// (each only if wanted) and adds `∂x` into `dx` when given.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        u: &[f32],
        dy: &[f32],
        (n, out, inp): (usize, usize, usize),
        (need_a, need_b): (bool, bool),
        dx: Option<&mut [f32]>,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let (r, s) = (self.slot.rank, self.slot.scale);
        // ∂B = s · dyᵀ u.
        let db = need_b.then(|| {
            let mut db = lin_dw(dy, u, n, out, r);
            db.iter_mut().for_each(|v| *v *= s);
            db
        });
        if !need_a && dx.is_none() {
            return (None, db);
        }
        // g = s · dy B: (n, r), the gradient of u.
        let mut g = vec![0f32; n * r];
        lin_dx(dy, self.b, n, out, r, &mut g, false);
        g.iter_mut().for_each(|v| *v *= s);
        // ∂A = gᵀ drop(x).
        let da = need_a.then(|| match self.slot.dropout {
            Some(d) => lin_dw(&g, &d.apply(x), n, r, inp),
            None => lin_dw(&g, x, n, r, inp),
        });
        // ∂x += (g A) ⊙ mask.
        if let Some(dx) = dx {
            match self.slot.dropout {
                None => lin_dx(&g, self.a, n, r, inp, dx, true),
                Some(d) => {
                    let mut t = vec![0f32; n * inp];
                    lin_dx(&g, self.a, n, r, inp, &mut t, false);
                    d.accumulate(&t, dx);
                }
            }
        }
        (da, db)
    }
}

/// The weights of one call by role.
struct Roles<'a> {
    in_norm: &'a [f32],
    proj: [&'a [f32]; 3],
    bias: [Option<&'a [f32]>; 3],
    o: &'a [f32],
    post: &'a [f32],
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
    lora: [Option<Lora<'a>>; 7],
    /// Chain index of each base weight: in_norm, q, k, v, o, post, gate, up, down.
    index: [usize; 9],
    /// Chain index of each bias.
    bias_index: [Option<usize>; 3],
}

impl Block {
    fn dims(&self) -> Dims {
        let s = &self.shape;
        Dims {
            b: s.batch,
            t: s.seq,
            tk: s.seq,
            nh: s.heads,
            nkv: s.kv_heads,
            hd: s.head_dim,
        }
    }

    /// Runs `f` on the weights' data in chain order.
    fn with_weights<R>(
        &self,
        f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let guards: Vec<_> = self
            .shared
            .weights
            .iter()
            .map(|t| t.storage_and_layout())
            .collect();
        let mut ws = Vec::with_capacity(guards.len());
        for (g, l) in &guards {
            match &**g {
                Storage::Cpu(c) => ws.push(cpu_f32(c, l, "decoder_block")?),
                _ => candle_core::bail!("decoder_block: CPU tensors only"),
            }
        }
        f(&ws)
    }

    /// The weights by role.
    fn roles<'a>(&self, ws: &[&'a [f32]]) -> Roles<'a> {
        let mut i = 1;
        let mut proj = [ws[0]; 3];
        let mut bias = [None; 3];
        let mut index = [0usize; 9];
        let mut bias_index = [None; 3];
        for j in 0..3 {
            proj[j] = ws[i];
            index[1 + j] = i;
            i += 1;
            if self.shared.bias[j] {
                bias[j] = Some(ws[i]);
                bias_index[j] = Some(i);
                i += 1;
            }
        }
        for (k, slot) in index.iter_mut().enumerate().skip(4) {
            *slot = i + k - 4;
        }
        let mut lora = [None; 7];
        for (l, slot) in lora.iter_mut().zip(&self.shared.lora) {
            *l = slot.map(|slot| Lora {
                a: ws[slot.index],
                b: ws[slot.index + 1],
                slot,
            });
        }
        Roles {
            in_norm: ws[0],
            proj,
            bias,
            o: ws[i],
            post: ws[i + 1],
            gate: ws[i + 2],
            up: ws[i + 3],
            down: ws[i + 4],
            lora,
            index,
            bias_index,
        }
    }
}

impl CustomOp2 for Block {
    fn name(&self) -> &'static str {
        "pgrpo-decoder-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s1, l1, self.name())?;
        let (hs, f) = (self.hidden, self.ffn);
        let s = &self.shape;
        let n = s.batch * s.seq;
        let (qd, kd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let (y, saved) = self.with_weights(|ws| {
            let w = self.roles(ws);
            let mut lora_u: [Option<Vec<f32>>; 7] = Default::default();
            let mut h1 = vec![0f32; n * hs];
            rms_norm::forward(x, w.in_norm, s.eps, &mut h1);
            let mut qkv = [vec![0f32; n * qd], vec![0f32; n * kd], vec![0f32; n * kd]];
            for j in 0..3 {
                let out = if j == 0 { qd } else { kd };
                lin(&h1, w.proj[j], n, out, hs, &mut qkv[j], false);
                if let Some(l) = w.lora[j] {
                    lora_u[j] = Some(l.forward(&h1, n, out, hs, &mut qkv[j]));
                }
                if let Some(b) = w.bias[j] {
                    add_bias(&mut qkv[j], b);
                }
            }
            let [q0, k0, v] = qkv;
            let mut q = vec![0f32; n * qd];
            let mut k = vec![0f32; n * kd];
            rope::apply(&q0, &mut q, &s.cos, &s.sin, s.heads, s.head_dim, 1.0);
            rope::apply(&k0, &mut k, &s.cos, &s.sin, s.kv_heads, s.head_dim, 1.0);
            drop((q0, k0));
            let mut attn = vec![0f32; n * qd];
            let mut probs = vec![0f32; s.batch * s.heads * s.seq * s.seq];
            let scale = 1.0 / (s.head_dim as f32).sqrt();
            attention::forward(
                &q,
                &k,
                &v,
                &s.mask,
                self.dims(),
                scale,
                &mut attn,
                &mut probs,
            );
            let mut x2 = x.to_vec();
            lin(&attn, w.o, n, hs, qd, &mut x2, true);
            if let Some(l) = w.lora[3] {
                lora_u[3] = Some(l.forward(&attn, n, hs, qd, &mut x2));
            }
            let mut h2 = vec![0f32; n * hs];
            rms_norm::forward(&x2, w.post, s.eps, &mut h2);
            let mut gate = vec![0f32; n * f];
            let mut up = vec![0f32; n * f];
            lin(&h2, w.gate, n, f, hs, &mut gate, false);
            if let Some(l) = w.lora[4] {
                lora_u[4] = Some(l.forward(&h2, n, f, hs, &mut gate));
            }
            lin(&h2, w.up, n, f, hs, &mut up, false);
            if let Some(l) = w.lora[5] {
                lora_u[5] = Some(l.forward(&h2, n, f, hs, &mut up));
            }
            let mut act = vec![0f32; n * f];
            swiglu::forward(&gate, &up, &mut act);
            let mut y = x2.clone();
            lin(&act, w.down, n, hs, f, &mut y, true);
            if let Some(l) = w.lora[6] {
                lora_u[6] = Some(l.forward(&act, n, hs, f, &mut y));
            }
            let saved = Saved {
                h1,
                q,
                k,
                v,
                probs,
                attn,
                x2,
                h2,
                gate,
                up,
                act,
                lora_u,
            };
            Ok((y, saved))
        })?;
        *self.shared.saved.lock().map_err(|_| lock_err())? = Some(saved);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        chain: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .shared
            .saved
            .lock()
            .map_err(|_| lock_err())?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("decoder_block: backward ran twice".into()))?;
        let (hs, f) = (self.hidden, self.ffn);
        let s = &self.shape;
        let n = s.batch * s.seq;
        let (qd, kd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let need = &self.shared.need;
        let need_x = x.track_op();
        let count = self.shared.weights.len();
        let (dx, grads) = with_f32(x, "decoder_block bwd", |x| {
            with_f32(dy, "decoder_block bwd", |dy| {
                self.with_weights(|ws| {
                    let w = self.roles(ws);
                    let sv = &saved;
                    let mut grads: Vec<Option<Vec<f32>>> = vec![None; count];
                    // ∂ of one base projection's weight, if it wants one.
                    let base_dw = |grads: &mut Vec<Option<Vec<f32>>>,
                                   role: usize,
                                   d: &[f32],
                                   inp: &[f32],
                                   (out, i): (usize, usize)| {
                        let idx = w.index[role];
                        if need[idx] {
                            grads[idx] = Some(lin_dw(d, inp, n, out, i));
                        }
                    };
                    // MLP.
                    let mut d_act = vec![0f32; n * f];
                    lin_dx(dy, w.down, n, hs, f, &mut d_act, false);
                    base_dw(&mut grads, 8, dy, &sv.act, (hs, f));
                    let mut lora_grads = Vec::new();
                    let mut lora_bwd =
                        |j: usize,
                         inp: &[f32],
                         d: &[f32],
                         (out, i): (usize, usize),
                         dx: Option<&mut [f32]>| {
                            if let (Some(l), Some(u)) = (w.lora[j], sv.lora_u[j].as_deref()) {
                                let idx = l.slot.index;
                                let (da, db) = l.backward(
                                    inp,
                                    u,
                                    d,
                                    (n, out, i),
                                    (need[idx], need[idx + 1]),
                                    dx,
                                );
                                lora_grads.push((idx, da));
                                lora_grads.push((idx + 1, db));
                            }
                        };
                    lora_bwd(6, &sv.act, dy, (hs, f), Some(&mut d_act));
                    let mut d_gate = vec![0f32; n * f];
                    let mut d_up = vec![0f32; n * f];
                    swiglu::backward(&sv.gate, &sv.up, &d_act, &mut d_gate, &mut d_up);
                    drop(d_act);
                    let mut dh2 = vec![0f32; n * hs];
                    lin_dx(&d_gate, w.gate, n, f, hs, &mut dh2, false);
                    lin_dx(&d_up, w.up, n, f, hs, &mut dh2, true);
                    base_dw(&mut grads, 6, &d_gate, &sv.h2, (f, hs));
                    base_dw(&mut grads, 7, &d_up, &sv.h2, (f, hs));
                    lora_bwd(4, &sv.h2, &d_gate, (f, hs), Some(&mut dh2));
                    lora_bwd(5, &sv.h2, &d_up, (f, hs), Some(&mut dh2));
                    drop((d_gate, d_up));
                    let mut dx2 = dy.to_vec();
                    let g_post = rms_norm::backward(&sv.x2, w.post, &dh2, s.eps, &mut dx2, true);
                    if need[w.index[5]] {
                        grads[w.index[5]] = Some(g_post);
                    }
                    drop(dh2);
                    // Attention.
                    let mut d_attn = vec![0f32; n * qd];
                    lin_dx(&dx2, w.o, n, hs, qd, &mut d_attn, false);
                    base_dw(&mut grads, 4, &dx2, &sv.attn, (hs, qd));
                    lora_bwd(3, &sv.attn, &dx2, (hs, qd), Some(&mut d_attn));
                    let mut dq_r = vec![0f32; n * qd];
                    let mut dk_r = vec![0f32; n * kd];
                    let mut dv = vec![0f32; n * kd];
                    let scale = 1.0 / (s.head_dim as f32).sqrt();
                    attention::backward(
                        &sv.q,
                        &sv.k,
                        &sv.v,
                        &d_attn,
                        &sv.probs,
                        self.dims(),
                        scale,
                        &mut dq_r,
                        &mut dk_r,
                        &mut dv,
                    );
                    drop(d_attn);
                    let mut dq = vec![0f32; n * qd];
                    let mut dk = vec![0f32; n * kd];
                    rope::apply(&dq_r, &mut dq, &s.cos, &s.sin, s.heads, s.head_dim, -1.0);
                    rope::apply(&dk_r, &mut dk, &s.cos, &s.sin, s.kv_heads, s.head_dim, -1.0);
                    drop((dq_r, dk_r));
                    // ∂h1 is needed only for ∂x and the input norm's gradient.
                    let need_h1 = need_x || need[w.index[0]];
                    let mut dh1 = need_h1.then(|| vec![0f32; n * hs]);
                    let dproj = [&dq, &dk, &dv];
                    for (j, &d) in dproj.iter().enumerate() {
                        let out = if j == 0 { qd } else { kd };
                        if let Some(dh1) = dh1.as_deref_mut() {
                            lin_dx(d, w.proj[j], n, out, hs, dh1, j > 0);
                        }
                        base_dw(&mut grads, 1 + j, d, &sv.h1, (out, hs));
                        if let Some(bi) = w.bias_index[j] {
                            if need[bi] {
                                grads[bi] = Some(col_sums(d, out));
                            }
                        }
                        lora_bwd(j, &sv.h1, d, (out, hs), dh1.as_deref_mut());
                    }
                    let mut dx = dx2;
                    if let Some(dh1) = dh1 {
                        let g_in = rms_norm::backward(x, w.in_norm, &dh1, s.eps, &mut dx, true);
                        if need[w.index[0]] {
                            grads[w.index[0]] = Some(g_in);
                        }
                    }
                    for (idx, g) in lora_grads {
                        if g.is_some() {
                            grads[idx] = g;
                        }
                    }
                    Ok((dx, grads))
                })
            })
        })?;
        let tensors = grads
            .into_iter()
            .zip(&self.shared.weights)
            .map(|(g, w)| {
                g.map(|g| Tensor::from_vec(g, w.shape(), w.device()))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        *self.shared.grads.lock().map_err(|_| lock_err())? = tensors;
        Ok((
            need_x
                .then(|| Tensor::from_vec(dx, x.shape(), x.device()))
                .transpose()?,
            Some(chain.zeros_like()?),
        ))
    }
}
