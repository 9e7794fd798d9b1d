//! Tokenizers and chat prompts.
//!
//! Owns text <-> token ids: loading a `tokenizer.json` ([`tokenizer_from_file`]),
//! building the equivalent byte-level BPE tokenizer from a GGUF file's
//! `tokenizer.ggml.*` metadata ([`tokenizer_from_gguf`]), reading the special
//! token ids and chat template ([`TokenizerInfo`]), and rendering a
//! single-turn chat prompt ([`ChatTemplate`], in `chat_template`).

pub use super::chat_template::ChatTemplate;
use super::gguf_meta::{meta_bool, meta_int_array, meta_str, meta_str_array, meta_u32};
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Content;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF `tokenizer.ggml.token_type` of control tokens (e.g. `<|im_start|>`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `tokenizer.ggml.token_type` of user-defined tokens (e.g. `<think>`).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3 split regex (also llama.cpp's `llama-bpe`, `falcon3`, `dbrx`, ...).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 split regex: like Llama 3 but single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `text`'s token ids without special tokens (the prompt builders' pieces); a tokenizer
/// error names `what`.
pub(crate) fn encode_plain(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| Error::Model(format!("{what}: tokenizer: {e}")))?
        .get_ids()
        .to_vec())
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::Model(format!(
            "tokenizer file not found: {}; pass the model's tokenizer.json",
            path.display()
        )));
    }
    Tokenizer::from_file(path).map_err(|e| {
        Error::Model(format!(
            "cannot load tokenizer {}: {e}; it must be a Hugging Face tokenizer.json",
            path.display()
        ))
    })
}

/// Reads the metadata (not the tensors) of a GGUF file.
pub fn read_gguf_content(path: &Path) -> Result<Content> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::Model(format!("cannot open GGUF file {}: {e}", path.display())))?;
    Content::read(&mut f).map_err(|e| {
        Error::Model(format!(
            "cannot read GGUF file {}: {e}; is it a complete .gguf file?",
            path.display()
        ))
    })
}

