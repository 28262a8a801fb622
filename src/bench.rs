//! Whole-model benchmarks (`kiln bench`): prefill and decode speed, time to first token, where
//! the GPU time goes, and how close decoding comes to the device's memory bandwidth, all
//! measured in one run so the ratios mean something on any machine.

use crate::engine::batch::{Readback, Runner, SeqStep, Wanted};
use crate::engine::{Engine, EngineConfig, Event, Request, RequestParams, Usage};
use crate::gpu::{Dispatch, Gpu};
use crate::model::Model;
use crate::ops::elementwise;
use crate::sampling::SamplingParams;
use crate::{GenerateParams, Result, Session};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// Best-of-3 seconds per repetition of `dispatches` recorded into one pass, repetitions sized
/// to about `budget` seconds, after a warm-up (GPU time where the adapter has timestamps).
pub fn best_seconds(gpu: &Gpu, label: &str, dispatches: &[&Dispatch], budget: f64) -> Result<f64> {
    let once = gpu.time(label, dispatches, 1)?;
    let reps = ((budget / once.max(1e-6)) as u32).clamp(1, 200);
    // Kernels slower than the budget (seconds on a software adapter) are measured once more.
    let runs = if once > budget { 1 } else { 3 };
    let mut best = f64::MAX;
    for _ in 0..runs {
        best = best.min(gpu.time(label, dispatches, reps)? / reps as f64);
    }
    Ok(best)
}

/// The device's copy bandwidth in GB/s (bytes read + bytes written per second), from a vec4
/// copy kernel over 64 MiB: the yardstick for every bandwidth-bound kernel.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let bytes = (64u64 << 20).min(gpu.max_binding / 16 * 16);
    let (src, dst) = (gpu.buffer("copy src", bytes)?, gpu.buffer("copy dst", bytes)?);
    let copy = elementwise::copy(gpu, &src, &dst, bytes)?;
    Ok(2.0 * bytes as f64 / best_seconds(gpu, "copy", &[&copy], 0.5)? / 1e9)
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// KV-cache fills at which decode speed is measured.
    pub fills: Vec<usize>,
    /// Also profile a prefill step op by op (one more prompt's worth of time).
    pub profile_prefill: bool,
    /// Numbers of concurrent greedy streams to serve through the batched engine (none: skip).
    pub concurrency: Vec<usize>,
    /// Prompt tokens of each concurrent stream.
    pub stream_prompt_tokens: usize,
    /// Length of a shared prefix (a system prompt) two requests in a row start with, to measure
    /// what the prefix cache saves of the second one's time to first token (0: skip).
    pub shared_prefix_tokens: usize,
    /// Speculative decoding to measure against plain decoding (none: skip).
    pub speculative: Option<SpeculativeBench>,
}

/// What `kiln bench` measures of speculative decoding: each drafter on code, rewrite and chat
/// prompts, at each fixed number of drafted tokens and adaptively, against plain decoding.
#[derive(Clone)]
pub struct SpeculativeBench {
    /// A draft model (sharing the target's vocabulary); prompt lookup is measured either way.
    pub draft: Option<Arc<Model>>,
    /// Fixed numbers of drafted tokens per step to measure, besides the adaptive choice.
    pub draft_tokens: Vec<usize>,
    /// Greedy tokens generated per prompt.
    pub gen_tokens: usize,
}

impl std::fmt::Debug for SpeculativeBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeculativeBench")
            .field("draft", &self.draft.as_ref().map(|m| m.dir.display().to_string()))
            .field("draft_tokens", &self.draft_tokens)
            .field("gen_tokens", &self.gen_tokens)
            .finish()
    }
}

/// One drafter on one prompt, against plain decoding of the same prompt in the same run.
#[derive(Clone, Debug)]
pub struct SpeculativeRun {
    pub prompt: &'static str,
    /// "lookup" or "draft".
    pub drafter: &'static str,
    /// Drafted tokens per step (`None`: adaptive, at most the largest fixed value).
    pub draft_tokens: Option<usize>,
    pub tokens: usize,
    pub plain_tok_s: f64,
    pub tok_s: f64,
    pub stats: crate::speculative::SpeculationStats,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_tokens: 128,
            gen_tokens: 32,
            fills: vec![0, 512, 2048],
            profile_prefill: true,
            concurrency: Vec::new(),
            stream_prompt_tokens: 32,
            shared_prefix_tokens: 0,
            speculative: None,
        }
    }
}

