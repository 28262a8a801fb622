//! The batched engine: many sequences per step over a paged, prefix-sharing KV cache.
//!
//! Requests are submitted from any thread ([`Engine::submit`]) and stream back [`Event`]s. One
//! engine thread owns the GPU work: each step it asks the [`scheduler`] which sequences compute
//! how many tokens (every running sequence's next token plus chunks of waiting prompts, within
//! a token budget), runs them as one batched forward step ([`batch::Runner`]) and samples each
//! sequence's next token (greedy picks for the whole step in one GPU argmax dispatch; other
//! samplers on the rows they need). Full blocks of every sequence go into the prefix cache
//! ([`block_pool`]), so a prompt that starts like an earlier one reuses its blocks.
//!
//! ```no_run
//! use kiln::engine::{Engine, EngineConfig, Event, RequestParams};
//! use kiln::{Gpu, Model};
//! use std::sync::Arc;
//! # fn main() -> kiln::Result<()> {
//! let model = Arc::new(Model::load("model.gguf".as_ref(), Gpu::new()?, &mut |_, _| {})?);
//! let engine = Engine::start(model.clone(), EngineConfig::default())?;
//! let prompt = model.tokenizer.encode("The capital of France is", true)?;
//! let request = engine.submit(prompt, RequestParams::default())?;
//! for event in request.events() {
//!     match event {
//!         Event::Token { text, .. } | Event::Text(text) => print!("{text}"),
//!         Event::Done { reason, .. } => println!("\n({reason:?})"),
//!         Event::Failed(message) => eprintln!("failed: {message}"),
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod batch;
pub mod block_pool;
pub mod lookup;
pub mod scheduler;
pub mod sequence;

use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::{KilnError, Result};
use batch::{Readback, Runner, SeqStep, Wanted};
use scheduler::{Scheduled, Scheduler};
use sequence::Sequence;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the engine is sized.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Positions per KV block.
    pub block_size: u32,
    /// Bytes for the KV cache pool; `None`: as much as the weights take, between 256 MiB and
    /// 4 GiB, within one binding per layer.
    pub kv_memory: Option<u64>,
    /// Most tokens one step computes (decode tokens plus prompt chunks).
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most positions one sequence may reach; `None`: the model's context, at most 4096.
    pub max_context: Option<usize>,
    /// Most requests waiting to start; more are refused with [`KilnError::Busy`].
    pub max_waiting: usize,
    /// Speculative decoding by prompt lookup for greedy requests: up to this many tokens drafted
    /// per sequence and step, checked in the same step (0: off). The output is unchanged.
    pub lookup_draft_tokens: usize,
    /// Drafts fill a step only up to this many tokens in all: past the size where a step costs
    /// about what a one-token step does, checking drafts slows the batch down (`None`: 12 on CPU
    /// adapters, measured in benches/RESULTS.md; 64 on GPUs).
    pub lookup_step_tokens: Option<usize>,
}

/// The KV pool an [`EngineConfig`] gives a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvPoolSize {
    pub blocks: u32,
    pub block_size: u32,
    pub tokens: u64,
    pub bytes: u64,
}

impl EngineConfig {
    /// The pool: `kv_memory` (or the default budget) in whole blocks, each layer's K within one
    /// storage binding.
    pub fn kv_pool(&self, model: &Model) -> Result<KvPoolSize> {
        let c = &model.config;
        let block_size = self.block_size.max(1);
        let per_token = c.kv_bytes_per_token(model.gpu.kv_element_bytes() as usize) as u64;
        let budget = self.kv_memory.unwrap_or_else(|| model.load_stats.weight_bytes.clamp(256 << 20, 4 << 30));
        let per_layer_token = (per_token / (2 * c.n_layers as u64).max(1)).max(1);
        let max_slots = model.gpu.max_binding / per_layer_token;
        let blocks = ((budget / per_token.max(1)).min(max_slots) / block_size as u64).min(u32::MAX as u64 / 2) as u32;
        if blocks == 0 {
            return Err(KilnError::Request(format!(
                "a KV memory of {budget} bytes holds no block of {block_size} positions ({per_token} bytes a position)"
            )));
        }
        let tokens = blocks as u64 * block_size as u64;
        Ok(KvPoolSize { blocks, block_size, tokens, bytes: tokens * per_token })
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            kv_memory: None,
            max_step_tokens: 256,
            max_running: 64,
            max_context: None,
            max_waiting: 1024,
            lookup_draft_tokens: 0,
            lookup_step_tokens: None,
        }
    }
}

