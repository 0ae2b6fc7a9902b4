//! Losses as pure functions of tensors, shared by every training method.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// log softmax over the last dimension; the max shift is detached (its gradient is zero).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// log p(target) for each position: logits (..., V), targets (...) u32 -> (...).
/// On the CPU in f32 this is one fused op (`kernels::xent`), same values and gradients.
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if crate::kernels::fusable(&[logits]) {
        return Ok(crate::kernels::xent::target_logprobs(logits, targets)?);
    }
    gather_logprobs_composite(logits, targets)
}

/// `gather_logprobs` from candle ops: the reference for the fused kernel and the path off-CPU.
pub fn gather_logprobs_composite(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    let idx = targets.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?;
    Ok(lp.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?)
}

/// Mean token cross-entropy: logits (N, V), targets (N) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(gather_logprobs(logits, targets)?.neg()?.mean_all()?)
}

/// Summed negative log-likelihood of the targets: logits (N, V), targets (N) u32. Methods
/// return sums; the engine divides by the step's total count.
pub fn nll_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(gather_logprobs(logits, targets)?.neg()?.sum_all()?)
}
/// The sum of a tensor's entries as f64, without its graph: for logged statistics.
pub fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.detach()
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

pub mod preference;
pub mod rl;
