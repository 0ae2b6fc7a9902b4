//! Causal attention as one op with a backward, flash-attention style (Dao et al. 2022) but
//! tiled for a CPU: per (batch, head) and block of `BQ` queries, the scores against only the
//! keys that block can see are formed with GEMM into a per-task scratch of BQ×S floats, masked,
//! soft-maxed in place and multiplied by V. Nothing of size T×T is kept: the backward recomputes
//! the probabilities from the saved log-sum-exp, as flash attention does.
//!
//!   forward:  P = softmax(scale·QKᵀ + mask),  O = P·V,  lse_i = log Σ_j exp(scale·q_i·k_j)
//!   backward: dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),
//!             dQ = scale·dS·K,  dK = scale·dSᵀ·Q
//!
//! Layouts are (B, T, H, D) for queries/outputs and (B, S, H_kv, D) for keys/values, any
//! strides with a unit last stride, so the projections' outputs are used without transposes
//! or copies. Keys are `prefix` always-visible slots (prefix tuning) followed by positions
//! 0..past+T; grouped-query heads share their key/value head. The composite reference is
//! `model::attention`'s `composite` (masked softmax of explicit scores).

mod tiles;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};
pub use tiles::Segs;
use tiles::{backward, check, f32s, forward, GradViews, Inputs, Starts, View};

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub scale: f32,
    /// Always-visible key slots before position 0.
    pub prefix: usize,
    /// Position of the first query (keys/values of earlier positions come from a cache).
    pub past: usize,
    /// Sliding window: a query sees keys at most `w - 1` positions back.
    pub window: Option<usize>,
}

impl Spec {
    /// The masking rule, element by element (`mask_row` is checked against it).
    #[cfg(test)]
    fn visible(&self, j: usize, qpos: usize) -> bool {
        if j < self.prefix {
            return true;
        }
        let kp = j - self.prefix;
        kp <= qpos && self.window.is_none_or(|w| qpos - kp < w)
    }

    /// Writes `fill` over the keys of `row` that query position `qpos` must not see: the same
    /// set as `!visible`, as ranges (before the window, after the query). `(shared, lo)` of a
    /// packed segment hides positions `shared..lo` too.
    #[inline]
    fn mask_row(&self, row: &mut [f32], qpos: usize, (shared, lo): (usize, usize), fill: f32) {
        let n = row.len();
        let p = self.prefix;
        let wlo = self.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
        row[p.min(n)..(p + wlo).min(n)].fill(fill);
        if lo > shared {
            row[(p + shared).min(n)..(p + lo).min(n)].fill(fill);
        }
        row[(p + qpos + 1).min(n)..].fill(fill);
    }
}

struct Fwd {
    spec: Spec,
    starts: Starts,
    /// Log-sum-exp per (b, h, t), written by the forward, read by the backward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

fn take_lse(lse: &Mutex<Option<Arc<Vec<f32>>>>) -> Result<Arc<Vec<f32>>> {
    let lse = lse
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?
        .clone();
    lse.ok_or_else(|| candle_core::Error::Msg("fused attention: backward before forward".into()))
}

fn keep_lse(slot: &Mutex<Option<Arc<Vec<f32>>>>, lse: Vec<f32>) -> Result<()> {
    *slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))? = Some(Arc::new(lse));
    Ok(())
}

impl CustomOp3 for Fwd {
    fn name(&self) -> &'static str {
        "lmforge-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inp = Inputs::of(sq, lq, sk, lk, sv, lv, &self.spec)?;
        let (out, lse) = forward(&inp, self.spec, &self.starts);
        keep_lse(&self.lse, lse)?;
        Ok((CpuStorage::F32(out), Shape::from(inp.qv.dims)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.saved(out, grad)?;
        let flat = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = flat.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = flat.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = flat.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl Fwd {
    /// What the backward op needs: the forward's log-sum-exp, its output and the output's
    /// gradient.
    fn saved(&self, out: &Tensor, grad: &Tensor) -> Result<Saved> {
        Ok(Saved {
            spec: self.spec,
            starts: self.starts.clone(),
            lse: take_lse(&self.lse)?,
            out: out.contiguous()?,
            grad: grad.contiguous()?,
        })
    }
}

/// The saved output and its gradient, contiguous, for the backward ops.
struct Saved {
    spec: Spec,
    starts: Starts,
    lse: Arc<Vec<f32>>,
    out: Tensor,
    grad: Tensor,
}

impl Saved {
    fn run(&self, inp: &Inputs, gv: &GradViews) -> Result<Vec<f32>> {
        super::with_slice(&self.out, |o| {
            super::with_slice(&self.grad, |go| {
                backward(inp, self.spec, &self.starts, &self.lse, o, go, gv)
            })
        })
    }
}

impl CustomOp3 for Saved {
    fn name(&self) -> &'static str {
        "lmforge-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inp = Inputs::of(sq, lq, sk, lk, sv, lv, &self.spec)?;
        let gv = GradViews::separate(&inp.qv, &inp.kv);
        let flat = self.run(&inp, &gv)?;
        Ok((CpuStorage::F32(flat), Shape::from(gv.len)))
    }
}

// ---------------------------------------------------------------- fused qkv

// `Fwd` as a CustomOp1 reads q, k and v straight out of one (B, T, 3, H, D) projection (GPT-2's
// `c_attn`) and `Saved` writes the gradient back in that layout: splitting the projection with
// three `narrow`s would cost, per layer, three zero-padded copies of the whole projection and
// two adds in candle's backward.

/// The q, k and v views of a (B, T, 3, H, D) tensor with unit last stride.
fn qkv_inputs<'a>(s: &'a CpuStorage, l: &Layout, spec: &Spec) -> Result<Inputs<'a>> {
    let dims = l.shape().dims();
    let st = l.stride();
    if dims.len() != 5 || dims[2] != 3 || (st[4] != 1 && dims[4] > 1) {
        bail!("fused attention: qkv must be (B, T, 3, H, D) with unit last stride, got {dims:?}");
    }
    let part = |i: usize| View {
        off: l.start_offset() + i * st[2],
        sb: st[0],
        sn: st[1],
        sh: st[3],
        dims: (dims[0], dims[1], dims[3], dims[4]),
    };
    let (qv, kv, vv) = (part(0), part(1), part(2));
    check(&qv, &kv, &vv, spec)?;
    let x = f32s(s)?;
    Ok(Inputs {
        qv,
        kv,
        vv,
        q: x,
        k: x,
        v: x,
    })
}

