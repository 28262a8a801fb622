//! The batched step executor: a step is a list of (sequence, tokens) over the paged KV cache.
//! It checks the step, writes each token's id, position and block table into the step inputs,
//! runs the plan recorded for the step's bucket, and reads back the logit rows or their argmax.
//! Both the scheduler ([`super::Engine`]) and the single-sequence [`crate::Session`] drive it.

use crate::model::forward::{self, Activations, KvCache, PlanKey, ProbedLayer, ProbedRoute, Probes, StepPlan};
use crate::model::Model;
use crate::ops::{rope, NO_POSITION};
use crate::{KilnError, Result};

/// Which logits one sequence of a step wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last token's row.
    Last,
    /// Every token's row (perplexity, speculative verification, tests).
    All,
}

/// One sequence's share of a step: `tokens` at positions `pos0 ..`, its block table covering
/// positions 0 .. pos0 + tokens.len().
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub pos0: usize,
    pub block_table: &'a [u32],
    pub wanted: Wanted,
    /// The LoRA adapters its tokens use: bit i = the model's adapter i (0: none).
    pub adapters: u32,
}

impl SeqStep<'_> {
    fn rows(&self) -> usize {
        match self.wanted {
            Wanted::None => 0,
            Wanted::Last => 1,
            Wanted::All => self.tokens.len(),
        }
    }
}

/// What to read back of the wanted rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readback {
    /// Each row's argmax, chosen on the GPU (4 bytes a row).
    Argmax,
    /// Each row's logits.
    Logits,
    /// Both.
    Both,
}

/// The wanted rows of a step, in the order of its sequences (and tokens within one).
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub rows: usize,
    /// Greedy pick per row (`Argmax`, `Both`).
    pub argmax: Vec<u32>,
    /// (rows, vocab) row-major (`Logits`, `Both`).
    pub logits: Vec<f32>,
}

/// One layer's attention probabilities for a step of one sequence.
#[derive(Clone, Debug)]
pub struct LayerAttention {
    pub layer: usize,
    /// Query tokens (rows) and keys (columns) of each head's matrix.
    pub tokens: usize,
    pub keys: usize,
    /// (n_heads, tokens, keys): row t is query t's softmax over keys 0 ..= its position.
    pub probs: Vec<f32>,
    /// The layer's rotated queries (tokens, n_heads·head_dim), to check `probs` against a reference.
    pub q: Vec<f32>,
}

/// One mixture-of-experts layer's routing for a step of one sequence.
#[derive(Clone, Debug)]
pub struct LayerRouting {
    pub layer: usize,
    pub top_k: usize,
    /// (tokens, top_k): each token's experts, most probable first.
    pub ids: Vec<u32>,
    /// (tokens, top_k): the weights their outputs are summed with.
    pub weights: Vec<f32>,
}

/// Recorded plans kept at once; the least recently used goes first.
const MAX_PLANS: usize = 40;

pub struct Runner<'m> {
    model: &'m Model,
    pub cache: KvCache,
    act: Activations,
    rope_table: wgpu::Buffer,
    /// Positions a sequence may reach (the rope table's length).
    max_context: usize,
    /// (key, plan, last use).
    plans: Vec<(PlanKey, StepPlan, u64)>,
    clock: u64,
    // Host staging for the step inputs, reused.
    ids: Vec<u32>,
    meta: Vec<[u32; 2]>,
    table: Vec<u32>,
    rows: Vec<u32>,
    adapters: Vec<u32>,
}

