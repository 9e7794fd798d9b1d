//! The tokenizer built from SmolLM2's GGUF metadata against an independent
//! reference (transformers' GGUF tokenizer converter), plus round trips, special
//! tokens and the chat template. Uses the default model (fetched if missing).

use spinkv::models::fetch::fetch_default_model;
use spinkv::models::tokenizer::{
    load_gguf_tokenizer, read_gguf_content, tokenizer_from_file, tokenizer_from_gguf, ChatTemplate, TokenizerInfo,
};
use tokenizers::Tokenizer;

fn smollm2() -> (Tokenizer, TokenizerInfo) {
    let path = fetch_default_model(false).expect("fetch default model");
    load_gguf_tokenizer(&path).expect("tokenizer from GGUF")
}

/// Expected ids come from transformers 5.24.0 / tokenizers 0.23.3 (Python),
/// which converts the GGUF vocabulary itself (`integrations/gguf`), run as:
///
/// ```text
/// pip install --target /tmp/pyref transformers gguf tokenizers
/// # GGUF in /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf; /tmp/torchstub/torch/__init__.py is a
/// # dummy module (transformers' GGUF reader imports torch at top level only):
/// #   def __getattr__(name): ... return a dummy object
/// PYTHONPATH=/tmp/torchstub:/tmp/pyref HF_HUB_OFFLINE=1 python3 -c '
/// import json, sys
/// from transformers import PreTrainedTokenizerFast
/// t = PreTrainedTokenizerFast.from_pretrained("/tmp/gg", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
/// for s in json.load(open("/tmp/ref_strings.json")): print(json.dumps(s), t.encode(s, add_special_tokens=False))'
/// ```
///
/// (`AutoTokenizer.from_pretrained(dir, gguf_file=...)` takes the same
/// conversion path but also needs real torch to read the model config.)
/// transformers maps `tokenizer.ggml.pre = "smollm"` to the plain GPT-2 split
/// while we (like llama.cpp and SmolLM2's tokenizer.json) split digits first;
/// the two agree on this vocabulary because it has no multi-digit tokens.
const REFERENCE: &[(&str, &[u32])] = &[
    (
        "The pass key is 71432.",
        &[504, 1301, 1646, 314, 216, 39, 33, 36, 35, 34, 30],
    ),
    (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        &[
            1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
        ],
    ),
    (
        "  Hello,   world!\n\tIndented  line",
        &[216, 38699, 28, 256, 905, 17, 198, 197, 5080, 6574, 216, 1761],
    ),
    (
        "Café déjà vu — naïve 🚀 emoji 日本語",
        &[
            51, 1939, 2756, 32564, 90, 16739, 386, 101, 1841, 15486, 46494, 15107, 244, 218, 649, 33777, 17097, 241,
            115, 40993, 179, 120, 248,
        ],
    ),
    (
        "fn main() { println!(\"{}\", 1 + 2); }",
        &[
            7853, 1085, 1000, 1662, 1628, 34115, 17, 43331, 1002, 216, 33, 1232, 216, 34, 4258, 4029,
        ],
    ),
];

#[test]
fn ids_match_reference() {
    let (tok, _) = smollm2();
    for (text, expected) in REFERENCE {
        let enc = tok.encode(*text, false).expect("encode");
        assert_eq!(enc.get_ids(), *expected, "ids of {text:?}");
        // add_bos_token is false for SmolLM2: `true` adds nothing.
        assert_eq!(tok.encode(*text, true).unwrap().get_ids(), *expected);
    }
}

#[test]
fn round_trips() {
    let (tok, _) = smollm2();
    for text in [
        "Hello world",
        "  leading spaces and trailing  ",
        "line one\nline two\n\n\tindented\r\nwindows",
        "Ünïcödé àccents, ß, ø, 中文, русский, العربية",
        "emoji 🚀🔥👍🏽 and ZWJ 👩‍👩‍👧",
        "fn f(x: &[u8]) -> Option<u32> { x.get(0).map(|b| *b as u32) }",
        "The pass key is 71432. Remember it. 3.14159 1,000,000",
        "<|im_start|>user\nhi<|im_end|>\n",
        "",
    ] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip of {text:?}");
    }
}

#[test]
fn special_tokens_and_info() {
    let (tok, info) = smollm2();
    assert_eq!(tok.get_vocab_size(true), 49152);
    assert_eq!(info.bos, Some(1));
    assert_eq!(info.eos, vec![2]);
    assert!(!info.add_bos);
    for (s, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.encode(s, false).unwrap().get_ids(), &[id], "{s}");
        assert_eq!(tok.token_to_id(s), Some(id));
    }
    // Control tokens are special: skipped when asked.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(ids.get_ids(), true).unwrap(), "user\nhi");
}

/// Expected strings from jinja2 3.1.6 rendering the GGUF's own template:
///
/// ```text
/// python3 -c 'import gguf, jinja2; t = jinja2.Environment().from_string(
///   gguf.GGUFReader("model.gguf").fields["tokenizer.chat_template"].contents());
///   print(repr(t.render(messages=[{"role": "system", "content": "You are terse."},
///     {"role": "user", "content": "Hi there"}], add_generation_prompt=True)))'
/// ```
/// (and the same with only the user message).
#[test]
fn chat_template_matches_jinja() {
    let (tok, info) = smollm2();
    let template = info.chat_template.as_deref().expect("GGUF has a chat template");
    let chat = ChatTemplate::detect(Some(template));
    assert_eq!(
        chat,
        ChatTemplate::ChatMl {
            default_system: Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face".into())
        }
    );
    assert_eq!(info.chat_format(), chat);
    assert_eq!(
        chat.render(Some("You are terse."), "Hi there"),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        chat.render(None, "Hi there"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    // The rendered prompt encodes with single-id special tokens and ends with
    // "assistant\n".
    let ids = tok
        .encode(chat.render(None, "Hi there"), false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids[0], 1);
    assert!(ids.len() > 4);
    assert_eq!(&ids[ids.len() - 4..], &[1, 520, 9531, 198]);
}

/// The GGUF-built tokenizer saved as tokenizer.json loads back through
/// `tokenizer_from_file` and gives the same ids.
#[test]
fn tokenizer_json_round_trip() {
    let path = fetch_default_model(false).unwrap();
    let content = read_gguf_content(&path).unwrap();
    let tok = tokenizer_from_gguf(&content).unwrap();
    let dir = std::env::temp_dir().join(format!("spinkv-tokjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("tokenizer.json");
    tok.save(&json, false).unwrap();
    let loaded = tokenizer_from_file(&json).unwrap();
    for (text, expected) in REFERENCE {
        assert_eq!(loaded.encode(*text, false).unwrap().get_ids(), *expected);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
