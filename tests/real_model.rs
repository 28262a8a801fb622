//! A real model end to end: SmolLM2-135M-Instruct, Q4_1/Q8_0 GGUF (arch llama, permuted q/k),
//! against transformers' outputs on the same file dequantised to f32
//! (tests/fixtures/real/README.md). `scripts/fetch-models.sh` fetches the model; without it
//! these tests fail with that instruction.

mod common;

use common::*;
use kiln::sampling::SamplingParams;
use kiln::tokenizer::ChatMessage;
use kiln::{GenerateParams, Model, Session};
use serde_json::Value;
use std::path::PathBuf;

/// A model file `scripts/fetch-models.sh` puts in .cache/models/.
fn model_file(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models").join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

/// A golden file of tests/fixtures/real/.
fn golden_file(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn smollm() -> PathBuf {
    model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn golden() -> Value {
    golden_file("smollm2_hf_golden.json")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Worst |Δ| SmolLM2's logits may show against transformers (f32 over the same dequantised
/// weights, f32 KV): sums in another order over 30 layers. Measured worst: 2.2e-5; the bound
/// leaves ~13× headroom.
const SMOLLM2_LOGIT_TOLERANCE: f64 = 3e-4;

#[test]
fn smollm2_gguf_matches_transformers() {
    // The fallback device keeps the KV cache in f32, so the comparison is f32 against f32.
    let (_, gpu) = devices().remove(1);
    let model = Model::load(&smollm(), gpu, &mut |_, _| {}).unwrap();
    assert_eq!(model.config.n_layers, 30);
    assert!(model.config.rope_interleaved && model.config.tie_word_embeddings);
    let g = golden();
    let mut worst = 0f64;
    for case in g["cases"].as_array().unwrap() {
        let want_ids = u32s(&case["ids"]);
        let ids = if case["chat"].as_bool() == Some(true) {
            model.tokenizer.encode_chat(&[ChatMessage::new("user", "What is 2+2?")], true).unwrap()
        } else {
            model.tokenizer.encode(case["prompt"].as_str().unwrap(), true).unwrap()
        };
        assert_eq!(ids, want_ids, "tokenisation of {}", case["prompt"]);

        let mut session = Session::new(&model, Some(512)).unwrap();
        let logits = session.feed(&ids).unwrap();
        // transformers dequantises to f32 and accumulates in f32 as we do; the order of sums
        // differs, and over 30 layers that moves logits by ~1e-3 (tests/fixtures/real/README.md).
        worst = worst.max(worst_logit_error(&logits, case));
        let top = kiln::ops::argmax::argmax_cpu(&logits, logits.len())[0];
        assert_eq!(top as u64, case["last_logits_top10"][0][0].as_u64().unwrap(), "top-1 of {}", case["prompt"]);
    }
    eprintln!("smollm2: worst |Δ| of first-16 and top-10 logits against transformers: {worst:.2e}");
    assert!(worst < SMOLLM2_LOGIT_TOLERANCE, "worst |Δ| {worst} ≥ {SMOLLM2_LOGIT_TOLERANCE}");
}

#[test]
fn smollm2_continues_the_capital_of_france_with_paris() {
    let (_, gpu) = devices().remove(0);
    let model = Model::load(&smollm(), gpu, &mut |_, _| {}).unwrap();
    let prompt = model.tokenizer.encode("The capital of France is", true).unwrap();
    assert_eq!(prompt, vec![504, 3575, 282, 4649, 314]);
    let params = GenerateParams { max_tokens: 4, sampling: SamplingParams::default(), stop_at_eos: true };
    let out = Session::new(&model, Some(256)).unwrap().generate(&prompt, &params, |_| {}).unwrap();
    let want = u32s(&golden()["cases"][0]["greedy32_ids"]);
    assert_eq!(out.tokens, want[..4], "greedy tokens");
    assert!(out.text.starts_with(" Paris"), "{:?}", out.text);
}

#[test]
fn smollm2_agrees_with_transformers_under_forced_decoding() {
    // Feed prompt + transformers' 32 greedy tokens in one pass: at every position, our top-1
    // should be the token transformers chose next. It generated with min_new_tokens = 32, which
    // masks eos (id 2), so its choice is the top-1 among the other tokens: mask eos here too.
    let (_, gpu) = devices().remove(1);
    let model = Model::load(&smollm(), gpu, &mut |_, _| {}).unwrap();
    let vocab = model.config.vocab_size;
    let (mut agree, mut total) = (0, 0);
    for case in golden()["cases"].as_array().unwrap().iter().take(3) {
        let prompt = u32s(&case["ids"]);
        let greedy = u32s(&case["greedy32_ids"]);
        let seq: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        let logits = Session::new(&model, Some(512)).unwrap().feed_all(&seq[..seq.len() - 1]).unwrap();
        for (i, &want) in greedy.iter().enumerate() {
            let row = prompt.len() - 1 + i;
            let mut row_logits = logits[row * vocab..(row + 1) * vocab].to_vec();
            row_logits[2] = f32::NEG_INFINITY;
            let got = kiln::ops::argmax::argmax_cpu(&row_logits, vocab)[0];
            agree += (got == want) as usize;
            total += 1;
        }
    }
    eprintln!("forced-decoding top-1 agreement: {agree}/{total}");
    // f32 against f32 with the same dequantised weights, logits within 2.2e-5: only a tie closer
    // than that could flip, and none is (measured 96/96).
    assert_eq!(agree, total, "top-1 agreement {agree}/{total}");
}

// ---------------------------------------------------------------- Qwen2.5-Coder-0.5B-Instruct
// Arch qwen2, mixed Q5_0/Q8_0/Q4_K/Q6_K with f32 biases, untied lm-head, against a float64
// numpy forward over the same file dequantised by gguf-py (tests/fixtures/real/README.md).

fn qwen_coder() -> PathBuf {
    model_file("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
}

fn qwen_golden() -> Value {
    golden_file("qwen25coder_golden.json")
}

/// Worst |Δ| between `logits` and a golden case's first-16 and top-10 last-position logits.
fn worst_logit_error(logits: &[f32], case: &Value) -> f64 {
    let first16 = f64s(&case["last_logits_first16"]).into_iter().enumerate();
    let top10 = case["last_logits_top10"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap()));
    first16.chain(top10).map(|(id, want)| (logits[id] as f64 - want).abs()).fold(0.0, f64::max)
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Worst |Δ| the Qwen logits may show against the float64 reference: f32 sums in another order
/// (K ≤ 4864 per dot product, 24 layers, f32 KV on the fallback device) against exact ones,
/// over the same dequantised weights. Measured worst: 8.4e-6 on logits of magnitude ~20 (about
/// 50 f32 ulps); the bound leaves ~10× headroom, far below any logit gap that decides a token.
const QWEN_LOGIT_TOLERANCE: f64 = 1e-4;

#[test]
fn qwen25_coder_gguf_matches_the_reference_forward() {
    let (_, gpu) = devices().remove(1);
    let model = Model::load(&qwen_coder(), gpu, &mut |_, _| {}).unwrap();
    let c = &model.config;
    assert_eq!((c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads), (24, 896, 14, 2));
    assert!(c.qkv_bias && !c.tie_word_embeddings && !c.rope_interleaved);
    // Resident weights: the file's tensor bytes, kept packed (norms and biases are F32 in the file).
    let file = kiln::gguf::GgufFile::open(qwen_coder()).unwrap();
    let file_bytes: u64 = file.tensors.iter().map(|t| file.tensor_data(t).unwrap().len() as u64).sum();
    let on_gpu = model.weights.resident_bytes();
    eprintln!("qwen2.5-coder: {on_gpu} bytes of parameters on the GPU for {file_bytes} tensor bytes in the file");
    assert!(
        on_gpu >= file_bytes && on_gpu <= file_bytes * 101 / 100,
        "{on_gpu} on the GPU for {file_bytes} in the file"
    );
    assert_eq!(model.load_stats.weight_bytes, file_bytes, "bytes uploaded");
    let g = qwen_golden();
    let mut worst = 0f64;
    for case in g["cases"].as_array().unwrap() {
        let text = case["prompt"].as_str().unwrap();
        let ids = model.tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "tokenisation of {text:?}");
        let logits = Session::new(&model, Some(256)).unwrap().feed(&ids).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
        worst = worst.max(worst_logit_error(&logits, case));
        let top = kiln::ops::argmax::argmax_cpu(&logits, logits.len())[0];
        assert_eq!(top as u64, case["last_logits_top10"][0][0].as_u64().unwrap(), "top-1 of {text:?}");
    }
    eprintln!("qwen2.5-coder: worst |Δ| of first-16 and top-10 logits against float64: {worst:.2e}");
    assert!(worst < QWEN_LOGIT_TOLERANCE, "worst |Δ| {worst} ≥ {QWEN_LOGIT_TOLERANCE}");

    // Forced decoding over a 53-token function: every position's top-1, except where the
    // reference's own top two are closer than our error can tell apart.
    let f = &g["forced"];
    let ids = u32s(&f["ids"]);
    let want = u32s(&f["argmax"]);
    let margins = f64s(&f["margin"]);
    let vocab = c.vocab_size;
    let logits = Session::new(&model, Some(256)).unwrap().feed_all(&ids).unwrap();
    let (mut agree, mut decided) = (0, 0);
    for (i, &w) in want.iter().enumerate() {
        let got = kiln::ops::argmax::argmax_cpu(&logits[i * vocab..(i + 1) * vocab], vocab)[0];
        if margins[i] > 2.0 * QWEN_LOGIT_TOLERANCE {
            decided += 1;
            agree += (got == w) as usize;
        }
    }
    eprintln!("qwen2.5-coder forced decoding: top-1 agrees at {agree}/{decided} decided positions of {}", want.len());
    assert_eq!(agree, decided, "top-1 differs where the reference's margin exceeds twice our error");
    assert!(decided * 10 >= want.len() * 9, "too few decided positions: {decided}/{}", want.len());
}

#[test]
fn qwen25_coder_greedy_follows_the_reference_until_a_near_tie() {
    // The fast device (f16 KV cache on lavapipe), as `kiln generate` runs.
    let (_, gpu) = devices().remove(0);
    let model = Model::load(&qwen_coder(), gpu, &mut |_, _| {}).unwrap();
    for case in qwen_golden()["cases"].as_array().unwrap() {
        let want = u32s(&case["greedy16_ids"]);
        // Past the first step where the reference's top two are within 0.1 (our f16-KV error is
        // ~1e-2), either choice is right and the continuations may part.
        let sure = f64s(&case["greedy16_margins"]).iter().take_while(|&&m| m > 0.1).count();
        assert!(sure >= 1, "the first step of {:?} must be decided", case["prompt"]);
        let params = GenerateParams { max_tokens: sure, sampling: SamplingParams::default(), stop_at_eos: false };
        let out = Session::new(&model, Some(256)).unwrap().generate(&u32s(&case["ids"]), &params, |_| {}).unwrap();
        assert_eq!(out.tokens, want[..sure], "greedy of {:?}", case["prompt"]);
    }
}
