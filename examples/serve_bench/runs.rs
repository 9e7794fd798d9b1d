//! serve_bench's runs: a batch submitted at once to a fresh engine, and the offline,
//! largest-batch, online and accuracy modes built on it.

use super::*;

/// Submits `reqs` at once to a fresh engine sized for them, runs its steps to the end
/// (progress to stderr; the most device memory in use is sampled after each step), and
/// returns the row and the completions. Fails if any request failed.
pub(crate) fn run_batch(
    b: &Bench,
    c: &Cli,
    algo: &str,
    reqs: Vec<Request>,
    mode: &'static str,
    ctx: String,
) -> Result<(Row, Vec<Completion>)> {
    let len = |r: &Request| match &r.prompt {
        Prompt::Tokens(t) => t.len(),
        Prompt::Text(_) => unreachable!("prompts here are token ids"),
    };
    let (longest, n) = reqs
        .iter()
        .fold((0, 0), |(l, n), r| (l.max(len(r)), n.max(r.max_new_tokens)));
    let label = format!(
        "{mode} {algo}: {} requests, prompts ≤ {longest}, {n} new tokens",
        reqs.len()
    );
    eprintln!("{label}...");
    let (mut eng, bytes) = engine(b, c, algo, reqs.len(), longest + n)?;
    let batch = reqs.len();
    if c.trace_dir.is_some() {
        eng.record_selections(true)?;
    }
    let handles = reqs
        .into_iter()
        .map(|r| eng.submit(r))
        .collect::<spinkv::Result<Vec<_>>>()?;
    let dev = eng.model().device().clone();
    let (mut peak, mut last) = (device_memory_used(&dev), Instant::now());
    // Device memory after the engine's allocations, and the peaks seen after steps
    // with prefill tokens and after decode-only steps (where a peak comes from).
    let (at_init, mut peak_prefill, mut peak_decode) = (peak, None::<u64>, None::<u64>);
    let total = handles.len();
    let (mut full_tokens, mut full_secs, mut decode_steps) = (0usize, 0f64, 0usize);
    let (mut steady_tokens, mut steady_secs) = (0usize, 0f64);
    // Full-batch steps that fell back to the ragged eager path, and their time.
    let (mut fallback_steps, mut fallback_secs) = (0usize, 0f64);
    // A padded step run eagerly is the warm-up of a capture, except where every padded
    // step runs that way (`--decode padded`).
    let padded_is_warmup = eng.decode_mode() != DecodeMode::Padded;
    // Sequences each profiled step carried (a profile of fewer than `total` is not the
    // batch the run names).
    let mut profiled = Vec::new();
    while eng.has_work() {
        let profiling = c.profile_steps > 0 && (PROFILE_AFTER..PROFILE_AFTER + c.profile_steps).contains(&decode_steps);
        if profiling && decode_steps == PROFILE_AFTER {
            spinkv::ops::profiler_range(&dev, true)?;
        }
        let before = eng.decode_counters();
        let r = eng.step()?;
        let after = eng.decode_counters();
        if r.prefill_tokens == 0 && r.decodes > 0 {
            decode_steps += 1;
        }
        if r.prefill_tokens == 0 && r.decodes == total {
            full_tokens += r.sampled;
            full_secs += r.elapsed.as_secs_f64();
            let warmup = after.captures > before.captures
                || after.errors > before.errors
                || (padded_is_warmup && after.padded_eager > before.padded_eager);
            if after.fallbacks > before.fallbacks {
                fallback_steps += 1;
                fallback_secs += r.elapsed.as_secs_f64();
            } else if !warmup {
                steady_tokens += r.sampled;
                steady_secs += r.elapsed.as_secs_f64();
            }
        }
        if profiling {
            profiled.push(r.decodes);
        }
        if profiling && decode_steps == PROFILE_AFTER + c.profile_steps {
            spinkv::ops::profiler_range(&dev, false)?;
        }
        let now = device_memory_used(&dev);
        peak = peak.max(now);
        let phase = if r.prefill_tokens > 0 {
            &mut peak_prefill
        } else {
            &mut peak_decode
        };
        *phase = (*phase).max(now);
        if last.elapsed() > Duration::from_secs(5) {
            let m = eng.metrics();
            let (p, d, r, w) = (m.prefill_tokens, m.decode_tokens, m.running, m.waiting);
            eprintln!("  {p} prompt + {d} output tokens, {r} running, {w} waiting");
            last = Instant::now();
        }
    }
    let done: Vec<Completion> = handles.into_iter().map(|h| h.wait()).collect();
    if let Some(c) = done.iter().find(|c| matches!(c.finish_reason, FinishReason::Error(_))) {
        bail!("{label}: request {:?} failed: {}", c.id, c.finish_reason);
    }
    eprintln!("  decode {:?}: {:?}", eng.decode_mode(), eng.metrics().decode);
    if c.profile_steps > 0 {
        eprintln!(
            "  profiled {} step(s), carrying {profiled:?} of {total} requests{}",
            profiled.len(),
            if profiled.iter().any(|&d| d < total) {
                " (fewer than the whole batch: some requests had finished or were still \
                 prefilling; raise --new-tokens so that every request decodes together)"
            } else {
                ""
            }
        );
    }
    print_tier_stats(&eng);
    if at_init.is_some() {
        let gb = |b: Option<u64>| b.map_or("—".to_string(), |b| format!("{:.1} GB", b as f64 / 1e9));
        eprintln!(
            "  device memory: {} with the engine built; peak {} after prefill steps, {} after decode-only steps",
            gb(at_init),
            gb(peak_prefill),
            gb(peak_decode)
        );
    }
    if c.host_timing {
        eprintln!("  host time by part (µs: total, spans, per span, median, p99, max):");
        let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
        for s in spinkv::host_timing::report() {
            eprintln!(
                "    {:<28} {:>12.0} {:>8} {:>10.1} {:>8.1} {:>8.1} {:>9.1}",
                s.label,
                us(s.total),
                s.count,
                us(s.total) / s.count.max(1) as f64,
                us(s.p50),
                us(s.p99),
                us(s.max)
            );
        }
        spinkv::host_timing::reset();
    }
    if let Some(e) = eng.last_decode_error() {
        eprintln!("  last padded-decode error (that step ran eagerly): {e}");
    }
    if let Some(dir) = &c.trace_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("--trace-dir {}", dir.display()))?;
        let path = dir.join(format!("{mode}_{algo}_{ctx}_b{batch}.csv"));
        let records = eng.take_selections();
        let f = std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| path.display().to_string())?);
        spinkv::trace::write_csv(f, &records)?;
        eprintln!("  {} selection records: {}", records.len(), path.display());
    }
    if fallback_steps > 0 {
        eprintln!(
            "  {fallback_steps} full-batch step(s) fell back to the ragged eager path ({:.1} ms in all): \
             left out of the steady tok/s, kept in the full-batch tok/s",
            fallback_secs * 1e3
        );
    }
    let mut row = Row::new(mode, algo, ctx, n, &done, &eng.metrics(), peak, bytes);
    if full_tokens > 0 {
        row.full_batch_tps = full_tokens as f64 / full_secs.max(1e-9);
        if steady_tokens > 0 {
            row.steady_tps = steady_tokens as f64 / steady_secs.max(1e-9);
        }
    } else if total > 1 {
        // Requests decode about a token per mixed step while the others prefill.
        let chunks = (eng.metrics().prefill_tokens as usize).div_ceil(c.max_prefill_tokens);
        eprintln!(
            "  note: no decode-only step carried all {total} requests, so there is no full-batch \
             tok/s: the first requests finished while the last were still prefilling \
             (~{chunks} prefill steps of --max-prefill-tokens {}); raise --new-tokens above that",
            c.max_prefill_tokens
        );
    }
    Ok((row, done))
}

