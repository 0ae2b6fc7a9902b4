//! The linear map `y = x·Wᵀ` (weight stored (out, in), HF `nn.Linear`) or `y = x·W` (stored
//! (in, out), GPT-2's `Conv1D`) as one op whose backward knows which weights are frozen.
//!
//!   forward:  y = x·Wᵀ + b             (a streaming GEMV when x has ≤ 16 rows, else GEMM)
//!   backward: dx = dy·W,  dW = dyᵀ·x,  db = Σ_rows dy   (each only when its input is trained)
//!
//! candle's own matmul backward always computes both products, so a frozen base weight under
//! LoRA or a reference model would still pay a weight-gradient GEMM per layer (a third of the
//! training FLOPs) only for it to be discarded. Here the backward asks whether W is tracked.
//!
//! Decoding is bound by reading the weights once per token; a blocked GEMM packs panels of W
//! before using them, which for m = 1 doubles the memory traffic (measured: SmolLM2-135M decode
//! at 20 tok/s through candle's matmul, 32 tok/s here). The GEMV reads every weight row once,
//! straight from where it lies, and dots it with all m input rows while it is in L1.

use super::{rows_per_task, slice, sum_partials, uninit, CHUNK};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Largest number of input rows the quantized GEMV (`kernels::qgemv`) takes. It unpacks each
/// weight block once per input row, so its cost grows with the rows while the f32 product's
/// barely does: decoding SmolLM2-135M Q4_1 through `lmforge serve` (2 cores, 2026-12-01),
/// total tokens/s blocks vs f32 at 2 rows 60 vs 47, at 4 rows 61 vs 63 (even), at 8 rows 59 vs
/// 102.
pub const MAX_ROWS: usize = 3;

/// Largest number of input rows the f32 GEMV takes; above it a blocked GEMM wins (it packs the
/// weight panels, a pass over W that only many rows pay back: batched decoding of 32 rows ran
/// 2.4× faster here than through the GEMM).
pub const GEMV_ROWS: usize = 32;

/// How the weight is stored: `torch.nn.Linear` keeps (out, in), GPT-2's `Conv1D` keeps
/// (in, out). Weights stay in the file's orientation, so saving needs no transposes and the
/// products read the transpose through strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    OutIn,
    InOut,
}

struct Op(WeightLayout);

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // 16 independent lanes: the compiler keeps them in vector registers (no reassociation
    // needed), and the remainder is summed scalar.
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for (ca, cb) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        s += x * y;
    }
    s
}

/// Rows `j0..j0 + out.len() / m` of the output, written transposed as out[(j - j0) * m + i].
#[inline(always)]
fn block_generic(x: &[f32], w: &[f32], k: usize, m: usize, j0: usize, out: &mut [f32]) {
    for (jj, o) in out.chunks_mut(m).enumerate() {
        let row = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
        for (i, o) in o.iter_mut().enumerate() {
            *o = dot(&x[i * k..(i + 1) * k], row);
        }
    }
}

/// `block` on AVX2: tiles of 2 input rows × 4 weight rows, eight accumulators in registers, so
/// each weight and input vector loaded feeds two or four FMAs (the plain dot per pair loads two
/// vectors per FMA and runs at half the FMA rate once m grows past a few rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(x: &[f32], w: &[f32], k: usize, m: usize, j0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): rows are clamped to valid indices of x (m rows) and w (the caller's
    // block), every load reads 8 floats below k within a row, stores stay inside `out`.
    unsafe {
        let hsum = |v: __m256| -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        };
        let rows = out.len() / m;
        let k8 = k / 8 * 8;
        let mut jj = 0;
        while jj < rows {
            let nb = (rows - jj).min(4);
            let wr: [*const f32; 4] =
                std::array::from_fn(|b| w.as_ptr().add((j0 + jj + b.min(nb - 1)) * k));
            let mut i = 0;
            while i < m {
                let na = (m - i).min(2);
                let x0 = x.as_ptr().add(i * k);
                let x1 = x.as_ptr().add((i + na - 1) * k);
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < k8 {
                    let a0 = _mm256_loadu_ps(x0.add(c));
                    let a1 = _mm256_loadu_ps(x1.add(c));
                    for b in 0..4 {
                        let wb = _mm256_loadu_ps(wr[b].add(c));
                        acc[b] = _mm256_fmadd_ps(a0, wb, acc[b]);
                        acc[4 + b] = _mm256_fmadd_ps(a1, wb, acc[4 + b]);
                    }
                    c += 8;
                }
                for a in 0..na {
                    let xa = if a == 0 { x0 } else { x1 };
                    for b in 0..nb {
                        let mut s = hsum(acc[4 * a + b]);
                        for t in k8..k {
                            s += *xa.add(t) * *wr[b].add(t);
                        }
                        out[(jj + b) * m + i + a] = s;
                    }
                }
                i += 2;
            }
            jj += 4;
        }
    }
}

