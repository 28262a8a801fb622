//! A Hugging Face directory's text files: config.json, tokenizer.json and
//! tokenizer_config.json (chat template rendered), one input split at NUL bytes. See `../checks.rs` for what is checked.

#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::hf_files(data));
