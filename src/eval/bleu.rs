//! BLEU and chrF exactly as sacrebleu 2.x computes them (`corpus_bleu`, `CHRF()`), so numbers
//! printed here can be put next to published ones.
//!
//! - BLEU (Papineni et al. 2002): corpus-level modified n-gram precisions p₁…p₄ from summed
//!   counts, brevity penalty BP = exp(1 − r/c) when c < r (r = per-sentence closest reference
//!   length, ties to the shorter), BLEU = BP · exp(¼ Σ log pₙ). Tokenizer `13a` (mteval-v13a),
//!   smoothing `exp` (NIST: the k-th zero count becomes 1/2ᵏ), no lower-casing, no effective order.
//! - chrF (Popović 2015): character n-grams 1…6 with whitespace removed, per order precision and
//!   recall averaged over the orders that occur, F-β with β = 2; references: the best one per
//!   sentence; corpus statistics summed before the score.
//!
//! Deliberate deviation: none. Python's notion of whitespace (`str.split`) is kept, which counts
//! U+001C…U+001F as spaces where Rust's `char::is_whitespace` does not.

use regex::Regex;
use std::collections::HashMap;
use std::sync::LazyLock;

/// The sacrebleu version whose numbers these are (the signature names it).
pub const SACREBLEU_VERSION: &str = "2.6.0";

/// Python's `str.isspace` for one character.
pub fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()`.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_space).filter(|w| !w.is_empty())
}

static RULES: LazyLock<[(Regex, &'static str); 4]> = LazyLock::new(|| {
    let re = |p: &str| Regex::new(p).expect("a fixed pattern compiles");
    [
        (re(r"([\{-~\[-` -&\(-\+:-@/])"), " $1 "),
        (re(r"([^0-9])([\.,])"), "$1 $2 "),
        (re(r"([\.,])([^0-9])"), " $1 $2"),
        (re(r"([0-9])(-)"), "$1 $2 "),
    ]
});

/// sacrebleu's `13a` tokenizer (mteval-v13a's): the tokens joined by single spaces.
pub fn tokenize_13a(line: &str) -> String {
    let mut s = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut s = format!(" {s} ");
    for (re, rep) in RULES.iter() {
        s = re.replace_all(&s, *rep).into_owned();
    }
    py_split(&s).collect::<Vec<_>>().join(" ")
}

/// What sacrebleu applies to every segment before counting: strip trailing whitespace, tokenize.
fn preprocess(s: &str) -> String {
    tokenize_13a(s.trim_end_matches(py_space))
}

fn word_ngrams(tokens: &[&str], max: usize) -> HashMap<Vec<String>, usize> {
    let mut m = HashMap::new();
    for n in 1..=max {
        for w in tokens.windows(n) {
            *m.entry(w.iter().map(|t| t.to_string()).collect())
                .or_default() += 1;
        }
    }
    m
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    pub score: f64,
    /// Modified n-gram precisions in percent (smoothed where a count was zero).
    pub precisions: [f64; 4],
    pub bp: f64,
    pub sys_len: usize,
    pub ref_len: usize,
}

impl Bleu {
    /// sacrebleu's signature of these settings for these references (`nrefs:var` when the
    /// items have different numbers of them).
    pub fn signature(refs: &[Vec<String>]) -> String {
        let n = refs.first().map_or(1, Vec::len);
        let n = if refs.iter().all(|r| r.len() == n) {
            n.to_string()
        } else {
            "var".to_string()
        };
        format!("nrefs:{n}|case:mixed|eff:no|tok:13a|smooth:exp|version:{SACREBLEU_VERSION}")
    }
}

