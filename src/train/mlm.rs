//! Masked-LM pre-training of an encoder (BERT, Devlin et al. 2019 §3.1):
//!
//!   select 15% of the non-special tokens; of those 80% → [MASK], 10% → a random token,
//!   10% unchanged;   L = −(1/|S|) Σ_{i∈S} log p(x_i | x̃)
//!
//! `run(opts)` reads top to bottom: tokenizer (the base model's, a given file, or WordPiece trained
//! on the corpus) → token cache → windows wrapped as [CLS] … [SEP] → encoder (fresh or
//! `model.init_from`) → loop (mask, forward, loss on selected positions, clip, AdamW, log,
//! evaluate) → `model/` as a `BertForMaskedLM` directory.
//!
//! Deviations: random replacements are drawn from the non-special vocabulary (transformers'
//! collator may draw [CLS]/[PAD]); the MLM head runs only on the selected positions (same loss,
//! ~7× less head compute); no next-sentence prediction (RoBERTa showed it does not help).
//! No mid-run checkpoints/resume yet: the run writes metrics and the final model.

use crate::data::{collect_sources, tokenize_cached, Dataset, Pieces};
use crate::losses::cross_entropy;
use crate::model::encoder::{Encoder, EncoderConfig, Heads};
use crate::model::params::Source;
use crate::model::{hf, Grads, ParamStore};
use crate::recipe::Recipe;
use crate::rng::Rng;
use crate::tokenizer::{train_wordpiece, Tok};
use crate::train::optim::{lr_at, AdamW};
use crate::train::pretrain::{Options, Summary};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::io::Write;
use std::time::Instant;

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

fn special_id(tok: &Tok, name: &str) -> Result<u32> {
    tok.inner.token_to_id(name).with_context(|| {
        format!("the tokenizer has no {name} token, which masked-LM training needs")
    })
}

/// MLM loss of rows (B, T) wrapped with [CLS]/[SEP]: masks, runs the encoder, and scores only the
/// selected positions. Returns None when nothing was selected.
fn mlm_loss(
    model: &Encoder,
    rows: &[u32],
    b: usize,
    spec: &MaskSpec,
    seed: u64,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let t = rows.len() / b;
    let (inp, labels) = mask_tokens(rows, spec, seed);
    let sel: Vec<u32> = (0..rows.len())
        .filter(|&i| labels[i] >= 0)
        .map(|i| i as u32)
        .collect();
    if sel.is_empty() {
        return Ok(None);
    }
    let tgt: Vec<u32> = sel.iter().map(|&i| labels[i as usize] as u32).collect();
    let x = Tensor::from_vec(inp, (b, t), dev)?;
    let h = model.forward(&x, None, None)?; // (B, T, C)
    let c = model.cfg.hidden_size;
    let picked = h
        .reshape((b * t, c))?
        .index_select(&Tensor::from_vec(sel, tgt.len(), dev)?, 0)?; // (K, C)
    let logits = model.mlm_logits(&picked)?; // (K, V)
    Ok(Some(cross_entropy(
        &logits,
        &Tensor::from_vec(tgt, logits.dim(0)?, dev)?,
    )?))
}

/// Windows of `t - 2` corpus tokens as [CLS] w [SEP] rows.
fn wrap(x: &[u32], b: usize, cls: u32, sep: u32) -> Vec<u32> {
    let w = x.len() / b;
    x.chunks(w)
        .flat_map(|c| {
            std::iter::once(cls)
                .chain(c.iter().copied())
                .chain(std::iter::once(sep))
        })
        .collect()
}

