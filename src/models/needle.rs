//! Needle-in-a-haystack prompts of several kinds, and their scoring: the prompts of the
//! `needle_suite` example (issue 17's suite).
//!
//! Built to differ from [`passkey`](super::passkey) everywhere a model could have learned
//! a template: another opening, a filler of varied sentences (shuffled per prompt, not one
//! repeated line), other needle sentences and other questions. Kinds:
//! - [`NeedleKind::Number`]: a 7-digit number;
//! - [`NeedleKind::Word`]: a word from a fixed list;
//! - [`NeedleKind::Uuid`]: a UUID-like code, 8 and 4 hex digits (`3fa9c012-7be4`);
//! - [`NeedleKind::MultiKey`]: three city/number needles (the asked one at the depth, the
//!   other two at random depths); the question names one city.
//!
//! The builder takes an encoding closure, so it works with any tokenizer (and is tested
//! with a byte-level one); [`build_needle`] is the convenience for a `tokenizers` one.

use super::tokenizer::encode_plain;
use crate::{Error, Result};
use tokenizers::Tokenizer;

/// The opening of every prompt.
pub const OPENING: &str = "Below is a long text. Somewhere inside it is one piece of information that you will be asked about afterwards. Read it carefully.\n\n";

/// The filler sentences (each starts with a space), shuffled per prompt and cycled.
pub const FILLER: [&str; 16] = [
    " The morning train left the station a few minutes late.",
    " A baker on the corner sells bread, rolls and small cakes.",
    " Rain fell softly on the roofs of the old town all afternoon.",
    " The library keeps its maps in long drawers near the window.",
    " Two children played chess on a bench in the park.",
    " The river turns east after the stone bridge.",
    " Most shops close early on the first day of the week.",
    " A gardener trimmed the hedges along the main road.",
    " The museum opened a new room for old clocks and watches.",
    " Fishing boats came back to the harbour before sunset.",
    " The school choir practised the same song three times.",
    " A light wind moved the flags above the market square.",
    " The post office sorts letters by street and house number.",
    " Farmers brought apples and pears to the Saturday market.",
    " The hill behind the village is covered with pine trees.",
    " An old radio played quiet music in the kitchen.",
];

const WORDS: [&str; 24] = [
    "lantern",
    "harmonica",
    "pelican",
    "marble",
    "saffron",
    "glacier",
    "violet",
    "compass",
    "walnut",
    "falcon",
    "anchor",
    "cobalt",
    "meadow",
    "juniper",
    "orchid",
    "granite",
    "tundra",
    "parsley",
    "zephyr",
    "quartz",
    "mango",
    "thistle",
    "caramel",
    "beacon",
];

const CITIES: [&str; 16] = [
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Perth", "Cairo", "Vienna",
    "Manila", "Bogota", "Seoul", "Zagreb",
];

/// What a needle hides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedleKind {
    /// A 7-digit number.
    Number,
    /// A word from a fixed list.
    Word,
    /// A UUID-like hex code (`8hex-4hex`).
    Uuid,
    /// Three city/number needles, one asked for.
    MultiKey,
}

impl NeedleKind {
    /// Every kind, in suite order.
    pub const ALL: [NeedleKind; 4] = [Self::Number, Self::Word, Self::Uuid, Self::MultiKey];

    /// The kind's name (`number`, `word`, `uuid`, `multikey`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::Word => "word",
            Self::Uuid => "uuid",
            Self::MultiKey => "multikey",
        }
    }

    /// The kind named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One built prompt.
#[derive(Debug, Clone)]
pub struct Needle {
    /// The kind of needle.
    pub kind: NeedleKind,
    /// Where the asked needle sits: 0 = before the first filler sentence, 1 = after the last.
    pub depth: f64,
    /// The expected answer.
    pub answer: String,
    /// The prompt's token ids (at most the requested length).
    pub ids: Vec<u32>,
}

/// A seeded SplitMix64 stream for the prompts' choices.
#[derive(Debug, Clone)]
pub struct NeedleRng(u64);

