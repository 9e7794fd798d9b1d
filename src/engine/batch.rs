//! One engine step's batch: the items of the scheduler's plan run through the padded
//! decode path ([`DecodeRunner`](super::decode), which samples on the device itself) or
//! [`Llama::forward`](crate::models::Llama::forward) (per item again when the batch
//! fails), then sampled in one call, and streamed.

use super::decode::{DecodeMode, Decoded};
use super::engine::{Engine, StepReport};
use super::handle::FinishReason;
use super::request::RequestId;
use super::sampler::{sample_batch, RequestSampler};
use super::scheduler::{StepPlan, Work};
use crate::{Result, SeqId};
use candle_core::Tensor;

impl Engine {
    /// Runs the batch of `plan` (items of requests still active), samples and streams.
    pub(super) fn run_plan(&mut self, plan: &StepPlan, report: &mut StepReport) -> Result<()> {
        // (request index in `active`, seq, tokens, whether it samples)
        let mut items: Vec<(RequestId, SeqId, Vec<u32>, bool)> = Vec::with_capacity(plan.items.len());
        for s in &plan.items {
            let Some(a) = self.active.iter().find(|a| a.id == s.id) else {
                continue;
            };
            let Some(seq) = a.seq else { continue };
            let (toks, samples) = match s.work {
                Work::Prefill { start, len, last } => (a.req.prompt[start..start + len].to_vec(), last),
                Work::Decode => match a.tokens.last() {
                    Some(&t) => (vec![t], true),
                    None => continue,
                },
            };
            match s.work {
                Work::Prefill { len, .. } => report.prefill_tokens += len,
                Work::Decode => report.decodes += 1,
            }
            items.push((s.id, seq, toks, samples));
        }
        if items.is_empty() {
            return Ok(());
        }
        if let Some(tokens) = self.forward_decode(&items)? {
            // Padded decode: every item sampled on the device, in item order.
            let _span = crate::host_timing::span("engine.stream");
            for ((id, ..), tok) in items.iter().zip(tokens) {
                if let Some(a) = self.active.iter_mut().find(|a| a.id == *id) {
                    a.sampler.advance();
                }
                report.sampled += 1;
                self.on_token(*id, tok, report)?;
            }
            return Ok(());
        }
        let (logits, ok) = self.forward(&items, report)?;
        let Some(logits) = logits else { return Ok(()) };
        // Rows of `logits` follow `ok`; collect the samplers in `active` order.
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        for a in &self.active {
            if let Some(row) = ok.iter().position(|&(id, samples)| samples && id == a.id) {
                rows.push(row);
                ids.push(a.id);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let mut samplers: Vec<&mut RequestSampler> = self
            .active
            .iter_mut()
            .filter(|a| ids.contains(&a.id))
            .map(|a| &mut a.sampler)
            .collect();
        let span = crate::host_timing::span("engine.sample");
        let sampled = sample_batch(&logits, &rows, &mut samplers);
        drop(span);
        let _span = crate::host_timing::span("engine.stream");
        match sampled {
            Ok(tokens) => {
                for (id, tok) in ids.into_iter().zip(tokens) {
                    report.sampled += 1;
                    self.on_token(id, tok, report)?;
                }
            }
            Err(e) => {
                for id in ids {
                    self.finish(id, FinishReason::Error(format!("sampling: {e}")), report)?;
                }
            }
        }
        Ok(())
    }

    /// One forward over the batch; if it fails, each item alone, so that only the
    /// failing requests end with an error. Returns the logits of the items that ran
    /// (`[n, V]`) and their (id, samples) in row order.
    #[allow(clippy::type_complexity)]
    fn forward(
        &mut self,
        items: &[(RequestId, SeqId, Vec<u32>, bool)],
        report: &mut StepReport,
    ) -> Result<(Option<Tensor>, Vec<(RequestId, bool)>)> {
        let batch: Vec<(SeqId, &[u32])> = items.iter().map(|(_, s, t, _)| (*s, t.as_slice())).collect();
        let first = self.model.forward(self.cache.as_mut(), &batch);
        let err = match first {
            Ok(l) => return Ok((Some(l), items.iter().map(|i| (i.0, i.3)).collect())),
            Err(e) => e,
        };
        if items.len() == 1 {
            self.finish(items[0].0, FinishReason::Error(err.to_string()), report)?;
            return Ok((None, Vec::new()));
        }
        let (mut rows, mut ok) = (Vec::new(), Vec::new());
        for (id, seq, toks, samples) in items {
            match self.model.forward(self.cache.as_mut(), &[(*seq, toks.as_slice())]) {
                Ok(l) => {
                    rows.push(l);
                    ok.push((*id, *samples));
                }
                Err(e) => self.finish(*id, FinishReason::Error(e.to_string()), report)?,
            }
        }
        if rows.is_empty() {
            return Ok((None, ok));
        }
        Ok((Some(Tensor::cat(&rows, 0)?), ok))
    }

    /// A one-token-per-sequence batch through the padded decode path, sampled on the
    /// device: the tokens, in item order; `None` when the step must run eagerly (other batches, eager mode, no padded shape, or a padded
    /// step that failed: its error is kept in `last_decode_error` and the cache step was
    /// aborted, so the eager path runs it again from the same state). `Err` when a
    /// failed padded step could not even be aborted (the cache can no longer be trusted).
    fn forward_decode(&mut self, items: &[(RequestId, SeqId, Vec<u32>, bool)]) -> Result<Option<Vec<u32>>> {
        if items.iter().any(|(_, _, t, samples)| t.len() != 1 || !samples) {
            return Ok(None);
        }
        let mut toks = Vec::with_capacity(items.len());
        for (id, seq, t, _) in items {
            let Some(a) = self.active.iter().find(|a| a.id == *id) else {
                return Ok(None);
            };
            toks.push((*seq, t[0], a.sampler.row()));
        }
        Ok(match self.decoder.forward(&self.model, self.cache.as_mut(), &toks)? {
            Decoded::Sampled(ids) => Some(ids),
            Decoded::Eager => None,
            Decoded::Failed(e) => {
                self.decoder.counters.errors += 1;
                self.last_decode_error = Some(e.to_string());
                None
            }
        })
    }

    /// The decode mode in force ([`DecodeMode::Auto`] resolved to `Graphs` or `Eager`).
    pub fn decode_mode(&self) -> DecodeMode {
        self.decoder.mode()
    }

    /// The decode path's counters so far (also in [`metrics`](Self::metrics), which
    /// gathers the cache's too; this reads only these).
    pub fn decode_counters(&self) -> super::DecodeCounters {
        self.decoder.counters
    }

    /// The last error of the padded decode path, if any (that step ran eagerly).
    pub fn last_decode_error(&self) -> Option<&str> {
        self.last_decode_error.as_deref()
    }
}