pub fn run(opts: Options) -> Result<Summary> {
    let Options {
        recipe,
        device,
        resume,
        quiet,
        ..
    } = opts;
    if resume.is_some() {
        bail!("--resume is not supported for --objective mlm yet");
    }
    let r: &Recipe = &recipe;
    let run_dir = r.output.dir.clone();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    crate::fsutil::write_file(&run_dir.join("config.toml"), r.to_toml()?.as_bytes())?;
    let say = |s: &str| {
        if !quiet {
            eprintln!("{s}");
        }
    };

    // 1. Tokenizer.
    let sources = collect_sources(&r.data.paths)?;
    let tok = if let Some(dir) = &r.model.init_from {
        crate::tokenizer::load_from_dir(dir)?
    } else if let Some(p) = &r.tokenizer.path {
        Tok::from_file(p)?
    } else {
        let texts =
            Pieces::new(sources.clone(), r.data.lossy_utf8).filter_map(|p| p.ok().map(|p| p.text));
        let tok = train_wordpiece(texts, r.tokenizer.vocab_size, r.tokenizer.min_frequency)?;
        tok.save(&run_dir.join("tokenizer.json"))?;
        say(&format!(
            "trained a {}-token WordPiece tokenizer",
            tok.vocab_size()
        ));
        tok
    };
    let (cls, sep) = (special_id(&tok, "[CLS]")?, special_id(&tok, "[SEP]")?);
    let mask_id = special_id(&tok, "[MASK]")?;

    // 2. Corpus → windows.
    let t = &r.train;
    if t.seq_len < 3 {
        bail!("train.seq_len must be at least 3 for [CLS] … [SEP] windows");
    }
    let tokens = tokenize_cached(&sources, &tok, &run_dir.join("data"), r.data.lossy_utf8)?;
    let data = Dataset::new(tokens, t.seq_len - 2, r.data.val_fraction)?;

    // 3. Encoder.
    let mut store = ParamStore::new(device.clone());
    let heads = Heads {
        mlm: true,
        pooler: false,
    };
    let model = match &r.model.init_from {
        Some(dir) => {
            let m = hf::load_encoder(dir, &device, heads, &|_| false)?;
            if !m.fresh.is_empty() {
                say(&format!("initialised fresh: {}", m.fresh.join(", ")));
            }
            store = m.store;
            m.model
        }
        None => {
            let m = &r.model;
            let mut cfg =
                EncoderConfig::bert(tok.vocab_size(), m.d_model, m.n_layer, m.n_head, m.ctx);
            if let Some(f) = m.ffn {
                cfg.intermediate_size = f;
            }
            cfg.pad_token_id = tok.inner.token_to_id("[PAD]").unwrap_or(0);
            Encoder::new(
                &cfg,
                &mut store,
                &Source::Random { seed: t.seed },
                heads,
                t.seed,
                &|_| false,
            )?
            .0
        }
    };
    tok.check_fits(model.cfg.vocab_size, "tokenizer")?;
    if t.seq_len > model.cfg.max_position_embeddings {
        bail!(
            "train.seq_len {} exceeds the encoder's {} positions",
            t.seq_len,
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
    let spec = MaskSpec {
        prob: 0.15,
        mask_id,
        vocab: model.cfg.vocab_size,
        special,
    };
    say(&format!(
        "encoder: bert {} layers, d={}, {} heads, {:.2}M parameters",
        model.cfg.num_layers,
        model.cfg.hidden_size,
        model.cfg.num_heads,
        store.num_params() as f64 / 1e6
    ));

    // 4. Loop.
    let mut opt = AdamW::new(&store, t.adamw())?;
    let mut metrics = std::fs::File::create(run_dir.join("metrics.jsonl"))?;
    let val = data.val_batches(t.batch_size, t.eval_batches);
    let evaluate = |model: &Encoder| -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for (i, vb) in val.iter().enumerate() {
            let rows = wrap(&vb.x, vb.batch, cls, sep);
            if let Some(l) = mlm_loss(model, &rows, vb.batch, &spec, 0xE7A1 + i as u64, &device)? {
                sum += l.to_scalar::<f32>()? as f64;
                n += 1;
            }
        }
        if n == 0 {
            bail!("the validation split holds no complete window");
        }
        Ok(sum / n as f64)
    };
    let started = Instant::now();
    let mut losses = Vec::new();
    let mut val_loss = None;
    for step in 0..t.max_steps {
        let lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
        // Each micro-batch's loss is a mean over its selected tokens; the step averages the
        // micro-batches that selected any (a window can, rarely, select nothing). Backward runs
        // per micro-batch so only one graph is alive; the sum is scaled by 1/n afterwards.
        let mut grads: Option<Grads> = None;
        let (mut loss_sum, mut n) = (0f32, 0usize);
        for micro in 0..t.grad_accum as u64 {
            let b = data.train_batch(t.seed, step, micro, t.batch_size);
            let rows = wrap(&b.x, b.batch, cls, sep);
            let seed = t.seed ^ (step << 16) ^ micro;
            let Some(loss) = mlm_loss(&model, &rows, b.batch, &spec, seed, &device)? else {
                continue;
            };
            loss_sum += loss.to_scalar::<f32>()?;
            n += 1;
            let g = store.grads(&loss.backward()?);
            match grads.as_mut() {
                Some(acc) => acc.accumulate(g)?,
                None => grads = Some(g),
            }
        }
        let Some(mut grads) = grads else { continue };
        if n > 1 {
            grads.scale(1.0 / n as f64)?;
        }
        let loss = loss_sum / n as f32;
        if !loss.is_finite() {
            bail!("loss became {loss} at step {step}; lower train.lr");
        }
        let norm = grads.global_norm()?;
        if t.grad_clip > 0.0 && norm > t.grad_clip {
            grads.scale(t.grad_clip / norm)?;
        }
        opt.step(&store, &grads, lr)?;
        losses.push((step + 1, loss));
        writeln!(
            metrics,
            "{}",
            json!({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm})
        )?;
        let last = step + 1 == t.max_steps;
        if (t.eval_every > 0 && (step + 1).is_multiple_of(t.eval_every)) || last {
            let v = evaluate(&model)?;
            val_loss = Some(v);
            writeln!(
                metrics,
                "{}",
                json!({"step": step + 1, "val_mlm_loss": v, "val_mlm_ppl": v.exp()})
            )?;
            say(&format!(
                "step {:>6}  train MLM loss {loss:.4}  val MLM loss {v:.4}",
                step + 1
            ));
        } else if !quiet && (step + 1).is_multiple_of((t.max_steps / 20).max(1)) {
            eprintln!(
                "step {:>6}/{}  MLM loss {loss:.4}  lr {lr:.2e}",
                step + 1,
                t.max_steps
            );
        }
    }
    let dir = run_dir.join("model");
    hf::save_encoder(&dir, &model, &store, &tok, "BertForMaskedLM")?;
    say(&format!("final model written to {}", dir.display()));
    Ok(Summary {
        run_dir,
        steps: t.max_steps,
        losses,
        val_loss,
        interrupted: false,
        seconds: started.elapsed().as_secs_f64(),
    })
}
