//! Causal-LM pre-training (Radford et al. 2018/2019): minimise the mean next-token
//! cross-entropy  L = −(1/N) Σₜ log p(xₜ₊₁ | x≤ₜ)  over random windows of the corpus.
//!
//! `run(recipe)` reads top to bottom: tokenizer → token cache → model → AdamW → loop of
//! (accumulated micro-batches, clip, update, log, evaluate, checkpoint) → final model.
//! Resuming restores weights, moments and step; batches are keyed by (seed, step), so a resumed
//! run sees exactly the batches and produces exactly the losses of an uninterrupted one.

use crate::data::{collect_sources, tokenize_cached, Batch, Dataset, Pieces};
use crate::generate::{generate, Sampling};
use crate::losses::cross_entropy;
use crate::model::params::Source;
use crate::model::{hf, DecoderModel, Grads, ModelConfig, ParamStore};
use crate::recipe::{Arch, Recipe};
use crate::tokenizer::{train_bpe, Tok};
use crate::train::checkpoint::{self, Checkpoint, TrainerState};
use crate::train::optim::{lr_at, AdamW};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct Options {
    pub recipe: Recipe,
    pub device: Device,
    /// Continue from this checkpoint (already resolved by `checkpoint::resolve`).
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many steps, as if interrupted.
    pub stop_at: Option<u64>,
    /// Set by Ctrl-C: finish the current step, checkpoint, return.
    pub interrupt: Arc<AtomicBool>,
    pub quiet: bool,
}

pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub losses: Vec<(u64, f32)>,
    pub val_loss: Option<f64>,
    pub interrupted: bool,
    pub seconds: f64,
}

