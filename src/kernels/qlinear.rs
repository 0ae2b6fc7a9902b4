//! QLoRA's frozen base layers (Dettmers et al. 2023, "QLoRA"): y = x·Wᵀ and its input
//! gradient dx = dy·W with W kept in its GGUF blocks — any type candle reads (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0 and the K-quants Q2_K…Q6_K) — instead of a dequantized f32 copy.
//!
//!   forward:  for each tile of ≤ 1 MiB of W's rows: dequantize it, y[:, tile] = x · tileᵀ
//!   backward: for each tile: dequantize it, dx += dy[:, tile] · tile        (no dW: W frozen)
//!
//! The tile is dequantized (in parallel, by rows) into one scratch buffer that stays in L2 and
//! is reused by the next tile, then multiplied by the same GEMM as the f32 path; W's f32 copy
//! never exists, so the frozen weights cost their GGUF bytes. Dequantizing is O(out·in) per
//! pass against the GEMM's O(rows·out·in): for training batches of thousands of rows it is a
//! few percent of the step. Deviation from the paper: GGUF's block formats instead of NF4, and
//! no double quantization (GGUF stores its scales as f16).

use super::linear::{gemm_into_strided, Mat};
use super::{slice, uninit};
use candle_core::quantized::k_quants::*;
use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Scratch size per tile.
const TILE_BYTES: usize = 1 << 20;

/// A (rows, cols) matrix in GGML blocks along `cols`.
pub struct QMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// The blocks, 8-byte aligned: candle's block structs are read in place.
    data: Vec<u64>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}×{})", self.dtype, self.rows, self.cols)
    }
}

/// Blocks of `T` in `bytes` -> f32 values.
fn blocks_to_f32<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len() % std::mem::size_of::<T>(), 0);
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    let n = bytes.len() / std::mem::size_of::<T>();
    // SAFETY: `bytes` holds n whole blocks (checked against the type's size when the matrix
    // was built), starts at a row boundary of 8-byte aligned storage, and every block type is
    // plain data (f16/f32/u8 fields) valid for any bit pattern.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
    T::to_float(blocks, out);
}

/// The types this kernel reads, with their block struct's size.
fn block_size_of(dtype: GgmlDType) -> Option<usize> {
    use std::mem::size_of;
    Some(match dtype {
        GgmlDType::Q4_0 => size_of::<BlockQ4_0>(),
        GgmlDType::Q4_1 => size_of::<BlockQ4_1>(),
        GgmlDType::Q5_0 => size_of::<BlockQ5_0>(),
        GgmlDType::Q5_1 => size_of::<BlockQ5_1>(),
        GgmlDType::Q8_0 => size_of::<BlockQ8_0>(),
        GgmlDType::Q2K => size_of::<BlockQ2K>(),
        GgmlDType::Q3K => size_of::<BlockQ3K>(),
        GgmlDType::Q4K => size_of::<BlockQ4K>(),
        GgmlDType::Q5K => size_of::<BlockQ5K>(),
        GgmlDType::Q6K => size_of::<BlockQ6K>(),
        _ => return None,
    })
}

impl QMatrix {
    /// A row-major (rows, cols) GGUF tensor of a quantized type this kernel reads, else None
    /// (f32, f16 and bf16 tensors are not quantized: they load as f32).
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], shape: &[usize]) -> Option<Self> {
        let [rows, cols] = *shape else { return None };
        let bs = dtype.block_size();
        let size = block_size_of(dtype)?;
        if size != dtype.type_size() || cols % bs != 0 {
            return None;
        }
        let row_bytes = cols / bs * size;
        if bytes.len() != rows * row_bytes {
            return None;
        }
        let mut data = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck_bytes_mut(&mut data)[..bytes.len()].copy_from_slice(bytes);
        Some(QMatrix {
            dtype,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of the blocks: what the frozen weight costs.
    pub fn nbytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck_bytes(&self.data)[..self.nbytes()]
    }

    /// Undoes llama.cpp's q/k row permutation (see `gguf::llama::unpermute_rows`): whole rows
    /// of blocks move.
    pub fn unpermute_rows(&self, n_head: usize) -> Option<Self> {
        if n_head == 0 || !self.rows.is_multiple_of(2 * n_head) {
            return None;
        }
        let half = self.rows / n_head / 2;
        let src = self.bytes();
        let mut data = vec![0u64; self.data.len()];
        let dst = bytemuck_bytes_mut(&mut data);
        let rb = self.row_bytes;
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let (s, d) = (h * 2 * half + i * 2 + j, h * 2 * half + j * half + i);
                    dst[d * rb..(d + 1) * rb].copy_from_slice(&src[s * rb..(s + 1) * rb]);
                }
            }
        }
        Some(QMatrix { data, ..*self })
    }

    /// Rows r0..r0 + out.len()/cols as f32, in parallel by rows.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let (cols, rb) = (self.cols, self.row_bytes);
        let bytes = self.bytes();
        let per = (16 * 1024 / cols.max(1)).max(1); // rows per task
        out.par_chunks_mut(per * cols)
            .enumerate()
            .for_each(|(c, o)| {
                let a = (r0 + c * per) * rb;
                self.to_f32(&bytes[a..a + o.len() / cols * rb], o);
            });
    }

    /// Whole rows of blocks -> f32.
    fn to_f32(&self, src: &[u8], o: &mut [f32]) {
        match self.dtype {
            GgmlDType::Q4_0 => blocks_to_f32::<BlockQ4_0>(src, o),
            GgmlDType::Q4_1 => blocks_to_f32::<BlockQ4_1>(src, o),
            GgmlDType::Q5_0 => blocks_to_f32::<BlockQ5_0>(src, o),
            GgmlDType::Q5_1 => blocks_to_f32::<BlockQ5_1>(src, o),
            GgmlDType::Q8_0 => blocks_to_f32::<BlockQ8_0>(src, o),
            GgmlDType::Q2K => blocks_to_f32::<BlockQ2K>(src, o),
            GgmlDType::Q3K => blocks_to_f32::<BlockQ3K>(src, o),
            GgmlDType::Q4K => blocks_to_f32::<BlockQ4K>(src, o),
            GgmlDType::Q5K => blocks_to_f32::<BlockQ5K>(src, o),
            GgmlDType::Q6K => blocks_to_f32::<BlockQ6K>(src, o),
            // from_gguf admits no other type.
            _ => o.fill(f32::NAN),
        }
    }

    /// Rows `ids` (an embedding lookup), (ids.len(), cols) row-major.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            candle_core::bail!("token id {bad} is outside the table of {} rows", self.rows);
        }
        let (cols, rb) = (self.cols, self.row_bytes);
        let bytes = self.bytes();
        let mut out = vec![0f32; ids.len() * cols];
        out.par_chunks_mut(cols.max(1))
            .zip(ids.par_iter())
            .for_each(|(o, &i)| {
                let a = i as usize * rb;
                self.to_f32(&bytes[a..a + rb], o);
            });
        Ok(out)
    }

    /// The whole matrix as an f32 tensor (tests, and merging into an f32 model).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut v = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut v);
        Tensor::from_vec(v, (self.rows, self.cols), &candle_core::Device::Cpu)
    }

    /// Rows per tile.
    fn tile_rows(&self) -> usize {
        (TILE_BYTES / 4 / self.cols.max(1)).clamp(16, self.rows.max(16))
    }
}