/// N concurrent greedy streams through the engine.
#[derive(Clone, Debug)]
pub struct ConcurrencyRun {
    pub streams: usize,
    /// Tokens all streams received per second while every stream was decoding (from the last
    /// stream's first token to the end).
    pub decode_tok_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    /// Inter-token latency across all streams.
    pub itl_p50_s: f64,
    pub itl_p99_s: f64,
}

/// Time to first token of two requests sharing a prefix, the second served from the cache.
#[derive(Clone, Debug)]
pub struct PrefixCacheRun {
    pub prefix_tokens: usize,
    pub first_ttft_s: f64,
    pub second_ttft_s: f64,
    pub cached_tokens: usize,
}

/// Decode speed at one cache fill.
#[derive(Clone, Debug)]
pub struct DecodeRun {
    pub fill: usize,
    pub tokens_per_second: f64,
    /// Bytes a decode step must read: every weight once, the KV cache at this fill.
    pub bytes_per_token: u64,
    pub gb_per_second: f64,
}

/// GPU time of one kind of dispatch within a step.
#[derive(Clone, Debug)]
pub struct OpTime {
    pub op: String,
    pub count: usize,
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub model: String,
    pub adapter: String,
    pub copy_gb_s: f64,
    pub prompt_tokens: usize,
    pub prefill_tok_s: f64,
    pub ttft_s: f64,
    pub decode: Vec<DecodeRun>,
    pub dispatches_per_token: usize,
    /// Op-by-op GPU time of one decode step at the first fill, and of one prefill step.
    pub decode_ops: Vec<OpTime>,
    pub prefill_ops: Vec<OpTime>,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub activation_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    pub concurrency: Vec<ConcurrencyRun>,
    /// Op-by-op GPU time of one decode step of the largest concurrency's sequences.
    pub batched_decode_ops: Vec<OpTime>,
    pub prefix_cache: Option<PrefixCacheRun>,
    pub speculative: Vec<SpeculativeRun>,
    /// Why a part could not be measured (no timestamps, a fill beyond the context).
    pub notes: Vec<String>,
}

/// The op a dispatch label names, without its layer: "gemv_rows model.layers.3.mlp.up_proj.weight"
/// → "gemv_rows up_proj".
fn op_name(label: &str) -> String {
    let mut words = label.split_whitespace();
    let kernel = words.next().unwrap_or("");
    match words.next() {
        None => kernel.to_string(),
        Some(tensor) => {
            let tensor = tensor.split('[').next().unwrap_or(tensor).trim_end_matches(".weight");
            let short = tensor.rsplit('.').next().unwrap_or(tensor);
            format!("{kernel} {short}")
        }
    }
}

/// Sum a profile by op, largest first.
fn by_op(profile: &[(String, f64)]) -> Vec<OpTime> {
    let mut ops: Vec<OpTime> = Vec::new();
    for (label, t) in profile {
        let op = op_name(label);
        match ops.iter_mut().find(|o| o.op == op) {
            Some(o) => {
                o.count += 1;
                o.seconds += t;
            }
            None => ops.push(OpTime { op, count: 1, seconds: *t }),
        }
    }
    ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    ops
}

/// A session of `ctx` positions applying every LoRA adapter the model holds (none: the base).
fn session(model: &Model, ctx: usize) -> Result<Session<'_>> {
    let mut s = Session::new(model, Some(ctx))?;
    s.set_adapters(model.weights.lora.all())?;
    Ok(s)
}

