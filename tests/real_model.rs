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

fn smollm() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

fn golden() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/smollm2_hf_golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_gguf_matches_transformers() {
    // The fallback device keeps the KV cache in f32, so the comparison is f32 against f32.
    let (_, gpu) = devices().remove(1);
    let model = Model::load(&smollm(), gpu, &mut |_, _| {}).unwrap();
    assert_eq!(model.config.n_layers, 30);
    assert!(model.config.rope_interleaved && model.config.tie_word_embeddings);
    let g = golden();
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
        let first16: Vec<f32> =
            case["last_logits_first16"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_close(
            &format!("first 16 logits of {}", case["prompt"]),
            &logits[..16],
            &first16,
            5e-3,
            "f32 sums in another order over 30 layers",
        );
        for pair in case["last_logits_top10"].as_array().unwrap() {
            let (id, want) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap());
            assert!((logits[id] as f64 - want).abs() < 5e-3, "logit of {id}: {} vs {want}", logits[id]);
        }
        let top = kiln::ops::argmax::argmax_cpu(&logits, logits.len())[0];
        assert_eq!(top as u64, case["last_logits_top10"][0][0].as_u64().unwrap(), "top-1 of {}", case["prompt"]);
    }
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
    // should be the token transformers chose next (its greedy choice is its top-1).
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
            let got = kiln::ops::argmax::argmax_cpu(&logits[row * vocab..(row + 1) * vocab], vocab)[0];
            agree += (got == want) as usize;
            total += 1;
        }
    }
    eprintln!("forced-decoding top-1 agreement: {agree}/{total}");
    // f32 against f32 with the same dequantised weights: only near-ties may flip.
    assert!(agree * 100 >= total * 97, "top-1 agreement {agree}/{total} under 97%");
}