pub fn run(opts: Options) -> Result<Summary> {
    let Options {
        recipe,
        device,
        resume,
        stop_at,
        interrupt,
        quiet,
    } = opts;
    let r = &recipe;
    let run_dir = match &resume {
        Some(ck) => checkpoint::run_dir_of(ck)?,
        None => r.output.dir.clone(),
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let recipe_toml = r.to_toml()?;
    crate::fsutil::write_file(&run_dir.join("config.toml"), recipe_toml.as_bytes())?;
    let say = |s: &str| {
        if !quiet {
            eprintln!("{s}");
        }
    };

    // 1. Tokenizer: the checkpoint's, the base model's, a given file, or trained on the corpus.
    let sources = collect_sources(&r.data.paths)?;
    let tok = if let Some(ck) = &resume {
        crate::tokenizer::load_from_dir(ck)?
    } else if let Some(dir) = &r.model.init_from {
        crate::tokenizer::load_from_dir(dir)?
    } else if let Some(p) = &r.tokenizer.path {
        Tok::from_file(p)?
    } else {
        let t0 = Instant::now();
        let mut err = None;
        let texts = Pieces::new(sources.clone(), r.data.lossy_utf8).map_while(|p| match p {
            Ok(p) => Some(p.text),
            Err(e) => {
                err = Some(e);
                None
            }
        });
        let tok = train_bpe(texts, r.tokenizer.vocab_size, r.tokenizer.min_frequency)?;
        if let Some(e) = err {
            return Err(e);
        }
        tok.save(&run_dir.join("tokenizer.json"))?;
        say(&format!(
            "trained a {}-token BPE tokenizer in {:.1}s",
            tok.vocab_size(),
            t0.elapsed().as_secs_f64()
        ));
        tok
    };

    // 2. Corpus → cached token file → train/validation windows.
    let t0 = Instant::now();
    let tokens = tokenize_cached(&sources, &tok, &run_dir.join("data"), r.data.lossy_utf8)?;
    let data = Dataset::new(tokens, r.train.seq_len, r.data.val_fraction)?;
    say(&format!(
        "corpus: {} files, {} tokens ({} train / {} validation) in {:.1}s",
        sources.len(),
        data.tokens.len(),
        data.train_len,
        data.val_len(),
        t0.elapsed().as_secs_f64()
    ));

    // 3. Model and optimizer, fresh or restored.
    let none_frozen = |_: &str| false;
    let (model, store) = if let Some(dir) = resume.as_ref().or(r.model.init_from.as_ref()) {
        let loaded = hf::load_dir(dir, &device, &none_frozen)?;
        (loaded.model, loaded.store)
    } else {
        let mut store = ParamStore::new(device.clone());
        let cfg = model_config(r, tok.vocab_size());
        let model = DecoderModel::new(
            &cfg,
            &mut store,
            &Source::Random { seed: r.train.seed },
            &none_frozen,
        )?;
        (model, store)
    };
    tok.check_fits(model.cfg.vocab_size, "tokenizer")?;
    if r.train.seq_len > model.cfg.max_position_embeddings {
        bail!(
            "train.seq_len {} exceeds the model's context {}",
            r.train.seq_len,
            model.cfg.max_position_embeddings
        );
    }
    let t = &r.train;
    let mut opt = AdamW::new(&store, t.adamw())?;
    let mut state = TrainerState {
        step: 0,
        tokens_seen: 0,
        elapsed_s: 0.0,
        lmforge_version: env!("CARGO_PKG_VERSION").into(),
    };
    let metrics_path = run_dir.join("metrics.jsonl");
    if let Some(ck) = &resume {
        let (s, _) = checkpoint::read_state(ck)?;
        let moments = candle_core::safetensors::load(ck.join("optimizer.safetensors"), &device)
            .with_context(|| format!("{}: cannot read optimizer.safetensors", ck.display()))?;
        opt.load_state(&store, s.step, &moments, &ck.display().to_string())?;
        truncate_metrics(&metrics_path, s.step)?;
        say(&format!("resumed from {} at step {}", ck.display(), s.step));
        state = s;
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    say(&format!(
        "model: {} {} layers, d={}, {} heads, ctx {}, {:.2}M parameters ({:.2}M trainable)",
        model.cfg.model_type,
        model.cfg.num_layers,
        model.cfg.hidden_size,
        model.cfg.num_heads,
        model.cfg.max_position_embeddings,
        store.num_params() as f64 / 1e6,
        store.num_trainable() as f64 / 1e6
    ));

    // 4. The loop.
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)?;
    let val_batches = data.val_batches(t.batch_size, t.eval_batches);
    let total = t.max_steps;
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(state.step);
    let tokens_per_step = (t.batch_size * t.seq_len * t.grad_accum) as u64;
    let mut losses = Vec::new();
    let mut val_loss = None;
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut interrupted = false;
    let sample = |model: &DecoderModel, seed: u64| -> Result<String> {
        let prompt = tok.encode(&t.sample_prompt, false)?;
        let s = Sampling {
            max_new_tokens: t.sample_tokens,
            temperature: 0.8,
            top_k: Some(50),
            top_p: None,
            seed,
        };
        let (ids, _) = generate(
            model,
            &prompt,
            &s,
            &tok.eos_id.into_iter().collect::<Vec<_>>(),
            |_| Ok(()),
        )?;
        Ok(format!("{}{}", t.sample_prompt, tok.decode(&ids, true)?))
    };

    while state.step < total {
        let step = state.step;
        let t_step = Instant::now();
        let lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, total);
        let mut grads: Option<Grads> = None;
        let mut loss_sum = 0f32;
        for micro in 0..t.grad_accum as u64 {
            let b = data.train_batch(t.seed, step, micro, t.batch_size);
            let (loss, g) = lm_step(&model, &store, &b, t.grad_accum)?;
            loss_sum += loss;
            match grads.as_mut() {
                Some(acc) => acc.accumulate(g)?,
                None => grads = Some(g),
            }
        }
        let mut grads = grads.context("grad_accum must be positive")?;
        let loss = loss_sum / t.grad_accum as f32;
        if !loss.is_finite() {
            bail!("loss became {loss} at step {step}; lower train.lr or enable train.grad_clip");
        }
        let norm = grads.global_norm()?;
        if t.grad_clip > 0.0 && norm > t.grad_clip {
            grads.scale(t.grad_clip / norm)?;
        }
        opt.step(&store, &grads, lr)?;
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let dt = t_step.elapsed().as_secs_f64();
        let tps = tokens_per_step as f64 / dt;
        losses.push((state.step, loss));
        writeln!(
            metrics,
            "{}",
            json!({"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps,
                   "tokens": state.tokens_seen, "elapsed_s": state.elapsed_s})
        )?;
        pb.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        pb.set_position(state.step);
        if pb.is_hidden() && !quiet && state.step.is_multiple_of((total / 20).max(1)) {
            eprintln!(
                "step {:>6}/{total}  loss {loss:.4}  lr {lr:.2e}  {tps:.0} tok/s",
                state.step
            );
        }

        let last = state.step == total;
        if (t.eval_every > 0 && state.step.is_multiple_of(t.eval_every)) || last {
            let v = evaluate(&model, &val_batches, &device)?;
            val_loss = Some(v);
            writeln!(
                metrics,
                "{}",
                json!({"step": state.step, "val_loss": v, "val_ppl": v.exp()})
            )?;
            log(
                &pb,
                quiet,
                &format!(
                    "step {:>6}  train loss {loss:.4}  val loss {v:.4}  val ppl {:.2}",
                    state.step,
                    v.exp()
                ),
            );
        }
        if t.sample_every > 0 && state.step.is_multiple_of(t.sample_every) && !last {
            log(
                &pb,
                quiet,
                &format!(
                    "--- sample at step {} ---\n{}\n---",
                    state.step,
                    sample(&model, state.step)?
                ),
            );
        }
        let stop_now = stop_at == Some(state.step);
        interrupted = interrupt.load(Ordering::SeqCst);
        if (t.checkpoint_every > 0 && state.step.is_multiple_of(t.checkpoint_every))
            || last
            || stop_now
            || interrupted
        {
            let ck = Checkpoint {
                model: &model,
                store: &store,
                tok: &tok,
                opt: &opt,
                state: &state,
                recipe_toml: &recipe_toml,
            };
            let dir = checkpoint::save(&run_dir, &ck, t.keep_checkpoints)?;
            if interrupted || stop_now {
                log(
                    &pb,
                    quiet,
                    &format!(
                        "stopped at step {}; checkpoint written to {}",
                        state.step,
                        dir.display()
                    ),
                );
                break;
            }
        }
    }
    pb.finish_and_clear();
    metrics.flush()?;
    if state.step == total && !interrupted {
        hf::save_dir(&run_dir.join("model"), &model, &store, &tok)?;
        if !quiet {
            eprintln!("--- sample ---\n{}\n---", sample(&model, t.seed)?);
            eprintln!("final model written to {}", run_dir.join("model").display());
        }
    }
    Ok(Summary {
        run_dir,
        steps: state.step,
        losses,
        val_loss,
        interrupted,
        seconds: state.elapsed_s,
    })
}

