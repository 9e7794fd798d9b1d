//! [`FanOut`]: several caches driven with the same inputs (teacher forcing). Every call
//! goes to each cache in turn; `attend` returns the first cache's output, so a model
//! driven through a fan-out follows its first cache while the others see exactly the
//! same queries, keys and values (e.g. the sparse algorithms' selections measured on a
//! dense run's states). An optional tap sees each layer's inputs first.

use super::{PoolUsage, SelectionRecord, SeqId, SparseKvCache, StepInput, StepStats};
use crate::{CacheConfig, Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// What a tap receives: the layer, then its `q` `[T, Hq, D]`, `k` and `v` `[T, Hkv, D]`.
pub type AttendTap<'a> = Box<dyn FnMut(usize, &Tensor, &Tensor, &Tensor) + Send + 'a>;

/// Caches driven together: the first one leads (its outputs, statistics and lengths are
/// returned), the others follow. Sequence ids are the first cache's; each maps to one
/// id per cache.
pub struct FanOut<'a> {
    caches: Vec<&'a mut dyn SparseKvCache>,
    ids: HashMap<SeqId, Vec<SeqId>>,
    tap: Option<AttendTap<'a>>,
}

impl<'a> FanOut<'a> {
    /// A fan-out over `caches` (at least one).
    pub fn new(caches: Vec<&'a mut dyn SparseKvCache>) -> Result<Self> {
        if caches.is_empty() {
            return Err(Error::Config("FanOut::new: needs at least one cache".into()));
        }
        Ok(Self {
            caches,
            ids: HashMap::new(),
            tap: None,
        })
    }

    /// Calls `tap` with every `attend`'s inputs before the caches see them.
    pub fn set_tap(&mut self, tap: Option<AttendTap<'a>>) {
        self.tap = tap;
    }

    /// The ids of the lead's sequence `seq` in every cache, in cache order.
    pub fn ids(&self, seq: SeqId) -> Result<&[SeqId]> {
        self.ids
            .get(&seq)
            .map(Vec::as_slice)
            .ok_or(Error::UnknownSequence(seq.id()))
    }
}

impl SparseKvCache for FanOut<'_> {
    fn config(&self) -> &CacheConfig {
        self.caches[0].config()
    }

    fn algorithm_name(&self) -> String {
        let names: Vec<String> = self.caches.iter().map(|c| c.algorithm_name()).collect();
        names.join(" + ")
    }

    fn add_sequence(&mut self) -> Result<SeqId> {
        let mut ids = Vec::with_capacity(self.caches.len());
        for c in self.caches.iter_mut() {
            match c.add_sequence() {
                Ok(id) => ids.push(id),
                Err(e) => {
                    // Leave no half-added sequence behind.
                    for (c, id) in self.caches.iter_mut().zip(ids) {
                        let _ = c.remove_sequence(id);
                    }
                    return Err(e);
                }
            }
        }
        self.ids.insert(ids[0], ids.clone());
        Ok(ids[0])
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        let ids = self.ids(seq)?.to_vec();
        self.caches
            .iter_mut()
            .zip(ids)
            .try_for_each(|(c, s)| c.remove_sequence(s))?;
        self.ids.remove(&seq);
        Ok(())
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize> {
        self.caches[0].sequence_len(seq)
    }

    /// Reserves in each cache in turn. Not all or nothing across the caches: when a later
    /// cache refuses, the earlier ones keep their pages (freed with the sequence).
    fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        let ids = self.ids(seq)?.to_vec();
        self.caches
            .iter_mut()
            .zip(ids)
            .try_for_each(|(c, s)| c.reserve(s, tokens))
    }

    fn begin_step(&mut self, inputs: &[StepInput]) -> Result<()> {
        for i in 0..self.caches.len() {
            let mine = inputs
                .iter()
                .map(|x| {
                    Ok(StepInput {
                        seq: self.ids(x.seq)?[i],
                        new_tokens: x.new_tokens,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if let Err(e) = self.caches[i].begin_step(&mine) {
                // The caches that began already go back to no open step.
                for c in self.caches[..i].iter_mut() {
                    let _ = c.abort_step();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if let Some(tap) = self.tap.as_mut() {
            tap(layer, q, k, v);
        }
        let mut out = None;
        for c in self.caches.iter_mut() {
            let o = c.attend(layer, q, k, v)?;
            out.get_or_insert(o);
        }
        out.ok_or_else(|| Error::Config("FanOut: no cache".into()))
    }

    fn end_step(&mut self) -> Result<StepStats> {
        let stats = self
            .caches
            .iter_mut()
            .map(|c| c.end_step())
            .collect::<Result<Vec<_>>>()?;
        Ok(stats[0])
    }

    fn abort_step(&mut self) -> Result<()> {
        self.caches.iter_mut().try_for_each(|c| c.abort_step())
    }

    fn stats(&self) -> StepStats {
        self.caches[0].stats()
    }

    fn pool_usage(&self) -> PoolUsage {
        self.caches[0].pool_usage()
    }

    /// Records the first cache's selections (the one whose output and stats the fan-out
    /// reports).
    fn record_selections(&mut self, on: bool) -> Result<()> {
        self.caches[0].record_selections(on)
    }

    fn take_selections(&mut self) -> Vec<SelectionRecord> {
        self.caches[0].take_selections()
    }
}
