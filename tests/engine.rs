//! The serving engine with the real SmolLM2 model on the CPU: batching and chunked
//! prefill change no token, back-pressure admits FIFO and loses nothing, cancellation
//! frees pages, bad requests are rejected at submit while the engine keeps serving, and
//! the threaded client serves several submitting threads. The engine gives the tokens of
//! `models::generation::generate`, greedy and seeded (both sample with `ops::sample_rows`).

mod common;

use common::engine::{algo, alone, drain, encode, engine, fixed, smollm2};
use spinkv::engine::{EngineConfig, FinishReason, Request, SamplingParams};
use spinkv::models::generation::generate;
use spinkv::models::{Sampler, SamplingConfig};
use spinkv::SpinCache;
use std::collections::HashSet;

const TEXTS: [&str; 4] = [
    "Alice keeps bees on a hill near the old mill. Every spring she counts the hives, paints the \
     boxes blue and sells honey at the Saturday market in the village square. Her brother Tom \
     repairs bicycles in a shed behind the bakery. What does Alice sell at the market? She sells",
    "The train from Lyon to Geneva leaves at seven in the morning and arrives two hours later. \
     Passengers can buy coffee and croissants in the dining car, and the view of the mountains \
     is best from the left side. The train arrives in Geneva at",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide \
     to make glucose and release oxygen. It takes place mostly in the leaves, inside small \
     structures called chloroplasts that contain chlorophyll. The gas released is",
    "In the game of chess, each player starts with sixteen pieces: one king, one queen, two \
     rooks, two bishops, two knights and eight pawns. The goal is to checkmate the opposing \
     king. The number of pawns each player has at the start is",
];

fn prompts() -> Vec<Vec<u32>> {
    TEXTS.iter().map(|t| encode(t)).collect()
}

const N: usize = 6;

/// Four prompts decoded together give exactly the tokens each gives alone.
fn batching_changes_nothing(algo_name: &str) {
    let ps = prompts();
    let lens: Vec<usize> = ps.iter().map(Vec::len).collect();
    assert!(
        lens.iter().all(|&n| n > 40),
        "prompts longer than Quest's budget: {lens:?}"
    );
    let solo = alone(algo_name, &ps, N);
    let mut e = engine(algo_name, 2048, EngineConfig::default());
    let handles: Vec<_> = ps.iter().map(|p| e.submit(fixed(p, N)).unwrap()).collect();
    let first = e.step().unwrap();
    assert_eq!(
        (first.admitted, first.prefill_tokens),
        (4, ps.iter().map(Vec::len).sum()),
        "all four prompts prefill in the first step"
    );
    let second = e.step().unwrap();
    assert_eq!(second.decodes, 4, "then they decode as one batch");
    e.run_until_idle().unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        let (c, _) = drain(h);
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.tokens, solo[i], "{algo_name}: prompt {i} batched vs alone");
    }
    assert_eq!(e.cache().pool_usage().host_used, 0);
    let attended = e.cache().stats().attended_fraction();
    if algo_name == "quest" {
        assert!(attended < 0.9, "quest attends a subset of the pages: {attended}");
    } else {
        assert_eq!(attended, 1.0);
    }
    let distinct: HashSet<&Vec<u32>> = solo.iter().collect();
    assert!(distinct.len() > 1, "the prompts give different outputs: {solo:?}");
}

#[test]
fn batching_changes_nothing_dense() {
    batching_changes_nothing("dense");
}

#[test]
fn batching_changes_nothing_quest() {
    batching_changes_nothing("quest");
}

/// `N` tokens of prompt `p` through `models::generation::generate` (an independent path
/// from the engine) on its own dense cache, sampled by `cfg`.
fn generated(p: &[u32], cfg: SamplingConfig) -> Vec<u32> {
    let lm = smollm2();
    let mut cache = SpinCache::new_boxed(lm.model.cache_config(256, 1.0), algo("dense")).unwrap();
    let mut sampler = Sampler::new(cfg);
    generate(
        &lm.model,
        &mut cache,
        &lm.tokenizer,
        p,
        N,
        &[],
        &mut sampler,
        false,
        |_| {},
    )
    .unwrap()
    .tokens
}

