//! Building blocks of the decoder, composed from candle ops that all have a backward (the
//! decode-only `quantized_xwt` aside, which never runs where a gradient is needed).
//!
//! candle-nn's fused `layer_norm`, `rms_norm`, `softmax_last_dim` and `rope*` have no backward
//! (gradients stop there silently), so none of them is used: these composites are the
//! reference that fused kernels must match.

use super::config::Activation;
use super::params::{Init, ParamKind, ParamStore, Source};
use crate::kernels::qlinear::QMatrix;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

pub use crate::kernels::linear::WeightLayout as Layout;

/// A linear map `y = x·Wᵀ + b` over the last dimension, named by its HF module path so that
/// PEFT methods can find and wrap it.
#[derive(Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub layout: Layout,
    pub in_dim: usize,
    pub out_dim: usize,
    /// A PEFT method's addition to the output (LoRA's (α/r)·B·A·x), see `peft`.
    pub adapter: Option<std::sync::Arc<dyn LinearAdapter>>,
    /// The weight as GGUF blocks, for decoding with a frozen weight (`kernels::qgemv`).
    pub quant: Option<std::sync::Arc<crate::kernels::qgemv::QWeight>>,
    /// QLoRA: the frozen weight lives only as GGUF blocks (`kernels::qlinear`); `weight` then
    /// has no values (0 elements) and is not a parameter.
    pub qbase: Option<std::sync::Arc<QMatrix>>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("name", &self.name)
            .field("in_dim", &self.in_dim)
            .field("out_dim", &self.out_dim)
            .field("layout", &self.layout)
            .field("adapter", &self.adapter.is_some())
            .finish()
    }
}

/// Something added to a linear layer's output: `y = base(x) + delta(x)`. Returning `None`
/// means "nothing this time" (adapters switched off, e.g. for the reference model of DPO/PPO).
pub trait LinearAdapter: Send + Sync {
    /// x (N, in) -> delta (N, out), or None.
    fn delta(&self, x: &Tensor) -> Result<Option<Tensor>>;

    /// The whole adapted output base(x) + delta(x) as one fused op, where the method has one
    /// and it applies (None: use `delta`).
    fn fused(&self, _lin: &Linear, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The same adapter on detached weights (shared storage, no gradient): decoding.
    fn detached(&self) -> std::sync::Arc<dyn LinearAdapter>;
}

/// Everything a layer constructor needs: where weights come from and which ones train.
pub struct Builder<'a> {
    pub store: &'a mut ParamStore,
    pub source: &'a Source<'a>,
    pub frozen: &'a dyn Fn(&str) -> bool,
    /// QLoRA: frozen linear weights kept as GGUF blocks, by parameter name.
    pub blocks: Option<&'a QBlocks>,
}

/// Frozen weights as GGUF blocks, by parameter name (`….weight`).
pub type QBlocks = std::collections::HashMap<String, std::sync::Arc<QMatrix>>;

impl Builder<'_> {
    /// QLoRA: `name`'s GGUF blocks, checked against the (rows, cols) the layer needs.
    fn blocks_for(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<std::sync::Arc<QMatrix>>> {
        match self.blocks.and_then(|m| m.get(name)) {
            Some(q) if (q.rows(), q.cols()) == (rows, cols) => Ok(Some(q.clone())),
            Some(q) => anyhow::bail!(
                "{name}: GGUF blocks of ({}, {}) where ({rows}, {cols}) is needed",
                q.rows(),
                q.cols()
            ),
            None => Ok(None),
        }
    }

    /// The 0-element tensor a weight kept as blocks has in place of its f32 values.
    fn no_values(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(0, DType::F32, &self.store.device)?)
    }

    pub fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        kind: ParamKind,
        init: Init,
    ) -> Result<Tensor> {
        let trainable = !(self.frozen)(name);
        self.store
            .add(self.source, name, shape, kind, init, trainable)
    }
}

