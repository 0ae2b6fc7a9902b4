//! Data parallelism through Open MPI's `mpirun` on loopback TCP (`dist`): two ranks with
//! micro-batch b train as one process with batch 2b (pretrain and sft, 20 steps, 1e-5
//! relative); a 2-rank checkpoint resumes on one rank along the same curve; a rank killed mid-run
//! ends the job at once with the rank named and an intact `latest`; ranks whose weights or options
//! differ are stopped by the checksums. Skipped (and said so) where `mpirun` is not installed, unless
//! `LMFORGE_REQUIRE_MPI=1` (CI), which makes a missing `mpirun` a failure.

mod common;
use common::*;
use lmforge::train::engine::checkpoint;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn have_mpirun() -> bool {
    let found = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("LMFORGE_REQUIRE_MPI").is_err(),
            "LMFORGE_REQUIRE_MPI is set but mpirun is missing (scripts/setup_mpi.sh)"
        );
        eprintln!("skipped: mpirun not installed (scripts/setup_mpi.sh installs Open MPI)");
    }
    found
}

/// A fresh directory with a small corpus in it, or None (skipped) without mpirun.
fn start(name: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    if !have_mpirun() {
        return None;
    }
    let d = tmpdir(name);
    let corpus = small_corpus(&d, 40_000);
    Some((d, corpus))
}

/// `mpirun -np N lmforge ARGS` over loopback TCP, one thread per rank.
fn mpirun(n: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .args([
            "--mca",
            "btl",
            "self,tcp",
            "--mca",
            "btl_tcp_if_include",
            "lo",
        ])
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .arg(env!("CARGO_BIN_EXE_lmforge"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn one(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn success(o: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{what} failed:\n{err}");
    err
}

fn losses(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .filter_map(|v| v.get("loss")?.as_f64())
        .collect()
}

fn same_curve(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs(),
            "{what}: step {} loss {x} vs {y}",
            i + 1
        );
    }
}

fn pretrain_args<'a>(corpus: &'a str, out: &'a str, batch: &'a str) -> Vec<&'a str> {
    let mut a = vec!["pretrain", "--data", corpus, "--out", out, "--quiet"];
    a.extend([
        "--max-steps",
        "20",
        "--batch-size",
        batch,
        "--grad-accum",
        "2",
    ]);
    a.extend(TINY_GPT);
    for kv in [
        "train.lr=3e-3",
        "train.checkpoint_every=5",
        "train.dist_check_every=4",
    ] {
        a.extend(["--set", kv]);
    }
    a
}

#[test]
fn two_ranks_train_as_one_process_with_twice_the_batch() {
    let Some((d, corpus)) = start("dist_same") else {
        return;
    };
    let c = corpus.to_str().unwrap();
    let (r1, r2) = (d.join("one"), d.join("two"));
    success(one(&pretrain_args(c, r1.to_str().unwrap(), "4")), "1 rank");
    let o = mpirun(2, &pretrain_args(c, r2.to_str().unwrap(), "2"))
        .output()
        .unwrap();
    success(o, "2 ranks");
    same_curve(&losses(&r2), &losses(&r1), "pretrain");
    let m = metrics(&r2);
    assert!(m[0]["ranks"] == 2 && m[0]["allreduce_s"].as_f64().unwrap() > 0.0);
    // Rank 1 wrote only its log; the run is rank 0's.
    let log = std::fs::read_to_string(r2.join("logs/rank-1.log")).unwrap();
    assert!(log.starts_with("rank 1 of 2, pid "), "{log}");
    assert!(r2.join("model/model.safetensors").is_file());

    // SFT: 2 ranks × 2, stopped at step 10, resumed on 1 rank × 4: the curve of 1 rank × 4.
    let data = tiny_sft(&d, 24);
    let sft = |out: &Path, batch: &str| -> Vec<String> {
        let steps = [
            "--max-steps",
            "20",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "5",
        ];
        tiny_sft_args(&data, out, &[&steps[..], &["--batch-size", batch]].concat())
    };
    let (s1, s2, s3) = (d.join("sft_one"), d.join("sft_two"), d.join("sft_two_20"));
    let a1 = sft(&s1, "4");
    success(
        one(&a1.iter().map(String::as_str).collect::<Vec<_>>()),
        "sft 1 rank",
    );
    let a3 = sft(&s3, "2");
    let a3: Vec<&str> = a3.iter().map(String::as_str).collect();
    success(mpirun(2, &a3).output().unwrap(), "sft 2 ranks, 20 steps");
    same_curve(&losses(&s3), &losses(&s1), "sft 2 ranks");
    let mut a2 = sft(&s2, "2");
    a2.extend(["--stop-at-step", "10"].map(String::from));
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    success(mpirun(2, &a2).output().unwrap(), "sft 2 ranks");
    assert_eq!(losses(&s2).len(), 10);
    let o = one(&[
        "sft",
        "--resume",
        s2.to_str().unwrap(),
        "--batch-size",
        "4",
        "--quiet",
    ]);
    let err = success(o, "sft resumed on 1 rank");
    assert!(!err.contains("warning"), "same global batch: {err}");
    same_curve(&losses(&s2), &losses(&s1), "sft 2 ranks, then 1");
}

