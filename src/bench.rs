//! `lmforge bench`: times full training steps (forward, backward, AdamW) of a randomly
//! initialised decoder on random tokens, with the same flags and meaning as
//! `scripts/torch_reference.py` (untied output head, AdamW lr 1e-3, wd 0.01, β₂ 0.999).
//! The step timed is the training engine's own (`Trainer::step`, as every method runs it), with
//! the causal-LM loss of `pretrain`; clipping is off, as in the PyTorch reference.
//!
//! tokens_per_s = batch·seq / median step time, first step excluded. `--lora R` trains LoRA
//! adapters of rank R on every linear layer but the head, with the base frozen (the same FLOP
//! formula is kept, so gflops_per_s compares like with like).
//! gflops_per_s counts 6·(matmul parameters)·tokens plus 12·L·T²·d·B for attention scores and
//! values as computed (the full T×T, masked half included).

use crate::data::Batch;
use crate::model::config::ModelConfig;
use crate::model::params::Source;
use crate::model::{DecoderModel, ParamStore};
use crate::rng::Rng;
use crate::train::engine::{peak_rss_mib, Local, Method, Schedule, TrainConfig, Trainer};
use crate::train::pretrain::causal::window_loss;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub llama: bool,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: Option<usize>,
    pub dim: usize,
    pub ffn: Option<usize>,
    pub seq: usize,
    pub batch: usize,
    pub vocab: usize,
    pub steps: usize,
    /// LoRA rank on every linear layer but the head, base frozen (0 = full training).
    pub lora_r: usize,
    /// A real model instead of a random one; with `qlora` its GGUF linear weights stay blocks.
    pub model: Option<std::path::PathBuf>,
    pub qlora: bool,
}

