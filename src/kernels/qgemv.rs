//! Decoding straight from GGUF-quantized weights: y = x·Wᵀ for a few rows of x (m ≤ 3) with
//! W kept in its 32-weight blocks (Q4_0, Q4_1, Q8_0), unpacked in registers.
//!
//!   Q4_0: w = d·(q − 8),  Q4_1: w = d·q + m,  Q8_0: w = d·q     (q: 4-bit or signed 8-bit)
//!   y_i = Σ_blocks d·(Σ_j q_j·x_ij) + (m or −8d)·(Σ_j x_ij)
//!
//! Decoding reads every weight once per token, so it is bound by memory traffic: Q4 blocks are
//! 0.625 bytes per weight (as stored here: 16 bytes of nibbles plus f32 scales) instead of 4 for
//! the dequantized f32 copy. The block sums of x are computed once per input row and shared by
//! all output rows. Numerically this is the dequantized f32 product with another summation
//! order (tests compare the two).

use super::vmath;
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
}

/// A (rows, cols) weight in 32-weight blocks along `cols`, scales unpacked to f32.
#[derive(Debug, Clone)]
pub struct QWeight {
    ty: QType,
    rows: usize,
    cols: usize,
    /// Per block: the scale d, and the offset m (Q4_1 only).
    d: Vec<f32>,
    m: Vec<f32>,
    /// Per block: 16 bytes of nibbles (Q4: q_j in the low nibble of byte j, q_{j+16} in the high
    /// one, as ggml stores them) or 32 signed bytes (Q8_0).
    q: Vec<u8>,
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

impl QWeight {
    /// The GGUF tensor (row-major shape (rows, cols)) in a type this kernel reads, else `None`.
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], shape: &[usize]) -> Option<Self> {
        let (ty, size, nq) = match dtype {
            GgmlDType::Q4_0 => (QType::Q4_0, 18, 16),
            GgmlDType::Q4_1 => (QType::Q4_1, 20, 16),
            GgmlDType::Q8_0 => (QType::Q8_0, 34, 32),
            _ => return None,
        };
        let [rows, cols] = *shape else { return None };
        if cols % QK != 0 || bytes.len() != rows * cols / QK * size {
            return None;
        }
        let nb = rows * cols / QK;
        let mut w = QWeight {
            ty,
            rows,
            cols,
            d: Vec::with_capacity(nb),
            m: Vec::new(),
            q: Vec::with_capacity(nb * nq),
        };
        for blk in bytes.chunks_exact(size) {
            w.d.push(f16(&blk[0..2]));
            let qs = match ty {
                QType::Q4_1 => {
                    w.m.push(f16(&blk[2..4]));
                    &blk[4..]
                }
                QType::Q4_0 | QType::Q8_0 => &blk[2..],
            };
            w.q.extend_from_slice(qs);
        }
        Some(w)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Undoes llama.cpp's Q/K row permutation (see `gguf::llama::unpermute_rows`).
    pub fn unpermute_rows(&self, n_head: usize) -> Option<Self> {
        if n_head == 0 || !self.rows.is_multiple_of(2 * n_head) {
            return None;
        }
        let half = self.rows / n_head / 2;
        let bpr = self.cols / QK; // blocks per row
        let nq = bpr * if self.ty == QType::Q8_0 { 32 } else { 16 }; // quant bytes per row
        let mut out = self.clone();
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = h * 2 * half + i * 2 + j;
                    let dst = h * 2 * half + j * half + i;
                    out.d[dst * bpr..(dst + 1) * bpr]
                        .copy_from_slice(&self.d[src * bpr..(src + 1) * bpr]);
                    if !self.m.is_empty() {
                        out.m[dst * bpr..(dst + 1) * bpr]
                            .copy_from_slice(&self.m[src * bpr..(src + 1) * bpr]);
                    }
                    out.q[dst * nq..(dst + 1) * nq]
                        .copy_from_slice(&self.q[src * nq..(src + 1) * nq]);
                }
            }
        }
        Some(out)
    }

    /// The f32 matrix (rows, cols), for tests and references.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        for (b, out) in w.chunks_mut(QK).enumerate() {
            let d = self.d[b];
            match self.ty {
                QType::Q8_0 => {
                    for (o, &q) in out.iter_mut().zip(&self.q[b * 32..b * 32 + 32]) {
                        *o = d * (q as i8) as f32;
                    }
                }
                QType::Q4_0 | QType::Q4_1 => {
                    let (m, off) = match self.ty {
                        QType::Q4_1 => (self.m[b], 0.0),
                        _ => (0.0, 8.0),
                    };
                    for (j, &q) in self.q[b * 16..b * 16 + 16].iter().enumerate() {
                        out[j] = d * ((q & 15) as f32 - off) + m;
                        out[j + 16] = d * ((q >> 4) as f32 - off) + m;
                    }
                }
            }
        }
        w
    }

    /// y (m, rows) = x (m, cols) · Wᵀ, parallel over blocks of output rows.
    pub fn gemv(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "qgemv: x is not (m, cols)"); // callers check shapes
        if m == 0 || n == 0 {
            return vec![0f32; m * n];
        }
        let bpr = k / QK;
        // Σ x over each block of each input row: the offset terms of every output row.
        let sums: Vec<f32> = x.chunks(QK).map(|b| b.iter().sum()).collect();
        let rows_per_task = 16;
        let mut t = vec![0f32; n * m]; // j-major, transposed below
        t.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(c, out)| {
                for (jj, o) in out.chunks_mut(m).enumerate() {
                    let j = c * rows_per_task + jj;
                    for (i, o) in o.iter_mut().enumerate() {
                        *o = row_dot(
                            self,
                            j,
                            &x[i * k..(i + 1) * k],
                            &sums[i * bpr..(i + 1) * bpr],
                        );
                    }
                }
            });
        super::linear::from_j_major(t, m, n)
    }
}

