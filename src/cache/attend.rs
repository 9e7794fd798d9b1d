//! One layer of a step: input checks, append of the new K/V, the algorithm's index and
//! select, and the tiered attention (LRU resolve, batched miss fetch, attention over the
//! fast tier and over spilled host pages, merged by log-sum-exp).

use super::*;

/// What [`SpinCache::tiered_part`] attended.
pub(super) struct TieredPart {
    /// The partial attention (`None`: no row attended here).
    part: Option<AttentionPartial>,
    /// Whether `part` holds only the step's decode rows (`StepPlan::decode_rows`, in that
    /// order) instead of every row.
    decode_rows_only: bool,
    /// `[S, Hkv, N, 2]` the requests' fast-tier pairs.
    pages: Tensor,
}

impl TieredPart {
    fn all_rows(part: Option<AttentionPartial>, pages: Tensor) -> Self {
        Self {
            part,
            decode_rows_only: false,
            pages,
        }
    }
}

/// Two partial attentions over disjoint pages merged by their LSE (`a` first), or
/// whichever exists.
fn merge_parts(a: Option<AttentionPartial>, b: Option<AttentionPartial>) -> Result<Option<AttentionPartial>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(ops::merge_partials(&a, &b)?),
        (a, b) => a.or(b),
    })
}

