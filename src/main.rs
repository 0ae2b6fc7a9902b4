//! The `lmforge` command line: one subcommand per pipeline stage.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lmforge::bench::{self, BenchArgs};
use lmforge::chat::Message;
use lmforge::data::{collect_sources, Pieces};
use lmforge::eval::score::score_ids;
use lmforge::generate::{generate, Sampling, Stop};
use lmforge::model::hf;
use lmforge::recipe::Recipe;
use lmforge::train::{checkpoint, pretrain};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "lmforge",
    version,
    about = "Pre-train, fine-tune, align, evaluate and sample language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Causal-LM pre-training (with no flags: the default recipe on the bundled corpus).
    Pretrain(PretrainArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// Sample text from a model, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Perplexity of a text file under a model.
    Score(ScoreArgs),
    /// Write a model (HF directory or .gguf file) as an HF directory transformers loads.
    Convert(ConvertArgs),
    /// Supervised fine-tuning on prompt/completion pairs, chat conversations or text (JSONL),
    /// in full or with LoRA.
    Sft(SftArgs),
    /// Fine-tune a task head on an encoder (BERT) or a decoder, in full or with LoRA.
    Finetune(FinetuneArgs),
    /// Fold a LoRA adapter (PEFT directory) into its base model and write a plain HF directory.
    Merge(MergeArgs),
    /// Time full training steps on random tokens (compare with shared/bench/torch_reference.py).
    Bench(BenchCli),
}

