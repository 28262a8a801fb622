//! The GGUF reader: header, metadata, tensor directory and data, and the model configuration
//! built from the metadata. See `../checks.rs` for what is checked.

#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::gguf(data));
