//! Online RL end to end on the tiny llama: PPO, GRPO and RLOO raise a rule reward from its start
//! to near its maximum within a bounded number of steps with the KL bounded; the first update of
//! each rollout sees a probability ratio of exactly 1; a run stopped inside a rollout and resumed
//! logs what the uninterrupted run logs; bad reward settings are errors that say why.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The metrics lines of the run's steps.
fn steps(run: &Path) -> Vec<Value> {
    metrics(run)
        .into_iter()
        .filter(|m| m.get("loss").is_some())
        .collect()
}

/// Per rollout (the steps that made one): its value of `key`.
fn per_rollout(run: &Path, key: &str) -> Vec<f64> {
    steps(run)
        .iter()
        .filter_map(|m| m.get(key).and_then(Value::as_f64))
        .collect()
}

fn prompts(d: &Path) -> PathBuf {
    let p = d.join("prompts.jsonl");
    let rows: Vec<Value> = (0..24)
        .map(|i| json!({"prompt": format!("Question {i}: name a word."), "answer": i.to_string()}))
        .collect();
    write_jsonl(&p, &rows);
    p
}

const TINY: [&str; 8] = [
    "--reward",
    "contains:a",
    "--max-new-tokens",
    "4",
    "--batch-size",
    "16",
    "--quiet",
    "--set",
];

