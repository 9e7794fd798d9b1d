//! The step lifecycle: [`SparseKvCache`] for [`SpinCache`] — sequences in and out,
//! `begin_step` (lengths, pages, device tables), `attend`, `end_step` and `abort_step` —
//! and where a sequence's pages sit ([`SpinCache::page_slots`]).

use super::*;

impl SparseKvCache for SpinCache {
    fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn algorithm_name(&self) -> String {
        self.algo.name()
    }

    fn add_sequence(&mut self) -> Result<SeqId> {
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::add_sequence",
                msg: "cannot add a sequence inside a step".into(),
            });
        }
        let Some(&owner) = self.free_owners.last() else {
            return Err(Error::Invalid {
                op: "SparseKvCache::add_sequence",
                msg: format!(
                    "{} sequences are live, the configured maximum (CacheConfig::max_sequences): remove one first",
                    self.cfg.max_sequences
                ),
            });
        };
        let id = self.next_seq;
        self.device_tables.add_sequence(id)?;
        self.free_owners.pop();
        self.next_seq += 1;
        self.tables.add_sequence(id);
        self.lens.insert(id, 0);
        self.owners.insert(id, owner);
        Ok(SeqId { cache: self.id, id })
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::remove_sequence",
                msg: "cannot remove a sequence inside a step (end or abort it first)".into(),
            });
        }
        let id = self.live("SparseKvCache::remove_sequence", seq)?;
        // The fallible device work first: dropping the pages' fast copies (harmless if the
        // removal then stopped: they are copies). The device page tables are brought in
        // step by the next `begin_step` (their change log keeps the removal).
        let mut slots = Vec::new();
        for dir in 0..self.dirs() {
            self.tables.extend_slots(id, dir, &mut slots)?;
        }
        self.lru.invalidate(&slots)?;
        // Host bookkeeping only from here.
        self.device_tables.remove_sequence(id)?;
        let slots = self.tables.remove_sequence(id)?;
        for slot in slots {
            self.host_alloc.free(slot)?;
        }
        if let Some(owner) = self.owners.remove(&id) {
            self.free_owners.push(owner);
        }
        self.lens.remove(&id);
        self.algo.forget(id);
        self.budgets.remove(id);
        Ok(())
    }

    fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        const OP: &str = "SparseKvCache::reserve";
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: OP,
                msg: "cannot reserve pages inside a step (end or abort it first)".into(),
            });
        }
        let id = self.live(OP, seq)?;
        if tokens > self.cfg.max_seq_len {
            crate::invalid!(
                OP,
                "{tokens} tokens for sequence {id}: more than max_seq_len {}",
                self.cfg.max_seq_len
            );
        }
        let new = tokens
            .div_ceil(self.cfg.page_size)
            .saturating_sub(self.tables.num_pages(id)?);
        self.check_room(new * self.dirs())?;
        self.push_pages(id, new)
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize> {
        let id = self.live("SparseKvCache::sequence_len", seq)?;
        Ok(self.lens[&id])
    }

    fn begin_step(&mut self, inputs: &[StepInput]) -> Result<()> {
        const OP: &str = "SparseKvCache::begin_step";
        let (entries, row) = self.step_entries(OP, inputs)?;
        // The step's uploads come first: they depend on the entries only, and failing
        // here changes nothing.
        crate::fault::device_call(OP)?;
        let mut positions = Vec::with_capacity(row);
        let mut queries = Vec::with_capacity(2 * row);
        for (ei, e) in entries.iter().enumerate() {
            for i in 0..e.n {
                positions.push((e.start + i) as u32);
                queries.push(ei as u32);
                queries.push((e.start + i) as u32);
            }
        }
        let (cos, sin) = rope_tables(
            &positions,
            self.cfg.head_dim,
            self.cfg.rope_theta,
            self.cfg.dtype,
            &self.cfg.device,
        )?;
        let prefill = self.prefill_plan(&entries, &queries)?;
        let queries = Tensor::from_vec(queries, (row, 2), &self.cfg.device)?;
        let kv_limit: Vec<u32> = entries
            .iter()
            .map(|e| if e.n == 1 { (e.start + 1) as u32 } else { e.start as u32 })
            .collect();
        let n_entries = entries.len();
        let kv_limit = Tensor::from_vec(kv_limit, n_entries, &self.cfg.device)?;
        self.lru.set_step(self.step_number())?;
        let plan = self.reserve_and_plan(&entries, false, |c, en| c.step_plan(en, row))?;
        let stats = StepStats {
            steps: 1,
            ..Default::default()
        };
        self.step = Some(StepState {
            entries,
            total: row,
            cos,
            sin,
            queries,
            kv_limit,
            attended: vec![false; self.cfg.num_layers],
            attended_pages: None,
            plan,
            requested: vec![false; n_entries],
            stats,
            failed: None,
            padded: None,
            rounds: 0,
            requests: 0,
            prefill,
            padded_prep: None,
        });
        Ok(())
    }

    fn padded_shape(&self, inputs: &[StepInput]) -> Option<PaddedShape> {
        self.padded_shape_of(inputs)
    }

    fn begin_padded_decode_with(&mut self, inputs: &[StepInput], shape: PaddedShape, extra: &[u32]) -> Result<Tensor> {
        let _span = crate::host_timing::span("padded.begin");
        self.begin_padded(inputs, shape, extra)
    }

    fn prepare_padded_step(&mut self) -> Result<()> {
        self.prepare_open_padded()
    }

    fn padded_step_replayed(&mut self) -> Result<()> {
        self.mark_replayed()
    }

    fn graph_epoch(&self) -> u64 {
        self.lru.epoch()
    }

    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        const OP: &str = "SparseKvCache::attend";
        let mut step = self.step.take().ok_or_else(|| Error::StepMisuse {
            op: OP,
            msg: "no open step: call begin_step first".into(),
        })?;
        let result = match &step.failed {
            Some(why) => Err(Error::StepMisuse {
                op: OP,
                msg: format!("the step is poisoned ({why}): call abort_step, then run the step again"),
            }),
            // Invalid input changes nothing: the step stays usable.
            None => match self.check_qkv(&step, layer, q, k, v) {
                Err(e) => Err(e),
                Ok(()) => {
                    let r = self.attend_in_step(&mut step, layer, q, k, v);
                    if let Err(e) = &r {
                        step.failed = Some(format!("attend of layer {layer} failed: {e}"));
                    }
                    r
                }
            },
        };
        self.step = Some(step);
        result
    }

    fn end_step(&mut self) -> Result<StepStats> {
        let step = self.step.as_ref().ok_or_else(|| Error::StepMisuse {
            op: "SparseKvCache::end_step",
            msg: "no open step".into(),
        })?;
        if let Some(why) = &step.failed {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::end_step",
                msg: format!("the step is poisoned ({why}): call abort_step, then run the step again"),
            });
        }
        if let Some(l) = step.attended.iter().position(|a| !a) {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::end_step",
                msg: format!("layer {l} was not attended in this step (attend every layer, or abort_step)"),
            });
        }
        let mut stats = step.stats;
        let span = crate::host_timing::span("end_step.counters");
        if let Some(n) = &step.attended_pages {
            stats.pages_attended += n.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as u64;
        }
        if self.device_rebuilds {
            // Pages rebuilt on the device: attended, outside the tiers' counters.
            let n: f64 = self.rebuilt_counts.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum();
            self.rebuilt_counts.zero_set()?;
            stats.rebuilt_pages += n as u64;
            stats.pages_attended += n as u64;
        }
        let (reuse, [hits, misses, spilled]) = self.lru.take_step_counters()?;
        drop(span);
        let span = crate::host_timing::span("end_step.budgets");
        if step.padded.is_some() {
            // Every request of a padded step's rounds is a decode page it attends, and
            // the LRU resolves each one exactly once: a hit, a miss or a spill.
            stats.pages_attended += hits + misses + spilled;
        }
        stats.hits += hits;
        stats.misses += misses;
        stats.spilled += spilled;
        stats.bytes_moved += (misses + spilled) * self.cfg.page_bytes() as u64;
        // The next budgets are computed aside and committed once uploaded: on an error
        // the step stays open (end_step or abort_step may follow; the counters of the
        // failed attempt are lost to the statistics, nothing else). A direct-mapped fast
        // tier has no replacement for budgets to steer: none are kept.
        if !self.lru.is_direct() {
            let mut budgets = self.budgets.clone();
            for (e, _) in step.entries.iter().zip(&step.requested).filter(|(_, &r)| r) {
                let owner = self.owners.get(&e.seq).copied().unwrap_or(0) as usize;
                budgets.observe_count(e.seq, reuse.get(owner).copied().unwrap_or(0) as usize);
            }
            budgets.end_step();
            let b = self.budget_vector(&budgets);
            self.lru.set_budgets(&b)?;
            self.budgets = budgets;
        }
        drop(span);
        let _span = crate::host_timing::span("end_step.commit");
        if let Some(step) = self.step.take() {
            self.record_padded_rounds(&step);
        }
        self.algo.commit();
        self.total.add(&stats);
        Ok(stats)
    }

    fn abort_step(&mut self) -> Result<()> {
        let step = self.step.as_ref().ok_or_else(|| Error::StepMisuse {
            op: "SparseKvCache::abort_step",
            msg: "no open step".into(),
        })?;
        let entries = step.entries.clone();
        // A failed attend after an LRU round may have left pages tagged resident whose
        // fetch never ran: the fast tier is then emptied (pages are fetched again).
        let suspect = step.failed.is_some() && step.rounds > 0;
        // The fallible device work first, all of it safe to repeat: on an error the step
        // stays open (poisoned: only abort_step may follow), nothing else changed, and
        // abort_step can be called again.
        if let Err(e) = self.abort_device_work(&entries, suspect) {
            if let Some(st) = self.step.as_mut() {
                st.failed.get_or_insert_with(|| format!("abort_step failed: {e}"));
            }
            return Err(e);
        }
        // Host bookkeeping only from here. The device page tables are brought in step by
        // the next `begin_step` (their change log keeps the freed pages).
        for e in &entries {
            self.unreserve(e)?;
            self.algo.truncate(e.seq, e.start);
        }
        let step_no = self.total.steps + 1;
        if let Some(tr) = self.trace.as_mut() {
            tr.retain(|r| r.step != step_no);
        }
        self.step = None;
        Ok(())
    }

    fn stats(&self) -> StepStats {
        self.total
    }

    fn record_selections(&mut self, on: bool) -> Result<()> {
        self.set_trace(on);
        Ok(())
    }

    fn take_selections(&mut self) -> Vec<SelectionRecord> {
        self.take_trace()
    }

    fn pool_usage(&self) -> PoolUsage {
        let homed = self.host_alloc.preferred_used();
        PoolUsage {
            host_used: self.host_alloc.used_count() - homed,
            host_capacity: self.host_alloc.usable(false),
            fast_resident: if self.lru.is_direct() {
                self.host_alloc.used_count()
            } else {
                self.lru.resident_count().unwrap_or(0) + homed
            },
            fast_capacity: self.lru.fast_slots(),
            fast_home_used: homed,
            fast_home_capacity: self.host_alloc.usable(true),
            page_table_bytes: self.tables.bytes(),
        }
    }
}

impl SpinCache {
    /// The slots of `seq`'s pages of (`layer`, `kv_head`), in logical page order: each is
    /// the page's row in the host tier (and in a fast tier that holds every page). Where
    /// they sit follows [`CacheConfig::page_layout`].
    pub fn page_slots(&self, seq: SeqId, layer: usize, kv_head: usize) -> Result<Vec<u32>> {
        const OP: &str = "SpinCache::page_slots";
        let id = self.live(OP, seq)?;
        let (layers, hkv) = (self.cfg.num_layers, self.cfg.num_kv_heads);
        if layer >= layers || kv_head >= hkv {
            crate::invalid!(
                OP,
                "(layer {layer}, KV head {kv_head}) is outside the cache's {layers} layers × {hkv} KV heads"
            );
        }
        let mut slots = Vec::new();
        self.tables.extend_slots(id, layer * hkv + kv_head, &mut slots)?;
        Ok(slots)
    }
}
