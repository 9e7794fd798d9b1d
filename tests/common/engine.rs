//! Engine test helpers: the real SmolLM2 model (loaded once per test binary), engines
//! over a chosen algorithm and cache size, and draining request handles.

use candle_core::{DType, Device};
use spinkv::engine::{Completion, Engine, EngineConfig, Event, Request, RequestHandle};
use spinkv::models::fetch::{fetch_default_model, ModelSpec};
use spinkv::models::{load_model, LoadedModel};
use spinkv::partition::{Dense, Quest, QuestConfig, SparseAlgorithm};
use spinkv::SpinCache;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// SmolLM2-135M-Instruct in f32 on the CPU (fetched on first use).
pub fn smollm2() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let path = fetch_default_model(false).expect("fetch SmolLM2");
        load_model(&ModelSpec::LocalPath(path), DType::F32, &Device::Cpu, false).expect("load SmolLM2")
    })
}

/// Token ids of `text` (no special tokens).
pub fn encode(text: &str) -> Vec<u32> {
    smollm2().tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

/// The algorithms the engine tests run: dense, and Quest with a budget far below the
/// prompts' lengths (sparse selection in every layer).
pub fn algo(name: &str) -> Box<dyn SparseAlgorithm> {
    match name {
        "dense" => Box::new(Dense::new()),
        "quest" => Box::new(Quest::new(QuestConfig {
            budget_tokens: 32,
            sink_tokens: 16,
            window_tokens: 16,
            dense_layers: 0,
            shared_across_heads: false,
            ..Default::default()
        })),
        other => panic!("unknown test algorithm {other}"),
    }
}

/// An engine over SmolLM2 with `algo` and a cache holding `tokens` tokens in total
/// (host tier; fast tier a quarter of it), with the model's EOS tokens.
pub fn engine(algo_name: &str, tokens: usize, cfg: EngineConfig) -> Engine {
    let lm = smollm2();
    let ccfg = lm.model.cache_config(tokens, 0.25);
    let cache = SpinCache::new_boxed(ccfg, algo(algo_name)).unwrap();
    let cfg = EngineConfig {
        eos_token_ids: lm.info.eos.clone(),
        ..cfg
    };
    Engine::new(lm.model.clone(), Box::new(cache), Some(lm.tokenizer.clone()), cfg).unwrap()
}

/// A greedy request of `n` tokens that ignores EOS (fixed output length).
pub fn fixed(prompt: &[u32], n: usize) -> Request {
    Request::tokens(prompt.to_vec(), n).with_ignore_eos(true)
}

/// Reads every event of a handle (the engine must be running or have run): the
/// completion, and the streamed text (pieces + final piece), checking the token events
/// match the completion's tokens.
pub fn drain(mut h: RequestHandle) -> (Completion, String) {
    let mut streamed = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = h.recv() {
        match ev {
            Event::Token(t) => {
                assert_eq!(t.index, tokens.len(), "token events arrive in order");
                tokens.push(t.token);
                streamed.push_str(&t.text);
            }
            Event::Done(c) => {
                streamed.push_str(&c.final_piece);
                assert_eq!(tokens, c.tokens, "streamed tokens = completion tokens");
                return (c, streamed);
            }
        }
    }
    panic!("handle ended without a completion");
}

/// Tokens of each prompt decoded alone (one engine per prompt, greedy, `n` tokens),
/// computed once per (algorithm, prompt, n) in a test binary.
pub fn alone(algo_name: &str, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    type Key = (String, Vec<u32>, usize);
    type Solo = Mutex<HashMap<Key, Arc<OnceLock<Vec<u32>>>>>;
    static SOLO: OnceLock<Solo> = OnceLock::new();
    prompts
        .iter()
        .map(|p| {
            let cell = SOLO
                .get_or_init(Default::default)
                .lock()
                .unwrap()
                .entry((algo_name.to_string(), p.clone(), n))
                .or_default()
                .clone();
            cell.get_or_init(|| {
                let mut e = engine(algo_name, 1024, EngineConfig::default());
                let h = e.submit(fixed(p, n)).unwrap();
                e.run_until_idle().unwrap();
                assert_eq!(e.cache().pool_usage().host_used, 0);
                drain(h).0.tokens
            })
            .clone()
        })
        .collect()
}
