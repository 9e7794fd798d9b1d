//! Incremental detokenization of one request's output with stop strings: turns each new
//! token into the text piece it completes, holds back text that may be the start of a
//! stop string, and cuts the text before the first stop string.

use crate::{Error, Result};
use tokenizers::Tokenizer;

/// The output text of one request as it grows.
#[derive(Debug, Clone, Default)]
pub(crate) struct TextStream {
    tokens: Vec<u32>,
    /// Tokens `prefix..read` were decoded last time as context for the next piece.
    prefix: usize,
    read: usize,
    /// Decoded text (cut before a stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true)
        .map_err(|e| Error::Model(format!("detokenize {} tokens: {e}", ids.len())))
}

impl TextStream {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Default::default()
        }
    }

    /// Adds a token; returns the text piece ready to send and whether a stop string was
    /// found (then the text is final and further tokens must not be pushed).
    pub(crate) fn push(&mut self, tok: Option<&Tokenizer>, id: u32) -> Result<(String, bool)> {
        self.tokens.push(id);
        let Some(tok) = tok else {
            return Ok((String::new(), false));
        };
        let before = decode(tok, &self.tokens[self.prefix..self.read])?;
        let after = decode(tok, &self.tokens[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            if let Some(delta) = after.get(before.len()..) {
                self.text.push_str(delta);
                self.prefix = self.read;
                self.read = self.tokens.len();
            }
        }
        Ok(self.take_ready())
    }

    /// Ends the stream: decodes what is left (an incomplete character) and returns the
    /// text not handed out yet.
    pub(crate) fn finish(&mut self, tok: Option<&Tokenizer>) -> Result<String> {
        if let (Some(tok), false) = (tok, self.stopped) {
            if self.read < self.tokens.len() {
                let before = decode(tok, &self.tokens[self.prefix..self.read])?;
                let after = decode(tok, &self.tokens[self.prefix..])?;
                if let Some(delta) = after.get(before.len()..) {
                    self.text.push_str(delta);
                }
                self.read = self.tokens.len();
            }
            self.apply_stops();
        }
        let rest = self.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.text.len();
        Ok(rest)
    }

    /// The text so far (final after `finish`).
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Cuts `text` at the first stop string; returns whether one was found.
    fn apply_stops(&mut self) -> bool {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        if longest == 0 {
            return false;
        }
        // A stop string may straddle the emitted boundary by up to `longest - 1` bytes.
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        if let Some(pos) = hit {
            self.text.truncate(from + pos);
            self.stopped = true;
        }
        self.stopped
    }

    fn take_ready(&mut self) -> (String, bool) {
        let stopped = self.apply_stops();
        let mut end = self.text.len();
        if !stopped {
            // Hold back the longest suffix that is a proper prefix of a stop string.
            let hold = self
                .text
                .char_indices()
                .map(|(i, _)| i)
                .filter(|&i| i >= self.emitted)
                .find(|&i| {
                    let tail = &self.text[i..];
                    self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail))
                });
            if let Some(i) = hold {
                end = i;
            }
        }
        let piece = self.text.get(self.emitted..end).unwrap_or("").to_string();
        self.emitted = self.emitted.max(end);
        (piece, stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds text directly (the tokenizer-free part of the logic).
    fn feed(s: &mut TextStream, piece: &str) -> (String, bool) {
        s.text.push_str(piece);
        s.take_ready()
    }

    #[test]
    fn holds_back_stop_prefixes_and_cuts_at_the_stop() {
        let mut s = TextStream::new(vec!["\nUser:".into()]);
        assert_eq!(feed(&mut s, "Hello"), ("Hello".into(), false));
        assert_eq!(
            feed(&mut s, " there\n"),
            (" there".into(), false),
            "'\\n' may start the stop"
        );
        assert_eq!(feed(&mut s, "Us"), (String::new(), false));
        assert_eq!(feed(&mut s, "er: hi"), (String::new(), true));
        assert_eq!(s.text(), "Hello there");
        assert_eq!(s.finish(None).unwrap(), "");

        let mut s = TextStream::new(vec!["STOP".into()]);
        assert_eq!(feed(&mut s, "a S"), ("a ".into(), false));
        assert_eq!(feed(&mut s, "x"), ("Sx".into(), false), "not a stop after all");
        assert_eq!(feed(&mut s, "ST"), (String::new(), false));
        assert_eq!(s.finish(None).unwrap(), "ST", "held text is released at the end");
        assert_eq!(s.text(), "a SxST");

        let mut s = TextStream::new(vec![]);
        assert_eq!(feed(&mut s, "é\n"), ("é\n".into(), false));
    }
}
