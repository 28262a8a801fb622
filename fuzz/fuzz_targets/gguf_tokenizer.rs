//! The GGUF tokenizer builder: `tokenizer.ggml.*` metadata rebuilt as a tokenizer, then used
//! (encode, decode, stream, chat template). See `../checks.rs` for what is checked.

#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::gguf_tokenizer(data));