impl CustomOp1 for Fwd {
    fn name(&self) -> &'static str {
        "lmforge-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let inp = qkv_inputs(s, l, &self.spec)?;
        let (out, lse) = forward(&inp, self.spec, &self.starts);
        keep_lse(&self.lse, lse)?;
        Ok((CpuStorage::F32(out), Shape::from(inp.qv.dims)))
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = self.saved(out, grad)?;
        Ok(Some(qkv.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for Saved {
    fn name(&self) -> &'static str {
        "lmforge-attention-qkv-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let inp = qkv_inputs(s, l, &self.spec)?;
        let gv = GradViews::fused(inp.qv.dims);
        let flat = self.run(&inp, &gv)?;
        Ok((CpuStorage::F32(flat), l.shape().clone()))
    }
}

/// Fused attention on a (B, T, 3, H, D) projection (query, key and value heads alike; no KV
/// cache or prefix, whose keys are not part of the projection): returns (B, T, H, D).
pub fn attention_qkv(qkv: &Tensor, spec: Spec, starts: Option<Segs>) -> Result<Tensor> {
    if spec.past != 0 || spec.prefix != 0 {
        bail!("fused attention: a fused qkv projection takes no cache or prefix keys");
    }
    if let Some(st) = &starts {
        if st.lo.len() != qkv.dim(0)? * qkv.dim(1)? {
            bail!("fused attention: packed segments need one start per query");
        }
    }
    let unit = qkv.rank() == 5 && (qkv.dim(4)? <= 1 || qkv.stride()[4] == 1);
    let qkv = if unit { qkv.clone() } else { qkv.contiguous()? };
    qkv.apply_op1(Fwd {
        spec,
        starts,
        lse: Mutex::new(None),
    })
}

/// Fused attention: q (B, T, H, D), k and v (B, S, H_kv, D), f32 on the CPU, any strides with
/// a unit last stride. Returns (B, T, H, D), contiguous.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, spec: Spec) -> Result<Tensor> {
    attention_packed(q, k, v, spec, None)
}

/// `attention` over packed rows: `starts[b·T + i]` is the key position where query i's example
/// begins in row b (with a KV cache, left-padded rows: where the row's sequence begins).
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: Spec,
    starts: Option<Segs>,
) -> Result<Tensor> {
    if let Some(st) = &starts {
        let (b, t) = (q.dim(0)?, q.dim(1)?);
        if st.lo.len() != b * t || st.shared.as_ref().is_some_and(|v| v.len() != b * t) {
            bail!("fused attention: packed segments need one start per query");
        }
    }
    let unit = |t: &Tensor| t.dim(3).map(|d| d <= 1 || t.stride()[3] == 1);
    let q = if unit(q)? { q.clone() } else { q.contiguous()? };
    let k = if unit(k)? { k.clone() } else { k.contiguous()? };
    let v = if unit(v)? { v.clone() } else { v.contiguous()? };
    q.apply_op3(
        &k,
        &v,
        Fwd {
            spec,
            starts,
            lse: Mutex::new(None),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::Spec;

    #[test]
    fn mask_row_hides_exactly_the_invisible_keys() {
        for prefix in [0, 3] {
            for past in [0, 5] {
                for window in [None, Some(1), Some(4)] {
                    let spec = Spec {
                        scale: 1.0,
                        prefix,
                        past,
                        window,
                    };
                    for n in 0..prefix + past + 12 {
                        for qpos in 0..past + 12 {
                            for seg in [(0, 0), (0, 2), (0, qpos), (2, 5), (3, qpos), (4, 1)] {
                                let mut row = vec![1f32; n];
                                spec.mask_row(&mut row, qpos, seg, 0.0);
                                for (j, v) in row.iter().enumerate() {
                                    let in_seg =
                                        j < prefix || j - prefix < seg.0 || j - prefix >= seg.1;
                                    assert_eq!(
                                        *v == 1.0,
                                        spec.visible(j, qpos) && in_seg,
                                        "{prefix} {past} {window:?} {n} {qpos} {seg:?} {j}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