fn run_method(d: &Path, name: &str, method: &str, extra: &[&str]) -> PathBuf {
    let out = d.join(name);
    let data = prompts(d);
    let model = fixture("llama_tiny");
    let mut a = vec![
        method,
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend(TINY);
    a.push("train.seed=0");
    if !extra.contains(&"--max-steps") {
        a.extend(["--max-steps", "40"]);
    }
    a.extend(extra);
    ok(&a);
    out
}

/// Start value ≤ `start`, the last third of the rollouts' mean ≥ `target`, every KL ≤ `kl_max`.
fn learned(run: &Path, what: &str, kl_key: &str, (start, target, kl_max): (f64, f64, f64)) {
    let r = per_rollout(run, "reward");
    let kl = per_rollout(run, kl_key);
    let n = (r.len() / 3).max(3);
    let last: f64 = r[r.len() - n..].iter().sum::<f64>() / n as f64;
    assert!(
        r[0] <= start,
        "{what}: starts at {} (> {start}): {r:?}",
        r[0]
    );
    assert!(
        last >= target,
        "{what}: ends at {last:.3} (< {target}): {r:?}"
    );
    assert!(!kl.is_empty(), "{what}: no {kl_key} logged");
    assert!(
        kl.iter().all(|k| k.abs() <= kl_max),
        "{what}: {kl_key} beyond {kl_max}: {kl:?}"
    );
}

#[test]
fn ppo_grpo_and_rloo_learn_a_rule_reward_with_bounded_kl() {
    let d = tmpdir("rl_learn");
    // "contains a" starts near 0.1 on the random model (4 tokens of ~300), the maximum is 1.
    // Full fine-tunes at lr 2e-2, 40 steps of 16 responses.
    let ppo = run_method(&d, "ppo", "ppo", &["--lr", "2e-2"]);
    learned(&ppo, "ppo", "objective/kl", (0.3, 0.75, 15.0));
    let grpo = run_method(
        &d,
        "grpo",
        "grpo",
        &["--lr", "2e-2", "--beta", "0.04", "--num-generations", "4"],
    );
    learned(&grpo, "grpo", "kl", (0.3, 0.75, 5.0));
    let rloo = run_method(
        &d,
        "rloo",
        "rloo",
        &["--lr", "2e-2", "--num-generations", "4"],
    );
    learned(&rloo, "rloo", "kl", (0.3, 0.75, 5.0));
    // LoRA (the reference is the policy with its adapters off): PPO with its value head and
    // GRPO with a KL term. The tiny model's output head must train for its distribution to move.
    let lora = [
        "--peft",
        "lora",
        "--target-modules",
        "lm_head,q_proj,v_proj",
        "--lr",
        "5e-2",
    ];
    let ppo_l = run_method(&d, "ppo_lora", "ppo", &lora);
    learned(&ppo_l, "ppo lora", "objective/kl", (0.3, 0.75, 15.0));
    assert!(ppo_l.join("value_head.safetensors").is_file());
    // The outputs load as they are: the value head is in neither the adapter nor the model.
    let tiny = fixture("llama_tiny");
    let adapter = ppo_l.join("adapter");
    let full = ppo.join("model");
    for extra in [
        vec![
            "--model",
            tiny.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ],
        vec!["--model", full.to_str().unwrap()],
    ] {
        let mut a = vec!["generate", "--prompt", "x", "--max-new-tokens", "2"];
        a.extend(extra);
        ok(&a);
    }
    let mut g = lora.to_vec();
    g.extend(["--beta", "0.04", "--num-generations", "4"]);
    let grpo_l = run_method(&d, "grpo_lora", "grpo", &g);
    // k3 per token spikes when a sampled token is near impossible under the reference.
    learned(&grpo_l, "grpo lora", "kl", (0.3, 0.75, 60.0));
}

#[test]
fn the_first_update_of_each_rollout_has_ratio_one() {
    let d = tmpdir("rl_ratio");
    let run = run_method(
        &d,
        "ppo",
        "ppo",
        &["--lr", "2e-2", "--max-steps", "12", "--ppo-epochs", "4"],
    );
    let s = steps(&run);
    assert_eq!(s.len(), 12);
    for (i, m) in s.iter().enumerate() {
        let approx = m["policy/approxkl_avg"].as_f64().unwrap();
        let clip = m["policy/clipfrac_avg"].as_f64().unwrap();
        let ratio = m["val/ratio"].as_f64().unwrap();
        if i % 4 == 0 {
            // Old log-probs from the same micro-batches, before any update: exactly equal.
            assert!(m.get("reward").is_some(), "step {i} makes a rollout");
            assert_eq!((approx, clip, ratio), (0.0, 0.0, 1.0), "step {}", i + 1);
        } else {
            assert!(m.get("reward").is_none());
            assert!(
                approx > 0.0,
                "step {}: the policy moved, the ratio must too",
                i + 1
            );
        }
    }
    // GRPO with two passes over each rollout: no clipping on the first.
    let g = run_method(
        &d,
        "grpo",
        "grpo",
        &["--lr", "2e-2", "--max-steps", "6", "--num-iterations", "2"],
    );
    for (i, m) in steps(&g).iter().enumerate().step_by(2) {
        assert_eq!(
            m["clip_ratio/region_mean"].as_f64(),
            Some(0.0),
            "step {}",
            i + 1
        );
    }
}

#[test]
fn a_run_stopped_inside_a_rollout_resumes_exactly() {
    let d = tmpdir("rl_resume");
    let data = prompts(&d);
    let model = fixture("llama_tiny");
    for (method, extra) in [
        (
            "ppo",
            &["--peft", "lora", "--target-modules", "lm_head,q_proj"][..],
        ),
        ("grpo", &["--num-iterations", "2", "--beta", "0.1"][..]),
    ] {
        let (full, split) = (
            d.join(format!("{method}_full")),
            d.join(format!("{method}_split")),
        );
        let args = |out: &Path| -> Vec<String> {
            let mut a: Vec<String> = [
                method,
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--reward",
                "contains:e",
                "--max-new-tokens",
                "5",
                "--batch-size",
                "4",
                "--grad-accum",
                "2",
                "--max-steps",
                "10",
                "--lr",
                "1e-2",
                "--quiet",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        fn refs(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        ok(&refs(&args(&full)));
        let mut a = args(&split);
        // PPO: 4 steps per rollout, so step 6 is inside the second; GRPO: 2 per rollout, so
        // the resumed step 7 makes a fresh one from the restored weights.
        a.extend(["--stop-at-step".to_string(), "6".to_string()]);
        ok(&refs(&a));
        // The saved rollout belongs to this run's shape: another is refused, not misread.
        let e = fails(&[
            method,
            "--resume",
            split.to_str().unwrap(),
            "--grad-accum",
            "1",
            "--quiet",
        ]);
        assert!(e.contains("resume with the settings"), "{e}");
        ok(&[method, "--resume", split.to_str().unwrap(), "--quiet"]);
        let strip = |run: &Path| -> Vec<Value> {
            steps(run)
                .into_iter()
                .map(|mut m| {
                    let o = m.as_object_mut().unwrap();
                    o.retain(|k, _| {
                        !k.ends_with("_s") && !k.contains("per_s") && k != "peak_rss_mib"
                    });
                    m
                })
                .collect()
        };
        let (a, b) = (strip(&full), strip(&split));
        assert_eq!(a.len(), 10, "{method}");
        assert_eq!(
            a, b,
            "{method}: the resumed run logs other rewards or losses"
        );
    }
}

#[test]
fn reward_models_and_held_out_prompts() {
    let d = tmpdir("rl_rm");
    // The preference fixtures' LoRA reward model, read as an adapter of llama_tiny.
    let rm = fixture("preference/llama_tiny_rm/adapter");
    let run = run_method(
        &d,
        "ppo_rm",
        "ppo",
        &[
            "--max-steps",
            "4",
            "--reward-model",
            rm.to_str().unwrap(),
            "--reward-model-base",
            fixture("llama_tiny").to_str().unwrap(),
            "--eval-data",
            prompts(&d).to_str().unwrap(),
            "--missing-eos-penalty",
            "1.0",
        ],
    );
    let s = steps(&run);
    let r = s[0]["rewards/contains:a"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r));
    let m = s[0]
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.starts_with("rewards/model:"))
        .map(|(_, v)| v.as_f64().unwrap())
        .expect("the reward model's mean is logged");
    assert!(m.is_finite());
    // reward = rule + model, as logged.
    assert!((s[0]["reward"].as_f64().unwrap() - (r + m)).abs() < 1e-9);
    let lines = metrics(&run);
    // The baseline is evaluated before the first update, logged as step 0.
    assert!(
        lines[0]["step"] == 0 && lines[0]["eval_reward"].is_number(),
        "{}",
        lines[0]
    );
    let summary = lines.last().unwrap();
    assert!(summary["before_eval_reward"].is_number() && summary["eval_reward"].is_number());
}

#[test]
fn bad_reward_settings_are_errors() {
    let d = tmpdir("rl_bad");
    let data = prompts(&d);
    let model = fixture("llama_tiny");
    let (m, p) = (model.to_str().unwrap(), data.to_str().unwrap());
    let base = [
        "grpo",
        "--model",
        m,
        "--data",
        p,
        "--max-steps",
        "1",
        "--max-new-tokens",
        "4",
        "--quiet",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        let out = d.join("o");
        let _ = std::fs::remove_dir_all(&out);
        a.extend(["--out", out.to_str().unwrap()]);
        a.extend(extra);
        fails(&a)
    };
    let e = with(&[]);
    assert!(e.contains("no reward"), "{e}");
    let e = with(&["--reward", "contians:x"]);
    assert!(e.contains("unknown reward rule"), "{e}");
    let e = with(&[
        "--reward",
        "eos",
        "--batch-size",
        "6",
        "--num-generations",
        "4",
    ]);
    assert!(e.contains("not a multiple of 4"), "{e}");
    let no_answer = d.join("q.jsonl");
    write_jsonl(
        &no_answer,
        &[json!({"prompt": "a"}), json!({"prompt": "b"})],
    );
    let mut a = base.to_vec();
    a[4] = no_answer.to_str().unwrap();
    let o2 = d.join("o2");
    a.extend(["--out", o2.to_str().unwrap(), "--reward", "number"]);
    let e = fails(&a);
    assert!(e.contains("q.jsonl:1") && e.contains("answer"), "{e}");
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"fine\"}\n{\"question\": 3}\n").unwrap();
    let mut a = base.to_vec();
    a[4] = bad.to_str().unwrap();
    let o3 = d.join("o3");
    a.extend(["--out", o3.to_str().unwrap(), "--reward", "eos"]);
    let e = fails(&a);
    assert!(e.contains("bad.jsonl:2"), "{e}");
}

#[test]
fn label_ranks_candidates_sampled_from_a_policy() {
    let d = tmpdir("rl_candidates");
    let data = prompts(&d);
    let model = fixture("llama_tiny");
    let m = model.to_str().unwrap();
    let out = d.join("pairs.jsonl");
    // The tiny judge's context is 64 tokens: a short rubric.
    let rubric = d.join("rubric.jinja");
    std::fs::write(
        &rubric,
        "{{ prompt }} A:{{ response_a }} B:{{ response_b }} Better:",
    )
    .unwrap();
    let err = ok(&[
        "label",
        "--rubric",
        rubric.to_str().unwrap(),
        "--judge",
        m,
        "--policy",
        m,
        "--candidates",
        "3",
        "--data",
        data.to_str().unwrap(),
        "--sample",
        "6",
        "--max-new-tokens",
        "6",
        "--min-margin",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("sampled 18 candidates for 6 prompts"), "{err}");
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty() && lines.len() <= 6, "{}", lines.len());
    for l in &lines {
        assert_eq!(l["candidates"], 3);
        assert_ne!(l["chosen"], l["rejected"]);
        let p = l["judge_p_chosen"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&p), "{p}");
        let s: Vec<f64> = l["candidate_scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(s.len(), 3);
        // The three scores are each candidate's mean P(beats another): they sum to 3/2.
        assert!((s.iter().sum::<f64>() - 1.5).abs() < 1e-9, "{s:?}");
    }
    // The pairs train DPO as they are.
    let run = d.join("dpo");
    ok(&[
        "dpo",
        "--model",
        m,
        "--data",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--batch-size",
        "1",
        "--grad-accum",
        "1",
        "--out",
        run.to_str().unwrap(),
        "--quiet",
    ]);
    // --candidates needs a policy.
    let e = fails(&[
        "label",
        "--judge",
        m,
        "--candidates",
        "3",
        "--data",
        data.to_str().unwrap(),
        "--out",
        d.join("x.jsonl").to_str().unwrap(),
    ]);
    assert!(e.contains("--policy"), "{e}");
}

/// Conversations as prompts: the policy renders them through its template and the reward model
/// scores the reply as an assistant turn through its own.
#[test]
fn conversations_reach_the_reward_model_as_conversations() {
    let d = tmpdir("rl_chat_rm");
    let rm = d.join("rm");
    std::fs::create_dir_all(&rm).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let src = fixture("preference/llama_tiny_rm/adapter").join(f);
        std::fs::copy(src, rm.join(f)).unwrap();
    }
    // Short templates: the tiny models' context is 64 tokens.
    let tpl = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }};{% endfor %}{% if add_generation_prompt %}a:{% endif %}";
    std::fs::write(rm.join("chat_template.jinja"), tpl).unwrap();
    let policy_tpl = d.join("policy.jinja");
    std::fs::write(&policy_tpl, tpl).unwrap();
    let data = d.join("chat.jsonl");
    let rows: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": [{"role": "user", "content": format!("q{i}")}]}))
        .collect();
    write_jsonl(&data, &rows);
    let model = fixture("llama_tiny");
    let out = d.join("run");
    ok(&[
        "grpo",
        "--model",
        model.to_str().unwrap(),
        "--chat-template",
        policy_tpl.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--reward-model",
        rm.to_str().unwrap(),
        "--reward-model-base",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let s = steps(&out);
    assert!(
        s[0]["reward"].as_f64().is_some_and(f64::is_finite),
        "{}",
        s[0]
    );
}