impl SpinCache {
    pub(super) fn check_qkv(&self, step: &StepState, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        const OP: &str = "SparseKvCache::attend";
        let c = &self.cfg;
        if layer >= c.num_layers {
            crate::invalid!(OP, "layer {layer} out of range: the cache has {} layers", c.num_layers);
        }
        if step.attended[layer] {
            return Err(Error::StepMisuse {
                op: OP,
                msg: format!("layer {layer} already attended in this step"),
            });
        }
        let t = step.total;
        let want = |name: &str, x: &Tensor, h: usize| -> Result<()> {
            if x.dims() != [t, h, c.head_dim] {
                crate::invalid!(
                    OP,
                    "{name} must be [T={t}, H={h}, D={}] (the step's tokens, heads, head_dim), got {:?}",
                    c.head_dim,
                    x.dims()
                );
            }
            if x.dtype() != c.dtype {
                crate::invalid!(
                    OP,
                    "{name} {:?} has dtype {:?}, the cache stores {:?}",
                    x.dims(),
                    x.dtype(),
                    c.dtype
                );
            }
            if !x.device().same_device(&c.device) {
                crate::invalid!(
                    OP,
                    "{name} {:?} is on {:?}, the cache is on {:?}",
                    x.dims(),
                    x.device().location(),
                    c.device.location()
                );
            }
            Ok(())
        };
        want("q", q, c.num_q_heads)?;
        want("k", k, c.num_kv_heads)?;
        want("v", v, c.num_kv_heads)?;
        if c.reject_non_finite {
            for (name, x) in [("q", q), ("k", k), ("v", v)] {
                let vals = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
                    let (h, d) = (x.dims()[1], c.head_dim);
                    crate::invalid!(
                        OP,
                        "{name} {:?} holds {} at token {}, head {}, element {} (layer {layer}; \
                         CacheConfig::reject_non_finite is on)",
                        x.dims(),
                        vals[i],
                        i / (h * d),
                        i / d % h,
                        i % d
                    );
                }
            }
        }
        Ok(())
    }

    /// Attends the step's queries over the requested pages: one LRU resolve (hits, misses
    /// into empty or evicted ways, spills where a bucket has no way left), then by
    /// [`FetchMode`]: in kernel (decode-only steps), one launch that reads hits from the
    /// fast tier and misses and spills from the host tier, filling the misses; in order,
    /// one batched fetch of the misses, attention over the fast tier plus attention over
    /// the spilled pages read straight from the host tier, merged by log-sum-exp; side
    /// stream, the same with the fetch overlapped. A direct-mapped fast tier has only
    /// hits: one round kernel and the attention over the fast tier. Everything is
    /// enqueued on the device: no host synchronization, no device-to-host copy.
    ///
    /// In a step with prefill chunks on the tensor-core path (`step.prefill`), the
    /// chunks' rows attend only their spilled pages here; their fast-tier pages are
    /// attended by [`ops::prefill_attention`] from the returned fast-tier pairs
    /// `[S, Hkv, N, 2]`. With no decode row in such a step the fast-tier attention is
    /// skipped, and the part is `None` unless the tier has spilled pages to attend; with
    /// decode rows and a direct-mapped tier it covers only them
    /// ([`TieredPart::decode_rows_only`]), added into the chunks' output rows.
    pub(super) fn tiered_part(&mut self, step: &mut StepState, q_rot: &Tensor, r: &PageRequests) -> Result<TieredPart> {
        let (s, hkv, n) = r.host_slots.dims3()?;
        // In a step of prefill chunks only (on the tensor-core path) no row attends the
        // fast tier here: that attention would launch a block per (row, head) for nothing.
        let fast_rows = step.prefill.is_none() || !step.plan.decode.is_empty();
        let reuse_steps = match self.cfg.budget_policy {
            BudgetPolicy::Dynamic { reuse_steps, .. } => reuse_steps.min(u32::MAX as u64) as u32,
            _ => 0,
        };
        let (host_slots, logical, owners) = (
            r.host_slots.flatten_all()?,
            r.logical.flatten_all()?,
            r.owners.flatten_all()?,
        );
        let req = ResolveRequest {
            host_slots: &host_slots,
            logical: &logical,
            owners: &owners,
            step: self.step_number(),
            reuse_steps,
        };
        let fast_queries = step
            .prefill
            .as_ref()
            .map_or(&step.queries, |pf| &pf.decode_queries)
            .clone();
        let list = |pairs: &Tensor, queries: &Tensor| -> Result<PageList> {
            Ok(PageList {
                pages: pairs.reshape((s, hkv, n, 2))?,
                queries: queries.clone(),
                kv_limit: step.kv_limit.clone(),
            })
        };
        // Counted before: a round that fails may have changed the tags (see abort).
        step.rounds += 1;
        if self.lru.is_direct() {
            // Every page is in its own fast slot: no fetch, nothing spilled.
            let pairs = self.lru.resolve_direct(&req)?;
            step.requests += (s * hkv * n) as u64;
            let fast = list(&pairs, &fast_queries)?;
            // A step that mixes decodes with chunks on the tensor-core path attends only
            // its decode rows here (unless keys are rebuilt: their part spans every row).
            let rows = match (&step.plan.decode_rows, &step.prefill) {
                (Some(rows), Some(_)) if !self.algo.rebuilds_keys() => Some(rows),
                _ => None,
            };
            let part = match (fast_rows, rows) {
                (false, _) => None,
                (true, None) => Some(ops::sparse_paged_attention(q_rot, &self.fast_pool, &fast, self.scale)?),
                (true, Some(rows)) => {
                    let q = q_rot.index_select(rows, 0)?;
                    let dec = list(&pairs, &step.queries.index_select(rows, 0)?)?;
                    Some(ops::sparse_paged_attention(&q, &self.fast_pool, &dec, self.scale)?)
                }
            };
            return Ok(TieredPart {
                part,
                decode_rows_only: rows.is_some(),
                pages: fast.pages,
            });
        }
        let out = self.lru.resolve(&req)?;
        step.requests += (s * hkv * n) as u64;
        if self.in_kernel && step.prefill.is_none() {
            // One launch: hits from the fast tier, misses (filled on the way) and deferred
            // pages from the host tier.
            let tiered = list(&out.tiered_pairs, &step.queries)?;
            let src = out.tiered_src.reshape((s, hkv, n))?;
            let part = self
                .host
                .attend_tiered(q_rot, &self.fast_pool, &tiered, &src, self.scale)?;
            return Ok(TieredPart::all_rows(Some(part), tiered.pages));
        }
        let fast_list = list(&out.fast_pairs, &fast_queries)?;
        let spill_list = list(&out.spill_pairs, &step.queries)?;
        // The fast-tier attention over `pairs` (none where no row attends the fast tier).
        let attend_fast = |pairs: &Tensor| -> Result<Option<AttentionPartial>> {
            if !fast_rows {
                return Ok(None);
            }
            let fast = list(pairs, &fast_queries)?;
            Ok(Some(ops::sparse_paged_attention(
                q_rot,
                &self.fast_pool,
                &fast,
                self.scale,
            )?))
        };
        let Some(side) = self.side.as_ref() else {
            // In order: fetch the misses, then attend every fast-tier page.
            self.host
                .gather_counted(&self.fast_pool, &out.misses, &out.miss_count, None)?;
            let spilled = self.host.attend(q_rot, &spill_list, self.scale)?;
            let part = merge_parts(attend_fast(&out.fast_pairs)?, Some(spilled))?;
            return Ok(TieredPart::all_rows(part, fast_list.pages));
        };
        // Overlapped: the misses are copied on the side stream while the pages resident
        // before this round (and the spilled ones, from the host tier) are attended; the
        // fetched pages are attended after the join. The copy writes only slots this round
        // evicted, which no ready pair names (a ready slot was pinned by its request).
        side.fork()?;
        let ahead = self
            .host
            .gather_counted(&self.fast_pool, &out.misses, &out.miss_count, Some(side))
            .and_then(|()| {
                let ready = attend_fast(&out.ready_pairs)?;
                let spilled = self.host.attend(q_rot, &spill_list, self.scale)?;
                merge_parts(ready, Some(spilled))
            });
        // Joined even after an error: nothing may touch the fetched slots before the copy ends.
        side.join()?;
        let part = merge_parts(ahead?, attend_fast(&out.fetched_pairs)?)?;
        Ok(TieredPart::all_rows(part, fast_list.pages))
    }

    /// `[T, Hkv]` fast-tier destinations of the step's tokens in `layer`: where the home
    /// page of a token is resident, its fast slot · P + row, else `NONE` (computed on the
    /// device from the LRU's tags and the step plan; nothing crosses from the host).
    pub(super) fn fast_destinations(&self, step: &StepState, layer: usize) -> Result<Tensor> {
        let plan = &step.plan;
        if self.lru.is_direct() {
            // Host slot = fast slot: the host destinations are the fast ones.
            return Ok(plan.dst.get(layer)?);
        }
        let shape = plan.none.dims2()?;
        let slots = plan.dst_slots.get(layer)?.flatten_all()?;
        let rows = plan.dst_rows.get(layer)?.flatten_all()?;
        Ok(self
            .lru
            .fast_destinations(&slots, &rows, self.cfg.page_size)?
            .reshape(shape)?)
    }

    pub(super) fn attend_in_step(
        &mut self,
        step: &mut StepState,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (p, hkv) = (self.cfg.page_size, self.cfg.num_kv_heads);
        if let (Some(lay), Some(shape)) = (step.padded_prep, step.padded) {
            // A padded step's first attend: its plan and RoPE tables, on the device.
            self.prepare_padded(shape, &lay)?;
            step.padded_prep = None;
        }
        let span = crate::host_timing::span("attend.rope");
        let (q_rot, k_rot, v) = ops::rope_qkv(q, k, v, &step.cos, &step.sin)?;
        drop(span);

        // Store: home pages in the host tier, write-through to resident fast-tier copies.
        let span = crate::host_timing::span("attend.store");
        let dst_t = step.plan.dst.get(layer)?;
        self.host.append(&k_rot, &v, &dst_t)?;
        let fast_dst = self.fast_destinations(step, layer)?;
        // Min/max metadata on the fast tier's device: one fused write-through + update.
        let minmax = self
            .algo
            .page_minmax()
            .filter(|m| m.device().same_device(&self.cfg.device));
        if let Some(meta) = minmax {
            ops::paged_append_with_minmax(&self.fast_pool, &k_rot, &v, &fast_dst, meta, &dst_t)?;
        } else {
            ops::paged_append(&self.fast_pool, &k_rot, &v, &fast_dst)?;
        }
        let minmax_updated = minmax.is_some();
        drop(span);
        let span = crate::host_timing::span("attend.index");
        self.algo.index(&IndexInput {
            layer,
            runs: &step.plan.token_runs,
            runs_table: &step.plan.runs,
            q: &q_rot,
            k: &k_rot,
            k_pre_rope: k,
            v: &v,
            dst: &dst_t,
            minmax_updated,
        })?;

        drop(span);
        // Select and attend over pages (decode: selected pages incl. the new token;
        // prefill: all earlier pages), then the in-step causal part of prefills.
        let span = crate::host_timing::span("attend.requests");
        let (requests, selected) = self.page_requests(step, layer, &q_rot)?;
        drop(span);
        let span = crate::host_timing::span("attend.paged");
        let decode = step.plan.decode.clone();
        if step.padded.is_none() {
            // (A padded step counts these for every layer in `begin_padded_decode`.)
            for &ei in &decode {
                step.stats.decode_rows += 1;
                step.stats.pages_available += ((step.entries[ei].start + 1).div_ceil(p) * hkv) as u64;
            }
        }
        let (tiered, rebuilt) = match requests {
            Requests::Device(sel, slots) => {
                step.requested.fill(true);
                let r = self.device_requests(step, layer, &sel, slots)?;
                let tiered = self.tiered_part(step, &q_rot, &r)?;
                let rebuilt = match self.algo.materialize_device(layer, &self.fast_pool)? {
                    Some(rb) => {
                        self.device_rebuilds = true;
                        Some(self.rebuilt_part_device(step, layer, &q_rot, &rb)?)
                    }
                    None => None,
                };
                (Some(tiered), rebuilt)
            }
            Requests::Lists(mut req) => {
                for &ei in &decode {
                    step.stats.pages_attended += req[ei].iter().map(|l| l.len() as u64).sum::<u64>();
                }
                let rebuilt = if selected && !decode.is_empty() {
                    let seqs: Vec<u64> = decode.iter().map(|&ei| step.entries[ei].seq).collect();
                    let pages: Vec<Vec<Vec<u32>>> = decode.iter().map(|&ei| req[ei].clone()).collect();
                    match self.algo.materialize(&MaterializeInput {
                        layer,
                        seqs: &seqs,
                        num_tokens: &step.plan.num_tokens,
                        pages: &pages,
                        page_size: p,
                    })? {
                        Materialized::FetchFromTiers => None,
                        Materialized::Rebuilt(rk) => {
                            // Rebuilt pages leave the tiered fetch; they are attended separately.
                            for (bi, &ei) in decode.iter().enumerate() {
                                for (h, rebuilt) in rk.pages.get(bi).into_iter().flatten().enumerate().take(hkv) {
                                    req[ei][h].retain(|lp| rebuilt.binary_search(lp).is_err());
                                }
                            }
                            Some(self.rebuilt_part(step, layer, &q_rot, &decode, &rk)?)
                        }
                    }
                } else {
                    None
                };
                for (flag, heads) in step.requested.iter_mut().zip(&req) {
                    *flag |= heads.iter().any(|l| !l.is_empty());
                }
                let tiered = match self.list_requests(step, layer, &req)? {
                    Some(r) => Some(self.tiered_part(step, &q_rot, &r)?),
                    None => None,
                };
                (tiered, rebuilt)
            }
        };
        // The last layer to attend drops the step's shared broadcasts, so that they are
        // freed in the layer's own work: inside the graph when the step is captured (a
        // capture's allocation kept past its end is what memcheck once flagged; see
        // `engine::decode`).
        if step.attended.iter().enumerate().all(|(l, &a)| a || l == layer) {
            step.plan.memo = Default::default();
        }
        let (tiered, decode_rows_only, fast_pages) = match tiered {
            Some(t) => (t.part, t.decode_rows_only, Some(t.pages)),
            None => (None, false, None),
        };
        if decode_rows_only && rebuilt.is_some() {
            crate::invalid!(
                "SparseKvCache::attend",
                "rebuilt keys next to a decode-rows-only part (internal error)"
            );
        }
        let paged = merge_parts(tiered, rebuilt)?;
        drop(span);
        if let Some(pf) = &step.prefill {
            let _span = crate::host_timing::span("attend.prefill");
            // Prefill rows: their fast-tier pages and their own tokens, in one kernel.
            let pages = fast_pages.as_ref().unwrap_or(&pf.no_pages);
            let own = ops::prefill_attention(
                &q_rot,
                &k_rot,
                &v,
                &self.fast_pool,
                pages,
                &step.kv_limit,
                &pf.tiles,
                self.scale,
            )?;
            let out = match (paged, &step.plan.decode_rows) {
                // The chunks' kernel left the decode rows empty (zeros): add theirs in.
                (Some(a), Some(rows)) if decode_rows_only => own.out.index_add(rows, &a.out, 0)?,
                (Some(a), _) => ops::merge_partials(&a, &own)?.out,
                (None, _) => own.out,
            };
            step.attended[layer] = true;
            return Ok(out.to_dtype(self.cfg.dtype)?);
        }
        if step.padded.is_some() {
            // Every row decodes, in row order (padding rows attended nothing: zeros).
            step.attended[layer] = true;
            return match paged {
                Some(a) => Ok(a.out.to_dtype(self.cfg.dtype)?),
                None => crate::invalid!(
                    "SparseKvCache::attend",
                    "a padded step attended no page (internal error)"
                ),
            };
        }
        let mut outs = Vec::with_capacity(step.entries.len());
        for e in &step.entries {
            let part = paged
                .as_ref()
                .map(|a| -> Result<AttentionPartial> {
                    Ok(AttentionPartial {
                        out: a.out.narrow(0, e.row, e.n)?,
                        lse: a.lse.narrow(0, e.row, e.n)?,
                    })
                })
                .transpose()?;
            let out = if e.n == 1 {
                match part {
                    Some(pt) => pt.out,
                    None => crate::invalid!(
                        "SparseKvCache::attend",
                        "decode token of sequence {} attended no page (algorithm {})",
                        e.seq,
                        self.algo.name()
                    ),
                }
            } else {
                let rows = |x: &Tensor| x.narrow(0, e.row, e.n);
                let own = ops::causal_self_attention(&rows(&q_rot)?, &rows(&k_rot)?, &rows(&v)?, self.scale)?;
                match part {
                    Some(pt) => ops::merge_partials(&pt, &own)?.out,
                    None => own.out,
                }
            };
            outs.push(out);
        }
        step.attended[layer] = true;
        let out = if outs.len() == 1 {
            outs.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&outs, 0)?
        };
        Ok(out.to_dtype(self.cfg.dtype)?)
    }
}
