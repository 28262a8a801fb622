//! Replays the fuzz targets' inputs on stable Rust: every seed (`fuzz/seeds/<target>/`), every
//! input of the minimised corpora the fuzzing runs grew (`fuzz/corpus/<target>.tar.gz`) and every
//! input that once failed (`fuzz/regressions/<target>/`) goes through the same check the target
//! runs (`fuzz/checks.rs`), so a change that breaks on an input the fuzzer once reached fails here.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::io::Read;
use std::path::{Path, PathBuf};

/// (name, bytes) of every file in `dir`, sorted by name; none if there is no such directory.
fn directory(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths.into_iter().map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())).collect()
}

/// (name, bytes) of every file in the gzipped tar `path`; none if there is no such file.
fn archive(path: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(file) = std::fs::File::open(path) else { return Vec::new() };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut inputs = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let name = format!("{}:{}", path.display(), entry.path().unwrap().display());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            inputs.push((name, data));
        }
    }
    inputs
}

fn replay(target: &str, check: fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = directory(&root.join("seeds").join(target));
    let seeds = inputs.len();
    inputs.extend(archive(&root.join("corpus").join(format!("{target}.tar.gz"))));
    inputs.extend(directory(&root.join("regressions").join(target)));
    for (name, data) in &inputs {
        // A panic names the input that caused it.
        let outcome = std::panic::catch_unwind(|| check(data));
        assert!(outcome.is_ok(), "{target}: {name} failed");
    }
    // Every target has seeds; none found means the layout moved.
    assert!(seeds >= 2, "{target}: only {seeds} seeds under {}", root.display());
    eprintln!("{target}: {} inputs replayed ({seeds} seeds)", inputs.len());
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