fn bytemuck_bytes(v: &[u64]) -> &[u8] {
    // SAFETY: u64 storage viewed as its bytes (alignment 8 ≥ 1, length × 8).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8) }
}

fn bytemuck_bytes_mut(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: as above, uniquely borrowed.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 8) }
}

/// y = x·Wᵀ, x (m, cols) -> (m, rows); backward: dx = dy·W.
struct Fwd(Arc<QMatrix>);
/// dx = dy·W, dy (m, rows) -> (m, cols); no backward (second order is never needed).
struct Bwd(Arc<QMatrix>);

impl CustomOp1 for Fwd {
    fn name(&self) -> &'static str {
        "lmforge-qlinear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let (m, k) = l.shape().dims2()?;
        if k != w.cols {
            candle_core::bail!(
                "quantized linear: x is (_, {k}), the weight ({}, {})",
                w.rows,
                w.cols
            );
        }
        let y = forward(slice(s, l)?, m, w);
        Ok((CpuStorage::F32(y), Shape::from((m, w.rows))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(input_grad(g, &self.0)?))
    }
}

/// y = x·Wᵀ on slices: x (m, cols) -> (m, rows). Shared with the fused LoRA op.
pub(crate) fn forward(x: &[f32], m: usize, w: &QMatrix) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    // SAFETY: every column range [r0, r1) of every row is written by its tile's GEMM.
    let mut y = unsafe { uninit(m * n) };
    let tr = w.tile_rows();
    let mut tile = vec![0f32; tr * k];
    for r0 in (0..n).step_by(tr) {
        let r1 = (r0 + tr).min(n);
        let t = &mut tile[..(r1 - r0) * k];
        w.dequantize_rows(r0, t);
        let lhs = Mat {
            data: x,
            rs: k,
            cs: 1,
        };
        let rhs = Mat {
            data: t,
            rs: 1,
            cs: k,
        }; // tileᵀ (k, r1 - r0)
           // SAFETY: y is (m, n) with row stride n; columns r0..r1 are in bounds.
        unsafe { gemm_into_strided(y.as_mut_ptr().add(r0), n, (m, r1 - r0, k), false, lhs, rhs) };
    }
    y
}

/// dy (N, rows) -> dy·W (N, cols): the input gradient of a frozen quantized layer.
pub(crate) fn input_grad(g: &Tensor, w: &Arc<QMatrix>) -> Result<Tensor> {
    g.contiguous()?.apply_op1_no_bwd(&Bwd(w.clone()))
}

impl CustomOp1 for Bwd {
    fn name(&self) -> &'static str {
        "lmforge-qlinear-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let (m, n) = l.shape().dims2()?;
        let k = w.cols;
        let dy = slice(s, l)?;
        let mut dx = vec![0f32; m * k];
        let tr = w.tile_rows();
        let mut tile = vec![0f32; tr * k];
        for (i, r0) in (0..n).step_by(tr).enumerate() {
            let r1 = (r0 + tr).min(n);
            let t = &mut tile[..(r1 - r0) * k];
            w.dequantize_rows(r0, t);
            let lhs = Mat {
                data: &dy[r0..],
                rs: n,
                cs: 1,
            }; // dy[:, r0..r1]
            let rhs = Mat {
                data: t,
                rs: k,
                cs: 1,
            }; // tile (r1 - r0, k)
               // SAFETY: dx is (m, k); dy's column slice stays inside dy.
            unsafe { gemm_into_strided(dx.as_mut_ptr(), k, (m, k, r1 - r0), i > 0, lhs, rhs) };
        }
        Ok((CpuStorage::F32(dx), Shape::from((m, k))))
    }
}

/// x (N, cols) -> x·Wᵀ (N, rows), with the gradient to x; W frozen in its blocks. Off the
/// CPU's f32 path, W is dequantized and multiplied by candle.
pub fn qlinear(x: &Tensor, w: &Arc<QMatrix>) -> Result<Tensor> {
    if !super::fusable(&[x]) {
        return x.matmul(&w.dequantize()?.to_device(x.device())?.t()?);
    }
    x.contiguous()?.apply_op1(Fwd(w.clone()))
}
