//! config.json → ModelConfig: both fixture layouts, transformers-5 spellings, Llama 3 rope
//! scaling, and the errors for what kiln cannot run. No GPU needed.

use kiln::model::{Architecture, ModelConfig};
use std::path::Path;

fn parse(text: &str) -> kiln::Result<ModelConfig> {
    ModelConfig::from_json(text, Path::new("config.json"))
}

fn fixture(name: &str) -> ModelConfig {
    ModelConfig::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).join("config.json"))
        .unwrap()
}

#[test]
fn fixtures_parse_with_derived_sizes() {
    let l = fixture("llama3-tiny");
    assert_eq!(l.architecture, Architecture::Llama);
    assert_eq!((l.n_heads, l.n_kv_heads, l.head_dim, l.hidden_size), (4, 2, 32, 128));
    assert_eq!((l.rope_theta, l.rms_norm_eps), (500000.0, 1e-5));
    assert!(!l.tie_word_embeddings && !l.qkv_bias && l.rope_scaling.is_none());
    assert_eq!(l.eos_token_ids, vec![997]);
    assert_eq!(l.parameter_count(), 619_136, "the fixture README's parameter count");

    let q = fixture("qwen2-tiny");
    assert_eq!(q.architecture, Architecture::Qwen2);
    assert_eq!((q.n_heads, q.n_kv_heads, q.head_dim), (4, 1, 32), "head_dim derived from hidden / heads");
    assert!(q.tie_word_embeddings && q.qkv_bias && !q.o_bias);
    assert_eq!(q.parameter_count(), 407_168);
    // layers × kv_heads × head_dim × (K, V) × bytes
    assert_eq!(q.kv_bytes_per_token(2), 2 * 32 * 2 * 2);
    assert!(q.attention_windows.iter().all(Option::is_none), "use_sliding_window is false");

    let q3 = fixture("qwen3-tiny");
    assert_eq!(q3.architecture, Architecture::Qwen3);
    assert_eq!((q3.n_heads, q3.n_kv_heads, q3.head_dim, q3.q_dim()), (4, 2, 48, 192), "explicit head_dim");
    assert!(q3.qk_norm && !q3.qkv_bias && q3.tie_word_embeddings);
    assert_eq!(q3.parameter_count(), 521_664, "q_norm and k_norm counted");

    let m = fixture("mistral-swa-tiny");
    assert_eq!(m.architecture, Architecture::Llama);
    assert_eq!(m.attention_windows, vec![Some(16); 2], "Mistral's window applies to every layer");
    assert_eq!(m.parameter_count(), 551_552);
}

