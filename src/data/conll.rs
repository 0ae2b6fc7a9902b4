//! CoNLL-style token classification files (one word per line, the BIO tag in the last column,
//! blank lines between sentences, `-DOCSTART-` lines skipped) and the alignment of words to the
//! tokens that carry their labels.

use crate::tokenizer::Tok;
use anyhow::{bail, Result};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Sentence {
    pub words: Vec<String>,
    pub tags: Vec<String>,
    /// `file:line` of the first word.
    pub at: String,
}

pub fn read_conll(path: &Path) -> Result<Vec<Sentence>> {
    let mut out = Vec::new();
    let mut cur: Option<Sentence> = None;
    let mut ncols = None;
    for item in crate::input::lines(path)? {
        let (i, line) = item?;
        let at = format!("{}:{i}", path.display());
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.is_empty() || cols[0] == "-DOCSTART-" {
            out.extend(cur.take());
            continue;
        }
        let n = *ncols.get_or_insert(cols.len());
        if n < 2 {
            bail!("{at}: expected a word and a tag per line, found 1 column");
        }
        if cols.len() != n {
            bail!("{at}: {} columns, the file's lines have {n}", cols.len());
        }
        let tag = cols[n - 1];
        if !(tag == "O" || tag.starts_with("B-") || tag.starts_with("I-")) {
            bail!("{at}: tag {tag:?} is not BIO (O, B-TYPE or I-TYPE)");
        }
        let s = cur.get_or_insert_with(|| Sentence {
            words: Vec::new(),
            tags: Vec::new(),
            at,
        });
        s.words.push(cols[0].to_string());
        s.tags.push(tag.to_string());
    }
    out.extend(cur);
    if out.is_empty() {
        bail!("{}: no sentences", path.display());
    }
    Ok(out)
}

/// Token ids and, per word, the index of the token that carries its label (None when
/// truncated away).
pub struct Aligned {
    pub ids: Vec<u32>,
    pub first: Vec<Option<usize>>,
}

/// `last`: label a word's last sub-token instead of its first. A causal decoder at a word's first
/// token has not seen the word (byte-level BPE often starts it with a bare space token), so
/// decoders use the last one; encoders see both directions and use the first, as transformers.
pub fn align(tok: &Tok, words: &[String], max_len: usize, last: bool) -> Result<Aligned> {
    let mut text = String::new();
    let mut starts = Vec::with_capacity(words.len());
    for w in words {
        if !text.is_empty() {
            text.push(' ');
        }
        starts.push(text.len());
        text.push_str(w);
    }
    let (ids, offs) = tok.encode_with_offsets(&text, true)?;
    let mut first = vec![None; words.len()];
    for (t, o) in offs.iter().enumerate().take(max_len) {
        let Some((s, _)) = *o else { continue };
        // The word whose span holds this token's first byte (a trimmed-space token points at
        // the start of the word after it).
        let w = match starts.binary_search(&s) {
            Ok(w) => w,
            Err(0) => continue,
            Err(w) => w - 1,
        };
        if (last || first[w].is_none()) && s < starts[w] + words[w].len().max(1) {
            first[w] = Some(t);
        }
    }
    let mut ids = ids;
    ids.truncate(max_len);
    Ok(Aligned { ids, first })
}