/// One output: row j of W dotted with x (cols), using the block sums of x.
fn row_dot(w: &QWeight, j: usize, x: &[f32], sums: &[f32]) -> f32 {
    let bpr = w.cols / QK;
    let (d, b0) = (&w.d[j * bpr..(j + 1) * bpr], j * bpr);
    match w.ty {
        QType::Q8_0 => q8_dot(&w.q[b0 * 32..(b0 + bpr) * 32], d, x),
        QType::Q4_0 => {
            let off: f32 = d.iter().zip(sums).map(|(d, s)| -8.0 * d * s).sum();
            q4_dot(&w.q[b0 * 16..(b0 + bpr) * 16], d, x) + off
        }
        QType::Q4_1 => {
            let m = &w.m[b0..b0 + bpr];
            let off: f32 = m.iter().zip(sums).map(|(m, s)| m * s).sum();
            q4_dot(&w.q[b0 * 16..(b0 + bpr) * 16], d, x) + off
        }
    }
}

/// Σ_blocks d_b · Σ_j q_bj·x_bj for 4-bit blocks; 16 lanes carried across blocks so the
/// compiler keeps them in vector registers.
#[inline(always)]
fn q4_dot_generic(q: &[u8], d: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for ((qs, &d), xb) in q.chunks_exact(16).zip(d).zip(x.chunks_exact(QK)) {
        let (lo, hi) = xb.split_at(16);
        for l in 0..16 {
            let v = (qs[l] & 15) as f32 * lo[l] + (qs[l] >> 4) as f32 * hi[l];
            acc[l] += d * v;
        }
    }
    acc.iter().sum()
}

#[inline(always)]
fn q8_dot_generic(q: &[u8], d: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for ((qs, &d), xb) in q.chunks_exact(32).zip(d).zip(x.chunks_exact(QK)) {
        for l in 0..16 {
            let v = (qs[l] as i8) as f32 * xb[l] + (qs[l + 16] as i8) as f32 * xb[l + 16];
            acc[l] += d * v;
        }
    }
    acc.iter().sum()
}

vmath::dispatch! {
    fn q4_dot(q: &[u8], d: &[f32], x: &[f32]) -> f32 = q4_dot_generic;
}
vmath::dispatch! {
    fn q8_dot(q: &[u8], d: &[f32], x: &[f32]) -> f32 = q8_dot_generic;
}