/// Bytes one decode step reads at a cache of `fill` tokens: every layer's weights (of a mixture
/// of experts, only the chosen experts'), the final
/// norm, the lm-head, one embedding row (the whole table when it is the tied lm-head), and K
/// and V of `fill + 1` positions per layer.
pub fn decode_bytes_per_token(model: &Model, fill: usize) -> u64 {
    let c = &model.config;
    let w = &model.weights;
    let vector = |b: &wgpu::Buffer| b.size();
    let mut bytes = vector(&w.norm) + w.lm_head().bytes();
    if w.lm_head.is_some() {
        bytes += w.embed_tokens.bytes() / w.embed_tokens.rows as u64;
    }
    for l in &w.layers {
        bytes += [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj].iter().map(|m| m.bytes()).sum::<u64>();
        // A mixture of experts: only the router, the chosen experts and the shared one.
        bytes += l.mlp.bytes_per_token(c.moe.as_ref().map_or(0, |m| m.top_k));
        bytes += vector(&l.input_layernorm) + vector(&l.post_attention_layernorm);
        let vectors = [&l.q_bias, &l.k_bias, &l.v_bias, &l.o_bias, &l.q_norm, &l.k_norm];
        bytes += vectors.iter().filter_map(|b| b.as_ref()).map(vector).sum::<u64>();
    }
    // LoRA adapters a measured sequence applies (all the model holds).
    bytes += w.lora.modules.values().map(|m| m.ab.size()).sum::<u64>();
    bytes + c.kv_bytes_per_token(model.gpu.kv_element_bytes() as usize) as u64 * (fill as u64 + 1)
}

/// Benchmark `model`: copy bandwidth, prefill of `prompt_tokens` random tokens (after a
/// warm-up), greedy decoding of `gen_tokens` at each fill, and op-by-op profiles.
pub fn run(model: &Arc<Model>, options: &BenchOptions, mut log: impl FnMut(&str)) -> Result<BenchReport> {
    let gpu = &model.gpu;
    let c = &model.config;
    let mut notes = Vec::new();
    log("measuring copy bandwidth");
    let copy_gb_s = copy_bandwidth(gpu)?;

    let max_fill = options.fills.iter().copied().max().unwrap_or(0);
    let want_ctx = options.prompt_tokens.max(max_fill) + options.gen_tokens + 2;
    let ctx = want_ctx.min(c.max_position_embeddings);
    let fills: Vec<usize> = options
        .fills
        .iter()
        .copied()
        .filter(|&f| {
            let fits = f + options.gen_tokens + 2 <= ctx;
            if !fits {
                notes.push(format!("fill {f} skipped: beyond the model's context of {}", c.max_position_embeddings));
            }
            fits
        })
        .collect();
    let mut session = session(model, ctx)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6e);
    let mut random_ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..c.vocab_size as u32)).collect() };

    // Prefill: the first run compiles pipelines and records the plan; the second is timed.
    let prompt = random_ids(options.prompt_tokens.clamp(1, ctx - 1));
    log(&format!("prefill of {} tokens (warm-up, then timed)", prompt.len()));
    session.feed_greedy(&prompt)?;
    session.rollback(0);
    let start = Instant::now();
    let mut next = session.feed_greedy(&prompt)?;
    let ttft_s = start.elapsed().as_secs_f64();
    let prefill_tok_s = prompt.len() as f64 / ttft_s;

    let mut decode = Vec::new();
    for &fill in &fills {
        log(&format!("decode of {} tokens at a fill of {fill}", options.gen_tokens));
        session.rollback(fill.min(session.tokens().len()));
        session.assume_filled(fill)?;
        next = session.feed_greedy(&[next])?; // warm-up at this fill
        let start = Instant::now();
        for _ in 0..options.gen_tokens {
            next = session.feed_greedy(&[next])?;
        }
        let tokens_per_second = options.gen_tokens as f64 / start.elapsed().as_secs_f64();
        // The timed steps ran at fills fill + 1 ..= fill + gen; take the middle.
        let bytes_per_token = decode_bytes_per_token(model, fill + 1 + options.gen_tokens / 2);
        decode.push(DecodeRun {
            fill,
            tokens_per_second,
            bytes_per_token,
            gb_per_second: bytes_per_token as f64 * tokens_per_second / 1e9,
        });
    }

    let (mut decode_ops, mut prefill_ops) = (Vec::new(), Vec::new());
    if gpu.caps.timestamps {
        log("profiling a decode step");
        session.rollback(fills.first().copied().unwrap_or(0).min(session.tokens().len()));
        session.assume_filled(fills.first().copied().unwrap_or(0))?;
        decode_ops = by_op(&session.profile_step(&[next], Wanted::Last, Readback::Argmax)?);
        if options.profile_prefill {
            log("profiling a prefill step");
            session.rollback(0);
            let step = &prompt[..prompt.len().min(crate::session::MAX_STEP_TOKENS)];
            prefill_ops = by_op(&session.profile_step(step, Wanted::Last, Readback::Argmax)?);
        }
    } else {
        notes.push(format!("no op-by-op profile: {} has no TIMESTAMP_QUERY", gpu.info.name));
    }
    let dispatches_per_token = session.decode_dispatches().unwrap_or(0);
    let (kv_cache_bytes, activation_bytes) = (session.kv_cache_bytes(), session.activation_bytes());
    drop(session);

    let concurrency = serve_streams(model, options, &mut log)?;
    let batched_decode_ops = match options.concurrency.iter().max() {
        Some(&n) if gpu.caps.timestamps => {
            by_op(&profile_batched_decode(model, n, options.stream_prompt_tokens, &mut log)?)
        }
        _ => Vec::new(),
    };
    let prefix_cache = shared_prefix(model, options, &mut log)?;
    let speculative = match &options.speculative {
        Some(spec) => speculate(model, spec, &mut log)?,
        None => Vec::new(),
    };

    Ok(BenchReport {
        model: model.dir.display().to_string(),
        adapter: gpu.describe(),
        copy_gb_s,
        prompt_tokens: prompt.len(),
        prefill_tok_s,
        ttft_s,
        decode,
        dispatches_per_token,
        decode_ops,
        prefill_ops,
        weight_bytes: model.load_stats.weight_bytes,
        kv_cache_bytes,
        activation_bytes,
        peak_rss_bytes: crate::model::peak_rss_bytes(),
        concurrency,
        batched_decode_ops,
        prefix_cache,
        speculative,
        notes,
    })
}

