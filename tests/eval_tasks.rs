//! Task files (few-shot sampler, errors), the `eval` command over every kind, classifiers,
//! chat mode, and trainers' `--eval-suite`.

mod common;

use common::{fails, fixture, ok, tmpdir};
use lmforge::eval::task::Task;
use serde_json::Value;
use std::path::Path;

fn write_task(dir: &Path, name: &str, toml: &str, items: &[Value]) -> String {
    common::write_jsonl(&dir.join(format!("{name}.jsonl")), items);
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, toml.replace("DATA", &format!("{name}.jsonl"))).unwrap();
    p.display().to_string()
}

fn mc_items(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| serde_json::json!({"q": format!("Question {i}: is {i} even?"), "choices": ["yes", "no"], "gold": i % 2}))
        .collect()
}

const MC: &str = "kind = \"multiple_choice\"\ndata = \"DATA\"\ndoc_to_text = \"{{ q }}\\nAnswer:\"\ndoc_to_choice = \"choices\"\ndoc_to_target = \"gold\"\nmetrics = [\"acc\", \"acc_norm\", \"acc_bytes\"]\n";

#[test]
fn a_demonstration_is_never_the_evaluated_item() {
    let d = tmpdir("eval_shots");
    let p = write_task(&d, "mc", MC, &mc_items(7));
    let t = Task::resolve(&p, &d).unwrap();
    for seed in [0, 1, 2] {
        for i in 0..7 {
            let s = t.shots(i, 6, seed).unwrap();
            assert_eq!(s.len(), 6);
            assert!(!s.contains(&i), "item {i} got itself: {s:?}");
            let mut u = s.clone();
            u.sort_unstable();
            u.dedup();
            assert_eq!(u.len(), 6, "repeated demonstration {s:?}");
        }
    }
    assert_ne!(t.shots(0, 3, 1).unwrap(), t.shots(0, 3, 2).unwrap());
    let e = t.shots(0, 7, 0).unwrap_err().to_string();
    assert!(e.contains("pool has 6"), "{e}");
    let first = write_task(
        &d,
        "mc_first",
        &format!("{MC}fewshot_sampler = \"first_n\"\n"),
        &mc_items(7),
    );
    let t = Task::resolve(&first, &d).unwrap();
    assert_eq!(t.shots(0, 3, 9).unwrap(), vec![1, 2, 3]);
    assert_eq!(t.shots(2, 3, 9).unwrap(), vec![0, 1, 3]);
    // A duplicated row is the item too (lm-eval compares by value).
    let mut dup = mc_items(4);
    dup.push(dup[0].clone());
    let p = write_task(&d, "mc_dup", MC, &dup);
    let t = Task::resolve(&p, &d).unwrap();
    assert_eq!(t.shots(0, 3, 1).unwrap().len(), 3);
    for seed in 0..5 {
        let s = t.shots(0, 3, seed).unwrap();
        assert!(!s.contains(&0) && !s.contains(&4), "{s:?}");
    }
    assert!(t.shots(4, 4, 0).is_err(), "only 3 others exist");
    // A field's string names a choice even when it is digits; a rendered one is an index.
    let items = vec![serde_json::json!({"q": "pick", "choices": ["1", "2"], "gold": "2"})];
    let p = write_task(&d, "mc_digits", MC, &items);
    let t = Task::resolve(&p, &d).unwrap();
    assert_eq!(
        t.target(&t.items[0]).unwrap(),
        lmforge::eval::task::Target::Index(1)
    );
    let p = write_task(
        &d,
        "mc_digits2",
        &MC.replace("\"gold\"", "\"{{ gold }}\""),
        &items,
    );
    let e = format!("{:#}", Task::resolve(&p, &d).unwrap_err());
    assert!(
        e.contains("not one of the"),
        "rendered \"2\" is index 2 of 2 choices: {e}"
    );
}

