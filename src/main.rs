//! The `lmforge` command line: one subcommand per pipeline stage.

mod report;

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use lmforge::bench::{self, BenchArgs};
use lmforge::chat::Message;
use lmforge::config::{self, Base};
use lmforge::data::{collect_sources, Pieces};
use lmforge::eval::score::score_ids;
use lmforge::generate::{generate, Sampling, Stop};
use lmforge::model::hf;
use lmforge::train::dpo::DpoOptions;
use lmforge::train::engine::{self, checkpoint, Control, Outcome, RunArgs};
use lmforge::train::finetune::FinetuneOptions;
use lmforge::train::kto::KtoOptions;
use lmforge::train::pretrain::PretrainOptions;
use lmforge::train::reward::RewardOptions;
use lmforge::train::sft::SftOptions;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashSet;
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
    /// The longest line (JSONL record, CoNLL line) any input may have, in bytes.
    #[arg(long, global = true, default_value_t = lmforge::input::DEFAULT_MAX_LINE_BYTES)]
    max_line_bytes: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pre-training, causal or masked LM (with no flags: the default recipe on the bundled corpus).
    Pretrain(Train<PretrainOptions>),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// Sample text from a model, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Perplexity of a text file under a model (with --adapter: the adapted model).
    Score(ScoreArgs),
    /// Write a model (HF directory or .gguf file) as an HF directory transformers loads.
    Convert(ConvertArgs),
    /// Supervised fine-tuning on prompt/completion pairs, chat conversations or text (JSONL),
    /// in full or with a PEFT method (--peft; --qlora over a GGUF's blocks).
    Sft(Train<SftOptions>),
    /// Fine-tune a task head on an encoder (BERT) or a decoder, in full or with a PEFT method.
    Finetune(Train<FinetuneOptions>),
    /// Preference optimisation on chosen/rejected pairs: DPO and its relatives (--loss sigmoid,
    /// ipo, robust, hinge, …), ORPO and SimPO (reference-free), in full or with a PEFT method.
    Dpo(Train<DpoOptions>),
    /// Train a reward model on preference pairs (Bradley–Terry), or `reward score` pairs with one.
    Reward(RewardCli),
    /// KTO on examples labelled desirable / undesirable (or on pairs, unpaired).
    Kto(Train<KtoOptions>),
    /// Online RL with PPO: rollouts scored by a reward model or rules, a value head, a KL
    /// penalty to the reference, GAE, clipped policy and value losses.
    Ppo(Train<lmforge::train::rl::ppo::PpoOptions>),
    /// Online RL with GRPO: k samples per prompt, group-normalised advantages, no critic.
    Grpo(Train<lmforge::train::rl::grpo::GrpoOptions>),
    /// Online RL with RLOO: k samples per prompt, leave-one-out baseline, KL penalty in the reward.
    Rloo(Train<lmforge::train::rl::rloo::RlooOptions>),
    /// RLAIF: a local judge model labels which of two responses is better (both orders,
    /// answer-token probabilities) and writes preference pairs.
    Label(lmforge::rlaif::LabelArgs),
    /// Fold a LoRA, DoRA or IA³ adapter (PEFT directory) into its base model and write a plain
    /// HF directory (the other PEFT methods cannot be merged).
    Merge(MergeArgs),
    /// Time full training steps on random tokens (compare with scripts/torch_reference.py).
    Bench(BenchCli),
    /// Line charts (PNG) of a run's metrics.jsonl: one panel per --metric, by step.
    Plot(PlotArgs),
    /// A run's report as a self-contained HTML page and PNGs: every logged curve (several runs
    /// overlaid with --compare), its recipe, its evaluation tables.
    Report(lmforge::view::report::ReportArgs),
    /// An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models;
    /// streaming) over a model, requests batched into one decode loop.
    Serve(lmforge::serve::ServeArgs),
    /// A local web page of the runs in a directory: live curves, reports, evaluation tables
    /// and a chat playground on their models, adapters and checkpoints (the server of `serve`).
    Dashboard(lmforge::serve::DashboardArgs),
    /// Evaluate on tasks without weight updates: zero/one/few-shot multiple choice by
    /// log-likelihood, generation (exact match, F1, BLEU, chrF, ROUGE-L), rolling perplexity,
    /// classifier heads, the bias probe; --baseline for a forgetting table.
    Eval(lmforge::eval::harness::EvalArgs),
}

