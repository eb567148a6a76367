//! A choice's text as it grows: incremental detokenisation and stop strings.

use moe_model::Tokenizer;

/// Text of one choice as it grows: incremental detokenisation and stop strings.
pub(super) struct TextState {
    pub(super) ids: Vec<u32>,
    /// The text of `ids[..read]`.
    pub(super) text: String,
    /// `ids[prefix..read]` is already in `text` and is decoded again as context for the tokens after it, so that each
    /// token costs a decode of a few tokens, not of the whole output.
    pub(super) prefix: usize,
    pub(super) read: usize,
    /// Bytes of `text` already handed out.
    pub(super) sent: usize,
    pub(super) stop: Vec<String>,
    pub(super) skip_special: bool,
}

impl TextState {
    pub(super) fn new(stop: Vec<String>, skip_special: bool) -> Self {
        TextState { ids: Vec::new(), text: String::new(), prefix: 0, read: 0, sent: 0, stop, skip_special }
    }

    /// Decodes the tokens after `read` into `text`; unless `last`, waits while they end inside a UTF-8 sequence.
    pub(super) fn advance(&mut self, tok: &Tokenizer, last: bool) {
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special).unwrap_or_default();
        let after = tok.decode(&self.ids[self.prefix..], self.skip_special).unwrap_or_default();
        if after.ends_with('\u{FFFD}') && !last {
            return;
        }
        match after.strip_prefix(before.as_str()) {
            Some(delta) => self.text.push_str(delta),
            // The context decoded differently once more tokens followed: decode everything once.
            None => self.text = tok.decode(&self.ids, self.skip_special).unwrap_or_default(),
        }
        self.prefix = self.read;
        self.read = self.ids.len();
    }

    /// Adds a token and returns the text that can be handed out now, and whether a stop string ended the choice
    /// (the stop string itself is not part of the text).
    pub(super) fn push(&mut self, tok: &Tokenizer, id: u32) -> (String, bool) {
        self.ids.push(id);
        self.advance(tok, false);
        let text = &self.text;
        // A stop string can only end in text not yet handed out.
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = self.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min() {
            let out = text.get(self.sent..at.max(self.sent)).unwrap_or_default().to_owned();
            self.sent = at.max(self.sent);
            return (out, true);
        }
        // Hold back a tail that may begin a stop string.
        let mut end = text.len();
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                    end = end.min(text.len() - k);
                    break;
                }
            }
        }
        if end <= self.sent {
            return (String::new(), false);
        }
        let out = text[self.sent..end].to_owned();
        self.sent = end;
        (out, false)
    }

    /// The rest of the text when the choice ends without a stop string.
    pub(super) fn flush(&mut self, tok: &Tokenizer) -> String {
        self.advance(tok, true);
        let out = self.text.get(self.sent..).unwrap_or_default().to_owned();
        self.sent = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen35/tokenizer.json");
        Tokenizer::from_file(&path).expect("the fixture's tokenizer")
    }

    fn ids(n: usize, seed: u32) -> Vec<u32> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x % 300
            })
            .collect()
    }

    #[test]
    fn incremental_text_equals_one_decode() {
        let tok = tokenizer();
        for seed in 1..40 {
            let ids = ids(60, seed);
            for skip in [true, false] {
                let mut t = TextState::new(Vec::new(), skip);
                let mut out = String::new();
                for &id in &ids {
                    let (piece, stopped) = t.push(&tok, id);
                    assert!(!stopped);
                    assert!(
                        !piece.contains('\u{FFFD}') || tok.decode(&ids, skip).expect("decodes").contains('\u{FFFD}')
                    );
                    out.push_str(&piece);
                }
                out.push_str(&t.flush(&tok));
                assert_eq!(out, tok.decode(&ids, skip).expect("decodes"), "seed {seed}");
            }
        }
    }

    #[test]
    fn stop_strings_cut_the_text_before_them() {
        let tok = tokenizer();
        let ids = ids(80, 7);
        let full = tok.decode(&ids, true).expect("decodes");
        let cut = full.char_indices().nth(20).map(|(i, _)| i).expect("long enough");
        let stop: String = full[cut..].chars().take(3).collect();
        let first = full.find(&stop).expect("present");
        let mut t = TextState::new(vec!["never-there".into(), stop.clone()], true);
        let mut out = String::new();
        for &id in &ids {
            let (piece, stopped) = t.push(&tok, id);
            out.push_str(&piece);
            if stopped {
                assert_eq!(out, full[..first]);
                return;
            }
        }
        panic!("the stop string {stop:?} was not seen in {full:?}");
    }
}