#[test]
fn engine_matches_plain_generation() {
    let p = &prompts()[1];
    assert_eq!(
        alone("dense", std::slice::from_ref(p), N)[0],
        generated(p, SamplingConfig::default())
    );
}

#[test]
fn seeded_engine_matches_seeded_generation() {
    let p = &prompts()[2];
    let (temperature, top_p, seed) = (0.9, 0.95, 4242);
    let want = generated(
        p,
        SamplingConfig {
            temperature,
            top_p,
            seed,
        },
    );
    let mut e = engine("dense", 1024, EngineConfig::default());
    let h = e
        .submit(fixed(p, N).with_sampling(SamplingParams {
            top_p,
            ..SamplingParams::random(temperature, seed)
        }))
        .unwrap();
    e.run_until_idle().unwrap();
    let tokens = drain(h).0.tokens;
    assert_eq!(tokens, want);
    // Sampled, not greedy: some token differs from the greedy run.
    assert_ne!(tokens, alone("dense", std::slice::from_ref(p), N)[0]);
}

/// Seeded temperature / top-p sampling gives the same tokens in padded decode steps (the
/// sampling rows travel with the step's inputs in the cache's buffers) as in eager ones,
/// for two requests of different seeds decoding together.
#[test]
fn padded_seeded_sampling_matches_eager() {
    use spinkv::engine::DecodeMode;
    let ps = prompts();
    let run = |mode: DecodeMode| {
        let cfg = EngineConfig {
            decode_mode: mode,
            ..EngineConfig::default()
        };
        let mut e = engine("dense", 2048, cfg);
        let hs: Vec<_> = [(1usize, 0.8f64, 7u64), (2, 1.1, 99)]
            .into_iter()
            .map(|(i, temperature, seed)| {
                e.submit(fixed(&ps[i], N).with_sampling(SamplingParams {
                    top_p: 0.9,
                    ..SamplingParams::random(temperature, seed)
                }))
                .unwrap()
            })
            .collect();
        e.run_until_idle().unwrap();
        if mode == DecodeMode::Padded {
            let m = e.metrics();
            assert!(m.decode.padded_eager > 0 && m.decode.fallbacks == 0, "{:?}", m.decode);
        }
        hs.into_iter().map(|h| drain(h).0.tokens).collect::<Vec<_>>()
    };
    let eager = run(DecodeMode::Eager);
    assert_eq!(run(DecodeMode::Padded), eager);
    let greedy: Vec<Vec<u32>> = [1, 2]
        .iter()
        .map(|&i| alone("dense", std::slice::from_ref(&ps[i]), N)[0].clone())
        .collect();
    assert_ne!(eager, greedy, "sampled, not greedy");
}

/// `EngineConfig::reserve_pages` (the default) gives each admitted request its pages for
/// prompt + `max_new_tokens` at once: the same tokens as allocating on demand, in padded
/// and eager decode steps, no page allocated by any later step, and every page freed.
#[test]
fn reserved_pages_change_no_token() {
    use spinkv::engine::DecodeMode;
    let ps = prompts();
    for mode in [DecodeMode::Padded, DecodeMode::Eager] {
        let run = |reserve_pages: bool| {
            let cfg = EngineConfig {
                decode_mode: mode,
                reserve_pages,
                ..EngineConfig::default()
            };
            let mut e = engine("quest", 2048, cfg);
            let hs: Vec<_> = (0..3).map(|i| e.submit(fixed(&ps[i], N)).unwrap()).collect();
            e.step().unwrap();
            let held = e.cache().pool_usage().host_used;
            let mut grew = false;
            while e.has_work() {
                e.step().unwrap();
                grew |= e.cache().pool_usage().host_used > held;
            }
            let tokens: Vec<Vec<u32>> = hs.into_iter().map(|h| drain(h).0.tokens).collect();
            assert_eq!(e.cache().pool_usage().host_used, 0, "every page freed");
            (tokens, held, grew)
        };
        let (on, held_on, grew_on) = run(true);
        let (off, held_off, grew_off) = run(false);
        assert_eq!(on, off, "{mode:?}: reserving changes no token");
        assert!(!grew_on && grew_off, "{mode:?}: only on-demand steps allocate pages");
        assert!(held_on > held_off, "{mode:?}: admission holds the decode pages");
    }
}

