//! LoRA adapters (PEFT format) applied unmerged and chosen per token: the kernel against its CPU
//! reference; llama3-tiny with each of its two fixture adapters against PEFT's goldens on every
//! device path; both adapters and the base model in one batch; `merge` against PEFT's
//! merge_and_unload goldens; and the adapters kiln must refuse.

mod common;

use common::*;
use kiln::engine::{Engine, EngineConfig, FinishReason, RequestParams};
use kiln::gpu::Gpu;
use kiln::model::lora::{self, AdapterSpec};
use kiln::ops::{lora as lora_op, matmul};
use kiln::sampling::SamplingParams;
use kiln::{GenerateParams, Model, Session};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("llama3-tiny-lora/golden.json")).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

const ADAPTERS: [&str; 2] = ["adapter-a", "adapter-b"];

fn spec(name: &str) -> AdapterSpec {
    AdapterSpec { path: fixture("llama3-tiny-lora").join(name), scale: 1.0 }
}

/// llama3-tiny with both fixture adapters loaded (bit 0: adapter-a, bit 1: adapter-b).
fn load(gpu: Arc<Gpu>) -> Model {
    let mut model = Model::load(&fixture("llama3-tiny"), gpu, &mut |_, _| {}).unwrap();
    model.add_adapters(&ADAPTERS.map(spec)).unwrap();
    model
}

/// As tests/model.rs: f32 KV 1e-3 (the fixtures' advice), f16 KV 3e-2.
fn logit_tol(gpu: &Gpu) -> f64 {
    if gpu.caps.f16 {
        3e-2
    } else {
        1e-3
    }
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams { max_tokens: n, sampling: SamplingParams::default(), stop_at_eos: false }
}

#[test]
fn the_kernel_adds_each_tokens_adapters() {
    let mut rng = rng("lora_kernel");
    // Fewer outputs than one workgroup's tile, and several tiles with a partial last one.
    for ((path, gpu), (in_dim, out_dim)) in
        devices().into_iter().flat_map(|d| [(d.clone(), (37usize, 53usize)), (d, (64, 601))])
    {
        let n_tokens = 7usize;
        // Adapters of rank 3 and 5, one that leaves this module alone, and one of rank 1.
        let ranks = [Some(3usize), Some(5), None, Some(1)];
        let mats: Vec<Option<(Vec<f32>, Vec<f32>, f32)>> = ranks
            .iter()
            .map(|r| {
                r.map(|r| {
                    let s = rng_scale(&mut rng);
                    (uniform(&mut rng, r * in_dim, -1.0, 1.0), uniform(&mut rng, out_dim * r, -1.0, 1.0), s)
                })
            })
            .collect();
        let per: Vec<Option<(&[f32], &[f32], f32)>> =
            mats.iter().map(|m| m.as_ref().map(|(a, b, s)| (a.as_slice(), b.as_slice(), *s))).collect();
        let module = lora_op::LoraModule::upload(&gpu, "test", in_dim as u32, out_dim as u32, &per).unwrap();
        assert_eq!(module.total_rank(), 9);
        // None, each alone, several at once, one that does not touch the module, all.
        let masks = [0u32, 1, 2, 3, 4, 0b1010, 0b1111];
        let x = uniform(&mut rng, masks.len() * in_dim, -1.0, 1.0);
        let y0 = uniform(&mut rng, masks.len() * out_dim, -1.0, 1.0);
        let y = upload_f32(&gpu, "y", &y0);
        let mb = gpu.upload("masks", bytemuck::cast_slice(&masks)).unwrap();
        let d = lora_op::apply(&gpu, &module, &mb, &upload_f32(&gpu, "x", &x), &y, n_tokens as u32).unwrap();
        gpu.run("lora", &[&d]).unwrap();
        let got = gpu.read_f32(&y, masks.len() * out_dim).unwrap();
        let want = lora_op::apply_cpu(&y0, &x, &masks, in_dim, out_dim, &per);
        // Two f32 dot products (x·A over in_dim, then u·B over ≤ 9) scaled: bound the first's
        // error by in_dim·u·Σ|x||a| ≤ in_dim² u, carried through |B|·s, plus the rest's few ulps.
        let bound = |i: usize| {
            let scale: f64 = mats.iter().flatten().map(|(_, _, s)| s.abs() as f64).sum();
            let dot = (in_dim as f64 + 2.0) * in_dim as f64 * U32 * 9.0 * scale;
            matmul::dot_error_bound(want[i].abs() as f64 + 1.0, 12, want[i]) + dot
        };
        assert_close_each(&format!("lora {path}"), &got, &want, bound, "two f32 dot products and a scale");
        assert_eq!(&got[..out_dim], &y0[..out_dim], "mask 0: y untouched");
    }
}

