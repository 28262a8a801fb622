//! A session: one sequence's KV cache and position over a loaded [`Model`], fed tokens and
//! asked for logits or new tokens. Chat keeps one session across turns, so each turn
//! prefills only its own new tokens.
//!
//! ```no_run
//! use kiln::{Gpu, Model, Session, GenerateParams};
//! # fn main() -> kiln::Result<()> {
//! let gpu = Gpu::new()?;
//! let model = Model::load("models/SmolLM2-135M-Instruct".as_ref(), gpu, &mut |_, _| {})?;
//! let mut session = Session::new(&model, None)?;
//! let prompt = model.tokenizer.encode("The capital of France is", true)?;
//! let out = session.generate(&prompt, &GenerateParams::default(), |text| print!("{text}"))?;
//! eprintln!("\n{} tokens, {:.1} tok/s", out.tokens.len(), out.decode_tokens_per_second());
//! # Ok(()) }
//! ```

use crate::engine::batch::{LayerAttention, LayerRouting, Readback, Runner, SeqStep, Wanted};
use crate::model::forward::PlanKey;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::StreamDecoder;
use crate::{KilnError, Result};
use std::time::Instant;

/// Most tokens one step processes by default; longer prompts are fed in chunks of this many.
pub const MAX_STEP_TOKENS: usize = 256;

/// A session's cache blocks: the sequence owns all of them, in order (its block table is the
/// identity), so its cache is laid out exactly as a contiguous one.
const SESSION_BLOCK: u32 = 16;

/// Generated tokens as they come: the stop rules (an end-of-sequence id, which is not kept;
/// `max_tokens`), streaming detokenisation to `on_text`, and the timings.
pub(crate) struct Output<'a, F: FnMut(&str)> {
    eos: &'a [u32],
    params: &'a GenerateParams,
    decoder: StreamDecoder<'a>,
    on_text: F,
    tokens: Vec<u32>,
    text: String,
    prompt_tokens: usize,
    start: Instant,
    prefill_seconds: f64,
    decode_start: Instant,
}

impl<'a, F: FnMut(&str)> Output<'a, F> {
    /// Starts the prefill clock.
    pub(crate) fn new(model: &'a Model, params: &'a GenerateParams, prompt_tokens: usize, on_text: F) -> Self {
        Output {
            eos: &model.generation.eos_token_ids,
            params,
            decoder: StreamDecoder::new(&model.tokenizer, true),
            on_text,
            tokens: Vec::new(),
            text: String::new(),
            prompt_tokens,
            start: Instant::now(),
            prefill_seconds: 0.0,
            decode_start: Instant::now(),
        }
    }

    /// The prompt is in and the first token chosen: the decode clock starts.
    pub(crate) fn prefilled(&mut self) {
        self.prefill_seconds = self.start.elapsed().as_secs_f64();
        self.decode_start = Instant::now();
    }

    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Take the next generated token; `Some` when generation stops here.
    pub(crate) fn push(&mut self, token: u32) -> Result<Option<StopReason>> {
        if self.params.stop_at_eos && self.eos.contains(&token) {
            return Ok(Some(StopReason::Eos));
        }
        self.tokens.push(token);
        if let Some(piece) = self.decoder.push(token)? {
            (self.on_text)(&piece);
            self.text += &piece;
        }
        Ok((self.tokens.len() >= self.params.max_tokens).then_some(StopReason::MaxTokens))
    }

    pub(crate) fn finish(mut self, stop: StopReason) -> Result<Generation> {
        if let Some(piece) = self.decoder.finish()? {
            (self.on_text)(&piece);
            self.text += &piece;
        }
        Ok(Generation {
            tokens: self.tokens,
            text: self.text,
            stop,
            prompt_tokens: self.prompt_tokens,
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_start.elapsed().as_secs_f64(),
        })
    }
}