/// The prompts speculative decoding is measured on: writing code, rewriting code given in the
/// prompt (where prompt lookup shines), and chat.
const SPECULATIVE_PROMPTS: [(&str, &str); 3] = [
    ("code", "Write a Python function that returns the n-th Fibonacci number, with a docstring and type hints."),
    (
        "rewrite",
        "Rewrite this function to use a list comprehension. Keep its name, arguments and docstring.\n\n\
         def even_squares(numbers):\n    \"\"\"Return the squares of the even numbers in `numbers`, in order.\"\"\"\n    \
         result = []\n    for n in numbers:\n        if n % 2 == 0:\n            result.append(n * n)\n    \
         return result\n",
    ),
    ("chat", "What are three good ways to learn a new language? Answer in a short paragraph."),
];

/// Greedy decoding of each prompt plainly and speculatively (prompt lookup, and the draft model
/// if any), at each fixed draft length and adaptively, timed in the same run. Each configuration
/// runs once untimed first (pipelines, plans).
fn speculate(model: &Arc<Model>, bench: &SpeculativeBench, log: &mut impl FnMut(&str)) -> Result<Vec<SpeculativeRun>> {
    use crate::speculative::Speculator;
    let params = GenerateParams { max_tokens: bench.gen_tokens, ..Default::default() };
    let most = bench.draft_tokens.iter().copied().max().unwrap_or(5);
    let mut configs: Vec<Option<usize>> = bench.draft_tokens.iter().map(|&k| Some(k)).collect();
    configs.push(None);
    let mut runs = Vec::new();
    for (name, text) in SPECULATIVE_PROMPTS {
        let ids = if model.tokenizer.has_chat_template() {
            model.tokenizer.encode_chat(&[crate::tokenizer::ChatMessage::new("user", text)], true)?
        } else {
            model.tokenizer.encode(text, true)?
        };
        let ctx = (ids.len() + bench.gen_tokens + 1).min(model.config.max_position_embeddings);
        let timed = |generate: &mut dyn FnMut(&mut Session) -> Result<crate::Generation>| -> Result<crate::Generation> {
            generate(&mut session(model, ctx)?)?; // warm-up
            generate(&mut session(model, ctx)?)
        };
        log(&format!("speculative decoding, {name} prompt: plain"));
        let plain = timed(&mut |s| s.generate(&ids, &params, |_| {}))?;
        let drafters: Vec<&'static str> = if bench.draft.is_some() { vec!["lookup", "draft"] } else { vec!["lookup"] };
        for drafter in drafters {
            for &k in &configs {
                log(&format!(
                    "speculative decoding, {name} prompt: {drafter}, {}",
                    k.map_or("adaptive".into(), |k| format!("{k} a step"))
                ));
                let make = || -> Result<Speculator<'_>> {
                    let spec = match (drafter, &bench.draft) {
                        ("draft", Some(draft)) => Speculator::with_model(draft, model, ctx, k.unwrap_or(most))?,
                        _ => Speculator::lookup(k.unwrap_or(most))?,
                    };
                    Ok(if k.is_some() { spec.fixed() } else { spec })
                };
                make()?.generate(&mut session(model, ctx)?, &ids, &params, |_| {})?; // warm-up
                let mut spec = make()?;
                let g = spec.generate(&mut session(model, ctx)?, &ids, &params, |_| {})?;
                if g.tokens != plain.tokens {
                    return Err(crate::KilnError::Request(format!(
                        "speculative greedy output differs from plain decoding on the {name} prompt ({drafter})"
                    )));
                }
                runs.push(SpeculativeRun {
                    prompt: name,
                    drafter,
                    draft_tokens: k,
                    tokens: g.tokens.len(),
                    plain_tok_s: plain.decode_tokens_per_second(),
                    tok_s: g.decode_tokens_per_second(),
                    stats: spec.stats.clone(),
                });
            }
        }
    }
    Ok(runs)
}