#[test]
fn task_file_errors_name_the_file_and_the_key() {
    let d = tmpdir("eval_task_errors");
    let items = mc_items(3);
    for (toml, want) in [
        (format!("{MC}colour = 1\n"), "unknown field `colour`"),
        (
            MC.replace("[\"acc\", \"acc_norm\", \"acc_bytes\"]", "[\"bleu\"]"),
            "key `metrics`: bleu does not apply",
        ),
        (
            MC.replace("doc_to_text = \"{{ q }}\\nAnswer:\"\n", ""),
            "key `doc_to_text` is required",
        ),
        (MC.replace("{{ q }}", "{{ q "), "key `doc_to_text`"),
        (MC.replace("\"gold\"", "\"nope\""), "no field \"nope\""),
        (MC.replace("multiple_choice", "quiz"), "key `kind`"),
    ] {
        let p = write_task(&d, "bad", &toml, &items);
        let e = format!("{:#}", Task::resolve(&p, &d).unwrap_err());
        assert!(e.contains("bad.toml") && e.contains(want), "{want}: {e}");
    }
    std::fs::write(d.join("broken.jsonl"), "{\"q\": 1}\nnot json\n").unwrap();
    std::fs::write(d.join("broken.toml"), MC.replace("DATA", "broken.jsonl")).unwrap();
    let e = format!(
        "{:#}",
        Task::resolve(d.join("broken.toml").to_str().unwrap(), &d).unwrap_err()
    );
    assert!(e.contains("broken.jsonl:2"), "{e}");
    let e = format!("{:#}", Task::resolve("no_such_task", &d).unwrap_err());
    assert!(e.contains("built-in") && e.contains("mmlu"), "{e}");
}

#[test]
fn eval_command_runs_every_kind_and_writes_results() {
    let d = tmpdir("eval_cli");
    let mc = write_task(&d, "mc", MC, &mc_items(6));
    let gen_items: Vec<Value> = (0..4)
        .map(|i| serde_json::json!({"prompt": format!("Say {i}:"), "refs": [format!("{i}"), "zero"]}))
        .collect();
    let gen = write_task(
        &d,
        "gen",
        "kind = \"generate\"\ndata = \"DATA\"\ndoc_to_text = \"{{ prompt }}\"\ndoc_to_target = \"refs\"\nuntil = [\"\\n\"]\nmax_gen_toks = 6\nmetrics = [\"exact_match\", \"squad_f1\", \"bleu\", \"chrf\", \"rouge_l\"]\n",
        &gen_items,
    );
    let docs: Vec<Value> = (0..3)
        .map(|i| serde_json::json!({"text": "word ".repeat(40 + 30 * i)}))
        .collect();
    let roll = write_task(
        &d,
        "roll",
        "kind = \"rolling\"\ndata = \"DATA\"\ndoc_to_target = \"text\"\n",
        &docs,
    );
    let model = fixture("llama_tiny");
    let out = d.join("out");
    let tasks = format!("{mc},{gen},{roll},bias_templates");
    let o = common::lmforge(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        &tasks,
        "--shots",
        "0,2",
        "--out",
        out.to_str().unwrap(),
        "--baseline",
        model.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("| mc | acc |") && stdout.contains("0-shot") && stdout.contains("2-shot"),
        "{stdout}"
    );
    assert!(
        stdout.contains("BLEU signature: nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp"),
        "{stdout}"
    );
    // The baseline is the model itself: every change is zero.
    let deltas: Vec<&str> = stdout
        .split("Change from the baseline")
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| task"))
        .collect();
    assert!(deltas.len() >= 10, "{stdout}");
    for l in &deltas {
        assert!(l.trim_end().ends_with("| +0.0000 |"), "{l}");
    }
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let res = r["results"].as_object().unwrap();
    for key in [
        "mc|0-shot",
        "mc|2-shot",
        "gen|0-shot",
        "gen|2-shot",
        "roll|0-shot",
        "bias_templates|0-shot",
    ] {
        assert!(res.contains_key(key), "{key} missing: {:?}", res.keys());
    }
    assert_eq!(res["mc|2-shot"]["n"], 6);
    assert!(res["mc|0-shot"]["metrics"]["acc_stderr"].is_number());
    assert!(
        res["roll|0-shot"]["metrics"]["bits_per_byte"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let cats = res["bias_templates|0-shot"]["extra"]["categories"]
        .as_object()
        .unwrap();
    for c in ["gender", "race", "religion", "age", "nationality"] {
        let ci = &cats[c]["pct_stereotype"]["ci95"];
        assert!(
            ci[0].as_f64().unwrap() <= ci[1].as_f64().unwrap(),
            "{c}: {ci}"
        );
    }
    assert!(r["model_hash"].as_str().unwrap().len() == 16 && r["baseline"].is_object());
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    // 6 + 6 mc, 4 + 4 gen, 3 documents, 37 pairs.
    assert_eq!(samples.lines().count(), 6 + 6 + 4 + 4 + 3 + 37);
    // The written metrics are the samples' means.
    let accs: Vec<f64> = samples
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["task"] == "mc" && v["shots"] == 2)
        .map(|v| v["acc"].as_f64().unwrap())
        .collect();
    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
    assert!((mean - res["mc|2-shot"]["metrics"]["acc"].as_f64().unwrap()).abs() < 1e-12);
    // Too many demonstrations for a task's pool fail before any model runs.
    let early = d.join("early");
    let e = fails(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        &format!("{roll},{mc}"),
        "--shots",
        "0,6",
        "--out",
        early.to_str().unwrap(),
    ]);
    assert!(e.contains("pool has 5") && e.contains("mc.toml"), "{e}");
    assert!(!early.exists());
    // An earlier output is not replaced without --overwrite.
    let e = fails(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        &mc,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--overwrite") || e.contains("exists"), "{e}");
    ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        &mc,
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
        "--limit",
        "2",
    ]);
}

