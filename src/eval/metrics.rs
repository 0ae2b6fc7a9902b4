//! Task metrics as pure functions.
//!
//! - classification: accuracy, macro-F1 (unweighted mean of per-class F1 over the classes that
//!   occur in the gold labels or the predictions, as scikit-learn's `f1_score(average="macro")`);
//! - token classification: entity-level precision/recall/F1 with seqeval's default (conlleval)
//!   chunking: an entity starts at B-X, or at I-X after a different type or O;
//! - extractive QA: SQuAD v1.1's exact match and token F1 after its answer normalisation
//!   (lower-case, drop punctuation and the articles a/an/the, collapse whitespace), best over
//!   the gold answers.

use std::collections::{BTreeSet, HashMap};

pub fn accuracy(gold: &[usize], pred: &[usize]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    gold.iter().zip(pred).filter(|(g, p)| g == p).count() as f64 / gold.len() as f64
}

pub fn macro_f1(gold: &[usize], pred: &[usize]) -> f64 {
    let classes: BTreeSet<usize> = gold.iter().chain(pred).copied().collect();
    if classes.is_empty() {
        return 0.0;
    }
    let f1s: f64 = classes
        .iter()
        .map(|&c| {
            let tp = gold
                .iter()
                .zip(pred)
                .filter(|(g, p)| **g == c && **p == c)
                .count() as f64;
            let fp = gold
                .iter()
                .zip(pred)
                .filter(|(g, p)| **g != c && **p == c)
                .count() as f64;
            let fn_ = gold
                .iter()
                .zip(pred)
                .filter(|(g, p)| **g == c && **p != c)
                .count() as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fn_)
            }
        })
        .sum();
    f1s / classes.len() as f64
}

/// Entities of a BIO tag sequence as (type, start, end-exclusive).
pub fn entities(tags: &[&str]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, usize)> = None;
    for (i, t) in tags.iter().enumerate() {
        let (prefix, ty) = match t.split_once('-') {
            Some((p, ty)) => (p, ty),
            None => ("O", ""),
        };
        let continues = prefix == "I" && cur.as_ref().is_some_and(|(c, _)| c == ty);
        if !continues {
            if let Some((c, s)) = cur.take() {
                out.push((c, s, i));
            }
            if prefix == "B" || prefix == "I" {
                cur = Some((ty.to_string(), i));
            }
        }
    }
    if let Some((c, s)) = cur {
        out.push((c, s, tags.len()));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Micro-averaged entity precision/recall/F1 over sentences (seqeval's default report line).
pub fn entity_prf(gold: &[Vec<&str>], pred: &[Vec<&str>]) -> Prf {
    let (mut tp, mut np, mut ng) = (0usize, 0usize, 0usize);
    for (g, p) in gold.iter().zip(pred) {
        let ge: BTreeSet<_> = entities(g).into_iter().collect();
        let pe: BTreeSet<_> = entities(p).into_iter().collect();
        tp += ge.intersection(&pe).count();
        np += pe.len();
        ng += ge.len();
    }
    let precision = if np == 0 { 0.0 } else { tp as f64 / np as f64 };
    let recall = if ng == 0 { 0.0 } else { tp as f64 / ng as f64 };
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    Prf {
        precision,
        recall,
        f1,
    }
}

/// SQuAD's `normalize_answer`: lower-case, drop ASCII punctuation, replace the articles (as
/// whole words, Unicode word boundaries as Python's `\b`) by spaces, collapse whitespace.
pub fn normalize_answer(s: &str) -> String {
    static ARTICLES: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\b(a|an|the)\b").expect("a fixed pattern compiles")
    });
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    crate::eval::bleu::py_split(&ARTICLES.replace_all(&no_punct, " "))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn exact_match(pred: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(pred);
    if golds.iter().any(|g| normalize_answer(g) == p) {
        1.0
    } else {
        0.0
    }
}

/// Token-overlap F1 of the normalised answers, best over the golds.
pub fn squad_f1(pred: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(pred);
    let pt: Vec<&str> = p.split_whitespace().collect();
    golds
        .iter()
        .map(|g| {
            let g = normalize_answer(g);
            let gt: Vec<&str> = g.split_whitespace().collect();
            let mut counts: HashMap<&str, isize> = HashMap::new();
            for t in &gt {
                *counts.entry(t).or_default() += 1;
            }
            let mut same = 0;
            for t in &pt {
                if let Some(c) = counts.get_mut(t) {
                    if *c > 0 {
                        *c -= 1;
                        same += 1;
                    }
                }
            }
            // v1.1's script: no shared token, F1 0 — also when both normalise to nothing.
            if same == 0 {
                return 0.0;
            }
            let (pr, rc) = (same as f64 / pt.len() as f64, same as f64 / gt.len() as f64);
            2.0 * pr * rc / (pr + rc)
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_metrics_by_hand() {
        // gold 0 0 1 1 2, pred 0 1 1 1 0: class 0 tp1 fp1 fn1 → F1 1/2; class 1 tp2 fp1 fn0 →
        // 4/5; class 2 tp0 → 0. Macro = (0.5 + 0.8 + 0) / 3 = 0.4333…; accuracy 3/5.
        let (g, p) = ([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]);
        assert!((accuracy(&g, &p) - 0.6).abs() < 1e-12);
        assert!((macro_f1(&g, &p) - 1.3 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn entity_metrics_follow_seqeval() {
        let gold = vec![vec!["B-PER", "I-PER", "O", "B-LOC"], vec!["B-ORG", "O"]];
        // I-LOC after O starts an entity (conlleval); a type change inside splits the chunk.
        let pred = vec![vec!["B-PER", "I-PER", "O", "I-LOC"], vec!["B-ORG", "I-PER"]];
        assert_eq!(
            entities(&pred[1]),
            vec![("ORG".into(), 0, 1), ("PER".into(), 1, 2)]
        );
        let m = entity_prf(&gold, &pred);
        // gold 3 entities, pred 4, correct 3 (PER 0-2, LOC 3-4, ORG 0-1).
        assert!((m.precision - 0.75).abs() < 1e-12 && (m.recall - 1.0).abs() < 1e-12);
        assert!((m.f1 - 2.0 * 0.75 / 1.75).abs() < 1e-12);
    }

    #[test]
    fn squad_metrics_by_hand() {
        let golds = vec!["The Denver Broncos".to_string(), "Broncos".to_string()];
        assert_eq!(
            normalize_answer("  The  Denver, Broncos! "),
            "denver broncos"
        );
        assert_eq!(exact_match("denver broncos", &golds), 1.0);
        assert_eq!(exact_match("the broncos team", &golds), 0.0);
        // "broncos team" vs "broncos": P 1/2, R 1 → F1 2/3; vs "denver broncos": 1/2, 1/2 → 1/2.
        assert!((squad_f1("the broncos team", &golds) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(squad_f1("carolina", &golds), 0.0);
    }
}