/// GPU time by dispatch of one decode step of `n` sequences, each `prompt_tokens` long, with the
/// batched engine's step executor.
fn profile_batched_decode(
    model: &Model,
    n: usize,
    prompt_tokens: usize,
    log: &mut impl FnMut(&str),
) -> Result<Vec<(String, f64)>> {
    log(&format!("profiling a decode step of {n} sequences"));
    let bs = 16usize;
    let len = prompt_tokens.max(1) + 1;
    let per_seq = len.div_ceil(bs);
    let mut runner = Runner::new(model, (n * per_seq) as u32, bs as u32, n as u32, len)?;
    let tables: Vec<Vec<u32>> = (0..n).map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect()).collect();
    // The cache content does not change the work: attend over whatever the blocks hold.
    let ids = vec![1u32];
    let steps: Vec<SeqStep<'_>> = tables
        .iter()
        .map(|t| SeqStep { tokens: &ids, pos0: len - 1, block_table: t, wanted: Wanted::Last, adapters: 0 })
        .collect();
    runner.step(&steps, Readback::Argmax)?; // plan and pipelines
    runner.profile_step(&steps, Readback::Argmax)
}

/// The `q`-quantile of `v` (nearest rank), 0 when empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The arrival time of every token of a request, and its usage (blocking until it ends).
fn token_times(request: &Request) -> Result<(Vec<Instant>, Usage)> {
    let mut times = Vec::new();
    for event in request.events().iter() {
        match event {
            Event::Token { .. } => times.push(Instant::now()),
            Event::Text(_) => {}
            Event::Done { usage, .. } => return Ok((times, usage)),
            Event::Failed(m) => return Err(crate::KilnError::Request(m)),
        }
    }
    Err(crate::KilnError::Stopped("it ended before the request finished".into()))
}

fn bench_engine(model: &Arc<Model>, streams: usize, tokens_per_stream: usize) -> Result<Engine> {
    let per_token = model.config.kv_bytes_per_token(model.gpu.kv_element_bytes() as usize) as u64;
    // Every stream's blocks, plus a block of slack each.
    let kv_tokens = (streams * (tokens_per_stream + 16)) as u64;
    let config = EngineConfig {
        kv_memory: Some(kv_tokens * per_token),
        max_running: streams.max(1),
        max_context: Some(tokens_per_stream.clamp(16, model.config.max_position_embeddings)),
        ..Default::default()
    };
    Engine::start(model.clone(), config)
}

