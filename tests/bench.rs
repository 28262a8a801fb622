//! `kiln bench` and its synthetic models: the presets build with their real shapes and
//! encodings and run a real forward pass; the report carries the documented keys. Speed itself
//! is measured by `kiln bench`, never asserted here.

mod common;

use common::*;
use kiln::gpu::DType;
use kiln::model::synthetic::{random_blocks, PRESETS};
use kiln::model::weights::Mlp;
use kiln::{Model, Session};
use rand::SeedableRng;
use std::process::Command;

#[test]
fn random_blocks_decode_to_finite_weights_of_a_trained_models_scale() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q4K, DType::Q5K, DType::Q6K] {
        let blocks = 64;
        let bytes = random_blocks(dtype, blocks, &mut rng);
        let n = blocks * dtype.block().0 as usize;
        let values = kiln::quant::decode(dtype, &bytes, n).unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{dtype:?}: a non-finite weight");
        let rms = (values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
        // Trained projections are ~N(0, 0.02); anything within 10× keeps activations sane.
        assert!((0.002..0.2).contains(&rms), "{dtype:?}: rms {rms}");
    }
}

#[test]
fn every_preset_builds_with_its_shapes_and_runs_a_finite_forward_pass() {
    let (_, gpu) = devices().remove(0);
    for preset in PRESETS {
        // One layer: the full 8B presets need 4.5–16 GB; shapes and encodings are per layer.
        let model = Model::synthetic(preset.name, Some(1), gpu.clone(), 1).unwrap();
        let c = &model.config;
        assert_eq!(c.n_layers, 1);
        let by_dtype = model.weights.bytes_by_dtype();
        let mlp = |l: usize| match &model.weights.layers[l].mlp {
            Mlp::Dense(d) => d,
            Mlp::Experts(_) => panic!("{}: not a dense layer", preset.name),
        };
        match preset.name {
            "smollm2-135m-q4_1" => {
                assert_eq!((c.hidden_size, c.vocab_size, c.n_kv_heads), (576, 49152, 3));
                assert_eq!(model.weights.embed_tokens.dtype, DType::Q8_0);
                assert_eq!(mlp(0).gate_proj.dtype, DType::Q4_1);
            }
            "qwen2.5-0.5b-q4_k" => {
                assert_eq!((c.hidden_size, c.intermediate_size, c.vocab_size), (896, 4864, 151936));
                assert!(c.qkv_bias);
                assert_eq!(mlp(0).down_proj.dtype, DType::Q6K);
                assert_eq!(model.weights.layers[0].q_proj.dtype, DType::Q5_0);
            }
            "qwen2.5-0.5b-q8_0" => assert!(by_dtype.iter().all(|(d, _)| *d == DType::Q8_0)),
            "llama3-8b-q4_0" => {
                assert_eq!((c.hidden_size, c.intermediate_size, c.head_dim), (4096, 14336, 128));
                assert_eq!(model.weights.lm_head().dtype, DType::Q6K);
                assert_eq!(mlp(0).up_proj.dtype, DType::Q4_0);
            }
            "llama3-8b-f16" => assert!(by_dtype.iter().all(|(d, _)| *d == DType::F16)),
            "qwen3-30b-a3b-q4_k" => {
                let m = c.moe.as_ref().unwrap();
                assert_eq!((m.n_experts, m.top_k, m.expert_intermediate_size, c.head_dim), (128, 8, 768, 128));
                assert!(c.qk_norm && m.norm_topk_prob);
                let Mlp::Experts(x) = &model.weights.layers[0].mlp else { panic!("experts") };
                assert_eq!((x.gate_proj.rows, x.gate_proj.dtype), (128 * 768, DType::Q4K));
                // A token reads the router and 8 of 128 experts.
                let per_token = model.weights.layers[0].mlp.bytes_per_token(8);
                let all: u64 = model.weights.layers[0].mlp.matrices().iter().map(|w| w.bytes()).sum();
                assert!(per_token * 12 < all, "{per_token} of {all} bytes");
            }
            other => panic!("untested preset {other}"),
        }
        let mut session = Session::new(&model, Some(64)).unwrap();
        let logits = session.feed(&[1, 2, 3]).unwrap();
        assert_eq!(logits.len(), c.vocab_size);
        assert!(logits.iter().all(|v| v.is_finite()), "{}: non-finite logits", preset.name);
        let spread = logits.iter().cloned().fold(f32::MIN, f32::max) - logits.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 0.0, "{}: constant logits", preset.name);
    }
}

#[test]
fn unknown_presets_and_layer_counts_are_clear_errors() {
    let (_, gpu) = devices().remove(0);
    let e = Model::synthetic("llama9-1t", None, gpu.clone(), 0).err().unwrap().to_string();
    assert!(e.contains("llama9-1t") && e.contains("smollm2-135m-q4_1"), "{e}");
    let e = Model::synthetic("smollm2-135m-q4_1", Some(31), gpu, 0).err().unwrap().to_string();
    assert!(e.contains("1..=30"), "{e}");
}

#[test]
fn bench_json_reports_the_documented_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "--synthetic", "smollm2-135m-q4_1", "--layers", "2", "--prompt-tokens", "8"])
        .args(["--gen-tokens", "3", "--fills", "0,40", "--concurrency", "1,3", "--stream-prompt-tokens", "5"])
        .args(["--shared-prefix", "40", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["prefill_tok_s", "decode_tok_s", "decode_gb_s", "copy_gb_s", "ttft_s"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    let decode = v["decode"].as_array().unwrap();
    assert_eq!(decode.iter().map(|d| d["fill"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 40]);
    // More cache read at the higher fill.
    assert!(decode[1]["bytes_per_token"].as_u64() > decode[0]["bytes_per_token"].as_u64());
    // lavapipe has timestamps: every dispatch of a decode step is accounted for.
    let ops = v["decode_ops"].as_array().unwrap();
    let counted: u64 = ops.iter().map(|o| o["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, v["dispatches_per_token"].as_u64().unwrap());
    assert!(ops.iter().any(|o| o["op"].as_str().unwrap().contains("gate_proj")));
    assert!(v["gpu_memory"]["weights"].as_u64().unwrap() > 0);
    // Concurrent streams through the batched engine, and a decode step of all of them profiled.
    let runs = v["concurrency"].as_array().unwrap();
    assert_eq!(runs.iter().map(|r| r["streams"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3]);
    for r in runs {
        for key in ["decode_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"] {
            let x = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"));
            assert!(x.is_finite() && x > 0.0, "{key} = {x}");
        }
        assert!(r["ttft_p99_s"].as_f64() >= r["ttft_p50_s"].as_f64());
    }
    let batched = v["batched_decode_ops"].as_array().unwrap();
    assert!(batched.iter().any(|o| o["op"].as_str().unwrap().starts_with("matmul") && o["count"].as_u64() == Some(2)));
    // The second request with the same 40-token prefix finds its two full blocks cached.
    assert_eq!(v["prefix_cache"]["cached_tokens"].as_u64(), Some(32));
    assert!(v["prefix_cache"]["second_ttft_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_needs_a_model_or_a_preset() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["bench"]).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--model") || e.contains("--synthetic"), "{e}");
}
