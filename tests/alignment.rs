//! Preference alignment commands end to end on the tiny fixtures: `dpo` starts at ln 2 and
//! precomputed and live references train alike; ORPO, SimPO and KTO train (KTO the same however
//! a step is split); a reward model learns a rule and is read back; a judge's labels feed DPO.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn step_losses(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .filter(|m| m.get("loss").is_some())
        .map(|m| m["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn dpo_starts_at_ln2_and_live_and_cached_references_agree() {
    let d = tmpdir("pref_dpo");
    let model = fixture("llama_tiny");
    let data = tiny_pairs(&d, 16);
    let m = model.to_str().unwrap();
    let data_s = data.to_str().unwrap();
    let cache = d.join("cache");
    let common = [
        "--model",
        m,
        "--data",
        data_s,
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--set",
        "train.lr=5e-3",
        "--quiet",
    ];
    for (peft, tag) in [(&["--peft", "lora"][..], "lora"), (&[][..], "full")] {
        let run_c = d.join(format!("{tag}_cached"));
        let run_l = d.join(format!("{tag}_live"));
        let mut a: Vec<&str> = vec![
            "dpo",
            "--out",
            run_c.to_str().unwrap(),
            "--ref-cache",
            cache.to_str().unwrap(),
        ];
        a.extend(common);
        a.extend(peft);
        ok(&a);
        let mut b: Vec<&str> = vec!["dpo", "--out", run_l.to_str().unwrap(), "--ref-live"];
        b.extend(common);
        b.extend(peft);
        ok(&b);
        let (lc, ll) = (step_losses(&run_c), step_losses(&run_l));
        assert_eq!(lc.len(), 4);
        assert!(
            (lc[0] - std::f64::consts::LN_2).abs() < 1e-6,
            "{tag}: first loss {} ≠ ln 2",
            lc[0]
        );
        for (x, y) in lc.iter().zip(&ll) {
            assert!((x - y).abs() < 1e-4, "{tag}: cached {lc:?} vs live {ll:?}");
        }
        assert!(lc[3] < lc[0], "{tag}: {lc:?}");
        let first = &metrics(&run_c)[0];
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(first[k].is_number(), "{tag}: {k} missing in {first}");
        }
        let out = if tag == "lora" {
            "adapter/adapter_config.json"
        } else {
            "model/model.safetensors"
        };
        assert!(run_c.join(out).is_file(), "{tag}: {out}");
    }
    // The second LoRA/full run found the first one's cache; changed data recomputes it.
    let run = d.join("again");
    let mut a = vec![
        "dpo",
        "--out",
        run.to_str().unwrap(),
        "--ref-cache",
        cache.to_str().unwrap(),
    ];
    a.extend([
        "--model",
        m,
        "--data",
        data_s,
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
    ]);
    let err = ok(&a);
    assert!(err.contains("read from"), "{err}");
    let data2 = tiny_pairs(&d, 12);
    let run = d.join("again2");
    let a = [
        "dpo",
        "--out",
        run.to_str().unwrap(),
        "--ref-cache",
        cache.to_str().unwrap(),
        "--model",
        m,
        "--data",
        data2.to_str().unwrap(),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
    ];
    let err = ok(&a);
    assert!(err.contains("computed"), "{err}");
}