/// One sequence over the batched step executor: its own paged KV cache, fed one step at a time.
pub struct Session<'m> {
    runner: Runner<'m>,
    /// Positions this session can hold.
    ctx: usize,
    /// The identity block table.
    block_table: Vec<u32>,
    /// Every token in the cache, in order.
    tokens: Vec<u32>,
    /// The LoRA adapters applied (a bit mask over the model's adapters).
    adapters: u32,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced one of its end-of-sequence ids (not included in the output).
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the model's end-of-sequence ids.
    pub stop_at_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_tokens: 128, sampling: SamplingParams::default(), stop_at_eos: true }
    }
}

/// The result of `generate`, with its timings.
#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Tokens after the first, over the time spent producing them.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

impl<'m> Session<'m> {
    /// A session with a KV cache of `ctx` positions (default: the model's context, at most 4096).
    pub fn new(model: &'m Model, ctx: Option<usize>) -> Result<Self> {
        Self::with_step_tokens(model, ctx, MAX_STEP_TOKENS)
    }

    /// As `new`, feeding prompts in steps of at most `max_step_tokens` (activation memory grows
    /// with it).
    pub fn with_step_tokens(model: &'m Model, ctx: Option<usize>, max_step_tokens: usize) -> Result<Self> {
        // The runner checks the context against the model's.
        let ctx = ctx.unwrap_or_else(|| model.default_context());
        let blocks = (ctx as u32).div_ceil(SESSION_BLOCK);
        let step = max_step_tokens.min(ctx).max(1) as u32;
        let runner = Runner::new(model, blocks, SESSION_BLOCK, step, ctx)?;
        Ok(Session { runner, ctx, block_table: (0..blocks).collect(), tokens: Vec::new(), adapters: 0 })
    }

