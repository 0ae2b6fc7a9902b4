//! Masked-LM pre-training of an encoder (BERT, Devlin et al. 2019 §3.1):
//!
//!   select 15% of the non-special tokens; of those 80% → [MASK], 10% → a random token,
//!   10% unchanged;   L = −(1/|S|) Σ_{i∈S} log p(x_i | x̃),   S the step's selected tokens
//!
//! `run` reads top to bottom: corpus (WordPiece trained on it unless given) → windows wrapped as
//! [CLS] … [SEP] → encoder (fresh or `model.init_from`) → the engine → `model/` as a
//! `BertForMaskedLM` directory. Each window's mask is keyed by (seed, draw), so batches are
//! built, and resumed, exactly.
//!
//! Deviations: random replacements are drawn from the non-special vocabulary (transformers'
//! collator may draw [CLS]/[PAD]); the MLM head runs only on the selected positions (same loss,
//! ~7× less head compute); no next-sentence prediction (RoBERTa showed it does not help).

use super::{corpus, prepare, tokenizer, PretrainOptions, Summary, TokKind};
use crate::data::{Batch, Dataset};
use crate::model::encoder::{Encoder, EncoderConfig, Heads};
use crate::model::params::Source;
use crate::model::{hf, ParamStore};
use crate::rng::Rng;
use crate::tokenizer::Tok;
use crate::train::engine::{self, Control, Method};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// How tokens are chosen and replaced.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    /// Fraction of eligible tokens selected (0.15).
    pub prob: f64,
    pub mask_id: u32,
    pub vocab: usize,
    /// Never selected, never drawn as a random replacement.
    pub special: Vec<u32>,
}

/// Returns (inputs, labels): labels are the original id at selected positions and −100
/// elsewhere (transformers' ignore index).
pub fn mask_tokens(ids: &[u32], spec: &MaskSpec, seed: u64) -> (Vec<u32>, Vec<i64>) {
    let mut r = Rng::keyed(&[seed, 0x3A5C]);
    let mut inp = ids.to_vec();
    let mut labels = vec![-100i64; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if spec.special.contains(&id) || r.next_f64() >= spec.prob {
            continue;
        }
        labels[i] = id as i64;
        let u = r.next_f64();
        if u < 0.8 {
            inp[i] = spec.mask_id;
        } else if u < 0.9 {
            inp[i] = loop {
                let c = r.below(spec.vocab as u64) as u32;
                if !spec.special.contains(&c) {
                    break c;
                }
            };
        }
    }
    (inp, labels)
}

/// Masked rows (B, T) and the flat positions / original ids of the selected tokens.
pub struct MaskedBatch {
    inp: Vec<u32>,
    rows: usize,
    sel: Vec<u32>,
    tgt: Vec<u32>,
}

/// An encoder learning to restore masked tokens.
pub struct MaskedLm {
    pub model: Encoder,
    pub store: ParamStore,
    pub tok: Tok,
    data: Dataset,
    val: Vec<Batch>,
    spec: MaskSpec,
    cls: u32,
    sep: u32,
    seed: u64,
}

impl MaskedLm {
    /// Wraps each window as [CLS] w [SEP] and masks it with a stream keyed by its `keys` entry.
    fn mask(&self, b: &Batch, keys: &[u64]) -> MaskedBatch {
        let w = b.x.len() / b.batch.max(1);
        let (mut inp, mut sel, mut tgt) = (Vec::new(), Vec::new(), Vec::new());
        for (r, (win, &key)) in b.x.chunks(w).zip(keys).enumerate() {
            let row: Vec<u32> = std::iter::once(self.cls)
                .chain(win.iter().copied())
                .chain(std::iter::once(self.sep))
                .collect();
            let (masked, labels) = mask_tokens(&row, &self.spec, key);
            for (i, l) in labels.iter().enumerate() {
                if *l >= 0 {
                    sel.push((r * row.len() + i) as u32);
                    tgt.push(*l as u32);
                }
            }
            inp.extend(masked);
        }
        MaskedBatch {
            inp,
            rows: b.batch,
            sel,
            tgt,
        }
    }
}

impl Method for MaskedLm {
    type Batch = MaskedBatch;

    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn epoch_len(&self) -> Option<usize> {
        None
    }

    fn batch(&mut self, draws: &[usize]) -> Result<MaskedBatch> {
        let b = self.data.windows(self.seed, draws);
        let keys: Vec<u64> = draws
            .iter()
            .map(|&d| Rng::keyed(&[self.seed, 0x3A5D, d as u64]).next_u64())
            .collect();
        Ok(self.mask(&b, &keys))
    }

    fn units(&self, b: &MaskedBatch) -> usize {
        b.sel.len()
    }

    fn tokens(&self, b: &MaskedBatch) -> usize {
        b.inp.len()
    }