fn rng_scale(rng: &mut rand::rngs::StdRng) -> f32 {
    use rand::Rng;
    rng.random_range(0.5f32..2.0)
}

#[test]
fn each_adapter_matches_peft_and_the_base_model_stays_itself() {
    let g = golden();
    let base_golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama3-tiny/golden.json")).unwrap()).unwrap();
    for (path, gpu) in model_devices() {
        let model = load(gpu.clone());
        let vocab = model.config.vocab_size;
        let tol = logit_tol(&gpu);
        for (bit, name) in ADAPTERS.iter().enumerate() {
            let a = &g["adapters"][name];
            let mask = model.weights.lora.mask(&[name]).unwrap();
            assert_eq!(mask, 1 << bit);
            for case in a["logits"].as_array().unwrap() {
                let ids = u32s(&case["input_ids"]);
                let what = format!("{name} {path} {}", case["name"].as_str().unwrap());
                let mut session = Session::new(&model, None).unwrap();
                session.set_adapters(mask).unwrap();
                let all = session.feed_all(&ids).unwrap();
                let last = &all[(ids.len() - 1) * vocab..];
                assert_close(&format!("{what} last"), last, &f32s(&case["last_logits"]), tol, "see logit_tol");
                if let Some(rows) = case["all_logits"].as_array() {
                    let want: Vec<f32> = rows.iter().flat_map(f32s).collect();
                    assert_close(&format!("{what} all"), &all, &want, tol, "see logit_tol");
                }
            }
            for run in a["greedy"].as_array().unwrap() {
                let want = u32s(&run["generated_ids"]);
                let mut session = Session::new(&model, None).unwrap();
                session.set_adapters(mask).unwrap();
                let out = session.generate(&u32s(&run["prompt_ids"]), &greedy(want.len()), |_| {}).unwrap();
                assert_eq!(out.tokens, want, "{name} {path} {}", run["name"]);
            }
        }
        // Loaded adapters change nothing for a session that does not use them.
        let case = &base_golden["logits"][2];
        let last = Session::new(&model, None).unwrap().feed(&u32s(&case["input_ids"])).unwrap();
        assert_close(&format!("base {path}"), &last, &f32s(&case["last_logits"]), tol, "see logit_tol");
    }
}

#[test]
fn base_and_both_adapters_share_a_batch_and_never_share_cached_blocks() {
    let g = golden();
    for (path, gpu) in devices() {
        let model = Arc::new(load(gpu));
        let prompt = u32s(&g["adapters"]["adapter-a"]["greedy"][1]["prompt_ids"]);
        let config = EngineConfig { max_step_tokens: 64, max_context: Some(128), ..Default::default() };
        let engine = Engine::start(model.clone(), config).unwrap();
        let params = |adapters: u32| RequestParams {
            max_tokens: 12,
            sampling: SamplingParams::default(),
            stop_at_eos: false,
            adapters,
            ..Default::default()
        };
        // The same prompt under the base, each adapter and both, all at once.
        let masks = [0u32, 1, 2, 3, 1];
        let requests: Vec<_> = masks.iter().map(|&m| engine.submit(prompt.clone(), params(m)).unwrap()).collect();
        let done: Vec<_> = requests.into_iter().map(|r| r.wait().unwrap()).collect();
        for (m, c) in masks.iter().zip(&done) {
            assert_eq!(c.reason, FinishReason::MaxTokens);
            let mut session = Session::new(&model, Some(128)).unwrap();
            session.set_adapters(*m).unwrap();
            let solo = session.generate(&prompt, &greedy(12), |_| {}).unwrap().tokens;
            assert_eq!(c.tokens, solo, "{path}: adapters {m:#b} in a shared batch");
        }
        assert_ne!(done[0].tokens, done[1].tokens, "{path}: the adapter changes the output");
        // A prompt cached under one choice of adapters is not reused under another.
        let again = engine.submit(prompt.clone(), params(2)).unwrap().wait().unwrap();
        assert!(again.usage.cached_tokens > 0, "{path}: the same adapters reuse their blocks");
        assert_eq!(again.tokens, done[2].tokens);
        let fresh_mask = engine.submit(prompt.clone(), params(0)).unwrap().wait().unwrap();
        assert_eq!(fresh_mask.tokens, done[0].tokens);
        // An adapter the model does not hold is refused at submit.
        let err = engine.submit(prompt.clone(), params(4)).err().expect("refused").to_string();
        assert!(err.contains("adapter mask"), "{err}");
    }
}

