//! The scheduler (vLLM's, reduced to what kiln needs): which sequences run in the next step and
//! with how many tokens each.
//!
//! Every step first gives each running sequence its next token (or its next prompt chunk), in
//! order of admission, then admits waiting requests in order of arrival with chunks of their
//! prompts, all within a per-step token budget: chunked prefill mixed with decode, so a long
//! prompt never stalls the streams already running. Blocks are taken as tokens are scheduled.
//! When the pool runs dry, the most recently admitted sequence is preempted: its blocks are
//! released (its full blocks stay in the prefix cache) and it goes back to the front of the
//! queue, to be recomputed, mostly from cache, when there is room. A waiting request that does
//! not fit waits, and so does everyone behind it.

use super::block_pool::{BlockHasher, BlockPool};
use super::sequence::Sequence;
use std::collections::VecDeque;

pub struct Scheduler<'t> {
    pub pool: BlockPool,
    pub hasher: BlockHasher,
    pub block_size: usize,
    pub max_step_tokens: usize,
    pub max_running: usize,
    /// Most logit rows a step makes (`max_running` never exceeds it).
    pub max_rows: usize,
    pub waiting: VecDeque<Sequence<'t>>,
    pub running: Vec<Sequence<'t>>,
    /// Sequences preempted so far (for stats).
    pub preemptions: u64,
}

/// One scheduled sequence: `running[index]` computes `n` tokens from its `computed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub index: usize,
    pub n: usize,
}

impl<'t> Scheduler<'t> {
    pub fn new(blocks: u32, block_size: usize, max_step_tokens: usize, max_running: usize, max_rows: usize) -> Self {
        Scheduler {
            pool: BlockPool::new(blocks),
            hasher: BlockHasher::default(),
            block_size,
            max_step_tokens,
            max_running,
            max_rows,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Release a sequence's blocks and reset it to be recomputed from its tokens.
    fn release(&mut self, seq: &mut Sequence<'t>) {
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.draft.clear();
        seq.computed = 0;
        seq.registered = 0;
    }

    /// Take a sequence out of the scheduler (finished, cancelled, failed) and free its blocks.
    pub fn remove_running(&mut self, index: usize) -> Sequence<'t> {
        let mut seq = self.running.remove(index);
        self.release(&mut seq);
        seq
    }

    /// The next step: which running sequences compute how many tokens, in `running` order.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.max_step_tokens;
        let mut out = Vec::new();
        let mut i = 0;
        // Drafted tokens are rows of logits too: they get the rows no sequence that may run this
        // step needs for its own (every running one, and as many waiting as could be admitted).
        let admissible = self.waiting.len().min(self.max_running.saturating_sub(self.running.len()));
        let mut draft_rows = self.max_rows.saturating_sub(self.running.len() + admissible);
        while i < self.running.len() && budget > 0 {
            let seq = &mut self.running[i];
            seq.draft.truncate(draft_rows);
            let seq = &self.running[i];
            // Its uncomputed tokens and any drafted ones; a draft that does not fit is cut.
            let n = (seq.tokens.len() - seq.computed + seq.draft.len()).min(budget);
            let need = self.blocks_for(seq.computed + n).saturating_sub(seq.blocks.len());
            // Make room by preempting from the back; the sequence itself may be the one to go.
            while (self.pool.free_blocks() as usize) < need && self.running.len() > i + 1 {
                self.preempt_last();
            }
            if (self.pool.free_blocks() as usize) < need {
                self.preempt_last();
                break;
            }
            let seq = &mut self.running[i];
            for _ in 0..need {
                seq.blocks.push(self.pool.allocate().expect("counted free blocks"));
            }
            let pending = seq.tokens.len() - seq.computed;
            seq.draft.truncate(n.saturating_sub(pending));
            draft_rows -= seq.draft.len();
            out.push(Scheduled { index: i, n });
            budget -= n;
            i += 1;
        }
        // Admit waiting requests in order, as long as the head fits.
        while budget > 0 && self.running.len() < self.max_running && out.len() == self.running.len() {
            let Some(seq) = self.waiting.front() else { break };
            // A later choice of a request waits until the first has its prompt cached.
            if let Some(first) = seq.after {
                let computing = self.running.iter().any(|s| s.id == first && s.computed < s.prompt_len)
                    || self.waiting.iter().any(|s| s.id == first);
                if computing {
                    break;
                }
            }
            let Some(seq) = self.waiting.front_mut() else { break };
            let bs = self.block_size;
            self.hasher.extend(&mut seq.keys, seq.params.adapters, &seq.tokens, bs);
            // At least the last token is computed (its logits are needed): never reuse a block
            // that holds it, so no shared block is ever written.
            let reusable = (seq.tokens.len() - 1) / bs;
            let hits = self.pool.cached_prefix(&seq.keys[..reusable.min(seq.keys.len())]);
            let computed = hits * bs;
            let n = (seq.tokens.len() - computed).min(budget);
            let need = (computed + n).div_ceil(bs) - hits;
            // Cached blocks nobody holds count as free: taking them uses up free blocks too.
            let free_hits = self.pool.free_among(&seq.keys[..hits]) as usize;
            if (self.pool.free_blocks() as usize) < need + free_hits {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            for key in &seq.keys[..hits] {
                seq.blocks.push(self.pool.take_cached(*key).expect("counted as cached"));
            }
            for _ in 0..need {
                seq.blocks.push(self.pool.allocate().expect("counted free blocks"));
            }
            seq.computed = computed;
            seq.registered = hits;
            if !seq.admitted_once {
                seq.cached_tokens = computed;
                seq.admitted_once = true;
            }
            self.running.push(seq);
            out.push(Scheduled { index: self.running.len() - 1, n });
            budget -= n;
        }
        out
    }

    fn preempt_last(&mut self) {
        let mut seq = self.running.pop().expect("a running sequence to preempt");
        self.release(&mut seq);
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// After a step: `computed` advances, and blocks that became full are offered to the prefix
    /// cache.
    pub fn advance(&mut self, s: Scheduled) {
        let bs = self.block_size;
        let seq = &mut self.running[s.index];
        seq.computed += s.n;
        let full = seq.computed / bs;
        if full > seq.registered {
            self.hasher.extend(&mut seq.keys, seq.params.adapters, &seq.tokens[..full * bs], bs);
            for b in seq.registered..full {
                self.pool.register(seq.blocks[b], seq.keys[b]);
            }
            seq.registered = full;
        }
    }
}
