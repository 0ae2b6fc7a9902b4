//! The attention tiles: per (batch, head) and block of `BQ` queries, GEMMs against only the
//! keys the block can see, over strided views of q, k and v (see `super` for the formulas).

use super::Spec;
use crate::kernels::{uninit, vmath};
use candle_core::{bail, CpuStorage, Layout, Result};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::sync::Arc;

/// Queries per tile: the scratch is BQ × S floats per task.
pub(super) const BQ: usize = 64;

/// A strided (B, N, H, D) view with unit last stride.
#[derive(Clone, Copy)]
pub(super) struct View {
    pub(super) off: usize,
    pub(super) sb: usize,
    pub(super) sn: usize,
    pub(super) sh: usize,
    pub(super) dims: (usize, usize, usize, usize),
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

pub(super) fn f32s(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("fused attention: expected f32 storage"),
    }
}

/// The three inputs of either attention op, checked against each other and the spec.
#[derive(Clone, Copy)]
pub(super) struct Inputs<'a> {
    pub(super) qv: View,
    pub(super) kv: View,
    pub(super) vv: View,
    pub(super) q: &'a [f32],
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
}

impl<'a> Inputs<'a> {
    pub(super) fn of(
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

/// For packed sequences, per (batch row, query): keys `shared..lo` are hidden (no attention
/// across packed examples; a completion packed after its prompt and its siblings sees the prompt,
/// `0..shared`, and itself, from `lo`).
#[derive(Clone, Debug)]
pub struct Segs {
    pub lo: Arc<Vec<u32>>,
    /// Per query, the keys before its segment it still sees (0 when None).
    pub shared: Option<Arc<Vec<u32>>>,
}

pub(super) type Starts = Option<Segs>;

/// (shared, lo) of query i of row bi.
pub(super) fn seg_lo(starts: &Starts, bi: usize, t: usize, i: usize) -> (usize, usize) {
    starts.as_ref().map_or((0, 0), |s| {
        let j = bi * t + i;
        (
            s.shared.as_ref().map_or(0, |v| v[j] as usize),
            s.lo[j] as usize,
        )
    })
}

pub(super) fn check(q: &View, k: &View, v: &View, spec: &Spec) -> Result<()> {
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
pub(super) fn forward(inp: &Inputs, spec: Spec, starts: &Starts) -> (Vec<f32>, Vec<f32>) {
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
    // SAFETY: every row of both is written by exactly one task below.
    let mut out = unsafe { uninit(b * t * h * d) };
    // SAFETY: as `out`.
    let mut lse = unsafe { uninit(b * h * t) };
    let (po, pl) = (Ptr(out.as_mut_ptr()), Ptr(lse.as_mut_ptr()));
    let nblk = t.div_ceil(BQ);
    (0..b * h * nblk).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / nblk, task % nblk);
        let (bi, hi) = (bh / h, bh % h);
        let (i0, i1) = (blk * BQ, ((blk + 1) * BQ).min(t));
        let rows = i1 - i0;
        let kend = (spec.prefix + spec.past + i1).min(s);
        // SAFETY: written whole by the first product before the softmax reads it.
        let mut sc = unsafe { uninit(rows * kend) };
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
pub(super) struct GradViews {
    dq: View,
    dk: View,
    dv: View,
    pub(super) len: usize,
}

impl GradViews {
    /// dq, dk, dv one after the other, each contiguous.
    pub(super) fn separate(q: &View, k: &View) -> Self {
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
    pub(super) fn fused((b, t, h, d): (usize, usize, usize, usize)) -> Self {
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

pub(super) fn elems((b, n, h, d): (usize, usize, usize, usize)) -> usize {
    b * n * h * d
}

/// The backward over checked views: `o` and `go` are the output and its gradient, contiguous
/// (B, T, H, D); returns the buffer `gv` describes.
pub(super) fn backward(
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
    // dQ is written whole by its blocks; the rows of dK and dV, accumulated over the query
    // blocks and heads, are zeroed by the task that owns them (in parallel, not by a serial
    // calloc over the whole buffer).
    // SAFETY: dQ rows written by their blocks, dK/dV rows zeroed first, as said above.
    let mut flat = unsafe { uninit(gv.len) };
    let base = Ptr(flat.as_mut_ptr());
    let nblk = t.div_ceil(BQ);
    // One task per (batch, kv head): dK and dV of that head are accumulated by its query
    // heads only, so tasks never write the same memory.
    (0..b * hkv).into_par_iter().for_each(|task| {
        let (bi, kh) = (task / hkv, task % hkv);
        let kp = k[kv.at(bi, 0, kh)..].as_ptr();
        let vp = v[vv.at(bi, 0, kh)..].as_ptr();
        // SAFETY: scratch; the rows × kend of each block are written by its products
        // (accumulate = false) before being read.
        let mut p = unsafe { uninit(BQ * s) };
        // SAFETY: as `p`.
        let mut ds = unsafe { uninit(BQ * s) };
        // SAFETY: offsets follow the checked shapes; the regions written (dq rows of this
        // task's heads, dk/dv rows of its kv head) belong to this task alone.
        unsafe {
            let dk = base.get().add(gv.dk.at(bi, 0, kh));
            let dv = base.get().add(gv.dv.at(bi, 0, kh));
            for n in 0..s {
                std::ptr::write_bytes(dk.add(n * gv.dk.sn), 0, d);
                std::ptr::write_bytes(dv.add(n * gv.dv.sn), 0, d);
            }
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