#[test]
fn chunked_prefill_changes_nothing() {
    let ps = prompts();
    let long: Vec<u32> = ps[0].iter().chain(&ps[1]).chain(&ps[2]).copied().collect();
    assert!(long.len() > 128, "spans three 64-token chunks: {}", long.len());
    let run = |chunk: usize| {
        let cfg = EngineConfig {
            max_prefill_tokens: chunk,
            ..Default::default()
        };
        let mut e = engine("dense", 2048, cfg);
        let hs = [e.submit(fixed(&long, N)).unwrap(), e.submit(fixed(&ps[3], N)).unwrap()];
        let mut steps_with_prefill = 0;
        while e.has_work() {
            let r = e.step().unwrap();
            assert!(
                r.prefill_tokens <= chunk,
                "{} prompt tokens in one step",
                r.prefill_tokens
            );
            steps_with_prefill += (r.prefill_tokens > 0) as usize;
        }
        let out: Vec<Vec<u32>> = hs.into_iter().map(|h| drain(h).0.tokens).collect();
        (out, steps_with_prefill)
    };
    let (chunked, chunked_steps) = run(64);
    let (whole, whole_steps) = run(4096);
    assert_eq!(whole_steps, 1);
    assert_eq!(chunked_steps, (long.len() + ps[3].len()).div_ceil(64));
    assert_eq!(chunked, whole);
}

#[test]
fn requests_join_while_others_decode_and_cancel_frees_pages() {
    let ps = prompts();
    let solo = alone("dense", &ps[..2], N);
    let mut e = engine("dense", 2048, EngineConfig::default());
    let a = e.submit(fixed(&ps[0], N)).unwrap();
    let long = e.submit(fixed(&ps[2], 200)).unwrap();
    e.step().unwrap();
    e.step().unwrap();
    let b = e.submit(fixed(&ps[1], N)).unwrap();
    let joined = e.step().unwrap();
    assert_eq!(
        (joined.admitted, joined.decodes, joined.prefill_tokens),
        (1, 2, ps[1].len()),
        "the newcomer prefills in a step that carries the running decodes"
    );
    let used_with_three = e.cache().pool_usage().host_used;
    while e.running_ids().len() > 1 {
        e.step().unwrap();
    }
    let used_long_only = e.cache().pool_usage().host_used;
    assert!(used_long_only > 0 && used_long_only < used_with_three);
    long.cancel();
    let r = e.step().unwrap();
    assert_eq!(r.finished, 1);
    assert!(!e.has_work());
    assert_eq!(
        e.cache().pool_usage().host_used,
        0,
        "the cancelled request's pages are freed"
    );
    let (c, _) = drain(long);
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert!(!c.tokens.is_empty() && c.tokens.len() < 200);
    assert_eq!(drain(a).0.tokens, solo[0]);
    assert_eq!(drain(b).0.tokens, solo[1]);
    let m = e.metrics();
    assert_eq!(
        (m.completed, m.cancelled, m.errored, m.waiting, m.running),
        (2, 1, 0, 0, 0)
    );
}

#[test]
fn back_pressure_admits_fifo_and_loses_nothing() {
    let ps = prompts();
    let solo = alone("dense", &ps, N);
    // Five requests; the host tier holds exactly two of them (prompt + max_new each).
    let reqs: Vec<Vec<u32>> = (0..5).map(|i| ps[i % 4].clone()).collect();
    let pages: Vec<usize> = reqs.iter().map(|p| (p.len() + N).div_ceil(16)).collect();
    let (min, max) = (*pages.iter().min().unwrap(), *pages.iter().max().unwrap());
    assert!(
        3 * min > 2 * max,
        "no three requests fit where two of the largest do: {pages:?}"
    );
    let mut e = engine("dense", 2 * max * 16, EngineConfig::default());
    let handles: Vec<_> = reqs.iter().map(|p| e.submit(fixed(p, N)).unwrap()).collect();
    let ids: Vec<_> = handles.iter().map(|h| h.id()).collect();
    let mut admitted = Vec::new();
    while e.has_work() {
        e.step().unwrap();
        let running = e.running_ids();
        assert!(running.len() <= 2, "at most two fit: {running:?}");
        for id in running {
            if !admitted.contains(&id) {
                admitted.push(id);
            }
        }
        let waiting = e.waiting_ids();
        assert!(waiting.windows(2).all(|w| w[0] < w[1]), "the queue stays FIFO");
    }
    assert_eq!(admitted, ids, "admitted in submission order");
    let done: Vec<_> = handles.into_iter().map(|h| drain(h).0).collect();
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.finish_reason, FinishReason::Length, "request {i}");
        assert_eq!(c.tokens, solo[i % 4], "request {i} lost or changed tokens");
    }
    assert!(
        done[2].timings.queued > done[0].timings.ttft().unwrap(),
        "request 2 waited for room"
    );
    let usage = e.cache().pool_usage();
    assert_eq!(usage.host_used, 0, "pool empty at the end: {usage:?}");
    assert_eq!(e.metrics().completed, 5);
}

