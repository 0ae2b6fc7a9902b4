//! The task kinds and the metrics each one reports (names as lm-evaluation-harness's).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Pick the choice with the highest log-likelihood after the context.
    MultipleChoice,
    /// Generate after the context, score the text against references.
    Generate,
    /// Log-likelihood of whole documents in the model's context windows.
    Rolling,
    /// A trained sequence-classification head (a `finetune` output) labels each text.
    Classify,
    /// Counterfactual sentence pairs: does the model prefer the stereotyped one?
    Bias,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Acc,
    AccNorm,
    AccBytes,
    /// Exact string match after trimming (and the task's `ignore_case` / `ignore_punctuation`).
    ExactMatch,
    /// SQuAD v1.1's normalised exact match / token F1.
    SquadEm,
    SquadF1,
    Bleu,
    Chrf,
    RougeL,
    WordPerplexity,
    BytePerplexity,
    BitsPerByte,
    MacroF1,
    PctStereotype,
    MeanAbsDelta,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::AccBytes => "acc_bytes",
            Metric::ExactMatch => "exact_match",
            Metric::SquadEm => "squad_em",
            Metric::SquadF1 => "squad_f1",
            Metric::Bleu => "bleu",
            Metric::Chrf => "chrf",
            Metric::RougeL => "rouge_l",
            Metric::WordPerplexity => "word_perplexity",
            Metric::BytePerplexity => "byte_perplexity",
            Metric::BitsPerByte => "bits_per_byte",
            Metric::MacroF1 => "macro_f1",
            Metric::PctStereotype => "pct_stereotype",
            Metric::MeanAbsDelta => "mean_abs_delta",
        }
    }

    /// Whether this metric suits a task of `kind`.
    pub(super) fn fits(self, kind: Kind) -> bool {
        use Metric::*;
        match kind {
            Kind::MultipleChoice => matches!(self, Acc | AccNorm | AccBytes | ExactMatch),
            Kind::Generate => matches!(self, ExactMatch | SquadEm | SquadF1 | Bleu | Chrf | RougeL),
            Kind::Rolling => matches!(self, WordPerplexity | BytePerplexity | BitsPerByte),
            Kind::Classify => matches!(self, Acc | MacroF1),
            Kind::Bias => matches!(self, PctStereotype | MeanAbsDelta),
        }
    }
}

/// What a task reports when its file names no metrics.
pub(super) fn default_metrics(kind: Kind) -> Vec<Metric> {
    match kind {
        Kind::MultipleChoice => vec![Metric::Acc, Metric::AccNorm],
        Kind::Generate => vec![Metric::ExactMatch],
        Kind::Rolling => vec![
            Metric::WordPerplexity,
            Metric::BytePerplexity,
            Metric::BitsPerByte,
        ],
        Kind::Classify => vec![Metric::Acc, Metric::MacroF1],
        Kind::Bias => vec![Metric::PctStereotype, Metric::MeanAbsDelta],
    }
}