/// Serve N concurrent greedy streams of random prompts for each N in `options.concurrency`.
fn serve_streams(
    model: &Arc<Model>,
    options: &BenchOptions,
    log: &mut impl FnMut(&str),
) -> Result<Vec<ConcurrencyRun>> {
    let Some(&most) = options.concurrency.iter().max() else { return Ok(Vec::new()) };
    let c = &model.config;
    let per_stream = options.stream_prompt_tokens.max(1) + options.gen_tokens.max(2);
    let engine = bench_engine(model, most, per_stream)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x73747265616d);
    let params = RequestParams {
        max_tokens: options.gen_tokens.max(2),
        sampling: SamplingParams::default(),
        stop_at_eos: false,
        adapters: model.weights.lora.all(),
        ..Default::default()
    };
    // Warm-up: compiles the pipelines the batched steps use.
    let warm: Vec<u32> =
        (0..options.stream_prompt_tokens.max(1)).map(|_| rng.random_range(0..c.vocab_size as u32)).collect();
    engine.submit(warm, RequestParams { max_tokens: 2, ..params.clone() })?.wait()?;
    let mut runs = Vec::new();
    for &streams in &options.concurrency {
        log(&format!(
            "{streams} concurrent streams of {} + {} tokens",
            options.stream_prompt_tokens, params.max_tokens
        ));
        let prompts: Vec<Vec<u32>> = (0..streams)
            .map(|_| {
                (0..options.stream_prompt_tokens.max(1)).map(|_| rng.random_range(0..c.vocab_size as u32)).collect()
            })
            .collect();
        let start = Instant::now();
        let requests = prompts.into_iter().map(|p| engine.submit(p, params.clone())).collect::<Result<Vec<_>>>()?;
        let times: Vec<Vec<Instant>> = std::thread::scope(|s| {
            let handles: Vec<_> = requests.into_iter().map(|r| s.spawn(move || Ok(token_times(&r)?.0))).collect();
            handles.into_iter().map(|h| h.join().expect("collector thread")).collect::<Result<Vec<_>>>()
        })?;
        // Steady state: from the last stream's first token to the first stream's last one, when
        // every stream is decoding (no prompt chunks, no stream finished yet).
        let all_decoding = times.iter().filter_map(|t| t.first()).max().copied().unwrap_or(start);
        let first_done = times.iter().filter_map(|t| t.last()).min().copied().unwrap_or(start);
        let in_window = times.iter().flatten().filter(|&&t| t > all_decoding && t <= first_done).count();
        let window = first_done.saturating_duration_since(all_decoding).as_secs_f64();
        let mut ttft: Vec<f64> =
            times.iter().filter_map(|t| t.first()).map(|t| t.duration_since(start).as_secs_f64()).collect();
        let mut itl: Vec<f64> =
            times.iter().flat_map(|t| t.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64())).collect();
        runs.push(ConcurrencyRun {
            streams,
            decode_tok_s: if window > 0.0 { in_window as f64 / window } else { 0.0 },
            ttft_p50_s: quantile(&mut ttft, 0.5),
            ttft_p99_s: quantile(&mut ttft, 0.99),
            itl_p50_s: quantile(&mut itl, 0.5),
            itl_p99_s: quantile(&mut itl, 0.99),
        });
    }
    Ok(runs)
}

/// Two requests that share `options.shared_prefix_tokens` of prompt, one after the other.
fn shared_prefix(
    model: &Arc<Model>,
    options: &BenchOptions,
    log: &mut impl FnMut(&str),
) -> Result<Option<PrefixCacheRun>> {
    let prefix_tokens = options.shared_prefix_tokens;
    if prefix_tokens == 0 {
        return Ok(None);
    }
    let c = &model.config;
    let engine = bench_engine(model, 2, prefix_tokens + 16 + 4)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x707265666978);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..c.vocab_size as u32)).collect() };
    let prefix = ids(prefix_tokens);
    let adapters = model.weights.lora.all();
    let params = RequestParams { max_tokens: 2, stop_at_eos: false, adapters, ..Default::default() };
    // Warm-up on an unrelated prompt of the same length (pipelines and plans).
    engine.submit(ids(prefix_tokens + 8), params.clone())?.wait()?;
    let ttft = |question: Vec<u32>| -> Result<(f64, usize)> {
        let prompt: Vec<u32> = prefix.iter().copied().chain(question).collect();
        let start = Instant::now();
        let (times, usage) = token_times(&engine.submit(prompt, params.clone())?)?;
        let first = times.first().map_or(0.0, |t| t.duration_since(start).as_secs_f64());
        Ok((first, usage.cached_tokens))
    };
    log(&format!("time to first token with a {prefix_tokens}-token shared prefix, cold then cached"));
    let (first_ttft_s, _) = ttft(ids(8))?;
    let (second_ttft_s, cached_tokens) = ttft(ids(8))?;
    Ok(Some(PrefixCacheRun { prefix_tokens, first_ttft_s, second_ttft_s, cached_tokens }))
}