impl<'m> Runner<'m> {
    /// A KV cache of `blocks` blocks of `block_size` positions, steps of at most
    /// `max_step_tokens` tokens, sequences of at most `max_context` positions.
    pub fn new(
        model: &'m Model,
        blocks: u32,
        block_size: u32,
        max_step_tokens: u32,
        max_context: usize,
    ) -> Result<Self> {
        let c = &model.config;
        if max_context == 0 || max_context > c.max_position_embeddings {
            return Err(KilnError::Request(format!(
                "context {max_context} is outside 1..={} (the model's max_position_embeddings)",
                c.max_position_embeddings
            )));
        }
        let gpu = &model.gpu;
        let cache = KvCache::new(gpu, c, blocks, block_size)?;
        let max_step_tokens = max_step_tokens.max(1);
        let act = Activations::new(gpu, c, max_step_tokens, max_context as u32, block_size)?;
        let inv = rope::inv_freq_with_factors(
            c.head_dim,
            c.rope_theta,
            c.rope_scaling.as_ref(),
            c.rope_freq_factors.as_deref(),
        );
        let rope_table = rope::upload_table(gpu, &rope::cos_sin_table(&inv, max_context))?;
        Ok(Runner {
            model,
            cache,
            act,
            rope_table,
            max_context,
            plans: Vec::new(),
            clock: 0,
            ids: Vec::new(),
            meta: Vec::new(),
            table: Vec::new(),
            rows: Vec::new(),
            adapters: Vec::new(),
        })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn max_step_tokens(&self) -> usize {
        self.act.max_tokens as usize
    }

    /// Most logit rows one step can make.
    pub fn max_rows(&self) -> usize {
        self.act.max_rows as usize
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn block_size(&self) -> usize {
        self.cache.geometry.block_size as usize
    }

    pub fn activation_bytes(&self) -> u64 {
        self.act.bytes()
    }

    /// Check a step and write its inputs into the host staging: (plan key, longest kv length).
    fn stage(&mut self, seqs: &[SeqStep<'_>], readback: Readback) -> Result<(PlanKey, u32)> {
        let vocab = self.model.config.vocab_size as u32;
        let bs = self.cache.geometry.block_size as usize;
        let blocks = self.cache.blocks();
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let rows: usize = seqs.iter().map(SeqStep::rows).sum();
        if n == 0 || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(KilnError::Request("nothing to process: a step sequence has no tokens".into()));
        }
        if n > self.max_step_tokens() || rows > self.max_rows() {
            return Err(KilnError::Request(format!(
                "a step of {n} tokens and {rows} logit rows exceeds this runner's {} tokens and {} rows",
                self.max_step_tokens(),
                self.max_rows()
            )));
        }
        let table_entries: usize = seqs.iter().map(|s| s.block_table.len()).sum();
        if table_entries > self.act.max_table_entries as usize {
            return Err(KilnError::Request(format!(
                "the step's block tables hold {table_entries} entries, room for {}",
                self.act.max_table_entries
            )));
        }
        self.ids.clear();
        self.meta.clear();
        self.table.clear();
        self.rows.clear();
        self.adapters.clear();
        let mut max_kv_len = 0;
        for s in seqs {
            let end = s.pos0 + s.tokens.len();
            if end > self.max_context {
                return Err(KilnError::Request(format!(
                    "positions up to {end} exceed the context of {} tokens",
                    self.max_context
                )));
            }
            if s.block_table.len() < end.div_ceil(bs) {
                return Err(KilnError::Request(format!(
                    "a block table of {} blocks does not cover {end} positions",
                    s.block_table.len()
                )));
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b >= blocks) {
                return Err(KilnError::Request(format!("block {b} is outside the cache's {blocks} blocks")));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t >= vocab) {
                return Err(KilnError::Request(format!("token id {t} is outside the vocabulary of {vocab}")));
            }
            self.model.weights.lora.check(s.adapters)?;
            let table = self.table.len() as u32;
            self.table.extend_from_slice(s.block_table);
            let first_row = self.ids.len() as u32;
            for (i, &id) in s.tokens.iter().enumerate() {
                self.ids.push(id);
                self.meta.push([(s.pos0 + i) as u32, table]);
                self.adapters.push(s.adapters);
            }
            match s.wanted {
                Wanted::None => {}
                Wanted::Last => self.rows.push(first_row + s.tokens.len() as u32 - 1),
                Wanted::All => self.rows.extend(first_row..first_row + s.tokens.len() as u32),
            }
            max_kv_len = max_kv_len.max(end as u32);
        }
        let key = PlanKey {
            tokens: forward::bucket(n as u32, self.act.max_tokens),
            rows: if rows == 0 { 0 } else { forward::bucket(rows as u32, self.act.max_rows) },
            argmax: readback != Readback::Logits && rows > 0,
        };
        // Padding: tokens that do nothing, rows that repeat row 0.
        self.ids.resize(key.tokens as usize, 0);
        self.meta.resize(key.tokens as usize, [NO_POSITION, 0]);
        self.rows.resize(key.rows as usize, 0);
        self.adapters.resize(key.tokens as usize, 0);
        if self.table.is_empty() {
            self.table.push(0);
        }
        Ok((key, max_kv_len))
    }

    /// Write the staged step inputs into their GPU buffers.
    fn upload_inputs(&self) {
        let (gpu, inputs) = (&self.model.gpu, &self.act.inputs);
        gpu.queue.write_buffer(&inputs.ids, 0, bytemuck::cast_slice(&self.ids));
        gpu.queue.write_buffer(&inputs.meta, 0, bytemuck::cast_slice(&self.meta));
        gpu.queue.write_buffer(&inputs.block_table, 0, bytemuck::cast_slice(&self.table));
        gpu.queue.write_buffer(&inputs.adapters, 0, bytemuck::cast_slice(&self.adapters));
        if !self.rows.is_empty() {
            gpu.queue.write_buffer(&inputs.rows, 0, bytemuck::cast_slice(&self.rows));
        }
    }

    /// The plan for `key`, recorded if it is not kept, prepared for the staged step, inputs uploaded.
    fn prepared_plan(&mut self, key: PlanKey, max_kv_len: u32) -> Result<&mut StepPlan> {
        let model = self.model;
        let gpu = &model.gpu;
        self.clock += 1;
        let i = match self.plans.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                if self.plans.len() >= MAX_PLANS {
                    let oldest = (0..self.plans.len()).min_by_key(|&i| self.plans[i].2).expect("plans are kept");
                    self.plans.swap_remove(oldest);
                }
                let plan = forward::plan(
                    gpu,
                    &model.config,
                    &model.weights,
                    &self.cache,
                    &self.act,
                    &self.rope_table,
                    key,
                    None,
                )?;
                self.plans.push((key, plan, 0));
                self.plans.len() - 1
            }
        };
        self.upload_inputs();
        let (_, plan, used) = &mut self.plans[i];
        *used = self.clock;
        plan.prepare(gpu, max_kv_len);
        Ok(plan)
    }

