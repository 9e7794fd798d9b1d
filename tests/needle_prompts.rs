//! The needle suite's prompts (`spinkv::models::needle`), built with a byte-level
//! encoder so that the text can be read back exactly: lengths, where the needles sit,
//! determinism, and the scoring helpers.

use spinkv::models::needle::{build_needle_with, needle_found, wilson_interval, NeedleKind, NeedleRng, OPENING};

fn bytes(s: &str) -> spinkv::Result<Vec<u32>> {
    Ok(s.bytes().map(u32::from).collect())
}

fn text(ids: &[u32]) -> String {
    String::from_utf8(ids.iter().map(|&b| b as u8).collect()).unwrap()
}

#[test]
fn prompts_fill_the_length_and_hide_the_answer_at_the_depth() {
    let mut rng = NeedleRng::new(7);
    for kind in NeedleKind::ALL {
        for tokens in [600, 1500, 4001] {
            for depth in [0.0, 0.25, 0.5, 0.75, 1.0] {
                let n = build_needle_with(bytes, kind, tokens, depth, &mut rng).unwrap();
                // At most the length, short of it by less than one filler sentence.
                assert!(
                    n.ids.len() <= tokens && n.ids.len() + 70 > tokens,
                    "{kind:?} {tokens}: {}",
                    n.ids.len()
                );
                let t = text(&n.ids);
                assert!(t.starts_with(OPENING));
                let body = &t[OPENING.len()..t.rfind("\n\n").unwrap()];
                // The asked needle's sentence is in the body once, at about the depth.
                let needle = match kind {
                    NeedleKind::Number => format!("special magic number is {}.", n.answer),
                    NeedleKind::Word => format!("secret word is \"{}\".", n.answer),
                    NeedleKind::Uuid => format!("access code is {}.", n.answer),
                    NeedleKind::MultiKey => format!(" is {}.", n.answer),
                };
                assert_eq!(body.matches(&needle).count(), 1, "{kind:?}: {needle} in {body}");
                let at = body.find(&needle).unwrap() as f64 / body.len() as f64;
                // Within a sentence's granularity, plus the other needles that may come first.
                let slack = 0.01 + (70.0 * 3.0) / body.len() as f64;
                assert!((at - depth).abs() < slack, "{kind:?} depth {depth}: found at {at:.3}");
                // The question asks for it, and nothing else in the prompt gives it away.
                assert_eq!(t.matches(n.answer.as_str()).count(), 1, "{kind:?}");
                match kind {
                    NeedleKind::Number => assert!(n.answer.len() == 7 && n.answer.parse::<u32>().is_ok()),
                    NeedleKind::Uuid => {
                        let (a, b) = n.answer.split_once('-').unwrap();
                        assert!(a.len() == 8 && b.len() == 4);
                        assert!(n.answer.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
                    }
                    NeedleKind::MultiKey => {
                        // Three city needles; the question names the asked one's city.
                        assert_eq!(body.matches("The magic number for ").count(), 3);
                        let q = &t[t.rfind("\n\n").unwrap()..];
                        let city = q.split("for ").nth(1).unwrap().split('?').next().unwrap();
                        assert!(body.contains(&format!("for {city} is {}.", n.answer)), "{q}");
                    }
                    NeedleKind::Word => {}
                }
            }
        }
    }
}

#[test]
fn prompts_are_seeded_and_vary_with_the_seed() {
    let build = |seed| build_needle_with(bytes, NeedleKind::Uuid, 900, 0.3, &mut NeedleRng::new(seed)).unwrap();
    assert_eq!(build(3).ids, build(3).ids);
    let (a, b) = (build(3), build(4));
    assert_ne!(a.answer, b.answer);
    // The filler order is shuffled per prompt too.
    assert_ne!(text(&a.ids).replace(&a.answer, ""), text(&b.ids).replace(&b.answer, ""));
}

#[test]
fn too_short_a_prompt_is_an_error() {
    let e = build_needle_with(bytes, NeedleKind::Number, 100, 0.5, &mut NeedleRng::new(1)).unwrap_err();
    assert!(
        e.to_string().contains("build_needle") && e.to_string().contains("100 tokens"),
        "{e}"
    );
}

#[test]
fn answers_are_scored_exactly() {
    assert!(needle_found(" 1741223.", "1741223"));
    assert!(!needle_found(" 17412230", "1741223") && !needle_found("91741223", "1741223"));
    assert!(!needle_found(" 1742123.", "1741223"));
    assert!(needle_found(" \"Lantern\".", "lantern") && needle_found("3FA9C012-7be4", "3fa9c012-7be4"));
    assert!(!needle_found("3fa9c012-7be", "3fa9c012-7be4"));
}

#[test]
fn wilson_intervals_match_known_values() {
    // Reference values (z = 1.96) from the closed form, computed independently.
    let close = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() < 5e-4 && (a.1 - b.1).abs() < 5e-4;
    assert!(
        close(wilson_interval(0, 20, 1.96), (0.0, 0.1611)),
        "{:?}",
        wilson_interval(0, 20, 1.96)
    );
    assert!(close(wilson_interval(20, 20, 1.96), (0.8389, 1.0)));
    assert!(close(wilson_interval(10, 20, 1.96), (0.2993, 0.7007)));
    assert!(
        close(wilson_interval(18, 20, 1.96), (0.6990, 0.9721)),
        "{:?}",
        wilson_interval(18, 20, 1.96)
    );
    assert_eq!(wilson_interval(0, 0, 1.96), (0.0, 1.0));
}