pub(crate) fn random_prompt(rng: &mut StdRng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()
}

pub(crate) fn offline(b: &Bench, c: &Cli, algo: &str, batch: usize, ctx: usize, n: usize) -> Result<Row> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let vocab = b.model.config().vocab_size;
    let reqs = (0..batch).map(|_| Request::tokens(random_prompt(&mut rng, ctx, vocab), n).with_ignore_eos(true));
    Ok(run_batch(b, c, algo, reqs.collect(), "offline", ctx.to_string())?.0)
}

/// Grows B from the largest `--batch` (doubling, then bisecting to within 1/8) while a
/// run succeeds; a cache that cannot be built or a failed request (device OOM) ends it.
pub(crate) fn find_max_batch(b: &Bench, c: &Cli, algo: &str, o: &OfflineArgs) -> Result<Row> {
    let limit = o.max_batch_limit;
    let (mut ok, mut fail, mut best) = (None::<usize>, None::<usize>, None::<Row>);
    let mut try_b = o.batch.iter().copied().max().unwrap_or(1).min(limit);
    loop {
        match offline(b, c, algo, try_b, o.context, o.new_tokens) {
            Ok(r) => (ok, best) = (Some(try_b), Some(r)),
            Err(e) => {
                eprintln!("  B={try_b} does not fit: {e:#}");
                fail = Some(try_b);
            }
        }
        try_b = match (ok, fail) {
            (Some(o), None) if o >= limit => break,
            (Some(o), None) => (o * 2).min(limit),
            (None, Some(f)) if f <= 1 => break,
            (None, Some(f)) => f / 2,
            (Some(o), Some(f)) if f - o <= (o / 8).max(1) => break,
            (Some(o), Some(f)) => o + (f - o) / 2,
            (None, None) => unreachable!("one run was made"),
        };
    }
    let mut row = best.ok_or_else(|| anyhow!("--find-max-batch: not even B=1 fits for {algo}"))?;
    row.mode = "max-batch";
    eprintln!("largest batch that fits for {algo}: {} (limit {limit})", row.batch);
    Ok(row)
}

