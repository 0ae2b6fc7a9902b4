//! Supervised fine-tuning (instruction tuning; Ouyang et al. 2022 §3.5, TRL's `SFTTrainer`):
//!
//!   L = −(1/|M|) Σ_{t∈M} log p(x_t | x_<t)
//!
//! where M holds the completion / assistant tokens of every example in the optimizer step
//! (all tokens with `train_on_prompt`). `run(opts)` reads top to bottom: base model → data →
//! optional LoRA → forgetting baseline → loop (accumulated micro-batches, clip, AdamW, log) →
//! output (an HF model directory, or a PEFT adapter directory, optionally merged too) →
//! forgetting after.
//!
//! Batches are right-padded: with causal attention, padding after a sequence cannot change the
//! tokens before it, so no attention mask is needed and padded positions just carry no loss.
//! Examples are visited in a fresh keyed permutation per epoch, so runs are reproducible.

use crate::chat::ChatTemplate;
use crate::data::sft::{read_jsonl, tokenize_all, Counts, Formatter, Tokenized, DEFAULT_TEMPLATE};
use crate::eval::score::{score_text_ids, Score};
use crate::fsutil::write_dir;
use crate::model::{hf, DecoderModel, ForwardOpts, Grads, Packing, ParamStore};
use crate::peft::lora::{self, LoraConfig};
use crate::peft::AdapterSwitch;
use crate::rng::{permutation, Stream};
use crate::train::optim::{lr_at, AdamW, AdamWConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Options {
    /// Base model: HF directory or .gguf file.
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub epochs: usize,
    pub max_steps: Option<u64>,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Examples are truncated to this many tokens (capped at the model's context).
    pub max_len: usize,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub train_on_prompt: bool,
    /// Several examples per sequence (attention and positions kept per example).
    pub packing: bool,
    pub chat_template: Option<PathBuf>,
    /// LoRA instead of a full fine-tune.
    pub lora: Option<LoraConfig>,
    /// With LoRA: also write the merged model to `out/model`.
    pub merge: bool,
    /// Text whose perplexity is measured before and after (how much the model forgot).
    pub forgetting_eval: Option<PathBuf>,
    pub device: Device,
    pub quiet: bool,
}

pub struct Summary {
    pub steps: u64,
    pub losses: Vec<f32>,
    pub counts: Counts,
    pub trainable: usize,
    pub total: usize,
    pub forgetting: Option<(Score, Score)>,
    pub seconds: f64,
    /// Where the result went: `out/model` or `out/adapter`.
    pub output: PathBuf,
}

pub fn run(o: Options) -> Result<Summary> {
    let say = |s: &str| {
        if !o.quiet {
            eprintln!("{s}");
        }
    };
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;

    // 1. Base model: every weight frozen for LoRA (no gradient, no weight-gradient GEMM).
    let peft = o.lora.is_some();
    let mut m = hf::load(&o.model, &o.device, &|_| peft)?;
    let template = match &o.chat_template {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => m.chat_template.clone(),
    };
    let has_own_template = template.is_some();
    let template = template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    m.chat_template = Some(template.clone());
    let tpl: ChatTemplate = m.chat("sft")?;

    // 2. Data.
    let examples = read_jsonl(&o.data)?;
    let ctx = m.model.cfg.max_position_embeddings;
    let max_len = o.max_len.min(ctx);
    if max_len < 2 {
        bail!("--max-len must be at least 2");
    }
    let fmt = Formatter {
        tok: &m.tok,
        template: Some(&tpl),
        train_on_prompt: o.train_on_prompt,
        eos: m.eos_ids.first().copied().or(m.tok.eos_id),
    };
    if !has_own_template
        && examples
            .iter()
            .any(|e| matches!(e.example, crate::data::sft::Example::Chat(_)))
    {
        say("note: the model has no chat template; conversations use the default ChatML template");
    }
    let (data, counts) = tokenize_all(&fmt, &examples, max_len, |w| say(w))?;
    let targets: usize = data.iter().map(Tokenized::n_targets).sum();
    say(&format!(
        "data: {} examples ({} truncated, {} skipped), {targets} trained tokens",
        data.len(),
        counts.truncated,
        counts.dropped
    ));

    // 3. Forgetting baseline, measured on the base model.
    let forget_ids = match &o.forgetting_eval {
        Some(p) => Some(read_text_ids(p, &m.tok)?),
        None => None,
    };
    let before = match &forget_ids {
        Some(ids) => Some(score_text_ids(&m.model, ids)?),
        None => None,
    };

    // 4. Adapters.
    let switch = AdapterSwitch::default();
    let adapters = match &o.lora {
        Some(cfg) => Some(lora::attach(
            &mut m.model,
            &mut m.store,
            cfg,
            None,
            o.seed,
            &switch,
        )?),
        None => None,
    };
    let (trainable, total) = (m.store.num_trainable(), m.store.num_params());
    say(&format!(
        "trainable parameters: {trainable} of {total} ({:.3}%){}",
        100.0 * trainable as f64 / total as f64,
        match &adapters {
            Some(a) => format!(", LoRA r={} on {} layers", a.cfg.r, a.modules.len()),
            None => String::new(),
        }
    ));

    // 5. Loop.
    let mut opt = AdamW::new(&m.store, AdamWConfig::with_weight_decay(o.weight_decay))?;
    let per_step = o.batch_size * o.grad_accum;
    if per_step == 0 {
        bail!("--batch-size and --grad-accum must be positive");
    }
    let rows = rows_of(&data, o.packing, max_len, o.seed);
    if o.packing {
        say(&format!(
            "packing: {} examples into {} rows of up to {max_len} tokens",
            data.len(),
            rows.len()
        ));
    }
    let total_steps = o
        .max_steps
        .unwrap_or((o.epochs * rows.len()).div_ceil(per_step) as u64);
    if total_steps == 0 {
        bail!("nothing to do: 0 steps (check --epochs / --max-steps)");
    }
    let pad = fmt.eos.unwrap_or(0);
    let mut metrics = std::fs::File::create(o.out.join("metrics.jsonl"))
        .with_context(|| format!("creating {}", o.out.join("metrics.jsonl").display()))?;
    let started = Instant::now();
    let mut losses = Vec::new();
    let mut stream = Stream::new(o.seed, rows.len());
    for step in 0..total_steps {
        let t0 = Instant::now();
        let lr = lr_at(step, o.lr, 0.0, o.warmup_steps, total_steps);
        let micro: Vec<Vec<Vec<&Tokenized>>> = (0..o.grad_accum)
            .map(|mi| {
                (0..o.batch_size)
                    .map(|i| {
                        let p = (step as usize * o.grad_accum + mi) * o.batch_size + i;
                        rows[stream.get(p)].iter().map(|&e| &data[e]).collect()
                    })
                    .collect()
            })
            .collect();
        let n_targets: usize = micro
            .iter()
            .flatten()
            .flatten()
            .map(|t| t.n_targets())
            .sum();
        let mut grads: Option<Grads> = None;
        let mut nll = 0f64;
        for (mi, exs) in micro.iter().enumerate() {
            switch.set_training(true, (step << 8) ^ mi as u64 ^ o.seed.rotate_left(32));
            let (sum, g) = masked_step(&m.model, &m.store, exs, pad, n_targets)?;
            nll += sum;
            match grads.as_mut() {
                Some(acc) => acc.accumulate(g)?,
                None => grads = Some(g),
            }
        }
        switch.set_training(false, 0);
        let mut grads = grads.context("no micro-batch")?;
        let loss = (nll / n_targets as f64) as f32;
        if !loss.is_finite() {
            bail!("loss became {loss} at step {step}; lower --lr");
        }
        let norm = grads.global_norm()?;
        if o.grad_clip > 0.0 && norm > o.grad_clip {
            grads.scale(o.grad_clip / norm)?;
        }
        opt.step(&m.store, &grads, lr)?;
        losses.push(loss);
        let dt = t0.elapsed().as_secs_f64();
        let rss = crate::bench::peak_rss_mib();
        writeln!(
            metrics,
            "{}",
            json!({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
                   "trained_tokens": n_targets, "step_s": dt,
                   "peak_rss_mib": rss})
        )?;
        if !o.quiet && ((step + 1) % (total_steps / 20).max(1) == 0 || step + 1 == total_steps) {
            eprintln!(
                "step {:>5}/{total_steps}  loss {loss:.4}  lr {lr:.2e}  {dt:.2}s  peak RSS {rss:.0} MiB",
                step + 1
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    // 6. Output.
    let base = o.model.display().to_string();
    let output = match &adapters {
        Some(a) => {
            let dir = o.out.join("adapter");
            write_dir(&dir, |tmp| {
                a.write_files(tmp, &m.store, &base, &lora::Head::causal_lm())?;
                m.tok.save(&tmp.join("tokenizer.json"))?;
                std::fs::write(tmp.join("chat_template.jinja"), &template)?;
                Ok(())
            })?;
            if o.merge {
                a.merge(&mut m.model, &m.store)?;
                hf::save_loaded(&o.out.join("model"), &m)?;
                say(&format!(
                    "merged model written to {}",
                    o.out.join("model").display()
                ));
            }
            dir
        }
        None => {
            let dir = o.out.join("model");
            hf::save_loaded(&dir, &m)?;
            dir
        }
    };
    say(&format!("wrote {}", output.display()));

    // 7. Forgetting: the same text under the fine-tuned model.
    let forgetting = match (&forget_ids, before) {
        (Some(ids), Some(b)) => {
            let after = score_text_ids(&m.model, ids)?;
            writeln!(
                metrics,
                "{}",
                json!({"forgetting_eval": o.forgetting_eval.as_ref().map(|p| p.display().to_string()),
                       "ppl_before": b.ppl(), "ppl_after": after.ppl(), "tokens": b.tokens})
            )?;
            Some((b, after))
        }
        _ => None,
    };
    writeln!(
        metrics,
        "{}",
        json!({"summary": true, "steps": total_steps, "final_loss": losses.last(),
               "examples": data.len(), "truncated": counts.truncated, "skipped": counts.dropped,
               "trainable_params": trainable, "total_params": total, "seconds": seconds})
    )?;
    Ok(Summary {
        steps: total_steps,
        losses,
        counts,
        trainable,
        total,
        forgetting,
        seconds,
        output,
    })
}

/// Groups examples into rows: one example per row, or with `packing` as many consecutive
/// examples (in a seeded shuffled order) as fit into `max_len` tokens.
pub fn rows_of(data: &[Tokenized], packing: bool, max_len: usize, seed: u64) -> Vec<Vec<usize>> {
    if !packing {
        return (0..data.len()).map(|i| vec![i]).collect();
    }
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0usize;
    for i in permutation(seed ^ 0xBAC4, 0, data.len()) {
        let len = data[i].ids.len() - 1; // inputs: every token but the last
        if rows.is_empty() || used + len > max_len - 1 {
            rows.push(Vec::new());
            used = 0;
        }
        rows.last_mut().expect("a row was just pushed").push(i);
        used += len;
    }
    rows
}

/// A right-padded batch of rows, each the concatenation of its examples.
pub struct RowBatch {
    /// Inputs (B, T), targets and loss weights (B·T).
    pub x: Vec<u32>,
    pub y: Vec<u32>,
    pub w: Vec<f32>,
    pub t: usize,
    /// The examples' lengths per row.
    pub segments: Vec<Vec<usize>>,
}

pub fn build_batch(rows: &[Vec<&Tokenized>], pad: u32) -> RowBatch {
    let len = |r: &Vec<&Tokenized>| r.iter().map(|e| e.ids.len() - 1).sum::<usize>();
    let t = rows.iter().map(len).max().unwrap_or(1).max(1);
    let (mut x, mut y, mut w, mut segs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        for e in r {
            let n = e.ids.len() - 1;
            x.extend_from_slice(&e.ids[..n]);
            y.extend_from_slice(&e.ids[1..]);
            w.extend(e.train[1..].iter().map(|&b| if b { 1f32 } else { 0.0 }));
        }
        let n = len(r);
        x.extend(std::iter::repeat_n(pad, t - n));
        y.extend(std::iter::repeat_n(pad, t - n));
        w.extend(std::iter::repeat_n(0f32, t - n));
        segs.push(r.iter().map(|e| e.ids.len() - 1).collect());
    }
    RowBatch {
        x,
        y,
        w,
        t,
        segments: segs,
    }
}

/// Forward + backward of one micro-batch whose loss is its summed NLL over trained tokens
/// divided by the step's trained-token count. Returns the summed NLL and the gradients.
/// Rows holding several examples run with `Packing` (positions and attention per example).
pub fn masked_step(
    model: &DecoderModel,
    store: &ParamStore,
    rows: &[Vec<&Tokenized>],
    pad: u32,
    step_targets: usize,
) -> Result<(f64, Grads)> {
    let dev = model.device();
    let RowBatch {
        x,
        y,
        w,
        t,
        segments: segs,
    } = build_batch(rows, pad);
    let b = rows.len();
    let x = Tensor::from_vec(x, (b, t), dev)?;
    let y = Tensor::from_vec(y, b * t, dev)?;
    let w = Tensor::from_vec(w, b * t, dev)?;
    let packing = if segs.iter().any(|s| s.len() > 1) {
        Some(Packing::new(&segs, t, dev)?)
    } else {
        None
    };
    let opts = ForwardOpts {
        packing: packing.as_ref(),
        ..Default::default()
    };
    let h = model.hidden_states(&model.embed(&x)?, opts)?;
    let logits = model.logits(&h)?.reshape((b * t, model.cfg.vocab_size))?;
    let nll = (crate::losses::gather_logprobs(&logits, &y)?.neg()? * w)?.sum_all()?;
    let sum = nll.to_scalar::<f32>()? as f64;
    let grads = (nll / step_targets.max(1) as f64)?.backward()?;
    Ok((sum, store.grads(&grads)))
}

fn read_text_ids(p: &Path, tok: &crate::tokenizer::Tok) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let ids = tok.encode(&text, true)?;
    if ids.len() < 2 {
        bail!("{}: too short to measure perplexity on", p.display());
    }
    Ok(ids)
}