impl Linear {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Builder,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        layout: Layout,
        std: f64,
    ) -> Result<Self> {
        let shape = match layout {
            Layout::OutIn => [out_dim, in_dim],
            Layout::InOut => [in_dim, out_dim],
        };
        let wname = format!("{name}.weight");
        // GGUF blocks are (out, in) rows: only an (out, in) layer reads them.
        let qbase = match layout {
            Layout::OutIn => b.blocks_for(&wname, out_dim, in_dim)?,
            Layout::InOut => None,
        };
        let weight = match qbase {
            Some(_) => b.no_values()?,
            None => b.param(&wname, &shape, ParamKind::Weight, Init::Normal(std))?,
        };
        let bias = if bias {
            Some(b.param(
                &format!("{name}.bias"),
                &[out_dim],
                ParamKind::Bias,
                Init::Zeros,
            )?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            weight,
            bias,
            layout,
            in_dim,
            out_dim,
            adapter: None,
            quant: None,
            qbase,
        })
    }

    /// This layer on detached weights: the same storage, no autograd graph (decoding).
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            adapter: self.adapter.as_ref().map(|a| a.detached()),
            ..self.clone()
        }
    }

    /// The weight as an (in, out) matrix, transposed through strides when stored (out, in).
    pub fn weight_in_out(&self) -> Result<Tensor> {
        if let Some(q) = &self.qbase {
            return Ok(q.dequantize()?.t()?);
        }
        Ok(match self.layout {
            Layout::OutIn => self.weight.t()?,
            Layout::InOut => self.weight.clone(),
        })
    }

    /// The layer without its adapter: x (N, in) -> W·x + b (N, out), through the fused linear
    /// kernel (no weight-gradient GEMM for a frozen weight). Multiplicative adapters (IA³)
    /// wrap it.
    pub fn base(&self, x2: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.qbase {
            let y = crate::kernels::qlinear::qlinear(x2, q)?;
            return Ok(match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        let mut ts = vec![x2, &self.weight];
        ts.extend(self.bias.as_ref());
        Ok(
            if self.weight.is_contiguous() && crate::kernels::fusable(&ts) {
                crate::kernels::linear::linear_bias(
                    x2,
                    &self.weight,
                    self.bias.as_ref(),
                    self.layout,
                )?
            } else {
                let y = x2.matmul(&self.weight_in_out()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            },
        )
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // (..., in) -> (N, in) @ (in, out) -> (..., out)
        let dims = x.dims().to_vec();
        let n = x.elem_count() / self.in_dim;
        let x2 = x.reshape((n, self.in_dim))?;
        let mut out = dims;
        *out.last_mut().expect("x has at least one dimension") = self.out_dim;
        if let Some(y) = self
            .adapter
            .as_ref()
            .map(|a| a.fused(self, &x2))
            .transpose()?
            .flatten()
        {
            return Ok(y.reshape(out)?);
        }
        if self.adapter.is_none() {
            if let Some(y) =
                quantized_xwt(self.quant.as_deref(), &self.weight, &x2, self.bias.as_ref())?
            {
                return Ok(y.reshape(out)?);
            }
        }
        let y = self.base(&x2)?;
        let y = match self.adapter.as_ref().map(|a| a.delta(&x2)).transpose()? {
            Some(Some(d)) => (y + d)?,
            _ => y,
        };
        Ok(y.reshape(out)?)
    }
}

/// Decoding from `q`, the quantized copy of a frozen weight w (out, in): x (m, in) · wᵀ (+ b)
/// for a few rows of x on the CPU; `None` where that does not apply, which includes anything
/// that needs a gradient (the result has no backward).
pub fn quantized_xwt(
    q: Option<&crate::kernels::qgemv::QWeight>,
    w: &Tensor,
    x: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some(q) = q else {
        return Ok(None);
    };
    let (m, k) = x.dims2()?;
    let mut ts = vec![x];
    ts.extend(bias);
    let tracked = w.track_op() || x.track_op() || bias.is_some_and(|b| b.track_op());
    if tracked || m == 0 || m > crate::kernels::linear::MAX_ROWS || !crate::kernels::fusable(&ts) {
        return Ok(None);
    }
    let n = q.rows();
    if k != q.cols() || bias.is_some_and(|b| b.elem_count() != n) {
        anyhow::bail!(
            "quantized linear: x (_, {k}) and a bias of {:?} for blocks of ({n}, {})",
            bias.map(|b| b.elem_count()),
            q.cols()
        );
    }
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut y = q.gemv(&xs, m);
    if let Some(b) = bias {
        crate::kernels::linear::add_bias_rows(&mut y, &b.to_vec1::<f32>()?);
    }
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

/// x (N, in) · wᵀ for w (out, in): the fused linear kernel where it applies, else a matmul.
pub fn xwt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if w.is_contiguous() && x.is_contiguous() && crate::kernels::fusable(&[x, w]) {
        crate::kernels::linear::linear(x, w, Layout::OutIn)
    } else {
        x.matmul(&w.t()?)
    }
}

#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Tensor,
    pub dim: usize,
    /// The table as GGUF blocks, for decoding through a head tied to it.
    pub quant: Option<std::sync::Arc<crate::kernels::qgemv::QWeight>>,
    /// QLoRA: the frozen table only as GGUF blocks (rows dequantized as they are looked up);
    /// `weight` then has no values (0 elements).
    pub qbase: Option<std::sync::Arc<QMatrix>>,
}

impl Embedding {
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            ..self.clone()
        }
    }

    pub fn new(b: &mut Builder, name: &str, rows: usize, dim: usize, std: f64) -> Result<Self> {
        let qbase = b.blocks_for(name, rows, dim)?;
        let weight = match qbase {
            Some(_) => b.no_values()?,
            None => b.param(name, &[rows, dim], ParamKind::Embedding, Init::Normal(std))?,
        };
        Ok(Self {
            weight,
            dim,
            quant: None,
            qbase,
        })
    }

    /// ids (B, T) u32 -> (B, T, C)
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (bsz, t) = ids.dims2()?;
        if let Some(q) = &self.qbase {
            let ids = ids.flatten_all()?.to_vec1::<u32>()?;
            let rows = q.gather_rows(&ids)?;
            return Ok(Tensor::from_vec(
                rows,
                (bsz, t, self.dim),
                self.weight.device(),
            )?);
        }
        let flat = ids.flatten_all()?;
        Ok(self
            .weight
            .index_select(&flat, 0)?
            .reshape((bsz, t, self.dim))?)
    }
}