#[test]
fn bad_requests_are_rejected_at_submit_and_the_engine_keeps_serving() {
    let ps = prompts();
    let mut e = engine("dense", 2048, EngineConfig::default());
    let good = e.submit(fixed(&ps[0], N)).unwrap();
    e.step().unwrap();
    let max = e.max_seq_len();
    let too_long = vec![1u32; max + 1];
    let cases: Vec<(Request, &str)> = vec![
        (Request::tokens(vec![], 4), "prompt is empty"),
        (Request::text("", 4), "prompt is empty"),
        (Request::tokens(too_long, 4), "max_seq_len"),
        (Request::tokens(ps[1].clone(), max), "max_seq_len"),
        (Request::tokens(ps[1].clone(), 0), "max_new_tokens = 0"),
        (
            Request::tokens(ps[1].clone(), 4).with_sampling(SamplingParams::random(-1.0, 1)),
            "temperature = -1",
        ),
        (
            Request::tokens(ps[1].clone(), 4).with_sampling(SamplingParams {
                top_p: 0.0,
                ..SamplingParams::random(1.0, 1)
            }),
            "top_p = 0",
        ),
        (
            Request::tokens(ps[1].clone(), 4).with_sampling(SamplingParams {
                top_p: 1.5,
                ..SamplingParams::random(1.0, 1)
            }),
            "top_p = 1.5",
        ),
        (Request::tokens(vec![1, 999_999], 4), "prompt[1] = 999999"),
        (Request::tokens(ps[1].clone(), 4000), "cache pages"),
    ];
    for (req, want) in cases {
        let err = e.submit(req).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(want), "expected an error with {want:?}, got {err:?}");
        assert!(err.starts_with("Engine::submit"), "names the op: {err}");
    }
    assert_eq!(e.metrics().waiting + e.metrics().running, 1, "nothing bad was queued");
    e.run_until_idle().unwrap();
    let (c, _) = drain(good);
    assert_eq!((c.finish_reason, c.tokens.len()), (FinishReason::Length, N));
    assert_eq!(c.tokens, alone("dense", &ps[..1], N)[0]);
}

#[test]
fn text_prompts_stream_text_and_stop_strings_cut_it() {
    let mut e = engine("dense", 2048, EngineConfig::default());
    let plain = e.submit(Request::text("The capital of France is", 8)).unwrap();
    let cut = e
        .submit(Request::text("The capital of France is", 8).with_stop_strings([" Paris"]))
        .unwrap();
    e.run_until_idle().unwrap();
    let (c, streamed) = drain(plain);
    assert!(c.text.starts_with(" Paris"), "{:?}", c.text);
    assert_eq!(streamed, c.text, "pieces + final piece = text");
    assert_eq!(c.text, smollm2().tokenizer.decode(&c.tokens, true).unwrap());
    let (c, streamed) = drain(cut);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!((c.text.as_str(), streamed.as_str()), ("", ""));
    assert!(!c.tokens.is_empty() && c.tokens.len() < 8);
    let t = &c.timings;
    assert!(t.ttft().unwrap() >= t.queued && t.total >= *t.token_times.last().unwrap());
}