/// `block` on AVX-512: tiles of 4 input rows × 4 weight rows (16 accumulators of 16 lanes; 32
/// registers leave room for the loads), the row tails through masked loads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(x: &[f32], w: &[f32], k: usize, m: usize, j0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): as `block_avx2`; masked loads read only indices below k.
    unsafe {
        let rows = out.len() / m;
        let full = k / 16;
        let tail = (k % 16) as u32;
        let mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
        let mut jj = 0;
        while jj < rows {
            let nb = (rows - jj).min(4);
            let wr: [*const f32; 4] =
                std::array::from_fn(|b| w.as_ptr().add((j0 + jj + b.min(nb - 1)) * k));
            let mut i = 0;
            while i < m {
                let na = (m - i).min(4);
                let xr: [*const f32; 4] =
                    std::array::from_fn(|a| x.as_ptr().add((i + a.min(na - 1)) * k));
                let mut acc = [_mm512_setzero_ps(); 16];
                for c in 0..full {
                    let xs: [__m512; 4] =
                        std::array::from_fn(|a| _mm512_loadu_ps(xr[a].add(c * 16)));
                    for b in 0..4 {
                        let wb = _mm512_loadu_ps(wr[b].add(c * 16));
                        for a in 0..4 {
                            acc[4 * a + b] = _mm512_fmadd_ps(xs[a], wb, acc[4 * a + b]);
                        }
                    }
                }
                if tail > 0 {
                    let o = full * 16;
                    let xs: [__m512; 4] =
                        std::array::from_fn(|a| _mm512_maskz_loadu_ps(mask, xr[a].add(o)));
                    for b in 0..4 {
                        let wb = _mm512_maskz_loadu_ps(mask, wr[b].add(o));
                        for a in 0..4 {
                            acc[4 * a + b] = _mm512_fmadd_ps(xs[a], wb, acc[4 * a + b]);
                        }
                    }
                }
                let mut sums = [0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(&acc));
                for a in 0..na {
                    for b in 0..nb {
                        out[(jj + b) * m + i + a] = sums[4 * a + b];
                    }
                }
                i += 4;
            }
            jj += 4;
        }
    }
}

/// The sums of 16 vectors' lanes as one vector (lane j = Σ v[j]): a transposing butterfly of
/// 15 adds, instead of 16 separate horizontal reductions (which at k = 576 cost as much as a
/// third of the products).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Pairs within 128-bit lanes: a[j] holds v[2j]'s partial sums at 0, 2 and v[2j+1]'s at 1, 3.
    let a: [__m512; 8] = std::array::from_fn(|j| {
        let (x, y) = (v[2 * j], v[2 * j + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
    });
    // Quads: b[i], lane L = the lane-L partial sums of v[4i..4i + 4].
    let b: [__m512; 4] = std::array::from_fn(|i| {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(x, y),
            _mm512_shuffle_ps::<0xEE>(x, y),
        )
    });
    // Across the four 128-bit lanes: lane i of the result = the totals of v[4i..4i + 4].
    let pair = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        )
    };
    let (d01, d23) = (pair(b[0], b[1]), pair(b[2], b[3]));
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(d01, d23),
        _mm512_shuffle_f32x4::<0xDD>(d01, d23),
    )
}