/// What a request asks for.
#[derive(Clone, Debug)]
pub struct RequestParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the model's end-of-sequence ids.
    pub stop_at_eos: bool,
    /// Stop when the text contains any of these; the stop string itself is not sent.
    pub stop: Vec<String>,
    /// Report each generated token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// The model's LoRA adapters this request applies (bit i: adapter i; 0: the base model).
    pub adapters: u32,
}

impl Default for RequestParams {
    fn default() -> Self {
        RequestParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_at_eos: true,
            stop: Vec::new(),
            logprobs: None,
            adapters: 0,
        }
    }
}

/// A generated token's log-probability under the model (softmax of the raw logits), and the
/// most likely tokens' (most likely first).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a sequence ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id (not sent).
    Eos,
    /// One of the request's stop strings (not sent).
    Stop(String),
    /// `max_tokens` generated.
    MaxTokens,
    /// Cancelled by the client.
    Cancelled,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
}

/// What a request streams back, in order: tokens, maybe a last piece of text, then `Done` (or
/// `Failed`).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (empty while text is held back: an
    /// incomplete character, or what may be the start of a stop string).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Text held back until the end.
    Text(String),
    Done {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

/// A submitted request: its events, and a way to cancel it. Dropping it cancels the request.
pub struct Request {
    pub id: u64,
    events: Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

/// All of a finished request.
#[derive(Clone, Debug)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

impl Request {
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// The next event, waiting at most `timeout` (`None` on time-out or after the last event).
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Stop generating; the engine frees the sequence's blocks at its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Wait for the whole result.
    pub fn wait(self) -> Result<Completion> {
        let (mut tokens, mut text) = (Vec::new(), String::new());
        for event in self.events.iter() {
            match event {
                Event::Token { id, text: t, .. } => {
                    tokens.push(id);
                    text += &t;
                }
                Event::Text(t) => text += &t,
                Event::Done { reason, usage } => return Ok(Completion { tokens, text, reason, usage }),
                Event::Failed(message) => return Err(KilnError::Request(message)),
            }
        }
        Err(KilnError::Stopped("it ended before the request finished".into()))
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A snapshot of the engine's state, refreshed every step.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_total: u32,
    /// Blocks referenced by some sequence.
    pub blocks_used: u32,
    /// Blocks holding a reusable full block of some prefix.
    pub blocks_cached: u32,
    pub block_size: u32,
    pub kv_bytes: u64,
    pub steps: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Tokens drafted by prompt lookup, and how many of them the model confirmed.
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    /// A broken block-pool invariant, checked whenever the engine goes idle (never expected).
    pub pool_error: Option<String>,
    /// Why the engine stopped for good (the GPU device was lost); `None` while it serves.
    pub stopped: Option<String>,
}

struct Submission {
    id: u64,
    prompt: Vec<u32>,
    params: RequestParams,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
    /// Start only once this request's prompt is in the cache (the choices of one request).
    after: Option<u64>,
}

pub struct Engine {
    model: Arc<Model>,
    submissions: Option<Sender<Submission>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<EngineStats>>,
    /// Submitted and not yet finished.
    in_flight: Arc<AtomicUsize>,
    next_id: AtomicUsize,
    blocks: u32,
    block_size: u32,
    max_context: usize,
    max_waiting: usize,
    max_running: usize,
}

impl Engine {
    /// Size the KV pool, start the engine thread. Fails if the pool or the step buffers cannot
    /// be allocated.
    pub fn start(model: Arc<Model>, config: EngineConfig) -> Result<Engine> {
        // The runner checks the context against the model's.
        let max_context = config.max_context.unwrap_or_else(|| model.default_context());
        let pool = config.kv_pool(&model)?;
        let (blocks, block_size) = (pool.blocks, pool.block_size);
        let max_step_tokens = config.max_step_tokens.max(1);
        let stats = Arc::new(Mutex::new(EngineStats {
            blocks_total: blocks,
            block_size,
            kv_bytes: pool.bytes,
            ..Default::default()
        }));
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        // The runner is made on the engine thread (it borrows the model there); its result comes
        // back before `start` returns, so allocation failures are the caller's error.
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (model, stats, in_flight) = (model.clone(), stats.clone(), in_flight.clone());
            let max_running = config.max_running.max(1);
            let lookup_draft_tokens = config.lookup_draft_tokens;
            let lookup_step_tokens =
                config.lookup_step_tokens.unwrap_or(if model.gpu.is_cpu_adapter() { 12 } else { 64 });
            std::thread::Builder::new()
                .name("kiln-engine".into())
                .spawn(move || {
                    // At most one logit row per running sequence fits a step.
                    let runner = Runner::new(&model, blocks, block_size, max_step_tokens as u32, max_context);
                    let (runner, max_running) = match runner {
                        Ok(r) => {
                            let max_running = max_running.min(r.max_rows());
                            let _ = ready_tx.send(Ok(max_running));
                            (r, max_running)
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let scheduler = Scheduler::new(
                        blocks,
                        block_size as usize,
                        runner.max_step_tokens(),
                        max_running,
                        runner.max_rows(),
                    );
                    EngineLoop {
                        model: &model,
                        runner,
                        scheduler,
                        stats,
                        in_flight,
                        lookup_draft_tokens,
                        lookup_step_tokens,
                    }
                    .run(rx);
                })
                .map_err(|e| KilnError::Request(format!("could not start the engine thread: {e}")))?
        };
        let max_running =
            ready_rx.recv().map_err(|_| KilnError::Request("the engine thread stopped while starting".into()))??;
        Ok(Engine {
            model,
            submissions: Some(tx),
            thread: Some(thread),
            stats,
            in_flight,
            next_id: AtomicUsize::new(1),
            blocks,
            block_size,
            max_context,
            max_waiting: config.max_waiting,
            max_running,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Positions one sequence may reach.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Queue a request. Fails at once, with nothing queued, if it can never be served (empty
    /// prompt, token ids outside the vocabulary, bad sampling values, prompt + max_tokens past
    /// the context or larger than the whole KV pool) or if the queue is full ([`KilnError::Busy`]).
    pub fn submit(&self, prompt: Vec<u32>, params: RequestParams) -> Result<Request> {
        Ok(self.submit_n(prompt, params, 1)?.remove(0))
    }

    /// Queue `n` choices of one prompt (OpenAI's `n`): the first computes the prompt, the others
    /// start once it is in the prefix cache and share its blocks. Choice i samples with seed
    /// `seed + i`. All are queued, or none.
    pub fn submit_n(&self, prompt: Vec<u32>, params: RequestParams, n: usize) -> Result<Vec<Request>> {
        // An engine that stopped for good (a lost device) says why, before its loop is gone.
        if let Some(why) = self.stats().stopped {
            return Err(KilnError::Stopped(why));
        }
        self.check(&prompt, &params, n)?;
        let limit = self.max_waiting + self.max_running;
        if self.in_flight.fetch_add(n, Ordering::SeqCst) + n > limit {
            self.in_flight.fetch_sub(n, Ordering::SeqCst);
            return Err(KilnError::Busy(format!("{limit} requests are already queued or running")));
        }
        let mut requests = Vec::with_capacity(n);
        let mut first = None;
        for i in 0..n {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
            let (events_tx, events) = mpsc::channel();
            let cancel = Arc::new(AtomicBool::new(false));
            let mut params = params.clone();
            params.sampling.seed = params.sampling.seed.wrapping_add(i as u64);
            let submission = Submission {
                id,
                prompt: prompt.clone(),
                params,
                events: events_tx,
                cancel: cancel.clone(),
                after: first,
            };
            first = first.or(Some(id));
            let sent = self.submissions.as_ref().map(|s| s.send(submission).is_ok()).unwrap_or(false);
            if !sent {
                self.in_flight.fetch_sub(n - i, Ordering::SeqCst);
                let why = self.stats().stopped.unwrap_or_else(|| "no new requests are taken".into());
                return Err(KilnError::Stopped(why));
            }
            requests.push(Request { id, events, cancel });
        }
        Ok(requests)
    }

    fn check(&self, prompt: &[u32], params: &RequestParams, n: usize) -> Result<()> {
        params.sampling.validate()?;
        if prompt.is_empty() {
            return Err(KilnError::Request("the prompt is empty".into()));
        }
        if n == 0 {
            return Err(KilnError::Request("n must be at least 1".into()));
        }
        let vocab = self.model.config.vocab_size as u32;
        if let Some(t) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(KilnError::Request(format!("token id {t} is outside the vocabulary of {vocab}")));
        }
        if params.max_tokens == 0 {
            return Err(KilnError::Request("max_tokens must be at least 1".into()));
        }
        self.model.weights.lora.check(params.adapters)?;
        let needed = prompt.len() + params.max_tokens;
        if needed > self.max_context {
            return Err(KilnError::Request(format!(
                "{} prompt tokens + {} new tokens exceed the context of {} tokens",
                prompt.len(),
                params.max_tokens,
                self.max_context
            )));
        }
        let pool_tokens = self.blocks as usize * self.block_size as usize;
        if needed > pool_tokens {
            return Err(KilnError::Request(format!(
                "{needed} tokens can never fit the KV cache of {pool_tokens} tokens (raise --kv-memory)"
            )));
        }
        Ok(())
    }

    /// Stop taking requests, let the engine finish what it has, and wait for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.submissions.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

struct EngineLoop<'m> {
    model: &'m Model,
    runner: Runner<'m>,
    scheduler: Scheduler<'m>,
    stats: Arc<Mutex<EngineStats>>,
    in_flight: Arc<AtomicUsize>,
    /// Most tokens prompt lookup drafts per sequence and step (0: no speculation).
    lookup_draft_tokens: usize,
    /// Most tokens of a step with drafts in it.
    lookup_step_tokens: usize,
}

impl<'m> EngineLoop<'m> {
    fn run(mut self, submissions: Receiver<Submission>) {
        let mut open = true;
        loop {
            // Idle: wait for work. Busy: take whatever has arrived and go on.
            if self.scheduler.is_idle() {
                if !open {
                    return;
                }
                match submissions.recv() {
                    Ok(s) => self.accept(s),
                    Err(_) => return,
                }
            }
            loop {
                match submissions.try_recv() {
                    Ok(s) => self.accept(s),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            if let Err(lost) = self.step() {
                self.stop(lost, submissions);
                return;
            }
            self.publish();
        }
    }

    /// The device is gone: every request, running, waiting or still arriving, fails with why,
    /// and the engine ends (later submissions get `KilnError::Stopped` with the same reason).
    fn stop(mut self, lost: KilnError, submissions: Receiver<Submission>) {
        let message = lost.to_string();
        if let Ok(mut s) = self.stats.lock() {
            s.stopped = Some(message.clone());
        }
        let mut all: Vec<Sequence<'m>> = self.scheduler.running.drain(..).collect();
        all.extend(self.scheduler.waiting.drain(..));
        for seq in all {
            self.count_finished(&seq);
            seq.fail(message.clone());
        }
        // Submissions sent before the receiver goes fail too; any sent after find it gone.
        for s in submissions.try_iter() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = s.events.send(Event::Failed(message.clone()));
        }
    }

    fn accept(&mut self, s: Submission) {
        let mut seq = Sequence::new(s.id, s.prompt, s.params, &self.model.tokenizer, s.events, s.cancel);
        seq.after = s.after;
        self.scheduler.waiting.push_back(seq);
    }

    fn finish(&mut self, seq: Sequence<'m>, reason: FinishReason) {
        self.count_finished(&seq);
        seq.finish(reason);
    }

    fn count_finished(&mut self, seq: &Sequence<'m>) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut s) = self.stats.lock() {
            s.prompt_tokens += seq.prompt_len as u64;
            s.cached_prompt_tokens += seq.cached_tokens as u64;
        }
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.scheduler.running.len() {
            if self.scheduler.running[i].is_cancelled() {
                let seq = self.scheduler.remove_running(i);
                self.finish(seq, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
        let sched = &mut self.scheduler;
        let (cancelled, kept): (Vec<_>, Vec<_>) = sched.waiting.drain(..).partition(|s| s.is_cancelled());
        sched.waiting.extend(kept);
        for seq in cancelled {
            // A preempted sequence may come back here: it holds no blocks.
            self.finish(seq, FinishReason::Cancelled);
        }
    }

    /// One forward step over what the scheduler picks. Errors only when the device is lost (a
    /// failed step otherwise fails just its own sequences).
    fn step(&mut self) -> Result<()> {
        self.propose_drafts();
        let scheduled = self.scheduler.schedule();
        if scheduled.is_empty() {
            return Ok(());
        }
        let running = &self.scheduler.running;
        // A sequence with a draft feeds its last token and the drafted ones, and wants every
        // row: the model's pick after each (speculative verification in the batch).
        let drafted: Vec<Option<Vec<u32>>> = scheduled
            .iter()
            .map(|s| {
                let seq = &running[s.index];
                (!seq.draft.is_empty()).then(|| {
                    let mut ids = seq.tokens[seq.computed..].to_vec();
                    ids.extend_from_slice(&seq.draft);
                    ids
                })
            })
            .collect();
        let steps: Vec<SeqStep<'_>> = scheduled
            .iter()
            .zip(&drafted)
            .map(|(s, d)| {
                let seq = &running[s.index];
                let (tokens, wanted) = match d {
                    Some(ids) => (ids.as_slice(), Wanted::All),
                    None => {
                        let last = seq.computed + s.n == seq.tokens.len();
                        (&seq.tokens[seq.computed..seq.computed + s.n], if last { Wanted::Last } else { Wanted::None })
                    }
                };
                SeqStep { tokens, pos0: seq.computed, block_table: &seq.blocks, wanted, adapters: seq.params.adapters }
            })
            .collect();
        let rows: Vec<&Sequence<'_>> = steps
            .iter()
            .zip(&scheduled)
            .filter(|(st, _)| st.wanted != Wanted::None)
            .map(|(_, s)| &running[s.index])
            .collect();
        let all_argmax = rows.iter().all(|s| !s.needs_logits());
        let any_argmax = rows.iter().any(|s| !s.needs_logits());
        let readback = match (all_argmax, any_argmax) {
            (true, _) => Readback::Argmax,
            (false, true) => Readback::Both,
            (false, false) => Readback::Logits,
        };
        let result = self.runner.step(&steps, readback);
        drop(steps);
        let out = match result {
            Ok(out) => out,
            Err(e @ KilnError::DeviceLost(_)) => return Err(e),
            Err(e) => {
                // The step failed as a whole (a device error): its sequences fail, the rest go on.
                let message = format!("the forward step failed: {e}");
                for s in scheduled.iter().rev() {
                    let seq = self.scheduler.remove_running(s.index);
                    self.count_finished(&seq);
                    seq.fail(message.clone());
                }
                return Ok(());
            }
        };
        let vocab = self.model.config.vocab_size;
        let eos = &self.model.generation.eos_token_ids;
        let mut row = 0;
        let mut finished = Vec::new();
        let (mut drafted_total, mut accepted_total, mut generated) = (0u64, 0u64, 0u64);
        for s in &scheduled {
            if !self.scheduler.running[s.index].draft.is_empty() {
                // Keep the drafted tokens the model agrees with, then its own next token; the
                // cache past them holds rejected positions, rewritten as the sequence goes on.
                let seq = &mut self.scheduler.running[s.index];
                let draft = std::mem::take(&mut seq.draft);
                let picks = &out.argmax[row..row + draft.len() + 1];
                row += draft.len() + 1;
                let accepted = draft.iter().zip(picks).take_while(|(d, p)| d == p).count();
                drafted_total += draft.len() as u64;
                accepted_total += accepted as u64;
                let mut done = None;
                for &id in &picks[..=accepted] {
                    generated += 1;
                    match seq.push_token(id, None, eos) {
                        Ok(None) => {}
                        Ok(Some(reason)) => done = Some(Ok(reason)),
                        Err(e) => done = Some(Err(e.to_string())),
                    }
                    if done.is_some() {
                        break;
                    }
                }
                match done {
                    Some(reason) => finished.push((s.index, reason)),
                    // The last token and the accepted drafts are in the cache now.
                    None => self.scheduler.advance(Scheduled { index: s.index, n: 1 + accepted }),
                }
                continue;
            }
            self.scheduler.advance(*s);
            let seq = &mut self.scheduler.running[s.index];
            if seq.computed < seq.tokens.len() {
                continue;
            }
            let (next, logprob) = if seq.needs_logits() {
                let raw = &out.logits[row * vocab..(row + 1) * vocab];
                let mut logits = raw.to_vec();
                let next = seq.sampler.sample_output(&mut logits, &seq.tokens, seq.prompt_len);
                let logprob = seq.params.logprobs.map(|top| {
                    let (logprob, top) = crate::sampling::logprobs(raw, next, top);
                    TokenLogprob { logprob, top }
                });
                (next, logprob)
            } else {
                (out.argmax[row], None)
            };
            row += 1;
            generated += 1;
            match seq.push_token(next, logprob, eos) {
                Ok(None) => {}
                Ok(Some(reason)) => finished.push((s.index, Ok(reason))),
                Err(e) => finished.push((s.index, Err(e.to_string()))),
            }
        }
        if let Ok(mut st) = self.stats.lock() {
            st.steps += 1;
            st.generated_tokens += generated;
            st.drafted_tokens += drafted_total;
            st.accepted_tokens += accepted_total;
        }
        // Highest index first, so the others stay valid.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (index, reason) in finished {
            let seq = self.scheduler.remove_running(index);
            match reason {
                Ok(reason) => self.finish(seq, reason),
                Err(message) => {
                    self.count_finished(&seq);
                    seq.fail(message);
                }
            }
        }
        Ok(())
    }

    /// Prompt lookup for every decoding greedy sequence: up to `lookup_draft_tokens` tokens that
    /// followed the latest earlier match of its last 2–3 tokens, within its max_tokens, its
    /// context and the step's tokens.
    fn propose_drafts(&mut self) {
        let k = self.lookup_draft_tokens;
        // Tokens left for drafts once every running sequence has its own, within the step size
        // where drafts still come nearly free (the scheduler also cuts drafts to the spare rows).
        let running = &mut self.scheduler.running;
        let step = self.lookup_step_tokens.min(self.runner.max_step_tokens());
        let mut spare_tokens = step.saturating_sub(running.len());
        for seq in running.iter_mut() {
            seq.draft.clear();
            let decoding = seq.computed + 1 == seq.tokens.len() && seq.generated() > 0;
            if k == 0 || !decoding || seq.needs_logits() {
                continue;
            }
            let room = [
                k,
                seq.params.max_tokens.saturating_sub(seq.generated() + 1),
                self.runner.max_context().saturating_sub(seq.tokens.len() + 1),
                spare_tokens,
            ];
            let most = room.into_iter().min().unwrap_or(0);
            if most > 0 {
                seq.draft = lookup::prompt_lookup(&seq.tokens, 2, 3, most);
                spare_tokens -= seq.draft.len();
            }
        }
    }

    fn publish(&mut self) {
        let sched = &self.scheduler;
        if let Ok(mut s) = self.stats.lock() {
            s.running = sched.running.len();
            s.waiting = sched.waiting.len();
            s.blocks_used = sched.pool.used_blocks();
            s.blocks_cached = sched.pool.cached_blocks();
            s.preemptions = sched.preemptions;
            if sched.is_idle() {
                s.pool_error = sched.pool.check().err();
            }
        }
    }
}
