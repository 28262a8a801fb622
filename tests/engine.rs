//! The batched engine: batching never changes a sequence's result, the paged pool's accounting
//! always returns to empty, and requests are scheduled, shared, cancelled and refused as a
//! vLLM or llama-server user expects. Tiny fixtures on both device paths (f16 KV with subgroups,
//! f32 KV without).

mod common;

use common::*;
use kiln::engine::batch::{Readback, Runner, SeqStep, Wanted};
use kiln::engine::{Engine, EngineConfig, Event, FinishReason, RequestParams};
use kiln::gpu::Gpu;
use kiln::sampling::SamplingParams;
use kiln::{GenerateParams, KilnError, Model, Session};
use rand::seq::SliceRandom;
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Llama 3 and Qwen2, Qwen3 (q/k norms), Mistral (a 16-key sliding window, which the longer
/// prompts here run past) and the mixtures of experts (Qwen2-MoE with its shared expert, Mixtral:
/// a step's tokens are grouped by expert, so batching must not change which expert sees what).
const MODELS: [&str; 6] =
    ["llama3-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-swa-tiny", "qwen2-moe-tiny", "mixtral-tiny"];

fn load(name: &str, gpu: Arc<Gpu>) -> Arc<Model> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    Arc::new(Model::load(&path, gpu, &mut |_, _| {}).unwrap_or_else(|e| panic!("loading {name}: {e}")))
}

