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
//! `model::decoder`'s attention (masked softmax of explicit scores).

use super::vmath;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Queries per tile: the scratch is BQ × S floats per task.
const BQ: usize = 64;

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
    /// set as `!visible`, as two ranges (before the window, after the query). `seg_lo` hides
    /// positions before the query's packed segment too.
    #[inline]
    fn mask_row(&self, row: &mut [f32], qpos: usize, seg_lo: usize, fill: f32) {
        let n = row.len();
        let lo = self
            .window
            .map_or(0, |w| (qpos + 1).saturating_sub(w))
            .max(seg_lo);
        row[self.prefix.min(n)..(self.prefix + lo).min(n)].fill(fill);
        row[(self.prefix + qpos + 1).min(n)..].fill(fill);
    }
}

/// A strided (B, N, H, D) view with unit last stride.
#[derive(Clone, Copy)]
struct View {
    off: usize,
    sb: usize,
    sn: usize,
    sh: usize,
    dims: (usize, usize, usize, usize),
}

impl View {
    fn of(l: &Layout, what: &str) -> Result<Self> {
        let dims = l.shape().dims4()?;
        let st = l.stride();
        if st[3] != 1 && dims.3 > 1 {
            bail!("fused attention: {what} must have a unit stride in its last dimension");
        }
        Ok(Self {
            off: l.start_offset(),
            sb: st[0],
            sn: st[1],
            sh: st[2],
            dims,
        })
    }
    #[inline]
    fn at(&self, b: usize, n: usize, h: usize) -> usize {
        self.off + b * self.sb + n * self.sn + h * self.sh
    }
}

fn f32s(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("fused attention: expected f32 storage"),
    }
}

/// The three inputs of either attention op, checked against each other and the spec.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    qv: View,
    kv: View,
    vv: View,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

impl<'a> Inputs<'a> {
    fn of(
        sq: &'a CpuStorage,
        lq: &Layout,
        sk: &'a CpuStorage,
        lk: &Layout,
        sv: &'a CpuStorage,
        lv: &Layout,
        spec: &Spec,
    ) -> Result<Self> {
        let (qv, kv, vv) = (View::of(lq, "q")?, View::of(lk, "k")?, View::of(lv, "v")?);
        check(&qv, &kv, &vv, spec)?;
        Ok(Self {
            qv,
            kv,
            vv,
            q: f32s(sq)?,
            k: f32s(sk)?,
            v: f32s(sv)?,
        })
    }
}

/// Raw pointer that may cross into rayon tasks; every task writes a disjoint region.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    /// A method (not the field) so closures capture the whole `Send` wrapper.
    #[inline]
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// dst(m×n) = beta·lhs(m×k)·rhs(k×n) [+ dst when `acc`], row/column strides in elements.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (d_rs, d_cs): (usize, usize),
    acc: bool,
    lhs: *const f32,
    (l_rs, l_cs): (usize, usize),
    rhs: *const f32,
    (r_rs, r_cs): (usize, usize),
    beta: f32,
) {
    gemm(
        m,
        n,
        k,
        dst,
        d_cs as isize,
        d_rs as isize,
        acc,
        lhs,
        l_cs as isize,
        l_rs as isize,
        rhs,
        r_cs as isize,
        r_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// For packed sequences: per (batch row, query position) the position where the query's
/// segment starts; keys before it are hidden (no attention across packed examples).
type Starts = Option<Arc<Vec<u32>>>;

fn seg_lo(starts: &Starts, bi: usize, t: usize, i: usize) -> usize {
    starts.as_ref().map_or(0, |s| s[bi * t + i] as usize)
}

struct Fwd {
    spec: Spec,
    starts: Starts,
    /// Log-sum-exp per (b, h, t), written by the forward, read by the backward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

fn check(q: &View, k: &View, v: &View, spec: &Spec) -> Result<()> {
    let (b, t, h, d) = q.dims;
    let (kb, s, hkv, kd) = k.dims;
    if (kb, kd) != (b, d) || k.dims != v.dims {
        bail!(
            "fused attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims,
            k.dims,
            v.dims
        );
    }
    if hkv == 0 || !h.is_multiple_of(hkv) {
        bail!("fused attention: {h} query heads are not a multiple of {hkv} key/value heads");
    }
    if s != spec.prefix + spec.past + t {
        bail!(
            "fused attention: {s} keys, expected prefix {} + past {} + {t}",
            spec.prefix,
            spec.past
        );
    }
    Ok(())
}

/// The forward over checked views: the output (B, T, H, D), contiguous, and the log-sum-exp
/// per (b, h, t).
fn forward(inp: &Inputs, spec: Spec, starts: &Starts) -> (Vec<f32>, Vec<f32>) {
    let Inputs {
        qv,
        kv,
        vv,
        q,
        k,
        v,
    } = *inp;
    let (b, t, h, d) = qv.dims;
    let (_, s, hkv, _) = kv.dims;
    let rep = h / hkv;
    let mut out = vec![0f32; b * t * h * d];
    let mut lse = vec![0f32; b * h * t];
    let (po, pl) = (Ptr(out.as_mut_ptr()), Ptr(lse.as_mut_ptr()));
    let nblk = t.div_ceil(BQ);
    (0..b * h * nblk).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / nblk, task % nblk);
        let (bi, hi) = (bh / h, bh % h);
        let (i0, i1) = (blk * BQ, ((blk + 1) * BQ).min(t));
        let rows = i1 - i0;
        let kend = (spec.prefix + spec.past + i1).min(s);
        let mut sc = vec![0f32; rows * kend];
        let qp = q[qv.at(bi, i0, hi)..].as_ptr();
        let kp = k[kv.at(bi, 0, hi / rep)..].as_ptr();
        let vp = v[vv.at(bi, 0, hi / rep)..].as_ptr();
        // SAFETY: the views were checked against the shapes; each task writes its own rows
        // of `out` and `lse`.
        unsafe {
            // S = scale · Q_blk · K[..kend]ᵀ
            mm(
                (rows, kend, d),
                sc.as_mut_ptr(),
                (kend, 1),
                false,
                qp,
                (qv.sn, 1),
                kp,
                (1, kv.sn),
                spec.scale,
            );
            for r in 0..rows {
                let qpos = spec.past + i0 + r;
                let row = &mut sc[r * kend..(r + 1) * kend];
                let lo = seg_lo(starts, bi, t, i0 + r);
                spec.mask_row(row, qpos, lo, f32::NEG_INFINITY);
                let m = vmath::max(row);
                let sum = vmath::exp_shift_sum(row, m);
                let inv = 1.0 / sum;
                for x in row.iter_mut() {
                    *x *= inv;
                }
                *pl.get().add((bi * h + hi) * t + i0 + r) = m + sum.ln();
            }
            // O_blk = P · V[..kend], written as rows of the (B, T, H, D) output.
            let op = po.get().add(((bi * t + i0) * h + hi) * d);
            mm(
                (rows, d, kend),
                op,
                (h * d, 1),
                false,
                sc.as_ptr(),
                (kend, 1),
                vp,
                (vv.sn, 1),
                1.0,
            );
        }
    });
    (out, lse)
}