fn model_config(r: &Recipe, vocab: usize) -> ModelConfig {
    let m = &r.model;
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

/// Forward + backward of one micro-batch; the loss is divided by `accum` so that summed
/// gradients equal the gradient of the mean over the whole batch. Returns the unscaled loss.
pub fn lm_step(
    model: &DecoderModel,
    store: &ParamStore,
    b: &Batch,
    accum: usize,
) -> Result<(f32, Grads)> {
    let dev = model.device();
    let t = b.x.len() / b.batch;
    let x = Tensor::from_slice(&b.x, (b.batch, t), dev)?;
    let y = Tensor::from_slice(&b.y, b.x.len(), dev)?;
    let logits = model.forward(&x)?; // (B, T, V)
    let loss = cross_entropy(&logits.reshape((b.x.len(), model.cfg.vocab_size))?, &y)?;
    let value = loss.to_scalar::<f32>()?;
    let grads = (loss / accum as f64)?.backward()?;
    Ok((value, store.grads(&grads)))
}

/// Mean validation loss over the given batches (token-weighted).
pub fn evaluate(model: &DecoderModel, batches: &[Batch], dev: &Device) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for b in batches {
        let t = b.x.len() / b.batch;
        let x = Tensor::from_slice(&b.x, (b.batch, t), dev)?;
        let y = Tensor::from_slice(&b.y, b.x.len(), dev)?;
        let logits = model.forward(&x)?.detach();
        let loss = cross_entropy(&logits.reshape((b.x.len(), model.cfg.vocab_size))?, &y)?;
        sum += loss.to_scalar::<f32>()? as f64 * b.x.len() as f64;
        n += b.x.len();
    }
    if n == 0 {
        bail!("the validation split holds no complete window");
    }
    Ok(sum / n as f64)
}

/// Prints above the progress bar, or to stderr when there is no bar (not a terminal).
fn log(pb: &ProgressBar, quiet: bool, msg: &str) {
    if quiet {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Keeps only the metrics of steps ≤ `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::fsutil::write_file(path, out.as_bytes())
}
