//! Continuous batching with chunked prefill, as pure bookkeeping (no candle types): a
//! FIFO waiting queue, admission under a page reservation and a sequence-slot limit,
//! and the plan of each step.
//!
//! * **Admission** is strictly FIFO: the head of the queue is admitted while the cache
//!   has room for its whole reservation (pages for prompt + `max_new_tokens`, all
//!   layers and KV heads) and a sequence slot is free; if the head does not fit, nobody
//!   behind it is admitted (no overtaking). Waiting is back-pressure, never an error.
//!   Because every admitted request holds a reservation for its longest possible
//!   length, a step never runs out of cache pages.
//! * **A step** carries every running decode (one token each) plus prefill chunks, in
//!   admission order, up to `max_prefill_tokens` prompt tokens in total: a long prompt
//!   is spread over several steps and never stalls the decodes for more than one chunk.

use super::request::RequestId;
use crate::{Error, Result};
use std::collections::VecDeque;

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most requests admitted at once (sequence slots), `>= 1`.
    pub max_running: usize,
    /// Prompt tokens per step, summed over the prefill chunks of the step, `>= 1`.
    pub max_prefill_tokens: usize,
    /// Cache pages the admitted requests may reserve in total, `>= 1`.
    pub capacity_pages: usize,
}

/// What one request does in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Feed prompt tokens `start..start + len`; `last` when this chunk ends the prompt
    /// (its logits give the first output token).
    Prefill {
        /// First prompt position of the chunk.
        start: usize,
        /// Tokens in the chunk (`>= 1`).
        len: usize,
        /// Whether the chunk ends the prompt.
        last: bool,
    },
    /// Feed the last sampled token, sample the next.
    Decode,
}

/// One request's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// The request.
    pub id: RequestId,
    /// What it does.
    pub work: Work,
}

/// The plan of one step: decodes first (admission order), then prefill chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Requests admitted by this step's scheduling (they need a cache sequence before
    /// the step runs), in FIFO order.
    pub admitted: Vec<RequestId>,
    /// The batch.
    pub items: Vec<Scheduled>,
}

impl StepPlan {
    /// Whether the step has nothing to run.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Prompt tokens in the step.
    pub fn prefill_tokens(&self) -> usize {
        self.items
            .iter()
            .map(|s| match s.work {
                Work::Prefill { len, .. } => len,
                Work::Decode => 0,
            })
            .sum()
    }

    /// Decodes in the step.
    pub fn decodes(&self) -> usize {
        self.items.iter().filter(|s| s.work == Work::Decode).count()
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: RequestId,
    prompt_len: usize,
    pages: usize,
    /// Prompt tokens already scheduled.
    prefilled: usize,
}

/// FIFO admission and step planning; see the module docs.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<Entry>,
    running: Vec<Entry>,
    reserved: usize,
}