#[test]
fn merged_checkpoints_match_peft_merge_and_unload() {
    let g = golden();
    let (_, gpu) = devices().remove(1); // f32 KV: the tight tolerance
    let base = Model::load(&fixture("llama3-tiny"), gpu.clone(), &mut |_, _| {}).unwrap();
    for name in ADAPTERS {
        let adapter = lora::Adapter::read(&spec(name), &base.config).unwrap();
        let dir = tempdir(&format!("merged-{name}"));
        let out = dir.join("model");
        let changed = lora::merge(&fixture("llama3-tiny"), &[adapter], &out, false).unwrap();
        assert_eq!(changed, if name == "adapter-a" { 8 } else { 6 }, "{name}: 2 layers × its modules");
        let merged = Model::load(&out, gpu.clone(), &mut |_, _| {}).unwrap();
        for case in g["adapters"][name]["merged"]["logits"].as_array().unwrap() {
            let ids = u32s(
                &g["adapters"][name]["logits"].as_array().unwrap().iter().find(|c| c["name"] == case["name"]).unwrap()
                    ["input_ids"],
            );
            let last = Session::new(&merged, None).unwrap().feed(&ids).unwrap();
            assert_close(
                &format!("merged {name} {}", case["name"]),
                &last,
                &f32s(&case["last_logits"]),
                1e-3,
                "f32 weights, f32 KV",
            );
        }
        // Never over an existing directory without --force, never over an input.
        let again = lora::Adapter::read(&spec(name), &base.config).unwrap();
        let err = lora::merge(&fixture("llama3-tiny"), &[again], &out, false).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        let again = lora::Adapter::read(&spec(name), &base.config).unwrap();
        let err =
            lora::merge(&fixture("llama3-tiny"), &[again], &fixture("llama3-tiny"), true).unwrap_err().to_string();
        assert!(err.contains("is an input"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of adapter-a with `edit` applied to its config (and tensors).
fn damaged(name: &str, edit: impl FnOnce(&mut Value, &PathBuf)) -> AdapterSpec {
    let dir = tempdir(name).join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("llama3-tiny-lora/adapter-a");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg, &dir);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    AdapterSpec { path: dir, scale: 1.0 }
}

#[test]
fn bad_adapters_are_clear_errors() {
    let (_, gpu) = devices().remove(0);
    let base = Model::load(&fixture("llama3-tiny"), gpu.clone(), &mut |_, _| {}).unwrap();
    let err = |s: AdapterSpec| lora::Adapter::read(&s, &base.config).err().map(|e| e.to_string()).expect("refused");
    let e = err(damaged("rank", |c, _| c["r"] = 4.into()));
    assert!(e.contains("rank 4") && e.contains("[4, 128]"), "rank mismatch: {e}");
    let e = err(damaged("target", |c, _| c["target_modules"] = serde_json::json!(["q_proj", "c_attn"])));
    assert!(e.contains("unknown target module `c_attn`"), "{e}");
    let e = err(damaged("not-targeted", |c, _| c["target_modules"] = serde_json::json!(["q_proj"])));
    assert!(e.contains("not among target_modules"), "{e}");
    let e = err(damaged("dora", |c, _| c["use_dora"] = true.into()));
    assert!(e.contains("DoRA"), "{e}");
    let e = err(damaged("peft", |c, _| c["peft_type"] = "IA3".into()));
    assert!(e.contains("IA3"), "{e}");
    let e = err(damaged("missing", |_, d| std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap()));
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    // The right adapter on the wrong base: qwen2-tiny's k_proj is 32 × 128, adapter-a's B 64 × 8.
    let qwen = Model::load(&fixture("qwen2-tiny"), gpu, &mut |_, _| {}).unwrap();
    let e = lora::Adapter::read(&spec("adapter-a"), &qwen.config).err().unwrap().to_string();
    assert!(e.contains("has shape"), "wrong base: {e}");
    // `--lora PATH:SCALE` parses a trailing number as the scale and keeps other colons.
    assert_eq!("a/b:0.5".parse::<AdapterSpec>().unwrap(), AdapterSpec { path: "a/b".into(), scale: 0.5 });
    assert_eq!("c:d".parse::<AdapterSpec>().unwrap(), AdapterSpec { path: "c:d".into(), scale: 1.0 });
    assert!("e:inf".parse::<AdapterSpec>().is_err());
}
