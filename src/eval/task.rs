//! Evaluation tasks are data: a TOML file (templates, choices, target, metrics, stop
//! sequences) over a JSONL file of items, read into one `Task`. The semantics follow
//! EleutherAI's lm-evaluation-harness task YAML so its definitions translate key by key:
//! `doc_to_text`, `doc_to_target`, `doc_to_choice`, `target_delimiter`, `fewshot_delimiter`,
//! `description`, `num_fewshot`, `until`.
//!
//! Templates are Jinja (minijinja with Python's string methods) over the item's JSON fields.
//! `doc_to_target` may instead name a field directly (no `{{`), which keeps its JSON type: an
//! index, a string, or a list of references; `doc_to_choice` is a list or a field holding one.
//! Differences from lm-eval's YAML: `until` and `max_gen_toks` sit at the top level (not under
//! `generation_kwargs`); a rolling task's text is `doc_to_target`, as lm-eval's.
//!
//! Built-in tasks are such files embedded in the binary (`tasks/*.toml`); their data lives
//! under `--data-dir` (written by `scripts/fetch_eval_data.py`).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::kinds::default_metrics;
pub use super::kinds::{Kind, Metric};

/// Built-in task files: (name, TOML source, the items when they ship with lmforge).
pub const BUILTIN: &[(&str, &str, Option<&str>)] = &[
    ("mmlu", include_str!("../../tasks/mmlu.toml"), None),
    ("squad", include_str!("../../tasks/squad.toml"), None),
    (
        "translation_be_ru",
        include_str!("../../tasks/translation_be_ru.toml"),
        None,
    ),
    (
        "shakespeare",
        include_str!("../../tasks/shakespeare.toml"),
        None,
    ),
    (
        "crows_pairs",
        include_str!("../../tasks/crows_pairs.toml"),
        None,
    ),
    ("winobias", include_str!("../../tasks/winobias.toml"), None),
    (
        "stereoset",
        include_str!("../../tasks/stereoset.toml"),
        None,
    ),
    (
        "bias_templates",
        include_str!("../../tasks/bias_templates.toml"),
        Some(include_str!("../../tasks/bias_templates.jsonl")),
    ),
];

/// A literal list, or the name of a field holding one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Choices {
    List(Vec<String>),
    Field(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    name: Option<String>,
    kind: Kind,
    /// The items (JSONL), relative to the task file (built-ins: to `--data-dir`).
    data: PathBuf,
    /// Where demonstrations come from; default: `data` itself (never the evaluated item).
    fewshot_data: Option<PathBuf>,
    /// `random` (seeded, per item) or `first_n` (the same first K for every item).
    #[serde(default)]
    fewshot_sampler: Sampler,
    #[serde(default)]
    description: String,
    doc_to_text: Option<String>,
    doc_to_target: Option<String>,
    doc_to_choice: Option<Choices>,
    #[serde(default = "space")]
    target_delimiter: String,
    #[serde(default = "blank_line")]
    fewshot_delimiter: String,
    #[serde(default)]
    num_fewshot: usize,
    metrics: Option<Vec<Metric>>,
    /// Default: the few-shot delimiter, as lm-eval.
    until: Option<Vec<String>>,
    #[serde(default = "max_gen")]
    max_gen_toks: usize,
    /// Sampling of generative tasks (lm-eval's `do_sample`, `temperature`, `top_k`, `top_p`):
    /// 0 = greedy; seeded by `--seed`.
    #[serde(default)]
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    #[serde(default)]
    ignore_case: bool,
    #[serde(default)]
    ignore_punctuation: bool,
    /// ROUGE-L with the Porter stemmer.
    #[serde(default)]
    rouge_stemmer: bool,
    /// Bias pairs: the fields of the stereotyped and the other sentence and of the category.
    #[serde(default = "more")]
    sent_more: String,
    #[serde(default = "less")]
    sent_less: String,
    #[serde(default = "bias_type")]
    category: String,
    /// Where the data comes from and under which licence (documentation, shown in results).
    source: Option<String>,
    license: Option<String>,
}

fn space() -> String {
    " ".into()
}
fn blank_line() -> String {
    "\n\n".into()
}
fn max_gen() -> usize {
    256
}
fn more() -> String {
    "sent_more".into()
}
fn less() -> String {
    "sent_less".into()
}
fn bias_type() -> String {
    "bias_type".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    #[default]
    Random,
    FirstN,
}

