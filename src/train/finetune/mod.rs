//! Task fine-tuning: a pre-trained body (BERT encoder or decoder, `model::backbone`) under a
//! fresh task head, in full or with LoRA — one module per task: `classify` (sequences), `ner`
//! (tokens), `qa` (extractive spans). What they share lives here: the options, loading the body
//! and adding the head, the forgetting report, and the outputs (`out/model` as the transformers
//! class with that head, or `out/adapter` with the head as PEFT's `modules_to_save`).

pub mod classify;
pub mod ner;
pub mod qa;

use crate::eval::score::Forgetting;
use crate::fsutil::write_json;
use crate::model::backbone::{saved_with_head, Backbone, LoadedBackbone};
use crate::model::layers::{Builder, Layout, Linear};
use crate::model::params::Source;
use crate::outdir::{self, write_output};
use crate::peft::lora;
use crate::peft::Adapters;
use crate::peft::{AdapterSwitch, PeftArgs};
use crate::train::engine::{self, Control, Method, Metrics, Outcome, RunFiles, Schedule};
use crate::train::engine::{TrainArgs, TrainConfig};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Sequence classification (text, label): accuracy and macro-F1.
    Classify,
    /// Token classification / NER (CoNLL BIO files): entity-level F1.
    Ner,
    /// Extractive question answering (SQuAD v1.1 JSON), encoders: exact match and F1.
    Qa,
}

/// `lmforge finetune`'s options: its flags and its TOML config (`[peft]`, `[train]` sections).
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneOptions {
    #[arg(long, value_enum)]
    pub task: Option<TaskKind>,
    /// Base model: an HF directory (BERT or decoder) or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: classify: JSONL {"text","label"} or CSV with text,label columns;
    /// ner: CoNLL lines "word ... TAG" (BIO), blank lines between sentences; qa: SQuAD v1.1 JSON.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data in the same format, evaluated after every epoch (or --eval-every steps).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run directory: metrics.jsonl, checkpoints/, model/ or adapter/.
    #[arg(long, default_value = "runs/finetune")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// qa: tokens shared by consecutive windows of a long context.
    #[arg(long, default_value_t = 64)]
    pub stride: usize,
    /// Decoders: a text file whose perplexity is reported before and after fine-tuning.
    #[arg(long)]
    pub forgetting_eval: Option<PathBuf>,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

crate::clap_default!(FinetuneOptions);

impl FinetuneOptions {
    /// Task fine-tuning's engine defaults (BERT's recipe: 3 epochs, lr 5e-5; LoRA 5e-4).
    pub fn train_defaults(&self) -> TrainConfig {
        TrainConfig {
            lr: self.peft.lr(5e-5, 5e-4),
            batch_size: 16,
            epochs: 3,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            ..TrainConfig::base()
        }
    }

    /// What loading the body and writing the outputs need to know.
    pub fn body(&self) -> Result<BodyOpts<'_>> {
        Ok(BodyOpts {
            model: self.model()?,
            peft: &self.peft,
            forgetting_eval: self.forgetting_eval.as_deref(),
            max_len: self.max_len,
        })
    }

    fn model(&self) -> Result<&Path> {
        self.model
            .as_deref()
            .context("finetune needs a base model: --model DIR (or `model` in the config)")
    }

    fn data(&self) -> Result<&Path> {
        self.data
            .as_deref()
            .context("finetune needs training data: --data FILE (or `data` in the config)")
    }
}

/// The options of a body under a head, whichever method trains it (`finetune`, `reward`).
pub struct BodyOpts<'a> {
    pub model: &'a Path,
    pub peft: &'a PeftArgs,
    pub forgetting_eval: Option<&'a Path>,
    pub max_len: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub outcome: Outcome,
    pub trainable: usize,
    pub total: usize,
    /// The last evaluation (headline first).
    pub eval: Vec<(&'static str, f64)>,
    /// Perplexity of the forgetting-evaluation text before and after.
    pub forgetting: Option<(f64, f64)>,
    /// Bytes of the written weights (adapter + head, or the whole model).
    pub checkpoint_bytes: u64,
}

impl Summary {
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.eval.iter().find(|(k, _)| *k == name).map(|e| e.1)
    }
}