/// Builds the tokenizer described by a GGUF file's metadata.
///
/// Supports byte-level BPE (`tokenizer.ggml.model` = `gpt2`): vocabulary from
/// `tokenizer.ggml.tokens`, merges from `tokenizer.ggml.merges`, the split
/// regex chosen by `tokenizer.ggml.pre` the way llama.cpp does (SmolLM2's
/// `smollm` = single digits + GPT-2 split), control tokens (type 3) added as
/// special tokens and user-defined ones (type 4) as added tokens so that e.g.
/// `<|im_start|>` in text becomes one id, a ByteLevel decoder, and a BOS
/// post-processor when `tokenizer.ggml.add_bos_token` is true.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer> {
    let model = meta_str(content, "tokenizer.ggml.model")?.ok_or_else(|| {
        Error::Model("GGUF has no tokenizer.ggml.model: it carries no tokenizer; pass a tokenizer.json".to_string())
    })?;
    if model != "gpt2" {
        return Err(Error::Model(format!(
            "unsupported tokenizer model {model:?} in GGUF (tokenizer.ggml.model); only byte-level \
             BPE (\"gpt2\") is supported: pass the model's tokenizer.json instead"
        )));
    }
    let pre = meta_str(content, "tokenizer.ggml.pre")?.unwrap_or("default");
    let split = pre_split_for(pre)?;

    let tokens = meta_str_array(content, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(Error::Model("GGUF tokenizer.ggml.tokens is empty".to_string()));
    }
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        let id =
            u32::try_from(id).map_err(|_| Error::Model("GGUF vocabulary has more than 2^32 tokens".to_string()))?;
        // Keep the first id of a duplicated string (ids stay as in the file).
        vocab.entry(tok.to_string()).or_insert(id);
    }
    let merges_raw = meta_str_array(content, "tokenizer.ggml.merges")?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            Error::Model(format!(
                "GGUF tokenizer.ggml.merges[{i}] = {m:?} is not of the form \"a b\""
            ))
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(split.ignore_merges)
        .build()
        .map_err(|e| Error::Model(format!("invalid BPE vocabulary/merges in GGUF: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(split.pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    let types = meta_int_array(content, "tokenizer.ggml.token_type")?;
    if let Some(types) = &types {
        if types.len() != tokens.len() {
            return Err(Error::Model(format!(
                "GGUF tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                types.len(),
                tokens.len()
            )));
        }
        let pick = |kind: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(types.iter())
                .filter(|(t, &ty)| ty == kind && !t.is_empty())
                .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
                .collect()
        };
        tokenizer.add_special_tokens(&pick(TOKEN_TYPE_CONTROL, true));
        tokenizer.add_tokens(&pick(TOKEN_TYPE_USER_DEFINED, false));
    }

    let info = TokenizerInfo::from_gguf(content)?;
    if let (true, Some(bos)) = (info.add_bos, info.bos) {
        let bos_str = tokens[bos as usize];
        tokenizer.with_post_processor(Some(bos_processor(bos_str, bos)?));
    }
    Ok(tokenizer)
}

/// Reads a GGUF file's metadata and builds its tokenizer and [`TokenizerInfo`].
pub fn load_gguf_tokenizer(path: &Path) -> Result<(Tokenizer, TokenizerInfo)> {
    let content = read_gguf_content(path)?;
    Ok((tokenizer_from_gguf(&content)?, TokenizerInfo::from_gguf(&content)?))
}

/// Pre-tokenizer plus the BPE `ignore_merges` flag for a `tokenizer.ggml.pre`.
struct PreSplit {
    pre_tokenizer: PreTokenizerWrapper,
    ignore_merges: bool,
}

/// Maps llama.cpp's `tokenizer.ggml.pre` names to the split they stand for
/// (see `llm_tokenizer_bpe` in llama.cpp's `llama-vocab.cpp`).
fn pre_split_for(pre: &str) -> Result<PreSplit> {
    let gpt2 = || ByteLevel::new(false, true, true);
    let regex_then_bytes = |re: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Model(format!("invalid split regex for {pre:?}: {e}")))?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    let (pre_tokenizer, ignore_merges) = match pre {
        // GPT-2 split. A missing key means "default", which we treat as GPT-2.
        "default" | "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de" | "jina-v2-es"
        | "jina-v2-de" | "gigachat" | "mellum" | "a.x-4.0" => (gpt2().into(), false),
        // Single digits, then the GPT-2 split (StarCoder family; SmolLM/SmolLM2).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into(),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx" | "smaug-bpe"
        | "midm-2.0" | "lfm2" => (regex_then_bytes(LLAMA3_SPLIT)?, true),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => (regex_then_bytes(QWEN2_SPLIT)?, false),
        other => {
            return Err(Error::Model(format!(
                "unsupported GGUF pre-tokenizer {other:?} (tokenizer.ggml.pre); supported: \
                 default/gpt2, smollm/starcoder, llama-bpe/llama3, qwen2; pass the model's \
                 tokenizer.json instead"
            )))
        }
    };
    Ok(PreSplit {
        pre_tokenizer,
        ignore_merges,
    })
}

/// `BOS $A` (and `BOS $A BOS $B`) post-processor, built through serde so that
/// any token string works.
fn bos_processor(bos: &str, id: u32) -> Result<TemplateProcessing> {
    let special = serde_json::json!({ "SpecialToken": { "id": bos, "type_id": 0 } });
    let json = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [special, { "Sequence": { "id": "A", "type_id": 0 } }],
        "pair": [
            special, { "Sequence": { "id": "A", "type_id": 0 } },
            { "SpecialToken": { "id": bos, "type_id": 1 } }, { "Sequence": { "id": "B", "type_id": 1 } }
        ],
        "special_tokens": { bos: { "id": bos, "ids": [id], "tokens": [bos] } }
    });
    serde_json::from_value(json).map_err(|e| Error::Model(format!("cannot build BOS post-processor for {bos:?}: {e}")))
}