#[test]
fn mixtures_of_experts_parse_with_their_routing_and_sizes() {
    let q = fixture("qwen2-moe-tiny");
    assert_eq!(q.architecture, Architecture::Qwen2Moe);
    let m = q.moe.as_ref().unwrap();
    assert_eq!((m.n_experts, m.top_k, m.expert_intermediate_size, m.shared_intermediate_size), (8, 2, 64, Some(128)));
    assert!(!m.norm_topk_prob && q.qkv_bias);
    assert_eq!(m.sparse_layers, vec![true, true]);
    assert_eq!(q.parameter_count(), 848_512, "the fixture README's parameter count");

    let x = fixture("mixtral-tiny");
    assert_eq!(x.architecture, Architecture::Mixtral);
    let m = x.moe.as_ref().unwrap();
    assert_eq!((m.n_experts, m.top_k, m.expert_intermediate_size, m.shared_intermediate_size), (4, 2, 192, None));
    assert!(m.norm_topk_prob, "Mixtral always renormalises");
    assert_eq!(x.parameter_count(), 945_792);

    // Qwen's dense layers among expert ones: mlp_only_layers and decoder_sparse_step.
    let qwen3_moe = |extra: &str| {
        parse(&format!(
            r#"{{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 6, "num_attention_heads": 4, "vocab_size": 100, "num_experts": 16,
              "num_experts_per_tok": 4, "moe_intermediate_size": 32, "norm_topk_prob": true {extra}}}"#
        ))
    };
    let c = qwen3_moe(r#", "decoder_sparse_step": 2, "mlp_only_layers": [3]"#).unwrap();
    assert!(c.qk_norm && !c.qkv_bias);
    assert_eq!(c.moe.as_ref().unwrap().sparse_layers, vec![false, true, false, false, false, true]);
    let base = qwen3_moe("").unwrap();
    assert_eq!(base.moe.as_ref().unwrap().sparse_layers, vec![true; 6]);
    let err = |from: &str, to: &str| {
        let text = format!(
            r#"{{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 6, "num_attention_heads": 4, "vocab_size": 100, "num_experts": 16,
              "num_experts_per_tok": 4, "moe_intermediate_size": 32}}"#
        );
        assert!(text.contains(from));
        parse(&text.replace(from, to)).unwrap_err().to_string()
    };
    let e = err(r#""num_experts_per_tok": 4"#, r#""num_experts_per_tok": 17"#);
    assert!(e.contains("17 of 16 experts"), "more chosen than exist: {e}");
    let e = err(r#""num_experts": 16"#, r#""num_experts": 300"#);
    assert!(e.contains("at most 16 of 256"), "{e}");
    let e = err(r#""moe_intermediate_size": 32"#, r#""moe_intermediate_size": 0"#);
    assert!(e.contains("intermediate size"), "{e}");
}

/// Which layers slide, as transformers decides: Mistral every layer; Qwen2/Qwen3 only with
/// `use_sliding_window`, from `max_window_layers` on; an explicit `layer_types` over both.
#[test]
fn sliding_windows_follow_transformers_per_layer_rules() {
    let qwen = |extra: &str| {
        parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100, "sliding_window": 32 {extra}}}"#
        ))
    };
    assert_eq!(qwen("").unwrap().attention_windows, vec![None; 4], "off unless use_sliding_window");
    let on = qwen(r#", "use_sliding_window": true, "max_window_layers": 3"#).unwrap();
    assert_eq!(on.attention_windows, vec![None, None, None, Some(32)]);
    let typed = qwen(
        r#", "use_sliding_window": true,
           "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]"#,
    )
    .unwrap();
    assert_eq!(typed.attention_windows, vec![Some(32), None, Some(32), None]);
    let short = qwen(r#", "use_sliding_window": true, "layer_types": ["full_attention"]"#).unwrap_err().to_string();
    assert!(short.contains("layer_types lists 1 layers, the model has 4"), "{short}");
    let odd = qwen(r#", "use_sliding_window": true, "layer_types": ["a", "b", "c", "chunked_attention"]"#)
        .unwrap_err()
        .to_string();
    assert!(odd.contains("layer type `a` is not supported"), "{odd}");
}

const LLAMA31: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
  "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000
}"#;

#[test]
fn llama31_rope_scaling_and_eos_list() {
    let c = parse(LLAMA31).unwrap();
    let s = c.rope_scaling.expect("llama3 scaling");
    assert_eq!(
        (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings),
        (8.0, 1.0, 4.0, 8192.0)
    );
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.parameter_count(), 8_030_261_248, "Llama-3.1-8B");
}

