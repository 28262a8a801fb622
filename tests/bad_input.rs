//! Bad input gets a clear error and a non-zero exit, never a panic or a wrong answer; and the
//! user's files are never modified (every case works on a copy).

mod common;

use kiln::{Model, Session};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A scratch copy of a fixture model directory.
fn copy_model(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let e = entry.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let (_, gpu) = common::devices().remove(0);
    match Model::load(dir, gpu, &mut |_, _| {}) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Run the CLI; return (exit code, stderr).
fn kiln(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "kiln {args:?} panicked:\n{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

/// Replace the header JSON of a safetensors file, keeping its data.
fn rewrite_header(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn truncated_safetensors() {
    let dir = copy_model("llama3-tiny", "truncated");
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors") && err.contains("malformed"), "{err}");
    // A file cut inside its header, too.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(20).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("malformed"), "{err}");
}

#[test]
fn header_offsets_out_of_range() {
    let dir = copy_model("llama3-tiny", "offsets");
    rewrite_header(&dir.join("model.safetensors"), |h| {
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([0, 1u64 << 40]);
    });
    let err = load_err(&dir);
    assert!(err.contains("malformed"), "{err}");
}

#[test]
fn wrong_dtype() {
    let dir = copy_model("llama3-tiny", "dtype");
    rewrite_header(&dir.join("model.safetensors"), |h| {
        // Same byte size, integer type.
        h["model.norm.weight"]["dtype"] = serde_json::json!("I32");
    });
    let err = load_err(&dir);
    assert!(err.contains("model.norm.weight") && err.contains("dtype"), "{err}");
}

#[test]
fn wrong_shape_missing_and_extra_tensors() {
    let dir = copy_model("llama3-tiny", "shape");
    let cfg = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("\"intermediate_size\": 344", "\"intermediate_size\": 345");
    std::fs::write(&cfg, text).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("shape") && err.contains("mlp"), "{err}");

    let dir = copy_model("llama3-tiny", "missing");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    std::fs::write(&cfg, text).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("missing tensor `model.layers.2."), "{err}");

    let dir = copy_model("llama3-tiny", "extra");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true");
    std::fs::write(&cfg, text).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("unexpected tensor `lm_head.weight`"), "{err}");
}