/// Where the backward writes dQ, dK and dV: views into one zero-initialised buffer, shaped
/// like q, k and v.
struct GradViews {
    dq: View,
    dk: View,
    dv: View,
    len: usize,
}

impl GradViews {
    /// dq, dk, dv one after the other, each contiguous.
    fn separate(q: &View, k: &View) -> Self {
        let dense = |off: usize, (b, n, h, d): (usize, usize, usize, usize)| View {
            off,
            sb: n * h * d,
            sn: h * d,
            sh: d,
            dims: (b, n, h, d),
        };
        let (nq, nk) = (elems(q.dims), elems(k.dims));
        Self {
            dq: dense(0, q.dims),
            dk: dense(nq, k.dims),
            dv: dense(nq + nk, k.dims),
            len: nq + 2 * nk,
        }
    }

    /// One contiguous (B, T, 3, H, D) gradient, the layout of a fused qkv projection.
    fn fused((b, t, h, d): (usize, usize, usize, usize)) -> Self {
        let at = |part: usize| View {
            off: part * h * d,
            sb: t * 3 * h * d,
            sn: 3 * h * d,
            sh: d,
            dims: (b, t, h, d),
        };
        Self {
            dq: at(0),
            dk: at(1),
            dv: at(2),
            len: b * t * 3 * h * d,
        }
    }
}

fn elems((b, n, h, d): (usize, usize, usize, usize)) -> usize {
    b * n * h * d
}

