//! Replays the fuzz targets' inputs on stable Rust: every seed (`fuzz/seeds/<target>/`), every
//! input of the minimised corpora the fuzzing runs grew (`fuzz/corpus/<target>/`) and every input
//! that once failed (`fuzz/regressions/<target>/`) goes through the same check the target runs
//! (`fuzz/checks.rs`), so a change that breaks on an input the fuzzer once reached fails here.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["seeds", "corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap();
            // A panic names the input that caused it.
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{target}: {} failed", path.display());
            count += 1;
        }
    }
    // The seeds alone are several inputs per target; none found means the layout moved.
    assert!(count >= 2, "{target}: only {count} inputs found under {}", root.display());
}

#[test]
fn gguf_inputs_replay_cleanly() {
    replay("gguf", checks::gguf);
}

#[test]
fn gguf_tokenizer_inputs_replay_cleanly() {
    replay("gguf_tokenizer", checks::gguf_tokenizer);
}

#[test]
fn safetensors_inputs_replay_cleanly() {
    replay("safetensors", checks::safetensors);
}

#[test]
fn hf_files_inputs_replay_cleanly() {
    replay("hf_files", checks::hf_files);
}