/// Special token ids and chat template of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerInfo {
    /// Beginning-of-sequence token id.
    pub bos: Option<u32>,
    /// Token ids that end generation (EOS, EOT, EOM, and the template's
    /// end-of-turn token such as `<|im_end|>` / `<|eot_id|>`), deduplicated.
    pub eos: Vec<u32>,
    /// Whether the model expects BOS prepended (`tokenizer.ggml.add_bos_token`
    /// / `add_bos_token`). The GGUF tokenizer then adds it on
    /// `encode(.., true)`.
    pub add_bos: bool,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
}

impl TokenizerInfo {
    /// Reads `tokenizer.ggml.{bos,eos,eot,eom}_token_id`,
    /// `tokenizer.ggml.add_bos_token` and `tokenizer.chat_template`.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let tokens = meta_str_array(content, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let id = |key: &str| -> Result<Option<u32>> {
            match meta_u32(content, key)? {
                Some(v) if (v as usize) >= n => Err(Error::Model(format!(
                    "GGUF {key} = {v} is out of range (the vocabulary has {n} tokens)"
                ))),
                v => Ok(v),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let mut eos = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(v) = id(key)? {
                push_unique(&mut eos, v);
            }
        }
        let chat_template = meta_str(content, "tokenizer.chat_template")?.map(str::to_string);
        let lookup = |s: &str| tokens.iter().position(|t| *t == s).map(|i| i as u32);
        add_turn_end(&mut eos, chat_template.as_deref(), lookup);
        let add_bos = meta_bool(content, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        Ok(TokenizerInfo {
            bos,
            eos,
            add_bos,
            chat_template,
        })
    }

    /// Reads a Hugging Face model folder: `bos_token_id` / `eos_token_id`
    /// (number or list) from `config.json` and `generation_config.json`,
    /// `add_bos_token` and `chat_template` from `tokenizer_config.json`, or the
    /// template from `chat_template.jinja`. `tokenizer` resolves the template's
    /// end-of-turn token.
    pub fn from_hf_dir(dir: &Path, tokenizer: &Tokenizer) -> Result<Self> {
        let config = read_json(&dir.join("config.json"))?
            .ok_or_else(|| Error::Model(format!("missing config.json in {}", dir.display())))?;
        let generation = read_json(&dir.join("generation_config.json"))?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
        let ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
            match v {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect()
                }
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let bos = ids(config.get("bos_token_id")).first().copied().or_else(|| {
            ids(generation.as_ref().and_then(|g| g.get("bos_token_id")))
                .first()
                .copied()
        });
        let mut eos = Vec::new();
        for v in ids(config.get("eos_token_id"))
            .into_iter()
            .chain(ids(generation.as_ref().and_then(|g| g.get("eos_token_id"))))
        {
            push_unique(&mut eos, v);
        }
        let mut chat_template = tok_config.as_ref().and_then(|t| match t.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default", else the first.
            Some(serde_json::Value::Array(list)) => {
                let named = |n: Option<&str>| {
                    list.iter()
                        .find(|e| n.is_none() || e.get("name").and_then(|x| x.as_str()) == n)
                        .and_then(|e| e.get("template"))
                        .and_then(|x| x.as_str())
                        .map(str::to_string)
                };
                named(Some("default")).or_else(|| named(None))
            }
            _ => None,
        });
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                chat_template = Some(
                    std::fs::read_to_string(&jinja)
                        .map_err(|e| Error::Model(format!("cannot read {}: {e}", jinja.display())))?,
                );
            }
        }
        add_turn_end(&mut eos, chat_template.as_deref(), |s| tokenizer.token_to_id(s));
        let add_bos = tok_config
            .as_ref()
            .and_then(|t| t.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(TokenizerInfo {
            bos,
            eos,
            add_bos,
            chat_template,
        })
    }

    /// The [`ChatTemplate`] matching this model's template.
    pub fn chat_format(&self) -> ChatTemplate {
        ChatTemplate::detect(self.chat_template.as_deref())
    }
}