pub fn run(o: FinetuneOptions, ctl: Control) -> Result<Summary> {
    let task = o
        .task
        .context("finetune needs a task: --task classify|ner|qa (or `task` in the config)")?;
    let cfg = o.train.resolve(&o.train_defaults())?;
    match task {
        TaskKind::Classify => classify::run(o, cfg, ctl),
        TaskKind::Ner => ner::run(o, cfg, ctl),
        TaskKind::Qa => qa::run(o, cfg, ctl),
    }
}

/// A body under a task head, with what training and output need to know about it.
pub struct Tuned {
    pub m: LoadedBackbone,
    pub head: Linear,
    pub head_name: &'static str,
    pub switch: AdapterSwitch,
    pub adapters: Option<Adapters>,
    pub pad: u32,
    pub max_len: usize,
    pub forgetting: Option<Forgetting>,
}

/// BERT's pooler belongs to a classification head: it trains under LoRA too and is saved with
/// the adapter (also when the checkpoint has none).
pub const POOLER: &str = "bert.pooler.";

/// Loads the body of `o.model`, frozen for LoRA except BERT's pooler when `pooler` (sequence
/// classification reads it; token heads do not build it).
pub fn load_body(o: &BodyOpts, ctl: &Control, pooler: bool) -> Result<LoadedBackbone> {
    if o.peft.qlora {
        anyhow::bail!("--qlora: task heads load HF directories; QLoRA is for causal-LM training (sft, dpo, kto, ppo, grpo, rloo)");
    }
    let peft = o.peft.method.is_some();
    Backbone::load(o.model, &ctl.device, pooler, &|n: &str| {
        peft && !(pooler && n.starts_with(POOLER))
    })
}

impl Tuned {
    /// Adds a fresh head `name` (hidden size → `n`, normal(0.02) init) and, with LoRA, adapters
    /// on the body's linear layers; measures the forgetting baseline.
    pub fn new(
        mut m: LoadedBackbone,
        o: &BodyOpts,
        (name, bias): (&'static str, bool),
        n: usize,
        seed: u64,
    ) -> Result<Self> {
        let mut peft_cfg = o.peft.config()?;
        if let Some(c) = peft_cfg.as_mut() {
            c.tokenize(&m.tok)?;
        }
        // Before any adapter: fresh virtual tokens are random, not the identity.
        let forgetting = Forgetting::start(o.forgetting_eval, &m.tok, |ids| m.body.lm_score(ids))?;
        let hidden = m.body.hidden_size();
        let head = {
            let mut b = Builder {
                store: &mut m.store,
                source: &Source::Random { seed },
                frozen: &|_| false,
                blocks: None,
            };
            Linear::new(&mut b, name, hidden, n, bias, Layout::OutIn, 0.02)?
        };
        let switch = AdapterSwitch::default();
        let adapters = match &peft_cfg {
            Some(c) => Some(Adapters::attach_backbone(
                &mut m.body,
                &mut m.store,
                c,
                None,
                seed,
                &switch,
            )?),
            None => None,
        };
        let max_len = o.max_len.min(m.body.max_len());
        if max_len < 2 {
            anyhow::bail!("max_len must be at least 2");
        }
        Ok(Self {
            pad: m.body.pad_id(&m.tok),
            m,
            head,
            head_name: name,
            switch,
            adapters,
            max_len,
            forgetting,
        })
    }

    /// Perplexity of the forgetting text before and after, with `--forgetting-eval`.
    pub fn forgetting_ppl(&self) -> Result<Option<(f64, f64)>> {
        let body = &self.m.body;
        self.forgetting
            .as_ref()
            .map(|f| f.ppl(|ids| body.lm_score(ids)))
            .transpose()
    }

    /// Dropout of the adapters on (keyed) or off.
    pub fn train_mode(&self, key: Option<u64>) {
        self.switch.set_training(key.is_some(), key.unwrap_or(0));
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.m.store.device
    }
}

/// A task's method: the engine's `Method` plus access to its body and head.
pub trait TaskMethod: Method {
    fn tuned(&mut self) -> &mut Tuned;
}

/// How a task's outputs are named: transformers' class suffix, PEFT's task type, the labels.
pub struct HeadSpec<'a> {
    /// "SequenceClassification", "TokenClassification", "QuestionAnswering".
    pub kind: &'a str,
    /// "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS".
    pub peft_task: &'a str,
    pub labels: &'a [String],
    /// Written beside the weights (`chat_template.jinja`) when the data went through it.
    pub chat_template: Option<&'a str>,
}