#[test]
fn a_trained_classifier_is_evaluated_like_finetune_evaluates_it() {
    let d = tmpdir("eval_classify");
    let (tr, te) = common::classify_data(&d);
    let bert = fixture("bert_tiny");
    let bs = bert.to_str().unwrap();
    // `finetune` into d/name with these extra flags: its summary line.
    let train = |name: &str, extra: &[&str]| -> Value {
        let out = d.join(name);
        let mut a = vec![
            "finetune",
            "--task",
            "classify",
            "--model",
            bs,
            "--data",
            &tr,
            "--eval-data",
            &te,
        ];
        a.extend([
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "3",
            "--lr",
            "3e-3",
            "--quiet",
        ]);
        a.extend_from_slice(extra);
        ok(&a);
        common::metrics(&out)
            .into_iter()
            .find(|v| v["summary"] == true)
            .unwrap()
    };
    // `eval` of a task on these model flags: its metrics.
    let eval = |task: &Path, name: &str, model: &[&str]| -> Value {
        let ev = d.join(name);
        let mut a = vec![
            "eval",
            "--tasks",
            task.to_str().unwrap(),
            "--out",
            ev.to_str().unwrap(),
        ];
        a.extend_from_slice(model);
        ok(&a);
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(ev.join("results.json")).unwrap())
                .unwrap();
        r["results"]["cls|0-shot"]["metrics"].clone()
    };
    let close = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-9;
    // A full fine-tune: its directory's id2label names the labels.
    let summary = train("ft", &[]);
    let task = d.join("cls.toml");
    std::fs::write(&task, format!("kind = \"classify\"\ndata = \"{te}\"\ndoc_to_text = \"{{{{ text }}}}\"\ndoc_to_target = \"label\"\n")).unwrap();
    let model = d.join("ft/model");
    let m = eval(&task, "ev", &["--model", model.to_str().unwrap()]);
    assert!(
        close(&m["acc"], &summary["accuracy"]) && close(&m["macro_f1"], &summary["macro_f1"]),
        "full: {m} vs {summary}"
    );
    // LoRA and DoRA: the adapter alone or on its base; labels are LABEL_i in sorted order.
    let ids = d.join("cls_ids.toml");
    std::fs::write(&ids, format!("name = \"cls\"\nkind = \"classify\"\ndata = \"{te}\"\ndoc_to_text = \"{{{{ text }}}}\"\ndoc_to_target = \"{{{{ 'LABEL_1' if label == 'pos' else 'LABEL_0' }}}}\"\n")).unwrap();
    // IA³ (BERT's table: key, value, output.dense), bottleneck adapters and prompt tuning
    // through the same path.
    for (name, flags) in [
        (
            "lora",
            vec!["--peft", "lora", "--lora-dropout", "0", "--lora-r", "4"],
        ),
        (
            "dora",
            vec!["--peft", "lora", "--lora-dropout", "0", "--use-dora"],
        ),
        ("ia3", vec!["--peft", "ia3"]),
        (
            "houlsby",
            vec!["--peft", "bottleneck", "--adapter-variant", "houlsby"],
        ),
        (
            "prompt",
            vec![
                "--peft",
                "prompt",
                "--num-virtual-tokens",
                "4",
                "--prompt-init-text",
                "a review",
            ],
        ),
        (
            "ptuning",
            vec!["--peft", "p-tuning", "--num-virtual-tokens", "4"],
        ),
    ] {
        let summary = train(name, &flags);
        let adapter = d.join(name).join("adapter");
        let a = adapter.to_str().unwrap();
        for (i, model) in [vec!["--model", a], vec!["--model", bs, "--adapter", a]]
            .iter()
            .enumerate()
        {
            let m = eval(&ids, &format!("ev_{name}{i}"), model);
            assert!(
                close(&m["acc"], &summary["accuracy"]),
                "{name} {model:?}: {m} vs {summary}"
            );
        }
    }
    // A causal-LM task on a classifier fails naming the mismatch.
    let e = fails(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        "bias_templates",
    ]);
    assert!(e.contains("classifier"), "{e}");
}