fn random_tokens(rng: &mut rand::rngs::StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Between `lo` and `hi` (exclusive) random tokens.
fn random_prompt(rng: &mut rand::rngs::StdRng, lo: usize, hi: usize, vocab: usize) -> Vec<u32> {
    let n = rng.random_range(lo..hi);
    random_tokens(rng, n, vocab)
}

/// How far a sequence's logits in a batch may be from its solo logits: the whole-model tests' own
/// tolerances (tests/model.rs `logit_tol`), 1e-3 with an f32 KV cache and 3e-2 with f16. Batching
/// can change only the f32 summation order: a one-token step takes gemv (and, on real GPUs,
/// split-KV attention) where the same token in a batch takes the matmul and the fused attention.
/// With an f16 cache such a difference now and then lands a K or V value on the other side of an
/// f16 rounding boundary, one f16 ulp. Measured: exactly 0 with the CPU-adapter kernels (tiny
/// fixtures and SmolLM2, where gemv and matmul_blocks agree bit for bit on lavapipe); with the GPU
/// kernels ≤ 9.5e-5 with f32 KV and 1.6e-3 with f16 (llama3-tiny,
/// KILN_TEST_SEED=1796140949735442702), each under its bound.
fn batch_tol(gpu: &Gpu) -> f64 {
    if gpu.caps.f16 {
        3e-2
    } else {
        1e-3
    }
}

fn smollm() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

#[test]
fn smollm2_batches_match_solo_runs() {
    let mut rng = rng("smollm2_batches");
    for (path, gpu) in devices() {
        let model = Arc::new(Model::load(&smollm(), gpu, &mut |_, _| {}).unwrap());
        check_mixed_batches(&model, &format!("SmolLM2 {path}"), &[40, 35, 17, 3], batch_tol(&model.gpu), &mut rng);
        // Chats sharing a system prompt, served together: greedy tokens as when alone.
        let engine = small_engine(&model, 1024, 64);
        let system =
            kiln::tokenizer::ChatMessage::new("system", "You are a concise assistant. Answer in one sentence.");
        let prompts: Vec<Vec<u32>> =
            ["What is the capital of France?", "Name a primary colour.", "What is 2+2?", "Say hello."]
                .iter()
                .map(|q| {
                    let user = kiln::tokenizer::ChatMessage::new("user", *q);
                    model.tokenizer.encode_chat(&[system.clone(), user], true).unwrap()
                })
                .collect();
        let requests: Vec<_> = prompts.iter().map(|p| engine.submit(p.clone(), greedy(8)).unwrap()).collect();
        let mut cached = 0;
        for (p, r) in prompts.iter().zip(requests) {
            let c = r.wait().unwrap();
            cached += c.usage.cached_tokens;
            assert_eq!(c.tokens, solo_greedy(&model, p, 8), "SmolLM2 {path}: batched greedy tokens");
        }
        eprintln!("SmolLM2 {path}: {cached} prompt tokens from the prefix cache");
        assert_pool_empty(&engine, path);

        // Speculative steps by prompt lookup: rewriting code given in the prompt, SmolLM2 copies
        // it, so drafts are kept; three streams at once give their solo tokens.
        let engine = speculative_engine(&model, 1024, 64, 4);
        let code = "fn area(width: u32, height: u32) -> u32 {\n    width * height\n}";
        let prompts: Vec<Vec<u32>> = ["Rewrite this function", "Rename the parameters of", "Add a doc comment to"]
            .iter()
            .map(|ask| {
                let user = kiln::tokenizer::ChatMessage::new("user", format!("{ask}:\n\n{code}"));
                model.tokenizer.encode_chat(&[user], true).unwrap()
            })
            .collect();
        let requests: Vec<_> = prompts.iter().map(|p| engine.submit(p.clone(), greedy(32)).unwrap()).collect();
        for (p, r) in prompts.iter().zip(requests) {
            assert_eq!(r.wait().unwrap().tokens, solo_greedy(&model, p, 32), "SmolLM2 {path}: speculative streams");
        }
        let stats = engine.stats();
        assert!(stats.accepted_tokens > 0, "SmolLM2 {path}: drafts were kept: {stats:?}");
        assert_pool_empty(&engine, path);
    }
}

/// Sequences cut into random chunks and run as mixed steps: in one step, some sequences decode
/// one token, others feed a prompt chunk that sees their earlier chunks, one starts on blocks it
/// shares with another (a common prefix). Every row's logits must equal the sequence's logits
/// when it runs alone.
fn check_mixed_batches(model: &Model, what: &str, lens: &[usize], tol: f64, rng: &mut rand::rngs::StdRng) {
    let vocab = model.config.vocab_size;
    let bs = 16usize;
    // Sequence 1 shares sequence 0's first two blocks.
    let mut seqs: Vec<Vec<u32>> = lens.iter().map(|&n| random_tokens(rng, n, vocab)).collect();
    assert!(lens[0] >= 2 * bs && lens[1] > 2 * bs);
    let prefix = seqs[0][..2 * bs].to_vec();
    seqs[1][..2 * bs].copy_from_slice(&prefix);

    let solo: Vec<Vec<f32>> =
        seqs.iter().map(|s| Session::new(model, Some(256)).unwrap().feed_all(s).unwrap()).collect();

    let blocks_needed: usize = seqs.iter().map(|s| s.len().div_ceil(bs)).sum();
    let blocks = blocks_needed as u32 + 7;
    let mut runner = Runner::new(model, blocks, bs as u32, 64, 256).unwrap();
    // Shuffled, non-contiguous block tables.
    let mut free: Vec<u32> = (0..blocks).collect();
    free.shuffle(rng);
    let mut tables: Vec<Vec<u32>> = seqs.iter().map(|s| free.drain(..s.len().div_ceil(bs)).collect()).collect();
    let shared_blocks = tables[0][..2].to_vec();
    tables[1][..2].copy_from_slice(&shared_blocks);
    // Sequence 1 starts after its shared prefix, once sequence 0 has computed it.
    let mut done: Vec<usize> = vec![0; seqs.len()];
    done[1] = 2 * bs;
    let mut got: Vec<Vec<f32>> = seqs.iter().map(|s| vec![f32::NAN; s.len() * vocab]).collect();
    for (i, g) in got.iter_mut().enumerate() {
        if i == 1 {
            g[..2 * bs * vocab].copy_from_slice(&solo[1][..2 * bs * vocab]);
        }
    }
    let mut steps = 0;
    while done.iter().zip(&seqs).any(|(d, s)| d < &s.len()) {
        let mut budget = 64usize;
        let mut plan = Vec::new();
        for i in 0..seqs.len() {
            if done[i] == seqs[i].len() || budget == 0 || (i == 1 && done[0] < 2 * bs) {
                continue;
            }
            // Decode-like single tokens half the time, else a random chunk.
            let left = seqs[i].len() - done[i];
            let n = if rng.random_bool(0.5) { 1 } else { rng.random_range(1..=left) }.min(left).min(budget);
            budget -= n;
            plan.push((i, n));
        }
        let step: Vec<SeqStep<'_>> = plan
            .iter()
            .map(|&(i, n)| SeqStep {
                tokens: &seqs[i][done[i]..done[i] + n],
                pos0: done[i],
                block_table: &tables[i],
                wanted: Wanted::All,
                adapters: 0,
            })
            .collect();
        let out = runner.step(&step, Readback::Both).unwrap();
        let mut row = 0;
        for &(i, n) in &plan {
            let rows = &out.logits[row * vocab..(row + n) * vocab];
            got[i][done[i] * vocab..(done[i] + n) * vocab].copy_from_slice(rows);
            for t in 0..n {
                let want = kiln::ops::argmax::argmax_cpu(&rows[t * vocab..(t + 1) * vocab], vocab)[0];
                assert_eq!(out.argmax[row + t], want, "{what}: GPU argmax of a batched row");
            }
            row += n;
            done[i] += n;
        }
        steps += 1;
    }
    assert!(steps > 2, "several mixed steps ran");
    for (i, (g, s)) in got.iter().zip(&solo).enumerate() {
        assert_close(&format!("{what} seq {i} (len {})", seqs[i].len()), g, s, tol, "see batch_tol");
    }
}

#[test]
fn mixed_batches_give_each_sequence_its_solo_logits() {
    let mut rng = rng("mixed_batches");
    for (path, gpu) in model_devices() {
        for name in MODELS {
            let model = load(name, gpu.clone());
            // Exactly one block, one past a block, chunks across boundaries, a single token.
            check_mixed_batches(&model, &format!("{name} {path}"), &[40, 37, 16, 17, 1, 33], batch_tol(&gpu), &mut rng);
        }
    }
}

fn greedy(max_tokens: usize) -> RequestParams {
    RequestParams { max_tokens, sampling: SamplingParams::default(), stop_at_eos: false, ..Default::default() }
}

fn solo_greedy(model: &Model, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let params = GenerateParams { max_tokens, sampling: SamplingParams::default(), stop_at_eos: false };
    Session::new(model, Some(256)).unwrap().generate(prompt, &params, |_| {}).unwrap().tokens
}

fn small_engine(model: &Arc<Model>, kv_tokens: usize, max_step_tokens: usize) -> Engine {
    speculative_engine(model, kv_tokens, max_step_tokens, 0)
}

/// As `small_engine`, drafting up to `lookup` tokens per greedy sequence and step.
fn speculative_engine(model: &Arc<Model>, kv_tokens: usize, max_step_tokens: usize, lookup: usize) -> Engine {
    let per_token = model.config.kv_bytes_per_token(model.gpu.kv_element_bytes() as usize) as u64;
    let config = EngineConfig {
        kv_memory: Some(kv_tokens as u64 * per_token),
        max_step_tokens,
        max_context: Some(256),
        lookup_draft_tokens: lookup,
        // Drafts may fill whole steps: the tests want many of them, kept and rejected.
        lookup_step_tokens: Some(max_step_tokens),
        ..Default::default()
    };
    Engine::start(model.clone(), config).unwrap()
}

/// Wait until the engine is idle, then check every block is free and the pool is consistent.
fn assert_pool_empty(engine: &Engine, what: &str) {
    for _ in 0..500 {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 {
            assert_eq!(s.blocks_used, 0, "{what}: every block is free again ({s:?})");
            assert_eq!(s.pool_error, None, "{what}: pool invariants");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what}: the engine did not go idle: {:?}", engine.stats());
}

#[test]
fn concurrent_greedy_streams_equal_their_solo_runs_from_1_to_64_sequences() {
    let mut rng = rng("concurrent_greedy");
    for (path, gpu) in devices() {
        for name in MODELS {
            let model = load(name, gpu.clone());
            let vocab = model.config.vocab_size;
            let engine = small_engine(&model, 64 * 48, 96);
            for n in [1usize, 5, 64] {
                let jobs: Vec<(Vec<u32>, usize)> =
                    (0..n).map(|_| (random_prompt(&mut rng, 1, 40, vocab), rng.random_range(1..10))).collect();
                let requests: Vec<_> =
                    jobs.iter().map(|(p, m)| engine.submit(p.clone(), greedy(*m)).unwrap()).collect();
                for ((prompt, max), request) in jobs.iter().zip(requests) {
                    let c = request.wait().unwrap();
                    assert_eq!(c.reason, FinishReason::MaxTokens);
                    assert_eq!(c.usage.prompt_tokens, prompt.len());
                    assert_eq!(c.usage.generated_tokens, *max);
                    assert_eq!(c.tokens, solo_greedy(&model, prompt, *max), "{name} {path}: {n} streams");
                    assert_eq!(c.text, model.tokenizer.decode(&c.tokens, true).unwrap(), "streamed text");
                }
                assert_pool_empty(&engine, &format!("{name} {path} after {n} streams"));
            }
        }
    }
}

#[test]
fn a_cached_prefix_is_reused_and_then_diverges() {
    let mut rng = rng("prefix_cache");
    for (path, gpu) in devices() {
        let model = load("llama3-tiny", gpu);
        let vocab = model.config.vocab_size;
        let engine = small_engine(&model, 1024, 64);
        let a = random_tokens(&mut rng, 40, vocab);
        let run = |prompt: &[u32]| engine.submit(prompt.to_vec(), greedy(6)).unwrap().wait().unwrap();
        let first = run(&a);
        assert_eq!(first.usage.cached_tokens, 0, "{path}: nothing cached yet");
        // Same first 35 tokens, then different: the two full blocks are reused.
        let mut b = a[..35].to_vec();
        b.extend(random_tokens(&mut rng, 9, vocab));
        let second = run(&b);
        assert_eq!(second.usage.cached_tokens, 32, "{path}: two blocks of 16 from the cache");
        assert_eq!(second.tokens, solo_greedy(&model, &b, 6), "{path}: diverging after a cached prefix");
        // The same prompt again: every full block but the one holding the last token.
        let again = run(&a);
        assert_eq!(again.usage.cached_tokens, 32);
        assert_eq!(again.tokens, first.tokens);
        // A prompt exactly one block long reuses nothing (its last token must be computed);
        // one token longer reuses that block.
        let one = random_tokens(&mut rng, 16, vocab);
        assert_eq!(run(&one).usage.cached_tokens, 0);
        assert_eq!(run(&one).usage.cached_tokens, 0);
        let mut longer = one.clone();
        longer.push(3);
        let c = run(&longer);
        assert_eq!(c.usage.cached_tokens, 16);
        assert_eq!(c.tokens, solo_greedy(&model, &longer, 6));
        // Generated tokens are cached too: a follow-up turn starting with prompt + answer.
        let mut turn = a.clone();
        turn.extend(&first.tokens);
        turn.extend(random_tokens(&mut rng, 3, vocab));
        let follow = run(&turn);
        assert_eq!(follow.usage.cached_tokens, 32, "blocks full of prompt and answer");
        assert_eq!(follow.tokens, solo_greedy(&model, &turn, 6));
        let s = engine.stats();
        assert_eq!(s.cached_prompt_tokens, 32 + 32 + 16 + 32, "{s:?}");
        assert_pool_empty(&engine, path);
    }
}

#[test]
fn cancelling_mid_stream_frees_the_blocks_and_leaves_the_others_alone() {
    let mut rng = rng("cancel");
    for (path, gpu) in devices() {
        let model = load("qwen2-tiny", gpu);
        let vocab = model.config.vocab_size;
        let engine = small_engine(&model, 1024, 64);
        let (p1, p2) = (random_tokens(&mut rng, 20, vocab), random_tokens(&mut rng, 30, vocab));
        let r1 = engine.submit(p1, greedy(200)).unwrap();
        let r2 = engine.submit(p2.clone(), greedy(40)).unwrap();
        let dropped = engine.submit(random_tokens(&mut rng, 50, vocab), greedy(200)).unwrap();
        drop(dropped);
        let mut seen = 0;
        while seen < 3 {
            match r1.next_event(Duration::from_secs(30)).expect("a token within 30 s") {
                Event::Token { .. } => seen += 1,
                other => panic!("{path}: unexpected {other:?}"),
            }
        }
        r1.cancel();
        let mut last = None;
        while let Some(e) = r1.next_event(Duration::from_secs(30)) {
            last = Some(e);
        }
        match last {
            Some(Event::Done { reason: FinishReason::Cancelled, usage }) => {
                assert!(usage.generated_tokens >= 3 && usage.generated_tokens < 200, "{usage:?}")
            }
            other => panic!("{path}: a cancelled stream ends with Done(Cancelled), got {other:?}"),
        }
        assert_eq!(r2.wait().unwrap().tokens, solo_greedy(&model, &p2, 40), "{path}: the other stream");
        assert_pool_empty(&engine, path);
    }
}

#[test]
fn random_schedules_with_preemption_return_every_block() {
    random_schedules(0);
}

/// The same with speculative steps: drafted tokens take blocks, rejected ones are rolled back,
/// and streams stay token for token the model's own.
#[test]
fn random_schedules_with_prompt_lookup_speculation_return_every_block() {
    random_schedules(4);
}

fn random_schedules(lookup: usize) {
    let mut rng = rng("random_schedules");
    let (path, gpu) = devices().remove(0);
    let model = load("llama3-tiny", gpu);
    let vocab = model.config.vocab_size;
    // 10 blocks of 16: several sequences of up to 150 tokens cannot all fit, so the scheduler
    // must preempt and recompute (from the prefix cache where it can).
    let engine = speculative_engine(&model, 160, 48, lookup);
    let shared = random_tokens(&mut rng, 24, vocab);
    for round in 0..3 {
        let mut requests = Vec::new();
        for _ in 0..12 {
            let mut prompt = if rng.random_bool(0.5) { shared.clone() } else { random_prompt(&mut rng, 1, 30, vocab) };
            if lookup > 0 && rng.random_bool(0.5) {
                // A repeated phrase: prompt lookup finds it and drafts what followed it.
                let phrase = random_prompt(&mut rng, 3, 9, vocab);
                prompt.extend(phrase.iter().chain(&phrase).chain(&phrase[..2]));
            }
            prompt.extend(random_prompt(&mut rng, 1, 20, vocab));
            let max = rng.random_range(1..100).min(150 - prompt.len());
            let cancel_after = rng.random_bool(0.3).then(|| rng.random_range(0..max));
            requests.push((prompt.clone(), max, cancel_after, engine.submit(prompt, greedy(max)).unwrap()));
        }
        for (prompt, max, cancel_after, r) in requests {
            let mut tokens = Vec::new();
            let reason = loop {
                if Some(tokens.len()) == cancel_after {
                    r.cancel();
                }
                match r.next_event(Duration::from_secs(60)).expect("events keep coming") {
                    Event::Token { id, .. } => tokens.push(id),
                    Event::Text(_) => {}
                    Event::Done { reason, .. } => break reason,
                    Event::Failed(m) => panic!("round {round}: {m}"),
                }
            };
            if reason == FinishReason::MaxTokens {
                assert_eq!(tokens, solo_greedy(&model, &prompt, max), "round {round}: a finished stream");
            } else {
                assert_eq!(reason, FinishReason::Cancelled);
                let solo = solo_greedy(&model, &prompt, max);
                assert_eq!(tokens, solo[..tokens.len()], "round {round}: a cancelled stream's tokens so far");
            }
        }
        assert_pool_empty(&engine, &format!("{path} round {round}"));
    }
    let stats = engine.stats();
    assert!(stats.preemptions > 0, "the small pool forced preemption: {stats:?}");
    if lookup > 0 {
        // The random model seldom repeats itself, so most drafts are rejected and rolled back
        // (SmolLM2 keeps them: smollm2_batches_match_solo_runs).
        assert!(stats.drafted_tokens > 0, "drafts were made: {stats:?}");
        assert!(stats.accepted_tokens < stats.drafted_tokens, "and rejected (rolled back): {stats:?}");
    }
}

#[test]
fn requests_that_can_never_fit_are_refused_and_a_full_queue_is_busy() {
    let (_, gpu) = devices().remove(0);
    let model = load("llama3-tiny", gpu);
    let engine = small_engine(&model, 64, 32);
    let err = |r: kiln::Result<kiln::engine::Request>| r.err().expect("refused").to_string();
    assert!(err(engine.submit(vec![], greedy(4))).contains("empty"));
    assert!(err(engine.submit(vec![1; 10], greedy(0))).contains("max_tokens"));
    assert!(err(engine.submit(vec![1; 200], greedy(100))).contains("context"));
    assert!(err(engine.submit(vec![1; 60], greedy(10))).contains("never fit"));
    assert!(err(engine.submit(vec![u32::MAX], greedy(1))).contains("vocabulary"));
    let bad = RequestParams { sampling: SamplingParams { temperature: -1.0, ..Default::default() }, ..greedy(1) };
    assert!(err(engine.submit(vec![1], bad)).contains("temperature"));
    // Still serving.
    assert_eq!(engine.submit(vec![1, 2, 3], greedy(2)).unwrap().wait().unwrap().tokens.len(), 2);

    let config = EngineConfig { max_waiting: 2, max_running: 1, max_context: Some(256), ..Default::default() };
    let engine = Engine::start(model.clone(), config).unwrap();
    let held: Vec<_> = (0..3).map(|_| engine.submit(vec![1, 2, 3], greedy(50)).unwrap()).collect();
    match engine.submit(vec![1, 2, 3], greedy(50)) {
        Err(KilnError::Busy(m)) => assert!(m.contains("3 requests"), "{m}"),
        other => panic!("a full queue answers Busy, got {:?}", other.map(|r| r.id)),
    }
    drop(held);
}

#[test]
fn sampled_and_greedy_sequences_share_steps_and_stay_reproducible() {
    let mut rng = rng("sampled_batches");
    let (path, gpu) = devices().remove(0);
    let model = load("qwen2-tiny", gpu);
    let vocab = model.config.vocab_size;
    let engine = small_engine(&model, 2048, 64);
    let sampled = |seed| RequestParams {
        sampling: SamplingParams { temperature: 0.9, top_k: 20, top_p: 0.9, seed, ..Default::default() },
        ..greedy(12)
    };
    let prompt = random_tokens(&mut rng, 12, vocab);
    let solo = {
        let params = GenerateParams { max_tokens: 12, sampling: sampled(7).sampling, stop_at_eos: false };
        Session::new(&model, Some(256)).unwrap().generate(&prompt, &params, |_| {}).unwrap().tokens
    };
    let rs: Vec<_> = (0..4)
        .map(|i| {
            let params = if i % 2 == 0 { sampled(7) } else { greedy(12) };
            engine.submit(prompt.clone(), params).unwrap()
        })
        .collect();
    let outs: Vec<_> = rs.into_iter().map(|r| r.wait().unwrap().tokens).collect();
    assert_eq!(outs[0], solo, "{path}: a seeded sampler in a batch equals its solo run");
    assert_eq!(outs[2], solo);
    assert_eq!(outs[1], solo_greedy(&model, &prompt, 12));
}

#[test]
fn stop_strings_end_the_stream_without_sending_them() {
    let (path, gpu) = devices().remove(0);
    let model = load("llama3-tiny", gpu);
    let engine = small_engine(&model, 1024, 64);
    let prompt = model.tokenizer.encode("The license grants you the freedom to", true).unwrap();
    let full = engine.submit(prompt.clone(), greedy(24)).unwrap().wait().unwrap();
    // Stop at a piece of text in the middle of the greedy continuation, spanning tokens.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 12, "{path}: continuation long enough: {:?}", full.text);
    let stop: String = chars[6..10].iter().collect();
    let at = full.text.find(&stop).unwrap();
    let params = RequestParams { stop: vec![stop.clone()], ..greedy(24) };
    let cut = engine.submit(prompt, params).unwrap().wait().unwrap();
    assert_eq!(cut.reason, FinishReason::Stop(stop.clone()));
    assert_eq!(cut.text, full.text[..at], "{path}: the text before the stop string, and nothing of it");
}

#[test]
fn the_choices_of_one_request_share_its_prompt_blocks() {
    let mut rng = rng("choices");
    let (path, gpu) = devices().remove(0);
    let model = load("llama3-tiny", gpu);
    let vocab = model.config.vocab_size;
    let engine = small_engine(&model, 1024, 64);
    let prompt = random_tokens(&mut rng, 40, vocab);
    let choices = engine.submit_n(prompt.clone(), greedy(5), 3).unwrap();
    let outs: Vec<_> = choices.into_iter().map(|r| r.wait().unwrap()).collect();
    let solo = solo_greedy(&model, &prompt, 5);
    for (i, c) in outs.iter().enumerate() {
        assert_eq!(c.tokens, solo, "{path}: choice {i}");
        assert_eq!(c.usage.cached_tokens, if i == 0 { 0 } else { 32 }, "{path}: choice {i} reuses the first's blocks");
    }
    assert_pool_empty(&engine, path);
}

#[test]
fn logprobs_are_the_log_softmax_of_the_model_logits() {
    let mut rng = rng("logprobs");
    let (path, gpu) = devices().remove(1);
    let model = load("qwen2-tiny", gpu);
    let vocab = model.config.vocab_size;
    let engine = small_engine(&model, 1024, 64);
    let prompt = random_tokens(&mut rng, 9, vocab);
    let params = RequestParams { logprobs: Some(4), ..greedy(3) };
    let request = engine.submit(prompt.clone(), params).unwrap();
    let mut session = Session::new(&model, Some(256)).unwrap();
    let mut logits = session.feed(&prompt).unwrap();
    for step in 0..3 {
        let Some(Event::Token { id, logprob: Some(lp), .. }) = request.next_event(Duration::from_secs(30)) else {
            panic!("{path}: a token with its logprob");
        };
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + logits.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
        let want = (logits[id as usize] as f64 - lse) as f32;
        assert!((lp.logprob - want).abs() < 1e-5, "{path} step {step}: {} vs {want}", lp.logprob);
        assert_eq!(lp.top.len(), 4);
        assert_eq!(lp.top[0].0, id, "greedy picks the most likely token");
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "most likely first");
        assert!(lp.top.iter().all(|t| t.1 <= 0.0 && t.1.is_finite()));
        logits = session.feed(&[id]).unwrap();
    }
}
