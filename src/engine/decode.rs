//! Decode-only steps without per-step host work on the device path: [`DecodeMode`] and
//! the runner that pads a decode batch to a [`PaddedShape`], hands its token ids and
//! sampling rows to the cache's padded step (staged with the step's own inputs and copied
//! in one host-to-device copy at the step's preparation, the first device work of the
//! step and so part of a captured graph: [`SparseKvCache::begin_padded_decode_with`],
//! [`SparseKvCache::prepare_padded_step`]), and runs the whole
//! model's step ([`Llama::forward_padded`]) and the sampling of every row
//! ([`sample_rows_into`]) eagerly, or on CUDA as a captured graph: only the `[B]` sampled ids
//! come back to the host. The first step
//! of a shape warms candle's capture caches, the second is captured, later ones replay
//! it (recaptured when the cache's [`graph_epoch`](SparseKvCache::graph_epoch) moves).
//! A step whose shape has no graph yet replays the smallest captured larger batch of the
//! same pages instead, for up to [`BORROW_STEPS`] steps, so that a batch shrinking as
//! requests finish costs no warm-up or capture.
//! Prefill and mixed steps stay eager ([`Llama::forward`]).

use crate::models::Llama;
use crate::ops::{sample_rows_into, SampleRow, StepGraph, SAMPLE_PARAM_WORDS};
use crate::{Error, PaddedShape, Result, SeqId, SparseKvCache, StepInput};
use candle_core::{DType, Tensor};
use std::collections::{HashMap, HashSet};

/// How the engine runs decode-only steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeMode {
    /// CUDA graphs where the device and the cache allow them, else eager (default).
    #[default]
    Auto,
    /// Always the ragged eager step ([`Llama::forward`]), as prefill.
    Eager,
    /// Padded steps run eagerly (the graphs' exact device work, without capture: the same
    /// shapes, including a larger batch's where `Graphs` would replay its graph): for
    /// comparisons and for checking the padded path on any device.
    Padded,
    /// Padded steps replayed as CUDA graphs; an error on devices without graphs.
    Graphs,
}

/// What [`DecodeRunner::forward`] did with a decode step.
pub(crate) enum Decoded {
    /// The step ran padded: the token sampled for each sequence, in batch order.
    Sampled(Vec<u32>),
    /// The step must run on the ragged eager path (nothing was done).
    Eager,
    /// The padded step failed and was aborted (the cache is as before it): run it eagerly.
    Failed(Error),
}

/// Steps a padded shape without a graph replays a larger batch's graph before it gets
/// its own.
const BORROW_STEPS: u32 = 8;

/// Counters of the decode runner (see [`EngineMetrics`](super::EngineMetrics)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeCounters {
    /// Decode steps run padded, eagerly (warm-ups included).
    pub padded_eager: u64,
    /// Graphs captured.
    pub captures: u64,
    /// Steps replayed from a graph.
    pub replays: u64,
    /// Decode steps the runner handed back to the ragged eager path (no padded shape).
    pub fallbacks: u64,
    /// Decode steps that failed on the padded path and ran again eagerly (a failed
    /// capture; see the engine's log of the last error).
    pub errors: u64,
    /// Host time of the replayed steps, from the start of the step to the graph's
    /// launch returning (begin_padded_decode, the inputs' writes, the launch), in
    /// microseconds, summed: the per-step host overhead the graph leaves (the step's
    /// end, which waits for the device to read its counters, is not included).
    pub replay_host_us: u64,
    /// The part of `replay_host_us` spent in the cache's `begin_padded_decode` (the
    /// step's host bookkeeping and the staging of its words; their copy to the device and
    /// expansion run in the graph), microseconds, summed.
    pub replay_begin_us: u64,
    /// The part of `replay_host_us` spent writing the token ids and launching the graph,
    /// microseconds, summed.
    pub replay_launch_us: u64,
}

struct Captured {
    // Field order is drop order: the graph goes before the memory it allocated.
    graph: StepGraph,
    /// The capture's output `[B]` u32: holds each replay's sampled ids.
    sampled: Tensor,

    epoch: u64,
}