#[test]
fn trainers_run_an_eval_suite_before_and_after() {
    let d = tmpdir("eval_suite");
    let data = d.join("train.jsonl");
    let rows: Vec<Value> = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Q: number {i}?\nA:"), "completion": format!(" {i} is a number")}))
        .collect();
    common::write_jsonl(&data, &rows);
    let docs: Vec<Value> = (0..2).map(|i| serde_json::json!({"text": format!("Q: number {i}?\nA: {i} is a number. ").repeat(6)})).collect();
    let roll = write_task(
        &d,
        "roll",
        "kind = \"rolling\"\ndata = \"DATA\"\ndoc_to_target = \"text\"\n",
        &docs,
    );
    let base = fixture("llama_tiny");
    let out = d.join("run");
    let suite = format!("{roll},bias_templates");
    let args = |out: &Path, suite: &str| -> Vec<String> {
        [
            "sft",
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--peft",
            "lora",
            "--lora-r",
            "4",
            "--max-steps",
            "6",
            "--batch-size",
            "2",
            "--lr",
            "2e-2",
            "--quiet",
            "--eval-suite",
            suite,
            "--eval-suite-limit",
            "10",
        ]
        .map(String::from)
        .to_vec()
    };
    let a = args(&out, &suite);
    let o = common::lmforge(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("Change from the base model")
            && stdout.contains("| roll | 0 | bits_per_byte |"),
        "{stdout}"
    );
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("eval_suite/results.json")).unwrap(),
    )
    .unwrap();
    let after = r["results"]["roll|0-shot"]["metrics"]["bits_per_byte"]
        .as_f64()
        .unwrap();
    let before = r["baseline"]["results"]["roll|0-shot"]["metrics"]["bits_per_byte"]
        .as_f64()
        .unwrap();
    assert!(
        after < before,
        "training on the suite's own text should lower its bits per byte: {before} -> {after}"
    );
    assert_eq!(r["adapter"], out.join("adapter").display().to_string());
    // A broken suite fails before any training: an unknown task, demonstrations its pool cannot
    // give, a limit of 0.
    let shots = write_task(&d, "shots", &format!("{MC}num_fewshot = 5\n"), &mc_items(3));
    for (suite, extra, want) in [
        ("no_such_task", None, "no_such_task"),
        (shots.as_str(), None, "pool has 2"),
        (roll.as_str(), Some("0"), "--limit must be at least 1"),
    ] {
        let bad = d.join("bad");
        let mut a = args(&bad, suite);
        if let Some(l) = extra {
            let i = a.iter().position(|x| x == "--eval-suite-limit").unwrap();
            a[i + 1] = l.to_string();
        }
        let e = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            e.contains("--eval-suite") && e.contains(want),
            "{want}: {e}"
        );
        assert!(!bad.join("adapter").exists());
    }
}