pub fn run(a: &BenchArgs, dev: &Device) -> Result<Value> {
    if a.steps < 2 {
        bail!("--steps must be at least 2 (the first step is excluded from timing)");
    }
    let mut cfg = if a.llama {
        ModelConfig::llama(
            a.vocab,
            a.dim,
            a.layers,
            a.heads,
            a.kv_heads.unwrap_or(a.heads),
            a.seq,
            a.ffn,
        )
    } else {
        let mut c = ModelConfig::gpt2(a.vocab, a.dim, a.layers, a.heads, a.seq);
        c.intermediate_size = a.ffn.unwrap_or(4 * a.dim);
        c
    };
    cfg.tie_word_embeddings = false;
    let lora = a.lora_r > 0;
    if a.qlora && (!lora || a.model.is_none()) {
        bail!("--qlora needs --model FILE.gguf and --lora R");
    }
    let (mut model, mut store) = match &a.model {
        Some(p) => {
            let m = if a.qlora {
                crate::model::hf::load_qlora(p, dev)?.0
            } else {
                crate::model::hf::load(p, dev, &|_| lora)?
            };
            (m.model, m.store)
        }
        None => {
            let mut store = ParamStore::new(dev.clone());
            let m = DecoderModel::new(&cfg, &mut store, &Source::Random { seed: 0 }, &|_| lora)?;
            (m, store)
        }
    };
    let cfg = model.cfg.clone();
    if a.seq > cfg.max_position_embeddings {
        bail!(
            "--seq {} exceeds the model's context of {}",
            a.seq,
            cfg.max_position_embeddings
        );
    }
    if lora {
        let c = crate::peft::lora::LoraConfig {
            r: a.lora_r,
            alpha: 2.0 * a.lora_r as f64,
            dropout: 0.0,
            targets: crate::peft::lora::Targets::AllLinear,
            use_rslora: false,
            use_dora: false,
        };
        let sw = crate::peft::AdapterSwitch::default();
        crate::peft::lora::attach(&mut model, &mut store, &c, None, 0, &sw)?;
    }
    let tc = TrainConfig {
        max_steps: a.steps as u64,
        batch_size: a.batch,
        lr: 1e-3,
        min_lr: 1e-3,
        schedule: Schedule::Constant,
        weight_decay: 0.01,
        grad_clip: 0.0,
        ..TrainConfig::base()
    };
    let mut m = RandomTokens {
        model,
        store,
        vocab: cfg.vocab_size,
        seq: a.seq,
    };
    let mut trainer = Trainer::new(&m, tc)?;
    let mut times = Vec::new();
    let mut loss = 0f32;
    for step in 0..a.steps {
        let t0 = Instant::now();
        let s = trainer.step(&mut m, &mut Local)?;
        // Make sure queued device work is finished before the clock stops.
        dev.synchronize()?;
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
        loss = s.loss;
    }
    let (model, store) = (m.model, m.store);
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let matmul_params: usize = model.linears().iter().map(|l| l.in_dim * l.out_dim).sum();
    let tokens = (a.batch * a.seq) as f64;
    let flops = 6.0 * matmul_params as f64 * tokens
        + 12.0 * (cfg.num_layers * a.seq * a.seq * cfg.num_heads * cfg.head_dim * a.batch) as f64;
    Ok(json!({
        "system": format!("lmforge-{}", env!("CARGO_PKG_VERSION")),
        "arch": cfg.model_type,
        "qlora": a.qlora,
        "params": store.num_params() + model.quantized_params(),
        "trainable_params": store.num_trainable(),
        "batch": a.batch,
        "seq": a.seq,
        "step_ms_median": (med * 1e4).round() / 10.0,
        "tokens_per_s": (tokens / med * 10.0).round() / 10.0,
        "gflops_per_s": (flops / med / 1e8).round() / 10.0,
        "loss_last": (loss as f64 * 1e4).round() / 1e4,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Random tokens as a training method: each draw is one sequence of random inputs and targets.
struct RandomTokens {
    model: DecoderModel,
    store: ParamStore,
    vocab: usize,
    seq: usize,
}

impl Method for RandomTokens {
    type Batch = Batch;

    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn epoch_len(&self) -> Option<usize> {
        None
    }

    fn batch(&mut self, draws: &[usize]) -> Result<Batch> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for &d in draws {
            let mut rng = Rng::keyed(&[d as u64, 0xBE4C]);
            let v = self.vocab as u64;
            x.extend((0..self.seq).map(|_| rng.below(v) as u32));
            y.extend((0..self.seq).map(|_| rng.below(v) as u32));
        }
        Ok(Batch {
            x,
            y,
            batch: draws.len(),
        })
    }

    fn units(&self, b: &Batch) -> usize {
        b.x.len()
    }

    fn loss(&mut self, b: &Batch) -> Result<Tensor> {
        window_loss(&self.model, b)
    }
}

/// GEMM throughput on the training step's shapes for this configuration: candle's matmul (the
/// `gemm` crate, which the linear op uses), f32 on the CPU, the median of `reps` runs.
/// Shapes are (m, k, n) of the forward (x·Wᵀ), input-gradient (dy·W) and weight-gradient
/// (dyᵀ·x) products of every distinct linear layer.
pub fn gemm_shapes(a: &BenchArgs, reps: usize) -> Result<Vec<Value>> {
    let tokens = a.batch * a.seq;
    let kv = a.kv_heads.unwrap_or(a.heads) * (a.dim / a.heads.max(1));
    let ffn = a.ffn.unwrap_or(if a.llama {
        (8 * a.dim / 3).div_ceil(64) * 64
    } else {
        4 * a.dim
    });
    let mut layers = vec![
        (a.dim, a.dim + 2 * kv),
        (a.dim, a.dim),
        (a.dim, ffn),
        (ffn, a.dim),
    ];
    layers.push((a.dim, a.vocab));
    let mut out = Vec::new();
    let mut rng = Rng::new(0);
    let dev = Device::Cpu;
    let mut rand = |r: usize, c: usize| {
        let v: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32).collect();
        candle_core::Tensor::from_vec(v, (r, c), &dev)
    };
    for (inp, outp) in layers {
        let x = rand(tokens, inp)?;
        let w = rand(outp, inp)?;
        let dy = rand(tokens, outp)?;
        let cases = [
            ("forward x·Wᵀ", x.clone(), w.t()?),
            ("input grad dy·W", dy.clone(), w.clone()),
            ("weight grad dyᵀ·x", dy.t()?, x.clone()),
        ];
        for (what, l, r) in cases {
            let (m, k) = l.dims2()?;
            let n = r.dim(1)?;
            let time = |f: &dyn Fn() -> Result<candle_core::Tensor>| -> Result<f64> {
                f()?;
                let mut t = Vec::new();
                for _ in 0..reps {
                    let t0 = Instant::now();
                    f()?;
                    t.push(t0.elapsed().as_secs_f64());
                }
                t.sort_by(f64::total_cmp);
                Ok(2.0 * (m * k * n) as f64 / t[t.len() / 2] / 1e9)
            };
            let gflops = time(&|| Ok(l.matmul(&r)?))?;
            let mut line = json!({
                "product": what, "m": m, "k": k, "n": n,
                "gflops_per_s": (gflops * 10.0).round() / 10.0,
            });
            if what.starts_with("forward") {
                // The linear op the models run (a GEMV for few rows, else the GEMM).
                let ours = time(&|| {
                    Ok(crate::kernels::linear::linear(
                        &x,
                        &w,
                        crate::kernels::linear::WeightLayout::OutIn,
                    )?)
                })?;
                line["lmforge_linear_gflops_per_s"] = json!((ours * 10.0).round() / 10.0);
            }
            out.push(line);
        }
    }
    Ok(out)
}
