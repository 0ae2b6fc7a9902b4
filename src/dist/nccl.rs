//! NCCL for the engine's reducer (`super::Ranks`), when the ranks' tensors live on CUDA devices
//! (the `cuda` feature): the gradients are summed on the GPUs, bucket by bucket, with
//! `ncclAllReduce` on the device's stream (cudarc's binding, the library loaded at run time as
//! candle's CUDA libraries are). MPI still starts the ranks, hands rank 0's NCCL id to the others,
//! and sums the few numbers of a step (unit counts, losses, checksums) on the host.

use super::mpi::Mpi;
use crate::model::{Grads, ParamStore};
use anyhow::{Context, Result};
use candle_core::{CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

/// A communicator over every rank, on this rank's device stream.
pub struct Nccl {
    comm: Comm,
}

impl Nccl {
    pub fn new(mpi: &Mpi, dev: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = dev else {
            anyhow::bail!("NCCL needs a CUDA device, not {dev:?}");
        };
        // cudarc loads libnccl on first use and panics when it is missing.
        std::panic::catch_unwind(|| {
            let _ = cudarc::nccl::result::get_nccl_version();
        })
        .map_err(|_| {
            anyhow::anyhow!(
                "NCCL's library (libnccl.so.2) cannot be loaded: install it \
                 (scripts/setup_cuda.sh) and put it on LD_LIBRARY_PATH"
            )
        })?;
        let mut bytes = [0u8; 128];
        if mpi.rank == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        mpi.broadcast(&mut bytes, 0)
            .context("sending the NCCL id")?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), mpi.rank, mpi.size, id)
            .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {}): {e:?}", mpi.rank))?;
        Ok(Self { comm })
    }
}

/// Sums a contiguous f32 CUDA tensor over the ranks, in place.
struct AllReduce<'a>(&'a Comm);

impl InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL reduces CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        if l.start_offset() != 0 || !l.is_contiguous() {
            candle_core::bail!("NCCL all-reduce: expected a whole contiguous buffer");
        }
        let slice = s.as_cuda_slice_mut::<f32>()?;
        self.0
            .all_reduce_in_place(slice, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok(())
    }
}

impl Nccl {
    /// Sums every trainable parameter's gradient over the ranks, `bucket` numbers per call
    /// (a missing gradient counts as zeros), as `super::all_reduce_grads` does on the host.
    pub fn all_reduce_grads(&self, store: &ParamStore, g: &mut Grads, bucket: usize) -> Result<()> {
        let params = store.params();
        for b in super::buckets(store, bucket) {
            // One flat buffer on the device per bucket.
            let parts = b
                .iter()
                .map(|&i| {
                    let p = &params[i].var;
                    match g.0[i].take() {
                        Some(t) => Ok(t.flatten_all()?.to_dtype(DType::F32)?),
                        None => Tensor::zeros(p.elem_count(), DType::F32, p.device()),
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = Tensor::cat(&parts, 0)?;
            flat.inplace_op1(&AllReduce(&self.comm))?;
            let mut off = 0;
            for &i in &b {
                let p = &params[i].var;
                let k = p.elem_count();
                g.0[i] = Some(
                    flat.narrow(0, off, k)?
                        .reshape(p.shape())?
                        .to_dtype(p.dtype())?,
                );
                off += k;
            }
        }
        if let Some(p) = params.first() {
            p.var.device().synchronize()?;
        }
        Ok(())
    }
}