/// Corpus BLEU of `hyps` against `refs[i]` (one or more references per hypothesis).
pub fn corpus_bleu(hyps: &[String], refs: &[Vec<String>]) -> Bleu {
    const N: usize = 4;
    let (mut correct, mut total) = ([0usize; N], [0usize; N]);
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (h, rs) in hyps.iter().zip(refs) {
        let mut ref_counts: HashMap<Vec<String>, usize> = HashMap::new();
        let mut lens = Vec::new();
        for r in rs {
            let r = preprocess(r);
            let toks: Vec<&str> = py_split(&r).collect();
            lens.push(toks.len());
            for (g, c) in word_ngrams(&toks, N) {
                let e = ref_counts.entry(g).or_default();
                *e = (*e).max(c);
            }
        }
        let h = preprocess(h);
        let toks: Vec<&str> = py_split(&h).collect();
        let hl = toks.len();
        // The closest reference length, ties going to the shorter one.
        let closest = lens
            .iter()
            .copied()
            .min_by_key(|&l| (l.abs_diff(hl), l))
            .unwrap_or(0);
        for (g, c) in word_ngrams(&toks, N) {
            let n = g.len() - 1;
            total[n] += c;
            correct[n] += c.min(ref_counts.get(&g).copied().unwrap_or(0));
        }
        sys_len += hl;
        ref_len += closest;
    }
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0f64; N];
    let mut out = Bleu {
        score: 0.0,
        precisions,
        bp,
        sys_len,
        ref_len,
    };
    if correct.iter().all(|&c| c == 0) {
        return out;
    }
    let mut smooth = 1f64;
    for n in 0..N {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    // sacrebleu's `my_log`: log 0 is a huge negative number, so the score is 0 exactly.
    let logs: f64 = precisions
        .iter()
        .map(|&p| if p == 0.0 { -9_999_999_999.0 } else { p.ln() })
        .sum();
    out.score = bp * (logs / N as f64).exp();
    out.precisions = precisions;
    out
}

/// `corpus_bleu(…).score`, for bootstrapping.
pub fn corpus_bleu_score(hyps: &[String], refs: &[Vec<String>]) -> f64 {
    corpus_bleu(hyps, refs).score
}

const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;

/// [hyp, ref, match] counts per order, for one hypothesis against one reference.
fn chrf_stats(h: &str, r: &str) -> Vec<usize> {
    let grams = |s: &str| -> Vec<HashMap<String, usize>> {
        let chars: Vec<char> = py_split(s).flat_map(str::chars).collect();
        (1..=CHAR_ORDER)
            .map(|n| {
                let mut m = HashMap::new();
                for w in chars.windows(n) {
                    *m.entry(w.iter().collect::<String>()).or_default() += 1;
                }
                m
            })
            .collect()
    };
    let (hg, rg) = (grams(h), grams(r));
    let mut out = Vec::with_capacity(3 * CHAR_ORDER);
    for (hm, rm) in hg.iter().zip(&rg) {
        let (mut hyp, mut matched) = (0, 0);
        for (g, &c) in hm {
            hyp += c;
            matched += c.min(rm.get(g).copied().unwrap_or(0));
        }
        // sacrebleu counts no hypothesis n-grams of an order the reference lacks.
        out.push(if rm.is_empty() { 0 } else { hyp });
        out.push(rm.values().sum());
        out.push(matched);
    }
    out
}

fn chrf_from_stats(s: &[usize]) -> f64 {
    let factor = BETA * BETA;
    let (mut prec, mut rec, mut order) = (0.0, 0.0, 0usize);
    for st in s.chunks(3) {
        let (nh, nr, nm) = (st[0], st[1], st[2]);
        if nh > 0 && nr > 0 {
            prec += nm as f64 / nh as f64;
            rec += nm as f64 / nr as f64;
            order += 1;
        }
    }
    if order == 0 {
        return 0.0;
    }
    let (p, r) = (prec / order as f64, rec / order as f64);
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * p * r / (factor * p + r)
}

/// Corpus chrF (sacrebleu `CHRF()` defaults: chrF2, character order 6, no word n-grams).
pub fn corpus_chrf(hyps: &[String], refs: &[Vec<String>]) -> f64 {
    let mut sum = vec![0usize; 3 * CHAR_ORDER];
    for (h, rs) in hyps.iter().zip(refs) {
        let mut best: Option<(f64, Vec<usize>)> = None;
        for r in rs {
            let st = chrf_stats(h, r);
            let f = chrf_from_stats(&st);
            if best.as_ref().is_none_or(|(bf, _)| f > *bf) {
                best = Some((f, st));
            }
        }
        if let Some((_, st)) = best {
            for (a, b) in sum.iter_mut().zip(st) {
                *a += b;
            }
        }
    }
    chrf_from_stats(&sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_13a_by_hand() {
        assert_eq!(tokenize_13a("Hello, world."), "Hello , world .");
        assert_eq!(tokenize_13a("3.14 and 1,000 - x"), "3.14 and 1,000 - x");
        assert_eq!(tokenize_13a("a-b 5-3 &amp; (x)"), "a-b 5 - 3 & ( x )");
    }

    #[test]
    fn identical_text_scores_100() {
        let h = vec!["the cat sat on the mat".to_string()];
        let r = vec![vec!["the cat sat on the mat".to_string()]];
        assert!((corpus_bleu(&h, &r).score - 100.0).abs() < 1e-9);
        assert!((corpus_chrf(&h, &r) - 100.0).abs() < 1e-9);
    }
}