#[test]
fn unknown_architecture_and_rope_scaling() {
    let dir = copy_model("llama3-tiny", "arch");
    let cfg = dir.join("config.json");
    let orig = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, orig.replace("LlamaForCausalLM", "GPTNeoXForCausalLM")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("unknown architecture `GPTNeoXForCausalLM`"), "{err}");
    std::fs::write(
        &cfg,
        orig.replace("\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}"),
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(err.contains("unknown rope_scaling type `yarn`"), "{err}");
    std::fs::write(&cfg, "{ not json").unwrap();
    let err = load_err(&dir);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn missing_tokenizer() {
    let dir = copy_model("qwen2-tiny", "tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// A damaged tokenizer.json: the CLI says which file and that it is damaged, exits non-zero,
/// and prints nothing else (the tokenizers crate panics on these; kiln must not).
fn assert_damaged_tokenizer(model: &str, tag: &str, damage: impl Fn(&str) -> String) {
    let dir = copy_model(model, tag);
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let damaged = damage(&text);
    assert_ne!(damaged, text, "{tag}: the damage changed the file");
    std::fs::write(&path, damaged).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("tokenizer.json") && err.contains("damaged"), "{tag}: {err}");
    for command in ["info", "chat"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([command, "--model", dir.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{tag} {command}: a clear error, not a panic (101):\n{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{tag} {command}: only the error on stderr:\n{stderr}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains("damaged"), "{tag} {command}: {stderr}");
    }
}

/// Replace the first `from` after `section` in `text` by `to`.
fn damage_after(text: &str, section: &str, from: &str, to: &str) -> String {
    let at = text.find(section).unwrap_or_else(|| panic!("no {section}"));
    let rel = text[at..].find(from).unwrap_or_else(|| panic!("no {from} after {section}"));
    format!("{}{to}{}", &text[..at + rel], &text[at + rel + from.len()..])
}

#[test]
fn damaged_tokenizer_json_is_a_clear_error_not_a_panic() {
    // An invalid escape inside the decoder object, as a flipped byte makes one.
    assert_damaged_tokenizer("qwen2-tiny", "tok-decoder", |t| {
        damage_after(t, "\"decoder\"", "\"ByteLevel\"", "\"Byte\\uZZZZ\"")
    });
    // A key that is not a string inside the normalizer object.
    assert_damaged_tokenizer("qwen2-tiny", "tok-normalizer", |t| damage_after(t, "\"normalizer\"", "\"type\"", "7"));
    // A file cut short.
    assert_damaged_tokenizer("qwen2-tiny", "tok-truncated", |t| t[..t.len() / 2].to_string());
    // A post-processor template naming a special token its `special_tokens` lack (one changed
    // letter in the key): the file parses, then every encode would index out of bounds (found by
    // the hf_files fuzz target; fuzz/regressions/hf_files/).
    assert_damaged_tokenizer("llama3-tiny", "tok-template", |t| {
        damage_after(t, "\"special_tokens\"", "\"<|begin_of_text|>\"", "\"<|begin_Of_text|>\"")
    });
}

#[test]
fn start_up_prints_only_kilns_own_lines() {
    // No Wayland session here: Mesa's device-select layer would complain about XDG_RUNTIME_DIR.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["info", "--model", fixture("llama3-tiny").to_str().unwrap()])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr:\n{stderr}");
    assert!(lines[0].starts_with("loaded "), "{stderr}");
}

#[test]
fn cli_reports_errors_with_a_nonzero_exit() {
    let model = fixture("llama3-tiny");
    let model = model.to_str().unwrap();
    let (code, err) = kiln(&["generate", "--model", model, "--prompt", ""]);
    assert_ne!(code, 0);
    assert!(err.contains("empty"), "{err}");

    let (code, err) = kiln(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/model"), "{err}");

    let (code, err) =
        kiln(&["generate", "--model", model, "--prompt", "The license grants you", "--max-tokens", "300"]);
    assert_ne!(code, 0, "256 positions cannot hold the prompt and 300 new tokens");
    assert!(err.contains("exceed the context"), "{err}");

    let (code, err) = kiln(&["generate", "--model", model, "--prompt", "hi", "--top-p", "0"]);
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("top_p") || err.to_lowercase().contains("top-p"), "{err}");
}

#[test]
fn cli_generates_on_the_fixture() {
    let (code, err) = kiln(&[
        "generate",
        "--model",
        fixture("llama3-tiny").to_str().unwrap(),
        "--prompt",
        "The license grants you the freedom to",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prompt tokens: 9") && err.contains("decode:"), "{err}");
}

#[test]
fn sessions_leave_model_files_untouched() {
    let dir = copy_model("qwen2-tiny", "untouched");
    let before: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let (_, gpu) = common::devices().remove(0);
    let model = Model::load(&dir, gpu, &mut |_, _| {}).unwrap();
    let mut s = Session::new(&model, None).unwrap();
    s.feed(&[1, 2, 3]).unwrap();
    drop(model);
    for (p, bytes) in before {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
    }
}

#[test]
fn cli_info_perplexity_and_chat_run_on_the_fixtures() {
    let qwen = fixture("qwen2-tiny");
    let qwen = qwen.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["info", "--model", qwen]).output().unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        info.contains("Qwen2") && info.contains("407168") && info.contains("bf16") && info.contains("bytes/token"),
        "{info}"
    );

    let text = fixture("README.md");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["perplexity", "--model", qwen, "--file", text.to_str().unwrap(), "--ctx", "128"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ppl: f64 =
        stdout.lines().find_map(|l| l.strip_prefix("perplexity: ")).expect("a perplexity line").parse().unwrap();
    // A random-weight model over a 997-token vocabulary: finite, above 1, and not better than chance by much.
    assert!(ppl.is_finite() && ppl > 1.0, "{stdout}");

    // Two chat turns from stdin: the second turn reuses the cache (its prompt tokens < the whole conversation's).
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", "--model", qwen, "--max-tokens", "5", "--temperature", "0", "--system", "Be brief."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello there!\nAnd again?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let prompts: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("prompt tokens: "))
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(prompts.len(), 2, "{stderr}");
    let first_turn = kiln::tokenizer::Tokenizer::from_dir(&fixture("qwen2-tiny")).unwrap();
    let whole = first_turn
        .encode_chat(
            &[
                kiln::tokenizer::ChatMessage::new("system", "Be brief."),
                kiln::tokenizer::ChatMessage::new("user", "Hello there!"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(prompts[0], whole.len(), "the first turn feeds the whole rendered prompt");
    assert!(prompts[1] < prompts[0] + 5 + 10, "the second turn feeds only its new tokens: {prompts:?}");
}

#[test]
fn hub_repo_ids_resolve_through_the_hugging_face_cache() {
    // The standard cache layout, offline: models--org--name/refs/main → snapshots/<commit>/.
    let hub = std::env::temp_dir().join(format!("kiln-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&hub);
    let repo = hub.join("models--kiln-test--qwen2-tiny");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    for e in std::fs::read_dir(fixture("qwen2-tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snapshot.join(e.file_name())).unwrap();
    }
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["info", "--model", id])
            .env("HF_HUB_CACHE", &hub)
            .output()
            .unwrap()
    };
    let out = run("kiln-test/qwen2-tiny");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("snapshots/0123abcd"));
    let out = run("kiln-test/absent-model");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in the Hugging Face cache") && !err.contains("panicked"), "{err}");
}