/// Runs decode-only steps padded (see the module docs).
pub(crate) struct DecodeRunner {
    mode: DecodeMode,
    /// Per padded batch size: the `[B]` u32 sampled ids, allocated before any capture (a
    /// capture that allocated its output itself, 16 bytes kept alive across replays,
    /// replayed right but failed under `compute-sanitizer --tool memcheck`: the first
    /// kernel's writes were reported out of bounds and the process died). The inputs (the
    /// token ids `[B]` then the sampling rows `[B, 6]`, [`SampleRow::words`]) live in the
    /// cache's buffers of the shape.
    sampled: HashMap<usize, Tensor>,
    warmed: HashSet<PaddedShape>,
    graphs: HashMap<PaddedShape, Captured>,
    /// Shapes whose capture failed: they run padded and eager from then on.
    uncapturable: HashSet<PaddedShape>,
    /// Steps of each needed shape that replayed a larger captured batch instead.
    borrowed: HashMap<PaddedShape, u32>,
    /// `Padded` mode: the shapes `Graphs` would hold a graph of, and its epoch, so that
    /// padded steps borrow larger shapes exactly as replays do.
    shadow: HashMap<PaddedShape, u64>,
    pub counters: DecodeCounters,
}

impl DecodeRunner {
    /// A runner for `mode` on `model`'s device; `Graphs` fails where graphs cannot run.
    pub fn new(mode: DecodeMode, model: &Llama) -> Result<Self> {
        let graphs_ok = StepGraph::supported(model.device());
        let mode = match mode {
            DecodeMode::Auto if graphs_ok => DecodeMode::Graphs,
            DecodeMode::Auto => DecodeMode::Eager,
            DecodeMode::Graphs if !graphs_ok => {
                return Err(Error::Config(format!(
                    "DecodeMode::Graphs needs a CUDA device and the `cuda` feature; the model is on {:?}",
                    model.device().location()
                )))
            }
            m => m,
        };
        Ok(Self {
            mode,
            sampled: HashMap::new(),
            warmed: HashSet::new(),
            graphs: HashMap::new(),
            uncapturable: HashSet::new(),
            borrowed: HashMap::new(),
            shadow: HashMap::new(),
            counters: DecodeCounters::default(),
        })
    }

    /// The mode in force (`Auto` resolved).
    pub fn mode(&self) -> DecodeMode {
        self.mode
    }

    /// One decode step of `batch` (one token per sequence, and how its next token is
    /// sampled) through the padded path: the sampled tokens, [`Decoded::Eager`] when this step must take the ragged eager
    /// path (eager mode, or no padded shape), or [`Decoded::Failed`] when the padded
    /// step failed and the cache was restored (the step aborted): the caller runs it
    /// eagerly. `Err` only when the failed step could not be aborted either.
    pub fn forward(
        &mut self,
        model: &Llama,
        cache: &mut dyn SparseKvCache,
        batch: &[(SeqId, u32, SampleRow)],
    ) -> Result<Decoded> {
        if self.mode == DecodeMode::Eager {
            return Ok(Decoded::Eager);
        }
        let inputs: Vec<StepInput> = batch
            .iter()
            .map(|&(seq, ..)| StepInput { seq, new_tokens: 1 })
            .collect();
        let Some(need) = cache.padded_shape(&inputs) else {
            self.counters.fallbacks += 1;
            return Ok(Decoded::Eager);
        };
        if let Err(e) = model.check_token_ids("Engine::step", batch.iter().map(|&(_, t, _)| t)) {
            return Ok(Decoded::Failed(e));
        }
        let t0 = std::time::Instant::now();
        let shape = self.choose(need, cache.graph_epoch());
        let b = shape.batch;
        let mut words = vec![0u32; b * (1 + SAMPLE_PARAM_WORDS)];
        for (r, &(_, tok, row)) in batch.iter().enumerate() {
            words[r] = tok;
            words[b + r * SAMPLE_PARAM_WORDS..][..SAMPLE_PARAM_WORDS].copy_from_slice(&row.words());
        }
        // A failed begin changes nothing.
        let inputs_dev = match cache.begin_padded_decode_with(&inputs, shape, &words) {
            Ok(t) => t,
            Err(e) => return Ok(Decoded::Failed(e)),
        };
        let (replays, t1) = (self.counters.replays, std::time::Instant::now());
        let ran = self.run(model, cache, shape, &inputs_dev);
        if self.counters.replays > replays {
            let (c, host) = (&mut self.counters, t0.elapsed());
            c.replay_host_us += host.as_micros() as u64;
            c.replay_begin_us += (t1 - t0).as_micros() as u64;
            c.replay_launch_us += t1.elapsed().as_micros() as u64;
            crate::host_timing::record("decode.replay_host", host);
        }
        let span = crate::host_timing::span("decode.end_step");
        let done = ran
            .and_then(|ids| Ok(ids.narrow(0, 0, batch.len())?.to_vec1::<u32>()?))
            .and_then(|ids| cache.end_step().map(|_| ids));
        drop(span);
        match done {
            Ok(ids) => Ok(Decoded::Sampled(ids)),
            Err(e) => {
                // The step (or its end) failed: give its pages back; if even that
                // fails, the cache needs the caller's attention.
                cache.abort_step()?;
                Ok(Decoded::Failed(e))
            }
        }
    }