/// Trains `method` on the engine, then writes the outputs, the forgetting report and the
/// summary line (with `extra` keys of the task).
pub fn train<M: TaskMethod>(
    mut method: M,
    o: &FinetuneOptions,
    cfg: TrainConfig,
    ctl: Control,
    spec: HeadSpec,
    extra: serde_json::Value,
) -> Result<Summary> {
    let files = RunFiles::create(&ctl, &o.out, o, "finetune")?;
    let run_dir = files.run_dir.clone();
    let (trainable, total) = {
        let s = &method.tuned().m.store;
        (s.num_trainable(), s.num_params())
    };
    let outcome = engine::run(&mut method, cfg, &ctl, &files)?;
    let mut s = Summary {
        run_dir: run_dir.clone(),
        eval: outcome.eval.clone(),
        outcome,
        trainable,
        total,
        ..Default::default()
    };
    if !s.outcome.finished() {
        return Ok(s);
    }
    let tuned = method.tuned();
    s.checkpoint_bytes = write_outputs(tuned, &run_dir, &o.body()?, &spec)?;
    s.forgetting = tuned.forgetting_ppl()?;
    let oc = &s.outcome;
    let mut line = json!({"summary": true, "steps": oc.steps, "seconds": oc.seconds,
        "step_s_median": oc.step_s_median, "peak_rss_mib": oc.peak_rss_mib,
        "skipped_steps": oc.skipped, "trainable_params": trainable, "total_params": total,
        "checkpoint_bytes": s.checkpoint_bytes, "forgetting_ppl": s.forgetting});
    for (k, v) in &s.eval {
        line[*k] = json!(v);
    }
    if let (Some(l), serde_json::Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
    Metrics::open(&run_dir)?.line(&line)?;
    Ok(s)
}

/// Writes `out/model` (full fine-tune) or `out/adapter` (LoRA + head as PEFT `modules_to_save`,
/// plus `out/model` merged with `peft.merge`). Returns the bytes of the weights file written.
pub fn write_outputs(h: &mut Tuned, out: &Path, o: &BodyOpts, spec: &HeadSpec) -> Result<u64> {
    let config = h.m.body.head_config(spec.kind, spec.labels, h.pad);
    let (pad, max_len) = (h.pad, h.max_len);
    let write_model = |m: &LoadedBackbone, dir: &Path| -> Result<()> {
        write_output(dir, "model", |tmp| {
            write_json(&tmp.join("config.json"), &config)?;
            m.store
                .save_safetensors_where(&tmp.join("model.safetensors"), saved_with_head)?;
            m.tok.save(&tmp.join("tokenizer.json"))?;
            let mut tc = crate::tokenizer::hf_tokenizer_config(&m.tok, max_len);
            if let Some(p) = m.tok.inner.id_to_token(pad) {
                tc["pad_token"] = json!(p);
            }
            write_json(&tmp.join("tokenizer_config.json"), &tc)?;
            if let Some(t) = spec.chat_template {
                std::fs::write(tmp.join("chat_template.jinja"), t)?;
            }
            Ok(())
        })
    };
    let Some(a) = &h.adapters else {
        let dir = outdir::entry(out, "model")?;
        write_model(&h.m, &dir)?;
        return Ok(std::fs::metadata(dir.join("model.safetensors"))?.len());
    };
    let dir = outdir::entry(out, "adapter")?;
    let mut modules = vec![h.head_name];
    if h.m.store.get("bert.pooler.dense.weight").is_some() {
        modules.push("pooler");
    }
    let extra = lora::Head {
        task_type: spec.peft_task,
        modules,
    };
    let base = o.model.display().to_string();
    write_output(&dir, "adapter", |tmp| {
        a.write_files(tmp, &h.m.store, &base, &extra)?;
        if let Some(t) = spec.chat_template {
            std::fs::write(tmp.join("chat_template.jinja"), t)?;
        }
        Ok(())
    })?;
    if o.peft.merge {
        a.merge_linears(h.m.body.linears_mut(), &h.m.store)?;
        write_model(&h.m, &outdir::entry(out, "model")?)?;
    }
    Ok(std::fs::metadata(dir.join("adapter_model.safetensors"))?.len())
}
