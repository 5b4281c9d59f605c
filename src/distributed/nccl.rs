//! [`Collective`] for CUDA GPUs: gradients and weights over NCCL, on the device; everything
//! else (rewards, batch statistics, metrics, checks) over MPI, on the host.
//!
//! **Not verified on a GPU.** This file is compiled only with the `nccl` feature, which needs
//! the CUDA toolkit and NCCL; neither exists on the machines this crate was developed on.
//! See the crate's README (data-parallel section) for what was and was not checked.

use std::ffi::c_char;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};

use super::host::{self, buckets, layout_bytes};
use super::{check_root, Collective, Mpi};
use crate::{Error, Result};

/// One CUDA GPU per MPI rank. Gradients are flattened into `f32` buckets **on the GPU** and
/// all-reduced with `ncclAllReduce`; initial weights are broadcast with `ncclBroadcast`;
/// the small host-side exchanges (rewards, normalisers, metrics, checkpoints) use MPI.
///
/// The NCCL communicator is created from a unique id made on rank 0 and sent to the other
/// ranks with an MPI broadcast (`ncclCommInitRank`), on the candle device's stream, so NCCL
/// calls are ordered with candle's kernels.
///
/// ```no_run
/// use candle_core::Device;
/// use pgrpo::distributed::{local_rank, Mpi, Nccl};
/// let mpi = Mpi::init()?;
/// let device = Device::new_cuda(local_rank().unwrap_or(0))?;
/// let nccl = Nccl::new(mpi, &device)?;
/// // build the policy on `device`, then `Trainer::new(..)?.with_collective(nccl)?`
/// # Ok::<(), pgrpo::Error>(())
/// ```
pub struct Nccl {
    mpi: Mpi,
    comm: Comm,
    device: Device,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("mpi", &self.mpi)
            .field("device", &self.device)
            .finish()
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::distributed(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// Joins every rank of `mpi` in an NCCL communicator on `device` (a CUDA device; one per
    /// rank, e.g. `Device::new_cuda(local_rank)`). Collective over `mpi`.
    ///
    /// # Errors
    /// [`Error::Distributed`] if `device` is not a CUDA device or NCCL fails to initialise.
    pub fn new(mpi: Mpi, device: &Device) -> Result<Self> {
        let cuda = device
            .as_cuda_device()
            .map_err(|_| Error::distributed(format!("Nccl needs a CUDA device, got {device:?}")))?;
        // Rank 0 makes the id; MPI carries its 128 bytes to the others. An error on rank 0
        // travels as an all-zero id and is reported by every rank.
        let mut bytes = [0u8; 128];
        let made = if mpi.rank() == 0 {
            Id::new().map(|id| {
                for (b, c) in bytes.iter_mut().zip(id.internal()) {
                    *b = *c as u8;
                }
            })
        } else {
            Ok(())
        };
        mpi.broadcast_bytes(&mut bytes, 0)?;
        made.map_err(|e| nccl_error("unique id", e))?;
        if bytes.iter().all(|&b| b == 0) {
            return Err(Error::distributed(
                "rank 0 could not create the NCCL unique id",
            ));
        }
        let id = Id::uninit(bytes.map(|b| b as c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), mpi.rank(), mpi.world(), id)
            .map_err(|e| nccl_error("communicator", e))?;
        Ok(Self {
            mpi,
            comm,
            device: device.clone(),
        })
    }

    /// The CUDA device of this rank.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The MPI side (host exchanges).
    pub fn mpi(&self) -> &Mpi {
        &self.mpi
    }
}

/// What the in-place NCCL op does to a tensor's storage.
enum Op {
    /// `ncclAllReduce` with sum (`f32` only: the gradient bucket).
    SumF32,
    /// `ncclBroadcast` from a root rank (any dtype candle and NCCL share).
    Broadcast(i32),
}

/// An NCCL collective applied in place to a contiguous CUDA tensor (the span its layout
/// covers in the storage, start offset included).
struct InPlace<'a> {
    comm: &'a Comm,
    op: Op,
}

