//! The training engine from outside, single-threaded (bit-exact; `determinism` checks 2 and 3
//! threads): every method resumes after an
//! interruption to the same losses and weights as an uninterrupted run; a corrupted checkpoint is
//! refused by name with the previous good one offered; a run killed with SIGKILL at seeded
//! moments (one of them inside a checkpoint write) and resumed each time ends with the weights
//! of a run never killed, and `latest` never names a half-written checkpoint.

mod common;
use common::*;
use lmforge::train::engine::checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cmd(args: &[String]) -> Command {
    cmd_threads(args, 1)
}

fn cmd_threads(args: &[String], threads: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lmforge"));
    c.args(args).env("RAYON_NUM_THREADS", threads.to_string());
    c
}

fn lmforge(args: &[String]) -> Output {
    cmd(args).output().unwrap()
}

fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// (step, loss) of every step line of a run's metrics.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?))
        })
        .collect()
}

/// SHA-256 of the trainable weights of the run's latest checkpoint.
fn final_weights(run: &Path) -> String {
    let ck = checkpoint::resolve(run, "any").unwrap();
    let s = checkpoint::verify(&ck, "any").unwrap();
    s.sha256["trainable.safetensors"].clone()
}

/// Runs `args` to the end in `full`, and in `split` stopped after `stop` steps and resumed;
/// both must give the same losses and final weights. Returns the split run directory.
fn same_after_resume(name: &str, command: &str, args: &[String], stop: u64) -> PathBuf {
    let d = tmpdir(&format!("resume_{name}"));
    let (full, split) = (d.join("full"), d.join("split"));
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec![command.to_string()];
        a.extend_from_slice(args);
        a.extend(strs(&["--quiet", "--out", out.to_str().unwrap()]));
        a.extend(strs(extra));
        lmforge(&a)
    };
    let o = run(&full, &[]);
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(&split, &["--stop-at-step", &stop.to_string()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(losses(&split).len() as u64, stop, "{name}");
    let o = lmforge(&strs(&[
        command,
        "--resume",
        split.to_str().unwrap(),
        "--quiet",
    ]));
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (a, b) = (losses(&full), losses(&split));
    assert!(a.len() as u64 > stop, "{name}: {a:?}");
    assert_eq!(a, b, "{name}: losses of the resumed run differ");
    assert_eq!(
        final_weights(&full),
        final_weights(&split),
        "{name}: weights differ"
    );
    split
}

fn tiny_pretrain(corpus: &Path, steps: u64) -> Vec<String> {
    let mut a = strs(&[
        "--data",
        corpus.to_str().unwrap(),
        "--max-steps",
        &steps.to_string(),
    ]);
    for kv in [
        "model.d_model=32",
        "model.n_layer=1",
        "model.n_head=2",
        "model.ctx=32",
        "data.seq_len=32",
        "train.batch_size=4",
        "train.grad_accum=2",
        "tokenizer.vocab_size=300",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.eval_every=4",
        "train.checkpoint_every=3",
    ] {
        a.extend(strs(&["--set", kv]));
    }
    a
}

#[test]
fn every_method_resumes_exactly() {
    let d = tmpdir("resume_data");
    let corpus = small_corpus(&d, 40_000);
    same_after_resume("clm", "pretrain", &tiny_pretrain(&corpus, 10), 4);
    let mut mlm = tiny_pretrain(&corpus, 10);
    mlm.extend(strs(&["--objective", "mlm"]));
    same_after_resume("mlm", "pretrain", &mlm, 5);

    let sft_data = tiny_sft(&d, 12);
    let llama = fixture("llama_tiny");
    let sft = strs(&[
        "--model",
        llama.to_str().unwrap(),
        "--data",
        sft_data.to_str().unwrap(),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--checkpoint-every",
        "2",
    ]);
    let full_sft = same_after_resume("sft", "sft", &sft, 3);
    assert!(full_sft.join("model/model.safetensors").is_file());
    let mut lora = sft.clone();
    lora.extend(strs(&[
        "--peft",
        "lora",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
    ]));
    let lora_run = same_after_resume("sft_lora", "sft", &lora, 3);
    assert!(lora_run.join("adapter/adapter_model.safetensors").is_file());

    let bert = fixture("bert_tiny");
    let (tr, te) = classify_data(&d);
    let task = |t: &str, data: &str, eval: &str, model: &Path| {
        strs(&[
            "--task",
            t,
            "--model",
            model.to_str().unwrap(),
            "--data",
            data,
            "--eval-data",
            eval,
            "--epochs",
            "1",
            "--lr",
            "3e-3",
            "--checkpoint-every",
            "2",
        ])
    };
    same_after_resume(
        "classify",
        "finetune",
        &task("classify", &tr, &te, &bert),
        4,
    );
    let (tr, te) = (conll(&d, "tr.conll", 60, 1), conll(&d, "te.conll", 10, 2));
    same_after_resume("ner", "finetune", &task("ner", &tr, &te, &llama), 2);
    let (tr, te) = (squad(&d, "tr.json", 40, 3), squad(&d, "te.json", 8, 4));
    let mut qa = task("qa", &tr, &te, &bert);
    qa.extend(strs(&["--max-len", "32", "--stride", "8"]));
    same_after_resume("qa", "finetune", &qa, 2);
}

#[test]
fn a_corrupted_checkpoint_is_refused_and_the_previous_one_offered() {
    let d = tmpdir("resume_corrupt");
    let corpus = small_corpus(&d, 40_000);
    let run = d.join("run");
    let mut a = strs(&["pretrain", "--quiet", "--out", run.to_str().unwrap()]);
    a.extend(tiny_pretrain(&corpus, 12));
    a.extend(strs(&["--stop-at-step", "9"]));
    assert!(lmforge(&a).status.success());
    // checkpoint_every 3, keep 2: step 6 and step 9 (the stop) remain.
    let latest = checkpoint::resolve(&run, "pretrain").unwrap();
    assert!(latest.ends_with("step-00000009"), "{}", latest.display());
    let w = latest.join("trainable.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    let o = lmforge(&strs(&["pretrain", "--resume", run.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let prev = run.join("checkpoints/step-00000006");
    assert!(
        err.contains("trainable.safetensors")
            && err.contains("step-00000009")
            && err.contains(&format!("lmforge pretrain --resume {}", prev.display())),
        "{err}"
    );
    // The offered checkpoint resumes, and the run rewrites step 9 on its way.
    let o = lmforge(&strs(&[
        "pretrain",
        "--quiet",
        "--resume",
        prev.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(losses(&run).len(), 12);
    // A `latest` that points outside its run is refused.
    std::fs::write(run.join("checkpoints/latest"), "../../elsewhere").unwrap();
    let o = lmforge(&strs(&["pretrain", "--resume", run.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a checkpoint name"));
}

#[test]
fn kill_drill_ends_with_the_uninterrupted_weights() {
    let d = tmpdir("kill_drill");
    let corpus = small_corpus(&d, 40_000);
    let steps = 400;
    let args = |out: &Path| {
        let mut a = strs(&["pretrain", "--quiet", "--out", out.to_str().unwrap()]);
        a.extend(tiny_pretrain(&corpus, steps));
        a.extend(strs(&["--set", "train.checkpoint_every=1"]));
        a
    };
    let full = d.join("full");
    assert!(lmforge(&args(&full)).status.success());

    let run = d.join("killed");
    let mut rng = lmforge::rng::Rng::new(2026);
    let mut kills = 0;
    for round in 0..30 {
        let started = run.join("checkpoints/latest").is_file();
        let mut a = if started {
            strs(&["pretrain", "--quiet", "--resume", run.to_str().unwrap()])
        } else {
            args(&run)
        };
        let mut c = cmd(&a);
        if round == 1 {
            // Certain to die inside a checkpoint write (after the weights, before the moments).
            c.env("LMFORGE_TEST_ABORT", "checkpoint:2");
        }
        let mut child = c.spawn().unwrap();
        let wait = std::time::Duration::from_millis(30 + rng.below(400));
        std::thread::sleep(wait);
        match child.try_wait().unwrap() {
            Some(status) if status.success() => break,
            Some(_) => kills += 1, // the abort hook
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
        // Whatever moment it died at, `latest` names a complete, verified checkpoint.
        if run.join("checkpoints/latest").is_file() {
            let ck = checkpoint::resolve(&run, "pretrain").unwrap();
            checkpoint::verify(&ck, "pretrain").unwrap();
        }
        a.clear();
    }
    if !run.join("model").is_dir() {
        let o = lmforge(&strs(&[
            "pretrain",
            "--quiet",
            "--resume",
            run.to_str().unwrap(),
        ]));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    println!("kill drill: {kills} kills");
    assert!(kills >= 3, "the drill killed the run only {kills} times");
    assert_eq!(final_weights(&full), final_weights(&run));
    assert_eq!(losses(&full), losses(&run));
}

#[test]
fn ctrl_c_writes_a_verified_checkpoint_and_exits_130() {
    let d = tmpdir("ctrl_c");
    let corpus = small_corpus(&d, 40_000);
    let run = d.join("run");
    let mut a = strs(&["pretrain", "--quiet", "--out", run.to_str().unwrap()]);
    a.extend(tiny_pretrain(&corpus, 3000));
    a.extend(strs(&["--set", "train.checkpoint_every=0"]));
    let mut child = cmd(&a).spawn().unwrap();
    // Interrupt once training is under way (the handler is installed before the first step).
    let t0 = std::time::Instant::now();
    while losses_if_any(&run) < 2 {
        assert!(t0.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let ck = checkpoint::resolve(&run, "pretrain").unwrap();
    let state = checkpoint::verify(&ck, "pretrain").unwrap();
    assert!(state.step >= 2 && state.step < 3000, "{}", state.step);
    assert_eq!(losses(&run).len() as u64, state.step);
}

fn losses_if_any(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
        .unwrap_or(0)
}

#[test]
fn a_run_without_a_validation_split_trains_and_says_so() {
    let d = tmpdir("no_val");
    let corpus = small_corpus(&d, 40_000);
    let run = d.join("run");
    let mut a = strs(&["pretrain", "--quiet", "--out", run.to_str().unwrap()]);
    a.extend(tiny_pretrain(&corpus, 5));
    a.extend(strs(&["--set", "data.val_fraction=0"]));
    let o = lmforge(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("done: 5 steps") && !err.contains("validation loss"),
        "{err}"
    );
    assert_eq!(losses(&run).len(), 5);
    assert!(run.join("model/model.safetensors").is_file());
}

/// The same seed and machine give bit-identical losses and weights at 2 and 3 threads (3 on a
/// 2-core machine oversubscribes it), run twice each, and — as the kernels' partial sums are
/// added in a fixed order — the same bits as one thread (rayon's `reduce` made the 1-thread and
/// 2-thread weights differ, and two 2-thread runs differ now and then). Both architectures:
/// llama (RMSNorm, RoPE, SwiGLU) and gpt2 (LayerNorm and bias gradients, the column sums).
#[test]
fn determinism_at_2_and_3_threads() {
    let d = tmpdir("determinism");
    let corpus = small_corpus(&d, 60_000);
    for arch in ["llama", "gpt2"] {
        let mut args = strs(&["pretrain"]);
        args.extend(tiny_pretrain(&corpus, 6));
        for kv in [
            "model.d_model=192",
            "model.n_layer=2",
            "model.n_head=4",
            "model.ctx=128",
            "data.seq_len=128",
            "train.batch_size=16",
            "train.grad_accum=1",
            "train.checkpoint_every=6",
        ] {
            args.extend(strs(&["--set", kv]));
        }
        args.extend(strs(&["--arch", arch]));
        let runs: Vec<_> = [1, 2, 2, 3, 3]
            .iter()
            .enumerate()
            .map(|(i, &threads)| {
                let out = d.join(format!("{arch}-{threads}-{i}"));
                let mut a = args.clone();
                a.extend(strs(&["--quiet", "--out", out.to_str().unwrap()]));
                let o = cmd_threads(&a, threads).output().unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                (threads, losses(&out), final_weights(&out))
            })
            .collect();
        assert_eq!(runs[0].1.len(), 6);
        for r in &runs[1..] {
            assert_eq!(
                (&r.1, &r.2),
                (&runs[0].1, &runs[0].2),
                "{arch}: a run at {} threads differs from the 1-thread run",
                r.0
            );
        }
    }
}