impl NeedleRng {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Builds a prompt of at most `tokens` tokens with tokenizer `tok` (see [`build_needle_with`]).
pub fn build_needle(
    tok: &Tokenizer,
    kind: NeedleKind,
    tokens: usize,
    depth: f64,
    rng: &mut NeedleRng,
) -> Result<Needle> {
    build_needle_with(|s| encode_plain(tok, s, "needle prompt"), kind, tokens, depth, rng)
}

/// Builds a prompt of at most `tokens` tokens: the opening, filler sentences up to the
/// length, the needle(s), and the question, each piece encoded by `enc` and joined. The
/// asked needle goes before filler sentence `round(depth · sentences)`. Errors when
/// `tokens` leaves no room for filler.
pub fn build_needle_with(
    enc: impl Fn(&str) -> Result<Vec<u32>>,
    kind: NeedleKind,
    tokens: usize,
    depth: f64,
    rng: &mut NeedleRng,
) -> Result<Needle> {
    let depth = depth.clamp(0.0, 1.0);
    // (needle sentences with the asked one first, question, answer)
    let (needles, question, answer) = match kind {
        NeedleKind::Number => {
            let n = 1_000_000 + rng.below(9_000_000);
            let q = "\n\nWhat is the special magic number mentioned in the text? The special magic number is";
            (
                vec![format!(" The special magic number is {n}.")],
                q.to_string(),
                n.to_string(),
            )
        }
        NeedleKind::Word => {
            let w = WORDS[rng.below(WORDS.len())];
            let q = "\n\nWhat is the secret word mentioned in the text? The secret word is";
            (
                vec![format!(" The secret word is \"{w}\".")],
                q.to_string(),
                w.to_string(),
            )
        }
        NeedleKind::Uuid => {
            let code = format!("{:08x}-{:04x}", rng.next_u64() as u32, rng.next_u64() as u16);
            let q = "\n\nWhat is the access code mentioned in the text? The access code is";
            (vec![format!(" The access code is {code}.")], q.to_string(), code)
        }
        NeedleKind::MultiKey => {
            let mut cities = Vec::with_capacity(3);
            while cities.len() < 3 {
                let c = CITIES[rng.below(CITIES.len())];
                if !cities.contains(&c) {
                    cities.push(c);
                }
            }
            let nums: Vec<usize> = (0..3).map(|_| 10_000 + rng.below(90_000)).collect();
            let needles = cities
                .iter()
                .zip(&nums)
                .map(|(c, n)| format!(" The magic number for {c} is {n}."))
                .collect();
            let q = format!(
                "\n\nWhat is the magic number for {0}? The magic number for {0} is",
                cities[0]
            );
            (needles, q, nums[0].to_string())
        }
    };
    let opening = enc(OPENING)?;
    let question = enc(&question)?;
    let needles = needles.iter().map(|s| enc(s)).collect::<Result<Vec<_>>>()?;
    let fixed = opening.len() + question.len() + needles.iter().map(Vec::len).sum::<usize>();
    let mut order: Vec<usize> = (0..FILLER.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let filler = order.iter().map(|&i| enc(FILLER[i])).collect::<Result<Vec<_>>>()?;
    let (mut sentences, mut used) = (Vec::new(), 0);
    loop {
        let s = &filler[sentences.len() % filler.len()];
        if fixed + used + s.len() > tokens {
            break;
        }
        used += s.len();
        sentences.push(s);
    }
    if sentences.is_empty() {
        return Err(Error::Invalid {
            op: "build_needle",
            msg: format!("{tokens} tokens leave no room for filler (the fixed parts take {fixed})"),
        });
    }
    let count = sentences.len();
    // Positions (before filler sentence i) of each needle; the distractors at random.
    let mut at: Vec<usize> = vec![(depth * count as f64).round() as usize];
    at.extend((1..needles.len()).map(|_| rng.below(count + 1)));
    let mut ids = opening;
    for i in 0..=count {
        for (n, _) in at.iter().enumerate().filter(|(_, &a)| a == i) {
            ids.extend(&needles[n]);
        }
        if let Some(s) = sentences.get(i) {
            ids.extend(s.iter());
        }
    }
    ids.extend(&question);
    Ok(Needle {
        kind,
        depth,
        answer,
        ids,
    })
}

/// Whether a generated `text` holds `answer` (case-insensitive; a number must not run on
/// into further digits, so `17412` is not found in `174123`).
pub fn needle_found(text: &str, answer: &str) -> bool {
    let (text, answer) = (text.to_lowercase(), answer.to_lowercase());
    text.match_indices(&answer).any(|(i, m)| {
        let next = text[i + m.len()..].chars().next();
        let prev = text[..i].chars().next_back();
        let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
        !answer.chars().all(|c| c.is_ascii_digit()) || (!digit(next) && !digit(prev))
    })
}

/// The Wilson score interval `(low, high)` of `k` successes in `n` trials at normal
/// quantile `z` (1.96 for 95%); `(0, 1)` when `n = 0`.
pub fn wilson_interval(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}
