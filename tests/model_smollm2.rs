//! The real model path with SmolLM2-135M-Instruct (fetched on first run): greedy
//! generation, logits against candle-transformers' Llama on the same weights, and bad
//! model input.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use spinkv::models::fetch::{fetch_default_model, ModelSpec};
use spinkv::models::generation::generate;
use spinkv::models::tokenizer::read_gguf_content;
use spinkv::models::{load_model, weights, LlamaConfig, LoadedModel, Sampler, SamplingConfig};
use spinkv::partition::{Dense, InfLlm, InfLlmConfig, Quest, QuestConfig, ShadowKv, ShadowKvConfig, SparseAlgorithm};
use spinkv::{SparseKvCache, SpinCache};
use std::sync::OnceLock;

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let path = fetch_default_model(false).expect("fetch SmolLM2");
        load_model(&ModelSpec::LocalPath(path), DType::F32, &Device::Cpu, false).expect("load SmolLM2")
    })
}

fn greedy(algo: Box<dyn SparseAlgorithm>, prompt: &str, n: usize) -> Vec<u32> {
    greedy_with(model(), algo, prompt, n)
}

fn greedy_with(lm: &LoadedModel, algo: Box<dyn SparseAlgorithm>, prompt: &str, n: usize) -> Vec<u32> {
    let ids = lm.tokenizer.encode(prompt, false).unwrap().get_ids().to_vec();
    let page = algo.page_size_hint().unwrap_or(16);
    let ccfg = lm.model.cache_config(ids.len() + n + 1, 1.0).with_page_size(page);
    let mut cache = SpinCache::new_boxed(ccfg, algo).unwrap();
    let mut sampler = Sampler::new(SamplingConfig::default());
    let rep = generate(
        &lm.model,
        &mut cache,
        &lm.tokenizer,
        &ids,
        n,
        &lm.info.eos,
        &mut sampler,
        false,
        |_| {},
    )
    .unwrap();
    assert_eq!(cache.pool_usage().host_used, 0, "generation frees its sequence");
    rep.tokens
}

#[test]
fn capital_of_france_is_paris_dense_and_quest_agree() {
    let lm = model();
    let dense = greedy(Box::new(Dense::new()), "The capital of France is", 8);
    let text = lm.tokenizer.decode(&dense, true).unwrap();
    assert!(text.starts_with(" Paris"), "dense generated {text:?}");
    let quest = greedy(
        Box::new(Quest::new(QuestConfig {
            budget_tokens: 4096,
            dense_layers: 0,
            ..Default::default()
        })),
        "The capital of France is",
        8,
    );
    assert_eq!(dense, quest, "quest with budget >= context must equal dense");
}

#[test]
fn infllm_and_full_rank_shadowkv_with_budget_over_context_equal_dense() {
    // A prompt long enough that InfLLM finalizes blocks (window 32) and ShadowKV compresses
    // its prefill (Hkv·D = 3 · 64 = 192 = rank: the factor is exact up to rounding).
    let prompt = "Alice keeps bees on a hill near the old mill. Every spring she counts the hives, \
                  paints the boxes blue and sells honey at the Saturday market in the village square. \
                  Her brother Tom repairs bicycles. What does Alice sell at the market? She sells";
    let dense = greedy(Box::new(Dense::new()), prompt, 10);
    let infllm = greedy(
        Box::new(
            InfLlm::new(InfLlmConfig {
                block_tokens: 16,
                sink_tokens: 16,
                window_tokens: 32,
                topk_blocks: 64,
                repr_topk: 4,
            })
            .unwrap(),
        ),
        prompt,
        10,
    );
    assert_eq!(dense, infllm, "infllm with budget >= context must equal dense");
    let shadow = greedy(
        Box::new(
            ShadowKv::new(ShadowKvConfig {
                rank: 192,
                sparse_budget_tokens: 4096,
                ..Default::default()
            })
            .unwrap(),
        ),
        prompt,
        10,
    );
    assert_eq!(
        dense, shadow,
        "full-rank shadowkv with budget >= context must equal dense"
    );
}

/// bf16 weights: the logits come out in f32 (a bf16 output projection rounds the top two
/// logits of this chat prompt's first answer token to a tie, and greedy decoding then
/// answered "L'Étoile, …", as candle-transformers' Llama does in bf16), and greedy
/// decoding answers as the f32 model does.
#[test]
fn bf16_weights_answer_like_f32_with_f32_logits() {
    let f32_lm = model();
    let path = fetch_default_model(false).unwrap();
    let mut lm = load_model(&ModelSpec::LocalPath(path), DType::BF16, &Device::Cpu, false).unwrap();
    assert!(lm.model.f32_logits(), "f32 logits are the default for bf16 weights");
    let prompt = lm.info.chat_format().render(None, "What is the capital of France?");
    let want = greedy_with(f32_lm, Box::new(Dense::new()), &prompt, 7);
    let got = greedy_with(&lm, Box::new(Dense::new()), &prompt, 7);
    let text = lm.tokenizer.decode(&got, true).unwrap();
    assert!(text.contains("Paris"), "bf16 answered {text:?}");
    assert_eq!(got, want, "bf16 answer {text:?} differs from f32's");
    // The mechanism: with f32 logits some logit is not a bf16 value; without, all are.
    let ids = lm.tokenizer.encode(prompt.as_str(), false).unwrap().get_ids().to_vec();
    let bf16_exact = |lm: &LoadedModel| -> bool {
        let mut cache = SpinCache::new(lm.model.cache_config(ids.len() + 1, 1.0), Dense::new()).unwrap();
        let seq = cache.add_sequence().unwrap();
        let l = lm
            .model
            .forward(&mut cache, &[(seq, &ids)])
            .unwrap()
            .flatten_all()
            .unwrap();
        let rounded = l.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        l.to_vec1::<f32>().unwrap() == rounded.to_vec1::<f32>().unwrap()
    };
    assert!(!bf16_exact(&lm), "f32 logits must not be rounded to bf16");
    lm.model.set_f32_logits(false).unwrap();
    assert!(!lm.model.f32_logits());
    assert!(bf16_exact(&lm), "with f32 logits off, logits are bf16 values");
}