fn block(x: &[f32], w: &[f32], k: usize, m: usize, j0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if m > 1 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the features the kernel was compiled for.
        return unsafe { block_avx512(x, w, k, m, j0, out) };
    }
    // One row is bound by reading W: the plain dots stream it at full speed.
    #[cfg(target_arch = "x86_64")]
    if m > 1
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has the features the kernel was compiled for.
        return unsafe { block_avx2(x, w, k, m, j0, out) };
    }
    block_plain(x, w, k, m, j0, out)
}

super::vmath::dispatch! {
    /// The plain dots (one row: bound by reading W), compiled for AVX2 + FMA where available.
    fn block_plain(x: &[f32], w: &[f32], k: usize, m: usize, j0: usize, out: &mut [f32]) -> () = block_generic;
}

/// y (m, n) = x (m, k) · wᵀ for w (n, k), parallel over blocks of weight rows.
fn gemv(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    // Blocks are stored j-major and transposed into (m, n) afterwards (m·n floats, negligible
    // next to reading W).
    let rows_per_task = (CHUNK / k.max(1)).clamp(8, 256);
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(c, out)| block(x, w, k, m, c * rows_per_task, out));
    from_j_major(t, m, n)
}

/// (m, n) row-major from the j-major t[j·m + i] the GEMVs write: blocks of columns whose
/// j-major rows stay in L1 while every output row takes its share, rows split across threads.
pub(crate) fn from_j_major(t: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return t;
    }
    const COLS: usize = 256;
    let mut y = vec![0f32; m * n];
    let rows_per = m.div_ceil(rayon::current_num_threads().max(1)).max(1);
    y.par_chunks_mut(rows_per * n)
        .enumerate()
        .for_each(|(c, out)| {
            let i0 = c * rows_per;
            for j0 in (0..n).step_by(COLS) {
                let j1 = (j0 + COLS).min(n);
                for (r, row) in out.chunks_mut(n).enumerate() {
                    let i = i0 + r;
                    for j in j0..j1 {
                        row[j] = t[j * m + i];
                    }
                }
            }
        });
    y
}

/// A GEMM operand: element (r, c) at `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// Wᵀ as a (k, n) operand, from the stored weight.
fn wt(w: &[f32], layout: WeightLayout, k: usize, n: usize) -> Mat<'_> {
    match layout {
        WeightLayout::OutIn => Mat {
            data: w,
            rs: 1,
            cs: k,
        }, // stored (n, k)
        WeightLayout::InOut => Mat {
            data: w,
            rs: n,
            cs: 1,
        }, // stored (k, n)
    }
}

/// W as an (n, k) operand.
fn wn(w: &[f32], layout: WeightLayout, k: usize, n: usize) -> Mat<'_> {
    match layout {
        WeightLayout::OutIn => Mat {
            data: w,
            rs: k,
            cs: 1,
        },
        WeightLayout::InOut => Mat {
            data: w,
            rs: 1,
            cs: n,
        },
    }
}

/// dst (m, n, row-major, `dst.len() == m·n`) = lhs (m, k) · rhs (k, n), plus what dst holds
/// when `acc`. candle's matmul zero-fills its output first; the GEMM writes every element, so
/// that pass is skipped here.
///
/// # Safety
/// `dst` must be valid for m·n writes and the operands' strides must stay inside their slices.
pub(crate) unsafe fn gemm_into(
    dst: *mut f32,
    (m, n, k): (usize, usize, usize),
    acc: bool,
    l: Mat,
    r: Mat,
) {
    // SAFETY: the caller's contract, dst's rows n apart.
    unsafe { gemm_into_strided(dst, n, (m, n, k), acc, l, r) }
}

