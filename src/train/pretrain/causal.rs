//! Causal-LM pre-training (Radford et al. 2018/2019): minimise the next-token cross-entropy
//!
//!   L = −(1/N) Σₜ log p(xₜ₊₁ | x≤ₜ)
//!
//! over random windows of the corpus, N the step's tokens. `run` reads top to bottom: corpus →
//! model (fresh, `model.init_from`, or a checkpoint's) → the engine → the final model and a
//! sample. Each checkpoint is also an HF model directory (`generate --model` loads it).
//! Validation reports loss, perplexity and bits per byte (which compares across vocabularies).

use super::{corpus, prepare, tokenizer, Arch, PretrainOptions, Summary, TokKind};
use crate::data::{Batch, Dataset};
use crate::generate::{generate, Sampling};
use crate::model::params::Source;
use crate::model::{hf, DecoderModel, ModelConfig, ParamStore};
use crate::tokenizer::Tok;
use crate::train::engine::{self, Control, Method};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::Path;

/// A decoder learning the next token of corpus windows.
pub struct CausalLm {
    pub model: DecoderModel,
    pub store: ParamStore,
    pub tok: Tok,
    data: Dataset,
    val: Vec<Batch>,
    /// Bytes of text the validation targets decode to (for bits per byte).
    val_bytes: usize,
    seed: u64,
    sample: super::SampleSection,
}

impl Method for CausalLm {
    type Batch = Batch;

    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn epoch_len(&self) -> Option<usize> {
        None
    }

    fn batch(&mut self, draws: &[usize]) -> Result<Batch> {
        Ok(self.data.windows(self.seed, draws))
    }

    fn units(&self, b: &Batch) -> usize {
        b.x.len()
    }

    fn loss(&mut self, b: &Batch) -> Result<Tensor> {
        window_loss(&self.model, b)
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.val.is_empty() {
            return Ok(Vec::new());
        }
        let (mut sum, mut n) = (0f64, 0usize);
        for b in &self.val {
            sum += window_loss(&self.model, b)?.to_scalar::<f32>()? as f64;
            n += b.x.len();
        }
        let loss = sum / n as f64;
        let bpb = sum / (std::f64::consts::LN_2 * self.val_bytes.max(1) as f64);
        Ok(vec![
            ("val_loss", loss),
            ("val_ppl", loss.exp()),
            ("val_bits_per_byte", bpb),
        ])
    }

    fn export(&mut self, dir: &Path) -> Result<()> {
        hf::write_files(dir, &self.model, &self.store, &self.tok)
    }

    fn after_step(&mut self, step: u64, last: bool) -> Result<Option<String>> {
        let every = self.sample.sample_every;
        if every == 0 || last || !step.is_multiple_of(every) {
            return Ok(None);
        }
        Ok(Some(format!(
            "--- sample at step {step} ---\n{}\n---",
            self.sample(step)?
        )))
    }
}

impl CausalLm {
    /// A sample from the prompt of the `[sample]` section (temperature 0.8, top-k 50).
    pub fn sample(&self, seed: u64) -> Result<String> {
        let s = &self.sample;
        let prompt = self.tok.encode(&s.sample_prompt, false)?;
        let sampling = Sampling {
            max_new_tokens: s.sample_tokens,
            temperature: 0.8,
            top_k: Some(50),
            top_p: None,
            seed,
        };
        let eos: Vec<u32> = self.tok.eos_id.into_iter().collect();
        let (ids, _) = generate(&self.model, &prompt, &sampling, &eos, |_| Ok(()))?;
        Ok(format!(
            "{}{}",
            s.sample_prompt,
            self.tok.decode(&ids, true)?
        ))
    }
}