#[derive(Debug, Clone)]
pub enum Norm {
    LayerNorm {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    RmsNorm {
        weight: Tensor,
        eps: f64,
    },
}

impl Norm {
    pub fn detached(&self) -> Self {
        match self {
            Norm::LayerNorm { weight, bias, eps } => Norm::LayerNorm {
                weight: weight.detach(),
                bias: bias.detach(),
                eps: *eps,
            },
            Norm::RmsNorm { weight, eps } => Norm::RmsNorm {
                weight: weight.detach(),
                eps: *eps,
            },
        }
    }

    pub fn layer_norm(b: &mut Builder, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = b.param(
            &format!("{name}.weight"),
            &[dim],
            ParamKind::Norm,
            Init::Ones,
        )?;
        let bias = b.param(
            &format!("{name}.bias"),
            &[dim],
            ParamKind::Norm,
            Init::Zeros,
        )?;
        Ok(Self::LayerNorm { weight, bias, eps })
    }

    pub fn rms_norm(b: &mut Builder, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = b.param(
            &format!("{name}.weight"),
            &[dim],
            ParamKind::Norm,
            Init::Ones,
        )?;
        Ok(Self::RmsNorm { weight, eps })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use crate::kernels::{fusable, norm};
        match self {
            Self::LayerNorm { weight, bias, eps } if fusable(&[x, weight, bias]) => {
                Ok(norm::layer_norm(x, weight, bias, *eps)?)
            }
            Self::RmsNorm { weight, eps } if fusable(&[x, weight]) => {
                Ok(norm::rms_norm(x, weight, *eps)?)
            }
            _ => self.forward_composite(x),
        }
    }

    /// The composite reference of `forward` (candle ops with a backward).
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::LayerNorm { weight, bias, eps } => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                let inv = (var + *eps)?.sqrt()?.recip()?;
                Ok(xc
                    .broadcast_mul(&inv)?
                    .broadcast_mul(weight)?
                    .broadcast_add(bias)?)
            }
            Self::RmsNorm { weight, eps } => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                let inv = (ms + *eps)?.sqrt()?.recip()?;
                Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
            }
        }
    }
}

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    if let Some(a) = fused_act(act).filter(|_| crate::kernels::fusable(&[x])) {
        return Ok(crate::kernels::act::apply(x, a)?);
    }
    activate_composite(x, act)
}

/// `act(x) ⊙ u`, the gated MLP's product: one fused op where it applies.
pub fn gated(x: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
    if let Some(a) = fused_act(act).filter(|_| crate::kernels::fusable(&[x, u])) {
        return Ok(crate::kernels::act::gated(x, u, a)?);
    }
    Ok((activate_composite(x, act)? * u)?)
}

/// The activations with a fused kernel.
fn fused_act(act: Activation) -> Option<crate::kernels::act::Act> {
    use crate::kernels::act::Act;
    match act {
        Activation::GeluTanh => Some(Act::GeluTanh),
        Activation::Silu => Some(Act::Silu),
        Activation::GeluErf | Activation::Relu => None,
    }
}

/// The composite reference of `activate` (candle's element-wise ops).
pub fn activate_composite(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::GeluTanh => x.gelu()?,
        Activation::GeluErf => x.gelu_erf()?,
        Activation::Relu => x.relu()?,
        Activation::Silu => x.silu()?,
    })
}