impl BenchReport {
    /// The first fill's decode speed (the headline number).
    pub fn decode_tok_s(&self) -> f64 {
        self.decode.first().map_or(0.0, |d| d.tokens_per_second)
    }

    pub fn decode_gb_s(&self) -> f64 {
        self.decode.first().map_or(0.0, |d| d.gb_per_second)
    }

    pub fn to_json(&self) -> Value {
        let ops = |ops: &[OpTime]| -> Value {
            ops.iter().map(|o| json!({"op": o.op, "count": o.count, "seconds": o.seconds})).collect()
        };
        json!({
            "model": self.model,
            "adapter": self.adapter,
            "copy_gb_s": self.copy_gb_s,
            "prompt_tokens": self.prompt_tokens,
            "prefill_tok_s": self.prefill_tok_s,
            "ttft_s": self.ttft_s,
            "decode_tok_s": self.decode_tok_s(),
            "decode_gb_s": self.decode_gb_s(),
            "decode_fraction_of_copy": self.decode_gb_s() / self.copy_gb_s,
            "decode": self.decode.iter().map(|d| json!({
                "fill": d.fill,
                "tok_s": d.tokens_per_second,
                "bytes_per_token": d.bytes_per_token,
                "gb_s": d.gb_per_second,
            })).collect::<Value>(),
            "dispatches_per_token": self.dispatches_per_token,
            "decode_ops": ops(&self.decode_ops),
            "prefill_ops": ops(&self.prefill_ops),
            "batched_decode_ops": ops(&self.batched_decode_ops),
            "gpu_memory": {
                "weights": self.weight_bytes,
                "kv_cache": self.kv_cache_bytes,
                "activations": self.activation_bytes,
            },
            "peak_rss_bytes": self.peak_rss_bytes,
            "concurrency": self.concurrency.iter().map(|r| json!({
                "streams": r.streams,
                "decode_tok_s": r.decode_tok_s,
                "ttft_p50_s": r.ttft_p50_s,
                "ttft_p99_s": r.ttft_p99_s,
                "itl_p50_s": r.itl_p50_s,
                "itl_p99_s": r.itl_p99_s,
            })).collect::<Value>(),
            "prefix_cache": self.prefix_cache.as_ref().map(|p| json!({
                "prefix_tokens": p.prefix_tokens,
                "first_ttft_s": p.first_ttft_s,
                "second_ttft_s": p.second_ttft_s,
                "cached_tokens": p.cached_tokens,
                "speedup": p.first_ttft_s / p.second_ttft_s.max(1e-9),
            })),
            "speculative": self.speculative.iter().map(|r| json!({
                "prompt": r.prompt,
                "drafter": r.drafter,
                "draft_tokens": r.draft_tokens,
                "tokens": r.tokens,
                "plain_tok_s": r.plain_tok_s,
                "tok_s": r.tok_s,
                "speedup": r.tok_s / r.plain_tok_s.max(1e-9),
                "acceptance": r.stats.acceptance(),
                "accepted_per_drafting_step": r.stats.accepted_per_drafting_step(),
                "drafted": r.stats.drafted,
                "accepted": r.stats.accepted,
                "steps": r.stats.steps,
            })).collect::<Value>(),
            "notes": self.notes,
        })
    }