#[test]
fn seeded_sampling_is_reproducible_in_any_batch() {
    let ps = prompts();
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        seed: 42,
    };
    let req = |p: &Vec<u32>| fixed(p, N).with_sampling(params);
    let mut e = engine("dense", 2048, EngineConfig::default());
    let a = e.submit(req(&ps[0])).unwrap();
    e.run_until_idle().unwrap();
    let solo = drain(a).0.tokens;
    let hs = [
        e.submit(fixed(&ps[1], N)).unwrap(),
        e.submit(req(&ps[0])).unwrap(),
        e.submit(fixed(&ps[2], N).with_sampling(SamplingParams::random(1.0, 7)))
            .unwrap(),
    ];
    e.run_until_idle().unwrap();
    let [_, b, _] = hs.map(|h| drain(h).0.tokens);
    assert_eq!(solo, b);
}

#[test]
fn threaded_client_serves_concurrent_submitters() {
    let ps = prompts();
    let solo = alone("dense", &ps[..3], N);
    let client = engine("dense", 2048, EngineConfig::default()).spawn().unwrap();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let (client, p) = (client.clone(), ps[i].clone());
            std::thread::spawn(move || drain(client.submit(fixed(&p, N)).unwrap()).0.tokens)
        })
        .collect();
    let bad = client
        .submit(Request::tokens(ps[0].clone(), 0))
        .unwrap_err()
        .to_string();
    assert!(bad.contains("max_new_tokens = 0"), "{bad}");
    let got: Vec<Vec<u32>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(got, solo);
    // A request still running at shutdown is cancelled, and its pages freed.
    let mut h = client.submit(fixed(&ps[3], 500)).unwrap();
    let first = h.recv_timeout(std::time::Duration::from_secs(60));
    assert!(first.is_some(), "the engine thread streams without being driven");
    let engine = client.shutdown().unwrap();
    assert_eq!(drain_rest(h), FinishReason::Cancelled);
    assert_eq!(engine.cache().pool_usage().host_used, 0);
    assert!(client.submit(fixed(&ps[0], 1)).is_err(), "the thread has stopped");
    assert!(client.shutdown().is_err());
    assert_eq!(engine.metrics().completed, 3);
}

fn drain_rest(h: spinkv::engine::RequestHandle) -> FinishReason {
    h.wait().finish_reason
}

/// Decode-only steps run padded (the device work CUDA graphs replay) give exactly the
/// tokens of the ragged eager path, while requests finish (different lengths) and one
/// joins mid-run, so the needed padded batch changes size (3 → 4, 4 → 4, 2 → 2, 1 → 1;
/// the smaller ones borrow the batch of 4, as graph replays would).
fn padded_decode_changes_no_token(algo_name: &str) {
    use spinkv::engine::DecodeMode;
    let ps = prompts();
    let solo = alone(algo_name, &ps, 9);
    let cfg = EngineConfig {
        decode_mode: DecodeMode::Padded,
        ..EngineConfig::default()
    };
    let mut e = engine(algo_name, 4096, cfg);
    assert_eq!(e.decode_mode(), DecodeMode::Padded);
    let lens = [3usize, 9, 6, 9];
    let mut handles: Vec<_> = (0..3).map(|i| e.submit(fixed(&ps[i], lens[i])).unwrap()).collect();
    e.step().unwrap();
    e.step().unwrap();
    handles.push(e.submit(fixed(&ps[3], lens[3])).unwrap());
    e.run_until_idle().unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        let (c, _) = drain(h);
        assert_eq!(
            c.tokens,
            solo[i][..lens[i]],
            "{algo_name}: prompt {i} padded vs eager alone"
        );
    }
    let m = e.metrics();
    assert!(m.decode.padded_eager >= 8, "decode steps ran padded: {:?}", m.decode);
    assert_eq!((m.decode.fallbacks, m.decode.errors), (0, 0), "{:?}", m.decode);
    assert_eq!(e.last_decode_error(), None);
    assert_eq!(e.cache().pool_usage().host_used, 0);
}

#[test]
fn padded_decode_changes_no_token_dense() {
    padded_decode_changes_no_token("dense");
}

#[test]
fn padded_decode_changes_no_token_quest() {
    padded_decode_changes_no_token("quest");
}