/// Summed next-token NLL of a batch of windows (the mean is the engine's division by N).
pub fn window_loss(model: &DecoderModel, b: &Batch) -> Result<Tensor> {
    let dev = model.device();
    let t = b.x.len() / b.batch.max(1);
    let x = Tensor::from_slice(&b.x, (b.batch, t), dev)?;
    let y = Tensor::from_slice(&b.y, b.x.len(), dev)?;
    let logits = model.forward(&x)?; // (B, T, V)
    let logits = logits.reshape((b.x.len(), model.cfg.vocab_size))?;
    crate::losses::nll_sum(&logits, &y)
}

fn model_config(o: &PretrainOptions, vocab: usize) -> ModelConfig {
    let m = &o.model;
    let mut cfg = match m.arch {
        Arch::Gpt2 => {
            let mut c = ModelConfig::gpt2(vocab, m.d_model, m.n_layer, m.n_head, m.ctx);
            if let Some(f) = m.ffn {
                c.intermediate_size = f;
            }
            c
        }
        Arch::Llama => ModelConfig::llama(
            vocab,
            m.d_model,
            m.n_layer,
            m.n_head,
            m.n_kv_head.unwrap_or(m.n_head),
            m.ctx,
            m.ffn,
        ),
    };
    if let Some(theta) = m.rope_theta {
        cfg.rope_theta = theta;
    }
    cfg
}

pub fn run(o: PretrainOptions, ctl: Control) -> Result<Summary> {
    let cfg = o.check()?;
    let (files, sources) = prepare(&o, &ctl)?;
    let run_dir = files.run_dir.clone();
    let tok = tokenizer(&o, &sources, &run_dir, TokKind::Bpe, &ctl)?;
    let data = corpus(&sources, &tok, &run_dir, &o, o.data.seq_len, &ctl)?;

    // The model: the base model's weights, or fresh ones (a checkpoint's arrive in the engine).
    let (model, store) = match &o.model.init_from {
        Some(dir) => {
            let m = hf::load_dir(dir, &ctl.device, &|_| false)?;
            (m.model, m.store)
        }
        None => {
            let mut store = ParamStore::new(ctl.device.clone());
            let mc = model_config(&o, tok.vocab_size());
            let model =
                DecoderModel::new(&mc, &mut store, &Source::Random { seed: cfg.seed }, &|_| {
                    false
                })?;
            (model, store)
        }
    };
    tok.check_fits(model.cfg.vocab_size, "tokenizer")?;
    if o.data.seq_len > model.cfg.max_position_embeddings {
        bail!(
            "data.seq_len {} exceeds the model's context {}",
            o.data.seq_len,
            model.cfg.max_position_embeddings
        );
    }
    ctl.say(&format!(
        "model: {} {} layers, d={}, {} heads, ctx {}, {:.2}M parameters",
        model.cfg.model_type,
        model.cfg.num_layers,
        model.cfg.hidden_size,
        model.cfg.num_heads,
        model.cfg.max_position_embeddings,
        store.num_params() as f64 / 1e6,
    ));
    let val = data.val_batches(cfg.batch_size, o.data.eval_batches);
    let val_ids: Vec<u32> = val.iter().flat_map(|b| b.y.iter().copied()).collect();
    let val_bytes = tok.decode(&val_ids, false)?.len();
    let mut m = CausalLm {
        model,
        store,
        tok,
        data,
        val,
        val_bytes,
        seed: cfg.seed,
        sample: o.sample.clone(),
    };
    let seed = cfg.seed;
    let outcome = engine::run(&mut m, cfg, &ctl, &files)?;
    if outcome.finished() {
        let dir = crate::outdir::entry(&run_dir, "model")?;
        hf::save_dir(&dir, &m.model, &m.store, &m.tok)?;
        if !ctl.quiet {
            eprintln!("--- sample ---\n{}\n---", m.sample(seed)?);
            eprintln!("final model written to {}", dir.display());
        }
    }
    let val_loss = outcome
        .eval
        .iter()
        .find(|(k, _)| *k == "val_loss")
        .map(|e| e.1);
    Ok(Summary {
        run_dir,
        outcome,
        val_loss,
    })
}