#[test]
fn chat_mode_puts_demonstrations_in_earlier_turns() {
    let d = tmpdir("eval_chat");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(fixture("llama_tiny")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        model.join("chat_template.jinja"),
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    .unwrap();
    let mc = write_task(
        &d,
        "mc",
        &format!("{MC}description = \"Answer yes or no.\"\n"),
        &mc_items(5),
    );
    let out = d.join("out");
    ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        &mc,
        "--shots",
        "2",
        "--chat",
        "--out",
        out.to_str().unwrap(),
    ]);
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("samples.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let p = first["prompt"].as_str().unwrap();
    assert!(p.starts_with("<|system|>Answer yes or no.\n"), "{p}");
    assert_eq!(p.matches("<|user|>").count(), 3, "{p}");
    assert_eq!(p.matches("<|assistant|>").count(), 3, "{p}");
    assert!(p.ends_with("Answer:\n<|assistant|>"), "{p}");
    assert_eq!(
        p.matches("Question 0:").count(),
        1,
        "item 0 shown as its own demonstration: {p}"
    );
    // A model without a chat template is an error naming the flag.
    let e = fails(&[
        "eval",
        "--model",
        fixture("llama_tiny").to_str().unwrap(),
        "--tasks",
        &mc,
        "--chat",
    ]);
    assert!(e.contains("--chat"), "{e}");
}

#[test]
fn sampled_generation_is_seeded() {
    let d = tmpdir("eval_sampled");
    let items: Vec<Value> = (0..6)
        .map(|i| serde_json::json!({"prompt": format!("Tell {i}:"), "refs": ["x"]}))
        .collect();
    let body = "kind = \"generate\"\ndata = \"DATA\"\ndoc_to_text = \"{{ prompt }}\"\ndoc_to_target = \"refs\"\nuntil = []\nmax_gen_toks = 8\ntemperature = 1.0\ntop_p = 0.95\n";
    let task = write_task(&d, "gen", body, &items);
    let model = fixture("llama_tiny");
    let texts = |seed: &str, out: &str| -> Vec<String> {
        let o = d.join(out);
        ok(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--tasks",
            &task,
            "--seed",
            seed,
            "--gen-batch",
            "4",
            "--out",
            o.to_str().unwrap(),
        ]);
        std::fs::read_to_string(o.join("samples.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["generation"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let a = texts("7", "a");
    assert_eq!(a, texts("7", "b"), "same seed, same samples");
    assert_ne!(a, texts("8", "c"), "another seed, other samples");
    let bad = write_task(
        &d,
        "bad",
        &body.replace("temperature = 1.0", "temperature = -1.0"),
        &items,
    );
    let e = fails(&["eval", "--model", model.to_str().unwrap(), "--tasks", &bad]);
    assert!(e.contains("bad.toml") && e.contains("temperature"), "{e}");
}