#[test]
fn graph_decode_mode_is_refused_without_cuda() {
    use spinkv::engine::{DecodeMode, Engine};
    let lm = smollm2();
    let cache = SpinCache::new_boxed(lm.model.cache_config(256, 1.0), algo("dense")).unwrap();
    let cfg = EngineConfig {
        decode_mode: DecodeMode::Graphs,
        ..EngineConfig::default()
    };
    let err = Engine::new(lm.model.clone(), Box::new(cache), None, cfg)
        .err()
        .expect("CPU has no graphs");
    assert!(
        err.to_string().contains("DecodeMode::Graphs needs a CUDA device"),
        "{err}"
    );
}

/// Recording the selections through the engine changes no token and covers every
/// (decode step, layer, request, KV head) once, with pages inside each request.
#[test]
fn selections_recorded_through_the_engine_cover_every_decode() {
    let ps = &prompts()[..2];
    let solo = alone("quest", ps, N);
    let mut e = engine("quest", 2048, EngineConfig::default());
    e.record_selections(true).unwrap();
    let handles: Vec<_> = ps.iter().map(|p| e.submit(fixed(p, N)).unwrap()).collect();
    e.run_until_idle().unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(drain(h).0.tokens, solo[i], "prompt {i}: recording changed the tokens");
    }
    let recs = e.take_selections();
    let c = e.cache().config().clone();
    let mut per: std::collections::HashMap<(u64, u32, u32), usize> = Default::default();
    for r in &recs {
        assert!(
            !r.pages.is_empty() && r.pages.iter().all(|&p| p < r.num_pages),
            "pages inside the request: {r:?}"
        );
        assert!(r.pages.windows(2).all(|w| w[0] < w[1]), "ascending: {r:?}");
        *per.entry((r.seq, r.layer, r.kv_head)).or_default() += 1;
    }
    let seqs: HashSet<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs.len(), 2, "both requests recorded");
    assert_eq!(per.len(), 2 * c.num_layers * c.num_kv_heads, "every layer and KV head");
    // The first token is sampled from the prefill step; the other N − 1 from decodes.
    assert!(per.values().all(|&n| n == N - 1), "{per:?}");
    assert!(e.take_selections().is_empty(), "taking empties the record");
}

/// Requests that fit only with pages homed in the fast tier are admitted together and
/// decode the tokens each gives alone; removal frees both homes.
#[test]
fn fast_homes_serve_what_the_host_tier_alone_cannot_hold() {
    use spinkv::engine::Engine;
    let ps = &prompts()[..2];
    let solo = alone("quest", ps, N);
    let lm = smollm2();
    let need: usize = ps.iter().map(|p| p.len() + N).sum();
    // Room for both (plus a page of rounding each), half of it homed in the fast tier.
    let ccfg = lm.model.cache_config(need + 64, 0.25).with_fast_homes(0.5, 0.25);
    let dirs = ccfg.num_layers * ccfg.num_kv_heads;
    assert!(
        ccfg.host_pages < need.div_ceil(ccfg.page_size) * dirs,
        "the host tier alone holds {} pages, the requests need about {}",
        ccfg.host_pages,
        need.div_ceil(ccfg.page_size) * dirs
    );
    let cache = SpinCache::new_boxed(ccfg, algo("quest")).unwrap();
    let cfg = EngineConfig {
        eos_token_ids: lm.info.eos.clone(),
        ..EngineConfig::default()
    };
    let mut e = Engine::new(lm.model.clone(), Box::new(cache), Some(lm.tokenizer.clone()), cfg).unwrap();
    let handles: Vec<_> = ps.iter().map(|p| e.submit(fixed(p, N)).unwrap()).collect();
    assert_eq!(e.step().unwrap().admitted, 2, "both admitted at once");
    let usage = e.cache().pool_usage();
    assert!(
        usage.fast_home_used > 0 && usage.host_used > 0,
        "pages in both homes: {usage:?}"
    );
    e.run_until_idle().unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(drain(h).0.tokens, solo[i], "prompt {i} with fast homes");
    }
    let u = e.cache().pool_usage();
    assert_eq!((u.host_used, u.fast_home_used), (0, 0), "{u:?}");
}
