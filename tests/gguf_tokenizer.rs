//! Tokenizers rebuilt from GGUF metadata (`tokenizer.ggml.*`) tokenise exactly as the
//! tokenizer.json files they were converted from: llama.cpp's golden vectors on its vocab-only
//! GGUF files for `llama-bpe` and `qwen2`, and the real SmolLM2 file's prompts (`smollm`) in
//! tests/real_model.rs.

use kiln::gguf::GgufFile;
use std::path::PathBuf;

fn vocab(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vocab").join(name)
}

fn check(pre: &str) {
    let path = vocab(&format!("ggml-vocab-{pre}.gguf"));
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), pre);
    let tok = kiln::gguf_tokenizer::from_gguf(&file, &path).unwrap();
    let inp = std::fs::read_to_string(vocab(&format!("ggml-vocab-{pre}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(vocab(&format!("ggml-vocab-{pre}.gguf.out"))).unwrap();
    let mut strings: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    assert_eq!(strings.pop(), Some(""), "the remainder after the last separator is not a test");
    let expected: Vec<Vec<u32>> =
        out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(strings.len(), 46);
    assert_eq!(expected.len(), strings.len());
    for (text, want) in strings.iter().zip(&expected) {
        let got = tok.encode(text, false).unwrap();
        assert_eq!(&got, want, "{pre}: {text:?}");
        // And back: decoding the ids gives the text again (byte-level BPE is lossless),
        // except where the qwen2 NFC normaliser changed it.
        if pre != "qwen2" {
            assert_eq!(tok.decode(&got, false).unwrap(), *text, "{pre}: decode");
        }
    }
}

#[test]
fn llama_bpe_from_gguf_passes_the_golden_vectors() {
    check("llama-bpe");
}

#[test]
fn qwen2_from_gguf_passes_the_golden_vectors() {
    check("qwen2");
}