    fn loss(&mut self, b: &MaskedBatch) -> Result<Tensor> {
        mlm_loss(&self.model, b, &self.store.device)
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let (mut sum, mut n) = (0f64, 0usize);
        for (i, vb) in self.val.iter().enumerate() {
            // Fixed masks, so every evaluation scores the same selections.
            let keys: Vec<u64> = (0..vb.batch)
                .map(|r| 0xE7A1 + (i * 1000 + r) as u64)
                .collect();
            let mb = self.mask(vb, &keys);
            if !mb.sel.is_empty() {
                sum += mlm_loss(&self.model, &mb, &self.store.device)?.to_scalar::<f32>()? as f64;
                n += mb.sel.len();
            }
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let l = sum / n as f64;
        Ok(vec![("val_mlm_loss", l), ("val_mlm_ppl", l.exp())])
    }

    fn export(&mut self, dir: &Path) -> Result<()> {
        hf::write_encoder_files(dir, &self.model, &self.store, &self.tok, "BertForMaskedLM")
    }
}

/// Summed NLL of the selected tokens: the encoder runs on every row, the MLM head only on the
/// selected positions.
fn mlm_loss(model: &Encoder, b: &MaskedBatch, dev: &Device) -> Result<Tensor> {
    let t = b.inp.len() / b.rows.max(1);
    let x = Tensor::from_slice(&b.inp, (b.rows, t), dev)?;
    let h = model.forward(&x, None, None)?; // (B, T, C)
    let c = model.cfg.hidden_size;
    let idx = Tensor::from_slice(&b.sel, b.sel.len(), dev)?;
    let picked = h.reshape((b.rows * t, c))?.index_select(&idx, 0)?; // (K, C)
    let logits = model.mlm_logits(&picked)?; // (K, V)
    crate::losses::nll_sum(&logits, &Tensor::from_slice(&b.tgt, b.tgt.len(), dev)?)
}

fn special_id(tok: &Tok, name: &str) -> Result<u32> {
    tok.inner.token_to_id(name).with_context(|| {
        format!("the tokenizer has no {name} token, which masked-LM training needs")
    })
}

pub fn run(o: PretrainOptions, ctl: Control) -> Result<Summary> {
    let cfg = o.check()?;
    if o.data.seq_len < 3 {
        bail!("data.seq_len must be at least 3 for [CLS] … [SEP] windows");
    }
    let (files, sources) = prepare(&o, &ctl)?;
    let run_dir = files.run_dir.clone();
    let tok = tokenizer(&o, &sources, &run_dir, TokKind::WordPiece, &ctl)?;
    let (cls, sep) = (special_id(&tok, "[CLS]")?, special_id(&tok, "[SEP]")?);
    let mask_id = special_id(&tok, "[MASK]")?;
    let data = corpus(&sources, &tok, &run_dir, &o, o.data.seq_len - 2, &ctl)?;

    let heads = Heads {
        mlm: true,
        pooler: false,
    };
    let (model, store) = match &o.model.init_from {
        Some(dir) => {
            let m = hf::load_encoder(dir, &ctl.device, heads, &|_| false)?;
            if !m.fresh.is_empty() {
                ctl.say(&format!("initialised fresh: {}", m.fresh.join(", ")));
            }
            (m.model, m.store)
        }
        None => {
            let m = &o.model;
            let mut ec =
                EncoderConfig::bert(tok.vocab_size(), m.d_model, m.n_layer, m.n_head, m.ctx);
            if let Some(f) = m.ffn {
                ec.intermediate_size = f;
            }
            ec.pad_token_id = tok.inner.token_to_id("[PAD]").unwrap_or(0);
            let mut store = ParamStore::new(ctl.device.clone());
            let src = Source::Random { seed: cfg.seed };
            let model = Encoder::new(&ec, &mut store, &src, heads, cfg.seed, &|_| false)?.0;
            (model, store)
        }
    };
    tok.check_fits(model.cfg.vocab_size, "tokenizer")?;
    if o.data.seq_len > model.cfg.max_position_embeddings {
        bail!(
            "data.seq_len {} exceeds the encoder's {} positions",
            o.data.seq_len,
            model.cfg.max_position_embeddings
        );
    }
    let special: Vec<u32> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .filter_map(|s| tok.inner.token_to_id(s))
        .collect();
    // Random replacements need at least one non-special id.
    if (0..model.cfg.vocab_size as u32).all(|i| special.contains(&i)) {
        bail!(
            "the vocabulary ({} ids) holds no token besides the special ones; nothing to draw random replacements from",
            model.cfg.vocab_size
        );
    }
    ctl.say(&format!(
        "encoder: bert {} layers, d={}, {} heads, {:.2}M parameters",
        model.cfg.num_layers,
        model.cfg.hidden_size,
        model.cfg.num_heads,
        store.num_params() as f64 / 1e6
    ));
    let spec = MaskSpec {
        prob: 0.15,
        mask_id,
        vocab: model.cfg.vocab_size,
        special,
    };
    let val = data.val_batches(cfg.batch_size, o.data.eval_batches);
    let mut m = MaskedLm {
        model,
        store,
        tok,
        data,
        val,
        spec,
        cls,
        sep,
        seed: cfg.seed,
    };
    let outcome = engine::run(&mut m, cfg, &ctl, &files)?;
    if outcome.finished() {
        let dir = crate::outdir::entry(&run_dir, "model")?;
        hf::save_encoder(&dir, &m.model, &m.store, &m.tok, "BertForMaskedLM")?;
        ctl.say(&format!("final model written to {}", dir.display()));
    }
    let val_loss = outcome
        .eval
        .iter()
        .find(|(k, _)| *k == "val_mlm_loss")
        .map(|e| e.1);
    Ok(Summary {
        run_dir,
        outcome,
        val_loss,
    })
}