/// What `sft` and `finetune` share: PEFT, merging, the forgetting report, device, output.
#[derive(Args)]
struct TuneArgs {
    /// Parameter-efficient method.
    #[arg(long, value_enum)]
    peft: Option<PeftKind>,
    #[command(flatten)]
    lora: LoraArgs,
    /// With --peft: also write the merged model to OUT/model.
    #[arg(long)]
    merge: bool,
    /// Decoders: a text file whose perplexity is reported before and after fine-tuning.
    #[arg(long)]
    forgetting_eval: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct SftArgs {
    /// Base model: an HF directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// JSONL: {"prompt","completion"}, {"messages":[{"role","content"}...]} or {"text"} per line.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: metrics.jsonl and model/ (full fine-tune) or adapter/ (LoRA).
    #[arg(long, default_value = "runs/sft")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate (default 2e-5 full, 2e-4 LoRA).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Examples are truncated to this many tokens (capped at the model's context).
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Put prompt / user / system tokens in the loss too.
    #[arg(long)]
    train_on_prompt: bool,
    /// Pack several examples into each sequence (no attention across examples).
    #[arg(long)]
    packing: bool,
    /// A Jinja chat template file, instead of the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    #[command(flatten)]
    tune: TuneArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum PeftKind {
    Lora,
}

/// LoRA's flags, shared by every fine-tuning command.
#[derive(Args)]
struct LoraArgs {
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f32,
    /// Comma-separated module names (q_proj,v_proj) or all-linear.
    #[arg(long, default_value = "all-linear")]
    target_modules: String,
    /// LoRA scaling α/√r instead of α/r.
    #[arg(long)]
    use_rslora: bool,
}

fn lora_config(
    peft: Option<PeftKind>,
    a: &LoraArgs,
    merge: bool,
) -> Result<Option<lmforge::peft::lora::LoraConfig>> {
    use lmforge::peft::lora::{LoraConfig, Targets};
    let cfg = match peft {
        Some(PeftKind::Lora) => Some(LoraConfig {
            r: a.lora_r,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            targets: Targets::parse(&a.target_modules)?,
            use_rslora: a.use_rslora,
        }),
        None => None,
    };
    if merge && cfg.is_none() {
        anyhow::bail!("--merge needs --peft lora");
    }
    Ok(cfg)
}

#[derive(Clone, Copy, ValueEnum)]
enum Task {
    /// Sequence classification (text, label): accuracy and macro-F1.
    Classify,
    /// Token classification / NER (CoNLL BIO files): entity-level F1.
    Ner,
    /// Extractive question answering (SQuAD v1.1 JSON), encoders: exact match and F1.
    Qa,
}

#[derive(Args)]
struct FinetuneArgs {
    #[arg(long, value_enum)]
    task: Task,
    /// Base model: an HF directory (BERT or decoder) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Training data: classify: JSONL {"text","label"} or CSV with text,label columns;
    /// ner: CoNLL lines "word ... TAG" (BIO), blank lines between sentences; qa: SQuAD v1.1 JSON.
    #[arg(long)]
    data: PathBuf,
    /// Held-out data in the same format, evaluated after every epoch.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[arg(long, default_value = "runs/finetune")]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Peak learning rate (default 5e-5 full, 5e-4 LoRA).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// qa: tokens shared by consecutive windows of a long context.
    #[arg(long, default_value_t = 64)]
    stride: usize,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    tune: TuneArgs,
}

#[derive(Args)]
struct MergeArgs {
    /// Base model: an HF directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// The HF directory to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Objective {
    /// Causal LM (next token), GPT-2 / Llama decoders.
    Clm,
    /// Masked LM, a BERT encoder (15% of tokens, 80/10/10 mask/random/keep).
    Mlm,
}

#[derive(Args)]
struct PretrainArgs {
    /// Training objective; mlm trains a BERT encoder with the recipe's sizes.
    #[arg(long, value_enum, default_value = "clm")]
    objective: Objective,
    /// Recipe file (TOML); defaults to the embedded configs/shakespeare-gpt.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a recipe key, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (checkpoints, metrics.jsonl, final model).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Corpus: text files, directories, or JSONL with a "text" field (repeatable).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Continue from a checkpoint directory or a run directory (its latest checkpoint).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write a checkpoint and stop after this step, as if interrupted.
    #[arg(long)]
    stop_at_step: Option<u64>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar or log lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer and write tokenizer.json.
    Train {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Replace invalid UTF-8 instead of failing.
        #[arg(long)]
        lossy_utf8: bool,
    },
}

#[derive(Args)]
struct ConvertArgs {
    /// An HF model directory or a .gguf file.
    input: PathBuf,
    /// The HF directory to write (replaced atomically if it exists).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct GenerateArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A LoRA adapter (PEFT directory) to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Decode a GGUF model from its f32 dequantized weights instead of its Q4_0/Q4_1/Q8_0
    /// blocks (the same weights; slower, the reference path).
    #[arg(long)]
    dequantize: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct ScoreArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    file: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Window length in tokens (default: the model's context).
    #[arg(long)]
    window: Option<usize>,
    /// Advance between windows (default: half the window).
    #[arg(long)]
    stride: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchArch {
    Gpt2,
    Llama,
}

#[derive(Args)]
struct BenchCli {
    #[arg(long, value_enum, default_value = "gpt2")]
    arch: BenchArch,
    #[arg(long, default_value_t = 6)]
    layers: usize,
    #[arg(long, default_value_t = 6)]
    heads: usize,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    #[arg(long)]
    ffn: Option<usize>,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 65)]
    vocab: usize,
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Worker threads (sets RAYON_NUM_THREADS; default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Instead of training steps: GEMM throughput on this configuration's matmul shapes
    /// (one JSON line per product).
    #[arg(long)]
    gemm: bool,
    /// Train LoRA adapters of this rank (base frozen) instead of every weight.
    #[arg(long, default_value_t = 0)]
    lora: usize,
}

fn main() -> ExitCode {
    lmforge::kernels::tune_allocator();
    lmforge::kernels::quiet_candle_pool();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Pretrain(a) => cmd_pretrain(a),
        Cmd::Tokenizer(TokenizerCmd::Train {
            input,
            vocab_size,
            out,
            min_frequency,
            lossy_utf8,
        }) => {
            let sources = collect_sources(&input)?;
            let mut err = None;
            let texts = Pieces::new(sources, lossy_utf8).map_while(|p| match p {
                Ok(p) => Some(p.text),
                Err(e) => {
                    err = Some(e);
                    None
                }
            });
            let tok = lmforge::tokenizer::train_bpe(texts, vocab_size, min_frequency)?;
            if let Some(e) = err {
                return Err(e);
            }
            tok.save(&out)?;
            eprintln!("wrote {} ({} tokens)", out.display(), tok.vocab_size());
            Ok(ExitCode::SUCCESS)
        }
        // Decoding is hundreds of sub-millisecond parallel ops per token (a GEMV per linear
        // layer). Called from a thread of the pool, each op starts on that thread at once; called
        // from the main thread, each one woke a worker and then slept until the pool was done.
        // Measured on SmolLM2-135M, 120 greedy tokens, alternating: f32 32.2 → 35.8 tokens/s,
        // from GGUF blocks 49.7 → 58.0 (medians). (Training steps, whose ops take milliseconds,
        // showed no difference.)
        Cmd::Generate(a) => rayon::ThreadPoolBuilder::new()
            .build()
            .context("starting the thread pool")?
            .install(|| cmd_generate(a)),
        Cmd::Score(a) => cmd_score(a),
        Cmd::Sft(a) => cmd_sft(a),
        Cmd::Finetune(a) => cmd_finetune(a),
        Cmd::Merge(a) => {
            let mut m = hf::load(&a.model, &lmforge::device("cpu")?, &|_| true)?;
            let switch = lmforge::peft::AdapterSwitch::default();
            let lora = lmforge::peft::lora::load(&a.adapter, &mut m.model, &mut m.store, &switch)
                .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
            lora.merge(&mut m.model, &m.store)?;
            hf::save_loaded(&a.out, &m)?;
            eprintln!(
                "merged {} LoRA layers (r={}, alpha={}) into {}",
                lora.modules.len(),
                lora.cfg.r,
                lora.cfg.alpha,
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Convert(a) => {
            let t = std::time::Instant::now();
            let m = hf::load(&a.input, &candle_core::Device::Cpu, &|_| true)?;
            hf::save_loaded(&a.out, &m)?;
            eprintln!(
                "wrote {} ({} {} layers, {:.1}M parameters) in {:.1}s",
                a.out.display(),
                m.model.cfg.model_type,
                m.model.cfg.num_layers,
                m.store.num_params() as f64 / 1e6,
                t.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(a) => {
            if let Some(t) = a.threads {
                // Before any rayon pool exists (candle's GEMM and our loops read it).
                std::env::set_var("RAYON_NUM_THREADS", t.to_string());
            }
            let dev = lmforge::device(&a.device)?;
            let args = BenchArgs {
                llama: matches!(a.arch, BenchArch::Llama),
                layers: a.layers,
                heads: a.heads,
                kv_heads: a.kv_heads,
                dim: a.dim,
                ffn: a.ffn,
                seq: a.seq,
                batch: a.batch,
                vocab: a.vocab,
                steps: a.steps,
                lora_r: a.lora,
            };
            if a.gemm {
                for line in bench::gemm_shapes(&args, a.steps.max(3))? {
                    println!("{line}");
                }
            } else {
                println!("{}", bench::run(&args, &dev)?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn cmd_pretrain(a: PretrainArgs) -> Result<ExitCode> {
    let mut overrides = a.set.clone();
    if let Some(n) = a.max_steps {
        overrides.push(format!("train.max_steps={n}"));
    }
    if let Some(s) = a.seed {
        overrides.push(format!("train.seed={s}"));
    }
    let resume = a.resume.as_deref().map(checkpoint::resolve).transpose()?;
    let mut recipe = match &resume {
        // A resumed run continues the recipe it was started with; flags still override.
        Some(ck) => {
            let (_, text) = checkpoint::read_state(ck)?;
            Recipe::parse(
                &text,
                &format!("{}/recipe.toml", ck.display()),
                &overrides,
                std::path::Path::new(""),
            )?
        }
        None => Recipe::load(a.config.as_deref(), &overrides)?,
    };
    if let Some(o) = a.out {
        recipe.output.dir = o;
    }
    if !a.data.is_empty() {
        recipe.data.paths = a.data;
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    let opts = pretrain::Options {
        recipe,
        device: lmforge::device(&a.device)?,
        resume,
        stop_at: a.stop_at_step,
        interrupt,
        quiet: a.quiet,
    };
    let (summary, what) = match a.objective {
        Objective::Clm => (pretrain::run(opts)?, "validation loss"),
        Objective::Mlm => (lmforge::train::mlm::run(opts)?, "validation MLM loss"),
    };
    if let Some(v) = summary.val_loss {
        eprintln!(
            "done: {} steps in {:.0}s, {what} {v:.4}, perplexity {:.2}; run directory {}",
            summary.steps,
            summary.seconds,
            v.exp(),
            summary.run_dir.display()
        );
    }
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_generate(a: GenerateArgs) -> Result<ExitCode> {
    let dev = lmforge::device(&a.device)?;
    let t0 = std::time::Instant::now();
    let mut m = hf::load_with_blocks(&a.model, &dev, &|_| true, !a.dequantize)?;
    if let Some(dir) = &a.adapter {
        let switch = lmforge::peft::AdapterSwitch::default();
        lmforge::peft::lora::load(dir, &mut m.model, &mut m.store, &switch)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        if let Some(t) = lmforge::chat::template_from_dir(dir)? {
            m.chat_template = Some(t);
        }
    }
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &a.prompt));
        let text = m
            .chat(&a.model.display().to_string())?
            .render(&msgs, true)?;
        // The template already holds the special tokens transformers would add.
        m.tok.encode(&text, false)?
    } else {
        m.tok.encode(&a.prompt, true)?
    };
    let s = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut stdout = std::io::stdout().lock();
    if !a.chat {
        write!(stdout, "{}", a.prompt)?;
    }
    let mut stream = m.tok.inner.decode_stream(true);
    let t1 = std::time::Instant::now();
    let (out, stop) = generate(&m.model, &prompt, &s, &m.eos_ids, |id| {
        if let Some(text) = stream
            .step(id)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        {
            write!(stdout, "{text}")?;
            stdout.flush()?;
        }
        Ok(())
    })?;
    writeln!(stdout)?;
    let gen_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "(load {load_s:.2}s; prompt {} tokens; {} new tokens in {gen_s:.2}s, {:.1} tokens/s)",
        prompt.len(),
        out.len(),
        out.len() as f64 / gen_s.max(1e-9)
    );
    if stop == Stop::ContextFull {
        eprintln!(
            "(stopped: the model's context of {} tokens is full)",
            m.model.cfg.max_position_embeddings
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_score(a: ScoreArgs) -> Result<ExitCode> {
    let dev = lmforge::device(&a.device)?;
    let m = hf::load(&a.model, &dev, &|_| true)?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: invalid UTF-8 at byte offset {}",
            a.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let ids = m.tok.encode(&text, true)?;
    let window = a
        .window
        .unwrap_or(m.model.cfg.max_position_embeddings)
        .min(m.model.cfg.max_position_embeddings);
    let stride = a.stride.unwrap_or(window / 2).max(1);
    let s = score_ids(&m.model, &ids, window, stride)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tokens": s.tokens, "nll": s.nll, "ppl": s.ppl()})
        );
    } else {
        println!("{}: {} tokens, mean NLL {:.4} nats, perplexity {:.3} (window {window}, stride {stride})", a.file.display(), s.tokens, s.nll, s.ppl());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_sft(a: SftArgs) -> Result<ExitCode> {
    use lmforge::train::sft;
    let lora = lora_config(a.tune.peft, &a.tune.lora, a.tune.merge)?;
    let lr = a.lr.unwrap_or(if lora.is_some() { 2e-4 } else { 2e-5 });
    let s = sft::run(sft::Options {
        model: a.model,
        data: a.data,
        out: a.out,
        epochs: a.epochs,
        max_steps: a.max_steps,
        lr,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        seed: a.seed,
        train_on_prompt: a.train_on_prompt,
        packing: a.packing,
        chat_template: a.chat_template,
        lora,
        merge: a.tune.merge,
        forgetting_eval: a.tune.forgetting_eval,
        device: lmforge::device(&a.tune.device)?,
        quiet: a.tune.quiet,
    })?;
    let first = s.losses.first().copied().unwrap_or(f32::NAN);
    let last = s.losses.last().copied().unwrap_or(f32::NAN);
    eprintln!(
        "done: {} steps in {:.1}s, loss {first:.4} -> {last:.4}; {} examples used ({} truncated), {} skipped; {} of {} parameters trained",
        s.steps,
        s.seconds,
        s.counts.kept + s.counts.truncated,
        s.counts.truncated,
        s.counts.dropped,
        s.trainable,
        s.total
    );
    if let Some((b, after)) = s.forgetting {
        eprintln!(
            "forgetting: perplexity of the evaluation text {:.3} before, {:.3} after ({:+.1}%)",
            b.ppl(),
            after.ppl(),
            100.0 * (after.ppl() / b.ppl() - 1.0)
        );
    }
    eprintln!("output: {}", s.output.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_finetune(a: FinetuneArgs) -> Result<ExitCode> {
    use lmforge::train::classify;
    let lora = lora_config(a.tune.peft, &a.tune.lora, a.tune.merge)?;
    let lr = a.lr.unwrap_or(if lora.is_some() { 5e-4 } else { 5e-5 });
    let opts = classify::Options {
        model: a.model,
        data: a.data,
        eval_data: a.eval_data,
        out: a.out.clone(),
        epochs: a.epochs,
        lr,
        batch_size: a.batch_size,
        max_len: a.max_len,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        seed: a.seed,
        lora,
        merge: a.tune.merge,
        forgetting_eval: a.tune.forgetting_eval,
        device: lmforge::device(&a.tune.device)?,
        quiet: a.tune.quiet,
    };
    let s = match a.task {
        Task::Classify => classify::run(opts)?,
        Task::Ner => lmforge::train::ner::run(opts)?,
        Task::Qa => lmforge::train::qa::run(opts, a.stride)?,
    };
    eprintln!(
        "done: {} steps in {:.1}s (median step {:.3}s), peak RSS {:.0} MiB; {} of {} parameters trained; weights written: {:.2} MB",
        s.steps, s.seconds, s.step_s_median, s.peak_rss_mib, s.trainable, s.total, s.checkpoint_bytes as f64 / 1e6
    );
    if let (Some(acc), Some(f1)) = (s.accuracy, s.macro_f1) {
        eprintln!("eval: accuracy {acc:.4}, macro-F1 {f1:.4}");
    }
    if let Some(f1) = s.entity_f1 {
        eprintln!("eval: entity F1 {f1:.4}");
    }
    if let Some((em, f1)) = s.squad {
        eprintln!("eval: exact match {em:.2}, F1 {f1:.2}");
    }
    if let Some((b, after)) = s.forgetting {
        eprintln!(
            "forgetting: perplexity of the evaluation text {b:.3} before, {after:.3} after ({:+.1}%)",
            100.0 * (after / b - 1.0)
        );
    }
    eprintln!("output: {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}