#[test]
fn logits_match_candle_transformers_llama() {
    let lm = model();
    let path = fetch_default_model(false).unwrap();
    let content = read_gguf_content(&path).unwrap();
    let cfg = LlamaConfig::from_gguf(&content).unwrap();
    let tensors = weights::load_gguf(&path, &content, &cfg, DType::F32, &Device::Cpu, |_, _| {}).unwrap();
    let rcfg = candle_transformers::models::llama::Config {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_layers,
        num_attention_heads: cfg.num_heads,
        num_key_value_heads: cfg.num_kv_heads,
        use_flash_attn: false,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: cfg.tie_word_embeddings,
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let reference = candle_transformers::models::llama::Llama::load(vb, &rcfg).unwrap();
    let mut rcache = candle_transformers::models::llama::Cache::new(true, DType::F32, &rcfg, &Device::Cpu).unwrap();
    let text = "Sparse attention reads only the pages of the KV cache that matter for the current query; the rest stays in host memory until a step selects it again.";
    let mut ids = lm.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    ids.truncate(64);
    assert!(ids.len() >= 30);
    let mut cache = SpinCache::new(lm.model.cache_config(128, 1.0), Dense::new()).unwrap();
    let seq = cache.add_sequence().unwrap();
    // Prompt, then three decode steps, compared at every step.
    let mut steps: Vec<Vec<u32>> = vec![ids.clone()];
    steps.extend([[42u32], [1234], [7]].iter().map(|s| s.to_vec()));
    let mut pos = 0;
    for toks in steps {
        let ours = lm
            .model
            .forward(&mut cache, &[(seq, &toks)])
            .unwrap()
            .squeeze(0)
            .unwrap();
        let input = Tensor::new(toks.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs = reference.forward(&input, pos, &mut rcache).unwrap().squeeze(0).unwrap();
        pos += toks.len();
        let max_logit = theirs.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff / max_logit <= 1e-3,
            "max |Δlogit| / max |logit| = {} at position {pos}",
            diff / max_logit
        );
        assert_eq!(
            ours.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
            theirs.argmax(0).unwrap().to_scalar::<u32>().unwrap()
        );
    }
}

#[test]
fn prompt_longer_than_the_maximum_is_an_error() {
    let lm = model();
    let mut ccfg = lm.model.cache_config(64, 1.0);
    ccfg.max_seq_len = 32;
    let mut cache = SpinCache::new(ccfg, Dense::new()).unwrap();
    let seq = cache.add_sequence().unwrap();
    let toks = vec![100u32; 40];
    let err = lm.model.forward(&mut cache, &[(seq, &toks)]).unwrap_err().to_string();
    assert!(err.contains("max_seq_len 32"), "{err}");
    assert_eq!(cache.sequence_len(seq).unwrap(), 0);
    let err = lm
        .model
        .forward(&mut cache, &[(seq, &[60_000u32])])
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

#[test]
fn missing_corrupt_and_unknown_model_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("spinkv-badmodel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Missing.
    let missing = dir.join("nope.gguf");
    let err = match ModelSpec::parse(missing.to_str().unwrap()) {
        Err(e) => e.to_string(),
        Ok(spec) => load_model(&spec, DType::F32, &Device::Cpu, false)
            .err()
            .expect("missing file must fail")
            .to_string(),
    };
    assert!(err.contains("nope.gguf"), "{err}");
    // Corrupt: right magic, garbage after it.
    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage-garbage-garbage").unwrap();
    let err = load_model(&ModelSpec::LocalPath(corrupt.clone()), DType::F32, &Device::Cpu, false)
        .err()
        .expect("corrupt")
        .to_string();
    assert!(err.contains("corrupt.gguf"), "{err}");
    // Unknown architecture: a valid GGUF of a family we do not support.
    let unknown = dir.join("mamba.gguf");
    {
        let mut f = std::fs::File::create(&unknown).unwrap();
        let arch = gguf_file::Value::String("mamba".into());
        let t = candle_core::quantized::QTensor::quantize(
            &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)]).unwrap();
    }
    let err = load_model(&ModelSpec::LocalPath(unknown), DType::F32, &Device::Cpu, false)
        .err()
        .expect("unknown arch")
        .to_string();
    assert!(
        err.contains("unsupported architecture `mamba`") || err.contains("mamba"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
