//! Pre-training on a raw-text corpus: causal LM (`causal`, GPT style) or masked LM (`masked`,
//! BERT style). Both read the same options and prepare the corpus the same way: tokenizer (a
//! given one, the base model's, or trained on the corpus) → cached token file → train /
//! validation windows; then each runs on the engine.

pub mod causal;
pub mod masked;

use crate::data::{collect_sources, tokenize_cached, Dataset, Pieces, SourceFile};
use crate::tokenizer::Tok;
use crate::train::engine::{Control, Outcome, RunFiles, Schedule, TrainArgs, TrainConfig};
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Causal LM (next token), GPT-2 / Llama decoders.
    Clm,
    /// Masked LM, a BERT encoder (15% of tokens, 80/10/10 mask/random/keep).
    Mlm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// LayerNorm, learned positions, GELU MLP.
    Gpt2,
    /// RMSNorm, RoPE, SwiGLU, grouped-query attention.
    Llama,
}

/// `lmforge pretrain`'s options: its flags and its TOML config (`[model]`, `[tokenizer]`,
/// `[data]`, `[train]`, `[sample]`). The defaults are the Shakespeare recipe
/// (`configs/shakespeare-gpt.toml` spells them out): a 4-layer, 192-wide Llama-style model with
/// a 2048-token BPE, 1100 steps of 16×256 tokens — about 8 minutes on 2 cores, validation
/// ≈ 1.89 bits per byte (candidates and their measurements: docs/pretraining.md).
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainOptions {
    /// Training objective; mlm trains a BERT encoder with the [model] sizes.
    #[arg(long, value_enum, default_value = "clm")]
    pub objective: Objective,
    /// Run directory (checkpoints, metrics.jsonl, final model).
    #[arg(long, default_value = "runs/shakespeare-gpt")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelSection,
    #[command(flatten)]
    pub tokenizer: TokenizerSection,
    #[command(flatten)]
    pub data: DataSection,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub sample: SampleSection,
}

#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    #[arg(long, value_enum, default_value = "llama")]
    pub arch: Arch,
    #[arg(long, default_value_t = 4)]
    pub n_layer: usize,
    #[arg(long, default_value_t = 4)]
    pub n_head: usize,
    /// Key/value heads for grouped-query attention (llama; default n_head).
    #[arg(long)]
    pub n_kv_head: Option<usize>,
    #[arg(long, default_value_t = 192)]
    pub d_model: usize,
    /// Context length (max positions).
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// MLP hidden size (default 4·d for gpt2, 8/3·d rounded to 64 for llama).
    #[arg(long)]
    pub ffn: Option<usize>,
    #[arg(long)]
    pub rope_theta: Option<f64>,
    /// Continue pre-training this HF model directory instead of starting from scratch.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
}

#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// An existing tokenizer.json; without it a tokenizer is trained on the corpus.
    #[arg(long = "tokenizer")]
    pub file: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
}

#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Corpus: text files, directories, or JSONL with a "text" field (repeatable; default the
    /// bundled Shakespeare plays).
    #[arg(long = "data")]
    pub paths: Vec<PathBuf>,
    /// The corpus's last fraction, held out for validation.
    #[arg(long, default_value_t = 0.02)]
    pub val_fraction: f64,
    /// Replace invalid UTF-8 with U+FFFD instead of failing.
    #[arg(long)]
    pub lossy_utf8: bool,
    /// Tokens per training window.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 20)]
    pub eval_batches: usize,
}

#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSection {
    /// Print a sample every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub sample_every: u64,
    #[arg(long, default_value = "ROMEO:\n")]
    pub sample_prompt: String,
    #[arg(long, default_value_t = 120)]
    pub sample_tokens: usize,
}

crate::clap_default!(
    PretrainOptions,
    ModelSection,
    TokenizerSection,
    DataSection,
    SampleSection
);

impl PretrainOptions {
    /// The engine defaults of pre-training.
    pub fn train_defaults() -> TrainConfig {
        TrainConfig {
            seed: 1337,
            max_steps: 1100,
            batch_size: 16,
            lr: 3e-3,
            min_lr: 3e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta2: 0.95,
            eval_every: 250,
            checkpoint_every: 500,
            ..TrainConfig::base()
        }
    }

    /// The corpus paths, the bundled plays when none are given.
    pub fn corpus(&self) -> Vec<PathBuf> {
        if self.data.paths.is_empty() {
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare")]
        } else {
            self.data.paths.clone()
        }
    }

