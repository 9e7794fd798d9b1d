//! The step lifecycle: [`SparseKvCache`] for [`SpinCache`] — sequences in and out,
//! `begin_step` (lengths, pages, device tables), `attend`, `end_step` and `abort_step`.

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
        Ok(SeqId(id))
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::remove_sequence",
                msg: "cannot remove a sequence inside a step (end or abort it first)".into(),
            });
        }
        if !self.lens.contains_key(&seq.0) {
            return Err(Error::UnknownSequence(seq.0));
        }
        let slots = self.tables.remove_sequence(seq.0)?;
        self.lru.invalidate(&slots)?;
        for slot in slots {
            self.host_alloc.free(slot)?;
        }
        self.device_tables.apply(&mut self.tables)?;
        self.device_tables.remove_sequence(seq.0)?;
        if let Some(owner) = self.owners.remove(&seq.0) {
            self.free_owners.push(owner);
        }
        self.lens.remove(&seq.0);
        self.algo.forget(seq.0);
        self.budgets.remove(seq.0);
        Ok(())
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize> {
        self.lens.get(&seq.0).copied().ok_or(Error::UnknownSequence(seq.0))
    }

    fn begin_step(&mut self, inputs: &[StepInput]) -> Result<()> {
        const OP: &str = "SparseKvCache::begin_step";
        if self.step.is_some() {
            return Err(Error::StepMisuse {
                op: OP,
                msg: "a step is already open: call end_step or abort_step first".into(),
            });
        }
        if inputs.is_empty() {
            crate::invalid!(OP, "a step needs at least one sequence");
        }
        let p = self.cfg.page_size;
        let mut entries = Vec::with_capacity(inputs.len());
        let mut row = 0;
        let mut needed = 0;
        for (i, inp) in inputs.iter().enumerate() {
            let len = *self.lens.get(&inp.seq.0).ok_or(Error::UnknownSequence(inp.seq.0))?;
            if inputs[..i].iter().any(|o| o.seq == inp.seq) {
                crate::invalid!(OP, "sequence {} appears twice in one step", inp.seq.0);
            }
            if inp.new_tokens == 0 {
                crate::invalid!(OP, "sequence {} brings 0 new tokens (need >= 1)", inp.seq.0);
            }
            if len + inp.new_tokens > self.cfg.max_seq_len {
                crate::invalid!(
                    OP,
                    "sequence {} would hold {} tokens, more than max_seq_len {}",
                    inp.seq.0,
                    len + inp.new_tokens,
                    self.cfg.max_seq_len
                );
            }
            let new_pages = (len + inp.new_tokens).div_ceil(p) - len.div_ceil(p);
            needed += new_pages * self.dirs();
            entries.push(StepEntry {
                seq: inp.seq.0,
                start: len,
                n: inp.new_tokens,
                row,
                new_pages,
            });
            row += inp.new_tokens;
        }
        if needed > self.host_alloc.free_count() {
            return Err(Error::PoolExhausted {
                tier: Tier::Host,
                needed,
                free: self.host_alloc.free_count(),
            });
        }
        for e in &entries {
            for _ in 0..e.new_pages {
                let slots = self.host_alloc.alloc(self.dirs())?;
                self.tables.push_page(e.seq, &slots)?;
            }
            *self.lens.get_mut(&e.seq).ok_or(Error::UnknownSequence(e.seq))? += e.n;
        }
        self.device_tables.apply(&mut self.tables)?;
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
        let queries = Tensor::from_vec(queries, (row, 2), &self.cfg.device)?;
        let kv_limit: Vec<u32> = entries
            .iter()
            .map(|e| if e.n == 1 { (e.start + 1) as u32 } else { e.start as u32 })
            .collect();
        let n_entries = entries.len();
        let kv_limit = Tensor::from_vec(kv_limit, n_entries, &self.cfg.device)?;
        let plan = self.step_plan(&entries, row)?;
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
        });
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut step = self.step.take().ok_or(Error::StepMisuse {
            op: "SparseKvCache::attend",
            msg: "no open step: call begin_step first".into(),
        })?;
        let result = self.attend_in_step(&mut step, layer, q, k, v);
        self.step = Some(step);
        result
    }

    fn end_step(&mut self) -> Result<StepStats> {
        let step = self.step.as_ref().ok_or(Error::StepMisuse {
            op: "SparseKvCache::end_step",
            msg: "no open step".into(),
        })?;
        if let Some(l) = step.attended.iter().position(|a| !a) {
            return Err(Error::StepMisuse {
                op: "SparseKvCache::end_step",
                msg: format!("layer {l} was not attended in this step (attend every layer, or abort_step)"),
            });
        }
        let mut stats = step.stats;
        if let Some(n) = &step.attended_pages {
            stats.pages_attended += n.to_dtype(DType::F64)?.to_scalar::<f64>()? as u64;
        }
        let (reuse, [hits, misses, spilled]) = self.lru.take_step_counters()?;
        stats.hits += hits;
        stats.misses += misses;
        stats.spilled += spilled;
        stats.bytes_moved += (misses + spilled) * self.cfg.page_bytes() as u64;
        for (e, _) in step.entries.iter().zip(&step.requested).filter(|(_, &r)| r) {
            let owner = self.owners.get(&e.seq).copied().unwrap_or(0) as usize;
            self.budgets
                .observe_count(e.seq, reuse.get(owner).copied().unwrap_or(0) as usize);
        }
        self.step = None;
        self.total.add(&stats);
        self.budgets.end_step();
        self.upload_budgets()?;
        Ok(stats)
    }

    fn abort_step(&mut self) -> Result<()> {
        let step = self.step.take().ok_or(Error::StepMisuse {
            op: "SparseKvCache::abort_step",
            msg: "no open step".into(),
        })?;
        for e in &step.entries {
            self.release_pages(e.seq, e.new_pages)?;
            if let Some(l) = self.lens.get_mut(&e.seq) {
                *l = e.start;
            }
            self.algo.truncate(e.seq, e.start);
        }
        self.device_tables.apply(&mut self.tables)?;
        // The step's counters are dropped; the recency it gave to pages stays (harmless).
        self.lru.take_step_counters()?;
        Ok(())
    }

    fn stats(&self) -> StepStats {
        self.total
    }

    fn pool_usage(&self) -> PoolUsage {
        PoolUsage {
            host_used: self.host_alloc.used_count(),
            host_capacity: self.host_alloc.capacity(),
            fast_resident: self.lru.resident_count().unwrap_or(0),
            fast_capacity: self.lru.capacity(),
            page_table_bytes: self.tables.bytes(),
        }
    }
}