/// A training subcommand: the method's options (its flags and config keys) and the run flags.
#[derive(Args)]
struct Train<T: Args> {
    #[command(flatten)]
    opts: T,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct RewardCli {
    #[command(subcommand)]
    action: Option<RewardAction>,
    #[command(flatten)]
    train: Train<RewardOptions>,
}

#[derive(Subcommand)]
enum RewardAction {
    /// Rewards of every pair of a preference file under a reward model: one JSON line per pair,
    /// then the pairwise accuracy and mean margin.
    Score(lmforge::train::reward::ScoreArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// Base model: an HF directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA or IA³ directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// The HF directory to write: new or empty (or, with --overwrite, an earlier lmforge output).
    #[arg(long)]
    out: PathBuf,
    /// Replace an earlier lmforge output in --out (only the files lmforge wrote there).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct PlotArgs {
    /// A run directory (with metrics.jsonl).
    run: PathBuf,
    /// A metric to plot (repeatable), e.g. reward, objective/kl, loss, eval_reward.
    #[arg(long = "metric", required = true)]
    metrics: Vec<String>,
    /// The PNG file to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    overwrite: bool,
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
        /// Replace an existing --out file.
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Args)]
struct ConvertArgs {
    /// An HF model directory or a .gguf file.
    input: PathBuf,
    /// The HF directory to write: new or empty (or, with --overwrite, an earlier lmforge output).
    #[arg(long)]
    out: PathBuf,
    /// Replace an earlier lmforge output in --out (only the files lmforge wrote there).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// Instead of --prompt: every prompt of a JSONL file ({"prompt": …}, pairs, conversations),
    /// decoded --batch-size rows at a time; one JSON line per response on stdout, throughput on
    /// stderr.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// With --prompts: rows decoded together.
    #[arg(long, default_value_t = 8, requires = "prompts")]
    batch_size: usize,
    /// With --prompts: responses per prompt.
    #[arg(long, default_value_t = 1, requires = "prompts")]
    samples: usize,
    /// Send the prompt as a user message through the model's chat template (with --prompts:
    /// every prompt).
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat", conflicts_with = "prompts")]
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
    /// A PEFT adapter directory applied to the model (any method lmforge trains).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// With a .gguf model: run its linear layers from the GGUF blocks as QLoRA trains them
    /// (`kernels::qlinear`) instead of the dequantized weights.
    #[arg(long)]
    qlora: bool,
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
    /// A real model (HF directory or .gguf) instead of a random one of --arch/--layers/…
    /// (--seq, --batch, --lora, --steps still apply).
    #[arg(long)]
    model: Option<PathBuf>,
    /// With --model FILE.gguf and --lora: keep its linear weights in GGUF blocks (QLoRA).
    #[arg(long)]
    qlora: bool,
}

fn main() -> ExitCode {
    lmforge::kernels::tune_allocator();
    lmforge::kernels::quiet_candle_pool();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // Under mpirun: join the other ranks (dist); a lone process loads no MPI library.
    let world = match lmforge::dist::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let trains = matches!(
        &cli.cmd,
        Cmd::Pretrain(_)
            | Cmd::Sft(_)
            | Cmd::Finetune(_)
            | Cmd::Dpo(_)
            | Cmd::Kto(_)
            | Cmd::Ppo(_)
            | Cmd::Grpo(_)
            | Cmd::Rloo(_)
            | Cmd::Reward(RewardCli { action: None, .. })
    );
    let res = match world.size {
        n if n > 1 && !trains => Err(anyhow::anyhow!(
            "started by mpirun with {n} ranks, but only the training commands run on several \
             ranks; run this command without mpirun"
        )),
        _ => run(cli, &matches),
    };
    match res.and_then(|code| world.finish().map(|()| code)) {
        Ok(code) => code,
        Err(e) => {
            if world.size > 1 {
                eprintln!("error (rank {} of {}): {e:#}", world.rank, world.size);
                // The other ranks would wait for this one in their next collective: end them.
                world.abort_job(1);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<ExitCode> {
    lmforge::input::set_max_line_bytes(cli.max_line_bytes);
    let given = given_flags(matches);
    match cli.cmd {
        Cmd::Pretrain(a) => report::cmd_pretrain(a, &given),
        Cmd::Tokenizer(TokenizerCmd::Train {
            input,
            vocab_size,
            out,
            min_frequency,
            lossy_utf8,
            overwrite,
        }) => {
            lmforge::outdir::check_file(&out, overwrite)?;
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
        Cmd::Eval(a) => report::cmd_eval(a),
        Cmd::Sft(a) => report::cmd_sft(a, &given),
        Cmd::Finetune(a) => report::cmd_finetune(a, &given),
        Cmd::Dpo(a) => report::cmd_dpo(a, &given),
        Cmd::Ppo(a) => report::cmd_online(a, &given, "ppo", lmforge::train::rl::ppo::run),
        Cmd::Grpo(a) => report::cmd_online(a, &given, "grpo", lmforge::train::rl::grpo::run),
        Cmd::Rloo(a) => report::cmd_online(a, &given, "rloo", lmforge::train::rl::rloo::run),
        Cmd::Kto(a) => report::cmd_kto(a, &given),
        Cmd::Label(a) => report::cmd_label(a),
        Cmd::Reward(RewardCli {
            action: Some(RewardAction::Score(a)),
            ..
        }) => report::cmd_reward_score(a),
        Cmd::Reward(RewardCli {
            action: None,
            train,
        }) => report::cmd_reward(train, &given),
        Cmd::Merge(a) => {
            lmforge::outdir::check(&a.out, claim("merge", a.overwrite))?;
            let mut m = hf::load(&a.model, &lmforge::device("cpu")?, &|_| true)?;
            let switch = lmforge::peft::AdapterSwitch::default();
            let adapters = lmforge::peft::load(&a.adapter, &mut m.model, &mut m.store, &switch)
                .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
            adapters.merge(&mut m.model, &m.store)?;
            hf::save_loaded(&a.out, &m)?;
            eprintln!(
                "merged{} into {}",
                adapters.describe().trim_start_matches(','),
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Convert(a) => {
            lmforge::outdir::check(&a.out, claim("convert", a.overwrite))?;
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
        Cmd::Serve(a) => lmforge::serve::serve(a).map(|()| ExitCode::SUCCESS),
        Cmd::Dashboard(a) => lmforge::serve::dashboard(a).map(|()| ExitCode::SUCCESS),
        Cmd::Report(a) => {
            let page = lmforge::view::report::write(&a)?;
            eprintln!("wrote {}", page.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot(a) => {
            lmforge::outdir::check_file(&a.out, a.overwrite)?;
            let panels = lmforge::plot::from_metrics(&a.run, &a.metrics)?;
            lmforge::plot::chart(&panels, "step", &a.out)?;
            eprintln!("wrote {}", a.out.display());
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
                model: a.model.clone(),
                qlora: a.qlora,
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

fn claim(kind: &str, overwrite: bool) -> lmforge::outdir::Claim<'_> {
    lmforge::outdir::Claim {
        kind,
        overwrite,
        resumable: false,
    }
}

/// The ids of the flags typed on the command line (for the subcommand that runs), which beat a
/// config file and `--set`.
fn given_flags(matches: &ArgMatches) -> HashSet<String> {
    let Some((name, sub)) = matches.subcommand() else {
        return HashSet::new();
    };
    let cmd = Cli::command();
    let Some(sc) = cmd.find_subcommand(name) else {
        return HashSet::new();
    };
    sc.get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| sub.value_source(id) == Some(ValueSource::CommandLine))
        .map(str::to_string)
        .collect()
}

/// A training run's options (defaults or the resumed run's, then --config, --set, flags) and
/// its control: device, resume point, Ctrl-C.
fn setup<T: Serialize + DeserializeOwned + Args>(
    a: &Train<T>,
    given: &HashSet<String>,
    command: &str,
) -> Result<(T, Control)> {
    let resume = a
        .run
        .resume
        .as_deref()
        .map(|p| engine::open_resume(p, command))
        .transpose()?;
    let saved = match &resume {
        Some((ck, _)) => Some((
            checkpoint::read_config(ck)?,
            ck.join("config.toml").display().to_string(),
        )),
        None => None,
    };
    let base = match &saved {
        Some((text, origin)) => Base::Saved { text, origin },
        None => Base::Defaults,
    };
    let opts = config::load(base, a.run.config.as_deref(), &a.run.set, &a.opts, given)?;
    if !a.run.eval_suite.is_empty() {
        if !matches!(command, "sft" | "dpo" | "kto" | "ppo" | "grpo" | "rloo") {
            anyhow::bail!(
                "--eval-suite compares a trained causal LM with its base (sft, dpo, kto, ppo, grpo, rloo); evaluate a {command} output with `lmforge eval`"
            );
        }
        // The suite is checked (task files, shots, limits) before hours of training, not after.
        let r = &a.run;
        let suite = lmforge::eval::harness::EvalArgs::suite(
            &r.eval_suite,
            r.eval_suite_limit,
            &r.eval_data_dir,
            &r.device,
        );
        lmforge::eval::harness::resolve_suite(&suite)
            .with_context(|| format!("--eval-suite {}", r.eval_suite.join(",")))?;
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
    let ctl = Control {
        device: lmforge::device(&a.run.device)?,
        resume,
        stop_at: a.run.stop_at_step,
        interrupt,
        quiet: a.run.quiet,
        overwrite: a.run.overwrite,
        tensorboard: a.run.tensorboard,
    };
    Ok((opts, ctl))
}

/// The exit code of a run: 130 when Ctrl-C stopped it (a --stop-at-step stop is a success).
fn exit_code(o: &Outcome) -> ExitCode {
    if o.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<ExitCode> {
    let dev = lmforge::device(&a.device)?;
    let t0 = std::time::Instant::now();
    let mut m = hf::load_with_blocks(&a.model, &dev, &|_| true, !a.dequantize)?;
    if let Some(dir) = &a.adapter {
        m.apply_adapter(dir)?;
    }
    let load_s = t0.elapsed().as_secs_f64();
    let s = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    if let Some(file) = &a.prompts {
        let tpl = match a.chat {
            true => Some(m.chat(&a.model.display().to_string())?),
            false => None,
        };
        let ctx = m.model.context();
        let max_prompt = lmforge::train::rl::prompts::room(ctx, a.max_new_tokens, usize::MAX)?;
        let mut stdout = std::io::stdout().lock();
        let t = lmforge::generate::file::run(
            &m,
            file,
            tpl.as_ref(),
            &s,
            a.batch_size,
            a.samples,
            max_prompt,
            &mut stdout,
        )?;
        eprintln!(
            "{}",
            serde_json::json!({"summary": true, "responses": t.responses, "new_tokens": t.new_tokens,
                "decode_s": t.seconds, "tokens_per_s": t.tokens_per_s(), "batch_size": a.batch_size,
                "load_s": load_s})
        );
        return Ok(ExitCode::SUCCESS);
    }
    let user = a.prompt.clone().unwrap_or_default();
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &user));
        let text = m
            .chat(&a.model.display().to_string())?
            .render(&msgs, true)?;
        // The template already holds the special tokens transformers would add.
        m.tok.encode(&text, false)?
    } else {
        m.tok.encode(&user, true)?
    };
    let mut stdout = std::io::stdout().lock();
    if !a.chat {
        write!(stdout, "{user}")?;
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
            m.model.context()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_score(a: ScoreArgs) -> Result<ExitCode> {
    let dev = lmforge::device(&a.device)?;
    let mut m = if a.qlora {
        hf::load_qlora(&a.model, &dev)?.0
    } else {
        hf::load(&a.model, &dev, &|_| true)?
    };
    if let Some(dir) = &a.adapter {
        let switch = lmforge::peft::AdapterSwitch::default();
        lmforge::peft::load(dir, &mut m.model, &mut m.store, &switch)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
    }
    let ids = lmforge::data::encode_file(&a.file, &m.tok)?;
    // Virtual tokens (prefix/prompt tuning) take positions ahead of every window.
    let ctx = m.model.context();
    let window = a.window.unwrap_or(ctx).min(ctx);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap checks flag names and ids only in debug builds; the tests run in release.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