    /// Resolves the engine options and checks the rest, naming the key.
    pub fn check(&self) -> Result<TrainConfig> {
        let t = self.train.resolve(&Self::train_defaults())?;
        let (m, d) = (&self.model, &self.data);
        use crate::model::limits::*;
        let sizes = [
            ("model.n_layer", m.n_layer, MAX_LAYERS),
            ("model.n_head", m.n_head, MAX_HEADS),
            ("model.n_kv_head", m.n_kv_head.unwrap_or(1), MAX_HEADS),
            ("model.d_model", m.d_model, MAX_HIDDEN),
            ("model.ctx", m.ctx, MAX_CONTEXT),
            ("model.ffn", m.ffn.unwrap_or(1), MAX_FFN),
            ("tokenizer.vocab_size", self.tokenizer.vocab_size, MAX_VOCAB),
        ];
        for (key, v, max) in sizes {
            in_range(key, v, 1, max)?;
        }
        let checks: [(bool, &str); 4] = [
            (d.seq_len > 1, "data.seq_len must be at least 2"),
            (
                (0.0..1.0).contains(&d.val_fraction),
                "data.val_fraction must be in [0, 1)",
            ),
            (
                m.d_model.is_multiple_of(m.n_head),
                "model.d_model must be divisible by model.n_head",
            ),
            (
                m.init_from.is_some() || d.seq_len <= m.ctx,
                "data.seq_len must not exceed model.ctx",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                bail!("{msg}");
            }
        }
        if let Some(th) = m.rope_theta.filter(|t| !(t.is_finite() && *t >= 1.0)) {
            bail!("model.rope_theta = {th} must be a finite number ≥ 1");
        }
        if m.init_from.is_none() {
            let d = m.d_model as u64;
            let ffn = m.ffn.map_or(4 * d, |f| f as u64);
            let embed = (self.tokenizer.vocab_size as u64 + m.ctx as u64) * d;
            let params = embed + m.n_layer as u64 * (4 * d * d + 3 * d * ffn);
            if params > MAX_FRESH_PARAMS {
                bail!(
                    "[model]: {:.1}G parameters exceed the {}G a fresh model may have (d_model, n_layer, ctx, ffn)",
                    params as f64 / 1e9,
                    MAX_FRESH_PARAMS >> 30
                );
            }
        }
        Ok(t)
    }
}

/// What `pretrain` returns: the run directory and what the engine did.
pub struct Summary {
    pub run_dir: PathBuf,
    pub outcome: Outcome,
    /// The final validation loss (nats per token), if there was a validation split.
    pub val_loss: Option<f64>,
}

/// Runs the objective of `o`. `run_dir` is `o.out`, or the resumed checkpoint's run.
pub fn run(o: PretrainOptions, ctl: Control) -> Result<Summary> {
    match o.objective {
        Objective::Clm => causal::run(o, ctl),
        Objective::Mlm => masked::run(o, ctl),
    }
}

/// Which tokenizer model to train when none is given.
#[derive(Clone, Copy)]
enum TokKind {
    Bpe,
    WordPiece,
}

/// The tokenizer of a run: on resume the checkpoint's (verified with it), else the base model's,
/// a given file, or a new one trained on the corpus and saved into the run directory.
fn tokenizer(
    o: &PretrainOptions,
    sources: &[SourceFile],
    run_dir: &Path,
    kind: TokKind,
    ctl: &Control,
) -> Result<Tok> {
    if let Some((ck, _)) = &ctl.resume {
        return Tok::from_file(&ck.join("tokenizer.json"));
    }
    if let Some(dir) = &o.model.init_from {
        return crate::tokenizer::load_from_dir(dir);
    }
    if let Some(p) = &o.tokenizer.file {
        return Tok::from_file(p);
    }
    if !crate::dist::world().writes() {
        // Rank 0 has trained it and saved it there (`dist::wait_for_main`).
        return Tok::from_file(&run_dir.join("tokenizer.json"));
    }
    let t0 = std::time::Instant::now();
    let mut err = None;
    let texts = Pieces::new(sources.to_vec(), o.data.lossy_utf8).map_while(|p| match p {
        Ok(p) => Some(p.text),
        Err(e) => {
            err = Some(e);
            None
        }
    });
    let (v, f) = (o.tokenizer.vocab_size, o.tokenizer.min_frequency);
    let tok = match kind {
        TokKind::Bpe => crate::tokenizer::train_bpe(texts, v, f)?,
        TokKind::WordPiece => crate::tokenizer::train_wordpiece(texts, v, f)?,
    };
    if let Some(e) = err {
        return Err(e);
    }
    tok.save(&crate::outdir::entry(run_dir, "tokenizer.json")?)?;
    ctl.say(&format!(
        "trained a {}-token tokenizer in {:.1}s",
        tok.vocab_size(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(tok)
}

/// Corpus → cached token file → windows of `window` tokens (+1 for the target shift).
fn corpus(
    sources: &[SourceFile],
    tok: &Tok,
    run_dir: &Path,
    o: &PretrainOptions,
    window: usize,
    ctl: &Control,
) -> Result<Dataset> {
    let t0 = std::time::Instant::now();
    let tokens = tokenize_cached(
        sources,
        tok,
        &crate::outdir::entry(run_dir, "data")?,
        o.data.lossy_utf8,
    )?;
    let data = Dataset::new(tokens, window, o.data.val_fraction)?;
    ctl.say(&format!(
        "corpus: {} files, {} tokens ({} train / {} validation) in {:.1}s",
        sources.len(),
        data.tokens.len(),
        data.train_len,
        data.val_len(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(data)
}

/// What both objectives do first: the run directory with the options saved, the sources.
fn prepare(o: &PretrainOptions, ctl: &Control) -> Result<(RunFiles, Vec<SourceFile>)> {
    let files = RunFiles::create(ctl, &o.out, o, "pretrain")?;
    let sources = collect_sources(&o.corpus())?;
    Ok((files, sources))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options with every engine key spelled out, as TOML.
    fn spelled_out(o: &PretrainOptions) -> String {
        let mut o = o.clone();
        let t = o.check().unwrap();
        o.train = TrainArgs::from(&t);
        crate::config::to_toml(&o).unwrap()
    }

    #[test]
    fn the_recipe_file_spells_out_the_defaults() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shakespeare-gpt.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let file: PretrainOptions = toml::from_str(&text).unwrap();
        assert_eq!(
            spelled_out(&file),
            spelled_out(&PretrainOptions::default()),
            "configs/shakespeare-gpt.toml and the built-in defaults differ"
        );
    }
}