/// The backward over checked views: `o` and `go` are the output and its gradient, contiguous
/// (B, T, H, D); returns the buffer `gv` describes.
fn backward(
    inp: &Inputs,
    spec: Spec,
    starts: &Starts,
    lse: &[f32],
    o: &[f32],
    go: &[f32],
    gv: &GradViews,
) -> Result<Vec<f32>> {
    let Inputs {
        qv,
        kv,
        vv,
        q,
        k,
        v,
    } = *inp;
    let (b, t, h, d) = qv.dims;
    let (_, s, hkv, _) = kv.dims;
    let rep = h / hkv;
    if o.len() < b * t * h * d || go.len() < b * t * h * d || lse.len() != b * h * t {
        bail!("fused attention: saved tensors do not match the inputs");
    }
    let mut flat = vec![0f32; gv.len];
    let base = Ptr(flat.as_mut_ptr());
    let nblk = t.div_ceil(BQ);
    // One task per (batch, kv head): dK and dV of that head are accumulated by its query
    // heads only, so tasks never write the same memory.
    (0..b * hkv).into_par_iter().for_each(|task| {
        let (bi, kh) = (task / hkv, task % hkv);
        let kp = k[kv.at(bi, 0, kh)..].as_ptr();
        let vp = v[vv.at(bi, 0, kh)..].as_ptr();
        let mut p = vec![0f32; BQ * s];
        let mut ds = vec![0f32; BQ * s];
        // SAFETY: offsets follow the checked shapes; the regions written (dq rows of this
        // task's heads, dk/dv rows of its kv head) belong to this task alone.
        unsafe {
            let dk = base.get().add(gv.dk.at(bi, 0, kh));
            let dv = base.get().add(gv.dv.at(bi, 0, kh));
            for hi in kh * rep..(kh + 1) * rep {
                for blk in 0..nblk {
                    let (i0, i1) = (blk * BQ, ((blk + 1) * BQ).min(t));
                    let rows = i1 - i0;
                    let kend = (spec.prefix + spec.past + i1).min(s);
                    let qp = q[qv.at(bi, i0, hi)..].as_ptr();
                    let row0 = (bi * t + i0) * h + hi; // first (b, t, h) row of this block
                    let gp = go[row0 * d..].as_ptr();
                    // P = exp(scale·QKᵀ − lse), zero where masked.
                    mm(
                        (rows, kend, d),
                        p.as_mut_ptr(),
                        (kend, 1),
                        false,
                        qp,
                        (qv.sn, 1),
                        kp,
                        (1, kv.sn),
                        spec.scale,
                    );
                    // dP = dO · Vᵀ
                    mm(
                        (rows, kend, d),
                        ds.as_mut_ptr(),
                        (kend, 1),
                        false,
                        gp,
                        (h * d, 1),
                        vp,
                        (1, vv.sn),
                        1.0,
                    );
                    for r in 0..rows {
                        let qpos = spec.past + i0 + r;
                        let l = lse[(bi * h + hi) * t + i0 + r];
                        let orow = &o[(row0 + r * h) * d..(row0 + r * h) * d + d];
                        let grow = &go[(row0 + r * h) * d..(row0 + r * h) * d + d];
                        let di: f32 = orow.iter().zip(grow).map(|(a, b)| a * b).sum();
                        let pr = &mut p[r * kend..(r + 1) * kend];
                        let dr = &mut ds[r * kend..(r + 1) * kend];
                        // Masked scores become −∞, so e^(p − lse) = 0 and their dS is 0.
                        let lo = seg_lo(starts, bi, t, i0 + r);
                        spec.mask_row(pr, qpos, lo, f32::NEG_INFINITY);
                        vmath::softmax_grad(pr, dr, l, di);
                    }
                    // dQ_blk = scale · dS · K
                    mm(
                        (rows, d, kend),
                        base.get().add(gv.dq.at(bi, i0, hi)),
                        (gv.dq.sn, 1),
                        false,
                        ds.as_ptr(),
                        (kend, 1),
                        kp,
                        (kv.sn, 1),
                        spec.scale,
                    );
                    // dK += scale · dSᵀ · Q_blk,  dV += Pᵀ · dO_blk
                    mm(
                        (kend, d, rows),
                        dk,
                        (gv.dk.sn, 1),
                        true,
                        ds.as_ptr(),
                        (1, kend),
                        qp,
                        (qv.sn, 1),
                        spec.scale,
                    );
                    mm(
                        (kend, d, rows),
                        dv,
                        (gv.dv.sn, 1),
                        true,
                        p.as_ptr(),
                        (1, kend),
                        gp,
                        (h * d, 1),
                        1.0,
                    );
                }
            }
        }
    });
    Ok(flat)
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
        let op = Saved {
            spec: self.spec,
            starts: self.starts.clone(),
            lse: take_lse(&self.lse)?,
            out: out.contiguous()?,
            grad: grad.contiguous()?,
        };
        let flat = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = flat.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = flat.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = flat.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
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
        let op = Saved {
            spec: self.spec,
            starts: self.starts.clone(),
            lse: take_lse(&self.lse)?,
            out: out.contiguous()?,
            grad: grad.contiguous()?,
        };
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
pub fn attention_qkv(qkv: &Tensor, spec: Spec, starts: Option<Arc<Vec<u32>>>) -> Result<Tensor> {
    if spec.past != 0 || spec.prefix != 0 {
        bail!("fused attention: a fused qkv projection takes no cache or prefix keys");
    }
    if let Some(st) = &starts {
        if st.len() != qkv.dim(0)? * qkv.dim(1)? {
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

/// `attention` over packed rows: `starts[b·T + i]` is where query i's example begins in row b
/// (positions without a KV cache, `past = 0`).
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: Spec,
    starts: Option<Arc<Vec<u32>>>,
) -> Result<Tensor> {
    if let Some(st) = &starts {
        let (b, t) = (q.dim(0)?, q.dim(1)?);
        if spec.past != 0 || st.len() != b * t {
            bail!("fused attention: packed segments need past = 0 and one start per query");
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
                            for seg in [0, 2, qpos] {
                                let mut row = vec![1f32; n];
                                spec.mask_row(&mut row, qpos, seg, 0.0);
                                for (j, v) in row.iter().enumerate() {
                                    let in_seg = j < prefix || j - prefix >= seg;
                                    assert_eq!(
                                        *v == 1.0,
                                        spec.visible(j, qpos) && in_seg,
                                        "{prefix} {past} {window:?} {n} {qpos} {seg} {j}"
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