/// `gemm_into` with dst's rows `dst_rs` floats apart (a column block of a wider matrix).
///
/// # Safety
/// `dst` must be valid for writes at r·dst_rs + c for r < m, c < n, and the operands' strides
/// must stay inside their slices.
pub(crate) unsafe fn gemm_into_strided(
    dst: *mut f32,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    acc: bool,
    l: Mat,
    r: Mat,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            acc,
            l.data.as_ptr(),
            l.cs as isize,
            l.rs as isize,
            r.data.as_ptr(),
            r.cs as isize,
            r.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// y (m, n) = x (m, k) · Wᵀ + b, on slices: shared by the linear and LoRA ops.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    layout: WeightLayout,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    if x.len() != m * k || w.len() != k * n || bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!(
            "linear: {} inputs, {} weights and a bias of {:?} for ({m}, {k}) · ({k}, {n})",
            x.len(),
            w.len(),
            bias.map(<[f32]>::len)
        );
    }
    if m == 0 || n == 0 {
        return Ok(vec![0f32; m * n]);
    }
    if m <= GEMV_ROWS && layout == WeightLayout::OutIn {
        let mut y = gemv(x, w, m, k, n);
        if let Some(b) = bias {
            add_bias_rows(&mut y, b);
        }
        return Ok(y);
    }
    // The GEMM (the `gemm` crate, as candle's matmul) reads Wᵀ through strides: measured at
    // 170–186 GFLOP/s on the bench model's shapes on the 2-core dev machine, as PyTorch's.
    let x = Mat {
        data: x,
        rs: k,
        cs: 1,
    };
    Ok(match bias {
        // The bias rows are written first and the product accumulated onto them: no separate
        // bias pass over the output.
        Some(b) => {
            // SAFETY: written in full below before anything reads it.
            let mut y = unsafe { uninit(m * n) };
            y.par_chunks_mut(rows_per_task(n) * n).for_each(|o| {
                o.chunks_mut(n).for_each(|r| r.copy_from_slice(b));
            });
            // SAFETY: y is (m, n); the lengths of x and W were checked against (m, k, n).
            unsafe { gemm_into(y.as_mut_ptr(), (m, n, k), true, x, wt(w, layout, k, n)) };
            y
        }
        None => {
            // SAFETY: the GEMM writes all m·n floats without reading them (accumulate =
            // false); operands as above.
            let mut y = unsafe { uninit(m * n) };
            unsafe { gemm_into(y.as_mut_ptr(), (m, n, k), false, x, wt(w, layout, k, n)) };
            y
        }
    })
}

/// y (rows × n) += b (n) on every row.
pub(crate) fn add_bias_rows(y: &mut [f32], b: &[f32]) {
    y.chunks_mut(b.len().max(1))
        .for_each(|r| r.iter_mut().zip(b).for_each(|(o, b)| *o += b));
}

fn dims(lx: &Layout, lw: &Layout, layout: WeightLayout) -> Result<(usize, usize, usize)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = match layout {
        WeightLayout::OutIn => lw.shape().dims2()?,
        WeightLayout::InOut => {
            let (i, o) = lw.shape().dims2()?;
            (o, i)
        }
    };
    if k != k2 {
        candle_core::bail!("linear: x is (_, {k}) but the weight takes {k2} inputs");
    }
    Ok((m, k, n))
}

impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "lmforge-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = dims(lx, lw, self.0)?;
        let y = forward(slice(sx, lx)?, slice(sw, lw)?, None, self.0, (m, k, n))?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, None, g)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        "lmforge-linear-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = dims(lx, lw, self.0)?;
        let b = slice(sb, lb)?;
        if b.len() != n {
            candle_core::bail!("linear: bias of {} for {n} outputs", b.len());
        }
        let y = forward(slice(sx, lx)?, slice(sw, lw)?, Some(b), self.0, (m, k, n))?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, Some(b), g)
    }
}