/// A loaded task: its definition and items.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub kind: Kind,
    pub file: String,
    pub data_path: PathBuf,
    pub items: Vec<Value>,
    /// The line of `data_path` each item came from (errors name it).
    pub lines: Vec<usize>,
    /// Demonstrations; None: the items themselves.
    pub fewshot: Option<Vec<Value>>,
    pub sampler: Sampler,
    pub description: String,
    pub doc_to_text: Option<String>,
    pub doc_to_target: Option<String>,
    pub doc_to_choice: Option<Choices>,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    pub num_fewshot: usize,
    pub metrics: Vec<Metric>,
    pub until: Vec<String>,
    pub max_gen_toks: usize,
    /// Generation sampling (temperature 0: greedy).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
    pub rouge_stemmer: bool,
    pub sent_more: String,
    pub sent_less: String,
    pub category: String,
    pub source: Option<String>,
    pub license: Option<String>,
}

/// What the target of an item is.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Index(usize),
    Texts(Vec<String>),
}

impl Task {
    /// `spec`: a built-in name or a path to a TOML file.
    pub fn resolve(spec: &str, data_dir: &Path) -> Result<Self> {
        if let Some((_, src, data)) = BUILTIN.iter().find(|(n, _, _)| *n == spec) {
            return Self::parse(src, &format!("built-in task {spec}"), data_dir, spec, *data);
        }
        let path = Path::new(spec);
        if !path.is_file() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _, _)| *n).collect();
            bail!(
                "{spec}: neither a task file nor a built-in task ({})",
                names.join(", ")
            );
        }
        let src = crate::input::read_text(path, 1 << 20)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let stem = path
            .file_stem()
            .map_or("task".into(), |s| s.to_string_lossy().into_owned());
        Self::parse(&src, &path.display().to_string(), base, &stem, None)
    }

    fn parse(
        src: &str,
        file: &str,
        base: &Path,
        default_name: &str,
        embedded: Option<&str>,
    ) -> Result<Self> {
        let de = toml::Deserializer::parse(src).with_context(|| format!("{file}: invalid TOML"))?;
        let f: TaskFile = serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow::anyhow!("{file}: key `{}`: {}", e.path(), e.inner().message()))?;
        let metrics = f.metrics.clone().unwrap_or_else(|| default_metrics(f.kind));
        if metrics.is_empty() {
            bail!("{file}: key `metrics`: give at least one metric");
        }
        if let Some(m) = metrics.iter().find(|m| !m.fits(f.kind)) {
            bail!(
                "{file}: key `metrics`: {} does not apply to a {:?} task",
                m.name(),
                f.kind
            );
        }
        let needs = |key: &str, v: bool| -> Result<()> {
            if !v {
                bail!("{file}: key `{key}` is required for a {:?} task", f.kind);
            }
            Ok(())
        };
        match f.kind {
            Kind::MultipleChoice => {
                needs("doc_to_text", f.doc_to_text.is_some())?;
                needs("doc_to_target", f.doc_to_target.is_some())?;
                needs("doc_to_choice", f.doc_to_choice.is_some())?;
            }
            Kind::Generate | Kind::Classify => {
                needs("doc_to_text", f.doc_to_text.is_some())?;
                needs("doc_to_target", f.doc_to_target.is_some())?;
            }
            Kind::Rolling => needs("doc_to_target", f.doc_to_target.is_some())?,
            Kind::Bias => {}
        }
        if f.kind == Kind::Generate && f.max_gen_toks == 0 {
            bail!("{file}: key `max_gen_toks` must be at least 1");
        }
        let sampling = crate::generate::Sampling {
            temperature: f.temperature,
            top_k: f.top_k,
            top_p: f.top_p,
            ..Default::default()
        };
        if let Err(e) = sampling.check() {
            bail!("{file}: keys `temperature` / `top_p`: {e}");
        }
        let data_path = base.join(&f.data);
        let (items, lines) = match embedded {
            Some(text) => parse_items(text.lines().map(|l| Ok(l.to_string())), &data_path)?,
            None => read_items(&data_path)?,
        };
        let fewshot = match &f.fewshot_data {
            Some(p) => Some(read_items(&base.join(p))?.0),
            None => None,
        };
        let until = f
            .until
            .clone()
            .unwrap_or_else(|| vec![f.fewshot_delimiter.clone()]);
        let t = Task {
            name: f.name.clone().unwrap_or_else(|| default_name.to_string()),
            kind: f.kind,
            file: file.to_string(),
            data_path,
            items,
            lines,
            fewshot,
            sampler: f.fewshot_sampler,
            description: f.description,
            doc_to_text: f.doc_to_text,
            doc_to_target: f.doc_to_target,
            doc_to_choice: f.doc_to_choice,
            target_delimiter: f.target_delimiter,
            fewshot_delimiter: f.fewshot_delimiter,
            num_fewshot: f.num_fewshot,
            metrics,
            until,
            max_gen_toks: f.max_gen_toks,
            temperature: f.temperature,
            top_k: f.top_k,
            top_p: f.top_p,
            ignore_case: f.ignore_case,
            ignore_punctuation: f.ignore_punctuation,
            rouge_stemmer: f.rouge_stemmer,
            sent_more: f.sent_more,
            sent_less: f.sent_less,
            category: f.category,
            source: f.source,
            license: f.license,
        };
        // Render the first item now: a template error names the task file before any model runs.
        if let Some(first) = t.items.first() {
            t.check_item(first).with_context(|| t.at(0))?;
        }
        Ok(t)
    }

    /// Where item `i` came from: `data.jsonl:LINE`.
    pub fn at(&self, i: usize) -> String {
        format!(
            "{}:{}",
            self.data_path.display(),
            self.lines.get(i).copied().unwrap_or(0)
        )
    }

    fn check_item(&self, item: &Value) -> Result<()> {
        match self.kind {
            Kind::MultipleChoice => {
                self.text(item)?;
                let ch = self.choices(item)?;
                match self.target(item)? {
                    Target::Index(g) if g < ch.len() => {}
                    t => bail!(
                        "{}: target {t:?} is not one of the {} choices",
                        self.file,
                        ch.len()
                    ),
                }
            }
            Kind::Generate | Kind::Classify | Kind::Rolling => {
                if self.kind != Kind::Rolling {
                    self.text(item)?;
                }
                match self.target(item)? {
                    Target::Texts(t) if t.is_empty() => {
                        bail!(
                            "{}: key `doc_to_target`: the item has no reference",
                            self.file
                        )
                    }
                    Target::Index(i) => bail!(
                        "{}: key `doc_to_target`: a {:?} task's target is text, not the index {i}",
                        self.file,
                        self.kind
                    ),
                    Target::Texts(_) => {}
                }
            }
            Kind::Bias => {
                self.field_str(item, &self.sent_more.clone())?;
                self.field_str(item, &self.sent_less.clone())?;
            }
        }
        Ok(())
    }

    fn render(&self, tpl: &str, item: &Value, key: &str) -> Result<String> {
        crate::chat::render_sandboxed(
            tpl,
            minijinja::Value::from_serialize(item),
            &format!("{}: key `{key}`", self.file),
        )
    }

    pub fn field_str(&self, item: &Value, name: &str) -> Result<String> {
        match item.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) if !v.is_null() => Ok(v.to_string()),
            _ => bail!(
                "{}: an item of {} has no field {name:?}",
                self.file,
                self.data_path.display()
            ),
        }
    }

    /// The item's prompt text (`doc_to_text`).
    pub fn text(&self, item: &Value) -> Result<String> {
        let tpl = self.doc_to_text.as_deref().unwrap_or("");
        self.render(tpl, item, "doc_to_text")
    }

    pub fn choices(&self, item: &Value) -> Result<Vec<String>> {
        match &self.doc_to_choice {
            Some(Choices::List(v)) => Ok(v.clone()),
            Some(Choices::Field(f)) => match item.get(f) {
                Some(Value::Array(a)) if !a.is_empty() => a
                    .iter()
                    .map(|x| match x {
                        Value::String(s) => Ok(s.clone()),
                        other => Ok(other.to_string()),
                    })
                    .collect(),
                _ => bail!(
                    "{}: key `doc_to_choice`: item field {f:?} is not a non-empty list",
                    self.file
                ),
            },
            None => bail!("{}: key `doc_to_choice` is missing", self.file),
        }
    }

    /// The item's target: an index into the choices (multiple choice; a string target is
    /// looked up among them) or reference texts.
    pub fn target(&self, item: &Value) -> Result<Target> {
        let spec = self
            .doc_to_target
            .as_deref()
            .with_context(|| format!("{}: key `doc_to_target` is missing", self.file))?;
        let rendered = spec.contains("{{");
        let v = if rendered {
            Value::String(self.render(spec, item, "doc_to_target")?)
        } else {
            item.get(spec).cloned().with_context(|| {
                format!(
                    "{}: key `doc_to_target`: an item has no field {spec:?}",
                    self.file
                )
            })?
        };
        let texts = match v {
            Value::Number(n) => {
                let i = n.as_u64().with_context(|| {
                    format!("{}: key `doc_to_target`: {n} is not an index", self.file)
                })?;
                return Ok(Target::Index(i as usize));
            }
            Value::String(s) => vec![s],
            Value::Array(a) => a
                .into_iter()
                .map(|x| match x {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect(),
            other => bail!(
                "{}: key `doc_to_target`: {other} is neither an index, a text nor a list",
                self.file
            ),
        };
        if self.kind == Kind::MultipleChoice {
            let s = texts.first().cloned().unwrap_or_default();
            let choices = self.choices(item)?;
            // lm-eval: a rendered target of digits is an index, else it names a choice (a
            // field's string always names a choice).
            if rendered && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(i) = s.parse::<usize>() {
                    return Ok(Target::Index(i));
                }
            }
            if let Some(i) = choices.iter().position(|c| *c == s) {
                return Ok(Target::Index(i));
            }
            bail!(
                "{}: key `doc_to_target`: {s:?} is not one of the choices {choices:?}",
                self.file
            );
        }
        Ok(Target::Texts(texts))
    }

    /// The text a demonstration shows as its answer.
    pub fn target_text(&self, item: &Value) -> Result<String> {
        Ok(match self.target(item)? {
            Target::Index(i) => self
                .choices(item)?
                .get(i)
                .cloned()
                .with_context(|| format!("{}: target index {i} out of range", self.file))?,
            Target::Texts(t) => t.into_iter().next().unwrap_or_default(),
        })
    }

    /// Indices of the demonstrations for item `i`: K from the few-shot pool, never the item
    /// itself when the pool is the evaluated data. `random`: a stream keyed by (seed, i), so an
    /// item's demonstrations do not depend on the order or subset evaluated.
    pub fn shots(&self, i: usize, k: usize, seed: u64) -> Result<Vec<usize>> {
        let pool = self.fewshot.as_ref().unwrap_or(&self.items);
        // lm-eval drops demonstrations equal to the evaluated item (by value: a duplicated
        // row cannot show its own answer either).
        let item = self
            .items
            .get(i)
            .with_context(|| format!("{}: no item {i}", self.file))?;
        let candidates: Vec<usize> = (0..pool.len()).filter(|&j| pool[j] != *item).collect();
        if k > candidates.len() {
            bail!(
                "{}: {k} demonstrations asked for, the pool has {} (give fewshot_data or fewer --shots)",
                self.file,
                candidates.len()
            );
        }
        Ok(match self.sampler {
            Sampler::FirstN => candidates.into_iter().take(k).collect(),
            Sampler::Random => {
                let mut all = candidates;
                let mut rng = crate::rng::Rng::keyed(&[seed, 0xFE57, i as u64]);
                // Partial Fisher–Yates: the first k are a uniform sample.
                for a in 0..k {
                    let b = a + (rng.next_u64() % (all.len() - a) as u64) as usize;
                    all.swap(a, b);
                }
                all.truncate(k);
                all
            }
        })
    }

    pub fn shot_item(&self, j: usize) -> &Value {
        match &self.fewshot {
            Some(v) => &v[j],
            None => &self.items[j],
        }
    }

    /// A content hash of the items (results.json records which data was evaluated).
    pub fn data_hash(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for it in &self.items {
            h.update(it.to_string().as_bytes());
            h.update(b"\n");
        }
        crate::fsutil::hex(&h.finalize()[..8])
    }

    /// The task's description for an item (a template, as lm-eval's).
    pub fn description(&self, item: &Value) -> Result<String> {
        if !self.description.contains("{{") && !self.description.contains("{%") {
            return Ok(self.description.clone());
        }
        self.render(&self.description, item, "description")
    }
}

/// The JSON objects of a JSONL file and their line numbers; errors name file:line.
pub fn read_items(path: &Path) -> Result<(Vec<Value>, Vec<usize>)> {
    let lines = crate::input::lines(path).with_context(|| {
        format!(
            "{}: cannot read the task's data (built-in tasks: run scripts/fetch_eval_data.py or pass --data-dir)",
            path.display()
        )
    })?;
    parse_items(lines.map(|l| l.map(|(_, t)| t)), path)
}

fn parse_items(
    lines: impl Iterator<Item = Result<String>>,
    path: &Path,
) -> Result<(Vec<Value>, Vec<usize>)> {
    let mut out = Vec::new();
    let mut at = Vec::new();
    for (i, line) in lines.enumerate() {
        let text = line?;
        let n = i + 1;
        if text.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}:{n}: invalid JSON", path.display()))?;
        if !v.is_object() {
            bail!("{}:{n}: expected a JSON object", path.display());
        }
        out.push(v);
        at.push(n);
    }
    if out.is_empty() {
        bail!("{}: no items", path.display());
    }
    Ok((out, at))
}
