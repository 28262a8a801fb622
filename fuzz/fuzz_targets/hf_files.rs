//! Fuzz the Hugging Face model directory's text files: config.json, tokenizer.json and
//! tokenizer_config.json, given as one input split at NUL bytes. Each either loads or fails with
//! an error; nothing panics (the tokenizers crate's own panics on damaged files included: kiln
//! turns them into errors). A tokenizer that loads must encode and decode.

#![no_main]

use kiln::model::ModelConfig;
use kiln::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let config = parts.next().unwrap_or_default();
    let tokenizer = parts.next().unwrap_or_default();
    let tokenizer_config = parts.next();
    if let Ok(text) = std::str::from_utf8(config) {
        let _ = ModelConfig::from_json(text, Path::new("config.json"));
    }
    if let Ok(t) = Tokenizer::from_bytes(tokenizer, tokenizer_config, Path::new("tokenizer.json")) {
        if let Ok(ids) = t.encode("Hello, world! 1234 héllo", true) {
            let _ = t.decode(&ids, false);
        }
    }
});
