//! Streaming text out of tokens: what part of an answer may be sent now. New tokens are decoded
//! incrementally (`Incremental`: a window of a few tokens, so a long answer costs the same per
//! token as a short one; a byte-level BPE token can end inside a UTF-8 character, shown as U+FFFD
//! until the next one completes it), and text that could still become a stop string is held
//! back (`Detok`), so a client never sees a stop string or half of one.

/// An answer's text as it streams: new tokens decoded (`Incremental`), then held back while
/// they could still become a stop string (`Detok`).
pub struct Answer {
    text: String,
    inc: Incremental,
    detok: Detok,
}

impl Answer {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            text: String::new(),
            inc: Incremental::default(),
            detok: Detok::new(stop),
        }
    }

    /// Given every token of the answer so far, the text to send now and whether a stop string
    /// ended the answer; `last`: no more tokens follow.
    pub fn push(
        &mut self,
        tokens: &[u32],
        last: bool,
        decode: impl Fn(&[u32]) -> String,
    ) -> (String, bool) {
        let new = self.inc.next(tokens, last, decode);
        self.text.push_str(&new);
        self.detok.advance(&self.text, last)
    }
}

/// Incremental detokenization as vLLM and transformers' `TextStreamer` do it: the new tokens are
/// decoded together with the few before them (`prefix..read`), which gives decoders that treat a
/// sequence's first token specially (SentencePiece's leading space) their context, and the text
/// they add is released once it does not end in an unfinished character.
#[derive(Default)]
pub struct Incremental {
    prefix: usize,
    read: usize,
}

impl Incremental {
    /// The text `tokens` (the whole answer so far) add to what was released before; `last`:
    /// release an unfinished character too (as decoding the whole answer would show it).
    pub fn next(
        &mut self,
        tokens: &[u32],
        last: bool,
        decode: impl Fn(&[u32]) -> String,
    ) -> String {
        let before = decode(&tokens[self.prefix..self.read]);
        let now = decode(&tokens[self.prefix..]);
        if now.len() <= before.len() || (!last && now.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let mut cut = before.len();
        while !now.is_char_boundary(cut) {
            cut -= 1;
        }
        self.prefix = self.read;
        self.read = tokens.len();
        now[cut..].to_string()
    }
}

pub struct Detok {
    stop: Vec<String>,
    /// Bytes of the answer already sent.
    sent: usize,
    done: bool,
}

impl Detok {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            sent: 0,
            done: false,
        }
    }

    /// Given the whole answer so far, the text to send now and whether a stop string ended it.
    /// `last`: no more tokens follow (send what was held back).
    pub fn advance(&mut self, text: &str, last: bool) -> (String, bool) {
        if self.done {
            return (String::new(), true);
        }
        // A stop string may start in text already sent only if it was held back: search from
        // the earliest byte a stop string could start at.
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let from = floor_char(text, self.sent.saturating_sub(longest));
        let hit = self
            .stop
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(end) = hit {
            self.done = true;
            let end = end.max(self.sent);
            let out = text.get(self.sent..end).unwrap_or("").to_string();
            self.sent = end;
            return (out, true);
        }
        let mut end = text.len();
        if !last {
            // Hold back an unfinished character…
            if text.ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
            // …and the longest tail that starts a stop string.
            let tail = self
                .stop
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(move |&k| s.is_char_boundary(k))
                        .map(move |k| &s[..k])
                })
                .filter(|p| text[..end].ends_with(p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            end -= tail;
        }
        if end <= self.sent {
            return (String::new(), false);
        }
        let out = text.get(self.sent..end).unwrap_or("").to_string();
        self.sent = end;
        (out, false)
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], steps: &[&str]) -> (String, bool) {
        let mut d = Detok::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for (i, t) in steps.iter().enumerate() {
            let (s, stopped) = d.advance(t, i + 1 == steps.len());
            out.push_str(&s);
            if stopped {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn incremental_decoding_waits_for_whole_characters() {
        // Tokens are bytes: "é" (C3 A9) and "€" (E2 82 AC) arrive split.
        let decode = |t: &[u32]| {
            String::from_utf8_lossy(&t.iter().map(|&b| b as u8).collect::<Vec<_>>()).into_owned()
        };
        let bytes: Vec<u32> = "aé€b".bytes().map(u32::from).collect();
        let mut inc = Incremental::default();
        let out: Vec<String> = (1..=bytes.len())
            .map(|n| inc.next(&bytes[..n], false, decode))
            .collect();
        assert_eq!(out, ["a", "", "é", "", "", "€", "b"]);
        // An unfinished character at the end is released as U+FFFD.
        let mut inc = Incremental::default();
        assert_eq!(inc.next(&[0x61, 0xE2], false, decode), "");
        assert_eq!(inc.next(&[0x61, 0xE2], true, decode), "a\u{FFFD}");
    }

    #[test]
    fn stop_strings_are_never_sent() {
        // "END" arrives over three tokens: "E" and "EN" are held back, then cut.
        assert_eq!(
            run(&["END"], &["Hi", "Hi E", "Hi EN", "Hi END", "Hi END more"]),
            ("Hi ".into(), true)
        );
        // A held-back prefix that does not become the stop string is sent later.
        assert_eq!(
            run(&["END"], &["Hi E", "Hi Ex", "Hi Ext"]),
            ("Hi Ext".into(), false)
        );
        // Held text is released at the last token.
        assert_eq!(run(&["END"], &["a", "a EN"]), ("a EN".into(), false));
        // The earliest of several stop strings.
        assert_eq!(
            run(&["\n\n", "B"], &["x", "xA", "xAB\n\n"]),
            ("xA".into(), true)
        );
        // Unfinished characters wait for the next token.
        let mut d = Detok::new(vec![]);
        assert_eq!(d.advance("é\u{FFFD}", false), ("é".into(), false));
        assert_eq!(d.advance("é€", false), ("€".into(), false));
        // No stop strings: everything goes out at once.
        assert_eq!(run(&[], &["a", "ab", "abc"]), ("abc".into(), false));
    }
}