pub(crate) fn online(b: &Bench, c: &Cli, algo: &str, o: &OnlineArgs) -> Result<Row> {
    let (r, rate, range, n) = (o.requests, o.rate, o.prompt_range, o.new_tokens);
    eprintln!(
        "online {algo}: {r} requests at {rate} req/s, prompts {}:{}, {n} new tokens",
        range.0, range.1
    );
    let (eng, bytes) = engine(b, c, algo, o.max_running, range.1 + n)?;
    let dev = eng.model().device().clone();
    let vocab = b.model.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut at = 0.0;
    let plan: Vec<(f64, Vec<u32>)> = (0..r)
        .map(|_| {
            at += -(1.0 - rng.random::<f64>()).ln() / rate;
            let len = rng.random_range(range.0..=range.1);
            (at, random_prompt(&mut rng, len, vocab))
        })
        .collect();
    let client = eng.spawn()?;
    let t0 = Instant::now();
    let driver = {
        let client = client.clone();
        std::thread::spawn(move || -> spinkv::Result<Vec<_>> {
            let mut handles = Vec::with_capacity(plan.len());
            for (at, prompt) in plan {
                let wait = Duration::from_secs_f64(at).saturating_sub(t0.elapsed());
                std::thread::sleep(wait);
                handles.push(client.submit(Request::tokens(prompt, n).with_ignore_eos(true))?);
            }
            Ok(handles)
        })
    };
    let handles = driver.join().map_err(|_| anyhow!("the driver thread panicked"))??;
    let mut done = Vec::with_capacity(r);
    let mut peak = device_memory_used(&dev);
    for (i, h) in handles.into_iter().enumerate() {
        done.push(h.wait());
        peak = peak.max(device_memory_used(&dev));
        if (i + 1) % (r / 10).max(1) == 0 {
            eprintln!("  {}/{r} done ({:.1}s)", i + 1, t0.elapsed().as_secs_f64());
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    if let Some(c) = done.iter().find(|c| matches!(c.finish_reason, FinishReason::Error(_))) {
        bail!("online {algo}: request {:?} failed: {}", c.id, c.finish_reason);
    }
    let eng = client.shutdown()?;
    print_tier_stats(&eng);
    let mut row = Row::new(
        "online",
        algo,
        format!("{}:{}", range.0, range.1),
        n,
        &done,
        &eng.metrics(),
        peak,
        bytes,
    );
    row.req_s = r as f64 / wall;
    row.output_tps = done.iter().map(|c| c.tokens.len()).sum::<usize>() as f64 / wall;
    Ok(row)
}

pub(crate) fn accuracy(b: &Bench, c: &Cli, algo: &str, a: &AccuracyArgs) -> Result<Row> {
    let tok = b
        .tokenizer
        .as_ref()
        .context("accuracy needs a real model with a tokenizer (--model), not --random-weights")?;
    let ctx = a.context;
    let mut keys = KeyGen::new(c.seed);
    let mut prompts = Vec::new();
    for &depth in &a.depths {
        for _ in 0..a.trials {
            let key = keys.next_key();
            prompts.push((key, build_prompt(tok, ctx, depth, key)?.0));
        }
    }
    let reqs = prompts
        .iter()
        .map(|(_, p)| Request::tokens(p.clone(), a.new_tokens))
        .collect();
    let (mut row, done) = run_batch(b, c, algo, reqs, "accuracy", ctx.to_string())?;
    let mut correct = 0;
    for (d, (key, _)) in done.iter().zip(&prompts) {
        correct += is_correct(&d.text, *key) as usize;
        eprintln!("  key {key} -> {:?}", d.text.trim());
    }
    row.accuracy = Some(correct as f64 / prompts.len() as f64);
    Ok(row)
}
