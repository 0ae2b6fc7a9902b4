//! ROUGE-L as Google's `rouge-score` package computes it (Lin 2004): the longest common
//! subsequence of the reference's and the prediction's tokens, P = LCS/|pred|, R = LCS/|ref|,
//! F = 2PR/(P+R). Tokens: lower-cased text, every run of characters outside [a-z0-9] a space,
//! optionally Porter-stemmed (NLTK's stemmer, words longer than 3 characters), as
//! `RougeScorer(["rougeL"], use_stemmer=…)`. Several references: the best F, as lm-eval takes
//! the max over its references. Deviation: none.

use super::porter;

/// rouge-score's `tokenize.tokenize`.
pub fn tokens(text: &str, stem: bool) -> Vec<String> {
    let lower = text.to_lowercase();
    let spaced: String = lower
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    spaced
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if stem && t.chars().count() > 3 {
                porter::stem(t)
            } else {
                t.to_string()
            }
        })
        // The package drops what its stemmer could turn into a non-[a-z0-9] token.
        .filter(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        .collect()
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rouge {
    pub precision: f64,
    pub recall: f64,
    pub f: f64,
}

/// ROUGE-L of `prediction` against one `target`.
pub fn rouge_l(target: &str, prediction: &str, stem: bool) -> Rouge {
    let (t, p) = (tokens(target, stem), tokens(prediction, stem));
    if t.is_empty() || p.is_empty() {
        return Rouge {
            precision: 0.0,
            recall: 0.0,
            f: 0.0,
        };
    }
    let l = lcs(&t, &p) as f64;
    let (precision, recall) = (l / p.len() as f64, l / t.len() as f64);
    let f = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Rouge {
        precision,
        recall,
        f,
    }
}

/// The best ROUGE-L F over several references.
pub fn rouge_l_best(targets: &[String], prediction: &str, stem: bool) -> f64 {
    targets
        .iter()
        .map(|t| rouge_l(t, prediction, stem).f)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcs_by_hand() {
        // ref "police killed the gunman", pred "police kill the gunman": LCS 3 of 4 each.
        let r = rouge_l("police killed the gunman", "police kill the gunman", false);
        assert!((r.f - 0.75).abs() < 1e-12);
        assert_eq!(rouge_l("", "x", false).f, 0.0);
    }
}