impl Scheduler {
    /// A scheduler with `cfg`; every limit must be `>= 1`.
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        if cfg.max_running == 0 || cfg.max_prefill_tokens == 0 || cfg.capacity_pages == 0 {
            return Err(Error::Config(format!(
                "scheduler: max_running ({}), max_prefill_tokens ({}) and capacity_pages ({}) must be >= 1",
                cfg.max_running, cfg.max_prefill_tokens, cfg.capacity_pages
            )));
        }
        Ok(Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
        })
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request of `prompt_len >= 1` tokens that reserves `pages` cache pages
    /// once admitted. Fails (and queues nothing) when it could never be admitted:
    /// `pages` over the whole capacity, an empty prompt, or an id already known.
    pub fn enqueue(&mut self, id: RequestId, prompt_len: usize, pages: usize) -> Result<()> {
        const OP: &str = "Scheduler::enqueue";
        if prompt_len == 0 {
            crate::invalid!(OP, "request {id}: prompt_len = 0 must be >= 1");
        }
        if pages > self.cfg.capacity_pages {
            crate::invalid!(
                OP,
                "request {id} needs {pages} cache pages for prompt + max_new_tokens, more than the \
                 cache's whole capacity ({} pages): it could never be admitted",
                self.cfg.capacity_pages
            );
        }
        if self.contains(id) {
            crate::invalid!(OP, "request {id} is already queued or running");
        }
        self.waiting.push_back(Entry {
            id,
            prompt_len,
            pages,
            prefilled: 0,
        });
        Ok(())
    }

    /// Whether `id` is waiting or running.
    pub fn contains(&self, id: RequestId) -> bool {
        self.waiting.iter().chain(&self.running).any(|e| e.id == id)
    }

    /// Whether `id` is running (admitted).
    pub fn is_running(&self, id: RequestId) -> bool {
        self.running.iter().any(|e| e.id == id)
    }

    /// Removes a waiting or running request (finished, cancelled or failed) and releases
    /// its reservation; `false` if it was not there.
    pub fn remove(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.running.iter().position(|e| e.id == id) {
            let e = self.running.remove(i);
            self.reserved -= e.pages;
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|e| e.id == id) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    /// Admits what fits (FIFO) and plans the next step. Prefill progress is recorded at
    /// once: the caller runs the plan, or removes the requests it could not run.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        while let Some(head) = self.waiting.front() {
            if self.running.len() >= self.cfg.max_running || self.reserved + head.pages > self.cfg.capacity_pages {
                break;
            }
            let e = self.waiting.pop_front().expect("front exists");
            self.reserved += e.pages;
            plan.admitted.push(e.id);
            self.running.push(e);
        }
        for e in &self.running {
            if e.prefilled == e.prompt_len {
                plan.items.push(Scheduled {
                    id: e.id,
                    work: Work::Decode,
                });
            }
        }
        let mut budget = self.cfg.max_prefill_tokens;
        for e in self.running.iter_mut() {
            if budget == 0 {
                break;
            }
            if e.prefilled < e.prompt_len {
                let len = (e.prompt_len - e.prefilled).min(budget);
                plan.items.push(Scheduled {
                    id: e.id,
                    work: Work::Prefill {
                        start: e.prefilled,
                        len,
                        last: e.prefilled + len == e.prompt_len,
                    },
                });
                e.prefilled += len;
                budget -= len;
            }
        }
        plan
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted and not removed.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Ids waiting, in FIFO order.
    pub fn waiting_ids(&self) -> Vec<RequestId> {
        self.waiting.iter().map(|e| e.id).collect()
    }

    /// Ids running, in admission order.
    pub fn running_ids(&self) -> Vec<RequestId> {
        self.running.iter().map(|e| e.id).collect()
    }

    /// Pages reserved by the running requests.
    pub fn reserved_pages(&self) -> usize {
        self.reserved
    }

    /// Whether nothing waits or runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_running: usize, budget: usize, capacity: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_running,
            max_prefill_tokens: budget,
            capacity_pages: capacity,
        })
        .unwrap()
    }

    fn r(i: u64) -> RequestId {
        RequestId(i)
    }

    #[test]
    fn chunked_prefill_then_decodes_with_a_shared_budget() {
        let mut s = sched(8, 64, 1000);
        s.enqueue(r(0), 150, 10).unwrap();
        s.enqueue(r(1), 20, 10).unwrap();
        let p = s.schedule();
        assert_eq!(p.admitted, vec![r(0), r(1)]);
        assert_eq!(
            p.items,
            vec![Scheduled {
                id: r(0),
                work: Work::Prefill {
                    start: 0,
                    len: 64,
                    last: false
                }
            }]
        );
        let p = s.schedule();
        assert_eq!(p.prefill_tokens(), 64);
        let p = s.schedule();
        // 22 tokens end request 0's prompt; request 1 gets 20 of the remaining 42.
        assert_eq!(
            p.items,
            vec![
                Scheduled {
                    id: r(0),
                    work: Work::Prefill {
                        start: 128,
                        len: 22,
                        last: true
                    }
                },
                Scheduled {
                    id: r(1),
                    work: Work::Prefill {
                        start: 0,
                        len: 20,
                        last: true
                    }
                },
            ]
        );
        let p = s.schedule();
        assert_eq!(p.decodes(), 2);
        assert_eq!(p.prefill_tokens(), 0);
        // A newcomer prefills in the same step as the running decodes.
        s.enqueue(r(2), 5, 10).unwrap();
        let p = s.schedule();
        assert_eq!(p.admitted, vec![r(2)]);
        assert_eq!((p.decodes(), p.prefill_tokens()), (2, 5));
        assert_eq!(p.items[0].id, r(0), "decodes come first, in admission order");
    }

    #[test]
    fn fifo_admission_under_pages_and_slots() {
        let mut s = sched(2, 1000, 100);
        for i in 0..5 {
            s.enqueue(r(i), 4, 40).unwrap();
        }
        assert_eq!(s.schedule().admitted, vec![r(0), r(1)], "room for two reservations");
        assert_eq!((s.running(), s.waiting(), s.reserved_pages()), (2, 3, 80));
        assert!(s.schedule().admitted.is_empty(), "back-pressure: nobody else fits");
        assert!(s.remove(r(1)));
        assert_eq!(s.schedule().admitted, vec![r(2)]);
        // A big head blocks smaller requests behind it (no overtaking).
        let mut s = sched(4, 1000, 100);
        s.enqueue(r(0), 4, 60).unwrap();
        s.enqueue(r(1), 4, 50).unwrap();
        s.enqueue(r(2), 4, 10).unwrap();
        assert_eq!(s.schedule().admitted, vec![r(0)]);
        assert!(s.schedule().admitted.is_empty());
        s.remove(r(0));
        assert_eq!(s.schedule().admitted, vec![r(1), r(2)]);
        // The slot limit.
        let mut s = sched(1, 1000, 100);
        s.enqueue(r(0), 4, 1).unwrap();
        s.enqueue(r(1), 4, 1).unwrap();
        assert_eq!(s.schedule().admitted, vec![r(0)]);
        assert_eq!(s.waiting_ids(), vec![r(1)]);
    }

    #[test]
    fn never_fitting_requests_and_removal() {
        let mut s = sched(2, 16, 100);
        let e = s.enqueue(r(0), 4, 101).unwrap_err().to_string();
        assert!(e.contains("101") && e.contains("100"), "{e}");
        assert!(s.enqueue(r(0), 0, 1).is_err());
        s.enqueue(r(0), 4, 1).unwrap();
        assert!(s.enqueue(r(0), 4, 1).is_err(), "duplicate id");
        assert!(s.remove(r(0)), "a waiting request can be removed");
        assert!(!s.remove(r(0)));
        assert!(s.is_idle());
        assert!(s.schedule().is_empty());
        assert!(Scheduler::new(SchedulerConfig {
            max_running: 1,
            max_prefill_tokens: 0,
            capacity_pages: 1
        })
        .is_err());
    }
}
