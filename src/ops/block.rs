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

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use super::attention::{self, Dims};
use super::{cpu_f32, gemm, rms_norm, rope, swiglu, with_f32};

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
/// SwiGLU MLP, residual. Differentiable in `x` and every weight.
///
/// CPU and `f32` only (an error otherwise): the model falls back to the per-op kernels
/// elsewhere. Tested against them (and so against candle's stock ops) in `tests/kernels.rs`.
pub fn decoder_block(
    x: &Tensor,
    w: &BlockWeights<'_>,
    shape: &BlockShape,
) -> candle_core::Result<Tensor> {
    let list = weight_list(w);
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
    let (b, t) = (shape.batch, shape.seq);
    if expect.iter().any(|(t, d)| t.dims() != *d)
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
    let shared = Arc::new(Shared {
        weights: list
            .iter()
            .map(|t| t.detach().contiguous())
            .collect::<candle_core::Result<_>>()?,
        bias: [w.q.1.is_some(), w.k.1.is_some(), w.v.1.is_some()],
        saved: Mutex::new(None),
        grads: Mutex::new(Vec::new()),
    });
    // The chain that puts every weight into the graph.
    let mut chain = Tensor::zeros(1, DType::F32, x.device())?;
    for (index, wt) in list.iter().enumerate() {
        chain = chain.apply_op2(
            wt,
            Attach {
                shared: shared.clone(),
                index,
            },
        )?;
    }
    let op = Block {
        shared,
        shape: shape.clone(),
        ffn,
        hidden,
    };
    x.contiguous()?.apply_op2(&chain, op)
}

/// The weights in chain order: input norm, q, (q bias), k, (k bias), v, (v bias), o, post
/// norm, gate, up, down.
fn weight_list<'a>(w: &BlockWeights<'a>) -> Vec<&'a Tensor> {
    let mut v = vec![w.input_norm, w.q.0];
    v.extend(w.q.1);
    v.push(w.k.0);
    v.extend(w.k.1);
    v.push(w.v.0);
    v.extend(w.v.1);
    v.extend([w.o, w.post_norm, w.gate, w.up, w.down]);
    v
}

/// State shared by a block node and its attach nodes.
struct Shared {
    /// Detached weights (same storage as the vars) in chain order.
    weights: Vec<Tensor>,
    /// Which of q, k, v have a bias.
    bias: [bool; 3],
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

    /// Weights by role: (in_norm, [q, k, v], [q, k, v bias], o, post, gate, up, down).
    #[allow(clippy::type_complexity)]
    fn roles<'a>(
        &self,
        ws: &[&'a [f32]],
    ) -> (
        &'a [f32],
        [&'a [f32]; 3],
        [Option<&'a [f32]>; 3],
        &'a [f32],
        &'a [f32],
        &'a [f32],
        &'a [f32],
        &'a [f32],
    ) {
        let mut i = 1;
        let mut proj = [ws[0]; 3];
        let mut bias = [None; 3];
        for j in 0..3 {
            proj[j] = ws[i];
            i += 1;
            if self.shared.bias[j] {
                bias[j] = Some(ws[i]);
                i += 1;
            }
        }
        (
            ws[0],
            proj,
            bias,
            ws[i],
            ws[i + 1],
            ws[i + 2],
            ws[i + 3],
            ws[i + 4],
        )
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
            let (w_in, proj, bias, wo, w_post, wg, wu, wd) = self.roles(ws);
            let mut h1 = vec![0f32; n * hs];
            rms_norm::forward(x, w_in, s.eps, &mut h1);
            let mut qkv = [vec![0f32; n * qd], vec![0f32; n * kd], vec![0f32; n * kd]];
            for j in 0..3 {
                let out = if j == 0 { qd } else { kd };
                lin(&h1, proj[j], n, out, hs, &mut qkv[j], false);
                if let Some(b) = bias[j] {
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
            lin(&attn, wo, n, hs, qd, &mut x2, true);
            let mut h2 = vec![0f32; n * hs];
            rms_norm::forward(&x2, w_post, s.eps, &mut h2);
            let mut gate = vec![0f32; n * f];
            let mut up = vec![0f32; n * f];
            lin(&h2, wg, n, f, hs, &mut gate, false);
            lin(&h2, wu, n, f, hs, &mut up, false);
            let mut act = vec![0f32; n * f];
            swiglu::forward(&gate, &up, &mut act);
            let mut y = x2.clone();
            lin(&act, wd, n, hs, f, &mut y, true);
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
        let (dx, grads) = with_f32(x, "decoder_block bwd", |x| {
            with_f32(dy, "decoder_block bwd", |dy| {
                self.with_weights(|ws| {
                    let (w_in, proj, _, wo, w_post, wg, wu, wd) = self.roles(ws);
                    let sv = &saved;
                    // MLP.
                    let mut d_act = vec![0f32; n * f];
                    lin_dx(dy, wd, n, hs, f, &mut d_act, false);
                    let g_down = lin_dw(dy, &sv.act, n, hs, f);
                    let mut d_gate = vec![0f32; n * f];
                    let mut d_up = vec![0f32; n * f];
                    swiglu::backward(&sv.gate, &sv.up, &d_act, &mut d_gate, &mut d_up);
                    drop(d_act);
                    let mut dh2 = vec![0f32; n * hs];
                    lin_dx(&d_gate, wg, n, f, hs, &mut dh2, false);
                    lin_dx(&d_up, wu, n, f, hs, &mut dh2, true);
                    let g_gate = lin_dw(&d_gate, &sv.h2, n, f, hs);
                    let g_up = lin_dw(&d_up, &sv.h2, n, f, hs);
                    drop((d_gate, d_up));
                    let mut dx2 = dy.to_vec();
                    let g_post = rms_norm::backward(&sv.x2, w_post, &dh2, s.eps, &mut dx2, true);
                    drop(dh2);
                    // Attention.
                    let mut d_attn = vec![0f32; n * qd];
                    lin_dx(&dx2, wo, n, hs, qd, &mut d_attn, false);
                    let g_o = lin_dw(&dx2, &sv.attn, n, hs, qd);
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
                    let mut dh1 = vec![0f32; n * hs];
                    let dproj = [&dq, &dk, &dv];
                    let mut g_proj = Vec::with_capacity(3);
                    for j in 0..3 {
                        let out = if j == 0 { qd } else { kd };
                        lin_dx(dproj[j], proj[j], n, out, hs, &mut dh1, j > 0);
                        g_proj.push(lin_dw(dproj[j], &sv.h1, n, out, hs));
                    }
                    let mut dx = dx2;
                    let g_in = rms_norm::backward(x, w_in, &dh1, s.eps, &mut dx, true);
                    // Gradients in chain order.
                    let mut grads = vec![g_in];
                    for (j, g) in g_proj.into_iter().enumerate() {
                        grads.push(g);
                        if self.shared.bias[j] {
                            grads.push(col_sums(dproj[j], if j == 0 { qd } else { kd }));
                        }
                    }
                    grads.extend([g_o, g_post, g_gate, g_up, g_down]);
                    Ok((dx, grads))
                })
            })
        })?;
        let tensors = grads
            .into_iter()
            .zip(&self.shared.weights)
            .map(|(g, w)| Tensor::from_vec(g, w.shape(), w.device()).map(Some))
            .collect::<candle_core::Result<Vec<_>>>()?;
        *self.shared.grads.lock().map_err(|_| lock_err())? = tensors;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(chain.zeros_like()?),
        ))
    }
}