    /// Run one step: every sequence's tokens go into its cache slots, and the wanted rows'
    /// logits or argmax come back.
    pub fn step(&mut self, seqs: &[SeqStep<'_>], readback: Readback) -> Result<StepOutput> {
        let (key, max_kv_len) = self.stage(seqs, readback)?;
        let rows: usize = seqs.iter().map(SeqStep::rows).sum();
        let gpu = self.model.gpu.clone();
        let plan = self.prepared_plan(key, max_kv_len)?;
        plan.run(&gpu, "forward")?;
        let mut out = StepOutput { rows, ..Default::default() };
        if rows > 0 {
            if readback != Readback::Logits {
                out.argmax = gpu.read_u32(&self.act.tokens, rows)?;
            }
            if readback != Readback::Argmax {
                out.logits = gpu.read_f32(&self.act.logits, rows * self.model.config.vocab_size)?;
            }
        }
        Ok(out)
    }

    /// Run one step with a GPU timestamp around every dispatch: (dispatch label, seconds) in
    /// execution order. For `kiln bench`.
    pub fn profile_step(&mut self, seqs: &[SeqStep<'_>], readback: Readback) -> Result<Vec<(String, f64)>> {
        let (key, max_kv_len) = self.stage(seqs, readback)?;
        let gpu = self.model.gpu.clone();
        self.prepared_plan(key, max_kv_len)?.profile(&gpu)
    }

    /// Run one step of a single sequence and record the attention probabilities of `layers`
    /// (a one-off plan with probes; the kept plans never pay for them).
    pub fn attention_maps(&mut self, seq: SeqStep<'_>, layers: &[usize]) -> Result<Vec<LayerAttention>> {
        let model = self.model;
        let c = &model.config;
        if let Some(l) = layers.iter().find(|&&l| l >= c.n_layers) {
            return Err(KilnError::Request(format!("layer {l} is past the model's {} layers", c.n_layers)));
        }
        let (key, max_kv_len) = self.stage(&[seq], Readback::Argmax)?;
        let gpu = &model.gpu;
        let n_keys = max_kv_len;
        let probes = Probes {
            layers: layers
                .iter()
                .map(|&layer| {
                    let probs = (c.n_heads as u64) * key.tokens as u64 * n_keys as u64 * 4;
                    Ok(ProbedLayer {
                        layer,
                        probs: gpu.buffer(&format!("attention probs {layer}"), probs)?,
                        q: gpu.buffer(&format!("probed q {layer}"), key.tokens as u64 * c.q_dim() as u64 * 4)?,
                    })
                })
                .collect::<Result<_>>()?,
            n_keys,
            routes: Vec::new(),
        };
        self.run_probed(key, max_kv_len, &probes)?;
        let n = seq.tokens.len();
        probes
            .layers
            .iter()
            .map(|pl| {
                let all = gpu.read_f32(&pl.probs, c.n_heads * key.tokens as usize * n_keys as usize)?;
                // Rows of padding tokens are dropped: (heads, bucket, keys) → (heads, n, keys).
                let row = key.tokens as usize * n_keys as usize;
                let probs = all.chunks(row).flat_map(|h| h[..n * n_keys as usize].iter().copied()).collect();
                let q = gpu.read_f32(&pl.q, n * c.q_dim())?;
                Ok(LayerAttention { layer: pl.layer, tokens: n, keys: n_keys as usize, probs, q })
            })
            .collect()
    }

    /// Run the staged step once in a one-off plan that records `probes`.
    fn run_probed(&mut self, key: PlanKey, max_kv_len: u32, probes: &Probes) -> Result<()> {
        let model = self.model;
        let gpu = &model.gpu;
        let c = &model.config;
        let mut plan =
            forward::plan(gpu, c, &model.weights, &self.cache, &self.act, &self.rope_table, key, Some(probes))?;
        self.upload_inputs();
        plan.prepare(gpu, max_kv_len);
        plan.run(gpu, "forward with probes")
    }

    /// Run one step of a single sequence and record which experts each of its tokens chose in
    /// the mixture-of-experts layers `layers`, and with what weights.
    pub fn routing(&mut self, seq: SeqStep<'_>, layers: &[usize]) -> Result<Vec<LayerRouting>> {
        let model = self.model;
        let c = &model.config;
        let Some(m) = &c.moe else {
            return Err(KilnError::Request("the model has no mixture of experts to route".into()));
        };
        if let Some(l) = layers.iter().find(|&&l| l >= c.n_layers || !m.sparse_layers[l]) {
            return Err(KilnError::Request(format!("layer {l} is not a mixture-of-experts layer")));
        }
        let (key, max_kv_len) = self.stage(&[seq], Readback::Argmax)?;
        let gpu = &model.gpu;
        let bytes = key.tokens as u64 * m.top_k as u64 * 4;
        let probes = Probes {
            layers: Vec::new(),
            n_keys: 0,
            routes: layers
                .iter()
                .map(|&layer| {
                    Ok(ProbedRoute {
                        layer,
                        ids: gpu.buffer(&format!("expert ids {layer}"), bytes)?,
                        weights: gpu.buffer(&format!("expert weights {layer}"), bytes)?,
                    })
                })
                .collect::<Result<_>>()?,
        };
        self.run_probed(key, max_kv_len, &probes)?;
        let n = seq.tokens.len() * m.top_k;
        probes
            .routes
            .iter()
            .map(|r| {
                Ok(LayerRouting {
                    layer: r.layer,
                    top_k: m.top_k,
                    ids: gpu.read_u32(&r.ids, n)?,
                    weights: gpu.read_f32(&r.weights, n)?,
                })
            })
            .collect()
    }

    /// Dispatches in the plan of `key`, if one is kept.
    pub fn dispatches(&self, key: PlanKey) -> Option<usize> {
        self.plans.iter().find(|(k, _, _)| *k == key).map(|(_, p, _)| p.dispatch_count())
    }
}
