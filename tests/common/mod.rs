#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .expect("reference fixture")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A fresh temporary directory under target/ (removed first if present).
pub fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small slice of the bundled corpus for quick training tests.
pub fn small_corpus(dir: &Path, bytes: usize) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare/hamlet.txt");
    let text = std::fs::read_to_string(src).unwrap();
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .take_while(|&i| i <= bytes)
        .last()
        .unwrap();
    let p = dir.join("corpus.txt");
    std::fs::write(&p, &text[..cut]).unwrap();
    p
}

/// A separable sentiment task (train 160, test 40 lines of JSONL {text, label}).
pub fn classify_data(dir: &Path) -> (String, String) {
    let (pos, neg) = (
        ["good", "great", "lovely", "fine"],
        ["bad", "vile", "foul", "cruel"],
    );
    let filler = ["the", "lord", "king", "is", "a", "day"];
    let mut r = lmforge::rng::Rng::new(3);
    let mut mk = |n: usize| {
        (0..n)
            .map(|_| {
                let p = r.below(2) == 0;
                let mut w: Vec<&str> = (0..3)
                    .map(|_| {
                        if p {
                            pos[r.below(4) as usize]
                        } else {
                            neg[r.below(4) as usize]
                        }
                    })
                    .collect();
                w.extend((0..3).map(|_| filler[r.below(6) as usize]));
                serde_json::json!({"text": w.join(" "), "label": if p { "pos" } else { "neg" }})
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (tr, te) = (dir.join("train.jsonl"), dir.join("test.jsonl"));
    std::fs::write(&tr, mk(160)).unwrap();
    std::fs::write(&te, mk(40)).unwrap();
    (tr.display().to_string(), te.display().to_string())
}

/// SQuAD v1.1 JSON of `n` "where was X born?" questions (non-ASCII contexts).
pub fn squad(dir: &Path, name: &str, n: usize, seed: u64) -> String {
    let names = ["hamlet", "horatio", "ophelia", "laertes"];
    let places = ["denmark", "norway", "france", "elsinore"];
    let filler = [
        "the", "king", "is", "dead", "and", "lord", "speaks", "at", "night",
    ];
    let mut r = lmforge::rng::Rng::new(seed);
    let mut words = |k: u64| {
        (0..k)
            .map(|_| filler[r.below(9) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut paras = Vec::new();
    let mut r2 = lmforge::rng::Rng::new(seed + 1);
    for i in 0..n {
        let (who, place) = (names[r2.below(4) as usize], places[r2.below(4) as usize]);
        // A non-ASCII prefix makes character and byte offsets differ.
        let ctx = format!(
            "é {}. {who} was born in {place}. {}.",
            words(3 + (i as u64 % 20)),
            words(5)
        );
        let start = ctx.chars().count()
            - ctx[ctx.find(" was born in ").unwrap() + 13..]
                .chars()
                .count();
        paras.push(serde_json::json!({"context": ctx, "qas": [{"id": format!("q{i}"), "question": format!("where was {who} born?"),
            "answers": [{"text": place, "answer_start": start}]}]}));
    }
    let p = dir.join(name);
    std::fs::write(
        &p,
        serde_json::json!({"data": [{"title": "t", "paragraphs": paras}]}).to_string(),
    )
    .unwrap();
    p.display().to_string()
}

/// CoNLL BIO sentences with PER and LOC entities.
pub fn conll(dir: &Path, name: &str, n: usize, seed: u64) -> String {
    let (people, places) = (
        ["Hamlet", "Horatio", "Ophelia", "Laertes"],
        ["Denmark", "Elsinore", "Norway"],
    );
    let fill = ["the", "lord", "went", "to", "saw", "and", "spoke", "with"];
    let mut r = lmforge::rng::Rng::new(seed);
    let mut s = String::from("-DOCSTART- -X- O\n\n");
    for _ in 0..n {
        for _ in 0..3 + r.below(4) {
            let x = r.below(100);
            if x < 25 {
                s += &format!("{} NNP B-PER\n", people[r.below(4) as usize]);
                if r.below(3) == 0 {
                    s += "Prince NNP I-PER\n";
                }
            } else if x < 45 {
                s += &format!("{} NNP B-LOC\n", places[r.below(3) as usize]);
            } else {
                s += &format!("{} XX O\n", fill[r.below(8) as usize]);
            }
        }
        s += "\n";
    }
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p.display().to_string()
}

/// Writes JSON values as JSONL.
pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// `--set` flags of the smallest pre-training model (1 layer, 32 wide, 32-token context, a
/// 300-token tokenizer).
pub const TINY_GPT: [&str; 12] = [
    "--set",
    "model.d_model=32",
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_head=2",
    "--set",
    "model.ctx=32",
    "--set",
    "data.seq_len=32",
    "--set",
    "tokenizer.vocab_size=300",
];

/// n prompt/completion rows ("Qi: who?" → " Hamlet i") as `sft.jsonl` in `d`.
pub fn tiny_sft(d: &Path, n: usize) -> PathBuf {
    let p = d.join("sft.jsonl");
    let rows: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}: who?"), "completion": format!(" Hamlet {i}")}))
        .collect();
    write_jsonl(&p, &rows);
    p
}

/// `lmforge sft` of the tiny Llama on `data` into `out`, quiet, with `extra` flags.
pub fn tiny_sft_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let llama = fixture("llama_tiny");
    let mut a: Vec<String> = ["sft", "--model", llama.to_str().unwrap(), "--quiet"]
        .map(String::from)
        .to_vec();
    a.extend(
        [
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// n preference pairs with an obvious preference ("yes" over "no"), as `pairs.jsonl` in `d`.
pub fn tiny_pairs(d: &Path, n: usize) -> PathBuf {
    let p = d.join("pairs.jsonl");
    let rows: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}: answer yes or no."), "chosen": " yes, gladly", "rejected": " no way"}))
        .collect();
    write_jsonl(&p, &rows);
    p
}

/// Runs the lmforge binary.
pub fn lmforge(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs lmforge, asserts it succeeded; its stderr.
pub fn ok(args: &[&str]) -> String {
    let o = lmforge(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "lmforge {args:?} failed:\n{err}");
    err
}

/// Runs lmforge, asserts it failed; its stderr.
pub fn fails(args: &[&str]) -> String {
    let o = lmforge(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "lmforge {args:?} should fail");
    err
}

/// Every line of a run's metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Next-token cross-entropy of logits (B, T, V) on ids (B, T): the loss the reference
/// fixtures' gradients are of.
pub fn lm_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let v = logits.dim(2).unwrap();
    let pred = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let tgt = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    lmforge::losses::cross_entropy(&pred, &tgt).unwrap()
}

/// Every parameter `compared` selects has the reference's gradient (`grad.<name>`, relative
/// 2e-4) and every reference gradient was compared; the others got none (frozen).
pub fn check_grads(
    store: &lmforge::model::ParamStore,
    grads: &lmforge::model::params::Grads,
    r: &HashMap<String, Tensor>,
    label: &str,
    compared: impl Fn(&lmforge::model::params::Param) -> bool,
) {
    let mut n = 0;
    for (p, g) in store.params().iter().zip(&grads.0) {
        if !compared(p) {
            assert!(g.is_none(), "{label}: frozen {} got a gradient", p.name);
            continue;
        }
        let want = &r[&format!("grad.{}", p.name)];
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{label}: {} got no gradient", p.name));
        let d = max_abs_diff(g, want);
        assert!(
            d <= 2e-4 * max_abs(want).max(1e-3) + 1e-7,
            "{label}: gradient of {} differs by {d}",
            p.name
        );
        n += 1;
    }
    assert_eq!(
        n,
        r.keys().filter(|k| k.starts_with("grad.")).count(),
        "{label}"
    );
}