#[test]
fn orpo_simpo_and_kto_train_without_and_with_a_reference() {
    let d = tmpdir("pref_others");
    let m = fixture("llama_tiny");
    let data = tiny_pairs(&d, 16);
    for loss in ["orpo", "simpo", "ipo", "hinge", "robust"] {
        let run = d.join(loss);
        let mut a = vec![
            "dpo",
            "--loss",
            loss,
            "--out",
            run.to_str().unwrap(),
            "--model",
            m.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--set",
            "train.lr=5e-3",
        ];
        if loss == "robust" {
            a.extend(["--label-smoothing", "0.1"]);
        }
        let err = ok(&a);
        assert_eq!(
            err.contains("reference log-probs"),
            !matches!(loss, "orpo" | "simpo"),
            "{loss}: {err}"
        );
        let l = step_losses(&run);
        assert!(
            l.iter().all(|x| x.is_finite()) && l[5] < l[0],
            "{loss}: {l:?}"
        );
        if loss == "orpo" {
            assert!(
                metrics(&run)[0]["nll_loss"].is_number()
                    && metrics(&run)[0]["log_odds_ratio"].is_number()
            );
        }
    }
    let run = d.join("kto");
    ok(&[
        "kto",
        "--out",
        run.to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--set",
        "train.lr=5e-3",
        "--peft",
        "lora",
        "--lora-dropout",
        "0",
    ]);
    let l = step_losses(&run);
    assert!(
        (l[0] - 0.5).abs() < 1e-6,
        "KTO starts at 1 − σ(0) = 0.5: {l:?}"
    );
    assert!(l[5] < l[0] && metrics(&run)[5]["kl"].is_number(), "{l:?}");
    // KTO's KL estimate is taken over the whole step: four one-example micro-batches give the
    // same run as one micro-batch of four (without dropout, whose masks follow the micro-batch).
    let split = d.join("kto_split");
    ok(&[
        "kto",
        "--out",
        split.to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-steps",
        "6",
        "--batch-size",
        "1",
        "--grad-accum",
        "4",
        "--set",
        "train.lr=5e-3",
        "--peft",
        "lora",
        "--lora-dropout",
        "0",
    ]);
    let (a, b) = (metrics(&run), metrics(&split));
    for k in 0..6 {
        for key in ["loss", "kl"] {
            let (x, y) = (a[k][key].as_f64().unwrap(), b[k][key].as_f64().unwrap());
            assert!(
                (x - y).abs() < 1e-5,
                "step {}: {key} {x} vs {y} split",
                k + 1
            );
        }
    }
    // Out-of-range constants are errors naming the option.
    let o = lmforge(&[
        "dpo",
        "--loss",
        "exo_pair",
        "--out",
        d.join("bad").to_str().unwrap(),
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("label_smoothing"));
}

/// Preferences with a rule a reward model can learn: chosen replies are kind, rejected ones rude.
fn rule_pairs(d: &Path, n: usize) -> PathBuf {
    let (kind, rude) = (
        ["good", "great", "lovely", "fine"],
        ["bad", "vile", "foul", "cruel"],
    );
    let filler = ["the", "lord", "king", "is", "a", "day"];
    let mut r = lmforge::rng::Rng::new(11);
    let mut pick = |xs: &[&'static str]| xs[r.below(xs.len() as u64) as usize];
    let rows: Vec<Value> = (0..n)
        .map(|i| {
            let f = pick(&filler);
            json!({"prompt": format!("{i} {}:", pick(&filler)), "chosen": format!(" {f} {} {}", pick(&kind), pick(&filler)),
                   "rejected": format!(" {f} {} {}", pick(&rude), pick(&filler))})
        })
        .collect();
    let p = d.join("rule.jsonl");
    write_jsonl(&p, &rows);
    p
}

#[test]
fn a_reward_model_learns_a_rule_and_scores_it_back() {
    let d = tmpdir("pref_reward");
    let data = rule_pairs(&d, 160);
    let lora = &["--peft", "lora", "--lora-r", "8"][..];
    // (run, body, flags, what the output's config says)
    let cases = [
        (
            "llama",
            "llama_tiny",
            &[][..],
            json!("LlamaForSequenceClassification"),
        ),
        ("llama_lora", "llama_tiny", lora, json!(["score"])),
        (
            "bert",
            "bert_tiny",
            &[][..],
            json!("BertForSequenceClassification"),
        ),
        (
            "bert_lora",
            "bert_tiny",
            lora,
            json!(["classifier", "pooler"]),
        ),
    ];
    for (tag, body, peft, want) in cases {
        let run = d.join(tag);
        let m = fixture(body);
        let mut a = vec![
            "reward",
            "--out",
            run.to_str().unwrap(),
            "--model",
            m.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--eval-fraction",
            "0.25",
            "--epochs",
            "4",
            "--batch-size",
            "8",
            "--grad-accum",
            "1",
            "--set",
            "train.lr=3e-3",
            "--quiet",
        ];
        a.extend(peft);
        ok(&a);
        let last = metrics(&run)
            .into_iter()
            .rfind(|m| m.get("eval_accuracy").is_some())
            .unwrap();
        let acc = last["eval_accuracy"].as_f64().unwrap();
        assert!(acc >= 0.9, "{tag}: held-out pairwise accuracy {acc}");
        let adapter = !peft.is_empty();
        let out = run.join(if adapter { "adapter" } else { "model" });
        let file = out.join(if adapter {
            "adapter_config.json"
        } else {
            "config.json"
        });
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        if adapter {
            assert_eq!(
                (&cfg["task_type"], &cfg["modules_to_save"]),
                (&json!("SEQ_CLS"), &want),
                "{tag}"
            );
        } else {
            assert_eq!(
                (&cfg["architectures"][0], &cfg["num_labels"]),
                (&want, &json!(1)),
                "{tag}"
            );
        }
        let o = lmforge(&[
            "reward",
            "score",
            "--model",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        let lines: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 161, "one line per pair and a summary");
        let read_back = lines[160]["accuracy"].as_f64().unwrap();
        assert!(read_back >= 0.9, "{tag}: {}", lines[160]);
    }
}

#[test]
fn a_judge_labels_both_orders_and_its_pairs_train_dpo() {
    let d = tmpdir("pref_label");
    let m = fixture("llama_tiny");
    let data = rule_pairs(&d, 12);
    let out = d.join("labelled.jsonl");
    // The tiny judge's context is 64 tokens: a short rubric (the default one is ~100 words).
    let rubric = d.join("rubric.jinja");
    std::fs::write(
        &rubric,
        "{{ prompt }} A:{{ response_a }} B:{{ response_b }} Better:",
    )
    .unwrap();
    let r = rubric.to_str().unwrap();
    let err = ok(&[
        "label",
        "--judge",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--min-margin",
        "0",
        "--rubric",
        r,
    ]);
    assert!(err.contains("agreement with the human labels"), "{err}");
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 12);
    for r in &rows {
        let p = r["judge_p_chosen"].as_f64().unwrap();
        let pa = r["judge_p_a"].as_array().unwrap();
        let (p1, p2) = (pa[0].as_f64().unwrap(), pa[1].as_f64().unwrap());
        // Both orders enter: P(chosen) is the mean of one order's P(A) and the other's P(B).
        let first = (p1 + 1.0 - p2) / 2.0;
        assert!(
            p >= 0.5 && ((p - first).abs() < 1e-12 || (p - (1.0 - first)).abs() < 1e-12),
            "{r}"
        );
    }
    // The output is preference data; an existing file is not replaced without --overwrite.
    let run = d.join("dpo");
    ok(&[
        "dpo",
        "--model",
        m.to_str().unwrap(),
        "--data",
        out.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    let o = lmforge(&[
        "label",
        "--judge",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rubric",
        r,
    ]);
    assert!(
        !o.status.success(),
        "an existing --out must need --overwrite"
    );
    // Ties are dropped at a margin nobody reaches.
    let out2 = d.join("strict.jsonl");
    let err = ok(&[
        "label",
        "--judge",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--min-margin",
        "0.4999",
        "--rubric",
        r,
    ]);
    assert!(err.contains("ties dropped"), "{err}");
}