fn push_unique(v: &mut Vec<u32>, x: u32) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// Adds the end-of-turn token of the detected template format to `eos`.
fn add_turn_end(eos: &mut Vec<u32>, template: Option<&str>, lookup: impl Fn(&str) -> Option<u32>) {
    let end = match ChatTemplate::detect(template) {
        ChatTemplate::ChatMl { .. } => Some("<|im_end|>"),
        ChatTemplate::Llama3 => Some("<|eot_id|>"),
        ChatTemplate::Plain => None,
    };
    if let Some(id) = end.and_then(lookup) {
        push_unique(eos, id);
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Model(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Model(format!("invalid JSON in {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Value, VersionedMagic};
    use std::collections::HashMap;

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A tiny byte-level BPE vocabulary: the printable ASCII bytes (byte-level
    /// spelling: space is `Ġ`, newline `Ċ`), a few merges, two control tokens.
    fn tiny_content(pre: &str) -> Content {
        let mut tokens: Vec<String> = vec!["<|im_start|>".into(), "<|im_end|>".into()];
        tokens.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
        tokens.extend(["Ġ", "Ċ", "Ġh", "Ġhi", "hi", "12"].map(String::from));
        let merges = ["Ġ h", "Ġh i", "h i", "1 2"];
        let mut types = vec![Value::I32(TOKEN_TYPE_CONTROL as i32); 2];
        types.extend(std::iter::repeat_n(Value::I32(1), tokens.len() - 2));
        let mut metadata = HashMap::new();
        metadata.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        metadata.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        metadata.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        );
        metadata.insert("tokenizer.ggml.merges".into(), strs(&merges));
        metadata.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
        metadata.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(0));
        metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        metadata.insert(
            "tokenizer.chat_template".into(),
            Value::String("{{ '<|im_start|>' + m + '<|im_end|>' }}".into()),
        );
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn id(t: &Tokenizer, s: &str) -> u32 {
        t.token_to_id(s).expect("token in vocab")
    }

    #[test]
    fn tiny_gguf_tokenizer_encodes_and_decodes() {
        let c = tiny_content("smollm");
        let t = tokenizer_from_gguf(&c).unwrap();
        let enc = t.encode("<|im_start|> hi 12", false).unwrap();
        // Control token whole; " hi" merged; digits split individually under
        // "smollm" even though the vocabulary has "12".
        assert_eq!(
            enc.get_ids(),
            &[0, id(&t, "Ġhi"), id(&t, "Ġ"), id(&t, "1"), id(&t, "2")]
        );
        assert_eq!(t.decode(enc.get_ids(), false).unwrap(), "<|im_start|> hi 12");
        assert_eq!(t.decode(enc.get_ids(), true).unwrap(), " hi 12");
        // Under the GPT-2 split, "12" stays one pre-token and merges.
        let t2 = tokenizer_from_gguf(&tiny_content("gpt2")).unwrap();
        let enc = t2.encode("12", false).unwrap();
        assert_eq!(enc.get_ids(), &[id(&t2, "12")]);
        // Llama 3 and Qwen2 regexes compile and round-trip.
        for pre in ["llama-bpe", "qwen2"] {
            let t3 = tokenizer_from_gguf(&tiny_content(pre)).unwrap();
            let enc = t3.encode("hi  hi\n12", false).unwrap();
            assert_eq!(t3.decode(enc.get_ids(), false).unwrap(), "hi  hi\n12");
        }
    }

    #[test]
    fn tiny_gguf_info() {
        let info = TokenizerInfo::from_gguf(&tiny_content("smollm")).unwrap();
        assert_eq!(info.bos, Some(0));
        assert_eq!(info.eos, vec![1]);
        assert!(!info.add_bos);
        assert!(matches!(info.chat_format(), ChatTemplate::ChatMl { .. }));
    }

    #[test]
    fn add_bos_token_adds_bos() {
        let mut c = tiny_content("smollm");
        c.metadata
            .insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        let t = tokenizer_from_gguf(&c).unwrap();
        assert_eq!(t.encode("hi", true).unwrap().get_ids(), &[0, id(&t, "hi")]);
        assert_eq!(t.encode("hi", false).unwrap().get_ids(), &[id(&t, "hi")]);
    }

    #[test]
    fn gguf_tokenizer_errors() {
        let mut c = tiny_content("smollm");
        c.metadata
            .insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let msg = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(msg.contains("unsupported tokenizer model \"llama\""), "{msg}");

        let msg = tokenizer_from_gguf(&tiny_content("weird-pre")).unwrap_err().to_string();
        assert!(msg.contains("unsupported GGUF pre-tokenizer \"weird-pre\""), "{msg}");

        let mut c = tiny_content("smollm");
        c.metadata.remove("tokenizer.ggml.model");
        assert!(tokenizer_from_gguf(&c).is_err());

        let mut c = tiny_content("smollm");
        c.metadata.remove("tokenizer.ggml.tokens");
        let msg = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");

        let mut c = tiny_content("smollm");
        c.metadata.insert("tokenizer.ggml.merges".into(), strs(&["nospace"]));
        let msg = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(msg.contains("merges[0]"), "{msg}");

        let mut c = tiny_content("smollm");
        c.metadata.insert("tokenizer.ggml.merges".into(), strs(&["Q Z9"]));
        let msg = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(msg.contains("invalid BPE"), "{msg}");

        let mut c = tiny_content("smollm");
        c.metadata
            .insert("tokenizer.ggml.eos_token_id".into(), Value::U32(999_999));
        let msg = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(msg.contains("out of range"), "{msg}");

        let mut c = tiny_content("smollm");
        c.metadata.insert("tokenizer.ggml.pre".into(), Value::U32(3));
        let msg = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(msg.contains("should be a string"), "{msg}");

        let mut c = tiny_content("smollm");
        c.metadata
            .insert("tokenizer.ggml.token_type".into(), Value::Array(vec![]));
        let msg = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(msg.contains("token_type"), "{msg}");
    }

    #[test]
    fn tokenizer_file_errors() {
        let msg = tokenizer_from_file(Path::new("/no/such/tokenizer.json"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/no/such/tokenizer.json"), "{msg}");
        let dir = std::env::temp_dir().join(format!("spinkv-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("tokenizer.json");
        std::fs::write(&bad, b"{not json").unwrap();
        let msg = tokenizer_from_file(&bad).unwrap_err().to_string();
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn info_from_hf_dir() {
        let tok = tokenizer_from_gguf(&tiny_content("smollm")).unwrap();
        let dir = std::env::temp_dir().join(format!("spinkv-hfdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let msg = TokenizerInfo::from_hf_dir(&dir, &tok).unwrap_err().to_string();
        assert!(msg.contains("missing config.json"), "{msg}");
        std::fs::write(dir.join("config.json"), br#"{"bos_token_id": 0, "eos_token_id": 5}"#).unwrap();
        std::fs::write(dir.join("generation_config.json"), br#"{"eos_token_id": [5, 7]}"#).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            br#"{"add_bos_token": true, "chat_template": "{{'<|im_start|>' + m}}"}"#,
        )
        .unwrap();
        let info = TokenizerInfo::from_hf_dir(&dir, &tok).unwrap();
        assert_eq!(info.bos, Some(0));
        // config, generation config, then the template's <|im_end|> (id 1).
        assert_eq!(info.eos, vec![5, 7, 1]);
        assert!(info.add_bos);
        assert_eq!(info.chat_template.as_deref(), Some("{{'<|im_start|>' + m}}"));
        std::fs::write(dir.join("tokenizer_config.json"), b"{broken").unwrap();
        let msg = TokenizerInfo::from_hf_dir(&dir, &tok).unwrap_err().to_string();
        assert!(msg.contains("tokenizer_config.json"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