/// Numerically stable softmax over the last dimension. The max is detached: the shift cancels
/// in the forward result, so its gradient is exactly zero and need not be traced.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary position embedding tables, HF "rotate half" convention (Llama, Mistral, Qwen2).
#[derive(Debug)]
pub struct Rope {
    inv: Vec<f64>,
    head_dim: usize,
    /// The model's context: positions beyond it are refused by the model, not here.
    max_pos: usize,
    dev: Device,
    /// cos/sin (n, head_dim) for the first n positions, grown on demand: a config may claim a
    /// context of millions (or, hostile, 10^12) that no input will use, so the table covers the
    /// positions actually seen (doubling), never the whole claimed context up front.
    tables: std::sync::RwLock<(Tensor, Tensor)>,
}

impl Clone for Rope {
    fn clone(&self) -> Self {
        let tables = match self.tables.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        };
        Self {
            inv: self.inv.clone(),
            head_dim: self.head_dim,
            max_pos: self.max_pos,
            dev: self.dev.clone(),
            tables: std::sync::RwLock::new(tables),
        }
    }
}

impl Rope {
    /// Positions built eagerly (a typical context; more are added when used).
    const EAGER: usize = 4096;

    pub fn new(head_dim: usize, max_pos: usize, theta: f64, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let tables = Self::build(&inv, head_dim, max_pos.min(Self::EAGER), dev)?;
        Ok(Self {
            inv,
            head_dim,
            max_pos,
            dev: dev.clone(),
            tables: std::sync::RwLock::new(tables),
        })
    }

    fn build(inv: &[f64], head_dim: usize, n: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(n * head_dim);
        let mut sin = Vec::with_capacity(n * head_dim);
        for p in 0..n {
            for j in 0..head_dim {
                // f32 angle, as transformers computes it, so long positions agree bit-for-bit-ish.
                let a = (p as f32) * (inv[j % half] as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, head_dim), dev)?,
            Tensor::from_vec(sin, (n, head_dim), dev)?,
        ))
    }

    /// The tables, covering at least `n` positions.
    fn covering(&self, n: usize) -> Result<(Tensor, Tensor)> {
        let have = {
            let t = self
                .tables
                .read()
                .map_err(|_| anyhow::anyhow!("RoPE table lock poisoned"))?;
            if t.0.dim(0)? >= n {
                return Ok(t.clone());
            }
            t.0.dim(0)?
        };
        if n > self.max_pos {
            anyhow::bail!(
                "position {n} is beyond the model's context of {}",
                self.max_pos
            );
        }
        let want = n.max(have * 2).min(self.max_pos);
        let built = Self::build(&self.inv, self.head_dim, want, &self.dev)?;
        let mut t = self
            .tables
            .write()
            .map_err(|_| anyhow::anyhow!("RoPE table lock poisoned"))?;
        if t.0.dim(0)? < want {
            *t = built;
        }
        Ok(t.clone())
    }

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// x (B, T, H, hd) at absolute positions offset..offset+T.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, t, _, hd) = x.dims4()?;
        let (cos, sin) = self.covering(offset + t)?;
        let table = |m: &Tensor| -> Result<Tensor> {
            Ok(m.narrow(0, offset, t)?
                .to_dtype(x.dtype())?
                .reshape((1, t, 1, hd))?)
        };
        self.rotate(x, &table(&cos)?, &table(&sin)?)
    }

    /// cos/sin tables (B, T, 1, hd) for positions (B, T) u32 (packed sequences restart at 0);
    /// built once per forward and shared by every layer's `rotate`.
    pub fn tables_at(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let hd = self.head_dim;
        let flat = positions.flatten_all()?;
        let top = flat.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        let (cos, sin) = self.covering(top + 1)?;
        let table = |m: &Tensor| -> Result<Tensor> {
            Ok(m.index_select(&flat, 0)?
                .to_dtype(dtype)?
                .reshape((b, t, 1, hd))?)
        };
        Ok((table(&cos)?, table(&sin)?))
    }

    /// x (B, T, H, hd) rotated by tables (1 or B, T, 1, hd).
    pub fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if crate::kernels::fusable(&[x, cos, sin]) {
            return Ok(crate::kernels::rope::rope(x, cos, sin)?);
        }
        Self::rotate_composite(x, cos, sin)
    }

    /// The reference for `kernels::rope`.
    pub fn rotate_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
    }
}

/// An additive attention mask (T, S) with 0 where query i may see key j and a large negative
/// value elsewhere. Keys are `prefix` always-visible slots followed by positions 0..past+T.
pub fn causal_mask(
    t: usize,
    past: usize,
    prefix: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Tensor> {
    let s = prefix + past + t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        let qpos = past + i;
        for j in 0..past + t {
            let visible = j <= qpos && window.is_none_or(|w| qpos - j < w);
            if !visible {
                m[i * s + prefix + j] = f32::MIN;
            }
        }
    }
    Ok(Tensor::from_vec(m, (t, s), dev)?.to_dtype(DType::F32)?)
}