#[test]
fn a_killed_rank_ends_the_job_and_leaves_an_intact_checkpoint() {
    let Some((d, corpus)) = start("dist_kill") else {
        return;
    };
    let run = d.join("run");
    let mut args = pretrain_args(corpus.to_str().unwrap(), run.to_str().unwrap(), "2");
    let at = args.iter().position(|a| *a == "20").unwrap();
    args[at] = "1000000";
    let child = mpirun(2, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few checkpoints, then kill rank 1 (its pid heads its log).
    let t0 = Instant::now();
    let log = run.join("logs/rank-1.log");
    let pid = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
        let steps = std::fs::read_to_string(run.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let pid = text
            .split_whitespace()
            .skip_while(|w| *w != "pid")
            .nth(1)
            .map(|p| p.trim_end_matches(',').to_string());
        if let (true, Some(p)) = (steps >= 12, pid) {
            break p;
        }
    };
    let killed = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let waited = killed.elapsed();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    assert!(text.contains("rank 1"), "{text}");
    let ck = checkpoint::resolve(&run, "pretrain").unwrap();
    let state = checkpoint::verify(&ck, "pretrain").unwrap();
    assert!(
        state.step >= 5 && state.step.is_multiple_of(5),
        "{}",
        state.step
    );
    eprintln!(
        "killed rank 1; mpirun ended in {waited:?}; latest = step {}",
        state.step
    );
}

#[test]
fn ranks_with_different_weights_are_stopped() {
    let Some((d, corpus)) = start("dist_diverge") else {
        return;
    };
    let run = d.join("run");
    let args = pretrain_args(corpus.to_str().unwrap(), run.to_str().unwrap(), "2");
    // MPMD: rank 1 initialises with another seed.
    let mut c = mpirun(1, &args);
    c.args([":", "-np", "1", "-x", "RAYON_NUM_THREADS=1"])
        .arg(env!("CARGO_BIN_EXE_lmforge"))
        .args(&args)
        .args(["--set", "train.seed=7"]);
    let t0 = Instant::now();
    let o = c.output().unwrap();
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert!(
        text.contains("weights at step 0 differ") && text.contains("rank 1:"),
        "{text}"
    );
    // A full fine-tune starts from the same weights whatever the seed: the options tell.
    let data = tiny_sft(&d, 8);
    let sft = tiny_sft_args(
        &data,
        &d.join("sft"),
        &["--max-steps", "4", "--batch-size", "2"],
    );
    let sft: Vec<&str> = sft.iter().map(String::as_str).collect();
    let mut c = mpirun(1, &sft);
    c.args([":", "-np", "1"])
        .arg(env!("CARGO_BIN_EXE_lmforge"))
        .args(&sft)
        .args(["--set", "train.seed=7"]);
    let o = c.output().unwrap();
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(text.contains("options (config.toml) differ"), "{text}");
}

/// Every other trainer on the engine: 2 ranks × b = 1 process × 2b (6 steps).
#[test]
fn every_trainer_runs_on_two_ranks_as_one_process() {
    if !have_mpirun() {
        return;
    }
    let d = tmpdir("dist_methods");
    let (llama, bert) = (fixture("llama_tiny"), fixture("bert_tiny"));
    let (llama, bert) = (llama.to_str().unwrap(), bert.to_str().unwrap());
    let pairs = tiny_pairs(&d, 24);
    let prompts = d.join("prompts.jsonl");
    let rows: Vec<serde_json::Value> = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("Question {i}: name a word.")}))
        .collect();
    write_jsonl(&prompts, &rows);
    let kto = d.join("kto.jsonl");
    let rows: Vec<serde_json::Value> = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}: yes or no?"), "completion": if i % 2 == 0 { " yes" } else { " no" }, "label": i % 2 == 0}))
        .collect();
    write_jsonl(&kto, &rows);
    let (cls, _) = classify_data(&d);
    let (pairs, prompts, kto) = (
        pairs.to_str().unwrap(),
        prompts.to_str().unwrap(),
        kto.to_str().unwrap(),
    );
    let rl = [
        "--reward",
        "contains:a",
        "--max-new-tokens",
        "4",
        "--lr",
        "2e-2",
    ];
    let cases: Vec<(&str, usize, Vec<&str>)> = vec![
        (
            "dpo",
            2,
            vec!["dpo", "--model", llama, "--data", pairs, "--lr", "1e-3"],
        ),
        (
            "kto",
            2,
            vec!["kto", "--model", llama, "--data", kto, "--lr", "1e-3"],
        ),
        (
            "reward",
            2,
            vec!["reward", "--model", llama, "--data", pairs, "--lr", "1e-3"],
        ),
        (
            "classify",
            4,
            vec![
                "finetune", "--task", "classify", "--model", bert, "--data", &cls, "--lr", "3e-3",
            ],
        ),
        (
            "grpo",
            8,
            [
                vec![
                    "grpo",
                    "--model",
                    llama,
                    "--data",
                    prompts,
                    "--num-generations",
                    "4",
                ],
                rl.to_vec(),
            ]
            .concat(),
        ),
        (
            "ppo",
            8,
            [
                vec!["ppo", "--model", llama, "--data", prompts],
                rl.to_vec(),
            ]
            .concat(),
        ),
    ];
    for (name, b, args) in cases {
        let (one_dir, two_dir) = (d.join(format!("{name}_1")), d.join(format!("{name}_2")));
        let with = |out: &Path, batch: &str| -> Vec<String> {
            let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            a.extend(
                [
                    "--max-steps",
                    "6",
                    "--quiet",
                    "--batch-size",
                    batch,
                    "--out",
                ]
                .map(String::from),
            );
            a.push(out.to_str().unwrap().to_string());
            a
        };
        let a1 = with(&one_dir, &(2 * b).to_string());
        success(
            one(&a1.iter().map(String::as_str).collect::<Vec<_>>()),
            name,
        );
        let a2 = with(&two_dir, &b.to_string());
        let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
        success(mpirun(2, &a2).output().unwrap(), name);
        let (l1, l2) = (losses(&one_dir), losses(&two_dir));
        assert_eq!(l1.len(), 6, "{name}");
        for (x, y) in l1.iter().zip(&l2) {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-2),
                "{name}: {l1:?} vs {l2:?}"
            );
        }
    }
}
