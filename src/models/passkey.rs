//! Passkey retrieval prompts (needle in a haystack) and their scoring, shared by the
//! `passkey` and `serve_bench` examples.
//!
//! A 5-digit key is hidden at a depth (a fraction of the haystack) of repeated filler
//! text; the prompt ends with a question whose answer is the key.

use super::tokenizer::encode_plain;
use crate::Result;
use tokenizers::Tokenizer;

/// The instruction that opens every prompt.
pub const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n\n";
/// The filler repeated around the needle.
pub const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
/// The question that closes every prompt.
pub const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// Builds a prompt of about `context` tokens (filler is cut to whole units) with `key`
/// at `depth` (0 = first unit, 1 = after the last). Returns the token ids and the number
/// of trailing tokens that form the question.
pub fn build_prompt(tokenizer: &Tokenizer, context: usize, depth: f64, key: u32) -> Result<(Vec<u32>, usize)> {
    let enc = |s: &str| encode_plain(tokenizer, s, "passkey prompt");
    let intro = enc(INTRO)?;
    let needle = enc(&format!(" The pass key is {key}. Remember it. {key} is the pass key. "))?;
    let question = enc(QUESTION)?;
    let filler_unit = enc(FILLER)?;
    let budget = context.saturating_sub(intro.len() + needle.len() + question.len());
    let units = budget / filler_unit.len().max(1);
    let at = ((units as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let mut ids = intro;
    for u in 0..units {
        if u == at {
            ids.extend(&needle);
        }
        ids.extend(&filler_unit);
    }
    if at >= units {
        ids.extend(&needle);
    }
    ids.extend(&question);
    Ok((ids, question.len()))
}

/// Seeded generator of 5-digit keys (xorshift64; a zero seed is replaced).
#[derive(Debug, Clone)]
pub struct KeyGen(u64);

impl KeyGen {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x2545_F491_4F6C_DD1D } else { seed })
    }

    /// The next key, in `10000..100000`.
    pub fn next_key(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        10_000 + (self.0 % 90_000) as u32
    }
}

/// Whether an answer retrieved `key` (it contains the digits).
pub fn is_correct(answer: &str, key: u32) -> bool {
    answer.contains(&key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_seeded_five_digit_numbers() {
        let (mut a, mut b) = (KeyGen::new(1234), KeyGen::new(1234));
        for _ in 0..100 {
            let k = a.next_key();
            assert!((10_000..100_000).contains(&k));
            assert_eq!(k, b.next_key());
        }
        assert!(is_correct(" 12345.", 12345) && !is_correct("1234", 12345));
    }
}