fn msg(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {e:?}"))
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-in-place"
    }

    fn cpu_fwd(&self, _storage: &mut CpuStorage, _layout: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL collectives need a contiguous tensor")
        };
        macro_rules! broadcast {
            ($t:ty, $root:expr) => {{
                let slice = storage.as_cuda_slice_mut::<$t>()?;
                let mut view = slice.slice_mut(start..end);
                self.comm
                    .broadcast_in_place(&mut view, $root)
                    .map_err(msg)?;
            }};
        }
        match self.op {
            Op::SumF32 => {
                let slice = storage.as_cuda_slice_mut::<f32>()?;
                let mut view = slice.slice_mut(start..end);
                self.comm
                    .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                    .map_err(msg)?;
            }
            Op::Broadcast(root) => match storage.dtype() {
                DType::F32 => broadcast!(f32, root),
                DType::F64 => broadcast!(f64, root),
                DType::BF16 => broadcast!(half::bf16, root),
                DType::F16 => broadcast!(half::f16, root),
                DType::U32 => broadcast!(u32, root),
                DType::U8 => broadcast!(u8, root),
                DType::I64 => broadcast!(i64, root),
                dt => candle_core::bail!("NCCL broadcast of a {dt:?} tensor"),
            },
        }
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn world(&self) -> usize {
        self.mpi.world()
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.mpi.all_reduce_sum_f32(buf)
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.mpi.broadcast_bytes(buf, root)
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.mpi.all_gather_bytes(local)
    }

    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }

    fn bucket_elems(&self) -> usize {
        self.mpi.bucket_elems()
    }

    /// On the GPU: each bucket is one `f32` tensor (the vars' gradients, zeros where a rank
    /// has none, then one presence flag per var), summed in place by `ncclAllReduce` and cut
    /// back into gradients. Vars not on a CUDA device go through MPI.
    ///
    /// Unlike the other collectives this runs with one rank too (NCCL's sum over one rank is
    /// the identity), so that a machine with a single GPU can exercise the device path.
    fn all_reduce_gradients(&self, vars: &[Var], grads: &mut GradStore) -> Result<()> {
        if !vars.iter().all(|v| v.device().is_cuda()) {
            return host::all_reduce_gradients(self, vars, grads);
        }
        for range in buckets(vars, self.bucket_elems().max(1)) {
            let vars = &vars[range];
            let n: usize = vars.iter().map(|v| v.elem_count()).sum();
            let mut parts = Vec::with_capacity(vars.len() + 1);
            let mut flags = Vec::with_capacity(vars.len());
            for v in vars {
                match grads.get(v.as_tensor()) {
                    Some(g) => {
                        if g.dims() != v.dims() {
                            return Err(Error::ShapeMismatch {
                                what: "gradient",
                                expected: v.dims().to_vec(),
                                got: g.dims().to_vec(),
                            });
                        }
                        parts.push(g.flatten_all()?.to_dtype(DType::F32)?);
                        flags.push(1f32);
                    }
                    None => {
                        parts.push(Tensor::zeros(v.elem_count(), DType::F32, v.device())?);
                        flags.push(0.0);
                    }
                }
            }
            parts.push(Tensor::from_vec(flags, vars.len(), vars[0].device())?);
            // Two parts at least: `cat` writes a fresh, contiguous buffer.
            let bucket = Tensor::cat(&parts, 0)?;
            bucket.inplace_op1(&InPlace {
                comm: &self.comm,
                op: Op::SumF32,
            })?;
            let flags = bucket.narrow(0, n, vars.len())?.to_vec1::<f32>()?;
            let mut off = 0;
            for (v, flag) in vars.iter().zip(flags) {
                let k = v.elem_count();
                if flag > 0.0 {
                    let g = bucket
                        .narrow(0, off, k)?
                        .reshape(v.dims())?
                        .to_dtype(v.dtype())?;
                    grads.insert(v.as_tensor(), g);
                } else {
                    grads.remove(v.as_tensor());
                }
                off += k;
            }
        }
        Ok(())
    }

    /// On the GPU, var by var, in place (`ncclBroadcast`); vars not on a CUDA device or not
    /// contiguous go through MPI. Runs with one rank too, as the gradient all-reduce does.
    fn broadcast_vars(&self, vars: &[Var], root: usize) -> Result<()> {
        check_root(root, self.world())?;
        if !vars
            .iter()
            .all(|v| v.device().is_cuda() && v.as_tensor().is_contiguous())
        {
            return host::broadcast_vars(self, vars, root);
        }
        self.check_same(
            "the policy's variables (shapes and dtypes)",
            &layout_bytes(vars),
        )?;
        for v in vars {
            v.as_tensor().inplace_op1(&InPlace {
                comm: &self.comm,
                op: Op::Broadcast(root as i32),
            })?;
        }
        Ok(())
    }
}