#[test]
fn transformers5_rope_parameters() {
    let text = LLAMA31
        .replace(r#""rope_theta": 500000.0,"#, "")
        .replace(r#""rope_scaling": {"factor""#, r#""rope_parameters": {"rope_theta": 500000.0, "factor""#);
    let c = parse(&text).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert!(c.rope_scaling.is_some());
}

#[test]
fn what_kiln_cannot_run_is_named() {
    let err = |t: &str| parse(t).unwrap_err().to_string();
    assert!(err(&LLAMA31.replace("LlamaForCausalLM", "GemmaForCausalLM"))
        .contains("unknown architecture `GemmaForCausalLM`"));
    assert!(err(&LLAMA31.replace(r#""rope_type": "llama3""#, r#""rope_type": "longrope""#))
        .contains("unknown rope_scaling type `longrope`"));
    assert!(
        err(&LLAMA31.replace(r#""num_key_value_heads": 8"#, r#""num_key_value_heads": 5"#)).contains("do not divide")
    );
    assert!(err(&LLAMA31.replace(r#""hidden_size": 4096,"#, "")).contains("hidden_size"));
    assert!(err(&LLAMA31
        .replace(r#""rope_type": "llama3""#, r#""rope_type": "llama3", "x": 1"#)
        .replace(r#""low_freq_factor": 1.0,"#, ""))
    .contains("low_freq_factor"));
    let mistral_swa = LLAMA31
        .replace("LlamaForCausalLM", "MistralForCausalLM")
        .replace(r#""vocab_size""#, r#""sliding_window": -5, "vocab_size""#);
    assert!(err(&mistral_swa).contains("sliding_window -5 is not a positive number"));
    let mistral = LLAMA31
        .replace("LlamaForCausalLM", "MistralForCausalLM")
        .replace(r#""vocab_size""#, r#""sliding_window": null, "vocab_size""#);
    assert_eq!(parse(&mistral).unwrap().architecture, Architecture::Llama);
    assert!(err("[1, 2]").contains("config.json"));
}

#[test]
fn sizes_no_model_has_are_refused_before_anything_uses_them() {
    // A damaged file's layer count would otherwise loop for hours building the tensor list, and
    // huge dimensions would overflow the size products (the fuzz targets build the tensor list
    // and sizes of every config they get accepted).
    let with = |from: &str, to: &str| {
        let text = LLAMA31.replace(from, to);
        assert_ne!(text, LLAMA31, "{from} is in the config");
        parse(&text).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("{to} must be refused"))
    };
    let err = with("\"num_hidden_layers\": 32", "\"num_hidden_layers\": 1000000000000");
    assert!(err.contains("layers 1000000000000 is out of range"), "{err}");
    let err = with("\"vocab_size\": 128256", "\"vocab_size\": 99999999999");
    assert!(err.contains("vocabulary size"), "{err}");
    let err = with("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": -1.0");
    assert!(err.contains("rms_norm_eps"), "{err}");
    let err = with("\"rope_theta\": 500000.0", "\"rope_theta\": 0.0");
    assert!(err.contains("rope_theta"), "{err}");
    // Equal low and high frequency factors would divide by zero in the smoothing.
    let err = with("\"high_freq_factor\": 4.0", "\"high_freq_factor\": 1.0");
    assert!(err.contains("high_freq_factor > low_freq_factor"), "{err}");
    // The largest real models are well inside the bounds.
    assert!(parse(LLAMA31).is_ok());
}

/// GGUF metadata of every new family (fuzz/seeds/gguf/, written by gguf-py as llama.cpp's
/// converter names things): the architecture, Qwen3's key_length and q/k norms, the experts'
/// counts and sizes, Qwen2-MoE's shared expert, Mixtral as arch llama with experts (permuted
/// q/k: interleaved RoPE); and the tensors, the per-expert slices of `*_exps` included, match.
#[test]
fn gguf_files_of_the_new_families_give_their_configs() {
    use kiln::model::checkpoint::check_tensors;
    use kiln::model::gguf_source::GgufSource;
    use kiln::model::weights::expected_tensors;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf");
    // (file, architecture, q/k norms, experts' intermediate size, renormalised, shared expert)
    let cases = [
        ("tiny-qwen3.gguf", Architecture::Qwen3, true, None, false, None),
        ("tiny-qwen2moe.gguf", Architecture::Qwen2Moe, false, Some(32), false, Some(64)),
        ("tiny-qwen3moe.gguf", Architecture::Qwen3Moe, true, Some(32), true, None),
        ("tiny-mixtral.gguf", Architecture::Mixtral, false, Some(64), true, None),
    ];
    for (file, arch, qk_norm, expert_ff, renorm, shared) in cases {
        let path = dir.join(file);
        let src = GgufSource::open(&path).unwrap();
        let c = src.config().unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!((c.architecture, c.qk_norm, c.head_dim), (arch, qk_norm, 8), "{file}");
        assert_eq!(c.rope_interleaved, arch == Architecture::Mixtral, "{file}: llama-arch q/k are permuted");
        match (&c.moe, expert_ff) {
            (Some(m), Some(ff)) => {
                assert_eq!((m.n_experts, m.top_k, m.expert_intermediate_size), (4, 2, ff), "{file}");
                assert_eq!((m.norm_topk_prob, m.shared_intermediate_size), (renorm, shared), "{file}");
                assert_eq!(m.sparse_layers, vec![true], "{file}");
            }
            (None, None) => {}
            (m, _) => panic!("{file}: experts {m:?}"),
        }
        check_tensors(&src, &expected_tensors(&c), &path).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}