impl Op {
    /// dx, dW and db of the tensors that are tracked, from no-backward `Grads` ops.
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let layout = self.0;
        // dx in a buffer of its own: a view of a shared buffer would keep the activation-sized
        // dx alive for as long as the weight gradient (until the optimizer step).
        let dx = if x.track_op() {
            let want = Grads {
                layout,
                dx: true,
                dw: false,
                db: false,
            };
            Some(x.apply_op3_no_bwd(w, &g, &want)?.reshape(x.shape())?)
        } else {
            None
        };
        let (dw, db) = (w.track_op(), b.is_some_and(|b| b.track_op()));
        if !(dw || db) {
            return Ok((dx, None, None));
        }
        let want = Grads {
            layout,
            dx: false,
            dw,
            db,
        };
        let flat = x.apply_op3_no_bwd(w, &g, &want)?;
        let nw = if dw { w.elem_count() } else { 0 };
        let dw = dw
            .then(|| flat.narrow(0, 0, nw)?.reshape(w.shape()))
            .transpose()?;
        let db = match b {
            Some(b) if db => Some(flat.narrow(0, nw, b.elem_count())?.reshape(b.shape())?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

/// The backward of `Op` as a no-backward op on (x, W, dy): the wanted parts of
/// [dx (m·k) | dW (as stored) | db (n)], one after the other in one buffer.
struct Grads {
    layout: WeightLayout,
    dx: bool,
    dw: bool,
    db: bool,
}

impl CustomOp3 for Grads {
    fn name(&self) -> &'static str {
        "lmforge-linear-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = dims(lx, lw, self.layout)?;
        let (x, w, g) = (slice(sx, lx)?, slice(sw, lw)?, slice(sg, lg)?);
        if lg.shape().dims2()? != (m, n) {
            candle_core::bail!(
                "linear backward: dy is {:?}, expected ({m}, {n})",
                lg.shape()
            );
        }
        let len = self.dx as usize * m * k + self.dw as usize * n * k + self.db as usize * n;
        let gm = Mat {
            data: g,
            rs: n,
            cs: 1,
        };
        // SAFETY: the wanted parts below cover all len floats (GEMMs with accumulate = false
        // and the column sums write their whole ranges).
        let mut flat = unsafe { uninit(len) };
        let dst = flat.as_mut_ptr();
        // SAFETY: the parts are disjoint ranges of `flat`, each GEMM's operands checked
        // against (m, k, n) above.
        unsafe {
            let mut at = 0;
            if self.dx {
                // dx (m, k) = dy (m, n) · W (n, k)
                gemm_into(dst, (m, k, n), false, gm, wn(w, self.layout, k, n));
                at += m * k;
            }
            if self.dw {
                let d = dst.add(at);
                // dW in the stored orientation: (n, k) = dyᵀ·x, or (k, n) = xᵀ·dy.
                let (gt, xt) = (
                    Mat {
                        data: g,
                        rs: 1,
                        cs: n,
                    },
                    Mat {
                        data: x,
                        rs: 1,
                        cs: k,
                    },
                );
                let xm = Mat {
                    data: x,
                    rs: k,
                    cs: 1,
                };
                match self.layout {
                    WeightLayout::OutIn => gemm_into(d, (n, k, m), false, gt, xm),
                    WeightLayout::InOut => gemm_into(d, (k, n, m), false, xt, gm),
                }
                at += n * k;
            }
            if self.db {
                let sums = column_sums(g, n);
                std::ptr::copy_nonoverlapping(sums.as_ptr(), dst.add(at), n);
            }
        }
        Ok((CpuStorage::F32(flat), Shape::from(len)))
    }
}

/// Σ over rows of g (rows × n), parallel over row blocks (candle's broadcast backward reduces
/// over the rows on one thread with a strided walk).
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    // At least 32 rows a task: the partials are kept until summed in order.
    let rows = rows_per_task(n).max(32) * n;
    let parts = g.par_chunks(rows.max(1)).map(|g| {
        let mut acc = vec![0f32; n];
        for r in g.chunks(n) {
            acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
        }
        acc
    });
    sum_partials(parts, n)
}

/// `x (m, k)` times the weight (see [`WeightLayout`]) plus an optional bias (n); all f32 on the
/// CPU (callers check `kernels::fusable`), `w` contiguous.
pub fn linear_bias(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3(w, &b.contiguous()?, Op(layout)),
        None => x.apply_op2(w, Op(layout)),
    }
}

/// `x (m, k)` times the weight, no bias.
pub fn linear(x: &Tensor, w: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    linear_bias(x, w, None, layout)
}