    pub fn model(&self) -> &'m Model {
        self.runner.model()
    }

    /// Positions this session can hold.
    pub fn context(&self) -> usize {
        self.ctx
    }

    /// The tokens in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Apply the model's LoRA adapters of `mask` (bit i: adapter i; 0: the base model alone)
    /// from now on. The cache holds keys and values computed under the old choice, so a change
    /// empties it.
    pub fn set_adapters(&mut self, mask: u32) -> Result<()> {
        self.model().weights.lora.check(mask)?;
        if mask != self.adapters {
            self.tokens.clear();
            self.adapters = mask;
        }
        Ok(())
    }

    pub fn adapters(&self) -> u32 {
        self.adapters
    }

    /// Forget everything after the first `len` tokens (speculative decoding, edited chats).
    pub fn rollback(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    /// Keep the longest prefix of the cache that `tokens` starts with, but leave at least its last
    /// token to feed (its logits are what comes next); forget the rest. Returns how many tokens
    /// of `tokens` the cache holds, so `tokens[kept..]` is what to feed. A chat turn or a draft
    /// model catching up feeds only what is new.
    pub fn keep_common_prefix(&mut self, tokens: &[u32]) -> usize {
        let common = self.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        let kept = common.min(tokens.len().saturating_sub(1));
        self.rollback(kept);
        kept
    }

    pub fn kv_cache_bytes(&self) -> u64 {
        self.runner.cache.bytes()
    }

    fn check_room(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(KilnError::Request("nothing to process: the prompt is empty".into()));
        }
        if self.tokens.len() + n > self.context() {
            return Err(KilnError::Request(format!(
                "{} tokens after the {} already in the session exceed the context of {} tokens (raise --ctx, up to {})",
                n,
                self.tokens.len(),
                self.context(),
                self.model().config.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Run one step of `ids` (≤ the step size) and append them.
    fn step(&mut self, ids: &[u32], wanted: Wanted, readback: Readback) -> Result<crate::engine::batch::StepOutput> {
        let step = SeqStep {
            tokens: ids,
            pos0: self.tokens.len(),
            block_table: &self.block_table,
            wanted,
            adapters: self.adapters,
        };
        let out = self.runner.step(&[step], readback)?;
        self.tokens.extend_from_slice(ids);
        Ok(out)
    }

    /// Run one step of `ids` (at most the step size) with a GPU timestamp around every dispatch,
    /// and append them: (dispatch label, seconds) in execution order. For `kiln bench`.
    pub fn profile_step(&mut self, ids: &[u32], wanted: Wanted, readback: Readback) -> Result<Vec<(String, f64)>> {
        self.check_room(ids.len())?;
        let step = SeqStep {
            tokens: ids,
            pos0: self.tokens.len(),
            block_table: &self.block_table,
            wanted,
            adapters: self.adapters,
        };
        let times = self.runner.profile_step(&[step], readback)?;
        self.tokens.extend_from_slice(ids);
        Ok(times)
    }

    /// Take the cache as holding `len` tokens without computing them: positions past what was
    /// fed keep whatever the cache held. Attention then reads `len` positions, as it would after
    /// a real prompt of that length, so decode speed can be measured at any fill without
    /// prefilling it (`kiln bench`). The token ids recorded for them are 0.
    pub fn assume_filled(&mut self, len: usize) -> Result<()> {
        if len > self.context() {
            return Err(KilnError::Request(format!("a fill of {len} exceeds the context of {}", self.context())));
        }
        self.tokens.resize(len, 0);
        Ok(())
    }

    /// Feed `ids` in one step and return the attention probabilities of `layers`
    /// ([`LayerAttention`]: per query head, each token's softmax over the keys it sees, earlier
    /// turns included). For `kiln attention`.
    pub fn attention_maps(&mut self, ids: &[u32], layers: &[usize]) -> Result<Vec<LayerAttention>> {
        self.probed_step(ids, "attention maps", |runner, step| runner.attention_maps(step, layers))
    }

    /// Feed `ids` in one step and return the experts each token chose in the mixture-of-experts
    /// layers `layers`, with their weights.
    pub fn routing(&mut self, ids: &[u32], layers: &[usize]) -> Result<Vec<LayerRouting>> {
        self.probed_step(ids, "routing", |runner, step| runner.routing(step, layers))
    }

    /// Feed `ids` as one step that `run` records probes of (what it reads needs the whole prompt
    /// in one step), then append them.
    fn probed_step<T>(
        &mut self,
        ids: &[u32],
        what: &str,
        run: impl FnOnce(&mut Runner<'m>, SeqStep<'_>) -> Result<T>,
    ) -> Result<T> {
        self.check_room(ids.len())?;
        if ids.len() > self.runner.max_step_tokens() {
            return Err(KilnError::Request(format!(
                "{what} take the prompt in one step: {} tokens, at most {}",
                ids.len(),
                self.runner.max_step_tokens()
            )));
        }
        let wanted = Wanted::None;
        let step = SeqStep {
            tokens: ids,
            pos0: self.tokens.len(),
            block_table: &self.block_table,
            wanted,
            adapters: self.adapters,
        };
        let out = run(&mut self.runner, step)?;
        self.tokens.extend_from_slice(ids);
        Ok(out)
    }

    /// Layer `layer`'s keys as the cache holds them, (n_kv_heads, slots, head_dim); position p is
    /// slot p (a session's block table is the identity).
    pub fn k_cache(&self, layer: usize) -> Result<Vec<f32>> {
        self.runner.cache.read_k(&self.model().gpu, layer)
    }

    /// Dispatches in a greedy decode step, once one has run.
    pub fn decode_dispatches(&self) -> Option<usize> {
        self.runner.dispatches(PlanKey { tokens: 1, rows: 1, argmax: true })
    }

    /// Bytes of GPU memory this session's activations hold (the KV cache aside).
    pub fn activation_bytes(&self) -> u64 {
        self.runner.activation_bytes()
    }

    /// Feed `ids` and return the logits after the last one (vocab floats).
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.feed_with(ids, Readback::Logits)?.logits)
    }

    /// Feed `ids` and return the greedy next token, chosen on the GPU (4 bytes read back).
    pub fn feed_greedy(&mut self, ids: &[u32]) -> Result<u32> {
        Ok(self.feed_with(ids, Readback::Argmax)?.argmax[0])
    }

    fn feed_with(&mut self, ids: &[u32], readback: Readback) -> Result<crate::engine::batch::StepOutput> {
        self.check_room(ids.len())?;
        let chunks: Vec<&[u32]> = ids.chunks(self.runner.max_step_tokens()).collect();
        let last = chunks.len() - 1;
        for chunk in &chunks[..last] {
            self.step(chunk, Wanted::None, readback)?;
        }
        self.step(chunks[last], Wanted::Last, readback)
    }

    /// Feed `ids` in one step and return every row (speculative verification: the logits or
    /// greedy picks after each of them, for the weight reads of one step).
    pub(crate) fn feed_rows(&mut self, ids: &[u32], readback: Readback) -> Result<crate::engine::batch::StepOutput> {
        self.check_room(ids.len())?;
        let most = self.runner.max_step_tokens().min(self.runner.max_rows());
        if ids.len() > most {
            return Err(KilnError::Request(format!("{} tokens in one verification step, at most {most}", ids.len())));
        }
        self.step(ids, Wanted::All, readback)
    }

    /// Most tokens [`Session::feed_rows`] takes in one step.
    pub(crate) fn max_rows_per_step(&self) -> usize {
        self.runner.max_step_tokens().min(self.runner.max_rows())
    }

    /// Feed `ids` and return the logits after every one of them, (ids.len(), vocab) row-major.
    pub fn feed_all(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_room(ids.len())?;
        let vocab = self.model().config.vocab_size;
        let rows = self.runner.max_rows().min(self.runner.max_step_tokens());
        let mut out = Vec::with_capacity(ids.len() * vocab);
        for chunk in ids.chunks(rows) {
            out.extend(self.step(chunk, Wanted::All, Readback::Logits)?.logits);
        }
        Ok(out)
    }

    /// A prompt of `prompt_len` tokens and up to `max_tokens` new ones fit after what the session
    /// holds.
    pub(crate) fn check_generation(&self, prompt_len: usize, max_tokens: usize) -> Result<()> {
        if prompt_len == 0 {
            return Err(KilnError::Request("the prompt is empty".into()));
        }
        let needed = self.tokens.len() + prompt_len + max_tokens;
        if needed > self.context() {
            return Err(KilnError::Request(format!(
                "{} prompt tokens + {} new tokens{} exceed the context of {} tokens",
                prompt_len,
                max_tokens,
                if self.tokens.is_empty() { String::new() } else { format!(" + {} earlier tokens", self.tokens.len()) },
                self.context()
            )));
        }
        Ok(())
    }

    /// Feed `prompt` and generate up to `params.max_tokens` tokens, calling `on_text` with each
    /// piece of decoded text as soon as it is complete UTF-8.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        params.sampling.validate()?;
        self.check_generation(prompt.len(), params.max_tokens)?;
        let model = self.model();
        let mut sampler = Sampler::new(params.sampling.clone());
        let gpu_greedy = params.sampling.is_plain_argmax();
        let prompt_end = self.tokens.len() + prompt.len();
        let mut output = Output::new(model, params, prompt.len(), &mut on_text);

        let mut next = self.next_token(prompt, gpu_greedy, &mut sampler, prompt_end)?;
        output.prefilled();
        let stop = loop {
            if let Some(stop) = output.push(next)? {
                // At max_tokens the last token is not fed: nothing would read its logits.
                break stop;
            }
            next = self.next_token(&[next], gpu_greedy, &mut sampler, prompt_end)?;
        };
        output.finish(stop)
    }

    /// Feed `ids` and pick the next token; tokens past `prompt_end` are the generated ones.
    pub(crate) fn next_token(
        &mut self,
        ids: &[u32],
        gpu_greedy: bool,
        sampler: &mut Sampler,
        prompt_end: usize,
    ) -> Result<u32> {
        if gpu_greedy {
            return self.feed_greedy(ids);
        }
        let mut logits = self.feed(ids)?;
        Ok(sampler.sample_output(&mut logits, &self.tokens, prompt_end))
    }
}
