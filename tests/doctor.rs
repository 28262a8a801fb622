//! `kiln doctor` on this machine's adapter: every kernel a model uses passes its check at the
//! model's shapes, for a real GGUF-style quantised layout (synthetic Qwen2.5-0.5B Q4_K_M mix) and
//! a Hugging Face checkpoint with biases and bf16 weights; the JSON carries every check.

use serde_json::Value;
use std::process::Command;

fn doctor(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("doctor").args(args).arg("--json").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln doctor {args:?} failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_report(v: &Value, what: &str) {
    assert_eq!(v["passed"], true, "{what}: {v}");
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 21, "{what}: 8 matrices × gemv and matmul, rms_norm, rope, 2 attention, argmax");
    for c in checks {
        assert_eq!(c["passed"], true, "{what}: {c}");
        let (worst, bound) = (c["worst_error"].as_f64().unwrap(), c["bound"].as_f64().unwrap());
        assert!(worst <= bound, "{what}: {c}");
    }
    for op in ["gemv lm_head", "matmul down_proj", "rms_norm", "rope", "argmax"] {
        assert!(checks.iter().any(|c| c["op"] == op), "{what}: {op} is checked");
    }
    assert!(checks.iter().filter(|c| c["op"].as_str().unwrap().starts_with("attention")).count() == 2);
}

#[test]
fn doctor_passes_on_this_adapter_for_quantised_and_bf16_models() {
    check_report(&doctor(&["--synthetic", "qwen2.5-0.5b-q4_k"]), "qwen2.5-0.5b-q4_k");
    let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2-tiny");
    check_report(&doctor(&["--model", tiny.to_str().unwrap()]), "qwen2-tiny");
}