    /// The shape to run a step needing `need` at: a captured graph of a larger batch
    /// (same pages) is replayed instead of warming up and capturing `need`, until `need`
    /// has borrowed one [`BORROW_STEPS`] times (a batch that shrinks for a step or two,
    /// as requests finish, then costs no capture).
    fn choose(&mut self, need: PaddedShape, epoch: u64) -> PaddedShape {
        let held: HashMap<PaddedShape, u64> = match self.mode {
            DecodeMode::Graphs => self.graphs.iter().map(|(s, c)| (*s, c.epoch)).collect(),
            DecodeMode::Padded => self.shadow.clone(),
            _ => return need,
        };
        if held.get(&need) == Some(&epoch) {
            return need;
        }
        let larger = held
            .iter()
            .filter(|(s, e)| s.pages == need.pages && s.batch > need.batch && **e == epoch)
            .map(|(s, _)| *s)
            .min_by_key(|s| s.batch);
        match larger {
            Some(s) => {
                let n = self.borrowed.entry(need).or_insert(0);
                *n += 1;
                if *n > BORROW_STEPS {
                    need
                } else {
                    s
                }
            }
            None => need,
        }
    }

    /// Runs the padded step of `shape` over `inputs` (its token ids `[B]` then its
    /// sampling rows `[B, 6]`, on the device) and samples every row; returns the `[B]`
    /// u32 sampled ids (padding rows sample greedily, and are ignored).
    fn run(
        &mut self,
        model: &Llama,
        cache: &mut dyn SparseKvCache,
        shape: PaddedShape,
        inputs: &Tensor,
    ) -> Result<Tensor> {
        let dev = model.device().clone();
        let b = shape.batch;
        let out = match self.sampled.get(&b) {
            Some(t) => t.clone(),
            None => {
                let t = Tensor::zeros(b, DType::U32, &dev)?;
                self.sampled.insert(b, t.clone());
                t
            }
        };
        let ids = inputs.narrow(0, 0, b)?;
        let params = inputs
            .narrow(0, b, b * SAMPLE_PARAM_WORDS)?
            .reshape((b, SAMPLE_PARAM_WORDS))?;
        let step = |cache: &mut dyn SparseKvCache| -> Result<Tensor> {
            // The staged words (the token ids among them) reach the device first: the
            // embedding reads them before the first attend would copy them.
            cache.prepare_padded_step()?;
            let logits = model.forward_padded(cache, &ids)?;
            sample_rows_into(&logits, &params, &out)?;
            Ok(out.clone())
        };
        if self.mode == DecodeMode::Padded {
            // What `Graphs` would hold after this step: a shape warmed once is captured
            // by its next step; graphs of an older epoch are dropped.
            let epoch = cache.graph_epoch();
            self.shadow.retain(|_, e| *e == epoch);
            if !self.warmed.insert(shape) {
                self.shadow.insert(shape, epoch);
            }
        }
        if self.mode == DecodeMode::Padded || self.uncapturable.contains(&shape) {
            self.counters.padded_eager += 1;
            return step(cache);
        }
        let epoch = cache.graph_epoch();
        // Graphs of an older epoch read replaced buffers: never replayed again.
        self.graphs.retain(|_, c| c.epoch == epoch);
        if let Some(c) = self.graphs.get(&shape) {
            let span = crate::host_timing::span("decode.launch");
            c.graph.launch()?;
            drop(span);
            cache.padded_step_replayed()?;
            self.counters.replays += 1;
            return Ok(c.sampled.clone());
        }
        if !self.warmed.contains(&shape) {
            self.counters.padded_eager += 1;
            let sampled = StepGraph::warm_up(&dev, || step(cache))?;
            self.warmed.insert(shape);
            return Ok(sampled);
        }
        // Missing: capture this step (nothing runs), then run it.
        let (graph, sampled) = match StepGraph::capture(&dev, || step(cache)) {
            Ok(c) => c,
            Err(e) => {
                // Nothing ran: the caller aborts the step and runs it eagerly.
                self.uncapturable.insert(shape);
                return Err(Error::Invalid {
                    op: "Engine::step",
                    msg: format!(
                        "capturing the decode step of shape {shape:?} failed ({e}); it runs eagerly from now on"
                    ),
                });
            }
        };
        graph.launch()?;
        self.counters.captures += 1;
        let epoch = cache.graph_epoch();
        self.graphs.insert(
            shape,
            Captured {
                graph,
                sampled: sampled.clone(),
                epoch,
            },
        );
        Ok(sampled)
    }
}