    /// Tables for people.
    pub fn to_table(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        let mut s = format!("model:    {}\nadapter:  {}\n", self.model, self.adapter);
        s += &format!("copy bandwidth (read + write): {:.2} GB/s\n", self.copy_gb_s);
        s += &format!(
            "GPU memory: weights {:.1} MiB, KV cache {:.1} MiB, activations {:.1} MiB; host peak RSS {}\n\n",
            mib(self.weight_bytes),
            mib(self.kv_cache_bytes),
            mib(self.activation_bytes),
            self.peak_rss_bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", mib(b)))
        );
        s += &format!(
            "prefill: {} tokens, {:.2} tok/s, time to first token {:.3} s\n\n",
            self.prompt_tokens, self.prefill_tok_s, self.ttft_s
        );
        s += "| KV fill | decode tok/s | ms/token | MB read/token | GB/s | of copy bandwidth |\n|---|---|---|---|---|---|\n";
        for d in &self.decode {
            s += &format!(
                "| {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.0}% |\n",
                d.fill,
                d.tokens_per_second,
                1e3 / d.tokens_per_second,
                d.bytes_per_token as f64 / 1e6,
                d.gb_per_second,
                100.0 * d.gb_per_second / self.copy_gb_s
            );
        }
        s += &format!("\n{} dispatches per decoded token\n", self.dispatches_per_token);
        let batched =
            format!("decode step of {} sequences", self.concurrency.iter().map(|r| r.streams).max().unwrap_or(0));
        for (title, ops) in [
            ("decode step", &self.decode_ops),
            ("prefill step", &self.prefill_ops),
            (batched.as_str(), &self.batched_decode_ops),
        ] {
            if ops.is_empty() {
                continue;
            }
            let total: f64 = ops.iter().map(|o| o.seconds).sum();
            s += &format!(
                "\nGPU time of one {title}: {:.2} ms\n| op | dispatches | ms | share |\n|---|---|---|---|\n",
                total * 1e3
            );
            for o in ops.iter() {
                s += &format!(
                    "| {} | {} | {:.3} | {:.1}% |\n",
                    o.op,
                    o.count,
                    o.seconds * 1e3,
                    100.0 * o.seconds / total
                );
            }
        }
        if !self.concurrency.is_empty() {
            let one = self.concurrency.iter().find(|r| r.streams == 1).map(|r| r.decode_tok_s);
            s += "\nconcurrent greedy streams through the batched engine\n";
            s += "| streams | decode tok/s (all streams) | × one stream | of prefill tok/s | TTFT p50 / p99 s | ITL p50 / p99 ms |\n|---|---|---|---|---|---|\n";
            for r in &self.concurrency {
                s += &format!(
                    "| {} | {:.2} | {} | {:.0}% | {:.3} / {:.3} | {:.1} / {:.1} |\n",
                    r.streams,
                    r.decode_tok_s,
                    one.map_or("n/a".into(), |o| format!("{:.2}×", r.decode_tok_s / o)),
                    100.0 * r.decode_tok_s / self.prefill_tok_s,
                    r.ttft_p50_s,
                    r.ttft_p99_s,
                    r.itl_p50_s * 1e3,
                    r.itl_p99_s * 1e3
                );
            }
        }
        if let Some(p) = &self.prefix_cache {
            s += &format!(
                "\nshared {}-token prefix: time to first token {:.3} s cold, {:.3} s with {} tokens cached ({:.1}× shorter)\n",
                p.prefix_tokens,
                p.first_ttft_s,
                p.second_ttft_s,
                p.cached_tokens,
                p.first_ttft_s / p.second_ttft_s.max(1e-9)
            );
        }
        if !self.speculative.is_empty() {
            s += "\nspeculative decoding (greedy; the same tokens as plain decoding, checked)\n";
            s += "| prompt | drafter | drafted a step | tokens | plain tok/s | tok/s | speedup | acceptance | accepted per drafting step |\n|---|---|---|---|---|---|---|---|---|\n";
            for r in &self.speculative {
                s += &format!(
                    "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2}× | {:.0}% | {:.2} |\n",
                    r.prompt,
                    r.drafter,
                    r.draft_tokens.map_or("adaptive".into(), |k| k.to_string()),
                    r.tokens,
                    r.plain_tok_s,
                    r.tok_s,
                    r.tok_s / r.plain_tok_s.max(1e-9),
                    100.0 * r.stats.acceptance(),
                    r.stats.accepted_per_drafting_step()
                );
            }
        }
        for n in &self.notes {
            s += &format!("note: {n}\n");
        }
        s
    }
}
